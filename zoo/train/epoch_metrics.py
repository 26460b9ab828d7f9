"""Training epoch means that survive a resume in the middle of an epoch.

The task modules log their training metrics as torchmetrics objects (``MeanMetric`` for the loss, accuracies):
``self.log(name, metric, on_epoch=True)`` makes Lightning compute the metric at the epoch's end, the mean over
every target of the epoch (and of every process, the states being summed at that point). Their states are not
persistent, so the model's ``state_dict`` -- and the released weights -- hold no metric. Lightning (2.6) restores a
checkpoint written inside an epoch (``zoo.train.checkpoint.LastCheckpoint`` at ``trainer.max_steps``, an epoch
stopped early by ``trainer.max_time``) at its position in the epoch, but the metric states start from zero: the
resumed run logged as the epoch's ``train/loss`` the mean over the batches after the resume only (review rev4
finding 1: 2.51 where the uninterrupted run had 5.40, the other 4 of its 15 seeds being left out).

:class:`ResumableEpochMetrics`, a LightningModule mixin, keeps those states in the checkpoint under a key of its
own (:data:`CHECKPOINT_KEY`, beside ``state_dict``), with the epoch and optimizer step they were saved at, and puts
them back at the first training batch of the resumed run when it continues that same epoch at that same step.
A checkpoint written at an epoch's end resumes at the next epoch, whose means start from zero: its states are
dropped. A checkpoint without the key (written before this mixin) resumes as before.

Under DDP every process writes the checkpoint's dict (Lightning's ``dump_checkpoint`` runs on every rank, rank 0
saves it): the states are summed over the processes there (``Metric.sync_context``, the reduction the epoch's end
applies), and on resume rank 0 takes the sums while the other processes start from zero, so the epoch's reduction
gives the same totals. Batches after an epoch's last optimizer step that only accumulated gradients
(``trainer.accumulate_grad_batches`` > 1, an epoch stopped early by ``trainer.max_time``) are trained again by the
resumed run (``zoo.train.checkpoint._progress_after_last_step``), and then count twice in that epoch's means.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torchmetrics import Metric

__all__ = ["CHECKPOINT_KEY", "ResumableEpochMetrics"]

#: the checkpoint's key for the training metric states (beside Lightning's "state_dict", "loops", ...)
CHECKPOINT_KEY = "zoo_training_epoch_metrics"


def _copied(value: torch.Tensor | list) -> torch.Tensor | list:
    """A CPU copy of a metric state (a tensor, or a list of tensors for "cat" states)."""
    if isinstance(value, list):
        return [item.detach().cpu().clone() for item in value]
    return value.detach().cpu().clone()


def _same_layout(saved: torch.Tensor | list, current: torch.Tensor | list) -> bool:
    """Whether a saved state can stand in for a metric's current one: both tensors of one shape, or both lists."""
    if isinstance(current, list):
        return isinstance(saved, list)
    return isinstance(saved, torch.Tensor) and saved.shape == current.shape


class ResumableEpochMetrics:
    """LightningModule mixin (placed before the LightningModule class in the bases): the training metrics'
    epoch states saved in mid-epoch checkpoints and restored on resume; see the module docstring.

    :meth:`training_epoch_metrics` names the metrics: by default every torchmetrics ``Metric`` of the module's
    ``metrics`` ModuleDict whose key starts with ``train_`` (the convention of zoo.tasks.vision.module and
    zoo.tasks.graph.lit)."""

    _pending_epoch_metrics: Optional[dict[str, Any]] = None

    def training_epoch_metrics(self) -> dict[str, Metric]:
        metrics = getattr(self, "metrics", None)
        if metrics is None:
            return {}
        return {name: metric for name, metric in metrics.items()
                if name.startswith("train_") and isinstance(metric, Metric)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "fit":  # a checkpoint saved outside fit holds no epoch in progress
            return
        states = {}
        for name, metric in self.training_epoch_metrics().items():
            # summed over the processes (a collective: every rank builds the checkpoint's dict), then unsynced
            with metric.sync_context(should_sync=True, should_unsync=True):
                states[name] = {"update_count": metric.update_count,
                                "states": {key: _copied(value) for key, value in metric.metric_state.items()}}
        checkpoint[CHECKPOINT_KEY] = {"epoch": int(trainer.current_epoch), "global_step": int(trainer.global_step),
                                      "metrics": states}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # applied at the first training batch, once Lightning has restored the loops' position (after this hook)
        self._pending_epoch_metrics = checkpoint.get(CHECKPOINT_KEY)

    def on_train_batch_start(self, batch, batch_idx):
        pending, self._pending_epoch_metrics = self._pending_epoch_metrics, None
        if pending is not None:
            self._restore_epoch_metrics(pending)
        return super().on_train_batch_start(batch, batch_idx)

    def _restore_epoch_metrics(self, saved: dict[str, Any]) -> None:
        """The saved states, when this batch continues the epoch and step they were saved at (a checkpoint of an
        epoch's end resumes in the next epoch: nothing to restore). Rank 0 only: the saved states are sums over
        the processes."""
        trainer = self.trainer
        if saved.get("epoch") != trainer.current_epoch or saved.get("global_step") != trainer.global_step:
            return
        for name, metric in self.training_epoch_metrics().items():
            entry = saved.get("metrics", {}).get(name)
            if entry is None:
                continue
            current = metric.metric_state
            states = entry["states"]
            if set(states) != set(current) or not all(_same_layout(states[key], current[key]) for key in current):
                warnings.warn(f"the checkpoint's state of the training metric {name!r} does not fit the metric "
                              f"(another configuration?): its epoch mean covers the batches after the resume only",
                              stacklevel=2)
                continue
            metric.reset()
            if trainer.global_rank != 0:
                continue
            for key, value in states.items():
                device = current[key].device if isinstance(current[key], torch.Tensor) else self.device
                setattr(metric, key, [item.to(device) for item in value] if isinstance(value, list)
                        else value.to(device=device, dtype=current[key].dtype))
            metric._update_count = int(entry["update_count"])  # torchmetrics has no public setter
