"""``zoo bench knn``: dot-product attention over each point's k nearest neighbours, three ways, forward + backward.

    zoo bench knn [--sizes 4096,16384] [--k 16] [--heads 4] [--head-dim 32] [--order morton,random]
                  [--threads 2] [--repeats 5] [--warmup 1]

For every point count N and point order, one process spreads N points on the unit sphere (seed 0), orders them
along the Z-order curve (:func:`zoo.geometry.morton_order`) or leaves them in random order, builds the kNN mask
``Edges.knn(pos, k)`` (each point attends to its k nearest, itself included) and random q, k, v
(1, H, N, D), then times forward + backward (sum of the output, backward to q, k and v) of:

* ``zoo``: ``attend(q, k, v, mask=edges)`` with the backend attend() picks (the CPU block-sparse path when the
  mask leaves few tiles, SDPA otherwise; the table names it);
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with the mask's dense (N, N) bool form, built
  before timing (the peer for a mask given as a tensor);
* ``pyg``: the message-passing form PyG's TransformerConv computes between its projections -- per edge
  q_i . k_j, ``torch_geometric.utils.softmax`` over each target, ``torch_geometric.utils.scatter`` of the
  weighted values -- O(E) work and memory, no tiles.

The three must agree (outputs and input gradients) before anything is timed. Calls are interleaved after warm-up
(zoo.bench.timing.interleaved_samples); the ratios are medians over rounds of the peer's time / the zoo's time
(> 1: the zoo is faster). The mask build (kNN search and block map) is timed once, apart.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

import torch

from zoo.bench.timing import (
    add_timing_arguments, interleaved_samples, medians, paired_ratio, run_footer, run_header, set_threads,
)

__all__ = ["main", "build_parser", "make_case"]

ORDERS = ("morton", "random")


def make_case(points: int, k: int, heads: int, head_dim: int, order: str, seed: int = 0):
    """(edges mask, q, k, v, edge_index) for ``points`` on the unit sphere in ``order``; q/k/v require grad."""
    from zoo.attention import Edges
    from zoo.geometry import morton_order

    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(points, 3, generator=g, dtype=torch.float64)
    pos = (pos / pos.norm(dim=1, keepdim=True).clamp_min(1e-12)).float()
    if order == "morton":
        pos = pos[morton_order(pos)]
    edges = Edges.knn(pos, k)
    q, key, v = (torch.randn(1, heads, points, head_dim, generator=g).requires_grad_(True) for _ in range(3))
    return edges, q, key, v, edges.edge_index


def _message_passing(q, k, v, edge_index, scale):
    """PyG's edge softmax and sum aggregation: (1, H, N, D) -> (1, H, N, D)."""
    from torch_geometric.utils import scatter, softmax

    src, dst = edge_index
    q_NHD, k_NHD, v_NHD = (t[0].transpose(0, 1) for t in (q, k, v))
    alpha_EH = softmax((q_NHD[dst] * k_NHD[src]).sum(-1) * scale, dst, num_nodes=q_NHD.shape[0])
    out_NHD = scatter(v_NHD[src] * alpha_EH[..., None], dst, dim=0, dim_size=q_NHD.shape[0], reduce="sum")
    return out_NHD.transpose(0, 1)[None]


def _contenders(edges, q, k, v, edge_index):
    import torch.nn.functional as F

    from zoo.attention import attend

    n, scale = q.shape[2], q.shape[-1] ** -0.5
    dense = edges.dense(n, n)
    return {
        "zoo": lambda: attend(q, k, v, mask=edges, scale=scale),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale),
        "pyg": lambda: _message_passing(q, k, v, edge_index, scale),
    }


def _step(fn, inputs):
    def run():
        for t in inputs:
            t.grad = None
        fn().sum().backward()

    return run


def _errors(fns, inputs) -> float:
    """Largest difference from the zoo's output and input gradients, relative to each one's largest value."""
    results = {}
    for name, fn in fns.items():
        for t in inputs:
            t.grad = None
        out = fn()
        grads = torch.autograd.grad(out.sum(), inputs)
        results[name] = (out.detach(), *grads)
    worst = 0.0
    for name in ("sdpa", "pyg"):
        for ours, theirs in zip(results["zoo"], results[name]):
            worst = max(worst, float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30)))
    return worst


def _seconds(t: float) -> str:
    """A time in seconds for the table: three decimals, or two significant digits below a millisecond (a tiny
    problem printed 0.000)."""
    return f"{t:.3f}" if t >= 0.001 else f"{t:.1e}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoo bench knn", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="4096,16384", help="comma list of point counts N")
    p.add_argument("--k", type=int, default=16, help="neighbours per point (the point itself included)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--order", default="morton,random", help=f"comma list of point orders: {', '.join(ORDERS)}")
    add_timing_arguments(p)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        sizes = [int(float(s)) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error("--sizes takes comma-separated integers")
    orders = [o for o in args.order.split(",") if o]
    if not orders or any(o not in ORDERS for o in orders):
        parser.error(f"--order takes a comma list of {', '.join(ORDERS)}")
    if not sizes or min(sizes) < 2 or args.k < 1 or args.heads < 1 or args.head_dim < 1 or args.repeats < 1 \
            or args.warmup < 0:
        parser.error("need sizes >= 2, k, heads, head-dim >= 1, --repeats >= 1, --warmup >= 0")
    from zoo.attention import backends

    threads = set_threads(args.threads)
    print("## zoo bench knn\n\n" + run_header("knn", argv, threads, f"fp32 CPU; k = {args.k}; H = {args.heads}; "
                                              f"D = {args.head_dim}; forward + backward"))
    print("| points | order | kept tiles (128) | mask build (s) | zoo backend | zoo (s) | SDPA dense mask (s) | "
          "PyG softmax+scatter (s) | SDPA/zoo | PyG/zoo | max rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for n in sizes:
        for order in orders:
            start = time.perf_counter()
            edges, q, k, v, edge_index = make_case(n, args.k, args.heads, args.head_dim, order)
            kept = edges.block_map(n, n, 128, 128).kept_fraction()
            build = time.perf_counter() - start
            inputs = (q, k, v)
            chosen = backends.select_backend((q, k, v, edges, None, args.head_dim ** -0.5, "softmax", 0.0, False),
                                             None).name
            fns = _contenders(edges, q, k, v, edge_index)
            err = _errors(fns, inputs)
            if not err <= 1e-4:
                raise SystemExit(f"zoo bench knn N={n} {order}: the contenders disagree (max rel err {err:.1e})")
            samples = interleaved_samples({name: _step(fn, inputs) for name, fn in fns.items()},
                                          repeats=args.repeats, warmup=args.warmup)
            t = medians(samples)
            print(f"| {n} | {order} | {kept:.3f} | {build:.2f} | {chosen} | {_seconds(t['zoo'])} | {_seconds(t['sdpa'])} | "
                  f"{_seconds(t['pyg'])} | {paired_ratio(samples['sdpa'], samples['zoo']):.2f}x | "
                  f"{paired_ratio(samples['pyg'], samples['zoo']):.2f}x | {err:.1e} |", flush=True)
            del fns, edges, q, k, v
    print("\nratios: the peer's time / the zoo's (> 1: the zoo is faster), medians over interleaved rounds. kept "
          "tiles: the share of 128 x 128 (query, key) tiles holding an edge. The dense mask SDPA reads is built "
          "before timing.")
    print(run_footer())
    return 0


if __name__ == "__main__":
    sys.exit(main())
