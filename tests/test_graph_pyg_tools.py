"""PyG's tools on the zoo's graph layers, against the same tools on PyG's own layers (the trusted peer):
the layers are MessagePassing subclasses, so to_hetero converts them, the explainers mask and read their
messages (explain mode and message hooks switch the layer to PyG's propagate), and the results equal
PyG's within 1e-5 (1e-4 after an optimised explainer)."""
from __future__ import annotations

import copy

import pytest
import torch

pyg_nn = pytest.importorskip("torch_geometric.nn")
from torch_geometric.data import HeteroData  # noqa: E402
from torch_geometric.explain import Explainer  # noqa: E402
from torch_geometric.explain.algorithm import AttentionExplainer, GNNExplainer  # noqa: E402
from torch_geometric.explain.algorithm.utils import clear_masks, set_masks  # noqa: E402
from torch_geometric.nn.conv import MessagePassing  # noqa: E402

from zoo.attention import GATConv, GATv2Conv  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)
PAIRS = [(GATv2Conv, pyg_nn.GATv2Conv), (GATConv, pyg_nn.GATConv)]
IDS = ["gatv2", "gat"]


def _graph(n=12, e=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ei = torch.randint(0, n - 2, (2, e), generator=g)  # nodes n-2, n-1 isolated
    ei[:, :2] = torch.tensor([[1, 3], [1, 3]])  # input self loops: PyG removes them, then adds one per node
    x = torch.randn(n, 6, generator=g)
    return x, ei


class _Net(torch.nn.Module):
    """Two attention layers (the usual node classifier)."""

    def __init__(self, conv, in_channels=6, **kwargs):
        super().__init__()
        self.conv1 = conv(in_channels, 4, heads=2, **kwargs)
        self.conv2 = conv(-1 if isinstance(in_channels, tuple) else 8, 3, heads=1, **kwargs)

    def forward(self, x, edge_index):
        return self.conv2(self.conv1(x, edge_index).relu(), edge_index)


def _nets(conv_zoo, conv_pyg, **kwargs):
    torch.manual_seed(0)
    peer = _Net(conv_pyg, **kwargs)
    ours = _Net(conv_zoo, **kwargs)
    ours.load_state_dict(peer.state_dict(), strict=True)
    return ours, peer


@pytest.mark.parametrize("conv_zoo, conv_pyg", PAIRS, ids=IDS)
def test_layers_are_message_passing_with_pyg_state_dict(conv_zoo, conv_pyg):
    ours, peer = conv_zoo(6, 4, heads=2, edge_dim=3), conv_pyg(6, 4, heads=2, edge_dim=3)
    assert isinstance(ours, MessagePassing)
    assert (ours.aggr, ours.node_dim, ours.flow) == (peer.aggr, peer.node_dim, peer.flow)
    assert list(ours.state_dict()) == list(peer.state_dict())
    assert not ours._message_passing_observed()  # the fused path by default
    assert isinstance(copy.deepcopy(ours), conv_zoo)


@pytest.mark.parametrize("conv_zoo, conv_pyg", PAIRS, ids=IDS)
@pytest.mark.parametrize("kwargs", [dict(heads=2, edge_dim=3), dict(heads=3, concat=False, residual=True)],
                         ids=["edges", "mean-heads"])
def test_explain_mode_masks_messages_as_pyg(conv_zoo, conv_pyg, kwargs):
    torch.manual_seed(0)
    peer = conv_pyg(6, 4, **kwargs)
    ours = conv_zoo(6, 4, **kwargs)
    ours.load_state_dict(peer.state_dict(), strict=True)
    x, ei = _graph()
    ea = torch.randn(ei.size(1), 3) if "edge_dim" in kwargs else None
    results = []
    for module in (ours, peer):
        mask = torch.nn.Parameter(torch.randn(ei.size(1), generator=torch.Generator().manual_seed(3)))
        set_masks(module, mask, ei, apply_sigmoid=True)
        xg = x.clone().requires_grad_(True)
        out, (ei_out, alpha) = module(xg, ei, ea, return_attention_weights=True)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        results.append((out, ei_out, alpha, mask.grad, xg.grad, module.att_src.grad if hasattr(module, "att_src")
                        else module.att.grad))
        clear_masks(module)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOL)
    assert results[0][3].abs().sum() > 0  # the mask's gradient reached it
    assert not ours._message_passing_observed()  # clear_masks: back on the fused path
    torch.testing.assert_close(ours(x, ei, ea), peer(x, ei, ea), **TOL)


@pytest.mark.parametrize("conv_zoo, conv_pyg", PAIRS, ids=IDS)
def test_message_hooks_see_pyg_messages(conv_zoo, conv_pyg):
    torch.manual_seed(0)
    peer = conv_pyg(6, 4, heads=2)
    ours = conv_zoo(6, 4, heads=2)
    ours.load_state_dict(peer.state_dict(), strict=True)
    x, ei = _graph()
    seen = {}
    for name, module in (("ours", ours), ("peer", peer)):
        def hook(mod, inputs, out, name=name):
            seen[name] = (inputs[0]["alpha"], out)  # returns None: the messages are left as they are

        handle = module.register_message_forward_hook(hook)
        module(x, ei)
        handle.remove()
    torch.testing.assert_close(seen["ours"][0], seen["peer"][0], **TOL)  # alpha [E', H]
    torch.testing.assert_close(seen["ours"][1], seen["peer"][1], **TOL)  # messages [E', H, C]


def _explain_both(conv_zoo, conv_pyg, algorithm, net_kwargs=None, **masks):
    """The same explainer on a two-layer node classifier of zoo layers and of PyG layers with the same
    weights, explaining node 6 (seeded identically before each call)."""
    ours, peer = _nets(conv_zoo, conv_pyg, **(net_kwargs or {}))
    x, ei = _graph()
    explanations = []
    for model in (ours, peer):
        explainer = Explainer(
            model, algorithm=algorithm(), explanation_type="model", **masks,
            model_config=dict(mode="multiclass_classification", task_level="node", return_type="raw"),
        )
        torch.manual_seed(5)  # GNNExplainer's random mask initialisation
        explanations.append(explainer(x, ei, index=6))
    return explanations, ei


@pytest.mark.parametrize("conv_zoo, conv_pyg", PAIRS, ids=IDS)
def test_gnnexplainer_matches_pyg(conv_zoo, conv_pyg):
    (a, b), ei = _explain_both(conv_zoo, conv_pyg, lambda: GNNExplainer(epochs=20),
                               node_mask_type="attributes", edge_mask_type="object")
    assert a.edge_mask.shape == (ei.size(1),) and a.edge_mask.abs().sum() > 0
    torch.testing.assert_close(a.edge_mask, b.edge_mask, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.node_mask, b.node_mask, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("conv_zoo, conv_pyg", PAIRS, ids=IDS)
def test_attention_explainer_matches_pyg(conv_zoo, conv_pyg):
    (a, b), _ = _explain_both(conv_zoo, conv_pyg, AttentionExplainer, edge_mask_type="object")
    assert a.edge_mask.abs().sum() > 0
    torch.testing.assert_close(a.edge_mask, b.edge_mask, **TOL)


@pytest.mark.parametrize("conv_zoo, conv_pyg", PAIRS, ids=IDS)
def test_attention_explainer_with_the_reverse_flow_matches_pyg(conv_zoo, conv_pyg):
    """flow="target_to_source": the layer reports it as PyG's does (``layer.flow``), which the explainers read for
    a node's k-hop neighbourhood; the edge masks are PyG's (with "source_to_target" reported instead, the mask fell
    on the edges into node 6, which carry nothing to it under that flow)."""
    (a, b), _ = _explain_both(conv_zoo, conv_pyg, AttentionExplainer, dict(flow="target_to_source"),
                              edge_mask_type="object")
    assert conv_zoo(6, 4, flow="target_to_source").flow == "target_to_source"
    assert a.edge_mask.abs().sum() > 0
    torch.testing.assert_close(a.edge_mask, b.edge_mask, **TOL)


def _hetero_data():
    g = torch.Generator().manual_seed(0)
    data = HeteroData()
    data["paper"].x = torch.randn(7, 6, generator=g)
    data["author"].x = torch.randn(5, 4, generator=g)
    writes = torch.stack([torch.randint(0, 5, (14,), generator=g), torch.randint(0, 7, (14,), generator=g)])
    data["author", "writes", "paper"].edge_index = writes
    data["paper", "written_by", "author"].edge_index = writes.flip(0)
    data["paper", "cites", "paper"].edge_index = torch.randint(0, 7, (2, 10), generator=g)
    return data


@pytest.mark.parametrize("conv_zoo, conv_pyg", PAIRS, ids=IDS)
@pytest.mark.parametrize("aggr", ["sum", "mean"])
def test_to_hetero_matches_pyg(conv_zoo, conv_pyg, aggr):
    data = _hetero_data()
    ours, peer = (pyg_nn.to_hetero(_Net(conv, in_channels=(-1, -1), add_self_loops=False), data.metadata(),
                                   aggr=aggr) for conv in (conv_zoo, conv_pyg))
    torch.manual_seed(0)
    peer(data.x_dict, data.edge_index_dict)  # size the lazy projections
    ours(data.x_dict, data.edge_index_dict)
    ours.load_state_dict(peer.state_dict(), strict=True)
    outs, grads = [], []
    for model in (ours, peer):
        x_dict = {k: v.clone().requires_grad_(True) for k, v in data.x_dict.items()}
        out = model(x_dict, data.edge_index_dict)
        sum(o.square().sum() for o in out.values()).backward()
        outs.append(out)
        grads.append({k: v.grad for k, v in x_dict.items()})
    assert set(outs[0]) == {"paper", "author"}
    for key in outs[1]:
        torch.testing.assert_close(outs[0][key], outs[1][key], **TOL)
        torch.testing.assert_close(grads[0][key], grads[1][key], **TOL)


def _assert_nested_close(a, b):
    """Tensors, None and (nested) tuples / dicts of them, equal within TOL."""
    if isinstance(a, dict):
        assert set(a) == set(b)
        for key in a:
            _assert_nested_close(a[key], b[key])
    elif isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b)
        for u, v in zip(a, b):
            _assert_nested_close(u, v)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, **TOL)
    else:
        assert a == b


# (layer keyword arguments, forward: x / (x_src, x_dst or None), edge features, size)
_EDGE_UPDATE_CASES = [
    ("GATv2Conv", dict(heads=2), "x", False, None),
    ("GATv2Conv", dict(heads=2, edge_dim=3), "x", True, None),
    ("GATConv", dict(heads=2), "x", False, None),
    ("GATConv", dict(heads=2, edge_dim=3, fill_value="add"), "x", True, None),
    ("GATConv", dict(heads=2, add_self_loops=False), "x_src_only", False, (12, 10)),
]


@pytest.mark.parametrize("name,kwargs,inputs,edge_features,size", _EDGE_UPDATE_CASES)
def test_edge_update_hooks_see_and_replace_what_pyg_s_see(name, kwargs, inputs, edge_features, size):
    """PyG's edge-update hooks (register_edge_update_forward_pre_hook / _hook) fire on our layers with the
    arguments PyG's layers give them (edge_index with its loops, size, alpha or x pair, edge_attr) and PyG's
    attention as the output; a forward hook's replacement is used as PyG uses it."""
    from zoo import attention

    torch.manual_seed(0)
    peer = getattr(pyg_nn, name)(6, 4, **kwargs)
    ours = getattr(attention, name)(6, 4, **kwargs)
    ours.load_state_dict(peer.state_dict(), strict=True)
    x, ei = _graph()
    if inputs == "x_src_only":
        ei = ei[:, ei[1] < 10]
        x = (x, None)
    ea = torch.randn(ei.size(1), 3, generator=torch.Generator().manual_seed(2)) if edge_features else None
    fw = {} if size is None else dict(size=size)
    seen, outs = {}, {}
    for label, module in (("ours", ours), ("peer", peer)):
        def pre_hook(mod, inputs, label=label):
            seen[label, "pre"] = inputs  # (edge_index, size, kwargs)

        def hook(mod, inputs, out, label=label):
            seen[label, "out"] = out
            return out.flip(0)  # a replaced attention: propagate must use it

        handles = [module.register_edge_update_forward_pre_hook(pre_hook),
                   module.register_edge_update_forward_hook(hook)]
        assert module is peer or ours._message_passing_observed()  # the hooks send ours down PyG's path
        outs[label] = module(x, ei, ea, return_attention_weights=True, **fw)
        for handle in handles:
            handle.remove()
    _assert_nested_close(seen["ours", "pre"], seen["peer", "pre"])
    _assert_nested_close(seen["ours", "out"], seen["peer", "out"])
    _assert_nested_close(outs["ours"], outs["peer"])  # out and (edge_index, the flipped alpha)
    assert not ours._message_passing_observed()  # hooks removed: back on the fused path
    torch.testing.assert_close(ours(x, ei, ea, **fw), peer(x, ei, ea, **fw), **TOL)


def test_point_transformer_is_not_sent_down_propagate_by_edge_update_hooks():
    """PyG's PointTransformerConv never calls edge_updater, so its edge-update hooks never fire: they leave the
    zoo layer on its fused path."""
    from zoo.attention import PointTransformerConv

    layer = PointTransformerConv(6, 4)
    handle = layer.register_edge_update_forward_hook(lambda mod, inputs, out: None)
    assert not layer._message_passing_observed()
    handle.remove()


def _func_pair(name):
    """Our layer and PyG's with the same weights, features x, and ``args(x)``: the forward arguments for x."""
    from zoo import attention

    kwargs = {} if name == "PointTransformerConv" else dict(heads=2, edge_dim=3)
    torch.manual_seed(0)
    peer = getattr(pyg_nn, name)(6, 4, **kwargs)
    ours = getattr(attention, name)(6, 4, **kwargs)
    ours.load_state_dict(peer.state_dict(), strict=True)
    x, ei = _graph()
    g = torch.Generator().manual_seed(4)
    if name == "PointTransformerConv":
        pos = torch.randn(x.size(0), 3, generator=g)
        return ours, peer, x, lambda xx: (xx, pos, ei)
    ea = torch.randn(ei.size(1), 3, generator=g)
    return ours, peer, x, lambda xx: (xx, ei, ea)


@pytest.mark.parametrize("name", ["GATv2Conv", "GATConv", "PointTransformerConv"])
def test_torch_func_transforms_match_pyg(name):
    """torch.func's grad, vmap and jacrev run the layers (on PyG's unfused path: the fused autograd.Functions
    have no functorch rules) and give PyG's results with the same weights; vmap also under no_grad."""
    from torch.func import functional_call, grad, jacrev, vmap

    ours, peer, x, args = _func_pair(name)
    batch = torch.randn(3, *x.shape, generator=torch.Generator().manual_seed(5))
    results = []
    for module in (ours, peer):
        params = {k: v.detach() for k, v in module.named_parameters()}
        weight_grads = grad(lambda p: functional_call(module, p, args(x)).square().sum())(params)
        batched = vmap(lambda xx: module(*args(xx)))(batch)
        with torch.no_grad():
            batched_no_grad = vmap(lambda xx: module(*args(xx)))(batch)
        jacobian = jacrev(lambda xx: module(*args(xx)).sum(0))(x)
        results.append((weight_grads, batched, batched_no_grad, jacobian))
    _assert_nested_close(results[0], results[1])
    loop = torch.stack([ours(*args(xx)) for xx in batch])  # the fused path, one sample at a time
    torch.testing.assert_close(results[0][1], loop, **TOL)


@pytest.mark.parametrize("conv_zoo, conv_pyg", PAIRS, ids=IDS)
def test_assigning_flow_switches_the_layer_as_pygs(conv_zoo, conv_pyg):
    """``layer.flow = "target_to_source"`` after construction: PyG's layer computes the reverse flow from then on,
    and so does ours (its cached graph is rebuilt); an invalid value is refused by name."""
    torch.manual_seed(0)
    peer, ours = conv_pyg(6, 4, heads=2), None
    ours = conv_zoo(6, 4, heads=2)
    ours.load_state_dict(peer.state_dict(), strict=True)
    x, ei = _graph()
    torch.testing.assert_close(ours(x, ei), peer(x, ei), **TOL)  # (the default flow's graph is now cached)
    for layer in (ours, peer):
        layer.flow = "target_to_source"
    assert ours.flow == "target_to_source"
    torch.testing.assert_close(ours(x, ei), peer(x, ei), **TOL)
    with pytest.raises(ValueError, match="flow must be 'source_to_target' or 'target_to_source', got 'up'"):
        ours.flow = "up"
