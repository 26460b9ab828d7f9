"""Loading a checkpoint into a model built with other arguments (in_chans, img_size, num_classes, another name of the
family), as timm's create_model(pretrained=True, ...) does; and timm's list_models(pretrained=True)."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models._hub import save_for_hf
from timm.models._manipulate import adapt_input_conv as timm_adapt_input_conv

import zoo


def test_in_chans_loads_checkpoints_that_record_their_normalisation(tmp_path):
    """A directory with a config.json (zoo.save_pretrained, or timm's save_for_hf) loaded with in_chans != 3: its
    first convolution was adapted as timm does, then the checkpoint's 3-value mean / std were refused for the
    1- or 4-channel model. They follow in_chans by the registry's rule (the mean for 1 channel, cycled else)."""
    torch.manual_seed(0)
    source = zoo.create_model("vit_debug")
    zoo.save_pretrained(source, tmp_path / "zoo_dir")
    peer = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=3)
    save_for_hf(peer, str(tmp_path / "timm_dir"), safe_serialization=True)
    rgb_mean, rgb_std = source.pretrained_cfg["mean"], source.pretrained_cfg["std"]
    for in_chans in (1, 4):
        model = zoo.create_model("vit_debug", pretrained=str(tmp_path / "zoo_dir"), in_chans=in_chans)
        want = timm_adapt_input_conv(in_chans, source.patch_embed.proj.weight.detach())
        torch.testing.assert_close(model.patch_embed.proj.weight, want)
        expected_mean = (sum(rgb_mean) / 3,) if in_chans == 1 else tuple(rgb_mean[i % 3] for i in range(in_chans))
        expected_std = (sum(rgb_std) / 3,) if in_chans == 1 else tuple(rgb_std[i % 3] for i in range(in_chans))
        assert model.pretrained_cfg["mean"] == expected_mean and model.pretrained_cfg["std"] == expected_std
        assert model.pretrained_cfg["input_size"][0] == in_chans
        from_timm = zoo.from_pretrained(str(tmp_path / "timm_dir"), in_chans=in_chans)
        torch.testing.assert_close(from_timm.patch_embed.proj.weight,
                                   timm_adapt_input_conv(in_chans, peer.patch_embed.proj.weight.detach()))
        assert len(from_timm.pretrained_cfg["mean"]) == in_chans and from_timm.pretrained_cfg["input_size"][0] == in_chans


def test_another_name_of_the_family_loads_with_overrides(tmp_path):
    """A vit_tiny_patch16_384 checkpoint (24 x 24 patch grid) into vit_tiny_patch16_224 with a new head or size: the
    saved model's geometry was rebuilt from the target name (14 x 14), and loading failed ("position embedding has
    576 grid tokens but old_size (14, 14) has 196") as soon as any override was given."""
    torch.manual_seed(0)
    source = zoo.create_model("vit_tiny_patch16_384", depth=1)
    zoo.save_pretrained(source, tmp_path / "v384")
    want = resample_abs_pos_embed(source.pos_embed.detach(), (14, 14), (24, 24), num_prefix_tokens=1)
    for overrides in ({}, {"num_classes": 5}, {"img_size": 224}):
        model = zoo.create_model("vit_tiny_patch16_224", pretrained=str(tmp_path / "v384"), depth=1, **overrides)
        torch.testing.assert_close(model.pos_embed, want, atol=1e-6, rtol=0, msg=str(overrides))


def test_maxvit_digits_set_input_size_keeps_its_partition_sizes():
    """maxvit_digits is built with window/grid 4 (not img_size // partition_ratio): set_input_size(S) derived them
    from the size (1 x 1 at its own 32 px: test accuracy 0.76 instead of 0.997), unlike loading the checkpoint at S.
    Sizes given to the constructor now stay; derived ones follow the size, as timm's."""
    for size in (32, 48, 64):
        loaded = zoo.create_model("maxvit_digits", pretrained=True, img_size=size).eval()
        resized = zoo.create_model("maxvit_digits", pretrained=True).eval()
        resized.set_input_size(size)
        assert resized.window_size == loaded.window_size == (4, 4) and resized.grid_size == (4, 4)
        x = torch.randn(2, 1, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            torch.testing.assert_close(resized(x), loaded(x), rtol=0, atol=1e-6)
    derived = zoo.create_model("maxvit_debug")  # windows from img_size // partition_ratio (64 // 32)
    derived.set_input_size(128)
    assert derived.window_size == derived.grid_size == (4, 4)


def test_gat_node_classifier_takes_another_class_count(tmp_path, caplog):
    """A node classifier's classifier is its last attention layer: loading with another num_classes named six shape
    mismatches instead of re-initialising it with a message, as the graph-level models and the vision ones do."""
    torch.manual_seed(0)
    source = zoo.create_model("gatv2_node_debug")
    zoo.save_pretrained(source, tmp_path / "node")
    with caplog.at_level("WARNING", logger="zoo.hub"):
        model = zoo.create_model("gatv2_node_debug", pretrained=str(tmp_path / "node"), num_classes=7)
    assert "classifier re-initialised" in caplog.text
    for key, value in source.state_dict().items():  # the other layers keep the checkpoint's weights
        if not key.startswith(f"convs.{len(source.convs) - 1}."):
            torch.testing.assert_close(model.state_dict()[key], value, msg=key)
    assert model.convs[-1].out_channels == 7


def test_list_models_pretrained_names_the_loadable_weights():
    """timm's list_models(pretrained=True) keyword was a TypeError; here it names what loads offline."""
    names = zoo.list_models(pretrained=True)
    assert {"vit_digits", "maxvit_digits", "agent_deit_digits"} <= set(names) < set(zoo.list_models())
    for name in names:
        assert zoo.hub.shipped_checkpoint(name) is not None or zoo.hub.timm_hub_id(name) is not None
    assert zoo.list_models("vit_*", pretrained=True) == [n for n in names if n.startswith("vit_")]


def test_list_models_takes_timms_filter_and_include_tags(tmp_path, monkeypatch):
    """timm's keywords: filter= (the pattern's name in timm) was a TypeError, include_tags= too, and
    list_models("vit_tiny_patch16_224.*") was empty although the tagged names build. With include_tags the listing
    equals timm's own for the registered architectures; with pretrained=True (include_tags defaults to it, as in
    timm) the tagged names whose weights are in the local Hugging Face cache."""

    assert zoo.list_models(filter="vit_tiny*") == zoo.list_models("vit_tiny*") != []
    with pytest.raises(TypeError, match="not both"):
        zoo.list_models("vit*", filter="vit_tiny*")
    tagged = zoo.list_models("vit_tiny*", include_tags=True)
    registered = set(zoo.list_models("vit_tiny*"))
    assert tagged == sorted(n for n in timm.list_models("vit_tiny*", include_tags=True) if n.split(".")[0] in registered)
    assert "vit_tiny_patch16_224.augreg_in21k" in tagged and all(zoo.is_model(n) for n in tagged)
    assert zoo.list_models("vit_tiny_patch16_224.*", include_tags=True) == [
        n for n in tagged if n.startswith("vit_tiny_patch16_224.")]
    assert zoo.list_models("vit_digits", include_tags=True) == ["vit_digits"]  # no timm tags: the name itself
    assert "vit_tiny_patch16_224.augreg_in21k" not in zoo.list_models("vit_tiny*", include_tags=True,
                                                                         exclude_filters="*augreg_in21k")

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    (tmp_path / "models--timm--vit_tiny_patch16_224.augreg_in21k").mkdir()
    assert zoo.list_models("vit_tiny*", pretrained=True) == ["vit_tiny_patch16_224.augreg_in21k"]
    assert zoo.list_models("vit_tiny*", pretrained=True, include_tags=False) == []  # its default tag is not cached
    assert "vit_digits" in zoo.list_models(pretrained=True)
