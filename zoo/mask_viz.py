"""Attention-mask pictures (``zoo viz mask``): the block map of a mask -- the tiles the block-sparse kernels
visit -- and, at small sizes, its token-level form.

    zoo viz mask [mask=causal|window|chunk|segments|knn|radial] [n=1024] [block=64] [tokens=auto|on|off]
                 [out=mask.png]
        window    left=<int|none> right=<int|none>        default left=128 right=0
        chunk     chunk=<int> left=<int|none> right=<int>  default chunk=64 left=none right=0 (block-causal)
        segments  lengths=<int,int,...>                    packed sequences; n is their sum
        knn       k=<int> order=morton|random              default 16, morton: each of n points on a sphere
                                                           (seeded) attends to its k nearest (Edges.knn), the
                                                           points in Z-order (zoo.geometry.morton_order) or not
        radial    frames=<int> tokens_per_frame=<int> decay=<float> sink=<true|false> text=<int>
                  defaults 8, 256, 1.0, false, 0; n is frames * tokens_per_frame + text, block the Radial block

The left panel colours every (query tile, key tile) at ``block`` x ``block`` tokens: EMPTY tiles are
skipped, PARTIAL tiles evaluate the mask element-wise, FULL tiles need no masking (the three states of
``Mask.block_map``, as FlexAttention's BlockMask distinguishes partial and full blocks). The right panel,
drawn when ``tokens=on`` or (``auto``) when n <= 4096, is ``mask.dense(n, n)``. The JSON line printed
gives the tile counts and the kept-tile fraction, the share of a dense kernel's work that remains.
"""
from __future__ import annotations

import math
import textwrap
from typing import Optional, Sequence

import torch

from zoo.attention.masks import EMPTY, FULL, PARTIAL, Causal, ChunkWindow, Mask, Segments, Window
from zoo.plotting import parse_key_values, png_path, pyplot, run_viz_command, save_figure

__all__ = ["build_mask", "draw_mask", "mask_main"]

USAGE = (__doc__ or "").split("\n\n")[1]
KEYS = ("mask", "n", "block", "tokens", "out", "left", "right", "chunk", "lengths", "k", "order", "frames",
        "tokens_per_frame", "decay", "sink", "text")
_KNN_K, _KNN_ORDER = 16, "morton"  # mask=knn's defaults (the picture's title names them too)
#: Above this many tokens the token-level panel is left out unless tokens=on.
MAX_TILES = 4096 * 4096  # tiles of the block-map panel, and token pairs of tokens=on (8192 x 8192): more than
TOKEN_CELLS_MAX = 8192 * 8192  # any figure resolves, and about 100 MB to draw rather than tens of gigabytes
TOKEN_PANEL_MAX = 4096
_KIND_KEYS = {
    "causal": (),
    "window": ("left", "right"),
    "chunk": ("chunk", "left", "right"),
    "segments": ("lengths",),
    "knn": ("k", "order"),
    "radial": ("frames", "tokens_per_frame", "decay", "sink", "text"),
}


def _int(args: dict, key: str, default: Optional[int], minimum: Optional[int] = None, allow_none: bool = False):
    text = args.get(key)
    if text is None:
        return default
    if allow_none and text.lower() in ("none", "null", "inf"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{key}={text!r}: expected an integer" + (" or none" if allow_none else "")) from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{key}={value}: must be >= {minimum}")
    return value


def build_mask(args: dict) -> tuple[Mask, int, int]:
    """(mask, sequence length, tile size) from the command's key=value arguments."""
    kind = args.get("mask", "causal")
    if kind not in _KIND_KEYS:
        raise ValueError(f"mask={kind!r}: expected one of {', '.join(_KIND_KEYS)}")
    foreign = [k for k in args if k in sum(_KIND_KEYS.values(), ()) and k not in _KIND_KEYS[kind]]
    if foreign:
        raise ValueError(f"mask={kind} does not take {', '.join(foreign)} (it takes: "
                         f"{', '.join(_KIND_KEYS[kind]) or 'no extra keys'})")
    n = _int(args, "n", 1024, minimum=1)
    block = _int(args, "block", 64, minimum=1)
    if kind == "causal":
        return Causal(), n, block
    if kind == "window":
        return Window(_int(args, "left", 128, allow_none=True), _int(args, "right", 0, allow_none=True)), n, block
    if kind == "chunk":
        chunk = _int(args, "chunk", 64, minimum=1)
        return ChunkWindow(chunk, _int(args, "left", None, allow_none=True),
                           _int(args, "right", 0, allow_none=True)), n, block
    if kind == "segments":
        try:
            lengths = [int(v) for v in args.get("lengths", "300,200,524").split(",")]
        except ValueError:
            raise ValueError(f"lengths={args['lengths']!r}: expected comma-separated integers") from None
        if not lengths or min(lengths) < 1:
            raise ValueError(f"lengths={args.get('lengths')!r}: every length must be >= 1")
        if "n" in args and n != sum(lengths):
            raise ValueError(f"n={n} but the segment lengths sum to {sum(lengths)}; leave n out")
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        return Segments(ids), sum(lengths), block
    if kind == "knn":
        return _knn_mask(n, _int(args, "k", _KNN_K, minimum=1), args.get("order", _KNN_ORDER)), n, block
    from zoo.attention.radial import Radial

    if "n" in args:
        raise ValueError("mask=radial: n is frames * tokens_per_frame + text; leave n out")
    sink = args.get("sink", "false").lower()
    if sink not in ("true", "false", "1", "0"):
        raise ValueError(f"sink={args['sink']!r}: expected true or false")
    try:
        decay = float(args.get("decay", "1.0"))
    except ValueError:
        raise ValueError(f"decay={args['decay']!r}: expected a number") from None
    mask = Radial(_int(args, "frames", 8, minimum=1), _int(args, "tokens_per_frame", 256, minimum=1), decay,
                  sink in ("true", "1"), block_size=_int(args, "block", 128, minimum=1),
                  text_tokens=_int(args, "text", 0, minimum=0))
    return mask, mask.seq_len, mask.block_size


def _knn_mask(n: int, k: int, order: str) -> Mask:
    """Each of ``n`` points spread on the unit sphere (seed 0) attends to its ``k`` nearest, the points in
    Z-order or in random order: the tiles a point cloud's neighbourhood attention visits either way."""
    from zoo.attention.masks import Edges
    from zoo.geometry import morton_order

    if order not in ("morton", "random"):
        raise ValueError(f"order={order!r}: expected morton or random")
    points = torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    points = points / points.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if order == "morton":
        points = points[morton_order(points)]
    return Edges.knn(points, k)


def draw_mask(mask: Mask, q_len: int, k_len: int, block: int, out: str, tokens: str = "auto",
              title: Optional[str] = None) -> dict:
    """Write the picture of ``mask`` for (q_len, k_len) at ``block`` x ``block`` tiles; return the summary.

    Masks that vary over batch or heads are drawn for batch 0, head 0. ``tokens``: "on", "off" or "auto"
    (the token-level panel when both lengths are at most TOKEN_PANEL_MAX)."""
    if tokens not in ("auto", "on", "off"):
        raise ValueError(f"tokens={tokens!r}: expected auto, on or off")
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    tiles = math.ceil(q_len / block) * math.ceil(k_len / block)
    if tiles > MAX_TILES:  # n=100000 block=1 asked for 10**10 tiles: an 80 GB allocation error after minutes
        raise ValueError(f"{q_len} x {k_len} tokens at block={block} is {tiles:,} tiles, more than a picture can show "
                         f"({MAX_TILES:,}); give a larger block (block={math.ceil(max(q_len, k_len) / 4096)} or more)")
    if tokens == "on" and q_len * k_len > TOKEN_CELLS_MAX:
        raise ValueError(f"tokens=on draws all {q_len} x {k_len} token pairs, more than {TOKEN_CELLS_MAX:,}; use "
                         f"tokens=off")
    plt = pyplot()
    path = png_path(out)
    states = mask.block_map(q_len, k_len, block, block).states[0, 0].cpu()
    counts = {name: int((states == state).sum()) for name, state in (("empty", EMPTY), ("partial", PARTIAL),
                                                                     ("full", FULL))}
    total = states.numel()
    draw_tokens = tokens == "on" or (tokens == "auto" and max(q_len, k_len) <= TOKEN_PANEL_MAX)
    fig, axes = plt.subplots(1, 2 if draw_tokens else 1, figsize=(10.5 if draw_tokens else 6.0, 5.2 if draw_tokens
                                                                     else 6.2), squeeze=False)
    colours = ListedColormap(["#ffffff", "#f4a259", "#1f4e79"])  # EMPTY, PARTIAL, FULL
    ax = axes[0, 0]
    ax.imshow(states.numpy(), cmap=colours, vmin=0, vmax=2, interpolation="nearest")
    ax.set_title(f"block map, {block} x {block} tiles: {counts['partial'] + counts['full']}/{total} kept", fontsize=9)
    ax.set_xlabel("key tile")
    ax.set_ylabel("query tile")
    fig.legend(handles=[Patch(facecolor=c, edgecolor="#888888", label=name) for c, name in
                        (("#ffffff", "EMPTY tile (skipped)"), ("#f4a259", "PARTIAL tile (masked element-wise)"),
                         ("#1f4e79", "FULL tile / allowed pair"))],
               loc="lower center", ncol=3 if draw_tokens else 1, fontsize=8, frameon=False)
    summary = {"out": str(path), "mask": repr(mask), "q_len": q_len, "k_len": k_len, "block": block,
               "tiles": total, **counts, "kept_fraction": round((counts["partial"] + counts["full"]) / total, 6)}
    if draw_tokens:
        dense = mask.dense(q_len, k_len)[0, 0].cpu()
        summary["allowed_fraction"] = round(float(dense.float().mean()), 6)
        ax = axes[0, 1]
        ax.imshow(dense.numpy(), cmap=ListedColormap(["#ffffff", "#1f4e79"]), vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"tokens: {summary['allowed_fraction']:.1%} of pairs allowed", fontsize=9)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.suptitle(textwrap.fill(title or f"{mask!r}, Nq = {q_len}, Nk = {k_len}", 100 if draw_tokens else 60),
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.05 if draw_tokens else 0.12, 1, 1))
    save_figure(fig, path)
    return summary


def _draw(argv: list[str]) -> dict:
    args = parse_key_values(argv, KEYS)
    mask, n, block = build_mask(args)
    title = None
    if args.get("mask") == "knn":
        title = (f"{mask!r}: each of {n} points on a sphere attends to its k = {args.get('k', _KNN_K)} nearest, "
                 f"points in {args.get('order', _KNN_ORDER)} order, Nq = Nk = {n}")
    return draw_mask(mask, n, n, block, args.get("out", "mask.png"), args.get("tokens", "auto"), title=title)


def mask_main(argv: Optional[Sequence[str]] = None) -> int:
    """``zoo viz mask key=value ...``; returns a process exit code."""
    return run_viz_command("mask", USAGE, argv, _draw)
