"""Vector attention's aggregation in Triton: a per-channel softmax over each destination's edges and the
weighted sum of per-edge values, over a destination-sorted CSR graph (forward and backward).

What: for every destination node i and channel c, over its incoming edges e (CSR order, rowptr[i] <=
e < rowptr[i + 1]),
    out[i, c] = sum_e softmax_e(scores[e, c]) * values[e, c]
with an online (running max / running sum) softmax per channel, in fp32, reading each score and value
once, and the per-node statistics max[i, c] = max_e scores[e, c] and log_sum[i, c] = log sum_e exp(scores[e, c]
- max[i, c]). This is the forward of :func:`zoo.attention.segment.segment_softmax_weighted_sum` (Point
Transformer's attention, after its MLPs). Its backward recomputes the weights from the two saved statistics,
with alpha = exp((scores - max[i]) - log_sum[i]) and g = grad_out[i] for the destination i of each edge:
    grad_values = alpha * g,    grad_scores = grad_values * (values - out[i])
(segment.py derives it). The backward kernel does this in one pass over the edges, reading scores, values
and the three per-node rows once and writing the two gradients, where the PyTorch form beside the CPU
forward (segment.py) materialises the gathered rows and alpha as [E, C] temporaries.

Why the max and the log-sum are kept apart (as zoo.kernels.edge_softmax and segment.py's _block_softmax do),
not summed into lse = max + log_sum: lse is rounded to ulp(|s|), and exp(s - lse) carried that error into every
weight (1.6e-4 relative gradient error at scores ~ 1e4, every weight wrong at 1e30), where s - max is exact next
to the maximum and log_sum is small.

Programs: forward, one per (block of BLOCK_N consecutive destinations, block of BLOCK_C channels); each
walks its nodes' edges in tiles of BLOCK_E. A node without edges, or a channel whose scores are all -inf,
gets out = 0 and the sentinels max = 0, log_sum = 0 (so the backward's exp((s - max) - log_sum) of -inf
scores is 0, never NaN). A NaN (or +inf) score gives NaN in its node's channel, as the PyTorch path and PyG's
softmax do, rather than a silent 0. Backward, one per (tile of
BLOCK_E edges, block of BLOCK_C channels), gathering the per-node rows by the edges' destination index (no
atomics: every edge's gradient is its own).

Source: the math of segment.py's CPU path (tested against segment_softmax then index_add, in float64 with
gradcheck); the online softmax follows FlashAttention-2 (Dao 2023), per channel instead of per row.
``vector_softmax_sum_ref`` below is the fp32 PyTorch reference. The two launchers have no autograd: eagerly
segment.py's autograd.Function calls them, under torch.compile its custom operators ``zoo::vector_softmax_sum``
and ``zoo::vector_softmax_sum_backward`` (one node of the compiled graph each, no graph break).

Caveats: fp32 / fp16 (and bf16 on GPU) inputs, fp32 math; under TRITON_INTERPRET=1 (CPU tensors, CI) bf16
is refused and one autotune config is used (on a GPU too with ZOO_TRITON_SINGLE_CONFIG=1). Launches run under
``torch.cuda.device`` of the inputs (kernels/_compile.py, ``on_device_of``). GPUs tested: none (this project's CI has none); verified under
the Triton interpreter against the reference (tests/test_vector_kernel.py).

Letters: E edges, N destination nodes, C channels.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

# from the GATv2 CSR kernel: the autotune key (powers of two of the destination count and mean in-degree) and
# the per-node edge range
from zoo.kernels._compile import on_device_of, single_config_requested
from zoo.kernels.edge_softmax import _node_edges, _tune_bucket

__all__ = ["vector_softmax_sum", "vector_softmax_sum_ref", "vector_softmax_sum_backward",
           "vector_softmax_sum_backward_ref", "INTERPRET"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# One autotune config: under the interpreter (it cannot benchmark), and on a GPU with ZOO_TRITON_SINGLE_CONFIG=1
# (correctness runs: tests/run_gpu_kernels.sh). Read at import, when the autotuners are built.
SINGLE_CONFIG = INTERPRET or single_config_requested()


def _configs(single: Optional[bool] = None) -> list:
    """The forward kernel's autotune configs: the tuned list, or one config when ``single`` (default
    :data:`SINGLE_CONFIG`): 16-channel blocks under the interpreter, the list's (4, 16, 32, 4 warps) on a GPU."""
    if SINGLE_CONFIG if single is None else single:
        block_c = 16 if INTERPRET else 32
        return [triton.Config({"BLOCK_N": 4, "BLOCK_E": 16, "BLOCK_C": block_c}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_E": be, "BLOCK_C": bc}, num_warps=w, num_stages=1)
        for bn in (1, 4)
        for be in (16, 32)
        for bc in (32, 64)
        for w in (2, 4)
    ]


@triton.autotune(configs=_configs(), key=["C", "tune_bucket"])
@triton.jit(do_not_specialize=["tune_bucket"])
def _vector_softmax_sum_fwd_kernel(
    s_ptr, v_ptr, rowptr_ptr, out_ptr, max_ptr, logsum_ptr,
    N, C, tune_bucket,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_n = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    for n in range(BLOCK_N):
        valid, i_safe, start, end = _node_edges(rowptr_ptr, pid_n * BLOCK_N + n, N)
        # The running max starts at -inf (any finite score, however negative, becomes the max) and is shifted
        # to 0 while still -inf, so exp() never sees -inf - (-inf).
        m = tl.full((BLOCK_C,), -float("inf"), tl.float32)
        l = tl.zeros((BLOCK_C,), tl.float32)
        acc = tl.zeros((BLOCK_C,), tl.float32)
        for e0 in range(start, end, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            mask = (offs_e < end)[:, None] & mask_c[None, :]
            ptrs = offs_e.to(tl.int64)[:, None] * C + offs_c[None, :]
            s = tl.load(s_ptr + ptrs, mask=mask, other=-float("inf")).to(tl.float32)
            v = tl.load(v_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
            m_new = tl.maximum(m, tl.max(s, axis=0))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[None, :])
            rescale = tl.exp(m - m_safe)
            l = l * rescale + tl.sum(p, axis=0)
            acc = acc * rescale + tl.sum(p * v, axis=0)
            m = m_new
        # l == 0: no edge, or all scores -inf (acc = 0 too: out 0). Not `l > 0`, which is false for a NaN l
        # (a NaN or +inf score) and turned it into a silent 0: NaN flows through, as on the PyTorch path.
        empty = l == 0
        safe_l = tl.where(empty, 1.0, l)
        out = acc / safe_l
        row = i_safe.to(tl.int64) * C + offs_c
        tl.store(out_ptr + row, out.to(out_ptr.dtype.element_ty), mask=mask_c & valid)
        tl.store(max_ptr + row, tl.where(empty, 0.0, m), mask=mask_c & valid)
        tl.store(logsum_ptr + row, tl.where(empty, 0.0, tl.log(safe_l)), mask=mask_c & valid)


def _bwd_configs(single: Optional[bool] = None) -> list:
    """The backward kernel's autotune configs: the tuned list, or one config when ``single`` (default
    :data:`SINGLE_CONFIG`): 16 x 16 tiles under the interpreter, the list's first (32, 32, 4 warps) on a GPU."""
    if SINGLE_CONFIG if single is None else single:
        tile = 16 if INTERPRET else 32
        return [triton.Config({"BLOCK_E": tile, "BLOCK_C": tile}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_E": be, "BLOCK_C": bc}, num_warps=w, num_stages=1)
        for be in (32, 64, 128)
        for bc in (32, 64)
        for w in (4, 8)
    ]


@triton.autotune(configs=_bwd_configs(), key=["C", "NEED_SCORES", "NEED_VALUES"])
@triton.jit
def _vector_softmax_sum_bwd_kernel(
    s_ptr, v_ptr, index_ptr, max_ptr, logsum_ptr, out_ptr, g_ptr, ds_ptr, dv_ptr,
    E, C,
    NEED_SCORES: tl.constexpr, NEED_VALUES: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_e = offs_e < E
    mask = mask_e[:, None] & (offs_c < C)[None, :]
    node = tl.load(index_ptr + offs_e, mask=mask_e, other=0).to(tl.int64)
    edge_rows = offs_e.to(tl.int64)[:, None] * C + offs_c[None, :]
    node_rows = node[:, None] * C + offs_c[None, :]
    s = tl.load(s_ptr + edge_rows, mask=mask, other=-float("inf")).to(tl.float32)
    row_max = tl.load(max_ptr + node_rows, mask=mask, other=0.0)
    log_sum = tl.load(logsum_ptr + node_rows, mask=mask, other=0.0)
    g = tl.load(g_ptr + node_rows, mask=mask, other=0.0).to(tl.float32)
    grad_v = tl.exp((s - row_max) - log_sum) * g  # alpha * g
    if NEED_VALUES:
        tl.store(dv_ptr + edge_rows, grad_v.to(dv_ptr.dtype.element_ty), mask=mask)
    if NEED_SCORES:
        v = tl.load(v_ptr + edge_rows, mask=mask, other=0.0).to(tl.float32)
        o = tl.load(out_ptr + node_rows, mask=mask, other=0.0).to(tl.float32)
        tl.store(ds_ptr + edge_rows, (grad_v * (v - o)).to(ds_ptr.dtype.element_ty), mask=mask)


def _check_device(name: str, dev: torch.device) -> None:
    if dev.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"{name}: tensors are on {dev}; the Triton kernel needs CUDA (or TRITON_INTERPRET=1 set "
                           "before importing zoo.kernels.vector_softmax, for CPU tensors)")


def vector_softmax_sum(scores_EC: torch.Tensor, values_EC: torch.Tensor, rowptr: torch.Tensor):
    """(out [N, C] in the inputs' dtype, row max [N, C] fp32, log-sum [N, C] fp32) for edges in CSR order
    (``rowptr`` [N + 1], the edges of node i at rowptr[i]..rowptr[i + 1] - 1); the two statistics are what
    :func:`vector_softmax_sum_backward` takes (0 and 0 where a node or channel has nothing to attend to). No
    autograd: the caller's Function owns the backward."""
    dev = scores_EC.device
    _check_device("vector_softmax_sum", dev)
    if scores_EC.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"vector_softmax_sum: dtype {scores_EC.dtype} is not supported (fp32, fp16, bf16)")
    if scores_EC.dtype == torch.bfloat16 and INTERPRET:
        raise TypeError("vector_softmax_sum: bf16 is computed wrongly by the Triton interpreter; use fp32/fp16")
    if scores_EC.dim() != 2:
        raise ValueError(f"vector_softmax_sum: scores must be [E, C] (a score per edge and channel), got shape "
                         f"{tuple(scores_EC.shape)}")
    if values_EC.shape != scores_EC.shape or values_EC.dtype != scores_EC.dtype or values_EC.device != dev:
        raise ValueError(f"vector_softmax_sum: values {tuple(values_EC.shape)} {values_EC.dtype} on "
                         f"{values_EC.device} must match scores {tuple(scores_EC.shape)} {scores_EC.dtype} on {dev}")
    if rowptr.dim() != 1 or rowptr.numel() < 1 or rowptr.device != dev:
        raise ValueError("vector_softmax_sum: rowptr must be a 1-D tensor [N + 1] on the scores' device")
    num_edges, channels = scores_EC.shape
    num_dst = rowptr.numel() - 1
    # The interpreter does not fault on out-of-bounds reads: check the bounds here.
    if int(rowptr[0]) != 0 or int(rowptr[-1]) != num_edges or (num_dst and bool((rowptr[1:] < rowptr[:-1]).any())):
        raise ValueError(f"vector_softmax_sum: rowptr must rise from 0 to E = {num_edges}")
    if num_edges * max(channels, 1) >= 2**62:
        raise ValueError("vector_softmax_sum: E * C too large")
    scores_EC, values_EC = scores_EC.contiguous(), values_EC.contiguous()
    out = torch.empty(num_dst, channels, dtype=scores_EC.dtype, device=dev)
    row_max = torch.empty(num_dst, channels, dtype=torch.float32, device=dev)
    log_sum = torch.empty(num_dst, channels, dtype=torch.float32, device=dev)
    if num_dst and channels:
        rowptr = rowptr.to(torch.int64).contiguous()
        grid = lambda meta: (triton.cdiv(num_dst, meta["BLOCK_N"]), triton.cdiv(channels, meta["BLOCK_C"]))  # noqa: E731
        with on_device_of(scores_EC):  # Triton launches on the current device: make it the tensors'
            _vector_softmax_sum_fwd_kernel[grid](scores_EC, values_EC, rowptr, out, row_max, log_sum, num_dst,
                                                 channels, _tune_bucket(num_dst, num_edges))
    return out, row_max, log_sum


def vector_softmax_sum_ref(scores_EC: torch.Tensor, values_EC: torch.Tensor, rowptr: torch.Tensor):
    """fp32 PyTorch reference: (out, row max, log-sum) from segment_softmax then index_add (a node or channel
    without a finite-weighted edge: 0, 0, 0)."""
    from zoo.attention.segment import segment_softmax

    num_dst = rowptr.numel() - 1
    index = torch.repeat_interleave(torch.arange(num_dst, device=rowptr.device), rowptr.diff())
    s, v = scores_EC.float(), values_EC.float()
    shape = (num_dst, s.size(1))
    row_max = s.new_full(shape, float("-inf")).scatter_reduce(0, index[:, None].expand_as(s), s, "amax")
    row_max = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
    total = s.new_zeros(shape).index_add(0, index, torch.exp(s - row_max[index]))
    empty = total == 0  # no edge, or every score -inf (segment_softmax gives NaN weights there; the kernel 0)
    weights = torch.where(empty[index], torch.zeros_like(s), segment_softmax(s, index, num_dst))
    out = s.new_zeros(shape).index_add(0, index, weights * v)
    log_sum = torch.where(empty, torch.zeros_like(total), total.log())
    return out, torch.where(empty, torch.zeros_like(row_max), row_max), log_sum


def vector_softmax_sum_backward(scores_EC: torch.Tensor, values_EC: torch.Tensor, index_E: torch.Tensor,
                                max_NC: torch.Tensor, log_sum_NC: torch.Tensor, out_NC: torch.Tensor,
                                grad_out_NC: torch.Tensor, need_scores: bool = True, need_values: bool = True):
    """(grad_scores, grad_values) [E, C] in the inputs' dtype (None where not needed), from the forward's saved
    row max and log-sum [N, C] fp32, ``out`` [N, C] and the output gradient [N, C]; ``index_E`` [E] is each
    edge's destination (any order: the backward needs no CSR). No autograd (the caller's Function's backward)."""
    dev = scores_EC.device
    _check_device("vector_softmax_sum_backward", dev)
    num_edges, channels = scores_EC.shape
    num_dst = max_NC.shape[0]
    if values_EC.shape != scores_EC.shape or index_E.shape != (num_edges,):
        raise ValueError(f"vector_softmax_sum_backward: scores {tuple(scores_EC.shape)}, values "
                         f"{tuple(values_EC.shape)} and index {tuple(index_E.shape)} do not describe the same edges")
    for name, t in (("max", max_NC), ("log_sum", log_sum_NC), ("out", out_NC), ("grad_out", grad_out_NC)):
        if t.shape != (num_dst, channels) or t.device != dev:
            raise ValueError(f"vector_softmax_sum_backward: {name} must be [{num_dst}, {channels}] on {dev}, got "
                             f"{tuple(t.shape)} on {t.device}")
    if max_NC.dtype != torch.float32 or log_sum_NC.dtype != torch.float32:
        raise TypeError(f"vector_softmax_sum_backward: max and log_sum must be float32 (as the forward returns "
                        f"them), got {max_NC.dtype} and {log_sum_NC.dtype}")
    # The kernel gathers the per-node rows at index_E, and the interpreter does not fault on out-of-bounds reads (a
    # GPU reads whatever lies there): check the bounds here, as the forward checks rowptr.
    if num_edges:
        low, high = (int(v) for v in index_E.aminmax())
        if low < 0 or high >= num_dst:
            raise ValueError(f"vector_softmax_sum_backward: index values must lie in [0, {num_dst}), got "
                             f"{low}..{high}")
    grad_scores = torch.empty_like(scores_EC, memory_format=torch.contiguous_format) if need_scores else None
    grad_values = torch.empty_like(values_EC, memory_format=torch.contiguous_format) if need_values else None
    if num_edges and channels and (need_scores or need_values):
        dummy = grad_scores if grad_scores is not None else grad_values

        def grid(meta):
            return triton.cdiv(num_edges, meta["BLOCK_E"]), triton.cdiv(channels, meta["BLOCK_C"])

        with on_device_of(scores_EC):
            _vector_softmax_sum_bwd_kernel[grid](
                scores_EC.contiguous(), values_EC.contiguous(), index_E.contiguous(), max_NC.contiguous(),
                log_sum_NC.contiguous(), out_NC.contiguous(), grad_out_NC.contiguous(),
                grad_scores if grad_scores is not None else dummy, grad_values if grad_values is not None else dummy,
                num_edges, channels, NEED_SCORES=need_scores, NEED_VALUES=need_values,
            )
    return grad_scores, grad_values


def vector_softmax_sum_backward_ref(scores_EC, values_EC, index_E, max_NC, log_sum_NC, out_NC, grad_out_NC):
    """fp32 PyTorch reference of the backward: (grad_scores, grad_values) [E, C] in fp32."""
    alpha = torch.exp((scores_EC.float() - max_NC.float()[index_E]) - log_sum_NC.float()[index_E])
    grad_values = alpha * grad_out_NC.float()[index_E]
    return grad_values * (values_EC.float() - out_NC.float()[index_E]), grad_values


def compile_check(arch: int = 90, dtype: torch.dtype = torch.float16, all_configs: bool = True) -> dict:
    """Compile the forward and backward kernels for sm_<arch> with Triton's bundled ptxas, without a GPU: catches
    GPU-only compile errors in CPU-only CI. Returns {"forward": [(BLOCK_N, BLOCK_E, BLOCK_C, num_warps, shared
    bytes), ...], "backward": [(BLOCK_E, BLOCK_C, num_warps, shared bytes), ...]} for every autotune config
    (``all_configs=False``: the first of each). Needs the module imported without TRITON_INTERPRET=1."""
    if INTERPRET:
        raise RuntimeError("compile_check needs zoo.kernels.vector_softmax imported without TRITON_INTERPRET=1")
    from zoo.kernels._compile import compile_for_gpu, pointer_type

    elem = pointer_type(dtype)
    fwd_types = {"s_ptr": elem, "v_ptr": elem, "rowptr_ptr": "*i64", "out_ptr": elem, "max_ptr": "*fp32",
                 "logsum_ptr": "*fp32"}
    bwd_types = {"s_ptr": elem, "v_ptr": elem, "index_ptr": "*i64", "max_ptr": "*fp32", "logsum_ptr": "*fp32",
                 "out_ptr": elem,
                 "g_ptr": elem, "ds_ptr": elem, "dv_ptr": elem}
    report: dict = {"forward": [], "backward": []}
    for config in _configs() if all_configs else _configs()[:1]:
        meta = dict(config.kwargs)
        shared = compile_for_gpu(_vector_softmax_sum_fwd_kernel, fwd_types, meta, arch, config.num_warps,
                                 config.num_stages)
        report["forward"].append((meta["BLOCK_N"], meta["BLOCK_E"], meta["BLOCK_C"], config.num_warps, shared))
    for config in _bwd_configs() if all_configs else _bwd_configs()[:1]:
        meta = dict(config.kwargs, NEED_SCORES=True, NEED_VALUES=True)
        shared = compile_for_gpu(_vector_softmax_sum_bwd_kernel, bwd_types, meta, arch, config.num_warps,
                                 config.num_stages)
        report["backward"].append((meta["BLOCK_E"], meta["BLOCK_C"], config.num_warps, shared))
    return report
