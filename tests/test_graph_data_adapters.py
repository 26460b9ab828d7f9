"""Graph data adapters against the audit of 2026-12-06 (/tmp/audit/graphdata): data roots (``~``, relative roots
recorded with released weights), Planetoid folders as PyG names them and read-only ones, OGB layouts this adapter
does not read, the documented ``data.split`` of the OGB config, empty graph-classification splits, and the
DictionaryLookup training loop of ``zoo viz graph``. Planetoid results are compared with PyG's own Planetoid."""
from __future__ import annotations

import gzip
import os
import pickle
import stat

import pytest
import torch

import zoo
from zoo.tasks.graph import datasets as gd


def _write_planetoid(root, folder="Cora", seed=0, binary=False):
    """A tiny graph in Planetoid's raw format (kimiyoung/planetoid: pickled x/tx/allx/y/ty/ally, the adjacency
    dict, test.index) under root/<folder>/raw; the public split needs >= 10 + 500 nodes before the test nodes.
    Features: Gaussian, or (``binary``) 0/1 bag-of-words rows as the real release, the first one all zero."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_all, n_train, n_test, num_classes = 520, 10, 20, 3
    n = n_all + n_test
    onehot = np.eye(num_classes, dtype=np.float32)[rng.integers(0, num_classes, n)]
    if binary:
        feats = (rng.random((n, 5)) < 0.3).astype(np.float32)
        feats[0] = 0.0
    else:
        feats = rng.normal(size=(n, 5)).astype(np.float32)
    test_index = np.arange(n_all, n)[::-1]
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    items = {"x": feats[:n_train], "y": onehot[:n_train], "allx": feats[:n_all], "ally": onehot[:n_all],
             "tx": feats[test_index], "ty": onehot[test_index], "graph": {i: [(i + 1) % n, (i + 7) % n] for i in range(n)}}
    for name, value in items.items():
        with open(raw / f"ind.cora.{name}", "wb") as f:
            pickle.dump(value, f)
    (raw / "ind.cora.test.index").write_text("\n".join(map(str, test_index)) + "\n")


def _pyg_planetoid(root, folder="Cora"):
    """The reference: PyG's own Planetoid on a writable copy of the same raw files."""
    from torch_geometric.datasets import Planetoid

    _write_planetoid(root, folder)
    return Planetoid(str(root), folder)[0]


def _assert_same_graph(ours: dict, reference) -> None:
    torch.testing.assert_close(ours["x"], reference.x)
    assert torch.equal(ours["edge_index"], reference.edge_index) and torch.equal(ours["y"], reference.y)
    for mask in ("train_mask", "val_mask", "test_mask"):
        assert torch.equal(ours[mask], getattr(reference, mask)), mask


def _write_gz(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        f.write("".join(line + "\n" for line in lines))


def _write_ogb(folder, labels=("0", "1", "0", "1"), schemes=(("random", ([0, 1], [2], [3])),)):
    """A 4-node, 2-feature OGB node dataset in the raw CSV layout, one split folder per scheme."""
    _write_gz(folder / "raw" / "edge.csv.gz", ["0,1", "1,2", "2,3", "3,0"])
    _write_gz(folder / "raw" / "node-feat.csv.gz", [f"{i}.0,{i + 1}.0" for i in range(4)])
    _write_gz(folder / "raw" / "node-label.csv.gz", list(labels))
    for scheme, splits in schemes:
        for split, index in zip(("train", "valid", "test"), splits):
            _write_gz(folder / "split" / scheme / f"{split}.csv.gz", [str(i) for i in index])
    return folder


# --------------------------------------------------------------------------------------------- data roots
def test_a_root_under_home_is_expanded_as_pyg_does(tmp_path, monkeypatch):
    """data.root=~/... was taken literally (a folder named "~" under the working directory); PyG's Dataset expands it."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    _write_planetoid(tmp_path / "home" / "planetoid")
    reference = _pyg_planetoid(tmp_path / "pyg")
    _assert_same_graph(gd.planetoid("Cora", "~/planetoid"), reference)
    _write_ogb(tmp_path / "home" / "ogb" / "ogbn_toy")
    assert gd.ogb_node("ogbn-toy", "~/ogb")["train_mask"].tolist() == [True, True, False, False]
    assert gd.NodeDataModule("ogb:ogbn-toy", root="~/ogb").root == str(tmp_path / "home" / "ogb")
    from zoo.tasks.graph.viz import main

    out = tmp_path / "att.png"
    assert main(["data=ogb:ogbn-toy", "root=~/ogb", "epochs=0", "heads=1", f"out={out}"]) == 0
    assert out.stat().st_size > 1000


def test_a_relative_root_is_recorded_absolute_for_zoo_viz_graph(tmp_path, monkeypatch):
    """`zoo train ... data.root=data` recorded "data" with the released weights, so `zoo viz graph ckpt=<released>`
    from another directory read the wrong folder; the data module records its absolute root (metadata.data.root)."""
    pytest.importorskip("hydra")
    from zoo.cli import main as zoo_main
    from zoo.tasks.graph.viz import main as viz

    assert gd.NodeDataModule("karate").root is None
    monkeypatch.chdir(tmp_path)
    _write_ogb(tmp_path / "data" / "ogbn_toy")
    assert gd.NodeDataModule("ogb:ogbn-toy", root="data").describe() == {"name": "ogb:ogbn-toy",
                                                                          "root": str(tmp_path / "data")}
    run_dir = tmp_path / "run"
    assert zoo_main(["train", "experiment=graph_cora", "data=graph_ogb", "data.name=ogb:ogbn-toy", "data.root=data",
                     "data.num_features=2", "data.num_classes=2", "model.heads=1", "+model.hidden_channels=4",
                     "trainer.max_epochs=1", "num_threads=1", "logger=none", "callbacks=minimal", "test=false",
                     "trainer.num_sanity_val_steps=0", f"run_dir={run_dir}"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = elsewhere / "att.png"
    assert viz([f"ckpt={run_dir / 'released'}", f"out={out}"]) == 0
    assert out.stat().st_size > 1000
    # the run's config is recorded with the absolute root too, so zoo eval from elsewhere reads the same data
    model = zoo.from_pretrained(str(run_dir / "released"))
    assert model.zoo_pretrained_metadata["zoo_config"]["data"]["root"] == str(tmp_path / "data")
    assert zoo_main(["eval", f"ckpt={run_dir / 'released'}"]) == 0
    # a record of before (the relative root alone) is named, not read from the wrong folder
    import copy

    metadata = copy.deepcopy(dict(model.zoo_pretrained_metadata, data={}))
    metadata["zoo_config"]["data"]["root"] = "data"
    old = zoo.save_pretrained(model, tmp_path / "old_release", metadata=metadata)
    with pytest.raises(SystemExit, match=r"records data\.root=data, a path relative to the directory it was trained in"):
        viz([f"ckpt={old}", f"out={out}"])


# ---------------------------------------------------------------------------------------------- Planetoid
def test_planetoid_read_only_folder_without_cache_is_read(tmp_path, monkeypatch):
    """A read-only folder holding only raw/ was reported as corrupt raw files: PyG's Planetoid first creates
    processed/ (PermissionError). The raw files are read with PyG's parser, which writes nothing."""
    _write_planetoid(tmp_path / "shared")
    reference = _pyg_planetoid(tmp_path / "pyg")
    folder = tmp_path / "shared" / "Cora"
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    try:
        if os.access(folder, os.W_OK):  # root: chmod does not stop it; refuse creating processed/ as the OS would
            makedirs = os.makedirs

            def refuse_processed(path, *args, **kwargs):
                if os.path.basename(os.path.normpath(path)) == "processed":
                    raise PermissionError(13, "Permission denied", str(path))
                return makedirs(path, *args, **kwargs)

            monkeypatch.setattr(os, "makedirs", refuse_processed)
        with pytest.warns(UserWarning, match=r"cannot write PyG's cache .*reading the raw files without caching"):
            d = gd.load_node_dataset("planetoid:Cora", root=str(tmp_path / "shared"))
    finally:
        folder.chmod(stat.S_IRWXU)
    _assert_same_graph(d, reference)
    assert not (folder / "processed").exists()


def test_planetoid_unreadable_raw_file_is_a_permission_error_not_a_corrupt_one(tmp_path, monkeypatch):
    """A raw file the user may not read was reported as "corrupt or not the Planetoid release?"; the
    "corrupt" wording stays for files that do not parse (test_graph_tasks.py)."""
    import torch_geometric.io.planetoid as pyg_planetoid

    _write_planetoid(tmp_path)
    read_file = pyg_planetoid.read_file

    def unreadable_graph(folder, prefix, name):  # as chmod 600 on another user's file (root reads it anyway)
        if name == "graph":
            raise PermissionError(13, "Permission denied", os.path.join(folder, f"ind.{prefix.lower()}.graph"))
        return read_file(folder, prefix, name)

    monkeypatch.setattr(pyg_planetoid, "read_file", unreadable_graph)
    with pytest.raises(PermissionError, match=r"^Planetoid Cora: no permission to read .*ind\.cora\.graph "
                                              r"\(Permission denied\); make the raw files readable"):
        gd.load_node_dataset("planetoid:Cora", root=str(tmp_path))


def test_planetoid_reads_the_folder_pyg_names_after_the_name_given(tmp_path):
    """PyG's Planetoid(root, "cora") keeps root/cora/; the adapter only looked in root/Cora/."""
    _write_planetoid(tmp_path / "data", folder="cora")
    reference = _pyg_planetoid(tmp_path / "pyg", folder="cora")
    for name in ("planetoid:cora", "planetoid:Cora"):
        _assert_same_graph(gd.load_node_dataset(name, root=str(tmp_path / "data")), reference)
    assert (tmp_path / "data" / "cora" / "processed").is_dir() and not (tmp_path / "data" / "Cora").exists()
    with pytest.raises(FileNotFoundError, match=r"missing under .*/Cora/raw \(also looked in .*/cora\)"):
        gd.load_node_dataset("planetoid:Cora", root=str(tmp_path / "empty"))


def _processed_files(folder) -> dict:
    """Every file of folder/processed with its bytes and modification time: what a PyG user's cache is."""
    processed = folder / "processed"
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(processed.iterdir())}


def _plain_reference(root):
    """PyG's Planetoid without any pre_transform, on its own copy of the bag-of-words raw files."""
    from torch_geometric.datasets import Planetoid

    _write_planetoid(root, binary=True)
    return Planetoid(str(root), "Cora")[0]


@pytest.mark.parametrize("pre_transform", ["Compose", "Constant"])
def test_planetoid_cache_a_pyg_user_rebuilt_with_a_pre_transform_is_not_read(tmp_path, pre_transform):
    """After a zoo run had recorded the raw files, a PyG user rebuilt processed/ with a pre_transform
    (force_reload=True, as PyG's warning advises): the adapter read that cache as the raw data (row-normalised
    features, added self loops), silently. Its record now holds data.pt too, and PyG's own pre_transform.pt /
    pre_filter.pt are checked: the raw files are parsed without the cache, which stays the user's."""
    import torch_geometric.transforms as T
    from torch_geometric.datasets import Planetoid

    reference = _plain_reference(tmp_path / "pyg")
    _write_planetoid(tmp_path / "shared", binary=True)
    root = str(tmp_path / "shared")
    _assert_same_graph(gd.planetoid("Cora", root), reference)  # the zoo's own cache, recorded
    assert (tmp_path / "shared" / "Cora" / "processed" / gd._RAW_RECORD).is_file()
    transform = {"Compose": T.Compose([T.NormalizeFeatures(), T.AddSelfLoops()]),  # the audit's case
                 "Constant": T.Constant(1.0)}[pre_transform]  # one more feature column
    theirs = Planetoid(root, "Cora", pre_transform=transform, force_reload=True)[0]
    assert (theirs.x.shape != reference.x.shape or not torch.allclose(theirs.x, reference.x)
            or theirs.edge_index.shape != reference.edge_index.shape)  # what the zoo used to read: another graph
    cache = _processed_files(tmp_path / "shared" / "Cora")
    with pytest.warns(UserWarning, match=rf"^Planetoid Cora: .*processed holds a cache PyG built with pre_transform="
                                         rf"{pre_transform}\(.*leaving it as it is and reading the raw files without a "
                                         r"cache$"):
        ours = gd.planetoid("Cora", root)
    _assert_same_graph(ours, reference)
    assert _processed_files(tmp_path / "shared" / "Cora") == cache
    again = Planetoid(root, "Cora", pre_transform=transform)[0]  # the user's next PyG load: their cache, unchanged
    torch.testing.assert_close(again.x, theirs.x)
    assert torch.equal(again.edge_index, theirs.edge_index)


def test_planetoid_cache_pyg_built_with_a_pre_transform_is_left_to_its_user(tmp_path):
    """A cache a PyG user built with a pre_transform, without the zoo's record: the adapter deleted it and had PyG
    rebuild it without the transform, so the user's unchanged script then got unnormalised features (and only a
    UserWarning). The cache is now left as it is, and the raw files are parsed without one."""
    import warnings

    import torch_geometric.transforms as T
    from torch_geometric.datasets import Planetoid

    reference = _plain_reference(tmp_path / "pyg")
    _write_planetoid(tmp_path / "shared", binary=True)
    root = str(tmp_path / "shared")
    theirs = Planetoid(root, "Cora", pre_transform=T.NormalizeFeatures())[0]
    cache = _processed_files(tmp_path / "shared" / "Cora")
    with pytest.warns(UserWarning, match=r"built with pre_transform=NormalizeFeatures\(.*\); leaving it as it is"):
        ours = gd.load_node_dataset("planetoid:Cora", root=root)
    _assert_same_graph(ours, reference)
    assert _processed_files(tmp_path / "shared" / "Cora") == cache  # not removed, not rewritten, no record added
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # PyG warns when the cache's pre_transform differs from the one passed
        again = Planetoid(root, "Cora", pre_transform=T.NormalizeFeatures())[0]
    assert not [w for w in caught if "pre_transform" in str(w.message)]
    torch.testing.assert_close(again.x, theirs.x)
    assert not torch.allclose(theirs.x, reference.x)  # the check can fail: the user's cache is not the raw data


def test_planetoid_cache_replaced_under_an_unchanged_record_is_rebuilt(tmp_path):
    """A plain data.pt (PyG's records say no pre_transform) copied in from another build after the adapter recorded
    the raw files was read, since only the raw files were compared. The record holds the data.pt it vouches for."""
    from torch_geometric.datasets import Planetoid

    reference = _plain_reference(tmp_path / "pyg")
    _write_planetoid(tmp_path / "shared", binary=True)
    root = str(tmp_path / "shared")
    _assert_same_graph(gd.planetoid("Cora", root), reference)
    _write_planetoid(tmp_path / "other", binary=True, seed=1)
    other = Planetoid(str(tmp_path / "other"), "Cora")[0]
    assert not torch.equal(other.x, reference.x)
    processed = tmp_path / "shared" / "Cora" / "processed"
    (processed / "data.pt").write_bytes((tmp_path / "other" / "Cora" / "processed" / "data.pt").read_bytes())
    _assert_same_graph(gd.planetoid("Cora", root), reference)  # rebuilt from the raw files
    _assert_same_graph(gd.planetoid("Cora", root), reference)  # and reused
    assert _processed_files(tmp_path / "shared" / "Cora")["data.pt"][0] != \
        (tmp_path / "other" / "Cora" / "processed" / "data.pt").read_bytes()


@pytest.mark.parametrize("record", ["pre_filter.pt", "pre_transform.pt"])
def test_planetoid_cache_without_proof_of_a_plain_build_is_neither_read_nor_removed(tmp_path, record):
    """PyG's Dataset records a pre_filter as it does a pre_transform (Planetoid itself takes none, other Dataset
    code writing the same folder may); a data.pt without those records cannot be told plain either."""
    reference = _plain_reference(tmp_path / "pyg")
    _write_planetoid(tmp_path / "shared", binary=True)
    root = str(tmp_path / "shared")
    gd.planetoid("Cora", root)
    processed = tmp_path / "shared" / "Cora" / "processed"
    _write_planetoid(tmp_path / "other", binary=True, seed=1)  # a data.pt of other data: read, it would show
    gd.planetoid("Cora", str(tmp_path / "other"))
    (processed / "data.pt").write_bytes((tmp_path / "other" / "Cora" / "processed" / "data.pt").read_bytes())
    if record == "pre_filter.pt":
        torch.save("<function <lambda>>", processed / record)  # PyG's repr of a lambda pre_filter
        message = r"built with pre_filter=<function <lambda>>; leaving it"
    else:
        (processed / record).unlink()
        message = r"built without pre_transform\.pt \(PyG's record of its pre_transform\); leaving it"
    cache = _processed_files(tmp_path / "shared" / "Cora")
    with pytest.warns(UserWarning, match=message):
        _assert_same_graph(gd.planetoid("Cora", root), reference)
    assert _processed_files(tmp_path / "shared" / "Cora") == cache


# -------------------------------------------------------------------------------------------------- OGB
def test_ogb_datasets_of_other_layouts_are_named_as_unsupported(tmp_path):
    """ogbn-proteins (multi-label, no node-feat.csv.gz), ogbn-papers100M (binary npz) and ogbn-mag (heterogeneous)
    were reported as "files missing ... unpack the dataset zip"; the supported ones are named, in the docs too."""
    import pathlib

    import numpy as np

    proteins = tmp_path / "ogbn_proteins"  # as OGB keeps it after download
    _write_gz(proteins / "raw" / "edge.csv.gz", ["0,1", "1,2"])
    _write_gz(proteins / "raw" / "node-label.csv.gz", [",".join(["0"] * 112)] * 3)
    (tmp_path / "papers100M-bin" / "raw").mkdir(parents=True)  # as its zip extracts
    np.savez(tmp_path / "papers100M-bin" / "raw" / "data.npz", edge_index=np.zeros((2, 1), int))
    for name, why in (("ogbn-proteins", "multi-label"), ("ogbn-papers100M", "stored as binary numpy files"),
                      ("ogbn-mag", "heterogeneous")):
        with pytest.raises(ValueError, match=rf"OGB {name} is not supported: it is {why} .*ogbn-arxiv, ogbn-products"):
            gd.load_node_dataset(f"ogb:{name}", root=str(tmp_path))
    # the same layouts under another name, and a CSV dataset with several label columns
    (tmp_path / "ogbn_copy" / "raw").mkdir(parents=True)
    np.savez(tmp_path / "ogbn_copy" / "raw" / "data.npz", edge_index=np.zeros((2, 1), int))
    (tmp_path / "ogbn_hetero" / "raw" / "relations").mkdir(parents=True)
    _write_ogb(tmp_path / "ogbn_multi", labels=("0,1", "1,0", "0,0", "1,1"))
    for name, why in (("ogbn-copy", "stored as binary numpy files"), ("ogbn-hetero", "heterogeneous"),
                      ("ogbn-multi", r"multi-label \(.*node-label\.csv\.gz has 2 label columns")):
        with pytest.raises(ValueError, match=rf"OGB {name} is not supported: it is {why}"):
            gd.load_node_dataset(f"ogb:{name}", root=str(tmp_path))
    docs = (pathlib.Path(__file__).parents[1] / "docs" / "graph.md").read_text()
    for name in ("ogbn-arxiv", "ogbn-products", "ogbn-proteins", "ogbn-papers100M", "ogbn-mag"):
        assert name in docs, name


def test_ogb_config_takes_the_documented_split(tmp_path):
    """docs/graph.md names data.split; configs/data/graph_ogb.yaml lacked it, so data.split=time was an unknown key."""
    import pathlib

    pytest.importorskip("hydra")
    from zoo.train.run import compose

    _write_ogb(tmp_path / "ogbn_toy", schemes=(("random", ([0, 1], [2], [3])), ("time", ([2, 3], [0], [1]))))
    common = ["data=graph_ogb", "data.name=ogb:ogbn-toy", f"data.root={tmp_path}", "data.num_features=2",
              "data.num_classes=2"]
    for overrides, train in (([], [True, True, False, False]), (["data.split=time"], [False, False, True, True])):
        data = dict(compose(common + overrides).data)
        assert data.pop("_target_") == "zoo.tasks.graph.datasets.NodeDataModule"
        module = gd.NodeDataModule(**data)
        module.setup()
        assert module.data["train_mask"].tolist() == train, overrides
    assert "`data.split`" in (pathlib.Path(__file__).parents[1] / "docs" / "graph.md").read_text()


# --------------------------------------------------------------------------------------- graph classification
def test_graph_classification_refuses_an_empty_split():
    """data.num_graphs=3 left validation empty: Lightning only warned and the run "succeeded" without validating."""
    with pytest.raises(ValueError, match=r"data\.num_graphs=3 leaves the validation split empty .*2 / 0 / 1 graphs\); "
                                         r"use data\.num_graphs >= 4"):
        gd.GraphClassificationDataModule(num_graphs=3)
    for bad in (0, -5, 2.5, True, "10"):
        with pytest.raises(ValueError, match=r"data\.num_graphs must be a positive integer"):
            gd.GraphClassificationDataModule(num_graphs=bad)
    for bad in (0, 1.5, None):
        with pytest.raises(ValueError, match=r"data\.batch_size must be a positive integer"):
            gd.GraphClassificationDataModule(num_graphs=30, batch_size=bad)
    module = gd.GraphClassificationDataModule(num_graphs=4)
    module.setup()
    assert {split: len(graphs) for split, graphs in module.splits.items()} == {"train": 2, "val": 1, "test": 1}


# ----------------------------------------------------------------------------------------- zoo viz graph
def test_viz_dictlookup_epoch_is_a_pass_over_the_training_split(tmp_path, monkeypatch):
    """Its docstring says `epochs` passes over the training split, as zoo train; a fresh randperm per batch drew
    batches with replacement (k=7, one epoch: some training graphs twice, others never)."""
    import zoo.tasks.graph.dictlookup as dl
    from zoo.tasks.graph.viz import main

    collated = []
    collate = dl.collate

    def spy(perms):  # records what the loop draws; trains on 2 graphs of it to keep the test fast
        collated.append(perms.clone())
        return collate(perms[:2])

    monkeypatch.setattr(dl, "collate", spy)
    assert main(["data=dictlookup", "k=7", "epochs=2", "node=0", f"out={tmp_path / 'dl.png'}"]) == 0
    train, _ = dl.unseen_combinations_split(dl.generate_permutations(7))
    assert len(train) > 1024  # several batches per epoch
    batches = -(-len(train) // 1024)
    expected = sorted(map(tuple, train.tolist()))
    for epoch in range(2):  # the training batches come first, then the test evaluation's
        rows = torch.cat(collated[epoch * batches:(epoch + 1) * batches])
        assert sorted(map(tuple, rows.tolist())) == expected, epoch


def test_graph_cora_normalises_features_as_pyg_normalize_features(tmp_path):
    """experiment=graph_cora (the GAT paper's Cora run) fed the raw feature rows; the GAT paper's preprocess_features
    and PyG's examples/gat.py (T.NormalizeFeatures()) row-normalise them. data.normalize_features (true for the
    Planetoid data) matches PyG's transform: here on bag-of-words rows, one of them all zero, and on real-valued
    rows (PyG shifts by the minimum first)."""
    pytest.importorskip("hydra")
    import torch_geometric.transforms as T
    from torch_geometric.datasets import Planetoid

    from zoo.train import run

    for binary in (True, False):
        ours_root, reference_root = tmp_path / f"ours{binary}", tmp_path / f"pyg{binary}"
        for root in (ours_root, reference_root):
            _write_planetoid(root, binary=binary)
        reference = Planetoid(str(reference_root), "Cora", transform=T.NormalizeFeatures())[0].x
        _, datamodule = run.build(run.compose(["experiment=graph_cora", f"data.root={ours_root}",
                                               "data.num_features=5", "data.num_classes=3"]))
        datamodule.setup()
        torch.testing.assert_close(datamodule.data["x"], reference)
        # what `zoo viz graph ckpt=` loads with the recorded data options
        torch.testing.assert_close(gd.load_node_dataset("planetoid:Cora", str(ours_root), normalize_features=True)["x"],
                                   reference)
        if binary:
            sums = datamodule.data["x"].sum(1)
            assert (sums == 0).sum() >= 1 and torch.allclose(sums[sums > 0], torch.ones(int((sums > 0).sum())))
    with pytest.raises(ValueError, match=r"^data\.normalize_features must be true or false"):
        gd.NodeDataModule("karate", normalize_features="yes")


# ------------------------------------------------------------------- graph classification on the user's own data
def _write_tu(root, name="TOY", node_labels=True, node_attributes=False, num_graphs=8):
    """A tiny TU data set in TU's text layout (1-based node ids, both directions of each edge listed):
    triangles (graph label 5) and 4-node paths (graph label 7, so PyG's relabelling to 0 / 1 is exercised),
    node labels 0..2, optionally 2 node attributes per node."""
    raw = root / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    edges, graph_of_node, labels, attributes, graph_labels, first = [], [], [], [], [], 1
    for g in range(num_graphs):
        triangle = g % 2 == 0
        size = 3 if triangle else 4
        pairs = [(0, 1), (1, 2), (2, 0)] if triangle else [(0, 1), (1, 2), (2, 3)]
        for a, b in pairs:
            edges += [(first + a, first + b), (first + b, first + a)]
        graph_of_node += [g + 1] * size
        labels += [(g + i) % 3 for i in range(size)]
        attributes += [(0.5 * g, float(i)) for i in range(size)]
        graph_labels.append(5 if triangle else 7)
        first += size
    files = {"A": [f"{a}, {b}" for a, b in edges], "graph_indicator": graph_of_node, "graph_labels": graph_labels}
    if node_labels:
        files["node_labels"] = labels
    if node_attributes:
        files["node_attributes"] = [f"{a}, {b}" for a, b in attributes]
    for part, rows in files.items():
        (raw / f"{name}_{part}.txt").write_text("\n".join(map(str, rows)) + "\n")


def _pyg_tu(root, name="TOY", monkeypatch=None, **kwargs):
    """The reference: PyG's own TUDataset on a copy of the raw files, with its download disabled (it must read
    the local files)."""
    from torch_geometric.datasets import TUDataset

    def no_download(self):
        raise AssertionError("TUDataset tried to download")

    monkeypatch.setattr(TUDataset, "download", no_download)
    return TUDataset(str(root), name, **kwargs)


@pytest.mark.parametrize("use_node_attr", [False, True])
def test_tu_adapter_reads_the_graphs_pyg_tudataset_reads(tmp_path, monkeypatch, use_node_attr):
    """data=graph_tu data.name=<name> data.root=<root> reads <root>/<name>/raw/<name>_*.txt as PyG's TUDataset
    (which reads the same local files without downloading), and writes nothing into the data folder."""
    for folder in ("ours", "pyg"):
        _write_tu(tmp_path / folder, node_attributes=True)
    reference = _pyg_tu(tmp_path / "pyg", monkeypatch=monkeypatch, use_node_attr=use_node_attr)
    ours = gd.tu_dataset("TOY", str(tmp_path / "ours"), use_node_attr=use_node_attr)
    assert len(ours) == len(reference) == 8
    for graph, expected in zip(ours, reference):
        torch.testing.assert_close(graph["x"], expected.x)
        assert torch.equal(graph["edge_index"], expected.edge_index) and graph["y"] == int(expected.y)
    # by hand, independently of PyG: graph 1 is the path 4-5-6-7 (0-based in the graph), labels 1, 2, 0, 1
    path = ours[1]
    assert path["y"] == 1 and ours[0]["y"] == 0  # graph labels 5 / 7 renumbered 0 / 1, as PyG does
    assert sorted(map(tuple, path["edge_index"].t().tolist())) == [(0, 1), (1, 0), (1, 2), (2, 1), (2, 3), (3, 2)]
    labels = torch.eye(3)[[1, 2, 0, 1]]
    expected_x = torch.cat([torch.tensor([[0.5, 0.0], [0.5, 1.0], [0.5, 2.0], [0.5, 3.0]]), labels], 1)
    torch.testing.assert_close(path["x"], expected_x if use_node_attr else labels)
    assert sorted(os.listdir(tmp_path / "ours" / "TOY")) == ["raw"]  # no processed/ cache written


def test_tu_missing_files_are_named_with_where_to_put_them(tmp_path):
    _write_tu(tmp_path)
    (tmp_path / "TOY" / "raw" / "TOY_graph_labels.txt").unlink()
    with pytest.raises(FileNotFoundError) as error:
        gd.GraphClassificationDataModule(name="TOY", root=str(tmp_path)).setup()
    message = str(error.value)
    assert "\n" not in message and "TU TOY: 1 raw file(s) missing" in message and "downloads are disabled" in message
    assert str(tmp_path / "TOY" / "raw" / "TOY_graph_labels.txt") in message and "TOY.zip" in message
    with pytest.raises(FileNotFoundError, match=r"TU MUTAG: 3 raw file\(s\) missing"):
        gd.tu_dataset("MUTAG", str(tmp_path))
    with pytest.raises(ValueError, match=r"^data\.root=.* is set but data\.name is 'synthetic'"):
        gd.GraphClassificationDataModule(root=str(tmp_path))


def test_graphs_without_features_get_pyg_one_hot_degrees(tmp_path, monkeypatch):
    """No node labels or attributes: PyG's TU recipe (benchmark/kernel/datasets.py), T.OneHotDegree(max degree);
    data.max_degree caps the width, larger degrees counted as the cap."""
    import torch_geometric.transforms as T

    for folder in ("ours", "pyg"):
        _write_tu(tmp_path / folder, node_labels=False)
    reference = _pyg_tu(tmp_path / "pyg", monkeypatch=monkeypatch)
    assert reference[0].x is None
    data = gd.load_graph_classification("TOY", root=str(tmp_path / "ours"))
    assert data["num_features"] == 3 and data["num_classes"] == 2  # the largest degree is 2 (0..2)
    expected = [T.OneHotDegree(2)(reference[i]).x for i in range(len(reference))]
    ours = [graph["x"] for split in ("train", "val", "test") for graph in data[split]]
    assert sorted(map(torch.Tensor.tolist, ours)) == sorted(map(torch.Tensor.tolist, expected))
    capped = gd.load_graph_classification("TOY", root=str(tmp_path / "ours"), max_degree=1)
    assert capped["num_features"] == 2
    assert all(torch.equal(g["x"], torch.ones(g["x"].size(0), 2) * torch.tensor([0.0, 1.0])) for g in capped["train"])


def test_stratified_split_keeps_the_class_proportions_and_the_seed():
    labels = [0] * 70 + [1] * 20 + [2] * 10
    split = gd.stratified_graph_split(labels, seed=1)
    assert sorted(split["train"] + split["val"] + split["test"]) == list(range(100))
    assert [len(split[s]) for s in ("train", "val", "test")] == [70, 15, 15]
    for part in split.values():
        counts = torch.bincount(torch.tensor([labels[i] for i in part]), minlength=3).tolist()
        expected = [0.7 * len(part), 0.2 * len(part), 0.1 * len(part)]
        assert all(abs(c - e) <= 1.5 for c, e in zip(counts, expected)), counts
    assert gd.stratified_graph_split(labels, seed=1) == split != gd.stratified_graph_split(labels, seed=2)
    small = gd.stratified_graph_split([0, 0, 1, 1], seed=0)  # a graph in each split, as 70 / 15 / 15 of 4
    assert [len(small[s]) for s in ("train", "val", "test")] == [2, 1, 1]


def _data_list():
    from torch_geometric.data import Data

    graphs = []
    for i in range(10):
        n = 3 + i % 3
        edge_index = torch.stack([torch.arange(n - 1), torch.arange(1, n)])
        graphs.append(Data(x=torch.randn(n, 4), edge_index=torch.cat([edge_index, edge_index.flip(0)], 1),
                           y=torch.tensor([i % 2])))
    return graphs


class LabelledData(__import__("torch_geometric.data", fromlist=["Data"]).Data):
    """A Data subclass of a user's: torch.load(weights_only=True) does not build it."""


def test_saved_list_of_pyg_data_loads_weights_only(tmp_path):
    """data.path=graphs.pt: torch.save([Data, ...]) loads with weights_only=True; the graphs feed the model as the
    saved tensors; a dict of lists keeps its split; other pickles are refused unless data.trust_pickle=true."""
    graphs = _data_list()
    torch.save(graphs, tmp_path / "graphs.pt")
    module = gd.GraphClassificationDataModule(path=str(tmp_path / "graphs.pt"), num_features=4, num_classes=2)
    module.setup()
    loaded = [g for split in ("train", "val", "test") for g in module.splits[split]]
    assert len(loaded) == 10 and module.num_features == 4 and module.num_classes == 2
    by_x = {tuple(g.x[0].tolist()): g for g in graphs}
    for graph in loaded:
        saved = by_x[tuple(graph["x"][0].tolist())]
        assert torch.equal(graph["x"], saved.x) and torch.equal(graph["edge_index"], saved.edge_index)
        assert graph["y"] == int(saved.y)
    torch.save({"train": graphs[:6], "val": graphs[6:8], "test": graphs[8:]}, tmp_path / "split.pt")
    own = gd.load_graph_classification(path=str(tmp_path / "split.pt"))
    assert [len(own[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    assert torch.equal(own["val"][0]["x"], graphs[6].x)
    torch.save([LabelledData(**g.to_dict()) for g in graphs], tmp_path / "custom.pt")
    with pytest.raises(ValueError, match=r"^data\.path=.*custom\.pt holds .*LabelledData.* set data\.trust_pickle=true"):
        gd.load_graph_classification(path=str(tmp_path / "custom.pt"))
    assert len(gd.load_graph_classification(path=str(tmp_path / "custom.pt"), trust_pickle=True)["train"]) == 7
    with pytest.raises(ValueError, match=r"has num_features=4 but the config says 8 \(set data\.num_features=4\)"):
        gd.GraphClassificationDataModule(path=str(tmp_path / "graphs.pt"), num_features=8).setup()
    with pytest.raises(FileNotFoundError, match=r"^data\.path=.*missing\.pt: no such file"):
        gd.load_graph_classification(path=str(tmp_path / "missing.pt"))


class ToyGraphs(__import__("torch_geometric.data", fromlist=["InMemoryDataset"]).InMemoryDataset):
    """An InMemoryDataset of a user's, named by data.dataset_class."""

    def __init__(self, root=None):
        super().__init__(root)
        self.data, self.slices = self.collate(_data_list())


def test_inmemory_dataset_class_path_and_batches_as_the_synthetic_set():
    module = gd.GraphClassificationDataModule(dataset_class=f"{__name__}.ToyGraphs", batch_size=4)
    synthetic = gd.GraphClassificationDataModule(num_graphs=20, batch_size=4)
    for m in (module, synthetic):
        m.setup()
    ours, theirs = (next(iter(m.train_dataloader())) for m in (module, synthetic))
    assert set(ours) == set(theirs) and ours["x"].dtype == theirs["x"].dtype == torch.float32
    assert ours["edge_index"].dtype == ours["batch"].dtype == ours["y"].dtype == torch.long
    assert ours["num_graphs"] == 4 and module.num_features == 4 and module.num_classes == 2
    with pytest.raises(ValueError, match=r"data\.dataset_class='no_such\.Class' cannot be imported"):
        gd.GraphClassificationDataModule(dataset_class="no_such.Class").setup()


def test_tu_data_trains_one_epoch_through_zoo_train(tmp_path):
    """data=graph_tu with the synthetic experiment's model and task: one epoch of zoo train on the TU files."""
    pytest.importorskip("hydra")
    from zoo.tasks.graph.train import compose, fit

    _write_tu(tmp_path, num_graphs=12)
    common = ["experiment=graph_synthetic", "data=graph_tu", f"data.root={tmp_path}", "data.name=TOY",
              "data.num_classes=2", "trainer.max_epochs=1", "+model.hidden_channels=4", "data.batch_size=4"]
    result = fit(compose([*common, "data.num_features=3"]), verbose=False, run_dir=str(tmp_path / "run"))
    assert 0.0 <= result["test_acc"] <= 1.0 and result["model"] == "gatv2_graph"
    with pytest.raises(ValueError, match=r"TOY has num_features=3 but the config says 7 \(set data\.num_features=3\)"):
        fit(compose(common), verbose=False, run_dir=str(tmp_path / "run2"))


@pytest.mark.parametrize("node_labels", [True, False])
def test_tu_graphs_without_edges_at_the_end_are_kept(tmp_path, node_labels):
    """PyG's read_tu_data counts edges per graph with bincount (no minlength): graphs without edges at the end of the
    files (a one-node graph, or self loops only) had no slice, and 8 labelled graphs were read as 7, silently (PyG's
    TUDataset drops them too). Every labelled graph is kept, with no edges."""
    _write_tu(tmp_path, node_labels=node_labels)
    raw = tmp_path / "TOY" / "raw"
    indicator = raw / "TOY_graph_indicator.txt"
    nodes = len(indicator.read_text().split())
    indicator.write_text(indicator.read_text() + "9\n10\n")  # graphs 9 (one node) and 10 (a self loop only)
    (raw / "TOY_A.txt").write_text((raw / "TOY_A.txt").read_text() + f"{nodes + 2}, {nodes + 2}\n")
    (raw / "TOY_graph_labels.txt").write_text((raw / "TOY_graph_labels.txt").read_text() + "5\n7\n")
    if node_labels:
        (raw / "TOY_node_labels.txt").write_text((raw / "TOY_node_labels.txt").read_text() + "1\n2\n")
    graphs = gd.tu_dataset("TOY", str(tmp_path))
    assert len(graphs) == 10
    assert [g["num_nodes"] for g in graphs[-2:]] == [1, 1]
    assert all(g["edge_index"].shape == (2, 0) for g in graphs[-2:])
    assert [g["y"] for g in graphs[-2:]] == [0, 1]  # labels 5, 7 relabelled as PyG does


def test_review_of_the_graph_data_docs_zip_layout_edge_features(tmp_path):
    """Docs audit: (1) a TU zip holds a top-level <name>/ folder, so README's "unzip into DIR/MUTAG/raw" left the
    files in raw/MUTAG/ and the loader said they were missing; (2) a saved list's edge_attr was silently dropped,
    so the classifiers' edge_dim could not be used from zoo train (a mixed set is refused)."""
    _write_tu(tmp_path / "flat")
    _write_tu(tmp_path / "zip")
    raw = tmp_path / "zip" / "TOY" / "raw"
    (raw / "TOY").mkdir()
    for f in list(raw.glob("TOY_*.txt")):
        f.rename(raw / "TOY" / f.name)
    flat, unzipped = gd.tu_dataset("TOY", str(tmp_path / "flat")), gd.tu_dataset("TOY", str(tmp_path / "zip"))
    assert len(unzipped) == len(flat) == 8
    assert all(torch.equal(a["edge_index"], b["edge_index"]) and a["y"] == b["y"] for a, b in zip(flat, unzipped))

    graphs = _data_list()
    for g in graphs:
        g.edge_attr = torch.randn(g.edge_index.size(1), 2)
    torch.save(graphs, tmp_path / "edges.pt")
    module = gd.GraphClassificationDataModule(path=str(tmp_path / "edges.pt"), num_features=4, num_classes=2)
    module.setup()
    batch = next(iter(module.train_dataloader()))
    assert batch["edge_attr"].shape == (batch["edge_index"].size(1), 2)
    model = zoo.create_model("gatv2_graph_debug", in_channels=4, num_classes=2, edge_dim=2)
    assert model(batch["x"], batch["edge_index"], batch["batch"], batch["num_graphs"],
                 edge_attr=batch["edge_attr"]).shape == (batch["num_graphs"], 2)
    graphs[3].edge_attr = None
    with pytest.raises(ValueError, match="every graph needs edge_attr of one width"):
        gd.collate_graphs([gd._as_graph(g, "g") for g in graphs])


def test_graph_classifier_takes_pyg_keywords_and_export_names_num_graphs():
    """GATGraphClassifier.forward(x, edge_index, batch=...) as PyG's models are called (its parameters were named
    x_NF / batch_N, so batch= was a TypeError); exporting without num_graphs gave GuardOnDataDependentSymNode."""
    torch.manual_seed(0)
    model = zoo.create_model("gatv2_graph_debug", in_channels=4, num_classes=2).eval()
    x, edge_index = torch.randn(7, 4), torch.tensor([[0, 1, 2, 4, 5], [1, 2, 0, 5, 6]])
    batch = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    with torch.no_grad():
        torch.testing.assert_close(model(x=x, edge_index=edge_index, batch=batch), model(x, edge_index, batch, 2))
    with pytest.raises(Exception, match="pass num_graphs"):
        torch.export.export(model, (x, edge_index, batch))


def test_tu_labels_and_graphs_must_agree_and_mixed_edge_features_are_refused_at_load(tmp_path):
    """Review: a graph_indicator naming more graphs than graph_labels lists dropped the extra graphs silently (the
    reader looped over the labels); a saved list with edge_attr on some graphs only was refused at its first such
    batch, possibly after the whole training run: both refused when the data is read."""
    _write_tu(tmp_path)
    raw = tmp_path / "TOY" / "raw"
    labels = (raw / "TOY_graph_labels.txt").read_text().split()
    (raw / "TOY_graph_labels.txt").write_text("\n".join(labels[:-1]) + "\n")
    with pytest.raises(ValueError, match="7 graph labels in TOY_graph_labels.txt but nodes for 8 graphs"):
        gd.tu_dataset("TOY", str(tmp_path))
    graphs = _data_list()
    for g in graphs[:-1]:
        g.edge_attr = torch.randn(g.edge_index.size(1), 2)
    torch.save(graphs, tmp_path / "mixed.pt")
    with pytest.raises(ValueError, match="9 of 10 graphs have edge features edge_attr"):
        gd.load_graph_classification(path=str(tmp_path / "mixed.pt"))


# ------------------------------------------------------------------------- review of audit6 (Planetoid cache, OGB)
def _cache_only(monkeypatch) -> list:
    """PyG's parser refused, and the folder read-only to the adapter: the graph can then come only from the data.pt
    in processed/, read by PyG's Planetoid. Each removal or record write the adapter tries fails as on a read-only
    file system and is listed in the list returned."""
    import torch_geometric.datasets.planetoid as pyg_planetoid
    import torch_geometric.io

    def parsed(*args, **kwargs):
        raise AssertionError("the raw files were parsed where the cache was to be read")

    tried = []

    def read_only(*args, **kwargs):
        tried.append(args)
        raise OSError(30, "Read-only file system")

    for module in (torch_geometric.io, pyg_planetoid):
        monkeypatch.setattr(module, "read_planetoid_data", parsed)
    monkeypatch.setattr(os, "remove", read_only)
    monkeypatch.setattr(gd, "_write_raw_record", read_only)
    return tried


def _touch_later(folder):
    """Every raw file modified 1 s after its current time, whatever the clock's resolution."""
    for path in (folder / "raw").iterdir():
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))


def test_planetoid_plain_cache_a_pyg_user_built_is_read_and_never_written(tmp_path, monkeypatch):
    """A PyG user's plain Planetoid(root, "Cora") cache (pre_transform / pre_filter None, no zoo record) was removed,
    rebuilt and given zoo_raw_files.json. The zoo now reads it as PyG does while its data.pt is newer than every raw
    file, and writes nothing into that folder: names, bytes and modification times stay as the user's build left
    them."""
    import warnings

    from torch_geometric.datasets import Planetoid

    reference = _plain_reference(tmp_path / "pyg")
    _write_planetoid(tmp_path / "shared", binary=True)
    root = str(tmp_path / "shared")
    Planetoid(root, "Cora")  # the user's own build
    cache = _processed_files(tmp_path / "shared" / "Cora")
    with monkeypatch.context() as patched, warnings.catch_warnings():
        tried = _cache_only(patched)
        warnings.simplefilter("error")  # a current plain cache is read without a word
        for _ in range(2):
            _assert_same_graph(gd.load_node_dataset("planetoid:Cora", root=root), reference)
    assert tried == []  # not even tried: the folder is the user's
    assert _processed_files(tmp_path / "shared" / "Cora") == cache
    assert sorted(cache) == ["data.pt", "pre_filter.pt", "pre_transform.pt"]


def test_planetoid_stale_plain_cache_a_pyg_user_built_is_bypassed_and_left(tmp_path):
    """The user's plain cache, older than raw files replaced since: PyG would read the old graph. The raw files are
    parsed without a cache, with a warning that names the newer raw files and the remedy; the cache stays the
    user's (not removed, not rebuilt, no record added)."""
    from torch_geometric.datasets import Planetoid

    _write_planetoid(tmp_path / "shared", binary=True)
    root = str(tmp_path / "shared")
    old = Planetoid(root, "Cora")[0]
    _write_planetoid(tmp_path / "shared", binary=True, seed=1)  # other raw files, written after the user's build
    _touch_later(tmp_path / "shared" / "Cora")
    _write_planetoid(tmp_path / "pyg", binary=True, seed=1)
    reference = Planetoid(str(tmp_path / "pyg"), "Cora")[0]  # PyG's build of the current raw files
    assert not torch.equal(old.x, reference.x)  # reading the cache would show: the check can fail
    cache = _processed_files(tmp_path / "shared" / "Cora")
    for _ in range(2):
        with pytest.warns(UserWarning, match=r"^Planetoid Cora: .*processed holds a cache built without the zoo \(no "
                                             r"zoo_raw_files\.json\) before the raw file\(s\) ind\.cora\.allx, "
                                             r".* and 5 more last changed; leaving it as it is and reading the raw "
                                             r"files without a cache .*Planetoid\(root, 'Cora', force_reload=True\), "
                                             r"or remove .*processed to have the zoo build its own cache$"):
            _assert_same_graph(gd.load_node_dataset("planetoid:Cora", root=root), reference)
    assert _processed_files(tmp_path / "shared" / "Cora") == cache
    # a user's cache PyG cannot load (here: not a torch file) is not the zoo's to remove either
    data_pt = tmp_path / "shared" / "Cora" / "processed" / "data.pt"
    data_pt.write_bytes(b"not a torch file")
    newest = max(p.stat().st_mtime_ns for p in (tmp_path / "shared" / "Cora" / "raw").iterdir())
    os.utime(data_pt, ns=(newest + 10**9, newest + 10**9))  # newer than the raw files: PyG's to load
    cache = _processed_files(tmp_path / "shared" / "Cora")
    with pytest.warns(UserWarning, match=r"PyG cannot load the cache in .*processed \(.*\); leaving it as it is"):
        _assert_same_graph(gd.load_node_dataset("planetoid:Cora", root=root), reference)
    assert _processed_files(tmp_path / "shared" / "Cora") == cache


def _older_zoo_record(processed) -> None:
    """zoo_raw_files.json as the zoo wrote it before 2026-12-07 (commit 81fee73): {raw file: [size, mtime_ns]}."""
    import json

    record = processed / gd._RAW_RECORD
    stamp = record.stat().st_mtime_ns
    record.write_text(json.dumps(json.loads(record.read_text())["raw"]))
    os.utime(record, ns=(stamp, stamp))


def test_planetoid_cache_with_an_older_zoo_record_is_read_in_a_read_only_folder(tmp_path, monkeypatch):
    """A read-only folder whose cache an older zoo built and recorded (raw files only): the current record form
    never matched it, so each run parsed the raw files again, warning that nothing recorded the build. That record
    still matching the raw files, with PyG's records saying plain and data.pt not newer than the record, vouches
    for the cache: it is read, without a warning and without writing; where the folder can be written, the record
    is rewritten in the current form, and data.pt is not rebuilt."""
    import json
    import warnings

    reference = _plain_reference(tmp_path / "pyg")
    _write_planetoid(tmp_path / "shared", binary=True)
    root = str(tmp_path / "shared")
    processed = tmp_path / "shared" / "Cora" / "processed"
    gd.load_node_dataset("planetoid:Cora", root=root)
    _older_zoo_record(processed)
    cache = _processed_files(tmp_path / "shared" / "Cora")
    with monkeypatch.context() as read_only, warnings.catch_warnings():
        _cache_only(read_only)
        warnings.simplefilter("error")
        _assert_same_graph(gd.load_node_dataset("planetoid:Cora", root=root), reference)
    assert _processed_files(tmp_path / "shared" / "Cora") == cache
    # writable: adopted without a rebuild, the record brought to the current form (raw files and data.pt)
    _assert_same_graph(gd.load_node_dataset("planetoid:Cora", root=root), reference)
    after = _processed_files(tmp_path / "shared" / "Cora")
    assert {name: after[name] for name in gd._PLANETOID_CACHE_FILES} == \
        {name: cache[name] for name in gd._PLANETOID_CACHE_FILES}
    assert set(json.loads((processed / gd._RAW_RECORD).read_text())) == {"raw", "data.pt"}
    with monkeypatch.context() as read_only:
        tried = _cache_only(read_only)
        _assert_same_graph(gd.load_node_dataset("planetoid:Cora", root=root), reference)  # "fresh" from now on
    assert tried == []


def test_planetoid_zoo_cache_that_cannot_be_rebuilt_says_what_is_on_disk(tmp_path, monkeypatch):
    """The zoo's own cache in a read-only folder, its record (older form) no longer matching the raw files: the
    warning said that no record existed. It now says what the record shows and how to have the cache rebuilt, and
    the current raw files are read."""
    from torch_geometric.datasets import Planetoid

    _write_planetoid(tmp_path / "shared", binary=True)
    root = str(tmp_path / "shared")
    processed = tmp_path / "shared" / "Cora" / "processed"
    gd.load_node_dataset("planetoid:Cora", root=root)
    _older_zoo_record(processed)
    _write_planetoid(tmp_path / "shared", binary=True, seed=1)
    _touch_later(tmp_path / "shared" / "Cora")
    _write_planetoid(tmp_path / "pyg", binary=True, seed=1)
    reference = Planetoid(str(tmp_path / "pyg"), "Cora")[0]
    cache = _processed_files(tmp_path / "shared" / "Cora")

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "remove", read_only)
    monkeypatch.setattr(gd, "_write_raw_record", read_only)
    with pytest.warns(UserWarning, match=r"^Planetoid Cora: cannot rebuild the zoo's cache in .*processed \(Read-only "
                                         r"file system\): the raw files changed since zoo_raw_files\.json recorded the "
                                         r"build \(in an older zoo version's form\); leaving it as it is and reading "
                                         r"the raw files without a cache \(each run parses them again\): run the zoo "
                                         r"once where .*processed can be written, or remove .*processed, to have the "
                                         r"cache rebuilt$"):
        _assert_same_graph(gd.load_node_dataset("planetoid:Cora", root=root), reference)
    assert _processed_files(tmp_path / "shared" / "Cora") == cache


@pytest.mark.parametrize("unlabelled", ["nan", "-1"])
def test_ogb_keeps_which_nodes_are_unlabelled_out_of_the_training_batch(tmp_path, unlabelled):
    """OGB's NaN / -1 labels became class 0 in y, and which nodes they were was lost (zoo predict then showed label
    0 for them). The data keeps labelled_mask; the training batch stays as it was (the split masks exclude those
    nodes)."""
    _write_ogb(tmp_path / "ogbn_toy", labels=("0", unlabelled, "1", "1"))  # train 0, 1; valid 2; test 3
    with pytest.warns(UserWarning, match="1 of its 2 nodes have no label"):
        data = gd.ogb_node("ogbn-toy", str(tmp_path))
    assert data["labelled_mask"].tolist() == [True, False, True, True]
    assert data["y"].tolist() == [0, 0, 1, 1] and data["train_mask"].tolist() == [True, False, False, False]
    module = gd.NodeDataModule("ogb:ogbn-toy", root=str(tmp_path))
    with pytest.warns(UserWarning):
        module.setup()
    batch = next(iter(module.train_dataloader()))
    assert sorted(batch) == ["edge_index", "test_mask", "train_mask", "val_mask", "x", "y"]


def test_viz_graph_draws_unlabelled_ogb_nodes_white_not_as_class_0(tmp_path, monkeypatch):
    """zoo viz graph coloured an OGB node with a NaN / -1 label as class 0 (y holds 0 there), so a picture showed it
    as labelled. It is drawn white; the labelled nodes keep their class colours."""
    import matplotlib

    from zoo.tasks.graph import viz

    _write_ogb(tmp_path / "ogbn_toy", labels=("0", "-1", "1", "1"))
    drawn = {}
    networkx = pytest.importorskip("networkx")
    real_draw_nodes = networkx.draw_networkx_nodes

    def record_nodes(G, pos, **kwargs):
        drawn.update(zip(G.nodes(), kwargs["node_color"]))
        return real_draw_nodes(G, pos, **kwargs)

    monkeypatch.setattr(networkx, "draw_networkx_nodes", record_nodes)
    with pytest.warns(UserWarning, match="no label"):
        assert viz.main(["data=ogb:ogbn-toy", f"root={tmp_path}", "node=0", "epochs=0", "heads=1",
                         f"out={tmp_path / 'att.png'}"]) == 0
    assert sorted(drawn) == [0, 1, 2, 3]  # node 0, its in-neighbours 1 and 3, and 2 of their context edges
    tab10 = matplotlib.colormaps["tab10"]
    assert drawn[1] == "white" and drawn[0] == tab10(0) and drawn[2] == drawn[3] == tab10(1)


def test_loading_saved_graphs_keeps_pygs_own_safe_globals(tmp_path):
    """torch.serialization.safe_globals removes, on exit, every class it was given: loading a data.path list (or a
    zoo predict file) dropped PyG's own registration of Data, after which PyG loaded a Planetoid cache's data.pt
    warning "Weights only load failed" and with weights_only=False, for the rest of the process."""
    import warnings

    from torch_geometric.data import Data
    from torch_geometric.datasets import Planetoid

    from zoo.tasks.graph.predict import _load_graph_file

    registered = torch.serialization.get_safe_globals()
    assert Data in registered  # PyG's, at import
    try:
        torch.save(_data_list(), tmp_path / "graphs.pt")
        assert len(gd.load_saved_graphs(str(tmp_path / "graphs.pt"))) == len(_data_list())
        assert len(_load_graph_file(str(tmp_path / "graphs.pt"))) == len(_data_list())
        assert set(torch.serialization.get_safe_globals()) == set(registered)  # in whatever order
        reference = _pyg_planetoid(tmp_path / "pyg")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # PyG's own load of its cache, weights_only=True, without a word
            again = Planetoid(str(tmp_path / "pyg"), "Cora")[0]
        assert torch.equal(again.x, reference.x)
    finally:  # the other tests get PyG's registrations back, whatever happened here
        torch.serialization.add_safe_globals(registered)


# ------------------------------------------------------------------------- review of audit7 (graph tasks, CLI user)
def _append(path, text):
    path.write_text(path.read_text() + text)


def _drop_last_rows(path, count):
    path.write_text("\n".join(path.read_text().splitlines()[:-count]) + "\n")


@pytest.mark.parametrize("change, file, rows, nodes, pyg_fails", [
    # the audit's case: 2 more nodes in the last graph, no node-label rows for them (read silently, 2 nodes lost)
    ("indicator_longer", "TOY_node_labels.txt", 28, 30, True),
    ("labels_shorter", "TOY_node_labels.txt", 26, 28, True),
    ("labels_longer", "TOY_node_labels.txt", 30, 28, False),  # PyG ignores the extra rows; refused here too
    ("attributes_shorter", "TOY_node_attributes.txt", 27, 28, True),  # PyG's torch.cat of the two fails
])
def test_tu_node_files_of_another_length_than_the_graph_indicator_are_named(tmp_path, monkeypatch, change, file,
                                                                            rows, nodes, pyg_fails):
    """One row per node: a node_labels / node_attributes file shorter or longer than graph_indicator.txt gave the
    last graph fewer x rows than its nodes without a word (PyG's TUDataset fails there), or had rows ignored. The
    file is named with both counts; PyG's own TUDataset on the same files is the reference for the failing cases."""
    for folder in ("ours", "pyg"):
        _write_tu(tmp_path / folder, node_attributes=change == "attributes_shorter")
        raw = tmp_path / folder / "TOY" / "raw"
        if change == "indicator_longer":
            _append(raw / "TOY_graph_indicator.txt", "8\n8\n")
        elif change == "labels_shorter":
            _drop_last_rows(raw / "TOY_node_labels.txt", 2)
        elif change == "labels_longer":
            _append(raw / "TOY_node_labels.txt", "1\n2\n")
        else:
            _drop_last_rows(raw / "TOY_node_attributes.txt", 1)
    if pyg_fails:  # when the dataset is built, or when a graph is sliced out of it
        with pytest.raises(RuntimeError):
            reference = _pyg_tu(tmp_path / "pyg", monkeypatch=monkeypatch, use_node_attr=True)
            [reference[i] for i in range(len(reference))]
    message = rf"^TU TOY: {file} has {rows} rows but TOY_graph_indicator\.txt lists {nodes} nodes \(one row per node"
    for use_node_attr in (False, True):
        with pytest.raises(ValueError, match=message):
            gd.tu_dataset("TOY", str(tmp_path / "ours"), use_node_attr=use_node_attr)
    with pytest.raises(ValueError, match=message):
        gd.GraphClassificationDataModule(name="TOY", root=str(tmp_path / "ours")).setup()


def test_ogb_split_scheme_that_is_not_there_names_the_schemes_that_are(tmp_path):
    """data.split=<scheme> without that folder was "3 file(s) missing (downloads are disabled) ... Unpack the
    dataset zip", when the fix is another data.split; split/ holding the csv files directly got the same message
    with a placeholder path. A folder whose raw files are missing keeps the missing-files message."""
    folder = _write_ogb(tmp_path / "ok" / "ogbn_toy", schemes=(("time", ([0, 1], [2], [3])),
                                                                ("random", ([0, 1], [2], [3]))))
    with pytest.raises(FileNotFoundError) as error:
        gd.ogb_node("ogbn-toy", str(tmp_path / "ok"), split="sales")
    message = str(error.value)
    assert message.startswith(f"OGB ogbn-toy: data.split=sales: no folder {folder / 'split' / 'sales'}; the split "
                              f"schemes under {folder / 'split'} are: random, time (data.split=random")
    assert "missing" not in message and "download" not in message.lower()
    assert gd.ogb_node("ogbn-toy", str(tmp_path / "ok"), split="time")["train_mask"].tolist() == [True, True,
                                                                                               False, False]
    flat = _write_ogb(tmp_path / "flat" / "ogbn_toy", schemes=())
    for split in ("train", "valid", "test"):
        _write_gz(flat / "split" / f"{split}.csv.gz", ["0"])
    for split in (None, "time"):
        with pytest.raises(FileNotFoundError, match=rf"^OGB ogbn-toy: {flat / 'split'} holds test\.csv\.gz, "
                                                    r"train\.csv\.gz, valid\.csv\.gz directly, without a split-scheme "
                                                    r"folder: .* move them into a folder named for the scheme"):
            gd.ogb_node("ogbn-toy", str(tmp_path / "flat"), split=split)
    (folder / "raw" / "edge.csv.gz").unlink()  # an incomplete unzip: the files are named, as before
    with pytest.raises(FileNotFoundError, match=r"^OGB ogbn-toy: 4 file\(s\) missing \(downloads are disabled\)"):
        gd.ogb_node("ogbn-toy", str(tmp_path / "ok"), split="sales")


@pytest.mark.parametrize("edge_index, message", [
    (torch.tensor([[0.0, 1.0], [1.0, 0.0]]), r"edge_index must hold integer node indices, got dtype torch\.float32: "
                                             r"save it as torch\.long"),
    (torch.tensor([[True, False], [False, True]]), r"edge_index must hold integer node indices, got dtype torch\.bool"),
    (torch.tensor([[0, 1, 2]]), r"edge_index must be of shape \[2, num_edges\] \(row 0 sources, row 1 targets\), got "
                                r"shape \(1, 3\)$"),
    (torch.tensor([[0.0, 1.0, 2.0]]), r"edge_index must be of shape \[2, num_edges\] .* got shape \(1, 3\), dtype "
                                      r"torch\.float32 \(it must be an integer dtype"),
    ([[0, 1], [1, 0]], r"edge_index must be an integer tensor of shape \[2, num_edges\], got a list$"),
])
def test_a_saved_graphs_edge_index_is_named_by_what_is_wrong(tmp_path, edge_index, message):
    """A float edge_index [2, E] was reported as "must be an integer tensor of shape [2, num_edges], got
    torch.Size([2, 2])": the shape printed was right, the dtype never named. The dtype is named when it is wrong, the
    shape only when it is."""
    from torch_geometric.data import Data

    graphs = [Data(x=torch.ones(2, 3), edge_index=torch.tensor([[0, 1], [1, 0]]), y=torch.tensor([i % 2]))
              for i in range(4)]
    graphs[2] = Data(x=torch.ones(2, 3), edge_index=edge_index, y=torch.tensor([0]))
    torch.save(graphs, tmp_path / "graphs.pt")
    with pytest.raises(ValueError, match=rf"^data\.path=.*graphs\.pt \[2\]: {message}"):
        gd.load_graph_classification(path=str(tmp_path / "graphs.pt"))


def test_graph_data_of_another_width_than_the_evaluated_model_says_the_checkpoint_fixes_it(tmp_path):
    """zoo eval ckpt=<graph-classification run> data.path=<graphs of another width> said "set data.num_features=4":
    the module read the graphs in describe(), which zoo eval calls before Lightning's setup("test"), and checked them
    there as settings. The sizes are now checked in setup(stage), on every call, with the evaluation wording in
    Lightning's evaluation stages and the training one in fit."""
    torch.save(_data_list(), tmp_path / "graphs.pt")
    module = gd.GraphClassificationDataModule(path=str(tmp_path / "graphs.pt"), num_features=8, num_classes=2)
    assert module.describe()["num_features"] == 4  # reads, does not judge
    for stage in ("test", "validate", "predict"):
        with pytest.raises(ValueError, match=r"^graph data set .*graphs\.pt has 4 node features \(num_features=4\), "
                                             r"but the model being evaluated reads 8: it was trained with "
                                             r"data\.num_features=8, which the checkpoint fixes"):
            module.setup(stage)
    for stage in ("fit", None):
        with pytest.raises(ValueError, match=r"^graph data set .*graphs\.pt has num_features=4 but the config says 8 "
                                             r"\(set data\.num_features=4\)$"):
            module.setup(stage)
    with pytest.raises(ValueError, match=r"has 2 classes \(num_classes=2\), but the model being evaluated scores 3"):
        gd.GraphClassificationDataModule(path=str(tmp_path / "graphs.pt"), num_features=4, num_classes=3).setup("test")
    gd.GraphClassificationDataModule(path=str(tmp_path / "graphs.pt"), num_features=4, num_classes=2).setup("test")


def test_node_data_of_another_width_than_the_evaluated_model_says_the_checkpoint_fixes_it():
    """zoo eval ckpt=<karate run> data.name=sbm said "set data.num_features=16", which cannot work: the checkpoint's
    model reads 34 features. In Lightning's evaluation stages (zoo eval's trainer.test / validate) the sizes are the
    trained model's; in fit (zoo train) they are settings, and the message is the one it was."""
    module = gd.NodeDataModule("sbm", num_features=34, num_classes=3)
    for stage in ("test", "validate", "predict"):
        with pytest.raises(ValueError, match=r"^dataset 'sbm' has 16 node features \(num_features=16\), but the model "
                                             r"being evaluated reads 34: it was trained with data\.num_features=34, "
                                             r"which the checkpoint fixes; evaluate it on data with 34 node features"):
            module.setup(stage)
    for stage in ("fit", None):
        with pytest.raises(ValueError, match=r"^dataset 'sbm' has num_features=16 but the config says 34 \(set "
                                             r"data\.num_features=16\)$"):
            module.setup(stage)
    with pytest.raises(ValueError, match=r"has 3 classes \(num_classes=3\), but the model being evaluated scores 4"):
        gd.NodeDataModule("sbm", num_features=16, num_classes=4).setup("test")


# ------------------------------------------------------------------------------ audit 2026-12-07 (mutation gaps)
def test_random_split_gives_every_class_a_training_node_and_leaves_a_test_split_hand_computed():
    """random_split_masks (sbm, networkx graphs): num_train_per_class per class capped at half the class but at least
    one, validation capped at half of the rest, so the test split is never empty. Hand-computed on 9 nodes: class 0
    (8 nodes) trains 3, class 1 (1 node) trains its only node; num_val=100 of the 5 others -> 2, test 3."""
    y = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1])
    train, val, test = gd.random_split_masks(y, num_train_per_class=3, num_val=100, seed=0)
    assert (train.int() + val.int() + test.int()).tolist() == [1] * 9
    assert int(train[y == 0].sum()) == 3 and bool(train[8])
    assert int(val.sum()) == 2 and int(test.sum()) == 3
    again = gd.random_split_masks(y, num_train_per_class=3, num_val=100, seed=0)
    assert all(torch.equal(a, b) for a, b in zip((train, val, test), again))


def test_ogb_node_index_equal_to_the_node_count_is_refused(tmp_path):
    """Node ids are 0 .. n - 1: an edge or a split entry naming node n (one past the last row of node-feat.csv.gz)
    is refused, naming the file (an edge to it was kept, a graph with an edge to a node without features)."""
    folder = _write_ogb(tmp_path / "ogbn_toy")
    _write_gz(folder / "raw" / "edge.csv.gz", ["0,1", "1,2", "2,4"])
    with pytest.raises(ValueError, match=r"edge\.csv\.gz: node index 4 is out of range for the 4 nodes"):
        gd.load_node_dataset("ogb:ogbn-toy", root=str(tmp_path))
    folder = _write_ogb(tmp_path / "ogbn_toy", schemes=(("random", ([0, 1], [2], [3, 4])),))
    _write_gz(folder / "raw" / "edge.csv.gz", ["0,1", "1,2", "2,3"])
    with pytest.raises(ValueError, match=r"test\.csv\.gz: node index 4 is out of range for the 4 nodes"):
        gd.load_node_dataset("ogb:ogbn-toy", root=str(tmp_path))


def test_saved_graphs_with_a_negative_label_or_edge_features_of_two_widths_are_refused_at_load(tmp_path):
    """Checked when the data are read, not at the first batch (possibly after an epoch of training): a graph
    labelled -1 (no class: cross-entropy would fail or ignore it) and edge_attr 2 wide in some graphs, 3 in others
    (one model has one edge_dim)."""
    graphs = _data_list()
    graphs[4].y = torch.tensor([-1])
    torch.save(graphs, tmp_path / "negative.pt")
    with pytest.raises(ValueError, match=r"negative\.pt \[4\]: y must be one class index >= 0 per graph"):
        gd.load_graph_classification(path=str(tmp_path / "negative.pt"))
    graphs = _data_list()
    for i, g in enumerate(graphs):
        g.edge_attr = torch.randn(g.edge_index.size(1), 3 if i == 7 else 2)
    torch.save(graphs, tmp_path / "widths.pt")
    with pytest.raises(ValueError, match=r"10 of 10 graphs have edge features edge_attr, of widths \[2, 3\]"):
        gd.load_graph_classification(path=str(tmp_path / "widths.pt"))


def test_the_class_count_is_the_largest_label_plus_one_when_a_class_has_no_graph(tmp_path):
    """Labels 0 and 2 (class 1 has no graph here): 3 classes, as PyG's InMemoryDataset.num_classes counts them, so that
    a graph of class 2 is a valid target of the model's 3 outputs (2 classes, the number of labels seen, was not)."""
    from torch_geometric.data import InMemoryDataset

    graphs = _data_list()
    for g in graphs:
        g.y = g.y * 2
    torch.save(graphs, tmp_path / "gap.pt")
    data = gd.load_graph_classification(path=str(tmp_path / "gap.pt"))
    reference = InMemoryDataset()
    reference.data, reference.slices = reference.collate(graphs)
    assert data["num_classes"] == reference.num_classes == 3


def test_one_hot_degrees_of_a_directed_graph_count_outgoing_edges_as_pyg():
    """PyG's T.OneHotDegree (in_degree=False) counts each node's edges in edge_index[0]: on a directed graph (out-degrees
    3, 1, 0, 0; in-degrees 0, 1, 2, 1) the features are PyG's; a degree above max_degree counts as max_degree."""
    from torch_geometric.data import Data
    from torch_geometric.transforms import OneHotDegree

    edge_index = torch.tensor([[0, 0, 0, 1], [1, 2, 3, 2]])
    graph = {"edge_index": edge_index, "num_nodes": 4}
    reference = OneHotDegree(3)(Data(edge_index=edge_index, num_nodes=4)).x
    assert torch.equal(gd.one_hot_degree(graph, 3), reference)
    assert gd.one_hot_degree(graph, 2).argmax(1).tolist() == [2, 1, 0, 0]


def test_tu_graph_labels_for_graphs_without_nodes_at_the_end_are_named(tmp_path):
    """graph_labels.txt listing more graphs than graph_indicator.txt gives nodes to (the last graph has no node:
    hand-made files, 3 labels, nodes for graphs 1 and 2 only) is refused with both counts named, not an IndexError
    from slicing the missing graph (audit 2026-12-07: a check of `>` instead of `!=` passed every test); the other
    direction is test_tu_labels_and_graphs_must_agree_and_mixed_edge_features_are_refused_at_load."""
    raw = tmp_path / "GAP" / "raw"
    raw.mkdir(parents=True)
    (raw / "GAP_A.txt").write_text("1, 2\n2, 1\n3, 4\n4, 3\n")
    (raw / "GAP_graph_indicator.txt").write_text("1\n1\n2\n2\n")
    (raw / "GAP_graph_labels.txt").write_text("0\n1\n0\n")
    (raw / "GAP_node_labels.txt").write_text("0\n1\n0\n1\n")
    with pytest.raises(ValueError, match=r"^TU GAP: 3 graph labels in GAP_graph_labels\.txt but nodes for 2 graphs "
                                         r"in GAP_graph_indicator\.txt; graph 3 has a label but no node \(graphs "
                                         r"numbered from 1\)"):  # (it said every graph needs a node: untrue mid-file)
        gd.tu_dataset("GAP", str(tmp_path))
    (raw / "GAP_node_labels.txt").unlink()  # without node features the node counts come from graph_indicator
    with pytest.raises(ValueError, match=r"3 graph labels in GAP_graph_labels\.txt but nodes for 2 graphs"):
        gd.tu_dataset("GAP", str(tmp_path))
    (raw / "GAP_graph_labels.txt").write_text("0\n1\n")  # agreeing files: read as hand-computed
    graphs = gd.tu_dataset("GAP", str(tmp_path))
    assert [(g["num_nodes"], g["edge_index"].tolist(), g["y"]) for g in graphs] == [
        (2, [[0, 1], [1, 0]], 0), (2, [[0, 1], [1, 0]], 1)]


# ---------------------------------------------------------------- review rev4 (findings 2-4)
@pytest.mark.parametrize("split, sizes", [("public", {}), ("full", {}),
                                          ("random", {"num_train_per_class": 7, "num_val": 40, "num_test": 90}),
                                          ("random", {"num_train_per_class": 169, "num_val": 20, "num_test": 1000})])
def test_planetoid_splits_are_pyg_planetoids(tmp_path, split, sizes):
    """data.split=public | full | random (with num_train_per_class / num_val / num_test) gives PyG's
    Planetoid(split=...) masks on the same raw files; the random one is PyG's after torch.manual_seed(data.seed)
    (the second case: classes smaller than num_train_per_class, fewer nodes left than num_val + num_test)."""
    from torch_geometric.datasets import Planetoid

    _write_planetoid(tmp_path / "ours")
    _write_planetoid(tmp_path / "pyg")
    torch.manual_seed(3)
    reference = Planetoid(str(tmp_path / "pyg"), "Cora", split=split, **sizes)[0]
    torch.manual_seed(11)
    caller_stream = torch.get_rng_state()
    module = gd.NodeDataModule("planetoid:Cora", root=str(tmp_path / "ours"), seed=3, split=split, **sizes)
    module.setup()
    assert torch.equal(torch.get_rng_state(), caller_stream)  # the split's draws leave the caller's stream alone
    _assert_same_graph(module.data, reference)
    assert module.data_depends_on_order_seed() == (split == "random")
    if split == "random":
        other = gd.load_node_dataset("planetoid:Cora", str(tmp_path / "ours"), seed=4, split=split, **sizes)
        assert any(not torch.equal(other[mask], module.data[mask]) for mask in ("train_mask", "val_mask", "test_mask"))
    again = gd.load_node_dataset("planetoid:Cora", str(tmp_path / "ours"), seed=3, split=split, **sizes)
    _assert_same_graph(again, reference)  # from the cache the first read built


def _write_geom_gcn_splits(folder, num_nodes: int, seed: int = 0) -> None:
    """The ten split files of Geom-GCN (graphdml-uiuc-jlu/geom-gcn, splits/cora_split_0.6_0.2_<i>.npz: 0/1 masks
    train_mask / val_mask / test_mask of the nodes) in folder/geom-gcn/raw, random 60/20/20 partitions."""
    import numpy as np

    raw = folder / "geom-gcn" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(10):
        part = rng.choice(3, size=num_nodes, p=[0.6, 0.2, 0.2])
        np.savez(raw / f"cora_split_0.6_0.2_{i}.npz", train_mask=(part == 0).astype(np.uint8),
                 val_mask=(part == 1).astype(np.uint8), test_mask=(part == 2).astype(np.uint8))


@pytest.mark.parametrize("graph_files", ["geom-gcn/raw", "raw"])
def test_planetoid_geom_gcn_split_is_pyg_planetoids_column(tmp_path, graph_files):
    """data.split=geom-gcn with data.geom_gcn_split=i gives column i of the [N, 10] masks PyG's
    Planetoid(split="geom-gcn") reads from the same files (the graph's ind.* files in geom-gcn/raw as PyG keeps
    them, or in raw/, the public release's folder); a missing split file names where to put it."""
    import shutil

    from torch_geometric.datasets import Planetoid

    _write_planetoid(tmp_path / "pyg")
    num_nodes = 540
    _write_geom_gcn_splits(tmp_path / "pyg" / "Cora", num_nodes)
    shutil.copytree(tmp_path / "pyg" / "Cora" / "raw", tmp_path / "pyg" / "Cora" / "geom-gcn" / "raw",
                    dirs_exist_ok=True)
    ours = tmp_path / "ours" / "Cora"
    shutil.copytree(tmp_path / "pyg" / "Cora" / "geom-gcn", ours / "geom-gcn")
    if graph_files == "raw":
        shutil.copytree(tmp_path / "pyg" / "Cora" / "raw", ours / "raw")
        for path in (ours / "geom-gcn" / "raw").glob("ind.*"):
            path.unlink()
    reference = Planetoid(str(tmp_path / "pyg"), "Cora", split="geom-gcn")[0]
    assert reference.train_mask.shape == (num_nodes, 10)
    for index in (0, 7):
        module = gd.NodeDataModule("planetoid:Cora", root=str(tmp_path / "ours"), split="geom-gcn",
                                   geom_gcn_split=index)
        module.setup()
        data = module.data
        torch.testing.assert_close(data["x"], reference.x)
        assert torch.equal(data["edge_index"], reference.edge_index) and torch.equal(data["y"], reference.y)
        for mask in ("train_mask", "val_mask", "test_mask"):
            assert data[mask].dtype == torch.bool
            assert torch.equal(data[mask], getattr(reference, mask)[:, index].bool()), (index, mask)
    assert not (ours / "processed").exists() and not (ours / "geom-gcn" / "processed").exists()
    (ours / "geom-gcn" / "raw" / "cora_split_0.6_0.2_3.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"split=geom-gcn: missing \(downloads are disabled\): .*"
                                                r"cora_split_0\.6_0\.2_3\.npz\. The split files come from "
                                                r"https://github\.com/graphdml-uiuc-jlu/geom-gcn"):
        gd.planetoid("Cora", str(tmp_path / "ours"), split="geom-gcn", geom_gcn_split=3)


def test_planetoid_split_options_are_checked_where_they_are_given(tmp_path):
    """Refused by the data module's constructor, naming the key: an unknown split, sizes that are not counts, a
    geom-gcn split index out of the ten."""
    with pytest.raises(ValueError, match=r"^data\.geom_gcn_split must be an integer in \[0, 10\) .*got 10"):
        gd.NodeDataModule("planetoid:Cora", root=str(tmp_path), split="geom-gcn", geom_gcn_split=10)
    with pytest.raises(ValueError, match="planetoid_split_masks: the geom-gcn masks are not drawn from the public"):
        gd.planetoid_split_masks(torch.zeros(4, dtype=torch.long), *(torch.zeros(4, dtype=torch.bool),) * 3,
                                 split="geom-gcn")
    with pytest.raises(ValueError, match=r"^data\.split must be one of public, full, random, geom-gcn .*got 'Full'"):
        gd.NodeDataModule("planetoid:Cora", root=str(tmp_path), split="Full")
    with pytest.raises(ValueError, match=r"^data\.num_val must be an integer >= 0 .*got -1"):
        gd.NodeDataModule("planetoid:Cora", root=str(tmp_path), split="random", num_val=-1)
    with pytest.raises(ValueError, match=r"^data\.num_train_per_class must be an integer >= 1 .*got 0"):
        gd.NodeDataModule("planetoid:Cora", root=str(tmp_path), split="random", num_train_per_class=0)
    with pytest.raises(ValueError, match=r"^split must be one of"):
        gd.planetoid("Cora", str(tmp_path), split="geom_gcn")


class NamedToyGraphs(ToyGraphs):
    """A user's dataset class taking a name and a split, as PyG's GNNBenchmarkDataset(root, name, split)."""

    built: list = []

    def __init__(self, root=None, name="toy", split="train"):
        type(self).built.append((name, split))
        super().__init__(root)


def test_dataset_class_gets_data_name_when_it_takes_one(tmp_path, monkeypatch):
    """data.dataset_class=torch_geometric.datasets.TUDataset data.name=TOY reads what TUDataset(root, "TOY") reads
    (the name was not passed: "missing 1 required positional argument: 'name'"); a class whose name has no
    default is refused without data.name, one with a default keeps it, and a split-taking class gets both."""
    from torch_geometric.datasets import TUDataset

    _write_tu(tmp_path / "ours")
    _write_tu(tmp_path / "pyg")
    reference = _pyg_tu(tmp_path / "pyg", monkeypatch=monkeypatch)
    graphs = gd.dataset_class_graphs("torch_geometric.datasets.TUDataset", str(tmp_path / "ours"), name="TOY")
    assert isinstance(graphs, TUDataset) and len(graphs) == len(reference) == 8
    for ours, expected in zip(graphs, reference):
        assert torch.equal(ours.x, expected.x) and torch.equal(ours.edge_index, expected.edge_index)
        assert torch.equal(ours.y, expected.y)
    module = gd.GraphClassificationDataModule(name="TOY", root=str(tmp_path / "ours"), num_features=3, num_classes=2,
                                              dataset_class="torch_geometric.datasets.TUDataset", batch_size=2)
    module.setup()
    assert sum(len(module.splits[s]) for s in ("train", "val", "test")) == 8
    for name in (None, "", "synthetic"):
        with pytest.raises(ValueError, match=r"^data\.dataset_class=torch_geometric\.datasets\.TUDataset needs a data "
                                             r"set name \(TUDataset\(root, name, \.\.\.\)\): set data\.name="):
            gd.dataset_class_graphs("torch_geometric.datasets.TUDataset", str(tmp_path / "ours"), name=name)
    monkeypatch.setattr(NamedToyGraphs, "built", [])
    splits = gd.dataset_class_graphs(f"{__name__}.NamedToyGraphs", name="ZINC-ish")
    assert sorted(splits) == ["test", "train", "val"]
    assert NamedToyGraphs.built == [("ZINC-ish", "train"), ("ZINC-ish", "val"), ("ZINC-ish", "test")]
    NamedToyGraphs.built.clear()
    gd.dataset_class_graphs(f"{__name__}.NamedToyGraphs", name="synthetic")
    assert [name for name, _ in NamedToyGraphs.built] == ["toy"] * 3  # no data.name: the class's default


def test_stochastic_block_model_leaves_the_callers_random_stream_alone():
    """It reseeded the global generator (PyG's stochastic_blockmodel_graph draws from it): after it, every caller
    drew the same numbers whatever its seed. The graph is PyG's generator's under torch.manual_seed(seed)."""
    from torch_geometric.utils import stochastic_blockmodel_graph

    for seed in (0, 5):
        torch.manual_seed(123)
        expected_draws = torch.rand(3)
        torch.manual_seed(123)
        data = gd.stochastic_block_model(seed=seed)
        assert torch.equal(torch.rand(3), expected_draws)
        torch.manual_seed(seed)
        probs = torch.full((3, 3), 0.01).fill_diagonal_(0.1)
        assert torch.equal(data["edge_index"], stochastic_blockmodel_graph(torch.tensor([60, 60, 60]), probs))
