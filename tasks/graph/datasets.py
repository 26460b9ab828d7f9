"""Graph datasets: offline defaults (no download) and adapters for real data in a local root.

Node classification (one graph, transductive; each loader returns a dict with x [N, F] float,
edge_index [2, E] long, y [N] long, train_mask / val_mask / test_mask [N] bool, num_classes, name):

* ``karate``     -- PyG's KarateClub (Zachary 1977; 34 nodes, 4 community labels, 1 training node per
                    class; features are one-hot node ids). Shipped inside torch_geometric.
* ``sbm``        -- a stochastic-block-model graph generated here (torch_geometric.utils
                    .stochastic_blockmodel_graph for the edges, class-dependent Gaussian features).
                    PyG's StochasticBlockModelDataset itself fails with scikit-learn >= 1.4 (it hands a
                    tensor to make_classification), so its recipe is reimplemented.
* ``networkx:<name>`` -- networkx's bundled graphs: karate_club (labels: "club"), les_miserables,
                    florentine_families, davis_southern_women (labels: greedy-modularity communities,
                    derived, stated as such). Features: one-hot node ids.
* ``planetoid:<Cora|CiteSeer|PubMed>`` -- the Planetoid splits (Yang et al. 2016) read by PyG's Planetoid
                    from ``root/<Name>/raw/ind.<name>.{x,tx,allx,y,ty,ally,graph,test.index}``;
                    ``root/<name as given>/`` or ``root/<name lower-cased>/`` is read when ``root/<Name>/``
                    is absent (PyG's ``Planetoid(root, "cora")`` keeps ``root/cora/``).
                    A missing file raises FileNotFoundError naming every missing path (no download).
                    PyG caches the parsed graph in ``root/<Name>/processed/`` and reuses it whatever the
                    raw files hold now; the adapter records the raw files' sizes and modification times
                    next to that cache and has PyG rebuild it when they differ. Where ``processed/``
                    cannot be written (a read-only folder), the raw files are parsed without a cache.
                    The features are the raw bag-of-words rows; ``data.normalize_features`` (true in
                    configs/data/graph_planetoid.yaml, so in experiment=graph_cora) row-normalises them as
                    PyG's examples/gat.py (``T.NormalizeFeatures()``) and the GAT paper's preprocess_features do.
* ``ogb:<ogbn-arxiv|ogbn-products|...>`` -- OGB node-property data in the OGB raw layout
                    ``root/<ogbn_name>/raw/{edge,node-feat,node-label}.csv.gz`` and
                    ``root/<ogbn_name>/split/<scheme>/{train,valid,test}.csv.gz`` (ogb is not required).
                    The folder may also keep the name OGB's zip extracts to (``arxiv/`` for
                    ogbn-arxiv; OGB's own loader renames it to ``ogbn_arxiv/``). Without ``split`` the
                    first split scheme (sorted, hidden entries skipped) is used. Labels are integers >= 0;
                    NaN or -1 marks an unlabelled node, left out of every split (with a warning
                    naming the split file); a split with no labelled node is refused. Unlike OGB's own loader
                    (which keeps ogbn-arxiv's citation edges directed), the edges are made undirected
                    (each edge in both directions, duplicates merged) and self loops are dropped, as GAT
                    models are trained on these graphs; an empty edge.csv.gz is an edgeless graph.
                    Read: ogbn-arxiv, ogbn-products and other single-label node data in that layout.
                    Refused by name (and by layout): ogbn-proteins (multi-label, no node features),
                    ogbn-papers100M (binary npz files), ogbn-mag (heterogeneous).

Data roots: ``~`` is expanded, as PyG's Dataset and the image-folder loaders do; NodeDataModule keeps
its root as an absolute path, recorded with released weights (``describe()``).

Graph classification: ``synthetic_graphs`` -- random graphs from three generators (Erdos-Renyi,
Barabasi-Albert, Watts-Strogatz; label = generator) with degree/clustering features.
"""
from __future__ import annotations

import errno
import gzip
import json
import math
import os
import warnings
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from zoo.layers import is_int
from zoo.train.order import ResumableTrainingOrder

try:
    import lightning as L
except ImportError:  # pragma: no cover
    L = None

__all__ = [
    "load_node_dataset",
    "karate_club",
    "stochastic_block_model",
    "networkx_graph",
    "planetoid",
    "ogb_node",
    "random_split_masks",
    "normalize_feature_rows",
    "synthetic_graph_classification",
    "NodeDataModule",
    "GraphClassificationDataModule",
    "NETWORKX_GRAPHS",
]


def _undirected(edge_index: Tensor) -> Tensor:
    both = torch.cat([edge_index, edge_index.flip(0)], dim=1)
    both = both[:, both[0] != both[1]]
    return torch.unique(both, dim=1)


def random_split_masks(y: Tensor, num_train_per_class: int = 20, num_val: int = 500, seed: int = 0):
    """Planetoid-style split: ``num_train_per_class`` random nodes per class for training, then
    ``num_val`` of the rest for validation (capped at half of it), the remainder for test."""
    g = torch.Generator().manual_seed(seed)
    n = y.numel()
    train = torch.zeros(n, dtype=torch.bool)
    for c in torch.unique(y):
        idx = (y == c).nonzero().view(-1)
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        train[idx[: min(num_train_per_class, max(1, idx.numel() // 2))]] = True
    rest = (~train).nonzero().view(-1)
    rest = rest[torch.randperm(rest.numel(), generator=g)]
    nv = min(num_val, rest.numel() // 2)
    val = torch.zeros(n, dtype=torch.bool)
    val[rest[:nv]] = True
    test = ~(train | val)
    return train, val, test


def normalize_feature_rows(x: Tensor) -> Tensor:
    """PyG's ``T.NormalizeFeatures()`` (torch_geometric/transforms/normalize_features.py), which PyG's
    examples/gat.py applies to Planetoid data and the GAT paper's ``preprocess_features`` mirrors: shift by the
    global minimum (a no-op on non-negative bag-of-words features), then divide each row by its sum clamped
    at 1, so rows sum to 1 and all-zero rows stay zero. A new tensor; ``x`` is left as it is."""
    if x.numel() == 0:
        return x.clone()
    shifted = x - x.min()
    return shifted / shifted.sum(dim=-1, keepdim=True).clamp(min=1.0)


def _pack(name, x, edge_index, y, train, val, test) -> dict:
    return {"name": name, "x": x.float(), "edge_index": edge_index.long(), "y": y.long(), "train_mask": train,
            "val_mask": val, "test_mask": test, "num_classes": int(y.max()) + 1}


def karate_club() -> dict:
    """PyG's KarateClub: 34 nodes, 4 classes, one labelled training node per class (PyG's mask);
    the other 30 nodes split 15 / 15 into validation and test."""
    from torch_geometric.datasets import KarateClub

    d = KarateClub()[0]
    rest = (~d.train_mask).nonzero().view(-1)
    val = torch.zeros_like(d.train_mask)
    val[rest[::2]] = True
    test = ~(d.train_mask | val)
    return _pack("karate", d.x, d.edge_index, d.y, d.train_mask.clone(), val, test)


def _check_sbm_arguments(prefix: str = "", block_sizes=(60, 60, 60), p_in: float = 0.1, p_out: float = 0.01,
                         num_channels: int = 16, feature_noise: float = 2.0) -> None:
    """The SBM generator's arguments, named (``prefix``: "data." from the data module): PyG's generator
    fails deep inside torch.bernoulli ("Expected p_in >= 0 && p_in <= 1"), or silently, on values out of range."""
    def is_real(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if (isinstance(block_sizes, (str, bytes)) or not hasattr(block_sizes, "__len__") or len(block_sizes) < 2
            or not all(is_int(b) and b > 0 for b in block_sizes)):
        raise ValueError(f"{prefix}block_sizes must be a list of at least 2 positive integers (nodes per class), "
                         f"got {block_sizes!r}")
    for key, value in (("p_in", p_in), ("p_out", p_out)):
        if not is_real(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{prefix}{key} must be a probability in [0, 1], got {value!r}")
    if not is_int(num_channels) or num_channels < 1:
        raise ValueError(f"{prefix}num_channels must be a positive integer, got {num_channels!r}")
    if not is_real(feature_noise) or feature_noise < 0:
        raise ValueError(f"{prefix}feature_noise must be a finite number >= 0 (a standard deviation), "
                         f"got {feature_noise!r}")


def stochastic_block_model(block_sizes=(60, 60, 60), p_in: float = 0.1, p_out: float = 0.01,
                           num_channels: int = 16, feature_noise: float = 2.0, seed: int = 0) -> dict:
    """An SBM graph: nodes of block b connect with probability p_in inside, p_out across; features
    are a class-specific random mean plus Gaussian noise of std ``feature_noise``; label = block."""
    from torch_geometric.utils import stochastic_blockmodel_graph

    _check_sbm_arguments("", block_sizes, p_in, p_out, num_channels, feature_noise)

    torch.manual_seed(seed)  # stochastic_blockmodel_graph draws from the global generator
    k = len(block_sizes)
    probs = torch.full((k, k), float(p_out))
    probs.fill_diagonal_(float(p_in))
    edge_index = stochastic_blockmodel_graph(torch.tensor(block_sizes), probs, directed=False)
    y = torch.arange(k).repeat_interleave(torch.tensor(block_sizes))
    g = torch.Generator().manual_seed(seed + 1)
    means = torch.randn(k, num_channels, generator=g)
    x = means[y] + feature_noise * torch.randn(y.numel(), num_channels, generator=g)
    train, val, test = random_split_masks(y, num_train_per_class=5, num_val=y.numel() // 4, seed=seed)
    return _pack("sbm", x, edge_index, y, train, val, test)


NETWORKX_GRAPHS = ("karate_club", "les_miserables", "florentine_families", "davis_southern_women")


def networkx_graph(name: str, seed: int = 0) -> dict:
    """One of networkx's bundled graphs as a node-classification problem (see module docstring)."""
    import networkx as nx

    makers = {
        "karate_club": nx.karate_club_graph,
        "les_miserables": nx.les_miserables_graph,
        "florentine_families": nx.florentine_families_graph,
        "davis_southern_women": nx.davis_southern_women_graph,
    }
    if name not in makers:
        raise ValueError(f"unknown networkx graph {name!r}; choose one of {NETWORKX_GRAPHS}")
    G = makers[name]()
    nodes = list(G.nodes())
    index = {v: i for i, v in enumerate(nodes)}
    if name == "karate_club":
        clubs = sorted({G.nodes[v]["club"] for v in nodes})
        y = torch.tensor([clubs.index(G.nodes[v]["club"]) for v in nodes])
    else:
        comms = nx.algorithms.community.greedy_modularity_communities(G)
        label = {v: c for c, members in enumerate(comms) for v in members}
        y = torch.tensor([label[v] for v in nodes])
    edges = torch.tensor([[index[a], index[b]] for a, b in G.edges()], dtype=torch.long).t()
    edge_index = _undirected(edges)
    x = torch.eye(len(nodes))
    train, val, test = random_split_masks(y, num_train_per_class=2, num_val=len(nodes) // 4, seed=seed)
    return _pack(f"networkx:{name}", x, edge_index, y, train, val, test)


PLANETOID = {"cora": "Cora", "citeseer": "CiteSeer", "pubmed": "PubMed"}
# what PyG's Planetoid writes into <root>/<Name>/processed/ (the only files the adapter ever removes)
_PLANETOID_CACHE_FILES = ("data.pt", "pre_transform.pt", "pre_filter.pt")
_RAW_RECORD = "zoo_raw_files.json"  # next to them: the raw files (size, mtime) the cache was built from


def _raw_files_record(paths: list[str]) -> dict:
    return {os.path.basename(p): [os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths}


def _planetoid_cache_is_fresh(processed: str, record: dict) -> bool:
    """PyG's Planetoid reuses processed/data.pt whenever it exists, so raw files replaced after a first run
    (another release, a fixed file) were ignored. When the raw files differ from those the cache was built
    from, or that is unknown (a cache without the record), remove PyG's cache files so that it rebuilds them;
    True when the cache matches the raw files."""
    try:
        with open(os.path.join(processed, _RAW_RECORD), encoding="utf-8") as f:
            if json.load(f) == record:
                return True
    except (OSError, ValueError):
        pass
    stale = [os.path.join(processed, name) for name in _PLANETOID_CACHE_FILES
             if os.path.isfile(os.path.join(processed, name))]
    try:
        for path in stale:
            os.remove(path)
    except OSError as error:  # a read-only or shared data folder: keep using the cache it holds
        warnings.warn(f"Planetoid: cannot check or rebuild the cache in {processed} ({error.strerror}); using it as "
                      f"it is. If the raw files changed since it was built, delete that folder.", stacklevel=3)
        return True
    return False


def _write_raw_record(processed: str, record: dict) -> None:
    tmp = os.path.join(processed, f".{_RAW_RECORD}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f)
    os.replace(tmp, os.path.join(processed, _RAW_RECORD))


_PLANETOID_SUFFIXES = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")


def _planetoid_folder(root: str, name: str) -> tuple[str, list[str]]:
    """(the dataset folder to read, every folder looked at). PyG's Planetoid keeps its files in
    ``root/<name as passed>/`` (``Planetoid(root, "cora")`` -> ``root/cora/``), so besides ``root/<Name>/``
    the name as given and its lower-case form are read; the first folder holding every raw file wins, else
    the first that exists (its missing files are then named)."""
    key = name.lower()
    candidates = list(dict.fromkeys(os.path.join(root, folder) for folder in (PLANETOID[key], name, key)))

    def complete(folder):
        return all(os.path.isfile(os.path.join(folder, "raw", f"ind.{key}.{s}")) for s in _PLANETOID_SUFFIXES)

    chosen = next((c for c in candidates if complete(c)), None) or next(
        (c for c in candidates if os.path.isdir(c)), candidates[0])
    return chosen, candidates


def _is_permission_error(error: BaseException) -> bool:
    """An access refused by the file system (permissions, or a read-only mount), as opposed to a bad file."""
    return isinstance(error, PermissionError) or (isinstance(error, OSError) and error.errno == errno.EROFS)


def _unreadable(proper: str, raw: str, error: OSError) -> PermissionError:
    return PermissionError(f"Planetoid {proper}: no permission to read {error.filename or raw} ({error.strerror}); "
                           "make the raw files readable (chmod a+r) or copy them to a folder of yours")


def _read_planetoid_without_cache(raw: str, key: str, proper: str, processed: str, error: OSError):
    """PyG's Planetoid first creates ``processed/`` and writes its cache there, so a read-only data folder
    holding only raw/ failed (and was reported as corrupt raw files). PyG's own parser,
    ``torch_geometric.io.read_planetoid_data``, reads the same raw files into the same public split and writes
    nothing: use it, and say that nothing is cached. A raw file that cannot be read is named as such."""
    from torch_geometric.io import read_planetoid_data

    where = os.path.abspath(str(error.filename)) if error.filename else None
    cache = os.path.abspath(processed)
    if where is not None and where != cache and not where.startswith(cache + os.sep):  # reading raw/, not caching
        raise _unreadable(proper, raw, error) from None
    warnings.warn(f"Planetoid {proper}: cannot write PyG's cache at {where or processed} ({error.strerror or error}); "
                  f"reading the raw files without caching them (each run parses them again)", stacklevel=3)
    try:
        return read_planetoid_data(raw, key)
    except OSError as read_error:
        if _is_permission_error(read_error):
            raise _unreadable(proper, raw, read_error) from None
        raise


def planetoid(name: str, root: str) -> dict:
    """Planetoid (Cora, CiteSeer, PubMed) with the public split, from ``root`` (no download; ``~`` expanded,
    as PyG's Dataset does)."""
    key = name.lower()
    if key not in PLANETOID:
        raise ValueError(f"unknown Planetoid dataset {name!r}; choose one of {sorted(PLANETOID.values())}")
    if not root:
        raise ValueError("planetoid needs data.root: a folder holding <Name>/raw/ind.<name>.*")
    root = os.path.expanduser(os.fspath(root))
    proper = PLANETOID[key]
    folder, candidates = _planetoid_folder(root, name)
    raw = os.path.join(folder, "raw")
    needed = [os.path.join(raw, f"ind.{key}.{s}") for s in _PLANETOID_SUFFIXES]
    missing = [p for p in needed if not os.path.isfile(p)]
    if missing:
        others = [c for c in candidates if c != folder]
        looked = f" (also looked in {', '.join(others)})" if others else ""
        raise FileNotFoundError(
            f"Planetoid {proper}: {len(missing)} raw file(s) missing under {raw}{looked} (downloads are disabled): "
            + ", ".join(missing)
            + ". Get them from https://github.com/kimiyoung/planetoid (data/) and place them there."
        )
    from torch_geometric.datasets import Planetoid

    processed = os.path.join(folder, "processed")
    record = _raw_files_record(needed)
    fresh = _planetoid_cache_is_fresh(processed, record)
    try:
        try:
            d = Planetoid(root, os.path.basename(folder))[0]
        except OSError as error:
            if not _is_permission_error(error):
                raise
            d = _read_planetoid_without_cache(raw, key, proper, processed, error)
            fresh = True  # nothing was cached: no record to write
    except PermissionError:  # an unreadable raw file, named by _read_planetoid_without_cache
        raise
    except Exception as error:  # PyG unpickles the raw files: a truncated or foreign file fails deep inside
        raise ValueError(f"Planetoid {proper}: cannot read the raw files under {raw} (corrupt or not the "
                         f"Planetoid release?): {type(error).__name__}: {str(error)[:200]}") from None
    if not fresh and _raw_files_record(needed) == record:  # unchanged while PyG read them: the cache matches
        try:
            _write_raw_record(processed, record)
        except OSError:  # read-only: the next run checks again
            pass
    return _pack(f"planetoid:{proper}", d.x, d.edge_index, d.y, d.train_mask, d.val_mask, d.test_mask)


def _read_csv_gz(path: str, dtype) -> np.ndarray:
    try:
        with gzip.open(path, "rt") as f, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input contained no data")  # an empty file: 0 rows
            return np.loadtxt(f, delimiter=",", dtype=dtype, ndmin=2)
    except (OSError, ValueError, EOFError) as error:  # not gzip, truncated, or not numbers
        raise ValueError(f"cannot read {path} (a gzipped CSV of numbers): {type(error).__name__}: "
                         f"{str(error)[:200]}") from None


def _check_rows(path: str, values: torch.Tensor, n: int, what: str) -> None:
    """Node indices read from ``path`` must lie in [0, n)."""
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= n):
        bad = int(values.max()) if int(values.max()) >= n else int(values.min())
        raise ValueError(f"{path}: {what} {bad} is out of range for the {n} nodes of node-feat.csv.gz")


# OGB's node-property datasets that are not single-graph, single-label CSV data, and why (OGB's master.csv:
# ogbn-proteins "binary classification" of 112 tasks without node features, ogbn-papers100M "binary" (npz) files,
# ogbn-mag "is_hetero")
_OGB_UNSUPPORTED = {
    "ogbn-proteins": "multi-label (112 binary labels per node in node-label.csv.gz) with no node features "
                     "(no node-feat.csv.gz)",
    "ogbn-papers100m": "stored as binary numpy files (raw/data.npz, raw/node-label.npz; its zip extracts to "
                       "papers100M-bin/), not gzipped CSVs",
    "ogbn-mag": "heterogeneous (papers, authors, institutions and fields of study; raw/relations/)",
}
_OGB_SUPPORTED = "ogbn-arxiv, ogbn-products or another single-label node dataset in OGB's CSV layout"


def _refuse_unsupported_ogb(name: str, why: str) -> None:
    raise ValueError(f"OGB {name} is not supported: it is {why}. This adapter reads single-graph, single-label "
                     f"node classification from gzipped CSVs: {_OGB_SUPPORTED} (docs/graph.md)")


def _check_ogb_layout(name: str, folder: str) -> None:
    """A folder in one of the layouts this adapter does not read (whatever the name it was given under) is
    named as such, not reported as CSV files missing from an incomplete unzip."""
    raw = os.path.join(folder, "raw")
    if os.path.isfile(os.path.join(raw, "data.npz")):
        _refuse_unsupported_ogb(name, f"stored as binary numpy files ({os.path.join(raw, 'data.npz')}), "
                                      "not gzipped CSVs")
    if os.path.isdir(os.path.join(raw, "relations")):
        _refuse_unsupported_ogb(name, f"heterogeneous ({os.path.join(raw, 'relations')} holds one edge list per "
                                      "relation)")


def _ogb_folder(root: str, name: str) -> tuple[str, Optional[str]]:
    """(the folder to read, the folder name OGB's zip extracts to). OGB's loader renames the zip's folder
    (arxiv/) to ogbn_arxiv/; either is read, the renamed one first."""
    renamed = os.path.join(root, name.replace("-", "_"))
    unzipped = os.path.join(root, name.split("-", 1)[1]) if name.startswith("ogbn-") else None
    if not os.path.isdir(renamed) and unzipped is not None and os.path.isdir(unzipped):
        return unzipped, unzipped
    return renamed, unzipped


def _split_schemes(split_root: str) -> list[str]:
    """The split schemes under split/: visible folders only (not a README.txt or .ipynb_checkpoints/)."""
    return sorted(e for e in os.listdir(split_root)
                  if not e.startswith(".") and os.path.isdir(os.path.join(split_root, e)))


def _ogb_labels(path: str, values: Tensor) -> tuple[Tensor, Tensor]:
    """(labels as int64, labelled mask) of node-label.csv.gz: integers >= 0, NaN or -1 for an unlabelled node.
    A fractional or other negative value (a regression target, a wrong column) is refused, not truncated."""
    unlabelled = torch.isnan(values) | (values == -1)
    known = values[~unlabelled]
    bad = known[~torch.isfinite(known) | (known != known.round()) | (known < 0)]
    if bad.numel():
        raise ValueError(f"{path}: label {bad[0].item():g} is not a class index (labels are integers >= 0; "
                         "NaN or -1 marks an unlabelled node)")
    return torch.where(unlabelled, torch.zeros_like(values), values).long(), ~unlabelled


def ogb_node(name: str, root: str, split: Optional[str] = None) -> dict:
    """An OGB node-property dataset (e.g. ogbn-arxiv) from its raw CSV layout under ``root`` (``~`` expanded):
    edges made undirected without self loops, NaN / -1 labels unlabelled (see the module docstring)."""
    if name.lower() in _OGB_UNSUPPORTED:
        _refuse_unsupported_ogb(name, _OGB_UNSUPPORTED[name.lower()])
    if not root:
        raise ValueError("ogb needs data.root: a folder holding <ogbn_name>/raw and <ogbn_name>/split")
    root = os.path.expanduser(os.fspath(root))
    folder, unzipped = _ogb_folder(root, name)
    _check_ogb_layout(name, folder)
    split_root = os.path.join(folder, "split")
    if split is None and os.path.isdir(split_root):
        schemes = _split_schemes(split_root)
        split = schemes[0] if schemes else None
    split_dir = os.path.join(split_root, split or "<scheme>")
    needed = [os.path.join(folder, "raw", f) for f in ("edge.csv.gz", "node-feat.csv.gz", "node-label.csv.gz")]
    needed += [os.path.join(split_dir, f"{s}.csv.gz") for s in ("train", "valid", "test")]
    missing = [p for p in needed if not os.path.isfile(p)]
    if missing:
        zip_note = "" if unzipped is None else (
            f" (it extracts to {unzipped}/, which is read as is; OGB's own loader renames it to "
            f"{os.path.join(root, name.replace('-', '_'))}/, also read)")
        raise FileNotFoundError(
            f"OGB {name}: {len(missing)} file(s) missing (downloads are disabled): " + ", ".join(missing)
            + ". Unpack the dataset zip from https://ogb.stanford.edu (nodeproppred) into " + root + zip_note
        )
    edges = torch.from_numpy(_read_csv_gz(needed[0], np.int64))
    if edges.numel() == 0:  # an empty edge.csv.gz: an edgeless graph (loadtxt gives shape (0, 1))
        edges = edges.reshape(0, 2)
    if edges.size(1) != 2:
        raise ValueError(f"{needed[0]}: expected 2 columns (source, target) per row, got {edges.size(1)}")
    edges = edges.t()
    x = torch.from_numpy(_read_csv_gz(needed[1], np.float32))
    n = x.size(0)
    y = torch.from_numpy(_read_csv_gz(needed[2], np.float64))
    if y.dim() == 2 and y.size(1) > 1:
        _refuse_unsupported_ogb(name, f"multi-label ({needed[2]} has {y.size(1)} label columns per node)")
    y = y.view(-1)
    if y.numel() != n:
        raise ValueError(f"{needed[2]} has {y.numel()} labels but {needed[1]} has {n} nodes (one label per node)")
    _check_rows(needed[0], edges, n, "node index")
    y, labelled = _ogb_labels(needed[2], y)
    masks, listed = [], []
    for p in needed[3:]:
        index = torch.from_numpy(_read_csv_gz(p, np.int64)).view(-1)
        _check_rows(p, index, n, "node index")
        m = torch.zeros(n, dtype=torch.bool)
        m[index] = True
        for other_path, other in listed:  # a node in two splits: test or validation nodes trained on
            both = (m & other).nonzero().view(-1)
            if both.numel():
                raise ValueError(f"{other_path} and {p} both list node {int(both[0])} ({both.numel()} shared "
                                 "node(s)): the train, valid and test splits must not overlap")
        listed.append((p, m))
        unlabelled = int((m & ~labelled).sum())
        if unlabelled:  # left out of the split: say so, the split's size in metrics would surprise otherwise
            warnings.warn(f"{p}: {unlabelled} of its {int(m.sum())} nodes have no label in {needed[2]} (NaN / -1) "
                          f"and are left out of the split", stacklevel=2)
        masks.append(m & labelled)
    for p, mask, what in zip(needed[3:], masks, ("training", "validation", "test")):
        if not mask.any():  # an empty validation / test split gave metrics of nothing (NaN, or a skipped step)
            raise ValueError(f"{p} lists no labelled {what} node (empty, or only nodes whose label in {needed[2]} "
                             f"is NaN / -1): put the {what} node indices there, one per line")
    return _pack(f"ogb:{name}", x, _undirected(edges), y, *masks)


def load_node_dataset(name: str, root: Optional[str] = None, seed: int = 0, normalize_features: bool = False,
                      **kwargs) -> dict:
    """Dispatch on ``name`` (see the module docstring); ``normalize_features``: the rows of x summing to 1
    (:func:`normalize_feature_rows`, PyG's NormalizeFeatures). Here rather than in the data module alone, so that
    ``zoo viz graph ckpt=`` (which passes the recorded data options on) feeds a model the features it trained on."""
    data = _load_node_dataset(name, root, seed, **kwargs)
    if normalize_features:
        data["x"] = normalize_feature_rows(data["x"])
    return data


def _load_node_dataset(name: str, root: Optional[str], seed: int, **kwargs) -> dict:
    if name == "karate":
        return karate_club()
    if name == "sbm":
        return stochastic_block_model(seed=seed, **kwargs)
    if name.startswith("networkx:"):
        return networkx_graph(name.split(":", 1)[1], seed=seed)
    if name.startswith("planetoid:"):
        return planetoid(name.split(":", 1)[1], root)
    if name.startswith("ogb:"):
        return ogb_node(name.split(":", 1)[1], root, **kwargs)
    raise ValueError(
        f"unknown node dataset {name!r}: use karate, sbm, networkx:<{'|'.join(NETWORKX_GRAPHS)}>, "
        "planetoid:<Cora|CiteSeer|PubMed> or ogb:<ogbn-...>"
    )


def synthetic_graph_classification(num_graphs: int = 300, min_nodes: int = 12, max_nodes: int = 30,
                                   seed: int = 0) -> list[dict]:
    """Random graphs labelled by their generator: 0 Erdos-Renyi, 1 Barabasi-Albert, 2 Watts-Strogatz
    (matched mean degree ~4). Node features [8]: degree / 10, clustering coefficient, 6 random dims."""
    import networkx as nx

    rng = np.random.default_rng(seed)
    graphs = []
    for i in range(num_graphs):
        n = int(rng.integers(min_nodes, max_nodes + 1))
        label = i % 3
        s = int(rng.integers(1 << 30))
        if label == 0:
            G = nx.gnp_random_graph(n, 4.0 / (n - 1), seed=s)
        elif label == 1:
            G = nx.barabasi_albert_graph(n, 2, seed=s)
        else:
            G = nx.watts_strogatz_graph(n, 4, 0.1, seed=s)
        edges = torch.tensor(list(G.edges()), dtype=torch.long).t().reshape(2, -1)
        deg = torch.tensor([G.degree(v) for v in range(n)], dtype=torch.float32)
        clus = torch.tensor([nx.clustering(G, v) for v in range(n)], dtype=torch.float32)
        x = torch.cat([deg[:, None] / 10, clus[:, None], torch.from_numpy(rng.normal(size=(n, 6))).float()], 1)
        graphs.append({"x": x, "edge_index": _undirected(edges), "y": label})
    return graphs


def collate_graphs(graphs: list[dict]) -> dict:
    """Disjoint union of small graphs: x, edge_index (offset), batch [N], num_graphs, y [G]."""
    xs, eis, batch, offset = [], [], [], 0
    for i, g in enumerate(graphs):
        xs.append(g["x"])
        eis.append(g["edge_index"] + offset)
        batch.append(torch.full((g["x"].size(0),), i, dtype=torch.long))
        offset += g["x"].size(0)
    return {"x": torch.cat(xs), "edge_index": torch.cat(eis, 1), "batch": torch.cat(batch),
            "num_graphs": len(graphs), "y": torch.tensor([g["y"] for g in graphs], dtype=torch.long)}


_Base = L.LightningDataModule if L is not None else object


# the extra data.* keys each node dataset takes (passed to its loader), by the name before ":"
_LOADER_OPTIONS = {
    "karate": (),
    "sbm": ("block_sizes", "p_in", "p_out", "num_channels", "feature_noise"),
    "networkx": (),
    "planetoid": (),
    "ogb": ("split",),
}


class NodeDataModule(_Base):
    """One graph, full batch: every loader yields the same single batch dict (masks select the split)."""

    def __init__(self, name: str = "karate", root: Optional[str] = None, seed: int = 0,
                 num_features: Optional[int] = None, num_classes: Optional[int] = None, model_kind: str = "node",
                 num_workers: int = 0, normalize_features: bool = False, **kwargs):
        super().__init__()
        if model_kind != "node":
            raise ValueError(f"node-classification data need model_kind='node', got {model_kind!r}")
        if not isinstance(normalize_features, bool):
            raise ValueError(f"data.normalize_features must be true or false (row-normalise the node features as "
                             f"PyG's NormalizeFeatures), got {normalize_features!r}")
        # data.normalize_features: rows of x summing to 1 (normalize_feature_rows), as the GAT paper's Planetoid runs
        self.normalize_features = normalize_features
        kind = str(name).split(":", 1)[0]
        options = _LOADER_OPTIONS.get(kind, ())
        unknown = sorted(set(kwargs) - set(options))
        if unknown and kind in _LOADER_OPTIONS:  # an unknown dataset name is reported by setup()
            raise ValueError(
                f"unknown key data.{unknown[0]} for the {name!r} dataset (its keys: name, root, seed, num_features, "
                f"num_classes, model_kind, num_workers, normalize_features{''.join(', ' + o for o in options)})"
            )
        if kind == "sbm":  # named here, before the generator's own RuntimeError deep inside torch.bernoulli
            _check_sbm_arguments("data.", **kwargs)
        # num_workers (set by debug=fast for every data config) is accepted and unused: one full-batch graph,
        # already in memory, needs no loader workers
        self.model_kind = model_kind
        # absolute, ~ expanded: the root recorded with released weights (describe()) must still name the folder
        # when `zoo viz graph ckpt=...` runs from another directory
        root = os.path.abspath(os.path.expanduser(os.fspath(root))) if root else root
        self.name, self.root, self.seed, self.kwargs = name, root, seed, kwargs
        self.expected = {"num_features": num_features, "num_classes": num_classes}
        self.data: Optional[dict] = None

    def describe(self) -> dict:
        """Data facts stored with released weights (``metadata.data``): the dataset and its absolute root, which
        ``zoo viz graph ckpt=`` reads (the run's recorded config keeps data.root as it was typed)."""
        return {"name": str(self.name), "root": self.root}

    def setup(self, stage: Optional[str] = None) -> None:
        if self.data is None:
            data = load_node_dataset(self.name, self.root, seed=self.seed,
                                     normalize_features=self.normalize_features, **self.kwargs)
            actual = {"num_features": data["x"].size(1), "num_classes": data["num_classes"]}
            for key, want in self.expected.items():
                if want is not None and int(want) != actual[key]:
                    raise ValueError(
                        f"dataset {self.name!r} has {key}={actual[key]} but the config says {want} "
                        f"(set data.{key}={actual[key]})"
                    )
            self.data = data

    @property
    def num_features(self) -> int:
        self.setup()
        return self.data["x"].size(1)

    @property
    def num_classes(self) -> int:
        self.setup()
        return self.data["num_classes"]

    def _loader(self):
        """Under DDP Lightning's DistributedSampler pads this one-item dataset: every process gets the whole graph
        (the masks, not the sampler, split it), so the metrics are equal on all processes."""
        batch = {k: v for k, v in self.data.items() if isinstance(v, torch.Tensor)}
        return torch.utils.data.DataLoader([batch], batch_size=None)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()

    def test_dataloader(self):
        return self._loader()

    def predict_dataloader(self):
        """The whole graph: ``trainer.predict`` gives every node's class probabilities (select with the masks)."""
        return self._loader()


def evaluation_sampler(dataset, what: str, fix: str, unit: str = "graph"):
    """The sampler of a split that is scored (validation, test): None in one process; under DDP each item on
    exactly one process, and a split smaller than the process count refused, as for images
    (``zoo.tasks.vision.data._evaluation_sampler``: Lightning's default DistributedSampler padded a split that does
    not divide by the process count with repeated items; 45 test graphs on 2 processes: 46 scored)."""
    from zoo.tasks.vision.data import _evaluation_sampler  # here: the vision package registers its models

    return _evaluation_sampler(dataset, what, fix, unit)


def _graph_split_sizes(num_graphs: int) -> tuple[int, int, int]:
    """(train, validation, test) graph counts of the 70 / 15 / 15 split."""
    a, b = int(0.7 * num_graphs), int(0.85 * num_graphs)
    return a, b - a, num_graphs - b


def _check_graph_split(num_graphs) -> None:
    """Every split must hold a graph: with data.num_graphs=3 validation was empty, and Lightning only warned
    ("Total length of DataLoader across ranks is zero") while the run "succeeded" without validation."""
    if not is_int(num_graphs) or num_graphs < 1:
        raise ValueError(f"data.num_graphs must be a positive integer, got {num_graphs!r}")
    sizes = _graph_split_sizes(num_graphs)
    if min(sizes) == 0:
        least = next(n for n in range(num_graphs + 1, num_graphs + 100) if min(_graph_split_sizes(n)) > 0)
        empty = [what for what, size in zip(("training", "validation", "test"), sizes) if size == 0]
        raise ValueError(f"data.num_graphs={num_graphs} leaves the {' and '.join(empty)} split empty (70 / 15 / 15 "
                         f"split: {sizes[0]} / {sizes[1]} / {sizes[2]} graphs); use data.num_graphs >= {least}")


class GraphClassificationDataModule(ResumableTrainingOrder, _Base):
    """Mini-batches of the synthetic graph-classification set (70 / 15 / 15 split; every split must be non-empty)."""

    def __init__(self, num_graphs: int = 300, batch_size: int = 32, seed: int = 0,
                 num_features: Optional[int] = None, num_classes: Optional[int] = None, model_kind: str = "graph",
                 num_workers: int = 0):
        super().__init__()
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"data.num_workers must be an integer >= 0, got {num_workers!r}")
        self.num_workers = num_workers
        if (num_features not in (None, 8)) or (num_classes not in (None, 3)) or model_kind != "graph":
            raise ValueError("synthetic graph classification has num_features=8, num_classes=3, model_kind='graph'")
        _check_graph_split(num_graphs)
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"data.batch_size must be a positive integer, got {batch_size!r}")
        self.model_kind = model_kind
        self.num_graphs, self.batch_size, self.seed = num_graphs, batch_size, seed
        self.splits: Optional[dict] = None
        self.num_classes, self.num_features = 3, 8

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits is None:
            graphs = synthetic_graph_classification(self.num_graphs, seed=self.seed)
            num_train, num_val, _ = _graph_split_sizes(len(graphs))
            a, b = num_train, num_train + num_val
            self.splits = {"train": graphs[:a], "val": graphs[a:b], "test": graphs[b:]}

    def _loader(self, split, shuffle):
        # the training order comes from (seed, epoch), which Lightning passes on through set_epoch, not from
        # the global RNG at each epoch's iterator: a run resumed from a checkpoint sees the same batches
        if shuffle:
            sampler = self.training_sampler(self.splits[split], self.batch_size)
        else:
            sampler = evaluation_sampler(self.splits[split], f"{split} split", "raise data.num_graphs")
        return torch.utils.data.DataLoader(self.splits[split], batch_size=self.batch_size, sampler=sampler,
                                           collate_fn=collate_graphs, num_workers=self.num_workers)

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)

    def test_dataloader(self):
        return self._loader("test", False)

    def predict_dataloader(self):
        """The test split, in order (each graph once, on one process under DDP): ``trainer.predict`` gives its
        graphs' class probabilities, batch by batch."""
        return self._loader("test", False)
