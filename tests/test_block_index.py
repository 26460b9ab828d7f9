"""zoo.kernels.block_index: tile lists (and their transposes) against brute force over the tile states,
caching, and the in-kernel predicate program against ``mask.dense`` for every mask type and
combination, without ever building Nq x Nk for structured masks. Pure PyTorch: no Triton needed."""
from __future__ import annotations

import pytest
import torch

from zoo.attention import EMPTY, FULL, PARTIAL, BlockSparse, Causal, ChunkWindow, Dense, Full, Mask, MaskMod
from zoo.attention import Segments, Window
from zoo.kernels.block_index import (
    SLOT_BLK,
    SLOT_CHUNK0,
    SLOT_CHUNK1,
    SLOT_DENSE,
    SLOT_POS0,
    SLOT_POS1,
    SLOT_SEG,
    SLOT_WIN0,
    SLOT_WIN1,
    kernel_tile_lists,
    lower_mask,
    needs_dense_fallback,
    tile_lists,
)


def _brute_lists(states: torch.Tensor, ragged_rows: bool, ragged_cols: bool):
    """Per (b, h, row): (partial columns ascending, full columns ascending) after edge demotion."""
    bm, hm, r, c = states.shape
    out = {}
    for b in range(bm):
        for h in range(hm):
            for i in range(r):
                partial, full = [], []
                for j in range(c):
                    s = int(states[b, h, i, j])
                    edge = (ragged_rows and i == r - 1) or (ragged_cols and j == c - 1)
                    if s == FULL and edge:
                        s = PARTIAL
                    if s == PARTIAL:
                        partial.append(j)
                    elif s == FULL:
                        full.append(j)
                out[b, h, i] = (partial, full)
    return out


def _lists_as_dict(lists):
    out = {}
    bm, hm, r, _ = lists.index.shape
    for b in range(bm):
        for h in range(hm):
            for i in range(r):
                n_p, n_f = (int(x) for x in lists.counts[b, h, i])
                row = lists.index[b, h, i].tolist()
                out[b, h, i] = (row[:n_p], row[n_p : n_p + n_f])
    return out


@pytest.mark.parametrize("ragged", [(False, False), (True, False), (False, True), (True, True)])
def test_tile_lists_match_brute_force(ragged):
    g = torch.Generator().manual_seed(0)
    states = torch.randint(0, 3, (2, 3, 5, 7), generator=g).to(torch.int8)
    lists = tile_lists(states, *ragged, 32, 64)
    assert lists.counts.dtype == lists.index.dtype == torch.int32
    assert _lists_as_dict(lists) == _brute_lists(states, *ragged)
    assert lists.block_rows == 32 and lists.block_cols == 64
    # The input states are not modified by the demotion.
    assert lists.visited() == int((states != EMPTY).sum())


def test_tile_lists_trimmed_when_large(monkeypatch):
    import zoo.kernels.block_index as bi

    monkeypatch.setattr(bi, "_TRIM_ENTRIES", 10)
    states = torch.zeros(1, 2, 4, 9, dtype=torch.int8)
    states[0, 0, 1, [2, 5, 7]] = FULL
    states[0, 1, 3, [0, 8]] = PARTIAL
    lists = tile_lists(states, False, True, 16, 16)
    assert lists.width == 3
    assert _lists_as_dict(lists) == _brute_lists(states, False, True)


def test_tile_lists_strides_broadcast():
    states = torch.full((1, 1, 3, 4), FULL, dtype=torch.int8)
    lists = tile_lists(states, False, False, 16, 16)
    sb, sh, ib, ih, w = lists.strides()
    assert (sb, sh, ib, ih, w) == (0, 0, 0, 0, 4)


def test_kernel_tile_lists_transposed_and_cached():
    q_len, k_len = 100, 70  # both ragged at tiles (32, 16)
    mask = Window(10, 5)
    fwd = kernel_tile_lists(mask, q_len, k_len, 32, 16, "cpu")
    assert kernel_tile_lists(mask, q_len, k_len, 32, 16, "cpu") is fwd  # cached
    assert kernel_tile_lists(mask, q_len, k_len, 16, 16, "cpu") is not fwd
    bwd = kernel_tile_lists(mask, q_len, k_len, 32, 16, "cpu", transposed=True)
    states = mask.block_map(q_len, k_len, 32, 16).states
    assert _lists_as_dict(fwd) == _brute_lists(states, True, True)
    assert _lists_as_dict(bwd) == _brute_lists(states.transpose(-1, -2), True, True)
    assert bwd.block_rows == 16 and bwd.block_cols == 32
    # Every kept tile really holds an allowed pair, every allowed pair lies in a kept tile.
    dense = mask.dense(q_len, k_len)[0, 0]
    for (b, h, i), (partial, full) in _lists_as_dict(fwd).items():
        for j in range(k_len // 16 + 1):
            tile = dense[i * 32 : (i + 1) * 32, j * 16 : (j + 1) * 16]
            assert bool(tile.any()) == (j in partial or j in full)
            if j in full:
                assert bool(tile.all())


def _masks(q_len: int, k_len: int):
    g = torch.Generator().manual_seed(1)
    ids_q = torch.sort(torch.randint(0, 4, (2, q_len), generator=g), dim=-1).values
    ids_q[:, -3:] = -1  # padding queries: empty rows
    ids_k = torch.randint(-1, 4, (2, k_len), generator=g)
    seg = Segments(ids_q, ids_k)
    dense = Dense(torch.rand(1, 2, q_len, k_len, generator=g) < 0.3)
    blk = BlockSparse(torch.rand(1, 2, -(-q_len // 8), -(-k_len // 8), generator=g) < 0.4, 8)
    blk2 = BlockSparse(torch.rand(-(-q_len // 8), -(-k_len // 8), generator=g) < 0.6, 8)
    exotic = Window(1, 1) | Window(5, -4) | Window(-9, 12) | Window(30, -25)
    return {
        "full": (Full(), True),
        "causal": (Causal(), True),
        "window": (Window(6, 2), True),
        "window_empty_rows": (Window(-3, 5), True),
        "segments": (seg, True),
        "dense": (dense, True),
        "blocksparse": (blk, True),
        "segments&causal": (seg & Causal(), True),
        "causal&window": (Causal() & Window(7, None), True),
        "window|blocksparse": (Window(2, 2) | blk, True),
        "(window|segments)&causal": ((Window(4, 0) | seg) & Causal(), True),
        "dense&causal": (dense & Causal(), True),
        "blk&blk&window": (blk & blk2 & Window(10, 10), True),
        "dense&dense|window": ((dense & Dense(torch.rand(q_len, k_len, generator=g) < 0.8)) | Window(0, 0), True),
        "or_full": (Window(1, 1) | Full(), True),
        "empty_window_term": ((Window(0, 0) & Window(-3, 5)) | Causal(), True),
        "chunkwindow": (ChunkWindow(5, 2), True),
        "chunkwindow_neighbours": (ChunkWindow(6, 1, 1), True),
        "chunkwindow&window": (ChunkWindow(4, None, 1) & Window(6, None), True),
        "chunkwindow&segments|blocksparse": ((ChunkWindow(3) & seg) | blk, True),
        "chunkwindow&chunkwindow": (ChunkWindow(4, 3, 0) & ChunkWindow(4, 1, 2), True),
        "3_bands_in_a_term": (ChunkWindow(4, 1, 0) & ChunkWindow(5, 1, 0) & Window(3, 3), False),
        "maskmod": (MaskMod(lambda b, h, q, kv: (q * 3 + kv) % 4 != 0, num_heads=2), False),
        "4_windows": (exotic, False),
        "two_segments": (seg | Segments(ids_q.flip(-1), ids_k), False),
        # SegmentWindow: a band over positions inside the segments (the POS flag), with the SEG slot
        "segments.causal()": (seg.causal(), True),
        "segments.window&causal": (seg.window(3, None) & Causal(), True),
        "segments.causal()|window": (seg.causal() | Window(2, 2), True),
        "segments&segments.window": (seg & seg.window(2, 2), True),
        "segment_windows_in_two_terms": (seg.window(1, 0) | seg.window(None, 4), True),
        "segments.causal()&other_segments": (seg.causal() & Segments(ids_q.flip(-1), ids_k), False),
        # SegmentChunkWindow: a band over chunk numbers inside the segments (the POS flag over its chunk numbers)
        "segments.chunk()": (seg.chunk(4, left=1), True),
        "segments.chunk()&causal": (seg.chunk(3, None, 1) & Causal(), True),
        "segments.chunk()|window": (seg.chunk(5, 0, 0) | Window(2, 2), True),
        "segment_chunks_in_two_terms": (seg.chunk(4, 1, 0) | seg.chunk(4, None, 2), True),
        "segments.chunk()&segments.window": (seg.chunk(4, 1) & seg.window(3, 0), False),
        "segments.chunk()|segments.causal()": (seg.chunk(4, 1) | seg.causal(), False),
        "segment_chunks_of_two_sizes": (seg.chunk(4, 1) & seg.chunk(3, 1), False),
    }


@pytest.mark.parametrize("q_len,k_len", [(37, 53), (50, 20)])
def test_program_matches_dense(q_len, k_len):
    for name, (mask, exact) in _masks(q_len, k_len).items():
        prog = lower_mask(mask, q_len, k_len, "cpu")
        assert prog.exact_in_kernel == exact, name
        assert needs_dense_fallback(mask, q_len, k_len) == (not exact), name
        got = prog.evaluate(q_len, k_len)
        want = mask.dense(q_len, k_len)
        shape = torch.broadcast_shapes(got.shape, want.shape)
        assert torch.equal(got.expand(shape), want.expand(shape)), name
        assert lower_mask(mask, q_len, k_len, "cpu") is prog  # cached


def test_program_slots():
    q_len = k_len = 40
    assert lower_mask(Causal(), q_len, k_len, "cpu").terms == (SLOT_WIN0,)
    ids = torch.arange(40) // 10
    assert lower_mask(Segments(ids) & Window(3, 3), q_len, k_len, "cpu").terms == (SLOT_WIN0 | SLOT_SEG,)
    dense = Dense(torch.ones(40, 40, dtype=torch.bool))
    assert lower_mask(dense, q_len, k_len, "cpu").terms == (SLOT_DENSE,)
    blk = BlockSparse(torch.ones(5, 5, dtype=torch.bool), 8)
    assert lower_mask(blk | Causal(), q_len, k_len, "cpu").terms == (SLOT_BLK, SLOT_WIN0)
    # A window that covers every (i, j) forbids nothing: no element-wise test at all.
    assert lower_mask(Window(100, 100), q_len, k_len, "cpu").terms == (0,)
    # Chunk windows use a window slot with its CHUNK flag; chunks of one token are plain windows; two chunk
    # windows of the same chunk size intersect into one band; a chunk band covering everything is no test.
    assert lower_mask(ChunkWindow(8), q_len, k_len, "cpu").terms == (SLOT_WIN0 | SLOT_CHUNK0,)
    assert lower_mask(ChunkWindow(1, 3, 0), q_len, k_len, "cpu").terms == (SLOT_WIN0,)
    both = lower_mask(ChunkWindow(4, 3, 0) & ChunkWindow(4, 1, 2), q_len, k_len, "cpu")
    assert both.terms == (SLOT_WIN0 | SLOT_CHUNK0,) and both.windows[0] == (-1, 0, 4, 0)
    assert lower_mask(Causal() & ChunkWindow(8, 0, 0), q_len, k_len, "cpu").terms == (
        SLOT_WIN0 | SLOT_WIN1 | SLOT_CHUNK1,
    )
    assert lower_mask(ChunkWindow(8, 5, 5), q_len, k_len, "cpu").terms == (0,)
    # SegmentWindow: the SEG slot and a window slot with its POS flag; no window when it bounds nothing
    assert lower_mask(Segments(ids).causal(), q_len, k_len, "cpu").terms == (SLOT_WIN0 | SLOT_SEG | SLOT_POS0,)
    assert lower_mask(Causal() & Segments(ids).window(2, None), q_len, k_len, "cpu").terms == (
        SLOT_WIN0 | SLOT_WIN1 | SLOT_SEG | SLOT_POS1,
    )
    assert lower_mask(Segments(ids).window(None, None), q_len, k_len, "cpu").terms == (SLOT_SEG,)
    # A term that allows nothing disappears; a mask that allows nothing has no term.
    assert lower_mask(Window(0, 0) & Window(-3, 5), q_len, k_len, "cpu").terms == ()


def test_radial_lowers_to_block_lookup():
    from zoo.attention import Radial

    mask = Radial(4, 24, block_size=16)
    n = mask.seq_len
    prog = lower_mask(mask, n, n, "cpu")
    assert prog.exact_in_kernel and prog.terms == (SLOT_BLK,)
    assert torch.equal(prog.evaluate(n, n)[0, 0], mask.dense(n, n)[0, 0])


class _Unknown(Mask):
    """A mask class the kernel has no slot for (falls back to a dense copy)."""

    def _dense_rows(self, q_len, k_len, start, stop, device):
        i = torch.arange(start, stop)[:, None]
        j = torch.arange(k_len)[None, :]
        return ((i * 7 + j * 3) % 5 != 0)[None, None]


def test_unknown_mask_falls_back_to_dense():
    mask = _Unknown() & Causal()
    prog = lower_mask(mask, 20, 30, "cpu")
    assert not prog.exact_in_kernel and prog.terms == (SLOT_DENSE,)
    assert "materialised" in prog.description
    assert torch.equal(prog.evaluate(20, 30), mask.dense(20, 30))


def test_structured_masks_never_materialise(monkeypatch):
    """Lists and programs for Window/Causal/Segments/BlockSparse combinations at 100k tokens without
    building any Nq x Nk tensor (dense() is made to fail)."""

    def boom(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__}.dense was called")

    monkeypatch.setattr(Mask, "dense", boom)
    n = 100_000
    ids = torch.arange(n) // 3000
    blk = BlockSparse(torch.rand(-(-n // 128), -(-n // 128)) < 0.1, 128)
    from zoo.attention import Radial

    radial = Radial(25, 4000, 1.0, True)  # 100k video tokens, 782 x 782 blocks
    for mask in (Causal() & Window(4096, 0), Segments(ids) & Causal(), Window(512, 512) | blk, radial,
                 radial & Causal()):
        prog = lower_mask(mask, n, n, "cpu")
        assert prog.exact_in_kernel and prog.dense is None
        lists = kernel_tile_lists(mask, n, n, 128, 64, "cpu")
        kernel_tile_lists(mask, n, n, 128, 64, "cpu", transposed=True)
        assert lists.index.shape[-2:] == (-(-n // 128), -(-n // 64))


@pytest.mark.parametrize("q_len,k_len", [(40, 64), (64, 40)], ids=["q-ragged", "k-ragged"])
def test_transposed_lists_demote_the_ragged_edge_of_each_side(q_len, k_len):
    """Ragged on one side only (the dK/dV pass's rows are key tiles): the transposed lists demote the last key
    tile row when Nk is ragged and the last query tile column when Nq is, never the other way round. With the flags
    swapped, a FULL tile past Nq skips its bounds checks and the dK/dV pass reads rows past the sequence."""
    mask = Full()
    states = mask.block_map(q_len, k_len, 32, 32).states
    bwd = kernel_tile_lists(mask, q_len, k_len, 32, 32, "cpu", transposed=True)
    fwd = kernel_tile_lists(mask, q_len, k_len, 32, 32, "cpu")
    ragged_q, ragged_k = q_len % 32 != 0, k_len % 32 != 0
    assert ragged_q != ragged_k
    assert _lists_as_dict(bwd) == _brute_lists(states.transpose(-1, -2), ragged_k, ragged_q)
    assert _lists_as_dict(fwd) == _brute_lists(states, ragged_q, ragged_k)


def test_one_mask_object_at_growing_key_lengths():
    """KV-cache decoding reuses one mask object while the key length grows: the cached tile lists and program
    are per (q_len, k_len), so each length gets its own (bottom-right aligned bands move with Nk - Nq)."""
    for mask in (Causal(), Window(3, 0)):
        for q_len, k_len in ((8, 16), (8, 40), (8, 16), (20, 40), (8, 40)):
            prog = lower_mask(mask, q_len, k_len, "cpu")
            got, want = prog.evaluate(q_len, k_len), mask.dense(q_len, k_len)
            assert torch.equal(got.expand_as(want), want), (mask, q_len, k_len)
            states = mask.block_map(q_len, k_len, 16, 16).states
            for transposed in (False, True):
                lists = kernel_tile_lists(mask, q_len, k_len, 16, 16, "cpu", transposed=transposed)
                ragged = (q_len % 16 != 0, k_len % 16 != 0)
                want_lists = (_brute_lists(states.transpose(-1, -2), ragged[1], ragged[0]) if transposed
                              else _brute_lists(states, *ragged))
                assert _lists_as_dict(lists) == want_lists, (mask, q_len, k_len, transposed)
        assert lower_mask(mask, 8, 16, "cpu").windows != lower_mask(mask, 8, 40, "cpu").windows


def _edge_masks(q_len: int, k_len: int):
    """Bands at the limits of j - i (Nq - 1 below the diagonal, Nk - 1 above it): ``right = Nq - 2`` forbids only
    the corner pair (0, Nk - 1), ``left = Nk - 2`` only (Nq - 1, 0) (bottom-right aligned: shift Nk - Nq); and chunk
    windows of chunk size 1 (a plain window, left and right asymmetric) and 2 (the smallest real chunk)."""
    out = {}
    for d in (3, 2, 1):
        out[f"right=Nq-{d}"] = Window(None, q_len - d)
        out[f"left=Nk-{d}"] = Window(k_len - d, None)
        out[f"left=Nk-{d},right=Nq-{d}"] = Window(k_len - d, q_len - d)
    out["chunk1(3,0)"] = ChunkWindow(1, 3, 0)
    out["chunk1(0,2)"] = ChunkWindow(1, 0, 2)
    out["chunk2(1,0)"] = ChunkWindow(2, 1, 0)
    out["chunk2(0,1)"] = ChunkWindow(2, 0, 1)
    return out


@pytest.mark.parametrize("q_len,k_len", [(20, 20), (20, 27), (27, 20)])
def test_program_matches_dense_at_the_edges(q_len, k_len):
    """Hand-computable boundary cases of the lowering: a band that forbids one corner pair keeps its bounds, a
    chunk window of chunk size 2 keeps its CHUNK flag, one of chunk size 1 keeps left and right."""
    for name, mask in _edge_masks(q_len, k_len).items():
        got = lower_mask(mask, q_len, k_len, "cpu").evaluate(q_len, k_len)
        want = mask.dense(q_len, k_len)
        assert torch.equal(got.expand_as(want), want), name
    corner = lower_mask(Window(None, q_len - 2), q_len, k_len, "cpu")
    assert corner.terms == (SLOT_WIN0,)  # not "forbids nothing"
    assert lower_mask(ChunkWindow(2, 1, 0), q_len, k_len, "cpu").terms == (SLOT_WIN0 | SLOT_CHUNK0,)
