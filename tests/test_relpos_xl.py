"""Transformer-XL relative positions (zoo/attention/relpos_xl.py, MultiHeadAttention(rel_pos="xl")).

Checked against:
* a float64 re-derivation of the paper's score, pair by pair: score_ij = ((q_i + u) . k_j + (q_i + v) .
  W_pos s(i - j)) / sqrt(D), s the interleaved sinusoid of the distance, written here from the definition
  (no rel_shift, no table);
* an ESPnet-layout layer written from ESPnet's formulas (EspnetStyleRelPosAttention: separate
  linear_q/k/v/out, a (1, 2T - 1, C) positional table from T - 1 down to -(T - 1), the square zero-pad shift),
  whose weights map one to one (also the peer of ``zoo bench relpos``);
* the whole sequence in one call, for a decoder run token by token with a KV cache;
and rel_shift against an explicit gather, for every Nq, Nk.
"""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from zoo.attention import Causal, KVCache, MultiHeadAttention, Segments, TransformerXLRelPos, rel_shift, use_backend
from zoo.attention import relpos_xl
from zoo.attention.relpos_xl import relative_sinusoids

DIM, HEADS = 24, 3


def _xl(**kwargs) -> MultiHeadAttention:
    torch.manual_seed(0)
    mha = MultiHeadAttention(DIM, HEADS, qkv_bias=True, rel_pos="xl", **kwargs)
    with torch.no_grad():  # non-trivial u, v (and a bias that is not zero)
        mha.rel_pos.pos_bias_u.normal_()
        mha.rel_pos.pos_bias_v.normal_()
    return mha


def _sinusoid_f64(r: int, dim: int) -> torch.Tensor:
    out = torch.empty(dim, dtype=torch.float64)
    for m in range(dim // 2):
        w = 10000.0 ** (-2.0 * m / dim)
        out[2 * m], out[2 * m + 1] = math.sin(r * w), math.cos(r * w)
    return out


def _reference_f64(mha: MultiHeadAttention, x: torch.Tensor, allowed=None, q_offset=None, n_q=None) -> torch.Tensor:
    """The paper's score, pair by pair, in float64; queries are tokens [q_offset, q_offset + n_q) of x."""
    x = x.double()
    batch, n, _ = x.shape
    heads, d = mha.num_heads, mha.head_dim
    qkv = F.linear(x, mha.qkv.weight.double(), mha.qkv.bias.double()).view(batch, n, 3, heads, d)
    q, k, v = qkv.unbind(2)  # (B, N, H, D)
    n_q = n if n_q is None else n_q
    q_offset = n - n_q if q_offset is None else q_offset
    w_pos = mha.rel_pos.linear_pos.weight.double()
    u, vb = mha.rel_pos.pos_bias_u.double(), mha.rel_pos.pos_bias_v.double()
    p = {r: (w_pos @ _sinusoid_f64(r, mha.dim)).view(heads, d) for r in range(-n, n + 1)}
    scores = torch.empty(batch, heads, n_q, n, dtype=torch.float64)
    for i in range(n_q):
        qi = q[:, q_offset + i]  # (B, H, D)
        for j in range(n):
            content = ((qi + u) * k[:, j]).sum(-1)
            position = ((qi + vb) * p[q_offset + i - j]).sum(-1)
            scores[:, :, i, j] = (content + position) / math.sqrt(d)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhij,bjhd->bihd", probs, v).reshape(batch, n_q, heads * d)
    return F.linear(out, mha.proj.weight.double(), mha.proj.bias.double())


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("case", ["none", "causal", "padding"])
def test_matches_the_paper_score_in_float64(backend, case):
    mha = _xl()
    x = torch.randn(2, 9, DIM, generator=torch.Generator().manual_seed(1))
    mask, allowed = None, None
    if case == "causal":
        mask = Causal()
        allowed = torch.ones(9, 9, dtype=torch.bool).tril()
    elif case == "padding":  # the second utterance has 6 frames and 3 padding frames (negative id)
        ids = torch.tensor([[0] * 9, [0] * 6 + [-1] * 3])
        mask = Segments(ids)
        allowed = (ids[:, :, None] == ids[:, None, :]) & (ids[:, None, :] >= 0)
        allowed = allowed[:, None]
    with use_backend(backend):
        got = mha(x, mask=mask)
    want = _reference_f64(mha, x, allowed)
    if case == "padding":  # padded query rows see nothing (zero attention output; only the proj bias)
        got, want = got[:, :6], want[:, :6]
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_gradients_match_float64():
    mha = _xl()
    x = torch.randn(2, 7, DIM, generator=torch.Generator().manual_seed(2), requires_grad=True)
    grad_out = torch.randn(2, 7, DIM, generator=torch.Generator().manual_seed(3))
    mha(x, mask=Causal()).backward(grad_out)
    got = {name: p.grad.clone() for name, p in mha.named_parameters()}
    got["x"] = x.grad.clone()

    ref = _xl().double()
    x64 = x.detach().double().requires_grad_(True)
    allowed = torch.ones(7, 7, dtype=torch.bool).tril()
    _reference_f64(ref, x64, allowed).backward(grad_out.double())
    want = {name: p.grad for name, p in ref.named_parameters()}
    want["x"] = x64.grad
    assert set(got) == {"x", "qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "rel_pos.linear_pos.weight",
                        "rel_pos.pos_bias_u", "rel_pos.pos_bias_v"}
    for name in got:
        torch.testing.assert_close(got[name].double(), want[name], atol=3e-5, rtol=3e-5, msg=name)


class EspnetStyleRelPosAttention(torch.nn.Module):
    """ESPnet's RelPositionMultiHeadedAttention with RelPositionalEncoding (2T - 1 positions), written here from
    its formulas (espnet/nets/pytorch_backend/transformer/attention.py and embedding.py): separate
    linear_q/k/v/out and linear_pos, pos_bias_u/v, a table of positions T - 1 .. -(T - 1) built as the flipped
    positive half and the negative half every call, and the square shift through a (B, H, 2T, 2T - 1) view.
    Also the peer of ``zoo bench relpos``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.linear_q, self.linear_k, self.linear_v, self.linear_out = (torch.nn.Linear(dim, dim) for _ in range(4))
        self.linear_pos = torch.nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = torch.nn.Parameter(torch.randn(heads, dim // heads))
        self.pos_bias_v = torch.nn.Parameter(torch.randn(heads, dim // heads))

    @staticmethod
    def positions(t: int, c: int) -> torch.Tensor:
        position = torch.arange(t, dtype=torch.float32)[:, None]
        div = torch.exp(torch.arange(0, c, 2, dtype=torch.float32) * -(math.log(10000.0) / c))
        positive, negative = torch.zeros(t, c), torch.zeros(t, c)
        positive[:, 0::2], positive[:, 1::2] = torch.sin(position * div), torch.cos(position * div)
        negative[:, 0::2], negative[:, 1::2] = torch.sin(-position * div), torch.cos(-position * div)
        return torch.cat([positive.flip(0), negative[1:]], dim=0)[None]  # (1, 2T - 1, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, t, c = x.shape
        heads, d = self.h, self.d
        q = self.linear_q(x).view(batch, t, heads, d)
        k = self.linear_k(x).view(batch, t, heads, d).transpose(1, 2)
        v = self.linear_v(x).view(batch, t, heads, d).transpose(1, 2)
        p = self.linear_pos(self.positions(t, c).to(x)).view(1, -1, heads, d).transpose(1, 2)
        ac = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        bd = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))  # (B, H, T, 2T - 1)
        padded = torch.cat([bd.new_zeros(batch, heads, t, 1), bd], dim=-1).view(batch, heads, 2 * t, t)
        bd = padded[:, :, 1:].reshape(batch, heads, t, 2 * t - 1)[..., :t]
        attn = torch.softmax((ac + bd) / math.sqrt(d), dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(batch, t, c)
        return self.linear_out(out)


def zoo_from_espnet(peer: EspnetStyleRelPosAttention) -> MultiHeadAttention:
    """A zoo MultiHeadAttention(rel_pos="xl") holding the ESPnet layer's weights: qkv = [linear_q; linear_k;
    linear_v], proj = linear_out, rel_pos.* as named there (strict load)."""
    dim = peer.linear_q.in_features
    mha = MultiHeadAttention(dim, peer.h, qkv_bias=True, rel_pos="xl")
    mha.load_state_dict({
        "qkv.weight": torch.cat([peer.linear_q.weight, peer.linear_k.weight, peer.linear_v.weight]),
        "qkv.bias": torch.cat([peer.linear_q.bias, peer.linear_k.bias, peer.linear_v.bias]),
        "proj.weight": peer.linear_out.weight, "proj.bias": peer.linear_out.bias,
        "rel_pos.linear_pos.weight": peer.linear_pos.weight,
        "rel_pos.pos_bias_u": peer.pos_bias_u, "rel_pos.pos_bias_v": peer.pos_bias_v,
    }, strict=True)
    return mha


def test_espnet_weights_map_one_to_one():
    """An ESPnet/NeMo layer's weights: qkv = [linear_q; linear_k; linear_v], proj = linear_out, rel_pos.* as
    named there. Same outputs and input gradients."""
    torch.manual_seed(5)
    peer = EspnetStyleRelPosAttention(DIM, HEADS)
    with torch.no_grad():
        for p in peer.parameters():
            p.normal_(0.0, 0.2)
    mha = zoo_from_espnet(peer)
    x = torch.randn(2, 13, DIM, requires_grad=True)
    grad = torch.randn(2, 13, DIM)
    ours, theirs = mha(x), peer(x)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=2e-5)
    (g1,) = torch.autograd.grad(ours, x, grad)
    (g2,) = torch.autograd.grad(theirs, x, grad)
    torch.testing.assert_close(g1, g2, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("path", ["eager", "traced"])  # a strided view / the exportable pad-and-reshape form
@pytest.mark.parametrize("n_q,n_k", [(1, 1), (1, 9), (2, 1), (4, 9), (9, 9), (9, 4), (5, 1)])
def test_rel_shift_is_the_gather_it_stands_for(monkeypatch, path, n_q, n_k):
    if path == "traced":
        monkeypatch.setattr(relpos_xl, "is_tracing", lambda: True)
    scores = torch.randn(2, 3, n_q, n_q + n_k - 1, requires_grad=True)
    i = torch.arange(n_q)[:, None]
    j = torch.arange(n_k)[None, :]
    index = (n_q - 1 - i + j).expand(2, 3, n_q, n_k)
    got = rel_shift(scores, n_k)
    want = torch.gather(scores, -1, index)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    grad = torch.randn(2, 3, n_q, n_k)
    (got_grad,) = torch.autograd.grad(got, scores, grad)
    (want_grad,) = torch.autograd.grad(want, scores, grad)
    torch.testing.assert_close(got_grad, want_grad, atol=0, rtol=0)
    strided = torch.randn(2, 3, n_q + n_k - 1, n_q).transpose(-1, -2)  # a non-contiguous input
    torch.testing.assert_close(rel_shift(strided, n_k), torch.gather(strided, -1, index), atol=0, rtol=0)
    with pytest.raises(ValueError, match="Nq \\+ Nk - 1"):
        rel_shift(scores, n_k + 1)


def test_sinusoid_rows_run_from_the_largest_distance():
    table = relative_sinusoids(3, 5, 8, dtype=torch.float64)  # distances 4 .. -2
    assert table.shape == (7, 8)
    for m, r in enumerate(range(4, -3, -1)):
        torch.testing.assert_close(table[m], _sinusoid_f64(r, 8))
    with pytest.raises(ValueError, match="even"):
        relative_sinusoids(2, 2, 7)


@pytest.mark.parametrize("steps", [[1] * 10, [4, 1, 3, 2]], ids=["token by token", "mixed"])
def test_kv_cache_decoding_equals_the_whole_sequence(steps):
    mha = _xl().eval()
    x = torch.randn(2, 10, DIM, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = mha(x, mask=Causal())
        cache, outs, t = KVCache(), [], 0
        for n in steps:
            outs.append(mha(x[:, t:t + n], mask=Causal() if n > 1 else None, cache=cache))
            t += n
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(full.double(), _reference_f64(mha, x, torch.ones(10, 10, dtype=torch.bool).tril()),
                               atol=2e-5, rtol=2e-5)


def test_num_queries_are_the_first_tokens():
    mha = _xl().eval()
    x = torch.randn(2, 8, DIM)
    with torch.no_grad():
        torch.testing.assert_close(mha(x, num_queries=3), mha(x)[:, :3], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(mha(x, num_queries=3).double(), _reference_f64(mha, x, q_offset=0, n_q=3),
                               atol=2e-5, rtol=2e-5)



def test_num_queries_on_a_fresh_layer_without_gradients_reaches_the_farthest_key():
    """num_queries=k puts the queries first (q_offset 0), so the farthest distance is the negative end, -(Nk - 1):
    a fresh layer's kept table (built without gradients, from the positive end only) was too short past ~17 keys,
    and rel_shift refused the slice. Against the full pass and the float64 paper score."""
    mha = _xl().eval()
    x = torch.randn(2, 40, DIM, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first = mha(x, num_queries=3)  # before any call grows the table
        torch.testing.assert_close(first, mha(x)[:, :3], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(first.double(), _reference_f64(mha, x, q_offset=0, n_q=3), atol=2e-5, rtol=2e-5)
    # the layer itself: queries at 10.. over 100 keys, the kept table against the one built with gradients
    layer = TransformerXLRelPos(DIM, HEADS)
    q = torch.randn(1, HEADS, 4, DIM // HEADS)
    with torch.no_grad():
        kept = layer(q, 100, 0.5, q_offset=10)[1]
    torch.testing.assert_close(kept, layer(q, 100, 0.5, q_offset=10)[1].detach(), atol=1e-5, rtol=1e-5)

def test_kept_table_follows_the_weights():
    """Without gradients the projected sinusoids are kept; growing lengths, an in-place weight change and
    load_state_dict give the same outputs as computing them afresh."""
    mha = _xl().eval()
    for n in (5, 40, 7):  # 40 grows the table past its first reach
        x = torch.randn(1, n, DIM)
        with torch.no_grad():
            kept = mha(x)
        torch.testing.assert_close(kept, mha(x), atol=1e-5, rtol=1e-5)  # grad mode: built afresh
    x = torch.randn(1, 6, DIM)
    with torch.no_grad():
        before = mha(x)
        mha.rel_pos.linear_pos.weight.mul_(-1.5)
        after = mha(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, mha(x), atol=1e-5, rtol=1e-5)
    other = _xl().eval()
    with torch.no_grad():
        other.rel_pos.linear_pos.weight.normal_()
        mha.load_state_dict(other.state_dict())
        torch.testing.assert_close(mha(x), other(x), atol=0, rtol=0)


def test_table_built_in_inference_mode_never_reaches_autograd():
    """A frozen layer (fine-tuning around it) after an inference_mode evaluation: training calls build their
    positions afresh and give the evaluation's outputs, with gradients."""
    mha = _xl()
    mha.rel_pos.requires_grad_(False)
    x = torch.randn(2, 6, DIM)
    with torch.inference_mode():
        want = mha(x)
    xx = x.clone().requires_grad_(True)
    out = mha(xx)
    out.sum().backward()
    assert xx.grad is not None
    torch.testing.assert_close(out.detach(), want)


def test_state_dict_and_repr():
    mha = _xl()
    assert [k for k in mha.state_dict() if k.startswith("rel_pos.")] == [
        "rel_pos.pos_bias_u", "rel_pos.pos_bias_v", "rel_pos.linear_pos.weight"]
    assert mha.rel_pos.linear_pos.weight.shape == (DIM, DIM) and mha.rel_pos.pos_bias_u.shape == (HEADS, DIM // HEADS)
    assert "(rel_pos): TransformerXLRelPos(\n    dim=24, num_heads=3, head_dim=8" in repr(mha)


def test_onnx_export_matches_onnxruntime_at_other_lengths():
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    mha = _xl().eval()
    x = torch.randn(2, 11, DIM)
    buffer = io.BytesIO()
    torch.onnx.export(mha, (x,), buffer, input_names=["x"], output_names=["y"], dynamo=False,
                      dynamic_axes={"x": {0: "batch", 1: "time"}, "y": {0: "batch", 1: "time"}})
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for length in (11, 4, 23):  # the distances and the shift follow the input length
        x2 = torch.randn(3, length, DIM)
        (got,) = session.run(None, {"x": x2.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), mha(x2), atol=1e-4, rtol=1e-4)


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="rel_pos must be None or 'xl'"):
        MultiHeadAttention(DIM, HEADS, rel_pos="t5")
    with pytest.raises(ValueError, match="one position scheme"):
        MultiHeadAttention(DIM, HEADS, rel_pos="xl", rope="1d")
    with pytest.raises(ValueError, match="self attention"):
        MultiHeadAttention(DIM, HEADS, rel_pos="xl", kv_dim=16)
    with pytest.raises(ValueError, match="dim must be even"):
        TransformerXLRelPos(9, 3)
    with pytest.raises(ValueError, match="divisible"):
        TransformerXLRelPos(10, 3)
    layer = TransformerXLRelPos(DIM, HEADS)
    with pytest.raises(ValueError, match=r"queries must have shape \(B, 3, Nq, 8\)"):
        layer(torch.randn(1, 2, 5, 8), 5, 0.1)
    with pytest.raises(ValueError, match="n_k must be a positive int"):
        layer(torch.randn(1, 3, 5, 8), 0, 0.1)


def test_bench_relpos_smoke(capsys):
    """`zoo bench relpos` at a tiny size: both layers agree before timing and the row has positive times."""
    from zoo.bench import relpos

    assert relpos.main(["--cases", "2x9", "--dim", "24", "--heads", "3", "--repeats", "1", "--warmup", "0"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 | 9 |")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert all(float(cells[i]) > 0 for i in (2, 3, 5, 6)) and float(cells[8]) < 1e-4
    with pytest.raises(SystemExit):
        relpos.main(["--cases", "2x9", "--dim", "25"])
    assert "even --dim" in capsys.readouterr().err


def test_kept_table_follows_autocast_and_wrong_dtype_is_named():
    """The no-grad table is built under whatever autocast is on: one built under bf16 autocast for fp32
    queries was kept under the fp32 key, and the next fp32 call without autocast failed inside torch ("expected
    m1 and m2 to have the same dtype"). It is rebuilt now, and equals a fresh fp32 table. bf16 queries with fp32
    weights (no autocast) name both dtypes."""
    torch.manual_seed(0)
    rel = TransformerXLRelPos(32, 4).eval()
    q = torch.randn(1, 4, 6, 8)
    with torch.no_grad():
        _, fresh = rel(q, 6, 8 ** -0.5)
        rel._tables = {}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, under = rel(q, 6, 8 ** -0.5)
        _, after = rel(q, 6, 8 ** -0.5)
    assert under.dtype == torch.bfloat16 and after.dtype == torch.float32
    torch.testing.assert_close(after, fresh, rtol=0, atol=0)
    with pytest.raises(TypeError, match="TransformerXLRelPos: q is torch.bfloat16 but the TransformerXLRelPos's "
                                        "weights are torch.float32"):
        TransformerXLRelPos(32, 4)(q.bfloat16(), 6, 8 ** -0.5)


@pytest.mark.parametrize("q_offset", [-6, -2, 0, 5])
def test_kept_table_serves_queries_before_and_after_the_keys(q_offset):
    """forward(..., q_offset) without gradients reads the kept projected table; the rows it slices must be the
    distances q_offset + i - j also when the largest distance is negative (queries placed before all keys).
    Reference: the bias written from the definition in float64, scale * (q_i + v) . W_pos s(q_offset + i - j),
    s from _sinusoid_f64; the same call with gradients enabled (no table) must agree too."""
    torch.manual_seed(0)
    layer = TransformerXLRelPos(16, 2).double()
    with torch.no_grad():
        layer.pos_bias_v.normal_()
    n_q, n_k, scale = 3, 4, 0.37
    q = torch.randn(2, 2, n_q, 8, dtype=torch.float64)
    w_pos, vb = layer.linear_pos.weight.detach(), layer.pos_bias_v.detach()
    want = torch.empty(2, 2, n_q, n_k, dtype=torch.float64)
    for i in range(n_q):
        for j in range(n_k):
            p = (w_pos @ _sinusoid_f64(q_offset + i - j, 16)).view(2, 8)
            want[:, :, i, j] = scale * ((q[:, :, i] + vb) * p).sum(-1)
    with torch.no_grad():
        _, kept = layer(q, n_k, scale, q_offset=q_offset)
    _, fresh = layer(q, n_k, scale, q_offset=q_offset)
    torch.testing.assert_close(kept, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fresh.detach(), want, rtol=1e-12, atol=1e-12)


def test_rel_shift_refuses_a_distance_axis_of_the_wrong_length():
    """rel_shift reads scores against exactly Nq + Nk - 1 distances: a longer or shorter last dim (scores from a
    table sliced for another Nk) is an error, not a strided view of the wrong entries."""
    for length in (5, 7):
        with pytest.raises(ValueError, match=r"Nq \+ Nk - 1 = 6, got " + str(length)):
            rel_shift(torch.zeros(1, 2, 3, length), 4)
    assert rel_shift(torch.zeros(1, 2, 3, 6), 4).shape == (1, 2, 3, 4)


def test_pos_bias_u_and_v_start_as_espnet_xavier_uniform():
    """ESPnet's RelPositionMultiHeadedAttention initialises pos_bias_u and pos_bias_v with
    torch.nn.init.xavier_uniform_: uniform on [-a, a], a = sqrt(6 / (H + D)), so standard deviation a / sqrt(3)."""
    torch.manual_seed(0)
    layer = TransformerXLRelPos(256, 4)  # (4, 64): 256 draws each
    bound = math.sqrt(6.0 / (4 + 64))
    for param in (layer.pos_bias_u, layer.pos_bias_v):
        values = param.detach()
        assert float(values.abs().max()) <= bound
        assert abs(float(values.std()) - bound / math.sqrt(3.0)) < 0.15 * bound / math.sqrt(3.0)
