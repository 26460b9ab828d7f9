"""zoo.attention.TransformerConv against PyTorch Geometric's TransformerConv (the trusted peer): strict state-dict
loading both ways, seeded initialisation, outputs, attention weights and gradients within 1e-5 in fp32 across the
constructor arguments (heads, concat, beta, root_weight, edge_dim, bias, bipartite, lazy, flow), PyG's edge cases
(isolated nodes, multi-edges, self loops, no edges, sparse adjacency), the fused path against PyG's propagate (the
explainer path), dropout against a hand-applied keep mask, and clear errors."""
from __future__ import annotations

import math

import pytest
import torch

pyg_nn = pytest.importorskip("torch_geometric.nn")

from zoo.attention import TransformerConv  # noqa: E402
from zoo.attention import graph as zgraph  # noqa: E402
from zoo.attention.segment import build_csr, segment_softmax  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)


def _graph(num_src=12, num_dst=12, num_edges=40, seed=0):
    """Random edges with self loops, multi-edges and (the last two destinations) isolated nodes."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, num_src, (num_edges,), generator=g)
    dst = torch.randint(0, num_dst - 2, (num_edges,), generator=g)
    ei = torch.stack([src, dst])
    ei[:, :2] = torch.tensor([[1, 1], [1, 1]])  # a repeated self loop (kept: no loops are removed or added)
    ei[:, 2:5] = torch.tensor([[4, 4, 4], [5, 5, 5]])  # multi-edges
    return ei


def _pair(*args, **kwargs):
    torch.manual_seed(0)
    peer = pyg_nn.TransformerConv(*args, **kwargs)
    ours = TransformerConv(*args, **kwargs)
    ours.load_state_dict(peer.state_dict(), strict=True)
    return ours, peer


def _run(module, inputs, ei, edge_attr=None, weights=True):
    """Forward (with the attention weights when ``weights``) and the gradients of a fixed projection of the output
    (plus, with weights, of the attention) with respect to the inputs, edge_attr and every parameter."""
    xs = [t.detach().clone().requires_grad_(True) for t in inputs]
    ea = None if edge_attr is None else edge_attr.detach().clone().requires_grad_(True)
    x = xs[0] if len(xs) == 1 else tuple(xs)
    result = module(x, ei, ea, return_attention_weights=True) if weights else module(x, ei, ea)
    out, (ei_out, alpha) = result if weights else (result, (None, None))
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    loss = (out * w).sum()
    if weights:
        loss = loss + (alpha * torch.linspace(-1, 1, alpha.numel()).view(alpha.shape)).sum()
    leaves = xs + ([] if ea is None else [ea]) + [p for _, p in sorted(module.named_parameters())]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return out, ei_out, alpha, grads


def _assert_same(ours, peer, inputs, ei, edge_attr=None, weights=True):
    o1, e1, a1, g1 = _run(ours, inputs, ei, edge_attr, weights)
    o2, e2, a2, g2 = _run(peer, inputs, ei, edge_attr, weights)
    torch.testing.assert_close(o1, o2, **TOL)
    if weights:
        if e1.layout != torch.strided:
            assert e1 is e2 or torch.equal(e1.to_dense(), e2.to_dense())
        else:
            assert torch.equal(e1, e2)
        torch.testing.assert_close(a1, a2, **TOL)
    assert len(g1) == len(g2)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **TOL)


ARGS = [
    dict(heads=1),
    dict(heads=3),
    dict(heads=2, concat=False),
    dict(heads=2, beta=True),
    dict(heads=2, beta=True, concat=False),
    dict(heads=2, root_weight=False, beta=True),  # beta needs root_weight: off, as PyG's
    dict(heads=2, bias=False),
    dict(heads=2, edge_dim=3),
    dict(heads=2, edge_dim=3, concat=False, beta=True),
    dict(heads=2, edge_dim=1, bias=False, root_weight=False),
]


@pytest.mark.parametrize("kwargs", ARGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
@pytest.mark.parametrize("weights", [True, False], ids=["with_weights", "fused"])
def test_matches_pyg(kwargs, weights):
    ours, peer = _pair(8, 5, **kwargs)
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(2))
    ei = _graph()
    ea = None
    if kwargs.get("edge_dim"):
        ea = torch.randn(ei.size(1), kwargs["edge_dim"], generator=torch.Generator().manual_seed(3))
    _assert_same(ours, peer, [x], ei, ea, weights)
    if kwargs.get("edge_dim") == 1:  # ours also takes it 1-D, as the GAT layers (PyG's TransformerConv does not)
        torch.testing.assert_close(ours(x, ei, ea.view(-1)), ours(x, ei, ea))


@pytest.mark.parametrize("n_src,n_dst", [(12, 7), (7, 12)])
@pytest.mark.parametrize("kwargs", [dict(heads=2), dict(heads=2, edge_dim=2, beta=True)])
def test_bipartite_matches_pyg(n_src, n_dst, kwargs):
    ours, peer = _pair((8, 6), 4, **kwargs)
    g = torch.Generator().manual_seed(4)
    xs, xd = torch.randn(n_src, 8, generator=g), torch.randn(n_dst, 6, generator=g)
    ei = _graph(n_src, n_dst, 30, seed=5)
    ea = torch.randn(30, 2, generator=g) if kwargs.get("edge_dim") else None
    for weights in (True, False):
        _assert_same(ours, peer, [xs, xd], ei, ea, weights)


def test_edge_cases_match_pyg():
    ours, peer = _pair(6, 4, heads=2, beta=True)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(6))
    for ei in (torch.empty(2, 0, dtype=torch.long),  # no edges: the skip term only
               torch.tensor([[0, 0, 0], [1, 1, 1]]),  # one node with a triple edge, the others isolated
               torch.tensor([[2], [2]])):  # a lone self loop
        for weights in (True, False):
            _assert_same(ours, peer, [x], ei, None, weights)


def test_flow_target_to_source_matches_pyg():
    ours, peer = _pair(8, 3, heads=2, flow="target_to_source")
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(7))
    for weights in (True, False):
        _assert_same(ours, peer, [x], _graph(), None, weights)
    # two node sets: PyG's TransformerConv sizes the output by the targets (edge_index rows (target, source))
    ours, peer = _pair((8, 6), 3, heads=2, flow="target_to_source", beta=True)
    g = torch.Generator().manual_seed(22)
    xs, xd = torch.randn(10, 8, generator=g), torch.randn(7, 6, generator=g)
    ei = _graph(10, 7, 30, seed=23).flip(0)
    for weights in (True, False):
        _assert_same(ours, peer, [xs, xd], ei, None, weights)


def test_csc_adjacency_returns_alpha_in_its_storage_order():
    """PyG refuses a CSC adj_t; ours takes it and returns it with alpha in its storage (column-major) order, the
    order of its values and of its edge_attr rows."""
    layer = TransformerConv(8, 3, heads=2)
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(27))
    ei = torch.unique(_graph(), dim=1)
    coo = torch.sparse_coo_tensor(ei.flip(0), torch.ones(ei.size(1)), (12, 12)).coalesce()
    csc = coo.to_sparse_csc()
    _, (returned, alpha) = layer(x, csc, return_attention_weights=True)
    assert returned is csc
    _, (dense_ei, dense_alpha) = layer(x, ei, return_attention_weights=True)
    by_edge = {(int(s), int(d)): a for s, d, a in zip(dense_ei[0], dense_ei[1], dense_alpha)}
    cols = torch.repeat_interleave(torch.arange(12), csc.ccol_indices().diff())  # source of each stored entry
    for k, (dst, src) in enumerate(zip(csc.row_indices().tolist(), cols.tolist())):
        torch.testing.assert_close(alpha[k], by_edge[(src, dst)])


@pytest.mark.parametrize("layout", [torch.sparse_csr, torch.sparse_coo])
def test_sparse_adjacency_matches_pyg(layout):
    """adj_t [Nd, Ns] as PyG takes it: the outputs of the [2, E] edge_index, and with the weights requested the
    adjacency itself back with alpha in its (dst, src) row-major order, as PyG returns them."""
    ours, peer = _pair(8, 3, heads=2)
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(8))
    ei = torch.unique(_graph(), dim=1)  # no multi-edges: one matrix entry each
    adj = torch.sparse_coo_tensor(ei.flip(0), torch.ones(ei.size(1)), (12, 12)).coalesce()
    adj = adj.to_sparse_csr() if layout == torch.sparse_csr else adj
    for weights in (True, False):
        _assert_same(ours, peer, [x], adj, None, weights)
    torch.testing.assert_close(ours(x, adj), ours(x, ei), **TOL)


def test_seeded_construction_draws_pygs_weights():
    for args, kwargs in (((8, 5), dict(heads=2, edge_dim=3, beta=True)), (((8, 6), 4), dict(concat=False))):
        torch.manual_seed(11)
        peer = pyg_nn.TransformerConv(*args, **kwargs)
        torch.manual_seed(11)
        ours = TransformerConv(*args, **kwargs)
        theirs = peer.state_dict()
        assert list(ours.state_dict()) == list(theirs)
        for key, value in ours.state_dict().items():
            assert torch.equal(value, theirs[key]), key


def test_lazy_in_channels_size_from_the_first_input_as_pyg():
    torch.manual_seed(12)
    peer = pyg_nn.TransformerConv(-1, 4, heads=2)
    torch.manual_seed(12)
    ours = TransformerConv(-1, 4, heads=2)
    x = torch.randn(12, 7, generator=torch.Generator().manual_seed(13))
    ei = _graph()
    torch.manual_seed(14)
    want = peer(x, ei)
    torch.manual_seed(14)
    torch.testing.assert_close(ours(x, ei), want, **TOL)
    assert ours.lin_key.weight.shape == (8, 7)
    # and a lazy layer loads a sized state dict
    fresh = TransformerConv(-1, 4, heads=2)
    fresh.load_state_dict(peer.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x, ei), want, **TOL)


def test_seeded_lazy_models_draw_pygs_weights_and_unsized_state_dicts_load_both_ways():
    """Two lazy layers in a row, the first without root_weight (PyG's forward never sizes its lin_skip, so neither
    does ours: an extra draw would shift the second layer's weights); an unsized layer's state dict (weights lazy,
    biases already [out], as PyG's Linear) loads into PyG's unsized layer and back."""
    def model(cls):
        return torch.nn.ModuleList([cls(-1, 4, heads=2, root_weight=False), cls(-1, 3, heads=1)])

    x, ei = torch.randn(12, 7, generator=torch.Generator().manual_seed(24)), _graph()
    outs = []
    for cls in (TransformerConv, pyg_nn.TransformerConv):
        torch.manual_seed(25)
        layers = model(cls)
        torch.manual_seed(26)
        outs.append(layers[1](layers[0](x, ei), ei))
    torch.testing.assert_close(outs[0], outs[1], **TOL)
    for src_cls, dst_cls in ((TransformerConv, pyg_nn.TransformerConv), (pyg_nn.TransformerConv, TransformerConv)):
        unsized, target = src_cls(-1, 4, heads=2), dst_cls(-1, 4, heads=2)
        target.load_state_dict(unsized.state_dict(), strict=True)


def test_state_dict_loads_into_pyg_and_repr():
    torch.manual_seed(15)
    ours = TransformerConv(8, 5, heads=2, edge_dim=3, beta=True)
    peer = pyg_nn.TransformerConv(8, 5, heads=2, edge_dim=3, beta=True)
    peer.load_state_dict(ours.state_dict(), strict=True)
    assert repr(ours) == repr(peer) == "TransformerConv(8, 5, heads=2)"
    x, ei = torch.randn(12, 8), _graph()
    ea = torch.randn(ei.size(1), 3)
    torch.testing.assert_close(ours(x, ei, ea), peer(x, ei, ea), **TOL)


def test_fused_path_equals_pygs_propagate_and_explainer_hooks_take_it():
    """A message forward hook (PyG's AttentionExplainer registers one) sends the layer through propagate, where
    the hook sees PyG's [E, H, C] messages; outputs and gradients equal the fused path's."""
    layer = TransformerConv(8, 5, heads=2)
    x, ei = torch.randn(12, 8, generator=torch.Generator().manual_seed(16)), _graph()
    fused = _run(layer, [x], ei, weights=False)
    seen = []
    handle = layer.register_message_forward_hook(lambda module, inputs, out: seen.append(out.shape))
    try:
        hooked = _run(layer, [x], ei, weights=False)
    finally:
        handle.remove()
    assert seen == [(ei.size(1), 2, 5)]
    torch.testing.assert_close(hooked[0], fused[0], atol=1e-6, rtol=1e-6)
    for a, b in zip(hooked[3], fused[3]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_training_dropout_on_the_fused_path_is_a_keep_mask_on_alpha(monkeypatch):
    """In training the fused path drops attention coefficients with a [E, H] keep mask and rescales by 1 / (1 - p),
    as F.dropout on PyG's alpha: checked against the float64 formula with the same mask."""
    layer = TransformerConv(8, 5, heads=2, dropout=0.4).double().train()
    x, ei = torch.randn(12, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(17)), _graph()
    keep = torch.rand(ei.size(1), 2, generator=torch.Generator().manual_seed(18)) >= 0.4
    monkeypatch.setattr(zgraph.TransformerConv, "_keep_mask", lambda self, graph, device, dtype: keep)
    out = layer(x, ei)
    csr = build_csr(ei, 12, 12)
    q = layer.lin_query(x).view(12, 2, 5)
    k = layer.lin_key(x).view(12, 2, 5)
    v = layer.lin_value(x).view(12, 2, 5)
    scores = (q[csr.row] * k[csr.col]).sum(-1) / math.sqrt(5)
    alpha = segment_softmax(scores, csr.row, 12) * keep / 0.6
    msg = torch.zeros(12, 2, 5, dtype=torch.float64).index_add_(0, csr.row, alpha[..., None] * v[csr.col])
    torch.testing.assert_close(out, msg.reshape(12, 10) + layer.lin_skip(x))
    layer.eval()
    assert torch.equal(layer(x, ei), layer(x, ei))  # no dropout in evaluation


def test_torch_export_runs_pygs_path():
    layer = TransformerConv(8, 5, heads=2, edge_dim=3).eval()
    x, ei = torch.randn(12, 8), _graph()
    ea = torch.randn(ei.size(1), 3)
    program = torch.export.export(layer, (x, ei, ea))
    torch.testing.assert_close(program.module()(x, ei, ea), layer(x, ei, ea), **TOL)


def test_bad_inputs_raise_clear_errors():
    layer = TransformerConv(8, 5, heads=2)
    x, ei = torch.randn(12, 8), _graph()
    with pytest.raises(ValueError, match="edge_dim=None"):
        layer(x, ei, torch.randn(ei.size(1), 3))
    with pytest.raises(ValueError, match="edge_dim=3: pass edge_attr"):
        TransformerConv(8, 5, edge_dim=3)(x, ei)
    with pytest.raises(ValueError, match="edge_attr has 3 rows but edge_index has 40 edges"):
        TransformerConv(8, 5, edge_dim=3)(x, ei, torch.randn(3, 3))
    with pytest.raises(ValueError, match="x has 7 features, the layer expects 8"):
        layer(torch.randn(12, 7), ei)
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer(torch.full((12, 8), math.nan), ei)
    with pytest.raises(ValueError, match="edge_index"):
        layer(x, ei + 20)
    with pytest.raises(TypeError, match="beta"):
        TransformerConv(8, 5, beta="yes")
    with pytest.raises(ValueError, match="heads"):
        TransformerConv(8, 5, heads=0)
    with pytest.raises(ValueError, match="decomposed_layers=2 is not supported"):
        TransformerConv(8, 5, decomposed_layers=2)


@pytest.mark.parametrize("edge_dim", [None, 3])
def test_explain_edge_masks_match_pyg(edge_dim):
    """PyG's explain mode (set_masks, as GNNExplainer uses it) multiplies each message by its edge mask; the layer
    then leaves its fused path for propagate, and outputs and the mask's gradient equal PyG's layer with the same
    weights."""
    from torch_geometric.explain.algorithm.utils import clear_masks, set_masks

    ours, peer = _pair(8, 5, heads=2, edge_dim=edge_dim, beta=True)
    x, ei = torch.randn(12, 8, generator=torch.Generator().manual_seed(19)), _graph()
    ea = None if edge_dim is None else torch.randn(ei.size(1), 3, generator=torch.Generator().manual_seed(20))
    results = []
    for layer in (ours, peer):
        mask = torch.nn.Parameter(torch.randn(ei.size(1), generator=torch.Generator().manual_seed(21)))
        set_masks(layer, mask, ei, apply_sigmoid=True)
        out = layer(x, ei, ea)
        results.append((out, torch.autograd.grad(out.square().sum(), mask)[0]))
        clear_masks(layer)
    torch.testing.assert_close(results[0][0], results[1][0], **TOL)
    torch.testing.assert_close(results[0][1], results[1][1], **TOL)
    torch.testing.assert_close(ours(x, ei, ea), peer(x, ei, ea), **TOL)  # masks cleared: the plain layer again


def test_attention_explainer_with_the_reverse_flow_matches_pyg():
    """layer.flow reads the caller's flow, as PyG's layer (AttentionExplainer takes a node's neighbourhood by it);
    the edge masks equal PyG's for flow="target_to_source"."""
    from torch_geometric.explain import AttentionExplainer, Explainer

    ours, peer = _pair(8, 4, heads=2, flow="target_to_source")
    assert ours.flow == peer.flow == "target_to_source"
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(28))
    ei = _graph()
    masks = []
    for layer in (ours, peer):
        explainer = Explainer(layer, algorithm=AttentionExplainer(), explanation_type="model", edge_mask_type="object",
                              model_config=dict(mode="regression", task_level="node", return_type="raw"))
        masks.append(explainer(x, ei, index=2).edge_mask)
    assert masks[0].abs().sum() > 0
    torch.testing.assert_close(masks[0], masks[1], **TOL)


def test_seeded_training_dropout_drops_the_edges_pygs_layer_drops():
    """The fused path's keep mask is drawn as PyG's F.dropout draws it, in edge order: a seeded training forward
    equals PyG's, and the propagate path's (weights requested) too."""
    ours, peer = _pair(8, 4, heads=2, dropout=0.5)
    ours.train(), peer.train()
    x, ei = torch.randn(12, 8, generator=torch.Generator().manual_seed(29)), _graph()
    outs = []
    for call in (lambda: ours(x, ei), lambda: peer(x, ei), lambda: ours(x, ei, return_attention_weights=True)[0]):
        torch.manual_seed(4)
        outs.append(call())
    assert not torch.equal(outs[0], ours.eval()(x, ei))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(outs[2], outs[1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(), dict(beta=True), dict(root_weight=False)])
def test_lazy_edge_dim_sizes_lin_edge_from_the_first_edge_attr_as_pyg(kwargs):
    """edge_dim=-1: lin_edge sized from the first edge_attr, at the point of PyG's forward where its message sizes
    it (after query, key and value, before the skip projection), so seeded lazy layers draw PyG's weights; a sized
    PyG state dict loads into a lazy layer."""
    x, ei = torch.randn(12, 8, generator=torch.Generator().manual_seed(30)), _graph()
    ea = torch.randn(ei.size(1), 3, generator=torch.Generator().manual_seed(31))
    outs = []
    for cls in (TransformerConv, pyg_nn.TransformerConv):
        torch.manual_seed(32)
        layer = cls(-1, 4, heads=2, edge_dim=-1, **kwargs)
        outs.append(layer(x, ei, ea))
    torch.testing.assert_close(outs[0], outs[1], **TOL)
    assert layer.lin_edge.weight.shape == (8, 3)
    ours = TransformerConv(-1, 4, heads=2, edge_dim=-1, **kwargs)  # (PyG's lin_skip stays unsized without root_weight)
    ours.load_state_dict(layer.state_dict(), strict=True)
    torch.testing.assert_close(ours(x, ei, ea), outs[1], **TOL)


@pytest.mark.parametrize("chunk", [None, 16])
def test_edge_dot_matches_autograd_and_keeps_no_edge_by_channel_tensor(chunk):
    """zoo.attention.segment.edge_dot: q[row] . k[col] per edge and head, its gradients those of autograd's
    gathers (float64, chunks of a few edges included); the layer's fused path keeps nothing of E*H*C elements for
    backward, where PyG's TransformerConv keeps several (probed with saved-tensor hooks)."""
    from zoo.attention.segment import edge_dot

    g = torch.Generator().manual_seed(33)
    q = torch.randn(9, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(7, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    row, col = torch.randint(0, 9, (50,), generator=g), torch.randint(0, 7, (50,), generator=g)
    got = edge_dot(q, k, row, col, chunk_elements=chunk)
    want = (q[row] * k[col]).sum(-1)
    torch.testing.assert_close(got, want)
    w = torch.randn(50, 3, dtype=torch.float64, generator=g)
    for a, b in zip(torch.autograd.grad((got * w).sum(), (q, k)), torch.autograd.grad((want * w).sum(), (q, k))):
        torch.testing.assert_close(a, b)
    N, E, H, C = 20, 400, 2, 8
    ei = torch.randint(0, N, (2, E), generator=g)
    x = torch.randn(N, 6, generator=g, requires_grad=True)
    ours, peer = _pair(6, C, heads=H, dropout=0.3)
    largest = {}
    for name, layer in (("zoo", ours.train()), ("pyg", peer.train())):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, sizes=sizes: sizes.append(t.numel()) or t, lambda t: t):
            out = layer(x, ei)
        out.sum().backward()
        largest[name] = max(sizes)
    assert largest["zoo"] <= max(N * H * C, E * H, N * 6), largest
    assert largest["pyg"] >= E * H * C, largest


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_edge_dot_half_gradients_are_summed_in_fp32(dtype):
    """Half inputs in many small chunks: the gradients are summed in fp32 and rounded once. autograd's gathers sum
    their backward in the half dtype (as a half buffer here did, chunk by chunk): measured 2026-12-07 at 3000 edges,
    edge_dot's max error against float64 is 0.18x autograd's in fp16 and bf16 (1.0x with a half buffer)."""
    from zoo.attention.segment import edge_dot

    g = torch.Generator().manual_seed(34)
    q64, k64 = torch.randn(30, 2, 8, dtype=torch.float64, generator=g), torch.randn(30, 2, 8, dtype=torch.float64, generator=g)
    row, col = torch.randint(0, 30, (3000,), generator=g), torch.randint(0, 30, (3000,), generator=g)
    w = torch.randn(3000, 2, dtype=torch.float64, generator=g)
    q64.requires_grad_()
    want = torch.autograd.grad(((q64[row] * k64[col]).sum(-1) * w).sum(), q64)[0]
    errors = {}
    for name, fn in (("edge_dot", lambda q, k: edge_dot(q, k, row, col, chunk_elements=32)),
                     ("autograd", lambda q, k: (q[row] * k[col]).sum(-1))):
        q, k = q64.detach().to(dtype).requires_grad_(), k64.detach().to(dtype)
        grad = torch.autograd.grad((fn(q, k) * w.to(dtype)).sum(), q)[0]
        errors[name] = float((grad.double() - want).abs().max() / want.abs().max())
    assert errors["edge_dot"] <= 0.5 * errors["autograd"], errors


@pytest.mark.parametrize("flag", [None, False, True, 0, 1], ids=repr)
def test_return_attention_weights_is_tested_as_a_bool_as_pygs(flag):
    """PyG's TransformerConv returns (out, (edge_index, alpha)) when ``isinstance(return_attention_weights, bool)``:
    False asks for the weights as True does (unlike GATConv's truth test), while None, 0 and 1 return the tensor."""
    ours, peer = _pair(8, 4, heads=2)
    x, ei = torch.randn(12, 8, generator=torch.Generator().manual_seed(40)), _graph()
    got, want = ours(x, ei, return_attention_weights=flag), peer(x, ei, return_attention_weights=flag)
    assert isinstance(want, tuple) == isinstance(flag, bool)  # the peer's protocol, as pinned here
    assert type(got) is type(want)
    if isinstance(want, tuple):
        torch.testing.assert_close(got[0], want[0], **TOL)
        assert torch.equal(got[1][0], want[1][0])
        torch.testing.assert_close(got[1][1], want[1][1], **TOL)
    else:
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("name", ["GATConv", "GATv2Conv"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gat_lazy_edge_dim_sizes_lin_edge_from_a_one_dimensional_edge_attr_as_pyg(name, training):
    """GATConv / GATv2Conv with edge_dim=-1 and a 1-D edge_attr [E]: lin_edge is sized [H*C, 1] from it at the point
    of PyG's forward where PyG's sizes it (before the dropout draws), so a seeded layer draws PyG's weights and, in a
    seeded training run with attention dropout, drops PyG's edges."""
    x, ei = torch.randn(12, 8, generator=torch.Generator().manual_seed(41)), _graph()
    ea = torch.randn(ei.size(1), generator=torch.Generator().manual_seed(42))
    results = []
    for cls in (getattr(zgraph, name), getattr(pyg_nn, name)):
        torch.manual_seed(43)
        layer = cls(8, 4, heads=2, edge_dim=-1, dropout=0.5).train(training)
        torch.manual_seed(44)
        results.append((layer(x, ei, ea), layer.lin_edge.weight))
    (out, w), (want_out, want_w) = results
    assert tuple(want_w.shape) == (8, 1)
    torch.testing.assert_close(w, want_w, atol=0, rtol=0)
    torch.testing.assert_close(out, want_out, **TOL)


def test_edge_dot_names_bad_indices():
    from zoo.attention.segment import edge_dot

    q, k = torch.randn(4, 2, 3), torch.randn(5, 2, 3)
    with pytest.raises(ValueError, match=r"edge_dot: row holds 4, out of range for 4 nodes \(valid: 0..3\)"):
        edge_dot(q, k, torch.tensor([0, 4]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="edge_dot: col holds -1"):
        edge_dot(q, k, torch.tensor([0, 1]), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="edge_dot: col must be a 1-D int64 / int32 tensor, got torch.float32"):
        edge_dot(q, k, torch.tensor([0, 1]), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="one length"):
        edge_dot(q, k, torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="must agree on heads and channels"):
        edge_dot(q, torch.randn(5, 2, 4), torch.tensor([0]), torch.tensor([0]))
