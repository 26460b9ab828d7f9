"""Attention Zoo: one attention core, many thin model families.

Public API::

    import zoo
    zoo.list_models("vit_*")
    model = zoo.create_model("vit_tiny_patch16_224", num_classes=10)
    zoo.save_pretrained(model, "out/vit")
    model = zoo.from_pretrained("out/vit")
    from zoo.attention import attend, Causal, Window, Segments
"""
from zoo.registry import create_model, list_models, register_model, is_model, get_model_entry

__version__ = "0.1.0"


def __getattr__(name):  # lazy: hub pulls in safetensors, only when used
    if name in {"save_pretrained", "from_pretrained", "load_state_dict_file"}:
        from zoo import hub

        value = getattr(hub, name)
        globals()[name] = value  # later accesses are plain attribute lookups
        return value
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")


def __dir__():  # the lazy names too (tab completion, dir(zoo))
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "create_model",
    "list_models",
    "register_model",
    "is_model",
    "get_model_entry",
    "save_pretrained",
    "from_pretrained",
    "load_state_dict_file",
    "__version__",
]
