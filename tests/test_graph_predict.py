"""``zoo predict`` of graph models (zoo.tasks.graph.predict through zoo.train.run.predict and the CLI).

Each run below trains for a few steps in a temporary folder; the expected probabilities are computed here
independently: the model rebuilt from the checkpoint's ``model_name`` / ``model_args`` with the weights of its
state dict (the EMA copy where the run kept one), run on the data as the data loaders give it, softmaxed.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from zoo import cli
from zoo.train import run

pytest.importorskip("torch_geometric")

from torch_geometric.data import Data  # noqa: E402

from zoo.tasks.graph import datasets as gd  # noqa: E402

COMMON = ["callbacks=minimal", "logger=none", "num_threads=1", "trainer.enable_model_summary=false",
          "+trainer.enable_progress_bar=false"]


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


def _train(run_dir, *overrides) -> str:
    torch.set_num_threads(1)
    run.train(run.compose([*overrides, *COMMON, f"run_dir={run_dir}"]))
    return str(run_dir / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="module")
def karate_ckpt(tmp_path_factory) -> str:
    """Two epochs of graph_karate with an EMA copy of the weights (decay 0.5: it differs from the raw weights)."""
    return _train(tmp_path_factory.mktemp("karate") / "run", "experiment=graph_karate", "trainer.max_epochs=2",
                  "+task.ema_decay=0.5")


@pytest.fixture(scope="module")
def sbm_normalized_ckpt(tmp_path_factory) -> str:
    """Two epochs on a small SBM graph whose (signed, Gaussian) features are row-normalised for training."""
    return _train(tmp_path_factory.mktemp("sbm") / "run", "experiment=graph_sbm", "trainer.max_epochs=2",
                  "+data.block_sizes=[12,12,12]", "+data.normalize_features=true")


@pytest.fixture(scope="module")
def synthetic_ckpt(tmp_path_factory) -> str:
    return _train(tmp_path_factory.mktemp("synthetic") / "run", "experiment=graph_synthetic", "data.num_graphs=20",
                  "trainer.max_epochs=1", "+model.hidden_channels=4", "model.heads=2", "data.batch_size=8")


def _graph_without_x(num_nodes: int, edges: list[tuple[int, int]], y=None) -> Data:
    both = edges + [(b, a) for a, b in edges]
    data = Data(edge_index=torch.tensor(both, dtype=torch.long).reshape(-1, 2).t().contiguous(), num_nodes=num_nodes)
    if y is not None:
        data.y = torch.tensor([y])
    return data


def _star(leaves: int, y=None) -> Data:
    """Node 0 linked to every other node: its degree is ``leaves``."""
    return _graph_without_x(leaves + 1, [(0, i) for i in range(1, leaves + 1)], y)


def _path(num_nodes: int, y=None) -> Data:
    return _graph_without_x(num_nodes, [(i, i + 1) for i in range(num_nodes - 1)], y)


@pytest.fixture(scope="module")
def degree_ckpt(tmp_path_factory) -> str:
    """Graph classification on graphs without x (data.path): one-hot degrees capped at data.max_degree=3."""
    folder = tmp_path_factory.mktemp("degrees")
    graphs = [_star(2 + i % 4, y=0) if i % 2 else _path(3 + i % 5, y=1) for i in range(12)]
    torch.save(graphs, folder / "graphs.pt")
    return _train(folder / "run", "experiment=graph_synthetic", "data=graph_tu", "data.root=null",
                  f"data.path={folder / 'graphs.pt'}", "data.max_degree=3", "data.num_features=4",
                  "data.num_classes=2", "trainer.max_epochs=1", "+model.hidden_channels=4", "model.heads=2",
                  "data.batch_size=4")


class CustomData(Data):
    """A Data subclass of a user's: torch.load(weights_only=True) does not build it."""


def _reference_model(ckpt: str, weights: str = "eval"):
    """The checkpoint's model, rebuilt here: its EMA weights (``weights="eval"``, when kept) or its raw ones."""
    import zoo

    stored = torch.load(ckpt, map_location="cpu", weights_only=True)
    hp, state = stored["hyper_parameters"], stored["state_dict"]
    prefix = "model_ema.module." if weights == "eval" and any(k.startswith("model_ema.") for k in state) else "model."
    model = zoo.create_model(hp["model_name"], **hp["model_args"])
    model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return model.eval()


def _node_reference(ckpt: str, x, edge_index, weights: str = "eval") -> torch.Tensor:
    with torch.no_grad():
        return _reference_model(ckpt, weights)(x, edge_index).softmax(-1)


def _check_rows(rows, probs: torch.Tensor, inputs: list[str], labels=None, topk: int = 99) -> None:
    """Each row holds the top-k classes of its probability row, in order, with their probabilities."""
    assert [row["input"] for row in rows] == inputs
    k = min(topk, probs.size(1))
    for row, p in zip(rows, probs):
        values, indices = p.topk(k)
        assert [name for name, _ in row["top"]] == [str(i) for i in indices.tolist()]
        assert torch.allclose(torch.tensor([prob for _, prob in row["top"]]), values, atol=1e-5)
    if labels is None:
        assert all("label" not in row for row in rows)
    else:
        assert [row["label"] for row in rows] == [str(label) for label in labels]


# -------------------------------------------------------------------------------------------- node classification
def test_node_predictions_are_the_softmax_of_the_ema_model_on_the_runs_graph(karate_ckpt):
    data = gd.karate_club()
    expected = _node_reference(karate_ckpt, data["x"], data["edge_index"])
    rows = run.predict(karate_ckpt, ["nodes:all"], topk=10)  # topk capped at the 4 classes
    _check_rows(rows, expected, [f"node {i}" for i in range(34)], data["y"].tolist())
    assert all(len(row["top"]) == 4 for row in rows)
    raw = _node_reference(karate_ckpt, data["x"], data["edge_index"], weights="raw")
    assert not torch.allclose(raw, expected, atol=1e-4)  # the EMA weights are not the raw ones: the check can fail
    # the released directory (its weights are the EMA copy) and the run directory predict the same
    released = run.predict(str(karate_ckpt).replace("checkpoints/last.ckpt", "released"), ["nodes:all"], topk=10)
    assert [r["top"][0][0] for r in released] == [r["top"][0][0] for r in rows]
    assert all(abs(a["top"][0][1] - b["top"][0][1]) < 1e-5 for a, b in zip(released, rows))


def test_nodes_of_a_split_are_its_mask_nodes(karate_ckpt):
    data = gd.karate_club()
    expected = _node_reference(karate_ckpt, data["x"], data["edge_index"])
    for split in ("train", "val", "test"):
        nodes = data[f"{split}_mask"].nonzero().view(-1).tolist()
        rows = run.predict(karate_ckpt, [f"nodes:{split}"], topk=2)
        _check_rows(rows, expected[nodes], [f"node {i}" for i in nodes], data["y"][nodes].tolist(), topk=2)
    rows = run.predict(karate_ckpt, ["nodes:33, 0,5", "nodes:5"], topk=1)
    _check_rows(rows, expected[[33, 0, 5, 5]], ["node 33", "node 0", "node 5", "node 5"],
                data["y"][[33, 0, 5, 5]].tolist(), topk=1)


def test_a_saved_graph_predicts_as_the_runs_graph(karate_ckpt, tmp_path):
    """input=<file.pt>: one PyG Data (or a dict of x, edge_index) gives every node's prediction, as the same graph
    of the run does; labels when the file has them."""
    data = gd.karate_club()
    of_the_run = run.predict(karate_ckpt, ["nodes:all"], topk=4)
    torch.save(Data(x=data["x"], edge_index=data["edge_index"], y=data["y"]), tmp_path / "karate.pt")
    torch.save({"x": data["x"], "edge_index": data["edge_index"]}, tmp_path / "plain.pt")
    from_data = run.predict(karate_ckpt, [str(tmp_path / "karate.pt")], topk=4)
    from_dict = run.predict(karate_ckpt, [str(tmp_path / "plain.pt")], topk=4)
    expected = _node_reference(karate_ckpt, data["x"], data["edge_index"])
    _check_rows(from_data, expected, [f"karate.pt node {i}" for i in range(34)], data["y"].tolist())
    _check_rows(from_dict, expected, [f"plain.pt node {i}" for i in range(34)])
    assert [r["top"] for r in from_dict] == [r["top"] for r in of_the_run]


def test_features_are_row_normalised_when_the_run_did(sbm_normalized_ckpt, tmp_path):
    """data.normalize_features: the run's graph and a saved graph with the raw features both go through
    PyG's NormalizeFeatures, as in training; the raw features would give other probabilities."""
    raw = gd.load_node_dataset("sbm", block_sizes=[12, 12, 12])
    normalized = gd.normalize_feature_rows(raw["x"])
    expected = _node_reference(sbm_normalized_ckpt, normalized, raw["edge_index"])
    unnormalized = _node_reference(sbm_normalized_ckpt, raw["x"], raw["edge_index"])
    assert not torch.allclose(expected, unnormalized, atol=1e-3)
    inputs = [f"node {i}" for i in range(36)]
    _check_rows(run.predict(sbm_normalized_ckpt, ["nodes:all"], topk=3), expected, inputs, raw["y"].tolist())
    torch.save(Data(x=raw["x"], edge_index=raw["edge_index"]), tmp_path / "raw.pt")
    _check_rows(run.predict(sbm_normalized_ckpt, [str(tmp_path / "raw.pt")], topk=3), expected,
                [f"raw.pt node {i}" for i in range(36)])


# ------------------------------------------------------------------------------------------- graph classification
def _graph_reference(ckpt: str, graphs: list[dict]) -> torch.Tensor:
    model = _reference_model(ckpt)
    with torch.no_grad():
        return torch.cat([model(g["x"], g["edge_index"]).softmax(-1) for g in graphs])  # one graph at a time


def test_graphs_of_the_runs_data(synthetic_ckpt):
    graphs = gd.synthetic_graph_classification(20, seed=0)  # split 70 / 15 / 15: 14 train, 3 val, 3 test
    expected = _graph_reference(synthetic_ckpt, graphs)
    labels = [g["y"] for g in graphs]
    _check_rows(run.predict(synthetic_ckpt, ["graphs:test"], topk=2), expected[17:],
                ["graph 17", "graph 18", "graph 19"], labels[17:], topk=2)
    _check_rows(run.predict(synthetic_ckpt, ["graphs:all"]), expected, [f"graph {i}" for i in range(20)], labels)
    _check_rows(run.predict(synthetic_ckpt, ["graphs:3,15"]), expected[[3, 15]], ["graph 3", "graph 15"],
                [labels[3], labels[15]])


def test_graph_file_without_x_gets_the_runs_capped_one_hot_degrees(degree_ckpt, tmp_path):
    """Graphs without x and without labels: one prediction each, with one-hot degree features capped at the
    run's data.max_degree=3 (the star's centre has degree 6), as the training graphs got them."""
    new = [_star(6), _path(4), _graph_without_x(3, [])]
    torch.save(new, tmp_path / "new.pt")
    rows = run.predict(degree_ckpt, [str(tmp_path / "new.pt")])
    features = []
    for g in new:
        degree = torch.bincount(g.edge_index[0], minlength=g.num_nodes).clamp(max=3)
        features.append({"x": torch.nn.functional.one_hot(degree, 4).float(), "edge_index": g.edge_index})
    _check_rows(rows, _graph_reference(degree_ckpt, features), ["new.pt[0]", "new.pt[1]", "new.pt[2]"])
    # labels, when the graphs have them, are shown beside the prediction
    torch.save([_star(2, y=0), _path(5, y=1)], tmp_path / "labelled.pt")
    assert [row["label"] for row in run.predict(degree_ckpt, [str(tmp_path / "labelled.pt")])] == ["0", "1"]


def test_graph_file_with_x_and_the_synthetic_runs_refusal_of_graphs_without(synthetic_ckpt, tmp_path):
    graphs = gd.synthetic_graph_classification(4, seed=5)
    torch.save([Data(x=g["x"], edge_index=g["edge_index"]) for g in graphs], tmp_path / "mine.pt")
    _check_rows(run.predict(synthetic_ckpt, [str(tmp_path / "mine.pt")]), _graph_reference(synthetic_ckpt, graphs),
                [f"mine.pt[{i}]" for i in range(4)])
    torch.save([_path(4)], tmp_path / "bare.pt")
    with pytest.raises(ValueError, match=r"bare\.pt: the graphs have no node features x, and the model was trained "
                                         r"on the synthetic set's features .* give each graph x \[num_nodes, 8\]"):
        run.predict(synthetic_ckpt, [str(tmp_path / "bare.pt")])


# ------------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("spec, error, message", [
    ("nodes:tset", ValueError, r"^input=nodes:tset: unknown split 'tset'; use nodes:all, nodes:train, nodes:val, "
                               r"nodes:test or nodes:<i,j,\.\.\.> \(node indices\)$"),
    ("nodes:-2", ValueError, r"^input=nodes:-2: node index -2 is negative; give node indices 0\.\.33"),
    ("nodes:3,34", ValueError, r"^input=nodes:3,34: node index 34 is out of range: the run's data has 34 nodes "
                               r"\(0\.\.33\)$"),
    ("nodes:1.5", ValueError, r"^input=nodes:1\.5: '1\.5' is not a node index \(give integers 0\.\.33"),
    ("nodes:", ValueError, r"^input=nodes:: '' is not a node index"),
    # int() reads "1_0" as 10 and "+3" as 3: only plain decimal digits are indices
    ("nodes:1_0", ValueError, r"^input=nodes:1_0: '1_0' is not a node index \(give integers 0\.\.33"),
    ("nodes:+3", ValueError, r"^input=nodes:\+3: '\+3' is not a node index"),
    ("graphs:test", ValueError, r"^input=graphs:test: .* holds gatv2_node, a node-classification model; it predicts "
                                r"input=nodes:all\|train\|val\|test"),
    ("digits:0", ValueError, r"^zoo predict classifies images; .* holds gatv2_node, a graph \(node-classification\) "
                             r"model, and input=digits:0 is an image input: give it input=nodes:all"),
    ("photo.png", ValueError, r"input=photo\.png is an image input"),
    ("missing.pt", FileNotFoundError, r"^input missing\.pt does not exist \(a node-classification model takes"),
])
def test_bad_node_inputs_are_named(karate_ckpt, spec, error, message):
    with pytest.raises(error, match=message):
        run.predict(karate_ckpt, [spec])


def test_bad_files_are_named(karate_ckpt, degree_ckpt, tmp_path):
    data = gd.karate_club()

    def saved(name, obj):
        torch.save(obj, tmp_path / name)
        return str(tmp_path / name)

    cases = [
        (karate_ckpt, saved("tensor.pt", torch.zeros(3)), r"tensor\.pt is a Tensor, not a torch_geometric Data"),
        (karate_ckpt, saved("list.pt", [Data(x=data["x"], edge_index=data["edge_index"])] * 2),
         r"list\.pt holds a list of 2 items; a node-classification model predicts the nodes of one graph"),
        (karate_ckpt, saved("narrow.pt", Data(x=data["x"][:, :5], edge_index=data["edge_index"])),
         r"narrow\.pt: x has 5 features per node but the model reads 34 .* give x \[num_nodes, 34\]"),
        (karate_ckpt, saved("nox.pt", {"edge_index": data["edge_index"]}),
         r"nox\.pt: a node-classification model reads node features x \[num_nodes, num_features\], got none"),
        (karate_ckpt, saved("far.pt", Data(x=data["x"], edge_index=torch.tensor([[0, 40], [1, 2]]))),
         r"^input=.*far\.pt: edge_index source index 40 is out of range for 34 source nodes$"),
        (karate_ckpt, saved("negative.pt", Data(x=data["x"], edge_index=torch.tensor([[0, -1], [1, 2]]))),
         r"^input=.*negative\.pt: edge_index contains negative node indices"),
        (degree_ckpt, saved("strings.pt", ["a", "b"]), r"strings\.pt \[0\] is a str, not a torch_geometric Data"),
        (degree_ckpt, saved("empty.pt", []), r"empty\.pt holds an empty list"),
        (degree_ckpt, saved("wide.pt", [Data(x=torch.ones(3, 7), edge_index=torch.tensor([[0], [1]]))]),
         r"wide\.pt \[0\]: x has 7 features per node but the model reads 4"),
        (degree_ckpt, saved("outside.pt", [_graph_without_x(3, [(0, 5)])]),
         r"outside\.pt \[0\]: edge_index holds node 5 but the graph has 3 nodes"),
        (degree_ckpt, saved("mixed.pt", [Data(x=torch.ones(2, 4), edge_index=torch.tensor([[0], [1]])), _path(3)]),
         r"mixed\.pt: 1 of 2 graphs have node features x and the others none"),
    ]
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    cases.append((karate_ckpt, str(tmp_path / "junk.pt"), r"^cannot read input=.*junk\.pt as a torch\.save file"))
    torch.save(CustomData(x=data["x"], edge_index=data["edge_index"]), tmp_path / "custom.pt")
    cases.append((karate_ckpt, str(tmp_path / "custom.pt"),
                  r"custom\.pt holds test_graph_predict\.CustomData beside tensors and PyG Data, which "
                  r"torch\.load\(weights_only=True\) does not build"))
    for ckpt, path, message in cases:
        with pytest.raises(ValueError, match=message):
            run.predict(ckpt, [path])


def test_graph_inputs_to_an_image_model_and_dictlookup_models_are_refused(tmp_path):
    import zoo
    from zoo.tasks.graph.predict import predict_graph

    torch.save(Data(x=torch.ones(2, 3), edge_index=torch.tensor([[0], [1]])), tmp_path / "g.pt")
    for spec in ("nodes:all", "graphs:0", str(tmp_path / "g.pt")):
        with pytest.raises(ValueError, match=rf"^input={spec} is a graph input, but checkpoints/vit_digits holds "
                                             r"vit_digits, an image model: give it image files"):
            run.predict("checkpoints/vit_digits", [spec])
    model = zoo.create_model("gatv2_dictlookup_debug")
    with pytest.raises(ValueError, match=r"^zoo predict does not predict gatv2_dictlookup_debug \(dictlookup data; "
                                         r"zoo eval ckpt=run scores it on its test split\); it predicts node models "
                                         r"\(.*gatv2_node.*\): input=nodes:all"):
        predict_graph(model, {"model_kind": "dictlookup"}, ["nodes:all"], topk=5, ckpt="run",
                      make_datamodule=lambda: None)


# ------------------------------------------------------------------------------------------------------------ CLI
def test_cli_prints_a_table_and_json(karate_ckpt, capsys):
    assert cli.main(["predict", f"ckpt={karate_ckpt}", "input=nodes:0,5", "topk=2"]) == 0
    out = capsys.readouterr().out
    assert "top-2 predictions" in out and "node 0" in out and "node 5" in out and "label" in out
    assert cli.main(["predict", f"ckpt={karate_ckpt}", "input=nodes:test", "json=true"]) == 0
    rows = json.loads(capsys.readouterr().out)
    expected = run.predict(karate_ckpt, ["nodes:test"])
    assert rows == [{**row, "top": [list(pair) for pair in row["top"]]} for row in expected]
    assert cli.main(["predict", f"ckpt={karate_ckpt}", "input=nodes:99"]) == 1
    err = capsys.readouterr().err
    assert "zoo predict: error: input=nodes:99: node index 99 is out of range" in err and "Traceback" not in err
    assert cli.main(["predict", "--help"]) == 0
    assert "input=nodes:all|train|val|test|<i,j,...>" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- review of 2bc2cd5 (gpfix)
def _labelled_graphs_with_x(count: int = 12) -> list[Data]:
    """Graphs with their own node features x (3 one-hot node types, as MUTAG's atom types): class 1's nodes all
    have type 2, class 0's the types 0, 1, 2 in turn; the shapes (stars, paths) do not tell the classes apart."""
    graphs = []
    for i in range(count):
        graph = _star(2 + i % 3, y=i % 2) if i % 4 < 2 else _path(3 + i % 3, y=i % 2)
        types = torch.full((graph.num_nodes,), 2) if i % 2 else torch.arange(graph.num_nodes) % 3
        graph.x = torch.nn.functional.one_hot(types, 3).float()
        graphs.append(graph)
    return graphs


@pytest.fixture(scope="module")
def node_type_ckpt(tmp_path_factory) -> str:
    """Graph classification on graphs with node features x [N, 3] (data.path), max_degree left null."""
    folder = tmp_path_factory.mktemp("node_types")
    torch.save(_labelled_graphs_with_x(), folder / "graphs.pt")
    return _train(folder / "run", "experiment=graph_synthetic", "data=graph_tu", "data.root=null",
                  f"data.path={folder / 'graphs.pt'}", "data.num_features=3", "data.num_classes=2",
                  "trainer.max_epochs=1", "+model.hidden_channels=4", "model.heads=2", "data.batch_size=4")


def _without_record(ckpt: str, folder: Path, *, keep_record: bool = False, **stored_data) -> str:
    """A copy of ``ckpt`` as a run from before the data module's record: no data_info (``keep_record``: kept, as a
    run that recorded it but stored a relative path); ``stored_data``: data.* values of its stored config replaced
    (a path as it was typed)."""
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    if not keep_record:
        checkpoint["hyper_parameters"].pop("data_info", None)
    checkpoint["hyper_parameters"]["zoo_config"]["data"].update(stored_data)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, folder / "older.ckpt")
    return str(folder / "older.ckpt")


def test_the_run_records_which_node_features_it_trained_on(node_type_ckpt, degree_ckpt):
    """GraphClassificationDataModule.describe() goes with the weights (.ckpt data_info, the release's
    metadata.data): the graphs' own x, or one-hot degrees with the cap used."""
    for ckpt, expected in ((node_type_ckpt, {"node_features": "x", "num_features": 3}),
                           (degree_ckpt, {"node_features": "one_hot_degree", "max_degree": 3, "num_features": 4})):
        info = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]["data_info"]
        assert {key: info.get(key) for key in expected} == expected
        assert "max_degree" in info or expected["node_features"] == "x"
        released = Path(ckpt).parent.parent / "released" / "config.json"
        assert json.loads(released.read_text())["metadata"]["data"]["node_features"] == expected["node_features"]


def test_graphs_without_x_are_refused_when_the_run_trained_on_node_features(node_type_ckpt, tmp_path):
    """The docs' MUTAG example: molecules saved without x got one-hot degrees (as wide as the 3 node types, since
    max_degree was null) and other classes, silently; the same graphs with x predict as the reference."""
    graphs = _labelled_graphs_with_x()
    torch.save(graphs, tmp_path / "with_x.pt")
    expected = _graph_reference(node_type_ckpt, [{"x": g.x, "edge_index": g.edge_index} for g in graphs])
    _check_rows(run.predict(node_type_ckpt, [str(tmp_path / "with_x.pt")]), expected,
                [f"with_x.pt[{i}]" for i in range(12)], [g.y.item() for g in graphs])
    torch.save([Data(edge_index=g.edge_index, num_nodes=g.num_nodes) for g in graphs], tmp_path / "bare.pt")
    message = (r"^input=.*bare\.pt: the graphs have no node features x, but the run's graphs had node features x "
               r"\[num_nodes, 3\] \(.*graphs\.pt\), which the model was trained on: give each graph x "
               r"\[num_nodes, 3\]")
    with pytest.raises(ValueError, match=message):
        run.predict(node_type_ckpt, [str(tmp_path / "bare.pt")])
    # the release says the same
    with pytest.raises(ValueError, match=message):
        run.predict(str(Path(node_type_ckpt).parent.parent / "released"), [str(tmp_path / "bare.pt")])
    # a run from before the record: its data, rebuilt, tells
    with pytest.raises(ValueError, match=message):
        run.predict(_without_record(node_type_ckpt, tmp_path / "older"), [str(tmp_path / "bare.pt")])


def test_an_older_degree_run_without_the_record_rebuilds_its_data_to_find_the_cap(degree_ckpt, tmp_path):
    new = [_star(6), _path(4)]
    torch.save(new, tmp_path / "new.pt")
    with_record = run.predict(degree_ckpt, [str(tmp_path / "new.pt")])
    older = _without_record(degree_ckpt, tmp_path / "older")
    assert run.predict(older, [str(tmp_path / "new.pt")]) == with_record
    # when that data is gone, the stored data.max_degree=3 names the cap (4 one-hot columns: the model's width), as
    # the zoo before the record used it; it was refused
    moved = _without_record(degree_ckpt, tmp_path / "moved", path=str(tmp_path / "gone.pt"))
    assert run.predict(moved, [str(tmp_path / "new.pt")]) == with_record
    # ... without it, it says what it cannot know and what to give, in one line
    unknown = _without_record(degree_ckpt, tmp_path / "unknown", path=str(tmp_path / "gone.pt"), max_degree=None)
    with pytest.raises(ValueError, match=r"^input=.*new\.pt: the graphs have no node features x, and .*older\.ckpt "
                                         r"does not record whether its run trained on one-hot degrees or on the "
                                         r"graphs' own x \(an older run\), nor could its data be read to find out "
                                         r"\(FileNotFoundError: data\.path=.*gone\.pt: no such file.*\): give each "
                                         r"graph x \[num_nodes, 4\]: .* the degrees capped at 3 "
                                         r"\(zoo\.tasks\.graph\.datasets\.one_hot_degree\)$"):
        run.predict(unknown, [str(tmp_path / "new.pt")])


def test_a_relative_data_path_is_stored_absolute(tmp_path, monkeypatch):
    """data.path=graphs.pt typed in the training folder: predict from another folder holding another graphs.pt
    read that file silently; the stored path is now absolute."""
    trained_in, elsewhere = tmp_path / "trained_in", tmp_path / "elsewhere"
    trained_in.mkdir()
    elsewhere.mkdir()
    graphs = [_star(2 + i % 4, y=0) if i % 2 else _path(3 + i % 5, y=1) for i in range(12)]
    torch.save(graphs, trained_in / "graphs.pt")
    torch.save([_path(3, y=1)] * 4 + [_star(5, y=0)] * 4, elsewhere / "graphs.pt")  # same name, other graphs
    monkeypatch.chdir(trained_in)
    ckpt = _train(tmp_path / "run", "experiment=graph_synthetic", "data=graph_tu", "data.root=null",
                  "data.path=graphs.pt", "data.max_degree=3", "data.num_features=4", "data.num_classes=2",
                  "trainer.max_epochs=1", "+model.hidden_channels=4", "model.heads=2", "data.batch_size=4")
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]["zoo_config"]["data"]
    assert stored["path"] == str(trained_in / "graphs.pt")
    here = run.predict(ckpt, ["graphs:all"])
    monkeypatch.chdir(elsewhere)
    assert run.predict(ckpt, ["graphs:all"]) == here
    assert len(here) == 12


def test_an_older_run_with_a_relative_data_path_is_refused(degree_ckpt, tmp_path, monkeypatch):
    """A run from before data.path was stored absolute, predicted from a folder holding a graphs.pt: which
    graphs.pt the run read is unknown, so graphs:... is refused in one line (a file of graphs still predicts)."""
    older = _without_record(degree_ckpt, tmp_path / "older", path="graphs.pt")
    torch.save([_path(3, y=1)] * 4 + [_star(5, y=0)] * 4, tmp_path / "graphs.pt")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^.*older\.ckpt: the run's config stores data\.path=graphs\.pt, relative "
                                         r"to the folder the run was trained in .* give the graphs as "
                                         r"input=<file\.pt>, or evaluate with zoo eval ckpt=.*older\.ckpt "
                                         r"data\.path=<absolute path>$"):
        run.predict(older, ["graphs:0"])
    torch.save([Data(x=torch.ones(3, 4), edge_index=torch.tensor([[0], [1]]))], tmp_path / "mine.pt")
    assert len(run.predict(older, [str(tmp_path / "mine.pt")])) == 1
    # graphs without x: the stored data.max_degree=3 names the cap (they were refused, "give the graphs as
    # input=<file.pt>" for that very file); the reference is the run with its record
    torch.save([_graph_without_x(3, [(0, 1)]), _star(5)], tmp_path / "bare.pt")
    assert run.predict(older, [str(tmp_path / "bare.pt")]) == run.predict(degree_ckpt, [str(tmp_path / "bare.pt")])
    # without it, the refusal says why the data is unread and what to give, not to give the file given
    unknown = _without_record(degree_ckpt, tmp_path / "unknown", path="graphs.pt", max_degree=None)
    with pytest.raises(ValueError, match=r"^input=bare\.pt: .* nor could its data be read to find out \(.*older\.ckpt: "
                                         r"the run's config stores data\.path=graphs\.pt, relative to the folder the "
                                         r"run was trained in .* which zoo predict does not know\): give each graph x "
                                         r"\[num_nodes, 4\]") as refused:
        run.predict(unknown, ["bare.pt"])
    assert "input=<file.pt>" not in str(refused.value) and "\n" not in str(refused.value)


def test_zoo_eval_of_an_older_run_with_a_relative_data_path(degree_ckpt, tmp_path, monkeypatch):
    """zoo eval of a run from before data.path was stored absolute read the current folder's graphs.pt (other
    graphs, other metrics) silently. It takes the absolute path the data module recorded with the weights; without
    that record it is refused unless data.path is given. The reference: zoo eval of the run as trained."""
    reference = run.evaluate(degree_ckpt)
    trained_on = torch.load(degree_ckpt, weights_only=True)["hyper_parameters"]["zoo_config"]["data"]["path"]
    other = [_star(2 + i % 4, y=1) if i % 2 else _path(3 + i % 5, y=0) for i in range(12)]  # the labels swapped
    torch.save(other, tmp_path / "graphs.pt")  # same name, other graphs
    monkeypatch.chdir(tmp_path)
    recorded = _without_record(degree_ckpt, tmp_path / "recorded", keep_record=True, path="graphs.pt")
    assert run.evaluate(recorded) == reference
    older = _without_record(degree_ckpt, tmp_path / "older", path="graphs.pt")
    with pytest.raises(ValueError, match=r"^.*older\.ckpt: the run's config stores data\.path=graphs\.pt, relative "
                                         r"to the folder the run was trained in \(.*\), which zoo eval does not know: "
                                         r"give its absolute path, zoo eval ckpt=.*older\.ckpt "
                                         r"data\.path=<absolute path>$"):
        run.evaluate(older)
    assert run.evaluate(older, [f"data.path={trained_on}"]) == reference
    assert run.evaluate(older, ["data.path=graphs.pt"]) != reference  # given now: this folder's file, as asked


@pytest.mark.parametrize("edge_attr, shape", [(torch.rand(5), r"\(5,\)"), (torch.rand(4), r"\(4,\)"),
                                               (torch.rand(3, 2), r"\(3, 2\)")])
def test_edge_attr_of_a_node_file_needs_one_row_per_edge(karate_ckpt, tmp_path, edge_attr, shape):
    """5 values for 2 edges crashed in view() (a 27-line traceback); 4 values were cut into 2 rows of 2."""
    data = gd.karate_club()
    torch.save(Data(x=data["x"], edge_index=torch.tensor([[0, 1], [1, 2]]), edge_attr=edge_attr), tmp_path / "ea.pt")
    with pytest.raises(ValueError, match=rf"^input=.*ea\.pt: edge_attr must be \[num_edges, edge_dim\] with one row "
                                         rf"per edge_index column \(2\), got shape {shape}$"):
        run.predict(karate_ckpt, [str(tmp_path / "ea.pt")])


def test_a_node_file_without_nodes_is_refused(karate_ckpt, tmp_path):
    torch.save(Data(x=torch.zeros(0, 34), edge_index=torch.zeros(2, 0, dtype=torch.long)), tmp_path / "none.pt")
    with pytest.raises(ValueError, match=r"^input=.*none\.pt: the graph has no nodes \(x is \[0, 34\]\)"):
        run.predict(karate_ckpt, [str(tmp_path / "none.pt")])


def test_a_graph_model_saved_without_a_zoo_train_record_is_named(tmp_path):
    """zoo.save_pretrained of a graph model: it was asked for an image model's pretrained_cfg."""
    import zoo

    zoo.save_pretrained(zoo.create_model("gatv2_node_debug"), tmp_path / "own")
    torch.save(Data(x=torch.ones(2, 3), edge_index=torch.tensor([[0], [1]])), tmp_path / "g.pt")
    with pytest.raises(ValueError, match=r"^.*own: gatv2_node_debug is a graph model saved without a zoo train "
                                         r"record .* give the \.ckpt or released directory that zoo train wrote"):
        run.predict(tmp_path / "own", [str(tmp_path / "g.pt")])


def test_one_input_may_be_given_alone(karate_ckpt, tmp_path):
    """run.predict(ckpt, "nodes:0") took the string for the inputs "n", "o", "d", ..."""
    assert run.predict(karate_ckpt, "nodes:0,5") == run.predict(karate_ckpt, ["nodes:0,5"])
    data = gd.karate_club()
    torch.save(Data(x=data["x"], edge_index=data["edge_index"]), tmp_path / "karate.pt")
    assert run.predict(karate_ckpt, tmp_path / "karate.pt") == run.predict(karate_ckpt, [str(tmp_path / "karate.pt")])
    assert run.predict("checkpoints/vit_digits", "digits:3") == run.predict("checkpoints/vit_digits", ["digits:3"])


def test_digits_rows_carry_their_label(capsys):
    """PREDICT_HELP promised "label" where the data has one; digits:N has one (scikit-learn's target)."""
    from sklearn.datasets import load_digits

    target = load_digits().target
    rows = run.predict("checkpoints/vit_digits", ["digits:3", "digits:100"], topk=1)
    assert [row["label"] for row in rows] == [str(target[3]), str(target[100])]
    assert cli.main(["predict", "--help"]) == 0
    assert "digits:N for a model of the ten digits" in " ".join(capsys.readouterr().out.split())


# ------------------------------------------------------------------------------------------ review of audit6 (PyG)
def test_a_node_file_with_bad_labels_or_num_nodes_is_refused(karate_ckpt, tmp_path):
    """A y of another length was dropped without a word, a label outside the model's 4 classes was shown as a label,
    and num_nodes disagreeing with x passed (PyG's Data.validate does not flag it either: the check is the zoo's).
    Each is refused, naming the input."""
    data = gd.karate_club()
    x, edge_index = data["x"], data["edge_index"]
    cases = {
        "short.pt": (Data(x=x, edge_index=edge_index, y=torch.tensor([0, 1])),
                     r"short\.pt: y has shape \(2,\) but x has 34 nodes: give y \[34\], one class index per node"),
        "wide_y.pt": (Data(x=x, edge_index=edge_index, y=data["y"].view(17, 2)),
                      r"wide_y\.pt: y has shape \(17, 2\) but x has 34 nodes"),
        "class7.pt": (Data(x=x, edge_index=edge_index, y=torch.cat([data["y"][:4], torch.tensor([7]), data["y"][5:]])),
                      r"class7\.pt: y holds label 7 \(node 4\), but the model has 4 classes \(0\.\.3\)"),
        "minus2.pt": (Data(x=x, edge_index=edge_index, y=torch.full((34,), -2)),
                      r"minus2\.pt: y holds label -2 \(node 0\), but the model has 4 classes"),
        "half.pt": (Data(x=x, edge_index=edge_index, y=torch.full((34,), 1.5)),
                    r"half\.pt: y holds 1\.5, which is not a class index"),
        "listy.pt": ({"x": x, "edge_index": edge_index, "y": [0] * 34}, r"listy\.pt: y is a list; give y as a tensor"),
        "numnodes.pt": (Data(x=x, edge_index=edge_index, num_nodes=40),
                        r"numnodes\.pt: num_nodes=40 but x has 34 rows \(one per node\)"),
    }
    for name, (graph, message) in cases.items():
        torch.save(graph, tmp_path / name)
        with pytest.raises(ValueError, match=rf"^input=.*{message}"):
            run.predict(karate_ckpt, [str(tmp_path / name)])
    # y [N, 1], float class indices and -1 / NaN for unlabelled nodes are read; the predictions are the model's
    labels = data["y"].clone()
    labels[[2, 9]] = -1
    as_float = labels.float()
    as_float[2] = float("nan")
    expected = _node_reference(karate_ckpt, x, edge_index)
    shown = [None if i in (2, 9) else int(v) for i, v in enumerate(labels)]
    for name, y in (("column.pt", labels.view(34, 1)), ("floats.pt", as_float)):
        torch.save(Data(x=x, edge_index=edge_index, y=y, num_nodes=34), tmp_path / name)
        rows = run.predict(karate_ckpt, [str(tmp_path / name)], topk=4)
        _check_rows([{k: v for k, v in row.items() if k != "label"} for row in rows], expected,
                    [f"{name} node {i}" for i in range(34)])
        assert [row.get("label") for row in rows] == [None if v is None else str(v) for v in shown]


def test_a_graph_file_label_outside_the_models_classes_is_refused(degree_ckpt, tmp_path):
    torch.save([_star(2, y=0), _path(5, y=5)], tmp_path / "labelled.pt")
    with pytest.raises(ValueError, match=r"^input=.*labelled\.pt \[1\]: y holds label 5, but the model has 2 classes "
                                         r"\(0\.\.1\)"):
        run.predict(degree_ckpt, [str(tmp_path / "labelled.pt")])


def test_width_error_names_the_data_path_the_run_trained_on(degree_ckpt, tmp_path):
    """A data.path run was named by the unused default data.name of configs/data/graph_tu.yaml (MUTAG)."""
    import re

    graphs = Path(degree_ckpt).parents[2] / "graphs.pt"
    torch.save([Data(x=torch.ones(3, 5), edge_index=torch.tensor([[0], [1]]))], tmp_path / "five.pt")
    with pytest.raises(ValueError, match=r"five\.pt \[0\]: x has 5 features per node but the model reads 4 \(the "
                                         rf"run trained on {re.escape(str(graphs))}, data\.num_features=4\)"):
        run.predict(degree_ckpt, [str(tmp_path / "five.pt")])


def test_predict_on_run_data_that_changed_width_says_the_checkpoint_fixes_it(tmp_path):
    """zoo predict input=graphs:test reads the run's recorded data.path; a file rewritten since with graphs of another
    width got zoo train's "set data.num_features=5", which predict cannot take: the data module is now set up for
    Lightning's predict stage, whose message says that the checkpoint fixes the width."""
    graphs = [Data(x=torch.randn(3 + i % 2, 4), edge_index=torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]]),
                   y=torch.tensor([i % 2])) for i in range(12)]
    torch.save(graphs, tmp_path / "graphs.pt")
    ckpt = _train(tmp_path / "run", "experiment=graph_synthetic", "data=graph_tu", "data.root=null",
                  f"data.path={tmp_path / 'graphs.pt'}", "data.num_features=4", "data.num_classes=2",
                  "trainer.max_epochs=1", "+model.hidden_channels=4", "model.heads=2", "data.batch_size=4")
    torch.save([Data(x=torch.randn(g.num_nodes, 5), edge_index=g.edge_index, y=g.y) for g in graphs],
               tmp_path / "graphs.pt")
    with pytest.raises(ValueError, match=r"graphs\.pt has 5 node features \(num_features=5\), but the model being "
                                         r"evaluated reads 4: it was trained with data\.num_features=4, which the "
                                         r"checkpoint fixes"):
        run.predict(ckpt, ["graphs:test"])


def test_viz_graph_reads_ckpt_as_eval_and_predict_do(karate_ckpt, tmp_path, monkeypatch, capsys):
    """`zoo viz graph ckpt=` refused the run directory and the .ckpt that zoo eval / zoo predict take, with a Python
    create_model hint. All three forms now draw the same attention: that of the run's (EMA) model, rebuilt here
    from the .ckpt; what none of them accepts is refused with zoo predict's own message."""
    from zoo.tasks.graph import viz

    drawn = []
    monkeypatch.setattr(viz, "draw_neighbourhood", lambda edge_index, alpha, node, out, **kwargs: drawn.append(
        (edge_index, alpha, node, kwargs["title"])) or out)
    run_dir = Path(karate_ckpt).parents[1]
    for ckpt in (run_dir, karate_ckpt, run_dir / "released"):
        assert cli.main(["viz", "graph", f"ckpt={ckpt}", "node=3", f"out={tmp_path / 'a.png'}"]) == 0
    assert f"ckpt={run_dir} is a zoo train run: using {run_dir / 'released'}" in capsys.readouterr().err
    data = gd.karate_club()
    with torch.no_grad():
        _, attention = _reference_model(karate_ckpt)(data["x"], data["edge_index"], return_attention_weights=True)
    assert len(drawn) == 3
    for edge_index, alpha, node, title in drawn:
        assert node == 3 and title == drawn[0][3] and title.startswith("karate: node 3, layer 0")
        assert torch.equal(edge_index, attention[0][0])
        torch.testing.assert_close(alpha, attention[0][1], rtol=1e-5, atol=1e-6)
    raw = _reference_model(karate_ckpt, weights="raw")(data["x"], data["edge_index"], return_attention_weights=True)
    assert not torch.allclose(raw[1][0][1], attention[0][1], atol=1e-4)  # the EMA weights are drawn: it can fail
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "config.yaml").write_text("seed: 0\n")
    for bad in (run_dir / "checkpoints", tmp_path / "missing.ckpt", tmp_path / "empty_run"):
        with pytest.raises((ValueError, FileNotFoundError)) as from_predict:
            run.predict(str(bad), ["nodes:0"])
        with pytest.raises(type(from_predict.value)) as from_viz:
            viz.main([f"ckpt={bad}", f"out={tmp_path / 'b.png'}"])
        assert str(from_viz.value) == str(from_predict.value) and "create_model" not in str(from_viz.value)


# ------------------------------------------------------------------------------------ review of audit6 (PyG, 3rd)
def _write_ogb_toy(root: Path, labels: list[str]) -> None:
    """A 6-node, 2-feature OGB node dataset in the raw CSV layout (labels as written: "nan" and "-1" unlabelled)."""
    import gzip

    def write(path: Path, lines: list[str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(path, "wt") as f:
            f.write("".join(line + "\n" for line in lines))

    folder = root / "ogbn_toy"
    write(folder / "raw" / "edge.csv.gz", ["0,1", "1,2", "2,3", "3,4", "4,5", "5,0", "0,3"])
    write(folder / "raw" / "node-feat.csv.gz", [f"{i % 3}.0,{(i * 7) % 5}.0" for i in range(6)])
    write(folder / "raw" / "node-label.csv.gz", labels)
    for split, nodes in (("train", [0, 1, 3]), ("valid", [2]), ("test", [4, 5])):
        write(folder / "split" / "random" / f"{split}.csv.gz", [str(i) for i in nodes])


def test_an_ogb_runs_unlabelled_nodes_show_no_label(tmp_path):
    """OGB's NaN / -1 labels were read as class 0, so `input=nodes:...` showed label 0 for nodes that have none,
    where a node file with the same y showed no label. They now show none; the others their class, and every
    prediction is the model's (rebuilt here) on the graph the adapter reads."""
    _write_ogb_toy(tmp_path / "data", ["0", "nan", "1", "-1", "0", "1"])
    with pytest.warns(UserWarning, match="have no label"):
        ckpt = _train(tmp_path / "run", "experiment=graph_cora", "data=graph_ogb", "data.name=ogb:ogbn-toy",
                      f"data.root={tmp_path / 'data'}", "data.num_features=2", "data.num_classes=2",
                      "model.heads=1", "+model.hidden_channels=4", "trainer.max_epochs=1", "test=false",
                      "trainer.num_sanity_val_steps=0")
    with pytest.warns(UserWarning, match="have no label"):
        data = gd.ogb_node("ogbn-toy", str(tmp_path / "data"))
        rows = run.predict(ckpt, ["nodes:all"], topk=2)
    expected = _node_reference(ckpt, data["x"], data["edge_index"])
    _check_rows([{k: v for k, v in row.items() if k != "label"} for row in rows], expected,
                [f"node {i}" for i in range(6)])
    assert [row.get("label") for row in rows] == ["0", None, "1", None, "0", "1"]
    with pytest.warns(UserWarning, match="have no label"):
        assert [row.get("label") for row in run.predict(ckpt, ["nodes:3,1,2"], topk=1)] == [None, None, "1"]


def test_width_error_names_the_synthetic_graphs(synthetic_ckpt, tmp_path):
    """An experiment=graph_synthetic run names no file, class or data set in its data config: the message said
    "the run's data None"."""
    torch.save([Data(x=torch.ones(4, 10), edge_index=torch.tensor([[0, 1], [1, 2]]))], tmp_path / "ten.pt")
    with pytest.raises(ValueError, match=r"^input=.*ten\.pt \[0\]: x has 10 features per node but the model reads 8 "
                                         r"\(the run trained on the zoo's synthetic graphs \(data\.num_graphs=20\), "
                                         r"data\.num_features=8\): give x \[num_nodes, 8\]$"):
        run.predict(synthetic_ckpt, [str(tmp_path / "ten.pt")])


def test_num_nodes_is_checked_in_node_and_graph_files(karate_ckpt, synthetic_ckpt, tmp_path):
    """A num_nodes of several elements failed with torch's own "only one element tensors can be converted" (no
    input named), a float one was refused as differing from x's equal row count, and graph files were not checked at
    all. PyG's Data.validate accepts a num_nodes other than x's row count (torch_geometric 2.8.1), so the check is
    the zoo's: each is refused naming the input (and the graph), and a one-element integer tensor is read."""
    data = gd.karate_club()
    x, edge_index = data["x"], data["edge_index"]
    assert Data(x=x, edge_index=edge_index, num_nodes=35).validate(raise_on_error=True)  # PyG does not flag it
    graph = gd.synthetic_graph_classification(4, seed=5)[0]
    rows = graph["x"].size(0)
    cases = {
        (karate_ckpt, "vector.pt"): ({"x": x, "edge_index": edge_index, "num_nodes": torch.tensor([34, 34])},
                                     r"vector\.pt: num_nodes is a tensor of shape \(2,\); it must be one integer"),
        (karate_ckpt, "float.pt"): (Data(x=x, edge_index=edge_index, num_nodes=34.0),
                                    r"float\.pt: num_nodes=34\.0 \(float\) is not a node count"),
        (synthetic_ckpt, "graph_rows.pt"): ([Data(x=graph["x"], edge_index=graph["edge_index"]),
                                             Data(x=graph["x"], edge_index=graph["edge_index"], num_nodes=rows + 4)],
                                            rf"graph_rows\.pt \[1\]: num_nodes={rows + 4} but x has {rows} rows"),
        (synthetic_ckpt, "graph_vector.pt"): ([{"x": graph["x"], "edge_index": graph["edge_index"],
                                                "num_nodes": torch.tensor([rows, rows])}],
                                              r"graph_vector\.pt \[0\]: num_nodes is a tensor of shape \(2,\)"),
    }
    for (ckpt, name), (saved, message) in cases.items():
        torch.save(saved, tmp_path / name)
        with pytest.raises(ValueError, match=rf"^input=.*{message}"):
            run.predict(ckpt, [str(tmp_path / name)])
    torch.save({"x": x, "edge_index": edge_index, "num_nodes": torch.tensor(34)}, tmp_path / "scalar.pt")
    _check_rows(run.predict(karate_ckpt, [str(tmp_path / "scalar.pt")]), _node_reference(karate_ckpt, x, edge_index),
                [f"scalar.pt node {i}" for i in range(34)])
    torch.save([Data(x=graph["x"], edge_index=graph["edge_index"], num_nodes=torch.tensor(rows))],
               tmp_path / "graph_scalar.pt")
    _check_rows(run.predict(synthetic_ckpt, [str(tmp_path / "graph_scalar.pt")]),
                _graph_reference(synthetic_ckpt, [graph]), ["graph_scalar.pt[0]"])


def test_graph_file_labels_minus_one_or_nan_are_unlabelled(degree_ckpt, tmp_path):
    """Node files read -1 / NaN as an unlabelled node (OGB's convention) while graph files refused them; a graph so
    labelled now shows no label, as a graph without y. Other values are refused saying how to mark a graph
    unlabelled."""
    graphs = [_star(2, y=0), _path(5), _path(4), _star(3), _path(3)]
    graphs[1].y = torch.tensor([-1])
    graphs[2].y = torch.tensor([float("nan")])
    graphs[3].y = torch.tensor([1.0])
    torch.save(graphs, tmp_path / "mixed.pt")
    rows = run.predict(degree_ckpt, [str(tmp_path / "mixed.pt")])
    assert [row.get("label") for row in rows] == ["0", None, None, "1", None]
    features = []
    for g in graphs:
        degree = torch.bincount(g.edge_index[0], minlength=g.num_nodes).clamp(max=3)
        features.append({"x": torch.nn.functional.one_hot(degree, 4).float(), "edge_index": g.edge_index})
    _check_rows([{k: v for k, v in row.items() if k != "label"} for row in rows],
                _graph_reference(degree_ckpt, features), [f"mixed.pt[{i}]" for i in range(5)])
    for bad, shown in ((torch.tensor([-2]), r"tensor\(\[-2\]\)"), (torch.tensor([0.5]), r"tensor\(\[0\.5000\]\)"),
                       (torch.tensor([0, 1]), r"tensor\(\[0, 1\]\)")):
        graph = _path(3)
        graph.y = bad
        torch.save([graph], tmp_path / "bad.pt")
        with pytest.raises(ValueError, match=rf"^input=.*bad\.pt \[0\]: y must be one class index >= 0 per graph "
                                             rf"\(graph classification\), got {shown}: give the graph's class, -1 or "
                                             r"NaN for an unlabelled graph, or leave y out$"):
            run.predict(degree_ckpt, [str(tmp_path / "bad.pt")])


# ------------------------------------------------------------------------- review of audit7 (graph tasks, CLI user)
def test_a_node_files_float_edge_index_is_named_by_its_dtype(karate_ckpt, tmp_path):
    """A float edge_index [2, E] was refused as "must be an integer tensor of shape [2, num_edges], got
    torch.Size([2, 2])": that shape is right; the dtype is what is wrong, and is named now."""
    x = torch.eye(34)[:6]
    torch.save(Data(x=x, edge_index=torch.tensor([[0.0, 1.0], [1.0, 0.0]])), tmp_path / "float_edges.pt")
    with pytest.raises(ValueError, match=r"^input=.*float_edges\.pt: edge_index must hold integer node indices, got "
                                         r"dtype torch\.float32: save it as torch\.long \(edge_index\.long\(\)\)$"):
        run.predict(karate_ckpt, [str(tmp_path / "float_edges.pt")])
    torch.save(Data(x=x, edge_index=torch.tensor([[0, 1, 2]])), tmp_path / "one_row.pt")
    with pytest.raises(ValueError, match=r"one_row\.pt: edge_index must be of shape \[2, num_edges\] .*got shape "
                                         r"\(1, 3\)$"):
        run.predict(karate_ckpt, [str(tmp_path / "one_row.pt")])


def test_zoo_eval_on_data_of_another_width_says_the_checkpoint_fixes_it(karate_ckpt, capsys):
    """zoo eval ckpt=<karate run> data.name=sbm answered "set data.num_features=16", advice that cannot work (the
    checkpoint's model reads 34 features): it now says so, as zoo viz graph and zoo predict do."""
    with pytest.raises(ValueError, match=r"^dataset 'sbm' has 16 node features \(num_features=16\), but the model "
                                         r"being evaluated reads 34: it was trained with data\.num_features=34"):
        run.evaluate(karate_ckpt, ["data.name=sbm"])
    assert cli.main(["eval", f"ckpt={karate_ckpt}", "data.name=sbm"]) == 1
    err = capsys.readouterr().err
    assert "but the model being evaluated reads 34" in err and "set data.num_features" not in err


def test_viz_graph_refuses_model_heads_and_epochs_with_a_checkpoint(karate_ckpt, tmp_path, monkeypatch):
    """zoo viz graph ckpt=<8-head GATv2 run> model=gat_node heads=3 epochs=7 drew the checkpoint's 8 GATv2 heads and
    ignored the three options without a word: they choose and train the model drawn, which ckpt= fixes."""
    from zoo.tasks.graph import viz

    drawn = []
    monkeypatch.setattr(viz, "draw_neighbourhood", lambda *args, **kwargs: drawn.append(args) or args[3])
    out = f"out={tmp_path / 'a.png'}"
    with pytest.raises(SystemExit, match=rf"^zoo viz graph: model=gat_node heads=3 epochs=7 apply only without ckpt= "
                                         rf"\(they choose and train the model drawn\); ckpt={karate_ckpt} fixes the "
                                         r"model: leave model, heads and epochs out, or drop ckpt= to train one$"):
        cli.main(["viz", "graph", f"ckpt={karate_ckpt}", "model=gat_node", "heads=3", "epochs=7", out])
    for option in ("model=gatv2_node", "heads=8", "epochs=0"):
        with pytest.raises(SystemExit, match=rf"^zoo viz graph: {option} applies only without ckpt="):
            viz.main([f"ckpt={karate_ckpt}", option, out])
    assert not drawn
    assert viz.main([f"ckpt={karate_ckpt}", out]) == 0 and len(drawn) == 1  # without them, the checkpoint is drawn


def test_a_uint8_label_of_255_is_a_class_not_the_unlabelled_minus_one():
    """The shared NaN / -1 rule compared a uint8 label with -1, which torch wraps to 255: a graph file's uint8 y of
    255 read as unlabelled while a node file's read as class 255 (review, 2026-12-07). Compared as int64, both are
    the class; -1 of a signed type and NaN stay unlabelled. OGB's refusal names the first bad label in file order."""
    from zoo.tasks.graph import datasets
    from zoo.tasks.graph.predict import _graph_label, _node_labels

    assert _graph_label(torch.tensor([255], dtype=torch.uint8), "g") == 255
    assert _node_labels(torch.tensor([255, 1], dtype=torch.uint8), 2, None, "n") == [255, 1]
    assert _graph_label(torch.tensor(-1), "g") is None and _graph_label(torch.tensor(float("nan")), "g") is None
    with pytest.raises(ValueError, match=r"label -3 is not a class index"):
        datasets._ogb_labels("labels.csv.gz", torch.tensor([0.0, -3.0, 2.5, float("nan")]))


# ------------------------------------------------------------------------------- mutation audit of the graph tasks
def test_a_label_equal_to_the_class_count_is_outside_the_models_classes(degree_ckpt, karate_ckpt, tmp_path):
    """The largest class of a K-class model is K-1: a label K (one past the end) is refused as 7 is, in graph files
    (2 classes) and node files (karate: 4 classes), not shown beside a prediction as if it were a class."""
    torch.save([_star(2, y=0), _path(5, y=2)], tmp_path / "graphs.pt")
    with pytest.raises(ValueError, match=r"graphs\.pt \[1\]: y holds label 2, but the model has 2 classes \(0\.\.1\)"):
        run.predict(degree_ckpt, [str(tmp_path / "graphs.pt")])
    data = gd.karate_club()
    y = data["y"].clone()
    y[5] = 4
    torch.save(Data(x=data["x"], edge_index=data["edge_index"], y=y), tmp_path / "nodes.pt")
    with pytest.raises(ValueError, match=r"nodes\.pt: y holds label 4 \(node 5\), but the model has 4 classes"):
        run.predict(karate_ckpt, [str(tmp_path / "nodes.pt")])


def test_a_graph_file_of_more_graphs_than_one_batch_predicts_every_graph(synthetic_ckpt, tmp_path):
    """Graphs are predicted in batches of 64: a file of 150 graphs (two full batches and a remainder) gives 150
    rows, each the probabilities of its own graph run alone."""
    graphs = gd.synthetic_graph_classification(150, seed=7)
    torch.save([Data(x=g["x"], edge_index=g["edge_index"], y=torch.tensor([int(g["y"])])) for g in graphs],
               tmp_path / "many.pt")
    _check_rows(run.predict(synthetic_ckpt, [str(tmp_path / "many.pt")], topk=3),
                _graph_reference(synthetic_ckpt, graphs), [f"many.pt[{i}]" for i in range(150)],
                [int(g["y"]) for g in graphs], topk=3)
