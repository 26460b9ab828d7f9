"""Image models carry timm's data config (``model.pretrained_cfg``), so timm's data pipeline
(``timm.data.resolve_model_data_config`` / ``create_transform``) preprocesses for them as for timm's own models:
the same config as timm for every name timm also has, the official evaluation transform for Agent-DeiT, and
the model's real input size, class count and checkpoint normalisation."""
from __future__ import annotations

import timm
import torch
from timm.data import create_transform, resolve_data_config, resolve_model_data_config

import zoo
from zoo.registry import image_data_config

IMAGE_MODELS = [name for name in zoo.list_models() if "input_size" in zoo.get_model_entry(name).default_cfg]


def _as_tuples(cfg: dict) -> dict:
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in cfg.items()}


def test_every_name_timm_has_resolves_to_timms_data_config():
    shared = [name for name in IMAGE_MODELS if timm.models.get_pretrained_cfg(name) is not None]
    assert {"vit_tiny_patch16_224", "maxvit_tiny_tf_224", "vit_betwixt_patch16_reg4_gap_256"} <= set(shared)
    for name in shared:
        theirs = resolve_data_config({}, pretrained_cfg=timm.models.get_pretrained_cfg(name).to_dict())
        ours = resolve_data_config({}, pretrained_cfg=image_data_config(zoo.get_model_entry(name).default_cfg, {}))
        assert _as_tuples(ours) == _as_tuples(theirs), name
    model = zoo.create_model("vit_tiny_patch16_224")  # the attribute on a built model, read by timm itself
    assert _as_tuples(resolve_model_data_config(model)) == _as_tuples(
        resolve_model_data_config(timm.create_model("vit_tiny_patch16_224", pretrained=False)))


def test_agent_deit_uses_the_official_evaluation_transform():
    """LeapLabTHU/Agent-Attention agent_transformer/data/build.py: resize to 256/224 of the size, centre crop,
    bicubic, ImageNet mean/std."""
    cfg = resolve_model_data_config(zoo.create_model("agent_deit_debug"))
    assert cfg["crop_pct"] == 0.875 and cfg["crop_mode"] == "center" and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)


def test_data_config_follows_size_classes_and_checkpoint(tmp_path):
    model = zoo.create_model("vit_debug", img_size=48, num_classes=7)
    assert model.pretrained_cfg["input_size"] == (3, 48, 48) and model.pretrained_cfg["num_classes"] == 7
    model.set_input_size(64)
    model.reset_classifier(3)
    assert model.pretrained_cfg["input_size"] == (3, 64, 64) and model.pretrained_cfg["num_classes"] == 3
    assert model.default_cfg is model.pretrained_cfg  # timm's older name
    assert zoo.create_model("maxvit_debug", img_size=(64, 96)).pretrained_cfg["input_size"] == (3, 64, 96)
    assert not hasattr(zoo.create_model("gatv2_node_debug"), "pretrained_cfg")  # graphs: no image config

    shipped = zoo.create_model("vit_digits", pretrained=True)  # trained on 8x8 grey digits normalised by 0.5
    cfg = resolve_model_data_config(shipped)
    assert cfg["input_size"] == (1, 8, 8) and cfg["mean"] == (0.5,) and cfg["std"] == (0.5,)
    from PIL import Image

    image = Image.fromarray((torch.rand(20, 20) * 255).to(torch.uint8).numpy(), mode="L")
    pixels = create_transform(**cfg)(image)
    assert pixels.shape == (1, 8, 8)
    with torch.no_grad():
        assert shipped.eval()(pixels[None]).shape == (1, 10)

    # a checkpoint trained with another normalisation (zoo train records it in config.json) brings it along
    tuned = zoo.create_model("vit_debug")
    zoo.save_pretrained(tuned, tmp_path, metadata={"data": {"mean": [0.2, 0.3, 0.4], "std": [0.5, 0.6, 0.7]}})
    loaded = zoo.create_model("vit_debug", pretrained=str(tmp_path))
    assert loaded.pretrained_cfg["mean"] == (0.2, 0.3, 0.4) and loaded.pretrained_cfg["std"] == (0.5, 0.6, 0.7)
    assert zoo.create_model("vit_debug").pretrained_cfg["mean"] == (0.485, 0.456, 0.406)  # registry default intact
