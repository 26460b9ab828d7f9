"""The graph layers' Triton kernel paths under ``torch.compile(..., fullgraph=True)``.

On CUDA (``impl="auto"``), or with ``impl="triton"`` on CPU tensors under TRITON_INTERPRET=1 (here), GATv2Conv's
attention runs the Triton GATv2 kernel (zoo.kernels.edge_softmax) and PointTransformerConv's aggregation the vector
attention kernel (zoo.kernels.vector_softmax). While compiling, both are custom operators (zoo/attention/segment.py:
``zoo::gatv2_edge_softmax``, ``zoo::vector_softmax_sum`` and their backward operators), so the layer compiles as one
graph; eager calls keep the kernels' autograd.Functions. Checked here: the compiled layer (backend ``aot_eager``, as
tests/test_graph_fullgraph.py) gives the eager kernel path's outputs, attention weights and gradients, and the kernels
really ran; ``torch.library.opcheck`` on the four operators; and, without a GPU, that CUDA tensors under
``impl="auto"`` take the operators while compiling (fake CUDA tensors), GATv2's only within the kernel's limits; the
vector operator's index / rowptr checks when the graph runs; second derivatives under Dynamo's backend="eager".
GATConv and TransformerConv have no Triton kernel (their fused aggregation is the PyTorch
``zoo::segment_softmax_aggregate``: tests/test_graph_fullgraph.py).
"""
from __future__ import annotations

import pytest
import torch

# tests/triton_interpreter.py
from triton_interpreter import in_process_mark, prepare, run_in_fresh_process

_LATE = prepare()  # TRITON_INTERPRET=1 without a GPU, before the kernel modules are imported

triton = pytest.importorskip("triton")

import torch._dynamo  # noqa: E402

import zoo.attention.graph as zg  # noqa: E402
import zoo.attention.segment as segment  # noqa: E402
import zoo.attention.vector as vector  # noqa: E402
from zoo.attention import GATv2Conv, PointTransformerConv  # noqa: E402
from zoo.kernels import edge_softmax as ek  # noqa: E402
from zoo.kernels import vector_softmax as vk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKEND = "aot_eager"
in_process = in_process_mark(_LATE, ek, "test_fullgraph_kernel_tests_in_a_fresh_process")
# the kernels' own tolerances (tests/test_graph_kernel.py, tests/test_vector_kernel.py); compiled and eager run the
# same launches, so they should agree far closer than this
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _counting(monkeypatch, module, name):
    """Replace ``module.name`` by a wrapper counting its calls (the kernel launchers: they run when the compiled graph
    runs, looked up on the module each time); returns the list of calls."""
    calls, original = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def _edges(num_src, num_dst, num_edges, seed=0):
    g = torch.Generator().manual_seed(seed)
    ei = torch.stack([torch.randint(0, num_src, (num_edges,), generator=g),
                      torch.randint(0, num_dst, (num_edges,), generator=g)])
    ei[:, :2] = torch.tensor([[1, 2], [1, 2]])  # self loops (dropped, then added again)
    return ei.to(DEVICE)


def _step(layer, call, inputs, weights, seed=None):
    """(output, attention weights or None, gradients of the float inputs and the parameters) for a fixed projection
    of the output; ``seed`` set before the call (the dropout draws)."""
    leaves = [t.detach().clone().requires_grad_(True) if t.is_floating_point() else t for t in inputs]
    if seed is not None:
        torch.manual_seed(seed)
    result = call(*leaves, return_attention_weights=True) if weights else call(*leaves)
    out, alpha = (result[0], result[1][1]) if weights else (result, None)
    projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    (out.float() * projection.float()).sum().backward()
    grads = [t.grad for t in leaves if t.is_floating_point() and t.requires_grad]
    grads += [p.grad.clone() for _, p in sorted(layer.named_parameters())]
    layer.zero_grad()
    return out.detach(), None if alpha is None else alpha.detach(), grads


def _assert_same(got, want, dtype):
    for a, b in zip(got, want, strict=True):
        if isinstance(a, list):
            _assert_same(a, b, dtype)
        elif a is None:
            assert b is None
        else:
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, **TOL[dtype])


GATV2_CASES = [
    (torch.float32, dict(heads=2), False, True),
    (torch.float32, dict(heads=2, edge_dim=3, fill_value=0.5), True, True),
    (torch.float32, dict(heads=3, concat=False, dropout=0.3), False, False),  # training: a keep-mask
    (torch.float16, dict(heads=2, edge_dim=2), False, True),
]


@in_process
@pytest.mark.parametrize("dtype,kwargs,bipartite,weights", GATV2_CASES,
                         ids=["plain", "edge_dim,pair", "dropout", "fp16,edge_dim"])
def test_gatv2_layer_on_the_kernel_compiles_as_one_graph(monkeypatch, dtype, kwargs, bipartite, weights):
    """GATv2Conv with impl="triton" forced (the route of every CUDA layer), compiled with fullgraph=True (a graph
    break raises): the eager kernel path's output, attention weights and input / edge-feature / parameter gradients;
    the kernel's forward and backward launched inside the compiled graph."""
    original = zg.gatv2_attention
    monkeypatch.setattr(zg, "gatv2_attention", lambda *a, **k: original(*a, **{**k, "impl": "triton"}))
    forward = _counting(monkeypatch, ek, "_forward")
    backward = _counting(monkeypatch, ek, "_backward")
    torch.manual_seed(0)
    layer = GATv2Conv((5, 4) if bipartite else 6, 4, **kwargs).to(DEVICE, dtype)
    layer.train("dropout" in kwargs)
    x = ((torch.randn(9, 5), torch.randn(7, 4)) if bipartite else (torch.randn(10, 6),))
    x = tuple(t.to(DEVICE, dtype) for t in x)
    ei = _edges(9, 7, 25) if bipartite else _edges(10, 10, 30)
    inputs = [x if bipartite else x[0], ei]
    if "edge_dim" in kwargs:
        inputs.append(torch.randn(ei.size(1), kwargs["edge_dim"]).to(DEVICE, dtype))

    def call(*args, **kw):  # a pair of features travels as one argument, as the layer takes it
        args = ((args[0], args[1]),) + args[2:] if bipartite else args
        return layer(*args, **kw)

    def compiled_call(*args, **kw):
        args = ((args[0], args[1]),) + args[2:] if bipartite else args
        return compiled(*args, **kw)

    flat = list(x) + inputs[1:]
    compiled = torch.compile(layer, backend=BACKEND, fullgraph=True)
    got = _step(layer, compiled_call, flat, weights, seed=3)
    assert forward and backward, "the compiled layer did not run the Triton kernel"
    forward.clear()
    want = _step(layer, call, flat, weights, seed=3)
    assert forward, "the eager layer did not run the Triton kernel"
    _assert_same(got, want, dtype)
    if "dropout" in kwargs:  # the keep-mask matters: another draw gives another output
        assert not torch.equal(want[0], _step(layer, call, flat, weights, seed=4)[0])


@in_process
def test_gatv2_kernel_path_recompiles_once_for_other_graph_sizes(monkeypatch):
    """Dynamo's automatic dynamic shapes over the kernel operators: the second node / edge count recompiles with
    symbolic sizes (the fake implementations' shapes), the third reuses that graph; each call gives the eager kernel
    path's output and gradients."""
    from torch._dynamo.utils import counters

    original = zg.gatv2_attention
    monkeypatch.setattr(zg, "gatv2_attention", lambda *a, **k: original(*a, **{**k, "impl": "triton"}))
    torch.manual_seed(0)
    layer = GATv2Conv(6, 4, heads=2).to(DEVICE)
    compiled = torch.compile(layer, backend=BACKEND, fullgraph=True)
    counters.clear()
    for nodes, edges in [(10, 30), (13, 41), (8, 19)]:
        inputs = [torch.randn(nodes, 6, device=DEVICE), _edges(nodes, nodes, edges, seed=nodes)]
        _assert_same(_step(layer, compiled, inputs, True), _step(layer, layer, inputs, True), torch.float32)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_weighted_sum_on_the_kernel_compiles_as_one_graph(monkeypatch, dtype):
    """segment_softmax_weighted_sum with rowptr and impl="triton", compiled with fullgraph=True: the eager kernel
    path's output and score / value gradients (the eager autograd.Function read rowptr on the host: a break)."""
    forward = _counting(monkeypatch, vk, "vector_softmax_sum")
    backward = _counting(monkeypatch, vk, "vector_softmax_sum_backward")
    g = torch.Generator().manual_seed(0)
    degrees = torch.tensor([3, 0, 5, 1, 20, 2])
    rowptr = torch.cat([torch.zeros(1, dtype=torch.long), degrees.cumsum(0)]).to(DEVICE)
    index = torch.repeat_interleave(torch.arange(len(degrees)), degrees).to(DEVICE)
    scores = (3 * torch.randn(int(degrees.sum()), 20, generator=g)).to(DEVICE, dtype)
    values = torch.randn(scores.shape, generator=g).to(DEVICE, dtype)

    def run(fn):
        s, v = scores.clone().requires_grad_(True), values.clone().requires_grad_(True)
        out = fn(s, v)
        out.float().pow(2).sum().backward()
        return [out.detach(), s.grad, v.grad]

    def weighted_sum(s, v):
        return segment.segment_softmax_weighted_sum(s, v, index, len(degrees), rowptr=rowptr, impl="triton")

    got = run(torch.compile(weighted_sum, backend=BACKEND, fullgraph=True))
    assert forward and backward
    want = run(weighted_sum)
    _assert_same(got, want, dtype)


@in_process
def test_point_transformer_layer_on_the_kernel_compiles_as_one_graph(monkeypatch):
    """PointTransformerConv with its aggregation on the kernel (the CUDA route of _kernel_rowptr, and impl="triton"
    forced), compiled with fullgraph=True: the eager kernel path's output and input / parameter gradients."""
    from torch import nn

    monkeypatch.setattr(vector, "_kernel_rowptr", lambda csr, v_NC: csr.rowptr)
    original = segment.segment_softmax_weighted_sum
    monkeypatch.setattr(vector, "segment_softmax_weighted_sum",
                        lambda *a, **k: original(*a, **{**k, "impl": "triton"}))
    forward = _counting(monkeypatch, vk, "vector_softmax_sum")
    backward = _counting(monkeypatch, vk, "vector_softmax_sum_backward")
    torch.manual_seed(0)
    layer = PointTransformerConv(6, 8, attn_nn=nn.Sequential(nn.Linear(8, 8), nn.ReLU())).to(DEVICE)
    pos, x = torch.rand(12, 3, device=DEVICE), torch.randn(12, 6, device=DEVICE)
    ei = _edges(12, 12, 40)
    compiled = torch.compile(layer, backend=BACKEND, fullgraph=True)
    got = _step(layer, compiled, [x, pos, ei], False)
    assert forward and backward, "the compiled layer did not run the Triton kernel"
    want = _step(layer, layer, [x, pos, ei], False)
    _assert_same(got, want, torch.float32)


def _operator_cases():
    from zoo.attention.segment import build_csr

    g = torch.Generator().manual_seed(0)
    csr = build_csr(_edges(9, 7, 30).cpu(), 9, 7).to(DEVICE)
    E, H, C = csr.num_edges, 2, 3
    mk = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE).requires_grad_(True)  # noqa: E731
    xs_NHC, xd_NHC, att_HC, ea_ED, we_FD = mk(9, H, C), mk(7, H, C), mk(H, C), mk(E, 2), mk(H * C, 2)
    keep = (torch.rand(E, H, generator=g) > 0.3).to(DEVICE)
    tensors = (csr.rowptr, csr.col, csr.row)
    s_EC, v_EC = mk(E, 5), mk(E, 5)
    ops = torch.ops.zoo
    with torch.no_grad():
        _, _, max_NH = ops.gatv2_edge_softmax(xs_NHC, xd_NHC, att_HC, ea_ED, we_FD, *tensors, 0.2, keep, 0.3, False)
        out_NC, max_NC, log_sum_NC = ops.vector_softmax_sum(s_EC, v_EC, csr.row, csr.rowptr)

    def detached(*args):  # the backward operators run without autograd (no double backward): plain tensors
        return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)

    g_NHC, g_NC = torch.randn(7, H, C, generator=g).to(DEVICE), torch.randn(7, 5, generator=g).to(DEVICE)
    return [
        ("gatv2_edge_softmax", ops.gatv2_edge_softmax,
         (xs_NHC, xd_NHC, att_HC, ea_ED, we_FD, *tensors, 0.2, keep, 0.3, True)),
        ("gatv2_edge_softmax_plain", ops.gatv2_edge_softmax,
         (xs_NHC, xd_NHC, att_HC, None, None, *tensors, 0.2, None, 0.0, False)),
        ("gatv2_edge_softmax_backward", ops.gatv2_edge_softmax_backward,
         detached(g_NHC, xs_NHC, xd_NHC, att_HC, ea_ED, we_FD, keep, max_NH, *tensors, 0.2, 0.3)),
        ("vector_softmax_sum", ops.vector_softmax_sum, (s_EC, v_EC, csr.row, csr.rowptr)),
        ("vector_softmax_sum_backward", ops.vector_softmax_sum_backward,
         detached(g_NC, s_EC, v_EC, csr.row, max_NC, log_sum_NC, out_NC, True, False)),
    ]


@in_process
def test_kernel_operators_pass_opcheck():
    """torch.library.opcheck on every kernel operator: the schema, the fake implementation (sizes and dtypes against
    the real outputs), the autograd registration and AOTAutograd's dispatch (dynamic shapes). All four checks run
    under the interpreter. opcheck does not compare strides, which inductor asserts: the outputs must be contiguous,
    as the fake implementations allocate them."""
    for name, op, args in _operator_cases():
        torch.library.opcheck(op, args)
        outputs = op(*args)
        for i, t in enumerate(outputs if isinstance(outputs, tuple) else (outputs,)):
            assert t.is_contiguous(), (name, i, t.shape, t.stride())


def test_cuda_tensors_take_the_kernel_operators_while_compiling(monkeypatch):
    """Without a GPU: fake CUDA tensors (FakeTensorMode) while torch.compile traces (its flag set) take the kernel
    operators under impl="auto" -- gatv2_attention calls zoo::gatv2_edge_softmax, segment_softmax_weighted_sum with
    rowptr zoo::vector_softmax_sum, and PointTransformerConv passes its row pointers (_kernel_rowptr) -- and a
    float64 one takes the PyTorch operator zoo::gatv2_attention. Eagerly a CUDA layer keeps the autograd.Functions."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from zoo.attention.segment import CSR

    calls = []
    for name in ("_gatv2_kernel_op", "_gatv2_op", "_vector_softmax_sum_op"):
        original = getattr(segment, name)
        monkeypatch.setattr(segment, name, lambda *a, _name=name, _op=original: calls.append(_name) or _op(*a))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with FakeTensorMode():
        cuda = dict(device="cuda")
        csr = CSR(torch.empty(8, dtype=torch.long, **cuda), torch.empty(20, dtype=torch.long, **cuda),
                  torch.empty(20, dtype=torch.long, **cuda), torch.empty(20, dtype=torch.long, **cuda), 9, 7)
        for dtype in (torch.float32, torch.float64):
            xs, xd, att = (torch.empty(*shape, dtype=dtype, **cuda) for shape in ((9, 2, 3), (7, 2, 3), (2, 3)))
            out, _ = segment.gatv2_attention(xs, xd, att, csr)
            assert out.shape == (7, 2, 3) and out.is_cuda
        scores = torch.empty(20, 5, **cuda)
        out = segment.segment_softmax_weighted_sum(scores, scores, csr.row, 7, rowptr=csr.rowptr)
        assert out.shape == (7, 5)
        assert vector._kernel_rowptr(csr, scores) is csr.rowptr
        assert vector._kernel_rowptr(csr, scores.cpu()) is None
    assert calls == ["_gatv2_kernel_op", "_gatv2_op", "_vector_softmax_sum_op"], calls


@in_process
def test_compiled_weighted_sum_on_the_kernel_checks_index_against_rowptr():
    """The kernel path reads the segments from rowptr in forward and from index in backward: eagerly
    segment_softmax_weighted_sum checks one against the other; compiled (the checks skipped while Dynamo traces) its
    operator zoo::vector_softmax_sum makes the same checks when the graph runs, with eager's messages. Before, an
    out-of-range index read out of bounds in the backward kernel and a mismatched one gave the gradient of another
    output than the one returned, silently. The backward launcher refuses an out-of-range index itself too."""
    rowptr = torch.tensor([0, 2, 4], device=DEVICE)
    scores, values = torch.randn(4, 3, device=DEVICE), torch.randn(4, 3, device=DEVICE)

    def weighted_sum(s, v, index):
        return segment.segment_softmax_weighted_sum(s, v, index, 2, rowptr=rowptr, impl="triton")

    compiled = torch.compile(weighted_sum, backend=BACKEND, fullgraph=True)
    good = torch.tensor([0, 0, 1, 1], device=DEVICE)
    _assert_same([compiled(scores, values, good)], [weighted_sum(scores, values, good)], torch.float32)
    for index, message in [([0, 0, 1, 7], r"index values must lie in \[0, 2\), got 0\.\.7"),
                           ([0, 0, -1, 1], r"index values must lie in \[0, 2\), got -1\.\.1"),
                           ([0, 1, 0, 1], r"index does not match rowptr .* index\[1\] = 1 but rowptr puts entry 1 "
                                          r"in segment 0")]:
        index = torch.tensor(index, device=DEVICE)
        raised = []
        for fn in (weighted_sum, compiled):
            s = scores.clone().requires_grad_(True)
            with pytest.raises(ValueError, match="segment_softmax_weighted_sum: " + message) as error:
                fn(s, values, index).sum().backward()
            raised.append(str(error.value))
        assert raised[0] == raised[1]
    with torch.no_grad():
        out_NC, max_NC, log_sum_NC = vk.vector_softmax_sum(scores, values, rowptr)
    with pytest.raises(ValueError, match=r"vector_softmax_sum_backward: index values must lie in \[0, 2\), got 0\.\.2"):
        vk.vector_softmax_sum_backward(scores, values, torch.tensor([0, 0, 1, 2], device=DEVICE), max_NC, log_sum_NC,
                                       out_NC, torch.ones_like(out_NC))


@in_process
def test_cuda_gatv2_beyond_the_kernel_limits_runs_the_pytorch_path(monkeypatch):
    """Without a GPU (fake CUDA tensors): under impl="auto" GATv2 takes the Triton kernel only within its limits
    (ek.MAX_CHANNELS channels per head, ek.MAX_EDGE_DIM edge features) and the PyTorch path beyond them, while
    compiling (the operators zoo::gatv2_edge_softmax / zoo::gatv2_attention) and eagerly (the kernel's
    gatv2_edge_softmax / the autograd.Function _GATv2Attention) alike: a CUDA GATv2Conv(..., 512) raised the kernel's
    ValueError, where PyG's layer computes it. An explicit impl="triton" asks for the kernel and keeps that error,
    eagerly and when the compiled graph runs (real tensors under the interpreter; raised before any launch)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from zoo.attention.segment import CSR, build_csr

    explicit = []  # the real-tensor calls with impl="triton", run after the routes' patches are undone
    real_csr = build_csr(_edges(9, 7, 20).cpu(), 9, 7).to(DEVICE)
    for channels, edge_dim, message in [(ek.MAX_CHANNELS + 1, None, rf"C={ek.MAX_CHANNELS + 1} channels per head > "),
                                        (4, ek.MAX_EDGE_DIM + 1, rf"edge_dim={ek.MAX_EDGE_DIM + 1} > ")]:
        xs, xd, att = (torch.randn(*shape, device=DEVICE) for shape in ((9, 1, channels), (7, 1, channels),
                                                                         (1, channels)))
        edges = {} if edge_dim is None else dict(edge_attr=torch.randn(20, edge_dim, device=DEVICE),
                                                 edge_weight=torch.randn(channels, edge_dim, device=DEVICE))
        explicit.append(((xs, xd, att), edges, message))

    calls = []
    for name in ("_gatv2_kernel_op", "_gatv2_op"):
        original = getattr(segment, name)
        monkeypatch.setattr(segment, name, lambda *a, _name=name, _op=original: calls.append(_name) or _op(*a))

    def recorder(name):  # the eager routes, stopped before they read the (fake) graph's values
        return lambda xs_NHC, *a, **k: calls.append(name) or (xs_NHC.new_empty((7,) + xs_NHC.shape[1:]), None)

    monkeypatch.setattr(ek, "gatv2_edge_softmax", recorder("kernel"))
    monkeypatch.setattr(segment._GATv2Attention, "apply", recorder("torch"))
    compiling = [False]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling[0])
    cases = [(ek.MAX_CHANNELS, None, "kernel"), (ek.MAX_CHANNELS + 1, None, "torch"),
             (8, ek.MAX_EDGE_DIM, "kernel"), (8, ek.MAX_EDGE_DIM + 1, "torch")]
    with FakeTensorMode():
        cuda = dict(device="cuda")
        csr = CSR(torch.empty(8, dtype=torch.long, **cuda), torch.empty(20, dtype=torch.long, **cuda),
                  torch.empty(20, dtype=torch.long, **cuda), torch.empty(20, dtype=torch.long, **cuda), 9, 7)
        for mode in (True, False):  # compiling, then eager
            compiling[0] = mode
            for channels, edge_dim, _ in cases:
                xs, xd, att = (torch.empty(*shape, **cuda) for shape in ((9, 1, channels), (7, 1, channels),
                                                                          (1, channels)))
                edges = {} if edge_dim is None else dict(edge_attr=torch.empty(20, edge_dim, **cuda),
                                                         edge_weight=torch.empty(channels, edge_dim, **cuda))
                out, _ = segment.gatv2_attention(xs, xd, att, csr, **edges)
                assert out.shape == (7, 1, channels) and out.is_cuda
    routes = {"kernel": "_gatv2_kernel_op", "torch": "_gatv2_op"}
    assert calls == [routes[want] for *_, want in cases] + [want for *_, want in cases], calls
    monkeypatch.undo()
    for tensors, edges, message in explicit:
        def attention(xs, xd, att, edges=edges):
            return segment.gatv2_attention(xs, xd, att, real_csr, impl="triton", **edges)[0]

        for fn in (attention, torch.compile(attention, backend=BACKEND, fullgraph=True)):
            with pytest.raises(ValueError, match="gatv2_edge_softmax: " + message):
                fn(*tensors)


@in_process
@pytest.mark.parametrize("impl,what", [("triton", "the Triton GATv2 kernel"),
                                       ("torch", r"the fused GATv2 attention \(GATv2Conv\)")], ids=["triton", "torch"])
def test_compiled_gatv2_refuses_second_derivatives_with_the_eager_message(monkeypatch, impl, what):
    """backward(create_graph=True), then a backward through the gradient, under Dynamo's backend="eager" (the
    operators' autograd run as they are): the eager layer's message naming PyG's layer, not torch's "no autograd
    formula was registered" for the backward operator (AOTAutograd's backends refuse double backward themselves)."""
    original = zg.gatv2_attention
    monkeypatch.setattr(zg, "gatv2_attention", lambda *a, **k: original(*a, **{**k, "impl": impl}))
    torch.manual_seed(0)
    layer = GATv2Conv(6, 4, heads=2).to(DEVICE)
    x, ei = torch.randn(10, 6, device=DEVICE), _edges(10, 10, 30)
    raised = []
    for fn in (layer, torch.compile(layer, backend="eager", fullgraph=True)):
        leaf = x.clone().requires_grad_(True)
        with pytest.raises(RuntimeError, match=what + " has no second derivatives .*torch_geometric") as error:
            grad, = torch.autograd.grad(fn(leaf, ei).pow(2).sum(), leaf, create_graph=True)
            grad.sum().backward()
        raised.append(str(error.value))
    assert raised[0] == raised[1]


@in_process
def test_compiled_weighted_sum_on_the_kernel_has_second_derivatives(monkeypatch):
    """segment_softmax_weighted_sum on the kernel, compiled with Dynamo's backend="eager": backward(create_graph=True)
    gives differentiable gradients, as eagerly (_differentiable_backward; forces from energies through
    PointTransformerConv): the second-order gradients equal the eager kernel path's, which tests/test_vector_kernel.py
    and the layer tests check against autograd. The forward ran the kernel."""
    degrees = torch.tensor([3, 0, 5, 2])
    rowptr = torch.cat([torch.zeros(1, dtype=torch.long), degrees.cumsum(0)]).to(DEVICE)
    index = torch.repeat_interleave(torch.arange(len(degrees)), degrees).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    scores, values = (torch.randn(int(degrees.sum()), 4, generator=g).to(DEVICE) for _ in range(2))

    def weighted_sum(s, v):
        return segment.segment_softmax_weighted_sum(s, v, index, len(degrees), rowptr=rowptr, impl="triton")

    def second_order(fn):
        s, v = scores.clone().requires_grad_(True), values.clone().requires_grad_(True)
        grad_s, = torch.autograd.grad(fn(s, v).pow(2).sum(), s, create_graph=True)
        grad_s.pow(2).sum().backward()
        return [grad_s.detach(), s.grad, v.grad]

    forward = _counting(monkeypatch, vk, "vector_softmax_sum")
    got = second_order(torch.compile(weighted_sum, backend="eager", fullgraph=True))
    assert forward, "the compiled function did not run the Triton kernel"
    want = second_order(weighted_sum)
    assert all(t is not None and t.abs().sum() > 0 for t in want)
    _assert_same(got, want, torch.float32)


@pytest.mark.skipif(not _LATE, reason="the tests above ran in this process")
def test_fullgraph_kernel_tests_in_a_fresh_process():
    run_in_fresh_process(__file__)
