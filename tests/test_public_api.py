"""Frozen public names (DESIGN.md principle 5): registered models, ``zoo.__all__``, ``zoo.attention.__all__``
and the top-level keys of the ``zoo train`` config, checked against tests/public_names.txt.

A name may only disappear through the deprecation map ``zoo.registry.DEPRECATED_MODEL_NAMES`` (old -> new,
create_model warns and forwards). New names must be added to the file, deliberately:

    .venv/bin/python -m tests.test_public_api --update      # regenerate tests/public_names.txt
    .venv/bin/python tests/test_public_api.py --update      # same
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

NAMES_FILE = Path(__file__).with_name("public_names.txt")
UPDATE_HINT = "if intended, regenerate the list: .venv/bin/python -m tests.test_public_api --update"


def current_names() -> dict[str, list[str]]:
    """The public names as they are now, per section."""
    import zoo
    import zoo.attention
    from zoo.registry import get_model_entry
    from zoo.train import run

    models = [n for n in zoo.list_models() if get_model_entry(n).module.startswith("zoo.")]  # not test-registered
    return {
        "models": sorted(models),
        "zoo.__all__": sorted(zoo.__all__),
        "zoo.attention.__all__": sorted(zoo.attention.__all__),
        "train config keys": sorted(run.compose([]).keys()),
    }


def read_names(path: Path = NAMES_FILE) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = None
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections[current] = []
        elif current is None:
            raise ValueError(f"{path}: name {line!r} before any [section]")
        else:
            sections[current].append(line)
    return sections


def write_names(path: Path = NAMES_FILE) -> dict[str, list[str]]:
    names = current_names()
    lines = ["# Frozen public names; tests/test_public_api.py checks them. Regenerate with:",
             "#   .venv/bin/python -m tests.test_public_api --update",
             "# Renamed models go through zoo.registry.DEPRECATED_MODEL_NAMES (old -> new)."]
    for section, values in names.items():
        lines += ["", f"[{section}]", *values]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return names


def _diff(section: str, frozen: list[str], now: list[str], deprecated: dict[str, str]) -> list[str]:
    problems = []
    removed = [n for n in frozen if n not in now and not (section == "models" and n in deprecated)]
    added = [n for n in now if n not in frozen]
    if removed:
        problems.append(f"[{section}] removed without a deprecation entry: {removed}")
    if added:
        problems.append(f"[{section}] new names not in {NAMES_FILE.name}: {added}")
    return problems


def test_public_names_are_frozen():
    from zoo.registry import DEPRECATED_MODEL_NAMES

    frozen = read_names()
    now = current_names()
    assert set(frozen) == set(now), f"sections differ: {sorted(frozen)} vs {sorted(now)}; {UPDATE_HINT}"
    problems = [p for section in now for p in _diff(section, frozen[section], now[section], DEPRECATED_MODEL_NAMES)]
    assert not problems, "\n".join(problems + [UPDATE_HINT])


def test_deprecated_names_forward_to_registered_models():
    import zoo
    from zoo.registry import DEPRECATED_MODEL_NAMES

    for old, new in DEPRECATED_MODEL_NAMES.items():
        assert zoo.is_model(new) and new in zoo.list_models(), f"{old} -> {new}: target is not registered"
        assert old not in zoo.list_models(), f"{old} is deprecated but still registered"


def test_deprecation_map_mechanism(monkeypatch):
    """A frozen name that was renamed passes the freeze check and create_model forwards it with a warning."""
    import pytest

    import zoo
    from zoo import registry

    monkeypatch.setitem(registry.DEPRECATED_MODEL_NAMES, "vit_digits_v0", "vit_digits")
    frozen = {"models": ["vit_digits", "vit_digits_v0"]}
    assert _diff("models", frozen["models"], ["vit_digits"], registry.DEPRECATED_MODEL_NAMES) == []
    assert _diff("models", frozen["models"], ["vit_digits"], {}) != []
    with pytest.warns(FutureWarning, match="'vit_digits_v0' is deprecated; use 'vit_digits'"):
        model = zoo.create_model("vit_digits_v0", embed_dim=16, depth=1, num_heads=2)
    assert model.zoo_model_name == "vit_digits"


def test_names_file_round_trip(tmp_path):
    names = write_names(tmp_path / "names.txt")
    assert read_names(tmp_path / "names.txt") == names


if __name__ == "__main__":
    if "--update" in sys.argv[1:]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            written = write_names()
        print(f"wrote {NAMES_FILE}: " + ", ".join(f"{len(v)} {k}" for k, v in written.items()))
    else:
        print(__doc__)


def test_list_models_and_tagged_names_as_timm():
    """timm.list_models('') lists everything and takes exclude_filters; is_model / create_model take timm's tagged
    names (the tag names pretrained weights; the architecture is the same). All three differed (audit 2026-12-06)."""
    import pytest
    import timm

    import zoo

    assert zoo.list_models("") == zoo.list_models() == zoo.list_models("*")
    kept = zoo.list_models("vit_*", exclude_filters=["*clip*", "*siglip*"])
    assert kept and not any("clip" in n or "siglip" in n for n in kept)
    assert set(kept) == set(zoo.list_models("vit_*")) - set(zoo.list_models(["*clip*", "*siglip*"]))
    assert set(kept) <= set(timm.list_models("vit_*", exclude_filters=["*clip*", "*siglip*"])) | set(
        zoo.list_models("vit_d*"))  # the zoo's own debug / digits names besides timm's
    tagged = "vit_tiny_patch16_224.augreg_in21k"
    assert zoo.is_model(tagged) and timm.is_model(tagged) and not zoo.is_model("vit_nothing.augreg_in21k")
    assert zoo.create_model(tagged, depth=1).zoo_model_name == "vit_tiny_patch16_224"
    assert zoo.get_model_entry(tagged).name == "vit_tiny_patch16_224"  # agrees with is_model (the CLI asks both)
    with pytest.raises(FileNotFoundError, match=r"timm/vit_tiny_patch16_224\.augreg_in21k: .* not in the local Hugging Face cache"):
        zoo.create_model(tagged, pretrained=True, depth=1)  # that tag's weights, never downloaded


def test_lazy_names_are_listed_and_kept_after_first_use():
    """dir(zoo) lacked save_pretrained / from_pretrained and dir(zoo.attention) all its lazily imported names (no
    tab completion); every access went through the module's __getattr__ again."""
    import zoo
    import zoo.attention as za

    assert {"save_pretrained", "from_pretrained", "load_state_dict_file"} <= set(dir(zoo))
    assert set(za.__all__) <= set(dir(za))
    mha = za.MultiHeadAttention
    assert vars(za)["MultiHeadAttention"] is mha  # stored after the first access
    assert "blocksparse" in za.list_backends() and za.list_backends()[-1] == "torch"


def test_every_registered_constructor_documents_its_arguments():
    """help(zoo.get_model_entry(name).constructor) showed only **kwargs (the 21 maxvit_* constructors had no
    docstring at all): each now lists the keyword arguments its model class takes."""
    import inspect

    import zoo

    for name in zoo.list_models("*"):
        constructor = zoo.get_model_entry(name).constructor
        doc = constructor.__doc__ or ""
        assert f"{name}(**kwargs) -> " in doc and "keyword arguments override this configuration" in doc, name
    doc = zoo.get_model_entry("maxvit_tiny_tf_224").constructor.__doc__
    from zoo.tasks.vision.maxvit import MaxVit

    assert all(p in doc for p in inspect.signature(MaxVit).parameters if p not in ("self",))
