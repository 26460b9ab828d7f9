"""Released weights: ``model.safetensors`` + ``config.json`` (save, load, fine-tune with a new head).

A released model is a directory::

    <dir>/model.safetensors   the state dict (safetensors: tensors only, loading never runs code)
    <dir>/config.json         {"model_name": ..., "model_args": {...}, "zoo_version": ..., "metadata": {...}}

``model_name``/``model_args`` are what :func:`zoo.create_model` recorded on the model
(``model.zoo_model_name`` / ``model.zoo_model_args``), so :func:`from_pretrained` rebuilds the exact
architecture before loading the weights. ``metadata`` is free-form JSON (class names, preprocessing, the
metrics measured when it was written, ...).

Loading rules (:func:`load_pretrained_into`, used by ``create_model(name, pretrained=...)``):

* ``pretrained=True`` loads the checkpoint this project ships for ``name`` (``checkpoints/<dir>/`` whose
  config.json names the model, in the source tree or installed as package data ``zoo/checkpoints``; or under
  the directory named by the ``ZOO_CHECKPOINTS`` environment variable).
* ``pretrained=<dir or .safetensors>`` loads that; the checkpoint's recorded constructor arguments are used
  unless overridden (``create_model("vit_digits", pretrained=dir, num_classes=3)``). Changes made after
  construction (``reset_classifier``, ``set_input_size``) are recorded there too (zoo.registry.note_model_args);
  a directory whose config.json ``num_classes`` disagrees with its arguments (saved before that) is built with
  the saved count, so its trained head loads.
* The family's ``checkpoint_filter_fn(state_dict, model)`` (timm's convention, in the model file) adapts the
  weights first: timm layouts, position embeddings / relative-position tables resized when the model is
  built at another image size (fine-tuning at a new resolution).
* A classifier whose shape differs from the checkpoint's (another class count) is re-initialised and a
  message is logged; the model names its classifier keys via ``pretrained_head_keys()`` (the zoo's vision
  models), else ``default_cfg["classifier"]`` (timm style), else keys under ``head.``.
* Any other missing / unexpected / mis-shaped key is an error naming the file and the keys. A file that is
  not valid safetensors is an error naming the file.

timm's Hugging Face Hub layout loads too (``from_pretrained`` or ``pretrained=``): a config.json naming the
model under ``architecture`` (as timm's ``save_for_hf`` writes it, older single-dict layouts included) is read
as timm reads it (:func:`_from_timm_config`), the weights are model.safetensors or pytorch_model.bin, and a
Hugging Face cache folder (``models--timm--<name>``) resolves to the snapshot ``refs/main`` names.

User conversions from other code bases: :func:`load_state_dict_file` also reads ``.pth``/``.pt``/``.bin``/
``.ckpt`` with ``torch.load(weights_only=True)`` (tensors and plain containers only, never arbitrary
pickled objects; the ``argparse.Namespace`` timm's train.py stores is allowed, as timm's loader does, and the yacs
``CfgNode`` of official Agent-Attention / Swin checkpoints is read as an inert OrderedDict) and unwraps the usual
containers (``{"state_dict": ...}``, ``{"model": ...}``, DDP's ``module.`` prefix; timm train.py's EMA copy beside
``'state_dict'``, but ``'model'`` beside an EMA copy, as the official code evaluates; ``ema=`` chooses; from a
``zoo train`` ``.ckpt`` the EMA weights when present, else ``model.*``). docs/timm.md, "Checkpoints of other
training code", gives the route for other files.
"""
from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn

from zoo.registry import META_DEVICE_ADVICE, UnknownModelError

__all__ = [
    "WEIGHTS_NAME",
    "CONFIG_NAME",
    "CheckpointError",
    "save_pretrained",
    "from_pretrained",
    "load_state_dict_file",
    "load_pretrained_into",
    "load_weights",
    "adapt_input_conv",
    "read_config",
    "shipped_checkpoints_dir",
    "list_shipped",
    "shipped_checkpoint",
    "head_keys",
    "hf_cache_dir",
    "timm_hub_id",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "zoo-pretrained/1"
SAVE_ID = "zoo_save_id"  # safetensors header key; config.json holds the same value as "save_id"
PARKED_CONFIG = ".config.json.replaced"  # the old config.json while save_pretrained swaps a directory's files

log = logging.getLogger("zoo.hub")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model (names the file and the keys)."""


class _UnknownSavedModel(CheckpointError, UnknownModelError):
    """A config.json naming a model that is not registered: a CheckpointError (it names the file), and still the
    registry's UnknownModelError (a KeyError), which callers caught before it named the file."""


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def _finish_file(path: Path) -> None:
    """A file just written: fsynced, with the usual permissions (mkstemp / mkdtemp create 0600 / 0700)."""
    _fsync_file(path)
    os.chmod(path, 0o666 & ~_umask())


def _staged_file(directory: Path, name: str, write) -> Path:
    """``write(tmp)`` into a uniquely named temporary file in ``directory`` (concurrent writers never share
    one), finished (fsync, permissions); the file is removed if writing fails."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        _finish_file(Path(tmp))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return Path(tmp)


def writable_output(path: str | os.PathLike, what: str = "out") -> Path:
    """``path`` as an output file whose folder exists (created) and can be written, checked before any work: an
    unwritable place failed at the end of a long export, naming a temporary file beside it (/proc/.x.onnx.tmp) or
    a file in the way of a folder. A ValueError naming the path given otherwise."""
    path = Path(path).expanduser()
    folder = path.parent
    blocker = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ValueError(f"{what}={str(path)!r}: {blocker} is a file, so no folder can be made there")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{what}={str(path)!r}: cannot create its folder {folder} ({error.strerror})") from None
    try:  # a real write: os.access says yes to root on read-only or special file systems (/proc, /sys)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".check"):
            pass
    except OSError as error:
        raise ValueError(f"{what}={str(path)!r}: cannot write in {folder} ({error.strerror})") from None
    return path


def atomic_write(path: Path, write) -> None:
    """Write ``path`` through a staged temporary file beside it and ``os.replace`` (atomic on POSIX): readers
    see the old file or the whole new one (zoo export's ONNX files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _staged_file(path.parent, path.name, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _jsonable(value: Any, where: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as error:
        raise TypeError(f"{where} must be JSON-serialisable: {error}") from None


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` as ``<directory>/model.safetensors`` + ``config.json``; returns the directory.

    Args:
        model: a model built by :func:`zoo.create_model` (it carries ``zoo_model_name``/``zoo_model_args``).
        metadata: extra JSON facts stored in config.json (e.g. ``{"num_classes": 10, "test_acc1": 0.99}``). The
            model's preprocessing is added where not given (mean / std under "data", crop and interpolation
            under "pretrained_cfg"). None: a model loaded from a checkpoint keeps the metadata it was loaded
            with (class names, the zoo train record that zoo predict preprocesses by, the source), less the
            class names when its head has another class count now; weights changed since loading (a
            parameter's version counter moved) keep only the preprocessing.
        state_dict: weights to write instead of ``model.state_dict()`` (e.g. an EMA copy with the same keys).
    """
    from zoo.features import FeatureExtractor

    # torch.compile's OptimizedModule / DDP's wrapper: the model inside (its state_dict keys carry no prefix)
    while isinstance(getattr(model, "_orig_mod", None), nn.Module) or isinstance(
            model, nn.parallel.DistributedDataParallel):
        model = model._orig_mod if isinstance(getattr(model, "_orig_mod", None), nn.Module) else model.module
    if isinstance(model, FeatureExtractor):
        raise ValueError(
            "save_pretrained writes models, not features_only wrappers: save the (pruned) network inside, "
            "zoo.save_pretrained(backbone.model, directory), and wrap it again on loading with "
            "zoo.features.FeatureExtractor(zoo.from_pretrained(directory), out_indices)"
        )
    name = getattr(model, "zoo_model_name", None)
    args = getattr(model, "zoo_model_args", None)
    if not isinstance(name, str) or not isinstance(args, dict):
        raise ValueError(
            f"save_pretrained needs a model built by zoo.create_model (it records zoo_model_name and "
            f"zoo_model_args); got a {type(model).__name__} without them"
        )
    from safetensors.torch import save_file

    if not isinstance(directory, (str, os.PathLike)) or not str(directory):
        raise TypeError(f"save_pretrained: directory must be a path, got {directory!r}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"save_pretrained: {directory} is a file; pass a directory (it holds "
                              f"{WEIGHTS_NAME} and {CONFIG_NAME})")
    for arg, value in (("metadata", metadata), ("state_dict", state_dict)):
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(f"save_pretrained: {arg} must be a mapping (dict), got {type(value).__name__}")
    if state_dict is not None:  # the weights must load back into this model (found at load time otherwise)
        own = model.state_dict()
        unknown = sorted(set(state_dict) - set(own))
        missing = sorted(set(own) - set(state_dict))
        if unknown or missing:
            raise ValueError(f"save_pretrained: state_dict does not fit {name}: unknown keys {_summarise(unknown)}, "
                             f"missing keys {_summarise(missing)}")
        shapes = [f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})" for k, v in state_dict.items()
                  if isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(own[k].shape)]
        if shapes:
            raise ValueError(f"save_pretrained: state_dict does not fit {name}: other shapes {_summarise(shapes)}")
    if metadata is None:
        metadata = _loaded_metadata(model)
    state = dict(model.state_dict() if state_dict is None else state_dict)
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] is a {type(tensor).__name__}, not a tensor")
    on_meta = [key for key, tensor in state.items() if tensor.is_meta]
    if on_meta:
        raise ValueError(f"save_pretrained: {name} has weights on the meta device, which hold no values "
                         f"({_summarise(on_meta, 6)}): a model built on meta (device='meta' or a torch.device('meta') "
                         f"block) needs model.to_empty(device=...) and its weights loaded before it can be saved")
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, tensor in state.items():
        tensor = tensor.detach().cpu()
        # safetensors refuses tensors that share memory (tied weights, views of one buffer, overlapping or not):
        # every tensor after the first one on a storage is stored as its own copy
        storage = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        if storage is not None and storage in storages:
            tensor = tensor.clone()
        elif storage is not None:
            storages.add(storage)
        tensors[key] = tensor.contiguous()
    from zoo import __version__

    config = {
        "format": FORMAT,
        "model_name": name,
        "model_args": _jsonable(args, f"{name}'s constructor arguments (zoo_model_args)"),
        "zoo_version": __version__,
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
    }
    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int):
        config["num_classes"] = num_classes
    config["metadata"] = _jsonable(_with_data_config(model, dict(metadata or {})), "metadata")
    data = config["metadata"].get("data")
    cfg = getattr(model, "pretrained_cfg", None)
    channels = (cfg.get("input_size") or (None,))[0] if isinstance(cfg, dict) else None
    problem = _data_record_problem(data if isinstance(data, Mapping) else None, channels, config.get("num_classes"))
    if problem:
        raise ValueError(f"save_pretrained: {problem}")
    # one id in both files: a config.json beside weights from another save (an interrupted re-save) is refused
    import uuid

    config["save_id"] = save_id = uuid.uuid4().hex
    try:
        text = json.dumps(config, indent=2, sort_keys=False, allow_nan=False) + "\n"
    except ValueError:
        raise ValueError("save_pretrained: metadata holds NaN or Inf, which JSON cannot store; give them as strings "
                         "or None") from None

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    _write_pair(directory, {WEIGHTS_NAME: lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", SAVE_ID: save_id}),
                            CONFIG_NAME: write_json})
    return directory


def _write_pair(directory: Path, writers: dict[str, Any]) -> None:
    """Write the files of a checkpoint so that it is never half replaced: into a fresh directory, a new
    ``directory`` appears by one rename; an existing one gets every file staged (written and fsynced) first,
    then swapped in with config.json absent meanwhile: the old config.json is parked under a hidden name, the
    weights and then the new config.json are renamed into place, and the parked file is removed. A crash while
    staging leaves the old checkpoint whole; a crash during the swap leaves no config.json, which the loader
    refuses naming the interrupted save (the old config.json is kept beside it), never a mixed pair. Both
    files also carry one save id (config.json's ``save_id``, the safetensors header's ``zoo_save_id``), and a
    pair whose ids differ is refused."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    if not directory.exists():
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
        try:
            for name, write in writers.items():
                write(str(staging / name))
                _finish_file(staging / name)
            os.chmod(staging, 0o777 & ~_umask())
            try:
                os.rename(staging, directory)
                _fsync_dir(directory.parent)
                return
            except OSError:
                if not directory.is_dir():
                    raise
                # another writer (a second process saving to the same place) created it meanwhile: replace
                # its files the way an existing directory's are replaced, below
        finally:
            if staging.exists():
                import shutil

                shutil.rmtree(staging, ignore_errors=True)
    staged: list[tuple[str, Path]] = []
    try:
        for name, write in writers.items():
            staged.append((name, _staged_file(directory, name, write)))
        parked = directory / PARKED_CONFIG
        if (directory / CONFIG_NAME).exists():
            os.replace(directory / CONFIG_NAME, parked)
        for name, tmp in sorted(staged, key=lambda item: item[0] == CONFIG_NAME):  # weights first, config last
            os.replace(tmp, directory / name)
        _fsync_dir(directory)
        if parked.exists():
            parked.unlink()
    except BaseException:
        for _, tmp in staged:
            if tmp.exists():
                tmp.unlink()
        raise


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _parameter_versions(model: nn.Module) -> tuple:
    """Each parameter's identity and version counter: an optimizer step, load_state_dict or an EMA update
    changes one; moving the model (.to(), .cuda(), another dtype) does not."""
    return tuple((id(p), p._version) for p in model.parameters())


def remember_loaded_metadata(model: nn.Module, metadata: Optional[Mapping[str, Any]]) -> None:
    """Record on a model loaded from a checkpoint what its config.json says (``zoo_pretrained_metadata``), and
    its weights' versions as loaded, for save_pretrained to tell a re-save from a save after training."""
    model.zoo_pretrained_metadata = dict(metadata or {})  # type: ignore[attr-defined]
    model._zoo_loaded_versions = _parameter_versions(model)  # type: ignore[attr-defined]


# what describes the input a model takes, true after fine-tuning too; the rest (metrics, the training record,
# class names) describes the weights as they were loaded
_PREPROCESSING_KEYS = ("img_size", "in_chans", "mean", "std")


def _loaded_metadata(model: nn.Module) -> dict[str, Any]:
    """The metadata a model was loaded with, for saving it again. Weights changed since loading (trained,
    fine-tuned) keep only the preprocessing: the checkpoint's metrics, training record and class names would
    describe other weights (a message says so). Class names are also dropped when the head's class count
    changed (reset_classifier)."""
    import copy

    loaded = getattr(model, "zoo_pretrained_metadata", None)
    if not isinstance(loaded, Mapping):
        return {}
    metadata = copy.deepcopy(dict(loaded))
    if getattr(model, "_zoo_loaded_versions", None) != _parameter_versions(model):
        data = metadata.get("data") if isinstance(metadata.get("data"), dict) else {}
        kept = {"data": {k: data[k] for k in _PREPROCESSING_KEYS if k in data}}
        if isinstance(metadata.get("pretrained_cfg"), dict):
            kept["pretrained_cfg"] = metadata["pretrained_cfg"]
        dropped = sorted(set(metadata) - {"data", "pretrained_cfg"}) + (
            ["data.class_names"] if "class_names" in data else [])
        if dropped:
            log.info("save_pretrained: the weights changed since they were loaded, so the checkpoint's %s are not "
                     "copied (pass metadata= to record what describes these weights)", ", ".join(dropped))
        return kept
    data = metadata.get("data")
    num_classes = getattr(model, "num_classes", None)
    if isinstance(data, dict) and isinstance(num_classes, int):
        names = data.get("class_names")
        if (isinstance(names, list) and len(names) != num_classes) or data.get("num_classes", num_classes) != num_classes:
            data.pop("class_names", None)
            data.pop("num_classes", None)
    return metadata


def _with_data_config(model: nn.Module, metadata: dict[str, Any]) -> dict[str, Any]:
    """``metadata`` plus the model's preprocessing where the caller did not give it: mean / std under "data" and
    timm's crop / interpolation under "pretrained_cfg" (what from_pretrained reads back). A model loaded from a
    checkpoint with statistics of its own (a timm export, a run trained with data.mean=...) keeps them when it is
    saved again; it used to come back with the registry's defaults."""
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict):
        return metadata
    data = metadata.get("data")
    if data is None or isinstance(data, Mapping):
        data = dict(data or {})
        for key in ("mean", "std"):
            if key not in data and isinstance(cfg.get(key), (tuple, list)):
                data[key] = [float(v) for v in cfg[key]]
        metadata["data"] = data
    if "pretrained_cfg" not in metadata:
        preprocessing = {key: cfg[key] for key in ("crop_pct", "crop_mode", "interpolation") if key in cfg}
        if preprocessing:
            metadata["pretrained_cfg"] = preprocessing
    return metadata


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
_EMA_ENTRIES = ("state_dict_ema", "model_ema")
_RAW_ENTRIES = ("state_dict", "model", "model_state", "model_state_dict", "module", "net")


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _checkpoint_entry(obj: Mapping, ema: Optional[bool], where: Any, holds=_is_tensor_dict) -> Optional[str]:
    """The top-level entry of a training checkpoint that holds the weights to load (None: not found).

    ``ema=None``: the EMA copy of a timm train.py checkpoint ({'state_dict', 'state_dict_ema'}), as timm's
    load_checkpoint (use_ema=True) takes it; 'model' when it is there, whatever EMA copy sits beside it: the official
    Agent-Attention / Swin / DeiT code saves {'model', 'state_dict_ema'} or {'model', 'model_ema'} (Agent-Attention
    utils_ema.py save_checkpoint_ema_new, DeiT main.py) and evaluates 'model' (utils.py load_checkpoint:
    ``model.load_state_dict(checkpoint['model'])``); an EMA copy alone is read too. ``ema=True``: the EMA copy,
    ``ema=False``: the raw weights, each an error when the file has none. Which one was taken is logged when the
    file has both (a warning where the other one is the official evaluation's)."""
    ema_keys = [key for key in _EMA_ENTRIES if holds(obj.get(key))]
    raw_keys = [key for key in _RAW_ENTRIES if holds(obj.get(key))]
    if ema is None:
        timm_layout = "state_dict" in raw_keys and "state_dict_ema" in ema_keys and "model" not in raw_keys
        chosen = (ema_keys if timm_layout else raw_keys + ema_keys or [None])[0]
    else:
        wanted = ema_keys if ema else raw_keys
        if not wanted:
            kind = f"an EMA copy ({' / '.join(_EMA_ENTRIES)})" if ema else f"raw weights ({' / '.join(_RAW_ENTRIES)})"
            raise CheckpointError(f"{where}: ema={ema} asks for {kind}, which the checkpoint does not hold; its "
                                  f"top-level entries: {sorted(map(str, obj))[:10]}")
        chosen = wanted[0]
    if chosen is not None and ema_keys and raw_keys:
        other = raw_keys[0] if chosen in _EMA_ENTRIES else ema_keys[0]
        if chosen in _EMA_ENTRIES:
            log.info("%s: loading the EMA weights ('%s'), as timm does; the raw weights ('%s'): ema=False",
                     where, chosen, other)
        else:
            log.warning("%s: loading '%s', the weights the official code evaluates; the file also holds the EMA copy "
                        "'%s' (ema=True loads it: zoo.hub.load_state_dict_file(path, ema=True); Agent-DeiT: "
                        "model.load_official_state_dict(checkpoint, use_ema=True))", where, chosen, other)
    return chosen


def _unwrap_state_dict(obj: Any, path: Path, ema: Optional[bool] = None) -> dict[str, torch.Tensor]:
    """The tensor dict inside the usual checkpoint containers (:func:`_checkpoint_entry` picks the entry of a
    training checkpoint: timm's EMA copy beside 'state_dict', 'model' where the official code saved one; ``ema``
    forces the choice); a Lightning ``.ckpt``'s model weights; wrapper prefixes stripped."""
    if isinstance(obj, Mapping) and ema is None and _is_tensor_dict(obj):
        state = dict(obj)
    else:
        key = _checkpoint_entry(obj, ema, path) if isinstance(obj, Mapping) else None
        if key is None:
            raise CheckpointError(
                f"{path}: no state dict found (expected a dict of tensors, or one under 'state_dict'/'model'); "
                f"top-level entries: {sorted(map(str, obj))[:10] if isinstance(obj, Mapping) else type(obj).__name__}"
            )
        state = dict(obj[key])
    if path.suffix == ".ckpt":
        weights = lightning_model_weights(state)
        if weights is not None:
            return weights
    return _strip_wrapper_prefixes(state, ("module.", "model.", "_orig_mod."))


def lightning_model_weights(state: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The model's weights in the ``state_dict`` of a zoo LightningModule (``zoo train``'s .ckpt): the EMA average
    (``model_ema.module.*``) when the run kept one -- what it evaluates and releases --, else the raw weights
    (``model.*``), without the prefix; None when neither prefix is there. Other entries (loss modules) are left."""
    for prefix in ("model_ema.module.", "model."):
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return None


def _strip_wrapper_prefixes(state: dict, prefixes=("module.", "_orig_mod.")) -> dict:
    """The keys without the prefixes wrappers add to every key (DDP's ``module.``, torch.compile's ``_orig_mod.``,
    Lightning's ``model.``), in any order and nesting, as timm's clean_state_dict does."""
    stripped = True
    while stripped and state:
        stripped = False
        for prefix in prefixes:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    return state


class _InertConfig:
    """What a pickled training-config object (``yacs.config.CfgNode``) becomes when a checkpoint is read: a plain
    ``collections.OrderedDict`` of its entries, its attributes in the OrderedDict's ``__dict__``. Nothing of the
    config's class is imported or run: the class is only a name in the file, mapped here through
    ``torch.serialization.safe_globals([(_InertConfig, name)])``, and torch's weights-only unpickler fills the
    OrderedDict (it allows SETITEMS / BUILD on that type only, not on a dict subclass)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        import collections

        return collections.OrderedDict()


# Config classes that training scripts pickle beside the weights and that are read as inert OrderedDicts (see
# _InertConfig): yacs's CfgNode, a dict subclass holding plain values, stored as 'config' by every checkpoint of
# the official Agent-Attention / Swin Transformer main.py (utils.py save_checkpoint).
_INERT_CONFIG_GLOBALS = ("yacs.config.CfgNode",)


def _unsafe_globals(path: Path) -> Optional[list[str]]:
    """The globals of a torch.save file that weights-only loading does not allow (None if that cannot be read)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - a corrupt or legacy file: the caller reports the load's own error
        return None


def _torch_load(path: Path, **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, also allowing ``argparse.Namespace``: timm's train.py
    stores its arguments as one in every checkpoint (timm/utils/checkpoint_saver.py ``save_state['args']``), and
    timm's own loader allows it the same way (timm/models/_helpers.py ``_torch_load``: ``weights_only=True`` inside
    ``torch.serialization.safe_globals([argparse.Namespace])``). A file whose only other pickled class is a config
    named in ``_INERT_CONFIG_GLOBALS`` (the official Agent-Attention / Swin checkpoints' yacs CfgNode) is read again
    with that name mapped to an inert OrderedDict (:class:`_InertConfig`). The allowances are scoped to this load;
    nothing else is unpickled, and weights_only is never turned off."""
    import argparse
    import pickle

    allowed: list[Any] = [argparse.Namespace]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError:
        unsafe = _unsafe_globals(path)
        if not unsafe or not set(unsafe) <= set(_INERT_CONFIG_GLOBALS):
            raise
    with torch.serialization.safe_globals(allowed + [(_InertConfig, name) for name in unsafe]):
        obj = torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    log.info("%s: read its pickled %s as plain dicts (never imported)", path, ", ".join(sorted(set(unsafe))))
    return obj


_UNTRUSTED_FILE_ROUTE = (
    "if you trust the file, read it with torch.load(path, weights_only=False) and load the weights yourself "
    "(model.load_state_dict(zoo.hub.unwrap_state_dict(checkpoint)); Agent-DeiT: "
    "model.load_official_state_dict(checkpoint)), or save them once as .safetensors: see docs/timm.md, "
    "'Checkpoints of other training code'"
)


def load_state_dict_file(path: str | os.PathLike, *, ema: Optional[bool] = None) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` (or ``.pth``/``.pt``/``.bin``/``.ckpt`` with weights_only).

    ``ema``: which entry of a training checkpoint that holds raw and EMA weights (None: timm train.py's EMA copy,
    the official Agent-Attention / DeiT 'model'; True: the EMA copy; False: the raw weights)."""
    path = Path(path)
    if path.is_dir():
        if (path / WEIGHTS_NAME).is_dir():
            raise FileNotFoundError(f"{path / WEIGHTS_NAME} is a directory, not the weights file")
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:  # a compiled or DDP-wrapped model's own state_dict (torch.compile adds _orig_mod. to every key)
            return _strip_wrapper_prefixes(load_file(str(path)))
        except Exception as error:  # SafetensorError, OSError, ... : say which file
            raise CheckpointError(f"{path} is not a readable safetensors file ({type(error).__name__}: {error})") from None
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt") or path.name.endswith(".pth.tar"):  # timm: model_best.pth.tar
        try:
            obj = _torch_load(path)
        except Exception as error:
            unsafe = _unsafe_globals(path)
            if unsafe:  # a readable file that pickles classes: name them and the route for a trusted file
                raise CheckpointError(
                    f"{path} could not be read with torch.load(weights_only=True): it pickles {', '.join(unsafe)}, "
                    f"which this loader never imports or runs (it reads tensors, plain containers, "
                    f"argparse.Namespace and the yacs CfgNode of official training checkpoints); {_UNTRUSTED_FILE_ROUTE}"
                ) from None
            raise CheckpointError(
                f"{path} could not be read with torch.load(weights_only=True): it is truncated or corrupt, or it "
                f"pickles objects other than tensors, plain containers and argparse.Namespace, which this loader "
                f"never executes ({type(error).__name__}: {error}); {_UNTRUSTED_FILE_ROUTE}"
            ) from None
        return _unwrap_state_dict(obj, path, ema)
    raise CheckpointError(f"{path}: unknown checkpoint format {path.suffix!r} (use .safetensors, .pth, .pth.tar, .pt, .bin or .ckpt)")


def read_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """config.json of a released directory (or of the directory holding a .safetensors file); None if absent."""
    path = Path(path)
    config_path = path / CONFIG_NAME if path.is_dir() else path.with_name(CONFIG_NAME)
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {error}") from None
    if isinstance(config, dict) and "model_name" not in config and "architecture" in config:
        config = _from_timm_config(config, config_path)
    if not isinstance(config, dict) or not isinstance(config.get("model_name"), str):
        raise CheckpointError(f"{config_path} has no 'model_name'; was it written by zoo.save_pretrained (or by "
                              f"timm, whose config.json names the model under 'architecture')?")
    for key in ("model_args", "metadata"):
        if key in config and not isinstance(config[key], dict) and not (key == "metadata" and config[key] is None):
            found = "null" if config[key] is None else repr(config[key])
            raise CheckpointError(f"{config_path}: {key!r} must be an object ({{}} for none), got {found}")
    data = (config.get("metadata") or {}).get("data")
    if data is not None and not isinstance(data, dict):
        raise CheckpointError(f"{config_path}: 'metadata.data' must be an object, got {data!r}")
    problem = _data_record_problem(data, None, config.get("num_classes"))
    if problem:
        raise CheckpointError(f"{config_path}: {problem}")
    return config


def _data_record_problem(data: Optional[Mapping[str, Any]], channels: Optional[int],
                        num_classes: Optional[int]) -> Optional[str]:
    """What is wrong with a checkpoint's preprocessing record ``metadata.data`` (None when nothing is): mean / std
    lists of numbers, one per input channel (``channels`` when known), std > 0; class_names, when given, one per
    class. Checked when config.json is read and before save_pretrained writes one, so a save is never refused
    by its own loader (mean of 3 values for a 1-channel model), and a std of 0 (NaN inputs at predict time) or
    2 class names for 10 classes (zoo predict mixed them with bare indices) never reach a user."""
    data = data or {}
    for key in ("mean", "std"):
        values = data.get(key)
        if values is None:
            continue
        if not isinstance(values, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            return f"'metadata.data.{key}' must be a list of numbers (finite), got {values!r}"
        if key == "std" and not all(v > 0 for v in values):
            return f"'metadata.data.std' must be positive (inputs are divided by it), got {list(values)}"
        if channels is not None and values and len(values) != channels:
            return f"'metadata.data.{key}' has {len(values)} values for a model of {channels} input channels"
    names = data.get("class_names")
    if names is not None:
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            return f"'metadata.data.class_names' must be a list of strings, got {names!r}"
        if isinstance(num_classes, int) and num_classes > 0 and len(names) != num_classes:
            return (f"'metadata.data.class_names' has {len(names)} names for {num_classes} classes (zoo predict would "
                    f"label the rest by index): give one name per class")
    return None


def _from_timm_config(hf: dict[str, Any], config_path: Path) -> dict[str, Any]:
    """timm's config.json -- as timm's ``save_for_hf`` / ``push_to_hub`` write it, i.e. the files of
    huggingface.co/timm/<name> that users keep in their Hugging Face cache, including the older single-dict
    layout -- in the zoo's form. The constructor arguments follow timm's own reading of that file
    (timm/models/_hub.py ``_parse_model_cfg`` and timm/models/_builder.py ``_update_default_model_kwargs``):
    num_classes from the top level, in_chans from pretrained_cfg's input_size, img_size too when the model has
    a fixed input size, then the recorded model_args. pretrained_cfg's preprocessing (mean, std, crop_pct,
    interpolation, crop_mode) is kept for the model's own ``pretrained_cfg``, so timm's data pipeline resolves
    the same transform for both."""
    if "pretrained_cfg" in hf:
        pretrained_cfg = hf["pretrained_cfg"]
    else:  # the legacy single dict: everything but the name is the pretrained config
        pretrained_cfg = {k: v for k, v in hf.items() if k not in ("architecture", "num_features")}
    model_args = hf.get("model_args") or {}
    if not isinstance(hf["architecture"], str) or not isinstance(pretrained_cfg, dict) or not isinstance(model_args, dict):
        raise CheckpointError(f"{config_path}: not a timm config.json ('architecture' must be a model name, "
                              f"'pretrained_cfg' and 'model_args' objects)")
    args: dict[str, Any] = {}
    num_classes = hf.get("num_classes", pretrained_cfg.get("num_classes"))
    if isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes >= 0:
        args["num_classes"] = num_classes
    input_size = pretrained_cfg.get("input_size")
    if input_size is not None:
        if not (isinstance(input_size, list) and len(input_size) == 3 and all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_size)):
            raise CheckpointError(f"{config_path}: pretrained_cfg.input_size must be [channels, height, width], "
                                  f"got {input_size!r}")
        args["in_chans"] = input_size[0]
        if pretrained_cfg.get("fixed_input_size"):
            args["img_size"] = list(input_size[1:])
    args.update(model_args)
    data = {key: pretrained_cfg[key] for key in ("mean", "std") if key in pretrained_cfg}
    labels = hf.get("label_names", pretrained_cfg.get("label_names", pretrained_cfg.get("labels")))
    if isinstance(labels, dict):  # timm also writes {class index: name} (where indices have gaps)
        try:
            by_index = {int(index): name for index, name in labels.items()}
        except (TypeError, ValueError):
            by_index = {}
        count = max(by_index, default=-1) + 1
        labels = [str(by_index.get(i, i)) for i in range(count)] if by_index and min(by_index) >= 0 else None
    if isinstance(labels, list) and all(isinstance(label, str) for label in labels):
        data["class_names"] = labels
    timm_cfg = {key: pretrained_cfg[key] for key in ("interpolation", "crop_pct", "crop_mode") if key in pretrained_cfg}
    return {"model_name": hf["architecture"], "model_args": args, "num_classes": args.get("num_classes"),
            "metadata": {"source": "timm", "data": data, "pretrained_cfg": timm_cfg}}


def _hf_snapshot(path: Path) -> Path:
    """A Hugging Face cache folder of one repository (``models--timm--<name>``, holding ``refs/`` and
    ``snapshots/``) resolved to the snapshot that ``refs/main`` names, or to its only snapshot."""
    snapshots = path / "snapshots"
    if not path.is_dir() or (path / CONFIG_NAME).exists() or not snapshots.is_dir():
        return path
    ref = path / "refs" / "main"
    named = snapshots / ref.read_text(encoding="utf-8").strip() if ref.is_file() else None
    if named is not None and named.is_dir():
        return named
    found = sorted(p.name for p in snapshots.iterdir() if p.is_dir())
    if len(found) == 1:
        return snapshots / found[0]
    raise CheckpointError(f"{path} is a Hugging Face cache folder with {len(found)} snapshots and no usable "
                          f"refs/main; pass one of them: {', '.join(str(snapshots / name) for name in found) or 'none'}")


def _check_not_interrupted(directory: Path) -> None:
    """A directory whose save_pretrained stopped while swapping its files has no config.json but the parked old
    one: say so, rather than load its weights alone or report a missing file. When a config.json left there (the
    parked old one, or the new one still staged under a temporary name after a kill) carries the save id of the
    weights in place, that pair is a whole checkpoint, and the message names the ``mv`` that restores it."""
    import shlex

    if not (directory / PARKED_CONFIG).exists():
        return
    weights_id = _weights_save_id(directory / WEIGHTS_NAME)
    candidates = [directory / PARKED_CONFIG, *sorted(directory.glob(f".{CONFIG_NAME}.*.tmp"))]
    match = next((c for c in candidates if weights_id is not None and _config_save_id(c) == weights_id), None)
    if match is not None:
        recover = (f"{match.name} and {WEIGHTS_NAME} are one save (save id {weights_id}): restore that checkpoint "
                   f"with `mv {shlex.quote(str(match))} {shlex.quote(str(directory / CONFIG_NAME))}`, or save the "
                   f"model again")
    else:
        recover = (f"no {CONFIG_NAME} left there matches {WEIGHTS_NAME}'s save id, so save the model again (the "
                   f"previous config is kept as {PARKED_CONFIG})")
    raise CheckpointError(
        f"{directory}: a save_pretrained into this directory was interrupted while swapping its files; {recover}"
    )


def _weights_save_id(weights_path: Path) -> Optional[str]:
    """The save id in a safetensors file's header (``zoo_save_id``); None if absent or unreadable."""
    if weights_path.suffix != ".safetensors" or not weights_path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            return (handle.metadata() or {}).get(SAVE_ID)
    except Exception:  # unreadable: load_state_dict_file names the problem
        return None


def _config_save_id(config_path: Path) -> Optional[str]:
    """config.json's ``save_id`` (None if the file is unreadable or has none)."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config.get("save_id") if isinstance(config, dict) else None


def _check_same_save(config: Optional[dict], weights_path: Path) -> None:
    """Refuse a config.json and weights written by two different save_pretrained calls (a re-save interrupted
    between its renames): the model would be built and labelled by one and weighted by the other."""
    expected = (config or {}).get("save_id")
    if config is None:
        return
    found = _weights_save_id(weights_path)
    if found is not None and not expected:  # a config.json from before save ids, or written by hand
        raise CheckpointError(
            f"{weights_path.parent}: {weights_path.name} was written by save_pretrained (save id {found}) but "
            f"{CONFIG_NAME} records no save id, so they come from two different saves; save the model again"
        )
    if found is not None and found != expected:  # weights without an id: written by hand or before save ids
        raise CheckpointError(
            f"{weights_path.parent}: {CONFIG_NAME} and {weights_path.name} come from two different saves "
            f"(save ids {expected} / {found}): a save_pretrained into this directory was interrupted; save the "
            f"model again"
        )


def _weights_file(path: Path) -> Path:
    """The weights of a checkpoint directory: model.safetensors, else timm's older pytorch_model.bin (read with
    weights_only); a file path is its own."""
    if path.is_dir() and not (path / WEIGHTS_NAME).exists() and (path / "pytorch_model.bin").is_file():
        return path / "pytorch_model.bin"
    return path / WEIGHTS_NAME if path.is_dir() else path


def unwrap_state_dict(state_dict, *, ema: Optional[bool] = None) -> dict[str, torch.Tensor]:
    """A checkpoint's weights as a flat dict: the ``{"model": ...}`` / ``{"state_dict": ...}`` wrappers of
    training scripts and a DDP ``module.`` prefix removed; every value checked to be a tensor (named by key).
    Of raw and EMA weights, :func:`load_state_dict_file`'s rule picks (``ema``: the same choice).
    The weight converters of the model families (``checkpoint_filter_fn``) start here."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    has_entry = lambda value: isinstance(value, Mapping)  # noqa: E731 - a mis-typed entry is named below
    if ema is not None or any(has_entry(state_dict.get(key)) for key in _EMA_ENTRIES + ("model", "state_dict")):
        key = _checkpoint_entry(state_dict, ema, "checkpoint", holds=has_entry)
        if key is not None:
            state_dict = state_dict[key]
    if state_dict and all(isinstance(k, str) and k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] is a {type(value).__name__}, not a tensor under a str key")
    return dict(state_dict)


def head_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the model's classifier (those re-initialised when the class count changes):
    ``model.pretrained_head_keys()``, else the keys under ``default_cfg["classifier"]`` (the model's
    attribute or its registry entry's), else the keys under ``head.``."""
    keys_fn = getattr(model, "pretrained_head_keys", None)
    if callable(keys_fn):
        return list(keys_fn())
    state_keys = list(model.state_dict())
    cfg = getattr(model, "default_cfg", None) or getattr(model, "pretrained_cfg", None) or {}
    name = getattr(model, "zoo_model_name", None)
    if not cfg and isinstance(name, str):  # the registry entry's default_cfg (timm style)
        from zoo.registry import get_model_entry

        cfg = get_model_entry(name).default_cfg
    classifier = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    if classifier:
        prefixes = [classifier] if isinstance(classifier, str) else list(classifier)
        return [k for k in state_keys if any(k.startswith(p + ".") for p in prefixes)]
    return [k for k in state_keys if k.startswith("head.")]


def _summarise(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _describe_head(shapes: Mapping[str, tuple]) -> str:
    """"classifier {key: shape}" for the classifier tensors of a checkpoint or model, "no classifier" for none."""
    return f"classifier {dict(shapes)}" if shapes else "no classifier"


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "state dict",
                 new_head: bool = True) -> list[str]:
    """Load ``state`` into ``model`` strictly, except classifier tensors whose shape differs.

    Those keep the model's fresh initialisation (a message is logged) when ``new_head`` (the caller asked for
    another class count); otherwise they raise, so that a trained head is never replaced unasked. Returns the
    re-initialised keys. Raises :class:`CheckpointError` naming ``source`` and the missing / unexpected /
    mis-shaped keys.
    """
    own = model.state_dict()
    heads = set(head_keys(model))
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    head_mismatch = [k for k in mismatched if k in heads]
    other_mismatch = [k for k in mismatched if k not in heads]
    # a checkpoint with a head where the model has none (num_classes=0), or the reverse, is a head change too
    head_missing = [k for k in missing if k in heads]
    head_unexpected = [k for k in unexpected if k in heads]
    missing = [k for k in missing if k not in heads]
    unexpected = [k for k in unexpected if k not in heads]
    if missing or unexpected or other_mismatch:
        lines = [f"{source} does not fit {getattr(model, 'zoo_model_name', type(model).__name__)}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_summarise(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_summarise(unexpected)}")
        if other_mismatch:
            shapes = [f"{k} checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in other_mismatch]
            lines.append(f"  shape mismatches ({len(shapes)}): {_summarise(shapes, 6)}")
            lines += _input_channel_hint(model, state, own, other_mismatch)
        raise CheckpointError("\n".join(lines))
    changed = head_mismatch + head_missing + head_unexpected
    if changed and not new_head:
        ckpt_shapes = {k: tuple(state[k].shape) for k in head_mismatch + head_unexpected}
        model_shapes = {k: tuple(own[k].shape) for k in head_mismatch + head_missing}
        keep = ("the checkpoint's num_classes to load its head" if ckpt_shapes
                else "num_classes=0 for no head, as the checkpoint")
        raise CheckpointError(
            f"{source}: the checkpoint has {_describe_head(ckpt_shapes)} but the model has "
            f"{_describe_head(model_shapes)} (num_classes={getattr(model, 'num_classes', '?')}), and no class count "
            f"was asked for: pass {keep}, or another num_classes for a new (re-initialised) head"
        )
    filtered = {k: v for k, v in state.items() if k not in changed}
    result = model.load_state_dict(filtered, strict=False)
    leftover = [k for k in result.missing_keys if k not in changed]
    if leftover or result.unexpected_keys:  # cannot happen after the checks above; keep the guarantee explicit
        raise CheckpointError(f"{source}: missing {leftover}, unexpected {result.unexpected_keys}")
    if changed:
        ckpt_shapes = {k: tuple(state[k].shape) for k in head_mismatch + head_unexpected}
        model_shapes = {k: tuple(own[k].shape) for k in head_mismatch + head_missing}
        log.warning(
            "%s: classifier re-initialised because its shape differs from the checkpoint "
            "(checkpoint %s, model %s); fine-tune it before use.",
            source, ckpt_shapes or "no head", model_shapes or "no head",
        )
    reinit = head_mismatch + head_missing
    return reinit


def shipped_checkpoints_dir() -> Path:
    """Where the checkpoints this project ships live: ``$ZOO_CHECKPOINTS`` if set, else ``checkpoints/`` of
    the source tree, else the installed package data ``zoo/checkpoints`` (setup.py installs checkpoints/ as
    ``zoo.checkpoints``, so ``pretrained=True`` works from a wheel too)."""
    env = os.environ.get("ZOO_CHECKPOINTS")
    if env:
        return Path(env)
    source_tree = Path(__file__).resolve().parent.parent / "checkpoints"
    if source_tree.is_dir():
        return source_tree
    return Path(__file__).resolve().parent / "checkpoints"


def list_shipped() -> list[str]:
    """Directory names of the checkpoints shipped in :func:`shipped_checkpoints_dir`."""
    root = shipped_checkpoints_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / WEIGHTS_NAME).is_file())


def shipped_checkpoint(name: str) -> Path | None:
    """The shipped checkpoint directory of model ``name``: ``<shipped>/<name>``, else the one whose config.json
    names ``name`` (a card directory may be named after its experiment, e.g. agent_digits holds
    agent_deit_digits); None if there is none."""
    root = shipped_checkpoints_dir()
    direct = root / name
    if (direct / WEIGHTS_NAME).is_file():
        return direct
    for directory in list_shipped():
        config_path = root / directory / CONFIG_NAME
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and config.get("model_name") == name:
            return root / directory
    return None


def _shipped_checkpoint_named_by_path(path: str | os.PathLike) -> Path | None:
    """The shipped checkpoint that a path of the form ``checkpoints/<dir>`` names, as README and ``zoo train
    --help`` write it; None for any other path. The path is relative to the source tree, so from another working
    directory or an installed wheel it does not exist and was taken for a Hub repository id ("checkpoints" as
    owner). The CLI's ``ckpt=`` follows the same rule (:func:`_shipped_source`). Callers
    ask only after the path was found missing here: an existing ``checkpoints/<dir>`` is the user's own."""
    parts = Path(path).parts
    if len(parts) != 2 or parts[0] != "checkpoints":
        return None
    candidate = shipped_checkpoints_dir() / parts[1]
    return candidate if candidate.is_dir() else None


def _shipped_source(path: Path) -> Path | None:
    """A checkpoint this project ships, named as README names it (``checkpoints/vit_digits``:
    :func:`_shipped_checkpoint_named_by_path`) or by its model or card name (``vit_digits``); None otherwise. Read
    by the CLI's ``ckpt=`` (zoo/train/run.py) and :func:`from_pretrained` for a path that does not exist here."""
    parts = path.parts
    if len(parts) == 2:
        return _shipped_checkpoint_named_by_path(path)
    if len(parts) == 1 and path.suffix == "":
        return shipped_checkpoint(parts[0])
    return None


def hf_cache_dir() -> Path:
    """The local Hugging Face Hub cache, found as huggingface_hub finds it: ``$HF_HUB_CACHE`` (or its older name
    ``$HUGGINGFACE_HUB_CACHE``), else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
    ``~/.cache/huggingface/hub`` (variables in the values expanded)."""
    def path(value: str) -> Path:
        return Path(os.path.expandvars(value)).expanduser()

    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):  # the second: huggingface_hub's older name
        if os.environ.get(variable):
            return path(os.environ[variable])
    if os.environ.get("HF_HOME"):
        return path(os.environ["HF_HOME"]) / "hub"
    return path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface" / "hub"


def timm_hub_id(name: str) -> Optional[str]:
    """The Hub repository of timm's default pretrained weights for model ``name`` (its pretrained_cfg's
    hf_hub_id, e.g. ``timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k``); None when timm has none."""
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
    except Exception:  # timm absent, or a name timm does not know
        return None
    return getattr(cfg, "hf_hub_id", None) or None


def _cache_folder(repo_id: str) -> Path:
    """Where huggingface_hub caches model repository ``repo_id`` ("owner/name"): ``models--owner--name``."""
    return hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def _hub_repo(repo_id: str) -> Path:
    """The cached snapshot of Hub repository ``repo_id`` ("owner/name", timm's "hf-hub:" prefix allowed); no
    download is ever tried, so a repository missing from the cache is an error saying how to bring it."""
    given, repo_id = repo_id, repo_id.removeprefix("hf-hub:")
    folder = _cache_folder(repo_id)
    local_parent = Path(given).expanduser().parent
    if not folder.is_dir() and not given.startswith("hf-hub:") and local_parent.is_dir():
        # "checkpoints/vit_digitz": a mistyped local path (its folder exists here) more likely than a Hub id
        entries = sorted(entry.name for entry in local_parent.iterdir())
        close = difflib.get_close_matches(Path(given).name, entries, n=3)
        hint = f"did you mean {', '.join(str(local_parent / name) for name in close)}?" if close else (
            f"it holds {', '.join(entries[:8])}{', ...' if len(entries) > 8 else ''}" if entries else "it is empty")
        raise FileNotFoundError(
            f"{given}: no such file or directory ({local_parent} exists: {hint}); as a Hub repository id it is not in "
            f"the local Hugging Face cache either (hf-hub:{repo_id} to mean the Hub)")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{given}: no such file or directory, and as a Hub repository it is not in the local Hugging Face cache "
            f"({folder} does not exist); the zoo never downloads: "
            f"on a machine with network run `huggingface-cli download {repo_id}` and copy the cache folder here, or "
            f"pass the directory holding config.json and model.safetensors")
    return _hf_snapshot(folder)


def _looks_like_repo_id(text: str) -> bool:
    owner, _, repo = text.removeprefix("hf-hub:").partition("/")
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    return bool(owner and repo) and set(owner + repo) <= allowed and not owner.startswith(".")


_HUB_HOSTS = ("huggingface.co", "www.huggingface.co", "hf.co")
_HUB_NON_MODEL_SECTIONS = ("datasets", "spaces", "docs", "models", "api", "collections", "papers", "blog")


def _hub_model_repo_of_url(url: str) -> Optional[str]:
    """``owner/name`` of a Hugging Face model URL (``https://huggingface.co/timm/<name>``, also with ``/tree/main``,
    ``/blob/main/<file>`` or ``/resolve/main/<file>`` after it); None for any other URL."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    segments = [segment for segment in parts.path.split("/") if segment]
    if (parts.hostname or "").lower() not in _HUB_HOSTS or len(segments) < 2 or segments[0] in _HUB_NON_MODEL_SECTIONS:
        return None
    repo_id = "/".join(segments[:2])
    return repo_id if _looks_like_repo_id(repo_id) else None


# a URL's scheme (http://, s3://, file://, ...); hf-hub:<repo> has no "//" and Windows drives one letter only
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def refuse_url(value: Any, option: str, what: str = "the file", model: bool = False) -> None:
    """A one-line ValueError when ``value`` (given as ``option``=, e.g. ``input``, ``image``, ``ckpt``,
    ``model.pretrained``) is an http(s) URL: the zoo reads local files only and downloads nothing, so a URL was
    reported as a missing local file, with its "//" collapsed by Path ("https:/..."). The message says what to do:
    download ``what`` and pass its path; for a Hugging Face model page (``model``: weights are expected), the
    ``hf-hub:<owner>/<name>`` form, which reads the local Hugging Face cache as timm's ``hf-hub:`` names do, and
    whether that cache holds it."""
    if not isinstance(value, str) or _URL_SCHEME.match(value.strip()) is None:
        return
    url = value.strip()
    scheme = url.split("://", 1)[0].lower()
    if scheme == "file":  # a local file written as a URL: Path() read file:///tmp/x as the relative "file:/tmp/x"
        raise ValueError(f"{option}={url} is a file:// URL: give the local path itself, {option}={url[len('file://'):]}")
    if scheme not in ("http", "https"):  # s3://, gs://, ...: remote storage, which the zoo does not read either
        raise ValueError(f"{option}={url} is a {scheme}:// address, and the zoo reads local files only (nothing is "
                         f"downloaded): copy {what} to this machine and pass its path, {option}=<local path>")
    repo_id = _hub_model_repo_of_url(url) if model else None
    if repo_id is None:
        raise ValueError(f"{option}={url} is a URL, and the zoo reads local files only (nothing is downloaded): "
                         f"download {what} yourself and pass its path, {option}=<local path>")
    cached = _cache_folder(repo_id).is_dir()
    where = (f"it is in your cache ({_cache_folder(repo_id)})" if cached else
             f"it is not in your cache ({hf_cache_dir()}): on a machine with network run `huggingface-cli download "
             f"{repo_id}` and copy the cache folder here, or download the repository's files and pass their directory")
    raise ValueError(f"{option}={url} is a Hugging Face Hub address, and the zoo never downloads: give the repository "
                     f"as {option}=hf-hub:{repo_id}, which reads the local Hugging Face cache; {where}")


def _resolve_pretrained(name: str, pretrained: Any) -> Path:
    if pretrained is True:
        path = shipped_checkpoint(name)
        if path is not None:
            return path
        hub_id = timm_hub_id(name)
        if hub_id is not None and _cache_folder(hub_id).is_dir():
            return _hub_repo(hub_id)  # timm's weights for this name, from the user's Hugging Face cache
        shipped = list_shipped()
        cached = (f" nor timm's {hub_id} in the Hugging Face cache {hf_cache_dir()} (the zoo never downloads: on a "
                  f"machine with network run `huggingface-cli download {hub_id}` and copy the cache folder here)"
                  if hub_id else "")
        raise FileNotFoundError(
            f"no shipped checkpoint for {name!r} (looked in {shipped_checkpoints_dir()}){cached}; shipped checkpoints: "
            f"{', '.join(shipped) if shipped else 'none'}. Pass pretrained=<directory or .safetensors> instead."
        )
    if isinstance(pretrained, (str, os.PathLike)):
        if not str(pretrained).strip():  # Path("") is the current directory
            raise ValueError(f"pretrained must be False, True or a checkpoint path, got {pretrained!r}")
        refuse_url(pretrained, "pretrained", "the checkpoint", model=True)
        path = Path(pretrained).expanduser()
        if not path.exists():
            shipped = _shipped_checkpoint_named_by_path(path)
            if shipped is not None:
                return shipped
            if isinstance(pretrained, str) and _looks_like_repo_id(pretrained):
                return _hub_repo(pretrained)
            raise FileNotFoundError(f"pretrained checkpoint {path} does not exist")
        return _hf_snapshot(path)
    raise TypeError(f"pretrained must be False, True or a path, got {type(pretrained).__name__} {pretrained!r}")


def load_pretrained_into(entry, pretrained: Any, overrides: Mapping[str, Any],
                         defaults: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """Build ``entry``'s model from a checkpoint (``create_model(name, pretrained=...)`` calls this).

    ``defaults`` (the constructor arguments of a timm tag, e.g. ``num_classes=0`` for .dino) apply first, then
    the checkpoint's recorded constructor arguments, then ``overrides``; weights load strictly except a
    classifier whose class count the caller changed (re-initialised, with a message).
    """
    from zoo.registry import _construct, current_model_name

    path = _resolve_pretrained(entry.name, pretrained)
    config = read_config(path)
    if config is None:
        _check_not_interrupted(path if path.is_dir() else path.parent)
    args: dict[str, Any] = dict(defaults or {})
    # a checkpoint saved under a name since renamed (zoo.registry.DEPRECATED_MODEL_NAMES) is that model's own
    saved_name = None if config is None else current_model_name(config["model_name"])
    if config is not None:
        saved_family = _family_of(config["model_name"])
        if saved_family is not None and saved_family != entry.family:
            raise CheckpointError(
                f"{path} holds {config['model_name']!r} weights (family {saved_family!r}), not a {entry.family!r} "
                f"checkpoint: build {config['model_name']!r} (zoo.from_pretrained('{path}')) or pick a "
                f"{entry.family!r} checkpoint for {entry.name!r}"
            )
        if saved_name != entry.name:
            log.warning(
                "%s holds %r weights; loading them into %r, built with the constructor arguments config.json records "
                "(%s) and the defaults of %r for the others (those of %r are not carried over)",
                path, config["model_name"], entry.name, _recorded_args(config), entry.name, config["model_name"],
            )
        args.update(config.get("model_args", {}))
    args.update(overrides)
    with _failure_names_the_saved_model(path, config, saved_name, entry):
        model = _construct(entry, args)
    _refuse_meta_model(model)
    saved_classes = None if config is None else config.get("num_classes")
    if (
        isinstance(saved_classes, int) and "num_classes" not in overrides and saved_name == entry.name
        and isinstance(getattr(model, "num_classes", None), int) and model.num_classes != saved_classes
    ):
        # config.json's num_classes is the saved model's own; its constructor arguments can disagree only when
        # the head was reset after construction and saved by a zoo that did not record it yet. Rebuild with
        # the saved count so that the trained head loads instead of being re-initialised.
        log.warning("%s: the saved model had %d classes, its recorded constructor arguments say %d (a head reset "
                    "before it was saved); building it with %d", path, saved_classes, model.num_classes, saved_classes)
        args["num_classes"] = saved_classes
        model = _construct(entry, args)
    weights_path = _weights_file(path)
    _check_same_save(config, weights_path)
    state = load_state_dict_file(weights_path)
    # the saved model's constructor arguments matter only when overrides change the model
    saved_args = (config or {}).get("model_args") if overrides else None
    with _failure_names_the_saved_model(path, config, saved_name, entry):
        state = _family_filter(entry, state, model, weights_path, saved_args if isinstance(saved_args, dict) else None,
                               saved_name=(config or {}).get("model_name"))
        state = adapt_input_conv(model, state, source=str(weights_path))
        load_weights(model, state, source=str(weights_path), new_head="num_classes" in overrides)
    data = ((config or {}).get("metadata") or {}).get("data")
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and isinstance(data, dict):
        # the normalisation the checkpoint was trained with (zoo train records it), for timm's data pipeline
        channels = (cfg.get("input_size") or (None,))[0]
        for key in ("mean", "std"):
            if isinstance(data.get(key), (list, tuple)) and data[key]:
                cfg[key] = tuple(float(v) for v in data[key])
        if "img_size" not in overrides:
            _trained_input_size(cfg, data)
        timm_cfg = ((config or {}).get("metadata") or {}).get("pretrained_cfg")
        if isinstance(timm_cfg, dict):  # a timm config.json: its test-time preprocessing too (the input size and
            own = {k: cfg[k] for k in ("input_size", "num_classes") if k in cfg}  # class count: the model's as built)
            cfg.update(timm_cfg)
            cfg.update(own)
        # another in_chans than the checkpoint's: asked for, or the default of another model name (its stem adapted)
        _statistics_per_channel(cfg, channels, "in_chans" in overrides or saved_name != entry.name, path)
    if config is not None:  # what the checkpoint says about itself, kept when the model is saved again
        remember_loaded_metadata(model, config.get("metadata"))
    return model


def _recorded_args(config: Mapping[str, Any]) -> str:
    """config.json's recorded constructor arguments as ``name=value, ...`` ("none" when it records none)."""
    recorded = config.get("model_args") or {}
    return ", ".join(f"{key}={value!r}" for key, value in recorded.items()) or "none"


@contextlib.contextmanager
def _failure_names_the_saved_model(path: Path, config: Optional[Mapping[str, Any]], saved_name: Optional[str], entry):
    """Building or loading a checkpoint of model A into model B of the same family (``create_model(B,
    pretrained=<A's directory>)``, the CLI's ``ckpt=<A> model=B``) keeps only the arguments A's config.json records,
    those that differ from A's defaults; B's defaults fill the rest. Where A and B are different architectures
    (agent_deit_digits' 2-px patches, agent_deit_tiny's 16) that fails on some mixed argument ("img_size (8, 8) is
    smaller than patch_size (16, 16)") or on the weights' shapes: re-raised as a CheckpointError that names both
    models and the fix. Nothing changes when the checkpoint is the requested model's own."""
    if config is None or saved_name is None or saved_name == entry.name:
        yield
        return
    try:
        yield
    except (ValueError, TypeError, RuntimeError, KeyError) as error:
        raise CheckpointError(
            f"{path} holds {config['model_name']!r} weights, which do not fit {entry.name!r}: {error}. Only the "
            f"constructor arguments its config.json records ({_recorded_args(config)}) carry over and the defaults "
            f"of {entry.name!r} fill in the others, so another architecture of the {entry.family!r} family does not "
            f"build or load from it: build {saved_name!r} (zoo.create_model({saved_name!r}, pretrained='{path}'), "
            f"zoo.from_pretrained('{path}')), or pass model={saved_name} on the command line"
        ) from error


# what create_model(device="meta", pretrained=...) says (zoo/registry.py); a torch.device("meta") block is the same
def _refuse_meta_model(model: nn.Module) -> None:
    """Refuse to load weights into a model built on the meta device (inside ``with torch.device("meta")``):
    load_state_dict into meta tensors is a no-op, and the model came back without its weights, silently."""
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise ValueError(f"device='meta' (here a torch.device('meta') block) {META_DEVICE_ADVICE}")


def apply_training_preprocessing(model: nn.Module, data_info: Optional[Mapping[str, Any]]) -> nn.Module:
    """Write the preprocessing a checkpoint was trained with (``zoo train``'s record: mean, std, crop_pct, crop_mode,
    interpolation) into the model's
    ``pretrained_cfg``, so that timm's data pipeline and the zoo's exporters and pictures use it rather than the
    registry's defaults (a model rebuilt from a .ckpt carries its name's defaults). Released directories get the
    same from their config.json (:func:`load_pretrained_into`)."""
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict) or not data_info:
        return model
    channels = (cfg.get("input_size") or (None,))[0]
    for key in ("mean", "std"):
        values = data_info.get(key)
        if isinstance(values, (list, tuple)) and values and (channels is None or len(values) == channels):
            cfg[key] = tuple(float(v) for v in values)
    _trained_input_size(cfg, data_info)
    # the evaluation resize and crop of the run: recorded since data.crop_pct / data.interpolation exist; a record
    # without them comes from a run that always evaluated with the default (no crop, bilinear), not the registry's
    cfg["crop_pct"] = float(data_info.get("crop_pct", 1.0))
    cfg["crop_mode"] = str(data_info.get("crop_mode", "center"))
    cfg["interpolation"] = str(data_info.get("interpolation", "bilinear"))
    return model


def _trained_input_size(cfg: dict, data_info: Mapping[str, Any]) -> None:
    """The image size a ``zoo train`` run trained and evaluated at (its data record's ``img_size``) as the model's
    ``pretrained_cfg["input_size"]``: a model that takes any size (MaxViT, Agent-DeiT, ViT with dynamic_img_size)
    trained at 64 px on a name built for 224 came back saying 224, and timm's transform from
    ``resolve_model_data_config`` then resized the images to a size the model never saw."""
    size, built = data_info.get("img_size"), cfg.get("input_size")
    if isinstance(size, int) and not isinstance(size, bool) and size > 0 and isinstance(built, (tuple, list)) \
            and len(built) == 3:
        cfg["input_size"] = (built[0], size, size)


def _statistics_per_channel(cfg: dict, channels: Optional[int], in_chans_given: bool, path) -> None:
    """The checkpoint's normalisation (``cfg`` mean / std, from its config.json) for a model of ``channels`` input
    channels. Built with another ``in_chans`` than the checkpoint's, its first convolution was adapted
    (:func:`adapt_input_conv`), and so are the statistics, by the registry's rule (their mean for 1 channel, cycled
    otherwise), as timm's pretrained_cfg follows in_chans; otherwise a count that differs is an inconsistent file."""
    from zoo.registry import image_data_config

    for key in ("mean", "std"):
        values = cfg.get(key)
        if channels is None or not isinstance(values, (tuple, list)) or not values or len(values) == channels:
            continue
        if not in_chans_given:
            raise CheckpointError(f"{path}: config.json's metadata.data.{key} has {len(values)} values for a model of "
                                  f"{channels} input channels")
        cfg[key] = image_data_config({"input_size": (len(values), 1, 1), key: tuple(values)},
                                     {"in_chans": channels})[key]


def _family_of(name: str) -> Optional[str]:
    """The registered family of model ``name`` (None if no such model is registered here)."""
    from zoo.registry import UnknownModelError, get_model_entry

    try:
        return get_model_entry(name).family
    except UnknownModelError:
        return None


def _saved_geometry(entry, saved_args: dict[str, Any], saved_name: Optional[str] = None) -> Optional[nn.Module]:
    """The saved model itself, built from config.json's model name (``saved_name``, when registered; else the
    target's) and constructor arguments on the meta device (no memory, no init cost), when overrides change the
    model: its patch grid and prefix tokens tell the family's filter how the checkpoint's position embedding is
    laid out (a 2 x 8 grid is not a 4 x 4 one; a vit_tiny_patch16_384 checkpoint loaded into
    vit_tiny_patch16_224 has a 24 x 24 one). None if it cannot be built (the filter then falls back to its own
    assumptions)."""
    from zoo.registry import UnknownModelError, _construct, get_model_entry

    if saved_name and saved_name != entry.name:
        try:
            entry = get_model_entry(saved_name)
        except UnknownModelError:
            pass
    try:
        with torch.device("meta"):
            return _construct(entry, dict(saved_args))
    except Exception:  # noqa: BLE001 - an old or odd config: the filter works without it
        return None


def _first_conv_weight_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the input convolution's weight: ``<name>.weight`` for each name in the model's
    ``pretrained_cfg["first_conv"]`` (a name or a list of them, timm's convention)."""
    first_conv = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    return [f"{name}.weight" for name in ([first_conv] if isinstance(first_conv, str) else list(first_conv or ()))]


def _input_channel_hint(model: nn.Module, state: dict, own: dict, mismatched: list[str]) -> list[str]:
    """A line saying which channel count the checkpoint's input convolution takes, when only that differs (a
    1-channel digits checkpoint loaded into a model built for 3): only RGB kernels convert (adapt_input_conv,
    timm's rule), so the fix is the checkpoint's count."""
    for key in _first_conv_weight_keys(model):
        if key not in mismatched or state[key].dim() != 4:
            continue
        saved, built = tuple(state[key].shape), tuple(own[key].shape)
        if saved[:1] + saved[2:] == built[:1] + built[2:]:
            return [f"  the input convolution {key} takes {saved[1]} channel(s) in the checkpoint and {built[1]} in "
                    f"the model: build the model with in_chans={saved[1]} (zoo train: data.in_chans={saved[1]}); only "
                    f"3-channel (RGB) weights convert to another count, as in timm"]
    return []


def adapt_input_conv(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """RGB weights for a model built with another ``in_chans``, as timm's ``load_pretrained`` does
    (timm/models/_manipulate.py ``adapt_input_conv``): the first convolution named by the model's
    ``pretrained_cfg["first_conv"]`` keeps its 3-channel kernel summed over the channels for 1 input channel
    (a grey image as R = G = B gives the RGB model's output), or repeated over the channels and scaled by
    3 / in_chans for any other count. Logged; other channel counts are left to the shape check."""
    for key in _first_conv_weight_keys(model):
        weight, want = state.get(key), model.state_dict().get(key)
        if weight is None or want is None or weight.dim() != 4 or weight.shape[1] == want.shape[1]:
            continue
        in_chans = int(want.shape[1])
        if weight.shape[1] != 3 or weight.shape[0] != want.shape[0] or weight.shape[2:] != want.shape[2:]:
            continue  # not an RGB kernel of this layer: the strict load names the mismatch
        wide = weight.float()
        if in_chans == 1:
            adapted = wide.sum(dim=1, keepdim=True)
        else:
            adapted = wide.repeat(1, math.ceil(in_chans / 3), 1, 1)[:, :in_chans] * (3.0 / in_chans)
        state = dict(state)
        state[key] = adapted.to(weight.dtype)
        log.info("%s: converted the input convolution %s from 3 to %d channel(s), as timm does", source, key, in_chans)
    return state


def _family_filter(entry, state: dict[str, torch.Tensor], model: nn.Module, source: Path,
                   saved_args: Optional[dict[str, Any]] = None, saved_name: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Apply the family's ``checkpoint_filter_fn(state_dict, model)`` (timm convention) when its module has
    one: timm layouts, position embeddings / relative-position tables resized to the model's image size.
    Filters that take ``saved_model`` get the checkpoint's own model, built from ``saved_args`` (config.json's
    constructor arguments) on the meta device, only then."""
    import inspect
    import sys

    module = sys.modules.get(entry.module)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if not callable(filter_fn):
        return state
    kwargs = {}
    if saved_args is not None and "saved_model" in inspect.signature(filter_fn).parameters:
        kwargs["saved_model"] = _saved_geometry(entry, saved_args, saved_name)
    try:
        return filter_fn(state, model, **kwargs)
    except (ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(f"{source}: cannot adapt the checkpoint to {entry.name}: {error}") from None


def from_pretrained(path: str | os.PathLike, *, device: Any = None, dtype: Optional[torch.dtype] = None,
                    **overrides: Any) -> nn.Module:
    """Rebuild a model written by :func:`save_pretrained` (a directory, or its ``model.safetensors``), or by
    timm for the Hugging Face Hub: its directory, its cache folder, or its repository id in the local cache
    (``"timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"``; nothing is downloaded). Like the CLI's ``ckpt=``
    (zoo/train/run.py ``resolve_ckpt_argument``) it also takes a shipped checkpoint, by its card or model name
    (``"vit_digits"``, as ``create_model(name, pretrained=True)`` finds it) or as README writes it
    (``"checkpoints/vit_digits"``, from any working directory), and a ``zoo train`` run directory, read from its
    ``released/``. A training checkpoint (``.ckpt``, or a run without ``released/``) is refused with the
    ``zoo.create_model`` call that loads it.

    ``overrides`` change constructor arguments, e.g. ``num_classes=5`` for fine-tuning (new head). ``device`` and
    ``dtype`` are :func:`zoo.create_model`'s (timm's): the model built on that device, the weights loaded onto it,
    then cast to that floating dtype; ``device="meta"`` is refused (no storage to load into).
    The model is returned in training mode, like :func:`zoo.create_model`; call ``.eval()`` for inference.
    """
    from zoo.registry import create_model, get_model_entry

    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise TypeError(f"from_pretrained: path must be a directory or .safetensors path, got {path!r}")
    path = _from_pretrained_source(path)
    config = read_config(path)
    if config is None:
        where = path if path.is_dir() else path.parent
        _check_not_interrupted(where)
        if path.suffix == ".ckpt":
            raise CheckpointError(f"{path} is a training checkpoint, which from_pretrained does not read: "
                                  f"{_ckpt_loading_call(path)}")
        weights = _weights_file(path)
        bare = (f"for a bare weights file use zoo.create_model(<name>, pretrained='{weights}')" if weights.is_file()
                else f"and it holds no weights file ({weights} does not exist)")
        raise CheckpointError(
            f"{where} has no {CONFIG_NAME}; from_pretrained needs the directory written by zoo.save_pretrained "
            f"({bare})"
        )
    try:
        entry = get_model_entry(config["model_name"])
    except UnknownModelError as error:  # the registry's message names the model, not the file that asked for it
        where = path if path.is_dir() else path.parent
        raise _UnknownSavedModel(f"{where / CONFIG_NAME}: its model_name is not a model of this zoo: {error}; "
                                 f"load {where} with the zoo version that wrote it, or correct model_name") from None
    return create_model(entry.name, pretrained=str(path), device=device, dtype=dtype, **overrides)


# what a zoo train run directory offers to zoo eval / zoo predict (zoo/train/run.py _run_directory_source) and to
# from_pretrained, in the order they take it: the release (the weights zoo train evaluated and exported), else the
# best validated checkpoint, else the resumable last one
_RUN_DIRECTORY_SOURCES = ("released", "checkpoints/best.ckpt", "checkpoints/last.ckpt")
_RUN_CHECKPOINTS = _RUN_DIRECTORY_SOURCES[1:]


def _is_run_directory(path: Path) -> bool:
    """A directory zoo train wrote: its config.yaml (written first) and no config.json of its own (a
    save_pretrained directory). A source tree, whose checkpoints/ holds the shipped cards, has no config.yaml."""
    return path.is_dir() and not (path / CONFIG_NAME).is_file() and (path / "config.yaml").is_file()


def _from_pretrained_source(path: str | os.PathLike) -> Path:
    """What :func:`from_pretrained` reads for ``path``: a zoo train run directory (config.yaml and no config.json
    of its own) as its ``released/``; a missing single-component path that names a shipped checkpoint (its card or
    model name) as that checkpoint; anything else as ``create_model(pretrained=path)`` resolves it. A run without
    ``released/`` is refused with the call that loads its training checkpoint."""
    given = Path(path).expanduser()
    if _is_run_directory(given):
        released = given / "released"
        if (released / CONFIG_NAME).is_file():
            return released
        for name in _RUN_CHECKPOINTS:
            if (given / name).is_file():
                raise CheckpointError(f"{given} is a zoo train run without released/ (the run has not finished): "
                                      f"{_ckpt_loading_call(given / name)}")
        raise CheckpointError(f"{given} is a zoo train run directory with neither released/ nor "
                              f"{' nor '.join(_RUN_CHECKPOINTS)}: it has written no weights yet")
    shipped = _shipped_source(given) if not given.exists() else None
    return shipped if shipped is not None else _resolve_pretrained("", path)


def _ckpt_loading_call(ckpt: Path) -> str:
    """The advice for a zoo train ``.ckpt``: the ``zoo.create_model`` call that loads its weights, with the model
    name and constructor arguments the training module stored in the checkpoint's hyper-parameters
    (zoo/train/module.py); a placeholder name when they cannot be read."""
    name, model_args = "<model name>", {}
    try:  # mmap: only the small hyper-parameter record is read from disk, not the weights
        checkpoint = _torch_load(ckpt, mmap=True)
        hyper_parameters = checkpoint.get("hyper_parameters") or {}
        if isinstance(hyper_parameters.get("model_name"), str):
            name = hyper_parameters["model_name"]
            model_args = dict(hyper_parameters.get("model_args") or {})
    except Exception:  # unreadable or not a zoo train checkpoint: the placeholder stays
        pass
    arguments = "".join(f", {key}={value!r}" for key, value in model_args.items())
    shown_name = repr(name) if name != "<model name>" else name
    return (f"load its weights with zoo.create_model({shown_name}, pretrained={str(ckpt)!r}{arguments}), "
            f"or run `zoo train` to the end, which writes released/")
