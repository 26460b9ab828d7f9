"""Image classification LightningModule (the vision task of ``zoo train``).

Receives a plain ``nn.Module`` (built by Hydra through ``zoo.create_model``) and trains it with the timm
recipe pieces users expect, each a constructor argument (and a key of ``configs/task/classification.yaml``):

* any timm optimizer by name (``optimizer``, AdamW by default; timm's ``create_optimizer_v2``), linear warm-up +
  cosine / linear / constant / step decay per step, no weight decay on norms/biases (``zoo.train.ZooModule``);
* label smoothing (Szegedy et al., CVPR 2016);
* mixup (Zhang et al., ICLR 2018) and CutMix (Yun et al., ICCV 2019), as timm's ``Mixup`` (timm/data/mixup.py):
  each image mixed with its partner in the reversed batch, CutMix's lambda corrected to the actual box area;
  CutMix instead of mixup with probability ``mix_switch_prob`` (0.5) when both are on; one draw for the whole batch
  (``mix_mode=batch``), one per image (``elem``) or one per pair of partners, both mixed with it (``pair``);
  ``cutmix_minmax=[min, max]``: timm's min/max box (each side a uniform fraction of the image, lambda from its area)
  instead of the Beta-drawn one, which switches CutMix on as in timm; no mixing from epoch ``mixup_off_epoch`` on
  (0: never off), timm train.py's ``--mixup-off-epoch``;
* EMA of the weights (evaluation/export use the average; ``ema_warmup``, ``ema_buffers``), layer-wise lr decay for
  fine-tuning (``layer_decay_min_scale``, ``layer_decay_no_opt_scale`` as timm's), channels-last; gradient clipping
  and bf16 autocast are Trainer options (``trainer.gradient_clip_val``, ``trainer.precision=bf16-mixed``, which
  autocasts on CPU too), timm's adaptive gradient clipping the argument ``adaptive_clip_factor``;
* top-1 / top-5 accuracy (torchmetrics), logged as ``{train,val,test}/{loss,acc1,acc5}``; the epoch's training
  means of a run resumed in the middle of that epoch start from the checkpoint's metric states
  (:class:`zoo.train.epoch_metrics.ResumableEpochMetrics`), not from zero.

Fine-tuning: ``zoo train experiment=... model.pretrained=<released dir>`` loads the weights through
``zoo.create_model``; a different class count re-initialises the head with a logged message.

Letters: B batch, C channels, H/W image size, K classes.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.aggregation import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from zoo.train.epoch_metrics import ResumableEpochMetrics
from zoo.train.module import ZooModule, _real

__all__ = ["MIX_MODES", "ImageClassifier", "cutmix_box_minmax", "mix_batch", "mix_elements", "soft_targets"]

MIX_MODES = ("batch", "pair", "elem")


def soft_targets(labels_B: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot targets with label smoothing: 1 - s + s/K on the label, s/K elsewhere. (B, K), float32 always:
    under ``trainer.precision=bf16-true`` / ``16-true`` Lightning makes the low precision torch's default dtype
    inside training_step, and bf16 targets (0.91 -> 0.910156, 0.01 -> 0.010010) no longer summed to 1."""
    off = smoothing / num_classes
    targets_BK = torch.full((labels_B.shape[0], num_classes), off, dtype=torch.float32, device=labels_B.device)
    return targets_BK.scatter_(1, labels_B[:, None], 1.0 - smoothing + off)


def cutmix_box(height: int, width: int, lam: float, generator: Optional[torch.Generator] = None) -> tuple[int, int, int, int]:
    """A box of cut_h x cut_w = int(H sqrt(1 - lam)) x int(W sqrt(1 - lam)) at a uniform centre, clipped to the
    image: (y0, y1, x0, x1), as timm's ``rand_bbox`` (timm/data/mixup.py): [c - cut // 2, c + (cut + 1) // 2), so an
    odd cut keeps its size (with c + cut // 2 it lost a pixel row and column: a cut of 1 pasted nothing)."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(0, height, (1,), generator=generator))
    cx = int(torch.randint(0, width, (1,), generator=generator))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, width)
    return y0, y1, x0, x1


def cutmix_box_minmax(height: int, width: int, minmax: Sequence[float],
                      generator: Optional[torch.Generator] = None) -> tuple[int, int, int, int]:
    """timm's ``rand_bbox_minmax`` (timm/data/mixup.py, from Darknet's CutMix): a cut_h x cut_w box, each side a
    uniform integer in [int(H min), int(H max)) (the upper end excluded, as numpy's ``randint``), at a uniform
    position wholly inside the image: (y0, y1, x0, x1)."""
    low_h, high_h = int(height * minmax[0]), int(height * minmax[1])
    low_w, high_w = int(width * minmax[0]), int(width * minmax[1])
    if high_h <= low_h or high_w <= low_w:
        raise ValueError(f"cutmix_minmax={list(minmax)} leaves no box size for {height} x {width} images (int(size * "
                         f"min) must be below int(size * max), as in timm): widen it")
    cut_h = int(torch.randint(low_h, high_h, (1,), generator=generator))
    cut_w = int(torch.randint(low_w, high_w, (1,), generator=generator))
    y0 = int(torch.randint(0, height - cut_h + 1, (1,), generator=generator))
    x0 = int(torch.randint(0, width - cut_w + 1, (1,), generator=generator))
    return y0, y0 + cut_h, x0, x0 + cut_w


def _box(height: int, width: int, lam: float, cutmix_minmax: Optional[Sequence[float]]) -> tuple[int, int, int, int]:
    return cutmix_box(height, width, lam) if cutmix_minmax is None else cutmix_box_minmax(height, width, cutmix_minmax)


def mix_batch(
    x_BCHW: torch.Tensor,
    targets_BK: torch.Tensor,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    cutmix_minmax: Optional[Sequence[float]] = None,
) -> tuple[torch.Tensor, torch.Tensor, float, str]:
    """Mix the batch with its reverse (timm's "batch" mode). Returns (x, targets, lam, kind), kind in
    {"none", "mixup", "cutmix"}; ``lam`` is the weight of the original image in the targets. ``cutmix_minmax``
    switches CutMix on with timm's min/max box (:func:`cutmix_box_minmax`; timm then sets cutmix_alpha to 1 and
    takes lambda from the box area).

    The random switches and lambda are drawn in float32 whatever torch's default dtype: under
    ``trainer.precision=bf16-true`` / ``16-true`` Lightning sets it to the low precision inside training_step, and
    ``Beta(alpha, alpha).sample()`` then failed ("dirichlet" not implemented for 'BFloat16'). In a float32 run these
    are the draws of the default dtype, so the numbers (and an exact resume) are unchanged."""
    use_mixup, use_cutmix = mixup_alpha > 0, cutmix_alpha > 0 or cutmix_minmax is not None
    if not (use_mixup or use_cutmix) or float(torch.rand((), dtype=torch.float32)) >= prob:
        return x_BCHW, targets_BK, 1.0, "none"
    cutmix = use_cutmix and (not use_mixup or float(torch.rand((), dtype=torch.float32)) < switch_prob)
    if cutmix and cutmix_minmax is not None:
        lam = 0.0  # the box decides it
    else:
        alpha = torch.tensor(cutmix_alpha if cutmix else mixup_alpha, dtype=torch.float32)
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
    flipped = x_BCHW.flip(0)
    if cutmix:
        height, width = x_BCHW.shape[-2:]
        y0, y1, x0, x1 = _box(height, width, lam, cutmix_minmax)
        x_BCHW = x_BCHW.clone()
        x_BCHW[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
        kind = "cutmix"
    else:
        x_BCHW = x_BCHW * lam + flipped * (1.0 - lam)
        kind = "mixup"
    targets_BK = targets_BK * lam + targets_BK.flip(0) * (1.0 - lam)
    return x_BCHW, targets_BK, lam, kind


def mix_elements(
    x_BCHW: torch.Tensor,
    targets_BK: torch.Tensor,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    pairs: bool = False,
    cutmix_minmax: Optional[Sequence[float]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm's ``Mixup`` modes "elem" (``pairs=False``) and "pair" (timm/data/mixup.py ``_mix_elem`` / ``_mix_pair``):
    image i is mixed with image B - 1 - i of the unmixed batch, each with its own draws: mixed with probability
    ``prob``, CutMix (its own box) instead of mixup with probability ``switch_prob`` when both are on, lambda from
    Beta(alpha, alpha) (from the box area for CutMix). With ``pairs`` one draw serves both partners, each taking the
    other's content (the same box, the same lambda); an odd batch's middle image is left as it is (timm refuses odd
    batches). Returns (x, targets, lam_B), ``lam_B`` (float32) the weight of each image's own targets."""
    batch = x_BCHW.shape[0]
    lam_B = torch.ones(batch, dtype=torch.float32)
    use_mixup, use_cutmix = mixup_alpha > 0, cutmix_alpha > 0 or cutmix_minmax is not None
    if not (use_mixup or use_cutmix):
        return x_BCHW, targets_BK, lam_B.to(targets_BK.device)
    count = batch // 2 if pairs else batch

    def beta(alpha: float) -> torch.Tensor:
        alpha_t = torch.tensor(alpha, dtype=torch.float32)
        return torch.distributions.Beta(alpha_t, alpha_t).sample((count,))

    cutmix_alpha = 1.0 if cutmix_minmax is not None else cutmix_alpha  # as timm's Mixup
    if use_mixup and use_cutmix:
        cutmix_C = torch.rand(count, dtype=torch.float32) < switch_prob
        lam_C = torch.where(cutmix_C, beta(cutmix_alpha), beta(mixup_alpha))
    else:
        cutmix_C = torch.full((count,), use_cutmix)
        lam_C = beta(cutmix_alpha if use_cutmix else mixup_alpha)
    lam_C = torch.where(torch.rand(count, dtype=torch.float32) < prob, lam_C, torch.ones_like(lam_C))
    height, width = x_BCHW.shape[-2:]
    mixed_BCHW = x_BCHW.clone()
    for i in range(count):
        j, lam = batch - 1 - i, float(lam_C[i])
        if lam == 1.0:
            continue
        if cutmix_C[i]:
            y0, y1, x0, x1 = _box(height, width, lam, cutmix_minmax)
            mixed_BCHW[i, ..., y0:y1, x0:x1] = x_BCHW[j, ..., y0:y1, x0:x1]
            if pairs:
                mixed_BCHW[j, ..., y0:y1, x0:x1] = x_BCHW[i, ..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
        else:
            mixed_BCHW[i] = x_BCHW[i] * lam + x_BCHW[j] * (1.0 - lam)
            if pairs:
                mixed_BCHW[j] = x_BCHW[j] * lam + x_BCHW[i] * (1.0 - lam)
        lam_B[i] = lam
        if pairs:
            lam_B[j] = lam
    lam_B1 = lam_B.to(targets_BK.device)[:, None]
    return mixed_BCHW, targets_BK * lam_B1 + targets_BK.flip(0) * (1.0 - lam_B1), lam_B1[:, 0]


def _mix_options(switch_prob, mode, cutmix_minmax, off_epoch) -> tuple[float, str, Optional[tuple[float, float]], int]:
    """The mixing options checked and named: mix_switch_prob in [0, 1], mix_mode one of MIX_MODES, cutmix_minmax None
    or 0 <= min < max <= 1, mixup_off_epoch an int >= 0."""
    if not 0.0 <= _real("mix_switch_prob", switch_prob) <= 1.0:
        raise ValueError(f"mix_switch_prob must be in [0, 1] (the probability of CutMix instead of mixup when both are "
                         f"on), got {switch_prob!r}")
    if mode not in MIX_MODES:
        raise ValueError(f"mix_mode must be one of {', '.join(MIX_MODES)} (timm's Mixup mode), got {mode!r}")
    if cutmix_minmax is not None:
        if isinstance(cutmix_minmax, (str, bytes)) or not hasattr(cutmix_minmax, "__len__") or len(cutmix_minmax) != 2:
            raise ValueError(f"cutmix_minmax must be null or [min, max] (box sides as fractions of the image, timm's "
                             f"--cutmix-minmax), got {cutmix_minmax!r}")
        low, high = (_real("cutmix_minmax", v) for v in cutmix_minmax)
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"cutmix_minmax must be [min, max] with 0 <= min < max <= 1, got {list(cutmix_minmax)!r}")
        cutmix_minmax = (low, high)
    if isinstance(off_epoch, bool) or not isinstance(off_epoch, int) or off_epoch < 0:
        raise ValueError(f"mixup_off_epoch must be an integer >= 0 (no mixing from that epoch on; 0: never off, as "
                         f"timm's --mixup-off-epoch), got {off_epoch!r}")
    return float(switch_prob), mode, cutmix_minmax, off_epoch


class ImageClassifier(ResumableEpochMetrics, ZooModule):
    """LightningModule for image classification; see the module docstring for the options."""

    def __init__(
        self,
        model: nn.Module,
        num_classes: Optional[int] = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: Sequence[float] = (0.9, 0.999),
        warmup_epochs: float = 1.0,
        min_lr_ratio: float = 0.01,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
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
        mix_switch_prob: float = 0.5,
        mix_mode: str = "batch",
        cutmix_minmax: Optional[Sequence[float]] = None,
        mixup_off_epoch: int = 0,
        ema_warmup: bool | str = True,
        ema_buffers: str = "copy",
        adaptive_clip_factor: Optional[float] = None,
        layer_decay_min_scale: float = 0.0,
        layer_decay_no_opt_scale: Optional[float] = None,
    ):
        super().__init__(
            model, lr=lr, weight_decay=weight_decay, betas=betas, warmup_epochs=warmup_epochs,
            min_lr_ratio=min_lr_ratio, layer_decay=layer_decay, ema_decay=ema_decay,
            channels_last=channels_last, torch_compile=torch_compile, seed=seed, optimizer=optimizer,
            momentum=momentum, scheduler=scheduler, decay_epochs=decay_epochs, decay_rate=decay_rate,
            grad_checkpointing=grad_checkpointing, ema_warmup=ema_warmup, ema_buffers=ema_buffers,
            adaptive_clip_factor=adaptive_clip_factor, layer_decay_min_scale=layer_decay_min_scale,
            layer_decay_no_opt_scale=layer_decay_no_opt_scale,
        )
        model_classes = getattr(model, "num_classes", None)
        if num_classes is None:
            num_classes = model_classes
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int (or the model must have .num_classes), got {num_classes!r}")
        if num_classes == 1:  # torchmetrics' accuracy refused it later, naming its own argument
            raise ValueError("image classification needs at least 2 classes, got num_classes=1 (an image folder with "
                             "one class folder: add the other classes' folders)")
        if isinstance(model_classes, int) and model_classes != num_classes:
            raise ValueError(f"the model has {model_classes} classes but the task was configured for num_classes={num_classes}")
        # finite numbers, each named: NaN compared False everywhere (mixup_alpha=nan silently turned mixup off),
        # inf made Beta draw lam = 0 (every image replaced by its partner), a string was a bare TypeError
        if not 0.0 <= _real("label_smoothing", label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        _real("mixup_alpha", mixup_alpha, 0.0)
        _real("cutmix_alpha", cutmix_alpha, 0.0)
        if not 0.0 <= _real("mix_prob", mix_prob) <= 1.0:
            raise ValueError(f"mix_prob must be in [0, 1] (the probability of mixing a batch), got {mix_prob!r}")
        self.mix_switch_prob, self.mix_mode, self.cutmix_minmax, self.mixup_off_epoch = _mix_options(
            mix_switch_prob, mix_mode, cutmix_minmax, mixup_off_epoch)
        self.save_hyperparameters(ignore=["model"])
        self.hparams["betas"] = [float(b) for b in betas]
        self.hparams["cutmix_minmax"] = None if self.cutmix_minmax is None else list(self.cutmix_minmax)
        self.record_model_spec()
        self.num_classes = num_classes
        self.label_smoothing = float(label_smoothing)
        self.mixup_alpha, self.cutmix_alpha, self.mix_prob = float(mixup_alpha), float(cutmix_alpha), float(mix_prob)
        top5 = min(5, num_classes)
        self.metrics = nn.ModuleDict({
            f"{stage}_acc{k}": MulticlassAccuracy(num_classes=num_classes, top_k=kk, average="micro")
            for stage in ("train", "val", "test") for k, kk in ((1, 1), (5, top5))
        })
        # the loss as a metric too: summed over images and processes, so under DDP with splits of unequal size
        # per process it is the mean over images (a logged per-process mean was rank 0's alone: the epoch
        # train/loss of a 2-process run was rank 0's mean; with sync_dist it would be a mean of per-process means)
        # nan_strategy=nan: a diverged model's NaN loss must show, not be dropped with a warning (the default);
        # torchmetrics 1.9's "disable" would ignore the batch-size weights
        self.metrics.update({f"{stage}_loss": MeanMetric(nan_strategy=float("nan")) for stage in ("train", "val", "test")})

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.eval_model(self.prepare_input(x_BCHW)) if not self.training else self.model(self.prepare_input(x_BCHW))

    def mixing(self) -> bool:
        """Whether this epoch's training batches are mixed: mixup or CutMix on, and the epoch before
        ``mixup_off_epoch`` (timm train.py: ``mixup_enabled = False`` once ``epoch >= mixup_off_epoch``, 0 never)."""
        on = self.mixup_alpha > 0 or self.cutmix_alpha > 0 or self.cutmix_minmax is not None
        return on and not (self.mixup_off_epoch and self.current_epoch >= self.mixup_off_epoch)

    def training_step(self, batch, batch_idx):
        x_BCHW, labels_B = batch
        x_BCHW = self.prepare_input(x_BCHW)
        self.last_autocast = torch.is_autocast_enabled(x_BCHW.device.type)
        if self.mixing():
            targets_BK = soft_targets(labels_B, self.num_classes, self.label_smoothing)
            if self.mix_mode == "batch":
                x_BCHW, targets_BK, _, _ = mix_batch(x_BCHW, targets_BK, self.mixup_alpha, self.cutmix_alpha,
                                                     self.mix_prob, self.mix_switch_prob, self.cutmix_minmax)
            else:
                x_BCHW, targets_BK, _ = mix_elements(x_BCHW, targets_BK, self.mixup_alpha, self.cutmix_alpha,
                                                     self.mix_prob, self.mix_switch_prob, self.mix_mode == "pair",
                                                     self.cutmix_minmax)
            logits_BK = self.model(x_BCHW)
            loss = torch.sum(-targets_BK * F.log_softmax(logits_BK.float(), dim=-1), dim=-1).mean()
        else:
            logits_BK = self.model(x_BCHW)
            loss = F.cross_entropy(logits_BK.float(), labels_B, label_smoothing=self.label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at step {self.global_step} (lower the lr, or clip gradients)")
        self.metrics["train_acc1"](logits_BK.detach(), labels_B)
        batch_size = labels_B.shape[0]
        # the step value is this process's batch loss, the epoch value the mean over every process's images
        self.metrics["train_loss"](loss.detach(), weight=batch_size)
        self.log("train/loss", self.metrics["train_loss"], prog_bar=True, on_step=True, on_epoch=True, batch_size=batch_size)
        self.log("train/acc1", self.metrics["train_acc1"], on_step=False, on_epoch=True, batch_size=batch_size)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[-1]["lr"] if self._trainer is not None and self.trainer.optimizers else 0.0,
                 on_step=True, on_epoch=False, batch_size=batch_size)
        return loss

    def _evaluate(self, batch, stage: str):
        x_BCHW, labels_B = batch
        logits_BK = self.eval_model(self.prepare_input(x_BCHW))
        loss = F.cross_entropy(logits_BK.float(), labels_B)
        batch_size = labels_B.shape[0]
        self.metrics[f"{stage}_acc1"](logits_BK, labels_B)
        self.metrics[f"{stage}_acc5"](logits_BK, labels_B)
        self.metrics[f"{stage}_loss"].update(loss.detach(), weight=batch_size)
        self.log(f"{stage}/loss", self.metrics[f"{stage}_loss"], prog_bar=stage == "val", on_epoch=True, batch_size=batch_size)
        self.log(f"{stage}/acc1", self.metrics[f"{stage}_acc1"], prog_bar=stage == "val", on_epoch=True, batch_size=batch_size)
        self.log(f"{stage}/acc5", self.metrics[f"{stage}_acc5"], on_epoch=True, batch_size=batch_size)
        return loss

    def validation_step(self, batch, batch_idx):
        return self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        return self._evaluate(batch, "test")

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0):
        x_BCHW = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.eval_model(self.prepare_input(x_BCHW)).float().softmax(-1)
