"""GATConv / GATv2Conv / TransformerConv with PyG's other aggregations and with dropout=1.0, each against
torch_geometric's own layer on the same weights (outputs, attention weights, input and parameter gradients within
1e-5): aggr "mean", "max", "min", "mul", ["mean", "max"] (mode "cat"), a learnable Aggregation module, and "add" still
on the fused path; the MessagePassing keywords that are refused, by name."""
from __future__ import annotations

import pytest
import torch

pyg_nn = pytest.importorskip("torch_geometric.nn")
from torch_geometric.nn import aggr as pyg_aggr  # noqa: E402

from test_graph_layers import TOL, _graph, _run  # noqa: E402
from test_graph_layers import _assert_same as _assert_same_gat  # noqa: E402
from test_graph_transformer import _assert_same as _assert_same_transformer  # noqa: E402
from zoo.attention import GATConv, GATv2Conv, TransformerConv  # noqa: E402
from zoo.attention import graph as zgraph  # noqa: E402

LAYERS = {"GATConv": GATConv, "GATv2Conv": GATv2Conv, "TransformerConv": TransformerConv}
AGGREGATIONS = {
    "mean": dict(aggr="mean"),
    "max": dict(aggr="max"),
    "min": dict(aggr="min"),
    "mul": dict(aggr="mul"),
    "mean-max-cat": dict(aggr=["mean", "max"], aggr_kwargs=dict(mode="cat")),
    "softmax-learn": dict(aggr=lambda: pyg_aggr.SoftmaxAggregation(learn=True)),
}


def _layers(name, *args, **kwargs):
    """Our layer and PyG's with the same seeded weights (PyG's state dict loaded strict, and ours back into PyG's),
    each with its own aggregation module when ``aggr`` is a factory."""
    factory = kwargs.get("aggr")
    fresh = (lambda: dict(kwargs, aggr=factory())) if callable(factory) else (lambda: dict(kwargs))
    torch.manual_seed(0)
    peer = getattr(pyg_nn, name)(*args, **fresh())
    ours = LAYERS[name](*args, **fresh())
    ours.load_state_dict(peer.state_dict(), strict=True)
    if callable(factory):  # the learnable temperature away from its initial 1.0, both ways through the state dict
        state = ours.state_dict()
        state["aggr_module.t"] = torch.full_like(state["aggr_module.t"], 0.5)
        ours.load_state_dict(state, strict=True)
        peer.load_state_dict(state, strict=True)
    assert list(ours.state_dict()) == list(peer.state_dict())
    assert repr(ours) == repr(peer) and ours.aggr == peer.aggr
    return ours, peer


def _assert_same(name, ours, peer, inputs, ei, edge_attr=None):
    if name == "TransformerConv":
        _assert_same_transformer(ours, peer, inputs, ei, edge_attr)
    else:
        _assert_same_gat(ours, peer, inputs, ei, edge_attr)


def _case(name, case):
    """(constructor keywords, inputs, edge_index, edge_attr) for one graph case; with isolated nodes throughout."""
    g = torch.Generator().manual_seed(3)
    kwargs = dict(heads=2)
    if case == "bipartite":
        ei = torch.stack([torch.randint(0, 9, (30,), generator=g), torch.randint(0, 5, (30,), generator=g)])
        inputs = [torch.randn(9, 5, generator=g), torch.randn(7, 5, generator=g)]  # targets 5, 6 isolated
        if name != "TransformerConv":
            kwargs.update(add_self_loops=False)
        return kwargs, inputs, ei, None
    ei = _graph(num_nodes=10, num_edges=30, seed=3)  # self loops, multi-edges, nodes 8 and 9 isolated
    inputs = [torch.randn(10, 5, generator=g)]
    edge_attr = None
    if case == "edges":
        kwargs.update(edge_dim=3)
        edge_attr = torch.randn(ei.size(1), 3, generator=g)
    elif case == "reverse-flow":
        kwargs.update(flow="target_to_source")
    return kwargs, inputs, ei, edge_attr


@pytest.mark.parametrize("case", ["plain", "edges", "bipartite", "reverse-flow"])
@pytest.mark.parametrize("aggregation", list(AGGREGATIONS))
@pytest.mark.parametrize("name", list(LAYERS))
def test_other_aggregations_match_pyg(name, aggregation, case):
    """PyG's MessagePassing.aggregate hands the [E, H, C] messages to its aggr_module: the layers take PyG's
    propagate with the same module (its parameters in the state dict under "aggr_module."), the same attention
    and PyG's output shapes ([k*N, H*C] rows for a list with mode="cat", as PyG's view(-1, H*C) gives)."""
    kwargs, inputs, ei, edge_attr = _case(name, case)
    kwargs.update(AGGREGATIONS[aggregation])
    if name == "TransformerConv" and aggregation == "mean-max-cat":
        kwargs.update(root_weight=False)  # PyG's skip term cannot be added to the widened output (refusal test below)
    ours, peer = _layers(name, 5, 4, **kwargs)
    assert ours._runs_propagate()
    _assert_same(name, ours, peer, inputs, ei, edge_attr)


@pytest.mark.parametrize("name", list(LAYERS))
def test_mean_aggregation_with_beta_concat_and_bias_options_matches_pyg(name):
    """concat=False (heads averaged after the aggregation), bias=False, residual / beta under aggr="mean"."""
    extra = dict(beta=True, concat=False) if name == "TransformerConv" else dict(concat=False, residual=True)
    ours, peer = _layers(name, 5, 4, heads=3, aggr="max", bias=False, **extra)
    _assert_same(name, ours, peer, [torch.randn(12, 5)], _graph())


@pytest.mark.parametrize("name", list(LAYERS))
def test_sum_stays_on_the_fused_path(name, monkeypatch):
    """aggr="add" / "sum" (and the default) run the fused attention, never PyG's propagate, and match PyG's layer."""
    fused_calls = []
    for fn in ("segment_softmax_aggregate", "gatv2_attention"):
        original = getattr(zgraph, fn)
        monkeypatch.setattr(zgraph, fn, lambda *a, _f=original, **kw: fused_calls.append(1) or _f(*a, **kw))
    for aggr in ("add", "sum"):
        ours, peer = _layers(name, 5, 4, heads=2, aggr=aggr)
        ours.propagate = lambda *a, **kw: pytest.fail("the sum ran PyG's propagate")
        assert not ours._runs_propagate()
        x, ei = torch.randn(12, 5), _graph()
        fused_calls.clear()
        if name == "TransformerConv":  # (the weights requested send it to propagate, as before)
            torch.testing.assert_close(ours(x, ei), peer(x, ei), **TOL)
        else:
            o1, _, a1, _ = _run(ours, [x], ei)
            o2, _, a2, _ = _run(peer, [x], ei)
            torch.testing.assert_close(o1, o2, **TOL)
            torch.testing.assert_close(a1, a2, **TOL)
        assert fused_calls


@pytest.mark.parametrize("weights", [False, True], ids=["fused", "weights"])
@pytest.mark.parametrize("aggr", ["add", "mean"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_dropout_one_drops_every_weight_in_training_as_pyg(name, aggr, weights):
    """dropout=1.0: PyG's F.dropout(alpha, p=1.0) zeroes every attention weight in training (drawing nothing), so
    the aggregated messages are zero and the output is its bias / skip term; in evaluation it does nothing. Both on
    the fused path (aggr="add") and PyG's propagate (aggr="mean", or the weights requested)."""
    ours, peer = _layers(name, 5, 4, heads=2, dropout=1.0, aggr=aggr)
    x, ei = torch.randn(12, 5), _graph()
    for training in (True, False):
        ours.train(training), peer.train(training)
        torch.manual_seed(7)
        if weights:
            _assert_same(name, ours, peer, [x], ei)
            out, (_, alpha) = ours(x, ei, return_attention_weights=True)
            if training and name != "TransformerConv":  # (TransformerConv returns alpha before dropout, as PyG's)
                assert torch.count_nonzero(alpha) == 0
        else:
            out = ours(x, ei)
            torch.manual_seed(7)
            torch.testing.assert_close(out, peer(x, ei), **TOL)
            # gradients as PyG's: zeros (not None) for the weights behind the dropped attention
            for layer in (ours, peer):
                layer.zero_grad(set_to_none=True)
                torch.manual_seed(7)
                layer(x.clone().requires_grad_(True), ei).sum().backward()
            ours_grads, peer_grads = dict(ours.named_parameters()), dict(peer.named_parameters())
            for key, param in peer_grads.items():
                theirs, mine = param.grad, ours_grads[key].grad
                assert (theirs is None) == (mine is None), key
                if theirs is not None:
                    torch.testing.assert_close(mine, theirs, **TOL, msg=key)
            ours.zero_grad(), peer.zero_grad()
        after = torch.rand(3)
        torch.manual_seed(7)
        peer(x, ei)
        assert torch.equal(after, torch.rand(3))  # the random stream is PyG's: p=1.0 draws nothing
        if training:
            skip = (ours.lin_skip(x) if name == "TransformerConv"
                    else ours.bias.expand(12, -1))  # no residual here: the bias alone
            torch.testing.assert_close(out, skip, **TOL)


def test_dropout_outside_zero_one_is_refused():
    for cls in LAYERS.values():
        for rate in (1.5, -0.1):
            with pytest.raises(ValueError, match=rf"dropout must be in \[0, 1\], got {rate}"):
                cls(5, 4, dropout=rate)


@pytest.mark.parametrize("name", list(LAYERS))
def test_unsupported_message_passing_keywords_are_refused_by_name(name):
    cls = LAYERS[name]
    with pytest.raises(ValueError, match=rf"{name}: decomposed_layers=2 is not supported \(only 1\): PyG's decomposed"):
        cls(5, 4, decomposed_layers=2)
    with pytest.raises(ValueError, match=rf"{name}: aggr=None is not supported"):
        cls(5, 4, aggr=None)
    with pytest.raises(TypeError, match=rf"{name}: node_dim=0 is not accepted: .*PyG's layer fixes node_dim=0"):
        cls(5, 4, node_dim=0)
    with pytest.raises(TypeError, match=rf"{name}: unexpected keyword arguments \['colour'\]"):
        cls(5, 4, colour="red")
    with pytest.raises(TypeError, match=rf"{name}: aggr_kwargs must be a dict"):
        cls(5, 4, aggr="mean", aggr_kwargs=["cat"])
    with pytest.raises(ValueError, match="flow must be 'source_to_target' or 'target_to_source', got 'up'"):
        cls(5, 4, aggr="mean", flow="up")
    assert cls(5, 4, decomposed_layers=1, aggr="mean").decomposed_layers == 1
    # a widened output ("cat") that PyG's layer cannot finish either: a clear error instead of a broadcast failure
    ours = cls(5, 4, heads=2, aggr=["mean", "max"], concat=False)
    with pytest.raises(ValueError, match=rf"{name}: with aggr=\['mean', 'max'\] the aggregated output has shape "
                                         rf"\(12, 8\) and .* shape \((12, )?4,?\): they do not combine"):
        ours(torch.randn(12, 5), _graph())
    for value in (1.0, True):  # PyG's setter compares with ==
        assert cls(5, 4, decomposed_layers=value).decomposed_layers == 1
    with pytest.raises(RuntimeError):
        getattr(pyg_nn, name)(5, 4, heads=2, aggr=["mean", "max"], concat=False)(torch.randn(12, 5), _graph())


@pytest.mark.parametrize("layout", ["csr", "coo"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_seeded_dropout_under_mean_on_a_sparse_adjacency_with_self_loops(name, layout):
    """0 < dropout < 1 under aggr="mean" (PyG's propagate path) on a sparse adj_t, where the GAT layers add self
    loops and PyG draws the dropout in its own edge order: seeded training equals PyG's, outputs and gradients."""
    ours, peer = _layers(name, 5, 4, heads=2, aggr="mean", dropout=0.4)
    ours.train(), peer.train()
    ei = _graph(num_nodes=10, num_edges=30, seed=5)
    adj = torch.sparse_coo_tensor(ei.flip(0), torch.ones(ei.size(1)), (10, 10)).coalesce()
    adj_t = adj.to_sparse_csr() if layout == "csr" else adj
    x = torch.randn(10, 5)
    results = []
    for layer in (ours, peer):
        torch.manual_seed(11)
        xs = x.clone().requires_grad_(True)
        out = layer(xs, adj_t)
        out.square().sum().backward()
        results.append((out, xs.grad, {k: p.grad for k, p in layer.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], **TOL)
    torch.testing.assert_close(results[0][1], results[1][1], **TOL)
    for key, grad in results[1][2].items():
        torch.testing.assert_close(results[0][2][key], grad, **TOL, msg=key)


@pytest.mark.parametrize("name", list(LAYERS))
def test_list_aggregation_modes_reset_and_swapped_modules_as_pyg(name):
    """aggr_kwargs reach PyG's aggregation (mode="sum" and "proj" of a list, not its default "cat"); seeded layers
    with a "proj" list draw PyG's weights (the aggregation module reset first, as PyG's reset_parameters);
    reset_parameters() resets a learnable aggregation; an aggr_module swapped in after construction is used."""
    x, ei = torch.randn(12, 5), _graph()
    ours, peer = _layers(name, 5, 4, heads=2, aggr=["mean", "max"], aggr_kwargs=dict(mode="sum"))
    _assert_same(name, ours, peer, [x], ei)
    proj = dict(heads=2, aggr=["mean", "max"], aggr_kwargs=dict(mode="proj", mode_kwargs=dict(in_channels=4,
                                                                                             out_channels=4)))
    torch.manual_seed(0)
    theirs = getattr(pyg_nn, name)(5, 4, **proj)
    torch.manual_seed(0)
    mine = LAYERS[name](5, 4, **proj)
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(mine.state_dict()[key], value, msg=key)
    learn = LAYERS[name](5, 4, aggr=pyg_aggr.PowerMeanAggregation(learn=True))
    with torch.no_grad():
        learn.aggr_module.p.fill_(3.0)
    learn.reset_parameters()
    assert learn.aggr_module.p.item() == 1.0
    ours, peer = _layers(name, 5, 4, heads=2)
    ours.aggr_module, peer.aggr_module = pyg_aggr.MeanAggregation(), pyg_aggr.MeanAggregation()
    torch.testing.assert_close(ours(x, ei), peer(x, ei), **TOL)
    ours.decomposed_layers = 2  # set after construction: PyG's propagate splits the inputs, and fails as PyG's
    ours.aggr_module = pyg_aggr.SumAggregation()
    assert ours._runs_propagate()


@pytest.mark.parametrize("name", list(LAYERS))
def test_outputs_that_broadcast_with_the_bias_are_added_as_pyg(name):
    """A "proj" list with out_channels=1 under concat=False: PyG's ``out + bias`` broadcasts (10, 1) with (4,) to
    (10, 4); the layers do the same (they refused it, saying PyG failed)."""
    proj = dict(heads=2, concat=False, aggr=["mean", "max"],
                aggr_kwargs=dict(mode="proj", mode_kwargs=dict(in_channels=4, out_channels=1)))
    if name == "TransformerConv":
        proj.update(root_weight=False)
    ours, peer = _layers(name, 5, 4, **proj)
    x, ei = torch.randn(10, 5), _graph(num_nodes=10, num_edges=30, seed=5)
    torch.testing.assert_close(ours(x, ei), peer(x, ei), **TOL)
