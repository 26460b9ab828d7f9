"""Point-cloud neighbourhoods in plain PyTorch: k nearest neighbours, radius balls, farthest point sampling.

The geometry half of point attention (Point Transformer's vector attention over kNN neighbours, part
attention): which points a point attends to. PyG's ``knn``, ``knn_graph`` and ``fps`` need the
torch_cluster / pyg-lib extensions, which are not installable here, so these are the zoo's own, with
torch_cluster's signatures and conventions (torch_cluster 1.6, ``torch_cluster/knn.py``, ``fps.py``):

* :func:`knn` -- for each point of ``y``, the ``k`` nearest points of ``x`` in the same example ->
  [2, M] (row 0: index into ``y``, row 1: index into ``x``), nearest first.
* :func:`knn_graph` -- the kNN graph of one point set as an ``edge_index`` (flow "source_to_target": edges
  neighbour -> centre, so a layer aggregates over each point's neighbours), self loops left out unless
  ``loop=True``.
* :func:`radius` / :func:`radius_graph` -- the points nearer than ``r`` (strictly), at most
  ``max_num_neighbors`` per query, the first in index order (the rule of torch_cluster's CUDA / Triton
  kernels, ``torch_cluster/radius.py``).
* :func:`morton_order` -- the permutation that sorts points along the Z-order curve (serialisation for tiled
  attention over neighbourhoods).
* :func:`fps` -- farthest point sampling: per example, ``ceil(ratio * n)`` indices, each the point farthest
  (squared Euclidean) from those already taken, ties to the lowest index; the first is index 0 of the
  example, or a random one with ``random_start=True``.

Examples are given as torch_cluster's ``batch`` vector (example id per point, sorted). Results are exact
(squared Euclidean, or cosine distance with ``cosine=True``; ties between equal distances go to the lower
index). Large Euclidean searches in 1-3 dimensions (at least 2**24 query x point pairs in an example) go
through a uniform grid: each query reads the 3^D cells around its own; kNN keeps the answer when the grid
proves it (:func:`_grid_knn`), radius searches use cells of side r, which always hold the answer (only when
those cells hold at most half of the pairs: a radius near the cloud's extent is brute force). The few kNN
queries the grid cannot settle, and all other searches, are brute force in
query chunks of at most ``chunk`` x n_x (and at most 2**25) distances, O(n_y n_x) time and bounded memory
(torch_cluster's CUDA kernels are brute force too; its CPU path uses a KD-tree).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from zoo.layers import positive_int

__all__ = ["knn", "knn_graph", "radius", "radius_graph", "fps", "morton_order"]

_MAX_CHUNK_ELEMENTS = 1 << 25  # distances per query chunk (128 MB in float32)
_GRID_MIN_PAIRS = 1 << 24  # query x point pairs from which a low-dimensional Euclidean search uses the grid
_GRID_MAX_READ = 0.5  # radius: the grid when its candidates are at most this fraction of brute force's pairs


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
        got = f"{batch.dtype} of shape {tuple(batch.shape)}" if isinstance(batch, Tensor) else type(batch).__name__
        raise ValueError(f"{name} must be an integer tensor of shape [{n}] (example id per point), got {got}")
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


def _real(value, name: str) -> float:
    """``value`` as a Python float: any real number (numbers.Real: int, float, numpy's float32 / float64 and
    integers, which are not Python floats) or a 0-dim real tensor, as torch_cluster's radius / fps take a radius
    or ratio read from a numpy config or computed with torch. Other types (bool, complex, str, a tensor with
    elements) are a TypeError naming the type, not a range error; the caller checks the range."""
    if isinstance(value, Tensor):
        if value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool:
            return float(value)
        raise TypeError(f"{name} must be a real number or a 0-dim real tensor, got a {value.dtype} tensor of shape "
                        f"{tuple(value.shape)}")
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{name} must be a real number (int, float, numpy float) or a 0-dim real tensor, got "
                    f"{type(value).__name__}")


def _check_flow(flow: str) -> None:
    if flow not in ("source_to_target", "target_to_source"):
        raise ValueError(f"flow must be 'source_to_target' or 'target_to_source', got {flow!r}")


def _neighbour_graph(centre: Tensor, neighbour: Tensor, loop: bool, cap: int, flow: str) -> Tensor:
    """(centre, neighbour) pairs of a self-search, query-major, asked for ``cap`` neighbours (``cap + 1`` when
    ``loop=False``) -> edge_index. Without loops the point itself is dropped and each centre keeps its first
    ``cap`` others (a point with duplicates may not have come back as its own neighbour)."""
    if not loop:
        keep = centre != neighbour
        centre, neighbour = centre[keep], neighbour[keep]
        if centre.numel():
            counts = torch.bincount(centre, minlength=int(centre.max()) + 1)
            rank = torch.arange(centre.numel(), device=centre.device) - (torch.cumsum(counts, 0) - counts)[centre]
            centre, neighbour = centre[rank < cap], neighbour[rank < cap]
    if flow == "source_to_target":
        return torch.stack([neighbour, centre])
    return torch.stack([centre, neighbour])


def _paired_examples(x, y, batch_x, batch_y, num_workers: int = 1, batch_size: Optional[int] = None,
                     graph_names: Optional[tuple[str, str]] = None):
    """Checked (x, y) and the (x0, x1, y0, y1) row ranges of each example that has points and queries.

    ``num_workers`` and ``batch_size`` are torch_cluster's arguments: the first is checked and unused (the
    searches run on torch's threads), the second, the number of examples, must cover both batch vectors. An
    example with queries and no points (also the last ones) gives no neighbours, as in torch_cluster.
    ``graph_names``: given by the graph functions, which search ``x`` against itself: the user's names of the
    points and of their batch vector (("x", "batch") for knn_graph), so that an error names the argument the
    user gave, not ``batch_x``."""
    positive_int(num_workers, "num_workers")
    self_search = graph_names is not None
    points_name, batch_name = graph_names if self_search else ("x", "batch_x")
    x = _check_points(points_name, x)
    y = x if self_search else _check_points("y", y)
    if x.size(1) != y.size(1):
        raise ValueError(f"x and y must have the same number of coordinates, got {x.size(1)} and {y.size(1)}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on one device, got {x.device} and {y.device}")
    if (batch_x is None) != (batch_y is None):  # one side alone was read as example 0 for the other (torch_cluster asserts)
        given, missing = ("batch_x", "batch_y") if batch_y is None else ("batch_y", "batch_x")
        raise ValueError(f"{given} is given but {missing} is not: give both batch vectors (the example of each point "
                         f"and of each query), or neither for one example")
    ptr_x, bx = _segments(batch_name, batch_x, x.size(0), x.device)
    ptr_y, by = (ptr_x, bx) if self_search else _segments("batch_y", batch_y, y.size(0), y.device)
    if batch_size is not None and positive_int(batch_size, "batch_size") < max(bx, by):
        holds = f"{batch_name} holds" if self_search else "the batch vectors hold"
        raise ValueError(f"batch_size={batch_size} but {holds} {max(bx, by)} examples")
    ptr_x, ptr_y = ptr_x.tolist(), ptr_y.tolist()
    ptr_x += [ptr_x[-1]] * max(0, by - bx)  # examples after batch_x's last: no points there
    examples = [(ptr_x[b], ptr_x[b + 1], ptr_y[b], ptr_y[b + 1]) for b in range(by)
                if ptr_y[b + 1] > ptr_y[b] and ptr_x[b + 1] > ptr_x[b]]
    return x, y, examples


def _sq_distances(columns: Tensor, y: Tensor, index: Tensor) -> Tensor:
    """Squared Euclidean distances [q, m] from each query y [q, D] to the points ``index`` [q, m] of the
    coordinate columns [D, N], summed one coordinate at a time (1-D gathers, no [q, m, D] intermediate). Every
    exact distance of this module goes through here, so the grid and brute-force paths round alike."""
    d = None
    for j in range(columns.size(0)):
        diff = columns[j][index].sub_(y[:, j : j + 1]).square_()
        d = diff if d is None else d.add_(diff)
    return d


class _UniformGrid:
    """Points binned into cubic cells of side ``side`` over their bounding box (an axis along which they do not
    vary gets one cell), sorted by cell. ``block(cells_of_queries)`` gives, per query, where the points of the
    3^D cells around its own start in ``by_cell`` and how many there are."""

    def __init__(self, x: Tensor, side: float):
        self.x, self.side = x, float(side)
        self.lo, self.hi = x.min(0).values, x.max(0).values
        extent = self.hi - self.lo
        self.cells = (extent / self.side).floor().long() + 1
        dims = x.size(1)
        self.strides = torch.ones(dims, dtype=torch.long, device=x.device)
        for j in range(dims - 2, -1, -1):
            self.strides[j] = self.strides[j + 1] * self.cells[j + 1]
        self.cell_sorted, self.by_cell = torch.sort(self.cell_id(self.coords(x)), stable=True)
        self.columns = x.t().contiguous()  # [D, N]: per-coordinate gathers
        self.offsets = torch.cartesian_prod(*[torch.tensor([-1, 0, 1], device=x.device)] * dims).view(-1, dims)

    @staticmethod
    def too_fine(x: Tensor, side: float) -> bool:
        """More cells than int64 cell ids can number."""
        cells = ((x.max(0).values - x.min(0).values) / side).floor() + 1
        return float(torch.log2(cells).sum()) > 62

    def coords(self, p: Tensor) -> Tensor:
        return torch.minimum(((p - self.lo) / self.side).floor().long().clamp_min(0), self.cells - 1)

    def cell_id(self, coords: Tensor) -> Tensor:
        return (coords * self.strides).sum(-1)

    def block(self, cq: Tensor) -> tuple[Tensor, Tensor]:
        """Query cells [q, D] -> (start [q, 3^D], count [q, 3^D]) of the surrounding cells in ``by_cell``."""
        near = cq[:, None, :] + self.offsets[None]
        inside = ((near >= 0) & (near < self.cells)).all(-1)
        ids = self.cell_id(near.clamp_min(0).minimum(self.cells - 1))
        start = torch.searchsorted(self.cell_sorted, ids)
        count = torch.searchsorted(self.cell_sorted, ids, right=True) - start
        return start, torch.where(inside, count, 0)

    def candidates(self, start: Tensor, count: Tensor) -> Tensor:
        """[q, 3^D * width] point indices of the blocks, padded with len(x) (width: the fullest cell)."""
        width = max(int(count.max()), 1)
        slot = torch.arange(width, device=start.device)
        pos = (start[..., None] + slot).clamp_max(self.x.size(0) - 1)
        n = self.x.size(0)
        return torch.where(slot < count[..., None], self.by_cell[pos], n).view(start.size(0), -1)

    def packed_candidates(self, start: Tensor, count: Tensor) -> Tensor:
        """[q, max total] point indices of the blocks, each row the points of its non-empty cells one after the
        other (CSR style), padded with len(x) only up to the chunk's longest row: a row reads as many candidates
        as its cells hold, where :meth:`candidates` pads every one of the 3^D cells (those outside the grid
        too) to the fullest."""
        total = count.sum(1)
        width = max(int(total.max()), 1)
        counts = count.reshape(-1)  # (query, cell) runs, row-major: the order of the candidates
        m = int(total.sum())
        flat = torch.arange(m, device=start.device)
        run = torch.repeat_interleave(torch.arange(counts.numel(), device=start.device), counts, output_size=m)
        point = self.by_cell[start.reshape(-1)[run] + flat - (torch.cumsum(counts, 0) - counts)[run]]
        row = run // count.size(1)
        column = flat - (torch.cumsum(total, 0) - total)[row]
        cand = torch.full((start.size(0), width), self.x.size(0), dtype=torch.long, device=start.device)
        cand[row, column] = point
        return cand

    def sq_distances(self, y: Tensor, cand: Tensor) -> Tensor:
        """Squared distances [q, m] from each query to its candidates (inf for padding)."""
        n = self.x.size(0)
        return _sq_distances(self.columns, y, cand.clamp_max(n - 1)).masked_fill_(cand == n, float("inf"))


def _query_chunks(queries: Tensor, width_per_query: Tensor, budget: int):
    """Consecutive runs of ``queries`` whose padded candidate rows (count x the run's widest) fit ``budget``."""
    q0 = 0
    while q0 < queries.numel():
        rows = queries[q0 : q0 + max(1, budget // max(int(width_per_query[queries[q0]]), 1))]
        rows = rows[: max(1, budget // max(int(width_per_query[rows].max()), 1))]
        q0 += rows.numel()
        yield rows


@torch.no_grad()
def knn(x: Tensor, y: Tensor, k: int, batch_x: Optional[Tensor] = None, batch_y: Optional[Tensor] = None,
        cosine: bool = False, num_workers: int = 1, batch_size: Optional[int] = None, *, chunk: int = 1024) -> Tensor:
    """For each point of ``y`` [Ny, D], the ``k`` nearest points of ``x`` [Nx, D] of the same example.

    Returns [2, M] int64: row 0 the index into ``y``, row 1 the index into ``x``, grouped by query in order
    and nearest first within a query (M = Ny * k when every example of ``x`` has at least k points; fewer
    for examples that have fewer, as in torch_cluster). The final ranking uses float64 distances, so float32
    rounding decides neither the order nor ties.
    """
    return _knn(x, y, k, batch_x, batch_y, cosine, num_workers, batch_size, chunk)


def _knn(x, y, k, batch_x, batch_y, cosine: bool, num_workers, batch_size, chunk: int,
         graph_names: Optional[tuple[str, str]] = None) -> Tensor:
    """:func:`knn`, with the argument names its errors use (``graph_names``: see :func:`_paired_examples`)."""
    k = positive_int(k, "k")
    x, y, examples = _paired_examples(x, y, batch_x, batch_y, num_workers, batch_size, graph_names)
    rows, cols = [], []
    work = torch.float64 if x.dtype == torch.float64 or cosine else torch.float32
    for x0, x1, y0, y1 in examples:
        kk = min(k, x1 - x0)
        xe, ye = x[x0:x1], y[y0:y1]
        if cosine:
            xw, yw = xe.to(work), ye.to(work)
        else:  # the candidate pass's rounding grows with |x|^2: measure from the example's centre (UTM-like
            # coordinates, or a cloud far from the origin, got wrong neighbours in float32 and float64 alike)
            centre = xe.double().mean(0)
            xw, yw = (xe.double() - centre).to(work), (ye.double() - centre).to(work)
        order = _example_knn(xw, yw, xe, ye, kk, cosine, chunk)
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
    nx, ny = x.size(0), y.size(0)
    order = torch.zeros(ny, k, dtype=torch.long, device=x.device)
    settled = torch.zeros(ny, dtype=torch.bool, device=x.device)
    extent = x.max(0).values - x.min(0).values
    spread = extent > 1e-9 * float(extent.max().clamp_min(1e-300))  # axes along which the points vary
    if not bool(spread.any()):  # every point at one place: ranks are by index, brute force does that
        return order, settled
    side = (float(extent[spread].prod()) * max(k / 2.0, 2.0) / nx) ** (1.0 / int(spread.sum()))
    if _UniformGrid.too_fine(x, side):
        return order, settled
    grid = _UniformGrid(x, side)
    cq = grid.coords(y)
    start, count = grid.block(cq)
    # distance from the query to the nearest face of its 3^D block behind which the grid goes on, less a
    # rounding allowance (points are binned by a float division)
    inf = torch.full_like(y, float("inf"))
    below = torch.where(cq - 1 >= 0, y - (grid.lo + (cq - 1).double() * side), inf)
    above = torch.where(cq + 1 <= grid.cells - 1, grid.lo + (cq + 2).double() * side - y, inf)
    margin = (torch.minimum(below, above).min(1).values - 1e-9 * side).clamp_min(0.0)
    inside = ((y >= grid.lo) & (y <= grid.hi)).all(1)

    blocks = grid.offsets.size(0)
    width = count.max(1).values  # fullest cell around each query (the padding of its candidate row)
    cap = max(64, nx // (8 * blocks))  # fuller than this: brute force is cheaper
    queries = (inside & (width <= cap)).nonzero().view(-1)
    queries = queries[torch.argsort(grid.cell_id(cq[queries]), stable=True)]  # in cell order
    keep = k + 8  # candidates ranked exactly per query
    for rows in _query_chunks(queries, width * blocks, _MAX_CHUNK_ELEMENTS // 8):
        cand = grid.candidates(start[rows], count[rows])
        d = grid.sq_distances(y[rows], cand)
        m = min(keep, cand.size(1))
        if m < k:
            continue  # fewer than k candidate slots: brute force
        top_d, top = torch.topk(d, m, dim=1, largest=False, sorted=True)
        top_c = cand.gather(1, top)
        # rank the kept candidates by (distance, index), as the brute-force pass does
        top_c, by_index = torch.sort(top_c, dim=1)
        d_sorted, rank = torch.sort(top_d.gather(1, by_index), dim=1, stable=True)
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
    depend on float32 rounding. Rows where the margin cannot hold every candidate within rounding of the k-th
    distance go through the same pass in float64 (neighbours closer than float32 resolves), and those still
    short (many exact ties) are settled on exact distances to every point: a selection of the k-th (O(n) per
    row), not a sort."""
    d = _distances(y, x, cosine)
    n = d.size(1)
    m = min(n, k + 8 + k // 4)
    if m == n:
        cand = torch.arange(n, device=d.device).expand(d.size(0), n)
        return _rank_candidates(cand, y_exact, x_exact, k, cosine)
    cand_vals, cand = torch.topk(d, m, dim=1, largest=False, sorted=True)
    # candidates within the pass's rounding of the k-th. Every term is relative, so the cost does not depend on
    # the coordinates' units: the expansion |y|^2 + |x|^2 - 2 y.x errs by a few (D + 2) eps of |y|^2 + |x|^2
    # (the sums of squares and the dot product), rounding the centred coordinates to float32 moves a squared
    # distance by at most 2 eps (|y| + |x|)^2 / 2 <= 2 eps (|y|^2 + |x|^2), and both the k-th and a candidate
    # err; 1e-5 of the k-th covers what these bounds miss (blocked BLAS sums). ``tiny`` only matters where
    # squares underflow (coordinates below 1e-19 in float32), where errors are absolute.
    finfo = torch.finfo(d.dtype)
    scale = 2.0 if cosine else (y * y).sum(1, keepdim=True) + (x * x).sum(1).max()
    tol = 2 * (y.size(1) + 4) * finfo.eps * scale + 1e-5 * cand_vals[:, k - 1 : k].abs() + 64 * finfo.tiny
    short = (d <= cand_vals[:, k - 1 : k] + tol).sum(1) >= m
    order = _rank_candidates(cand, y_exact, x_exact, k, cosine)
    if bool(short.any()):
        rows = short.nonzero().view(-1)
        if d.dtype == torch.float32:  # neighbours nearer than float32 resolves (dense lines, 1-D): the same pass
            # in float64 on the exact coordinates (centred as knn centres them), which leaves only exact ties short
            x64, y64 = x_exact.double(), y_exact[rows].double()
            if not cosine:
                centre = x64.mean(0)
                x64, y64 = x64 - centre, y64 - centre
            order[rows] = _nearest(y64, x64, k, cosine, y_exact[rows], x_exact)
        else:  # ties beyond the margin: exact distances to every point
            order[rows] = _nearest_exact(y_exact[rows], x_exact, k, cosine)
    return order


def _rank_candidates(cand: Tensor, y_exact: Tensor, x_exact: Tensor, k: int, cosine: bool) -> Tensor:
    """The k best of each row's candidates by (exact float64 distance, index): sorted by index, then stably by
    distance."""
    cand = torch.sort(cand, dim=1).values
    exact = _pair_distances(y_exact.double(), x_exact.double(), cand, cosine)
    return cand.gather(1, torch.sort(exact, dim=1, stable=True).indices[:, :k])


def _nearest_exact(y: Tensor, x: Tensor, k: int, cosine: bool) -> Tensor:
    """[ny, k]: the k nearest points by (exact float64 distance, index) over every point of x. The k-th distance
    is selected (kthvalue, O(n)); only the points at most that far (k, more with ties) are ranked."""
    n = x.size(0)
    every = torch.arange(n, device=x.device).expand(y.size(0), n)
    if cosine:
        exact = _distances(y.double(), x.double(), cosine)
    else:  # differences (_sq_distances, as every exact distance here), not the expansion, which cancels for
        # points far from the origin
        exact = _sq_distances(x.double().t().contiguous(), y.double(), every)
    kth = torch.kthvalue(exact, k, dim=1, keepdim=True).values
    # cosine: the matrix product's rounding of the k-th (the ranking below uses _pair_distances, as other rows)
    within = exact <= (kth + 8 * torch.finfo(torch.float64).eps if cosine else kth)
    width = int(within.sum(1).max())
    # the points within the k-th distance in index order (padded with n), then stably by exact distance
    cand = torch.topk(torch.where(within, every, n), width, dim=1, largest=False, sorted=True).values
    cand_d = _pair_distances(y.double(), x.double(), cand.clamp_max(n - 1), cosine)
    cand_d.masked_fill_(cand == n, float("inf"))
    return cand.gather(1, torch.sort(cand_d, dim=1, stable=True).indices[:, :k])


def _pair_distances(y: Tensor, x: Tensor, cand: Tensor, cosine: bool) -> Tensor:
    """Distances from each row of y to its candidate points x[cand[row]] -> [ny, m]."""
    if cosine:
        yn = torch.nn.functional.normalize(y, dim=1)[:, None, :]
        return 1.0 - (torch.nn.functional.normalize(x[cand], dim=2) * yn).sum(-1)
    return _sq_distances(x.t().contiguous(), y, cand)


@torch.no_grad()
def knn_graph(x: Tensor, k: int, batch: Optional[Tensor] = None, loop: bool = False,
              flow: str = "source_to_target", cosine: bool = False, num_workers: int = 1,
              batch_size: Optional[int] = None, *, chunk: int = 1024) -> Tensor:
    """The k-nearest-neighbour graph of the points ``x`` [N, D] (per example of ``batch``) -> edge_index [2, E].

    As torch_cluster.knn_graph: with flow "source_to_target" each edge runs neighbour -> centre (row 0 the
    neighbour, row 1 the point whose neighbourhood it is), so a message-passing layer aggregates each point's
    k neighbours; "target_to_source" flips the rows. ``loop=False`` looks up k + 1 neighbours and drops the
    point itself, so each point keeps k others (fewer when its example is smaller).
    """
    _check_flow(flow)
    k = positive_int(k, "k")
    centre, neighbour = _knn(x, x, k if loop else k + 1, batch, batch, cosine, num_workers, batch_size, chunk,
                             graph_names=("x", "batch"))
    return _neighbour_graph(centre, neighbour, loop, k, flow)


@torch.no_grad()
def radius(x: Tensor, y: Tensor, r: float, batch_x: Optional[Tensor] = None, batch_y: Optional[Tensor] = None,
           max_num_neighbors: int = 32, num_workers: int = 1, batch_size: Optional[int] = None, *,
           chunk: int = 1024) -> Tensor:
    """For each point of ``y`` [Ny, D], the points of ``x`` [Nx, D] of the same example at distance below
    ``r``: at most ``max_num_neighbors`` of them, the first ones in index order (torch_cluster's rule: its
    CUDA and Triton kernels scan x in order and keep the first hits; ``dist < r``, strictly).

    Returns [2, M] int64: row 0 the index into ``y``, row 1 the index into ``x``, grouped by query in order,
    ascending x index within a query. ``r``: a real number (numpy's too) or a 0-dim tensor. Distances in float64.
    Searches in 1-3 dimensions over many points use a uniform grid of cells of side r (exact: a point nearer than
    r is in one of the 3^D cells around the query); the rest is brute force in chunks."""
    return _radius(x, y, r, batch_x, batch_y, max_num_neighbors, num_workers, batch_size, chunk)


def _radius(x, y, r, batch_x, batch_y, max_num_neighbors, num_workers, batch_size, chunk: int,
            graph_names: Optional[tuple[str, str]] = None) -> Tensor:
    """:func:`radius`, with the argument names its errors use (``graph_names``: see :func:`_paired_examples`)."""
    r = _real(r, "r")
    if not math.isfinite(r) or r < 0:  # r = 0: no neighbours (distances are < r strictly), as torch_cluster gives
        raise ValueError(f"r must be a finite number >= 0, got {r!r}")
    max_num_neighbors = positive_int(max_num_neighbors, "max_num_neighbors")
    x, y, examples = _paired_examples(x, y, batch_x, batch_y, num_workers, batch_size, graph_names)
    rows, cols = [], []
    for x0, x1, y0, y1 in examples:
        q, p = _example_radius(x[x0:x1].double(), y[y0:y1].double(), float(r), max_num_neighbors, chunk)
        rows.append(q + y0)
        cols.append(p + x0)
    if not rows:
        return torch.empty(2, 0, dtype=torch.long, device=x.device)
    return torch.stack([torch.cat(rows), torch.cat(cols)])


def _first_hits(cand: Tensor, d: Tensor, r2: float, limit: int) -> tuple[Tensor, Tensor]:
    """Per row, the ``limit`` lowest candidate indices with d < r2 -> (row ids, indices), row-major."""
    n_sentinel = torch.iinfo(torch.long).max
    hit = torch.where(d < r2, cand, n_sentinel)
    m = min(limit, hit.size(1))
    first = torch.topk(hit, m, dim=1, largest=False, sorted=True).values
    keep = first != n_sentinel
    rows = torch.arange(hit.size(0), device=hit.device)[:, None].expand_as(first)
    return rows[keep], first[keep]


def _example_radius(x: Tensor, y: Tensor, r: float, limit: int, chunk: int) -> tuple[Tensor, Tensor]:
    """One example, float64: (query ids, point ids) of the hits, query-major, ascending point index."""
    nx, ny = x.size(0), y.size(0)
    side = r * (1.0 + 1e-6)  # a hair above r: a point nearer than r stays within one cell per axis
    use_grid = x.size(1) <= 3 and nx * ny >= _GRID_MIN_PAIRS and not _UniformGrid.too_fine(x, side)
    out_q, out_p = [], []
    if use_grid:
        grid = _UniformGrid(x, side)
        cq = grid.coords(y)
        start, count = grid.block(cq)
        total = count.sum(1)  # candidates per query: the points of its 3^D cells
        # the grid only where it reads well under brute force's nx per query: with r near the cloud's extent
        # (a few cells per axis) the cells around a query hold most points, and brute force is faster
        use_grid = float(total.double().sum()) <= _GRID_MAX_READ * nx * ny
    if use_grid:
        queries = torch.argsort(grid.cell_id(cq), stable=True)
        # candidates outside the bounding box are handled too: their cells are clamped to the grid's edge,
        # and a point nearer than r to such a query is still within one cell of the clamped cell
        for rows in _query_chunks(queries, total, _MAX_CHUNK_ELEMENTS // 8):
            cand = grid.packed_candidates(start[rows], count[rows])
            q, p = _first_hits(cand, grid.sq_distances(y[rows], cand), r * r, limit)
            out_q.append(rows[q])
            out_p.append(p)
        q_all, p_all = torch.cat(out_q), torch.cat(out_p)
        order = torch.argsort(q_all * nx + p_all)  # query-major, ascending point index
        return q_all[order], p_all[order]
    rows_per_chunk = max(1, min(chunk, _MAX_CHUNK_ELEMENTS // (4 * nx)))
    all_points = torch.arange(nx, device=x.device)
    columns = x.t().contiguous()
    for q0 in range(0, ny, rows_per_chunk):
        yq = y[q0 : q0 + rows_per_chunk]
        every = all_points.expand(yq.size(0), nx)
        q, p = _first_hits(every, _sq_distances(columns, yq, every), r * r, limit)
        out_q.append(q + q0)
        out_p.append(p)
    return torch.cat(out_q), torch.cat(out_p)


@torch.no_grad()
def radius_graph(x: Tensor, r: float, batch: Optional[Tensor] = None, loop: bool = False,
                 max_num_neighbors: int = 32, flow: str = "source_to_target", num_workers: int = 1,
                 batch_size: Optional[int] = None, *, chunk: int = 1024) -> Tensor:
    """The radius graph of the points ``x`` (per example of ``batch``) -> edge_index [2, E], as
    torch_cluster.radius_graph: each point's neighbours at distance below ``r`` (at most ``max_num_neighbors``,
    the first in index order), edges neighbour -> centre with flow "source_to_target". ``loop=False`` leaves the
    point itself out and still keeps up to ``max_num_neighbors`` others (torch_cluster asks for one more and
    drops the point, which keeps one too many when the point is not among the first)."""
    _check_flow(flow)
    max_num_neighbors = positive_int(max_num_neighbors, "max_num_neighbors")
    centre, neighbour = _radius(x, x, r, batch, batch, max_num_neighbors + (0 if loop else 1), num_workers,
                                batch_size, chunk, graph_names=("x", "batch"))
    return _neighbour_graph(centre, neighbour, loop, max_num_neighbors, flow)


@torch.no_grad()
def fps(src: Tensor, batch: Optional[Tensor] = None, ratio: float = 0.5, random_start: bool = True,
        batch_size: Optional[int] = None) -> Tensor:
    """Farthest point sampling (Qi et al., PointNet++, NeurIPS 2017; torch_cluster.fps): per example,
    ``ceil(ratio * n)`` point indices (global, in pick order, examples in order), the product rounded as
    torch_cluster rounds it (float32 n times ratio in the points' dtype). Each pick is the point whose
    squared distance to the nearest already-picked point is largest (ties to the lowest index); the first
    is the example's first point, or a random one with ``random_start=True`` (torch's global RNG). ``ratio``: a
    real number (numpy's too) or a 0-dim tensor.
    """
    src = _check_points("src", src)
    ratio = _real(ratio, "ratio")  # torch_cluster takes a 0-dim tensor too
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    ptr, size = _segments("batch", batch, src.size(0), src.device)
    if batch_size is not None and positive_int(batch_size, "batch_size") < size:  # torch_cluster's argument
        raise ValueError(f"batch_size={batch_size} but batch holds {size} examples")
    if size == 0:
        return torch.empty(0, dtype=torch.long, device=src.device)
    counts = (ptr[1:] - ptr[:-1]).tolist()
    # torch_cluster's count: ceil(deg.float() * tensor(ratio, dtype=src.dtype)), rounding included (for float32
    # points 100 * 0.07 is 7 there, and 8 in Python's doubles)
    degrees = torch.tensor(counts, dtype=torch.float32)
    picks = (degrees * torch.tensor(float(ratio), dtype=src.dtype)).ceil().long().tolist()
    if random_start:
        first = torch.stack([torch.randint(max(n, 1), (), device=src.device) for n in counts])
    else:
        first = torch.zeros(size, dtype=torch.long, device=src.device)
    # examples of similar size together (sizes within a factor of 2), so a small example is neither padded to
    # the largest one nor run for its pick count (torch_cluster's fps_cpu.cpp loops over the examples)
    groups: dict[int, list[int]] = {}
    for b in range(size):
        if counts[b] > 0:
            groups.setdefault(counts[b].bit_length(), []).append(b)
    chosen: dict[int, Tensor] = {}
    starts = ptr.tolist()
    for members in groups.values():
        members.sort(key=lambda b: -picks[b])  # most picks first: the examples still picking are a prefix
        picked = _fps_examples(src, [starts[b] for b in members], [counts[b] for b in members],
                               [picks[b] for b in members], first[members])
        for row, b in enumerate(members):
            chosen[b] = picked[row, : picks[b]] + starts[b]
    out = [chosen[b] for b in range(size) if counts[b] > 0]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=src.device)


def _fps_examples(src: Tensor, starts: list[int], counts: list[int], picks: list[int], first: Tensor) -> Tensor:
    """Farthest point sampling of several examples side by side -> [B, max(picks)] local indices (row b valid up
    to picks[b]). ``picks`` is in decreasing order: at each step only the leading examples that still pick are
    updated (views of the padded tensors, no copies). Float64 distances, ties to the lowest index."""
    size, n_max, steps = len(counts), max(counts), max(picks[0], 1)
    # examples side by side, padded: [B, n_max, D]; padded slots never win (distance -1)
    pos = src.new_zeros(size, n_max, src.size(1), dtype=torch.float64)
    valid = torch.zeros(size, n_max, dtype=torch.bool, device=src.device)
    for b, (start, n) in enumerate(zip(starts, counts)):
        pos[b, :n] = src[start : start + n].double()
        valid[b, :n] = True
    rows = torch.arange(size, device=src.device)
    chosen = torch.empty(size, steps, dtype=torch.long, device=src.device)
    chosen[:, 0] = first
    dist = torch.full((size, n_max), float("inf"), dtype=torch.float64, device=src.device)
    dist[~valid] = -1.0
    last = first
    columns = pos.permute(2, 0, 1).contiguous()  # [D, B, n_max]: one coordinate at a time, in place
    active = size
    for step in range(1, steps):
        while picks[active - 1] <= step:  # examples done (picks[0] = steps > step keeps one)
            active -= 1
        columns_a, dist_a = columns[:, :active], dist[:active]
        picked = columns_a[:, rows[:active], last[:active]]  # [D, active]
        d = (columns_a[0] - picked[0, :, None]).square_()
        for j in range(1, columns.size(0)):
            d.add_((columns_a[j] - picked[j, :, None]).square_())
        torch.minimum(dist_a, d, out=dist_a)  # padded slots stay at -1
        last = dist_a.argmax(dim=1)  # first maximum: ties to the lowest index
        chosen[:active, step] = last
    return chosen


def morton_order(pos: Tensor, batch: Optional[Tensor] = None, bits: Optional[int] = None) -> Tensor:
    """The permutation [N] that sorts points along the Z-order (Morton) curve, examples kept in order.

    Serialising a cloud this way puts points that are near in space near in index (Point Transformer V3's "z"
    serialisation, Wu et al., CVPR 2024; Morton, 1966), which is what tile-based attention needs: with
    ``pos = pos[order]``, the kNN graph of the cloud (:class:`zoo.attention.Edges`) has its edges near the diagonal,
    so most (query tile, key tile) pairs hold no edge and the block-sparse backends skip them (a random order
    touches nearly every tile; ``zoo viz mask mask=knn`` draws both).

    Each example's points are scaled into one cube (the largest side of its bounding box, so cells stay cubic)
    and quantised to ``bits`` bits per axis (default ``min(16, 62 // D)``; a code holds D * bits <= 62 bits);
    the code interleaves the axes' bits, axis 0 the least significant at each level. Ties (points in one cell)
    keep their input order. ``batch``: torch_cluster's sorted example id per point; the result lists example 0's
    points first, then example 1's, ... so ``batch[order]`` is ``batch``."""
    pos = _check_points("pos", pos)
    n, dims = pos.shape
    if dims > 62:
        raise ValueError(f"morton_order: pos has {dims} dimensions; a Morton code interleaves at most 62")
    if bits is None:
        bits = min(16, 62 // dims)
    bits = positive_int(bits, "bits")
    if bits * dims > 62:
        raise ValueError(f"morton_order: bits={bits} x {dims} dimensions = {bits * dims} > 62 bits of an int64 code")
    ptr, size = _segments("batch", batch, n, pos.device)
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=pos.device)
    example = torch.repeat_interleave(torch.arange(size, device=pos.device), ptr[1:] - ptr[:-1])
    work = pos.double()
    low = torch.full((size, dims), math.inf, dtype=torch.float64, device=pos.device)
    high = torch.full((size, dims), -math.inf, dtype=torch.float64, device=pos.device)
    index = example[:, None].expand(n, dims)
    low = low.scatter_reduce(0, index, work, "amin")
    high = high.scatter_reduce(0, index, work, "amax")
    side = (high - low).amax(dim=1).clamp_min(torch.finfo(torch.float64).tiny)  # one cube per example
    levels = (1 << bits) - 1
    cell = ((work - low[example]) / side[example, None] * levels).round().long().clamp_(0, levels)  # [N, D]
    code = torch.zeros(n, dtype=torch.long, device=pos.device)
    for level in range(bits):
        for axis in range(dims):
            code |= ((cell[:, axis] >> level) & 1) << (level * dims + axis)
    order = torch.argsort(code, stable=True)
    return order[torch.argsort(example[order], stable=True)]  # examples back in order, curve order inside each
