"""The "edges" attention backend: ``attend(q, k, v, mask=Edges(edge_index))`` in O(E) work and memory.

A kNN neighbourhood or a graph allows a few keys per query. The tile-based backends pay for every (query tile, key
tile) that holds one edge, and in a cloud whose order does not follow space (or any graph in random node order)
that is nearly every tile. This backend computes the scores on the edges only -- the message-passing form of
PyG's TransformerConv between its projections: per edge s = scale * q_i . k_j
(:func:`zoo.attention.segment.edge_dot`, chunked, recomputed in backward), the softmax over each query's
incoming edges and the weighted sum of the values (:func:`zoo.attention.segment.segment_softmax_aggregate`,
fused per block of queries in PyTorch; the Triton edge-softmax kernel of kernels/edge_softmax.py computes GATv2's
scores and does not serve it). No (Nq, Nk) tensor and no [E, H, D] message is kept.

Semantics are the mask's, as on every backend: a repeated edge is one allowed pair (edges are made distinct when
the graph is built, once per mask version and edge_index content: an edit through numpy or ``.data``, which the
version misses, is seen; :func:`edge_graph`), a query without an edge gets a zero row, batch rows with their own
graphs ((B, 2, E) edge_index) run as one disjoint graph, a graph shared by the batch runs once with the batch
folded into the heads. GQA key / value heads are repeated to the query heads.

Automatic selection (``auto_supports``): an Edges mask whose distinct edges are at most
``AUTO_MAX_ALLOWED_FRACTION`` of the Nq x Nk pairs, on problems of at least ``AUTO_MIN_CELLS`` pairs. Forward +
backward on this project's 2-core CPU (H = 4, D = 32, points on a sphere, 2026-12-07, /tmp script; the table of
``zoo bench knn`` is in docs/points.md), time of this path / SDPA with the dense mask, by the share of pairs
allowed: 0.10% (16384 points, k = 16) 0.05; 0.20-0.39% 0.13-0.17; 0.78% 0.35; 1.17% 0.43-0.59; 1.56% 0.70 (1024
points, k = 16) and 1.24 (4096, k = 64, random order); 3.1% (512, k = 16) 2.2; 6.25% 2.8-3.8. Explicit requests
(``backend="edges"``) run any Edges call the path supports, on CUDA too. On CUDA automatic selection takes it only
where a dense mask would pass 2^28 cells (Bm * Nq * Nk, SDPA's limit). The Triton kernel takes an Edges mask of
any size (its EDGE slot, kernels/block_index.py), but its work grows with the tiles it visits (all of them for a
cloud in random order) where this path's is O(E), so beyond that size this path is kept first; below it the kernel
is. Neither choice has been timed on a GPU (none was lent to this project so far).
Not supported (the call goes to another backend, or an explicit request is refused naming it): a bias,
``score="sigmoid"``, ``return_weights``, ``return_lse``, torch.func transforms, torch.export and jit tracing.

Under torch.compile the path is three custom operators, one graph node each (``fullgraph=True`` compiles): the edge
graph (``zoo::edge_graph``: the mask's index checks and distinct edges, rebuilt per call, not cached), the scores
(``zoo::edge_dot``) and the fused softmax / aggregation (``zoo::segment_softmax_aggregate``; zoo/attention/segment.py).
Automatic selection there takes it only on the column count (edge_index columns at most AUTO_MAX_ALLOWED_FRACTION of
the pairs): counting the distinct edges needs their values, which tracing does not read.
"""
from __future__ import annotations

import torch
from torch import Tensor

from zoo.attention import backends as _backends
from zoo.attention.masks import Edges, _cache_lock, cache_put
from zoo.attention.segment import CSR, build_csr, edge_dot, segment_softmax_aggregate
from zoo.layers import in_torch_compile, in_torch_func, is_tracing

__all__ = ["NAME", "AUTO_MAX_ALLOWED_FRACTION", "AUTO_MIN_CELLS", "edge_graph"]

NAME = "edges"
#: Automatic selection takes the edge path when the mask allows at most this share of the Nq x Nk pairs ...
AUTO_MAX_ALLOWED_FRACTION = 0.0125
#: ... on problems of at least this many (query, key) cells per batch row and head (smaller ones: one SDPA call).
AUTO_MIN_CELLS = 256 * 256


# ----------------------------------------------------------------------------------------------------
# Content fingerprint of an edge index (edits that bypass the version counter)
# ----------------------------------------------------------------------------------------------------
_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
# Odd int64 position weights 1, 3, 5, ... per device, shared by every layer and mask. Bounded: they once grew to the
# largest edge count ever fingerprinted and stayed (64 MiB of CPU or GPU memory after a 4M-edge graph was long
# gone); longer rows are summed chunk by chunk (_weighted_sums). 1 << 16 (512 KiB): at 1M edges on the 2-core CPU,
# 1.45 ms for both rows against 1.18 ms with weights as long as the rows, 3.8 ms building them per call, 2.0 ms in
# chunks of 1 << 18 (the chunk is read twice and stays in L2 here; measured by hand, one thread, median of 30).
_FINGERPRINT_CHUNK = 1 << 16
_FINGERPRINT_WEIGHTS: dict = {}


def _fingerprint_weights(device: torch.device) -> Tensor:
    weights = _FINGERPRINT_WEIGHTS.get(device)
    if weights is None:
        weights = torch.arange(_FINGERPRINT_CHUNK, device=device).mul_(2).add_(1)
        _FINGERPRINT_WEIGHTS[device] = weights
    return weights


def _weighted_sums(rows: Tensor) -> Tensor:
    """int64 [R]: per row of int64 ``rows`` [R, L], the sum of ``row[j] * (2j + 1)`` wrapping mod 2**64, taken in
    chunks of ``_FINGERPRINT_CHUNK`` positions: the weights of the chunk at ``start`` are the first chunk's plus
    ``2 * start``, so its share is ``dot(chunk, weights) + 2 * start * chunk.sum()`` (the same value as one long
    dot, for every chunk size)."""
    length = rows.size(1)
    width = min(length, _FINGERPRINT_CHUNK)
    weights = _fingerprint_weights(rows.device)[:width]
    if rows.device.type == "cpu":  # dot: one pass, no [R, L] product
        sums = []
        for row in rows:
            total = torch.dot(row[:width], weights)
            for start in range(width, length, width):
                chunk = row[start : start + width]
                total += torch.dot(chunk, weights[: chunk.numel()]) + chunk.sum() * (2 * start)
            sums.append(total)
        return torch.stack(sums)
    # CUDA's dot has no int64: the whole chunks as one [R, K, width] view (a few kernels for any length), then the tail
    whole = length // width * width
    chunks = rows[:, :whole].reshape(rows.size(0), -1, width)
    offsets = torch.arange(chunks.size(1), device=rows.device).mul_(2 * width)
    sums = ((chunks * weights).sum(dim=2) + chunks.sum(dim=2) * offsets).sum(dim=1)
    if whole < length:
        tail = rows[:, whole:]
        sums += (tail * weights[: tail.size(1)]).sum(dim=1) + tail.sum(dim=1) * (2 * whole)
    return sums



def _edge_index_fingerprint(edge_index: Tensor) -> tuple:
    """A cheap content key of an edge index (or of a sparse adjacency's index tensors), for the graph caches (of
    :func:`edge_graph` here and of the graph layers, zoo/attention/graph.py ``CachedGraphLayer``; it lives here, in
    a module ``import zoo.attention`` loads anyway, so the edge backend does not import torch_geometric): per
    row of indices the int64 sum weighted by odd position weights 1, 3, 5, ... (wrapping; an odd weight is
    invertible mod 2**64, so changing any one entry always changes the sum, and so does swapping two different
    entries) and the row's min and max (so a value pushed out of range always changes the key). Two reads of the
    indices (a dot product per row, one aminmax), one host sync: at 1M edges on the project's 2-core CPU 3 ms with
    one thread, 12 ms (median) with two on the loaded machine, against 0.5-0.7 s for a GATv2Conv(16, 16, heads=4)
    forward there (measured by hand, 2026-12-05). Edits that keep every weighted sum and range can be
    missed; an in-place op through torch bumps the version counter, which the cache checks as well."""
    if edge_index.layout == torch.sparse_csr:
        parts = (edge_index.crow_indices(), edge_index.col_indices())
    elif edge_index.layout == torch.sparse_csc:
        parts = (edge_index.ccol_indices(), edge_index.row_indices())
    elif edge_index.layout == torch.sparse_coo:
        parts = (edge_index._indices(),)
    else:
        parts = (edge_index,)
    key, values = [], []
    for t in parts:
        key.append((t.dtype, tuple(t.shape)))
        if t.dtype not in _INTEGER_DTYPES or t.numel() == 0 or t.dim() == 0:
            continue  # rebuilt (and refused) on the dtype / shape alone
        rows = t.reshape(-1, t.size(-1))
        if rows.dtype != torch.long:
            rows = rows.long()
        sums = _weighted_sums(rows)
        low, high = rows.aminmax(dim=1)
        values += [sums, low, high]
    return tuple(key) + (tuple(torch.cat(values).tolist()) if values else ())


def edge_graph(mask: Edges, q_len: int, k_len: int, device) -> CSR:
    """The distinct edges of ``mask`` as a destination-sorted :class:`~zoo.attention.segment.CSR`: over Nq query
    and Nk key nodes for a graph shared by the batch, over B * Nq and B * Nk nodes (batch row b's nodes offset by
    b * N) for a graph per batch row. Cached on the mask per version of its edge_index, lengths and device, and
    checked against a content fingerprint of edge_index (:func:`_edge_index_fingerprint`, as the graph layers'
    cache): an edit that bypasses the version counter (through a numpy array sharing the memory, or ``.data``)
    rebuilds the graph, with the indices checked again, so this backend attends over the edges the torch backend
    reads rather than the cached ones."""
    cache = mask.versioned_cache(mask.__dict__.setdefault("_edge_cache", {}))
    key = ("csr", q_len, k_len, str(device))
    edge_index = mask.edge_index
    # an inference tensor has no version counter: the cache is emptied at every call, no fingerprint is needed
    fingerprint = None if edge_index.is_inference() else _edge_index_fingerprint(edge_index)
    hit = cache.get(key)
    if hit is not None and fingerprint is not None and hit[0] == fingerprint:
        mask.check_shape(q_len, k_len)
        return hit[1]
    # (re)built: the bounds the mask cached for this version may predate an edit the version missed
    with _cache_lock():  # (cache_put of another thread iterates the cache under it)
        cache.pop("bounds", None)
    mask.check_shape(q_len, k_len)
    row_E, dst_E, src_E = mask.distinct_edges(q_len, k_len, device)  # sorted by batch row, then target
    # batch row b's nodes offset by b * N: one disjoint graph (a shared graph has the single row 0)
    stacked = torch.stack([row_E * k_len + src_E, row_E * q_len + dst_E])
    csr = build_csr(stacked, mask.batch_size * k_len, mask.batch_size * q_len, validate=False)
    cache_put(cache, key, (fingerprint, csr))
    return csr


@torch.library.custom_op("zoo::edge_graph", mutates_args=())
def _edge_graph_op(edge_index: torch.Tensor, q_len: int,
                   k_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`edge_graph` as a custom operator, for torch.compile: the mask's checks (negative and out-of-range
    indices, with their eager messages) and its distinct edges sorted into the CSR run eagerly when the compiled graph
    runs, one opaque node of it (not cached: rebuilt per call). -> (rowptr, col, row, perm); the distinct edge count is
    data-dependent: a symbolic size of the fake implementation."""
    csr = edge_graph(Edges(edge_index), q_len, k_len, edge_index.device)
    return csr.rowptr, csr.col, csr.row, csr.perm


@_edge_graph_op.register_fake
def _(edge_index, q_len, k_len):
    batch = edge_index.size(0) if edge_index.dim() == 3 else 1
    num_edges = torch.library.get_ctx().new_dynamic_size()
    index = dict(dtype=torch.long, device=edge_index.device)
    return (torch.empty(batch * q_len + 1, **index), torch.empty(num_edges, **index), torch.empty(num_edges, **index),
            torch.empty(num_edges, **index))


def _traced_edge_graph(mask: Edges, q_len: int, k_len: int, device) -> CSR:
    """The CSR of :func:`edge_graph` while torch.compile traces: from the operator, over the same node counts."""
    rowptr, col, row, perm = _edge_graph_op(mask.edge_index.to(device), q_len, k_len)
    return CSR(rowptr, col, row, perm, mask.batch_size * k_len, mask.batch_size * q_len)


def _heads_last(t_BHND: torch.Tensor, shared: bool) -> torch.Tensor:
    """(B, H, N, D) -> (N, B * H, D) for a shared graph (the batch folded into the heads), (B * N, H, D) else."""
    batch, heads, n, d = t_BHND.shape
    if shared:
        return t_BHND.permute(2, 0, 1, 3).reshape(n, batch * heads, d)
    return t_BHND.transpose(1, 2).reshape(batch * n, heads, d)


def _edges_forward(q, k, v, mask, bias, scale, score, dropout_p, return_weights, return_lse=False):
    batch, heads, q_len, _ = q.shape
    k_len, v_dim = k.shape[2], v.shape[-1]
    if k.shape[1] != heads:  # GQA / MQA: each key / value head serves heads // Hkv query heads
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
        v = v.repeat_interleave(heads // v.shape[1], dim=1)
    shared = mask.batch_size == 1
    compiling = torch.compiler.is_compiling()
    csr = (_traced_edge_graph if compiling else edge_graph)(mask, q_len, k_len, q.device)
    q_NHD, k_NHD, v_NHD = (_heads_last(t, shared) for t in (q, k, v))
    if q_NHD.dtype in (torch.float16, torch.bfloat16):  # scores and softmax in fp32, as the other backends
        q_NHD, k_NHD = q_NHD.float(), k_NHD.float()  # (edge_dot returns its inputs' dtype: bf16 scores were
        # rounded twice, 7x the other backends' error at |scores| ~ 50)
    scores_EH = edge_dot(q_NHD, k_NHD, csr.row, csr.col, validate=False) * scale
    keep_EH = None
    if dropout_p > 0.0:
        keep_EH = torch.rand(scores_EH.shape, device=scores_EH.device) >= dropout_p
    out_NHD, _ = segment_softmax_aggregate(scores_EH, v_NHD, csr, keep=keep_EH, dropout=dropout_p)
    out_NHD = out_NHD.to(torch.promote_types(q.dtype, v.dtype))
    if shared:  # (Nq, B * H, Dv) -> (B, H, Nq, Dv)
        return out_NHD.reshape(q_len, batch, heads, v_dim).permute(1, 2, 0, 3)
    return out_NHD.reshape(batch, q_len, heads, v_dim).transpose(1, 2)


def _edges_supports(q, k, v, mask, bias, scale, score, dropout_p, return_weights):
    """Hard limits only: what the edge path cannot compute."""
    if not isinstance(mask, Edges):
        return "the mask is not an Edges mask (the edge path computes scores on a graph's edges only)"
    if bias is not None:
        return "a bias (the edge path scores the edges with q . k only; there is no (Nq, Nk) bias to read)"
    if score != "softmax":
        return f"score={score!r} (the edge path computes the softmax over each query's edges)"
    if return_weights:
        return "return_weights=True (the edge path forms no (Nq, Nk) weights)"
    if in_torch_func():
        return "a torch.func transform (the edge path's autograd Functions have no functorch rules)"
    if is_tracing() and not in_torch_compile():
        return "tracing / export (the edge path's operators are registered for torch.compile only)"
    if q.shape[0] == 0 or q.shape[2] == 0 or k.shape[2] == 0:
        return "an empty batch or sequence"
    return None


def _edges_auto_supports(q, k, v, mask, bias, scale, score, dropout_p, return_weights):
    """Hard limits plus: only when the graph allows few of the pairs (see the module docstring)."""
    if not isinstance(mask, Edges):  # first: every other call pays for one isinstance
        return "the mask is not an Edges mask"
    reason = _edges_supports(q, k, v, mask, bias, scale, score, dropout_p, return_weights)
    if reason is not None:
        return reason
    q_len, k_len = q.shape[2], k.shape[2]
    cells = q_len * k_len
    if q.device.type != "cpu":
        return _off_cpu_reason(mask.batch_size * cells)
    if cells < AUTO_MIN_CELLS:
        return f"Nq*Nk = {cells} < {AUTO_MIN_CELLS} (one SDPA call with the dense mask is faster)"
    if mask.num_edges / cells <= AUTO_MAX_ALLOWED_FRACTION:  # columns (padding included) bound the distinct edges
        return None
    if in_torch_compile():  # (counting needs the values: not while tracing)
        return (f"under torch.compile the edge path is taken automatically only when edge_index has at most "
                f"{AUTO_MAX_ALLOWED_FRACTION} x Nq x Nk columns (its distinct edges are not counted while tracing)")
    # more columns than the threshold: count the distinct edges (the graph the forward then reuses, while the mask's
    # version holds: an edge_index made under inference_mode has none and is rebuilt)
    allowed = edge_graph(mask, q_len, k_len, q.device).num_edges / (mask.batch_size * cells)
    if allowed > AUTO_MAX_ALLOWED_FRACTION:
        return f"the edges allow {allowed:.3f} of the pairs > {AUTO_MAX_ALLOWED_FRACTION} (a dense or tiled path is faster)"
    return None


def _off_cpu_reason(dense_cells: int):
    """Automatic selection on CUDA (not yet timed there against the flash kernel): the edge path only where a dense
    mask, of ``dense_cells`` = Bm * Nq * Nk cells, would pass SDPA's limit (2^28 cells). The Triton kernel serves any
    size through its EDGE slot, but its work follows the tiles it visits (O(Nq Nk) for a cloud in random order),
    this path's the edges: at that size the O(E) path is preferred, below it the kernel."""
    if dense_cells <= _backends.SDPA_DENSE_MASK_LIMIT:
        return (f"on CUDA the edge path is taken automatically only above {_backends.SDPA_DENSE_MASK_LIMIT} dense-mask "
                f"cells (here {dense_cells}): it has not been timed against the flash kernel on a GPU; ask for it "
                f"with backend='edges'")
    return None


_DESCRIPTION = "graph edges: scores on the edges of an Edges mask only, fused segment softmax (O(E) work and memory)"
_backends.register_backend(
    NAME, _edges_forward, _edges_supports, priority=110, auto_devices=("cpu", "cuda"),
    auto_supports=_edges_auto_supports, sparse_only=True, description=_DESCRIPTION,
)
