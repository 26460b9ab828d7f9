"""timm's dense-prediction and optimizer API on the zoo's token transformers: forward_intermediates,
prune_intermediate_layers, feature_info and group_matcher. ViT is compared with timm's VisionTransformer
(same weights); Agent-DeiT, which timm lacks, with its own forward and block outputs."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

import zoo
from zoo.layers import feature_take_indices

VIT_CASES = [
    dict(),
    dict(indices=3),
    dict(indices=[0, -1], norm=True),
    dict(indices=2, return_prefix_tokens=True, output_fmt="NLC"),
    dict(indices=[1], stop_early=True),
    dict(indices=[0, 2], intermediates_only=True),
]


def _layer_decay_scales(model) -> dict:
    """Parameter name -> the lr scale timm.optim's layer-wise decay gives it."""
    from timm.optim import create_optimizer_v2

    names = {id(q): n for n, q in model.named_parameters()}
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, layer_decay=0.7)
    return {names[id(p)]: group["lr_scale"] for group in opt.param_groups for p in group["params"]}


def _flat(items):
    return [t for item in items for t in (item if isinstance(item, tuple) else (item,))]


@pytest.fixture(scope="module")
def vit_pair():
    torch.manual_seed(0)
    peer = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48, depth=4).eval()
    ours = zoo.create_model("vit_tiny_patch16_224", img_size=48, depth=4).eval()
    ours.load_state_dict(peer.state_dict())
    return ours, peer


@pytest.mark.parametrize("kwargs", VIT_CASES)
def test_vit_forward_intermediates_match_timm(vit_pair, kwargs):
    ours, peer = vit_pair
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        mine, theirs = ours.forward_intermediates(x, **kwargs), peer.forward_intermediates(x, **kwargs)
    if not kwargs.get("intermediates_only"):
        torch.testing.assert_close(mine[0], theirs[0], rtol=1e-5, atol=1e-5)
        mine, theirs = mine[1], theirs[1]
    assert len(mine) == len(theirs)
    for a, b in zip(_flat(mine), _flat(theirs)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(), dict(n=2, reshape=True), dict(n=[0, 2], norm=True),
                                    dict(n=1, reshape=True, return_prefix_tokens=True)])
def test_vit_get_intermediate_layers_matches_timm(vit_pair, kwargs):
    """DINOv2's accessor, which timm keeps for depth probes and segmentation heads (it was missing)."""
    ours, peer = vit_pair
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        mine, theirs = ours.get_intermediate_layers(x, **kwargs), peer.get_intermediate_layers(x, **kwargs)
    assert len(mine) == len(theirs)
    for a, b in zip(_flat(mine), _flat(theirs)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_vit_feature_info_group_matcher_and_layer_decay_match_timm(vit_pair):
    ours, peer = vit_pair
    assert ours.feature_info == peer.feature_info
    assert ours.group_matcher() == peer.group_matcher()
    assert _layer_decay_scales(ours) == _layer_decay_scales(peer)  # timm's layer-wise decay reads group_matcher


def test_vit_feature_info_reduction_of_a_non_square_patch_is_the_map_stride():
    """With an (8, 4) patch the maps are H/8 x W/4: feature_info's reduction names both strides (timm's scalar
    max(patch) would give a neck one stride for both axes), and the maps times it give the image size back."""
    model = zoo.create_model("vit_debug", patch_size=(8, 4), img_size=(32, 48)).eval()
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(1, 3, 32, 48), indices=1, intermediates_only=True)
    assert maps[0].shape[-2:] == (4, 12)
    assert [info["reduction"] for info in model.feature_info] == [(8, 4)] * len(model.blocks)
    rh, rw = model.feature_info[-1]["reduction"]
    assert (maps[0].shape[-2] * rh, maps[0].shape[-1] * rw) == (32, 48)


def test_vit_prune_intermediate_layers_matches_timm_and_saves(tmp_path):
    torch.manual_seed(1)
    peer = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=4, global_pool="avg").eval()
    ours = zoo.create_model("vit_tiny_patch16_224", img_size=32, depth=4, global_pool="avg").eval()
    ours.load_state_dict(peer.state_dict())
    kept = ours.prune_intermediate_layers([1, 2], prune_norm=True)
    assert kept == peer.prune_intermediate_layers([1, 2], prune_norm=True)
    assert len(ours.blocks) == 3 and len(ours.feature_info) == 3 and ours.num_classes == 0
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(ours.forward_intermediates(x, indices=[1, 2], intermediates_only=True),
                        peer.forward_intermediates(x, indices=[1, 2], intermediates_only=True)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), peer(x), rtol=1e-5, atol=1e-5)
        expected = ours(x)
    zoo.save_pretrained(ours, tmp_path)  # the pruned shape is recorded: it loads back
    with torch.no_grad():
        torch.testing.assert_close(zoo.from_pretrained(tmp_path).eval()(x), expected)


def test_agent_deit_intermediates_are_the_block_outputs_at_any_size(tmp_path):
    torch.manual_seed(2)
    model = zoo.create_model("agent_deit_debug").eval()
    x = torch.randn(2, 3, 42, 30)  # not the native size, not square, not whole patches
    seen = []
    hooks = [block.register_forward_hook(lambda module, args, out: seen.append(out)) for block in model.blocks]
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        features = model.forward_features(x)
    for hook in hooks:
        hook.remove()
    depth = len(model.blocks)
    assert len(maps) == depth and seen[:depth]  # hooks saw forward_intermediates' blocks first
    ph, pw = model.patch_embed.patch_size
    gh, gw = -(-42 // ph), -(-30 // pw)  # partial patches are padded to whole ones
    for block_out, feature_map in zip(seen[:depth], maps):
        assert feature_map.shape == (2, model.embed_dim, gh, gw)
        torch.testing.assert_close(feature_map, block_out[:, 1:].reshape(2, gh, gw, -1).permute(0, 3, 1, 2))
    torch.testing.assert_close(final, features)
    with torch.no_grad():
        last_normed, cls = model.forward_intermediates(x, indices=1, norm=True, return_prefix_tokens=True,
                                                       output_fmt="NLC", intermediates_only=True)[0]
    torch.testing.assert_close(last_normed, features[:, 1:])
    torch.testing.assert_close(cls, features[:, :1])
    assert model.feature_info[-1] == dict(module=f"blocks.{depth - 1}", num_chs=model.embed_dim, reduction=ph)
    assert model.group_matcher()["blocks"][0] == (r"^blocks\.(\d+)", None)

    kept = model.prune_intermediate_layers(indices=[0], prune_norm=True)
    assert kept == [0] and len(model.blocks) == 1 and model.num_classes == 0
    with torch.no_grad():  # pruned as timm prunes (reset_classifier(0, "")): forward returns every token
        expected = model(x)
        tokens, prefix = model.forward_intermediates(x, indices=1, output_fmt="NLC", return_prefix_tokens=True,
                                                     intermediates_only=True)[0]
        torch.testing.assert_close(expected, torch.cat([prefix, tokens], dim=1))
    zoo.save_pretrained(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(zoo.from_pretrained(tmp_path).eval()(x), expected)


@pytest.mark.parametrize("name", ["maxvit_rmlp_pico_rw_256", "maxvit_tiny_tf_224"])
@pytest.mark.parametrize("indices,prune_norm,prune_head",
                         [((1, 2), False, True), ((4,), True, False), (2, False, True)])
def test_maxvit_prune_intermediate_layers_matches_timm_and_saves(name, indices, prune_norm, prune_head, tmp_path):
    """Cutting stages also drops the final norm and the head's norm / pre-logits (timm): the same kept
    indices, state-dict keys, maps and forward (no pooling) as timm's pruned model; the pruned shape saves and
    loads."""
    torch.manual_seed(4)
    peer = timm.create_model(name, pretrained=False, img_size=64).eval()
    ours = zoo.create_model(name, img_size=64).eval()
    ours.load_state_dict(peer.state_dict())
    kept = ours.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
    assert kept == list(peer.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head))
    assert set(ours.state_dict()) == set(peer.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(ours.forward_intermediates(x, indices=kept, intermediates_only=True),
                        peer.forward_intermediates(x, indices=kept, intermediates_only=True)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        expected = ours(x)
        # the pruned model's forward: timm's unpooled map (its head is reset with global_pool='')
        torch.testing.assert_close(expected, peer(x), rtol=1e-4, atol=1e-4)
    assert ours.global_pool == ("" if prune_head or max(kept) < 4 else "avg")  # pruned head or stages cut
    zoo.save_pretrained(ours, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(zoo.from_pretrained(tmp_path).eval()(x), expected)
    with pytest.raises(ValueError, match="at least one stage"):
        zoo.create_model(name, img_size=64).prune_intermediate_layers([0])


def test_maxvit_group_matcher_and_layer_decay_match_timm():
    torch.manual_seed(3)
    peer = timm.create_model("maxvit_rmlp_pico_rw_256", pretrained=False, img_size=64)
    ours = zoo.create_model("maxvit_rmlp_pico_rw_256", img_size=64)
    ours.load_state_dict(peer.state_dict())
    assert ours.group_matcher() == peer.group_matcher()
    assert _layer_decay_scales(ours) == _layer_decay_scales(peer)


def test_feature_take_indices_follows_timm_and_names_bad_indices():
    from timm.models._features import feature_take_indices as timm_take

    for indices in (None, 1, 4, [0, 2], [-1], (-4, 3)):
        assert feature_take_indices(4, indices) == timm_take(4, indices)
    for bad, message in ((0, "last-n"), (5, "last-n"), ([4], "out of range"), ([-5], "out of range"), ([], "empty")):
        with pytest.raises(ValueError, match=message):
            feature_take_indices(4, bad)
    # numpy ints and integer tensors are ints; strings, floats and bools are not (int("13") / int(1.9) / True
    # used to pass as other indices)
    assert feature_take_indices(4, np.int64(2)) == ([2, 3], 3)
    assert feature_take_indices(4, torch.tensor([0, 3])) == ([0, 3], 3)
    for bad in ("13", [1.9, 3.2], True, [True], 1.0, {1, 2}, torch.tensor([0.0, 1.0])):
        with pytest.raises(TypeError, match="sequence of ints"):
            feature_take_indices(4, bad)


def test_indices_out_of_network_order_are_refused():
    """The maps come out in network order. timm accepts (2, 0) or (1, 1) anyway: it returns the maps in block
    order (duplicates once) while its feature_info follows the order given, so a neck wired from feature_info
    reads the wrong maps. Shown on timm, refused here with the order to use."""
    peer = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=3, features_only=True,
                             out_indices=(2, 0)).eval()
    assert peer.feature_info.out_indices == (2, 0)  # ... but its forward returns block 0's map first
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        maps = peer(x)
        first = peer.model.forward_intermediates(x, indices=[0], intermediates_only=True)[0]  # block 0's map
    torch.testing.assert_close(maps[0], first)
    for bad, resolved in (([2, 0], r"\[0, 2\]"), ([1, 1], r"\[1\]"), ((-1, 0), r"\[0, 3\]")):
        with pytest.raises(ValueError, match="network order.*use " + resolved):
            feature_take_indices(4, bad)
    with pytest.raises(ValueError, match="out_indices must name each feature once"):
        zoo.create_model("maxvit_debug", features_only=True, out_indices=[2, 0])
    model = zoo.create_model("maxvit_debug")
    with pytest.raises(ValueError, match="indices must name each feature once"):
        model.forward_intermediates(torch.randn(1, 3, 64, 64), indices=[1, 1])
    backbone = zoo.create_model("maxvit_debug", features_only=True, out_indices=[0, 2])
    with torch.no_grad():
        assert [m.shape[1] for m in backbone(torch.randn(1, 3, 64, 64))] == backbone.feature_info.channels()
    with pytest.raises(IndexError, match="tap 9 is out of range"):
        backbone.feature_info.channels(9)


@pytest.mark.parametrize("name", ["vit_debug", "agent_deit_debug", "maxvit_debug"])
def test_backbone_flags_refuse_strings(name):
    """forward_intermediates and prune_intermediate_layers took any truthy object for True: prune_head="no" (a
    config value) dropped the trained head, stop_early="no" stopped early. Like forward_head(pre_logits=) they
    take True / False (or 0 / 1) and name the flag otherwise; the model is left as it was."""
    model = zoo.create_model(name).eval()
    image = torch.randn(1, model.in_chans, *model.pretrained_cfg["input_size"][1:])
    flags = ["norm", "stop_early", "intermediates_only"] + (["return_prefix_tokens"] if "maxvit" not in name else [])
    for flag in flags:
        with pytest.raises(TypeError, match=rf"^forward_intermediates: {flag} must be True or False, got 'no'$"):
            model.forward_intermediates(image, indices=1, **{flag: "no"})
    assert len(model.forward_intermediates(image, indices=1, stop_early=1, intermediates_only=np.bool_(True))) == 1
    classes = model.num_classes
    for flag in ("prune_norm", "prune_head"):
        with pytest.raises(TypeError, match=rf"^prune_intermediate_layers: {flag} must be True or False, got 'no'$"):
            model.prune_intermediate_layers(indices=1, **{flag: "no"})
        assert model.num_classes == classes and model(image).shape == (1, classes)
