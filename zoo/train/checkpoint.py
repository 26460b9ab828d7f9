"""Atomic training checkpoints.

Lightning writes ``.ckpt`` files with ``torch.save`` straight to their final path, so a run killed while
saving (pre-emption, out of disk, Ctrl-C) can leave a truncated ``last.ckpt`` that cannot be resumed.
:class:`AtomicCheckpointIO` writes to a temporary file in the same directory, flushes it to disk and then
``os.replace``-s it over the target (atomic on POSIX and Windows), so the previous checkpoint stays valid
until the new one is complete. It is passed to the Trainer as a plugin (``zoo train`` always does), which
covers every ModelCheckpoint file and ``trainer.save_checkpoint``.

:class:`LastCheckpoint` is the ModelCheckpoint behind ``<run_dir>/checkpoints/last.ckpt`` (configs/callbacks).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "LastCheckpoint", "atomic_torch_save"]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through ``<dir>/.<name>.<random>.tmp`` + fsync + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO whose ``save_checkpoint`` never leaves a partial file at the target path."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint does not take storage_options ({storage_options!r})"
            )
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path)  # remote file systems: no local rename
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))


def _zero_current(progress) -> None:
    """The ``current`` counters of a Lightning progress state dict (nested ones too) set to 0, as at an epoch start."""
    if not isinstance(progress, dict):
        return
    for key, value in progress.items():
        if key == "current" and isinstance(value, dict):
            for name in value:
                value[name] = 0
        elif isinstance(value, dict):
            _zero_current(value)


class LastCheckpoint(ModelCheckpoint):
    """The run's resumable checkpoint: a ModelCheckpoint (no monitor, one file) written at the end of every training
    epoch, and also at the step where ``trainer.max_steps`` ends training inside an epoch.

    Saved only at the epoch's end, a run cut by ``max_steps`` recorded that epoch as finished: resumed with a larger
    ``max_steps`` it skipped the rest of the epoch's batches, or, at the last epoch, trained no further step at all.
    Saved at the step, Lightning restores the run in the middle of the epoch, and the data modules' training
    samplers (``zoo.train.order.ResumableTrainingOrder.training_sampler``) skip the batches already trained on: the
    resumed run
    continues as the uninterrupted one would have. The epoch's-end save of that same step is then skipped (the
    checkpoint is the same training state)."""

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's own key: checkpoints written before this class existed resume with their state
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """Every checkpoint of the run written at an epoch's end records that epoch as completed, and the epoch
        loop's batch counters as at the next epoch's start.

        Lightning (2.6) writes the epoch-end checkpoint before it counts the epoch as completed. When training is
        bounded by ``trainer.max_steps``, its restore does not finish that count, and it set the training
        sampler's epoch one ahead of the loop's. The resumed run then trained the next epoch on the order of the
        one after it. If ``max_epochs`` also ended the run, it trained fewer steps, or none, and reported the run
        finished. Counted as completed, every run resumes at the next epoch's first batch, as an epoch-bounded
        run does."""
        state = super().on_save_checkpoint(trainer, pl_module, checkpoint)
        fit = checkpoint.get("loops", {}).get("fit_loop", {})
        epochs = fit.get("epoch_progress")
        if epochs:
            ended = [counts["ready"] == counts["started"] == counts["processed"] == counts["completed"] + 1
                     for counts in (epochs["current"], epochs["total"])]
            if all(ended):
                for counts in (epochs["current"], epochs["total"]):
                    counts["completed"] = counts["processed"]
                for key in ("epoch_loop.batch_progress", "epoch_loop.scheduler_progress",
                            "epoch_loop.automatic_optimization.optim_progress"):
                    _zero_current(fit.get(key))
                if "epoch_loop.batch_progress" in fit:
                    fit["epoch_loop.batch_progress"]["is_last_batch"] = False
        return state

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        max_steps = trainer.max_steps
        if (max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps
                and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
                and not self._should_skip_saving_checkpoint(trainer)):
            self._save_none_monitor_checkpoint(trainer, self._monitor_candidates(trainer))


class BestCheckpoint(ModelCheckpoint):
    """The run's best validated checkpoint (``best.ckpt``): a ModelCheckpoint that keeps comparing with the best
    score after a resume from a run directory that was moved or copied.

    Lightning's ModelCheckpoint restores ``best_model_score`` only when the checkpoint's ``dirpath`` equals the
    callback's; a run resumed at another path (a moved or copied ``run_dir``) started from no score, so its first
    validation replaced ``best.ckpt`` with a worse epoch (karate: epoch 0 at 0.53 replaced by epoch 14 at 0.33), with
    only a warning. Here the score and the kept paths are restored either way, the paths moved to this ``dirpath``
    (same file names)."""

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key: checkpoints written before this class (configs/callbacks used ModelCheckpoint) and
        # after it resume each other's best score
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def load_state_dict(self, state_dict: dict) -> None:
        old_dir = state_dict.get("dirpath", self.dirpath)

        def moved(path):
            return os.path.join(self.dirpath, os.path.basename(path)) if path else path

        # a moved / copied run has its best.ckpt here; a run resumed into a new run_dir (ckpt_path= of another
        # run) has none, and keeping the old score would leave it without best.ckpt unless a later epoch beat it:
        # Lightning's behaviour then (the first validation writes best.ckpt)
        best = state_dict.get("best_model_path")
        if not old_dir or not self.dirpath or old_dir == self.dirpath or not best or not os.path.isfile(moved(best)):
            super().load_state_dict(state_dict)
            return

        self.best_model_score = state_dict["best_model_score"]
        self.kth_value = state_dict.get("kth_value", self.kth_value)
        self.kth_best_model_path = moved(state_dict.get("kth_best_model_path", ""))
        self.best_k_models = {moved(k): v for k, v in (state_dict.get("best_k_models") or {}).items()}
        self.last_model_path = moved(state_dict.get("last_model_path", ""))
        self.best_model_path = moved(best)
