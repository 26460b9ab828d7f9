"""MultiHeadAttention and RoPE against trusted references.

* a float64 hand-written multi-head attention (projections by weight slices, explicit softmax/sigmoid,
  repeat_interleave for GQA) -- forward and parameter gradients;
* torch.nn.MultiheadAttention (self attention, cross attention with other kdim/vdim, bool masks);
* timm's Attention (state dict both ways) and AttentionRope with grouped-query heads;
* RoPE: a complex-number float64 re-derivation of RoFormer / RoPE-ViT axial rotations, and the
  relative-position property (scores depend only on position differences).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from zoo.attention import AttentionBias, Causal, capture_attention
from zoo.attention.modules import Mlp, MultiHeadAttention
from zoo.attention.rope import RotaryEmbedding


# --------------------------------------------------------------------------------------------------
# float64 references
# --------------------------------------------------------------------------------------------------
def rope_reference(x, positions, mode, theta, axes_dims=None):
    """Complex-number RoPE on float64: pairs (x_2i, x_2i+1) as complex numbers times exp(i * angle)."""
    if mode == "3d":
        return _wan_rope_reference(x, positions, axes_dims, theta)
    d = x.shape[-1]
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    if mode == "1d":
        freqs = torch.tensor([theta ** (-2.0 * i / d) for i in range(d // 2)], dtype=torch.float64)
        angle = positions.double()[..., None] * freqs
    else:  # RoPE-ViT compute_axial_cis: D/4 frequencies theta^(-4i/D); column (x) pairs first, then rows (y)
        freqs = torch.tensor([theta ** (-4.0 * i / d) for i in range(d // 4)], dtype=torch.float64)
        rows, cols = positions.double()[..., 0], positions.double()[..., 1]
        angle = torch.cat([cols[..., None] * freqs, rows[..., None] * freqs], dim=-1)
    out = xc * torch.polar(torch.ones_like(angle), angle)
    return torch.view_as_real(out).reshape(x.shape)


def mha_reference(m, x, context=None, allowed=None, bias=None, score="softmax", rope_pos=None, weights_out=None):
    """Multi-head attention written out in float64 from the module's parameters (functional: grads flow)."""
    h, hkv, d = m.num_heads, m.num_kv_heads, m.head_dim
    x = x.double()
    if m.is_cross:
        ctx = context.double()
        q = nn.functional.linear(x, m.q.weight.double(), None if m.q.bias is None else m.q.bias.double())
        kv = nn.functional.linear(ctx, m.kv.weight.double(), None if m.kv.bias is None else m.kv.bias.double())
        k, v = kv[..., : hkv * d], kv[..., hkv * d :]
    else:
        w = m.qkv.weight.double()
        b = None if m.qkv.bias is None else m.qkv.bias.double()
        qkv = nn.functional.linear(x, w, b)
        q, k, v = qkv[..., : h * d], qkv[..., h * d : h * d + hkv * d], qkv[..., h * d + hkv * d :]
    bsz, n, _ = q.shape
    m_len = k.shape[1]
    q = q.reshape(bsz, n, h, d).transpose(1, 2)
    k = k.reshape(bsz, m_len, hkv, d).transpose(1, 2)
    v = v.reshape(bsz, m_len, hkv, d).transpose(1, 2)
    if isinstance(m.q_norm, nn.LayerNorm):
        q = nn.functional.layer_norm(q, (d,), m.q_norm.weight.double(), m.q_norm.bias.double(), m.q_norm.eps)
        k = nn.functional.layer_norm(k, (d,), m.k_norm.weight.double(), m.k_norm.bias.double(), m.k_norm.eps)
    if rope_pos is not None:
        p = m.num_prefix_tokens
        rope_args = (rope_pos, m.rope.mode, m.rope.theta, m.rope.axes_dims)
        q = torch.cat([q[:, :, :p], rope_reference(q[:, :, p:], *rope_args)], dim=2)
        k = torch.cat([k[:, :, :p], rope_reference(k[:, :, p:], *rope_args)], dim=2)
    k = k.repeat_interleave(h // hkv, dim=1)
    v = v.repeat_interleave(h // hkv, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    if bias is not None:
        s = s + bias.double()
    if score == "softmax":
        if allowed is not None:
            s = s.masked_fill(~allowed, -math.inf)
        p = torch.softmax(s, dim=-1)
    else:
        p = torch.sigmoid(s - math.log(m_len))
        if allowed is not None:
            p = p * allowed
    if weights_out is not None:
        weights_out.append(p)
    out = (p @ v).transpose(1, 2).reshape(bsz, n, h * d)
    return nn.functional.linear(out, m.proj.weight.double(), None if m.proj.bias is None else m.proj.bias.double())


class TableBias(AttentionBias):
    """A learned (H, N, N) bias table: stands in for the relative-position bias objects."""

    def __init__(self, heads, n):
        super().__init__()
        self.table = nn.Parameter(torch.randn(heads, n, n) * 0.5)

    def materialize(self, q_len, k_len, *, device=None, dtype=None):
        return self.table[:, :q_len, :k_len].unsqueeze(0).to(device=device, dtype=dtype)


def _randomise(m):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return m


# --------------------------------------------------------------------------------------------------
# MultiHeadAttention vs the float64 reference
# --------------------------------------------------------------------------------------------------
CONFIGS = [
    dict(dim=48, num_heads=4, qkv_bias=True),
    dict(dim=48, num_heads=4, num_kv_heads=2),
    dict(dim=48, num_heads=6, num_kv_heads=1, qkv_bias=True),
    dict(dim=48, num_heads=4, qk_norm=True, proj_bias=False),
    dict(dim=40, num_heads=2, head_dim=12, qkv_bias=True),
    dict(dim=48, num_heads=4, score="sigmoid"),
    dict(dim=48, num_heads=4, kv_dim=20, qkv_bias=True),
    dict(dim=48, num_heads=4, kv_dim=20, num_kv_heads=2),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items() if k != "dim"))
def test_mha_matches_float64_reference(cfg):
    torch.manual_seed(0)
    m = _randomise(MultiHeadAttention(**cfg)).double()
    x = torch.randn(2, 7, cfg["dim"], dtype=torch.float64)
    context = torch.randn(2, 5, cfg["kv_dim"], dtype=torch.float64) if "kv_dim" in cfg else None
    out = m(x, context)
    ref = mha_reference(m, x, context, score=cfg.get("score", "softmax"))
    assert out.shape == (2, 7, cfg["dim"])
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    # parameter gradients through attend() equal those of the reference
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad((out * grad_out).sum(), list(m.parameters()))
    grads_ref = torch.autograd.grad((ref * grad_out).sum(), list(m.parameters()))
    for (name, _), g, g_ref in zip(m.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-9, rtol=1e-9, msg=lambda s: f"grad of {name}: {s}")


@pytest.mark.parametrize("cfg", [dict(qkv_bias=True), dict(num_kv_heads=2, qk_norm=True)])
def test_num_queries_computes_the_first_rows_only(cfg):
    torch.manual_seed(9)
    m = _randomise(MultiHeadAttention(48, 4, **cfg)).double()
    x = torch.randn(2, 9, 48, dtype=torch.float64)
    out = m(x, num_queries=3)
    assert out.shape == (2, 3, 48)
    torch.testing.assert_close(out, mha_reference(m, x)[:, :3], atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="num_queries must be an int"):
        m(x, num_queries=10)
    with pytest.raises(ValueError, match="RoPE"):
        MultiHeadAttention(48, 4, rope="1d")(x.float(), num_queries=2)


@pytest.mark.parametrize("rel", [False, True])
def test_num_queries_sees_the_first_rows_of_masks_and_biases(rel):
    """num_queries computes the first n tokens' outputs: with a mask or bias they must equal the first rows of
    the full forward. Masks and biases place queries bottom-right (the last Nq key positions, as for a KV
    cache), so the first tokens used to see the future under Causal / Window / ChunkWindow."""
    from zoo.attention import ChunkWindow, Window

    torch.manual_seed(3)
    n = 6
    m = _randomise(MultiHeadAttention(16, 4, rel_pos_bias=TableBias(4, n) if rel else None)).double().eval()
    x = torch.randn(2, n, 16, dtype=torch.float64)
    bias = torch.randn(4, n, n, dtype=torch.float64)
    masks = [None, Causal(), Window(1, 0), ChunkWindow(2), torch.rand(n, n) > 0.3]
    with torch.no_grad():
        for mask in masks:
            for b in (None, bias):
                full = m(x, mask=mask, bias=b)
                for n_q in (1, 2, n):
                    torch.testing.assert_close(m(x, mask=mask, bias=b, num_queries=n_q), full[:, :n_q],
                                               atol=1e-12, rtol=0, msg=lambda s: f"{mask!r} bias={b is not None} {s}")
        # a mask or bias already shaped for the n_q queries is taken as it is
        rows = torch.tril(torch.ones(n, n, dtype=torch.bool))[:2]
        torch.testing.assert_close(m(x, mask=rows, num_queries=2), m(x, mask=Causal(), num_queries=2) if not rel
                                   else m(x, mask=torch.tril(torch.ones(n, n, dtype=torch.bool)))[:, :2])


def test_bool_or_misshapen_bias_is_refused_beside_relative_positions():
    """The user's bias meets attend()'s checks before it is added to a relative-position bias (a bool tensor
    used to add as 0/1; a wrong shape raised torch's broadcast error)."""
    x = torch.randn(2, 4, 16)
    keep = torch.tensor([[True, True, False, False]]).expand(4, 4)
    for m in (MultiHeadAttention(16, 4, rel_pos_bias=TableBias(4, 4)), MultiHeadAttention(16, 4, rel_pos="xl")):
        with pytest.raises(TypeError, match="bias must be a floating-point tensor, got torch.bool"):
            m(x, bias=keep)
        with pytest.raises(ValueError, match=r"bias of shape \(1, 1, 3, 5\) does not broadcast"):
            m(x, bias=torch.zeros(3, 5))
        with pytest.raises(TypeError, match="bias must be a float tensor"):
            m(x, bias=[[0.0] * 4] * 4)


def test_mha_mask_bias_and_rel_pos_bias_in_float32():
    torch.manual_seed(1)
    n = 9
    rel = TableBias(4, n)
    m = _randomise(MultiHeadAttention(32, 4, qkv_bias=True, rel_pos_bias=rel))
    x = torch.randn(3, n, 32)
    extra = torch.randn(3, 1, n, n)
    out = m(x, mask=Causal(), bias=extra)
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    ref = mha_reference(m, x, allowed=allowed, bias=rel.table.unsqueeze(0) + extra)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    # the bias table is a parameter of the module and receives gradients
    assert "rel_pos_bias.table" in m.state_dict()
    out.sum().backward()
    assert rel.table.grad is not None and rel.table.grad.abs().sum() > 0
    # only the rel-pos bias: attend() materialises it
    torch.testing.assert_close(m(x).double(), mha_reference(m, x, bias=rel.table.unsqueeze(0)), atol=2e-5, rtol=1e-5)


def test_attention_dropout_only_in_training():
    torch.manual_seed(2)
    m = _randomise(MultiHeadAttention(32, 4, attn_drop=0.5))
    x = torch.randn(2, 6, 32)
    m.eval()
    torch.testing.assert_close(m(x).double(), mha_reference(m, x), atol=2e-5, rtol=1e-5)
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    b = m(x)
    assert not torch.allclose(a, b), "attention dropout must act in training"


def test_capture_records_attention_probabilities():
    torch.manual_seed(3)
    m = _randomise(MultiHeadAttention(32, 4, qkv_bias=True))
    x = torch.randn(2, 5, 32)
    with capture_attention() as maps:
        out = m(x)
    assert len(maps) == 1 and maps[0].weights.shape == (2, 4, 5, 5)
    ref_weights = []
    ref = mha_reference(m, x, weights_out=ref_weights)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(maps[0].weights.double(), ref_weights[0], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        m(x)
    assert len(maps) == 1, "nothing is recorded outside the context manager"


# --------------------------------------------------------------------------------------------------
# Peers: torch.nn.MultiheadAttention and timm
# --------------------------------------------------------------------------------------------------
def test_matches_torch_multihead_attention_self():
    torch.manual_seed(4)
    peer = nn.MultiheadAttention(48, 6, batch_first=True).eval()
    _randomise(peer)
    m = MultiHeadAttention(48, 6, qkv_bias=True).eval()
    m.load_state_dict(
        {
            "qkv.weight": peer.in_proj_weight, "qkv.bias": peer.in_proj_bias,
            "proj.weight": peer.out_proj.weight, "proj.bias": peer.out_proj.bias,
        }
    )
    x = torch.randn(3, 11, 48)
    ref, _ = peer(x, x, x, need_weights=False)
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    # torch's bool attn_mask marks *disallowed* pairs; ours marks allowed ones
    disallowed = torch.rand(11, 11, generator=torch.Generator().manual_seed(0)) < 0.3
    disallowed.fill_diagonal_(False)
    ref_masked, _ = peer(x, x, x, attn_mask=disallowed, need_weights=False)
    torch.testing.assert_close(m(x, mask=~disallowed), ref_masked, atol=1e-5, rtol=1e-5)


def test_matches_torch_multihead_attention_cross():
    torch.manual_seed(5)
    peer = nn.MultiheadAttention(32, 4, kdim=20, vdim=20, batch_first=True).eval()
    _randomise(peer)
    m = MultiHeadAttention(32, 4, kv_dim=20, qkv_bias=True).eval()
    bias_q, bias_k, bias_v = peer.in_proj_bias.chunk(3)
    m.load_state_dict(
        {
            "q.weight": peer.q_proj_weight, "q.bias": bias_q,
            "kv.weight": torch.cat([peer.k_proj_weight, peer.v_proj_weight]), "kv.bias": torch.cat([bias_k, bias_v]),
            "proj.weight": peer.out_proj.weight, "proj.bias": peer.out_proj.bias,
        }
    )
    x, ctx = torch.randn(2, 7, 32), torch.randn(2, 13, 20)
    ref, _ = peer(x, ctx, ctx, need_weights=False)
    torch.testing.assert_close(m(x, ctx), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_timm_attention_state_dict_both_ways(qk_norm):
    from timm.layers import Attention, LayerNorm

    torch.manual_seed(6)
    peer = _randomise(Attention(64, 4, qkv_bias=True, qk_norm=qk_norm, norm_layer=LayerNorm)).eval()
    m = MultiHeadAttention(64, 4, qkv_bias=True, qk_norm=qk_norm, norm_layer=LayerNorm).eval()
    m.load_state_dict(peer.state_dict(), strict=True)
    x = torch.randn(2, 10, 64)
    torch.testing.assert_close(m(x), peer(x), atol=1e-5, rtol=1e-5)
    peer2 = Attention(64, 4, qkv_bias=True, qk_norm=qk_norm, norm_layer=LayerNorm).eval()
    peer2.load_state_dict(m.state_dict(), strict=True)
    torch.testing.assert_close(peer2(x), m(x), atol=1e-5, rtol=1e-5)


def test_gqa_matches_timm_attention_rope_unfused():
    from timm.layers.attention import AttentionRope

    torch.manual_seed(7)
    peer = _randomise(AttentionRope(64, 8, num_kv_heads=2, qkv_fused=False, qkv_bias=True, num_prefix_tokens=0)).eval()
    m = MultiHeadAttention(64, 8, num_kv_heads=2, qkv_bias=True).eval()
    sd = peer.state_dict()
    m.load_state_dict(
        {
            "qkv.weight": torch.cat([sd["q_proj.weight"], sd["k_proj.weight"], sd["v_proj.weight"]]),
            "qkv.bias": torch.cat([sd["q_proj.bias"], sd["k_proj.bias"], sd["v_proj.bias"]]),
            "proj.weight": sd["proj.weight"], "proj.bias": sd["proj.bias"],
        }
    )
    assert m.qkv.weight.shape == (64 + 2 * 2 * 8, 64)
    x = torch.randn(2, 9, 64)
    torch.testing.assert_close(m(x), peer(x), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,theta", [("1d", None), ("1d", 500.0), ("2d", None), ("2d", 10000.0)])
def test_rope_matches_complex_reference(mode, theta):
    d = 16
    rope = RotaryEmbedding(d, mode, theta=theta)
    x = torch.randn(2, 3, 12, d, dtype=torch.float64)
    if mode == "1d":
        pos = torch.arange(12)
        default = rope(x)
    else:
        pos = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij"), -1).reshape(12, 2)
        default = rope(x, (3, 4))
    ref = rope_reference(x, pos, mode, rope.theta)
    torch.testing.assert_close(default, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(rope(x, pos.float()), ref, atol=1e-5, rtol=1e-5)
    assert rope.theta == (theta or {"1d": 10000.0, "2d": 100.0}[mode])


def test_rope_scores_depend_only_on_position_differences():
    d = 32
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, d, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 1, d, generator=g, dtype=torch.float64)

    def score(rope, pq, pk):
        return float((rope(q, pq) * rope(k, pk)).sum())

    r1 = RotaryEmbedding(d, "1d")
    base = score(r1, torch.tensor([3.0]), torch.tensor([10.0]))
    for shift in (1.0, 17.0, 250.5):
        assert score(r1, torch.tensor([3.0 + shift]), torch.tensor([10.0 + shift])) == pytest.approx(base, abs=1e-9)
    assert abs(score(r1, torch.tensor([3.0]), torch.tensor([11.0])) - base) > 1e-6  # it is not position-blind

    r2 = RotaryEmbedding(d, "2d")
    base2 = score(r2, torch.tensor([[1.0, 2.0]]), torch.tensor([[4.0, 0.0]]))
    for dr, dc in ((1.0, 0.0), (0.0, 5.0), (-3.0, 7.0)):
        shifted = score(r2, torch.tensor([[1.0 + dr, 2.0 + dc]]), torch.tensor([[4.0 + dr, 0.0 + dc]]))
        assert shifted == pytest.approx(base2, abs=1e-9)
    # rows and columns are distinct axes
    assert abs(score(r2, torch.tensor([[2.0, 1.0]]), torch.tensor([[0.0, 4.0]])) - base2) > 1e-6
    # rotations keep norms
    torch.testing.assert_close(r2(q, torch.tensor([[5.0, 6.0]])).norm(), q.norm())


def _wan_rope_reference(x, positions, axes_dims, theta):
    """Wan 2.1's 3D RoPE re-derived in float64 (wan/modules/model.py rope_params / rope_apply): the channel pairs
    split into consecutive (frame, row, col) groups, each rotated as complex numbers by its coordinate times its
    own 1D frequencies theta^(-2i/d_axis)."""
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], x.shape[-1] // 2, 2).contiguous())
    parts = []
    start = 0
    for axis, d in enumerate(axes_dims):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angle = positions.double()[..., axis, None] * freqs
        parts.append(xc[..., start : start + d // 2] * torch.polar(torch.ones_like(angle), angle))
        start += d // 2
    return torch.view_as_real(torch.cat(parts, dim=-1)).reshape(x.shape)


@pytest.mark.parametrize("axes_dims", [None, (4, 6, 6)], ids=["Wan split", "custom split"])
def test_rope_3d_matches_the_wan_reference(axes_dims):
    d, frames, rows, cols = 16, 2, 3, 4
    rope = RotaryEmbedding(d, "3d", axes_dims=axes_dims)
    assert rope.axes_dims == (axes_dims or (16 - 4 * 2, 4, 4))  # Wan: D - 4*(D//6), 2*(D//6), 2*(D//6)
    x = torch.randn(2, 3, frames * rows * cols, d, dtype=torch.float64)
    # frame-major, row-major token order (zoo.attention.Radial's layout)
    pos = torch.stack(torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(cols), indexing="ij"),
                      -1).reshape(-1, 3)
    ref = _wan_rope_reference(x, pos, rope.axes_dims, 10000.0)
    torch.testing.assert_close(rope(x, (frames, rows, cols)), ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(rope(x, pos.float()), ref, atol=1e-5, rtol=1e-5)
    # scores depend only on (frame, row, col) differences, each axis on its own
    q, k = x[:1, :1, :1], x[:1, :1, 1:2]

    def score(pq, pk):
        return float((rope(q, torch.tensor([pq])) * rope(k, torch.tensor([pk]))).sum())

    base = score([1.0, 2.0, 0.0], [0.0, 1.0, 3.0])
    assert score([4.0, 2.5, 7.0], [3.0, 1.5, 10.0]) == pytest.approx(base, abs=1e-9)
    assert abs(score([1.0, 2.0, 0.0], [0.0, 1.0, 4.0]) - base) > 1e-6


def test_mha_with_rope_3d_and_its_errors():
    torch.manual_seed(9)
    m = _randomise(MultiHeadAttention(48, 4, rope="3d")).double()
    x = torch.randn(2, 2 * 2 * 3, 48, dtype=torch.float64)
    pos = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(2), torch.arange(3), indexing="ij"), -1).reshape(-1, 3)
    got = m(x, positions=(2, 2, 3))
    torch.testing.assert_close(got, mha_reference(m, x, rope_pos=pos), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got, m(x, positions=pos.double()), atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="3D RoPE: pass positions"):
        m(x)
    with pytest.raises(ValueError, match="grid 2x2x2 has 8 cells"):
        m(x, positions=(2, 2, 2))
    with pytest.raises(ValueError, match="axes_dims must be three positive even numbers"):
        RotaryEmbedding(16, "3d", axes_dims=(4, 4, 4))
    with pytest.raises(ValueError, match="axes_dims is a 3d RoPE argument"):
        RotaryEmbedding(16, "1d", axes_dims=(8, 4, 4))


def test_mha_with_rope_and_prefix_tokens_matches_reference():
    torch.manual_seed(8)
    m = _randomise(MultiHeadAttention(64, 4, qkv_bias=True, rope="2d", num_prefix_tokens=1)).double()
    x = torch.randn(2, 1 + 12, 64, dtype=torch.float64)
    pos = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij"), -1).reshape(12, 2)
    ref = mha_reference(m, x, rope_pos=pos)
    torch.testing.assert_close(m(x, positions=(3, 4)), ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(m(x, positions=pos.double()), ref, atol=1e-10, rtol=1e-10)
    # per-sample positions (B, N, 2)
    torch.testing.assert_close(m(x, positions=pos.double().expand(2, 12, 2)), ref, atol=1e-10, rtol=1e-10)
    # 1D RoPE with default positions 0..N-1 and no prefix
    m1 = _randomise(MultiHeadAttention(64, 4, rope="1d")).double()
    torch.testing.assert_close(m1(x), mha_reference(m1, x, rope_pos=torch.arange(13)), atol=1e-10, rtol=1e-10)
    # a non-square patch count needs explicit positions
    with pytest.raises(ValueError, match="square grid"):
        m(torch.randn(1, 1 + 6, 64, dtype=torch.float64))


_ROPE_LAYOUTS = [("1d", None), ("2d", (4, 5)), ("3d", (2, 2, 5))]  # 20 tokens each


def _rope_positions(mode, grid):
    """The positions a layout's default (1d) or grid size (2d, 3d) stands for, as a float64 reference takes them."""
    if mode == "1d":
        return torch.arange(20)
    axes = [torch.arange(n) for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(grid))


@pytest.mark.parametrize("mode,grid", _ROPE_LAYOUTS, ids=[m for m, _ in _ROPE_LAYOUTS])
def test_rope_float64_after_float32_keeps_float64_precision(mode, grid):
    """The cos/sin kept for default and grid positions are keyed on the compute dtype: a float64 call after a
    float32 one with the same tokens builds float64 ones (reusing the float32 ones gave errors of ~1e-7, which
    breaks float64 reference checks and gradcheck)."""
    rope = RotaryEmbedding(16, mode)
    x = torch.randn(2, 3, 20, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rope(x.float(), grid)  # fills the float32 entry first
    want = rope_reference(x, _rope_positions(mode, grid), mode, rope.theta, rope.axes_dims)
    torch.testing.assert_close(rope(x, grid), want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode,grid", _ROPE_LAYOUTS, ids=[m for m, _ in _ROPE_LAYOUTS])
def test_rope_in_half_precision_rotates_in_float32(dtype, mode, grid):
    """As apply_rotary's docstring says, half-precision inputs are rotated with float32 cos/sin in float32 and
    rounded once: the float32 rotation (itself pinned by the float64 references above) cast to the half dtype,
    bit for bit (half-precision cos/sin and products round several times)."""
    rope = RotaryEmbedding(16, mode)
    x = torch.randn(2, 3, 20, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = rope(x, grid)
    assert got.dtype == dtype
    assert torch.equal(got, rope(x.float(), grid).to(dtype))


def test_rope_per_sample_positions_of_another_batch_are_refused():
    """Per-sample positions (B', N[, axes]) must have B' = 1 (shared by every sample) or x's batch; positions of
    batch 3 with x of batch 1 were not silently broadcast to a batch-3 output."""
    x1 = torch.randn(1, 2, 6, 16)
    cases = [(RotaryEmbedding(16), torch.arange(6.0).expand(3, 6)),
             (RotaryEmbedding(16, "2d"), _rope_positions("2d", (2, 3)).float().expand(3, 6, 2)),
             (RotaryEmbedding(16, "3d"), _rope_positions("3d", (1, 2, 3)).float().expand(3, 6, 3))]
    for rope, positions in cases:
        with pytest.raises(ValueError, match=r"per-sample positions \(3, 6.*\) are for batch 3 but x has batch 1"):
            rope(x1, positions)
        with pytest.raises(ValueError, match="per-sample positions"):
            rope(torch.randn(2, 2, 6, 16), positions)
        # batch 1 is shared by every sample; the batch of x is one set per sample
        x2 = torch.randn(2, 2, 6, 16, dtype=torch.float64)
        torch.testing.assert_close(rope(x2, positions[:1]), rope(x2, positions[0]), rtol=0, atol=0)
        torch.testing.assert_close(rope(x1.double(), positions[:1]), rope(x1.double(), positions[0]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="per-sample positions"):
        MultiHeadAttention(32, 2, rope="1d")(torch.randn(1, 6, 32), positions=torch.arange(6.0).expand(3, 6))


# --------------------------------------------------------------------------------------------------
# Mlp and bad inputs
# --------------------------------------------------------------------------------------------------
def test_mlp_matches_timm_mlp():
    from timm.layers import Mlp as TimmMlp

    peer = TimmMlp(16, 40).eval()
    m = Mlp(16, 40).eval()
    m.load_state_dict(peer.state_dict(), strict=True)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(m(x), peer(x))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_mlp_inference_gelu_in_place_matches_autograd_path(approximate, monkeypatch):
    """Under no_grad the hidden activation goes through GELU in place (no second hidden-size tensor); the
    result equals the autograd path's and timm's, the input is untouched, and gradients still flow."""
    from timm.layers import Mlp as TimmMlp

    peer = TimmMlp(16, 40, act_layer=lambda: nn.GELU(approximate=approximate)).eval()
    m = Mlp(16, 40, act_layer=lambda: nn.GELU(approximate=approximate)).eval()
    m.load_state_dict(peer.state_dict(), strict=True)
    x = torch.randn(3, 5, 16, requires_grad=True)
    x_before = x.detach().clone()
    in_place_calls = []
    real_gelu_ = torch.ops.aten.gelu_

    def spy(t, approximate="none"):
        in_place_calls.append(approximate)
        return real_gelu_(t, approximate=approximate)

    monkeypatch.setattr(torch.ops.aten, "gelu_", spy)
    with torch.no_grad():
        fast = m(x)
    assert in_place_calls == [approximate]
    assert torch.equal(x.detach(), x_before)
    with_grad = m(x)
    assert in_place_calls == [approximate]  # autograd keeps the module call
    torch.testing.assert_close(fast, with_grad.detach(), rtol=0, atol=0)
    torch.testing.assert_close(with_grad, peer(x))
    with_grad.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    identity = Mlp(16, 16).eval()
    identity.fc1 = nn.Identity()  # fc1 returns the input itself: it must not be overwritten
    with torch.no_grad():
        identity(x)
    assert torch.equal(x.detach(), x_before)
    other = Mlp(16, 40, act_layer=nn.SiLU).eval()  # other activations: the module as given
    with torch.no_grad():
        torch.testing.assert_close(other(x), other.fc2(torch.nn.functional.silu(other.fc1(x))))
    assert in_place_calls == [approximate]


def test_bad_inputs_raise_clear_errors():
    m = MultiHeadAttention(32, 4)
    with pytest.raises(ValueError, match=r"shape \(B, N, 32\)"):
        m(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"shape \(B, N, 32\)"):
        m(torch.randn(5, 32))
    with pytest.raises(ValueError, match="kv_dim"):
        m(torch.randn(2, 5, 32), torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="no RoPE"):
        m(torch.randn(2, 5, 32), positions=torch.arange(5))
    with pytest.raises(ValueError, match="NaN or Inf"):
        m(torch.full((1, 3, 32), float("nan")))
    cross = MultiHeadAttention(32, 4, kv_dim=8)
    with pytest.raises(ValueError, match="pass context"):
        cross(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="batch"):
        cross(torch.randn(2, 5, 32), torch.randn(3, 4, 8))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        MultiHeadAttention(32, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="not divisible"):
        MultiHeadAttention(30, 4)
    with pytest.raises(ValueError, match="rope"):
        MultiHeadAttention(32, 4, rope="4d")
    with pytest.raises(ValueError, match="multiple of 4"):
        MultiHeadAttention(24, 4, rope="2d")  # head_dim 6
    with pytest.raises(TypeError, match="AttentionBias"):
        MultiHeadAttention(32, 4, rel_pos_bias=torch.zeros(4, 5, 5))
    r = MultiHeadAttention(32, 4, rope="1d")
    with pytest.raises(ValueError, match="positions must have shape"):
        r(torch.randn(1, 5, 32), positions=torch.arange(4))


def test_nonfinite_input_or_weights_are_named_by_the_module():
    """The module checks its own input and output (one dot product) instead of attend()'s per-call reductions of
    strided q/k views; a NaN is named where it came from."""
    m = MultiHeadAttention(16, 4).eval()
    x = torch.randn(2, 5, 16)
    bad = x.clone()
    bad[1, 2, 3] = float("nan")
    with torch.no_grad():
        with pytest.raises(ValueError, match="MultiHeadAttention: x contains NaN or Inf"):
            m(bad)
        m.qkv.weight[0, 0] = float("inf")
        with pytest.raises(ValueError, match=r"not finite although the input is: non-finite weights in \['qkv.weight'\]"):
            m(x)
    cross = MultiHeadAttention(16, 4, kv_dim=12).eval()
    context = torch.randn(2, 7, 12)
    context[0, 0, 0] = float("-inf")
    with torch.no_grad(), pytest.raises(ValueError, match="MultiHeadAttention: context contains NaN or Inf"):
        cross(x, context)


@pytest.mark.parametrize("shape", [(0, 5, 48), (3, 0, 48), (0, 0, 48)], ids=["batch0", "tokens0", "both0"])
def test_empty_batch_and_sequence_as_torch_multihead_attention(shape):
    """A batch of 0 rows or of 0 tokens (no proposals for a RoI head, a DDP rank's empty shard, a decode call with
    no new tokens) gives nn.MultiheadAttention's output and input gradient, in training mode too; so does a cross
    attention over an empty context (nn.MultiheadAttention: the projection of zeros, its output bias). The module
    refused both ("x has no batch rows", "has no tokens")."""
    torch.manual_seed(4)
    peer = _randomise(nn.MultiheadAttention(48, 6, batch_first=True))
    m = MultiHeadAttention(48, 6, qkv_bias=True)
    m.load_state_dict({"qkv.weight": peer.in_proj_weight, "qkv.bias": peer.in_proj_bias,
                       "proj.weight": peer.out_proj.weight, "proj.bias": peer.out_proj.bias})
    x = torch.randn(shape, requires_grad=True)
    x_peer = x.detach().clone().requires_grad_(True)
    out, (want, _) = m(x), peer(x_peer, x_peer, x_peer, need_weights=False)
    assert out.shape == want.shape == shape
    out.sum().backward()
    want.sum().backward()
    assert x.grad.shape == x_peer.grad.shape == shape
    assert m.qkv.weight.grad.shape == m.qkv.weight.shape  # the parameters get (zero) gradients, as the peer's
    # RoPE, Transformer-XL positions and a fixed sigmoid length over no token
    for kwargs in (dict(rope="1d", num_prefix_tokens=1), dict(rel_pos="xl"), dict(score="sigmoid", sigmoid_length=8)):
        assert MultiHeadAttention(48, 6, **kwargs)(torch.randn(shape), mask=Causal()).shape == shape

    torch.manual_seed(5)
    cross_peer = _randomise(nn.MultiheadAttention(32, 4, kdim=20, vdim=20, batch_first=True)).eval()
    cross = MultiHeadAttention(32, 4, kv_dim=20, qkv_bias=True).eval()
    bias_q, bias_k, bias_v = cross_peer.in_proj_bias.chunk(3)
    cross.load_state_dict({
        "q.weight": cross_peer.q_proj_weight, "q.bias": bias_q,
        "kv.weight": torch.cat([cross_peer.k_proj_weight, cross_peer.v_proj_weight]),
        "kv.bias": torch.cat([bias_k, bias_v]),
        "proj.weight": cross_peer.out_proj.weight, "proj.bias": cross_peer.out_proj.bias,
    })
    x, ctx = torch.randn(shape[0], 7, 32), torch.randn(shape[0], shape[1], 20)
    torch.testing.assert_close(cross(x, ctx), cross_peer(x, ctx, ctx, need_weights=False)[0], atol=1e-5, rtol=1e-5)


def test_attention_pool_latent_over_an_empty_batch_or_no_tokens():
    """AttentionPoolLatent over (0, N, C) gives (0, C); over (B, 0, C) each latent sees no token (attend()'s
    zeros), so the output is the projection bias through the residual MLP, as for a row whose tokens are all
    masked."""
    from zoo.attention import AttentionPoolLatent

    pool = AttentionPoolLatent(16, 4).eval()
    assert pool(torch.randn(0, 5, 16)).shape == (0, 16)
    masked = pool(torch.randn(2, 5, 16), mask=torch.zeros(2, 1, 1, 5, dtype=torch.bool))
    torch.testing.assert_close(pool(torch.randn(2, 0, 16)), masked)


def test_attention_pool_latent_matches_timm():
    """zoo.attention.AttentionPoolLatent loads timm's AttentionPoolLatent state dict and gives its output and input
    gradient, one latent and several, and with a key mask (padded tokens) equals pooling the unpadded tokens."""
    from timm.layers.attention_pool import AttentionPoolLatent as TimmPool

    from zoo.attention import AttentionPoolLatent

    torch.manual_seed(0)
    for latent_len in (1, 3):
        peer = TimmPool(48, num_heads=4, mlp_ratio=2.0, latent_len=latent_len, norm_layer=nn.LayerNorm)
        ours = AttentionPoolLatent(48, num_heads=4, mlp_ratio=2.0, latent_len=latent_len, norm_eps=1e-5)
        ours.load_state_dict(peer.state_dict(), strict=True)
        x = torch.randn(3, 11, 48, requires_grad=True)
        out = ours(x)
        want = peer(x)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        (want_grad,) = torch.autograd.grad(want.square().sum(), x)
        torch.testing.assert_close(grad, want_grad, atol=1e-5, rtol=1e-5)
    keep = torch.arange(11)[None, None, None] < torch.tensor([11, 7, 4])[:, None, None, None]  # (B, 1, 1, N)
    with torch.no_grad():
        padded = ours(x, mask=keep)
        for b, n in enumerate((11, 7, 4)):
            torch.testing.assert_close(padded[b], ours(x[b : b + 1, :n])[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"input must be \(B, N, 48\) tokens"):
        ours(torch.randn(2, 48))
    with pytest.raises(ValueError, match="must be divisible by num_heads"):
        AttentionPoolLatent(48, num_heads=5)
    # named at the module (were torch's "mat1 and mat2 must have the same dtype" and "attend: k contains NaN")
    with pytest.raises(TypeError, match="AttentionPoolLatent: input is torch.bfloat16 but the module's weights"):
        ours(torch.randn(2, 5, 48).bfloat16())
    with pytest.raises(ValueError, match="AttentionPoolLatent: input contains NaN"):
        ours(torch.full((2, 5, 48), float("nan")))
    # a bare timm module (norm_layer=None) has no norm: it loads into a zoo module whose norm is the identity
    bare = TimmPool(48, num_heads=4, mlp_ratio=2.0, latent_len=3)
    ours.norm = torch.nn.Identity()
    ours.load_state_dict(bare.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ours(x[:, :4]), bare.eval()(x[:, :4]), atol=1e-5, rtol=1e-5)


def test_messages_for_pool_inputs_and_numpy_grids():
    """An integer input to AttentionPoolLatent suggested module.to(torch.int64); a (B, N) key-padding mask got
    "(..., 1, 10) (or (..., 1, 10)" without the layout to use; a numpy-int (rows, cols) grid for 2-D RoPE in
    cross attention was read as a (query, key) positions pair."""
    import numpy as np

    from zoo.attention import AttentionPoolLatent

    pool = AttentionPoolLatent(64, 4).eval()
    x = torch.randn(2, 10, 64)
    with pytest.raises(TypeError, match=r"^AttentionPoolLatent: input must be a floating-point tensor, got torch\.int64$"):
        pool(x.long())
    with pytest.raises(ValueError, match=r"needs \(\.\.\., 1, 10\); a \(B, 10\) key-padding mask is given as "
                                         r"mask\[:, None, None, :\] \(B, 1, 1, 10\)$"):
        pool(x, mask=torch.ones(2, 10, dtype=torch.bool))
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[1, 7:] = False
    torch.testing.assert_close(pool(x, mask=keep[:, None, None, :])[1:], pool(x[1:, :7]))
    cross = MultiHeadAttention(64, 4, kv_dim=64, rope="2d").eval()
    q, ctx = torch.randn(1, 12, 64), torch.randn(1, 12, 64)
    with torch.no_grad():
        torch.testing.assert_close(cross(q, ctx, positions=(np.int64(3), np.int64(4))), cross(q, ctx, positions=(3, 4)))


def test_modules_take_their_input_by_keyword_as_timm_and_torch_do():
    """forward(x_BNC, ...) made mha(x=t) a TypeError (timm's Attention and torch's modules take x=)."""
    from zoo.attention import AgentAttention, AttentionPoolLatent, Mlp

    t = torch.randn(2, 5, 32)
    mha = MultiHeadAttention(32, 4).eval()
    with torch.no_grad():
        torch.testing.assert_close(mha(x=t), mha(t))
        assert Mlp(32, 64)(x=t).shape == (2, 5, 32) and AttentionPoolLatent(32, 4)(x=t).shape == (2, 32)
        assert AgentAttention(32, 4, agent_num=4, window=2)(x=torch.randn(1, 5, 32)).shape == (1, 5, 32)


def test_rope_refuses_fewer_tokens_than_its_prefix():
    """MultiHeadAttention(rope=..., num_prefix_tokens=7) on 5 tokens returned the module's output without RoPE,
    silently (explicit positions ignored too); prefix tokens alone (num_queries=1) still pass unrotated."""
    from zoo.attention import MultiHeadAttention

    for mode in ("1d", "2d"):
        module = MultiHeadAttention(8, 2, rope=mode, num_prefix_tokens=7)
        with pytest.raises(ValueError, match="5 tokens are fewer than num_prefix_tokens=7"):
            module(torch.randn(1, 5, 8))
    # cross attention: one latent query against a context with 2 prefix tokens is valid (the query unrotated)
    cross = MultiHeadAttention(32, 4, kv_dim=16, rope="1d", num_prefix_tokens=2)
    assert cross(torch.randn(1, 1, 32), torch.randn(1, 10, 16)).shape == (1, 1, 32)
    from zoo.attention.rope import RotaryEmbedding

    rope = RotaryEmbedding(4, num_prefix_tokens=1)
    prefix_only = torch.randn(1, 2, 1, 4)
    torch.testing.assert_close(rope(prefix_only), prefix_only)  # nothing to rotate: unchanged
    x = torch.randn(1, 6, 8)
    with pytest.raises(ValueError, match=r"context must have shape \(B, M, 6\)"):
        MultiHeadAttention(8, 2, kv_dim=6)(x, torch.randn(1, 3, 5))


def test_captured_weights_are_detached_from_the_graph():
    """capture_attention records the probabilities detached (its docstring): captured under autograd in training,
    a record neither keeps the graph alive nor needs .detach() before .numpy() (audit 2026-12-07), while the
    module's output still has its gradient."""
    torch.manual_seed(3)
    m = _randomise(MultiHeadAttention(32, 4, qkv_bias=True)).train()
    x = torch.randn(2, 5, 32, requires_grad=True)
    with capture_attention() as maps:
        out = m(x)
    assert out.requires_grad
    assert len(maps) == 1 and not maps[0].weights.requires_grad and maps[0].weights.grad_fn is None
    ref_weights = []
    mha_reference(m, x.detach(), weights_out=ref_weights)
    torch.testing.assert_close(maps[0].weights.double(), ref_weights[0], atol=1e-5, rtol=1e-5)
    maps[0].weights.numpy()


def test_rope_refuses_positions_for_a_call_that_rotates_no_token():
    """A call whose tokens are all prefix tokens rotates none; positions of any length were accepted and ignored
    there, while one rotated token refused a length mismatch (review C, finding 5), which hid a cached call taken
    for the stream's prefix. Positions for no token (or None) pass; others are refused naming num_prefix_tokens.
    In cross attention one positions for both sides belongs to the context when no query is rotated (a class
    query): the keys are then rotated as with the explicit pair (no query positions, the context's)."""
    from zoo.attention import KVCache
    from zoo.attention.rope import grid_positions

    rope = RotaryEmbedding(8, num_prefix_tokens=2)
    prefix_only = torch.randn(1, 2, 2, 8)
    with pytest.raises(ValueError, match=r"RoPE: positions of shape \(7,\) given, but this call rotates no token: "
                                         r"its 2 tokens are all among the num_prefix_tokens=2 leading tokens"):
        rope(prefix_only, torch.arange(7))
    for empty in (None, torch.arange(0), torch.zeros(1, 0)):
        assert torch.equal(rope(prefix_only, empty), prefix_only)
    rope_2d = RotaryEmbedding(8, "2d", num_prefix_tokens=1)
    with pytest.raises(ValueError, match=r"the grid size \(2, 2\) given, but this call rotates no token"):
        rope_2d(prefix_only[:, :, :1], (2, 2))
    assert torch.equal(rope_2d(prefix_only[:, :, :1], grid_positions(2, 2)[:0]), prefix_only[:, :, :1])
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    layer = MultiHeadAttention(16, 2, rope="1d", num_prefix_tokens=2).double().eval()
    with torch.no_grad(), pytest.raises(ValueError, match=r"positions of shape \(7,\) given, but this call rotates "
                                                         r"no token"):
        layer(x[:, :2], positions=torch.arange(7), mask=Causal(), cache=KVCache())
    cross = MultiHeadAttention(16, 2, kv_dim=8, rope="1d", num_prefix_tokens=1).double().eval()
    context = torch.randn(1, 4, 8, dtype=torch.float64)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"positions of shape \(9,\) given, but this call rotates no token: its "
                                             r"1 tokens"):
            cross(x[:, :1], context, positions=(torch.arange(9), torch.arange(3)))
        shared = cross(x[:, :1], context, positions=torch.arange(3) + 2)
        pair = cross(x[:, :1], context, positions=(torch.arange(0), torch.arange(3) + 2))
        unrotated_keys = cross(x[:, :1], context, positions=(torch.arange(0), torch.arange(3)))
    torch.testing.assert_close(shared, pair, rtol=0, atol=0)
    assert not torch.allclose(shared, unrotated_keys)  # the shared positions did rotate the context
