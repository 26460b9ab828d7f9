"""zoo train -m / --multirun (zoo.train.sweep): Hydra's BasicSweeper's expansion, one zoo train per job in its own
run directory, sweep.json, failed jobs, and a rerun that keeps finished jobs and resumes an interrupted one."""
from __future__ import annotations

import json
import signal

import pytest
import torch
import yaml

from zoo import cli
from zoo.train import run, sweep

# a tiny graph_karate run (as tests/test_train.py's _karate): last.ckpt every epoch, no logger, no test, no release
KARATE = ["experiment=graph_karate", "callbacks=minimal", "logger=none", "num_threads=1", "test=false", "export=false",
          "+trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.max_epochs=2"]


def _hydra_jobs(overrides):
    """The jobs Hydra's own BasicSweeper makes of ``overrides`` (its parser with zoo.configs' config loader for
    glob(), then BasicSweeper.split_arguments): the reference."""
    from hydra import initialize_config_module
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=run.CONFIG_MODULE, version_base="1.3"):
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        return BasicSweeper.split_arguments(parser.parse_overrides(list(overrides)), None)[0]


@pytest.mark.parametrize("overrides", [
    ["task.lr=1e-3,3e-3", "seed=range(0,3)"],
    ["experiment=graph_karate", "model=gat,gatv2", "seed=choice(1,2)", "trainer.max_epochs=2"],
    ["model=glob(vit_*)", "+model.depth=1,2", "seed=0", "seed=5,6"],  # glob over a group; a key given twice
    ["data.batch_size=range(8,32,8)", "name=a,b"],
])
def test_expansion_is_hydras_basic_sweeper(overrides):
    jobs = sweep.expand(overrides)
    assert jobs == _hydra_jobs(overrides)
    assert len(jobs) > 1


def _records(sweep_dir):
    return json.loads((sweep_dir / "sweep.json").read_text())["jobs"]


def test_jobs_run_in_their_own_dirs_with_their_configs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # Rich's table on one line per job
    sweep_dir = tmp_path / "lr, seed"  # a comma: each job's run_dir= is quoted for Hydra's grammar
    sweep_args = [*KARATE, "task.lr=1e-3,3e-3", "seed=0,1"]
    code = cli.main(["train", "-m", *sweep_args, f"sweep_dir={sweep_dir}"])
    assert code == 0
    hydra_jobs = _hydra_jobs(sweep_args)  # Hydra's spelling of each override (1e-3 -> 0.001, false -> False)
    expected = [("0.001", 0), ("0.001", 1), ("0.003", 0), ("0.003", 1)]  # Hydra's order: the last key fastest
    records = _records(sweep_dir)
    assert [r["job"] for r in records] == [0, 1, 2, 3]
    for record, (lr, seed), hydra_job in zip(records, expected, hydra_jobs):
        job_dir = sweep_dir / str(record["job"])
        assert record["run_dir"] == str(job_dir)
        assert record["overrides"] == hydra_job and hydra_job[-2:] == [f"task.lr={lr}", f"seed={seed}"]
        assert record["status"] == "ok" and record["error"] is None and record["seconds"] > 0
        config = yaml.safe_load((job_dir / "config.yaml").read_text())
        assert (config["task"]["lr"], config["seed"], config["run_dir"]) == (float(lr), seed, str(job_dir))
        finished = json.loads((job_dir / "metrics.json").read_text())
        assert record["metrics"] == finished["metrics"] and "train/loss" in record["metrics"]
    rows = [line for line in capsys.readouterr().out.splitlines() if "task.lr=" in line]
    # the table shows the swept overrides (all of them are in sweep.json)
    assert len(rows) == 4 and rows[3].split("│")[2].strip() == "task.lr=0.003 seed=1", rows
    assert rows[3].split("│")[-2].strip() == "ok" and "experiment=" not in rows[3], rows


def test_a_failed_job_does_not_stop_the_others(tmp_path, capsys, monkeypatch):
    """seed=abc composes (seed is a plain key) and fails in training (zoo train: "seed must be an integer"); a key
    that one option of a group sweep lacks (graph_dictlookup has no data.num_neighbors) fails that job's
    composition only. Hydra would stop at the first failure; the other jobs run, and the exit status is 1."""
    monkeypatch.setenv("COLUMNS", "400")
    sweep_dir = tmp_path / "sweep"
    code = cli.main(["train", "-m", *KARATE, "seed=abc,0", f"sweep_dir={sweep_dir}"])
    assert code == 1
    failed, ok = _records(sweep_dir)
    assert failed["status"] == "failed" and failed["error"] == "ValueError: seed must be an integer, got 'abc'"
    assert ok["status"] == "ok" and (sweep_dir / "1" / "metrics.json").is_file()
    captured = capsys.readouterr()
    assert "zoo train -m: job 0 failed: ValueError: seed must be an integer, got 'abc'" in captured.err
    assert "failed: ValueError: seed must be an integer" in captured.out  # the table's status column

    groups = tmp_path / "groups"
    code = cli.main(["train", "-m", *KARATE[1:], "experiment=graph_karate,graph_dictlookup",
                     "data.num_neighbors=null", f"sweep_dir={groups}"])
    assert code == 1
    ok, failed = _records(groups)
    assert ok["status"] == "ok" and (groups / "0" / "metrics.json").is_file()
    assert failed["status"] == "failed" and "data.num_neighbors" in failed["error"]
    assert not (groups / "1").exists()


def test_rerun_keeps_finished_jobs_and_resumes_the_interrupted_one(tmp_path, monkeypatch, capsys):
    """A sweep killed in its second job (Ctrl-C in epoch 1, as test_train's test_ctrl_c_says_how_to_resume) continues
    when rerun: job 0 is kept as it was, job 1 resumes from its last.ckpt, job 2 runs."""
    import lightning.pytorch as pl

    sweep_dir = tmp_path / "sweep"
    argv = ["train", "-m", *KARATE, "trainer.max_epochs=3", "seed=0,1,2", f"sweep_dir={sweep_dir}"]
    started = []

    class CtrlCInSecondJob(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if len(started) == 2 and trainer.current_epoch == 1:
                raise KeyboardInterrupt

    real_group, real_train = run._instantiate_group, run.train
    monkeypatch.setattr(run, "_instantiate_group", lambda node: real_group(node) + (
        [CtrlCInSecondJob()] if node is not None and "last" in str(node) else []))
    monkeypatch.setattr(run, "train", lambda cfg, **kw: started.append(cfg.get("ckpt_path")) or real_train(cfg, **kw))
    handler = signal.getsignal(signal.SIGINT)
    try:
        code = cli.main(argv)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT while it shuts down
    # 130, as an interrupted process (it exited 1, the status of "a job failed"); the sweep's advice only (the job's
    # own "resume ... with ckpt_path=" named an override that -m refuses)
    assert code == 130
    assert [r["status"] for r in _records(sweep_dir)] == ["ok", "interrupted", "pending"]
    err = capsys.readouterr().err
    assert (f"zoo train -m: sweep interrupted in job 1; rerun the same command with sweep_dir={sweep_dir} to "
            f"continue it (finished jobs are kept, job 1 resumes from {sweep_dir / '1' / 'checkpoints' / 'last.ckpt'})"
            ) in err
    assert "ckpt_path=" not in err, err
    first_metrics = (sweep_dir / "0" / "metrics.json").read_bytes()
    last = sweep_dir / "1" / "checkpoints" / "last.ckpt"
    assert last.is_file() and not (sweep_dir / "1" / "metrics.json").exists()

    monkeypatch.setattr(run, "_instantiate_group", real_group)
    started.clear()
    assert cli.main(argv) == 0
    assert started == [str(last), None]  # job 0 not run again; job 1 resumed from its last.ckpt; job 2 new
    records = _records(sweep_dir)
    assert [r["status"] for r in records] == ["ok", "ok", "ok"]
    assert records[0]["skipped"] and records[1]["resumed_from"] == str(last)
    assert (sweep_dir / "0" / "metrics.json").read_bytes() == first_metrics
    assert torch.load(last, weights_only=True)["epoch"] == 2  # trained on to trainer.max_epochs=3


def test_another_sweep_in_the_same_dir_is_refused(tmp_path):
    sweep_dir = tmp_path / "sweep"
    (sweep_dir).mkdir()
    (sweep_dir / "sweep.json").write_text(json.dumps({"jobs": [{"overrides": ["seed=7"]}]}))
    with pytest.raises(ValueError, match=r"holds another sweep \(1 jobs, the first seed=7\): give another sweep_dir"):
        sweep.plan([*KARATE, "seed=0,1"], str(sweep_dir))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="non-empty folder without sweep.json"):
        sweep.plan([*KARATE, "seed=0,1"], str(tmp_path / "busy"))


@pytest.mark.parametrize("argv, message", [
    (["seed=0,1", "run_dir=out"], "run_dir=out: with -m each job has its own run_dir"),
    (["seed=0,1", "ckpt_path=x.ckpt"], "ckpt_path=x.ckpt: with -m each job resumes from its own checkpoint"),
    (["task.lr=interval(0.001,0.1)"], "task.lr=interval(0.001,0.1): interval() is a continuous range for "
                                      "optimizing sweepers"),
    (["seed=range(0,0)"], "the sweep has no jobs: seed=range(0,0) gives no values"),
    (["model=glob(nothing_*)"], "the sweep has no jobs: model=glob(nothing_*) gives no values"),
    (["seed=0,1", "trainer=ddp_cpu"], "job 0 runs on several processes (trainer.devices=2), which a sweep cannot: "
                                      "Lightning's DDP starts the other ranks by re-running the command line"),
])
def test_bad_sweeps_are_refused_in_one_line(tmp_path, capsys, argv, message):
    code = cli.main(["train", "-m", *KARATE, *argv, f"sweep_dir={tmp_path / 'sweep'}"])
    err = capsys.readouterr().err
    assert code == 1
    first = err.splitlines()[0]
    assert first.startswith("zoo train: error: ") and message in first, err
    assert not (tmp_path / "sweep").exists()


def test_cfg_prints_each_jobs_config(tmp_path, capsys):
    assert cli.main(["train", "--multirun", *KARATE, "seed=3,4", f"sweep_dir={tmp_path / 's'}", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    first_job = " ".join(_hydra_jobs([*KARATE, "seed=3,4"])[0])
    assert f"# job 0: {first_job} (run_dir={tmp_path / 's' / '0'})" in out and first_job.endswith(" seed=3")
    assert "\nseed: 3\n" in out and "\nseed: 4\n" in out and f"run_dir: {tmp_path / 's' / '1'}" in out
    assert not (tmp_path / "s").exists()


def test_help_documents_multirun(capsys):
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "or: zoo train -m|--multirun" in out and "sweep.json" in out


def test_default_sweep_dir_is_beside_zoo_trains_run_dirs(tmp_path, monkeypatch):
    """No sweep_dir=: outputs/<name>/multirun/<date>_<time> (zoo train's own runs go to outputs/<name>/<date>_<time>),
    each job in <sweep_dir>/<job number>."""
    monkeypatch.chdir(tmp_path)
    root, jobs = sweep.plan([*KARATE, "seed=0,1"])
    assert root.parent == tmp_path / "outputs" / "graph_karate" / "multirun"
    assert len(root.name) == len("2026-12-06_22-48-42") and root.name[10] == "_"
    assert [job.run_dir for job in jobs] == [root / "0", root / "1"] and not root.exists()


def test_the_table_is_not_cut_when_piped(tmp_path, capsys):
    """Piped or redirected, Rich's 80 columns cut the swept overrides and metric names to "model=v…"."""
    records = [{"job": i, "overrides": [f"model={name}", "experiment=vit_digits"], "status": "ok",
                "metrics": {key: 0.5 for key in sweep._KEY_METRICS}} for i, name in enumerate(("vit_debug", "maxvit_debug"))]
    sweep.print_table(tmp_path, records)
    out = capsys.readouterr().out
    assert "model=maxvit_debug" in out and all(key in out for key in sweep._KEY_METRICS), out


def test_a_rerun_keeps_the_stored_job_order_and_times(tmp_path):
    """shuffle() orders the jobs anew on each expansion (Hydra does not seed it), so rerunning the same command was
    refused as "holds another sweep": the same set of jobs now takes sweep.json's order (each job number keeps its
    overrides and run directory); another set is still refused. A kept job keeps its recorded seconds (the job's
    wall time; metrics.json's "seconds" is the fit's alone)."""
    sweep_dir = tmp_path / "sweep"
    args = [*KARATE, "seed=shuffle(0,1,2,3,4,5)"]
    _, planned = sweep.plan(args, str(sweep_dir))
    stored = sorted((job.overrides for job in planned), key=lambda overrides: overrides[-1], reverse=True)
    assert [overrides[-1] for overrides in stored] == [f"seed={seed}" for seed in (5, 4, 3, 2, 1, 0)]
    records = []
    for number, overrides in enumerate(stored):  # a finished sweep, run in the order seed=5, 4, ..., 0
        (sweep_dir / str(number)).mkdir(parents=True)
        finished = {"metrics": {"val/acc1": number / 10}, "seconds": 1.5}
        (sweep_dir / str(number) / "metrics.json").write_text(json.dumps(finished))
        records.append({"job": number, "overrides": overrides, "run_dir": str(sweep_dir / str(number)),
                        "status": "ok", "error": None, "metrics": finished["metrics"], "seconds": 9.0})
    (sweep_dir / "sweep.json").write_text(json.dumps({"sweep_dir": str(sweep_dir), "overrides": args,
                                                      "jobs": records}))
    _, again = sweep.plan(args, str(sweep_dir))
    assert [(job.number, job.overrides, job.run_dir) for job in again] == [
        (number, overrides, sweep_dir / str(number)) for number, overrides in enumerate(stored)]
    root, result = sweep.run(args, str(sweep_dir))
    assert [record["overrides"] for record in result] == stored and _records(sweep_dir) == result
    for record in result:
        assert record["status"] == "ok" and record["skipped"] and record["seconds"] == 9.0
        assert record["metrics"] == {"val/acc1": record["job"] / 10}
    with pytest.raises(ValueError, match=r"holds another sweep \(6 jobs, the first .* seed=5\)"):
        sweep.plan([*KARATE, "seed=shuffle(0,1,2,3,4,6)"], str(sweep_dir))


def test_each_job_starts_from_the_process_settings(tmp_path, monkeypatch):
    """The jobs run in one process: a job's num_threads=1 (experiment=vit_digits sets it) made every later job run
    on one thread, with other weights than the same job run alone; its seed_everything left PL_GLOBAL_SEED set.
    Each job now starts from the process's own settings, and the sweep leaves them as they were."""
    seen = []
    real_train = run.train
    monkeypatch.setattr(run, "train", lambda cfg, **kw: seen.append(torch.get_num_threads()) or real_train(cfg, **kw))
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    default = torch.get_num_threads()
    torch.set_num_threads(2)  # the process's count, other than job 0's num_threads=1
    try:
        code = cli.main(["train", "-m", *KARATE, "trainer.max_epochs=1", "num_threads=1,null",
                         f"sweep_dir={tmp_path / 'sweep'}"])
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(default)
    threads = [[item for item in record["overrides"] if item.startswith("num_threads=")]
               for record in _records(tmp_path / "sweep")]
    assert code == 0 and threads == [["num_threads=1"], ["num_threads=null"]]
    assert seen == [2, 2] and after == 2
    assert "PL_GLOBAL_SEED" not in __import__("os").environ


def test_sigterm_stops_the_sweep_with_exit_status_143(tmp_path, capsys, sigterm_in_first_epoch):
    """SIGTERM (a scheduler's, kill's) makes Lightning raise SIGTERMException, a SystemExit without a code: the
    sweep stopped and the process exited 0, as if it had ended. It now exits 143 (128 + SIGTERM), says how to
    continue, and job 0 is recorded as interrupted."""
    sweep_dir = tmp_path / "sweep"
    code = cli.main(["train", "-m", *KARATE, "trainer.max_epochs=3", "seed=0,1", f"sweep_dir={sweep_dir}"])
    assert code == 143
    assert [r["status"] for r in _records(sweep_dir)] == ["interrupted", "pending"]
    assert (f"zoo train -m: sweep terminated (SIGTERM) in job 0; rerun the same command with sweep_dir={sweep_dir} "
            f"to continue it") in capsys.readouterr().err


def test_home_is_expanded_in_every_swept_value(tmp_path, monkeypatch):
    """key=~/a,~/b: zoo train's ~ expansion (a single path) expanded the first value only, which Hydra's grammar
    then refused, quoting the rewritten text. Each element is expanded; errors quote the override as written."""
    import re

    monkeypatch.setenv("HOME", str(tmp_path))
    jobs = sweep.expand(["data.path=~/a,~/b", "+extra=choice(~/c,~)", "+quoted='~/d'"])
    assert jobs == _hydra_jobs([f"data.path={tmp_path}/a,{tmp_path}/b", f"+extra=choice({tmp_path}/c,{tmp_path})",
                                "+quoted='~/d'"])
    assert jobs[0][0] == f"data.path={tmp_path}/a" and len(jobs) == 4
    with pytest.raises(ValueError, match=re.escape("override 'data.path=~/a,b)' is not a Hydra override")):
        sweep.expand(["data.path=~/a,b)"])


def test_a_sweep_dir_with_an_interpolation_is_refused(tmp_path, capsys, monkeypatch):
    """sweep_dir=outputs/${name}: Hydra resolved ${name} in each job's run_dir= override while sweep.json stayed in
    the literal folder, so a rerun failed every job; it is refused before any job runs."""
    monkeypatch.chdir(tmp_path)
    code = cli.main(["train", "-m", *KARATE, "seed=0,1", "sweep_dir=sd_${name}"])
    first = capsys.readouterr().err.splitlines()[0]
    assert code == 1 and first.startswith("zoo train: error: sweep_dir=sd_${name}: sweep_dir is a folder, not "
                                          "resolved as a config value"), first
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["hydra.sweep.dir=/tmp/x"], "hydra.sweep.dir=/tmp/x: zoo train -m does not run Hydra's app runner; give the "
                                 "sweep's folder as sweep_dir=/tmp/x"),
    (["hydra.sweep.subdir=job"], "hydra.sweep.subdir=job: each job's folder is <sweep_dir>/<job number>"),
    (["+hydra.sweeper.params.seed=0,1"], "+hydra.sweeper.params.seed=0,1: Hydra sweeper settings (hydra.sweeper.*) "
                                         "are not taken as command-line overrides; give the swept values on the "
                                         "command line (KEY=A,B), or in a config file's hydra.sweeper.params"),
    (["hydra.job.chdir=true"], "hydra.job.chdir=true: zoo train composes its config without Hydra's app runner"),
])
def test_hydra_settings_are_refused_before_any_job(tmp_path, capsys, argv, message):
    """hydra.sweep.dir= (lightning-hydra-template's spelling) was not refused up front: every job failed, with advice
    pointing at run_dir=, itself refused with -m."""
    code = cli.main(["train", "-m", *KARATE, "seed=0,1", *argv, f"sweep_dir={tmp_path / 'sweep'}"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.splitlines()[0].startswith("zoo train: error: ") and message in err.splitlines()[0], err
    assert not (tmp_path / "sweep").exists()


def test_variables_a_library_sets_at_import_stay_for_later_jobs(tmp_path, monkeypatch, capsys):
    """The restore deleted every variable a job added: scikit-learn's import-time KMP_* settings, set once when job 0
    first imported it, were gone for every later job. Only what zoo train and Lightning set is restored."""
    import os

    monkeypatch.delenv("ZOO_TEST_IMPORT_TIME", raising=False)
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # an earlier run.train in this process set it
    seen = []
    real_train = run.train

    def train(cfg, **kwargs):
        os.environ.setdefault("ZOO_TEST_IMPORT_TIME", "1")  # as a module imported for the first time would
        seen.append(os.environ.get("PL_GLOBAL_SEED"))
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(run, "train", train)
    assert cli.main(["train", "-m", *KARATE, "seed=0,1", f"sweep_dir={tmp_path / 'sweep'}"]) == 0
    assert os.environ.get("ZOO_TEST_IMPORT_TIME") == "1"
    assert "PL_GLOBAL_SEED" not in os.environ and seen == [None, None]


def test_an_internal_error_keeps_its_traceback(tmp_path, capsys, monkeypatch):
    """A job's RuntimeError (not a user error: a plain zoo train shows its traceback) left only its one-line error,
    even with ZOO_DEBUG=1. Its traceback is kept in <run_dir>/error.txt, named in the failure line and sweep.json,
    and printed under ZOO_DEBUG=1; a user error (ValueError) keeps its one line only."""
    monkeypatch.delenv("ZOO_DEBUG", raising=False)
    bad_callback = ["+callbacks.bad._target_=torch.zeros", "+callbacks.bad.size=[-1]"]
    sweep_dir = tmp_path / "sweep"
    assert cli.main(["train", "-m", *KARATE, *bad_callback, "seed=0,1", f"sweep_dir={sweep_dir}"]) == 1
    err = capsys.readouterr().err
    saved = sweep_dir / "0" / "error.txt"
    assert (f"zoo train -m: job 0 failed: RuntimeError: zeros: Dimension size must be non-negative. (traceback in "
            f"{saved})") in err and "Traceback (most recent call last)" not in err
    text = saved.read_text()
    assert "Traceback (most recent call last)" in text and "_call_target" in text and "RuntimeError: zeros" in text
    assert _records(sweep_dir)[1]["traceback"] == str(sweep_dir / "1" / "error.txt")

    monkeypatch.setenv("ZOO_DEBUG", "1")
    assert cli.main(["train", "-m", *KARATE, *bad_callback, "seed=2", f"sweep_dir={tmp_path / 'debug'}"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err

    monkeypatch.delenv("ZOO_DEBUG")
    assert cli.main(["train", "-m", *KARATE, "seed=abc,def", f"sweep_dir={tmp_path / 'user'}"]) == 1
    assert "job 0 failed: ValueError: seed must be an integer" in capsys.readouterr().err
    assert not (tmp_path / "user" / "0" / "error.txt").exists() and "traceback" not in _records(tmp_path / "user")[0]


def test_cfg_prints_every_job_and_the_errors_in_place(tmp_path, capsys):
    """--cfg job with -m stopped at the first job that did not compose: the jobs after it were never shown."""
    code = cli.main(["train", "-m", *KARATE, "model=gatv3,gat", f"sweep_dir={tmp_path / 's'}", "--cfg", "job"])
    captured = capsys.readouterr()
    assert code == 1
    out = captured.out
    assert "# job 0: error: ValueError: unknown model=gatv3: did you mean gatv2" in out
    assert out.index("# job 0: error:") < out.index("# job 1: ") and "name: gat_${data.model_kind}" in out
    assert "1 of 2 job(s) do not compose (job 0)" in captured.err
    assert not (tmp_path / "s").exists()


def test_a_multi_node_job_is_refused_even_on_one_device(tmp_path, capsys):
    """trainer.num_nodes=2 with trainer.devices=1 is two processes (one per node), each re-running the command line,
    as trainer.devices=2 is: refused before any job runs, naming both settings (mutation audit m12: a check of the
    device count alone let it through)."""
    code = cli.main(["train", "-m", *KARATE, "++trainer.num_nodes=2", "seed=0,1", f"sweep_dir={tmp_path / 'sweep'}"])
    first = capsys.readouterr().err.splitlines()[0]
    assert code == 1
    assert first.startswith("zoo train: error: job 0 runs on several processes (trainer.devices=1, "
                            "trainer.num_nodes=2), which a sweep cannot"), first
    assert not (tmp_path / "sweep").exists()
    sweep.check_single_process(run.compose([*KARATE, "++trainer.num_nodes=1"]), 0)  # one node, one device: a job


def test_a_rerun_that_finishes_a_failed_job_removes_its_old_traceback(tmp_path, monkeypatch):
    """A job that failed with an internal error keeps its traceback in <run_dir>/error.txt; rerun with the same
    sweep_dir and finished, its folder no longer holds that file (it would read as the job's failure), and its record
    names no traceback (mutation audit m12)."""
    monkeypatch.delenv("ZOO_DEBUG", raising=False)
    sweep_dir = tmp_path / "sweep"
    args = [*KARATE, "seed=0"]

    def broken(cfg, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(run, "train", broken)
    _, records = sweep.run(args, str(sweep_dir))
    saved = sweep_dir / "0" / sweep.ERROR_FILE
    assert records[0]["status"] == "failed" and records[0]["traceback"] == str(saved) and saved.is_file()
    monkeypatch.setattr(run, "train", lambda cfg, **kwargs: {"metrics": {"val/acc1": 0.5}})
    _, records = sweep.run(args, str(sweep_dir))
    assert records[0]["status"] == "ok" and records[0]["metrics"] == {"val/acc1": 0.5}
    assert "traceback" not in records[0] and not saved.exists()
    assert "traceback" not in _records(sweep_dir)[0]
