"""The kernel's view of a zoo.attention mask: tile lists to iterate over and an in-kernel predicate.

Two things are derived from a :class:`zoo.attention.masks.Mask` before the block-sparse flash-attention
kernels (kernels/flash_attention.py) run, and both are cached per mask object:

1. **Tile lists** (:func:`tile_lists`, :class:`TileLists`), from the mask's ``BlockMap`` (int8 states
   EMPTY/PARTIAL/FULL per (row tile, column tile)). For every row tile: the kept column tiles, PARTIAL
   ones first then FULL ones (each group in ascending order), and the two counts. This is the CSR-like
   layout of FlexAttention's BlockMask (``kv_num_blocks``/``kv_indices`` and ``full_kv_*``), packed into
   one index tensor. The forward pass and the dQ pass use the query-major lists; the dK/dV pass uses the
   lists of the *transposed* map (for every key tile, the query tiles that see it), so that the
   backward pass is sparse too and needs no atomics. A FULL tile that touches a ragged sequence end
   (Nq or Nk not a multiple of the tile) is demoted to PARTIAL here, so the kernels' FULL loop runs
   with no bounds checks and no masking at all. Building the lists never touches Nq x Nk: it works on
   the (QB, KB) tile map only, with no device synchronisation for ordinary sizes (the index width is
   the number of column tiles; index tensors above 2**24 entries are trimmed to the widest row).

2. **The in-kernel predicate** (:func:`lower_mask`, :class:`MaskProgram`): PARTIAL tiles evaluate the
   mask element-wise inside the kernel. The mask tree is rewritten as an OR of at most three AND-terms
   (disjunctive normal form) over six predicate *slots*, each computed from indices or small vectors:

   ========  ===================================================================  ==================
   slot      predicate for query row i, key column j                              reads
   ========  ===================================================================  ==================
   WIN0/1    lo <= j - i <= hi (Window/Causal; bottom-right aligned offsets)      two ints
             or, with the CHUNK0/1 flag, lo <= j // c - (i + s) // c <= hi        four ints
             (ChunkWindow, in chunks of c tokens; s >= 0 folds in the alignment)
             or, with the POS0/1 flag, lo <= kpos[b, j] - qpos[b, i] <= hi        positions after the
             (SegmentWindow: positions inside the segments;                       ids (SEG buffers)
             SegmentChunkWindow: chunk numbers inside them)
   SEG       q_ids[b, i] == kv_ids[b, j] and q_ids[b, i] >= 0 (Segments)          two id vectors
   DENSE     mask[b, h, i, j] (Dense)                                             the bool tensor
   BLK       block_mask[b, h, i // bq, j // bk] (BlockSparse, Radial)             the tile map
   EDGE      bit (j % 32) of words[t, i % TQ, (j % TK) // 32] with                a tile table and
             t = table[b, i // TQ, j // TK] >= 0 (Edges: the edge j -> i exists)  the non-empty tiles'
                                                                                  bits (edge_bitmask)
   ========  ===================================================================  ==================

   Windows inside one AND-term are intersected into one band (per chunk size); Dense masks inside one term are AND-ed;
   BlockSparse maps with equal block sizes inside one term are AND-ed. So Causal, Window, Segments,
   ChunkWindow, Dense, BlockSparse, Radial, Edges and combinations such as ``Segments & Causal``,
   ``Causal & Window``, ``Window | BlockSparse``, ``(Window | Segments) & Causal``, ``Edges & Causal``,
   ``Edges | Window(0, 0)`` (self loops) and ``Edges & Segments`` are evaluated exactly in the kernel.
   What does not fit (more than three terms, more than two distinct windows, two different Segments,
   Dense or Edges masks, a mask class the kernel does not know) falls back to ONE dense boolean mask built
   with ``mask.dense(Nq, Nk)`` and read through the DENSE slot: still exact, but O(Bm * Hm * Nq * Nk)
   memory. :attr:`MaskProgram.exact_in_kernel` tells which path a mask took.

3. **The EDGE slot** (:func:`edge_bitmask`): an :class:`~zoo.attention.masks.Edges` mask is a tile-compressed
   bitmask built from its distinct edges (``Edges.distinct_edges``) in O(E) plus the size of its tile table,
   never Nq x Nk. The cells are cut into fixed bit tiles of TQ x TK = 64 x 64 (:data:`EDGE_TILE_Q`,
   :data:`EDGE_TILE_K`), independent of the kernels' tiles, so that one lowered program serves the forward
   and backward passes whatever tiles they run. The table int32 (Bm, R', C') holds -1 for a bit tile without
   an edge, else the tile's index t into the words int32 (T, TQ, TK // 32): bit (j % 32) of
   ``words[t, i % TQ, (j % TK) // 32]`` is set iff the edge j -> i exists (bit 31 is the int32 sign bit; the
   kernels test it with an arithmetic shift and ``& 1``). Memory: 4 Bm R' C' + 512 T bytes with
   T <= min(E, Bm R' C') (at least one all-zero tile is kept, a valid pointer for masks without edges). 64 x 64
   gives the table as many entries as the block map at the kernels' usual 64 x 64 tiles (the map and the
   tile lists already hold that many), and two words per bit-tile row; kNN edges of a cloud in space-filling
   -curve order touch a few bit tiles per query tile (k = 8 on 4096 Morton-ordered points: T = 751 = E / 44, the
   program 400 KB against 16 MB for a dense bool mask, tests/test_kernel_edges.py), while the worst case, one edge
   per bit tile (a random graph), is 512 bytes per edge. A (2, E) edge_index gives Bm = 1
   (broadcast over the batch), (B, 2, E) gives Bm = B; heads always broadcast.

Letters: B batch, H query heads, Bm/Hm batch/head dims of the mask (1 or B/H), R row tiles, C column
tiles, W index width (= C), Nq/Nk query/key lengths, E edges, R'/C' bit-tile rows/columns
(cdiv(Nq, TQ), cdiv(Nk, TK)), T non-empty bit tiles.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch

from zoo.attention.masks import (
    FULL,
    PARTIAL,
    And,
    BlockMap,
    BlockSparse,
    ChunkWindow,
    Dense,
    Edges,
    Full,
    Mask,
    Or,
    SegmentChunkWindow,
    SegmentWindow,
    Segments,
    Window,
    cache_put,
)

__all__ = [
    "TileLists",
    "tile_lists",
    "kernel_tile_lists",
    "MaskProgram",
    "lower_mask",
    "SLOT_WIN0",
    "SLOT_WIN1",
    "SLOT_SEG",
    "SLOT_DENSE",
    "SLOT_BLK",
    "SLOT_EDGE",
    "SLOT_CHUNK0",
    "SLOT_CHUNK1",
    "SLOT_POS0",
    "SLOT_POS1",
    "MAX_TERMS",
    "EDGE_TILE_Q",
    "EDGE_TILE_K",
    "edge_bitmask",
]

# Predicate slots: bit flags of an AND-term.
SLOT_WIN0, SLOT_WIN1, SLOT_SEG, SLOT_DENSE, SLOT_BLK = 1, 2, 4, 8, 16
# Flags, not slots: WIN0 / WIN1 of this term compare chunk numbers instead of positions.
SLOT_CHUNK0, SLOT_CHUNK1 = 32, 64
# Flags, not slots: WIN0 / WIN1 of this term compare per-segment positions (SegmentWindow): kpos[j] - qpos[i],
# the positions stored after the ids in the SEG buffers.
SLOT_POS0, SLOT_POS1 = 128, 256
# The EDGE slot (Edges): one bit per cell of the non-empty TQ x TK bit tiles (see the module docstring).
SLOT_EDGE = 512
EDGE_TILE_Q, EDGE_TILE_K = 64, 64
MAX_TERMS = 3
# Index tensors above this many entries are trimmed to the widest row (costs one device sync).
_TRIM_ENTRIES = 1 << 24
# Window offsets are passed as int32; "unbounded" becomes a value beyond any sequence length.
_UNBOUNDED = 1 << 30


# ------------------------------------------------------------------------------------------------
# Tile lists
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileLists:
    """Kept column tiles of every row tile.

    ``counts`` int32 (Bm, Hm, R, 2): number of PARTIAL and of FULL column tiles of the row tile.
    ``index`` int32 (Bm, Hm, R, W): their column-tile indices, the PARTIAL ones first, then the FULL
    ones, each in ascending order; entries past the counts are unspecified.
    ``block_rows`` / ``block_cols``: tile sizes along the rows / columns of this list (for the
    transposed lists the rows are key tiles).
    """

    counts: torch.Tensor
    index: torch.Tensor
    block_rows: int
    block_cols: int

    @property
    def num_row_tiles(self) -> int:
        return self.index.shape[2]

    @property
    def width(self) -> int:
        return self.index.shape[3]

    def strides(self) -> tuple[int, int, int, int, int]:
        """(counts batch, counts head, index batch, index head, index width) with 0 for broadcast dims."""
        c, i = self.counts, self.index
        return (
            c.stride(0) if c.shape[0] > 1 else 0,
            c.stride(1) if c.shape[1] > 1 else 0,
            i.stride(0) if i.shape[0] > 1 else 0,
            i.stride(1) if i.shape[1] > 1 else 0,
            i.stride(2),
        )

    def visited(self) -> int:
        """Number of (row tile, column tile) pairs visited, summed over the mask's batch and heads."""
        return int(self.counts.sum())


def tile_lists(states: torch.Tensor, ragged_rows: bool, ragged_cols: bool, block_rows: int, block_cols: int) -> TileLists:
    """Build :class:`TileLists` from int8 tile states (Bm, Hm, R, C).

    ``ragged_rows`` / ``ragged_cols``: the last row / column tile is cut by the sequence end; its FULL
    tiles are demoted to PARTIAL so that the kernels' FULL path needs no bounds checks.
    """
    if states.dim() != 4 or states.dtype != torch.int8:
        raise ValueError(f"tile states must be int8 (Bm, Hm, R, C), got {states.dtype} {tuple(states.shape)}")
    states = states.clone()
    if ragged_rows:
        last = states[..., -1, :]
        last[last == FULL] = PARTIAL
    if ragged_cols:
        last = states[..., :, -1]
        last[last == FULL] = PARTIAL
    partial = states == PARTIAL
    full = states == FULL
    counts = torch.stack([partial.sum(-1), full.sum(-1)], dim=-1).to(torch.int32)
    # Sort key: PARTIAL -> 0, FULL -> 1, EMPTY -> 2; a stable sort keeps ascending column order per group.
    order_key = torch.full_like(states, 2)
    order_key[partial] = 0
    order_key[full] = 1
    index = torch.argsort(order_key, dim=-1, stable=True).to(torch.int32)
    if index.numel() > _TRIM_ENTRIES:
        # Large maps: keep only the columns some row uses (one device sync, once per cached mask).
        width = max(1, int(counts.sum(-1).max()))
        index = index[..., :width]
    return TileLists(counts.contiguous(), index.contiguous(), block_rows, block_cols)


_LIST_CACHE: "weakref.WeakKeyDictionary[Mask, dict]" = weakref.WeakKeyDictionary()


def kernel_tile_lists(
    mask: Mask, q_len: int, k_len: int, block_m: int, block_n: int, device, transposed: bool = False
) -> TileLists:
    """Tile lists of ``mask`` at tiles (block_m query rows, block_n keys), cached per mask object.

    ``transposed=False``: rows are query tiles (forward pass, dQ pass). ``transposed=True``: rows are key
    tiles and the lists name the query tiles that see each key tile (dK/dV pass).
    """
    key = (q_len, k_len, block_m, block_n, str(torch.device(device)), transposed)
    per_mask = mask.versioned_cache(_LIST_CACHE.setdefault(mask, {}))  # emptied after an in-place edit of the mask
    lists = per_mask.get(key)
    if lists is None:
        bmap: BlockMap = mask.block_map(q_len, k_len, block_m, block_n, device=device)
        states = bmap.states.to(device)
        ragged_q, ragged_k = q_len % block_m != 0, k_len % block_n != 0
        if transposed:
            lists = tile_lists(states.transpose(-1, -2), ragged_k, ragged_q, block_n, block_m)
        else:
            lists = tile_lists(states, ragged_q, ragged_k, block_m, block_n)
        cache_put(per_mask, key, lists)
    return lists


# ------------------------------------------------------------------------------------------------
# In-kernel predicate
# ------------------------------------------------------------------------------------------------
@dataclass
class MaskProgram:
    """The element-wise predicate of a mask in kernel form: OR of up to three AND-terms over slots.

    ``terms``: tuple of bit sets (SLOT_* flags); an empty tuple allows nothing, a term 0 allows every
    in-range pair. ``windows``: [(lo, hi, c, s), (lo, hi, c, s)] for WIN0/WIN1: bounds of ``j - i``
    (c = 1, s = 0), or with the CHUNK flag of ``j // c - (i + s) // c`` (s >= 0, so that integer
    division by c is floor division, as the kernels compute it). ``seg``:
    (q_ids (Bs, Nq) int32, kv_ids (Bs', Nk) int32). ``dense``: uint8 (Bm, Hm, Nq, Nk) view of the bool
    mask. ``blk``: (uint8 (Bm, Hm, QBs, KBs) map, block_q, block_k). ``edge``: (table int32 (Bm, R', C'),
    words int32 (T, EDGE_TILE_Q, EDGE_TILE_K // 32)) of an Edges mask (:func:`edge_bitmask`).
    ``exact_in_kernel``: False when the mask had to be materialised densely (see the module docstring).
    """

    terms: tuple
    windows: list = field(default_factory=lambda: [(-_UNBOUNDED, _UNBOUNDED, 1, 0), (-_UNBOUNDED, _UNBOUNDED, 1, 0)])
    seg: Optional[tuple] = None
    dense: Optional[torch.Tensor] = None
    blk: Optional[tuple] = None
    edge: Optional[tuple] = None
    exact_in_kernel: bool = True
    description: str = ""

    @property
    def num_terms(self) -> int:
        return len(self.terms)

    def constexprs(self) -> dict:
        """TERM0..2 and NUM_TERMS for the kernels."""
        padded = list(self.terms) + [0] * (MAX_TERMS - len(self.terms))
        return {"TERM0": padded[0], "TERM1": padded[1], "TERM2": padded[2], "NUM_TERMS": len(self.terms)}

    def evaluate(self, q_len: int, k_len: int, rows: Optional[torch.Tensor] = None, cols: Optional[torch.Tensor] = None):
        """PyTorch reference of the in-kernel predicate: bool (Bm, Hm, R, C) for query ``rows`` and key
        ``cols`` (default all), evaluated slot by slot exactly as the kernels do (for tests)."""
        device = next((t.device for t in self._tensors()), torch.device("cpu"))
        rows = torch.arange(q_len, device=device) if rows is None else rows.to(device)
        cols = torch.arange(k_len, device=device) if cols is None else cols.to(device)
        i, j = rows[:, None], cols[None, :]
        inb = ((i < q_len) & (j < k_len))[None, None]
        out = torch.zeros_like(inb)
        for bits in self.terms:
            ok = inb
            for slot, chunked, (lo, hi, c, s) in (
                (SLOT_WIN0, SLOT_CHUNK0, self.windows[0]),
                (SLOT_WIN1, SLOT_CHUNK1, self.windows[1]),
            ):
                if bits & slot:
                    if bits & (SLOT_POS0 if slot == SLOT_WIN0 else SLOT_POS1):
                        q_pos, k_pos = self.seg[0][:, q_len:], self.seg[1][:, k_len:]
                        rel = (k_pos[:, cols.clamp(max=k_len - 1)][:, None, None, :]
                               - q_pos[:, rows.clamp(max=q_len - 1)][:, None, :, None])
                    else:
                        rel = (j // c - (i + s) // c) if bits & chunked else (j - i)
                    ok = ok & (rel >= lo) & (rel <= hi)
            if bits & SLOT_SEG:
                qi, ki = self.seg[0][:, :q_len], self.seg[1][:, :k_len]
                qid = qi[:, rows.clamp(max=q_len - 1)][:, None, :, None]
                kid = ki[:, cols.clamp(max=k_len - 1)][:, None, None, :]
                ok = ok & (qid == kid) & (qid >= 0)
            if bits & SLOT_DENSE:
                d = self.dense[..., rows.clamp(max=q_len - 1), :][..., cols.clamp(max=k_len - 1)]
                ok = ok & (d != 0)
            if bits & SLOT_BLK:
                m, bq, bk = self.blk
                ok = ok & (m[..., (rows // bq).clamp(max=m.shape[-2] - 1), :][..., (cols // bk).clamp(max=m.shape[-1] - 1)] != 0)
            if bits & SLOT_EDGE:
                ok = ok & _edge_bits(self.edge, rows.clamp(max=q_len - 1), cols.clamp(max=k_len - 1))[:, None]
            out = out | ok
        return out

    def _tensors(self):
        if self.seg is not None:
            yield from self.seg
        if self.dense is not None:
            yield self.dense
        if self.blk is not None:
            yield self.blk[0]
        if self.edge is not None:
            yield from self.edge

    def nbytes(self) -> int:
        """Bytes of the tensors the kernels read for this program (ids, dense mask, tile map, edge bitmask)."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def kernel_args(self, dummy: torch.Tensor) -> tuple:
        """The 28 runtime mask arguments, in the kernels' order (``dummy`` fills unused pointer slots; the EDGE
        slot's two pointers get a one-entry int32 stand-in, the type the kernels read through them)."""
        (lo0, hi0, c0, s0), (lo1, hi1, c1, s1) = self.windows
        if self.seg is not None:
            qi, ki = self.seg
            seg = (qi, ki, qi.stride(0) if qi.shape[0] > 1 else 0, ki.stride(0) if ki.shape[0] > 1 else 0)
        else:
            seg = (dummy, dummy, 0, 0)
        if self.dense is not None:
            d = self.dense
            dense = (d,) + tuple(d.stride(i) if d.shape[i] > 1 else 0 for i in range(4))
        else:
            dense = (dummy, 0, 0, 0, 0)
        if self.blk is not None:
            m, bq, bk = self.blk
            blk = (m,) + tuple(m.stride(i) if m.shape[i] > 1 else 0 for i in range(4)) + (bq, bk)
        else:
            blk = (dummy, 0, 0, 0, 0, 1, 1)
        if self.edge is not None:
            table, words = self.edge
            edge = (table, words, table.stride(0) if table.shape[0] > 1 else 0, table.stride(1))
        else:
            stand_in = _edge_stand_in(dummy.device)
            edge = (stand_in, stand_in, 0, 0)
        return (lo0, hi0, lo1, hi1, c0, s0, c1, s1) + seg + dense + blk + edge


_EDGE_STAND_INS: dict = {}


def _edge_stand_in(device) -> torch.Tensor:
    """The one-entry int32 tensor the EDGE slot's pointers get when the program has no Edges mask (never read), one
    per device: made once, not at every launch of every masked call."""
    stand_in = _EDGE_STAND_INS.get(device)
    if stand_in is None:
        stand_in = _EDGE_STAND_INS[device] = torch.full((1,), -1, dtype=torch.int32, device=device)
    return stand_in


class _Fallback(Exception):
    """The mask does not fit the kernel's slots: materialise it."""


def _primitive(mask: Mask):
    """Map a mask to a slot primitive, or None when it is not one the kernel knows."""
    if isinstance(mask, ChunkWindow) and mask.chunk_size == 1:
        return Window(mask.left, mask.right)
    if isinstance(mask, (Window, ChunkWindow, Segments, SegmentWindow, SegmentChunkWindow, Dense, BlockSparse, Edges)):
        return mask
    # Radial (zoo.attention.radial) is a BlockSparse map at its own block size.
    if type(mask).__name__ == "Radial" and hasattr(mask, "block_mask") and hasattr(mask, "block_size"):
        return BlockSparse(mask.block_mask, mask.block_size)
    return None


def _dnf(mask: Mask, limit: int = 16) -> list[list[Mask]]:
    """OR-list of AND-lists of primitive masks ([[]] = everything allowed, [] = nothing)."""
    if isinstance(mask, Full):
        return [[]]
    if isinstance(mask, And):
        left, right = _dnf(mask.a, limit), _dnf(mask.b, limit)
        out = [x + y for x in left for y in right]
    elif isinstance(mask, Or):
        out = _dnf(mask.a, limit) + _dnf(mask.b, limit)
    else:
        prim = _primitive(mask)
        if prim is None:
            raise _Fallback(f"{type(mask).__name__} has no in-kernel form")
        return [[prim]]
    if len(out) > limit:
        raise _Fallback("too many OR-terms")
    return out


def _clamped(lo: float, hi: float) -> tuple[int, int]:
    lo = -_UNBOUNDED if lo == -math.inf else int(lo)
    hi = _UNBOUNDED if hi == math.inf else int(hi)
    return max(lo, -_UNBOUNDED), min(hi, _UNBOUNDED)


def _window_band(w, q_len: int, k_len: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(unit, bounds, reach) of a Window or ChunkWindow: ``unit`` = (c, s), the kernel compares
    ``j // c - (i + s) // c`` ((1, 0) for a Window: j - i); ``bounds`` = allowed (lo, hi) of that difference;
    ``reach`` = (min, max) of the difference over all in-range (i, j), to spot bands that forbid nothing."""
    if isinstance(w, Window):
        return (1, 0), _clamped(*w.offsets(q_len, k_len)), (-(q_len - 1), k_len - 1)
    c, shift = w.chunk_size, k_len - q_len
    # Query chunk floor((i + shift) / c) = (i + s) // c - extra with s = shift + extra * c >= 0, so the kernel's
    # truncating division is floor division; the bounds absorb the constant ``extra``.
    extra = max(0, -(shift // c))
    s = shift + extra * c
    lo, hi = w.chunk_bounds()
    reach = (0 - (q_len - 1 + s) // c, (k_len - 1) // c - s // c)
    return (c, s), _clamped(lo - extra, hi - extra), reach


def _pos_unit(m) -> tuple:
    """The band unit of a per-segment mask: positions inside the segments (SegmentWindow, (1, 0, "pos")) or chunk
    numbers inside them (SegmentChunkWindow, (c, 0, "pos")). The kernel's POS flag compares the values stored after
    the ids (kpos[j] - qpos[i], whatever c): one kind of value per program."""
    return (m.chunk_size if isinstance(m, SegmentChunkWindow) else 1, 0, "pos")


def _simplify_term(term: list[Mask], q_len: int, k_len: int):
    """One AND-term -> dict of merged primitives (no tensor is built), or None when it allows nothing.

    Keys: "win" a tuple of (lo, hi, c, s) bands, the windows intersected per unit (c, s) (see
    _window_band); "seg" the Segments mask; "dense" a tuple of Dense masks to AND; "blk" a tuple of
    BlockSparse masks (equal block sizes) to AND; "edge" the Edges mask.
    """
    out: dict = {}
    bands: dict = {}  # unit (c, s) -> (lo, hi, reach)
    for m in term:
        if isinstance(m, (Window, ChunkWindow)):
            unit, (a, b), reach = _window_band(m, q_len, k_len)
            lo, hi, _ = bands.get(unit, (-_UNBOUNDED, _UNBOUNDED, reach))
            bands[unit] = (max(lo, a), min(hi, b), reach)
        elif isinstance(m, (Segments, SegmentWindow, SegmentChunkWindow)):
            per_segment = isinstance(m, (SegmentWindow, SegmentChunkWindow))
            seg = m.segments if per_segment else m
            if "seg" in out and out["seg"] is not seg:
                raise _Fallback("two different Segments masks in one AND-term")
            out["seg"] = seg
            if per_segment:  # a band over positions (or chunk numbers) inside the segments
                unit = _pos_unit(m)
                if "pos" in out and _pos_unit(out["pos"]) != unit:
                    raise _Fallback("positions and chunk numbers inside segments in one AND-term")
                out["pos"] = m
                a, b = _clamped(*m._offsets())
                lo, hi, _ = bands.get(unit, (-_UNBOUNDED, _UNBOUNDED, (-_UNBOUNDED, _UNBOUNDED)))
                bands[unit] = (max(lo, a), min(hi, b), (-_UNBOUNDED, _UNBOUNDED))
        elif isinstance(m, Dense):
            out["dense"] = out.get("dense", ()) + (m,)
        elif isinstance(m, BlockSparse):
            prev = out.get("blk", ())
            if prev and (prev[0].block_q, prev[0].block_k) != (m.block_q, m.block_k):
                raise _Fallback("BlockSparse maps with different block sizes in one AND-term")
            out["blk"] = prev + (m,)
        elif isinstance(m, Edges):
            if "edge" in out and out["edge"] is not m:
                raise _Fallback("two different Edges masks in one AND-term")
            out["edge"] = m
        else:  # pragma: no cover - _dnf only returns primitives
            raise _Fallback(type(m).__name__)
    kept_bands = []
    for unit, (lo, hi, (reach_lo, reach_hi)) in bands.items():
        if lo > hi:
            return None
        # A band covering every difference that occurs forbids nothing.
        if not (lo <= reach_lo and hi >= reach_hi):
            kept_bands.append((lo, hi) + unit)
    if len(kept_bands) > 2:
        raise _Fallback("more than two window bands in one AND-term")
    if kept_bands:
        out["win"] = tuple(kept_bands)
    return out


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _plan(mask: Mask, q_len: int, k_len: int):
    """Slot assignment of ``mask`` without building any tensor; raises _Fallback when it does not fit.

    Returns (term bit sets, windows, Segments or None, Dense tuple or None, BlockSparse tuple or None,
    a SegmentWindow whose positions the kernel reads or None, Edges or None). Windows are (lo, hi, c, s) or,
    over positions inside segments, (lo, hi, 1, 0, "pos").
    """
    terms = [_simplify_term(t, q_len, k_len) for t in _dnf(mask)]
    terms = [t for t in terms if t is not None]
    if any(len(t) == 0 for t in terms):
        return (0,), [], None, None, None, None, None
    if len(terms) > MAX_TERMS:
        raise _Fallback(f"{len(terms)} OR-terms (the kernel evaluates at most {MAX_TERMS})")
    windows: list[tuple] = []
    seg = dense = blk = positions = edge = None
    bits_per_term = []
    for t in terms:
        bits = 0
        for band in t.get("win", ()):
            if band not in windows:
                if len(windows) == 2:
                    raise _Fallback("more than two distinct windows")
                windows.append(band)
            slot = windows.index(band)
            bits |= SLOT_WIN0 if slot == 0 else SLOT_WIN1
            if len(band) == 5:  # positions / chunk numbers inside segments (SegmentWindow / SegmentChunkWindow)
                bits |= SLOT_POS0 if slot == 0 else SLOT_POS1
                if positions is not None and _pos_unit(positions) != _pos_unit(t["pos"]):
                    raise _Fallback("positions and chunk numbers inside segments in one program")
                positions = t["pos"]
            elif band[2] > 1:  # chunk size
                bits |= SLOT_CHUNK0 if slot == 0 else SLOT_CHUNK1
        if "seg" in t:
            if seg is not None and seg is not t["seg"]:
                raise _Fallback("two different Segments masks")
            seg, bits = t["seg"], bits | SLOT_SEG
        if "dense" in t:
            if dense is not None and not _same(dense, t["dense"]):
                raise _Fallback("two different Dense masks")
            dense, bits = t["dense"], bits | SLOT_DENSE
        if "blk" in t:
            if blk is not None and not _same(blk, t["blk"]):
                raise _Fallback("two different BlockSparse maps")
            blk, bits = t["blk"], bits | SLOT_BLK
        if "edge" in t:
            if edge is not None and edge is not t["edge"]:
                raise _Fallback("two different Edges masks")
            edge, bits = t["edge"], bits | SLOT_EDGE
        bits_per_term.append(bits)
    return tuple(bits_per_term), windows, seg, dense, blk, positions, edge


def _build_program(mask: Mask, q_len: int, k_len: int, device) -> MaskProgram:
    bits, windows, seg, dense, blk, positions, edge = _plan(mask, q_len, k_len)
    prog = MaskProgram(terms=bits)
    for i, w in enumerate(windows):
        prog.windows[i] = w[:4]
    if positions is not None:  # ids then positions (or chunk numbers) in one buffer per side: (Bs, 2 Nq), (Bs, 2 Nk)
        q_pos, k_pos = positions._band_positions(device)
        batch = q_pos.shape[0]
        prog.seg = (torch.cat([_ids(seg.q_ids, device).expand(batch, -1), _ids(q_pos, device)], 1).contiguous(),
                    torch.cat([_ids(seg.kv_ids, device).expand(batch, -1), _ids(k_pos, device)], 1).contiguous())
    elif seg is not None:
        prog.seg = (_ids(seg.q_ids, device), _ids(seg.kv_ids, device))
    if dense is not None:
        allowed = dense[0].dense(q_len, k_len, device)
        for m in dense[1:]:
            allowed = allowed & m.dense(q_len, k_len, device)
        prog.dense = _as_u8(allowed)
    if blk is not None:
        block_mask = blk[0].block_mask.to(device)
        for m in blk[1:]:
            block_mask = block_mask & m.block_mask.to(device)
        prog.blk = (_as_u8(block_mask), blk[0].block_q, blk[0].block_k)
    if edge is not None:
        prog.edge = edge_bitmask(edge, q_len, k_len, device)
    prog.description = " | ".join(_bits_name(b) for b in bits) if bits else "nothing allowed"
    return prog


def _bits_name(bits: int) -> str:
    names = [n for n, f in (("WIN0", 1), ("WIN1", 2), ("SEG", 4), ("DENSE", 8), ("BLK", 16), ("CHUNK0", 32),
                            ("CHUNK1", 64), ("POS0", 128), ("POS1", 256), ("EDGE", 512)) if bits & f]
    return "&".join(names) or "TRUE"


def ids_fit_int32(ids: torch.Tensor) -> bool:
    """Whether every id (or position) fits the kernels' int32 (one min / max pass: a device sync on CUDA)."""
    return not ids.numel() or (int(ids.max()) <= 2**31 - 1 and int(ids.min()) >= -(2**31))


def _ids(ids: torch.Tensor, device) -> torch.Tensor:
    ids = ids.to(device)
    if not ids_fit_int32(ids):
        raise ValueError("Segments ids must fit in int32 for the Triton kernel")
    return ids.to(torch.int32).contiguous()


def _as_u8(t: torch.Tensor) -> torch.Tensor:
    """bool tensor -> uint8 view (same memory, strides kept; 0/1 values)."""
    if t.dtype != torch.bool:
        raise TypeError(f"expected a bool tensor, got {t.dtype}")
    if t.dim() == 2:
        t = t[None, None]
    return t.view(torch.uint8)


_EDGE_CACHE: "weakref.WeakKeyDictionary[Mask, dict]" = weakref.WeakKeyDictionary()


def edge_bitmask(mask: Edges, q_len: int, k_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The EDGE slot's data for an Edges mask: (table int32 (Bm, R', C'), words int32 (T, TQ, TK // 32)), built
    from the distinct edges in O(E) plus the table's size and cached per (mask, q_len, k_len, device) (emptied
    when ``edge_index`` is edited in place), so that ``Edges & Causal`` built anew each step reuses it.

    ``table[b, r, c]`` is -1 where bit tile (r, c) of batch row b holds no edge, else its index t into ``words``;
    bit (j % 32) of ``words[t, i % TQ, (j % TK) // 32]`` is set iff the edge j -> i exists (TQ = EDGE_TILE_Q,
    TK = EDGE_TILE_K; see the module docstring for the layout, the tile size and the memory). The words are
    summed from distinct powers of two (distinct edges set distinct bits, so the sum is the bitwise OR) in int64
    and wrapped to int32 two's complement, so that bit 31 is the sign bit. The lengths are checked against the
    edges (``Edges.check_shape``) before anything is built.
    """
    if not isinstance(mask, Edges):
        raise TypeError(f"edge_bitmask: expected an Edges mask, got {type(mask).__name__}")
    mask.check_shape(q_len, k_len)
    device = torch.device(device)
    key = (q_len, k_len, str(device))
    per_mask = mask.versioned_cache(_EDGE_CACHE.setdefault(mask, {}))
    hit = per_mask.get(key)
    if hit is not None:
        return hit
    row_E, dst_E, src_E = mask.distinct_edges(q_len, k_len, device)
    rows_t, cols_t = -(-q_len // EDGE_TILE_Q), -(-k_len // EDGE_TILE_K)
    words_per_row = EDGE_TILE_K // 32
    tile_E = (row_E * rows_t + dst_E // EDGE_TILE_Q) * cols_t + src_E // EDGE_TILE_K
    tiles_T, slot_E = torch.unique(tile_E, return_inverse=True)  # sorted: slots in (batch, row, column) order
    num_tiles = tiles_T.numel()
    table = torch.full((mask.batch_size * rows_t * cols_t,), -1, dtype=torch.int32, device=device)
    table[tiles_T] = torch.arange(num_tiles, dtype=torch.int32, device=device)
    word_E = (slot_E * EDGE_TILE_Q + dst_E % EDGE_TILE_Q) * words_per_row + (src_E % EDGE_TILE_K) // 32
    words = torch.zeros(max(num_tiles, 1) * EDGE_TILE_Q * words_per_row, dtype=torch.int64, device=device)
    words.index_add_(0, word_E, torch.ones_like(src_E) << (src_E % 32))
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # bit 31: the int32 sign
    out = (table.view(mask.batch_size, rows_t, cols_t), words.view(-1, EDGE_TILE_Q, words_per_row))
    cache_put(per_mask, key, out)
    return out


def _edge_bits(edge: tuple, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """bool (Bm, R, C): the EDGE slot for in-range query ``rows`` and key ``cols``, read as the kernels do."""
    table, words = edge
    slot = table[:, rows // EDGE_TILE_Q][:, :, cols // EDGE_TILE_K]
    offset = ((slot.clamp(min=0).long() * EDGE_TILE_Q + (rows % EDGE_TILE_Q)[:, None]) * (EDGE_TILE_K // 32)
              + ((cols % EDGE_TILE_K) // 32)[None, :])
    word = words.reshape(-1)[offset]
    return (slot >= 0) & ((torch.bitwise_right_shift(word, (cols % 32).to(torch.int32)) & 1) != 0)


_PROGRAM_CACHE: "weakref.WeakKeyDictionary[Mask, dict]" = weakref.WeakKeyDictionary()


def lower_mask(mask: Mask, q_len: int, k_len: int, device) -> MaskProgram:
    """The in-kernel predicate of ``mask`` for this problem size (cached per mask object and device)."""
    key = (q_len, k_len, str(torch.device(device)))
    per_mask = mask.versioned_cache(_PROGRAM_CACHE.setdefault(mask, {}))
    prog = per_mask.get(key)
    if prog is None:
        if mask.is_full:
            prog = MaskProgram(terms=(0,), description="full mask")
        else:
            try:
                prog = _build_program(mask, q_len, k_len, device)
            except _Fallback as why:
                dense = mask.dense(q_len, k_len, device)
                prog = MaskProgram(
                    terms=(SLOT_DENSE,),
                    dense=_as_u8(dense),
                    exact_in_kernel=False,
                    description=f"materialised dense mask ({why})",
                )
        cache_put(per_mask, key, prog)
    return prog


def needs_dense_fallback(mask: Mask, q_len: int, k_len: int) -> bool:
    """True when :func:`lower_mask` would materialise ``mask`` densely (decided without building it)."""
    if mask.is_full:
        return False
    try:
        _plan(mask, q_len, k_len)
    except _Fallback:
        return True
    return False
