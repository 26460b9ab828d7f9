"""Exponential moving average of model weights (Polyak averaging; the update of timm's ``ModelEmaV3``).

``ema = decay_t * ema + (1 - decay_t) * weights`` after every optimiser step (t = 0, 1, ... counts the updates
before this one). ``warmup`` picks the decay's curve, so that early averages are not dominated by the random
initialisation:

* ``True`` (the default): TensorFlow's ``tf.train.ExponentialMovingAverage(num_updates=t)``,
  ``decay_t = min(decay, (1 + t) / (10 + t))``;
* ``"timm"``: timm's ``--model-ema-warmup``, ``ModelEmaV3(decay, use_warmup=True)`` as timm's train.py updates it
  (``update(model, step=num_updates)``, timm/utils/model_ema.py ``get_decay``): the first update copies the weights
  (``decay_0 = 0``), then ``decay_t = min(decay, 1 - (1 + t) ** (-2/3))``;
* ``False``: timm's ``--model-ema`` without warm-up, ``ModelEmaV3(decay)`` as train.py updates it: the first update
  copies the weights, then ``decay_t = decay``.
``buffers``: ``"copy"`` (the default) copies the buffers (BatchNorm running statistics) from the model, timm's
``ModelEmaV3(exclude_buffers=True)``; ``"average"`` averages the floating-point buffers like the weights and copies
the others (``num_batches_tracked``), timm's default ``exclude_buffers=False``. Both tested against timm step by step.
The copy is a submodule of the LightningModule, so it is saved in and resumed from ``.ckpt`` files.

Low-precision weights (``trainer.precision=bf16-true`` / ``16-true`` cast the copy with the model): the update
``(1 - decay) * (weights - ema)`` is far below a bf16 weight's resolution (1/128 of its size) and rounded to
nearest it never moved the average. It is computed in fp32 and rounded *stochastically*: up or down to the
neighbouring low-precision value with the probabilities that make the expectation the fp32 result, so small
updates accumulate (the remedy of timm 1.0.31's ``ModelEmaV3``, timm/utils/model_ema.py, here for fp16 too).
The random bits come from a generator seeded with the update count: identical on every DDP rank and after a
resume.
Its train/eval flags follow the parent's like any submodule's (so Lightning does not warn about modules left
in eval mode at the start of training); it is never trained, and it is always *evaluated* in eval mode:
``ModelEma.__call__`` and the LightningModule's ``eval_model`` switch it to eval first.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


__all__ = ["ModelEma"]


BUFFER_MODES = ("copy", "average")
#: The warm-up curves of ``ModelEma(warmup=...)`` (module docstring); bools by identity (1 and 0 are not flags).
WARMUP_MODES = (True, False, "timm")


def check_warmup(warmup, name: str = "EMA warmup"):
    """``warmup`` if it is one of :data:`WARMUP_MODES`, else ValueError naming ``name`` and the choices."""
    if not (warmup is True or warmup is False or (isinstance(warmup, str) and warmup in WARMUP_MODES)):
        raise ValueError(f"{name} must be true (TF-style warm-up, min(decay, (1 + t) / (10 + t))), false (no warm-up: "
                         f"timm's --model-ema) or 'timm' (timm's --model-ema-warmup, 1 - (1 + t) ** -2/3), got "
                         f"{warmup!r}")
    return warmup


class ModelEma(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool | str = True, buffers: str = "copy"):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay!r}")
        if buffers not in BUFFER_MODES:
            raise ValueError(f"EMA buffers must be copy (BatchNorm statistics taken from the model) or average "
                             f"(floating-point buffers averaged like the weights, timm ModelEmaV3's default), got {buffers!r}")
        self.module = copy.deepcopy(model)
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.decay = float(decay)
        self.warmup = check_warmup(warmup)
        self.buffers_mode = buffers
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        t = int(self.num_updates)
        if self.warmup is True:
            return min(self.decay, (1 + t) / (10 + t))
        if t == 0:  # timm's train.py: update(model, step=1) -> get_decay's step 0 -> decay 0 (a copy)
            return 0.0
        return min(self.decay, 1.0 - (1.0 + t) ** (-2.0 / 3.0)) if self.warmup == "timm" else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        generators: dict[torch.device, torch.Generator] = {}
        ema_params = dict(self.module.named_parameters())
        for name, param in model.named_parameters():
            self._average_into_(ema_params[name], param.detach(), 1.0 - decay, generators)
        ema_buffers = dict(self.module.named_buffers())
        for name, buffer in model.named_buffers():
            if self.buffers_mode == "average" and ema_buffers[name].is_floating_point():
                self._average_into_(ema_buffers[name], buffer, 1.0 - decay, generators)
            else:
                ema_buffers[name].copy_(buffer)
        self.num_updates += 1

    def _average_into_(self, ema: torch.Tensor, value: torch.Tensor, weight: float,
                       generators: dict[torch.device, torch.Generator]) -> None:
        """``ema <- ema + weight * (value - ema)``; a bf16 / fp16 ``ema`` is computed in fp32 and rounded
        stochastically (module docstring), from one generator per device seeded with the update count."""
        if ema.dtype in (torch.bfloat16, torch.float16):
            if ema.device not in generators:
                generators[ema.device] = torch.Generator(ema.device).manual_seed(int(self.num_updates))
            averaged = ema.float().lerp_(value.float(), weight)
            _stochastic_round_into_(ema, averaged, generators[ema.device])
        else:
            ema.lerp_(value.to(ema.dtype), weight)

    def evaluator(self) -> nn.Module:
        """The averaged model, switched to eval mode (dropout off, BatchNorm on its running statistics)."""
        if self.module.training:
            self.module.eval()
        return self.module

    def forward(self, *args, **kwargs):
        return self.evaluator()(*args, **kwargs)


def _stochastic_round_into_(target: torch.Tensor, value: torch.Tensor, generator: torch.Generator) -> None:
    """``target`` (bf16 / fp16) <- fp32 ``value`` rounded to one of its two neighbouring ``target.dtype`` values, the
    farther one with probability distance / gap, so the expected result is ``value`` itself (round-to-nearest would
    drop every update smaller than half a step)."""
    nearest = value.to(target.dtype)
    error = value - nearest.float()  # in (-gap/2, gap/2]
    away = torch.full_like(nearest, float("inf")).masked_fill_(error < 0, float("-inf"))
    neighbour = torch.nextafter(nearest, away)
    gap = neighbour.float() - nearest.float()
    probability = torch.where(gap != 0, error / gap, torch.zeros_like(error))  # inf / overflow: keep nearest
    draw = torch.rand(value.shape, generator=generator, device=value.device)
    target.copy_(torch.where(draw < probability, neighbour, nearest))
