"""zoo.attention.ALiBi: the official slopes (re-derived from the published recursion), FlashAttention's distance
convention in float64, attention with it on every CPU backend against FlexAttention's ALiBi score_mod,
MultiHeadAttention with it as its bias, and clear errors."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from zoo.attention import ALiBi, Causal, MultiHeadAttention, Window, alibi_slopes, attend


def _official_slopes(n: int) -> list[float]:
    """The recursion of ofirpress/attention_with_linear_biases (fairseq/models/transformer.py, get_slopes),
    written out: a power of two n starts at 2 ** (-2 ** -(log2(n) - 3)) and multiplies by that start; other n
    take the closest smaller power of two, then every other slope of twice that."""
    def power_of_two(m: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        out, value = [], start
        for _ in range(m):
            out.append(value)
            value *= start
        return out

    if math.log2(n).is_integer():
        return power_of_two(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_two(closest) + _official_slopes(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 40, 48, 64, 96])
def test_slopes_are_the_official_ones(heads):
    torch.testing.assert_close(alibi_slopes(heads), torch.tensor(_official_slopes(heads), dtype=torch.float64),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("q_len,k_len", [(7, 7), (3, 10), (10, 4)])
def test_bias_is_flash_attention_distance(q_len, k_len):
    heads = 6
    bias = ALiBi(heads).materialize(q_len, k_len, dtype=torch.float64)
    assert bias.shape == (1, heads, q_len, k_len)
    slopes = alibi_slopes(heads)
    for h in range(heads):
        for i in range(q_len):
            for j in range(k_len):
                want = -float(slopes[h]) * abs(i + k_len - q_len - j)
                assert math.isclose(float(bias[0, h, i, j]), want, rel_tol=1e-14, abs_tol=1e-14)  # float64 through


def test_float64_bias_keeps_float64_slopes_at_long_distances():
    """A float64 bias used to be computed from float32 slopes: 4e-5 off at distance 999 with 16 heads."""
    bias = ALiBi(16).materialize(1, 1000, dtype=torch.float64)
    want = -alibi_slopes(16)[:, None] * torch.arange(999, -1, -1, dtype=torch.float64)
    torch.testing.assert_close(bias[0, :, 0], want, rtol=1e-15, atol=0)
    assert ALiBi(16).double().materialize(2, 3).dtype == torch.float64  # a float64 module gives float64
    assert ALiBi(16).materialize(2, 3).dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "sdpa", "blocksparse"])
def test_attention_equals_flex_attention_alibi(backend):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    heads, n = 4, 160
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, n, 32, generator=g) for _ in range(3))
    slopes = alibi_slopes(heads).float()

    def alibi_score(score, b, h, q_idx, kv_idx):  # FlexAttention's ALiBi example, with the absolute distance
        return score - slopes[h] * (q_idx - kv_idx).abs()

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    block_mask = flex.create_block_mask(causal, None, None, n, n, device="cpu", BLOCK_SIZE=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention without torch.compile warns that it is unfused
        want = flex.flex_attention(q, k, v, score_mod=alibi_score, block_mask=block_mask)
    mask = Causal() & Window(n, None) if backend == "blocksparse" else Causal()  # a mask the sparse path takes
    got = attend(q, k, v, mask, bias=ALiBi(heads), backend=backend)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_as_the_bias_of_multi_head_attention():
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, num_heads=4, rel_pos_bias=ALiBi(4))
    assert not any("slopes" in key for key in mha.state_dict())  # a fixed, non-persistent buffer
    x = torch.randn(2, 9, 32)
    y = mha(x, mask=Causal())
    q, k, v = mha.project(x)
    want = mha.proj(attend(q, k, v, Causal(), bias=ALiBi(4).materialize(9, 9)).transpose(1, 2).reshape(2, 9, 32))
    torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-6)
    y.sum().backward()
    assert mha.qkv.weight.grad is not None
    assert repr(ALiBi(4)) == "ALiBi(num_heads=4)"


def test_custom_slopes_and_errors():
    custom = ALiBi(2, slopes=[1.0, 0.0])
    bias = custom.materialize(3, 3)
    assert torch.equal(bias[0, 1], torch.zeros(3, 3)) and float(bias[0, 0, 2, 0]) == -2.0
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        ALiBi(0)
    with pytest.raises(ValueError, match="slopes must be 3 numbers \\(one per head\\), got shape \\(2,\\)"):
        ALiBi(3, slopes=[0.5, 0.25])
    with pytest.raises(ValueError, match="slopes must be finite, got \\[0.5, nan\\]"):
        ALiBi(2, slopes=[0.5, float("nan")])
    for heads in (0, 2.0):  # with slopes given, num_heads was not checked
        with pytest.raises(ValueError, match="ALiBi: num_heads must be a positive int"):
            ALiBi(heads, slopes=[])


@pytest.mark.parametrize("backend", ["torch", "blocksparse"])  # SDPA takes its attn_mask in q's dtype
def test_alibi_under_bf16_autocast_is_not_rounded_before_the_softmax(backend):
    """Under bf16 autocast attend() materialised ALiBi in q's dtype: -slope * distance rounded to bf16's steps
    (1/32 at |bias| in [4, 8)) put 6% of the outputs off the correctly rounded attention of the bf16 inputs, against
    0.03% without a bias. The bias is now built in fp32 (as FlashAttention's alibi_slopes); the float64 attention
    of the same bf16-rounded q, k, v with the exact bias, rounded to bf16, is the reference. ALiBi(H).bfloat16()
    rounded the slopes themselves; the bias still comes from the exact ones."""
    torch.manual_seed(0)
    heads, n, dim = 8, 512, 32
    q, k, v = (torch.randn(1, heads, n, dim).to(torch.bfloat16) for _ in range(3))
    alibi = ALiBi(heads)
    exact = alibi.materialize(n, n, dtype=torch.float64)
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(dim) + exact
    scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf)
    want = (scores.softmax(-1) @ v.double()).to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = attend(q.float(), k.float(), v.float(), Causal(), bias=alibi, backend=backend)
    assert got.dtype == torch.bfloat16
    assert (got != want).double().mean().item() < 0.005
    torch.testing.assert_close(ALiBi(heads).bfloat16().materialize(n, n, dtype=torch.float32),
                               exact.float(), rtol=0, atol=0)


def test_exact_slopes_of_a_half_precision_alibi_are_kept_per_device():
    """A bf16 / fp16 ALiBi computes its bias from the float64 slopes, which live on the CPU: every call copied
    them to the device. They are kept per (device, dtype), and dropped when the module moves."""
    alibi = ALiBi(4).bfloat16()
    first = alibi.materialize(5, 7, dtype=torch.float32)
    assert list(alibi._exact_slopes_cache) == [("cpu", torch.float32, torch.bfloat16)]
    copies = []
    original = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        if self is alibi._slopes_fp64:
            copies.append(args)
        return original(self, *args, **kwargs)

    torch.Tensor.to = counting_to
    try:
        torch.testing.assert_close(alibi.materialize(5, 7, dtype=torch.float32), first, rtol=0, atol=0)
    finally:
        torch.Tensor.to = original
    assert copies == []
    alibi.float()
    assert alibi._exact_slopes_cache == {}


@pytest.mark.parametrize("module_dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("edit", ["in_place", "assign"])
def test_edited_slopes_are_used_in_every_dtype(module_dtype, edit):
    """An edit of the slopes buffer was used for an fp32 bias only: a float64 bias, and every bias of a float64,
    fp16 or bf16 module, came from a private copy of the constructor's slopes (audit 2026-12-07). Now the buffer's
    values are used in every dtype; the heads left alone keep their exact float64 slopes (6 heads: not exact in
    fp32). Reference: the float64 formula with the edited slopes."""
    heads, q_len, k_len = 6, 4, 9
    alibi = ALiBi(heads).to(module_dtype)
    alibi.materialize(q_len, k_len, dtype=torch.float64)  # caches the per-device copies
    edited = alibi.slopes.clone()
    edited[[0, 3]] *= 2
    edited[5] = 0.3
    if edit == "in_place":
        alibi.slopes.copy_(edited)
    else:
        alibi.slopes = edited
    slopes = alibi_slopes(heads)
    slopes[[0, 3, 5]] = edited[[0, 3, 5]].double()
    distance = (torch.arange(q_len)[:, None] + k_len - q_len - torch.arange(k_len)[None, :]).abs()
    want = -slopes[None, :, None, None] * distance.double()
    torch.testing.assert_close(alibi.materialize(q_len, k_len, dtype=torch.float64), want, rtol=1e-15, atol=0)
    torch.testing.assert_close(alibi.materialize(q_len, k_len, dtype=torch.float32), want.float())
    default = alibi.materialize(q_len, k_len)  # the module's dtype; fp32 for fp16 / bf16 (see materialize)
    assert default.dtype == (torch.float64 if module_dtype == torch.float64 else torch.float32)
    if default.dtype == torch.float64:
        torch.testing.assert_close(default, want, rtol=1e-15, atol=0)
    else:
        torch.testing.assert_close(default, want.float())


@pytest.mark.parametrize("through", [torch.bfloat16, torch.float16])
def test_a_round_trip_through_half_precision_keeps_the_exact_slopes(through):
    """.bfloat16() / .half() and back to fp32 or float64 left the rounded slopes in the buffer, which the edit check
    then took for an edit: the float64 bias came from rounded slopes (relative error 1e-4 with 12 heads; review,
    2026-12-07). A buffer holding the bf16 / fp16 rounding of a head's slope counts as unedited."""
    heads, q_len, k_len = 12, 3, 7
    distance = (torch.arange(q_len)[:, None] + k_len - q_len - torch.arange(k_len)[None, :]).abs().double()
    want = -alibi_slopes(heads)[None, :, None, None] * distance
    for back in (torch.float32, torch.float64):
        alibi = ALiBi(heads).to(through).to(back)
        torch.testing.assert_close(alibi.materialize(q_len, k_len, dtype=torch.float64), want, rtol=1e-15, atol=0)


def test_a_module_pickled_with_the_earlier_cache_form_loads():
    """An ALiBi module pickled by the previous version after a bf16 / fp64 forward held its per-device slope copies
    as one tensor per entry; loaded here, 4 heads raised "too many values to unpack" and 2 heads gave head 1 the
    slope of head 0 (review, 2026-12-07). The copies are dropped on save and on load."""
    import io
    import pickle

    alibi = ALiBi(4)
    alibi._exact_slopes_cache = {("cpu", torch.float64): alibi_slopes(4)}  # the earlier form
    loaded = pickle.loads(pickle.dumps(alibi))
    assert loaded._exact_slopes_cache == {}
    distance = (torch.arange(2)[:, None] + 3 - torch.arange(5)[None, :]).abs().double()
    torch.testing.assert_close(loaded.materialize(2, 5, dtype=torch.float64),
                               -alibi_slopes(4)[None, :, None, None] * distance, rtol=1e-15, atol=0)
    alibi.materialize(2, 5, dtype=torch.float64)
    buffer = io.BytesIO()
    torch.save(alibi, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False)._exact_slopes_cache == {}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_half_and_double_alibi_layers_compile_as_one_graph(dtype):
    """The per-device slope cache was read through the module's __dict__ inside traced code: a bf16 or float64
    ALiBi MultiHeadAttention no longer compiled with fullgraph=True ("does not know how to trace method
    setdefault"), for a fresh module and after an eager call."""
    torch.manual_seed(0)
    layer = MultiHeadAttention(32, 4, rel_pos_bias=ALiBi(4)).to(dtype).eval()
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    with torch.no_grad():
        for n in (7, 13):
            x = torch.randn(2, n, 32, dtype=dtype)
            torch.testing.assert_close(compiled(x, mask=Causal()), layer(x, mask=Causal()))


def test_a_round_trip_through_fp16_keeps_the_exact_slopes_where_fp16_and_bf16_round_apart():
    """With 12 heads the fp16 and bf16 roundings of every slope coincide, so a check of the fp16 rounding alone went
    untested: with 24 heads 8 slopes round differently in fp16 and bf16. .half().float() / .half().double() must
    still give the float64 slopes of the official recursion (not the fp16-rounded ones, ~1e-4 relative off)."""
    heads, q_len, k_len = 24, 2, 5
    fp32 = alibi_slopes(heads).float()
    assert bool((fp32.half().float() != fp32.bfloat16().float()).any())  # the case this test is about
    distance = (torch.arange(q_len)[:, None] + k_len - q_len - torch.arange(k_len)[None, :]).abs().double()
    want = -torch.tensor(_official_slopes(heads), dtype=torch.float64)[None, :, None, None] * distance
    for back in (torch.float32, torch.float64):
        alibi = ALiBi(heads).half().to(back)
        torch.testing.assert_close(alibi.materialize(q_len, k_len, dtype=torch.float64), want, rtol=1e-15, atol=0)


def test_capture_of_an_alibi_layer_records_its_biased_weights_and_ends_cleanly():
    """capture_attention around a MultiHeadAttention with ALiBi: the record holds the float64 softmax of
    q k^T / sqrt(D) - slope * distance under the causal mask (re-derived here), detached; an explicit record name
    wins over the captured model's qualified name; extra maps are detached; an exception inside the block ends the
    capture (nothing recorded or slowed down afterwards); captures closed out of order each stop recording."""
    import torch.nn as nn

    from zoo.attention import capture_attention
    from zoo.attention.capture import is_capturing, record

    torch.manual_seed(0)
    heads, n, dim = 4, 6, 32
    mha = MultiHeadAttention(dim, num_heads=heads, rel_pos_bias=ALiBi(heads))
    model = nn.Sequential(mha)
    x = torch.randn(2, n, dim)
    with capture_attention(model) as maps:
        mha(x, mask=Causal())
        record(mha, torch.ones(1, 1, 1, 1), name="custom", agent=torch.ones(2, requires_grad=True) * 2)
    assert [r.name for r in maps] == ["0", "custom"]
    assert not maps[0].weights.requires_grad and not maps[1].extra["agent"].requires_grad
    q, k, _ = (t.double() for t in mha.project(x))
    d = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs().double()
    slopes = torch.tensor(_official_slopes(heads), dtype=torch.float64)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dim // heads) - slopes[:, None, None] * d
    scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf)
    torch.testing.assert_close(maps[0].weights.double(), scores.softmax(-1), rtol=1e-5, atol=1e-6)

    with pytest.raises(RuntimeError, match="boom"):
        with capture_attention(mha) as stale:
            mha(x)
            raise RuntimeError("boom")
    assert not is_capturing()
    mha(x)
    assert len(stale) == 1

    outer_cm, inner_cm = capture_attention(), capture_attention()
    outer, inner = outer_cm.__enter__(), inner_cm.__enter__()
    outer_cm.__exit__(None, None, None)  # closed first: the inner capture goes on alone
    mha(x)
    inner_cm.__exit__(None, None, None)
    assert (len(outer), len(inner), is_capturing()) == (0, 1, False)


def test_a_forward_bias_with_another_head_count_is_refused():
    """MultiHeadAttention refused rel_pos_bias=ALiBi(1) on 4 heads, but accepted forward(bias=ALiBi(1)): its
    (1, 1, Nq, Nk) bias broadcast one slope (1/256) to every head, silently (review C, finding 6). The forward bias
    gets the constructor's check; ALiBi(4) as the forward bias equals it as rel_pos_bias."""
    torch.manual_seed(0)
    layer = MultiHeadAttention(32, 4).double().eval()
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"bias ALiBi has 1 heads but this module has num_heads=4; build it with 4 "
                                         r"heads"):
        layer(x, bias=ALiBi(1))
    q = torch.randn(2, 4, 6, 8, dtype=torch.float64)  # attend() itself refuses it too, naming the explicit route
    with pytest.raises(ValueError, match=r"attend: bias ALiBi has 1 heads but q has 4: build it with 4 heads .* "
                                         r"pass its tensor, bias.materialize\(6, 6\)"):
        attend(q, q, q, bias=ALiBi(1))
    shared = ALiBi(1).materialize(6, 6, dtype=torch.float64)
    torch.testing.assert_close(attend(q, q, q, bias=shared), attend(q, q, q, bias=shared.expand(1, 4, 6, 6)))
    with_table = MultiHeadAttention(32, 4, rel_pos_bias=ALiBi(4)).double().eval()
    with_table.load_state_dict(layer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(layer(x, mask=Causal(), bias=ALiBi(4)), with_table(x, mask=Causal()), rtol=0,
                                   atol=0)
