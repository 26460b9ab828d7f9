"""``zoo bench graph``: the zoo's GATv2Conv (fused edge softmax) vs PyG's GATv2Conv, forward + backward (or, with
``--layer transformer``, TransformerConv vs PyG's TransformerConv).

    zoo bench graph [--layer gatv2|transformer] [--sizes 10000:1000,100000:10000,1000000:100000,2000000:200000] [--heads 8]
                    [--channels 8,64] [--in-channels C] [--threads 2] [--repeats 5] [--warmup 1]
                    [--device cpu|cuda] [--no-memory] [--memory-only] [--skip-peer-above E]
                    [--peer-max-gb GB] [--compile inductor]

For every (E edges : N nodes) random graph and channel count C (heads H, input features = C unless
--in-channels), one process builds both layers with the same weights (PyG's state dict loaded strict
into ours), checks that outputs and input gradients agree, then times forward + backward (sum of the
output, backward to the input and all parameters) interleaved (zoo, PyG, zoo, PyG, ...) after warm-up
and prints the medians and the speed-up: the median over rounds of PyG time / zoo time (> 1: the zoo is faster).

Peak memory: each layer's forward + backward runs once in a fresh Python process (a worker per case
and layer) and reports its peak: on CPU the VmHWM of that process (see :func:`zoo.bench.timing.peak_rss_mb_subprocess`
for why not ru_maxrss), beside a baseline process that builds the same inputs and layer but runs
nothing ("net" = peak - baseline, the memory of the step); on CUDA torch.cuda.max_memory_allocated of
the worker (the baseline then holds the inputs and weights).

PyG is skipped where its [E, H, C] tensors would not fit: about 26 bytes per E'*H*C element in fp32
(E' = E + N with the self loops; 13.2 GB measured at 1M edges, H=8, C=64), compared with --peer-max-gb
(default: 85% of the memory available when the benchmark starts). Each row also prints the 1-minute
load average at its end: the machines here are shared, only the ratios of one run are comparable.

``--compile BACKEND`` wraps both layers in ``torch.compile(layer, backend=BACKEND, dynamic=False)`` (static
graphs per case) for the timing and the memory workers alike; compilation happens in the check and warm-up.
The zoo layer then runs its graph structure and its fused attention between the compiled graphs
(zoo/attention/segment.py), as in eager mode.

Issue 6 targets: CPU, 1M edges, 100k nodes, H=8, C=64: >= 2x faster, >= 8x less peak memory; GPU: >= 3x
faster (run ``zoo bench graph --device cuda``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

import torch

from zoo.bench.timing import (
    add_timing_arguments,
    compile_backend_arg, interleaved_samples, machine_description, medians, memory_cells, output_and_grad_errors,
    paired_ratio, peak_rss_mb_subprocess, positive_int, require_agreement, run_footer, run_header, set_threads,
)

__all__ = ["main", "build_parser", "make_case", "peer_bytes_estimate"]

# One worker process per (case, layer): builds the case, runs one forward + backward, prints its peak. On CUDA
# one untimed step comes first: the first call autotunes Triton kernels, and do_bench's 256 MB L2-flush buffer
# (and compilation, with --compile) would land in the layer's peak; the peak is reset after it (as bench_gpu's
# memory check in zoo/bench/attention.py does), with the step's gradients dropped so the measured step
# allocates them again. On CPU the peak is the process's VmHWM, which a warm-up step would only add to: one step.
_WORKER_CODE = """
import torch
torch.set_num_threads({threads})
from zoo.bench.graph import make_case
x, ei, ours, peer = make_case({nodes}, {edges}, {heads}, {channels}, {in_channels}, device={device!r}, layer={layer!r})
layer = {{"zoo": ours, "pyg": peer, "none": None}}[{which!r}]
if layer is not None and {compile!r}:
    layer = torch.compile(layer, backend={compile!r}, dynamic=False)
cuda = {device!r}.startswith("cuda")
if cuda:
    if layer is not None:
        layer(x, ei).sum().backward()
        x.grad = None
        layer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
if layer is not None:
    out = layer(x, ei)
    out.sum().backward()
if cuda:
    torch.cuda.synchronize()
    print("CUDA_PEAK_BYTES=%d" % torch.cuda.max_memory_allocated())
"""

BYTES_PER_PEER_ELEMENT = 26  # PyG GATv2Conv fwd+bwd peak / (E' H C), fp32 CPU: 13.2 GB / (1.1M * 8 * 64)
LAYERS = ("gatv2", "transformer")


def peer_bytes_estimate(edges: int, nodes: int, heads: int, channels: int, layer: str = "gatv2") -> float:
    """Rough peak bytes of PyG's layer forward + backward (dominated by its [E', H, C] tensors; E' = E + N with
    GATv2's self loops, E for TransformerConv, which adds none: the same bytes per element is taken for both)."""
    return BYTES_PER_PEER_ELEMENT * (edges + (nodes if layer == "gatv2" else 0)) * heads * channels


def _available_gb(device: str) -> float:
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info()
        return free / 2**30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:  # pragma: no cover
        pass
    return float("inf")


def make_case(nodes: int, edges: int, heads: int, channels: int, in_channels: int, device: str = "cpu", seed: int = 0,
              layer: str = "gatv2"):
    """Random graph (uniform sources and destinations), features x [N, in_channels] needing grad, and the
    two layers with identical weights: (x, edge_index, zoo layer, PyG layer); ``layer`` "gatv2" (GATv2Conv) or
    "transformer" (TransformerConv)."""
    import torch_geometric.nn as pyg_nn

    from zoo.attention import graph as zoo_graph

    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
    name = {"gatv2": "GATv2Conv", "transformer": "TransformerConv"}[layer]
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, nodes, (2, edges), generator=g).to(device)
    x = torch.randn(nodes, in_channels, generator=g).to(device).requires_grad_(True)
    torch.manual_seed(seed)
    peer = getattr(pyg_nn, name)(in_channels, channels, heads=heads).to(device)
    ours = getattr(zoo_graph, name)(in_channels, channels, heads=heads).to(device)
    ours.load_state_dict(peer.state_dict(), strict=True)
    return x, edge_index, ours, peer


def _step(layer, x, edge_index):
    def run():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        out = layer(x, edge_index)
        out.sum().backward()

    return run


def _memory(nodes, edges, heads, channels, in_channels, threads, device, run_peer: bool,
            backend: Optional[str] = None, layer: str = "gatv2") -> dict:
    res = {"none": float("nan"), "zoo": float("nan"), "pyg": float("nan")}
    for which in ("none", "zoo", "pyg") if run_peer else ("none", "zoo"):
        code = _WORKER_CODE.format(threads=threads, nodes=nodes, edges=edges, heads=heads, channels=channels,
                                   in_channels=in_channels, device=device, which=which, compile=backend, layer=layer)
        res[which] = peak_rss_mb_subprocess(code)
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoo bench graph", description=__doc__.split("\n")[0])
    p.add_argument("--layer", default="gatv2", choices=LAYERS,
                   help="gatv2: GATv2Conv (default); transformer: TransformerConv (dot-product attention over the edges)")
    p.add_argument("--sizes", default="10000:1000,100000:10000,1000000:100000,2000000:200000",
                   help="comma list of EDGES:NODES")
    p.add_argument("--heads", type=positive_int, default=8)
    p.add_argument("--channels", default="8,64", help="comma list of channels per head C")
    p.add_argument("--in-channels", type=positive_int, default=None, help="input features (default: C)")
    add_timing_arguments(p, what="layer")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--memory-only", action="store_true", help="only the peak-memory subprocesses")
    p.add_argument("--skip-peer-above", type=int, default=None,
                   help="do not run PyG above this many edges")
    p.add_argument("--peer-max-gb", type=float, default=None,
                   help="do not run PyG where its estimated peak exceeds this (default: 85%% of available memory)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also draw time and peak memory against the edge count, zoo vs PyG, into this PNG")
    p.add_argument("--compile", default=None, metavar="BACKEND", type=compile_backend_arg,
                   help="torch.compile both layers with this backend (e.g. inductor) before timing and in the memory "
                        "workers")
    return p


def plot_graph(rows: list[tuple[int, int, float, float, float, float]], path, title: str):
    """Forward+backward time and net peak memory against the edge count, zoo vs PyG, one line per C
    (``rows``: edges, C, zoo s, PyG s, zoo net MB, PyG net MB; NaN where not measured)."""
    from zoo.plotting import png_path, pyplot, save_figure

    path = png_path(str(path))
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, c in enumerate(sorted({row[1] for row in rows})):
        mine = sorted(row for row in rows if row[1] == c)
        for ax, first in ((axes[0], 2), (axes[1], 4)):
            for offset, (who, style) in enumerate((("zoo", "-"), ("PyG", "--"))):
                pts = [(row[0], row[first + offset]) for row in mine if row[first + offset] == row[first + offset]]
                if pts:
                    ax.plot([e for e, _ in pts], [v for _, v in pts], style, marker="o", color=colors[i % len(colors)],
                            label=f"{who}, C={c}")
    for ax, label in ((axes[0], "forward+backward time (s)"), (axes[1], "peak memory above baseline (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("edges")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def _load1() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return float("nan")


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    if args.compile:  # the first call of a compiled layer compiles it: never timed, whatever --warmup says
        args.warmup = max(args.warmup, 1)
    if args.no_memory and args.memory_only:
        raise SystemExit("--no-memory and --memory-only exclude each other")
    sizes = []
    for item in args.sizes.split(","):
        try:
            e, n = item.split(":")
            sizes.append((int(float(e)), int(float(n))))  # float(): 1e6 reads as a million
            if min(sizes[-1]) < 1:
                raise ValueError(item)
        except ValueError:
            raise SystemExit(f"--sizes items are EDGES:NODES, both integers >= 1, got {item!r}") from None
    try:
        channels = [int(c) for c in args.channels.split(",")]
        if not channels or min(channels) < 1:
            raise ValueError(args.channels)
    except ValueError:
        raise SystemExit(f"--channels must be a comma list of integers >= 1, got {args.channels!r}") from None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device} needs a CUDA GPU and none is available here (use --device cpu)")
    threads = set_threads(args.threads)
    peer_max_gb = args.peer_max_gb if args.peer_max_gb is not None else 0.85 * _available_gb(args.device)
    details = (f"layer {args.layer}; device {args.device}; PyG run where its estimated peak <= {peer_max_gb:.1f} GB; "
               f"{'both layers under torch.compile backend ' + args.compile if args.compile else 'eager'}")
    print("## zoo bench graph\n\n" + run_header("graph", argv, threads, details))
    mem_unit = "GPU MB" if args.device.startswith("cuda") else "MB"
    print(f"| edges | nodes | H | C | zoo fwd+bwd (s) | PyG fwd+bwd (s) | speed-up | zoo peak {mem_unit} (net) | "
          f"PyG peak {mem_unit} (net) | PyG/zoo memory | max out err | max rel grad err | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    skipped, plotted = [], []
    for edges, nodes in sizes:
        for c in channels:
            cin = args.in_channels if args.in_channels is not None else c
            need_gb = peer_bytes_estimate(edges, nodes, args.heads, c, args.layer) / 2**30
            asked_off = args.skip_peer_above is not None and edges > args.skip_peer_above
            peer_ok = not asked_off and need_gb <= peer_max_gb
            if asked_off:
                skipped.append(f"E={edges}, C={c} (above --skip-peer-above {args.skip_peer_above})")
            elif not peer_ok:
                skipped.append(f"E={edges}, C={c} (would not fit: PyG estimated {need_gb:.1f} GB)")
            t_zoo = t_pyg = speedup = out_err = grad_err = float("nan")
            if not args.memory_only:
                x, ei, ours, peer = make_case(nodes, edges, args.heads, c, cin, device=args.device, layer=args.layer)
                if args.compile:  # static graphs per case, as in the vision benchmark
                    ours, peer = (torch.compile(m, backend=args.compile, dynamic=False) for m in (ours, peer))
                fns = {"zoo": _step(ours, x, ei)}
                if peer_ok:
                    out_err, grad_err = output_and_grad_errors(x, ours, peer, ei)
                    require_agreement(f"zoo bench graph E={edges} C={c}", out_err, grad_err)
                    fns["pyg"] = _step(peer, x, ei)
                samples = interleaved_samples(fns, repeats=args.repeats, warmup=args.warmup, device=args.device)
                t = medians(samples)
                t_zoo = t["zoo"]
                if "pyg" in samples:  # the median over rounds of PyG time / zoo time in that round
                    t_pyg, speedup = t["pyg"], paired_ratio(samples["pyg"], samples["zoo"])
                del x, ei, ours, peer, fns
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
            mem = {"none": float("nan"), "zoo": float("nan"), "pyg": float("nan")}
            if not args.no_memory:
                mem = _memory(nodes, edges, args.heads, c, cin, threads, args.device, peer_ok, args.compile, args.layer)
            zoo_mb, pyg_mb, ratio = memory_cells(mem, net_label=" net")
            plotted.append((edges, c, t_zoo, t_pyg, mem["zoo"] - mem["none"], mem["pyg"] - mem["none"]))
            def cell(value: float, spec: str, missing: str = "-") -> str:  # not run / not measured: no "nan"
                return missing if value != value else format(value, spec)

            pyg_time = cell(t_pyg, ".3f", "not run" if not peer_ok else "-")
            print(f"| {edges} | {nodes} | {args.heads} | {c} | {cell(t_zoo, '.3f')} | {pyg_time} | "
                  f"{cell(speedup, '.2f')}{'x' if speedup == speedup else ''} | {zoo_mb} | "
                  f"{pyg_mb if peer_ok else 'not run'} | {ratio} | {cell(out_err, '.1e')} | {cell(grad_err, '.1e')} | "
                  f"{_load1():.1f} |", flush=True)
    print("\npeak: " + ("torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "VmHWM")
          + " of a fresh process running one forward+backward; net = peak - a baseline process that builds the"
          " same inputs and layers but runs no step. load: 1-minute load average at the end of the row.")
    if skipped:
        print("PyG not run: " + "; ".join(skipped) + ".")
    if args.plot:
        title = (f"{'GATv2Conv' if args.layer == 'gatv2' else 'TransformerConv'} forward+backward, zoo vs PyG: H={args.heads}, random graphs, {args.device}, {threads} "
                 f"threads\n{machine_description()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        print(f"plot: {plot_graph(plotted, args.plot, title)}")
    print(run_footer())
    return 0


if __name__ == "__main__":
    sys.exit(main())
