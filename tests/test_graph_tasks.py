"""Graph task: DictionaryLookup generation (re-derived from the official recipe) and learnability
(GATv2 learns the lookup, single-head GAT cannot), registered models, datasets and their clear errors,
the Hydra configs end to end, `zoo viz graph` and `zoo bench graph` smoke runs."""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.tasks.graph import datasets as gd
from zoo.tasks.graph.dictlookup import (
    collate,
    dictionary_lookup_graph,
    generate_permutations,
    unseen_combinations_split,
)


# ------------------------------------------------------------------------------------- DictionaryLookup
def test_dictionary_lookup_generation_follows_the_paper():
    k = 5
    perms = generate_permutations(k)
    assert perms.shape == (math.factorial(k), k)
    assert {tuple(p) for p in perms.tolist()} == set(itertools.permutations(range(k)))
    big = generate_permutations(9, max_examples=100)  # 9! > 100: random permutations
    assert big.shape == (100, 9) and (big.sort(1).values == torch.arange(9)).all()
    train, test = unseen_combinations_split(perms, 0.8, seed=3)
    assert len(train) + len(test) == len(perms) and len(train) and len(test)
    # every test example holds a (position, value) pair that no training example has
    seen = {(i, v) for p in train.tolist() for i, v in enumerate(p)}
    assert all(any((i, v) not in seen for i, v in enumerate(p)) for p in test.tolist())
    # the allowed pair count of the official recipe: int(0.8 ** (1/k) * k^2)
    assert len(seen) <= int(0.8 ** (1 / k) * k * k)
    # graph: every key-value node k..2k-1 -> every query node 0..k-1
    ei = dictionary_lookup_graph(k)
    assert ei.shape == (2, k * k)
    assert set(map(tuple, ei.t().tolist())) == {(s, d) for s in range(k, 2 * k) for d in range(k)}
    b = collate(perms[:3])
    x = b["x"].view(3, 2 * k, 2)
    assert (x[:, :k, 1] == k).all() and (x[:, k:, 1] == perms[:3]).all()  # EMPTY on queries; values
    assert (x[:, :, 0] == torch.arange(k).repeat(2)).all()  # keys
    assert torch.equal(b["y"], perms[:3].reshape(-1))
    assert b["target_index"].tolist() == [g * 2 * k + i for g in range(3) for i in range(k)]




def _train_lookup(name, heads, k=5, steps=300, seed=0):
    """(train accuracy, test accuracy) on query nodes after ``steps`` full-batch Adam steps."""
    train, test = unseen_combinations_split(generate_permutations(k), seed=11)
    bt, bs = collate(train), collate(test)
    torch.manual_seed(seed)
    model = zoo.create_model(name, num_classes=k, heads=heads, dim=64)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(steps):
        loss = F.cross_entropy(model(bt["x"], bt["edge_index"], bt["target_index"]), bt["y"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return tuple((model(b["x"], b["edge_index"], b["target_index"]).argmax(-1) == b["y"]).float().mean().item()
                     for b in (bt, bs))


def test_dictionary_lookup_gatv2_learns_it_and_single_head_gat_cannot(one_thread):
    # k=5: 72 training / 48 test graphs, full batch, 300 Adam steps (a few seconds each). The paper's finding is
    # about fitting: static attention cannot express the lookup, so one-head GAT does not even fit the training
    # graphs, while GATv2 does. The bounds hold for every seed 0-7 (GATv2 train 1.0, test 0.67-0.92; GAT train
    # 0.32-0.58, test 0.03-0.40, measured 2026-12-06), not only for the one used here.
    gatv2_train, gatv2_test = _train_lookup("gatv2_dictlookup", 1)
    gat_train, gat_test = _train_lookup("gat_dictlookup", 1)
    assert gatv2_train >= 0.99 and gatv2_test >= 0.6, (gatv2_train, gatv2_test)
    assert gat_train <= 0.7 and gat_test <= 0.45, (gat_train, gat_test)  # test chance is 0.2


def test_dictionary_lookup_transformer_fits_more_than_static_attention_can(one_thread):
    """Dot-product attention (TransformerConv) is dynamic, as GATv2's: with one head it fits more of the training
    lookups than one-head GAT can (GAT's train accuracy 0.32-0.58 over seeds 0-7, above). Measured 2026-12-07 over
    seeds 0-7, same recipe: train 0.93-1.0 (1.0 for seven seeds), test 0.46-1.0."""
    train, _ = _train_lookup("transformer_dictlookup", 1)
    assert train >= 0.85, train


# --------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("name", zoo.list_models("*", task="graph"))
def test_registered_graph_models_run(name):
    from zoo.registry import get_model_entry

    entry = get_model_entry(name)
    if "dictlookup" in name:
        k = 4
        model = zoo.create_model(name, num_classes=k, dim=16)
        b = collate(generate_permutations(k)[:3])
        out = model(b["x"], b["edge_index"], b["target_index"])
        assert out.shape == (3 * k, k)
    elif name.endswith("_graph") or "_graph_" in name:
        model = zoo.create_model(name, in_channels=8, num_classes=3, hidden_channels=4, heads=2)
        graphs = gd.synthetic_graph_classification(4, seed=1)
        b = gd.collate_graphs(graphs)
        out = model(b["x"], b["edge_index"], b["batch"], b["num_graphs"])
        assert out.shape == (4, 3)
    else:
        data = gd.karate_club()
        model = zoo.create_model(name, in_channels=34, num_classes=4, hidden_channels=4, heads=2)
        out = model(data["x"], data["edge_index"])
        assert out.shape == (34, 4)
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert entry.task == "graph"


def test_graph_models_name_their_bad_arguments():
    """Index arguments of the forwards (batch, num_graphs, target_index, negative indices included) and the
    constructor arguments are named; a graph classifier without attention layers is refused."""
    ei = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]])
    model = zoo.create_model("gatv2_graph_debug")
    with pytest.raises(ValueError, match="batch has 5 entries but x has 6 nodes"):
        model(torch.randn(6, 8), ei, torch.tensor([0, 0, 0, 1, 1]), 2)
    with pytest.raises(ValueError, match=r"batch value 2 is out of range for num_graphs=2"):
        model(torch.randn(5, 8), ei, torch.tensor([0, 0, 1, 1, 2]), 2)
    with pytest.raises(ValueError, match="batch must be a 1-D int64/int32 tensor"):
        model(torch.randn(5, 8), ei, torch.tensor([0.0, 0, 1, 1, 1]), 2)
    with pytest.raises(ValueError, match="num_graphs must be a positive int"):
        model(torch.randn(5, 8), ei, torch.tensor([0, 0, 1, 1, 1]), 0)
    assert model(torch.randn(5, 8), ei, torch.tensor([0, 0, 1, 1, 1]), 2).shape == (2, 3)
    lookup = zoo.create_model("gatv2_dictlookup_debug")
    b = collate(generate_permutations(4)[:1])  # 8 nodes
    for bad in (9, -1):  # -1 would silently pick the last node
        with pytest.raises(ValueError, match=rf"target_index value {bad} is out of range for 8 nodes"):
            lookup(b["x"], b["edge_index"], torch.tensor([bad]))
    with pytest.raises(ValueError, match="num_layers must be a positive int, got 0"):
        zoo.create_model("gatv2_graph_debug", num_layers=0)
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        zoo.create_model("gatv2_node", num_classes=0)
    with pytest.raises(ValueError, match="hidden_channels must be a positive int, got -1"):
        zoo.create_model("gatv2_node", hidden_channels=-1)
    with pytest.raises(ValueError, match="num_layers must be a positive int, got '2'"):
        zoo.create_model("gatv2_node", num_layers="2")
    with pytest.raises(TypeError, match="gatv2_node always uses conv='gatv2'.*use gat_node"):
        zoo.create_model("gatv2_node", conv="gat")


def test_node_classifier_trains_on_sbm(one_thread):
    data = gd.stochastic_block_model(seed=0)
    torch.manual_seed(0)
    model = zoo.create_model("gatv2_node", in_channels=16, num_classes=3, heads=4)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3, weight_decay=5e-4)
    for _ in range(200):
        loss = F.cross_entropy(model(data["x"], data["edge_index"])[data["train_mask"]], data["y"][data["train_mask"]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    acc = (model(data["x"], data["edge_index"]).argmax(-1) == data["y"])[data["test_mask"]].float().mean()
    # 5 labelled nodes per class: the test accuracy depends on the seed (0.59-0.99 over seeds 0-5 with 200 steps,
    # measured 2026-12-06); the bound stands well above chance (1/3) for every one of them
    assert acc > 0.5, acc


# ------------------------------------------------------------------------------------------- datasets
def test_offline_datasets_and_adapter_errors(tmp_path):
    karate = gd.karate_club()
    assert karate["x"].shape == (34, 34) and karate["num_classes"] == 4 and int(karate["train_mask"].sum()) == 4
    masks = karate["train_mask"].int() + karate["val_mask"].int() + karate["test_mask"].int()
    assert (masks == 1).all()
    for name in gd.NETWORKX_GRAPHS:
        d = gd.networkx_graph(name)
        assert d["edge_index"].max() < d["x"].size(0) and d["num_classes"] >= 2
        ei = d["edge_index"]
        assert torch.equal(torch.unique(ei, dim=1), torch.unique(ei.flip(0), dim=1))  # undirected
    with pytest.raises(FileNotFoundError, match=r"ind\.cora\.x"):
        gd.load_node_dataset("planetoid:Cora", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="node-feat.csv.gz"):
        gd.load_node_dataset("ogb:ogbn-arxiv", root=str(tmp_path))
    with pytest.raises(ValueError, match="unknown node dataset"):
        gd.load_node_dataset("cora")
    with pytest.raises(ValueError, match="num_classes"):
        gd.NodeDataModule("karate", num_features=34, num_classes=7).setup()


def test_graph_data_modules_take_num_workers_and_refuse_unknown_keys():
    """debug=fast sets data.num_workers for every data config; other unknown data.* keys are named, not dropped."""
    assert gd.NodeDataModule("karate", num_workers=0).num_classes == 4
    assert gd.GraphClassificationDataModule(num_graphs=6, num_workers=0).num_workers == 0
    with pytest.raises(ValueError, match=r"unknown key data\.bogus for the 'karate' dataset"):
        gd.NodeDataModule("karate", bogus=1)
    with pytest.raises(ValueError, match=r"unknown key data\.bogus .*p_in"):
        gd.NodeDataModule("sbm", bogus=1)
    assert gd.NodeDataModule("sbm", p_in=0.2).kwargs == {"p_in": 0.2}


def test_ogb_adapter_reads_the_raw_layout(tmp_path):
    import gzip

    import numpy as np

    root = tmp_path / "ogbn_toy"
    (root / "raw").mkdir(parents=True)
    (root / "split" / "random").mkdir(parents=True)

    def write(path, arr, fmt):
        with gzip.open(path, "wt") as f:
            np.savetxt(f, arr, delimiter=",", fmt=fmt)

    write(root / "raw" / "edge.csv.gz", np.array([[0, 1], [1, 2], [2, 3], [3, 0]]), "%d")
    write(root / "raw" / "node-feat.csv.gz", np.arange(12, dtype=float).reshape(4, 3), "%.1f")
    write(root / "raw" / "node-label.csv.gz", np.array([[0], [1], [0], [1]]), "%d")
    for split, idx in (("train", [0, 1]), ("valid", [2]), ("test", [3])):
        write(root / "split" / "random" / f"{split}.csv.gz", np.array(idx)[:, None], "%d")
    d = gd.load_node_dataset("ogb:ogbn-toy", root=str(tmp_path))
    assert d["x"].shape == (4, 3) and d["num_classes"] == 2
    assert d["train_mask"].tolist() == [True, True, False, False] and d["test_mask"].tolist() == [False] * 3 + [True]
    assert d["edge_index"].size(1) == 8  # made undirected
    # files that disagree are named (were torch's size / index errors, or accepted: an edge to node 7)
    bad_cases = (
        ("raw/node-label.csv.gz", np.array([[0], [1]]), "has 2 labels but .*node-feat.csv.gz has 4 nodes"),
        ("raw/edge.csv.gz", np.array([[0, 1], [1, 7]]), "edge.csv.gz: node index 7 is out of range for the 4 nodes"),
        ("split/random/test.csv.gz", np.array([[99]]), "test.csv.gz: node index 99 is out of range"),
    )
    for name, arr, message in bad_cases:
        original = (root / name).read_bytes()
        write(root / name, arr, "%d")
        with pytest.raises(ValueError, match=message):
            gd.load_node_dataset("ogb:ogbn-toy", root=str(tmp_path))
        (root / name).write_bytes(original)
    (root / "raw" / "node-feat.csv.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="cannot read .*node-feat.csv.gz \\(a gzipped CSV of numbers\\)"):
        gd.load_node_dataset("ogb:ogbn-toy", root=str(tmp_path))


def test_planetoid_adapter_reads_the_raw_layout(tmp_path):
    """A tiny graph written in Planetoid's raw format (kimiyoung/planetoid: pickled x/tx/allx/y/ty/ally,
    the adjacency dict, test.index) is read by the adapter with the public split; nothing downloaded."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    n_all, n_train, n_test, F_, K = 520, 10, 20, 5, 3  # the public split needs >= n_train + 500 nodes
    n = n_all + n_test
    labels = rng.integers(0, K, n)
    feats = rng.normal(size=(n, F_)).astype(np.float32)
    onehot = np.eye(K, dtype=np.float32)[labels]
    test_index = np.arange(n_all, n)[::-1]  # stored unsorted, as Cora's is
    raw = tmp_path / "Cora" / "raw"
    raw.mkdir(parents=True)
    items = {"x": feats[:n_train], "y": onehot[:n_train], "allx": feats[:n_all], "ally": onehot[:n_all],
             "tx": feats[test_index], "ty": onehot[test_index],  # row i: node test_index[i]
             "graph": {i: [(i + 1) % n, (i + 7) % n] for i in range(n)}}
    for name, value in items.items():
        with open(raw / f"ind.cora.{name}", "wb") as f:
            pickle.dump(value, f)
    (raw / "ind.cora.test.index").write_text("\n".join(map(str, test_index)) + "\n")
    d = gd.load_node_dataset("planetoid:Cora", root=str(tmp_path))
    assert d["x"].shape == (n, F_) and d["num_classes"] == K
    assert int(d["train_mask"].sum()) == n_train and int(d["val_mask"].sum()) == 500
    assert int(d["test_mask"].sum()) == n_test
    torch.testing.assert_close(d["x"], torch.from_numpy(feats))
    assert torch.equal(d["y"], torch.from_numpy(labels))
    assert d["edge_index"].size(1) == 2 * n  # the adjacency dict, as a [2, E] edge index
    (raw / "ind.cora.graph").unlink()
    with pytest.raises(FileNotFoundError, match=r"ind\.cora\.graph"):
        gd.load_node_dataset("planetoid:Cora", root=str(tmp_path))


# ------------------------------------------------------------------------------------ configs end to end
@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=graph_dictlookup", "model=gatv2", "data.k=4", "data.batch_size=16", "trainer.max_epochs=1"],
        ["experiment=graph_dictlookup", "model=gat", "model.heads=2", "data.k=4", "trainer.max_epochs=1",
         "+model.dim=16"],
        ["experiment=graph_dictlookup", "model=transformer", "data.k=4", "trainer.max_epochs=1", "+model.dim=16"],
        ["experiment=graph_karate", "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=1"],
        ["experiment=graph_karate", "model=transformer", "trainer.max_epochs=2", "+model.hidden_channels=4"],
        ["experiment=graph_synthetic", "trainer.max_epochs=1", "data.num_graphs=30", "+model.hidden_channels=4"],
        ["experiment=graph_synthetic", "model=transformer", "trainer.max_epochs=1", "data.num_graphs=30",
         "+model.hidden_channels=4"],
        ["experiment=graph_synthetic", "trainer.max_epochs=1", "data.num_graphs=30", "+model.hidden_channels=4",
         "task.torch_compile=aot_eager"],
    ],
)
def test_configs_compose_and_train(overrides):
    pytest.importorskip("hydra")
    from zoo.tasks.graph.train import compose, fit

    cfg = compose(overrides)
    result = fit(cfg, verbose=False)
    assert 0.0 <= result["test_acc"] <= 1.0
    assert result["model"].startswith(("gatv2_", "gat_", "transformer_"))


@pytest.mark.parametrize(
    "overrides,kind",
    [
        (["experiment=graph_karate", "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=1"], "node"),
        (["experiment=graph_synthetic", "trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1",
          "data.num_graphs=30", "+model.hidden_channels=4"], "graph"),
    ],
)
def test_zoo_train_cli_trains_node_and_graph_classifiers(tmp_path, overrides, kind, capsys):
    """`zoo train` itself (the console script's main): the Lightning modules train, test, checkpoint and
    export; the released model reloads with zoo.from_pretrained."""
    pytest.importorskip("hydra")
    import json

    from zoo.cli import main

    run_dir = tmp_path / "run"
    assert main(["train", *overrides, f"run_dir={run_dir}", "logger=none", "callbacks=minimal"]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert 0.0 <= metrics["test/acc1"] <= 1.0 and "train/acc1" in metrics
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    model = zoo.from_pretrained(str(run_dir / "released"))
    assert model.zoo_model_name == f"gatv2_{kind}"


def _graph_experiments() -> list[str]:
    import importlib.resources

    folder = importlib.resources.files("zoo.configs").joinpath("experiment")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.startswith("graph_") and p.name.endswith(".yaml"))


# the smallest settings of each graph experiment; None: it needs files on disk (the missing-file message is checked)
DEBUG_FAST = {
    "graph_karate": [],
    "graph_sbm": [],
    "graph_synthetic": ["data.num_graphs=30", "+model.hidden_channels=4"],
    "graph_dictlookup": ["data.k=4", "data.batch_size=16", "+model.dim=16"],
    "graph_cora": None,
}


def test_debug_fast_table_covers_every_graph_experiment():
    assert sorted(DEBUG_FAST) == _graph_experiments()


@pytest.mark.parametrize("experiment", sorted(DEBUG_FAST))
def test_debug_fast_runs_every_graph_experiment(tmp_path, experiment, capsys):
    """`zoo train experiment=<graph_*> debug=fast` (which sets data.num_workers) trains end to end; the
    experiments that read local files still report the missing files (not a num_workers TypeError)."""
    pytest.importorskip("hydra")
    from zoo.cli import main

    common = [f"experiment={experiment}", "debug=fast", "num_threads=1", f"run_dir={tmp_path / 'run'}", "export=false"]
    if DEBUG_FAST[experiment] is not None:
        assert main(["train", *common, *DEBUG_FAST[experiment]]) == 0
        assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
        return
    for extra, message in (([], "Planetoid Cora: 8 raw file(s) missing"),
                           (["data=graph_ogb"], "OGB ogbn-arxiv: 6 file(s) missing")):
        assert main(["train", *common, *extra, f"data.root={tmp_path}"]) == 1
        err = capsys.readouterr().err
        assert message in err and "num_workers" not in err and "Traceback" not in err


def test_dictlookup_table_command_writes_a_marked_block(tmp_path):
    pytest.importorskip("hydra")
    from zoo.tasks.graph.train import main

    doc = tmp_path / "graph.md"
    doc.write_text("# title\n\n<!-- dictlookup-table:start -->\nold\n<!-- dictlookup-table:end -->\n\ntail\n")
    assert main(["--table", "4", "--max-epochs", "1", "--runs", "gatv2:1", "--threads", "1", "--out", str(doc)]) == 0
    text = doc.read_text()
    assert "old" not in text and text.startswith("# title") and text.rstrip().endswith("tail")
    # the command line as typed, --runs too (it was recorded as `... --table 4 --max-epochs 1`, another command)
    assert (f"`python -m zoo.tasks.graph.train --table 4 --max-epochs 1 --runs gatv2:1 --threads 1 --out {doc}` ran, "
            "one after the other:") in text
    assert "zoo train experiment=graph_dictlookup model=gatv2 model.heads=1 data.k=4 trainer.max_epochs=1" in text
    row = [line for line in text.splitlines() if line.startswith("| 4 | gatv2 | 1 |")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert 0.0 <= float(cells[3]) <= 1.0 and 0.0 <= float(cells[4]) <= 1.0 and cells[6] == "1"


# ------------------------------------------------------------------------------------------ viz, bench
def test_viz_graph_writes_png(tmp_path):
    from zoo.tasks.graph.viz import main

    out = tmp_path / "att.png"
    assert main(["data=karate", "node=0", "epochs=3", "heads=2", f"out={out}"]) == 0
    assert out.stat().st_size > 1000
    with pytest.raises(SystemExit):
        main(["node=99", f"out={out}", "epochs=0"])


def test_viz_graph_dictlookup_writes_png(tmp_path, capsys):
    """`zoo viz graph data=dictlookup`: a query node's attention over the key-value nodes of a test graph, for
    GATv2 and GAT (with its self loop), and clear errors for a node that is not a query or a missing example."""
    from zoo.tasks.graph.viz import main

    for model in ("gatv2_dictlookup", "gat_dictlookup"):
        out = tmp_path / f"{model}.png"
        assert main(["data=dictlookup", "k=4", "node=2", "epochs=1", f"model={model}", f"out={out}"]) == 0
        assert out.stat().st_size > 1000
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="query node"):
        main(["data=dictlookup", "k=4", "node=4", "epochs=0", f"out={tmp_path / 'x.png'}"])
    with pytest.raises(SystemExit, match="out of range"):
        main(["data=dictlookup", "k=4", "example=10000", "epochs=0", f"out={tmp_path / 'x.png'}"])
    with pytest.raises(SystemExit, match="one attention layer"):
        main(["data=dictlookup", "k=4", "layer=1", "epochs=0", f"out={tmp_path / 'x.png'}"])


def test_viz_graph_names_the_model_kind_and_bad_numbers(tmp_path):
    """A model or checkpoint of the wrong kind gets one line saying what kind is needed; number options are
    named; planetoid data asks for root=, an option of zoo viz graph."""
    from zoo.tasks.graph.viz import main

    out = f"out={tmp_path / 'x.png'}"
    vision_ckpt = zoo.hub.shipped_checkpoints_dir() / "vit_digits"
    for argv, message in (
        (["model=vit_debug"], "needs a node-classification model .*; model=vit_debug is a vision model"),
        (["model=gatv2_graph"], "model=gatv2_graph is a graph-classification model"),
        ([f"ckpt={vision_ckpt}"], "needs a node-classification model .*vit_digits is a vision model"),
        (["data=dictlookup", "k=3", "model=gatv2_node"], "needs a DictionaryLookup model .*model=gatv2_node is a node"),
        (["data=dictlookup", "k=3", f"ckpt={vision_ckpt}"], "needs a DictionaryLookup model .*is a vision model"),
        (["data=planetoid:Cora"], "data=planetoid:Cora is read from local files: pass root="),
        (["node=abc"], "node must be an integer >= 0, got 'abc'"),
        (["epochs=-3"], "epochs must be an integer >= 0, got '-3'"),
        (["heads=0"], "heads must be an integer >= 1, got '0'"),
        (["seed=abc"], "seed must be an integer, got 'abc'"),
        (["data=dictlookup", "k=abc"], "k must be an integer >= 2, got 'abc'"),
    ):
        with pytest.raises(SystemExit, match=message):
            # epochs=0 keeps the runs without ckpt= short; with ckpt= it is refused (the checkpoint fixes the model)
            main([*argv, "epochs=0" if not any(a.startswith(("epochs=", "ckpt=")) for a in argv) else "layer=0", out])


@pytest.mark.parametrize("layer", ["gatv2", "transformer"])
def test_bench_graph_smoke(capsys, layer):
    from zoo.bench.graph import main

    assert main(["--layer", layer, "--sizes", "300:60", "--channels", "4", "--heads", "2", "--repeats", "1",
                 "--warmup", "0", "--no-memory"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = [c.strip() for c in [line for line in lines if line.startswith("| edges |")][0].strip("|").split("|")]
    row = [line for line in lines if line.startswith("| 300 |")][0]
    cells = dict(zip(header, (c.strip() for c in row.strip("|").split("|"))))
    assert float(cells["max out err"]) < 1e-4 and float(cells["max rel grad err"]) < 1e-4  # same as PyG
    assert float(cells["zoo fwd+bwd (s)"]) > 0 and float(cells["PyG fwd+bwd (s)"]) > 0
    assert f"layer {layer};" in out


def test_bench_graph_plot(tmp_path, capsys):
    """--plot draws time and memory against the edge count; rows without memory (--no-memory) or without PyG
    are left out of their panel rather than failing."""
    from PIL import Image

    from zoo.bench.graph import main, plot_graph

    out = tmp_path / "graph.png"
    assert main(["--sizes", "300:60,900:100", "--channels", "4", "--heads", "2", "--repeats", "1", "--warmup", "0",
                 "--no-memory", "--plot", str(out)]) == 0
    assert f"plot: {out}" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.size[0] > 800
    nan = float("nan")
    plot_graph([(10, 8, 0.1, nan, 5.0, nan), (100, 8, 0.2, 0.5, 6.0, 60.0)], tmp_path / "partial.png", "t")
    assert (tmp_path / "partial.png").is_file()


def test_bench_graph_compiled_smoke(capsys):
    """--compile: both layers compiled (Dynamo capture only with the 'eager' backend) still agree with each
    other, in the timing process and in the memory workers; an unknown backend is named."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from zoo.bench.graph import main

    counters.clear()
    assert main(["--sizes", "300:60", "--channels", "4", "--heads", "2", "--repeats", "1", "--warmup", "0",
                 "--threads", "1", "--compile", "eager"]) == 0
    out = capsys.readouterr().out
    assert "both layers under torch.compile backend eager" in out
    cells = [c.strip() for c in [r for r in out.splitlines() if r.startswith("| 300 |")][0].strip("|").split("|")]
    assert float(cells[10]) < 1e-4 and float(cells[11]) < 1e-4  # outputs and gradients agree
    assert float(cells[7].split()[0]) > 50 and float(cells[8].split()[0]) > 50  # both memory workers ran
    assert counters["stats"]["unique_graphs"] >= 2
    torch._dynamo.reset()
    with pytest.raises(SystemExit):
        main(["--sizes", "300:60", "--compile", "inducter"])
    assert "--compile must be" in capsys.readouterr().err


def test_bench_graph_memory_probe_and_peer_guard(capsys):
    """The peak-memory workers run (fresh processes), and PyG is skipped, with a note, where its
    estimated [E, H, C] memory exceeds --peer-max-gb."""
    from zoo.bench.graph import main, peer_bytes_estimate

    assert peer_bytes_estimate(1_000_000, 100_000, 8, 64) / 1e9 > 13  # the 13.2 GB PyG measured there
    assert main(["--sizes", "200:40", "--channels", "2", "--heads", "1", "--threads", "1", "--memory-only",
                 "--peer-max-gb", "1e-6"]) == 0
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("| 200 |")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[7].split()[0]) > 50 and cells[8] == "not run" and cells[9] == "-"  # zoo measured, PyG skipped
    assert cells[5] == "not run" and "nan" not in row
    assert "PyG not run: E=200, C=2 (would not fit: PyG estimated 0.0 GB)" in out
    # skipped because asked: said so, not "would not fit" (review 2026-12-07)
    assert main(["--sizes", "200:40", "--channels", "2", "--heads", "1", "--threads", "1", "--memory-only",
                 "--skip-peer-above", "0"]) == 0
    assert "PyG not run: E=200, C=2 (above --skip-peer-above 0)." in capsys.readouterr().out


def test_bench_graph_counts_must_be_positive(capsys):
    """Audit 2026-12-06: --heads -2 ended in torch's 'negative dimension' traceback after the run header, and
    --in-channels 0 silently meant 'use C'. Both stop at the parser now, with the option named."""
    from zoo.bench.graph import main

    base = ["--sizes", "100:20", "--channels", "4", "--repeats", "1", "--threads", "1", "--no-memory"]
    for option, value in (("--heads", "-2"), ("--heads", "0"), ("--in-channels", "0"), ("--in-channels", "x")):
        with pytest.raises(SystemExit):
            main([*base, option, value])
        captured = capsys.readouterr()
        assert f"argument {option}: must be an integer >= 1, got '{value}'" in captured.err
        assert captured.out == ""  # stopped before the header


def test_bench_graph_cuda_memory_worker_resets_the_peak_after_a_warm_up_step(monkeypatch, capsys):
    """On CUDA the worker reset the peak and then made the first call, which autotunes Triton kernels: do_bench's
    256 MB L2-flush buffer landed in the zoo's peak. It now runs one forward + backward first, synchronizes, drops
    the gradients, resets the peak, and only then runs the measured step (the worker code run here with the CUDA
    calls recorded, on CPU tensors)."""
    import zoo.bench.graph as bench_graph

    events = []

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x, edge_index):
            events.append("forward")
            return self.lin(x)

    x = torch.randn(4, 3, requires_grad=True)
    x.register_hook(lambda grad: events.append("backward"))
    layer = Layer()
    # each backward allocates the weight's gradient afresh (the warm-up's was dropped): the measured step's peak
    layer.lin.weight.register_hook(
        lambda grad: events.append("weight grad was " + ("None" if layer.lin.weight.grad is None else "set")))
    monkeypatch.setattr(bench_graph, "make_case", lambda *args, **kwargs: (x, None, layer, None))
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda name=name: events.append(name))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: events.append("max_memory_allocated") or 0)
    code = bench_graph._WORKER_CODE.format(threads=torch.get_num_threads(), nodes=4, edges=2, heads=1, channels=2,
                                           in_channels=3, device="cuda", which="zoo", compile=None,
                                           layer="gatv2")
    exec(code, {})
    assert events == ["forward", "backward", "weight grad was None", "synchronize", "reset_peak_memory_stats",
                      "forward", "backward", "weight grad was None", "synchronize", "max_memory_allocated"], events
    assert "CUDA_PEAK_BYTES=0" in capsys.readouterr().out


def test_planetoid_adapter_names_unreadable_raw_files(tmp_path):
    raw = tmp_path / "Cora" / "raw"
    raw.mkdir(parents=True)
    for suffix in ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index"):
        (raw / f"ind.cora.{suffix}").write_bytes(b"\x80\x04 not a pickle")
    with pytest.raises(ValueError, match="Planetoid Cora: cannot read the raw files under .*corrupt or not the Planetoid"):
        gd.load_node_dataset("planetoid:Cora", root=str(tmp_path))


# ------------------------------------------------------------------------------------- audit regressions
def _train_cli(tmp_path, name, *overrides, sanity_steps=0):
    """`zoo train` (the console script's main) into tmp_path/name, tiny and quiet; returns metrics.json."""
    import json

    from zoo.cli import main

    run_dir = tmp_path / name
    code = main(["train", "num_threads=1", "logger=none", "callbacks=minimal", "export=false", "test=false",
                 f"trainer.num_sanity_val_steps={sanity_steps}", "+trainer.enable_progress_bar=false",
                 "trainer.enable_model_summary=false", f"run_dir={run_dir}", *overrides])
    assert code == 0
    return json.loads((run_dir / "metrics.json").read_text())


def test_stop_at_acc_waits_for_training_past_the_sanity_check(tmp_path):
    """task.stop_at_acc fired on Lightning's sanity-check validation (untrained weights), so training never
    started (global_step 0); it now stops at the first real validation that reaches it."""
    pytest.importorskip("hydra")
    metrics = _train_cli(tmp_path, "run", "experiment=graph_karate", "task.stop_at_acc=0.01",
                         "trainer.max_epochs=5", "trainer.check_val_every_n_epoch=1",
                         "model.heads=1", "+model.hidden_channels=4", sanity_steps=2)
    assert metrics["global_step"] == 1, metrics  # one epoch of training, then stopped by the first validation


@pytest.mark.parametrize("overrides", [
    ["experiment=graph_synthetic", "model.name=gatv2_graph_debug", "data.num_graphs=30", "data.batch_size=8"],
    ["experiment=graph_dictlookup", "model.name=gatv2_dictlookup_debug", "data.k=4", "data.batch_size=4",
     "task.stop_at_acc=null"],
], ids=["synthetic", "dictlookup"])
def test_resume_replays_the_shuffled_batches_exactly(tmp_path, overrides):
    """4 epochs in one go and 2 epochs + resume to 4 end with the same weights: the training order is seeded
    by (seed, epoch) (EpochShuffleSampler), not drawn from the global RNG at each epoch's iterator."""
    pytest.importorskip("hydra")
    common = [*overrides, "trainer.check_val_every_n_epoch=1"]
    _train_cli(tmp_path, "full", *common, "trainer.max_epochs=4")
    _train_cli(tmp_path, "half", *common, "trainer.max_epochs=2")
    _train_cli(tmp_path, "half", *common, "trainer.max_epochs=4",
               f"ckpt_path={tmp_path / 'half' / 'checkpoints' / 'last.ckpt'}")
    full, resumed = (torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)
                     for run in ("full", "half"))
    assert full["global_step"] == resumed["global_step"] > 0
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


def _write_planetoid_raw(root, seed=0, num_classes=3):
    """A tiny graph in Planetoid's raw format (kimiyoung/planetoid: pickled x/tx/allx/y/ty/ally, the adjacency
    dict, test.index) under root/Cora/raw; returns (features, labels) in node order."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(seed)
    n_all, n_train, n_test, F_ = 520, 10, 20, 5  # the public split needs >= n_train + 500 nodes
    n = n_all + n_test
    labels = rng.integers(0, num_classes, n)
    feats = rng.normal(size=(n, F_)).astype(np.float32)
    onehot = np.eye(num_classes, dtype=np.float32)[labels]
    test_index = np.arange(n_all, n)[::-1]
    raw = root / "Cora" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    items = {"x": feats[:n_train], "y": onehot[:n_train], "allx": feats[:n_all], "ally": onehot[:n_all],
             "tx": feats[test_index], "ty": onehot[test_index], "graph": {i: [(i + 1) % n] for i in range(n)}}
    for name, value in items.items():
        with open(raw / f"ind.cora.{name}", "wb") as f:
            pickle.dump(value, f)
    (raw / "ind.cora.test.index").write_text("\n".join(map(str, test_index)) + "\n")
    return feats, labels


def test_planetoid_rebuilds_its_cache_when_the_raw_files_change(tmp_path):
    """PyG's Planetoid reuses root/Cora/processed/ whatever the raw files hold now: replaced raw files were
    ignored. The adapter has it rebuilt, and removes nothing there but PyG's own cache files."""
    import os

    _, first = _write_planetoid_raw(tmp_path, seed=0)
    assert torch.equal(gd.load_node_dataset("planetoid:Cora", root=str(tmp_path))["y"], torch.from_numpy(first))
    notes = tmp_path / "Cora" / "processed" / "my_notes.txt"
    notes.write_text("a user's file")
    _, second = _write_planetoid_raw(tmp_path, seed=1, num_classes=4)
    for path in (tmp_path / "Cora" / "raw").iterdir():  # a later modification time, whatever the clock's resolution
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    d = gd.load_node_dataset("planetoid:Cora", root=str(tmp_path))
    assert not torch.equal(torch.from_numpy(first), torch.from_numpy(second))
    assert torch.equal(d["y"], torch.from_numpy(second)) and d["num_classes"] == 4
    assert notes.read_text() == "a user's file"
    assert torch.equal(gd.load_node_dataset("planetoid:Cora", root=str(tmp_path))["y"], d["y"])  # cache reused


def test_planetoid_cache_in_a_read_only_folder_is_left_but_not_read(tmp_path, monkeypatch):
    """A shared, read-only data folder holds a cache without the adapter's record (built before it existed):
    the adapter used to delete it, and failed with 'Read-only file system' (review 2026-12-06); then it read that
    cache as it was, although nothing said it was built from the raw files there now. It is left as it is and the
    raw files are parsed without a cache. Without the zoo's record the cache is not the zoo's: nothing is even
    tried there, and the warning says that it is older than the raw files and how to have it used."""
    import os

    _write_planetoid_raw(tmp_path, seed=0)
    gd.load_node_dataset("planetoid:Cora", root=str(tmp_path))
    processed = tmp_path / "Cora" / "processed"
    (processed / gd._RAW_RECORD).unlink()  # as an older version left it
    _, second = _write_planetoid_raw(tmp_path, seed=1, num_classes=4)  # raw files replaced since
    cache = {p.name: p.read_bytes() for p in processed.iterdir()}

    tried = []

    def read_only(*args, **kwargs):
        tried.append(args)
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "remove", read_only)
    monkeypatch.setattr(os, "replace", read_only)
    with pytest.warns(UserWarning, match=r"holds a cache built without the zoo \(no zoo_raw_files\.json\) before the "
                                         r"raw file\(s\) .* last changed; leaving it as it is and reading the raw "
                                         r"files without a cache"):
        d = gd.load_node_dataset("planetoid:Cora", root=str(tmp_path))
    assert torch.equal(d["y"], torch.from_numpy(second)) and d["num_classes"] == 4
    assert {p.name: p.read_bytes() for p in processed.iterdir()} == cache and tried == []


def _write_ogb(tmp_path, folder="ogbn_toy", labels=("0", "1", "0", "1"), edges=((0, 1), (1, 2), (2, 3), (3, 0)),
               splits=(("train", [0, 1]), ("valid", [2]), ("test", [3])), scheme="random"):
    """A 4-node OGB dataset in the raw CSV layout (labels as written, e.g. "nan" or "1.5")."""
    import gzip

    root = tmp_path / folder
    (root / "raw").mkdir(parents=True, exist_ok=True)
    (root / "split" / scheme).mkdir(parents=True, exist_ok=True)

    def write(path, lines):
        with gzip.open(path, "wt") as f:
            f.write("".join(line + "\n" for line in lines))

    write(root / "raw" / "edge.csv.gz", [f"{a},{b}" for a, b in edges])
    write(root / "raw" / "node-feat.csv.gz", [f"{i}.0,{i + 1}.0" for i in range(4)])
    write(root / "raw" / "node-label.csv.gz", list(labels))
    for split, index in splits:
        write(root / "split" / scheme / f"{split}.csv.gz", [str(i) for i in index])
    return root


def test_ogb_adapter_refuses_bad_labels_and_overlapping_splits(tmp_path):
    """NaN and -1 mark unlabelled nodes (left out of the splits); a fractional label (truncated to a class
    before), another negative label, or a node in two splits (trained on and scored) is named with its file."""
    _write_ogb(tmp_path, labels=("0", "nan", "-1", "1"), splits=(("train", [0, 1]), ("valid", [2]), ("test", [3])))
    with pytest.raises(ValueError, match="lists no labelled validation node"), pytest.warns(UserWarning):
        gd.load_node_dataset("ogb:ogbn-toy", root=str(tmp_path))  # node 2 (-1) was the only validation node
    _write_ogb(tmp_path, labels=("0", "-1", "1", "1"), splits=(("train", [0, 1]), ("valid", [2]), ("test", [3])))
    with pytest.warns(UserWarning, match="1 of its 2 nodes have no label"):
        d = gd.load_node_dataset("ogb:ogbn-toy", root=str(tmp_path))
    assert d["train_mask"].tolist() == [True, False, False, False] and d["val_mask"].tolist() == [False, False, True, False]
    for labels, message in ((("0", "1.5", "0", "1"), r"node-label\.csv\.gz: label 1.5 is not a class index"),
                            (("0", "1", "-2", "1"), r"node-label\.csv\.gz: label -2 is not a class index")):
        _write_ogb(tmp_path, labels=labels)
        with pytest.raises(ValueError, match=message):
            gd.load_node_dataset("ogb:ogbn-toy", root=str(tmp_path))
    _write_ogb(tmp_path, splits=(("train", [0, 1]), ("valid", [2]), ("test", [3, 1])))
    with pytest.raises(ValueError, match=r"train\.csv\.gz and .*test\.csv\.gz both list node 1 .*must not overlap"):
        gd.load_node_dataset("ogb:ogbn-toy", root=str(tmp_path))


def test_ogb_empty_training_split_is_named(tmp_path):
    """An empty train.csv.gz (or one listing only unlabelled nodes) was "self.log(train/acc1, None)" in training."""
    _write_ogb(tmp_path, splits=(("train", []), ("valid", [2]), ("test", [3])))
    with pytest.raises(ValueError, match=r"split/random/train\.csv\.gz lists no labelled training node"):
        gd.load_node_dataset("ogb:ogbn-toy", root=str(tmp_path))
    _write_ogb(tmp_path, labels=("nan", "-1", "0", "1"), splits=(("train", [0, 1]), ("valid", [2]), ("test", [3])))
    with pytest.raises(ValueError, match=r"train\.csv\.gz lists no labelled training node"), pytest.warns(UserWarning):
        gd.load_node_dataset("ogb:ogbn-toy", root=str(tmp_path))
    # empty validation / test splits too (metrics of nothing), and unlabelled listed nodes are named
    _write_ogb(tmp_path, splits=(("train", [0, 1]), ("valid", []), ("test", [3])))
    with pytest.raises(ValueError, match=r"valid\.csv\.gz lists no labelled validation node"):
        gd.load_node_dataset("ogb:ogbn-toy", root=str(tmp_path))
    _write_ogb(tmp_path, labels=("0", "1", "0", "nan"), splits=(("train", [0, 1]), ("valid", [2]), ("test", [3])))
    with pytest.raises(ValueError, match=r"test\.csv\.gz lists no labelled test node"), \
            pytest.warns(UserWarning, match=r"test\.csv\.gz: 1 of its 1 nodes have no label"):
        gd.load_node_dataset("ogb:ogbn-toy", root=str(tmp_path))
    _write_ogb(tmp_path, labels=("0", "nan", "0", "1"), splits=(("train", [0, 1]), ("valid", [2]), ("test", [3])))
    with pytest.warns(UserWarning, match=r"train\.csv\.gz: 1 of its 2 nodes have no label .* left out of the split"):
        assert int(gd.load_node_dataset("ogb:ogbn-toy", root=str(tmp_path))["train_mask"].sum()) == 1


def test_ogb_empty_edge_file_is_an_edgeless_graph(tmp_path):
    _write_ogb(tmp_path, edges=())
    d = gd.load_node_dataset("ogb:ogbn-toy", root=str(tmp_path))
    assert d["edge_index"].shape == (2, 0) and d["x"].shape == (4, 2)


def test_ogb_edges_are_undirected_without_self_loops_as_documented(tmp_path):
    """OGB's own loader keeps ogbn-arxiv's edges directed; this adapter does not, and says so."""
    import pathlib

    _write_ogb(tmp_path, edges=((0, 1), (1, 1), (2, 3)))
    d = gd.load_node_dataset("ogb:ogbn-toy", root=str(tmp_path))
    assert sorted(map(tuple, d["edge_index"].t().tolist())) == [(0, 1), (1, 0), (2, 3), (3, 2)]
    docs = (pathlib.Path(__file__).parents[1] / "docs" / "graph.md").read_text()
    for text in (gd.__doc__, docs):
        assert "undirected" in text and "self loops are dropped" in text and "directed" in text


def test_ogb_layout_accepts_the_zip_folder_and_skips_hidden_split_entries(tmp_path):
    """OGB's zip extracts to toy/ (not ogbn_toy/): read either, and say so when both are missing; without
    data.split only visible folders under split/ are schemes (not .ipynb_checkpoints/ or a README.txt)."""
    with pytest.raises(FileNotFoundError, match=r"into .* \(it extracts to .*/toy/, which is read as is"):
        gd.load_node_dataset("ogb:ogbn-toy", root=str(tmp_path))
    root = _write_ogb(tmp_path, folder="toy")
    (root / "split" / ".ipynb_checkpoints").mkdir()
    (root / "split" / "README.txt").write_text("the split schemes")
    d = gd.load_node_dataset("ogb:ogbn-toy", root=str(tmp_path))
    assert d["train_mask"].tolist() == [True, True, False, False]


def test_model_with_another_class_count_is_named(tmp_path):
    """model.num_classes below the data's was torch's "Target 3 is out of bounds" traceback, above it trained
    silently; either is now one line naming both keys."""
    pytest.importorskip("hydra")
    from zoo.tasks.graph.train import compose, fit

    for classes in (3, 5):
        cfg = compose(["experiment=graph_karate", "trainer.max_epochs=1", f"model.num_classes={classes}",
                       "model.heads=1", "+model.hidden_channels=4", "num_threads=1"])
        with pytest.raises(ValueError, match=rf"model\.num_classes={classes}\) but the data has 4 \(data\.num_classes=4\)"):
            fit(cfg, verbose=False, run_dir=str(tmp_path / f"run{classes}"))


def test_unbounded_max_epochs_is_refused_unless_something_ends_the_run(tmp_path):
    """trainer.max_epochs=-1 (no limit) with a constant learning rate ran forever; task.stop_at_acc,
    trainer.max_steps or trainer.max_time ends it."""
    pytest.importorskip("hydra")
    from zoo.tasks.graph.train import compose, fit

    common = ["experiment=graph_karate", "trainer.max_epochs=-1", "model.heads=1", "+model.hidden_channels=4",
              "trainer.check_val_every_n_epoch=1", "num_threads=1"]
    with pytest.raises(ValueError, match=r"trainer\.max_epochs=-1 \(no limit\) never ends a graph run: .*"
                                         r"\+trainer\.max_steps=N, \+trainer\.max_time=DD:HH:MM:SS, or task\.stop_at_acc"):
        fit(compose(common), verbose=False, run_dir=str(tmp_path / "a"))
    assert fit(compose([*common, "+trainer.max_steps=2"]), verbose=False, run_dir=str(tmp_path / "b"))["epochs"] == 2
    assert fit(compose([*common, "task.stop_at_acc=0.01"]), verbose=False, run_dir=str(tmp_path / "c"))["epochs"] >= 1
    # a time limit ends it too (it was refused): Lightning's Timer stops the run after 2 s
    timed = fit(compose([*common, "+trainer.max_time={seconds: 2}"]), verbose=False, run_dir=str(tmp_path / "d"))
    assert timed["epochs"] >= 1


def test_sbm_arguments_are_named():
    """+data.p_in=1.5 was torch.bernoulli's RuntimeError traceback at setup."""
    for key, value, message in (("p_in", 1.5, r"data\.p_in must be a probability in \[0, 1\], got 1\.5"),
                                ("p_out", -0.1, r"data\.p_out must be a probability in \[0, 1\], got -0\.1"),
                                ("block_sizes", [60, 0], r"data\.block_sizes must be a list of at least 2 positive"),
                                ("num_channels", 0, r"data\.num_channels must be a positive integer, got 0"),
                                ("feature_noise", -1.0, r"data\.feature_noise must be a finite number >= 0")):
        with pytest.raises(ValueError, match=message):
            gd.NodeDataModule("sbm", **{key: value}).setup()
    with pytest.raises(ValueError, match=r"^p_in must be a probability"):
        gd.stochastic_block_model(p_in=2.0)


def test_viz_graph_draws_a_checkpoint_on_the_data_it_was_trained_on(tmp_path, one_thread):
    """`zoo viz graph ckpt=<released dir>` without data= used karate ("x has 34 features, the layer expects 16");
    it now reads the data from the checkpoint's recorded zoo_config, and names it when data= disagrees."""
    from zoo.tasks.graph.viz import main

    model = zoo.create_model("gatv2_node", in_channels=16, num_classes=3, heads=1, hidden_channels=4)
    data_cfg = {"_target_": "zoo.tasks.graph.datasets.NodeDataModule", "name": "sbm", "num_features": 16,
                "num_classes": 3, "model_kind": "node", "root": None, "seed": 0, "p_in": 0.2}
    ckpt = zoo.save_pretrained(model, tmp_path / "released", metadata={"zoo_config": {"data": data_cfg}})
    out = tmp_path / "att.png"
    assert main([f"ckpt={ckpt}", f"out={out}"]) == 0
    assert out.stat().st_size > 1000
    with pytest.raises(SystemExit, match=r"takes 16 node features but data=karate has 34; it was trained on data=sbm"):
        main([f"ckpt={ckpt}", "data=karate", f"out={out}"])


@pytest.mark.parametrize("dtype, nodes", [(torch.bfloat16, 300), (torch.bfloat16, 1000), (torch.float16, 3000)])
def test_global_mean_pool_of_half_features_equals_pyg(dtype, nodes):
    """Large graphs in bf16 / fp16: sums and counts accumulated in the features' dtype stopped at 256 (bf16) or
    2048 (fp16), so the mean of 1000 ones in bf16 was 3.9. PyG's global_mean_pool is the reference."""
    from torch_geometric.nn import global_mean_pool as pyg_mean_pool

    from zoo.tasks.graph.gat import global_mean_pool

    g = torch.Generator().manual_seed(0)
    x = (1 + torch.rand(nodes + 5, 3, generator=g)).to(dtype)
    batch = torch.cat([torch.zeros(nodes, dtype=torch.long), torch.ones(5, dtype=torch.long)])
    ours = global_mean_pool(x, batch, 2)
    want = pyg_mean_pool(x.double(), batch, 2)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours.double(), want, rtol=1e-2, atol=0)
    torch.testing.assert_close(ours, pyg_mean_pool(x, batch, 2), rtol=1e-2, atol=0)


def test_viz_graph_dictlookup_trains_with_the_experiment_seed(monkeypatch):
    """`zoo viz graph data=dictlookup` without seed= trains with the seed of `zoo train
    experiment=graph_dictlookup`: how many epochs GATv2 needs depends on the seed, and at the karate default 0 its
    5 epochs drew attention far from the key (test accuracy 0.47) where the experiment's run is at 1.000."""
    from zoo.tasks.graph import viz
    from zoo.train import run

    seeds = []
    monkeypatch.setattr(viz.torch, "manual_seed", lambda seed: seeds.append(seed))
    monkeypatch.setattr(viz, "_dictlookup", lambda opts, model=None: 0)
    assert viz.main(["data=dictlookup"]) == 0
    assert viz.main(["data=dictlookup", "seed=3"]) == 0
    assert seeds == [int(run.compose(["experiment=graph_dictlookup"]).seed), 3]


# ------------------------------------------------------------------------- audit of the graph tasks, 3rd pass
def test_node_train_acc1_is_the_eval_mode_accuracy_of_the_training_nodes(tmp_path):
    """train/acc1 of node classification was the training-mode forward's (dropout 0.6 on features and attention):
    karate debug=overfit printed 0.75 where README promises 100%. It is now the eval-mode accuracy on the training
    nodes (as PyG's examples/gat.py reports it), checked against the final weights computed here; the dropout
    figure stays as train/acc1_dropout."""
    pytest.importorskip("hydra")
    from zoo.train import run

    result = run.train(run.compose(["experiment=graph_karate", "debug=overfit", "num_threads=1", "test=false",
                                    "export=false", "logger=none", f"run_dir={tmp_path / 'run'}"]))
    metrics = result["metrics"]
    assert metrics["train/acc1"] == 1.0, metrics  # the debug=overfit promise
    assert "train/acc1_dropout" in metrics
    module, datamodule = run.build(run.compose(["experiment=graph_karate"]))
    module.load_state_dict(torch.load(result["last_ckpt"], weights_only=False)["state_dict"])
    datamodule.setup()
    data, model = datamodule.data, module.model.eval()
    with torch.no_grad():
        logits = model(data["x"], data["edge_index"])
    mask = data["train_mask"]
    expected = (logits[mask].argmax(-1) == data["y"][mask]).float().mean().item()
    assert metrics["train/acc1"] == pytest.approx(expected)


def test_node_evaluation_reports_the_ema_weights(one_thread):
    """With task.ema_decay, node classification's val/acc1 and train/acc1 are those of the EMA copy (the weights the
    best checkpoint is chosen for and the release holds), not the raw model's: here the raw model is trained by hand
    while the EMA copy keeps its initial weights, so the two accuracies differ."""
    pytest.importorskip("hydra")
    import lightning as L

    from zoo.train import run

    module, datamodule = run.build(run.compose(["experiment=graph_sbm", "+task.ema_decay=0.9"]))
    assert module.model_ema is not None
    datamodule.setup()
    data = datamodule.data
    torch.manual_seed(0)
    opt = torch.optim.Adam(module.model.parameters(), lr=5e-3)
    for _ in range(30):
        loss = F.cross_entropy(module.model(data["x"], data["edge_index"])[data["train_mask"]],
                               data["y"][data["train_mask"]])
        opt.zero_grad()
        loss.backward()
        opt.step()

    def accuracies(model):
        with torch.no_grad():
            predicted = model.eval()(data["x"], data["edge_index"]).argmax(-1)
        return {split: (predicted == data["y"])[data[f"{split}_mask"]].float().mean().item() for split in ("val", "train")}

    ema_acc = accuracies(copy.deepcopy(module.model_ema.module))
    raw_acc = accuracies(copy.deepcopy(module.model))
    assert ema_acc["val"] != raw_acc["val"], (ema_acc, raw_acc)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(module, datamodule, verbose=False)[0]
    assert metrics["val/acc1"] == pytest.approx(ema_acc["val"])
    assert metrics["train/acc1"] == pytest.approx(ema_acc["train"])


def test_graph_minibatch_train_loss_is_the_epoch_mean():
    """metrics.json's train/loss of mini-batch graph runs was the last step's loss while train/acc1 beside it was
    the epoch's mean: it is now the mean over the epoch's targets, recomputed here from every step's loss."""
    pytest.importorskip("hydra")
    import lightning as L

    from zoo.train import run

    module, datamodule = run.build(run.compose(["experiment=graph_dictlookup", "model.name=gatv2_dictlookup_debug",
                                                "data.k=4", "data.batch_size=5"]))

    class StepLosses(L.Callback):
        def __init__(self):
            self.steps = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.steps.append((trainer.current_epoch, float(outputs["loss"]), batch["y"].numel()))

    record = StepLosses()
    trainer = L.Trainer(max_epochs=2, callbacks=[record], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule)
    last = [(loss, n) for epoch, loss, n in record.steps if epoch == 1]
    assert len(last) > 1 and len({loss for loss, _ in last}) > 1
    expected = sum(loss * n for loss, n in last) / sum(n for _, n in last)
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (["experiment=graph_dictlookup", "data.k=4", "model.name=gatv2_node"],
     r"model gatv2_node reads node batches but data DictionaryLookupDataModule gives dictlookup batches: use "
     r"model\.name=<one of gat_dictlookup, gatv2_dictlookup, gatv2_dictlookup_debug, transformer_dictlookup> \(or model=gat\|gatv2\|transformer, which picks <conv>_dictlookup\)"),
    (["experiment=graph_karate", "model.name=gatv2_graph"],
     r"model gatv2_graph reads graph batches but data karate gives node batches: use model\.name=<one of gat_node, "
     r"gatv2_node, gatv2_node_debug, transformer_node> \(or model=gat\|gatv2\|transformer, which picks <conv>_node\)"),
    (["experiment=graph_synthetic", "model.name=gatv2_node_debug"],
     r"model gatv2_node_debug reads node batches but data GraphClassificationDataModule gives graph batches: use "
     r"model\.name=<one of gat_graph, gatv2_graph, gatv2_graph_debug, transformer_graph> \(or model=gat\|gatv2\|transformer, which picks <conv>_graph\)"),
], ids=["node-on-dictlookup", "graph-on-karate", "node-on-synthetic"])
def test_a_graph_model_of_another_kind_is_named_before_building(overrides, message):
    """A model of the wrong graph kind failed in its first forward ("Boolean value of Tensor with more than one
    value is ambiguous", missing / too many positional arguments); now one line naming the matching models."""
    pytest.importorskip("hydra")
    from zoo.train import run

    with pytest.raises(ValueError, match=message):
        run.build(run.compose(overrides))


def test_graph_model_kind_check_leaves_user_named_models_alone():
    """The kind check read any name's last word as its kind: a user's zoo.register_model(task="graph") model
    named "mysage" was refused on every dataset ("reads mysage batches")."""
    from omegaconf import OmegaConf

    from zoo.registry import _REGISTRY
    from zoo.train.run import _check_graph_model_kind

    @zoo.register_model(task="graph", family="test_kind", name="mysage_for_kind_check")
    def mysage(**kwargs):
        return torch.nn.Linear(2, 2)

    try:
        cfg = OmegaConf.create({"model": {"_target_": "zoo.create_model", "name": "mysage_for_kind_check"},
                                "data": {"name": "graph_karate", "model_kind": "node"}})
        _check_graph_model_kind(cfg)  # not refused
        cfg.model.name = "gatv2_graph"
        with pytest.raises(ValueError, match="reads graph batches but data graph_karate gives node batches"):
            _check_graph_model_kind(cfg)
    finally:
        _REGISTRY.pop("mysage_for_kind_check", None)


@pytest.mark.parametrize("key, value, message", [
    ("max_examples", 0, r"^data\.max_examples must be a positive integer .*got 0$"),
    ("max_examples", -5, r"^data\.max_examples must be a positive integer .*got -5$"),
    ("seed", "foo", r"^data\.seed must be an integer .*got 'foo'$"),
    ("k", 1, r"^data\.k must be an integer >= 2 .*got 1$"),
    ("batch_size", 0, r"^data\.batch_size must be a positive integer, got 0$"),
    # unseen_combinations_split's own message, without the data. prefix the other keys have (audit7)
    ("train_fraction", 1.0, r"^data\.train_fraction must be a number in \(0, 1\) .*got 1\.0$"),
    ("train_fraction", "0.5", r"^data\.train_fraction must be a number in \(0, 1\) .*got '0\.5'$"),
])
def test_dictionary_lookup_arguments_are_named(key, value, message):
    """data.max_examples=0 was torch.stack's "expects a non-empty TensorList", data.seed=foo manual_seed's
    "expected a long": both from deep inside torch at setup."""
    from zoo.tasks.graph.dictlookup import DictionaryLookupDataModule

    with pytest.raises(ValueError, match=message):
        DictionaryLookupDataModule(**{"k": 4, key: value}).setup()


def test_fit_does_not_return_a_deleted_run_dir(tmp_path):
    """python -m zoo.tasks.graph.train printed the path of a TemporaryDirectory deleted on return: run_dir is None
    for such a run, and the directory given otherwise (which exists)."""
    pytest.importorskip("hydra")
    import os

    from zoo.tasks.graph.train import compose, fit

    common = ["experiment=graph_karate", "trainer.max_epochs=1", "model.heads=1", "+model.hidden_channels=4",
              "num_threads=1"]
    assert fit(compose(common), verbose=False)["run_dir"] is None
    kept = fit(compose(common), verbose=False, run_dir=str(tmp_path / "kept"))["run_dir"]
    assert kept == str(tmp_path / "kept") and os.path.isdir(kept)


def test_graph_classifier_infers_the_graph_count_as_pyg_pooling():
    """GATGraphClassifier is called as PyG's models are: model(x, edge_index, batch) pools as
    torch_geometric.nn.global_mean_pool(x, batch) (num_graphs = batch.max() + 1), model(x, edge_index) as one graph
    (global_mean_pool(x, None)); num_graphs, when given, gives the same."""
    from torch_geometric.data import Batch, Data
    from torch_geometric.nn import global_mean_pool as pyg_mean_pool

    torch.manual_seed(0)
    model = zoo.create_model("gatv2_graph_debug").eval()
    graphs = [Data(x=torch.randn(n, 8), edge_index=torch.randint(0, n, (2, 2 * n))) for n in (4, 7, 5)]
    b = Batch.from_data_list(graphs)

    def reference(batch):
        h = b.x
        for conv in model.convs:
            h = F.elu(conv(h, b.edge_index))
        return model.head(model.norm(pyg_mean_pool(h, batch)))

    with torch.no_grad():
        torch.testing.assert_close(model(b.x, b.edge_index, b.batch), reference(b.batch), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(model(b.x, b.edge_index, b.batch), model(b.x, b.edge_index, b.batch, 3))
        torch.testing.assert_close(model(b.x, b.edge_index), reference(None), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"batch value -1 is out of range for num_graphs=2 \(batch.max\(\) \+ 1\)"):
        model(b.x, b.edge_index, b.batch - 1)


def test_trainer_predict_gives_class_probabilities_of_the_graph_data():
    """trainer.predict(module, datamodule) failed with "predict_dataloader must be implemented": now the node task
    gives every node's class probabilities, the graph task every test graph's (and a DictionaryLookup loader every
    target's), each the softmax of the eval-mode model's logits."""
    import lightning as L

    from zoo.tasks.graph.dictlookup import DictionaryLookupDataModule
    from zoo.tasks.graph.lit import GraphTargetsModule, NodeClassificationModule

    def predict(module, **data):
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        return trainer.predict(module, **data)

    torch.manual_seed(0)
    node_data = gd.NodeDataModule("karate")
    node_data.setup()
    module = NodeClassificationModule(zoo.create_model("gatv2_node_debug"))
    (probs,) = predict(module, datamodule=node_data)
    data = node_data.data
    with torch.no_grad():
        expected = module.model.eval()(data["x"], data["edge_index"]).softmax(-1)
    assert probs.shape == (34, 4)
    torch.testing.assert_close(probs, expected)

    graph_data = gd.GraphClassificationDataModule(num_graphs=20, batch_size=2)
    graph_data.setup()
    module = GraphTargetsModule(zoo.create_model("gatv2_graph_debug"))
    probs = torch.cat(predict(module, datamodule=graph_data))
    test = gd.collate_graphs(graph_data.splits["test"])
    with torch.no_grad():
        expected = module.model.eval()(test["x"], test["edge_index"], test["batch"], test["num_graphs"]).softmax(-1)
    assert probs.shape == (3, 3)
    torch.testing.assert_close(probs, expected)

    lookup = DictionaryLookupDataModule(k=4, batch_size=5)
    lookup.setup()
    module = GraphTargetsModule(zoo.create_model("gatv2_dictlookup_debug"))
    loader = lookup.test_dataloader()
    probs = predict(module, datamodule=lookup)[0]
    b = next(iter(loader))
    with torch.no_grad():
        expected = module.model.eval()(b["x"], b["edge_index"], b["target_index"]).softmax(-1)
    torch.testing.assert_close(probs, expected)


@pytest.mark.parametrize("name", ["gatv2_node_debug", "gat_node", "gatv2_graph_debug"])
def test_graph_classifiers_pass_edge_features_to_their_layers(name):
    """edge_dim / edge_attr as PyG's layers take them: each layer built with edge_dim and called with edge_attr,
    checked against the layers called directly; the Lightning modules pass a batch's edge_attr on."""
    from zoo.tasks.graph.gat import global_mean_pool
    from zoo.tasks.graph.lit import GraphTargetsModule, NodeClassificationModule

    torch.manual_seed(0)
    graph = "graph" in name
    model = zoo.create_model(name, edge_dim=3, **({} if graph else {"hidden_channels": 4, "heads": 2})).eval()
    assert all(conv.lin_edge is not None and conv.lin_edge.weight.shape[1] == 3 for conv in model.convs)
    n = 12
    x = torch.randn(n, 8 if graph else 34)
    edge_index = torch.randint(0, n, (2, 40))
    edge_attr = torch.randn(40, 3)
    batch = torch.arange(n) // 6
    h = x
    with torch.no_grad():
        for i, conv in enumerate(model.convs):
            h = conv(h, edge_index, edge_attr)
            h = F.elu(h) if graph or i < len(model.convs) - 1 else h
        if graph:
            h = model.head(model.norm(global_mean_pool(h, batch, 2)))
            got = model(x, edge_index, batch, 2, edge_attr=edge_attr)
            module = GraphTargetsModule(model)
            via_module = module({"x": x, "edge_index": edge_index, "batch": batch, "num_graphs": 2,
                                 "edge_attr": edge_attr})
        else:
            got = model(x, edge_index, edge_attr=edge_attr)
            module = NodeClassificationModule(model)
            via_module = module({"x": x, "edge_index": edge_index, "edge_attr": edge_attr})
    torch.testing.assert_close(got, h)
    torch.testing.assert_close(via_module, h)
    args = (x, edge_index, batch, 2) if graph else (x, edge_index)
    with pytest.raises(ValueError, match=r"built with edge_dim=3: pass edge_attr \[E, 3\]"):
        model(*args)
    plain = zoo.create_model(name, **({} if graph else {"hidden_channels": 4, "heads": 2}))
    with pytest.raises(ValueError, match="edge_attr was given but the model was built without edge features"):
        plain(*args, edge_attr=edge_attr)


def test_dictlookup_model_exports_strict_with_symbolic_sizes():
    """docs/graph.md says the graph models export (strict too): the DictionaryLookup model formatted the node count
    into its range-check message eagerly, which made strict torch.export fix N to the example's ("Constraints
    violated (N)")."""
    from torch.export import Dim

    from zoo.tasks.graph.dictlookup import DictionaryLookupDataModule

    torch.manual_seed(0)
    model = zoo.create_model("gatv2_dictlookup_debug").eval()
    small, large = DictionaryLookupDataModule(k=4, batch_size=2), DictionaryLookupDataModule(k=4, batch_size=3)
    small.setup(), large.setup()
    b0, b1 = next(iter(small.test_dataloader())), next(iter(large.test_dataloader()))
    args = lambda b: (b["x"], b["edge_index"], b["target_index"])  # noqa: E731
    shapes = ({0: Dim("N", min=4)}, {1: Dim("E", min=4)}, {0: Dim("Q", min=2)})
    program = torch.export.export(model, args(b0), dynamic_shapes=shapes, strict=True).module()
    with torch.no_grad():
        torch.testing.assert_close(program(*args(b1)), model(*args(b1)), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------- review of audit7 (graph tasks, CLI user)
@pytest.mark.parametrize("argv, message", [
    (["--table", "4", "--max-epochs", "1", "--threads", "1", "--runs", "gat:3"],
     "dim=128 must be divisible by heads=3"),
    (["--table", "1", "--max-epochs", "1", "--threads", "1", "--runs", "gat:1"],
     r"data\.k must be an integer >= 2 \(the dictionary size\), got 1"),
    (["--table", "4", "--max-epochs", "1", "--threads", "1", "--runs", "foo:1"], "unknown model=foo"),
    (["--threads", "1", "experiment=graph_dictlookup", "data.train_fraction=1.0"],
     r"data\.train_fraction must be a number in \(0, 1\)"),
])
def test_the_table_command_ends_bad_settings_in_one_line_as_zoo_train(argv, message, capsys, monkeypatch):
    """python -m zoo.tasks.graph.train --table ... ended bad settings in a traceback, where zoo train prints one line
    and the ZOO_DEBUG hint; it uses zoo.cli's handling of user errors now (ZOO_DEBUG=1 gives the traceback)."""
    pytest.importorskip("hydra")
    import re

    from zoo.tasks.graph.train import main

    monkeypatch.delenv("ZOO_DEBUG", raising=False)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(rf"python -m zoo\.tasks\.graph\.train: error: [^\n]*{message}[^\n]*\n"
                        r"\(set ZOO_DEBUG=1 for the traceback\)\n", err), err
    monkeypatch.setenv("ZOO_DEBUG", "1")
    with pytest.raises(ValueError, match=message):
        main(argv)


def test_a_dictlookup_checkpoint_on_another_k_names_the_k_it_was_trained_with(tmp_path, one_thread, capsys):
    """zoo eval ckpt=<k=4 run> data.k=5 said "DictionaryLookup(k=5) has num_features=5, the config says 4", without
    a word that the model is a k=4 model (data.num_features cannot change that). zoo train's message for the same
    sizes is the one it was; zoo viz graph data=dictlookup refuses epochs= with the checkpoint."""
    pytest.importorskip("hydra")
    from zoo import cli
    from zoo.tasks.graph.dictlookup import DictionaryLookupDataModule
    from zoo.tasks.graph.viz import main as viz
    from zoo.train import run

    run.train(run.compose(["experiment=graph_dictlookup", "data.k=4", "trainer.max_epochs=1", "callbacks=minimal",
                           "logger=none", "num_threads=1", "+trainer.enable_progress_bar=false",
                           f"run_dir={tmp_path / 'run'}"]))
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    evaluated = (r"^DictionaryLookup\(k=5\) has num_features=5, the config says 4: the model is one of k=4 \(a "
                 r"checkpoint of a k=4 run is evaluated with data\.k=4; a new run needs data\.k alone\)$")
    with pytest.raises(ValueError, match=evaluated):
        run.evaluate(ckpt, ["data.k=5"])
    assert 0.0 <= run.evaluate(ckpt)["test/acc1"] <= 1.0  # its own k: evaluated
    with pytest.raises(ValueError, match=evaluated):  # refused when built, before a run's files are written
        DictionaryLookupDataModule(k=5, num_features=4, num_classes=4)
    with pytest.raises(ValueError, match=r"^DictionaryLookup\(k=5\) has num_classes=5, the config says 4$"):
        DictionaryLookupDataModule(k=5, num_features=5, num_classes=4)  # sizes no model has: refused when built
    with pytest.raises(SystemExit, match=rf"^zoo viz graph: epochs=2 applies only without ckpt= .*ckpt={ckpt} fixes "
                                         r"the model: leave epochs out"):
        viz(["data=dictlookup", f"ckpt={ckpt}", "epochs=2", f"out={tmp_path / 'a.png'}"])
    assert viz([f"ckpt={ckpt}", "node=1", f"out={tmp_path / 'a.png'}"]) == 0  # drawn on its own data, k=4
    assert cli.main(["eval", f"ckpt={ckpt}", "data.k=5"]) == 1
    assert "the model is one of k=4" in capsys.readouterr().err


# ------------------------------------------------------------------ mutation audit of the graph tasks
@pytest.mark.parametrize("conv, heads", [("gatv2", 1), ("gatv2", 2), ("gat", 1)])
def test_dictionary_lookup_net_is_the_official_model_on_pyg_layers(conv, heads):
    """DictionaryLookupNet against the official GraphModel (tech-srl/how_attentive_are_gats,
    dictionary_lookup/models/graph_model.py: one layer, no residual, activation or layer norm; its dropout quirk
    left out as the class docstring says) rebuilt here on PyG's layers with the model's weights: key and value
    embeddings summed, ReLU, GATv2Conv(share_weights=True, bias=False, add_self_loops=False) or
    GATConv(add_self_loops=True), a bias-free linear head on the query nodes. Every weight is redrawn first, so
    no zero-initialised term (a bias) hides."""
    pytest.importorskip("torch_geometric")
    from torch_geometric.nn import GATConv, GATv2Conv

    k, dim = 4, 16
    torch.manual_seed(0)
    model = zoo.create_model(f"{conv}_dictlookup", num_classes=k, dim=dim, heads=heads).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    if conv == "gatv2":
        layer = GATv2Conv(dim, dim // heads, heads=heads, bias=False, share_weights=True, add_self_loops=False)
    else:
        layer = GATConv(dim, dim // heads, heads=heads, add_self_loops=True)
    layer.load_state_dict(model.conv.state_dict())
    assert {name for name, _ in model.named_parameters() if not name.startswith("conv.")} == {
        "key_embed.weight", "value_embed.weight", "head.weight"}
    b = collate(generate_permutations(k)[:5])
    x = b["x"]
    with torch.no_grad():
        h = F.relu(F.embedding(x[:, 0], model.key_embed.weight) + F.embedding(x[:, 1], model.value_embed.weight))
        expected = layer.eval()(h, b["edge_index"])[b["target_index"]] @ model.head.weight.t()
        got = model(x, b["edge_index"], b["target_index"])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_dictionary_lookup_generates_every_permutation_up_to_max_examples():
    """k! <= max_examples gives all k! permutations, lexicographic, as the official get_combinations (random ones
    only when k! exceeds the cap): the boundary k! == max_examples included."""
    for k in (4, 5):
        count = len(list(itertools.permutations(range(k))))
        perms = generate_permutations(k, max_examples=count)
        assert perms.tolist() == [list(p) for p in itertools.permutations(range(k))]
    assert generate_permutations(5, max_examples=119).shape == (119, 5)


def test_dictionary_lookup_validates_and_tests_on_the_unseen_combination_split():
    """val/acc1 (the stop_at_acc and best-checkpoint figure) and test/acc1 score the unseen-combination split, the
    paper's test set, and predict reads it too: every one of those graphs holds a (key, value) pair that no
    training graph has, and the training loader gives the training graphs."""
    from zoo.tasks.graph.dictlookup import DictionaryLookupDataModule

    k = 4
    dm = DictionaryLookupDataModule(k=k, batch_size=7)
    dm.setup()

    def perms_of(loader):
        return sorted(tuple(p) for b in loader for p in b["y"].view(-1, k).tolist())

    train = perms_of(dm.train_dataloader())
    assert train == sorted(tuple(p) for p in dm.train_perms.tolist())
    seen = {(i, v) for p in train for i, v in enumerate(p)}
    for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        held_out = perms_of(loader)
        assert held_out == sorted(tuple(p) for p in dm.test_perms.tolist())
        assert held_out and all(any((i, v) not in seen for i, v in enumerate(p)) for p in held_out)
    assert len(train) + len(dm.test_perms) == 24


class _LookupOracle(torch.nn.Module):
    """Reads each query's answer off its graph's key-value nodes (DictionaryLookup batches: per graph k queries, then
    k key-value nodes), and gets it wrong where ``miss(key, answer)``; ``zero`` puts a parameter in the graph so that
    the loss has something to step."""

    def __init__(self, k: int, miss=lambda key, answer: torch.zeros_like(key, dtype=torch.bool)):
        super().__init__()
        self.k, self.miss, self.num_classes = k, miss, k
        self.zero = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, edge_index, target_index):
        k = self.k
        graph, key = target_index // (2 * k), target_index % (2 * k)
        answer = x[graph * 2 * k + k + key, 1]
        predicted = torch.where(self.miss(key, answer), (answer + 1) % k, answer)
        return F.one_hot(predicted, k).float() * 10 + self.zero


def test_dictlookup_graph_acc_is_the_share_of_graphs_with_every_query_right():
    """val/graph_acc groups the query results per graph (the batch's queries are graph after graph): a model that is
    wrong exactly on the fixed points of the permutation (perm[key] == key) gets a graph right iff its permutation is
    a derangement; val/acc1 is the share of non-fixed points. Both computed here from the permutations."""
    import lightning as L

    from zoo.tasks.graph.dictlookup import DictionaryLookupDataModule
    from zoo.tasks.graph.lit import GraphTargetsModule

    k = 5
    dm = DictionaryLookupDataModule(k=k, batch_size=7)  # batches of 7 graphs, the last one shorter
    dm.setup()
    module = GraphTargetsModule(_LookupOracle(k, miss=lambda key, answer: key == answer))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    metrics = trainer.validate(module, dm, verbose=False)[0]
    moved = dm.test_perms != torch.arange(k)
    assert 0 < moved.all(1).float().mean() < 1  # some graphs right, some wrong
    assert metrics["val/graph_acc"] == pytest.approx(moved.all(1).float().mean().item())
    assert metrics["val/acc1"] == pytest.approx(moved.float().mean().item())


def test_stop_at_acc_stops_when_val_acc1_reaches_it_exactly():
    """task.stop_at_acc=1.0 (the paper trains DictionaryLookup until 100%) stops at the first validation whose
    val/acc1 equals it: a model that is always right stops after one epoch of max_epochs=4."""
    import lightning as L

    from zoo.tasks.graph.dictlookup import DictionaryLookupDataModule
    from zoo.tasks.graph.lit import GraphTargetsModule

    dm = DictionaryLookupDataModule(k=4, batch_size=8)
    module = GraphTargetsModule(_LookupOracle(4), stop_at_acc=1.0)
    trainer = L.Trainer(accelerator="cpu", max_epochs=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, dm)
    assert float(trainer.callback_metrics["val/acc1"]) == 1.0
    assert trainer.current_epoch == 1, trainer.current_epoch


def test_trainer_predict_gives_the_ema_weights_probabilities():
    """With ema_decay, trainer.predict gives the EMA copy's probabilities (the weights validation scores and the
    release holds), as the module docstring says: here the raw weights are moved away from the EMA copy's."""
    import lightning as L

    from zoo.tasks.graph.dictlookup import DictionaryLookupDataModule
    from zoo.tasks.graph.lit import GraphTargetsModule, NodeClassificationModule

    def predict(module, datamodule):
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        return trainer.predict(module, datamodule=datamodule)

    torch.manual_seed(0)
    node_data = gd.NodeDataModule("karate")
    node_data.setup()
    module = NodeClassificationModule(zoo.create_model("gatv2_node_debug"), ema_decay=0.9)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(torch.randn_like(p))
    ema = copy.deepcopy(module.model_ema.module).eval()
    data = node_data.data
    with torch.no_grad():
        expected = ema(data["x"], data["edge_index"]).softmax(-1)
        raw = copy.deepcopy(module.model).eval()(data["x"], data["edge_index"]).softmax(-1)
    assert not torch.allclose(expected, raw, atol=1e-3)
    (probs,) = predict(module, node_data)
    torch.testing.assert_close(probs, expected)

    lookup = DictionaryLookupDataModule(k=4, batch_size=50)
    module = GraphTargetsModule(zoo.create_model("gatv2_dictlookup_debug"), ema_decay=0.9)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(torch.randn_like(p))
    ema = copy.deepcopy(module.model_ema.module).eval()
    (probs,) = predict(module, lookup)
    b = next(iter(lookup.predict_dataloader()))
    with torch.no_grad():
        expected = ema(b["x"], b["edge_index"], b["target_index"]).softmax(-1)
    torch.testing.assert_close(probs, expected)


@pytest.mark.parametrize("name", ["gatv2_graph_debug", "gat_graph"])
def test_graph_classifier_is_pyg_residual_layers_mean_pool_norm_and_head(name):
    """GATGraphClassifier as its docstring describes it, rebuilt on PyG's layers with the model's weights (redrawn
    first, so that zero-initialised terms count): attention layers with concatenated heads, a residual projection
    (residual=True) and ELU, PyG's global_mean_pool, LayerNorm, a linear head."""
    pytest.importorskip("torch_geometric")
    from torch_geometric.data import Batch, Data
    from torch_geometric.nn import GATConv, GATv2Conv, global_mean_pool

    torch.manual_seed(0)
    model = zoo.create_model(name, in_channels=8, num_classes=3, hidden_channels=4, heads=2, num_layers=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.5)
    layer = GATv2Conv if name.startswith("gatv2") else GATConv
    layers = [layer(8, 4, heads=2, residual=True), layer(8, 4, heads=2, residual=True)]
    for ours, theirs in zip(model.convs, layers):
        theirs.load_state_dict(ours.state_dict())
        theirs.eval()
    graphs = [Data(x=torch.randn(n, 8), edge_index=torch.randint(0, n, (2, 2 * n))) for n in (4, 7, 5)]
    b = Batch.from_data_list(graphs)
    with torch.no_grad():
        h = b.x
        for conv in layers:
            h = F.elu(conv(h, b.edge_index))
        expected = F.linear(F.layer_norm(global_mean_pool(h, b.batch), (8,), model.norm.weight, model.norm.bias),
                            model.head.weight, model.head.bias)
        torch.testing.assert_close(model(b.x, b.edge_index, b.batch, 3), expected, atol=1e-5, rtol=1e-5)


_STACK_OPTIONS = {"loops": dict(add_self_loops=True), "no-loops": dict(add_self_loops=False),
                  "residual-edges": dict(add_self_loops=False, residual=True, edge_dim=3), "shared": dict(share_weights=True)}


@pytest.mark.parametrize("conv, options", [(conv, options) for conv in ("gatv2", "gat")
                                          for name, options in _STACK_OPTIONS.items()
                                          if not (conv == "gat" and name == "shared")],  # (GATConv: no share_weights)
                         ids=[f"{conv}-{name}" for conv in ("gatv2", "gat") for name in _STACK_OPTIONS
                              if not (conv == "gat" and name == "shared")])
def test_node_classifier_is_a_pyg_stack_in_train_and_eval(conv, options):
    """GATNodeClassifier is PyG's examples/gat.py model: per layer F.dropout(x) then the conv (GATv2Conv / GATConv
    built with the classifier's add_self_loops, residual, edge_dim, share_weights), ELU between layers. Compared
    with that stack of PyG layers holding the same weights, in float64: eval logits, and train logits under the same
    seed (input dropout and the layers' attention dropout drawn in the same order). Mutation audit 2026-12-07: the
    classifier ignoring add_self_loops, or dropping its input dropout, passed every test."""
    import torch_geometric.nn as pyg_nn

    from zoo.tasks.graph.gat import GATNodeClassifier

    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64) + 2.0  # no zero feature: dropout shows
    edge_index = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 2, 4], [1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0]])
    edge_attr = torch.randn(edge_index.shape[1], 3, generator=g, dtype=torch.float64) if "edge_dim" in options else None
    ours = GATNodeClassifier(5, 3, hidden_channels=4, heads=2, conv=conv, dropout=0.5, **options).double()
    peer_class = pyg_nn.GATv2Conv if conv == "gatv2" else pyg_nn.GATConv
    layer_options = {k: v for k, v in options.items() if k != "share_weights" or conv == "gatv2"}
    peers = torch.nn.ModuleList([peer_class(5, 4, heads=2, dropout=0.5, **layer_options),
                                 peer_class(8, 3, heads=1, concat=False, dropout=0.5, **layer_options)]).double()
    peers.load_state_dict({key.removeprefix("convs."): value for key, value in ours.state_dict().items()})
    assert all(layer.add_self_loops is options["add_self_loops"] for layer in ours.convs) \
        if "add_self_loops" in options else True

    def peer_forward(features):
        for i, layer in enumerate(peers):
            features = layer(F.dropout(features, 0.5, peers.training), edge_index, edge_attr)
            features = F.elu(features) if i == 0 else features
        return features

    for training in (False, True):
        ours.train(training)
        peers.train(training)
        torch.manual_seed(7)
        got = ours(x, edge_index, edge_attr=edge_attr)
        torch.manual_seed(7)
        want = peer_forward(x)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.manual_seed(7)
    assert not torch.allclose(ours(x, edge_index, edge_attr=edge_attr), ours.eval()(x, edge_index, edge_attr=edge_attr))
