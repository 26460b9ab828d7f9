"""CPU block-sparse attention: the "blocksparse" backend of ``attend()``.

The same block maps that drive the Triton kernel (kernels/flash_attention.py) drive a PyTorch path, so
that CPU users train with sparse masks in time that falls with the kept fraction (issue 5, section 1,
last item). For every query tile the key/value tiles that the mask's :class:`~zoo.attention.masks.BlockMap`
marks non-EMPTY are gathered (a plain slice when they are contiguous, as for windows) and attended to
with dense matmuls; FULL tiles skip element-wise masking, and a query tile that touches a PARTIAL tile
applies the mask rows from ``mask.dense(..., rows=...)`` restricted to the gathered columns.

The structure is FlashAttention-2's, written with PyTorch tensor ops (Dao, "FlashAttention-2: Faster
Attention with Better Parallelism and Work Partitioning", 2023; the CPU flash kernel in
aten/src/ATen/native/cpu/FlashAttentionKernel.cpp follows the same plan): a custom autograd Function whose
forward keeps only the output and the row log-sum-exp, and whose backward recomputes the probabilities
tile by tile, accumulating dQ per query tile and scattering dK/dV (and the bias gradient) into the kept
key tiles. Working memory is the scores of one query tile against its kept keys plus zero-padded copies
of K and V, never O(Nq x Nk) (except the bias gradient, which has the bias' own shape). The plan (kept
key tiles per query tile, and the element-wise masks of PARTIAL tiles only) is cached per mask object
and problem size, like the mask's block maps.

Semantics are exactly the reference's (zoo/attention/core.py): softmax or sigmoid (with -log Nk) scores,
additive bias broadcastable to (B, H, Nq, Nk) with its gradient, grouped-query attention without copying
K/V per head, masks that vary over batch or heads (one pass per distinct map slice), and rows whose keys
are all masked return zeros with zero gradients. Not supported (the capability check says so, and
attend() picks another backend): dropout_p > 0, return_weights=True, tracing/export.

Automatic choice: on CPU this backend is tried before SDPA and accepts a call when the mask is not Full,
is not a plain square Causal (SDPA's own causal kernel skips those tiles already), and its kept-tile
fraction is below ``AUTO_MAX_KEPT`` on a problem of at least ``AUTO_MIN_CELLS`` score cells (below that
SDPA's single fused call wins). The thresholds come from measurements on a 2-core CPU (crossover near
0.7 kept tiles from N = 512 to 4096); see docs/bench_attention.md. Forcing it (``backend="blocksparse"``, ``use_backend("blocksparse")`` or
ZOO_ATTN_BACKEND=blocksparse) runs any mask.

Letters: B batch, H query heads, Hkv key/value heads, G = H // Hkv, Nq/Nk lengths, D/Dv head dims,
R rows of one query tile, M gathered key columns of that tile, QB/KB tile counts.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from zoo.attention import backends as _backends
from zoo.attention.masks import EMPTY, PARTIAL, And, BlockSparse, Causal, Mask, Or, as_mask
from zoo.attention.radial import Radial

__all__ = ["block_sparse_attention", "choose_tiles", "AUTO_MAX_KEPT", "AUTO_MIN_CELLS", "DEFAULT_TILE"]

#: Tile size (query and key) for masks without a native block size.
DEFAULT_TILE = 128
#: Smallest tile used when a mask's native block is smaller (tiles are then multiples of it).
MIN_TILE = 64
#: Automatic selection only when the kept-tile fraction is below this ...
AUTO_MAX_KEPT = 0.6
#: ... and the problem has at least this many score cells per (batch, head) (Nq * Nk).
AUTO_MIN_CELLS = 256 * 256


# --------------------------------------------------------------------------------------------------
# Planning: which key columns each query tile visits
# --------------------------------------------------------------------------------------------------
def _native_tiles(mask: Mask) -> Optional[tuple[int, int]]:
    """The tile size at which a mask's block map is exact (BlockSparse, Radial), if any."""
    if isinstance(mask, BlockSparse):
        return mask.block_q, mask.block_k
    if isinstance(mask, Radial):
        return mask.block_size, mask.block_size
    if isinstance(mask, (And, Or)):
        return _native_tiles(mask.a) or _native_tiles(mask.b)
    return None


def choose_tiles(mask: Mask, q_len: int, k_len: int) -> tuple[int, int]:
    """(block_q, block_k) used for ``mask``: its native block (a multiple of it when the native block is
    smaller than MIN_TILE), else DEFAULT_TILE."""
    native = _native_tiles(mask)
    if native is None:
        return DEFAULT_TILE, DEFAULT_TILE
    return tuple(b * max(1, math.ceil(MIN_TILE / b)) for b in native)  # type: ignore[return-value]


@dataclass
class _Tile:
    """One query tile: rows [r0, r1); key columns the run [c0, c1), or the key tiles ``blocks`` (token
    indices ``cols``, ``width`` of them: only the last key tile can be short); ``spans``: the
    stretches (offset, width, forbidden (Bm', Hm', R, width)) of the gathered columns that fall in
    PARTIAL tiles and need element-wise masking (FULL tiles need none)."""

    r0: int
    r1: int
    c0: int
    c1: int
    cols: Optional[torch.Tensor]
    blocks: Optional[torch.Tensor]
    width: int
    spans: list


def _plan_rows(mask: Mask, states_QK, mask_b, mask_h, block_q, block_k, q_len, k_len, device) -> list[_Tile]:
    """Tiles to visit for one (QB, KB) state map; query tiles with no kept key tile are left out."""
    kept_QK = states_QK != EMPTY
    counts = kept_QK.sum(-1).tolist()
    kept_cols = kept_QK.nonzero()[:, 1]
    offsets = torch.arange(block_k)
    tiles, start = [], 0
    for a, count in enumerate(counts):
        if count == 0:
            continue
        blocks = kept_cols[start : start + count]
        start += count
        r0, r1 = a * block_q, min(q_len, (a + 1) * block_q)
        first, last = int(blocks[0]), int(blocks[-1])
        if last - first + 1 == count:  # contiguous: a view, no gather
            c0, c1, cols = first * block_k, min(k_len, (last + 1) * block_k), None
        else:
            c0 = c1 = 0
            cols = (blocks[:, None] * block_k + offsets[None, :]).reshape(-1)
            if (last + 1) * block_k > k_len:
                cols = cols[cols < k_len]
        # PARTIAL tiles among the kept ones, merged into runs of adjacent positions.
        partial = (states_QK[a, blocks] == PARTIAL).tolist()
        spans = []
        if any(partial):
            rows = mask.dense(q_len, k_len, device, rows=(r0, r1))
            rows = rows[mask_b if rows.shape[0] > 1 else slice(None), mask_h if rows.shape[1] > 1 else slice(None)]
            t = 0
            while t < count:
                if not partial[t]:
                    t += 1
                    continue
                u = t
                while u + 1 < count and partial[u + 1] and int(blocks[u + 1]) == int(blocks[u]) + 1:
                    u += 1
                k0, k1 = int(blocks[t]) * block_k, min(k_len, (int(blocks[u]) + 1) * block_k)
                # Gathered columns before position t are whole tiles (only the last tile can be short).
                spans.append((t * block_k, k1 - k0, ~rows[..., k0:k1]))
                t = u + 1
        if cols is None:
            tiles.append(_Tile(r0, r1, c0, c1, None, None, c1 - c0, spans))
        else:
            tiles.append(_Tile(r0, r1, 0, 0, cols.to(device), blocks.to(device), cols.numel(), spans))
    return tiles


@dataclass
class _Slice:
    """A part of the problem sharing one block map: batch/head ranges of q, k/v, the bias and the mask."""

    b: slice
    h: slice
    kv: slice
    bias_b: slice
    bias_h: slice
    block_k: int
    tiles: list


# Plans cached per mask object (like its block maps): {mask: {key: plan}}; a few problem sizes each.
_PLAN_CACHE: "weakref.WeakKeyDictionary[Mask, dict]" = weakref.WeakKeyDictionary()
_PLANS_PER_MASK = 4


def _plan(mask: Mask, bias_shape, batch, heads, kv_heads, q_len, k_len, block_q, block_k, device) -> list[_Slice]:
    """The slices and tiles to visit (cached on the mask for repeated calls with the same sizes)."""
    key = (bias_shape, batch, heads, kv_heads, q_len, k_len, block_q, block_k, str(device))
    per_mask = _PLAN_CACHE.setdefault(mask, {})
    if key in per_mask:
        return per_mask[key]
    states = mask.block_map(q_len, k_len, block_q, block_k, "cpu").states
    mb, mh = states.shape[:2]
    groups = heads // kv_heads
    slices = []
    for i in range(mb):
        for j in range(mh):
            b = slice(i, i + 1) if mb > 1 else slice(0, batch)
            h = slice(j, j + 1) if mh > 1 else slice(0, heads)
            kv = slice(j // groups, j // groups + 1) if mh > 1 else slice(0, kv_heads)
            bias_b = bias_h = slice(None)
            if bias_shape is not None:
                bias_b = b if (mb > 1 and bias_shape[0] > 1) else slice(None)
                bias_h = h if (mh > 1 and bias_shape[1] > 1) else slice(None)
            tiles = _plan_rows(
                mask, states[i, j], slice(i, i + 1), slice(j, j + 1), block_q, block_k, q_len, k_len, device
            )
            slices.append(_Slice(b, h, kv, bias_b, bias_h, block_k, tiles))
    if len(per_mask) >= _PLANS_PER_MASK:
        per_mask.pop(next(iter(per_mask)))
    per_mask[key] = slices
    return slices


# --------------------------------------------------------------------------------------------------
# One query tile
# --------------------------------------------------------------------------------------------------
def _pad_keys(t: torch.Tensor, block_k: int) -> torch.Tensor:
    """(B, Hkv, Nk, X) -> (B, Hkv, KB * block_k, X), zero-padded so whole key tiles can be gathered."""
    extra = -t.shape[2] % block_k
    return t if extra == 0 else torch.nn.functional.pad(t, (0, 0, 0, extra))


def _columns(t: torch.Tensor, tile: _Tile, block_k: int) -> torch.Tensor:
    """The tile's key columns (B, Hkv, M, X) of a padded t (B, Hkv, KB * block_k, X): a view for a run,
    else one gather of whole key tiles (cheaper than gathering token rows)."""
    if tile.blocks is None:
        return t[:, :, tile.c0 : tile.c1]
    return t.unflatten(2, (-1, block_k)).index_select(2, tile.blocks).flatten(2, 3)[:, :, : tile.width]


def _add_columns(target: torch.Tensor, src: torch.Tensor, tile: _Tile, block_k: int) -> None:
    """target[:, :, tile columns] += src (B, Hkv, M, X); target padded like in :func:`_columns`."""
    if tile.blocks is None:
        target[:, :, tile.c0 : tile.c1] += src
        return
    full = tile.blocks.numel() * block_k
    if full != tile.width:
        src = torch.nn.functional.pad(src, (0, 0, 0, full - tile.width))
    target.unflatten(2, (-1, block_k)).index_add_(2, tile.blocks, src.unflatten(2, (-1, block_k)))


def _last_columns(t: torch.Tensor, tile: _Tile) -> torch.Tensor:
    """The tile's key columns of t (..., Nk) along the last dim (for bias and mask rows)."""
    if t.shape[-1] == 1:
        return t
    return t[..., tile.c0 : tile.c1] if tile.cols is None else t.index_select(-1, tile.cols)


def _grouped5(t: torch.Tensor, kv_heads: int, groups: int) -> torch.Tensor:
    """(X, Hx, R', M') with Hx in {1, H} -> (X, Hkv|1, G|1, R', M'), matching the score layout."""
    x, hx, r, m = t.shape
    return t.reshape(x, 1, 1, r, m) if hx == 1 else t.reshape(x, kv_heads, groups, r, m)


class _Problem:
    """Inputs of one map slice, laid out for tile computations."""

    def __init__(self, q, k, v, bias, sl: _Slice, q_len, k_len, scale, score):
        self.q = q[sl.b, sl.h]  # already scaled
        self.k = k[sl.b, sl.kv]
        self.v = v[sl.b, sl.kv]
        self.bias = None if bias is None else bias[sl.bias_b, sl.bias_h]
        self.sl = sl
        self.q_len, self.k_len, self.scale, self.score = q_len, k_len, scale, score
        self.batch, self.heads = self.q.shape[:2]
        self.kv_heads = self.k.shape[1]
        self.groups = self.heads // self.kv_heads

    def q_rows(self, tile: _Tile) -> torch.Tensor:
        """(B, Hkv, G*R, D): rows of the tile, query heads of one kv head stacked."""
        r = tile.r1 - tile.r0
        return self.q[:, :, tile.r0 : tile.r1].reshape(self.batch, self.kv_heads, self.groups * r, -1)

    def scores(self, tile: _Tile, kt: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, G*R, M) scale*q.k + bias, masked to -inf (softmax) where not allowed."""
        s = torch.matmul(self.q_rows(tile), kt.transpose(-1, -2))
        s5 = s.view(self.batch, self.kv_heads, self.groups, tile.r1 - tile.r0, -1)
        if self.bias is not None:
            bias_rows = self.bias if self.bias.shape[-2] == 1 else self.bias[..., tile.r0 : tile.r1, :]
            s5.add_(_grouped5(_last_columns(bias_rows, tile), self.kv_heads, self.groups).to(s.dtype))
        if self.score == "sigmoid":
            s.sub_(math.log(self.k_len)).sigmoid_()
        fill = 0.0 if self.score == "sigmoid" else float("-inf")
        for offset, width, forbidden in tile.spans:
            s5[..., offset : offset + width].masked_fill_(_grouped5(forbidden, self.kv_heads, self.groups), fill)
        return s


def _forward_tiles(p: _Problem, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Fill out (B', H', Nq, Dv) and lse (B', H', Nq) of one map slice (views into the full tensors)."""
    b, hkv, g = p.batch, p.kv_heads, p.groups
    for tile in p.sl.tiles:
        r = tile.r1 - tile.r0
        kt, vt = _columns(p.k, tile, p.sl.block_k), _columns(p.v, tile, p.sl.block_k)
        s = p.scores(tile, kt)
        if p.score == "softmax":
            row_max = s.amax(-1, keepdim=True)
            row_max.masked_fill_(row_max == float("-inf"), 0.0)
            s.sub_(row_max).exp_()
            denom = s.sum(-1, keepdim=True)
            o = torch.matmul(s, vt)
            o.div_(torch.where(denom > 0, denom, torch.ones_like(denom)))
            tile_lse = torch.where(denom > 0, row_max + torch.log(denom), torch.full_like(denom, float("inf")))
            lse[:, :, tile.r0 : tile.r1] = tile_lse.view(b, hkv * g, r)
        else:
            o = torch.matmul(s, vt)
        out[:, :, tile.r0 : tile.r1] = o.view(b, hkv * g, r, -1)


def _backward_tiles(p: _Problem, out, d_out, lse, dq, dk, dv, dbias) -> None:
    """Accumulate the gradients of one map slice into dq, dk, dv (views) and dbias (full shape or None)."""
    b, hkv, g = p.batch, p.kv_heads, p.groups
    if p.score == "softmax":
        delta = (d_out * out).sum(-1)  # (B', H', Nq): rowsum(dO * O)
    for tile in p.sl.tiles:
        r = tile.r1 - tile.r0
        kt, vt = _columns(p.k, tile, p.sl.block_k), _columns(p.v, tile, p.sl.block_k)
        prob = p.scores(tile, kt)  # softmax: scores, turned into probabilities below
        do_t = d_out[:, :, tile.r0 : tile.r1].reshape(b, hkv, g * r, -1)
        if p.score == "softmax":
            prob.sub_(lse[:, :, tile.r0 : tile.r1].reshape(b, hkv, g * r, 1)).exp_()
        dv_t = torch.matmul(prob.transpose(-1, -2), do_t)
        ds = torch.matmul(do_t, vt.transpose(-1, -2))  # dP
        if p.score == "softmax":
            ds.sub_(delta[:, :, tile.r0 : tile.r1].reshape(b, hkv, g * r, 1)).mul_(prob)
        else:
            ds.mul_(prob).mul_(1.0 - prob)  # masked entries have prob = 0
        dq[:, :, tile.r0 : tile.r1] = (torch.matmul(ds, kt) * p.scale).view(b, hkv * g, r, -1)
        dk_t = torch.matmul(ds.transpose(-1, -2), p.q_rows(tile))  # q is pre-scaled
        _add_columns(dk, dk_t, tile, p.sl.block_k)
        _add_columns(dv, dv_t, tile, p.sl.block_k)
        if dbias is not None:
            _accumulate_bias_grad(dbias, ds.view(b, hkv * g, r, -1), tile, p.sl)


def _accumulate_bias_grad(dbias: torch.Tensor, ds: torch.Tensor, tile: _Tile, sl: _Slice) -> None:
    """Add ds (B', H', R, M) into dbias (Bb, Hb, Nq|1, Nk|1), summing over its broadcast dims."""
    target = dbias[sl.bias_b, sl.bias_h]
    if target.shape[0] == 1 and ds.shape[0] > 1:
        ds = ds.sum(0, keepdim=True)
    if target.shape[1] == 1 and ds.shape[1] > 1:
        ds = ds.sum(1, keepdim=True)
    if target.shape[2] == 1:
        ds = ds.sum(2, keepdim=True)
    else:
        target = target[:, :, tile.r0 : tile.r1]
    if target.shape[3] == 1:
        target += ds.sum(3, keepdim=True).to(target.dtype)
    elif tile.cols is None:
        target[..., tile.c0 : tile.c1] += ds.to(target.dtype)
    else:
        target.index_add_(3, tile.cols, ds.to(target.dtype))


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, plan, scale, score, needs_grad):
        batch, heads, q_len, _ = q.shape
        k_len = k.shape[2]
        q_scaled = q * scale
        if plan:  # whole key tiles can be gathered from zero-padded keys and values
            k, v = _pad_keys(k, plan[0].block_k), _pad_keys(v, plan[0].block_k)
        out = q.new_zeros(batch, heads, q_len, v.shape[-1])
        lse = q.new_full((batch, heads, q_len), float("inf"))
        for sl in plan:
            _forward_tiles(_Problem(q_scaled, k, v, bias, sl, q_len, k_len, scale, score), out[sl.b, sl.h], lse[sl.b, sl.h])
        if needs_grad:
            ctx.save_for_backward(q_scaled, k, v, bias, out, lse)
            ctx.plan, ctx.scale, ctx.score, ctx.k_len = plan, scale, score, k_len
        return out

    @staticmethod
    def backward(ctx, d_out):
        q_scaled, k, v, bias, out, lse = ctx.saved_tensors
        d_out = d_out.contiguous()
        q_len, k_len = q_scaled.shape[2], ctx.k_len
        dq = torch.zeros_like(q_scaled)
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        dbias = None
        if bias is not None and ctx.needs_input_grad[3]:
            dbias = torch.zeros(bias.shape, dtype=torch.promote_types(bias.dtype, torch.float32), device=bias.device)
        for sl in ctx.plan:
            problem = _Problem(q_scaled, k, v, bias, sl, q_len, k_len, ctx.scale, ctx.score)
            _backward_tiles(
                problem, out[sl.b, sl.h], d_out[sl.b, sl.h], lse[sl.b, sl.h],
                dq[sl.b, sl.h], dk[sl.b, sl.kv], dv[sl.b, sl.kv], dbias,
            )
        if dbias is not None:
            dbias = dbias.to(bias.dtype)
        if dk.shape[2] != k_len:
            dk, dv = dk[:, :, :k_len].contiguous(), dv[:, :, :k_len].contiguous()
        return dq, dk, dv, dbias, None, None, None, None


# --------------------------------------------------------------------------------------------------
# Public function and backend registration
# --------------------------------------------------------------------------------------------------
def _run(q, k, v, mask: Mask, bias, scale: float, score: str, block_size=None) -> torch.Tensor:
    batch, heads, q_len, _ = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    if block_size is None:
        block_q, block_k = choose_tiles(mask, q_len, k_len)
    else:
        block_q, block_k = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    bias_shape = None if bias is None else tuple(bias.shape)
    plan = _plan(mask, bias_shape, batch, heads, kv_heads, q_len, k_len, block_q, block_k, q.device)
    dtype = q.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    q, k, v = (t.to(compute).contiguous() for t in (q, k, v))
    needs_grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or (bias is not None and bias.requires_grad)
    )
    out = _BlockSparseAttention.apply(q, k, v, bias, plan, scale, score, needs_grad)
    return out.to(dtype)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask=None,
    bias: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    score: str = "softmax",
    block_size=None,
) -> torch.Tensor:
    """Block-sparse attention on any device, whatever the kept fraction (``attend(..., backend="blocksparse")``
    is the usual entry point; this one also lets tests and benchmarks pick the tile size).

    q (B, H, Nq, D); k, v (B, Hkv, Nk, D|Dv); mask a Mask or bool tensor; bias a float tensor broadcastable
    to (B, H, Nq, Nk). ``block_size``: int or (block_q, block_k), default :func:`choose_tiles`.
    Returns (B, H, Nq, Dv).
    """
    from zoo.attention.core import _validate  # validation shared with attend()

    _validate(q, k, v, score, 0.0, scale)
    mask = as_mask(mask)
    batch, heads, q_len, head_dim = q.shape
    mask.check_shape(q_len, k.shape[2], batch, heads)
    if block_size is not None:
        sizes = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
        if len(sizes) != 2 or any(not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"block_size must be a positive int or a pair of them, got {block_size!r}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or bias.dim() != 4:
            raise TypeError(f"bias must be a 4-D float tensor, got {getattr(bias, 'shape', type(bias).__name__)}")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
    return _run(q, k, v, mask, bias, scale, score, block_size)


def _supports(q, k, v, mask, bias, scale, score, dropout_p, return_weights):
    """Hard limits only: what the path cannot compute."""
    if dropout_p > 0.0:
        return "dropout_p > 0 (the block-sparse path has no dropout)"
    if return_weights:
        return "return_weights=True (the block-sparse path does not form the attention matrix)"
    from zoo.attention.core import _is_tracing

    if _is_tracing():
        return "tracing / export (the block-sparse path loops in Python)"
    return None


def _auto_supports(q, k, v, mask, bias, scale, score, dropout_p, return_weights):
    """Hard limits plus: only when skipping tiles beats SDPA with a dense mask (see module docstring)."""
    reason = _supports(q, k, v, mask, bias, scale, score, dropout_p, return_weights)
    if reason is not None:
        return reason
    if mask.is_full:
        return "mask is Full (no tile to skip)"
    q_len, k_len = q.shape[2], k.shape[2]
    if type(mask) is Causal and q_len == k_len:
        return "square Causal (SDPA's causal kernel already skips the upper tiles)"
    if q_len * k_len < AUTO_MIN_CELLS:
        return f"Nq*Nk = {q_len * k_len} < {AUTO_MIN_CELLS} (one fused SDPA call is faster)"
    block_q, block_k = choose_tiles(mask, q_len, k_len)
    kept = mask.block_map(q_len, k_len, block_q, block_k, "cpu").kept_fraction()
    if kept >= AUTO_MAX_KEPT:
        return f"kept-tile fraction {kept:.2f} >= {AUTO_MAX_KEPT} (SDPA with the dense mask is faster)"
    return None


def _backend_forward(q, k, v, mask, bias, scale, score, dropout_p, return_weights):
    return _run(q, k, v, mask, bias, scale, score)


NAME = "blocksparse"
_DESCRIPTION = "CPU block-sparse: per query tile, gather the kept key/value tiles (custom autograd, O(N) memory)"
_backends.register_backend(
    NAME, _backend_forward, _supports, priority=20, auto_devices=("cpu",),
    auto_supports=_auto_supports, description=_DESCRIPTION,
)
