"""attend() against a naive float64 reference: every mask type, bias, GQA, sigmoid, forward and
gradients, awkward shapes, backend selection, and clear errors for bad input."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import zoo.attention as za
from zoo.attention import (
    AttentionBias,
    BlockSparse,
    Causal,
    ChunkWindow,
    Dense,
    Full,
    Segments,
    Window,
    attend,
    capture_attention,
    use_backend,
)
from zoo.attention import backends as zb
from zoo.attention import core as zcore

from attention_reference import naive_attention  # tests/attention_reference.py (pytest puts tests/ on sys.path)


def make_qkv(b, h, hkv, nq, nk, d, dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    dv = dv or d
    q = torch.randn(b, h, nq, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, nk, dv, generator=g, dtype=dtype)
    return q, k, v


def random_block_sparse(nq, nk, block, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    qb, kb = math.ceil(nq / block), math.ceil(nk / block)
    return BlockSparse(torch.rand(qb, kb, generator=g) < density, block)


def masks_for(nq, nk, batch):
    g = torch.Generator().manual_seed(1)
    ids_q = torch.sort(torch.randint(0, 3, (batch, nq), generator=g), dim=-1).values
    ids_k = torch.sort(torch.randint(0, 3, (batch, nk), generator=g), dim=-1).values
    ids_k[:, -1] = -1  # a padding key
    return {
        "full": None,
        "causal": Causal(),
        "window": Window(5, 2),
        "segments": Segments(ids_q, ids_k),
        "dense": Dense(torch.rand(nq, nk, generator=g) < 0.7),
        "blocksparse": random_block_sparse(nq, nk, 16, 0.5),
        "and": Causal() & Window(9, None),
        "or": Window(1, 1) | Segments(ids_q, ids_k),
        "chunks": ChunkWindow(4, 1, 0),
        "chunks&segments": ChunkWindow(3) & Segments(ids_q, ids_k),
    }


SHAPES = [
    # b, h, hkv, nq, nk, d
    (1, 2, 2, 1, 7, 16),
    (2, 4, 2, 7, 7, 32),
    (1, 4, 1, 97, 130, 40),
    (2, 2, 2, 130, 97, 64),
    (1, 3, 3, 33, 33, 96),
]


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(
    "mask_name",
    ["full", "causal", "window", "segments", "dense", "blocksparse", "and", "or", "chunks", "chunks&segments"],
)
def test_forward_matches_float64_reference(backend, shape, mask_name):
    b, h, hkv, nq, nk, d = shape
    q, k, v = make_qkv(b, h, hkv, nq, nk, d)
    mask = masks_for(nq, nk, b)[mask_name]
    bias = torch.randn(1, h, nq, nk) * 0.5
    out = attend(q, k, v, mask, bias, backend=backend)
    allowed = za.as_mask(mask).dense(nq, nk)
    expected = naive_attention(q, k, v, allowed, bias, 1 / math.sqrt(d), "softmax")
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("mask_name", ["full", "causal", "segments", "blocksparse", "or"])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_gradients_match_float64_reference(mask_name, score):
    b, h, hkv, nq, nk, d = 2, 4, 2, 23, 31, 16
    q, k, v = make_qkv(b, h, hkv, nq, nk, d, dv=24, dtype=torch.float64)
    bias = torch.randn(b, 1, nq, nk, dtype=torch.float64)
    mask = masks_for(nq, nk, b)[mask_name]
    allowed = za.as_mask(mask).dense(nq, nk)
    inputs = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    out = attend(*inputs[:3], mask, inputs[3], score=score, backend="torch")
    expected = naive_attention(*ref_inputs[:3], allowed, ref_inputs[3], 1 / math.sqrt(d), score)
    grad_out = torch.randn_like(expected)
    out.backward(grad_out)
    expected.backward(grad_out)
    torch.testing.assert_close(out, expected)
    for name, a, e in zip("qkv" + "b", inputs, ref_inputs):
        torch.testing.assert_close(a.grad, e.grad, msg=lambda m: f"grad {name}: {m}")


def test_sigmoid_score_forward():
    q, k, v = make_qkv(2, 4, 4, 13, 17, 32)
    mask = Window(3, 3)
    out = attend(q, k, v, mask, score="sigmoid")
    expected = naive_attention(q, k, v, mask.dense(13, 17), None, 1 / math.sqrt(32), "sigmoid")
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-4)


# Every backend registered on this machine, and automatic selection (None: attend()'s plain-call shortcuts to SDPA,
# with and without a bias, and the general dispatch). "triton" runs on CPU only under the interpreter, whose set-up
# lives in tests/test_kernels_flash.py: test_attend_uses_the_explicit_scale_in_the_kernel covers it there.
# every general backend on CPU; "edges" serves Edges masks only (tests/test_edges_mask.py runs it against the same
# references: values, gradients, scales, empty inputs)
CPU_BACKENDS = [None] + [name for name in za.list_backends() if name not in ("triton", "edges")]


@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=lambda b: b or "auto")
@pytest.mark.parametrize("mask_name", ["none", "causal", "window"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("scale", [0.6, 0.05, 0.0, -0.7])
def test_explicit_scale_is_used_by_every_backend(backend, mask_name, with_bias, scale):
    """scale= replaces the default 1/sqrt(D) (here 1/4) on every path: a large and a small scale, both far from it,
    so a backend that fell back to the default, or applied the scale twice, misses the float64 reference. Zero
    (uniform weights over the allowed keys) and a negative scale too, as SDPA computes them (attend() refused
    both: "scale must be a positive finite number"). SDPA's CPU flash kernel returns NaN for is_causal=True at such
    a scale (torch 2.11): the causal rows here check that attend() hands SDPA the dense mask instead."""
    q, k, v = make_qkv(2, 2, 1, 40, 40, 16, seed=3)  # Nq == Nk: Causal takes SDPA's is_causal kernel
    mask = {"none": None, "causal": Causal(), "window": Window(6, 2)}[mask_name]
    bias = torch.randn(1, 2, 40, 40, generator=torch.Generator().manual_seed(4)) if with_bias else None
    want = naive_attention(q, k, v, za.as_mask(mask).dense(40, 40), bias, scale, "softmax")
    got = attend(q, k, v, mask, bias, scale=scale, backend=backend)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_fully_masked_rows_are_zero_with_zero_grads(backend):
    nq, nk = 6, 5
    q, k, v = make_qkv(1, 2, 2, nq, nk, 16)
    ids_q = torch.tensor([0, 0, 5, 1, -1, 1])  # id 5 and -1 have no key
    ids_k = torch.tensor([0, 1, 1, 0, 2])
    q.requires_grad_()
    out = attend(q, k, v, Segments(ids_q, ids_k), backend=backend)
    assert torch.isfinite(out).all()
    assert out[0, :, 2].abs().max() == 0 and out[0, :, 4].abs().max() == 0
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    assert q.grad[0, :, 2].abs().max() == 0


def test_causal_bottom_right_alignment_when_nq_differs():
    # 3 queries against 5 keys: the queries are the last three positions of a causal 5x5 problem.
    q, k, v = make_qkv(1, 1, 1, 3, 5, 8)
    mask = Causal().dense(3, 5)[0, 0]
    assert mask.tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, False],
        [True, True, True, True, True],
    ]
    out = attend(q, k, v, Causal())
    q_full = torch.cat([torch.randn(1, 1, 2, 8), q], dim=2)
    full = attend(q_full, k, v, Causal())
    torch.testing.assert_close(out, full[:, :, 2:])


def test_chunked_reference_equals_unchunked_and_checkpoints(monkeypatch):
    q, k, v = make_qkv(1, 2, 2, 70, 50, 16, dtype=torch.float64)
    bias = torch.randn(1, 2, 70, 50, dtype=torch.float64)
    whole = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    out_whole = attend(*whole[:3], Window(4, 4), whole[3], backend="torch")
    monkeypatch.setattr(zcore, "CHUNK_ELEMENTS", 2 * 50 * 8)  # 8 rows per chunk -> 9 chunks
    chunked = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    out_chunked = attend(*chunked[:3], Window(4, 4), chunked[3], backend="torch")
    torch.testing.assert_close(out_chunked, out_whole)
    g = torch.randn_like(out_whole)
    out_whole.backward(g)
    out_chunked.backward(g)
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a.grad, b.grad)


def test_return_weights_are_probabilities():
    q, k, v = make_qkv(2, 4, 2, 9, 11, 16)
    out, w = attend(q, k, v, Causal(), return_weights=True)
    assert w.shape == (2, 4, 9, 11)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 9))
    assert (w[..., ~Causal().dense(9, 11)[0, 0]] == 0).all()
    torch.testing.assert_close(out, attend(q, k, v, Causal(), backend="sdpa"), atol=1e-5, rtol=1e-5)


def test_bool_tensor_mask_and_bias_broadcasting():
    q, k, v = make_qkv(2, 4, 4, 8, 8, 16)
    allowed = torch.rand(8, 8) < 0.6
    allowed[:, 0] = True
    bias_row = torch.randn(1, 1, 1, 8)  # broadcast over batch, heads and queries
    out = attend(q, k, v, allowed, bias_row)
    expected = naive_attention(q, k, v, allowed[None, None], bias_row.expand(1, 1, 8, 8), 0.25, "softmax")
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-4)


class _TableBias(AttentionBias):
    """A learned 1-D relative-position table: bias[h, i, j] = table[h, j - i + N - 1]."""

    def __init__(self, heads, n):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(heads, 2 * n - 1))
        idx = torch.arange(n)[None, :] - torch.arange(n)[:, None] + n - 1
        self.register_buffer("index", idx, persistent=False)

    def materialize(self, q_len, k_len, *, device=None, dtype=None):
        return self.table[:, self.index][None]


def test_bias_object_is_materialised_and_learns():
    bias = _TableBias(2, 6)
    q, k, v = make_qkv(1, 2, 2, 6, 6, 8)
    out = attend(q, k, v, bias=bias)
    expected = naive_attention(q, k, v, torch.ones(1, 1, 6, 6, dtype=torch.bool), bias.materialize(6, 6), 8**-0.5, "softmax")
    torch.testing.assert_close(out.double(), expected.detach(), atol=1e-5, rtol=1e-4)
    out.sum().backward()
    assert bias.table.grad is not None and bias.table.grad.abs().sum() > 0


def test_backend_selection_order(monkeypatch):
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8)
    calls = []

    def spy_forward(*args):
        calls.append("spy")
        return zcore.attention_reference(*args)

    zb.register_backend("spy", spy_forward, lambda *a: None, priority=-5)
    try:
        attend(q, k, v, backend="spy")
        assert calls == ["spy"]
        with use_backend("spy"):
            attend(q, k, v)
        assert calls == ["spy", "spy"]
        monkeypatch.setenv(zb.ENV_VAR, "spy")
        attend(q, k, v)
        assert len(calls) == 3
        with use_backend("torch"):  # context beats environment
            attend(q, k, v)
        assert len(calls) == 3
        attend(q, k, v, backend="torch")  # argument beats environment
        assert len(calls) == 3
        monkeypatch.delenv(zb.ENV_VAR)
        attend(q, k, v)  # automatic: sdpa outranks spy
        assert len(calls) == 3
    finally:
        zb._BACKENDS.pop("spy")

def test_plain_call_shortcut_gives_way_to_any_other_choice(monkeypatch):
    """attend(q, k, v) goes straight to SDPA only while automatic selection would pick "sdpa" without
    asking: a higher-priority backend, a wrapped "sdpa" entry, a context or the environment turn it off."""
    q, k, v = make_qkv(1, 4, 2, 9, 11, 16)
    assert zb.sdpa_runs_plain_calls("cpu")  # blocksparse outranks sdpa on CPU but never takes a Full mask
    assert not zb.sdpa_runs_plain_calls("cuda")  # the Triton kernel decides per call there
    expected = naive_attention(q, k, v, torch.ones(1, 1, 9, 11, dtype=torch.bool), None, 16**-0.5, "softmax")
    torch.testing.assert_close(attend(q, k, v).double(), expected, atol=1e-5, rtol=1e-4)  # GQA too
    # Causal: SDPA's is_causal (top-left) only when Nq == Nk; bottom-right alignment otherwise
    for nq, nk in ((11, 11), (9, 11), (11, 9)):
        qc, kc, vc = make_qkv(1, 4, 2, nq, nk, 16, seed=nq)
        causal = Causal().dense(nq, nk, "cpu")
        want = naive_attention(qc, kc, vc, causal, None, 16**-0.5, "softmax")
        torch.testing.assert_close(attend(qc, kc, vc, Causal()).double(), want, atol=1e-5, rtol=1e-4)
    calls = []

    def spy_forward(*args):
        calls.append(args[3])
        return zcore.attention_reference(*args)

    zb.register_backend("spy", spy_forward, lambda *a: None, priority=50)
    try:
        assert not zb.sdpa_runs_plain_calls("cpu")
        torch.testing.assert_close(attend(q, k, v).double(), expected, atol=1e-5, rtol=1e-4)
        attend(q, q[:, :2], q[:, :2], Causal())
        assert len(calls) == 2 and calls[0].is_full and type(calls[1]) is Causal
    finally:
        zb._BACKENDS.pop("spy")
    assert zb.sdpa_runs_plain_calls("cpu")
    sdpa = zb._BACKENDS["sdpa"]
    wrapped = dict(calls=0)

    def wrapped_sdpa(*args):
        wrapped["calls"] += 1
        return sdpa.forward(*args)

    monkeypatch.setitem(zb._BACKENDS, "sdpa", zb.Backend("sdpa", wrapped_sdpa, sdpa.supports, sdpa.priority))
    attend(q, k, v)
    assert wrapped["calls"] == 1
    monkeypatch.undo()
    with use_backend("torch"):
        assert not zb.sdpa_runs_plain_calls("cpu")
    monkeypatch.setenv(zb.ENV_VAR, "torch")
    assert not zb.sdpa_runs_plain_calls("cpu")
    monkeypatch.setenv(zb.ENV_VAR, " auto ")
    assert zb.sdpa_runs_plain_calls("cpu")



def test_biased_plain_calls_go_straight_to_sdpa_and_give_way_otherwise(monkeypatch):
    """attend(q, k, v, bias=tensor) without a mask skips backend selection when the bias is 4-D, of q's dtype
    and device, with each dim equal or 1 (relative-position and agent biases); other biases take the general
    path (converted there). Every variant matches the float64 reference, GQA included."""
    q, k, v = make_qkv(2, 4, 2, 7, 10, 16, seed=3)
    g = torch.Generator().manual_seed(4)
    ones = torch.ones(1, 1, 7, 10, dtype=torch.bool)
    general = dict(calls=0)
    select = zb.select_backend

    def counted(*args):
        general["calls"] += 1
        return select(*args)

    monkeypatch.setattr(zb, "select_backend", counted)
    straight = [(2, 4, 7, 10), (1, 4, 7, 10), (1, 1, 7, 10), (2, 1, 1, 10), (1, 4, 7, 1)]
    converted = [(7, 10), (4, 7, 10)]
    for shape in straight + converted:
        bias = torch.randn(*shape, generator=g)
        want = naive_attention(q, k, v, ones, bias.reshape((1,) * (4 - bias.dim()) + shape), 0.25, "softmax")
        before = general["calls"]
        torch.testing.assert_close(attend(q, k, v, bias=bias).double(), want, atol=1e-5, rtol=1e-4)
        assert general["calls"] == before + (shape in converted), shape
    bias64 = torch.randn(1, 4, 7, 10, generator=g, dtype=torch.float64)  # another dtype: converted
    want = naive_attention(q, k, v, ones, bias64, 0.25, "softmax")
    torch.testing.assert_close(attend(q, k, v, bias=bias64).double(), want, atol=1e-5, rtol=1e-4)
    assert general["calls"] == len(converted) + 1
    monkeypatch.undo()
    calls = []
    zb.register_backend("spy", lambda *args: calls.append(args[4]) or zcore.attention_reference(*args),
                        lambda *a: None, priority=50)
    try:  # a backend that outranks sdpa gets the biased call too
        bias = torch.randn(1, 4, 7, 10, generator=g)
        attend(q, k, v, bias=bias)
        assert len(calls) == 1 and calls[0] is bias
    finally:
        zb._BACKENDS.pop("spy")
    with pytest.raises(TypeError, match="floating-point"):
        attend(q, k, v, bias=torch.ones(1, 1, 7, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        attend(q, k, v, bias=torch.zeros(1, 3, 7, 10))


def test_bias_that_requires_grad_reaches_sdpa_detached_when_grad_is_off(monkeypatch):
    """SDPA's CPU dispatcher picks its math kernel (3x slower for small agent stages) whenever the mask requires
    grad, even under no_grad; attend() hands it a detached bias then, and the bias still gets its gradient
    when grad mode is on."""
    q, k, v = make_qkv(1, 2, 2, 5, 9, 8, seed=5)
    bias = torch.randn(1, 2, 5, 9, generator=torch.Generator().manual_seed(6), requires_grad=True)
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("attn_mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    want = naive_attention(q, k, v, torch.ones(1, 1, 5, 9, dtype=torch.bool), bias.detach(), 8**-0.5, "softmax")
    with torch.no_grad():
        torch.testing.assert_close(attend(q, k, v, bias=bias).double(), want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(attend(q, k, v, Window(2, 2), bias=bias).shape, want.shape)  # general path
    assert len(seen) == 2 and not any(m.requires_grad for m in seen)
    out = attend(q, k, v, bias=bias)
    assert seen[-1].requires_grad
    out.square().sum().backward()
    bias64 = bias.detach().double().requires_grad_(True)
    ref = naive_attention(q, k, v, torch.ones(1, 1, 5, 9, dtype=torch.bool), bias64, 8**-0.5, "softmax")
    ref.square().sum().backward()
    torch.testing.assert_close(bias.grad.double(), bias64.grad, atol=1e-5, rtol=1e-4)


def test_automatic_choice_is_sdpa_for_softmax_and_torch_for_sigmoid():
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8)
    args = (q, k, v, Full(), None, 1.0, "softmax", 0.0, False)
    assert zb.select_backend(args, None).name in ("sdpa", "blocksparse")
    args = (q, k, v, Full(), None, 1.0, "sigmoid", 0.0, False)
    assert zb.select_backend(args, None).name != "sdpa"


def test_explicit_backend_that_cannot_run_says_why():
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8)
    with pytest.raises(ValueError, match="sdpa.*sigmoid"):
        attend(q, k, v, score="sigmoid", backend="sdpa")
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        attend(q, k, v, backend="nope")


def test_use_backend_refuses_an_unknown_name_on_entering_the_block():
    """use_backend("tirton") fails where it is written, naming the known backends, as attend(backend=...) does --
    not at the first attend() inside the block, nor never when the block makes no call (mutation audit 2026-12-07,
    B7). The refused name is not left on the context stack."""
    stack_before = list(zb._CONTEXT_STATE.stack)
    with pytest.raises(ValueError, match=r"unknown attention backend 'tirton'; available: .*torch"):
        with use_backend("tirton"):
            pass
    assert zb._CONTEXT_STATE.stack == stack_before
    with use_backend("torch"), use_backend(None):  # None: automatic choice, no name to check
        assert zb.requested_backend(None) is None


def test_capture_records_weights_only_inside_context():
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8)
    from zoo.attention.capture import is_capturing, record

    with capture_attention() as maps:
        assert is_capturing()
        _, w = attend(q, k, v, return_weights=True)
        record(None, w, name="layer0")
    assert not is_capturing()
    assert len(maps) == 1 and maps[0].name == "layer0" and maps[0].weights.shape == (1, 2, 4, 4)


def test_capture_names_records_per_capture_without_touching_modules():
    """capture_attention(model) wrote module.zoo_name on every submodule and left it there: a later capture of
    the whole model then labelled a block captured alone before as 'attn' (audit 2026-12-06)."""
    import zoo

    model = zoo.create_model("vit_debug").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        with capture_attention(model.blocks[1]):
            model(x)
        with capture_attention(model) as outer:
            with capture_attention(model.blocks[0]) as inner:
                model(x)
    assert [r.name for r in outer] == ["blocks.0.attn", "blocks.1.attn"]
    assert [r.name for r in inner] == ["attn", "MultiHeadAttention"]  # names within blocks[0]; blocks[1] is not in it
    assert not any(hasattr(m, "zoo_name") for m in model.modules())


def test_dropout_changes_output_only_when_positive():
    q, k, v = make_qkv(1, 2, 2, 16, 16, 8)
    torch.testing.assert_close(attend(q, k, v, dropout_p=0.0, backend="torch"), attend(q, k, v))
    torch.manual_seed(0)
    dropped = attend(q, k, v, dropout_p=0.5, backend="torch")
    assert not torch.allclose(dropped, attend(q, k, v))


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_reference_dropout_is_unbiased_and_weights_are_pre_dropout(score):
    """The "torch" backend's dropout is inverted dropout (torch.nn.functional.dropout, as SDPA's dropout_p): kept
    weights are scaled by 1 / (1 - p), so the output's expectation is the undropped output; and return_weights
    gives the probabilities before dropout, as attend()'s docstring says (rows of a softmax sum to 1).

    Statistics: the batch holds ``draws`` copies of one problem, each with its own dropout draw. An output element
    is sum_j w_j m_j v_j with m_j = Bernoulli(1 - p) / (1 - p) independent, of variance p / (1 - p), so the mean of
    the draws has standard deviation sigma = sqrt(p / (1 - p) * sum_j (w_j v_j)^2 / draws) (measured spread: within
    2% of it). Each of the 64 elements must lie within 5 sigma: a false failure has probability below
    64 * 6e-7 = 4e-5 for a seed (seeds 0-29 stay within 3.4 sigma), while a missing rescale moves each mean by
    p * |output|: a median of 32 sigma here, up to 50."""
    p, draws = 0.5, 4096
    q, k, v = make_qkv(1, 2, 2, 8, 8, 4, seed=5)
    bias = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(6))
    clean, weights = attend(q, k, v, Causal(), bias, score=score, backend="torch", return_weights=True)
    torch.manual_seed(0)
    batch = [t.expand(draws, -1, -1, -1) for t in (q, k, v, bias)]
    dropped = attend(*batch[:3], Causal(), batch[3], score=score, dropout_p=p, backend="torch")
    mean = dropped.double().mean(0, keepdim=True)
    terms = weights.double()[..., None] * v.double()[:, :, None]  # (1, H, Nq, Nk, Dv): w_j v_j per output
    sigma = (p / (1 - p) * terms.pow(2).sum(-2) / draws).sqrt()
    deviation = (mean - clean.double()).abs()
    assert (deviation <= 5 * sigma + 1e-6).all(), f"mean of {draws} draws is {float((deviation / sigma).max()):.1f} sigma off"
    torch.manual_seed(1)
    out, dropped_weights = attend(q, k, v, Causal(), bias, score=score, dropout_p=p, backend="torch",
                                  return_weights=True)
    assert not torch.allclose(out, clean)  # this call did drop
    torch.testing.assert_close(dropped_weights, weights, rtol=0, atol=0)  # the probabilities, not the dropped ones
    if score == "softmax":
        torch.testing.assert_close(dropped_weights.sum(-1), torch.ones(1, 2, 8))


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_reference_dropout_holds_in_query_chunks_with_gradients(score, monkeypatch):
    """Dropout is not lost when the "torch" backend splits a call into query chunks while gradients are wanted
    (B * H * Nq * Nk > CHUNK_ELEMENTS in training: sigmoid scores, backend="torch", torch.func with a bias).
    Checkpointed chunks run without dropout, so such chunks must not be checkpointed: with that guard removed,
    the chunked output equalled the undropped one exactly (mutation audit 2026-12-07, C6).

    Same problem and statistics as test_reference_dropout_is_unbiased_and_weights_are_pre_dropout (each of the 64
    output elements of the mean of 4096 draws within 5 sigma of the undropped output), here in 3 query chunks
    with q, k, v and bias requiring grad; every chunk must have dropped. The backward must use the forward's draw:
    for one draw the output is linear in v, so <grad_out, out> equals <dL/dv, v>."""
    p, draws = 0.5, 4096
    q, k, v = make_qkv(1, 2, 2, 8, 8, 4, dtype=torch.float64, seed=5)
    bias = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    clean, weights = attend(q, k, v, Causal(), bias, score=score, backend="torch", return_weights=True)
    monkeypatch.setattr(zcore, "CHUNK_ELEMENTS", draws * 2 * 8 * 3)  # 3 query rows per chunk
    chunks = zcore._row_chunks(8, 8, draws, 2)
    assert chunks == [(0, 3), (3, 6), (6, 8)]
    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    batch = [t.expand(draws, -1, -1, -1) for t in leaves]
    torch.manual_seed(0)
    dropped = attend(*batch[:3], Causal(), batch[3], score=score, dropout_p=p, backend="torch")
    for start, stop in chunks:
        rows = slice(start, stop)
        assert not torch.allclose(dropped[:, :, rows], clean[:, :, rows].expand(draws, -1, -1, -1)), (start, stop)
    mean = dropped.detach().mean(0, keepdim=True)
    terms = weights[..., None] * v[:, :, None]  # (1, H, Nq, Nk, Dv): w_j v_j per output
    sigma = (p / (1 - p) * terms.pow(2).sum(-2) / draws).sqrt()
    deviation = (mean - clean).abs()
    assert (deviation <= 5 * sigma + 1e-6).all(), f"mean of {draws} draws is {float((deviation / sigma).max()):.1f} sigma off"
    grad_out = torch.randn(dropped.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    dropped.backward(grad_out)
    torch.testing.assert_close((leaves[2].grad * v).sum(), (grad_out * dropped.detach()).sum())
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


# ---- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda: (torch.randn(2, 4, 8), torch.randn(2, 4, 8, 16), torch.randn(2, 4, 8, 16)), "q must have 4 dims"),
        (lambda: (torch.randn(1, 3, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)), "multiple of key/value heads"),
        (lambda: (torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 16)), "head dim"),
        (lambda: (torch.randn(2, 2, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)), "batch sizes differ"),
        (lambda: (torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 9, 16)), "must agree"),
        (lambda: (torch.randn(1, 2, 8, 16).half(), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)), "share a dtype"),
        (lambda: (torch.ones(1, 2, 8, 16, dtype=torch.long),) * 3, "floating-point"),
        (lambda: (torch.full((1, 2, 8, 16), float("nan")), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)), "NaN"),
        (lambda: (torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 0)),
         r"at least one head and head dims of at least 1 .*v \(1, 2, 8, 0\)"),
        (lambda: (torch.randn(1, 2, 8, 0), torch.randn(1, 2, 8, 0), torch.randn(1, 2, 8, 4)), "head dims of at least 1"),
        (lambda: (torch.randn(1, 0, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)), "at least one head"),
        # the other checks still apply to empty tensors
        (lambda: (torch.randn(0, 2, 8, 16), torch.randn(0, 2, 8, 8), torch.randn(0, 2, 8, 16)), "head dim"),
        (lambda: (torch.randn(1, 2, 0, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)), "batch sizes differ"),
        (lambda: (torch.randn(1, 2, 8, 16), torch.randn(1, 2, 0, 16).half(), torch.randn(1, 2, 0, 16)), "share a dtype"),
        (lambda: (torch.randn(1, 3, 8, 16), torch.randn(1, 2, 0, 16), torch.randn(1, 2, 0, 16)), "multiple of key/value"),
    ],
)
def test_bad_tensors_raise_clear_errors(make, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        attend(*make())


def _with_nonfinite(t: torch.Tensor, value: float, where: tuple) -> torch.Tensor:
    t = t.clone()
    t[where] = value
    return t


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("mask", [None, "causal", "window"])
def test_nonfinite_input_is_named(name, value, mask):
    """A single NaN/Inf in q, k or v (a key the mask hides included) raises naming that input."""
    q, k, v = make_qkv(2, 4, 2, 13, 13, 16)
    inputs = dict(q=q, k=k, v=v)
    inputs[name] = _with_nonfinite(inputs[name], value, (1, 1, 12, 3))  # the last token: hidden by Causal for rows < 12
    masks = {None: None, "causal": Causal(), "window": Window(2, 0)}
    with pytest.raises(ValueError, match=f"attend: {name} contains NaN or Inf"):
        attend(inputs["q"], inputs["k"], inputs["v"], masks[mask])


@pytest.mark.parametrize("backend", [None, "torch", "sdpa", "blocksparse"])
def test_nan_value_at_a_padded_key_is_named_on_every_backend(backend):
    """NaN values at keys nobody may attend (padding): the dense backends propagate them (0 * NaN), the
    block-sparse path skips their tile; each must name v, whatever the length (a fuzzer found the backends,
    and so the automatic choice by length, disagreeing)."""
    q, k, v = make_qkv(1, 1, 1, 256, 256, 16)
    v = _with_nonfinite(v, float("nan"), (0, 0, slice(128, None)))
    with pytest.raises(ValueError, match="attend: v contains NaN or Inf"):
        attend(q, k, v, Segments.from_lengths([128], max_len=256), backend=backend)


@pytest.mark.parametrize("backend", ["torch", "sdpa", "blocksparse"])
def test_negative_infinite_key_is_not_taken_for_a_masked_one(backend):
    """A -inf in k gives that key a -inf score on every backend: a key nobody attends to, with a finite output,
    so the output alone cannot tell. It must still be named."""
    q, k, v = make_qkv(1, 1, 1, 3, 3, 4)
    q = q.abs() + 0.1  # every score of key 1 is -inf
    k = _with_nonfinite(k, float("-inf"), (0, 0, 1, 0))
    with pytest.raises(ValueError, match="attend: k contains NaN or Inf"):
        attend(q, k, v, backend=backend)


@pytest.mark.parametrize("backend", [None, "torch", "sdpa", "blocksparse"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_positive_infinite_bias_is_named(backend, value):
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8)
    bias = torch.zeros(4, 4)
    bias[0, 0] = value
    with pytest.raises(ValueError, match="attend: bias contains (NaN|\\+Inf)"):
        attend(q, k, v, bias=bias, backend=backend)
    bias[0, 0] = float("-inf")  # -inf forbids a pair: valid
    assert torch.isfinite(attend(q, k, v, bias=bias, backend=backend)).all()


def test_fp16_reference_scales_before_the_product():
    """q . k past fp16's 65504 whose scaled score is not: the reference backend (every return_weights call)
    agrees with SDPA and the float64 result instead of returning NaN rows."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4, 64) * 40).half(), (torch.randn(1, 1, 4, 64) * 40).half(), torch.randn(1, 1, 4, 64).half()
    q[0, 0, 0], k[0, 0, 0] = 40.0, 40.0  # q0 . k0 = 102400
    expected = attend(q.double(), k.double(), v.double(), backend="torch")
    out, weights = attend(q, k, v, backend="torch", return_weights=True)
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(out.double(), expected, atol=2e-3, rtol=0)
    torch.testing.assert_close(attend(q, k, v, backend="sdpa").double(), expected, atol=2e-3, rtol=0)

    # a scaled score itself past 65504 (|scale q . k| ~ 1e5): the product of that chunk is taken in fp32
    g = torch.Generator().manual_seed(0)
    q, k = ((torch.randn(1, 1, 8, 64, generator=g) * 200).half() for _ in range(2))
    v = torch.randn(1, 1, 8, 64, generator=g).half()
    expected = attend(q.double(), k.double(), v.double(), backend="torch")
    out, weights = attend(q, k, v, backend="torch", return_weights=True)
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(out.double(), expected, atol=2e-3, rtol=0)


def test_check_finite_false_skips_the_scan():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16)
    q[0, 1, 3, 2] = float("nan")
    out = attend(q, k, v, check_finite=False)  # the caller vouches for its inputs: no error, NaN/0 rows
    assert out.shape == (1, 2, 8, 16)
    with pytest.raises(ValueError, match="attend: q contains NaN"):
        attend(q, k, v)


def test_bad_masks_and_biases_raise_clear_errors():
    q, k, v = make_qkv(2, 2, 2, 8, 8, 16)
    with pytest.raises(ValueError, match=r"Dense mask has shape"):
        attend(q, k, v, torch.ones(8, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="pass additive float masks as bias"):
        attend(q, k, v, torch.zeros(8, 8))
    with pytest.raises(ValueError, match="Segments ids have lengths"):
        attend(q, k, v, Segments(torch.zeros(7, dtype=torch.long)))
    with pytest.raises(ValueError, match="does not broadcast"):
        attend(q, k, v, bias=torch.zeros(1, 2, 8, 5))
    with pytest.raises(ValueError, match=r"bias of shape \(3, 2, 8, 8\) does not broadcast"):
        attend(q, k, v, bias=torch.zeros(3, 2, 8, 8))
    with pytest.raises(ValueError, match="BlockSparse map"):
        attend(q, k, v, BlockSparse(torch.ones(2, 2, dtype=torch.bool), 2))
    with pytest.raises(ValueError, match="score must be"):
        attend(q, k, v, score="relu")
    with pytest.raises(ValueError, match="dropout_p"):
        attend(q, k, v, dropout_p=1.5)
    with pytest.raises(TypeError, match="mask must be"):
        attend(q, k, v, mask="causal")


def test_reference_backend_without_autograd_keeps_exp_on_its_fast_path(monkeypatch):
    """With no graph to record (inference, attention maps for pictures) the "torch" backend exponentiates in
    place through zoo.layers.exp_flushed_: no exp argument under EXP_FLOOR for masked (-inf) or far-off
    scores (they leave ATen's vector path), same values and weights as the float64 reference, a fully masked
    row stays zero. With autograd it keeps plain exp (covered by the reference tests above)."""
    from zoo.layers import EXP_FLOOR

    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) * s for s in (6.0, 6.0, 1.0))
    allowed = Window(6, 3).dense(40, 40)[0, 0].clone()
    allowed[11] = False
    seen, real_exp, real_exp_ = [], torch.exp, torch.Tensor.exp_

    def low(x):
        finite = x[~x.isnan()]
        return float(finite.min()) if finite.numel() else 0.0

    monkeypatch.setattr(torch, "exp", lambda x, *a, **kw: seen.append(low(x)) or real_exp(x, *a, **kw))
    monkeypatch.setattr(torch.Tensor, "exp_", lambda self: seen.append(low(self)) or real_exp_(self))
    with torch.no_grad():
        out, weights = attend(q, k, v, Dense(allowed), backend="torch", return_weights=True)
    monkeypatch.undo()
    assert seen and min(seen) >= EXP_FLOOR
    ref = naive_attention(q, k, v, allowed, None, 0.25, "softmax")
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    assert (out[:, :, 11] == 0).all() and (weights[:, :, 11] == 0).all()
    assert (weights[..., ~allowed] == 0).all()
    torch.testing.assert_close(weights.sum(-1)[:, :, allowed.any(-1)], torch.ones(1, 2, 39))


@pytest.mark.parametrize("backend", ["torch", "sdpa", "blocksparse"])
def test_streaming_chunk_mask_recipe(backend):
    """The README's streaming recipe, Causal() | Segments(chunk ids): every frame sees its whole chunk and all
    earlier frames (chunk-causal attention of streaming speech encoders), on every CPU backend."""
    n, chunk = 100, 16
    chunks = torch.arange(n) // chunk
    mask = Causal() | Segments(chunks)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    truth = (j <= i) | (j // chunk == i // chunk)
    assert torch.equal(mask.dense(n, n)[0, 0], truth)
    q, k, v = make_qkv(1, 2, 2, n, n, 16, seed=3)
    with use_backend(backend):
        out = attend(q, k, v, mask=mask)
    ref = naive_attention(q, k, v, truth[None, None], None, 16 ** -0.5, "softmax")
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_core_api_boundaries_name_bad_arguments():
    """Arguments that used to reach torch unchecked (a raw error far from the call, or a silent truncation)
    are named where they enter (the bad-input audit of 2026-12-05)."""
    import numpy as np

    from zoo.attention import AgentAttention, BlockSparse, MultiHeadAttention, RotaryEmbedding, block_sparse_attention

    # register_backend: a bad entry used to break every later attend() call ("bad operand type for unary -")
    for kwargs, message in ((dict(priority="high"), "priority must be an int"), (dict(forward=None), "forward must be callable"),
                            (dict(auto_devices="cpu"), "auto_devices must be a collection")):
        args = {**dict(name="audit", forward=lambda *a: None, supports=lambda *a: None), **kwargs}
        with pytest.raises(TypeError, match=message):
            za.register_backend(**args)
    assert "audit" not in zb.list_backends()
    # block sizes: 4.0, (4.5, 4) and True used to pass as 4, (4, 4) and 1; numpy ints are ints
    blocks = torch.ones(2, 2, dtype=torch.bool)
    assert BlockSparse(blocks, np.int64(4)).block_q == 4
    for bad in (4.0, (4.5, 4), True, (4,), (4, 0)):
        with pytest.raises(ValueError, match="BlockSparse block_size must be a positive int or a pair"):
            BlockSparse(blocks, bad)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 6)
    for bias in (torch.zeros(1, 1, 5, 3), torch.zeros(1, 3, 5, 7)):
        with pytest.raises(ValueError, match=r"does not broadcast to \(2, 4, 5, 7\)"):
            block_sparse_attention(q, k, v, Causal(), bias=bias)
    with pytest.raises(ValueError, match="block_size must be a positive int or a pair"):
        block_sparse_attention(q, k, v, Causal(), block_size=4.0)
    # modules: an input of another dtype than the weights (was "expected m1 and m2 to have the same dtype")
    with pytest.raises(TypeError, match="MultiHeadAttention: x is torch.float64 but the module's weights are torch.float32"):
        MultiHeadAttention(16, 4)(torch.randn(2, 5, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="MultiHeadAttention: context is torch.float16"):
        MultiHeadAttention(16, 4, kv_dim=12)(torch.randn(1, 3, 16), torch.randn(1, 4, 12).half())
    with pytest.raises(TypeError, match="MultiHeadAttention: x must be a floating-point tensor"):
        MultiHeadAttention(16, 4)(torch.ones(2, 5, 16, dtype=torch.long))
    agent = AgentAttention(16, 4, agent_num=4, window=3)
    with pytest.raises(TypeError, match="AgentAttention: input is torch.float64"):
        agent(torch.randn(2, 10, 16, dtype=torch.float64))
    for grid in ((3, 3, 5), "33", (3.7, 3.2)):  # all used to run as (3, 3)
        with pytest.raises(ValueError, match="AgentAttention: grid must be a positive int or a pair"):
            agent(torch.randn(2, 10, 16), grid=grid)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast mixes dtypes freely
        assert MultiHeadAttention(16, 4, kv_dim=12)(torch.randn(1, 3, 16), torch.randn(1, 4, 12).bfloat16()).dtype == torch.bfloat16
    # RoPE: integer input was rotated and truncated; per-sample positions of another batch enlarged it
    with pytest.raises(TypeError, match="RoPE expects a floating-point tensor"):
        RotaryEmbedding(8)(torch.arange(24).view(1, 1, 3, 8))
    with pytest.raises(ValueError, match=r"per-sample positions \(2, 5\) are for batch 2 but x has batch 1"):
        RotaryEmbedding(8)(torch.randn(1, 1, 5, 8), torch.arange(5.0).repeat(2, 1))
    for grid in ((2.9, 2.9), (-2, -2)):
        with pytest.raises(ValueError, match="a grid size is positive ints"):
            RotaryEmbedding(8, "2d")(torch.randn(1, 1, 4, 8), grid)
    rope_2d = RotaryEmbedding(8, "2d")
    rope_2d(torch.randn(1, 1, 6, 8), (2, 3))  # cached: (2.5, 3) used to hit this entry through int()
    with pytest.raises(ValueError, match="a grid size is positive ints"):
        rope_2d(torch.randn(1, 1, 6, 8), (2.5, 3))
    with pytest.raises(TypeError, match="RoPE positions must be a tensor, or a grid size"):  # was "int has no len()"
        RotaryEmbedding(8)(torch.randn(1, 1, 5, 8), 5)
    with pytest.raises(TypeError, match=r"1d RoPE takes positions as a \(3,\) or \(B, 3\) tensor, got the list"):
        RotaryEmbedding(8)(torch.randn(1, 1, 3, 8), [0, 1, 2])


def test_switches_take_booleans_only():
    from zoo.attention import MultiHeadAttention

    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(TypeError, match="attend: return_weights must be True or False, got 'no'"):
        attend(q, q, q, return_weights="no")
    assert isinstance(attend(q, q, q, return_weights=1), tuple)
    with pytest.raises(TypeError, match="MultiHeadAttention: qk_norm must be True or False"):
        MultiHeadAttention(16, 4, qk_norm="no")


def test_attention_module_arguments_are_named():
    from zoo.attention import MultiHeadAttention

    for kwargs, message in ((dict(proj_drop=1.5), "MultiHeadAttention: proj_drop must be a number in"),
                            (dict(attn_drop="0.1"), "MultiHeadAttention: attn_drop must be a number in"),
                            (dict(rope_theta=5.0), "rope_theta / rope_axes_dims were given but rope=None"),
                            (dict(num_prefix_tokens=-1), "num_prefix_tokens must be an int >= 0")):
        with pytest.raises(ValueError, match=message):
            MultiHeadAttention(16, 4, **kwargs)
    with pytest.raises(ValueError, match="dim must be a positive int, got True"):
        MultiHeadAttention(True, 1)


def test_numpy_scalars_are_numbers_and_bools_are_not():
    import numpy as np

    q = torch.randn(1, 1, 3, 4)
    torch.testing.assert_close(attend(q, q, q, scale=np.float32(0.5)), attend(q, q, q, scale=0.5))
    with pytest.raises(TypeError, match="scale must be a real number \\(or a 0-d tensor\\), got bool True"):
        attend(q, q, q, scale=True)
    with pytest.raises(ValueError, match="dropout_p must be in \\[0, 1\\), got False"):
        attend(q, q, q, dropout_p=False)
    for rate in (1.0, -0.1, float("nan")):  # 1.0 would drop every weight (zeros), silently
        with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got"):
            attend(q, q, q, dropout_p=rate)


@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=lambda b: b or "auto")
def test_zero_d_tensor_scale_is_read_as_sdpa_reads_it(backend):
    """scale=torch.tensor(0.5) (a temperature kept as a buffer): the result of scale=0.5 and of SDPA given the same
    tensor, on every backend. attend() refused it with "scale must be a positive finite number, got
    tensor(0.5000)", a range error for an in-range value."""
    q, k, v = make_qkv(1, 2, 2, 5, 7, 8, seed=11)
    scale = torch.tensor(0.5)
    want = F.scaled_dot_product_attention(q, k, v, scale=scale)
    torch.testing.assert_close(attend(q, k, v, scale=scale, backend=backend), want, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(attend(q, k, v, scale=scale, backend=backend), attend(q, k, v, scale=0.5, backend=backend))
    torch.testing.assert_close(attend(q, k, v, scale=torch.tensor(-1, dtype=torch.int64), backend=backend),
                               attend(q, k, v, scale=-1.0, backend=backend))


def test_bad_scales_are_named():
    """Refused with what is wrong: NaN / inf (finite numbers only), non-numbers and tensors that are not 0-d real
    ones (a type error, not a range error), a tensor that requires grad (attend() reads its value: no gradient
    would reach a learned temperature; SDPA drops it silently) and a tensor under torch.compile (float() of it
    is data-dependent there)."""
    q = torch.randn(1, 1, 3, 4)
    for scale in (float("nan"), float("inf"), -float("inf"), torch.tensor(float("nan"))):
        with pytest.raises(ValueError, match="attend: scale must be a finite number, got"):
            attend(q, q, q, scale=scale)
    for scale, message in (("0.5", "got str '0.5'"), (torch.tensor([0.5]), "shape \\(1,\\)"),
                           (torch.tensor(True), "torch.bool tensor"), (torch.tensor(1j), "torch.complex64 tensor")):
        with pytest.raises(TypeError, match=f"attend: scale must be a real number.*{message}"):
            attend(q, q, q, scale=scale)
    learned = torch.nn.Parameter(torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"scale is a tensor that requires grad.*attend\(q \* scale, k, v, scale=1.0\)"):
        attend(q, q, q, scale=learned)
    with torch.no_grad():  # no gradient is asked for: read as a number
        torch.testing.assert_close(attend(q, q, q, scale=learned), attend(q, q, q, scale=0.5))
    compiled = torch.compile(lambda x, s: attend(x, x, x, scale=s), backend="eager")
    with pytest.raises(TypeError, match="under torch.compile / torch.export / jit tracing pass a Python float"):
        compiled(q, torch.tensor(0.5))


# ---- empty inputs (B = 0, Nq = 0, Nk = 0), as SDPA computes them ------------------------------------------
EMPTY_SHAPES = {  # (q shape, k / v shape without the last dim)
    "batch0": ((0, 4, 5, 8), (0, 2, 6)),
    "nq0": ((2, 4, 0, 8), (2, 2, 6)),
    "nk0": ((2, 4, 5, 8), (2, 2, 0)),
    "all0": ((0, 4, 0, 8), (0, 2, 0)),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=lambda b: b or "auto")
@pytest.mark.parametrize("case", list(EMPTY_SHAPES))
@pytest.mark.parametrize("mask_name", ["none", "causal", "window", "segments"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_empty_inputs_give_sdpas_result_and_gradients(backend, case, mask_name, with_bias):
    """A batch of 0, no queries or no keys: the output and the gradients of q, k, v (GQA: 4 query heads over 2)
    are SDPA's -- empty, or zeros (B, H, Nq, Dv) when Nk = 0, the zoo's result for a row whose keys are all masked
    -- on every backend, with a mask and a bias that requires grad (its gradient comes back in its own shape).
    attend() refused all of them ("attend: empty input")."""
    q_shape, kv_shape = EMPTY_SHAPES[case]
    g = torch.Generator().manual_seed(5)
    q = torch.randn(q_shape, generator=g).requires_grad_(True)
    k = torch.randn(*kv_shape, 8, generator=g).requires_grad_(True)
    v = torch.randn(*kv_shape, 3, generator=g).requires_grad_(True)
    batch, _, nq, _ = q_shape
    nk = kv_shape[2]
    ids = torch.zeros(max(batch, 1), nq, dtype=torch.long), torch.zeros(max(batch, 1), nk, dtype=torch.long)
    mask = {"none": None, "causal": Causal(), "window": Window(2, 0), "segments": Segments(*ids)}[mask_name]
    bias = torch.randn(1, 4, nq, nk, generator=g).requires_grad_(True) if with_bias else None
    out = attend(q, k, v, mask, bias, backend=backend)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert out.shape == want.shape == (batch, 4, nq, 3) and out.dtype == want.dtype
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    leaves = (q, k, v) + ((bias,) if with_bias else ())
    grads = torch.autograd.grad(out.sum(), leaves)
    want_grads = torch.autograd.grad(want.sum(), (q, k, v))
    for got, peer in zip(grads, want_grads):
        torch.testing.assert_close(got, peer, rtol=0, atol=0)
    if with_bias:
        assert grads[3].shape == bias.shape and not grads[3].any()


def test_empty_inputs_return_weights_and_named_backends():
    """return_weights gives (B, H, Nq, Nk) weights (empty) beside the output; a backend named for the call still
    refuses what it cannot run, with its reason; a mask or bias of the wrong length is still named."""
    q, k, v = make_qkv(2, 4, 2, 5, 0, 8)
    out, weights = attend(q, k, v, Causal(), return_weights=True)
    assert out.shape == (2, 4, 5, 8) and not out.any() and weights.shape == (2, 4, 5, 0)
    out, weights = attend(q[:0], k[:0], v[:0], return_weights=True)
    assert out.shape == (0, 4, 5, 8) and weights.shape == (0, 4, 5, 0)
    with pytest.raises(ValueError, match="backend 'sdpa' cannot run this call: return_weights=True"):
        attend(q, k, v, return_weights=True, backend="sdpa")
    with pytest.raises(ValueError, match="blocksparse' cannot run this call: dropout_p > 0"):
        attend(q, k, v, dropout_p=0.1, backend="blocksparse")
    with pytest.raises(ValueError, match=r"Segments ids have lengths \(q=5, kv=3\) but attention has Nq=5, Nk=0"):
        attend(q, k, v, Segments(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)))
    with pytest.raises(ValueError, match="does not broadcast"):
        attend(q, k, v, bias=torch.zeros(1, 4, 5, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the autocast dtype, as SDPA
        assert attend(q, k, v).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
def test_empty_inputs_return_weights_in_the_dtype_of_any_other_call(dtype, autocast):
    """return_weights: the weights of an empty call (B = 0, Nq = 0, Nk = 0) have the dtype of a non-empty call's
    -- fp32 for fp16 / bf16 inputs (and under autocast), which the reference backend computes them in -- and the
    output SDPA's dtype. The empty path returned them in the input dtype (fp16 weights where every other batch
    has fp32 ones)."""
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    g = torch.Generator().manual_seed(3)
    with context:
        q, k, v = (torch.randn(2, 4, 5, 8, generator=g).to(dtype) for _ in range(3))
        _, want = attend(q, k, v, return_weights=True)
        for q_shape, kv_shape in EMPTY_SHAPES.values():
            q, k, v = torch.randn(q_shape).to(dtype), torch.randn(*kv_shape, 8).to(dtype), torch.randn(*kv_shape, 8).to(dtype)
            out, weights = attend(q, k, v, return_weights=True)
            assert weights.dtype == want.dtype, (q_shape, kv_shape)
            assert weights.shape == (q_shape[0], 4, q_shape[2], kv_shape[2])
            assert out.dtype == F.scaled_dot_product_attention(q, k, v, enable_gqa=True).dtype
    assert want.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)  # (autocast leaves fp64 alone)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
def test_reference_backend_keeps_half_precision_scores_in_fp32(dtype, autocast):
    """bf16 / fp16 inputs: the "torch" backend (what return_weights and capture_attention run) keeps scores and
    weights in fp32, as SDPA's kernels do, so it is as close to float64 as SDPA (within 2x). It computed q k^T in
    the input dtype: each score rounded to bf16 (0.25 at |s| = 32) before the softmax, outputs 0.15 off in bf16
    against SDPA's 0.008, and asking for the weights changed the output. Under torch.autocast too (which would
    cast the fp32 copies back down)."""
    g = torch.Generator().manual_seed(0)
    q, k = ((4 * torch.randn(1, 4, 128, 64, generator=g)).to(dtype) for _ in range(2))
    v = torch.randn(1, 4, 128, 64, generator=g).to(dtype)
    allowed = torch.ones(128, 128, dtype=torch.bool).tril()[None, None]
    want = naive_attention(q, k, v, allowed, None, 64 ** -0.5, "softmax")
    context = torch.autocast("cpu", dtype=dtype) if autocast else contextlib.nullcontext()
    with context:
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        ours = attend(q, k, v, Causal(), backend="torch")
        with_weights, weights = attend(q, k, v, Causal(), return_weights=True)
    sdpa_err = float((sdpa.double() - want).abs().max())
    for out in (ours, with_weights):
        assert out.dtype == dtype
        assert float((out.double() - want).abs().max()) <= 2 * sdpa_err
    p_want = torch.softmax((q.double() @ k.double().transpose(-1, -2) / 8).masked_fill(~allowed, -math.inf), -1)
    assert float((weights.double() - p_want).abs().max()) < 1e-5


def test_sdpa_backend_casts_a_wider_bias_without_losing_it():
    """An fp32 bias with fp16 q (autocast) goes to SDPA in fp16: shifted by its row maximum first, so adding a
    constant to the bias (which softmax ignores) changes nothing. Cast as it was, bias + 1000 lost the bias to
    fp16's 0.5 steps (outputs 0.2 off, where the backends that add in fp32 stayed at 1e-3); a row of -1e9
    became -inf, a zero row. Gradients flow to the fp32 bias as before."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=g).half() for _ in range(3))
    bias = torch.randn(1, 2, 9, 9, generator=g)
    want = naive_attention(q, k, v, torch.ones(1, 1, 9, 9, dtype=torch.bool), bias, 0.25, "softmax")
    errors = {}
    for shift in (0.0, 1000.0):
        b = (bias + shift).requires_grad_(True)
        out = attend(q, k, v, bias=b, backend="sdpa")
        errors[shift] = float((out.detach().double() - want).abs().max())
        out.float().sum().backward()
        assert b.grad is not None and b.grad.dtype == torch.float32 and torch.isfinite(b.grad).all()
    assert errors[0.0] < 2e-3 and errors[1000.0] <= 2 * errors[0.0]
    row = bias.clone()
    row[0, :, 5] = -1e9  # a constant row: its softmax is that of the scores alone
    out = attend(q, k, v, bias=row, backend="sdpa")
    plain = attend(q, k, v, backend="sdpa")
    torch.testing.assert_close(out[0, :, 5], plain[0, :, 5], atol=2e-3, rtol=0)


def test_a_biased_call_under_autocast_does_not_depend_on_naming_the_backend():
    """fp32 q, k, v and an fp32 bias of large magnitude under bf16 autocast: the automatic path handed the bias to
    SDPA as it was, and autocast rounded it to bf16 (bias + 1000 in steps of 8: 1.75 off float64), while
    backend='sdpa' (through the general path) shifted each row by its maximum first (0.009 off)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    bias = torch.randn(1, 2, 64, 64) * 3 + 1000.0
    want = naive_attention(q.double(), k.double(), v.double(), torch.ones(1, 1, 64, 64, dtype=torch.bool),
                           bias.double(), 0.25, "softmax")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = attend(q, k, v, bias=bias)
        named = attend(q, k, v, bias=bias, backend="sdpa")
    assert auto.dtype == named.dtype == torch.bfloat16
    torch.testing.assert_close(auto, named, rtol=0, atol=0)
    assert float((auto.double() - want).abs().max()) < 0.05


class _Attend(torch.nn.Module):
    """attend(q, k, v, mask, bias=...) with fixed options, for torch.export."""

    def __init__(self, mask, **options) -> None:
        super().__init__()
        self.mask, self.options = mask, options

    def forward(self, q, k, v):
        out = attend(q, k, v, self.mask, **self.options)
        return torch.cat(out, dim=-1) if isinstance(out, tuple) else out  # (out, weights): one tensor to compare


@pytest.mark.parametrize("options", [
    {"score": "sigmoid"}, {"backend": "torch"}, {"return_weights": True},
    {"backend": "torch", "bias": za.ALiBi(4)}, {"score": "sigmoid", "bias": za.ALiBi(4)},
], ids=["sigmoid", "torch", "weights", "torch-alibi", "sigmoid-alibi"])
@pytest.mark.parametrize("mask_name", ["causal", "window"])
def test_reference_backend_exports_with_a_symbolic_length(options, mask_name):
    """The reference backend (sigmoid scores, return_weights, backend="torch") under torch.export with a dynamic
    length: the sizes stay symbolic (one query chunk, -log(Nk) from tensor ops) where int(), the Python chunk loop
    and math.log pinned them to the traced length ("Constraints violated (n) ... specialized it to be a
    constant"). The program runs at other lengths as attend() does eagerly, and as the float64 reference."""
    mask = {"causal": Causal(), "window": Window(2, 1)}[mask_name]
    layer = _Attend(mask, **options)
    n = torch.export.Dim("n", min=2, max=64)
    program = torch.export.export(layer, make_qkv(1, 4, 2, 10, 10, 8), dynamic_shapes=({2: n}, {2: n}, {2: n}))
    score = options.get("score", "softmax")
    for length in (7, 23):
        q, k, v = make_qkv(1, 4, 2, length, length, 8, seed=length)
        got, want = program.module()(q, k, v), layer(q, k, v)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        bias = None if "bias" not in options else options["bias"].materialize(length, length)
        reference = naive_attention(q, k, v, mask.dense(length, length), bias, 8 ** -0.5, score)
        torch.testing.assert_close(got[..., :8].double(), reference, atol=1e-5, rtol=1e-5)


def test_causal_cross_attention_exports_with_separate_symbolic_lengths():
    """Causal cross attention exported with separate query and key Dims: the lengths are not compared (a guard that
    made the program refuse Nq == Nk, and the export traced at Nq == Nk fail with "must always be equal"); the dense
    bottom-right mask runs, right for equal lengths as for others. Self attention (one Dim) still exports."""
    nq, nk = torch.export.Dim("nq", min=2, max=64), torch.export.Dim("nk", min=2, max=64)
    for traced in ((5, 9), (7, 7)):
        for options in ({}, {"bias": za.ALiBi(4)}):
            layer = _Attend(Causal(), **options)
            q, k, v = make_qkv(1, 4, 2, *traced, 8)
            program = torch.export.export(layer, (q, k, v), dynamic_shapes=({2: nq}, {2: nk}, {2: nk}))
            for lengths in ((7, 7), (3, 12), (9, 4), (6, 6)):
                q, k, v = make_qkv(1, 4, 2, *lengths, 8, seed=sum(lengths))
                got, want = program.module()(q, k, v), layer(q, k, v)
                torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
                bias = None if not options else options["bias"].materialize(*lengths)
                reference = naive_attention(q, k, v, Causal().dense(*lengths), bias, 8 ** -0.5, "softmax")
                torch.testing.assert_close(got.double(), reference, atol=1e-5, rtol=1e-5)
    n = torch.export.Dim("n", min=2, max=64)
    program = torch.export.export(_Attend(Causal()), make_qkv(1, 4, 2, 10, 10, 8), dynamic_shapes=({2: n},) * 3)
    q, k, v = make_qkv(1, 4, 2, 13, 13, 8)
    torch.testing.assert_close(program.module()(q, k, v), attend(q, k, v, Causal()), atol=1e-6, rtol=0)


# ---- second mutation audit of attend() and the backend choice (rarely combined options) ---------------------
@pytest.mark.parametrize("path", ["plain", "causal", "biased", "masked"])
def test_dropout_reaches_sdpa_on_every_path(path):
    """dropout_p is applied on each way attend() reaches SDPA: the plain call, the square causal call, the biased
    plain call and the "sdpa" backend with a dense mask (GQA, 4 query heads over 2). Each equals
    F.scaled_dot_product_attention with the same dropout_p, seed and explicit mask / bias, and differs from the
    dropout-free output. (Passing 0.0 on any of these paths left every test passing.)"""
    q, k, v = make_qkv(2, 4, 2, 12, 12, 8)
    mask, bias, attn_mask, causal, backend = None, None, None, False, None
    if path == "causal":
        mask, causal = Causal(), True
    elif path == "biased":
        bias = attn_mask = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(3))
    elif path == "masked":
        mask, backend = Window(3, 1), "sdpa"
        attn_mask = mask.dense(12, 12)
    torch.manual_seed(7)
    got = attend(q, k, v, mask, bias, dropout_p=0.5, backend=backend)
    torch.manual_seed(7)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.5, is_causal=causal,
                                          enable_gqa=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    undropped = attend(q, k, v, mask, bias, backend=backend)
    assert (got - undropped).abs().max() > 0.1


def test_reference_returns_every_chunks_weights(monkeypatch):
    """return_weights with the queries in several chunks (GQA, a causal mask with Nq < Nk, a per-head bias that
    broadcasts over the batch): the (B, H, Nq, Nk) weights are the float64 softmax of every row, not of the first
    chunk's rows only, and the output is the float64 reference's."""
    b, h, hkv, nq, nk, d = 2, 4, 2, 21, 30, 8
    q, k, v = make_qkv(b, h, hkv, nq, nk, d, dtype=torch.float64)
    bias = torch.randn(1, h, nq, nk, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(zcore, "CHUNK_ELEMENTS", b * h * nk * 4)  # 4 rows per chunk -> 6 chunks
    out, weights = attend(q, k, v, Causal(), bias, return_weights=True)
    allowed = Causal().dense(nq, nk)
    scores = q @ k.repeat_interleave(h // hkv, dim=1).transpose(-1, -2) * d**-0.5 + bias
    want_weights = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)
    assert weights.shape == (b, h, nq, nk)
    torch.testing.assert_close(weights, want_weights)
    torch.testing.assert_close(out, naive_attention(q, k, v, allowed, bias, d**-0.5, "softmax"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("how", ["torch", "weights"])
def test_reference_adds_an_fp32_bias_to_half_inputs_unrounded(dtype, how):
    """A float32 bias with fp16 / bf16 q, k, v on the reference backend (named, or chosen by return_weights) is added
    to the fp32 scores as it is: a bias of 1000 + b keeps b (rounded to the input dtype first, 1000 + b lost b to
    fp16's steps of 0.5 and bf16's of 8: weights off by up to 0.2). Against the float64 reference."""
    q, k, v = make_qkv(1, 2, 2, 6, 10, 8, dtype=dtype)
    g = torch.Generator().manual_seed(4)
    bias = 1000.0 + torch.randn(1, 2, 6, 10, generator=g)  # float32; a constant per row leaves softmax unchanged
    if how == "torch":
        out = attend(q, k, v, Causal(), bias, backend="torch")
    else:
        out, weights = attend(q, k, v, Causal(), bias, return_weights=True)
        assert weights.dtype == torch.float32
    want = naive_attention(q, k, v, Causal().dense(6, 10), bias.double(), 8**-0.5, "softmax")
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=0)


@pytest.mark.parametrize("backend", [None, "torch", "sdpa"], ids=lambda b: b or "auto")
def test_an_all_minus_inf_bias_row_under_autocast_is_a_zero_row(backend):
    """Under bf16 autocast, a float32 bias whose row is all -inf (a query that may attend nothing, said with the
    bias) gives a zero row, as without autocast, on every backend; the other rows are the float64 reference's.
    (The "sdpa" backend shifts a wider bias by its row maximum before rounding: -inf - (-inf) made that row NaN.)"""
    q, k, v = make_qkv(1, 4, 2, 5, 7, 8)
    bias = torch.randn(2, 1, 5, 7, generator=torch.Generator().manual_seed(6))  # over the heads, per batch
    bias[1, 0, 2] = -math.inf
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), None, bias,
                     backend=backend)
    assert torch.isfinite(out).all()
    assert out[1, :, 2].abs().max() == 0
    want = naive_attention(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1),
                           torch.ones(1, 1, 5, 7, dtype=torch.bool), bias, 8**-0.5, "softmax")
    want[1, :, 2] = 0  # (a softmax of -inf only: the zoo's row without a key)
    torch.testing.assert_close(out.double(), want, atol=3e-2, rtol=0)


@pytest.mark.parametrize("backend", [None, "torch", "sdpa", "blocksparse"], ids=lambda b: b or "auto")
@pytest.mark.parametrize("mask", [None, "causal"])
def test_a_bias_over_key_value_heads_is_named_under_gqa(backend, mask):
    """With grouped-query attention the bias has H (query) heads or 1: a bias over the Hkv key/value heads is named
    with attend()'s message on every backend, not left to a reshape or broadcast error deep inside one."""
    q, k, v = make_qkv(2, 4, 2, 5, 6, 8)
    with pytest.raises(ValueError, match=r"attend: bias of shape \(1, 2, 5, 6\) does not broadcast to \(2, 4, 5, 6\)"):
        attend(q, k, v, Causal() if mask else None, torch.zeros(1, 2, 5, 6), backend=backend)


def test_head_dim_mismatch_names_q_and_k():
    with pytest.raises(ValueError, match=r"attend: q head dim 8 != k head dim 6"):
        attend(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 6), torch.randn(1, 2, 4, 8))


def test_backend_argument_beats_the_context_and_auto_means_automatic(monkeypatch):
    """The precedence the module promises: argument > use_backend() context > ZOO_ATTN_BACKEND > automatic; an
    argument or environment of "auto" asks for the automatic choice (inside a context too), not a backend named
    "auto". Checked with a spy backend and calls that take the general path (a window mask)."""
    q, k, v = make_qkv(1, 2, 2, 6, 6, 8)
    calls = []

    def spy_forward(*args):
        calls.append(1)
        return zcore.attention_reference(*args)

    zb.register_backend("spy", spy_forward, lambda *a: None, priority=-5)
    try:
        want = attend(q, k, v, Window(2, 0), backend="torch")
        with use_backend("spy"):
            attend(q, k, v, Window(2, 0))
            assert len(calls) == 1
            torch.testing.assert_close(attend(q, k, v, Window(2, 0), backend="torch"), want)  # argument beats context
            torch.testing.assert_close(attend(q, k, v, Window(2, 0), backend="auto"), want, atol=1e-6, rtol=1e-5)
        assert len(calls) == 1
        monkeypatch.setenv(zb.ENV_VAR, "auto")
        torch.testing.assert_close(attend(q, k, v, Window(2, 0)), want, atol=1e-6, rtol=1e-5)
        monkeypatch.setenv(zb.ENV_VAR, " auto ")
        torch.testing.assert_close(attend(q, k, v, Window(2, 0)), want, atol=1e-6, rtol=1e-5)
        assert len(calls) == 1
    finally:
        zb._BACKENDS.pop("spy")
