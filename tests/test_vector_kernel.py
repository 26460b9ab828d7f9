"""The Triton kernel of vector attention's aggregation (zoo.kernels.vector_softmax: per-channel softmax over
each destination's edges and the weighted sum of per-edge values) against its fp32 reference, under
TRITON_INTERPRET=1 on CPU tensors (fp32 and fp16, awkward graphs: empty nodes, a node longer than a tile,
channels that are not a power of two), and on a GPU when one is present; its use as the forward of
zoo.attention.segment_softmax_weighted_sum (gradients through the shared backward) and inside
PointTransformerConv. The kernel's error is held to at most 2x PyTorch's own at the same precision plus a
small atol (DESIGN.md, Kernels)."""
from __future__ import annotations


import pytest
import torch

# tests/triton_interpreter.py
from triton_interpreter import (LaunchGuardRecorder, check_single_config_variable, in_process_mark, prepare, run_compiled,
                                run_in_fresh_process)

_LATE = prepare()  # TRITON_INTERPRET=1 without a GPU, before the kernel module is imported

triton = pytest.importorskip("triton")

from zoo.attention.segment import segment_softmax_weighted_sum  # noqa: E402
from zoo.kernels import vector_softmax as vk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
in_process = in_process_mark(_LATE, vk, "test_vector_kernel_tests_in_a_fresh_process")


def _graph(degrees, channels, dtype, seed=0):
    """Edges in CSR order for the given in-degrees; scores spread wide (peaked softmax), values ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    degrees = torch.tensor(degrees)
    rowptr = torch.cat([torch.zeros(1, dtype=torch.long), degrees.cumsum(0)])
    index = torch.repeat_interleave(torch.arange(len(degrees)), degrees)
    e = int(rowptr[-1])
    scores = (3 * torch.randn(e, channels, generator=g)).to(DEVICE, dtype)
    values = torch.randn(e, channels, generator=g).to(DEVICE, dtype)
    return scores, values, index.to(DEVICE), rowptr.to(DEVICE)


CASES = [
    ([3, 0, 5, 1, 40, 0, 2], 20),  # empty nodes, a node over two tiles, 20 channels (not a power of two)
    ([16] * 9, 35),  # kNN-like uniform degree, channels over three channel blocks
    ([0, 0, 0], 8),  # no edge at all
    ([1], 1),
]


@in_process
@pytest.mark.parametrize("degrees,channels", CASES, ids=["awkward", "uniform", "empty", "single"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_reference(degrees, channels, dtype):
    scores, values, index, rowptr = _graph(degrees, channels, dtype)
    out, row_max, log_sum = vk.vector_softmax_sum(scores, values, rowptr)
    ref_out, ref_max, ref_log_sum = vk.vector_softmax_sum_ref(scores, values, rowptr)
    assert out.dtype == dtype and row_max.dtype == log_sum.dtype == torch.float32
    # PyTorch at the input precision, against the same fp32 reference: the yardstick
    low = segment_softmax_weighted_sum(scores, values, index, len(degrees), impl="torch")
    atol = 1e-5 if dtype == torch.float32 else 2e-3
    for name, got, ref, lo in (("out", out, ref_out, low), ("max", row_max, ref_max, None),
                               ("log_sum", log_sum, ref_log_sum, None)):
        err = (got.float() - ref).abs().max().item() if ref.numel() else 0.0
        torch_err = (lo.float() - ref).abs().max().item() if lo is not None and ref.numel() else 0.0
        scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
        assert err <= 2 * torch_err + atol * scale, f"{name}: kernel err {err:.2e}, torch err {torch_err:.2e}"
    empty = torch.tensor(degrees, device=DEVICE) == 0
    if bool(empty.any()):
        assert not out[empty].any() and not row_max[empty].any() and not log_sum[empty].any()


@in_process
def test_scores_below_minus_1e30_are_an_ordinary_softmax():
    """Finite scores however negative are a softmax like any other (shifting all scores of a node leaves its
    weights unchanged): the running max starts at -inf, not at a finite floor that such scores never pass
    (with -1e30 the node's weights all underflowed to 0 and its output was 0)."""
    scores, values, index, rowptr = _graph([3, 0, 5, 40], 20, torch.float32, seed=3)
    shifted = scores - 1e32  # the shift swamps the spread: every score of a row is the same fp32 number
    out, row_max, log_sum = vk.vector_softmax_sum(shifted, values, rowptr)
    ref_out, ref_max, ref_log_sum = vk.vector_softmax_sum_ref(shifted, values, rowptr)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(row_max, ref_max, rtol=0.0, atol=0.0)
    torch.testing.assert_close(log_sum, ref_log_sum, rtol=1e-6, atol=1e-6)
    assert out[torch.tensor([3, 0, 5, 40], device=DEVICE) > 0].abs().sum() > 0


@in_process
@pytest.mark.parametrize("degrees,channels", CASES, ids=["awkward", "uniform", "empty", "single"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("order", ["csr", "shuffled"])
def test_backward_kernel_matches_reference(degrees, channels, dtype, order):
    """The backward kernel against the fp32 reference from the same saved statistics; PyTorch's backward casts
    the same fp32 result to the input dtype, so that rounding is the yardstick. Edges in any order (the
    backward gathers by destination index, it needs no CSR); either gradient alone."""
    scores, values, index, rowptr = _graph(degrees, channels, dtype, seed=3)
    out, row_max, log_sum = vk.vector_softmax_sum(scores, values, rowptr)
    grad = torch.randn(len(degrees), channels, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    if order == "shuffled":
        perm = torch.randperm(index.numel(), generator=torch.Generator().manual_seed(5)).to(DEVICE)
        scores, values, index = scores[perm], values[perm], index[perm]
    stats = (row_max, log_sum)
    got = vk.vector_softmax_sum_backward(scores, values, index, *stats, out, grad)
    want = vk.vector_softmax_sum_backward_ref(scores, values, index, *stats, out, grad)
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    for name, g, w in zip(("grad_scores", "grad_values"), got, want):
        assert g.dtype == dtype and g.shape == scores.shape, name
        if not w.numel():
            continue
        err = (g.float() - w).abs().max().item()
        rounding = (w.to(dtype).float() - w).abs().max().item()
        assert err <= 2 * rounding + atol * max(1.0, w.abs().max().item()), f"{name}: err {err:.2e}"
    only_scores, none = vk.vector_softmax_sum_backward(scores, values, index, *stats, out, grad, need_values=False)
    assert none is None and torch.equal(only_scores, got[0])
    none, only_values = vk.vector_softmax_sum_backward(scores, values, index, *stats, out, grad, need_scores=False)
    assert none is None and torch.equal(only_values, got[1])


@in_process
@pytest.mark.parametrize("degrees,channels", CASES[:2], ids=["awkward", "uniform"])
def test_gradients_through_the_kernel_forward(degrees, channels):
    """segment_softmax_weighted_sum on the kernels (impl="triton": forward and backward) gives the PyTorch
    path's outputs and gradients; fully -inf scores of a node give zeros and zero gradients."""
    scores, values, index, rowptr = _graph(degrees, channels, torch.float32, seed=1)
    scores[rowptr[0]:rowptr[1], 0] = float("-inf")  # node 0, channel 0: nothing to attend to
    grad = torch.randn(len(degrees), channels, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    results = []
    for impl in ("triton", "torch"):
        s, v = scores.clone().requires_grad_(True), values.clone().requires_grad_(True)
        kwargs = dict(rowptr=rowptr) if impl == "triton" else {}
        out = segment_softmax_weighted_sum(s, v, index, len(degrees), impl=impl, **kwargs)
        results.append([out] + list(torch.autograd.grad(out, (s, v), grad)))
    for got, want in zip(*results):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert results[0][0][0, 0] == 0 and not results[0][1][rowptr[0]:rowptr[1], 0].any()


def _weighted_sum_grads(scores, values, index, grad, **kwargs):
    """(out, d scores, d values) of segment_softmax_weighted_sum, in float64 for comparison."""
    s, v = scores.clone().requires_grad_(True), values.clone().requires_grad_(True)
    out = segment_softmax_weighted_sum(s, v, index, grad.size(0), **kwargs)
    return [t.double() for t in [out] + list(torch.autograd.grad(out, (s, v), grad))]


@in_process
@pytest.mark.parametrize("offset", [1e4, 1e30])
def test_kernel_gradients_at_large_scores_match_float64(offset):
    """Scores shifted by 1e4 and 1e30 (fp32 values, the float64 reference gets the very same numbers): the
    kernel's backward is as accurate as at small scores. It used to recompute the weights as exp(s - lse) from
    lse = max + log_sum, rounded to ulp(|s|): 1.6e-4 relative gradient error at 1e4, every weight wrong at 1e30
    (4 equal scores gave d values 0 instead of 0.25); now exp((s - max) - log_sum) as the PyTorch path."""
    scores, values, index, rowptr = _graph([3, 1, 0, 5, 2, 20], 4, torch.float32, seed=8)
    scores = scores + offset
    grad = torch.randn(6, 4, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    want = _weighted_sum_grads(scores.double(), values.double(), index, grad.double(), impl="torch")
    got = _weighted_sum_grads(scores, values, index, grad, rowptr=rowptr, impl="triton")
    for name, g, w in zip(("out", "grad_scores", "grad_values"), got, want):
        err = ((g - w).abs().max() / w.abs().max()).item()
        assert err < 1e-6, f"{name}: relative error {err:.1e} against float64"
    equal = torch.full((4, 1), offset, device=DEVICE)
    _, _, grad_values = _weighted_sum_grads(equal, torch.ones_like(equal), torch.zeros(4, dtype=torch.long,
                                            device=DEVICE), torch.ones(1, 1, device=DEVICE),
                                            rowptr=torch.tensor([0, 4], device=DEVICE), impl="triton")
    assert grad_values.flatten().tolist() == [0.25] * 4


@in_process
def test_nan_and_inf_scores_give_nan_on_the_kernel_as_on_the_torch_path():
    """A NaN or +inf score makes its node's channel NaN (forward and gradients) on the kernel as on the PyTorch
    path and in PyG's softmax, where the kernel gave a silent 0 (it tested l > 0, false for a NaN sum); a channel
    whose scores are all -inf still gives 0 and zero gradients (documented), and other channels are untouched."""
    scores, values, index, rowptr = _graph([3, 4, 0, 2], 3, torch.float32, seed=10)
    scores[1, 0] = float("nan")  # node 0, channel 0
    scores[4, 1] = float("inf")  # node 1, channel 1
    scores[7:9, 2] = float("-inf")  # node 3, channel 2: nothing to attend to
    grad = torch.randn(4, 3, generator=torch.Generator().manual_seed(11)).to(DEVICE)
    got = _weighted_sum_grads(scores, values, index, grad, rowptr=rowptr, impl="triton")
    want = _weighted_sum_grads(scores, values, index, grad, impl="torch")
    assert got[0][0, 0].isnan() and got[0][1, 1].isnan() and got[0][3, 2] == 0 and not got[2][7:9, 2].any()
    assert torch.equal(got[0].isnan(), want[0].isnan())
    for name, g, w in zip(("out", "grad_scores", "grad_values"), got, want):
        # every NaN of the PyTorch path is one here too (at the +inf score the PyTorch path's gradients are NaN on
        # that edge alone, the kernel's on the node's channel: both NaN-poisoned, neither a silent number)
        assert bool(g[w.isnan()].isnan().all()), name
        both = ~(g.isnan() | w.isnan())
        torch.testing.assert_close(g[both], w[both], atol=1e-6, rtol=1e-5, msg=name)
        clean = torch.ones_like(both)
        clean[:, :2] = False  # channels 0 and 1 hold the NaN and +inf scores
        assert bool(both[clean].all()), name


def test_half_inputs_are_summed_in_fp32_on_the_torch_path():
    """fp16 on the PyTorch path computes in fp32 and casts back (as the kernel and segment_softmax_aggregate):
    100 equal scores with values 1000 (all fp16 numbers, the answer 1000) gave inf, the unnormalised sum
    1e5 overflowing fp16, and 70000 entries of value 1 overflowed the softmax's denominator. Against float64, and
    PyG's softmax then index_add (which does not overflow here) where installed."""
    for num, value in ((100, 1000.0), (70000, 1.0)):
        index = torch.zeros(num, dtype=torch.long, device=DEVICE)
        scores = torch.zeros(num, 1, dtype=torch.float16, device=DEVICE)
        values = torch.full((num, 1), value, dtype=torch.float16, device=DEVICE)
        grad = torch.ones(1, 1, dtype=torch.float16, device=DEVICE)
        got = _weighted_sum_grads(scores, values, index, grad, impl="torch")
        want = _weighted_sum_grads(scores.double(), values.double(), index, grad.double(), impl="torch")
        assert got[0].dtype == torch.float64 and torch.isfinite(got[0]).all()
        for name, g, w in zip(("out", "grad_scores", "grad_values"), got, want):
            rounding = (w.half().double() - w).abs().max().item()
            assert (g - w).abs().max().item() <= 2 * rounding + 1e-3 * max(1.0, w.abs().max().item()), name
        assert segment_softmax_weighted_sum(scores, values, index, 1).dtype == torch.float16
    pyg_utils = pytest.importorskip("torch_geometric.utils")
    index, scores = torch.zeros(100, dtype=torch.long), torch.zeros(100, 1, dtype=torch.float16)
    values = torch.full((100, 1), 1000.0, dtype=torch.float16)
    peer = torch.zeros(1, 1, dtype=torch.float16).index_add(0, index, pyg_utils.softmax(scores, index) * values)
    assert torch.equal(segment_softmax_weighted_sum(scores, values, index, 1), peer)


def test_rowptr_of_a_small_integer_dtype_is_refused_by_name():
    """int16 / uint8 rowptr: a TypeError naming rowptr and the dtypes taken, not torch.repeat_interleave's own
    error from deep inside the check."""
    scores = torch.randn(3, 2, device=DEVICE)
    index = torch.tensor([0, 0, 1], device=DEVICE)
    for dtype in (torch.int16, torch.uint8):
        with pytest.raises(TypeError, match=f"rowptr must be a 1-D integer tensor \\(int64 or int32\\).*{dtype}"):
            segment_softmax_weighted_sum(scores, scores, index, 2, rowptr=torch.tensor([0, 2, 3], dtype=dtype,
                                                                                        device=DEVICE))


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_point_transformer_layer_on_the_kernel(monkeypatch, dtype):
    """PointTransformerConv with every block's aggregation forced onto the kernel: PyG's outputs and
    gradients (the layer passes each block's CSR row pointers). A float64 layer takes the PyTorch path there
    (the kernel refuses float64: on CUDA such a layer raised "dtype torch.float64 is not supported")."""
    pyg_nn = pytest.importorskip("torch_geometric.nn")
    from torch import nn

    import zoo.attention.vector as vector
    from zoo.attention import PointTransformerConv
    from zoo.geometry import knn_graph

    calls = []
    original = segment_softmax_weighted_sum

    def forced(scores, values, index, num, *, rowptr=None, impl="auto"):
        if rowptr is None:  # CPU: the layer passes none; build the block's row pointers from its sorted index
            rowptr = torch.cat([index.new_zeros(1), torch.bincount(index, minlength=num).cumsum(0)])
        calls.append(1)
        return original(scores, values, index, num, rowptr=rowptr, impl="triton")

    monkeypatch.setattr(vector, "segment_softmax_weighted_sum", forced)
    monkeypatch.setattr(vector, "_BLOCK_ELEMENTS", 200)  # several blocks
    torch.manual_seed(0)
    mlp = lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))  # noqa: E731
    ours = PointTransformerConv(6, 8, attn_nn=mlp()).to(DEVICE, dtype)
    ours.recompute = True
    peer = pyg_nn.PointTransformerConv(6, 8, attn_nn=mlp()).to(DEVICE, dtype)
    ours.load_state_dict(peer.state_dict())
    pos = torch.rand(40, 3, device=DEVICE, dtype=dtype)
    x = torch.randn(40, 6, device=DEVICE, dtype=dtype)
    ei = knn_graph(pos, 5)
    results = []
    for layer in (ours, peer):
        xx = x.clone().requires_grad_(True)
        out = layer(xx, pos, ei)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), xx.grad))
    assert len(calls) > 1
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    for got, want in zip(*results):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **tol)


@in_process
def test_float64_takes_the_torch_path_under_every_impl():
    """segment_softmax_weighted_sum with float64 (or a float64 side of a mix, which promotes to it) and
    rowptr under impl="triton" / "auto": the PyTorch path's float64 result and gradients, not the kernel's
    TypeError (which a float64 PointTransformerConv on CUDA hit)."""
    scores, values, index, rowptr = _graph([3, 0, 5, 1, 40], 20, torch.float64, seed=6)
    grad = torch.randn(5, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    results = {}
    for name, impl, score_dtype in (("torch", "torch", torch.float64), ("triton", "triton", torch.float64),
                                    ("auto", "auto", torch.float64), ("mixed", "triton", torch.float32)):
        s = scores.to(score_dtype).requires_grad_(True)
        v = values.clone().requires_grad_(True)
        out = segment_softmax_weighted_sum(s, v, index, 5, rowptr=rowptr, impl=impl)
        results[name] = [out] + list(torch.autograd.grad(out, (s, v), grad))
    for name in ("triton", "auto"):
        for got, want in zip(results[name], results["torch"]):
            assert got.dtype == torch.float64
            torch.testing.assert_close(got, want, atol=0.0, rtol=0.0)
    assert results["mixed"][0].dtype == torch.float64 and results["mixed"][1].dtype == torch.float32


def test_bad_inputs_name_the_problem():
    scores = torch.randn(5, 3, device=DEVICE)
    rowptr = torch.tensor([0, 2, 5], device=DEVICE)
    index = torch.tensor([0, 0, 1, 1, 1], device=DEVICE)
    with pytest.raises(ValueError, match="rise from 0 to E = 5"):
        vk.vector_softmax_sum(scores, scores, torch.tensor([0, 3, 2, 5], device=DEVICE))
    with pytest.raises(ValueError, match="must match scores"):
        vk.vector_softmax_sum(scores, scores[:, :2], rowptr)
    for wrong in (scores[:, 0], scores[:, :, None]):  # (an unpacking error before)
        with pytest.raises(ValueError, match=r"scores must be \[E, C\] .*got shape"):
            vk.vector_softmax_sum(wrong, wrong, rowptr)
    with pytest.raises(ValueError, match="needs rowptr"):
        segment_softmax_weighted_sum(scores, scores, index, 2, impl="triton")
    with pytest.raises(ValueError, match="num_segments \\+ 1 = 3"):
        segment_softmax_weighted_sum(scores, scores, index, 2, rowptr=rowptr[:2])
    with pytest.raises(ValueError, match="impl must be"):
        segment_softmax_weighted_sum(scores, scores, index, 2, impl="cuda")
    stats = torch.zeros(2, 3, device=DEVICE)
    with pytest.raises(ValueError, match="do not describe the same edges"):
        vk.vector_softmax_sum_backward(scores, scores, index[:4], stats, stats, stats, stats)
    with pytest.raises(ValueError, match="grad_out must be \\[2, 3\\]"):
        vk.vector_softmax_sum_backward(scores, scores, index, stats, stats, stats, stats[:1])
    with pytest.raises(TypeError, match="max and log_sum must be float32"):
        vk.vector_softmax_sum_backward(scores, scores, index, stats, stats.double(), stats, stats)


def test_compiles_for_sm80_and_sm90_without_gpu():
    """The real (non-interpreted) kernels (forward and backward) compile to machine code with Triton's bundled
    ptxas: every autotune config for sm_90 in fp16, the first for sm_80 in fp16, bf16 and fp32. GPU-only
    compile errors show on CPU-only CI. In a subprocess, because this process imported the kernels for the
    interpreter."""
    code = (
        "import torch\n"
        "from zoo.kernels.vector_softmax import _bwd_configs, _configs, compile_check\n"
        "report = compile_check(90, torch.float16)\n"
        "assert len(report['forward']) == len(_configs()) and len(report['backward']) == len(_bwd_configs())\n"
        "for dtype in (torch.float16, torch.bfloat16, torch.float32):\n"
        "    report = compile_check(80, dtype, all_configs=False)\n"
        "    assert len(report['forward']) == len(report['backward']) == 1\n"
    )
    run_compiled(code)


def test_single_config_variable_gives_one_autotune_config_on_a_gpu_too():
    """ZOO_TRITON_SINGLE_CONFIG=1 (tests/run_gpu_kernels.sh's correctness steps) bounds the compile time of the
    forward and backward kernels to one config each, one of the tuned list's; unset, they tune over 16 and 12. The
    module is imported without TRITON_INTERPRET (where it always has one config), in a subprocess: its autotuners
    are built at import."""
    check_single_config_variable("vector_softmax", ("_vector_softmax_sum_fwd_kernel", "_vector_softmax_sum_bwd_kernel"), [16, 12])


@in_process
def test_launches_run_under_the_guard_of_the_tensors_device(monkeypatch):
    """The forward and backward launches run inside on_device_of (torch.cuda.device of the inputs on CUDA): Triton
    launches on the current device, so a layer moved to cuda:1 ran on cuda:0. The guard is replaced by a recorder
    and each launch checks that it is inside it."""
    guard = LaunchGuardRecorder()
    monkeypatch.setattr(vk, "on_device_of", guard, raising=False)
    for name in ("_vector_softmax_sum_fwd_kernel", "_vector_softmax_sum_bwd_kernel"):
        monkeypatch.setattr(vk, name, guard.checked(getattr(vk, name)))
    scores, values, index, rowptr = _graph([3, 0, 5], 8, torch.float32)
    out, row_max, log_sum = vk.vector_softmax_sum(scores, values, rowptr)
    vk.vector_softmax_sum_backward(scores, values, index, row_max, log_sum, out, torch.ones_like(out))
    assert guard.launches == [True, True], f"launches outside the device guard: {guard.launches}"
    assert guard.entered == [scores.device, scores.device]


@pytest.mark.skipif(not _LATE, reason="the tests above ran in this process")
def test_vector_kernel_tests_in_a_fresh_process():
    run_in_fresh_process(__file__)


@in_process
def test_reference_gives_zero_for_all_minus_inf_channels_as_the_kernel():
    """vector_softmax_sum_ref promised 0 for a channel without a finite-weighted edge but returned NaN there (its
    weights came from segment_softmax), unlike the kernel; a NaN score still gives NaN in both."""
    scores = torch.tensor([[float("-inf"), 0.5, float("nan")], [float("-inf"), 1.5, 0.0]])
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    rowptr = torch.tensor([0, 2])
    ref_out, _, _ = vk.vector_softmax_sum_ref(scores, values, rowptr)
    out, _, _ = vk.vector_softmax_sum(scores, values, rowptr)
    assert ref_out[0, 0] == 0 and out[0, 0] == 0
    assert torch.isnan(ref_out[0, 2]) and torch.isnan(out[0, 2])
    torch.testing.assert_close(ref_out[:, 1], out[:, 1])


def test_rowptr_that_does_not_end_at_E_is_refused():
    """vector_softmax_sum is public: a rowptr ending before E silently dropped the trailing edges, one ending
    after E let the kernel read past scores and values (an illegal access on a GPU). Refused before any launch
    (audit m8, 2026-12-07)."""
    scores = torch.randn(5, 3, device=DEVICE)
    for bad in ([0, 2, 4], [0, 2, 6]):  # E = 5; the short one first, it cannot read out of bounds
        with pytest.raises(ValueError, match="rise from 0 to E = 5"):
            vk.vector_softmax_sum(scores, scores, torch.tensor(bad, device=DEVICE))


def test_values_of_another_dtype_than_the_scores_are_refused():
    """The kernel writes out in the scores' dtype and reads values as theirs: a mixed pair is refused by name,
    not summed silently (audit m28)."""
    scores = torch.randn(5, 3, device=DEVICE)
    rowptr = torch.tensor([0, 2, 5], device=DEVICE)
    with pytest.raises(ValueError, match="must match scores"):
        vk.vector_softmax_sum(scores, scores.half(), rowptr)
    with pytest.raises(ValueError, match="must match scores"):
        vk.vector_softmax_sum(scores.half(), scores, rowptr)
