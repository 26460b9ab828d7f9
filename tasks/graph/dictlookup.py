"""The DictionaryLookup benchmark of Brody, Alon, Yahav, "How Attentive are Graph Attention Networks?"
(ICLR 2022, section 4.1), generated offline.

For size k: a bipartite graph of k query nodes (features (key, EMPTY=k)) and k key-value nodes
(features (key, perm[key])), an edge from every key-value node to every query node; the label of query
node i is perm[i]. Examples: all k! permutations if k! <= 32000, else 32000 random ones. Train/test
split with *unseen combinations*: per_position_fraction = train_fraction ** (1/k); a random set of
int(per_position_fraction * k^2) (position, value) pairs is "allowed"; an example is a training example
iff every (i, perm[i]) is allowed, so the test set holds (key, value) pairs never seen in training.
Re-derived from tech-srl/how_attentive_are_gats, dictionary_lookup/tasks/dictionary_lookup.py.

Node order inside one graph: queries 0..k-1, then key-value nodes k..2k-1 (as the official code).
A batch of B graphs is a disjoint union: x [B*2k, 2] long, edge_index [2, B*k*k], target_index [B*k]
(the query nodes), y [B*k]. Letters: B graphs per batch, k dictionary size.
"""
from __future__ import annotations

import itertools
import math
import random
from typing import Optional

import torch
from torch import Tensor

from zoo.layers import is_int
from zoo.tasks.graph.datasets import evaluation_sampler
from zoo.train.order import ResumableTrainingOrder

try:
    import lightning as L
except ImportError:  # pragma: no cover - lightning is a dependency
    L = None

__all__ = ["generate_permutations", "unseen_combinations_split", "dictionary_lookup_graph", "collate",
           "DictionaryLookupDataModule"]


def generate_permutations(k: int, max_examples: int = 32000, seed: int = 11) -> Tensor:
    """All k! permutations of range(k) (lexicographic) if k! <= max_examples, else max_examples random
    ones (with possible repeats, as in the official code). -> [n, k] long."""
    if k < 2:
        raise ValueError(f"DictionaryLookup needs k >= 2, got {k}")
    if math.factorial(k) <= max_examples:
        return torch.tensor(list(itertools.permutations(range(k))), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(k, generator=g) for _ in range(max_examples)])


def unseen_combinations_split(perms: Tensor, train_fraction: float = 0.8, seed: int = 11) -> tuple[Tensor, Tensor]:
    """Split permutations so that the test set holds (position, value) pairs never seen in training."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    k = perms.size(1)
    per_position = train_fraction ** (1.0 / k)
    num_allowed = int(per_position * k * k)
    rng = random.Random(seed)
    allowed = torch.zeros(k, k, dtype=torch.bool)
    for pos, val in rng.sample(list(itertools.product(range(k), range(k))), num_allowed):
        allowed[pos, val] = True
    is_train = allowed[torch.arange(k).expand_as(perms), perms].all(dim=1)
    train, test = perms[is_train], perms[~is_train]
    order = torch.randperm(train.size(0), generator=torch.Generator().manual_seed(seed))
    return train[order], test


def dictionary_lookup_graph(k: int) -> Tensor:
    """Edges of one graph: every key-value node (k..2k-1) -> every query node (0..k-1), [2, k*k]."""
    src = torch.arange(k, 2 * k).repeat_interleave(k)
    dst = torch.arange(k).repeat(k)
    return torch.stack([src, dst])


_EDGE_CACHE: dict = {}


def collate(perms: Tensor) -> dict:
    """B permutations -> one batch (disjoint union). The edge_index tensor is cached per (k, B) so the
    layers' CSR cache hits on every batch of the same size."""
    B, k = perms.shape
    keys = torch.arange(k).repeat(B, 1)
    queries = torch.stack([keys, torch.full_like(keys, k)], dim=-1)  # [B, k, 2]
    kv = torch.stack([keys, perms], dim=-1)  # [B, k, 2]
    x = torch.cat([queries, kv], dim=1).reshape(B * 2 * k, 2)
    key = (k, B)
    if key not in _EDGE_CACHE:
        one = dictionary_lookup_graph(k)
        offsets = (torch.arange(B) * 2 * k).repeat_interleave(k * k)
        edge_index = one.repeat(1, B) + offsets
        target_index = (torch.arange(B)[:, None] * 2 * k + torch.arange(k)).reshape(-1)
        if len(_EDGE_CACHE) > 16:
            _EDGE_CACHE.clear()
        _EDGE_CACHE[key] = (edge_index, target_index)
    edge_index, target_index = _EDGE_CACHE[key]
    return {"x": x, "edge_index": edge_index, "target_index": target_index, "y": perms.reshape(-1),
            "num_graphs": B}


class _PermDataset(torch.utils.data.Dataset):
    def __init__(self, perms: Tensor):
        self.perms = perms

    def __len__(self) -> int:
        return self.perms.size(0)

    def __getitem__(self, i: int) -> Tensor:
        return self.perms[i]


def _collate_list(items) -> dict:
    return collate(torch.stack(items))


_Base = L.LightningDataModule if L is not None else object


def _check_arguments(k, max_examples, seed, batch_size, train_fraction=0.8) -> None:
    """The data.* settings, named before torch sees them: data.max_examples=0 failed in torch.stack ("stack expects
    a non-empty TensorList"), data.seed=foo in manual_seed ("expected a long"), data.train_fraction=1.0 in
    unseen_combinations_split without its data. prefix."""
    if not is_int(k) or k < 2:
        raise ValueError(f"data.k must be an integer >= 2 (the dictionary size), got {k!r}")
    if (isinstance(train_fraction, bool) or not isinstance(train_fraction, (int, float))
            or not 0.0 < train_fraction < 1.0):
        raise ValueError(f"data.train_fraction must be a number in (0, 1) (about the share of the permutations "
                         f"that go to training; the paper uses 0.8), got {train_fraction!r}")
    if not is_int(max_examples) or max_examples < 1:
        raise ValueError(f"data.max_examples must be a positive integer (the cap on generated permutations; the "
                         f"paper uses 32000), got {max_examples!r}")
    if not is_int(seed):
        raise ValueError(f"data.seed must be an integer (it seeds the permutations and the split), got {seed!r}")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"data.batch_size must be a positive integer, got {batch_size!r}")


class DictionaryLookupDataModule(ResumableTrainingOrder, _Base):
    """Lightning DataModule of the DictionaryLookup benchmark (train / test = unseen combinations;
    validation is the test split, as the paper reports the best test accuracy)."""

    model_kind = "dictlookup"  # the registry suffix of the models that read these batches
    # data.seed (fixed in configs/data/graph_dictlookup.yaml) draws the training order, the permutations and their
    # split: a mid-epoch resume names that key, reads it from an older checkpoint's stored config, and refuses a
    # change of it or of the data set's other keys (ResumableTrainingOrder); the others only batch and load
    order_seed_key = "data.seed"
    mid_epoch_changeable_keys = ("batch_size", "num_workers")

    def __init__(self, k: int = 10, batch_size: int = 1024, train_fraction: float = 0.8,
                 max_examples: int = 32000, seed: int = 11, num_workers: int = 0,
                 num_features: Optional[int] = None, num_classes: Optional[int] = None,
                 model_kind: str = "dictlookup"):
        super().__init__()
        _check_arguments(k, max_examples, seed, batch_size, train_fraction)
        sizes = {name: int(value) for name, value in (("num_features", num_features), ("num_classes", num_classes))
                 if value is not None}
        for name, value in sizes.items():
            if value != k:
                # sizes that agree with each other but not with k are a model of another k: zoo eval's data.k=5 on a
                # k=10 checkpoint (which data.* cannot resize), or zoo train's data.num_features=7 data.num_classes=7
                other = (f": the model is one of k={value} (a checkpoint of a k={value} run is evaluated with "
                         f"data.k={value}; a new run needs data.k alone)"
                         if len(set(sizes.values())) == 1 and len(sizes) == 2 else "")
                raise ValueError(f"DictionaryLookup(k={k}) has {name}={k}, the config says {value}{other}")
        if model_kind != "dictlookup":
            raise ValueError(f"DictionaryLookup batches need model_kind='dictlookup', got {model_kind!r}")
        self.num_features = k
        self.k, self.batch_size, self.train_fraction = k, batch_size, train_fraction
        self.max_examples, self.seed, self.num_workers = max_examples, seed, num_workers
        self.train_perms: Optional[Tensor] = None
        self.test_perms: Optional[Tensor] = None
        self.num_classes = k

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_perms is None:
            perms = generate_permutations(self.k, self.max_examples, self.seed)
            self.train_perms, self.test_perms = unseen_combinations_split(perms, self.train_fraction, self.seed)
            if len(self.train_perms) == 0 or len(self.test_perms) == 0:
                raise ValueError(f"k={self.k}: the unseen-combination split left an empty train or test set")

    def _loader(self, perms: Tensor, shuffle: bool):
        # the training order comes from (seed, epoch), which Lightning passes on through set_epoch, not from
        # the global RNG at each epoch's iterator: a run resumed from a checkpoint sees the same batches
        dataset = _PermDataset(perms)
        if shuffle:
            sampler = self.training_sampler(dataset, self.batch_size)
        else:  # val and test are the same unseen-combination split
            sampler = evaluation_sampler(dataset, "unseen-combination split", "raise data.max_examples or lower "
                                         "data.train_fraction", unit="example")
        return torch.utils.data.DataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler,
            collate_fn=_collate_list, num_workers=self.num_workers,
        )

    def train_dataloader(self):
        return self._loader(self.train_perms, True)

    def val_dataloader(self):
        return self._loader(self.test_perms, False)

    def test_dataloader(self):
        return self._loader(self.test_perms, False)

    def predict_dataloader(self):
        """The test graphs, in order: ``trainer.predict`` gives each query's class probabilities, batch by batch."""
        return self._loader(self.test_perms, False)
