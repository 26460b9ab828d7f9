"""timm's tools on the zoo's vision models, each against timm itself: timm's Hub exporter (save_for_hf), timm's
train.py --channels-last conversion, timm's ViT checkpoint filter across patch sizes (FlexiViT), and empty
batches (the shapes timm's models return for them, and the zero gradients and AdamW step of timm's)."""
from __future__ import annotations

import json

import pytest
import torch

import zoo

# (name, constructor overrides, image size): tiny members of the three vision families
FAMILIES = [
    ("vit_tiny_patch16_224", dict(img_size=32, depth=2, num_classes=5), 32),
    ("maxvit_rmlp_pico_rw_256", dict(img_size=64, num_classes=5), 64),
    ("agent_deit_tiny", dict(img_size=48, depth=2, num_classes=5), 48),
]


@pytest.mark.parametrize("name,kwargs,size", FAMILIES)
def test_timm_save_for_hf_writes_zoo_models_that_load_back(tmp_path, name, kwargs, size):
    """timm.models.save_for_hf (and push_to_hub, which calls it) reads pretrained_cfg["architecture"] and the
    constructor arguments timm records (model._model_args): on a zoo model it failed with KeyError 'architecture'.
    The directory it writes now names the model and its arguments, and zoo.from_pretrained rebuilds the same
    model (a ViT at 32 px would otherwise be rebuilt at 224 px), with the same data config for timm."""
    import timm.data
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = zoo.create_model(name, **kwargs).eval()
    assert model.pretrained_cfg["architecture"] == name
    save_for_hf(model, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == name and config["num_classes"] == kwargs["num_classes"]
    assert config["model_args"]["img_size"] == size
    loaded = zoo.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    assert timm.data.resolve_model_data_config(loaded) == timm.data.resolve_model_data_config(model)


def test_timm_save_for_hf_follows_changes_after_construction(tmp_path):
    """A head reset and an input resize after construction reach timm's export as they reach zoo.save_pretrained
    (zoo.registry.note_model_args); a tagged name carries timm's tag in pretrained_cfg, as timm's models do, and
    zoo.save_pretrained's config.json is unchanged by the new keys."""
    from timm.models import get_pretrained_cfg, save_for_hf

    torch.manual_seed(0)
    model = zoo.create_model("vit_tiny_patch16_224", img_size=32, depth=1).eval()
    model.reset_classifier(3)
    model.set_input_size(48)
    save_for_hf(model, str(tmp_path / "timm"))
    loaded = zoo.from_pretrained(tmp_path / "timm").eval()
    assert loaded.patch_embed.img_size == (48, 48) and loaded.num_classes == 3
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)

    tagged = zoo.create_model("vit_tiny_patch16_224.augreg_in21k", img_size=32, depth=1)
    peer_cfg = get_pretrained_cfg("vit_tiny_patch16_224.augreg_in21k")
    assert (tagged.pretrained_cfg["architecture"], tagged.pretrained_cfg["tag"]) == (peer_cfg.architecture, peer_cfg.tag)
    zoo.save_pretrained(tagged, tmp_path / "zoo")
    saved = json.loads((tmp_path / "zoo" / "config.json").read_text())
    assert set(saved["metadata"]["pretrained_cfg"]) == {"crop_pct", "crop_mode", "interpolation"}
    # the reloaded model is the untagged architecture with the saved arguments (a zoo directory records no tag)
    untagged = {key: value for key, value in tagged.pretrained_cfg.items() if key != "tag"}
    assert zoo.from_pretrained(tmp_path / "zoo").pretrained_cfg == untagged


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax"])
def test_vit_pooling_reset_after_construction_saves_and_loads_back(tmp_path, pool):
    """reset_classifier(K, pool) keeps the final norm where it was built (after the blocks, timm's reset does the
    same); the saved directory must say so, or the constructor derives fc_norm from the new pooling and rebuilds
    the norm after the pooling (other keys, other logits). The reloaded model equals the reset one and timm's
    model reset the same way."""
    import timm

    torch.manual_seed(0)
    peer = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1).eval()
    model = zoo.create_model("vit_tiny_patch16_224", img_size=32, depth=1).eval()
    model.load_state_dict(peer.state_dict())
    model.reset_classifier(3, pool)
    peer.reset_classifier(3, pool)
    model.head.load_state_dict(peer.head.state_dict())
    zoo.save_pretrained(model, tmp_path)
    loaded = zoo.from_pretrained(tmp_path).eval()
    assert set(loaded.state_dict()) == set(model.state_dict()) == set(peer.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
        torch.testing.assert_close(model(x), peer(x), atol=1e-5, rtol=0)


def test_agent_deit_resized_position_table_follows_new_weights():
    """In eval mode the position table resized to another grid is cached; loading other weights (or editing
    pos_embed under no_grad) must not serve the old table: the logits equal those of a fresh model holding the
    new weights."""
    torch.manual_seed(0)
    model = zoo.create_model("agent_deit_debug").eval()
    other = zoo.create_model("agent_deit_debug").eval()
    x = torch.randn(2, 3, 48, 40)  # not the native 32 x 32: the resized table is cached
    with torch.no_grad():
        model(x)
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model(x), other(x), atol=0, rtol=0)
        model.pos_embed.mul_(0.5)
        other.pos_embed.mul_(0.5)
        fresh = zoo.create_model("agent_deit_debug").eval()
        fresh.load_state_dict(other.state_dict())
        torch.testing.assert_close(model(x), fresh(x), atol=0, rtol=0)


def test_agent_deit_set_input_size_to_a_wide_grid_equals_loading_at_that_size(tmp_path):
    """timm's set_input_size on Agent-DeiT with a wider-than-tall size (40 x 48: a 10 x 12 grid): the row/column
    bias tables take the longer side, as a model built at that size and loaded from the checkpoint has them."""
    torch.manual_seed(0)
    model = zoo.create_model("agent_deit_debug").eval()
    zoo.save_pretrained(model, tmp_path)
    model.set_input_size((40, 48))
    reference = zoo.create_model("agent_deit_debug", pretrained=str(tmp_path), img_size=(40, 48)).eval()
    assert model.blocks[0].attn.window == reference.blocks[0].attn.window == 12
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    x = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_agent_deit_takes_channels_last_as_timm_models_do():
    """model.to(memory_format=torch.channels_last) -- timm's train.py --channels-last -- raised torch's "required
    rank 4 tensor to use channels_last format" on Agent-DeiT's 5-D row/column bias tables. Now the 4-D tensors take
    the format, the 5-D tables stay contiguous 5-D parameters, dtype conversions still reach them, and the logits
    equal the contiguous model's."""
    torch.manual_seed(0)
    model = zoo.create_model("agent_deit_tiny", img_size=48, depth=2, num_classes=5).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        want = model(x)
    model.to(memory_format=torch.channels_last)
    attn = model.blocks[0].attn
    assert attn.an_bias.is_contiguous(memory_format=torch.channels_last) and not attn.an_bias.is_contiguous()
    assert model.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    for name in ("ah_bias", "aw_bias", "ha_bias", "wa_bias"):
        table = getattr(attn, name)
        assert isinstance(table, torch.nn.Parameter) and table.dim() == 5 and table.is_contiguous(), name
    with torch.no_grad():
        torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), want, atol=1e-6, rtol=1e-6)
    model.to(dtype=torch.float64, memory_format=torch.channels_last)
    assert attn.ah_bias.dtype == torch.float64 and attn.ah_bias.dim() == 5
    with pytest.raises(RuntimeError, match="rank 5"):  # a 5-D format is refused by the 4-D tensors, as on any model
        model.to(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("kwargs,patch_size", [
    (dict(img_size=32, num_classes=4), 8),  # 16-px weights into a patch-8 model: 2x2 -> 4x4 position grid
    (dict(img_size=64, num_classes=4, class_token=False, global_pool="avg"), 32),  # coarser: 4x4 -> 2x2, no prefix
])
def test_vit_checkpoint_of_another_patch_size_resamples_as_timm(tmp_path, kwargs, patch_size):
    """timm's vision_transformer.checkpoint_filter_fn resamples a patch kernel of another size (FlexiViT,
    timm.layers.resample_patch_embed) and the position embedding to the new grid; the zoo refused such a
    checkpoint. Same state dict into timm's filter + model and into zoo.create_model(patch_size=...,
    pretrained=file): the same kernel, position embedding and logits."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", depth=1, **kwargs)
    path = tmp_path / "vit16.pth"
    torch.save(source.state_dict(), path)
    peer = timm.create_model("vit_tiny_patch16_224", depth=1, patch_size=patch_size, **kwargs).eval()
    peer.load_state_dict(checkpoint_filter_fn(torch.load(path, weights_only=True), peer))
    ours = zoo.create_model("vit_tiny_patch16_224", depth=1, patch_size=patch_size, pretrained=path, **kwargs).eval()
    assert ours.patch_embed.proj.weight.shape[-2:] == (patch_size, patch_size)
    for key in ("patch_embed.proj.weight", "pos_embed"):
        torch.testing.assert_close(ours.state_dict()[key], peer.state_dict()[key], atol=1e-6, rtol=1e-6)
    x = torch.randn(2, 3, *ours.patch_embed.img_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer(x), atol=1e-5, rtol=1e-5)


def test_vit_patch_size_override_of_a_zoo_directory(tmp_path):
    """zoo.from_pretrained(dir, patch_size=8) on a patch-16 save: the filter resamples the kernel and reads the
    position grid from the saved model's geometry (2 x 3 here, not a square), as timm's filter would for the same
    weights and grid."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    torch.manual_seed(0)
    saved = zoo.create_model("vit_tiny_patch16_224", img_size=(32, 48), depth=1, num_classes=3)
    zoo.save_pretrained(saved, tmp_path / "p16")
    ours = zoo.from_pretrained(tmp_path / "p16", patch_size=8).eval()
    peer = timm.create_model("vit_tiny_patch16_224", img_size=(32, 48), depth=1, num_classes=3, patch_size=8).eval()
    state = dict(saved.state_dict())
    # timm's filter takes the old grid to be square (or from its own pretrained_cfg); give it the saved 2 x 3 one
    from timm.layers import resample_abs_pos_embed

    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], (4, 6), (2, 3), num_prefix_tokens=1)
    peer.load_state_dict(checkpoint_filter_fn(state, peer))
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer(x), atol=1e-5, rtol=1e-5)


def _shapes(out):
    """The shapes of a tensor, or of the tensors in a (nested) tuple / list."""
    return tuple(out.shape) if isinstance(out, torch.Tensor) else [_shapes(o) for o in out]


def _as_batch(shapes, batch: int):
    """``shapes`` (from _shapes) with every leading size set to ``batch``."""
    return (batch, *shapes[1:]) if isinstance(shapes, tuple) else [_as_batch(s, batch) for s in shapes]


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(global_pool="map"),
    dict(class_token=False, reg_tokens=2, global_pool="avg"),
])
def test_vit_empty_batch_gives_timms_shapes(kwargs):
    """timm's ViT passes an empty batch through (forward, forward_features, forward_head, NLC
    forward_intermediates), in eval and train mode; the zoo's raised "ViT input batch is empty". Same shapes as
    timm's for the same calls; NCHW intermediates (where timm's reshape fails) have the shapes of a batch of one
    with 0 rows, and gradients flow."""
    import timm

    args = dict(img_size=32, depth=2, num_classes=5, **kwargs)
    torch.manual_seed(0)
    peer = timm.create_model("vit_tiny_patch16_224", **args)
    ours = zoo.create_model("vit_tiny_patch16_224", **args)
    empty, one = torch.randn(0, 3, 32, 32), torch.randn(1, 3, 32, 32)
    for mode in ("eval", "train"):
        for model in (peer, ours):
            model.train(mode == "train")
        with torch.no_grad():
            for call in (lambda m, x: m(x), lambda m, x: m.forward_features(x),
                         lambda m, x: m.forward_head(m.forward_features(x), pre_logits=True),
                         lambda m, x: m.forward_intermediates(x, output_fmt="NLC")):
                got = call(ours, empty)
                assert _shapes(got) == _shapes(call(peer, empty)), mode
                assert _as_batch(_shapes(got), 0) == _as_batch(_shapes(call(ours, one)), 0)
            nchw = ours.forward_intermediates(empty, indices=1)
            assert _shapes(nchw) == _as_batch(_shapes(ours.forward_intermediates(one, indices=1)), 0)
    ours.eval()
    x = empty.clone().requires_grad_(True)
    ours(x).sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("name,kwargs,size", FAMILIES[1:] + [
    ("maxvit_tiny_tf_224", dict(img_size=64, depths=[1, 1, 1, 1], num_classes=5, global_pool=""), 64),
])
def test_maxvit_and_agent_deit_empty_batch(name, kwargs, size):
    """MaxViT and Agent-DeiT raised "input batch is empty". They now return empty results of the shapes a batch
    of one has (forward, forward_features, forward_head, forward_intermediates), in eval and train mode. timm's
    MaxViT forward_head on an empty map gives the same shape; timm's MaxViT forward fails on an empty batch (a
    reshape with -1), and Agent-DeiT has no timm model, so the rest is compared with the zoo's own batch of one."""
    import timm

    torch.manual_seed(0)
    ours = zoo.create_model(name, **kwargs)
    empty, one = torch.randn(0, 3, size, size), torch.randn(1, 3, size, size)
    other_fmt = "NHWC" if name.startswith("maxvit") else "NLC"
    for mode in ("eval", "train"):
        ours.train(mode == "train")
        with torch.no_grad():
            for call in (lambda x: ours(x), lambda x: ours.forward_features(x),
                         lambda x: ours.forward_head(ours.forward_features(x), pre_logits=True),
                         lambda x: ours.forward_intermediates(x), lambda x: ours.forward_intermediates(x, output_fmt=other_fmt)):
                got = _shapes(call(empty))
                assert got == _as_batch(_shapes(call(one)), 0), (mode, got)
    if name.startswith("maxvit"):
        peer = timm.create_model(name, **{k: v for k, v in kwargs.items() if k != "depths"}).eval()
        features = torch.zeros(0, ours.num_features, size // 32, size // 32)
        with torch.no_grad():
            assert _shapes(ours.forward_head(features)) == _shapes(peer.forward_head(features))


def _empty_batch_step(model, images, lr: float = 0.1, weight_decay: float = 0.5, loss_scale: float = 1.0):
    """One AdamW step (a fresh optimizer, as timm's train.py builds it) on ``images`` with a summed cross entropy
    (times ``loss_scale``); returns {name: gradient or None} of the step."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    optimizer.zero_grad(set_to_none=True)
    labels = torch.zeros(images.shape[0], dtype=torch.long)
    loss = torch.nn.functional.cross_entropy(model(images), labels, reduction="sum")
    (loss * loss_scale).backward()
    grads = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()
    return grads


def _assert_zero_grads_like(got: dict, want: dict) -> None:
    """The same parameters have a gradient in ``got`` and ``want``, and every one of them is zero."""
    missing = sorted(n for n in want if want[n] is not None and got[n] is None)
    extra = sorted(n for n in want if want[n] is None and got[n] is not None)
    assert not missing and not extra, f"gradient missing for {missing[:4]}, unexpected for {extra[:4]}"
    nonzero = [n for n, g in got.items() if g is not None and (g.shape != want[n].shape or g.any())]
    assert not nonzero, f"not a zero gradient of the parameter's shape: {nonzero[:4]}"


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(global_pool="map"),
    dict(class_token=False, reg_tokens=2, global_pool="avg"),
])
def test_vit_empty_batch_gives_timms_zero_gradients_and_adamw_step(kwargs):
    """timm's ViT runs its blocks (and the attention-pool head) on an empty batch, so backward gives every
    parameter a zero gradient: DDP's reducer sees them all, and AdamW decays them all. The zoo's ViT returned early
    (the blocks, the last block of forward's class-token path and the "map" head skipped): their gradient was None,
    DDP failed with "Expected to have finished reduction in the prior iteration", and AdamW skipped them (its
    weights drifted from timm's). Same state dict: the same parameters get zero gradients as in timm, and one AdamW
    step gives timm's weights exactly."""
    import timm

    args = dict(img_size=32, depth=2, num_classes=5, **kwargs)
    torch.manual_seed(0)
    peer = timm.create_model("vit_tiny_patch16_224", **args)
    ours = zoo.create_model("vit_tiny_patch16_224", **args)
    ours.load_state_dict(peer.state_dict())
    empty = torch.randn(0, 3, 32, 32)
    want = _empty_batch_step(peer, empty)
    assert all(g is not None for g in want.values())  # (timm: every parameter)
    _assert_zero_grads_like(_empty_batch_step(ours, empty), want)
    ours_state = ours.state_dict()
    for name, value in peer.state_dict().items():
        torch.testing.assert_close(ours_state[name], value, atol=0, rtol=0, msg=name)


def test_maxvit_empty_batch_gives_zero_gradients_where_timm_gives_gradients():
    """MaxViT's partition attention returned its input on an empty batch, so its parameters (qkv, proj, the
    relative-position MLP) got no gradient. They now get zero gradients: the parameters timm's MaxViT gives a
    gradient, and one AdamW step gives the weights of timm's zero-gradient step for the same state dict. (timm's
    MaxViT itself fails on an empty batch, a reshape with -1, and its graph does not depend on the batch size: its
    zero-gradient step is taken on 0 x its loss on a batch of one.)"""
    import timm

    torch.manual_seed(0)
    args = dict(img_size=64, num_classes=5)
    peer = timm.create_model("maxvit_rmlp_pico_rw_256", **args)
    ours = zoo.create_model("maxvit_rmlp_pico_rw_256", **args)
    ours.load_state_dict(peer.state_dict())
    want = _empty_batch_step(peer, torch.randn(1, 3, 64, 64), loss_scale=0.0)
    assert all(g is not None for g in want.values())
    _assert_zero_grads_like(_empty_batch_step(ours, torch.randn(0, 3, 64, 64)), want)
    ours_params = dict(ours.named_parameters())
    for name, value in peer.named_parameters():
        torch.testing.assert_close(ours_params[name], value, atol=0, rtol=0, msg=name)


def test_agent_deit_empty_batch_gives_every_parameter_a_zero_gradient():
    """Agent-DeiT returned early from its blocks on an empty batch (44 of 52 parameters without a gradient). Now
    every parameter gets a zero gradient through forward_head(forward_features(x)), and forward(), whose last
    block computes the class token alone (its depthwise conv, which acts on patch tokens only, gets no gradient
    at any batch size), leaves the parameters a batch of one leaves."""
    torch.manual_seed(0)
    model = zoo.create_model("agent_deit_tiny", img_size=48, depth=2, num_classes=5)
    empty = torch.randn(0, 3, 48, 48)
    shortcut = _empty_batch_step(model, empty, lr=0.0, weight_decay=0.0)  # forward(): the class-token shortcut
    model.class_token_last_block = False
    every = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    _assert_zero_grads_like(_empty_batch_step(model, empty, lr=0.0, weight_decay=0.0), every)
    model.class_token_last_block = True
    one = _empty_batch_step(model, torch.randn(1, 3, 48, 48), lr=0.0, weight_decay=0.0)
    _assert_zero_grads_like(shortcut, one)
