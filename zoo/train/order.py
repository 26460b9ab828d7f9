"""The order of training examples, the same in an uninterrupted run and in a resumed one.

* :class:`EpochShuffleSampler` -- a permutation that depends only on (seed, epoch), in one process or many;
* :class:`ResumableTrainingOrder` -- the data modules' mixin that records the sampler's position in every
  checkpoint and builds the resumed run's sampler there (the epoch, and the batches of it already trained on).

Used by the vision data modules (zoo.tasks.vision.data) and the graph ones (zoo.tasks.graph).
"""
from __future__ import annotations

import itertools
from typing import Any, Optional

import torch
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["EpochShuffleSampler", "ResumableTrainingOrder"]


class EpochShuffleSampler(DistributedSampler):
    """``DistributedSampler`` whose permutation depends only on ``(seed, epoch)``, in one process or many.

    Lightning calls ``set_epoch`` at every epoch start (and does not re-wrap a DistributedSampler under
    DDP). The epoch is passed on to the dataset (``dataset.epoch``) so per-sample augmentation is seeded
    by ``(seed, epoch, index)`` (``zoo.tasks.vision.data._sample_rng``): a run resumed from a checkpoint sees
    exactly the batches the uninterrupted run would have seen. (A plain shuffling DataLoader draws from the
    global RNG, whose state a checkpoint does not hold.)
    """

    def __init__(self, dataset: Dataset, seed: int = 0, num_replicas: Optional[int] = None, rank: Optional[int] = None):
        if num_replicas is None or rank is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            num_replicas = torch.distributed.get_world_size() if distributed else 1
            rank = torch.distributed.get_rank() if distributed else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=int(seed), drop_last=False)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(int(epoch))
        if hasattr(self.dataset, "epoch"):
            self.dataset.epoch = int(epoch)

    def skip_once(self, epoch: int, num_samples: int, pending: Optional[list] = None) -> None:
        """The next pass over ``epoch`` starts after its first ``num_samples`` indices (a run resumed in the middle
        of that epoch: the batches it trained on are not seen twice). ``len()`` stays the epoch's full length, the
        count Lightning's progress tracking expects; other epochs are unaffected.

        ``pending`` (a one-item list ``[(epoch, num_samples)]``) lets several samplers share one skip: the first
        pass over ``epoch`` by any of them empties it (Lightning may build the training loader again before the
        resumed epoch starts, ``trainer.reload_dataloaders_every_n_epochs``)."""
        self._skip = pending if pending is not None else [(int(epoch), int(num_samples))]

    def __iter__(self):
        indices = super().__iter__()
        pending = getattr(self, "_skip", None)
        if pending and pending[0][0] == self.epoch:
            skip = pending.pop()[1]
            indices = itertools.islice(indices, skip, None)
        return iter(indices)


class ResumableTrainingOrder:
    """Mixin of the data modules that shuffle their training split with :class:`EpochShuffleSampler`: the training
    sampler of a resumed run starts where the uninterrupted run would be.

    The position goes into every checkpoint (the data module's ``state_dict``: the epoch the run continues in and
    the batches of it already trained on) and comes back before Lightning builds the training loader (it restores
    the data module before ``configure_optimizers``, whose schedule length makes Lightning build the loader and its
    first iterator, before the training loops are restored and before ``set_epoch``). Without it:

    * with DataLoader worker processes, the first epoch of a resumed run replayed epoch 0's order and augmentation
      (the workers fetched indices and copied the dataset, ``dataset.epoch`` included, at epoch 0);
    * a run resumed from a checkpoint written in the middle of an epoch (``trainer.max_steps`` ending training
      there, :class:`zoo.train.checkpoint.LastCheckpoint`) replayed that epoch from its first batch.
    """

    _resume_at: tuple[int, int] = (0, 0)  # (epoch, batches of it already trained on)

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        fit_loop = trainer.fit_loop
        epochs = fit_loop.epoch_progress.current
        # saved at an epoch's end, that epoch counts as processed (the run continues with the next one); saved
        # within an epoch (ready > processed), the run continues it after the batches it has processed
        within = epochs.ready > epochs.processed
        done = fit_loop.epoch_loop.batch_progress.current.processed if within else 0
        return {"training_order": {"epoch": int(epochs.processed), "batches_done": int(done)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        order = (state or {}).get("training_order")
        self._pending_skip = None
        if order:
            self._resume_at = (int(order["epoch"]), int(order["batches_done"]))

    def training_sampler(self, dataset: Dataset, batch_size: int) -> EpochShuffleSampler:
        """The training split's sampler, at the restored position (epoch 0 for a new run). The restored epoch is
        used once: a later loader (another fit, or a reload) gets its epoch from Lightning's ``set_epoch``. The
        skip of the batches already trained on stays with every sampler built until one of them starts that
        epoch: with ``trainer.reload_dataloaders_every_n_epochs`` Lightning builds the loader again before the
        resumed epoch starts (the first one only served the schedule's length)."""
        epoch, done = self._resume_at
        self._resume_at = (0, 0)
        if done:
            self._pending_skip = [(epoch, done * int(batch_size))]
        sampler = EpochShuffleSampler(dataset, self.seed)
        sampler.set_epoch(epoch)
        pending = getattr(self, "_pending_skip", None)
        if pending:
            sampler.skip_once(*pending[0], pending=pending)
        return sampler
