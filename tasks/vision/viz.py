"""Attention rollout pictures for ViT-style classifiers (``zoo viz rollout``).

Attention rollout: Abnar & Zuidema, "Quantifying Attention Flow in Transformers" (ACL 2020,
arXiv:2005.00928). Per layer l the head-averaged attention W_l (N x N) is mixed with the identity to
account for the residual connection and renormalised, A_l = rownorm(W_l + I) (= 0.5 W_l + 0.5 I, rows of W
sum to 1); the rollout of L layers is the product A_L ... A_2 A_1. The class token's row of the rollout,
restricted to the patch tokens and reshaped to the patch grid, is the picture (for models without a class
token, the mean of the patch tokens' rows). ``discard_ratio`` (jacobgil/vit-explain, vit_rollout.py) first zeroes
that fraction of each layer's smallest fused weights, which sharpens the picture.

The attention weights come from :func:`zoo.attention.capture_attention` (one record per
MultiHeadAttention call, in call order), so any model built from zoo attention modules works.

    zoo viz rollout ckpt=<dir|model.safetensors|run.ckpt> [image=<file>|digits:<index>] [out=rollout.png]
                    [model=<registered name>] [head_fusion=mean|max|min] [discard_ratio=0] [device=cpu]

Letters: B batch, H heads, N tokens, P prefix tokens, Gh/Gw patch grid.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.attention import capture_attention
from zoo.layers import check_rates
from zoo.plotting import (
    device_arg,
    evaluation_mode,
    parse_key_values,
    patch_heat_on_image,
    png_path,
    prediction_summary,
    prediction_title,
    pyplot,
    run_viz_command,
    save_figure,
)

__all__ = [
    "attention_rollout",
    "rollout_map",
    "compute_rollout",
    "load_model",
    "load_model_and_transform",
    "load_image",
    "save_rollout_png",
    "rollout_main",
]

HEAD_FUSIONS = ("mean", "max", "min")


# --------------------------------------------------------------------------------------------------
# Rollout
# --------------------------------------------------------------------------------------------------
def _checked_discard_ratio(value) -> float:
    """``value`` (a real number: Python, NumPy or a one-element tensor, or its text from the command line) as a
    float in [0, 1), else a ValueError."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass  # refused below as the text it is
    elif isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        number = value.item()
    check_rates(discard_ratio=number)
    return float(number)


def attention_rollout(attentions: Sequence[torch.Tensor], head_fusion: str = "mean", add_residual: bool = True,
                      discard_ratio: float = 0.0) -> torch.Tensor:
    """Roll attention out through the layers.

    Args:
        attentions: per layer, in forward order, attention probabilities (B, H, N, N).
        head_fusion: how heads are combined: "mean" (the paper), "max" or "min".
        add_residual: add the identity and renormalise rows (the paper's residual correction).
        discard_ratio: in [0, 1): per layer and image, the fused weights among the int(N * N * ratio) smallest
            are set to 0 before the residual and the renormalisation, except entry (0, 0) (the class token's
            attention to itself; the first token's in a model without one), as jacobgil/vit-explain's
            vit_rollout.py does; 0 (default) keeps every weight. Weights tied at the cut-off are dropped in
            ``topk``'s order (arbitrary, as there): a map of exactly uniform attention gives no meaningful
            picture with a ratio. Unlike that code, every image of the batch is filtered (it zeroes image 0's
            entries only) and rows are renormalised over the keys.

    Returns:
        (B, N, N) float64: row i is how much each input token flows into output token i.
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    discard_ratio = _checked_discard_ratio(discard_ratio)
    if not attentions:
        raise ValueError("no attention maps to roll out (was the model built from zoo attention modules?)")
    first = attentions[0]
    if first.dim() != 4 or first.shape[-1] != first.shape[-2]:
        raise ValueError(f"attention maps must be square (B, H, N, N), got {tuple(first.shape)}")
    batch, _, n, _ = first.shape
    eye = torch.eye(n, dtype=torch.float64, device=first.device)
    result = eye.expand(batch, n, n)
    for layer, weights in enumerate(attentions):
        if weights.shape[0] != batch or weights.shape[-2:] != (n, n):
            raise ValueError(f"layer {layer}: attention of shape {tuple(weights.shape)} does not match (B={batch}, N={n})")
        w = weights.detach().to(torch.float64)
        if head_fusion == "mean":
            a = w.mean(dim=1)
        elif head_fusion == "max":
            a = w.amax(dim=1)
        else:
            a = w.amin(dim=1)
        discard = int(n * n * discard_ratio)
        if discard:
            flat_BM = a.reshape(batch, n * n).clone()
            smallest_BK = flat_BM.topk(discard, dim=-1, largest=False).indices
            flat_BM.scatter_(-1, smallest_BK, 0.0)
            flat_BM[:, 0] = a[:, 0, 0]  # the class token's attention to itself is kept
            a = flat_BM.view(batch, n, n)
        if add_residual:
            a = a + eye
        a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        result = a @ result
    return result


def rollout_map(rollout_BNN: torch.Tensor, num_prefix_tokens: int, grid: tuple[int, int], has_class_token: bool = True) -> torch.Tensor:
    """(B, Gh, Gw) map over the patches: the class token's rollout row (else the mean of the patch rows)."""
    patches = rollout_BNN[:, :, num_prefix_tokens:]
    if patches.shape[-1] != grid[0] * grid[1]:
        raise ValueError(f"{patches.shape[-1]} patch tokens do not fill a {grid[0]}x{grid[1]} grid")
    rows = patches[:, 0] if has_class_token else patches[:, num_prefix_tokens:].mean(dim=1)
    return rows.reshape(-1, grid[0], grid[1])


@torch.no_grad()
def compute_rollout(model: nn.Module, images_BCHW: torch.Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0):
    """Run ``model`` on images, capture its attention and return (logits (B, K), rollout maps (B, Gh, Gw)).

    The model runs in eval mode (what it predicts); its train/eval mode is restored afterwards."""
    embed = getattr(model, "patch_embed", None)
    if embed is None or not hasattr(embed, "patch_size"):  # MaxViT attends inside windows and grids
        raise ValueError(f"attention rollout follows one token sequence through a transformer (ViT, DeiT, Agent-DeiT); "
                         f"{type(model).__name__} has no patch embedding of one such sequence (for MaxViT, zoo viz "
                         f"maxvit draws its window and grid attention)")
    with evaluation_mode(model), capture_attention(model) as records:
        logits = model(images_BCHW)
    if not records:
        raise ValueError(f"{type(model).__name__} recorded no attention maps; it must use zoo.attention modules")
    rollout = attention_rollout([r.weights for r in records], head_fusion=head_fusion, discard_ratio=discard_ratio)
    (ph, pw), height, width = embed.patch_size, images_BCHW.shape[-2], images_BCHW.shape[-1]
    if getattr(embed, "dynamic_img_pad", False):  # padded to whole patches: the grid rounds up
        grid = (-(-height // ph), -(-width // pw))
    else:
        grid = (height // ph, width // pw)
    maps = rollout_map(rollout, getattr(model, "num_prefix_tokens", 1), grid, getattr(model, "has_class_token", True))
    return logits, maps


# --------------------------------------------------------------------------------------------------
# Loading a model and an image
# --------------------------------------------------------------------------------------------------
def _import_vision_models() -> None:
    importlib.import_module("zoo.tasks.vision.vit")  # registers the ViT names


def _find_model_spec(hparams: Any) -> Optional[tuple[str, dict]]:
    """Search Lightning hyper-parameters for a registered model name and its constructor arguments."""
    import zoo

    if isinstance(hparams, dict):
        for key in ("model_name", "name", "model"):
            value = hparams.get(key)
            if isinstance(value, str) and zoo.is_model(value):
                args = hparams.get("model_args") or hparams.get("model_kwargs") or {
                    k: v for k, v in hparams.items() if k not in ("model_name", "name", "model", "_target_", "pretrained")
                }
                return value, dict(args) if isinstance(args, dict) else {}
        for value in hparams.values():
            found = _find_model_spec(value)
            if found is not None:
                return found
    return None


def _load_lightning_ckpt(path: Path, model_name: Optional[str]) -> nn.Module:
    import zoo

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt file, or one that needs unpickling of arbitrary objects
        raise ValueError(f"cannot read Lightning checkpoint {path}: {error}") from error
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path} has no 'state_dict'; is it a Lightning .ckpt?")
    from zoo.hub import apply_training_preprocessing, lightning_model_weights

    weights = lightning_model_weights(state)  # the EMA average when zoo train kept one, else the raw weights
    if weights is not None:
        state = weights
    elif state and all(k.startswith("net.") for k in state):
        state = {k[len("net."):]: v for k, v in state.items()}
    spec = (model_name, {}) if model_name else _find_model_spec(ckpt.get("hyper_parameters", {}))
    if spec is None:
        raise ValueError(f"{path}: cannot tell which model this checkpoint holds; pass model=<registered name>")
    name, args = spec
    model = zoo.create_model(name, **args)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path}: weights do not fit {name} {args}: {error}") from error
    data_info = (ckpt.get("hyper_parameters") or {}).get("data_info")
    model = apply_training_preprocessing(model, data_info)
    model.zoo_class_names = list((data_info or {}).get("class_names") or [])  # type: ignore[attr-defined]
    return model


def load_model(ckpt: str, model_name: Optional[str] = None) -> nn.Module:
    """A model from a released directory / .safetensors file (zoo.from_pretrained) or a Lightning .ckpt."""
    import zoo

    from zoo.train.run import resolve_ckpt_argument

    _import_vision_models()
    path = Path(resolve_ckpt_argument(ckpt))  # a run directory, README's checkpoints/<card> from anywhere
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".ckpt":
        return _load_lightning_ckpt(path, model_name)
    if model_name is not None:
        return zoo.create_model(model_name, pretrained=str(path))
    return zoo.from_pretrained(str(path))


def load_model_and_transform(ckpt: str, model_name: Optional[str] = None) -> tuple[nn.Module, Optional[Callable]]:
    """(model, image transform) as ``zoo predict`` loads and preprocesses ``ckpt``.

    A released folder without a ``zoo train`` record (``zoo.save_pretrained`` from the user's own pipeline, timm's
    Hub files) is preprocessed by timm's evaluation transform of its ``pretrained_cfg`` (crop_pct, interpolation):
    zoo predict's ``load_for_inference`` / ``_released_without_run`` (zoo/train/run.py), whose model is used here.
    Otherwise (a .ckpt, a zoo train release, ``model=`` given) the transform is None: :func:`load_image` then
    preprocesses as the evaluation split does, as zoo predict does for those.
    """
    from zoo.train.run import resolve_ckpt_argument

    ckpt = str(resolve_ckpt_argument(ckpt))
    if model_name is None and Path(ckpt).exists() and Path(ckpt).suffix != ".ckpt":
        from zoo.train.run import _released_without_run, released_eval_transform

        _import_vision_models()
        released = _released_without_run(ckpt)
        if released is not None:
            model, info = released
            model.zoo_class_names = list(info.get("class_names") or [])  # as zoo predict names them
            return model, released_eval_transform(info["data_config"])  # the transform zoo predict builds
    return load_model(ckpt, model_name), None


def image_classes(model: nn.Module, label: Optional[int]) -> tuple[Optional[int], list[str]]:
    """(the label to show, the model's class names) for a picture's title and summary, as zoo predict decides them:
    a digits:N image's label only for a model whose classes are the ten digits (a model of other classes has no
    such class to compare with), and the class names the run recorded (a .ckpt's data record, a released folder's
    config.json, timm's ImageNet names for its exports)."""
    names = getattr(model, "zoo_class_names", None)
    if names is None:
        metadata = getattr(model, "zoo_pretrained_metadata", None) or {}
        names = (metadata.get("data") or {}).get("class_names") if isinstance(metadata.get("data"), dict) else None
    names = [str(name) for name in (names or [])]
    digits_model = names == [str(i) for i in range(10)] or (not names and getattr(model, "num_classes", None) == 10)
    return (label if digits_model else None), names


def _model_cfg(model: nn.Module) -> dict:
    """Preprocessing facts of the model: mean, std and the evaluation resize/crop (crop_pct, crop_mode,
    interpolation) of its pretrained_cfg (a released run's or a .ckpt's record, see zoo.hub), else the registry's."""
    import zoo

    cfg: dict = {}
    name = getattr(model, "zoo_model_name", None)
    if name is not None and zoo.is_model(name):
        cfg.update(zoo.get_model_entry(name).default_cfg)
    cfg.update(getattr(model, "pretrained_cfg", None) or {})
    chans = model.in_chans
    mean = tuple(cfg.get("mean", (0.5,) * chans))
    std = tuple(cfg.get("std", (0.5,) * chans))
    if len(mean) != chans:
        mean, std = (float(np.mean(mean)),) * chans, (float(np.mean(std)),) * chans
    crop = {key: cfg[key] for key in ("crop_pct", "crop_mode", "interpolation") if key in cfg}
    return {"mean": mean, "std": std, **crop}


def load_image(spec: str, model: nn.Module, transform: Optional[Callable] = None) -> tuple[torch.Tensor, np.ndarray, Optional[int]]:
    """Image ``spec`` ("digits:<index>" or a file) -> (normalised (1, C, H, W) input, display image in [0, 1], label).

    Preprocessed as ``zoo predict`` preprocesses it. Without ``transform``: the 8x8 digits are upsampled (bilinear)
    to the model's native image size; a file is read and preprocessed as the evaluation split does
    (``load_image_file``: short side resized, centre crop); both normalised with the model's mean/std (a .ckpt's: the
    run's, see ``load_model``). With ``transform`` (timm's evaluation transform, from
    :func:`load_model_and_transform` for a released folder without a zoo train record) the file, or the digit as an
    8-bit picture, goes through it, as zoo predict does. Any zoo vision model (ViT and Agent-DeiT: its patch
    embedding's size; MaxViT: ``img_size``).
    """
    if not (hasattr(model, "patch_embed") or hasattr(model, "img_size")) or not hasattr(model, "in_chans"):
        name = getattr(model, "zoo_model_name", type(model).__name__)
        raise ValueError(f"{name} is not an image model (ViT, MaxViT or Agent-DeiT): these pictures are drawn from "
                         f"images (zoo viz graph draws graph attention)")
    height, width = model.patch_embed.img_size if hasattr(model, "patch_embed") else model.img_size
    chans = model.in_chans
    cfg = _model_cfg(model)
    mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, -1, 1, 1)
    from zoo.train.run import _digits_image, _eval_crop

    crop = _eval_crop(cfg)  # the model's record, as zoo predict reads a run's (defaults: no crop, bilinear)
    if height != width or crop["crop_mode"] not in ("center", "squash") or crop["interpolation"] not in (
            "bilinear", "bicubic"):
        crop = {}  # what the zoo's file loader does not reproduce (timm's ResizeKeepRatio, ...): no crop, bilinear
    if not spec.startswith("digits:"):
        # a file: read and preprocessed as zoo predict and the evaluation split do (read_image: 16-bit and float
        # images scaled, palette/alpha handled; resize of the short side and centre crop, not a stretch)
        from zoo.hub import refuse_url
        from zoo.tasks.vision.data import load_image_file

        refuse_url(spec, "image", "the image")  # Path() collapsed its "//": reported as a missing file
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"image file {path} does not exist")
        size = height if height == width else (height, width)
        x = load_image_file(path, size, chans, cfg["mean"], cfg["std"], transform=transform, **crop)[None]
        return x, _display(x, mean, std), None
    from sklearn.datasets import load_digits

    digits = load_digits()
    try:
        index = int(spec.split(":", 1)[1])
    except ValueError:
        raise ValueError(f"image={spec!r}: expected digits:<index>, e.g. digits:0") from None
    if not 0 <= index < len(digits.images):
        raise ValueError(f"image={spec!r}: index out of range 0..{len(digits.images) - 1}")
    label = int(digits.target[index])
    if transform is not None or (crop and crop != _eval_crop({})):  # through the run's crop, as zoo predict
        x = _digits_image(spec, height, chans, cfg["mean"], cfg["std"], transform, crop=crop)[None]
        return x, _display(x, mean, std), label
    pixels = torch.tensor(digits.images[index], dtype=torch.float32)[None, None] / 16.0  # (1, 1, 8, 8)
    if pixels.shape[1] != chans:
        pixels = pixels.mean(dim=1, keepdim=True).expand(1, chans, *pixels.shape[-2:])
    if pixels.shape[-2:] != (height, width):
        pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    display = pixels[0].permute(1, 2, 0).numpy().copy()
    return (pixels - mean) / std, display, label


def _display(x_1CHW: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> np.ndarray:
    """The normalised input back in [0, 1], (H, W, C), to draw."""
    return (x_1CHW * std + mean).clamp(0.0, 1.0)[0].permute(1, 2, 0).numpy().copy()


# --------------------------------------------------------------------------------------------------
# Picture
# --------------------------------------------------------------------------------------------------
def save_rollout_png(
    out: str,
    display_HWC: np.ndarray,
    map_GG: np.ndarray,
    title: str,
    patch_size: Optional[Sequence[int]] = None,
) -> Path:
    """Write image | rollout heat map | overlay as a PNG (matplotlib, Agg backend).

    ``patch_size`` (ph, pw) places the (Gh, Gw) map on the image where its patches lie (see
    :func:`zoo.plotting.patch_heat_on_image`); None: the grid covers the image exactly."""
    plt = pyplot()
    path = png_path(out)
    heat = np.asarray(map_GG, dtype=np.float64)
    heat = (heat - heat.min()) / max(heat.max() - heat.min(), 1e-12)
    img = np.clip(display_HWC, 0.0, 1.0)
    gray = img.shape[-1] == 1
    img_show = img[..., 0] if gray else img
    h, w = img.shape[:2]
    heat_full = patch_heat_on_image(heat, patch_size, (h, w))
    fig, axes = plt.subplots(1, 3, figsize=(9.6, 3.6))
    axes[0].imshow(img_show, cmap="gray" if gray else None, vmin=0, vmax=1)
    axes[0].set_title("input")
    im = axes[1].imshow(heat, cmap="inferno", vmin=0, vmax=1)
    axes[1].set_title(f"rollout ({heat.shape[0]}x{heat.shape[1]} patches)")
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)
    axes[2].imshow(img_show, cmap="gray" if gray else None, vmin=0, vmax=1)
    axes[2].imshow(heat_full, cmap="inferno", alpha=0.55, vmin=0, vmax=1)
    axes[2].set_title("overlay")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
USAGE = """usage: zoo viz rollout ckpt=<dir|model.safetensors|run.ckpt> [image=digits:0|<file>] [out=rollout.png]
                       [model=<registered name>] [head_fusion=mean|max|min] [discard_ratio=0] [device=cpu]

Writes a PNG with the input image, the attention-rollout heat map (Abnar & Zuidema 2020) and their
overlay, titled with the predicted class. ckpt: a directory or .safetensors written by zoo.save_pretrained,
or a Lightning .ckpt from `zoo train` (model= names the model if the checkpoint does not).
image: a picture file, or digits:<index> for an image of scikit-learn's bundled digits (default digits:0).
discard_ratio: in [0, 1), zero that fraction of each layer's smallest head-fused weights first
(jacobgil/vit-explain, which suggests 0.9; default 0, the paper's rollout)."""

_KEYS = ("ckpt", "image", "out", "model", "head_fusion", "discard_ratio", "device")


def _parse(argv: Sequence[str]) -> dict[str, str]:
    args = parse_key_values(argv, _KEYS)
    if "ckpt" not in args:
        raise ValueError("ckpt=<checkpoint> is required")
    if "discard_ratio" in args:
        args["discard_ratio"] = _checked_discard_ratio(args["discard_ratio"])  # before the model is loaded
    return args


def rollout_main(argv: Optional[Sequence[str]] = None) -> int:
    """``zoo viz rollout key=value ...``; returns a process exit code."""
    return run_viz_command("rollout", USAGE, argv, _draw_rollout)


def _draw_rollout(argv: list[str]) -> dict:
    args = _parse(argv)
    out = png_path(args.get("out", "rollout.png"))  # a bad out= before the work
    model, transform = load_model_and_transform(args["ckpt"], args.get("model"))
    device = device_arg(args)
    model.to(device)
    x, display, label = load_image(args.get("image", "digits:0"), model, transform)
    label, names = image_classes(model, label)
    logits, maps = compute_rollout(model, x.to(device), args.get("head_fusion", "mean"), args.get("discard_ratio", 0.0))
    title, pred, prob = prediction_title(logits, label, names)
    settings = [f"{key}={args[key]}" for key, default in (("head_fusion", "mean"), ("discard_ratio", 0.0))
                if args.get(key, default) != default]
    if settings:  # a picture drawn with other settings than the paper's says so
        title = f"{title}; rollout with {', '.join(settings)}"
    path = save_rollout_png(str(out), display, maps[0].cpu().numpy(), title, model.patch_embed.patch_size)
    return prediction_summary(path, pred, prob, label, names)


if __name__ == "__main__":
    raise SystemExit(rollout_main())
