"""Helpers shared by the ``zoo viz <kind>`` commands: key=value parsing, PNG paths, atomic figure writes,
the prediction title. Matplotlib is imported lazily (Agg backend), so importing this module is cheap.
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["parse_key_values", "png_path", "pyplot", "save_figure", "prediction_title", "prediction_summary",
           "run_viz_command", "evaluation_mode", "patch_heat_on_image"]


def parse_key_values(argv: Sequence[str], keys: Iterable[str]) -> dict[str, str]:
    """``["ckpt=run/", "out=a.png"]`` -> ``{"ckpt": "run/", "out": "a.png"}``.

    Leading dashes are dropped and inner dashes read as underscores (``--head-fusion=max`` works); an
    argument without ``=`` or a key outside ``keys`` raises ValueError naming it and the accepted keys.
    """
    accepted = tuple(keys)
    args: dict[str, str] = {}
    for token in argv:
        if "=" not in token:
            raise ValueError(f"argument {token!r} is not key=value")
        key, value = token.split("=", 1)
        key = key.lstrip("-").replace("-", "_")
        if key not in accepted:
            raise ValueError(f"unknown argument {key!r}; accepted: {', '.join(accepted)}")
        args[key] = value
    return args


def int_arg(args: dict[str, str], key: str, default: Optional[int]) -> Optional[int]:
    """The integer value of option ``key`` (``default`` when absent or "mean"), or a ValueError naming it."""
    value = args.get(key)
    if value is None or value == "mean":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{key}={value!r} is not an integer") from None


def device_arg(args: dict[str, str]) -> torch.device:
    """``device=`` of a viz command (default cpu) as a torch.device that exists here; a ValueError naming the
    problem otherwise (torch's RuntimeError for "foo", or "cuda" without a GPU, surfaced as a traceback)."""
    text = args.get("device", "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"device={text!r} is not a device (cpu, cuda, cuda:0, mps, ...)") from None
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device={text}: no such CUDA device here ({torch.cuda.device_count()} visible)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device={text}: MPS is not available here")
    return device


def png_path(out: str) -> Path:
    """The output path, checked to end in .png, not to be a directory and to be writable, with its folder created.
    The ``zoo viz`` commands call it before any work (an existing folder out=pics.png used to fail only after the
    picture was computed, with "[Errno 21] Is a directory")."""
    from zoo.hub import writable_output

    if Path(out).suffix.lower() != ".png":
        raise ValueError(f"out={out!r}: the picture is written as PNG; use a .png file name")
    if Path(out).expanduser().is_dir():
        raise ValueError(f"out={out!r} is an existing directory; give a .png file name (e.g. out={Path(out) / 'picture.png'})")
    return writable_output(out)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` atomically (a temporary file renamed over it) and close the figure; the temporary
    file is removed when writing or renaming fails (e.g. ``path`` became a directory), not left beside ``path``."""
    tmp = path.with_name(path.name + ".tmp.png")
    try:
        try:
            fig.savefig(tmp, dpi=dpi)
        finally:
            pyplot().close(fig)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block (BatchNorm's running statistics, no dropout / drop-path: the picture
    of what the model predicts, the same on every call), its own train/eval mode restored afterwards, also on an
    error, so drawing a picture of a model in training does not change how it trains."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def patch_heat_on_image(heat_GhGw: np.ndarray, patch_size: Optional[Sequence[int]], image_hw: Sequence[int]) -> np.ndarray:
    """Per-patch values (Gh, Gw) -> per-pixel values (h, w) of the image the patches were cut from.

    Patch (i, j) covers pixels [i*ph, (i+1)*ph) x [j*pw, (j+1)*pw) from the top-left corner, so the grid is
    upsampled (bilinear) to (Gh*ph, Gw*pw) and then cropped to the image where the patches reach past it (the image
    zero-padded on the right / bottom to whole patches, timm's ``dynamic_img_pad``) or padded with NaN where no
    patch covers the image (a remainder dropped, ``drop_img_remainder``; matplotlib draws NaN transparent).
    Stretching the grid over the image instead moved the attention of the last patches by up to a patch.
    ``patch_size`` None: the grid covers the image exactly.
    """
    heat = torch.as_tensor(np.asarray(heat_GhGw, dtype=np.float64))
    h, w = (int(v) for v in image_hw)
    gh, gw = heat.shape
    ph, pw = (h / gh, w / gw) if patch_size is None else (int(v) for v in patch_size)
    covered = (round(gh * ph), round(gw * pw))
    full = F.interpolate(heat[None, None], size=covered, mode="bilinear", align_corners=False)[0, 0].numpy()
    out = np.full((h, w), np.nan)
    rows, cols = min(h, covered[0]), min(w, covered[1])
    out[:rows, :cols] = full[:rows, :cols]
    return out


def prediction_title(logits_1K: torch.Tensor, label: Optional[int] = None,
                     class_names: Optional[Sequence[str]] = None) -> tuple[str, int, float]:
    """("predicted class 3 (p=0.97), true class 3", 3, 0.97) from one image's logits (1, K) or (K,); with the
    model's ``class_names`` the class is named ("predicted odd (class 1, p=0.52)"), as zoo predict names it."""
    probs = logits_1K.detach().float().reshape(-1, logits_1K.shape[-1])[0].softmax(dim=-1)
    pred = int(probs.argmax())
    prob = float(probs[pred])
    name = _class_name(pred, class_names)
    title = f"predicted class {pred} (p={prob:.2f})" if name is None else f"predicted {name} (class {pred}, p={prob:.2f})"
    if label is not None:
        title += f", true class {label}"
    return title, pred, prob


def _class_name(index: int, class_names: Optional[Sequence[str]]) -> Optional[str]:
    """Class ``index``'s name when the model has names other than its indices, else None."""
    if not class_names or index >= len(class_names) or str(class_names[index]) == str(index):
        return None
    return str(class_names[index])


def prediction_summary(path: Path, pred: int, prob: float, label: Optional[int], class_names: Optional[Sequence[str]] = None,
                       **extra: Any) -> dict:
    """The JSON line a viz command prints: out, predicted (and its class name, when the model has names),
    probability, any ``extra`` keys, then label."""
    summary: dict = {"out": str(path), "predicted": pred}
    name = _class_name(pred, class_names)
    if name is not None:
        summary["class_name"] = name
    summary.update({"probability": round(prob, 4), **extra})
    if label is not None:
        summary["label"] = label
    return summary


def run_viz_command(
    kind: str,
    usage: str,
    argv: Optional[Sequence[str]],
    draw: Callable[[list[str]], dict],
    errors: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, TypeError),
) -> int:
    """The protocol shared by ``zoo viz <kind>``: -h/--help/help prints ``usage``; ``draw(argv)`` writes the
    picture and returns the summary printed as one JSON line (exit 0); an error of a type in ``errors`` is
    printed as ``zoo viz <kind>: error: ...`` followed by the usage (exit 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(usage)
        return 0
    try:
        summary = draw(argv)
    except errors as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error  # KeyError quotes
        print(f"zoo viz {kind}: error: {message}", file=sys.stderr)
        print(usage, file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0
