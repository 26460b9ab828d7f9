"""Graph task: DictionaryLookup generation (re-derived from the official recipe) and learnability
(GATv2 learns the lookup, single-head GAT cannot), registered models, datasets and their clear errors,
the Hydra configs end to end, `zoo viz graph` and `zoo bench graph` smoke runs."""
from __future__ import annotations

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


@pytest.fixture
def one_thread():
    """Tiny full-batch runs: one intra-op thread (on a shared 2-core CI machine, OpenMP barriers of
    tiny ops cost more than the ops)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train_lookup(name, heads, k=5, steps=150, seed=0):
    train, test = unseen_combinations_split(generate_permutations(k), seed=11)
    bt, bs = collate(train), collate(test)
    torch.manual_seed(seed)
    model = zoo.create_model(name, num_classes=k, heads=heads, dim=32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(model(bt["x"], bt["edge_index"], bt["target_index"]), bt["y"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (model(bs["x"], bs["edge_index"], bs["target_index"]).argmax(-1) == bs["y"]).float().mean().item()


def test_dictionary_lookup_gatv2_learns_it_and_single_head_gat_cannot(one_thread):
    # k=5: 72 training / 48 test graphs, full batch, 150 Adam steps (about a second each)
    gatv2 = _train_lookup("gatv2_dictlookup", 1)
    gat = _train_lookup("gat_dictlookup", 1)
    assert gatv2 >= 0.85, gatv2
    assert gat <= 0.45, gat  # chance is 0.2: static attention ranks the keys the same for every query


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


def test_node_classifier_trains_on_sbm(one_thread):
    data = gd.stochastic_block_model(seed=0)
    torch.manual_seed(0)
    model = zoo.create_model("gatv2_node", in_channels=16, num_classes=3, heads=4)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3, weight_decay=5e-4)
    for _ in range(60):
        loss = F.cross_entropy(model(data["x"], data["edge_index"])[data["train_mask"]], data["y"][data["train_mask"]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    acc = (model(data["x"], data["edge_index"]).argmax(-1) == data["y"])[data["test_mask"]].float().mean()
    assert acc > 0.8, acc


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


# ------------------------------------------------------------------------------------ configs end to end
@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=graph_dictlookup", "model=gatv2", "data.k=4", "data.batch_size=16", "trainer.max_epochs=1"],
        ["experiment=graph_dictlookup", "model=gat", "model.heads=2", "data.k=4", "trainer.max_epochs=1",
         "+model.dim=16"],
        ["experiment=graph_karate", "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=1"],
        ["experiment=graph_synthetic", "trainer.max_epochs=1", "data.num_graphs=30", "+model.hidden_channels=4"],
    ],
)
def test_configs_compose_and_train(overrides):
    pytest.importorskip("hydra")
    from zoo.tasks.graph.train import compose, fit

    cfg = compose(overrides)
    result = fit(cfg, verbose=False)
    assert 0.0 <= result["test_acc"] <= 1.0
    assert result["model"].startswith(("gatv2_", "gat_"))


# ------------------------------------------------------------------------------------------ viz, bench
def test_viz_graph_writes_png(tmp_path):
    from zoo.tasks.graph.viz import main

    out = tmp_path / "att.png"
    assert main(["data=karate", "node=0", "epochs=3", "heads=2", f"out={out}"]) == 0
    assert out.stat().st_size > 1000
    with pytest.raises(SystemExit):
        main(["node=99", f"out={out}", "epochs=0"])


def test_bench_graph_smoke(capsys):
    from zoo.bench.graph import main

    assert main(["--sizes", "300:60", "--channels", "4", "--heads", "2", "--repeats", "1", "--warmup", "0",
                 "--no-memory"]) == 0
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("| 300 |")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[-2]) < 1e-4 and float(cells[-1]) < 1e-4  # same outputs and gradients as PyG
