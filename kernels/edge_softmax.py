"""Fused GATv2 edge softmax in Triton: forward and backward over a destination-sorted CSR graph.

What: for every destination node i and head h,
    s_ji = a_h . LeakyReLU(xs[j, h] + xd[i, h] + (W_e e_ji)_h)        over the incoming edges j -> i
    out[i, h] = sum_j softmax_j(s_ji) * keep_jih / (1 - p) * xs[j, h]
with an online (running max / running sum) softmax, so no [E, H, C] tensor exists in forward or
backward: only the per-node row max [Nd, H] is kept for the backward. The edge projection W_e e_ji
(edge_dim D, small) is computed inside the kernel from edge_attr [E, D] and W_e [H*C, D].

The scores come from one @triton.jit helper (``_edge_scores``) in the forward and both backward passes, so
all three compute them bit for bit alike. (Under the interpreter, nested jit calls need TRITON_INTERPRET=1 set
before triton.language is first imported: tests/triton_interpreter.py runs the tests in a fresh process otherwise.)

Programs: one per (block of BLOCK_N consecutive destination nodes, head). Each walks its nodes' CSR
segments in tiles of BLOCK_E edges x BLOCK_C channels (C padded to a power of two).

Backward: the same programs walk each node's edges twice, recomputing s and u_j = keep'_j * g_i . xs_j
(dL/d alpha_j):
    pass 1: p_j = exp(s_j - max_i) (the forward's row max), L_i = sum_j p_j and delta_i = sum_j alpha_j u_j,
            kept as delta_i - u_ref = sum_j p_j (u_j - u_ref) / L_i about a pivot u_ref, the u of a
            highest-scored edge (a later tile with a higher score moves the pivot: the sum so far is shifted
            by (old - new pivot) * its L, an error relative to those earlier, lighter edges);
    pass 2: alpha_j = p_j / L_i (PyG's softmax, exp(s - max) / sum) and
            ds_j = alpha_j ((u_j - u_ref) - (delta_i - u_ref)), then
    dxd[i]  = sum_j ds * a * LeakyReLU'(z)            (owned by the program: plain store)
    dxs[j] += ds * a * LeakyReLU'(z) + alpha' * g_i    (atomic add into an fp32 buffer)
    da     += sum ds * LeakyReLU(z)                      (per-program partials, summed in PyTorch)
    dW_e, de from dz (per-program partials / per-head buffers, summed in PyTorch).
Why two passes and a pivot: in a saturated (nearly one-hot) softmax the leading edge's u_j - delta_i is a
small difference of two numbers of size |u|. FlashAttention-2's delta_i = g_i . out_i, computed in PyTorch
in another summation order than u, made it rounding noise of ulp(|u|) (d att 10-500x less accurate than
PyG's fp32); sum_j alpha_j u_j in the kernel from exp((s - max) - log_sum) weights, whose sum misses 1 by a
few ulp, still left 18x. About the pivot the leading edge's difference is the other edges' weighted
differences, accurate relative to their small weights: as accurate as PyG's fp32, or more, on the saturated
problems of tests/test_graph_kernel.py.

Source: the math of zoo/attention/segment.py (the CPU path, checked against PyG's GATv2Conv; PyG's softmax
gradient is alpha_j (u_j - sum_k alpha_k u_k)); the online softmax follows FlashAttention-2 (Dao 2023) and
Triton's 06-fused-attention tutorial (read, not copied); the pivot is the shifted-data sum of Chan, Golub &
LeVeque, "Algorithms for computing the sample variance" (1983). ``gatv2_edge_softmax_ref`` below is the fp32
PyTorch reference.

Caveats:
* fp32 / fp16 (and bf16 on GPU) inputs; math in fp32; dxs is accumulated with fp32 atomics, so its
  summation order (and the last bits) vary between runs on a GPU.
* Under TRITON_INTERPRET=1 (CPU tensors, CI) bf16 is refused (the interpreter computes it wrongly),
  and one autotune config is used (on a GPU too with ZOO_TRITON_SINGLE_CONFIG=1). Launches run under
  ``torch.cuda.device`` of the inputs (kernels/_compile.py, ``on_device_of``). Out-of-bounds reads are silent in the interpreter: the launcher
  checks every input's shape and every index bound first.
* C <= 256 and edge_dim <= 64 (an unrolled loop): ``MAX_CHANNELS``, ``MAX_EDGE_DIM``. The launcher refuses more;
  under ``impl="auto"`` zoo/attention/segment.py sends a larger layer to its PyTorch path instead.
* The launchers ``_forward`` / ``_backward`` (no autograd) are run by the eager autograd.Function and, under
  torch.compile, by the custom operators ``zoo::gatv2_edge_softmax`` and its backward (zoo/attention/segment.py), so a
  compiled layer keeps the kernel inside one graph (``fullgraph=True``).
* The backward computes every score twice (its two passes) and reads xs twice: the price of the
  saturated-softmax accuracy above (no GPU timing here).

GPUs tested: none (this project's CI has no GPU); verified under the Triton 3.6 interpreter on CPU
against the reference in fp32 and fp16 (tests/test_graph_kernel.py).

Letters: E edges, Ns/Nd source/destination nodes, H heads, C channels per head, D edge features,
BLOCK_N nodes per program, BLOCK_E edges per tile, BLOCK_C padded channels.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from zoo.kernels._compile import on_device_of, single_config_requested
from zoo.layers import refuse_double_backward

__all__ = ["gatv2_edge_softmax", "gatv2_edge_softmax_ref", "INTERPRET"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The kernel's limits (module docstring, Caveats): channels per head and edge-feature width. _check refuses more;
# zoo/attention/segment.py reads them to send a larger layer to the PyTorch path under impl="auto".
MAX_CHANNELS = 256
MAX_EDGE_DIM = 64
# One autotune config: under the interpreter (it cannot benchmark), and on a GPU with ZOO_TRITON_SINGLE_CONFIG=1
# (correctness runs: tests/run_gpu_kernels.sh). Read at import, when the autotuners are built.
SINGLE_CONFIG = INTERPRET or single_config_requested()


# ----------------------------------------------------------------------------------------------------
# Autotune configs
# ----------------------------------------------------------------------------------------------------
def _configs(single: Optional[bool] = None) -> list:
    """The autotune configs of both kernels: the tuned list, or its one (BLOCK_N 4, BLOCK_E 16, 4 warps) config when
    ``single`` (default :data:`SINGLE_CONFIG`)."""
    if SINGLE_CONFIG if single is None else single:
        return [triton.Config({"BLOCK_N": 4, "BLOCK_E": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_E": be}, num_warps=w, num_stages=1)
        for bn in (1, 4, 16)
        for be in (16, 32, 64)
        for w in (2, 4)
    ]


# ``tune_bucket`` (:func:`_tune_bucket`): the best nodes per program and edge chunk depend on the graph's size
# and mean in-degree, so both (rounded up to powers of two) are in the key: a later graph of another shape is
# not served the first graph's configuration, and mini-batches of similar graphs do not re-tune every step.
_KEY = ["H", "C", "D", "HAS_EDGE", "HAS_KEEP", "tune_bucket"]


def _tune_bucket(num_dst: int, num_edges: int) -> int:
    """ceil(log2) of the destination count and of the mean in-degree (host-side integers: no device sync)."""
    mean_degree = -(-num_edges // max(num_dst, 1))
    return (max(num_dst, 1) - 1).bit_length() * 64 + (max(mean_degree, 1) - 1).bit_length()


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _node_edges(rowptr_ptr, i, N):
    """(valid, i_safe, start, end) of destination node i in CSR order: its edges are start..end - 1; a node past
    the last (i >= N, the tail of the last block) reads node N - 1's pointers and gets no edge."""
    valid = i < N
    i_safe = tl.minimum(i, N - 1)
    start = tl.load(rowptr_ptr + i_safe)
    end = tl.load(rowptr_ptr + i_safe + 1)
    return valid, i_safe, start, tl.where(valid, end, start)


@triton.jit
def _edge_scores(xs_ptr, ea_ptr, we_ptr, col_ptr, xd_row, att_row, e0, end, h, slope, offs_c, mask_c,
                 H: tl.constexpr, C: tl.constexpr, D: tl.constexpr, HAS_EDGE: tl.constexpr, BLOCK_E: tl.constexpr):
    """One tile of BLOCK_E edges from e0 (those before ``end``), head h: (offs_e, mask_e, xs_offs, xs_tile, z, lz, s)
    with z = xs_j + xd_i (+ W_e e_ji), lz = LeakyReLU(z) and the scores s = a . lz (-inf past ``end``). The
    forward and both backward passes call this one function, so they recompute bit-identical scores. The edge
    offsets are int64 whatever rowptr's dtype: E * D may pass 2**31."""
    offs_e = (e0 + tl.arange(0, BLOCK_E)).to(tl.int64)
    mask_e = offs_e < end
    mask_ec = mask_e[:, None] & mask_c[None, :]
    src = tl.load(col_ptr + offs_e, mask=mask_e, other=0).to(tl.int64)
    xs_offs = (src[:, None] * H + h) * C + offs_c[None, :]
    xs_tile = tl.load(xs_ptr + xs_offs, mask=mask_ec, other=0.0).to(tl.float32)
    z = xs_tile + xd_row[None, :]
    if HAS_EDGE:
        for d in tl.static_range(D):
            e_d = tl.load(ea_ptr + offs_e * D + d, mask=mask_e, other=0.0).to(tl.float32)
            w_d = tl.load(we_ptr + (h * C + offs_c) * D + d, mask=mask_c, other=0.0).to(tl.float32)
            z += e_d[:, None] * w_d[None, :]
    lz = tl.where(z > 0, z, z * slope)
    s = tl.sum(lz * att_row[None, :], axis=1)
    s = tl.where(mask_e, s, -float("inf"))
    return offs_e, mask_e, xs_offs, xs_tile, z, lz, s


@triton.jit
def _keep_weights(keep_ptr, offs_e, mask_e, h, keep_scale, H: tl.constexpr):
    """keep'_e = keep[e, h] / (1 - p) of the tile's edges (0 for a dropped edge)."""
    return tl.load(keep_ptr + offs_e * H + h, mask=mask_e, other=0).to(tl.float32) * keep_scale


@triton.jit
def _head_edge_offsets(h, E, offs_e, D: tl.constexpr):
    """Element offsets of edges offs_e of head h in an [H, E, D] buffer, in int64: H * E * D may pass 2**31
    (h * E in int32 wraps once (H - 1) * E reaches 2**31)."""
    return (h.to(tl.int64) * E + offs_e.to(tl.int64)) * D


@triton.autotune(configs=_configs(), key=_KEY)
@triton.jit(do_not_specialize=["tune_bucket"])
def _gatv2_fwd_kernel(
    xs_ptr, xd_ptr, att_ptr, ea_ptr, we_ptr, rowptr_ptr, col_ptr, keep_ptr,
    out_ptr, max_ptr, logsum_ptr, s_ptr,
    Nd, slope, keep_scale, tune_bucket,
    H: tl.constexpr, C: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_EDGE: tl.constexpr, HAS_KEEP: tl.constexpr, STORE_S: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    att_row = tl.load(att_ptr + h * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    for n in range(BLOCK_N):
        valid, i_safe, start, end = _node_edges(rowptr_ptr, pid * BLOCK_N + n, Nd)
        xd_row = tl.load(xd_ptr + (i_safe.to(tl.int64) * H + h) * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        m = tl.full((), -float("inf"), tl.float32)  # shifted to 0 below while still -inf (no -inf - (-inf))
        l = tl.zeros((), tl.float32)
        acc = tl.zeros((BLOCK_C,), tl.float32)
        for e0 in range(start, end, BLOCK_E):
            offs_e, mask_e, _, xs_tile, _, _, s = _edge_scores(
                xs_ptr, ea_ptr, we_ptr, col_ptr, xd_row, att_row, e0, end, h, slope, offs_c, mask_c,
                H, C, D, HAS_EDGE, BLOCK_E)
            if STORE_S:
                tl.store(s_ptr + offs_e * H + h, s, mask=mask_e)
            m_new = tl.maximum(m, tl.max(s, axis=0))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            p = tl.exp(s - m_safe)
            rescale = tl.exp(m - m_safe)
            l = l * rescale + tl.sum(p, axis=0)
            if HAS_KEEP:
                p = p * _keep_weights(keep_ptr, offs_e, mask_e, h, keep_scale, H)
            acc = acc * rescale + tl.sum(p[:, None] * xs_tile, axis=0)
            m = m_new
        # l == 0: no edge (acc = 0 too: out 0). Not `l > 0`, which is false for a NaN l (a NaN or +inf score)
        # and turned it into a silent 0: NaN flows through, as on the PyTorch path and in PyG's GATv2Conv.
        empty = l == 0
        safe_l = tl.where(empty, 1.0, l)
        out = acc / safe_l
        # the row max and the log-sum, kept apart for the returned weights exp((s - max) - log_sum): their sum
        # (the log-sum-exp) is rounded to ulp(|s|), an error every weight would carry for large scores
        log_sum = tl.where(empty, 0.0, tl.log(safe_l))
        tl.store(out_ptr + (i_safe.to(tl.int64) * H + h) * C + offs_c, out.to(out_ptr.dtype.element_ty),
                 mask=mask_c & valid)
        tl.store(max_ptr + i_safe * H + h, m, mask=valid)
        tl.store(logsum_ptr + i_safe * H + h, log_sum, mask=valid)


@triton.autotune(configs=_configs(), key=_KEY, reset_to_zero=["dxs_ptr", "datt_ptr", "dwe_ptr", "dea_ptr"])
@triton.jit(do_not_specialize=["tune_bucket"])
def _gatv2_bwd_kernel(
    xs_ptr, xd_ptr, att_ptr, ea_ptr, we_ptr, rowptr_ptr, col_ptr, keep_ptr,
    g_ptr, max_ptr,
    dxs_ptr, dxd_ptr, datt_ptr, dwe_ptr, dea_ptr,
    Nd, E, slope, keep_scale, tune_bucket,
    H: tl.constexpr, C: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_EDGE: tl.constexpr, HAS_KEEP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    att_row = tl.load(att_ptr + h * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    datt_acc = tl.zeros((BLOCK_C,), tl.float32)
    for n in range(BLOCK_N):
        valid, i_safe, start, end = _node_edges(rowptr_ptr, pid * BLOCK_N + n, Nd)
        row_off = (i_safe.to(tl.int64) * H + h) * C
        xd_row = tl.load(xd_ptr + row_off + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        g_row = tl.load(g_ptr + row_off + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        row_max = tl.load(max_ptr + i_safe * H + h)
        row_max = tl.where(row_max == -float("inf"), 0.0, row_max)  # all scores -inf: every weight 0, no NaN
        # pass 1 over the node's edges: p_sum = sum_j p_j with p_j = exp(s_j - max), a pivot u_ref (u of a
        # highest-scored edge) and shifted = sum_j p_j (u_j - u_ref), u_j = keep'_j * g_i . xs_j (module docstring)
        p_sum = tl.zeros((), tl.float32)
        pivot_s = tl.full((), -float("inf"), tl.float32)
        pivot = tl.zeros((), tl.float32)
        shifted = tl.zeros((), tl.float32)
        for e0 in range(start, end, BLOCK_E):
            offs_e, mask_e, _, xs_tile, _, _, s = _edge_scores(
                xs_ptr, ea_ptr, we_ptr, col_ptr, xd_row, att_row, e0, end, h, slope, offs_c, mask_c,
                H, C, D, HAS_EDGE, BLOCK_E)
            p = tl.exp(s - row_max)
            u = tl.sum(xs_tile * g_row[None, :], axis=1)
            if HAS_KEEP:
                u = u * _keep_weights(keep_ptr, offs_e, mask_e, h, keep_scale, H)
            tile_max = tl.max(s, axis=0)
            tile_pivot = tl.max(tl.where(s == tile_max, u, -float("inf")), axis=0)
            new_pivot = tl.where(tile_max > pivot_s, tile_pivot, pivot)
            # rebase the earlier tiles' sum onto a new pivot: its rounding is relative to their (smaller) weight
            shifted += (pivot - new_pivot) * p_sum
            shifted += tl.sum(p * (u - new_pivot), axis=0)
            pivot = new_pivot
            pivot_s = tl.maximum(pivot_s, tile_max)
            p_sum += tl.sum(p, axis=0)
        p_sum = tl.where(p_sum > 0, p_sum, 1.0)
        delta_shift = shifted / p_sum  # delta_i - u_ref, delta_i = sum_j alpha_j u_j
        # pass 2: the gradients, from the same scores, weights and u
        dxd_acc = tl.zeros((BLOCK_C,), tl.float32)
        for e0 in range(start, end, BLOCK_E):
            offs_e, mask_e, xs_offs, xs_tile, z, lz, s = _edge_scores(
                xs_ptr, ea_ptr, we_ptr, col_ptr, xd_row, att_row, e0, end, h, slope, offs_c, mask_c,
                H, C, D, HAS_EDGE, BLOCK_E)
            mask_ec = mask_e[:, None] & mask_c[None, :]
            alpha = tl.exp(s - row_max) / p_sum
            u = tl.sum(xs_tile * g_row[None, :], axis=1)  # dL/d alpha_eff
            if HAS_KEEP:
                k = _keep_weights(keep_ptr, offs_e, mask_e, h, keep_scale, H)
                a_eff = alpha * k
                u = u * k
            else:
                a_eff = alpha
            ds = alpha * ((u - pivot) - delta_shift)  # alpha_j (u_j - delta_i)
            datt_acc += tl.sum(ds[:, None] * lz, axis=0)
            dz = ds[:, None] * att_row[None, :] * tl.where(z > 0, 1.0, slope)
            dz = tl.where(mask_ec, dz, 0.0)
            dxd_acc += tl.sum(dz, axis=0)
            if HAS_EDGE:
                for d in tl.static_range(D):
                    e_d = tl.load(ea_ptr + offs_e * D + d, mask=mask_e, other=0.0).to(tl.float32)
                    # dW_e[h*C + c, d] += sum_e dz[e, c] * ea[e, d]   (per-program partial row block)
                    part = tl.sum(dz * e_d[:, None], axis=0)
                    tl.atomic_add(dwe_ptr + (h * C + offs_c) * D + d, part, mask=mask_c)
                    # de[e, d] (head h's share) = sum_c dz[e, c] * W_e[h*C + c, d]
                    w_d = tl.load(we_ptr + (h * C + offs_c) * D + d, mask=mask_c, other=0.0).to(tl.float32)
                    tl.store(dea_ptr + _head_edge_offsets(h, E, offs_e, D) + d, tl.sum(dz * w_d[None, :], axis=1),
                             mask=mask_e)
            dxs_tile = dz + a_eff[:, None] * g_row[None, :]
            tl.atomic_add(dxs_ptr + xs_offs, dxs_tile, mask=mask_ec)
        tl.store(dxd_ptr + row_off + offs_c, dxd_acc, mask=mask_c & valid)
    tl.atomic_add(datt_ptr + h * C + offs_c, datt_acc, mask=mask_c)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
def _check(xs, xd, att, csr, edge_attr, edge_weight, keep, dropout: Optional[float] = None):
    """Every input against the graph and x_src's [Ns, H, C], before any launch: the kernels index the tensors by the
    CSR and by H, C, D alone, and an out-of-bounds read is silent under the interpreter (garbage or an illegal
    address on a GPU). The same shapes as :func:`zoo.attention.segment.gatv2_attention` checks, named for this
    entry point. ``dropout`` (the public function's; None from the compiled operator, whose caller checked it): a
    keep-mask needs 0 < dropout < 1."""
    for name, t in (("x_src", xs), ("x_dst", xd), ("att", att)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"gatv2_edge_softmax: {name} must be a tensor, got {type(t).__name__}")
    if xs.dim() != 3:
        raise ValueError(f"gatv2_edge_softmax: x_src must be [Ns, H, C], got {tuple(xs.shape)}")
    dev = xs.device
    if dev.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"gatv2_edge_softmax: tensors are on {dev}; the Triton kernel needs CUDA (or TRITON_INTERPRET=1 "
            "set before importing zoo.kernels.edge_softmax, for CPU tensors)"
        )
    if xs.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"gatv2_edge_softmax: dtype {xs.dtype} is not supported (fp32, fp16, bf16)")
    if xs.dtype == torch.bfloat16 and INTERPRET:
        raise TypeError("gatv2_edge_softmax: bf16 is computed wrongly by the Triton interpreter; use fp32/fp16")
    for name, t in (("x_dst", xd), ("att", att), ("edge_attr", edge_attr), ("edge_weight", edge_weight)):
        if t is not None and (t.dtype != xs.dtype or t.device != dev):
            raise TypeError(f"gatv2_edge_softmax: {name} is {t.dtype} on {t.device}, x_src is {xs.dtype} on {dev}")
    H, C = xs.shape[1], xs.shape[2]
    E, Nd = csr.num_edges, csr.num_dst
    if tuple(xd.shape) != (Nd, H, C):
        raise ValueError(f"gatv2_edge_softmax: x_dst must be [Nd={Nd}, H={H}, C={C}] (the graph's destination "
                         f"nodes, x_src's heads and channels), got {tuple(xd.shape)}")
    if tuple(att.shape) != (H, C):
        raise ValueError(f"gatv2_edge_softmax: att must be [H={H}, C={C}], got {tuple(att.shape)}")
    if (edge_attr is None) != (edge_weight is None):
        raise ValueError("gatv2_edge_softmax: edge_attr and edge_weight go together (both or neither)")
    if edge_attr is not None:
        if edge_attr.dim() != 2 or edge_attr.size(0) != E:
            raise ValueError(f"gatv2_edge_softmax: edge_attr must be [E={E}, D] in CSR order, got "
                             f"{tuple(edge_attr.shape)}")
        if tuple(edge_weight.shape) != (H * C, edge_attr.size(1)):
            raise ValueError(f"gatv2_edge_softmax: edge_weight must be [H*C={H * C}, D={edge_attr.size(1)}], got "
                             f"{tuple(edge_weight.shape)}")
    if C > MAX_CHANNELS:
        raise ValueError(f"gatv2_edge_softmax: C={C} channels per head > {MAX_CHANNELS} are not supported")
    if edge_attr is not None and edge_attr.size(1) > MAX_EDGE_DIM:
        raise ValueError(f"gatv2_edge_softmax: edge_dim={edge_attr.size(1)} > {MAX_EDGE_DIM} is not supported")
    if E >= 2**31 or Nd * H >= 2**31:
        raise ValueError("gatv2_edge_softmax: E and Nd*H must stay below 2**31")
    if keep is not None:
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != (E, H):
            got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
            raise ValueError(f"gatv2_edge_softmax: keep (the dropout keep-mask) must be a bool tensor of shape "
                             f"(E={E}, H={H}) in CSR order, got {got}")
        if keep.device != dev:
            raise ValueError(f"gatv2_edge_softmax: keep is on {keep.device}, x_src on {dev}")
        if dropout is not None and not 0.0 < dropout < 1.0:
            raise ValueError(f"gatv2_edge_softmax: a dropout keep-mask needs 0 < dropout < 1, got {dropout}")
    # The interpreter does not fault on out-of-bounds reads: check the graph's index bounds here.
    if csr.rowptr.dim() != 1 or csr.rowptr.numel() != Nd + 1:
        raise ValueError(f"gatv2_edge_softmax: CSR rowptr must be [Nd + 1 = {Nd + 1}], got {tuple(csr.rowptr.shape)}")
    if E:
        if int(csr.col.min()) < 0 or int(csr.col.max()) >= xs.size(0):
            raise ValueError("gatv2_edge_softmax: a CSR source index is out of range")
        if int(csr.rowptr[-1]) != E or int(csr.rowptr[0]) != 0:
            raise ValueError("gatv2_edge_softmax: CSR rowptr does not span the edges")
        if Nd > 1 and not bool((csr.rowptr[1:] >= csr.rowptr[:-1]).all()):
            raise ValueError("gatv2_edge_softmax: CSR rowptr is not non-decreasing (a node's edges would lie past "
                             "the edge list)")


def _grid(Nd, H):
    return lambda meta: (triton.cdiv(max(Nd, 1), meta["BLOCK_N"]), H)


def _launch_inputs(xs, xd, att, ea, we, keep):
    """(edge feature width D, then the tensors as the kernels read them: contiguous, the keep-mask as int8)."""
    D = 0 if ea is None else ea.shape[1]
    contiguous = [None if t is None else t.contiguous() for t in (xs, xd, att, ea, we)]
    return (D, *contiguous, None if keep is None else keep.to(torch.int8).contiguous())


def _forward(xs, xd, att, ea, we, csr, slope, keep, dropout, need_weights):
    """The forward launch on checked inputs (no autograd) -> (out [Nd, H, C] in xs's dtype, alpha [E, H] in xs's
    dtype or None, row_max [Nd, H] fp32, what :func:`_backward` takes). The eager autograd.Function below and the
    custom operator ``zoo::gatv2_edge_softmax`` of torch.compile (zoo/attention/segment.py) both run it."""
    Nd, H, C = csr.num_dst, xs.shape[1], xs.shape[2]
    D, xs, xd, att, ea, we, keep_i8 = _launch_inputs(xs, xd, att, ea, we, keep)
    out = torch.empty(Nd, H, C, dtype=xs.dtype, device=xs.device)  # the kernel accumulates in fp32
    row_max = torch.empty(Nd, H, dtype=torch.float32, device=xs.device)
    log_sum = torch.empty(Nd, H, dtype=torch.float32, device=xs.device)
    s = torch.empty(csr.num_edges, H, dtype=torch.float32, device=xs.device) if need_weights else log_sum
    dummy = att
    kscale = _keep_scale(keep, dropout)
    if Nd:
        with on_device_of(xs):  # Triton launches on the current device: make it the tensors'
            _gatv2_fwd_kernel[_grid(Nd, H)](
                xs, xd, att, ea if ea is not None else dummy, we if we is not None else dummy,
                csr.rowptr, csr.col, keep_i8 if keep_i8 is not None else dummy,
                out, row_max, log_sum, s, Nd, float(slope), float(kscale), _tune_bucket(Nd, csr.num_edges),
                H=H, C=C, D=D, BLOCK_C=max(16, triton.next_power_of_2(C)),
                HAS_EDGE=ea is not None, HAS_KEEP=keep is not None, STORE_S=bool(need_weights),
            )
    if not need_weights:
        return out, None, row_max
    alpha = torch.exp((s - row_max[csr.row]) - log_sum[csr.row])
    if keep is not None:
        alpha = alpha * keep.to(alpha.dtype) * kscale
    return out, alpha.to(xs.dtype), row_max


def _backward(g, xs, xd, att, ea, we, keep, row_max, csr, slope, dropout):
    """The backward launch (no autograd) from the forward's inputs, keep-mask (bool) and row max -> the gradients
    of (xs, xd, att, ea, we) in their dtypes, None for an absent ea / we. Run by the autograd.Function below and
    by the custom operator ``zoo::gatv2_edge_softmax_backward`` (zoo/attention/segment.py)."""
    Nd, H, C = csr.num_dst, xs.shape[1], xs.shape[2]
    D, xs, xd, att, ea, we, keep_i8 = _launch_inputs(xs, xd, att, ea, we, keep)
    g = g.contiguous()
    dxs = torch.zeros(xs.shape, dtype=torch.float32, device=xs.device)
    dxd = torch.zeros(xd.shape, dtype=torch.float32, device=xs.device)
    datt = torch.zeros(H, C, dtype=torch.float32, device=xs.device)
    dwe = torch.zeros(H * C, max(D, 1), dtype=torch.float32, device=xs.device)
    dea = torch.zeros(H, csr.num_edges, max(D, 1), dtype=torch.float32, device=xs.device) if D else dwe
    dummy = att
    if Nd:
        with on_device_of(xs):
            _gatv2_bwd_kernel[_grid(Nd, H)](
                xs, xd, att, ea if ea is not None else dummy, we if we is not None else dummy,
                csr.rowptr, csr.col, keep_i8 if keep_i8 is not None else dummy,
                g, row_max.contiguous(), dxs, dxd, datt, dwe, dea,
                Nd, csr.num_edges, float(slope), float(_keep_scale(keep, dropout)), _tune_bucket(Nd, csr.num_edges),
                H=H, C=C, D=D, BLOCK_C=max(16, triton.next_power_of_2(C)),
                HAS_EDGE=ea is not None, HAS_KEEP=keep_i8 is not None,
            )
    return (dxs.to(xs.dtype), dxd.to(xd.dtype), datt.to(att.dtype), None if ea is None else dea.sum(0).to(ea.dtype),
            None if we is None else dwe.to(we.dtype))


def _keep_scale(keep, dropout) -> float:
    return 1.0 / (1.0 - dropout) if keep is not None else 1.0


class _GATv2EdgeSoftmax(torch.autograd.Function):
    """Eager autograd of the kernel: :func:`_forward`, and :func:`_backward` from the saved inputs and row max."""

    @staticmethod
    def forward(ctx, xs, xd, att, ea, we, csr, slope, keep, dropout, need_weights):
        out, alpha, row_max = _forward(xs, xd, att, ea, we, csr, slope, keep, dropout, need_weights)
        ctx.save_for_backward(xs, xd, att, ea, we, keep, row_max)
        ctx.csr, ctx.slope, ctx.dropout = csr, float(slope), float(dropout)
        if alpha is not None:
            ctx.mark_non_differentiable(alpha)
        return out, alpha

    @staticmethod
    def backward(ctx, g, _g_alpha):
        refuse_double_backward("the Triton GATv2 kernel", "use torch_geometric.nn.GATv2Conv, which loads this "
                               "layer's state dict")
        xs, xd, att, ea, we, keep, row_max = ctx.saved_tensors
        grads = _backward(g, xs, xd, att, ea, we, keep, row_max, ctx.csr, ctx.slope, ctx.dropout)
        return (*grads, None, None, None, None, None)


def gatv2_edge_softmax(xs_NHC, xd_NHC, att_HC, csr, *, edge_attr=None, edge_weight=None, negative_slope=0.2,
                       keep: Optional[torch.Tensor] = None, dropout: float = 0.0, need_weights: bool = False):
    """Fused GATv2 attention (see the module docstring); arguments and return as
    :func:`zoo.attention.segment.gatv2_attention`: (out [Nd, H, C], alpha [E, H] in CSR order or None). Every input
    is checked against the graph and x_src's [Ns, H, C] before any launch (:func:`_check`): a wrong shape, dtype or
    device is a ValueError / TypeError naming the argument, not a read past the end of a tensor."""
    if not isinstance(xs_NHC, torch.Tensor):
        raise TypeError(f"gatv2_edge_softmax: x_src must be a tensor, got {type(xs_NHC).__name__}")
    csr = csr.to(xs_NHC.device)
    _check(xs_NHC, xd_NHC, att_HC, csr, edge_attr, edge_weight, keep, float(dropout))
    return _GATv2EdgeSoftmax.apply(xs_NHC, xd_NHC, att_HC, edge_attr, edge_weight, csr, negative_slope, keep,
                                   float(dropout), bool(need_weights))


def gatv2_edge_softmax_ref(xs_NHC, xd_NHC, att_HC, csr, *, edge_attr=None, edge_weight=None, negative_slope=0.2,
                           keep=None, dropout=0.0):
    """fp32 PyTorch reference of the kernel (unfused, [E, H, C] tensors): (out, alpha)."""
    from zoo.attention.segment import gatv2_attention_ref

    f = lambda t: None if t is None else t.float()  # noqa: E731
    return gatv2_attention_ref(f(xs_NHC), f(xd_NHC), f(att_HC), csr, edge_attr=f(edge_attr),
                               edge_weight=f(edge_weight), negative_slope=negative_slope, keep=keep, dropout=dropout)


def compile_check(arch: int = 90, dtype: torch.dtype = torch.float16, all_configs: bool = True) -> dict:
    """Compile the forward and backward kernels for sm_<arch> with Triton's bundled ptxas, without a GPU, in
    two specialisations each: C = 64 without edge features or dropout, and C = 8 with edge_dim 3, a dropout
    keep-mask and the stored scores. Returns {pass: [(BLOCK_N, BLOCK_E, num_warps, shared bytes), ...]}
    (``all_configs=False``: the first autotune config only). Needs the module imported without
    TRITON_INTERPRET=1."""
    if INTERPRET:
        raise RuntimeError("compile_check needs zoo.kernels.edge_softmax imported without TRITON_INTERPRET=1")
    from zoo.kernels._compile import compile_for_gpu, pointer_type

    elem = pointer_type(dtype)
    types = {name: elem for name in ("xs_ptr", "xd_ptr", "att_ptr", "ea_ptr", "we_ptr", "out_ptr", "g_ptr")}
    types.update({name: "*fp32" for name in ("max_ptr", "logsum_ptr", "s_ptr", "dxs_ptr", "dxd_ptr",
                                             "datt_ptr", "dwe_ptr", "dea_ptr")})
    types.update({"rowptr_ptr": "*i64", "col_ptr": "*i64", "keep_ptr": "*i8", "slope": "fp32", "keep_scale": "fp32"})
    variants = {
        "C=64": dict(H=2, C=64, D=0, BLOCK_C=64, HAS_EDGE=False, HAS_KEEP=False),
        "C=8, edge_dim=3, dropout": dict(H=2, C=8, D=3, BLOCK_C=16, HAS_EDGE=True, HAS_KEEP=True),
    }
    report = {}
    for label, meta in variants.items():
        for name, kernel, extra in (("forward", _gatv2_fwd_kernel, dict(STORE_S=meta["HAS_KEEP"])),
                                    ("backward", _gatv2_bwd_kernel, {})):
            rows = []
            for config in _configs() if all_configs else _configs()[:1]:
                constexprs = dict(meta, **extra, **config.kwargs)
                shared = compile_for_gpu(kernel, types, constexprs, arch, config.num_warps, config.num_stages)
                rows.append((config.kwargs["BLOCK_N"], config.kwargs["BLOCK_E"], config.num_warps, shared))
            report[f"{name}, {label}"] = rows
    return report
