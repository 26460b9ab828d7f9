"""Options of `zoo viz graph` with ckpt= and of `python -m zoo.tasks.graph.train` that were dropped without a word
(review I of 2026-12-07): `data=<the checkpoint's data>` drew the default DictionaryLookup split or the seed-0 SBM
graph instead of the run's; `--table` ignored the overrides, and one run ignored `--max-epochs` / `--runs`.

The references are `zoo eval`'s figure for the checkpoint (zoo.train.run.evaluate, which reads the recorded split),
the split of zoo.tasks.graph.dictlookup for the recorded arguments and load_node_dataset for the recorded seed."""
from __future__ import annotations

import re

import pytest

pytest.importorskip("hydra")




def _spy_drawings(monkeypatch):
    """Record what zoo viz graph would draw (title, node names, edge count) instead of drawing it."""
    from zoo.tasks.graph import viz

    drawn = []

    def record(edge_index, alpha, node, out, labels=None, title="", names=None):
        drawn.append({"title": title, "names": names, "edges": int(edge_index.size(1))})
        return out

    monkeypatch.setattr(viz, "draw_neighbourhood", record)
    return drawn


def _accuracy_in_title(title: str) -> float:
    return float(title.rsplit("acc", 1)[1].split()[-1].strip("()"))


def _train(tmp_path, overrides):
    from zoo.train import run

    run_dir = tmp_path / "run"
    run.train(run.compose([*overrides, "callbacks=minimal", "logger=none", "num_threads=1",
                           "+trainer.enable_progress_bar=false", f"run_dir={run_dir}"]))
    return run_dir


def test_viz_dictlookup_ckpt_with_data_draws_the_split_the_run_trained_on(tmp_path, one_thread, monkeypatch):
    """`data=dictlookup ckpt=<run>` (the documented form) drew the default split (seed 11, fraction 0.8): another
    test graph for each example, a test accuracy that was not zoo eval's, and test graphs the model trained on."""
    from zoo.tasks.graph.dictlookup import generate_permutations, unseen_combinations_split
    from zoo.tasks.graph.viz import main as viz
    from zoo.train import run

    run_dir = _train(tmp_path, ["experiment=graph_dictlookup", "data.k=4", "data.seed=3", "data.train_fraction=0.5",
                                "trainer.max_epochs=2"])
    _, test_perms = unseen_combinations_split(generate_permutations(4, seed=3), train_fraction=0.5, seed=3)
    _, default_test_perms = unseen_combinations_split(generate_permutations(4))
    # the test can fail: the default split has fewer test graphs and another second one
    assert len(default_test_perms) <= 10 < len(test_perms)
    assert default_test_perms[1].tolist() != test_perms[1].tolist()
    evaluated = run.evaluate(str(run_dir / "checkpoints" / "last.ckpt"))["test/acc1"]

    drawn = _spy_drawings(monkeypatch)
    out = f"out={tmp_path / 'a.png'}"
    for ckpt in (run_dir, run_dir / "released", run_dir / "checkpoints" / "last.ckpt"):
        for data in ([], ["data=dictlookup"], ["data=dictlookup", "k=4"]):  # k is recorded: k= may be left out
            for example in (1, 10):
                assert viz([*data, f"ckpt={ckpt}", f"example={example}", "node=1", out]) == 0
                names = drawn[-1]["names"]
                assert [int(names[4 + key].split(":")[1]) for key in range(4)] == test_perms[example].tolist()
                assert _accuracy_in_title(drawn[-1]["title"]) == pytest.approx(evaluated, abs=5e-4)


def test_viz_dictlookup_ckpt_refuses_a_k_or_seed_the_record_contradicts(tmp_path, one_thread):
    """k= of another size was refused only after the split was drawn ("pass k=", although k is recorded); seed= with
    ckpt= did nothing (the split is the record's and nothing is trained): both are named now."""
    from zoo.tasks.graph.viz import main as viz

    run_dir = _train(tmp_path, ["experiment=graph_dictlookup", "data.k=4", "data.seed=3", "trainer.max_epochs=1"])
    out = f"out={tmp_path / 'a.png'}"
    with pytest.raises(SystemExit, match=r"^zoo viz graph: k=5 contradicts the checkpoint, a model trained on "
                                         r"data\.k=4: leave k= out"):
        viz(["data=dictlookup", "k=5", f"ckpt={run_dir}", out])
    for data in ([], ["data=dictlookup"]):
        with pytest.raises(SystemExit, match=r"^zoo viz graph: seed=3 applies to data=dictlookup only without ckpt= "
                                             r"\(it seeds the training\); .* the split \(its recorded data\.seed=3\)"):
            viz([*data, "seed=3", f"ckpt={run_dir}", out])


def test_viz_node_ckpt_with_data_draws_the_graph_the_run_trained_on(tmp_path, one_thread, monkeypatch):
    """`data=sbm ckpt=<run of data.seed=5>` drew the seed-0 SBM graph (another graph, another test accuracy)."""
    from zoo.tasks.graph.datasets import load_node_dataset
    from zoo.tasks.graph.viz import main as viz
    from zoo.train import run

    run_dir = _train(tmp_path, ["experiment=graph_sbm", "data.seed=5", "trainer.max_epochs=2",
                                "trainer.check_val_every_n_epoch=1"])
    graph = load_node_dataset("sbm", seed=5)
    default_graph = load_node_dataset("sbm", seed=0)
    assert graph["edge_index"].size(1) != default_graph["edge_index"].size(1)  # the test can fail
    node = 0
    evaluated = run.evaluate(str(run_dir / "checkpoints" / "last.ckpt"))["test/acc1"]

    drawn = _spy_drawings(monkeypatch)
    out = f"out={tmp_path / 'a.png'}"
    for data in ([], ["data=sbm"], ["data=sbm", "seed=5"]):
        assert viz([*data, f"ckpt={run_dir}", f"node={node}", out]) == 0
        # the drawn layer's edges: the graph's own, plus a self loop per node where the layer adds them
        edges = drawn[-1]["edges"]
        assert edges in (graph["edge_index"].size(1), graph["edge_index"].size(1) + graph["x"].size(0))
        assert _accuracy_in_title(drawn[-1]["title"]) == pytest.approx(evaluated, abs=0.0051)  # printed with 2 decimals
    with pytest.raises(SystemExit, match=r"^zoo viz graph: seed=0 contradicts the checkpoint, trained on data=sbm "
                                         r"with data\.seed=5 \(the seed draws the graph and its split\)"):
        viz(["data=sbm", "seed=0", f"ckpt={run_dir}", out])


# ------------------------------------------------------------------------------ python -m zoo.tasks.graph.train
def _spy_fit(monkeypatch):
    """Record the config of each run python -m zoo.tasks.graph.train fits (then fit it)."""
    from zoo.tasks.graph import train

    configs, real_fit = [], train.fit
    monkeypatch.setattr(train, "fit", lambda cfg, **kw: configs.append(cfg) or real_fit(cfg, **kw))
    return configs


def test_table_appends_the_overrides_to_every_run_and_prints_them(monkeypatch, capsys):
    """--table ignored the overrides: `trainer.max_epochs=1 data.batch_size=2` trained each run for the experiment's
    epochs and batches, and the printed zoo train lines did not show them."""
    from zoo.tasks.graph.train import main

    configs = _spy_fit(monkeypatch)
    assert main(["--table", "4", "--runs", "gatv2:1,gat:2", "--threads", "1", "trainer.max_epochs=1",
                 "data.batch_size=2"]) == 0
    assert [(c.model.name, c.model.heads, c.data.k, c.trainer.max_epochs, c.data.batch_size) for c in configs] == [
        ("gatv2_dictlookup", 1, 4, 1, 2), ("gat_dictlookup", 2, 4, 1, 2)]
    out = capsys.readouterr().out
    for conv, heads in (("gatv2", 1), ("gat", 2)):
        assert (f"    zoo train experiment=graph_dictlookup model={conv} model.heads={heads} data.k=4 "
                "trainer.max_epochs=1 data.batch_size=2\n") in out
    rows = [line for line in out.splitlines() if line.startswith("| 4 | ")]
    assert len(rows) == 4 and all(row.split("|")[7].strip() == "1" for row in rows)  # printed live, then the table


def test_one_run_takes_max_epochs(monkeypatch, capsys):
    """Without --table, --max-epochs was dropped: the run trained for the experiment's 300 epochs."""
    import json

    from zoo.tasks.graph.train import main

    configs = _spy_fit(monkeypatch)
    assert main(["--max-epochs", "1", "--threads", "1", "experiment=graph_dictlookup", "data.k=4"]) == 0
    assert [c.trainer.max_epochs for c in configs] == [1]
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{\n"):])["epochs"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--runs", "gat:8", "experiment=graph_dictlookup"], r"--runs applies only with --table"),
    (["--out", "x.md", "experiment=graph_dictlookup"], r"--out applies only with --table"),
    (["--max-epochs", "1", "experiment=graph_dictlookup", "trainer.max_epochs=2"],
     r"--max-epochs 1 and trainer\.max_epochs=2 both set trainer\.max_epochs: give one of them"),
    (["--table", "4", "--max-epochs", "1", "+trainer.max_epochs=2"],
     r"--max-epochs 1 and \+trainer\.max_epochs=2 both set trainer\.max_epochs"),
    (["--table", "4", "model=gat"], r"model=gat would change what the table sets for each run .*: use --runs for it"),
    (["--table", "4", "model.heads=8"], r"model\.heads=8 would change .*: use --runs for it"),
    (["--table", "4", "data.k=5"], r"data\.k=5 would change .*: use --table K for it"),
    (["--table", "4", "experiment=graph_karate"], r"experiment=graph_karate would change .*: use --table for it"),
])
def test_options_that_would_be_dropped_are_refused(argv, message, monkeypatch, capsys):
    """Each combination that was silently dropped ends in argparse's usage error naming what to use, before any run."""
    from zoo.tasks.graph import train

    monkeypatch.setattr(train, "fit", lambda *a, **kw: pytest.fail("nothing may be trained"))
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(rf"python -m zoo\.tasks\.graph\.train: error: {message}", err), err


def test_dictlookup_table_refuses_overrides_of_what_it_sets():
    """The Python API: the same refusal as a ValueError, before anything is trained."""
    from zoo.tasks.graph.train import dictlookup_table

    with pytest.raises(ValueError, match=r"^model\.name=gat_node would change what the table sets"):
        dictlookup_table(4, runs=(("gatv2", 1),), overrides=["model.name=gat_node"])
    with pytest.raises(ValueError, match=r"^--max-epochs 1 and trainer\.max_epochs=3 both set"):
        dictlookup_table(4, max_epochs=1, runs=(("gatv2", 1),), overrides=["trainer.max_epochs=3"])
