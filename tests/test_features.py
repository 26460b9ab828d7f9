"""``create_model(name, features_only=True, out_indices=...)``: timm's backbone wrapper for detection and
segmentation necks, checked against timm's own features_only models (same weights, same maps, same
feature_info) and against the zoo models' forward_intermediates."""
from __future__ import annotations

import pytest
import timm
import torch

import zoo
import zoo.features  # noqa: F401  (zoo.features.FeatureExtractor)


@pytest.mark.parametrize("out_indices", [None, (1,), (0, -2)])
def test_vit_features_only_matches_timm(out_indices):
    kwargs = {} if out_indices is None else {"out_indices": out_indices}
    torch.manual_seed(0)
    peer = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48, features_only=True, **kwargs).eval()
    ours = zoo.create_model("vit_tiny_patch16_224", img_size=48, features_only=True, **kwargs).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)  # pruned alike: the same keys
    assert ours.feature_info.out_indices == tuple(peer.feature_info.out_indices)
    for accessor in ("channels", "reduction", "module_name"):
        assert getattr(ours.feature_info, accessor)() == getattr(peer.feature_info, accessor)()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        mine, theirs = ours(x), peer(x)
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_maxvit_features_only_matches_timm():
    torch.manual_seed(1)
    peer = timm.create_model("maxvit_rmlp_pico_rw_256", pretrained=False, img_size=64, features_only=True,
                             out_indices=(1, 2, 4)).eval()
    ours = zoo.create_model("maxvit_rmlp_pico_rw_256", img_size=64, features_only=True, out_indices=(1, 2, 4)).eval()
    # timm's FeatureListNet flattens the stages (stages_0, ...) and has no model. wrapper: its state dict loads
    # as it is (a load-time key map), and so does the zoo's own form
    ours.load_state_dict(peer.state_dict(), strict=True)  # pruned alike: final norm and head gone
    ours.load_state_dict(ours.state_dict(), strict=True)
    assert all(k.startswith("model.stem.") or k.startswith("model.stages.") for k in ours.state_dict())
    assert ours.feature_info.channels() == peer.feature_info.channels()
    assert ours.feature_info.reduction() == peer.feature_info.reduction() == [4, 8, 32]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(ours(x), peer(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_agent_deit_and_pretrained_backbones(tmp_path):
    torch.manual_seed(2)
    full = zoo.create_model("agent_deit_debug").eval()
    zoo.save_pretrained(full, tmp_path)
    x = torch.randn(1, 3, 36, 44)  # any size
    depth = len(full.blocks)
    with torch.no_grad():
        expected = full.forward_intermediates(x, indices=min(3, depth), intermediates_only=True)
        backbone = zoo.create_model("agent_deit_debug", pretrained=str(tmp_path), features_only=True).eval()
        maps = backbone(x)
    assert depth < 3 and backbone.feature_info.out_indices == tuple(range(depth))  # the last 3, or all there are
    assert len(backbone.model.blocks) == len(full.blocks) and isinstance(backbone.model.head, torch.nn.Identity)
    for a, b in zip(maps, expected):
        torch.testing.assert_close(a, b)
    digits = zoo.create_model("vit_digits", pretrained=True, features_only=True, out_indices=(0, -1))
    assert [tuple(m.shape) for m in digits(torch.randn(2, 1, 8, 8))] == [(2, 64, 4, 4)] * 2
    assert "FeatureInfo(out_indices=(0, 3)" in repr(digits.feature_info)


def test_features_only_backbone_saves_through_its_model(tmp_path):
    backbone = zoo.create_model("vit_debug", features_only=True, out_indices=(0,)).eval()
    with pytest.raises(ValueError, match="backbone.model"):
        zoo.save_pretrained(backbone, tmp_path)
    zoo.save_pretrained(backbone.model, tmp_path)  # the pruned network, as the message says
    again = zoo.features.FeatureExtractor(zoo.from_pretrained(tmp_path), (0,)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x)[0], backbone(x)[0])


def test_maxvit_stem_only_backbone_keeps_its_layers():
    backbone = zoo.create_model("maxvit_debug", features_only=True, out_indices=(0,)).eval()
    assert len(backbone.model.stages) > 0 and backbone.model.num_classes == 0
    with torch.no_grad():
        (stem_map,) = backbone(torch.randn(1, 3, 64, 64))
    assert stem_map.shape[1] == backbone.feature_info.channels()[0]


@pytest.mark.parametrize("name,kwargs", [("vit_base_patch16_siglip_gap_224", dict(depth=3)),
                                         ("maxvit_rmlp_pico_rw_256", {})])
def test_backbone_carries_the_models_data_config(name, kwargs):
    """timm.data.resolve_model_data_config(backbone) gives the model's preprocessing ([-1, 1] inputs here, 256 px
    for the MaxViT), as for timm's features_only backbone; it used to fall back to ImageNet's, silently."""
    from timm.data import resolve_model_data_config

    with torch.device("meta"):
        peer = timm.create_model(name, pretrained=False, features_only=True, **kwargs)
        ours = zoo.create_model(name, features_only=True, **kwargs)
    assert resolve_model_data_config(ours) == resolve_model_data_config(peer)
    assert ours.pretrained_cfg is ours.model.pretrained_cfg


def test_features_only_errors():
    with pytest.raises(ValueError, match="features_only=True"):
        zoo.create_model("vit_debug", out_indices=2)
    with pytest.raises(TypeError, match="features_only backbone"):
        zoo.create_model("gatv2_node_debug", features_only=True)
    with pytest.raises(ValueError, match="out of range"):
        zoo.create_model("vit_debug", features_only=True, out_indices=(7,))


@pytest.mark.parametrize("name, module, size", [("vit_debug", "vit", 32), ("agent_deit_debug", "agent_deit", 36),
                                                ("maxvit_debug", "maxvit", 64)])
def test_backbone_grad_checkpointing(name, module, size, monkeypatch):
    """set_grad_checkpointing on the backbone (timm's FeatureListNet has it; detection code calls it) turns on the
    wrapped model's per-block checkpointing: the blocks run under torch.utils.checkpoint, and the feature maps and
    every parameter's gradient are those without it."""
    import importlib

    from torch.utils.checkpoint import checkpoint

    family = importlib.import_module(f"zoo.tasks.vision.{module}")
    calls = []

    def counted_checkpoint(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(family, "checkpoint", counted_checkpoint)
    torch.manual_seed(0)
    backbone = zoo.create_model(name, features_only=True).train()
    x = torch.randn(2, 3, size, size)

    def maps_and_grads(enable):
        backbone.zero_grad()
        backbone.set_grad_checkpointing(enable)
        maps = backbone(x)
        sum((m.square() * (i + 1)).sum() for i, m in enumerate(maps)).backward()
        grads = {k: p.grad.clone() for k, p in backbone.named_parameters() if p.grad is not None}
        return [m.detach() for m in maps], grads

    plain_maps, plain_grads = maps_and_grads(False)
    assert not calls and backbone.grad_checkpointing is False
    ckpt_maps, ckpt_grads = maps_and_grads(True)
    assert calls and backbone.grad_checkpointing is True
    for a, b in zip(ckpt_maps, plain_maps):
        torch.testing.assert_close(a, b)
    assert plain_grads and ckpt_grads.keys() == plain_grads.keys()
    for key, grad in ckpt_grads.items():
        torch.testing.assert_close(grad, plain_grads[key], msg=key)
    with pytest.raises(TypeError, match="set_grad_checkpointing: enable must be True or False"):
        backbone.set_grad_checkpointing("yes")


def test_feature_info_dicts_and_negative_taps_match_timm():
    """FeatureInfo.get_dicts() lists the returned taps (out_indices), and a tap index may count from the end, as in
    timm's FeatureInfo (necks call get_dicts() and channels(-1) for the deepest map)."""
    kwargs = dict(img_size=48, features_only=True, out_indices=(0, 2))
    peer = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    ours = zoo.create_model("vit_tiny_patch16_224", **kwargs)
    keys = ["module", "num_chs", "reduction"]
    assert ours.feature_info.get_dicts(keys=keys) == peer.feature_info.get_dicts(keys=keys)
    assert [d["module"] for d in ours.feature_info.get_dicts()] == ["blocks.0", "blocks.2"]
    assert len(ours.feature_info) == len(peer.feature_info) == 12
    for idx in (-1, -12, 5, [0, -1]):
        for accessor in ("channels", "reduction", "module_name"):
            assert getattr(ours.feature_info, accessor)(idx) == getattr(peer.feature_info, accessor)(idx), idx
    with pytest.raises(IndexError, match="out of range"):
        ours.feature_info[-13]


def test_backbone_with_norm_gives_timms_normed_intermediates():
    """FeatureExtractor(model, norm=True) keeps the final norm and applies it to every map, as timm's
    forward_intermediates(norm=True) on the same weights; without norm the maps are the raw block outputs."""
    torch.manual_seed(3)
    peer = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=3).eval()
    model = zoo.create_model("vit_tiny_patch16_224", img_size=32, depth=3)
    model.load_state_dict(peer.state_dict())
    backbone = zoo.features.FeatureExtractor(model, (0, 2), norm=True).eval()
    assert "model.norm.weight" in backbone.state_dict()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = peer.forward_intermediates(x, indices=[0, 2], norm=True, intermediates_only=True)
        raw = peer.forward_intermediates(x, indices=[0, 2], norm=False, intermediates_only=True)
        got = backbone(x)
    assert len(got) == 2
    for a, b, c in zip(got, want, raw):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(a, c, atol=1e-3)


def test_list_models_filters_by_task_and_family():
    """task= and family= keep the names whose registry entry says so (zoo list --family maxvit)."""
    maxvit = zoo.list_models(family="maxvit")
    assert "maxvit_debug" in maxvit and "vit_debug" not in maxvit
    assert all(zoo.get_model_entry(n).family == "maxvit" for n in maxvit)
    assert set(maxvit) == {n for n in zoo.list_models() if zoo.get_model_entry(n).family == "maxvit"}
    graph = zoo.list_models(task="graph")
    assert "gatv2_node_debug" in graph and not any(n.startswith(("vit", "maxvit")) for n in graph)
    assert zoo.list_models("maxvit*", task="graph") == [] and zoo.list_models(task="vision", family="gat") == []


def test_list_models_excludes_the_tags_of_an_excluded_name_as_timm():
    """With include_tags an untagged exclude filter drops the name's tagged forms too (timm's filter expansion):
    exclude_filters="vit_tiny_patch16_224" left vit_tiny_patch16_224.augreg_in21k listed."""
    kept = zoo.list_models("vit_tiny*", include_tags=True, exclude_filters="vit_tiny_patch16_224")
    registered = set(zoo.list_models("vit_tiny*"))
    want = [n for n in timm.list_models("vit_tiny*", include_tags=True, exclude_filters="vit_tiny_patch16_224")
            if n.split(".")[0] in registered]
    assert kept == sorted(want) and not any(n.startswith("vit_tiny_patch16_224.") for n in kept)
    assert any(n.startswith("vit_tiny_patch16_384.") for n in kept)


def test_register_model_refuses_a_name_taken_by_another_module(monkeypatch):
    """A second constructor under a registered name from another module is an error (it would shadow the first
    silently); the entry stays the original's."""
    from zoo import registry

    zoo.list_models()  # the families are registered
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    original = registry.get_model_entry("vit_debug")

    def vit_debug(**kwargs):
        raise AssertionError("never built")

    vit_debug.__module__ = "someone.elses.models"
    with pytest.raises(ValueError, match="'vit_debug' is already registered by zoo.tasks.vision.vit"):
        registry.register_model(vit_debug, task="vision")
    assert registry.get_model_entry("vit_debug") is original


def test_data_config_of_other_channel_counts_and_fixed_size_tags():
    """pretrained_cfg's mean / std follow in_chans (one channel: the mean of the three values, hand-computed; more:
    repeated), and a timm tag with a fixed non-square input size builds img_size [H, W]."""
    from zoo.registry import _tagged_entry

    gray = zoo.create_model("vit_debug", in_chans=1).pretrained_cfg
    assert gray["input_size"][0] == 1
    assert gray["mean"] == pytest.approx(((0.485 + 0.456 + 0.406) / 3,))
    assert gray["std"] == pytest.approx(((0.229 + 0.224 + 0.225) / 3,))
    four = zoo.create_model("vit_debug", in_chans=4).pretrained_cfg
    assert four["mean"] == pytest.approx((0.485, 0.456, 0.406, 0.485))
    entry = zoo.get_model_entry("vit_debug")
    _, args = _tagged_entry(entry, {"input_size": (3, 32, 48), "fixed_input_size": True, "num_classes": 0})
    assert args == {"num_classes": 0, "in_chans": 3, "img_size": [32, 48]}
    _, args = _tagged_entry(entry, {"input_size": (3, 40, 40), "fixed_input_size": False, "num_classes": 10})
    assert args == {"num_classes": 10, "in_chans": 3}


def test_feature_info_get_dicts_of_one_tap_is_its_dict_as_timm():
    """get_dicts(idx=i) for one tap is that tap's dict (timm's FeatureInfo.get_dicts), a list for a list of taps;
    compared with timm's features_only ViT."""
    kwargs = dict(img_size=48, features_only=True, out_indices=(0, 2))
    peer = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    ours = zoo.create_model("vit_tiny_patch16_224", **kwargs)
    keys = ["module", "num_chs", "reduction"]
    for idx in (0, 5, -1):
        got = ours.feature_info.get_dicts(keys=keys, idx=idx)
        assert isinstance(got, dict) and got == peer.feature_info.get_dicts(keys=keys, idx=idx), idx
        assert ours.feature_info.get_dicts(idx=idx)["module"] == peer.feature_info.get_dicts(idx=idx)["module"]
    assert ours.feature_info.get_dicts(keys=keys, idx=[1, -2]) == peer.feature_info.get_dicts(keys=keys, idx=[1, -2])


def test_deprecated_names_are_models_with_or_without_a_tag(monkeypatch):
    """A name in DEPRECATED_MODEL_NAMES is a model (is_model), tagged as timm spells it too, and resolves to its new
    entry with a FutureWarning; create_model passes keyword arguments on to the new model."""
    from zoo import registry

    monkeypatch.setitem(registry.DEPRECATED_MODEL_NAMES, "vit_debug_old", "vit_debug")
    assert zoo.is_model("vit_debug_old") and zoo.is_model("vit_debug_old.some_tag")
    assert not zoo.is_model("vit_debug_older")
    new = zoo.get_model_entry("vit_debug")
    for name in ("vit_debug_old", "vit_debug_old.some_tag"):
        with pytest.warns(FutureWarning, match="'vit_debug_old' is deprecated; use 'vit_debug'"):
            assert zoo.get_model_entry(name) is new
    with pytest.warns(FutureWarning, match="deprecated"):
        model = zoo.create_model("vit_debug_old", num_classes=3)
    assert model.zoo_model_name == "vit_debug" and model.num_classes == 3 and model.zoo_model_args == {"num_classes": 3}


def test_feature_info_slices_and_numbers_its_taps_as_timm():
    """timm-written necks slice ``feature_info`` and read each tap's ``index`` (timm's FeatureInfo)."""
    peer = timm.create_model("maxvit_rmlp_pico_rw_256", pretrained=False, img_size=64, features_only=True,
                             out_indices=(1, 3)).feature_info
    ours = zoo.create_model("maxvit_rmlp_pico_rw_256", img_size=64, features_only=True, out_indices=(1, 3)).feature_info
    assert [entry["module"] for entry in ours[0:2]] == [entry["module"] for entry in peer[0:2]]
    assert ours[1] == peer[1]  # num_chs, reduction, module and index
    assert [entry["index"] for entry in ours[:]] == list(range(len(ours)))
    with pytest.raises(TypeError, match="int or a slice"):
        ours["stem"]


def test_backbone_options_of_timm_are_refused_with_the_zoo_route():
    """timm's feature_cls (and a getter's norm) have no create_model spelling here: the message names
    zoo.features.FeatureExtractor(..., norm=True), which gives timm's FeatureGetterNet(norm=True) maps."""
    for extra in ({"feature_cls": "getter"}, {"norm": True}):
        with pytest.raises(TypeError, match=r"FeatureExtractor\(zoo.create_model\('vit_tiny_patch16_224'"):
            zoo.create_model("vit_tiny_patch16_224", img_size=32, features_only=True, **extra)
    torch.manual_seed(2)
    peer = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).eval()
    ours = zoo.create_model("vit_tiny_patch16_224", img_size=32).eval()
    ours.load_state_dict(peer.state_dict())
    from timm.models._features import FeatureGetterNet

    peer_net = FeatureGetterNet(peer, out_indices=(1, 3), norm=True).eval()
    ours_net = zoo.features.FeatureExtractor(ours, out_indices=(1, 3), norm=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(ours_net(x), peer_net(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
