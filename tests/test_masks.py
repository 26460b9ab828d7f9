"""Mask objects: dense forms, block maps that agree with them, combinations, no Nq x Nk for structured
masks, caching, clear errors."""
from __future__ import annotations

import math

import pytest
import torch

from zoo.attention import EMPTY, FULL, PARTIAL, BlockSparse, Causal, ChunkWindow, Dense, Full, Segments, Window
from zoo.attention.masks import _states_from_dense


def exact_states(mask, nq, nk, bq, bk):
    return _states_from_dense(mask.dense(nq, nk), bq, bk)


def structured_masks(nq, nk):
    g = torch.Generator().manual_seed(0)
    ids = torch.sort(torch.randint(0, 4, (2, nq), generator=g), dim=-1).values
    kv = torch.sort(torch.randint(0, 4, (2, nk), generator=g), dim=-1).values
    ids[0, :3] = -1
    qb, kb = math.ceil(nq / 8), math.ceil(nk / 8)
    return [
        Full(),
        Causal(),
        Window(4, 0),
        Window(3, 7),
        Window(None, 2),
        Segments(ids, kv),
        BlockSparse(torch.rand(qb, kb, generator=g) < 0.4, 8),
        Causal() & Window(6, None),
        Window(0, 0) | Segments(ids, kv),
        ChunkWindow(3),
        ChunkWindow(5, 1, 0),
        ChunkWindow(4, 0, 0),
        ChunkWindow(6, None, 1),
        ChunkWindow(7, -1, 2),
    ]


@pytest.mark.parametrize("nq,nk", [(1, 1), (7, 7), (33, 20), (20, 33), (97, 130)])
@pytest.mark.parametrize("tiles", [(4, 4), (8, 8), (16, 5), (64, 64)])
def test_block_map_is_exact_for_structured_masks(nq, nk, tiles):
    for mask in structured_masks(nq, nk):
        got = mask.block_map(nq, nk, *tiles).states
        want = exact_states(mask, nq, nk, *tiles)
        assert got.shape[-2:] == want.shape[-2:]
        # Never wrong: an EMPTY or FULL claim must be true. Window/Causal/BlockSparse/sorted Segments are exact.
        wrong = ((got == EMPTY) & (want != EMPTY)) | ((got == FULL) & (want != FULL))
        assert not wrong.any(), mask
        if not isinstance(mask, (BlockSparse,)) and "|" not in repr(mask) and "&" not in repr(mask):
            assert torch.equal(got, want.expand_as(got)), mask


def test_block_sparse_at_its_own_tile_size_and_others():
    bm = torch.tensor([[True, False, True], [False, False, True]])
    mask = BlockSparse(bm, (4, 3))
    dense = mask.dense(8, 9)[0, 0]
    assert dense[:4, :3].all() and not dense[:4, 3:6].any() and dense[4:, 6:].all()
    assert torch.equal(mask.block_map(8, 9, 4, 3).states[0, 0], torch.where(bm, FULL, EMPTY).to(torch.int8))
    coarse = mask.block_map(8, 9, 8, 9).states[0, 0]
    assert coarse.tolist() == [[PARTIAL]]


def test_structured_block_maps_never_build_the_dense_matrix(monkeypatch):
    n = 1 << 16  # a 65536 x 65536 dense bool matrix would be 4 GiB
    for mask in [Causal(), Window(256, 0), Segments(torch.arange(n) // 1000), Causal() & Window(512, 512),
                 ChunkWindow(1000, 4, 0)]:
        monkeypatch.setattr(type(mask), "_dense_rows", lambda *a, **k: pytest.fail("dense form was built"))
        states = mask.block_map(n, n, 128, 128).states
        assert states.shape[-2:] == (512, 512)


def test_causal_block_map_counts():
    states = Causal().block_map(256, 256, 64, 64).states[0, 0]
    assert (states == FULL).sum() == 6 and (states == PARTIAL).sum() == 4 and (states == EMPTY).sum() == 6


def test_block_map_is_cached_per_shape():
    mask = Window(8, 8)
    assert mask.block_map(100, 100, 16) is mask.block_map(100, 100, 16)
    assert mask.block_map(100, 100, 16) is not mask.block_map(100, 100, 32)


def test_block_map_transposed_and_kept_fraction():
    bmap = Causal().block_map(64, 64, 16, 16)
    t = bmap.transposed()
    assert torch.equal(t.states[0, 0], bmap.states[0, 0].T)
    assert math.isclose(bmap.kept_fraction(), 10 / 16)
    assert bmap.to_dense()[0, 0].sum() == 10 * 256


def test_rows_slice_matches_full_dense():
    for mask in structured_masks(30, 41):
        full = mask.dense(30, 41)
        assert torch.equal(mask.dense(30, 41, rows=(5, 17)), full[..., 5:17, :])


def test_segment_padding_never_attended():
    ids = torch.tensor([0, 0, -1, 1])
    dense = Segments(ids).dense(4, 4)[0, 0]
    assert not dense[2].any() and not dense[:, 2].any()
    assert dense[0, 1] and not dense[0, 3]


def test_combinators():
    a, b = Window(1, 1), Causal()
    assert torch.equal((a & b).dense(9, 9), a.dense(9, 9) & b.dense(9, 9))
    assert torch.equal((a | b).dense(9, 9), a.dense(9, 9) | b.dense(9, 9))
    assert (Full() & Full()).is_full and (Full() | Causal()).is_full and not (Full() & Causal()).is_full


def _wenet_subsequent_chunk_mask(size: int, chunk: int, num_left_chunks: int) -> torch.Tensor:
    """WeNet's streaming mask (wenet/utils/mask.py, subsequent_chunk_mask), re-derived in loop form: row i
    allows [max((i // chunk - num_left_chunks) * chunk, 0), min((i // chunk + 1) * chunk, size)); a negative
    num_left_chunks means the whole history."""
    out = torch.zeros(size, size, dtype=torch.bool)
    for i in range(size):
        start = 0 if num_left_chunks < 0 else max((i // chunk - num_left_chunks) * chunk, 0)
        out[i, start : min((i // chunk + 1) * chunk, size)] = True
    return out


def _nemo_chunked_limited_mask(size: int, left: int, right: int) -> torch.Tensor:
    """NeMo's ConformerEncoder att_context_style="chunked_limited" with att_context_size [left, right]
    (nemo/collections/asr/modules/conformer_encoder.py, _create_masks), re-derived: chunks of right + 1
    frames, left // (right + 1) chunks of left context (unlimited when left < 0)."""
    chunk = right + 1
    left_chunks = left // chunk if left >= 0 else 10000
    diff = torch.arange(size)[:, None] // chunk - torch.arange(size)[None, :] // chunk
    return (diff <= left_chunks) & (diff >= 0)


@pytest.mark.parametrize("size,chunk,left", [(37, 4, -1), (37, 4, 0), (37, 4, 2), (50, 7, 1), (5, 8, 3), (16, 1, 3)])
def test_chunk_window_is_the_streaming_asr_mask(size, chunk, left):
    mask = ChunkWindow(chunk, left=None if left < 0 else left)
    assert torch.equal(mask.dense(size, size)[0, 0], _wenet_subsequent_chunk_mask(size, chunk, left))
    nemo_left = -1 if left < 0 else left * chunk
    assert torch.equal(mask.dense(size, size)[0, 0], _nemo_chunked_limited_mask(size, nemo_left, chunk - 1))


def test_chunk_window_alignment_and_special_cases():
    # A KV-cache decoder fed one chunk at a time sees the last rows of the full mask (bottom-right alignment).
    mask, n = ChunkWindow(4, 1, 0), 22
    full = mask.dense(n, n)[0, 0]
    for start in (0, 4, 8, 18):
        stop = min(start + 4, n)
        assert torch.equal(mask.dense(stop - start, stop)[0, 0], full[start:stop, :stop])
    # More queries than keys: the first queries sit at negative positions (chunk -1 and below).
    got = ChunkWindow(3, 0, 0).dense(8, 5)[0, 0]
    positions = torch.arange(8) - 3
    want = torch.div(positions, 3, rounding_mode="floor")[:, None] == (torch.arange(5) // 3)[None, :]
    assert torch.equal(got, want) and not got[:3].any()
    # Chunks of one token are the token Window; the block-diagonal form equals Segments of chunk ids.
    for nq, nk in ((9, 9), (5, 12), (12, 5)):
        assert torch.equal(ChunkWindow(1, 2, 1).dense(nq, nk), Window(2, 1).dense(nq, nk))
        assert torch.equal(ChunkWindow(1).dense(nq, nk), Causal().dense(nq, nk))
    assert torch.equal(ChunkWindow(4, 0, 0).dense(10, 10), Segments(torch.arange(10) // 4).dense(10, 10))
    assert repr(ChunkWindow(16, 2)) == "ChunkWindow(chunk_size=16, left=2, right=0)"


def test_mask_errors():
    with pytest.raises(TypeError, match="int or None"):
        Window(1.5, 0)
    with pytest.raises(ValueError, match="allows no key"):
        Window(-3, 1)
    for bad in (0, -2, 2.5, True, None):
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            ChunkWindow(bad)
    with pytest.raises(TypeError, match="left must be an int or None"):
        ChunkWindow(4, 1.5)
    with pytest.raises(ValueError, match="allows no chunk"):
        ChunkWindow(4, -2, 1)
    with pytest.raises(TypeError, match="integer tensor"):
        Segments(torch.zeros(4))
    with pytest.raises(TypeError, match="bool tensor"):
        Dense(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"Segments ids must have shape \(N,\) or \(B, N\)"):
        Segments(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="Segments ids have batch 2 but attention has batch 3"):
        Segments(torch.zeros(2, 4, dtype=torch.long)).check_shape(4, 4, batch=3)
    with pytest.raises(ValueError, match="Dense mask must have 2 to 4 dims"):
        Dense(torch.ones(5, dtype=torch.bool))
    dense = Dense(torch.ones(2, 3, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch dim 2 does not broadcast to batch 5"):
        dense.check_shape(4, 4, batch=5)
    with pytest.raises(ValueError, match="head dim 3 does not broadcast to 4 heads"):
        dense.check_shape(4, 4, batch=2, heads=4)
    blocks = BlockSparse(torch.ones(2, 3, 1, 1, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="map batch dim 2 does not broadcast to batch 5"):
        blocks.check_shape(4, 4, batch=5)
    with pytest.raises(ValueError, match="map head dim 3 does not broadcast to 4 heads"):
        blocks.check_shape(4, 4, batch=2, heads=4)
    with pytest.raises(ValueError, match="block sizes must be >= 1"):
        Causal().block_map(8, 8, 0)
    assert repr(dense) == "Dense(shape=(2, 3, 4, 4))"
    assert repr(blocks) == "BlockSparse(tiles=(2, 3, 1, 1), block=(4, 4))"
    with pytest.raises(ValueError, match="positive ints"):
        Causal().dense(0, 3)
    with pytest.raises(ValueError, match="rows"):
        Causal().dense(4, 4, rows=(3, 9))


def test_bounds_take_numpy_ints_and_switches_take_booleans():
    """Window(np.int64(3), 0) was refused as "not an int"; Radial(frame0_sink="no") switched the sink on."""
    import numpy as np

    from zoo.attention import ChunkWindow, Radial, Window, radial_block_mask

    window = Window(np.int64(3), 0)
    assert type(window.left) is int and torch.equal(window.dense(6, 6), Window(3, 0).dense(6, 6))
    assert ChunkWindow(4, np.int32(2)).left == 2
    with pytest.raises(TypeError, match="Window left must be an int or None, got 3.0"):
        Window(3.0, 0)
    with pytest.raises(TypeError, match="Radial: frame0_sink must be True or False"):
        Radial(2, 64, frame0_sink="no")
    with pytest.raises(TypeError, match="radial_block_mask: frame0_sink must be True or False"):
        radial_block_mask(2, 64, frame0_sink="no")
