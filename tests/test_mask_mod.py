"""zoo.attention.MaskMod: FlexAttention mask_mods as zoo masks. Dense form against FlexAttention's create_mask,
block map against its create_block_mask (partial and full blocks), outputs of every backend against
flex_attention itself (eager, CPU) and the float64 reference; batch- and head-dependent predicates; chunked
evaluation of the block map; clear errors."""
from __future__ import annotations

import warnings

import pytest
import torch

from zoo.attention import FULL, PARTIAL, Causal, MaskMod, Window, attend
from zoo.attention.masks import _states_from_dense

flex = pytest.importorskip("torch.nn.attention.flex_attention")


def _document_causal(lengths):
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))

    def document_causal(b, h, q_idx, kv_idx):  # FlexAttention's document-masking example, causal
        return (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)

    return document_causal


def _flex_states(block_mask) -> torch.Tensor:
    """EMPTY/PARTIAL/FULL (B, H, QB, KB) from a FlexAttention BlockMask's partial and full block lists."""
    num, idx = block_mask.kv_num_blocks, block_mask.kv_indices
    full_num, full_idx = block_mask.full_kv_num_blocks, block_mask.full_kv_indices
    states = torch.zeros(idx.shape, dtype=torch.int8)
    for b in range(idx.shape[0]):
        for h in range(idx.shape[1]):
            for r in range(idx.shape[2]):
                states[b, h, r, idx[b, h, r, : num[b, h, r]].long()] = PARTIAL
                states[b, h, r, full_idx[b, h, r, : full_num[b, h, r]].long()] = FULL
    return states


@pytest.mark.parametrize("n,block", [(256, 64), (384, 128), (192, 32)])
def test_block_map_and_dense_equal_flex_attention(n, block):
    mask_mod = _document_causal([100, 60, n - 160])
    mask = MaskMod(mask_mod)
    want = _flex_states(flex.create_block_mask(mask_mod, None, None, n, n, device="cpu", BLOCK_SIZE=block))
    assert torch.equal(mask.block_map(n, n, block, block).states, want)
    assert torch.equal(mask.dense(n, n), flex.create_mask(mask_mod, 1, 1, n, n, device="cpu"))


def test_ragged_lengths_are_exact_where_flex_attention_is_conservative():
    """At 300 tokens and 64-token blocks FlexAttention reports no full block at all; the zoo's map keeps the
    same tiles and calls FULL exactly the tiles whose in-range pairs are all allowed."""
    n, block = 300, 64
    mask_mod = _document_causal([100, 60, 140])
    mask = MaskMod(mask_mod)
    states = mask.block_map(n, n, block, block).states
    flex_states = _flex_states(flex.create_block_mask(mask_mod, None, None, n, n, device="cpu", BLOCK_SIZE=block))
    assert torch.equal(states != 0, flex_states != 0)
    assert torch.equal(states, _states_from_dense(mask.dense(n, n), block, block))
    assert int((states == FULL).sum()) > 0 == int((flex_states == FULL).sum())


def test_batch_and_head_dependent_predicates_and_chunked_evaluation():
    lengths = torch.tensor([50, 37])  # per batch row: keys beyond the length are padding
    windows = torch.tensor([2, 5, 9])  # per head: a sliding window

    def padded_windows(b, h, q_idx, kv_idx):
        return (kv_idx < lengths[b]) & ((q_idx - kv_idx).abs() <= windows[h])

    calls = []

    def spy(b, h, q_idx, kv_idx):
        calls.append(q_idx.numel() * kv_idx.numel() * b.numel() * h.numel())
        return padded_windows(b, h, q_idx, kv_idx)

    n, block = 50, 8
    mask = MaskMod(spy, batch_size=2, num_heads=3, chunk_cells=2 * 3 * 50 * 16)  # two query tiles per call
    states = mask.block_map(n, n, block, block).states
    assert states.shape == (2, 3, 7, 7) and max(calls) <= mask.chunk_cells and len(calls) == 4
    want = flex.create_mask(padded_windows, 2, 3, n, n, device="cpu")
    assert torch.equal(mask.dense(n, n), want)
    assert torch.equal(states, _states_from_dense(want, block, block))
    assert repr(mask) == "MaskMod(spy, batch_size=2, num_heads=3)"  # the constructor's argument names


@pytest.mark.parametrize("backend", ["torch", "sdpa", "blocksparse"])
def test_attend_equals_flex_attention(backend):
    n, block = 256, 64
    lengths = [100, 60, 96]
    mask_mod = _document_causal(lengths)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 32, generator=g) for _ in range(3))
    block_mask = flex.create_block_mask(mask_mod, None, None, n, n, device="cpu", BLOCK_SIZE=block)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention without torch.compile warns that it is unfused
        want = flex.flex_attention(q, k, v, block_mask=block_mask)
    got = attend(q, k, v, MaskMod(mask_mod), backend=backend)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    # and the float64 reference, gradients included, through the same mask object
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    ref = attend(q64, k64, v64, MaskMod(mask_mod), backend="torch")
    torch.testing.assert_close(got.double(), ref.detach(), atol=1e-5, rtol=1e-5)


def test_combines_with_other_masks_and_raises_clearly():
    def even_keys(b, h, q_idx, kv_idx):
        return kv_idx % 2 == 0

    mask = MaskMod(even_keys) & Causal()
    assert torch.equal(mask.dense(9, 9), (torch.arange(9)[None] % 2 == 0) & Causal().dense(9, 9))
    either = (MaskMod(even_keys) | Window(0, 0)).dense(5, 5)[0, 0]
    assert either.diagonal().all() and torch.equal(either[:, 0], torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="callable"):
        MaskMod("causal")
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        MaskMod(even_keys, num_heads=0)
    with pytest.raises(TypeError, match="must return a bool tensor, got torch.int64"):
        MaskMod(lambda b, h, q, kv: q - kv).dense(4, 4)
    with pytest.raises(ValueError, match="does not broadcast"):
        MaskMod(lambda b, h, q, kv: torch.ones(3, dtype=torch.bool)).dense(4, 4)
    q = torch.randn(2, 4, 8, 16)
    with pytest.raises(ValueError, match="built for batch 3"):
        attend(q, q, q, MaskMod(even_keys, batch_size=3))
    with pytest.raises(ValueError, match="built for 3 heads but attention has 4 heads"):
        attend(q, q, q, MaskMod(even_keys, num_heads=3))
    with pytest.raises(ValueError, match="does not broadcast"):
        MaskMod(lambda b, h, q, kv: torch.ones(1, 1, 1, 4, 4, dtype=torch.bool)).dense(4, 4)


_BAND = 4  # module-level settings a predicate reads (a script's WINDOW = 4)
_BOUNDS = (4, 0)


def _band(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).abs() <= _BAND


def _bounded(b, h, q_idx, kv_idx):
    return (kv_idx >= q_idx - _BOUNDS[0]) & (kv_idx <= q_idx + _BOUNDS[1])


def _causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


@pytest.mark.parametrize("change", ["predicate_reassigned", "global_int", "global_tuple", "closure_int"])
def test_a_new_predicate_or_a_setting_it_reads_reaches_the_block_sparse_backend(change):
    """``m.mask_mod = other`` or a plain value the predicate reads (a global int, a tuple, a closure variable)
    changed after the first call: Mask.version() saw neither, and the block-sparse backend (chosen automatically on
    CPU at this size) served the old predicate's cached block maps and plans (max error 2.96, silently) while the
    dense backends evaluated the new one."""
    global _BAND, _BOUNDS
    width = 4

    def closure_band(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= width

    q, k, v = torch.randn(3, 1, 2, 512, 16, generator=torch.Generator().manual_seed(2))
    predicate = {"predicate_reassigned": _band, "global_int": _band, "global_tuple": _bounded,
                 "closure_int": closure_band}[change]
    mask = MaskMod(predicate)
    try:
        for backend in ("blocksparse", None):
            before = attend(q, k, v, mask, backend=backend)  # fills the caches
        if change == "predicate_reassigned":
            mask.mask_mod = _causal
        elif change == "global_int":
            _BAND = 100
        elif change == "global_tuple":
            _BOUNDS = (100, 3)
        else:
            width = 100
        want = attend(q, k, v, mask, backend="torch")  # the dense form of the predicate as it is now
        assert not torch.allclose(want, before, atol=0.1)  # the change matters
        for backend in ("blocksparse", None):
            torch.testing.assert_close(attend(q, k, v, mask, backend=backend), want, atol=2e-6, rtol=1e-5,
                                       msg=backend)
    finally:
        _BAND, _BOUNDS = 4, (4, 0)
