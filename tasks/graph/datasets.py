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
* ``planetoid:<Cora|CiteSeer|PubMed>`` -- the Planetoid data (Yang et al. 2016) read by PyG's Planetoid
                    from ``root/<Name>/raw/ind.<name>.{x,tx,allx,y,ty,ally,graph,test.index}``, with PyG's
                    ``split``: "public" (default), "full" or "random" (``num_train_per_class``, ``num_val``,
                    ``num_test``, drawn with data.seed; :func:`planetoid_split_masks`) or "geom-gcn" (the
                    60/20/20 splits of Pei et al., ICLR 2020, one of ten: ``geom_gcn_split``, read from
                    ``root/<Name>/geom-gcn/raw/<name>_split_0.6_0.2_<i>.npz`` as PyG's Planetoid does);
                    ``root/<name as given>/`` or ``root/<name lower-cased>/`` is read when ``root/<Name>/``
                    is absent (PyG's ``Planetoid(root, "cora")`` keeps ``root/cora/``).
                    A missing file raises FileNotFoundError naming every missing path (no download).
                    PyG caches the parsed graph in ``root/<Name>/processed/`` and reuses it whatever the
                    raw files hold now and whatever ``pre_transform`` / ``pre_filter`` built it. The
                    adapter writes only into a cache it built itself, recorded in ``zoo_raw_files.json``
                    there (the raw files' sizes and modification times, and those of the ``data.pt`` PyG
                    built from them), and has PyG rebuild that cache when they differ. A plain cache
                    (PyG's ``pre_transform.pt`` and ``pre_filter.pt`` hold ``'None'``) without that record,
                    a PyG user's ``Planetoid(root, name)``, is read when its data.pt is newer than every raw
                    file, and nothing is written into it. Any other cache (built with a pre_transform or
                    pre_filter, a user's older than a raw file, the zoo's own where ``processed/`` cannot be
                    written) is left as it is and the raw files are parsed without a cache, with a warning.
                    The features are the raw bag-of-words rows; ``data.normalize_features`` (true in
                    configs/data/graph_planetoid.yaml, so in experiment=graph_cora) row-normalises them as
                    PyG's examples/gat.py (``T.NormalizeFeatures()``) and the GAT paper's preprocess_features do.
* ``ogb:<ogbn-arxiv|ogbn-products|...>`` -- OGB node-property data in the OGB raw layout
                    ``root/<ogbn_name>/raw/{edge,node-feat,node-label}.csv.gz`` and
                    ``root/<ogbn_name>/split/<scheme>/{train,valid,test}.csv.gz`` (ogb is not required).
                    The folder may also keep the name OGB's zip extracts to (``arxiv/`` for
                    ogbn-arxiv; OGB's own loader renames it to ``ogbn_arxiv/``). Without ``split`` the
                    first split scheme (sorted, hidden entries skipped) is used; a ``split`` naming no folder
                    there is refused with the schemes that are. Labels are integers >= 0;
                    NaN or -1 marks an unlabelled node, left out of every split (with a warning
                    naming the split file); a split with no labelled node is refused. Unlike OGB's own loader
                    (which keeps ogbn-arxiv's citation edges directed), the edges are made undirected
                    (each edge in both directions, duplicates merged) and self loops are dropped, as GAT
                    models are trained on these graphs; an empty edge.csv.gz is an edgeless graph.
                    The dict also holds ``labelled_mask`` [N] bool (False: a NaN / -1 label, where y holds
                    0), which no split mask includes.
                    Read: ogbn-arxiv, ogbn-products and other single-label node data in that layout.
                    Refused by name (and by layout): ogbn-proteins (multi-label, no node features),
                    ogbn-papers100M (binary npz files), ogbn-mag (heterogeneous).

Data roots: ``~`` is expanded, as PyG's Dataset and the image-folder loaders do; NodeDataModule keeps
its root as an absolute path, recorded with released weights (``describe()``).

Graph classification (mini-batches of small graphs; GraphClassificationDataModule, each graph a dict x [n, F]
float, edge_index [2, e] long, y int):

* ``synthetic``  -- random graphs from three generators (Erdos-Renyi, Barabasi-Albert, Watts-Strogatz;
                    label = generator) with degree/clustering features; split 70 / 15 / 15.
* a TU data set (``data.name=MUTAG data.root=...``) -- the raw text files of PyG's TUDataset,
                    ``root/<name>/raw/<name>_{A,graph_indicator,graph_labels}.txt`` (+ node labels / attributes),
                    parsed by PyG's read_tu_data; nothing downloaded or cached. A missing file raises
                    FileNotFoundError naming every missing path and where to get the zip; node label /
                    attribute files of another row count than graph_indicator's nodes are refused by name.
* ``data.path=graphs.pt`` -- a torch.save'd list of PyG Data (or a dict of lists under train / val / test),
                    loaded with weights_only=True (PyG's Data classes allowed); other pickles only with
                    ``data.trust_pickle=true``.
* ``data.dataset_class=pkg.module.Class`` -- a PyG InMemoryDataset class, built as Class(root), with
                    ``name=`` data.name when it takes a ``name`` (PyG's TUDataset, MoleculeNet, GNNBenchmarkDataset;
                    refused without data.name where ``name`` has no default), per split when it takes ``split``
                    (as PyG's ZINC, GNNBenchmarkDataset).
                    Without a split of the data's own: a stratified 70 / 15 / 15 one (per class, seeded). Graphs
                    without x: PyG's OneHotDegree features (degrees capped at data.max_degree). Classes: max(y) + 1.
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

from zoo.layers import check_flag, is_int
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
    "planetoid_split_masks",
    "ogb_node",
    "random_split_masks",
    "normalize_feature_rows",
    "synthetic_graph_classification",
    "load_graph_classification",
    "tu_dataset",
    "load_saved_graphs",
    "dataset_class_graphs",
    "one_hot_degree",
    "stratified_graph_split",
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

    k = len(block_sizes)
    probs = torch.full((k, k), float(p_out))
    probs.fill_diagonal_(float(p_in))
    # stochastic_blockmodel_graph draws from the global generator: seeded inside a fork of the CPU generator, so
    # the caller's random stream is left as it was (reseeded here, a caller's model initialisation and dropout
    # drew seed-0-derived numbers whatever seed it had set) and the graph is the same as with a plain reseed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
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
# next to them: the raw files (size, mtime) the zoo had PyG build the cache from, and the data.pt it got
_RAW_RECORD = "zoo_raw_files.json"
# PyG's record of how it built a cache: Dataset._process (torch_geometric/data/dataset.py) saves the repr of the
# pre_transform / pre_filter argument into these files, the string 'None' when none was given, and compares them
# with the arguments of a later Planetoid(...) call
_PYG_PREPROCESSING_RECORDS = {"pre_transform.pt": "pre_transform", "pre_filter.pt": "pre_filter"}


def _raw_files_record(paths: list[str]) -> dict:
    return {os.path.basename(p): [os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths}


def _file_stamp(path: str) -> Optional[list[int]]:
    """[size, mtime_ns] of a file, None when there is none."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return [found.st_size, found.st_mtime_ns]


def _cache_record(processed: str, raw_record: dict) -> dict:
    """What the adapter writes into zoo_raw_files.json after PyG built processed/data.pt from these raw files:
    a data.pt rebuilt since (by PyG with another pre_transform, force_reload=True) no longer matches it."""
    return {"raw": raw_record, "data.pt": _file_stamp(os.path.join(processed, "data.pt"))}


def _pyg_preprocessing(processed: str) -> Optional[str]:
    """How PyG built the cache in ``processed/`` when that is not the plain build the adapter reads ("with
    pre_transform=NormalizeFeatures()", ...), None for a plain build (both records 'None') or no cache at all. A
    data.pt without PyG's records, or a record that cannot be read, is reported too: nothing proves it plain."""
    has_data = os.path.isfile(os.path.join(processed, "data.pt"))
    found = []
    for record, argument in _PYG_PREPROCESSING_RECORDS.items():
        path = os.path.join(processed, record)
        if not os.path.isfile(path):
            if has_data:
                found.append(f"without {record} (PyG's record of its {argument})")
            continue
        try:
            used = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            found.append(f"with an unreadable {record} ({type(error).__name__})")
            continue
        if used != "None":
            shown = " ".join(str(used).split())  # Compose's repr spans lines
            found.append(f"with {argument}={shown[:120]}{'...' if len(shown) > 120 else ''}")
    return ", ".join(found) or None


def _planetoid_cache_state(processed: str, raw_record: dict, proper: str) -> str:
    """Whether PyG's Planetoid may read ``processed/``: PyG reuses processed/data.pt whatever the raw files hold
    now and whatever pre_transform / pre_filter built it, so the adapter decides first. It writes, and removes, only
    in a cache it built itself: one holding its record, zoo_raw_files.json.

    * ``"fresh"``: the zoo's cache, a plain build (PyG's records say no pre_transform / pre_filter) of the current
      raw files, as zoo_raw_files.json recorded them together with the data.pt that build wrote; PyG reads it.
    * ``"adopt"``: the zoo's cache with the record of an older zoo version (the raw files alone, {file: [size,
      mtime_ns]}), which the raw files still match, a plain build whose data.pt is not newer than that record (the
      older version wrote it after PyG's build): PyG reads it, and the record is rewritten in the current form.
    * ``"read"``: a plain cache the zoo did not build (no record: a PyG user's ``Planetoid(root, name)``, or a zoo
      from before the record) whose data.pt is newer than every raw file, PyG's own notion of a build of those
      files (PyG keeps such a cache): PyG reads it, and nothing is written into that folder.
    * ``"build"``: no cache (no data.pt), or the zoo's own cache that its record does not vouch for (the raw files
      changed since, or data.pt was rebuilt or replaced): PyG's cache files are removed and PyG builds them again,
      as PyG itself would without a pre_transform; the record is then written.
    * ``"bypass"``: a cache PyG built with a pre_transform or pre_filter (a PyG user's, in a shared data folder), a
      plain cache the zoo did not build that is older than a raw file, or the zoo's own cache that cannot be removed
      for a rebuild (a read-only folder): it is left as it is, and the raw files are parsed without a cache (one
      warning says what is on disk and what would have the cache used)."""
    built_with = _pyg_preprocessing(processed)
    if built_with is not None:
        warnings.warn(f"Planetoid {proper}: {processed} holds a cache PyG built {built_with}; leaving it as it is "
                      f"and reading the raw files without a cache", stacklevel=3)
        return "bypass"
    data_stamp = _file_stamp(os.path.join(processed, "data.pt"))
    if data_stamp is None:  # no cache: PyG builds one, the zoo's from then on
        return "build"
    record_path = os.path.join(processed, _RAW_RECORD)
    record_stamp = _file_stamp(record_path)
    if record_stamp is None:  # not the zoo's cache: read when current, never written
        newer = sorted(name for name, (_, mtime_ns) in raw_record.items() if mtime_ns >= data_stamp[1])
        if not newer:
            return "read"
        folder = os.path.basename(os.path.dirname(processed))
        shown = ", ".join(newer[:3]) + (f" and {len(newer) - 3} more" if len(newer) > 3 else "")
        warnings.warn(f"Planetoid {proper}: {processed} holds a cache built without the zoo (no {_RAW_RECORD}) "
                      f"before the raw file(s) {shown} last changed; leaving it as it is and reading the "
                      f"raw files without a cache (each run parses them again): rebuild it with PyG's "
                      f"Planetoid(root, {folder!r}, force_reload=True), or remove {processed} to have the zoo "
                      f"build its own cache", stacklevel=3)
        return "bypass"
    try:
        with open(record_path, encoding="utf-8") as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        recorded = None
    if recorded == _cache_record(processed, raw_record):
        return "fresh"
    older_format = isinstance(recorded, dict) and "raw" not in recorded
    if older_format and recorded == raw_record and data_stamp[1] <= record_stamp[1]:
        return "adopt"
    if recorded is None or not isinstance(recorded, dict):
        on_disk = f"its record {_RAW_RECORD} cannot be read"
    elif (recorded if older_format else recorded.get("raw")) != raw_record:
        on_disk = (f"the raw files changed since {_RAW_RECORD} recorded the build"
                   + (" (in an older zoo version's form)" if older_format else ""))
    else:
        on_disk = f"data.pt was rebuilt or replaced since {_RAW_RECORD} recorded the build"
    try:
        for name in _PLANETOID_CACHE_FILES:
            path = os.path.join(processed, name)
            if os.path.isfile(path):
                os.remove(path)
    except OSError as error:  # a read-only or shared data folder
        warnings.warn(f"Planetoid {proper}: cannot rebuild the zoo's cache in {processed} ({error.strerror}): "
                      f"{on_disk}; leaving it as it is and reading the raw files without a cache (each run parses "
                      f"them again): run the zoo once where {processed} can be written, or remove {processed}, to "
                      f"have the cache rebuilt", stacklevel=3)
        return "bypass"
    return "build"


def _write_raw_record(processed: str, record: dict) -> None:
    """zoo_raw_files.json written whole (a temporary file renamed over it); the temporary file is not left behind
    when the rename fails."""
    tmp = os.path.join(processed, f".{_RAW_RECORD}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f)
    try:
        os.replace(tmp, os.path.join(processed, _RAW_RECORD))
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


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


PLANETOID_SPLITS = ("public", "full", "random", "geom-gcn")
GEOM_GCN_SPLITS = 10  # the npz files of Pei et al. (graphdml-uiuc-jlu/geom-gcn, splits/), one per split


def _check_planetoid_split(prefix: str = "", split: str = "public", num_train_per_class: int = 20,
                           num_val: int = 500, num_test: int = 1000, geom_gcn_split: int = 0) -> None:
    """The split options of :func:`planetoid`, named (``prefix``: "data." from the data module)."""
    if split not in PLANETOID_SPLITS:
        raise ValueError(f"{prefix}split must be one of {', '.join(PLANETOID_SPLITS)} (PyG Planetoid's splits), got "
                         f"{split!r}")
    if not is_int(geom_gcn_split) or not 0 <= geom_gcn_split < GEOM_GCN_SPLITS:
        raise ValueError(f"{prefix}geom_gcn_split must be an integer in [0, {GEOM_GCN_SPLITS}) (which of the ten "
                         f"geom-gcn splits a run trains on), got {geom_gcn_split!r}")
    for key, value, least in (("num_train_per_class", num_train_per_class, 1), ("num_val", num_val, 0),
                              ("num_test", num_test, 0)):
        if not is_int(value) or value < least:
            raise ValueError(f"{prefix}{key} must be an integer >= {least} (the random split's sizes), got {value!r}")


def planetoid_split_masks(y: Tensor, train: Tensor, val: Tensor, test: Tensor, split: str = "public",
                          num_train_per_class: int = 20, num_val: int = 500, num_test: int = 1000,
                          seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """The train / val / test masks of PyG's ``Planetoid(split=...)`` (torch_geometric/datasets/planetoid.py) from
    the public ones (``train``, ``val``, ``test``, as the raw files give them):

    * ``"public"`` -- the public split (Yang et al., ICML 2016): returned as they are;
    * ``"full"`` -- every node outside the public validation and test sets trains (the setup of FastGCN, Chen et
      al., ICLR 2018);
    * ``"random"`` -- ``num_train_per_class`` random nodes of each class (all of a smaller class), then
      ``num_val`` and ``num_test`` random nodes of the others (fewer when fewer remain); the other nodes are in
      no split. PyG draws from the global generator; here a generator seeded with ``seed``, whose draws are those
      of PyG's after ``torch.manual_seed(seed)``, so a run's split follows its data.seed and the caller's random
      stream is untouched.
    New tensors; the inputs are left as they are."""
    _check_planetoid_split("", split, num_train_per_class, num_val, num_test)
    if split == "geom-gcn":
        raise ValueError("planetoid_split_masks: the geom-gcn masks are not drawn from the public ones; they are read "
                         "from their split files: planetoid(name, root, split='geom-gcn', geom_gcn_split=i)")
    if split == "public":
        return train.clone(), val.clone(), test.clone()
    if split == "full":
        return ~(val | test), val.clone(), test.clone()
    generator = torch.Generator().manual_seed(int(seed))
    train = torch.zeros_like(train)
    for label in range(int(y.max()) + 1):
        members = (y == label).nonzero().view(-1)
        train[members[torch.randperm(members.numel(), generator=generator)[:num_train_per_class]]] = True
    others = (~train).nonzero().view(-1)
    others = others[torch.randperm(others.numel(), generator=generator)]
    val, test = torch.zeros_like(train), torch.zeros_like(train)
    val[others[:num_val]] = True
    test[others[num_val:num_val + num_test]] = True
    return train, val, test


def planetoid(name: str, root: str, split: str = "public", num_train_per_class: int = 20, num_val: int = 500,
              num_test: int = 1000, seed: int = 0, geom_gcn_split: int = 0) -> dict:
    """Planetoid (Cora, CiteSeer, PubMed) from ``root`` (no download; ``~`` expanded, as PyG's Dataset does), with
    PyG's ``split`` "public" (default), "full" or "random" (:func:`planetoid_split_masks`, ``seed`` drawing the
    random one), or "geom-gcn" (:func:`_planetoid_geom_gcn`: split ``geom_gcn_split`` of the ten). The cache in
    ``<Name>/processed/`` is the public split's whatever ``split``, as PyG's."""
    _check_planetoid_split("", split, num_train_per_class, num_val, num_test, geom_gcn_split)
    key = name.lower()
    if key not in PLANETOID:
        raise ValueError(f"unknown Planetoid dataset {name!r}; choose one of {sorted(PLANETOID.values())}")
    if not root:
        raise ValueError("planetoid needs data.root: a folder holding <Name>/raw/ind.<name>.*")
    root = os.path.expanduser(os.fspath(root))
    if split == "geom-gcn":
        return _planetoid_geom_gcn(root, name, int(geom_gcn_split))
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
    from torch_geometric.io import read_planetoid_data

    processed = os.path.join(folder, "processed")
    record = _raw_files_record(needed)
    state = _planetoid_cache_state(processed, record, proper)
    try:
        try:
            # "bypass": PyG's own parser (what Planetoid.process calls before any pre_transform) writes nothing
            d = (read_planetoid_data(raw, key) if state == "bypass"
                 else Planetoid(root, os.path.basename(folder))[0])
        except OSError as error:
            if not _is_permission_error(error):
                raise
            d = _read_planetoid_without_cache(raw, key, proper, processed, error)
            state = "bypass"  # nothing was cached: no record to write
        except Exception as error:
            if state != "read":
                raise
            # a cache the zoo did not build that PyG cannot load (another PyG version's format, a broken file): it
            # is not the zoo's to remove, and the raw files are what it should hold
            warnings.warn(f"Planetoid {proper}: PyG cannot load the cache in {processed} ({type(error).__name__}: "
                          f"{(str(error).strip().splitlines() or [''])[0][:160]}); leaving it as it is and reading "
                          f"the raw files without a cache", stacklevel=2)
            d = read_planetoid_data(raw, key)
    except PermissionError:  # an unreadable raw file, named by _read_planetoid_without_cache
        raise
    except Exception as error:  # PyG unpickles the raw files: a truncated or foreign file fails deep inside
        raise ValueError(f"Planetoid {proper}: cannot read the raw files under {raw} (corrupt or not the "
                         f"Planetoid release?): {type(error).__name__}: {str(error)[:200]}") from None
    # the zoo's cache, built or adopted: recorded when the raw files did not change while PyG read them
    if state in ("build", "adopt") and _raw_files_record(needed) == record:
        try:
            _write_raw_record(processed, _cache_record(processed, record))
        except OSError:  # read-only: the next run checks again
            pass
    masks = planetoid_split_masks(d.y, d.train_mask, d.val_mask, d.test_mask, split, num_train_per_class, num_val,
                                  num_test, seed)
    return _pack(f"planetoid:{proper}", d.x, d.edge_index, d.y, *masks)


def _planetoid_geom_gcn(root: str, name: str, index: int) -> dict:
    """Planetoid with split ``index`` of the ten 60/20/20 splits of Geom-GCN (Pei et al., ICLR 2020), as PyG's
    ``Planetoid(root, name, split="geom-gcn")`` reads them (torch_geometric/datasets/planetoid.py: raw files in
    ``<Name>/geom-gcn/raw/``, the graph by ``read_planetoid_data``, the masks from
    ``<name>_split_0.6_0.2_<i>.npz``; PyG stacks the ten into [N, 10] masks, a run here takes column ``index``).
    The ind.<name>.* files are read from ``geom-gcn/raw/`` or, when absent there, from ``raw/`` (the same files).
    Parsed without a cache (no processed/ folder is written)."""
    from torch_geometric.io import read_planetoid_data

    key, proper = name.lower(), PLANETOID[name.lower()]
    split_file = f"{key}_split_0.6_0.2_{index}.npz"
    candidates = list(dict.fromkeys(os.path.join(root, folder) for folder in (proper, name, key)))

    def graph_dir(folder: str) -> Optional[str]:
        for raw in (os.path.join(folder, "geom-gcn", "raw"), os.path.join(folder, "raw")):
            if all(os.path.isfile(os.path.join(raw, f"ind.{key}.{s}")) for s in _PLANETOID_SUFFIXES):
                return raw
        return None

    found = [(c, graph) for c in candidates if os.path.isfile(os.path.join(c, "geom-gcn", "raw", split_file))
             and (graph := graph_dir(c)) is not None]  # (folder, where its ind.* files are)
    if not found:
        folder = next((c for c in candidates if os.path.isdir(c)), candidates[0])
        geom_raw = os.path.join(folder, "geom-gcn", "raw")
        missing = [os.path.join(geom_raw, split_file)] if not os.path.isfile(os.path.join(geom_raw, split_file)) else []
        if graph_dir(folder) is None:
            missing += [os.path.join(geom_raw, f"ind.{key}.{s}") for s in _PLANETOID_SUFFIXES]
        raise FileNotFoundError(
            f"Planetoid {proper} split=geom-gcn: missing (downloads are disabled): {', '.join(missing)}. The split "
            f"files come from https://github.com/graphdml-uiuc-jlu/geom-gcn (splits/{key}_split_0.6_0.2_<0..9>.npz), "
            f"the ind.{key}.* files from https://github.com/kimiyoung/planetoid (data/; {os.path.join(folder, 'raw')} "
            f"is read too); PyG's Planetoid(split='geom-gcn') keeps them all in {geom_raw}")
    folder, graph = found[0]
    split_path = os.path.join(folder, "geom-gcn", "raw", split_file)
    try:
        d = read_planetoid_data(graph, key)
        with np.load(split_path) as splits:
            masks = [torch.from_numpy(np.asarray(splits[f"{part}_mask"])) for part in ("train", "val", "test")]
    except Exception as error:  # a truncated or foreign file fails deep inside pickle / numpy
        raise ValueError(f"Planetoid {proper} split=geom-gcn: cannot read {graph} / {split_path}: "
                         f"{type(error).__name__}: {str(error)[:200]}") from None
    n = d.y.numel()
    for part, mask in zip(("train", "val", "test"), masks):
        if mask.shape != (n,):
            raise ValueError(f"Planetoid {proper} split=geom-gcn: {split_path} holds a {part}_mask of shape "
                             f"{tuple(mask.shape)} for a graph of {n} nodes (a split file of another dataset?)")
    return _pack(f"planetoid:{proper}", d.x, d.edge_index, d.y, *(mask.bool() for mask in masks))


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


def _missing_split_scheme(split_root: str, split: Optional[str]) -> Optional[str]:
    """Why ``split/<scheme>/`` is absent when ``split/`` itself exists, naming what it holds instead: the scheme
    folders there (``data.split`` names another, e.g. ogbn-arxiv's ``time``), or the split files directly, without
    the scheme folder of OGB's layout (split/<scheme>/{train,valid,test}.csv.gz). None when there is nothing to say
    (the scheme folder exists, or split/ is missing too: an incomplete unzip, reported with the missing files)."""
    if not os.path.isdir(split_root) or (split is not None and os.path.isdir(os.path.join(split_root, split))):
        return None
    schemes = _split_schemes(split_root)
    if schemes:  # split is not None here: without data.split the first scheme is taken
        listed = ", ".join(schemes)
        return (f"data.split={split}: no folder {os.path.join(split_root, split)}; the split schemes under "
                f"{split_root} are: {listed} (data.split={schemes[0]}, or data.split=null for the first)")
    loose = sorted(e for e in os.listdir(split_root) if e.endswith(".csv.gz"))
    if loose:
        return (f"{split_root} holds {', '.join(loose)} directly, without a split-scheme folder: OGB's layout is "
                f"split/<scheme>/{{train,valid,test}}.csv.gz: move them into a folder named for the scheme "
                f"({os.path.join(split_root, '<scheme>')}/; ogbn-arxiv's is time), then data.split=<scheme> or "
                "data.split=null reads them")
    return None


def _unlabelled_and_not_integral(values: Tensor) -> tuple[Tensor, Tensor]:
    """The one rule for class labels read from files (OGB's node-label.csv.gz, zoo predict's node and graph files):
    NaN or -1 marks an unlabelled item. Returns two masks over ``values`` (flattened): unlabelled, and labelled but
    not an integer (infinite or fractional); what else counts as bad (other negatives, classes the model lacks) is
    the caller's to say."""
    values = values.view(-1)
    if not values.is_floating_point():  # integer labels: only -1 can be unlabelled, nothing is fractional
        # compared as int64: a uint8 255 is a class (uint8 == -1 wraps -1 to 255)
        return values.long() == -1, torch.zeros_like(values, dtype=torch.bool)
    unlabelled = torch.isnan(values) | (values == -1)
    return unlabelled, ~unlabelled & (~torch.isfinite(values) | (values != values.round()))


def _ogb_labels(path: str, values: Tensor) -> tuple[Tensor, Tensor]:
    """(labels as int64, labelled mask) of node-label.csv.gz: integers >= 0, NaN or -1 for an unlabelled node
    (_unlabelled_and_not_integral). A fractional or other negative value (a regression target, a wrong column) is
    refused, not truncated."""
    unlabelled, not_integral = _unlabelled_and_not_integral(values)
    bad = values[not_integral | (~unlabelled & (values < 0))]  # the first in file order
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
    scheme_problem = _missing_split_scheme(split_root, split)
    if scheme_problem is not None and not any(p in missing for p in needed[:3]):  # the raw files are all there
        raise FileNotFoundError(f"OGB {name}: {scheme_problem}")
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
    data = _pack(f"ogb:{name}", x, _undirected(edges), y, *masks)
    # y holds 0 for an unlabelled node (the split masks leave those out, so training never reads it); which nodes
    # those are stays here, so that ``zoo predict input=nodes:...`` shows them without a label, as a node file
    # with y = -1 / NaN (tasks/graph/predict.py)
    data["labelled_mask"] = labelled
    return data


# Lightning's stages that run a model already trained (trainer.validate / test / predict: zoo eval, zoo predict); the
# data modules' setup(stage) gets one of these, or "fit" (zoo train)
_EVALUATION_STAGES = ("validate", "test", "predict")


def _check_sizes(data: str, expected: dict, found: dict, stage: Optional[str]) -> None:
    """Refuse data whose num_features / num_classes (``found``) differ from the sizes the model was built with
    (``expected``, None = not given): in Lightning's evaluation stages with :func:`_trained_model_mismatch`'s
    wording, in fit (zoo train) naming the value to set."""
    for key, want in expected.items():
        if want is not None and int(want) != found[key]:
            if stage in _EVALUATION_STAGES:  # zoo eval: the sizes are the trained model's, not settings
                raise ValueError(_trained_model_mismatch(data, key, found[key], want))
            raise ValueError(f"{data} has {key}={found[key]} but the config says {want} (set data.{key}={found[key]})")


def _trained_model_mismatch(data: str, key: str, found: int, want: int) -> str:
    """The message for data of another size than the model being evaluated (``zoo eval ckpt=... data.name=sbm``):
    its data.num_features / data.num_classes were fixed when it was trained, so setting them (zoo train's advice)
    cannot help. Worded as ``zoo viz graph`` and ``zoo predict`` word a checkpoint fed data of another width."""
    what = {"num_features": "node features", "num_classes": "classes"}.get(key, key)
    verb = "reads" if key == "num_features" else "scores"
    return (f"{data} has {found} {what} ({key}={found}), but the model being evaluated {verb} {want}: it was trained "
            f"with data.{key}={want}, which the checkpoint fixes; evaluate it on data with {want} {what} (leave the "
            f"data overrides out for the data it was trained on)")


# NodeDataModule's mini-batch keys: they change how the training loader batches the graph, not the graph, so
# load_node_dataset ignores them (``zoo viz graph ckpt=`` passes every recorded data option on)
_TRAINING_LOADER_KEYS = ("batch_size", "num_neighbors", "replace", "inference_batch_size")


def load_node_dataset(name: str, root: Optional[str] = None, seed: int = 0, normalize_features: bool = False,
                      **kwargs) -> dict:
    """Dispatch on ``name`` (see the module docstring); ``normalize_features``: the rows of x summing to 1
    (:func:`normalize_feature_rows`, PyG's NormalizeFeatures). Here rather than in the data module alone, so that
    ``zoo viz graph ckpt=`` (which passes the recorded data options on) feeds a model the features it trained on.
    ``batch_size`` / ``num_neighbors`` / ``replace`` / ``inference_batch_size`` (how NodeDataModule batches the graph)
    are accepted and ignored."""
    for key in _TRAINING_LOADER_KEYS:  # how the training loader batches the graph (NodeDataModule), not the graph
        kwargs.pop(key, None)
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
        return planetoid(name.split(":", 1)[1], root, seed=seed, **kwargs)
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
    """Disjoint union of small graphs: x, edge_index (offset), batch [N], num_graphs, y [G], and edge_attr [E, D]
    when the graphs carry edge features (every graph the same width: the model's edge_dim)."""
    xs, eis, batch, offset = [], [], [], 0
    for i, g in enumerate(graphs):
        xs.append(g["x"])
        eis.append(g["edge_index"] + offset)
        batch.append(torch.full((g["x"].size(0),), i, dtype=torch.long))
        offset += g["x"].size(0)
    out = {"x": torch.cat(xs), "edge_index": torch.cat(eis, 1), "batch": torch.cat(batch),
           "num_graphs": len(graphs), "y": torch.tensor([g["y"] for g in graphs], dtype=torch.long)}
    if _check_edge_features(graphs, "graph edge features"):
        out["edge_attr"] = torch.cat([g["edge_attr"] for g in graphs])
    return out


def _check_edge_features(graphs: list[dict], where: str) -> bool:
    """Whether the graphs carry edge features: every one of them ``edge_attr`` of one width (the model's edge_dim),
    or none; anything else refused, naming ``where``. Checked when user data is read (load_graph_classification)
    and again by collate_graphs for graphs collated directly."""
    with_attr = sum("edge_attr" in g for g in graphs)
    widths = sorted({g["edge_attr"].size(1) for g in graphs if "edge_attr" in g})
    if with_attr not in (0, len(graphs)) or len(widths) > 1:
        raise ValueError(f"{where}: {with_attr} of {len(graphs)} graphs have edge features edge_attr, of widths "
                         f"{widths}; every graph needs edge_attr of one width (the model's edge_dim), or none")
    return with_attr > 0


# ------------------------------------------------------------------------------ graph classification: user data
# TU's required raw files (PyG's read_tu_data): the edge list, the graph of each node, the class of each graph
_TU_REQUIRED = ("A", "graph_indicator", "graph_labels")
_TU_DOWNLOADS = "https://chrsmrrs.github.io/datasets/docs/datasets/"
# one-hot degree features are at most this wide unless data.max_degree says otherwise (PyG's
# benchmark/kernel/datasets.py one-hot encodes degrees below 1000 and normalises larger ones)
_DEGREE_CAP = 1000
_SPLITS = ("train", "val", "test")


def tu_dataset(name: str, root: str, use_node_attr: bool = False) -> list[dict]:
    """A TU graph-classification data set (Morris et al. 2020, https://chrsmrrs.github.io/datasets/) from the raw
    text files PyG's ``TUDataset(root, name)`` reads, ``<root>/<name>/raw/<name>_{A,graph_indicator,graph_labels,
    node_labels,node_attributes}.txt``, parsed by PyG's own ``torch_geometric.io.read_tu_data``. Nothing is
    downloaded or written (TUDataset caches the parsed set in ``<root>/<name>/processed/`` and reuses it whatever
    the raw files hold later). The node features are TUDataset's: the one-hot node labels, after the continuous
    node attributes only with ``use_node_attr`` (TUDataset's default leaves them out); edge features are not read.
    Graphs with regression targets (``<name>_graph_attributes.txt``) are refused: this is graph classification."""
    if not root:
        raise ValueError(f"TU {name}: data.root is required, a folder holding {name}/raw/{name}_A.txt, ...")
    raw = os.path.join(os.path.expanduser(os.fspath(root)), name, "raw")
    unzipped = os.path.join(raw, name)  # a TU zip holds a top-level <name>/ folder: unzipped into raw/, it is here
    if not os.path.isfile(os.path.join(raw, f"{name}_A.txt")) and os.path.isfile(os.path.join(unzipped, f"{name}_A.txt")):
        raw = unzipped
    needed = [os.path.join(raw, f"{name}_{part}.txt") for part in _TU_REQUIRED]
    missing = [p for p in needed if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"TU {name}: {len(missing)} raw file(s) missing under {raw} (downloads are disabled): "
            + ", ".join(missing) + f". Get {name}.zip from {_TU_DOWNLOADS} and put the {name}_*.txt files it holds "
            f"into {raw}/ (the layout of PyG's TUDataset)")
    if os.path.isfile(os.path.join(raw, f"{name}_graph_attributes.txt")):
        raise ValueError(f"TU {name}: {raw} holds {name}_graph_attributes.txt, regression targets; graph "
                         "classification reads class labels (<name>_graph_labels.txt) only")
    from torch_geometric.io import read_tu_data

    try:
        data, slices, sizes = read_tu_data(raw, name)
    except Exception as error:  # a truncated or foreign file fails deep inside PyG's parser
        _check_tu_node_rows(raw, name)  # node_labels and node_attributes of different lengths fail in its torch.cat
        raise ValueError(f"TU {name}: cannot read the raw files under {raw} (corrupt, or not TU's comma-separated "
                         f"text?): {type(error).__name__}: {str(error)[:200]}") from None
    if data.x is not None and data.x.size(0) != int(slices["x"][-1]):
        _check_tu_node_rows(raw, name)  # names the file; slicing x per graph would silently cut (or drop) rows
        raise ValueError(f"TU {name}: the node files under {raw} give {data.x.size(0)} feature rows but "
                         f"{name}_graph_indicator.txt lists {int(slices['x'][-1])} nodes (one row per node)")
    x = data.x
    if x is not None and not use_node_attr:  # TUDataset(use_node_attr=False): the node labels only
        x = x[:, sizes["num_node_attributes"]:]
        x = x if x.size(1) else None
    node_slice = slices.get("x")
    if node_slice is None:  # no node features: the node count of each graph from its graph_indicator rows
        graph_of_node = np.loadtxt(needed[1], dtype=np.int64, delimiter=",", ndmin=1) - 1
        node_slice = torch.from_numpy(np.concatenate([[0], np.cumsum(np.bincount(graph_of_node))]))
    edge_slice = slices["edge_index"]
    # PyG's read_tu_data counts each graph's edges with bincount (no minlength): graphs without edges at the end of
    # the files (a one-node graph, or self loops only, which it removes) have no slice entry, and TUDataset drops
    # them silently. Every graph of graph_labels.txt is kept here, with no edges.
    num_graphs = int(data.y.numel())
    if len(edge_slice) < num_graphs + 1:
        edge_slice = torch.cat([edge_slice, edge_slice[-1:].expand(num_graphs + 1 - len(edge_slice))])
    if len(node_slice) != num_graphs + 1:  # fewer: the last graphs have no node; more: graphs without a label
        found = len(node_slice) - 1
        which = f"graph {num_graphs} has" if found + 1 == num_graphs else f"graphs {found + 1}..{num_graphs} have"
        why = (f"{which} a label but no node (graphs numbered from 1) in "
               f"{name}_graph_indicator.txt, whose highest graph id is {found}: a truncated file, or graphs without "
               "nodes at the end" if found < num_graphs else
               f"{name}_graph_indicator.txt names graphs up to {found}: one label per graph")
        raise ValueError(f"TU {name}: {num_graphs} graph labels in {name}_graph_labels.txt but nodes for {found} "
                         f"graphs in {name}_graph_indicator.txt; {why}")
    graphs = []
    for i in range(num_graphs):
        graphs.append({"x": None if x is None else x[node_slice[i]:node_slice[i + 1]].float(),
                       "num_nodes": int(node_slice[i + 1] - node_slice[i]),
                       "edge_index": data.edge_index[:, edge_slice[i]:edge_slice[i + 1]].long(),
                       "y": int(data.y[i])})
    return graphs


def _check_tu_node_rows(raw: str, name: str) -> None:
    """One row per node: ``<name>_node_labels.txt`` and ``<name>_node_attributes.txt`` must have as many rows as
    ``<name>_graph_indicator.txt`` (TU's format, https://chrsmrrs.github.io/datasets/docs/format/). PyG's
    read_tu_data does not compare them: a shorter file gave the last graph fewer x rows than its nodes, read without
    a word (PyG's TUDataset fails later, when that graph is sliced: "start (48) + length (5) exceeds dimension
    size (51)"), and a longer one had its extra rows ignored. A file of another length is named with both counts.
    The rows are counted as PyG's read_txt_array reads them (lines ending in a newline)."""
    from torch_geometric.io import read_txt_array

    def rows(part: str) -> int:
        values = read_txt_array(os.path.join(raw, f"{name}_{part}.txt"), sep=",")
        return int(values.size(0)) if values.dim() else 1  # one row of one value squeezes to a 0-d tensor

    try:
        num_nodes = rows("graph_indicator")
        counts = {part: rows(part) for part in ("node_labels", "node_attributes")
                  if os.path.isfile(os.path.join(raw, f"{name}_{part}.txt"))}
    except (OSError, ValueError, RuntimeError):  # a file that does not parse: the caller's message says so
        return
    for part, count in counts.items():
        if count != num_nodes:
            raise ValueError(f"TU {name}: {name}_{part}.txt has {count} rows but {name}_graph_indicator.txt lists "
                             f"{num_nodes} nodes (one row per node, in the same order): the files under {raw} do "
                             "not belong together (a truncated or edited file?)")


def _pyg_data_globals() -> list:
    """The classes a pickled list of PyG ``Data`` objects names beyond those PyG registers for
    ``torch.load(weights_only=True)`` itself (torch_geometric/data/__init__.py adds ``Data`` only): its storage
    and attribute descriptors. Loaded with them, a list of Data (tensors, numbers, strings) needs no pickle."""
    from torch_geometric.data import Data
    from torch_geometric.data.data import DataEdgeAttr, DataTensorAttr
    from torch_geometric.data.storage import GlobalStorage

    return [Data, DataEdgeAttr, DataTensorAttr, GlobalStorage]


def _allowing_pyg_data():
    """``torch.serialization.safe_globals`` for those of :func:`_pyg_data_globals` not allowed already. On exit
    that context manager removes every class it was given (torch/_weights_only_unpickler.py, _safe_globals): given
    ``Data``, it dropped PyG's own registration of it (torch_geometric/data/__init__.py), after which PyG's loaders
    (torch_geometric/io/fs.py, torch_load: a Planetoid cache's data.pt) warned and loaded with weights_only=False
    for the rest of the process."""
    allowed = torch.serialization.get_safe_globals()
    return torch.serialization.safe_globals([cls for cls in _pyg_data_globals() if cls not in allowed])


def load_saved_graphs(path: str, trust_pickle: bool = False):
    """What ``torch.save`` wrote to ``path``: a list of PyG ``Data`` graphs, or a dict of such lists under
    "train", "val" and "test" (the data's own split). Loaded with ``weights_only=True`` (PyG's Data classes
    allowed), which runs no code from the file; anything else (a Data subclass of the user's, a whole
    InMemoryDataset object) is unpickled only with ``trust_pickle``, as ``torch.load(weights_only=False)``
    executes what the file says."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.path={path}: no such file; save your graphs there with "
                                "torch.save([Data(x=..., edge_index=..., y=...), ...], path)")
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    import pickle

    try:
        with _allowing_pyg_data():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            unsafe = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path)) or "other objects"
        except Exception:  # an old-format or non-zip file: say what is known
            unsafe = "objects that need pickle"
        raise ValueError(f"data.path={path} holds {unsafe} beside PyG's Data, which torch.load(weights_only=True) "
                         "does not build: save a plain list of Data (torch.save(list(dataset), path)), or set "
                         "data.trust_pickle=true if you trust the file (unpickling runs its code)") from None


def _import_class(class_path: str):
    import importlib

    module_name, _, attr = str(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"data.dataset_class={class_path!r} cannot be imported ({error}; a module of yours must be "
                         f"on the path: install it, or run with PYTHONPATH=<its folder>); give an importable "
                         "InMemoryDataset class as <package>.<module>.<Class>") from None


def dataset_class_graphs(class_path: str, root: Optional[str] = None, name: Optional[str] = None):
    """A PyG ``InMemoryDataset`` (or any sequence of ``Data``) class of the user's, built as ``Class(root)`` (or
    ``Class()`` without data.root). A class with a ``name`` parameter (PyG's TUDataset, MoleculeNet,
    GNNBenchmarkDataset: ``Class(root, name, ...)``) gets ``name=`` data.name; one whose ``name`` has no default
    is refused without a data.name (``None``, empty, or "synthetic", the synthetic set's). A class with a
    ``split`` argument (PyG's ZINC, GNNBenchmarkDataset) is built once per split, ``Class(root, split="train" /
    "val" / "test")``, and its own split kept. The class reads what its root holds; PyG datasets download only
    when their raw files are missing there."""
    import inspect

    cls = _import_class(class_path)
    args = (os.path.expanduser(os.fspath(root)),) if root else ()
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        parameters = {}
    kwargs = {}
    if "name" in parameters:
        given = name is not None and str(name) not in ("", "synthetic")
        if given:
            kwargs["name"] = str(name)
        elif parameters["name"].default is inspect.Parameter.empty:
            raise ValueError(f"data.dataset_class={class_path} needs a data set name ({cls.__name__}(root, name, "
                             f"...)): set data.name=<its name> (e.g. data.name=MUTAG for PyG's TUDataset)")
    if "split" in parameters:
        return {split: cls(*args, split=split, **kwargs) for split in _SPLITS}
    return cls(*args, **kwargs)


def _check_edge_index(edge_index, where: str) -> None:
    """``edge_index`` must be an integer tensor [2, num_edges] (PyG's layout: sources, then targets). What is wrong
    is named: the dtype of a float, bool or complex tensor (a float [2, E] was reported as a wrong shape, printing
    the right one), the shape only when it is not [2, num_edges], the type of anything that is not a tensor."""
    if not isinstance(edge_index, Tensor):
        got = "none" if edge_index is None else f"a {type(edge_index).__name__}"
        raise ValueError(f"{where}: edge_index must be an integer tensor of shape [2, num_edges], got {got}")
    integer = not (edge_index.is_floating_point() or edge_index.is_complex() or edge_index.dtype == torch.bool)
    shaped = edge_index.dim() == 2 and edge_index.size(0) == 2
    if shaped and not integer:
        raise ValueError(f"{where}: edge_index must hold integer node indices, got dtype {edge_index.dtype}: save "
                         "it as torch.long (edge_index.long())")
    if not shaped:
        dtype = "" if integer else f", dtype {edge_index.dtype} (it must be an integer dtype, e.g. torch.long)"
        raise ValueError(f"{where}: edge_index must be of shape [2, num_edges] (row 0 sources, row 1 targets), got "
                         f"shape {tuple(edge_index.shape)}{dtype}")


def _as_graph(data, where: str) -> dict:
    """A PyG ``Data`` (or a dict with the same keys) as the dict collate_graphs batches; one integer class per
    graph, edge indices inside the graph's nodes."""
    get = data.get if isinstance(data, dict) else (lambda key: getattr(data, key, None))
    edge_index, x, y = get("edge_index"), get("x"), get("y")
    _check_edge_index(edge_index, where)
    num_nodes = x.size(0) if isinstance(x, Tensor) else get("num_nodes")
    if num_nodes is None:
        num_nodes = int(edge_index.max()) + 1 if edge_index.numel() else 0
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes):
        raise ValueError(f"{where}: edge_index holds node {int(edge_index.max())} but the graph has {num_nodes} "
                         "nodes (x rows or num_nodes)")
    if isinstance(x, Tensor) and x.dim() != 2:
        raise ValueError(f"{where}: x must be [num_nodes, num_features], got shape {tuple(x.shape)}")
    label = y.view(-1) if isinstance(y, Tensor) else torch.tensor([y] if y is not None else [])
    if label.numel() != 1 or label.is_floating_point() and label != label.round() or int(label) < 0:
        raise ValueError(f"{where}: y must be one class index >= 0 per graph (graph classification), got "
                         f"{y if not isinstance(y, Tensor) or y.numel() < 5 else tuple(y.shape)}")
    graph = {"x": x.float() if isinstance(x, Tensor) else None, "num_nodes": int(num_nodes),
             "edge_index": edge_index.long(), "y": int(label)}
    edge_attr = get("edge_attr")
    if isinstance(edge_attr, Tensor):  # edge features (the classifiers' edge_dim), one row per edge
        graph["edge_attr"] = _per_edge_features(edge_attr, edge_index, where)
    return graph


def _per_edge_features(edge_attr: Tensor, edge_index: Tensor, where: str) -> Tensor:
    """edge_attr as float [num_edges, edge_dim], one row per edge_index column (1-D: one feature per edge); any
    other shape refused, naming ``where`` (zoo predict's node files too: there another row count crashed in view(),
    or, when the values divided evenly, was silently cut into other rows)."""
    num_edges = edge_index.size(1)
    rows = edge_attr.view(-1, 1) if edge_attr.dim() == 1 else edge_attr
    if rows.dim() != 2 or rows.size(0) != num_edges:
        raise ValueError(f"{where}: edge_attr must be [num_edges, edge_dim] with one row per edge_index column "
                         f"({num_edges}), got shape {tuple(edge_attr.shape)}")
    return rows.float()


def one_hot_degree(graph: dict, max_degree: int) -> Tensor:
    """PyG's ``T.OneHotDegree(max_degree)`` (torch_geometric/transforms/one_hot_degree.py): each node's number of
    outgoing edges (edge_index[0]) one-hot over 0..max_degree, which PyG's TU examples use as the features of
    graphs without any; here a degree above ``max_degree`` counts as ``max_degree`` (capped) where PyG's one_hot
    would fail."""
    degree = torch.bincount(graph["edge_index"][0], minlength=graph["num_nodes"])
    return torch.nn.functional.one_hot(degree.clamp(max=max_degree), max_degree + 1).float()


def stratified_graph_split(labels: list[int], seed: int = 0) -> dict[str, list[int]]:
    """Graph indices of train / val / test, 70 / 15 / 15 as the synthetic set (:func:`_graph_split_sizes`) and
    stratified: each class's graphs are shuffled with ``seed`` and spread evenly over one ordering of all graphs
    (the i-th of a class's n graphs at (i + 0.5) / n, ties in a random order), which is cut into validation, test
    and training graphs. So every split holds the classes in about the data's proportions, and a small data set
    (4 graphs and up) still has a graph in each split, where cutting each class apart left small classes out."""
    g = torch.Generator().manual_seed(int(seed))
    labels_t = torch.tensor(labels, dtype=torch.long)
    position = torch.empty(labels_t.numel(), dtype=torch.float64)
    for c in torch.unique(labels_t):
        idx = (labels_t == c).nonzero().view(-1)
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        position[idx] = (torch.arange(idx.numel(), dtype=torch.float64) + 0.5) / idx.numel()
    tie_break = torch.randperm(labels_t.numel(), generator=g)
    order = sorted(range(labels_t.numel()), key=lambda i: (float(position[i]), int(tie_break[i])))
    num_train, num_val, _ = _graph_split_sizes(len(order))
    return {"val": sorted(order[:num_val]), "test": sorted(order[num_val:len(order) - num_train]),
            "train": sorted(order[len(order) - num_train:])}


def _graph_source(name: str, root, path, dataset_class) -> str:
    """Which graph-classification data the options name: "synthetic", "file", "class" or "tu"."""
    given = [key for key, value in (("data.path", path), ("data.dataset_class", dataset_class)) if value]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} are both set: give one source of graphs")
    if given:
        return {"data.path": "file", "data.dataset_class": "class"}[given[0]]
    if name == "synthetic" and not root:
        return "synthetic"
    if not name or name == "synthetic":
        raise ValueError(f"data.root={root} is set but data.name is {name!r}: name the TU data set under it "
                         "(data.name=MUTAG reads <root>/MUTAG/raw/MUTAG_A.txt, ...)")
    return "tu"


def load_graph_classification(name: str = "synthetic", root: Optional[str] = None, path: Optional[str] = None,
                              dataset_class: Optional[str] = None, trust_pickle: bool = False,
                              use_node_attr: bool = False, max_degree: Optional[int] = None, seed: int = 0) -> dict:
    """Graph-classification data from the user's files as {"train", "val", "test": lists of graph dicts (x,
    edge_index, y), "num_features", "num_classes"}: a TU data set under ``root`` (``name``), a torch.save'd list
    of Data (``path``) or an InMemoryDataset class (``dataset_class``). Without a split of the data's own, a
    stratified one (:func:`stratified_graph_split`, seeded). Graphs without ``x`` get one-hot degree features
    (:func:`one_hot_degree`) over 0..``max_degree`` (default: the largest degree in the data, at most 1000); the
    degree cap used is returned as ``"degree_features"`` (None when the graphs had their own x), which the weights
    record (GraphClassificationDataModule.describe). The class count is the largest label + 1 (PyG's
    ``InMemoryDataset.num_classes``)."""
    source = _graph_source(name, root, path, dataset_class)
    if source == "tu":
        raw, where = tu_dataset(name, root, use_node_attr), f"TU {name}"
    elif source == "file":
        raw, where = load_saved_graphs(path, trust_pickle), f"data.path={path}"
    elif source == "class":
        raw, where = dataset_class_graphs(dataset_class, root, name), f"data.dataset_class={dataset_class}"
    else:
        raise ValueError("load_graph_classification reads the user's graphs; the synthetic set is "
                         "synthetic_graph_classification()")
    if isinstance(raw, dict):  # the data's own split
        unknown = sorted(set(raw) - set(_SPLITS))
        if unknown or any(split not in raw for split in _SPLITS):
            raise ValueError(f"{where}: a dict of graphs needs exactly the keys train, val and test (lists of Data), "
                             f"got {sorted(raw)}")
        splits = {split: [_as_graph(d, f"{where} {split}[{i}]") for i, d in enumerate(raw[split])]
                  for split in _SPLITS}
    else:
        try:
            graphs = [_as_graph(d, f"{where} [{i}]") for i, d in enumerate(raw)]
        except TypeError:
            raise ValueError(f"{where}: expected a list of torch_geometric.data.Data graphs (or a dict of such lists "
                             f"under train / val / test), got {type(raw).__name__}") from None
        parts = stratified_graph_split([g["y"] for g in graphs], seed)
        splits = {split: [graphs[i] for i in parts[split]] for split in _SPLITS}
    empty = [split for split in _SPLITS if not splits[split]]
    if empty:
        sizes = " / ".join(str(len(splits[s])) for s in _SPLITS)
        raise ValueError(f"{where}: the {' and '.join(empty)} split is empty ({sizes} train / val / test graphs); "
                         "every split needs graphs: use 4 graphs or more (a 70 / 15 / 15 split)")
    every = [g for split in _SPLITS for g in splits[split]]
    _check_edge_features(every, where)  # refused here, not at the first such batch (possibly after training)
    with_x = sum(g["x"] is not None for g in every)
    if with_x not in (0, len(every)):
        raise ValueError(f"{where}: {with_x} of {len(every)} graphs have node features x and the others none; "
                         "give every graph x, or none (then one-hot degrees are used)")
    if with_x:
        widths = sorted({g["x"].size(1) for g in every})
        if len(widths) > 1:
            raise ValueError(f"{where}: the graphs' x have {widths} features; every graph needs the same number")
        num_features = widths[0]
    else:  # PyG's TU recipe for graphs without node features: one-hot degrees
        if max_degree is None:
            largest = max(int(torch.bincount(g["edge_index"][0]).max()) if g["edge_index"].numel() else 0
                          for g in every)
            max_degree = min(largest, _DEGREE_CAP)
        for g in every:
            g["x"] = one_hot_degree(g, max_degree)
        num_features = max_degree + 1
    for g in every:
        del g["num_nodes"]
    return {"train": splits["train"], "val": splits["val"], "test": splits["test"], "num_features": num_features,
            "num_classes": max(g["y"] for g in every) + 1, "degree_features": None if with_x else max_degree,
            "seeded_split": not isinstance(raw, dict)}


_Base = L.LightningDataModule if L is not None else object


# the extra data.* keys each node dataset takes (passed to its loader), by the name before ":"
_LOADER_OPTIONS = {
    "karate": (),
    "sbm": ("block_sizes", "p_in", "p_out", "num_channels", "feature_noise"),
    "networkx": (),
    "planetoid": ("split", "num_train_per_class", "num_val", "num_test", "geom_gcn_split"),
    "ogb": ("split",),
}


class _SampledTrainingNodes(torch.utils.data.Dataset):
    """The training nodes of one graph as a dataset of seed ids, whose ``collate`` turns a batch of seeds into their
    sampled subgraph (:class:`zoo.tasks.graph.sampling.NeighborSampler`): the batch dict x [n, F], y [n],
    edge_index [2, e] (local numbers), edge_attr [e, D] when the graph has edge features, n_id [n] / e_id [e] (global
    ids), and batch_size (the seed count; the seeds are the first batch_size rows).

    The draw is seeded by (data seed, epoch, the batch's seed ids). The seed ids are those of one batch index of one
    epoch (EpochShuffleSampler: a permutation of (seed, epoch), split by process), so the sampling, like the order,
    depends on (seed, epoch, batch index) only, whatever the worker that collates the batch or the batches before
    it: a run resumed in the middle of an epoch samples what the uninterrupted run samples. ``epoch`` is set by
    EpochShuffleSampler.set_epoch."""

    def __init__(self, data: dict, sampler, num_neighbors: list, seed: int, replace: bool = False):
        self.nodes = data["train_mask"].nonzero().view(-1)
        self.features = {key: data[key] for key in ("x", "y")}
        self.edge_attr = data.get("edge_attr")
        self.sampler, self.num_neighbors, self.seed, self.epoch = sampler, num_neighbors, int(seed), 0
        self.replace = replace

    def __len__(self) -> int:
        return self.nodes.numel()

    def __getitem__(self, index: int) -> int:
        return int(self.nodes[index])

    def _generator(self, seeds: Tensor) -> torch.Generator:
        import hashlib

        digest = hashlib.blake2b(np.array([self.seed, self.epoch], dtype=np.int64).tobytes(), digest_size=8)
        digest.update(seeds.numpy().astype(np.int64).tobytes())
        return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)

    def collate(self, seed_ids: list) -> dict:
        seeds = torch.tensor(seed_ids, dtype=torch.long)
        sub = self.sampler.sample(seeds, self.num_neighbors, self._generator(seeds), replace=self.replace)
        batch = {key: value[sub.n_id] for key, value in self.features.items()}
        batch.update(edge_index=sub.edge_index, n_id=sub.n_id, e_id=sub.e_id, batch_size=sub.batch_size)
        if self.edge_attr is not None:
            batch["edge_attr"] = self.edge_attr[sub.e_id]
        return batch


class NodeDataModule(ResumableTrainingOrder, _Base):
    """One graph. Full batch by default (``batch_size=None``): every loader yields the same single batch dict (masks
    select the split).

    Mini-batches of sampled neighbourhoods (``batch_size`` seeds per batch, ``num_neighbors`` in-neighbours per node
    and hop, -1 = all; ``replace``: drawn with replacement), PyG's NeighborLoader semantics
    (torch_geometric/loader/neighbor_loader.py) with the zoo's own sampler (:mod:`zoo.tasks.graph.sampling`; PyG's
    needs pyg-lib or torch-sparse): the training loader goes through the training nodes in an order of (seed, epoch)
    (:class:`zoo.train.order.EpochShuffleSampler`, restored mid-epoch on resume as for graph classification), each
    batch the seeds' sampled subgraph (:class:`_SampledTrainingNodes`).
    Under DDP that sampler (a DistributedSampler, which Lightning does not wrap again) gives each process its own share
    of the seeds, padded as PyTorch's DistributedSampler pads (a few seeds repeated) so that every process runs the
    same number of steps. Validation, test and predict give exact outputs for every node: one full-graph forward, or
    with ``inference_batch_size`` the model's layer-wise ``inference`` in chunks of that many nodes (PyG's
    examples/reddit.py evaluates with all neighbours, layer-wise, the same way): the same logits without every edge
    of the graph in memory at once. The CSR of the graph is built once, at the first loader that needs it, and kept.

    Resumed in the middle of an epoch, only the loader keys may change (``data.batch_size``, as for images;
    ``data.num_neighbors``, ``data.replace``, ``data.num_workers``): the others make another data set (for generated graphs, sbm and
    networkx, ``data.seed`` regenerates the graph and its split), refused by zoo train
    (:meth:`ResumableTrainingOrder.check_same_data`). ``data.seed`` is also this module's order seed: for karate,
    Planetoid and OGB, whose split is their own, a change of it only orders the epochs after the current one (a note
    says so, :meth:`data_depends_on_order_seed`)."""

    order_seed_key = "data.seed"
    mid_epoch_changeable_keys = ("batch_size", "num_neighbors", "replace", "num_workers", "inference_batch_size")

    def __init__(self, name: str = "karate", root: Optional[str] = None, seed: int = 0,
                 num_features: Optional[int] = None, num_classes: Optional[int] = None, model_kind: str = "node",
                 num_workers: int = 0, normalize_features: bool = False, batch_size: Optional[int] = None,
                 num_neighbors: Optional[list] = None, inference_batch_size: Optional[int] = None,
                 replace: bool = False, **kwargs):
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
                f"num_classes, model_kind, num_workers, normalize_features, batch_size, num_neighbors, replace, "
                f"inference_batch_size"
                f"{''.join(', ' + o for o in options)})"
            )
        if kind == "sbm":  # named here, before the generator's own RuntimeError deep inside torch.bernoulli
            _check_sbm_arguments("data.", **kwargs)
        if kind == "planetoid":
            _check_planetoid_split("data.", **kwargs)
        self.batch_size, self.num_neighbors = _check_node_batches(batch_size, num_neighbors)
        # data.replace: neighbours drawn with replacement (PyG's NeighborLoader replace=True, zoo.tasks.graph.sampling)
        self.replace = check_flag(replace, "data.replace")
        if self.replace and self.batch_size is None:
            raise ValueError("data.replace=true draws the sampled neighbourhoods with replacement: it needs sampled "
                             "mini-batches (data.batch_size=<seeds per batch> data.num_neighbors=[...]), or leave "
                             "it false for full-batch training")
        if inference_batch_size is not None and (not is_int(inference_batch_size) or inference_batch_size < 1):
            raise ValueError(f"data.inference_batch_size must be a positive integer (nodes per chunk of layer-wise "
                             f"inference) or null (one full-graph forward), got {inference_batch_size!r}")
        self.inference_batch_size = None if inference_batch_size is None else int(inference_batch_size)
        # num_workers (set by debug=fast for every data config): the sampled training batches' loader workers; unused
        # by the full batch (one graph, already in memory)
        if self.batch_size is not None and (not is_int(num_workers) or num_workers < 0):
            raise ValueError(f"data.num_workers must be an integer >= 0, got {num_workers!r}")
        self.num_workers = num_workers
        self.model_kind = model_kind
        # absolute, ~ expanded: the root recorded with released weights (describe()) must still name the folder
        # when `zoo viz graph ckpt=...` runs from another directory
        root = os.path.abspath(os.path.expanduser(os.fspath(root))) if root else root
        self.name, self.root, self.seed, self.kwargs = name, root, seed, kwargs
        self.expected = {"num_features": num_features, "num_classes": num_classes}
        self.data: Optional[dict] = None
        self._neighbor_sampler = None

    def check_processes(self, world_size: int) -> None:
        """Full-batch training (``batch_size=None``) under DDP: every process would get the whole graph and run the
        same full-graph step, twice the compute for no speed-up, and with dropout a result other than one process's
        (the gradient averaged over each process's dropout mask; audit 2026-12-07). Refused by zoo train before
        the run's files are written; sampled mini-batches split the training seeds across the processes."""
        if self.batch_size is None and world_size > 1:
            raise ValueError(f"full-batch node classification (data.batch_size=null) does not split across "
                             f"{world_size} processes: each would run the same whole-graph step; train on one "
                             f"device (trainer.devices=1), or sample mini-batches (data.batch_size=<seeds per batch> "
                             f"data.num_neighbors=[...]), which DDP splits")

    def data_depends_on_order_seed(self) -> bool:
        """data.seed generates sbm and draws the random split of sbm and networkx graphs (random_split_masks) and
        Planetoid's data.split=random (planetoid_split_masks); karate, OGB and Planetoid's public and full splits
        are the data's own and take only the training order from it (_load_node_dataset)."""
        if self.name.startswith("planetoid:"):
            return self.kwargs.get("split", "public") == "random"
        return self.name == "sbm" or self.name.startswith("networkx:")

    def describe(self) -> dict:
        """Data facts stored with released weights (``metadata.data``): the dataset and its absolute root, which
        ``zoo viz graph ckpt=`` reads (the run's recorded config keeps data.root as it was typed)."""
        return {"name": str(self.name), "root": self.root}

    def setup(self, stage: Optional[str] = None) -> None:
        if self.data is None:
            data = load_node_dataset(self.name, self.root, seed=self.seed,
                                     normalize_features=self.normalize_features, **self.kwargs)
            actual = {"num_features": data["x"].size(1), "num_classes": data["num_classes"]}
            _check_sizes(f"dataset {self.name!r}", self.expected, actual, stage)
            self.data = data

    @property
    def num_features(self) -> int:
        self.setup()
        return self.data["x"].size(1)

    @property
    def num_classes(self) -> int:
        self.setup()
        return self.data["num_classes"]

    def state_dict(self) -> dict:
        """The training order's position (ResumableTrainingOrder) with sampled batches; nothing for the full batch,
        whose checkpoints stay as they were."""
        return super().state_dict() if self.batch_size is not None else {}

    def _loader(self, evaluation: bool = False):
        """Under DDP Lightning's DistributedSampler pads this one-item dataset: every process gets the whole graph
        (the masks, not the sampler, split it), so the metrics are equal on all processes. Evaluation batches with
        ``inference_batch_size`` also carry it and the graph's NeighborSampler (NodeClassificationModule then runs
        the model's layer-wise ``inference``)."""
        # labelled_mask (OGB): read by zoo predict only; the split masks already leave unlabelled nodes out
        batch = {k: v for k, v in self.data.items() if isinstance(v, torch.Tensor) and k != "labelled_mask"}
        if evaluation and self.inference_batch_size is not None:
            batch.update(inference_batch_size=self.inference_batch_size, neighbor_sampler=self._sampler())
        return torch.utils.data.DataLoader([batch], batch_size=None)

    # the graph of a layer-wise evaluation batch: left where it is (the CPU), as PyG's BasicGNN.inference keeps x_all
    # on its embedding_device; each chunk goes to the model's device in GATNodeClassifier.inference
    _LAYERWISE_HOST_KEYS = ("x", "edge_index", "edge_attr")

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        """Lightning's transfer, except that a layer-wise evaluation batch (``inference_batch_size``) keeps its graph
        -- x, edge_index, edge_attr -- where it is: only one chunk's neighbourhood at a time needs to be on an
        accelerator, so a graph larger than its memory is evaluated there (its labels and masks move as usual)."""
        if isinstance(batch, dict) and "inference_batch_size" in batch:
            host = {key: batch[key] for key in self._LAYERWISE_HOST_KEYS if key in batch}
            moved = super().transfer_batch_to_device({k: v for k, v in batch.items() if k not in host}, device,
                                                     dataloader_idx)
            return {**moved, **host}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _sampler(self):
        """The graph's NeighborSampler (the CSR of its in-edges), sorted once and shared by the sampled training
        batches and layer-wise inference."""
        from zoo.tasks.graph.sampling import NeighborSampler

        self.setup()
        if self._neighbor_sampler is None:
            self._neighbor_sampler = NeighborSampler(self.data["edge_index"], self.data["x"].size(0))
        return self._neighbor_sampler

    def _sampled_training_nodes(self) -> _SampledTrainingNodes:
        self.setup()
        if int(self.data["train_mask"].sum()) == 0:
            raise ValueError(f"dataset {self.name!r} has no training node (train_mask is empty): nothing to sample "
                             f"batches from; use data.batch_size=null")
        return _SampledTrainingNodes(self.data, self._sampler(), self.num_neighbors, self.seed, self.replace)

    def train_dataloader(self):
        """The whole graph (full batch), or batches of ``batch_size`` training nodes with their sampled
        neighbourhoods (see the class docstring)."""
        if self.batch_size is None:
            return self._loader()
        dataset = self._sampled_training_nodes()
        sampler = self.training_sampler(dataset, self.batch_size)
        return torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, sampler=sampler,
                                           collate_fn=dataset.collate, num_workers=self.num_workers)

    def val_dataloader(self):
        return self._loader(evaluation=True)

    def test_dataloader(self):
        return self._loader(evaluation=True)

    def predict_dataloader(self):
        """The whole graph: ``trainer.predict`` gives every node's class probabilities (select with the masks)."""
        return self._loader(evaluation=True)


def _check_node_batches(batch_size, num_neighbors) -> tuple[Optional[int], Optional[list]]:
    """data.batch_size and data.num_neighbors go together: seeds per training batch and neighbours per hop."""
    from zoo.tasks.graph.sampling import check_num_neighbors

    if batch_size is None:
        if num_neighbors is not None:
            raise ValueError("data.num_neighbors samples the neighbourhoods of mini-batches: set data.batch_size=<seed "
                             "nodes per batch> too, or data.num_neighbors=null for full-batch training")
        return None, None
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"data.batch_size must be a positive integer (seed nodes per training batch) or null (full "
                         f"batch), got {batch_size!r}")
    if num_neighbors is None:
        raise ValueError(f"data.batch_size={batch_size} needs data.num_neighbors, one entry per hop (-1 = all "
                         f"neighbours), e.g. data.num_neighbors=[10,10]; or data.batch_size=null for full-batch "
                         f"training")
    return int(batch_size), check_num_neighbors(num_neighbors, "data.num_neighbors")


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
    """Mini-batches of small graphs: the synthetic set (``name="synthetic"``, 70 / 15 / 15 split), or the user's own
    graphs (:func:`load_graph_classification`): a TU data set in ``root`` (``name=MUTAG``), a torch.save'd list of
    PyG Data (``path``) or an InMemoryDataset class (``dataset_class``). Every split must be non-empty; the batches
    are the same dicts (collate_graphs) whatever the source."""

    # data.seed orders the training graphs (and generates the synthetic set and the stratified split): a run resumed
    # in the middle of an epoch names that key, and refuses a change of the graphs themselves there, of data.seed too
    # where it draws them (data_depends_on_order_seed; ResumableTrainingOrder)
    order_seed_key = "data.seed"
    mid_epoch_changeable_keys = ("batch_size", "num_workers")

    def __init__(self, num_graphs: Optional[int] = None, batch_size: int = 32, seed: int = 0,
                 num_features: Optional[int] = None, num_classes: Optional[int] = None, model_kind: str = "graph",
                 num_workers: int = 0, name: str = "synthetic", root: Optional[str] = None, path: Optional[str] = None,
                 dataset_class: Optional[str] = None, trust_pickle: bool = False, use_node_attr: bool = False,
                 max_degree: Optional[int] = None):
        super().__init__()
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"data.num_workers must be an integer >= 0, got {num_workers!r}")
        self.num_workers = num_workers
        if model_kind != "graph":
            raise ValueError(f"graph-classification data need model_kind='graph', got {model_kind!r}")
        self.source = _graph_source(str(name), root, path, dataset_class)
        for key, value in (("trust_pickle", trust_pickle), ("use_node_attr", use_node_attr)):
            if not isinstance(value, bool):
                raise ValueError(f"data.{key} must be true or false, got {value!r}")
        if max_degree is not None and (not is_int(max_degree) or max_degree < 0):
            raise ValueError(f"data.max_degree must be an integer >= 0 (one-hot degree features 0..max_degree) or "
                             f"null (the data's largest degree), got {max_degree!r}")
        if self.source == "synthetic":
            if (num_features not in (None, 8)) or (num_classes not in (None, 3)):
                raise ValueError("synthetic graph classification has num_features=8, num_classes=3, model_kind='graph'")
            num_graphs = 300 if num_graphs is None else num_graphs
            _check_graph_split(num_graphs)
        elif num_graphs is not None:
            raise ValueError(f"data.num_graphs sizes the synthetic set; your data set's graphs are all used "
                             f"(drop data.num_graphs={num_graphs})")
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"data.batch_size must be a positive integer, got {batch_size!r}")
        self.model_kind = model_kind
        self.num_graphs, self.batch_size, self.seed = num_graphs, batch_size, seed
        # the user's data: paths absolute (~ expanded), as NodeDataModule's root
        root = os.path.abspath(os.path.expanduser(os.fspath(root))) if root else root
        path = os.path.abspath(os.path.expanduser(os.fspath(path))) if path else path
        self.name = str(name)
        self.options = {"name": self.name, "root": root, "path": path, "dataset_class": dataset_class,
                        "trust_pickle": trust_pickle, "use_node_attr": use_node_attr, "max_degree": max_degree,
                        "seed": seed}
        self.expected = {"num_features": num_features, "num_classes": num_classes}
        self.splits: Optional[dict] = None
        self._sizes = {"num_features": 8, "num_classes": 3} if self.source == "synthetic" else None
        # the node features the model reads: the graphs' own x, or one-hot degrees capped at this (set by setup)
        self._degree_features: Optional[int] = None

    def describe(self) -> dict:
        """Data facts stored with the weights (the .ckpt's ``data_info``, a release's ``metadata.data``), which
        ``zoo predict`` reads (tasks/graph/predict.py): the source with its absolute root / path, and the node
        features the model was trained on: ``"node_features": "x"`` (the graphs' own, e.g. MUTAG's atom types) or
        ``"one_hot_degree"`` with the ``max_degree`` used (a null data.max_degree resolves from the data). A graph
        given to predict without x gets one-hot degrees only when training did: fed to a model trained on real
        features they silently gave other classes. The user's data is read here (_load) when it was not yet."""
        if self.source != "synthetic":
            self._load()
        facts = {"name": self.name, "source": self.source,
                 **{key: self.options[key] for key in ("root", "path", "dataset_class")},
                 "num_features": self.num_features, "num_classes": self.num_classes,
                 "node_features": "x" if self._degree_features is None else "one_hot_degree"}
        if self._degree_features is not None:
            facts["max_degree"] = self._degree_features
        return facts

    def setup(self, stage: Optional[str] = None) -> None:
        """Read the graphs (once), then check them against the sizes the model was built with, on every call: the
        first read may come from :meth:`describe` (zoo train / zoo eval build the module before Lightning's setup),
        and only Lightning's call knows whether the sizes are settings (fit) or the trained model's (test)."""
        self._load()
        where = f"graph data set {self.name if self.source == 'tu' else self._where()}"
        _check_sizes(where, self.expected, self._sizes, stage)

    def _load(self) -> None:
        if self.splits is not None:
            return
        if self.source == "synthetic":
            graphs = synthetic_graph_classification(self.num_graphs, seed=self.seed)
            num_train, num_val, _ = _graph_split_sizes(len(graphs))
            a, b = num_train, num_train + num_val
            self.splits = {"train": graphs[:a], "val": graphs[a:b], "test": graphs[b:]}
            return
        data = load_graph_classification(**self.options)
        self._sizes = {key: data[key] for key in ("num_features", "num_classes")}
        self._degree_features = data["degree_features"]
        self._seeded_split = data["seeded_split"]
        self.splits = {split: data[split] for split in _SPLITS}

    def data_depends_on_order_seed(self) -> bool:
        """data.seed generates the synthetic graphs and draws the stratified split of graphs without a split of their
        own (TU data sets, a plain list in data.path); a data set with its own split only takes its order from it
        (ResumableTrainingOrder.check_same_data). The user's data is read here when it was not yet (describe)."""
        if self.source == "synthetic":
            return True
        self._load()
        return self._seeded_split

    def _where(self) -> str:
        return self.options["path"] or self.options["dataset_class"]

    @property
    def num_features(self) -> int:
        if self._sizes is None:
            self._load()
        return self._sizes["num_features"]

    @property
    def num_classes(self) -> int:
        if self._sizes is None:
            self._load()
        return self._sizes["num_classes"]

    def _loader(self, split, shuffle):
        # the training order comes from (seed, epoch), which Lightning passes on through set_epoch, not from
        # the global RNG at each epoch's iterator: a run resumed from a checkpoint sees the same batches
        if shuffle:
            sampler = self.training_sampler(self.splits[split], self.batch_size)
        else:
            fix = "raise data.num_graphs" if self.source == "synthetic" else "use more graphs"
            sampler = evaluation_sampler(self.splits[split], f"{split} split", fix)
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
