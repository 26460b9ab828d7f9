"""Agent-to-patch attention pictures for Agent-DeiT (``zoo viz agent``).

In agent attention (Han et al., ECCV 2024, arXiv:2312.08874) each of the n agent tokens -- pooled from the
queries of one cell of a sqrt(n) x sqrt(n) grid over the image -- first attends to every token (the agent
aggregation softmax(A K^T + B1), (n x N)). This picture shows, for one block, that map of every agent over
the patch grid, averaged over heads (or one head), laid out in the agents' own grid: the tile in row i,
column j belongs to the agent pooled from region (i, j) of the image. Next to it: the input image and the
mean over agents.

The maps come from :func:`zoo.attention.capture_attention`: while capturing, every
:class:`zoo.attention.AgentAttention` records its agent map (B, H, n, N) and grid in its record's ``extra``.
``layer`` counts the Agent attention blocks only (agent_deit_base's first 4; ordinary attention after).

    zoo viz agent ckpt=<dir|model.safetensors|run.ckpt> [image=digits:0|<file>] [out=agent_attention.png]
                  [layer=-1] [head=mean|<index>] [model=<registered name>] [device=cpu]
    zoo viz agent model=<registered name> ...      (no ckpt: randomly initialised weights, for a quick look)

Letters: B batch, H heads, n agents (p x p), N tokens, P prefix tokens, Gh/Gw patch grid.
"""
from __future__ import annotations

import math
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
    patch_heat_on_image,
    png_path,
    prediction_summary,
    prediction_title,
    pyplot,
    run_viz_command,
    save_figure,
)

__all__ = ["agent_maps", "save_agent_png", "agent_main"]


def _agent_modules(model: nn.Module) -> list[nn.Module]:
    from zoo.attention.agent import AgentAttention

    return [m for m in model.modules() if isinstance(m, AgentAttention)]


def agent_maps(model: nn.Module, images_BCHW: torch.Tensor, layer: int = -1, head: Optional[int] = None):
    """Run ``model`` and return (logits, maps (B, n, Gh, Gw), (Gh, Gw)) of agent attention block ``layer``.

    ``layer`` indexes the model's AgentAttention modules (negative from the end); ``head`` selects one head
    (default: the mean over heads). Each map is agent i's attention over the patch tokens (the class token's
    share is left out), so a row sums to at most 1. The model runs in eval mode; its train/eval mode is restored
    afterwards.
    """
    modules = _agent_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no AgentAttention module (is it an Agent-DeiT model?)")
    if not -len(modules) <= layer < len(modules):
        raise ValueError(f"layer={layer} is out of range: the model has {len(modules)} agent attention blocks")
    module = modules[layer]
    with torch.no_grad(), evaluation_mode(model), capture_attention(model) as records:
        logits = model(images_BCHW)
    mine = [r for r in records if r.module is module and "agent" in r.extra]
    if not mine:
        raise ValueError(f"agent attention block {layer} recorded no agent map (was it called?)")
    weights_BHnN = mine[-1].extra["agent"]
    heads = weights_BHnN.shape[1]
    if head is None:
        weights_BnN = weights_BHnN.mean(dim=1)
    elif -heads <= head < heads:
        weights_BnN = weights_BHnN[:, head]
    else:
        raise ValueError(f"head={head} is out of range: block has {heads} heads")
    gh, gw = mine[-1].extra["grid"]
    prefix = module.num_prefix_tokens
    maps = weights_BnN[:, :, prefix:].reshape(weights_BnN.shape[0], weights_BnN.shape[1], gh, gw)
    return logits, maps.float(), (gh, gw)


def save_agent_png(out: str, display_HWC: np.ndarray, maps_nGG: np.ndarray, title: str,
                   patch_size: Optional[Sequence[int]] = None) -> Path:
    """Write input | mean agent map | mosaic of the n agent maps (in the agents' grid) as a PNG.

    Colours are attention probabilities with colour bars: the mean map on its own scale, the tiles on one scale
    shared by all agents (0 to the largest probability of any agent), so agents can be compared. ``patch_size``
    (ph, pw) places the (Gh, Gw) grid on the image where its patches lie (Agent-DeiT pads images to whole
    patches; :func:`zoo.plotting.patch_heat_on_image`); None: the grid covers the image exactly."""
    plt = pyplot()
    path = png_path(out)
    n = maps_nGG.shape[0]
    side = math.isqrt(n)
    img = np.clip(display_HWC, 0.0, 1.0)
    gray = img.shape[-1] == 1
    img_show = img[..., 0] if gray else img
    fig = plt.figure(figsize=(12.0, 4.6))
    outer = fig.add_gridspec(1, 3, width_ratios=[1.0, 1.0, 1.6])
    ax = fig.add_subplot(outer[0])
    ax.imshow(img_show, cmap="gray" if gray else None, vmin=0, vmax=1)
    ax.set_title("input")
    ax.set_xticks([]), ax.set_yticks([])
    ax = fig.add_subplot(outer[1])
    mean_map = maps_nGG.mean(axis=0)
    h, w = img.shape[:2]
    heat = patch_heat_on_image(mean_map, patch_size, (h, w))
    ax.imshow(img_show, cmap="gray" if gray else None, vmin=0, vmax=1)
    shown = ax.imshow(heat, cmap="inferno", alpha=0.55, vmin=0, vmax=float(np.nanmax(heat)))
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title("mean over agents")
    ax.set_xticks([]), ax.set_yticks([])
    inner = outer[2].subgridspec(side, side, wspace=0.05, hspace=0.05)
    top = max(float(maps_nGG.max()), 1e-12)
    tile_axes = []
    for i in range(n):
        ax = fig.add_subplot(inner[i // side, i % side])
        shown = ax.imshow(maps_nGG[i], cmap="inferno", vmin=0, vmax=top)
        ax.set_xticks([]), ax.set_yticks([])
        tile_axes.append(ax)
    fig.colorbar(shown, ax=tile_axes, fraction=0.03, pad=0.02)
    fig.text(0.72, 0.93, f"each agent's attention over the patches ({side}x{side} agents, one shared scale)",
             ha="center")
    fig.suptitle(title, x=0.3)
    return save_figure(fig, path, dpi=100)


USAGE = """usage: zoo viz agent ckpt=<dir|model.safetensors|run.ckpt> [image=digits:0|<file>] [out=agent_attention.png]
                     [layer=-1] [head=mean|<index>] [model=<registered name>] [device=cpu]
       zoo viz agent model=<registered Agent-DeiT name> ...   (random weights, no ckpt)

Writes a PNG with the input, the mean agent-to-patch attention and one tile per agent (agent aggregation
softmax(A K^T + B1) of agent attention block `layer` over the patch grid, averaged over heads unless
head=<index>). `layer` counts the blocks with agent attention only (agent_deit_base: the first 4)."""

_KEYS = ("ckpt", "image", "out", "model", "layer", "head", "device")


def _parse(argv: Sequence[str]) -> dict[str, str]:
    args = parse_key_values(argv, _KEYS)
    if "ckpt" not in args and "model" not in args:
        raise ValueError("ckpt=<checkpoint> (or model=<name> for random weights) is required")
    return args


def agent_main(argv: Optional[Sequence[str]] = None) -> int:
    """``zoo viz agent key=value ...``; returns a process exit code."""
    return run_viz_command("agent", USAGE, argv, _draw_agent,
                           errors=(ValueError, FileNotFoundError, TypeError, KeyError))


def _draw_agent(argv: list[str]) -> dict:
    import zoo
    import zoo.tasks.vision.agent_deit  # noqa: F401  registers the Agent-DeiT names
    from zoo.tasks.vision.viz import image_classes, load_image, load_model_and_transform

    args = _parse(argv)
    out = png_path(args.get("out", "agent_attention.png"))  # a bad out= before the work
    if "ckpt" in args:
        model, transform = load_model_and_transform(args["ckpt"], args.get("model"))
        untrained = False
    else:
        model, transform = zoo.create_model(args["model"]), None
        untrained = True
    device = device_arg(args)
    model.to(device)
    x, display, label = load_image(args.get("image", "digits:0"), model, transform)
    label, names = image_classes(model, label)
    logits, maps, grid = agent_maps(model, x.to(device), int_arg(args, "layer", -1), int_arg(args, "head", None))
    title, pred, prob = prediction_title(logits, label, names)
    if untrained:
        title += " -- untrained weights"
    path = save_agent_png(str(out), display, maps[0].cpu().numpy(), title, model.patch_embed.patch_size)
    return prediction_summary(path, pred, prob, label, names, grid=list(grid))


if __name__ == "__main__":
    raise SystemExit(agent_main())
