"""The `zoo` CLI and the Hydra configs: composing from the installed package, train -> eval -> predict ->
viz end to end on a tiny run, dispatch tables, help texts and clear errors."""
from __future__ import annotations

import importlib.resources
import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from zoo import cli
from zoo.train import run

from conftest import FAST_RUN

ROOT = Path(__file__).resolve().parents[1]


def test_configs_come_from_the_installed_package(tmp_path, monkeypatch):
    root = importlib.resources.files("zoo.configs")
    for group in ("task", "model", "data", "trainer", "logger", "callbacks", "experiment", "debug"):
        assert root.joinpath(group).is_dir(), group
    monkeypatch.chdir(tmp_path)  # nothing relative to the working directory
    cfg = run.compose(["experiment=vit_digits"])
    assert cfg.model.name == "vit_digits" and cfg.model._target_ == "zoo.create_model"
    assert cfg.data._target_ == "zoo.tasks.vision.data.DigitsDataModule"
    assert cfg.task._target_ == "zoo.tasks.vision.module.ImageClassifier"
    assert cfg.trainer.max_epochs == 250 and cfg.data.augment == "shift" and cfg.model.drop_path_rate == 0.1
    assert {"csv", "tensorboard"} <= set(cfg.logger)
    ddp = run.compose(["experiment=vit_digits", "trainer=ddp_cpu"])
    assert ddp.trainer.strategy.process_group_backend == "gloo" and ddp.trainer.devices == 2
    fast = run.compose(["experiment=vit_digits", "debug=fast"])
    assert fast.trainer.limit_train_batches == 2 and "progress_bar" not in fast.callbacks


def test_bad_overrides_are_clear(capsys):
    """One line each: a misspelt option names the closest ones and the list (Hydra's message ran to 15 lines with
    its config search path); a misspelt key says what +key would do instead of suggesting it."""
    with pytest.raises(ValueError, match=r"^unknown experiment=no_such_experiment: \(experiment options: agent_digits, "):
        run.compose(["experiment=no_such_experiment"])
    with pytest.raises(ValueError, match="not of the form key=value"):
        run.compose(["vit_digits"])
    assert cli.main(["train", "experiment=vit_digit"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("zoo train: error: unknown experiment=vit_digit: did you mean vit_digits")
    assert "Config search path" not in err and err.count("\n") == 2
    assert cli.main(["train", "model=nope"]) == 1
    assert "zoo train: error: unknown model=nope: (model options: agent_digits, gat, gatv2" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"^unknown config key 'task\.lrr' .* \+task\.lrr=\.\.\. would add it as a new key"):
        run.compose(["experiment=vit_digits", "task.lrr=1"])


def test_first_mistakes_of_a_timm_user_name_the_fix(capsys, tmp_path):
    """model=vit_tiny_patch16_224 (a registered name given as a config option) listed the model configs with an
    empty hint; an image folder under experiment=vit_digits said "augment must be ... got 'shift'", a value the user
    never typed (the digits experiment's). Both now say what to give (audit 2026-12-07)."""
    from zoo.tasks.vision.data import ImageFolderDataModule

    assert cli.main(["train", "model=vit_tiny_patch16_224"]) == 1
    assert ("unknown model=vit_tiny_patch16_224: vit_tiny_patch16_224 is a registered model: give model=zoo "
            "model.name=vit_tiny_patch16_224") in capsys.readouterr().err
    assert cli.main(["train", "model=vit_tiny_patch16_22"]) == 1  # not a registered name: the options only
    assert "registered model" not in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"^ImageFolderDataModule: data\.augment must be 'none', 'standard' or "
                                         r"'crop', got 'shift' \(set by the experiment for the digits: give "
                                         r"data\.augment=crop or standard with this data\)$"):
        ImageFolderDataModule(root=str(tmp_path), augment="shift")


def test_help_texts(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "predict", "list", "bench", "viz", "export"):
        assert f"  {command}" in out
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "ckpt_path" in out
    # the options group=option can name, read from the installed configs
    options = dict(line.strip().split(": ", 1) for line in out.split("Options (zoo.configs):")[1].strip().splitlines())
    from pathlib import Path

    configs = Path(zoo.__file__).resolve().parents[1] / "configs"
    for group in ("experiment", "model", "data", "task", "trainer", "logger", "callbacks", "debug"):  # every group
        expected = sorted(p.stem for p in (configs / group).glob("*.yaml"))
        assert options[group].split(", ") == expected, group
    assert cli.main(["viz"]) == 2 and "rollout" in capsys.readouterr().out
    assert cli.main(["train", "experiment=vit_digits", "trainer.max_epochs=7", "--cfg"]) == 0
    printed = capsys.readouterr().out
    assert "max_epochs: 7" in printed and "name: vit_digits" in printed
    assert cli.main(["train", "--cfg", "job", "experiment=vit_digits"]) == 0  # Hydra's spelling of --cfg
    assert "name: vit_digits" in capsys.readouterr().out
    assert "num_threads" in out.split("Top-level keys:")[1]
    with pytest.raises(SystemExit, match="unknown command 'trian'"):
        cli.main(["trian"])
    import importlib.metadata

    assert cli.main(["--version"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"zoo {zoo.__version__}"
    assert f"torch {importlib.metadata.version('torch')}" in lines and f"timm {importlib.metadata.version('timm')}" in lines
    assert lines[-1].startswith("device: ")


def test_train_eval_predict_viz_end_to_end(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli.main(["train", *FAST_RUN, f"run_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    assert "last checkpoint" in out and "released weights" in out
    for path in ("config.yaml", "checkpoints/last.ckpt", "checkpoints/best.ckpt", "csv/metrics.csv", "released/model.safetensors",
                 "released/config.json", "metrics.json"):
        assert (run_dir / path).is_file(), path
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    # eval of the .ckpt and of the released directory reproduce the test metrics of the run
    assert cli.main(["eval", f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test/acc1"] == pytest.approx(metrics["test/acc1"], abs=1e-6)
    released = run.evaluate(run_dir / "released")
    assert released["test/loss"] == pytest.approx(metrics["test/loss"], abs=1e-5)
    # predict: digits, an image file and a folder; probabilities match the model's own softmax
    folder = tmp_path / "pictures"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    assert cli.main(["predict", f"ckpt={run_dir / 'released'}", "input=digits:3", f"input={folder}", "json=true"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["input"] for r in results] == ["digits:3", str(folder / "p0.png"), str(folder / "p1.png")]
    assert all(len(r["top"]) == 5 for r in results)
    model = zoo.from_pretrained(run_dir / "released").eval()
    from sklearn.datasets import load_digits

    x = (torch.tensor(load_digits().images[3], dtype=torch.float32)[None, None] / 16.0 - 0.5) / 0.5
    probs = model(x).softmax(-1)[0]
    top = probs.topk(5)
    assert [name for name, _ in results[0]["top"]] == [str(int(i)) for i in top.indices]
    assert [p for _, p in results[0]["top"]] == pytest.approx(top.values.tolist(), abs=1e-6)
    # a zoo train .ckpt read as weights is the EMA copy (what eval and export use)
    from zoo import hub

    ema = hub.load_state_dict_file(run_dir / "checkpoints" / "last.ckpt")
    assert all(torch.equal(ema[k], v) for k, v in model.state_dict().items())
    # the same prediction from the .ckpt
    from_ckpt = run.predict(run_dir / "checkpoints" / "last.ckpt", ["digits:3"])
    assert [n for n, _ in from_ckpt[0]["top"]] == [n for n, _ in results[0]["top"]]
    assert [p for _, p in from_ckpt[0]["top"]] == pytest.approx([p for _, p in results[0]["top"]], abs=1e-6)
    assert cli.main(["predict", f"ckpt={run_dir / 'released'}", "input=digits:3"]) == 0
    assert "top-5 predictions" in capsys.readouterr().out
    # the attention-rollout picture of the demo, through the viz table
    png = tmp_path / "rollout.png"
    assert cli.main(["viz", "rollout", f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", f"out={png}"]) == 0
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_and_predict_errors(tmp_path, capsys):
    assert cli.main(["eval", f"ckpt={tmp_path / 'missing.ckpt'}"]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "broken.ckpt").write_bytes(b"garbage")
    assert cli.main(["eval", f"ckpt={tmp_path / 'broken.ckpt'}"]) == 1
    assert "cannot read training checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="ckpt=<checkpoint> and input="):
        cli.main(["predict", "input=digits:0"])
    with pytest.raises(SystemExit, match="unknown argument 'image'"):
        cli.main(["predict", "ckpt=x", "image=y"])


def test_predict_on_a_timm_hub_export_uses_timms_evaluation_transform(tmp_path, capsys):
    """A released directory without a zoo train record (here timm's own Hub export, with its label names and a
    fine-tuning crop / interpolation of its own) predicts with timm's evaluation transform of that config: the
    probabilities equal timm's model fed through timm's pipeline."""
    import timm.data
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    peer = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3, depth=2).eval()
    save_for_hf(peer, str(tmp_path / "export"), safe_serialization=True, model_config={"label_names": ["ant", "bee", "cat"]},
                data_config=dict(crop_pct=0.75, interpolation="bilinear", mean=(0.4, 0.5, 0.6)))
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 57, 3), dtype=np.uint8))
    picture.save(tmp_path / "photo.png")
    exported = json.loads((tmp_path / "export" / "config.json").read_text())["pretrained_cfg"]
    transform = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=exported))
    with torch.no_grad():
        want = peer(transform(picture)[None]).softmax(-1)[0]
    (result,) = run.predict(tmp_path / "export", [str(tmp_path / "photo.png")], topk=3)
    got = {name: prob for name, prob in result["top"]}
    assert got == pytest.approx(dict(zip(["ant", "bee", "cat"], want.tolist())), abs=1e-6)
    assert cli.main(["predict", f"ckpt={tmp_path / 'export'}", f"input={tmp_path / 'photo.png'}", "topk=1"]) == 0
    assert max(got, key=got.get) in capsys.readouterr().out
    # digits:N goes through the same transform, as that digit saved as an 8-bit picture (it skipped the transform)
    from sklearn.datasets import load_digits

    digit = Image.fromarray((load_digits().images[7] * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
    with torch.no_grad():
        want = peer(transform(digit.convert("RGB"))[None]).softmax(-1)[0]
    (result,) = run.predict(tmp_path / "export", ["digits:7"], topk=3)
    assert dict(result["top"]) == pytest.approx(dict(zip(["ant", "bee", "cat"], want.tolist())), abs=1e-6)
    # an ImageNet head without label names in its config: timm's ImageNet class descriptions, as timm's inference
    imagenet = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=1000, depth=1).eval()
    save_for_hf(imagenet, str(tmp_path / "in1k"), safe_serialization=True)
    transform = timm.data.create_transform(**timm.data.resolve_data_config(
        pretrained_cfg=json.loads((tmp_path / "in1k" / "config.json").read_text())["pretrained_cfg"]))
    with torch.no_grad():
        best = int(imagenet(transform(picture)[None]).argmax())
    (result,) = run.predict(tmp_path / "in1k", [str(tmp_path / "photo.png")], topk=1)
    assert result["top"][0][0] == timm.data.ImageNetInfo("imagenet-1k").index_to_description(best)
    # a feature backbone (no classifier) has no classes to print: refused, not a softmax over its features
    zoo.save_pretrained(zoo.create_model("vit_debug", num_classes=0), tmp_path / "headless")
    with pytest.raises(ValueError, match=r"has no classifier \(num_classes=0"):
        run.predict(tmp_path / "headless", [str(tmp_path / "photo.png")])


@pytest.fixture(scope="module")
def karate_run(tmp_path_factory) -> Path:
    """A 2-epoch graph_karate run (checkpoint and released directory of a graph model)."""
    run_dir = tmp_path_factory.mktemp("karate") / "run"
    assert cli.main(["train", "experiment=graph_karate", "callbacks=minimal", "logger=none", "num_threads=1",
                     "trainer.max_epochs=2", "trainer.enable_model_summary=false", f"run_dir={run_dir}"]) == 0
    return run_dir


def _digits_test_folder(root: Path, names=None) -> Path:
    """The embedded digits' fixed test split written as root/test/<class>/*.png (8 bit, as a user's files are)."""
    from sklearn.datasets import load_digits

    from zoo.tasks.vision.data import digits_splits

    digits = load_digits()
    for i in digits_splits()["test"]:
        label = int(digits.target[i])
        folder = root / "test" / (names[label] if names else str(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(digits.images[i] * 255 / 16).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def test_eval_on_another_data_config(tmp_path, capsys):
    """zoo eval data=image_folder scores a checkpoint on the user's files with the run's preprocessing (size,
    channels, normalisation, class count): the shipped ViT on the digits' test split written as PNG files scores
    what it scores on the embedded tensors (the card's 98.61%), to within the one image 8-bit rounding may move."""
    ckpt = str(ROOT / "checkpoints" / "vit_digits")
    embedded = run.evaluate(ckpt)["test/acc1"]
    folder = _digits_test_folder(tmp_path / "pngs")  # test/ only: an evaluation set
    assert cli.main(["eval", f"ckpt={ckpt}", "data=image_folder", f"data.root={folder}", "data.num_workers=0"]) == 0
    captured = capsys.readouterr()
    assert abs(json.loads(captured.out)["test/acc1"] - embedded) <= 1 / 360 + 1e-6 and embedded > 0.98
    assert "warning" not in captured.err
    # other class names: scored by position, with a warning naming both lists
    renamed = _digits_test_folder(tmp_path / "renamed", names=[f"digit_{k}" for k in range(10)])
    assert cli.main(["eval", f"ckpt={ckpt}", "data=image_folder", f"data.root={renamed}", "data.num_workers=0"]) == 0
    assert "trained on classes [0, 1, 2, 3, 4, 5, ... (10)], this data has [digit_0, digit_1" in capsys.readouterr().err
    # another class count, another domain, an unknown group, a missing root
    for child in list((renamed / "test").iterdir())[:3]:
        for file in child.iterdir():
            file.unlink()
        child.rmdir()
    assert cli.main(["eval", f"ckpt={ckpt}", "data=image_folder", f"data.root={renamed}"]) == 1
    assert "data.num_classes=10 but ImageFolderDataModule found 7 classes" in capsys.readouterr().err
    assert cli.main(["eval", f"ckpt={ckpt}", "data=graph_karate"]) == 1
    assert ("data=graph_karate is zoo.tasks.graph (node model) data, but the checkpoint's model was trained on "
            "zoo.tasks.vision data") in capsys.readouterr().err
    assert cli.main(["eval", f"ckpt={ckpt}", "data=imagefolder"]) == 1
    assert "data=imagefolder: no such data config (options: cifar10, cifar100, digits," in capsys.readouterr().err
    assert cli.main(["eval", f"ckpt={ckpt}", "data=image_folder"]) == 1
    assert "data.root is required" in capsys.readouterr().err
    # a root with only test/ cannot train
    from zoo.tasks.vision.data import ImageFolderDataModule

    with pytest.raises(FileNotFoundError, match="train does not exist"):
        ImageFolderDataModule(str(folder), mean=(0.5,), std=(0.5,)).setup("fit")


def test_eval_refuses_unknown_keys_and_model_overrides(karate_run, capsys):
    ckpt = f"ckpt={karate_run / 'checkpoints' / 'last.ckpt'}"
    assert cli.main(["eval", ckpt, "data.nam=sbm"]) == 1
    err = capsys.readouterr().err
    assert "unknown key data.nam (data keys: batch_size, inference_batch_size, model_kind, name, num_classes, num_features, num_neighbors, num_workers, replace, root, seed)" in err
    assert cli.main(["eval", ckpt, "model.heads=2"]) == 1
    assert "model.* cannot be overridden in eval (the model comes from the checkpoint)" in capsys.readouterr().err
    assert cli.main(["eval", ckpt, "dat.root=x"]) == 1
    assert "unknown key dat.root (top-level keys: callbacks, ckpt_path, data," in capsys.readouterr().err
    assert cli.main(["eval", ckpt, "+data.seed=0"]) == 1
    assert "+data.seed: eval overrides set keys of the stored run config (key=value); Hydra's '+'" in capsys.readouterr().err
    assert cli.main(["eval", ckpt, "data.seed=0"]) == 0  # an existing key still works
    assert 0.0 <= json.loads(capsys.readouterr().out)["test/acc1"] <= 1.0


def test_commands_refuse_a_graph_model_where_a_vision_one_is_needed(karate_run, capsys):
    for ckpt in (karate_run / "released", karate_run / "checkpoints" / "last.ckpt"):
        with pytest.raises(SystemExit, match=r"zoo viz rollout needs a vision transformer \(ViT\); .* holds gatv2_node, "
                                             r"a graph model \(zoo viz graph"):
            cli.main(["viz", "rollout", f"ckpt={ckpt}", "out=unused.png"])
        assert cli.main(["predict", f"ckpt={ckpt}", "input=digits:0"]) == 1
        assert "zoo predict classifies images; " in capsys.readouterr().err
    with pytest.raises(SystemExit, match="zoo export needs a vision model .* holds gatv2_node, a graph model"):
        cli.main(["export", f"ckpt={karate_run / 'released'}"])


def test_bad_train_options_are_one_line(tmp_path, capsys):
    """Lightning's MisconfigurationException is a user error too (one line, no traceback)."""
    base = ["train", "experiment=graph_karate", "debug=fast", f"run_dir={tmp_path / 'run'}"]
    for extra, message in ((["trainer.max_epochs=abc"], "trainer.max_epochs must be an integer"),
                           (["trainer.devices=0"], "devices=0"),
                           (["data=graph_planetoid"], "data.root is required: a folder holding Cora/raw/")):
        assert cli.main([*base, *extra]) == 1
        err = capsys.readouterr().err
        assert "zoo train: error: " in err and message in err and "Traceback" not in err


def test_early_stopping_on_a_metric_the_run_does_not_log_is_one_line(tmp_path, capsys):
    """EarlyStopping monitoring a metric the task never logs (graph_node logs no val/loss): Lightning raises a plain
    RuntimeError at the first validation, which ended zoo train in a 40-line traceback, where the same mistake in the
    checkpoint callback's monitor is one line (audit 2026-12-06). Now one line naming the config key and the logged
    metrics; a RuntimeError with the same text raised elsewhere is not taken for it."""
    overrides = ["train", "experiment=graph_karate", "debug=fast", "logger=none", f"run_dir={tmp_path / 'run'}",
                 "+callbacks.early_stopping._target_=lightning.pytorch.callbacks.EarlyStopping",
                 "+callbacks.early_stopping.monitor=val/loss"]
    assert cli.main(overrides) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 2, err  # the error line and the ZOO_DEBUG hint
    assert err.startswith("zoo train: error: callbacks.early_stopping.monitor='val/loss' is not a metric this run "
                          "logs"), err
    assert "val/acc1" in err.split("logged at step 1: ")[1]
    with pytest.raises(ValueError, match=r"^callbacks\.early_stopping\.monitor='val/loss' is not a metric"):
        run.train(run.compose([*overrides[1:-2], f"run_dir={tmp_path / 'api'}",
                               "+callbacks.early_stopping._target_=lightning.pytorch.callbacks.EarlyStopping",
                               "+callbacks.early_stopping.monitor=val/loss"]))

    def elsewhere():
        raise RuntimeError("Early stopping conditioned on metric `val/loss` which is not available. Pass in ...")

    with pytest.raises(RuntimeError) as raised:
        elsewhere()
    assert run._early_stopping_monitor_error(raised.value, run.compose(overrides[1:]), None) is None


def test_checkpoint_monitor_not_logged_and_a_callback_without_target_are_one_line(tmp_path, capsys):
    """A checkpoint monitor the run does not log gave Lightning's own line (no config key; epoch and step listed as
    metrics); an added callback entry without _target_ (+callbacks.early_stopping.monitor=val/loss alone, as the
    docs spelled it) was skipped without a word, so the run trained without early stopping."""
    common = ["train", "experiment=graph_karate", "debug=fast", "logger=none"]
    assert cli.main([*common, f"run_dir={tmp_path / 'a'}", "callbacks.best_checkpoint.monitor=val/acc"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("zoo train: error: callbacks.best_checkpoint.monitor='val/acc' is not a metric this run "
                          "logs, so the best checkpoint has nothing to compare (logged at step 1: "), err
    assert "val/acc1" in err and "'epoch'" not in err and ", epoch" not in err and ", step" not in err
    assert cli.main([*common, f"run_dir={tmp_path / 'b'}", "+callbacks.early_stopping.monitor=val/loss"]) == 1
    assert capsys.readouterr().err.startswith(
        "zoo train: error: callbacks.early_stopping has no _target_, so nothing would be built from it: give the "
        "class too, e.g. +callbacks.early_stopping._target_=lightning.pytorch.callbacks.EarlyStopping")
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_train_help_sweep_examples_are_valid_shell():
    """The sweep example of `zoo train --help` was a bash syntax error as printed (`seed=range(0,3)` unquoted, as the
    usage line's `[KEY=range(0,3)]`; README and docs/training.md quote it). Every override that calls a sweep
    function is quoted, and the example lines parse in bash."""
    import shutil
    import subprocess

    calls = [token.strip("[]().,;") for token in cli.TRAIN_HELP.split() if re.search(r"=\w+\(", token)]
    assert len(calls) >= 2 and all(call.startswith("'") and call.endswith("'") for call in calls), calls
    examples = [line.split("e.g. ", 1)[-1].split("  #")[0] for line in cli.TRAIN_HELP.splitlines()
                if "zoo train -m " in line and "usage" not in line]
    assert examples
    if shutil.which("bash") is None:
        pytest.skip("no bash to parse the examples")
    for example in examples:
        checked = subprocess.run(["bash", "-n", "-c", example], capture_output=True, text=True)
        assert checked.returncode == 0, (example, checked.stderr)


def test_option_values_are_checked_and_named(monkeypatch, capsys):
    assert cli.main(["predict", "ckpt=unused", "input=digits:0", "topk=-2"]) == 1
    assert "topk must be a positive integer, got -2" in capsys.readouterr().err
    assert cli.main(["predict", "ckpt=unused", "input=digits:0", "topk=0"]) == 1
    assert "topk must be a positive integer, got 0" in capsys.readouterr().err
    # refused before the checkpoint is read (it used to load the model and the data first)
    assert cli.main(["eval", "ckpt=unused", "split=train"]) == 1
    assert "split must be 'test' or 'val', got 'train'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown task 'grph' for --task \\(did you mean 'graph'\\?\\); tasks: .*graph.*vision"):
        cli.main(["list", "--task", "grph"])
    bench = ["bench", "graph", "--channels", "2", "--no-memory", "--repeats", "1"]
    with pytest.raises(SystemExit, match="--sizes items are EDGES:NODES, both integers >= 1, got '10:0'"):
        cli.main([*bench, "--sizes", "10:0"])
    with pytest.raises(SystemExit, match="--channels must be a comma list of integers >= 1, got 'abc'"):
        cli.main(["bench", "graph", "--sizes", "10:5", "--channels", "abc"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda needs a CUDA GPU and none is available"):
            cli.main([*bench, "--sizes", "10:5", "--device", "cuda"])
    for arg, message in (("batch=abc", "batch must be an integer, got 'abc'"),
                         ("opset=abc", "opset must be an integer, got 'abc'"),
                         ("atol=abc", "atol must be a number, got 'abc'"),
                         ("atol=-1", "atol must be a positive finite number, got -1.0"),
                         ("check=maybe", "check must be true or false"),
                         ("opst=17", "unknown key 'opst': did you mean 'opset'?")):
        assert cli.main(["export", "model=vit_debug", arg]) == 1
        assert message in capsys.readouterr().err


def test_list_command(capsys):
    assert cli.main(["list", "vit_digits", "vit_debug"]) == 0
    out = capsys.readouterr().out
    assert "vit_digits" in out and "vit_debug" in out and "1x8x8" in out
    assert cli.main(["list", "--json", "vit_d*"]) == 0
    assert json.loads(capsys.readouterr().out) == zoo.list_models("vit_d*")
    assert cli.main(["list", "no_such_model_*"]) == 1


def test_dispatch_tables(monkeypatch, capsys):
    assert cli.VIZ_COMMANDS == {
        "rollout": "zoo.tasks.vision.viz:rollout_main",
        "maxvit": "zoo.tasks.vision.viz_maxvit:maxvit_main",
        "agent": "zoo.tasks.vision.viz_agent:agent_main",
        "graph": "zoo.tasks.graph.viz:main",
        "mask": "zoo.mask_viz:mask_main",
    }
    with pytest.raises(SystemExit, match="unknown kind 'heatmap'"):
        cli.main(["viz", "heatmap"])
    monkeypatch.setitem(cli.VIZ_COMMANDS, "missing_fn", "zoo.tasks.vision.viz:no_such_main")
    with pytest.raises(SystemExit, match="has no no_such_main"):
        cli.main(["viz", "missing_fn"])
    monkeypatch.setitem(cli.VIZ_COMMANDS, "missing_module", "zoo.tasks.no_such_module:main")
    with pytest.raises(SystemExit, match="zoo.tasks.no_such_module is not available"):
        cli.main(["viz", "missing_module"])
    calls = []
    import zoo.bench  # noqa: F401  (the parent package must be imported for zoo.bench.fakebench to resolve)

    fake = type(__import__("sys"))("zoo.bench.fakebench")
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(__import__("sys").modules, "zoo.bench.fakebench", fake)
    monkeypatch.setattr(cli, "_bench_names", lambda: ["fakebench"])
    assert cli.main(["bench", "fakebench", "--repeats", "3"]) == 0
    assert calls == [["--repeats", "3"]]
    with pytest.raises(SystemExit, match="unknown benchmark 'nope'"):
        cli.main(["bench", "nope"])
    if importlib.util.find_spec("zoo.export") is None:
        with pytest.raises(SystemExit, match="zoo export: zoo.export is not available"):
            cli.main(["export"])


def test_configs_work_from_a_built_package(tmp_path):
    """Build the packages as an installation would lay them out (setup.py build_py: zoo/, zoo/tasks, zoo/configs
    with the yaml package data) and compose + list from there, in a process that cannot see the source tree."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    build = tmp_path / "site"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(build), "build", "--build-base", str(tmp_path / "b")],
                   cwd=repo, check=True, capture_output=True)
    assert (build / "zoo" / "configs" / "experiment" / "vit_digits.yaml").is_file()
    # the shipped checkpoints install as package data, so pretrained=True works without the source tree
    assert (build / "zoo" / "checkpoints" / "vit_digits" / "model.safetensors").is_file()
    code = ("import zoo, zoo.configs; from zoo.train import run; from zoo import hub; "
            "assert zoo.configs.__file__.startswith(%r), zoo.configs.__file__; "
            "cfg = run.compose(['experiment=vit_digits', 'trainer=ddp_cpu']); "
            "print(cfg.model.name, cfg.trainer.strategy.process_group_backend); "
            "print(hub.shipped_checkpoints_dir()); "
            "m = zoo.create_model('vit_digits', pretrained=True); print(type(m).__name__)") % str(build)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(build), "PATH": "/usr/bin:/bin"},
                         check=True, capture_output=True, text=True).stdout
    assert out.split() == ["vit_digits", "gloo", str(build / "zoo" / "checkpoints"), "VisionTransformer"]


def test_model_and_data_of_different_domains_are_named(tmp_path, capsys):
    """A graph model on image data (or the reverse) used to stop at omegaconf's "Interpolation key
    'data.model_kind' not found"."""
    for args, message in ((["model=gatv2"], "model gatv2 reads data.model_kind, which data DigitsDataModule does not"),
                          (["experiment=graph_karate", "model=vit_debug"], "model vit_debug reads data.img_size, which data karate")):
        assert cli.main(["train", *args, "debug=fast", f"run_dir={tmp_path / 'run'}"]) == 1
        err = capsys.readouterr().err
        assert message in err and "graph models (model=gat|gatv2|transformer) need graph data" in err


def test_worker_errors_and_file_errors_are_one_line(tmp_path, capsys, monkeypatch):
    """A ValueError raised in a DataLoader worker (a corrupt image in an image folder) reached the user with the
    worker's whole traceback; an out= path under a file was a FileExistsError traceback."""
    from torch.utils.data import DataLoader, Dataset

    from zoo import cli

    class Broken(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            raise ValueError("/data/train/a/bad.png is not a readable image: cannot identify image file")

    with pytest.raises(ValueError) as caught:
        next(iter(DataLoader(Broken(), num_workers=1)))
    assert "Original Traceback" in str(caught.value)
    assert cli._one_line(caught.value) == "/data/train/a/bad.png is not a readable image: cannot identify image file"
    (tmp_path / "afile").write_text("")
    monkeypatch.delenv("ZOO_DEBUG", raising=False)
    # an output under a file: refused as the argument it is, before drawing (it was a FileExistsError from mkdir)
    assert cli.main(["viz", "rollout", "ckpt=checkpoints/vit_digits", f"out={tmp_path / 'afile' / 'x.png'}"]) == 2
    err = capsys.readouterr().err
    assert "zoo viz rollout: error: out=" in err and "afile is a file" in err and "Traceback" not in err


def test_predict_table_keeps_long_paths_when_piped_and_json_is_a_switch(tmp_path, capsys):
    """Piped or redirected, Rich's 80-column table cut every long input path to the same prefix (rows could not
    be told apart); json=maybe was taken as false."""
    from zoo import cli

    folder = tmp_path / "a_rather_long_folder_name_for_the_images_to_predict" / "subfolder"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(folder / f"image_number_{i}.png")
    assert cli.main(["predict", "ckpt=checkpoints/vit_digits", f"input={folder}", "topk=4"]) == 0
    out = capsys.readouterr().out
    for i in range(2):
        assert str(folder / f"image_number_{i}.png") in out
    with pytest.raises(SystemExit, match="json must be true or false, got 'maybe'"):
        cli.main(["predict", "ckpt=checkpoints/vit_digits", "input=digits:1", "json=maybe"])


def test_list_without_a_match_says_so(capsys):
    """zoo list 'nonexist*' printed an empty table titled "0 registered models"."""
    from zoo import cli

    assert cli.main(["list", "vit_tiny_patch16_2*4x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("zoo list: no model matches vit_tiny_patch16_2*4x; close names: vit_tiny_patch16_224")
    assert cli.main(["list", "nonexist*"]) == 1
    assert "zoo list: no model matches nonexist*; zoo list shows them all" in capsys.readouterr().err


def test_image_folder_class_count_is_read_from_the_folders(tmp_path, capsys):
    """data=image_folder without data.num_classes was refused ("data.num_classes is required: the number of class
    folders under <data.root>/train"), though that number is on disk: it is counted, and said."""
    for split in ("train", "test"):
        for name in ("cat", "dog", "eel"):
            (tmp_path / split / name).mkdir(parents=True)
    cfg = run.compose(["experiment=vit_digits", "data=image_folder", f"data.root={tmp_path}", "data.img_size=8",
                       "data.in_chans=1"])
    run.check_required(cfg)
    assert cfg.data.num_classes == 3 and cfg.model.num_classes == 3
    assert f"zoo: data.num_classes=3 (the class folders under {tmp_path / 'train'})" in capsys.readouterr().err
    # a wrong or empty root: what to put where (it was "data.num_classes is required", which hid the real problem)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    for root, problem in ((tmp_path / "nowhere", "does not exist"), (tmp_path / "train", "has no train/, val/ or test/"),
                          (tmp_path / "empty", "has no class folders")):
        missing = run.compose(["experiment=vit_digits", "data=image_folder", f"data.root={root}"])
        with pytest.raises(FileNotFoundError, match=f"ImageFolder data: .*{problem}.*Put the images as {root}/train/"):
            run.check_required(missing)


def test_overrides_that_need_hydras_app_runner_say_what_to_do_instead():
    """zoo train composes with Hydra's compose API: hydra.* settings (hydra.run.dir=...) were accepted and silently
    ignored, sweeps were refused as "not of the form key=value" or with the first line of Hydra's message only, and
    Hydra's ~key deletion was refused."""
    with pytest.raises(ValueError, match=r"hydra\.\* settings have no effect.*run_dir="):
        run.compose(["experiment=vit_digits", "hydra.run.dir=/tmp/somewhere"])
    with pytest.raises(ValueError, match=r"composes one config; a sweep is zoo train -m"):
        run.compose(["--multirun", "experiment=vit_digits"])
    with pytest.raises(ValueError, match=r"seed=1,2 is a sweep .* add -m \(zoo train -m \.\.\.\) to run one job per value; a list is key=\[a,b\]"):
        run.compose(["experiment=vit_digits", "seed=1,2"])
    cfg = run.compose(["experiment=vit_digits", "~task.mixup_alpha"])  # Hydra's deletion
    assert "mixup_alpha" not in cfg.task and "lr" in cfg.task


@pytest.mark.parametrize("overrides,use", [
    (["task=graph_node"], "task=classification"),
    (["experiment=graph_karate", "task=classification"], "task=graph_node"),
    (["experiment=graph_synthetic", "task=graph_node"], "task=graph_classification"),
    (["experiment=graph_dictlookup", "task=graph_node"], "task=graph_dictlookup"),
])
def test_a_task_for_another_kind_of_data_is_refused_with_the_task_to_use(overrides, use):
    """A task paired with the other kind of data failed in its first training step ("list indices must be
    integers or slices, not str", "too many values to unpack (expected 2)")."""
    cfg = run.compose(overrides)
    with pytest.raises(ValueError, match=f"does not train on data .*: with this data use {use}"):
        run.check_required(cfg)


@pytest.mark.parametrize("experiment", ["vit_digits", "graph_karate", "graph_sbm", "graph_synthetic",
                                        "graph_dictlookup"])
def test_debug_fast_validates_its_one_epoch(experiment):
    """debug=fast checks that a config runs end to end: the graph experiments validate every 5-10 epochs, so its
    one epoch ran no validation (no val metrics, no best.ckpt)."""
    cfg = run.compose([f"experiment={experiment}", "debug=fast"])
    assert cfg.trainer.max_epochs == 1 and cfg.trainer.check_val_every_n_epoch == 1
    run.check_required(cfg)


def test_train_help_examples_build(tmp_path, monkeypatch):
    """Each `zoo train` example of `zoo train --help` composes and builds (the image-folder fine-tuning one failed:
    the digits' augment=shift and a 1-channel 8-pixel checkpoint against the folder's 3-channel 224 defaults)."""
    for name in ("cat", "dog", "eel"):
        (tmp_path / "train" / name).mkdir(parents=True)
    monkeypatch.chdir(Path(zoo.__file__).resolve().parents[1])  # checkpoints/vit_digits is relative to the repository
    text = cli.TRAIN_HELP.replace("\\\n", " ")
    examples = [line.split("#")[0].split()[2:] for line in text.splitlines() if line.strip().startswith("zoo train ")]
    assert len(examples) >= 5
    for args in examples:
        args = [a.replace("=DIR", f"={tmp_path}") for a in args if not a.startswith(("ckpt_path=", "run_dir="))]
        cfg = run.compose(args)
        run.check_required(cfg)
        run.build(cfg)


@pytest.mark.parametrize("experiment", ["vit_digits", "maxvit_digits", "agent_digits", "graph_karate", "graph_sbm",
                                        "graph_synthetic", "graph_dictlookup"])
def test_debug_overfit_builds_for_every_experiment(experiment):
    """debug=overfit set data.augment and task.label_smoothing / warmup_epochs, keys only the image data and task
    have: every graph experiment failed ("unknown key data.augment", "unexpected keyword argument 'augment'").
    Those settings now come with the image data options only (configs/debug_data/overfit_<data>.yaml)."""
    cfg = run.compose([f"experiment={experiment}", "debug=overfit"])
    assert cfg.trainer.overfit_batches == 4 and cfg.trainer.check_val_every_n_epoch == 1
    if experiment.endswith("_digits"):
        assert cfg.data.augment == "none" and cfg.task.label_smoothing == 0 and cfg.task.warmup_epochs == 0
    else:
        assert "augment" not in cfg.data and "label_smoothing" not in cfg.task
    run.check_required(cfg)
    run.build(cfg)


def test_eval_takes_the_trainer_settings_it_can_honour(monkeypatch):
    """zoo eval replaced the run's trainer settings with its own (all batches, one device) even when the user gave
    them: trainer.limit_test_batches=1 evaluated every batch, silently. Now given limits are used, and the
    multi-device settings are refused with a reason."""
    made = []
    build_trainer = run._trainer
    monkeypatch.setattr(run, "_trainer", lambda *a, **k: made.append(build_trainer(*a, **k)) or made[-1])
    checkpoint = Path(zoo.__file__).resolve().parents[1] / "checkpoints" / "vit_digits"
    run.evaluate(checkpoint, ["trainer.limit_test_batches=1", "data.eval_batch_size=50"])
    assert made[-1].num_test_batches == [1]
    run.evaluate(checkpoint, ["data.eval_batch_size=50"])
    assert made[-1].num_test_batches == [8]  # 360 test images, all of them
    with pytest.raises(ValueError, match="trainer.devices: zoo eval evaluates on one device"):
        run.evaluate(checkpoint, ["trainer.devices=2"])


def test_predict_reads_folders_as_image_folder_does(tmp_path, capsys):
    """zoo predict input=<folder> listed files with rglob: images in symlinked folders were silently left out
    (torchvision's ImageFolder, which zoo eval and training use, follows them), and a folder named x.png stopped
    the run as an unreadable image. Empty input= classified everything under the working directory."""
    from PIL import Image

    ckpt = Path(zoo.__file__).resolve().parents[1] / "checkpoints" / "vit_digits"
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "data" / "a" / "one.png")
    Image.fromarray(np.full((8, 8), 200, dtype=np.uint8)).save(tmp_path / "elsewhere" / "two.png")
    (tmp_path / "data" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "data" / "loop").symlink_to(tmp_path / "data", target_is_directory=True)  # a loop ends
    (tmp_path / "data" / "dir.png").mkdir()
    results = run.predict(ckpt, [str(tmp_path / "data")])
    assert sorted(Path(r["input"]).name for r in results) == ["one.png", "two.png"]
    for bad, message in (("input=", "input= is empty"), ("input= ", "input= is empty")):
        assert cli.main(["predict", f"ckpt={ckpt}", bad]) == 1
        assert message in capsys.readouterr().err
    assert cli.main(["predict", "ckpt=", "input=digits:0"]) == 1
    assert "ckpt= is empty" in capsys.readouterr().err


def test_oversized_images_and_bad_devices_are_one_line_errors(tmp_path, capsys, monkeypatch):
    """A file over Pillow's pixel limit (DecompressionBombError, not an OSError) and device=foo / device=cuda on a
    machine without one ended in tracebacks."""
    from PIL import Image

    ckpt = Path(zoo.__file__).resolve().parents[1] / "checkpoints" / "vit_digits"
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels is then past twice the limit
    assert cli.main(["predict", f"ckpt={ckpt}", f"input={tmp_path / 'big.png'}"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "larger than Pillow's limit for one image" in err.splitlines()[0]
    monkeypatch.undo()
    for device, message in (("foo", "device='foo' is not a device"), ("cuda:7", "no such CUDA device here")):
        for kind in ("rollout", "maxvit", "agent"):
            assert cli.main(["viz", kind, f"ckpt={ckpt.parent / ('vit_digits' if kind == 'rollout' else kind + '_digits')}",
                             f"device={device}", f"out={tmp_path / 'x.png'}"]) == 2
            err = capsys.readouterr().err
            assert "Traceback" not in err and message in err.splitlines()[0], (kind, err)


def test_model_zoo_on_data_of_other_channels_names_the_override():
    """model=zoo model.name=vit_debug (3 channels) on the 1-channel digits failed in its first training step
    ("ViT expects 3 input channels, got 1"); it is refused before anything is built, naming +model.in_chans."""
    cfg = run.compose(["model=zoo", "model.name=vit_debug"])
    with pytest.raises(ValueError, match=r"model vit_debug is built for 3 input channels and data DigitsDataModule has "
                                         r"1: add \+model.in_chans=1 \(and \+model.img_size=8"):
        run.check_required(cfg)
    run.check_required(run.compose(["model=zoo", "model.name=vit_debug", "+model.in_chans=1", "+model.img_size=8"]))


def test_home_in_override_values_and_progress_bar_off_with_default_callbacks(tmp_path):
    """Two documented commands that failed: `data.root=~/data` (the shell leaves the ~ after = alone, and Hydra's
    grammar refused it: "LexerNoViableAltException") and `+trainer.enable_progress_bar=false` with the default
    callbacks (Lightning refused the RichProgressBar they hold)."""
    import lightning.pytorch as pl

    cfg = run.compose(["experiment=graph_cora", "data.root=~/data"])
    assert cfg.data.root == os.path.expanduser("~/data")
    cfg = run.compose(["experiment=vit_digits", "callbacks=default", "+trainer.enable_progress_bar=false",
                       f"run_dir={tmp_path}"])
    callbacks = run._instantiate_group(cfg.callbacks)
    assert any(isinstance(c, pl.callbacks.ProgressBar) for c in callbacks)
    trainer = run._trainer(cfg, callbacks=callbacks, loggers=[])
    assert trainer.progress_bar_callback is None


# ------------------------------------------------------------------------------ zoo bench (audit 2026-12-06)
def test_bench_vision_agent_warms_compiled_models_and_takes_patch_multiples(monkeypatch, capsys):
    """--compile with --warmup 0 timed timm's compilation (its ViT is not called by the agreement check): zoo/timm
    read 81.7 instead of 0.45. And --sizes 24 was accepted, then stopped with 'logits differ by 1.38', which read
    like a zoo bug: the zoo pads the partial patch, the official-style reference drops it."""
    from zoo.bench import timing, vision_agent

    warmups = []

    def fake_samples(fns, *, repeats, warmup, min_time):
        warmups.append(warmup)
        return {name: [1.0] * repeats for name in fns}, {name: None for name in fns}

    monkeypatch.setattr(vision_agent, "interleaved_samples_with_faults", fake_samples)
    # three stand-ins that agree, so only the benchmark's own logic runs (compiling the real models takes 12 s)
    monkeypatch.setattr(vision_agent, "build_models", lambda size: (torch.nn.Flatten(),) * 3)
    assert cli.main(["bench", "vision_agent", "--sizes", "32", "--batches", "1", "--repeats", "1", "--warmup", "0",
                     "--min-time", "0", "--threads", "1", "--compile", "eager"]) == 0
    assert warmups == [1] and "warmup 1;" in capsys.readouterr().out
    monkeypatch.setattr(vision_agent, "interleaved_samples_with_faults", timing.interleaved_samples_with_faults)
    with pytest.raises(SystemExit):
        cli.main(["bench", "vision_agent", "--sizes", "32,24", "--batches", "1", "--repeats", "1"])
    err = capsys.readouterr().err
    assert "--sizes must be multiples of 16 (the patch size), got [24]" in err and "pads" in err


def test_bench_relpos_and_maxvit_print_the_run_header_before_timing(monkeypatch, capsys):
    """relpos printed the command / date / load / machine header only with --markdown, and vision_maxvit printed
    it after the timing loop (so its 'load average at start' was read at the end). --odd equal to --size gave
    a one-row table that compared nothing."""
    from zoo.bench import relpos, vision_maxvit

    printed_before_timing = []

    def wrap(timer):
        def timed(*args, **kwargs):
            printed_before_timing.append(capsys.readouterr().out)
            return timer(*args, **kwargs)

        return timed

    monkeypatch.setattr(relpos, "interleaved_samples", wrap(relpos.interleaved_samples))
    monkeypatch.setattr(vision_maxvit, "interleaved_samples", wrap(vision_maxvit.interleaved_samples))
    assert cli.main(["bench", "relpos", "--cases", "1x16", "--dim", "32", "--heads", "2", "--repeats", "1",
                     "--warmup", "0", "--threads", "1"]) == 0
    assert cli.main(["bench", "vision_maxvit", "--model", "maxvit_rmlp_pico_rw_256", "--size", "64", "--odd", "48",
                     "--batch", "1", "--repeats", "1", "--warmup", "0", "--threads", "1"]) == 0
    assert len(printed_before_timing) == 2
    for name, text in zip(("relpos", "vision_maxvit"), printed_before_timing):
        assert f"command: `zoo bench {name} " in text and "load average at start" in text, (name, text)
    assert "load average at end" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["bench", "vision_maxvit", "--model", "maxvit_rmlp_pico_rw_256", "--size", "64", "--odd", "64"])
    assert "--odd 64 equals --size" in capsys.readouterr().err


def test_run_summary_prints_small_values_readably(capsys):
    """The summary table printed every metric with 4 decimals: a fine-tuning learning rate of 6e-6 read 0.0000."""
    from zoo import cli

    cli._print_summary({"run_dir": "r", "metrics": {"train/lr": 6e-6, "val/acc1": 0.98611, "train/loss": 0.0},
                        "seconds": 1.0})
    out = capsys.readouterr().out
    assert "6.000e-06" in out and "0.9861" in out and "0.0000" in out


# ------------------------------------------------------------------------------ zoo train config (audit 4)
def test_experiment_agent_digits_builds_the_model_picked_with_model_option():
    """experiment=agent_digits set model.name itself over /model: zoo, so `model=vit_debug` was merged under it
    and Agent-DeiT was trained silently; like experiment=vit_digits it now has its own model config, and its
    model section stays the one the shipped checkpoints/agent_digits was trained with."""
    from omegaconf import OmegaConf

    for experiment in ("agent_digits", "vit_digits"):
        for option in ("vit_debug", "maxvit_digits"):
            picked = OmegaConf.to_container(run.compose([f"experiment={experiment}", f"model={option}"]).model)
            alone = OmegaConf.to_container(run.compose([f"model={option}"]).model)
            assert alone.items() <= picked.items(), (experiment, option)  # (vit_digits adds drop_path_rate)
    record = json.loads((ROOT / "checkpoints" / "agent_digits" / "config.json").read_text())["metadata"]["zoo_config"]
    cfg = run.compose(["experiment=agent_digits"])
    assert OmegaConf.to_container(cfg.model, resolve=True) == record["model"]


@pytest.mark.parametrize("key,override", [("logger", "logger=none"), ("callbacks", "callbacks=minimal"),
                                          ("plugins", "AtomicCheckpointIO"),
                                          ("enable_checkpointing", "~callbacks.last_checkpoint")])
def test_trainer_arguments_of_config_groups_are_refused_with_the_override(key, override, tmp_path):
    """+trainer.logger=false was replaced by the logger group, +trainer.plugins=[...] dropped the atomic checkpoint
    writes, +trainer.enable_checkpointing=false failed inside Lightning: refused with the override to use."""
    value = "[]" if key in ("plugins", "callbacks") else "false"
    cfg = run.compose(["experiment=vit_digits", f"+trainer.{key}={value}", f"run_dir={tmp_path}"])
    with pytest.raises(ValueError, match=f"trainer.{key} is not a zoo train setting: .*{override}"):
        run._trainer(cfg, callbacks=[], loggers=[])
    with pytest.raises(ValueError, match=f"trainer.{key} is not a zoo train setting"):  # without the +
        run.compose(["experiment=vit_digits", f"trainer.{key}={value}"])


def test_the_overrides_named_for_trainer_arguments_do_the_job(tmp_path, capsys):
    from zoo.train.checkpoint import AtomicCheckpointIO

    def trainer(*overrides):
        cfg = run.compose(["experiment=vit_digits", f"run_dir={tmp_path}", *overrides])
        return run._trainer(cfg, callbacks=run._instantiate_group(cfg.get("callbacks")),
                            loggers=run._instantiate_group(cfg.get("logger")))

    assert trainer("logger=none").loggers == []
    assert [type(logger).__name__ for logger in trainer("~logger.csv").loggers] == ["TensorBoardLogger"]
    unsaved = trainer("~callbacks.last_checkpoint", "~callbacks.best_checkpoint")
    assert unsaved.checkpoint_callbacks == [] and isinstance(unsaved.strategy.checkpoint_io, AtomicCheckpointIO)
    assert set(run.compose(["callbacks=minimal"]).callbacks) == {"last_checkpoint", "best_checkpoint"}
    assert len(trainer("callbacks=minimal").checkpoint_callbacks) == 2
    # one line from the command line, before anything is written
    assert cli.main(["train", *FAST_RUN, "+trainer.logger=false", f"run_dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err
    assert "zoo train: error: trainer.logger is not a zoo train setting: " in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_eval_ignores_group_arguments_stored_by_an_older_run(tmp_path):
    """A run trained before trainer.logger / callbacks / ... were refused may store one: evaluation sets its own."""
    import shutil

    released = shutil.copytree(ROOT / "checkpoints" / "vit_digits", tmp_path / "released")
    config = json.loads((released / "config.json").read_text())
    config["metadata"]["zoo_config"]["trainer"].update(logger=False, enable_checkpointing=False)
    (released / "config.json").write_text(json.dumps(config))
    metrics = run.evaluate(released, ["trainer.limit_test_batches=1"])
    assert 0.0 <= metrics["test/acc1"] <= 1.0


@pytest.mark.parametrize("flags,resolved", [(["-c", "job"], False), (["--cfg=job"], False), (["-c", "all"], False),
                                            (["--cfg"], False), (["--cfg", "job", "--resolve"], True),
                                            (["--resolve", "--cfg=all"], True)])
def test_hydras_config_flag_spellings_print_the_config(flags, resolved, capsys):
    """Hydra's `-c job`, `--cfg=job` and `--resolve` (hydra/_internal/utils.py get_args_parser) were taken as
    overrides ("not of the form key=value", a LexerNoViableAltException)."""
    from omegaconf import OmegaConf

    assert cli.main(["train", "experiment=vit_digits", *flags]) == 0
    expected = OmegaConf.to_yaml(run.compose(["experiment=vit_digits"]), resolve=resolved)
    assert capsys.readouterr().out.strip() == expected.strip()


def test_hydra_flags_zoo_train_cannot_honour_are_one_line(capsys):
    for flags, message in ((["--cfg", "hydra"], "--cfg hydra: zoo train composes without Hydra's app runner, so its "
                                                "config has no hydra node; --cfg job"),
                           (["-c", "hydra"], "-c hydra: zoo train composes without"),
                           (["--cfg=jobs"], "--cfg jobs: 'jobs' is not one of Hydra's job, hydra, all"),
                           (["--resolve"], "--resolve resolves the config that --cfg prints: add --cfg job"),
                           (["data=image_folder", "--cfg", "job", "--resolve"],
                            "--resolve: data.num_classes is required (???) and other keys read it")):
        assert cli.main(["train", "experiment=vit_digits", *flags]) == 1
        err = capsys.readouterr().err
        assert f"zoo train: error: {message}" in err and len(err.strip().splitlines()) == 2, err


@pytest.mark.parametrize("sweep", ["trainer.max_epochs=range(1,3)", "seed=choice(1,2)", "task.lr=interval(0.1,1)",
                                   "experiment=glob(vit*)"])
def test_hydra_sweep_functions_say_to_add_multirun(sweep):
    """Hydra's "Sweep parameters ... requires --multirun" (a flag zoo train refuses) said what to do no better."""
    with pytest.raises(ValueError, match=rf"^{re.escape(sweep)} is a sweep .*add -m \(zoo train -m \.\.\.\) to run one job per value"):
        run.compose(["experiment=vit_digits", sweep])


def test_ckpt_path_last_and_best_name_the_files_of_run_dir(tmp_path, karate_run):
    """Lightning's ckpt_path=last / best were refused as "ckpt_path=last does not exist": they are the files the
    checkpoint callbacks write in run_dir (configs/callbacks/minimal.yaml), and a missing one is named."""
    import shutil

    for shortcut in ("last", "best"):
        cfg = run.compose(["experiment=vit_digits", f"ckpt_path={shortcut}", f"run_dir={tmp_path / 'new'}"])
        callback = run.compose(["experiment=vit_digits", f"run_dir={tmp_path / 'new'}"]).callbacks[f"{shortcut}_checkpoint"]
        written = Path(callback.dirpath) / f"{callback.filename}.ckpt"
        with pytest.raises(FileNotFoundError, match=f"ckpt_path={re.escape(str(written))} does not exist"):
            run.train(cfg)
        assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="ckpt_path=last resumes from last.ckpt of the run in run_dir: add run_dir="):
        run.train(run.compose(["experiment=vit_digits", "ckpt_path=last"]))
    resumed = shutil.copytree(karate_run, tmp_path / "karate")
    result = run.train(run.compose(["experiment=graph_karate", "callbacks=minimal", "logger=none", "num_threads=1",
                                    "trainer.max_epochs=3", "trainer.enable_model_summary=false", "ckpt_path=last",
                                    f"run_dir={resumed}"]))
    assert result["epoch"] == 3 and result["run_dir"] == str(resumed)


def test_unknown_task_and_data_keys_name_the_accepted_ones(capsys, tmp_path):
    """+task.opt=sgd / +data.foo=0.25 ended in Python's "__init__() got an unexpected keyword argument":
    like the model's arguments, the key, the closest accepted one and every accepted one (each key the shipped
    config sets among them) in one line."""
    for overrides, message, group in (
            (["+task.lrr=0.1"], "unknown key task.lrr (did you mean task.lr?); ImageClassifier (task) accepts: ", "task"),
            (["+task.opt=sgd"], "unknown key task.opt; ImageClassifier (task) accepts: ", "task"),
            (["+data.foo=0.25"], "unknown key data.foo; DigitsDataModule (data) accepts: ", "data"),
            (["+data.batchsize=8"], "unknown key data.batchsize (did you mean data.batch_size?); DigitsDataModule",
             "data"),
            (["experiment=graph_karate", "+task.weightdecay=0"],
             "unknown key task.weightdecay (did you mean task.weight_decay?); NodeClassificationModule", "task")):
        cfg = run.compose(["experiment=vit_digits", *overrides])
        with pytest.raises(TypeError) as error:
            run.build(cfg)
        text = str(error.value)
        assert text.startswith(message) and "\n" not in text, text
        accepted = set(text.rsplit("accepts: ", 1)[1].split(", "))
        configured = {key for key in cfg[group] if not key.startswith("_")} - {overrides[-1][len(group) + 2:].split("=")[0]}
        assert configured <= accepted and "model" not in accepted, (configured - accepted)
    assert cli.main(["train", *FAST_RUN, "+data.foo=0.25", f"run_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert "zoo train: error: unknown key data.foo; DigitsDataModule (data) accepts: " in err


@pytest.fixture(scope="module")
def best_weights_run(tmp_path_factory) -> Path:
    """A 2-epoch vit_digits run (EMA kept) that tests and releases its best weights. The best checkpoint monitors
    the step in mode min, so best.ckpt is deterministically the first epoch's, other weights than the final ones."""
    run_dir = tmp_path_factory.mktemp("best") / "run"
    assert cli.main(["train", *FAST_RUN, "trainer.max_epochs=2", "test_ckpt=best", "export_ckpt=best",
                     "callbacks.best_checkpoint.monitor=step", "callbacks.best_checkpoint.mode=min",
                     f"run_dir={run_dir}"]) == 0
    return run_dir


def test_test_ckpt_and_export_ckpt_best_test_and_release_the_best_checkpoint(best_weights_run):
    """test_ckpt=best / export_ckpt=best (Lightning's trainer.test(ckpt_path="best")): the test metrics are those
    zoo eval gives for best.ckpt, released/ holds best.ckpt's EMA weights, and metrics.json and the model card
    say so. zoo train tested and released the final weights only."""
    from zoo import hub

    best, last = best_weights_run / "checkpoints" / "best.ckpt", best_weights_run / "checkpoints" / "last.ckpt"
    best_ema, last_ema = hub.load_state_dict_file(best), hub.load_state_dict_file(last)
    assert any(not torch.equal(best_ema[k], last_ema[k]) for k in best_ema)  # the two weights differ
    released = zoo.from_pretrained(best_weights_run / "released").state_dict()
    assert all(torch.equal(best_ema[k], v) for k, v in released.items())
    record = json.loads((best_weights_run / "metrics.json").read_text())
    assert record["test_weights"]["ckpt"] == "best" and record["test_weights"]["path"] == str(best)
    assert record["test_weights"]["global_step"] == 2 and record["test_weights"]["monitor"] == "step"
    assert record["released_weights"] == record["test_weights"]
    reference = run.evaluate(best, ["trainer.limit_test_batches=1"])  # the batches the run tested on
    assert record["metrics"]["test/loss"] == pytest.approx(reference["test/loss"], abs=1e-5)
    card = json.loads((best_weights_run / "released" / "config.json").read_text())["metadata"]
    assert card["weights"] == record["released_weights"]
    assert card["metrics"]["test/loss"] == pytest.approx(reference["test/loss"], abs=1e-5)
    validated = run.evaluate(best, ["trainer.limit_val_batches=1"], split="val")  # the card's val/* are best's too
    assert card["metrics"]["val/loss"] == pytest.approx(validated["val/loss"], abs=1e-5)


def test_best_weights_that_cannot_exist_are_refused_before_training(tmp_path):
    """test_ckpt=best / export_ckpt=best with a config that writes no best.ckpt: one line before training (the run
    directory stays empty), naming why and the other choice."""
    for overrides, problem in (
            (["test_ckpt=best", "~callbacks.best_checkpoint"], "the callbacks keep no best checkpoint"),
            (["test_ckpt=best", "callbacks.best_checkpoint.save_top_k=0"],
             "callbacks.best_checkpoint.save_top_k=0 keeps no checkpoint"),
            (["export_ckpt=best", "trainer.limit_val_batches=0"], "trainer.limit_val_batches=0 runs no validation"),
            (["test_ckpt=best", "export_ckpt=best", "trainer.check_val_every_n_epoch=3"],
             "trainer.check_val_every_n_epoch=3 > trainer.max_epochs=1")):
        run_dir = tmp_path / "_".join(o.split("=")[0].strip("~").replace(".", "_") for o in overrides)
        with pytest.raises(ValueError) as error:
            run.train(run.compose([*FAST_RUN, *overrides, f"run_dir={run_dir}"]))
        text = str(error.value)
        assert problem in text and "\n" not in text and "=final" in text, text
        assert not (run_dir / "config.yaml").exists()
    with pytest.raises(ValueError, match=r"^test_ckpt must be final .* or best .*, got 'bset'$"):
        run.train(run.compose([*FAST_RUN, "test_ckpt=bset", f"run_dir={tmp_path / 'typo'}"]))


def test_best_weights_missing_at_the_end_are_said_and_the_run_keeps_its_outputs(tmp_path, capsys):
    """trainer.max_steps=1 ends training before its first validation: no best.ckpt, which only shows at the end.
    The run keeps last.ckpt and metrics.json (test_weights null), tests and releases nothing it was not asked to,
    and says so on stderr."""
    run_dir = tmp_path / "run"
    assert cli.main(["train", *FAST_RUN, "+trainer.max_steps=1", "test_ckpt=best", "export_ckpt=best",
                     f"run_dir={run_dir}"]) == 0
    err = capsys.readouterr().err
    assert "no best checkpoint was written" in err and "test_ckpt=best did not run" in err
    assert "released/ (export_ckpt=best) is not written" in err
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not (run_dir / "checkpoints" / "best.ckpt").exists()
    assert not (run_dir / "released").exists()
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["test_weights"] is None and record["released_weights"] is None
    assert not any(key.startswith("test/") for key in record["metrics"]) and "val/loss" in record["metrics"]


def test_eval_and_predict_take_a_run_directory(best_weights_run, tmp_path, capsys):
    """ckpt=<run_dir> (what zoo train prints) was refused ("expected a .ckpt or a directory written by
    zoo.save_pretrained"): it is the run's released/, else checkpoints/best.ckpt, else checkpoints/last.ckpt,
    named on stderr."""
    import shutil

    quick = ["trainer.limit_test_batches=1"]
    assert cli.main(["eval", f"ckpt={best_weights_run}", *quick]) == 0
    captured = capsys.readouterr()
    assert f"using {best_weights_run / 'released'}" in captured.err
    assert json.loads(captured.out) == run.evaluate(best_weights_run / "released", quick)
    copy = shutil.copytree(best_weights_run, tmp_path / "run", ignore=shutil.ignore_patterns("released"))
    for name in ("best.ckpt", "last.ckpt"):
        assert cli.main(["eval", f"ckpt={copy}", *quick]) == 0
        captured = capsys.readouterr()
        assert f"using {copy / 'checkpoints' / name}" in captured.err
        assert json.loads(captured.out) == run.evaluate(copy / "checkpoints" / name, quick)
        (copy / "checkpoints" / "best.ckpt").unlink(missing_ok=True)
    predicted = run.predict(best_weights_run, ["digits:3"])
    assert predicted == run.predict(best_weights_run / "released", ["digits:3"])
    assert f"using {best_weights_run / 'released'}" in capsys.readouterr().err
    shutil.rmtree(copy / "checkpoints")
    assert cli.main(["eval", f"ckpt={copy}"]) == 1
    err = capsys.readouterr().err
    assert "is a zoo train run directory without released/ or checkpoints/best.ckpt or last.ckpt" in err
    assert err.count("\n") == 2


def test_sigterm_exits_143_and_says_how_to_resume(tmp_path, capsys, sigterm_in_first_epoch):
    """SIGTERM (a scheduler's, kill's) makes Lightning raise SIGTERMException, a SystemExit without a code: zoo train
    stopped and exited 0, as if the run had ended. It now exits 143 (128 + SIGTERM, as a process killed by it) and
    names the ckpt_path= that resumes the run."""
    code = cli.main(["train", "experiment=graph_karate", "callbacks=minimal", "logger=none", "num_threads=1",
                     "test=false", "export=false", "+trainer.enable_progress_bar=false", "trainer.max_epochs=3",
                     f"run_dir={tmp_path / 'run'}"])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert code == 143 and last.is_file() and not (tmp_path / "run" / "metrics.json").exists()
    assert (f"zoo train: terminated (SIGTERM) during the run in {tmp_path / 'run'}; resume from its last checkpoint "
            f"with ckpt_path={last}") in capsys.readouterr().err.splitlines()


def test_sigterm_line_is_printed_by_global_rank_zero_only(tmp_path, capsys, sigterm_in_first_epoch, monkeypatch):
    """Under DDP every process gets the SIGTERM and each printed the "terminated ... resume with" line (N lines for
    trainer.devices=N, audit 2026-12-07); as the Ctrl-C note and the summary, only global rank 0 prints it. The other
    ranks still exit 143."""
    from lightning.pytorch.utilities import rank_zero_only

    from zoo.train import run as run_module

    real_train = run_module.train

    def as_rank_one(cfg, **options):
        try:
            return real_train(cfg, **options)
        finally:  # what Lightning's DDP set-up does in a process of global rank 1
            monkeypatch.setattr(rank_zero_only, "rank", 1)

    monkeypatch.setattr(run_module, "train", as_rank_one)
    code = cli.main(["train", "experiment=graph_karate", "callbacks=minimal", "logger=none", "num_threads=1",
                     "test=false", "export=false", "+trainer.enable_progress_bar=false", "trainer.max_epochs=3",
                     f"run_dir={tmp_path / 'run'}"])
    assert code == 143 and "terminated (SIGTERM)" not in capsys.readouterr().err


@pytest.mark.parametrize("strategy", ["ddp_fork", "ddp_spawn", "ddp_notebook"])
def test_multiprocessing_launchers_are_refused_before_the_run_starts(tmp_path, strategy):
    """ddp_fork trained in child processes, after which this process read global_step 0: "no training step ran",
    no released/, the CSV log started afresh, exit 0; ddp_spawn failed pickling zoo train's callbacks (audit
    2026-12-07). Refused in one line naming trainer=ddp_cpu, before any file of the run is written."""
    cfg = run.compose(["experiment=graph_karate", "callbacks=minimal", "logger=none", "num_threads=1",
                       "trainer.accelerator=cpu", "trainer.devices=2", f"+trainer.strategy={strategy}",
                       f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=rf"^trainer\.strategy={strategy} trains in 2 processes started by "
                                         r"multiprocessing \((fork|spawn)\), which zoo train does not support .*use "
                                         r"trainer=ddp_cpu \(CPU\) or trainer=ddp \(GPUs\)"):
        run.train(cfg)
    assert not (tmp_path / "run").exists()
    one = run.compose(["experiment=graph_karate", "callbacks=minimal", "logger=none", "trainer.accelerator=cpu",
                       "trainer.devices=1", f"+trainer.strategy={strategy}", f"run_dir={tmp_path / 'one'}"])
    with pytest.raises(ValueError, match=rf"^trainer\.strategy={strategy} trains in 1 process started by "):
        run.train(one)


def test_full_batch_node_classification_is_refused_under_ddp(tmp_path):
    """Every process got the whole graph and ran the same full-graph step: twice the compute, and with dropout
    another result than one process (karate after 20 epochs: test accuracy 0.60 vs 0.20, audit 2026-12-07). Refused
    before any process starts; sampled mini-batches, which DDP splits, are not."""
    common = ["experiment=graph_karate", "callbacks=minimal", "logger=none", "num_threads=1", "trainer=ddp_cpu"]
    with pytest.raises(ValueError, match=r"^full-batch node classification \(data\.batch_size=null\) does not "
                                         r"split across 2 processes: .*trainer\.devices=1.*data\.batch_size="):
        run.train(run.compose([*common, f"run_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run").exists()
    from zoo.tasks.graph.datasets import NodeDataModule

    NodeDataModule("karate", batch_size=4, num_neighbors=[2]).check_processes(2)  # sampled: no error
    NodeDataModule("karate").check_processes(1)


def test_urls_are_named_as_urls_not_as_missing_files(tmp_path, capsys, monkeypatch):
    """input=, ckpt=, image=, model.pretrained= and ckpt_path= given a URL said "input https:/example.com/cat.png
    does not exist" (Path collapsed the "//"); each now says the zoo downloads nothing and what to do instead, and a
    Hugging Face model page names its hf-hub: form and the local cache."""
    from zoo import cli

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("ZOO_DEBUG", raising=False)
    page = "https://huggingface.co/timm/vit_tiny_patch16_224.augreg_in21k"
    cases = [
        (["predict", "ckpt=checkpoints/vit_digits", "input=https://example.com/cat.png"],
         "zoo predict: error: input=https://example.com/cat.png is a URL, and the zoo reads local files only (nothing "
         "is downloaded): download the image yourself and pass its path, input=<local path>"),
        (["predict", f"ckpt={page}", "input=digits:1"],
         f"zoo predict: error: ckpt={page} is a Hugging Face Hub address, and the zoo never downloads: give the "
         f"repository as ckpt=hf-hub:timm/vit_tiny_patch16_224.augreg_in21k, which reads the local Hugging Face cache; "
         f"it is not in your cache ({tmp_path / 'hub'})"),
        (["eval", "ckpt=http://example.org/run/last.ckpt"], "zoo eval: error: ckpt=http://example.org/run/last.ckpt is a URL"),
        (["viz", "rollout", "ckpt=checkpoints/vit_digits", "image=http://x.org/a.png", f"out={tmp_path / 'r.png'}"],
         "zoo viz rollout: error: image=http://x.org/a.png is a URL, and the zoo reads local files only"),
        (["train", "model=zoo", "model.name=vit_tiny_patch16_224", f"model.pretrained={page}/resolve/main/model.safetensors",
          f"run_dir={tmp_path / 'run'}"],
         f"zoo train: error: model.pretrained={page}/resolve/main/model.safetensors is a Hugging Face Hub address, and "
         f"the zoo never downloads: give the repository as model.pretrained=hf-hub:timm/vit_tiny_patch16_224.augreg_in21k"),
        (["train", "experiment=vit_digits", "ckpt_path=https://x.org/last.ckpt", f"run_dir={tmp_path / 'run2'}"],
         "zoo train: error: ckpt_path=https://x.org/last.ckpt is a URL, and the zoo reads local files only (nothing is "
         "downloaded): download the .ckpt yourself and pass its path, ckpt_path=<local path>"),
    ]
    for argv, start in cases:
        assert cli.main(argv) in (1, 2), argv  # zoo viz adds its usage (exit status 2)
        err = capsys.readouterr().err
        assert err.startswith(start), (argv, err)
        assert "https:/e" not in err and "http:/x" not in err and "Traceback" not in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "r.png").exists()


@pytest.mark.parametrize("overrides, group", [
    (["~task"], "task"), (["~model"], "model"), (["~data"], "data"),
    (["experiment=graph_karate", "~model"], "model"),  # the experiment's model.heads was left as the whole node
])
def test_deleting_a_required_group_says_which_option_to_give(tmp_path, capsys, overrides, group):
    """~task and ~model crashed with omegaconf's "Missing key task" traceback; ~model after an experiment said
    "config node has no _target_: ['heads']"; ~data surfaced train.yaml's ${debug}_${data} defaults interpolation."""
    code = cli.main(["train", *overrides, "trainer.max_epochs=1", f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and err[0].startswith(f"zoo train: error: {group} is required: give {group}=<option>"), err
    assert "${" not in err[0] and f"{group} options: " in err[0]


def test_deleting_debug_or_data_composes_without_them():
    """~debug composes as no debug option at all (it failed resolving train.yaml's ${debug}_${data}), as in Hydra;
    ~data composes without data (training then says data is required)."""
    from omegaconf import OmegaConf

    for experiment in ("vit_digits", "graph_karate"):
        plain = OmegaConf.to_container(run.compose([f"experiment={experiment}"]))
        for overrides in (["~debug"], ["debug=overfit", "~debug"], ["debug=fast", "~debug"]):
            assert OmegaConf.to_container(run.compose([f"experiment={experiment}", *overrides])) == plain, overrides
    assert "data" not in run.compose(["~data"]) and "data" not in run.compose(["debug=overfit", "~data"])


def test_a_hydra_resolver_is_named_with_what_to_use(tmp_path, capsys):
    """${hydra:runtime.output_dir} (lightning-hydra-template's paths) failed with "HydraConfig was not set"."""
    assert cli.main(["train", "experiment=graph_karate", "+tag=${hydra:runtime.output_dir}", "--cfg", "job",
                     "--resolve"]) == 1
    err = capsys.readouterr().err.splitlines()[0]
    assert err.startswith("zoo train: error: tag: ${hydra:runtime.output_dir}: ") and "no hydra node" in err, err
    assert "${run_dir}" in err
    with pytest.raises(ValueError, match=r"^paths\.out: \$\{hydra:job\.num\}: .*no hydra node"):
        run.train(run.compose(["experiment=graph_karate", "+paths.out=${hydra:job.num}",
                               f"run_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run").exists()


def test_sweep_dir_without_multirun_says_it_is_for_sweeps(capsys):
    """sweep_dir= without -m got "unknown config key ... +sweep_dir=... would add it", an unused key."""
    assert cli.main(["train", "experiment=graph_karate", "sweep_dir=x", "debug=fast"]) == 1
    err = capsys.readouterr().err.splitlines()[0]
    assert "sweep_dir= is the folder of a sweep's jobs and applies to zoo train -m only" in err and "run_dir=" in err
    assert "+sweep_dir" not in err


@pytest.mark.parametrize("overrides, message", [
    (["data=graph_tu"], "model vit_digits reads data.img_size, which data MUTAG does not have: graph models"),
    (["experiment=graph_karate", "+extra=${no.such.key}"], "--resolve: extra does not resolve: "),
    (["~data"], "data is required: give data=<option>"),
])
def test_resolve_names_what_failed(capsys, overrides, message):
    """--cfg job --resolve with graph data and the vision model said only "Interpolation key 'data.img_size' not
    found"; training said which model and data were paired."""
    assert cli.main(["train", *overrides, "--cfg", "job", "--resolve"]) == 1
    err = capsys.readouterr().err.splitlines()[0]
    assert err.startswith("zoo train: error: ") and message in err, err


def test_key_values_split_at_the_first_equals_sign():
    """Lightning names checkpoints epoch=E-step=S.ckpt: ckpt=<that file> is the key ckpt with the whole path as its
    value, and a data override's value may hold '=' too (mutation audit m12: split at the last '=', the key became
    'ckpt=.../epoch=3-step' and zoo eval said ckpt= was missing)."""
    values, rest = cli._key_values(["ckpt=runs/a/checkpoints/epoch=3-step=40.ckpt", "data.root=/data/x=1", "split=val"],
                                   ("ckpt", "split", "data"), "eval", passthrough_dotted=True)
    assert values == {"ckpt": ["runs/a/checkpoints/epoch=3-step=40.ckpt"], "split": ["val"]}
    assert rest == ["data.root=/data/x=1"]
    values, _ = cli._key_values(["ckpt=best-epoch=0-step=5.ckpt", "input=digits:0", "topk=3"],
                                ("ckpt", "input", "topk", "json"), "predict")
    assert values == {"ckpt": ["best-epoch=0-step=5.ckpt"], "input": ["digits:0"], "topk": ["3"]}


def test_run_summary_prints_every_value_below_a_thousandth_in_scientific_notation(capsys):
    """4 decimals show a value below 1e-3 as 0.0000 / 0.0003: a fine-tuning lr of 3e-5 read as zero (mutation audit
    m12: the threshold moved to 1e-5 and no test saw it). Expected strings are Python's own formatting."""
    cli._print_summary({"run_dir": "r", "metrics": {"train/lr": 3e-5, "val/lr": 2.5e-4, "val/acc1": 0.001,
                                                    "val/loss": -0.5}, "seconds": 2.0})
    out = capsys.readouterr().out
    assert f"{3e-5:.3e}" == "3.000e-05" and "3.000e-05" in out and "2.500e-04" in out
    assert "0.0010" in out and "-0.5000" in out and "0.0000" not in out


def test_best_weights_with_validation_at_the_last_epoch_are_accepted():
    """trainer.check_val_every_n_epoch equal to trainer.max_epochs validates once, at the last epoch: best.ckpt is
    written, so test_ckpt=best / export_ckpt=best are accepted; only a validation interval longer than the run is
    refused (mutation audit m12: '<=' refused the equal case, e.g. the default 1 and 1)."""
    for epochs, every in ((1, 1), (2, 2), (3, 2)):
        cfg = run.compose([*FAST_RUN, "test_ckpt=best", "export_ckpt=best", f"trainer.max_epochs={epochs}",
                           f"trainer.check_val_every_n_epoch={every}"])
        run._check_best_checkpoint_can_exist(cfg, run._instantiate_group(cfg.callbacks))
    cfg = run.compose([*FAST_RUN, "test_ckpt=best", "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=3"])
    with pytest.raises(ValueError, match=r"trainer\.check_val_every_n_epoch=3 > trainer\.max_epochs=2"):
        run._check_best_checkpoint_can_exist(cfg, run._instantiate_group(cfg.callbacks))


def test_eval_on_a_data_config_of_the_users(tmp_path, capsys):
    """zoo eval data=GROUP --config-dir DIR reads DIR/data/GROUP.yaml (it read zoo.configs only, so a data config
    of the user's, which zoo train --config-dir composes, was 'no such data config'): the user's copy of
    image_folder.yaml with its root written in scores what data=image_folder data.root=... scores."""
    ckpt = str(ROOT / "checkpoints" / "vit_digits")
    folder = _digits_test_folder(tmp_path / "pngs")
    assert cli.main(["eval", f"ckpt={ckpt}", "data=image_folder", f"data.root={folder}", "data.num_workers=0"]) == 0
    expected = json.loads(capsys.readouterr().out)["test/acc1"]
    mine = tmp_path / "my_configs"
    (mine / "data").mkdir(parents=True)
    from omegaconf import OmegaConf

    own = OmegaConf.load(str(importlib.resources.files("zoo.configs") / "data" / "image_folder.yaml"))
    own.root, own.num_workers = str(folder), 0
    OmegaConf.save(own, mine / "data" / "my_pngs.yaml")
    for flags in (["--config-dir", str(mine)], [f"--config-dir={mine}"], ["-cd", str(mine)]):
        assert cli.main(["eval", f"ckpt={ckpt}", "data=my_pngs", *flags]) == 0
        assert json.loads(capsys.readouterr().out)["test/acc1"] == expected
    # data.* overrides still apply on top of the user's file
    assert cli.main(["eval", f"ckpt={ckpt}", "-cd", str(mine), "data=my_pngs", f"data.root={tmp_path / 'none'}"]) == 1
    assert str(tmp_path / "none") in capsys.readouterr().err
    # unknown names: the shipped options, then the user's; without --config-dir, how to give one
    assert cli.main(["eval", f"ckpt={ckpt}", "-cd", str(mine), "data=my_png"]) == 1
    err = capsys.readouterr().err
    assert "data=my_png: no such data config (options: cifar10, cifar100, digits," in err
    assert "; in the --config-dir folders: my_pngs)" in err
    assert cli.main(["eval", f"ckpt={ckpt}", "data=my_pngs"]) == 1
    assert "a data config of your own: add --config-dir DIR, the folder holding data/<name>.yaml" in capsys.readouterr().err
    # a defaults list is Hydra composition, which zoo eval does not run; flags without their use or value
    (mine / "data" / "derived.yaml").write_text("defaults:\n  - image_folder\n  - _self_\nroot: /x\n")
    assert cli.main(["eval", f"ckpt={ckpt}", "-cd", str(mine), "data=derived"]) == 1
    assert "derived.yaml has a defaults list, which zoo eval does not expand" in capsys.readouterr().err
    assert cli.main(["eval", f"ckpt={ckpt}", "-cd", str(mine)]) == 1
    assert "--config-dir is where data=GROUP looks for your own data config" in capsys.readouterr().err
    # a package header other than the data node's (zoo train applies it; zoo eval reads the file as the data node),
    # a file that is no data config
    (mine / "data" / "global.yaml").write_text("# a comment\n# @package _global_\ndata:\n  root: /x\n")
    assert cli.main(["eval", f"ckpt={ckpt}", "-cd", str(mine), "data=global"]) == 1
    assert "global.yaml declares '# @package _global_'; zoo eval reads a data file as the data node" in \
        capsys.readouterr().err
    (mine / "data" / "packaged.yaml").write_text("# @package data\n" + (mine / "data" / "my_pngs.yaml").read_text())
    assert cli.main(["eval", f"ckpt={ckpt}", "-cd", str(mine), "data=packaged"]) == 0
    assert json.loads(capsys.readouterr().out)["test/acc1"] == expected
    (mine / "data" / "plain.yaml").write_text("root: /x\nlater: 1  # @package _global_ (not a header)\n")
    assert cli.main(["eval", f"ckpt={ckpt}", "-cd", str(mine), "data=plain"]) == 1
    assert "plain.yaml has no _target_ (the data module to build), so it is no data config (keys: root, later)" in \
        capsys.readouterr().err
    assert cli.main(["eval", f"ckpt={ckpt}", "data=my_pngs", "--config-dir"]) == 1
    assert "--config-dir needs a folder" in capsys.readouterr().err
    assert cli.main(["eval", f"ckpt={ckpt}", "data=my_pngs", "-cd", str(tmp_path / "absent")]) == 1
    assert "is not a folder" in capsys.readouterr().err


def test_model_zoo_vit_on_data_of_another_size_names_the_override():
    """A fixed-size ViT on another data.img_size failed in its first training step with the Python API's wording
    ("build the model with img_size=(64, 64)"); it is refused before anything is built with the command-line
    spelling. Families that take any size (MaxViT, Agent-DeiT) and dynamic_img_size pass."""
    base = ["model=zoo", "data=image_folder", "data.root=/nonexistent", "data.num_classes=2", "data.img_size=64"]
    cfg = run.compose(base + ["model.name=vit_tiny_patch16_224"])
    with pytest.raises(ValueError, match=r"model vit_tiny_patch16_224 is built for 224x224 images and data "
                                         r"ImageFolderDataModule gives 64x64: add \+model.img_size=64"):
        run.check_required(cfg)
    for extra in (["model.name=vit_tiny_patch16_224", "+model.img_size=64"],
                  ["model.name=vit_tiny_patch16_224", "+model.dynamic_img_size=true"],
                  ["model.name=maxvit_tiny_tf_224"]):
        run.check_required(run.compose(base + extra))


def test_released_model_records_the_image_size_it_was_trained_at(tmp_path):
    """A model that takes any size, trained at data.img_size 64 on a name built for 224: the released
    pretrained_cfg says 64 (timm's resolve_model_data_config / create_transform then resize to what training
    evaluated at), from config.json and from a .ckpt's data record alike; an img_size override keeps its own."""
    import timm.data

    from zoo import hub

    model = zoo.create_model("maxvit_debug", img_size=64)
    zoo.save_pretrained(model, tmp_path / "rel", metadata={"data": {"img_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}})
    loaded = zoo.from_pretrained(tmp_path / "rel")
    assert loaded.pretrained_cfg["input_size"] == (3, 32, 32)
    assert timm.data.resolve_model_data_config(loaded)["input_size"] == (3, 32, 32)
    resized = zoo.create_model("maxvit_debug", pretrained=str(tmp_path / "rel"), img_size=48)
    assert resized.pretrained_cfg["input_size"] == (3, 48, 48)
    rebuilt = hub.apply_training_preprocessing(zoo.create_model("maxvit_debug"), {"img_size": 40})
    assert rebuilt.pretrained_cfg["input_size"] == (3, 40, 40)


def test_eval_on_folders_of_some_of_the_models_classes(tmp_path, capsys):
    """A test set holding a few of the model's classes (folders 3 and 7 of the ten digits) was refused for its
    class count ("data.num_classes=10 but ImageFolderDataModule found 2 classes"); its folders are matched to the
    model's classes by name and scored against the model's own indices: the accuracy is what zoo predict's top-1
    answers on the same files give."""
    ckpt = str(ROOT / "checkpoints" / "vit_digits")
    folder = _digits_test_folder(tmp_path / "pngs")
    for child in (folder / "test").iterdir():
        if child.name not in ("3", "7"):
            for file in child.iterdir():
                file.unlink()
            child.rmdir()
    assert cli.main(["eval", f"ckpt={ckpt}", "data=image_folder", f"data.root={folder}", "data.num_workers=0"]) == 0
    captured = capsys.readouterr()
    assert "the class folders [3, 7] are 2 of the model's 10 classes" in captured.err
    rows = run.predict(ckpt, [str(folder / "test" / "3"), str(folder / "test" / "7")], topk=1)
    expected = np.mean([row["top"][0][0] == Path(row["input"]).parent.name for row in rows])
    assert len(rows) > 50 and abs(json.loads(captured.out)["test/acc1"] - expected) < 1e-6
    # folders that are not among the classes keep the plain rule
    (folder / "test" / "cat").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "test" / "cat" / "0.png")
    assert cli.main(["eval", f"ckpt={ckpt}", "data=image_folder", f"data.root={folder}"]) == 1
    assert "data.num_classes=10 but ImageFolderDataModule found 3 classes" in capsys.readouterr().err


def test_usage_errors_exit_2_and_suggest_close_names(capsys):
    """A bad command line exits 2 (argparse's status, as zoo list's and zoo bench's own argparse errors do), a failed
    run 1, so scripts tell them apart; misspelt commands, benchmarks, viz kinds, keys and --task values name the
    closest choice, as zoo train's experiment= and zoo list already did (review K of 2026-12-07)."""
    cases = [
        (["evl"], "zoo: unknown command 'evl' (did you mean 'eval'?)"),
        (["bench", "visoin"], "zoo bench: unknown benchmark 'visoin' (did you mean 'vision'?)"),
        (["viz", "rolout"], "zoo viz: unknown kind 'rolout' (did you mean 'rollout'?)"),
        (["eval", "ckpt"], "zoo eval: expected key=value, got 'ckpt'"),
        (["eval"], "zoo eval: ckpt=<.ckpt or released directory> is required"),
        (["predict", "ckpt=x", "inpt=y"], "zoo predict: unknown argument 'inpt' (did you mean 'input'?)"),
        (["predict", "ckpt=x", "input=y", "topk=a"], "zoo predict: topk must be an integer, got 'a'"),
        (["list", "--task", "visoin"], "zoo list: unknown task 'visoin' for --task (did you mean 'vision'?)"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
        assert stop.value.code == 2, argv
        assert message in capsys.readouterr().err, argv


def test_export_with_a_released_dir_and_another_model_says_the_dir_names_its_model(capsys):
    """zoo export ckpt=<released dir> model=<other> said "give model=, ckpt=, or both", though both were given; it
    names the conflict now (review K of 2026-12-07)."""
    from zoo.export import main as export_main

    released = ROOT / "checkpoints" / "vit_digits"
    assert export_main([f"ckpt={released}", "model=maxvit_debug", "out=unused.onnx"]) == 2
    err = capsys.readouterr().err
    assert f"ckpt={released} names its model itself" in err and "leave model=maxvit_debug out" in err
    assert export_main(["out=unused.onnx"]) == 2
    assert "give model=<name>, ckpt=<released dir | .ckpt>, or both" in capsys.readouterr().err
