"""The PyG-compatible graph layers under ``torch.compile(..., fullgraph=True)``.

PyG's GATv2Conv / GATConv / TransformerConv compile as one graph; so do ours: the graph structure (value checks,
self loops, CSR sort) and the fused attention are custom operators (zoo/attention/graph.py ``zoo::graph_structure``,
zoo/attention/segment.py ``zoo::gatv2_attention``, ``zoo::segment_softmax_aggregate``, ``zoo::edge_dot`` and their
backward operators), one opaque node each, run eagerly inside the compiled graph. Checked here against PyG's layer
with the same state dict (outputs, attention weights, input / edge-feature / parameter gradients within 1e-5) for
every option the compiled path branches on, plus dynamic shapes (a second edge / node count recompiles once) and the
eager error for bad indices. Backend ``aot_eager``: Dynamo and AOTAutograd as inductor gets them, without code
generation (see tests/test_compile.py). The graph models and the memory check are in tests/test_compile.py.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch_geometric.nn as pyg_nn
from torch._dynamo.utils import counters

from zoo.attention import Edges, GATConv, GATv2Conv, TransformerConv, attend

BACKEND = "aot_eager"
TOL = dict(atol=1e-5, rtol=1e-5)
PEERS = {GATv2Conv: pyg_nn.GATv2Conv, GATConv: pyg_nn.GATConv, TransformerConv: pyg_nn.TransformerConv}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _edges(num_src, num_dst, num_edges, seed=0):
    g = torch.Generator().manual_seed(seed)
    ei = torch.stack([torch.randint(0, num_src, (num_edges,), generator=g),
                      torch.randint(0, num_dst, (num_edges,), generator=g)])
    ei[:, :2] = torch.tensor([[1, 2], [1, 2]])  # existing self loops (dropped, then added again with add_self_loops)
    ei[:, 2:4] = torch.tensor([[3, 3], [0, 0]])  # a multi-edge
    return ei


def _step(module, call, x, ei, edge_attr, weights):
    """(output, returned edge index or None, alpha or None, gradients of x, edge_attr and the parameters) for a fixed
    projection of the output."""
    xs = tuple(t.detach().clone().requires_grad_(True) for t in (x if isinstance(x, tuple) else (x,)))
    ea = None if edge_attr is None else edge_attr.detach().clone().requires_grad_(True)
    result = call(xs if isinstance(x, tuple) else xs[0], ei, ea, return_attention_weights=weights)
    out, (ei_out, alpha) = result if weights else (result, (None, None))
    projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * projection).sum().backward()
    grads = [t.grad for t in xs] + ([] if ea is None else [ea.grad])
    grads += [p.grad.clone() for _, p in sorted(module.named_parameters())]
    module.zero_grad()
    return out.detach(), ei_out, None if alpha is None else alpha.detach(), grads


CASES = [
    (GATv2Conv, dict(heads=2)),
    (GATv2Conv, dict(heads=2, add_self_loops=False)),
    (GATv2Conv, dict(heads=3, concat=False)),
    (GATv2Conv, dict(heads=2, edge_dim=3, fill_value=0.5)),
    (GATv2Conv, dict(heads=2, share_weights=True, residual=True)),
    (GATConv, dict(heads=2)),
    (GATConv, dict(heads=2, add_self_loops=False, edge_dim=3)),
    (GATConv, dict(heads=3, concat=False, residual=True)),
    (TransformerConv, dict(heads=2)),
    (TransformerConv, dict(heads=2, edge_dim=3)),
    (TransformerConv, dict(heads=3, concat=False, beta=True)),
]


@pytest.mark.parametrize("weights", [True, None], ids=["attention", "output"])
@pytest.mark.parametrize("bipartite", [False, True], ids=["x", "pair"])
@pytest.mark.parametrize("cls,kwargs", CASES,
                         ids=lambda v: getattr(v, "__name__", None) or ",".join(f"{a}={b}" for a, b in v.items()))
def test_layer_compiles_as_one_graph_and_matches_pyg(cls, kwargs, bipartite, weights):
    if bipartite and kwargs.get("share_weights"):
        pytest.skip("share_weights with (x_src, x_dst) of other widths: one projection, as PyG's")
    torch.manual_seed(0)
    in_channels = (5, 4) if bipartite else 6
    peer = PEERS[cls](in_channels, 5, **kwargs)
    ours = cls(in_channels, 5, **kwargs)
    ours.load_state_dict(peer.state_dict(), strict=True)
    if bipartite:
        x, ei = (torch.randn(9, 5), torch.randn(7, 4)), _edges(9, 7, 30)
    else:
        x, ei = torch.randn(12, 6), _edges(12, 12, 40)
    edge_attr = torch.randn(ei.size(1), 3) if "edge_dim" in kwargs else None

    compiled = torch.compile(ours, backend=BACKEND, fullgraph=True)  # raises on any graph break
    got = _step(ours, compiled, x, ei, edge_attr, weights)
    want = _step(peer, peer, x, ei, edge_attr, weights)
    torch.testing.assert_close(got[0], want[0], **TOL)
    if weights:
        assert torch.equal(got[1], want[1])
        torch.testing.assert_close(got[2], want[2], **TOL)
    for a, b in zip(got[3], want[3], strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("cls", [GATv2Conv, GATConv, TransformerConv])
def test_another_graph_size_recompiles_once_and_stays_right(cls):
    """Dynamo's automatic dynamic shapes: the second node / edge count recompiles with symbolic sizes, the later ones
    reuse that graph; every call gives the eager layer's output and gradients."""
    torch.manual_seed(0)
    layer = cls(6, 5, heads=2)
    compiled = torch.compile(layer, backend=BACKEND, fullgraph=True)
    counters.clear()
    for nodes, edges in [(12, 40), (20, 75), (31, 120), (7, 9)]:
        x, ei = torch.randn(nodes, 6), _edges(nodes, nodes, edges, seed=nodes)
        got = _step(layer, compiled, x, ei, None, None)
        want = _step(layer, layer, x, ei, None, None)
        torch.testing.assert_close(got[0], want[0], **TOL)
        for a, b in zip(got[3], want[3], strict=True):
            torch.testing.assert_close(a, b, **TOL)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


@pytest.mark.parametrize("cls", [GATv2Conv, GATConv, TransformerConv])
def test_bad_edge_index_raises_the_eager_error_when_compiled(cls):
    """The value checks of edge_index run inside the graph-structure operator, so the compiled layer refuses an
    out-of-range or negative index with the eager message (not an index error, nor a silent wrong result)."""
    layer = cls(6, 5, heads=2)
    compiled = torch.compile(layer, backend=BACKEND, fullgraph=True)
    x = torch.randn(12, 6)
    compiled(x, _edges(12, 12, 40))
    with pytest.raises(ValueError, match="destination index 12 is out of range for 12 destination nodes"):
        compiled(x, torch.tensor([[0, 1, 5], [2, 12, 3]]))
    with pytest.raises(ValueError, match="negative node indices"):
        compiled(x, torch.tensor([[0, -1, 5], [2, 1, 3]]))
    # a check that needs no values fails while Dynamo traces: under fullgraph=True Dynamo reports the layer's
    # TypeError inside its own "Unsupported: Observed exception" (torch 2.11), with the message
    with pytest.raises((TypeError, torch._dynamo.exc.Unsupported), match="must be an integer"):
        compiled(x, torch.zeros(2, 5))


def test_attend_with_an_edges_mask_compiles_as_one_graph():
    """attend()'s "edges" backend under fullgraph=True: the edge graph, the per-edge scores and the fused softmax /
    aggregation are custom operators; forward and gradients equal the eager call's."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 8, requires_grad=True) for n in (10, 12, 12))
    mask = Edges(_edges(12, 10, 40))

    def call(q, k, v):
        return attend(q, k, v, mask=mask, backend="edges")

    compiled = torch.compile(call, backend=BACKEND, fullgraph=True)
    grad_out = torch.randn(2, 2, 10, 8)
    got = compiled(q, k, v)
    got_grads = torch.autograd.grad(got, (q, k, v), grad_out)
    want = call(q, k, v)
    want_grads = torch.autograd.grad(want, (q, k, v), grad_out)
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def _operator_cases():
    from zoo.attention.segment import build_csr

    g = torch.Generator().manual_seed(0)
    ei = _edges(9, 7, 30)
    csr = build_csr(ei, 9, 7)
    E, H, C = csr.num_edges, 2, 3
    s_EH = torch.randn(E, H, generator=g, requires_grad=True)
    v_NHC = torch.randn(9, H, C, generator=g, requires_grad=True)
    xs_NHC = torch.randn(9, H, C, generator=g, requires_grad=True)
    x_dst, w_dst = torch.randn(7, 4, generator=g, requires_grad=True), torch.randn(H * C, 4, generator=g)
    att_HC, ea_ED = torch.randn(H, C, generator=g, requires_grad=True), torch.randn(E, 2, generator=g)
    we_FD = torch.randn(H * C, 2, generator=g, requires_grad=True)
    q_NHC = torch.randn(7, H, C, generator=g, requires_grad=True)
    keep = torch.rand(E, H, generator=g) > 0.3
    tensors = (csr.rowptr, csr.col, csr.row)
    ops = torch.ops.zoo
    gatv2_inputs = (xs_NHC, None, x_dst, w_dst, None, att_HC, ea_ED, we_FD)
    with torch.no_grad():
        _, _, max_NH, log_sum_NH = ops.gatv2_attention(*gatv2_inputs, *tensors, 0.2, None, 0.0, False, 1 << 19)
        _, _, agg_max_NH, agg_log_sum_NH = ops.segment_softmax_aggregate(s_EH, v_NHC, *tensors, keep, 0.3, False, 64)
    g_NHC = torch.randn(7, H, C, generator=g)

    def detached(*args):  # the backward operators run without autograd (no double backward): plain tensors
        return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)

    return [
        ("gatv2_attention_backward", ops.gatv2_attention_backward,
         detached(g_NHC, *gatv2_inputs, max_NH, log_sum_NH, None, *tensors, 0.2, 0.0, 1 << 19, True)),
        ("segment_softmax_aggregate_backward", ops.segment_softmax_aggregate_backward,
         detached(g_NHC, s_EH, v_NHC, *tensors, agg_max_NH, agg_log_sum_NH, keep, 0.3, 64, True, False)),
        ("edge_dot_backward", ops.edge_dot_backward,
         detached(torch.randn(E, H, generator=g), q_NHC, xs_NHC, csr.row, csr.col, 16, True, True)),
        ("graph_structure", ops.graph_structure, (ei, 9, 7, True)),
        ("graph_structure_no_loops", ops.graph_structure, (ei, 9, 7, False)),
        ("edge_graph", ops.edge_graph, (ei, 7, 9)),
        ("segment_softmax_aggregate", ops.segment_softmax_aggregate, (s_EH, v_NHC, *tensors, keep, 0.3, True, 64)),
        ("gatv2_attention", ops.gatv2_attention,
         (xs_NHC, None, x_dst, w_dst, None, att_HC, ea_ED, we_FD, *tensors, 0.2, None, 0.0, True, 1 << 19)),
        ("edge_dot", ops.edge_dot, (q_NHC, xs_NHC, csr.row, csr.col, 16)),
    ]


@pytest.mark.parametrize("name,op,args", _operator_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_custom_operators_pass_opcheck(name, op, args):
    """torch.library.opcheck: the schema, the fake implementation (sizes and dtypes against the real outputs), the
    autograd registration and AOTAutograd's dispatch of every operator the compiled layers use. opcheck does not
    compare strides, which inductor asserts: the fake implementations allocate contiguous outputs, so the real ones
    must be contiguous too (GATv2's att gradient, a transposed diagonal, failed under inductor before)."""
    torch.library.opcheck(op, args)
    outputs = op(*args)
    for i, t in enumerate(outputs if isinstance(outputs, tuple) else (outputs,)):
        assert t.is_contiguous(), (name, i, t.shape, t.stride())


@pytest.mark.parametrize("cls", [GATv2Conv, GATConv, TransformerConv])
def test_training_with_attention_dropout_compiles_and_draws_the_eager_mask(cls):
    """Attention dropout in training: the keep mask is drawn inside the compiled graph (a symbolic edge count), with
    the eager layer's draws under the same seed (aot_eager keeps torch's RNG order; inductor draws its own unless
    torch._inductor.config.fallback_random is set, for PyG's layers too)."""
    torch.manual_seed(0)
    layer = cls(6, 5, heads=2, dropout=0.3).train()
    compiled = torch.compile(layer, backend=BACKEND, fullgraph=True)
    x, ei = torch.randn(12, 6), _edges(12, 12, 40)
    torch.manual_seed(5)
    got = _step(layer, compiled, x, ei, None, None)
    torch.manual_seed(5)
    want = _step(layer, layer, x, ei, None, None)
    assert not torch.equal(want[0], _step(layer, layer, x, ei, None, None)[0])  # the draws matter
    torch.testing.assert_close(got[0], want[0], **TOL)
    for a, b in zip(got[3], want[3], strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_point_transformer_conv_compiles_as_one_graph():
    """PointTransformerConv (zoo/attention/vector.py) builds its graph through the same structure operator."""
    from zoo.attention.vector import PointTransformerConv

    torch.manual_seed(0)
    layer = PointTransformerConv(6, 5)
    x, pos, ei = torch.randn(12, 6), torch.randn(12, 3), _edges(12, 12, 40)
    compiled = torch.compile(layer, backend=BACKEND, fullgraph=True)
    got = _step(layer, lambda x, ei, ea, **_: compiled(x, pos, ei), x, ei, None, None)
    want = _step(layer, lambda x, ei, ea, **_: layer(x, pos, ei), x, ei, None, None)
    torch.testing.assert_close(got[0], want[0], **TOL)
    for a, b in zip(got[3], want[3], strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_edge_index_values_are_checked_by_the_public_functions_under_compile():
    """check_edge_index skipped its value checks whenever torch.compile traced, for every caller: build_csr and
    graph_structure compiled then took a source 9 of 4 nodes into the CSR and dropped a destination 6. Only the
    layers' compiled path skips them (their graph-structure operator checks at run time)."""
    from zoo.attention.graph import graph_structure
    from zoo.attention.segment import build_csr

    for fn in (lambda ei: build_csr(ei, 4, 4).col, lambda ei: graph_structure(ei, 4, 4, False).csr.col):
        compiled = torch.compile(fn, backend=BACKEND)
        with pytest.raises(ValueError, match="source index 9 is out of range for 4 source nodes"):
            compiled(torch.tensor([[0, 1, 9], [1, 2, 0]]))
        with pytest.raises(ValueError, match="destination index 6 is out of range for 4 destination nodes"):
            compiled(torch.tensor([[0, 1, 2], [1, 2, 6]]))
