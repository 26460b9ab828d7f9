"""Segment (edge) softmax: attention normalised over variable-size groups of keys, e.g. the incoming
edges of each graph node, the kNN neighbours of a point, the members of a part.

Letters: E edges (key-query pairs), Ns source (key/value) nodes, Nd destination (query) nodes, H heads,
C channels per head, D edge-feature channels, c the edges of one block of destination nodes.

The machinery, in the order it is used:

* :class:`CSR` / :func:`build_csr` -- the edges sorted once by destination (stable), with ``rowptr``
  [Nd+1], ``col`` (source of each sorted edge), ``row`` (its destination) and ``perm`` (sorted position
  -> original edge position). :meth:`CSR.blocks` cuts the destination nodes into contiguous blocks of
  at most ``max_edges`` incoming edges: a block holds every edge of its nodes, so each node's softmax
  is complete inside one block (the Triton kernel uses one program per block of destination nodes in
  the same way).
* :func:`segment_softmax` -- plain softmax of [E, H] scores over edges that share a destination.
* :func:`segment_softmax_weighted_sum` -- vector attention's aggregation (one softmax per channel, per-edge
  values; Point Transformer), a custom autograd function that keeps the inputs and [Nd, C] statistics only.
* :func:`segment_softmax_aggregate` -- fused ``out_i = sum_j softmax_j(s_ij) v_j`` from given scores
  (GAT's scalar scores, point/part attention): a custom autograd function that keeps only the
  per-node log-sum-exp [Nd, H] and recomputes the [c, H, C] messages block by block in backward.
* :func:`gatv2_attention` -- GATv2 fully fused: score ``s_ji = a . LeakyReLU(xs_j + xd_i (+ W_e e_ji))``,
  softmax over each node's incoming edges and the weighted sum of ``xs_j``, block by block; backward
  recomputes the scores and messages, so no [E, H, C] tensor is ever stored (PyG keeps several: the
  memory problem of pyg-team/pytorch_geometric issues 527 and 8316). The edge projection W_e e_ji is
  also computed per block.
* :func:`gatv2_attention_ref` -- the unfused PyTorch formulation (materialises [E, H, C]); the
  reference that tests compare the fused CPU path and the Triton kernel (zoo.kernels.edge_softmax)
  against.

Source: Brody, Alon, Yahav, "How Attentive are Graph Attention Networks?" (ICLR 2022), eq. 7; the
online/recompute idea follows FlashAttention (Dao et al. 2022): keep the log-sum-exp, recompute the
rest in backward. Gradients are exact (same formulas autograd would produce, reordered).

CPU execution: the destination blocks are split into T contiguous groups (T = torch.get_num_threads())
run by T Python threads with single-threaded torch ops (:func:`_run_blocks`); the groups write disjoint
output rows and return partials (the source-row gradient and the parameter gradients) summed in group order, so
results do not depend on thread timing (bitwise the same from run to run at a given thread count). The blocks run
with torch.autocast off (it is per thread, so it reached the calling thread alone): half inputs are computed in fp32
whatever the thread count, as in the Triton kernel.

Under torch.compile the fused functions (edge_dot, segment_softmax_aggregate, gatv2_attention) are custom operators,
``zoo::...`` with a fake implementation and a backward operator (end of this file): one opaque node of the compiled
graph each, no graph break, the same blocked code at run time. So are the Triton kernels (CUDA, or impl="triton"):
GATv2's (``zoo::gatv2_edge_softmax``) and vector attention's aggregation (``zoo::vector_softmax_sum``, the kernel
path of segment_softmax_weighted_sum), calling the kernels' forward and backward launchers.

Dropout on the attention coefficients is given as an explicit boolean keep-mask [E, H] (in CSR order),
so the fused path and the reference can be run with the same mask; the mask is the only [E, H]-sized
state kept for backward (besides the [Nd, H] log-sum-exp).
"""
from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.layers import autocast_off, exp_flushed_, in_torch_export, is_tracing, refuse_double_backward

__all__ = [
    "CSR",
    "build_csr",
    "check_edge_index",
    "segment_softmax",
    "segment_softmax_weighted_sum",
    "segment_softmax_aggregate",
    "segment_softmax_aggregate_ref",
    "gatv2_attention",
    "gatv2_attention_ref",
    "edge_dot",
    "CHUNK_ELEMENTS",
]

# Elements (c * H * C) of one block's [c, H, C] working tensors on the CPU path: 2**19 fp32 = 2 MiB each.
# Measured on this project's 2-core machine (fwd+bwd of GATv2Conv, H=8, interleaved, load 2): 2**19 /
# 2**20 / 2**21 took 0.93 / 0.99 / 1.08 s at 200k edges, C=64, and 4.78 / 4.69 / 4.89 s at 1M edges; the
# peak memory at 1M edges, C=64 was 170 MB lower with 2**19 than with 2**21 (1414 vs 1584 MB VmHWM).
CHUNK_ELEMENTS = int(os.environ.get("ZOO_SEGMENT_CHUNK_ELEMENTS", 1 << 19))

# The dtypes the Triton kernels take (zoo.kernels.vector_softmax, zoo.kernels.edge_softmax: math in fp32, float64
# refused); see _on_kernel.
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _on_kernel(impl: str, like: Tensor, *tensors: Optional[Tensor]) -> bool:
    """Whether a fused op runs as its Triton kernel: ``impl="triton"``, or ``"auto"`` with CUDA tensors (``like``),
    and only while every given tensor (None skipped) is fp32 / fp16 / bf16. Anything with float64 runs the
    PyTorch path under every impl: the kernels compute in fp32 and refuse float64, so a float64 layer on CUDA
    raised "dtype torch.float64 is not supported" instead of computing (PyG computes it in float64)."""
    if impl == "torch" or (impl == "auto" and not like.is_cuda):
        return False
    return all(t is None or t.dtype in _KERNEL_DTYPES for t in tensors)


# ----------------------------------------------------------------------------------------------------
# CSR by destination
# ----------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class CSR:
    """Edges sorted by destination. ``col[k]`` -> ``row[k]`` is the k-th sorted edge; it was edge
    ``perm[k]`` of the input. ``rowptr[i]:rowptr[i+1]`` are the incoming edges of destination i."""

    rowptr: Tensor  # [Nd+1] int64
    col: Tensor  # [E] int64 source of each sorted edge
    row: Tensor  # [E] int64 destination of each sorted edge (non-decreasing)
    perm: Tensor  # [E] int64 sorted position -> input position
    num_src: int
    num_dst: int
    _blocks: dict = field(default_factory=dict, repr=False)
    _dev: dict = field(default_factory=dict, repr=False)

    @property
    def num_edges(self) -> int:
        return self.col.numel()  # (a symbolic size under torch.compile: not int() there, a data-dependent guard)

    @property
    def device(self) -> torch.device:
        return self.col.device

    def blocks(self, max_edges: int) -> list[tuple[int, int, int, int]]:
        """Contiguous destination blocks ``(n0, n1, e0, e1)`` with at most ``max_edges`` edges each
        (a node with more incoming edges than that gets a block of its own). Nodes without edges at
        the end of the range are skipped. Cached per ``max_edges``."""
        max_edges = max(1, int(max_edges))
        if max_edges in self._blocks:
            return self._blocks[max_edges]
        rowptr = self.rowptr.cpu()
        total = self.num_edges
        out: list[tuple[int, int, int, int]] = []
        n0 = 0
        while total and n0 < self.num_dst:
            e0 = int(rowptr[n0])
            if e0 >= total:
                break
            # last node index n1 with rowptr[n1] <= e0 + max_edges
            n1 = int(torch.searchsorted(rowptr, e0 + max_edges, right=True)) - 1
            n1 = min(max(n1, n0 + 1), self.num_dst)
            e1 = int(rowptr[n1])
            if e1 == e0:  # a run of nodes without edges: skip to the next node with edges
                n1 = int(torch.searchsorted(rowptr, e0, right=True)) - 1
                n0 = max(n1, n0 + 1)
                continue
            out.append((n0, n1, e0, e1))
            n0 = n1
        self._blocks[max_edges] = out
        return out

    def to(self, device) -> "CSR":
        device = torch.device(device)
        if device == self.device:
            return self
        key = str(device)
        if key not in self._dev:
            self._dev[key] = CSR(
                self.rowptr.to(device), self.col.to(device), self.row.to(device), self.perm.to(device),
                self.num_src, self.num_dst,
            )
        return self._dev[key]


def check_edge_index(edge_index, num_src: int, num_dst: int, *, where: str = "edge_index",
                     check_values: bool = True) -> Tensor:
    """Validate a [2, E] integer edge index against the node counts; return it as int64.

    Raises TypeError/ValueError naming the problem (wrong type/dtype/shape, negative or out-of-range
    indices) instead of an index error deep inside torch. Under torch.export the values are not checked: they are
    symbolic there (reading them is a data-dependent guard that export refuses); PyG's layers do not check them
    either. ``check_values=False``: the type, dtype and shape only, for a caller that checks the values later
    (the graph layers while torch.compile traces them: their graph-structure operator checks them at run time)."""
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"{where} must be a torch.Tensor of shape [2, E], got {type(edge_index).__name__}")
    if edge_index.is_floating_point() or edge_index.is_complex() or edge_index.dtype == torch.bool:
        raise TypeError(f"{where} must be an integer (int64) tensor, got dtype {edge_index.dtype}")
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"{where} must have shape [2, E], got {tuple(edge_index.shape)}")
    edge_index = edge_index.long()
    if check_values and edge_index.numel() and not in_torch_export():
        lo = int(edge_index.min())
        if lo < 0:
            raise ValueError(f"{where} contains negative node indices (min {lo})")
        src_max, dst_max = (int(v) for v in edge_index.amax(dim=1))
        if src_max >= num_src:
            raise ValueError(
                f"{where} source index {src_max} is out of range for {num_src} source nodes"
            )
        if dst_max >= num_dst:
            raise ValueError(
                f"{where} destination index {dst_max} is out of range for {num_dst} destination nodes"
            )
    return edge_index


def build_csr(edge_index: Tensor, num_src: int, num_dst: int, *, validate: bool = True) -> CSR:
    """Sort a [2, E] edge index (row 0 source, row 1 destination, PyG's flow "source_to_target") by
    destination, stably (edges into the same node keep their input order)."""
    if validate:
        edge_index = check_edge_index(edge_index, num_src, num_dst)
    src, dst = edge_index[0], edge_index[1]
    dst_sorted, perm = torch.sort(dst, stable=True)
    counts = torch.bincount(dst_sorted, minlength=num_dst)
    rowptr = torch.zeros(num_dst + 1, dtype=torch.long, device=dst.device)
    torch.cumsum(counts, 0, out=rowptr[1:])
    return CSR(rowptr, src[perm].contiguous(), dst_sorted.contiguous(), perm, int(num_src), int(num_dst))


# ----------------------------------------------------------------------------------------------------
# Plain segment softmax
# ----------------------------------------------------------------------------------------------------
def _check_segments(fn: str, scores, index, num_segments) -> int:
    """The checks :func:`segment_softmax` and :func:`segment_softmax_weighted_sum` share: ``scores`` a
    floating-point tensor [E, ...], ``index`` a 1-D int64/int32 tensor of E entries on the scores' device, each in
    [0, num_segments), ``num_segments`` a non-negative int. Returns num_segments as an int (a SymInt under
    torch.compile is returned as it is). The value check (one min/max pass) is skipped under tracing."""
    if not isinstance(scores, Tensor):
        raise TypeError(f"{fn}: scores must be a torch.Tensor [E, ...], got {type(scores).__name__}")
    if not isinstance(index, Tensor):
        raise TypeError(f"{fn}: index must be a 1-D integer tensor [E], got {type(index).__name__}")
    if isinstance(num_segments, bool) or not isinstance(num_segments, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{fn}: num_segments must be an int, got {num_segments!r}")
    if not isinstance(num_segments, torch.SymInt):
        num_segments = int(num_segments)
        if num_segments < 0:
            raise ValueError(f"{fn}: num_segments must be >= 0, got {num_segments}")
    if scores.dim() < 1:
        raise ValueError(f"{fn}: scores must be at least 1-D [E, ...], got a 0-d tensor")
    if not scores.is_floating_point():
        raise TypeError(f"{fn}: scores must be floating point, got {scores.dtype}")
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{fn}: index must be int64 or int32, got {index.dtype}")
    if index.dim() != 1 or index.numel() != scores.size(0):
        raise ValueError(f"{fn}: {scores.size(0)} scores but index has shape {tuple(index.shape)} (expected [E])")
    if index.device != scores.device:
        raise ValueError(f"{fn}: index is on {index.device} but scores are on {scores.device}")
    if not is_tracing():
        _check_index_values(fn, index, num_segments)
    return num_segments


def _check_index_values(fn: str, index: Tensor, num_segments: int) -> None:
    """The value check of :func:`_check_segments`: every entry of ``index`` in [0, num_segments) (one min/max pass, a
    host read). Also run by the kernel operator ``zoo::vector_softmax_sum`` when the compiled graph runs."""
    if index.numel():
        low, high = (int(v) for v in index.aminmax())
        if low < 0 or high >= num_segments:
            raise ValueError(f"{fn}: index values must lie in [0, {num_segments}), got {low}..{high}")


def _check_rowptr(fn: str, rowptr, index: Tensor, num_segments: int) -> None:
    """``rowptr`` [num_segments + 1] must describe ``index``: rowptr[0] = 0, rowptr[-1] = E, non-decreasing, and
    index[e] = n for rowptr[n] <= e < rowptr[n + 1] (the entries sorted by segment). The Triton kernels read the
    segments from rowptr alone, so a rowptr that does not match would give wrong numbers silently."""
    if not isinstance(rowptr, Tensor) or rowptr.dtype not in (torch.int32, torch.int64):
        # int16 / uint8 reached torch.repeat_interleave below, which raised its own unnamed error
        what = rowptr.dtype if isinstance(rowptr, Tensor) else type(rowptr).__name__
        raise TypeError(f"{fn}: rowptr must be a 1-D integer tensor (int64 or int32) [num_segments + 1], got "
                        f"{what}; convert it with rowptr.long()")
    if rowptr.dim() != 1 or rowptr.numel() != num_segments + 1:
        raise ValueError(f"{fn}: rowptr has {rowptr.numel()} entries (shape {tuple(rowptr.shape)}), expected "
                         f"num_segments + 1 = {num_segments + 1}")
    if rowptr.device != index.device:
        raise ValueError(f"{fn}: rowptr is on {rowptr.device} but index is on {index.device}")
    if not is_tracing():
        _check_rowptr_values(fn, rowptr, index, num_segments)


def _check_rowptr_values(fn: str, rowptr: Tensor, index: Tensor, num_segments: int) -> None:
    """The value checks of :func:`_check_rowptr` (one pass over the entries, host reads), on a 1-D integer rowptr of
    num_segments + 1 entries on index's device. Also run by the kernel operator ``zoo::vector_softmax_sum`` when the
    compiled graph runs (while Dynamo traces, the values are unknown)."""
    num_edges = index.numel()
    steps = rowptr.diff()
    first, last, low = (int(v) for v in torch.stack([rowptr[0], rowptr[-1], steps.min() if num_segments else
                                                      rowptr.new_zeros(())]).tolist())
    if first != 0 or last != num_edges:
        raise ValueError(f"{fn}: rowptr must run from 0 to E = {num_edges}, got {first}..{last}")
    if low < 0:
        at = int((steps < 0).nonzero()[0, 0])
        raise ValueError(f"{fn}: rowptr must be non-decreasing, but rowptr[{at + 1}] = {int(rowptr[at + 1])} < "
                         f"rowptr[{at}] = {int(rowptr[at])}")
    implied = torch.repeat_interleave(torch.arange(num_segments, device=index.device, dtype=index.dtype), steps,
                                      output_size=num_edges)
    if not torch.equal(implied, index):
        at = int((implied != index).nonzero()[0, 0])
        raise ValueError(f"{fn}: index does not match rowptr (the entries must be sorted by segment, segment n at "
                         f"rowptr[n]..rowptr[n + 1] - 1): index[{at}] = {int(index[at])} but rowptr puts entry {at} "
                         f"in segment {int(implied[at])}")


def segment_softmax(scores: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """softmax of ``scores`` [E, *] over the entries that share ``index`` [E] (any order), as
    ``torch_geometric.utils.softmax(scores, index, num_nodes=num_segments)``. Autograd through plain ops;
    entries of a segment never see other segments.

    ``index`` int64/int32 with values in [0, num_segments), ``num_segments`` an int: checked, with an error naming
    the argument (as :func:`segment_softmax_weighted_sum`). A segment whose scores are all -inf gives NaN weights,
    as PyG's softmax does (it computes -inf - (-inf)); :func:`segment_softmax_weighted_sum` and
    :func:`zoo.attention.attend` give 0 there instead (an output row with nothing to attend to)."""
    num_segments = _check_segments("segment_softmax", scores, index, num_segments)
    if not is_tracing() and scores.numel() == 0:  # (under tracing E may be a data-dependent size: no branch on it)
        return scores.clone()
    # int64 for the scatter ops: torch 2.11's CPU scatter_reduce / gather / scatter_add read an int32 index
    # expanded with stride 0 wrongly (silently for 2 <= C < 16 channels, an error from 16 on)
    idx = index.long().view(-1, *([1] * (scores.dim() - 1))).expand_as(scores)
    shape = (num_segments,) + tuple(scores.shape[1:])
    m = scores.new_full(shape, float("-inf")).scatter_reduce(0, idx, scores.detach(), "amax")
    p = (scores - m.gather(0, idx)).exp()
    s = scores.new_zeros(shape).scatter_add(0, idx, p)
    return p / s.gather(0, idx)


class _SegmentSoftmaxWeightedSum(torch.autograd.Function):
    """out[n] = sum_{e: index[e] = n} softmax_n(scores)[e] * values[e], element by element (vector attention).

    Saves the inputs and [N, C] statistics (row max, log-sum and output, on both paths); backward recomputes the
    weights, alpha = exp((s - max[index]) - log_sum[index]) (the two statistics kept apart: see _block_softmax),
    and with g = grad_out[index],
        d values = alpha * g,
        d scores = alpha * (g * values - sum_n(alpha * g * values)[index]) = d values * (values - out[index]),
    since sum_n(alpha * values) is out[n] itself.

    fp16 / bf16 are computed in fp32 and the output cast back (as segment_softmax_aggregate's _compute_dtype and
    the kernel): in fp16 the weighted sum of 100 equal scores with values 1000 overflowed to inf (PyG's softmax
    then index_add gives 1000, its products being below 1000)."""

    @staticmethod
    def forward(ctx, scores_EC: Tensor, values_EC: Tensor, index_E: Tensor, num_segments: int,
                rowptr: Optional[Tensor] = None):
        if rowptr is not None:  # the Triton kernel (zoo.kernels.vector_softmax): edges in CSR order
            from zoo.kernels.vector_softmax import vector_softmax_sum

            out_NC, max_NC, log_sum_NC = vector_softmax_sum(scores_EC, values_EC, rowptr)
            ctx.save_for_backward(scores_EC, values_EC, index_E, max_NC, log_sum_NC, out_NC)
            ctx.kernel, ctx.num_segments = True, num_segments
            return out_NC
        ctx.kernel = False
        ctx.num_segments = num_segments
        cdt = _compute_dtype(scores_EC.dtype)
        s_EC, v_EC = scores_EC.to(cdt), values_EC.to(cdt)
        idx = index_E[:, None].expand_as(s_EC)
        shape = (num_segments, s_EC.size(1))
        m_NC = s_EC.new_full(shape, float("-inf")).scatter_reduce_(0, idx, s_EC, "amax")
        m_NC = torch.where(torch.isfinite(m_NC), m_NC, torch.zeros_like(m_NC))  # empty segments: any shift
        p_EC = exp_flushed_(s_EC - m_NC.index_select(0, index_E))
        l_NC = s_EC.new_zeros(shape).index_add_(0, index_E, p_EC)
        l_NC = l_NC.clamp_min(torch.finfo(l_NC.dtype).tiny)  # empty segments: 0 / tiny = 0
        weighted_NC = s_EC.new_zeros(shape).index_add_(0, index_E, p_EC.mul_(v_EC))
        # out and lse out of place: under torch.compile (torch 2.11, aot_eager) an autograd.Function whose
        # output is made in place (out.div_(l)), then saved and returned, gets wrong gradients (silently;
        # reproduced with a 15-line function); out of place both are right (the compile test covers it)
        out_NC = weighted_NC / l_NC
        # the max and the log-sum kept apart (not lse = max + log-sum): see _block_softmax
        ctx.save_for_backward(scores_EC, values_EC, index_E, m_NC, l_NC.log(), out_NC)
        # the fp32 result cast back for half inputs; otherwise out_NC itself: under torch.compile (torch 2.11,
        # aot_eager) returning out_NC.to(its own dtype), an alias of a saved tensor, gave wrong gradients
        return out_NC if cdt == scores_EC.dtype else out_NC.to(scores_EC.dtype)

    @staticmethod
    def backward(ctx, grad_out_NC: Tensor):
        scores_EC, values_EC, index_E, max_NC, log_sum_NC, out_NC = ctx.saved_tensors
        if torch.is_grad_enabled():  # backward(create_graph=True): gradients that are differentiable themselves
            return _differentiable_backward(ctx, scores_EC, values_EC, index_E, grad_out_NC)
        if ctx.kernel:  # the Triton backward (zoo.kernels.vector_softmax): one pass, no [E, C] temporaries
            from zoo.kernels.vector_softmax import vector_softmax_sum_backward

            grad_scores, grad_values = vector_softmax_sum_backward(
                scores_EC, values_EC, index_E, max_NC, log_sum_NC, out_NC, grad_out_NC, *ctx.needs_input_grad[:2])
            return grad_scores, grad_values, None, None, None

        def wide(t):  # fp16 / bf16 (the kernel's inputs) in fp32; fp32 and fp64 as they are
            return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t

        alpha_EC = exp_flushed_((wide(scores_EC) - wide(max_NC).index_select(0, index_E))
                                .sub_(wide(log_sum_NC).index_select(0, index_E)))
        grad_values = alpha_EC.mul_(wide(grad_out_NC).index_select(0, index_E))  # alpha * g
        grad_scores = None
        if ctx.needs_input_grad[0]:
            grad_scores = (wide(values_EC) - wide(out_NC).index_select(0, index_E)).mul_(grad_values)
            grad_scores = grad_scores.to(scores_EC.dtype)
        grad_values = grad_values.to(values_EC.dtype) if ctx.needs_input_grad[1] else None
        return grad_scores, grad_values, None, None, None


def _differentiable_backward(ctx, scores_EC: Tensor, values_EC: Tensor, index_E: Tensor, grad_out_NC: Tensor):
    """The gradients of _SegmentSoftmaxWeightedSum under backward(create_graph=True) (forces from energies: the
    loss reads d out / d pos): the forward recomputed in plain differentiable ops (the same shift, the same
    zeros for empty segments, fp16 / bf16 in fp32), differentiated by autograd with create_graph=True. PyG's layer
    is the peer."""
    wanted = [i for i in (0, 1) if ctx.needs_input_grad[i]]
    if not wanted:
        return None, None, None, None, None
    shape = (ctx.num_segments, scores_EC.size(1))
    idx = index_E.long()
    cdt = _compute_dtype(scores_EC.dtype)
    with torch.enable_grad():
        s_EC, v_EC = scores_EC.to(cdt), values_EC.to(cdt)
        m_NC = s_EC.new_full(shape, float("-inf")).scatter_reduce(
            0, idx[:, None].expand_as(s_EC), s_EC.detach(), "amax")
        m_NC = torch.where(torch.isfinite(m_NC), m_NC, torch.zeros_like(m_NC))
        p_EC = (s_EC - m_NC.index_select(0, idx)).exp()
        l_NC = s_EC.new_zeros(shape).index_add(0, idx, p_EC).clamp_min(torch.finfo(cdt).tiny)
        out_NC = s_EC.new_zeros(shape).index_add(0, idx, p_EC * v_EC) / l_NC
        grads = torch.autograd.grad(out_NC, [(scores_EC, values_EC)[i] for i in wanted], grad_out_NC.to(cdt),
                                    create_graph=True, allow_unused=True)
    result = [None, None]
    for i, grad in zip(wanted, grads):
        result[i] = grad
    return result[0], result[1], None, None, None


def segment_softmax_weighted_sum(scores: Tensor, values: Tensor, index: Tensor, num_segments: int, *,
                                 rowptr: Optional[Tensor] = None, impl: str = "auto") -> Tensor:
    """Vector attention's aggregation: ``out[n] = sum_{e: index[e] = n} softmax(scores)[e] * values[e]``, with
    one softmax per channel over the entries of each segment (Point Transformer's per-channel weights).

    scores, values [E, C]; index [E] (int64/int32) in [0, num_segments); num_segments an int (a float
    or a string is refused, not truncated). Returns [num_segments, C]; a segment with no entry, or whose scores
    in a channel are all -inf, gives zeros there (:func:`segment_softmax` gives NaN weights for the latter, as
    PyG's softmax). Equal to ``index_add(segment_softmax(scores, index) * values)`` (the reference), but
    autograd keeps only the inputs and [N, C] statistics, not the [E, C] weights and products, and the
    backward is one pass of gathers and products (see _SegmentSoftmaxWeightedSum). Scores and values of different
    float dtypes are computed, and returned, in ``torch.promote_types`` of the two (as that composition's product
    promotes); their gradients come back in each input's own dtype. fp16 / bf16 are computed in fp32 and the
    result cast back, on both paths. A NaN or +inf score gives NaN in its segment's channel, as PyG's softmax.

    ``rowptr`` [num_segments + 1] (int64 or int32): the entries are in CSR order (sorted by index, segment n at
    rowptr[n]..rowptr[n + 1] - 1), which lets the forward and the backward run as the Triton kernels
    (zoo.kernels.vector_softmax): ``impl="auto"`` uses them for CUDA tensors, ``"triton"`` also on CPU tensors
    under TRITON_INTERPRET=1, ``"torch"`` never; float64 runs the PyTorch path under every impl (the kernels take
    fp32 / fp16 / bf16). Since the kernels read the segments from rowptr alone, rowptr
    is checked against index (rowptr[0] = 0, rowptr[-1] = E, non-decreasing, index what rowptr implies: one pass
    over the entries; under torch.compile on the kernel path, by its operator when the compiled graph runs, with the
    same messages; skipped under other tracing). (The arguments are named as segment_softmax's: scores, index.)"""
    fn = "segment_softmax_weighted_sum"
    scores_EC, values_EC, index_E = scores, values, index
    for name, t in (("scores", scores_EC), ("values", values_EC)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor [E, C], got {type(t).__name__}")
    if scores_EC.dim() != 2 or values_EC.shape != scores_EC.shape:
        raise ValueError(f"{fn}: scores and values must both be [E, C], got "
                         f"{tuple(scores_EC.shape)} and {tuple(values_EC.shape)}")
    if not scores_EC.is_floating_point() or not values_EC.is_floating_point():
        raise TypeError(f"{fn}: scores and values must be floating point, got "
                        f"{scores_EC.dtype} and {values_EC.dtype}")
    num_segments = _check_segments(fn, scores_EC, index_E, num_segments)
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"{fn}: impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    if impl == "triton" and rowptr is None:
        raise ValueError(f"{fn}: impl='triton' needs rowptr (entries in CSR order)")
    if rowptr is not None:
        _check_rowptr(fn, rowptr, index_E, num_segments)
    index_E = index_E.long()  # int32 is taken; the scatter ops need int64 (see segment_softmax)
    # Mixed dtypes compute in the wider one, as the PyG composition torch promotes (bf16 scores with fp32 values
    # gave a bf16 result); the casts send each gradient back in its input's own dtype.
    dtype = torch.promote_types(scores_EC.dtype, values_EC.dtype)
    scores_EC, values_EC = scores_EC.to(dtype), values_EC.to(dtype)
    kernel = rowptr is not None and _on_kernel(impl, scores_EC, scores_EC)
    if kernel and torch.compiler.is_compiling():  # one node of the compiled graph (see "torch.compile" at the end)
        out_NC, _, _ = _vector_softmax_sum_op(scores_EC, values_EC, index_E, rowptr)
        return out_NC
    return _SegmentSoftmaxWeightedSum.apply(scores_EC, values_EC, index_E, num_segments, rowptr if kernel else None)


def _add_rows_(out: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """``out.index_add_(0, index, src)``, run single-threaded for large rows on CPU.

    torch 2.11's multi-threaded CPU index_add_/scatter_add_ walks every row once per thread slice of
    the columns; on this project's 2-core machine it measured 60x slower than the serial loop for
    [8192, 512] fp32 rows (128 ms vs 2 ms, /tmp micro-benchmark reproduced in docs/graph.md)."""
    threads = torch.get_num_threads()
    if out.is_cuda or threads == 1 or src.numel() < (1 << 14):
        return out.index_add_(0, index, src)
    torch.set_num_threads(1)
    try:
        return out.index_add_(0, index, src)
    finally:
        torch.set_num_threads(threads)


def _block_max(s_cH: Tensor, dst_local: Tensor, n: int) -> Tensor:
    idx = dst_local[:, None].expand_as(s_cH)
    return s_cH.new_full((n, s_cH.size(1)), float("-inf")).scatter_reduce_(0, idx, s_cH, "amax")


def _block_softmax(s_cH: Tensor, dst_local: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """softmax over the destination segments of one block; returns (alpha [c, H], max [n, H], log-sum [n, H]).

    The backward recomputes alpha = exp((s - max) - log_sum) from the two statistics kept apart, not from their
    sum lse = max + log_sum: with large scores (|s| ~ 1e3 in a saturated GATv2 layer) lse is rounded to ulp(|s|),
    and exp(s - lse) carried that error into every weight (1e-4 relative), where s - max is exact next to the
    maximum and log_sum is small (zoo/attention/segment.py's backward passes; PyG's softmax divides exp(s - max)
    by the sum)."""
    m = _block_max(s_cH, dst_local, n)
    p = exp_flushed_(s_cH - m[dst_local])  # not exp_(): see zoo.layers.EXP_FLOOR
    l = s_cH.new_zeros((n, s_cH.size(1))).index_add_(0, dst_local, p)
    p.div_(l[dst_local])
    return p, m, l.log()


def _block_softmax_grad(alpha_cH: Tensor, leading_cH: Tensor, u_cH: Tensor, dst_local: Tensor,
                        degree: Tensor) -> Tensor:
    """dL/ds [c, H] of a softmax over the destination segments of one block: ds_j = alpha_j (u_j - delta_i) with
    u_j = dL/d alpha_j and delta_i = sum_k alpha_k u_k over node i's edges (PyG's softmax gradient), computed
    about a pivot u_ref, the u of a highest-scored edge of the segment (``leading_cH``: the edges whose score is
    their node's maximum, per head; among tied scores the largest u):
        delta_i - u_ref = sum_k alpha_k (u_k - u_ref),    ds_j = alpha_j ((u_j - u_ref) - (delta_i - u_ref)).
    ``degree`` [n]: the edge count of each of the block's nodes (its edges are sorted by node, dst_local).

    Why: in a saturated (nearly one-hot) softmax the leading edge's u_j - delta_i is a small difference of two
    numbers of size |u|; summed as ``alpha * (u - sum alpha u)`` it was rounding noise of ulp(|u|) (GAT / GATv2
    gradients up to 160x PyG's fp32 error against float64, tests/test_graph_layers.py). About the pivot the
    leading edge's difference is exactly 0 and delta_i - u_ref is the other edges' weighted differences, accurate
    relative to their small weights; a weight sum that misses 1 by a few ulp only scales that small term. This is
    the shifted-data sum of Chan, Golub & LeVeque, "Algorithms for computing the sample variance" (1983), as in
    the Triton GATv2 backward (zoo.kernels.edge_softmax). A segment without a leading edge (scores recomputed in
    backward that differ from the forward's maximum in the last bit) takes pivot 0, the plain sum: still exact
    math. The pivot's maximum is a segment_reduce over the sorted edges: 3x faster than scatter_reduce's "amax"
    for [8192, 8] (2 cores, 2026-12-06); with it the pivot costs GAT's fused backward about 5% and GATv2's under
    2% (200k edges, H=8, C=8 and 64). Overwrites ``u_cH``."""
    candidates = u_cH.masked_fill(~leading_cH, float("-inf"))
    pivot = torch.segment_reduce(candidates, "max", lengths=degree, unsafe=True)
    pivot.masked_fill_(pivot == float("-inf"), 0.0)
    diff = u_cH.sub_(pivot.index_select(0, dst_local))  # u_j - u_ref
    shifted = diff.new_zeros(pivot.shape).index_add_(0, dst_local, alpha_cH * diff)  # delta_i - u_ref
    return diff.sub_(shifted.index_select(0, dst_local)).mul_(alpha_cH)


def _apply_keep(alpha: Tensor, keep: Optional[Tensor], p: float) -> Tensor:
    if keep is None:
        return alpha
    return alpha * keep.to(alpha.dtype) * (1.0 / (1.0 - p))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _promoted_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """The dtype torch's promotion gives these tensors (None skipped): what PyG's unfused layers return for them,
    since their scores and messages are products of the inputs. Under torch.autocast the projected features are
    half but the attention vectors fp32 parameters, and PyG's ``(x * att).sum(-1)`` and ``x_j * alpha`` are fp32
    (torch_geometric 2.8.1, GATConv / GATv2Conv with return_attention_weights=True under CPU autocast bf16: out
    and alpha float32)."""
    dtype = None
    for t in tensors:
        if t is not None:
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype


def _check_keep(keep: Optional[Tensor], num_edges: int, heads: int, dropout: float) -> None:
    if keep is None:
        return
    if keep.dtype != torch.bool or tuple(keep.shape) != (num_edges, heads):
        raise ValueError(
            f"dropout keep-mask must be a bool tensor of shape {(num_edges, heads)}, got "
            f"{keep.dtype} {tuple(keep.shape)}"
        )
    if not 0.0 < dropout < 1.0:
        raise ValueError(f"a dropout keep-mask needs 0 < dropout < 1, got {dropout}")


# ----------------------------------------------------------------------------------------------------
# Per-edge dot products (dot-product graph attention's scores)
# ----------------------------------------------------------------------------------------------------
def _edge_dot_forward(q_NHC, k_NHC, row, col, chunk):
    """s[e, h] = q[row[e], h] . k[col[e], h] in chunks of edges (no [E, H, C] gather kept) -> [E, H]."""
    E, H = row.numel(), q_NHC.size(1)
    s_EH = q_NHC.new_empty(E, H, dtype=torch.promote_types(q_NHC.dtype, k_NHC.dtype))
    step = _edge_dot_step(q_NHC, chunk)
    for e0 in range(0, E, step):
        e1 = min(E, e0 + step)
        torch.sum(q_NHC.index_select(0, row[e0:e1]) * k_NHC.index_select(0, col[e0:e1]), dim=-1, out=s_EH[e0:e1])
    return s_EH


def _edge_dot_step(q_NHC, chunk) -> int:
    return max(1, chunk // max(1, q_NHC.size(1) * q_NHC.size(2)))


def _edge_dot_backward(g_EH, q_NHC, k_NHC, row, col, chunk, need_q, need_k):
    """The gradients of :func:`_edge_dot_forward` (d q or None, d k or None), chunk by chunk."""
    # summed in fp32 for half inputs: a half buffer rounded every chunk's partial sums (3x autograd's error)
    dq = torch.zeros(q_NHC.shape, dtype=_compute_dtype(q_NHC.dtype), device=q_NHC.device) if need_q else None
    dk = torch.zeros(k_NHC.shape, dtype=_compute_dtype(k_NHC.dtype), device=k_NHC.device) if need_k else None
    step = _edge_dot_step(q_NHC, chunk)
    for e0 in range(0, row.numel(), step):
        e1 = min(row.numel(), e0 + step)
        g = g_EH[e0:e1, :, None]
        r, c = row[e0:e1], col[e0:e1]
        if need_q:
            dq.index_add_(0, r, (g * k_NHC.index_select(0, c)).to(dq.dtype))
        if need_k:
            dk.index_add_(0, c, (g * q_NHC.index_select(0, r)).to(dk.dtype))
    return (None if dq is None else dq.to(q_NHC.dtype)), (None if dk is None else dk.to(k_NHC.dtype))


class _EdgeDot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_NHC, k_NHC, row, col, chunk):
        ctx.save_for_backward(q_NHC, k_NHC, row, col)
        ctx.chunk = chunk
        return _edge_dot_forward(q_NHC, k_NHC, row, col, chunk)

    @staticmethod
    def backward(ctx, g_EH):
        refuse_double_backward("edge_dot (TransformerConv's fused scores)",
                               "run the layer under a message hook (PyG's propagate path, plain autograd)")
        q_NHC, k_NHC, row, col = ctx.saved_tensors
        dq, dk = _edge_dot_backward(g_EH, q_NHC, k_NHC, row, col, ctx.chunk, *ctx.needs_input_grad[:2])
        return dq, dk, None, None, None


def edge_dot(q_NHC: Tensor, k_NHC: Tensor, row: Tensor, col: Tensor, *, chunk_elements: Optional[int] = None,
             validate: bool = True) -> Tensor:
    """``s[e, h] = q[row[e], h] . k[col[e], h]`` for every edge e: [E, H], differentiable in q and k, computed in
    chunks of edges and recomputed in backward, so no [E, H, C] gather is kept (autograd's ``(q[row] * k[col]).sum(-1)``
    keeps two). q_NHC [Nd, H, C], k_NHC [Ns, H, C], row / col [E] int64 destination / source of each edge.
    ``validate=False`` skips the range check of row / col (one read of each, a host sync): for a CSR whose
    indices were checked when it was built."""
    for name, t in (("q_NHC", q_NHC), ("k_NHC", k_NHC)):
        if not isinstance(t, Tensor) or t.dim() != 3 or not t.is_floating_point():
            raise ValueError(f"edge_dot: {name} must be a 3-D floating-point tensor [N, H, C], got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if q_NHC.shape[1:] != k_NHC.shape[1:]:
        raise ValueError(f"edge_dot: q_NHC {tuple(q_NHC.shape)} and k_NHC {tuple(k_NHC.shape)} must agree on heads "
                         f"and channels")
    for name, idx, size in (("row", row, q_NHC.size(0)), ("col", col, k_NHC.size(0))):
        if not isinstance(idx, Tensor) or idx.dtype not in (torch.int64, torch.int32) or idx.dim() != 1:
            raise ValueError(f"edge_dot: {name} must be a 1-D int64 / int32 tensor, got "
                             f"{getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}")
        if validate and idx.numel() and not is_tracing():
            low, high = (int(t) for t in idx.aminmax())
            if low < 0 or high >= size:
                raise ValueError(f"edge_dot: {name} holds {low if low < 0 else high}, out of range for {size} nodes "
                                 f"(valid: 0..{size - 1})")
    if row.shape != col.shape:
        raise ValueError(f"edge_dot: row and col must be 1-D of one length, got {tuple(row.shape)}, {tuple(col.shape)}")
    args = (q_NHC, k_NHC, row, col, int(chunk_elements or CHUNK_ELEMENTS))
    if torch.compiler.is_compiling():  # one node of the compiled graph (see "torch.compile" at the end of the file)
        return _edge_dot_op(*args)
    return _EdgeDot.apply(*args)


# ----------------------------------------------------------------------------------------------------
# Fused softmax + aggregation from given scores (GAT, point/part attention)
# ----------------------------------------------------------------------------------------------------
def _aggregate_forward(s_EH, v_NHC, csr: CSR, keep, dropout, need_weights, chunk):
    """The forward of the fused softmax-aggregation, block by block -> (out [Nd, H, C], alpha [E, H] or None,
    row_max [Nd, H], log_sum [Nd, H]): the eager autograd.Function and the custom operator of torch.compile
    (``zoo::segment_softmax_aggregate``) both run it."""
    H, C = v_NHC.shape[1], v_NHC.shape[2]
    # out in the dtype of PyG's messages v_j * alpha_ij, alpha in the scores' (softmax keeps it)
    out_dtype = _promoted_dtype(s_EH, v_NHC)
    cdt = _compute_dtype(out_dtype)
    out = torch.zeros(csr.num_dst, H, C, dtype=cdt, device=v_NHC.device)
    row_max = torch.full((csr.num_dst, H), float("-inf"), dtype=cdt, device=v_NHC.device)  # (_block_softmax)
    log_sum = torch.zeros((csr.num_dst, H), dtype=cdt, device=v_NHC.device)
    alpha_all = s_EH.new_zeros(s_EH.shape, dtype=cdt) if need_weights else None
    for n0, n1, e0, e1 in csr.blocks(chunk // max(1, H * C)):
        dl = csr.row[e0:e1] - n0
        alpha, row_max[n0:n1], log_sum[n0:n1] = _block_softmax(s_EH[e0:e1].to(cdt), dl, n1 - n0)
        alpha = _apply_keep(alpha, None if keep is None else keep[e0:e1], dropout)
        if alpha_all is not None:
            alpha_all[e0:e1] = alpha
        msg = v_NHC.index_select(0, csr.col[e0:e1]).to(cdt).mul_(alpha[..., None])
        _add_rows_(out[n0:n1], dl, msg)
    return out.to(out_dtype), None if alpha_all is None else alpha_all.to(s_EH.dtype), row_max, log_sum


def _aggregate_backward(g_NHC, s_EH, v_NHC, row_max, log_sum, keep, csr: CSR, dropout, chunk, need_s, need_v):
    """The backward of :func:`_aggregate_forward` (softmax and messages recomputed block by block) -> (d s_EH or
    None, d v_NHC or None), in the inputs' dtypes."""
    H, C = v_NHC.shape[1], v_NHC.shape[2]
    cdt = _compute_dtype(_promoted_dtype(s_EH, v_NHC))
    g_NHC = g_NHC.to(cdt)
    gs = torch.zeros(s_EH.shape, dtype=cdt, device=s_EH.device) if need_s else None
    gv = torch.zeros(v_NHC.shape, dtype=cdt, device=v_NHC.device) if need_v else None
    scale = 1.0 / (1.0 - dropout) if keep is not None else 1.0
    for n0, n1, e0, e1 in csr.blocks(chunk // max(1, H * C)):
        dl = csr.row[e0:e1] - n0
        col = csr.col[e0:e1]
        row = csr.row[e0:e1]
        s, top = s_EH[e0:e1].to(cdt), row_max[row]
        alpha = exp_flushed_((s - top).sub_(log_sum[row]))  # softmax, recomputed
        kf = None if keep is None else keep[e0:e1].to(cdt) * scale
        g_cHC = g_NHC.index_select(0, csr.row[e0:e1])
        if gv is not None:
            a_eff = alpha if kf is None else alpha * kf
            _add_rows_(gv, col, g_cHC * a_eff[..., None])
        if gs is not None:
            t = (g_cHC * v_NHC.index_select(0, col).to(cdt)).sum(-1)  # dL/d alpha_eff
            if kf is not None:
                t = t * kf
            gs[e0:e1] = _block_softmax_grad(alpha, s == top, t, dl, csr.rowptr[n0:n1 + 1].diff())
    return None if gs is None else gs.to(s_EH.dtype), None if gv is None else gv.to(v_NHC.dtype)


class _SegmentSoftmaxAggregate(torch.autograd.Function):
    """Eager autograd of the fused softmax-aggregation: saves the inputs and the [Nd, H] statistics only."""

    @staticmethod
    def forward(ctx, s_EH, v_NHC, csr: CSR, keep, dropout, need_weights, chunk):
        out, alpha_all, row_max, log_sum = _aggregate_forward(s_EH, v_NHC, csr, keep, dropout, need_weights, chunk)
        ctx.save_for_backward(s_EH, v_NHC, row_max, log_sum, keep)
        ctx.csr, ctx.dropout, ctx.chunk = csr, dropout, chunk
        if alpha_all is not None:
            ctx.mark_non_differentiable(alpha_all)
        return out, alpha_all

    @staticmethod
    def backward(ctx, g_NHC, _g_alpha):
        refuse_double_backward(
            "segment_softmax_aggregate (the fused softmax-aggregation of GATConv and the point/part attention)",
            "call segment_softmax_aggregate_ref (plain autograd), or for GATConv torch_geometric.nn.GATConv, "
            "which loads this layer's state dict")
        s_EH, v_NHC, row_max, log_sum, keep = ctx.saved_tensors
        gs, gv = _aggregate_backward(g_NHC, s_EH, v_NHC, row_max, log_sum, keep, ctx.csr, ctx.dropout, ctx.chunk,
                                     ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return gs, gv, None, None, None, None, None


def segment_softmax_aggregate(
    s_EH: Tensor,
    v_NHC: Tensor,
    csr: CSR,
    *,
    keep: Optional[Tensor] = None,
    dropout: float = 0.0,
    need_weights: bool = False,
    chunk_elements: Optional[int] = None,
):
    """``out_i = sum_{j -> i} softmax_j(s_ji) * keep_ji / (1 - dropout) * v_j`` for every destination i.

    s_EH [E, H] scores in CSR order (``csr``'s sorted edges); v_NHC [Ns, H, C] values of the source
    nodes. Returns (out [Nd, H, C], alpha [E, H] or None); destinations without edges get zeros. As PyG's
    ``softmax`` and message ``v_j * alpha``: alpha in the scores' dtype, out in the promotion of the two (fp32 for
    GATConv under torch.autocast, whose scores are fp32); computed in fp32 for half inputs."""
    fn = "segment_softmax_aggregate"
    for name, t in (("s_EH", s_EH), ("v_NHC", v_NHC)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    # as _check_segments: integer scores were softmaxed after a silent cast to float (and integer values with
    # them raised deep inside index_add), where segment_softmax_aggregate_ref refused them
    if not s_EH.is_floating_point():
        raise TypeError(f"{fn}: scores must be floating point, got {s_EH.dtype}")
    if not v_NHC.is_floating_point():
        raise TypeError(f"{fn}: values must be floating point, got {v_NHC.dtype}")
    if s_EH.dim() != 2 or s_EH.size(0) != csr.num_edges:
        raise ValueError(f"scores must be [E={csr.num_edges}, H], got {tuple(s_EH.shape)}")
    if v_NHC.dim() != 3 or v_NHC.size(0) != csr.num_src or v_NHC.size(1) != s_EH.size(1):
        raise ValueError(
            f"values must be [Ns={csr.num_src}, H={s_EH.size(1)}, C], got {tuple(v_NHC.shape)}"
        )
    _check_keep(keep, csr.num_edges, s_EH.size(1), dropout)
    dropout, need_weights, chunk = float(dropout), bool(need_weights), int(chunk_elements or CHUNK_ELEMENTS)
    # Under torch.compile the fused function is a custom operator, one opaque node of the graph (see "torch.compile"
    # at the end of the file): Python loops over destination blocks with a backward that recomputes instead of
    # storing [E, H, C]. Compiling the plain gather / softmax / scatter form instead was slower on CPU (docs/graph.md).
    if torch.compiler.is_compiling():
        out, alpha, _, _ = _aggregate_op(s_EH, v_NHC, csr.rowptr, csr.col, csr.row, keep, dropout, need_weights, chunk)
        return out, alpha.detach() if need_weights else None
    return _SegmentSoftmaxAggregate.apply(s_EH, v_NHC, csr, keep, dropout, need_weights, chunk)


def segment_softmax_aggregate_ref(s_EH, v_NHC, csr: CSR, *, keep=None, dropout=0.0):
    """Unfused reference of :func:`segment_softmax_aggregate` (plain autograd, [E, H, C] messages)."""
    alpha = segment_softmax(s_EH, csr.row, csr.num_dst)
    alpha = _apply_keep(alpha, keep, dropout)
    msg = v_NHC[csr.col] * alpha[..., None]
    out = v_NHC.new_zeros(csr.num_dst, v_NHC.size(1), v_NHC.size(2)).index_add(0, csr.row, msg)
    return out, alpha


# ----------------------------------------------------------------------------------------------------
# GATv2, fully fused
# ----------------------------------------------------------------------------------------------------
def _gatv2_block_z(xs_c, xd_bHC, ea_ED, we_FD, dl, e0, e1, H, C, cdt):
    """z = xs[col] + xd[row] (+ W_e e) for one block, [c, H, C] in the compute dtype (xs_c = xs[col];
    xd_bHC: the projected features of the block's destination nodes n0..n1-1, indexed by dl = row - n0)."""
    z = xd_bHC.index_select(0, dl).to(cdt)
    z += xs_c
    if ea_ED is not None:
        z += (ea_ED[e0:e1].to(cdt) @ we_FD.to(cdt).t()).view(-1, H, C)
    return z


def _block_dst(xd_NHC, x_dst, w_dst, b_dst, n0, n1, H, C, cdt):
    """Projected destination features of nodes n0..n1-1, [n, H, C]: a slice of xd_NHC, or computed here
    from x_dst @ w_dst^T + b_dst when the projection is fused (xd_NHC is None)."""
    if xd_NHC is not None:
        return xd_NHC[n0:n1]
    b = None if b_dst is None else b_dst.to(cdt)
    return F.linear(x_dst[n0:n1].to(cdt), w_dst.to(cdt), b).view(-1, H, C)


def _head_dot_matrix(att_HC: Tensor) -> Tensor:
    """Block-diagonal [H*C, H] matrix W with W[h*C + c, h] = att[h, c]: z.view(c, H*C) @ W gives the
    per-head dot products a_h . z_h as one GEMM (no [c, H, C] temporary, no strided bmm copy)."""
    H, C = att_HC.shape
    eye = torch.eye(H, dtype=att_HC.dtype, device=att_HC.device)
    return (att_HC[:, :, None] * eye[:, None, :]).reshape(H * C, H)


def _rowdot(a_cHC: Tensor, b_cHC: Tensor) -> Tensor:
    """Per-edge, per-head dot product sum_c a[e, h, c] * b[e, h, c] -> [c, H] (batched GEMV)."""
    c, H, C = a_cHC.shape
    return torch.bmm(a_cHC.reshape(c * H, 1, C), b_cHC.reshape(c * H, C, 1)).view(c, H)


def _split_blocks(blocks: list, parts: int) -> list:
    """Cut a block list into ``parts`` contiguous groups of about equal edge counts."""
    if parts <= 1 or len(blocks) <= 1:
        return [blocks]
    total = sum(e1 - e0 for _, _, e0, e1 in blocks)
    groups, cur, acc = [], [], 0
    for blk in blocks:
        cur.append(blk)
        acc += blk[3] - blk[2]
        if acc >= total * (len(groups) + 1) / parts and len(groups) < parts - 1:
            groups.append(cur)
            cur = []
    if cur:
        groups.append(cur)
    return groups


#: Below this many edge x feature elements (E * H * C) the blocks run on the calling thread: starting the
#: worker threads and switching torch's intra-op threads off and on costs milliseconds, more than a small
#: graph's whole step (10k edges, H=8, C=8, fwd+bwd: 20 ms threaded vs 9.7 ms not, PyG 11.5 ms; at 100k
#: edges, C=8 both take 90 ms; at 100k edges, C=64, threads win, 445 vs 489 ms; 2 cores, 2026-12-05).
THREADED_MIN_ELEMENTS = 1 << 23


def _run_blocks(worker, blocks: list, device, width: int = 1) -> list:
    """Run ``worker(group)`` over groups of destination blocks (``width`` = H * C elements per edge).

    On CPU with T > 1 intra-op threads and at least THREADED_MIN_ELEMENTS of work, the blocks are split into
    T contiguous groups processed by T Python threads, each running single-threaded torch ops (the ops
    release the GIL). A block's work is ~15 tensor ops on a few MiB; as separate OpenMP parallel regions
    those pay a thread barrier each, which dominated on this project's shared 2-core machine (CPU time
    1.4 s single-threaded vs 4.6 s with 2 intra-op threads for one 200k-edge fwd+bwd). Results come back
    in group order.

    The workers run with torch.autocast off, on every thread: they compute in their own dtype (fp32 for half
    inputs, as the Triton kernel does), and autocast, which is per thread, reached only the calling thread's
    matmuls (rounding the scores to bf16 there and not in the worker threads: under autocast the output
    depended on the thread count, 8e-3 apart at 1 and 2 threads)."""
    threads = torch.get_num_threads()
    edges = blocks[-1][3] - blocks[0][2] if blocks else 0
    if device.type != "cpu" or threads <= 1 or len(blocks) <= 1 or edges * width < THREADED_MIN_ELEMENTS:
        with autocast_off(device.type):
            return [worker(blocks)]
    groups = _split_blocks(blocks, threads)
    from concurrent.futures import ThreadPoolExecutor

    # grad mode and inference mode are thread-local: carry the caller's into the workers (tensors made
    # under torch.inference_mode, as Lightning's validation/test create, can only be written inside it)
    grad_mode, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run(group):
        torch.set_num_threads(1)
        with torch.inference_mode(inference), torch.set_grad_enabled(grad_mode), autocast_off(device.type):
            return worker(group)

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(len(groups)) as pool:
            return list(pool.map(run, groups))
    finally:
        torch.set_num_threads(threads)


def _gatv2_forward(xs_NHC, xd_NHC, x_dst, w_dst, b_dst, att_HC, ea_ED, we_FD, csr: CSR, slope, keep, dropout,
                   need_weights, chunk):
    """The blocked forward of the fused GATv2 attention -> (out [Nd, H, C], alpha [E, H] or None, row_max [Nd, H],
    log_sum [Nd, H]): the eager autograd.Function and the custom operator of torch.compile
    (``zoo::gatv2_attention``) both run it."""
    Nd, H, C = csr.num_dst, xs_NHC.shape[1], xs_NHC.shape[2]
    out_dtype = _promoted_dtype(xs_NHC, xd_NHC, x_dst, w_dst, b_dst, att_HC, ea_ED, we_FD)  # out and alpha
    cdt = _compute_dtype(out_dtype)
    dev = xs_NHC.device
    w_att = _head_dot_matrix(att_HC.to(cdt))
    out = torch.zeros(Nd, H, C, dtype=cdt, device=dev)
    row_max = torch.full((Nd, H), float("-inf"), dtype=cdt, device=dev)  # softmax statistics (_block_softmax)
    log_sum = torch.zeros((Nd, H), dtype=cdt, device=dev)
    alpha_all = torch.zeros(csr.num_edges, H, dtype=cdt, device=dev) if need_weights else None

    def worker(blocks):  # writes disjoint rows of out / row_max / log_sum / alpha_all
        for n0, n1, e0, e1 in blocks:
            col, dl = csr.col[e0:e1], csr.row[e0:e1] - n0
            xs_c = xs_NHC.index_select(0, col).to(cdt)
            xd_b = _block_dst(xd_NHC, x_dst, w_dst, b_dst, n0, n1, H, C, cdt)
            z = _gatv2_block_z(xs_c, xd_b, ea_ED, we_FD, dl, e0, e1, H, C, cdt)
            del xd_b
            s = F.leaky_relu_(z, slope).view(-1, H * C) @ w_att  # [c, H] scores
            del z
            alpha, row_max[n0:n1], log_sum[n0:n1] = _block_softmax(s, dl, n1 - n0)
            alpha = _apply_keep(alpha, None if keep is None else keep[e0:e1], dropout)
            if alpha_all is not None:
                alpha_all[e0:e1] = alpha
            out[n0:n1].index_add_(0, dl, xs_c.mul_(alpha[..., None]))

    _run_blocks(worker, csr.blocks(chunk // max(1, H * C)), dev, H * C)
    return out.to(out_dtype), None if alpha_all is None else alpha_all.to(out_dtype), row_max, log_sum


def _gatv2_backward(g_NHC, xs_NHC, xd_NHC, x_dst, w_dst, b_dst, att_HC, ea_ED, we_FD, row_max, log_sum, keep,
                    csr: CSR, slope, dropout, chunk, need_edge_attr):
    """The backward of :func:`_gatv2_forward` (scores, softmax and messages recomputed block by block) -> the
    gradients of (xs_NHC, xd_NHC, x_dst, w_dst, b_dst, att_HC, ea_ED, we_FD), None for an absent input (and
    for ea_ED without ``need_edge_attr``)."""
    H, C = xs_NHC.shape[1], xs_NHC.shape[2]
    cdt = _compute_dtype(_promoted_dtype(xs_NHC, xd_NHC, x_dst, w_dst, b_dst, att_HC, ea_ED, we_FD))
    dev = xs_NHC.device
    att = att_HC.to(cdt)
    w_att = _head_dot_matrix(att)
    att_neg = att * slope
    g_NHC = g_NHC.to(cdt)  # may be an expanded view (e.g. from .sum()): index_select reads it as is
    fused_dst = xd_NHC is None
    gxd = None if fused_dst else torch.zeros(xd_NHC.shape, dtype=cdt, device=dev)
    gx_dst = torch.zeros(x_dst.shape, dtype=cdt, device=dev) if fused_dst else None
    has_edge = ea_ED is not None
    gea = torch.zeros(ea_ED.shape, dtype=cdt, device=dev) if has_edge and need_edge_attr else None
    kscale = 1.0 / (1.0 - dropout) if keep is not None else 1.0
    we_c = we_FD.to(cdt) if has_edge else None
    w_dst_c = w_dst.to(cdt) if fused_dst else None

    def worker(blocks):
        # gxd / gx_dst / gea rows are disjoint between groups; gxs (source rows, which every group touches)
        # and the parameter gradients (att, W_e, w_dst, b_dst) are per-group partials summed afterwards in
        # group order: the result does not depend on which thread finishes first (one [Ns, H, C] buffer
        # shared under a lock summed in lock order, and gradients changed from run to run with 2 threads)
        gxs = torch.zeros(xs_NHC.shape, dtype=cdt, device=dev)
        gatt_HF = torch.zeros(H, H * C, dtype=cdt, device=dev)  # diagonal blocks are dL/d att
        gwe = torch.zeros(we_FD.shape, dtype=cdt, device=dev) if has_edge else None
        gw_dst = torch.zeros(w_dst.shape, dtype=cdt, device=dev) if fused_dst else None
        gb_dst = torch.zeros(H * C, dtype=cdt, device=dev) if fused_dst and b_dst is not None else None
        for n0, n1, e0, e1 in blocks:
            col, row = csr.col[e0:e1], csr.row[e0:e1]
            dl = row - n0
            xs_c = xs_NHC.index_select(0, col).to(cdt)
            g_c = g_NHC.index_select(0, row)
            t = _rowdot(g_c, xs_c)  # dL/d alpha_eff [c, H]
            xd_b = _block_dst(xd_NHC, x_dst, w_dst, b_dst, n0, n1, H, C, cdt)
            z = _gatv2_block_z(xs_c, xd_b, ea_ED, we_FD, dl, e0, e1, H, C, cdt)
            del xs_c, xd_b
            pos = z > 0
            lz_cF = F.leaky_relu_(z, slope).view(-1, H * C)  # in place: z is now LeakyReLU(z)
            s, top = lz_cF @ w_att, row_max[row]  # [c, H] scores, recomputed, and their node's maximum
            alpha = exp_flushed_((s - top).sub_(log_sum[row]))  # [c, H] softmax, recomputed
            kf = None if keep is None else keep[e0:e1].to(cdt) * kscale
            a_eff = alpha if kf is None else alpha * kf
            if kf is not None:
                t = t * kf
            ds = _block_softmax_grad(alpha, s == top, t, dl, csr.rowptr[n0:n1 + 1].diff())  # dL/ds [c, H]
            del s, top
            gatt_HF.addmm_(ds.t(), lz_cF)
            del lz_cF, z
            dz = torch.where(pos, att, att_neg).mul_(ds[..., None])  # dL/dz [c, H, C]
            del pos
            if fused_dst:  # the block owns destinations n0..n1-1: their gradient is complete here
                gxd_bF = dz.new_zeros((n1 - n0, H, C)).index_add_(0, dl, dz).view(-1, H * C)
                gx_dst[n0:n1] = gxd_bF @ w_dst_c
                gw_dst.addmm_(gxd_bF.t(), x_dst[n0:n1].to(cdt))
                if gb_dst is not None:
                    gb_dst += gxd_bF.sum(0)
                del gxd_bF
            else:
                gxd[n0:n1].index_add_(0, dl, dz)
            if gwe is not None:
                dz_cF = dz.view(-1, H * C)
                gwe.addmm_(dz_cF.t(), ea_ED[e0:e1].to(cdt))
                if gea is not None:
                    gea[e0:e1] = dz_cF @ we_c
            dz.addcmul_(g_c, a_eff[..., None])  # + the value path: alpha_eff * g_i
            del g_c
            _add_rows_(gxs, col, dz)
        return gxs, gatt_HF, gwe, gw_dst, gb_dst

    parts = _run_blocks(worker, csr.blocks(chunk // max(1, H * C)), dev, H * C)
    total = list(parts[0])
    for part in parts[1:]:
        for i, value in enumerate(part):
            if value is not None:
                total[i] += value
    gxs, gatt_HF, gwe, gw_dst, gb_dst = total
    gatt = gatt_HF.view(H, H, C).diagonal(dim1=0, dim2=1).t()
    cast = lambda g, ref: None if g is None else g.to(ref.dtype)  # noqa: E731
    return (
        gxs.to(xs_NHC.dtype), cast(gxd, xd_NHC), cast(gx_dst, x_dst), cast(gw_dst, w_dst),
        cast(gb_dst, b_dst), gatt.to(att_HC.dtype), cast(gea, ea_ED), cast(gwe, we_FD),
    )



class _GATv2Attention(torch.autograd.Function):
    """xd is given either as xd_NHC [Nd, H, C], or (xd_NHC None) as the projection x_dst [Nd, Fd],
    w_dst [H*C, Fd], b_dst [H*C] | None, computed per destination block in forward and backward: then the
    [Nd, H, C] destination features and their gradient never exist as whole tensors (the gradient goes
    straight to x_dst, w_dst, b_dst block by block)."""

    @staticmethod
    def forward(ctx, xs_NHC, xd_NHC, x_dst, w_dst, b_dst, att_HC, ea_ED, we_FD, csr: CSR, slope, keep, dropout,
                need_weights, chunk):
        out, alpha_all, row_max, log_sum = _gatv2_forward(xs_NHC, xd_NHC, x_dst, w_dst, b_dst, att_HC, ea_ED, we_FD,
                                                          csr, slope, keep, dropout, need_weights, chunk)
        ctx.save_for_backward(xs_NHC, xd_NHC, x_dst, w_dst, b_dst, att_HC, ea_ED, we_FD, row_max, log_sum, keep)
        ctx.csr, ctx.slope, ctx.dropout, ctx.chunk = csr, slope, dropout, chunk
        if alpha_all is not None:
            ctx.mark_non_differentiable(alpha_all)
        return out, alpha_all

    @staticmethod
    def backward(ctx, g_NHC, _g_alpha):
        refuse_double_backward("the fused GATv2 attention (GATv2Conv)", "use torch_geometric.nn's layer of the same name, which loads this layer's state dict")
        grads = _gatv2_backward(g_NHC, *ctx.saved_tensors, ctx.csr, ctx.slope, ctx.dropout, ctx.chunk,
                                ctx.needs_input_grad[6])
        return (*grads, None, None, None, None, None, None)


def _check_dst_projection(xs_NHC, xd_NHC, dst_projection):
    """-> (x_dst, w_dst, b_dst) or (None, None, None); validates that exactly one form of xd is given."""
    if dst_projection is None:
        if xd_NHC is None:
            raise ValueError("gatv2_attention: give x_dst features (xd_NHC) or dst_projection=(x, weight, bias)")
        return None, None, None
    if xd_NHC is not None:
        raise ValueError("gatv2_attention: give xd_NHC or dst_projection, not both")
    if not isinstance(dst_projection, (tuple, list)) or len(dst_projection) != 3:
        raise ValueError("gatv2_attention: dst_projection must be (x_dst [Nd, F], weight [H*C, F], bias [H*C] or None)")
    x_dst, w_dst, b_dst = dst_projection
    H, C = xs_NHC.shape[1:]
    if x_dst.dim() != 2 or tuple(w_dst.shape) != (H * C, x_dst.size(1)):
        raise ValueError(
            f"gatv2_attention: dst_projection needs x_dst [Nd, F] and weight [{H * C}, F], got "
            f"{tuple(x_dst.shape)} and {tuple(w_dst.shape)}"
        )
    if b_dst is not None and tuple(b_dst.shape) != (H * C,):
        raise ValueError(f"gatv2_attention: dst_projection bias must be [{H * C}], got {tuple(b_dst.shape)}")
    return x_dst, w_dst, b_dst


def _check_gatv2_inputs(xs_NHC, xd_NHC, x_dst, att_HC, csr, edge_attr, edge_weight):
    if xs_NHC.dim() != 3 or (xd_NHC is not None and xd_NHC.dim() != 3):
        raise ValueError(
            f"gatv2_attention: x_src/x_dst must be [N, H, C], got {tuple(xs_NHC.shape)}, "
            f"{None if xd_NHC is None else tuple(xd_NHC.shape)}"
        )
    if xd_NHC is not None and xs_NHC.shape[1:] != xd_NHC.shape[1:]:
        raise ValueError(
            f"gatv2_attention: x_src {tuple(xs_NHC.shape)} and x_dst {tuple(xd_NHC.shape)} differ in [H, C]"
        )
    num_dst = xd_NHC.size(0) if xd_NHC is not None else x_dst.size(0)
    if xs_NHC.size(0) != csr.num_src or num_dst != csr.num_dst:
        raise ValueError(
            f"gatv2_attention: graph has {csr.num_src} source / {csr.num_dst} destination nodes, "
            f"features have {xs_NHC.size(0)} / {num_dst} rows"
        )
    H, C = xs_NHC.shape[1:]
    if tuple(att_HC.shape) != (H, C):
        raise ValueError(f"gatv2_attention: att must be [H={H}, C={C}], got {tuple(att_HC.shape)}")
    if (edge_attr is None) != (edge_weight is None):
        raise ValueError("gatv2_attention: edge_attr and edge_weight go together")
    if edge_attr is not None:
        if edge_attr.dim() != 2 or edge_attr.size(0) != csr.num_edges:
            raise ValueError(
                f"gatv2_attention: edge_attr must be [E={csr.num_edges}, D], got {tuple(edge_attr.shape)}"
            )
        if tuple(edge_weight.shape) != (H * C, edge_attr.size(1)):
            raise ValueError(
                f"gatv2_attention: edge_weight must be [{H * C}, {edge_attr.size(1)}], got "
                f"{tuple(edge_weight.shape)}"
            )


def gatv2_attention(
    xs_NHC: Tensor,
    xd_NHC: Optional[Tensor],
    att_HC: Tensor,
    csr: CSR,
    *,
    dst_projection: Optional[tuple] = None,
    edge_attr: Optional[Tensor] = None,
    edge_weight: Optional[Tensor] = None,
    negative_slope: float = 0.2,
    keep: Optional[Tensor] = None,
    dropout: float = 0.0,
    need_weights: bool = False,
    impl: str = "auto",
    chunk_elements: Optional[int] = None,
):
    """Fused GATv2 attention over the edges of ``csr``.

    ``out_i = sum_{j -> i} alpha_ji xs_j`` with ``alpha_ji = softmax_j(a . LeakyReLU(xs_j + xd_i +
    W_e e_ji))`` (dropped with ``keep`` / (1 - dropout) when a keep-mask is given).

    xs_NHC [Ns, H, C] projected source features (PyG's ``lin_l(x)``), xd_NHC [Nd, H, C] projected
    destination features (``lin_r(x)``), att_HC [H, C]; edge_attr [E, D] in CSR order and edge_weight
    [H*C, D] (``lin_edge.weight``) or both None. Instead of xd_NHC (pass None), ``dst_projection`` =
    (x_dst [Nd, F], weight [H*C, F], bias [H*C] or None) lets the CPU path project the destination
    features block by block, so neither xd nor its gradient exists as an [Nd, H, C] tensor (the Triton
    path projects up front). Returns (out [Nd, H, C], alpha [E, H] in CSR order or None). alpha is
    returned without gradient. Both come in the promoted dtype of the inputs, as PyG's unfused formula gives them
    (fp32 under torch.autocast, where ``att`` stays an fp32 parameter; bf16 for a bf16 layer); the CPU path
    computes in fp32 for half inputs, with autocast off inside. ``impl``: "auto" (the Triton kernel on CUDA
    tensors within its limits, C <= 256 channels per head and D <= 64 edge features; the chunked PyTorch path
    otherwise), "torch" or "triton" (also on CPU tensors under TRITON_INTERPRET=1; beyond the limits a ValueError);
    inputs with float64 run the PyTorch path under every impl (the kernel takes fp32 / fp16 / bf16).
    """
    x_dst, w_dst, b_dst = _check_dst_projection(xs_NHC, xd_NHC, dst_projection)
    _check_gatv2_inputs(xs_NHC, xd_NHC, x_dst, att_HC, csr, edge_attr, edge_weight)
    _check_keep(keep, csr.num_edges, xs_NHC.size(1), dropout)
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"gatv2_attention: impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    if torch.compiler.is_compiling() and not _gatv2_on_kernel(impl, xs_NHC, xd_NHC, x_dst, w_dst, b_dst, att_HC,
                                                               edge_attr, edge_weight):
        # one node of the compiled graph (see "torch.compile" at the end of the file); the kernel's operator is
        # called by _gatv2_fused below
        out, alpha, _, _ = _gatv2_op(xs_NHC, xd_NHC, x_dst, w_dst, b_dst, att_HC, edge_attr, edge_weight, csr.rowptr,
                                     csr.col, csr.row, float(negative_slope), keep, float(dropout), bool(need_weights),
                                     int(chunk_elements or CHUNK_ELEMENTS))
        return out, alpha.detach() if need_weights else None
    args = (xs_NHC, xd_NHC, att_HC, csr, x_dst, w_dst, b_dst, edge_attr, edge_weight, negative_slope, keep, dropout,
            need_weights, impl, chunk_elements)
    return _gatv2_fused(*args)  # under torch.compile: the Triton kernel's operator (zoo::gatv2_edge_softmax)


def _gatv2_on_kernel(impl, xs_NHC, xd_NHC, x_dst, w_dst, b_dst, att_HC, edge_attr, edge_weight) -> bool:
    """Whether GATv2 runs the Triton kernel: :func:`_on_kernel`, and under ``impl="auto"`` only within the kernel's
    limits (zoo.kernels.edge_softmax: ``MAX_CHANNELS`` = 256 channels per head, ``MAX_EDGE_DIM`` = 64 edge features).
    A larger CUDA layer (a single-head GATv2Conv(..., 512), say) runs the PyTorch path, eagerly and compiled alike, as
    PyG's layer computes it; it raised the kernel's ValueError. An explicit ``impl="triton"`` keeps that error."""
    if not _on_kernel(impl, xs_NHC, xs_NHC, xd_NHC, x_dst, w_dst, b_dst, att_HC, edge_attr, edge_weight):
        return False
    if impl == "triton":
        return True
    from zoo.kernels import edge_softmax as kernel

    return xs_NHC.size(2) <= kernel.MAX_CHANNELS and (edge_attr is None or edge_attr.size(1) <= kernel.MAX_EDGE_DIM)


def _gatv2_fused(xs_NHC, xd_NHC, att_HC, csr, x_dst, w_dst, b_dst, edge_attr, edge_weight, negative_slope, keep,
                 dropout, need_weights, impl, chunk_elements):
    """The Triton kernel (CUDA, or impl="triton"; fp32 / fp16 / bf16 inputs only, within the kernel's limits under
    impl="auto": see _gatv2_on_kernel) or the blocked CPU function, on checked inputs.

    The kernel reads every input in the source features' dtype: under torch.autocast those are half (from
    ``lin_l(x)``) next to the fp32 parameters ``att`` and ``lin_edge.weight`` (and fp32 edge features), which are
    cast to it here (their gradients flow back through the casts in fp32), as autocast itself casts the inputs of
    a matmul. Out and alpha come back in the promoted dtype, as from the CPU function and PyG."""
    if _gatv2_on_kernel(impl, xs_NHC, xd_NHC, x_dst, w_dst, b_dst, att_HC, edge_attr, edge_weight):
        from zoo.kernels.edge_softmax import gatv2_edge_softmax

        out_dtype = _promoted_dtype(xs_NHC, xd_NHC, x_dst, w_dst, b_dst, att_HC, edge_attr, edge_weight)
        if xd_NHC is None:
            xd_NHC = F.linear(x_dst, w_dst, b_dst).view(x_dst.size(0), *xs_NHC.shape[1:])
        like_xs = lambda t: None if t is None else t.to(xs_NHC.dtype)  # noqa: E731
        if torch.compiler.is_compiling():  # one node of the compiled graph (see "torch.compile" at the end)
            csr = csr.to(xs_NHC.device)
            out, alpha, _ = _gatv2_kernel_op(xs_NHC, like_xs(xd_NHC), like_xs(att_HC), like_xs(edge_attr),
                                             like_xs(edge_weight), csr.rowptr, csr.col, csr.row, float(negative_slope),
                                             keep, float(dropout), bool(need_weights))
            alpha = alpha.detach() if need_weights else None
        else:
            out, alpha = gatv2_edge_softmax(
                xs_NHC, like_xs(xd_NHC), like_xs(att_HC), csr, edge_attr=like_xs(edge_attr),
                edge_weight=like_xs(edge_weight), negative_slope=negative_slope, keep=keep, dropout=dropout,
                need_weights=need_weights,
            )
        return out.to(out_dtype), None if alpha is None else alpha.to(out_dtype)
    return _GATv2Attention.apply(
        xs_NHC, xd_NHC, x_dst, w_dst, b_dst, att_HC, edge_attr, edge_weight, csr, float(negative_slope), keep,
        float(dropout), bool(need_weights), int(chunk_elements or CHUNK_ELEMENTS),
    )


def gatv2_attention_ref(
    xs_NHC, xd_NHC, att_HC, csr: CSR, *, edge_attr=None, edge_weight=None, negative_slope=0.2, keep=None,
    dropout=0.0,
):
    """Unfused GATv2 (materialises [E, H, C]): the reference for the fused paths. Same signature and
    return as :func:`gatv2_attention` (alpha keeps its gradient here)."""
    H, C = xs_NHC.shape[1:]
    z = xs_NHC[csr.col] + xd_NHC[csr.row]
    if edge_attr is not None:
        z = z + (edge_attr @ edge_weight.t()).view(edge_attr.size(0), H, C)
    s = (F.leaky_relu(z, negative_slope) * att_HC).sum(-1)
    alpha = segment_softmax(s, csr.row, csr.num_dst)
    alpha = _apply_keep(alpha, keep, dropout)
    out = xs_NHC.new_zeros(csr.num_dst, H, C).index_add(0, csr.row, xs_NHC[csr.col] * alpha[..., None])
    return out, alpha


# ----------------------------------------------------------------------------------------------------
# torch.compile: the fused functions as custom operators
# ----------------------------------------------------------------------------------------------------
# Under torch.compile the fused functions above are PyTorch custom operators (torch.library.custom_op, as
# flash-attn registers its kernels: flash_attn/flash_attn_interface.py): Dynamo records each as one node of the
# graph, with no break, whose output shapes come from a fake implementation; AOTAutograd differentiates it through
# register_autograd, whose backward is another custom operator; inductor treats both as opaque calls. At run time
# they call the same blocked forward and backward as the eager autograd.Functions, so the compiled layer keeps the
# memory-light path (saved for backward: the inputs, the CSR and the [Nd, H] softmax statistics). Eager calls keep
# the autograd.Functions (no dispatcher round trip, the CSR's block lists cached on the CSR object).
# An operator takes the CSR as tensors (rowptr, col, row) and an Optional input as None; it returns tensors only,
# so an absent output (alpha without need_weights, the gradient of an input that needs none) is an empty tensor, and
# every output is contiguous, as its fake implementation says (inductor asserts the sizes and strides).
# Source: torch 2.11 torch/_library/custom_ops.py, torch/library.py (custom_op, register_fake, register_autograd).

def _csr_from(rowptr: Tensor, col: Tensor, row: Tensor, num_src: int) -> CSR:
    """The CSR the blocked functions read (rowptr, col, row; ``perm`` is not read by them: empty)."""
    return CSR(rowptr, col, row, col.new_empty(0), int(num_src), rowptr.numel() - 1)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    """An operator's output: ``t`` contiguous (the fake implementations promise contiguous outputs, and inductor
    checks the strides: GATv2's att gradient is a transposed diagonal), or an empty tensor for None."""
    return like.new_empty(0) if t is None else t.contiguous()


def _weights_or_empty(alpha: Optional[Tensor], like: Tensor) -> Tensor:
    """An operator's attention-weights output: ``alpha`` [E, H], or an empty [0, H] without need_weights."""
    return like.new_empty((0, like.size(1))) if alpha is None else alpha


def _output_grad(g_NHC: Optional[Tensor], like_NHC: Tensor, rowptr: Tensor) -> Tensor:
    """The gradient of an operator's [Nd, H, C] output as its backward operator takes it: zeros where autograd gives
    None (only the attention weights were used)."""
    return like_NHC.new_zeros((rowptr.size(0) - 1,) + tuple(like_NHC.shape[1:])) if g_NHC is None else g_NHC


def _none_if_empty(t: Tensor, wanted: bool) -> Optional[Tensor]:
    return t if wanted else None


@torch.library.custom_op("zoo::segment_softmax_aggregate", mutates_args=())
def _aggregate_op(s_EH: Tensor, v_NHC: Tensor, rowptr: Tensor, col: Tensor, row: Tensor, keep: Optional[Tensor],
                  dropout: float, need_weights: bool, chunk: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (out [Nd, H, C], alpha [E, H] (empty [0, H] without need_weights), row_max [Nd, H], log_sum [Nd, H])."""
    csr = _csr_from(rowptr, col, row, v_NHC.size(0))
    out, alpha, row_max, log_sum = _aggregate_forward(s_EH, v_NHC, csr, keep, dropout, need_weights, chunk)
    return out, _weights_or_empty(alpha, s_EH), row_max, log_sum


@_aggregate_op.register_fake
def _(s_EH, v_NHC, rowptr, col, row, keep, dropout, need_weights, chunk):
    num_dst, (H, C) = rowptr.size(0) - 1, v_NHC.shape[1:]
    out_dtype = _promoted_dtype(s_EH, v_NHC)
    cdt = _compute_dtype(out_dtype)
    alpha = s_EH.new_empty(s_EH.shape if need_weights else (0, H))
    return (v_NHC.new_empty((num_dst, H, C), dtype=out_dtype), alpha, s_EH.new_empty((num_dst, H), dtype=cdt),
            s_EH.new_empty((num_dst, H), dtype=cdt))


@torch.library.custom_op("zoo::segment_softmax_aggregate_backward", mutates_args=())
def _aggregate_backward_op(g_NHC: Tensor, s_EH: Tensor, v_NHC: Tensor, rowptr: Tensor, col: Tensor, row: Tensor,
                           row_max: Tensor, log_sum: Tensor, keep: Optional[Tensor], dropout: float, chunk: int,
                           need_s: bool, need_v: bool) -> tuple[Tensor, Tensor]:
    csr = _csr_from(rowptr, col, row, v_NHC.size(0))
    gs, gv = _aggregate_backward(g_NHC, s_EH, v_NHC, row_max, log_sum, keep, csr, dropout, chunk, need_s, need_v)
    return _or_empty(gs, s_EH), _or_empty(gv, v_NHC)


@_aggregate_backward_op.register_fake
def _(g_NHC, s_EH, v_NHC, rowptr, col, row, row_max, log_sum, keep, dropout, chunk, need_s, need_v):
    return (s_EH.new_empty(s_EH.shape) if need_s else s_EH.new_empty(0),
            v_NHC.new_empty(v_NHC.shape) if need_v else v_NHC.new_empty(0))


def _aggregate_setup(ctx, inputs, output):
    s_EH, v_NHC, rowptr, col, row, keep, dropout, _need_weights, chunk = inputs
    ctx.save_for_backward(s_EH, v_NHC, rowptr, col, row, keep, output[2], output[3])
    ctx.dropout, ctx.chunk = dropout, chunk


def _aggregate_autograd(ctx, g_NHC, _g_alpha, _g_max, _g_log_sum):
    s_EH, v_NHC, rowptr, col, row, keep, row_max, log_sum = ctx.saved_tensors
    need_s, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    g_NHC = _output_grad(g_NHC, v_NHC, rowptr)
    gs, gv = _aggregate_backward_op(g_NHC, s_EH, v_NHC, rowptr, col, row, row_max, log_sum, keep, ctx.dropout,
                                    ctx.chunk, need_s, need_v)
    return _none_if_empty(gs, need_s), _none_if_empty(gv, need_v), None, None, None, None, None, None, None


_aggregate_op.register_autograd(_aggregate_autograd, setup_context=_aggregate_setup)


@torch.library.custom_op("zoo::gatv2_attention", mutates_args=())
def _gatv2_op(xs_NHC: Tensor, xd_NHC: Optional[Tensor], x_dst: Optional[Tensor], w_dst: Optional[Tensor],
              b_dst: Optional[Tensor], att_HC: Tensor, ea_ED: Optional[Tensor], we_FD: Optional[Tensor],
              rowptr: Tensor, col: Tensor, row: Tensor, slope: float, keep: Optional[Tensor], dropout: float,
              need_weights: bool, chunk: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (out [Nd, H, C], alpha [E, H] (empty [0, H] without need_weights), row_max [Nd, H], log_sum [Nd, H])."""
    csr = _csr_from(rowptr, col, row, xs_NHC.size(0))
    out, alpha, row_max, log_sum = _gatv2_forward(xs_NHC, xd_NHC, x_dst, w_dst, b_dst, att_HC, ea_ED, we_FD, csr,
                                                  slope, keep, dropout, need_weights, chunk)
    return out, _weights_or_empty(alpha, out), row_max, log_sum


@_gatv2_op.register_fake
def _(xs_NHC, xd_NHC, x_dst, w_dst, b_dst, att_HC, ea_ED, we_FD, rowptr, col, row, slope, keep, dropout,
      need_weights, chunk):
    num_dst, (H, C) = rowptr.size(0) - 1, xs_NHC.shape[1:]
    out_dtype = _promoted_dtype(xs_NHC, xd_NHC, x_dst, w_dst, b_dst, att_HC, ea_ED, we_FD)
    cdt = _compute_dtype(out_dtype)
    alpha = xs_NHC.new_empty((col.size(0) if need_weights else 0, H), dtype=out_dtype)
    return (xs_NHC.new_empty((num_dst, H, C), dtype=out_dtype), alpha,
            xs_NHC.new_empty((num_dst, H), dtype=cdt), xs_NHC.new_empty((num_dst, H), dtype=cdt))


@torch.library.custom_op("zoo::gatv2_attention_backward", mutates_args=())
def _gatv2_backward_op(g_NHC: Tensor, xs_NHC: Tensor, xd_NHC: Optional[Tensor], x_dst: Optional[Tensor],
                       w_dst: Optional[Tensor], b_dst: Optional[Tensor], att_HC: Tensor, ea_ED: Optional[Tensor],
                       we_FD: Optional[Tensor], row_max: Tensor, log_sum: Tensor, keep: Optional[Tensor],
                       rowptr: Tensor, col: Tensor, row: Tensor, slope: float, dropout: float, chunk: int,
                       need_edge_attr: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of (xs_NHC, xd_NHC, x_dst, w_dst, b_dst, att_HC, ea_ED, we_FD); empty for an absent input."""
    csr = _csr_from(rowptr, col, row, xs_NHC.size(0))
    grads = _gatv2_backward(g_NHC, xs_NHC, xd_NHC, x_dst, w_dst, b_dst, att_HC, ea_ED, we_FD, row_max, log_sum, keep,
                            csr, slope, dropout, chunk, need_edge_attr)
    return tuple(_or_empty(g, xs_NHC) for g in grads)


@_gatv2_backward_op.register_fake
def _(g_NHC, xs_NHC, xd_NHC, x_dst, w_dst, b_dst, att_HC, ea_ED, we_FD, row_max, log_sum, keep, rowptr, col, row,
      slope, dropout, chunk, need_edge_attr):
    def like(t, present=True):
        return t.new_empty(t.shape) if t is not None and present else xs_NHC.new_empty(0)

    return (like(xs_NHC), like(xd_NHC), like(x_dst, xd_NHC is None), like(w_dst, xd_NHC is None),
            like(b_dst, xd_NHC is None), like(att_HC), like(ea_ED, need_edge_attr), like(we_FD))


def _gatv2_setup(ctx, inputs, output):
    (xs_NHC, xd_NHC, x_dst, w_dst, b_dst, att_HC, ea_ED, we_FD, rowptr, col, row, slope, keep, dropout, _need_weights,
     chunk) = inputs
    ctx.save_for_backward(xs_NHC, xd_NHC, x_dst, w_dst, b_dst, att_HC, ea_ED, we_FD, output[2], output[3], keep,
                          rowptr, col, row)
    ctx.slope, ctx.dropout, ctx.chunk = slope, dropout, chunk
    ctx.present = [t is not None for t in inputs[:8]]


def _gatv2_autograd(ctx, g_NHC, _g_alpha, _g_max, _g_log_sum):
    saved = ctx.saved_tensors
    xs_NHC, rowptr = saved[0], saved[11]
    g_NHC = _output_grad(g_NHC, xs_NHC, rowptr)
    grads = _gatv2_backward_op(g_NHC, *saved, ctx.slope, ctx.dropout, ctx.chunk, ctx.needs_input_grad[6])
    # an input that was None or needs no gradient gets None (its slot holds an empty tensor or an unused one)
    grads = [g if present and needed else None
             for g, present, needed in zip(grads, ctx.present, ctx.needs_input_grad[:8])]
    return (*grads, None, None, None, None, None, None, None, None)


_gatv2_op.register_autograd(_gatv2_autograd, setup_context=_gatv2_setup)


@torch.library.custom_op("zoo::edge_dot", mutates_args=())
def _edge_dot_op(q_NHC: Tensor, k_NHC: Tensor, row: Tensor, col: Tensor, chunk: int) -> Tensor:
    return _edge_dot_forward(q_NHC, k_NHC, row, col, chunk)


@_edge_dot_op.register_fake
def _(q_NHC, k_NHC, row, col, chunk):
    return q_NHC.new_empty((row.size(0), q_NHC.size(1)), dtype=torch.promote_types(q_NHC.dtype, k_NHC.dtype))


@torch.library.custom_op("zoo::edge_dot_backward", mutates_args=())
def _edge_dot_backward_op(g_EH: Tensor, q_NHC: Tensor, k_NHC: Tensor, row: Tensor, col: Tensor, chunk: int,
                          need_q: bool, need_k: bool) -> tuple[Tensor, Tensor]:
    dq, dk = _edge_dot_backward(g_EH, q_NHC, k_NHC, row, col, chunk, need_q, need_k)
    return _or_empty(dq, q_NHC), _or_empty(dk, k_NHC)


@_edge_dot_backward_op.register_fake
def _(g_EH, q_NHC, k_NHC, row, col, chunk, need_q, need_k):
    return (q_NHC.new_empty(q_NHC.shape) if need_q else q_NHC.new_empty(0),
            k_NHC.new_empty(k_NHC.shape) if need_k else k_NHC.new_empty(0))


def _edge_dot_setup(ctx, inputs, output):
    q_NHC, k_NHC, row, col, chunk = inputs
    ctx.save_for_backward(q_NHC, k_NHC, row, col)
    ctx.chunk = chunk


def _edge_dot_autograd(ctx, g_EH):
    q_NHC, k_NHC, row, col = ctx.saved_tensors
    need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dq, dk = _edge_dot_backward_op(g_EH, q_NHC, k_NHC, row, col, ctx.chunk, need_q, need_k)
    return _none_if_empty(dq, need_q), _none_if_empty(dk, need_k), None, None, None


_edge_dot_op.register_autograd(_edge_dot_autograd, setup_context=_edge_dot_setup)


# The Triton kernels (zoo.kernels.edge_softmax, zoo.kernels.vector_softmax) as operators: the forward and backward
# launchers the eager autograd.Functions run (no autograd of their own), called at run time; the kernel modules are
# imported there, when the compiled graph first runs. They check their inputs as in eager mode, with its messages,
# when the compiled graph runs: the GATv2 operator with the launcher's checks (dtypes, limits, CSR bounds), the vector
# operator with segment_softmax_weighted_sum's value checks (index in range and matching rowptr), which Dynamo's
# tracing skips. CUDA tensors under impl="auto", or impl="triton" (CPU tensors under TRITON_INTERPRET=1):
# _on_kernel / _gatv2_on_kernel decide, as in eager mode.

@torch.library.custom_op("zoo::gatv2_edge_softmax", mutates_args=())
def _gatv2_kernel_op(xs_NHC: Tensor, xd_NHC: Tensor, att_HC: Tensor, ea_ED: Optional[Tensor], we_FD: Optional[Tensor],
                     rowptr: Tensor, col: Tensor, row: Tensor, slope: float, keep: Optional[Tensor], dropout: float,
                     need_weights: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The Triton GATv2 kernel's forward; every tensor input in xs_NHC's dtype (_gatv2_fused casts them) -> (out
    [Nd, H, C], alpha [E, H] (empty [0, H] without need_weights), both in xs_NHC's dtype, row_max [Nd, H] fp32)."""
    from zoo.kernels import edge_softmax as kernel

    csr = _csr_from(rowptr, col, row, xs_NHC.size(0))
    kernel._check(xs_NHC, xd_NHC, att_HC, csr, ea_ED, we_FD, keep)
    out, alpha, row_max = kernel._forward(xs_NHC, xd_NHC, att_HC, ea_ED, we_FD, csr, slope, keep, dropout,
                                          need_weights)
    return out, _weights_or_empty(alpha, out), row_max


@_gatv2_kernel_op.register_fake
def _(xs_NHC, xd_NHC, att_HC, ea_ED, we_FD, rowptr, col, row, slope, keep, dropout, need_weights):
    num_dst, (H, C) = rowptr.size(0) - 1, xs_NHC.shape[1:]
    return (xs_NHC.new_empty((num_dst, H, C)), xs_NHC.new_empty((col.size(0) if need_weights else 0, H)),
            xs_NHC.new_empty((num_dst, H), dtype=torch.float32))


@torch.library.custom_op("zoo::gatv2_edge_softmax_backward", mutates_args=())
def _gatv2_kernel_backward_op(g_NHC: Tensor, xs_NHC: Tensor, xd_NHC: Tensor, att_HC: Tensor, ea_ED: Optional[Tensor],
                              we_FD: Optional[Tensor], keep: Optional[Tensor], row_max: Tensor, rowptr: Tensor,
                              col: Tensor, row: Tensor, slope: float,
                              dropout: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of (xs_NHC, xd_NHC, att_HC, ea_ED, we_FD) from the kernel's backward; empty for an absent
    ea_ED / we_FD."""
    from zoo.kernels import edge_softmax as kernel

    csr = _csr_from(rowptr, col, row, xs_NHC.size(0))
    grads = kernel._backward(g_NHC, xs_NHC, xd_NHC, att_HC, ea_ED, we_FD, keep, row_max, csr, slope, dropout)
    return tuple(_or_empty(g, xs_NHC) for g in grads)


@_gatv2_kernel_backward_op.register_fake
def _(g_NHC, xs_NHC, xd_NHC, att_HC, ea_ED, we_FD, keep, row_max, rowptr, col, row, slope, dropout):
    return tuple(xs_NHC.new_empty(0) if t is None else t.new_empty(t.shape)
                 for t in (xs_NHC, xd_NHC, att_HC, ea_ED, we_FD))


def _gatv2_kernel_setup(ctx, inputs, output):
    xs_NHC, xd_NHC, att_HC, ea_ED, we_FD, rowptr, col, row, slope, keep, dropout, _need_weights = inputs
    ctx.save_for_backward(xs_NHC, xd_NHC, att_HC, ea_ED, we_FD, keep, output[2], rowptr, col, row)
    ctx.slope, ctx.dropout = slope, dropout
    ctx.present = [t is not None for t in inputs[:5]]


def _gatv2_kernel_autograd(ctx, g_NHC, _g_alpha, _g_max):
    saved = ctx.saved_tensors
    xs_NHC, rowptr = saved[0], saved[7]
    g_NHC = _output_grad(g_NHC, xs_NHC, rowptr)
    grads = _gatv2_kernel_backward_op(g_NHC, *saved, ctx.slope, ctx.dropout)
    grads = [g if present and needed else None
             for g, present, needed in zip(grads, ctx.present, ctx.needs_input_grad[:5])]
    return (*grads, None, None, None, None, None, None, None)


_gatv2_kernel_op.register_autograd(_gatv2_kernel_autograd, setup_context=_gatv2_kernel_setup)


@torch.library.custom_op("zoo::vector_softmax_sum", mutates_args=())
def _vector_softmax_sum_op(scores_EC: Tensor, values_EC: Tensor, index_E: Tensor,
                           rowptr: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The Triton vector-attention aggregation's forward (edges in CSR order) -> (out [N, C] in the scores' dtype,
    row max [N, C] fp32, log-sum [N, C] fp32). The forward kernel reads the segments from ``rowptr``, the backward
    from ``index_E``: first the value checks segment_softmax_weighted_sum makes eagerly (skipped while Dynamo traces,
    where the values are unknown), with its messages -- index in [0, N), rowptr from 0 to E, non-decreasing, and
    index what rowptr implies. Without them an out-of-range index read out of bounds in the backward kernel, and a
    mismatched one gave the gradient of another output than the one returned, both silently."""
    from zoo.kernels.vector_softmax import vector_softmax_sum

    fn, num_segments = "segment_softmax_weighted_sum", rowptr.numel() - 1
    _check_index_values(fn, index_E, num_segments)
    _check_rowptr_values(fn, rowptr, index_E, num_segments)
    return vector_softmax_sum(scores_EC, values_EC, rowptr)


@_vector_softmax_sum_op.register_fake
def _(scores_EC, values_EC, index_E, rowptr):
    shape = (rowptr.size(0) - 1, scores_EC.size(1))
    return (scores_EC.new_empty(shape), scores_EC.new_empty(shape, dtype=torch.float32),
            scores_EC.new_empty(shape, dtype=torch.float32))


@torch.library.custom_op("zoo::vector_softmax_sum_backward", mutates_args=())
def _vector_softmax_sum_backward_op(g_NC: Tensor, scores_EC: Tensor, values_EC: Tensor, index_E: Tensor,
                                    max_NC: Tensor, log_sum_NC: Tensor, out_NC: Tensor, need_scores: bool,
                                    need_values: bool) -> tuple[Tensor, Tensor]:
    from zoo.kernels.vector_softmax import vector_softmax_sum_backward

    grad_scores, grad_values = vector_softmax_sum_backward(scores_EC, values_EC, index_E, max_NC, log_sum_NC, out_NC,
                                                           g_NC, need_scores, need_values)
    return _or_empty(grad_scores, scores_EC), _or_empty(grad_values, values_EC)


@_vector_softmax_sum_backward_op.register_fake
def _(g_NC, scores_EC, values_EC, index_E, max_NC, log_sum_NC, out_NC, need_scores, need_values):
    return (scores_EC.new_empty(scores_EC.shape) if need_scores else scores_EC.new_empty(0),
            values_EC.new_empty(values_EC.shape) if need_values else values_EC.new_empty(0))


def _vector_softmax_sum_setup(ctx, inputs, output):
    scores_EC, values_EC, index_E, rowptr = inputs
    ctx.save_for_backward(scores_EC, values_EC, index_E, output[1], output[2], output[0])
    ctx.num_segments = rowptr.size(0) - 1


def _vector_softmax_sum_autograd(ctx, g_NC, _g_max, _g_log_sum):
    scores_EC, values_EC, index_E, max_NC, log_sum_NC, out_NC = ctx.saved_tensors
    need_scores, need_values = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if g_NC is None:
        g_NC = torch.zeros_like(out_NC)
    if torch.is_grad_enabled():
        # backward(create_graph=True), which reaches here with Dynamo's backend="eager" (AOTAutograd's backends refuse
        # double backward themselves): differentiable gradients, as _SegmentSoftmaxWeightedSum gives them eagerly.
        # AOTAutograd traces this backward with grad mode off, so compiled graphs keep the kernel's backward.
        grad_scores, grad_values = _differentiable_backward(ctx, scores_EC, values_EC, index_E, g_NC)[:2]
        return grad_scores, grad_values, None, None
    grad_scores, grad_values = _vector_softmax_sum_backward_op(g_NC, scores_EC, values_EC, index_E, max_NC,
                                                               log_sum_NC, out_NC, need_scores, need_values)
    return _none_if_empty(grad_scores, need_scores), _none_if_empty(grad_values, need_values), None, None


_vector_softmax_sum_op.register_autograd(_vector_softmax_sum_autograd, setup_context=_vector_softmax_sum_setup)


# Second derivatives. Eagerly, backward(create_graph=True) through a fused function raises refuse_double_backward's
# message naming what to use instead (or, for segment_softmax_weighted_sum, differentiates: _differentiable_backward,
# which the vector operator's autograd above calls too). Compiled with AOTAutograd (aot_eager, inductor) torch refuses
# double backward of the whole graph itself; with Dynamo's backend="eager" the operators' autograd runs as it is, and
# differentiating a backward operator without an autograd rule raised torch's "no autograd formula was registered ...
# use register_autograd", a message for this project's developers. Each backward operator's rule raises the eager
# message instead, when the second derivative is taken.

def _register_no_second_derivatives(backward_op, what: str, instead: str) -> None:
    def refuse(ctx, *grads):
        # refuse_double_backward raises under grad mode, which is how eager's backward sees create_graph=True; this
        # rule runs in the second backward, with grad mode whatever that call set: raise in every case
        with torch.enable_grad():
            refuse_double_backward(what, instead)

    backward_op.register_autograd(refuse, setup_context=lambda ctx, inputs, output: None)


_register_no_second_derivatives(_gatv2_kernel_backward_op, "the Triton GATv2 kernel",
                                "use torch_geometric.nn.GATv2Conv, which loads this layer's state dict")
_register_no_second_derivatives(_gatv2_backward_op, "the fused GATv2 attention (GATv2Conv)",
                                "use torch_geometric.nn's layer of the same name, which loads this layer's state dict")
_register_no_second_derivatives(
    _aggregate_backward_op,
    "segment_softmax_aggregate (the fused softmax-aggregation of GATConv and the point/part attention)",
    "call segment_softmax_aggregate_ref (plain autograd), or for GATConv torch_geometric.nn.GATConv, which loads this "
    "layer's state dict")
_register_no_second_derivatives(_edge_dot_backward_op, "edge_dot (TransformerConv's fused scores)",
                                "run the layer under a message hook (PyG's propagate path, plain autograd)")
_register_no_second_derivatives(
    _vector_softmax_sum_backward_op, "the Triton vector-attention backward operator (zoo::vector_softmax_sum_backward)",
    "segment_softmax_weighted_sum differentiates its gradients itself (backward with create_graph=True)")
