"""attend(..., return_lse=True) and merge_attention_states: the row log-sum-exp of every backend that gives it, its
gradient, and the merge of calls over disjoint key sets, against a float64 reference written from the definition
(torch.logsumexp over the masked, scaled, biased scores; the Triton backend's case is in test_kernels_flash.py)."""
from __future__ import annotations

import math

import pytest
import torch

import zoo.attention as za
from zoo.attention import BlockSparse, Causal, Dense, Segments, Window, attend, merge_attention_states
from zoo.attention import backends as zb
from zoo.attention import core as zcore

from attention_reference import naive_attention  # tests/attention_reference.py


def make_qkv(b, h, hkv, nq, nk, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, nk, d, generator=g, dtype=dtype)
    return q, k, v


def reference_lse(q, k, allowed, bias, scale):
    """float64 log sum_j exp(scale q.k_j + bias_j) over allowed j (-inf for a row with none), by torch.logsumexp."""
    groups = q.shape[1] // k.shape[1]
    s = q.double() @ k.double().repeat_interleave(groups, 1).transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.double()
    return torch.logsumexp(s.masked_fill(~allowed.expand_as(s), -math.inf), dim=-1)


def masks(nq, nk):
    g = torch.Generator().manual_seed(3)
    ids_q = torch.sort(torch.randint(0, 3, (2, nq), generator=g), dim=-1).values
    ids_k = torch.sort(torch.randint(0, 3, (2, nk), generator=g), dim=-1).values
    ids_q[0, -3:] = 7  # rows whose segment has no key: LSE -inf, zero gradient
    blocks = torch.rand(-(-nq // 32), -(-nk // 32), generator=g) < 0.4
    blocks[0] = False  # a query block with no kept tile
    return {
        "full": None,
        "causal": Causal(),
        "window": Window(20, 3),
        "segments": Segments(ids_q, ids_k),
        "blocksparse": BlockSparse(blocks, 32),
        "dense": Dense(torch.rand(nq, nk, generator=g) < 0.5),
    }


def _weights(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("backend", ["torch", "blocksparse"])
@pytest.mark.parametrize("mask_name", ["full", "causal", "window", "segments", "blocksparse", "dense"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_lse_and_its_gradients_match_the_definition(backend, mask_name, with_bias):
    """out and lse against float64 references, and the gradients of a loss on both (q, k, v, bias): lse's gradient
    in the scores is the softmax weights, so an error in it shows in every input's gradient. Nq != Nk, lengths off
    the tile size, GQA, a bias broadcast over the batch; rows with no allowed key give -inf and no gradient."""
    nq, nk, d = 77, 101, 16
    q, k, v = make_qkv(2, 4, 2, nq, nk, d)
    mask = masks(nq, nk)[mask_name]
    bias = _weights((1, 4, nq, nk), 5) if with_bias else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v) + ((bias,) if with_bias else ())]
    allowed = za.as_mask(mask).dense(nq, nk, "cpu")
    scale = 0.3
    out, lse = attend(*leaves[:3], mask, leaves[3] if with_bias else None, scale=scale, return_lse=True,
                      backend=backend)
    assert lse.shape == (2, 4, nq) and lse.dtype == torch.float64
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v) + ((bias,) if with_bias else ())]
    want_lse = reference_lse(ref_leaves[0], ref_leaves[1], allowed, ref_leaves[3] if with_bias else None, scale)
    want_out = naive_attention(*ref_leaves[:3], allowed, ref_leaves[3] if with_bias else None, scale, "softmax")
    empty = torch.isinf(want_lse)
    assert torch.equal(torch.isinf(lse), empty) and bool((lse[empty] < 0).all())
    assert empty.any() == (mask_name in ("segments", "blocksparse"))  # the cases that have such rows
    torch.testing.assert_close(lse[~empty], want_lse[~empty], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out, want_out, atol=1e-10, rtol=1e-10)
    w_out, w_lse = _weights(out.shape, 1), _weights(lse.shape, 2)

    def loss(o, lse_):
        return (o * w_out).sum() + (lse_.masked_fill(empty, 0.0) * w_lse).sum()

    grads = torch.autograd.grad(loss(out, lse), leaves)
    want = torch.autograd.grad(loss(want_out, want_lse), ref_leaves)
    for name, got, ref in zip("qkvb", grads, want):
        torch.testing.assert_close(got, ref, atol=1e-9, rtol=1e-9, msg=f"gradient of {name}")


@pytest.mark.parametrize("backend", ["torch", "blocksparse"])
def test_calls_over_disjoint_keys_merge_into_one_call(backend):
    """Chunked prefill / ring attention: attend() over two halves of the keys, merged, equals attend() over all the
    keys, output, LSE and gradients (the mask of each half is the full call's mask restricted to its columns)."""
    nq, nk, d = 40, 90, 8
    q, k, v = make_qkv(1, 2, 1, nq, nk, d, seed=1)
    allowed = Window(15, 15).dense(nq, nk, "cpu")
    allowed[:, :, :5] = False  # rows 0-4 see keys 50.. only: empty in the first half, not in the second
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    cut = 50
    parts = [
        attend(leaves[0], leaves[1][:, :, sl], leaves[2][:, :, sl], Dense(allowed[..., sl]), return_lse=True,
               backend=backend)
        for sl in (slice(0, cut), slice(cut, nk))
    ]
    out, lse = merge_attention_states(*parts[0], *parts[1])
    whole_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want_out, want_lse = attend(*whole_leaves, Dense(allowed), return_lse=True, backend="torch")
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=1e-12)
    w = _weights(out.shape, 4)
    for got, ref in zip(torch.autograd.grad((out * w).sum() + lse.sum(), leaves),
                        torch.autograd.grad((want_out * w).sum() + want_lse.sum(), whole_leaves)):
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)


def test_merge_keeps_rows_empty_in_both_halves_and_saturated_lses():
    out_a, out_b = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    inf = math.inf
    lse_a = torch.tensor([[[-inf, 0.5, -inf]]])
    lse_b = torch.tensor([[[-inf, -inf, 2.0]]])
    lse_a.requires_grad_()
    out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert torch.equal(out[0, 0, 0], torch.zeros(4)) and lse[0, 0, 0] == -inf
    torch.testing.assert_close(out[0, 0, 1], out_a[0, 0, 1])
    torch.testing.assert_close(out[0, 0, 2], out_b[0, 0, 2])
    assert lse[0, 0, 1] == 0.5 and lse[0, 0, 2] == 2.0
    (grad,) = torch.autograd.grad(out.sum() + lse.sum(), lse_a)
    assert torch.isfinite(grad).all()  # no 0 * inf from the empty row's log(0)
    # every key of both halves at finfo.min: the LSEs saturate (lse + log 2 == lse); weights still sum to one
    low = torch.full((1, 1, 1), torch.finfo(torch.float32).min)
    merged, _ = merge_attention_states(out_a[..., :1, :], low, out_b[..., :1, :], low)
    torch.testing.assert_close(merged, (out_a[..., :1, :] + out_b[..., :1, :]) / 2)


def test_merge_refuses_mismatched_shapes():
    out, lse = torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="out_b"):
        merge_attention_states(out, lse, torch.zeros(1, 2, 3, 5), lse)
    with pytest.raises(ValueError, match="lse_a"):
        merge_attention_states(out, lse[..., :2], out, lse)
    with pytest.raises(TypeError, match="lse_b"):
        merge_attention_states(out, lse, out, torch.zeros(1, 2, 3, dtype=torch.long))


def test_merge_broadcasts_an_lse_shared_over_the_batch():
    g = torch.Generator().manual_seed(8)
    out_a, out_b = torch.randn(3, 2, 4, 8, generator=g), torch.randn(3, 2, 4, 8, generator=g)
    lse_a, lse_b = torch.randn(1, 2, 4, generator=g), torch.randn(1, 2, 4, generator=g)
    out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b)
    for i in range(3):
        want_out, want_lse = merge_attention_states(out_a[i:i + 1], lse_a, out_b[i:i + 1], lse_b)
        torch.testing.assert_close(out[i:i + 1], want_out)
        torch.testing.assert_close(lse, want_lse)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "blocksparse", None])
def test_half_inputs_give_an_fp32_lse(dtype, backend):
    q, k, v = make_qkv(1, 2, 2, 33, 45, 16, dtype=dtype, seed=2)
    out, lse = attend(q, k, v, Causal(), return_lse=True, backend=backend)
    assert out.dtype == dtype and lse.dtype == torch.float32
    want = reference_lse(q, k, Causal().dense(33, 45, "cpu"), None, 0.25)
    torch.testing.assert_close(lse.double(), want, atol=1e-5, rtol=1e-5)  # scores in fp32 from half inputs


def test_autocast_gives_the_lse_of_the_autocast_inputs():
    q, k, v = make_qkv(1, 2, 1, 20, 20, 16, dtype=torch.float32, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, lse = attend(q, k, v, return_lse=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    want = reference_lse(q.bfloat16(), k.bfloat16(), torch.ones(1, 1, 20, 20, dtype=torch.bool), None, 0.25)
    torch.testing.assert_close(lse.double(), want, atol=1e-5, rtol=1e-5)


def test_chunked_reference_rows_and_dropout(monkeypatch):
    """The reference backend in several query chunks (with checkpointing under autograd) gives the LSE of every
    row; with dropout the LSE is that of the scores before dropout (the same with any seed)."""
    monkeypatch.setattr(zcore, "CHUNK_ELEMENTS", 2 * 3 * 7 * 50)  # 7 rows per chunk
    q, k, v = make_qkv(2, 3, 3, 30, 50, 8, seed=4)
    leaf = q.clone().requires_grad_()
    _, lse = attend(leaf, k, v, Window(4, 4), return_lse=True, backend="torch")
    want_leaf = q.clone().requires_grad_()
    want = reference_lse(want_leaf, k, Window(4, 4).dense(30, 50, "cpu"), None, 8 ** -0.5)
    torch.testing.assert_close(lse, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(lse.sum(), leaf)[0], torch.autograd.grad(want.sum(), want_leaf)[0])
    monkeypatch.undo()
    torch.manual_seed(0)
    _, dropped = attend(q, k, v, return_lse=True, dropout_p=0.5)
    torch.testing.assert_close(dropped, attend(q, k, v, return_lse=True)[1], atol=0, rtol=0)


@pytest.mark.parametrize("shape", [(0, 2, 5, 8, 6), (2, 2, 0, 8, 6), (2, 2, 5, 8, 0)])
def test_empty_inputs(shape):
    b, h, nq, d, nk = shape
    q, k, v = make_qkv(b, h, h, nq, nk, d)
    leaf = q.clone().requires_grad_()
    out, lse = attend(leaf, k, v, return_lse=True)
    assert out.shape == (b, h, nq, d) and lse.shape == (b, h, nq) and lse.dtype == torch.float64
    assert bool((lse == -math.inf).all())
    (grad,) = torch.autograd.grad(out.sum() + lse.masked_fill(torch.isinf(lse), 0).sum(), leaf)
    assert torch.equal(grad, torch.zeros_like(q))


def test_sdpa_is_passed_by_and_refuses_when_named():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="'sdpa' cannot run this call: return_lse=True .*torch"):
        attend(q, k, v, return_lse=True, backend="sdpa")
    with pytest.raises(ValueError, match="'sdpa' cannot run this call: return_lse"):
        attend(q, k[:, :, :0], v[:, :, :0], return_lse=True, backend="sdpa")  # also for an empty call
    calls = []

    def forward(*args):
        calls.append(args)
        return zcore.attention_reference(*args)

    zb.register_backend("no_lse", forward, lambda *a: None, priority=500)  # outranks every built-in backend
    try:
        attend(q, k, v)
        assert len(calls) == 1
        out, lse = attend(q, k, v, return_lse=True)  # passed by: its forward takes no return_lse
        assert len(calls) == 1 and lse.shape == (1, 2, 8)
        with pytest.raises(ValueError, match="'no_lse' cannot run this call: return_lse"):
            attend(q, k, v, return_lse=True, backend="no_lse")
    finally:
        zb._BACKENDS.pop("no_lse")


def test_a_backend_registered_with_returns_lse_is_asked_for_it():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 8, dtype=torch.float32)
    seen = []

    def forward(*args, return_lse=False):
        seen.append(return_lse)
        return zcore.attention_reference(*args, return_lse=return_lse)

    zb.register_backend("with_lse", forward, lambda *a: None, priority=500, returns_lse=True)
    try:
        out, lse = attend(q, k, v, return_lse=True)
        attend(q, k, v)
        assert seen == [True, False]
        torch.testing.assert_close(lse.double(), reference_lse(q, k, torch.ones(1, 1, 8, 8, dtype=torch.bool),
                                                               None, 8 ** -0.5))
    finally:
        zb._BACKENDS.pop("with_lse")
    with pytest.raises(TypeError, match="returns_lse must be True or False"):
        zb.register_backend("bad", forward, lambda *a: None, returns_lse="yes")
    assert "bad" not in zb._BACKENDS


def test_bad_requests_are_refused():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="score='softmax' only"):
        attend(q, k, v, score="sigmoid", return_lse=True)
    with pytest.raises(ValueError, match="return_weights=True and return_lse=True"):
        attend(q, k, v, return_weights=True, return_lse=True)
    with pytest.raises((TypeError, ValueError), match="return_lse"):
        attend(q, k, v, return_lse="no")
    assert isinstance(attend(q, k, v, return_lse=False), torch.Tensor)


@pytest.mark.parametrize("backend", ["torch", "blocksparse"])
def test_chunked_prefill_over_a_cache_as_docs_core_shows(backend):
    """docs/core.md's example: the cached prefix (every key visible) and the new tokens among themselves (Causal),
    merged, are attend() over [cache, new] with Causal() (bottom-right aligned), output and gradients."""
    q, k, v = make_qkv(2, 4, 2, 24, 24 + 50, 8, seed=6)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    q_, k_, v_ = leaves
    past = attend(q_, k_[:, :, :50], v_[:, :, :50], return_lse=True, backend=backend)
    new = attend(q_, k_[:, :, 50:], v_[:, :, 50:], Causal(), return_lse=True, backend=backend)
    out, lse = merge_attention_states(*past, *new)
    whole = [t.clone().requires_grad_() for t in (q, k, v)]
    want = attend(*whole, Causal(), backend="torch")
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, reference_lse(q, k, Causal().dense(24, 74, "cpu"), None, 8 ** -0.5))
    for got, ref in zip(torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(want.sum(), whole)):
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "blocksparse"])
def test_a_non_finite_lse_gradient_on_a_row_without_keys_stays_there(backend):
    """A hand-written merge by logaddexp sends a NaN gradient into the LSE of a row with no allowed key (-inf);
    that row has no weight on any key, so the gradients of q, k, v stay those of the reference (the block-sparse
    backward once folded the NaN into every key's gradient)."""
    q, k, v = make_qkv(1, 2, 2, 20, 20, 16, seed=9)
    allowed = torch.ones(20, 20, dtype=torch.bool)
    allowed[3] = False
    other = torch.full((1, 2, 20), -math.inf)
    other[:, :, 5:] = 0.3
    grads = []
    for name in (backend, "torch"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = attend(*leaves, Dense(allowed), return_lse=True, backend=name)
        total = torch.logaddexp(lse, other.double())
        loss = torch.where(torch.isfinite(total), total, 0.0).sum() + out.sum()
        grads.append(torch.autograd.grad(loss, leaves))
    for got, want in zip(*grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_block_sparse_batched_groups_give_the_lse_and_its_gradient(monkeypatch):
    """N = 640 with a Window and no bias: the block-sparse backend batches the interior query tiles (one shared
    element-wise pattern) in _forward_group / _backward_group, whose LSE and its gradient fold are checked here."""
    from zoo.attention import sparse as zsparse

    calls = {"forward": 0, "backward": 0}
    for name, key in (("_forward_group", "forward"), ("_backward_group", "backward")):
        original = getattr(zsparse, name)

        def counted(*args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(zsparse, name, counted)
    q, k, v = make_qkv(1, 2, 1, 640, 640, 16, seed=10)
    mask = Window(64, 0)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = attend(*leaves, mask, return_lse=True, backend="blocksparse")
    w_lse = _weights(lse.shape, 11)
    grads = torch.autograd.grad(out.sum() + (lse * w_lse).sum(), leaves)
    assert calls["forward"] > 0 and calls["backward"] > 0
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    want_lse = reference_lse(ref[0], ref[1], mask.dense(640, 640, "cpu"), None, 0.25)
    want_out = naive_attention(*ref, mask.dense(640, 640, "cpu"), None, 0.25, "softmax")
    torch.testing.assert_close(lse, want_lse, atol=1e-10, rtol=1e-10)
    for got, want in zip(grads, torch.autograd.grad(want_out.sum() + (want_lse * w_lse).sum(), ref)):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
