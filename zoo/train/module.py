"""Task-independent LightningModule base: a plain ``nn.Module`` in, optimizer + warm-up/decay schedule out.

The task modules (``zoo.tasks.<domain>.module``) subclass :class:`ZooModule` and write only their
``training_step``/``validation_step``/metrics. The base provides

* the model as ``self.model`` (built elsewhere -- by Hydra via ``zoo.create_model`` -- as in
  lightning-hydra-template), its registry name and constructor arguments stored in the hyper-parameters
  (``model_name``, ``model_args``) so a ``.ckpt`` can rebuild it without Hydra;
* an optimizer by timm name (``optimizer``: AdamW by default, or sgd, lamb, lion, ... as timm's ``--opt``,
  built by ``timm.optim.create_optimizer_v2``) with no weight decay on norms/biases/position tables and optional
  layer-wise lr decay (``layer_decay``, with timm's ``layer_decay_min_scale`` / ``layer_decay_no_opt_scale``), and a
  per-step linear warm-up then cosine (default), linear, constant or step decay
  (``scheduler``, timm's ``--sched``; :mod:`zoo.train.optim`);
* optional gradient checkpointing (``grad_checkpointing``: the model's ``set_grad_checkpointing(True)``, timm's
  ``--grad-checkpointing``), which recomputes each block's activations in backward to save memory;
* an optional EMA copy of the weights (:mod:`zoo.train.ema`) used for evaluation and export: ``ema_decay``, with
  ``ema_warmup`` (the TF-style warm-up, on by default; ``"timm"`` is timm's ``--model-ema-warmup`` curve, off timm's
  ``--model-ema`` without it)
  and ``ema_buffers`` (``copy`` the BatchNorm statistics, or ``average`` them as timm's ``ModelEmaV3`` does);
* reseeding of the global RNGs before every training batch from ``(seed, epoch, batch index, rank)``:
  with the data modules' epoch-seeded sampler and per-sample augmentation seeds, a run resumed from a
  checkpoint replays exactly what the uninterrupted run would have done (dropout, mixup, augmentation
  included), whatever else drew random numbers in between (e.g. DataLoader iterator creation);
* optional channels-last memory format for the model and its inputs;
* optional ``torch.compile`` of the model (``torch_compile``: a backend name, or True for inductor; timm's
  ``--torchcompile``). The model is compiled in place (``nn.Module.compile``), so its state-dict keys, the
  checkpoints and the released weights are the same as without; the EMA copy stays eager;
* gradient clipping: Lightning's (``trainer.gradient_clip_val`` with ``gradient_clip_algorithm`` norm or value), or
  timm's adaptive gradient clipping: the constructor argument ``adaptive_clip_factor`` (saved in the
  hyper-parameters; zoo train sets it from ``trainer.gradient_clip_algorithm=agc`` and ``trainer.gradient_clip_val``):
  :meth:`ZooModule.configure_gradient_clipping`. The two are exclusive: a Trainer with ``gradient_clip_val`` and a
  module with ``adaptive_clip_factor`` is refused when fitting starts;
* Lightning's own entry points: ``Module.load_from_checkpoint(path)`` rebuilds the model from the ``model_name``
  / ``model_args`` in the checkpoint (``model=`` still overrides), and ``lr`` is a live attribute, so Lightning's
  learning-rate finder (``Tuner(trainer).lr_find(module)``, which sets ``module.lr`` and ``hparams.lr``) sets the
  rate the next ``fit`` trains with.
"""
from __future__ import annotations

import math
import random
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn as nn

from zoo.layers import check_flag
from zoo.train.ema import BUFFER_MODES, ModelEma, check_warmup
from zoo.train.optim import (check_optimizer, check_scheduler, create_optimizer, lr_schedule, optimizer_betas,
                             param_groups)

__all__ = ["ZooModule"]


def compile_backend(torch_compile: bool | str | None, option: str = "torch_compile") -> str | None:
    """The ``torch.compile`` backend a ``torch_compile`` option asks for: None/False none, True inductor, or
    a backend name (``torch.compiler.list_backends``: inductor, aot_eager, eager, ...). ``option`` names the
    setting in the error message (the benchmarks' ``--compile``)."""
    if torch_compile is None or torch_compile is False:
        return None
    if torch_compile is True:
        return "inductor"
    known = torch.compiler.list_backends(exclude_tags=())
    if isinstance(torch_compile, str) and torch_compile in known:
        return torch_compile
    raise ValueError(
        f"{option} must be true/false/null or a torch.compile backend ({', '.join(sorted(known))}), "
        f"got {torch_compile!r}"
    )


def _real(name: str, value, minimum: Optional[float] = None) -> float:
    """A finite number option (task.<name> in zoo train), named in the error; ``minimum`` inclusive."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return float(value)


def _clip_factor(value) -> Optional[float]:
    """``adaptive_clip_factor``: None (off) or a positive finite number."""
    if value is None:
        return None
    if _real("adaptive_clip_factor", value) <= 0:
        raise ValueError(f"adaptive_clip_factor (adaptive gradient clipping; in zoo train trainer.gradient_clip_val with "
                         f"trainer.gradient_clip_algorithm=agc) needs its clip factor positive (timm's --clip-grad, e.g. "
                         f"0.01) or None, got {value!r}")
    return float(value)


class ZooModule(pl.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: Sequence[float] = (0.9, 0.999),
        warmup_epochs: float = 1.0,
        min_lr_ratio: float = 0.01,
        layer_decay: Optional[float] = None,
        ema_decay: float = 0.0,
        channels_last: bool = False,
        torch_compile: bool | str | None = None,
        seed: int = 0,
        optimizer: str = "adamw",
        momentum: float = 0.9,
        scheduler: str = "cosine",
        decay_epochs: float = 90.0,
        decay_rate: float = 0.1,
        grad_checkpointing: bool = False,
        ema_warmup: bool | str = True,
        ema_buffers: str = "copy",
        adaptive_clip_factor: Optional[float] = None,
        layer_decay_min_scale: float = 0.0,
        layer_decay_no_opt_scale: Optional[float] = None,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__} needs an nn.Module as model, got {type(model).__name__}")
        if _real("lr", lr) <= 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        _real("weight_decay", weight_decay, 0.0)
        _real("warmup_epochs", warmup_epochs, 0.0)
        if _real("min_lr_ratio", min_lr_ratio, 0.0) > 1.0:  # above 1 the cosine "decay" rose above lr
            raise ValueError(f"min_lr_ratio must be in [0, 1] (the final lr as a fraction of lr), got {min_lr_ratio!r}")
        _real("ema_decay", ema_decay)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) not in (2, 3):
            raise ValueError(f"betas must be a pair of numbers in [0, 1) (three for Adan), got {betas!r}")
        for beta in betas:
            if not 0.0 <= _real("betas", beta) < 1.0:
                raise ValueError(f"betas must be a pair of numbers in [0, 1) (three for Adan), got {betas!r}")
        if layer_decay is not None and not 0.0 < _real("layer_decay", layer_decay) <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1] or None, got {layer_decay!r}")
        if not 0.0 <= float(ema_decay) < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0 disables EMA), got {ema_decay!r}")
        ema_warmup = check_warmup(ema_warmup, "ema_warmup")
        adaptive_clip_factor = _clip_factor(adaptive_clip_factor)
        if ema_buffers not in BUFFER_MODES:
            raise ValueError(f"ema_buffers must be copy (the EMA takes the model's BatchNorm statistics) or average "
                             f"(floating-point buffers averaged like the weights, timm ModelEmaV3's default), got {ema_buffers!r}")
        if not 0.0 <= _real("layer_decay_min_scale", layer_decay_min_scale) <= 1.0:
            raise ValueError(f"layer_decay_min_scale must be in [0, 1] (the smallest layer-decay lr scale, timm's "
                             f"--layer-decay-min-scale), got {layer_decay_min_scale!r}")
        if layer_decay_no_opt_scale is not None and not 0.0 <= _real("layer_decay_no_opt_scale",
                                                                     layer_decay_no_opt_scale) <= 1.0:
            raise ValueError(f"layer_decay_no_opt_scale must be in [0, 1] or None (layers whose lr scale is below it are "
                             f"frozen, timm's --layer-decay-no-opt-scale), got {layer_decay_no_opt_scale!r}")
        if layer_decay is None and (layer_decay_min_scale or layer_decay_no_opt_scale):
            raise ValueError("layer_decay_min_scale / layer_decay_no_opt_scale act on layer-wise lr decay, which is off "
                             "(layer_decay=None): set layer_decay too, or leave them at 0 / None")
        optimizer = check_optimizer(optimizer)
        optimizer_betas(optimizer, betas)  # as many as the optimizer takes
        if not 0.0 <= _real("momentum", momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1) (the SGD-family momentum, timm's 0.9), got {momentum!r}")
        scheduler = check_scheduler(scheduler)
        if _real("decay_epochs", decay_epochs) <= 0:
            raise ValueError(f"decay_epochs must be positive (epochs between step decays), got {decay_epochs!r}")
        if not 0.0 < _real("decay_rate", decay_rate) <= 1.0:
            raise ValueError(f"decay_rate must be in (0, 1] (the lr factor of each step decay), got {decay_rate!r}")
        if check_flag(grad_checkpointing, "grad_checkpointing"):
            # a model without it would silently train without checkpointing, at the full activation memory
            if not callable(getattr(model, "set_grad_checkpointing", None)):
                name = getattr(model, "zoo_model_name", type(model).__name__)
                raise ValueError(f"grad_checkpointing is on but the model {name} has no set_grad_checkpointing "
                                 "(timm's switch): turn grad_checkpointing off for it")
            model.set_grad_checkpointing(True)
        self.model = model
        self.channels_last = check_flag(channels_last, "channels_last")  # "maybe" used to switch it on
        if self.channels_last:
            # the 4-D weights (convolutions) only: nn.Module.to(memory_format=torch.channels_last) also converts
            # 5-D tensors and refuses them ("required rank 4 tensor"), and Agent-DeiT's official bias tables are 5-D
            self.model = self.model._apply(
                lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t)
        backend = compile_backend(torch_compile)
        if layer_decay is not None and layer_decay_no_opt_scale:
            # timm's create_optimizer_v2 freezes those parameters (requires_grad=False) when it builds the groups; here
            # at construction, before Lightning wraps the model (DDP registers only the trainable parameters)
            param_groups(self.model, float(weight_decay), float(layer_decay), min_scale=float(layer_decay_min_scale),
                         no_opt_scale=float(layer_decay_no_opt_scale))
            if not any(p.requires_grad for p in self.model.parameters()):
                raise ValueError(f"layer_decay_no_opt_scale={layer_decay_no_opt_scale} freezes every parameter (the "
                                 f"largest lr scale is 1): lower it")
        self.model_ema = (ModelEma(self.model, float(ema_decay), warmup=ema_warmup, buffers=ema_buffers)
                          if ema_decay > 0 else None)
        if backend is not None:  # after the EMA copy, which stays eager (it only runs evaluation)
            self.model.compile(backend=backend)
        self._opt_cfg = dict(
            lr=float(lr), weight_decay=float(weight_decay), betas=tuple(float(b) for b in betas),
            warmup_epochs=float(warmup_epochs), min_lr_ratio=float(min_lr_ratio),
            layer_decay=None if layer_decay is None else float(layer_decay), optimizer=optimizer,
            momentum=float(momentum), scheduler=scheduler, decay_epochs=float(decay_epochs),
            decay_rate=float(decay_rate), layer_decay_min_scale=float(layer_decay_min_scale),
            layer_decay_no_opt_scale=None if layer_decay_no_opt_scale is None else float(layer_decay_no_opt_scale),
        )
        self.seed = int(seed)
        self._adaptive_clip_factor = adaptive_clip_factor

    @property
    def adaptive_clip_factor(self) -> Optional[float]:
        """timm's adaptive gradient clipping factor (``--clip-mode agc --clip-grad F``), None for Lightning's
        clipping. A constructor argument; zoo train sets it from ``trainer.gradient_clip_algorithm=agc`` and
        ``trainer.gradient_clip_val`` after building the module, so the setter also records it in the
        hyper-parameters of a module that saves it (the task modules whose constructor takes it)."""
        return self._adaptive_clip_factor

    @adaptive_clip_factor.setter
    def adaptive_clip_factor(self, value: Optional[float]) -> None:
        self._adaptive_clip_factor = _clip_factor(value)
        if "adaptive_clip_factor" in self.hparams:
            self.hparams["adaptive_clip_factor"] = self._adaptive_clip_factor

    @property
    def lr(self) -> float:
        """The base learning rate of the next ``configure_optimizers`` (each parameter group gets it times its
        layer-decay scale). Settable, as Lightning's learning-rate finder does (``lr_find(update_attr=True)``
        writes ``module.lr`` and ``module.hparams.lr``): the rate used to be read from a private copy taken at
        construction, so the finder's suggestion was silently ignored."""
        return self._opt_cfg["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        if _real("lr", value) <= 0:
            raise ValueError(f"lr must be positive, got {value!r}")
        self._opt_cfg["lr"] = float(value)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):  # type: ignore[override]
        """Lightning's ``load_from_checkpoint``, with the model rebuilt from the checkpoint when ``model=`` is not
        given: ``zoo.create_model(model_name, **model_args)`` from the hyper-parameters every zoo module records
        (``record_model_spec``). The model is not a hyper-parameter (it is an ``nn.Module``), so Lightning's own
        method failed with "missing 1 required positional argument: 'model'". The file is read as Lightning reads
        it (a local path or an fsspec URL, the caller's ``weights_only``)."""
        if "model" not in kwargs:
            kwargs["model"] = cls._model_from_checkpoint(checkpoint_path, kwargs.get("weights_only"))
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    @classmethod
    def _model_from_checkpoint(cls, checkpoint_path, weights_only: Optional[bool] = None) -> nn.Module:
        import os

        from lightning.fabric.utilities.cloud_io import _load

        import zoo

        if not isinstance(checkpoint_path, (str, os.PathLike)):
            raise TypeError(f"{cls.__name__}.load_from_checkpoint: give the checkpoint as a path or URL to rebuild its "
                            f"model, or pass model=<nn.Module> with a {type(checkpoint_path).__name__}")
        checkpoint = _load(checkpoint_path, map_location="cpu", weights_only=weights_only)
        hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
        name = (hparams or {}).get("model_name")
        if not isinstance(name, str):
            raise ValueError(f"{checkpoint_path}: its hyper-parameters have no model_name (the model was not built by "
                             f"zoo.create_model): pass model=<the nn.Module> to {cls.__name__}.load_from_checkpoint")
        return zoo.create_model(name, **dict(hparams.get("model_args") or {}))

    # -------------------------------------------------------------- bookkeeping
    def record_model_spec(self, extra: Optional[dict[str, Any]] = None) -> None:
        """Put the model's registry name/arguments (and ``extra``) into the saved hyper-parameters."""
        name = getattr(self.model, "zoo_model_name", None)
        args = getattr(self.model, "zoo_model_args", None)
        if name is not None:
            self.hparams["model_name"] = name
            self.hparams["model_args"] = dict(args or {})
        for key, value in (extra or {}).items():
            self.hparams[key] = value

    @property
    def eval_model(self) -> nn.Module:
        """The weights used for validation, test, prediction and export (the EMA copy when enabled)."""
        return self.model_ema.evaluator() if self.model_ema is not None else self.model

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    # -------------------------------------------------------------- metric states across Trainer calls
    def _renew_inference_metric_states(self) -> None:
        """Reset the torchmetrics metrics whose states are inference tensors, when this stage does not run under
        inference mode. ``Trainer.validate`` / ``test`` run under ``torch.inference_mode`` and the epoch-end reset
        leaves inference-tensor states; a later ``Trainer.fit`` of the same module (whose validation runs
        outside inference mode) then failed in the first in-place update ("Inplace update to inference tensor
        outside InferenceMode")."""
        if torch.is_inference_mode_enabled():
            return
        from torchmetrics import Metric

        def inference(value) -> bool:
            values = value if isinstance(value, list) else [value]
            return any(isinstance(v, torch.Tensor) and v.is_inference() for v in values)

        for metric in self.modules():
            if isinstance(metric, Metric) and any(inference(v) for v in metric.metric_state.values()):
                metric.reset()

    def on_train_start(self) -> None:
        """Each parameter group's lr set from the schedule at the restored step: Lightning restores the optimizer's
        param_groups (their lr is what the OLD schedule set for the next step) and the scheduler's step count, and
        LambdaLR recomputes the lr only at its next step, so a run resumed with a longer or other schedule trained
        its first step at the old curve's value (0.01 x lr at the end of a cosine run, where the new one gives 0.75).
        Equal to the restored value when the schedule is unchanged (the same expression), and at a fresh start."""
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                lrs = [base * factor(scheduler.last_epoch)
                       for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
                for group, lr in zip(scheduler.optimizer.param_groups, lrs):
                    group["lr"] = lr
                scheduler._last_lr = lrs

    def on_fit_start(self) -> None:
        self._check_one_gradient_clipping()
        self._renew_inference_metric_states()

    def _check_one_gradient_clipping(self) -> None:
        """Adaptive gradient clipping and a Trainer's ``gradient_clip_val`` are refused together: only one clipping
        runs (:meth:`configure_gradient_clipping`), and the norm / value clipping asked of the Trainer was skipped
        without a word."""
        clip_val = getattr(self._trainer, "gradient_clip_val", None) if self._trainer is not None else None
        if self.adaptive_clip_factor is not None and clip_val is not None:
            algorithm = getattr(self._trainer, "gradient_clip_algorithm", None) or "norm"
            raise ValueError(
                f"{type(self).__name__} has adaptive_clip_factor={self.adaptive_clip_factor} (adaptive gradient "
                f"clipping) and the Trainer has gradient_clip_val={clip_val} ({algorithm} clipping): only one gradient "
                "clipping runs, so pick one (Trainer(gradient_clip_val=None), or adaptive_clip_factor=None)")

    def on_validation_start(self) -> None:
        self._renew_inference_metric_states()

    def on_test_start(self) -> None:
        self._renew_inference_metric_states()

    # -------------------------------------------------------------- determinism
    def on_train_batch_start(self, batch, batch_idx) -> None:
        seed = hash((self.seed, self.current_epoch, batch_idx, self.global_rank)) % (2**31 - 1)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # the EMA moves right after each optimizer step, as timm's train.py updates it: with accumulate_grad_batches=N
        # a batch that only accumulated gradients leaves it alone (it moved every batch: decay D^N per step, and the
        # warm-up counter ran N times too fast). Updated here rather than at the batch's end, the EMA is current
        # when a checkpoint callback saves at that batch's end (LastCheckpoint at the step trainer.max_steps ends)
        if self.model_ema is not None:
            self.model_ema.update(self.model)

    # -------------------------------------------------------------- optimisation
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping (trainer.gradient_clip_val, gradient_clip_algorithm norm or value), or, with
        ``adaptive_clip_factor`` F set, adaptive gradient clipping (Brock et al. 2021, "High-Performance Large-Scale
        Image Recognition Without Normalization", NFNets): ``timm.utils.adaptive_clip_grad(parameters, F)``, each
        output unit's gradient scaled down to at most F times its weights' norm, as timm's train.py runs it for
        ``--clip-mode agc --clip-grad F``, where the classifier is left unclipped (``model_parameters(model,
        exclude_head=True)``, as the paper leaves the final linear layer): here the classifier's keys
        (:func:`zoo.hub.head_keys`), not timm's last two parameters. Lightning calls this after the gradients are
        complete (accumulated, all-reduced under DDP, unscaled under fp16 AMP) and before the optimizer step."""
        if self.adaptive_clip_factor is None:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        self._check_one_gradient_clipping()
        from timm.utils import adaptive_clip_grad

        adaptive_clip_grad(self.adaptive_clip_parameters(), clip_factor=self.adaptive_clip_factor)

    def adaptive_clip_parameters(self) -> list[nn.Parameter]:
        """The parameters adaptive gradient clipping clips: the trainable ones outside the classifier."""
        from zoo.hub import head_keys

        head = set(head_keys(self.model))
        return [p for name, p in self.model.named_parameters() if p.requires_grad and name not in head]

    def _optimizer_steps_per_epoch(self, total: int) -> float:
        """Optimizer steps in one epoch, for converting warmup_epochs: the training batches over the gradient
        accumulation. (total / max_epochs was wrong when trainer.max_steps ends the run first: a 1-epoch warm-up
        became 2 steps of 13, or with max_epochs=-1 the whole run.)"""
        trainer = self.trainer
        try:
            trainer.fit_loop.setup_data()  # what estimated_stepping_batches does (skipped there with max_steps)
            batches = trainer.num_training_batches
        except Exception:  # no fit loop data (a bare module under a test trainer): the epoch count decides
            batches = math.inf
        if not math.isfinite(batches):
            return total / (trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1)
        return max(1, math.ceil(batches / max(1, trainer.accumulate_grad_batches)))

    def configure_optimizers(self):
        cfg = self._opt_cfg  # cfg["lr"] is self.lr
        groups = param_groups(self.model, cfg["weight_decay"], cfg["layer_decay"], min_scale=cfg["layer_decay_min_scale"],
                              no_opt_scale=cfg["layer_decay_no_opt_scale"])
        for group in groups:
            group["lr"] = cfg["lr"] * group["lr_scale"]
            group.pop("param_names")
        optimizer = create_optimizer(cfg["optimizer"], groups, cfg["lr"], cfg["momentum"], cfg["betas"])
        stepping = self.trainer.estimated_stepping_batches
        if not math.isfinite(stepping):
            raise ValueError(f"trainer.max_epochs=-1 (no limit) leaves the warm-up + {cfg['scheduler']} learning-rate "
                             "schedule without a length: set trainer.max_epochs, or +trainer.max_steps=N")
        total = int(stepping)
        per_epoch = self._optimizer_steps_per_epoch(total)
        warmup = int(round(cfg["warmup_epochs"] * per_epoch))
        decay_steps = max(1, int(round(cfg["decay_epochs"] * per_epoch)))  # epochs -> steps, as warmup_epochs
        factor = lr_schedule(cfg["scheduler"], total, warmup, cfg["min_lr_ratio"], decay_steps, cfg["decay_rate"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
