"""Vector attention's aggregation in Triton: a per-channel softmax over each destination's edges and the
weighted sum of per-edge values, over a destination-sorted CSR graph (the forward pass).

What: for every destination node i and channel c, over its incoming edges e (CSR order, rowptr[i] <=
e < rowptr[i + 1]),
    out[i, c] = sum_e softmax_e(scores[e, c]) * values[e, c],    lse[i, c] = log sum_e exp(scores[e, c])
with an online (running max / running sum) softmax per channel, in fp32, reading each score and value
once. This is the forward of :func:`zoo.attention.segment.segment_softmax_weighted_sum` (Point
Transformer's attention, after its MLPs); its backward is two gathers and three products per edge,
written in PyTorch beside the CPU forward (segment.py), and shared by both.

Programs: one per (block of BLOCK_N consecutive destinations, block of BLOCK_C channels); each walks its
nodes' edges in tiles of BLOCK_E. A node without edges gets zeros and lse = -1e30 (so the backward's
exp(score - lse) of its nonexistent edges could never be NaN).

Source: the math of segment.py's CPU path (tested against segment_softmax then index_add, in float64 with
gradcheck); the online softmax follows FlashAttention-2 (Dao 2023), per channel instead of per row.
``vector_softmax_sum_ref`` below is the fp32 PyTorch reference.

Caveats: fp32 / fp16 (and bf16 on GPU) inputs, fp32 math; under TRITON_INTERPRET=1 (CPU tensors, CI) bf16
is refused and one autotune config is used. GPUs tested: none (this project's CI has none); verified under
the Triton interpreter against the reference (tests/test_vector_kernel.py).

Letters: E edges, N destination nodes, C channels.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# the autotune key of the GATv2 CSR kernel: powers of two of the destination count and mean in-degree
from zoo.kernels.edge_softmax import _tune_bucket

__all__ = ["vector_softmax_sum", "vector_softmax_sum_ref", "INTERPRET"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
EMPTY_LSE = -1.0e30


def _configs() -> list:
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 4, "BLOCK_E": 16, "BLOCK_C": 16}, num_warps=4, num_stages=1)]
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
    s_ptr, v_ptr, rowptr_ptr, out_ptr, lse_ptr,
    N, C, tune_bucket,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_n = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    for n in range(BLOCK_N):
        i = pid_n * BLOCK_N + n
        valid = i < N
        i_safe = tl.minimum(i, N - 1)
        start = tl.load(rowptr_ptr + i_safe)
        end = tl.load(rowptr_ptr + i_safe + 1)
        end = tl.where(valid, end, start)
        m = tl.full((BLOCK_C,), -1.0e30, tl.float32)
        l = tl.zeros((BLOCK_C,), tl.float32)
        acc = tl.zeros((BLOCK_C,), tl.float32)
        for e0 in range(start, end, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            mask = (offs_e < end)[:, None] & mask_c[None, :]
            ptrs = offs_e.to(tl.int64)[:, None] * C + offs_c[None, :]
            s = tl.load(s_ptr + ptrs, mask=mask, other=-float("inf")).to(tl.float32)
            v = tl.load(v_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
            m_new = tl.maximum(m, tl.max(s, axis=0))
            p = tl.exp(s - m_new[None, :])
            rescale = tl.exp(m - m_new)
            l = l * rescale + tl.sum(p, axis=0)
            acc = acc * rescale + tl.sum(p * v, axis=0)
            m = m_new
        has = l > 0
        safe_l = tl.where(has, l, 1.0)
        out = tl.where(has, acc / safe_l, 0.0)
        lse = tl.where(has, m + tl.log(safe_l), -1.0e30)
        row = i_safe.to(tl.int64) * C + offs_c
        tl.store(out_ptr + row, out.to(out_ptr.dtype.element_ty), mask=mask_c & valid)
        tl.store(lse_ptr + row, lse, mask=mask_c & valid)


def vector_softmax_sum(scores_EC: torch.Tensor, values_EC: torch.Tensor, rowptr: torch.Tensor):
    """(out [N, C] in the inputs' dtype, lse [N, C] fp32) for edges in CSR order (``rowptr`` [N + 1], the
    edges of node i at rowptr[i]..rowptr[i + 1] - 1). No autograd: the caller's Function owns the backward."""
    dev = scores_EC.device
    if dev.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"vector_softmax_sum: tensors are on {dev}; the Triton kernel needs CUDA (or "
                           "TRITON_INTERPRET=1 set before importing zoo.kernels.vector_softmax, for CPU tensors)")
    if scores_EC.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"vector_softmax_sum: dtype {scores_EC.dtype} is not supported (fp32, fp16, bf16)")
    if scores_EC.dtype == torch.bfloat16 and INTERPRET:
        raise TypeError("vector_softmax_sum: bf16 is computed wrongly by the Triton interpreter; use fp32/fp16")
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
    lse = torch.empty(num_dst, channels, dtype=torch.float32, device=dev)
    if num_dst and channels:
        rowptr = rowptr.to(torch.int64).contiguous()
        grid = lambda meta: (triton.cdiv(num_dst, meta["BLOCK_N"]), triton.cdiv(channels, meta["BLOCK_C"]))  # noqa: E731
        _vector_softmax_sum_fwd_kernel[grid](scores_EC, values_EC, rowptr, out, lse, num_dst, channels,
                                             _tune_bucket(num_dst, num_edges))
    return out, lse


def vector_softmax_sum_ref(scores_EC: torch.Tensor, values_EC: torch.Tensor, rowptr: torch.Tensor):
    """fp32 PyTorch reference: (out, lse) from segment_softmax then index_add (empty nodes: 0, -1e30)."""
    from zoo.attention.segment import segment_softmax

    num_dst = rowptr.numel() - 1
    index = torch.repeat_interleave(torch.arange(num_dst, device=rowptr.device), rowptr.diff())
    s, v = scores_EC.float(), values_EC.float()
    shape = (num_dst, s.size(1))
    out = s.new_zeros(shape).index_add(0, index, segment_softmax(s, index, num_dst) * v)
    lse = s.new_full(shape, float("-inf")).scatter_reduce(0, index[:, None].expand_as(s), s, "amax")
    has = s.new_zeros(shape).index_add(0, index, torch.ones_like(s)) > 0
    lse = torch.where(has, lse, torch.zeros_like(lse))
    lse = lse + s.new_zeros(shape).index_add(0, index, torch.exp(s - lse[index])).log()
    return out, torch.where(has, lse, torch.full_like(lse, EMPTY_LSE))


def compile_check(arch: int = 90, dtype: torch.dtype = torch.float16, all_configs: bool = True) -> list:
    """Compile the forward kernel for sm_<arch> with Triton's bundled ptxas, without a GPU: catches GPU-only
    compile errors in CPU-only CI. Returns [(BLOCK_N, BLOCK_E, BLOCK_C, num_warps, shared bytes), ...] for every
    autotune config (``all_configs=False``: the first). Needs the module imported without TRITON_INTERPRET=1."""
    if INTERPRET:
        raise RuntimeError("compile_check needs zoo.kernels.vector_softmax imported without TRITON_INTERPRET=1")
    from zoo.kernels._compile import compile_for_gpu, pointer_type

    elem = pointer_type(dtype)
    types = {"s_ptr": elem, "v_ptr": elem, "rowptr_ptr": "*i64", "out_ptr": elem, "lse_ptr": "*fp32"}
    report = []
    for config in _configs() if all_configs else _configs()[:1]:
        meta = dict(config.kwargs)
        shared = compile_for_gpu(_vector_softmax_sum_fwd_kernel, types, meta, arch, config.num_warps,
                                 config.num_stages)
        report.append((meta["BLOCK_N"], meta["BLOCK_E"], meta["BLOCK_C"], config.num_warps, shared))
    return report
