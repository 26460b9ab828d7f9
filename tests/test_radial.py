"""Radial attention mask (zoo/attention/radial.py): hand-computed cases, the published densities, the
O(n log n) growth, the block map against an independent quantisation of the token rule, the mask object
inside attend(), and the dense warm-up schedule."""
from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest
import torch

from zoo.attention import Dense, Full, attend, use_backend
from zoo.attention.masks import EMPTY, FULL, _states_from_dense
from zoo.attention.radial import DenseWarmup, Radial, radial_block_mask, radial_pair_rule, radial_token_mask


# --------------------------------------------------------------------------------------------------
# The rule, by hand
# --------------------------------------------------------------------------------------------------
def test_pair_rule_hunyuan_3840():
    # T = 3840: P = 2**12 = 4096, L = 4096 / 2**bit_length(dist).
    t = 3840
    assert radial_pair_rule(0, t) == (True, t)  # dist <= 1: the whole frame
    assert radial_pair_rule(1, t) == (True, t)
    assert radial_pair_rule(2, t) == (True, 1024)  # L = 1024
    assert radial_pair_rule(7, t) == (True, 512)  # L = 512
    assert radial_pair_rule(16, t, 0.95) == (True, 128)  # L = 128: 128 * 0.95 < block -> block
    assert radial_pair_rule(32, t) == (True, 128)  # L = 64: split 2, 32 even -> kept, band = block
    assert radial_pair_rule(33, t)[0] is False  # odd distance dropped
    assert radial_pair_rule(64, t)[0] is True and radial_pair_rule(66, t)[0] is False  # L = 32: split 4
    assert radial_pair_rule(8, t, 0.2) == (True, 128)  # 256 * 0.2 = 51.2 -> block size 128
    assert radial_pair_rule(2, t, 0.2) == (True, 204)  # floor(1024 * 0.2)


def test_pair_rule_small_frames_apply_split_to_near_distances():
    # T = 100: P = 128. dist 0: L = 128 kept; dist 1: L = 64 -> split 2 -> 1 % 2 != 0 -> dropped.
    assert radial_pair_rule(0, 100)[0] is True
    assert radial_pair_rule(1, 100)[0] is False
    assert radial_pair_rule(2, 100)[0] is False  # L = 32, split 4
    assert radial_pair_rule(16, 100)[0] is False  # g = 5, L = 4, split 32 -> 16 % 32 != 0
    assert radial_pair_rule(0, 20)[0] is True  # P = 32, L = 32 < 128 but 0 % 4 == 0


def test_window_is_compared_in_float32_as_the_published_generator_does():
    """The published generator compares integer distances with the Python-float window in torch's float32, so a
    window just below a whole number rounds up to it (L * (1 - 1e-8) = 127.99999872 -> 128): the band is one token
    wider than floor() of the float64 value, which the zoo used (blocks differed at 4 frames x 281 tokens, block
    64, found by a second audit against the published code)."""
    assert radial_pair_rule(2, 281, 1 - 1e-8, 64) == (True, 128)
    assert radial_pair_rule(2, 281, 1 - 1e-3, 64) == (True, 127)  # far enough below: float32 keeps it below
    assert radial_pair_rule(2, 281, 1.0, 64) == (True, 128)


def test_hand_block_map_100_tokens():
    # 3 frames x 100 tokens, block 128: S = 300, 3 blocks, border = 300 // 128 = 2 (row/col 2 all on).
    # Only dist 0 pairs are kept (T < 128). Pair (0,0) at offset 0: columns 0..99 hold 100 > 128/3 rows -> block
    # (0,0). Pair (1,1) at offset 100: 28 rows in the cropped 128 -> 28 <= 128/3 -> nothing (the rest spills).
    # Pair (2,2) at offset 72, block offset 1: 56 rows > 42.7 -> block (1,1).
    expected = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    assert torch.equal(radial_block_mask(3, 100, 1.0, False, 128), expected)
    # Wan sink: pairs (i, 0) are whole. (1,0): 28 rows -> no; (2,0): 56 rows placed at block (1, 0) -> yes.
    expected_sink = torch.tensor([[1, 0, 1], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    assert torch.equal(radial_block_mask(3, 100, 1.0, True, 128), expected_sink)


def test_hand_block_map_band():
    # 4 frames x 256 tokens, block 64, decay 0.5: P = 512. dist 0, 1: whole pairs (4x4 blocks on).
    # dist 2, 3: L = 128 (kept), band = max(128 * 0.5, 64) = 64: inside a pair, diagonal blocks are full,
    # the adjacent ones keep columns c <= 42 of 64 dense (43/64 = 0.67 > 0.6) -> on, farther ones empty.
    pair_near = torch.ones(4, 4, dtype=torch.bool)
    pair_far = (torch.arange(4)[:, None] - torch.arange(4)[None, :]).abs() <= 1
    expected = torch.zeros(16, 16, dtype=torch.bool)
    for i in range(4):
        for j in range(4):
            expected[4 * i : 4 * i + 4, 4 * j : 4 * j + 4] = pair_near if abs(i - j) <= 1 else pair_far
    assert torch.equal(radial_block_mask(4, 256, 0.5, False, 64), expected)


@pytest.mark.parametrize(
    "frames, tokens, decay, sink, reference",
    [(18, 3840, 0.2, True, 0.287), (30, 3840, 0.95, False, 0.275), (128, 3600, 1.0, False, 0.109)],
)
def test_published_densities(frames, tokens, decay, sink, reference):
    # REFERENCES.md (Wan 2.1, HunyuanVideo, HunyuanVideo at 4x length); the 3600 x 3600-block map in < 30 s.
    start = time.perf_counter()
    mask = Radial(frames, tokens, decay, sink)
    density = mask.density()
    assert time.perf_counter() - start < 30
    assert round(density, 3) == reference
    assert mask.block_mask.shape == (frames * tokens // 128,) * 2


def test_kept_blocks_grow_as_n_log_n():
    kept = []
    frames = [8, 16, 32, 64, 128]
    for f in frames:
        m = radial_block_mask(f, 512, 1.0)
        kept.append(int(m.sum()))
    ratios = [b / a for a, b in zip(kept, kept[1:])]
    # Quadratic growth would double-double (4x); n log n gives 2 * log(2F) / log(F) -> 2 from above.
    assert all(r2 < r1 for r1, r2 in zip(ratios, ratios[1:])), ratios
    assert ratios[-1] < 2.6, ratios
    per_n_log_n = [k / (f * math.log2(f)) for k, f in zip(kept, frames)]
    assert max(per_n_log_n) / min(per_n_log_n) < 1.7, per_n_log_n
    densities = [k / (f * 4) ** 2 for k, f in zip(kept, frames)]
    assert densities[-1] < 0.2 and all(b < a for a, b in zip(densities, densities[1:]))


# --------------------------------------------------------------------------------------------------
# Block map vs an independent quantisation of the token-level rule
# --------------------------------------------------------------------------------------------------
def quantise_token_mask(token_mask, frames, tokens, block):
    """Literal block quantisation of the token rule, pair by pair (issue 5, section 2)."""
    s = frames * tokens
    total = math.ceil(s / block)
    out = torch.zeros(total, total, dtype=torch.bool)
    out[s // block :] = True
    out[:, s // block :] = True
    nb = math.ceil(tokens / block)
    for i in range(frames):
        for j in range(frames):
            pair = token_mask[i * tokens : (i + 1) * tokens, j * tokens : (j + 1) * tokens]
            ro, co = (i * tokens) % block, (j * tokens) % block
            padded = torch.zeros(ro + nb * block, co + nb * block, dtype=torch.bool)
            padded[ro : ro + tokens, co : co + tokens] = pair
            cropped = padded[: nb * block, : nb * block].reshape(nb, block, nb, block)
            col_density = cropped.sum(1).double() / block  # (nb, nb, block)
            nonzero = (col_density > 0).sum(-1)
            dense = (col_density > 1 / 3).sum(-1)
            blocks = (nonzero > 0) & (dense.double() / nonzero.clamp(min=1) > 0.6)
            r0, c0 = (i * tokens) // block, (j * tokens) // block
            out[r0 : r0 + nb, c0 : c0 + nb] |= blocks[: total - r0, : total - c0]
    return out


@pytest.mark.parametrize(
    "frames, tokens, decay, sink, block",
    [(5, 100, 1.0, False, 32), (6, 37, 0.5, True, 16), (4, 300, 0.2, True, 64), (9, 130, 0.95, False, 128),
     (12, 50, 0.3, True, 8), (7, 64, 1.7, False, 48), (3, 1, 1.0, True, 4),
     # edges of the quantisation (mutation audit m7): blocks with exactly 60% dense columns (kept only above 60%),
     # and blocks whose padded column just past the frame's end must not count
     (10, 131, 1.0, False, 16), (10, 137, 1.0, True, 16)],
)
def test_block_map_matches_quantised_token_mask(frames, tokens, decay, sink, block):
    token_mask = radial_token_mask(frames, tokens, decay, sink, block)
    expected = quantise_token_mask(token_mask, frames, tokens, block)
    assert torch.equal(radial_block_mask(frames, tokens, decay, sink, block), expected)


def test_token_mask_is_banded_and_symmetric_without_sink():
    m = radial_token_mask(8, 200, 1.0, False, 64)
    assert torch.equal(m, m.T)
    # dist 2 (L = 64 -> band max(64, 64) = 64): inside the pair |p - p'| <= 64 exactly.
    pair = m[0:200, 400:600]
    offset = (torch.arange(200)[:, None] - torch.arange(200)[None, :]).abs()
    assert torch.equal(pair, offset <= 64)
    assert not m[0:200, 200 * 3 : 200 * 4].any()  # dist 3: L = 64 < 128, split 2 -> odd dropped


# --------------------------------------------------------------------------------------------------
# The mask object
# --------------------------------------------------------------------------------------------------
def test_radial_mask_block_map_and_dense_form():
    r = Radial(6, 40, 0.5, True, block_size=32, text_tokens=7)
    n = r.seq_len
    assert n == 247
    published = radial_block_mask(6, 40, 0.5, True, 32, text_tokens=7)
    bm = r.block_map(n, n, 32)
    assert torch.equal(bm.states[0, 0], torch.where(published, FULL, EMPTY).to(torch.int8))
    dense = r.dense(n, n)
    assert dense.shape == (1, 1, n, n)
    expanded = published.repeat_interleave(32, 0).repeat_interleave(32, 1)[:n, :n]
    assert torch.equal(dense[0, 0], expanded)
    assert dense[0, 0, 240:].all() and dense[0, 0, :, 240:].all()  # text rows / columns fully on
    # Other tile sizes: derived without the dense form, equal to reducing it.
    for bq, bk in ((16, 16), (64, 64), (48, 32), (100, 7)):
        assert torch.equal(r.block_map(n, n, bq, bk).states, _states_from_dense(dense, bq, bk)), (bq, bk)
    rows = r.dense(n, n, rows=(50, 90))
    assert torch.equal(rows, dense[..., 50:90, :])


def test_radial_mask_errors():
    with pytest.raises(ValueError, match="num_frames"):
        Radial(0, 10)
    with pytest.raises(ValueError, match="decay_factor"):
        Radial(4, 10, decay_factor=-1.0)
    with pytest.raises(ValueError, match="block_size"):
        radial_block_mask(4, 10, block_size=0)
    r = Radial(4, 10, block_size=8)
    with pytest.raises(ValueError, match="4 frames x 10 tokens"):
        r.dense(41, 41)
    q = torch.randn(1, 2, 41, 8)
    with pytest.raises(ValueError, match="Radial mask"):
        attend(q, q, q, r)


@pytest.mark.parametrize("backend", ["torch", "sdpa", "blocksparse"])
def test_attend_with_radial_equals_its_dense_form(backend):
    g = torch.Generator().manual_seed(0)
    r = Radial(6, 24, 1.0, True, block_size=16, text_tokens=5)
    n = r.seq_len
    q, k, v = (torch.randn(2, 2, n, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    go = torch.randn(2, 2, n, 16, generator=g, dtype=torch.float64)
    results = []
    for mask, name in ((r, backend), (Dense(r.dense(n, n)), "torch")):
        with use_backend(name):
            out = attend(q, k, v, mask)
        results.append([out, *torch.autograd.grad(out, (q, k, v), go)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------------
# Dense warm-up schedule
# --------------------------------------------------------------------------------------------------
def test_dense_warmup_schedule():
    s = DenseWarmup(num_steps=10, dense_first_steps=2, dense_last_steps=1, dense_first_layers=3)
    grid = [[s.is_dense(step, layer) for layer in range(5)] for step in range(10)]
    for step in range(10):
        for layer in range(5):
            expected = step < 2 or step == 9 or layer < 3
            assert grid[step][layer] == expected, (step, layer)
    radial = Radial(4, 16, block_size=16)
    assert isinstance(s.mask(0, 4, radial), Full)
    assert s.mask(5, 4, radial) is radial
    assert s.sparse_fraction(5) == pytest.approx((7 * 2) / 50)
    # The published pipelines: dense_timesteps / dense_layers only.
    published = DenseWarmup(num_steps=50, dense_first_steps=12, dense_first_layers=1)
    assert published.is_dense(11, 5) and not published.is_dense(12, 5) and published.is_dense(40, 0)
    assert not published.is_dense(49, 1)
    with pytest.raises(ValueError, match="step"):
        s.is_dense(10, 0)
    with pytest.raises(ValueError, match="dense_last_steps"):
        DenseWarmup(num_steps=10, dense_last_steps=-1)
    # numpy ints are ints (step indices from np.arange); bools are not; type and range errors say which
    assert s.is_dense(np.int64(1), np.int32(4)) and not s.is_dense(np.int64(3), 4)
    assert DenseWarmup(num_steps=np.int64(10), dense_first_steps=np.int32(2)) == DenseWarmup(10, 2)
    with pytest.raises(ValueError, match=r"DenseWarmup: step must be an int, got True \(bool\)"):
        s.is_dense(True)
    with pytest.raises(ValueError, match=r"DenseWarmup: step must be in \[0, 10\), got 10"):
        s.is_dense(np.int64(10))
    with pytest.raises(ValueError, match="DenseWarmup: layer must be an int, got 1.0"):
        s.is_dense(1, 1.0)
    with pytest.raises(ValueError, match="DenseWarmup: num_steps must be >= 1, got 0"):
        DenseWarmup(num_steps=0)
    with pytest.raises(ValueError, match=r"dense_first_steps=20 is more than num_steps=10"):
        DenseWarmup(num_steps=10, dense_first_steps=20)
    assert DenseWarmup(num_steps=10, dense_first_steps=6, dense_last_steps=4).sparse_fraction(2) == 0.0  # baseline


def test_token_mask_takes_text_tokens_as_the_block_map_does():
    """radial_block_mask and Radial take text_tokens (text after the video, fully on); radial_token_mask refused
    the argument (TypeError), so the token-level form of such a map could not be built."""
    video = radial_token_mask(3, 10, decay_factor=0.5)
    with_text = radial_token_mask(3, 10, decay_factor=0.5, text_tokens=4)
    assert with_text.shape == (34, 34) and with_text[30:].all() and with_text[:, 30:].all()
    assert torch.equal(with_text[:30, :30], video)
    with pytest.raises(ValueError, match="text_tokens"):
        radial_token_mask(3, 10, text_tokens=-1)


# --------------------------------------------------------------------------------------------------
# Audit findings: empty block rows, argument checks
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames, tokens", [(8, 16), (16, 32), (16, 120), (32, 100), (8, 240)])
def test_layouts_whose_tokens_see_no_key_warn(frames, tokens):
    """Short frames at block 128 (no text tokens): the published 60% / one-third rule drops every tile of some
    block rows, so those tokens attend to nothing and attend() returned exact zeros with no warning."""
    with pytest.warns(RuntimeWarning, match=f"{frames} frames x {tokens} tokens at block_size=128 leave") as record:
        mask = Radial(frames, tokens)
    empty = ~mask.block_mask.any(1)
    message = str(record[0].message)
    assert empty.any() and f"leave {int(empty.sum())} of {len(empty)} block rows" in message
    assert f"; {int(empty.sum()) * 128} video tokens) with no key" in message
    n = mask.seq_len
    q = torch.randn(1, 1, n, 8, generator=torch.Generator().manual_seed(0))
    out = attend(q, q, q, mask)[0, 0].reshape(-1, 128, 8)
    assert torch.equal(out[empty] == 0, torch.ones_like(out[empty], dtype=torch.bool))  # the rows it names
    suggested = int(message.split("(block_size=")[1].split(" ")[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert radial_block_mask(frames, tokens, block_size=suggested).any(1).all()  # the suggestion has none
    with pytest.warns(RuntimeWarning, match="with no key"):
        radial_block_mask(frames, tokens)


def test_layouts_with_a_key_for_every_token_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layouts = [(16, 1024, True, 128, 0), (16, 120, False, 128, 1),  # 1 text token: a fully-on block column
                   (15, 120, False, 128, 0), (12, 128, True, 32, 0), (16, 64, False, 128, 0)]
        for frames, tokens, sink, block, text in layouts:
            mask = Radial(frames, tokens, 1.0, sink, block_size=block, text_tokens=text)
            assert mask.block_mask.any(1).all(), (frames, tokens, block, text)
        mask.num_frames = 8  # a reassigned setting is checked when the map is rebuilt
        mask.tokens_per_frame = 16
    with pytest.warns(RuntimeWarning, match="8 frames x 16 tokens"):
        mask.block_mask


def test_dense_warmup_sparse_fraction_checks_num_layers():
    """sparse_fraction(0) divided by zero (ZeroDivisionError); negative counts did too."""
    schedule = DenseWarmup(num_steps=10, dense_first_steps=2)
    for bad in (0, -3, True, 2.0):
        with pytest.raises(ValueError, match="num_layers must be an int >= 1"):
            schedule.sparse_fraction(bad)
    assert schedule.sparse_fraction(1) == pytest.approx(0.8)


def test_decay_takes_numpy_floats_and_pair_rule_checks_its_arguments():
    """Radial(4, 10, np.float32(0.5)) was refused as not a number; radial_pair_rule checked nothing (an
    AttributeError for 100.0 tokens, (False, 0) for 0 tokens, a negative band for decay -1, a float error for NaN)."""
    assert Radial(4, 10, np.float32(0.5)).decay_factor == 0.5
    assert radial_pair_rule(2, 3840, np.float64(0.2)) == radial_pair_rule(2, 3840, 0.2) == (True, 204)
    assert radial_pair_rule(-2, 3840) == radial_pair_rule(np.int64(2), 3840) == (True, 1024)  # either sign
    for args, name in [((2, 100.0), "tokens_per_frame"), ((2, 0), "tokens_per_frame"),
                       ((2, 100, -1.0), "decay_factor"),
                       ((2, 100, float("nan")), "decay_factor"), ((2, 100, 1.0, 0), "block_size"),
                       ((2.5, 100), "dist"), ((2, 100, True), "decay_factor")]:
        with pytest.raises(ValueError, match=name):
            radial_pair_rule(*args)


def test_block_map_built_under_export_does_not_reach_eager_calls():
    """A Radial mask held by a module and first used by torch.export: the published map built while traced is not
    kept (under export it is a FakeTensor; the eager calls after the export failed on its data-dependent values).
    Compared with a twin never exported, exactly; a map built eagerly before the export is kept through it."""

    class Video(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mask = Radial(num_frames=4, tokens_per_frame=8, block_size=8)

        def forward(self, q):
            return attend(q, q, q, mask=self.mask)

    q = torch.randn(2, 2, 32, 8, generator=torch.Generator().manual_seed(0))
    layer, twin = Video(), Video()
    program = torch.export.export(layer, (q,))
    want = twin(q)
    assert torch.equal(program.module()(q), want)
    assert torch.equal(layer(q), want)
    assert type(layer.mask.block_mask) is torch.Tensor and torch.equal(layer.mask.block_mask, twin.mask.block_mask)
    built = layer.mask._blocks
    torch.export.export(layer, (q,))
    assert layer.mask._blocks is built


def test_a_used_mask_pickles_and_a_model_holding_it_saves(tmp_path):
    """A Radial (Segments, BlockSparse) mask used once kept block maps whose version records hold weak references:
    pickle, copy.deepcopy and torch.save(model) of a model keeping the mask failed ("cannot pickle
    'weakref.ReferenceType' object"; review, 2026-12-07). The derived maps are left behind and rebuilt on use."""
    import copy
    import pickle

    from zoo.attention import BlockSparse, Segments

    radial = Radial(num_frames=3, tokens_per_frame=100)
    segments = Segments(torch.tensor([0] * 150 + [1] * 150))
    sparse = BlockSparse(torch.rand(3, 3, generator=torch.Generator().manual_seed(0)) > 0.3, 100)
    q = torch.randn(1, 2, 300, 8)
    for mask in (radial, segments, sparse):
        before = attend(q, q, q, mask=mask)  # 300 tokens: the block-sparse path, which fills the mask's caches
        for again in (pickle.loads(pickle.dumps(mask)), copy.deepcopy(mask)):
            assert torch.equal(again.dense(300, 300), mask.dense(300, 300))
            torch.testing.assert_close(attend(q, q, q, mask=again), before, rtol=0, atol=0)
    model = torch.nn.Module()
    model.mask = radial
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert torch.equal(loaded.mask.block_map(300, 300, 64).states, radial.block_map(300, 300, 64).states)


def test_a_decay_factor_past_float32s_range_keeps_the_whole_band():
    """decay_factor >= ~3.4e38 passed the "positive finite" check, then raised OverflowError converting the
    float32 window (inf) to an int (review, 2026-12-07). As in the published generator (its float32 window is inf),
    the whole band is kept: the same map as any decay that reaches tokens_per_frame."""
    for decay in (3.5e38, 1e39, 1e300):
        assert radial_pair_rule(4, 300, decay, 128) == radial_pair_rule(4, 300, 1e6, 128)
        assert torch.equal(radial_block_mask(6, 300, decay_factor=decay), radial_block_mask(6, 300, decay_factor=1e6))


# --------------------------------------------------------------------------------------------------
# Mutation audit m7: the settings cache, density(), check_shape and the one-third edge of the warning
# --------------------------------------------------------------------------------------------------
def test_pair_blocks_need_strictly_more_than_60_percent_dense_columns():
    """One frame pair by hand (_pair_blocks): 8 tokens at block 8, band 0 (the diagonal only), column offset 3.
    Column c holds key p' = c - 3, seen by the one row p = p' of the block: every nonzero column has density 1/8,
    not dense, so nothing is kept; with band 2, columns 3..7 (p' = 0..4) hold 3, 4, 5, 5, 5 rows of the 8-row
    block (rows p'-2..p'+2 inside 0..7), and 3 rows are more than a third (8/3 = 2.67): all 5 dense -> kept."""
    from zoo.attention.radial import _pair_blocks

    assert not _pair_blocks(8, 8, 0, 3, 0).any()
    assert _pair_blocks(8, 8, 0, 3, 2)[0, 0]
    # block 15, band 1, offset 0, 5 tokens: columns 0..4 hold 2, 3, 3, 3, 2 rows; dense iff 3 * rows > 15, i.e.
    # rows >= 6: none, so nothing kept. Block 9: dense iff rows >= 4: none. Block 6: dense iff rows >= 3: columns
    # 1, 2, 3 -> 3 of 5 nonzero columns dense = exactly 60%, which the published rule does not keep.
    assert not _pair_blocks(5, 6, 0, 0, 1).any()
    # 4 of 5 (80%) is kept: band 2 gives 3, 4, 5, 4, 3 rows, all >= 3
    assert _pair_blocks(5, 6, 0, 0, 2)[0, 0]
    # the padded column past the frame's end holds no key of this pair: 6 tokens at block 7, band 1, columns 0..5
    # hold 2, 3, 3, 3, 3, 2 rows, dense iff rows >= 3: 4 of 6 (67%) -> kept; column 6 (p' = 6, the next frame's
    # first token) counted with its 1 row would make it 4 of 7 (57%) -> dropped
    assert _pair_blocks(6, 7, 0, 0, 1)[0, 0]


@pytest.mark.parametrize("setting, value", [("num_frames", 6), ("tokens_per_frame", 150), ("decay_factor", 4.0),
                                            ("decay_factor", 0.25), ("frame0_sink", True), ("block_size", 32),
                                            ("text_tokens", 5)])
def test_a_changed_setting_rebuilds_the_map(setting, value):
    """Radial builds its map once and again when a setting is reassigned: each of its settings is in the key, so
    a user sweeping decay_factor (or any other) on one mask object gets the new map, not the first one."""
    args = dict(num_frames=8, tokens_per_frame=200, decay_factor=1.0, frame0_sink=False, block_size=16,
                text_tokens=0)
    r = Radial(**args)
    before = r.block_mask.clone()
    setattr(r, setting, value)
    args[setting] = value
    published = radial_block_mask(args["num_frames"], args["tokens_per_frame"], args["decay_factor"],
                                  args["frame0_sink"], args["block_size"], text_tokens=args["text_tokens"])
    assert before.shape != published.shape or not torch.equal(before, published)  # the change is visible
    assert torch.equal(r.block_mask, published)
    if setting == "decay_factor":  # and attention uses it
        n = r.seq_len
        q = torch.randn(1, 1, n, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        dense = published.repeat_interleave(16, 0).repeat_interleave(16, 1)[:n, :n]
        torch.testing.assert_close(attend(q, q, q, r), attend(q, q, q, Dense(dense)), rtol=1e-12, atol=1e-12)


def test_density_counts_the_video_blocks_only():
    """density() is the video x video share (S // block)^2, the paper's figure, without the text tokens' and a
    trailing partial block's fully-on rows and columns. By hand:

    * 4 frames x 32 tokens, block 16, 5 text tokens: T = 32 (P = 64): only dist 0 is kept (dist 1: L = 32, split
      4), each frame on 2 x 2 whole blocks of the 8 x 8 video map: 16 / 64.
    * 3 frames x 40 tokens, block 16 (S = 120: 7 video blocks, block 7 a trailing partial one): again only
      dist 0; frame 0 (tokens 0..39) keeps blocks 0..2 x 0..2 (block 2 holds 8 of its rows: density 1/2 > 1/3),
      frame 1 (40..79, offset 8) blocks 2..4 x 2..4, frame 2 (80..119) blocks 5..7 x 5..7: 9 + 8 + 4 = 21 of 49."""
    with_text = Radial(4, 32, 1.0, False, block_size=16, text_tokens=5)
    assert with_text.block_mask.shape == (9, 9)
    assert with_text.density() == pytest.approx(16 / 64, abs=1e-6)
    trailing = Radial(3, 40, 1.0, False, block_size=16)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    for first in (0, 2, 5):
        expected[first:first + 3, first:first + 3] = True
    expected[7, :] = expected[:, 7] = True
    assert torch.equal(trailing.block_mask, expected)
    assert trailing.density() == pytest.approx(21 / 49, abs=1e-6)  # a float32 mean


def test_check_shape_refuses_a_wrong_query_or_key_length():
    """Radial is self-attention over its own tokens: a right Nq with a wrong Nk (or the reverse) is refused, also
    through attend(), where Nk = 120 of 128 still fits the 8 tiles of 16 that BlockSparse checks."""
    r = Radial(4, 32, block_size=16)
    n = r.seq_len
    r.check_shape(n, n)
    for q_len, k_len in ((n, n - 8), (n - 8, n), (n + 1, n + 1)):
        with pytest.raises(ValueError, match=rf"self-attention over .* Nq={q_len}, Nk={k_len}"):
            r.check_shape(q_len, k_len)
    q = torch.randn(1, 1, n, 8)
    k = torch.randn(1, 1, n - 8, 8)
    for backend in ("torch", "blocksparse"):
        with use_backend(backend), pytest.raises(ValueError, match=rf"self-attention .* Nq={n}, Nk={n - 8}"):
            attend(q, k, k, r)


@pytest.mark.parametrize("frames, expected_empty", [(3, [0]), (6, [0, 1])])
def test_a_frame_on_exactly_a_third_of_a_block_row_warns(frames, expected_empty):
    """16-token frames at block 48 cover exactly one third of a block row each: a column density of 1/3 is not
    above 1/3, so no tile is kept in those rows (3 x 16: the 1 x 1 map is [[False]]) and the warning names them."""
    with pytest.warns(RuntimeWarning, match=rf"{frames} frames x 16 tokens at block_size=48 leave "
                                            rf"{len(expected_empty)} of {frames * 16 // 48} block rows"):
        mask = Radial(frames, 16, block_size=48)
    assert (~mask.block_mask.any(1)).nonzero().flatten().tolist() == expected_empty


def test_empty_row_closed_form_matches_the_map():
    """The rows the warning names (_empty_block_rows, a closed form) are the map's rows without a kept block, over
    small layouts that put frame edges at every fraction of a block."""
    from zoo.attention.radial import _empty_block_rows

    for frames in (1, 2, 3, 6, 8):
        for tokens in (4, 8, 12, 16, 24, 32, 40):
            for block in (8, 12, 16, 24, 48):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    published = radial_block_mask(frames, tokens, 1.0, frames % 2 == 0, block)
                want = (~published.any(1)).nonzero().flatten().numpy()
                got = _empty_block_rows(frames, tokens, block, 0)
                assert np.array_equal(got, want), (frames, tokens, block, got, want)


# --------------------------------------------------------------------------------------------------
# Mutation audit m25: a trailing partial block with text tokens, the warning's suggested block size,
# the density of a map with no whole video block
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames, tokens, text, block", [(2, 125, 10, 128), (3, 50, 20, 32), (5, 37, 40, 16)])
def test_a_partial_block_with_text_tokens_keeps_every_spilled_block(frames, tokens, text, block):
    """S not a multiple of the block and text tokens that push the sequence past one more block boundary than
    the text alone covers (125 + 10 tokens past 256 at block 128): the map needs ceil((S + text) / block) blocks,
    not S // block + ceil(text / block) (attend() then refused the mask). Reference: the literal quantisation of
    the token rule for the video, then every block row and column from S // block on fully on."""
    s = frames * tokens
    total = math.ceil((s + text) / block)
    assert total > s // block + math.ceil(text / block)  # the case the count by parts gets wrong
    expected = torch.ones(total, total, dtype=torch.bool)
    video = quantise_token_mask(radial_token_mask(frames, tokens, 1.0, False, block), frames, tokens, block)
    expected[: s // block, : s // block] = video[: s // block, : s // block]
    assert torch.equal(radial_block_mask(frames, tokens, 1.0, False, block, text_tokens=text), expected)
    r = Radial(frames, tokens, 1.0, False, block_size=block, text_tokens=text)
    n = r.seq_len
    q = torch.randn(1, 1, n, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dense = expected.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :n]
    torch.testing.assert_close(attend(q, q, q, r), attend(q, q, q, Dense(dense)), rtol=1e-12, atol=1e-12)


def test_the_warning_suggests_the_largest_block_size_without_empty_rows():
    """16 frames x 8 tokens at block 128, by hand: a block row of b tokens holds b / 8 whole frames of 8 tokens, and
    a frame's tile is kept only if 8 > b / 3, so every row is empty at b = 128, 64 and 32 (8 <= b / 3) and none at
    16 (8 > 16 / 3): the suggestion is 16, three halvings down (one halving suggested 64, still empty)."""
    with pytest.warns(RuntimeWarning, match="with no key") as record:
        radial_block_mask(16, 8)
    assert "block_size=16 has no empty row" in str(record[0].message)
    for block in (32, 64):
        with pytest.warns(RuntimeWarning, match="with no key"):
            assert not radial_block_mask(16, 8, block_size=block).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert radial_block_mask(16, 8, block_size=16).any(1).all()


def test_density_of_a_video_shorter_than_a_block_is_one():
    """2 frames x 16 tokens at block 128: S = 32 < 128, no whole video block; the map is one fully-on block (the
    trailing partial block), every token sees every key, and density() reports 1.0 (not 0.0: nothing is sparse)."""
    r = Radial(2, 16)
    assert torch.equal(r.block_mask, torch.ones(1, 1, dtype=torch.bool))
    assert r.dense(32, 32).all()
    assert r.density() == 1.0


def test_reassigned_settings_are_checked_and_rebuild_the_map():
    """Radial's settings reassigned after construction are checked as the constructor checks them (a refused value
    leaves the mask as it was), and a valid change gives the map of a Radial built with it."""
    mask = Radial(4, 64, block_size=32)
    before = mask.block_mask.clone()
    for name, value, error in (("num_frames", 0, ValueError), ("block_size", 0, ValueError),
                               ("decay_factor", float("nan"), ValueError), ("frame0_sink", 2, TypeError),
                               ("text_tokens", -1, ValueError)):
        with pytest.raises(error, match=f"Radial: {name}"):
            setattr(mask, name, value)
    assert torch.equal(mask.block_mask, before)
    mask.num_frames, mask.frame0_sink = 8, True
    torch.testing.assert_close(mask.block_mask, Radial(8, 64, block_size=32, frame0_sink=True).block_mask)
