"""Window (block) and grid attention pictures for MaxViT (``zoo viz maxvit``).

MaxViT (Tu et al., ECCV 2022, arXiv:2204.01697) alternates two sparse attentions in every block: *block*
attention inside non-overlapping Ph x Pw windows (local) and *grid* attention among the tokens of a
Ph x Pw grid spread over the whole map with stride (H/Ph, W/Pw) (global, dilated). This picture shows, for
one query position and one block per stage, where that query's attention goes in each of the two:
one row per stage, columns = input image with the query marked | block attention | grid attention, each
map the size of the stage's feature map (zero outside the query's partition), averaged over heads (or one
head). The block map is a compact square around the query; the grid map is a sparse lattice across the
image -- the paper's Figure 3 made from a real forward pass.

The weights come from :func:`zoo.attention.capture_attention` (one record per partition attention call,
(nP, heads, P, P)); the stage's map size comes from a forward pre-hook on each
:class:`zoo.tasks.vision.maxvit.PartitionAttention` (maps of any size are padded to partition multiples;
padded keys get no weight and padded positions are cropped from the picture).

    zoo viz maxvit ckpt=<dir|model.safetensors|run.ckpt> [image=digits:0|<file>] [out=maxvit_attention.png]
                   [query=<row>,<col>] [block=0] [head=mean|<index>] [model=<registered name>] [device=cpu]
    zoo viz maxvit model=<registered name> ...   (no ckpt: randomly initialised weights, for a quick look)

``query`` is a pixel of the model-sized input image (default: the centre); ``block`` picks the block of
each stage (default 0, the first; negative counts from the end).

Letters: B batch, H/W feature-map height/width (Hp/Wp padded), Ph/Pw partition size, P = Ph*Pw,
nP partitions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from zoo.attention import capture_attention
from zoo.plotting import (
    device_arg,
    evaluation_mode,
    int_arg,
    parse_key_values,
    png_path,
    prediction_summary,
    prediction_title,
    pyplot,
    run_viz_command,
    save_figure,
)

__all__ = ["partition_attention_map", "maxvit_attention_maps", "save_maxvit_png", "maxvit_main"]


def partition_attention_map(weights_PHQK: torch.Tensor, kind: str, size: tuple[int, int], hw: tuple[int, int], query: tuple[int, int], head: Optional[int] = None) -> torch.Tensor:
    """The attention of the token at ``query`` (row, col of an (H, W) map) laid out on the map.

    ``weights_PHQK``: one image's records (nP, heads, P, P) of a block or grid attention with partition
    ``size`` over the map padded to multiples of it. Returns (H, W): the query's attention probabilities at
    the positions of its partition's keys, zero elsewhere (head mean, or ``head``).
    """
    (h, w), (ph, pw) = hw, size
    hp, wp = -(-h // ph) * ph, -(-w // pw) * pw
    qy, qx = query
    if not (0 <= qy < h and 0 <= qx < w):
        raise ValueError(f"query {query} is outside the {h}x{w} map")
    if kind == "block":
        part = (qy // ph) * (wp // pw) + qx // pw
        slot = (qy % ph) * pw + qx % pw
    elif kind == "grid":
        sy, sx = hp // ph, wp // pw
        part = (qy % sy) * sx + qx % sx
        slot = (qy // sy) * pw + qx // sx
    else:
        raise ValueError(f"kind must be 'block' or 'grid', got {kind!r}")
    expected = (hp // ph) * (wp // pw)
    if weights_PHQK.shape[0] != expected or weights_PHQK.shape[-1] != ph * pw:
        raise ValueError(
            f"weights of shape {tuple(weights_PHQK.shape)} do not fit a {kind} partition {size} of a {h}x{w} map "
            f"({expected} partitions of {ph * pw} tokens)"
        )
    row_HK = weights_PHQK[part, :, slot, :].float()
    if head is not None and not -row_HK.shape[0] <= head < row_HK.shape[0]:
        raise ValueError(f"head={head} is out of range: the {kind} attention has {row_HK.shape[0]} heads")
    row_K = row_HK.mean(0) if head is None else row_HK[head]
    keys = row_K.view(ph, pw)
    full = torch.zeros(hp, wp)
    if kind == "block":
        y0, x0 = (qy // ph) * ph, (qx // pw) * pw
        full[y0 : y0 + ph, x0 : x0 + pw] = keys
    else:
        full[qy % sy :: sy, qx % sx :: sx] = keys
    return full[:h, :w]


def maxvit_attention_maps(model: nn.Module, images_1CHW: torch.Tensor, query: Optional[tuple[int, int]] = None,
                          block: int = 0, head: Optional[int] = None):
    """Run ``model`` on one image and return (logits, maps): per stage a dict with the block and grid maps.

    ``query`` is a pixel (row, col) of the input (default: centre); on a stage's map it is the token whose
    receptive-field centre is nearest (pixel * map_size / image_size). The model runs in eval mode (BatchNorm's
    running statistics, no drop-path: the same maps on every call, nothing updated); its train/eval mode is
    restored afterwards.
    """
    from zoo.tasks.vision.maxvit import PartitionAttention

    if not hasattr(model, "stages") or not any(isinstance(m, PartitionAttention) for m in model.modules()):
        name = getattr(model, "zoo_model_name", type(model).__name__)
        raise ValueError(f"{name} is not a MaxViT model (no stages of block and grid PartitionAttention); these maps "
                         f"are MaxViT's (for ViT / DeiT draw zoo viz rollout, for Agent-DeiT zoo viz agent)")
    if images_1CHW.dim() != 4 or images_1CHW.shape[0] != 1:
        raise ValueError(f"expected one image (1, C, H, W), got {tuple(images_1CHW.shape)}")
    img_h, img_w = images_1CHW.shape[-2:]
    qy, qx = (img_h // 2, img_w // 2) if query is None else query
    if not (0 <= qy < img_h and 0 <= qx < img_w):
        raise ValueError(f"query pixel {(qy, qx)} is outside the {img_h}x{img_w} image")
    stages = list(model.stages)
    chosen: dict[nn.Module, tuple[int, str]] = {}
    for s, stage in enumerate(stages):
        depth = len(stage.blocks)
        if not -depth <= block < depth:
            raise ValueError(f"block={block} is out of range for stage {s} with {depth} blocks")
        blk = stage.blocks[block]
        chosen[blk.attn_block] = (s, "block")
        chosen[blk.attn_grid] = (s, "grid")
    shapes: list[tuple[nn.Module, tuple[int, int]]] = []

    def hook(module, args):
        if module in chosen:
            shapes.append((module, tuple(args[0].shape[1:3])))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, PartitionAttention)]
    attn_of = {m.attn: m for m in chosen}
    try:
        with torch.no_grad(), evaluation_mode(model), capture_attention(model) as records:
            logits = model(images_1CHW)
    finally:
        for handle in handles:
            handle.remove()
    ours = [r for r in records if r.module in attn_of]
    if len(ours) != len(shapes):
        raise RuntimeError(f"captured {len(ours)} attention records for {len(shapes)} partition layers")
    maps: dict[int, dict] = {}
    for record, (layer, hw) in zip(ours, shapes):
        stage, kind = chosen[layer]
        if attn_of[record.module] is not layer:
            raise RuntimeError("attention records and partition layers are out of order")
        q = (min(hw[0] - 1, qy * hw[0] // img_h), min(hw[1] - 1, qx * hw[1] // img_w))
        entry = maps.setdefault(stage, {"stage": stage, "hw": hw, "query": q})
        entry[kind] = partition_attention_map(record.weights, kind, layer.partition_size, hw, q, head).numpy()
        entry[f"{kind}_size"] = layer.partition_size
    return logits, [maps[s] for s in sorted(maps)]


def save_maxvit_png(out: str, display_HWC: np.ndarray, maps: list[dict], query: tuple[int, int], title: str) -> Path:
    """Write the picture: one row per stage, columns image+query | block attention | grid attention.

    Each attention map is coloured from 0 to its own largest probability, with its colour bar (a block map is
    sharper than a grid map: one shared scale would leave the weaker one dark)."""
    plt = pyplot()
    path = png_path(out)
    rows = len(maps)
    fig, axes = plt.subplots(rows, 3, figsize=(8.4, 2.5 * rows + 0.7), squeeze=False)
    image = display_HWC[..., 0] if display_HWC.shape[-1] == 1 else display_HWC
    for r, entry in enumerate(maps):
        h, w = entry["hw"]
        ax = axes[r][0]
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
        ax.plot([query[1]], [query[0]], marker="+", color="red", markersize=12, mew=2)
        ax.set_title(f"stage {entry['stage'] + 1}: {h}x{w} map", fontsize=9)
        for c, kind in enumerate(("block", "grid"), start=1):
            ax = axes[r][c]
            shown = ax.imshow(entry[kind], cmap="viridis", interpolation="nearest", vmin=0)
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
            qy, qx = entry["query"]
            ax.plot([qx], [qy], marker="s", markerfacecolor="none", markeredgecolor="red", markersize=6)
            ph, pw = entry[f"{kind}_size"]
            ax.set_title(f"{kind} attention ({ph}x{pw})", fontsize=9)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{title}\nattention probability of the query (red square), each map on its own scale", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
USAGE = """usage: zoo viz maxvit [ckpt=<dir|model.safetensors|run.ckpt>] [model=<registered name>] [image=digits:0|<file>]
                     [out=maxvit_attention.png] [query=<row>,<col>] [block=0] [head=mean|<index>] [device=cpu]
Block and grid attention of one query pixel, one block per stage, of a MaxViT classifier.
ckpt: released weights or a Lightning checkpoint; without it, model=<name> is built with random weights."""

_KEYS = ("ckpt", "image", "out", "model", "query", "block", "head", "device")


def _parse(argv: Sequence[str]) -> dict[str, str]:
    args = parse_key_values(argv, _KEYS)
    if "ckpt" not in args and "model" not in args:
        raise ValueError("give ckpt=<checkpoint> or model=<registered name>")
    return args


def _load(args: dict[str, str]):
    """(model, image transform as zoo predict preprocesses the checkpoint, or None)."""
    import zoo
    from zoo.tasks.vision.viz import load_model_and_transform

    if "ckpt" in args:
        model, transform = load_model_and_transform(args["ckpt"], args.get("model"))
    else:
        model, transform = zoo.create_model(args["model"]), None
    if not hasattr(model, "stages") or not hasattr(model, "window_size"):
        raise ValueError(f"{getattr(model, 'zoo_model_name', type(model).__name__)} is not a MaxViT model")
    return model.eval(), transform


def maxvit_main(argv: Optional[Sequence[str]] = None) -> int:
    """``zoo viz maxvit key=value ...``; returns a process exit code."""
    return run_viz_command("maxvit", USAGE, argv, _draw_maxvit,
                           errors=(ValueError, FileNotFoundError, TypeError, IndexError))


def _draw_maxvit(argv: list[str]) -> dict:
    from zoo.tasks.vision.viz import image_classes, load_image

    args = _parse(argv)
    out = png_path(args.get("out", "maxvit_attention.png"))  # a bad out= before the work
    device = device_arg(args)
    model, transform = _load(args)
    model.to(device)
    x, display, label = load_image(args.get("image", "digits:0"), model, transform)
    label, names = image_classes(model, label)
    query = None
    if "query" in args:
        try:
            query = tuple(int(v) for v in args["query"].split(","))
        except ValueError:
            raise ValueError(f"query={args['query']!r}: expected <row>,<col>") from None
        if len(query) != 2:
            raise ValueError(f"query={args['query']!r}: expected <row>,<col>")
    head = int_arg(args, "head", None)
    block = int_arg(args, "block", 0)
    logits, maps = maxvit_attention_maps(model, x.to(device), query, block, head)
    img_h, img_w = model.img_size
    query = (img_h // 2, img_w // 2) if query is None else query
    title, pred, prob = prediction_title(logits, label, names)
    path = save_maxvit_png(str(out), display, maps, query, title)
    return prediction_summary(path, pred, prob, label, names)


if __name__ == "__main__":
    raise SystemExit(maxvit_main())
