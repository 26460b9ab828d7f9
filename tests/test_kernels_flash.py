"""zoo.kernels.flash_attention: forward and every gradient (q, k, v, bias) against a float64 reference.

Criterion (DESIGN.md): |kernel - float64| <= 2 * |PyTorch attention at the same precision - float64| + atol,
per output, where "PyTorch attention" is attend(..., backend="torch") on the same low-precision inputs, and
the float64 reference (flash_attention_ref) must itself equal tests/attention_reference.py's explicit attention.
The grid covers lengths 1, 7, 97, 130, 257 with Nq != Nk, head dims 16, 40, 64, 96 (and Dv != D), GQA,
every mask type and combinations, random block maps at 20% and 50%, fully masked rows, bias broadcast
along batch / heads / rows / columns, softmax and sigmoid, fp32 and fp16.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set here before the kernel
module is imported when there is no GPU). GPU-only tests (bf16, speed) are marked ``gpu``.
"""
from __future__ import annotations

import math
import os
import statistics
import time

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from attention_reference import naive_attention  # noqa: E402  (tests/attention_reference.py)
from triton_interpreter import LaunchGuardRecorder, run_compiled  # noqa: E402  (tests/triton_interpreter.py)
from zoo.attention import (  # noqa: E402
    BlockSparse,
    Causal,
    ChunkWindow,
    Dense,
    Edges,
    Full,
    KeyPadding,
    MaskMod,
    Segments,
    Window,
    as_mask,
    attend,
)
from zoo.attention import backends as zb  # noqa: E402
from zoo.kernels import flash_attention as fa  # noqa: E402
from zoo.kernels.flash_attention import (  # noqa: E402
    flash_attention,
    flash_attention_ref,
    merge_attention_states,
    triton_supports,
)

if not HAS_CUDA and not fa.INTERPRET:
    pytest.skip("no CUDA and the kernel module was imported without TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if HAS_CUDA else "cpu"
# The interpreter converts loaded scalars with a NumPy deprecation warning on every loop bound.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def _inputs(b, h, hkv, nq, nk, d, dv=None, bias_shape=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    q = torch.randn(b, h, nq, d, generator=g)
    k = torch.randn(b, hkv, nk, d, generator=g)
    v = torch.randn(b, hkv, nk, dv, generator=g)
    bias = None if bias_shape is None else torch.randn(*bias_shape, generator=g)
    cast = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(bias)


def _grads(fn, q, k, v, bias, grad_out_seed=1):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    bias_leaf = None if bias is None else bias.detach().clone().requires_grad_(True)
    out = fn(*leaves, bias_leaf)
    g = torch.Generator().manual_seed(grad_out_seed)
    d_out = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    wrt = leaves + ([bias_leaf] if bias_leaf is not None else [])
    grads = torch.autograd.grad(out, wrt, d_out)
    return [out.detach()] + [g.detach() for g in grads]


def _naive_float64(q, k, v, mask, bias, *, score="softmax", scale=None):
    """tests/attention_reference.py's explicit float64 attention on the mask's dense pattern: the check on
    flash_attention_ref, which _check measures both the kernel and PyTorch against. A pair whose bias is -inf
    counts as masked (attend()'s "-inf or mask= forbid pairs"), with no gradient."""
    q_len, k_len, head_dim = q.shape[2], k.shape[2], q.shape[3]
    allowed = as_mask(mask).dense(q_len, k_len, q.device)
    if bias is not None:
        forbidden = torch.isneginf(bias)
        allowed, bias = allowed & ~forbidden, bias.masked_fill(forbidden, 0.0)
    scale = head_dim**-0.5 if scale is None else scale
    return naive_attention(q, k, v, allowed, bias, scale, score)


def _check(q, k, v, mask, bias, *, score="softmax", block=None, grads=True, scale=None):
    """Kernel vs float64 reference, with PyTorch at the same precision as the yardstick. The reference itself
    must equal the independent float64 attention (forward and gradients) to float64 rounding: a wrong
    reference would otherwise pass both the kernel and PyTorch, as its error inflates err_torch."""
    kw = {} if block is None else dict(block_m=block[0], block_n=block[1])

    def ours(q_, k_, v_, b_):
        return flash_attention(q_, k_, v_, mask, b_, score=score, scale=scale, **kw)

    def torch_same_precision(q_, k_, v_, b_):
        return attend(q_, k_, v_, mask, b_, score=score, scale=scale, backend="torch")

    def truth(q_, k_, v_, b_):
        return flash_attention_ref(q_, k_, v_, mask, b_, score=score, scale=scale)

    def independent(q_, k_, v_, b_):
        return _naive_float64(q_, k_, v_, mask, b_, score=score, scale=scale)

    names = ["out", "dq", "dk", "dv", "dbias"]
    inputs64 = [None if t is None else t.double() for t in (q, k, v, bias)]
    if grads:
        got = _grads(ours, q, k, v, bias)
        base = _grads(torch_same_precision, q, k, v, bias)
        want = _grads(truth, *inputs64)
        check = _grads(independent, *inputs64)
    else:
        got = [ours(q, k, v, bias)]
        base = [torch_same_precision(q, k, v, bias)]
        want = [truth(*inputs64)]
        check = [independent(*inputs64)]
    for name, w, c in zip(names, want, check):
        torch.testing.assert_close(w, c, rtol=1e-9, atol=1e-9, msg=lambda m: f"flash_attention_ref {name}: {m}")
    atol = ATOL[q.dtype]
    for name, a, b_, w in zip(names, got, base, want):
        assert a.shape == w.shape and a.dtype == (q.dtype if name != "dbias" else bias.dtype), name
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        err = (a.double() - w).abs().max().item()
        err_torch = (b_.double() - w).abs().max().item()
        scale = max(1.0, w.abs().max().item())
        assert err <= 2 * err_torch + atol * scale, f"{name}: kernel err {err:.3g} vs torch err {err_torch:.3g}"
    return got


def _random_ids(n, segments, batch, seed, sort=True, pad=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, segments, (batch, n), generator=g)
    if sort:
        ids = torch.sort(ids, dim=-1).values
    if pad:
        ids[:, n - pad :] = -1
    return ids


# ------------------------------------------------------------------------------------------------
# Shapes, head dims, GQA (forward + gradients, fp32)
# ------------------------------------------------------------------------------------------------
SHAPES = [
    # (B, H, Hkv, Nq, Nk, D, Dv, mask)
    pytest.param(1, 2, 1, 1, 7, 16, 16, lambda: Full(), id="nq1-nk7-d16-gqa"),
    pytest.param(1, 2, 2, 7, 1, 40, 40, lambda: Causal(), id="nq7-nk1-d40-causal"),
    pytest.param(1, 4, 2, 97, 130, 64, 64, lambda: Causal(), id="nq97-nk130-d64-gqa-causal"),
    pytest.param(1, 2, 1, 130, 97, 96, 96, lambda: Window(20, 5), id="nq130-nk97-d96-window"),
    pytest.param(1, 1, 1, 257, 130, 16, 16, lambda: Full(), id="nq257-nk130-d16"),
    pytest.param(1, 2, 1, 130, 257, 40, 24, lambda: Causal(), id="nq130-nk257-d40-dv24-causal"),
    # ragged on one side only at the interpreter's 32 x 32 tiles: the dK/dV pass's transposed lists must demote
    # the last query tile (not the last key tile) when only Nq is ragged, and the reverse
    pytest.param(1, 2, 1, 40, 64, 16, 16, lambda: Full(), id="nq40-nk64-d16-q-ragged"),
    pytest.param(1, 2, 1, 64, 40, 16, 16, lambda: Full(), id="nq64-nk40-d16-k-ragged"),
]


@pytest.mark.parametrize("b,h,hkv,nq,nk,d,dv,mask_fn", SHAPES)
def test_shapes_fp32(b, h, hkv, nq, nk, d, dv, mask_fn):
    q, k, v, _ = _inputs(b, h, hkv, nq, nk, d, dv)
    _check(q, k, v, mask_fn(), None)


@pytest.mark.parametrize("d,dv", [(200, 256), (8, 24)], ids=["d200-dv256", "d8-dv24"])
def test_head_dims_padded_and_scale(d, dv):
    """Head dims are padded inside the kernel to the next power of two >= 16 (up to 256); explicit scale."""
    q, k, v, bias = _inputs(1, 2, 1, 33, 45, d, dv, bias_shape=(1, 1, 33, 45), seed=22)
    _check(q, k, v, Window(12, 3), bias, scale=0.07)


def test_gqa_reads_kv_without_copy(monkeypatch):
    """Grouped-query attention: the kernels receive the caller's K/V (Hkv heads, same storage)."""
    q, k, v, _ = _inputs(1, 4, 1, 20, 30, 16, seed=23)
    seen = []
    forward, backward = fa._forward, fa._backward

    def spy_forward(q_, k_, v_, *rest):
        seen.append(("fwd", k_.shape[1], k_.data_ptr(), v_.shape[1], v_.data_ptr()))
        return forward(q_, k_, v_, *rest)

    def spy_backward(q_, k_, v_, *rest, **kw):
        seen.append(("bwd", k_.shape[1], k_.data_ptr(), v_.shape[1], v_.data_ptr()))
        return backward(q_, k_, v_, *rest, **kw)

    monkeypatch.setattr(fa, "_forward", spy_forward)
    monkeypatch.setattr(fa, "_backward", spy_backward)
    k_leaf, v_leaf = k.clone().requires_grad_(True), v.clone().requires_grad_(True)
    out = flash_attention(q, k_leaf, v_leaf, Causal())
    out.sum().backward()
    assert [s[0] for s in seen] == ["fwd", "bwd"]
    for _, k_heads, k_ptr, v_heads, v_ptr in seen:
        assert (k_heads, k_ptr, v_heads, v_ptr) == (1, k_leaf.data_ptr(), 1, v_leaf.data_ptr())
    assert k_leaf.grad.shape == k.shape
    want = flash_attention_ref(q.double(), k_leaf.double(), v_leaf.double(), Causal())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


class _GridSpy:
    """Stands in for a kernel: records the launch grids and launches the real kernel."""

    def __init__(self, kernel, grids: list):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("bias_shape", [(1, 4, 20, 30), (3, 1, 1, 30), (3, 4, 20, 1)], ids=["b1", "h1-rows1", "cols1"])
def test_batch_heads_past_the_grid_limit_launch_in_chunks(monkeypatch, bias_shape):
    """CUDA caps grid axis 1 at 65,535 programs, and every pass puts its (batch, head) pairs there: above that
    the launches go in chunks of at most _MAX_GRID_PAIRS pairs (lowered to 2 here, so 3 x 4 pairs make several
    chunks per pass), each starting at its pair offset. Forward and every gradient against the float64
    reference, dBias accumulated over the batch or the heads (b1, h1-rows1) across chunks included."""
    monkeypatch.setattr(fa, "_MAX_GRID_PAIRS", 2, raising=False)
    grids = []
    for name in ("_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"):
        monkeypatch.setattr(fa, name, _GridSpy(getattr(fa, name), grids))
    q, k, v, bias = _inputs(3, 4, 2, 20, 30, 16, bias_shape=bias_shape, seed=32)
    _check(q, k, v, Causal(), bias)
    assert grids and max(grid[1] for grid in grids) <= 2
    assert len(grids) >= 12 // 2 + 12 // 2 + 6 // 2 + 2  # forward, preprocess, dK/dV, dQ each in chunks


# ------------------------------------------------------------------------------------------------
# Every mask type and combinations (with a broadcast bias that needs its gradient)
# ------------------------------------------------------------------------------------------------
def _every_other_key_per_head(b, h, q_idx, kv_idx):
    return (kv_idx + h) % 2 == 0


def _mask_cases():
    nq, nk = 97, 130
    ids_q = _random_ids(nq, 4, 2, seed=3, pad=5)  # 5 padding queries: empty rows
    ids_k = _random_ids(nk, 4, 2, seed=4, pad=7)
    g = torch.Generator().manual_seed(5)
    dense = torch.rand(2, 1, nq, nk, generator=g) < 0.3
    dense[:, :, 10] = False  # a fully masked row
    blk20 = torch.rand(2, 2, -(-nq // 32), -(-nk // 32), generator=g) < 0.2
    blk20[..., 0, 0] = True
    blk50 = torch.rand(1, 2, -(-nq // 16), -(-nk // 16), generator=g) < 0.5
    key_padding = torch.arange(nk)[None, None, None] < torch.tensor([nk, 77])[:, None, None, None]  # (2, 1, 1, nk)
    edges = torch.stack([torch.randint(0, nk, (900,), generator=g), torch.randint(0, nq, (900,), generator=g)])
    return {
        "dense-key-padding-broadcast": lambda: Dense(key_padding),  # one key row for every query (stride 0)
        "keypadding-from-lengths": lambda: KeyPadding([nk, 77]),  # the same, from lengths
        "window-empty-rows": lambda: Window(-3, 5),
        "segments-varlen-cross": lambda: Segments(ids_q, ids_k),
        "segments-unsorted": lambda: Segments(_random_ids(nq, 3, 1, 6, sort=False), _random_ids(nk, 3, 1, 7, sort=False)),
        "dense-empty-row": lambda: Dense(dense),
        "blocksparse-20pct-tile": lambda: BlockSparse(blk20, 32),
        "blocksparse-50pct-subtile": lambda: BlockSparse(blk50, 16),
        "segments&causal": lambda: Segments(ids_q, ids_k) & Causal(),
        # per-segment alignment (flash_attn_varlen_func's causal / window_size): positions inside the segments
        # read beside the ids (the POS flag of a window slot)
        "segments.causal()": lambda: Segments(ids_q, ids_k).causal(),
        "segments-unsorted.window(4,1)": lambda: Segments(_random_ids(nq, 3, 1, 6, sort=False),
                                                          _random_ids(nk, 3, 1, 7, sort=False)).window(4, 1),
        "segments.window(9,None)&causal|window": lambda: (Segments(ids_q, ids_k).window(9, None) & Causal()) | Window(2, 2),
        # chunks counted per packed sequence (streaming speech on varlen batches): chunk numbers inside the
        # segments read beside the ids, as SegmentWindow's positions
        "segments.chunk(8,left=1)": lambda: Segments(ids_q, ids_k).chunk(8, left=1),
        "causal&window": lambda: Causal() & Window(16, None),
        "window|blocksparse": lambda: Window(3, 3) | BlockSparse(blk20, 32),
        "(window|segments)&causal": lambda: (Window(8, 0) | Segments(ids_q, ids_k)) & Causal(),
        "dense&causal": lambda: Dense(dense) & Causal(),
        "4-windows-dense-fallback": lambda: Window(1, 1) | Window(9, -7) | Window(-20, 24) | Window(40, -35),
        # Chunk windows (streaming speech, block-causal video): chunk numbers computed in the kernel.
        "chunkwindow-left2": lambda: ChunkWindow(8, left=2),
        "chunkwindow&segments": lambda: ChunkWindow(12) & Segments(ids_q, ids_k),
        "chunkwindow-diag|window": lambda: ChunkWindow(10, 0, 0) | Window(2, 2),
        # A FlexAttention-style predicate: read from one materialised dense mask in the kernel.
        "maskmod-per-head&causal": lambda: MaskMod(_every_other_key_per_head, num_heads=2) & Causal(),
        # Graph edges (kNN neighbourhoods, sparse graph transformers): absolute indices, bipartite here; the
        # kernel reads them through the EDGE slot (a tile bitmask; tests/test_kernel_edges.py)
        "edges-bipartite": lambda: Edges(edges),
    }


MASK_CASES = _mask_cases()


@pytest.mark.parametrize("name", list(MASK_CASES))
def test_masks_fp32(name):
    q, k, v, bias = _inputs(2, 2, 1, 97, 130, 32, bias_shape=(1, 2, 97, 130), seed=11)
    _check(q, k, v, MASK_CASES[name](), bias)


def test_chunkwindow_more_queries_than_keys():
    """Nq > Nk: the first queries sit at negative positions, in negative chunks (the kernel's floor division
    must not truncate toward zero); some rows see nothing."""
    from zoo.kernels.block_index import SLOT_CHUNK0, lower_mask

    mask = ChunkWindow(12, 1, 0)
    assert lower_mask(mask, 130, 97, "cpu").terms == (1 | SLOT_CHUNK0,)
    q, k, v, bias = _inputs(2, 2, 1, 130, 97, 16, bias_shape=(2, 1, 1, 97), seed=13)
    _check(q, k, v, mask, bias)


def _slot_one_and_third_term_cases():
    """Kernel paths MASK_CASES does not reach: a chunk band and a per-segment position band in window slot 1 (a
    term ANDing Causal with them), and a third OR-term. Small: 40 queries, 56 keys (Nq != Nk, so the chunk band's
    shift is not the causal band's)."""
    ids_q = torch.tensor([[-1] * 3 + [0] * 17 + [1] * 20])
    ids_k = torch.tensor([[0] * 26 + [1] * 22 + [-1] * 8])
    blk = torch.rand(1, 2, 3, 4, generator=torch.Generator().manual_seed(41)) < 0.3
    blk[..., 0, 3] = True  # a kept tile that the two other terms leave empty
    return {
        "causal&chunkwindow|segments|blocksparse": (
            lambda: (Causal() & ChunkWindow(8, 1, 0)) | Segments(ids_q, ids_k) | BlockSparse(blk, 16),
            (1 | 2 | 64, 4, 16)),  # WIN0 | WIN1 | CHUNK1, SEG, BLK
        "causal&segments.window": (lambda: Causal() & Segments(ids_q, ids_k).window(3, None),
                                   (1 | 2 | 4 | 256,)),  # WIN0 | WIN1 | SEG | POS1
    }


SLOT_ONE_CASES = _slot_one_and_third_term_cases()


@pytest.mark.parametrize("name", list(SLOT_ONE_CASES))
def test_second_window_slot_and_third_term_in_the_kernel(name):
    """The in-kernel predicate with a chunk band (CHUNK1) or positions inside segments (POS1) in the second window
    slot, and with three OR-terms (the kernel's maximum): forward and every gradient against the float64 reference
    on the mask's dense pattern (_check). The program must be the one named, evaluated in the kernel (no dense
    fallback)."""
    from zoo.kernels.block_index import lower_mask

    make, terms = SLOT_ONE_CASES[name]
    mask = make()
    program = lower_mask(mask, 40, 56, "cpu")
    assert program.terms == terms and program.exact_in_kernel
    q, k, v, _ = _inputs(1, 2, 1, 40, 56, 16, seed=42)
    _check(q, k, v, mask, None)


def test_alibi_computed_in_the_kernel(monkeypatch):
    """ALiBi is computed inside the kernel from its slopes (no (H, Nq, Nk) bias tensor is ever built): forward
    and gradients equal the float64 reference with the materialised bias, with Nq < Nk and Nq > Nk (bottom-right
    alignment), masks and GQA; attend() hands the object to the kernel when it selects it."""
    import dataclasses

    from zoo.attention import ALiBi
    from zoo.attention import backends as zb

    for nq, nk, mask in ((70, 90, Causal()), (90, 70, None), (64, 64, Window(10, 3))):
        q, k, v, _ = _inputs(2, 4, 2, nq, nk, 16, seed=14)
        for t in (q, k, v):
            t.requires_grad_(True)
        want = flash_attention_ref(*(t.double() for t in (q, k, v)), mask, ALiBi(4).materialize(nq, nk).double())
        grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(15)).to(DEVICE)
        wants = [want] + list(torch.autograd.grad(want, (q, k, v), grad.double()))
        with monkeypatch.context() as m:
            m.setattr(ALiBi, "materialize", lambda *a, **kw: pytest.fail("the ALiBi bias was materialised"))
            out = flash_attention(q, k, v, mask, ALiBi(4))
            gots = [out] + list(torch.autograd.grad(out, (q, k, v), grad))
            via_attend = attend(q, k, v, mask, bias=ALiBi(4), backend="triton")
        for label, got, w in zip(["out", "dq", "dk", "dv"], gots, wants):
            err = (got.double() - w).abs().max().item()
            assert err <= 2e-5 * max(1.0, w.abs().max().item()), f"Nq={nq} Nk={nk} {label}: {err:.2e}"
        torch.testing.assert_close(via_attend, out, rtol=0, atol=0)
    # automatic selection with the interpreter made eligible: the kernel gets the object, not a tensor
    zb.list_backends()
    monkeypatch.setitem(zb._BACKENDS, "triton",
                        dataclasses.replace(zb.get_backend("triton"), auto_devices=frozenset({DEVICE})))
    q, k, v, _ = _inputs(1, 4, 4, 48, 48, 16, seed=16)
    want = flash_attention_ref(q, k, v, Causal(), ALiBi(4).materialize(48, 48))
    monkeypatch.setattr(ALiBi, "materialize", lambda *a, **kw: pytest.fail("the ALiBi bias was materialised"))
    torch.testing.assert_close(attend(q, k, v, Causal(), bias=ALiBi(4)), want, rtol=2e-5, atol=2e-5)
    assert "3 slopes for 4 heads" in triton_supports(q, k, v, Causal(), ALiBi(3), 0.25, "softmax", 0.0, False)
    with pytest.raises(ValueError, match="ALiBi has 3 slopes but q has 4 heads"):
        flash_attention(q, k, v, Causal(), ALiBi(3))


DROPOUT_CASES = {
    "softmax-full-gqa": (None, "softmax", 2, 1),
    "softmax-window-bias": (lambda: Window(10, 5), "softmax", 4, 2),
    "softmax-segments&causal": (lambda: Segments(_random_ids(70, 3, 2, 8), _random_ids(90, 3, 2, 9)) & Causal(),
                                "softmax", 2, 2),
    "sigmoid-causal": (lambda: Causal(), "sigmoid", 2, 1),
}


@pytest.mark.parametrize("name", list(DROPOUT_CASES))
def test_dropout_equals_the_reference_with_the_kernels_draw(name):
    """Dropout in the kernel: the forward and every gradient (q, k, v, bias) equal the float64 reference given
    the same draw (dropout_scale), materialised by the same Philox call; GQA, masks, bias, sigmoid."""
    make_mask, score, heads, kv_heads = DROPOUT_CASES[name]
    mask = None if make_mask is None else make_mask()
    q, k, v, bias = _inputs(2, heads, kv_heads, 70, 90, 16, bias_shape=(1, heads, 70, 90), seed=31)
    for t in (q, k, v, bias):
        t.requires_grad_(True)
    torch.manual_seed(3)
    out = flash_attention(q, k, v, mask, bias, score=score, dropout_p=0.25)
    torch.manual_seed(3)
    draw = fa.dropout_scale(2, heads, 70, 90, 0.25, fa._draw_seed(), device=DEVICE)
    ref = flash_attention_ref(*(t.double() for t in (q, k, v)), mask, bias.double(), score=score,
                              dropout_scale=draw)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    got = [out] + list(torch.autograd.grad(out, (q, k, v, bias), grad))
    want = [ref] + list(torch.autograd.grad(ref, (q, k, v, bias), grad.double()))
    for label, a, w in zip(["out", "dq", "dk", "dv", "dbias"], got, want):
        err = (a.double() - w).abs().max().item()
        assert err <= 2e-5 * max(1.0, w.abs().max().item()), f"{label}: {err:.2e}"


def test_dropout_draw_statistics_and_reproducibility():
    """About p of the pairs are dropped, kept ones scaled by 1 / (1 - p); every (batch, head) has its own stream;
    torch.manual_seed reproduces a call, another seed changes it; fp16 runs; dropout_p = 0 is no dropout."""
    p = 0.2
    draw = fa.dropout_scale(2, 3, 128, 200, p, seed=1234, device=DEVICE)
    dropped = (draw == 0).double().mean().item()
    assert abs(dropped - p) < 0.006, dropped  # 153,600 draws: 6 mean standard deviations
    assert torch.allclose(draw[draw > 0], torch.full_like(draw[draw > 0], 1 / (1 - p)))
    assert not torch.equal(draw[0, 0], draw[0, 1]) and not torch.equal(draw[0, 0], draw[1, 0])
    assert torch.equal(draw, fa.dropout_scale(2, 3, 128, 200, p, seed=1234, device=DEVICE))
    assert not torch.equal(draw, fa.dropout_scale(2, 3, 128, 200, p, seed=1235, device=DEVICE))
    q, k, v, _ = _inputs(1, 2, 2, 40, 40, 16, dtype=torch.float16, seed=32)
    torch.manual_seed(9)
    first = flash_attention(q, k, v, Causal(), dropout_p=p)
    torch.manual_seed(9)
    assert torch.equal(flash_attention(q, k, v, Causal(), dropout_p=p), first)
    assert not torch.equal(flash_attention(q, k, v, Causal(), dropout_p=p), first)
    assert torch.equal(flash_attention(q, k, v, Causal(), dropout_p=0.0), flash_attention(q, k, v, Causal()))


def test_dropout_draws_of_every_batch_and_head_differ():
    """Every (batch, head) pair has its own Philox stream (offset ((b * 2**16 + h) << 32) + i * Nk + j): no two of
    the 3 x 3 pairs share a draw, (batch 0, head 1) and (batch 1, head 0) included. An offset from b + h would give
    those the same dropout pattern (correlated dropout across the batch), which the reference comparisons cannot
    see since the reference takes the kernel's own draw."""
    draw = fa.dropout_scale(3, 3, 8, 16, 0.5, seed=77, device=DEVICE).reshape(9, -1)
    assert ((draw == 0).double().mean() - 0.5).abs() < 0.1
    for i in range(9):
        for j in range(i + 1, 9):
            assert not torch.equal(draw[i], draw[j]), (divmod(i, 3), divmod(j, 3))


def test_radial_mask():
    from zoo.attention import Radial

    mask = Radial(4, 40, decay_factor=1.0, block_size=16, text_tokens=3)
    n = mask.seq_len
    q, k, v, _ = _inputs(1, 2, 1, n, n, 32, seed=12)
    _check(q, k, v, mask, None)


def test_block_sizes_override():
    """Non-square tiles (16 x 64) against the same mask at default tiles."""
    q, k, v, bias = _inputs(1, 2, 2, 97, 130, 40, bias_shape=(1, 1, 97, 130), seed=13)
    _check(q, k, v, Window(30, 2), bias, block=(16, 64))


# ------------------------------------------------------------------------------------------------
# Bias broadcasting and its gradient
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bias_shape",
    [(2, 2, 57, 70), (1, 2, 57, 70), (2, 1, 57, 70), (1, 1, 57, 70), (2, 2, 1, 70), (1, 1, 57, 1), (1, 2, 1, 1)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_bias_broadcast(bias_shape):
    q, k, v, bias = _inputs(2, 2, 1, 57, 70, 16, bias_shape=bias_shape, seed=14)
    _check(q, k, v, Causal(), bias)


def test_bias_is_read_without_copy():
    """A stride-0 expanded bias gives the same result as its compact form (and its gradient reduces)."""
    q, k, v, bias = _inputs(2, 2, 2, 40, 50, 16, bias_shape=(1, 2, 40, 50), seed=15)
    compact = _grads(lambda q_, k_, v_, b_: flash_attention(q_, k_, v_, Causal(), b_), q, k, v, bias)
    expanded = _grads(lambda q_, k_, v_, b_: flash_attention(q_, k_, v_, Causal(), b_.expand(2, 2, 40, 50)), q, k, v, bias)
    for a, b_ in zip(compact, expanded):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Sigmoid score
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mask_name,bias_shape",
    [("full", (1, 2, 97, 130)), ("segments&causal", (2, 1, 1, 130)), ("blocksparse-50pct-subtile", None)],
)
def test_sigmoid(mask_name, bias_shape):
    mask = Full() if mask_name == "full" else MASK_CASES[mask_name]()
    q, k, v, bias = _inputs(2, 2, 1, 97, 130, 32, bias_shape=bias_shape, seed=16)
    _check(q, k, v, mask, bias, score="sigmoid")


# ------------------------------------------------------------------------------------------------
# fp16
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mask_name,score,bias_shape,d",
    [
        ("causal", "softmax", (1, 2, 97, 130), 64),
        ("segments&causal", "softmax", None, 40),
        ("blocksparse-50pct-subtile", "softmax", (2, 1, 97, 130), 16),
        ("window-empty-rows", "sigmoid", (1, 2, 1, 130), 96),
    ],
)
def test_fp16(mask_name, score, bias_shape, d):
    mask = Causal() if mask_name == "causal" else MASK_CASES[mask_name]()
    q, k, v, bias = _inputs(2, 2, 1, 97, 130, d, bias_shape=bias_shape, dtype=torch.float16, seed=17)
    _check(q, k, v, mask, bias, score=score)


# ------------------------------------------------------------------------------------------------
# Fully masked rows: zero output, zero gradient
# ------------------------------------------------------------------------------------------------
def test_fully_masked_rows_are_zero():
    ids = torch.tensor([0] * 20 + [1] * 20 + [-1] * 9)  # 9 padding tokens
    q, k, v, bias = _inputs(1, 2, 1, 49, 49, 16, bias_shape=(1, 2, 49, 49), seed=18)
    out, dq, dk, dv, dbias = _check(q, k, v, Segments(ids) & Causal(), bias)
    assert (out[:, :, 40:] == 0).all() and (dq[:, :, 40:] == 0).all()
    assert (dk[:, :, 40:] == 0).all() and (dv[:, :, 40:] == 0).all()
    assert (dbias[:, :, 40:] == 0).all() and (dbias[:, :, :, 40:] == 0).all()
    # A bias of -inf that removes every allowed key of a row gives zeros too, and zero gradients.
    bias2 = bias.clone()
    bias2[:, :, 5] = float("-inf")
    out2, dq2, _, _, dbias2 = _check(q, k, v, Causal(), bias2)
    assert (out2[:, :, 5] == 0).all() and (dq2[:, :, 5] == 0).all() and (dbias2[:, :, 5] == 0).all()


# The interpreter computes the log2(e) scaling in NumPy, which warns where finfo.min overflows before the clamp.
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
def test_finfo_min_bias_is_a_finite_score():
    """A bias of torch.finfo(float32).min (Hugging Face's additive mask) is the smallest finite score, not a
    forbidden pair: a row with every key at that value attends uniformly (the mean of v), as SDPA, the torch
    backend and the float64 reference do, and a row with some keys at it ignores them. Its log2(e)-scaled value
    overflowed fp32 to -inf and emptied the row (zeros). Output and every gradient (q, k, v, bias) against the
    float64 reference; the backward's P must also be 1 / Nk there, not 1 (LSE = max + log Nk rounds to max)."""
    import torch.nn.functional as F

    q, k, v, bias = _inputs(1, 2, 1, 24, 40, 16, bias_shape=(1, 2, 24, 40), seed=31)
    low = torch.finfo(torch.float32).min
    bias[:, :, 3] = low  # every key of row 3, both heads
    bias[:, 1, 7] = low  # every key of row 7, head 1 only
    bias[:, :, 11, 5:] = low  # row 11: every key but 0..4
    out, _, _, dv, _ = _check(q, k, v, None, bias)
    torch.testing.assert_close(out[0, :, 3], v[0, 0].mean(0).expand(2, 16), rtol=1e-5, atol=1e-5)
    sdpa = F.scaled_dot_product_attention(q, k.expand(1, 2, 40, 16), v.expand(1, 2, 40, 16), attn_mask=bias)
    torch.testing.assert_close(out, sdpa, rtol=1e-5, atol=1e-5)
    assert dv.abs().max() > 0
    _, lse = flash_attention(q, k, v, None, bias, return_lse=True)
    # -3.4e38 * log2(e) saturates at -FLT_MAX in the kernel's base 2: a finite LSE below -2e38, not -inf.
    assert torch.isfinite(lse).all() and (lse[0, :, 3] < -2e38).all() and (lse[0, 0, 7] > -1e3)


# ------------------------------------------------------------------------------------------------
# LSE and merging partial results
# ------------------------------------------------------------------------------------------------
def test_lse_and_merge():
    q, k, v, _ = _inputs(1, 2, 1, 40, 90, 32, seed=19)
    out, lse = flash_attention(q, k, v, Causal(), return_lse=True)
    want_out, want_lse = flash_attention_ref(q.double(), k.double(), v.double(), Causal(), return_lse=True)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    # Attention over keys [0, 60) and [60, 90) separately, merged == attention over all 90 (causal,
    # bottom-right aligned: query i sees keys <= i + 50, so queries 0..9 see nothing in the second part).
    ids = torch.arange(90, device=DEVICE)
    first = Dense((ids[None, :] < 60).expand(40, 90)) & Causal()
    second = Dense((ids[None, :] >= 60).expand(40, 90)) & Causal()
    out_a, lse_a = flash_attention(q, k, v, first, return_lse=True)
    out_b, lse_b = flash_attention(q, k, v, second, return_lse=True)
    assert torch.equal(lse_b[:, :, :10], torch.full_like(lse_b[:, :, :10], -math.inf))
    assert (out_b[:, :, :10] == 0).all() and torch.isfinite(lse_b[:, :, 10:]).all()
    merged, merged_lse = merge_attention_states(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(merged, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_lse, lse, rtol=1e-5, atol=1e-5)


def test_lse_gradient():
    """The LSE output is differentiable: d(out . g_out + lse . g_lse) matches the float64 reference for
    q, k, v and bias, with empty rows (padding queries, LSE -inf) among them."""
    ids_q = torch.tensor([0] * 12 + [1] * 20 + [-1] * 5)
    ids_k = torch.tensor([0] * 30 + [1] * 28 + [-1] * 3)
    mask = Segments(ids_q, ids_k) & Causal()
    q, k, v, bias = _inputs(2, 2, 1, 37, 61, 16, bias_shape=(1, 2, 37, 61), seed=24)
    g = torch.Generator().manual_seed(25)
    g_out = torch.randn(2, 2, 37, 16, generator=g).to(DEVICE)
    g_lse = torch.randn(2, 2, 37, generator=g).to(DEVICE)
    results = []
    for fn, dtype in ((flash_attention, torch.float32), (flash_attention_ref, torch.float64)):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v, bias)]
        out, lse = fn(*leaves[:3], mask, leaves[3], return_lse=True)
        finite = torch.isfinite(lse)
        assert not finite.all() and finite.any()  # some rows are empty
        loss = (out * g_out.to(dtype)).sum() + (torch.where(finite, lse, 0.0) * g_lse.to(dtype)).sum()
        results.append([out, lse] + list(torch.autograd.grad(loss, leaves)))
    for name, got, want in zip(["out", "lse", "dq", "dk", "dv", "dbias"], *results):
        assert torch.isfinite(got).all() or name == "lse", name
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-4, atol=2e-5, msg=name)
    # Only the LSE used: gradients still flow (d_out is absent).
    q_leaf = q.clone().requires_grad_(True)
    _, lse = flash_attention(q_leaf, k, v, Causal(), return_lse=True)
    lse.sum().backward()
    want_q = q.double().requires_grad_(True)
    flash_attention_ref(want_q, k.double(), v.double(), Causal(), return_lse=True)[1].sum().backward()
    torch.testing.assert_close(q_leaf.grad.double(), want_q.grad, rtol=1e-4, atol=2e-5)


def test_attend_returns_the_kernels_lse():
    """attend(..., backend="triton", return_lse=True) gives the kernel's LSE (natural log, fp32) and its gradient,
    as the reference backend gives them; the kernel is also the automatic choice for such a call on CUDA."""
    q, k, v, bias = _inputs(1, 4, 2, 33, 70, 16, bias_shape=(1, 4, 1, 70), seed=27)
    mask = Window(12, 3)
    results = []
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v, bias)]
        out, lse = attend(*leaves[:3], mask, leaves[3], return_lse=True, backend=backend)
        assert lse.shape == (1, 4, 33) and lse.dtype == dtype
        g_lse = torch.linspace(-1, 1, 33, device=DEVICE, dtype=dtype)
        results.append([out, lse] + list(torch.autograd.grad(out.sum() + (lse * g_lse).sum(), leaves)))
    for name, got, want in zip(["out", "lse", "dq", "dk", "dv", "dbias"], *results):
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-4, atol=2e-5, msg=name)
    # a row whose every key is biased by finfo.min: the definition's LSE (-FLT_MAX), as the reference backend's
    low = torch.zeros(1, 1, 33, 70, device=DEVICE)
    low[..., 4, :] = torch.finfo(torch.float32).min
    got = [attend(q, k, v, None, low, return_lse=True, backend=name)[1] for name in ("triton", "torch")]
    assert got[0][0, 0, 4] == -torch.finfo(torch.float32).max
    torch.testing.assert_close(got[0], got[1], rtol=1e-5, atol=1e-5)
    leaves = [t.clone().requires_grad_(True) for t in (q, k)]  # (the LSE does not depend on v)
    lse_grads = [torch.autograd.grad(attend(*leaves, v, None, low, return_lse=True, backend=name)[1].sum(), leaves)
                 for name in ("triton", "torch")]
    for got_grad, want_grad in zip(*lse_grads):
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=2e-5)
    if HAS_CUDA:
        assert zb.select_backend((q, k, v, as_mask(mask), bias, 0.25, "softmax", 0.0, False), None, True).name == "triton"
    with pytest.raises(ValueError, match="score='softmax' only"):
        fa.triton_attention(q, k, v, as_mask(None), None, 0.25, "sigmoid", 0.0, False, return_lse=True)


def test_merged_partial_attention_trains():
    """Attention split over two key sets (as in ring / context-parallel attention) and merged with
    merge_attention_states has the gradients of one attention call, including rows that are empty in
    one part (LSE -inf there)."""
    q, k, v, _ = _inputs(1, 2, 1, 40, 90, 16, seed=26)
    ids = torch.arange(90, device=DEVICE)
    parts = [Dense((ids[None, :] < 60).expand(40, 90)) & Causal(), Dense((ids[None, :] >= 60).expand(40, 90)) & Causal()]

    def merged(q_, k_, v_, _b):
        (out_a, lse_a), (out_b, lse_b) = (flash_attention(q_, k_, v_, m, return_lse=True) for m in parts)
        return merge_attention_states(out_a, lse_a, out_b, lse_b)[0]

    got = _grads(merged, q, k, v, None)
    want = _grads(lambda q_, k_, v_, _b: flash_attention(q_, k_, v_, Causal()), q, k, v, None)
    for name, a, b_ in zip(["out", "dq", "dk", "dv"], got, want):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------------
# A seeded random walk through the cross product (lengths x head dims x GQA x masks x bias x score x dtype)
# ------------------------------------------------------------------------------------------------
def _random_mask(kind, nq, nk, g):
    def ids(n, batch):
        out = torch.sort(torch.randint(0, 3, (batch, n), generator=g), dim=-1).values
        if n > 3:
            out[:, n - max(1, n // 10) :] = -1  # padding tokens: empty rows / never-attended keys
        return out

    def blocks(block, density):
        return BlockSparse(torch.rand(2, 1, -(-nq // block), -(-nk // block), generator=g) < density, block)

    if kind == "window":
        return Window(int(torch.randint(0, 40, (), generator=g)), int(torch.randint(0, 10, (), generator=g)))
    if kind == "segments&causal":
        return Segments(ids(nq, 2), ids(nk, 2)) & Causal()
    if kind == "dense":
        return Dense(torch.rand(1, 1, nq, nk, generator=g) < 0.4)
    if kind == "blocksparse20":
        return blocks(64, 0.2)
    if kind == "blocksparse50|window":
        return blocks(16, 0.5) | Window(2, 2)
    return Causal()


@pytest.mark.parametrize("seed", range(24))
def test_random_grid(seed):
    g = torch.Generator().manual_seed(100 + seed)
    pick = lambda options: options[int(torch.randint(0, len(options), (), generator=g))]  # noqa: E731
    nq, nk = pick([(1, 7), (7, 97), (97, 130), (130, 257), (257, 97), (130, 1), (257, 130)])
    d = pick([16, 40, 64, 96])
    h, hkv = pick([(2, 1), (4, 2), (2, 2)])
    kind = pick(["window", "segments&causal", "dense", "blocksparse20", "blocksparse50|window", "causal"])
    bias_shape = pick([None, (1, h, nq, nk), (2, 1, nq, nk), (1, 1, 1, nk), (2, h, nq, 1)])
    score = pick(["softmax", "softmax", "sigmoid"])
    dtype = pick([torch.float32, torch.float16])
    q, k, v, bias = _inputs(2, h, hkv, nq, nk, d, bias_shape=bias_shape, dtype=dtype, seed=seed)
    _check(q, k, v, _random_mask(kind, nq, nk, g), bias, score=score)


# ------------------------------------------------------------------------------------------------
# attend() integration, capability check, errors, layouts
# ------------------------------------------------------------------------------------------------
def test_attend_backend_triton():
    q, k, v, bias = _inputs(2, 4, 2, 33, 65, 16, bias_shape=(1, 4, 33, 65), seed=20)
    mask = Window(10, 0)
    got = attend(q, k, v, mask, bias, backend="triton")
    want = attend(q, k, v, mask, bias, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_attend_uses_the_explicit_scale_in_the_kernel():
    """attend(scale=s, backend="triton") against the float64 reference at that scale, with and without a mask
    and a bias: s = 0.6 and 0.05, both far from the default 1/sqrt(16) = 0.25 (tests/test_attention.py checks the
    other backends the same way)."""
    q, k, v, bias = _inputs(1, 2, 1, 24, 40, 16, bias_shape=(1, 2, 24, 40), seed=27)
    for scale in (0.6, 0.05):
        for mask in (None, Window(8, 8)):
            for b in (None, bias):
                want = _naive_float64(*(t.double() for t in (q, k, v)), mask, None if b is None else b.double(),
                                      scale=scale)
                got = attend(q, k, v, mask, b, scale=scale, backend="triton")
                torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"scale={scale} mask={mask!r} bias={b is not None}: {m}")


@pytest.mark.parametrize("scale", [0.0, -0.7])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_zero_and_negative_scales_forward_and_gradients(scale, score):
    """scale=0 (uniform weights over the allowed keys) and a negative scale, as SDPA computes them: the kernel's
    forward and its q, k, v and bias gradients against float64 (the row maxima are taken over the scaled scores,
    and the backward multiplies dq and dk by the scale), with a causal mask whose first rows see one key and a
    bias; then through attend(backend="triton"). The kernel refused both ("scale must be a positive finite
    number"), and so did attend() for every backend."""
    q, k, v, bias = _inputs(1, 2, 1, 20, 33, 16, bias_shape=(1, 2, 20, 33), seed=31)
    _check(q, k, v, Causal(), bias, score=score, scale=scale)
    want = _naive_float64(*(t.double() for t in (q, k, v)), Window(4, 4), bias.double(), score=score, scale=scale)
    got = attend(q, k, v, Window(4, 4), bias, scale=scale, score=score, backend="triton")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_attend_computes_empty_inputs_without_launching_the_kernel():
    """attend(backend="triton") over a batch of 0, no queries or no keys: SDPA's result (empty, or zeros when
    Nk = 0) and its gradients, computed by attend() itself (a launch grid of 0 programs, or tiles over 0 keys,
    are not the kernel's to handle: flash_attention() still refuses empty tensors by name)."""
    import torch.nn.functional as F

    for q_shape, k_shape in (((0, 2, 5, 16), (0, 1, 7, 16)), ((1, 2, 0, 16), (1, 1, 7, 16)),
                             ((1, 2, 5, 16), (1, 1, 0, 16))):
        q = torch.randn(q_shape, device=DEVICE, requires_grad=True)
        k = torch.randn(k_shape, device=DEVICE, requires_grad=True)
        v = torch.randn(k_shape, device=DEVICE, requires_grad=True)
        out = attend(q, k, v, Causal(), backend="triton")
        want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        assert out.shape == want.shape
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        for got, peer in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
            torch.testing.assert_close(got, peer, rtol=0, atol=0)
    with pytest.raises(ValueError, match="flash_attention: empty input"):
        flash_attention(q, k, v)


def test_transformer_xl_layer_trains_through_the_kernel():
    """MultiHeadAttention(rel_pos="xl") (the Conformer layer): its query-dependent bias is a strided view
    (row stride Nq + Nk - 2) that needs its gradient; the kernel reads it in place and returns that gradient,
    so the layer's outputs and every parameter gradient equal the PyTorch backend's."""
    from zoo.attention import MultiHeadAttention, use_backend

    torch.manual_seed(0)
    layer = MultiHeadAttention(32, 2, qkv_bias=True, rel_pos="xl")
    x = torch.randn(2, 37, 32)
    results = {}
    for backend in ("torch", "triton"):
        with use_backend(backend):
            xx = x.clone().requires_grad_(True)
            out = layer(xx, mask=Causal())
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        results[backend] = [out.detach(), xx.grad] + [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad(set_to_none=True)
    for got, want in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_attend_picks_triton_and_falls_back(monkeypatch):
    """Automatic selection: where the "triton" backend is eligible (CUDA; here the interpreter is made
    eligible for CPU tensors) attend() picks it, with dropout too (its own draw: reproducible from torch's
    seed, equal to the reference with that draw), and a call it cannot run (return_weights) goes to another
    backend that gives the same result."""
    import dataclasses

    from zoo.attention import backends as zb

    zb.list_backends()  # registers the optional backends
    triton_backend = zb.get_backend("triton")
    monkeypatch.setitem(zb._BACKENDS, "triton", dataclasses.replace(triton_backend, auto_devices=frozenset({DEVICE})))
    q, k, v, bias = _inputs(1, 2, 1, 24, 40, 16, bias_shape=(1, 2, 24, 40), seed=28)
    mask = Window(8, 8)
    scale = 0.6  # not the default 1/sqrt(16): a path that dropped scale= would differ from the reference

    def chosen(dropout_p=0.0, return_weights=False):
        return zb.select_backend((q, k, v, mask, bias, scale, "softmax", dropout_p, return_weights), None).name

    assert chosen() == "triton" and chosen(dropout_p=0.2) == "triton"
    assert chosen(return_weights=True) != "triton"
    torch.manual_seed(0)
    got = attend(q, k, v, mask, bias, scale=scale, dropout_p=0.2)
    torch.manual_seed(0)
    assert torch.equal(attend(q, k, v, mask, bias, scale=scale, dropout_p=0.2), got)
    torch.manual_seed(0)
    draw = fa.dropout_scale(1, 2, 24, 40, 0.2, fa._draw_seed(), device=DEVICE)
    want = flash_attention_ref(q, k, v, mask, bias, scale=scale, dropout_scale=draw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    no_dropout = attend(q, k, v, mask, bias, scale=scale)
    assert not torch.allclose(got, no_dropout)  # dropout really ran
    out, weights = attend(q, k, v, mask, bias, scale=scale, return_weights=True)  # reference backend
    torch.testing.assert_close(out, no_dropout, rtol=1e-5, atol=1e-5)
    assert weights.shape == (1, 2, 24, 40)


def test_triton_supports_reasons():
    q, k, v, _ = _inputs(1, 2, 2, 16, 16, 16)
    args = (Full(), None, 0.25, "softmax")
    assert triton_supports(q, k, v, *args, 0.0, False) is None
    assert triton_supports(q, k, v, *args, 0.1, False) is None
    long = torch.zeros(1, 1, 2**16 + 1, 16, device=DEVICE).expand(1, 1, 2**16 + 1, 16)
    assert "random-number offsets" in triton_supports(long, long, long, *args, 0.1, False)
    assert "return_weights" in triton_supports(q, k, v, *args, 0.0, True)
    big = torch.zeros(1, 1, 4, 272, device=DEVICE)
    assert "head dim" in triton_supports(big, big, big, *args, 0.0, False)
    if not HAS_CUDA:
        assert "bfloat16" in triton_supports(q.bfloat16(), k.bfloat16(), v.bfloat16(), *args, 0.0, False)
    with pytest.raises(ValueError, match="return_weights"):
        attend(q, k, v, Causal(), return_weights=True, backend="triton")
    with pytest.raises(ValueError, match=r"dropout_p must be a number in \[0, 1\)"):
        flash_attention(q, k, v, dropout_p=1.0)


def test_bad_input_errors():
    q, k, v, _ = _inputs(1, 4, 2, 16, 24, 16)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        flash_attention(q, k[:, :1].expand(1, 3, 24, 16), v[:, :1].expand(1, 3, 24, 16))
    with pytest.raises(ValueError, match="head dim"):
        flash_attention(q, k[..., :8], v)
    with pytest.raises(TypeError, match="share a dtype"):
        flash_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="4-D"):
        flash_attention(q[0], k, v)
    with pytest.raises(ValueError, match="power of two"):
        flash_attention(q, k, v, block_m=24)
    with pytest.raises(ValueError, match="return_lse"):
        flash_attention(q, k, v, score="sigmoid", return_lse=True)
    with pytest.raises(ValueError, match="does not broadcast"):
        flash_attention(q, k, v, bias=torch.zeros(1, 3, 16, 24, device=DEVICE))
    with pytest.raises(ValueError, match="Segments ids"):
        flash_attention(q, k, v, Segments(torch.zeros(16, dtype=torch.long)))
    # numbers as attend() takes them: numpy scalars are numbers, a bool is not
    import numpy as np

    want = flash_attention(q, k, v, scale=0.25, block_m=16)
    torch.testing.assert_close(flash_attention(q, k, v, scale=np.float32(0.25), block_m=np.int64(16)), want)
    with pytest.raises(TypeError, match="flash_attention: scale must be a real number, got bool True"):
        flash_attention(q, k, v, scale=True)
    with pytest.raises(ValueError, match="flash_attention: scale must be a finite number, got nan"):
        flash_attention(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match="power of two"):
        flash_attention(q, k, v, block_m=True)
    if not HAS_CUDA:  # the interpreter computes bf16 wrongly: refused by the public function too, not only by attend
        with pytest.raises(TypeError, match="bfloat16 is computed wrongly"):
            flash_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
        with pytest.raises(TypeError, match="bfloat16 is computed wrongly"):
            flash_attention(q, k, v, bias=torch.zeros(1, 4, 16, 24, device=DEVICE, dtype=torch.bfloat16))


def test_ids_outside_int32_are_refused_by_the_capability_check():
    """The kernel reads Segments ids as int32: triton_supports says so (attend() then picks another backend)
    instead of accepting the call and failing in the forward."""
    from zoo.attention import as_mask
    from zoo.kernels.flash_attention import triton_supports

    q, k, v, _ = _inputs(1, 1, 1, 8, 8, 16)
    seg = Segments(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]) * 2**32)
    assert "outside int32" in triton_supports(q, k, v, as_mask(seg), None, 0.25, "softmax", 0.0, False)
    assert triton_supports(q, k, v, as_mask(Segments(torch.tensor([0] * 4 + [1] * 4))), None, 0.25, "softmax", 0.0,
                           False) is None
    with pytest.raises(ValueError, match="cannot run this call: Segments ids outside int32"):
        attend(q, k, v, seg, backend="triton")


def test_offsets_of_the_allocated_buffers_are_checked(monkeypatch):
    """The kernel's in-slice offsets are 32-bit for the buffers the launcher allocates too: the output (row
    stride Dv, longer than q's rows when Dv > D) and the fp32 dBias buffer (row stride Nk even for a stride-0
    expanded bias). triton_supports refuses such shapes (attend() falls back). Meta tensors: no memory."""
    monkeypatch.setattr(fa, "INTERPRET", True)  # meta tensors reach the shape checks on a GPU machine too
    args = (Full(), None, 0.25, "softmax", 0.0, False)
    q = torch.empty(1, 1, 9_000_000, 16, device="meta")
    k, v = torch.empty(1, 1, 64, 16, device="meta"), torch.empty(1, 1, 64, 256, device="meta")
    assert "output" in triton_supports(q, k, v, *args)
    assert triton_supports(q, k, k, *args) is None  # Dv = 16: 9M rows of 16 fit
    n = 48_000
    q = k = v = torch.empty(1, 1, n, 16, device="meta")
    per_key = torch.empty(n, device="meta", requires_grad=True).expand(1, 1, n, n)  # its own span is n
    reason = triton_supports(q, k, v, Full(), per_key, 0.25, "softmax", 0.0, False)
    assert "bias gradient buffer" in reason and "32-bit" in reason
    assert triton_supports(q, k, v, Full(), per_key.detach(), 0.25, "softmax", 0.0, False) is None  # no gradient


# The kernels' offset helpers, called by the probe kernel below (None where a version of the module lacks them).
_tile_list_offsets = getattr(fa, "_tile_list_offsets", None)
_blk_offsets = getattr(fa, "_blk_offsets", None)


@triton.jit
def _offsets_probe(Out, b, h, row, cnt_sb, cnt_sh, idx_sb, idx_sh, idx_w, row0, col0, blk_bq, blk_bk, bl_sm, bl_sn,
                   BLOCK: tl.constexpr):
    """Out[0], Out[1]: the tile-list offsets of row tile ``row`` (an int32 argument, as the kernels' program ids);
    Out[2:]: the BLK slot's offsets of the tile rows row0.. x cols col0.. (int32 vectors, as the kernels' offs_m)."""
    cnt_off, idx_off = _tile_list_offsets(b, h, row, cnt_sb, cnt_sh, idx_sb, idx_sh, idx_w)
    tl.store(Out, idx_off.to(tl.int64))
    tl.store(Out + 1, cnt_off.to(tl.int64))
    r = tl.arange(0, BLOCK)
    blk = _blk_offsets((row0 + r)[:, None], (col0 + r)[None, :], blk_bq, blk_bk, bl_sm, bl_sn)
    tl.store(Out + 2 + r[:, None] * BLOCK + r[None, :], blk.to(tl.int64))


def test_tile_list_and_block_map_offsets_are_64_bit():
    """The tile-list offset row x width and the BLK slot's (i // bq) x map row stride were int32 products that
    wrapped past 2**31 (Causal at 3M tokens with 64 x 64 tiles: row 46,874 of lists 46,875 wide; a 46,341 x 46,341
    BlockSparse map at 741k tokens, block 16), reading tiles at negative offsets. The kernels' own offset helpers,
    run at those sizes with arguments of the kernels' kinds (no tensor of that size is needed), give the exact
    offsets."""
    rows_of_tiles = width = -(-3_000_000 // 64)  # 46,875
    tokens, block = 741_456, 16
    map_side = tokens // block  # 46,341 tiles: the map has 2,147,488,281 entries
    probe_block = 16
    out = torch.zeros(2 + probe_block * probe_block, dtype=torch.int64, device=DEVICE)
    b, h, cnt_sb, cnt_sh, idx_sb, idx_sh = 2, 3, 10, 5, 7, 11  # small batch / head terms beside the large row term
    row0 = col0 = tokens - probe_block
    _offsets_probe[(1,)](out, b, h, rows_of_tiles - 1, cnt_sb, cnt_sh, idx_sb, idx_sh, width, row0, col0,
                         block, block, map_side, 1, BLOCK=probe_block)
    want_idx = b * idx_sb + h * idx_sh + (rows_of_tiles - 1) * width
    assert want_idx > 2**31 and out[0].item() == want_idx
    assert out[1].item() == b * cnt_sb + h * cnt_sh + (rows_of_tiles - 1) * 2
    r = torch.arange(probe_block)
    rows, cols = (row0 + r)[:, None], (col0 + r)[None, :]
    want_blk = (rows // block) * map_side + (cols // block)
    assert want_blk.max().item() > 2**31
    assert torch.equal(out[2:].view(probe_block, probe_block).cpu(), want_blk)


def test_grad_out_with_rows_past_32_bit_offsets_is_copied_not_refused(monkeypatch):
    """The usual head merge, out.transpose(1, 2).reshape(B, N, H * Dv), hands the backward a gradient whose rows are
    H * Dv apart. Past the kernels' 32-bit in-slice offsets the forward was accepted (q, k, v and the output rows of
    Dv fit) and backward() raised; the gradient is copied instead and the gradients equal the float64 reference.
    _MAX_OFFSET is lowered (as the grid tests lower _MAX_GRID_PAIRS) so that the boundary sits at a tiny size: the
    real one is N * H * Dv > 2**31 - 1, e.g. H = 40, Dv = 128, N > 419,430."""
    monkeypatch.setattr(fa, "_MAX_OFFSET", 1000)
    batch, heads, n, d = 1, 2, 40, 16  # q, k, v and output rows: 40 x 16 = 640; grad_out rows: 40 x 32 = 1280
    q, k, v, _ = _inputs(batch, heads, heads, n, n, d, seed=43)
    assert triton_supports(q, k, v, Causal(), None, 0.25, "softmax", 0.0, False) is None
    w = torch.randn(batch, n, heads * d, generator=torch.Generator().manual_seed(44)).to(DEVICE)

    def merged_loss_grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves, Causal())
        merged = out.transpose(1, 2).reshape(batch, n, heads * d)
        return torch.autograd.grad((merged * w.to(dtype)).sum(), leaves)

    got = merged_loss_grads(flash_attention, torch.float32)
    want = merged_loss_grads(flash_attention_ref, torch.float64)
    for name, a, b_ in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), b_, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def _fake_cuda(*shape, dtype, device="cuda:0"):
    """A tensor that reports a CUDA device, shape, strides and dtype without a GPU or memory (torch's FakeTensor):
    enough for the host-side checks and plans, which never read data."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return torch.empty(*shape, dtype=dtype, device=device)


def test_tile_override_keeps_the_backward_within_the_devices_shared_memory(monkeypatch):
    """block_m / block_n set the forward's tiles; the backward took them unchanged, and fp32 D = 128 at 128 x 64
    (a forward tile that fits an H100) needs 256 KB in the dK/dV pass, over its 227 KB: the forward ran and every
    backward config then failed. The backward keeps an override that its shared-memory bound (_bwd_smem) fits, and
    takes its own fitted tiles otherwise. Planned for an H100's shared memory (no GPU needed)."""
    from types import SimpleNamespace

    smem = fa._SMEM_LIMIT[90]
    monkeypatch.setattr(fa, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(shared_memory_per_block_optin=smem))
    q = k = v = _fake_cuda(1, 2, 256, 128, dtype=torch.float32)
    plan = fa._make_plan(q, k, v, Full(), 0.1, "softmax", block_m=128, block_n=64)
    assert plan.fwd_tiles == (128, 64)
    assert fa._bwd_smem((128, 64), 128 * 4) > smem  # the override itself does not fit the backward
    assert fa._bwd_smem(plan.bwd_tiles, 128 * 4) <= smem
    assert plan.bwd_tiles == fa._tiles(128, 128, torch.float32, smem, backward=True)
    plan = fa._make_plan(q, k, v, Full(), 0.1, "softmax", block_m=32, block_n=32)
    assert plan.fwd_tiles == plan.bwd_tiles == (32, 32)  # an override that fits is kept in both passes
    half = _fake_cuda(1, 2, 256, 64, dtype=torch.float16)
    plan = fa._make_plan(half, half, half, Full(), 0.1, "softmax", block_m=128)
    assert plan.fwd_tiles == plan.bwd_tiles == (128, 64)


def test_bf16_is_refused_under_the_interpreter_for_cuda_tensors_too(monkeypatch):
    """The interpreter computes bf16 wrongly whatever the tensors' device (it runs CUDA tensors on the host too), and
    the graph kernels refused it whenever TRITON_INTERPRET=1 was set; flash attention refused it for CPU tensors only,
    so a debugging run with TRITON_INTERPRET=1 on a GPU machine computed bf16 attention wrongly without a word."""
    monkeypatch.setattr(fa, "INTERPRET", True)  # as imported with TRITON_INTERPRET=1 (on a GPU machine too)
    q = k = v = _fake_cuda(1, 2, 16, 16, dtype=torch.bfloat16)
    args = (Full(), None, 0.25, "softmax", 0.0, False)
    assert "bfloat16" in (triton_supports(q, k, v, *args) or "")
    half = _fake_cuda(1, 2, 16, 16, dtype=torch.float16)
    bias = _fake_cuda(1, 2, 16, 16, dtype=torch.bfloat16)
    assert "bfloat16 bias" in (triton_supports(half, half, half, Full(), bias, 0.25, "softmax", 0.0, False) or "")
    with pytest.raises(TypeError, match="bfloat16 is computed wrongly by the Triton interpreter"):
        flash_attention(q, k, v)
    with pytest.raises(TypeError, match="bfloat16 is computed wrongly by the Triton interpreter"):
        flash_attention(half, half, half, bias=bias)


def test_on_device_of_enters_the_tensors_cuda_device(monkeypatch):
    """The launch guard is torch.cuda.device(t.device) for a CUDA tensor (Triton launches on the current device,
    not the tensors'), and nothing for a CPU one. torch.cuda.device is replaced by a recorder: no GPU needed."""
    from zoo.kernels._compile import on_device_of

    entered = []

    class RecordingDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", RecordingDevice)
    with on_device_of(_fake_cuda(2, 3, dtype=torch.float16, device="cuda:1")):
        pass
    assert entered == [torch.device("cuda", 1)]
    with on_device_of(torch.zeros(2)):
        pass
    assert entered == [torch.device("cuda", 1)]


def test_every_launch_runs_under_the_guard_of_the_tensors_device(monkeypatch):
    """The forward's and both backward launches (and dropout_scale's) run inside on_device_of, entered with the
    inputs (their device): a model moved to cuda:1 ran its kernels on the current device, cuda:0. The guard is
    replaced by a recorder and every launch checks that it is inside it."""
    guard = LaunchGuardRecorder()
    real_launch = fa._launch_over_pairs

    def checked_launch(kernel, *args, **meta):
        guard.note_launch()
        return real_launch(kernel, *args, **meta)

    monkeypatch.setattr(fa, "on_device_of", guard, raising=False)
    monkeypatch.setattr(fa, "_launch_over_pairs", checked_launch)
    q, k, v, _ = _inputs(1, 2, 1, 20, 24, 16, seed=45)
    q.requires_grad_(True)
    flash_attention(q, k.requires_grad_(True), v.requires_grad_(True), Causal()).sum().backward()
    assert guard.launches and all(guard.launches), f"launches outside the device guard: {guard.launches}"
    # forward; preprocess, dK/dV, dQ in backward
    assert len(guard.launches) == 4 and guard.entered == [q.device, q.device]

    class DropoutKernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: guard.note_launch()

    monkeypatch.setattr(fa, "_dropout_scale_kernel", DropoutKernel())
    guard.launches.clear()
    fa.dropout_scale(1, 2, 8, 8, 0.1, 0, device=DEVICE)
    assert guard.launches == [True] and guard.entered[-1] == torch.device(DEVICE)


def test_torch_func_transforms_are_refused_with_a_reason():
    """The kernel's autograd.Function has no torch.func rules: inside grad / vmap triton_supports says so (an
    automatic selection falls back) and an explicit backend="triton" raises that reason, not torch's "must
    override the setup_context staticmethod"."""
    q, k, v, _ = _inputs(1, 2, 2, 8, 8, 16)
    args = (Causal(), None, 0.25, "softmax", 0.0, False)
    assert triton_supports(q, k, v, *args) is None
    seen = []

    def loss(x):
        seen.append(triton_supports(x, k, v, *args))
        return attend(x, k, v, Causal(), backend="torch").sum()

    torch.func.grad(loss)(q)
    assert "torch.func" in seen[0] and "backend='torch'" in seen[0]
    with pytest.raises(ValueError, match="cannot run this call: inside a torch.func transform"):
        torch.func.grad(lambda x: attend(x, k, v, Causal(), backend="triton").sum())(q)
    with pytest.raises(ValueError, match="cannot run this call: inside a torch.func transform"):
        torch.func.vmap(lambda x: attend(x, k, v, Causal(), backend="triton"))(q[None])
    with pytest.raises(ValueError, match="flash_attention: inside a torch.func transform"):
        torch.func.vmap(lambda x: flash_attention(x, k, v, Causal()))(q[None])


def test_in_place_edit_of_the_mask_reaches_the_kernel():
    """The kernel's tile lists and in-kernel program are cached per mask object: an in-place edit of its tensor
    (a key-padding mask reused for the next batch) must rebuild them, as the dense reference sees it."""
    q, k, v, _ = _inputs(1, 2, 2, 64, 64, 16)
    keep = torch.zeros(1, 1, 1, 64, dtype=torch.bool, device=DEVICE)
    keep[..., :10] = True
    mask = Dense(keep)
    flash_attention(q, k, v, mask)
    keep[..., :] = True
    torch.testing.assert_close(flash_attention(q, k, v, mask), flash_attention_ref(q, k, v, Dense(keep.clone())),
                               atol=1e-5, rtol=1e-5)


def test_reassigned_mask_setting_reaches_the_kernel():
    """A setting reassigned between calls (window.left = 40) changes the mask's version, so the kernel's cached
    tile lists and in-kernel program are rebuilt (mutation audit 2026-12-07: without that step the kernel kept the
    old window, 1.91 off, and the in-place test above did not see it: its stale program still read the same
    tensor); also inside a combination."""
    q, k, v, _ = _inputs(1, 2, 2, 64, 64, 16)
    window = Window(4, 0)
    ids = torch.arange(64, device=DEVICE) // 32
    for mask, fresh in ((window, lambda: Window(40, 0)), (window & Segments(ids), lambda: Window(40, 0) & Segments(ids))):
        window.left = 4
        flash_attention(q, k, v, mask)
        window.left = 40
        torch.testing.assert_close(flash_attention(q, k, v, mask), flash_attention_ref(q, k, v, fresh()),
                                   atol=1e-5, rtol=1e-5)


def test_non_contiguous_layout():
    """(B, N, H, D) tensors viewed as (B, H, N, D) are read through their strides."""
    g = torch.Generator().manual_seed(21)
    q = torch.randn(2, 33, 2, 16, generator=g).to(DEVICE).transpose(1, 2)
    k = torch.randn(2, 45, 2, 16, generator=g).to(DEVICE).transpose(1, 2)
    v = torch.randn(2, 45, 2, 16, generator=g).to(DEVICE).transpose(1, 2)
    _check(q, k, v, Causal(), None)


def test_padded_head_dims_read_nothing_past_d():
    """The kernels pad D = 40 and Dv = 24 to 64 and 32 inside: q, k, v and the output gradient given as views whose
    rows continue, past D (Dv), into NaN-filled storage must not read it (0 * NaN is NaN in a dot product). Output
    and every gradient are finite and equal those from contiguous copies of the same values."""
    g = torch.Generator().manual_seed(43)

    def view(*shape, width):
        store = torch.full((*shape[:-1], width), float("nan"), device=DEVICE)
        store[..., : shape[-1]] = torch.randn(*shape, generator=g).to(DEVICE)
        return store[..., : shape[-1]]

    q, k, v, d_out = view(1, 2, 33, 40, width=64), view(1, 1, 45, 40, width=64), view(1, 1, 45, 24, width=32), \
        view(1, 2, 33, 24, width=32)
    results = []
    for tensors in ((q, k, v, d_out), tuple(t.contiguous() for t in (q, k, v, d_out))):
        leaves = [t.detach().requires_grad_(True) for t in tensors[:3]]  # views keep their strides
        out = flash_attention(*leaves, Window(20, 3))
        results.append([out] + list(torch.autograd.grad(out, leaves, tensors[3])))
    for name, got, want in zip(["out", "dq", "dk", "dv"], *results):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=name)


def test_autotune_key_buckets_lengths_and_list_widths():
    """The autotuned passes re-tune per mask predicate and per (length, widest tile list) power-of-two bucket,
    computed from host-side numbers only."""
    from types import SimpleNamespace

    for kernel in (fa._attn_fwd, fa._attn_bwd_dkdv, fa._attn_bwd_dq):
        assert {"TERM0", "TERM1", "TERM2", "NUM_TERMS", "tune_bucket"} <= set(kernel.keys)
    lists = SimpleNamespace(width=40)
    assert fa._tune_bucket(3000, 4096, lists) == fa._tune_bucket(2049, 2100, lists)  # same power of two
    assert fa._tune_bucket(4096, 4096, lists) != fa._tune_bucket(4097, 100, lists)
    assert fa._tune_bucket(4096, 4096, lists) != fa._tune_bucket(4096, 4096, SimpleNamespace(width=80))
    assert fa._tune_bucket(1, 1, SimpleNamespace(width=1)) == 0


def test_compiles_for_sm90_without_gpu():
    """The real (non-interpreted) kernels compile to sm_90 machine code with Triton's bundled ptxas and
    fit the shared memory: catches GPU-only compile errors on CPU-only CI. Runs in a subprocess
    because this process imported the kernels for the interpreter."""
    code = (
        "import torch\n"
        "from zoo.kernels.flash_attention import compile_check\n"
        "report = compile_check(90, torch.float16, 40, all_configs=False)\n"
        "assert len(report) == 5 and 'backward dk/dv' in report, report\n"
        "report = compile_check(90, torch.float16, 64, all_configs=False, terms=(1 | 2 | 4 | 128 | 256,), bias=0,\n"
        "                       dropout=False)  # SegmentWindow's position bands in both window slots\n"
        "assert len(report) == 4, report\n"
    )
    run_compiled(code)


def test_backward_tiles_fit_the_devices_shared_memory():
    """Backward tiles come from the device's shared memory per block, not its generation: sm_86 / 89 / 120 have
    99 KB, where fp32 D = 256 needs 16 x 16 tiles and sm_120 the A100's smaller tiles; A100 / H100 choices are
    unchanged. The estimate is checked by ptxas in test_compiles_for_99kb_devices_without_gpu."""
    f32, f16 = torch.float32, torch.float16
    limit = fa._SMEM_LIMIT
    assert limit[120] == limit[86] == 101376
    assert fa._tiles(256, 256, f32, limit[86], backward=True) == (16, 16)
    assert fa._tiles(128, 128, f32, limit[120], backward=True) == (32, 32)
    assert fa._tiles(256, 256, f16, limit[120], backward=True) == (32, 32)
    assert fa._tiles(256, 256, f32, limit[80], backward=True) == (32, 32)
    assert fa._tiles(128, 128, f32, limit[90], backward=True) == (32, 64)
    assert fa._tiles(64, 64, f16, limit[90], backward=True) == (64, 64)
    for arch, smem in limit.items():
        for dtype in (f16, f32):
            for block in (16, 32, 64, 128, 256):
                tiles = fa._tiles(block, block, dtype, smem, backward=True)
                assert fa._bwd_smem(tiles, block * dtype.itemsize) <= smem, (arch, dtype, block, tiles)


@pytest.mark.slow
def test_compiles_for_99kb_devices_without_gpu():
    """sm_86 (RTX 30xx / A10 / A40; sm_89 has the same 99 KB) and sm_120 (RTX 50xx): every pass of the largest
    program (dropout, bias, three mask terms) compiles with a config within 101,376 bytes at the combinations
    that overflowed with tiles chosen by generation (fp32 D = 256; sm_120 fp32 D = 128 and fp16 D = 256)."""
    code = (
        "import torch\n"
        "from zoo.kernels.flash_attention import compile_check\n"
        "for arch, dtype, d in ((86, torch.float32, 256), (120, torch.float32, 128), (120, torch.float16, 256)):\n"
        "    report = compile_check(arch, dtype, d, all_configs=False)\n"
        "    assert max(s for rows in report.values() for _, _, s in rows) <= 101376, (arch, dtype, d, report)\n"
    )
    run_compiled(code)


# ------------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["segments&causal", "blocksparse-50pct-subtile", "window|blocksparse", "dense&causal"])
def test_bf16_gpu(name):
    q, k, v, bias = _inputs(2, 2, 1, 97, 130, 64, bias_shape=(1, 2, 97, 130), dtype=torch.bfloat16, seed=30)
    _check(q, k, v, MASK_CASES[name](), bias)


def _new_features_check(case: str, dtype: torch.dtype) -> None:
    """This session's kernel features at a GPU size: a ChunkWindow through _check; dropout and in-kernel ALiBi
    against the float64 reference (forward and gradients) within the dtype's tolerance."""
    from zoo.attention import ALiBi

    q, k, v, _ = _inputs(2, 4, 2, 257, 300, 64, dtype=dtype, seed=33)
    if case == "chunkwindow":
        _check(q, k, v, ChunkWindow(32, left=2), None)
        return
    for t in (q, k, v):
        t.requires_grad_(True)
    grad = torch.randn(2, 4, 257, 64, generator=torch.Generator().manual_seed(34)).to(DEVICE, dtype)
    torch.manual_seed(35)
    if case == "dropout":
        out = flash_attention(q, k, v, Causal(), dropout_p=0.1)
        torch.manual_seed(35)
        draw = fa.dropout_scale(2, 4, 257, 300, 0.1, fa._draw_seed(), device=DEVICE)
        ref = flash_attention_ref(*(t.double() for t in (q, k, v)), Causal(), dropout_scale=draw)
    else:
        out = flash_attention(q, k, v, Causal(), ALiBi(4))
        ref = flash_attention_ref(*(t.double() for t in (q, k, v)), Causal(), ALiBi(4).materialize(257, 300).double())
    got = [out] + list(torch.autograd.grad(out, (q, k, v), grad))
    want = [ref] + list(torch.autograd.grad(ref, (q, k, v), grad.double()))
    for label, a, w in zip(["out", "dq", "dk", "dv"], got, want):
        err = (a.double() - w).abs().max().item()
        assert err <= 2 * ATOL[dtype] * max(1.0, w.abs().max().item()), f"{case} {label}: {err:.2e}"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", ["chunkwindow", "dropout", "alibi"])
def test_new_features_bf16_gpu(case):
    _new_features_check(case, torch.bfloat16)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("d", [64, 128, 256])
def test_large_gpu(d):
    q, k, v, bias = _inputs(2, 8, 2, 1000, 1537, d, bias_shape=(1, 8, 1000, 1537), dtype=torch.float16, seed=31)
    _check(q, k, v, Causal() & Window(300, 0), bias)


@pytest.mark.gpu
@gpu
def test_memory_is_linear_gpu():
    """Forward + backward allocate O(N) beyond the inputs (out, grads, LSE), far below one N x N matrix."""
    from zoo.attention import Radial

    radial = Radial(16, 1024)
    n = radial.seq_len
    q, k, v, _ = _inputs(1, 4, 4, n, n, 64, dtype=torch.bfloat16, seed=32)
    for t in (q, k, v):
        t.requires_grad_(True)
    go = torch.randn_like(q)
    flash_attention(q, k, v, radial).backward(go)  # compile, autotune, tile lists
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    flash_attention(q, k, v, radial).backward(go)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    out_and_grads = 4 * q.numel() * q.element_size()
    print(f"extra {extra / 2**20:.1f} MiB, out + grads {out_and_grads / 2**20:.1f} MiB")
    assert extra < 4 * out_and_grads + (32 << 20), extra
    assert extra < n * n * q.element_size() / 8, extra  # one (N, N) bf16 score matrix of one head


def _median_ms(fns, reps=10):
    """Interleaved timing (A B A B ...) after warm-up: median milliseconds per function."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    times = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times[i].append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


@pytest.mark.gpu
@gpu
def test_speed_gpu():
    """Dense forward within 2x of SDPA; 25% kept tiles at least 2x faster than dense (forward + backward)."""
    b, h, n, d = 2, 16, 8192, 128
    q, k, v, _ = _inputs(b, h, h, n, n, d, dtype=torch.bfloat16)
    for t in (q, k, v):
        t.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    nb = n // 128
    sparse = BlockSparse(torch.rand(nb, nb, generator=g) < 0.25, 128)
    ours = lambda: flash_attention(q, k, v)  # noqa: E731
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
    with torch.no_grad():
        t_ours, t_sdpa = _median_ms([ours, sdpa])
    print(f"dense fwd: zoo-triton {t_ours:.2f} ms, sdpa {t_sdpa:.2f} ms, ratio {t_sdpa / t_ours:.2f}")
    assert t_ours < 2.0 * t_sdpa
    dense_fb = lambda: flash_attention(q, k, v).sum().backward()  # noqa: E731
    sparse_fb = lambda: flash_attention(q, k, v, sparse).sum().backward()  # noqa: E731
    t_dense, t_sparse = _median_ms([dense_fb, sparse_fb], reps=5)
    print(f"fwd+bwd dense {t_dense:.2f} ms, 25% block-sparse {t_sparse:.2f} ms, ratio {t_dense / t_sparse:.2f}")
    assert t_sparse * 2.0 < t_dense
    assert math.isfinite(t_sparse)


def test_review_of_the_launcher_changes_extreme_biases_merge_late_refusal_and_grids(monkeypatch):
    """Review of the launcher changes: (1) a finite bias above FLT_MAX / log2(e) (finfo(float32).max) overflowed to
    +inf after scaling and the row to NaN; it attends to that key, as SDPA and the reference do. (2) Rows saturated
    by a finfo.min bias merged as the sum of the halves (both weights 1): the merge weights sum to one. (3) A direct
    flash_attention call whose dBias buffer overflows 32-bit offsets ran the forward and was refused only in
    backward. (4) compile_check guessed the smallest shared memory for an unknown arch (sm_100 checked 99 KB tiles
    that the device never runs). (5) dropout_scale put every (batch, head) pair on grid axis 2 (limit 65,535)."""
    import torch.nn.functional as F

    q, k, v, bias = _inputs(1, 2, 2, 8, 12, 16, bias_shape=(1, 2, 8, 12), seed=41)
    bias[:, :, 3, 5] = torch.finfo(torch.float32).max
    out = flash_attention(q, k, v, None, bias)
    torch.testing.assert_close(out[0, :, 3], v[0, :, 5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias), rtol=1e-5, atol=1e-5)

    low = torch.finfo(torch.float32).min
    halves = [torch.zeros(1, 2, 8, 12) for _ in range(2)]
    halves[0][..., 6:], halves[1][..., :6] = -math.inf, -math.inf  # keys 0..5, then 6..11
    for half in halves:
        half[:, :, 3] = torch.where(half[:, :, 3] == 0, low, half[:, :, 3])  # row 3: every key at finfo.min
    whole = torch.zeros(1, 2, 8, 12)
    whole[:, :, 3] = low
    (out_a, lse_a), (out_b, lse_b) = (flash_attention(q, k, v, None, h.to(DEVICE), return_lse=True) for h in halves)
    merged, _ = merge_attention_states(out_a, lse_a, out_b, lse_b)
    one_call = flash_attention(q, k, v, None, whole.to(DEVICE))
    torch.testing.assert_close(merged[0, :, 3], v[0].mean(1), rtol=1e-5, atol=1e-5)  # equal halves: the mean
    rows = [r for r in range(8) if r != 3]
    torch.testing.assert_close(merged[:, :, rows], one_call[:, :, rows], rtol=1e-5, atol=1e-5)

    monkeypatch.setattr(fa, "_MAX_OFFSET", 500)
    per_key = torch.zeros(24, device=DEVICE, requires_grad=True)
    q2, k2, v2, _ = _inputs(1, 1, 1, 24, 24, 16, seed=42)
    with pytest.raises(ValueError, match="bias gradient buffer.*un-expanded"):
        flash_attention(q2, k2, v2, None, per_key.expand(1, 1, 24, 24))
    monkeypatch.undo()

    assert fa._SMEM_LIMIT[100] == 232448
    with pytest.raises(ValueError, match="no shared-memory size known for sm_75"):
        fa.compile_check(75)

    grids = []

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(fa, "_dropout_scale_kernel", Spy())
    fa.dropout_scale(20000, 4, 49, 49, 0.1, 0, device="meta")
    assert grids == [(80000, 2, 2)]  # pairs on axis 0 (2**31 - 1); the 32 x 32 tiles on axes 1 and 2


# ------------------------------------------------------------------------------------------------
# Host side: cache keys, LSE gradients of empty rows, gradient layouts, input checks, precision, autotune keys
# ------------------------------------------------------------------------------------------------
def test_one_mask_object_reused_at_growing_key_lengths():
    """KV-cache decoding and chunked prefill call the kernel with one mask object while Nk grows: the cached tile
    lists and predicate program are per (Nq, Nk), so each call equals the float64 reference at its own lengths
    (Causal / Window bands are bottom-right aligned and move with Nk - Nq)."""
    for mask in (Causal(), Window(3, 0)):
        for k_len in (16, 40, 16):
            q, k, v, _ = _inputs(1, 1, 1, 8, k_len, 16, seed=50 + k_len)
            want = flash_attention_ref(q.double(), k.double(), v.double(), mask)
            torch.testing.assert_close(flash_attention(q, k, v, mask).double(), want, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{mask} at Nk={k_len}: {m}")


def test_nan_lse_gradient_of_empty_rows_is_dropped():
    """Partial results merged by torch.logaddexp on their LSEs (ring / context-parallel attention): for a row that
    sees no key in either part, logaddexp(-inf, -inf)'s backward sends NaN as that row's LSE gradient. The row's
    probabilities are all zero, so the true gradient through it is zero: q, k, v gradients stay finite and equal
    the float64 reference, whose LSE term covers only the rows that see a key."""
    mask = Window(-3, 5)  # keys 3..5 after the query (bottom-right aligned): the last 3 rows see nothing
    q, k, v, _ = _inputs(1, 1, 1, 20, 20, 16, seed=51)
    g = torch.Generator().manual_seed(52)
    g_out, g_lse = torch.randn(1, 1, 20, 16, generator=g).to(DEVICE), torch.randn(1, 1, 20, generator=g).to(DEVICE)

    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = flash_attention(*leaves, mask, return_lse=True)
    empty = torch.isneginf(lse.detach())
    assert empty.any() and not empty.all()
    merged = torch.logaddexp(lse, torch.full_like(lse, -math.inf))  # the other part saw nothing either
    loss = (out * g_out).sum() + (torch.where(empty, 0.0, merged) * g_lse).sum()
    got = torch.autograd.grad(loss, leaves)

    leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    out64, lse64 = flash_attention_ref(*leaves64, mask, return_lse=True)
    seen = ~empty
    loss64 = (out64 * g_out.double()).sum() + (lse64[seen] * g_lse.double()[seen]).sum()
    want = torch.autograd.grad(loss64, leaves64)
    for name, a, b_ in zip(("dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        torch.testing.assert_close(a.double(), b_, rtol=1e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")


def test_grad_out_with_a_non_unit_last_stride_is_copied():
    """The output used through a transpose (out.transpose(-1, -2) @ w, einsum layouts) gets a gradient whose last
    stride is not 1: the backward copies it instead of refusing it, and the gradients equal the float64 reference."""
    q, k, v, _ = _inputs(1, 2, 1, 24, 24, 16, seed=53)
    w = torch.randn(1, 2, 16, 24, generator=torch.Generator().manual_seed(54)).to(DEVICE)

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves, Causal())
        return torch.autograd.grad((out.transpose(-1, -2) * w.to(dtype)).sum(), leaves)

    for name, a, b_ in zip(("dq", "dk", "dv"), grads(flash_attention, torch.float32),
                           grads(flash_attention_ref, torch.float64)):
        torch.testing.assert_close(a.double(), b_, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_k_and_v_with_different_head_counts_are_refused():
    """k and v must have the same number of heads (the kernel reads v at k's head index): a mismatch is refused by
    name, not run past the end of v."""
    q, k, _, _ = _inputs(1, 4, 2, 8, 8, 16)
    v = k[:, :1].clone()  # 1 head, k has 2
    with pytest.raises(ValueError, match=r"k \(1, 2, 8, 16\) and v \(1, 1, 8, 16\) must agree on heads"):
        flash_attention(q, k, v)


def test_row_broadcast_bias_gradient_buffer_is_checked_at_16_row_tiles(monkeypatch):
    """A bias broadcast over rows that needs its gradient gets an fp32 buffer of one row of Nk per query tile, and
    query tiles can be as small as 16 rows: the 32-bit offset check counts cdiv(Nq, 16) rows. At Nq = 2**20 that is
    65,536 rows, so Nk = 32,769 overflows (2,147,549,184 > 2**31 - 1) and Nk = 32,767 fits. Meta tensors."""
    monkeypatch.setattr(fa, "INTERPRET", True)  # meta tensors reach the shape checks on a GPU machine too
    q_len = 2**20
    q = torch.empty(1, 1, q_len, 16, device="meta")
    for k_len, refused in ((32_769, True), (32_767, False)):
        k = torch.empty(1, 1, k_len, 16, device="meta")
        per_key = torch.empty(k_len, device="meta", requires_grad=True).expand(1, 1, 1, k_len)
        reason = triton_supports(q, k, k, Full(), per_key, 0.25, "softmax", 0.0, False)
        if refused:
            assert reason is not None and "bias gradient buffer (65536 rows" in reason, reason
        else:
            assert reason is None, reason
        assert triton_supports(q, k, k, Full(), per_key.detach(), 0.25, "softmax", 0.0, False) is None


def test_fp32_dots_ask_for_ieee_precision_and_launches_key_on_both_lengths(monkeypatch):
    """fp32 inputs are computed at fp32 precision (input_precision "ieee") unless torch's TF32 matmul flag is set
    for CUDA; half precision takes "tf32" (ignored for 16-bit inputs). Every tl.dot in the kernels takes the plan's
    DOT_PREC and every launch passes it. The interpreter ignores input_precision, so this is checked on the host.
    Each autotuned launch keys on both lengths (a growing KV cache re-tunes when Nk changes bucket)."""
    import inspect
    import re

    source = inspect.getsource(fa)
    dots = re.findall(r"tl\.dot\(([^\n]*)", source)
    assert dots and all("input_precision=DOT_PREC" in call for call in dots), dots

    q = torch.zeros(1, 1, 8, 16, device=DEVICE)
    assert fa._make_plan(q, q, q, Full(), 0.25, "softmax").dot_prec == ("tf32" if HAS_CUDA and
                                                                      torch.backends.cuda.matmul.allow_tf32 else "ieee")
    monkeypatch.setattr(fa, "INTERPRET", True)  # no device query for the fake CUDA tensors below
    fp32, fp16 = _fake_cuda(1, 1, 8, 16, dtype=torch.float32), _fake_cuda(1, 1, 8, 16, dtype=torch.float16)
    user_flag = torch.backends.cuda.matmul.allow_tf32  # a property of torch's cuBLAS module: set and restored
    try:
        for allow_tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
            plan32 = fa._make_plan(fp32, fp32, fp32, Full(), 0.25, "softmax")
            assert plan32.dot_prec == ("tf32" if allow_tf32 else "ieee")
            assert fa._make_plan(fp16, fp16, fp16, Full(), 0.25, "softmax").dot_prec == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = user_flag
    monkeypatch.undo()

    launches, buckets = [], []
    launch, bucket = fa._launch_over_pairs, fa._tune_bucket

    def spy_launch(kernel, *args, **meta):
        launches.append((getattr(kernel, "__name__", None) or getattr(kernel.fn, "__name__", "?"),
                         meta.get("DOT_PREC", "n/a")))
        return launch(kernel, *args, **meta)

    def spy_bucket(q_len, k_len, lists):
        buckets.append((q_len, k_len))
        return bucket(q_len, k_len, lists)

    monkeypatch.setattr(fa, "_launch_over_pairs", spy_launch)
    monkeypatch.setattr(fa, "_tune_bucket", spy_bucket)
    q, k, v, _ = _inputs(1, 1, 1, 8, 40, 16, seed=55)
    q.requires_grad_(True)
    flash_attention(q, k, v, Causal()).sum().backward()
    dot_launches = [prec for _, prec in launches if prec != "n/a"]
    assert len(dot_launches) == 3 and set(dot_launches) == {"tf32" if HAS_CUDA and
                                                             torch.backends.cuda.matmul.allow_tf32 else "ieee"}, launches
    assert buckets == [(8, 40)] * 3
