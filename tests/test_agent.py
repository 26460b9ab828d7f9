"""Agent attention and Agent-DeiT vs an independent re-derivation of the official forward.

The reference below (``OfficialAgentDeiT``) is written from the semantics of the official code
(LeapLabTHU/Agent-Attention @207ce3e, agent_transformer/models/agent_deit.py): explicit softmax, biases
re-interpolated and repeated per batch item on every call, agents pooled with AdaptiveAvgPool2d, the class
token handled by its own bias row/column, dwc added to the patch tokens only. It keeps the official
parameter layout, so its random-init state dict loads into the zoo model with strict=True. It also serves
as the "official-style" peer of the speed benchmark (zoo/bench/vision_agent.py loads it from this file).

Beyond the official code the reference accepts a non-square grid (``grid=``), resizing the row/column tables
with a bilinear resize whose other axis has size 1 (a different route to the same 1-D linear resize).
"""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import zoo
import zoo.tasks.vision.agent_deit as agent_deit  # registers agent_deit_* (until tasks/vision/__init__ imports it)
from zoo.attention import capture_attention, use_backend
from zoo.attention.agent import AgentAttention, adaptive_pool_matrix

NAMES = ["agent_deit_debug", "agent_deit_digits", "agent_deit_tiny", "agent_deit_small", "agent_deit_base"]


# --------------------------------------------------------------------------------------------------
# Independent reference (official semantics, plain PyTorch)
# --------------------------------------------------------------------------------------------------
class RefAgentAttention(nn.Module):
    def __init__(self, dim, heads, agent_num, window):
        super().__init__()
        self.heads, self.agent_num, self.window = heads, agent_num, window
        self.scale = (dim // heads) ** -0.5
        # registration order of the official module: own bias parameters first in state_dict()
        for name, shape in (("an_bias", (heads, agent_num, 7, 7)), ("na_bias", (heads, agent_num, 7, 7)),
                            ("ah_bias", (1, heads, agent_num, window, 1)), ("aw_bias", (1, heads, agent_num, 1, window)),
                            ("ha_bias", (1, heads, window, 1, agent_num)), ("wa_bias", (1, heads, 1, window, agent_num)),
                            ("ac_bias", (1, heads, agent_num, 1)), ("ca_bias", (1, heads, 1, agent_num))):
            setattr(self, name, nn.Parameter(torch.randn(shape) * 0.02))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    @staticmethod
    def _axis_resize(t, size, axis):
        """Linear resize of a 5-D table along ``axis`` via a 2-D bilinear resize with a unit other axis."""
        if t.shape[axis] == size:
            return t
        moved = t.movedim(axis, -1)  # (..., S)
        lead = moved.shape[:-1]
        img = moved.reshape(1, -1, 1, moved.shape[-1])
        out = F.interpolate(img, size=(1, size), mode="bilinear", align_corners=False)
        return out.reshape(*lead, size).movedim(-1, axis)

    def forward(self, x, grid=None):
        b, n, c = x.shape
        heads, agents = self.heads, self.agent_num
        d = c // heads
        if grid is None:
            h = w = int(n ** 0.5)  # the official rule (n includes the class token)
        else:
            h, w = grid
        q, k, v = self.qkv(x).reshape(b, n, 3, c).permute(2, 0, 1, 3)
        side = int(agents ** 0.5)
        agent = nn.AdaptiveAvgPool2d((side, side))(q[:, 1:].reshape(b, h, w, c).permute(0, 3, 1, 2))
        agent = agent.reshape(b, c, -1).permute(0, 2, 1)
        q = q.reshape(b, n, heads, d).permute(0, 2, 1, 3)
        k = k.reshape(b, n, heads, d).permute(0, 2, 1, 3)
        v = v.reshape(b, n, heads, d).permute(0, 2, 1, 3)
        agent = agent.reshape(b, agents, heads, d).permute(0, 2, 1, 3)

        pb1 = F.interpolate(self.an_bias, size=(h, w), mode="bilinear").reshape(1, heads, agents, -1).repeat(b, 1, 1, 1)
        ah, aw = self._axis_resize(self.ah_bias, h, 3), self._axis_resize(self.aw_bias, w, 4)
        pb2 = (ah + aw).reshape(1, heads, agents, -1).repeat(b, 1, 1, 1)
        pb = torch.cat([self.ac_bias.repeat(b, 1, 1, 1), pb1 + pb2], dim=-1)
        s1 = (agent * self.scale) @ k.transpose(-2, -1) + pb
        p1 = torch.softmax(s1, dim=-1)
        agent_v = p1 @ v

        ab1 = F.interpolate(self.na_bias, size=(h, w), mode="bilinear").reshape(1, heads, agents, -1)
        ab1 = ab1.permute(0, 1, 3, 2).repeat(b, 1, 1, 1)
        ha, wa = self._axis_resize(self.ha_bias, h, 2), self._axis_resize(self.wa_bias, w, 3)
        ab2 = (ha + wa).reshape(1, heads, -1, agents).repeat(b, 1, 1, 1)
        ab = torch.cat([self.ca_bias.repeat(b, 1, 1, 1), ab1 + ab2], dim=-2)
        s2 = (q * self.scale) @ agent.transpose(-2, -1) + ab
        p2 = torch.softmax(s2, dim=-1)
        out = (p2 @ agent_v).transpose(1, 2).reshape(b, n, c)
        v_img = v[:, :, 1:, :].transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
        out = torch.cat([out[:, :1], out[:, 1:] + self.dwc(v_img).permute(0, 2, 3, 1).reshape(b, n - 1, c)], dim=1)
        return self.proj(out)


class RefAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, grid=None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        p = torch.softmax(s, dim=-1)
        return self.proj((p @ v).transpose(1, 2).reshape(b, n, c))


class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim, heads, agent, agent_num, window):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefAgentAttention(dim, heads, agent_num, window) if agent else RefAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = RefMlp(dim, 4 * dim)

    def forward(self, x, grid=None):
        x = x + self.attn(self.norm1(x), grid)
        return x + self.mlp(self.norm2(x))


class RefPatchEmbed(nn.Module):
    def __init__(self, in_chans, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, stride=patch)


class OfficialAgentDeiT(nn.Module):
    """Official-semantics Agent-DeiT (state dict in the official layout and order)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=192, depth=12,
                 num_heads=3, agent_num=49, agent_layer=-1):
        super().__init__()
        grid = img_size // patch_size
        agent_layer = agent_layer if agent_layer > 0 else depth
        self.patch_size = patch_size
        self.patch_embed = RefPatchEmbed(in_chans, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, embed_dim) * 0.02)
        self.blocks = nn.ModuleList(
            [RefBlock(embed_dim, num_heads, i < agent_layer, agent_num, grid) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x, grid=None, pos_embed=None):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + (self.pos_embed if pos_embed is None else pos_embed)
        for block in self.blocks:
            x = block(x, grid)
        return self.head(self.norm(x)[:, 0])


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Give every parameter (LayerNorm, biases, tables) a non-trivial random value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if name.endswith("_bias") else 0.05
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def _pair_models(**cfg):
    ref = OfficialAgentDeiT(**cfg)
    _randomize(ref)
    zoo_cfg = dict(cfg)
    zoo_cfg["agent_num"] = [cfg.get("agent_num", 49)] * 4
    ours = agent_deit.AgentVisionTransformer(**zoo_cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), ours.eval()


SMALL = dict(img_size=32, patch_size=4, in_chans=3, num_classes=7, embed_dim=24, depth=3, num_heads=3, agent_num=16,
             agent_layer=2)


# --------------------------------------------------------------------------------------------------
# State-dict layout
# --------------------------------------------------------------------------------------------------
def test_tiny_state_dict_matches_official_layout():
    with torch.device("meta"):
        ours = zoo.create_model("agent_deit_tiny")
        ref = OfficialAgentDeiT()
    sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert len(sd) == 272
    assert list(sd) == list(ref_sd)
    assert all(sd[k].shape == ref_sd[k].shape for k in sd)
    assert sd["blocks.0.attn.an_bias"].shape == (3, 49, 7, 7)
    assert sd["blocks.0.attn.ah_bias"].shape == (1, 3, 49, 14, 1)
    assert sd["blocks.11.attn.wa_bias"].shape == (1, 3, 1, 14, 49)
    assert sd["blocks.5.attn.ca_bias"].shape == (1, 3, 1, 49)
    assert list(sd)[:4] == ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    keys = list(sd)
    assert keys.index("blocks.0.attn.ca_bias") < keys.index("blocks.0.attn.qkv.weight")


def test_base_agent_layer_and_small_shapes():
    with torch.device("meta"):
        base = zoo.create_model("agent_deit_base")
        ref = OfficialAgentDeiT(embed_dim=768, num_heads=12, agent_layer=4)
        small = zoo.create_model("agent_deit_small")
    sd = base.state_dict()
    assert list(sd) == list(ref.state_dict())
    assert all(f"blocks.{i}.attn.an_bias" in sd for i in range(4))
    assert not any(f"blocks.{i}.attn.an_bias" in sd for i in range(4, 12))
    assert sd["blocks.3.attn.dwc.weight"].shape == (768, 1, 3, 3)
    assert small.state_dict()["blocks.0.attn.na_bias"].shape == (6, 49, 7, 7)
    assert len(small.state_dict()) == 272


def test_registered_names():
    assert set(NAMES) <= set(zoo.list_models("agent_deit*"))
    for name in NAMES:
        entry = zoo.get_model_entry(name)
        assert entry.task == "vision" and entry.family == "agent_deit"


# --------------------------------------------------------------------------------------------------
# Parity with the official semantics
# --------------------------------------------------------------------------------------------------
def test_tiny_224_matches_official_reference():
    torch.manual_seed(0)
    ref, ours = _pair_models(embed_dim=192, depth=12, num_heads=3)  # agent_deit_tiny
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = ref(x)
        assert (ours(x) - expected).abs().max().item() < 1e-4
        assert (ours.forward_head(ours.forward_features(x)) - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_small_config_with_plain_blocks_matches_reference(backend):
    torch.manual_seed(1)
    ref, ours = _pair_models(**SMALL)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), use_backend(backend):
        assert torch.allclose(ours(x), ref(x), atol=1e-5, rtol=0)


def test_gradients_match_reference():
    torch.manual_seed(2)
    ref, ours = _pair_models(**SMALL)
    ref.train()
    ours.train()
    x = torch.randn(2, 3, 32, 32)
    ref(x).square().sum().backward()
    ours(x).square().sum().backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.allclose(p.grad, ref_grads[name].grad, atol=1e-5, rtol=1e-4), name


# --------------------------------------------------------------------------------------------------
# Any image size
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(40, 24), (20, 36), (12, 12), (64, 64)])
def test_other_sizes_match_reference_with_resized_tables(size):
    torch.manual_seed(3)
    ref, ours = _pair_models(**SMALL)
    h, w = size
    grid = (h // 4, w // 4)
    x = torch.randn(2, 3, h, w)
    pos = ref.pos_embed
    grid_pos = pos[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    grid_pos = F.interpolate(grid_pos, size=grid, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    pos = torch.cat([pos[:, :1], grid_pos], dim=1)
    with torch.no_grad():
        expected = ref(x, grid=grid, pos_embed=pos)
        assert torch.allclose(ours(x), expected, atol=1e-5, rtol=0)
        assert torch.allclose(ours(x), expected, atol=1e-5, rtol=0)  # second call: cached biases


def test_float64_model_resizes_its_position_embedding_in_float64():
    """resize_pos_embed ran F.interpolate in float32 for a float64 model too: its logits at another size were
    ~1e-8 off the float64 reference (a gradcheck-level comparison sees that). fp32 stays fp32."""
    torch.manual_seed(3)
    ref, ours = _pair_models(**SMALL)
    ref, ours = ref.double(), ours.double()
    x = torch.randn(2, 3, 68, 36, dtype=torch.float64)  # grid 17 x 9 from 8 x 8
    grid = (17, 9)
    grid_pos = ref.pos_embed[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    grid_pos = F.interpolate(grid_pos, size=grid, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    resized = agent_deit.resize_pos_embed(ref.pos_embed, grid, (8, 8), **agent_deit.RUN_TIME_RESIZE)  # the forward's
    assert resized.dtype == torch.float64 and torch.equal(resized[:, 1:], grid_pos)
    assert agent_deit.resize_pos_embed(ref.pos_embed, grid, (8, 8)).dtype == torch.float64  # bicubic (loading) too
    with torch.no_grad():
        expected = ref(x, grid=grid, pos_embed=torch.cat([ref.pos_embed[:, :1], grid_pos], dim=1))
        assert (ours(x) - expected).abs().max() < 1e-12
    half = agent_deit.resize_pos_embed(ref.pos_embed.half(), grid, (8, 8))
    assert half.dtype == torch.float16


def test_unpadded_odd_size_150x100():
    torch.manual_seed(4)
    model = zoo.create_model("agent_deit_debug").eval()
    x = torch.randn(2, 3, 150, 100)
    with torch.no_grad():
        out = model(x)
        padded = model(F.pad(x, (0, 0, 0, 2)))  # 150 -> 152 rows: whole 4-px patches
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert torch.allclose(out, padded, atol=1e-6)
    model.train()
    model(x).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_on_the_fly_resize_equals_converted_checkpoint():
    """A checkpoint converted to 48 px gives the same agent tables as the forward of the 32-px model at 48 px; the
    position embedding differs by design (bicubic at loading as the official fine-tuning and timm, bilinear on the
    fly as the official resize_pos_embed helper): with the run-time one put back, the logits agree."""
    torch.manual_seed(5)
    small = zoo.create_model("agent_deit_debug").eval()
    _randomize(small)
    big = zoo.create_model("agent_deit_debug", img_size=48).eval()
    big.load_official_state_dict({"model": small.state_dict()})
    assert big.blocks[0].attn.ah_bias.shape[3] == 12
    bicubic = agent_deit.resize_pos_embed(small.pos_embed.detach(), (12, 12), (8, 8), interpolation="bicubic")
    torch.testing.assert_close(big.pos_embed.detach(), bicubic, rtol=0, atol=0)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        big.pos_embed.copy_(agent_deit.resize_pos_embed(small.pos_embed, (12, 12), (8, 8), **agent_deit.RUN_TIME_RESIZE))
        assert torch.allclose(small(x), big(x), atol=1e-5)


def test_bias_cache_follows_parameter_updates():
    torch.manual_seed(6)
    model = zoo.create_model("agent_deit_debug").eval()
    x = torch.randn(1, 3, 32, 24)
    with torch.no_grad():
        before = model(x)
        model.blocks[0].attn.ac_bias.add_(3.0)
        model.blocks[1].attn.wa_bias.add_(1.0)
        model.pos_embed.add_(0.5)
        after = model(x)
    fresh = zoo.create_model("agent_deit_debug").eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(after, fresh(x), atol=1e-6)
    assert not torch.allclose(before, after, atol=1e-3)
    # A table replaced by a new Parameter (same shape, version 0, the old one freed): the cache must notice.
    for _ in range(3):
        attn = model.blocks[0].attn
        attn.na_bias = nn.Parameter(torch.randn_like(attn.na_bias))
        fresh.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert torch.allclose(model(x), fresh(x), atol=1e-6)


def test_biases_cached_per_size_in_eval_mode_only():
    torch.manual_seed(6)
    model = zoo.create_model("agent_deit_debug").eval()
    attn = model.blocks[0].attn
    with torch.no_grad():
        for size in ((32, 24), (20, 36), (32, 24)):
            model(torch.randn(1, 3, *size))
    assert {key[0] for key in attn._bias_cache} == {(8, 6), (5, 9)}
    assert {grid for grid, _ in model._pos_cache} == {(8, 6), (5, 9)}  # one entry per grid (and inference mode)
    with torch.no_grad():
        first = attn.biases((8, 6))
        assert all(a is b for a, b in zip(first, attn.biases((8, 6))))  # the cached tensors themselves
    model.train()
    attn._bias_cache.clear()
    out = model(torch.randn(2, 3, 20, 36))
    assert not attn._bias_cache  # training: rebuilt every call, gradients reach the tables
    out.sum().backward()
    assert attn.an_bias.grad is not None and attn.ah_bias.grad.abs().sum() > 0


def test_pool_matrix_is_adaptive_average_pooling():
    for grid in [(14, 14), (5, 9), (3, 2), (13, 7)]:
        tokens = torch.randn(2, 1 + grid[0] * grid[1], 6)
        expected = F.adaptive_avg_pool2d(tokens[:, 1:].reshape(2, *grid, 6).permute(0, 3, 1, 2), 7)
        got = adaptive_pool_matrix(grid, 7, prefix=1) @ tokens
        assert torch.allclose(got, expected.flatten(2).transpose(1, 2), atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Methods, shortcut, capture, every registered name
# --------------------------------------------------------------------------------------------------
def test_class_token_shortcut_equals_full_model_forward_and_backward():
    """Inference takes the shortcut (only the class token in the last block) with the full model's logits; with
    autograd the full last block runs, so every parameter -- the last depthwise conv too, whose true gradient is zero
    -- takes part in the loss, as DDP without find_unused_parameters requires (it stopped at the second step)."""
    torch.manual_seed(7)
    model = zoo.create_model("agent_deit_debug")
    _randomize(model)
    x = torch.randn(2, 3, 32, 32)
    calls = []
    dwc = model.blocks[-1].attn.dwc
    conv = dwc.forward
    dwc.forward = lambda *args: calls.append(1) or conv(*args)  # not a hook: a hook turns the shortcut off
    with torch.no_grad():
        fast = model(x)
    assert calls == []  # the shortcut ran
    model.class_token_last_block = False
    with torch.no_grad():
        torch.testing.assert_close(fast, model(x), atol=1e-5, rtol=1e-5)
    model.class_token_last_block = True
    model(x).square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert float(model.blocks[-1].attn.dwc.weight.grad.abs().max()) == 0.0


def test_methods():
    model = zoo.create_model("agent_deit_debug").eval()
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_features(x).shape == (2, 1 + 64, 32)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 32)
    assert model.pretrained_head_keys() == ["head.weight", "head.bias"]
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0, global_pool="avg")
    assert model(x).shape == (2, 32)
    model = zoo.create_model("agent_deit_debug")
    y = torch.randn(2, 3, 32, 32)
    plain = model(y)
    model.set_grad_checkpointing(True)
    checkpointed = model(y)
    checkpointed.sum().backward()
    assert torch.allclose(plain, checkpointed, atol=1e-6)


def test_capture_records_effective_token_attention():
    model = zoo.create_model("agent_deit_debug").eval()
    x = torch.randn(1, 3, 32, 24)
    with torch.no_grad(), capture_attention(model) as maps:
        model(x)
    assert [m.name for m in maps] == ["blocks.0.attn", "blocks.1.attn"]
    n_tok = 1 + 8 * 6
    for m in maps:
        assert m.weights.shape == (1, 2, n_tok, n_tok)
        assert torch.allclose(m.weights.sum(-1), torch.ones(1, 2, n_tok), atol=1e-5)
    # the agent maps travel in the records, and nothing stays on the modules after the capture
    assert maps[0].extra["agent"].shape == (1, 2, 16, n_tok) and maps[0].extra["grid"] == (8, 6)
    assert maps[0].extra["broadcast"].shape == (1, 2, n_tok, 16) and maps[0].module is model.blocks[0].attn
    assert not any(hasattr(m, attr) for m in model.modules()
                   for attr in ("last_agent_attention", "last_broadcast_attention", "last_grid", "zoo_name"))


@pytest.mark.parametrize("name", NAMES)
def test_every_name_forward_backward(name):
    torch.manual_seed(8)
    size = 12 if name == "agent_deit_digits" else 32  # digits: patch 1
    model = zoo.create_model(name, img_size=size, num_classes=5)
    x = torch.randn(2, model.in_chans, size, size)
    out = model(x)
    out.sum().backward()
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_save_and_load_pretrained(tmp_path):
    torch.manual_seed(10)
    model = zoo.create_model("agent_deit_debug", img_size=[24, 40], num_classes=4).eval()
    _randomize(model)
    zoo.save_pretrained(model, tmp_path / "ckpt")
    loaded = zoo.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.patch_embed.grid_size == (6, 10) and loaded.num_classes == 4
    x = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    via_registry = zoo.create_model("agent_deit_debug", pretrained=str(tmp_path / "ckpt")).eval()
    with torch.no_grad():
        assert torch.equal(via_registry(x), model(x))


def test_agent_attention_module_without_prefix():
    torch.manual_seed(9)
    attn = AgentAttention(16, 2, qkv_bias=True, agent_num=4, window=6, num_prefix_tokens=0).eval()
    assert "ac_bias" not in attn.state_dict()
    x = torch.randn(2, 30, 16)
    assert attn(x, grid=(5, 6)).shape == (2, 30, 16)


@pytest.mark.parametrize("prefix", [1, 0])
def test_inference_fast_path_equals_attend_path_and_honours_backend(prefix, monkeypatch):
    """Under no_grad the module skips attend()'s per-call checks (its own check runs once): both stages go
    straight to SDPA when attend() would send them there, with the same output as the attend() path taken
    with autograd; use_backend still decides which backend runs, and autocast dtypes go through attend()."""
    from zoo.attention import backends
    from zoo.attention import core as zcore

    torch.manual_seed(11)
    attn = AgentAttention(16, 2, qkv_bias=True, agent_num=4, window=5, num_prefix_tokens=prefix).eval()
    _randomize(attn)  # bias tables of std 0.5: at their 0.02-std init, outputs without them are within 0.05 too
    x = torch.randn(2, prefix + 20, 16)
    via_attend = attn(x, grid=(4, 5)).detach()  # grad enabled: attend() path
    with torch.no_grad():
        fast = attn(x, grid=(4, 5))
    assert torch.allclose(fast, via_attend, atol=1e-6)
    reference = backends.get_backend("torch")
    calls = []

    def counting_forward(*args):
        calls.append(args[0].shape)
        return original(*args)

    original = reference.forward
    monkeypatch.setattr(reference, "forward", counting_forward)
    straight, validated = [], []
    sdpa_biased, validate = backends.sdpa_biased, zcore._validate
    monkeypatch.setattr(backends, "sdpa_biased", lambda *args: straight.append(args[0].shape) or sdpa_biased(*args))
    monkeypatch.setattr(zcore, "_validate", lambda *args: validated.append(1) or validate(*args))
    with torch.no_grad():  # automatic selection certain to pick SDPA: both stages go straight to it, not via attend()
        assert torch.allclose(attn(x, grid=(4, 5)), via_attend, atol=1e-6)
    assert straight == [(2, 2, 4, 8), (2, 2, prefix + 20, 8)] and not validated
    with torch.no_grad(), use_backend("torch"):
        forced = attn(x, grid=(4, 5))
    assert calls == [(2, 2, 4, 8), (2, 2, prefix + 20, 8)]  # both stages: agents, then every token
    assert torch.allclose(forced, via_attend, atol=1e-5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 q, fp32 biases: attend() converts
        mixed = attn(x, grid=(4, 5))
    assert len(straight) == 2 and mixed.dtype == torch.bfloat16
    # bf16 rounding: 0.004 off (outputs up to 0.9); dropping the eight bias tables moves the output by 0.07-0.10
    torch.testing.assert_close(mixed.float(), via_attend, atol=1e-2, rtol=0)


def test_inference_fast_path_still_rejects_non_finite_input():
    attn = AgentAttention(16, 2, agent_num=4, window=4).eval()
    x = torch.randn(1, 17, 16)
    x[0, 5, 3] = float("nan")
    with torch.no_grad(), pytest.raises(ValueError, match="NaN or Inf"):
        attn(x)
    with pytest.raises(ValueError, match="NaN or Inf"):  # attend() path
        attn(x)
    with torch.no_grad():  # the model checks its image once and tells the blocks not to re-check
        assert torch.isnan(attn(x, check_finite=False)).any()


# --------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    model = zoo.create_model("agent_deit_debug").eval()
    with pytest.raises(ValueError, match="input channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="smaller than the patch"):
        model(torch.randn(1, 3, 3, 32))
    with pytest.raises(ValueError, match="NaN or Inf"):
        model(torch.full((1, 3, 32, 32), float("nan")))
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="square number"):
        AgentAttention(16, 2, agent_num=10)
    with pytest.raises(ValueError, match="divisible"):
        AgentAttention(15, 2)
    attn = AgentAttention(16, 2, agent_num=4)
    with pytest.raises(ValueError, match="not a square grid"):
        attn(torch.randn(1, 11, 16))
    with pytest.raises(ValueError, match="grid"):
        attn(torch.randn(1, 10, 16), grid=(2, 5))
    with pytest.raises(ValueError, match="agent_num"):
        zoo.create_model("agent_deit_debug", agent_num=[16, 16, 15, 16])
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-1)
    for agent_layer in (-5, -100, True, 3):  # -5 was every block, as -1 (depth 2 here)
        with pytest.raises(ValueError, match=r"^agent_layer must be an int in \[1, depth=2\], or -1 / 0 for every "
                                             rf"block, got {agent_layer!r}$"):
            zoo.create_model("agent_deit_debug", agent_layer=agent_layer)


# --------------------------------------------------------------------------------------------------
# Agent-to-patch picture (zoo viz agent)
# --------------------------------------------------------------------------------------------------
def test_agent_maps_and_png(tmp_path):
    from zoo.tasks.vision.viz_agent import agent_main, agent_maps

    model = zoo.create_model("agent_deit_debug").eval()
    _randomize(model)
    x = torch.randn(1, 3, 32, 32)
    logits, maps, grid = agent_maps(model, x, layer=0, head=1)
    assert grid == (8, 8) and maps.shape == (1, 16, 8, 8)
    # independent check: agent 0's map is softmax(scale * a0 . k + B1) over the patch keys of head 1
    block = model.blocks[0]
    with torch.no_grad():
        tokens = model._embed(x)[0]
        q, k, _ = block.attn.qkv(block.norm1(tokens)).reshape(1, 65, 3, 2, 16).permute(2, 0, 3, 1, 4)
        agents = F.adaptive_avg_pool2d(q[0, 1, 1:].reshape(8, 8, 16).permute(2, 0, 1), 4).flatten(1).T  # (16, D)
        b1, _ = block.attn.biases((8, 8))
        p = torch.softmax(agents @ k[0, 1].T * 16 ** -0.5 + b1[0, 1], dim=-1)
    assert torch.allclose(maps[0].reshape(16, 64), p[:, 1:], atol=1e-5)
    assert torch.allclose(logits, model(x), atol=1e-5)
    out = tmp_path / "agents.png"
    assert agent_main(["model=agent_deit_debug", f"out={out}", "image=digits:5", "head=0"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert agent_main(["model=agent_deit_debug", f"out={out}", "layer=7"]) == 2
    assert agent_main(["model=vit_debug", f"out={out}"]) == 2  # not an agent model
    from zoo import cli  # the console command: zoo viz agent ...

    via_cli = tmp_path / "cli.png"
    assert cli.main(["viz", "agent", "model=agent_deit_debug", f"out={via_cli}", "image=digits:5"]) == 0
    assert via_cli.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# Shipped checkpoint (checkpoints/agent_digits)
# --------------------------------------------------------------------------------------------------
def _card_accuracy(readme) -> float:
    """The test accuracy (fraction) the model card states in bold, e.g. "**99.17 %**"."""
    import re

    found = re.search(r"\*\*test accuracy\*\* \| \*\*([0-9.]+) %\*\*", readme.read_text())
    assert found, f"{readme} states no test accuracy"
    return float(found.group(1)) / 100


def _shipped(name: str):
    from pathlib import Path

    ckpt = Path(__file__).resolve().parents[1] / "checkpoints" / name
    if not (ckpt / "model.safetensors").is_file():
        pytest.fail(f"the shipped checkpoint {ckpt} is missing")
    return ckpt


def test_shipped_agent_digits_checkpoint_accuracy(capsys):
    """`zoo eval ckpt=checkpoints/agent_digits` gives the model card's accuracy (357 / 360), and so does a plain
    loop over the fixed test split."""
    import json

    from zoo import cli
    from zoo.tasks.vision.data import DigitsDataModule

    ckpt = _shipped("agent_digits")
    model = zoo.from_pretrained(str(ckpt)).eval()
    assert model.zoo_model_name == "agent_deit_digits"
    data = DigitsDataModule(num_classes=10, img_size=8, in_chans=1, mean=[0.5], std=[0.5])
    data.setup("test")
    correct = total = 0
    with torch.no_grad():
        for images, labels in data.test_dataloader():
            correct += int((model(images).argmax(-1) == labels).sum())
            total += len(labels)
    assert (correct, total) == (357, 360)
    capsys.readouterr()
    assert cli.main(["eval", f"ckpt={ckpt}"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["test/acc1"] == pytest.approx(correct / total, abs=1e-6)
    card = _card_accuracy(ckpt / "README.md")
    assert card >= 0.985 and round(metrics["test/acc1"] * 100, 2) == pytest.approx(card * 100)


def test_experiment_trains_from_the_cli_config(tmp_path):
    """`zoo train experiment=agent_digits` composes and runs on the embedded digits (a few batches)."""
    from zoo.train import run

    result = run.train(run.compose(["experiment=agent_digits", "debug=fast", f"run_dir={tmp_path / 'run'}"]))
    released = zoo.from_pretrained(result["released"])
    assert released.zoo_model_name == "agent_deit_digits" and released.patch_embed.grid_size == (4, 4)


def test_finetune_from_shipped_checkpoint_with_new_head(tmp_path, caplog):
    """`zoo train experiment=agent_digits model.pretrained=checkpoints/agent_digits` on a 3-class image folder:
    the head is re-initialised with a message, everything else loads and is fine-tuned (layer decay on)."""
    import json
    import logging
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from zoo.train import run

    ckpt = _shipped("agent_digits")
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        (tmp_path / "imgs" / "train" / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(tmp_path / "imgs" / "train" / name / f"{i}.png")
    overrides = [
        "experiment=agent_digits", "debug=fast", "num_threads=1", f"run_dir={tmp_path / 'tuned'}",
        f"model.pretrained={ckpt}", "data=image_folder", f"data.root={tmp_path / 'imgs'}", "data.num_classes=3",
        "data.img_size=8", "data.in_chans=1", "data.mean=[0.5]", "data.std=[0.5]", "data.batch_size=4",
        "data.num_workers=0", "data.augment=crop", "data.val_fraction=0.2", "task.layer_decay=0.75", "test=false",
    ]
    with caplog.at_level(logging.WARNING, logger="zoo.hub"):
        tuned = run.train(run.compose(overrides))
    assert "classifier re-initialised" in caplog.text
    config = json.loads((Path(tuned["released"]) / "config.json").read_text())
    assert config["model_name"] == "agent_deit_digits" and config["num_classes"] == 3
    pre = zoo.from_pretrained(ckpt)
    post = zoo.from_pretrained(tuned["released"])
    assert post.head.weight.shape == (3, 64)
    for key in ("blocks.0.attn.an_bias", "blocks.0.attn.qkv.weight"):
        before, after = pre.state_dict()[key], post.state_dict()[key]
        assert not torch.equal(before, after) and (before - after).abs().max() < 0.1, key  # tuned from the checkpoint


def test_bench_vision_agent_smoke(capsys):
    """`zoo bench vision_agent` at a tiny size: the three models agree before timing, and the table has a row
    per (size, batch) with positive paired ratios."""
    from zoo.bench import vision_agent

    assert vision_agent.main(["--sizes", "64", "--batches", "1,2", "--repeats", "2", "--warmup", "0",
                              "--min-time", "0", "--markdown"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 64 |")]
    assert "command: `zoo bench vision_agent --sizes 64 --batches 1,2" in out and "load average at end" in out
    with pytest.raises(SystemExit):
        vision_agent.main(["--sizes", "64", "--batches", "1", "--min-time", "-1"])
    assert "--min-time >= 0" in capsys.readouterr().err
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(float(c) > 0 for c in cells[2:7])
        faults = cells[7].split("/")  # page faults per forward of zoo / timm / official
        assert len(faults) == 3 and all(f == "-" or float(f) >= 0 for f in faults)


def test_bench_vision_agent_compiled_smoke(capsys):
    """--compile times the three models under torch.compile (the 'eager' backend here: Dynamo capture only)
    and says so in the header; an unknown backend is a usage error naming the choices."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from zoo.bench import vision_agent

    counters.clear()
    assert vision_agent.main(["--sizes", "64", "--batches", "1", "--repeats", "1", "--warmup", "0",
                              "--min-time", "0", "--compile", "eager"]) == 0  # the plain-text table
    out = capsys.readouterr().out
    rows = [r.split() for r in out.splitlines() if r.split()[:2] == ["64", "1"]]
    assert "torch.compile backend eager" in out and len(rows) == 1 and all(float(c) >= 0 for c in rows[0][2:7])
    assert counters["stats"]["unique_graphs"] >= 3  # zoo, timm and the official-style forward were captured
    torch._dynamo.reset()
    with pytest.raises(SystemExit):
        vision_agent.main(["--sizes", "64", "--compile", "inducter"])
    assert "--compile must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        vision_agent.main(["--sizes", "64", "--compile", "eager", "--freeze"])
    assert "--freeze is an inductor option" in capsys.readouterr().err


def test_bench_vision_agent_freeze_sets_inductor_freezing_for_the_run(monkeypatch):
    """--freeze turns inductor's freezing on while the models are measured, and off again afterwards."""
    import torch._inductor.config as inductor_config

    from zoo.bench import vision_agent

    seen = []
    monkeypatch.setattr(vision_agent, "_measure", lambda *args: seen.append(inductor_config.freezing))
    before = inductor_config.freezing
    assert vision_agent.main(["--sizes", "64", "--batches", "1", "--compile", "inductor", "--freeze", "--markdown"]) == 0
    assert seen == [True] and inductor_config.freezing == before


@pytest.mark.parametrize("batch", [1, 3])
def test_depthwise_conv_gets_a_channels_last_contiguous_input(batch):
    """oneDNN's depthwise kernel is fast only on a truly channels-last input; the strided view out of the fused
    qkv output sends batches > 1 to a reorder path 8-12x slower. Checked structurally with a pre-hook."""
    attn = AgentAttention(32, num_heads=2, agent_num=4, window=4)
    seen = []
    attn.dwc.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        attn(torch.randn(batch, 17, 32))
    attn(torch.randn(batch, 17, 32))  # autograd path too
    assert seen == [True, True]


def test_set_input_size_equals_loading_the_checkpoint_at_that_size(tmp_path):
    """set_input_size (timm's method) resamples the position embedding and the row/column bias tables exactly
    as loading the checkpoint at that size does, records the size for save_pretrained, and refuses an image
    smaller than a patch."""
    torch.manual_seed(0)
    model = zoo.create_model("agent_deit_debug").eval()
    zoo.save_pretrained(model, tmp_path / "native")
    model.set_input_size((48, 40))
    reference = zoo.create_model("agent_deit_debug", pretrained=str(tmp_path / "native"), img_size=(48, 40)).eval()
    assert model.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert model.blocks[0].attn.window == reference.blocks[0].attn.window == 12
    assert model.pretrained_cfg["input_size"] == (3, 48, 40)
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(reference(x), expected)
    zoo.save_pretrained(model, tmp_path / "resized")
    with torch.no_grad():
        torch.testing.assert_close(zoo.from_pretrained(tmp_path / "resized").eval()(x), expected)
    with pytest.raises(ValueError, match="smaller than patch_size"):
        model.set_input_size(2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_func_transforms_through_agent_attention(dtype):
    """torch.func.grad with respect to the input failed ("_scaled_dot_product_flash_attention_for_cpu is not
    differentiable with respect to argument 'attn_mask'": the learned biases derive from parameters that require
    grad); under vmap the agents were pooled with fp32-rounded weights (3e-8 off in a float64 model)."""
    torch.manual_seed(0)
    module = AgentAttention(16, 2, agent_num=4, window=4).to(dtype).eval()
    x = torch.randn(2, 1 + 15, 16, dtype=dtype)  # class token + a 3x5 grid (pool weights of 1/6)
    grid = (3, 5)
    got = torch.func.grad(lambda t: module(t, grid=grid).sum())(x)
    leaf = x.clone().requires_grad_(True)
    want = torch.autograd.grad(module(leaf, grid=grid).sum(), leaf)[0]
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(got, want, **tol)
    with torch.no_grad():
        batched = torch.func.vmap(lambda t: module(t[None], grid=grid)[0])(x)
        torch.testing.assert_close(batched, module(x, grid=grid), **tol)


def test_agent_attention_arguments_and_nan_message():
    """num_prefix_tokens=1.0 was accepted and broke every forward ("'float' object cannot be interpreted as an
    integer"), attn_drop='0.1' gave a raw comparison TypeError, proj_drop was not checked; with autograd a NaN
    input was reported as the internal "attend: k contains NaN or Inf values"."""
    for bad in (1.0, True, 2):
        with pytest.raises(ValueError, match="num_prefix_tokens must be 0 or 1"):
            AgentAttention(16, 2, agent_num=4, window=4, num_prefix_tokens=bad)
    with pytest.raises(ValueError, match="attn_drop must be a number in"):
        AgentAttention(16, 2, agent_num=4, window=4, attn_drop="0.1")
    with pytest.raises(ValueError, match="proj_drop must be a number in"):
        AgentAttention(16, 2, agent_num=4, window=4, proj_drop=1.0)
    module = AgentAttention(16, 2, agent_num=4, window=4)
    x = torch.randn(1, 17, 16)
    x[0, 0, 0] = float("nan")
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match="AgentAttention: input contains NaN"):
            module(x)


@pytest.mark.parametrize("prefix", [0, 1])
def test_agent_attention_passes_an_empty_batch_as_multi_head_attention_does(prefix):
    """A batch of 0 gives (0, N, C) (and (0, num_queries, C)), as zoo MultiHeadAttention and torch's
    nn.MultiheadAttention give, in train and eval mode, with empty input gradients and zero weight gradients."""
    from zoo.attention import MultiHeadAttention

    torch.manual_seed(0)
    agent = AgentAttention(32, 4, qkv_bias=True, agent_num=9, window=4, num_prefix_tokens=prefix)
    x = torch.randn(0, prefix + 16, 32, requires_grad=True)
    reference = MultiHeadAttention(32, 4)(x)
    for training in (True, False):
        agent.train(training)
        out = agent(x)
        assert out.shape == reference.shape == (0, prefix + 16, 32)
        out.sum().backward()
        assert x.grad.shape == x.shape and float(agent.qkv.weight.grad.abs().sum()) == 0.0
        if prefix:
            with torch.no_grad():
                assert agent(x, num_queries=1).shape == (0, 1, 32)


# --------------------------------------------------------------------------------------------------
# Configuration and bookkeeping paths (mutation audit m3: D1, D3, D6, D7, R4)
# --------------------------------------------------------------------------------------------------
# The official block -> stage map for depth 12 (agent_deit.py picks agent_num[stage] for block i from its pair
# i // 2: pairs 0, 1 -> stages 0, 1; pairs 2, 3, 4 -> stage 2; pair 5 -> stage 3), written out block by block.
OFFICIAL_STAGE_OF_BLOCK = [0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3]


def test_per_stage_agent_num_goes_to_the_official_blocks():
    """A list of 4 agent counts reaches the blocks of the official rule: the reference with those counts per
    block loads strictly and gives the same logits."""
    torch.manual_seed(4)
    agent_num = [1, 4, 9, 16]
    cfg = dict(img_size=32, patch_size=4, in_chans=3, num_classes=5, embed_dim=24, depth=12, num_heads=3)
    ref = OfficialAgentDeiT(**cfg, agent_num=16)
    for block, stage in zip(ref.blocks, OFFICIAL_STAGE_OF_BLOCK):
        block.attn = RefAgentAttention(24, 3, agent_num[stage], 8)  # same slot: state-dict order unchanged
    _randomize(ref)
    ours = agent_deit.AgentVisionTransformer(**cfg, agent_num=agent_num).eval()
    assert [block.attn.agent_num for block in ours.blocks] == [1, 1, 4, 4, 9, 9, 9, 9, 9, 9, 16, 16]
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref.eval()(x), rtol=0, atol=1e-5)


def test_agent_layer_zero_means_every_block_as_officially():
    """agent_layer=0 is documented (and official) as "every block", like the default -1."""
    torch.manual_seed(5)
    cfg = dict(SMALL, agent_layer=0)
    ref, ours = _pair_models(**cfg)  # strict load of the official-semantics model with agent_layer=0
    assert ours.agent_layer == 3
    assert all(isinstance(block, agent_deit.AgentBlock) for block in ours.blocks)
    every = agent_deit.AgentVisionTransformer(**dict(cfg, agent_layer=-1, agent_num=[16] * 4))
    assert ours.state_dict().keys() == every.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)


def test_global_pool_avg_leaves_out_the_class_token_as_timm():
    """global_pool="avg" is the mean of the patch tokens only (timm's global_pool_nlc with one prefix token),
    in forward_head and in forward (the class-token shortcut does not engage), also after reset_classifier."""
    from timm.layers import global_pool_nlc

    torch.manual_seed(6)
    model = zoo.create_model("agent_deit_debug", global_pool="avg").eval()
    _randomize(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        pooled = model.forward_head(tokens, pre_logits=True)
        expected = global_pool_nlc(tokens, "avg", num_prefix_tokens=1)
        torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(x), model.head(expected), rtol=0, atol=1e-5)
        token_model = zoo.create_model("agent_deit_debug").eval()
        token_model.load_state_dict(model.state_dict())
        token_model.reset_classifier(3, global_pool="avg")
        token_model.eval()
        torch.testing.assert_close(token_model(x), token_model.head(expected), rtol=0, atol=1e-5)


def test_pruned_model_saves_and_loads_with_its_agent_blocks(tmp_path):
    """prune_intermediate_layers keeps the agent blocks it keeps (agent_layer = last + 1): save_pretrained /
    from_pretrained rebuild them, the state dict loads strictly and the intermediates are the unpruned model's."""
    torch.manual_seed(7)
    model = zoo.create_model("agent_deit_debug", depth=4).eval()
    _randomize(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        unpruned = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
    assert model.prune_intermediate_layers(indices=[1, 2]) == [1, 2]
    assert model.agent_layer == 3 and len(model.blocks) == 3
    zoo.save_pretrained(model, tmp_path / "pruned")
    loaded = zoo.from_pretrained(tmp_path / "pruned").eval()
    assert loaded.agent_layer == 3
    assert all(isinstance(block, agent_deit.AgentBlock) for block in loaded.blocks)
    loaded.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        for model_ in (model, loaded):
            for got, want in zip(model_.forward_intermediates(x, indices=[1, 2], intermediates_only=True), unpruned):
                torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_set_input_size_keeps_frozen_parameters_frozen():
    """A frozen model (linear probing) stays frozen through set_input_size: the resized position embedding and
    row/column bias tables keep requires_grad=False, as the trainable ones keep True."""
    model = zoo.create_model("agent_deit_debug")
    model.requires_grad_(False)
    model.set_input_size((48, 40))
    assert model.blocks[0].attn.window == 12
    assert not [name for name, p in model.named_parameters() if p.requires_grad]
    trainable = zoo.create_model("agent_deit_debug")
    trainable.set_input_size((48, 40))
    assert all(p.requires_grad for p in trainable.parameters())


# --------------------------------------------------------------------------------------------------
# The module on its own vs the float64 reference: gradients to the bias tables, cache modes, dropout
# --------------------------------------------------------------------------------------------------
def _module_pair(window=5, agent_num=9):
    """Reference and zoo AgentAttention in float64 with the same random weights (bias tables of std 0.5)."""
    torch.manual_seed(21)
    ref = RefAgentAttention(12, 3, agent_num, window).double()
    _randomize(ref, seed=21)
    ours = AgentAttention(12, 3, qkv_bias=True, agent_num=agent_num, window=window).double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("mode,frozen", [("eval", ()), ("train", ("an_bias", "ca_bias"))])
def test_module_gradients_reach_every_trainable_bias_table(mode, frozen):
    """Every trainable parameter gets the reference's gradient (float64, batch 2, a 2 x 5 grid: non-square, fewer
    rows than the 3 x 3 agents, tables resized from window 5) in eval mode with autograd on (fine-tuning with
    frozen norm/dropout statistics, torch.func) and with some bias tables frozen (partial fine-tuning): the
    cached, no-grad tables would leave the other tables without a gradient."""
    ref, ours = _module_pair()
    for model in (ref, ours):
        getattr(model, mode)()
        for name in frozen:
            getattr(model, name).requires_grad_(False)
    grid = (2, 5)
    x = torch.randn(2, 1 + 10, 12, dtype=torch.float64)
    weight = torch.randn(2, 11, 12, dtype=torch.float64)
    ref_params = dict(ref.named_parameters())
    for _ in range(2):  # the second call meets whatever the first one left in the caches
        ref.zero_grad()
        ours.zero_grad()
        expected = ref(x, grid=grid)
        out = ours(x, grid=grid)
        assert (out - expected).abs().max() < 1e-12
        (expected * weight).sum().backward()
        (out * weight).sum().backward()
        for name, p in ours.named_parameters():
            if name in frozen:
                assert p.grad is None, name
            else:
                assert p.grad is not None, name
                assert (p.grad - ref_params[name].grad).abs().max() < 1e-10, name


def test_tables_built_under_inference_mode_are_not_reused_with_autograd():
    """Lightning validates under torch.inference_mode(): tables built there are inference tensors, which autograd
    cannot save for backward. A later grad-mode call of the frozen module (input gradients: saliency maps,
    adversarial examples) must not be served them; its input gradient is the reference's."""
    ref, ours = _module_pair()
    ref.eval()
    ours.eval().requires_grad_(False)
    grid = (2, 5)
    x = torch.randn(2, 11, 12, dtype=torch.float64)
    with torch.inference_mode():
        ours(x, grid=grid)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours(x_ours, grid=grid).square().sum().backward()
    ref(x_ref, grid=grid).square().sum().backward()
    assert (x_ours.grad - x_ref.grad).abs().max() < 1e-10


def test_attention_dropout_applies_in_training_mode_under_no_grad():
    """As nn.Dropout: training mode drops whether or not autograd records (MC-dropout sampling runs under no_grad);
    the inference fast path (no dropout) is for p = 0 only."""
    attn = AgentAttention(16, 2, agent_num=4, window=4, attn_drop=0.5).train()
    _randomize(attn)
    x = torch.randn(2, 17, 16)
    torch.manual_seed(0)
    recorded = attn(x).detach()
    torch.manual_seed(0)
    with torch.no_grad():
        sampled = attn(x)
        deterministic = attn.eval()(x)
    torch.testing.assert_close(sampled, recorded, atol=1e-6, rtol=0)
    assert (sampled - deterministic).abs().max() > 1e-2


def test_drop_rate_is_timms_head_dropout_and_the_official_placement_has_its_own_names():
    """timm's drop_rate (train.py --drop) is the dropout before the classifier, as on the zoo's ViT; the official
    code's drop_rate (position embedding, attention projections, MLPs) is pos_drop_rate + proj_drop_rate."""
    def rates(model):
        return {name: module.p for name, module in model.named_modules()
                if isinstance(module, torch.nn.Dropout) and module.p > 0}

    assert rates(zoo.create_model("agent_deit_debug", drop_rate=0.1)) == {"head_drop": 0.1}
    vit = zoo.create_model("vit_tiny_patch16_224", img_size=32, drop_rate=0.1)
    assert rates(vit) == {"head_drop": 0.1}
    official = rates(zoo.create_model("agent_deit_debug", pos_drop_rate=0.1, proj_drop_rate=0.2))
    depth = len(zoo.create_model("agent_deit_debug").blocks)
    expected = {"pos_drop": 0.1}
    for i in range(depth):
        expected.update({f"blocks.{i}.attn.proj_drop": 0.2, f"blocks.{i}.mlp.drop1": 0.2, f"blocks.{i}.mlp.drop2": 0.2})
    assert official == expected
    with pytest.raises(ValueError, match="proj_drop_rate must be a number in"):
        zoo.create_model("agent_deit_debug", proj_drop_rate=1.5)


def test_no_pooling_returns_every_token_as_timms_vit():
    """global_pool="" (timm's ViT): forward gives per-token logits, or the tokens themselves without a head, and
    prune_intermediate_layers leaves that (timm's reset_classifier(0, '')); dynamic_img_size=True is accepted."""
    torch.manual_seed(3)
    model = zoo.create_model("agent_deit_debug", global_pool="").eval()
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        tokens = model.forward_features(x)
        torch.testing.assert_close(model(x), model.head(tokens), rtol=0, atol=1e-6)
        assert model.forward_head(tokens, pre_logits=True).shape == tokens.shape
    pruned = zoo.create_model("agent_deit_debug").eval()
    pruned.prune_intermediate_layers(1)
    assert pruned.global_pool == "" and pruned.num_classes == 0
    with torch.no_grad():
        out = pruned(x)
        torch.testing.assert_close(out, pruned.forward_features(x), rtol=0, atol=0)
    patch = pruned.patch_embed.patch_size[0]
    assert out.shape[:2] == (2, 1 + -(-32 // patch) * -(-40 // patch))  # class token + the patch grid
    zoo.create_model("agent_deit_debug", dynamic_img_size=True)
    with pytest.raises(ValueError, match="always takes any image size"):
        zoo.create_model("agent_deit_debug", dynamic_img_size=False)
