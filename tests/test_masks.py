"""Mask objects: dense forms, block maps that agree with them, combinations, no Nq x Nk for structured
masks, caching, clear errors."""
from __future__ import annotations

import math

import pytest
import torch

from zoo.attention import EMPTY, FULL, PARTIAL, BlockSparse, Causal, Dense, Full, Segments, Window
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
    for mask in [Causal(), Window(256, 0), Segments(torch.arange(n) // 1000), Causal() & Window(512, 512)]:
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


def test_mask_errors():
    with pytest.raises(TypeError, match="int or None"):
        Window(1.5, 0)
    with pytest.raises(ValueError, match="allows no key"):
        Window(-3, 1)
    with pytest.raises(TypeError, match="integer tensor"):
        Segments(torch.zeros(4))
    with pytest.raises(TypeError, match="bool tensor"):
        Dense(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="positive ints"):
        Causal().dense(0, 3)
    with pytest.raises(ValueError, match="rows"):
        Causal().dense(4, 4, rows=(3, 9))
