"""``zoo bench points``: the zoo's PointTransformerConv (blockwise, memory-light) vs PyG's, forward + backward.

    zoo bench points [--sizes 10000,50000,200000] [--k 16] [--channels 32,64] [--threads 2] [--repeats 5]
                     [--warmup 1] [--no-memory] [--recompute auto|true|false]

``--recompute`` sets the zoo layer's ``recompute`` (default "auto", the layer's default: checkpointed blocks only
when the kept intermediates would pass about 1 GiB); the table says which the layer did for each row.

For every point count N and channel count C, one process draws N points uniformly in the unit cube with C
features, builds their k-nearest-neighbour graph with :func:`zoo.geometry.knn_graph` (timed: it is the
neighbourhood step of every Point Transformer layer; PyG's own knn_graph needs torch_cluster, not installed),
builds both layers with the MLPs of PyG's Point Transformer example
(examples/point_transformer_classification.py: pos_nn 3 -> 64 -> C, attn_nn C -> 64 -> C, ReLU) and the same
weights (PyG's state dict loaded strict into ours), checks that outputs and input gradients agree, then times
forward + backward (sum of the output, backward to the features and all parameters) interleaved (zoo, PyG,
zoo, PyG, ...) after warm-up and prints the medians and the speed-up (median over rounds of PyG / zoo time).

Peak memory as in ``zoo bench graph``: one fresh process per (case, layer) runs one forward + backward and
reports its VmHWM, beside a baseline process that builds the same inputs and layers but runs no step
("net" = peak - baseline). The workers load the kNN graph built here (the search's own peak would otherwise set
every process's high-water mark).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Optional

import torch
from torch import nn

from zoo.bench.timing import (
    add_timing_arguments,
    interleaved_samples, medians, memory_cells, output_and_grad_errors, paired_ratio, peak_rss_mb_subprocess,
    require_agreement, run_footer, run_header, set_threads,
)

__all__ = ["main", "build_parser", "make_case"]

_WORKER_CODE = """
import torch
torch.set_num_threads({threads})
from zoo.bench.points import make_case
x, pos, ei, ours, peer = make_case({points}, {k}, {channels}, edge_index=torch.load({graph!r}, weights_only=True),
                                   recompute={recompute!r})
layer = {{"zoo": ours, "pyg": peer, "none": None}}[{which!r}]
if layer is not None:
    layer(x, pos, ei).sum().backward()
"""


def _mlp(sizes: list[int]) -> nn.Module:
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_case(points: int, k: int, channels: int, seed: int = 0, edge_index: Optional[torch.Tensor] = None,
              recompute="auto"):
    """(x [N, C] needing grad, pos [N, 3], kNN edge_index, zoo layer, PyG layer with the same weights);
    ``edge_index``: the kNN graph of these points when already built (the memory workers load it, so the
    search's own peak does not hide the layer's); ``recompute``: the zoo layer's."""
    from torch_geometric.nn import PointTransformerConv as PygPointTransformerConv

    from zoo.attention.vector import PointTransformerConv
    from zoo.geometry import knn_graph

    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(points, 3, generator=g)
    x = torch.randn(points, channels, generator=g).requires_grad_(True)
    if edge_index is None:
        edge_index = knn_graph(pos, k)
    layers = []
    for cls in (PygPointTransformerConv, PointTransformerConv):
        torch.manual_seed(seed)
        layers.append(cls(channels, channels, pos_nn=_mlp([3, 64, channels]), attn_nn=_mlp([channels, 64, channels])))
    peer, ours = layers
    ours.load_state_dict(peer.state_dict(), strict=True)
    ours.recompute = recompute
    return x, pos, edge_index, ours, peer


def _step(layer, x, pos, edge_index):
    def run():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x, pos, edge_index).sum().backward()

    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoo bench points", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10000,50000,200000", help="comma list of point counts N")
    p.add_argument("--k", type=int, default=16, help="neighbours per point")
    p.add_argument("--channels", default="32,64", help="comma list of channels C")
    add_timing_arguments(p, what="layer")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--recompute", choices=("auto", "true", "false"), default="auto",
                   help="the zoo layer's recompute (default auto, the layer's default)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        sizes = [int(float(s)) for s in args.sizes.split(",") if s.strip()]
        channels = [int(c) for c in args.channels.split(",") if c.strip()]
    except ValueError:
        parser.error("--sizes and --channels take comma-separated integers")
    if not sizes or not channels or min(sizes) <= args.k or args.k < 1 or min(channels) < 1 or args.repeats < 1 \
            or args.warmup < 0:
        parser.error("need sizes > k >= 1, channels >= 1, --repeats >= 1, --warmup >= 0")
    from zoo.attention import vector
    from zoo.geometry import knn_graph

    recompute = {"auto": "auto", "true": True, "false": False}[args.recompute]
    threads = set_threads(args.threads)
    print("## zoo bench points\n\n" + run_header("points", argv, threads, f"fp32 CPU; k = {args.k}; pos_nn 3-64-C, "
                                                  "attn_nn C-64-C (PyG's Point Transformer example)"))
    print("| points | edges | C | knn_graph (s) | zoo blocks | zoo fwd+bwd (s) | PyG fwd+bwd (s) | speed-up | "
          "zoo peak MB (net) | PyG peak MB (net) | PyG/zoo memory (net) | max out err | max rel grad err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for n in sizes:
        for c in channels:
            x, pos, ei, ours, peer = make_case(n, args.k, c, recompute=recompute)
            # PyG's self loops: one per point (kNN graphs have none to remove), E' = E + N; an input that fits
            # one block is never checkpointed
            edges_with_loops = ei.size(1) + n
            several_blocks = edges_with_loops > max(1, vector._BLOCK_ELEMENTS // c)
            mode = "recomputed" if several_blocks and ours._recomputes(edges_with_loops, c, x) else "kept"
            start = time.perf_counter()  # the kNN graph again on its own, for its time
            knn_graph(pos, args.k)
            t_knn = time.perf_counter() - start
            out_err, grad_err = output_and_grad_errors(x, ours, peer, pos, ei)
            require_agreement(f"zoo bench points N={n} C={c}", out_err, grad_err)
            samples = interleaved_samples({"zoo": _step(ours, x, pos, ei), "pyg": _step(peer, x, pos, ei)},
                                          repeats=args.repeats, warmup=args.warmup)
            t = medians(samples)
            speedup = paired_ratio(samples["pyg"], samples["zoo"])
            edges = ei.size(1)
            del x, pos, ours, peer
            mem = {"none": float("nan"), "zoo": float("nan"), "pyg": float("nan")}
            if not args.no_memory:
                with tempfile.TemporaryDirectory() as tmp:
                    graph = os.path.join(tmp, "edge_index.pt")
                    torch.save(ei, graph)
                    for which in mem:
                        mem[which] = peak_rss_mb_subprocess(_WORKER_CODE.format(
                            threads=threads, points=n, k=args.k, channels=c, which=which, graph=graph,
                            recompute=recompute))
            zoo_mb, pyg_mb, ratio = memory_cells(mem)
            print(f"| {n} | {edges} | {c} | {t_knn:.2f} | {mode} | {t['zoo']:.3f} | {t['pyg']:.3f} | {speedup:.2f}x | "
                  f"{zoo_mb} | {pyg_mb} | {ratio} | {out_err:.1e} | {grad_err:.1e} |", flush=True)
            del ei
    print("\nspeed-up: PyG time / zoo time (> 1: the zoo is faster). peak: VmHWM of a fresh process running one "
          "forward+backward; net = peak - a baseline process that builds the same inputs and layers but runs no "
          "step. PyG's self loops are added by both layers (E' = edges + points). zoo blocks: recomputed = "
          "checkpointed blocks (a second forward in backward, O(N C) memory), kept = every intermediate kept "
          "as in PyG.")
    print(run_footer())
    return 0


if __name__ == "__main__":
    sys.exit(main())
