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
key tiles. Working memory is the scores of one query tile (or one batch of tiles, below) against its kept
keys plus zero-padded copies of K and V, never O(Nq x Nk) (except the bias gradient, which has the bias'
own shape). Softmax without bias batches the query tiles that visit the same number of whole key tiles under
one shared element-wise mask: none (FULL tiles only: Radial, random block maps) or the same PARTIAL pattern
(the interior rows of a Window, ChunkWindow or periodic Segments, translated copies of one another, whose
rows all keep a key): one gather and one op per step for up to GROUP_CELLS score cells, instead of one tile
at a time; the zero-padded columns of a short last key tile get zero weight. Every
exp() argument stays at or above EXP_FLOOR (ATen's CPU exp() is 12-110x slower below it): masked and shifted
scores go through a clamp and a flush to exact zeros, and when a bound on |q . k| proves the scores small the
groups skip the row-maximum shift altogether (:class:`_Problem`). The plan (kept
key tiles per query tile, and the element-wise masks of PARTIAL tiles only) is cached per mask object
and problem size, like the mask's block maps.

Semantics are exactly the reference's (zoo/attention/core.py): softmax or sigmoid (with -log Nk) scores,
additive bias broadcastable to (B, H, Nq, Nk) with its gradient, grouped-query attention without copying
K/V per head, masks that vary over batch or heads (one pass per (batch, head) slice of the map; identical
slices are not merged), and rows whose keys are all masked return zeros with zero gradients. Not supported
(the capability check says so, and attend() picks another backend): dropout_p > 0, return_weights=True,
tracing/export, torch.func transforms (its autograd Function has no functorch rules).

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
from dataclasses import dataclass, field
from typing import Optional

import torch

from zoo.attention import backends as _backends
from zoo.attention.masks import EMPTY, PARTIAL, And, BlockSparse, Causal, ChunkWindow, Mask, Or, as_mask, cache_put
from zoo.attention.radial import Radial
from zoo.layers import autocast_off, exp_flushed_ as _exp_flushed_, in_torch_func, is_tracing, refuse_double_backward, to_pair

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
    """The tile size at which a mask's block map is exact (BlockSparse, Radial), if any; for a ChunkWindow
    of chunks up to 2 * DEFAULT_TILE tokens, its chunk: tiles on chunk boundaries leave fewer PARTIAL tiles
    (none at one chunk per tile). Forward+backward took 17-27% less time than with 128-token tiles (two
    runs, N = 4096, H = 4, D = 64, chunks of 40, 48 and 100 tokens, 2 CPU threads)."""
    if isinstance(mask, BlockSparse):
        return mask.block_q, mask.block_k
    if isinstance(mask, Radial):
        # the published map's own tile, built (or rebuilt after a setting was reassigned) by Radial, which checks
        # its settings first: a bad ``radial.block_size = 0`` gets Radial's message here, not a ZeroDivisionError
        published = mask._block_sparse()
        return published.block_q, published.block_k
    if isinstance(mask, ChunkWindow) and mask.chunk_size <= 2 * DEFAULT_TILE:
        return mask.chunk_size, mask.chunk_size
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
    flat: dict = field(default_factory=dict, repr=False, compare=False)  # see _key_tile_rows


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
    block_q: int = 0
    groups: list = None  # _Group batches of tiles (softmax without bias); None: none
    rest: list = None  # the tiles not in any group


@dataclass
class _Group:
    """Query tiles that visit the same number of whole key tiles and share one element-wise mask over them
    (none, or the same PARTIAL spans: the interior rows of a Window or ChunkWindow, translated copies of one
    another): they run as one batch (one gather, one matmul per step for all of them) instead of one tile at
    a time. ``q_tiles`` (T,): query tile indices; ``blocks`` (T * count,): their key tiles, row after row."""

    q_tiles: torch.Tensor
    blocks: torch.Tensor
    count: int
    tail: int = 0  # zero-padded key columns at the end of every member (its last key tile is the short one)
    spans: tuple = ()  # (offset, width, forbidden (block_q, width) bool) shared by every member
    flat: dict = field(default_factory=dict, repr=False, compare=False)  # see _key_tile_rows


#: Every exp() here gets arguments >= EXP_FLOOR (zoo.layers: ATen's CPU exp() is 12-110x slower below it), by
#: a bound that proves it or through :func:`zoo.layers.exp_flushed_`.
#: exp() arguments proven to lie in [-SAFE_EXP_RANGE, SAFE_EXP_RANGE] need neither a shift nor a flush: no
#: overflow, results >= e^-60 = 9e-27 (their products with the values and gradients stay normal numbers).
SAFE_EXP_RANGE = 60.0


def score_bound(q_scaled: torch.Tensor, k: torch.Tensor) -> float:
    """An upper bound on |scale * q_i . k_j| over all pairs (Cauchy-Schwarz: max |q_i| * max |k_j|; NaN for
    non-finite inputs). When it is small, exp() needs no shift by the row maximum and no clamp (see
    :class:`_Problem`)."""
    q_max = float(torch.linalg.vector_norm(q_scaled, dim=-1).amax())
    return q_max * float(torch.linalg.vector_norm(k, dim=-1).amax())


#: Score cells (batch * heads * rows * gathered columns) of one batched group. Batching cuts the number of
#: PyTorch ops (each one a thread-pool round trip: 2-3x faster than tile by tile on a 2-core machine loaded by
#: other processes), but groups whose scores outgrow the cache lose on a quiet machine (2**24 cells: 0.85x of
#: tile by tile at N = 8192, 2**23: 0.81x, 2**22: about even); see docs/bench_attention.md.
GROUP_CELLS = 2**22


def _shared_spans(tile: _Tile) -> Optional[tuple]:
    """The tile's PARTIAL spans as (offset, width, forbidden (R, width)) with a hashable key, when a group can
    share them: the mask rows do not vary over batch or heads within the slice and every row keeps at least
    one allowed key (a group divides by its row sums). None when they cannot be shared.

    Masked groups measured against one tile at a time (N = 8192, H = 4, D = 64, 2 threads, two alternating
    runs each, /tmp script): forward Window(912, 912) 132-134 against 138-143 ms, Window(272, 272) 62-66
    against 74-79 ms, Causal & Window(1024, 0) 70-71 against 85-91 ms; forward+backward 448-463 against
    446-453, 208-224 against 218-230 and 245 against 266-270 ms."""
    spans, key = [], []
    forbidden_per_row = torch.zeros(tile.r1 - tile.r0, dtype=torch.long)
    for offset, width, forbidden in tile.spans:
        if forbidden.shape[0] != 1 or forbidden.shape[1] != 1:
            return None
        f = forbidden[0, 0].cpu()
        forbidden_per_row += f.sum(-1)
        spans.append((offset, width, f))
        key.append((offset, width, f.numpy().tobytes()))
    if bool((forbidden_per_row >= tile.width).any()):
        return None
    return tuple(spans), tuple(key)


def _group_tiles(tiles: list, block_q: int, block_k: int, batch: int, heads: int, device) -> tuple[list, list]:
    """Split tiles into batched groups (full query tiles, no short key tile, grouped by kept count and by
    their element-wise mask; a group's scores stay under GROUP_CELLS) and the rest (run one by one)."""
    by_count: dict[tuple, tuple] = {}  # (count, tail, mask key) -> (shared spans, [(tile, blocks), ...])
    rest = []
    for tile in tiles:
        if tile.blocks is not None:
            blocks = tile.blocks.cpu()
        else:
            blocks = torch.arange(tile.c0 // block_k, -(-tile.c1 // block_k))
        count = blocks.numel()
        tail = count * block_k - tile.width  # > 0 only when the last key tile is the short one
        shared = _shared_spans(tile) if tile.spans else ((), ())
        if shared is None or tile.r1 - tile.r0 != block_q or tile.r0 % block_q or not 0 <= tail < block_k:
            rest.append(tile)
        else:
            by_count.setdefault((count, tail, shared[1]), (shared[0], []))[1].append((tile, blocks))
    groups = []
    for (count, tail, _), (spans, members) in sorted(by_count.items(), key=lambda item: item[0][:2]):
        if len(members) == 1:
            rest.append(members[0][0])
            continue
        per_group = max(1, GROUP_CELLS // (batch * heads * block_q * count * block_k))
        for i in range(0, len(members), per_group):
            chunk = members[i : i + per_group]
            if len(chunk) == 1:
                rest.append(chunk[0][0])
                continue
            q_tiles = torch.tensor([t.r0 // block_q for t, _ in chunk], dtype=torch.long, device=device)
            blocks = torch.cat([b for _, b in chunk]).to(device)
            groups.append(_Group(q_tiles, blocks, count, tail, tuple((o, w, f.to(device)) for o, w, f in spans)))
    # Largest first: the workspace slots (_Workspace) then get their final size on the first group instead of
    # growing a few times, each time on fresh pages (a page fault per 4 KiB: ~3 ms per 16 MiB here).
    groups.sort(key=lambda g: -g.blocks.numel())
    return groups, rest


# Plans cached per mask object (like its block maps): {mask: {key: plan}}; a few problem sizes each.
_PLAN_CACHE: "weakref.WeakKeyDictionary[Mask, dict]" = weakref.WeakKeyDictionary()
_PLANS_PER_MASK = 4


def _plan(mask: Mask, bias_shape, batch, heads, kv_heads, q_len, k_len, block_q, block_k, device) -> list[_Slice]:
    """The slices and tiles to visit (cached on the mask for repeated calls with the same sizes)."""
    key = (bias_shape, batch, heads, kv_heads, q_len, k_len, block_q, block_k, str(device))
    per_mask = mask.versioned_cache(_PLAN_CACHE.setdefault(mask, {}))  # emptied after an in-place edit of the mask
    cached = per_mask.get(key)  # one lookup: another thread may evict between a test and a read (masks._CACHE_LOCK)
    if cached is not None:
        return cached
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
            batches, rest = (
                _group_tiles(tiles, block_q, block_k, batch, heads, device) if bias_shape is None else (None, None)
            )
            slices.append(_Slice(b, h, kv, bias_b, bias_h, block_k, tiles, block_q, batches, rest))
    cache_put(per_mask, key, slices, _PLANS_PER_MASK)
    return slices


# --------------------------------------------------------------------------------------------------
# One query tile
# --------------------------------------------------------------------------------------------------
def _pad_keys(t: torch.Tensor, block_k: int) -> torch.Tensor:
    """(B, Hkv, Nk, X) -> contiguous (B, Hkv, KB * block_k, X), zero-padded so whole key tiles can be gathered
    (K and V split from one qkv projection are strided views: one copy here keeps the gathers on the fast path
    of :func:`_key_tile_rows`)."""
    extra = -t.shape[2] % block_k
    return t.contiguous() if extra == 0 else torch.nn.functional.pad(t, (0, 0, 0, extra))


def _key_tile_rows(t: torch.Tensor, owner, block_k: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Contiguous (B', Hkv, KB * block_k, X) -> (view (B' * Hkv * KB, block_k * X) with one row per key tile,
    the row indices of ``owner``'s key tiles ``owner.blocks`` in every (B', Hkv) slab, slab after slab); None
    when t is not contiguous (a slice of the heads of a batch > 1, for masks that vary over heads). The indices
    are cached on the tile or group ``owner`` (plans are cached).

    Key tiles are gathered and accumulated along dim 0 of this view: on CPU, index_select and index_add_ copy
    whole rows there, while along an inner dim (the 4-D/5-D views used otherwise) they go element-wise: 1.6 vs
    0.85 ms to gather 35 MB, 1.9 vs 0.7 ms to accumulate it (2 cores)."""
    if not t.is_contiguous():
        return None
    rows = t.view(-1, block_k * t.shape[-1])
    slabs = t.shape[0] * t.shape[1]
    key = (slabs, rows.shape[0] // slabs)
    index = owner.flat.get(key)
    if index is None:
        offsets = torch.arange(slabs, device=owner.blocks.device).mul_(key[1])
        index = owner.flat[key] = (offsets[:, None] + owner.blocks[None, :]).reshape(-1)
    return rows, index


def _columns(t: torch.Tensor, tile: _Tile, block_k: int) -> torch.Tensor:
    """The tile's key columns (B, Hkv, M, X) of a padded t (B, Hkv, KB * block_k, X): a view for a run,
    else one gather of whole key tiles (cheaper than gathering token rows)."""
    if tile.blocks is None:
        return t[:, :, tile.c0 : tile.c1]
    tiled = _key_tile_rows(t, tile, block_k)
    if tiled is None:
        return t.unflatten(2, (-1, block_k)).index_select(2, tile.blocks).flatten(2, 3)[:, :, : tile.width]
    rows, index = tiled
    return rows.index_select(0, index).view(t.shape[0], t.shape[1], -1, t.shape[-1])[:, :, : tile.width]


def _add_columns(target: torch.Tensor, src: torch.Tensor, tile: _Tile, block_k: int) -> None:
    """target[:, :, tile columns] += src (B, Hkv, M, X); target padded like in :func:`_columns`."""
    if tile.blocks is None:
        target[:, :, tile.c0 : tile.c1] += src
        return
    full = tile.blocks.numel() * block_k
    if full != tile.width:
        src = torch.nn.functional.pad(src, (0, 0, 0, full - tile.width))
    tiled = _key_tile_rows(target, tile, block_k)
    if tiled is not None:
        rows, index = tiled
        rows.index_add_(0, index, src.reshape(-1, rows.shape[1]))  # distinct tiles: no two rows collide
        return
    # A tile's key tiles are distinct, so gather + add + scatter is exact; CPU index_add_ along an inner dim
    # runs one small add per index (a thread-pool round trip each), several times slower here.
    tiles_view = target.unflatten(2, (-1, block_k))
    tiles_view[:, :, tile.blocks] += src.unflatten(2, (-1, block_k))


def _last_columns(t: torch.Tensor, tile: _Tile) -> torch.Tensor:
    """The tile's key columns of t (..., Nk) along the last dim (for bias and mask rows)."""
    if t.shape[-1] == 1:
        return t
    return t[..., tile.c0 : tile.c1] if tile.cols is None else t.index_select(-1, tile.cols)


def _grouped5(t: torch.Tensor, kv_heads: int, groups: int) -> torch.Tensor:
    """(X, Hx, R', M') with Hx in {1, H} -> (X, Hkv|1, G|1, R', M'), matching the score layout."""
    x, hx, r, m = t.shape
    return t.reshape(x, 1, 1, r, m) if hx == 1 else t.reshape(x, kv_heads, groups, r, m)


class _Workspace:
    """Flat buffers reused by the batched groups of one forward or backward call.

    The big per-group temporaries (gathered key/value tiles, scores, probabilities and their gradients, each
    several MB) are carved from these instead of being allocated per group: glibc hands large blocks back to
    the kernel when they are freed, so every fresh allocation pays page faults again (15% of the fwd+bwd time
    of the N = 8192 Radial benchmark). Named slots, grown on demand; a slot is reused only after its previous
    contents are dead.
    """

    def __init__(self, like: torch.Tensor):
        self.like = like
        self.slots: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape) -> torch.Tensor:
        numel = math.prod(shape)
        slot = self.slots.get(name)
        if slot is None or slot.numel() < numel:
            grown = 0 if slot is None else slot.numel() + slot.numel() // 4
            slot = self.slots[name] = self.like.new_empty(max(numel, grown))
        return slot[:numel].view(shape)


class _Problem:
    """Inputs of one map slice, laid out for tile computations.

    ``bound`` (softmax without bias: :func:`score_bound`, else inf) decides how the batched groups and the
    tiles without element-wise masking (every visited key allowed) take exp().
    Every score is in [-bound, bound] and lse <= bound + log(Nk). With bound + log(Nk) <= SAFE_EXP_RANGE the
    forward exponentiates the scores directly (no row-maximum pass, no shift: exp(s) neither overflows, nor
    leaves the vector path, nor sums past float32's range) and lse = log(sum); with 2 * bound + log(Nk) <=
    SAFE_EXP_RANGE the backward's exp(q.k - shift) needs no flush either (shift: the LSE, or the row maximum). Otherwise the groups shift and flush
    (:func:`_exp_flushed_`) like the other tiles.
    """

    def __init__(self, q, k, v, bias, sl: _Slice, q_len, k_len, scale, score, workspace: _Workspace, bound):
        log_nk = math.log(max(k_len, 1))
        self.shift_free = bound + log_nk <= SAFE_EXP_RANGE  # False for NaN / inf
        self.clamp_backward = not 2 * bound + log_nk <= SAFE_EXP_RANGE
        self.ws = workspace
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


def _tile_rows(t: torch.Tensor, p: _Problem) -> torch.Tensor:
    """(B', H', Nq, ...) -> view (B', Hkv, G, QBf, block_q, ...) over the whole query tiles."""
    bq = p.sl.block_q
    whole = p.q_len // bq
    return t[:, :, : whole * bq].unflatten(1, (p.kv_heads, p.groups)).unflatten(3, (whole, bq))


def _gather_rows(t: torch.Tensor, p: _Problem, group: _Group) -> torch.Tensor:
    """(B', H', Nq, X) -> (B', Hkv, T, G * block_q, X): the group's query tiles, heads of one kv head stacked."""
    rows = _tile_rows(t, p).index_select(3, group.q_tiles).transpose(2, 3)
    return rows.reshape(p.batch, p.kv_heads, group.q_tiles.numel(), p.groups * p.sl.block_q, t.shape[-1])


def _put_rows(target: torch.Tensor, src: torch.Tensor, p: _Problem, group: _Group) -> None:
    """Inverse of :func:`_gather_rows`: target (B', H', Nq, X)[group rows] = src (B', Hkv, T, G * block_q, X)."""
    t = group.q_tiles.numel()
    src = src.view(p.batch, p.kv_heads, t, p.groups, p.sl.block_q, src.shape[-1]).transpose(2, 3)
    _tile_rows(target, p).index_copy_(3, group.q_tiles, src)


def _gather_keys(t: torch.Tensor, p: _Problem, group: _Group, slot: str) -> torch.Tensor:
    """Padded (B', Hkv, KB * block_k, X) -> (B', Hkv, T, count * block_k, X): each query tile's key tiles,
    written into the workspace ``slot``."""
    bk = p.sl.block_k
    tiles = group.blocks.numel()
    out = p.ws.take(slot, (p.batch, p.kv_heads, tiles, bk, t.shape[-1]))
    tiled = _key_tile_rows(t, group, bk)
    if tiled is not None:
        rows, index = tiled
        torch.index_select(rows, 0, index, out=out.view(-1, rows.shape[1]))
    else:
        torch.index_select(t.unflatten(2, (-1, bk)), 2, group.blocks, out=out)
    return out.view(p.batch, p.kv_heads, group.q_tiles.numel(), group.count * bk, t.shape[-1])


def _matmul(p: _Problem, slot: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for (..., I, J) x (..., J, K) batched alike, written into the workspace ``slot``."""
    return torch.matmul(a, b, out=p.ws.take(slot, (*a.shape[:-1], b.shape[-1])))


def _group_probabilities(p: _Problem, group: _Group, q_g, k_g, slot: str, *, shift: bool, clamp: bool):
    """exp of the (B', Hkv, T, G * block_q, M) products q_g . k_g, shifted by their row maximum (``shift``;
    returned, else None), through :func:`_exp_flushed_` (``clamp``, and always when the group has a mask); the
    zero-padded columns past Nk (``tail``) and the group's forbidden pairs are zero afterwards (kept out of the
    maximum first)."""
    s = _matmul(p, slot, q_g, k_g.transpose(-1, -2))
    if group.spans:
        s6 = s.unflatten(-2, (p.groups, p.sl.block_q))  # (B', Hkv, T, G, block_q, M): every head, same rows
        for offset, width, forbidden in group.spans:
            s6[..., offset : offset + width].masked_fill_(forbidden, float("-inf"))
        clamp = True
    tail = slice(s.shape[-1] - group.tail, None)
    row_max = None
    if shift:
        if group.tail:
            s[..., tail] = float("-inf")
        row_max = s.amax(-1, keepdim=True)
        s.sub_(row_max)
    if clamp:
        _exp_flushed_(s)
    else:
        s.exp_()
    if group.tail:
        s[..., tail] = 0.0
    return s, row_max


def _forward_group(p: _Problem, group: _Group, out: torch.Tensor, shift: torch.Tensor,
                   log_norm: torch.Tensor) -> None:
    """Softmax without bias for a batch of query tiles (no row is empty: see _shared_spans); the row terms as
    :func:`_forward_tiles` writes them."""
    q_g, k_g = _gather_rows(p.q, p, group), _gather_keys(p.k, p, group, "keys")
    shifted = not p.shift_free
    s, row_max = _group_probabilities(p, group, q_g, k_g, "scores", shift=shifted, clamp=shifted)
    denom = s.sum(-1, keepdim=True)
    o = torch.matmul(s, _gather_keys(p.v, p, group, "keys")).div_(denom)  # K tiles are dead: reuse the slot
    _put_rows(out, o, p, group)
    if row_max is None:
        _put_rows(shift.unsqueeze(-1), denom.log_(), p, group)
    else:
        _put_rows(shift.unsqueeze(-1), row_max, p, group)
        _put_rows(log_norm.unsqueeze(-1), denom.log_(), p, group)


def _add_key_tiles(target: torch.Tensor, src: torch.Tensor, p: _Problem, group: _Group) -> None:
    """target (B', Hkv, KB * block_k, X) += src (B', Hkv, T, count * block_k, X) at the group's key tiles (which
    repeat across its query tiles: accumulated). index_add_ adds whole tiles; index_put_(accumulate=True) is an
    element-wise serial loop on CPU (4x slower here)."""
    bk, x = p.sl.block_k, src.shape[-1]
    tiled = _key_tile_rows(target, group, bk)
    if tiled is not None:
        rows, index = tiled
        rows.index_add_(0, index, src.reshape(-1, bk * x))
    else:
        target.unflatten(2, (-1, bk)).index_add_(2, group.blocks, src.reshape(p.batch, p.kv_heads, -1, bk, x))


def _append_column(t: torch.Tensor, column) -> torch.Tensor:
    """(..., X) -> (..., X + 1) copy of ``t`` with ``column`` (a number, or (...) values) as its last column."""
    out = t.new_empty(*t.shape[:-1], t.shape[-1] + 1)
    out[..., :-1] = t
    out[..., -1] = column
    return out


def _backward_group(p: _Problem, group: _Group, q_aug, do_aug, k_aug, v_aug, dq, dk, dv) -> None:
    """Gradients of :func:`_forward_group`'s tiles: dq written, dk/dv accumulated over the key tiles.

    The row terms ride in the GEMMs as one extra column: q_aug = [q, -shift] against k_aug = [k, 1] gives
    q.k - shift, and do_aug = [dO, -delta] / l against v_aug = [v, 1] gives (dP - delta) / l, so neither needs a
    pass of its own over the scores (an inner dimension of 65 instead of 64 costs nothing measurable; a separate
    subtraction costs ~20% of the product, a baddbmm onto the broadcast term ~30%). P = exp(q.k - shift) / l
    (see :func:`_backward_tiles`): the 1 / l rides in do_aug's rows."""
    d, d_v = q_aug.shape[-1] - 1, do_aug.shape[-1] - 1
    q_a, do_a = _gather_rows(q_aug, p, group), _gather_rows(do_aug, p, group)
    k_a, v_a = _gather_keys(k_aug, p, group, "keys"), _gather_keys(v_aug, p, group, "values")
    # exp(q.k - shift): P times l
    prob, _ = _group_probabilities(p, group, q_a, k_a, "scores", shift=False, clamp=p.clamp_backward)
    _add_key_tiles(dv, _matmul(p, "key_grads", prob.transpose(-1, -2), do_a[..., :d_v]), p, group)
    ds = _matmul(p, "score_grads", do_a, v_a.transpose(-1, -2))  # (dP - delta) / l (padded columns: P = 0 below)
    ds.mul_(prob)  # dS = P * (dP - delta)
    _put_rows(dq, torch.matmul(ds, k_a[..., :d]).mul_(p.scale), p, group)
    _add_key_tiles(dk, _matmul(p, "key_grads", ds.transpose(-1, -2), q_a[..., :d]), p, group)  # q is pre-scaled


def _batched(p: _Problem) -> bool:
    return p.sl.groups is not None and p.bias is None and p.score == "softmax"


def _forward_tiles(p: _Problem, out: torch.Tensor, shift: torch.Tensor, log_norm: torch.Tensor) -> None:
    """Fill out (B', H', Nq, Dv) and the softmax's row terms (B', H', Nq) of one map slice (views into the full
    tensors): the row's LSE is ``shift + log_norm``, kept apart for the backward's P = exp(s - shift) / l with
    l = exp(log_norm) >= 1 -- ``shift`` the row maximum and ``log_norm`` the log of the normaliser, or, where the
    scores are bounded and not shifted (see :class:`_Problem`), the whole LSE and 0. Recomputing P as exp(s - LSE)
    gave every tied key of a row 1 instead of 1 / l where max + log l rounds to the max (every allowed key at a
    bias of -1e9 or ``finfo.min``: the gradients of such rows were wrong, by 2x and more), as the Triton kernel
    keeps its log normaliser apart (docs/kernels.md). Rows without keys: shift +inf (P = 0), log_norm 0."""
    b, hkv, g = p.batch, p.kv_heads, p.groups
    if _batched(p):
        for group in p.sl.groups:
            _forward_group(p, group, out, shift, log_norm)
    for tile in p.sl.rest if _batched(p) else p.sl.tiles:
        r = tile.r1 - tile.r0
        kt, vt = _columns(p.k, tile, p.sl.block_k), _columns(p.v, tile, p.sl.block_k)
        s = p.scores(tile, kt)
        if p.score == "softmax" and p.shift_free and not tile.spans:  # FULL tiles only: every row has keys
            denom = s.exp_().sum(-1, keepdim=True)  # |s| <= bound: no shift needed (see _Problem)
            o = torch.matmul(s, vt).div_(denom)
            shift[:, :, tile.r0 : tile.r1] = denom.log_().view(b, hkv * g, r)
        elif p.score == "softmax":
            row_max = s.amax(-1, keepdim=True)
            row_max.masked_fill_(row_max == float("-inf"), 0.0)
            _exp_flushed_(s.sub_(row_max))  # masked (-inf) entries and rows without keys: exact zeros
            denom = s.sum(-1, keepdim=True)
            o = torch.matmul(s, vt)
            o.div_(torch.where(denom > 0, denom, torch.ones_like(denom)))
            has_keys = denom > 0
            tile_shift = torch.where(has_keys, row_max, torch.full_like(denom, float("inf")))
            shift[:, :, tile.r0 : tile.r1] = tile_shift.view(b, hkv * g, r)
            log_norm[:, :, tile.r0 : tile.r1] = torch.log(torch.where(has_keys, denom, 1.0)).view(b, hkv * g, r)
        else:
            o = torch.matmul(s, vt)
        out[:, :, tile.r0 : tile.r1] = o.view(b, hkv * g, r, -1)


def _backward_tiles(p: _Problem, out, d_out, shift, log_norm, dq, dk, dv, dbias, d_lse=None) -> None:
    """Accumulate the gradients of one map slice into dq, dk, dv (views) and dbias (full shape or None).
    ``shift``, ``log_norm``: the forward's row terms (see :func:`_forward_tiles`), P = exp(s - shift) / l.
    The 1 / l scales the rows of dO and delta, O(Nq x Dv), instead of every probability: dV = E^T (dO / l) and
    dS = E * ((dO / l) . v - delta / l) for E = exp(s - shift) = l P.
    ``d_lse`` (B', H', Nq): the gradient of the returned LSE, whose derivative in the scores is P, so it folds
    into delta: dS = P * (dP - delta + d_lse)."""
    b, hkv, g = p.batch, p.kv_heads, p.groups
    if p.score == "softmax":
        delta = (d_out * out).sum(-1)  # (B', H', Nq): rowsum(dO * O)
        if d_lse is not None:  # rows without keys (shift +inf): P = 0, and a NaN / inf d_lse must not reach dS
            delta = delta - torch.where(shift == math.inf, torch.zeros_like(d_lse), d_lse)
        inv_norm = torch.exp(-log_norm)  # 1 / l, in (0, 1]
        d_out = d_out * inv_norm[..., None]
        delta = delta * inv_norm
    if _batched(p):
        q_aug, do_aug = _append_column(p.q, -shift), _append_column(d_out, -delta)
        k_aug, v_aug = _append_column(p.k, 1.0), _append_column(p.v, 1.0)
        for group in p.sl.groups:
            _backward_group(p, group, q_aug, do_aug, k_aug, v_aug, dq, dk, dv)
        del q_aug, do_aug, k_aug, v_aug
    for tile in p.sl.rest if _batched(p) else p.sl.tiles:
        r = tile.r1 - tile.r0
        kt, vt = _columns(p.k, tile, p.sl.block_k), _columns(p.v, tile, p.sl.block_k)
        prob = p.scores(tile, kt)  # softmax: scores, turned into probabilities below
        do_t = d_out[:, :, tile.r0 : tile.r1].reshape(b, hkv, g * r, -1)
        if p.score == "softmax":
            prob.sub_(shift[:, :, tile.r0 : tile.r1].reshape(b, hkv, g * r, 1))  # E = l P
            if p.clamp_backward or tile.spans:
                _exp_flushed_(prob)
            else:
                prob.exp_()
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
    def forward(ctx, q, k, v, bias, plan, scale, score, needs_grad, want_lse=False):
        batch, heads, q_len, _ = q.shape
        k_len = k.shape[2]
        q_scaled = q * scale
        if plan:  # whole key tiles can be gathered from zero-padded keys and values
            k, v = _pad_keys(k, plan[0].block_k), _pad_keys(v, plan[0].block_k)
        out = q.new_zeros(batch, heads, q_len, v.shape[-1])
        shift = q.new_full((batch, heads, q_len), float("inf"))  # the LSE is shift + log_norm: see _forward_tiles
        log_norm = q.new_zeros(batch, heads, q_len)
        workspace = _Workspace(q_scaled)
        bound = score_bound(q_scaled, k) if bias is None and score == "softmax" else math.inf
        for sl in plan:
            problem = _Problem(q_scaled, k, v, bias, sl, q_len, k_len, scale, score, workspace, bound)
            _forward_tiles(problem, out[sl.b, sl.h], shift[sl.b, sl.h], log_norm[sl.b, sl.h])
        if needs_grad:
            ctx.save_for_backward(q_scaled, k, v, bias, out, shift, log_norm)
            ctx.plan, ctx.scale, ctx.score, ctx.k_len, ctx.bound = plan, scale, score, k_len, bound
        if want_lse:  # rows without keys: shift +inf here (the backward's exp(s - shift) is then 0); -inf outside
            return out, (shift + log_norm).masked_fill(shift == math.inf, -math.inf)
        return out

    @staticmethod
    def backward(ctx, d_out, d_lse=None):
        refuse_double_backward("attend's block-sparse path", "run that attention with backend='torch' "
                               "(zoo.attention.use_backend('torch')), whose gradients are differentiable")
        # a backward called inside torch.autocast would lower the fp32 tile products, as in the forward
        with autocast_off(d_out.device.type):
            return _BlockSparseAttention._backward(ctx, d_out, d_lse)

    @staticmethod
    def _backward(ctx, d_out, d_lse):
        q_scaled, k, v, bias, out, shift, log_norm = ctx.saved_tensors
        d_out = d_out.contiguous()
        q_len, k_len = q_scaled.shape[2], ctx.k_len
        dq = torch.zeros_like(q_scaled)
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        dbias = None
        if bias is not None and ctx.needs_input_grad[3]:
            dbias = torch.zeros(bias.shape, dtype=torch.promote_types(bias.dtype, torch.float32), device=bias.device)
        workspace = _Workspace(q_scaled)
        for sl in ctx.plan:
            problem = _Problem(q_scaled, k, v, bias, sl, q_len, k_len, ctx.scale, ctx.score, workspace, ctx.bound)
            _backward_tiles(
                problem, out[sl.b, sl.h], d_out[sl.b, sl.h], shift[sl.b, sl.h], log_norm[sl.b, sl.h],
                dq[sl.b, sl.h], dk[sl.b, sl.kv], dv[sl.b, sl.kv], dbias,
                None if d_lse is None else d_lse[sl.b, sl.h],
            )
        if dbias is not None:
            dbias = dbias.to(bias.dtype)
        if dk.shape[2] != k_len:
            dk, dv = dk[:, :, :k_len].contiguous(), dv[:, :, :k_len].contiguous()
        return dq, dk, dv, dbias, None, None, None, None, None


# --------------------------------------------------------------------------------------------------
# Public function and backend registration
# --------------------------------------------------------------------------------------------------
def _run(q, k, v, mask: Mask, bias, scale: float, score: str, block_size=None, return_lse: bool = False):
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
    if return_lse:  # (the LSE stays in the compute dtype: fp32 for fp16 / bf16 inputs)
        out, lse = _BlockSparseAttention.apply(q, k, v, bias, plan, scale, score, needs_grad, True)
        return out.to(dtype), lse
    return _BlockSparseAttention.apply(q, k, v, bias, plan, scale, score, needs_grad).to(dtype)


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
        block_size = to_pair(block_size, "block_size")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or bias.dim() != 4:
            raise TypeError(f"bias must be a 4-D float tensor, got {getattr(bias, 'shape', type(bias).__name__)}")
        if bias.shape[0] not in (1, batch) or bias.shape[1] not in (1, heads) or bias.shape[2] not in (1, q_len) \
                or bias.shape[3] not in (1, k.shape[2]):
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not broadcast to "
                             f"({batch}, {heads}, {q_len}, {k.shape[2]})")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
    return _run(q, k, v, mask, bias, scale, score, block_size)


def _supports(q, k, v, mask, bias, scale, score, dropout_p, return_weights):
    """Hard limits only: what the path cannot compute."""
    if dropout_p > 0.0:
        return "dropout_p > 0 (the block-sparse path has no dropout)"
    if return_weights:
        return "return_weights=True (the block-sparse path does not form the attention matrix)"
    if in_torch_func():  # (is_tracing() is true here too: named first)
        return "a torch.func transform (the block-sparse autograd Function has no functorch rules)"
    if is_tracing():
        return "tracing / export (the block-sparse path loops in Python)"
    return None


def _auto_supports(q, k, v, mask, bias, scale, score, dropout_p, return_weights):
    """Hard limits plus: only when skipping tiles beats SDPA with a dense mask (see module docstring)."""
    if mask.is_full:  # first: the common dense call pays for one attribute read only
        return "mask is Full (no tile to skip)"
    reason = _supports(q, k, v, mask, bias, scale, score, dropout_p, return_weights)
    if reason is not None:
        return reason
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


def _backend_forward(q, k, v, mask, bias, scale, score, dropout_p, return_weights, return_lse=False):
    return _run(q, k, v, mask, bias, scale, score, return_lse=return_lse)


NAME = "blocksparse"
_DESCRIPTION = "CPU block-sparse: per query tile, gather the kept key/value tiles (custom autograd, O(N) memory)"
_backends.register_backend(
    NAME, _backend_forward, _supports, priority=20, auto_devices=("cpu",),
    auto_supports=_auto_supports, sparse_only=True, description=_DESCRIPTION, returns_lse=True,
)
