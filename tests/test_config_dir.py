"""zoo train with the user's own config folder: ``--config-dir DIR`` (Hydra's spellings ``--config-dir=DIR``,
``-cd DIR``) and ``hydra.searchpath=[...]``, compared with Hydra's own compose API given the same search path; the
packaged options still resolve, a missing folder is named, and Hydra's flags zoo train does not take are refused in
one line."""
from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from zoo import cli
from zoo.train import run, sweep

MODEL = """_target_: zoo.create_model
_convert_: all
name: gat_${data.model_kind}
pretrained: false
in_channels: ${data.num_features}
num_classes: ${data.num_classes}
heads: 3
"""
EXPERIMENT = """# @package _global_
defaults:
  - override /task: graph_node
  - override /data: graph_karate
  - override /model: my_gat
name: my_karate
seed: 1
"""


@pytest.fixture
def user_configs(tmp_path):
    """A folder of the user's own configs: experiment/my_karate.yaml picking model/my_gat.yaml (3 heads)."""
    folder = tmp_path / "mycfg"
    (folder / "experiment").mkdir(parents=True)
    (folder / "model").mkdir()
    (folder / "model" / "my_gat.yaml").write_text(MODEL)
    (folder / "experiment" / "my_karate.yaml").write_text(EXPERIMENT)
    return folder


def _hydra_compose(overrides, folder):
    """The reference: Hydra's own compose API on zoo.configs, with the folder in hydra.searchpath."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=run.CONFIG_MODULE, version_base="1.3"):
        return OmegaConf.to_container(compose("train", overrides=[*overrides, f"hydra.searchpath=[file://{folder}]"]))


def test_user_experiment_and_model_compose_as_hydra_composes_them(user_configs, capsys):
    expected = _hydra_compose(["experiment=my_karate"], user_configs)
    assert expected["model"]["heads"] == 3 and expected["name"] == "my_karate"
    for spelling in (["--config-dir", str(user_configs)], [f"--config-dir={user_configs}"],
                     ["-cd", str(user_configs)], [f"hydra.searchpath=[file://{user_configs}]"]):
        assert cli.main(["train", "experiment=my_karate", *spelling, "--cfg", "job"]) == 0, spelling
        assert OmegaConf.to_container(OmegaConf.create(capsys.readouterr().out)) == expected, spelling


def test_packaged_options_still_resolve_beside_the_users(user_configs):
    for overrides in (["experiment=graph_karate"], ["experiment=graph_karate", "model=gat"], ["debug=fast"]):
        alone = OmegaConf.to_container(run.compose(overrides))
        assert OmegaConf.to_container(run.compose(overrides, config_dirs=[str(user_configs)])) == alone
    # a glob() sweep lists the user's options of the group too
    assert sweep.expand(["model=glob(my_*)"], config_dirs=[str(user_configs)]) == [["model=my_gat"]]


def test_user_experiment_trains_one_step(user_configs, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli.main(["train", "--config-dir", str(user_configs), "experiment=my_karate", "debug=fast",
                     "logger=none", "num_threads=1", "test=false", "export=false", f"run_dir={run_dir}"]) == 0
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.name == "my_karate" and saved.model.heads == 3 and saved.model.name == "gat_node"
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] >= 1


def test_a_sweep_composes_each_job_with_the_users_folder(user_configs, tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    assert cli.main(["train", "-m", "-cd", str(user_configs), "experiment=my_karate", "model=my_gat,gat",
                     f"sweep_dir={sweep_dir}", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "heads: 3" in out and "heads: 8" not in out and "name: gat_" in out


@pytest.mark.parametrize("spelling", [["--config-dir", "{missing}"], ["hydra.searchpath=[file://{missing}]"]])
def test_a_missing_folder_is_named(tmp_path, capsys, spelling):
    missing = tmp_path / "nope"
    argv = [item.format(missing=missing) for item in spelling]
    assert cli.main(["train", "experiment=graph_karate", *argv, "--cfg", "job"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("zoo train: error: ") and str(missing) in err[0] and "is not a folder" in err[0], err


@pytest.mark.parametrize("flag", ["--info", "--config-path=conf"])  # (--config-name: test_config_name.py)
def test_hydra_flags_zoo_train_does_not_take_are_refused_in_one_line(capsys, flag):
    assert cli.main(["train", "experiment=graph_karate", flag, "--cfg", "job"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"zoo train: error: {flag}") and "zoo train supports --cfg job|all" in err[0], err
    assert "--config-dir DIR" in err[0] and "Lexer" not in err[0]


def test_glob_lists_the_options_of_a_hydra_searchpath_folder_too(user_configs):
    """glob() in a sweep saw the --config-dir folders only: with hydra.searchpath=[file://DIR] the same sweep had no
    jobs (review, 2026-12-07)."""
    searchpath = f"hydra.searchpath=[file://{user_configs}]"
    (job,) = sweep.expand([searchpath, "model=glob(my_*)"])  # (Hydra writes the searchpath back with ":" escaped)
    assert job[-1] == "model=my_gat" and job[0].startswith("hydra.searchpath=")
    assert sweep.expand(["model=glob(my_*)"], config_dirs=[str(user_configs)]) == [["model=my_gat"]]


def test_compose_gives_the_callers_own_hydra_state_back(tmp_path):
    """run.compose inside a user's own Hydra session (initialize_config_dir, @hydra.main) cleared it: the user's next
    hydra.compose failed, and version_base was left at 1.3 (review, 2026-12-07). The caller's GlobalHydra and version
    base are restored; with none, none is left behind."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.version import VersionBase

    (tmp_path / "mine.yaml").write_text("greeting: hello\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.2"):
        base = VersionBase.instance().getbase()
        assert run.compose(["experiment=graph_karate"]).model.heads >= 1
        assert compose("mine").greeting == "hello"  # the user's session still composes
        assert VersionBase.instance().getbase() == base
        sweep.expand(["seed=0,1"])
        assert compose("mine").greeting == "hello"
    run.compose(["experiment=graph_karate"])
    assert not GlobalHydra.instance().is_initialized()
