"""Agent-DeiT checkpoints as the official Agent-Attention code writes them (review H, issue #4).

The official training code (LeapLabTHU/Agent-Attention @207ce3e, agent_transformer/utils.py ``save_checkpoint``,
utils_ema.py ``save_checkpoint_ema_new``) saves ``{"model", "optimizer", "lr_scheduler", "max_accuracy", "epoch",
"config"}`` with ``config`` a yacs ``CfgNode`` (main_ema.py adds ``"state_dict_ema"``), evaluates
``checkpoint["model"]`` (utils.py ``load_checkpoint``) and fine-tunes at a higher resolution through
``load_pretrained`` (pos_embed bicubic, agent row/column tables linear, tables of another head / agent count
skipped with "Error in loading {k}, passing"). Each test compares with loading the plain state dict, with timm's
``resample_abs_pos_embed`` or with that official rule.
"""
from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

import zoo
from zoo import hub
from zoo.tasks.vision import agent_deit
from zoo.tasks.vision.agent_deit import AgentVisionTransformer

AGENT_LOGGER = "zoo.tasks.vision.agent_deit"


class CfgNode(dict):
    """A stand-in for yacs.config.CfgNode (yacs is not installed here): a dict subclass whose nested dicts are
    CfgNodes and whose __init__ fills ``__dict__`` as yacs's does (a set among them). ``made`` counts the
    instances built, so a test can tell that loading never built one."""

    made = 0

    def __init__(self, init_dict=None, new_allowed=False):
        type(self).made += 1
        init_dict = {} if init_dict is None else init_dict
        super().__init__({k: CfgNode(v) if isinstance(v, dict) else v for k, v in init_dict.items()})
        self.__dict__["__immutable__"] = False
        self.__dict__["__deprecated_keys__"] = set()
        self.__dict__["__renamed_keys__"] = {}
        self.__dict__["__new_allowed__"] = new_allowed


class Unknown:
    """Another class pickled in a checkpoint: never allowed."""

    built = 0

    def __setstate__(self, state):
        type(self).built += 1
        self.__dict__.update(state)


def _save_as_module(monkeypatch, obj, path, module: str, *classes) -> None:
    """torch.save ``obj`` with ``classes`` pickled under ``module`` (as if imported from there), then forget the
    module again, so that loading cannot import it."""
    fake = types.ModuleType(module)
    for cls in classes:
        monkeypatch.setattr(cls, "__module__", module)
        setattr(fake, cls.__name__, cls)
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, module.split(".")[0], types.ModuleType(module.split(".")[0]))
        patch.setitem(sys.modules, module, fake)
        torch.save(obj, path)
    assert module not in sys.modules


def _official_state(seed: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = zoo.create_model("agent_deit_debug", **kwargs)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.05)
    return model.state_dict()


def _training_checkpoint(state: dict[str, torch.Tensor], **extra) -> dict:
    """What the official utils.save_checkpoint writes (optimizer / scheduler states are plain dicts)."""
    config = CfgNode({"MODEL": {"TYPE": "agent_deit", "NAME": "agent_deit_debug", "DROP_PATH_RATE": 0.1},
                      "TRAIN": {"EPOCHS": 300, "BASE_LR": 5e-4}, "TAG": "default"})
    config.__dict__["__immutable__"] = True  # config.freeze()
    return {"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "params": [0, 1]}]},
            "lr_scheduler": {"t_initial": 300}, "max_accuracy": 74.9, "epoch": 299, "config": config, **extra}


# --------------------------------------------------------------------------------------------------
# 1. the yacs CfgNode of official training checkpoints, read without unpickling it
# --------------------------------------------------------------------------------------------------
def test_official_training_checkpoint_with_its_yacs_config_loads_as_the_plain_state_dict(tmp_path, monkeypatch):
    state = _official_state()
    _save_as_module(monkeypatch, _training_checkpoint(state), tmp_path / "ckpt_epoch_299.pth", "yacs.config", CfgNode)
    torch.save(state, tmp_path / "plain.pth")
    made = CfgNode.made
    loaded = zoo.create_model("agent_deit_debug", pretrained=str(tmp_path / "ckpt_epoch_299.pth")).state_dict()
    plain = zoo.create_model("agent_deit_debug", pretrained=str(tmp_path / "plain.pth")).state_dict()
    assert list(loaded) == list(plain) == list(state)
    assert all(torch.equal(loaded[k], plain[k]) and torch.equal(loaded[k], state[k]) for k in state)
    assert CfgNode.made == made and "yacs" not in sys.modules  # nothing of the config's class was run or imported
    # the config comes back as inert plain containers, its attributes in the OrderedDict's __dict__
    raw = hub._torch_load(tmp_path / "ckpt_epoch_299.pth")
    assert type(raw["config"]).__name__ == "OrderedDict" and type(raw["config"]["MODEL"]).__name__ == "OrderedDict"
    assert raw["config"]["MODEL"]["NAME"] == "agent_deit_debug" and raw["config"].__dict__["__immutable__"] is True


def test_a_file_with_another_pickled_class_is_still_refused_and_names_the_route(tmp_path, monkeypatch):
    state = _official_state()
    other = Unknown()
    other.payload = 1
    _save_as_module(monkeypatch, {"model": state, "extra": other}, tmp_path / "other.pth", "thirdparty.mod", Unknown)
    # a CfgNode beside the unknown class does not open the door either
    _save_as_module(monkeypatch, _training_checkpoint(state, extra=other), tmp_path / "both.pth", "yacs.config",
                    CfgNode, Unknown)
    for name, unknown in (("other.pth", "thirdparty.mod.Unknown"), ("both.pth", "yacs.config.Unknown")):
        with pytest.raises(hub.CheckpointError, match=rf"pickles .*{unknown}.*never imports or runs.*"
                           r"torch.load\(path, weights_only=False\).*load_official_state_dict.*docs/timm.md"):
            zoo.create_model("agent_deit_debug", pretrained=str(tmp_path / name))
    assert Unknown.built == 0


# --------------------------------------------------------------------------------------------------
# 2. 'model' beside 'state_dict_ema': the official evaluation's weights; the EMA copy on request
# --------------------------------------------------------------------------------------------------
def test_model_entry_is_loaded_over_the_ema_copy_as_the_official_evaluation(tmp_path, monkeypatch, caplog):
    state = _official_state()
    ema = {k: v + 1 if k == "head.bias" else v for k, v in state.items()}
    checkpoint = _training_checkpoint(state, state_dict_ema=ema)
    _save_as_module(monkeypatch, checkpoint, tmp_path / "ema.pth", "yacs.config", CfgNode)
    with caplog.at_level(logging.WARNING, logger="zoo.hub"):
        loaded = zoo.create_model("agent_deit_debug", pretrained=str(tmp_path / "ema.pth"))
    assert torch.equal(loaded.head.bias, state["head.bias"])
    assert "loading 'model'" in caplog.text and "'state_dict_ema'" in caplog.text and "ema=True" in caplog.text
    assert torch.equal(hub.load_state_dict_file(tmp_path / "ema.pth", ema=True)["head.bias"], ema["head.bias"])
    assert torch.equal(hub.load_state_dict_file(tmp_path / "ema.pth", ema=False)["head.bias"], state["head.bias"])
    model = zoo.create_model("agent_deit_debug")
    model.load_official_state_dict(checkpoint)
    assert torch.equal(model.head.bias, state["head.bias"])
    model.load_official_state_dict(checkpoint, use_ema=True)
    assert torch.equal(model.head.bias, ema["head.bias"])
    model.load_official_state_dict(checkpoint)
    model.load_official_state_dict(hub.load_state_dict_file(tmp_path / "ema.pth", ema=True))  # docs/timm.md's route
    assert torch.equal(model.head.bias, ema["head.bias"])
    with pytest.raises(hub.CheckpointError, match=r"ema=True asks for an EMA copy .* does not hold"):
        hub.load_state_dict_file(_save_plain(tmp_path, {"model": state}), ema=True)
    # timm train.py's layout keeps timm's rule: the EMA copy beside 'state_dict' (tests/test_hub.py too)
    assert torch.equal(hub.unwrap_state_dict({"state_dict": state, "state_dict_ema": ema})["head.bias"], ema["head.bias"])


def _save_plain(tmp_path, obj, name: str = "plain_wrapped.pth"):
    torch.save(obj, tmp_path / name)
    return tmp_path / name


# --------------------------------------------------------------------------------------------------
# 3. pos_embed resampled bicubically at loading, as timm's resample_abs_pos_embed and the official fine-tuning
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("saved_size, new_size", [(32, 48), (48, 32), (32, 44)])
def test_position_embedding_is_resampled_at_loading_as_the_official_fine_tuning(tmp_path, saved_size, new_size):
    """Bicubic, as the official utils.load_pretrained (F.interpolate(mode='bicubic')) and timm's
    resample_abs_pos_embed with antialias=False; timm's default antialias=True is another kernel (told apart)."""
    state = _official_state(img_size=saved_size)
    torch.save({"model": state}, tmp_path / "ckpt.pth")
    model = zoo.create_model("agent_deit_debug", pretrained=str(tmp_path / "ckpt.pth"), img_size=new_size)
    old_grid, new_grid = (saved_size // 4,) * 2, (new_size // 4,) * 2
    grid = state["pos_embed"][:, 1:].reshape(1, *old_grid, -1).permute(0, 3, 1, 2)
    official = F.interpolate(grid, size=new_grid, mode="bicubic").permute(0, 2, 3, 1).flatten(1, 2)
    torch.testing.assert_close(model.pos_embed.detach()[:, 1:], official, rtol=0, atol=0)
    assert torch.equal(model.pos_embed.detach()[:, :1], state["pos_embed"][:, :1])
    timm_plain = resample_abs_pos_embed(state["pos_embed"], list(new_grid), list(old_grid), num_prefix_tokens=1,
                                        antialias=False)
    torch.testing.assert_close(model.pos_embed.detach(), timm_plain, rtol=0, atol=0)
    timm_default = resample_abs_pos_embed(state["pos_embed"], list(new_grid), list(old_grid), num_prefix_tokens=1)
    assert (timm_default - timm_plain).abs().max() > 1e-3  # the test tells the two kernels apart
    torch.testing.assert_close(agent_deit.resize_pos_embed(state["pos_embed"], new_grid, old_grid, antialias=True),
                               timm_default, rtol=0, atol=0)
    # set_input_size resamples as loading does
    resized = zoo.create_model("agent_deit_debug", img_size=saved_size)
    resized.load_state_dict(state)
    resized.set_input_size(new_size)
    torch.testing.assert_close(resized.pos_embed.detach(), timm_plain, rtol=0, atol=0)


def test_non_square_resample_matches_timm_and_keeps_float64():
    torch.manual_seed(1)
    pos_1NC = torch.randn(1, 1 + 6 * 10, 8)
    expected = resample_abs_pos_embed(pos_1NC, [9, 4], [6, 10], num_prefix_tokens=1, antialias=False)
    torch.testing.assert_close(agent_deit.resize_pos_embed(pos_1NC, (9, 4), (6, 10)), expected, rtol=0, atol=0)
    wide = agent_deit.resize_pos_embed(pos_1NC.double(), (9, 4), (6, 10))
    assert wide.dtype == torch.float64
    torch.testing.assert_close(wide.float(), expected, rtol=1e-5, atol=1e-6)  # float32 rounding only


# --------------------------------------------------------------------------------------------------
# 4. a checkpoint of another size loaded without img_size: said, with the size to build at
# --------------------------------------------------------------------------------------------------
def test_checkpoint_of_another_size_without_img_size_warns_with_the_size_to_build(tmp_path, caplog):
    state = _official_state(img_size=48)
    torch.save({"model": state}, tmp_path / "ckpt48.pth")
    with caplog.at_level(logging.INFO, logger=AGENT_LOGGER):
        model = zoo.create_model("agent_deit_debug", pretrained=str(tmp_path / "ckpt48.pth"))
    warnings = [r for r in caplog.records if r.name == AGENT_LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and model.patch_embed.grid_size == (8, 8)
    message = warnings[0].getMessage()
    assert "12 x 12 patch grid (48 px)" in message and "8 x 8 (32 px)" in message and "img_size=48" in message
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=AGENT_LOGGER):
        same = zoo.create_model("agent_deit_debug", pretrained=str(tmp_path / "ckpt48.pth"), img_size=48)
        assert not [r for r in caplog.records if r.name == AGENT_LOGGER]  # the checkpoint's size: nothing resampled
        assert all(torch.equal(v, state[k]) for k, v in same.state_dict().items())
        zoo.create_model("agent_deit_debug", pretrained=str(tmp_path / "ckpt48.pth"), img_size=64)  # asked for
    assert [r.levelno for r in caplog.records if r.name == AGENT_LOGGER] == [logging.INFO]


# --------------------------------------------------------------------------------------------------
# 5. another variant / agent count: named; strict=False skips the tables as the official load_pretrained
# --------------------------------------------------------------------------------------------------
def test_checkpoint_of_another_agent_count_names_it_and_strict_false_skips_the_tables(tmp_path, caplog):
    state = _official_state(agent_num=[9, 9, 9, 9])
    torch.save({"model": state}, tmp_path / "a9.pth")
    with pytest.raises(hub.CheckpointError, match=r"another Agent-DeiT variant or agent count.*checkpoint width 32, "
                       r"2 heads, 2 blocks, 2 with agent attention, 9 agents each; model agent_deit_debug: .*16 agents "
                       r"each\. Build the model with agent_num=\[9, 9, 9, 9\]"):
        zoo.create_model("agent_deit_debug", pretrained=str(tmp_path / "a9.pth"))
    assert zoo.create_model("agent_deit_debug", pretrained=str(tmp_path / "a9.pth"), agent_num=9)  # the fix works
    model = zoo.create_model("agent_deit_debug")
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"agent_num=\[9, 9, 9, 9\]"):
        model.load_official_state_dict({"model": state})
    with caplog.at_level(logging.WARNING, logger=AGENT_LOGGER):
        result = model.load_official_state_dict({"model": state}, strict=False)
    tables = sorted(k for k in state if k.rsplit(".", 1)[-1] in agent_deit._AGENT_TABLES)
    assert len(tables) == 16 and sorted(result.missing_keys) == tables and not result.unexpected_keys
    assert "skipped 16 agent bias table(s)" in caplog.text
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], fresh[k]) for k in tables)  # the model's own initialisation kept
    assert all(torch.equal(loaded[k], state[k]) for k in state if k not in tables)


def test_checkpoint_of_another_variant_names_both_variants():
    with torch.device("meta"):
        small = AgentVisionTransformer(patch_size=16, embed_dim=384, depth=12, num_heads=6)
        tiny = AgentVisionTransformer(patch_size=16, embed_dim=192, depth=12, num_heads=3)
        base = AgentVisionTransformer(patch_size=16, embed_dim=768, depth=12, num_heads=12, agent_layer=4)
    with pytest.raises(ValueError, match=r"checkpoint width 384, 6 heads, 12 blocks, 12 with agent attention, 49 agents "
                       r"each \(the width and heads of agent_deit_small\); model AgentVisionTransformer: width 192, 3 "
                       r"heads.*Build agent_deit_small for it"):
        agent_deit.checkpoint_filter_fn({"model": small.state_dict()}, tiny)
    with pytest.raises(ValueError, match=r"12 heads, 12 blocks, 4 with agent attention, 49 agents each \(the width and "
                       r"heads of agent_deit_base\).*Build agent_deit_base"):
        agent_deit.checkpoint_filter_fn(base.state_dict(), small)
