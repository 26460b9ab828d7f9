"""zoo.hub: safetensors + config.json round trips, fine-tuning heads, clear errors, no unpickling."""
from __future__ import annotations

import json
import logging
import os
import re

import pytest
import torch
import torch.nn as nn

import zoo
from zoo import hub
from zoo.registry import register_model

TINY = dict(embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0)


def _tiny_vit(**overrides):
    torch.manual_seed(0)
    return zoo.create_model("vit_digits", **{**TINY, **overrides})


def _digits_batch():
    torch.manual_seed(1)
    return torch.randn(3, 1, 8, 8)


class _TinyCNN(nn.Module):
    """A model without pretrained_head_keys(): the hub must find its classifier from default_cfg."""

    default_cfg = {"classifier": "fc"}

    def __init__(self, num_classes: int = 10, width: int = 4):
        super().__init__()
        self.num_classes = num_classes
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


@register_model(task="test", family="tiny_cnn")
def hubtest_tiny_cnn(num_classes: int = 10, width: int = 4) -> nn.Module:
    return _TinyCNN(num_classes, width)


def test_save_and_from_pretrained_round_trip(tmp_path):
    model = _tiny_vit().eval()
    x = _digits_batch()
    out_dir = zoo.save_pretrained(model, tmp_path / "released", metadata={"test_acc1": 0.5, "classes": ["a"]})
    assert sorted(p.name for p in out_dir.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left
    mask = os.umask(0)
    os.umask(mask)
    assert all((p.stat().st_mode & 0o777) == (0o666 & ~mask) for p in out_dir.iterdir())
    config = json.loads((out_dir / "config.json").read_text())
    assert config["model_name"] == "vit_digits"
    assert config["model_args"] == TINY
    assert config["zoo_version"] == zoo.__version__
    assert config["num_classes"] == 10
    # the metadata given, plus the model's preprocessing (read back by from_pretrained; kept when re-saved)
    assert config["metadata"] == {"test_acc1": 0.5, "classes": ["a"], "data": {"mean": [0.5], "std": [0.5]},
                                  "pretrained_cfg": {"crop_pct": 1.0, "crop_mode": "center", "interpolation": "bilinear"}}
    loaded = zoo.from_pretrained(out_dir).eval()
    assert loaded.zoo_model_name == "vit_digits" and loaded.zoo_model_args == TINY
    assert loaded.zoo_pretrained_metadata["test_acc1"] == 0.5
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # the .safetensors file alone (config.json beside it) and create_model(pretrained=...) give the same
    again = zoo.from_pretrained(out_dir / "model.safetensors").eval()
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    via_registry = zoo.create_model("vit_digits", pretrained=str(out_dir)).eval()
    torch.testing.assert_close(via_registry(x), model(x), rtol=0, atol=0)
    # the state dict in the file is exactly the model's
    state = hub.load_state_dict_file(out_dir / "model.safetensors")
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("name,pool", [("vit_debug", "avg"), ("agent_deit_debug", "avg"), ("maxvit_debug", "max")])
def test_reset_classifier_survives_save_and_load(name, pool, tmp_path, caplog):
    """reset_classifier (new class count, new pooling) then save_pretrained: loading gives back the reset model
    with its trained head, not a model of the old class count with the head re-initialised."""
    torch.manual_seed(0)
    model = zoo.create_model(name).eval()
    model.reset_classifier(5, global_pool=pool)
    with torch.no_grad():
        for p in model.get_classifier().parameters():
            p.add_(0.5)  # "trained": differs from any fresh init
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    zoo.save_pretrained(model, tmp_path)
    with caplog.at_level(logging.WARNING):
        loaded = zoo.create_model(name, pretrained=str(tmp_path)).eval()
    assert "re-initialised" not in caplog.text
    assert loaded.num_classes == 5 and loaded.global_pool == pool
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected)
    # a directory saved before reset_classifier recorded the new count (config.json's model_args without it, the
    # saved model's num_classes 5) still loads with its trained head, saying why
    old = zoo.create_model(name).eval()
    old.reset_classifier(5)
    with torch.no_grad():
        for p in old.get_classifier().parameters():
            p.add_(0.5)
        expected_old = old(x)
    zoo.save_pretrained(old, tmp_path / "old")
    config_path = tmp_path / "old" / "config.json"
    config = json.loads(config_path.read_text())
    config["model_args"] = {}
    config_path.write_text(json.dumps(config))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rescued = zoo.create_model(name, pretrained=str(tmp_path / "old")).eval()
    assert "a head reset before it was saved" in caplog.text and "re-initialised" not in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(rescued(x), expected_old)
    assert zoo.create_model(name, pretrained=str(tmp_path / "old"), num_classes=3).num_classes == 3  # override wins
    with pytest.raises(ValueError, match="num_classes must be an int >= 0"):
        model.reset_classifier(True)
    with pytest.raises(ValueError, match="global_pool must be one of"):
        model.reset_classifier(3, global_pool="nonsense")


def test_new_class_count_reinitialises_head_with_message(tmp_path, caplog):
    model = _tiny_vit()
    zoo.save_pretrained(model, tmp_path / "released")
    with caplog.at_level(logging.WARNING, logger="zoo.hub"):
        tuned = zoo.create_model("vit_digits", pretrained=str(tmp_path / "released"), num_classes=3)
    assert "classifier re-initialised" in caplog.text and "head.weight" in caplog.text
    assert tuned.head.weight.shape == (3, 16)
    assert tuned.zoo_model_args["num_classes"] == 3 and tuned.zoo_model_args["depth"] == 2
    for key, value in model.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(tuned.state_dict()[key], value), key
    # same class count: no message, head loaded
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="zoo.hub"):
        same = zoo.from_pretrained(tmp_path / "released")
    assert "re-initialised" not in caplog.text
    assert torch.equal(same.head.weight, model.head.weight)


def test_head_of_another_shape_is_replaced_only_when_asked(tmp_path):
    """A checkpoint whose classifier disagrees with its config.json (a hand-edited or mixed-up folder) is an
    error unless num_classes is passed: a trained head is never swapped for a random one unasked."""
    from safetensors.torch import load_file, save_file

    model = _tiny_vit()
    zoo.save_pretrained(model, tmp_path / "released")
    weights = tmp_path / "released" / "model.safetensors"
    state = load_file(weights)
    state["head.weight"], state["head.bias"] = torch.randn(7, 16), torch.randn(7)
    save_file(state, weights)
    with pytest.raises(hub.CheckpointError, match=r"classifier .*\(7, 16\).* no class count was asked for"):
        zoo.from_pretrained(tmp_path / "released")
    loaded = zoo.from_pretrained(tmp_path / "released", num_classes=7)  # the checkpoint's count: its head loads
    assert torch.equal(loaded.head.weight, state["head.weight"])
    fresh = zoo.from_pretrained(tmp_path / "released", num_classes=4)  # asked for: a new head
    assert fresh.head.weight.shape == (4, 16)


@pytest.mark.parametrize("name, saved_size, grid", [("vit_debug", (16, 64), (2, 8)), ("agent_deit_debug", (16, 64), (4, 16))])
def test_non_square_grid_is_resampled_from_its_saved_layout(tmp_path, name, saved_size, grid):
    """A position embedding saved on a 2 x 8 grid has as many rows as a 4 x 4 one. Loaded at 32 x 32 it must be
    resampled from 2 x 8 (config.json records the size), not read as 4 x 4 (the square guess timm makes)."""
    from zoo.tasks.vision.agent_deit import resize_pos_embed
    from zoo.tasks.vision.vit import resample_abs_pos_embed

    torch.manual_seed(0)
    model = zoo.create_model(name, img_size=saved_size)
    assert model.patch_embed.grid_size == grid
    zoo.save_pretrained(model, tmp_path / "wide")
    square = zoo.from_pretrained(tmp_path / "wide", img_size=32)
    new_grid = square.patch_embed.grid_size
    if name.startswith("vit"):
        expected = resample_abs_pos_embed(model.pos_embed.detach(), new_grid, grid, 1)
    else:
        expected = resize_pos_embed(model.pos_embed.detach(), new_grid, grid)
    torch.testing.assert_close(square.pos_embed.detach(), expected, rtol=0, atol=0)
    guessed = (resample_abs_pos_embed(model.pos_embed.detach(), new_grid, None, 1) if name.startswith("vit")
               else model.pos_embed.detach())  # agent: same token count, nothing resampled
    assert not torch.allclose(square.pos_embed.detach(), guessed)  # the test can tell the two apart


def test_prefix_token_override_names_the_cause(tmp_path):
    zoo.save_pretrained(zoo.create_model("vit_debug"), tmp_path / "vit")
    with pytest.raises(hub.CheckpointError, match=r"1 prefix row\(s\), the model's 2: class_token, reg_tokens"):
        zoo.from_pretrained(tmp_path / "vit", reg_tokens=1)


def test_head_found_from_default_cfg_classifier(tmp_path, caplog):
    model = zoo.create_model("hubtest_tiny_cnn", num_classes=10)
    assert hub.head_keys(model) == ["fc.weight", "fc.bias"]
    zoo.save_pretrained(model, tmp_path / "cnn")
    with caplog.at_level(logging.WARNING, logger="zoo.hub"):
        tuned = zoo.from_pretrained(tmp_path / "cnn", num_classes=4)
    assert tuned.fc.weight.shape == (4, 4) and "fc.weight" in caplog.text
    assert torch.equal(tuned.conv.weight, model.conv.weight)
    # a non-head shape change is an error, not a silent re-init
    with pytest.raises(hub.CheckpointError, match=r"shape mismatches.*conv.weight"):
        zoo.from_pretrained(tmp_path / "cnn", width=5)


def test_mismatched_checkpoint_names_file_and_keys(tmp_path):
    zoo.save_pretrained(_tiny_vit(depth=2), tmp_path / "deep")
    with pytest.raises(hub.CheckpointError) as info:
        zoo.create_model("vit_digits", pretrained=str(tmp_path / "deep"), depth=1)
    message = str(info.value)
    assert str(tmp_path / "deep" / "model.safetensors") in message
    assert "unexpected keys" in message and "blocks.1.attn.qkv.weight" in message
    with pytest.raises(hub.CheckpointError) as info:
        zoo.create_model("vit_digits", pretrained=str(tmp_path / "deep"), depth=3)
    assert "missing keys" in str(info.value) and "blocks.2.norm1.weight" in str(info.value)
    with pytest.raises(hub.CheckpointError, match=r"shape mismatches \(30\): blocks.0.attn.proj.bias checkpoint \(16,\) vs model \(32,\)"):
        zoo.create_model("vit_digits", pretrained=str(tmp_path / "deep"), embed_dim=32)


def test_corrupt_and_missing_files_give_clear_errors(tmp_path):
    out_dir = zoo.save_pretrained(_tiny_vit(), tmp_path / "released")
    weights = out_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(hub.CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        zoo.from_pretrained(out_dir)
    weights.write_bytes(b"not a checkpoint at all")
    with pytest.raises(hub.CheckpointError, match=str(weights)):
        zoo.from_pretrained(out_dir)
    (out_dir / "config.json").write_text("{ broken json")
    with pytest.raises(hub.CheckpointError, match="config.json is not valid JSON"):
        zoo.from_pretrained(out_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        zoo.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "bare").mkdir()
    with pytest.raises(hub.CheckpointError, match="has no config.json"):
        zoo.from_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="zoo.create_model"):
        zoo.save_pretrained(nn.Linear(2, 2), tmp_path / "plain")


class _Boom:
    """Unpickling this would run code: load_state_dict_file must refuse it, never execute it."""

    executed = False

    def __reduce__(self):
        return (_mark_executed, ())


def _mark_executed():
    _Boom.executed = True
    return {}


def test_torch_files_load_weights_only(tmp_path):
    model = _tiny_vit()
    state = model.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "wrapped.pth")
    loaded = hub.load_state_dict_file(tmp_path / "wrapped.pth")
    assert loaded.keys() == state.keys()
    torch.save(state, tmp_path / "plain.bin")
    target = zoo.create_model("vit_digits", pretrained=str(tmp_path / "plain.bin"), **TINY)
    assert torch.equal(target.pos_embed, model.pos_embed)
    torch.save({"model": state, "extra": _Boom()}, tmp_path / "evil.pt")
    with pytest.raises(hub.CheckpointError, match=r"evil\.pt could not be read with torch\.load\(weights_only=True\)"):
        hub.load_state_dict_file(tmp_path / "evil.pt")
    assert not _Boom.executed
    (tmp_path / "weights.xyz").write_bytes(b"")
    with pytest.raises(hub.CheckpointError, match="unknown checkpoint format"):
        hub.load_state_dict_file(tmp_path / "weights.xyz")


def test_pretrained_true_uses_shipped_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CHECKPOINTS", str(tmp_path / "shipped"))
    model = _tiny_vit()
    zoo.save_pretrained(model, tmp_path / "shipped" / "vit_digits")
    assert hub.list_shipped() == ["vit_digits"]
    loaded = zoo.create_model("vit_digits", pretrained=True)
    assert torch.equal(loaded.pos_embed, model.pos_embed)
    with pytest.raises(FileNotFoundError, match=r"no shipped checkpoint for 'vit_debug'.*shipped checkpoints: vit_digits"):
        zoo.create_model("vit_debug", pretrained=True)
    with pytest.raises(TypeError, match="pretrained must be False, True or a path"):
        zoo.create_model("vit_digits", pretrained=3)
    # a shipped directory named after its experiment is found through the model name in its config.json
    zoo.save_pretrained(zoo.create_model("vit_debug", **TINY), tmp_path / "shipped" / "debug_experiment")
    assert hub.list_shipped() == ["debug_experiment", "vit_digits"]
    assert hub.shipped_checkpoint("vit_debug") == tmp_path / "shipped" / "debug_experiment"
    assert zoo.create_model("vit_debug", pretrained=True).embed_dim == TINY["embed_dim"]


def test_every_shipped_checkpoint_loads_with_pretrained_true():
    """checkpoints/<dir> of the repository: each loads by its model name (agent_digits holds agent_deit_digits)."""
    shipped = hub.list_shipped()
    assert {"vit_digits", "maxvit_digits", "agent_digits"} <= set(shipped)
    for directory in shipped:
        name = hub.read_config(hub.shipped_checkpoints_dir() / directory)["model_name"]
        assert hub.shipped_checkpoint(name) == hub.shipped_checkpoints_dir() / directory
        model = zoo.create_model(name, pretrained=True)
        reference = zoo.from_pretrained(hub.shipped_checkpoints_dir() / directory)
        for (key, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
            assert torch.equal(a, b), (directory, key)


def test_shared_tensors_and_ema_state_dict(tmp_path):
    model = _tiny_vit()
    other = _tiny_vit()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    zoo.save_pretrained(model, tmp_path / "ema", state_dict=other.state_dict())
    loaded = zoo.from_pretrained(tmp_path / "ema")
    assert torch.equal(loaded.pos_embed, other.pos_embed)


def test_shipped_vit_digits_checkpoint_reaches_its_card_accuracy():
    """checkpoints/vit_digits loads with pretrained=True and reproduces the test accuracy in its card."""
    from zoo.tasks.vision.data import DigitsDataModule

    config = hub.read_config(hub.shipped_checkpoints_dir() / "vit_digits")
    card = (hub.shipped_checkpoints_dir() / "vit_digits" / "README.md").read_text()
    model = zoo.create_model("vit_digits", pretrained=True).eval()
    data = config["metadata"]["data"]
    dm = DigitsDataModule(img_size=data["img_size"], in_chans=data["in_chans"], mean=data["mean"], std=data["std"])
    dm.setup()
    with torch.no_grad():
        logits = model(dm.test_set.images.sub(dm.test_set.mean).div(dm.test_set.std))
    accuracy = (logits.argmax(-1) == dm.test_set.labels).float().mean().item()
    assert accuracy == pytest.approx(config["metadata"]["metrics"]["test/acc1"], abs=1e-6)
    assert accuracy >= 0.985
    assert f"{100 * accuracy:.2f}%" in card


def test_other_image_size_and_timm_checkpoint_go_through_the_family_filter(tmp_path):
    import timm

    from zoo.tasks.vision.vit import resample_abs_pos_embed

    model = _tiny_vit()
    zoo.save_pretrained(model, tmp_path / "released")
    bigger = zoo.create_model("vit_digits", pretrained=str(tmp_path / "released"), img_size=16)
    assert bigger.pos_embed.shape == (1, 1 + 64, 16)
    expected = resample_abs_pos_embed(model.pos_embed.detach(), (8, 8), (4, 4), 1)
    torch.testing.assert_close(bigger.pos_embed.detach(), expected)
    # a timm checkpoint (.pth) loads through the same path and gives timm's logits
    peer = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, num_classes=10).eval()
    torch.save({"model": peer.state_dict()}, tmp_path / "timm.pth")
    ours = zoo.create_model("vit_debug", pretrained=str(tmp_path / "timm.pth")).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), peer(x), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Every registered name: build, forward, backward, no NaN, save_pretrained / from_pretrained round trip
# --------------------------------------------------------------------------------------------------
# Full-size configurations are checked against timm / the official code (shapes and logits) in each family's
# test file; here the big ones are shrunk (fewer blocks, smaller image) so that every name stays fast.
_SHRINK = {
    "vit": dict(img_size=32, depth=1, embed_dim=64, num_heads=4),  # narrow: a 1536-wide block took 6-7 s
    "maxvit": dict(img_size=64, depths=(1, 1, 1, 1), embed_dim=(32, 64, 96, 128)),
    "agent_deit": dict(img_size=64, depth=1),
}
_SHRINK_NAME = {"agent_deit_base": dict(img_size=64, depth=1, agent_layer=1)}  # agent blocks then plain ones
_SMALL_ALREADY = ("_debug", "_digits")


def _shrink_args(name: str) -> dict:
    entry = zoo.get_model_entry(name)
    if entry.task != "vision" or name.endswith(_SMALL_ALREADY):
        return {}
    args = dict(_SHRINK_NAME.get(name, _SHRINK[entry.family]))
    if "patch14" in name:  # DINOv2: a whole number of 14-px patches
        args["img_size"] = 28
    return args


def _example_inputs(name: str, model: nn.Module, args: dict) -> tuple:
    """Inputs of the model's forward, by its task: images for vision; a small graph for the graph models."""
    entry = zoo.get_model_entry(name)
    g = torch.Generator().manual_seed(0)
    if entry.task == "vision":
        in_chans, *size = entry.default_cfg["input_size"]
        if "img_size" in args:
            size = [args["img_size"]] * 2
        return (torch.randn(2, in_chans, *size, generator=g),)
    kind = type(model).__name__
    if kind == "DictionaryLookupNet":  # k key-value nodes -> k query nodes; logits of the query nodes
        k = model.k
        keys = torch.arange(k)
        x = torch.cat([torch.stack([keys, torch.randperm(k, generator=g)], 1), torch.stack([keys, torch.full((k,), k)], 1)])
        src, dst = torch.meshgrid(torch.arange(k), k + torch.arange(k), indexing="ij")
        return x, torch.stack([src.flatten(), dst.flatten()]), k + torch.arange(k)
    in_channels = entry.default_cfg["in_channels"]
    n = 7
    ring = torch.stack([torch.arange(n), (torch.arange(n) + 1) % n])
    edge_index = torch.cat([ring, ring.flip(0)], 1)
    x = torch.randn(n, in_channels, generator=g)
    if kind == "GATGraphClassifier":  # two graphs: nodes 0..3 and 4..6
        return x, edge_index, torch.tensor([0, 0, 0, 0, 1, 1, 1]), 2
    return x, edge_index


def _registered_zoo_models() -> list[str]:
    return [n for n in zoo.list_models() if zoo.get_model_entry(n).module.startswith("zoo.")]


@pytest.mark.parametrize("name", _registered_zoo_models())
def test_every_registered_model_runs_and_round_trips(name, tmp_path):
    args = _shrink_args(name)
    torch.manual_seed(0)
    model = zoo.create_model(name, **args)
    inputs = _example_inputs(name, model, args)
    model.train()
    logits = model(*inputs)
    assert logits.dim() == 2 and torch.isfinite(logits).all()
    assert logits.shape[-1] == (model.num_classes or model.num_features)  # DINOv2: no head, the pooled features
    logits.float().logsumexp(-1).sum().backward()
    # With class-token pooling the last block computes only the class token; parameters that act on patch
    # tokens alone there (Agent attention's depthwise conv) cannot reach the logits, so they have no gradient.
    last_block = f"blocks.{len(model.blocks) - 1}." if hasattr(model, "blocks") else None
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None
               and not (last_block and n.startswith(last_block + "attn.dwc."))]
    assert not no_grad, f"{name}: parameters without a gradient: {no_grad[:5]}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"{name}: non-finite gradients in {bad[:5]}"

    model.eval()
    zoo.save_pretrained(model, tmp_path / name)
    config = json.loads((tmp_path / name / "config.json").read_text())
    assert config["model_name"] == name and config["model_args"] == json.loads(json.dumps(args))
    loaded = zoo.from_pretrained(tmp_path / name).eval()
    assert type(loaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), model(*inputs), rtol=0, atol=0)


META_CASES = ["vit_debug", "maxvit_debug", "maxvit_rmlp_pico_rw_256", "agent_deit_debug", "gatv2_node_debug"]


@pytest.mark.parametrize("name", META_CASES)
def test_device_meta_builds_without_storage_and_materialises_like_timm(name):
    """create_model(device="meta") as timm's: every parameter and buffer on meta; ``to_empty`` plus timm's
    ``reinit_non_persistent_buffers`` (our relative-position tables implement its protocol) and a state dict
    give the CPU-built model's outputs."""
    try:  # timm >= 1.0.2x; the same walk otherwise
        from timm.models._manipulate import reinit_non_persistent_buffers
    except ImportError:
        def reinit_non_persistent_buffers(module):
            for sub in module.modules():
                if hasattr(sub, "init_non_persistent_buffers"):
                    sub.init_non_persistent_buffers()

    torch.manual_seed(0)
    kwargs = dict(img_size=64) if name == "maxvit_rmlp_pico_rw_256" else {}
    reference = zoo.create_model(name, **kwargs).eval()
    model = zoo.create_model(name, device="meta", **kwargs)
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and all(t.is_meta for t in tensors)
    model.to_empty(device="cpu")
    reinit_non_persistent_buffers(model)
    model.load_state_dict(reference.state_dict(), strict=True)
    model.eval()
    if name.startswith("gat"):
        x, ei = torch.randn(10, reference.convs[0].in_channels), torch.randint(0, 10, (2, 30))
        args = (x, ei)
    else:
        args = (torch.randn(2, *reference.pretrained_cfg["input_size"]),)
    with torch.no_grad():
        torch.testing.assert_close(model(*args), reference(*args), rtol=0, atol=0)


def test_dtype_and_device_arguments(tmp_path):
    model = zoo.create_model("vit_debug", dtype=torch.float64, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert "dtype" not in model.zoo_model_args and "device" not in model.zoo_model_args  # config.json stays JSON
    zoo.save_pretrained(zoo.create_model("vit_debug"), tmp_path)
    loaded = zoo.create_model("vit_debug", pretrained=str(tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(
        loaded.pos_embed.float(), zoo.create_model("vit_debug", pretrained=str(tmp_path)).pos_embed.bfloat16().float()
    )
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        zoo.create_model("vit_debug", dtype=torch.int8)
    with pytest.raises(ValueError, match="device must be a torch device"):
        zoo.create_model("vit_debug", device="gpu0")
    with pytest.raises(ValueError, match="device='meta' .*to_empty"):
        zoo.create_model("vit_debug", pretrained=str(tmp_path), device="meta")


def test_unknown_model_lists_close_matches():
    with pytest.raises(KeyError, match=r"unknown model 'vit_tiny_patch16_244'\. Did you mean: vit_tiny_patch16_224") as info:
        zoo.create_model("vit_tiny_patch16_244")
    assert isinstance(info.value, zoo.registry.UnknownModelError)
    assert "zoo.list_models()" in str(info.value)
    with pytest.raises(KeyError, match=r"unknown model 'no_such_thing'\. \(\d+ models registered"):
        zoo.create_model("no_such_thing")  # nothing close: no suggestion, but where to look
    with pytest.raises(TypeError, match=r"vit_debug: unknown argument 'depthh' \(did you mean 'depth'\?\)"):
        zoo.create_model("vit_debug", depthh=2)


def test_registry_and_hub_arguments_are_named(tmp_path):
    """Argument types that used to fail deep inside (unhashable list, 'NoneType' is not iterable, a bare
    FileExistsError, a late AttributeError after the weights loaded) are named where they enter."""
    with pytest.raises(TypeError, match="model name must be a str, got list"):
        zoo.create_model(["vit_debug"])
    for pattern in (None, ["vit_*", 3], []):
        with pytest.raises(TypeError, match="list_models: pattern must be a str or a non-empty collection of str"):
            zoo.list_models(pattern)
    model = zoo.create_model("vit_debug")
    with pytest.raises(TypeError, match="metadata must be a mapping"):
        zoo.save_pretrained(model, tmp_path / "a", metadata=[1, 2])
    with pytest.raises(TypeError, match="directory must be a path, got None"):
        zoo.save_pretrained(model, None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file; pass a directory"):
        zoo.save_pretrained(model, tmp_path / "file")
    with pytest.raises(ValueError, match="state_dict does not fit vit_debug: unknown keys a"):
        zoo.save_pretrained(model, tmp_path / "a", state_dict={"a": torch.zeros(1)})
    for bad in (None, ""):
        with pytest.raises(TypeError, match="from_pretrained: path must be"):
            zoo.from_pretrained(bad)
    # config.json with the right keys and wrong value types: named before (not after) the weights load
    zoo.save_pretrained(model, tmp_path / "released")
    config_path = tmp_path / "released" / "config.json"
    good = json.loads(config_path.read_text())
    for edit, message in ((dict(metadata=[1]), "'metadata' must be an object"),
                          (dict(metadata={"data": {"mean": ["a"]}}), r"'metadata.data.mean' must be a list of numbers"),
                          (dict(metadata={"data": {"mean": [0.5, 0.5]}}), "metadata.data.mean has 2 values for a model of 3")):
        config_path.write_text(json.dumps({**good, **edit}))
        with pytest.raises(hub.CheckpointError, match=message):
            zoo.from_pretrained(tmp_path / "released")


def test_checkpoint_of_another_family_is_refused(tmp_path):
    """Agent-DeiT weights given to a ViT used to fail on the patch size, with advice to change patch_size that
    only led to missing keys."""
    zoo.save_pretrained(zoo.create_model("agent_deit_debug"), tmp_path / "agent")
    with pytest.raises(hub.CheckpointError, match="holds 'agent_deit_debug' weights \\(family 'agent_deit'\\), not a 'vit'"):
        zoo.create_model("vit_debug", pretrained=str(tmp_path / "agent"))


def test_a_checkpoint_of_another_architecture_of_the_family_names_both_models(tmp_path, caplog):
    """agent_deit_digits weights built as agent_deit_tiny (the CLI's ckpt=agent_digits model=agent_deit_tiny): only
    the arguments config.json records (img_size 8, in_chans 1, 10 classes) carry over, the rest is agent_deit_tiny's
    (16-px patches), and the build failed with "img_size (8, 8) is smaller than patch_size (16, 16)", blaming the
    size (review B finding 3). Now a CheckpointError names both models and the fix, for a failed build and for
    weights that do not load; the warning no longer says every constructor argument is kept. A model's own
    checkpoint keeps its plain errors, and a checkpoint of another name that fits still loads, its normalisation
    adapted to the model's channel count."""
    torch.manual_seed(0)
    # recorded as checkpoints/agent_digits records them (zoo train passes the data's size, channels and classes)
    zoo.save_pretrained(zoo.create_model("agent_deit_digits", num_classes=10, img_size=8, in_chans=1),
                        tmp_path / "digits")
    fix = "build 'agent_deit_digits' .*or pass model=agent_deit_digits on the command line"
    with caplog.at_level(logging.WARNING, logger="zoo"):
        with pytest.raises(hub.CheckpointError, match=r"holds 'agent_deit_digits' weights, which do not fit "
                           r"'agent_deit_tiny': img_size \(8, 8\) is smaller than patch_size \(16, 16\)\. .*"
                           r"records \(num_classes=10, img_size=8, in_chans=1\).*" + fix) as failed:
            zoo.create_model("agent_deit_tiny", pretrained=str(tmp_path / "digits"))
    assert isinstance(failed.value.__cause__, ValueError)
    assert "constructor arguments from the checkpoint are kept" not in caplog.text
    assert "the defaults of 'agent_deit_tiny' for the others (those of 'agent_deit_digits' are not carried over)" \
        in caplog.text
    with pytest.raises(hub.CheckpointError, match=r"do not fit 'agent_deit_tiny': .*another Agent-DeiT variant or agent "
                       r"count than the model: checkpoint width 64, 4 heads, 4 blocks.*" + fix):
        zoo.create_model("agent_deit_tiny", pretrained=str(tmp_path / "digits"), img_size=32)
    with pytest.raises(ValueError, match="smaller than patch_size") as own:
        zoo.create_model("agent_deit_digits", pretrained=str(tmp_path / "digits"), img_size=1)
    assert not isinstance(own.value, hub.CheckpointError)
    # another name whose architecture holds the weights: maxvit_debug's into maxvit_digits (window 2 -> 4 tables
    # resized, RGB stem summed to one channel)
    debug = zoo.create_model("maxvit_debug")
    zoo.save_pretrained(debug, tmp_path / "maxvit")
    digits = zoo.create_model("maxvit_digits", pretrained=str(tmp_path / "maxvit"))
    assert digits.window_size == (4, 4)
    torch.testing.assert_close(digits.stem.conv1.weight, debug.stem.conv1.weight.sum(1, keepdim=True))
    # its normalisation follows the adapted stem, as for an in_chans override (it was refused as an inconsistent
    # config.json: 3 values for a 1-channel model)
    assert digits.pretrained_cfg["mean"] == (pytest.approx(sum(debug.pretrained_cfg["mean"]) / 3),)


def test_weight_converters_name_what_does_not_fit():
    """timm / official checkpoints that do not fit give the key and both shapes (were AttributeError,
    'shape [32, -1, 8, 8] is invalid', 'Input and output sizes should be greater than 0', IndexError)."""
    vit, agent = zoo.create_model("vit_debug"), zoo.create_model("agent_deit_debug")
    vit_state, agent_state = vit.state_dict(), agent.state_dict()
    table = next(k for k in agent_state if k.endswith("ah_bias"))
    cases = [
        (lambda: vit.load_timm_state_dict({"pos_embed": [1, 2]}), TypeError, r"state_dict\['pos_embed'\] is a list"),
        (lambda: vit.load_timm_state_dict({**vit_state, "patch_embed.proj.weight": torch.zeros(32, 100)}), ValueError,
         r"patch_embed.proj.weight: checkpoint \(32, 100\) is neither a conv kernel"),
        (lambda: vit.load_timm_state_dict({**vit_state, "pos_embed": torch.zeros(17, 32)}), ValueError,
         r"pos_embed: checkpoint \(17, 32\) is not \(1, tokens, width\)"),
        (lambda: agent.load_official_state_dict({**agent_state, "pos_embed": torch.zeros(1, 1, 32)}), ValueError,
         r"checkpoint pos_embed \(1, 1, 32\) is not"),
        (lambda: agent.load_official_state_dict({**agent_state, table: torch.zeros(3, 3)}), ValueError,
         rf"{table}: checkpoint table \(3, 3\) cannot be resized to .*: only its window axis"),
    ]
    for load, error, message in cases:
        with pytest.raises(error, match=message):
            load()


def _timm_export(tmp_path, name, data_config=None, **kwargs):
    """A timm model and the directory timm's own exporter writes for the Hugging Face Hub (config.json with
    'architecture' and model.safetensors: the files of huggingface.co/timm/<name>)."""
    import timm
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    save_for_hf(model, str(tmp_path), safe_serialization=True, data_config=data_config)
    return model


@pytest.mark.parametrize("name,kwargs,size", [
    ("vit_tiny_patch16_224", dict(num_classes=3, img_size=32, in_chans=2), 32),
    ("maxvit_rmlp_pico_rw_256", dict(num_classes=5, img_size=64), 64),
])
def test_timm_hub_directory_loads_with_its_preprocessing(tmp_path, name, kwargs, size):
    """A timm Hub export loads through from_pretrained and create_model(pretrained=<its model.safetensors>):
    same logits as the timm model, and timm's data pipeline resolves the preprocessing the export records (the
    timm model object itself keeps its source's 3-channel, 224 px pretrained_cfg after img_size / in_chans)."""
    import timm.data

    # preprocessing of its own (fine-tuned with other statistics and crop), which the zoo's defaults do not have
    peer = _timm_export(tmp_path, name, data_config=dict(crop_pct=0.8, interpolation="bilinear", std=(0.3,)), **kwargs)
    recorded = timm.data.resolve_data_config(pretrained_cfg=json.loads((tmp_path / "config.json").read_text())["pretrained_cfg"])
    recorded = {key: tuple(value) if isinstance(value, list) else value for key, value in recorded.items()}  # JSON lists
    assert recorded["input_size"] == (kwargs.get("in_chans", 3), size, size)
    x = torch.randn(2, kwargs.get("in_chans", 3), size, size)
    for model in (zoo.from_pretrained(tmp_path), zoo.create_model(name, pretrained=tmp_path / "model.safetensors")):
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), peer(x), atol=1e-5, rtol=1e-5)
        assert timm.data.resolve_model_data_config(model) == recorded
    assert model.zoo_model_args["num_classes"] == kwargs["num_classes"]


def test_resaving_a_loaded_checkpoint_keeps_its_preprocessing(tmp_path):
    """A model loaded with statistics and crop of its own (a timm export here) and saved again by the user's
    pipeline keeps them; it came back with the registry's defaults."""
    import timm.data

    _timm_export(tmp_path / "timm", "vit_tiny_patch16_224", img_size=32, num_classes=3,
                 data_config=dict(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), crop_pct=0.77))
    loaded = zoo.from_pretrained(tmp_path / "timm")
    zoo.save_pretrained(loaded, tmp_path / "again", metadata={"note": "fine-tuned"})
    reloaded = zoo.from_pretrained(tmp_path / "again")
    assert timm.data.resolve_model_data_config(reloaded) == timm.data.resolve_model_data_config(loaded)
    assert reloaded.pretrained_cfg["mean"] == (0.1, 0.2, 0.3) and reloaded.pretrained_cfg["crop_pct"] == 0.77
    assert reloaded.zoo_pretrained_metadata["note"] == "fine-tuned"


def test_timm_hub_export_of_a_resized_maxvit_loads(tmp_path):
    """timm's save_for_hf after MaxViT's set_input_size records the partition sizes under timm's keyword names
    (transformer_window_size / _grid_size / _partition_ratio): they load, as timm reloads them (they were refused
    as unknown arguments); create_model takes those names too."""
    import timm
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    peer = timm.create_model("maxvit_rmlp_pico_rw_256", pretrained=False, img_size=64).eval()
    peer.set_input_size((96, 96))
    save_for_hf(peer, str(tmp_path), safe_serialization=True)
    assert "transformer_window_size" in json.loads((tmp_path / "config.json").read_text())["model_args"]
    x = torch.randn(1, 3, 96, 96)
    loaded = zoo.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), peer(x), atol=1e-5, rtol=1e-5)
    # resized again and saved by the zoo: its partition sizes replace timm's names for them in config.json
    loaded.set_input_size(img_size=128, window_size=2)
    zoo.save_pretrained(loaded, tmp_path / "again")
    again = zoo.from_pretrained(tmp_path / "again")
    assert (again.window_size, again.grid_size) == (loaded.window_size, loaded.grid_size) == ((2, 2), (3, 3))
    built = zoo.create_model("maxvit_rmlp_pico_rw_256", img_size=96, transformer_window_size=(3, 3),
                             transformer_grid_size=(3, 3))
    assert built.stages[0].blocks[0].attn_block.partition_size == (3, 3)
    with pytest.raises(TypeError, match="window_size given twice"):
        zoo.create_model("maxvit_rmlp_pico_rw_256", window_size=3, transformer_window_size=3)


def test_timm_hub_older_layouts_cache_folders_and_bin_weights(tmp_path):
    """What older timm releases put on the Hub: config.json without model_args (in_chans / img_size come from
    pretrained_cfg's input_size, as timm reads them), the legacy single-dict config, pytorch_model.bin instead of
    safetensors; and the Hugging Face cache folder (refs/main -> snapshots/<hash>) given as the path."""
    from safetensors.torch import load_file

    export = tmp_path / "export"
    peer = _timm_export(export, "vit_tiny_patch16_224", num_classes=4, img_size=48, in_chans=1)
    config = json.loads((export / "config.json").read_text())
    x = torch.randn(1, 1, 48, 48)
    with torch.no_grad():
        want = peer(x)
    layouts = {
        "no_model_args": {k: v for k, v in config.items() if k != "model_args"},
        "single_dict": {"architecture": config["architecture"], **config["pretrained_cfg"]},
    }
    for layout, hf_config in layouts.items():
        snapshot = tmp_path / layout / "snapshots" / "0123abcd"
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text(json.dumps(hf_config))
        torch.save(load_file(str(export / "model.safetensors")), snapshot / "pytorch_model.bin")
        (tmp_path / layout / "refs").mkdir()
        (tmp_path / layout / "refs" / "main").write_text("0123abcd")
        model = zoo.from_pretrained(tmp_path / layout).eval()  # the cache folder of the repository
        with torch.no_grad():
            torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5, msg=layout)
    (tmp_path / "single_dict" / "refs" / "main").unlink()
    (tmp_path / "single_dict" / "snapshots" / "ffff").mkdir()
    with pytest.raises(hub.CheckpointError, match="Hugging Face cache folder with 2 snapshots and no usable refs/main"):
        zoo.from_pretrained(tmp_path / "single_dict")


def test_timm_hub_config_errors(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "resnet50", "num_classes": 1000,
                                                      "pretrained_cfg": {"input_size": [3, 224, 224]}}))
    with pytest.raises(KeyError, match="resnet50"):
        zoo.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_debug", "pretrained_cfg": {"input_size": [3, 224]}}))
    with pytest.raises(hub.CheckpointError, match=r"input_size must be \[channels, height, width\], got \[3, 224\]"):
        zoo.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architecture": 5, "pretrained_cfg": {}}))
    with pytest.raises(hub.CheckpointError, match="not a timm config.json"):
        zoo.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"weights": "x"}))
    with pytest.raises(hub.CheckpointError, match="has no 'model_name'; was it written by zoo.save_pretrained"):
        zoo.from_pretrained(tmp_path)


def test_timm_weights_from_the_local_hugging_face_cache(tmp_path, monkeypatch):
    """pretrained=True finds timm's default weights for the name in the Hugging Face cache (as timm would
    download them, here put there by hand), a repository id names another tag, and nothing is downloaded: a
    repository missing from the cache says how to bring it."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("ZOO_CHECKPOINTS", str(tmp_path / "none_shipped"))
    hub_id = hub.timm_hub_id("vit_tiny_patch16_224")
    assert hub_id == "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # timm's default tag
    with pytest.raises(FileNotFoundError, match=r"no shipped checkpoint .* nor timm's timm/vit_tiny_patch16_224\..*"
                                                r"huggingface-cli download timm/vit_tiny_patch16_224\.augreg_in21k_ft_in1k"):
        zoo.create_model("vit_tiny_patch16_224", pretrained=True)
    peers = {}
    for repo, classes in ((hub_id, 3), ("timm/vit_tiny_patch16_224.other_tag", 4)):  # told apart by their heads
        snapshot = tmp_path / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots" / "abc"
        peers[repo] = _timm_export(snapshot, "vit_tiny_patch16_224", num_classes=classes, img_size=32, depth=1)
        (snapshot.parent.parent / "refs").mkdir()
        (snapshot.parent.parent / "refs" / "main").write_text("abc")
    x = torch.randn(1, 3, 32, 32)
    loaded = {hub_id: zoo.create_model("vit_tiny_patch16_224", pretrained=True),
              "timm/vit_tiny_patch16_224.other_tag": zoo.from_pretrained("hf-hub:timm/vit_tiny_patch16_224.other_tag")}
    with torch.no_grad():
        for repo, model in loaded.items():
            torch.testing.assert_close(model.eval()(x), peers[repo](x), atol=1e-5, rtol=1e-5)
        assert zoo.from_pretrained("timm/vit_tiny_patch16_224.other_tag").eval()(x).shape == (1, 4)
    with pytest.raises(FileNotFoundError, match=r"timm/vit_small_patch16_224\.x: no such file or directory, and as a "
                                                r"Hub repository it is not in the local Hugging Face cache .*huggingface-cli download"):
        zoo.from_pretrained("timm/vit_small_patch16_224.x")
    with pytest.raises(FileNotFoundError, match="pretrained checkpoint .*missing/dir/x does not exist"):
        zoo.from_pretrained(tmp_path / "missing" / "dir" / "x")


def test_hub_names_dict_labels_cache_variables_and_empty_pretrained(tmp_path, monkeypatch):
    """timm's {index: name} label_names become the class names (indices without a name keep their number); the
    cache follows huggingface_hub's older HUGGINGFACE_HUB_CACHE and expands variables; pretrained="" is refused
    (Path("") is the current directory, whose model.safetensors was loaded)."""
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_debug", "num_classes": 4,
                                                      "label_names": {"0": "ant", "1": "bee", "3": "eel"},
                                                      "pretrained_cfg": {"input_size": [3, 32, 32]}}))
    assert hub.read_config(tmp_path)["metadata"]["data"]["class_names"] == ["ant", "bee", "2", "eel"]
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "old"))
    assert hub.hf_cache_dir() == tmp_path / "old"
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE")
    monkeypatch.setenv("ZOO_TEST_ROOT", str(tmp_path))
    monkeypatch.setenv("HF_HOME", "$ZOO_TEST_ROOT/hf")
    assert hub.hf_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.chdir(tmp_path)
    zoo.save_pretrained(_tiny_vit(), tmp_path)  # a released model in the current directory
    for empty in ("", " "):
        with pytest.raises(ValueError, match="pretrained must be False, True or a checkpoint path"):
            zoo.create_model("vit_digits", pretrained=empty)


def test_zoo_release_from_the_cache_predicts_and_evaluates(tmp_path, monkeypatch):
    """A zoo-format released directory reached through a repository id or its cache folder works in zoo predict
    and zoo eval as the directory itself does (they said "does not exist" / "expected a .ckpt")."""
    import shutil

    from zoo.train import run

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    folder = tmp_path / "models--me--vit_digits"
    shutil.copytree(zoo.hub.shipped_checkpoint("vit_digits"), folder / "snapshots" / "abc")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("abc")
    want = run.predict(folder / "snapshots" / "abc", ["digits:3"], topk=2)
    assert run.predict("me/vit_digits", ["digits:3"], topk=2) == want
    assert run.predict(folder, ["digits:3"], topk=2) == want
    assert run._inference_source("me/vit_digits")[0] == run._inference_source(folder / "snapshots" / "abc")[0]


# --------------------------------------------------------------------------------------------------
# Re-saving, preprocessing records and interrupted saves (audit 2026-12-06; each failed before)
# --------------------------------------------------------------------------------------------------
def test_resaving_a_loaded_model_keeps_its_metadata(tmp_path):
    """from_pretrained -> save_pretrained (README's pattern) dropped the class names and the zoo train record,
    so zoo predict named classes 0/1/2 and preprocessed by the registry's defaults instead of training's."""
    from zoo.train import run

    model = _tiny_vit(num_classes=3)
    first = zoo.save_pretrained(model, tmp_path / "a", metadata={"data": {"class_names": ["cat", "dog", "bird"]},
                                                                  "source": "mine"})
    again = zoo.save_pretrained(zoo.from_pretrained(first), tmp_path / "b")
    meta = hub.read_config(again)["metadata"]
    assert meta["data"]["class_names"] == ["cat", "dog", "bird"] and meta["source"] == "mine"
    # a new head with another class count: the old names would be wrong, so they go
    resized = zoo.from_pretrained(first)
    resized.reset_classifier(5)
    assert "class_names" not in hub.read_config(zoo.save_pretrained(resized, tmp_path / "c"))["metadata"]["data"]
    # the shipped checkpoint re-saved predicts exactly as the original (the zoo train record is kept)
    shipped = hub.shipped_checkpoint("vit_digits")
    resaved = zoo.save_pretrained(zoo.from_pretrained(shipped), tmp_path / "shipped")
    for source in (shipped, resaved):
        model, info = run.load_for_inference(source)
        assert info["class_names"] == [str(i) for i in range(10)] if "class_names" in info else True
    assert hub.read_config(resaved)["metadata"]["zoo_config"] == hub.read_config(shipped)["metadata"]["zoo_config"]
    # create_model(pretrained=...) as from_pretrained (README's quick start saves such a model)
    quick = zoo.save_pretrained(zoo.create_model("vit_digits", pretrained=True), tmp_path / "quick")
    assert hub.read_config(quick)["metadata"]["data"]["class_names"] == [str(i) for i in range(10)]
    # weights trained after loading: the checkpoint's metrics, record and names would describe other weights
    model = zoo.create_model("vit_digits", pretrained=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(_digits_batch()).sum().backward()
    optimizer.step()
    trained = hub.read_config(zoo.save_pretrained(model, tmp_path / "trained"))["metadata"]
    assert trained == {"data": {"img_size": 8, "in_chans": 1, "mean": [0.5], "std": [0.5]},
                       "pretrained_cfg": {"crop_pct": 1.0, "crop_mode": "center", "interpolation": "bilinear"}}


def test_digits_models_record_the_preprocessing_they_were_trained_with(tmp_path):
    """The *_digits models were trained on bilinear resizes without a crop; their pretrained_cfg said timm's
    bicubic and a 0.875-0.95 crop, so timm's create_transform fed a checkpoint other pixels than training."""
    import numpy as np
    import timm.data
    from PIL import Image
    from sklearn.datasets import load_digits

    from zoo.tasks.vision.data import load_image_file

    png = tmp_path / "digit.png"
    Image.fromarray(np.round(load_digits().images[3] * 255 / 16).astype(np.uint8)).save(png)
    model = zoo.from_pretrained(hub.shipped_checkpoint("vit_digits"))
    config = timm.data.resolve_model_data_config(model)
    assert (config["crop_pct"], config["interpolation"]) == (1.0, "bilinear")
    with Image.open(png) as image:
        timm_pixels = timm.data.create_transform(**config)(image.convert("L"))
    # the same pixels, up to the one grey level that training's RGB -> grayscale rounding may move (2 / 255)
    torch.testing.assert_close(timm_pixels, load_image_file(png, 8, 1, (0.5,), (0.5,)), rtol=0, atol=2.01 / 255)
    for name in ("vit_digits", "maxvit_digits", "agent_deit_digits"):
        cfg = zoo.create_model(name).pretrained_cfg
        assert (cfg["crop_pct"], cfg["interpolation"]) == (1.0, "bilinear"), name


@pytest.mark.parametrize("name,in_chans", [("vit_debug", 1), ("vit_digits", 3), ("maxvit_debug", 1)])
def test_other_channel_counts_save_and_load(tmp_path, name, in_chans):
    """mean / std follow in_chans (a 3-value mean on a 1-channel model was saved, then refused on loading)."""
    model = zoo.create_model(name, in_chans=in_chans, **({"embed_dim": 16, "depth": 1} if name.startswith("vit") else {}))
    assert len(model.pretrained_cfg["mean"]) == len(model.pretrained_cfg["std"]) == in_chans
    loaded = zoo.from_pretrained(zoo.save_pretrained(model, tmp_path / name))
    assert loaded.pretrained_cfg["mean"] == model.pretrained_cfg["mean"]


def test_an_interrupted_resave_never_loads_a_mixed_pair(tmp_path, monkeypatch):
    """Re-saving into a checkpoint replaced its two files one after the other: a crash between them left new
    weights under the old config.json, which loaded silently with the old class names (audit 2026-12-06)."""
    target = zoo.save_pretrained(_tiny_vit(num_classes=3), tmp_path / "ckpt", metadata={"data": {"class_names": ["a", "b", "c"]}})
    before = zoo.from_pretrained(target).eval()
    # a crash while staging: the old checkpoint is whole and no temporary file is left
    import safetensors.torch

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        zoo.save_pretrained(_tiny_vit(num_classes=3, depth=1), target)
    monkeypatch.undo()
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    torch.testing.assert_close(zoo.from_pretrained(target).eval()(_digits_batch()), before(_digits_batch()))
    # a crash at each step of the swap (old config.json parked, weights renamed in, new config.json renamed in):
    # before it the old checkpoint loads; after the parking, loading says the save was interrupted
    for crash_at in (1, 2, 3):
        real_replace, calls = os.replace, []

        def crash(src, dst, crash_at=crash_at):
            calls.append(dst)
            if len(calls) == crash_at:
                raise KeyboardInterrupt
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", crash)
        with pytest.raises(KeyboardInterrupt):
            zoo.save_pretrained(_tiny_vit(num_classes=3), target, metadata={"data": {"class_names": ["x", "y", "z"]}})
        monkeypatch.undo()
        if crash_at == 1:
            torch.testing.assert_close(zoo.from_pretrained(target).eval()(_digits_batch()), before(_digits_batch()))
            continue
        with pytest.raises(hub.CheckpointError, match="save_pretrained into this directory was interrupted"):
            zoo.from_pretrained(target)
        with pytest.raises(hub.CheckpointError, match="was interrupted"):  # nor its weights alone
            zoo.create_model("vit_digits", pretrained=str(target), **TINY)
        zoo.save_pretrained(_tiny_vit(num_classes=3), target)  # saving again repairs it
        assert hub.read_config(target) is not None and not (target / hub.PARKED_CONFIG).exists()
        before = zoo.from_pretrained(target).eval()
    # a pair from two different saves (files copied across by hand): refused by the save ids
    other = zoo.save_pretrained(_tiny_vit(num_classes=3), tmp_path / "other")
    (target / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(hub.CheckpointError, match="come from two different saves"):
        zoo.from_pretrained(target)
    # weights written by hand (no save id in their header) beside a config.json: loaded, as before save ids
    from safetensors.torch import save_file

    save_file(_tiny_vit(num_classes=3).state_dict(), str(target / "model.safetensors"), metadata={"format": "pt"})
    assert zoo.from_pretrained(target).num_classes == 3


def test_two_writers_creating_one_directory_both_succeed(tmp_path, monkeypatch):
    """Every DDP rank calling save_pretrained on one new path: the directory appears between a writer's check and
    its rename. That writer replaces the files as in an existing directory (was a raw 'Directory not empty')."""
    target = tmp_path / "shared"
    real_rename, raced = os.rename, []

    def other_writer_first(src, dst):
        if str(dst) == str(target) and not raced:
            raced.append(True)
            zoo.save_pretrained(_tiny_vit(num_classes=3), target)  # the other rank, finishing first
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", other_writer_first)
    zoo.save_pretrained(_tiny_vit(num_classes=4), target)
    monkeypatch.undo()
    assert zoo.from_pretrained(target).num_classes == 4  # the last writer's pair, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"]  # no staging directory left


def test_save_pretrained_refuses_what_it_could_not_load_back(tmp_path):
    model = _tiny_vit()
    state = model.state_dict()
    state["head.weight"] = torch.zeros(3, state["head.weight"].shape[1])
    with pytest.raises(ValueError, match=r"other shapes head.weight \(3, 16\) \(model \(10, 16\)\)"):
        zoo.save_pretrained(model, tmp_path / "a", state_dict=state)
    with pytest.raises(ValueError, match="metadata holds NaN or Inf"):
        zoo.save_pretrained(model, tmp_path / "b", metadata={"loss": float("nan")})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    (tmp_path / "c" / "model.safetensors").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="model.safetensors is a directory"):
        hub.load_state_dict_file(tmp_path / "c")


def test_a_timm_training_checkpoint_loads_its_ema_weights(tmp_path):
    """timm's train.py saves {'state_dict', 'state_dict_ema', ...} as model_best.pth.tar, and timm's
    create_model(checkpoint_path=...) / load_checkpoint load the EMA weights; the zoo took 'state_dict' silently
    and refused the .pth.tar name (audit 2026-12-06)."""
    torch.manual_seed(0)
    raw, ema = _tiny_vit().state_dict(), _tiny_vit().state_dict()
    ema = {k: v + 0.5 for k, v in ema.items()}
    for name in ("model_best.pth.tar", "checkpoint-3.pth"):
        torch.save({"epoch": 3, "arch": "vit_digits", "state_dict": raw, "state_dict_ema": ema, "version": 2}, tmp_path / name)
        loaded = zoo.create_model("vit_digits", pretrained=str(tmp_path / name), **TINY).state_dict()
        assert all(torch.equal(loaded[k], ema[k]) for k in ema), name
    torch.save({"model_ema": ema}, tmp_path / "ema_only.pth")
    assert torch.equal(hub.load_state_dict_file(tmp_path / "ema_only.pth")["head.weight"], ema["head.weight"])
    assert torch.equal(hub.unwrap_state_dict({"state_dict": raw, "state_dict_ema": ema})["head.weight"], ema["head.weight"])


def test_a_checkpoint_written_by_timms_checkpoint_saver_loads(tmp_path):
    """timm's train.py writes its checkpoints with timm.utils.CheckpointSaver, which stores the run's arguments as
    an argparse.Namespace ('args'): torch.load(weights_only=True) refused the file as corrupt. timm's loader
    allows that one class (timm/models/_helpers.py _torch_load), and so does the zoo's (review rev6, finding 1)."""
    import argparse

    from timm.utils import CheckpointSaver, ModelEmaV3

    model = _tiny_vit()
    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)  # the EMA copy now differs from the raw weights
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = CheckpointSaver(model, optimizer, args=argparse.Namespace(model="vit_digits", lr=0.1), model_ema=ema,
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path), decreasing=False, max_history=1)
    saver.save_checkpoint(3, metric=0.9)
    expected = ema.module.state_dict()
    assert not torch.equal(expected["head.weight"], model.state_dict()["head.weight"])
    for name in ("model_best.pth.tar", "checkpoint-3.pth.tar"):
        loaded = zoo.create_model("vit_digits", pretrained=str(tmp_path / name), **TINY).state_dict()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), name
    # the allowance is scoped to the load: other pickled objects are still refused, and torch's default is untouched
    torch.save({"state_dict": model.state_dict(), "args": logging.getLogger("x")}, tmp_path / "other.pth")
    with pytest.raises(hub.CheckpointError, match="could not be read with torch.load"):
        hub.load_state_dict_file(tmp_path / "other.pth")
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tmp_path / "model_best.pth.tar", weights_only=True)


@pytest.mark.parametrize("name,kwargs", [
    ("vit_tiny_patch16_224", dict(img_size=32, depth=1)),
    ("maxvit_rmlp_pico_rw_256", dict(img_size=64)),
])
@pytest.mark.parametrize("in_chans", [1, 4])
def test_rgb_weights_load_into_other_channel_counts_as_timm(tmp_path, name, kwargs, in_chans, caplog):
    """A 3-channel checkpoint loaded with in_chans=1 or 4 adapts the first convolution as timm's load_pretrained
    does (adapt_input_conv: summed over RGB for 1 channel, repeated and scaled by 3 / in_chans otherwise), and
    gives timm's logits; it was refused with a shape mismatch. Another stem width is still a clear error."""
    import timm

    torch.manual_seed(0)
    source = timm.create_model(name, **kwargs)
    path = tmp_path / "rgb.pth"
    torch.save(source.state_dict(), path)
    peer = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), in_chans=in_chans,
                             **kwargs).eval()
    with caplog.at_level(logging.INFO, logger="zoo.hub"):
        ours = zoo.create_model(name, pretrained=str(path), in_chans=in_chans, **kwargs).eval()
    assert f"from 3 to {in_chans} channel(s)" in caplog.text
    x = torch.randn(2, in_chans, kwargs["img_size"], kwargs["img_size"])
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer(x), atol=1e-4, rtol=1e-4)
    if in_chans == 1:  # a grey image in the adapted model = the same image as R = G = B in the RGB model
        with torch.no_grad():
            torch.testing.assert_close(ours(x), source.eval()(x.expand(-1, 3, -1, -1)), atol=1e-4, rtol=1e-4)
    # only RGB kernels are adapted (timm's rule): a 2-channel checkpoint into 4 channels is named as a mismatch
    torch.save(timm.create_model(name, in_chans=2, **kwargs).state_dict(), tmp_path / "two.pth")
    with pytest.raises(hub.CheckpointError, match=r"shape mismatches .*\(\d+, 2, \d+, \d+\) vs model \(\d+, 4,"):
        zoo.create_model(name, pretrained=str(tmp_path / "two.pth"), in_chans=4, **kwargs)


def test_a_compiled_model_saves_and_loads_like_the_model_inside(tmp_path):
    """torch.compile wraps a model in an OptimizedModule whose state_dict keys start with _orig_mod.:
    save_pretrained wrote them as they were and from_pretrained refused its own directory; a .safetensors file of
    such keys was refused too (.pth files were already unwrapped). timm's load_checkpoint strips the prefix from
    both (timm.models._helpers.clean_state_dict), also nested with DDP's module. in either order."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = zoo.create_model("vit_debug").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    compiled = torch.compile(model, backend="eager")  # only wrapped: nothing is compiled here
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    directory = zoo.save_pretrained(compiled, tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(zoo.from_pretrained(directory).eval()(x), want, rtol=0, atol=0)
    for prefix in ("_orig_mod.", "module._orig_mod.", "_orig_mod.module."):
        path = tmp_path / f"{prefix.replace('.', '_')}.safetensors"
        save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        loaded = zoo.create_model("vit_debug", pretrained=str(path)).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), want, rtol=0, atol=0)


# the tags whose timm pretrained cfg differs from the architecture's default: head size and preprocessing
TIMM_TAGS = ["vit_tiny_patch16_224.augreg_in21k", "vit_base_patch16_clip_224.openai", "vit_small_patch16_224.dino",
             "vit_base_patch16_224.mae"]


@pytest.mark.parametrize("tagged", TIMM_TAGS)
def test_tagged_name_without_weights_builds_as_timm(tagged):
    """create_model("<arch>.<tag>", pretrained=False) builds what timm.create_model builds for that tag: the tag's
    class count (0 for the head-less .dino / .mae towers, 21843 for .augreg_in21k, 512 for .openai) and its data
    config, so the tag's weights load strictly into it; the caller's arguments still win over the tag's."""
    import timm
    from timm.data import resolve_model_data_config

    peer = timm.create_model(tagged, pretrained=False, depth=1).eval()
    ours = zoo.create_model(tagged, depth=1).eval()
    tag_cfg = timm.models.get_pretrained_cfg(tagged).to_dict()
    assert ours.num_classes == peer.num_classes == tag_cfg["num_classes"]
    assert resolve_model_data_config(ours) == resolve_model_data_config(peer)
    for key in ("input_size", "num_classes", "mean", "std", "interpolation", "crop_pct", "crop_mode"):
        assert ours.pretrained_cfg[key] == peer.pretrained_cfg[key], key
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in peer.state_dict().items()}
    ours.load_state_dict(peer.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer(x), rtol=1e-5, atol=1e-5)
    mine = zoo.create_model(tagged, depth=1, num_classes=5)
    assert mine.num_classes == timm.create_model(tagged, depth=1, num_classes=5).num_classes == 5
    assert mine.pretrained_cfg["num_classes"] == 5 and mine.pretrained_cfg["mean"] == tag_cfg["mean"]


def test_tagged_name_with_a_weights_file_and_unknown_tags(tmp_path):
    """A tag's head-less weights (timm's .dino tower) load from a bare file into the tagged name; into the
    untagged name (a 1000-class head) they are an error that says what to pass. A tag timm does not know is an
    error naming the known ones."""
    import timm

    peer = timm.create_model("vit_small_patch16_224.dino", depth=1).eval()
    torch.save(peer.state_dict(), tmp_path / "dino.pth")
    ours = zoo.create_model("vit_small_patch16_224.dino", pretrained=str(tmp_path / "dino.pth"), depth=1).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(hub.CheckpointError, match=r"dino\.pth: the checkpoint has no classifier but the model has "
                                                  r"classifier \{'head\.bias': \(1000,\), 'head\.weight': \(1000, 384\)\} "
                                                  r"\(num_classes=1000\), and no class count was asked for: pass "
                                                  r"num_classes=0 for no head"):
        zoo.create_model("vit_small_patch16_224", pretrained=str(tmp_path / "dino.pth"), depth=1)
    with pytest.raises(ValueError, match=r"timm has no pretrained tag 'bogus' for 'vit_small_patch16_224' "
                                         r"\(its tags: .*dino.*\); use one of them"):
        zoo.create_model("vit_small_patch16_224.bogus", depth=1)


def test_save_refuses_preprocessing_its_loader_would_refuse(tmp_path):
    """save_pretrained wrote what from_pretrained then refused (a 3-value mean for a 1-channel model), and took a
    std of 0 (NaN inputs at predict time) and 2 class names for 10 classes (zoo predict labelled the rest by
    index); the loader refuses the last two in a hand-written config.json too."""
    import json

    model = zoo.create_model("vit_debug", in_chans=1, num_classes=10)
    bad = {"mean": [0.1, 0.2, 0.3]}, {"std": [0.0]}, {"class_names": ["zero", "one"]}
    messages = "has 3 values for a model of 1 input channels", "std' must be positive", "2 names for 10 classes"
    for data, message in zip(bad, messages):
        with pytest.raises(ValueError, match=message):
            zoo.save_pretrained(model, tmp_path / "bad", metadata={"data": data})
        assert not (tmp_path / "bad").exists()
    good = tmp_path / "good"
    zoo.save_pretrained(model, good, metadata={"data": {"class_names": [str(i) for i in range(10)]}})
    zoo.create_model("vit_debug", pretrained=str(good), in_chans=1)
    original = (good / "config.json").read_text()
    for data, message in zip(bad[1:], messages[1:]):
        config = json.loads(original)
        config["metadata"]["data"].update(data)
        (good / "config.json").write_text(json.dumps(config))
        with pytest.raises(hub.CheckpointError, match=message):
            zoo.create_model("vit_debug", pretrained=str(good), in_chans=1)


def test_weights_with_a_save_id_beside_a_config_without_one_are_refused(tmp_path):
    """A config.json from before save ids (the released checkpoints) beside a model.safetensors from another
    save_pretrained call loaded silently: zoo eval reported 0.81 under a config.json that said 0.99."""
    import json
    import shutil

    released = hub.shipped_checkpoints_dir() / "vit_digits"
    mixed = tmp_path / "mixed"
    shutil.copytree(released, mixed)
    zoo.create_model("vit_digits", pretrained=str(mixed))  # as released: no ids on either side
    other = tmp_path / "other"
    zoo.save_pretrained(zoo.create_model("vit_digits", pretrained=str(mixed)), other)
    shutil.copy(other / "model.safetensors", mixed / "model.safetensors")
    assert json.loads((mixed / "config.json").read_text()).get("save_id") is None
    with pytest.raises(hub.CheckpointError, match="records no save id, so they come from two different saves"):
        zoo.create_model("vit_digits", pretrained=str(mixed))


def test_urls_are_refused_with_what_to_do_instead(tmp_path, monkeypatch):
    """A URL given as pretrained= was reported as a missing local file with its "//" collapsed by Path
    ("pretrained checkpoint https:/huggingface.co/... does not exist"). It is now named as the URL it is: nothing is
    downloaded; a Hugging Face model page gives its hf-hub:<repo> form and whether the local cache holds it (the
    cached repository then loads under that form); any other URL says to download the file and pass its path."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    repo = "timm/vit_tiny_patch16_224.augreg_in21k"
    for url in (f"https://huggingface.co/{repo}", f"https://huggingface.co/{repo}/tree/main",
                f"https://huggingface.co/{repo}/resolve/main/model.safetensors", f"http://hf.co/{repo}"):
        with pytest.raises(ValueError) as info:
            zoo.create_model("vit_tiny_patch16_224", pretrained=url)
        message = str(info.value)
        assert message.startswith(f"pretrained={url} is a Hugging Face Hub address, and the zoo never downloads: give "
                                  f"the repository as pretrained=hf-hub:{repo}, which reads the local Hugging Face cache; "
                                  f"it is not in your cache ({tmp_path})"), message
        assert f"huggingface-cli download {repo}" in message and "https:/h" not in message
    with pytest.raises(ValueError, match=r"^pretrained=https://example\.org/w\.safetensors is a URL, and the zoo reads "
                                         r"local files only \(nothing is downloaded\): download the checkpoint yourself "
                                         r"and pass its path, pretrained=<local path>$"):
        zoo.from_pretrained("https://example.org/w.safetensors")
    with pytest.raises(ValueError, match=r"^pretrained=https://huggingface\.co/datasets/a/b is a URL"):
        zoo.from_pretrained("https://huggingface.co/datasets/a/b")  # a data set, not a model repository
    import shutil

    folder = tmp_path / "models--me--vit_digits"  # once cached, the message says so and hf-hub: loads it
    shutil.copytree(zoo.hub.shipped_checkpoint("vit_digits"), folder / "snapshots" / "abc")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("abc")
    with pytest.raises(ValueError, match=r"give the repository as pretrained=hf-hub:me/vit_digits, which reads the "
                                         r"local Hugging Face cache; it is in your cache"):
        zoo.from_pretrained("https://huggingface.co/me/vit_digits")
    assert zoo.from_pretrained("hf-hub:me/vit_digits").num_classes == 10


def test_other_url_schemes_are_named_and_local_paths_are_not():
    """s3://, gs:// and file:// read as missing local files with their "//" collapsed ("file:/tmp/x does not exist");
    file:// names the path to give instead. Local paths with ':' or '//' and hf-hub: ids are not URLs."""
    for url, message in (("s3://bucket/w.safetensors", r"^pretrained=s3://bucket/w\.safetensors is a s3:// address, and "
                                                       r"the zoo reads local files only"),
                         ("gs://b/x.pth", r"^pretrained=gs://b/x\.pth is a gs:// address"),
                         ("file:///tmp/w.safetensors", r"^pretrained=file:///tmp/w\.safetensors is a file:// URL: give "
                                                       r"the local path itself, pretrained=/tmp/w\.safetensors$")):
        with pytest.raises(ValueError, match=message):
            hub.refuse_url(url, "pretrained")
        with pytest.raises(ValueError, match=message):
            zoo.create_model("vit_debug", pretrained=url)
    for local in ("./a//b.safetensors", "C:/weights/w.pth", "hf-hub:timm/vit_tiny_patch16_224", "dir:with:colons"):
        hub.refuse_url(local, "pretrained")  # not a URL: the loaders name what is wrong with it


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoints_path_of_a_shipped_card_loads_from_any_working_directory(tmp_path, monkeypatch):
    # README / `zoo train --help` write model.pretrained=checkpoints/<card>, relative to the source tree; elsewhere
    # it must name the packaged card (as the CLI's ckpt= does), not a Hub repository "checkpoints/<card>"
    monkeypatch.setenv("ZOO_CHECKPOINTS", str(tmp_path / "shipped"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    model = _tiny_vit()
    zoo.save_pretrained(model, tmp_path / "shipped" / "vit_digits")
    monkeypatch.chdir(tmp_path / "shipped")  # a working directory without checkpoints/
    assert _same_weights(zoo.create_model("vit_digits", pretrained="checkpoints/vit_digits"), model)
    assert _same_weights(zoo.from_pretrained("checkpoints/vit_digits"), model)
    # a card that is not shipped is still looked for as a Hub repository
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        zoo.create_model("vit_digits", pretrained="checkpoints/no_such_card")


def test_from_pretrained_takes_a_shipped_name_as_create_model_pretrained_true_does(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CHECKPOINTS", str(tmp_path / "shipped"))
    monkeypatch.chdir(tmp_path)
    model = _tiny_vit()
    zoo.save_pretrained(model, tmp_path / "shipped" / "vit_digits")
    debug = zoo.create_model("vit_debug", **TINY)
    zoo.save_pretrained(debug, tmp_path / "shipped" / "debug_experiment")  # a card named after its experiment
    assert _same_weights(zoo.from_pretrained("vit_digits"), zoo.create_model("vit_digits", pretrained=True))
    assert _same_weights(zoo.from_pretrained("vit_digits"), model)
    assert _same_weights(zoo.from_pretrained("vit_debug"), debug)
    assert _same_weights(zoo.from_pretrained("debug_experiment"), debug)
    with pytest.raises(FileNotFoundError, match="pretrained checkpoint no_such_model does not exist"):
        zoo.from_pretrained("no_such_model")


def _suggested_call(message: str) -> str:
    import re

    found = re.search(r"zoo\.create_model\(.*?\)(?=, or )", message)
    assert found, message
    return found.group(0)


def test_from_pretrained_reads_a_run_directory_and_gives_a_working_call_for_a_ckpt(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = zoo.create_model("vit_debug", num_classes=3, **TINY)  # constructor arguments the call must carry
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("name: test\n")  # what zoo train writes first
    with pytest.raises(hub.CheckpointError, match="neither released/ nor .*it has written no weights yet"):
        zoo.from_pretrained(run)
    # a Lightning checkpoint as zoo train's module writes it (zoo/train/module.py): weights under model.
    ckpt = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"model_name": "vit_debug", "model_args": dict(model.zoo_model_args),
                                 "zoo_config": {}}}
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    for given in (run, run / "checkpoints" / "last.ckpt", "run", "run/checkpoints/last.ckpt"):
        with pytest.raises(hub.CheckpointError) as refused:
            zoo.from_pretrained(given)
        call = _suggested_call(str(refused.value))
        assert "'vit_debug'" in call and "last.ckpt" in call
        assert _same_weights(eval(call, {"zoo": zoo}), model), call  # the suggested call works
    # a finished run: its released/ is what from_pretrained reads
    zoo.save_pretrained(model, run / "released")
    for given in (run, "run"):
        assert _same_weights(zoo.from_pretrained(given), model)
    # a .ckpt whose hyper-parameters cannot be read still gets a call, with a placeholder for the name
    torch.save({"state_dict": ckpt["state_dict"]}, tmp_path / "bare.ckpt")
    with pytest.raises(hub.CheckpointError, match=r"zoo\.create_model\(<model name>, pretrained='bare\.ckpt'\)"):
        zoo.from_pretrained("bare.ckpt")
    with pytest.raises(hub.CheckpointError) as refused:
        zoo.from_pretrained("bare.ckpt")
    call = _suggested_call(str(refused.value)).replace("<model name>", "'vit_debug'")
    call = call.replace("pretrained='bare.ckpt'", "pretrained='bare.ckpt', num_classes=3, **TINY")
    assert _same_weights(eval(call, {"zoo": zoo, "TINY": TINY}), model), call


def test_from_pretrained_suggests_create_model_only_for_a_directory_holding_weights(tmp_path):
    model = _tiny_vit()
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(hub.CheckpointError, match="holds no weights file"):
        zoo.from_pretrained(bare)  # the suggested create_model(pretrained=<this directory>) would fail
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bare / hub.WEIGHTS_NAME))
    with pytest.raises(hub.CheckpointError) as refused:
        zoo.from_pretrained(bare)
    import re

    call = re.search(r"zoo\.create_model\(<name>, pretrained='[^']*'\)", str(refused.value)).group(0)
    call = call.replace("<name>", "'vit_digits'").replace(")", ", **TINY)")
    assert _same_weights(eval(call, {"zoo": zoo, "TINY": TINY}), model), call


def test_a_headed_checkpoint_loads_as_a_headless_backbone_and_the_reverse(tmp_path, caplog):
    """num_classes=0 on a checkpoint with a trained head gives the backbone (timm's idiom for a feature extractor:
    its load_pretrained drops the classifier tensors when the class count differs); a checkpoint without a head
    loaded with num_classes=5 gets a new head on the checkpoint's backbone. Checked against timm on a timm export."""
    import timm

    torch.manual_seed(0)
    headed = zoo.create_model("vit_debug", num_classes=5).eval()
    zoo.save_pretrained(headed, tmp_path / "headed")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want_B_C = headed.forward_head(headed.forward_features(images), pre_logits=True)
    saved = headed.state_dict()
    loads = {"create_model": lambda: zoo.create_model("vit_debug", pretrained=str(tmp_path / "headed"), num_classes=0),
             "from_pretrained": lambda: zoo.from_pretrained(tmp_path / "headed", num_classes=0)}
    for how, load in loads.items():
        with caplog.at_level(logging.INFO):
            backbone = load().eval()
        assert backbone.num_classes == 0, how
        own = backbone.state_dict()
        assert sorted(own) == sorted(k for k in saved if not k.startswith("head.")), how
        for key, tensor in own.items():
            assert torch.equal(tensor, saved[key]), (how, key)
        with torch.no_grad():
            torch.testing.assert_close(backbone(images), want_B_C, atol=1e-5, rtol=1e-5, msg=how)

    # the reverse: no head in the checkpoint, a 5-class head asked for
    zoo.save_pretrained(backbone, tmp_path / "headless")
    torch.manual_seed(1)
    rehead = zoo.from_pretrained(tmp_path / "headless", num_classes=5).eval()
    assert rehead.num_classes == 5 and tuple(rehead.head.weight.shape)[0] == 5
    for key, tensor in backbone.state_dict().items():
        assert torch.equal(rehead.state_dict()[key], tensor), key
    with torch.no_grad():
        torch.testing.assert_close(rehead.forward_head(rehead.forward_features(images), pre_logits=True), want_B_C,
                                   atol=1e-5, rtol=1e-5)
        assert rehead(images).shape == (2, 5)

    # timm's behaviour on its own export: the same backbone features either way
    peer = _timm_export(tmp_path / "timm", "vit_tiny_patch16_224", num_classes=5, img_size=32, depth=1)
    file = str(tmp_path / "timm" / "model.safetensors")
    timm_backbone = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0, img_size=32, depth=1,
                                      pretrained_cfg_overlay=dict(file=file)).eval()
    zoo_backbone = zoo.from_pretrained(tmp_path / "timm", num_classes=0).eval()
    with torch.no_grad():
        want = peer.forward_head(peer.forward_features(images), pre_logits=True)
        torch.testing.assert_close(timm_backbone(images), want, atol=1e-6, rtol=1e-6)  # the reference agrees
        torch.testing.assert_close(zoo_backbone(images), want, atol=1e-5, rtol=1e-5)


def test_a_cache_folder_with_two_snapshots_loads_the_one_refs_main_names(tmp_path, monkeypatch):
    """A Hugging Face cache folder of a repository that was updated holds several snapshots; refs/main names the
    current one, as huggingface_hub resolves it (try_to_load_from_cache, no download)."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    folder = tmp_path / "hub" / "models--someone--tiny"
    models = {}
    old, new = "0" * 40, "f" * 40  # commit hashes, as huggingface_hub names snapshots
    for revision, classes in ((old, 3), (new, 4)):  # told apart by their weights and heads
        torch.manual_seed(classes)
        models[revision] = zoo.create_model("vit_debug", num_classes=classes, depth=1).eval()
        zoo.save_pretrained(models[revision], folder / "snapshots" / revision)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(new)
    reference = huggingface_hub.try_to_load_from_cache("someone/tiny", "config.json", cache_dir=str(tmp_path / "hub"))
    assert reference is not None and os.path.dirname(reference) == str(folder / "snapshots" / new)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = models[new](images)
        for given in (folder, "hf-hub:someone/tiny", "someone/tiny"):
            torch.testing.assert_close(zoo.from_pretrained(given).eval()(images), want, atol=0, rtol=0, msg=str(given))


def test_timm_config_num_classes_is_read_in_timms_order(tmp_path):
    """A timm config.json whose top-level num_classes disagrees with pretrained_cfg's (hand-edited): timm's
    _parse_model_cfg lets the top level win; so does the zoo."""
    from timm.models._hub import load_model_config_from_path

    _timm_export(tmp_path, "vit_tiny_patch16_224", num_classes=5, img_size=32, depth=1)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_classes"] = 5
    config["pretrained_cfg"]["num_classes"] = 1000
    config["model_args"].pop("num_classes", None)  # as older exports (model_args would decide otherwise)
    (tmp_path / "config.json").write_text(json.dumps(config))
    timm_cfg, _, _ = load_model_config_from_path(tmp_path)
    assert timm_cfg["num_classes"] == 5
    assert zoo.from_pretrained(tmp_path).num_classes == 5


def test_a_wrapper_prefix_is_stripped_only_when_every_key_has_it(tmp_path):
    """DDP's module. / Lightning's model. are wrapper prefixes only when on every key; a key without the prefix is
    never cut (timm's clean_state_dict leaves such keys as they are)."""
    from timm.models._helpers import clean_state_dict

    tensor = torch.zeros(2)
    for keys in (["model.x", "head.weight"], ["module.blocks.0.w", "head.weight"]):
        torch.save({k: tensor for k in keys}, tmp_path / "w.pth")
        loaded = hub.load_state_dict_file(tmp_path / "w.pth")
        assert sorted(loaded) == sorted(keys)
        assert "head.weight" in clean_state_dict({k: tensor for k in keys})  # timm keeps it too
    torch.save({"module.a": tensor, "module.b": tensor}, tmp_path / "w.pth")
    assert sorted(hub.load_state_dict_file(tmp_path / "w.pth")) == sorted(clean_state_dict({"module.a": 0, "module.b": 0}))


def test_a_run_record_without_crop_settings_evaluates_uncropped():
    """A zoo train record from before data.crop_pct existed comes from a run that evaluated without a crop (a
    bilinear resize to the input size): crop_pct 1.0, as timm's resolve_data_config then passes on."""
    from timm.data import resolve_data_config

    model = zoo.create_model("vit_debug")
    hub.apply_training_preprocessing(model, {"mean": [0.1, 0.2, 0.3], "std": [1.0, 2.0, 3.0]})
    cfg = model.pretrained_cfg
    assert (cfg["crop_pct"], cfg["crop_mode"], cfg["interpolation"]) == (1.0, "center", "bilinear")
    assert cfg["mean"] == (0.1, 0.2, 0.3) and cfg["std"] == (1.0, 2.0, 3.0)
    timm_cfg = resolve_data_config({}, model=model)
    assert timm_cfg["crop_pct"] == 1.0 and timm_cfg["interpolation"] == "bilinear"


def test_a_zoo_train_ckpt_read_as_weights_is_its_ema_copy(tmp_path):
    """A zoo train .ckpt read as bare weights (create_model(pretrained=<.ckpt>), load_state_dict_file) gives the EMA
    average (``model_ema.module.*``), what the run evaluates and releases, else the raw ``model.*``; other entries
    of the LightningModule (loss modules) are left out. Hand-built checkpoints, so that the two copies differ."""
    raw, ema, loss = torch.zeros(2, 3), torch.ones(2, 3), torch.full((1,), 7.0)
    torch.save({"state_dict": {"model.w": raw, "model_ema.module.w": ema, "criterion.weight": loss}, "epoch": 1},
               tmp_path / "with_ema.ckpt")
    torch.save({"state_dict": {"model.w": raw, "criterion.weight": loss}}, tmp_path / "no_ema.ckpt")
    with_ema = hub.load_state_dict_file(tmp_path / "with_ema.ckpt")
    assert list(with_ema) == ["w"] and torch.equal(with_ema["w"], ema)
    no_ema = hub.load_state_dict_file(tmp_path / "no_ema.ckpt")
    assert list(no_ema) == ["w"] and torch.equal(no_ema["w"], raw)


@pytest.mark.parametrize("fixed", [True, False])
def test_a_timm_config_sets_img_size_only_for_a_fixed_input_size_as_timm_does(tmp_path, fixed):
    """timm builds a model from its config.json with img_size = pretrained_cfg.input_size[1:] only when
    pretrained_cfg.fixed_input_size is true (timm/models/_builder.py _update_default_model_kwargs); in_chans
    always. The zoo's reading of the same file passes the same constructor arguments (timm is the reference)."""
    from timm.models._builder import _update_default_model_kwargs

    pretrained_cfg = {"input_size": [3, 48, 40], "fixed_input_size": fixed, "num_classes": 10,
                      "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    (tmp_path / "config.json").write_text(json.dumps(
        {"architecture": "vit_tiny_patch16_224", "num_classes": 10, "pretrained_cfg": pretrained_cfg}))
    expected: dict = {}
    _update_default_model_kwargs(dict(pretrained_cfg), expected, None)
    args = hub.read_config(tmp_path)["model_args"]
    assert ("img_size" in args) == ("img_size" in expected) == fixed
    if fixed:
        assert list(args["img_size"]) == list(expected["img_size"]) == [48, 40]
    assert args["in_chans"] == expected["in_chans"] == 3


def test_a_checkpoint_saved_under_a_deprecated_name_loads_as_its_new_model(tmp_path, monkeypatch, caplog):
    """config.json written under a name since renamed (DEPRECATED_MODEL_NAMES old -> new) is the new model's own
    checkpoint: no "loading them into" warning, and the repair of a head reset before saving (config.json's
    num_classes over the recorded arguments) runs as for the current name (review of the hub audit, 2026-12-07:
    the comparison used the raw old name, so that checkpoint failed with a classifier shape error)."""
    from zoo import registry

    monkeypatch.setitem(registry.DEPRECATED_MODEL_NAMES, "vit_debug_old", "vit_debug")
    torch.manual_seed(0)
    model = zoo.create_model("vit_debug", num_classes=3)
    zoo.save_pretrained(model, tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    config["model_name"] = "vit_debug_old"
    config["model_args"].pop("num_classes", None)  # saved by a zoo that did not record the reset head
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="zoo"), pytest.warns(FutureWarning, match="'vit_debug_old' is deprecated"):
        loaded = zoo.from_pretrained(tmp_path / "c")
    assert loaded.num_classes == 3 and "loading them into" not in caplog.text
    assert "a head reset before it was saved" in caplog.text
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_mistyped_local_path_is_reported_as_one(tmp_path, monkeypatch):
    """"checkpoints/vit_digitz" (its folder exists here) used to be reported as a Hub repository missing from the
    cache, with `huggingface-cli download checkpoints/vit_digitz` as advice; it names the close local entries, and
    hf-hub: still means the Hub."""
    (tmp_path / "checkpoints" / "vit_digits").mkdir(parents=True)
    (tmp_path / "checkpoints" / "maxvit_digits").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match=r"checkpoints/vit_digitz: no such file or directory \(checkpoints "
                                                r"exists: did you mean checkpoints/vit_digits"):
        zoo.from_pretrained("checkpoints/vit_digitz")
    with pytest.raises(FileNotFoundError, match="huggingface-cli download checkpoints/vit_digitz"):
        zoo.from_pretrained("hf-hub:checkpoints/vit_digitz")


def test_from_pretrained_takes_device_and_dtype_as_create_model_does(tmp_path):
    """from_pretrained(dtype=...) / (device=...) reached the constructor and were refused as unknown arguments of
    VisionTransformer (review rev6, finding 4)."""
    torch.manual_seed(0)
    saved = zoo.save_pretrained(zoo.create_model("vit_debug", num_classes=3), tmp_path / "ckpt")
    reference = zoo.create_model("vit_debug", pretrained=str(saved), num_classes=3)
    half = zoo.from_pretrained(saved, dtype=torch.float16, device="cpu")
    assert {p.dtype for p in half.parameters()} == {torch.float16} and half.pos_embed.device.type == "cpu"
    assert torch.equal(half.pos_embed, reference.pos_embed.half())
    assert "dtype" not in half.zoo_model_args and "device" not in half.zoo_model_args
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        zoo.from_pretrained(saved, dtype=torch.int8)
    with pytest.raises(ValueError, match="device='meta' builds a model without storage"):
        zoo.from_pretrained(saved, device="meta")


def test_loading_inside_a_meta_device_block_is_refused_as_device_meta_is(tmp_path):
    """Under `with torch.device("meta")` from_pretrained / create_model(pretrained=...) returned a model without its
    weights (torch's load_state_dict into meta tensors is a no-op); device="meta" was refused. Saving a meta model
    failed with safetensors' "Cannot copy out of meta tensor" (review rev6, finding 5)."""
    saved = zoo.save_pretrained(zoo.create_model("vit_debug"), tmp_path / "ckpt")
    advice = "builds a model without storage, so pretrained weights cannot be loaded into it: build it on meta"
    with torch.device("meta"):
        with pytest.raises(ValueError, match=advice):
            zoo.from_pretrained(saved)
        with pytest.raises(ValueError, match=advice):
            zoo.create_model("vit_debug", pretrained=str(saved))
        empty = zoo.create_model("vit_debug")  # without weights to load, a meta model is what was asked for
    assert empty.pos_embed.is_meta
    with pytest.raises(ValueError, match=r"save_pretrained: vit_debug has weights on the meta device.*cls_token, "
                                         r"pos_embed.*to_empty"):
        zoo.save_pretrained(empty, tmp_path / "meta")
    assert not (tmp_path / "meta").exists()


def test_a_null_model_args_in_config_json_names_the_file(tmp_path):
    """"model_args": null passed read_config and failed later with a bare "'NoneType' object is not iterable"
    (review rev6, finding 7). A null metadata is read as none, as it always was."""
    saved = zoo.save_pretrained(zoo.create_model("vit_debug"), tmp_path / "ckpt")
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "metadata": None}))
    assert zoo.from_pretrained(saved).zoo_model_name == "vit_debug"
    (saved / "config.json").write_text(json.dumps({**config, "model_args": None}))
    with pytest.raises(hub.CheckpointError, match=r"ckpt/config.json: 'model_args' must be an object \({}"
                                                  r" for none\), got null"):
        zoo.from_pretrained(saved)


def test_an_interrupted_resave_names_the_rename_that_restores_a_whole_checkpoint(tmp_path, monkeypatch):
    """The interrupted re-save message said only "save the model again", also when the files left hold a whole
    checkpoint (review rev6, finding 8): the parked config.json beside the weights not yet replaced, or, after a
    kill once the weights were swapped, the new config.json still staged under its temporary name."""
    import pathlib

    old_model, new_model = _tiny_vit(num_classes=3), _tiny_vit(num_classes=3, depth=1)
    target = zoo.save_pretrained(old_model, tmp_path / "ckpt")
    x = _digits_batch()

    def interrupted_save(crash_at: int, keep_staged: bool = False) -> None:
        real_replace, calls = os.replace, []

        def crash(src, dst):
            calls.append(dst)
            if len(calls) == crash_at:
                raise KeyboardInterrupt
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", crash)
        if keep_staged:  # a kill runs no clean-up: the staged files stay
            monkeypatch.setattr(pathlib.Path, "unlink", lambda self, missing_ok=False: None)
        with pytest.raises(KeyboardInterrupt):
            zoo.save_pretrained(new_model, target)
        monkeypatch.undo()

    def restore(error) -> None:
        command = re.search(r"`mv (\S+) (\S+)`", str(error.value))
        assert command is not None, error.value
        assert command.group(2) == str(target / "config.json")
        os.replace(command.group(1), command.group(2))
        for leftover in target.glob(".*"):  # what the user removes after restoring
            leftover.unlink()

    # stopped before the weights moved: the parked config.json and the weights are the old checkpoint
    interrupted_save(crash_at=2)
    with pytest.raises(hub.CheckpointError, match=r"\.config\.json\.replaced and model\.safetensors are one save") as error:
        zoo.from_pretrained(target)
    restore(error)
    with torch.no_grad():
        torch.testing.assert_close(zoo.from_pretrained(target).eval()(x), old_model.eval()(x))
    # killed after the weights moved: the staged new config.json and the weights are the new checkpoint
    interrupted_save(crash_at=3, keep_staged=True)
    with pytest.raises(hub.CheckpointError, match=r"\.config\.json\.\w+\.tmp and model\.safetensors are one save") as error:
        zoo.from_pretrained(target)
    restore(error)
    with torch.no_grad():
        torch.testing.assert_close(zoo.from_pretrained(target).eval()(x), new_model.eval()(x))
    # interrupted after the weights moved, its staged config.json removed: nothing matches, save again
    interrupted_save(crash_at=3)
    with pytest.raises(hub.CheckpointError, match="no config.json left there matches model.safetensors's save id, so "
                                                  "save the model again") as error:
        zoo.from_pretrained(target)
    assert "mv " not in str(error.value)


def test_tensors_sharing_memory_in_any_way_are_saved_as_copies(tmp_path):
    """save_pretrained copied only exact aliases (same storage, offset and shape); a persistent buffer that is an
    overlapping view of a parameter reached safetensors' "Some tensors share memory" error (review rev6, finding 9).
    Tied weights, overlapping views and disjoint views of one flat buffer all round-trip now."""
    torch.manual_seed(0)
    model = zoo.create_model("vit_debug")
    model.register_buffer("pe_view", model.pos_embed.data[:, 1:], persistent=True)  # overlaps pos_embed
    model.register_buffer("pe_tied", model.pos_embed.data, persistent=True)  # an exact alias
    saved = zoo.save_pretrained(model, tmp_path / "views")
    from safetensors.torch import load_file

    stored = load_file(str(saved / "model.safetensors"))
    for key in ("pos_embed", "pe_view", "pe_tied"):
        assert torch.equal(stored[key], getattr(model, key)), key
    state = model.state_dict()
    del state["pe_view"], state["pe_tied"]
    flat = torch.cat([v.reshape(-1) for v in state.values()])  # an EMA kept as views of one flat buffer
    views, offset = {}, 0
    for key, value in state.items():
        views[key] = flat[offset:offset + value.numel()].view(value.shape)
        offset += value.numel()
    plain = zoo.create_model("vit_debug")
    zoo.save_pretrained(plain, tmp_path / "flat", state_dict=views)
    loaded = zoo.from_pretrained(tmp_path / "flat").state_dict()
    assert all(torch.equal(loaded[k], views[k]) for k in views)


def test_a_checkpoint_of_another_channel_count_names_the_in_chans_to_use():
    """The 1-channel digits checkpoint loaded into a model built for 3 channels: only RGB kernels convert (timm's
    adapt_input_conv), so the refusal says which in_chans the checkpoint takes (it listed the shapes only)."""
    with pytest.raises(hub.CheckpointError, match=r"the input convolution patch_embed.proj.weight takes 1 channel\(s\) "
                                              r"in the checkpoint and 3 in the model: build the model with in_chans=1"):
        zoo.create_model("vit_digits", pretrained=True, in_chans=3)
    rgb = zoo.create_model("vit_debug")
    with pytest.raises(hub.CheckpointError) as refused:  # another kernel size: no channel hint
        hub.load_weights(zoo.create_model("vit_debug", patch_size=4, img_size=32), rgb.state_dict())
    assert "input convolution" not in str(refused.value)
