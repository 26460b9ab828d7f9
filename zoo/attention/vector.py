"""Vector attention over point neighbourhoods: the Point Transformer layer with PyTorch Geometric's API.

Zhao, Jiang, Jia, Torr, Koltun, "Point Transformer" (ICCV 2021, arXiv:2012.09164). Unlike dot-product
attention, the weights are vectors: one softmax per channel over each point's neighbours,

    delta_ij = pos_nn(p_i - p_j)
    alpha_ij = softmax_j( attn_nn(W_dst x_i - W_src x_j + delta_ij) )        [C] per edge, softmax per channel
    out_i    = sum_j alpha_ij * (W x_j + delta_ij)

:class:`PointTransformerConv` follows torch_geometric 2.8.1 (torch_geometric/nn/conv/point_transformer_conv.py)
argument for argument: constructor (in_channels int / pair / -1, out_channels, pos_nn, attn_nn, add_self_loops),
state-dict keys (lin, lin_src, lin_dst, pos_nn, attn_nn), self loops (existing ones removed, one per node
i < min(N_src, N_dst) appended), forward(x | (x_src, x_dst), pos | (pos_src, pos_dst), edge_index), the repr;
a PyG state dict loads strict and gives the same outputs and gradients. The neighbourhoods usually come from
:func:`zoo.geometry.knn_graph`.

What differs is memory. PyG evaluates pos_nn, attn_nn, the softmax and the messages for all E edges at once and
keeps every [E, C] intermediate for backward (several per layer, more with MLPs). Here the edges are sorted by
destination once (the cached CSR of zoo.attention.graph) and processed in blocks of whole neighbourhoods, so the
per-channel softmax is complete inside a block; with autograd each block is checkpointed (its intermediates are
recomputed in backward), so the layer keeps O(N C) activations plus one block's, not O(E C). The price is the
block's forward run again in backward, paid by default only when the kept intermediates would pass about 1 GiB
(``recompute="auto"``). The softmax and the weighted sum are one fused step
(zoo.attention.segment.segment_softmax_weighted_sum): autograd keeps its inputs and [N, C] statistics, not the
[E, C] weights and products, and its backward is one pass. pos_nn / attn_nn with statistics over the edges
(BatchNorm using batch statistics, PyG's graph-level norms: _normalises_over_rows) see the whole edge set in one
block, as in PyG, so their statistics are PyG's; so does a layer
under torch.compile (one block, PyG's memory; the graph structure and, on CUDA, the Triton aggregation are custom
operators of the compiled graph, as for the GAT layers: zoo/attention/segment.py). While PyG's explain mode is on, a message-passing hook is registered, a torch.func transform (vmap,
grad, jacrev) runs or torch.export traces the layer, it runs PyG's ``propagate`` instead (zoo.attention.graph
explains; under torch.export with a symbolic number of points and edges, as PyG's layer exports).

Letters: N nodes/points (Ns source, Nd destination), E edges, C channels, P position coordinates.
"""
from __future__ import annotations

import ctypes
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from torch_geometric.nn import norm as pyg_norm
from torch_geometric.nn.inits import reset

from zoo.attention.graph import (
    CachedGraphLayer,
    GraphStructure,
    _check_channels,
    _check_features,
    _init_linear_kaiming_,
    _is_lazy,
)
from zoo.attention.graph import _linear as _graph_linear
from zoo.attention.segment import segment_softmax, segment_softmax_weighted_sum
from zoo.layers import check_flag, check_like_weights, in_torch_compile, is_tracing

__all__ = ["PointTransformerConv"]

# edges per block of the memory-light path: about 2**21 [E, C] elements per intermediate
_BLOCK_ELEMENTS = 1 << 21
# recompute="auto": checkpoint the blocks in training once the [E, C] intermediates that autograd would keep
# pass this many bytes, estimated as _KEPT_PER_EDGE_CHANNEL per edge and channel. PyG's layer with the MLPs of
# its Point Transformer example keeps 12-20 [E, C]-sized tensors per edge and channel (measured net peaks,
# docs/points.md), so 12 is a low estimate: below the budget keeping everything costs at most about 1 GiB.
_AUTO_RECOMPUTE_BYTES = 1 << 30
_KEPT_PER_EDGE_CHANNEL = 12


def _linear(in_features: int, out_features: int, bias: bool) -> nn.Module:
    """torch_geometric.nn.Linear's keys and default initialisation, kaiming_uniform(fan=in, a=sqrt(5)) with PyG's
    bound (zoo/attention/graph.py ``_init_linear_kaiming_``); lazy for -1, initialised so when sized, as PyG's
    (graph.py ``_LazyLinear``). torch's nn.Linear draws the same numbers from a bound that differs from PyG's in the
    last bit for some fans, which float64 weights keep."""
    return _graph_linear(in_features, out_features, bias, init=_init_linear_kaiming_)


def _has_batch_statistics(module: Optional[Callable]) -> bool:
    """True when ``module`` holds a normalisation whose output for one edge depends on the other edges it is
    given (see :func:`_normalises_over_rows`): it must see every edge at once, as in PyG's layer, or each block of
    the blockwise path would get its own statistics."""
    return isinstance(module, nn.Module) and any(_normalises_over_rows(m) for m in module.modules())


def _normalises_over_rows(m: nn.Module) -> bool:
    """Whether ``m`` (one module, not its children) normalises its [E, C] input with statistics over the rows.

    * torch's BatchNorm (any _BatchNorm, also inside PyG's BatchNorm / DiffGroupNorm wrappers, which are decided
      by it): when it uses batch statistics, by torch's own rule (BatchNorm.forward): in training mode, or in
      either mode without running statistics (track_running_stats=False).
    * torch_geometric.nn.norm (PyG 2.8.1), called without a batch vector as attn_nn / pos_nn call them: all rows
      are one graph. InstanceNorm uses instance statistics as torch's _InstanceNorm does (training, or no running
      statistics); LayerNorm in mode="graph" (PyG's default, and what torch_geometric.nn.MLP(norm="layer_norm")
      builds) normalises over all rows and channels, in mode="node" each row alone; every other PyG norm
      (GraphNorm, PairNorm, MeanSubtractionNorm, GraphSizeNorm, HeteroBatchNorm, ...) counts as over the rows:
      one block is always correct, it only costs PyG's memory.
    * Anything else, torch's InstanceNorm / LayerNorm / GroupNorm included, is taken as row-wise (on [E, C] each
      normalises a row over its channels)."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.training or m.running_mean is None
    if not type(m).__module__.startswith("torch_geometric.nn.norm"):
        return False
    if isinstance(m, (pyg_norm.BatchNorm, pyg_norm.DiffGroupNorm)):
        return False  # their inner torch BatchNorm decides
    if isinstance(m, pyg_norm.InstanceNorm):
        return m.training or not m.track_running_stats
    if isinstance(m, pyg_norm.LayerNorm):
        return m.mode != "node"
    return True


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc():
    """glibc's (malloc_trim, mallinfo2), or None where the C library is not glibc >= 2.33."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim, info = libc.malloc_trim, libc.mallinfo2
    except (OSError, AttributeError):
        return None
    info.restype = _Mallinfo2
    return trim, info


_GLIBC = _glibc()
# free heap bytes tolerated before they are handed back: a few blocks' temporaries, reused without new page
# faults (trimming after every block makes every block fault its pages in again)
_FREE_HEAP_BUDGET = 256 << 20


def _kernel_rowptr(csr, v_NC: Tensor) -> Optional[Tensor]:
    """The CSR row pointers that send the aggregation (segment_softmax_weighted_sum) to its Triton kernels, or None
    for the PyTorch path: CUDA features, eagerly or while torch.compile traces the layer (there the kernels are the
    custom operators ``zoo::vector_softmax_sum`` and its backward, whose checks read the row pointers when the
    compiled graph runs: zoo/attention/segment.py). Not under torch.export, jit tracing or a torch.func transform
    (the layer runs PyG's propagate there; a custom operator has no vmap rule)."""
    if not v_NC.is_cuda:
        return None
    if is_tracing() and not in_torch_compile():
        return None
    return csr.rowptr


def _release_free_heap() -> None:
    """Give freed heap memory back to the OS once more than ``_FREE_HEAP_BUDGET`` is held (glibc
    ``malloc_trim``; nothing on other C libraries). Without it, glibc keeps each block's freed [c, C]
    temporaries as holes between the small allocations that outlive the block (autograd nodes, checkpoint
    holders, the block's output), and the process grows by about a block per block: at 10k points, C = 64,
    the blockwise layer then peaked 400 MB above PyG's instead of below it."""
    if _GLIBC is not None and _GLIBC[1]().fordblks > _FREE_HEAP_BUDGET:
        _GLIBC[0](0)


class PointTransformerConv(CachedGraphLayer):
    """Point Transformer layer, PyG-compatible (torch_geometric.nn.PointTransformerConv), memory-light.

    Args (as PyG): in_channels (int, a (source, target) pair, or -1 for lazy sizing), out_channels,
    pos_nn (maps relative positions [E, P] to [E, out_channels]; default Linear(3, out_channels)), attn_nn
    (maps [E, out_channels] to [E, out_channels]; default none), add_self_loops=True.
    Beyond PyG: ``recompute`` (keyword only) chooses, for training, between memory and time. ``True``
    checkpoints the blocks: memory O(N C) plus a block, at the price of a second forward of each block.
    ``False`` keeps every intermediate as PyG does and runs once (PyG's memory, a little faster than PyG).
    ``"auto"`` (default) recomputes only when the kept intermediates would pass about 1 GiB (E x C x 12
    elements): small clouds run at PyG's speed or better, large ones in a fraction of its memory
    (docs/points.md). Inference runs in blocks either way.

    forward(x [N, F] | (x_src [Ns, Fs], x_dst [Nd, Fd]), pos [N, P] | (pos_src, pos_dst), edge_index [2, E]
    (row 0 source = neighbour j, row 1 destination = centre i) or a torch sparse adj_t [Nd, Ns]) -> [Nd, C].
    Checked with errors that name the argument: pos_nn / attn_nn must be callable (constructor); x of the
    weights' dtype and pos of x's (under torch.autocast other float32 / half / bf16 mixes run, float64 still must
    match); P = 3 for the default pos_nn (other P: pass a pos_nn), and a Linear pos_nn must take P inputs; pos_nn
    and attn_nn must return [E, out_channels].
    """

    def __init__(
        self,
        in_channels: Union[int, tuple],
        out_channels: int,
        pos_nn: Optional[Callable] = None,
        attn_nn: Optional[Callable] = None,
        add_self_loops: bool = True,
        *,
        recompute: Union[bool, str] = "auto",
        **kwargs,
    ):
        super().__init__(aggr="add", node_dim=-2, layer="PointTransformerConv", message_passing_kwargs=kwargs)
        if isinstance(in_channels, (tuple, list)):
            if len(in_channels) != 2:
                raise ValueError(f"in_channels must be an int or a (source, target) pair, got {in_channels!r}")
            for i, c in enumerate(in_channels):
                _check_channels(f"in_channels[{i}]", c, lazy_ok=True)
            in_channels = tuple(in_channels)
        else:
            _check_channels("in_channels", in_channels, lazy_ok=True)
        _check_channels("out_channels", out_channels)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.add_self_loops = check_flag(add_self_loops, "PointTransformerConv: add_self_loops")
        if recompute != "auto" and not isinstance(recompute, (bool, np.bool_)):
            # (1 == True: `recompute in (True, False, "auto")` let 0 / 1 / 1.0 through, kept as numbers)
            raise ValueError(f"PointTransformerConv: recompute must be True, False or 'auto', got {recompute!r}")
        self.recompute = recompute if recompute == "auto" else bool(recompute)
        for name, net in (("pos_nn", pos_nn), ("attn_nn", attn_nn)):
            if net is not None and not callable(net):
                raise TypeError(f"PointTransformerConv: {name} must be a module (a callable mapping [E, "
                                f"{'P' if name == 'pos_nn' else out_channels}] to [E, {out_channels}]) or None, "
                                f"got {type(net).__name__}")
        self._default_pos_nn = pos_nn is None
        src_size, dst_size = in_channels if isinstance(in_channels, tuple) else (in_channels, in_channels)
        self.pos_nn = pos_nn if pos_nn is not None else nn.Linear(3, out_channels)
        self.attn_nn = attn_nn
        self.lin = _linear(src_size, out_channels, bias=False)
        self.lin_src = _linear(src_size, out_channels, bias=False)
        self.lin_dst = _linear(dst_size, out_channels, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        reset(self.pos_nn)  # PyG's: each submodule's reset_parameters (pos_nn / attn_nn may be any module)
        reset(self.attn_nn)
        for lin in (self.lin, self.lin_src, self.lin_dst):  # PyG's Linear.reset_parameters; a lazy one when sized
            if not _is_lazy(lin):
                _init_linear_kaiming_(lin)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.in_channels}, {self.out_channels})"

    # ------------------------------------------------------------------------------------------ inputs
    def _expected(self, lin: nn.Module) -> int:
        lazy = isinstance(lin, nn.LazyLinear) and lin.has_uninitialized_params()
        return -1 if lazy else lin.weight.shape[1]

    def _inputs(self, x, pos):
        if isinstance(x, Tensor):
            x_src = self._like_weights(_check_features("x", x, self._expected(self.lin)), self.lin, "x")
            x_dst = x_src
        elif isinstance(x, (tuple, list)) and len(x) == 2:
            x_src = _check_features("x[0] (source features)", x[0], self._expected(self.lin))
            x_dst = _check_features("x[1] (target features)", x[1], self._expected(self.lin_dst))
            self._like_weights(x_src, self.lin, "x[0] (source features)")
            self._like_weights(x_dst, self.lin_dst, "x[1] (target features)")
        else:
            raise TypeError(f"x must be a tensor or a (source, target) pair of tensors, got {type(x).__name__}")
        if isinstance(pos, Tensor):
            pos_src = pos_dst = pos
        elif isinstance(pos, (tuple, list)) and len(pos) == 2:
            pos_src, pos_dst = pos
        else:
            raise TypeError(f"pos must be a tensor or a (source, target) pair of tensors, got {type(pos).__name__}")
        autocast = torch.is_autocast_enabled(x_src.device.type)
        for name, p, feats in (("pos (source)", pos_src, x_src), ("pos (target)", pos_dst, x_dst)):
            if not isinstance(p, Tensor) or not p.is_floating_point() or p.dim() != 2:
                what = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
                raise ValueError(f"{name} must be a floating-point [N, P] tensor, got {what}")
            if p.size(0) != feats.size(0):
                raise ValueError(f"{name} has {p.size(0)} rows but the features have {feats.size(0)}")
            # autocast casts float32 / half inputs of pos_nn's layers, never float64
            if p.dtype != feats.dtype and (not autocast or torch.float64 in (p.dtype, feats.dtype)):
                raise TypeError(f"{name} is {p.dtype} but x is {feats.dtype}: give pos the dtype of x and of the "
                                f"layer's weights (pos.to({feats.dtype}))")
            if p.numel() and not is_tracing() and not bool(torch.isfinite(p.detach()).all()):
                raise ValueError(f"{name} contains NaN or Inf values")
        if pos_src.size(1) != pos_dst.size(1):
            raise ValueError(f"pos (source) has {pos_src.size(1)} coordinates but pos (target) has {pos_dst.size(1)}")
        pos_nn, coords = self.pos_nn, pos_src.size(1)
        if isinstance(pos_nn, nn.Linear) and not isinstance(pos_nn, nn.LazyLinear) and pos_nn.in_features != coords:
            if getattr(self, "_default_pos_nn", False) and pos_nn.in_features == 3:
                raise ValueError(f"pos has {coords} coordinates; the default pos_nn is Linear(3, out_channels): pass "
                                 f"pos_nn (e.g. torch.nn.Linear({coords}, {self.out_channels}))")
            raise ValueError(f"pos has {coords} coordinates but pos_nn is Linear({pos_nn.in_features}, "
                             f"{pos_nn.out_features})")
        return x_src, x_dst, pos_src, pos_dst

    def _like_weights(self, x: Tensor, lin: nn.Module, what: str) -> Tensor:
        """x of the dtype (and on the device) of ``lin``'s weight: else a TypeError naming both, not torch's
        "mat1 and mat2 must have the same dtype" (any dtype under torch.autocast)."""
        if self._expected(lin) != -1:
            check_like_weights(x, lin.weight, f"PointTransformerConv: {what}", "layer")
        return x

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, x, pos, edge_index) -> Tensor:
        x_src, x_dst, pos_src, pos_dst = self._inputs(x, pos)
        # PyG's order (point_transformer_conv.py, forward): lin_src, lin_dst, then lin, so lazy (-1) projections
        # materialise in that order and a seeded lazy layer draws PyG's weights
        a_src_NC = self.lin_src(x_src)
        a_dst_NC = self.lin_dst(x_dst)
        v_NC = self.lin(x_src)
        graph = self._graph(edge_index, x_src.size(0), x_dst.size(0))
        if self._runs_propagate():
            # PyG's propagate: the explain mask and the hooks see PyG's messages; torch.func transforms run it too
            with self._default_flow_inside():
                return self.propagate(graph.edge_index, x=(v_NC, None), pos=(pos_src, pos_dst),
                                      alpha=(a_src_NC, a_dst_NC), size=(x_src.size(0), x_dst.size(0)))
        return self._blockwise(graph, v_NC, a_src_NC, a_dst_NC, pos_src, pos_dst)

    def _scores_and_values(self, rel_pos: Tensor, a_dst: Tensor, a_src: Tensor, v_src: Tensor):
        """Per edge, from p_i - p_j, W_dst x_i, W_src x_j, W x_j: (scores [c, C] before the softmax, values
        W x_j + delta [c, C]) -- PyG's message up to the softmax."""
        delta = self._checked("pos_nn", self.pos_nn(rel_pos), rel_pos)
        scores = a_dst - a_src + delta
        if self.attn_nn is not None:
            scores = self._checked("attn_nn", self.attn_nn(scores), scores)
        return scores, v_src + delta

    def _checked(self, name: str, out, inp: Tensor) -> Tensor:
        """A user network's output must be [E, out_channels] for the E edges it was given (else torch's error
        from the sum or the softmax that follows names neither the network nor the widths)."""
        want = (inp.size(0), self.out_channels)
        if not isinstance(out, Tensor) or tuple(out.shape) != want:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            width = f"returned {got[-1]} channels" if isinstance(out, Tensor) and out.dim() == 2 else f"returned {got}"
            raise ValueError(f"PointTransformerConv: {name} {width} for input [{inp.size(0)}, {inp.size(1)}]; "
                             f"expected [{want[0]}, out_channels={self.out_channels}]")
        return out

    def message(self, x_j: Tensor, pos_i: Tensor, pos_j: Tensor, alpha_i: Tensor, alpha_j: Tensor,
                index: Tensor, size_i: Optional[int]) -> Tensor:
        """PyG's message (the explain / hook path): alpha * (W x_j + delta), softmax per channel."""
        scores, values = self._scores_and_values(pos_i - pos_j, alpha_i, alpha_j, x_j)
        # size_i as PyG passes it: not int(), which would fix a symbolic node count to the example's under export
        return segment_softmax(scores, index, size_i) * values

    def _blockwise(self, graph: GraphStructure, v_NC, a_src_NC, a_dst_NC, pos_src, pos_dst) -> Tensor:
        csr = graph.csr.to(v_NC.device)
        num_dst, channels = csr.num_dst, v_NC.size(1)
        if csr.num_edges == 0:
            # no edge: PyG's message over zero edges -- zeros, attached to the autograd graph through every network
            # PyG runs (pos_nn, attn_nn, lin, lin_src, lin_dst), so each gets a zero gradient as in PyG, not None
            # (optimizers skip a None-gradient parameter: no momentum step, no weight decay)
            scores, values = self._scores_and_values(pos_dst[:0] - pos_src[:0], a_dst_NC[:0], a_src_NC[:0], v_NC[:0])
            return (scores.sum(0) * 0 + values.sum(0)).expand(num_dst, channels).clone()
        # one block: under batch statistics (they must see every edge, as in PyG) and under torch.compile /
        # export (a Python loop over blocks would be unrolled into the graph)
        # and when training without recompute (every block's intermediates would be kept anyway)
        whole = (is_tracing() or _has_batch_statistics(self.pos_nn) or _has_batch_statistics(self.attn_nn)
                 or (torch.is_grad_enabled() and not self._recomputes(csr.num_edges, channels, v_NC)))
        blocks = [(0, num_dst, 0, csr.num_edges)] if whole else csr.blocks(max(1, _BLOCK_ELEMENTS // channels))
        recompute = torch.is_grad_enabled() and len(blocks) > 1
        # Trim the heap before each block only when there are several: one block leaves no holes between
        # blocks, and trimming would hand back the heap of the previous call, which this call's allocations
        # would then page-fault in again (docs/points.md).
        trim = len(blocks) > 1
        tensors = (v_NC, a_src_NC, a_dst_NC, pos_src, pos_dst)
        rowptr = _kernel_rowptr(csr, v_NC)
        outs, covered = [], 0
        for n0, n1, e0, e1 in blocks:
            if n0 > covered:  # destinations without edges: zeros
                outs.append(v_NC.new_zeros(n0 - covered, channels))
            block_rowptr = None if rowptr is None else rowptr[n0:n1 + 1] - e0
            if recompute:
                out = checkpoint(self._block, csr.col[e0:e1], csr.row[e0:e1] - n0, n0, n1, trim, block_rowptr,
                                 *tensors, use_reentrant=False)
            else:
                out = self._block(csr.col[e0:e1], csr.row[e0:e1] - n0, n0, n1, trim, block_rowptr, *tensors)
            outs.append(out)
            covered = n1
        if covered < num_dst:
            outs.append(v_NC.new_zeros(num_dst - covered, channels))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _recomputes(self, num_edges: int, channels: int, like: Tensor) -> bool:
        """Whether training checkpoints the blocks (``recompute``; "auto": by the estimated kept bytes)."""
        if self.recompute != "auto":
            return self.recompute
        kept = num_edges * channels * _KEPT_PER_EDGE_CHANNEL * like.element_size()
        return kept > _AUTO_RECOMPUTE_BYTES

    def _block(self, src: Tensor, dst_local: Tensor, n0: int, n1: int, trim: bool, rowptr: Optional[Tensor], v_NC,
               a_src_NC, a_dst_NC, pos_src, pos_dst) -> Tensor:
        """One block of whole neighbourhoods (destinations n0..n1-1): softmax per destination and channel,
        weighted sum -> [n1 - n0, C]. ``trim``: first hand freed heap back to the OS (several blocks);
        ``rowptr``: the block's CSR row pointers (CUDA: the Triton aggregation)."""
        if trim:
            _release_free_heap()
        dst = dst_local + n0
        # index_select, not x[idx]: its backward is index_add_, 2-4x faster on CPU than the accumulating
        # index_put_ of advanced indexing for rows of 32+ channels (docs/points.md)
        scores, values = self._scores_and_values(
            pos_dst.index_select(0, dst) - pos_src.index_select(0, src), a_dst_NC.index_select(0, dst),
            a_src_NC.index_select(0, src), v_NC.index_select(0, src))
        return segment_softmax_weighted_sum(scores, values, dst_local, n1 - n0, rowptr=rowptr)
