"""Block-sparse FlashAttention-2 in Triton: forward and backward, driven by zoo.attention block maps.

What: exact attention ``softmax(scale * q k^T + bias)`` (or ``sigmoid(scale * q k^T + bias - log Nk)``)
restricted by a zoo.attention mask, in O(N) memory, for training and inference:

* q (B, H, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv); H % Hkv == 0 (grouped-query attention: a
  query head reads its key/value head through pointer arithmetic, nothing is copied); any Nq, Nk;
  D and Dv up to 256, padded inside the kernel to the next power of two >= 16; fp16 / bf16 / fp32
  inputs, fp32 accumulation (fp32 inputs use IEEE fp32 dots unless ``torch.backends.cuda.matmul.
  allow_tf32`` is set, matching PyTorch's own matmul precision).
* Sparsity: each program walks only the tiles that the mask's block map (``Mask.block_map``) keeps,
  from per-tile lists built once per (mask, shape, tile) by kernels/block_index.py. FULL tiles run
  with no masking and no bounds checks; PARTIAL tiles evaluate the mask element-wise in the kernel
  (Window/Causal/ChunkWindow from indices, Segments from id vectors, BlockSparse/Radial from the tile map, Edges
  (kNN / graph neighbourhoods) from a bitmask over the 64 x 64 bit tiles that hold an edge, built from the edges in
  O(E) plus a tile table, Dense by loading mask tiles; And/Or trees up to three OR-terms; see block_index.py for
  what is exact in-kernel and the dense fallback).
* Additive bias of any shape broadcastable to (B, H, Nq, Nk) is read with stride-0 broadcasting (no
  expanded copy); its gradient is reduced over the broadcast dimensions inside the dQ pass.
* Outputs: ``out`` and, on request, the row log-sum-exp (natural log, -inf for rows with no allowed
  key), so partial results over disjoint key sets can be merged (``merge_attention_states``).
* Fully masked rows give zero output and zero gradients.

Backward (FlashAttention-2, Dao 2023, Algorithm 2, split into two atomics-free passes as in the Triton
tutorial 06-fused-attention): a preprocess computes ``delta = rowsum(dO * O)``; a **key-block-major**
pass recomputes P for every (key tile, query tile that sees it) from the stored LSE and accumulates
dK and dV in registers, looping over the G query heads of its key/value head (so GQA needs no
atomics either) and over the *transposed* block map; a **query-block-major** pass recomputes P and
dS and accumulates dQ, and, when the bias needs a gradient, writes dBias. When the bias is broadcast
over batch or heads, one dQ program handles all the (batch, head) pairs that share a bias slice in
sequence, so its dBias tile is a plain read-modify-write by a single program (no atomics).

Sources (read, not copied): Tri Dao, "FlashAttention-2" (arXiv:2307.08691); Dao-AILab/flash-attention
flash_attn/flash_attn_triton.py (bias broadcasting, dBias); Triton tutorial 06-fused-attention.py
(two-pass backward, exp2 with a log2(e)-folded scale); PyTorch FlexAttention (block masks as
partial/full tile lists).

Caveats:
* Dropout (``dropout_p > 0``): Philox draws (``tl.rand``) keyed per call from torch's default generator and
  indexed by (batch, head, query, key), recomputed in both backward passes and never stored (FlashAttention's
  scheme); the weights that multiply V are dropped and rescaled, the softmax normaliser is not.
  ``return_weights`` is not implemented: :func:`triton_supports` says so and ``attend`` falls back.
* Row offsets inside one (batch, head) slice are 32-bit: Nq * stride(-2) and Nk * stride(-2) of the inputs, of
  the output (Nq x Dv) and of the fp32 dBias buffer must stay below 2**31 (checked by triton_supports and the
  launchers; an incoming gradient with longer rows is copied). The offsets into the tile lists, the BLK slot's
  tile map and the EDGE slot's table and bit words are 64-bit (_tile_list_offsets, _blk_offsets, _edge_bit), like
  those of the batch / head, the DENSE slot and the LSE rows. Segment ids must fit in int32. More than 65,535
  (batch, head) pairs (CUDA's grid axis-1 limit) are launched in chunks.
* A bias of torch.finfo(float32).min (or .max) is a finite score (clamped to -FLT_MAX / FLT_MAX after the log2(e)
  scaling, see _scaled_bias), as in SDPA; the backward recomputes P from the row max and log2 normaliser kept apart, exact
  where max + log2(l) rounds to max.
* No torch.func (grad / vmap) rules: triton_supports refuses inside a transform.
* The LSE output is differentiable (its gradient folds into the backward's ``delta``), so partial
  results merged with :func:`merge_attention_states` train like one attention call.
* When a bias gradient is needed and the bias is broadcast over batch/heads, the dQ pass has
  (B*H)/(Bb*Hb) times fewer programs (each loops over the pairs sharing its bias slice).
* Under ``TRITON_INTERPRET=1`` bf16 is computed wrongly by the interpreter, so it is refused there, for CPU and
  CUDA tensors alike (the interpreter runs both on the host); one autotune config is used (and on a GPU too with
  ``ZOO_TRITON_SINGLE_CONFIG=1``).
* Launches run under ``torch.cuda.device(q.device)`` (kernels/_compile.py, :func:`on_device_of`): Triton launches on
  the current device, which need not be the tensors'.

GPUs tested: none yet. Verified under the Triton 3.6 interpreter on CPU, and compiled offline for sm_80, 86,
90 and 120 with Triton's bundled ptxas (:func:`compile_check`, ``python -m zoo.kernels.flash_attention``),
which also checks that every pass has an autotune config within that generation's shared memory (tiles are
chosen from the device's shared memory per block, :func:`_tiles`).
Run the GPU tests with ``pytest -m gpu tests/test_kernels_flash.py``, or the tests and the benchmark with
its targets in one go with ``bash tests/run_gpu_kernels.sh`` (docs/kernels.md, "GPUs tested").

Letters: B batch, H query heads, Hkv key/value heads, G = H // Hkv, Nq/Nk query/key lengths, D head dim
of q/k, Dv head dim of v, BM/BN query/key tile sizes, BD/BDV padded head dims.
"""
from __future__ import annotations

import math
import numbers
import os
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from zoo.kernels._compile import on_device_of, single_config_requested
from zoo.kernels.block_index import (EDGE_TILE_K, EDGE_TILE_Q, MaskProgram, ids_fit_int32, kernel_tile_lists,
                                    lower_mask, needs_dense_fallback)
from zoo.attention.alibi import ALiBi
from zoo.attention.bias import resolve_bias
from zoo.attention.core import merge_attention_states  # re-exported: merges this kernel's (out, lse) pairs
from zoo.attention.masks import And, Mask, Or, SegmentWindow, Segments, as_mask
from zoo.layers import in_torch_func, refuse_double_backward

__all__ = [
    "flash_attention",
    "flash_attention_ref",
    "dropout_scale",
    "merge_attention_states",
    "triton_supports",
    "triton_attention",
    "MAX_HEAD_DIM",
]

MAX_HEAD_DIM = 256
# Dense fallback masks above this many cells are refused by triton_supports (attend picks another backend).
DENSE_FALLBACK_LIMIT = 1 << 28
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_FLT_MAX = torch.finfo(torch.float32).max
_MAX_OFFSET = 2**31 - 1
# The EDGE slot's bit-tile sizes (kernels/block_index.py), compile-time constants of the kernels.
_EDGE_TQ = tl.constexpr(EDGE_TILE_Q)
_EDGE_TK = tl.constexpr(EDGE_TILE_K)
# Most (batch, head) pairs on grid axis 1 in one launch: CUDA's gridDim.y limit. More are launched in chunks
# (_launch_over_pairs); a module constant so that tests can lower it.
_MAX_GRID_PAIRS = 65535
# Why the kernel cannot run inside torch.func (its autograd.Function has no setup_context / vmap rules).
_TORCH_FUNC_REASON = ("inside a torch.func transform (grad, vmap, ...) the kernel has no torch.func rules; "
                      "use backend='torch'")

# The interpreter is chosen when the module is imported (triton.jit reads TRITON_INTERPRET then).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# ZOO_TRITON_SINGLE_CONFIG=1: one autotune config per pass on a GPU too (correctness runs compile ~4x less).
SINGLE_CONFIG = INTERPRET or single_config_requested()


# ------------------------------------------------------------------------------------------------
# Autotune configurations (tile sizes are chosen per head dim by _tiles(); autotuning picks warps and
# pipeline stages. One config when interpreting: the interpreter cannot benchmark.)
# ------------------------------------------------------------------------------------------------
def _configs(kind: str) -> list:
    if SINGLE_CONFIG:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    if kind == "fwd":
        return [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 1), (4, 2), (4, 3), (8, 2), (8, 3), (4, 4))]
    if kind == "bwd":
        return [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 1), (4, 2), (8, 1), (8, 2))]
    return [triton.Config({}, num_warps=w, num_stages=1) for w in (4, 8)]


# Autotuning is redone per key value. Besides the compile-time shape of a pass, the key holds the mask's
# predicate terms (each predicate compiles to a different program, whose best pipeline need not be the same)
# and ``tune_bucket`` (:func:`_tune_bucket`: the longer sequence length and the widest tile list, each rounded
# up to a power of two). A length or sparsity seen later is then not served the configuration tuned for the
# first one, while varlen batches whose lengths move within a power of two do not re-tune every step.
_FWD_KEY = ["BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV", "SCORE", "HAS_BIAS", "TERM0", "TERM1", "TERM2", "NUM_TERMS",
            "tune_bucket"]
_BWD_KEY = _FWD_KEY + ["HAS_DBIAS"]


def _tune_bucket(q_len: int, k_len: int, lists) -> int:
    """The autotune bucket of a launch: ceil(log2) of the longer length and of the tile lists' width (the most
    kept tiles any program walks, for maps large enough to be trimmed; all column tiles otherwise). Host-side
    numbers only: no device sync."""
    return (max(q_len, k_len, 1) - 1).bit_length() * 64 + (max(lists.width, 1) - 1).bit_length()


# Backward tiles, largest first: the ones a device's shared memory cannot hold are skipped (_tiles).
_BWD_TILES = ((64, 64), (32, 64), (32, 32), (16, 32), (16, 16))
# Devices with at least this much shared memory per block (H100: 227 KB) get the larger backward tiles.
_LARGE_SMEM = 200 * 1024


def _bwd_smem(tiles: tuple[int, int], row_bytes: int) -> int:
    """Upper bound of the shared memory (bytes) of the backward passes' smallest config (4 warps, 1 stage) at
    ``tiles``: the dK/dV pass, the larger one, stages its q / dO and k / v rows and two (BM, BN) fp32 tiles.
    Fitted to ptxas (Triton 3.6, sm_80/86/90/120): exact for fp32 at D = 64 / 128 / 256 and every tile of
    _BWD_TILES measured, above it for fp16."""
    block_m, block_n = tiles
    return 2 * row_bytes * (block_m + block_n) + 8 * block_m * block_n


def _tiles(block_d: int, block_dv: int, dtype: torch.dtype, smem: Optional[int], backward: bool) -> tuple[int, int]:
    """(BM, BN) for a problem: a function of the padded head dims, the element size and the device's shared
    memory per block (``smem`` bytes: ``shared_memory_per_block_optin``; None for the interpreter).

    Backward: the generation's preferred tiles (larger on H100-class devices), then smaller ones until the
    smallest autotune config fits ``smem`` (:func:`_bwd_smem`): sm_86 / 89 / 120 have 99 KB, where fp32 D = 256
    needs 16 x 16 tiles. The forward's smallest autotune config fits 99 KB at every head dim; its larger ones may
    not (fp32 D = 40 on sm_86: 48-176 KB over the configs), and Triton's autotuner skips a config that runs out of
    shared memory. Checked offline by :func:`compile_check` (which requires one fitting config per pass) for
    sm_80, 86, 90 and 120.
    """
    if smem is None:
        return (32, 32)
    row_bytes = max(block_d, block_dv) * (4 if dtype == torch.float32 else 2)
    if backward:
        large = smem >= _LARGE_SMEM
        if row_bytes <= 128 or (row_bytes <= 256 and large):
            preferred = (64, 64)
        elif row_bytes <= 256 or (row_bytes <= 512 and large):
            preferred = (32, 64)
        else:
            preferred = (32, 32)
        candidates = _BWD_TILES[_BWD_TILES.index(preferred):]
        return next((t for t in candidates if _bwd_smem(t, row_bytes) <= smem), candidates[-1])
    if row_bytes <= 128:
        return (128, 64)
    if row_bytes <= 256:
        return (128, 64) if dtype != torch.float32 else (64, 64)
    if row_bytes <= 512:
        return (64, 32)
    return (32, 32)


# ------------------------------------------------------------------------------------------------
# @triton.jit helpers
# ------------------------------------------------------------------------------------------------
@triton.jit
def _load_tile(ptrs, offs_r, n_r, offs_c, n_c, CHECK_R: tl.constexpr, CHECK_C: tl.constexpr):
    """Load a 2-D tile with bounds checks only along the dimensions that need them (zeros outside)."""
    if CHECK_R:
        if CHECK_C:
            x = tl.load(ptrs, mask=(offs_r[:, None] < n_r) & (offs_c[None, :] < n_c), other=0.0)
        else:
            x = tl.load(ptrs, mask=offs_r[:, None] < n_r, other=0.0)
    else:
        if CHECK_C:
            x = tl.load(ptrs, mask=offs_c[None, :] < n_c, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _tile_list_offsets(b, h, row, cnt_sb, cnt_sh, idx_sb, idx_sh, idx_w):
    """(offset of the two counts, offset of the kept column tiles) of row tile ``row`` of (batch b, head h) in the
    tile lists (block_index.TileLists), in 64 bits: ``row`` is an int32 program id and ``idx_w`` the lists' width
    (all column tiles for Causal / Full), whose product passes 2**31 from about 3M tokens with 64 x 64 tiles (741k
    with 16 x 16)."""
    row64 = row.to(tl.int64)
    cnt_off = b.to(tl.int64) * cnt_sb + h.to(tl.int64) * cnt_sh + row64 * 2
    idx_off = b.to(tl.int64) * idx_sb + h.to(tl.int64) * idx_sh + row64 * idx_w
    return cnt_off, idx_off


@triton.jit
def _blk_offsets(rows, cols, blk_bq, blk_bk, bl_sm, bl_sn):
    """In-slice offsets of block_mask[i // bq, j // bk] for the BLK slot, in 64 bits like the DENSE slot's: a
    BlockSparse / Radial map of 2**31 entries or more (46,341 x 46,341 tiles, e.g. 741k tokens at block 16) wrapped
    in int32."""
    return (rows // blk_bq).to(tl.int64) * bl_sm + (cols // blk_bk).to(tl.int64) * bl_sn


@triton.jit
def _edge_bit(rows, cols, inb, b, EdgeT, EdgeW, ed_sb, ed_sm):
    """The EDGE slot (block_index.edge_bitmask): t = table[b, i // TQ, j // TK] (-1: no edge in that bit tile), then
    bit (j % 32) of words[t, i % TQ, (j % TK) // 32]. Offsets in 64 bits (the table of a 3M-token cloud passes 2**31
    entries); the shift is arithmetic, so bit 31 (the int32 sign) reads like any other after ``& 1``."""
    slot = tl.load(EdgeT + b * ed_sb + (rows // _EDGE_TQ).to(tl.int64) * ed_sm + cols // _EDGE_TK, mask=inb, other=-1)
    word_off = ((slot.to(tl.int64) * _EDGE_TQ + rows % _EDGE_TQ) * (_EDGE_TK // 32)) + (cols % _EDGE_TK) // 32
    word = tl.load(EdgeW + word_off, mask=inb & (slot >= 0), other=0)
    return ((word >> (cols % 32)) & 1) != 0


@triton.jit
def _segment_positions(rows, cols, b, SegQ, SegK, seg_q_sb, seg_k_sb, Nq, Nk):
    """kpos[j] - qpos[i] for SegmentWindow: the positions follow the ids in the same buffers (SegQ[b, Nq + i],
    SegK[b, Nk + j]; see block_index.MaskProgram)."""
    qpos = tl.load(SegQ + b * seg_q_sb + Nq + rows, mask=rows < Nq, other=0)
    kpos = tl.load(SegK + b * seg_k_sb + Nk + cols, mask=cols < Nk, other=0)
    return kpos - qpos


@triton.jit
def _mask_term(
    rows, cols, inb, b, h,
    win_lo0, win_hi0, win_lo1, win_hi1, win_c0, win_s0, win_c1, win_s1,
    SegQ, SegK, seg_q_sb, seg_k_sb, Nq, Nk,
    DenseM, dn_sb, dn_sh, dn_sm, dn_sn,
    BlkM, bl_sb, bl_sh, bl_sm, bl_sn, blk_bq, blk_bk, EdgeT, EdgeW, ed_sb, ed_sm,
    BITS: tl.constexpr,
):
    """AND of the predicate slots named by BITS (see block_index.py) over a [BM, BN] tile."""
    ok = inb
    if (BITS & 1) != 0:  # WIN0: lo <= j - i <= hi, or in chunks (CHUNK0): lo <= j // c - (i + s) // c <= hi,
        if (BITS & 32) != 0:  # or on positions inside segments (POS0): lo <= kpos[j] - qpos[i] <= hi
            rel = cols // win_c0 - (rows + win_s0) // win_c0  # all >= 0: truncation is floor division
        elif (BITS & 128) != 0:
            rel = _segment_positions(rows, cols, b, SegQ, SegK, seg_q_sb, seg_k_sb, Nq, Nk)
        else:
            rel = cols - rows
        ok = ok & (rel >= win_lo0) & (rel <= win_hi0)
    if (BITS & 2) != 0:  # WIN1 (CHUNK1, POS1)
        if (BITS & 64) != 0:
            rel = cols // win_c1 - (rows + win_s1) // win_c1
        elif (BITS & 256) != 0:
            rel = _segment_positions(rows, cols, b, SegQ, SegK, seg_q_sb, seg_k_sb, Nq, Nk)
        else:
            rel = cols - rows
        ok = ok & (rel >= win_lo1) & (rel <= win_hi1)
    if (BITS & 4) != 0:  # SEG: same non-negative segment id
        qid = tl.load(SegQ + b * seg_q_sb + rows, mask=rows < Nq, other=-1)
        kid = tl.load(SegK + b * seg_k_sb + cols, mask=cols < Nk, other=-2)
        ok = ok & (qid == kid) & (qid >= 0)
    if (BITS & 8) != 0:  # DENSE: load the mask tile
        dn = tl.load(
            DenseM + b * dn_sb + h * dn_sh + rows.to(tl.int64) * dn_sm + cols.to(tl.int64) * dn_sn,
            mask=inb, other=0,
        )
        ok = ok & (dn != 0)
    if (BITS & 16) != 0:  # BLK: look up the source tile map
        bl = tl.load(BlkM + b * bl_sb + h * bl_sh + _blk_offsets(rows, cols, blk_bq, blk_bk, bl_sm, bl_sn),
                     mask=inb, other=0)
        ok = ok & (bl != 0)
    if (BITS & 512) != 0:  # EDGE: the edge j -> i, one bit of the bit tile that holds (i, j)
        ok = ok & _edge_bit(rows, cols, inb, b, EdgeT, EdgeW, ed_sb, ed_sm)
    return ok


@triton.jit
def _tile_mask(
    offs_m, offs_n, b, h, Nq, Nk,
    win_lo0, win_hi0, win_lo1, win_hi1, win_c0, win_s0, win_c1, win_s1,
    SegQ, SegK, seg_q_sb, seg_k_sb,
    DenseM, dn_sb, dn_sh, dn_sm, dn_sn,
    BlkM, bl_sb, bl_sh, bl_sm, bl_sn, blk_bq, blk_bk, EdgeT, EdgeW, ed_sb, ed_sm,
    TERM0: tl.constexpr, TERM1: tl.constexpr, TERM2: tl.constexpr, NUM_TERMS: tl.constexpr,
):
    """bool [BM, BN]: pair (offs_m[i], offs_n[j]) is in range and allowed by the mask (OR of terms)."""
    rows = offs_m[:, None]
    cols = offs_n[None, :]
    inb = (rows < Nq) & (cols < Nk)
    if NUM_TERMS == 0:
        keep = inb & (rows < 0)
    else:
        keep = _mask_term(rows, cols, inb, b, h, win_lo0, win_hi0, win_lo1, win_hi1, win_c0, win_s0, win_c1,
                          win_s1, SegQ, SegK, seg_q_sb, seg_k_sb, Nq, Nk, DenseM, dn_sb, dn_sh, dn_sm, dn_sn,
                          BlkM, bl_sb, bl_sh, bl_sm, bl_sn, blk_bq, blk_bk, EdgeT, EdgeW, ed_sb, ed_sm, TERM0)
        if NUM_TERMS > 1:
            keep = keep | _mask_term(rows, cols, inb, b, h, win_lo0, win_hi0, win_lo1, win_hi1, win_c0, win_s0,
                                     win_c1, win_s1, SegQ, SegK, seg_q_sb, seg_k_sb, Nq, Nk, DenseM, dn_sb, dn_sh,
                                     dn_sm, dn_sn, BlkM, bl_sb, bl_sh, bl_sm, bl_sn, blk_bq, blk_bk,
                                     EdgeT, EdgeW, ed_sb, ed_sm, TERM1)
        if NUM_TERMS > 2:
            keep = keep | _mask_term(rows, cols, inb, b, h, win_lo0, win_hi0, win_lo1, win_hi1, win_c0, win_s0,
                                     win_c1, win_s1, SegQ, SegK, seg_q_sb, seg_k_sb, Nq, Nk, DenseM, dn_sb, dn_sh,
                                     dn_sm, dn_sn, BlkM, bl_sb, bl_sh, bl_sm, bl_sn, blk_bq, blk_bk,
                                     EdgeT, EdgeW, ed_sb, ed_sm, TERM2)
    return keep


@triton.jit
def _dropout_scale(drop_p, drop_seed, b, h, offs_m, offs_n, Nk):
    """[BM, BN] fp32: 1 / (1 - p) where the pair (offs_m[i], offs_n[j]) of batch b, query head h is kept, 0
    where it is dropped. Philox (tl.rand) keyed by ``drop_seed``, at the 64-bit offset ((b * 2**16 + h) << 32) +
    i * Nk + j: the same draw in the forward and both backward passes, a separate stream per (b, h)."""
    pair = offs_m.to(tl.int64)[:, None] * Nk + offs_n.to(tl.int64)[None, :]
    offset = ((b.to(tl.int64) * 65536 + h) << 32) + pair
    r = tl.rand(drop_seed, offset)
    return tl.where(r >= drop_p, 1.0 / (1.0 - drop_p), 0.0)


@triton.jit
def _scaled_bias(bias, bias_scale):
    """``bias * bias_scale`` with a finite bias kept finite. A mask written the Hugging Face way, with
    torch.finfo(float32).min, times log2(e) overflows fp32 to -inf and would turn such a pair into a forbidden one
    (a row of them into an empty row: zeros) where SDPA and the reference attend to it; clamped to -FLT_MAX it
    stays the smallest finite score (a row of them attends uniformly). Likewise a finite bias above FLT_MAX / log2(e)
    (torch.finfo(float32).max) overflowed to +inf, and the row to inf - inf = NaN: it is kept at FLT_MAX. A -inf
    bias stays -inf (forbidden), +inf stays +inf and a NaN stays NaN."""
    scaled = bias * bias_scale
    scaled = tl.where((scaled < -3.4028234663852886e38) & (bias > float("-inf")), -3.4028234663852886e38, scaled)
    return tl.where((scaled > 3.4028234663852886e38) & (bias < float("inf")), 3.4028234663852886e38, scaled)


@triton.jit
def _scores(
    q, k, Bias_bh, offs_m, offs_n, b, h, Nq, Nk, stride_bm, stride_bn, qk_scale, bias_scale,
    win_lo0, win_hi0, win_lo1, win_hi1, win_c0, win_s0, win_c1, win_s1, SegQ, SegK, seg_q_sb, seg_k_sb,
    DenseM, dn_sb, dn_sh, dn_sm, dn_sn, BlkM, bl_sb, bl_sh, bl_sm, bl_sn, blk_bq, blk_bk, EdgeT, EdgeW, ed_sb, ed_sm,
    MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
    TERM0: tl.constexpr, TERM1: tl.constexpr, TERM2: tl.constexpr, NUM_TERMS: tl.constexpr,
):
    """Scores [BM, BN] in kernel units (qk_scale * q.k + bias_scale * bias) and the keep mask (MASKED)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if HAS_BIAS == 2:
        # ALiBi in the kernel: Bias_bh points at this head's slope, stride_bm carries Nk - Nq (bottom-right
        # alignment); the bias -slope * |i + Nk - Nq - j| is computed here, never read from memory.
        slope = tl.load(Bias_bh).to(tl.float32)
        distance = tl.abs(offs_m[:, None] + stride_bm - offs_n[None, :]).to(tl.float32)
        s += (-slope * bias_scale) * distance
    if HAS_BIAS == 1:
        bias = _load_tile(Bias_bh + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn,
                          offs_m, Nq, offs_n, Nk, MASKED, MASKED)
        s += _scaled_bias(bias.to(tl.float32), bias_scale)
    if MASKED:
        keep = _tile_mask(offs_m, offs_n, b, h, Nq, Nk, win_lo0, win_hi0, win_lo1, win_hi1, win_c0, win_s0, win_c1,
                          win_s1, SegQ, SegK, seg_q_sb, seg_k_sb, DenseM, dn_sb, dn_sh, dn_sm, dn_sn, BlkM, bl_sb,
                          bl_sh, bl_sm, bl_sn, blk_bq, blk_bk,
                          EdgeT, EdgeW, ed_sb, ed_sm, TERM0, TERM1, TERM2, NUM_TERMS)
    else:
        keep = s  # unused by the callers when not MASKED
    return s, keep


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_tile(
    acc, l_i, m_i, q, n_blk, offs_m, offs_d, offs_dv, b, h,
    K_bh, V_bh, Bias_bh, stride_kn, stride_vn, stride_bm, stride_bn,
    Nq, Nk, D, DV, qk_scale, bias_scale, s_shift, drop_p, drop_seed,
    win_lo0, win_hi0, win_lo1, win_hi1, win_c0, win_s0, win_c1, win_s1, SegQ, SegK, seg_q_sb, seg_k_sb,
    DenseM, dn_sb, dn_sh, dn_sm, dn_sn, BlkM, bl_sb, bl_sh, bl_sm, bl_sn, blk_bq, blk_bk, EdgeT, EdgeW, ed_sb, ed_sm,
    MASKED: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
    CHECK_D: tl.constexpr, CHECK_DV: tl.constexpr, DOT_PREC: tl.constexpr,
    TERM0: tl.constexpr, TERM1: tl.constexpr, TERM2: tl.constexpr, NUM_TERMS: tl.constexpr,
):
    offs_n = n_blk * BLOCK_N + tl.arange(0, BLOCK_N)
    k = _load_tile(K_bh + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, Nk, offs_d, D, MASKED, CHECK_D)
    s, keep = _scores(q, k, Bias_bh, offs_m, offs_n, b, h, Nq, Nk, stride_bm, stride_bn, qk_scale, bias_scale,
                      win_lo0, win_hi0, win_lo1, win_hi1, win_c0, win_s0, win_c1, win_s1,
                      SegQ, SegK, seg_q_sb, seg_k_sb,
                      DenseM, dn_sb, dn_sh, dn_sm, dn_sn, BlkM, bl_sb, bl_sh, bl_sm, bl_sn, blk_bq, blk_bk,
                      EdgeT, EdgeW, ed_sb, ed_sm,
                      MASKED, HAS_BIAS, DOT_PREC, TERM0, TERM1, TERM2, NUM_TERMS)
    if SCORE % 2 == 0:
        # Online softmax in base 2 (s is already multiplied by log2(e)).
        if MASKED:
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        m_i = m_new
    else:
        p = tl.sigmoid(s + s_shift)
        if MASKED:
            p = tl.where(keep, p, 0.0)
    if SCORE >= 2:  # dropout on the weights that multiply V; the softmax normaliser l_i keeps them all
        p = p * _dropout_scale(drop_p, drop_seed, b, h, offs_m, offs_n, Nk)
    v = _load_tile(V_bh + offs_n[:, None] * stride_vn + offs_dv[None, :], offs_n, Nk, offs_dv, DV, MASKED, CHECK_DV)
    acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, l_i, m_i


@triton.autotune(configs=_configs("fwd"), key=_FWD_KEY)
@triton.jit(do_not_specialize=["pair_base", "tune_bucket"])
def _attn_fwd(
    Q, K, V, Bias, Out, Lse, LogNorm, TileCnt, TileIdx,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_ob, stride_oh, stride_om,
    cnt_sb, cnt_sh, idx_sb, idx_sh, idx_w,
    H, G, Nq, Nk, D, DV, qk_scale, bias_scale, s_shift, drop_p, drop_seed,
    win_lo0, win_hi0, win_lo1, win_hi1, win_c0, win_s0, win_c1, win_s1, SegQ, SegK, seg_q_sb, seg_k_sb,
    DenseM, dn_sb, dn_sh, dn_sm, dn_sn, BlkM, bl_sb, bl_sh, bl_sm, bl_sn, blk_bq, blk_bk,
    EdgeT, EdgeW, ed_sb, ed_sm, pair_base, tune_bucket,
    SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CHECK_D: tl.constexpr, CHECK_DV: tl.constexpr,
    DOT_PREC: tl.constexpr,
    TERM0: tl.constexpr, TERM1: tl.constexpr, TERM2: tl.constexpr, NUM_TERMS: tl.constexpr,
):
    """One program: query tile pid_m of (batch b, head h). Grid (QB, pairs of this launch), from pair_base."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1) + pair_base
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // G
    Q_bh = Q + b * stride_qb + h * stride_qh
    K_bh = K + b * stride_kb + hk * stride_kh
    V_bh = V + b * stride_vb + hk * stride_vh
    Bias_bh = Bias + b * stride_bb + h * stride_bh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(Q_bh + offs_m[:, None] * stride_qm + offs_d[None, :], offs_m, Nq, offs_d, D, True, CHECK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    cnt_off, idx_off = _tile_list_offsets(b, h, pid_m, cnt_sb, cnt_sh, idx_sb, idx_sh, idx_w)
    cnt_ptr = TileCnt + cnt_off
    idx_ptr = TileIdx + idx_off
    n_partial = tl.load(cnt_ptr)
    n_full = tl.load(cnt_ptr + 1)
    for t in range(0, n_partial):
        n_blk = tl.load(idx_ptr + t)
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, n_blk, offs_m, offs_d, offs_dv, b, h,
                                  K_bh, V_bh, Bias_bh, stride_kn, stride_vn, stride_bm, stride_bn,
                                  Nq, Nk, D, DV, qk_scale, bias_scale, s_shift, drop_p, drop_seed,
                                  win_lo0, win_hi0, win_lo1, win_hi1, win_c0, win_s0, win_c1, win_s1,
                                  SegQ, SegK, seg_q_sb, seg_k_sb,
                                  DenseM, dn_sb, dn_sh, dn_sm, dn_sn, BlkM, bl_sb, bl_sh, bl_sm, bl_sn, blk_bq, blk_bk,
                                  EdgeT, EdgeW, ed_sb, ed_sm,
                                  True, SCORE, HAS_BIAS, BLOCK_N, CHECK_D, CHECK_DV, DOT_PREC,
                                  TERM0, TERM1, TERM2, NUM_TERMS)
    for t in range(n_partial, n_partial + n_full):
        n_blk = tl.load(idx_ptr + t)
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, n_blk, offs_m, offs_d, offs_dv, b, h,
                                  K_bh, V_bh, Bias_bh, stride_kn, stride_vn, stride_bm, stride_bn,
                                  Nq, Nk, D, DV, qk_scale, bias_scale, s_shift, drop_p, drop_seed,
                                  win_lo0, win_hi0, win_lo1, win_hi1, win_c0, win_s0, win_c1, win_s1,
                                  SegQ, SegK, seg_q_sb, seg_k_sb,
                                  DenseM, dn_sb, dn_sh, dn_sm, dn_sn, BlkM, bl_sb, bl_sh, bl_sm, bl_sn, blk_bq, blk_bk,
                                  EdgeT, EdgeW, ed_sb, ed_sm,
                                  False, SCORE, HAS_BIAS, BLOCK_N, CHECK_D, CHECK_DV, DOT_PREC,
                                  TERM0, TERM1, TERM2, NUM_TERMS)

    row_ok = offs_m < Nq
    if SCORE % 2 == 0:
        empty = l_i == 0.0
        acc = acc / tl.where(empty, 1.0, l_i)[:, None]
        log_norm = tl.log2(tl.where(empty, 1.0, l_i))
        lse = tl.where(empty, float("-inf"), m_i + log_norm)  # base 2
        tl.store(Lse + pid_bh.to(tl.int64) * Nq + offs_m, lse, mask=row_ok)
        tl.store(LogNorm + pid_bh.to(tl.int64) * Nq + offs_m, log_norm, mask=row_ok)
    O_bh = Out + b * stride_ob + h * stride_oh
    o_ptrs = O_bh + offs_m[:, None] * stride_om + offs_dv[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------
@triton.autotune(configs=_configs("pre"), key=["BLOCK_M", "BLOCK_DV"])
@triton.jit(do_not_specialize=["pair_base"])
def _attn_bwd_preprocess(
    Out, DO, Delta, stride_ob, stride_oh, stride_om, stride_db, stride_dh, stride_dm, H, Nq, DV, pair_base,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] (fp32). Grid (cdiv(Nq, BM), pairs), from pair_base."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1) + pair_base
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    o = _load_tile(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :],
                   offs_m, Nq, offs_dv, DV, True, True)
    do = _load_tile(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + offs_dv[None, :],
                    offs_m, Nq, offs_dv, DV, True, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * Nq + offs_m, delta, mask=offs_m < Nq)


@triton.jit
def _probs_and_dscores(
    q, k, v, do, Bias_bh, Lse_bh, LogNorm_bh, Delta_bh, offs_m, offs_n, b, h, Nq, Nk, stride_bm, stride_bn,
    qk_scale, bias_scale, s_shift, drop_p, drop_seed,
    win_lo0, win_hi0, win_lo1, win_hi1, win_c0, win_s0, win_c1, win_s1, SegQ, SegK, seg_q_sb, seg_k_sb,
    DenseM, dn_sb, dn_sh, dn_sm, dn_sn, BlkM, bl_sb, bl_sh, bl_sm, bl_sn, blk_bq, blk_bk, EdgeT, EdgeW, ed_sb, ed_sm,
    MASKED: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
    TERM0: tl.constexpr, TERM1: tl.constexpr, TERM2: tl.constexpr, NUM_TERMS: tl.constexpr,
):
    """Recompute P [BM, BN] and dS = dL/d(scale * q.k + bias) for one tile. With dropout (mask Z, scale
    1 / (1 - p)): returns P * Z / (1 - p) (what multiplied V: dV's factor) and dS from dP * Z / (1 - p)
    (FlashAttention, Dao et al. 2022, Algorithm 4).

    P = exp2((s - m) - log2(l)) from the forward's row max m = LSE - log2(l) and normaliser l, not exp2(s - LSE):
    where |m| is huge (every key of a row biased by finfo(float32).min) m + log2(l) rounds to m, and exp2(s - LSE)
    would give each of the l tied keys weight 1 instead of 1 / l."""
    s, keep = _scores(q, k, Bias_bh, offs_m, offs_n, b, h, Nq, Nk, stride_bm, stride_bn, qk_scale, bias_scale,
                      win_lo0, win_hi0, win_lo1, win_hi1, win_c0, win_s0, win_c1, win_s1,
                      SegQ, SegK, seg_q_sb, seg_k_sb,
                      DenseM, dn_sb, dn_sh, dn_sm, dn_sn, BlkM, bl_sb, bl_sh, bl_sm, bl_sn, blk_bq, blk_bk,
                      EdgeT, EdgeW, ed_sb, ed_sm,
                      MASKED, HAS_BIAS, DOT_PREC, TERM0, TERM1, TERM2, NUM_TERMS)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    if SCORE >= 2:
        zs = _dropout_scale(drop_p, drop_seed, b, h, offs_m, offs_n, Nk)
        dp = dp * zs
    if SCORE % 2 == 0:
        if MASKED:
            lse = tl.load(Lse_bh + offs_m, mask=offs_m < Nq, other=float("inf"))
            log_norm = tl.load(LogNorm_bh + offs_m, mask=offs_m < Nq, other=0.0)
            delta = tl.load(Delta_bh + offs_m, mask=offs_m < Nq, other=0.0)
            s = tl.where(keep, s, float("-inf"))
        else:
            lse = tl.load(Lse_bh + offs_m)
            log_norm = tl.load(LogNorm_bh + offs_m)
            delta = tl.load(Delta_bh + offs_m)
        # Rows with no allowed key stored LSE = -inf: make their P exactly zero.
        row_max = tl.where(lse == float("-inf"), float("inf"), lse - log_norm)
        p = tl.exp2((s - row_max[:, None]) - log_norm[:, None])
        ds = p * (dp - delta[:, None])
    else:
        p = tl.sigmoid(s + s_shift)
        if MASKED:
            p = tl.where(keep, p, 0.0)
        ds = dp * p * (1.0 - p)
    if SCORE >= 2:
        p = p * zs
    return p, ds


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, m_blk, offs_n, offs_d, offs_dv, b, h,
    Q_bh, DO_bh, Bias_bh, Lse_bh, LogNorm_bh, Delta_bh, stride_qm, stride_dom, stride_bm, stride_bn,
    Nq, Nk, D, DV, qk_scale, bias_scale, s_shift, drop_p, drop_seed,
    win_lo0, win_hi0, win_lo1, win_hi1, win_c0, win_s0, win_c1, win_s1, SegQ, SegK, seg_q_sb, seg_k_sb,
    DenseM, dn_sb, dn_sh, dn_sm, dn_sn, BlkM, bl_sb, bl_sh, bl_sm, bl_sn, blk_bq, blk_bk, EdgeT, EdgeW, ed_sb, ed_sm,
    MASKED: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    CHECK_D: tl.constexpr, CHECK_DV: tl.constexpr, DOT_PREC: tl.constexpr,
    TERM0: tl.constexpr, TERM1: tl.constexpr, TERM2: tl.constexpr, NUM_TERMS: tl.constexpr,
):
    offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_tile(Q_bh + offs_m[:, None] * stride_qm + offs_d[None, :], offs_m, Nq, offs_d, D, MASKED, CHECK_D)
    do = _load_tile(DO_bh + offs_m[:, None] * stride_dom + offs_dv[None, :], offs_m, Nq, offs_dv, DV, MASKED, CHECK_DV)
    p, ds = _probs_and_dscores(q, k, v, do, Bias_bh, Lse_bh, LogNorm_bh, Delta_bh, offs_m, offs_n, b, h, Nq, Nk,
                               stride_bm, stride_bn, qk_scale, bias_scale, s_shift, drop_p, drop_seed,
                               win_lo0, win_hi0, win_lo1, win_hi1, win_c0, win_s0, win_c1, win_s1,
                               SegQ, SegK, seg_q_sb, seg_k_sb,
                               DenseM, dn_sb, dn_sh, dn_sm, dn_sn, BlkM, bl_sb, bl_sh, bl_sm, bl_sn, blk_bq, blk_bk,
                               EdgeT, EdgeW, ed_sb, ed_sm,
                               MASKED, SCORE, HAS_BIAS, DOT_PREC, TERM0, TERM1, TERM2, NUM_TERMS)
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    return dk, dv


@triton.autotune(configs=_configs("bwd"), key=_BWD_KEY)
@triton.jit(do_not_specialize=["pair_base", "tune_bucket"])
def _attn_bwd_dkdv(
    Q, K, V, Bias, DO, Lse, LogNorm, Delta, DK, DVo, TileCnt, TileIdx,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    cnt_sb, cnt_sh, idx_sb, idx_sh, idx_w,
    H, G, Nq, Nk, D, DV, qk_scale, bias_scale, s_shift, drop_p, drop_seed, sm_scale,
    win_lo0, win_hi0, win_lo1, win_hi1, win_c0, win_s0, win_c1, win_s1, SegQ, SegK, seg_q_sb, seg_k_sb,
    DenseM, dn_sb, dn_sh, dn_sm, dn_sn, BlkM, bl_sb, bl_sh, bl_sm, bl_sn, blk_bq, blk_bk,
    EdgeT, EdgeW, ed_sb, ed_sm, pair_base, tune_bucket,
    SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DBIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CHECK_D: tl.constexpr,
    CHECK_DV: tl.constexpr, DOT_PREC: tl.constexpr,
    TERM0: tl.constexpr, TERM1: tl.constexpr, TERM2: tl.constexpr, NUM_TERMS: tl.constexpr,
):
    """One program: key tile pid_n of (batch b, kv head hk), all G query heads. Grid (KB, pairs of this launch
    out of B * Hkv, from pair_base).

    Walks the transposed tile lists (query tiles that see this key tile), so dK/dV are sparse and each
    is written once by its owner (no atomics)."""
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1) + pair_base
    Hkv = H // G
    b = (pid_bk // Hkv).to(tl.int64)
    hk = (pid_bk % Hkv).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    K_bh = K + b * stride_kb + hk * stride_kh
    V_bh = V + b * stride_vb + hk * stride_vh
    k = _load_tile(K_bh + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, Nk, offs_d, D, True, CHECK_D)
    v = _load_tile(V_bh + offs_n[:, None] * stride_vn + offs_dv[None, :], offs_n, Nk, offs_dv, DV, True, CHECK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(0, G):
        h = hk * G + g
        Q_bh = Q + b * stride_qb + h * stride_qh
        DO_bh = DO + b * stride_dob + h * stride_doh
        Bias_bh = Bias + b * stride_bb + h * stride_bh
        Lse_bh = Lse + (b * H + h) * Nq
        LogNorm_bh = LogNorm + (b * H + h) * Nq
        Delta_bh = Delta + (b * H + h) * Nq
        cnt_off, idx_off = _tile_list_offsets(b, h, pid_n, cnt_sb, cnt_sh, idx_sb, idx_sh, idx_w)
        cnt_ptr = TileCnt + cnt_off
        idx_ptr = TileIdx + idx_off
        n_partial = tl.load(cnt_ptr)
        n_full = tl.load(cnt_ptr + 1)
        for t in range(0, n_partial):
            m_blk = tl.load(idx_ptr + t)
            dk, dv = _dkdv_tile(dk, dv, k, v, m_blk, offs_n, offs_d, offs_dv, b, h,
                                Q_bh, DO_bh, Bias_bh, Lse_bh, LogNorm_bh, Delta_bh, stride_qm, stride_dom, stride_bm,
                                stride_bn,
                                Nq, Nk, D, DV, qk_scale, bias_scale, s_shift, drop_p, drop_seed,
                                win_lo0, win_hi0, win_lo1, win_hi1, win_c0, win_s0, win_c1, win_s1,
                                SegQ, SegK, seg_q_sb, seg_k_sb,
                                DenseM, dn_sb, dn_sh, dn_sm, dn_sn, BlkM, bl_sb, bl_sh, bl_sm, bl_sn, blk_bq, blk_bk,
                                EdgeT, EdgeW, ed_sb, ed_sm,
                                True, SCORE, HAS_BIAS, BLOCK_M, CHECK_D, CHECK_DV, DOT_PREC,
                                TERM0, TERM1, TERM2, NUM_TERMS)
        for t in range(n_partial, n_partial + n_full):
            m_blk = tl.load(idx_ptr + t)
            dk, dv = _dkdv_tile(dk, dv, k, v, m_blk, offs_n, offs_d, offs_dv, b, h,
                                Q_bh, DO_bh, Bias_bh, Lse_bh, LogNorm_bh, Delta_bh, stride_qm, stride_dom, stride_bm,
                                stride_bn,
                                Nq, Nk, D, DV, qk_scale, bias_scale, s_shift, drop_p, drop_seed,
                                win_lo0, win_hi0, win_lo1, win_hi1, win_c0, win_s0, win_c1, win_s1,
                                SegQ, SegK, seg_q_sb, seg_k_sb,
                                DenseM, dn_sb, dn_sh, dn_sm, dn_sn, BlkM, bl_sb, bl_sh, bl_sm, bl_sn, blk_bq, blk_bk,
                                EdgeT, EdgeW, ed_sb, ed_sm,
                                False, SCORE, HAS_BIAS, BLOCK_M, CHECK_D, CHECK_DV, DOT_PREC,
                                TERM0, TERM1, TERM2, NUM_TERMS)
    dk = dk * sm_scale
    row_ok = offs_n[:, None] < Nk
    tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=row_ok & (offs_d[None, :] < D))
    tl.store(DVo + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_dv[None, :],
             dv.to(DVo.dtype.element_ty), mask=row_ok & (offs_dv[None, :] < DV))


@triton.jit
def _dq_tile(
    dq, db_rows, q, do, n_blk, pid_m, offs_m, offs_d, offs_dv, b, h,
    K_bh, V_bh, Bias_bh, Lse_bh, LogNorm_bh, Delta_bh, DB_bh, stride_kn, stride_vn, stride_bm, stride_bn, stride_dbm,
    Nq, Nk, D, DV, qk_scale, bias_scale, s_shift, drop_p, drop_seed,
    win_lo0, win_hi0, win_lo1, win_hi1, win_c0, win_s0, win_c1, win_s1, SegQ, SegK, seg_q_sb, seg_k_sb,
    DenseM, dn_sb, dn_sh, dn_sm, dn_sn, BlkM, bl_sb, bl_sh, bl_sm, bl_sn, blk_bq, blk_bk, EdgeT, EdgeW, ed_sb, ed_sm,
    MASKED: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DBIAS: tl.constexpr,
    DB_ROWS: tl.constexpr, DB_COLS: tl.constexpr, DB_ACC: tl.constexpr, BLOCK_N: tl.constexpr,
    CHECK_D: tl.constexpr, CHECK_DV: tl.constexpr, DOT_PREC: tl.constexpr,
    TERM0: tl.constexpr, TERM1: tl.constexpr, TERM2: tl.constexpr, NUM_TERMS: tl.constexpr,
):
    offs_n = n_blk * BLOCK_N + tl.arange(0, BLOCK_N)
    k = _load_tile(K_bh + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, Nk, offs_d, D, MASKED, CHECK_D)
    v = _load_tile(V_bh + offs_n[:, None] * stride_vn + offs_dv[None, :], offs_n, Nk, offs_dv, DV, MASKED, CHECK_DV)
    p, ds = _probs_and_dscores(q, k, v, do, Bias_bh, Lse_bh, LogNorm_bh, Delta_bh, offs_m, offs_n, b, h, Nq, Nk,
                               stride_bm, stride_bn, qk_scale, bias_scale, s_shift, drop_p, drop_seed,
                               win_lo0, win_hi0, win_lo1, win_hi1, win_c0, win_s0, win_c1, win_s1,
                               SegQ, SegK, seg_q_sb, seg_k_sb,
                               DenseM, dn_sb, dn_sh, dn_sm, dn_sn, BlkM, bl_sb, bl_sh, bl_sm, bl_sn, blk_bq, blk_bk,
                               EdgeT, EdgeW, ed_sb, ed_sm,
                               MASKED, SCORE, HAS_BIAS, DOT_PREC, TERM0, TERM1, TERM2, NUM_TERMS)
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    if HAS_DBIAS:
        if DB_COLS:
            if DB_ROWS:
                # dBias (.., Nq, Nk): this tile of it is owned by this program.
                ptrs = DB_bh + offs_m[:, None] * stride_dbm + offs_n[None, :]
                if MASKED:
                    ok = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)
                    if DB_ACC:
                        ds += tl.load(ptrs, mask=ok, other=0.0)
                    tl.store(ptrs, ds, mask=ok)
                else:
                    if DB_ACC:
                        ds += tl.load(ptrs)
                    tl.store(ptrs, ds)
            else:
                # dBias (.., 1, Nk): per-query-tile partial sums in row pid_m, summed on the host.
                col_sum = tl.sum(ds, 0)
                ptrs = DB_bh + pid_m * stride_dbm + offs_n
                if DB_ACC:
                    col_sum += tl.load(ptrs, mask=offs_n < Nk, other=0.0)
                tl.store(ptrs, col_sum, mask=offs_n < Nk)
            if DB_ACC:
                tl.debug_barrier()
        else:
            db_rows += tl.sum(ds, 1)
    return dq, db_rows


@triton.autotune(configs=_configs("bwd"), key=_BWD_KEY, reset_to_zero=["DBias"])
@triton.jit(do_not_specialize=["pair_base", "tune_bucket"])
def _attn_bwd_dq(
    Q, K, V, Bias, DO, Lse, LogNorm, Delta, DQ, DBias, TileCnt, TileIdx,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm, stride_dbb, stride_dbh, stride_dbm,
    cnt_sb, cnt_sh, idx_sb, idx_sh, idx_w,
    H, G, Nq, Nk, D, DV, qk_scale, bias_scale, s_shift, drop_p, drop_seed, sm_scale, B_LOOP, H_LOOP, H_OUT,
    win_lo0, win_hi0, win_lo1, win_hi1, win_c0, win_s0, win_c1, win_s1, SegQ, SegK, seg_q_sb, seg_k_sb,
    DenseM, dn_sb, dn_sh, dn_sm, dn_sn, BlkM, bl_sb, bl_sh, bl_sm, bl_sn, blk_bq, blk_bk,
    EdgeT, EdgeW, ed_sb, ed_sm, pair_base, tune_bucket,
    SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DBIAS: tl.constexpr, DB_ROWS: tl.constexpr,
    DB_COLS: tl.constexpr, DB_ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CHECK_D: tl.constexpr, CHECK_DV: tl.constexpr,
    DOT_PREC: tl.constexpr,
    TERM0: tl.constexpr, TERM1: tl.constexpr, TERM2: tl.constexpr, NUM_TERMS: tl.constexpr,
):
    """One program: query tile pid_m for B_LOOP x H_LOOP (batch, head) pairs that share one bias slice
    (1 x 1 unless a broadcast bias needs its gradient). Grid (QB, pairs of this launch out of
    (B / B_LOOP) * (H / H_LOOP), from pair_base)."""
    pid_m = tl.program_id(0)
    pid_o = tl.program_id(1) + pair_base
    b_out = pid_o // H_OUT
    h_out = pid_o % H_OUT
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    db_rows = tl.zeros([BLOCK_M], dtype=tl.float32)
    for ib in range(0, B_LOOP):
        for ih in range(0, H_LOOP):
            b = (b_out * B_LOOP + ib).to(tl.int64)
            h = (h_out * H_LOOP + ih).to(tl.int64)
            hk = h // G
            Q_bh = Q + b * stride_qb + h * stride_qh
            K_bh = K + b * stride_kb + hk * stride_kh
            V_bh = V + b * stride_vb + hk * stride_vh
            DO_bh = DO + b * stride_dob + h * stride_doh
            Bias_bh = Bias + b * stride_bb + h * stride_bh
            DB_bh = DBias + b * stride_dbb + h * stride_dbh
            Lse_bh = Lse + (b * H + h) * Nq
            LogNorm_bh = LogNorm + (b * H + h) * Nq
            Delta_bh = Delta + (b * H + h) * Nq
            q = _load_tile(Q_bh + offs_m[:, None] * stride_qm + offs_d[None, :], offs_m, Nq, offs_d, D, True, CHECK_D)
            do = _load_tile(DO_bh + offs_m[:, None] * stride_dom + offs_dv[None, :], offs_m, Nq, offs_dv, DV,
                            True, CHECK_DV)
            dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            cnt_off, idx_off = _tile_list_offsets(b, h, pid_m, cnt_sb, cnt_sh, idx_sb, idx_sh, idx_w)
            cnt_ptr = TileCnt + cnt_off
            idx_ptr = TileIdx + idx_off
            n_partial = tl.load(cnt_ptr)
            n_full = tl.load(cnt_ptr + 1)
            for t in range(0, n_partial):
                n_blk = tl.load(idx_ptr + t)
                dq, db_rows = _dq_tile(dq, db_rows, q, do, n_blk, pid_m, offs_m, offs_d, offs_dv, b, h,
                                       K_bh, V_bh, Bias_bh, Lse_bh, LogNorm_bh, Delta_bh, DB_bh, stride_kn, stride_vn,
                                       stride_bm, stride_bn, stride_dbm, Nq, Nk, D, DV, qk_scale, bias_scale, s_shift,
                                       drop_p, drop_seed,
                                       win_lo0, win_hi0, win_lo1, win_hi1, win_c0, win_s0, win_c1, win_s1,
                                       SegQ, SegK, seg_q_sb, seg_k_sb,
                                       DenseM, dn_sb, dn_sh, dn_sm, dn_sn, BlkM, bl_sb, bl_sh, bl_sm, bl_sn,
                                       blk_bq, blk_bk, EdgeT, EdgeW, ed_sb, ed_sm,
                                       True, SCORE, HAS_BIAS, HAS_DBIAS, DB_ROWS, DB_COLS, DB_ACC,
                                       BLOCK_N, CHECK_D, CHECK_DV, DOT_PREC, TERM0, TERM1, TERM2, NUM_TERMS)
            for t in range(n_partial, n_partial + n_full):
                n_blk = tl.load(idx_ptr + t)
                dq, db_rows = _dq_tile(dq, db_rows, q, do, n_blk, pid_m, offs_m, offs_d, offs_dv, b, h,
                                       K_bh, V_bh, Bias_bh, Lse_bh, LogNorm_bh, Delta_bh, DB_bh, stride_kn, stride_vn,
                                       stride_bm, stride_bn, stride_dbm, Nq, Nk, D, DV, qk_scale, bias_scale, s_shift,
                                       drop_p, drop_seed,
                                       win_lo0, win_hi0, win_lo1, win_hi1, win_c0, win_s0, win_c1, win_s1,
                                       SegQ, SegK, seg_q_sb, seg_k_sb,
                                       DenseM, dn_sb, dn_sh, dn_sm, dn_sn, BlkM, bl_sb, bl_sh, bl_sm, bl_sn,
                                       blk_bq, blk_bk, EdgeT, EdgeW, ed_sb, ed_sm,
                                       False, SCORE, HAS_BIAS, HAS_DBIAS, DB_ROWS, DB_COLS, DB_ACC,
                                       BLOCK_N, CHECK_D, CHECK_DV, DOT_PREC, TERM0, TERM1, TERM2, NUM_TERMS)
            dq = dq * sm_scale
            tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
                     dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < D))
    if HAS_DBIAS:
        if not DB_COLS:
            # dBias (.., Nq|1, 1): row sums over every key tile and every (batch, head) of this program.
            DB_o = DBias + (b_out * B_LOOP).to(tl.int64) * stride_dbb + (h_out * H_LOOP).to(tl.int64) * stride_dbh
            if DB_ROWS:
                tl.store(DB_o + offs_m * stride_dbm, db_rows, mask=offs_m < Nq)
            else:
                tl.store(DB_o + pid_m * stride_dbm, tl.sum(db_rows, 0))


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """Everything about one call that is not a tensor input."""

    mask: Mask
    program: MaskProgram
    scale: float
    score: str
    q_len: int
    k_len: int
    block_d: int
    block_dv: int
    fwd_tiles: tuple
    bwd_tiles: tuple
    dot_prec: str
    dropout_p: float = 0.0
    seed: int = 0  # Philox key of the dropout draw (the same in the forward and the backward)
    alibi: Optional[torch.Tensor] = None  # fp32 (H,) ALiBi slopes computed in the kernel (no bias tensor)

    @property
    def score_id(self) -> int:
        """The kernels' SCORE constexpr: 0 softmax, 1 sigmoid, + 2 with dropout."""
        return (0 if self.score == "softmax" else 1) + (2 if self.dropout_p > 0.0 else 0)

    def units(self) -> tuple[float, float, float]:
        """(qk_scale, bias_scale, s_shift): softmax works in base 2, sigmoid in natural units."""
        if self.score == "softmax":
            return self.scale * LOG2E, LOG2E, 0.0
        return self.scale, 1.0, -math.log(self.k_len)


def _pad_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _bias_strides(bias: Optional[torch.Tensor]) -> tuple[int, int, int, int]:
    if bias is None:
        return (0, 0, 0, 0)
    return tuple(bias.stride(i) if bias.shape[i] > 1 else 0 for i in range(4))


def _bias_launch(bias: Optional[torch.Tensor], plan: "_Plan", q: torch.Tensor) -> tuple[torch.Tensor, int, tuple]:
    """(pointer argument, HAS_BIAS mode, the four bias strides) of a launch: mode 1 a bias tensor; 2 ALiBi, whose
    slopes vector takes one head per element and whose row-stride slot carries Nk - Nq (see _scores); 0 none
    (q stands in for the pointer)."""
    if bias is not None:
        return bias, 1, _bias_strides(bias)
    if plan.alibi is not None:
        return plan.alibi, 2, (0, 1, plan.k_len - plan.q_len, 0)
    return q, 0, (0, 0, 0, 0)


def _bias_span(bias: torch.Tensor) -> int:
    """Largest offset inside one (batch, head) slice of the bias (the kernel computes it in 32 bits)."""
    _, _, sm, sn = _bias_strides(bias)
    return (bias.shape[2] - 1) * sm + (bias.shape[3] - 1) * sn


def _check_tensor(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"flash_attention: {name} must have a unit stride in its last dim, got strides {t.stride()}")
    if t.shape[-2] * max(t.stride(-2), 1) > _MAX_OFFSET:
        raise ValueError(
            f"flash_attention: {name} of shape {tuple(t.shape)} with row stride {t.stride(-2)} exceeds the kernel's "
            "32-bit in-slice offsets"
        )


def _launch_over_pairs(kernel, row_tiles: int, pairs: int, *args, **meta) -> None:
    """``kernel[(row_tiles, pairs)](*args, **meta)`` in launches of at most ``_MAX_GRID_PAIRS`` programs along grid
    axis 1 (CUDA caps gridDim.y at 65,535; MaxViT folds windows into the batch, so B * H reaches it), each told
    its first pair by ``pair_base``. Every program owns its outputs (dBias slices included), so the chunks are
    independent."""
    for base in range(0, pairs, _MAX_GRID_PAIRS):
        kernel[(row_tiles, min(_MAX_GRID_PAIRS, pairs - base))](*args, pair_base=base, **meta)


def _output_spans(q: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], bias_grad: bool) -> list:
    """(name, rows, row stride) of the buffers the launchers allocate themselves, whose in-slice offsets the
    kernels compute in 32 bits like those of the inputs: the output (row stride Dv, which may exceed D) and, when
    the bias needs a gradient, the contiguous fp32 dBias buffer (row stride Nk even when the bias is a stride-0
    expand; one row per query tile, at most cdiv(Nq, 16), when the bias is broadcast over rows)."""
    q_len = q.shape[2]
    spans = [("output", q_len, v.shape[3])]
    if bias is not None and bias_grad:
        rows = q_len if bias.shape[2] == q_len else triton.cdiv(q_len, 16)
        spans.append(("bias gradient buffer", rows, bias.shape[3]))
    return spans


def _span_reason(q, v, bias, bias_grad: bool) -> Optional[str]:
    """Why an allocated buffer's offsets would overflow 32 bits, or None."""
    for name, rows, row_stride in _output_spans(q, v, bias, bias_grad):
        if rows * row_stride > _MAX_OFFSET:
            return (f"the {name} ({rows} rows of {row_stride}) is too large for the kernel's 32-bit in-slice "
                    "offsets; use backend='torch' or split the sequence")
    return None


def _mask_launch_args(plan: _Plan, device) -> tuple[tuple, dict]:
    dummy = torch.zeros(1, dtype=torch.uint8, device=device)
    return plan.program.kernel_args(dummy), plan.program.constexprs()


def _forward(q, k, v, bias, plan: _Plan):
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
    block_m, block_n = plan.fwd_tiles
    lists = kernel_tile_lists(plan.mask, q_len, k_len, block_m, block_n, q.device)
    out = torch.empty(batch, heads, q_len, dv_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, q_len, dtype=torch.float32, device=q.device)
    log_norm = torch.empty_like(lse)  # log2 of the softmax normaliser: the backward's P (see _probs_and_dscores)
    bias_arg, bias_mode, bias_strides = _bias_launch(bias, plan, q)
    qk_scale, bias_scale, s_shift = plan.units()
    drop_p, drop_seed = plan.dropout_p, plan.seed
    mask_args, mask_meta = _mask_launch_args(plan, q.device)
    _launch_over_pairs(
        _attn_fwd, lists.num_row_tiles, batch * heads,
        q, k, v, bias_arg, out, lse, log_norm, lists.counts, lists.index,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *bias_strides,
        out.stride(0), out.stride(1), out.stride(2), *lists.strides(),
        heads, heads // kv_heads, q_len, k_len, head_dim, dv_dim, qk_scale, bias_scale, s_shift, drop_p, drop_seed,
        *mask_args, tune_bucket=_tune_bucket(q_len, k_len, lists),
        SCORE=plan.score_id, HAS_BIAS=bias_mode, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=plan.block_d, BLOCK_DV=plan.block_dv, CHECK_D=head_dim != plan.block_d,
        CHECK_DV=dv_dim != plan.block_dv, DOT_PREC=plan.dot_prec, **mask_meta,
    )
    return out, lse, log_norm


def _backward(q, k, v, bias, out, lse, log_norm, d_out, plan: _Plan, bias_grad: bool, d_lse=None):
    """Gradients of q, k, v (and the bias). ``d_lse``: gradient of the base-2 LSE output (or None); ``log_norm``:
    the forward's log2 softmax normaliser per row.

    With L depending on lse_i = log sum_j exp(s_ij) as well as on the output, dL/ds_ij gains
    p_ij * dL/dlse_i; in FlashAttention-2's dS = P * (dP - delta) that is delta_i -> delta_i - dL/dlse_i
    (natural log units: the kernel stores log2, so dL/dlse_nat = d_lse / ln 2).
    """
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    groups = heads // kv_heads
    # A gradient that arrives through the usual head merge, out.transpose(1, 2).reshape(B, N, H * Dv), has rows
    # H * Dv apart, which can pass the kernels' 32-bit in-slice offsets where the output's rows of Dv did not: it is
    # copied to the output's layout (checked by _run before the forward) rather than refused after a forward that
    # succeeded.
    if d_out.stride(-1) != 1 or d_out.shape[-2] * max(d_out.stride(-2), 1) > _MAX_OFFSET:
        d_out = d_out.clone(memory_format=torch.contiguous_format)
    _check_tensor("grad_out", d_out)  # the output and dBias buffers' offsets were checked by _run, before the forward
    block_m, block_n = plan.bwd_tiles
    q_lists = kernel_tile_lists(plan.mask, q_len, k_len, block_m, block_n, q.device)
    k_lists = kernel_tile_lists(plan.mask, q_len, k_len, block_m, block_n, q.device, transposed=True)
    qk_scale, bias_scale, s_shift = plan.units()
    drop_p, drop_seed = plan.dropout_p, plan.seed
    mask_args, mask_meta = _mask_launch_args(plan, q.device)
    bias_arg, bias_mode, bias_strides = _bias_launch(bias, plan, q)
    common_meta = dict(
        SCORE=plan.score_id, HAS_BIAS=bias_mode, HAS_DBIAS=bias_grad, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=plan.block_d, BLOCK_DV=plan.block_dv, CHECK_D=head_dim != plan.block_d,
        CHECK_DV=dv_dim != plan.block_dv, DOT_PREC=plan.dot_prec, **mask_meta,
    )

    delta = torch.empty(batch, heads, q_len, dtype=torch.float32, device=q.device)
    if plan.score == "softmax":
        _launch_over_pairs(
            _attn_bwd_preprocess, triton.cdiv(q_len, block_m), batch * heads,
            out, d_out, delta, out.stride(0), out.stride(1), out.stride(2),
            d_out.stride(0), d_out.stride(1), d_out.stride(2), heads, q_len, dv_dim,
            BLOCK_M=block_m, BLOCK_DV=plan.block_dv,
        )
    else:
        delta.zero_()  # unused by the sigmoid score
    if d_lse is not None and plan.score == "softmax":
        # Rows with no allowed key (LSE -inf) have P = 0: drop whatever arrives there (NaN from logaddexp).
        d_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), d_lse.float())
        delta = delta - d_lse * (1.0 / LN2)

    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    _launch_over_pairs(
        _attn_bwd_dkdv, k_lists.num_row_tiles, batch * kv_heads,
        q, k, v, bias_arg, d_out, lse, log_norm, delta, dk, dv, k_lists.counts, k_lists.index,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *bias_strides,
        d_out.stride(0), d_out.stride(1), d_out.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        *k_lists.strides(),
        heads, groups, q_len, k_len, head_dim, dv_dim, qk_scale, bias_scale, s_shift, drop_p, drop_seed, plan.scale,
        *mask_args, tune_bucket=_tune_bucket(q_len, k_len, k_lists), **common_meta,
    )

    dq = torch.empty_like(q)
    b_loop = h_loop = 1
    # Placeholders when no bias gradient (a real buffer: the autotuner zeroes DBias between trials).
    dbias_buf, db_rows, db_cols = torch.zeros(1, dtype=torch.float32, device=q.device), True, True
    if bias_grad:
        bb, bh, br, bc = bias.shape
        b_loop = batch if (bb == 1 and batch > 1) else 1
        h_loop = heads if (bh == 1 and heads > 1) else 1
        db_rows, db_cols = br == q_len, bc == k_len
        # rows broadcast: one partial row per query tile, summed below.
        rows = q_len if db_rows else q_lists.num_row_tiles
        dbias_buf = torch.zeros(bb, bh, rows, bc, dtype=torch.float32, device=q.device)
    db_strides = (
        (dbias_buf.stride(0) if dbias_buf.shape[0] > 1 else 0, dbias_buf.stride(1) if dbias_buf.shape[1] > 1 else 0,
         dbias_buf.stride(2))
        if bias_grad else (0, 0, 0)
    )
    h_out = heads // h_loop
    _launch_over_pairs(
        _attn_bwd_dq, q_lists.num_row_tiles, (batch // b_loop) * h_out,
        q, k, v, bias_arg, d_out, lse, log_norm, delta, dq, dbias_buf, q_lists.counts, q_lists.index,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *bias_strides,
        d_out.stride(0), d_out.stride(1), d_out.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), *db_strides,
        *q_lists.strides(),
        heads, groups, q_len, k_len, head_dim, dv_dim, qk_scale, bias_scale, s_shift, drop_p, drop_seed, plan.scale,
        b_loop, h_loop, h_out,
        *mask_args, tune_bucket=_tune_bucket(q_len, k_len, q_lists),
        DB_ROWS=db_rows, DB_COLS=db_cols, DB_ACC=b_loop * h_loop > 1, **common_meta,
    )
    dbias = None
    if bias_grad:
        dbias = dbias_buf if db_rows else dbias_buf.sum(dim=2, keepdim=True)
        dbias = dbias.to(bias.dtype)
    return dq, dk, dv, dbias


# ------------------------------------------------------------------------------------------------
# autograd.Function
# ------------------------------------------------------------------------------------------------
class _FlashAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, plan: _Plan):
        with on_device_of(q):  # Triton launches on the current device: make it q's
            out, lse, log_norm = _forward(q, k, v, bias, plan)
        ctx.save_for_backward(q, k, v, bias, out, lse, log_norm)
        ctx.plan = plan
        # Unused outputs get None gradients (no zero-filled LSE gradient when only out is used).
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        # (once_differentiable raised only for incoming gradients that require grad: create_graph=True with
        # constant ones got first-order gradients treated as constants, silently)
        refuse_double_backward("the Triton flash-attention kernel", "run that attention with backend='torch', "
                               "whose gradients are differentiable")
        q, k, v, bias, out, lse, log_norm = ctx.saved_tensors
        if d_out is None:  # only the LSE was used
            d_out = torch.zeros_like(out)
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        with on_device_of(q):
            dq, dk, dv, dbias = _backward(q, k, v, bias, out, lse, log_norm, d_out, ctx.plan, bias_grad, d_lse)
        return dq, dk, dv, dbias, None


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_inputs(q, k, v, score, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flash_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must be 4-D (batch, heads, length, head_dim), got {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"flash_attention: {name} must be float16, bfloat16 or float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"flash_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    (b, h, _, d), (bk, hk, nk, dk), (bv, hv, nv, dv) = q.shape, k.shape, v.shape
    if min(q.shape) == 0 or min(k.shape) == 0 or min(v.shape) == 0:
        raise ValueError(f"flash_attention: empty input q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (b == bk == bv):
        raise ValueError(f"flash_attention: batch sizes differ: q {b}, k {bk}, v {bv}")
    if hk != hv or nk != nv:
        raise ValueError(f"flash_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must agree on heads and length")
    if h % hk != 0:
        raise ValueError(f"flash_attention: query heads ({h}) must be a multiple of key/value heads ({hk})")
    if d != dk:
        raise ValueError(f"flash_attention: q head dim {d} != k head dim {dk}")
    if d > MAX_HEAD_DIM or dv > MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head dims up to {MAX_HEAD_DIM} are supported, got D={d}, Dv={dv}")
    if score not in ("softmax", "sigmoid"):
        raise ValueError(f"flash_attention: score must be 'softmax' or 'sigmoid', got {score!r}")
    # any finite real scale, as attend() and SDPA take it: the row maxima are taken over the scaled scores, so 0
    # (uniform weights) and negative scales need nothing special; the backward multiplies dq, dk by it
    if scale is not None and not _is_real(scale):
        raise TypeError(f"flash_attention: scale must be a real number, got {type(scale).__name__} {scale!r}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"flash_attention: scale must be a finite number, got {scale!r}")


def _is_real(value) -> bool:
    """A real number (numpy scalars included) and not a bool, as attend() takes its arguments."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_block(name: str, value: Optional[int]) -> None:
    if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 16
                              or value & (value - 1)):
        raise ValueError(f"flash_attention: {name} must be a power of two >= 16, got {value!r}")


def _plan_tiles(block_d: int, block_dv: int, dtype: torch.dtype, smem: Optional[int], block_m: Optional[int],
                block_n: Optional[int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(forward tiles, backward tiles) of a call. Without an override both come from :func:`_tiles`. An override
    (``block_m`` / ``block_n``, the other side taken from the forward's tiles) sets the forward tiles; the backward
    passes take the same tiles when their shared-memory bound (:func:`_bwd_smem`, smallest config) fits ``smem``,
    and otherwise their own fitted tiles (:func:`_tiles`), so that an override the forward can run does not make
    every backward config fail with OutOfResources after the forward succeeded (fp32 D = 128 at 128 x 64 tiles
    needs 256 KB in the dK/dV pass on an H100's 227 KB). ``smem`` None (the interpreter): no limit."""
    fwd = _tiles(block_d, block_dv, dtype, smem, backward=False)
    bwd = _tiles(block_d, block_dv, dtype, smem, backward=True)
    if block_m is None and block_n is None:
        return fwd, bwd
    fwd = (block_m or fwd[0], block_n or fwd[1])
    row_bytes = max(block_d, block_dv) * (4 if dtype == torch.float32 else 2)
    if smem is None or _bwd_smem(fwd, row_bytes) <= smem:
        bwd = fwd
    return fwd, bwd


def _make_plan(q, k, v, mask: Mask, scale: float, score: str, block_m=None, block_n=None, dropout_p: float = 0.0,
               seed: int = 0, alibi: Optional[torch.Tensor] = None) -> _Plan:
    q_len, k_len = q.shape[2], k.shape[2]
    block_d, block_dv = _pad_dim(q.shape[3]), _pad_dim(v.shape[3])
    smem = None
    if q.device.type == "cuda" and not INTERPRET:
        smem = torch.cuda.get_device_properties(q.device).shared_memory_per_block_optin
    fwd, bwd = _plan_tiles(block_d, block_dv, q.dtype, smem, block_m, block_n)
    allow_tf32 = q.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    dot_prec = "tf32" if (q.dtype != torch.float32 or allow_tf32) else "ieee"
    program = lower_mask(mask, q_len, k_len, q.device)
    return _Plan(mask, program, float(scale), score, q_len, k_len, block_d, block_dv, fwd, bwd, dot_prec,
                 float(dropout_p), int(seed), alibi)


def _draw_seed() -> int:
    """The Philox key of one call's dropout, from torch's default generator (torch.manual_seed reproduces it)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


@triton.jit
def _dropout_scale_kernel(Out, drop_p, drop_seed, H, Nq, Nk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(0)  # axis 0: up to 2**31 - 1 (batch, head) pairs (axes 1 and 2 stop at 65,535)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    z = _dropout_scale(drop_p, drop_seed, b, h, offs_m, offs_n, Nk)
    ptrs = Out + pid_bh.to(tl.int64) * Nq * Nk + offs_m.to(tl.int64)[:, None] * Nk + offs_n[None, :]
    tl.store(ptrs, z, mask=(offs_m < Nq)[:, None] & (offs_n < Nk)[None, :])


def dropout_scale(batch: int, heads: int, q_len: int, k_len: int, dropout_p: float, seed: int,
                  device="cuda") -> torch.Tensor:
    """fp32 (B, H, Nq, Nk): the kernels' dropout draw for ``seed`` materialised (1 / (1 - p) kept, 0 dropped),
    for tests: ``flash_attention_ref(..., dropout_scale=...)`` then reproduces a call with that seed."""
    out = torch.empty(batch, heads, q_len, k_len, dtype=torch.float32, device=device)
    grid = (batch * heads, triton.cdiv(q_len, 32), triton.cdiv(k_len, 32))
    with on_device_of(out):
        _dropout_scale_kernel[grid](out, float(dropout_p), int(seed), heads, q_len, k_len, BLOCK_M=32, BLOCK_N=32)
    return out


def _check_dropout(dropout_p, q: torch.Tensor, k: torch.Tensor) -> Optional[str]:
    """None when the kernel's dropout can serve this problem, else why not (the Philox offsets hold the batch
    below 2**15, the head below 2**16 and the pair index i * Nk + j below 2**32)."""
    if not (_is_real(dropout_p) and 0.0 <= dropout_p < 1.0):
        return f"dropout_p must be a number in [0, 1), got {dropout_p!r}"
    if dropout_p > 0.0:
        if q.shape[0] >= 2**15 or q.shape[1] >= 2**16 or q.shape[2] * k.shape[2] >= 2**32:
            return (f"dropout with batch {q.shape[0]}, {q.shape[1]} heads and {q.shape[2]} x {k.shape[2]} pairs "
                    "exceeds the kernel's random-number offsets (batch < 2**15, heads < 2**16, Nq * Nk < 2**32)")
    return None


def _run(q, k, v, mask, bias, scale, score, block_m=None, block_n=None, dropout_p=0.0):
    _check_inputs(q, k, v, score, scale)
    _check_block("block_m", block_m)
    _check_block("block_n", block_n)
    reason = _check_dropout(dropout_p, q, k)
    if reason is not None:
        raise ValueError(f"flash_attention: {reason}")
    if in_torch_func():
        raise ValueError(f"flash_attention: {_TORCH_FUNC_REASON}")
    if q.device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"flash_attention: tensors are on {q.device}; the Triton kernel needs CUDA (or TRITON_INTERPRET=1 set "
            "before zoo.kernels.flash_attention is imported, for CPU tensors)"
        )
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    mask = as_mask(mask)
    mask.check_shape(q_len, k_len, batch, heads)
    if mask.batch_size not in (1, batch) or mask.num_heads not in (1, heads):
        raise ValueError(
            f"flash_attention: mask {mask!r} (batch {mask.batch_size}, heads {mask.num_heads}) does not broadcast "
            f"to batch {batch}, heads {heads}"
        )
    alibi = None
    if isinstance(bias, ALiBi):  # computed in the kernel from its slopes: no (H, Nq, Nk) bias tensor
        if bias.num_heads != heads:
            raise ValueError(f"flash_attention: ALiBi has {bias.num_heads} slopes but q has {heads} heads")
        alibi, bias = bias.slopes.to(q.device, torch.float32).contiguous(), None
    bias = resolve_bias(bias, q_len, k_len, device=q.device, dtype=q.dtype)
    if bias is not None:
        if bias.shape[0] not in (1, batch) or bias.shape[1] not in (1, heads):
            raise ValueError(f"flash_attention: bias {tuple(bias.shape)} does not broadcast to ({batch}, {heads}, "
                             f"{q_len}, {k_len})")
        if bias.device != q.device:
            raise ValueError(f"flash_attention: bias is on {bias.device} but q is on {q.device}")
        if bias.dtype not in _DTYPES:
            raise TypeError(f"flash_attention: bias must be float16, bfloat16 or float32, got {bias.dtype}")
        if _bias_span(bias) > _MAX_OFFSET:
            raise ValueError(f"flash_attention: bias {tuple(bias.shape)} with strides {bias.stride()} exceeds the "
                             "kernel's 32-bit in-slice offsets")
    # the buffers the launcher allocates (output, and the fp32 dBias when the bias needs a gradient), refused before
    # the forward runs (the dBias buffer used to be refused only in backward)
    span = _span_reason(q, v, bias, bias is not None and bias.requires_grad and torch.is_grad_enabled())
    if span is not None:
        raise ValueError(f"flash_attention: {span}" + (
            "; a bias broadcast over the query rows can be passed un-expanded, shape (..., 1, Nk), which keeps a "
            "buffer of cdiv(Nq, 16) rows" if bias is not None and bias.requires_grad else ""))
    if INTERPRET and torch.bfloat16 in (q.dtype, getattr(bias, "dtype", None)):  # CUDA tensors included
        raise TypeError("flash_attention: bfloat16 is computed wrongly by the Triton interpreter (q or bias; "
                        "TRITON_INTERPRET=1 is set); use float16/float32")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
    seed = _draw_seed() if dropout_p > 0.0 else 0
    block_m, block_n = (None if b is None else int(b) for b in (block_m, block_n))  # numpy ints: kernel constants
    plan = _make_plan(q, k, v, mask, scale, score, block_m, block_n, float(dropout_p), seed, alibi)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _FlashAttentionFn.apply(q, k, v, bias, plan)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask=None,
    bias=None,
    *,
    scale: Optional[float] = None,
    score: str = "softmax",
    return_lse: bool = False,
    dropout_p: float = 0.0,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
):
    """Block-sparse flash attention (differentiable in q, k, v and bias).

    Args:
        q: (B, H, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv); fp16, bf16 or fp32, CUDA (or CPU under
            TRITON_INTERPRET=1). H % Hkv == 0. D, Dv <= 256.
        mask: a zoo.attention mask (Full, Causal, Window, ChunkWindow, Segments, Dense, BlockSparse, Radial, Edges,
            & and | combinations), a bool tensor (True = may attend) or None.
        bias: float tensor broadcastable to (B, H, Nq, Nk) or a zoo.attention.AttentionBias. An
            :class:`~zoo.attention.ALiBi` is computed inside the kernel from its slopes (O(N) memory, no bias
            tensor, no gradient: its slopes are fixed); other bias objects are materialised.
        scale: default 1/sqrt(D); any finite real number (0: uniform weights over the allowed keys; negative values
            as SDPA computes them).
        score: "softmax" or "sigmoid" (sigmoid(scale * q.k + bias - log Nk), no normalisation).
        return_lse: also return the row log-sum-exp (B, H, Nq) fp32 in natural log (softmax only; -inf for
            rows with no allowed key; differentiable). With dropout it is that of the scores before dropout.
        dropout_p: attention dropout, as SDPA's: each weight that multiplies V is zeroed with probability p and
            the others scaled by 1 / (1 - p). The draw (Philox, keyed from torch's default generator) is
            recomputed in the backward pass, never stored; :func:`dropout_scale` materialises it for tests.
        block_m, block_n: override the forward's query/key tile sizes (powers of two >= 16; for tests and tuning).
            The backward passes use the same tiles where their shared-memory bound (_bwd_smem) fits the device, and
            their own fitted tiles otherwise (see _plan_tiles).

    Returns:
        out (B, H, Nq, Dv) in the input dtype, or (out, lse).
    """
    if return_lse and score != "softmax":
        raise ValueError("flash_attention: return_lse is defined for score='softmax' only")
    out, lse = _run(q, k, v, mask, bias, scale, score, block_m, block_n, dropout_p)
    if return_lse:
        return out, _natural_lse(lse)
    return out


# ------------------------------------------------------------------------------------------------
# Backend hooks for zoo.attention (registered as "triton" in zoo/attention/backends.py)
# ------------------------------------------------------------------------------------------------
def triton_supports(q, k, v, mask, bias, scale, score, dropout_p, return_weights) -> Optional[str]:
    """None when the kernel can run this attend() call, else the reason it cannot."""
    if in_torch_func():
        # The autograd.Function has no torch.func rules (setup_context, vmap): torch's own error would only say
        # "must override the setup_context staticmethod".
        return _TORCH_FUNC_REASON
    if q.device.type != "cuda" and not INTERPRET:
        return (
            "the Triton kernel needs CUDA tensors (CPU tensors only when TRITON_INTERPRET=1 was set before "
            "zoo.kernels.flash_attention was imported)"
        )
    if INTERPRET and q.dtype == torch.bfloat16:  # CUDA tensors too: the interpreter runs them on the host
        return "bfloat16 is computed wrongly by the Triton interpreter (TRITON_INTERPRET=1; use float16/float32)"
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype} (the kernel takes float16, bfloat16, float32)"
    if isinstance(bias, ALiBi):
        if bias.num_heads != q.shape[1]:
            return f"ALiBi has {bias.num_heads} slopes for {q.shape[1]} heads"
        bias = None  # computed in the kernel: nothing to check
    if bias is not None and bias.dtype not in _DTYPES:
        return f"bias dtype {bias.dtype}"
    if bias is not None and bias.dtype == torch.bfloat16 and INTERPRET:
        return "bfloat16 bias under the Triton interpreter (TRITON_INTERPRET=1)"
    reason = _check_dropout(dropout_p, q, k)
    if reason is not None:
        return reason
    if return_weights:
        return "return_weights=True (the kernel never materialises the attention matrix)"
    if score not in ("softmax", "sigmoid"):
        return f"score={score!r}"
    if q.shape[3] > MAX_HEAD_DIM or v.shape[3] > MAX_HEAD_DIM:
        return f"head dim > {MAX_HEAD_DIM} (D={q.shape[3]}, Dv={v.shape[3]})"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[2] * max(t.stride(2), t.shape[3]) > _MAX_OFFSET:
            return f"{name} is too long for 32-bit in-slice offsets"
    if bias is not None and _bias_span(bias) > _MAX_OFFSET:
        return "bias slice too large for 32-bit in-slice offsets"
    reason = _span_reason(q, v, bias, bias is not None and bias.requires_grad)
    if reason is not None:
        return reason
    q_len, k_len = q.shape[2], k.shape[2]
    if needs_dense_fallback(mask, q_len, k_len):
        cells = mask.batch_size * mask.num_heads * q_len * k_len
        if cells > DENSE_FALLBACK_LIMIT:
            return f"mask {mask!r} has no in-kernel form and a dense copy would need {cells} cells"
    elif not _segment_ids_fit_int32(mask):
        return "Segments ids outside int32 (the kernel reads them as int32)"
    return None


# Per mask (and its version): whether every Segments id fits the kernel's int32 (one min/max pass, once)
_INT32_IDS: "weakref.WeakKeyDictionary[Mask, dict]" = weakref.WeakKeyDictionary()


def _segment_ids_fit_int32(mask: Mask) -> bool:
    if isinstance(mask, (And, Or)):
        return _segment_ids_fit_int32(mask.a) and _segment_ids_fit_int32(mask.b)
    if isinstance(mask, SegmentWindow):
        return _segment_ids_fit_int32(mask.segments)
    if not isinstance(mask, Segments):
        return True
    known = mask.versioned_cache(_INT32_IDS.setdefault(mask, {}))
    fits = known.get("fits")  # one lookup: the cache may be emptied by another thread in between
    if fits is None:
        fits = known["fits"] = all(ids_fit_int32(ids) for ids in mask.tensors())
    return fits


def _natural_lse(lse2: torch.Tensor) -> torch.Tensor:
    """The kernel's base-2 row LSE (B, H, Nq) in natural log. A row whose every allowed score sits at the clamp (each
    key biased by torch.finfo(float32).min, or .max) has lse2 = -FLT_MAX (or FLT_MAX), whose natural value
    FLT_MAX ln 2 (2.36e38) is 1e38 away from the definition's -FLT_MAX (+FLT_MAX), what the reference backends return
    there: such rows are moved to it by a detached shift, so that every backend gives them one LSE (and
    merge_attention_states one weight) and the gradient is unchanged."""
    lse = lse2 * LN2
    saturated = torch.isfinite(lse2) & (lse2.abs() >= _FLT_MAX)
    shift = torch.where(saturated, torch.sign(lse2) * _FLT_MAX - lse, torch.zeros_like(lse))
    return lse + shift.detach()


def triton_attention(q, k, v, mask, bias, scale, score, dropout_p, return_weights, return_lse=False):
    """The "triton" backend's forward (arguments as validated by zoo.attention.attend); with ``return_lse``
    (softmax only) also the row LSE (B, H, Nq), fp32, natural log, differentiable."""
    reason = triton_supports(q, k, v, mask, bias, scale, score, dropout_p, return_weights)
    if reason is None and return_lse and score != "softmax":
        reason = "return_lse is defined for score='softmax' only"
    if reason is not None:
        raise ValueError(f"triton backend cannot run this call: {reason}")
    out, lse = _run(q, k, v, mask, bias, scale, score, dropout_p=dropout_p)
    return (out, _natural_lse(lse)) if return_lse else out


# ------------------------------------------------------------------------------------------------
# fp32 reference
# ------------------------------------------------------------------------------------------------
def flash_attention_ref(q, k, v, mask=None, bias=None, *, scale=None, score="softmax", return_lse=False,
                        dropout_scale=None):
    """Plain PyTorch attention in fp32 (fp64 when given fp64), materialising Nq x Nk; differentiable.

    Same semantics as :func:`flash_attention`: GQA by repeating k/v heads, bottom-right aligned masks,
    rows with no allowed key give zeros and LSE -inf. ``dropout_scale`` (B, H, Nq, Nk): the weights that
    multiply V are multiplied by it (a kernel call's dropout, from :func:`dropout_scale`). For tests and as
    the definition of the kernel.
    """
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    groups = heads // k.shape[1]
    qf, kf, vf = q.to(dtype), k.to(dtype).repeat_interleave(groups, 1), v.to(dtype).repeat_interleave(groups, 1)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    bias = resolve_bias(bias, q_len, k_len, device=q.device, dtype=dtype)
    if bias is not None:
        s = s + bias.to(dtype)
    allowed = as_mask(mask).dense(q_len, k_len, q.device).expand(batch, heads, q_len, k_len)
    if score == "softmax":
        s = s.masked_fill(~allowed, float("-inf"))
        row_max = s.amax(dim=-1, keepdim=True).detach()
        row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
        e = torch.exp(s - row_max)
        denom = e.sum(dim=-1, keepdim=True)
        p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
        # -inf for empty rows, with a finite gradient path (no log(0) in the graph).
        has_key = denom > 0
        lse = torch.where(has_key, row_max + torch.log(torch.where(has_key, denom, 1.0)), float("-inf")).squeeze(-1)
    elif score == "sigmoid":
        p = torch.sigmoid(s - math.log(k_len)).masked_fill(~allowed, 0.0)
        lse = None
    else:
        raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")
    if dropout_scale is not None:
        p = p * dropout_scale.to(dtype)
    out = torch.matmul(p, vf)
    if return_lse:
        if lse is None:
            raise ValueError("return_lse is defined for score='softmax' only")
        return out, lse
    return out


# ------------------------------------------------------------------------------------------------
# Offline GPU compile check (no GPU needed): python -m zoo.kernels.flash_attention --arch 80 90
# ------------------------------------------------------------------------------------------------
# Shared memory per block (bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin) by compute capability.
_SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
_PTR_ARGS = {"Q", "K", "V", "Out", "DO", "DK", "DVo", "DQ"}
_F32_PTR_ARGS = {"Bias", "Lse", "LogNorm", "Delta", "DBias"}
_I32_PTR_ARGS = {"TileCnt", "TileIdx", "SegQ", "SegK", "EdgeT", "EdgeW"}
_U8_PTR_ARGS = {"DenseM", "BlkM"}
_FLOAT_ARGS = {"qk_scale", "bias_scale", "s_shift", "sm_scale", "drop_p"}


def _compile(kernel, constexprs: dict, dtype: torch.dtype, arch: int, num_warps: int, num_stages: int) -> int:
    """Compile one kernel specialisation for sm_<arch> with Triton's bundled ptxas; returns its shared memory."""
    from zoo.kernels._compile import compile_for_gpu, pointer_type

    elem = pointer_type(dtype)
    types = {name: elem for name in _PTR_ARGS}
    types.update({name: "*fp32" for name in _F32_PTR_ARGS})
    types.update({name: "*i32" for name in _I32_PTR_ARGS})
    types.update({name: "*u8" for name in _U8_PTR_ARGS})
    types.update({name: "fp32" for name in _FLOAT_ARGS})
    return compile_for_gpu(kernel, types, constexprs, arch, num_warps, num_stages)


def compile_check(arch: int = 90, dtype: torch.dtype = torch.float16, head_dim: int = 64, score: str = "softmax",
                  bias: int = 1, terms: tuple = (37, 8, 16 | 512), all_configs: bool = True,
                  dropout: bool = True) -> dict:
    """Compile every pass (all autotune configs) for sm_<arch> without a GPU.

    Returns {pass name: [(num_warps, num_stages, shared bytes), ...]} and raises RuntimeError when no
    config of a pass fits the shared memory of that GPU generation. ``terms`` are the mask terms compiled
    (default: WIN0&CHUNK0&SEG | DENSE | BLK&EDGE, the largest predicate: a chunked window, segments, a dense mask
    tile, a tile-map lookup and an edge-bitmask lookup). ``bias``: 0 / False none, 1 / True a bias tensor, 2 ALiBi computed in the
    kernel. ``dropout``: the variant with dropout (the Philox draws; the larger program).
    ``all_configs=False`` compiles only the first (smallest) config of each pass. Needs the module imported
    without TRITON_INTERPRET=1.
    """
    if arch not in _SMEM_LIMIT:  # a guessed limit would check tiles the device never runs
        raise ValueError(f"compile_check: no shared-memory size known for sm_{arch}; known: "
                         f"{', '.join(f'sm_{a}' for a in sorted(_SMEM_LIMIT))}")
    if INTERPRET:
        raise RuntimeError("compile_check needs zoo.kernels.flash_attention imported without TRITON_INTERPRET=1")
    block = _pad_dim(head_dim)
    padded = tuple(terms) + (0,) * (3 - len(terms))
    mask_meta = dict(TERM0=padded[0], TERM1=padded[1], TERM2=padded[2], NUM_TERMS=len(terms))
    score_id = (0 if score == "softmax" else 1) + (2 if dropout else 0)
    common = dict(SCORE=score_id, HAS_BIAS=int(bias), BLOCK_D=block, BLOCK_DV=block,
                  CHECK_D=head_dim != block, CHECK_DV=head_dim != block,
                  DOT_PREC="ieee" if dtype == torch.float32 else "tf32", **mask_meta)
    limit = _SMEM_LIMIT[arch]
    fm, fn_ = _tiles(block, block, dtype, limit, backward=False)
    bm, bn = _tiles(block, block, dtype, limit, backward=True)
    passes = {
        "forward": (_attn_fwd, dict(common, BLOCK_M=fm, BLOCK_N=fn_), _configs("fwd")),
        "backward dk/dv": (_attn_bwd_dkdv, dict(common, BLOCK_M=bm, BLOCK_N=bn, HAS_DBIAS=bias == 1), _configs("bwd")),
        # Launches specialise integer arguments equal to 1 (B_LOOP = H_LOOP = 1 without a broadcast bias
        # gradient); the broadcast-bias variant keeps the (batch, head) loops.
        "backward dq": (
            _attn_bwd_dq,
            dict(common, BLOCK_M=bm, BLOCK_N=bn, HAS_DBIAS=bias == 1, DB_ROWS=True, DB_COLS=True, DB_ACC=False,
                 B_LOOP=1, H_LOOP=1),
            _configs("bwd"),
        ),
        "backward preprocess": (_attn_bwd_preprocess, dict(BLOCK_M=bm, BLOCK_DV=block), _configs("pre")),
    }
    if bias == 1:
        passes["backward dq, broadcast bias"] = (
            _attn_bwd_dq,
            dict(common, BLOCK_M=bm, BLOCK_N=bn, HAS_DBIAS=True, DB_ROWS=True, DB_COLS=True, DB_ACC=True),
            _configs("bwd"),
        )
    report = {}
    for name, (kernel, meta, configs) in passes.items():
        rows = [(c.num_warps, c.num_stages, _compile(kernel, meta, dtype, arch, c.num_warps, c.num_stages))
                for c in (configs if all_configs else configs[:1])]
        report[name] = rows
        if not any(shared <= limit for _, _, shared in rows):
            raise RuntimeError(f"sm_{arch} {dtype} D={head_dim}: no config of the {name} pass fits {limit} bytes "
                               f"of shared memory: {rows}")
    return report


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Compile the kernels for CUDA targets without a GPU.")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--dtype", nargs="+", default=["float16"], choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--head-dim", type=int, nargs="+", default=[64])
    args = parser.parse_args()
    for arch in args.arch:
        for dtype_name in args.dtype:
            for head_dim in args.head_dim:
                result = compile_check(arch, getattr(torch, dtype_name), head_dim)
                limit = _SMEM_LIMIT[arch]
                summary = ", ".join(f"{k}: {min(s for _, _, s in v) // 1024}-{max(s for _, _, s in v) // 1024} KB, "
                                    f"{sum(s <= limit for _, _, s in v)} of {len(v)} configs fit"
                                    for k, v in result.items())
                # the autotuner skips a config that runs out of shared memory: one that fits per pass is enough
                print(f"sm_{arch} {dtype_name} D={head_dim}: ok, every pass has a config within {limit // 1024} KB "
                      f"({summary})", flush=True)
