"""The CPU block-sparse backend (zoo/attention/sparse.py) against a float64 reference: forward and the
gradients of q, k, v and bias on awkward shapes, every mask type and combinations, random block maps,
fully masked rows, GQA, softmax and sigmoid; automatic selection; work proportional to kept tiles."""
from __future__ import annotations

import math

import pytest
import torch

from zoo.attention import EMPTY, FULL, BlockSparse, Causal, ChunkWindow, Dense, Full, Segments, Window
from zoo.attention import attend, use_backend
from zoo.attention import backends as zb
from zoo.attention import sparse as zs
from zoo.attention.radial import Radial
from zoo.attention.sparse import block_sparse_attention
from zoo.layers import EXP_FLOOR

from attention_reference import naive_attention  # tests/attention_reference.py (pytest puts tests/ on sys.path)


def _rand(*shape, g, dtype=torch.float64, spread=1.0):
    return (torch.randn(*shape, generator=g, dtype=dtype) * spread).requires_grad_(True)


def check(mask, b, h, hkv, nq, nk, d, dv=None, bias_shape=None, score="softmax", block_size=None, dtype=torch.float64,
          tol=1e-10, seed=0, spread=1.0, bias=None):
    """Values and gradients of block_sparse_attention against the float64 reference; ``spread`` scales q and
    k (peaked softmax rows), ``bias`` a given bias tensor (else a random one of ``bias_shape``)."""
    g = torch.Generator().manual_seed(seed)
    dv = dv or d
    q, k = _rand(b, h, nq, d, g=g, dtype=dtype, spread=spread), _rand(b, hkv, nk, d, g=g, dtype=dtype, spread=spread)
    v = _rand(b, hkv, nk, dv, g=g, dtype=dtype)
    if bias is not None:
        bias = bias.detach().to(dtype).requires_grad_(True)
    elif bias_shape is not None:
        bias = _rand(*bias_shape, g=g, dtype=dtype)
    grad_out = torch.randn(b, h, nq, dv, generator=g, dtype=torch.float64)
    inputs = [q, k, v] + ([bias] if bias is not None else [])
    scale = 1 / math.sqrt(d)
    from zoo.attention.masks import as_mask

    allowed = as_mask(mask).dense(nq, nk)
    ref = naive_attention(q, k, v, allowed, bias, scale, score)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)
    out = block_sparse_attention(q, k, v, mask, bias, score=score, block_size=block_size)
    assert out.dtype == dtype and out.shape == (b, h, nq, dv)
    grads = torch.autograd.grad(out, inputs, grad_out.to(dtype))
    names = ["out", "dq", "dk", "dv", "dbias"]
    for name, a, r in zip(names, [out, *grads], [ref, *ref_grads]):
        assert a.shape == r.shape, name
        err = float((a.detach().double() - r.detach()).abs().max())
        assert err <= tol * max(1.0, float(r.detach().abs().max())), f"{name}: max error {err:.3g}"


def _segments(b, nq, nk, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids_q = torch.sort(torch.randint(0, 3, (b, nq), generator=g), dim=-1).values
    ids_k = torch.sort(torch.randint(0, 3, (b, nk), generator=g), dim=-1).values
    ids_k[:, -1] = -1  # a padding key
    return Segments(ids_q, ids_k)


def _random_blocks(nq, nk, block, density, seed=0, lead=()):
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, math.ceil(nq / block), math.ceil(nk / block))
    return BlockSparse(torch.rand(*shape, generator=g) < density, block)


def masks_for(b, h, nq, nk):
    g = torch.Generator().manual_seed(2)
    return {
        "full": Full(),
        "causal": Causal(),
        "window": Window(5, 2),
        "window-left": Window(20, None),
        "segments": _segments(b, nq, nk),
        "dense": Dense(torch.rand(nq, nk, generator=g) < 0.3),
        "dense-bh": Dense(torch.rand(b, h, nq, nk, generator=g) < 0.3),
        "blocks20": _random_blocks(nq, nk, 16, 0.2),
        "blocks50": _random_blocks(nq, nk, 16, 0.5, seed=3),
        "blocks-per-head": _random_blocks(nq, nk, 8, 0.4, seed=4, lead=(1, h)),
        "and": Causal() & Window(9, None),
        "or": Window(1, 1) | _segments(b, nq, nk),
        "and-blocks": _random_blocks(nq, nk, 32, 0.5, seed=5) & Window(40, 40),
        "chunks": ChunkWindow(12, 2, 0),
        "chunks-unaligned&segments": ChunkWindow(20, 1, 1) & _segments(b, nq, nk),
    }


SHAPES = [
    # b, h, hkv, nq, nk, d, dv
    (1, 2, 2, 1, 7, 16, 16),
    (2, 4, 2, 97, 130, 16, 24),
    (1, 3, 1, 130, 97, 40, 40),
    (2, 2, 2, 257, 257, 64, 64),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_mask_softmax(shape):
    b, h, hkv, nq, nk, d, dv = shape
    for name, mask in masks_for(b, h, nq, nk).items():
        try:
            check(mask, b, h, hkv, nq, nk, d, dv, block_size=32)
        except AssertionError as error:
            raise AssertionError(f"mask {name}: {error}") from None


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize(
    "bias_shape", [(1, 4, 97, 130), (2, 1, 1, 130), (1, 1, 97, 1), (2, 4, 97, 130)], ids=["1H", "B1-keys", "rows", "BH"]
)
def test_bias_gradients_and_scores(score, bias_shape):
    b, h, hkv, nq, nk, d = 2, 4, 2, 97, 130, 16
    for name in ("window", "segments", "blocks20", "dense-bh", "or"):
        mask = masks_for(b, h, nq, nk)[name]
        try:
            check(mask, b, h, hkv, nq, nk, d, bias_shape=bias_shape, score=score, block_size=(16, 32))
        except AssertionError as error:
            raise AssertionError(f"mask {name}: {error}") from None


def test_default_tiles_and_radial():
    r = Radial(5, 40, 1.0, True, block_size=16, text_tokens=3)
    check(r, 1, 2, 1, r.seq_len, r.seq_len, 16, score="softmax")  # tiles: multiples of 16 (64)
    check(r, 1, 2, 1, r.seq_len, r.seq_len, 16, score="sigmoid", block_size=16)
    assert zs.choose_tiles(r, 203, 203) == (64, 64)
    assert zs.choose_tiles(Radial(4, 256), 1024, 1024) == (128, 128)
    assert zs.choose_tiles(Window(3, 3), 500, 500) == (zs.DEFAULT_TILE, zs.DEFAULT_TILE)
    assert zs.choose_tiles(Causal() & _random_blocks(200, 200, 80, 0.5), 200, 200) == (80, 80)
    # Chunk windows: tiles on chunk boundaries (a multiple of small chunks), default tiles for long chunks.
    assert zs.choose_tiles(ChunkWindow(48, 2), 4096, 4096) == (96, 96)
    assert zs.choose_tiles(ChunkWindow(100), 4096, 4096) == (100, 100)
    assert zs.choose_tiles(ChunkWindow(1560), 4096, 4096) == (zs.DEFAULT_TILE, zs.DEFAULT_TILE)
    mask = ChunkWindow(24, 1, 0)
    assert set(mask.block_map(240, 240, 24, 24).states.unique().tolist()) == {EMPTY, FULL}
    check(mask, 1, 2, 2, 240, 240, 16, block_size=24)  # tiles of one chunk: no element-wise mask
    check(mask, 1, 2, 2, 240, 240, 16)  # tiles of 3 chunks (72)



def test_rectangular_block_sparse_mask_uses_its_own_key_tile():
    """A BlockSparse of (64, 128) blocks runs on (64, 128) tiles, where its block map is exact (FULL / EMPTY
    only): the key tile is the mask's block_k, not its block_q. Values and gradients against float64."""
    keep = torch.rand(5, 3, generator=torch.Generator().manual_seed(7)) < 0.5
    keep[:, 0] = True
    mask = BlockSparse(keep, (64, 128))
    assert zs.choose_tiles(mask, 300, 330) == (64, 128)
    assert set(mask.block_map(300, 330, 64, 128).states.unique().tolist()) <= {EMPTY, FULL}
    assert zs.choose_tiles(BlockSparse(keep, (16, 32)), 300, 330) == (64, 64)  # small blocks: multiples of them
    check(mask, 1, 2, 1, 300, 330, 16)

def test_fully_masked_rows_give_zero_output_and_gradients():
    nq, nk = 70, 50
    allowed = torch.rand(nq, nk, generator=torch.Generator().manual_seed(0)) < 0.4
    allowed[3] = False
    allowed[40:60] = False  # whole query tiles without keys as well
    check(Dense(allowed), 1, 2, 2, nq, nk, 16, bias_shape=(1, 2, nq, nk), block_size=16)
    check(Dense(allowed), 1, 2, 2, nq, nk, 16, score="sigmoid", block_size=16)
    q = torch.randn(1, 2, nq, 16, requires_grad=True)
    k = torch.randn(1, 2, nk, 16)
    out = block_sparse_attention(q, k, k, Dense(allowed), block_size=16)
    assert torch.isfinite(out).all() and (out[:, :, 3] == 0).all() and (out[:, :, 40:60] == 0).all()
    out.sum().backward()
    assert (q.grad[:, :, 3] == 0).all() and torch.isfinite(q.grad).all()


def test_minus_inf_bias_rows_are_zero_like_the_reference():
    nq = nk = 40
    bias = torch.zeros(1, 1, nq, nk, dtype=torch.float64)
    bias[..., 5, :] = -math.inf
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, nq, 8, generator=g, dtype=torch.float64) for _ in range(3))
    ours = block_sparse_attention(q, k, v, Window(4, 4), bias, block_size=16)
    ref = attend(q, k, v, Window(4, 4), bias, backend="torch")
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert (ours[:, :, 5] == 0).all()


def test_rows_whose_keys_all_sit_at_a_huge_negative_bias_get_exact_gradients():
    """Every allowed key of a row at -1e9 (``masked_fill(~m, -1e9)``) or ``finfo.min`` (Hugging Face's additive
    mask): the row attends uniformly, as in the reference, and its gradients are the reference's too. The
    backward used to recompute P as exp(s - LSE) with LSE = max + log l rounded back to max in float32, giving
    each of the l tied keys P = 1 instead of 1 / l (dq 2x off, dv worse); the forward now keeps the row maximum
    and the log normaliser apart (sparse._forward_tiles). Tile path (a bias) and batched groups (no bias: scores
    of 1e8 that tie, every key the same vector), float32 against the float64 torch backend."""
    n, block = 96, 16
    g = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g) for _ in range(3))
    bias = torch.randn(1, 1, n, n, generator=g)
    bias[..., 5, :] = torch.finfo(torch.float32).min
    bias[..., 40, :] = -1e9
    q[..., 40, :] = 0.0  # its scores tie in float64 too (there, -1e9 + s keeps the differences of s)
    keep = torch.rand(n // block, n // block, generator=g) < 0.5
    keep[:, 0] = True
    tied_k = (1e4 * torch.randn(1, 1, 1, 8, generator=g)).expand(1, 2, n, 8).contiguous()
    # (in the tied case dq and dk are float32 rounding noise times 1e4 around zero: out and dv are compared)
    cases = [(Window(4, 4), q, k, bias, ("out", "dq", "dk", "dv", "dbias")),
             (Causal(), q, k, bias, ("out", "dq", "dk", "dv", "dbias")),
             (BlockSparse(keep, block), 1e4 * q, tied_k, None, ("out", "dv"))]
    assert zs._plan(cases[2][0], None, 1, 2, 2, n, n, block, block, "cpu")[0].groups  # the batched path
    for mask, q_case, k_case, bias_case, compared in cases:
        inputs = [t.clone().requires_grad_(True) for t in (q_case, k_case, v)]
        inputs += [] if bias_case is None else [bias_case.clone().requires_grad_(True)]
        grad_out = torch.randn(1, 2, n, 8, generator=g)
        ours = block_sparse_attention(*inputs[:3], mask, *inputs[3:], block_size=block)
        ours_grads = torch.autograd.grad(ours, inputs, grad_out)
        reference_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
        reference = attend(*reference_inputs[:3], mask, *reference_inputs[3:], backend="torch")
        reference_grads = torch.autograd.grad(reference, reference_inputs, grad_out.double())
        for name, got, want in zip(["out", "dq", "dk", "dv", "dbias"], [ours, *ours_grads],
                                   [reference, *reference_grads]):
            err = float((got.double() - want).abs().max())
            assert name not in compared or err <= 1e-5 * max(1.0, float(want.abs().max())), (
                f"{mask}: {name} max error {err:.3g}")


@pytest.mark.parametrize("spread", [1.0, 6.0])
def test_peaked_scores_exact_and_every_exp_argument_above_the_floor(spread, monkeypatch):
    """Trained models put many scores far below their row's maximum: exp() of arguments under -87.3 (and of
    -inf) leaves ATen's vector path (12-110x slower per element). With q and k scaled by 6 most shifted
    scores are below -87: results and gradients still match the float64 reference, and no exp_() call of
    the path sees an argument under zoo.layers.EXP_FLOOR -- in batched groups with a short last key tile (no
    shift at spread 1: the score bound proves it safe; shift + clamp at 6), PARTIAL tiles of a window,
    fully masked rows and a -inf bias row."""
    n, block = 200, 16
    keep = torch.rand(13, 13, generator=torch.Generator().manual_seed(3)) < 0.35
    keep[:, -1] = True  # every row visits the short last key tile: batched groups with a tail
    allowed = Window(20, 5).dense(n, n)[0, 0].clone()
    allowed[7] = False  # a row without keys
    minus_inf_row = torch.zeros(1, 1, n, n, dtype=torch.float64)
    minus_inf_row[..., 9, :] = -math.inf
    cases = [
        (BlockSparse(keep, block), None),
        (Radial(5, 40, 1.0, block_size=16), None),
        (Dense(allowed), None),
        (Window(20, 5), minus_inf_row),
    ]
    seen, flushed = [], []
    real_exp_, real_flushed = torch.Tensor.exp_, zs._exp_flushed_

    def recording_exp_(self):
        values = self[~torch.isnan(self)]
        seen.append(float(values.min()) if values.numel() else 0.0)
        return real_exp_(self)

    def counting_flush(t):
        flushed.append(mask)
        return real_flushed(t)

    for mask, bias in cases:
        if bias is None:
            check(mask, 1, 2, 1, n, n, 16, block_size=block, spread=spread)
        else:  # the float64 reference of check() gives NaN for a row of -inf scores; attend()'s gives zeros
            g = torch.Generator().manual_seed(4)
            q, k, v = (torch.randn(1, 2, n, 16, generator=g, dtype=torch.float64) * spread for _ in range(3))
            ours = block_sparse_attention(q, k, v, mask, bias, block_size=block)
            torch.testing.assert_close(ours, attend(q, k, v, mask, bias, backend="torch"), rtol=1e-10, atol=1e-10)
            assert (ours[:, :, 9] == 0).all()
        g = torch.Generator().manual_seed(5)
        q, k, v = (_rand(1, 2, n, 16, g=g, dtype=torch.float32, spread=spread) for _ in range(3))
        monkeypatch.setattr(torch.Tensor, "exp_", recording_exp_)
        monkeypatch.setattr(zs, "_exp_flushed_", counting_flush)
        out = block_sparse_attention(q, k, v, mask, None if bias is None else bias.float(), block_size=block)
        out.backward(torch.randn_like(out))
        monkeypatch.undo()
        assert torch.isfinite(out).all() and torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert len(seen) >= 8 and min(seen) >= EXP_FLOOR, min(seen)
    # Without element-wise masks (the first two cases) small scores need no shift and no flush at all.
    unmasked = [case for case in flushed if case is cases[0][0] or case is cases[1][0]]
    assert (len(unmasked) == 0) if spread == 1.0 else (len(unmasked) > 0)



def test_backward_flushes_when_only_the_forward_is_provably_shift_free(monkeypatch):
    """Scores bounded by 45 (|scale q.k| <= 45, n = 64 keys): the forward may exponentiate without a shift
    (45 + log 64 <= SAFE_EXP_RANGE), but the backward's exp(q.k - lse) reaches -90 - log(count) here, below
    EXP_FLOOR: the backward must flush (it needs 2 * bound + log Nk <= SAFE_EXP_RANGE to skip that). Rows
    q = +-a u against keys +-a u give scores of exactly +-45. Values and gradients match the float64 reference."""
    n, d, block = 64, 16, 16
    a = math.sqrt(45.0 * math.sqrt(d))  # scale * a * a = 45
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(d, generator=g, dtype=torch.float64), dim=0)
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    x = (signs[:, None] * a * u)[None, None].expand(1, 2, n, d)
    keep = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 1], [1, 0, 0, 1]], dtype=torch.bool)
    mask = BlockSparse(keep, block)
    assert zs.score_bound(x / math.sqrt(d), x) <= 45.0 + 1e-9
    check(mask, 1, 2, 2, n, n, d, block_size=block, tol=1e-9, seed=1)  # random inputs: same paths, float64
    seen = []
    real_exp_ = torch.Tensor.exp_

    def recording_exp_(self):
        values = self[~torch.isnan(self)]
        seen.append(float(values.min()) if values.numel() else 0.0)
        return real_exp_(self)

    q, k = x.float().clone().requires_grad_(True), x.float().clone().requires_grad_(True)
    v = torch.randn(1, 2, n, d, generator=g).requires_grad_(True)
    grad_out = torch.randn(1, 2, n, d, generator=g)
    monkeypatch.setattr(torch.Tensor, "exp_", recording_exp_)
    out = block_sparse_attention(q, k, v, mask, block_size=block)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    monkeypatch.undo()
    assert seen and min(seen) >= EXP_FLOOR, min(seen)
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = naive_attention(qd, kd, vd, mask.dense(n, n), None, d**-0.5, "softmax")
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), grad_out.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3, msg=lambda m: f"d{name}: {m}")


def test_per_head_mask_with_a_per_head_bias_of_two_heads():
    """A block map that varies over heads runs one pass per head: a bias with one slice per head must be cut to
    that head (H = 2, with and without grouped-query K/V), values and gradients against the float64 reference."""
    nq, nk = 40, 56
    mask = _random_blocks(nq, nk, 8, 0.4, seed=6, lead=(1, 2))
    for hkv in (2, 1):
        check(mask, 1, 2, hkv, nq, nk, 16, bias_shape=(1, 2, nq, nk), block_size=8)
        check(mask, 2, 2, hkv, nq, nk, 16, bias_shape=(2, 2, 1, nk), block_size=8, score="sigmoid")

def test_float32_float16_and_non_contiguous_inputs():
    g = torch.Generator().manual_seed(0)
    b, h, n, d = 2, 4, 150, 32
    qkv = torch.randn(b, n, 3, h, d, generator=g)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # non-contiguous views, as after a fused qkv projection
    mask = Window(16, 16) | _random_blocks(n, n, 32, 0.3)
    ref = naive_attention(q, k, v, mask.dense(n, n), None, d**-0.5, "softmax")
    ours = block_sparse_attention(q, k, v, mask)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=2e-6)
    half = block_sparse_attention(q.half(), k.half(), v.half(), mask)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), ref, rtol=5e-3, atol=5e-3)



def test_fp16_bias_gradient_is_accumulated_in_fp32():
    """An fp16 bias broadcast over batch, heads and rows (1, 1, 1, Nk) collects its gradient from every query tile
    of every (batch, head): the tiles' contributions are summed in fp32 and rounded to fp16 once, so the gradient
    is within fp16 rounding of the float64 reference on the same (fp16) inputs (summed in fp16 tile by tile it
    was 3% off)."""
    g = torch.Generator().manual_seed(0)
    b, h, n, d = 2, 4, 256, 16
    q, k, v = (torch.randn(b, h, n, d, generator=g).half() for _ in range(3))
    bias = torch.randn(1, 1, 1, n, generator=g).half().requires_grad_(True)
    grad_out = torch.randn(b, h, n, d, generator=g).half()
    mask = Window(40, 40)
    out = block_sparse_attention(q, k, v, mask, bias, block_size=16)
    (got,) = torch.autograd.grad(out, bias, grad_out)
    assert got.dtype == torch.float16
    bias64 = bias.detach().double().requires_grad_(True)
    ref = naive_attention(q.double(), k.double(), v.double(), mask.dense(n, n), bias64, d**-0.5, "softmax")
    (want,) = torch.autograd.grad(ref, bias64, grad_out.double())
    rounding = (want.half().double() - want).abs()
    err = (got.double() - want).abs()
    assert bool((err <= 2 * rounding + 1e-4 * float(want.abs().max())).all()), float((err - 2 * rounding).max())

def test_tiles_visited_are_the_kept_tiles():
    n, block = 300, 32
    mask = _random_blocks(n, n, block, 0.25, seed=7)
    plan = zs._plan(mask, None, 1, 2, 2, n, n, block, block, "cpu")
    kept = mask.block_mask[0, 0]
    for tile in plan[0].tiles:
        row = tile.r0 // block
        cols = torch.arange(tile.c0, tile.c1) if tile.cols is None else tile.cols
        expected = (kept[row].nonzero()[:, 0, None] * block + torch.arange(block)).reshape(-1)
        assert torch.equal(cols, expected[expected < n])
        assert tile.spans == []  # BlockSparse at its own block: every kept tile FULL, no masking
    assert {t.r0 // block for t in plan[0].tiles} == set(kept.any(-1).nonzero()[:, 0].tolist())
    # A window: only the PARTIAL tiles carry element-wise masks.
    plan = zs._plan(Window(70, 70), None, 1, 1, 1, n, n, block, block, "cpu")
    states = Window(70, 70).block_map(n, n, block, block).states[0, 0]
    for tile in plan[0].tiles:
        masked = sum(width for _, width, _ in tile.spans)
        partial = int((states[tile.r0 // block] == 1).sum())
        assert partial * block - 32 <= masked <= partial * block


def test_batched_query_tiles_match_reference():
    """Query tiles visiting the same number of whole FULL key tiles run as one batch (sparse._Group), the
    short last key tile zero-padded and masked: values and gradients against the float64 reference."""
    n, block = 200, 16  # 200 = 12 * 16 + 8: the last key tile is short
    g = torch.Generator().manual_seed(11)
    keep = torch.rand(13, 13, generator=g) < 0.3
    keep[:, -1] = True  # every row visits the short tile
    mask = BlockSparse(keep, block)
    plan = zs._plan(mask, None, 2, 4, 2, n, n, block, block, "cpu")
    assert plan[0].groups and any(grp.tail for grp in plan[0].groups)
    assert sum(grp.q_tiles.numel() for grp in plan[0].groups) + len(plan[0].rest) == len(plan[0].tiles)
    sizes = [grp.blocks.numel() for grp in plan[0].groups]
    assert sizes == sorted(sizes, reverse=True)  # largest first: workspace slots sized once
    check(mask, 2, 4, 2, n, n, 16, block_size=block)
    per_head = _random_blocks(n, n, block, 0.4, seed=12, lead=(1, 2))
    check(per_head, 1, 2, 1, n, n, 24, block_size=block)
    # Batch 2 with a map per head: each head's K/V slice is strided (gathers and sums along the tile dim).
    check(per_head, 2, 2, 2, n, n, 24, block_size=block)
    radial = Radial(5, 40, 1.0, block_size=16)
    assert zs._plan(radial, None, 1, 2, 2, 200, 200, 16, 16, "cpu")[0].groups
    check(radial, 1, 2, 2, 200, 200, 16, block_size=16)


def test_masked_query_tiles_with_one_pattern_run_batched():
    """Interior query tiles of a band mask see translated copies of one PARTIAL pattern: they run as one masked
    group (sparse._Group.spans); tiles whose rows could end up with no key, or whose masks differ by batch or
    head, stay out. Values and gradients against the float64 reference, GQA and a short last key tile too."""
    n, block = 200, 16
    for mask in (Window(5, 2), Causal() & Window(20, None), ChunkWindow(12, 1, 0), Window(-3, 8)):
        plan = zs._plan(mask, None, 2, 4, 2, n, n, block, block, "cpu")
        masked = [grp for grp in plan[0].groups or [] if grp.spans]
        assert masked and sum(grp.q_tiles.numel() for grp in plan[0].groups) + len(plan[0].rest) == 13, mask
        check(mask, 2, 4, 2, n, n, 16, block_size=block)
    # Segments with two padding tokens (id -1) at the start of every 16-token segment: the same pattern in
    # every tile, but two rows of each see no key, so no tile may join a masked group (it would divide by 0)
    ids = torch.arange(n) // 16
    ids[torch.arange(n) % 16 < 2] = -1
    plan = zs._plan(Segments(ids), None, 1, 1, 1, n, n, block, block, "cpu")
    assert not any(grp.spans for grp in plan[0].groups or []) and len(plan[0].rest) == 13
    check(Segments(ids), 1, 2, 1, n, n, 16, block_size=block)
    # a mask per batch row: one plan slice each, whose periodic patterns (segments of 7 and 9 tokens) group
    # inside the slice
    ids = torch.arange(n)[None].expand(2, n) // torch.tensor([[7], [9]])
    plan = zs._plan(Segments(ids), None, 2, 2, 2, n, n, block, block, "cpu")
    assert len(plan) == 2 and all(any(grp.spans for grp in sl.groups or []) for sl in plan)
    check(Segments(ids), 2, 2, 2, n, n, 16, block_size=block)


def test_time_falls_with_kept_fraction():
    torch.manual_seed(0)
    n = 1024
    q, k, v = (torch.randn(1, 4, n, 64) for _ in range(3))
    sparse = _random_blocks(n, n, 128, 0.12, seed=1)
    dense = BlockSparse(torch.ones(8, 8, dtype=torch.bool), 128)
    # Paired rounds in rotating order (the benchmarks' method): a burst of load on the shared CI machine
    # slows both sides of a round alike instead of one median.
    from zoo.bench.timing import interleaved_samples, paired_ratio

    samples = interleaved_samples(
        {name: (lambda mask=mask: block_sparse_attention(q, k, v, mask)) for name, mask in (("sparse", sparse), ("dense", dense))},
        repeats=9, warmup=1, min_time=0.02,
    )
    ratio = paired_ratio(samples["sparse"], samples["dense"])
    kept = sparse.block_map(n, n, 128).kept_fraction()
    assert kept < 0.2
    assert ratio < 0.6, f"{kept:.0%} kept tiles took {ratio:.2f} of the dense time"


# --------------------------------------------------------------------------------------------------
# Backend registration and automatic choice
# --------------------------------------------------------------------------------------------------
def _chosen(q, k, v, mask, bias=None, score="softmax", dropout_p=0.0, return_weights=False):
    args = (q, k, v, mask, bias, q.shape[-1] ** -0.5, score, dropout_p, return_weights)
    return zb.select_backend(args, zb.requested_backend(None)).name


def test_automatic_choice_on_cpu():
    n = 1024
    q = torch.randn(1, 2, n, 32)
    assert "blocksparse" in zb.list_backends()
    assert _chosen(q, q, q, Window(64, 64)) == "blocksparse"
    assert _chosen(q, q, q, _random_blocks(n, n, 128, 0.3)) == "blocksparse"
    assert _chosen(q, q, q, Radial(16, 64, block_size=128)) == "blocksparse"
    assert _chosen(q, q, q, Full()) == "sdpa"
    assert _chosen(q, q, q, Causal()) == "sdpa"  # square causal: SDPA's causal kernel
    assert _chosen(q, q, q, Window(600, 600)) == "sdpa"  # kept fraction above the threshold
    assert _chosen(q, q, q, Window(64, 64), dropout_p=0.1) == "sdpa"
    assert _chosen(q, q, q, Window(64, 64), score="sigmoid") == "blocksparse"
    small = torch.randn(1, 2, 200, 32)
    assert _chosen(small, small, small, Window(4, 4)) == "sdpa"  # below AUTO_MIN_CELLS
    with use_backend("blocksparse"):  # forced: runs any mask, even dense ones
        assert _chosen(small, small, small, Full()) == "blocksparse"
        with pytest.raises(ValueError, match="dropout"):
            _chosen(small, small, small, Full(), dropout_p=0.1)



def test_one_mask_object_serves_calls_with_different_tile_sizes():
    """Plans are cached per mask object and problem size; the tile size is part of the key: the same mask run at
    block_size 16, then 32, then (16, 32) plans tiles of the size asked for each time (a plan cached at one tile
    size and read at another ignored block_size from the second call on), and matches the float64 reference."""
    nq, nk = 97, 130
    mask = Window(5, 2)  # no native tile size
    for block in (16, 32, (16, 32)):
        block_q, block_k = (block, block) if isinstance(block, int) else block
        plan = zs._plan(mask, None, 1, 2, 2, nq, nk, block_q, block_k, "cpu")
        assert plan[0].block_q == block_q and plan[0].block_k == block_k, block
        assert [(t.r0, t.r1) for t in plan[0].tiles][:2] == [(0, block_q), (block_q, 2 * block_q)], block
        check(mask, 1, 2, 2, nq, nk, 16, block_size=block)


def test_automatic_choice_takes_a_non_square_causal_mask():
    """Only the square Causal is left to SDPA's causal kernel: a Causal mask with Nq != Nk whose kept-tile
    fraction is low (1024 queries on 512 keys: 0.31) is a sparse problem like any other, and runs here, with the
    torch backend's values."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 1024, 32, generator=g)
    k, v = torch.randn(1, 2, 512, 32, generator=g), torch.randn(1, 2, 512, 32, generator=g)
    assert Causal().block_map(1024, 512, 128, 128, "cpu").kept_fraction() < zs.AUTO_MAX_KEPT
    assert _chosen(q, k, v, Causal()) == "blocksparse"
    assert _chosen(q, q, q, Causal()) == "sdpa"
    torch.testing.assert_close(attend(q, k, v, Causal()), attend(q, k, v, Causal(), backend="torch"),
                               rtol=1e-5, atol=1e-6)

def test_attend_automatic_matches_reference():
    g = torch.Generator().manual_seed(0)
    n = 600
    q, k, v = (torch.randn(1, 2, n, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = Window(40, 10)
    assert _chosen(q, k, v, mask) == "blocksparse"
    out = attend(q, k, v, mask)
    ref = attend(q, k, v, mask, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # inference path (no autograd state kept)
        torch.testing.assert_close(attend(q, k, v, mask), ref.detach(), rtol=1e-10, atol=1e-10)


def _each_call_against_the_reference(mask, calls):
    """Run ``calls`` [(q, k, v, bias)] in turn on the one ``mask`` object through the block-sparse backend, each
    against the float64 reference backend ("torch"): the plan cached on the mask by one call must not be served to
    a later call of another shape."""
    for index, (q, k, v, bias) in enumerate(calls):
        got = attend(q, k, v, mask, bias, backend="blocksparse")
        want = attend(q, k, v, mask, bias, backend="torch")
        err = float((got - want).abs().max())
        assert err <= 1e-10, f"call {index} (kv heads {k.shape[1]}, bias {None if bias is None else tuple(bias.shape)}): " \
                             f"max error {err:.3g}"


@pytest.mark.parametrize("per_head", [False, True], ids=["shared-mask", "per-head-mask"])
def test_one_mask_object_serves_calls_with_different_kv_head_counts(per_head):
    """One mask object (a module-level Window, one mask passed to every layer) used by grouped-query attention
    and by full multi-head attention at the same lengths: the cached plan holds the key/value head slices, so it
    depends on Hkv. With Hkv left out of the plan key, the Hkv = 4 call after an Hkv = 2 call read 2 of the 4
    key/value heads, silently (max error 3.5 on random data; mutation audit 2026-12-07, S10). A per-head Dense
    mask covers the plan's one-head-at-a-time branch (head j reads key/value head j // (H / Hkv))."""
    g = torch.Generator().manual_seed(3)
    n, heads = 150, 4
    mask = Dense(torch.rand(1, heads, n, n, generator=g) < 0.3) if per_head else Window(40, 0)
    q = torch.randn(1, heads, n, 16, generator=g, dtype=torch.float64)
    kv = {hkv: (torch.randn(1, hkv, n, 16, generator=g, dtype=torch.float64),
                torch.randn(1, hkv, n, 16, generator=g, dtype=torch.float64)) for hkv in (1, 2, 4)}
    _each_call_against_the_reference(mask, [(q, *kv[hkv], None) for hkv in (2, 4, 1, 2, 4)])


def test_one_mask_object_serves_calls_with_different_bias_shapes():
    """A padded batch (Segments of batch 2) used with and without a bias, and with biases of other shapes (a
    relative-position bias shared over the batch, one per sample and head): the cached plan's bias slices and
    batched groups depend on the bias shape. With the bias shape left out of the plan key, the biased call after an
    unbiased one failed with a broadcast RuntimeError (mutation audit 2026-12-07, S13)."""
    g = torch.Generator().manual_seed(4)
    n, heads = 150, 2
    mask = Segments.from_lengths([150, 90])
    q, k, v = (torch.randn(2, heads, n, 16, generator=g, dtype=torch.float64) for _ in range(3))
    biases = {shape: torch.randn(*shape, generator=g, dtype=torch.float64)
              for shape in [(2, 1, n, n), (1, 1, n, n), (2, heads, n, n), (1, heads, 1, n)]}
    order = [None, (2, 1, n, n), (1, 1, n, n), (2, heads, n, n), None, (1, heads, 1, n), (2, 1, n, n)]
    _each_call_against_the_reference(mask, [(q, k, v, None if shape is None else biases[shape]) for shape in order])


def test_bad_arguments():
    q = torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="block_size"):
        block_sparse_attention(q, q, q, Causal(), block_size=0)
    with pytest.raises(TypeError, match="bias"):
        block_sparse_attention(q, q, q, Causal(), bias=torch.ones(10, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="heads"):
        block_sparse_attention(q, torch.randn(1, 3, 10, 8), torch.randn(1, 3, 10, 8))
    with pytest.raises(ValueError, match="Dense mask"):
        block_sparse_attention(q, q, q, torch.ones(9, 10, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backward_inside", [False, True], ids=["backward_after", "backward_inside"])
def test_every_backend_under_autocast_is_as_close_as_sdpa(dtype, backward_inside):
    """fp32 inputs under torch.autocast (as a model's fp32 activations meet attend() there): every backend
    returns the autocast dtype, as SDPA, within 2x SDPA's error against float64, with finite gradients of
    SDPA's accuracy for the fp32 inputs. The block-sparse backend, which attend() picks itself for a sparse
    mask at this length, failed ("index_copy_(): ... Float and ... BFloat16": autocast lowered its fp32 tile
    products) or gave NaN rows in fp16 (its shift-free exp overflowed); the reference backend rounded fp32
    inputs' scores to the autocast dtype (2-3x SDPA's error, and return_weights changed the output)."""
    g = torch.Generator().manual_seed(0)
    n, d = 1024, 16
    q, k = (2 * torch.randn(1, 2, n, d, generator=g) for _ in range(2))
    v = torch.randn(1, 2, n, d, generator=g)
    mask = Window(16, 16)  # 256x256 cells or more, under 60% of the tiles kept: attend() picks blocksparse
    assert zb.select_backend((q, k, v, mask, None, d ** -0.5, "softmax", 0.0, False), None).name == "blocksparse"
    dense = mask.dense(n, n, "cpu")
    want = naive_attention(q.double(), k.double(), v.double(), dense, None, d ** -0.5, "softmax")
    grad_out = torch.randn(1, 2, n, d, generator=g)

    def run(call):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        with torch.autocast("cpu", dtype=dtype):
            out = call(*leaves)
            if backward_inside:
                out.backward(grad_out.to(out.dtype))
        if not backward_inside:
            out.backward(grad_out.to(out.dtype))
        return out, [t.grad for t in leaves]

    sdpa, sdpa_grads = run(lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(a, b, c, attn_mask=dense))
    leaves64 = [t.double().requires_grad_(True) for t in (q, k, v)]
    naive_attention(*leaves64, dense, None, d ** -0.5, "softmax").backward(grad_out.double())
    sdpa_err = float((sdpa.double() - want).abs().max())
    sdpa_grad_err = max(float((a.double() - b.grad).abs().max()) for a, b in zip(sdpa_grads, leaves64))
    for backend in ("blocksparse", "torch", None):
        out, grads = run(lambda a, b, c: attend(a, b, c, mask, backend=backend))
        assert out.dtype == sdpa.dtype == dtype, backend
        assert float((out.double() - want).abs().max()) <= 2 * sdpa_err, backend
        for grad, ref in zip(grads, leaves64):
            assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), backend
            assert float((grad.double() - ref.grad).abs().max()) <= 2 * sdpa_grad_err + 1e-3, backend
    with torch.autocast("cpu", dtype=dtype):
        out, _ = attend(q, k, v, mask, return_weights=True)
    assert float((out.double() - want).abs().max()) <= 2 * sdpa_err


def test_torch_func_refusal_names_the_transform():
    """Forced inside torch.func.grad, the block-sparse backend said "tracing / export", which the caller was not
    doing; automatic selection falls back and gives the reference's gradient."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    with pytest.raises(ValueError, match="a torch.func transform"):
        torch.func.grad(lambda t: attend(t, k, v, Window(5, 5), backend="blocksparse").sum())(q)
    got = torch.func.grad(lambda t: attend(t, k, v, Window(5, 5)).sum())(q)
    want = torch.func.grad(lambda t: attend(t, k, v, Window(5, 5), backend="torch").sum())(q)
    torch.testing.assert_close(got, want)
