"""Point neighbourhoods (zoo.geometry: knn, knn_graph, fps) against scikit-learn and a float64 reference, and
the Point Transformer layer (zoo.attention.PointTransformerConv) against PyG's PointTransformerConv (strict
state-dict loading, outputs and gradients within 1e-5), its memory-light blockwise path, and clear errors."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

pyg_nn = pytest.importorskip("torch_geometric.nn")
from sklearn.neighbors import NearestNeighbors  # noqa: E402

import zoo.attention.vector as vector  # noqa: E402
from zoo.attention import PointTransformerConv  # noqa: E402
from zoo.geometry import fps, knn, knn_graph, radius, radius_graph  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)


def _points(n, d=3, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _batch(*sizes):
    return torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sizes)])


# ------------------------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_knn_matches_sklearn_per_example(metric):
    x, y = _points(300, seed=1), _points(70, seed=2)
    bx, by = _batch(120, 5, 175), _batch(30, 10, 30)
    k = 7
    ei = knn(x, y, k, bx, by, cosine=metric == "cosine", chunk=16)
    off_x, off_y = [0, 120, 125], [0, 30, 40]
    for b, (nx, ny) in enumerate([(120, 30), (5, 10), (175, 30)]):
        xs, ys = x[off_x[b]:off_x[b] + nx].double().numpy(), y[off_y[b]:off_y[b] + ny].double().numpy()
        kk = min(k, nx)
        _, idx = NearestNeighbors(n_neighbors=kk, metric=metric, algorithm="brute").fit(xs).kneighbors(ys)
        for q in range(ny):
            got = ei[1][ei[0] == q + off_y[b]] - off_x[b]
            assert got.tolist() == idx[q].tolist(), (b, q)  # the same neighbours, nearest first
    assert ei.shape[1] == 30 * 7 + 10 * 5 + 30 * 7  # the 5-point example gives 5 neighbours per query


def test_knn_ties_go_to_the_lower_index_and_float32_rounding_does_not_decide():
    # a grid: many exactly equal distances
    g = torch.stack(torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij"), -1).view(-1, 2)
    ei = knn(g, g[14:15], 9)
    d = (g - g[14]).square().sum(1)
    expected = sorted(range(len(g)), key=lambda i: (float(d[i]), i))[:9]
    assert ei[1].tolist() == expected
    # large offsets: float32 |y|^2 + |x|^2 - 2 y.x cancels; the ranking still follows exact distances
    base = torch.tensor([[1000.0, 1000.0, 1000.0]])
    pts = base + torch.tensor([[0.0, 0.0, 0.0], [0.001, 0.0, 0.0], [0.0, 0.0015, 0.0], [0.0, 0.0, 0.0005]])
    assert knn(pts, pts[:1], 4)[1].tolist() == [0, 3, 1, 2]


def _grid_cases():
    g = torch.Generator().manual_seed(21)
    uniform = torch.rand(3000, 3, generator=g)
    blobs = torch.cat([torch.randn(800, 3, generator=g) * s + c for s, c in ((0.01, 0.0), (1.0, 3.0), (0.1, -2.0))])
    lattice = torch.stack(torch.meshgrid(torch.arange(12.0), torch.arange(12.0), torch.arange(3.0), indexing="ij"),
                          -1).view(-1, 3)
    planar = torch.cat([torch.rand(1500, 2, generator=g), torch.zeros(1500, 1)], 1)
    return {
        "uniform": (uniform, uniform, 17, None),
        "clusters": (blobs, blobs, 9, None),  # one cell crowded: those queries go to brute force
        "2d, queries outside": (torch.rand(2000, 2, generator=g), torch.rand(300, 2, generator=g) * 1.4 - 0.2, 5, None),
        "1d": (torch.rand(1500, 1, generator=g), torch.rand(200, 1, generator=g), 4, None),
        "lattice ties": (lattice, lattice, 10, None),
        "flat axis": (planar, planar[:200], 6, None),
        "duplicates": (torch.cat([uniform[:300]] * 4), torch.cat([uniform[:300]] * 4), 7, None),
        "batched": (uniform, uniform, 8, _batch(1000, 2000)),
    }


@pytest.mark.parametrize("case", list(_grid_cases()))
def test_knn_grid_path_equals_brute_force(monkeypatch, case):
    """The uniform-grid search (low-dimensional Euclidean) returns exactly the brute-force result, order and
    ties included, on uniform, clustered, lattice (many ties), degenerate and duplicated points."""
    import zoo.geometry as geometry

    x, y, k, batch = _grid_cases()[case]
    monkeypatch.setattr(geometry, "_GRID_MIN_PAIRS", 1 << 62)
    brute = knn(x, y, k, batch, batch if y is x else None)
    monkeypatch.setattr(geometry, "_GRID_MIN_PAIRS", 0)
    calls = []
    real = geometry._grid_knn
    monkeypatch.setattr(geometry, "_grid_knn", lambda *a: calls.append(1) or real(*a))
    grid = knn(x, y, k, batch, batch if y is x else None)
    assert calls and torch.equal(grid, brute)
    if case == "uniform":  # almost every query settled by the grid itself
        _, settled = real(x.double(), y.double(), k)
        assert settled.float().mean() > 0.9


def test_knn_graph_flow_loops_and_batches():
    pos, batch = _points(60, seed=3), _batch(25, 35)
    ei = knn_graph(pos, 4, batch)
    assert ei.shape == (2, 60 * 4) and not bool((ei[0] == ei[1]).any())
    assert bool((batch[ei[0]] == batch[ei[1]]).all())
    # flow source_to_target: row 1 is the centre, each centre has its 4 nearest others as sources
    d = torch.cdist(pos.double(), pos.double())
    for i in (0, 30):
        same = (batch == batch[i]).nonzero().view(-1)
        others = [int(j) for j in same[torch.argsort(d[i, same], stable=True)] if int(j) != i][:4]
        assert ei[0][ei[1] == i].tolist() == others
    flipped = knn_graph(pos, 4, batch, flow="target_to_source")
    assert torch.equal(flipped, ei.flip(0))
    with_loops = knn_graph(pos, 4, batch, loop=True)
    assert with_loops.shape == (2, 240) and int((with_loops[0] == with_loops[1]).sum()) == 60
    # duplicated points: each point still keeps k neighbours other than itself
    dup = torch.cat([pos[:10], pos[:10]])
    e = knn_graph(dup, 3)
    assert torch.bincount(e[1], minlength=20).tolist() == [3] * 20 and not bool((e[0] == e[1]).any())


def _radius_reference(x, y, r, limit, bx=None, by=None):
    """float64 loop: per query, the first ``limit`` points (index order) of its example nearer than r."""
    x, y = x.double().numpy(), y.double().numpy()
    bx = np.zeros(len(x), int) if bx is None else bx.numpy()
    by = np.zeros(len(y), int) if by is None else by.numpy()
    pairs = []
    for q in range(len(y)):
        d = ((x - y[q]) ** 2).sum(1)
        hits = [i for i in range(len(x)) if bx[i] == by[q] and d[i] < r * r][:limit]
        pairs += [(q, i) for i in hits]
    return torch.tensor(pairs, dtype=torch.long).t().reshape(2, -1)


@pytest.mark.parametrize("grid", [False, True], ids=["brute force", "grid"])
def test_radius_matches_the_reference(monkeypatch, grid):
    import zoo.geometry as geometry

    monkeypatch.setattr(geometry, "_GRID_MIN_PAIRS", 0 if grid else 1 << 62)
    g = torch.Generator().manual_seed(8)
    x = torch.rand(400, 3, generator=g)
    y = torch.rand(60, 3, generator=g) * 1.2 - 0.1  # some queries outside the points' bounding box
    bx, by = _batch(250, 150), _batch(25, 35)
    for r, limit in ((0.15, 32), (0.3, 5)):  # the second caps crowded balls
        got = radius(x, y, r, bx, by, max_num_neighbors=limit)
        assert torch.equal(got, _radius_reference(x, y, r, limit, bx, by)), (r, limit)
    lattice = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1).view(-1, 2)
    on_the_sphere = radius(lattice, lattice[27:28], 1.0)  # distance exactly r: not a neighbour (strict)
    assert on_the_sphere[1].tolist() == [27]


def test_radius_graph_flow_loops_and_the_neighbour_cap():
    pos = _points(80, seed=9)
    r = 0.9
    ei = radius_graph(pos, r, max_num_neighbors=6)
    assert not bool((ei[0] == ei[1]).any())
    d = torch.cdist(pos.double(), pos.double())
    for i in (0, 17, 50):  # the first 6 others in index order that are nearer than r
        expected = [j for j in range(80) if j != i and d[i, j] < r][:6]
        assert ei[0][ei[1] == i].tolist() == expected
    assert torch.equal(radius_graph(pos, r, max_num_neighbors=6, flow="target_to_source"), ei.flip(0))
    looped = radius_graph(pos, r, loop=True, max_num_neighbors=100)
    assert int((looped[0] == looped[1]).sum()) == 80
    # r = 0: no neighbours (distances are < r strictly), as torch_cluster returns; a negative r is refused
    assert radius_graph(pos, 0.0).shape == (2, 0) and radius_graph(pos, 0.0, loop=True).shape == (2, 0)
    with pytest.raises(ValueError, match="r must be a finite number >= 0"):
        radius_graph(pos, -0.1)
    with pytest.raises(ValueError, match="max_num_neighbors"):
        radius_graph(pos, 0.5, max_num_neighbors=0)


def _fps_reference(points: np.ndarray, count: int, start: int = 0) -> list[int]:
    """The textbook loop in float64: pick the point farthest from the picked set, ties to the lowest index."""
    picked, dist = [start], np.full(len(points), np.inf)
    for _ in range(count - 1):
        dist = np.minimum(dist, ((points - points[picked[-1]]) ** 2).sum(1))
        picked.append(int(np.argmax(dist)))
    return picked


@pytest.mark.parametrize("offset,dtype,spacing", [(1e4, torch.float32, 1.0), (5e6, torch.float64, 0.3)])
def test_knn_far_from_the_origin_is_exact(offset, dtype, spacing):
    """|y|^2 + |x|^2 - 2 y.x cancels for points far from the origin relative to their spacing (a cloud at 1e4 in
    float32, UTM-like coordinates in float64): the candidate pass picked wrong neighbours for up to every query
    (audit 2026-12-06). Each example is now measured from its centre. Reference: float64 differences."""
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(600, 3, generator=g, dtype=torch.float64) * spacing * 8.4 + offset).to(dtype)
    got = knn(x, x, 8)[1].view(-1, 8)
    d = (x.double()[:, None] - x.double()[None]).square().sum(-1)
    want = torch.sort(d, dim=1, stable=True).indices[:, :8]
    assert torch.equal(got, want)
    # one far outlier: the centre is far from the crowd, whose spacing is below the expansion's rounding
    far = torch.cat([torch.zeros(1, 1, dtype=torch.float64), 1e12 + torch.rand(300, 1, generator=g, dtype=torch.float64)])
    d = (far - far.t()).square()
    assert torch.equal(knn(far, far, 4)[1].view(-1, 4), torch.sort(d, dim=1, stable=True).indices[:, :4])


def test_fps_counts_as_torch_cluster_rounds():
    """ceil(ratio * n) in Python doubles is 8 for 0.07 * 100; torch_cluster's float32 product gives 7."""
    # (50, 0.3): float32 0.3 is above 0.3, so torch_cluster takes 16, one more than exact arithmetic; so does zoo
    for n, ratio, want in ((100, 0.07, 7), (200, 0.07, 14), (50, 0.14, 7), (50, 0.3, 16), (7, 0.5, 4)):
        expected = int((torch.tensor([float(n)]) * torch.tensor(ratio)).ceil())
        assert expected == want and fps(_points(n), ratio=ratio, random_start=False).numel() == want, (n, ratio)



def test_fps_counts_round_in_the_points_dtype():
    """torch_cluster multiplies the float32 counts by ratio as a 0-dim tensor of the points' dtype: half points
    take 0.07 as fp16 (0.0700073...), so 100 points give ceil(7.0007) = 8 samples, float32 / bfloat16 give 7
    (audit m28: a count from the Python float gave 7 for half points too)."""
    for dtype, want in ((torch.float16, 8), (torch.bfloat16, 7), (torch.float32, 7), (torch.float64, 7)):
        expected = int((torch.tensor([100.0]) * torch.tensor(0.07, dtype=dtype)).ceil())
        assert expected == want
        assert fps(_points(100).to(dtype), ratio=0.07, random_start=False).numel() == want, dtype

@pytest.mark.parametrize("ratio", [0.25, 0.5, 1.0])
def test_fps_matches_the_reference_per_example(ratio):
    pos, batch = _points(90, seed=4), _batch(40, 7, 43)
    got = fps(pos, batch, ratio=ratio, random_start=False)
    expected, offset = [], 0
    for n in (40, 7, 43):
        expected += [offset + i for i in _fps_reference(pos[offset:offset + n].double().numpy(), math.ceil(ratio * n))]
        offset += n
    assert got.tolist() == expected
    torch.manual_seed(0)
    random = fps(pos, batch, ratio=ratio)
    assert random.numel() == len(expected) and len(set(random.tolist())) == len(expected)
    assert bool((batch[random][:-1] <= batch[random][1:]).all())


def test_geometry_bad_inputs_raise_clear_errors():
    pos = _points(10)
    with pytest.raises(ValueError, match="k must be a positive int"):
        knn_graph(pos, 0)
    with pytest.raises(TypeError, match="floating-point"):
        knn_graph(pos.long(), 3)
    with pytest.raises(ValueError, match="NaN or Inf"):
        knn_graph(torch.cat([pos, torch.full((1, 3), float("nan"))]), 3)
    with pytest.raises(ValueError, match="sorted order"):
        knn_graph(pos, 3, torch.tensor([1, 0] * 5))
    with pytest.raises(ValueError, match=r"shape \[10\]"):
        knn_graph(pos, 3, torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="same number of coordinates"):
        knn(pos, _points(4, d=2), 2)
    with pytest.raises(ValueError, match="flow"):
        knn_graph(pos, 3, flow="both")
    with pytest.raises(ValueError, match="ratio"):
        fps(pos, ratio=0.0)
    with pytest.raises(ValueError, match=r"k must be a positive int, got 2\.0"):
        knn_graph(pos, 2.0)
    with pytest.raises(ValueError, match="k must be a positive int, got True"):
        knn(pos, pos, True)


def test_geometry_searches_run_without_autograd(monkeypatch):
    """The neighbour searches build no autograd graph over their distance matrices, even for inputs that require
    grad (a helper inserted above knn once took its @torch.no_grad() decorator)."""
    import zoo.geometry as geometry

    seen = []
    paired = geometry._paired_examples
    monkeypatch.setattr(geometry, "_paired_examples", lambda *a: seen.append(torch.is_grad_enabled()) or paired(*a))
    pos = _points(30, seed=2).requires_grad_(True)
    geometry.knn(pos, pos, 3)
    geometry.knn_graph(pos, 3)
    geometry.radius(pos, pos, 0.8)
    geometry.radius_graph(pos, 0.8)
    assert seen and not any(seen)


def test_geometry_counts_take_numpy_and_tensor_ints():
    """k / max_num_neighbors read from a numpy config or computed with torch, as torch_cluster takes them."""
    pos = _points(30, seed=2)
    assert torch.equal(knn_graph(pos, np.int64(4)), knn_graph(pos, 4))
    assert torch.equal(knn(pos, pos[:5], torch.tensor(3)), knn(pos, pos[:5], 3))
    assert torch.equal(radius_graph(pos, 0.8, max_num_neighbors=np.int32(5)), radius_graph(pos, 0.8, max_num_neighbors=5))


def test_geometry_radius_and_ratio_take_numpy_and_tensor_reals():
    """r / ratio read from a numpy config (np.float32 is not a Python float) or computed with torch (0-dim
    tensors), as torch_cluster takes them: the same result as the Python float. They were refused with "must be
    a positive finite number" / "must be in (0, 1]", a range error for an in-range value; a wrong type is now a
    TypeError naming it, and out-of-range values are still ValueErrors."""
    pos = _points(30, seed=2)
    for r in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64)):
        assert torch.equal(radius(pos, pos[:5], r), radius(pos, pos[:5], float(r))), type(r)
        assert torch.equal(radius_graph(pos, r), radius_graph(pos, float(r))), type(r)
    assert torch.equal(radius_graph(pos, np.int64(1)), radius_graph(pos, 1.0))
    for ratio in (np.float32(0.25), np.float64(0.25), torch.tensor(0.25)):
        assert torch.equal(fps(pos, ratio=ratio, random_start=False), fps(pos, ratio=0.25, random_start=False))
    for bad, what in (("0.5", "str"), (True, "bool"), (torch.tensor([0.5, 0.6]), "shape \\(2,\\)"),
                      (torch.tensor(True), "torch.bool"), (0.5j, "complex")):
        with pytest.raises(TypeError, match=f"r must be a real number.*{what}"):
            radius_graph(pos, bad)
        with pytest.raises(TypeError, match=f"ratio must be a real number.*{what}"):
            fps(pos, ratio=bad)
    with pytest.raises(ValueError, match="r must be a finite number >= 0, got -0.5"):
        radius(pos, pos, np.float32(-0.5))
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\], got 1.5"):
        fps(pos, ratio=torch.tensor(1.5))


# ------------------------------------------------------------------------------------------------ the layer
def _pair(*args, nets=None, **kwargs):
    torch.manual_seed(0)
    nets = nets or {}
    peer = pyg_nn.PointTransformerConv(*args, **{k: copy.deepcopy(v) for k, v in nets.items()}, **kwargs)
    ours = PointTransformerConv(*args, **{k: copy.deepcopy(v) for k, v in nets.items()}, **kwargs)
    ours.load_state_dict(peer.state_dict(), strict=True)
    return ours, peer


def _run(module, x, pos, edge_index):
    xs = [t.detach().clone().requires_grad_(True) for t in (x if isinstance(x, tuple) else (x,))]
    ps = [t.detach().clone().requires_grad_(True) for t in (pos if isinstance(pos, tuple) else (pos,))]
    out = module(tuple(xs) if len(xs) == 2 else xs[0], tuple(ps) if len(ps) == 2 else ps[0], edge_index)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    grads = [t.grad for t in xs + ps] + [p.grad.clone() for _, p in sorted(module.named_parameters())]
    module.zero_grad()
    return out, grads


def _assert_same(ours, peer, x, pos, edge_index):
    out1, g1 = _run(ours, x, pos, edge_index)
    out2, g2 = _run(peer, x, pos, edge_index)
    torch.testing.assert_close(out1, out2, **TOL)
    assert len(g1) == len(g2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def _mlp(c):
    return nn.Sequential(nn.Linear(c, 2 * c), nn.ReLU(), nn.Linear(2 * c, c))


@pytest.mark.parametrize("block_elements,recompute", [(1 << 21, "auto"), (40, True)],
                         ids=["one block", "checkpointed blocks"])  # a block per neighbourhood or two
@pytest.mark.parametrize("case", ["default", "attn_nn", "pos_mlp", "no_loops"])
def test_point_transformer_matches_pyg(monkeypatch, case, block_elements, recompute):
    monkeypatch.setattr(vector, "_BLOCK_ELEMENTS", block_elements)
    pos = _points(40, seed=5)
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(6))
    edge_index = knn_graph(pos[:36], 5)  # points 36..39 have no neighbours (self loops only / nothing)
    edge_index[:, :2] = torch.tensor([[3, 7], [3, 7]])  # input self loops: removed, then added, as PyG
    nets = {"attn_nn": _mlp(8)} if case == "attn_nn" else {}
    if case == "pos_mlp":
        nets = {"pos_nn": nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 8)), "attn_nn": _mlp(8)}
    ours, peer = _pair(6, 8, nets=nets, add_self_loops=case != "no_loops")
    ours.recompute = recompute
    _assert_same(ours, peer, x, pos, edge_index)


@pytest.mark.parametrize("loops", [False, True])
def test_point_transformer_bipartite_and_lazy_match_pyg(loops):
    pos_src, pos_dst = _points(30, seed=7), _points(12, seed=8)
    x_src = torch.randn(30, 5, generator=torch.Generator().manual_seed(9))
    x_dst = torch.randn(12, 3, generator=torch.Generator().manual_seed(10))
    edge_index = knn(pos_src, pos_dst, 4).flip(0)  # source = neighbour in pos_src, destination = query
    ours, peer = _pair((5, 3), 8, add_self_loops=loops)
    _assert_same(ours, peer, (x_src, x_dst), (pos_src, pos_dst), edge_index)
    torch.manual_seed(0)
    lazy_peer = pyg_nn.PointTransformerConv(-1, 8)
    lazy_ours = PointTransformerConv(-1, 8)
    pos, x = _points(20, seed=11), torch.randn(20, 4)
    ei = knn_graph(pos, 3)
    lazy_peer(x, pos, ei)
    lazy_ours(x, pos, ei)
    lazy_ours.load_state_dict(lazy_peer.state_dict(), strict=True)
    _assert_same(lazy_ours, lazy_peer, x, pos, ei)


@pytest.mark.parametrize("in_channels", [-1, (-1, -1), (-1, 3), 5], ids=["lazy", "lazy pair", "lazy source", "sized"])
def test_seeded_point_transformer_draws_pygs_weights(in_channels):
    """With the same torch.manual_seed before construction and before the first forward, our layer draws PyG's
    weights without a state dict, also when lazy: PyG's forward calls lin_src, lin_dst, then lin, which is the order
    the lazy projections materialise in. Ours called lin first, so its three matrices were PyG's in another order
    (review G, finding 3). float64 state dicts equal exactly, outputs to rounding."""
    single = not isinstance(in_channels, tuple)
    g = torch.Generator().manual_seed(14)
    x_src = torch.randn(18, 5, generator=g, dtype=torch.float64)
    x_dst = x_src if single else torch.randn(9, 3, generator=g, dtype=torch.float64)
    pos_src = _points(18, seed=15).double()
    pos_dst = pos_src if single else _points(9, seed=16).double()
    edge_index = knn(pos_src, pos_dst, 4).flip(0)  # source = neighbour in pos_src, destination = query
    x, pos = (x_src, pos_src) if single else ((x_src, x_dst), (pos_src, pos_dst))
    layers, outs = [], []
    for cls in (PointTransformerConv, pyg_nn.PointTransformerConv):
        torch.manual_seed(0)
        layer = cls(in_channels, 6).double()
        torch.manual_seed(3)
        outs.append(layer(x, pos, edge_index))
        layers.append(layer)
    ours, peer = (layer.state_dict() for layer in layers)
    assert list(ours) == list(peer)
    for key in peer:
        assert torch.equal(ours[key], peer[key]), key
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)


def test_without_recompute_matches_pyg(monkeypatch):
    monkeypatch.setattr(vector, "_BLOCK_ELEMENTS", 40)
    ours, peer = _pair(6, 8, nets={"attn_nn": _mlp(8)})
    ours.recompute = False
    assert PointTransformerConv(6, 8, recompute=False).recompute is False
    pos, x = _points(30, seed=17), torch.randn(30, 6)
    _assert_same(ours, peer, x, pos, knn_graph(pos, 4))



@pytest.mark.parametrize("grad", [False, True], ids=["inference", "checkpointed training"])
def test_single_destinations_without_edges_between_blocks_get_zero_rows_as_pyg(monkeypatch, grad):
    """Blocks skip destinations without edges: one such destination first, one between two blocks and one
    last must each still get its zero row, in order (audit m28: an off-by-one in the gap or tail test dropped
    exactly one such row, shifting the rows after it or returning N - 1 rows). Blocks of at most 2 edges and
    3 edges per neighbourhood: each neighbourhood is a block of its own, which leaves the next destination
    without edges outside every block (a lighter neighbourhood's block would take it in)."""
    monkeypatch.setattr(vector, "_BLOCK_ELEMENTS", 2 * 8)
    n = 12
    g = torch.Generator().manual_seed(23)
    dst = torch.tensor([i for i in range(n) if i not in (0, 5, 11)]).repeat_interleave(3)
    src = (dst + torch.randint(1, n, (dst.numel(),), generator=g)) % n  # no self loops: 3 edges each
    edge_index = torch.stack([src, dst])
    assert vector.PointTransformerConv(6, 8, add_self_loops=False)._graph(edge_index, n, n).csr.blocks(2) == [
        (i, i + 1, 3 * j, 3 * j + 3) for j, i in enumerate(i for i in range(n) if i not in (0, 5, 11))]
    pos, x = _points(n, seed=24), torch.randn(n, 6, generator=g)
    ours, peer = _pair(6, 8, add_self_loops=False)
    if grad:
        ours.recompute = True
        _assert_same(ours, peer, x, pos, edge_index)
    else:
        with torch.no_grad():
            got, want = ours(x, pos, edge_index), peer(x, pos, edge_index)
        assert got.shape == want.shape == (n, 8)
        assert not want[[0, 5, 11]].any()
        torch.testing.assert_close(got, want, **TOL)

def test_sparse_adjacency_input_equals_edge_index():
    ours, _ = _pair(6, 8)
    pos, x = _points(20, seed=16), torch.randn(20, 6)
    ei = knn_graph(pos, 3)
    adj_t = torch.sparse_coo_tensor(ei.flip(0), torch.ones(ei.size(1)), (20, 20)).coalesce().to_sparse_csr()
    torch.testing.assert_close(ours(x, pos, adj_t), ours(x, pos, ei), **TOL)


def test_batchnorm_in_pos_nn_sees_every_edge_as_in_pyg(monkeypatch):
    monkeypatch.setattr(vector, "_BLOCK_ELEMENTS", 40)
    nets = {"pos_nn": nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8))}
    ours, peer = _pair(6, 8, nets=nets)
    pos, x = _points(30, seed=12), torch.randn(30, 6)
    _assert_same(ours.train(), peer.train(), x, pos, knn_graph(pos, 4))
    torch.testing.assert_close(ours.pos_nn[1].running_mean, peer.pos_nn[1].running_mean, **TOL)


def _norm_nets():
    """attn_nn networks whose normalisation takes statistics over all the edges it is given."""
    pyg_norm = pyg_nn.norm
    return {
        "batchnorm without running stats": nn.Sequential(
            nn.Linear(8, 16), nn.BatchNorm1d(16, track_running_stats=False), nn.ReLU(), nn.Linear(16, 8)),
        "pyg MLP layer_norm (mode graph)": pyg_nn.MLP([8, 16, 8], norm="layer_norm"),
        "pyg MLP graph_norm": pyg_nn.MLP([8, 16, 8], norm="graph_norm"),
        "pyg MLP instance_norm": pyg_nn.MLP([8, 16, 8], norm="instance_norm"),
        "pyg PairNorm": nn.Sequential(nn.Linear(8, 8), pyg_norm.PairNorm()),
    }


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("net", list(_norm_nets()))
def test_norms_over_all_edges_see_every_edge_as_in_pyg(monkeypatch, net, mode):
    """attn_nn whose statistics span all its rows (BatchNorm without running statistics, in eval too; PyG's
    graph-level norms called without a batch vector) runs as one block, as PyG feeds it every edge: with blocks
    of a neighbourhood or two (inference, or training with recompute) each block got its own statistics."""
    monkeypatch.setattr(vector, "_BLOCK_ELEMENTS", 40)
    ours, peer = _pair(6, 8, nets={"attn_nn": _norm_nets()[net]})
    ours.recompute = True
    ours.train(mode == "train")
    peer.train(mode == "train")
    pos, x = _points(30, seed=12), torch.randn(30, 6, generator=torch.Generator().manual_seed(13))
    edge_index = knn_graph(pos, 4)
    _assert_same(ours, peer, x, pos, edge_index)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, pos, edge_index), peer(x, pos, edge_index), **TOL)


def test_row_wise_norms_keep_the_blockwise_path():
    """The rule of _has_batch_statistics: norms that use running statistics or normalise each row alone do not
    force one block (PyG's wrappers decide by the torch BatchNorm inside)."""
    pyg_norm = pyg_nn.norm
    row_wise = [nn.BatchNorm1d(8).eval(), pyg_norm.BatchNorm(8).eval(), pyg_norm.DiffGroupNorm(8, 2).eval(),
                pyg_norm.InstanceNorm(8, track_running_stats=True).eval(), pyg_norm.LayerNorm(8, mode="node"),
                nn.LayerNorm(8), nn.InstanceNorm1d(8), nn.GroupNorm(2, 8)]
    for m in row_wise:
        assert not vector._has_batch_statistics(nn.Sequential(nn.Linear(8, 8), m)), m
    for m in (nn.BatchNorm1d(8).train(), pyg_norm.BatchNorm(8).train(), pyg_norm.GraphSizeNorm(),
              pyg_norm.InstanceNorm(8, track_running_stats=True).train(), pyg_norm.MeanSubtractionNorm()):
        assert vector._has_batch_statistics(nn.Sequential(nn.Linear(8, 8), m)), m


def test_blockwise_path_keeps_far_less_for_backward(monkeypatch):
    """What autograd keeps for backward (saved-tensor hooks): PyG keeps several [E, C] tensors per layer;
    the blockwise path keeps the [N, C] inputs and one block's recomputation at a time."""
    monkeypatch.setattr(vector, "_BLOCK_ELEMENTS", 4096)
    pos = _points(1500, seed=13)
    x = torch.randn(1500, 16)
    edge_index = knn_graph(pos, 16)
    ours, peer = _pair(16, 32, nets={"attn_nn": _mlp(32)})
    ours.recompute = True

    def saved_bytes(module):
        storages = {}  # distinct storages (the blocks all save views of the same [N, C] inputs)

        def pack(t):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = module(x.requires_grad_(True), pos, edge_index)
        return sum(storages.values()), out

    ours_bytes, out1 = saved_bytes(ours)
    peer_bytes, out2 = saved_bytes(peer)
    torch.testing.assert_close(out1, out2, **TOL)
    print("saved for backward: ours", ours_bytes, "PyG", peer_bytes)
    assert ours_bytes * 8 < peer_bytes, (ours_bytes, peer_bytes)
    ours.recompute = False  # PyG's trade: everything kept, no second forward; the same results
    kept_bytes, out3 = saved_bytes(ours)
    torch.testing.assert_close(out3, out2, **TOL)
    assert kept_bytes > peer_bytes / 2, (kept_bytes, peer_bytes)
    # "auto" (the default) decides by the estimated kept bytes: 1500 points x 17 edges x 32 channels x 12
    # elements x 4 bytes = 39 MB against the budget
    ours.recompute = "auto"
    assert PointTransformerConv(16, 32).recompute == "auto"
    auto_kept, _ = saved_bytes(ours)
    assert auto_kept > peer_bytes / 2, (auto_kept, peer_bytes)
    monkeypatch.setattr(vector, "_AUTO_RECOMPUTE_BYTES", 30 << 20)
    auto_recomputed, out4 = saved_bytes(ours)
    torch.testing.assert_close(out4, out2, **TOL)
    assert auto_recomputed == ours_bytes, (auto_recomputed, ours_bytes)


def test_segment_softmax_weighted_sum_is_the_softmax_then_the_sum():
    """The fused aggregation of vector attention against its definition (segment_softmax, then index_add), in
    float64 with gradcheck, with an empty segment (zeros, zero gradient) and unsorted indices; under
    torch.compile too; and what autograd keeps: the inputs and [N, C] statistics, no [E, C] temporaries."""
    from zoo.attention.segment import segment_softmax, segment_softmax_weighted_sum

    g = torch.Generator().manual_seed(3)
    n, c = 7, 5
    index = torch.randint(0, n - 1, (40,), generator=g)  # segment n - 1 stays empty
    scores = (3 * torch.randn(40, c, generator=g, dtype=torch.float64)).requires_grad_(True)
    values = torch.randn(40, c, generator=g, dtype=torch.float64).requires_grad_(True)

    def reference(s, v):
        return torch.zeros(n, c, dtype=s.dtype).index_add(0, index, segment_softmax(s, index, n) * v)

    got = segment_softmax_weighted_sum(scores, values, index, n)
    torch.testing.assert_close(got, reference(scores, values))
    assert not got[n - 1].any()
    assert torch.autograd.gradcheck(lambda s, v: segment_softmax_weighted_sum(s, v, index, n), (scores, values))
    grad = torch.randn(n, c, generator=g, dtype=torch.float64)
    want_grads = torch.autograd.grad(reference(scores, values), (scores, values), grad)
    compiled = torch.compile(lambda s, v: segment_softmax_weighted_sum(s, v, index, n), backend="aot_eager")
    out = compiled(scores, values)
    torch.testing.assert_close(out, got)
    for a, b in zip(torch.autograd.grad(out, (scores, values), grad), want_grads):
        torch.testing.assert_close(a, b)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        segment_softmax_weighted_sum(scores, values, index, n)
    # the inputs, the output and two statistics (row max and log-sum, kept apart for an exact recomputation)
    assert sorted(saved) == sorted([(40, c), (40, c), (40,), (n, c), (n, c), (n, c)]), saved
    with pytest.raises(ValueError, match="must both be"):
        segment_softmax_weighted_sum(scores, values[:, :2], index, n)
    with pytest.raises(ValueError, match=r"index values must lie in \[0, 7\), got -1\.\.5"):
        segment_softmax_weighted_sum(scores, values, torch.where(index == 0, -1, index), n)
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        segment_softmax_weighted_sum(scores, values, index, 3)
    with pytest.raises(TypeError, match="index must be int64 or int32"):
        segment_softmax_weighted_sum(scores, values, index.double(), n)
    with pytest.raises(TypeError, match="must be floating point"):
        segment_softmax_weighted_sum(scores.long(), values.long(), index, n)


def test_heap_is_trimmed_only_between_several_blocks(monkeypatch):
    """One block (training without recompute, or a small input) never trims: that would hand back the
    previous call's heap for this call to page-fault in again. Several blocks trim before each."""
    calls = []
    monkeypatch.setattr(vector, "_release_free_heap", lambda: calls.append(1))
    ours, _ = _pair(6, 8)
    pos, x = _points(30, seed=18), torch.randn(30, 6)
    ei = knn_graph(pos, 4)
    ours.recompute = False
    ours(x, pos, ei).sum().backward()
    with torch.no_grad():
        ours(x, pos, ei)
    assert calls == []
    monkeypatch.setattr(vector, "_BLOCK_ELEMENTS", 40)
    with torch.no_grad():
        ours(x, pos, ei)
    assert len(calls) > 1


def test_point_transformer_explain_and_hooks_match_pyg():
    from torch_geometric.explain.algorithm.utils import clear_masks, set_masks

    ours, peer = _pair(6, 8, nets={"attn_nn": _mlp(8)})
    pos, x = _points(25, seed=14), torch.randn(25, 6)
    ei = knn_graph(pos, 4)
    outs = []
    for module in (ours, peer):
        mask = nn.Parameter(torch.randn(ei.size(1), generator=torch.Generator().manual_seed(3)))
        set_masks(module, mask, ei)
        out = module(x, pos, ei)
        out.square().sum().backward()
        outs.append((out, mask.grad))
        clear_masks(module)
    torch.testing.assert_close(outs[0][0], outs[1][0], **TOL)
    torch.testing.assert_close(outs[0][1], outs[1][1], **TOL)
    seen = {}
    for name, module in (("ours", ours), ("peer", peer)):
        def hook(mod, inputs, out, name=name):
            seen[name] = out

        handle = module.register_message_forward_hook(hook)
        module(x, pos, ei)
        handle.remove()
    torch.testing.assert_close(seen["ours"], seen["peer"], **TOL)


def test_point_transformer_repr_empty_graph_and_bad_inputs():
    conv = PointTransformerConv(6, 8)
    assert repr(conv) == repr(pyg_nn.PointTransformerConv(6, 8)) == "PointTransformerConv(6, 8)"
    assert list(conv.state_dict()) == list(pyg_nn.PointTransformerConv(6, 8).state_dict())
    pos, x = _points(5), torch.randn(5, 6, requires_grad=True)
    out = PointTransformerConv(6, 8, add_self_loops=False)(x, pos, torch.empty(2, 0, dtype=torch.long))
    assert out.shape == (5, 8) and not bool(out.any())
    out.sum().backward()  # attached to the graph, as PyG's scatter over no edge
    ei = knn_graph(pos, 2)
    with pytest.raises(ValueError, match=r"pos \(source\) has 4 rows but the features have 5"):
        conv(x, pos[:4], ei)
    with pytest.raises(ValueError, match="NaN or Inf"):
        conv(x, torch.full((5, 3), float("nan")), ei)
    with pytest.raises(ValueError, match="6"):
        conv(torch.randn(5, 7), pos, ei)
    with pytest.raises(ValueError, match="out of range"):
        conv(x, pos, torch.tensor([[0, 9], [1, 2]]))
    with pytest.raises(TypeError, match="unsupported MessagePassing arguments"):
        PointTransformerConv(6, 8, aggr="mean")
    for bad in ("sometimes", 1, 0.0, None):  # 1 == True let the numbers through, stored as they came
        with pytest.raises(ValueError, match="recompute must be True, False or 'auto'"):
            PointTransformerConv(6, 8, recompute=bad)
    with pytest.raises(TypeError, match="add_self_loops must be True or False, got 'no'"):
        PointTransformerConv(6, 8, add_self_loops="no")
    assert PointTransformerConv(6, 8, recompute=np.bool_(True)).recompute is True



def test_positions_with_more_rows_than_the_features_are_refused():
    """pos with rows beyond the features' (the positions of another batch, say) is refused as a short pos is,
    for either side of a bipartite input, not used silently for the rows the edges reach (audit m28; PyG's
    layer fails on it too)."""
    conv = PointTransformerConv(6, 8)
    pos, x = _points(6), torch.randn(5, 6)
    ei = knn_graph(pos[:5], 2)
    with pytest.raises(ValueError, match=r"pos \(source\) has 6 rows but the features have 5"):
        conv(x, pos, ei)
    with pytest.raises((ValueError, IndexError)):  # PyG: its self loop for the sixth point indexes past x
        pyg_nn.PointTransformerConv(6, 8)(x, pos, ei)
    with pytest.raises(ValueError, match=r"pos \(target\) has 6 rows but the features have 4"):
        conv((x, x[:4]), (pos[:5], pos), ei[:, ei[1] < 4])

def test_point_transformer_positions_and_user_networks_are_checked():
    """Mismatches that surfaced as torch errors naming neither argument: pos with other than 3 coordinates and the
    default pos_nn, pos / x of another dtype than the weights, pos_nn / attn_nn returning the wrong width, a pos_nn
    that is not callable. Other coordinate counts with a matching pos_nn still equal PyG's layer."""
    pos, x = _points(10), torch.randn(10, 4)
    ei = knn_graph(pos, 3)
    with pytest.raises(ValueError, match=r"pos has 2 coordinates; the default pos_nn is Linear\(3, out_channels\): "
                                         r"pass pos_nn"):
        PointTransformerConv(4, 5)(x, pos[:, :2], ei)
    with pytest.raises(ValueError, match=r"pos has 3 coordinates but pos_nn is Linear\(2, 5\)"):
        PointTransformerConv(4, 5, pos_nn=nn.Linear(2, 5))(x, pos, ei)
    with pytest.raises(TypeError, match=r"pos \(source\) is torch.float64 but x is torch.float32"):
        PointTransformerConv(4, 5)(x, pos.double(), ei)
    with pytest.raises(TypeError, match=r"pos \(target\) is torch.float16 but x\b.* torch.float32"):
        PointTransformerConv((4, 4), 5)((x, x), (pos, pos.half()), ei)
    for dtype in (torch.float64, torch.bfloat16):
        with pytest.raises(TypeError, match=rf"PointTransformerConv: x is {dtype} but the layer's weights are "
                                            r"torch.float32"):
            PointTransformerConv(4, 5)(x.to(dtype), pos.to(dtype), ei)
    with pytest.raises(ValueError, match=r"pos_nn returned 7 channels .*expected \[40, out_channels=5\]"):
        PointTransformerConv(4, 5, pos_nn=nn.Linear(3, 7))(x, pos, ei)
    with pytest.raises(ValueError, match=r"attn_nn returned 7 channels .*expected \[40, out_channels=5\]"):
        PointTransformerConv(4, 5, attn_nn=nn.Linear(5, 7))(x, pos, ei)
    hooked = PointTransformerConv(4, 5, attn_nn=nn.Linear(5, 7))  # PyG's propagate path (a message hook)
    hooked.register_message_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match="attn_nn returned 7 channels"):
        hooked(x, pos, ei)
    for name in ("pos_nn", "attn_nn"):
        with pytest.raises(TypeError, match=f"{name} must be a module .* got int"):
            PointTransformerConv(4, 5, **{name: 3})
    # 2-D positions with a pos_nn that takes them: PyG's layer (outputs and gradients)
    pos2 = pos[:, :2].contiguous()
    ours, peer = _pair(4, 5, nets={"pos_nn": nn.Linear(2, 5)})
    _assert_same(ours, peer, x, pos2, knn_graph(pos2, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts float32 / bf16 (not float64) itself
        assert PointTransformerConv(4, 5)(x, pos.bfloat16(), ei).shape == (10, 5)
        with pytest.raises(TypeError, match=r"pos \(source\) is torch.float64 but x is torch.float32"):
            PointTransformerConv(4, 5)(x, pos.double(), ei)


def test_segment_softmax_checks_its_arguments_like_the_weighted_sum():
    """The public segment_softmax validated nothing (scatter's errors, or an AttributeError for a list); it now
    shares segment_softmax_weighted_sum's checks. num_segments must be an int in both (3.7 was truncated, "3"
    accepted). A segment whose scores are all -inf: NaN weights, as PyG's softmax (its documented behaviour here),
    while the weighted sum gives 0."""
    from torch_geometric.utils import softmax as pyg_softmax

    from zoo.attention.segment import segment_softmax, segment_softmax_weighted_sum

    s, idx = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    torch.testing.assert_close(segment_softmax(s, idx, 3), pyg_softmax(s, idx, num_nodes=3))
    for fn, args in (("segment_softmax", (s,)), ("segment_softmax_weighted_sum", (s, s))):
        call = segment_softmax if fn == "segment_softmax" else segment_softmax_weighted_sum
        with pytest.raises(ValueError, match=rf"{fn}: index values must lie in \[0, 3\), got 0\.\.5"):
            call(*args, torch.tensor([0, 0, 1, 1, 2, 5]), 3)
        with pytest.raises(ValueError, match=r"got -1\.\.2"):
            call(*args, torch.tensor([0, -1, 1, 1, 2, 2]), 3)
        with pytest.raises(TypeError, match=f"{fn}: index must be int64 or int32, got torch.float32"):
            call(*args, idx.float(), 3)
        for bad in (None, 3.7, 3.0, "3", True):
            with pytest.raises(TypeError, match=f"{fn}: num_segments must be an int, got {bad!r}"):
                call(*args, idx, bad)
        with pytest.raises(ValueError, match=f"{fn}: num_segments must be >= 0, got -1"):
            call(*args, idx, -1)
        with pytest.raises(ValueError, match=r"6 scores but index has shape \(5,\)"):
            call(*args, idx[:5], 3)
        assert call(*args, idx, np.int64(3)).shape == ((6, 3) if fn == "segment_softmax" else (3, 3))
    with pytest.raises(TypeError, match="segment_softmax: scores must be a torch.Tensor"):
        segment_softmax(s.tolist(), idx, 3)
    with pytest.raises(TypeError, match="segment_softmax: scores must be floating point, got torch.int64"):
        segment_softmax(s.long(), idx, 3)
    with pytest.raises(ValueError, match="segment_softmax: scores must be at least 1-D"):
        segment_softmax(torch.tensor(1.0), idx, 3)
    with pytest.raises(TypeError, match="segment_softmax_weighted_sum: values must be a torch.Tensor"):
        segment_softmax_weighted_sum(s, s.tolist(), idx, 3)
    # all -inf in segment 0: PyG's softmax gives NaN there, and so does segment_softmax (kept for parity)
    s_inf = torch.tensor([[float("-inf")], [float("-inf")], [0.0]])
    idx_inf = torch.tensor([0, 0, 1])
    ours, peer = segment_softmax(s_inf, idx_inf, 2), pyg_softmax(s_inf, idx_inf, num_nodes=2)
    torch.testing.assert_close(ours, peer, equal_nan=True)
    assert ours[:2].isnan().all() and ours[2] == 1
    assert torch.equal(segment_softmax_weighted_sum(s_inf, torch.ones(3, 1), idx_inf, 2), torch.tensor([[0.0], [1.0]]))


def test_weighted_sum_checks_rowptr_against_index():
    """rowptr (the Triton kernels' segments) that does not describe index gave wrong numbers silently on the
    kernel path (it was never compared with index): rowptr[0] = 0, rowptr[-1] = E, non-decreasing and index what
    rowptr implies are checked, whatever impl (the checks run before any kernel)."""
    from zoo.attention.segment import segment_softmax_weighted_sum

    g = torch.Generator().manual_seed(0)
    s, v = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g)
    idx = torch.tensor([0, 0, 1, 1, 2])
    want = segment_softmax_weighted_sum(s, v, idx, 3)
    for rowptr in (torch.tensor([0, 2, 4, 5]), torch.tensor([0, 2, 4, 5], dtype=torch.int32)):
        torch.testing.assert_close(segment_softmax_weighted_sum(s, v, idx, 3, rowptr=rowptr, impl="torch"), want)
    torch.testing.assert_close(segment_softmax_weighted_sum(s, v, idx.int(), 3, rowptr=torch.tensor([0, 2, 4, 5]),
                                                            impl="torch"), want)
    cases = [
        (idx, [0, 1, 2, 5], r"index does not match rowptr .*index\[1\] = 0 but rowptr puts entry 1 in segment 1"),
        (torch.tensor([2, 0, 1, 0, 1]), [0, 2, 4, 5], r"index does not match rowptr .*index\[0\] = 2"),
        (idx, [1, 2, 4, 5], r"rowptr must run from 0 to E = 5, got 1\.\.5"),
        (idx, [0, 2, 4, 6], r"rowptr must run from 0 to E = 5, got 0\.\.6"),
        (idx, [0, 3, 2, 5], r"rowptr must be non-decreasing, but rowptr\[2\] = 2 < rowptr\[1\] = 3"),
    ]
    for index, rowptr, match in cases:
        for impl in ("torch", "triton", "auto"):
            with pytest.raises(ValueError, match="segment_softmax_weighted_sum: " + match):
                segment_softmax_weighted_sum(s, v, index, 3, rowptr=torch.tensor(rowptr), impl=impl)
    with pytest.raises(TypeError, match="rowptr must be a 1-D integer tensor"):
        segment_softmax_weighted_sum(s, v, idx, 3, rowptr=torch.tensor([0.0, 2, 4, 5]))
    with pytest.raises(ValueError, match=r"rowptr has 3 entries .*num_segments \+ 1 = 4"):
        segment_softmax_weighted_sum(s, v, idx, 3, rowptr=torch.tensor([0, 2, 5]))
    empty = torch.zeros(0, 2)
    assert segment_softmax_weighted_sum(empty, empty, torch.zeros(0, dtype=torch.long), 2,
                                        rowptr=torch.zeros(3, dtype=torch.long)).shape == (2, 2)


def test_bench_points_smoke(capsys):
    """`zoo bench points` at a tiny size: both layers agree before timing and the row has positive times."""
    from zoo.bench import points

    assert points.main(["--sizes", "300", "--channels", "8", "--k", "4", "--repeats", "1", "--warmup", "0",
                        "--no-memory"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 300 |")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert int(cells[1]) == 300 * 4 and cells[4] == "kept" and float(cells[5]) > 0 and float(cells[6]) > 0
    assert float(cells[11]) < 1e-5 and float(cells[12]) < 1e-4  # outputs and gradients agree
    assert cells[8] == cells[9] == cells[10] == "-"  # --no-memory: not measured, not "nan"
    with pytest.raises(SystemExit):
        points.main(["--sizes", "3", "--k", "4"])
    assert "sizes > k" in capsys.readouterr().err


def test_point_transformer_compiles_and_matches_pyg(monkeypatch):
    """torch.compile (aot_eager: Dynamo + AOTAutograd, no codegen): PyG's outputs and gradients; the compiled
    layer runs as one block (a loop over blocks would be unrolled into the graph)."""
    import torch._dynamo

    monkeypatch.setattr(vector, "_BLOCK_ELEMENTS", 40)
    ours, peer = _pair(6, 8, nets={"attn_nn": _mlp(8)})
    pos, x = _points(30, seed=15), torch.randn(30, 6)
    ei = knn_graph(pos, 4)
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="aot_eager")
    out1, g1 = _run(compiled, x, pos, ei)
    out2, g2 = _run(peer, x, pos, ei)
    torch.testing.assert_close(out1, out2, **TOL)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    torch._dynamo.reset()


def test_blocks_hand_freed_heap_back_above_the_budget(monkeypatch):
    """Between blocks, glibc's freed heap is trimmed once it exceeds the budget (not after every block)."""
    calls = []

    class Info:
        fordblks = 0

    monkeypatch.setattr(vector, "_GLIBC", (lambda pad: calls.append(pad), lambda: Info))
    monkeypatch.setattr(vector, "_FREE_HEAP_BUDGET", 100)
    vector._release_free_heap()
    assert calls == []
    Info.fordblks = 101
    vector._release_free_heap()
    assert calls == [0]
    monkeypatch.setattr(vector, "_GLIBC", None)  # another C library: nothing to do
    vector._release_free_heap()


def test_second_derivatives_through_the_layer_equal_pyg_or_are_refused():
    """Forces from energies (d out / d pos, then backward) need backward(create_graph=True). The vector-attention
    aggregation's backward was once_differentiable, which raises only for incoming gradients that require grad:
    with constant ones the second-order terms were dropped silently (|dL/dW| 5.13 against PyG's 7.07; audit
    2026-12-06). It now recomputes differentiably; the other fused paths refuse by name."""
    from torch.autograd import gradgradcheck

    from zoo.attention import GATv2Conv, attend, segment_softmax_weighted_sum

    g = torch.Generator().manual_seed(0)
    scores, values = (torch.randn(9, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    index = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3])
    assert gradgradcheck(lambda s, v: segment_softmax_weighted_sum(s, v, index, 5), (scores, values))
    # the layer against PyG's, second order through pos
    torch.manual_seed(0)
    ours = PointTransformerConv(4, 4).double()
    peer = pyg_nn.PointTransformerConv(4, 4).double()
    peer.load_state_dict(ours.state_dict())
    x = torch.randn(12, 4, dtype=torch.float64)
    edge_index = knn_graph(_points(12, seed=3), 4, loop=True)
    grads = []
    for layer in (ours, peer):
        pos = _points(12, seed=3).double().requires_grad_(True)
        (forces,) = torch.autograd.grad(layer(x, pos, edge_index).square().sum(), pos, create_graph=True)
        (second,) = torch.autograd.grad(forces.square().sum(), layer.pos_nn.weight if hasattr(layer.pos_nn, "weight")
                                        else next(layer.pos_nn.parameters()))
        grads.append(second)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)
    # paths without second derivatives say so instead of returning first-order-only gradients
    q = torch.randn(1, 1, 20, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="block-sparse path has no second derivatives .* backend='torch'"):
        torch.autograd.grad(attend(q, q, q, backend="blocksparse").sum(), q, create_graph=True)
    torch.autograd.grad(attend(q, q, q, backend="torch").sum(), q, create_graph=True)  # the way out works
    conv = GATv2Conv(3, 2, heads=2).double()
    h = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="GATv2Conv\\) has no second derivatives .* torch_geometric.nn"):
        torch.autograd.grad(conv(h, torch.tensor([[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 0]])).sum(), h, create_graph=True)


def test_torch_cluster_signatures_and_trailing_examples():
    """torch_cluster's num_workers / batch_size keywords (positional too) and a tensor ratio were refused; queries
    in examples after batch_x's last raised where torch_cluster returns no neighbours (audit 2026-12-06)."""
    pos = _points(20)
    assert torch.equal(knn_graph(pos, 3, None, False, "source_to_target", False, 1), knn_graph(pos, 3))
    assert torch.equal(radius_graph(pos, 1.0, num_workers=2, batch_size=1), radius_graph(pos, 1.0))
    assert torch.equal(knn(pos, pos[:5], 2, num_workers=1, batch_size=1), knn(pos, pos[:5], 2))
    assert torch.equal(fps(pos, ratio=torch.tensor(0.5), random_start=False, batch_size=1),
                       fps(pos, ratio=0.5, random_start=False))
    with pytest.raises(ValueError, match="batch_size=1 but the batch vectors hold 2 examples"):
        knn(pos, pos, 2, _batch(10, 10), _batch(10, 10), batch_size=1)
    # queries of example 2, which has no points: no neighbours (the middle-example case already worked)
    x, bx = pos[:8], _batch(4, 4)
    y, by = pos[8:14], _batch(2, 2, 2)
    for edges in (knn(x, y, 2, bx, by), radius(x, y, 10.0, bx, by)):
        assert not bool((edges[0] >= 4).any()) and bool((edges[0] < 4).any())


def test_segment_functions_share_argument_names():
    """segment_softmax(scores, index, num_segments) took keywords, its sibling segment_softmax_weighted_sum only
    positionally (scores_EC=, values_EC=, index_E=)."""
    from zoo.attention import segment_softmax_weighted_sum

    scores, values = torch.randn(6, 3), torch.randn(6, 3)
    index = torch.tensor([0, 0, 1, 1, 2, 2])
    torch.testing.assert_close(segment_softmax_weighted_sum(scores=scores, values=values, index=index, num_segments=3),
                               segment_softmax_weighted_sum(scores, values, index, 3))


def test_a_graph_without_edges_gives_every_network_a_zero_gradient_as_pyg():
    """No edges: PyG runs pos_nn / attn_nn / lin_src / lin_dst on zero edges, so their parameters get zero
    gradients; ours returned a sum over nothing attached to lin only, leaving the others with .grad None, which
    optimizers skip (no momentum step, no weight decay): training then drifted from PyG's."""
    torch.manual_seed(0)
    peer = pyg_nn.PointTransformerConv(6, 5, pos_nn=nn.Sequential(nn.Linear(3, 5), nn.ReLU()),
                                       attn_nn=nn.Linear(5, 5), add_self_loops=False)
    ours = vector.PointTransformerConv(6, 5, pos_nn=copy.deepcopy(peer.pos_nn), attn_nn=copy.deepcopy(peer.attn_nn),
                                       add_self_loops=False)
    ours.load_state_dict(peer.state_dict())
    x, pos, no_edges = torch.randn(4, 6), torch.randn(4, 3), torch.zeros(2, 0, dtype=torch.long)
    for layer in (peer, ours):
        layer.zero_grad(set_to_none=True)
        layer(x, pos, no_edges).sum().backward()
    for (name, p_peer), (_, p_ours) in zip(peer.named_parameters(), ours.named_parameters()):
        assert (p_peer.grad is None) == (p_ours.grad is None), name
        if p_peer.grad is not None:
            torch.testing.assert_close(p_ours.grad, p_peer.grad, msg=name)


def test_a_batch_vector_for_one_side_only_is_refused():
    """knn / radius with batch_x but no batch_y (or the reverse) matched every query against example 0 only, without
    a word; torch_cluster asserts that both or neither are given (review, 2026-12-07)."""
    x, y = torch.randn(10, 3), torch.randn(6, 3)
    batch_x, batch_y = torch.tensor([0] * 5 + [1] * 5), torch.tensor([0] * 3 + [1] * 3)
    for call in (lambda **b: knn(x, y, 2, **b), lambda **b: radius(x, y, 1.0, **b)):
        with pytest.raises(ValueError, match=r"^batch_x is given but batch_y is not: give both batch vectors"):
            call(batch_x=batch_x)
        with pytest.raises(ValueError, match=r"^batch_y is given but batch_x is not: give both batch vectors"):
            call(batch_y=batch_y)
        call(batch_x=batch_x, batch_y=batch_y)
        call()


# ------------------------------------------------------------------------- geometry edge cases (audit m8, 2026-12-07)
def _others_by_distance(d_NN: torch.Tensor, i: int) -> list[int]:
    """Every point but i, nearest first, ties to the lower index (the rule of knn and torch_cluster)."""
    order = torch.argsort(d_NN[i], stable=True).tolist()
    return [j for j in order if j != i]


def test_graphs_without_loops_keep_at_most_the_cap_for_every_centre():
    """loop=False asks the search for one neighbour more and drops the point itself; a centre whose self was not
    among the hits (many nearer or duplicate points with lower indices) must still keep only k / max_num_neighbors
    others. Reference: brute force over torch.cdist in float64, every centre."""
    pos = _points(80, seed=9)
    r, cap = 0.9, 6
    d = torch.cdist(pos.double(), pos.double())
    ei = radius_graph(pos, r, max_num_neighbors=cap)
    crowded = 0
    for i in range(80):
        within = [j for j in range(80) if j != i and d[i, j] < r]
        crowded += sum(j < i for j in within) >= cap + 1  # the point itself is not among the search's hits
        assert ei[0][ei[1] == i].tolist() == within[:cap], i
    assert crowded > 0  # the cap binds where it can go wrong
    k = 5
    ei = knn_graph(pos, k)
    for i in range(80):
        assert ei[0][ei[1] == i].tolist() == _others_by_distance(d, i)[:k], i
    # duplicates: all six points at one place, each keeps exactly 2 others (the lowest indices but itself)
    same = torch.zeros(6, 2)
    for edges in (knn_graph(same, 2), radius_graph(same, 0.5, max_num_neighbors=2)):
        assert torch.bincount(edges[1], minlength=6).tolist() == [2] * 6
        assert not bool((edges[0] == edges[1]).any())
        for i in range(6):
            assert edges[0][edges[1] == i].tolist() == [j for j in range(6) if j != i][:2], i


def test_fps_ties_go_to_the_lowest_index():
    """Lattices tie exactly; fps picks the lowest index among equally far points, as the float64 reference loop
    (np.argmax) and torch_cluster's kernels do. Hand-worked: from corner 0 of the unit square the far corner 3
    (squared distance 2), then corners 1 and 2 tie at 1 -> 1, then 2, then the centre."""
    square = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.5]])
    assert fps(square, ratio=1.0, random_start=False).tolist() == [0, 3, 1, 2, 4]
    lattice_a = torch.stack(torch.meshgrid(torch.arange(6.0), torch.arange(5.0), indexing="ij"), -1).view(-1, 2)
    lattice_b = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).view(-1, 2)
    got = fps(torch.cat([lattice_a, lattice_b]), _batch(30, 16), ratio=0.5, random_start=False)
    expected = _fps_reference(lattice_a.double().numpy(), 15) + [30 + i for i in _fps_reference(lattice_b.double().numpy(), 8)]
    assert got.tolist() == expected


def test_radius_grid_keeps_pairs_just_below_r_at_cell_edges(monkeypatch):
    """The grid's cells are a hair wider than r so that a point nearer than r is at most one cell away; cells a
    hair narrower put such a point two cells away, where it was silently dropped. Queries swept across cell edges
    (the grid starts at the point 0.0), each with partners at r * (1 - 1e-8) on both sides. Reference: the
    float64 loop and the brute-force path."""
    import zoo.geometry as geometry

    r = 1.0
    # just below cell edges 2r, 3r, 5r; every partner stays >= 0, so that the grid's lower corner is 0.0
    queries = torch.cat([k * r - torch.arange(100, dtype=torch.float64) * 1e-7 for k in (2, 3, 5)])
    partners = torch.cat([queries + r * (1 - 1e-8), queries - r * (1 - 1e-8)])
    x = torch.cat([torch.tensor([0.0, 10.0], dtype=torch.float64), partners]).view(-1, 1)
    y = queries.view(-1, 1)
    assert float(x.min()) == 0.0
    monkeypatch.setattr(geometry, "_GRID_MIN_PAIRS", 0)
    got = radius(x, y, r, max_num_neighbors=len(x))
    n = len(queries)
    for q in range(n):  # each query finds both of its partners
        hits = set(got[1][got[0] == q].tolist())
        assert {2 + q, 2 + n + q} <= hits, q
    assert torch.equal(got, _radius_reference(x, y, r, len(x)))
    monkeypatch.setattr(geometry, "_GRID_MIN_PAIRS", 1 << 62)
    assert torch.equal(got, radius(x, y, r, max_num_neighbors=len(x)))


def test_batch_size_below_the_query_examples_is_refused():
    """batch_size must cover the examples of both batch vectors (torch_cluster sizes its pointers with it); a
    batch_x of one example and a batch_y of three with batch_size=1 or 2 ran as if it were right."""
    x, y = _points(4), _points(6, seed=1)
    batch_x, batch_y = torch.zeros(4, dtype=torch.long), _batch(2, 2, 2)
    for call in (lambda **kw: knn(x, y, 1, batch_x, batch_y, **kw), lambda **kw: radius(x, y, 10.0, batch_x, batch_y, **kw)):
        for size in (1, 2):
            with pytest.raises(ValueError, match="batch_size=%d but the batch vectors hold 3 examples" % size):
                call(batch_size=size)
        assert torch.equal(call(batch_size=3), call())


def test_fps_random_start_reaches_every_point_of_each_example():
    """random_start=True starts at a uniformly drawn point of each example (torch_cluster: randint(deg)), the last
    one included. Over 400 seeded draws: every index appears as an example's first pick, none far too rarely."""
    pos, batch = _points(6), _batch(2, 4)  # ratio 0.25: one pick per example, its start
    firsts = []
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for _ in range(400):
            firsts.append(fps(pos, batch, ratio=0.25).tolist())
    starts_a = torch.bincount(torch.tensor([f[0] for f in firsts]), minlength=6)
    starts_b = torch.bincount(torch.tensor([f[1] for f in firsts]), minlength=6)
    assert starts_a[2:].sum() == 0 and starts_b[:2].sum() == 0  # each start stays in its own example
    assert int(starts_a[:2].min()) > 400 / 2 / 2 and int(starts_b[2:].min()) > 400 / 4 / 2, (starts_a, starts_b)


def test_graph_errors_name_the_users_arguments():
    """knn_graph / radius_graph search x against itself through knn / radius, whose errors said batch_x (and
    "the batch vectors") for the user's ``batch``; Edges.knn's bad pos was reported as x (review rev8, finding 4)."""
    from zoo.attention import Edges

    pos = _points(6)
    for graph in (lambda **kw: knn_graph(pos, 2, **kw), lambda **kw: radius_graph(pos, 0.5, **kw)):
        with pytest.raises(ValueError, match=r"^batch must hold non-negative example ids in sorted order"):
            graph(batch=torch.tensor([1, 0, 0, 0, 0, 0]))
        with pytest.raises(ValueError, match=r"^batch must be an integer tensor of shape \[6\]"):
            graph(batch=torch.zeros(5, dtype=torch.long))
        with pytest.raises(ValueError, match=r"^batch_size=1 but batch holds 2 examples"):
            graph(batch=_batch(3, 3), batch_size=1)
    with pytest.raises(ValueError, match=r"^x contains NaN or Inf"):
        knn_graph(torch.full((4, 3), float("inf")), 2)
    for shape in ((4, 3), (2, 4, 3)):
        with pytest.raises(ValueError, match=r"^Edges.knn: pos contains NaN or Inf values"):
            Edges.knn(torch.full(shape, float("nan")), 2)
    # the paired searches keep torch_cluster's names
    with pytest.raises(ValueError, match=r"^batch_x must hold non-negative example ids"):
        knn(pos, pos, 2, torch.tensor([1, 0, 0, 0, 0, 0]), torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^batch_y must be an integer tensor of shape \[6\]"):
        radius(pos, pos, 0.5, torch.zeros(6, dtype=torch.long), torch.zeros(5, dtype=torch.long))
