"""Graph attention networks: node classifiers, graph classifiers and the DictionaryLookup model.

Papers: Velickovic et al., "Graph Attention Networks" (ICLR 2018, arXiv:1710.10903) -- GAT, and its
transductive recipe (2 layers, 8 heads x 8 hidden, ELU, dropout 0.6 on features and attention, a last
layer with 1 head (Cora) or 8 averaged heads (PubMed)); Brody, Alon, Yahav, "How Attentive are Graph
Attention Networks?" (ICLR 2022, arXiv:2105.14491) -- GATv2 and the DictionaryLookup benchmark
(official code: tech-srl/how_attentive_are_gats, dictionary_lookup/models/graph_model.py).

The attention layers are zoo.attention.GATv2Conv / GATConv (PyG-compatible, fused edge softmax) or
zoo.attention.TransformerConv (PyG's graph transformer: dot-product attention over the edges, Shi et al., "Masked
Label Prediction", IJCAI 2021); a model picks one with ``conv="gatv2" | "gat" | "transformer"``.

Letters: N nodes, E edges, F input features, C hidden channels per head, H heads, K classes,
G graphs in a batch, k the DictionaryLookup size.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from zoo.layers import check_ints, in_torch_export, is_int, is_tracing
from zoo.registry import register_model

__all__ = ["make_conv", "GATNodeClassifier", "GATGraphClassifier", "DictionaryLookupNet", "global_mean_pool"]

CONVS = ("gatv2", "gat", "transformer")


def _check_index(name: str, index, size: Optional[int], what: str = "") -> None:
    """``index`` must be a 1-D integer tensor with values in [0, size) (values checked outside tracing; size None:
    the type and shape alone). ``what`` names the range in the message; ``{size}`` in it is filled in only when the
    message is raised (formatting a symbolic size eagerly made strict torch.export fix it to the example's)."""
    if not isinstance(index, Tensor):
        raise TypeError(f"{name} must be a 1-D integer tensor, got {type(index).__name__}")
    if index.dim() != 1 or index.dtype not in (torch.long, torch.int32):
        raise ValueError(f"{name} must be a 1-D int64/int32 tensor, got {index.dtype} {tuple(index.shape)}")
    if size is not None and index.numel() and not is_tracing():
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= size:
            bad = low if low < 0 else high
            raise ValueError(f"{name} value {bad} is out of range for {what.format(size=size)} (valid: 0..{size - 1})")


def make_conv(conv: str, in_channels, out_channels: int, **kwargs) -> nn.Module:
    """A GATv2Conv, GATConv or TransformerConv. GATConv ignores GATv2-only arguments (share_weights);
    TransformerConv ignores the GAT-only ones (share_weights, add_self_loops, residual: its ``root_weight`` skip term,
    on unless ``root_weight=False`` is given, carries a node's own features instead of a self loop or a residual
    projection)."""
    # imported when a layer is built: zoo.attention.graph imports torch_geometric (its MessagePassing base),
    # which registering these models (every create_model / list_models call) must not pay for
    from zoo.attention.graph import GATConv, GATv2Conv, TransformerConv

    if conv == "gatv2":
        return GATv2Conv(in_channels, out_channels, **kwargs)
    if conv == "gat":
        kwargs.pop("share_weights", None)
        return GATConv(in_channels, out_channels, **kwargs)
    if conv == "transformer":
        for gat_only in ("share_weights", "add_self_loops", "residual"):
            kwargs.pop(gat_only, None)
        return TransformerConv(in_channels, out_channels, **kwargs)
    raise ValueError(f"conv must be one of {CONVS}, got {conv!r}")


def global_mean_pool(x_NC: Tensor, batch_N: Tensor, num_graphs: int) -> Tensor:
    """Mean of the node features of each graph -> [G, C], in x's dtype (as PyG's global_mean_pool with
    ``size=num_graphs``; see :func:`_num_graphs` for the count PyG infers without it).

    fp16 / bf16 features are summed and counted in fp32: accumulated in their own dtype, a count stops at 256
    (bf16) or 2048 (fp16), and so does a sum of ones."""
    wide = torch.promote_types(x_NC.dtype, torch.float32)
    sums = x_NC.new_zeros(num_graphs, x_NC.size(1), dtype=wide).index_add_(0, batch_N, x_NC.to(wide))
    # counted by index_add_ rather than bincount, whose output length depends on the values (a graph break
    # under torch.compile)
    counts = sums.new_zeros(num_graphs).index_add_(0, batch_N, sums.new_ones(batch_N.numel())).clamp_(min=1)
    return (sums / counts[:, None]).to(x_NC.dtype)


def _num_graphs(batch_N: Tensor) -> int:
    """The graph count PyG's pooling infers when none is given (torch_geometric.utils.scatter, through
    global_mean_pool(x, batch) without ``size``): ``batch.max() + 1``, 0 for no nodes. Graphs after the last one
    that has nodes are not seen; reading the maximum is a host sync (a graph break under torch.compile, refused by
    torch.export), which passing ``num_graphs`` avoids."""
    return int(batch_N.max()) + 1 if batch_N.numel() else 0


def _check_edge_dim(edge_dim) -> Optional[int]:
    if edge_dim is not None:
        check_ints(edge_dim=edge_dim)
    return edge_dim


def _check_edge_attr(edge_dim: Optional[int], edge_attr: Optional[Tensor]) -> None:
    """edge_attr and edge_dim go together: named here, at the model's call, rather than by the first layer."""
    if edge_dim is not None and edge_attr is None:
        raise ValueError(f"the model was built with edge_dim={edge_dim}: pass edge_attr [E, {edge_dim}] "
                         "(forward(..., edge_attr=...))")
    if edge_dim is None and edge_attr is not None:
        raise ValueError("edge_attr was given but the model was built without edge features: build it with "
                         "edge_dim=<number of edge features> (+model.edge_dim=... on the zoo train command line)")


# ----------------------------------------------------------------------------------------------------
# Node classification (transductive, full batch)
# ----------------------------------------------------------------------------------------------------
class GATNodeClassifier(nn.Module):
    """Velickovic et al.'s transductive GAT (or GATv2, or graph transformer layers): ``num_layers`` attention
    layers, hidden ones
    with ``heads`` concatenated heads and ELU, the last with ``out_heads`` averaged heads -> K logits.
    Dropout ``dropout`` on the inputs of every layer and on the attention coefficients.
    ``edge_dim``: the number of edge features; every layer then takes ``edge_attr`` [E, edge_dim] (its
    ``lin_edge``, as PyG's layers with ``edge_dim``), and forward needs it."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        hidden_channels: int = 8,
        heads: int = 8,
        out_heads: int = 1,
        num_layers: int = 2,
        conv: str = "gatv2",
        dropout: float = 0.6,
        share_weights: bool = False,
        residual: bool = False,
        add_self_loops: bool = True,
        edge_dim: Optional[int] = None,
    ):
        super().__init__()
        check_ints(num_classes=num_classes, hidden_channels=hidden_channels, heads=heads, out_heads=out_heads,
                   num_layers=num_layers)
        self.num_classes = num_classes
        self.dropout = dropout
        self.edge_dim = _check_edge_dim(edge_dim)
        common = dict(dropout=dropout, share_weights=share_weights, residual=residual,
                      add_self_loops=add_self_loops, edge_dim=self.edge_dim)
        self.convs = nn.ModuleList()
        dim = in_channels
        for _ in range(num_layers - 1):
            self.convs.append(make_conv(conv, dim, hidden_channels, heads=heads, **common))
            dim = hidden_channels * heads
        self.convs.append(make_conv(conv, dim, num_classes, heads=out_heads, concat=False, **common))

    def pretrained_head_keys(self) -> list[str]:
        """The classifier is the last attention layer (it outputs the K classes): its keys are re-initialised, with a
        message, when a checkpoint is loaded with another num_classes (zoo.hub.head_keys)."""
        last = f"convs.{len(self.convs) - 1}."
        return [key for key in self.state_dict() if key.startswith(last)]

    def forward(self, x_NF: Tensor, edge_index: Tensor, return_attention_weights: bool = False, *,
                edge_attr: Optional[Tensor] = None):
        """-> logits [N, K] (and a list of (edge_index, alpha [E', H]) per layer when asked). ``edge_attr``
        [E, edge_dim] (keyword): the edge features every layer reads, for a model built with ``edge_dim``."""
        _check_edge_attr(self.edge_dim, edge_attr)
        attn = []
        x = x_NF
        for i, conv in enumerate(self.convs):
            x = F.dropout(x, self.dropout, self.training)
            if return_attention_weights:
                x, a = conv(x, edge_index, edge_attr, return_attention_weights=True)
                attn.append(a)
            else:
                x = conv(x, edge_index, edge_attr)
            if i < len(self.convs) - 1:
                x = F.elu(x)
        return (x, attn) if return_attention_weights else x

    @torch.no_grad()
    def inference(self, x_NF: Tensor, edge_index: Tensor, *, edge_attr: Optional[Tensor] = None,
                  batch_size: int = 4096, sampler=None, device=None) -> Tensor:
        """Layer-wise inference for graphs too large for one full-graph :meth:`forward`: logits [N, K], equal to the
        eval-mode ``forward`` (up to float rounding), on ``x``'s device.

        PyG's pattern for large graphs (examples/reddit.py ``SAGE.inference``; ``BasicGNN.inference`` in
        torch_geometric/nn/models/basic_gnn.py, over a ``NeighborLoader(num_neighbors=[-1])``): each layer runs over
        every node before the next starts, in chunks of ``batch_size`` consecutive nodes. A chunk's layer input is its
        nodes and their in-neighbours with all their in-edges (:meth:`zoo.tasks.graph.sampling.NeighborSampler.sample`
        with ``[-1]``, the chunk's nodes first), and the layer is called bipartite -- sources the neighbourhood,
        destinations the chunk -- so each node aggregates exactly what the full graph gives it (its self loop
        included) and no output is computed for the neighbours.

        Memory: the per-edge working memory of one chunk instead of the whole graph's. ``x``, ``edge_index``,
        ``edge_attr`` and the [N, width] layer outputs stay where ``x`` is (PyG's ``embedding_device``; keep them on
        the CPU for a graph that does not fit an accelerator); each chunk's rows go to ``device`` (default: the
        model's), run there and come back. It pays off when a chunk's neighbourhood is much smaller than the graph;
        the time is higher than one forward's (each chunk projects its whole neighbourhood; docs/graph.md).

        ``sampler``: a NeighborSampler of this ``edge_index`` (its in-edge CSR, O(E log E) to build), to reuse across
        calls; built here when not given, and checked against ``edge_index`` (O(E)) when given. Runs without
        autograd, in eval mode only (dropout between the layers would make it another model than ``forward``'s):
        call ``model.eval()`` first."""
        from zoo.tasks.graph.sampling import NeighborSampler

        if self.training:
            raise RuntimeError("GATNodeClassifier.inference runs the eval-mode model layer by layer: call "
                               "model.eval() first")
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"inference: batch_size must be a positive integer (nodes per chunk), got {batch_size!r}")
        if not isinstance(x_NF, Tensor) or x_NF.dim() != 2:
            raise ValueError(f"inference: x must be a [num_nodes, num_features] tensor, got "
                             f"{tuple(x_NF.shape) if isinstance(x_NF, Tensor) else type(x_NF).__name__}")
        if not isinstance(edge_index, Tensor):
            raise TypeError(f"inference: edge_index must be a torch.Tensor [2, E], got {type(edge_index).__name__}")
        if edge_index.layout != torch.strided:
            raise ValueError(f"inference takes edge_index [2, E] (source row first), not a sparse adjacency "
                             f"({edge_index.layout}): pass its edges, e.g. adj_t.to_sparse_coo().indices().flip(0) "
                             f"for a [dst, src] adj_t")
        # the forward's checks, here rather than in a chunk's layer call (a given sampler is read instead of
        # edge_index, so a float or [3, E] edge_index passed; a chunk's sizes were named)
        if edge_index.dim() != 2 or edge_index.size(0) != 2:
            raise ValueError(f"edge_index must have shape [2, E], got {tuple(edge_index.shape)}")
        if edge_index.dtype == torch.bool or edge_index.is_floating_point() or edge_index.is_complex():
            raise TypeError(f"edge_index must be an integer (int64) tensor, got dtype {edge_index.dtype}")
        _check_edge_attr(self.edge_dim, edge_attr)
        num_nodes, num_edges = x_NF.size(0), edge_index.size(-1)
        if edge_attr is not None:
            if not isinstance(edge_attr, Tensor) or not edge_attr.is_floating_point():
                raise TypeError(f"edge_attr must be a floating-point tensor, got "
                                f"{edge_attr.dtype if isinstance(edge_attr, Tensor) else type(edge_attr).__name__}")
            if edge_attr.dim() not in (1, 2):
                raise ValueError(f"edge_attr must be [E] or [E, D], got shape {tuple(edge_attr.shape)}")
            if edge_attr.size(0) != num_edges:
                raise ValueError(f"edge_attr has {edge_attr.size(0)} rows but edge_index has {num_edges} edges")
        width = getattr(self.convs[0], "in_channels", None)
        if isinstance(width, int) and width > 0 and x_NF.size(1) != width:
            raise ValueError(f"x has {x_NF.size(1)} features, the layer expects {width}")
        if sampler is None:
            sampler = NeighborSampler(edge_index.cpu(), num_nodes)
        else:
            _check_sampler_of(sampler, edge_index, num_nodes)
        if num_nodes == 0:  # nothing to chunk: the forward's own empty-graph result
            return self.forward(x_NF, edge_index, edge_attr=edge_attr)
        if device is None:
            device = next(self.parameters()).device
        home = x_NF.device  # where x, the layer outputs and the result stay
        chunks = [torch.arange(start, min(start + batch_size, num_nodes)) for start in range(0, num_nodes, batch_size)]
        x = x_NF
        for i, conv in enumerate(self.convs):
            out = None
            for nodes in chunks:
                sub = sampler.sample(nodes, [-1])
                x_sub = x[sub.n_id.to(home)].to(device)
                extra = () if edge_attr is None else (edge_attr[sub.e_id.to(edge_attr.device)].to(device),)
                # bipartite: sources the neighbourhood, destinations the chunk (its first rows)
                y = conv((x_sub, x_sub[:nodes.numel()]), sub.edge_index.to(device), *extra)
                if out is None:
                    out = torch.empty(num_nodes, y.size(-1), dtype=y.dtype, device=home)
                out[nodes.to(home)] = y.to(home)
            x = F.elu(out) if i < len(self.convs) - 1 else out
        return x


def _check_sampler_of(sampler, edge_index: Tensor, num_nodes: int) -> None:
    """``sampler`` must be a NeighborSampler built from exactly this ``edge_index`` (its CSR's sources and
    destinations gathered from it, O(E)): one of another graph with the same sizes gave another graph's logits."""
    from zoo.tasks.graph.sampling import NeighborSampler

    if not isinstance(sampler, NeighborSampler):
        raise TypeError(f"inference: sampler must be a zoo.tasks.graph.sampling.NeighborSampler of this graph, got "
                        f"{type(sampler).__name__}")
    if sampler.num_nodes != num_nodes or sampler.edge_ids.numel() != edge_index.size(-1):
        raise ValueError(f"inference: the sampler was built from a graph of {sampler.num_nodes} nodes and "
                         f"{sampler.edge_ids.numel()} edges, but x has {num_nodes} nodes and edge_index "
                         f"{edge_index.size(-1)} edges: build it from this edge_index")
    edges = edge_index.cpu().long()[:, sampler.edge_ids]
    destinations = torch.repeat_interleave(torch.arange(num_nodes), sampler.in_degree)
    if not (torch.equal(edges[0], sampler.sources) and torch.equal(edges[1], destinations)):
        raise ValueError("inference: the sampler was built from another edge_index than the one given (same sizes, "
                         "other edges): build it from this edge_index")


# ----------------------------------------------------------------------------------------------------
# Graph classification (mini-batches of small graphs)
# ----------------------------------------------------------------------------------------------------
class GATGraphClassifier(nn.Module):
    """``num_layers`` attention layers (concatenated heads, ELU, residual projection), mean pooling
    over each graph's nodes, a linear head -> [G, K]. ``edge_dim``: as :class:`GATNodeClassifier`'s."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        hidden_channels: int = 32,
        heads: int = 4,
        num_layers: int = 3,
        conv: str = "gatv2",
        dropout: float = 0.0,
        edge_dim: Optional[int] = None,
    ):
        super().__init__()
        # num_layers=0 would pool the raw features: the graph would be ignored
        check_ints(num_classes=num_classes, hidden_channels=hidden_channels, heads=heads, num_layers=num_layers)
        self.num_classes = num_classes
        self.edge_dim = _check_edge_dim(edge_dim)
        self.convs = nn.ModuleList()
        dim = in_channels
        for _ in range(num_layers):
            self.convs.append(make_conv(conv, dim, hidden_channels, heads=heads, dropout=dropout, residual=True,
                                        edge_dim=self.edge_dim))
            dim = hidden_channels * heads
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor, edge_index: Tensor, batch: Optional[Tensor] = None,
                num_graphs: Optional[int] = None, *, edge_attr: Optional[Tensor] = None) -> Tensor:
        """x [N, F], batch [N]: the graph (0..num_graphs-1) of each node -> logits [G, K], called as PyG's models and
        pooling are (PyG's argument names, so ``batch=`` works as a keyword): ``batch`` None is one graph
        (torch_geometric.nn.global_mean_pool(x, None)), ``num_graphs`` None is ``batch.max() + 1``
        (global_mean_pool(x, batch)). Passing ``num_graphs`` (as the data modules' batches do) avoids reading the
        batch vector on the host: under torch.compile a Python int keeps the graph whole, and torch.export needs it
        (it cannot read the batch's values). ``edge_attr`` [E, edge_dim] (keyword): for a model built with
        ``edge_dim``."""
        x_NF, batch_N = x, batch
        if batch_N is None:
            batch_N = torch.zeros(x_NF.size(0), dtype=torch.long, device=x_NF.device)
            num_graphs = 1 if num_graphs is None else num_graphs
        if isinstance(batch_N, Tensor) and batch_N.dim() == 1 and batch_N.numel() != x_NF.size(0):
            raise ValueError(f"batch has {batch_N.numel()} entries but x has {x_NF.size(0)} nodes (one graph index per node)")
        if num_graphs is None:
            if in_torch_export():
                raise ValueError(f"{type(self).__name__}: torch.export cannot read the batch vector's values: pass "
                                 "num_graphs (a Python int) as the fourth argument to export")
            _check_index("batch", batch_N, None)  # the type and shape, before its maximum is read
            num_graphs = _num_graphs(batch_N)
            what = f"num_graphs={num_graphs} (batch.max() + 1)"
        else:
            check_ints(num_graphs=num_graphs)
            what = f"num_graphs={num_graphs}"
        _check_index("batch", batch_N, num_graphs, what)
        _check_edge_attr(self.edge_dim, edge_attr)
        h = x_NF
        for conv in self.convs:
            h = F.elu(conv(h, edge_index, edge_attr))
        return self.head(self.norm(global_mean_pool(h, batch_N, num_graphs)))


# ----------------------------------------------------------------------------------------------------
# DictionaryLookup (Brody et al. 2022, section 4.1)
# ----------------------------------------------------------------------------------------------------
class DictionaryLookupNet(nn.Module):
    """The paper's DictionaryLookup model: node features (key, value) embedded by two tables of k+1
    rows (value k = EMPTY on query nodes), summed, ReLU; one attention layer (``heads`` heads of
    dim // heads channels, concatenated); a bias-free linear head on the query nodes -> k logits.
    ``num_classes`` = k (values), ``in_channels`` = k (keys; the same k in the benchmark).

    As in the official code: GATv2 uses share_weights=True, bias=False, add_self_loops=False; GAT uses
    add_self_loops=True. (The official model also applies ``F.dropout(x)`` with p=0.5 after the layer
    in train and eval mode alike -- a quirk not reproduced here: no dropout.)
    """

    def __init__(self, num_classes: int, in_channels: Optional[int] = None, dim: int = 128, heads: int = 1,
                 conv: str = "gatv2"):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int):
            raise ValueError(f"num_classes (k) must be an integer >= 2, got {num_classes!r}")
        check_ints(dim=dim, heads=heads)
        k = int(num_classes)
        if k < 2:
            raise ValueError(f"num_classes (k) must be >= 2, got {k}")
        if in_channels is not None and int(in_channels) != k:
            raise ValueError(f"DictionaryLookup has as many keys as values: in_channels={in_channels} != k={k}")
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.k = k
        self.num_classes = k
        self.key_embed = nn.Embedding(k + 1, dim)
        self.value_embed = nn.Embedding(k + 1, dim)
        if conv == "gatv2":
            self.conv = make_conv(conv, dim, dim // heads, heads=heads, bias=False, share_weights=True,
                                  add_self_loops=False)
        elif conv == "gat":
            self.conv = make_conv(conv, dim, dim // heads, heads=heads, add_self_loops=True)
        elif conv == "transformer":  # no bias, as GATv2's; the root-weight skip kept (without it, lin_skip, which
            # PyG's layer builds whatever root_weight is, would be a parameter without a gradient)
            self.conv = make_conv(conv, dim, dim // heads, heads=heads, bias=False)
        else:
            raise ValueError(f"conv must be one of {CONVS}, got {conv!r}")
        self.head = nn.Linear(dim, k, bias=False)

    def forward(self, x_N2: Tensor, edge_index: Tensor, target_index: Tensor, return_attention_weights: bool = False):
        """x_N2 [N, 2] long (key, value); edge_index [2, E]; target_index [Q] query nodes -> [Q, k]."""
        if x_N2.dtype != torch.long or x_N2.dim() != 2 or x_N2.size(1) != 2:
            raise ValueError(f"x must be a [N, 2] long tensor of (key, value), got {x_N2.dtype} {tuple(x_N2.shape)}")
        if x_N2.numel() and not is_tracing() and (int(x_N2.min()) < 0 or int(x_N2.max()) > self.k):
            raise ValueError(f"keys/values must be in [0, {self.k}] (k={self.k}, {self.k} = EMPTY)")
        _check_index("target_index", target_index, x_N2.size(0), "{size} nodes")
        h = F.relu(self.key_embed(x_N2[:, 0]) + self.value_embed(x_N2[:, 1]))
        if return_attention_weights:
            h, attn = self.conv(h, edge_index, return_attention_weights=True)
            return self.head(h[target_index]), attn
        return self.head(self.conv(h, edge_index)[target_index])


# ----------------------------------------------------------------------------------------------------
# Registered constructors
# ----------------------------------------------------------------------------------------------------
def _fixed_conv(name: str, conv: str, kwargs: dict) -> None:
    """The registered names fix the layer type: a conv= argument is refused with the names to use instead."""
    if "conv" in kwargs:
        others = " or ".join(name.replace(conv, other, 1).removesuffix("_debug") for other in CONVS if other != conv)
        raise TypeError(f"{name} always uses conv={conv!r} (got conv={kwargs['conv']!r}); for another layer use "
                        f"{others}")


def _node(conv: str, **kwargs) -> GATNodeClassifier:
    kwargs.setdefault("in_channels", 34)
    kwargs.setdefault("num_classes", 4)
    return GATNodeClassifier(conv=conv, **kwargs)


def _graph_classifier(conv: str, **kwargs) -> GATGraphClassifier:
    kwargs.setdefault("in_channels", 8)
    kwargs.setdefault("num_classes", 3)
    return GATGraphClassifier(conv=conv, **kwargs)


@register_model(task="graph", family="gat", default_cfg={"in_channels": 34, "num_classes": 4})
def gatv2_node(**kwargs) -> GATNodeClassifier:
    """GATv2 node classifier, the GAT paper's transductive recipe (8 heads x 8, ELU, dropout 0.6)."""
    _fixed_conv("gatv2_node", "gatv2", kwargs)
    return _node("gatv2", **kwargs)


@register_model(task="graph", family="gat", default_cfg={"in_channels": 34, "num_classes": 4})
def gat_node(**kwargs) -> GATNodeClassifier:
    """GAT node classifier (Velickovic et al. 2018, transductive Cora recipe)."""
    _fixed_conv("gat_node", "gat", kwargs)
    return _node("gat", **kwargs)


@register_model(task="graph", family="gat", default_cfg={"in_channels": 34, "num_classes": 4})
def gatv2_node_debug(**kwargs) -> GATNodeClassifier:
    """Tiny GATv2 node classifier for tests (2 heads x 4)."""
    _fixed_conv("gatv2_node_debug", "gatv2", kwargs)
    kwargs.setdefault("hidden_channels", 4)
    kwargs.setdefault("heads", 2)
    return _node("gatv2", **kwargs)


@register_model(task="graph", family="gat", default_cfg={"in_channels": 8, "num_classes": 3})
def gatv2_graph(**kwargs) -> GATGraphClassifier:
    """GATv2 graph classifier (3 layers, 4 heads x 32, mean pooling)."""
    _fixed_conv("gatv2_graph", "gatv2", kwargs)
    return _graph_classifier("gatv2", **kwargs)


@register_model(task="graph", family="gat", default_cfg={"in_channels": 8, "num_classes": 3})
def gat_graph(**kwargs) -> GATGraphClassifier:
    """GAT graph classifier (3 layers, 4 heads x 32, mean pooling)."""
    _fixed_conv("gat_graph", "gat", kwargs)
    return _graph_classifier("gat", **kwargs)


@register_model(task="graph", family="gat", default_cfg={"in_channels": 8, "num_classes": 3})
def gatv2_graph_debug(**kwargs) -> GATGraphClassifier:
    """Tiny GATv2 graph classifier for tests."""
    _fixed_conv("gatv2_graph_debug", "gatv2", kwargs)
    kwargs.setdefault("hidden_channels", 4)
    kwargs.setdefault("heads", 2)
    kwargs.setdefault("num_layers", 2)
    return _graph_classifier("gatv2", **kwargs)


@register_model(task="graph", family="gat", default_cfg={"num_classes": 10})
def gatv2_dictlookup(**kwargs) -> DictionaryLookupNet:
    """GATv2 DictionaryLookup model of Brody et al. 2022 (dim 128, 1 head)."""
    _fixed_conv("gatv2_dictlookup", "gatv2", kwargs)
    kwargs.setdefault("num_classes", 10)
    return DictionaryLookupNet(conv="gatv2", **kwargs)


@register_model(task="graph", family="gat", default_cfg={"num_classes": 10})
def gat_dictlookup(**kwargs) -> DictionaryLookupNet:
    """GAT DictionaryLookup model (static attention: cannot express the lookup with one head)."""
    _fixed_conv("gat_dictlookup", "gat", kwargs)
    kwargs.setdefault("num_classes", 10)
    return DictionaryLookupNet(conv="gat", **kwargs)


@register_model(task="graph", family="gat", default_cfg={"num_classes": 4})
def gatv2_dictlookup_debug(**kwargs) -> DictionaryLookupNet:
    """Tiny DictionaryLookup model (k=4, dim 16)."""
    _fixed_conv("gatv2_dictlookup_debug", "gatv2", kwargs)
    kwargs.setdefault("num_classes", 4)
    kwargs.setdefault("dim", 16)
    return DictionaryLookupNet(conv="gatv2", **kwargs)


@register_model(task="graph", family="gat", default_cfg={"in_channels": 34, "num_classes": 4})
def transformer_node(**kwargs) -> GATNodeClassifier:
    """Graph transformer node classifier: the GAT recipe's layers (8 heads x 8, ELU, dropout 0.6) as
    TransformerConv layers (dot-product attention over the edges, root-weight skip instead of self loops)."""
    _fixed_conv("transformer_node", "transformer", kwargs)
    return _node("transformer", **kwargs)


@register_model(task="graph", family="gat", default_cfg={"in_channels": 8, "num_classes": 3})
def transformer_graph(**kwargs) -> GATGraphClassifier:
    """Graph transformer graph classifier (3 TransformerConv layers, 4 heads x 32, mean pooling)."""
    _fixed_conv("transformer_graph", "transformer", kwargs)
    return _graph_classifier("transformer", **kwargs)


@register_model(task="graph", family="gat", default_cfg={"num_classes": 10})
def transformer_dictlookup(**kwargs) -> DictionaryLookupNet:
    """DictionaryLookup model with one TransformerConv layer (dim 128, 1 head): dot-product attention is dynamic,
    so, like GATv2's and unlike GAT's, it can express the lookup."""
    _fixed_conv("transformer_dictlookup", "transformer", kwargs)
    kwargs.setdefault("num_classes", 10)
    return DictionaryLookupNet(conv="transformer", **kwargs)
