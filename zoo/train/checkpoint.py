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

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "BestCheckpoint", "LastCheckpoint", "atomic_torch_save"]


def _write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """``write(handle)`` into ``<dir>/.<name>.<random>.tmp``, fsync, then ``os.replace`` onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
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


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through ``<dir>/.<name>.<random>.tmp`` + fsync + ``os.replace``."""
    _write_atomically(path, lambda handle: torch.save(obj, handle))


def _atomic_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """A byte copy of ``source`` at ``target``, written as :func:`atomic_torch_save` writes."""
    def write(handle: BinaryIO) -> None:
        with open(source, "rb") as original:
            shutil.copyfileobj(original, handle, 1 << 20)

    _write_atomically(target, write)


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO whose ``save_checkpoint`` never leaves a partial file at the target path."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint does not take storage_options ({storage_options!r})"
            )
        if not _is_local(path):
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


def _unfinished_epoch(trainer) -> bool:
    """Whether the epoch now ending left batches untrained: ``trainer.should_stop`` ended it early (Lightning's Timer
    at ``trainer.max_time``, EarlyStopping validating inside the epoch, a module's own stop) rather than its last
    batch."""
    batches = trainer.fit_loop.epoch_loop.batch_progress
    return not batches.is_last_batch and batches.current.ready < trainer.num_training_batches


@contextlib.contextmanager
def _progress_after_last_step(trainer):
    """The fit loop's progress, while a checkpoint is written at the end of an epoch that stopped early, as Lightning
    records it after the epoch's last optimizer step within a running epoch (where its own ModelCheckpoint saves at
    ``on_validation_end``): the epoch not processed, the batches done counted to that step. Batches after it only
    accumulated gradients (``trainer.accumulate_grad_batches``) that no step used, so they are not counted: the
    resumed run trains them again. Restored afterwards. Lightning 2.6 then restores the run in that epoch
    (lightning/pytorch/loops/fit_loop.py ``update_restart_stage``: RESTARTED_MID_EPOCH) after its last batch done
    (loops/training_epoch_loop.py: RESTARTED_ON_LAST)."""
    fit_loop = trainer.fit_loop
    epoch_loop = fit_loop.epoch_loop
    epochs, batches = fit_loop.epoch_progress, epoch_loop.batch_progress
    unstepped = batches.current.ready % max(1, int(trainer.accumulate_grad_batches))
    stepped_before = epoch_loop._batches_that_stepped
    saved = [(tracker, dict(vars(tracker))) for tracker in (epochs.current, epochs.total, batches.current,
                                                            batches.total)]
    try:
        for tracker in (epochs.current, epochs.total):
            tracker.processed -= 1
        for tracker in (batches.current, batches.total):
            for name in ("ready", "started", "processed", "completed"):
                setattr(tracker, name, getattr(tracker, name) - unstepped)
        if _validates_there_on_restart(trainer):
            # restored at a batch that validates, Lightning skips that validation (it ran before the save) and only
            # then counts the batch's step for the loggers, as its own on_validation_end checkpoints were written
            # before the count: saved after it, the step would be counted twice
            epoch_loop._batches_that_stepped -= 1
        yield
    finally:
        for tracker, values in saved:
            vars(tracker).update(values)
        epoch_loop._batches_that_stepped = stepped_before


def _validates_there_on_restart(trainer) -> bool:
    """Whether Lightning's training epoch loop, restored at the current batch, takes it for a batch that validates
    (``_TrainingEpochLoop._should_check_val_fx``, asked without the stop request that ended the epoch)."""
    stop, trainer.should_stop = trainer.should_stop, False
    try:
        return bool(trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
    finally:
        trainer.should_stop = stop


class LastCheckpoint(ModelCheckpoint):
    """The run's resumable checkpoint: a ModelCheckpoint (no monitor, one file) written at the end of every training
    epoch, and also at the step where ``trainer.max_steps`` ends training inside an epoch.

    Saved only at the epoch's end, a run cut by ``max_steps`` recorded that epoch as finished: resumed with a larger
    ``max_steps`` it skipped the rest of the epoch's batches, or, at the last epoch, trained no further step at all.
    Saved at the step, Lightning restores the run in the middle of the epoch, and the data modules' training
    samplers (``zoo.train.order.ResumableTrainingOrder.training_sampler``) skip the batches already trained on: the
    resumed run continues as the uninterrupted one would have. The epoch's-end save of that same step is then skipped
    (the checkpoint is the same training state).

    An epoch ended early by ``trainer.should_stop`` (Lightning's Timer at ``trainer.max_time``, EarlyStopping when it
    validates inside the epoch, ``val_check_interval`` < 1) is saved at its end as a checkpoint within that epoch,
    after its last optimizer step (:func:`_progress_after_last_step`): it was recorded as completed, and a resumed run
    skipped its remaining batches, or said the run was finished when it was the last epoch."""

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's own key: checkpoints written before this class existed resume with their state
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._should_skip_saving_checkpoint(trainer) or not _unfinished_epoch(trainer):
            super().on_train_epoch_end(trainer, pl_module)
            return
        with _progress_after_last_step(trainer):
            super().on_train_epoch_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """Every checkpoint of the run written at an epoch's end records that epoch as completed, and the epoch
        loop's batch counters as at the next epoch's start.

        Lightning (2.6) writes the epoch-end checkpoint before it counts the epoch as completed. When training is
        bounded by ``trainer.max_steps``, its restore does not finish that count, and it set the training
        sampler's epoch one ahead of the loop's. The resumed run then trained the next epoch on the order of the
        one after it. If ``max_epochs`` also ended the run, it trained fewer steps, or none, and reported the run
        finished. Counted as completed, every run resumes at the next epoch's first batch, as an epoch-bounded
        run does. (An epoch stopped early is saved as one not yet processed: :meth:`on_train_epoch_end`.)"""
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
    """The run's best validated checkpoint (``best.ckpt``): a ModelCheckpoint whose fixed-name file always holds the
    best validated weights, also with ``save_top_k`` other than 1, and that keeps comparing with the best score after
    a resume from a run directory that was moved or copied.

    ``save_top_k`` (Lightning's meaning: the k best validations kept, -1 all of them, 0 none): with 1 the one file is
    ``<filename>.ckpt`` (configs/callbacks: ``best.ckpt``). With another k, every kept validation has its own file,
    ``<filename>-epoch<E>-step<S>.ckpt`` (Lightning's default names carry the epoch and step too, written there as
    ``epoch=E-step=S``, which Hydra's override syntax does not take unquoted), and ``<filename>.ckpt`` is a copy of
    the best of them, written atomically when a validation beats the others: ``best_model_path`` names the best
    of the k files, as in Lightning. With one fixed name for all k, each kept validation had overwritten the single
    file, which then held the latest of the k, not the best (audit 2026-12-06: ``save_top_k=3`` on karate released
    epoch 39 at val/acc1 0.40 where epoch 9 had 0.53). A ``filename`` with ``{...}`` fields names each file itself,
    as Lightning does, and no copy is written.

    Lightning's ModelCheckpoint restores ``best_model_score`` only when the checkpoint's ``dirpath`` equals the
    callback's; a run resumed at another path (a moved or copied ``run_dir``) started from no score, so its first
    validation replaced ``best.ckpt`` with a worse epoch (karate: epoch 0 at 0.53 replaced by epoch 14 at 0.33), with
    only a warning. Here the score and the kept paths are restored either way, the paths moved to this ``dirpath``
    (same file names)."""

    def __init__(self, *args, **kwargs) -> None:
        top_k = kwargs.get("save_top_k", 1)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1:
            # Lightning takes 2.5 and fails at a later validation with a bare KeyError ('')
            raise ValueError(f"callbacks.best_checkpoint.save_top_k must be an integer >= -1 (k best validations "
                             f"kept; -1 all, 0 none), got {top_k!r}")
        super().__init__(*args, **kwargs)
        self._trimmed: list[str] = []  # kept files a resume with a smaller save_top_k drops (removed at fit start)
        self._adopt_copy = False  # a resume with save_top_k != 1 of a run that kept only best.ckpt
        fixed = self.filename if self.filename and "{" not in self.filename else None
        # the file that holds the best validated weights under a name that stays (None: Lightning's own names)
        self.best_copy_name: Optional[str] = fixed
        if fixed is not None and self.save_top_k != 1:
            fields = "{epoch}-{step}" if self.auto_insert_metric_name else "epoch{epoch}-step{step}"
            self.filename = f"{fixed}{self.CHECKPOINT_JOIN_CHAR}{fields}"

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key: checkpoints written before this class (configs/callbacks used ModelCheckpoint) and
        # after it resume each other's best score
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    @property
    def best_copy_path(self) -> Optional[str]:
        """``<dirpath>/<filename>.ckpt``, the file holding the best validated weights; None without a fixed name."""
        if self.best_copy_name is None or self.dirpath is None:
            return None
        return os.path.join(self.dirpath, self.best_copy_name + self.FILE_EXTENSION)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        copy = self.best_copy_path
        if copy is None or filepath == copy or filepath != self.best_model_path:
            return
        if trainer.is_global_zero:  # a new best of the k: its copy under the fixed name
            if _is_local(filepath) and _is_local(copy):
                _atomic_copy(str(filepath).removeprefix("file://"), str(copy).removeprefix("file://"))
            else:
                self._fs.copy(filepath, copy)
        trainer.strategy.barrier("BestCheckpoint.best_copy")

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        # a run resumed with another save_top_k may list the fixed-name file among its k: it stays, the best's copy
        if filepath != self.best_copy_path:
            super()._remove_checkpoint(trainer, filepath)

    def load_state_dict(self, state_dict: dict) -> None:
        self._load_kept_paths(state_dict)
        copy = self.best_copy_path
        if (self.save_top_k == 1 and copy is not None and any(path != copy for path in self.best_k_models)
                and self.best_model_score is not None):
            # a run kept with another save_top_k resumed with 1: the one kept file is the best's copy, as in a run
            # that always had 1 (its k files stay on disk; comparing with the k-th best, the next validation would
            # have overwritten the best's copy with a worse one)
            self.best_k_models = {copy: self.best_model_score}
            self.best_model_path = self.kth_best_model_path = copy
            self.kth_value = self.best_model_score
            return
        if copy is not None and self.save_top_k != 1 and copy in self.best_k_models:
            # a run that kept only best.ckpt resumed with k != 1: that entry is a kept validation under the name of
            # the best's copy, which the next new best overwrote (its weights lost although kept, the record pairing
            # best.ckpt with a score its weights no longer had): it gets its own file at fit start (_adopt_best_copy)
            self._adopt_copy = True
        if self.save_top_k > 0 and len(self.best_k_models) > self.save_top_k:
            # resumed with a smaller k: Lightning deletes only when the record holds exactly k, so the kept set
            # never shrank (3 -> 2 kept 4 files, -1 -> 2 kept all): keep the k best, the others' files go at fit start
            descending = self.mode == "max"
            ranked = sorted(self.best_k_models, key=lambda path: float(self.best_k_models[path]), reverse=descending)
            kept, self._trimmed = ranked[:self.save_top_k], ranked[self.save_top_k:]
            self.best_k_models = {path: self.best_k_models[path] for path in kept}
            self.kth_best_model_path = kept[-1]
            self.kth_value = self.best_k_models[kept[-1]]
            self.best_model_path, self.best_model_score = kept[0], self.best_k_models[kept[0]]

    def on_train_start(self, trainer, pl_module) -> None:
        """What a resume with another ``save_top_k`` leaves to do with the trainer at hand (load_state_dict has none):
        the kept-as-best.ckpt validation gets its own file, and the files beyond the new k are removed."""
        super().on_train_start(trainer, pl_module)
        if self._adopt_copy:
            self._adopt_best_copy(trainer)
            self._adopt_copy = False
        for path in self._trimmed:
            if path != self.best_copy_path and self._fs.exists(path):
                self._remove_checkpoint(trainer, path)
        self._trimmed = []

    def _adopt_best_copy(self, trainer) -> None:
        """best.ckpt's validation, kept by a save_top_k=1 run, copied to the name this k gives it (from its own epoch
        and step) and recorded there; best.ckpt stays the copy of the best."""
        copy = self.best_copy_path
        if not (_is_local(copy) and os.path.isfile(copy)):
            return
        stored = torch.load(copy, map_location="cpu", weights_only=True, mmap=True)
        target = self.format_checkpoint_name({"epoch": int(stored["epoch"]), "step": int(stored["global_step"])})
        if trainer.is_global_zero and not os.path.exists(target):
            _atomic_copy(copy, target)
        trainer.strategy.barrier("BestCheckpoint.adopt_best_copy")
        score = self.best_k_models.pop(copy)
        self.best_k_models[target] = score
        for name in ("best_model_path", "kth_best_model_path"):
            if getattr(self, name) == copy:
                setattr(self, name, target)

    def _load_kept_paths(self, state_dict: dict) -> None:
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
