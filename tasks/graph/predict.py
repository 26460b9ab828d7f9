"""``zoo predict`` for graph models: the class probabilities of nodes or of whole graphs.

:func:`predict_graph` is what ``zoo.train.run.predict`` hands a checkpoint of a graph model to (the run's stored
config tells which kind of data it was trained on, ``data.model_kind``):

* node classification (NodeDataModule runs: karate, sbm, networkx, planetoid, ogb):
  ``nodes:all | nodes:train | nodes:val | nodes:test | nodes:<i,j,k>`` predicts nodes of the run's own graph,
  rebuilt from the stored data config as ``zoo eval`` rebuilds it (the masks select the split);
  ``<file.pt>`` predicts every node of another graph, saved with ``torch.save`` as one PyG ``Data`` (or a dict
  with ``x``, ``edge_index`` and optionally ``edge_attr`` / ``y``), its features preprocessed as training did
  (``data.normalize_features``: PyG's ``NormalizeFeatures`` row normalisation). Its ``y``, when given, is one
  class of the model per node (y [num_nodes]; -1 or NaN: an unlabelled node, as in OGB's label files); another
  shape or value, or a ``num_nodes`` other than x's row count, is refused.
* graph classification (GraphClassificationDataModule runs: synthetic, TU, data.path, data.dataset_class):
  ``graphs:all | graphs:train | graphs:val | graphs:test | graphs:<i,j>`` predicts graphs of the run's data
  (graph ``i`` is the i-th of ``graphs:all``, which lists the train, val and test graphs in this order);
  ``<file.pt>`` holding a list of ``Data`` (labels not needed; y -1 or NaN: an unlabelled graph, as for nodes)
  gives one prediction per graph, read by the training loader's own functions (``zoo.tasks.graph.datasets``:
  ``_as_graph``'s checks, one edge-feature width); a ``num_nodes`` other than x's row count is refused.
  Graphs without ``x`` get ``one_hot_degree`` features capped at the run's degree cap only when the run trained on
  one-hot degrees (recorded with the weights, GraphClassificationDataModule.describe; an older record is found
  by rebuilding the run's data, or, when it cannot be read, from a stored data.max_degree that fits the model's
  width): a run trained on the graphs' own x refuses them, where they silently got degrees and other classes.
* DictionaryLookup models are refused in one line: their inputs are the benchmark's generated graphs, scored by
  ``zoo eval``.

Files are read with ``torch.load(weights_only=True)`` and PyG's Data classes allowed (as ``data.path`` lists are,
``zoo.tasks.graph.datasets.load_saved_graphs``): nothing in the file runs. The model is the one
``zoo.train.run`` loaded: eval mode, the EMA weights when the run kept them. Rows are those of image prediction:
``{"input": "node 5" | "graph 3" | "file.pt[2]", "top": [(class, probability), ...]}`` plus ``"label"`` when the
data has one.
"""
from __future__ import annotations

import os
import pickle
import re
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["predict_graph", "GRAPH_INPUTS", "is_graph_input"]

SPLITS = ("all", "train", "val", "test")
# what each kind of graph model predicts from, as the error messages and `zoo predict --help` say it
GRAPH_INPUTS = {
    "node": "nodes:all|train|val|test|<i,j,...> (nodes of the run's graph) or a .pt file holding one PyG Data",
    "graph": "graphs:all|train|val|test|<i,j,...> (graphs of the run's data) or a .pt file holding a list of PyG Data",
}
_PREFIX = {"node": "nodes", "graph": "graphs"}
# files a user saves graphs into with torch.save (other suffixes are read too, when the file exists)
GRAPH_FILE_SUFFIXES = (".pt", ".pth")


def is_graph_input(spec: str) -> bool:
    """Whether an ``input=`` value names graph data (``nodes:...``, ``graphs:...``, a ``.pt`` / ``.pth`` file):
    given to an image model, it is refused with what image models take."""
    return spec.startswith(("nodes:", "graphs:")) or os.path.splitext(spec)[1].lower() in GRAPH_FILE_SUFFIXES


def predict_graph(model: torch.nn.Module, data_cfg: dict, inputs: Sequence[str], *, topk: int, ckpt: str,
                  make_datamodule: Callable[[], Any], batch_size: int = 64,
                  data_info: Optional[dict] = None) -> list[dict[str, Any]]:
    """Top-``topk`` classes for each node or graph that ``inputs`` name (see the module docstring).

    ``data_cfg``: the run's data config, resolved (plain values); ``make_datamodule``: builds the run's data
    module from it (``zoo.train.run`` instantiates it as ``zoo eval`` does), called only for ``nodes:`` /
    ``graphs:`` inputs and, for an older run, to find out which node features it trained on; ``data_info``: what
    the data module recorded with the weights (its ``describe()``); ``ckpt``: the checkpoint as given, for the
    messages."""
    name = getattr(model, "zoo_model_name", type(model).__name__)
    kind = str(data_cfg.get("model_kind") or name.removesuffix("_debug").rsplit("_", 1)[-1])
    if kind not in GRAPH_INPUTS:
        supported = "; ".join(f"{k} models ({', '.join(_models_of(k))}): input={v}" for k, v in GRAPH_INPUTS.items())
        raise ValueError(f"zoo predict does not predict {name} ({kind} data; zoo eval ckpt={ckpt} scores it on its "
                         f"test split); it predicts {supported}")
    if not inputs:
        raise ValueError(f"no inputs given (input={GRAPH_INPUTS[kind]})")
    built: list = []

    def datamodule():  # the run's data, built and read once, when an input needs it
        if not built:
            built.append(make_datamodule())
            built[0].setup("predict")  # the sizes are the trained model's: a mismatch says so (not zoo train's advice)
        return built[0]

    rows: list[dict[str, Any]] = []
    for spec in inputs:
        spec = str(spec)
        _check_graph_spec(spec, kind, name, ckpt)
        if spec.startswith(f"{_PREFIX[kind]}:"):
            items = _run_nodes(datamodule(), spec) if kind == "node" else _run_graphs(datamodule(), spec)
        else:
            raw = _load_graph_file(spec)
            width, classes = _input_width(model, data_cfg), _class_count(model, data_cfg)
            items = (_file_nodes(raw, spec, width, data_cfg, classes) if kind == "node"
                     else _file_graphs(raw, spec, width, data_cfg, lambda: _trained_node_features(
                         data_info, datamodule, ckpt, spec, width, data_cfg), classes))
        rows += _predict_items(model, kind, items, spec, topk, batch_size, data_cfg.get("inference_batch_size"))
    return rows


def _models_of(kind: str) -> list[str]:
    import zoo

    return [m for m in zoo.list_models("*", task="graph") if m.removesuffix("_debug").endswith(f"_{kind}")]


def _check_graph_spec(spec: str, kind: str, name: str, ckpt: str) -> None:
    """An input of another kind than the model's, named: an image (``digits:N``, an image file, a folder) or the
    other graph prefix."""
    from zoo.tasks.vision.data import IMAGE_EXTENSIONS

    other = {"node": "graph", "graph": "node"}[kind]
    if spec.startswith(f"{_PREFIX[other]}:"):
        raise ValueError(f"input={spec}: {ckpt} holds {name}, a {kind}-classification model; it predicts "
                         f"input={GRAPH_INPUTS[kind]}")
    if spec.startswith(f"{_PREFIX[kind]}:"):
        return
    if not spec.strip():
        raise ValueError(f"input= is empty: give input={GRAPH_INPUTS[kind]}")
    path = os.path.expanduser(spec)
    if spec.startswith("digits:") or os.path.isdir(path) or os.path.splitext(spec)[1].lower() in IMAGE_EXTENSIONS:
        raise ValueError(f"zoo predict classifies images; {ckpt} holds {name}, a graph ({kind}-classification) "
                         f"model, and input={spec} is an image input: give it input={GRAPH_INPUTS[kind]}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input {spec} does not exist (a {kind}-classification model takes "
                                f"input={GRAPH_INPUTS[kind]})")


# ---------------------------------------------------------------------------------------------- the run's data
def _selection(spec: str, count: int, masks: dict[str, Tensor], unit: str) -> list[int]:
    """The indices ``nodes:<what>`` / ``graphs:<what>`` names: a split (its mask's indices) or a comma list."""
    prefix, what = spec.split(":", 1)
    if what in masks:
        return masks[what].nonzero().view(-1).tolist()
    tokens = [token.strip() for token in what.split(",")]
    if len(tokens) == 1 and tokens[0].isidentifier():
        raise ValueError(f"input={spec}: unknown split {what!r}; use {prefix}:all, {prefix}:train, {prefix}:val, "
                         f"{prefix}:test or {prefix}:<i,j,...> ({unit} indices)")
    indices = []
    for token in tokens:
        if not re.fullmatch(r"-?[0-9]+", token):  # int() also reads "1_0" (as 10), "+3" and non-ASCII digits
            raise ValueError(f"input={spec}: {token!r} is not a {unit} index (give integers 0..{count - 1}, comma "
                             f"separated, or a split: {', '.join(SPLITS)})")
        index = int(token)
        if index < 0:
            raise ValueError(f"input={spec}: {unit} index {index} is negative; give {unit} indices 0..{count - 1} "
                             f"(the run's data has {count} {unit}s)")
        if index >= count:
            raise ValueError(f"input={spec}: {unit} index {index} is out of range: the run's data has {count} "
                             f"{unit}s (0..{count - 1})")
        indices.append(index)
    return indices


def _run_nodes(datamodule, spec: str) -> dict:
    """The nodes of the run's graph that ``spec`` names (NodeDataModule's graph: features as trained on). A node
    the data marks unlabelled (OGB's NaN / -1 labels: ``labelled_mask``, zoo.tasks.graph.datasets.ogb_node) has no
    label in its row, as in a node file: its y is a placeholder 0 that no split reads."""
    data = datamodule.data
    n = data["x"].size(0)
    masks = {"all": torch.ones(n, dtype=torch.bool), **{s: data[f"{s}_mask"] for s in SPLITS[1:]}}
    chosen = _selection(spec, n, masks, "node")
    sampler = datamodule._sampler() if getattr(datamodule, "inference_batch_size", None) else None
    labelled = data.get("labelled_mask")
    labels = [int(data["y"][i]) if labelled is None or bool(labelled[i]) else None for i in chosen]
    return {"graphs": [{key: data.get(key) for key in ("x", "edge_index", "edge_attr")}],
            "rows": [(0, i, f"node {i}", label) for i, label in zip(chosen, labels)], "sampler": sampler}


def _run_graphs(datamodule, spec: str) -> dict:
    """The graphs of the run's data that ``spec`` names; graph i is the i-th of train + val + test."""
    every = [g for split in SPLITS[1:] for g in datamodule.splits[split]]
    sizes = [len(datamodule.splits[split]) for split in SPLITS[1:]]
    masks, start = {"all": torch.ones(len(every), dtype=torch.bool)}, 0
    for split, size in zip(SPLITS[1:], sizes):
        masks[split] = torch.zeros(len(every), dtype=torch.bool)
        masks[split][start:start + size] = True
        start += size
    chosen = _selection(spec, len(every), masks, "graph")
    return {"graphs": [every[i] for i in chosen],
            "rows": [(k, None, f"graph {i}", int(every[i]["y"])) for k, i in enumerate(chosen)]}


# ------------------------------------------------------------------------------------------------- files
def _load_graph_file(spec: str):
    """``torch.load(weights_only=True)`` with PyG's Data classes allowed, as data.path lists are read."""
    from zoo.tasks.graph.datasets import _allowing_pyg_data, _pyg_data_globals

    path = os.path.expanduser(spec)
    try:
        with _allowing_pyg_data():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        allowed = {f"{cls.__module__}.{cls.__qualname__}" for cls in _pyg_data_globals()}
        try:  # a zip written by torch.save: the classes it names beyond the allowed ones
            unsafe = ", ".join(name for name in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                               if name not in allowed) or "other objects"
        except Exception:  # not a torch.save zip at all
            raise ValueError(f"cannot read input={spec} as a torch.save file of PyG Data ({type(error).__name__}): "
                             f"save the graph(s) with torch.save(data, path)") from None
        raise ValueError(f"input={spec} holds {unsafe} beside tensors and PyG Data, which torch.load(weights_only="
                         f"True) does not build (it runs no code from the file): save a plain Data, or a list of "
                         f"Data, with torch.save") from None
    except Exception as error:  # not a torch.save file, truncated
        first = (str(error).strip().splitlines() or [""])[0][:120]
        raise ValueError(f"cannot read input={spec} as a torch.save file of PyG Data ({type(error).__name__}: "
                         f"{first}): save the graph(s) with torch.save(data, path)") from None


def _as_mapping(item, where: str) -> dict:
    """A PyG ``Data`` (its stored attributes) or a dict; anything else named."""
    from torch_geometric.data import Data

    if isinstance(item, Data):
        return item.to_dict()
    if isinstance(item, dict):
        return item
    raise ValueError(f"{where} is a {type(item).__name__}, not a torch_geometric Data (or a dict with x and "
                     f"edge_index)")


def _input_width(model, data_cfg: dict) -> Optional[int]:
    """The node-feature width the model reads: its first attention layer's in_channels, else data.num_features."""
    convs = getattr(model, "convs", None)
    width = getattr(convs[0], "in_channels", None) if convs is not None and len(convs) else None
    if isinstance(width, int) and width > 0:
        return width
    width = data_cfg.get("num_features")
    return int(width) if isinstance(width, int) else None


def _class_count(model, data_cfg: dict) -> Optional[int]:
    """How many classes the model scores: its num_classes (the GAT classifiers keep it), else data.num_classes."""
    for count in (getattr(model, "num_classes", None), data_cfg.get("num_classes")):
        if isinstance(count, int) and not isinstance(count, bool) and count > 0:
            return count
    return None


def _check_label_range(labels: Tensor, classes: Optional[int], where: str, unit: Optional[str] = None,
                       unlabelled: str = "") -> None:
    """Labels shown beside a prediction are classes of the model: one outside 0..classes-1 is named (it was shown as
    if it were one). ``labels``: [count] int64; ``unit``: what the i-th label belongs to ("node": "(node i)" in the
    message); ``unlabelled``: how an item is left unlabelled, for the advice."""
    if classes is None or not labels.numel():
        return
    outside = ((labels < 0) | (labels >= classes)).nonzero().view(-1)
    if outside.numel():
        first = int(outside[0])
        which = f" ({unit} {first})" if unit else ""
        raise ValueError(f"{where}: y holds label {int(labels[first])}{which}, but the model has {classes} classes "
                         f"(0..{classes - 1}): give y as its class indices{unlabelled}, or leave y out")


def _node_labels(y, n: int, classes: Optional[int], where: str) -> list[Optional[int]]:
    """A node file's ``y`` as one label per node (None: no label shown). PyG keeps node labels as y [num_nodes]
    (y [num_nodes, 1] is read too); -1 or NaN marks an unlabelled node, as in OGB's node-label files (read by
    zoo.tasks.graph.datasets.ogb_node). Any other shape, a fractional value or a class the model does not have is
    refused, naming the input: such a y was dropped, or shown as a label, without a word."""
    if y is None:
        return [None] * n
    if not isinstance(y, Tensor):
        raise ValueError(f"{where}: y is a {type(y).__name__}; give y as a tensor [{n}] of class indices, one per node "
                         f"(-1 for an unlabelled node), or leave y out")
    if tuple(y.shape) not in ((n,), (n, 1)):
        raise ValueError(f"{where}: y has shape {tuple(y.shape)} but x has {n} nodes: give y [{n}], one class index "
                         f"per node (-1 for an unlabelled node), or leave y out")
    from zoo.tasks.graph.datasets import _unlabelled_and_not_integral

    values = y.view(-1)
    if y.is_floating_point():
        unlabelled, not_integral = _unlabelled_and_not_integral(values)
        fractional = values[not_integral]
        if fractional.numel():
            raise ValueError(f"{where}: y holds {fractional[0].item():g}, which is not a class index: give y as "
                             f"integer class indices, one per node (-1 or NaN for an unlabelled node), or leave y out")
        values = torch.where(unlabelled, torch.full_like(values, -1), values)
    elif y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"{where}: y is a {y.dtype} tensor; give y as integer class indices [{n}], or leave y out")
    values = values.long()
    labelled = values != -1
    counted = torch.where(labelled, values, torch.zeros_like(values))  # the check sees the unlabelled as class 0
    _check_label_range(counted, classes, where, "node", unlabelled=" (-1 for an unlabelled node)")
    return [int(v) if known else None for v, known in zip(values.tolist(), labelled.tolist())]


def _data_name(data_cfg: dict) -> str:
    """The run's data as its config names it: the saved file, the class, the node data set's or TU set's name, or
    the zoo's synthetic graphs (experiment=graph_synthetic: its config names no file, class or data set, as
    GraphClassificationDataModule's default name is "synthetic")."""
    named = data_cfg.get("path") or data_cfg.get("dataset_class") or data_cfg.get("name")
    if data_cfg.get("model_kind") == "graph" and named in (None, "", "synthetic") and not data_cfg.get("root"):
        count = data_cfg.get("num_graphs")
        return "the zoo's synthetic graphs" + (f" (data.num_graphs={count})" if count is not None else "")
    return str(named) if named else "its data config"


def _check_width(x: Tensor, width: Optional[int], where: str, data_cfg: dict) -> None:
    if width is not None and x.size(1) != width:
        raise ValueError(f"{where}: x has {x.size(1)} features per node but the model reads {width} (the run trained "
                         f"on {_data_name(data_cfg)}, data.num_features={width}): give x [num_nodes, {width}]")


def _check_num_nodes(graph: dict, where: str, rows: Optional[int]) -> None:
    """A ``num_nodes`` stored with a graph must be its node count: one integer >= 0, equal to x's row count
    (``rows``) when the graph has x. PyG's Data.validate (torch_geometric 2.8.1) does not compare the two, and a
    Batch built from such graphs gets a batch vector of num_nodes entries for x's rows; the zoo refuses it, naming
    the input."""
    num_nodes = graph.get("num_nodes")
    if num_nodes is None:
        return
    if isinstance(num_nodes, Tensor):
        if num_nodes.numel() != 1:
            raise ValueError(f"{where}: num_nodes is a tensor of shape {tuple(num_nodes.shape)}; it must be one "
                             f"integer, the graph's node count (or save the graph without num_nodes)")
        value = num_nodes.item()
    else:
        value = num_nodes
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: num_nodes={value!r} ({type(value).__name__}) is not a node count: give an "
                         f"integer >= 0, or save the graph without num_nodes")
    if rows is not None and value != rows:
        raise ValueError(f"{where}: num_nodes={value} but x has {rows} rows (one per node): give x a row for every "
                         f"node, or save the graph without num_nodes")


def _file_nodes(raw, spec: str, width: Optional[int], data_cfg: dict, classes: Optional[int] = None) -> dict:
    """Every node of the one graph in ``raw``, x preprocessed as the run's (normalize_feature_rows when
    data.normalize_features); its labels (y) checked against the model's ``classes`` (_node_labels), and a
    ``num_nodes`` that is not x's row count refused (_check_num_nodes)."""
    from zoo.tasks.graph.datasets import _check_edge_index, normalize_feature_rows, _per_edge_features

    if isinstance(raw, (list, tuple)):
        raise ValueError(f"input={spec} holds a list of {len(raw)} items; a node-classification model predicts the "
                         f"nodes of one graph: save one Data (torch.save(data, path))")
    graph = _as_mapping(raw, f"input={spec}")
    x, edge_index, edge_attr, y = (graph.get(key) for key in ("x", "edge_index", "edge_attr", "y"))
    if not isinstance(x, Tensor) or x.dim() != 2:
        got = "none" if x is None else f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"input={spec}: a node-classification model reads node features x [num_nodes, "
                         f"num_features], got {got}")
    _check_edge_index(edge_index, f"input={spec}")  # names the dtype or the shape, whichever is wrong
    if x.size(0) == 0:
        raise ValueError(f"input={spec}: the graph has no nodes (x is [0, {x.size(1)}]): save a graph with its nodes' "
                         f"features x [num_nodes, num_features]")
    _check_num_nodes(graph, f"input={spec}", x.size(0))
    x = x.float()
    _check_width(x, width, f"input={spec}", data_cfg)
    if data_cfg.get("normalize_features"):  # as NodeDataModule fed the run's graph (load_node_dataset)
        x = normalize_feature_rows(x)
    n = x.size(0)
    labels = _node_labels(y, n, classes, f"input={spec}")
    name = os.path.basename(spec)
    edges = _per_edge_features(edge_attr, edge_index, f"input={spec}") if isinstance(edge_attr, Tensor) else None
    return {"graphs": [{"x": x, "edge_index": edge_index.long(), "edge_attr": edges}],
            "rows": [(0, i, f"{name} node {i}", labels[i]) for i in range(n)]}


class _RunDataUnreadable(ValueError):
    """The run's data cannot be rebuilt here (``make_datamodule``'s refusal): ``problem`` says why, ``advice`` what
    to do for a ``graphs:`` / ``nodes:`` input. An input file needs the data only to learn its node features
    (_trained_node_features), where that advice ("give the graphs as input=<file.pt>") would be circular."""

    def __init__(self, problem: str, advice: str):
        super().__init__(f"{problem}: {advice}")
        self.problem = problem


def _trained_node_features(data_info: Optional[dict], datamodule: Callable[[], Any], ckpt: str, spec: str,
                           width: Optional[int], data_cfg: dict) -> dict:
    """What the run's graphs had as node features: GraphClassificationDataModule.describe()'s record
    ({"node_features": "x"} or {"node_features": "one_hot_degree", "max_degree": cap}), from the weights, else
    (a run from before that record) from the run's data module, rebuilt and read. When that data cannot be read
    (moved, or stored as a relative path), a data.max_degree of the stored config that fits the model's input
    width (max_degree + 1 one-hot columns) names the cap: set only for one-hot degrees, it is what the zoo before
    the record used for graphs without x."""
    if data_info and data_info.get("node_features"):
        return data_info
    try:
        return datamodule().describe()
    except Exception as error:  # the run's data moved, or cannot be read here
        reason = (error.problem if isinstance(error, _RunDataUnreadable)
                  else f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}")
    cap = data_cfg.get("max_degree")
    if isinstance(cap, int) and not isinstance(cap, bool) and width is not None and cap + 1 == width:
        return {"node_features": "one_hot_degree", "max_degree": cap}
    raise ValueError(f"input={spec}: the graphs have no node features x, and {ckpt} does not record whether its run "
                     f"trained on one-hot degrees or on the graphs' own x (an older run), nor could its data be read "
                     f"to find out ({reason}): give each graph x [num_nodes, {width}]: its own node features as the "
                     f"run's graphs had them, or, for a run trained on one-hot degrees, the degrees capped at "
                     f"{width - 1 if width else 'max_degree'} (zoo.tasks.graph.datasets.one_hot_degree)") from None


def _graph_label(y, where: str) -> Optional[int]:
    """A graph file's ``y`` as its class, None when it has none: y left out, or -1 / NaN (unlabelled, as for the
    nodes of a node file). Anything but one integral value >= 0 is refused, naming the input."""
    from zoo.tasks.graph.datasets import _unlabelled_and_not_integral

    if y is None:
        return None
    value = y.view(-1) if isinstance(y, Tensor) else torch.tensor([y]) if isinstance(y, (int, float)) else None
    if value is not None and value.numel() == 1 and value.dtype != torch.bool and not value.is_complex():
        unlabelled, not_integral = _unlabelled_and_not_integral(value)  # the rule of node labels (OGB's)
        if bool(unlabelled):
            return None
        if not bool(not_integral) and value.item() >= 0:
            return int(value.item())
    shown = y if not isinstance(y, Tensor) or y.numel() < 5 else f"a tensor of shape {tuple(y.shape)}"
    raise ValueError(f"{where}: y must be one class index >= 0 per graph (graph classification), got {shown}: give "
                     f"the graph's class, -1 or NaN for an unlabelled graph, or leave y out")


def _file_graphs(raw, spec: str, width: Optional[int], data_cfg: dict,
                 trained_features: Callable[[], dict], classes: Optional[int] = None) -> dict:
    """The graphs of ``raw`` (a list of Data, or one) as the training loader reads them (_as_graph); graphs without
    x get one-hot degree features capped as the run's were, when the run trained on one-hot degrees
    (``trained_features()``: what the run recorded), and are refused when it trained on the graphs' own x. A label
    outside the model's ``classes`` is refused; -1 or NaN marks an unlabelled graph, as it marks an unlabelled node
    in a node file (OGB's convention), and so does a graph without y: its row shows no label. A ``num_nodes`` that
    is not the graph's node count is refused (_check_num_nodes)."""
    from zoo.tasks.graph.datasets import _as_graph, _check_edge_features, _graph_source, one_hot_degree

    name = os.path.basename(spec)
    items = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    if not items:
        raise ValueError(f"input={spec} holds an empty list: save a list of PyG Data")
    graphs, labels = [], []
    for i, item in enumerate(items):
        where = f"input={spec} [{i}]" if isinstance(raw, (list, tuple)) else f"input={spec}"
        graph = dict(_as_mapping(item, where))
        x = graph.get("x")
        _check_num_nodes(graph, where, x.size(0) if isinstance(x, Tensor) and x.dim() == 2 else None)
        label = _graph_label(graph.get("y"), where)
        graph["y"] = 0 if label is None else label  # labels are not needed to predict: a placeholder for the checks
        graph = _as_graph(graph, where)
        if label is not None:
            _check_label_range(torch.tensor([graph["y"]]), classes, where)
        labels.append(None if label is None else graph["y"])
        graphs.append(graph)
    _check_edge_features(graphs, f"input={spec}")
    with_x = sum(g["x"] is not None for g in graphs)
    if with_x not in (0, len(graphs)):
        raise ValueError(f"input={spec}: {with_x} of {len(graphs)} graphs have node features x and the others none; "
                         "give every graph x, or none (then one-hot degrees are used, as in training)")
    if not with_x:
        source = _graph_source(str(data_cfg.get("name", "synthetic")), data_cfg.get("root"), data_cfg.get("path"),
                               data_cfg.get("dataset_class"))
        if source == "synthetic" or width is None:
            raise ValueError(f"input={spec}: the graphs have no node features x, and the model was trained on the "
                             f"synthetic set's features (degree, clustering, noise): give each graph x [num_nodes, "
                             f"{width}]")
        trained = trained_features()
        if trained.get("node_features") != "one_hot_degree":
            raise ValueError(f"input={spec}: the graphs have no node features x, but the run's graphs had node "
                             f"features x [num_nodes, {width}] ({_data_name(data_cfg)}), which the model was trained "
                             f"on: give each graph x [num_nodes, {width}] (one-hot degrees stand in for x only in a "
                             f"run trained on them)")
        max_degree = int(trained["max_degree"])  # training's one_hot_degree cap
        for g in graphs:
            g["x"] = one_hot_degree(g, max_degree)
    for i, g in enumerate(graphs):
        _check_width(g["x"], width, f"input={spec} [{i}]", data_cfg)
    return {"graphs": graphs, "rows": [(i, None, f"{name}[{i}]", labels[i]) for i in range(len(graphs))]}


# ------------------------------------------------------------------------------------------------- forward
def _predict_items(model, kind: str, items: dict, spec: str, topk: int, batch_size: int,
                   inference_batch_size: Optional[int] = None) -> list[dict[str, Any]]:
    """Rows for ``items`` ({"graphs", "rows": (graph, node or None, input label, class label or None)}): node
    models run on the whole graph (a node's prediction depends on its neighbours) -- layer by layer in chunks of
    ``inference_batch_size`` nodes when the run set data.inference_batch_size, as its validation did -- graph models
    in batches of ``batch_size`` graphs (collate_graphs, as training batched them)."""
    if kind == "node":
        graph = items["graphs"][0]
        extra = {"edge_attr": graph["edge_attr"]} if graph.get("edge_attr") is not None else {}
        if inference_batch_size:
            probs = _forward(lambda: model.inference(graph["x"], graph["edge_index"], batch_size=inference_batch_size,
                                                     sampler=items.get("sampler"), **extra), spec)
        else:
            probs = _forward(lambda: model(graph["x"], graph["edge_index"], **extra), spec)
        chosen = probs[[node for _, node, _, _ in items["rows"]]]
    else:
        from zoo.tasks.graph.datasets import collate_graphs

        parts = []
        for start in range(0, len(items["graphs"]), batch_size):
            batch = collate_graphs(items["graphs"][start:start + batch_size])
            extra = {"edge_attr": batch["edge_attr"]} if "edge_attr" in batch else {}
            parts.append(_forward(lambda: model(batch["x"], batch["edge_index"], batch["batch"], batch["num_graphs"],
                                                **extra), spec))
        chosen = torch.cat(parts) if parts else torch.zeros(0, 0)
    values, indices = chosen.topk(min(topk, chosen.size(-1)), dim=-1)
    rows = []
    for (_, _, label, target), vals, idxs in zip(items["rows"], values.tolist(), indices.tolist()):
        row: dict[str, Any] = {"input": label, "top": [(str(i), float(v)) for v, i in zip(vals, idxs)]}
        if target is not None:
            row["label"] = str(target)
        rows.append(row)
    return rows


def _forward(call: Callable[[], Tensor], spec: str) -> Tensor:
    """Softmax of the model's logits; the layers' own checks of the input (edge_index out of range, the edge
    features the model was built for) reach the user as one line naming the input."""
    try:
        with torch.no_grad():
            return call().float().softmax(-1)
    except (ValueError, TypeError) as error:
        raise ValueError(f"input={spec}: {error}") from None
