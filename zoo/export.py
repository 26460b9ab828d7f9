"""ONNX export of zoo vision models, checked against onnxruntime.

    zoo export model=<registered name> out=model.onnx [img_size=224|HxW] [batch=1] [opset=17 (18 with exporter=dynamo)]
               [exporter=torchscript|dynamo] [check=true] [atol=1e-4] [dtype=float32|float16] [num_classes=K]
    zoo export ckpt=<save_pretrained dir, or its model.safetensors | zoo train's .ckpt> out=model.onnx [...]
    zoo export model=<registered name> ckpt=<bare weights: .safetensors / .pth> out=model.onnx [...]

    from zoo.export import export_onnx
    result = export_onnx("agent_deit_tiny", "agent.onnx")        # or a model instance
    result.max_abs_diff                                            # onnxruntime vs PyTorch on a fresh input

The graph takes ``images`` (batch, C, H, W) with a dynamic batch dimension and returns ``logits`` (batch, K) (or the
pooled features (batch, C) when the model has no head), both in the model's dtype: float32, or float16 for a
``model.half()`` (checked against the float32 model: onnxruntime's error at most twice PyTorch's own float16 error
plus ``atol``; bfloat16 and float64 are refused, as onnxruntime's CPU provider runs neither through these graphs;
``dtype="float16"`` exports a half copy of a float32 model). The image size is fixed at export time: ``img_size``
when given, else the size in the model's ``pretrained_cfg`` (the size its checkpoint was trained at: a ``zoo train``
release of a model that takes any size records its data.img_size there) when the model runs at it, else its
native size; the ONNX metadata's ``input_size`` records the size exported.
With ``model=<name>`` the model is built at ``img_size``; with ``ckpt=`` the checkpoint is exported as saved, run
at ``img_size``, when its family takes that size (MaxViT, Agent-DeiT, dynamic-size ViTs), else built at that
size with its position embedding resampled (fixed-size ViTs), as timm's ``create_model(img_size=...)`` does.

Exporters (torch.onnx.export): "torchscript" (the default; ``dynamo=False``) traces the model with the
attention core's reference backend ("torch": MatMul + Softmax ops that onnxruntime runs and fuses) -- it is
about 3x faster to export than the dynamo path on this project's models; "dynamo" (``dynamo=True``,
torch.export + onnxscript) traces whatever backend attend() picks (SDPA on CPU). Both are checked the same
way: unless ``check=False``, the exported file is run by onnxruntime (CPUExecutionProvider) on a random
input with a batch size different from the traced one, and the largest absolute difference to the PyTorch
model in eval mode must be at most ``atol`` (default 1e-4), otherwise :class:`ExportCheckError` is raised.
Model name, input size and mean/std are written to the ONNX metadata, from the model's ``pretrained_cfg``
(its own size and the normalisation its checkpoint was trained with), else the registry's default_cfg.

A ViT built with ``dynamic_img_size`` and exported at another size than its own is exported from a copy set
to that size (``set_input_size``: the position embedding resampled once, as the model would on every call):
ONNX has no anti-aliased bicubic resize, and the table is a constant of the fixed-size graph anyway. So is a
fixed-size ViT with ``dynamic_img_pad`` at a size the patch does not divide (its padded grid is larger than its
table's): the copy's table is resampled once to the padded grid.

Single-file ONNX protobufs are limited to 2 GB: models above about 500M fp32 parameters (CLIP's huge, giant and
gigantic towers, SigLIP's giantopt) are refused with a message instead of failing inside the exporter.
"""
from __future__ import annotations

import copy
import difflib
import io
import json
import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn

from zoo.hub import atomic_write
from zoo.layers import to_pair

__all__ = ["ExportResult", "ExportCheckError", "ExporterError", "export_onnx", "check_onnx", "main", "EXPORTERS"]

EXPORTERS = ("torchscript", "dynamo")
log = logging.getLogger(__name__)
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class ExportCheckError(RuntimeError):
    """onnxruntime's output differs from PyTorch's by more than the tolerance."""


class ExporterError(RuntimeError):
    """torch.onnx.export itself failed on the model (its own error chained as the cause)."""


@dataclass
class ExportResult:
    path: Optional[Path]  # None when exported to memory only
    model_name: str
    input_shape: tuple[int, int, int, int]  # the traced (batch, C, H, W); batch is dynamic in the graph
    exporter: str
    opset: int
    max_abs_diff: Optional[float]  # onnxruntime vs PyTorch (None when check=False)
    onnx_bytes: Optional[bytes] = None  # the serialised model when path is None

    def __str__(self) -> str:
        where = str(self.path) if self.path is not None else "<memory>"
        check = "not checked" if self.max_abs_diff is None else f"onnxruntime max |diff| {self.max_abs_diff:.2e}"
        return f"{self.model_name} -> {where} (input {self.input_shape}, {self.exporter}, opset {self.opset}; {check})"


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def _max_opset(exporter: str) -> int:
    """The newest ONNX opset the chosen exporter of this torch writes (torch.onnx._constants; 20 for TorchScript,
    23 for dynamo in torch 2.11)."""
    from torch.onnx import _constants

    if exporter == "torchscript":
        return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", _constants.ONNX_MAX_OPSET))
    return int(_constants.ONNX_MAX_OPSET)


def _size_pair(value: Union[int, Sequence[int], str, None], name: str = "img_size") -> Optional[tuple[int, int]]:
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.lower().replace("x", ",").split(",")
        try:
            if not all(p.strip() for p in parts):  # "16x", "x16", "16,,16": a side lost, not a square
                raise ValueError
            value = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"{name} must be an int or HxW, got {value!r}") from None
        if len(value) == 1:
            value = value[0]
    return to_pair(value, name)


def _default_cfg(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "pretrained_cfg", None)  # the model's own (its size, its checkpoint's mean/std)
    if isinstance(cfg, dict) and cfg:
        return dict(cfg)
    name = getattr(model, "zoo_model_name", None)
    if not name:
        return {}
    from zoo.registry import get_model_entry

    try:
        return dict(get_model_entry(name).default_cfg)
    except KeyError:
        return {}


def _input_geometry(model: nn.Module, img_size) -> tuple[int, tuple[int, int]]:
    """(in_chans, (H, W)) to export at: argument > the model's ``pretrained_cfg["input_size"]`` (the size its
    checkpoint was trained and evaluated at: zoo.hub ``_trained_input_size`` records a ``zoo train`` run's
    data.img_size there, which need not be the constructor's size for models that take any size) when the model
    runs at it > the model's patch embedding / img_size > the registry's default_cfg."""
    from zoo.features import FeatureExtractor

    if isinstance(model, FeatureExtractor):
        raise ValueError("export_onnx exports classifiers (one logits output and its onnxruntime check); a "
                         "features_only backbone returns a list of maps: export the classifier, or torch.onnx.export "
                         "the backbone with one output name per map")
    cfg = _default_cfg(model)
    in_chans = getattr(model, "in_chans", None)
    if in_chans is None and "input_size" in cfg:
        in_chans = int(cfg["input_size"][0])
    size = _size_pair(img_size)
    if size is None:
        size = _trained_size(model)
    if size is None:
        embed = getattr(model, "patch_embed", None)
        if embed is not None and getattr(embed, "img_size", None) is not None:
            size = _size_pair(tuple(int(v) for v in embed.img_size))
        elif getattr(model, "img_size", None) is not None:
            size = _size_pair(model.img_size)
        elif "input_size" in cfg:
            size = (int(cfg["input_size"][1]), int(cfg["input_size"][2]))
    if size is None or in_chans is None:  # name only what is missing (img_size was asked for when given)
        missing = [fix for fix, value in (("pass img_size=(H, W)", size), ("give the model an in_chans attribute",
                                                                          in_chans)) if value is None]
        raise ValueError(f"cannot tell the (C, H, W) input of {type(model).__name__}: {' and '.join(missing)} (zoo "
                         f"export takes (batch, C, H, W) images)")
    return int(in_chans), size


def _trained_size(model: nn.Module) -> Optional[tuple[int, int]]:
    """The (H, W) of the model's own ``pretrained_cfg["input_size"]`` when it differs from the size it was built at
    and the model runs at it (MaxViT, Agent-DeiT, a dynamic-size ViT trained at data.img_size); None otherwise (the
    built size is then used: for a fixed-size ViT both are the same)."""
    cfg = getattr(model, "pretrained_cfg", None)
    input_size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if not (isinstance(input_size, (tuple, list)) and len(input_size) == 3):
        return None
    size = (int(input_size[1]), int(input_size[2]))
    embed = getattr(model, "patch_embed", None)
    built = getattr(embed, "img_size", None) if embed is not None else getattr(model, "img_size", None)
    if built is not None and _size_pair(tuple(built) if isinstance(built, (tuple, list)) else built) == size:
        return None
    if not _runs_at(model, size):
        log.warning("export: %s's pretrained_cfg says input_size %s, which it does not take; exporting at its built "
                    "size", getattr(model, "zoo_model_name", type(model).__name__), tuple(input_size))
        return None
    log.info("export: %s at %dx%d, the size its checkpoint was trained at (pretrained_cfg input_size; the "
             "constructor's is %s)", getattr(model, "zoo_model_name", type(model).__name__), *size, built)
    return size


def _refuse_other_tasks(name: str, task: Optional[str]) -> None:
    """zoo export handles vision models (an image input, one logits output): a registered model of another task
    (graph, point cloud) is named as such, before the input geometry is asked for, which it does not have."""
    if task and task != "vision":
        raise ValueError(f"zoo export handles vision models; {name!r} is a {task!r} model")


def _resolve_model(model: Union[nn.Module, str], ckpt: Optional[str], create_kwargs: dict[str, Any]) -> nn.Module:
    net = _load_model(model, ckpt, create_kwargs)
    name = getattr(net, "zoo_model_name", None)
    if not isinstance(model, str) and isinstance(name, str) and name:  # an instance or a checkpoint: its registry task
        from zoo.registry import get_model_entry

        try:
            _refuse_other_tasks(name, get_model_entry(name).task)
        except KeyError:  # not registered: judged by its input geometry
            pass
    return net


# the weights files zoo.hub.load_state_dict_file reads without a config (timm's model_best.pth.tar included); a
# .ckpt is a zoo train checkpoint, read with its config
_BARE_WEIGHTS = (".safetensors", ".pth", ".pt", ".bin", ".pth.tar")


def _is_bare_weights(ckpt) -> bool:
    return str(ckpt).endswith(_BARE_WEIGHTS)  # as written, as zoo.hub.load_state_dict_file reads them


def _beside_its_config(path: Path) -> bool:
    """Whether ``path`` is the weights file of a checkpoint directory (``model.safetensors``, or timm's
    ``pytorch_model.bin``) with its config.json beside it: ``zoo.from_pretrained`` reads it as the directory."""
    from zoo.hub import CONFIG_NAME, WEIGHTS_NAME

    return path.name in (WEIGHTS_NAME, "pytorch_model.bin") and (path.parent / CONFIG_NAME).is_file()


def _load_model(model: Union[nn.Module, str], ckpt: Optional[str], create_kwargs: dict[str, Any]) -> nn.Module:
    if isinstance(model, nn.Module):
        if ckpt is not None or create_kwargs:
            raise ValueError("pass either a model instance, or a name / checkpoint with constructor arguments")
        return model
    import zoo

    if ckpt is not None:
        from zoo.train.run import resolve_ckpt_argument

        if model is None:  # a run directory, README's checkpoints/<card> from anywhere (not for a bare weights file)
            ckpt = str(resolve_ckpt_argument(ckpt))
        path = Path(str(ckpt)).expanduser()
        if model is not None:
            if isinstance(model, str) and _is_bare_weights(path):
                if not path.is_file():  # a typo in the path read as "not both", the form the user had typed
                    raise ValueError(f"ckpt={ckpt}: no such weights file")
                # a bare weights file for a registered name, as create_model(pretrained=...)
                return zoo.create_model(model, pretrained=str(path), **create_kwargs)
            raise ValueError("pass model=<name> or ckpt=<dir>, not both (model= goes with a bare weights file: "
                             f"model=<name> ckpt=<file{'|file'.join(_BARE_WEIGHTS)}>)")
        if _is_bare_weights(path) and path.is_file() and _beside_its_config(path):
            return zoo.from_pretrained(path, **create_kwargs)  # a release's own weights file, as from_pretrained
        if _is_bare_weights(path) and path.is_file():  # from_pretrained's hint was a Python call
            raise ValueError(f"ckpt={ckpt} is a bare weights file, without the config that names its model: give the "
                             f"model too, zoo export model=<name> ckpt={ckpt}")
        if path.suffix == ".ckpt":  # a zoo train checkpoint, as zoo eval and zoo predict read it (EMA weights)
            if create_kwargs:
                raise ValueError(f"constructor arguments {sorted(create_kwargs)} do not apply to a training checkpoint "
                                 f"(its model is rebuilt as trained)")
            from zoo.train.run import load_for_inference

            return load_for_inference(path)[0]
        return zoo.from_pretrained(ckpt, **create_kwargs)
    if not isinstance(model, str):
        raise TypeError(f"model must be an nn.Module, a registered name or None with ckpt=, got {type(model).__name__}")
    _refuse_other_tasks(model, zoo.get_model_entry(model).task)  # unknown names raise with close matches
    if "pretrained" not in create_kwargs:  # too large for one file: say so before allocating the weights
        with torch.device("meta"):
            _check_protobuf_size(zoo.create_model(model, **create_kwargs), model)
    return zoo.create_model(model, **create_kwargs)


def check_onnx(
    onnx_model: Union[str, Path, bytes], model: nn.Module, example: torch.Tensor, *, return_scale: bool = False
):
    """Largest |onnxruntime(example) - model(example)| (model in eval mode; onnxruntime fed the example in its own
    dtype, float32 or float16, the model in its weights' dtype).

    With ``return_scale`` also returns max |model(example)|, the output's magnitude (export_onnx allows
    ``atol * max(1, scale)``: fp32 rounding grows with the logits of large randomly initialised models).
    """
    import numpy as np
    import onnxruntime as ort

    source = str(onnx_model) if isinstance(onnx_model, Path) else onnx_model
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    feed = example.detach().cpu()
    feed = feed if feed.dtype == torch.float16 else feed.float()
    (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: feed.numpy()})
    param = next(model.parameters(), None)
    with torch.no_grad():  # the model in its own dtype (a float32 reference for a float16 graph)
        expected = model(example if param is None else example.to(param.dtype)).float().cpu().numpy()
    got = got.astype(np.float32)
    if got.shape != expected.shape:
        raise ExportCheckError(f"onnxruntime output shape {got.shape} != PyTorch output shape {expected.shape}")
    diff = float(np.max(np.abs(got - expected))) if expected.size else 0.0
    if return_scale:
        return diff, (float(np.max(np.abs(expected))) if expected.size else 0.0)
    return diff


def _add_metadata(proto, props: dict[str, str]) -> None:
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def export_onnx(
    model: Union[nn.Module, str, None],
    out: Union[str, Path, None] = None,
    *,
    ckpt: Optional[str] = None,
    img_size: Union[int, Sequence[int], str, None] = None,
    batch_size: int = 1,
    opset: Optional[int] = None,
    exporter: str = "torchscript",
    check: bool = True,
    atol: float = 1e-4,
    seed: int = 0,
    dtype: Optional[str] = None,
    **create_kwargs: Any,
) -> ExportResult:
    """Export a vision model to ONNX (dynamic batch) and check it with onnxruntime.

    The model is exported and checked in eval mode; afterwards, also when the export raises, every submodule is
    back in the train/eval mode it had (a submodule frozen in eval mode while training stays so).

    Args:
        model: an nn.Module, a registered model name (built with ``create_kwargs``), or None with ``ckpt``.
        out: output ``.onnx`` path (parent folders are created); None keeps the bytes in the result.
        ckpt: a checkpoint directory written by :func:`zoo.save_pretrained` or its model.safetensors (instead of
            ``model``), a zoo train ``.ckpt``, or with ``model`` a bare weights file.
        img_size: H or (H, W) to export at; default the size in the model's ``pretrained_cfg`` (its checkpoint's
            trained size) when the model runs at it, else its native size.
        batch_size: batch of the traced example (the graph's batch dimension is dynamic); exporter="dynamo"
            traces 2 when given 1 (torch.export specialises a size-1 dimension to a constant).
        opset: ONNX opset; default 17 for the TorchScript exporter (14 and newer), 18 for dynamo (18 and newer:
            torch's dynamo exporter writes no older opset).
        exporter: "torchscript" (default) or "dynamo" (see module docstring).
        check: run onnxruntime on a fresh input (the traced batch + 1, so the dynamic batch is exercised) and
            compare with PyTorch.
        atol: allowed difference for the check, relative to max(1, largest |output|).
        dtype: "float32" or "float16" to export a converted copy (the model is left as it is); default the
            model's own (float32 or float16: see the module docstring).
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    max_opset = _max_opset(exporter)
    min_opset = 18 if exporter == "dynamo" else 14  # dynamo: it wrote opset 18 when asked for 14-17, and said 14-17
    if opset is None:
        opset = max(17, min_opset)
    if not isinstance(opset, int) or isinstance(opset, bool) or not min_opset <= opset <= max_opset:
        why = ("the oldest the dynamo exporter writes; exporter=torchscript writes 14-17" if exporter == "dynamo"
               else "attention needs it")
        raise ValueError(f"opset must be an int from {min_opset} ({why}) to {max_opset} (the newest the "
                         f"{exporter} exporter of this torch writes), got {opset!r}")
    if not isinstance(check, bool):
        raise TypeError(f"check must be True or False, got {check!r}")
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not 0 < atol < math.inf:
        raise ValueError(f"atol must be a positive finite number, got {atol!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if dtype is not None and dtype not in _EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_EXPORT_DTYPES)} (or None: the model's own), got {dtype!r}")
    if out is not None and Path(out).suffix.lower() != ".onnx":
        raise ValueError(f"output file must end in .onnx, got {str(out)!r}")
    if out is not None and Path(out).is_dir():
        raise ValueError(f"output {str(out)!r} is a directory; pass a file path ending in .onnx")
    if out is not None:
        from zoo.hub import writable_output

        writable_output(out)  # before the export and its check, which take a while
    net = None
    if ckpt is not None and img_size is not None and "img_size" not in create_kwargs:
        # A checkpoint at another size: the network it is, run at that size, when it runs there (MaxViT and
        # Agent-DeiT take any size; so does a dynamic-size ViT). Rebuilt at that size it would be another network
        # (MaxViT's windows follow img_size // 32: 3 x 1 at 97 x 61, 0.035-0.54 from the checkpoint's logits).
        net = _resolve_model(model, ckpt, create_kwargs)
        if not _runs_at(net, _size_pair(img_size)):
            if Path(str(ckpt)).suffix == ".ckpt":  # rebuilt only as trained (see _resolve_model)
                raise ValueError(f"{ckpt}: the model does not run at {_size_pair(img_size)} as trained, and a training "
                                 f"checkpoint is exported as trained; export its released/ directory at that size "
                                 f"(ckpt=<run_dir>/released img_size=...), which resamples the weights")
            net = None  # a fixed-size model: rebuilt at that size, its weights resampled as for fine-tuning
            log.info("export: %s does not run at %s as saved; building it at that size (weights resampled)", ckpt,
                     _size_pair(img_size))
    if net is None:
        if (isinstance(model, str) or ckpt is not None) and img_size is not None and "img_size" not in create_kwargs:
            create_kwargs = {**create_kwargs, "img_size": list(_size_pair(img_size))}
        net = _resolve_model(model, ckpt, create_kwargs)
    name = getattr(net, "zoo_model_name", None) or (model if isinstance(model, str) else type(net).__name__)
    in_chans, (height, width) = _input_geometry(net, img_size)
    _check_protobuf_size(net, name)
    model_args = dict(getattr(net, "zoo_model_args", {}) or {})  # the model's own, not its export copy's
    net = _fixed_size_copy(net, (height, width))
    float32_reference = None  # the float32 model a float16 graph is checked against
    if dtype is not None and _export_dtype(net, name, check=False) != _EXPORT_DTYPES[dtype]:
        if dtype == "float16" and _export_dtype(net, name, check=False) == torch.float32:
            float32_reference = copy.deepcopy(net)  # the user's weights, not their float16 rounding
        net = copy.deepcopy(net).to(_EXPORT_DTYPES[dtype])
    gen = torch.Generator().manual_seed(seed)
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = _export_dtype(net, name)
    traced_batch = 2 if exporter == "dynamo" and batch_size == 1 else batch_size  # see batch_size above
    example = torch.randn(traced_batch, in_chans, height, width, generator=gen).to(device, dtype)

    modes = _training_modes(net)
    net.eval()
    try:
        with torch.no_grad():
            try:
                net(example)
            except (ValueError, TypeError) as error:
                raise ValueError(f"{name} cannot run on a {tuple(example.shape)} input: {error}") from error
            out_shape = tuple(net(example).shape)
            proto = _export_proto(net, example, exporter, opset)
        _declare_static_output_dims(proto, out_shape)
        cfg = _default_cfg(net)
        _add_metadata(proto, {
            "zoo_model_name": str(name),
            "zoo_model_args": json.dumps(model_args, default=str),
            "input_size": json.dumps([in_chans, height, width]),
            "mean": json.dumps(list(cfg.get("mean", ()))),
            "std": json.dumps(list(cfg.get("std", ()))),
            "exporter": exporter,
            "dtype": str(dtype).replace("torch.", ""),
        })
        data = proto.SerializeToString()
        path = None if out is None else Path(out)
        diff = None
        if check:  # before anything is written: a failing export never replaces a good file at `out`
            probe = torch.randn(traced_batch + 1, in_chans, height, width, generator=gen).to(device)
            if dtype == torch.float16:  # against the float32 model, allowing twice PyTorch's own float16 error
                reference = float32_reference if float32_reference is not None else copy.deepcopy(net).float()
                reference.eval()
                diff, scale = check_onnx(data, reference, probe.half(), return_scale=True)
                with torch.no_grad():
                    own_error = float((net(probe.half()).float() - reference(probe)).abs().max())
                allowed = 2 * own_error + atol * max(1.0, scale)
                bound = f"2 x PyTorch's float16 error {own_error:.3g} + atol {atol} x max(1, max |logit| = {scale:.3g})"
            else:
                diff, scale = check_onnx(data, net, probe, return_scale=True)
                allowed = atol * max(1.0, scale)
                bound = f"atol {atol} x max(1, max |logit| = {scale:.3g})"
            if not diff <= allowed:
                rejected = None if path is None else path.with_name(path.stem + ".rejected" + path.suffix)
                if rejected is not None:
                    atomic_write(rejected, lambda tmp: Path(tmp).write_bytes(data))
                raise ExportCheckError(
                    f"{name}: onnxruntime output differs from PyTorch by {diff:.3g} (> {bound}); nothing was "
                    f"written to {path}"
                    + (f"; the rejected model is {rejected}, for inspection" if rejected else "")
                )
        if path is not None:
            atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    finally:
        _restore_training_modes(modes)
    return ExportResult(path, str(name), tuple(example.shape), exporter, opset, diff,
                        None if path is not None else data)


_EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _export_dtype(net: nn.Module, name: str, check: bool = True) -> Optional[torch.dtype]:
    """The dtype of the exported graph: the model's floating weights', float32 or float16 (else refused, or None
    with ``check=False``)."""
    dtypes = {t.dtype for t in list(net.parameters()) + list(net.buffers()) if t.is_floating_point()}
    if not dtypes or dtypes == {torch.float32}:
        return torch.float32
    if dtypes == {torch.float16}:
        return torch.float16
    if not check:
        return None
    found = "/".join(sorted(str(d).replace("torch.", "") for d in dtypes))
    if dtypes <= set(_EXPORT_DTYPES.values()):
        why = "a graph has one float dtype"
    else:
        why = "onnxruntime's CPU provider runs no bfloat16 / float64 convolution here"
    raise ValueError(f"{name} has {found} weights: export_onnx writes float32 or float16 graphs ({why}); call "
                     f"model.float() or model.half() first, or give dtype=\"float32\" / \"float16\"")


def _declare_static_output_dims(proto, out_shape: tuple) -> None:
    """Write the known sizes of the output's non-batch axes into the graph's declared output shape. The TorchScript
    exporter leaves some symbolic (a headless ViT's pooled features came out as (batch, "Gatherlogits_dim_1")), which
    engine builders and converters that read the signature without running shape inference take as dynamic."""
    for output in proto.graph.output:
        dims = output.type.tensor_type.shape.dim
        if output.name != OUTPUT_NAME or len(dims) != len(out_shape):
            continue
        for axis in range(1, len(out_shape)):  # axis 0 is the dynamic batch
            if dims[axis].dim_param or not dims[axis].dim_value:
                dims[axis].dim_value = int(out_shape[axis])  # assigning the value clears dim_param (a oneof)


# protobuf's hard limit for one message (2 GiB), less room for the graph itself
_PROTOBUF_LIMIT_BYTES = 2**31 - 2**24


def _check_protobuf_size(net: nn.Module, name: str) -> None:
    weight_bytes = sum(t.numel() * 4 for t in list(net.parameters()) + list(net.buffers()) if t.is_floating_point())
    if weight_bytes > _PROTOBUF_LIMIT_BYTES:
        raise ValueError(
            f"{name} has {weight_bytes / 2**30:.2f} GiB of fp32 weights, over the 2 GiB a single ONNX file holds; "
            f"export it with torch.onnx.export(..., external_data=True) (weights beside the graph) or a smaller depth"
        )


def _runs_at(net: nn.Module, size: tuple[int, int]) -> bool:
    """Whether ``net`` takes a (1, C, H, W) input of this size as it is (one forward on zeros, eval mode)."""
    in_chans, _ = _input_geometry(net, size)
    param = next(net.parameters(), None)
    probe = torch.zeros(1, in_chans, *size, device=param.device if param is not None else "cpu",
                        dtype=param.dtype if param is not None else torch.float32)
    modes = _training_modes(net)
    try:
        with torch.no_grad():
            net.eval()(probe)
        return True
    except (ValueError, TypeError):
        return False
    finally:
        _restore_training_modes(modes)


def _training_modes(net: nn.Module) -> dict[nn.Module, bool]:
    """The train/eval flag of every submodule: ``net.train(flag)`` after an export would unfreeze a submodule the
    caller had put in eval mode (a frozen stem or BatchNorm while fine-tuning)."""
    return {module: module.training for module in net.modules()}


def _restore_training_modes(modes: dict[nn.Module, bool]) -> None:
    for module, training in modes.items():
        module.training = training


def _fixed_size_copy(net: nn.Module, size: tuple[int, int]) -> nn.Module:
    """A copy of a ViT whose graph would resample its position embedding on every call, set so that it does not
    (the table resampled once, outside the graph, by the model's own ``set_input_size``: the same function the
    forward calls, so the outputs are the same), else the model itself. ONNX has no anti-aliased bicubic resize,
    and the table is a constant of a fixed-size graph anyway. Two cases:

    * a ``dynamic_img_size`` ViT exported at another size than its own: the copy's native size is that one;
    * a fixed-size ViT with ``dynamic_img_pad`` whose size the patch does not divide (tasks/vision/vit.py: its
      padded grid is one row / column larger than its position embedding's, resampled on every call): the copy's
      native size is the padded one, and it takes the unpadded images as a dynamic-size model padding them does.
    """
    embed = getattr(net, "patch_embed", None)
    if embed is None or not hasattr(net, "set_input_size") or not hasattr(net, "dynamic_img_size"):
        return net
    padded = bool(getattr(embed, "dynamic_img_pad", False))
    if not net.dynamic_img_size and not padded:
        return net
    if padded:  # the graph sees the padded grid
        size = tuple(-(-s // p) * p for s, p in zip(size, embed.patch_size))
    if tuple(embed.img_size) == tuple(size):
        return net
    fixed = copy.deepcopy(net)
    if not fixed.dynamic_img_size:  # a fixed size the patch does not divide: the copy pads it to whole patches
        fixed.dynamic_img_size = True
    fixed.set_input_size(size)
    return fixed


def _export_proto(net: nn.Module, example: torch.Tensor, exporter: str, opset: int):
    try:
        return _run_exporter(net, example, exporter, opset)
    except Exception as error:
        if os.environ.get("ZOO_DEBUG"):
            raise
        other = "torchscript" if exporter == "dynamo" else "dynamo"
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ExporterError(f"the {exporter} exporter failed on {type(net).__name__} ({type(error).__name__}: "
                            f"{first[:300]}); exporter={other} may work (ZOO_DEBUG=1 shows the traceback)") from error


def _run_exporter(net: nn.Module, example: torch.Tensor, exporter: str, opset: int):
    import onnx

    if exporter == "dynamo":  # (export_onnx traces batch 2 or more here: a batch of 1 would be specialised)
        forward_arg = next(iter(__import__("inspect").signature(net.forward).parameters))
        program = torch.onnx.export(
            net, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes={forward_arg: {0: torch.export.Dim("batch")}}, opset_version=opset,
            verbose=False,
        )
        return program.model_proto
    from zoo.attention import use_backend

    buffer = io.BytesIO()
    with use_backend("torch"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values taken as constants (shapes)
        torch.onnx.export(
            net, (example,), buffer, dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=opset,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buffer.getvalue())


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
_HELP = __doc__.split("\n\n")[0] if __doc__ else ""


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


_EXPORT_KEYS = ("model", "ckpt", "out", "img_size", "batch", "opset", "exporter", "check", "atol", "dtype")
_FLAGS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def main(argv: Optional[list[str]] = None) -> int:
    """``zoo export key=value ...``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or any(a in ("-h", "--help", "help") for a in argv):
        stream = sys.stdout if argv else sys.stderr  # no arguments is a usage error (exit 2), as zoo viz / bench
        print(_HELP, file=stream)
        print("\nkeys: model, ckpt, out, img_size, batch, opset, exporter, check, atol, dtype (float32 | float16); "
              "any other key=value is a constructor argument of the model (e.g. num_classes=10)", file=stream)
        return 0 if argv else 2
    options: dict[str, Any] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("-").replace("-", "_")
        if not sep or not key:
            print(f"zoo export: arguments are key=value, got {arg!r} (see zoo export --help)", file=sys.stderr)
            return 2
        options[key] = value
    model, ckpt = options.pop("model", None), options.pop("ckpt", None)
    bare_weights = model is not None and ckpt is not None and _is_bare_weights(ckpt)
    if model is not None and ckpt is not None and not bare_weights:
        print(f"zoo export: ckpt={ckpt} names its model itself (its config.json, or the .ckpt's hyper-parameters): "
              f"leave model={model} out, or give model= with a bare weights file (model=<name> "
              f"ckpt=<file.safetensors>)", file=sys.stderr)
        return 2
    if model is None and ckpt is None:
        print("zoo export: give model=<name>, ckpt=<released dir | .ckpt>, or both for a bare weights file "
              "(model=<name> ckpt=<file.safetensors>)", file=sys.stderr)
        return 2
    out = options.pop("out", None) or f"{model or Path(ckpt).stem}.onnx"
    kwargs: dict[str, Any] = {}
    try:
        for key in options:  # a misspelt export key would otherwise reach the model's constructor
            close = difflib.get_close_matches(key, _EXPORT_KEYS, n=1, cutoff=0.75)
            if close and key not in _EXPORT_KEYS:
                raise ValueError(f"unknown key {key!r}: did you mean {close[0]!r}? (keys: {', '.join(_EXPORT_KEYS)}; "
                                 f"other keys are constructor arguments of the model)")
        if "img_size" in options:
            kwargs["img_size"] = _size_pair(options.pop("img_size"))
        for key, name, kind in (("batch", "batch_size", int), ("opset", "opset", int), ("atol", "atol", float)):
            if key in options:
                text = options.pop(key)
                try:
                    kwargs[name] = kind(text)
                except ValueError:
                    raise ValueError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        for key in ("exporter", "dtype"):
            if key in options:
                kwargs[key] = options.pop(key)
        if "check" in options:
            text = options.pop("check")
            if text.lower() not in _FLAGS:  # bool("no") is True
                raise ValueError(f"check must be true or false (yes/no, on/off, 1/0), got {text!r}")
            kwargs["check"] = _FLAGS[text.lower()]
        create_kwargs = {k: _parse_value(v) for k, v in options.items()}
        result = export_onnx(model, out, ckpt=ckpt, **kwargs, **create_kwargs)
    except (ValueError, TypeError, KeyError, FileNotFoundError, ExportCheckError, ExporterError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"zoo export: error: {message}", file=sys.stderr)
        return 1
    print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
