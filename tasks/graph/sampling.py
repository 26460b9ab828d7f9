"""Uniform neighbour sampling for mini-batch node classification, in pure PyTorch.

PyG trains large graphs (ogbn-products: 2.4M nodes, 124M directed edges) on mini-batches of seed nodes and their
sampled k-hop neighbourhoods with ``torch_geometric.loader.NeighborLoader``. Its sampler needs pyg-lib or torch-sparse
(``torch_geometric/sampler/neighbor_sampler.py``, ``NeighborSampler._sample``: "'NeighborSampler' requires either
'pyg-lib' or 'torch-sparse'"), neither of which installs from PyPI wheels, so the zoo has its own with the semantics
of PyG's default homogeneous setting (``subgraph_type='directional'``, ``disjoint=False``; ``replace=False`` by default,
``replace=True`` as below):

* the graph is kept as a CSR of *incoming* edges (PyG's CSC, ``to_csc``): for node i, the sources j of its edges
  j -> i, the message-passing direction;
* hop h expands the nodes first reached at hop h - 1 (the seeds at hop 1): for each, ``num_neighbors[h]`` distinct
  in-neighbours drawn uniformly without replacement, all of them when its in-degree is at most that many (``-1``:
  all of them whatever the degree); with ``replace=True``, ``num_neighbors[h]`` in-edges drawn uniformly *with*
  replacement for every node with at least one, whatever its degree (an edge may be drawn twice: the sampled
  subgraph then holds it twice, and ``e_id`` names it twice), as pyg-lib's sampler does
  (``pyg_lib/csrc/sampler/cpu/neighbor_kernel.cpp``, ``NeighborSampler::_sample``, case 2; ``-1`` still takes
  every in-edge once);
* a node reached twice (by two frontier nodes, or already sampled) is kept once; the nodes are numbered in the order
  they are first reached, the seeds first and in their given order (PyG's ``n_id``, ``batch_size`` seeds);
* the sampled edges are relabelled to those local numbers and keep their direction, source -> destination, the
  destination being the node nearer the seeds (PyG's ``edge_index = stack([row, col])`` in
  ``torch_geometric/loader/utils.py``, ``filter_data``); ``e_id`` holds their columns in the full ``edge_index``.

With ``num_neighbors = [-1] * L`` every node within L - 1 hops of a seed keeps all its in-edges, so an L-layer
message-passing model gives the seeds exactly their full-graph outputs.

The draw is vectorised over the frontier (no Python loop over nodes): the k of d positions are chosen with Floyd's
algorithm (Bentley & Floyd, "Programming Pearls: A sample of brilliance", CACM 1987), k steps each over all the
frontier's high-degree nodes at once, so the cost grows with k, not with a hub's degree. Nothing is N x N: the
memory is the CSR (two E-long and one (N + 1)-long int64 tensors) and one N-long lookup table.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from zoo.layers import check_flag, is_int

__all__ = ["NeighborSampler", "SampledSubgraph", "check_num_neighbors"]


class SampledSubgraph(NamedTuple):
    """The output of :meth:`NeighborSampler.sample`, in PyG's ``SamplerOutput`` / NeighborLoader terms."""

    n_id: Tensor  # [n] global ids of the sampled nodes, the batch_size seeds first and in order
    edge_index: Tensor  # [2, e] the sampled edges, source -> destination, in local numbers (rows of n_id)
    e_id: Tensor  # [e] their columns in the full graph's edge_index (for edge_attr)
    batch_size: int  # the number of seeds
    num_sampled_nodes: list  # per hop: the nodes first reached there (hop 0: the seeds)
    num_sampled_edges: list  # per hop: the edges sampled there


def check_num_neighbors(num_neighbors, key: str = "num_neighbors") -> list[int]:
    """``num_neighbors`` as a list of ints, one per hop: each >= 1, or -1 for all neighbours (PyG's NeighborLoader
    meaning). Refused, naming ``key``: not a list, empty, a non-integer, 0 or < -1."""
    if isinstance(num_neighbors, (str, bytes, dict)) or not hasattr(num_neighbors, "__len__"):
        raise ValueError(f"{key} must be a list of integers, one per hop (e.g. [10, 10]; -1 = all neighbours), "
                         f"got {num_neighbors!r}")
    values = list(num_neighbors)
    if not values or not all(is_int(k) and (k >= 1 or k == -1) for k in values):
        raise ValueError(f"{key} must be a non-empty list of integers >= 1 or -1 (all neighbours), one per hop "
                         f"(e.g. [10, 10]), got {values!r}")
    return [int(k) for k in values]


class NeighborSampler:
    """Uniform k-hop neighbour sampler of one graph (see the module docstring). Build it once per graph: the CSR of
    incoming edges is sorted here, in O(E log E), and reused by every :meth:`sample`.

    ``edge_index`` [2, E] (source, destination), ``num_nodes`` N (default: the largest id + 1).
    One sampler serves one thread at a time (its lookup table is reused between calls); DataLoader worker
    processes each hold their own copy.
    """

    def __init__(self, edge_index: Tensor, num_nodes: Optional[int] = None):
        if not isinstance(edge_index, Tensor) or edge_index.dim() != 2 or edge_index.size(0) != 2:
            raise ValueError(f"edge_index must be a [2, E] integer tensor, got "
                             f"{tuple(edge_index.shape) if isinstance(edge_index, Tensor) else type(edge_index)}")
        if not _is_integer_dtype(edge_index.dtype):  # .long() truncated 1.7 to 1: an edge nobody wrote
            raise ValueError(f"edge_index must hold integer node ids (torch.long, as PyG's), got {edge_index.dtype}; "
                             f"convert it with edge_index.long() if its values are whole numbers")
        edge_index = edge_index.long()
        largest = int(edge_index.max()) + 1 if edge_index.numel() else 0
        num_nodes = largest if num_nodes is None else int(num_nodes)
        if edge_index.numel() and (int(edge_index.min()) < 0 or largest > num_nodes):
            raise ValueError(f"edge_index holds node ids outside [0, {num_nodes}): ids from {int(edge_index.min())} "
                             f"to {largest - 1}")
        self.num_nodes = num_nodes
        source, destination = edge_index
        # PyG's to_csc: the edges grouped by destination (stable, so a node's in-edges keep their order)
        self.edge_ids = torch.argsort(destination, stable=True)
        self.sources = source[self.edge_ids]
        self.rowptr = torch.zeros(num_nodes + 1, dtype=torch.long)
        torch.cumsum(torch.bincount(destination, minlength=num_nodes), dim=0, out=self.rowptr[1:])
        # global id -> local number while a sample is built, -1 elsewhere (reset after every sample)
        self._local = torch.full((num_nodes,), -1, dtype=torch.long)

    @property
    def in_degree(self) -> Tensor:
        return self.rowptr[1:] - self.rowptr[:-1]

    def sample(self, seed_nodes: Tensor, num_neighbors: Sequence[int],
               generator: Optional[torch.Generator] = None, replace: bool = False) -> SampledSubgraph:
        """The sampled subgraph around ``seed_nodes``: distinct global ids, or a bool mask over the N nodes, which
        means its nonzero() nodes in increasing order (PyG's NeighborLoader ``input_nodes=mask``);
        ``num_neighbors[h]`` in-neighbours per node expanded at hop h (-1: all); ``generator`` makes the draw
        reproducible; ``replace``: draw with replacement (PyG's ``replace=True``, see the module docstring)."""
        num_neighbors = check_num_neighbors(num_neighbors)
        replace = check_flag(replace, "replace")
        seeds = self._seed_ids(seed_nodes)
        if seeds.numel() and (int(seeds.min()) < 0 or int(seeds.max()) >= self.num_nodes):
            raise ValueError(f"seed_nodes must be node ids in [0, {self.num_nodes}), got ids from {int(seeds.min())} "
                             f"to {int(seeds.max())}")
        if torch.unique(seeds).numel() != seeds.numel():
            raise ValueError("seed_nodes must be distinct (each seed is one row of the batch); drop the repeats")
        local = self._local
        nodes, rows, cols, edges = [seeds], [], [], []
        num_sampled_nodes, num_sampled_edges = [seeds.numel()], []
        try:
            local[seeds] = torch.arange(seeds.numel())
            count = seeds.numel()
            frontier, frontier_local = seeds, torch.arange(seeds.numel())
            for k in num_neighbors:
                positions, owner = (self._draw_with_replacement(frontier, k, generator) if replace and k >= 0
                                    else self._draw(frontier, k, generator))
                source = self.sources[positions]
                new = source[local[source] < 0]
                new = _first_occurrences(new)  # each new node once, in the order it is first reached
                nodes.append(new)  # before numbering them: the finally clause resets what nodes holds
                local[new] = torch.arange(count, count + new.numel())
                count += new.numel()
                rows.append(local[source])
                cols.append(frontier_local[owner])
                edges.append(self.edge_ids[positions])
                num_sampled_nodes.append(new.numel())
                num_sampled_edges.append(positions.numel())
                frontier = new
                frontier_local = torch.arange(count - new.numel(), count)
        finally:
            n_id = torch.cat(nodes)
            local[n_id] = -1
        edge_index = torch.stack([torch.cat(rows), torch.cat(cols)])
        return SampledSubgraph(n_id, edge_index, torch.cat(edges), seeds.numel(), num_sampled_nodes,
                               num_sampled_edges)

    def _seed_ids(self, seed_nodes) -> Tensor:
        """``seed_nodes`` as a 1-D long tensor of ids. A bool mask was read as ids 0 and 1 ([True, False] -> [1, 0])
        and float ids were truncated: the mask is turned into its nodes, float ids refused."""
        seeds = torch.as_tensor(seed_nodes).view(-1)
        if seeds.dtype == torch.bool:
            if seeds.numel() != self.num_nodes:
                raise ValueError(f"seed_nodes as a bool mask must have one entry per node ({self.num_nodes}), got "
                                 f"{seeds.numel()}; pass the seed ids instead")
            return seeds.nonzero().view(-1)
        if seeds.numel() and not _is_integer_dtype(seeds.dtype):
            raise ValueError(f"seed_nodes must be integer node ids or a bool mask over the nodes, got {seeds.dtype} "
                             f"values; convert whole-number ids with .long()")
        return seeds.long()

    def _draw(self, frontier: Tensor, k: int, generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
        """(CSR positions of the sampled in-edges, the frontier row each belongs to), grouped by frontier node in
        frontier order: all in-edges where the degree is <= k (or k = -1), else k distinct ones uniformly."""
        start = self.rowptr[frontier]
        degree = self.rowptr[frontier + 1] - start
        taken = degree if k < 0 else degree.clamp(max=k)
        owner = torch.repeat_interleave(torch.arange(frontier.numel()), taken)
        first = torch.cumsum(taken, dim=0) - taken
        within = torch.arange(owner.numel()) - first[owner]  # 0, 1, ... inside each node's share
        positions = start[owner] + within
        if k >= 0:
            subsampled = degree > k
            if bool(subsampled.any()):
                which = subsampled.nonzero().view(-1)
                chosen = _floyd_choices(degree[which], k, generator)  # [len(which), k]
                row_of = torch.full((frontier.numel(),), -1, dtype=torch.long)
                row_of[which] = torch.arange(which.numel())
                pick = subsampled[owner]
                positions[pick] = start[owner[pick]] + chosen[row_of[owner[pick]], within[pick]]
        return positions, owner


    def _draw_with_replacement(self, frontier: Tensor, k: int,
                               generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
        """As :meth:`_draw`, with replacement: k in-edges drawn independently and uniformly for each frontier node
        that has any (so k even where the degree is smaller), none for a node without in-edges."""
        start = self.rowptr[frontier]
        degree = self.rowptr[frontier + 1] - start
        taken = torch.where(degree > 0, k, 0)
        owner = torch.repeat_interleave(torch.arange(frontier.numel()), taken)
        degree_of = degree[owner]
        # float64: exact enough for any degree below 2**50 (as _floyd_choices)
        offsets = (torch.rand(owner.numel(), generator=generator, dtype=torch.float64) * degree_of).long()
        return start[owner] + offsets.minimum(degree_of - 1), owner


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    """Integer tensors (not bool, float or complex): what ids may be given as."""
    return dtype != torch.bool and not dtype.is_floating_point and not dtype.is_complex


def _floyd_choices(degree: Tensor, k: int, generator: Optional[torch.Generator]) -> Tensor:
    """[n, k]: for each of n nodes, k distinct offsets in [0, degree) uniformly (every k-subset equally likely;
    requires degree >= k). Floyd's algorithm, one step for all nodes at once: for j = d - k, ..., d - 1 draw t in
    [0, j]; keep t unless already chosen, then j (which cannot be)."""
    chosen = torch.empty(degree.numel(), k, dtype=torch.long)
    for step in range(k):
        j = degree - k + step
        # float64: exact enough for any degree below 2**50
        t = (torch.rand(degree.numel(), generator=generator, dtype=torch.float64) * (j + 1)).long().minimum(j)
        taken = (chosen[:, :step] == t.unsqueeze(1)).any(dim=1)
        chosen[:, step] = torch.where(taken, j, t)
    return chosen


def _first_occurrences(ids: Tensor) -> Tensor:
    """The distinct values of ``ids`` in the order of their first occurrence (PyG's samplers number new nodes in
    the order they are reached)."""
    if ids.numel() == 0:
        return ids
    unique, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full((unique.numel(),), ids.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(ids.numel()), reduce="amin")
    return unique[torch.argsort(first)]
