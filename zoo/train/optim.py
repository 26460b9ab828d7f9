"""Optimiser pieces shared by the task LightningModules: parameter groups (no weight decay on norms,
biases and position tables; layer-wise lr decay) and the linear-warm-up + cosine schedule.

Layer-wise lr decay (BEiT, Bao et al. ICLR 2022, sec. 3.3; timm ``param_groups_layer_decay``): parameter
``p`` in layer ``i`` of ``L`` gets ``lr * decay ** (L + 1 - i)``. A model with timm's ``group_matcher`` (every
zoo vision family) is grouped by it, as timm does (timm.models.group_parameters): MaxViT by stage, ViT by
block. Otherwise layer 0 is everything before the first block (patch embedding, class token, position
embedding), layers 1..L the blocks in order; parameters after the last block belong to it (final norm)
except the classifier (``zoo.hub.head_keys``), layer ``L + 1``, which keeps the full lr. The ``group_matcher``
path reproduces timm's scales (tested for ViT and MaxViT). The fallback reproduces them for block-stacked models
(ViT: equal); for a staged model without a group_matcher it counts every block of every stage as a layer,
where timm's MaxViT matcher counts stages.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Optional

import torch.nn as nn

__all__ = ["layer_ids", "param_groups", "warmup_cosine"]

_BLOCK = re.compile(r"^((?:.*\.)?(?:blocks|layers|stages)\.\d+(?:\.(?:blocks|layers)\.\d+)?)\.")


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Layer index of every parameter name and the number of blocks L: by the model's ``group_matcher`` when it
    has one (timm's grouping), else by ``blocks.i`` / ``stages.i.blocks.j`` / ``layers.i`` prefixes, numbered in
    parameter order. The classifier's layer is L + 1."""
    if callable(getattr(model, "group_matcher", None)):
        from timm.models import group_parameters

        ids = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
        return ids, max(ids.values(), default=1) - 1  # timm's last group (head, unmatched) keeps the full lr
    blocks: dict[str, int] = {}
    ids: dict[str, int] = {}
    seen_block = False
    pending_after: list[str] = []
    for name, _ in model.named_parameters():
        match = _BLOCK.match(name)
        if match:
            prefix = match.group(1)
            if prefix not in blocks:
                blocks[prefix] = len(blocks) + 1
            ids[name] = blocks[prefix]
            seen_block = True
            for later in pending_after:  # something between blocks (e.g. a downsample): it joins the previous block
                ids[later] = blocks[prefix] - 1
            pending_after = []
        elif not seen_block:
            ids[name] = 0
        else:
            pending_after.append(name)
    num_layers = len(blocks)
    from zoo.hub import head_keys

    heads = {key.rsplit(".", 1)[0] for key in head_keys(model)}
    for name in pending_after:
        ids[name] = num_layers + 1 if name.rsplit(".", 1)[0] in heads or not seen_block else num_layers
    return ids, num_layers


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: Optional[float] = None,
    no_weight_decay: Iterable[str] = (),
) -> list[dict]:
    """AdamW groups: no decay for 1-D tensors (norms, biases) and ``no_weight_decay`` names (the model's
    ``no_weight_decay()`` too); with ``layer_decay`` each group carries ``lr_scale``."""
    skip = set(no_weight_decay)
    if hasattr(model, "no_weight_decay"):
        skip |= set(model.no_weight_decay())
    ids, num_layers = layer_ids(model) if layer_decay is not None else ({}, 0)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim <= 1 or name.endswith(".bias") or name in skip)
        layer = ids.get(name, num_layers + 1)
        key = (layer, decay)
        if key not in groups:
            scale = 1.0 if layer_decay is None else float(layer_decay) ** (num_layers + 1 - layer)
            groups[key] = {"params": [], "param_names": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """lr factor: linear from 1/warmup to 1 over ``warmup_steps``, then cosine down to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
