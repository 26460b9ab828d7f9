"""zoo train with a primary config of the user's own: ``--config-dir DIR --config-name NAME`` (Hydra's spellings
``--config-name=NAME``, ``-cn NAME``, a ``.yaml`` suffix), where DIR/NAME.yaml extends the packaged train.yaml
(Hydra's "extending configs": ``defaults: [train, _self_]``) with a group choice and values of its own. Checked
through ``--cfg job``, a tiny training run whose stored config holds the user's values, its resume, zoo eval and
zoo predict of it, a sweep of two jobs (sweep.json records the primary config; a rerun reuses it), and the one-line
errors: an unknown name, a config that does not extend train.yaml, a name given twice, ``--config-path``."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from zoo import cli

MY_RUN = """defaults:
  - train
  - override /model: vit_debug
  - _self_

name: my_run
seed: 7
"""
BARE = "seed: 3\n"  # composes, but does not extend train.yaml
# a few batches of one epoch, no logger, one thread; no test / release: the quickest run that writes last.ckpt
QUICK = ["debug=fast", "logger=none", "num_threads=1", "test=false", "export=false"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The user's config folder: my_run.yaml (extends train: model vit_debug, seed 7, name my_run) and bare.yaml."""
    path = tmp_path_factory.mktemp("myconf")
    (path / "my_run.yaml").write_text(MY_RUN)
    (path / "bare.yaml").write_text(BARE)
    return path


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """A run trained from my_run with a command-line value on top (task.lr=1e-3)."""
    run_dir = tmp_path_factory.mktemp("runs") / "my_run"
    assert cli.main(["train", "--config-dir", str(folder), "--config-name", "my_run", "task.lr=1e-3", *QUICK,
                     f"run_dir={run_dir}"]) == 0
    return run_dir


def _printed(capsys) -> dict:
    return OmegaConf.to_container(OmegaConf.create(capsys.readouterr().out))


def _error(capsys) -> str:
    err = capsys.readouterr().err.splitlines()
    assert err and err[0].startswith("zoo train: error: "), err
    return err[0]


def test_cfg_job_prints_the_users_primary_config_over_train(folder, capsys):
    assert cli.main(["train", "--config-dir", str(folder), "--config-name", "my_run", "task.lr=1e-3", "--cfg",
                     "job"]) == 0
    cfg = _printed(capsys)
    assert cfg["model"]["name"] == "vit_debug" and cfg["seed"] == 7 and cfg["name"] == "my_run"
    assert cfg["task"]["lr"] == 1e-3  # the command line over the primary config
    assert cli.main(["train", "--cfg", "job"]) == 0  # train.yaml alone: the packaged choices
    default = _printed(capsys)
    assert default["model"]["name"] != "vit_debug" and default["seed"] == 42
    # everything else as train.yaml composes it
    assert {k: v for k, v in cfg.items() if k not in ("model", "seed", "name", "task")} == \
        {k: v for k, v in default.items() if k not in ("model", "seed", "name", "task")}


@pytest.mark.parametrize("spelling", [["--config-name=my_run"], ["-cn", "my_run"], ["-cn", "my_run.yaml"],
                                      ["--config-name", "my_run.yaml"]])
def test_hydras_spellings_of_config_name(folder, capsys, spelling):
    assert cli.main(["train", "-cd", str(folder), "--config-name", "my_run", "--cfg", "job"]) == 0
    expected = _printed(capsys)
    assert cli.main(["train", *spelling, f"--config-dir={folder}", "--cfg", "job"]) == 0, spelling
    assert _printed(capsys) == expected


def test_a_run_stores_the_users_values(trained, folder):
    saved = OmegaConf.load(trained / "config.yaml")
    assert saved.model.name == "vit_debug" and saved.seed == 7 and saved.name == "my_run" and saved.task.lr == 1e-3
    hp = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["hyper_parameters"]
    assert hp["zoo_config"]["model"]["name"] == "vit_debug" and hp["zoo_config"]["seed"] == 7
    assert hp["zoo_config_name"] == "my_run" and hp["zoo_config_dirs"] == [str(folder)]


def test_resume_composes_from_the_same_primary_config(trained, folder, tmp_path, capsys):
    run_dir = tmp_path / "copy"
    shutil.copytree(trained, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    # without --config-name the resume would compose train.yaml (another model, seed): refused, saying how
    assert cli.main(["train", *QUICK, f"run_dir={run_dir}", f"ckpt_path={last}"]) == 1
    err = _error(capsys)
    assert "composed from the primary config --config-name my_run" in err and "train.yaml" in err, err
    assert f"--config-dir {folder} --config-name my_run ckpt_path=" in err, err
    step = json.loads((run_dir / "metrics.json").read_text())["global_step"]
    assert cli.main(["train", "-cd", str(folder), "-cn", "my_run", "task.lr=1e-3", *QUICK, "trainer.max_epochs=2",
                     f"run_dir={run_dir}", f"ckpt_path={last}"]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epoch"] == 2 and metrics["global_step"] > step
    assert OmegaConf.load(run_dir / "config.yaml").model.name == "vit_debug"
    assert "note" not in capsys.readouterr().err  # the run's own folder: nothing to say
    # the same name from another folder is another file: the resume goes on with its values, and says so
    other = tmp_path / "otherconf"
    other.mkdir()
    (other / "my_run.yaml").write_text(MY_RUN.replace("seed: 7", "seed: 99"))
    assert cli.main(["train", "-cd", str(other), "-cn", "my_run", "task.lr=1e-3", *QUICK, "trainer.max_epochs=3",
                     f"run_dir={run_dir}", f"ckpt_path={last}"]) == 0
    err = capsys.readouterr().err
    assert f"composed --config-name my_run from --config-dir {folder}, with --config-dir {other}" in err, err


def test_eval_and_predict_of_the_run(trained, capsys):
    capsys.readouterr()
    assert cli.main(["eval", f"ckpt={trained}", "trainer.limit_test_batches=2"]) == 0
    out = capsys.readouterr().out
    assert "test/acc1" in json.loads(out[out.index("{"):])
    assert cli.main(["predict", f"ckpt={trained / 'checkpoints' / 'last.ckpt'}", "input=digits:0", "topk=2",
                     "json=true"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["input"] == "digits:0" and len(row["top"]) == 2


def test_a_sweep_composes_each_job_from_it(folder, tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    argv = ["train", "-m", "-cd", str(folder), "-cn", "my_run", "task.lr=1e-3", *QUICK, "seed=1,2",
            f"sweep_dir={sweep_dir}"]
    assert cli.main([*argv, "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert out.count("name: vit_debug") == 2 and "seed: 1" in out and "seed: 2" in out and "name: my_run" in out
    assert cli.main(argv) == 0
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert record["config_name"] == "my_run" and [job["status"] for job in record["jobs"]] == ["ok", "ok"]
    # each job's checkpoints record the primary config, as zoo train's do: resumed by hand without -cn, refused
    hp = torch.load(sweep_dir / "0" / "checkpoints" / "last.ckpt", map_location="cpu",
                    weights_only=False)["hyper_parameters"]
    assert hp["zoo_config_name"] == "my_run" and hp["zoo_config_dirs"] == [str(folder)]
    for number, seed in ((0, 1), (1, 2)):
        saved = OmegaConf.load(sweep_dir / str(number) / "config.yaml")
        assert saved.model.name == "vit_debug" and saved.seed == seed and saved.task.lr == 1e-3
    # a rerun resumes an unfinished job from its last.ckpt, composed from the same primary config
    (sweep_dir / "1" / "metrics.json").unlink()
    capsys.readouterr()
    assert cli.main(argv) == 0
    jobs = json.loads((sweep_dir / "sweep.json").read_text())["jobs"]
    assert jobs[0].get("skipped") and jobs[1]["resumed_from"].endswith("last.ckpt") and jobs[1]["status"] == "ok"
    # the same overrides from train.yaml are another sweep: refused in its sweep_dir
    capsys.readouterr()
    assert cli.main([item for item in argv if item not in ("-cn", "my_run")]) == 1
    err = _error(capsys)
    assert "holds a sweep composed from the primary config --config-name my_run" in err, err


def test_an_unknown_name_lists_where_it_looked(folder, capsys):
    assert cli.main(["train", "-cd", str(folder), "-cn", "my_rnu", "--cfg", "job"]) == 1
    err = _error(capsys)
    assert "--config-name my_rnu: no primary config my_rnu.yaml" in err and "did you mean my_run?" in err, err
    assert "train.yaml" in err and str(folder) in err and "bare.yaml, my_run.yaml" in err, err
    assert cli.main(["train", "-cn", "my_run", "--cfg", "job"]) == 1  # the folder not given
    assert "give the folder that holds it with --config-dir DIR" in _error(capsys)
    # Hydra looks for the primary config in the --config-dir folders, not in hydra.searchpath's
    assert cli.main(["train", f"hydra.searchpath=[file://{folder}]", "-cn", "my_run", "--cfg", "job"]) == 1
    assert f"give that folder with --config-dir {folder}" in _error(capsys)


def test_a_config_that_does_not_extend_train_is_named(folder, capsys):
    assert cli.main(["train", "-cd", str(folder), "-cn", "bare", "--cfg", "job"]) == 1
    err = _error(capsys)
    assert f"--config-name bare ({folder / 'bare.yaml'}) composes a config without task, model, data" in err, err
    assert "start its defaults list with - train and - _self_" in err, err


@pytest.mark.parametrize("names", [["-cn", "my_run", "--config-name=my_run"], ["-cn", "my_run", "-cn", "bare"]])
def test_a_name_given_twice_is_refused(folder, capsys, names):
    assert cli.main(["train", "-cd", str(folder), *names, "--cfg", "job"]) == 1
    assert "the primary config is named twice" in _error(capsys)


@pytest.mark.parametrize("argv", [["-cn"], ["--config-name="], ["-cn", "--cfg", "job"]])
def test_a_missing_name_is_refused(capsys, argv):
    assert cli.main(["train", *argv]) == 1
    err = _error(capsys)
    assert "give the name of your primary config" in err or "needs a name" in err, err


@pytest.mark.parametrize("flag", ["--config-path=conf", "-cp"])
def test_config_path_says_what_to_give_instead(capsys, flag):
    assert cli.main(["train", flag, "--cfg", "job"]) == 1
    err = _error(capsys)
    assert "replaces the application's config folder" in err and "--config-dir DIR" in err, err
    assert "--config-name NAME" in err and "zoo train supports" in err, err


def test_help_documents_config_name(capsys):
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--config-name NAME" in out and "defaults: [train, _self_]" in out and "--config-path" in out


def test_errors_inside_the_users_file_name_the_file_and_packages_are_explained(folder, tmp_path, capsys):
    """Hydra's errors do not say whether the command line or the primary config caused them: an error in the
    user's file is named with the file (it read "unknown config key 'extra' (from the overrides [])", advising
    +extra=...); a config in a subfolder, or under a # @package line, composes under that package: the message says
    to add # @package _global_ (and /train in a subfolder), where it said to start the defaults with - train, which
    those files did; an unknown sub/name lists that subfolder's files."""
    conf = tmp_path / "conf"
    (conf / "sub").mkdir(parents=True)
    (conf / "bad_group.yaml").write_text("defaults: [train, {override /extra: x}, _self_]\n")
    (conf / "pkg.yaml").write_text("# @package foo\ndefaults: [train, _self_]\nname: pkg\n")
    (conf / "sub" / "relative.yaml").write_text("defaults: [train, _self_]\n")
    (conf / "sub" / "nested.yaml").write_text("defaults: [/train, _self_]\n")
    (conf / "sub" / "good.yaml").write_text("# @package _global_\ndefaults: [/train, _self_]\nname: good\n")
    cases = {
        "bad_group": f"--config-name bad_group ({conf / 'bad_group.yaml'}): In 'bad_group': Could not override "
                     f"'extra'. No match in the defaults list.",
        "sub/relative": "Could not load 'sub/train'.; in a subfolder the packaged config is /train",
        "sub/nested": "is composed under the package 'sub', so its task, model, data sit under sub: instead of at "
                      "the top: make its first line # @package _global_",
        "pkg": "is composed under the package 'foo'",
        "sub/nestd": "did you mean sub/nested? looked in",
    }
    for name, message in cases.items():
        assert cli.main(["train", "-cd", str(conf), "-cn", name, "--cfg", "job"]) == 1, name
        assert message in _error(capsys), name
    assert cli.main(["train", "-cd", str(conf), "-cn", "sub/good", "--cfg", "job"]) == 0
    assert _printed(capsys)["name"] == "good"
    assert cli.main(["train", "-cd", str(conf), "-cn", "sub/good", "model=nope", "--cfg", "job"]) == 1
    assert _error(capsys).startswith("zoo train: error: unknown model=nope")  # the command line's error, as before


# ---- mutation audit (2026-12-07): behaviour the tests above did not pin --------------------------------------------
def test_primary_config_name_and_flags_by_hand():
    """The name recorded (checkpoints, sweep.json) drops the .yaml suffix Hydra accepts on -cn; the advice flags
    name every --config-dir, in order (Hydra searches them in that order), quoted for a shell; none for train.yaml."""
    from zoo.train import run

    assert run.primary_config_name(None) == "train" and run.primary_config_name("my_run.yaml") == "my_run"
    assert run.primary_config_name("sub/x.yaml") == "sub/x" and run.primary_config_name(".yaml") == ".yaml"
    assert run.primary_config_flags("my_run.yaml", ["my conf", "/b"]) == \
        "--config-dir 'my conf' --config-dir /b --config-name my_run "
    assert run.primary_config_flags(None, ["/b"]) == "" and run.primary_config_flags("train.yaml") == ""


def test_a_sweep_plan_records_the_name_without_yaml(folder, tmp_path):
    """sweep.plan / sweep.run called as a library with -cn's spelling my_run.yaml: the jobs (and so sweep.json and
    the checkpoints) carry my_run, the name a rerun with -cn my_run compares against."""
    from zoo.train import sweep

    _, jobs = sweep.plan(["seed=1,2"], str(tmp_path / "sw"), [str(folder)], config_name="my_run.yaml")
    assert [job.config_name for job in jobs] == ["my_run", "my_run"] and all(job.error is None for job in jobs)


def test_a_train_yaml_run_is_not_resumed_with_a_config_name(tmp_path):
    """The other direction of test_resume_composes_from_the_same_primary_config: a checkpoint without
    zoo_config_name (a run of train.yaml) resumed with --config-name my_run would go on with my_run's values."""
    from zoo.train import run

    ckpt = tmp_path / "last.ckpt"
    with pytest.raises(ValueError) as error:
        run._check_resumed_primary_config((ckpt, {"hyper_parameters": {"lr": 1.0}}), "my_run", ["/x"])
    assert str(error.value) == (f"cannot resume from {ckpt}: its run was composed from the primary config train.yaml "
                                f"(no --config-name), this one from --config-name my_run; resume with the run's own: "
                                f"zoo train ckpt_path={ckpt} ...")
    run._check_resumed_primary_config((ckpt, {"hyper_parameters": {}}), "train", [])  # train.yaml both: accepted


def test_unknown_name_with_yaml_suffix_and_searchpath_without_it(folder, tmp_path, capsys):
    """-cn my_rnu.yaml is the same unknown name as -cn my_rnu (listing where it looked, not blaming a file); a
    hydra.searchpath folder that does not hold the file is not named as holding it."""
    assert cli.main(["train", "-cd", str(folder), "-cn", "my_rnu.yaml", "--cfg", "job"]) == 1
    err = _error(capsys)
    assert "no primary config my_rnu.yaml" in err and "did you mean my_run?" in err, err
    from zoo.train import run  # the library's compose, given the name as spelled (zoo train strips .yaml first)

    with pytest.raises(ValueError, match=r"^--config-name my_rnu\.yaml: no primary config my_rnu\.yaml on the search "
                                         r"path; did you mean my_run\?"):
        run.compose([], config_name="my_rnu.yaml", config_dirs=[str(folder)])
    other = tmp_path / "elsewhere"
    other.mkdir()
    assert cli.main(["train", f"hydra.searchpath=[file://{other}]", "-cn", "my_run", "--cfg", "job"]) == 1
    err = _error(capsys)
    assert "hydra.searchpath folder" not in err and err.endswith("give the folder that holds it with --config-dir DIR")


def test_two_config_dirs_holding_the_name_the_first_is_used_and_named(tmp_path, capsys):
    """Hydra searches the --config-dir folders in the order given: the first one's file composes (its seed), and an
    error in that file names that path, not the second folder's file of the same name."""
    first, second = tmp_path / "first", tmp_path / "second"
    for number, path in ((1, first), (2, second)):
        path.mkdir()
        (path / "good.yaml").write_text(f"defaults: [train, _self_]\nseed: {number}\n")
        (path / "bare.yaml").write_text(f"seed: {number}\n")
    assert cli.main(["train", "-cd", str(first), "-cd", str(second), "-cn", "good", "--cfg", "job"]) == 0
    assert _printed(capsys)["seed"] == 1
    assert cli.main(["train", "-cd", str(first), "-cd", str(second), "-cn", "bare", "--cfg", "job"]) == 1
    assert f"--config-name bare ({first / 'bare.yaml'}) composes a config without" in _error(capsys)


def test_the_subfolder_hint_only_for_a_subfolders_config(tmp_path, capsys):
    """A top-level config under a # @package line is told about # @package _global_ only (the /train advice is for
    a subfolder's config, which gets it)."""
    conf = tmp_path / "conf"
    (conf / "sub").mkdir(parents=True)
    (conf / "pkg.yaml").write_text("# @package foo\ndefaults: [train, _self_]\n")
    (conf / "sub" / "nested.yaml").write_text("defaults: [/train, _self_]\n")
    assert cli.main(["train", "-cd", str(conf), "-cn", "pkg", "--cfg", "job"]) == 1
    err = _error(capsys)
    assert "composed under the package 'foo'" in err and "subfolder the packaged config" not in err, err
    assert cli.main(["train", "-cd", str(conf), "-cn", "sub/nested", "--cfg", "job"]) == 1
    assert _error(capsys).endswith("; in a subfolder the packaged config is /train (defaults: [/train, _self_])")


def test_stop_advice_and_a_relative_config_dir(folder, tmp_path, monkeypatch, capsys, sigterm_in_first_epoch,
                                              ctrl_c_in_second_epoch):
    """A run from -cd myconf (relative) records the folder's absolute path, so a resume with the same -cd myconf is
    the same file (no note); SIGTERM and Ctrl-C say to resume with the run's -cd/-cn (without them it is refused)."""
    monkeypatch.chdir(folder.parent)
    run_dir = tmp_path / "stopped"
    argv = ["train", "-cd", folder.name, "-cn", "my_run", *QUICK, "trainer.max_epochs=3", f"run_dir={run_dir}"]
    assert cli.main(argv) == 143  # SIGTERM at the end of epoch 0 (conftest)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert (f"resume from its last checkpoint with --config-dir {folder.name} --config-name my_run ckpt_path={last}"
            in capsys.readouterr().err)
    hp = torch.load(last, map_location="cpu", weights_only=False)["hyper_parameters"]
    assert hp["zoo_config_dirs"] == [str(folder)]

    with pytest.raises(SystemExit):  # resumed in epoch 1, Ctrl-C at its end (conftest)
        cli.main([*argv, f"ckpt_path={last}"])
    err = capsys.readouterr().err
    assert "note" not in err, err  # the same relative folder: the same file
    assert (f"interrupted in epoch 1 of the run in {run_dir}; resume from its last checkpoint with --config-dir "
            f"{folder.name} --config-name my_run ckpt_path={last}") in err, err


def test_the_documented_examples_compose_as_hydra_composes_them(tmp_path, capsys):
    """The my_run.yaml of docs/training.md section 1 and of zoo train --help, composed by zoo train (--cfg job) and
    by Hydra itself (a config folder holding it, zoo.configs on hydra.searchpath, as an @hydra.main app would):
    the same config, the example's values over train.yaml's (a defaults order with _self_ first would lose seed 7)."""
    import re
    from pathlib import Path

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    root = Path(__file__).resolve().parent.parent
    doc = (root / "docs" / "training.md").read_text(encoding="utf-8")
    docs_yaml = re.search(r"### Your own primary config.*?```yaml\n(.*?)```", doc, re.S).group(1)
    assert cli.main(["train", "--help"]) == 0
    help_lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(help_lines) if line.strip().startswith("# myconf/my_run.yaml"))
    example = []
    for line in help_lines[start + 1:]:
        if not line.startswith("    "):
            break
        example.append(line[4:])
    for where, text in (("docs", docs_yaml), ("help", "\n".join(example) + "\n")):
        conf = tmp_path / where
        conf.mkdir()
        (conf / "my_run.yaml").write_text(text)
        assert cli.main(["train", "-cd", str(conf), "-cn", "my_run", "task.lr=1e-3", "--cfg", "job"]) == 0, where
        ours = _printed(capsys)
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            theirs = hydra_compose("my_run", overrides=["hydra.searchpath=[pkg://zoo.configs]", "task.lr=1e-3"])
        assert ours == OmegaConf.to_container(theirs), where
        assert ours["model"]["name"] == "vit_debug" and ours["seed"] == 7 and ours["task"]["lr"] == 1e-3, where
