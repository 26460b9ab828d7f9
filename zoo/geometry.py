"""Point-cloud neighbourhoods in plain PyTorch: k nearest neighbours and farthest point sampling.

The geometry half of point attention (Point Transformer's vector attention over kNN neighbours, part
attention): which points a point attends to. PyG's ``knn``, ``knn_graph`` and ``fps`` need the
torch_cluster / pyg-lib extensions, which are not installable here, so these are the zoo's own, with
torch_cluster's signatures and conventions (torch_cluster 1.6, ``torch_cluster/knn.py``, ``fps.py``):

* :func:`knn` -- for each point of ``y``, the ``k`` nearest points of ``x`` in the same example ->
  [2, M] (row 0: index into ``y``, row 1: index into ``x``), nearest first.
* :func:`knn_graph` -- the kNN graph of one point set as an ``edge_index`` (flow "source_to_target": edges
  neighbour -> centre, so a layer aggregates over each point's neighbours), self loops left out unless
  ``loop=True``.
* :func:`fps` -- farthest point sampling: per example, ``ceil(ratio * n)`` indices, each the point farthest
  (squared Euclidean) from those already taken, ties to the lowest index; the first is index 0 of the
  example, or a random one with ``random_start=True``.

Examples are given as torch_cluster's ``batch`` vector (example id per point, sorted). Results are exact
(squared Euclidean, or cosine distance with ``cosine=True``; ties between equal distances go to the lower
index). Large Euclidean searches in 1-3 dimensions (at least 2**24 query x point pairs in an example) go
through a uniform grid: each query reads the 3^D cells around its own and keeps the answer when the grid
proves it (:func:`_grid_knn`); the few queries it cannot settle, and all other searches, are brute force in
query chunks of at most ``chunk`` x n_x (and at most 2**25) distances, O(n_y n_x) time and bounded memory
(torch_cluster's CUDA kernels are brute force too; its CPU path uses a KD-tree).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["knn", "knn_graph", "fps"]

_MAX_CHUNK_ELEMENTS = 1 << 25  # distances per query chunk (128 MB in float32)
_GRID_MIN_PAIRS = 1 << 24  # query x point pairs from which a low-dimensional Euclidean search uses the grid


def _check_points(name: str, points) -> Tensor:
    if not isinstance(points, Tensor) or not points.is_floating_point():
        what = points.dtype if isinstance(points, Tensor) else type(points).__name__
        raise TypeError(f"{name} must be a floating-point tensor of shape [N, D], got {what}")
    if points.dim() == 1:
        points = points.view(-1, 1)
    if points.dim() != 2:
        raise ValueError(f"{name} must have shape [N, D], got {tuple(points.shape)}")
    if points.numel() and not bool(torch.isfinite(points).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return points


def _segments(name: str, batch: Optional[Tensor], n: int, device) -> tuple[Tensor, int]:
    """``batch`` [n] (sorted example ids) -> (ptr [B+1] offsets of each example, B)."""
    if batch is None:
        return torch.tensor([0, n], device=device), 1
    if not isinstance(batch, Tensor) or batch.is_floating_point() or batch.dim() != 1 or batch.numel() != n:
        shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
        raise ValueError(f"{name} must be an integer tensor of shape [{n}] (example id per point), got {shape}")
    if n == 0:
        return torch.zeros(1, dtype=torch.long, device=device), 0
    batch = batch.long()
    if int(batch.min()) < 0 or (n > 1 and bool((batch[1:] < batch[:-1]).any())):
        raise ValueError(f"{name} must hold non-negative example ids in sorted order (as PyG's Batch gives them)")
    size = int(batch.max()) + 1
    ptr = torch.zeros(size + 1, dtype=torch.long, device=device)
    torch.cumsum(torch.bincount(batch, minlength=size), 0, out=ptr[1:])
    return ptr, size


def _distances(y: Tensor, x: Tensor, cosine: bool) -> Tensor:
    """[ny, D], [nx, D] -> [ny, nx] squared Euclidean (or cosine) distances (the callers pass float64, so the
    expansion |y|^2 + |x|^2 - 2 y.x does not cancel away the ranks of float32 coordinates)."""
    if cosine:
        yn = torch.nn.functional.normalize(y, dim=1)
        xn = torch.nn.functional.normalize(x, dim=1)
        return 1.0 - yn @ xn.t()
    # (y - x)^2 summed, by the expansion |y|^2 + |x|^2 - 2 y.x, in one buffer (the ranking only; the callers
    # re-rank candidates with exact differences)
    d = (y * y).sum(1, keepdim=True) + (x * x).sum(1)[None, :]
    return d.addmm_(y, x.t(), alpha=-2.0)


@torch.no_grad()
def knn(x: Tensor, y: Tensor, k: int, batch_x: Optional[Tensor] = None, batch_y: Optional[Tensor] = None,
        cosine: bool = False, chunk: int = 1024) -> Tensor:
    """For each point of ``y`` [Ny, D], the ``k`` nearest points of ``x`` [Nx, D] of the same example.

    Returns [2, M] int64: row 0 the index into ``y``, row 1 the index into ``x``, grouped by query in order
    and nearest first within a query (M = Ny * k when every example of ``x`` has at least k points; fewer
    for examples that have fewer, as in torch_cluster). The final ranking uses float64 distances, so float32
    rounding decides neither the order nor ties.
    """
    x, y = _check_points("x", x), _check_points("y", y)
    if x.size(1) != y.size(1):
        raise ValueError(f"x and y must have the same number of coordinates, got {x.size(1)} and {y.size(1)}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on one device, got {x.device} and {y.device}")
    ptr_x, bx = _segments("batch_x", batch_x, x.size(0), x.device)
    ptr_y, by = _segments("batch_y", batch_y, y.size(0), y.device)
    ptr_x = ptr_x.tolist()
    ptr_y = ptr_y.tolist()
    if by > bx and any(ptr_y[b + 1] > ptr_y[b] for b in range(bx, by)):
        raise ValueError(f"batch_y has examples ({by}) that batch_x ({bx}) does not have")
    rows, cols = [], []
    work = torch.float64 if x.dtype == torch.float64 or cosine else torch.float32
    xw, yw = x.to(work), y.to(work)
    for b in range(by):
        y0, y1, x0, x1 = ptr_y[b], ptr_y[b + 1], ptr_x[b], ptr_x[b + 1]
        kk = min(k, x1 - x0)
        if y1 == y0 or kk == 0:
            continue
        order = _example_knn(xw[x0:x1], yw[y0:y1], x[x0:x1], y[y0:y1], kk, cosine, chunk)
        rows.append(torch.arange(y0, y1, device=x.device).repeat_interleave(kk))
        cols.append((order + x0).reshape(-1))
    if not rows:
        return torch.empty(2, 0, dtype=torch.long, device=x.device)
    return torch.stack([torch.cat(rows), torch.cat(cols)])


def _example_knn(xw: Tensor, yw: Tensor, x: Tensor, y: Tensor, k: int, cosine: bool, chunk: int) -> Tensor:
    """One example: [ny, k] local indices into x. Low-dimensional Euclidean searches over many points go
    through a uniform grid (:func:`_grid_knn`); the queries it cannot settle, and every other search, are
    brute force in chunks of at most 2**25 distances."""
    order = None
    todo = torch.arange(y.size(0), device=y.device)
    if not cosine and x.size(1) <= 3 and x.size(0) * y.size(0) >= _GRID_MIN_PAIRS:
        order, settled = _grid_knn(x.double(), y.double(), k)
        todo = (~settled).nonzero().view(-1)
    if order is None:
        order = torch.empty(y.size(0), k, dtype=torch.long, device=y.device)
    rows_per_chunk = max(1, min(chunk, _MAX_CHUNK_ELEMENTS // x.size(0)))
    for q0 in range(0, todo.numel(), rows_per_chunk):
        rows = todo[q0 : q0 + rows_per_chunk]
        order[rows] = _nearest(yw[rows], xw, k, cosine, y[rows], x)
    return order


def _grid_knn(x: Tensor, y: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact kNN of low-dimensional points through a uniform grid, in float64: (order [ny, k], settled [ny]).

    The grid's cells hold about max(k / 2, 2) points on average. Each query looks at the 3^D cells around its
    own; its k best candidates (ranked as :func:`_nearest` ranks: distance, then index) are the true ones when
    the k-th is closer than the nearest face of that 3^D block that has grid beyond it (every point outside is
    at least that far). Queries for which that does not hold (sparse regions, fewer than k candidates, ties
    beyond the candidates kept, queries outside x's bounding box) and queries in crowded cells (clustered
    points, where the grid would read more candidates than brute force) are returned unsettled, for the
    brute-force pass. Queries run in cell order, so neighbouring queries read neighbouring memory."""
    nx, dims = x.shape
    ny = y.size(0)
    order = torch.zeros(ny, k, dtype=torch.long, device=x.device)
    settled = torch.zeros(ny, dtype=torch.bool, device=x.device)
    lo, hi = x.min(0).values, x.max(0).values
    extent = hi - lo
    spread = extent > 1e-9 * float(extent.max().clamp_min(1e-300))  # axes along which the points vary
    if not bool(spread.any()):  # every point at one place: ranks are by index, brute force does that
        return order, settled
    volume = float(extent[spread].prod())
    side = (volume * max(k / 2.0, 2.0) / nx) ** (1.0 / int(spread.sum()))
    cells = torch.where(spread, (extent / side).floor().long() + 1, torch.ones_like(extent, dtype=torch.long))
    strides = torch.ones(dims, dtype=torch.long, device=x.device)
    for j in range(dims - 2, -1, -1):
        strides[j] = strides[j + 1] * cells[j + 1]
    num_cells = int(cells[0] * strides[0])

    def cell_of(p: Tensor) -> Tensor:
        return torch.minimum(((p - lo) / side).floor().long().clamp_min(0), cells - 1)

    cell_sorted, x_by_cell = torch.sort((cell_of(x) * strides).sum(1), stable=True)
    counts = torch.bincount(cell_sorted, minlength=num_cells)
    starts = torch.cumsum(counts, 0) - counts

    offsets = torch.cartesian_prod(*[torch.tensor([-1, 0, 1], device=x.device)] * dims).view(-1, dims)
    cq = cell_of(y)  # [ny, D]
    near = cq[:, None, :] + offsets[None]  # [ny, 3^D, D]
    near_id = (near.clamp_min(0).minimum(cells - 1) * strides).sum(-1)
    near_count = torch.where(((near >= 0) & (near < cells)).all(-1), counts[near_id], 0)
    near_start = starts[near_id]
    # distance from the query to the nearest face of its 3^D block behind which the grid goes on, less a
    # rounding allowance (points are binned by a float division)
    inf = torch.full_like(y, float("inf"))
    below = torch.where(cq - 1 >= 0, y - (lo + (cq - 1).double() * side), inf)
    above = torch.where(cq + 1 <= cells - 1, lo + (cq + 2).double() * side - y, inf)
    margin = (torch.minimum(below, above).min(1).values - 1e-9 * side).clamp_min(0.0)
    inside = ((y >= lo) & (y <= hi)).all(1)

    width = near_count.max(1).values  # widest of each query's cells (the padding of its candidate rows)
    cap = max(64, nx // (8 * offsets.size(0)))  # wider than this: brute force is cheaper
    queries = (inside & (width <= cap)).nonzero().view(-1)
    queries = queries[torch.argsort((cq[queries] * strides).sum(1), stable=True)]  # in cell order
    keep = min(k + 8, offsets.size(0) * int(cap))  # candidates ranked exactly per query
    budget = _MAX_CHUNK_ELEMENTS // 8
    q0 = 0
    while q0 < queries.numel():
        rows = queries[q0 : q0 + max(1, budget // (offsets.size(0) * max(int(width[queries[q0]]), 1)))]
        w = int(width[rows].max())
        rows = rows[: max(1, budget // (offsets.size(0) * max(w, 1)))]
        q0 += rows.numel()
        if w == 0:
            continue
        slot = torch.arange(w, device=x.device)
        take = slot < near_count[rows, :, None]  # [q, 3^D, w]
        pos = (near_start[rows, :, None] + slot).clamp_max(nx - 1)
        cand = torch.where(take, x_by_cell[pos], nx).view(rows.numel(), -1)  # nx: no candidate
        d = (x[cand.clamp_max(nx - 1)] - y[rows, None, :]).square().sum(-1).masked_fill(cand == nx, float("inf"))
        m = min(keep, cand.size(1))
        if m < k:
            continue  # fewer than k candidate slots: brute force
        top_d, top = torch.topk(d, m, dim=1, largest=False, sorted=True)
        top_c = cand.gather(1, top)
        # rank the kept candidates by (distance, index), as the brute-force pass does
        top_c, by_index = torch.sort(top_c, dim=1)
        top_d = top_d.gather(1, by_index)
        d_sorted, rank = torch.sort(top_d, dim=1, stable=True)
        order[rows] = top_c.gather(1, rank[:, :k])
        kth = d_sorted[:, k - 1]
        # settled: the k-th is a real candidate, nearer than anything outside the block, and (unless every
        # candidate was kept) strictly nearer than the farthest kept one, so no equal candidate was cut off
        complete = kth < d_sorted[:, m - 1] if m < cand.size(1) else torch.ones_like(kth, dtype=torch.bool)
        settled[rows] = torch.isfinite(kth) & (kth < margin[rows] ** 2) & complete
    return order, settled


def _nearest(y: Tensor, x: Tensor, k: int, cosine: bool, y_exact: Tensor, x_exact: Tensor) -> Tensor:
    """[ny, k] indices of the k nearest points of x per row of y, nearest first, ties to the lower index.

    Candidates come from distances in the working dtype (float32 for float32 points: the fast pass); the
    ``k + margin`` best are then ranked by exact float64 distances, so the order and the tie rule do not
    depend on float32 rounding. Rows where the margin cannot hold every candidate within float32 rounding
    of the k-th distance (many exact ties) are ranked over all points."""
    d = _distances(y, x, cosine)
    n = d.size(1)
    m = min(n, k + 8 + k // 4)
    if m == n:
        cand = torch.arange(n, device=d.device).expand(d.size(0), n)
    else:
        cand_vals, cand = torch.topk(d, m, dim=1, largest=False, sorted=True)
        tol = 1e-5 * cand_vals[:, k - 1 : k].abs() + 1e-6 if d.dtype == torch.float32 else 0.0
        short = (d <= cand_vals[:, k - 1 : k] + tol).sum(1) >= m
        if bool(short.any()):  # ties beyond the margin: rank those rows over every point
            cand = cand.clone()
            rows = short.nonzero().view(-1)
            exact = _distances(y_exact[rows].double(), x_exact.double(), cosine)
            full = torch.sort(exact, dim=1, stable=True).indices[:, :m]
            cand[rows] = full
    # exact ranking of the candidates: sort by index, then stably by exact distance
    cand = torch.sort(cand, dim=1).values
    exact = _pair_distances(y_exact.double(), x_exact.double(), cand, cosine)
    return cand.gather(1, torch.sort(exact, dim=1, stable=True).indices[:, :k])


def _pair_distances(y: Tensor, x: Tensor, cand: Tensor, cosine: bool) -> Tensor:
    """Distances from each row of y to its candidate points x[cand[row]] -> [ny, m]."""
    xc = x[cand]  # [ny, m, D]
    if cosine:
        yn = torch.nn.functional.normalize(y, dim=1)[:, None, :]
        return 1.0 - (torch.nn.functional.normalize(xc, dim=2) * yn).sum(-1)
    return (xc - y[:, None, :]).square().sum(-1)


@torch.no_grad()
def knn_graph(x: Tensor, k: int, batch: Optional[Tensor] = None, loop: bool = False,
              flow: str = "source_to_target", cosine: bool = False, chunk: int = 1024) -> Tensor:
    """The k-nearest-neighbour graph of the points ``x`` [N, D] (per example of ``batch``) -> edge_index [2, E].

    As torch_cluster.knn_graph: with flow "source_to_target" each edge runs neighbour -> centre (row 0 the
    neighbour, row 1 the point whose neighbourhood it is), so a message-passing layer aggregates each point's
    k neighbours; "target_to_source" flips the rows. ``loop=False`` looks up k + 1 neighbours and drops the
    point itself, so each point keeps k others (fewer when its example is smaller).
    """
    if flow not in ("source_to_target", "target_to_source"):
        raise ValueError(f"flow must be 'source_to_target' or 'target_to_source', got {flow!r}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    centre, neighbour = knn(x, x, k if loop else k + 1, batch, batch, cosine=cosine, chunk=chunk)
    if not loop:
        keep = centre != neighbour
        centre, neighbour = centre[keep], neighbour[keep]
        # a point with a duplicate may not have come back as its own neighbour: keep k per centre
        if centre.numel():
            counts = torch.bincount(centre, minlength=x.size(0) if x.dim() else 0)
            if bool((counts > k).any()):
                start = torch.cumsum(counts, 0) - counts
                rank = torch.arange(centre.numel(), device=centre.device) - start[centre]
                first_k = rank < k
                centre, neighbour = centre[first_k], neighbour[first_k]
    if flow == "source_to_target":
        return torch.stack([neighbour, centre])
    return torch.stack([centre, neighbour])


@torch.no_grad()
def fps(src: Tensor, batch: Optional[Tensor] = None, ratio: float = 0.5, random_start: bool = True) -> Tensor:
    """Farthest point sampling (Qi et al., PointNet++, NeurIPS 2017; torch_cluster.fps): per example,
    ``ceil(ratio * n)`` point indices (global, in pick order, examples in order). Each pick is the point whose
    squared distance to the nearest already-picked point is largest (ties to the lowest index); the first
    is the example's first point, or a random one with ``random_start=True`` (torch's global RNG).
    """
    src = _check_points("src", src)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    ptr, size = _segments("batch", batch, src.size(0), src.device)
    if size == 0:
        return torch.empty(0, dtype=torch.long, device=src.device)
    counts = (ptr[1:] - ptr[:-1]).tolist()
    picks = [math.ceil(float(ratio) * n) for n in counts]
    n_max, steps = max(counts), max(picks)
    # examples side by side, padded: [B, n_max, D]; padded slots never win (distance -1)
    pos = src.new_zeros(size, n_max, src.size(1), dtype=torch.float64)
    valid = torch.zeros(size, n_max, dtype=torch.bool, device=src.device)
    for b, n in enumerate(counts):
        pos[b, :n] = src[ptr[b] : ptr[b] + n].double()
        valid[b, :n] = True
    if random_start:
        first = torch.stack([torch.randint(max(n, 1), (), device=src.device) for n in counts])
    else:
        first = torch.zeros(size, dtype=torch.long, device=src.device)
    rows = torch.arange(size, device=src.device)
    chosen = torch.empty(size, max(steps, 1), dtype=torch.long, device=src.device)
    chosen[:, 0] = first
    dist = torch.full((size, n_max), float("inf"), dtype=torch.float64, device=src.device)
    dist[~valid] = -1.0
    last = first
    for step in range(1, steps):
        d = (pos - pos[rows, last][:, None, :]).square().sum(-1)
        dist = torch.minimum(dist, d.masked_fill(~valid, -1.0))
        last = dist.argmax(dim=1)  # first maximum: ties to the lowest index
        chosen[:, step] = last
    out = [chosen[b, : picks[b]] + ptr[b] for b in range(size) if counts[b] > 0]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=src.device)
