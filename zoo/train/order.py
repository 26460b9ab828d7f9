"""The order of training examples, the same in an uninterrupted run and in a resumed one.

* :class:`EpochShuffleSampler` -- a permutation that depends only on (seed, epoch), in one process or many;
* :class:`ResumableTrainingOrder` -- the data modules' mixin that records the sampler's position in every
  checkpoint and builds the resumed run's sampler there (the epoch, and the batches of it already trained on).

Used by the vision data modules (zoo.tasks.vision.data) and the graph ones (zoo.tasks.graph).
"""
from __future__ import annotations

import itertools
import os
import sys
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

    def skip_once(self, epoch: int, num_samples: int, pending: Optional[list] = None,
                  seed: Optional[int] = None) -> None:
        """The next pass over ``epoch`` starts after its first ``num_samples`` indices (a run resumed in the middle
        of that epoch: the batches it trained on are not seen twice). ``len()`` stays the epoch's full length, the
        count Lightning's progress tracking expects; other epochs are unaffected.

        ``seed``: the seed that epoch's order was drawn with, when it differs from this sampler's (the resumed run
        was given another ``seed=``): that pass is drawn with it, so the indices after ``num_samples`` are exactly
        the ones not trained on yet; later epochs use the sampler's own seed.

        ``pending`` (a one-item list ``[(epoch, num_samples)]`` or ``[(epoch, num_samples, seed)]``) lets several
        samplers share one skip: the first pass over ``epoch`` by any of them empties it (Lightning may build the
        training loader again before the resumed epoch starts, ``trainer.reload_dataloaders_every_n_epochs``)."""
        self._skip = pending if pending is not None else [(int(epoch), int(num_samples), seed)]

    def __iter__(self):
        pending = getattr(self, "_skip", None)
        skip, seed = 0, None
        if pending and pending[0][0] == self.epoch:
            entry = pending.pop()
            skip, seed = entry[1], (entry[2] if len(entry) > 2 else None)
        own_seed = self.seed
        if seed is not None:
            self.seed = int(seed)  # DistributedSampler draws with self.seed + self.epoch
        try:
            indices = super().__iter__()
        finally:
            self.seed = own_seed
        return iter(itertools.islice(indices, skip, None))


class ResumableTrainingOrder:
    """Mixin of the data modules that shuffle their training split with :class:`EpochShuffleSampler`: the training
    sampler of a resumed run starts where the uninterrupted run would be.

    The position goes into every checkpoint (the data module's ``state_dict``: the epoch the run continues in, the
    batches and the samples of it already trained on, and the seed its order was drawn with) and comes back before
    Lightning builds the training loader (it restores the data module before ``configure_optimizers``, whose
    schedule length makes Lightning build the loader and its first iterator, before the training loops are restored
    and before ``set_epoch``). Without it:

    * with DataLoader worker processes, the first epoch of a resumed run replayed epoch 0's order and augmentation
      (the workers fetched indices and copied the dataset, ``dataset.epoch`` included, at epoch 0);
    * a run resumed from a checkpoint written in the middle of an epoch (``trainer.max_steps`` ending training
      there, :class:`zoo.train.checkpoint.LastCheckpoint`) replayed that epoch from its first batch.

    Resumed in the middle of an epoch with other settings, the rest of that epoch is exactly its samples not trained
    on yet, nothing twice and nothing left out:

    * another ``data.batch_size``: the samples done are skipped (not the batches done times the new size, which
      trained 288 samples twice in an audit, 2026-12-06) and the new size batches the rest. A size larger than the
      one the epoch's first part was trained with is refused (:meth:`check_batch_size_fits`): Lightning counts the
      epoch in batches and would end it before its last samples;
    * another order seed (``seed=`` for images, ``data.seed`` for graphs: :attr:`order_seed_key`): the rest of the
      epoch keeps the order its first part was drawn in (the stored seed), and the new seed orders the epochs after
      it (a note says so). Refusing would lose nothing either, but makes a resume that can be made exactly fail;
    * another data set: refused naming the key (:meth:`check_same_data`), the stored position counted another list
      of training examples. A data module says which data keys count, in one of two ways: the keys that may change
      mid-epoch (:attr:`mid_epoch_changeable_keys`, an allow-list: any other data key changed there is refused; the
      graph modules, whose keys mostly make the data) or the keys that define the training set
      (:attr:`mid_epoch_fixed_keys`, a deny-list: only those are refused; the vision modules, whose many
      augmentation options change the tensors of the same images, not which images train). ``data.root`` /
      ``data.path`` compare as the files they name, a relative one read from the current folder as the resumed run
      reads it (runs from before data paths were stored absolute). Where the order seed is a data key
      (``data.seed``), its change is accepted with the note above when the data set does not depend on it
      (:meth:`data_depends_on_order_seed`: karate, Planetoid, OGB, graphs with their own split) and refused where
      it does (generated graphs, whose graph and split it draws, and the stratified split of graphs without one).

    Checkpoints from before the samples and the seed were stored skip the batches done times the batch size and
    order seed of the checkpoint's own run, read from its stored ``zoo_config`` (:meth:`restore_old_order`, called
    by zoo train; the current ones skipped 160 samples too few with a halved batch size, audit 2026-12-06); where
    that config does not hold them, the current ones, and a note says so.
    """

    # the config key of the seed the training order is drawn with, as notes name it: the run's seed= for images
    # (their data.seed is ${seed}); data modules with their own data.seed say so
    order_seed_key: str = "seed"
    # the data keys that may change in the middle of an epoch; any other data key changed there is refused
    # (check_same_data). None: mid_epoch_fixed_keys decides
    mid_epoch_changeable_keys: Optional[tuple[str, ...]] = None
    # or the other way round: the data keys that define the training set, refused when changed mid-epoch (the
    # others may change). Both None: not checked
    mid_epoch_fixed_keys: Optional[tuple[str, ...]] = None
    # from the stored zoo_config of a checkpoint without samples_done / seed (restore_old_order): the batch size and
    # the order seed its epoch was trained with
    _old_batch_size: Optional[int] = None
    _old_seed: Optional[int] = None

    _resume_at: tuple[int, int] = (0, 0)  # (epoch, batches of it already trained on)
    _resume_samples: Optional[int] = None  # samples of that epoch already trained on (None: not stored)
    _resume_seed: Optional[int] = None  # the seed that epoch's order was drawn with (None: not stored)
    # where this fit started in its first epoch: (epoch, samples done, batches done, seed of its order); a
    # checkpoint written later in that epoch counts its samples from there
    _started_at: Optional[tuple[int, int, int, int]] = None
    _training_batch_size: Optional[int] = None  # the batch size of the training loader last built

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        fit_loop = trainer.fit_loop
        epochs = fit_loop.epoch_progress.current
        # saved at an epoch's end, that epoch counts as processed (the run continues with the next one); saved
        # within an epoch (ready > processed), the run continues it after the batches it has processed
        within = epochs.ready > epochs.processed
        epoch, done = int(epochs.processed), int(fit_loop.epoch_loop.batch_progress.current.processed if within else 0)
        # world_size: the processes sharing the epoch; samples_done counts one process's share (zoo.train.run.
        # _check_resumed_processes refuses another count mid-epoch)
        order: dict[str, Any] = {"epoch": epoch, "batches_done": done, "world_size": int(trainer.world_size)}
        if self._training_batch_size is not None:
            started = self._started_at
            if started is not None and started[0] == epoch and within:  # the batches since the resume: this size
                samples, seed = started[1] + (done - started[2]) * self._training_batch_size, started[3]
            else:
                samples, seed = done * self._training_batch_size, int(self.seed)
            order.update(samples_done=int(samples), seed=int(seed))
        return {"training_order": order}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        order = (state or {}).get("training_order")
        self._pending_skip = None
        if order:
            self._resume_at = (int(order["epoch"]), int(order["batches_done"]))
            self._resume_samples = int(order["samples_done"]) if order.get("samples_done") is not None else None
            self._resume_seed = int(order["seed"]) if order.get("seed") is not None else None
            if self._resume_samples is None and self._old_batch_size is not None:  # an older checkpoint
                self._resume_samples = self._resume_at[1] * self._old_batch_size
            if self._resume_seed is None and self._old_seed is not None:
                self._resume_seed = self._old_seed

    def restore_old_order(self, order: dict[str, Any], stored_config: Optional[dict]) -> Optional[int]:
        """A checkpoint from before ``samples_done`` and ``seed`` were stored (its ``training_order`` holds the epoch
        and the batches done only): the batch size and the order seed its epoch was trained with, from its stored
        ``zoo_config``, so that the resumed epoch skips exactly the samples done, in their order. Returns those
        samples (None where the config holds no batch size: a note says the current one is used)."""
        stored_config = stored_config if isinstance(stored_config, dict) else {}
        data = stored_config.get("data") if isinstance(stored_config.get("data"), dict) else {}
        batch_size = data.get("batch_size")
        seed = _lookup(stored_config, self.order_seed_key)
        self._old_batch_size = int(batch_size) if _is_count(batch_size) and batch_size > 0 else None
        self._old_seed = int(seed) if _is_count(seed) else None
        epoch, done = int(order["epoch"]), int(order["batches_done"])
        if self._old_batch_size is None and done:
            print(f"zoo train: note: the checkpoint records neither the samples of epoch {epoch} it trained on nor "
                  f"its data.batch_size: the rest of the epoch skips {done} batches of the current size; resume "
                  f"with the data.batch_size it was trained with to train each sample once", file=sys.stderr)
        return None if self._old_batch_size is None else done * self._old_batch_size

    def data_depends_on_order_seed(self) -> bool:
        """Whether the data set (its examples or its split) is drawn with the order seed, when that seed is a data key
        (``data.seed``): a mid-epoch change of it is then refused (:meth:`check_same_data`), otherwise accepted with
        the note that the rest of the epoch keeps its stored order. True unless a data module knows better."""
        return True

    def check_same_data(self, epoch: int, stored: Optional[dict], current: Optional[dict]) -> None:
        """A resume in the middle of ``epoch`` whose data config (``current``) differs from the checkpoint's
        (``stored``) in a key that defines the data set (not in :attr:`mid_epoch_changeable_keys`, or in
        :attr:`mid_epoch_fixed_keys`): refused, naming the key. The stored position (the epoch's order and the
        samples done) counts the checkpoint's data set; with another one the rest of the epoch would train other
        examples, twice or never."""
        if not isinstance(stored, dict) or not isinstance(current, dict):
            return
        if self.mid_epoch_changeable_keys is not None:
            checked = (set(stored) | set(current)) - set(self.mid_epoch_changeable_keys)
            allowed = f"only data.{', data.'.join(self.mid_epoch_changeable_keys)} may change mid-epoch"
        elif self.mid_epoch_fixed_keys is not None:
            checked = set(self.mid_epoch_fixed_keys)
            allowed = f"data.{', data.'.join(self.mid_epoch_fixed_keys)} define the training set"
        else:
            return
        # a key on one side only counts as the data module's default there: a key added to the data config since the
        # checkpoint's run, at its default, reproduces what that run did (older runs resume as they were), while
        # +data.normalize_features=true changes the data set
        defaults = _constructor_defaults(type(self))
        unset = object()
        seed_key = self.order_seed_key[len("data."):] if self.order_seed_key.startswith("data.") else None
        for key in sorted(checked):
            before, now = stored.get(key, defaults.get(key, unset)), current.get(key, defaults.get(key, unset))
            if key in _DATA_PATH_KEYS:
                before, now = _as_read(before), _as_read(now)
            if before != now and not (key == seed_key and not self.data_depends_on_order_seed()):
                # (a new order seed that draws no data only orders the epochs after this one: training_sampler's note)
                raise ValueError(
                    f"cannot resume in the middle of epoch {epoch} with {_setting(current, key)}: the checkpoint's "
                    f"run used {_setting(stored, key)}, which makes another data set or order than the one its "
                    f"position in the epoch counts; resume from a checkpoint written at an epoch's end, or keep "
                    f"{_setting(stored, key)} ({allowed})")

    def training_sampler(self, dataset: Dataset, batch_size: int) -> EpochShuffleSampler:
        """The training split's sampler, at the restored position (epoch 0 for a new run). The restored epoch is
        used once: a later loader (another fit, or a reload) gets its epoch from Lightning's ``set_epoch``. The
        skip of the samples already trained on stays with every sampler built until one of them starts that
        epoch: with ``trainer.reload_dataloaders_every_n_epochs`` Lightning builds the loader again before the
        resumed epoch starts (the first one only served the schedule's length)."""
        epoch, done = self._resume_at
        samples = self._resume_samples if self._resume_samples is not None else done * int(batch_size)
        seed = self._resume_seed if self._resume_seed is not None else int(self.seed)
        self._resume_at, self._resume_samples, self._resume_seed = (0, 0), None, None
        self._training_batch_size = int(batch_size)
        if done or samples:
            self.check_batch_size_fits(epoch, done, samples, int(batch_size))
            if seed != int(self.seed):
                key = self.order_seed_key
                print(f"zoo train: note: resumed in the middle of epoch {epoch}, whose order was drawn with "
                      f"{key}={seed}: the rest of that epoch keeps it, and {key}={self.seed} orders the epochs after "
                      f"it", file=sys.stderr)
            self._pending_skip = [(epoch, samples, seed)]
            self._started_at = (epoch, samples, done, seed)
        sampler = EpochShuffleSampler(dataset, self.seed)
        sampler.set_epoch(epoch)
        pending = getattr(self, "_pending_skip", None)
        if pending:
            sampler.skip_once(pending[0][0], pending[0][1], pending=pending)  # the seed travels in pending
        return sampler

    @staticmethod
    def check_batch_size_fits(epoch: int, batches_done: int, samples_done: int, batch_size: int) -> None:
        """Lightning ends an epoch when its batch count reaches the loader's length (``len(dataset) / batch_size``
        batches), counting the batches restored from the checkpoint: the rest of the epoch fits when the batches done
        are no more than the new batch size makes of the samples done (always so for the same or a smaller size).
        A larger size would end the epoch early, its last samples never trained on: refused (zoo train checks it
        before the run's files are rewritten, :func:`zoo.train.run._check_resumed_order_fits`)."""
        if batches_done <= samples_done // batch_size:
            return
        largest = samples_done // batches_done
        raise ValueError(f"data.batch_size={batch_size} cannot take over in the middle of epoch {epoch}: the "
                         f"checkpoint stopped after {batches_done} batches ({samples_done} samples), and Lightning, "
                         f"counting the epoch in batches, would end it before its last samples; resume with "
                         f"data.batch_size<={largest} (a larger size can take over from a checkpoint at an epoch's "
                         f"end)")


# the data keys that name files or folders (data.root: a data set's folder; data.path: graph classification's
# torch.save'd list of Data); zoo.train.run stores them absolute since 2026-12-06
_DATA_PATH_KEYS = ("root", "path")


def _is_local_path(value) -> bool:
    """A path value on this machine (not empty, not null, not a URL such as s3://...)."""
    return isinstance(value, str) and bool(value) and "://" not in value


def _as_read(value):
    """A data path as the file it names: a relative one (a run's config from before data paths were stored absolute)
    read from the current folder, as a resumed run given it reads it, ``~`` expanded, symbolic links followed (a
    link to the run's folder names the same files); other values as they are."""
    if _is_local_path(value):
        return os.path.realpath(os.path.expanduser(value))
    return value


def _constructor_defaults(cls) -> dict[str, Any]:
    """The keyword defaults of ``cls``'s constructor and of its bases' (a data module's ``__init__(*args, **kwargs)``
    passes split_seed / val_fraction on to its base, whose signature holds their defaults); the subclass's win."""
    import inspect

    defaults: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        try:
            parameters = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            continue
        defaults.update({p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty})
    return defaults


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _lookup(config: dict, dotted: str):
    """``config["data"]["seed"]`` for ``"data.seed"``; None where a level is missing."""
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def _setting(data: dict, key: str) -> str:
    """``data.key=value`` as an override would write it (``null`` for None), or ``no data.key``."""
    if key not in data:
        return f"no data.{key}"
    value = data[key]
    return f"data.{key}={'null' if value is None else value}"
