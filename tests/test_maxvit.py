"""MaxViT (tasks/vision/maxvit.py) against timm's MaxxVit (timm/models/maxxvit.py), and beyond timm: any size.

The timm models are built with pretrained=False at small image sizes (window = img_size // 32) and their
BatchNorm statistics are calibrated on a random batch, so every layer matters; their state dicts must load strictly and the logits
must agree within 1e-4 (fp32, eval).
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import maxxvit as timm_maxxvit

import zoo
import zoo.tasks.vision.maxvit as mv
from zoo.attention import capture_attention

NAMES = [
    "maxvit_debug",
    "maxvit_tiny_tf_224",
    "maxvit_small_tf_224",
    "maxvit_base_tf_224",
    "maxvit_rmlp_pico_rw_256",
    "maxvit_rmlp_nano_rw_256",
]
# the other timm names registered (the same blocks at other widths and sizes): state dicts at the default size on
# the meta device, forward/backward at a small size, logits for two of them
MORE_NAMES = [
    "maxvit_large_tf_224",
    *(f"maxvit_{size}_tf_{px}" for size in ("tiny", "small", "base", "large") for px in (384, 512)),
    "maxvit_xlarge_tf_384",
    "maxvit_xlarge_tf_512",
    "maxvit_rmlp_tiny_rw_256",
    "maxvit_rmlp_base_rw_224",
    "maxvit_rmlp_base_rw_384",
    "maxvit_rmlp_small_rw_224",  # layer scale on the partition blocks
    "maxvit_rmlp_small_rw_256",
]


def _calibrate_bn(model: torch.nn.Module, img_size: int, seed: int = 0) -> None:
    """Give every BatchNorm the statistics of a random batch (non-trivial, and well-conditioned like a
    trained network: an untrained deep stack with arbitrary statistics amplifies fp32 rounding)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, img_size, img_size, generator=gen))
    model.eval()


def _timm_debug(img_size: int, num_classes: int = 10, **kwargs):
    """timm's MaxxVit with maxvit_debug's configuration (timm has no such name); ``kwargs`` to MaxxVit."""
    tf = timm_maxxvit._tf_cfg()
    cfg = timm_maxxvit.MaxxVitCfg(
        embed_dim=(16, 32, 48, 64), depths=(1, 1, 1, 1), block_type=("M",) * 4, stem_width=(8, 16),
        stem_bias=True, head_hidden_size=64, conv_cfg=tf["conv_cfg"],
        transformer_cfg=dataclasses.replace(tf["transformer_cfg"], dim_head=8),
    )
    return timm_maxxvit.MaxxVit(cfg, img_size=img_size, num_classes=num_classes, **kwargs)


def _timm_debug_pool(global_pool: str, hidden: bool, num_classes: int = 10):
    """timm's MaxxVit with maxvit_debug's configuration, the given pooling and with (TF) or without (rw) the
    normalised MLP head."""
    tf = timm_maxxvit._tf_cfg()
    cfg = timm_maxxvit.MaxxVitCfg(
        embed_dim=(16, 32, 48, 64), depths=(1, 1, 1, 1), block_type=("M",) * 4, stem_width=(8, 16),
        stem_bias=True, head_hidden_size=64 if hidden else None, conv_cfg=tf["conv_cfg"],
        transformer_cfg=dataclasses.replace(tf["transformer_cfg"], dim_head=8),
    )
    peer = timm_maxxvit.MaxxVit(cfg, img_size=64, num_classes=num_classes, global_pool=global_pool)
    _calibrate_bn(peer, 64)
    return peer


def _peer(name: str, img_size: int):
    peer = _timm_debug(img_size) if name == "maxvit_debug" else timm.create_model(name, pretrained=False, img_size=img_size)
    _calibrate_bn(peer, img_size)
    return peer


def test_registered_names():
    names = zoo.list_models(family="maxvit")
    assert set(NAMES + MORE_NAMES) <= set(names)
    from zoo.registry import get_model_entry

    assert all(get_model_entry(n).task == "vision" and get_model_entry(n).family == "maxvit" for n in NAMES)


@pytest.mark.parametrize(
    "name,img_size",
    [
        ("maxvit_debug", 64),
        ("maxvit_tiny_tf_224", 96),  # window 3
        ("maxvit_small_tf_224", 64),
        ("maxvit_base_tf_224", 64),  # window 2, all 24 blocks
        ("maxvit_rmlp_pico_rw_256", 128),  # window 4
        ("maxvit_rmlp_nano_rw_256", 64),
        ("maxvit_tiny_tf_384", 64),
        ("maxvit_rmlp_tiny_rw_256", 64),
        ("maxvit_rmlp_small_rw_224", 64),
    ],
)
def test_timm_state_dict_and_logits(name, img_size):
    torch.manual_seed(0)
    peer = _peer(name, img_size)
    with torch.no_grad():  # layer scales start at 1e-6: give them weight, so their placement is what is compared
        for key, value in peer.state_dict().items():
            if key.endswith(".gamma"):
                value.copy_(0.5 + torch.rand_like(value))
    ours = zoo.create_model(name, img_size=img_size).eval()
    state = peer.state_dict()
    assert list(ours.state_dict()) == list(state)
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        peer_feats = peer.forward_features(x)
        expected = peer.forward_head(peer_feats)
        feats = ours.forward_features(x)
        got = ours.forward_head(feats)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(feats, peer_feats, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(
            ours.forward_head(peer_feats, pre_logits=True), peer.forward_head(peer_feats, pre_logits=True),
            rtol=0, atol=1e-5,
        )


@pytest.mark.parametrize("name", NAMES[1:] + MORE_NAMES)
def test_state_dict_keys_and_shapes_at_default_size(name):
    """Every registered timm name at its default size (built on the meta device: no memory, no init cost)."""
    with torch.device("meta"):
        peer = timm.create_model(name, pretrained=False)
        ours = zoo.create_model(name)
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == [
        (k, tuple(v.shape)) for k, v in peer.state_dict().items()
    ]
    assert ours.window_size == ours.grid_size == tuple(s // 32 for s in peer.img_size)


def test_forward_intermediates_match_timm():
    torch.manual_seed(0)
    peer = _peer("maxvit_debug", 64)
    ours = zoo.create_model("maxvit_debug").eval()
    ours.load_state_dict(peer.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for kwargs in (dict(), dict(indices=2), dict(indices=[0, -1], norm=True), dict(indices=[1, 2], stop_early=True)):
            final, maps = ours.forward_intermediates(x, **kwargs)
            peer_final, peer_maps = peer.forward_intermediates(x, **kwargs)
            assert len(maps) == len(peer_maps)
            for a, b in zip(maps, peer_maps):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
            torch.testing.assert_close(final, peer_final, rtol=0, atol=1e-5)
        only = ours.forward_intermediates(x, intermediates_only=True)
    assert [m.shape[1] for m in only] == [16, 16, 32, 48, 64]
    assert [m.shape[-1] for m in only] == [32, 16, 8, 4, 2]


def test_checkpoint_from_another_resolution_matches_timm_filter():
    """Weights trained at 64 px (window 2) fine-tune at 128 px (window 4): tables resized like timm's filter."""
    torch.manual_seed(0)
    peer64 = _peer("maxvit_debug", 64)
    peer128 = _peer("maxvit_debug", 128)
    peer128.load_state_dict(timm_maxxvit.checkpoint_filter_fn(peer64.state_dict(), peer128), strict=True)
    ours64 = zoo.create_model("maxvit_debug", img_size=64)
    ours64.load_state_dict(peer64.state_dict(), strict=True)
    ours128 = zoo.create_model("maxvit_debug", img_size=128).eval()
    assert ours128.window_size == (4, 4)
    ours128.load_state_dict(ours64.state_dict(), strict=True)  # tables resized while loading
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(ours128(x), peer128(x), rtol=0, atol=1e-4)
    # set_input_size resizes in place to the same tables
    ours64.set_input_size(img_size=128)
    for (k, a), b in zip(ours64.state_dict().items(), ours128.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)



def _partition_sizes(model) -> list[tuple]:
    """(window, grid) of every block, zoo's and timm's blocks alike."""
    return [(tuple(b.attn_block.partition_size), tuple(b.attn_grid.partition_size))
            for stage in model.stages for b in stage.blocks]


def test_set_input_size_sequence_derives_again_as_timm(tmp_path):
    """A window or grid size given to one set_input_size call applies to that call only: the next call without
    it derives ``img_size // 32`` again, as timm's MaxxVit.set_input_size does (it used to stick). Partition
    sizes, resized tables and logits follow timm's model through the same sequence of calls."""
    torch.manual_seed(0)
    peer = _peer("maxvit_debug", 64)
    ours = zoo.create_model("maxvit_debug", img_size=64).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    calls = [dict(img_size=128, window_size=(2, 2), grid_size=(2, 2)), dict(img_size=96),
             dict(img_size=128, window_size=2), dict(img_size=160)]
    for kwargs in calls:
        peer.set_input_size(**kwargs)
        ours.set_input_size(**kwargs)
        assert _partition_sizes(ours) == _partition_sizes(peer), kwargs
        assert (ours.window_size, ours.grid_size) == _partition_sizes(peer)[0], kwargs
        for (key, a), b in zip(ours.state_dict().items(), peer.state_dict().values()):
            torch.testing.assert_close(a, b, msg=key)
        size = ours.img_size[0]
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), peer(x), rtol=0, atol=1e-4)
    assert ours.window_size == ours.grid_size == (5, 5)
    # the saved directory records no derived partition size, so the loaded model derives again too
    zoo.save_pretrained(ours, tmp_path / "ckpt")
    loaded = zoo.create_model("maxvit_debug", pretrained=str(tmp_path / "ckpt"))
    loaded.set_input_size(img_size=64)
    assert (loaded.window_size, loaded.grid_size) == ((2, 2), (2, 2))
    # a window given to the last call is saved with its grid: the loaded model is the saved one
    ours.set_input_size(img_size=128, window_size=2)
    zoo.save_pretrained(ours, tmp_path / "ckpt2")
    loaded = zoo.create_model("maxvit_debug", pretrained=str(tmp_path / "ckpt2"))
    assert _partition_sizes(loaded) == _partition_sizes(ours) == [((2, 2), (4, 4))] * 4
    # a partition size the model was built with stays (maxvit_digits: 4 x 4 at any size)
    built = zoo.create_model("maxvit_debug", img_size=64, window_size=1)
    built.set_input_size(img_size=128, grid_size=2)
    built.set_input_size(img_size=160)
    assert (built.window_size, built.grid_size) == ((1, 1), (1, 1))


# --------------------------------------------------------------------------------------------------
# Any input size
# --------------------------------------------------------------------------------------------------
def _reference_partition_attn(layer: mv.PartitionAttention, x_BHWC: torch.Tensor) -> torch.Tensor:
    """Attention of ``layer`` (before the residual) computed partition by partition over the real tokens only.

    float64, explicit softmax; the bias entries are picked from the layer's full-window bias by each token's
    position inside its partition. No padding, no masks.
    """
    attn = layer.attn
    b, h, w, c = x_BHWC.shape
    ph, pw = layer.partition_size
    bias_HPP = attn.rel_pos.materialize(ph * pw, ph * pw)[0].double()
    x = x_BHWC.double()
    qkv = F.linear(x, attn.qkv.weight.double(), attn.qkv.bias.double())
    heads, dh = attn.num_heads, attn.dim_head
    if attn.head_first:
        q, k, v = qkv.view(b, h, w, heads, 3 * dh).split(dh, dim=-1)
    else:
        q, k, v = qkv.view(b, h, w, 3, heads, dh).unbind(3)
    out = torch.zeros(b, h, w, heads, dh, dtype=torch.float64)
    sy, sx = -(-h // ph), -(-w // pw)
    for a in range(sy):
        for bb in range(sx):
            rows, cols, slots = [], [], []
            for i in range(ph):
                for j in range(pw):
                    if layer.kind == "block":
                        r, col = a * ph + i, bb * pw + j
                    else:
                        r, col = a + i * sy, bb + j * sx
                    if r < h and col < w:
                        rows.append(r), cols.append(col), slots.append(i * pw + j)
            rows_t, cols_t, slots_t = torch.tensor(rows), torch.tensor(cols), torch.tensor(slots)
            qq, kk, vv = q[:, rows_t, cols_t], k[:, rows_t, cols_t], v[:, rows_t, cols_t]  # (B, n, Hd, D)
            s = torch.einsum("bihd,bjhd->bhij", qq, kk) * attn.scale + bias_HPP[:, slots_t][:, :, slots_t]
            p = torch.exp(s - s.amax(-1, keepdim=True))
            p = p / p.sum(-1, keepdim=True)
            out[:, rows_t, cols_t] = torch.einsum("bhij,bjhd->bihd", p, vv)
    out = out.reshape(b, h, w, heads * dh)
    return F.linear(out, attn.proj.weight.double(), attn.proj.bias.double())


@pytest.mark.parametrize("kind", ["block", "grid"])
@pytest.mark.parametrize("rel_pos_type,head_first", [("bias_tf", False), ("mlp", True)])
@pytest.mark.parametrize("hw", [(7, 5), (4, 9), (2, 3)])
def test_padded_partition_attention_equals_per_partition_reference(kind, rel_pos_type, head_first, hw):
    torch.manual_seed(0)
    layer = mv.PartitionAttention(16, kind, (3, 2), dim_head=4, head_first=head_first, rel_pos_type=rel_pos_type, rel_pos_dim=8).eval()
    x = torch.randn(2, *hw, 16)
    with torch.no_grad():
        got = layer._partition_attn(x)
        expected = _reference_partition_attn(layer, x)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-5)


def test_forced_block_padding_equals_unpadded():
    """At a size that is a partition multiple, padding anyway (an extra window row/col, masked) changes nothing."""
    torch.manual_seed(0)
    model = zoo.create_model("maxvit_debug").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
        for m in model.modules():
            if isinstance(m, mv.PartitionAttention) and m.kind == "block":
                ph, pw = m.partition_size
                m.padded_size = lambda h, w, ph=ph, pw=pw: (h + ph, w + pw)
        padded = model(x)
    torch.testing.assert_close(padded, plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("hw", [(150, 100), (37, 53), (2, 3), (33, 31)])
def test_any_size_forward_backward(hw):
    torch.manual_seed(0)
    model = zoo.create_model("maxvit_debug")
    x = torch.randn(2, 3, *hw, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 10)
    out.square().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    feats = model.forward_features(x.detach())
    assert feats.shape[-2:] == (math.ceil(hw[0] / 32), math.ceil(hw[1] / 32)) or min(hw) < 32


@pytest.mark.parametrize("name", NAMES + MORE_NAMES + ["maxvit_digits"])
def test_every_name_forward_backward_small_odd_size(name):
    """Every registered MaxViT at a small non-multiple size (all stages padded): forward, backward, no NaN.
    The ImageNet sizes keep their widths, heads and layer types but one block per stage (two in stage 1, so a
    stride-1 block is in too): deeper stacks repeat the same blocks."""
    torch.manual_seed(0)
    shallow = {} if name in ("maxvit_debug", "maxvit_digits") else dict(depths=(1, 2, 1, 1))
    model = zoo.create_model(name, img_size=32, num_classes=3, **shallow)
    x = torch.randn(2, model.in_chans, 37, 29, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_rw_model_at_a_size_timm_cannot_run():
    """timm's pico built at 128 px fails on 150x100 (REFERENCES.md); ours runs it, and matches timm at 128."""
    torch.manual_seed(0)
    peer = _peer("maxvit_rmlp_pico_rw_256", 128)
    with pytest.raises(RuntimeError):
        with torch.no_grad():
            peer(torch.randn(1, 3, 150, 100))
    ours = zoo.create_model("maxvit_rmlp_pico_rw_256", img_size=128).eval()
    ours.load_state_dict(peer.state_dict())
    with torch.no_grad():
        out = ours(torch.randn(1, 3, 150, 100))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------------
# timm-style methods, errors, capture, save/load
# --------------------------------------------------------------------------------------------------
def test_reset_classifier_head_keys_and_grad_checkpointing():
    torch.manual_seed(0)
    model = zoo.create_model("maxvit_debug").eval()
    x = torch.randn(2, 3, 64, 64)
    pre = model.forward_head(model.forward_features(x), pre_logits=True)
    other = zoo.create_model("maxvit_debug", num_classes=5).state_dict()
    changed = sorted(k for k, v in model.state_dict().items() if other[k].shape != v.shape)
    assert sorted(model.pretrained_head_keys()) == changed == ["head.fc.bias", "head.fc.weight"]
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), pre)
    model.reset_classifier(0)
    assert model(x).shape == (2, 64)
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-1)

    model = zoo.create_model("maxvit_debug").train()
    x = torch.randn(2, 3, 40, 24)
    torch.manual_seed(1)
    model(x).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    model(x).sum().backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("global_pool, hidden", [("max", True), ("avgmax", True), ("", True), ("avgmax", False),
                                                 ("catavgmax", False)])
def test_global_pool_options_match_timm(global_pool, hidden):
    """timm's pooling names on both head types: same state dict (1x1-conv head without pooling), same logits;
    without pooling the logits are per position, (B, K, H/32, W/32)."""
    torch.manual_seed(0)
    peer = _timm_debug_pool(global_pool, hidden).eval()
    extra = {} if hidden else {"head_hidden_size": None}
    ours = zoo.create_model("maxvit_debug", global_pool=global_pool, **extra).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = peer(x), ours(x)
        assert got.shape == ((2, 10, 2, 2) if global_pool == "" else (2, 10))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        pre = ours.forward_head(ours.forward_features(x), pre_logits=True)
        torch.testing.assert_close(pre, peer.forward_head(peer.forward_features(x), pre_logits=True),
                                   rtol=1e-4, atol=1e-4)
    assert pre.shape[1] == ours.head_hidden_size == peer.head_hidden_size
    if global_pool == "":  # beyond timm: any input size
        assert ours(torch.randn(1, 3, 70, 50)).shape == (1, 10, 3, 2)


def test_reset_classifier_changes_pooling_as_timm():
    """reset_classifier(K, global_pool=...) keeps the pre-logits weights when switching between pooled and
    per-position heads (Linear <-> 1x1 conv), as timm's NormMlpClassifierHead.reset; catavgmax with the
    normalised head is refused, as in timm."""
    torch.manual_seed(0)
    peer = _timm_debug_pool("avg", hidden=True).eval()
    ours = zoo.create_model("maxvit_debug").eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    for pool, shape in (("", (2, 5, 2, 2)), ("max", (2, 5))):
        peer.reset_classifier(5, global_pool=pool)
        ours.reset_classifier(5, global_pool=pool)
        ours.head.fc.load_state_dict(peer.head.fc.state_dict())  # the new classifiers are random
        assert dict((k, v.shape) for k, v in ours.state_dict().items()) == \
            dict((k, v.shape) for k, v in peer.state_dict().items())
        with torch.no_grad():
            assert ours(x).shape == shape
            torch.testing.assert_close(ours(x), peer(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="catavgmax"):
        ours.reset_classifier(5, global_pool="catavgmax")
    with pytest.raises(ValueError, match="global_pool must be one of"):
        zoo.create_model("maxvit_debug", global_pool="mean")


def test_bad_inputs_raise_clear_errors():
    model = zoo.create_model("maxvit_debug").eval()
    with pytest.raises(ValueError, match="3 input channels, got 1"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="smaller than the stem stride"):
        model(torch.randn(1, 3, 1, 64))
    bad = torch.randn(1, 3, 64, 64)
    bad[0, 1, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        model(bad)
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="rel_pos_type"):
        zoo.create_model("maxvit_debug", rel_pos_type="nope")
    with pytest.raises(ValueError, match="window_size"):
        zoo.create_model("maxvit_debug", window_size=0)


def test_capture_window_and_grid_maps():
    model = zoo.create_model("maxvit_debug").eval()
    x = torch.randn(1, 3, 50, 40)  # stage 1: 13x10 map, window 2 -> padded to 14x10
    with torch.no_grad(), capture_attention(model) as maps:
        model(x)
    names = [r.name for r in maps]
    assert names[:2] == ["stages.0.blocks.0.attn_block.attn", "stages.0.blocks.0.attn_grid.attn"]
    assert len(maps) == 8
    first = maps[0].weights  # (nP, Hd, 4, 4): 7*5 windows of the padded 14x10 map
    assert first.shape == (35, 2, 4, 4)
    torch.testing.assert_close(first.sum(-1), torch.ones(35, 2, 4))
    # the last window row holds padded rows: its keys 2 and 3 (second row of the window) get no weight
    last_row = first.view(7, 5, 2, 4, 4)[6]
    assert float(last_row[..., 2:].abs().max()) == 0.0


def test_save_and_load_pretrained(tmp_path):
    torch.manual_seed(0)
    model = zoo.create_model("maxvit_debug", img_size=48, num_classes=4).eval()
    zoo.save_pretrained(model, tmp_path / "ckpt")
    loaded = zoo.create_model("maxvit_debug", pretrained=str(tmp_path / "ckpt")).eval()
    assert loaded.window_size == (1, 1) and loaded.num_classes == 4
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_pretrained_dir_at_another_resolution_resizes_tables(tmp_path):
    """create_model(name, pretrained=<dir>, img_size=...) with another window: the TF tables are resized while
    loading (the family's checkpoint_filter_fn), the same as set_input_size on the loaded model."""
    torch.manual_seed(0)
    model = zoo.create_model("maxvit_debug", img_size=64)  # window 2
    zoo.save_pretrained(model, tmp_path / "ckpt")
    bigger = zoo.create_model("maxvit_debug", pretrained=str(tmp_path / "ckpt"), img_size=128, num_classes=10)
    assert bigger.window_size == (4, 4)
    key = "stages.1.blocks.0.attn_grid.attn.rel_pos.relative_position_bias_table"
    assert bigger.state_dict()[key].shape == (4, 7, 7)  # 4 heads of stage 1, window 4: 2*4-1 = 7
    model.set_input_size(img_size=128)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(bigger.state_dict()[k], v, msg=k)


def test_viz_block_and_grid_maps(tmp_path):
    """The picture's maps: the query's block attention fills exactly its window, the grid attention exactly its
    dilated lattice, each summing to 1; and maxvit_main writes a PNG."""
    from zoo.tasks.vision.viz_maxvit import maxvit_attention_maps, maxvit_main

    torch.manual_seed(0)
    model = zoo.create_model("maxvit_debug", img_size=96).eval()  # window/grid 3; stage 1 map 24x24
    x = torch.randn(1, 3, 96, 96)
    logits, maps = maxvit_attention_maps(model, x, query=(50, 20))
    assert logits.shape == (1, 10) and [m["hw"] for m in maps] == [(24, 24), (12, 12), (6, 6), (3, 3)]
    first = maps[0]
    qy, qx = first["query"]
    assert (qy, qx) == (12, 5)
    block, grid = torch.from_numpy(first["block"]), torch.from_numpy(first["grid"])
    inside = torch.zeros(24, 24, dtype=torch.bool)
    inside[12:15, 3:6] = True  # the 3x3 window holding (12, 5)
    assert float(block[~inside].abs().max()) == 0.0 and (block[inside] > 0).all()
    lattice = torch.zeros(24, 24, dtype=torch.bool)
    lattice[qy % 8 :: 8, qx % 8 :: 8] = True  # stride 24 / 3 = 8
    assert float(grid[~lattice].abs().max()) == 0.0 and (grid[lattice] > 0).all()
    torch.testing.assert_close(block.sum(), torch.tensor(1.0))
    torch.testing.assert_close(grid.sum(), torch.tensor(1.0))
    out = tmp_path / "maps.png"
    assert maxvit_main(["model=maxvit_debug", f"out={out}", "image=digits:5", "query=10,40", "head=1"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert maxvit_main(["model=maxvit_debug", f"out={out}", "query=1000,1"]) == 2
    from zoo import cli  # the console command: zoo viz maxvit ...

    via_cli = tmp_path / "cli.png"
    assert cli.main(["viz", "maxvit", "model=maxvit_debug", f"out={via_cli}", "image=digits:5"]) == 0
    assert via_cli.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# Shipped checkpoint and fine-tuning from it (zoo eval / zoo train model.pretrained=<dir>)
# --------------------------------------------------------------------------------------------------
def _card_accuracy(readme) -> float:
    """The test accuracy (fraction) the model card states in bold, e.g. "**99.72 %**"."""
    import re

    found = re.search(r"\*\*test accuracy\*\* \| \*\*([0-9.]+) %\*\*", readme.read_text())
    assert found, f"{readme} states no test accuracy"
    return float(found.group(1)) / 100


def test_shipped_maxvit_digits_checkpoint_reproduces_card(capsys):
    """`zoo eval ckpt=checkpoints/maxvit_digits` gives the model card's test accuracy (359 / 360)."""
    import json
    from pathlib import Path

    from zoo import cli

    ckpt = Path(__file__).resolve().parents[1] / "checkpoints" / "maxvit_digits"
    if not (ckpt / "model.safetensors").is_file():
        pytest.fail(f"the shipped checkpoint {ckpt} is missing")
    assert zoo.from_pretrained(ckpt).zoo_model_name == "maxvit_digits"
    capsys.readouterr()
    assert cli.main(["eval", f"ckpt={ckpt}"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    card = _card_accuracy(ckpt / "README.md")
    assert card >= 0.985
    assert metrics["test/acc1"] == pytest.approx(359 / 360, abs=1e-6)
    assert round(metrics["test/acc1"] * 100, 2) == pytest.approx(card * 100)


def test_experiment_trains_from_the_cli_config(tmp_path):
    """`zoo train experiment=maxvit_digits` composes and runs on the embedded digits (a few batches)."""
    from pathlib import Path

    from zoo.train import run

    result = run.train(run.compose(["experiment=maxvit_digits", "debug=fast", f"run_dir={tmp_path / 'run'}"]))
    released = zoo.from_pretrained(result["released"])
    assert released.zoo_model_name == "maxvit_digits" and released.window_size == (4, 4)
    assert Path(result["released"], "model.safetensors").is_file()


def test_finetune_from_shipped_checkpoint_with_new_head(tmp_path, caplog):
    """`zoo train experiment=maxvit_digits model.pretrained=checkpoints/maxvit_digits` on a 3-class image
    folder: the head is re-initialised with a message, the rest loads and is fine-tuned (layer decay on)."""
    import json
    import logging
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from zoo.train import run

    ckpt = Path(__file__).resolve().parents[1] / "checkpoints" / "maxvit_digits"
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        (tmp_path / "imgs" / "train" / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(tmp_path / "imgs" / "train" / name / f"{i}.png")
    overrides = [
        "experiment=maxvit_digits", "debug=fast", "num_threads=1", f"run_dir={tmp_path / 'tuned'}",
        f"model.pretrained={ckpt}", "data=image_folder", f"data.root={tmp_path / 'imgs'}", "data.num_classes=3",
        "data.img_size=32", "data.in_chans=1", "data.mean=[0.5]", "data.std=[0.5]", "data.batch_size=4",
        "data.num_workers=0", "data.augment=crop", "data.val_fraction=0.2", "task.layer_decay=0.75", "test=false",
    ]
    with caplog.at_level(logging.WARNING, logger="zoo.hub"):
        tuned = run.train(run.compose(overrides))
    assert "classifier re-initialised" in caplog.text
    config = json.loads((Path(tuned["released"]) / "config.json").read_text())
    assert config["model_name"] == "maxvit_digits" and config["num_classes"] == 3
    pre = zoo.from_pretrained(ckpt)
    post = zoo.from_pretrained(tuned["released"])
    assert post.head.fc.weight.shape == (3, 64)
    assert pre.head.pre_logits.fc.weight.shape == post.head.pre_logits.fc.weight.shape
    key = "stages.0.blocks.0.attn_block.attn.rel_pos.relative_position_bias_table"
    assert not torch.equal(pre.state_dict()[key], post.state_dict()[key])  # fine-tuned, from the checkpoint
    assert (pre.state_dict()[key] - post.state_dict()[key]).abs().max() < 0.1


def test_bench_vision_maxvit_padding_table(capsys):
    """`python -m zoo.bench.vision_maxvit`: one row per input size; the unpadded size is the reference (per-pixel
    cost exactly 1), the padded one's ratio comes from the same rounds (paired)."""
    from zoo.bench import vision_maxvit

    assert vision_maxvit.main(["--model", "maxvit_debug", "--size", "64", "--odd", "50", "--batch", "1",
                               "--repeats", "2", "--warmup", "0", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 64x64") or line.startswith("| 50x50")]
    assert len(rows) == 2
    assert "command: `zoo bench vision_maxvit --model maxvit_debug" in out and "load average at end" in out
    assert rows[0].rstrip(" |").endswith("1.000")
    ratio = float(rows[1].rstrip(" |").rsplit("|", 1)[1])
    assert 0.0 < ratio < 100.0
    for bad, message in ((["--batch", "0"], "--batch"), (["--warmup", "-1"], "--warmup"), (["--model", "nope"], "nope"),
                         (["--size", "33"], "--size 33 is the unpadded baseline and must be a multiple of 32")):
        with pytest.raises(SystemExit):
            vision_maxvit.main(["--model", "maxvit_debug", "--size", "64", "--odd", "50", *bad])
        assert message in capsys.readouterr().err


def test_attention_names_non_finite_weights():
    """The partition attention checks its own input and output (one dot product) instead of attend()'s
    per-call reductions; a NaN weight is named, not reported as a NaN query."""
    model = zoo.create_model("maxvit_debug").eval()
    attention = next(m for m in model.modules() if type(m).__name__ == "Attention2d" or hasattr(m, "rel_pos"))
    with torch.no_grad():
        attention.qkv.weight[0, 0] = float("nan")
        with pytest.raises(ValueError, match=r"MaxViT attention: the output is not finite although the input is: "
                                             r"non-finite weights in \['qkv.weight'\]"):
            model(torch.randn(1, 3, 64, 64))


def test_same_pad_is_tensorflow_same_in_integer_arithmetic():
    """_same_pad avoids math.ceil of a float division and max() (under torch.compile's automatic dynamic shapes they
    nested into symbolic expressions that had not compiled after 5 minutes at a second image size); it must still be
    TF's SAME padding: output ceil(size / stride), total padding max((out - 1) * stride + kernel - size, 0)."""
    import math

    from zoo.tasks.vision.maxvit import _same_pad

    for size in range(1, 70):
        for kernel in (1, 2, 3, 5, 7):
            for stride in (1, 2, 3, 4):
                total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
                assert _same_pad(size, kernel, stride) == (total // 2, total - total // 2), (size, kernel, stride)


@pytest.mark.parametrize("src, dst", [(64, (64, 128)), (128, (128, 64))])
def test_checkpoint_into_a_non_square_window_matches_timm_filter(src, dst):
    """Weights trained at a square size loaded at a size whose window is not square (2 x 4 from 2 x 2; 4 x 2
    from 4 x 4): the tables are resized to rows x columns as timm's checkpoint_filter_fn does. A transposed target
    window, resized a second time on load, raised no error; its tables differed from timm's, and where a table
    shrinks along one axis (the second case) so did the logits."""
    from timm.layers import resize_rel_pos_bias_table

    torch.manual_seed(0)
    peer = _peer("maxvit_debug", src)
    source = peer.state_dict()
    peer_ns = _timm_debug(dst).eval()
    peer_ns.load_state_dict(timm_maxxvit.checkpoint_filter_fn(source, peer_ns), strict=True)
    ours = zoo.create_model("maxvit_debug", img_size=dst).eval()
    window = (dst[0] // 32, dst[1] // 32)
    assert ours.window_size == window
    adapted = ours.adapt_state_dict(source)
    tables = [key for key in adapted if key.endswith("relative_position_bias_table")]
    assert len(tables) == 8
    for key in tables:
        expected = resize_rel_pos_bias_table(source[key], new_window_size=window,
                                             new_bias_shape=(source[key].shape[0], 2 * window[0] - 1, 2 * window[1] - 1))
        torch.testing.assert_close(adapted[key], expected, msg=key)
        torch.testing.assert_close(adapted[key], peer_ns.state_dict()[key], msg=key)
    ours.load_timm_state_dict(source)
    for key, value in peer_ns.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, msg=key)
    x = torch.randn(2, 3, *dst)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer_ns(x), rtol=0, atol=1e-4)


def test_set_input_size_keeps_a_frozen_model_frozen():
    """model.requires_grad_(False) (a frozen feature extractor) survives set_input_size: the resized relative-
    position tables stay frozen; a trainable model's stay trainable."""
    frozen = zoo.create_model("maxvit_debug", img_size=64)
    frozen.requires_grad_(False)
    frozen.set_input_size(img_size=(64, 128))
    assert frozen.window_size == (2, 4)
    assert not [name for name, p in frozen.named_parameters() if p.requires_grad]
    trainable = zoo.create_model("maxvit_debug", img_size=64)
    trainable.set_input_size(img_size=(64, 128))
    assert all(p.requires_grad for p in trainable.parameters())


# --------------------------------------------------------------------------------------------------
# Second-pass audit: rw final norm in forward_intermediates, drop_path in training, TF "same" padding at odd
# sizes, head width after reset_classifier, NHWC intermediates, gradient checkpointing of every stage
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(indices=[-2, -1], norm=True), dict(indices=2),
                                    dict(indices=[1, -3], stop_early=True), dict(indices=[-1], norm=True,
                                                                                    stop_early=True)])
def test_rw_forward_intermediates_norm_and_negative_indices_match_timm(kwargs):
    """maxvit_debug (TF) has no final norm (it is in the head), so norm=True there pins nothing: the rmlp models
    have a LayerNorm2d after the last stage, which norm=True applies to the last map and which the returned final
    features always carry unless stages were cut (timm's MaxxVit.forward_intermediates on the same weights)."""
    torch.manual_seed(0)
    peer = _peer("maxvit_rmlp_pico_rw_256", 64)
    ours = zoo.create_model("maxvit_rmlp_pico_rw_256", img_size=64).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    with torch.no_grad():  # a final norm far from the identity, so that leaving it out shows
        ours.norm.weight.uniform_(0.5, 2.0), ours.norm.bias.normal_()
        peer.norm.load_state_dict(ours.norm.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, maps = ours.forward_intermediates(x, **kwargs)
        peer_final, peer_maps = peer.forward_intermediates(x, **kwargs)
        only = ours.forward_intermediates(x, intermediates_only=True, **kwargs)
    assert len(maps) == len(peer_maps) == len(only)
    for a, b, c in zip(maps, peer_maps, only):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, peer_final, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, img_size", [("maxvit_debug", 64), ("maxvit_rmlp_pico_rw_256", 64)])
def test_drop_path_in_training_matches_timm(name, img_size):
    """Stochastic depth as timm's: the per-block rates (linspace over all blocks), DropPath on the MBConv's
    residual branch only (not on its shortcut) and on both branches of the block and grid attentions. Both draw
    one Bernoulli per sample in the same order, so in training mode, from the same seed, the logits and the
    gradients agree; and every DropPath has timm's rate."""
    torch.manual_seed(0)
    peer = (_timm_debug(img_size, drop_path_rate=0.5) if name == "maxvit_debug"
            else timm.create_model(name, pretrained=False, img_size=img_size, drop_path_rate=0.5))
    ours = zoo.create_model(name, img_size=img_size, drop_path_rate=0.5)
    ours.load_state_dict(peer.state_dict(), strict=True)
    rates = {k: m.drop_prob for k, m in ours.named_modules() if type(m).__name__ == "DropPath"}
    peer_rates = {k: m.drop_prob for k, m in peer.named_modules() if type(m).__name__ == "DropPath"}
    assert rates.keys() == peer_rates.keys() and len(rates) > 10  # the first block's rate is 0: no DropPath
    for key in rates:
        assert rates[key] == pytest.approx(peer_rates[key]), key
    ours.train(), peer.train()
    x = torch.randn(8, 3, img_size, img_size)
    torch.manual_seed(123)
    got = ours(x)
    torch.manual_seed(123)
    expected = peer(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # the masks drew something: a different seed gives different logits
    torch.manual_seed(124)
    assert not torch.allclose(ours(x), got, atol=1e-3)


@pytest.mark.parametrize("hw", [(93, 94), (94, 95)])
def test_tf_same_padding_at_odd_sizes_matches_timm(hw):
    """TF "same" padding where it is asymmetric: an odd image into the stride-2 stem conv (pad 1/1) beside an even
    side (pad 0/1), and an odd 47-pixel map into the stride-2 MBConv (depthwise conv and the shortcut's 2x2
    average pool, zero-padded at the bottom/right only). timm's MaxxVit built at 96 px (window = grid = 3) runs
    these inputs too: its convs and pool pad dynamically, and every stage map (24, 12, 6, 3) is a window multiple,
    so nothing here is the zoo's own partition padding."""
    torch.manual_seed(0)
    peer = _peer("maxvit_debug", 96)
    ours = zoo.create_model("maxvit_debug", img_size=96).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        maps = ours.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        peer_maps = peer.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        assert [tuple(m.shape[-2:]) for m in maps] == [(47, -(-hw[1] // 2)), (24, 24)]
        for a, b in zip(maps, peer_maps):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), peer(x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("hidden", [True, False])
def test_reset_classifier_pool_updates_head_width_as_timm(hidden):
    """reset_classifier(K, global_pool=...) on both head types: head_hidden_size, the width of forward_head's
    pre-logits and of the new classifier's input follow the new pooling (catavgmax doubles the rw head's width),
    as timm's MaxxVit.reset_classifier."""
    torch.manual_seed(0)
    peer = _timm_debug_pool("avg", hidden).eval()
    ours = zoo.create_model("maxvit_debug", **({} if hidden else {"head_hidden_size": None})).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    for pool in (("max", "", "avgmax") if hidden else ("catavgmax", "avg", "catavgmax", "")):
        peer.reset_classifier(4, global_pool=pool)
        ours.reset_classifier(4, global_pool=pool)
        assert (ours.head_hidden_size, ours.global_pool) == (peer.head_hidden_size, peer.global_pool), pool
        with torch.no_grad():
            pre = ours.forward_head(ours.forward_features(x), pre_logits=True)
            torch.testing.assert_close(pre, peer.forward_head(peer.forward_features(x), pre_logits=True),
                                       rtol=1e-4, atol=1e-4)
        assert pre.shape[1] == ours.head_hidden_size
        assert ours.get_classifier().weight.shape[1] == ours.head_hidden_size


def test_forward_intermediates_nhwc_on_a_non_square_image():
    """output_fmt="NHWC" is the NCHW map with channels moved last (timm has only NCHW), checked on a 64x96 image,
    where a transposed map would have the wrong shape and a 2x3 stage map can't hide a swap."""
    torch.manual_seed(0)
    model = zoo.create_model("maxvit_rmlp_pico_rw_256", img_size=64).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        nchw = model.forward_intermediates(x, indices=[0, -1], norm=True, intermediates_only=True)
        final, nhwc = model.forward_intermediates(x, indices=[0, -1], norm=True, output_fmt="NHWC")
    assert [m.shape for m in nhwc] == [(1, 32, 48, 32), (1, 2, 3, 256)]
    for a, b in zip(nhwc, nchw):
        torch.testing.assert_close(a, b.permute(0, 2, 3, 1), rtol=0, atol=0)
    torch.testing.assert_close(final, nchw[-1], rtol=0, atol=0)  # the final features stay NCHW


def test_grad_checkpointing_recomputes_every_block(monkeypatch):
    """set_grad_checkpointing(True) checkpoints every block of every stage (timm sets it on all stages), and
    off again, none; counted through the module's checkpoint function."""
    calls = []

    def counting(fn, *args, **kwargs):
        calls.append(fn)
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(mv, "checkpoint", counting)
    model = zoo.create_model("maxvit_debug", depths=(1, 2, 1, 1)).train()
    x = torch.randn(2, 3, 64, 64)
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    blocks = [b for stage in model.stages for b in stage.blocks]
    assert len(calls) == len(blocks) == 5 and [id(c) for c in calls] == [id(b) for b in blocks]
    calls.clear()
    model.set_grad_checkpointing(False)
    model(x).sum().backward()
    assert calls == []


def test_rmlp_bias_after_set_input_size_matches_timm():
    """The rmlp models' MLP relative-position bias at a changed window (set_input_size: new offset tables, the
    same MLP), also with a window different from the grid, against timm's MaxxVit.set_input_size on the same
    weights; the TF tables are covered by test_set_input_size_sequence_derives_again_as_timm."""
    torch.manual_seed(0)
    peer = _peer("maxvit_rmlp_pico_rw_256", 64)
    ours = zoo.create_model("maxvit_rmlp_pico_rw_256", img_size=64).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    for kwargs in (dict(img_size=128), dict(img_size=128, window_size=2), dict(img_size=96, grid_size=1)):
        peer.set_input_size(**kwargs)
        ours.set_input_size(**kwargs)
        assert _partition_sizes(ours) == _partition_sizes(peer), kwargs
        x = torch.randn(1, 3, ours.img_size[0], ours.img_size[1])
        with torch.no_grad():
            torch.testing.assert_close(ours(x), peer(x), rtol=0, atol=1e-4, msg=str(kwargs))


def test_stride2_shortcut_pool_at_odd_sizes_hand_computed():
    """The MBConv shortcut's 2x2 average pool at odd sizes, per output pixel by hand (timm has no rw reference
    there: its pool floors and the branches fail to add): the rw pool (ceil_mode) averages only the in-image
    pixels of the partial last window; the TF pool ("same") pads zeros at the bottom/right that count in the
    average (timm AvgPool2dSame)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    rw, tf = mv.Downsample2d(3, 3, padding=""), mv.Downsample2d(3, 3, padding="same")
    got_rw, got_tf = rw(x), tf(x)
    assert got_rw.shape == got_tf.shape == (2, 3, 3, 4)
    for i in range(3):
        for j in range(4):
            window = x[..., 2 * i:2 * i + 2, 2 * j:2 * j + 2]
            torch.testing.assert_close(got_rw[..., i, j], window.mean((-2, -1)))
            torch.testing.assert_close(got_tf[..., i, j], window.sum((-2, -1)) / 4)


def test_checkpoint_filter_refuses_a_table_with_other_heads():
    """A relative-position table with another head count cannot be resized into this model: the filter names the
    key and both shapes instead of resizing it and leaving load_state_dict a bare size mismatch."""
    model = zoo.create_model("maxvit_debug", img_size=128)  # window 4: tables (heads, 7, 7)
    key = "stages.1.blocks.0.attn_block.attn.rel_pos.relative_position_bias_table"
    assert model.state_dict()[key].shape == (4, 7, 7)
    with pytest.raises(ValueError, match=r"attn_block\.attn\.rel_pos.*\(3, 3, 3\) cannot be resized to \(4, 7, 7\)"):
        mv.checkpoint_filter_fn({key: torch.zeros(3, 3, 3)}, model)


@pytest.mark.parametrize("timm_kwargs", [
    dict(transformer_attn_drop=0.1, transformer_proj_drop=0.2),
    dict(transformer_rel_pos_type="mlp", transformer_rel_pos_dim=64),
    dict(conv_act_layer="silu", conv_attn_ratio=0.125, transformer_act_layer="gelu", transformer_head_first=True),
    dict(transformer_window_size=2, transformer_grid_size=1),
])
def test_timm_block_keywords_build_timms_model(timm_kwargs):
    """timm's conv_* / transformer_* keywords (what save_for_hf records in model_args) build the model timm builds:
    the same state dict loads strict, the same logits, the same dropout rates where timm has Dropout modules (the
    zoo's attention dropout is attend()'s dropout_p, not a module)."""
    torch.manual_seed(0)
    peer = timm.create_model("maxvit_tiny_tf_224", pretrained=False, img_size=64, **timm_kwargs).eval()
    ours = zoo.create_model("maxvit_tiny_tf_224", img_size=64, **timm_kwargs).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer(x), rtol=1e-4, atol=1e-4)

    def rates(model, skip=()):  # (timm's relative-position MLP names its one dropout drop1, the zoo's drop)
        return sorted((name.replace("rel_pos.mlp.drop1", "rel_pos.mlp.drop"), module.p)
                      for name, module in model.named_modules()
                      if isinstance(module, torch.nn.Dropout) and module.p > 0 and not name.endswith(skip))

    assert rates(ours) == rates(peer, skip=("attn.attn_drop",))
    if "transformer_attn_drop" in timm_kwargs:
        block = ours.stages[0].blocks[0].attn_block.attn
        assert block.attn_drop == timm_kwargs["transformer_attn_drop"]


def test_a_lone_timm_grid_size_is_ignored_as_timm_ignores_it():
    """timm replaces both partition sizes by img_size // partition_ratio when no window size is given, so a timm
    export recording transformer_grid_size alone is read that way (with a warning); the zoo's grid_size= is kept."""
    torch.manual_seed(0)
    peer = timm.create_model("maxvit_tiny_tf_224", pretrained=False, img_size=64, transformer_grid_size=4).eval()
    with pytest.warns(UserWarning, match="transformer_grid_size=4 without a window size is ignored"):
        ours = zoo.create_model("maxvit_tiny_tf_224", img_size=64, transformer_grid_size=4).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer(x), rtol=1e-4, atol=1e-4)
    own = zoo.create_model("maxvit_tiny_tf_224", img_size=64, grid_size=4)
    assert tuple(own.stages[0].blocks[0].attn_grid.partition_size) == (4, 4)
    with pytest.raises(TypeError, match="grid_size given twice"):
        zoo.create_model("maxvit_tiny_tf_224", img_size=64, grid_size=4, transformer_grid_size=4)


# --------------------------------------------------------------------------------------------------
# timm 1.0.31's keyword arguments: set_input_size(partition_ratio=), reset_classifier(reset_other=)
# --------------------------------------------------------------------------------------------------
def test_set_input_size_partition_ratio_as_timm(tmp_path):
    """set_input_size(partition_ratio=r) as timm 1.0.31's MaxxVit.set_input_size: the ratio stays for later calls,
    derives the window and grid not given (a given one wins), and the partition sizes, resized tables and logits
    follow timm's model through the same calls (review B finding 1: it was a TypeError). The ratio is recorded,
    so the saved model loads with it and derives as this one does."""
    torch.manual_seed(0)
    peer = _peer("maxvit_debug", 64)
    ours = zoo.create_model("maxvit_debug", img_size=64).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    # sizes where timm's forward runs (every stage's map a multiple of the partition sizes)
    calls = [dict(img_size=128, partition_ratio=64), dict(img_size=192), dict(img_size=128, grid_size=1),
             dict(img_size=128, partition_ratio=32, window_size=1)]
    expected = [((2, 2), (2, 2)), ((3, 3), (3, 3)), ((2, 2), (1, 1)), ((1, 1), (4, 4))]
    for kwargs, sizes in zip(calls, expected):
        peer.set_input_size(**kwargs)
        ours.set_input_size(**kwargs)
        assert _partition_sizes(ours) == _partition_sizes(peer) == [sizes] * 4, kwargs
        assert ours.partition_ratio == peer.partition_ratio, kwargs
        for (key, a), b in zip(ours.state_dict().items(), peer.state_dict().values()):
            torch.testing.assert_close(a, b, msg=key)
        x = torch.randn(1, 3, *ours.img_size)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), peer(x), rtol=0, atol=1e-4, msg=str(kwargs))
    # the reviewer's call: a ratio whose partitions outgrow the last stage's map; timm's forward then fails on
    # the 2x2 map, the zoo pads. Same partition sizes and tables as timm, and the logits of the model built so.
    peer.set_input_size(img_size=64, partition_ratio=16)
    ours.set_input_size(img_size=64, partition_ratio=16)
    assert _partition_sizes(ours) == _partition_sizes(peer) == [((4, 4), (4, 4))] * 4
    for (key, a), b in zip(ours.state_dict().items(), peer.state_dict().values()):
        torch.testing.assert_close(a, b, msg=key)
    built = zoo.create_model("maxvit_debug", img_size=64, partition_ratio=16).eval()
    built.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), built(x), rtol=0, atol=0)
    # config.json round trip: the loaded model is this one, and derives with its ratio on a later call
    zoo.save_pretrained(ours, tmp_path / "ratio")
    loaded = zoo.create_model("maxvit_debug", pretrained=str(tmp_path / "ratio")).eval()
    assert loaded.partition_ratio == 16 and _partition_sizes(loaded) == _partition_sizes(ours)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ours(x), rtol=0, atol=0)
    for model in (ours, loaded, peer):
        model.set_input_size(img_size=96)
    assert _partition_sizes(loaded) == _partition_sizes(ours) == _partition_sizes(peer) == [((6, 6), (6, 6))] * 4


def test_set_input_size_partition_ratio_replaces_fixed_partitions_and_checks_it(tmp_path):
    """maxvit_digits is built with window/grid 4 (kept by set_input_size): an explicit partition_ratio derives them
    from the ratio instead, now and on later calls, and so does the model saved and loaded; timm's own name for the
    ratio in the recorded arguments gives way (both would be "given twice"). Bad ratios are refused before
    anything changes."""
    digits = zoo.create_model("maxvit_digits")
    digits.set_input_size(img_size=64, partition_ratio=8)
    assert (digits.window_size, digits.grid_size) == ((8, 8), (8, 8))
    zoo.save_pretrained(digits, tmp_path / "digits")
    loaded = zoo.create_model("maxvit_digits", pretrained=str(tmp_path / "digits"))
    for model in (digits, loaded):
        assert _partition_sizes(model) == [((8, 8), (8, 8))] * 4
        model.set_input_size(img_size=(32, 48))
        assert (model.window_size, model.grid_size) == ((4, 6), (4, 6))
    timm_named = zoo.create_model("maxvit_debug", transformer_partition_ratio=64)
    assert timm_named.window_size == (1, 1)
    timm_named.set_input_size(partition_ratio=16)
    zoo.save_pretrained(timm_named, tmp_path / "timm_named")
    loaded = zoo.create_model("maxvit_debug", pretrained=str(tmp_path / "timm_named"))
    assert loaded.partition_ratio == 16 and _partition_sizes(loaded) == [((4, 4), (4, 4))] * 4
    model = zoo.create_model("maxvit_debug")
    for bad in (0, -2, 2.0, True, "16"):
        with pytest.raises(ValueError, match="partition_ratio must be a positive int"):
            model.set_input_size(img_size=128, partition_ratio=bad)
    with pytest.raises(ValueError, match="window_size must be a positive int"):
        model.set_input_size(img_size=128, window_size=0, partition_ratio=16)
    assert (model.img_size, model.partition_ratio, model.window_size) == ((64, 64), 32, (2, 2))


def _timm_debug_head(hidden_size, global_pool: str = "avg"):
    """timm's MaxxVit with maxvit_debug's configuration and a head_hidden_size other than the last stage's width
    (40, so that a head that kept its pre-logits MLP has another width), or none (the rw head)."""
    tf = timm_maxxvit._tf_cfg()
    cfg = timm_maxxvit.MaxxVitCfg(
        embed_dim=(16, 32, 48, 64), depths=(1, 1, 1, 1), block_type=("M",) * 4, stem_width=(8, 16),
        stem_bias=True, head_hidden_size=hidden_size, conv_cfg=tf["conv_cfg"],
        transformer_cfg=dataclasses.replace(tf["transformer_cfg"], dim_head=8),
    )
    peer = timm_maxxvit.MaxxVit(cfg, img_size=64, num_classes=10, global_pool=global_pool)
    _calibrate_bn(peer, 64)
    return peer


@pytest.mark.parametrize("hidden_size", [40, None])
def test_reset_classifier_reset_other_as_timm(hidden_size, tmp_path):
    """reset_classifier(K, pool, reset_other=True) as timm's MaxxVit.reset_classifier: the TF head's norm and tanh
    pre-logits go (NormMlpClassifierHead.reset), the rw head has none to drop (ClassifierHead.reset: a no-op);
    same state-dict keys, features, head width and logits as timm on the same weights (review B finding 2: it was
    a TypeError). The reset head is recorded: the saved model loads with it."""
    torch.manual_seed(0)
    peer = _timm_debug_head(hidden_size).eval()
    ours = zoo.create_model("maxvit_debug", head_hidden_size=hidden_size).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    peer.reset_classifier(0, reset_other=True)
    ours.reset_classifier(0, reset_other=True)
    assert list(ours.state_dict()) == list(peer.state_dict())
    assert (ours.num_classes, ours.head_hidden_size, ours.global_pool) == \
        (peer.num_classes, peer.head_hidden_size, peer.global_pool) == (0, 64, "avg")
    with torch.no_grad():
        features = ours(x)
        assert features.shape == (2, 64)
        torch.testing.assert_close(features, peer(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(features, ours.forward_features(x).mean((2, 3)), rtol=0, atol=0)
    # a new classifier with another pooling (per position on the TF head; timm's rw head fails on "")
    pool, shape = ("", (2, 5, 2, 2)) if hidden_size else ("max", (2, 5))
    for model in (ours, peer):
        model.reset_classifier(5, global_pool=pool, reset_other=True)
    ours.head.fc.load_state_dict(peer.head.fc.state_dict())
    assert dict((k, v.shape) for k, v in ours.state_dict().items()) == \
        dict((k, v.shape) for k, v in peer.state_dict().items())
    with torch.no_grad():
        logits = ours(x)
        assert logits.shape == shape
        torch.testing.assert_close(logits, peer(x), rtol=0, atol=1e-4)
    zoo.save_pretrained(ours, tmp_path / "reset")
    loaded = zoo.create_model("maxvit_debug", pretrained=str(tmp_path / "reset")).eval()
    assert list(loaded.state_dict()) == list(ours.state_dict())
    assert isinstance(loaded.norm, type(ours.norm)) and isinstance(loaded.head.pre_logits, torch.nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), logits, rtol=0, atol=0)
    # without the normalised head, catavgmax is allowed (timm asserts on it only on NormMlpClassifierHead)
    ours.reset_classifier(3, global_pool="catavgmax")
    assert ours.head_hidden_size == 128 and ours(x).shape == (2, 3)
    with pytest.raises(TypeError, match="reset_other must be True or False"):
        ours.reset_classifier(3, reset_other="yes")
