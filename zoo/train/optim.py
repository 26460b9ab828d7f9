"""Optimiser pieces shared by the task LightningModules: parameter groups (no weight decay on norms,
biases and position tables; layer-wise lr decay), the optimizer by timm name over those groups, and the
per-step learning-rate schedules (linear warm-up, then cosine, linear, constant or step decay).

The optimizer is any name of timm's registry (``timm.optim.list_optimizers()``: adamw, sgd, momentum, lamb,
lion, adopt, ...; ``lookahead_<name>`` wraps it in Lookahead), built by ``timm.optim.create_optimizer_v2`` as
timm's train.py ``--opt`` does, but from the zoo's own groups below: each group keeps its weight decay and
its layer-decay lr (timm leaves ``lr_scale`` to its schedulers; here the group's lr is set to ``lr * lr_scale``
and the ``LambdaLR`` factor multiplies that).

Layer-wise lr decay (BEiT, Bao et al. ICLR 2022, sec. 3.3; timm ``param_groups_layer_decay``): parameter
``p`` in layer ``i`` of ``L`` gets ``lr * decay ** (L + 1 - i)``. A model with timm's ``group_matcher`` (every
zoo vision family) is grouped by it, as timm does (timm.models.group_parameters): MaxViT by stage, ViT by
block. Otherwise layer 0 is everything before the first block (patch embedding, class token, position
embedding), layers 1..L the blocks in order; parameters after the last block belong to it (final norm)
except the classifier (timm's ``get_classifier()``, ``zoo.hub.head_keys``), layer ``L + 1``, which keeps the full
lr; a model with no block found keeps the full lr everywhere, with a warning (timm's rule). The ``group_matcher``
path reproduces timm's scales (tested for ViT and MaxViT). The fallback reproduces them for block-stacked models
(ViT: equal); for a staged model without a group_matcher it counts every block of every stage as a layer,
where timm's MaxViT matcher counts stages.

As timm's ``create_optimizer_v2(layer_decay_min_scale=, layer_decay_no_opt_scale=)`` (train.py
``--layer-decay-min-scale``, ``--layer-decay-no-opt-scale``; timm/optim/_param_groups.py): the scales are clamped
from below at ``min_scale``, and the parameters whose (clamped) scale is below ``no_opt_scale`` are frozen
(``requires_grad_(False)``) and left out of the groups.
"""
from __future__ import annotations

import math
import re
import warnings
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["SCHEDULERS", "check_optimizer", "check_scheduler", "create_optimizer", "layer_ids", "lr_schedule",
           "optimizer_betas", "own_betas", "param_groups", "warmup_cosine", "warmup_linear", "warmup_step_decay"]

DEFAULT_BETAS = (0.9, 0.999)

SCHEDULERS = ("cosine", "linear", "constant", "step")

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
    if not seen_block:  # timm's rule: one layer, the full lr everywhere, and a warning (not decay^1 on everything)
        warnings.warn(f"layer-wise lr decay has no effect on {type(model).__name__}: it has no group_matcher() and no "
                      f"blocks.<i> / stages.<i> / layers.<i> parameters to number, so every parameter keeps the full "
                      f"lr (as timm's param_groups_layer_decay does)", stacklevel=3)
        return {name: 1 for name in ids}, 0
    heads = _classifier_prefixes(model)
    for name in pending_after:
        ids[name] = num_layers + 1 if any(name.startswith(prefix + ".") for prefix in heads) else num_layers
    return ids, num_layers


def _classifier_prefixes(model: nn.Module) -> set[str]:
    """Module names of the classifier, which keeps the full lr: timm's ``get_classifier()`` module when the model
    has one (a classifier called ``fc`` or ``classifier``), and the modules of ``zoo.hub.head_keys``."""
    from zoo.hub import head_keys

    prefixes = {key.rsplit(".", 1)[0] for key in head_keys(model)}
    get_classifier = getattr(model, "get_classifier", None)
    classifier = get_classifier() if callable(get_classifier) else None
    if isinstance(classifier, nn.Module):
        prefixes |= {name for name, module in model.named_modules() if module is classifier and name}
    return prefixes


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: Optional[float] = None,
    no_weight_decay: Iterable[str] = (),
    min_scale: float = 0.0,
    no_opt_scale: Optional[float] = None,
) -> list[dict]:
    """AdamW groups: no decay for 1-D tensors (norms, biases) and ``no_weight_decay`` names (the model's
    ``no_weight_decay()`` too); with ``layer_decay`` each group carries ``lr_scale``, at least ``min_scale``, and a
    parameter whose scale is below ``no_opt_scale`` is frozen (``requires_grad`` False) and left out, as timm's
    ``param_groups_layer_decay(min_scale=, no_opt_scale=)``. Both need ``layer_decay``."""
    if layer_decay is None and (min_scale or no_opt_scale):
        raise ValueError("min_scale / no_opt_scale act on layer-wise lr decay: give layer_decay too")
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
        scale = 1.0 if layer_decay is None else max(float(min_scale), float(layer_decay) ** (num_layers + 1 - layer))
        if no_opt_scale and scale < no_opt_scale:
            param.requires_grad_(False)
            continue
        key = (layer, decay)
        if key not in groups:
            groups[key] = {"params": [], "param_names": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


def check_optimizer(name) -> str:
    """``name`` as timm's optimizer factory reads it (lower case), refused in one line when timm does not know it,
    cannot build it here (bitsandbytes / APEX ones without CUDA), or it is second-order (AdaHessian needs
    ``backward(create_graph=True)``, which timm's train.py does and a Lightning training step does not)."""
    from timm.optim import get_optimizer_class, get_optimizer_info, list_optimizers

    known = list_optimizers()
    parts = name.lower().split("_") if isinstance(name, str) else []
    lookahead = len(parts) == 2 and parts[0] == "lookahead"  # timm's lookahead_<name>: Lookahead around <name>
    if not (len(parts) == 1 or lookahead) or parts[-1] not in known:
        raise ValueError(f"optimizer must be one of timm's optimizers ({', '.join(known)}), or lookahead_<one of "
                         f"them>; got {name!r}")
    info = get_optimizer_info(parts[-1])
    if info.second_order:
        raise ValueError(f"optimizer {name!r} is second-order (its backward needs create_graph=True), which zoo "
                         "training does not run: pick another optimizer")
    try:
        get_optimizer_class(info, bind_defaults=False)
    except (AssertionError, ImportError) as error:  # timm asserts CUDA for bitsandbytes / APEX optimizers
        raise ValueError(f"optimizer {name!r} is not available here ({error}): pick another optimizer") from None
    return name.lower()


def optimizer_betas(name: str, betas: Sequence[float]) -> Optional[tuple[float, ...]]:
    """The betas to give timm's optimizer ``name`` (a ``check_optimizer`` name): None (its own) when it takes none
    (timm drops them too) or ``betas`` is the default pair (the config's (0.9, 0.999)), as timm's train.py passes
    ``--opt-betas`` only when given: Lion's own (0.9, 0.99), ADOPT's (0.9, 0.9999), Muon's (0.9, 0.95),
    NovoGrad's (0.95, 0.98) and Adan's three are kept (the pair was forced on them); AdamW's own are that pair.
    Otherwise ``betas`` when it takes that many; any other count is refused (a pair given to Adan failed in its
    first step: "tuple index out of range")."""
    from timm.optim import get_optimizer_info

    info = get_optimizer_info(name.split("_")[-1])
    betas = tuple(float(beta) for beta in betas)
    if not info.has_betas or betas == DEFAULT_BETAS:
        return None
    if len(betas) != info.num_betas:
        raise ValueError(f"betas must be {info.num_betas} numbers for optimizer {name!r}, got {list(betas)!r}")
    return betas


def own_betas(name: str) -> Optional[tuple[float, ...]]:
    """The betas timm's optimizer ``name`` uses when given none (its constructor's default), None when unknown (a
    partial such as Adan's). What a run with the default pair trained with (:func:`optimizer_betas`)."""
    import inspect

    from timm.optim import get_optimizer_class

    try:
        factory = get_optimizer_class(name.split("_")[-1])
        cls = getattr(factory, "func", factory)  # functools.partial (Adan)
        default = inspect.signature(cls.__init__).parameters["betas"].default
    except Exception:
        return None
    return tuple(float(b) for b in default) if isinstance(default, (tuple, list)) else None


def create_optimizer(
    name: str, groups: list[dict], lr: float, momentum: float = 0.9, betas: Sequence[float] = DEFAULT_BETAS,
) -> torch.optim.Optimizer:
    """timm's optimizer ``name`` over ``groups`` (each with its own ``lr`` and ``weight_decay``), through
    ``timm.optim.create_optimizer_v2``: timm's per-optimizer defaults apply (sgd is Nesterov, momentum classical),
    ``momentum`` reaches the optimizers that have one and ``betas`` those that take them (``optimizer_betas``), as
    timm's ``--momentum`` / ``--opt-betas``. With "adamw" this is ``torch.optim.AdamW(groups, lr, betas)``: the
    zoo's default before the option existed, step for step."""
    from timm.optim import create_optimizer_v2

    given = optimizer_betas(name, betas)
    betas_option = {} if given is None else {"betas": given}
    return create_optimizer_v2(groups, opt=name, lr=lr, momentum=momentum, **betas_option)


def check_scheduler(name) -> str:
    """``name`` when it is one of SCHEDULERS, refused in one line otherwise."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}")
    return name


def _warmup(step: int, warmup_steps: int) -> Optional[float]:
    """The warm-up factor (linear from 1/warmup to 1) during the first ``warmup_steps`` steps, None after them."""
    return (step + 1) / warmup_steps if warmup_steps > 0 and step < warmup_steps else None


def _progress(step: int, total_steps: int, warmup_steps: int) -> float:
    """How far a step after the warm-up is through the rest of the run, 0 to 1."""
    return min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """lr factor: linear from 1/warmup to 1 over ``warmup_steps``, then cosine down to ``min_ratio``."""
    warm = _warmup(step, warmup_steps)
    if warm is not None:
        return warm
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * _progress(step, total_steps, warmup_steps)))


def warmup_linear(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """lr factor: the warm-up, then a straight line from 1 down to ``min_ratio`` at the last step."""
    warm = _warmup(step, warmup_steps)
    if warm is not None:
        return warm
    return min_ratio + (1.0 - min_ratio) * (1.0 - _progress(step, total_steps, warmup_steps))


def warmup_step_decay(step: int, warmup_steps: int, decay_steps: int, decay_rate: float) -> float:
    """lr factor: the warm-up, then ``decay_rate ** (step // decay_steps)``, counted from the run's first step
    as timm's ``--sched step`` counts epochs (``StepLRScheduler`` from ``create_scheduler_v2``, whose
    ``warmup_prefix`` is off: lr * decay_rate ** floor(epoch / decay_epochs)). No min_lr_ratio floor, as timm's."""
    warm = _warmup(step, warmup_steps)
    return warm if warm is not None else decay_rate ** (step // decay_steps)


def lr_schedule(
    name: str, total_steps: int, warmup_steps: int, min_ratio: float = 0.0, decay_steps: int = 1,
    decay_rate: float = 1.0,
) -> Callable[[int], float]:
    """The lr factor of optimizer step ``step`` (for ``LambdaLR``) under schedule ``name`` (one of SCHEDULERS):
    "constant" stays at 1 after the warm-up; ``decay_steps`` / ``decay_rate`` are those of "step"."""
    if check_scheduler(name) == "cosine":
        return lambda step: warmup_cosine(step, total_steps, warmup_steps, min_ratio)
    if name == "linear":
        return lambda step: warmup_linear(step, total_steps, warmup_steps, min_ratio)
    if name == "step":
        return lambda step: warmup_step_decay(step, warmup_steps, decay_steps, decay_rate)
    return lambda step: _warmup(step, warmup_steps) or 1.0
