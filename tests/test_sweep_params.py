"""Sweeps kept in a config, ``hydra.sweeper.params`` (zoo.train.sweep.config_params), for ``zoo train -m``: the jobs
Hydra's own multirun makes of the same config and command line, the merge rule (a command-line override of a params
key takes its values, in the params entry's place), params from an experiment file, a primary config and the
packaged configs/hparams_search/karate_lr.yaml, refusals of other sweepers' settings, a rerun that continues, and a
plain zoo train (no -m) that runs one config, as Hydra does, with a note."""
from __future__ import annotations

import json
import logging
import textwrap

import pytest
import yaml

from zoo import cli
from zoo.train import run, sweep

# a tiny graph_karate run (tests/test_sweep.py's KARATE): no logger, no test, no release, one epoch
KARATE = ["experiment=graph_karate", "callbacks=minimal", "logger=none", "num_threads=1", "test=false", "export=false",
          "+trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.max_epochs=1"]


def _write(folder, relative, text):
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def config_dir(tmp_path):
    """A --config-dir folder: an experiment with a sweep in its hydra: section, and a primary config with another."""
    folder = tmp_path / "myconf"
    _write(folder, "experiment/karate_params.yaml", """\
        # @package _global_
        defaults:
          - graph_karate
        hydra:
          sweeper:
            params:
              task.lr: 1e-3,3e-3
              seed: range(0,2)
        """)
    _write(folder, "swept.yaml", """\
        defaults: [train, _self_]
        hydra:
          sweeper:
            params:
              model: gat,gatv2
              trainer.max_epochs: 1,2
        """)
    return folder


def _hydra_multirun_jobs(tmp_path, overrides, config_dirs=(), config_name="train"):
    """The jobs Hydra's own multirun makes (``Hydra.multirun`` with its BasicSweeper and BasicLauncher, as
    ``python train.py -m`` would), each job's overrides as its task function sees them (HydraConfig's
    ``overrides.task``): the reference, params merging included."""
    from hydra.core.hydra_config import HydraConfig

    seen = []
    root_handlers = list(logging.getLogger().handlers)
    try:
        with run.hydra_session(config_dirs) as global_hydra:
            global_hydra.hydra.multirun(
                config_name, lambda cfg: seen.append(list(HydraConfig.get().overrides.task)),
                [*overrides, f"hydra.sweep.dir={tmp_path / 'hydra_multirun'}", "hydra/job_logging=none",
                 "hydra/hydra_logging=none"], with_log_configuration=False)
    finally:
        HydraConfig.instance().cfg = None  # a composed zoo config must not see Hydra's runtime config
        logging.getLogger().handlers[:] = root_handlers
    return seen


@pytest.mark.parametrize("overrides, config_name, with_dir", [
    # params of an experiment file; seed's command-line values replace its range(0,2) in its place; a group sweep added
    (["experiment=karate_params", "seed=5,6", "model=gat,gatv2"], "train", True),
    # params of a primary config (--config-name): a group sweep, and trainer.max_epochs replaced by one value
    (["experiment=graph_karate", "trainer.max_epochs=3", "seed=0,1"], "swept", True),
    # the packaged hparams_search group (configs/hparams_search/karate_lr.yaml)
    (["hparams_search=karate_lr", "task.lr=0.02"], "train", False),
])
def test_jobs_are_those_of_hydras_own_multirun(tmp_path, config_dir, overrides, config_name, with_dir):
    dirs = [str(config_dir)] if with_dir else []
    _, jobs = sweep.plan(overrides, str(tmp_path / "sweep"), dirs, config_name=config_name)
    expected = _hydra_multirun_jobs(tmp_path, overrides, dirs, config_name)
    assert [job.overrides for job in jobs] == expected and len(expected) > 1
    assert [job.error for job in jobs] == [None] * len(jobs)


def test_command_line_value_replaces_the_params_entry_in_place(config_dir):
    """BasicSweeper.sweep parses the params entries and then the command line; split_arguments keeps a key's first
    position and its last values (hydra/_internal/core_plugins/basic_sweeper.py)."""
    args = ["experiment=karate_params", "seed=5,6,7"]
    assert sweep.config_params(args, [str(config_dir)]) == ["task.lr=1e-3,3e-3", "seed=range(0,2)"]
    _, jobs = sweep.plan(args, None, [str(config_dir)])
    assert [job.overrides for job in jobs] == [[f"task.lr={lr}", f"seed={seed}", "experiment=karate_params"]
                                               for lr in ("0.001", "0.003") for seed in (5, 6, 7)]


def test_a_group_sweep_in_params_composes_each_option(config_dir):
    _, jobs = sweep.plan(["experiment=graph_karate"], None, [str(config_dir)], config_name="swept")
    assert [job.overrides[:2] for job in jobs] == [["model=gat", "trainer.max_epochs=1"],
                                                  ["model=gat", "trainer.max_epochs=2"],
                                                  ["model=gatv2", "trainer.max_epochs=1"],
                                                  ["model=gatv2", "trainer.max_epochs=2"]]
    composed = [run.compose(job.overrides, config_name="swept", config_dirs=[str(config_dir)]) for job in jobs]
    assert [(cfg.model.name, cfg.trainer.max_epochs) for cfg in composed] == [
        ("gat_node", 1), ("gat_node", 2), ("gatv2_node", 1), ("gatv2_node", 2)]
    assert all("hydra" not in cfg for cfg in composed)  # the jobs' configs (config.yaml, checkpoints) carry no hydra:


def test_params_are_read_when_a_key_exists_in_one_swept_option_only(config_dir):
    """data.num_neighbors exists with graph_karate's data only: the config without the swept values (Hydra's: the
    default data, digits) does not compose, and Hydra would refuse the sweep; zoo reads the params from the command
    line's group choices (hparams_search=lr_only), and the graph_dictlookup jobs fail alone."""
    _write(config_dir, "hparams_search/lr_only.yaml", """\
        # @package _global_
        hydra:
          sweeper:
            params:
              task.lr: 1e-3,3e-3
        """)
    args = ["hparams_search=lr_only", "experiment=graph_karate,graph_dictlookup", "data.num_neighbors=null"]
    _, jobs = sweep.plan(args, None, [str(config_dir)])
    assert [job.overrides for job in jobs] == [[f"task.lr={lr}", "hparams_search=lr_only", f"experiment={name}",
                                                "data.num_neighbors=null"]
                                               for lr in ("0.001", "0.003") for name in ("graph_karate",
                                                                                         "graph_dictlookup")]
    assert [job.error is None for job in jobs] == [True, False] * 2


def _refusal(capsys, argv, tmp_path):
    code = cli.main(["train", "-m", *argv, f"sweep_dir={tmp_path / 'sweep'}"])
    first = capsys.readouterr().err.splitlines()[0]
    assert code == 1 and first.startswith("zoo train: error: "), first
    assert not (tmp_path / "sweep").exists()
    return first


@pytest.mark.parametrize("file_text, message", [
    ("hydra:\n  sweeper:\n    params:\n      task.lr: interval(1e-4,1e-1)\n",
     "hydra.sweeper.params in hparams_search/bad.yaml: task.lr=interval(1e-4,1e-1): interval() is a continuous range "
     "for optimizing sweepers (Optuna, Nevergrad), which zoo train -m does not run"),
    ("hydra:\n  sweeper:\n    params:\n      seed: 0,1\n      task.lr: tag(log, interval(1e-4,1e-1))\n",
     "hydra.sweeper.params in hparams_search/bad.yaml: task.lr=tag(log, interval(1e-4,1e-1)): interval() is"),
    ("hydra:\n  sweeper:\n    params:\n      run_dir: a,b\n",
     "hydra.sweeper.params in hparams_search/bad.yaml: run_dir=a,b: with -m each job has its own run_dir"),
    ("hydra:\n  sweeper:\n    n_trials: 20\n    params:\n      seed: 0,1\n",
     "hydra.sweeper.n_trials (in hparams_search/bad.yaml): zoo train's sweeps (-m) run Hydra's basic sweeper only, whose "
     "settings are hydra.sweeper.params (the values to sweep); drop n_trials"),
    ("hydra:\n  sweeper:\n    sampler:\n      seed: 1\n",
     "hydra.sweeper.sampler (in hparams_search/bad.yaml): zoo train's sweeps (-m) run Hydra's basic sweeper only"),
    ("hydra:\n  sweeper:\n    _target_: hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper\n",
     "hydra.sweeper._target_: hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper (in "
     "hparams_search/bad.yaml): zoo train's sweeps (-m) run Hydra's basic sweeper only"),
    ("defaults:\n  - override /hydra/sweeper: optuna\n",  # lightning-hydra-template's mnist_optuna.yaml
     "hydra/sweeper: optuna: zoo train's sweeps (-m) run Hydra's basic sweeper only"),
])
def test_other_sweepers_settings_are_refused_naming_file_and_key(tmp_path, capsys, config_dir, file_text, message):
    _write(config_dir, "hparams_search/bad.yaml", "# @package _global_\n" + file_text)
    first = _refusal(capsys, [*KARATE, "--config-dir", str(config_dir), "hparams_search=bad"], tmp_path)
    assert message in first, first


def test_a_sweep_in_the_config_runs_and_a_rerun_continues_it(tmp_path, capsys, config_dir):
    """The merged jobs run (each its own zoo train, its config.yaml without hydra:), sweep.json records the params and
    the merged overrides; the same command again keeps the finished jobs; another params block is another sweep."""
    sweep_dir = tmp_path / "sweep"
    argv = ["train", "-m", "--config-dir", str(config_dir), *KARATE, "experiment=karate_params", "seed=3",
            f"sweep_dir={sweep_dir}"]
    assert cli.main(argv) == 0
    written = json.loads((sweep_dir / "sweep.json").read_text())
    assert written["params"] == ["task.lr=1e-3,3e-3", "seed=range(0,2)"]
    assert [job["overrides"][:2] for job in written["jobs"]] == [["task.lr=0.001", "seed=3"],
                                                                ["task.lr=0.003", "seed=3"]]
    assert [job["status"] for job in written["jobs"]] == ["ok", "ok"]
    for number, lr in ((0, 0.001), (1, 0.003)):
        config = yaml.safe_load((sweep_dir / str(number) / "config.yaml").read_text())
        assert (config["task"]["lr"], config["seed"], config["name"]) == (lr, 3, "graph_karate")
        assert "hydra" not in config
    capsys.readouterr()

    assert cli.main(argv) == 0
    again = json.loads((sweep_dir / "sweep.json").read_text())["jobs"]
    assert [(job["status"], job.get("skipped")) for job in again] == [("ok", True), ("ok", True)]
    capsys.readouterr()

    _write(config_dir, "experiment/karate_params.yaml",
           (config_dir / "experiment/karate_params.yaml").read_text().replace("1e-3,3e-3", "1e-3,1e-2"))
    code = cli.main(argv)
    first = capsys.readouterr().err.splitlines()[0]
    assert code == 1 and f"sweep_dir={sweep_dir} holds another sweep (2 jobs, the first task.lr=0.001 seed=3" in first


def test_without_params_nothing_changes(tmp_path):
    args = [*KARATE, "seed=0,1", "task.lr=1e-3,3e-3"]
    assert sweep.config_params(args) == [] and sweep.config_sweep_keys(KARATE) == (False, [])
    _, jobs = sweep.plan(args, str(tmp_path / "sweep"))
    assert [job.overrides for job in jobs] == sweep.expand(args) == _hydra_multirun_jobs(tmp_path, args)


def test_without_m_one_config_runs_with_a_note(capsys):
    """A @hydra.main app without --multirun ignores hydra.sweeper.params (one job, the config's own values): zoo
    train does the same, and says the config holds a sweep that -m runs."""
    assert cli.main(["train", "hparams_search=karate_lr", "--cfg", "job"]) == 0
    captured = capsys.readouterr()
    assert ("zoo train: note: the config defines a sweep (hydra.sweeper.params: task.lr, seed), which zoo train -m "
            "runs; without -m this is one run with the config's own values, as in Hydra") in captured.err
    printed = yaml.safe_load(captured.out)
    assert (printed["task"]["lr"], printed["seed"], printed["trainer"]["max_epochs"]) == (5e-3, 0, 40)
    assert "hydra" not in printed
    assert cli.main(["train", *KARATE, "--cfg", "job"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_cfg_and_help_show_the_config_sweep(tmp_path, capsys):
    assert cli.main(["train", "-m", "hparams_search=karate_lr", "seed=4", f"sweep_dir={tmp_path / 's'}",
                     "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "# job 0: task.lr=0.001 seed=4 hparams_search=karate_lr" in out
    assert "# job 1: task.lr=0.01 seed=4 hparams_search=karate_lr" in out and "\n  lr: 0.01\n" in out
    assert not (tmp_path / "s").exists()
    assert cli.main(["train", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "hydra.sweeper.params" in help_text and "zoo train -m hparams_search=karate_lr" in help_text
    assert "\n  hparams_search: karate_lr" in help_text  # the group's options (zoo.configs)


def _hydra_mode(overrides, config_dirs=()):
    """What Hydra itself decides for a @hydra.main app started without --run / --multirun: ``Hydra.get_mode``
    (hydra/_internal/utils.py run_hydra, then _run_app: a MULTIRUN mode sweeps)."""
    with run.hydra_session(config_dirs) as global_hydra:
        return global_hydra.hydra.get_mode(config_name="train", overrides=list(overrides))


def test_hydra_mode_multirun_in_a_config_sweeps_without_m(tmp_path, capsys, config_dir):
    """lightning-hydra-template's hparams_search files set hydra.mode: MULTIRUN, with which Hydra sweeps although
    the command line has no --multirun; zoo train did one run with a note saying Hydra would do the same."""
    from hydra.types import RunMode

    _write(config_dir, "hparams_search/lht.yaml", """\
        # @package _global_
        defaults:
          - override /experiment: graph_karate
        hydra:
          mode: MULTIRUN
          sweeper:
            params:
              seed: 0,1
        """)
    argv = ["--config-dir", str(config_dir), "hparams_search=lht"]
    assert _hydra_mode(argv[2:], [str(config_dir)]) == RunMode.MULTIRUN
    assert _hydra_mode(["hparams_search=karate_lr"]) is None  # no mode set: one run, as zoo train does
    assert sweep.config_sweep_keys(["hparams_search=lht"], [str(config_dir)]) == (True, ["seed"])
    sweep_dir = tmp_path / "sweep"
    assert cli.main(["train", *argv, f"sweep_dir={sweep_dir}", "--cfg", "job"]) == 0
    captured = capsys.readouterr()
    assert "the config sets hydra.mode: MULTIRUN, so this is a sweep" in captured.err
    assert "# job 0: seed=0 hparams_search=lht" in captured.out and "# job 1: seed=1 hparams_search=lht" in captured.out
    assert _hydra_multirun_jobs(tmp_path, ["hparams_search=lht"], [str(config_dir)]) == [
        ["seed=0", "hparams_search=lht"], ["seed=1", "hparams_search=lht"]]


def test_hydra_sweep_folders_set_in_a_config_are_refused(tmp_path, capsys, config_dir):
    """hydra.sweep.dir / subdir in a config were dropped without a word (on the command line they are refused)."""
    for key, value, expected in (("dir", "/tmp/my_sweeps",
                                  "give the sweep's folder as sweep_dir=DIR on the command line"),
                                 ("subdir", "lr_${task.lr}", "each job's folder is <sweep_dir>/<job number>")):
        _write(config_dir, "hparams_search/folders.yaml",
               f"# @package _global_\nhydra:\n  sweep:\n    {key}: {value}\n  sweeper:\n    params:\n      seed: 0,1\n")
        first = _refusal(capsys, [*KARATE, "--config-dir", str(config_dir), "hparams_search=folders"], tmp_path)
        assert f"hydra.sweep.{key}: {value} (in hparams_search/folders.yaml): zoo train -m does not run Hydra's " \
               f"launcher; {expected}, and drop hydra.sweep.{key} from the config" in first, first


def test_a_params_value_that_does_not_resolve_is_named_in_one_line(tmp_path, capsys, config_dir):
    _write(config_dir, "hparams_search/interp.yaml",
           "# @package _global_\nhydra:\n  sweeper:\n    params:\n      name: ${hydra:job.name}\n")
    first = _refusal(capsys, [*KARATE, "--config-dir", str(config_dir), "hparams_search=interp"], tmp_path)
    assert first.startswith("zoo train: error: hydra.sweeper.params.name (in hparams_search/interp.yaml): "), first
    assert "the sweep's values are read before any job exists" in first


def test_the_note_is_printed_by_the_first_process_only(capsys, monkeypatch):
    for name in ("LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.setenv(name, "1")
        assert cli.main(["train", "hparams_search=karate_lr", "--cfg", "job"]) == 0
        assert "note:" not in capsys.readouterr().err, name
        monkeypatch.delenv(name)


def test_a_refusal_names_a_file_packaged_into_the_sweeper(config_dir):
    """A '# @package hydra.sweeper' file (Hydra's convention for sweeper configs) holds params: at its top; its
    refusal said 'in the config' instead of naming it."""
    _write(config_dir, "sweeps/bad.yaml", "# @package hydra.sweeper\nparams:\n  run_dir: /tmp/a,/tmp/b\n")
    with pytest.raises(ValueError, match=r"^hydra\.sweeper\.params in sweeps/bad\.yaml: run_dir=/tmp/a,/tmp/b: with -m"):
        sweep.config_params([*KARATE, "+sweeps=bad"], [str(config_dir)])
