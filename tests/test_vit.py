"""The zoo ViT against timm's VisionTransformer: state dicts load strict and logits agree (fp32, 1e-4),
for the registered timm configurations, other patch/image sizes, the timm options, dynamic image size and
position-embedding resampling on load; plus forward/backward of every registered ViT and clear errors."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer as TimmViT
from timm.models.vision_transformer import checkpoint_filter_fn as timm_filter

import zoo
import zoo.tasks.vision.vit as V  # registers the ViT names (also imported by zoo.tasks.vision)

ATOL = 1e-4


def _pair(kwargs, seed=0):
    torch.manual_seed(seed)
    peer = TimmViT(**kwargs).eval()
    ours = V.VisionTransformer(**kwargs).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    return ours, peer


def _images(b, c, h, w, seed=0):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,size", [("vit_tiny_patch16_224", None), ("vit_small_patch16_224", None),
                                       ("deit3_small_patch16_224", 64), ("vit_small_patch14_reg4_dinov2", 70),
                                       ("vit_small_patch14_dinov2", 56), ("vit_base_patch32_clip_224", 64),
                                       ("vit_base_patch16_siglip_224", 48), ("vit_base_patch16_siglip_gap_224", 32),
                                       ("deit_tiny_distilled_patch16_224", 64)])
def test_timm_registered_models_load_strict_and_match(name, size):
    """timm's state dict of the same name loads strictly and gives its logits (DeiT III's layer scale and
    patch-only position embedding, DINOv2's patch 14 and registers at a reduced size; DINOv2 has no head; CLIP's
    pre-norm and LayerNorm eps 1e-5, which a 1e-6 eps misses by more than the tolerance; SigLIP's attention
    pooling with a latent query, and its average-pooled variant)."""
    torch.manual_seed(0)
    kwargs = {} if size is None else dict(img_size=size)
    peer = timm.create_model(name, pretrained=False, **kwargs).eval()
    ours = zoo.create_model(name, **kwargs).eval()
    for p in peer.parameters():  # layer scales start at 1e-5 / 1e-6: make every branch count
        p.data.add_(torch.randn_like(p) * 0.02)
    assert set(ours.state_dict()) == set(peer.state_dict())
    ours.load_state_dict(peer.state_dict(), strict=True)
    size = size or 224
    x = _images(2, 3, size, size)
    with torch.no_grad():
        logits, ref = ours(x), peer(x)
    assert logits.shape == (2, peer.num_classes or peer.num_features)
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), peer.forward_features(x), atol=ATOL, rtol=0)


SMALL = dict(embed_dim=48, depth=2, num_heads=3, num_classes=7)
OPTIONS = {
    "patch8_img64": dict(img_size=64, patch_size=8),
    "rect_img_patch": dict(img_size=(32, 48), patch_size=(8, 4), in_chans=1),
    "gap_fc_norm": dict(img_size=32, patch_size=8, global_pool="avg"),
    "max_pool": dict(img_size=32, patch_size=8, global_pool="max", fc_norm=False),
    "avgmax_pool_default_fc_norm": dict(img_size=32, patch_size=8, global_pool="avgmax"),
    "avgmax_pool_no_norm": dict(img_size=32, patch_size=8, global_pool="avgmax", fc_norm=False),  # LayerNorm hides a scale
    "reg_tokens": dict(img_size=32, patch_size=8, reg_tokens=3),
    "no_embed_class_regs": dict(img_size=32, patch_size=8, no_embed_class=True, reg_tokens=2),
    "no_class_token": dict(img_size=32, patch_size=8, class_token=False, global_pool="avg"),
    "layer_scale_qk_norm": dict(img_size=32, patch_size=8, init_values=0.1, qk_norm=True),
    "pre_norm_no_bias": dict(img_size=32, patch_size=8, pre_norm=True, qkv_bias=False, proj_bias=False),
    "mlp_ratio_no_head": dict(img_size=32, patch_size=8, mlp_ratio=2.5, num_classes=0),
    "no_pos_embed": dict(img_size=32, patch_size=8, pos_embed="none"),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_options_match_timm(option):
    kwargs = {**SMALL, **OPTIONS[option]}
    ours, peer = _pair(kwargs)
    _randomise_layer_norms(peer)
    ours.load_state_dict(peer.state_dict(), strict=True)
    h, w = ours.patch_embed.img_size
    x = _images(3, kwargs.get("in_chans", 3), h, w)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer(x), atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.forward_head(ours.forward_features(x), pre_logits=True),
                                   peer.forward_head(peer.forward_features(x), pre_logits=True), atol=ATOL, rtol=0)


def _randomise_layer_norms(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)


def test_dynamic_image_size_matches_timm():
    kwargs = dict(SMALL, img_size=32, patch_size=8, dynamic_img_size=True)
    ours, peer = _pair(kwargs)
    for h, w in ((32, 32), (48, 64), (16, 24)):
        x = _images(2, 3, h, w)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), peer(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_dynamic_img_pad_matches_timm(global_pool):
    """dynamic_img_pad zero-pads to whole patches as timm's PatchEmbed does: logits and intermediates equal
    timm's at sizes the patch does not divide (and at one it does)."""
    kwargs = dict(SMALL, img_size=32, patch_size=8, dynamic_img_size=True, dynamic_img_pad=True,
                  global_pool=global_pool)
    ours, peer = _pair(kwargs)
    _randomise_layer_norms(peer)
    ours.load_state_dict(peer.state_dict(), strict=True)
    for h, w in ((30, 20), (33, 47), (32, 32), (9, 17), (4, 20), (4, 4)):  # smaller than a patch: padded to one
        x = _images(2, 3, h, w)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), peer(x), atol=ATOL, rtol=0)
            got = ours.forward_intermediates(x, indices=2, intermediates_only=True)
            want = peer.forward_intermediates(x, indices=2, intermediates_only=True)
        assert got[0].shape[-2:] == (-(-h // 8), -(-w // 8))
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_dynamic_img_pad_with_a_non_square_patch_matches_timm():
    """A (4, 8) patch pads the rows to a multiple of 4 and the columns to a multiple of 8, as timm's PatchEmbed:
    logits and the patch grid equal timm's at sizes neither side divides."""
    kwargs = dict(SMALL, img_size=32, patch_size=(4, 8), dynamic_img_size=True, dynamic_img_pad=True)
    ours, peer = _pair(kwargs)
    for h, w in ((30, 21), (13, 42)):
        x = _images(2, 3, h, w)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), peer(x), atol=ATOL, rtol=0)
            grid = ours.forward_intermediates(x, indices=1, intermediates_only=True)[0].shape[-2:]
        assert grid == (-(-h // 4), -(-w // 8))


def test_dynamic_img_pad_at_a_fixed_size_the_patch_does_not_divide():
    """A fixed img_size of 30 x 20 with patch 8 keeps timm's 3 x 2 position grid (same state dict); the padded
    4 x 3 grid gets that embedding resampled, as timm's dynamic model does (timm's fixed-size model fails)."""
    kwargs = dict(SMALL, img_size=(30, 20), patch_size=8, dynamic_img_pad=True)
    torch.manual_seed(0)
    peer = TimmViT(**dict(kwargs, dynamic_img_size=True)).eval()
    ours = V.VisionTransformer(**kwargs).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)  # pos_embed (1, 1 + 3 * 2, C) in both
    x = _images(2, 3, 30, 20)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer(x), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="does not match the model's img_size 30x20"):
        ours(_images(1, 3, 32, 32))


@pytest.mark.parametrize("act_layer,global_pool", [("gelu_tanh", "map"), ("quick_gelu", "token"), ("gelu", "map")])
def test_act_layer_matches_timm(act_layer, global_pool):
    """act_layer reaches every block's MLP and the attention-pooling head's, as timm's (SigLIP 2's tanh GELU,
    OpenAI CLIP's QuickGELU). Weights are scaled up so that the activation is visible in the logits: the other
    approximation misses by more than 1e-3 there."""
    kwargs = dict(SMALL, img_size=32, patch_size=8, act_layer=act_layer, global_pool=global_pool,
                  class_token=global_pool == "token")
    torch.manual_seed(0)
    peer = TimmViT(**kwargs).eval()
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = _images(2, 3, 32, 32)
    with torch.no_grad():
        want = peer(x)
        for other in ("gelu", "gelu_tanh", "quick_gelu"):
            ours = V.VisionTransformer(**dict(kwargs, act_layer=other)).eval()
            ours.load_state_dict(peer.state_dict(), strict=True)
            error = (ours(x) - want).abs().max().item()
            assert error < 1e-4 if other == act_layer else error > 1e-3, (other, error)
    with pytest.raises(ValueError, match=r"act_layer must be one of \('gelu', 'gelu_tanh', 'quick_gelu'\), got 'swish'"):
        V.VisionTransformer(**dict(kwargs, act_layer="swish"))


def test_drop_img_remainder_ignores_the_partial_patches_as_timm_does():
    """timm's patch convolution drops the pixels past the last whole patch (its vit_so400m_patch14_siglip_384:
    384 = 27 * 14 + 6); drop_img_remainder does that on request, at the fixed size and also with dynamic_img_size
    (where timm refuses such sizes)."""
    kwargs = dict(SMALL, img_size=(36, 30), patch_size=8)
    torch.manual_seed(0)
    peer = TimmViT(**kwargs).eval()
    ours = V.VisionTransformer(**kwargs, drop_img_remainder=True).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)  # pos_embed (1, 1 + 4 * 3, C) in both
    assert ours.patch_embed.grid_size == (4, 3)
    x = _images(2, 3, 36, 30)
    moved = x.clone()
    moved[..., 32:, :] += 5.0
    moved[..., 24:] -= 5.0
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer(x), atol=ATOL, rtol=0)
        torch.testing.assert_close(ours(moved), ours(x), atol=0, rtol=0)  # those pixels are ignored
    peer = TimmViT(**kwargs, dynamic_img_size=True).eval()
    ours = V.VisionTransformer(**kwargs, dynamic_img_size=True, drop_img_remainder=True).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    for h, w in ((36, 30), (45, 17), (8, 63)):  # timm's dynamic model refuses these: it gets the whole patches
        x = _images(2, 3, h, w)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), peer(x[..., : h // 8 * 8, : w // 8 * 8]), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="dynamic_img_pad .* and drop_img_remainder .* exclude each other"):
        V.VisionTransformer(**kwargs, dynamic_img_pad=True, drop_img_remainder=True)
    with pytest.raises(TypeError, match="drop_img_remainder must be True or False"):
        V.VisionTransformer(**kwargs, drop_img_remainder="yes")


# One CLIP / SigLIP tower per distinct configuration (width class, activation, pooling, remainder); every tower
# name's state dict and data config is compared with timm's in test_registered_vit_forward_backward and
# tests/test_data_config.py. Depth 1 at two patches a side (so400m/14 at 384 keeps its 6-pixel remainder).
TOWERS = ["vit_xsmall_patch16_clip_224", "vit_base_patch16_plus_clip_240", "vit_base_patch32_clip_quickgelu_224",
          "vit_gigantic_patch14_clip_quickgelu_224", "vit_base_patch32_siglip_256", "vit_so400m_patch14_siglip_384",
          "vit_so400m_patch14_siglip_gap_384", "vit_so400m_patch16_siglip_gap_256"]


@pytest.mark.parametrize("name", TOWERS)
def test_image_towers_match_timm(name):
    patch = int(name.split("patch")[1].split("_")[0])
    size = 2 * patch + (6 if "so400m_patch14" in name and name.endswith("_384") else 0)
    torch.manual_seed(0)
    peer = timm.create_model(name, pretrained=False, depth=1, img_size=size).eval()
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = zoo.create_model(name, depth=1, img_size=size).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    assert ours.num_classes == peer.num_classes and ours.global_pool == peer.global_pool
    x = _images(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer(x), atol=ATOL, rtol=0)
    assert zoo.get_model_entry(name).constructor.__doc__.split("\n\n")[0].endswith(f"(timm ``{name}``).")  # its summary


def test_pos_embed_resampled_on_load_like_timm():
    # a checkpoint trained at 32 px loaded into models built for 48 px (upsample) and 16 px (anti-aliased downsample)
    torch.manual_seed(0)
    source = TimmViT(**SMALL, img_size=32, patch_size=8, reg_tokens=1)
    state = {"model": source.state_dict()}  # wrapped, as training checkpoints often are
    for size in (48, 16):
        peer = TimmViT(**SMALL, img_size=size, patch_size=8, reg_tokens=1).eval()
        peer.load_state_dict(timm_filter(source.state_dict(), peer), strict=True)
        ours = V.VisionTransformer(**SMALL, img_size=size, patch_size=8, reg_tokens=1).eval()
        ours.load_timm_state_dict(state, strict=True)
        assert ours.pos_embed.shape == (1, 2 + (size // 8) ** 2, 48)
        x = _images(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), peer(x), atol=ATOL, rtol=0)
    # set_input_size resamples in place
    ours = V.VisionTransformer(**SMALL, img_size=32, patch_size=8).eval()
    peer = TimmViT(**SMALL, img_size=32, patch_size=8).eval()
    ours.load_state_dict(peer.state_dict())
    ours.set_input_size(40)
    peer.set_input_size((40, 40))
    x = _images(1, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kwargs", [dict(no_embed_class=True, init_values=0.1),
                                    dict(no_embed_class=True, reg_tokens=2),
                                    dict(reg_tokens=2)])
def test_set_input_size_resamples_as_timm(kwargs):
    """set_input_size on DeiT III / DINOv2-register layouts (position rows for the patches only) and with prefix
    rows: the same resampled table and logits as timm's set_input_size."""
    ours, peer = _pair(dict(SMALL, img_size=32, patch_size=8, **kwargs))
    ours.set_input_size(48)
    peer.set_input_size((48, 48))
    torch.testing.assert_close(ours.pos_embed, peer.pos_embed, atol=1e-6, rtol=0)
    x = _images(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kwargs", [dict(no_embed_class=True, init_values=0.1), dict(no_embed_class=True, reg_tokens=4)])
def test_patch_only_pos_embed_resampled_on_load_like_timm(kwargs):
    """A DeiT III / DINOv2-register checkpoint (position rows for the patches only) trained at 32 px loads into
    models built for 48 and 16 px with timm's filter's table and timm's logits."""
    torch.manual_seed(0)
    source = TimmViT(**SMALL, img_size=32, patch_size=8, **kwargs)
    for size in (48, 16):
        peer = TimmViT(**SMALL, img_size=size, patch_size=8, **kwargs).eval()
        want = timm_filter(source.state_dict(), peer)
        peer.load_state_dict(want, strict=True)
        ours = V.VisionTransformer(**SMALL, img_size=size, patch_size=8, **kwargs).eval()
        ours.load_timm_state_dict(source.state_dict(), strict=True)
        torch.testing.assert_close(ours.pos_embed, want["pos_embed"], atol=1e-6, rtol=0)
        x = _images(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), peer(x), atol=ATOL, rtol=0)


def test_filter_handles_ddp_prefix_layer_scale_names_and_linear_patch_embed():
    ours, peer = _pair(dict(SMALL, img_size=32, patch_size=8, init_values=0.5))
    sd = {}
    for k, v in peer.state_dict().items():
        k = k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2")
        if k == "patch_embed.proj.weight":
            v = v.reshape(v.shape[0], -1)  # old linear patch embedding
        sd["module." + k] = v
    sd["module.pre_logits.fc.weight"] = torch.zeros(3, 3)
    fresh = V.VisionTransformer(**SMALL, img_size=32, patch_size=8, init_values=0.5).eval()
    fresh.load_timm_state_dict(sd, strict=True)
    x = _images(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), peer(x), atol=ATOL, rtol=0)
    # another patch size: the kernel is resampled (FlexiViT) and the position grid follows, as timm's filter does
    from timm.models.vision_transformer import checkpoint_filter_fn as timm_filter

    other_patch = V.VisionTransformer(**SMALL, img_size=32, patch_size=4, init_values=0.5)
    other_patch.load_timm_state_dict(peer.state_dict())
    want = timm_filter(peer.state_dict(), other_patch)
    for key in ("patch_embed.proj.weight", "pos_embed"):
        torch.testing.assert_close(other_patch.state_dict()[key], want[key], atol=1e-6, rtol=1e-6)


def test_class_token_last_block_shortcut_is_exact():
    """forward() computes only the class token in the last block: same logits and gradients as the full model."""
    torch.manual_seed(0)
    model = V.VisionTransformer(**SMALL, img_size=32, patch_size=8, reg_tokens=2, init_values=0.3, qk_norm=True)
    _randomise_layer_norms(model)
    x = _images(3, 3, 32, 32)
    target = torch.tensor([0, 3, 6])
    results = []
    for shortcut in (True, False):
        model.class_token_last_block = shortcut
        logits = model(x)
        grads = torch.autograd.grad(F.cross_entropy(logits, target), list(model.parameters()))
        results.append((logits, grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(results[0][0], model.forward_head(model.forward_features(x)), atol=1e-6, rtol=1e-5)
    for (name, _), g, g_full in zip(model.named_parameters(), results[0][1], results[1][1]):
        torch.testing.assert_close(g, g_full, atol=1e-6, rtol=1e-4, msg=lambda s: f"{name}: {s}")
    # the last block's query subset agrees with its full output row by row
    tokens = torch.randn(2, 19, 48)
    block = model.blocks[-1].eval()
    torch.testing.assert_close(block(tokens, num_queries=3), block(tokens)[:, :3], atol=1e-6, rtol=1e-5)


def test_init_and_weight_decay_exclusions_follow_timm():
    """timm's ViT init (class and register tokens N(0, 1e-6), position table trunc-normal 0.02, linear biases
    zero) and no_weight_decay list: with timm.optim's AdamW groups the register tokens get no weight decay."""
    from timm.optim import create_optimizer_v2

    kwargs = dict(SMALL, img_size=32, patch_size=8, reg_tokens=4)
    torch.manual_seed(0)
    ours = V.VisionTransformer(**kwargs)
    peer = TimmViT(**kwargs)
    for model in (ours, peer):
        assert 0 < model.cls_token.std() < 1e-5 and 0 < model.reg_token.std() < 1e-5
        assert 0.015 < model.pos_embed.std() < 0.025
        linear_biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
        assert len(linear_biases) == 2 * 4 + 1 and all(not b.any() for b in linear_biases)  # qkv, proj, fc1, fc2; head
    assert ours.no_weight_decay() == peer.no_weight_decay()

    def decay_by_name(model):
        names = {id(q): n for n, q in model.named_parameters()}
        opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
        return {names[id(q)]: g["weight_decay"] for g in opt.param_groups for q in g["params"]}

    decay = decay_by_name(ours)
    assert decay == decay_by_name(peer)
    assert decay["reg_token"] == decay["cls_token"] == decay["pos_embed"] == 0.0


def test_training_features_drop_path_checkpointing_and_classifier_api():
    torch.manual_seed(0)
    model = V.VisionTransformer(**SMALL, img_size=32, patch_size=8, drop_path_rate=0.2, attn_drop_rate=0.1)
    assert [round(b.drop_path1.drop_prob, 3) for b in model.blocks[1:]] == [0.2]
    x = _images(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        eval_a, eval_b = model(x), model(x)
    torch.testing.assert_close(eval_a, eval_b)  # no stochasticity in eval
    model.train()
    torch.manual_seed(1)
    loss = F.cross_entropy(model(x), torch.arange(4))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    loss_ckpt = F.cross_entropy(model(x), torch.arange(4))
    grads_ckpt = torch.autograd.grad(loss_ckpt, list(model.parameters()))
    torch.testing.assert_close(loss_ckpt, loss)
    for g, gc in zip(grads, grads_ckpt):
        torch.testing.assert_close(gc, g, atol=1e-6, rtol=1e-5)
    assert model.get_classifier() is model.head
    assert model.pretrained_head_keys() == ["head.weight", "head.bias"]
    assert set(model.pretrained_head_keys()) <= set(model.state_dict())
    model.reset_classifier(3, global_pool="avg")
    assert model(x).shape == (4, 3) and model.global_pool == "avg"
    model.reset_classifier(0)
    assert model(x).shape == (4, 48)
    with pytest.raises(ValueError, match="class token"):
        V.VisionTransformer(**SMALL, img_size=32, patch_size=8, class_token=False, global_pool="avg").reset_classifier(3, "token")


@pytest.mark.parametrize("name", sorted(zoo.list_models(family="vit")))
def test_registered_vit_forward_backward(name):
    entry = zoo.get_model_entry(name)
    assert entry.task == "vision" and entry.family == "vit"
    small = name not in ("vit_debug", "vit_digits")
    overrides = dict(img_size=28 if "patch14" in name else 32, depth=1) if small else {}
    if small:  # the registered configuration matches timm's of the same name (full width, on the meta device)
        with torch.device("meta"):
            peer, full = timm.create_model(name, pretrained=False, **overrides), zoo.create_model(name, **overrides)
        assert {k: v.shape for k, v in peer.state_dict().items()} == {k: v.shape for k, v in full.state_dict().items()}
        assert (full.num_classes, full.global_pool) == (peer.num_classes, peer.global_pool)
        overrides.update(embed_dim=64, num_heads=4)  # the forward / backward below at a narrow width
    torch.manual_seed(0)
    model = zoo.create_model(name, **overrides)
    h, w = model.patch_embed.img_size
    x = _images(2, model.in_chans, h, w)
    logits = model(x)
    assert logits.shape == (2, model.num_classes or model.num_features) and torch.isfinite(logits).all()
    (logits.logsumexp(-1) if model.num_classes else logits.square().mean(-1)).sum().backward()  # DINOv2: features
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def test_digits_and_debug_configs():
    digits = zoo.create_model("vit_digits")
    assert digits.in_chans == 1 and digits.patch_embed.img_size == (8, 8) and digits.num_classes == 10
    debug = zoo.create_model("vit_debug")
    assert sum(p.numel() for p in debug.parameters()) < 100_000


def test_bad_inputs_raise_clear_errors():
    model = zoo.create_model("vit_debug").eval()
    with pytest.raises(ValueError, match="expects 3 input channels, got 1"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="4-D image batch"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="does not match the model's img_size 32x32"):
        model(torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match="NaN or Inf"):
        bad = torch.randn(1, 3, 32, 32)
        bad[0, 1, 2, 3] = float("nan")
        model(bad)
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    dynamic = zoo.create_model("vit_debug", dynamic_img_size=True)
    with pytest.raises(ValueError, match="smaller than the patch size"):
        dynamic(torch.randn(1, 3, 4, 32))
    with pytest.raises(ValueError, match="not divisible by the patch size .*dynamic_img_pad=True"):
        dynamic(torch.randn(1, 3, 36, 32))
    with pytest.raises(ValueError, match="smaller than patch_size"):
        zoo.create_model("vit_debug", img_size=4)
    # timm builds it and drops the last 6 pixel rows and columns without a word
    with pytest.raises(ValueError, match=r"img_size \(30, 30\) is not divisible by patch_size \(8, 8\).*dynamic_img_pad"):
        zoo.create_model("vit_debug", img_size=30)
    padded = zoo.create_model("vit_debug", img_size=30, dynamic_img_pad=True).eval()
    x = torch.randn(1, 3, 30, 30)
    moved = x.clone()
    moved[..., 24:, :] += 5.0
    with torch.no_grad():
        assert not torch.allclose(padded(x), padded(moved))  # every pixel counts
    with pytest.raises(ValueError, match="global_pool"):
        zoo.create_model("vit_debug", global_pool="mean")
    with pytest.raises(TypeError, match=r"vit_debug: unknown argument 'embed_dims' \(did you mean 'embed_dim'\?\); "
                                        r"VisionTransformer accepts: .*num_classes"):
        zoo.create_model("vit_debug", embed_dims=3)
    with pytest.raises(TypeError, match=r"maxvit_debug: unknown argument 'windw_size' \(did you mean 'window_size'"):
        zoo.create_model("maxvit_debug", windw_size=4)


@pytest.mark.parametrize("name, family", [("vit_debug", "ViT"), ("maxvit_debug", "MaxViT"), ("agent_deit_debug", "Agent-DeiT")])
def test_input_dtype_must_match_the_model(name, family):
    """An fp16 image into an fp32 model (or the reverse) is named at the boundary (was torch's "Input type
    (c10::Half) and bias type (float) should be the same" from the first conv); autocast mixes freely."""
    model = zoo.create_model(name).eval()
    size = model.pretrained_cfg["input_size"][1:]
    x = torch.randn(1, 3, *size)
    with pytest.raises(TypeError, match=f"{family} input is torch.float16 but the model's weights are torch.float32"):
        model(x.half())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(TypeError, match=f"{family} input is torch.float32 but the model's weights are torch.float64"):
        model.double()(x)
    with torch.no_grad():
        assert model(x.double()).dtype == torch.float64


@pytest.mark.parametrize("name, kwargs, message", [
    ("vit_debug", dict(num_classes=True), "num_classes must be an int >= 0, got True"),
    ("vit_debug", dict(depth=True), "depth must be a positive int, got True"),
    ("vit_debug", dict(mlp_ratio=0), "mlp_ratio must be a number > 0"),  # was silently ratio 1
    ("vit_debug", dict(drop_rate=None), "drop_rate must be a number in"),
    ("vit_debug", dict(norm_eps=0), r"norm_eps must be a number in \(0, 1\), got 0"),
    ("vit_debug", dict(norm_eps="1e-5"), r"norm_eps must be a number in \(0, 1\)"),
    ("agent_deit_debug", dict(mlp_ratio=-1.0), "mlp_ratio must be a number > 0"),
    ("agent_deit_debug", dict(num_classes=True), "num_classes must be an int >= 0"),
    ("maxvit_debug", dict(dim_head=0), "dim_head must be a positive int"),  # were ZeroDivisionError
    ("maxvit_debug", dict(partition_ratio=0), "partition_ratio must be a positive int"),
    ("maxvit_debug", dict(conv_se_ratio=0.0), r"conv_se_ratio must be a number in \(0, 1\]"),
    ("maxvit_debug", dict(head_hidden_size=-1), "head_hidden_size must be a positive int"),
    ("maxvit_debug", dict(embed_dim=16), "must be non-empty lists of one length"),
    ("maxvit_debug", dict(attn_drop_rate=2.0), "attn_drop_rate must be a number in"),  # was accepted until .train()
    ("maxvit_debug", dict(dim_head=12), "divisible by dim_head"),
    ("maxvit_debug", dict(init_values=-1e-6), "init_values must be None or a positive number"),
    ("maxvit_debug", dict(init_values="1e-6"), "init_values must be None or a positive number"),
])
def test_constructor_arguments_are_named(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        zoo.create_model(name, **kwargs)


def test_bench_vision_runs_and_loads_optional_case_modules(monkeypatch, capsys):
    import sys
    import types

    from zoo.bench import vision as bench

    # an optional case module exposing CASES as plain (name, zoo_builder, peer_builder) tuples
    fake = types.ModuleType("zoo.bench.vision_fake")
    fake.CASES = [("fake_vit", lambda size: zoo.create_model("vit_debug", img_size=size),
                   lambda size: TimmViT(img_size=size, patch_size=8, num_classes=10, embed_dim=32, depth=2, num_heads=2))]
    monkeypatch.setitem(sys.modules, "zoo.bench.vision_fake", fake)
    monkeypatch.setattr(bench, "OPTIONAL_CASE_MODULES", ["zoo.bench.vision_fake", "zoo.bench.vision_missing"])
    assert bench.main(["--models", "vit_tiny*,fake_vit", "--img-size", "32", "--batch", "2", "--repeats", "1",
                       "--warmup", "0", "--attention-sizes", "16,40"]) == 0
    out = capsys.readouterr().out
    # one command prints both issue-2 tables: attend() vs SDPA (dense and causal per length), then the models
    assert out.index("attend() vs torch SDPA") < out.index("vit_tiny_patch16_224")
    attn_rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith(("| 16 |", "| 40 |"))]
    assert [(r[0].strip(), r[1].strip()) for r in attn_rows] == [("16", "dense"), ("16", "causal"), ("40", "dense"), ("40", "causal")]
    assert all(float(r[4]) > 0 and float(r[7]) > 0 for r in attn_rows)
    # the record every `zoo bench` prints around its tables (zoo.bench.timing.run_header / run_footer)
    assert out.startswith("## zoo bench vision\n\ncommand: `zoo bench vision --models vit_tiny*,fake_vit")
    assert "load average at start" in out and "torch threads" in out and "load average at end" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("vit_tiny_patch16_224", "fake_vit"))]
    assert [r[0] for r in rows] == ["vit_tiny_patch16_224", "fake_vit"]
    for r in rows:
        assert len(r) == 11 and all(float(v) > 0 for v in r[4:7] + r[8:])
        faults = r[7].split("/")  # page faults per inference forward of zoo / peer
        assert len(faults) == 2 and all(f == "-" or float(f) >= 0 for f in faults)
    # a case whose weights do not reproduce the peer is refused before timing
    bad = bench.BenchCase("bad", lambda size: zoo.create_model("vit_debug", img_size=size),
                          lambda size: TimmViT(img_size=size, patch_size=8, num_classes=10, embed_dim=32, depth=2, num_heads=2),
                          copy_weights=lambda ours, peer: None)
    with pytest.raises(RuntimeError, match="outputs differ"):
        bench.run_case(bad, batch=1, img_size=32, repeats=1, warmup=0, train=False, infer=True)


def test_bench_vision_skips_a_case_whose_peer_cannot_run_the_size(monkeypatch, capsys):
    """A peer that cannot run the requested size (timm's MaxViT needs multiples of its partitions) is skipped with
    a message naming the case, the size and the peer's own error; the other cases still run, and a run in which
    no case could run exits with 2 instead of a traceback."""
    import sys
    import types

    from zoo.bench import vision as bench

    class Picky(torch.nn.Module):
        def __init__(self, size):
            super().__init__()
            self.vit = TimmViT(img_size=size, patch_size=8, num_classes=10, embed_dim=32, depth=1, num_heads=2)

        def forward(self, x):
            assert x.shape[-1] % 64 == 0, f"width ({x.shape[-1]}) must be divisible by 64"
            return self.vit(x)

    fake = types.ModuleType("zoo.bench.vision_picky")
    fake.CASES = [bench.BenchCase("picky", lambda size: zoo.create_model("vit_debug", img_size=size, depth=1),
                                  Picky, copy_weights=lambda ours, peer: ours.load_state_dict(peer.vit.state_dict()),
                                  img_size=64)]
    monkeypatch.setitem(sys.modules, "zoo.bench.vision_picky", fake)
    monkeypatch.setattr(bench, "OPTIONAL_CASE_MODULES", ["zoo.bench.vision_picky"])
    common = ["--img-size", "32", "--batch", "1", "--repeats", "1", "--warmup", "0", "--no-attention", "--no-train"]
    assert bench.main(["--models", "vit_tiny*,picky"] + common) == 0
    out = capsys.readouterr().out
    assert ("# skipped picky: the peer (timm) cannot run at img_size 32 (AssertionError: width (32) must be "
            "divisible by 64); pick a size the peer supports (e.g. its default, 64)") in out
    assert [line.split()[0] for line in out.splitlines() if line.startswith(("vit_tiny", "picky"))] == ["vit_tiny_patch16_224"]
    assert bench.main(["--models", "picky"] + common) == 2
    assert "no case could run: picky: the peer (timm) cannot run at img_size 32" in capsys.readouterr().err
    assert bench.main(["--models", "picky"] + common[:1] + ["64"] + common[2:]) == 0  # its own size runs


def test_bench_vision_compiled_smoke(capsys):
    """--compile compiles ours and timm's model (the 'eager' backend here: Dynamo capture only) for inference
    and the training step, and says so; an unknown backend is a usage error."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from zoo.bench import vision as bench

    counters.clear()
    assert bench.main(["--models", "vit_tiny*", "--img-size", "32", "--batch", "2", "--repeats", "1", "--warmup", "0",
                       "--no-attention", "--compile", "eager"]) == 0
    out = capsys.readouterr().out
    assert "models under torch.compile backend eager" in out
    row = [line.split() for line in out.splitlines() if line.strip().startswith("vit_tiny_patch16_224")][0]
    assert all(float(v) > 0 for v in row[4:7] + row[8:])
    assert counters["stats"]["unique_graphs"] >= 4  # ours and timm's, eval and train
    torch._dynamo.reset()
    with pytest.raises(SystemExit):
        bench.main(["--models", "vit_tiny*", "--compile", "inducter"])
    assert "--compile must be" in capsys.readouterr().err
    # the compiled models' outputs are checked again before timing (they were checked only before compiling)

    def drifting_model(size):
        model = zoo.create_model("vit_debug", img_size=size, depth=1)
        forward = model.forward
        model.compile = lambda **kwargs: setattr(model, "forward", lambda x: forward(x) + 1e-3)  # a wrong compiler
        return model

    drifting = bench.BenchCase("drifting", drifting_model,
                               lambda size: TimmViT(img_size=size, patch_size=8, num_classes=10, embed_dim=32, depth=1,
                                                    num_heads=2), img_size=32)
    with pytest.raises(RuntimeError, match=r"drifting: zoo and timm outputs under torch.compile \(backend eager\) "
                                           r"differ by 0.001"):
        bench.run_case(drifting, batch=1, img_size=32, repeats=1, warmup=0, train=False, infer=True,
                       compile_backend="eager")


@pytest.mark.parametrize("name", ["vit_debug", "maxvit_debug", "agent_deit_debug"])
def test_switches_take_booleans_only(name):
    """A truthy string used to switch an option on: set_grad_checkpointing("no") enabled it and
    forward_head(pre_logits="no") returned pre-logits."""
    model = zoo.create_model(name).eval()
    with pytest.raises(TypeError, match="set_grad_checkpointing: enable must be True or False, got 'no'"):
        model.set_grad_checkpointing("no")
    model.set_grad_checkpointing(False)
    model.set_grad_checkpointing(1)
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, *model.pretrained_cfg["input_size"][1:]))
        with pytest.raises(TypeError, match="forward_head: pre_logits must be True or False"):
            model.forward_head(features, pre_logits="no")


def test_map_pooling_head_switches_as_timms():
    """global_pool='map' exists only when built so (timm: it cannot be added in reset_classifier); another pooling
    drops it; pruning for a backbone drops it with the head."""
    model = zoo.create_model("vit_debug", global_pool="map", class_token=False)
    assert model.attn_pool is not None and {k for k in model.state_dict() if k.startswith("attn_pool.")} >= {
        "attn_pool.latent", "attn_pool.q.weight", "attn_pool.kv.weight", "attn_pool.mlp.fc2.bias"}
    x = _images(2, 3, 32, 32)
    assert model(x).shape == (2, 10) and model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 32)
    model.reset_classifier(4, "avg")
    assert model.attn_pool is None and model(x).shape == (2, 4)
    with pytest.raises(ValueError, match="global_pool='map' needs the attention-pooling head"):
        model.reset_classifier(4, "map")
    with pytest.raises(ValueError, match="pool_type='map' needs the attention-pooling head"):
        model.pool(model.forward_features(x), "map")


def test_deit_distilled_heads_as_timms():
    """The distillation token and head (timm's VisionTransformerDistilled): the same state-dict keys in the same
    order, the mean of the two heads at inference, both while distillation-training, pre_logits the mean of the
    two tokens, a reset that replaces both heads, and class-token pooling only."""
    torch.manual_seed(0)
    peer = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, depth=2)
    ours = zoo.create_model("deit_tiny_distilled_patch16_224", img_size=32, depth=2)
    assert list(ours.state_dict()) == list(peer.state_dict())
    ours.load_state_dict(peer.state_dict())
    x = _images(2, 3, 32, 32)
    peer.set_distilled_training(True)
    ours.set_distilled_training(True)
    got, want = ours(x), peer(x)  # training mode, no dropout: the pair
    assert isinstance(got, tuple) and len(got) == 2
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    ours.eval()
    peer.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer(x), atol=ATOL, rtol=0)
        feats = ours.forward_features(x)
        torch.testing.assert_close(ours.forward_head(feats, pre_logits=True), (feats[:, 0] + feats[:, 1]) / 2)
    ours.reset_classifier(3)
    assert ours.head.out_features == ours.head_dist.out_features == 3 and ours(x).shape == (2, 3)
    assert set(ours.pretrained_head_keys()) == {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
    assert ours.group_matcher() == peer.group_matcher()
    with pytest.raises(ValueError, match="global_pool must stay 'token'"):
        ours.reset_classifier(3, "avg")
    with pytest.raises(ValueError, match="global_pool must be 'token' with a class token"):
        zoo.create_model("deit_tiny_distilled_patch16_224", global_pool="avg")


@pytest.mark.parametrize("name", ["vit_debug", "agent_deit_debug"])
def test_hooks_on_the_last_block_see_every_token(name, monkeypatch):
    """forward() computes only the class token in the last block; a forward hook on that block (or inside it, or
    on the final norm) saw (B, 1, C) where timm's model shows (B, N, C). With such a hook the full block runs;
    the logits are the same, and hooks elsewhere keep the shortcut."""
    model = zoo.create_model(name, img_size=32).eval()
    x = torch.randn(2, model.pretrained_cfg["input_size"][0], 32, 32)
    with torch.no_grad():
        want = model(x)
        tokens = model.forward_features(x).shape[1]
    for target in (model.blocks[-1], model.blocks[-1].mlp, model.norm):
        seen = []
        handle = target.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
        with torch.no_grad():
            torch.testing.assert_close(model(x), want)
        handle.remove()
        assert seen == [(2, tokens, model.embed_dim)]
    handle = model.blocks[0].register_forward_hook(lambda module, args, out: None)
    monkeypatch.setattr(model, "forward_features", lambda x: pytest.fail("the shortcut was not taken"))
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)
    handle.remove()


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_dinov2_checkpoints_in_the_original_layout_load_as_timm(name, tmp_path):
    """A DINOv2 state dict as facebookresearch/dinov2 saves it (mask_token; with registers: register_tokens and a
    position row for the class token) converts as timm's checkpoint_filter_fn does and gives timm's logits; it
    was refused ("unexpected keys: mask_token", or a misleading non-square-grid error with registers)."""
    from timm.models.vision_transformer import checkpoint_filter_fn as timm_dinov2_filter

    import timm

    torch.manual_seed(0)
    peer = timm.create_model(name, depth=1, img_size=56).eval()
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(0.02 * torch.randn_like(p))
    state = peer.state_dict()
    original = dict(state, mask_token=torch.zeros(1, state["cls_token"].shape[-1]))
    if "reg_token" in state:
        original["register_tokens"] = original.pop("reg_token")
        cls_pos = 0.02 * torch.randn(1, 1, state["cls_token"].shape[-1])
        original["cls_token"] = state["cls_token"] - cls_pos
        original["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], 1)
    ours = zoo.create_model(name, depth=1, img_size=56)
    converted = V.checkpoint_filter_fn(dict(original), ours)
    want = timm_dinov2_filter(dict(original), peer)
    assert sorted(converted) == sorted(want)
    for key in want:
        torch.testing.assert_close(converted[key], want[key], rtol=0, atol=0)
    torch.save(original, tmp_path / "dinov2_pretrain.pth")
    loaded = zoo.create_model(name, pretrained=str(tmp_path / "dinov2_pretrain.pth"), depth=1, img_size=56).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), peer(x), atol=1e-4, rtol=1e-4)
    # the SwiGLU MLP names of the giant models (w12 / w3) become fc1 / fc2, as in timm
    keys = sorted(V._from_dinov2({"mask_token": torch.zeros(1), "blocks.3.mlp.w12.weight": torch.zeros(1),
                                  "blocks.3.mlp.w3.bias": torch.zeros(1)}))
    assert keys == ["blocks.3.mlp.fc1.weight", "blocks.3.mlp.fc2.bias"]


@pytest.mark.parametrize("name", ["vit_debug", "maxvit_debug", "agent_deit_debug"])
def test_fx_symbolic_tracing_is_refused_with_what_to_use(name):
    """timm.models.create_feature_extractor (torch.fx) failed with "input must be a torch.Tensor, got Proxy"."""
    import timm

    model = zoo.create_model(name)
    with pytest.raises(TypeError, match=r"torch\.fx symbolic tracing is not supported .* features_only=True"):
        timm.models.create_feature_extractor(model, [f"{'stages' if name.startswith('maxvit') else 'blocks'}.0"])
