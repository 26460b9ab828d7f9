"""Mask objects: dense forms, block maps that agree with them, combinations, no Nq x Nk for structured
masks, caching, clear errors."""
from __future__ import annotations

import math

import pytest
import torch

from zoo.attention import (
    EMPTY, FULL, PARTIAL, BlockSparse, Causal, ChunkWindow, Dense, Full, KeyPadding, SegmentChunkWindow, SegmentWindow,
    Segments, Window,
)
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


def test_one_mask_object_gives_block_maps_at_every_tile_size_in_turn():
    """A mask's block maps are cached per mask object, and one object is asked at several tile sizes: the Triton
    kernel at its forward and its backward tiles (and autotune configs that differ in BLOCK_N only), mask_viz or
    the bench after an attend(). Each map must be the one of its own (block_q, block_k): a cache key without
    block_k served the (16, 16) map for (16, 32), with 7 key tiles instead of 4 (mutation audit 2026-12-07, M8).
    Reference: the dense mask reduced per tile (_states_from_dense), and a fresh mask object (empty cache) for the
    conservative maps (BlockSparse at a foreign tile size, & and |)."""
    nq, nk = 97, 130
    fresh_masks = structured_masks(nq, nk)
    for index, mask in enumerate(structured_masks(nq, nk)):
        for bq, bk in [(16, 16), (16, 32), (32, 16), (8, 24), (16, 16), (32, 16)]:
            bmap = mask.block_map(nq, nk, bq, bk)
            assert (bmap.block_q, bmap.block_k) == (bq, bk), mask
            want_exact = exact_states(mask, nq, nk, bq, bk)
            assert bmap.states.shape[-2:] == (math.ceil(nq / bq), math.ceil(nk / bk)), (mask, bq, bk)
            wrong = ((bmap.states == EMPTY) & (want_exact != EMPTY)) | ((bmap.states == FULL) & (want_exact != FULL))
            assert not wrong.any(), (mask, bq, bk)
            uncached = fresh_masks[index]._build_block_map(nq, nk, bq, bk, None).states
            assert torch.equal(bmap.states, uncached), (mask, bq, bk)


def test_segments_ids_and_kv_ids_of_different_batches_are_refused():
    """Segments(ids of batch 2, kv_ids of batch 3) describes no attention problem: it is refused when built, with
    both batches named, instead of an opaque broadcast RuntimeError inside attend() later (mutation audit
    2026-12-07, M15). A batch of 1 on either side broadcasts, as for the attention's own batch."""
    ids, kv_ids = torch.zeros(2, 5, dtype=torch.long), torch.zeros(3, 7, dtype=torch.long)
    with pytest.raises(ValueError, match=r"Segments: ids batch 2 and kv_ids batch 3 differ"):
        Segments(ids, kv_ids)
    with pytest.raises(ValueError, match=r"Segments: ids batch 3 and kv_ids batch 2 differ"):
        Segments(kv_ids, ids)
    for q_ids, k_ids, batch in [(ids[:1], kv_ids, 3), (ids, kv_ids[:1], 2), (ids[0], kv_ids, 3), (ids, kv_ids[0], 2)]:
        assert Segments(q_ids, k_ids).dense(5, 7).shape[0] == batch


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
    # a bound past int64 positions was an OverflowError from inside dense() on every backend
    with pytest.raises(ValueError, match=r"Window left=100000000000000000000 is beyond any sequence length: use "
                                         r"left=None for an unbounded side"):
        Window(10**20, 0)
    with pytest.raises(ValueError, match=r"ChunkWindow right=-100000000000000000000 is beyond"):
        ChunkWindow(4, 2, -10**20)
    assert Window(2**40, 0).dense(3, 3).equal(Causal().dense(3, 3))  # large but representable: fine
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


def _per_sequence_sdpa(q, k, v, q_bounds, k_bounds, causal=False):
    """FlashAttention varlen semantics re-derived with torch SDPA one sequence at a time: the packed rows
    q_bounds[s] of sequence s attend to its keys k_bounds[s]; a query with no key gets a zero row."""
    out = torch.zeros(q.shape[:-1] + v.shape[-1:], dtype=q.dtype)
    for (q0, q1), (k0, k1) in zip(q_bounds, k_bounds):
        if q1 > q0 and k1 > k0:
            out[..., q0:q1, :] = torch.nn.functional.scaled_dot_product_attention(
                q[..., q0:q1, :], k[..., k0:k1, :], v[..., k0:k1, :], is_causal=causal)
    return out


@pytest.mark.parametrize("backend", ["torch", "sdpa", "blocksparse"])
def test_from_cu_seqlens_is_flash_attention_varlen(backend):
    """flash_attn_varlen_func's packing (cu_seqlens_q / cu_seqlens_k) as a Segments mask, on every CPU backend,
    against SDPA run per sequence; an empty sequence and cross attention with other key lengths included."""
    from zoo.attention import attend

    g = torch.Generator().manual_seed(3)
    cu_q, cu_k = [0, 5, 5, 17, 40, 41], [0, 9, 12, 13, 33, 50]
    q = torch.randn(1, 2, 41, 16, generator=g)
    k, v = torch.randn(2, 1, 2, 50, 16, generator=g)
    bounds = lambda cu: list(zip(cu[:-1], cu[1:]))  # noqa: E731
    want = _per_sequence_sdpa(q, k, v, bounds(cu_q), bounds(cu_k))
    out = attend(q, k, v, mask=Segments.from_cu_seqlens(torch.tensor(cu_q, dtype=torch.int32), cu_k), backend=backend)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=1e-5)
    # self attention, causal inside each sequence = varlen causal=True
    x = torch.randn(3, 1, 2, 41, 16, generator=g)
    want = _per_sequence_sdpa(*x, bounds(cu_q), bounds(cu_q), causal=True)
    out = attend(*x, mask=Causal() & Segments.from_cu_seqlens(cu_q), backend=backend)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("make", ["dense", "segments", "segment_window", "blocksparse", "combined"])
def test_in_place_edit_of_a_mask_tensor_reaches_every_backend(make):
    """A mask whose tensor is edited in place (a key-padding mask updated for the next batch, ids reused): the
    block-sparse path (chosen automatically on CPU at this size) saw the old pattern from its cached block map
    and plan, silently; the reference backends saw the new one. Now the caches follow the tensor's version."""
    from zoo.attention import attend

    g = torch.Generator().manual_seed(7)
    q, k, v = torch.randn(3, 1, 2, 512, 32, generator=g)
    keep = torch.zeros(1, 1, 1, 512, dtype=torch.bool)
    keep[..., :100] = True
    ids = torch.zeros(512, dtype=torch.long)
    ids[256:] = 1
    tiles = torch.eye(8, dtype=torch.bool)
    masks = {"dense": lambda: (Dense(keep), keep), "segments": lambda: (Segments(ids), ids),
             "segment_window": lambda: (Segments(ids).window(64, 0), ids),
             "blocksparse": lambda: (BlockSparse(tiles, 64), tiles), "combined": lambda: (Causal() & Dense(keep), keep)}
    mask, tensor = masks[make]()
    for backend in ("blocksparse", "sdpa", None):
        attend(q, k, v, mask, backend=backend)
    if tensor.dtype == torch.bool:  # in place: a new pattern
        tensor.logical_not_()
    else:
        tensor[100:300] = 5
    rebuilt = {"dense": Dense(keep.clone()), "segments": Segments(ids.clone()),
               "segment_window": Segments(ids.clone()).window(64, 0), "blocksparse": BlockSparse(tiles.clone(), 64),
               "combined": Causal() & Dense(keep.clone())}[make]
    want = attend(q, k, v, rebuilt, backend="torch")
    for backend in ("blocksparse", "sdpa", None):
        torch.testing.assert_close(attend(q, k, v, mask, backend=backend), want, atol=2e-6, rtol=1e-5, msg=backend)


_DOC_IDS = torch.zeros(512, dtype=torch.long)  # read by a module-level mask_mod below, as FlexAttention's examples do


def _same_document(b, h, q_idx, kv_idx):
    return _DOC_IDS[q_idx] == _DOC_IDS[kv_idx]


@pytest.mark.parametrize("change", ["window_left", "chunk_size", "block_size", "ids_replaced", "maskmod_closure",
                                    "maskmod_global", "radial_map_edit", "radial_setting"])
def test_changes_without_an_in_place_tensor_edit_reach_every_backend(change):
    """Changes the version counters of the mask's tensors do not show: a setting reassigned, ids replaced by another
    tensor, a tensor read by a MaskMod predicate edited in place, Radial's block map edited through its public
    view. The block-sparse path kept its cached block map and plan (a wrong result, silently) while the reference
    backends saw the change."""
    from zoo.attention import MaskMod, Radial, attend, radial_block_mask

    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(3, 1, 2, 512, 16, generator=g)
    ids = torch.zeros(512, dtype=torch.long)
    ids[256:] = 1
    doc = ids.clone()
    _DOC_IDS.copy_(ids)
    radial = Radial(4, 128, block_size=64)
    radial_q, radial_k, radial_v = torch.randn(3, 1, 2, radial.seq_len, 16, generator=g)
    makers = {
        "window_left": lambda: Window(4, 0), "chunk_size": lambda: ChunkWindow(16), "block_size":
        lambda: BlockSparse(torch.eye(8, dtype=torch.bool), 64), "ids_replaced": lambda: Segments(ids),
        "maskmod_closure": lambda: MaskMod(lambda b, h, qi, ki: doc[qi] == doc[ki]),
        "maskmod_global": lambda: MaskMod(_same_document), "radial_map_edit": lambda: radial,
        "radial_setting": lambda: radial}
    mask = makers[change]()
    x = (radial_q, radial_k, radial_v) if change.startswith("radial") else (q, k, v)
    for backend in ("blocksparse", None):
        attend(*x, mask, backend=backend)  # fills the caches
    if change == "window_left":
        mask.left = 100
    elif change == "chunk_size":
        mask.chunk_size = 64
    elif change == "block_size":
        mask.block_mask = torch.eye(16, dtype=torch.bool)[None, None]
        mask.block_q = mask.block_k = 32
    elif change == "ids_replaced":
        mask.q_ids = mask.kv_ids = torch.ones(1, 512, dtype=torch.long)
    elif change == "maskmod_closure":
        doc[100:300] = 7
    elif change == "maskmod_global":
        _DOC_IDS[100:300] = 7
    elif change == "radial_map_edit":
        mask.block_mask.fill_(True)
    else:
        mask.frame0_sink = True
    want = attend(*x, mask, backend="torch")  # the dense form, built from the mask as it is now
    if change == "radial_setting":
        assert torch.equal(mask.block_mask, radial_block_mask(4, 128, frame0_sink=True, block_size=64))
    for backend in ("blocksparse", "sdpa", None):
        torch.testing.assert_close(attend(*x, mask, backend=backend), want, atol=2e-6, rtol=1e-5, msg=backend)
    if change == "radial_map_edit":
        assert mask.block_map(radial.seq_len, radial.seq_len, 64).kept_fraction() == 1.0


def test_masks_of_inference_tensors_run_on_every_backend():
    """Masks built under torch.inference_mode() (Lightning's validation and predict loops): their tensors have no
    version counter, and every backend that caches derived data raised "Inference tensors do not track version
    counter" (the block-sparse path, chosen automatically on CPU from 256 x 256)."""
    from zoo.attention import attend

    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(3, 1, 2, 300, 16, generator=g)
    with torch.inference_mode():
        masks = [Segments.from_lengths(torch.tensor([200]), 300), Dense(torch.rand(1, 1, 300, 300, generator=g) < 0.5),
                 BlockSparse(torch.rand(5, 5, generator=g) < 0.5, 64) | Causal()]
        for mask in masks:
            want = attend(q, k, v, mask, backend="torch")
            for backend in ("blocksparse", None, "blocksparse"):  # twice: a cached entry is not reused blindly
                torch.testing.assert_close(attend(q, k, v, mask, backend=backend), want, atol=2e-6, rtol=1e-5)
            mask.tensors()[0].logical_not_() if mask.tensors()[0].dtype == torch.bool else None
    for mask in masks:  # outside inference mode too
        torch.testing.assert_close(attend(q, k, v, mask), attend(q, k, v, mask, backend="torch"), atol=2e-6, rtol=1e-5)


def test_numpy_ids_are_copied():
    """docs/core.md: ids given as numpy arrays are converted to int64 copies. An int64 array was shared (torch.as_tensor),
    so a reused buffer edited later changed the dense mask but not the cached block maps."""
    np = pytest.importorskip("numpy")
    ids = np.zeros(512, dtype=np.int64)
    mask = Segments(ids)
    ids[:] = 3
    assert int(mask.q_ids.abs().sum()) == 0


def test_a_bool_tensor_combines_from_either_side():
    keep = torch.rand(1, 1, 6, 6, generator=torch.Generator().manual_seed(0)) < 0.5
    for mask, want in ((keep & Causal(), Dense(keep) & Causal()), (keep | Window(1, 1), Dense(keep) | Window(1, 1))):
        assert torch.equal(mask.dense(6, 6), want.dense(6, 6))
    with pytest.raises(TypeError, match="mask"):
        _ = 3 & Causal()


def test_a_mask_reused_for_growing_lengths_keeps_a_bounded_cache():
    """One Causal() held by a decoder while the KV cache grows: its block maps (and the kernels' lists and
    programs, same helper) stay at CACHE_ENTRIES_PER_MASK problem sizes, the newest ones."""
    from zoo.attention.masks import CACHE_ENTRIES_PER_MASK
    from zoo.kernels.block_index import _LIST_CACHE, kernel_tile_lists

    mask = Causal()
    for k_len in range(1, 3 * CACHE_ENTRIES_PER_MASK):
        mask.block_map(1, k_len, 16, 16)
        kernel_tile_lists(mask, 1, k_len, 16, 16, "cpu")
    maps = [key for key in mask._block_cache if isinstance(key, tuple)]
    assert len(maps) == CACHE_ENTRIES_PER_MASK and maps[-1][1] == 3 * CACHE_ENTRIES_PER_MASK - 1
    assert len([key for key in _LIST_CACHE[mask] if isinstance(key, tuple)]) == CACHE_ENTRIES_PER_MASK
    assert torch.equal(mask.block_map(1, 5, 16, 16).states, Causal().block_map(1, 5, 16, 16).states)  # rebuilt


def test_counts_take_numpy_ints():
    import numpy as np

    from zoo.attention import MaskMod

    assert torch.equal(ChunkWindow(np.int64(4)).dense(9, 9), ChunkWindow(4).dense(9, 9))
    assert MaskMod(lambda b, h, i, j: i >= j, batch_size=np.int64(2)).batch_size == 2
    with pytest.raises(ValueError, match="ChunkWindow chunk_size must be a positive int, got 2.5"):
        ChunkWindow(2.5)


def _varlen_reference(q, k, v, cu_q, cu_k, left, right):
    """flash_attn_varlen_func(causal / window_size) re-derived in float64, one sequence at a time: query r of a
    sequence with Lq queries and Lk keys sits at key r + Lk - Lq and sees keys r + Lk - Lq - left .. + right;
    a query that sees no key gets a zero row (FlashAttention's output there)."""
    out = torch.zeros(q.shape[:-1] + v.shape[-1:], dtype=torch.float64)
    for (q0, q1), (k0, k1) in zip(zip(cu_q[:-1], cu_q[1:]), zip(cu_k[:-1], cu_k[1:])):
        pos = torch.arange(q1 - q0)[:, None] + (k1 - k0) - (q1 - q0)
        key = torch.arange(k1 - k0)[None]
        allowed = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool)
        if left is not None:
            allowed &= key >= pos - left
        if right is not None:
            allowed &= key <= pos + right
        scores = q[..., q0:q1, :].double() @ k[..., k0:k1, :].double().transpose(-1, -2) / math.sqrt(q.shape[-1])
        probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), -1).nan_to_num(0.0)
        out[..., q0:q1, :] = probs @ v[..., k0:k1, :].double()
    return out


@pytest.mark.parametrize("backend", ["torch", "sdpa", "blocksparse"])
@pytest.mark.parametrize("left,right", [(None, 0), (5, 0), (3, 2), (None, None)])
def test_segment_window_is_flash_attention_varlen_causal(backend, left, right):
    """Segments.causal() / .window(): causal and sliding-window attention aligned bottom-right per sequence, as
    flash_attn_varlen_func computes it, where Causal() & Segments aligns the packed rows as a whole: sequences
    with fewer queries than keys (a KV cache per sequence), more queries than keys (first rows see nothing), an
    empty sequence."""
    from zoo.attention import attend

    g = torch.Generator().manual_seed(6)
    cu_q, cu_k = [0, 4, 4, 15, 40, 47], [0, 11, 16, 16, 66, 70]
    q = torch.randn(1, 2, 47, 16, generator=g)
    k, v = torch.randn(2, 1, 2, 70, 16, generator=g)
    segments = Segments.from_cu_seqlens(cu_q, cu_k)
    mask = segments.causal() if (left, right) == (None, 0) else segments.window(left, right)
    out = attend(q, k, v, mask=mask, backend=backend)
    torch.testing.assert_close(out.double(), _varlen_reference(q, k, v, cu_q, cu_k, left, right), atol=2e-6, rtol=1e-5)
    if (left, right) == (None, 0):  # the packed-rows alignment differs here (Lq != Lk per sequence)
        other = attend(q, k, v, mask=Causal() & segments, backend=backend)
        assert (other - out).abs().max() > 0.1


def test_segment_window_block_map_and_positions():
    """The block map is never wrong (EMPTY only where the dense mask is empty, FULL only where it is full) and
    skips whole-segment tiles that the window rules out; positions are ranks inside each segment (unsorted ids,
    padding, batch-1 key ids broadcast over a batch of query ids)."""
    ids_q = torch.tensor([[0, 0, 1, 1, 1, 0, -1], [2, 2, 2, 2, -1, -1, -1]])
    ids_k = torch.tensor([[1, 0, 2, 0, 1, 2, 2, 1]])
    mask = Segments(ids_q, ids_k).causal()
    q_pos, k_pos = mask.positions()
    assert k_pos.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2]] * 2
    # row 0: id 0 has 3 queries, 2 keys (shift -1); id 1 has 3 queries, 3 keys (shift 0)
    assert q_pos[0, :6].tolist() == [-1, 0, 0, 1, 2, 1]
    assert q_pos[1, :4].tolist() == [-1, 0, 1, 2]  # id 2: 4 queries, 3 keys
    dense = mask.dense(7, 8)
    assert dense.shape == (2, 1, 7, 8)
    assert dense[0, 0, 0].tolist() == [False] * 8  # rank -1: sees nothing, as FlashAttention's first rows
    assert dense[0, 0, 4].tolist() == [True, False, False, False, True, False, False, True]
    cu = [0, 40, 100, 130]
    big = Segments.from_cu_seqlens(cu).window(7, 0)
    for bq, bk in [(8, 8), (16, 32), (5, 7)]:
        states, want = big.block_map(130, 130, bq, bk).states, _states_from_dense(big.dense(130, 130), bq, bk)
        assert bool(((states == EMPTY) <= (want == EMPTY)).all()) and bool(((states == FULL) <= (want == FULL)).all())
    assert int((big.block_map(130, 130, 8, 8).states == EMPTY).sum()) > int(
        (Segments.from_cu_seqlens(cu).block_map(130, 130, 8, 8).states == EMPTY).sum())
    with pytest.raises(TypeError, match="SegmentWindow: segments must be a Segments mask, got Causal"):
        SegmentWindow(Causal())
    with pytest.raises(ValueError, match=r"SegmentWindow\(left=-2, right=1\) allows no key at all"):
        Segments(ids_q).window(-2, 1)
    with pytest.raises(ValueError, match="Segments ids have lengths"):
        mask.dense(6, 8)


@pytest.mark.parametrize("backend", ["torch", "sdpa", "blocksparse"])
def test_from_lengths_is_a_key_padding_mask(backend):
    """A right-padded batch given by its lengths: the valid query rows equal SDPA with the usual key-padding
    mask (as nn.MultiheadAttention's key_padding_mask builds it); the padded query rows are zero."""
    from zoo.attention import attend

    g = torch.Generator().manual_seed(4)
    lengths, kv_lengths = [7, 3, 10], torch.tensor([12, 1, 6])
    q = torch.randn(3, 2, 10, 8, generator=g)
    k, v = torch.randn(2, 3, 2, 12, 8, generator=g)
    mask = Segments.from_lengths(lengths, kv_lengths=kv_lengths, kv_max_len=12)
    out = attend(q, k, v, mask=mask, backend=backend)
    keep_BK = torch.arange(12)[None] < kv_lengths[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep_BK[:, None, None, :])
    valid_BQ = torch.arange(10)[None] < torch.tensor(lengths)[:, None]
    torch.testing.assert_close(out[valid_BQ[:, None, :].expand(-1, 2, -1)],
                               want[valid_BQ[:, None, :].expand(-1, 2, -1)], atol=2e-6, rtol=1e-5)
    assert not out[~valid_BQ[:, None, :].expand(-1, 2, -1)].any()
    # self attention: the keys are the queries, padded alike; max_len pads beyond the longest
    x = torch.randn(3, 2, 2, 9, 8, generator=g)
    mask = Segments.from_lengths(torch.tensor([4, 9]), max_len=9)
    keep = torch.arange(9)[None] < torch.tensor([4, 9])[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(*x, attn_mask=keep[:, None, None, :])
    out = attend(*x, mask=mask, backend=backend)
    torch.testing.assert_close(out[0, :, :4], want[0, :, :4], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out[1], want[1], atol=2e-6, rtol=1e-5)


def test_length_constructors_ids_and_errors():
    import numpy as np

    assert Segments.from_cu_seqlens([0, 2, 2, 5]).q_ids.tolist() == [[0, 0, 2, 2, 2]]
    assert Segments.from_lengths([2, 0, 3]).q_ids.tolist() == [[0, 0, -1], [-1, -1, -1], [0, 0, 0]]
    assert Segments.from_lengths((np.int64(1),), max_len=2, kv_max_len=3).kv_ids.tolist() == [[0, -1, -1]]
    assert Segments.from_lengths(np.array([2, 1])).q_ids.tolist() == [[0, 0], [0, -1]]
    assert Segments.from_lengths(np.array([2, 1]), max_len=np.int64(3)).q_ids.shape == (2, 3)
    assert Segments.from_lengths(torch.tensor([2]), max_len=torch.tensor(4)).q_ids.tolist() == [[0, 0, -1, -1]]
    assert Segments.from_cu_seqlens(np.array([0, 1, 3], dtype=np.int32)).q_ids.tolist() == [[0, 1, 1]]
    for bad, message in [([1, 2, 3], "must start at 0"), ([0, 3, 2], "never decrease"), ([0, 0], "packed length"),
                         ([0], "packed length"), ([], "non-empty 1-D"), (torch.zeros(2, 2, dtype=torch.long), "1-D"),
                         ([0, 1.5], "list of ints"), (torch.tensor([0.0, 2.0]), "must hold integers"), ("0,3", "list of ints"),
                         (np.array([0.0, 2.0]), "must hold integers")]:
        with pytest.raises((TypeError, ValueError), match=message):
            Segments.from_cu_seqlens(bad)
    with pytest.raises(ValueError, match="cu_seqlens has 2 sequences but kv_cu_seqlens has 1"):
        Segments.from_cu_seqlens([0, 1, 3], [0, 4])
    with pytest.raises(ValueError, match=r"lengths must be >= 0, got \[2, -1\]"):
        Segments.from_lengths([2, -1])
    with pytest.raises(ValueError, match="lengths holds 5, longer than max_len=4"):
        Segments.from_lengths([5, 1], max_len=4)
    with pytest.raises(ValueError, match=r"every lengths is 0; give max_len \(max_len=0 for sequences of no token\)"):
        Segments.from_lengths([0, 0])
    with pytest.raises(ValueError, match=r"lengths is empty \(a batch of 0\); give max_len"):
        Segments.from_lengths([])
    with pytest.raises(ValueError, match="max_len must be an int >= 0, got 2.0"):
        Segments.from_lengths([1], max_len=2.0)
    with pytest.raises(ValueError, match="max_len must be an int >= 0, got -1"):
        Segments.from_lengths([], max_len=-1)
    with pytest.raises(ValueError, match="kv_max_len must be an int >= 0"):
        Segments.from_lengths([1], kv_max_len=True)
    with pytest.raises(ValueError, match="2 lengths but 1 kv_lengths"):
        Segments.from_lengths([1, 2], kv_lengths=[3])
    with pytest.raises(TypeError, match="kv_lengths must be a list of ints"):
        Segments.from_lengths([1, 2], kv_lengths=3)


def _check_against_sdpa(q, k, v, mask, keep, backend):
    """attend() with ``mask`` gives SDPA's result with the boolean mask ``keep``: shape and values."""
    from zoo.attention import attend

    out = attend(q, k, v, mask=mask, backend=backend)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    assert out.shape == want.shape
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("backend", [None, "torch", "sdpa", "blocksparse"])
def test_from_lengths_describes_empty_batches_and_sequences(backend):
    """attend() takes a batch of 0 and Nq = Nk = 0, and nn.MultiheadAttention a (0, T) or (B, 0) key padding mask;
    Segments.from_lengths refused the same shapes ("lengths must be a non-empty 1-D sequence", "max_len must be
    a positive int"). Its masks now give SDPA's results with the equivalent boolean masks (an empty output; zeros
    for no keys)."""
    g = torch.Generator().manual_seed(8)
    # a batch of 0: ids (0, T), the padded length from max_len (kv_max_len for a context padded otherwise)
    q, k, v = torch.randn(3, 0, 2, 5, 8, generator=g)
    mask = Segments.from_lengths(torch.zeros(0, dtype=torch.long), max_len=5)
    assert mask.q_ids.shape == (0, 5)
    _check_against_sdpa(q, k, v, mask, torch.zeros(0, 1, 1, 5, dtype=torch.bool), backend)
    mask = Segments.from_lengths([], max_len=5, kv_lengths=[], kv_max_len=3)
    _check_against_sdpa(q, k[:, :, :3], v[:, :, :3], mask, torch.zeros(0, 1, 1, 3, dtype=torch.bool), backend)
    # sequences of no token (max_len=0), and queries over a context of no token (zeros, as SDPA)
    q, k, v = torch.randn(3, 2, 2, 0, 8, generator=g)
    mask = Segments.from_lengths([0, 0], max_len=0)
    assert mask.q_ids.shape == (2, 0)
    _check_against_sdpa(q, k, v, mask, torch.zeros(2, 1, 1, 0, dtype=torch.bool), backend)
    q = torch.randn(2, 2, 4, 8, generator=g)
    _check_against_sdpa(q, k, v, Segments.from_lengths([3, 4], kv_lengths=[0, 0], kv_max_len=0),
                        torch.zeros(2, 1, 1, 0, dtype=torch.bool), backend)


@pytest.mark.parametrize("backend", [None, "torch", "sdpa", "blocksparse"])
def test_block_sparse_maps_of_no_token(backend):
    """BlockSparse wanted one tile row or column for Nq = 0 or Nk = 0, refusing the ceil(0 / block) = 0 tiles of
    a map built from the lengths. Both are accepted now, with SDPA's results (an empty output; zeros for no
    keys); any other tile count is still refused, naming the count needed."""
    from zoo.attention import attend

    g = torch.Generator().manual_seed(9)
    q = torch.randn(1, 2, 6, 8, generator=g)
    for tiles in ((2, 0), (2, 1)):  # Nq = 6, Nk = 0
        k, v = torch.randn(2, 1, 2, 0, 8, generator=g)
        _check_against_sdpa(q, k, v, BlockSparse(torch.ones(tiles, dtype=torch.bool), 4),
                            torch.zeros(6, 0, dtype=torch.bool), backend)
    for tiles, k_len in (((0, 2), 8), ((1, 2), 8), ((0, 0), 0), ((1, 0), 0)):  # Nq = 0
        k, v = torch.randn(2, 1, 2, k_len, 8, generator=g)
        _check_against_sdpa(q[:, :, :0], k, v, BlockSparse(torch.ones(tiles, dtype=torch.bool), 4),
                            torch.zeros(0, k_len, dtype=torch.bool), backend)
    with pytest.raises(ValueError, match=r"BlockSparse map has \(1, 1\) tiles but Nq=6, Nk=0 with blocks \(4, 4\) "
                                         r"need \(2, 0\)"):
        attend(q, k, v, mask=BlockSparse(torch.ones(1, 1, dtype=torch.bool), 4), backend=backend)


@pytest.mark.parametrize("backend", ["torch", "sdpa", "blocksparse"])
def test_dense_key_padding_mask_broadcasts_over_queries(backend):
    """A (B, 1, 1, Nk) bool mask serves every query, as SDPA's attn_mask broadcasting does (it was refused as
    not (..., Nq, Nk)); its dense rows are a stride-0 view, and its block map equals the expanded mask's."""
    from zoo.attention import attend

    g = torch.Generator().manual_seed(6)
    q, k, v = torch.randn(3, 2, 2, 70, 16, generator=g)
    keep = torch.arange(70)[None, None, None] < torch.tensor([70, 41])[:, None, None, None]
    out = attend(q, k, v, mask=Dense(keep), backend=backend)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep),
                               atol=2e-6, rtol=1e-5)
    rows = Dense(keep).dense(70, 70, rows=(10, 30))
    assert rows.shape == (2, 1, 20, 70) and rows.stride(2) == 0
    expanded = Dense(keep.expand(2, 1, 70, 70).contiguous())
    assert torch.equal(Dense(keep).block_map(70, 70, 16).states, expanded.block_map(70, 70, 16).states)
    with pytest.raises(ValueError, match=r"or \(\.\.\., 1, 70\), the same keys for every query"):
        attend(q, k, v, mask=Dense(keep[..., :60]))
    with pytest.raises(ValueError, match=r"a key dim of 1 does not broadcast here: expand it, mask.expand\(\.\.\., 70\)"):
        attend(q, k, v, mask=Dense(torch.ones(2, 1, 70, 1, dtype=torch.bool)))


def test_a_mask_tensor_replaced_by_one_at_the_freed_address_is_seen():
    """Mask.version() recorded id(tensor) and its version counter, keeping nothing alive: a tensor replaced twice
    between two calls (a request whose attention was skipped) let the newest one be allocated at the recorded
    tensor's freed address with version 0, and the block maps and plans of the first pattern were served (max
    error 2.03). The record now matches only the same live tensor."""
    from zoo.attention import attend

    q, k, v = torch.randn(3, 1, 2, 256, 16, generator=torch.Generator().manual_seed(9))
    i = torch.arange(256)
    narrow, wide = ((i[:, None] - i[None, :]).abs() <= 4)[None, None], torch.ones(1, 1, 256, 256, dtype=torch.bool)
    want = attend(q, k, v, Dense(wide), backend="torch")
    reused = 0
    for _ in range(5):
        mask = Dense(narrow.clone())
        recorded = id(mask.mask)
        attend(q, k, v, mask, backend="blocksparse")  # block map and plan of the narrow band
        mask.block_map(256, 256, 64)
        del mask.mask  # the recorded tensor is freed ...
        mask.mask = wide.clone()  # ... and its successor (version 0) usually takes its address
        reused += id(mask.mask) == recorded
        assert torch.equal(mask.block_map(256, 256, 64).states, Dense(wide).block_map(256, 256, 64).states)
        torch.testing.assert_close(attend(q, k, v, mask, backend="blocksparse"), want, atol=2e-6, rtol=1e-5)
    assert reused, "no replacement landed at the freed address: this interpreter does not exercise the case"


class _Attending(torch.nn.Module):
    """attend() under a mask object the module holds (a packed batch's SegmentWindow, a fixed block map)."""

    def __init__(self, mask) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, q):
        from zoo.attention import attend

        return attend(q, q, q, mask=self.mask)


def exported_then_eager(make_mask, q):
    """(the exported program's output, the exported module's eager output after the export, a never-exported twin's
    output): the mask caches filled while torch.export traced held FakeTensors, which the eager calls read."""
    layer, twin = _Attending(make_mask()), _Attending(make_mask())
    program = torch.export.export(layer, (q,))
    return program.module()(q), layer(q), twin(q)


def test_mask_caches_filled_under_export_do_not_reach_eager_calls():
    """SegmentWindow.positions() and Mask.block_map() computed under torch.export are not cached (as RoPE's and
    ALiBi's tables are not): the positions cached there made the eager calls after an export 0.62 off, and the block
    maps held FakeTensors."""
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    q = torch.randn(2, 2, 10, 8, generator=torch.Generator().manual_seed(0))
    for make_mask in (lambda: Segments(ids).causal(), lambda: Segments(ids).window(1, 0)):
        exported, eager_after, twin = exported_then_eager(make_mask, q)
        assert torch.equal(exported, twin)
        assert torch.equal(eager_after, twin)

    class States(torch.nn.Module):  # a block map built inside the traced code
        def __init__(self) -> None:
            super().__init__()
            self.mask = Window(2, 0)

        def forward(self, x):
            return x + self.mask.block_map(12, 12, 4).states

    layer = States()
    torch.export.export(layer, (torch.zeros(1, 1, 3, 3, dtype=torch.int8),))
    states = layer.mask.block_map(12, 12, 4).states
    assert type(states) is torch.Tensor and torch.equal(states, Window(2, 0).block_map(12, 12, 4).states)


@pytest.mark.parametrize("mask", [Causal(), Window(2, 1), ChunkWindow(3, 1, 0)], ids=repr)
def test_materialised_band_masks_export_to_onnx_with_torchscript(mask):
    """The TorchScript ONNX exporter (torch.onnx.export(dynamo=False)) has no aten::__iand_: the in-place ``&=`` of
    the band masks failed the export of every materialised Window, ChunkWindow and Causal mask. onnxruntime runs the
    exported graph at the traced length as attend() does eagerly (the reference backend, as zoo.export picks it)."""
    import io

    ort = pytest.importorskip("onnxruntime")
    from zoo.attention import attend, use_backend

    class Layer(torch.nn.Module):
        def forward(self, q):
            return attend(q, q, q, mask=mask)

    q = torch.randn(2, 2, 11, 8, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    with use_backend("torch"):
        torch.onnx.export(Layer(), (q,), buffer, dynamo=False, input_names=["q"], output_names=["out"])
        want = Layer()(q)
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"q": q.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-6, rtol=1e-5)


# ---- per-utterance chunked streaming over packed sequences (Segments.chunk / SegmentChunkWindow) ----------------

def _each_sequence_alone(q, k, v, cu_q, cu_k, make_mask):
    """float64 reference: each packed sequence run alone, its (Lq, Lk) bool mask from ``make_mask(Lq, Lk)`` (the
    sequence's own indices, starting at 0); a query that sees no key gets a zero row, as attend() defines."""
    out = torch.zeros(q.shape[:-1] + v.shape[-1:], dtype=torch.float64)
    for (q0, q1), (k0, k1) in zip(zip(cu_q[:-1], cu_q[1:]), zip(cu_k[:-1], cu_k[1:])):
        if q1 == q0 or k1 == k0:
            continue
        allowed = make_mask(q1 - q0, k1 - k0)
        scores = q[..., q0:q1, :].double() @ k[..., k0:k1, :].double().transpose(-1, -2) / math.sqrt(q.shape[-1])
        probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), -1).nan_to_num(0.0)
        out[..., q0:q1, :] = probs @ v[..., k0:k1, :].double()
    return out


@pytest.mark.parametrize("backend", ["torch", "sdpa", "blocksparse"])
@pytest.mark.parametrize("chunk,left,right", [(4, 1, 0), (3, None, 0), (5, 0, 1), (4, 2, None)])
def test_segment_chunk_window_is_each_utterance_alone(backend, chunk, left, right):
    """segments.chunk(c, left, right) over packed utterances (self attention, and cross attention with other key
    lengths per sequence, bottom-right aligned per sequence) equals each utterance run alone under
    ChunkWindow(c, left, right), in float64 on every CPU backend; ChunkWindow & segments counts chunks from the
    packed row instead and differs (utterances that do not start on a multiple of c)."""
    from zoo.attention import attend

    g = torch.Generator().manual_seed(11)
    cu = [0, 5, 12, 12, 31, 50]
    x = torch.randn(3, 1, 2, 50, 8, generator=g, dtype=torch.float64)
    segments = Segments.from_cu_seqlens(cu)
    alone = lambda lq, lk: ChunkWindow(chunk, left, right).dense(lq, lk)[0, 0]  # noqa: E731
    want = _each_sequence_alone(*x, cu, cu, alone)
    out = attend(*x, mask=segments.chunk(chunk, left=left, right=right), backend=backend)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)
    packed_rows = attend(*x, mask=ChunkWindow(chunk, left, right) & segments, backend=backend)
    assert (packed_rows - want).abs().max() > 1e-3
    # cross attention: Lq != Lk per sequence (a cache per utterance), an empty query sequence
    cu_q, cu_k = [0, 3, 3, 17, 20], [0, 9, 13, 26, 41]
    q = torch.randn(1, 2, 20, 8, generator=g, dtype=torch.float64)
    k, v = torch.randn(2, 1, 2, 41, 8, generator=g, dtype=torch.float64)
    out = attend(q, k, v, mask=Segments.from_cu_seqlens(cu_q, cu_k).chunk(chunk, left, right), backend=backend)
    torch.testing.assert_close(out, _each_sequence_alone(q, k, v, cu_q, cu_k, alone), atol=1e-12, rtol=1e-10)


def test_segment_chunk_window_in_a_module_is_each_utterance_alone():
    """The audit's case: MultiHeadAttention(rel_pos="xl") over two packed utterances of 5 and 7 frames under
    segments.chunk(4, left=1) gives each utterance's output alone under ChunkWindow(4, left=1) (the packed
    ChunkWindow(4, left=1) & segments was 0.35 off on the second utterance's first rows)."""
    from zoo.attention import MultiHeadAttention

    torch.manual_seed(0)
    layer = MultiHeadAttention(32, 4, rel_pos="xl").double().eval()
    x = torch.randn(1, 12, 32, dtype=torch.float64)
    packed = layer(x, mask=Segments.from_cu_seqlens([0, 5, 12]).chunk(4, left=1))
    alone = torch.cat([layer(x[:, :5], mask=ChunkWindow(4, left=1)), layer(x[:, 5:], mask=ChunkWindow(4, left=1))], 1)
    torch.testing.assert_close(packed, alone, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("chunk,left", [(4, -1), (4, 0), (4, 2), (7, 1), (8, 3), (1, 2)])
def test_segment_chunk_window_is_wenets_mask_per_utterance(chunk, left):
    """The dense mask over packed utterances is block diagonal, each block WeNet's subsequent_chunk_mask of that
    utterance (re-derived above), nothing across utterances."""
    lengths = [5, 13, 1, 9]
    cu = [0] + torch.tensor(lengths).cumsum(0).tolist()
    dense = Segments.from_cu_seqlens(cu).chunk(chunk, left=None if left < 0 else left).dense(cu[-1], cu[-1])[0, 0]
    want = torch.block_diag(*[_wenet_subsequent_chunk_mask(n, chunk, left) for n in lengths])
    assert torch.equal(dense, want)


@pytest.mark.parametrize("tiles", [(4, 4), (5, 7), (16, 3), (1, 1), (64, 64)])
def test_segment_chunk_window_block_map_agrees_with_dense(tiles):
    """The block map is never wrong against dense() (EMPTY only where the dense tile is empty, FULL only where it
    is full) on odd lengths and tile sizes, packed, cross-packed, padded and unsorted ids; exact where the ids say
    nothing (one sequence: ChunkWindow's map); it skips tiles Segments alone keeps; no Nq x Nk is built."""
    cu, cu_k = [0, 5, 12, 12, 31, 53], [0, 9, 9, 20, 44, 61]
    ids = torch.tensor([[0, 0, 1, 1, 1, 0, -1, 2, 2], [2, 2, 2, 2, -1, -1, -1, 0, 0]])
    cases = [(Segments.from_cu_seqlens(cu), 53, 53), (Segments.from_cu_seqlens(cu, cu_k), 53, 61),
             (Segments(ids), 9, 9), (Segments.from_lengths([7, 3]), 7, 7)]
    for segments, nq, nk in cases:
        for chunk, left, right in [(4, 1, 0), (3, None, 0), (5, 0, 2), (2, -1, 2)]:
            mask = segments.chunk(chunk, left, right)
            got = mask.block_map(nq, nk, *tiles).states
            want = exact_states(mask, nq, nk, *tiles)
            assert got.shape == want.shape
            wrong = ((got == EMPTY) & (want != EMPTY)) | ((got == FULL) & (want != FULL))
            assert not wrong.any(), (mask, tiles)
    one = Segments.from_cu_seqlens([0, 37]).chunk(5, 1, 0)
    assert torch.equal(one.block_map(37, 37, *tiles).states, ChunkWindow(5, 1, 0).block_map(37, 37, *tiles).states)
    packed = Segments.from_cu_seqlens([0, 100, 300]).chunk(16, left=1)
    assert int((packed.block_map(300, 300, 8).states == EMPTY).sum()) > int(
        (Segments.from_cu_seqlens([0, 100, 300]).block_map(300, 300, 8).states == EMPTY).sum())


def test_segment_chunk_window_block_map_never_builds_the_dense_matrix(monkeypatch):
    n = 1 << 16
    mask = Segments(torch.arange(n) // 1000).chunk(100, left=2)
    monkeypatch.setattr(SegmentChunkWindow, "_dense_rows", lambda *a, **k: pytest.fail("dense form was built"))
    monkeypatch.setattr(Segments, "_dense_rows", lambda *a, **k: pytest.fail("dense form was built"))
    assert mask.block_map(n, n, 128, 128).states.shape == (1, 1, 512, 512)


def test_segment_chunk_window_errors_and_settings():
    segments = Segments.from_cu_seqlens([0, 5, 12])
    mask = segments.chunk(4, left=1)
    assert isinstance(mask, SegmentChunkWindow) and (mask.chunk_size, mask.left, mask.right) == (4, 1, 0)
    assert repr(mask).startswith("SegmentChunkWindow(Segments(") and "chunk_size=4, left=1, right=0" in repr(mask)
    with pytest.raises(ValueError, match="SegmentChunkWindow chunk_size"):
        segments.chunk(0)
    with pytest.raises(ValueError, match=r"SegmentChunkWindow\(left=-2, right=1\) allows no chunk at all"):
        segments.chunk(4, -2, 1)
    with pytest.raises(TypeError, match="SegmentChunkWindow: segments must be a Segments mask, got Causal"):
        SegmentChunkWindow(Causal(), 4)
    with pytest.raises(ValueError, match="Segments ids have lengths"):
        mask.dense(11, 12)
    # a reassigned setting reaches the cached block map
    long = Segments.from_cu_seqlens([0, 10, 40])
    mask = long.chunk(4, left=1)
    before = mask.block_map(40, 40, 4).states.clone()
    mask.left = None
    assert not torch.equal(mask.block_map(40, 40, 4).states, before)
    assert torch.equal(mask.block_map(40, 40, 4).states, long.chunk(4).block_map(40, 40, 4).states)


# ---- key padding for any number of queries (KeyPadding) --------------------------------------------------------

@pytest.mark.parametrize("backend", [None, "torch", "sdpa", "blocksparse"])
@pytest.mark.parametrize("n_q", [1, 3, 10, 23])
def test_key_padding_is_sdpas_key_padding_mask(backend, n_q):
    """KeyPadding(lengths) hides the keys at positions >= lengths[b] from every query, whatever Nq (1: attention
    pooling; != Nk: cross attention, a query block): SDPA's result with the (B, 1, 1, Nk) boolean mask, in float64,
    on every CPU backend; a row whose keys are all padding (length 0) is zero, as attend() defines."""
    from zoo.attention import attend

    g = torch.Generator().manual_seed(12)
    lengths = torch.tensor([10, 6, 0, 1])
    q = torch.randn(4, 2, n_q, 8, generator=g, dtype=torch.float64)
    k, v = torch.randn(2, 4, 2, 10, 8, generator=g, dtype=torch.float64)
    out = attend(q, k, v, mask=KeyPadding(lengths), backend=backend)
    keep = (torch.arange(10)[None] < lengths[:, None])[:, None, None, :]
    valid = lengths > 0
    want = torch.nn.functional.scaled_dot_product_attention(q[valid], k[valid], v[valid], attn_mask=keep[valid])
    torch.testing.assert_close(out[valid], want, atol=1e-12, rtol=1e-10)
    assert not out[~valid].any()
    # max_len pads beyond the longest length (every row padded)
    k2, v2 = torch.randn(2, 4, 2, 13, 8, generator=g, dtype=torch.float64)
    keep = (torch.arange(13)[None] < lengths[:, None])[:, None, None, :]
    out = attend(q[valid], k2[valid], v2[valid], mask=KeyPadding(lengths[valid], max_len=13), backend=backend)
    want = torch.nn.functional.scaled_dot_product_attention(q[valid], k2[valid], v2[valid], attn_mask=keep[valid])
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)


def test_key_padding_is_nn_multihead_attentions_key_padding_mask():
    """nn.MultiheadAttention's own computation (its projections, key_padding_mask True = padding) equals attend()
    with KeyPadding on the same projected q, k, v, for one query and for Nq != Nk."""
    from zoo.attention import attend

    torch.manual_seed(13)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True, dtype=torch.float64).eval()
    lengths = [9, 4, 1]
    pad_BN = torch.arange(9)[None] >= torch.tensor(lengths)[:, None]
    for n_q in (1, 5):
        query = torch.randn(3, n_q, 16, dtype=torch.float64)
        memory = torch.randn(3, 9, 16, dtype=torch.float64)
        want, _ = mha(query, memory, memory, key_padding_mask=pad_BN, need_weights=False)
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
        heads = lambda t: t.unflatten(-1, (2, 8)).transpose(1, 2)  # noqa: E731  (B, N, C) -> (B, H, N, D)
        q = heads(torch.nn.functional.linear(query, w_q, b_q))
        k = heads(torch.nn.functional.linear(memory, w_k, b_k))
        v = heads(torch.nn.functional.linear(memory, w_v, b_v))
        out = attend(q, k, v, mask=KeyPadding(lengths)).transpose(1, 2).flatten(2)
        torch.testing.assert_close(mha.out_proj(out), want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", ["torch", "sdpa", "blocksparse"])
def test_key_padding_in_attention_pooling_and_cross_attention(backend):
    """AttentionPoolLatent (one latent query over N tokens) and MultiHeadAttention's cross attention to a padded
    context take KeyPadding(lengths): each row equals that row run on its unpadded tokens. Segments.from_lengths,
    which pads the queries too, is refused there with a message that names KeyPadding."""
    from zoo.attention import AttentionPoolLatent, MultiHeadAttention, use_backend

    torch.manual_seed(14)
    lengths = [10, 6]
    pool = AttentionPoolLatent(32, 4).double().eval()
    layer = MultiHeadAttention(32, 4, kv_dim=32).double().eval()
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    queries = torch.randn(2, 3, 32, dtype=torch.float64)
    with use_backend(backend):
        pooled = pool(x, mask=KeyPadding(lengths))
        crossed = layer(queries, context=x, mask=KeyPadding(lengths))
        for b, n in enumerate(lengths):
            torch.testing.assert_close(pooled[b], pool(x[b : b + 1, :n])[0], atol=1e-12, rtol=1e-10)
            torch.testing.assert_close(crossed[b], layer(queries[b : b + 1], context=x[b : b + 1, :n])[0],
                                       atol=1e-12, rtol=1e-10)
        with pytest.raises(ValueError, match=r"Nq=1, Nk=10; to hide padded keys .* use KeyPadding\(lengths, "
                                             r"max_len=10\)"):
            pool(x, mask=Segments.from_lengths(lengths))


@pytest.mark.parametrize("tiles", [(4, 4), (5, 7), (16, 3), (1, 1), (64, 64)])
@pytest.mark.parametrize("n_q,n_k", [(1, 10), (7, 23), (33, 20)])
def test_key_padding_block_map_equals_dense(tiles, n_q, n_k):
    """The block map equals the one reduced from dense() exactly (key tiles EMPTY past a row's length, FULL
    before it, PARTIAL across it) on odd lengths and tile sizes, without building Nq x Nk."""
    mask = KeyPadding([n_k, 0, n_k // 2, 3], max_len=n_k)
    got = mask.block_map(n_q, n_k, *tiles).states
    want = exact_states(mask, n_q, n_k, *tiles)
    assert got.shape == want.shape == (4, 1) + want.shape[-2:]
    assert torch.equal(got, want)
    rows = mask.dense(n_q, n_k)
    assert rows.shape == (4, 1, n_q, n_k) and (n_q == 1 or rows.stride(2) == 0)


def test_key_padding_block_map_never_builds_the_dense_matrix(monkeypatch):
    n = 1 << 16
    mask = KeyPadding([n, 1000, 0])
    monkeypatch.setattr(KeyPadding, "_dense_rows", lambda *a, **k: pytest.fail("dense form was built"))
    states = mask.block_map(n, n, 128, 128).states
    assert states.shape == (3, 1, 512, 512) and int((states[1] == PARTIAL).sum()) == 512


def test_key_padding_errors():
    from zoo.attention import attend

    q = torch.randn(2, 1, 3, 4)
    k = torch.randn(2, 1, 8, 4)
    with pytest.raises(ValueError, match=r"KeyPadding was built for 6 keys \(max_len\) but attention has Nk=8: "
                                         r"give KeyPadding\(lengths, max_len=8\)"):
        attend(q, k, k, mask=KeyPadding([6, 2]))
    with pytest.raises(ValueError, match="KeyPadding has 3 lengths but attention has batch 2"):
        attend(q, k, k, mask=KeyPadding([6, 2, 8]))
    with pytest.raises(ValueError, match="KeyPadding: lengths must be >= 0"):
        KeyPadding([3, -1])
    with pytest.raises(ValueError, match="KeyPadding: lengths holds 9, longer than max_len=8"):
        KeyPadding([9, 1], max_len=8)
    with pytest.raises(TypeError, match="KeyPadding: lengths must hold integers"):
        KeyPadding(torch.tensor([1.0, 2.0]))
    assert repr(KeyPadding([6, 2])) == "KeyPadding(batch=2, max_len=6)"


@pytest.mark.parametrize("backend", [None, "torch", "sdpa", "blocksparse"])
def test_key_padding_describes_empty_batches_and_sequences(backend):
    """As nn.MultiheadAttention's (0, T) and (B, 0) key_padding_mask: a batch of 0 (max_len given) and keys of no
    token give SDPA's results with the same boolean mask (an empty output; zeros for no keys)."""
    g = torch.Generator().manual_seed(15)
    q, k, v = torch.randn(3, 0, 2, 5, 8, generator=g)
    _check_against_sdpa(q[:, :, :1], k, v, KeyPadding([], max_len=5), torch.zeros(0, 1, 1, 5, dtype=torch.bool),
                        backend)
    q = torch.randn(2, 2, 3, 8, generator=g)
    k, v = torch.randn(2, 2, 2, 0, 8, generator=g)
    _check_against_sdpa(q, k, v, KeyPadding([0, 0], max_len=0), torch.zeros(2, 1, 1, 0, dtype=torch.bool), backend)


# ---- second mutation audit of the newest masks: hand-built references for the per-segment bands and the kernel's
# lowering of chunk windows, per-segment bands and tile lists (kernels/block_index.py) -------------------------------

def _per_segment_band_loop(q_ids, kv_ids, left, right, chunk=None):
    """bool (Nq, Nk) of a SegmentWindow (``chunk`` None) or SegmentChunkWindow over one row of ids, from the
    definitions, pair by pair: query i of segment s (s >= 0) has rank r among the queries of s; with Lq queries and
    Lk keys in s it sits at p = r + Lk - Lq (flash_attn_varlen_func's bottom-right alignment per sequence) and sees
    the keys of s with rank k in p - left .. p + right, or in chunks floor(p / c) - left .. floor(p / c) + right
    (None: unbounded)."""
    q_ids, kv_ids = [int(x) for x in q_ids], [int(x) for x in kv_ids]
    out = torch.zeros(len(q_ids), len(kv_ids), dtype=torch.bool)
    for i, s in enumerate(q_ids):
        if s < 0:
            continue
        p = q_ids[:i].count(s) + kv_ids.count(s) - q_ids.count(s)
        for j, t in enumerate(kv_ids):
            if t != s:
                continue
            a, b = p, kv_ids[:j].count(s)
            if chunk is not None:
                a, b = a // chunk, b // chunk  # Python's // floors: negative positions are in negative chunks
            out[i, j] = (left is None or b >= a - left) and (right is None or b <= a + right)
    return out


@pytest.mark.parametrize("make", ["causal", "window", "chunk"])
def test_per_segment_bands_with_query_ids_of_batch_one_and_key_ids_per_row(make):
    """Segments(q_ids (1, Nq), kv_ids (B, Nk)): one packing of the queries shared by every batch row, keys packed
    per row (cross attention to per-row contexts). The per-segment masks broadcast the query ids over the key ids'
    batch, as Segments does: dense() equals the pair-by-pair definition in each row (it raised when the positions
    were computed for the query ids' batch), the block map is never wrong, and attend() equals a float64
    reference with that mask on every CPU backend."""
    from zoo.attention import attend

    q_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, -1]])
    kv_ids = torch.tensor([[0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, -1], [0, 0, 0, 0, 0, 1, 2, 2, -1, -1, -1, -1]])
    segments = Segments(q_ids, kv_ids)
    mask, (left, right, chunk) = {"causal": (segments.causal(), (None, 0, None)),
                                  "window": (segments.window(1, 1), (1, 1, None)),
                                  "chunk": (segments.chunk(2, left=1), (1, 0, 2))}[make]
    want = torch.stack([_per_segment_band_loop(q_ids[0], row, left, right, chunk) for row in kv_ids])[:, None]
    dense = mask.dense(10, 12)
    assert dense.shape == (2, 1, 10, 12) and torch.equal(dense, want)
    for tiles in [(2, 3), (4, 4), (3, 5)]:
        got, exact = mask.block_map(10, 12, *tiles).states, _states_from_dense(want, *tiles)
        assert not (((got == EMPTY) & (exact != EMPTY)) | ((got == FULL) & (exact != FULL))).any(), tiles
    g = torch.Generator().manual_seed(21)
    q = torch.randn(2, 2, 10, 8, generator=g, dtype=torch.float64)
    k, v = torch.randn(2, 2, 2, 12, 8, generator=g, dtype=torch.float64)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~want, -math.inf)
    ref = torch.softmax(scores, -1).nan_to_num(0.0) @ v
    for backend in ("torch", "sdpa", "blocksparse"):
        torch.testing.assert_close(attend(q, k, v, mask=mask, backend=backend), ref, atol=1e-12, rtol=1e-10)


def test_segment_window_defaults_are_flash_attentions():
    """The defaults: ``segments.window(left)`` leaves the right side unbounded (flash_attn_varlen_func's window_size
    default -1 on either side), ``segments.window()`` is Segments itself, and a SegmentWindow built directly with
    only its segments is ``segments.causal()`` (right=0), against the pair-by-pair definition."""
    ids = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    segments = Segments(ids)
    assert torch.equal(segments.window(2).dense(12, 12)[0, 0], _per_segment_band_loop(ids, ids, 2, None))
    assert torch.equal(segments.window().dense(12, 12), segments.dense(12, 12))
    assert torch.equal(SegmentWindow(segments).dense(12, 12)[0, 0], _per_segment_band_loop(ids, ids, None, 0))
    assert (SegmentWindow(segments).left, SegmentWindow(segments).right) == (None, 0)


def test_from_cu_seqlens_errors_name_the_offending_argument():
    """A bad kv_cu_seqlens is named as such (not as the queries' cu_seqlens, which were fine)."""
    with pytest.raises(ValueError, match=r"from_cu_seqlens: kv_cu_seqlens must start at 0.*got \[1, 3\]"):
        Segments.from_cu_seqlens([0, 3], [1, 3])
    with pytest.raises(ValueError, match=r"from_cu_seqlens: kv_cu_seqlens must start at 0.*got \[0, 4, 2\]"):
        Segments.from_cu_seqlens([0, 1, 3], [0, 4, 2])
    with pytest.raises(ValueError, match=r"from_cu_seqlens: cu_seqlens must start at 0.*got \[0, 4, 2\]"):
        Segments.from_cu_seqlens([0, 4, 2], [0, 1, 3])


def _chunk_window_definition(chunk, left, right, q_len, k_len):
    """bool (Nq, Nk) of ChunkWindow from its docstring, pair by pair: query i sits at p = i + Nk - Nq, in chunk
    floor(p / c) (Python's //), and sees the keys j with j // c in that chunk - left .. + right."""
    out = torch.zeros(q_len, k_len, dtype=torch.bool)
    for i in range(q_len):
        a = (i + k_len - q_len) // chunk
        for j in range(k_len):
            out[i, j] = (left is None or j // chunk >= a - left) and (right is None or j // chunk <= a + right)
    return out


def _kernel_window_predicate(prog, q_len, k_len):
    """The kernel's element-wise test of a program of window slots (kernels/flash_attention.py, _mask_term), with its
    C integer division, which truncates toward zero: ``j // c - (i + s) // c`` is a floor difference only for
    ``i + s >= 0``."""
    from zoo.kernels.block_index import SLOT_CHUNK0, SLOT_CHUNK1, SLOT_WIN0, SLOT_WIN1

    i, j = torch.arange(q_len)[:, None], torch.arange(k_len)[None, :]
    out = torch.zeros(q_len, k_len, dtype=torch.bool)
    for bits in prog.terms:
        assert bits & ~(SLOT_WIN0 | SLOT_WIN1 | SLOT_CHUNK0 | SLOT_CHUNK1) == 0, prog.description
        ok = torch.ones(q_len, k_len, dtype=torch.bool)
        for slot, chunked, (lo, hi, c, s) in ((SLOT_WIN0, SLOT_CHUNK0, prog.windows[0]),
                                              (SLOT_WIN1, SLOT_CHUNK1, prog.windows[1])):
            if bits & slot:
                if bits & chunked:
                    assert s >= 0, prog.windows  # else the truncating division is not a floor
                    rel = (torch.div(j, c, rounding_mode="trunc") - torch.div(i + s, c, rounding_mode="trunc"))
                else:
                    rel = j - i
                ok = ok & (rel >= lo) & (rel <= hi)
        out = out | ok
    return out


@pytest.mark.parametrize("q_len,k_len", [(20, 20), (16, 20), (20, 16), (23, 17), (17, 23)])
def test_lowered_chunk_windows_equal_the_definition_at_every_band_edge(q_len, k_len):
    """The kernel's form of ChunkWindow (kernels/block_index.py): every left / right bound from "allows one chunk
    difference" to "allows every difference that occurs", one side unbounded or both bounded, chunk sizes 2 to 5,
    more or fewer queries than keys (queries at negative positions, an alignment shift that is no multiple of c),
    evaluated as the kernel does (C division) against the pair-by-pair definition. A band that forbids one corner
    chunk pair was taken for one that forbids nothing (everything allowed), and a negative alignment offset made the
    kernel's division truncate where it must floor."""
    from zoo.kernels.block_index import lower_mask

    for chunk in (2, 3, 4, 5):
        reach = (q_len + k_len) // chunk + 2
        bounds = [None] + list(range(-1, reach + 1))
        for left in bounds:
            for right in bounds:
                if left is not None and right is not None and (left + right < 0 or max(left, right) > 3):
                    continue  # both bounded: the small bands are enough, the edges are covered one side at a time
                mask = ChunkWindow(chunk, left, right)
                prog = lower_mask(mask, q_len, k_len, "cpu")
                want = _chunk_window_definition(chunk, left, right, q_len, k_len)
                got = _kernel_window_predicate(prog, q_len, k_len)
                assert torch.equal(got, want), (mask, q_len, k_len, prog.description, prog.windows)


def test_two_per_segment_bands_in_one_term_intersect_in_the_lowering():
    """``segments.window(3, None) & segments.causal()`` (a per-sequence sliding window written as two masks), two
    chunk bands of one chunk size, on packed and cross-packed sequences: the kernel's program keeps one band, the
    intersection (each band alone was kept, the other dropped), exact in the kernel and equal to the pair-by-pair
    definition of both bands together."""
    from zoo.kernels.block_index import SLOT_POS0, SLOT_SEG, SLOT_WIN0, lower_mask

    cases = [(Segments.from_cu_seqlens([0, 9, 23, 30]), 30, 30),
             (Segments.from_cu_seqlens([0, 4, 15, 21], [0, 9, 20, 30]), 21, 30)]
    for segments, q_len, k_len in cases:
        q_ids, kv_ids = segments.q_ids[0], segments.kv_ids[0]
        for a, b, bands in [
            (segments.window(3, None), segments.causal(), [(3, None, None), (None, 0, None)]),
            (segments.causal(), segments.window(3, None), [(None, 0, None), (3, None, None)]),
            (segments.window(2, 5), segments.window(None, 1), [(2, 5, None), (None, 1, None)]),
            (segments.chunk(4, 2, None), segments.chunk(4, None, 0), [(2, None, 4), (None, 0, 4)]),
        ]:
            mask = a & b
            want = _per_segment_band_loop(q_ids, kv_ids, *bands[0]) & _per_segment_band_loop(q_ids, kv_ids, *bands[1])
            assert torch.equal(mask.dense(q_len, k_len)[0, 0], want), mask
            prog = lower_mask(mask, q_len, k_len, "cpu")
            assert prog.exact_in_kernel and prog.terms == (SLOT_WIN0 | SLOT_SEG | SLOT_POS0,), prog.description
            assert torch.equal(prog.evaluate(q_len, k_len)[0, 0], want), mask


@pytest.mark.parametrize("q_len,k_len,block_m,block_n", [(40, 96, 32, 64), (40, 96, 64, 32), (96, 40, 64, 32),
                                                         (96, 40, 32, 64), (50, 70, 16, 32)])
def test_kernel_tile_lists_demote_ragged_edges_with_unequal_tile_sizes(q_len, k_len, block_m, block_n):
    """The kernels' FULL loop has no bounds checks, so a FULL tile cut by the end of the queries or of the keys must
    be listed as PARTIAL, in the forward lists (rows: query tiles of block_m) and in the transposed ones (rows: key
    tiles of block_n), with tiles of unequal sizes (the raggedness of the keys is Nk modulo block_n, not block_m):
    against the tile states and the tiles' extents, tile by tile."""
    from zoo.kernels.block_index import kernel_tile_lists

    for mask in (Full(), Causal(), KeyPadding([k_len, k_len // 3], max_len=k_len)):
        states = mask.block_map(q_len, k_len, block_m, block_n).states
        fwd = kernel_tile_lists(mask, q_len, k_len, block_m, block_n, "cpu")
        bwd = kernel_tile_lists(mask, q_len, k_len, block_m, block_n, "cpu", transposed=True)
        for b in range(states.shape[0]):
            for a in range(states.shape[2]):
                for c in range(states.shape[3]):
                    s = int(states[b, 0, a, c])
                    cut = (a + 1) * block_m > q_len or (c + 1) * block_n > k_len
                    kind = "full" if s == FULL and not cut else ("partial" if s != EMPTY else "empty")
                    for lists, row, col in ((fwd, a, c), (bwd, c, a)):
                        n_p, n_f = (int(x) for x in lists.counts[b, 0, row])
                        index = lists.index[b, 0, row].tolist()
                        listed = ("partial" if col in index[:n_p] else "full" if col in index[n_p: n_p + n_f]
                                  else "empty")
                        assert listed == kind, (mask, b, a, c, lists is bwd)


def test_transposed_block_map_is_the_map_of_the_transposed_problem():
    """BlockMap.transposed() (for each key tile, the query tiles that see it) swaps the tile sizes and the lengths
    with the tiles: its dense form is the transposed dense form, also for Nq != Nk and unequal tile sizes (mutation
    audit 2026-12-07: swapped lengths went unseen)."""
    for mask, nq, nk, bq, bk in ((Causal(), 10, 40, 8, 16), (Window(3, 1), 37, 21, 4, 8),
                                 (Segments(torch.arange(40) // 7, torch.arange(26) // 5), 40, 26, 16, 4)):
        bmap = mask.block_map(nq, nk, bq, bk)
        flipped = bmap.transposed()
        assert (flipped.block_q, flipped.block_k, flipped.q_len, flipped.k_len) == (bk, bq, nk, nq)
        assert torch.equal(flipped.states, bmap.states.mT)
        assert torch.equal(flipped.to_dense(), bmap.to_dense().mT)


def test_block_maps_are_cached_per_device():
    """The block-map cache is keyed by device too: a map asked for on the CPU after one built on the meta device is
    a CPU map (mutation audit 2026-12-07: a key without the device served the meta map)."""
    mask = Window(2, 0)
    assert mask.block_map(16, 16, 4, device="meta").states.device.type == "meta"
    cpu = mask.block_map(16, 16, 4, device="cpu")
    assert cpu.states.device.type == "cpu" and torch.equal(cpu.states, Window(2, 0).block_map(16, 16, 4).states)
