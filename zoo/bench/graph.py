"""``zoo bench graph``: the zoo's GATv2Conv (fused edge softmax) vs PyG's GATv2Conv, forward + backward.

    zoo bench graph [--sizes 10000:1000,100000:10000,1000000:100000,2000000:200000] [--heads 8]
                    [--channels 8,64] [--in-channels C] [--threads 2] [--repeats 5] [--warmup 1]
                    [--device cpu|cuda] [--no-memory] [--memory-only] [--skip-peer-above E]

For every (E edges : N nodes) random graph and channel count C (heads H, input features = C unless
--in-channels), one process builds both layers with the same weights (PyG's state dict loaded strict
into ours), checks that outputs and input gradients agree, then times forward + backward (sum of the
output, backward to the input and all parameters) interleaved (zoo, PyG, zoo, PyG, ...) after warm-up
and prints the medians and the ratio PyG / zoo (> 1: the zoo is faster).

Peak memory: each layer's forward + backward runs once in a fresh Python process and its peak RSS
(VmHWM of the child; see :func:`peak_mb_fresh_process` for why not ru_maxrss) is reported, beside a baseline process that builds
the same inputs and layer but runs nothing (so "net" = peak - baseline is the memory of the step). Peak memory is host RSS only: on CUDA
the columns say nothing about GPU memory (use --no-memory there).

Issue 6 targets: CPU, 1M edges, 100k nodes, H=8, C=64: >= 2x faster, >= 8x less peak memory.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from typing import Optional

import torch

import os
import subprocess

from zoo.bench.timing import interleaved_medians, machine_description, set_threads

__all__ = ["main", "build_parser", "make_case"]

_CASE_CODE = """
import torch
torch.set_num_threads({threads})
from zoo.bench.graph import make_case
x, ei, ours, peer = make_case({nodes}, {edges}, {heads}, {channels}, {in_channels}, device={device!r})
layer = {{"zoo": ours, "pyg": peer, "none": None}}[{which!r}]
if layer is not None:
    out = layer(x, ei)
    out.sum().backward()
    {sync}
"""


def make_case(nodes: int, edges: int, heads: int, channels: int, in_channels: int, device: str = "cpu", seed: int = 0):
    """Random graph (uniform sources and destinations), features x [N, in_channels] needing grad, and the
    two layers with identical weights: (x, edge_index, zoo GATv2Conv, PyG GATv2Conv)."""
    from torch_geometric.nn import GATv2Conv as PygGATv2Conv

    from zoo.attention.graph import GATv2Conv

    g = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, nodes, (2, edges), generator=g).to(device)
    x = torch.randn(nodes, in_channels, generator=g).to(device).requires_grad_(True)
    torch.manual_seed(seed)
    peer = PygGATv2Conv(in_channels, channels, heads=heads).to(device)
    ours = GATv2Conv(in_channels, channels, heads=heads).to(device)
    ours.load_state_dict(peer.state_dict(), strict=True)
    return x, edge_index, ours, peer


def _step(layer, x, edge_index):
    def run():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        out = layer(x, edge_index)
        out.sum().backward()

    return run


def _check(x, ei, ours, peer) -> tuple[float, float]:
    out1 = ours(x, ei)
    out1.sum().backward()
    g1, x.grad = x.grad.clone(), None
    out2 = peer(x, ei)
    out2.sum().backward()
    g2, x.grad = x.grad.clone(), None
    out_err = (out1 - out2).abs().max().item()
    grad_err = ((g1 - g2).abs().max() / g2.abs().max().clamp_min(1e-12)).item()
    del out1, out2, g1, g2
    ours.zero_grad(set_to_none=True)
    peer.zero_grad(set_to_none=True)
    return out_err, grad_err


def peak_mb_fresh_process(code: str) -> float:
    """Peak resident memory (MiB) of a fresh ``python -c code``, read from the child's own
    /proc/self/status VmHWM. (ru_maxrss of a child is not usable here: Linux carries the forking
    parent's high-water mark across fork+exec, so after a big in-process run every child reports the
    parent's peak; VmHWM belongs to the new address space that exec creates.)"""
    probe = code + "\nprint([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=dict(os.environ))
    if result.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{result.stderr[-2000:]}")
    return int(result.stdout.strip().splitlines()[-1]) / 1024


def _memory(nodes, edges, heads, channels, in_channels, threads, device) -> dict:
    res = {}
    for which in ("none", "zoo", "pyg"):
        code = _CASE_CODE.format(
            threads=threads, nodes=nodes, edges=edges, heads=heads, channels=channels, in_channels=in_channels,
            device=device, which=which,
            sync="torch.cuda.synchronize()" if device.startswith("cuda") else "pass",
        )
        res[which] = peak_mb_fresh_process(code)
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoo bench graph", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10000:1000,100000:10000,1000000:100000,2000000:200000",
                   help="comma list of EDGES:NODES")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--channels", default="8,64", help="comma list of channels per head C")
    p.add_argument("--in-channels", type=int, default=None, help="input features (default: C)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--memory-only", action="store_true", help="only the peak-memory subprocesses")
    p.add_argument("--skip-peer-above", type=int, default=None,
                   help="do not run PyG above this many edges (its [E, H, C] tensors may not fit)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    sizes = []
    for item in args.sizes.split(","):
        e, n = item.split(":")
        sizes.append((int(float(e)), int(float(n))))
    channels = [int(c) for c in args.channels.split(",")]
    threads = set_threads(args.threads)
    command = "zoo bench graph " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"## zoo bench graph\n\ncommand: `{command.strip()}`  ")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  ")
    print(f"machine: {machine_description()}; torch threads {threads}\n")
    print("| edges | nodes | H | C | zoo fwd+bwd (s) | PyG fwd+bwd (s) | speed-up | zoo peak MB (net) | "
          "PyG peak MB (net) | memory ratio | max out err | max rel grad err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for edges, nodes in sizes:
        for c in channels:
            cin = args.in_channels or c
            peer_ok = args.skip_peer_above is None or edges <= args.skip_peer_above
            t_zoo = t_pyg = out_err = grad_err = float("nan")
            if not args.memory_only:
                x, ei, ours, peer = make_case(nodes, edges, args.heads, c, cin, device=args.device)
                fns = {"zoo": _step(ours, x, ei)}
                if peer_ok:
                    out_err, grad_err = _check(x, ei, ours, peer)
                    fns["pyg"] = _step(peer, x, ei)
                med = interleaved_medians(fns, repeats=args.repeats, warmup=args.warmup, device=args.device)
                t_zoo, t_pyg = med["zoo"], med.get("pyg", float("nan"))
                del x, ei, ours, peer, fns
            mem = {"none": float("nan"), "zoo": float("nan"), "pyg": float("nan")}
            if not args.no_memory:
                mem = _memory(nodes, edges, args.heads, c, cin, threads, args.device)
                if not peer_ok:
                    mem["pyg"] = float("nan")
            net = {k: mem[k] - mem["none"] for k in ("zoo", "pyg")}
            print(f"| {edges} | {nodes} | {args.heads} | {c} | {t_zoo:.3f} | {t_pyg:.3f} | {t_pyg / t_zoo:.2f}x | "
                  f"{mem['zoo']:.0f} ({net['zoo']:.0f}) | {mem['pyg']:.0f} ({net['pyg']:.0f}) | "
                  f"{mem['pyg'] / mem['zoo']:.1f}x ({net['pyg'] / max(net['zoo'], 1):.1f}x net) | "
                  f"{out_err:.1e} | {grad_err:.1e} |", flush=True)
    print("\npeak MB: VmHWM of a fresh process running one forward+backward; net = peak - a baseline process"
          " that builds the same inputs and layers but runs no step.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
