"""Exponential moving average of model weights (Polyak averaging; the update of timm's ``ModelEmaV3``).

``ema = decay_t * ema + (1 - decay_t) * weights`` after every optimiser step. With ``warmup`` the decay
follows TensorFlow's ``tf.train.ExponentialMovingAverage(num_updates=t)``:
``decay_t = min(decay, (1 + t) / (10 + t))``, so early averages are not dominated by the random
initialisation; without it ``decay_t = decay`` (equal to timm ``ModelEmaV3(use_warmup=False)``, tested). Buffers (e.g. BatchNorm statistics) are copied, not averaged.
The copy is a submodule of the LightningModule, so it is saved in and resumed from ``.ckpt`` files.
Its train/eval flags follow the parent's like any submodule's (so Lightning does not warn about modules left
in eval mode at the start of training); it is never trained, and it is always *evaluated* in eval mode:
``ModelEma.__call__`` and the LightningModule's ``eval_model`` switch it to eval first.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from zoo.layers import check_flag

__all__ = ["ModelEma"]


class ModelEma(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay!r}")
        self.module = copy.deepcopy(model)
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.decay = float(decay)
        self.warmup = check_flag(warmup, "EMA warmup")
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        t = int(self.num_updates)
        return min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        ema_params = dict(self.module.named_parameters())
        for name, param in model.named_parameters():
            ema = ema_params[name]
            ema.lerp_(param.detach().to(ema.dtype), 1.0 - decay)
        ema_buffers = dict(self.module.named_buffers())
        for name, buffer in model.named_buffers():
            ema_buffers[name].copy_(buffer)
        self.num_updates += 1

    def evaluator(self) -> nn.Module:
        """The averaged model, switched to eval mode (dropout off, BatchNorm on its running statistics)."""
        if self.module.training:
            self.module.eval()
        return self.module

    def forward(self, *args, **kwargs):
        return self.evaluator()(*args, **kwargs)
