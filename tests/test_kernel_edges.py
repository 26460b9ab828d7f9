"""The EDGE slot of the block-sparse flash-attention kernel: ``zoo.attention.Edges`` (kNN neighbourhoods, graph
edges) evaluated in the kernel from a tile-compressed bitmask (kernels/block_index.py, ``edge_bitmask``) instead of
a dense Nq x Nk mask.

* The lowered program equals the mask's dense pattern (``MaskProgram.evaluate``, the PyTorch reading of what the
  kernels read), holds no Nq x Nk tensor, and is cached per (mask, lengths, device).
* attend(..., backend="triton") forward and dq / dk / dv against the float64 reference on the mask's dense pattern,
  held to tests/test_kernels_flash.py's rule (DESIGN.md): |kernel - float64| <= 2 |PyTorch at the same precision -
  float64| + atol. Cases: kNN on random clouds, random graphs with duplicate edges and queries without an incoming
  edge, bipartite Nq != Nk, shared (2, E) and batched (B, 2, E) graphs with padding, edges on the bit-tile and
  kernel-tile boundaries at lengths 1, 7, 97, 130, kernel tiles smaller and larger than the 64 x 64 bit tiles,
  GQA, fp16, and Edges combined with Causal, Window(0, 0) and Segments.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before the kernel module is imported).
"""
from __future__ import annotations

import pytest
import torch

# tests/triton_interpreter.py
from triton_interpreter import in_process_mark, prepare, run_in_fresh_process

_LATE = prepare()  # TRITON_INTERPRET=1 without a GPU, before the kernel module is imported

triton = pytest.importorskip("triton")

from attention_reference import naive_attention  # noqa: E402  (tests/attention_reference.py)
from zoo.attention import Causal, Edges, Segments, Window, attend  # noqa: E402
from zoo.geometry import morton_order  # noqa: E402
from zoo.kernels import flash_attention as fa  # noqa: E402
from zoo.kernels.block_index import (  # noqa: E402
    EDGE_TILE_K,
    EDGE_TILE_Q,
    SLOT_DENSE,
    SLOT_EDGE,
    SLOT_SEG,
    SLOT_WIN0,
    edge_bitmask,
    lower_mask,
    needs_dense_fallback,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
in_process = in_process_mark(_LATE, fa, "test_kernel_edge_tests_in_a_fresh_process")
# The interpreter converts loaded scalars with a NumPy deprecation warning on every loop bound.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3}


# ------------------------------------------------------------------------------------------------
# Graphs
# ------------------------------------------------------------------------------------------------
def _random_graph(nq, nk, num_edges, seed, no_edge_into=()):
    """(2, E) random edges (sources < nk, targets < nq) with every 7th edge listed twice, and no edge into the
    queries ``no_edge_into``."""
    g = torch.Generator().manual_seed(seed)
    ei = torch.stack([torch.randint(0, nk, (num_edges,), generator=g), torch.randint(0, nq, (num_edges,), generator=g)])
    for query in no_edge_into:
        ei = ei[:, ei[1] != query]
    return torch.cat([ei, ei[:, ::7]], dim=1)  # duplicates: one allowed pair each


def _boundary_graph(nq, nk):
    """Edges on the bit tiles' and the kernel tiles' borders (0, 31, 32, 63, 64, 65, 95, 127, 128, 129) in both
    directions, plus the diagonal of the first 20 queries, cut to the lengths."""
    cuts = torch.tensor([0, 1, 15, 16, 31, 32, 33, 63, 64, 65, 95, 96, 127, 128, 129])
    src, dst = torch.meshgrid(cuts[cuts < nk], cuts[cuts < nq], indexing="ij")
    diag = torch.arange(min(20, nq, nk))
    return torch.cat([torch.stack([src.reshape(-1), dst.reshape(-1)]), torch.stack([diag, diag])], dim=1)


def _padded_batch(graphs):
    """(B, 2, E) from per-row (2, E_b) graphs, shorter rows padded with (-1, -1) columns."""
    width = max(ei.shape[1] for ei in graphs)
    return torch.stack([torch.nn.functional.pad(ei, (0, width - ei.shape[1]), value=-1) for ei in graphs])


def _cloud(batch, n, seed):
    return torch.rand(batch, n, 3, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# The lowered program
# ------------------------------------------------------------------------------------------------
def _program_cases():
    nq, nk = 130, 97
    graph = _random_graph(nq, nk, 700, seed=1, no_edge_into=(3, 129))
    square = _random_graph(nq, nq, 600, seed=2)
    ids = torch.arange(nq) // 40
    return {
        "shared": (lambda: Edges(graph), nq, nk, (SLOT_EDGE,)),
        "batched-padded": (lambda: Edges(_padded_batch([graph, _random_graph(nq, nk, 300, seed=3)])), nq, nk,
                           (SLOT_EDGE,)),
        "boundaries-1x7": (lambda: Edges(_boundary_graph(1, 7)), 1, 7, (SLOT_EDGE,)),
        "boundaries-130x130": (lambda: Edges(_boundary_graph(130, 130)), 130, 130, (SLOT_EDGE,)),
        "edges&causal": (lambda: Edges(square) & Causal(), nq, nq, (SLOT_WIN0 | SLOT_EDGE,)),
        "edges|self-loops": (lambda: Edges(square) | Window(0, 0), nq, nq, (SLOT_EDGE, SLOT_WIN0)),
        "edges&segments": (lambda: Edges(square) & Segments(ids), nq, nq, (SLOT_SEG | SLOT_EDGE,)),
        "knn-batched": (lambda: Edges.knn(_cloud(2, 97, seed=4), 6), 97, 97, (SLOT_EDGE,)),
        "no-edges|self-loops": (lambda: Edges(torch.zeros(2, 0, dtype=torch.long)) | Window(0, 0), 70, 70,
                                (SLOT_EDGE, SLOT_WIN0)),
    }


PROGRAM_CASES = _program_cases()


@pytest.mark.parametrize("name", list(PROGRAM_CASES))
def test_lowered_program_is_in_kernel_and_equals_the_dense_mask(name):
    """Pure Edges masks and their combinations lower to the EDGE slot (no dense fallback), and the program read
    the kernels' way equals the mask's dense pattern for every batch row."""
    make, nq, nk, terms = PROGRAM_CASES[name]
    mask = make()
    program = lower_mask(mask, nq, nk, "cpu")
    assert program.exact_in_kernel and program.dense is None, program.description
    assert program.terms == terms, program.description
    assert not needs_dense_fallback(mask, nq, nk)
    table, words = program.edge
    assert table.dtype == words.dtype == torch.int32
    assert table.shape == (mask.batch_size, -(-nq // EDGE_TILE_Q), -(-nk // EDGE_TILE_K))
    assert words.shape[1:] == (EDGE_TILE_Q, EDGE_TILE_K // 32)
    want = mask.dense(nq, nk).expand(mask.batch_size, 1, nq, nk)
    assert torch.equal(program.evaluate(nq, nk).expand_as(want), want)


def test_bitmask_layout_and_the_sign_bit():
    """Bit (j % 32) of words[t, i % 64, (j % 64) // 32] is the edge j -> i; a word holding bit 31 is negative in
    int32 (two's complement), a word with all 32 bits is -1, and the kernel reads both like any other."""
    nq, nk = 70, 130
    full_word = torch.stack([torch.arange(96, 128), torch.full((32,), 65)])  # query 65: keys 96..127, all bits
    ei = torch.cat([torch.tensor([[31, 63, 127, 0], [0, 0, 1, 69]]), full_word], dim=1)
    table, words = edge_bitmask(Edges(ei), nq, nk, "cpu")
    assert table.tolist() == [[[0, 1, -1], [2, 3, -1]]]  # bit tiles in (row, column) order
    assert words[0, 0].tolist() == [-(2**31), -(2**31)]  # query 0, keys 31 and 63: bit 31 of words 0 and 1
    assert words[1, 1].tolist() == [0, -(2**31)]  # query 1, key 127 (tile (0, 1))
    assert words[0, 1].tolist() == [0, 0]
    assert words[3, 1].tolist() == [0, -1]  # query 65 (row 1 of tile (1, 1)), keys 96..127
    assert words[2, 5].tolist() == [1, 0]  # query 69, key 0
    assert int((words != 0).sum()) == 5
    mask = Edges(ei)
    assert torch.equal(lower_mask(mask, nq, nk, "cpu").evaluate(nq, nk)[0, 0], mask.dense(nq, nk)[0, 0])


def test_no_dense_tensor_for_knn_on_a_morton_ordered_cloud():
    """k = 8 nearest neighbours of 4096 points in Morton order: the lowered program's buffers hold a small
    fraction of Nq x Nk entries (no dense mask), and the kernel is not refused above the dense-fallback limit."""
    n, k = 4096, 8
    pos = torch.rand(n, 3, generator=torch.Generator().manual_seed(5))
    mask = Edges.knn(pos[morton_order(pos)], k)
    program = lower_mask(mask, n, n, "cpu")
    assert program.exact_in_kernel and program.terms == (SLOT_EDGE,) and program.dense is None
    table, words = program.edge
    entries = table.numel() + words.numel()
    assert program.nbytes() == 4 * entries  # nothing else is read: no dense mask, no ids
    assert entries < n * n / 100, entries  # measured: 100,224 entries, 1 / 167 of Nq x Nk
    assert words.shape[0] < n * k / 32, words.shape  # non-empty bit tiles (measured 751 = E / 44), not one per edge
    # pure Edges above the limit a dense copy would have: served in-kernel, not refused
    big = 20000
    assert big * big > fa.DENSE_FALLBACK_LIMIT
    q = torch.empty(1, 1, big, 16, device=DEVICE)
    wide = Edges(torch.tensor([[0, big - 1], [big - 1, 0]]))
    assert not needs_dense_fallback(wide, big, big)
    if fa.INTERPRET or DEVICE == "cuda":
        assert fa.triton_supports(q, q, q, wide, None, None, "softmax", 0.0, False) is None


def test_what_still_falls_back():
    """Two different Edges masks in one program have no in-kernel form: one dense mask, still exact."""
    a, b = _random_graph(40, 40, 100, seed=6), _random_graph(40, 40, 100, seed=7)
    for mask in (Edges(a) & Edges(b), Edges(a) | Edges(b)):
        program = lower_mask(mask, 40, 40, "cpu")
        assert not program.exact_in_kernel and program.terms == (SLOT_DENSE,) and needs_dense_fallback(mask, 40, 40)
        assert torch.equal(program.evaluate(40, 40)[0, 0], mask.dense(40, 40)[0, 0])
    same = Edges(a)
    assert lower_mask(same | (same & Causal()), 40, 40, "cpu").exact_in_kernel  # one Edges object, two terms


def test_bitmask_cached_per_edges_object_and_rebuilt_after_an_edit():
    """The bitmask is built once per (Edges, lengths, device): ``Edges & Causal`` made anew each step reuses it;
    an in-place edit of edge_index rebuilds it."""
    ei = _random_graph(50, 50, 120, seed=8)
    edges = Edges(ei)
    first = lower_mask(edges & Causal(), 50, 50, "cpu").edge
    again = lower_mask(edges & Causal(), 50, 50, "cpu").edge
    assert first[0] is again[0] and first[1] is again[1]
    assert edge_bitmask(edges, 50, 60, "cpu")[0].shape == (1, 1, 1)  # other lengths: another entry
    ei[:, 0] = torch.tensor([49, 0])
    edited = edge_bitmask(edges, 50, 50, "cpu")
    assert edited[1] is not first[1]
    assert torch.equal(lower_mask(edges, 50, 50, "cpu").evaluate(50, 50)[0, 0], edges.dense(50, 50)[0, 0])


def test_bad_input():
    with pytest.raises(TypeError, match="expected an Edges mask"):
        edge_bitmask(Causal(), 4, 4, "cpu")
    with pytest.raises(ValueError, match="source \\(key\\) index 9"):
        edge_bitmask(Edges(torch.tensor([[9], [0]])), 4, 4, "cpu")


# ------------------------------------------------------------------------------------------------
# The kernel: forward and gradients against float64
# ------------------------------------------------------------------------------------------------
def _inputs(b, h, hkv, nq, nk, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g)
    k = torch.randn(b, hkv, nk, d, generator=g)
    v = torch.randn(b, hkv, nk, d, generator=g)
    return tuple(t.to(DEVICE, dtype) for t in (q, k, v))


def _grads(fn, q, k, v):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    return [out.detach()] + [g.detach() for g in torch.autograd.grad(out, leaves, d_out)]


def _check(q, k, v, mask, block=None):
    """Kernel (attend's "triton" backend, or flash_attention at forced tiles) vs the float64 reference, with
    PyTorch at the same precision as the yardstick; the reference itself equals tests/attention_reference.py's
    explicit attention on the dense pattern. Returns the kernel's [out, dq, dk, dv]."""
    nq, nk = q.shape[2], k.shape[2]

    def ours(q_, k_, v_):
        if block is None:
            return attend(q_, k_, v_, mask, backend="triton")
        return fa.flash_attention(q_, k_, v_, mask, block_m=block[0], block_n=block[1])

    got = _grads(ours, q, k, v)
    base = _grads(lambda q_, k_, v_: attend(q_, k_, v_, mask, backend="torch"), q, k, v)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    want = _grads(lambda q_, k_, v_: fa.flash_attention_ref(q_, k_, v_, mask), q64, k64, v64)
    allowed = mask.dense(nq, nk, q.device)
    check = _grads(lambda q_, k_, v_: naive_attention(q_, k_, v_, allowed, None, q.shape[-1] ** -0.5, "softmax"),
                   q64, k64, v64)
    for name, w, c in zip(("out", "dq", "dk", "dv"), want, check):
        torch.testing.assert_close(w, c, rtol=1e-9, atol=1e-9, msg=lambda m: f"flash_attention_ref {name}: {m}")
    for name, a, b_, w in zip(("out", "dq", "dk", "dv"), got, base, want):
        assert a.shape == w.shape and a.dtype == q.dtype and torch.isfinite(a).all(), name
        err = (a.double() - w).abs().max().item()
        err_torch = (b_.double() - w).abs().max().item()
        atol = ATOL[q.dtype] * max(1.0, w.abs().max().item())
        assert err <= 2 * err_torch + atol, f"{name}: kernel err {err:.3g} vs torch err {err_torch:.3g}"
    return got


def _kernel_cases():
    square = _random_graph(130, 130, 900, seed=10, no_edge_into=(5, 77))
    bipartite = _random_graph(97, 130, 800, seed=11, no_edge_into=(0,))
    ids = torch.arange(130) // 45
    # (mask, B, H, Hkv, Nq, Nk, D, dtype, forced tiles or None, queries without an incoming edge)
    return {
        "knn-batched-cloud-gqa": (lambda: Edges.knn(_cloud(2, 97, seed=12), 6), 2, 2, 1, 97, 97, 16,
                                  torch.float32, None, ()),
        "random-graph-duplicates": (lambda: Edges(square), 1, 2, 1, 130, 130, 16, torch.float32, None, (5, 77)),
        "bipartite-97x130": (lambda: Edges(bipartite), 1, 2, 2, 97, 130, 16, torch.float32, None, (0,)),
        "batched-padded-130x97": (lambda: Edges(_padded_batch([_random_graph(130, 97, 500, seed=13, no_edge_into=(9,)),
                                                               _random_graph(130, 97, 90, seed=14)])),
                                  2, 1, 1, 130, 97, 16, torch.float32, None, ()),
        "boundaries-1x7": (lambda: Edges(_boundary_graph(1, 7)), 1, 1, 1, 1, 7, 16, torch.float32, None, ()),
        "boundaries-7x1": (lambda: Edges(_boundary_graph(7, 1)), 1, 1, 1, 7, 1, 16, torch.float32, None, (2, 6)),
        # kernel tiles of 16 x 16 (several per bit tile) and 128 x 128 (several bit tiles per kernel tile)
        "boundaries-130x97-tiles16": (lambda: Edges(_boundary_graph(130, 97)), 1, 1, 1, 130, 97, 16, torch.float32,
                                      (16, 16), (20, 100)),
        "random-130x130-tiles128": (lambda: Edges(square), 1, 1, 1, 130, 130, 16, torch.float32, (128, 128), (5,)),
        "knn-fp16": (lambda: Edges.knn(_cloud(1, 97, seed=15)[0], 8), 1, 2, 1, 97, 97, 32, torch.float16, None, ()),
        "edges&causal": (lambda: Edges(square) & Causal(), 1, 2, 1, 130, 130, 16, torch.float32, None, (5,)),
        "edges|self-loops": (lambda: Edges(square) | Window(0, 0), 1, 1, 1, 130, 130, 16, torch.float32, None, ()),
        "edges&segments": (lambda: Edges(square) & Segments(ids), 1, 1, 1, 130, 130, 16, torch.float32, None, ()),
        "no-edges|self-loops": (lambda: Edges(torch.zeros(2, 0, dtype=torch.long)) | Window(0, 0), 1, 1, 1, 70, 70, 16,
                                torch.float32, None, ()),
    }


KERNEL_CASES = _kernel_cases()


@in_process
@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_kernel_forward_and_gradients(name):
    make, b, h, hkv, nq, nk, d, dtype, block, empty_queries = KERNEL_CASES[name]
    mask = make()
    assert lower_mask(mask, nq, nk, DEVICE).exact_in_kernel
    q, k, v = _inputs(b, h, hkv, nq, nk, d, dtype, seed=len(name))
    out, dq, _, _ = _check(q, k, v, mask, block)
    nothing = ~mask.dense(nq, nk, q.device).any(-1)  # (Bm, 1, Nq): queries with no incoming edge
    assert all(bool(nothing[..., i].all()) for i in empty_queries), name
    if bool(nothing.any()):
        rows = nothing.expand(b, h, nq)
        assert out[rows].abs().max() == 0 and dq[rows].abs().max() == 0  # zero output, zero gradient


@pytest.mark.skipif(not _LATE, reason="the tests above ran in this process")
def test_kernel_edge_tests_in_a_fresh_process():
    run_in_fresh_process(__file__)
