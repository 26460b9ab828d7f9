"""Training pieces shared by the task packages.

* :class:`AtomicCheckpointIO` -- Lightning CheckpointIO writing ``.ckpt`` files atomically.
* :class:`ZooModule` -- LightningModule base: plain ``nn.Module`` in, a timm optimizer + warm-up/decay, EMA,
  layer-wise lr decay, channels-last, per-epoch reseeding for exact resume.
* :class:`ModelEma`, :func:`param_groups`, :func:`warmup_cosine`.
* ``zoo.train.run`` -- compose/train/evaluate/predict behind the ``zoo`` CLI (imports Hydra lazily).
"""
from zoo.train.checkpoint import AtomicCheckpointIO, atomic_torch_save
from zoo.train.ema import ModelEma
from zoo.train.module import ZooModule
from zoo.train.optim import layer_ids, param_groups, warmup_cosine

__all__ = [
    "AtomicCheckpointIO",
    "atomic_torch_save",
    "ModelEma",
    "ZooModule",
    "layer_ids",
    "param_groups",
    "warmup_cosine",
]
