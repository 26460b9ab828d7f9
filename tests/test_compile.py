"""torch.compile (and torch.export) on the zoo's models and attention layers.

Users of timm and PyG wrap models in ``torch.compile``; timm's models compile as one graph
(``fullgraph=True``), and PyG 2.5+ states that every GNN layer works under it. Here:

* every vision family (ViT, MaxViT, Agent-DeiT) compiles with ``fullgraph=True`` -- at its native size and
  at a size that takes the padding / non-square paths -- and gives eager's logits and gradients;
* each vision family exports with torch.export and a symbolic batch;
* attend() compiles with structured masks (window, segments, radial, combined) and biases, and inside
  MultiHeadAttention; an explicit Triton request runs the kernel between the compiled graphs;
* GATv2Conv / GATConv / TransformerConv and the graph models compile with ``fullgraph=True`` and give PyTorch
  Geometric's outputs, attention weights and gradients. The data-dependent graph structure (value checks, self
  loops, CSR sort) and the fused attention, which stays the memory-light function it is in eager mode, are custom
  operators (torch.library.custom_op): one opaque node each, run eagerly inside the compiled graph
  (tests/test_graph_fullgraph.py: every layer option, bipartite inputs, dynamic shapes, errors).

The tests use the ``aot_eager`` backend: Dynamo's capture and AOTAutograd's forward/backward tracing, as
inductor gets them, without generating C++ (CI need not have a compiler and inductor's code generation
takes ~30 s per model on 2 cores). Inductor timings against the peers, all compiled: docs/bench_vision.md,
bench_maxvit.md, bench_agent.md, bench_graph.md.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

import zoo
import zoo.tasks.vision.agent_deit  # noqa: F401  (registers agent_deit_*)
from zoo.attention import Causal, ChunkWindow, MultiHeadAttention, Radial, Segments, Window, attend

BACKEND = "aot_eager"
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _grads(module: torch.nn.Module) -> dict:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _train_step(fn, module, x):
    """Loss of a fixed projection of fn(x) with the RNG reset (dropout draws the same masks), then the
    parameter gradients; returns (output, grads)."""
    module.zero_grad()
    torch.manual_seed(7)
    out = fn(x)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weight).sum().backward()
    grads = _grads(module)
    module.zero_grad()
    return out.detach(), grads


# ----------------------------------------------------------------------------------------------------
# Vision: one graph per model, eager's numbers
# ----------------------------------------------------------------------------------------------------
VISION = [
    ("vit_debug", {}, None),
    ("vit_debug", dict(dynamic_img_size=True), (3, 40, 24)),  # position embedding resampled, non-square grid
    ("maxvit_debug", {}, None),
    ("maxvit_debug", {}, (3, 40, 52)),  # padded to window / grid multiples, padded keys masked
    ("agent_deit_debug", {}, None),
    ("agent_deit_debug", {}, (3, 40, 56)),  # agent / position biases interpolated to a non-square grid
]


@pytest.mark.parametrize("name,kwargs,size", VISION, ids=lambda v: str(v).replace(" ", ""))
def test_vision_models_compile_as_one_graph(name, kwargs, size):
    torch.manual_seed(0)
    model = zoo.create_model(name, drop_path_rate=0.1, **kwargs)
    size = size or model.pretrained_cfg["input_size"]
    x = torch.randn(2, *size)
    compiled = torch.compile(model, backend=BACKEND, fullgraph=True)  # raises on any graph break

    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), **TOL)
    model.train()
    out_c, grads_c = _train_step(compiled, model, x)
    out_e, grads_e = _train_step(model, model, x)
    torch.testing.assert_close(out_c, out_e, **TOL)
    assert grads_c.keys() == grads_e.keys() and grads_e
    for key in grads_e:
        torch.testing.assert_close(grads_c[key], grads_e[key], atol=1e-4, rtol=1e-4, msg=key)


@pytest.mark.parametrize("name,size", [("vit_debug", None), ("maxvit_debug", (3, 40, 52)), ("maxvit_debug", (3, 97, 61)),
                                       ("maxvit_debug", (3, 96, 96)), ("agent_deit_debug", (3, 40, 56))])
def test_vision_models_export_with_a_dynamic_batch(name, size):
    """torch.export (the route to AOTInductor / ExecuTorch) captures each family with an unbounded symbolic batch,
    as docs/timm.md shows; the exported program gives eager's logits at another batch size. A padded MaxViT
    failed ("Expected op to be '==', got <=" at 97 x 61, "Constraints violated (batch)" at 96 x 96): the SDPA
    backend's dense-mask size check became a guard on the symbolic batch."""
    from torch.export import Dim

    torch.manual_seed(0)
    model = zoo.create_model(name).eval()
    size = size or model.pretrained_cfg["input_size"]
    program = torch.export.export(model, (torch.randn(2, *size),), dynamic_shapes=({0: Dim("batch")},))
    x = torch.randn(5, *size)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), **TOL)


def _as_in_a_fresh_process(monkeypatch):
    """Empty the lazily filled per-process caches (backend order, blocks' signatures) as a fresh process has them:
    the compiled call is then the one that meets them empty."""
    from zoo import layers
    from zoo.attention import backends

    monkeypatch.setattr(layers, "_NUM_QUERIES_TYPES", {})
    monkeypatch.setattr(backends, "_ORDER", [])
    monkeypatch.setattr(backends, "_ORDER_OF", [])


def test_identical_calls_compile_once(monkeypatch):
    """Three identical calls compile one graph, as timm's ViT does. Filling the backend order and the blocks'
    signature cache inside the traced call made Dynamo guard on them: every family compiled twice."""
    from torch._dynamo.testing import CompileCounter

    _as_in_a_fresh_process(monkeypatch)
    model = zoo.create_model("vit_debug").eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        for _ in range(3):
            compiled(x)
    assert counter.frame_count == 1


@pytest.mark.parametrize("name", ["vit_debug", "agent_deit_debug"])
def test_grad_checkpointing_compiles_as_one_graph(monkeypatch, name):
    """set_grad_checkpointing(True) under fullgraph=True: the backend order was written inside the checkpointed
    block, a side effect Dynamo refuses there ("HOP: Unsafe side effect"), and so was Agent attention's pooling
    matrix cache; eager's gradients."""
    _as_in_a_fresh_process(monkeypatch)
    torch.manual_seed(0)
    model = zoo.create_model(name).train()
    model.set_grad_checkpointing(True)
    x = torch.randn(2, *model.pretrained_cfg["input_size"])
    out_c, grads_c = _train_step(torch.compile(model, backend="eager", fullgraph=True), model, x)
    out_e, grads_e = _train_step(model, model, x)
    torch.testing.assert_close(out_c, out_e, **TOL)
    assert grads_c.keys() == grads_e.keys() and grads_e
    for key in grads_e:
        torch.testing.assert_close(grads_c[key], grads_e[key], **TOL, msg=key)


def test_fullgraph_compiles_at_a_second_image_size():
    """fullgraph=True at a second size (Dynamo's automatic dynamic shapes), as timm's models do: the bias
    broadcast check (``size in (1, n)``) raised a false ValueError once sizes were symbolic (Agent-DeiT), and
    under dynamic=True math.isfinite could not take the symbolic attention scale (every family)."""
    torch.manual_seed(0)
    agent = zoo.create_model("agent_deit_debug").eval()
    vit = zoo.create_model("vit_debug", dynamic_img_size=True).eval()
    compiled_agent = torch.compile(agent, backend="eager", fullgraph=True)
    compiled_vit = torch.compile(vit, backend="eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        for size in ((32, 32), (48, 40)):
            x = torch.randn(1, 3, *size)
            torch.testing.assert_close(compiled_agent(x), agent(x), **TOL)
        torch.testing.assert_close(compiled_vit(x), vit(x), **TOL)


def test_dynamic_size_vit_exports_with_a_symbolic_image_size():
    """torch.export with symbolic height and width (multiples of the patch), as timm's dynamic_img_size ViT
    exports: the program runs at another size with eager's logits. The grid comparison and int() of the new grid
    pinned it to the traced size ("Guard failed: x.size()[2] // 8 == 4")."""
    from torch.export import Dim

    torch.manual_seed(0)
    model = zoo.create_model("vit_debug", dynamic_img_size=True).eval()
    sides = ({2: Dim("h", min=1, max=16) * 8, 3: Dim("w", min=1, max=16) * 8},)
    program = torch.export.export(model, (torch.randn(1, 3, 32, 32),), dynamic_shapes=sides)
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), **TOL)


def test_compiled_model_keeps_its_state_dict_keys(tmp_path):
    """nn.Module.compile() compiles in place: the state dict and save_pretrained are unchanged."""
    model = zoo.create_model("vit_debug").eval()
    keys = list(model.state_dict())
    model.compile(backend=BACKEND, fullgraph=True)
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        logits = model(x)
    assert list(model.state_dict()) == keys
    zoo.save_pretrained(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(zoo.create_model("vit_debug", pretrained=str(tmp_path)).eval()(x), logits)


# ----------------------------------------------------------------------------------------------------
# attend() and MultiHeadAttention
# ----------------------------------------------------------------------------------------------------
def test_attend_compiles_with_masks_and_bias():
    """Structured masks (window, chunk window, segments, radial, combined) and biases: one graph, eager's
    outputs."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 13, 8) for _ in range(3))
    bias = torch.randn(1, 3, 13, 13)
    mask = Window(2) & Causal()  # rows of the first query block keep few keys; the safe path is taken

    ids = torch.tensor([[0] * 5 + [1] * 6 + [2] * 2])
    radial = Radial(num_frames=4, tokens_per_frame=4, block_size=4)  # 16 tokens: q, k, v padded below

    def calls(q, k, v, bias):
        q16, k16, v16 = (F.pad(t, (0, 0, 0, 3)) for t in (q, k, v))
        return (
            attend(q, k, v, Window(3)),
            attend(q, k, v, ChunkWindow(4, 1, 0)),
            attend(q, k[:, :, :9], v[:, :, :9], ChunkWindow(3, 0, 1)),  # Nq > Nk: negative query chunks
            attend(q, k, v, Segments(ids)),
            attend(q16, k16, v16, radial),
            attend(q, k, v, mask, bias=bias),
            attend(q, k, v, Causal(), bias=bias),
            attend(q, k[:, :, :7], v[:, :, :7], bias=bias[..., :7]),
        )

    compiled = torch.compile(calls, backend=BACKEND, fullgraph=True)
    for got, want in zip(compiled(q, k, v, bias), calls(q, k, v, bias)):
        torch.testing.assert_close(got, want, **TOL)


def test_triton_kernel_is_left_out_of_automatic_selection_while_tracing(monkeypatch):
    """Under torch.compile / export automatic selection leaves a call the Triton kernel would take to SDPA
    (its launcher is host-side Python); an explicit request is still accepted."""
    from zoo.attention import backends
    from zoo.attention.masks import as_mask

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the kernel accept CPU tensors
    q = torch.randn(1, 2, 64, 16)
    args = (q, q, q, as_mask(Causal()), None, 0.25, "softmax", 0.0, False)
    triton = backends.get_backend("triton")
    assert triton.auto_supports(*args) is None
    monkeypatch.setattr(backends, "is_tracing", lambda: True)
    assert "torch.compile" in triton.auto_supports(*args)
    assert triton.supports(*args) is None


def test_explicit_triton_request_runs_outside_the_compiled_graph():
    """attend(..., backend="triton") inside torch.compile: the kernel (here under TRITON_INTERPRET=1 on CPU
    tensors) runs eagerly between the compiled graphs; outputs and gradients equal the eager call's."""
    import os

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, device=device, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 2, 40, 40, device=device)

    def call(q, k, v):
        return attend(q, k, v, Causal(), bias=bias, backend="triton") * 2.0

    compiled = torch.compile(call, backend=BACKEND)
    out_c = compiled(q, k, v)
    grads_c = torch.autograd.grad(out_c.square().sum(), (q, k, v))
    out_e = call(q, k, v)
    grads_e = torch.autograd.grad(out_e.square().sum(), (q, k, v))
    torch.testing.assert_close(out_c, out_e, **TOL)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("rel_pos", [None, "xl"])
def test_multi_head_attention_compiles(rel_pos):
    torch.manual_seed(0)
    module = MultiHeadAttention(32, 4, qkv_bias=True, rel_pos=rel_pos)
    x = torch.randn(2, 11, 32)
    compiled = torch.compile(module, backend=BACKEND, fullgraph=True)
    for mask in (None, Causal()):
        torch.testing.assert_close(compiled(x, mask=mask), module(x, mask=mask), **TOL)
    out_c, grads_c = _train_step(compiled, module, x)
    out_e, grads_e = _train_step(module, module, x)
    torch.testing.assert_close(out_c, out_e, **TOL)
    for key in grads_e:
        torch.testing.assert_close(grads_c[key], grads_e[key], **TOL)


def test_causal_multi_head_attention_traces_a_symbolic_length():
    """MultiHeadAttention(mask=Causal()) exported with a symbolic sequence length, and compiled at two lengths
    (Dynamo's automatic dynamic shapes), as F.scaled_dot_product_attention(is_causal=True) is: the SDPA path
    passed the SymBool ``Nq == Nk`` as is_causal (TypeError) and int() pinned the length."""
    from torch.export import Dim

    torch.manual_seed(0)
    module = MultiHeadAttention(16, 2).eval()

    class CausalLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = module

        def forward(self, x):
            return self.mha(x, mask=Causal())

    layer = CausalLayer()
    program = torch.export.export(layer, (torch.randn(2, 10, 16),), dynamic_shapes=({1: Dim("n", min=2, max=64)},))
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    with torch.no_grad():
        for n in (10, 13):
            x = torch.randn(2, n, 16)
            torch.testing.assert_close(program.module()(x), layer(x), **TOL)
            torch.testing.assert_close(compiled(x), layer(x), **TOL)


_SPEECH_MASKS = {
    "window": lambda keep: Window(3, 0),
    "chunk": lambda keep: ChunkWindow(4, left=1),
    "key_padding": lambda keep: keep[:, None, None, :],
    "causal_and_key_padding": lambda keep: Causal() & keep[:, None, None, :],
    "segments": lambda keep: Segments(torch.where(keep, 0, -1)),
}


@pytest.mark.parametrize("mask_name, positions", [(name, None) for name in sorted(_SPEECH_MASKS)]
                         + [("causal_and_key_padding", p) for p in ("rope", "alibi", "xl")])
def test_masked_multi_head_attention_exports_with_a_symbolic_length(mask_name, positions):
    """Variable-length sequences (speech): a masked MultiHeadAttention exported with a symbolic N runs at other
    lengths with the eager outputs. The SDPA path pinned N with int() (the program refused every other length:
    'Constraints violated'), the masks refused a symbolic length, and RoPE keyed its cos/sin cache on it
    ('unhashable type: non-nested SymInt')."""
    from torch.export import Dim
    from zoo.attention import ALiBi

    torch.manual_seed(0)
    kwargs = {"rope": {"rope": "1d"}, "alibi": {"rel_pos_bias": ALiBi(4)}, "xl": {"rel_pos": "xl"}}.get(positions, {})
    module = MultiHeadAttention(32, 4, **kwargs).eval()
    make_mask = _SPEECH_MASKS[mask_name]

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = module

        def forward(self, x, keep):
            return self.mha(x, mask=make_mask(keep))

    def inputs(n):  # the second sequence ends in two padded tokens
        return torch.randn(2, n, 32), torch.arange(n)[None, :] < torch.tensor([[n], [n - 2]])

    layer = Layer()
    length = Dim("n", min=4, max=256)
    program = torch.export.export(layer, inputs(10), dynamic_shapes=({1: length}, {1: length}))
    with torch.no_grad():
        for n in (7, 23):
            x, keep = inputs(n)
            torch.testing.assert_close(program.module()(x, keep), layer(x, keep), **TOL)


# ----------------------------------------------------------------------------------------------------
# Graphs: PyG's numbers, one graph (fullgraph=True), the fused memory-light path inside it
# ----------------------------------------------------------------------------------------------------
import torch_geometric.nn as pyg_nn  # noqa: E402
from zoo.attention import GATConv, GATv2Conv, TransformerConv  # noqa: E402


def _graph(num_nodes=12, num_edges=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ei = torch.randint(0, num_nodes - 2, (2, num_edges), generator=g)  # two isolated nodes
    ei[:, :3] = torch.tensor([[1, 2, 2], [1, 2, 2]])  # existing self loops (removed, then re-added)
    ei[:, 3:6] = torch.tensor([[4, 4, 4], [5, 5, 5]])  # multi-edges
    return ei


def _graph_step(module, call, x, ei, edge_attr):
    """Output, attention, and the gradients of inputs and parameters for a fixed output projection."""
    x = x.detach().clone().requires_grad_(True)
    ea = None if edge_attr is None else edge_attr.detach().clone().requires_grad_(True)
    out, (ei_out, alpha) = call(x, ei, ea, return_attention_weights=True)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weight).sum().backward()
    grads = [x.grad] + ([] if ea is None else [ea.grad])
    grads += [p.grad.clone() for _, p in sorted(module.named_parameters())]
    module.zero_grad()
    return out.detach(), ei_out, alpha, grads


def _assert_one_graph(module, *inputs) -> None:
    """Dynamo captures ``module``'s forward as one graph: no break (the graph structure and the fused attention are
    custom operators, zoo/attention/segment.py and graph.py). Explained with the data-dependent output sizes that
    ``fullgraph=True`` allows (the edge count after removing self loops); without fullgraph, Dynamo's default splits
    there, as at PyG's remove_self_loops."""
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        explained = torch._dynamo.explain(module)(*inputs)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


GRAPH_LAYERS = [
    (GATv2Conv, pyg_nn.GATv2Conv, dict(heads=2)),
    (GATv2Conv, pyg_nn.GATv2Conv, dict(heads=2, edge_dim=3, residual=True)),
    (GATv2Conv, pyg_nn.GATv2Conv, dict(heads=3, concat=False, share_weights=True)),
    (GATConv, pyg_nn.GATConv, dict(heads=2)),
    (GATConv, pyg_nn.GATConv, dict(heads=2, edge_dim=3, fill_value="max")),
    (TransformerConv, pyg_nn.TransformerConv, dict(heads=2)),
]


@pytest.mark.parametrize("cls_zoo,cls_pyg,kwargs", GRAPH_LAYERS,
                         ids=lambda v: getattr(v, "__name__", None) or ",".join(f"{a}={b}" for a, b in v.items()))
def test_graph_layers_compile_and_match_pyg(cls_zoo, cls_pyg, kwargs):
    torch.manual_seed(0)
    peer = cls_pyg(6, 5, **kwargs)
    ours = cls_zoo(6, 5, **kwargs)
    ours.load_state_dict(peer.state_dict(), strict=True)
    ei = _graph()
    x = torch.randn(12, 6)
    edge_attr = torch.randn(ei.size(1), 3) if "edge_dim" in kwargs else None

    compiled = torch.compile(ours, backend=BACKEND, fullgraph=True)  # raises on any graph break
    got = _graph_step(ours, compiled, x, ei, edge_attr)
    want = _graph_step(peer, peer, x, ei, edge_attr)
    torch.testing.assert_close(got[0], want[0], **TOL)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], **TOL)
    for a, b in zip(got[3], want[3], strict=True):
        torch.testing.assert_close(a, b, **TOL)
    _assert_one_graph(ours, x, ei, edge_attr)


@pytest.mark.parametrize("cls", [GATv2Conv, GATConv, TransformerConv])
def test_compiled_layers_keep_the_fused_memory_light_path(cls, monkeypatch):
    """Under torch.compile the fused function still runs (inside the compiled graph, as a custom operator) and
    still saves nothing of E x H x C elements for backward."""
    from zoo.attention import segment

    name = {GATv2Conv: "_gatv2_forward", GATConv: "_aggregate_forward", TransformerConv: "_aggregate_forward"}[cls]
    calls = []
    real_forward = getattr(segment, name)

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(segment, name, counting_forward)
    torch.manual_seed(0)
    layer = cls(16, 8, heads=4)
    x, ei = torch.randn(200, 16, requires_grad=True), torch.randint(0, 200, (2, 3000))
    big = 3000 * 4 * 8
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    compiled = torch.compile(layer, backend=BACKEND, fullgraph=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = compiled(x, ei)
    out.square().sum().backward()
    assert calls and saved and max(saved) < big  # the fused function ran; no [E, H, C] tensor kept


def test_bipartite_layer_compiles_and_matches_pyg():
    torch.manual_seed(0)
    peer = pyg_nn.GATv2Conv((5, 3), 4, heads=2)
    ours = GATv2Conv((5, 3), 4, heads=2)
    ours.load_state_dict(peer.state_dict(), strict=True)
    x_src, x_dst = torch.randn(9, 5), torch.randn(6, 3)
    ei = torch.stack([torch.randint(0, 9, (30,)), torch.randint(0, 6, (30,))])
    compiled = torch.compile(ours, backend=BACKEND, fullgraph=True)
    torch.testing.assert_close(compiled((x_src, x_dst), ei), peer((x_src, x_dst), ei), **TOL)


GRAPH_MODELS = [
    ("gatv2_node_debug", "node"),
    ("gat_node", "node"),
    ("gatv2_graph_debug", "graph"),
    ("gatv2_dictlookup_debug", "lookup"),
]


def _model_inputs(kind: str, model):
    g = torch.Generator().manual_seed(3)
    if kind == "node":
        return (torch.randn(20, 34, generator=g), _graph(20, 60))
    if kind == "graph":
        batch = torch.cat([torch.zeros(10, dtype=torch.long), torch.ones(10, dtype=torch.long)])
        return (torch.randn(20, 8, generator=g), _graph(20, 60), batch, 2)
    k = model.k
    nodes = 2 * k
    x = torch.stack([torch.arange(nodes) % k, torch.randint(0, k, (nodes,), generator=g)], dim=1)
    src = torch.arange(k).repeat(k)  # every key node -> every query node
    dst = torch.arange(k, 2 * k).repeat_interleave(k)
    return (x, torch.stack([src, dst]), torch.arange(k, 2 * k))


@pytest.mark.parametrize("name,kind", GRAPH_MODELS)
def test_graph_models_compile(name, kind):
    torch.manual_seed(0)
    model = zoo.create_model(name)
    inputs = _model_inputs(kind, model)
    compiled = torch.compile(model, backend=BACKEND, fullgraph=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), model(*inputs), **TOL)
    _assert_one_graph(model, *inputs)
    model.train()
    out_c, grads_c = _train_step(lambda _: compiled(*inputs), model, None)
    out_e, grads_e = _train_step(lambda _: model(*inputs), model, None)
    torch.testing.assert_close(out_c, out_e, **TOL)
    for key in grads_e:
        torch.testing.assert_close(grads_c[key], grads_e[key], atol=1e-4, rtol=1e-4, msg=key)


def test_compiles_in_a_fresh_interpreter():
    """Nothing imported lazily on the first attend() call (Dynamo cannot trace an import): a fresh process
    whose first attention call is the compiled one."""
    import subprocess
    import sys

    code = (
        "import torch, zoo, zoo.tasks.vision.agent_deit\n"
        "m = zoo.create_model('agent_deit_debug').eval()\n"
        "x = torch.randn(1, *m.pretrained_cfg['input_size'])\n"
        "with torch.no_grad():\n"
        "    y = torch.compile(m, backend='eager', fullgraph=True)(x)\n"
        "    torch.testing.assert_close(y, m(x), atol=1e-5, rtol=1e-5)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_importing_the_core_does_not_import_dynamo():
    """The outside-graph wrappers are made when tracing reaches them (zoo.layers.call_outside_graph):
    importing torch._dynamo with zoo cost 0.7 s per import on the benchmark machine."""
    import subprocess
    import sys

    # zoo.attention.graph is left out: its layers subclass torch_geometric's MessagePassing, and importing
    # torch_geometric imports torch._dynamo itself. Creating any model must not import it (nor PyG).
    code = ("import sys, zoo, zoo.attention, zoo.attention.segment, zoo.attention.sparse\n"
            "zoo.create_model('vit_debug'); zoo.list_models()\n"
            "print('torch._dynamo' in sys.modules, 'torch_geometric' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False False", done.stderr[-2000:]
