"""Graph attention layers with PyTorch Geometric's API, on the zoo's fused segment softmax.

* :class:`GATv2Conv` -- Brody, Alon, Yahav, "How Attentive are Graph Attention Networks?" (ICLR 2022,
  arXiv:2105.14491): dynamic attention ``alpha_ji = softmax_j(a . LeakyReLU(W_s x_j + W_t x_i
  (+ W_e e_ji)))``.
* :class:`GATConv` -- Velickovic et al., "Graph Attention Networks" (ICLR 2018, arXiv:1710.10903):
  static attention ``alpha_ji = softmax_j(LeakyReLU(a_s . W x_j + a_t . W x_i (+ a_e . W_e e_ji)))``.

Both follow torch_geometric 2.8.1 (torch_geometric/nn/conv/gatv2_conv.py, gat_conv.py) argument for
argument: constructor arguments, state-dict keys and shapes (a PyG state dict loads with strict=True and
gives the same outputs, attention weights and gradients), self-loop handling (existing loops removed,
one loop per node i < min(N_src, N_dst) appended, its edge features from ``fill_value``), the
``return_attention_weights`` protocol, torch sparse adjacency input (``adj_t[dst, src]``, CSR/CSC/COO),
and the repr. What differs is the computation: PyG materialises several [E, H, C] tensors and keeps them
for backward; here the score, softmax and aggregation are fused per block of destination nodes and
recomputed in backward (zoo/attention/segment.py on CPU, zoo/kernels/edge_softmax.py on CUDA), so
memory is O(N H C + E H) instead of O(E H C); on CPU GATv2's target projection ``lin_r`` is applied
inside the fused function, block by block, so ``lin_r(x)`` and its gradient are never whole tensors
(the parameters, keys and results are PyG's all the same). The destination-sorted CSR is built once per edge_index
and cached on the module, keyed on the tensor object, its version counter and a content fingerprint (see
``_edge_index_fingerprint``), so an edge_index edited in place without a version bump (through a numpy array
it shares memory with, or ``.data``) is rebuilt and validated again.

Letters: N nodes (Ns source, Nd destination), E edges, H heads, C channels per head, D edge features.

``in_channels=-1`` (or -1 in a pair) sizes the projections from the first input, or from a loaded state dict,
as PyG's lazy initialisation does. Not supported (raise a clear error): torch_sparse ``SparseTensor`` input
(pyg-lib/torch_sparse are not installed; use a torch sparse tensor), static graphs (3-D x).

Both layers are ``torch_geometric.nn.MessagePassing`` subclasses (sum aggregation by default, node dimension 0, as
PyG's; another ``aggr`` runs PyG's ``propagate`` with ``self.aggr_module``, as PyG's layers do), so PyG's tools that look for message-passing layers find them: ``to_hetero`` (one copy per edge
type, summed per destination type), ``HeteroConv``, and the explainers (``GNNExplainer``/``PGExplainer``
edge masks through ``explain_message``, ``AttentionExplainer`` through a message forward hook). The fused
path never calls ``propagate``; while PyG's explain mode is on, a propagate/message/aggregate/edge-update hook
is registered or a torch.func transform (vmap, grad, jacrev) is active, a layer runs PyG's unfused
``edge_updater`` (PyG's ``edge_update``) and ``propagate`` instead (plain autograd, [E, H, C] messages, the
masks and hooks applied exactly where PyG applies them), so explanations equal those of PyG's layers.

Under torch.compile the layers compile as one graph (``fullgraph=True``): the graph structure (values checked, self
loops, CSR sort; ``zoo::graph_structure`` below) and the fused attention (zoo/attention/segment.py: the PyTorch
path, and on CUDA the Triton GATv2 kernel) are custom operators, opaque nodes that run eagerly inside the compiled
graph, so the fused memory-light path is kept; the structure is rebuilt per call there (no cache) and the NaN / Inf
checks of the features are skipped. A sparse adjacency still runs between compiled graphs (a graph break).
torch.export cannot break a
graph: there the layers take that unfused path too, with the structure traced (PyG's remove/add self loops on a
symbolic N and E), so they export as PyG's layers do, with PyG's [E, H, C]
memory, edge_index values unchecked (as in PyG) and a [2, E] edge_index only (not a sparse adjacency).
"""
from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.nn.aggr import SumAggregation
from torch_geometric.nn.conv import MessagePassing
from torch_geometric.typing import OptPairTensor, OptTensor, PairTensor

from zoo.attention.edge_backend import _edge_index_fingerprint  # shared with the "edges" attend backend
from zoo.attention.segment import (
    CSR,
    build_csr,
    check_edge_index,
    edge_dot,
    gatv2_attention,
    segment_softmax,
    segment_softmax_aggregate,
)
from zoo.layers import (
    CachesDroppedWhenCopied, call_outside_graph, check_flag, check_like_weights, in_torch_export, in_torch_func,
    is_tracing,
)

__all__ = ["GATv2Conv", "GATConv", "TransformerConv", "GraphStructure", "graph_structure", "CachedGraphLayer"]

_FILL_REDUCE = ("add", "sum", "mean", "min", "max", "mul")


# ----------------------------------------------------------------------------------------------------
# Graph structure: edge_index / sparse adjacency -> validated, self loops, CSR by destination (cached)
# ----------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class GraphStructure:
    """A graph ready for the fused kernels: ``csr`` over the edges PyG would use (input edges minus
    removed self loops, then the added loops), plus how to map edge features and attention back. Under
    torch.export ``csr`` is None: the exported layers run PyG's ``propagate`` on ``edge_index`` (see
    :meth:`CachedGraphLayer._graph`), and a sort nobody reads would stay in the exported program."""

    csr: Optional[CSR]
    num_input_edges: int
    kept: Optional[Tensor]  # input edge ids kept (self loops removed), None when nothing was removed
    num_loops: int  # loops appended at the end, for nodes 0..num_loops-1
    edge_index: Tensor  # [2, E'] the edges in PyG's order (kept input edges, then loops)
    num_src: int  # Ns, Nd (symbolic under torch.export)
    num_dst: int
    sparse_layout: Optional[torch.layout] = None  # layout of a sparse adjacency input
    sparse_size: Optional[tuple] = None  # (Nd, Ns) of a sparse adjacency input
    # a sparse adjacency's entries in its storage order (the order of its edge_attr rows) -> edge_index order;
    # None when they already agree (or for a [2, E] edge_index); see _sparse_to_edge_index
    storage_order: Optional[Tensor] = None
    sparse_coalesced: bool = True  # False for a COO adjacency with duplicate entries (merged here)

    def pyg_edge_order(self) -> Optional[Tensor]:
        """Where PyG's layer holds each edge, when that differs from ``edge_index``'s order: for a sparse adjacency
        with added self loops, PyG coalesces the loops into its (dst, src) row-major order, where they are appended
        here. Returns o with PyG's j-th edge at ``edge_index[:, o[j]]``, or None when the orders agree. (What draws
        per edge in PyG's order, the attention dropout, uses it.)"""
        if self.sparse_layout is None or not self.num_loops:
            return None
        src, dst = self.edge_index[0], self.edge_index[1]
        return torch.argsort(dst * max(1, self.num_src) + src, stable=True)


def _sparse_to_edge_index(adj: Tensor, coo_without_duplicates: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """``adj_t[dst, src]`` (CSR, CSC or COO) -> ([2, E] (src, dst) sorted by (dst, src), the permutation from the
    entries' storage order to that order, or None when it is the identity). Edge features of a sparse adjacency
    come in its storage order (as its values do): column-major for CSC. ``coo_without_duplicates``: the
    :func:`_coo_without_duplicates` answer for a COO ``adj``, computed by the caller."""
    if adj.layout == torch.sparse_csr:
        crow, col = adj.crow_indices(), adj.col_indices()
        dst = torch.repeat_interleave(torch.arange(adj.size(0), device=adj.device), crow.diff())
        src = col
    elif adj.layout == torch.sparse_csc:
        ccol, row = adj.ccol_indices(), adj.row_indices()
        src = torch.repeat_interleave(torch.arange(adj.size(1), device=adj.device), ccol.diff())
        dst = row
    elif adj.layout == torch.sparse_coo:
        # the stored entries (a transposed adj.t() is uncoalesced but has an order); duplicates are merged
        idx = adj._indices() if coo_without_duplicates else adj.coalesce().indices()
        dst, src = idx[0], idx[1]
    else:
        raise TypeError(f"unsupported sparse layout {adj.layout} (use sparse CSR, CSC or COO)")
    key = dst * max(1, adj.size(1)) + src
    order = torch.argsort(key, stable=True)
    identity = bool((order == torch.arange(order.numel(), device=order.device)).all())
    return torch.stack([src[order], dst[order]]).long(), None if identity else order


def _coo_without_duplicates(adj: Tensor) -> bool:
    if adj.is_coalesced():
        return True
    idx = adj._indices()
    return torch.unique(idx[0] * max(1, adj.size(1)) + idx[1]).numel() == idx.size(1)


def graph_structure(edge_index, num_src: int, num_dst: int, add_self_loops: bool) -> GraphStructure:
    """Validate ``edge_index`` ([2, E] integer tensor or torch sparse ``adj_t`` of size [Nd, Ns]) and
    build the structure: remove + add self loops as PyG does, sort by destination.

    Under torch.export the steps that read index values on the host (the range checks, the "any self loop?"
    shortcut, the sparse-storage checks) cannot run on the symbolic graph: the index values are not checked,
    existing self loops are always dropped through a mask (torch_geometric.utils.remove_self_loops does the same),
    and a sparse adjacency is refused (see :meth:`CachedGraphLayer._graph`)."""
    exporting = in_torch_export()
    layout = size = None
    if isinstance(edge_index, Tensor) and edge_index.layout != torch.strided and exporting:
        raise TypeError(
            "torch.export of the zoo graph layers takes a [2, E] edge_index, not a sparse adjacency: export with "
            "the (src, dst) index of adj_t (adj_t.to_sparse_coo().indices().flip(0))"
        )
    if isinstance(edge_index, Tensor) and edge_index.layout != torch.strided:
        if edge_index.dim() != 2:
            raise ValueError(
                f"a sparse adjacency must be 2-D [num_dst, num_src], got size {tuple(edge_index.shape)}"
            )
        if tuple(edge_index.shape) != (num_dst, num_src):
            raise ValueError(
                f"sparse adjacency has size {tuple(edge_index.shape)} but the features give "
                f"[num_dst={num_dst}, num_src={num_src}]: pass the transposed adjacency adj_t [num_dst, num_src] "
                "(adj.t()), as PyG does, with features of those sizes"
            )
        layout, size = edge_index.layout, tuple(edge_index.shape)
        coalesced = layout != torch.sparse_coo or _coo_without_duplicates(edge_index)
        edge_index, storage_order = _sparse_to_edge_index(edge_index, coalesced)
    elif type(edge_index).__name__ == "SparseTensor":
        raise TypeError("torch_sparse.SparseTensor is not supported; pass a torch sparse tensor (adj.t())")
    else:
        coalesced, storage_order = True, None
    edge_index = check_edge_index(edge_index, num_src, num_dst)
    num_input = edge_index.size(1)
    kept, num_loops = None, 0
    if add_self_loops:
        keep = edge_index[0] != edge_index[1]
        if exporting or not bool(keep.all()):
            kept = keep.nonzero().view(-1)
            edge_index = edge_index[:, kept]
        num_loops = min(num_src, num_dst)
        loops = torch.arange(num_loops, device=edge_index.device).expand(2, -1)
        edge_index = torch.cat([edge_index, loops], dim=1)
    csr = None if exporting else build_csr(edge_index, num_src, num_dst, validate=False)
    return GraphStructure(csr, num_input, kept, num_loops, edge_index, num_src, num_dst, layout, size, storage_order,
                          coalesced)


@torch.library.custom_op("zoo::graph_structure", mutates_args=())
def _graph_structure_op(edge_index: Tensor, num_src: int, num_dst: int,
                        add_self_loops: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`graph_structure` of a [2, E] edge_index as a custom operator, for torch.compile: the values are checked
    (the eager messages, raised when the compiled graph runs), self loops removed and added, the edges sorted into the
    CSR, all eagerly at run time, one opaque node of the graph. -> (rowptr [Nd+1], col [E'], row [E'], perm [E'],
    kept [K] (the input edges kept: every one without ``add_self_loops``), edge_index [2, E'] in PyG's order); E' and
    K depend on the values (the self loops removed): symbolic sizes of the fake implementation below."""
    graph = graph_structure(edge_index, num_src, num_dst, add_self_loops)
    csr = graph.csr
    kept = graph.kept
    if kept is None:  # nothing removed (or no loop handling): every input edge, in order
        kept = torch.arange(graph.num_input_edges, device=edge_index.device)
    # an output may not alias the input: without loops added, graph.edge_index can be the caller's tensor
    edge_index_out = graph.edge_index if graph.num_loops else graph.edge_index.clone()
    edge_index_out = edge_index_out.contiguous()  # as the fake implementation says (inductor checks strides)
    return csr.rowptr, csr.col, csr.row, csr.perm, kept, edge_index_out


@_graph_structure_op.register_fake
def _(edge_index, num_src, num_dst, add_self_loops):
    num_input = edge_index.size(1)
    if add_self_loops:
        num_kept = torch.library.get_ctx().new_dynamic_size()  # input edges that are not self loops: data-dependent
        num_edges = num_kept + torch.sym_min(num_src, num_dst)
    else:
        num_kept = num_edges = num_input
    index = dict(dtype=torch.long, device=edge_index.device)
    return (torch.empty(num_dst + 1, **index), torch.empty(num_edges, **index), torch.empty(num_edges, **index),
            torch.empty(num_edges, **index), torch.empty(num_kept, **index), torch.empty(2, num_edges, **index))


def _compiled_graph_structure(edge_index: Tensor, num_src: int, num_dst: int, add_self_loops: bool) -> GraphStructure:
    """The graph structure while torch.compile traces a layer: the checks that need no values (type, dtype, shape)
    here, the rest in the operator :func:`_graph_structure_op`. Not cached: the compiled graph rebuilds it per call
    (a sort of E edges: cheap next to the attention)."""
    edge_index = check_edge_index(edge_index, num_src, num_dst, check_values=False)  # values: in the operator
    rowptr, col, row, perm, kept, edges = _graph_structure_op(edge_index, num_src, num_dst, add_self_loops)
    num_loops = min(num_src, num_dst) if add_self_loops else 0
    return GraphStructure(CSR(rowptr, col, row, perm, num_src, num_dst), edge_index.size(1),
                          kept if add_self_loops else None, num_loops, edges, num_src, num_dst)


def _loop_attr(edge_attr: Tensor, dst: Tensor, num_dst: int, num_loops: int, fill_value) -> Tensor:
    """Edge features of the added self loops, as torch_geometric.utils.add_self_loops computes them
    (reductions over the edges of each node ``dst`` names, PyG's edge_index[1]; nodes without edges get 0)."""
    shape = (num_loops,) + tuple(edge_attr.shape[1:])
    if fill_value is None:
        return edge_attr.new_ones(shape)
    if isinstance(fill_value, (int, float)) and not isinstance(fill_value, bool):
        return edge_attr.new_full(shape, float(fill_value))
    if isinstance(fill_value, Tensor):
        value = fill_value.to(edge_attr.device, edge_attr.dtype)
        if value.dim() != edge_attr.dim():
            value = value.unsqueeze(0)
        return value.expand(shape).contiguous()
    if isinstance(fill_value, str):
        reduce = {"add": "sum", "sum": "sum", "mean": "mean", "min": "amin", "max": "amax", "mul": "prod"}
        if fill_value not in reduce:
            raise ValueError(f"fill_value must be a number, a tensor or one of {_FILL_REDUCE}, got {fill_value!r}")
        n = max(num_dst, num_loops)
        idx = dst.view(-1, *([1] * (edge_attr.dim() - 1))).expand_as(edge_attr)
        base = edge_attr.new_ones((n,) + shape[1:]) if fill_value == "mul" else edge_attr.new_zeros((n,) + shape[1:])
        out = base.scatter_reduce(0, idx, edge_attr, reduce[fill_value], include_self=False)
        return out[:num_loops]
    raise ValueError(f"fill_value must be a number, a tensor or one of {_FILL_REDUCE}, got {fill_value!r}")


def _check_fill_value(fill_value, edge_dim: Optional[int]) -> None:
    """A number or a tensor must be finite (a NaN / Inf self-loop feature makes every output NaN); a tensor must
    hold ``edge_dim`` values (or one, broadcast), as the self loops' features are [num_loops, edge_dim]."""
    if fill_value is None or (isinstance(fill_value, str) and fill_value in _FILL_REDUCE):
        return
    if isinstance(fill_value, (int, float)) and not isinstance(fill_value, bool):
        if not math.isfinite(fill_value):
            raise ValueError(f"fill_value must be finite, got {fill_value!r}")
        return
    if isinstance(fill_value, Tensor):
        if fill_value.is_complex() or fill_value.dtype == torch.bool:
            raise TypeError(f"fill_value must be a real-valued tensor, got {fill_value.dtype}")
        if fill_value.numel() and not bool(torch.isfinite(fill_value).all()):
            raise ValueError(f"fill_value must be finite, got {fill_value}")
        shape = tuple(fill_value.shape)
        # _loop_attr: a 0-d / 1-D value is a row, expanded to [num_loops, edge_dim]; a 2-D value is [1, *]
        if len(shape) > 2 or (len(shape) == 2 and shape[0] != 1):
            raise ValueError(f"fill_value must be a number or a tensor of edge_dim values, got shape {shape}")
        width = shape[-1] if shape else 1
        if edge_dim not in (None, -1) and width not in (1, edge_dim):
            raise ValueError(f"fill_value has {width} values but edge_dim is {edge_dim} (give {edge_dim} values, "
                             "or one for every feature)")
        return
    raise ValueError(f"fill_value must be a number, a tensor or one of {_FILL_REDUCE}, got {fill_value!r}")


def _check_negative_slope(negative_slope) -> float:
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real):
        raise TypeError(f"negative_slope must be a finite number, got {negative_slope!r}")
    if not math.isfinite(negative_slope):
        raise ValueError(f"negative_slope must be a finite number, got {negative_slope!r}")
    return float(negative_slope)


# ----------------------------------------------------------------------------------------------------
# Shared layer plumbing
# ----------------------------------------------------------------------------------------------------
def _glorot_(t: Tensor) -> None:
    bound = math.sqrt(6.0 / (t.size(-2) + t.size(-1)))
    with torch.no_grad():
        t.uniform_(-bound, bound)


def _init_linear_(lin: nn.Linear) -> None:
    """PyG's Linear(weight_initializer='glorot') initialisation: glorot weight, bias U(+-1/sqrt(in))."""
    _glorot_(lin.weight)
    _init_bias_(lin)


def _init_linear_kaiming_(lin: nn.Linear) -> None:
    """PyG's Linear with its default initialisers (TransformerConv's): kaiming_uniform(fan=in, a=sqrt(5)), i.e. the
    weight U(+-1/sqrt(in)), then the bias U(+-1/sqrt(in)) (torch_geometric/nn/dense/linear.py, reset_weight_ /
    reset_bias_). The bound is computed as PyG's torch_geometric.nn.inits.kaiming_uniform computes it,
    sqrt(6 / ((1 + a**2) * fan)): 1 / sqrt(fan) differs from it in the last bit for some fans (4, 6, 16, ...), which
    a float64 layer's weights keep."""
    fan_in = lin.weight.shape[1]
    a = math.sqrt(5)
    bound = math.sqrt(6 / ((1 + a**2) * fan_in)) if fan_in > 0 else 0.0
    with torch.no_grad():
        lin.weight.uniform_(-bound, bound)
    _init_bias_(lin)


def _init_bias_(lin: nn.Linear) -> None:
    if lin.bias is not None:
        fan_in = lin.weight.shape[1]  # not in_features: a lazy linear sized by a state dict keeps 0 there
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        with torch.no_grad():
            lin.bias.uniform_(-bound, bound)


class _LazyLinear(nn.LazyLinear):
    """PyG's ``in_channels=-1``: an nn.LazyLinear whose size comes from the first input (or from a loaded state
    dict), initialised as PyG's Linear once known; it then becomes a plain nn.Linear. As PyG's Linear, it is lazy in
    its weight alone: the bias is an (uninitialised-memory) [out] Parameter from the start, so a state dict saved
    before the first forward loads into PyG's layer, and PyG's into this one."""

    def __init__(self, out_features: int, bias: bool = True) -> None:
        super().__init__(out_features, bias=bias)
        if bias:  # no random draw: PyG's reset_bias_ skips a bias whose in_channels is still unknown
            self.bias = nn.Parameter(torch.empty(out_features))

    def initialize_parameters(self, input) -> None:
        """nn.LazyLinear's, materialising only what is still uninitialised: a PyG lazy layer saved before its first
        forward holds an uninitialised weight but a materialised bias (PyG's Linear is lazy in its weight alone),
        and loading that state dict leaves our bias a plain Parameter, which has no ``materialize``. Then, as
        torch_geometric.nn.dense.linear.Linear.initialize_parameters does, every parameter is (re)initialised."""
        if not self.has_uninitialized_params():
            return
        with torch.no_grad():
            self.in_features = input.shape[-1]
            if isinstance(self.weight, nn.parameter.UninitializedParameter):
                self.weight.materialize((self.out_features, self.in_features))
            if isinstance(self.bias, nn.parameter.UninitializedParameter):
                self.bias.materialize((self.out_features,))
            self.reset_parameters()

    #: the initialisation once sized (glorot for the GAT layers; kaiming for TransformerConv, set by _linear)
    init_ = staticmethod(_init_linear_)

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params() and self.weight.numel():  # not the (0, 0) stand-in of __init__
            self.init_(self)


def _is_lazy(module) -> bool:
    return isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params()


def _linear(in_features: int, out_features: int, bias: bool, init=_init_linear_) -> nn.Module:
    """nn.Linear with PyG's Linear(weight_initializer='glorot') keys and initialisation (lazy for -1).

    Built without nn.Linear's own (kaiming) initialisation, whose random draws PyG's Linear does not make: the
    layers then consume the random stream exactly as PyG's do, so ``torch.manual_seed(s)`` before building ours
    or PyG's gives the same weights (tests/test_graph_layers.py)."""
    if in_features == -1:
        lazy = _LazyLinear(out_features, bias=bias)
        lazy.init_ = init
        return lazy
    lin = nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias, device=torch.get_default_device())
    init(lin)
    return lin


def _check_channels(name: str, value, lazy_ok: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value == -1 and lazy_ok:
        return
    if value <= 0:
        what = " (or -1: taken from the first input)" if lazy_ok else ""
        raise ValueError(f"{name} must be positive{what}, got {value}")


def _check_features(name: str, x, channels: int) -> Tensor:
    """``channels`` -1: a lazy layer not yet sized, any width."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [num_nodes, features], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if channels != -1 and x.size(1) != channels:
        raise ValueError(f"{name} has {x.size(1)} features, the layer expects {channels}")
    # Value checks are skipped under torch.compile / export (a data-dependent branch there), as attend() does.
    if x.numel() and not is_tracing() and not bool(torch.isfinite(x.detach().sum(dtype=torch.float32))):
        if not bool(torch.isfinite(x.detach()).all()):
            raise ValueError(f"{name} contains NaN or Inf values")
    return x


def _message_passing_flow(layer: str, kwargs: dict) -> bool:
    """PyG's MessagePassing keywords that these layers accept (``**kwargs`` of PyG's constructors): ``aggr`` as the
    default sum ("add" / "sum"), and ``flow``: "source_to_target" (default) or "target_to_source" (messages go
    from edge_index[1] to edge_index[0]; returns True then). Anything else is refused by name: the layer
    aggregates by the attention-weighted sum, fused (PointTransformerConv; the attention layers of this file take
    PyG's other aggregations too: _attention_message_passing_kwargs)."""
    flow = kwargs.get("flow", "source_to_target")
    if flow not in ("source_to_target", "target_to_source"):
        raise ValueError(f"{layer}: flow must be 'source_to_target' or 'target_to_source', got {flow!r}")
    unsupported = {k: v for k, v in kwargs.items() if k != "flow" and not (k == "aggr" and v in ("add", "sum"))}
    if unsupported:
        listed = ", ".join(f"{k}={v!r}" for k, v in sorted(unsupported.items()))
        raise TypeError(f"{layer}: unsupported MessagePassing arguments ({listed}): the aggregation is the "
                        f"attention-weighted sum (PyG's default aggr='add'); flow= is accepted")
    return flow == "target_to_source"


def _equals_one(value) -> bool:
    """``value == 1`` as PyG's ``decomposed_layers`` setter reads it (a string or an array is not one)."""
    if isinstance(value, str):
        return False
    try:
        return bool(value == 1)
    except (TypeError, ValueError, RuntimeError):
        return False


def _attention_message_passing_kwargs(layer: str, kwargs: dict, default_aggr: str) -> tuple:
    """PyG's MessagePassing keywords for the attention layers (``**kwargs`` of PyG's GATConv / GATv2Conv /
    TransformerConv, which call ``MessagePassing.__init__(node_dim=0, **kwargs)``; torch_geometric 2.8.1
    nn/conv/message_passing.py) -> (aggr, aggr_kwargs, flow). Accepted as PyG takes them: ``aggr`` (a name, a list of
    names, or an ``torch_geometric.nn.aggr.Aggregation`` instance; "add" / "sum" run fused, the others PyG's
    ``propagate`` with ``self.aggr_module``), ``aggr_kwargs`` (for PyG's ``aggr_resolver``, e.g. ``mode`` of a list),
    ``flow`` and ``decomposed_layers=1``. Refused by name, with the reason: ``aggr=None`` and ``decomposed_layers``
    other than 1 (PyG's layers build with them but fail in forward), ``node_dim`` (PyG's layers fix it; passing it is
    a TypeError there too) and any other keyword (not a MessagePassing argument)."""
    known = {"aggr", "aggr_kwargs", "flow", "decomposed_layers", "node_dim"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"{layer}: unexpected keyword arguments {unknown}: PyG's layer passes its **kwargs to "
                        f"MessagePassing, which takes aggr, aggr_kwargs, flow and decomposed_layers")
    if "node_dim" in kwargs:
        raise TypeError(f"{layer}: node_dim={kwargs['node_dim']!r} is not accepted: the layer's messages are "
                        f"[E, heads, out_channels] along dimension 0 (PyG's layer fixes node_dim=0 and raises "
                        f"TypeError for it too)")
    decomposed = kwargs.get("decomposed_layers", 1)
    if not _equals_one(decomposed):  # 1, 1.0, True, numpy's 1: PyG's setter compares with ==
        raise ValueError(f"{layer}: decomposed_layers={decomposed!r} is not supported (only 1): PyG's decomposed "
                         f"propagate splits the x_j arguments along their last dimension, which these attention "
                         f"layers cannot be split by (PyG's GAT layers fail on their (x_src, x_dst) pair; its "
                         f"TransformerConv splits keys and values but not the queries, a meaningless result where "
                         f"it runs)")
    aggr = kwargs.get("aggr", default_aggr)
    if aggr is None:
        raise ValueError(f"{layer}: aggr=None is not supported: the messages need an aggregation (PyG's layer builds "
                         f"with aggr=None and then fails in forward calling its missing aggr_module)")
    aggr_kwargs = kwargs.get("aggr_kwargs")
    if aggr_kwargs is not None and not isinstance(aggr_kwargs, dict):
        raise TypeError(f"{layer}: aggr_kwargs must be a dict of the aggregation's arguments, got "
                        f"{type(aggr_kwargs).__name__}")
    _message_passing_flow(layer, {"flow": kwargs.get("flow", "source_to_target")})  # checks the value
    return aggr, aggr_kwargs, kwargs.get("flow", "source_to_target")


class CachedGraphLayer(CachesDroppedWhenCopied, MessagePassing):
    """A PyG message-passing layer whose graph structure (validated edge_index, PyG's self loops when
    ``self.add_self_loops``, destination-sorted CSR) is built once per edge_index and cached on the module
    (keyed on the tensor object, its version counter and a content fingerprint: an edge_index edited without a
    version bump, through numpy or ``.data``, is rebuilt and validated again), and that knows when PyG's
    explainers or hooks need its ``propagate`` instead of a fused path. Subclasses set ``add_self_loops``."""

    def __init__(self, aggr, node_dim: int, layer: str = "", message_passing_kwargs: Optional[dict] = None,
                 aggr_kwargs: Optional[dict] = None):
        super().__init__(aggr=aggr, aggr_kwargs=aggr_kwargs, node_dim=node_dim)
        self._graph_cache = None
        self._reverse_flow = _message_passing_flow(layer or type(self).__name__, message_passing_kwargs or {})

    # ``flow`` is the caller's, as PyG's layer reports it: PyG's tools read ``module.flow`` (the explainers' k-hop
    # subgraph of a node-level explanation), and assigning it switches the layer, as it switches PyG's. The layer
    # flips the edge index itself (_flowing), so its own propagate / edge_updater calls run with the default flow:
    # inside them (and in the hooks they fire) ``flow`` reads "source_to_target" (_default_flow_inside).
    @property
    def flow(self) -> str:
        if self.__dict__.get("_flow_inside") is not None:
            return self.__dict__["_flow_inside"]
        return "target_to_source" if self.__dict__.get("_reverse_flow") else "source_to_target"

    @flow.setter
    def flow(self, value: str) -> None:  # (MessagePassing.__init__ assigns it too, before _reverse_flow is set)
        self._reverse_flow = _message_passing_flow(type(self).__name__, {"flow": value})
        self._graph_cache = None  # built from the flipped or unflipped edge index

    @contextlib.contextmanager
    def _default_flow_inside(self):
        """``self.flow`` reads "source_to_target" inside the block: PyG's propagate / edge_updater read it to pick
        x_i / x_j, and the edge index they get is already flipped to (source, destination) rows."""
        self._flow_inside = "source_to_target"
        try:
            yield
        finally:
            self._flow_inside = None

    # whether PyG's layer sizes a flow="target_to_source" output by its targets (TransformerConv, whose queries,
    # keys and values are separate tensors) rather than by x[0] (the GAT layers: refused with two node sets)
    _reverse_flow_sized_by_targets = False

    # pickle / torch.save(layer) / copy.deepcopy: without the cached graph of the last edge_index (it is rebuilt
    # on the next call; a 500k-edge graph made a 30 KB layer a 33 MB file, with the training graph inside)
    _copied_without = {"_graph_cache": lambda: None}

    # whether the unfused path computes the attention through PyG's ``edge_updater`` (GATConv / GATv2Conv, as
    # PyG's): its edge-update hooks then fire there, so registering one sends the layer down that path
    _uses_edge_updater = False

    def _message_passing_observed(self) -> bool:
        """True while PyG's explain mode is on or a hook waits inside ``propagate`` (or, for a layer that uses
        ``edge_updater``, inside it): the layer must then run ``propagate`` (the fused path has no per-edge messages
        to mask or show)."""
        if self.explain:
            return True
        hooks = [self._propagate_forward_pre_hooks, self._propagate_forward_hooks,
                 self._message_forward_pre_hooks, self._message_forward_hooks,
                 self._aggregate_forward_pre_hooks, self._aggregate_forward_hooks]
        if self._uses_edge_updater:
            hooks += [self._edge_update_forward_pre_hooks, self._edge_update_forward_hooks]
        return any(len(h) for h in hooks)

    def _runs_propagate(self) -> bool:
        """Whether this call takes PyG's unfused ``propagate`` path: while observed (explainers, hooks), or under a
        torch.func transform (vmap, grad, jacrev, ...). The fused paths are autograd.Functions written for eager
        autograd (forward saving its own context, no ``setup_context`` / ``vmap`` rules), which functorch refuses;
        PyG's layers run under those transforms, so ours do too, with plain autograd ops ([E, H, C] memory). The
        functorch query is left out of torch.compile's traced code (it would break the graph there). Under
        torch.export too: the fused functions are opaque eager code that export cannot trace (see ``_graph``)."""
        if self._message_passing_observed() or in_torch_export():
            return True
        return not torch.compiler.is_compiling() and in_torch_func()

    def _graph(self, edge_index, num_src: int, num_dst: int) -> GraphStructure:
        # Validating edge_index, dropping and adding self loops and sorting into a CSR are data-dependent (the
        # edge count after loop removal, Python-side block boundaries): under torch.compile they are one custom
        # operator (_graph_structure_op: no graph break; the edge count a symbolic size), as the fused attention
        # is (zoo/attention/segment.py), and are rebuilt per call. A sparse adjacency still runs eagerly (a break).
        # torch.export has no graph breaks: there the structure is traced (no value checks, no cache: it would
        # hold symbolic tensors) and the layer runs PyG's propagate (_runs_propagate), plain torch ops with a
        # symbolic N and E, as PyG's own layers export. The exported program has PyG's [E, H, C] memory.
        if in_torch_export():
            self._check_graph_input(edge_index, num_src, num_dst)
            return graph_structure(self._flowing(edge_index), num_src, num_dst, self.add_self_loops)
        if torch.compiler.is_compiling() and isinstance(edge_index, Tensor) and edge_index.layout == torch.strided:
            self._check_graph_input(edge_index, num_src, num_dst)
            return _compiled_graph_structure(self._flowing(edge_index), num_src, num_dst, self.add_self_loops)
        return call_outside_graph(self._build_graph, edge_index, num_src, num_dst)

    def _build_graph(self, edge_index, num_src: int, num_dst: int) -> GraphStructure:
        self._check_graph_input(edge_index, num_src, num_dst)
        if edge_index.is_inference():  # no version counter: cannot tell in-place edits apart, do not cache
            return graph_structure(self._flowing(edge_index), num_src, num_dst, self.add_self_loops)
        version = edge_index._version if edge_index.layout == torch.strided else None
        key = (num_src, num_dst, bool(self.add_self_loops), version)
        cache = self._graph_cache
        fingerprint = _edge_index_fingerprint(edge_index)
        if cache is not None and cache[0] is edge_index and cache[1] == key and cache[3] == fingerprint:
            return cache[2]
        graph = graph_structure(self._flowing(edge_index), num_src, num_dst, self.add_self_loops)
        self._graph_cache = (edge_index, key, graph, fingerprint)
        return graph

    def _check_graph_input(self, edge_index, num_src: int, num_dst: int) -> None:
        """The checks of edge_index against the layer's flow, before the graph is built."""
        if not isinstance(edge_index, Tensor):
            if type(edge_index).__name__ == "SparseTensor":
                raise TypeError(
                    "torch_sparse.SparseTensor is not supported; pass a torch sparse tensor (adj.t())"
                )
            raise TypeError(f"edge_index must be a torch.Tensor, got {type(edge_index).__name__}")
        if self._reverse_flow and edge_index.layout != torch.strided:
            raise ValueError(  # as PyG's MessagePassing
                f"{type(self).__name__}: flow='target_to_source' is invalid for a sparse adjacency; pass the "
                "transposed sparse tensor (adj_t.t()) to a layer with the default flow instead")
        if self._reverse_flow and num_src != num_dst and not self._reverse_flow_sized_by_targets:
            # PyG gathers sources from x[0] by edge_index[1] and targets from x[1] by edge_index[0] there, but sizes
            # its output by x[0]: rows past the target count hold the bias alone. Not reproduced.
            raise ValueError(
                f"{type(self).__name__}: flow='target_to_source' with {num_src} source and {num_dst} target nodes: "
                "PyG sizes that output by the source set; flip edge_index (edge_index.flip(0)) and use the "
                "default flow")

    def _flowing(self, edge_index: Tensor) -> Tensor:
        """edge_index as (source, destination) rows: flipped for flow="target_to_source" (PyG's reverse flow:
        messages from edge_index[1] to edge_index[0]); the graph is then built exactly as for the default flow."""
        if self._reverse_flow and edge_index.dim() == 2 and edge_index.size(0) == 2:
            return edge_index.flip(0)
        return edge_index



class _GraphAttentionBase(CachedGraphLayer):
    """Input parsing, edge features and the return protocol common to both attention layers."""

    def _materialize_edge(self, edge_attr) -> None:
        """``edge_dim=-1``: size the lazy edge projection from the first edge_attr ([E] or [E, D]), at the point of
        PyG's forward where its edge_update (or message) first calls it, so a seeded lazy layer draws PyG's weights.
        Anything else about edge_attr is checked later (_edge_features)."""
        lin = getattr(self, "lin_edge", None)
        if lin is not None and _is_lazy(lin) and isinstance(edge_attr, Tensor) and edge_attr.is_floating_point() \
                and edge_attr.dim() in (1, 2):
            lin(edge_attr.reshape(edge_attr.size(0), -1)[:0])

    def _refuse_jit_trace(self) -> None:
        """torch.jit.trace and the TorchScript ONNX exporter (torch.onnx.export(dynamo=False)) cannot record the fused
        attention (custom autograd Functions; traced sizes are tensors, which the graph structure's Python
        bookkeeping needs as ints): they failed with "unordered_map::at". One line instead, naming what works."""
        if torch._C._get_tracing_state() is not None:
            raise RuntimeError(
                f"{type(self).__name__}: torch.jit.trace / torch.onnx.export(dynamo=False) cannot trace the zoo's graph "
                "attention; use torch.export.export or torch.onnx.export(..., dynamo=True), which run PyG's propagate "
                "path with a symbolic node and edge count (PyG's layer of the same name loads this state dict and traces)"
            )

    def __init__(self, aggr: str, message_passing_kwargs: Optional[dict] = None):
        # as PyG's layers: messages [E, H, C] aggregated over incoming edges along dimension 0, by default summed
        # (GATConv and TransformerConv name the sum "add", GATv2Conv "sum"); the caller's aggr / aggr_kwargs build
        # PyG's aggr_module (its parameters are state-dict entries under "aggr_module.", as PyG's)
        layer = type(self).__name__
        aggr, aggr_kwargs, flow = _attention_message_passing_kwargs(layer, message_passing_kwargs or {}, aggr)
        super().__init__(aggr=aggr, node_dim=0, layer=layer, message_passing_kwargs={"flow": flow},
                         aggr_kwargs=aggr_kwargs)

    @property
    def _sums_messages(self) -> bool:
        """Whether the aggregation is the sum the fused paths compute: read at each call from ``self.aggr_module``
        (PyG's layers aggregate with whatever it holds then: a module swapped in after construction counts)."""
        return type(self.aggr_module) is SumAggregation

    def _runs_propagate(self) -> bool:
        """PyG's ``propagate`` also for every aggregation but the sum (``aggr="mean"``, ``"max"``, a list, an
        Aggregation module): PyG's MessagePassing.aggregate hands the [E, H, C] messages to ``self.aggr_module``;
        and with ``decomposed_layers`` set to another value than 1 after construction (PyG's propagate then
        splits the layer's inputs, and fails as PyG's layer does)."""
        return not self._sums_messages or self.decomposed_layers != 1 or super()._runs_propagate()

    def _dropout_rate(self) -> float:
        """``self.dropout`` checked where it is used, as PyG's layers check it: their ``F.dropout(alpha, p=...)``
        raises "dropout probability has to be between 0 and 1" at every forward, in training and evaluation alike.
        The constructor checks the argument; this catches a value assigned later (a dropout schedule, copied
        hyperparameters), which was clamped silently (p < 0 no dropout, p > 1 every weight dropped). NaN is refused
        with the same ValueError (torch's F.dropout raises a RuntimeError saying the same for it)."""
        p = self.dropout
        try:
            rate = float(p)
        except (TypeError, ValueError):
            raise TypeError(f"{type(self).__name__}: dropout must be a number in [0, 1], got {p!r}") from None
        if not 0.0 <= rate <= 1.0:  # (NaN too)
            raise ValueError(f"{type(self).__name__}: dropout probability has to be between 0 and 1, but got {p!r} "
                             f"(layer.dropout, as torch's F.dropout in PyG's layer)")
        return rate

    def _drops_all_attention(self) -> bool:
        """``dropout=1.0`` in training: PyG's ``F.dropout(alpha, p=1.0, training=True)`` zeroes every attention
        weight (torch multiplies by zero and draws nothing); in evaluation it does nothing."""
        return self.training and self._dropout_rate() >= 1.0

    def _fused_dropout(self) -> float:
        """The dropout rate the fused functions apply with the keep mask (``_keep_mask``): none for ``dropout=1.0``,
        whose all-zero weights the caller applies (``_zero_attention``)."""
        rate = self._dropout_rate()
        return 0.0 if rate >= 1.0 else rate

    @staticmethod
    def _zero_attention(*tensors: Optional[Tensor]):
        """The fused results with every attention weight dropped (``dropout=1.0`` in training): multiplied by zero,
        as torch's dropout with p=1, so the gradients are PyG's zeros rather than missing."""
        return tuple(None if t is None else t * 0.0 for t in tensors)

    def _init_common(self, in_channels, out_channels, heads, concat, negative_slope, dropout,
                     add_self_loops, edge_dim, fill_value, residual):
        if isinstance(in_channels, (tuple, list)):
            if len(in_channels) != 2:
                raise ValueError(f"in_channels must be an int or a (source, target) pair, got {in_channels!r}")
            _check_channels("in_channels[0]", in_channels[0], lazy_ok=True)
            _check_channels("in_channels[1]", in_channels[1], lazy_ok=True)
            in_channels = tuple(in_channels)
        else:
            _check_channels("in_channels", in_channels, lazy_ok=True)
        _check_channels("out_channels", out_channels)
        _check_channels("heads", heads)
        if not 0.0 <= float(dropout) <= 1.0:  # as torch's F.dropout (p=1.0 zeroes every weight in training)
            raise ValueError(f"dropout must be in [0, 1], got {dropout!r}")
        if edge_dim is not None:
            _check_channels("edge_dim", edge_dim, lazy_ok=True)  # -1: lin_edge sized by _materialize_edge
        _check_fill_value(fill_value, edge_dim)
        negative_slope = _check_negative_slope(negative_slope)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.heads = heads
        self.concat = check_flag(concat, "concat")
        self.negative_slope = float(negative_slope)
        self.dropout = float(dropout)
        self.add_self_loops = check_flag(add_self_loops, "add_self_loops")
        self.edge_dim = edge_dim
        self.fill_value = fill_value
        self.residual = check_flag(residual, "residual")

    @property
    def _given_sizes(self) -> tuple[int, int]:
        """(source, target) feature sizes as constructed (-1: lazy)."""
        c = self.in_channels
        return (c, c) if isinstance(c, int) else c

    @property
    def _in_src(self) -> int:
        """Source feature size: the constructor's, or for a lazy layer its projection's once sized (-1 before)."""
        size = self._given_sizes[0]
        return size if size != -1 else self._sized(self._src_linear())

    @property
    def _in_dst(self) -> int:
        size = self._given_sizes[1]
        return size if size != -1 else self._sized(self._dst_linear())

    @staticmethod
    def _sized(lin) -> int:
        # the weight's shape, not in_features: a lazy linear sized by load_state_dict keeps in_features 0
        return -1 if lin is None or _is_lazy(lin) else lin.weight.shape[1]

    def _materialize(self, x_src: Tensor, x_dst: Optional[Tensor]) -> None:
        """Size the lazy projections (``in_channels=-1``) from the first input, as PyG does: a zero-row call
        runs each one's initialisation (the fused CPU/Triton paths read the weights without calling them), in
        PyG's order (the residual projection first, then source, then target), so a seeded run draws the same
        weights as PyG's layer. ``x_dst``: the target features (``x_src`` for a single x); None for GATConv's
        ``(x_src, None)``, which leaves the target and residual projections lazy, as PyG's GATConv (it calls
        neither without target features), so a later call with target features of another width sizes them."""
        for lin, x in ((self.res, x_dst), (self._src_linear(), x_src), (self._dst_linear(), x_dst)):
            if lin is not None and x is not None and _is_lazy(lin):
                lin(x[:0])

    def _like_weights(self, x: Tensor, lin, what: str) -> Tensor:
        """x of the dtype (and on the device) of ``lin``'s weight, else a TypeError naming both (torch's own is
        "mat1 and mat2 must have the same dtype" from inside the projection); any dtype under torch.autocast."""
        if lin is not None and not _is_lazy(lin):
            check_like_weights(x, lin.weight, f"{type(self).__name__}: {what}", "layer")
        return x

    def _split_x(self, x, allow_none_dst: bool):
        if isinstance(x, Tensor):
            x = _check_features("x", x, self._in_src)
            return self._like_weights(x, self._src_linear(), "x"), None, True
        if isinstance(x, (tuple, list)) and len(x) == 2:
            x_src = _check_features("x[0] (source features)", x[0], self._in_src)
            self._like_weights(x_src, self._src_linear(), "x[0] (source features)")
            if x[1] is None:
                if not allow_none_dst:
                    raise ValueError(f"{type(self).__name__} needs target features: x[1] is None")
                return x_src, None, False
            x_dst = _check_features("x[1] (target features)", x[1], self._in_dst)
            self._like_weights(x_dst, self._dst_linear(), "x[1] (target features)")
            return x_src, x_dst, False
        raise TypeError(f"x must be a tensor or a (source, target) pair of tensors, got {type(x).__name__}")

    def _edge_features(self, graph: GraphStructure, edge_attr, csr_order: bool = True) -> Optional[Tensor]:
        """edge_attr [E] or [E, D] of the input edges -> [E', D] (loops included) in CSR order, or in
        ``graph.edge_index`` (PyG's) order with ``csr_order=False``."""
        if edge_attr is None:
            return None
        if not isinstance(edge_attr, Tensor) or not edge_attr.is_floating_point():
            raise TypeError(
                f"edge_attr must be a floating-point tensor, got "
                f"{edge_attr.dtype if isinstance(edge_attr, Tensor) else type(edge_attr).__name__}"
            )
        if graph.sparse_layout is not None and self.add_self_loops:
            raise ValueError(
                "edge_attr with a sparse adjacency and add_self_loops=True is not supported (as in PyG): "
                "pass a [2, E] edge_index"
            )
        if not graph.sparse_coalesced:
            raise ValueError(
                "edge_attr with a sparse COO adjacency that holds duplicate entries: they are one entry of the "
                "matrix (coalescing sums them), so their edge features have no row; pass adj.coalesce() with its "
                "edge features in that order, or a [2, E] edge_index (multi-edges allowed)"
            )
        if edge_attr.dim() == 1:
            edge_attr = edge_attr.view(-1, 1)
        if edge_attr.dim() != 2:
            raise ValueError(f"edge_attr must be [E] or [E, D], got shape {tuple(edge_attr.shape)}")
        if edge_attr.size(0) != graph.num_input_edges:
            raise ValueError(
                f"edge_attr has {edge_attr.size(0)} rows but edge_index has {graph.num_input_edges} edges"
            )
        if edge_attr.numel() and not is_tracing() and not bool(torch.isfinite(edge_attr.detach()).all()):
            raise ValueError("edge_attr contains NaN or Inf values")
        if self.edge_dim not in (None, -1) and edge_attr.size(1) != self.edge_dim:
            raise ValueError(f"edge_attr has {edge_attr.size(1)} features, edge_dim is {self.edge_dim}")
        self._like_weights(edge_attr, self.lin_edge, "edge_attr")
        if graph.storage_order is not None:  # CSC, a transposed COO, unsorted CSR columns: rows in storage order
            edge_attr = edge_attr[graph.storage_order]
        if graph.kept is not None:
            edge_attr = edge_attr[graph.kept]
        if graph.num_loops:
            # PyG's add_self_loops reduces the loops' features over the caller's edge_index[1] whatever the flow:
            # the destination here, but with flow="target_to_source" the source of the flipped graph (_flowing)
            row, num_nodes = (0, graph.num_src) if self._reverse_flow else (1, graph.num_dst)
            owner = graph.edge_index[row, : edge_attr.size(0)]
            loops = _loop_attr(edge_attr, owner, num_nodes, graph.num_loops, self.fill_value)
            edge_attr = torch.cat([edge_attr, loops], dim=0)
        return edge_attr[graph.csr.perm] if csr_order else edge_attr

    def _keep_mask(self, graph: GraphStructure, device, dtype: torch.dtype) -> Optional[Tensor]:
        """The attention-dropout keep mask [E', H] in CSR order, or None (evaluation, no dropout, no edges). Drawn as
        PyG's ``F.dropout(alpha)`` draws it (torch's dropout is ``bernoulli_(1 - p)`` on a tensor of alpha's shape
        and dtype), in PyG's edge order, then put in CSR order: a seeded training run on CPU drops the edges PyG's
        layer drops (tests/test_graph_layers.py); CUDA's fused dropout kernel draws otherwise. For a sparse adj_t with
        added self loops PyG's order is not edge_index's (GraphStructure.pyg_edge_order): the draw follows PyG's."""
        rate = self._dropout_rate()  # checked in evaluation too, as PyG's F.dropout checks it
        if not (self.training and 0.0 < rate < 1.0) or (not is_tracing() and graph.csr.num_edges == 0):
            return None  # (dropout=1.0 draws nothing, as torch's: _zero_attention; a symbolic E: an empty mask)
        keep = torch.empty(graph.csr.num_edges, self.heads, device=device, dtype=dtype).bernoulli_(1.0 - rate)
        order = graph.pyg_edge_order()
        if order is not None:  # drawn in PyG's order: edge order[j] gets PyG's j-th draw
            keep = torch.empty_like(keep).index_copy_(0, order.to(device), keep)
        return keep.bool()[graph.csr.perm.to(device)]

    def _merge_heads(self, out_NHC: Tensor) -> Tensor:
        """[N, H, C'] -> [N, H*C] (concat) or the mean over heads, as PyG's forward: ``out.view(-1, H*C)`` /
        ``out.mean(dim=1)``. C' is C but for an aggregation that widens the messages (a list of aggregations with
        mode="cat": k*C); PyG's view then gives k*N rows of H*C, and so does this layer."""
        H, C = self.heads, self.out_channels
        if not self.concat:
            return out_NHC.mean(dim=1)
        # the row count, not -1: a graph without (destination) nodes gives [0, H*C] as in PyG
        rows = out_NHC.size(0) if out_NHC.size(-1) == C else -1
        return out_NHC.reshape(rows, H * C)

    def _add_to_output(self, out: Tensor, term: Tensor, what: str) -> Tensor:
        """out + term, as PyG's forward adds the residual / skip / bias (broadcasting as PyG's ``+`` does); where
        an aggregation that changes the channel count (a list with mode "cat" or "proj") leaves shapes that do not
        broadcast, PyG's layer fails with torch's error: a ValueError naming the terms here."""
        if self._sums_messages:  # the sum keeps each head's channels: PyG's shapes
            return out + term
        return self._as_pyg_would(lambda: out + term, out, term, what)

    def _as_pyg_would(self, combine, out: Tensor, term: Tensor, what: str):
        """``combine()``, its shape error (PyG's layer raises the same one) turned into a ValueError that names the
        aggregation's output and ``what`` it is combined with."""
        try:
            return combine()
        except RuntimeError as error:
            raise ValueError(
                f"{type(self).__name__}: with aggr={self.aggr!r} the aggregated output has shape {tuple(out.shape)} "
                f"and {what} shape {tuple(term.shape)}: they do not combine ({error}); PyG's layer fails on them "
                f"too. An aggregation that changes the channel count (a list with mode 'cat' or 'proj') needs an "
                f"output that fits the layer's terms (e.g. aggr_kwargs=dict(mode='sum'))") from None

    def _finish(self, out_NHC: Tensor, res: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
        out = self._merge_heads(out_NHC)
        if res is not None:
            out = self._add_to_output(out, res, "the residual projection")
        if bias is not None:
            out = self._add_to_output(out, bias, "the bias")
        return out

    # PyG's message passing: the path of explainers, hooks and torch.func (CachedGraphLayer._runs_propagate)
    _uses_edge_updater = True

    def message(self, x_j: Tensor, alpha: Tensor) -> Tensor:
        """PyG's message: the source features [E, H, C] weighted by their attention [E, H]."""
        return x_j * alpha.unsqueeze(-1)

    def _propagate_attention(self, graph: GraphStructure, x: tuple, size, edge_kwargs: dict):
        """PyG's unfused path, as PyG's GATConv / GATv2Conv forward runs it: ``alpha = edge_updater(edge_index,
        **edge_kwargs, size=size)`` (the subclass's ``edge_update``: scores, softmax per destination, attention
        dropout; PyG's edge-update hooks fire around it), then ``propagate(edge_index, x=x, alpha=alpha,
        size=size)`` (message, explain mask, sum) -> (out [Nd, H, C], alpha [E', H]) in ``graph.edge_index`` order.
        ``size`` None (as PyG's calls give when x holds the target features) or (Ns, Nd)."""
        self._dropout_order = graph.pyg_edge_order() if self.training and self.dropout > 0.0 else None
        try:
            with self._default_flow_inside():
                alpha = self.edge_updater(graph.edge_index, size=size, **edge_kwargs)
                out_NHC = self.propagate(graph.edge_index, x=x, alpha=alpha, size=size)
        finally:
            self._dropout_order = None
        return out_NHC, alpha

    def _edge_softmax(self, scores_EH: Tensor, index: Tensor, dim_size: Optional[int]) -> Tensor:
        """The end of PyG's ``edge_update``: softmax over each destination's edges
        (torch_geometric.utils.softmax(scores, index, ptr, dim_size)), then attention dropout."""
        alpha = self._destination_softmax(scores_EH, index, dim_size)
        order = getattr(self, "_dropout_order", None)
        if order is not None and order.numel() == alpha.size(0):  # PyG's edge order for the draw (pyg_edge_order)
            dropped = F.dropout(alpha[order], p=self._dropout_rate(), training=self.training)
            return torch.empty_like(dropped).index_copy(0, order, dropped)
        return F.dropout(alpha, p=self._dropout_rate(), training=self.training)

    @staticmethod
    def _destination_softmax(scores_EH: Tensor, index: Tensor, dim_size: Optional[int]) -> Tensor:
        """Softmax of [E, H] scores over each destination's edges (``index``), as torch_geometric.utils.softmax
        with PyG's ``dim_size`` (None: one past the largest index)."""
        num_dst = dim_size if dim_size is not None else (int(index.max()) + 1 if index.numel() else 0)
        return segment_softmax(scores_EH, index, num_dst)

    def _returned_edge_index(self, graph: GraphStructure) -> Tensor:
        """The [2, E'] edge index returned with the attention weights: a copy, as PyG builds one per call (the cached
        graph keeps using its own: an edit of the returned tensor changed the next call's output), in the caller's
        row order (flipped back for flow="target_to_source")."""
        return graph.edge_index.flip(0) if self._reverse_flow else graph.edge_index.clone()

    @staticmethod
    def _input_order(graph: GraphStructure, alpha_csr: Tensor) -> Tensor:
        """alpha in CSR order -> in ``graph.edge_index`` (PyG's) order."""
        alpha = torch.empty_like(alpha_csr)
        alpha[graph.csr.perm] = alpha_csr
        return alpha

    def _attention_result(self, graph: GraphStructure, alpha: Tensor):
        """alpha [E', H] in ``graph.edge_index`` order -> PyG's (edge_index, alpha) or (sparse adj, alpha)."""
        if graph.sparse_layout is None:
            return self._returned_edge_index(graph), alpha
        # sparse adjacency adj[dst, src, h]: entries sorted by (dst, src) (by (src, dst) for CSC)
        src, dst = graph.edge_index[0], graph.edge_index[1]
        n_dst, n_src = graph.sparse_size
        size = (n_dst, n_src, alpha.size(1))
        if graph.sparse_layout == torch.sparse_csc:
            order = torch.argsort(src * max(1, n_dst) + dst, stable=True)
            ptr = torch.zeros(n_src + 1, dtype=torch.long, device=src.device)
            torch.cumsum(torch.bincount(src, minlength=n_src), 0, out=ptr[1:])
            values = alpha[order]
            adj = torch.sparse_csc_tensor(ptr, dst[order], values, size)
            return adj, values
        order = torch.argsort(dst * max(1, n_src) + src, stable=True)
        values = alpha[order]
        if graph.sparse_layout == torch.sparse_csr:
            ptr = torch.zeros(n_dst + 1, dtype=torch.long, device=src.device)
            torch.cumsum(torch.bincount(dst, minlength=n_dst), 0, out=ptr[1:])
            adj = torch.sparse_csr_tensor(ptr, src[order], values, size)
        else:
            idx = torch.stack([dst[order], src[order]])
            adj = torch.sparse_coo_tensor(idx, values, size, is_coalesced=True)
        return adj, values

    def extra_repr(self) -> str:  # not used by __repr__, kept for nn.Module printing of children
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.in_channels}, {self.out_channels}, heads={self.heads})"


# ----------------------------------------------------------------------------------------------------
# GATv2
# ----------------------------------------------------------------------------------------------------
class GATv2Conv(_GraphAttentionBase):
    """GATv2 layer, PyG-compatible (torch_geometric.nn.GATv2Conv), fused and memory-light.

    Args (as PyG): in_channels (int or (source, target) pair), out_channels, heads=1, concat=True,
    negative_slope=0.2, dropout=0.0 (on the attention coefficients), add_self_loops=True,
    edge_dim=None (-1: sized from the first edge_attr), fill_value="mean" (self-loop edge features: a number, a
    tensor, or "add", "mean", "min", "max", "mul"), bias=True, share_weights=False (lin_r is lin_l), residual=False.

    forward(x | (x_src, x_dst), edge_index [2, E] or sparse adj_t [Nd, Ns], edge_attr=None,
    return_attention_weights=None) -> out [Nd, H*C] (concat) or [Nd, C], or with
    return_attention_weights true (tested for truth, as PyG's ``if return_attention_weights:``; None, False or 0
    give the tensor alone): (out, (edge_index_with_loops, alpha [E', H])) or (out, (sparse attention [Nd, Ns, H],
    alpha)) for sparse input. alpha carries no gradient. A graph without nodes (or without destination nodes)
    gives an empty [0, H*C] (or [0, C]) result, as PyG's. x (and edge_attr) must have the dtype of the layer's
    weights (any dtype under torch.autocast); edge_attr with edge_dim=None is an error (as PyG's GATv2Conv).
    Under torch.autocast out and alpha are fp32, as PyG's (its fp32 attention vector promotes the half features).
    PyG's MessagePassing keywords: aggr (default "sum", fused; "mean", "max", a list with aggr_kwargs, an Aggregation
    module run PyG's propagate with ``self.aggr_module``, as PyG's layer), aggr_kwargs, flow, decomposed_layers=1
    (_attention_message_passing_kwargs); dropout=1.0 zeroes every attention weight in training, as PyG's.
    fill_value and negative_slope must be finite, and a tensor fill_value must hold edge_dim values (or one):
    checked in the constructor.
    """

    def __init__(
        self,
        in_channels: Union[int, tuple],
        out_channels: int,
        heads: int = 1,
        concat: bool = True,
        negative_slope: float = 0.2,
        dropout: float = 0.0,
        add_self_loops: bool = True,
        edge_dim: Optional[int] = None,
        fill_value: Union[float, Tensor, str] = "mean",
        bias: bool = True,
        share_weights: bool = False,
        residual: bool = False,
        **kwargs,
    ):
        super().__init__(aggr="sum", message_passing_kwargs=kwargs)
        self._init_common(in_channels, out_channels, heads, concat, negative_slope, dropout,
                          add_self_loops, edge_dim, fill_value, residual)
        self.share_weights = share_weights = check_flag(share_weights, "share_weights")
        bias = check_flag(bias, "bias")
        HC = heads * out_channels
        src_size, dst_size = self._given_sizes
        self.lin_l = _linear(src_size, HC, bias)
        self.lin_r = self.lin_l if share_weights else _linear(dst_size, HC, bias)
        self.att = nn.Parameter(torch.empty(1, heads, out_channels))
        self.lin_edge = _linear(edge_dim, HC, False) if edge_dim is not None else None
        total = out_channels * (heads if concat else 1)
        self.res = _linear(dst_size, total, False) if residual else None
        self.bias = nn.Parameter(torch.empty(total)) if bias else None
        self.reset_parameters()

    # the argument types of PyG's calls (its "# edge_updater_type:" / "# propagate_type:" comments), from which PyG
    # generates this class's edge_updater and propagate: the hooks then receive what PyG's layer gives them
    edge_updater_type = {"x": PairTensor, "edge_attr": OptTensor}
    propagate_type = {"x": PairTensor, "alpha": Tensor}

    def _src_linear(self):
        return self.lin_l

    def _dst_linear(self):
        return self.lin_r

    def reset_parameters(self) -> None:
        super().reset_parameters()  # MessagePassing's (the aggregation module: a learnable one is reset), as PyG's
        for lin in (self.lin_l, self.lin_r, self.lin_edge, self.res):
            if lin is not None and not _is_lazy(lin):  # a lazy one is initialised when sized
                _init_linear_(lin)
        _glorot_(self.att)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x, edge_index, edge_attr: Optional[Tensor] = None, return_attention_weights=None):
        self._refuse_jit_trace()
        H, C = self.heads, self.out_channels
        x_src, x_dst, single = self._split_x(x, allow_none_dst=False)
        if single:
            x_dst = x_src
        self._materialize(x_src, x_dst)
        res = None
        if self.res is not None:
            res = self.res(x_dst)
        xs_NHC = self.lin_l(x_src).view(x_src.size(0), H, C)
        # lin_r is fused into the attention (projected per destination block on CPU): no [Nd, H, C] tensor
        xd_NHC, dst_projection = None, (x_dst, self.lin_r.weight, self.lin_r.bias)
        if self.share_weights and single:
            xd_NHC, dst_projection = xs_NHC, None  # lin_l(x) is lin_r(x): already there
        graph = self._graph(edge_index, xs_NHC.size(0), x_dst.size(0))
        if edge_attr is not None and self.lin_edge is None:
            raise ValueError("edge_attr was given but the layer was built with edge_dim=None")
        self._materialize_edge(edge_attr)
        need = bool(return_attention_weights)  # as PyG's `if return_attention_weights:` (False/0: the tensor)
        if self._runs_propagate():  # PyG's explainers / hooks, torch.func: its edge_updater and propagate
            ea = self._edge_features(graph, edge_attr, csr_order=False)
            if xd_NHC is None:
                xd_NHC = self.lin_r(x_dst).view(x_dst.size(0), H, C)
            x_pair = (xs_NHC, xd_NHC)
            out_NHC, alpha = self._propagate_attention(graph, x_pair, None, dict(x=x_pair, edge_attr=ea))
        else:
            csr = graph.csr.to(xs_NHC.device)
            ea = self._edge_features(graph, edge_attr)
            we = self.lin_edge.weight if ea is not None else None
            out_NHC, alpha_csr = gatv2_attention(
                xs_NHC, xd_NHC, self.att[0], csr, dst_projection=dst_projection, edge_attr=ea, edge_weight=we,
                negative_slope=self.negative_slope,
                keep=self._keep_mask(graph, xs_NHC.device, torch.promote_types(xs_NHC.dtype, self.att.dtype)),
                dropout=self._fused_dropout(), need_weights=need,
            )
            if self._drops_all_attention():
                out_NHC, alpha_csr = self._zero_attention(out_NHC, alpha_csr)
            alpha = self._input_order(graph, alpha_csr) if need else None
        out = self._finish(out_NHC, res, self.bias)
        if need:
            return out, self._attention_result(graph, alpha)
        return out

    def edge_update(self, x_j: Tensor, x_i: Tensor, edge_attr: Optional[Tensor], index: Tensor,
                    ptr: Optional[Tensor], dim_size: Optional[int]) -> Tensor:
        """PyG's GATv2Conv.edge_update (the unfused path): ``a . LeakyReLU(W_s x_j + W_t x_i (+ W_e e_ji))``,
        softmax per destination, attention dropout -> alpha [E', H]. The gathers x_j / x_i are PyG's
        ``index_select`` (its backward, index_add_, is 2-4x faster on CPU than advanced indexing's for rows this
        wide; explainers run this path for many epochs)."""
        z_EHC = x_i + x_j
        if edge_attr is not None:
            z_EHC = z_EHC + self.lin_edge(edge_attr).view(-1, self.heads, self.out_channels)
        scores_EH = (F.leaky_relu(z_EHC, self.negative_slope) * self.att).sum(dim=-1)
        return self._edge_softmax(scores_EH, index, dim_size)


# ----------------------------------------------------------------------------------------------------
# GAT
# ----------------------------------------------------------------------------------------------------
class GATConv(_GraphAttentionBase):
    """GAT layer, PyG-compatible (torch_geometric.nn.GATConv), with the fused softmax-aggregation.

    Args as PyG's GATConv: in_channels (int -> one ``lin``; pair -> ``lin_src``/``lin_dst``),
    out_channels, heads=1, concat=True, negative_slope=0.2, dropout=0.0, add_self_loops=True,
    edge_dim=None, fill_value="mean", bias=True, residual=False, and PyG's MessagePassing keywords as
    :class:`GATv2Conv` (aggr default "add").
    forward(x | (x_src, x_dst or None), edge_index, edge_attr=None, size=None,
    return_attention_weights=None): as :class:`GATv2Conv`; ``size`` = (Ns, Nd) as in PyG. edge_attr with a
    layer built with edge_dim=None raises "edge_attr was given but the layer was built with edge_dim=None" (PyG's
    GATConv silently ignores it; GATv2Conv, ours and PyG's, raises).
    The scores are [E, H] scalars (cheap); the softmax and the weighted sum of the [E, H, C] messages
    are fused (zoo.attention.segment.segment_softmax_aggregate).
    """

    def __init__(
        self,
        in_channels: Union[int, tuple],
        out_channels: int,
        heads: int = 1,
        concat: bool = True,
        negative_slope: float = 0.2,
        dropout: float = 0.0,
        add_self_loops: bool = True,
        edge_dim: Optional[int] = None,
        fill_value: Union[float, Tensor, str] = "mean",
        bias: bool = True,
        residual: bool = False,
        **kwargs,
    ):
        super().__init__(aggr="add", message_passing_kwargs=kwargs)
        self._init_common(in_channels, out_channels, heads, concat, negative_slope, dropout,
                          add_self_loops, edge_dim, fill_value, residual)
        bias = check_flag(bias, "bias")
        HC = heads * out_channels
        if isinstance(in_channels, int):
            self.lin = _linear(in_channels, HC, False)
            self.lin_src = self.lin_dst = None
        else:
            self.lin = None
            self.lin_src = _linear(in_channels[0], HC, False)
            self.lin_dst = _linear(in_channels[1], HC, False)
        self.att_src = nn.Parameter(torch.empty(1, heads, out_channels))
        self.att_dst = nn.Parameter(torch.empty(1, heads, out_channels))
        if edge_dim is not None:
            self.lin_edge = _linear(edge_dim, HC, False)
            self.att_edge = nn.Parameter(torch.empty(1, heads, out_channels))
        else:
            self.lin_edge = None
            self.register_parameter("att_edge", None)
        total = out_channels * (heads if concat else 1)
        self.res = _linear(self._given_sizes[1], total, False) if residual else None
        self.bias = nn.Parameter(torch.empty(total)) if bias else None
        self.reset_parameters()

    # as GATv2Conv's: PyG's GATConv's call types
    edge_updater_type = {"alpha": OptPairTensor, "edge_attr": OptTensor}
    propagate_type = {"x": OptPairTensor, "alpha": Tensor}

    def _src_linear(self):
        return self.lin if self.lin is not None else self.lin_src

    def _dst_linear(self):
        return self.lin if self.lin is not None else self.lin_dst

    def reset_parameters(self) -> None:
        super().reset_parameters()  # MessagePassing's (the aggregation module: a learnable one is reset), as PyG's
        for lin in (self.lin, self.lin_src, self.lin_dst, self.lin_edge, self.res):
            if lin is not None and not _is_lazy(lin):  # a lazy one is initialised when sized
                _glorot_(lin.weight)
        for p in (self.att_src, self.att_dst, self.att_edge):
            if p is not None:
                _glorot_(p)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x, edge_index, edge_attr: Optional[Tensor] = None, size=None,
                return_attention_weights=None):
        self._refuse_jit_trace()
        H, C = self.heads, self.out_channels
        x_src, x_dst, single = self._split_x(x, allow_none_dst=True)
        self._materialize(x_src, x_src if single else x_dst)
        res = None
        lin_src, lin_dst = self._src_linear(), self._dst_linear()
        if single:
            if self.res is not None:
                res = self.res(x_src)
            xs_NHC = lin_src(x_src).view(x_src.size(0), H, C)
            xd_NHC = xs_NHC if self.lin is not None else lin_dst(x_src).view(x_src.size(0), H, C)
        else:
            if x_dst is not None and self.res is not None:
                res = self.res(x_dst)
            xs_NHC = lin_src(x_src).view(x_src.size(0), H, C)
            xd_NHC = None if x_dst is None else lin_dst(x_dst).view(x_dst.size(0), H, C)
        num_src = xs_NHC.size(0)
        if xd_NHC is not None:
            num_dst = xd_NHC.size(0)
        elif isinstance(edge_index, Tensor) and edge_index.layout != torch.strided and edge_index.dim() == 2:
            num_dst = edge_index.size(0)  # a sparse adj_t [Nd, Ns] gives Nd, as PyG's _check_input takes it
        else:
            num_dst = num_src
        if size is not None:
            if len(size) != 2:
                raise ValueError(f"size must be (num_src, num_dst), got {size!r}")
            if size[0] is not None and int(size[0]) != num_src:
                raise ValueError(f"size[0]={size[0]} but x_src has {num_src} rows")
            if size[1] is not None:
                if xd_NHC is not None and int(size[1]) != num_dst:
                    raise ValueError(f"size[1]={size[1]} but x_dst has {num_dst} rows")
                num_dst = int(size[1])
        graph = self._graph(edge_index, num_src, num_dst)
        a_src = (xs_NHC * self.att_src).sum(-1)  # [Ns, H]
        a_dst = None if xd_NHC is None else (xd_NHC * self.att_dst).sum(-1)  # [Nd, H]
        if edge_attr is not None and self.lin_edge is None:  # PyG's GATConv ignores it; GATv2Conv raises too
            raise ValueError("edge_attr was given but the layer was built with edge_dim=None")
        self._materialize_edge(edge_attr)
        need = bool(return_attention_weights)  # as PyG's `if return_attention_weights:`
        if self._runs_propagate():  # PyG's explainers / hooks, torch.func: its edge_updater and propagate
            ea = self._edge_features(graph, edge_attr, csr_order=False)
            # PyG passes the caller's size; without target features (or a size) it must say Nd
            pyg_size = None if xd_NHC is not None and size is None else (num_src, num_dst)
            out_NHC, alpha = self._propagate_attention(graph, (xs_NHC, xd_NHC), pyg_size,
                                                       dict(alpha=(a_src, a_dst), edge_attr=ea))
        else:
            # scores per edge in CSR order
            csr = graph.csr.to(xs_NHC.device)
            s_EH = a_src[csr.col]
            if a_dst is not None:
                s_EH = s_EH + a_dst[csr.row]
            ea = self._edge_features(graph, edge_attr)
            if ea is not None:
                # a_e . (W_e e) without the [E, H, C] projection: fold att_edge into W_e -> [H, D]
                w_HD = (self.lin_edge.weight.view(H, C, -1) * self.att_edge.view(H, C, 1)).sum(1)
                s_EH = s_EH + ea @ w_HD.t()
            s_EH = F.leaky_relu(s_EH, self.negative_slope)
            out_NHC, alpha_csr = segment_softmax_aggregate(
                s_EH, xs_NHC, csr, keep=self._keep_mask(graph, xs_NHC.device, s_EH.dtype),
                dropout=self._fused_dropout(), need_weights=need,
            )
            if self._drops_all_attention():
                out_NHC, alpha_csr = self._zero_attention(out_NHC, alpha_csr)
            alpha = self._input_order(graph, alpha_csr) if need else None
        out = self._finish(out_NHC, res, self.bias)
        if need:
            return out, self._attention_result(graph, alpha)
        return out

    def edge_update(self, alpha_j: Tensor, alpha_i: Optional[Tensor], edge_attr: Optional[Tensor], index: Tensor,
                    ptr: Optional[Tensor], dim_size: Optional[int]) -> Tensor:
        """PyG's GATConv.edge_update (the unfused path): ``LeakyReLU(a_s . W x_j (+ a_t . W x_i) (+ a_e . W_e
        e_ji))``, softmax per destination, attention dropout -> alpha [E', H] (no edges: the summed scores, as
        PyG's)."""
        alpha = alpha_j if alpha_i is None else alpha_j + alpha_i
        if index.numel() == 0:
            return alpha
        if edge_attr is not None and self.lin_edge is not None:
            edge_EHC = self.lin_edge(edge_attr).view(-1, self.heads, self.out_channels)
            alpha = alpha + (edge_EHC * self.att_edge).sum(dim=-1)
        alpha = F.leaky_relu(alpha, self.negative_slope)
        return self._edge_softmax(alpha, index, dim_size)


# ----------------------------------------------------------------------------------------------------
# Graph transformer (dot-product attention over edges)
# ----------------------------------------------------------------------------------------------------
class TransformerConv(_GraphAttentionBase):
    """The graph transformer layer of Shi et al., "Masked Label Prediction: Unified Message Passing Model for
    Semi-Supervised Classification" (IJCAI 2021, arXiv:2009.03509), PyG-compatible
    (torch_geometric.nn.TransformerConv, torch_geometric 2.8.1 transformer_conv.py, argument for argument):

        x'_i = W_1 x_i + sum_{j -> i} alpha_ij (W_2 x_j (+ W_6 e_ij)),
        alpha_ij = softmax_j((W_3 x_i) . (W_4 x_j (+ W_6 e_ij)) / sqrt(C))    per head,

    multi-head dot-product attention restricted to each node's incoming edges (no self loops are added).

    Args (as PyG): in_channels (int, a (source, target) pair, -1 lazy), out_channels, heads=1, concat=True (False:
    heads averaged), beta=False (gated skip: x'_i = b_i W_1 x_i + (1 - b_i) m_i with b_i = sigmoid(w_5 . [W_1 x_i,
    m_i, W_1 x_i - m_i]); only with root_weight), dropout=0.0 (on the attention coefficients), edge_dim=None (edge
    features added to the keys and the values after lin_edge; -1: sized from the first edge_attr), bias=True,
    root_weight=True (False: no W_1 x_i term and no beta), and PyG's MessagePassing keywords aggr (default "add", fused;
    any other aggregation of PyG's, a list with aggr_kwargs, or an Aggregation module runs PyG's propagate with
    ``self.aggr_module``), aggr_kwargs, flow and decomposed_layers=1. dropout=1.0 zeroes every attention weight in
    training, as PyG's.
    State-dict keys and shapes are PyG's (lin_key, lin_query, lin_value, lin_edge, lin_skip, lin_beta), so a PyG
    state dict loads strict and gives the same outputs, attention weights and gradients; the initialisation draws
    as PyG's (kaiming-uniform Linear).

    forward(x | (x_src, x_dst), edge_index [2, E] or sparse adj_t [Nd, Ns], edge_attr=None,
    return_attention_weights=None) -> out [Nd, H*C] (concat) or [Nd, C]; with return_attention_weights a bool (True
    or False, as PyG's ``isinstance(return_attention_weights, bool)``): (out, (edge_index, alpha [E, H])), alpha
    before dropout and differentiable, as PyG's, in the order of edge_index (for a sparse adjacency, PyG returns the
    adjacency itself with alpha in its (dst, src) row-major order; so does this layer, with alpha in the adjacency's
    storage order: row-major for CSR and coalesced COO, column-major for CSC, which PyG refuses).
    ``flow="target_to_source"`` with two node sets is PyG's: the output is sized by the targets.

    The computation: the scores q_i . k_j are taken per edge in destination order; without edge features (and when
    the weights are not asked for) the softmax and the weighted sum of the values are fused
    (:func:`~zoo.attention.segment.segment_softmax_aggregate`: no [E, H, C] message is stored for backward), and so
    are the scores (:func:`~zoo.attention.segment.edge_dot`: chunks of edges, recomputed in backward): memory
    O(N H C + E H) where PyG's layer keeps several [E, H, C] tensors. With edge features, weights asked for, or
    under PyG's explainers, hooks, torch.func and torch.export, the layer runs PyG's ``propagate`` with PyG's
    message.
    """

    def __init__(
        self,
        in_channels: Union[int, tuple],
        out_channels: int,
        heads: int = 1,
        concat: bool = True,
        beta: bool = False,
        dropout: float = 0.0,
        edge_dim: Optional[int] = None,
        bias: bool = True,
        root_weight: bool = True,
        **kwargs,
    ):
        super().__init__(aggr="add", message_passing_kwargs=kwargs)
        self._init_common(in_channels, out_channels, heads, concat, 0.2, dropout, False, edge_dim, None, False)
        del self.negative_slope, self.residual  # (GAT's settings, not this layer's; fill_value stays None: no loops)
        self.root_weight = check_flag(root_weight, "root_weight")
        self.beta = check_flag(beta, "beta") and self.root_weight
        bias = check_flag(bias, "bias")
        HC = heads * out_channels
        src_size, dst_size = self._given_sizes
        init = _init_linear_kaiming_
        # construction order and draws as PyG's (each Linear draws when built, then reset_parameters draws again)
        self.lin_key = _linear(src_size, HC, bias, init)
        self.lin_query = _linear(dst_size, HC, bias, init)
        self.lin_value = _linear(src_size, HC, bias, init)
        self.lin_edge = _linear(edge_dim, HC, False, init) if edge_dim is not None else None
        skip = HC if self.concat else out_channels
        self.lin_skip = _linear(dst_size, skip, bias, init)  # built (and in the state dict) even without root_weight
        self.lin_beta = _linear(3 * skip, 1, False, init) if self.beta else None
        self.reset_parameters()

    propagate_type = {"query": Tensor, "key": Tensor, "value": Tensor, "edge_attr": OptTensor}
    _reverse_flow_sized_by_targets = True

    def _src_linear(self):
        return self.lin_key

    def _dst_linear(self):
        return self.lin_query

    def _materialize(self, x_src: Tensor, x_dst: Optional[Tensor], edge_attr: Optional[Tensor] = None) -> None:
        """Lazy projections sized from the first input in PyG's forward order (query, key, value, then the edge
        projection of ``edge_dim=-1``, which PyG's message sizes, then the skip projection, only with root_weight:
        PyG's forward never calls it otherwise), so a seeded lazy layer draws PyG's weights."""
        for lin, x in ((self.lin_query, x_dst), (self.lin_key, x_src), (self.lin_value, x_src)):
            if _is_lazy(lin):
                lin(x[:0])
        self._materialize_edge(edge_attr)
        if self.root_weight and _is_lazy(self.lin_skip):
            self.lin_skip(x_dst[:0])

    def reset_parameters(self) -> None:
        super().reset_parameters()  # MessagePassing's (aggregation modules, explain state)
        for lin in (self.lin_key, self.lin_query, self.lin_value, self.lin_edge, self.lin_skip, self.lin_beta):
            if lin is not None and not _is_lazy(lin):
                _init_linear_kaiming_(lin)

    def forward(self, x, edge_index, edge_attr: Optional[Tensor] = None, return_attention_weights=None):
        self._refuse_jit_trace()
        H, C = self.heads, self.out_channels
        x_src, x_dst, single = self._split_x(x, allow_none_dst=False)
        if single:
            x_dst = x_src
        if edge_attr is not None and self.lin_edge is None:
            raise ValueError("edge_attr was given but the layer was built with edge_dim=None")
        if edge_attr is None and self.lin_edge is not None:  # (PyG's message asserts it)
            raise ValueError(f"the layer was built with edge_dim={self.edge_dim}: pass edge_attr")
        self._materialize(x_src, x_dst, edge_attr)
        q_NHC = self.lin_query(x_dst).view(x_dst.size(0), H, C)
        k_NHC = self.lin_key(x_src).view(x_src.size(0), H, C)
        v_NHC = self.lin_value(x_src).view(x_src.size(0), H, C)
        graph = self._graph(edge_index, x_src.size(0), x_dst.size(0))
        need = isinstance(return_attention_weights, bool)  # PyG's test: True and False both ask for them
        alpha = None
        if need or edge_attr is not None or self._runs_propagate():
            ea = self._edge_features(graph, edge_attr, csr_order=False)
            with self._default_flow_inside():
                out_NHC = self.propagate(graph.edge_index, query=q_NHC, key=k_NHC, value=v_NHC, edge_attr=ea)
            alpha, self._alpha = self._alpha, None
        else:
            csr = graph.csr.to(q_NHC.device)
            # no [E, H, C] kept for backward; the CSR's indices were checked when the graph was built
            s_EH = edge_dot(q_NHC, k_NHC, csr.row, csr.col, validate=False) / math.sqrt(C)
            out_NHC, _ = segment_softmax_aggregate(s_EH, v_NHC, csr, dropout=self._fused_dropout(),
                                                   keep=self._keep_mask(graph, q_NHC.device, s_EH.dtype))
            if self._drops_all_attention():
                (out_NHC,) = self._zero_attention(out_NHC)
        out = self._merge_heads(out_NHC)
        if self.root_weight:
            x_r = self.lin_skip(x_dst)
            if self.lin_beta is not None:
                gate = self._as_pyg_would(
                    lambda: self.lin_beta(torch.cat([out, x_r, out - x_r], dim=-1)).sigmoid(), out, x_r,
                    "the skip projection lin_skip(x)")
                out = gate * x_r + (1 - gate) * out
            else:
                out = self._add_to_output(out, x_r, "the skip projection lin_skip(x)")
        if need:
            if graph.sparse_layout is not None:  # the adjacency itself, as PyG's, and alpha in its storage order
                if graph.storage_order is not None:  # (CSC, a transposed COO: not PyG's (dst, src) row-major)
                    alpha = alpha.new_empty(alpha.shape).index_copy_(0, graph.storage_order, alpha)
                return out, (edge_index, alpha)
            return out, (self._returned_edge_index(graph), alpha)
        return out

    _alpha: Optional[Tensor] = None

    def message(self, query_i: Tensor, key_j: Tensor, value_j: Tensor, edge_attr: Optional[Tensor], index: Tensor,
                ptr: Optional[Tensor], size_i: Optional[int]) -> Tensor:
        """PyG's TransformerConv.message: scores (q_i . (k_j + W_6 e_ij)) / sqrt(C), softmax per destination (kept
        in ``_alpha`` before dropout, as PyG's), attention dropout, messages alpha * (v_j + W_6 e_ij) [E, H, C]."""
        if self.lin_edge is not None and edge_attr is not None:
            edge_attr = self.lin_edge(edge_attr).view(-1, self.heads, self.out_channels)
            key_j = key_j + edge_attr
        scores_EH = (query_i * key_j).sum(dim=-1) / math.sqrt(self.out_channels)
        alpha = self._destination_softmax(scores_EH, index, size_i)
        self._alpha = alpha
        alpha = F.dropout(alpha, p=self._dropout_rate(), training=self.training)
        out = value_j if edge_attr is None else value_j + edge_attr
        return out * alpha.view(-1, self.heads, 1)
