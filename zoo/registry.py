"""Model registry: ``register_model`` / ``create_model`` / ``list_models`` (the timm pattern).

A model family file (``zoo/tasks/<domain>/<family>.py``) registers one constructor per named
configuration::

    @register_model(task="vision", family="vit", default_cfg={"img_size": 224, ...})
    def vit_tiny_patch16_224(**kwargs) -> nn.Module: ...

Constructors take flat, typed, JSON-serialisable keyword arguments (a design rule of the zoo) so that a
model can be rebuilt from the ``config.json`` written by :func:`zoo.save_pretrained`.
Model families live in ``zoo.tasks``; they are imported lazily the first time the registry is queried,
so ``import zoo`` stays light and the core never imports a task at import time.
"""
from __future__ import annotations

import contextlib
import difflib
import fnmatch
import importlib
import inspect
import re
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn

from zoo.layers import to_pair

__all__ = [
    "ModelEntry",
    "UnknownModelError",
    "register_model",
    "create_model",
    "list_models",
    "get_model_entry",
    "is_model",
    "MODEL_MODULES",
    "DEPRECATED_MODEL_NAMES",
    "note_model_args",
    "image_data_config",
]

# Task modules that register models; imported on first registry query.
MODEL_MODULES: list[str] = [
    "zoo.tasks.vision",
    "zoo.tasks.graph",
]

# Renamed models: old name -> new name. create_model warns and forwards (public names are frozen).
DEPRECATED_MODEL_NAMES: dict[str, str] = {}


class UnknownModelError(KeyError):
    """Raised by :func:`create_model` for a name that is not registered (lists close matches)."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else "unknown model"


@dataclass
class ModelEntry:
    name: str
    constructor: Callable[..., nn.Module]
    task: str
    family: str
    default_cfg: dict[str, Any] = field(default_factory=dict)
    module: str = ""

    def describe(self) -> str:
        return f"{self.name} ({self.task}/{self.family})"


_REGISTRY: dict[str, ModelEntry] = {}
_MODULES_IMPORTED = False


def _import_model_modules() -> None:
    global _MODULES_IMPORTED
    if _MODULES_IMPORTED:
        return
    _MODULES_IMPORTED = True
    for module in MODEL_MODULES:
        importlib.import_module(module)


def register_model(
    fn: Callable[..., nn.Module] | None = None,
    *,
    task: str = "",
    family: str = "",
    default_cfg: dict[str, Any] | None = None,
    name: str | None = None,
):
    """Register a model constructor under its function name (or ``name``).

    Usable bare (``@register_model``) or with metadata (``@register_model(task="vision", family="vit")``).
    Registering the same name twice from a different function is an error (it would silently shadow).
    """

    def wrap(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        model_name = name or f.__name__
        existing = _REGISTRY.get(model_name)
        if existing is not None and existing.module != f.__module__:
            raise ValueError(
                f"model name {model_name!r} is already registered by {existing.module}; "
                f"cannot register it again from {f.__module__}"
            )
        module_tail = f.__module__.rsplit(".", 1)[-1]
        _document_constructor(f, model_name)
        _REGISTRY[model_name] = ModelEntry(
            name=model_name,
            constructor=f,
            task=task or (f.__module__.split(".")[2] if f.__module__.startswith("zoo.tasks.") else ""),
            family=family or module_tail,
            default_cfg=dict(default_cfg or {}),
            module=f.__module__,
        )
        return f

    if fn is not None:
        return wrap(fn)
    return wrap


def _document_constructor(f: Callable[..., nn.Module], model_name: str) -> None:
    """Give a ``**kwargs`` constructor a docstring that lists the keyword arguments it passes on (those of the model
    class its return annotation names), since help() and inspect.signature show only ``**kwargs``."""
    import typing

    try:
        model_class = typing.get_type_hints(f).get("return")
    except Exception:  # an annotation that does not resolve: leave the docstring as it is
        return
    if not isinstance(model_class, type) or not issubclass(model_class, nn.Module):
        return
    names = [p.name for p in inspect.signature(model_class).parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    summary = (f.__doc__ or f"{model_name}: a {model_class.__name__}.").rstrip()
    f.__doc__ = (f"{summary}\n\n{model_name}(**kwargs) -> {model_class.__name__}: keyword arguments override this "
                 f"configuration and go to {model_class.__name__}: {', '.join(names)} "
                 f"(zoo.create_model({model_name!r}, ...) checks them by name).")


def list_models(pattern: str | Iterable[str] = "*", *, task: str | None = None, family: str | None = None,
                exclude_filters: str | Iterable[str] = (), pretrained: bool = False,
                include_tags: Optional[bool] = None, filter: str | Iterable[str] | None = None) -> list[str]:
    """Sorted registered names matching a shell-style ``pattern`` (or any of several patterns; ``""`` matches
    every name, as in timm) and none of ``exclude_filters`` (timm's keyword). ``filter`` is timm's name for
    ``pattern`` (``timm.list_models(filter=...)``); give one or the other.

    ``pretrained=True`` (timm's keyword) keeps the names that ``create_model(name, pretrained=True)`` can load here,
    offline: a checkpoint shipped with the zoo, or timm's weights already in the Hugging Face cache (timm lists the
    names that have weights to download; the zoo never downloads).

    ``include_tags`` (timm's keyword; default: the value of ``pretrained``, as in timm) lists timm's tagged names
    ``<name>.<tag>`` -- one per pretrained configuration timm knows for the name, the untagged name when it has none
    (the zoo's own models) -- and a pattern without a tag also matches every tag of the names it matches
    (``"vit_tiny*"`` lists ``vit_tiny_patch16_224.augreg_in21k``), as timm's filter expansion does. With
    ``pretrained=True`` a tagged name is kept when its weights are in the local cache.
    """
    _import_model_modules()
    if not isinstance(pretrained, bool):
        raise TypeError(f"list_models: pretrained must be True or False, got {pretrained!r}")
    if include_tags is None:
        include_tags = pretrained
    if not isinstance(include_tags, bool):
        raise TypeError(f"list_models: include_tags must be True, False or None, got {include_tags!r}")
    if filter is not None:
        if not (isinstance(pattern, str) and pattern == "*"):
            raise TypeError("list_models: give the pattern either as the first argument or as filter= (timm's name), "
                            f"not both (got {pattern!r} and filter={filter!r})")
        pattern = filter

    def as_patterns(value, what: str, allow_empty: bool) -> list[str]:
        patterns = [value] if isinstance(value, str) else list(value) if isinstance(value, Iterable) else None
        if patterns is None or (not patterns and not allow_empty) or not all(isinstance(p, str) for p in patterns):
            raise TypeError(f"list_models: {what} must be a str or a {'' if allow_empty else 'non-empty '}collection "
                            f"of str, got {value!r}")
        return patterns

    patterns = [p or "*" for p in as_patterns(pattern, "filter" if filter is not None else "pattern", False)]
    excluded = [p for p in as_patterns(exclude_filters, "exclude_filters", True) if p]
    if include_tags:  # timm's _expand_filter: an untagged pattern also matches the names' tags
        patterns = [q for p in patterns for q in ((p,) if "." in p else (p, p + ".*"))]
        excluded = [q for p in excluded for q in ((p,) if "." in p else (p, p + ".*"))]
    names = []
    for model_name, entry in _REGISTRY.items():
        if task is not None and entry.task != task:
            continue
        if family is not None and entry.family != family:
            continue
        for listed in _tagged_names(model_name) if include_tags else (model_name,):
            if any(fnmatch.fnmatchcase(listed, p) for p in patterns) and not any(
                    fnmatch.fnmatchcase(listed, p) for p in excluded):
                names.append(listed)
    if pretrained:
        names = [name for name in names if _loadable_offline(name)]
    return sorted(names)


def _tagged_names(name: str) -> tuple[str, ...]:
    """timm's tagged names for registered ``name`` (``<name>.<tag>`` per pretrained configuration timm knows), or
    ``(name,)`` when timm knows none (the zoo's own models), as timm's list_models(include_tags=True)."""
    try:
        from timm.models import get_arch_pretrained_cfgs

        tagged = tuple(get_arch_pretrained_cfgs(name))
    except Exception:  # timm absent, or a name timm does not register
        tagged = ()
    return tagged or (name,)


def _loadable_offline(name: str) -> bool:
    """Whether ``create_model(name, pretrained=True)`` finds weights without a download."""
    from zoo.hub import _cache_folder, shipped_checkpoint, timm_hub_id

    if shipped_checkpoint(name) is not None:
        return True
    hub_id = timm_hub_id(name)
    return hub_id is not None and _cache_folder(hub_id).is_dir()


def split_model_tag(name: str) -> tuple[str, str]:
    """("vit_base_patch16_224", "augreg_in21k") for timm's tagged name "vit_base_patch16_224.augreg_in21k";
    (name, "") for an untagged one."""
    base, _, tag = name.partition(".")
    return base, tag


def is_model(name: str) -> bool:
    """Whether ``name`` (a timm-style tagged name counts by its architecture) is registered."""
    _import_model_modules()
    if not isinstance(name, str):
        return False
    base = split_model_tag(name)[0]
    return base in _REGISTRY or base in DEPRECATED_MODEL_NAMES


def current_model_name(name: str) -> str:
    """``name`` as registered today: a deprecated name (DEPRECATED_MODEL_NAMES) gives its new one, silently (for
    names read back from saved files; get_model_entry warns a caller who typed one)."""
    return DEPRECATED_MODEL_NAMES.get(name, name)


def get_model_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; an unknown name raises with the closest registered names."""
    _import_model_modules()
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__} {name!r}")
    if "." in name and name not in _REGISTRY:  # timm's tagged name: its architecture (is_model agrees)
        name = split_model_tag(name)[0]
    new = current_model_name(name)
    if new != name:
        import warnings

        warnings.warn(f"model name {name!r} is deprecated; use {new!r}", FutureWarning, stacklevel=3)
        name = new
    if not isinstance(name, str) or name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}.{hint} ({len(_REGISTRY)} models registered; see zoo.list_models() or `zoo list`)"
        )
    return _REGISTRY[name]


# why weights cannot be loaded into a model on the meta device, and what to do (create_model, zoo.hub's loaders)
META_DEVICE_ADVICE = ("builds a model without storage, so pretrained weights cannot be loaded into it: build it on meta, "
                      "call model.to_empty(device=...), timm.models._manipulate.reinit_non_persistent_buffers(model) "
                      "(buffers no state dict holds) and then load the weights")


def create_model(name: str, pretrained: bool | str = False, *, features_only: bool = False,
                 out_indices: Any = None, device: Any = None, dtype: Optional[torch.dtype] = None,
                 **overrides: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: registered model name (see :func:`list_models`), or timm's tagged name ``<name>.<tag>``: the model
            that tag's weights need, built with the class count and preprocessing of timm's pretrained cfg for
            the tag (``.dino``: no head), as ``timm.create_model`` does, unless ``overrides`` say otherwise.
        pretrained: ``False`` for random init; a directory or ``.safetensors`` file written by
            :func:`zoo.save_pretrained` (or timm's Hub files) to load weights from; a Hub repository id
            found in the local Hugging Face cache (``"timm/<name>.<tag>"``, never downloaded); ``True`` for
            the checkpoint that this project ships for ``name`` under ``checkpoints/``, else timm's default
            weights for ``name`` when they are in the local Hugging Face cache (raises if neither is there).
        features_only: return a backbone that maps images to a list of feature maps
            (:class:`zoo.features.FeatureExtractor`, timm's ``features_only``); weights load first.
        out_indices: with ``features_only``, the taps to return (an int n = the last n, a sequence,
            None = the family's default, as timm's).
        device: build the parameters and buffers directly on this device (timm's ``device=``), e.g.
            ``"cuda"``, or ``"meta"`` for a model without storage (then ``model.to_empty(device=...)``, timm's
            ``reinit_non_persistent_buffers(model)`` for the buffers not in a state dict -- MaxViT's relative-
            position indices --, and load weights); weights from ``pretrained`` are loaded onto it.
        dtype: a floating-point dtype for the parameters and floating buffers (timm's ``dtype=``), applied
            after the weights are loaded (e.g. ``torch.bfloat16``).
        **overrides: constructor arguments (e.g. ``num_classes=10``, ``img_size=32``). When loading
            weights whose classifier has a different number of classes, the head is re-initialised
            and a message says so.
    """
    tag_args: dict[str, Any] = {}
    tagged_cfg: Optional[dict[str, Any]] = None
    if isinstance(name, str) and "." in name and name not in _REGISTRY:
        # timm's tagged name: the architecture built as that tag's weights need it (timm's pretrained cfg for the
        # tag), and with pretrained=True that tag's weights from the local cache
        base, tag = split_model_tag(name)
        tagged_cfg = _timm_tag_cfg(base, tag, required=pretrained is not True)
        if pretrained is True:
            pretrained = f"timm/{base}.{tag}"
        name = base
    entry = get_model_entry(name)
    if tagged_cfg is not None:
        entry, tag_args = _tagged_entry(entry, tagged_cfg)
    if out_indices is not None and not features_only:
        raise ValueError("out_indices selects feature maps: pass features_only=True with it")
    backbone_args = sorted(set(overrides) & {"feature_cls", "feature_cfg", "norm"})
    if features_only and backbone_args:
        raise TypeError(
            f"{name}: create_model(features_only=True) takes out_indices only, not {', '.join(backbone_args)}: the zoo "
            f"has one backbone class (timm's feature_cls 'getter' / 'hook' / 'fx' choose among several). For the "
            f"final norm on the maps (timm's FeatureGetterNet norm=True) build it yourself: "
            f"zoo.features.FeatureExtractor(zoo.create_model({name!r}, ...), out_indices, norm=True)")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    try:
        build_device = None if device is None else torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be a torch device or its name (e.g. 'cuda', 'meta'), got {device!r}") from error
    loading = not (pretrained is False or pretrained is None)
    if loading and build_device is not None and build_device.type == "meta":
        raise ValueError(f"device='meta' {META_DEVICE_ADVICE}")
    with build_device if build_device is not None else contextlib.nullcontext():
        if not loading:
            model = _construct(entry, {**tag_args, **overrides})
        else:
            from zoo import hub

            model = hub.load_pretrained_into(entry, pretrained, overrides, defaults=tag_args)
    if dtype is not None:
        model = model.to(dtype=dtype)  # (a dtype change keeps the loaded weights' versions: still "as loaded")
    if features_only:
        from zoo.features import FeatureExtractor

        return FeatureExtractor(model, out_indices)
    return model


# The fields of timm's pretrained cfg for a tag that the zoo's model carries in its own ``pretrained_cfg``: the
# tag's head size and test-time preprocessing (what timm.data.resolve_model_data_config reads).
_TAG_CFG_KEYS = ("input_size", "num_classes", "mean", "std", "interpolation", "crop_pct", "crop_mode")


def _timm_tag_cfg(base: str, tag: str, required: bool) -> Optional[dict[str, Any]]:
    """timm's pretrained cfg of the tagged name ``base.tag`` (``timm.models.get_pretrained_cfg``: timm's own
    table, nothing is downloaded) as a dict. A tag timm does not know for ``base`` raises when ``required`` (the
    model is built from it); otherwise (weights from the Hub repository ``timm/base.tag``, whose config.json
    describes them) it is None."""
    try:
        from timm.models import get_pretrained_cfg, list_pretrained
    except ImportError:  # timm absent: no table to read the tag from
        cfg, known = None, []
    else:
        try:
            cfg = get_pretrained_cfg(f"{base}.{tag}")
        except RuntimeError:  # timm knows the architecture but not this tag
            cfg = None
        known = [n.partition(".")[2] for n in list_pretrained(f"{base}.*")]
    if cfg is not None:
        return cfg.to_dict()
    if not required:
        return None
    raise ValueError(
        f"{base}.{tag}: timm has no pretrained tag {tag!r} for {base!r} (its tags: {', '.join(known) or 'none'}); "
        f"use one of them, or the untagged name {base!r}"
    )


def _tagged_entry(entry: ModelEntry, tag_cfg: dict[str, Any]) -> tuple[ModelEntry, dict[str, Any]]:
    """``entry`` as built for a timm tag: its ``default_cfg`` with the tag's class count and preprocessing
    (``_TAG_CFG_KEYS``), and the constructor arguments the tag sets unless the caller gives them. These follow
    timm's ``_update_default_model_kwargs`` (timm/models/_builder.py): ``num_classes`` (0 for the head-less
    .dino / .mae towers, 21843 for .augreg_in21k, 512 for CLIP's projection), ``in_chans`` from ``input_size``,
    and ``img_size`` too when the tag has a fixed input size."""
    default_cfg = dict(entry.default_cfg)
    default_cfg.update({k: tag_cfg[k] for k in _TAG_CFG_KEYS if tag_cfg.get(k) is not None})
    if isinstance(tag_cfg.get("tag"), str):  # which of timm's pretrained configurations the model was built for
        default_cfg["tag"] = tag_cfg["tag"]
    args: dict[str, Any] = {}
    if isinstance(tag_cfg.get("num_classes"), int) and tag_cfg["num_classes"] >= 0:
        args["num_classes"] = tag_cfg["num_classes"]
    input_size = tag_cfg.get("input_size")
    if input_size is not None and len(input_size) == 3:
        args["in_chans"] = int(input_size[0])
        if tag_cfg.get("fixed_input_size"):
            height, width = (int(v) for v in input_size[1:])
            args["img_size"] = height if height == width else [height, width]
    if tag_cfg.get("global_pool") is not None:
        args["global_pool"] = tag_cfg["global_pool"]
    signature = inspect.signature(entry.constructor)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        args = {k: v for k, v in args.items() if k in signature.parameters}
    return replace(entry, default_cfg=default_cfg), args


def note_model_args(model: nn.Module, **changes: Any) -> None:
    """Record a change made to a built model (``reset_classifier``, ``set_input_size``) in the constructor
    arguments that :func:`zoo.save_pretrained` writes to config.json, so that loading the saved directory
    rebuilds the changed model: without it a reset head would be saved with the old class count in the
    config, and loading would re-initialise it. The model's ``pretrained_cfg`` (input size, class count)
    follows. Models not built by :func:`create_model` are left alone."""
    args = getattr(model, "zoo_model_args", None)
    if isinstance(args, dict):
        args.update(changes)
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:
        cfg.update(image_data_config(cfg, changes))


# The *_digits models' preprocessing: trained on images resized bilinearly to the model's size with no crop
# (zoo.tasks.vision.data), which their pretrained_cfg states, so timm's create_transform(**data_config) and
# zoo predict on a checkpoint without a zoo train record preprocess as training did.
DIGITS_PREPROCESSING = {"crop_pct": 1.0, "interpolation": "bilinear"}


def image_data_config(default_cfg: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
    """timm's data config (``pretrained_cfg``: input_size, mean, std, interpolation, crop_pct, ...) of an image
    model built with constructor arguments ``args``: the registry's ``default_cfg`` with ``input_size`` and
    ``num_classes`` following ``in_chans`` / ``img_size`` / ``num_classes`` when they are given."""
    cfg = dict(default_cfg)
    chans, height, width = cfg["input_size"]
    if args.get("in_chans") is not None:
        chans = int(args["in_chans"])
        for key in ("mean", "std"):  # one value per channel, as timm's adapt_input_conv adapts the stem weights
            values = cfg.get(key)
            if isinstance(values, (tuple, list)) and values and len(values) != chans:
                cfg[key] = (sum(values) / len(values),) if chans == 1 else tuple(values[i % len(values)] for i in range(chans))
    if args.get("img_size") is not None:
        height, width = to_pair(args["img_size"], "img_size")
    cfg["input_size"] = (chans, height, width)
    if args.get("num_classes") is not None:
        cfg["num_classes"] = int(args["num_classes"])
    return cfg


def _construct(entry: ModelEntry, overrides: dict[str, Any]) -> nn.Module:
    signature = inspect.signature(entry.constructor)
    accepts_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    if not accepts_var_kw:
        unknown = sorted(set(overrides) - set(signature.parameters))
        if unknown:
            raise TypeError(
                f"{entry.name}: unknown argument(s) {unknown}; accepted: {sorted(signature.parameters)}"
            )
    try:
        model = entry.constructor(**overrides)
    except TypeError as error:  # a **kwargs constructor passed an unknown name on to its class
        match = re.search(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", str(error))
        if match is None or match.group(2) not in overrides:
            raise
        cls = getattr(sys.modules.get(entry.constructor.__module__), match.group(1), None)
        accepted = sorted(n for n in inspect.signature(cls.__init__).parameters if n != "self") if cls else []
        close = difflib.get_close_matches(match.group(2), accepted, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TypeError(f"{entry.name}: unknown argument {match.group(2)!r}{hint}; {match.group(1)} accepts: "
                        f"{', '.join(accepted)}") from None
    # Remember how the model was built so save_pretrained can write config.json.
    model.zoo_model_name = entry.name  # type: ignore[attr-defined]
    model.zoo_model_args = dict(overrides)  # type: ignore[attr-defined]
    if "input_size" in entry.default_cfg:
        # Image models carry timm's data config as timm's own do, so timm.data.resolve_model_data_config /
        # create_transform build the right preprocessing for them (size, mean/std, interpolation, crop). It names
        # the architecture as timm's does (timm/models/_builder.py: pretrained_cfg["architecture"]), which timm's
        # save_for_hf / push_to_hub write as config.json's "architecture" (timm/models/_hub.py save_config_for_hf).
        model.pretrained_cfg = {"architecture": entry.name,  # type: ignore[attr-defined]
                                **image_data_config(entry.default_cfg, overrides)}
        model.default_cfg = model.pretrained_cfg  # timm's older name for the same dict  # type: ignore[attr-defined]
        # timm's record of the constructor arguments (timm/models/_input.py get_model_args reads model._model_args),
        # which save_for_hf writes as config.json's "model_args": the same dict as zoo_model_args, so the changes
        # note_model_args records (reset_classifier, set_input_size) reach timm's export too.
        model._model_args = model.zoo_model_args  # type: ignore[attr-defined]
    return model
