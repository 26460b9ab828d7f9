"""Shared utilities for the benchmarks: interleaved medians, fixed threads, peak memory, the test-kept peers."""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

try:
    import resource  # getrusage: POSIX only
except ImportError:  # pragma: no cover - not on this platform
    resource = None

__all__ = [
    "interleaved_medians", "interleaved_samples", "medians", "paired_ratio", "machine_description",
    "peak_rss_mb_subprocess", "set_threads", "minor_faults", "FaultCounter", "interleaved_samples_with_faults",
    "format_faults", "load_average", "load_test_reference", "memory_cells", "positive_int", "run_footer", "run_header",
]

TESTS_DIR = Path(__file__).resolve().parents[2] / "tests"


def load_test_reference(filename: str, what: str):
    """Import tests/<filename> from the source tree: the independent re-derivations of peers (the
    official-style Agent-DeiT, the ESPnet-layout relative-position layer) live beside the tests that check the
    zoo against them, and the benchmarks time the zoo against the same code. ``what`` names it in the error."""
    path = TESTS_DIR / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"the {what} lives in {path}, which is missing; run the benchmark from a source checkout "
            "(pip install -e .)"
        )
    spec = importlib.util.spec_from_file_location(f"zoo_reference_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def set_threads(num_threads: int | None = None) -> int:
    """Fix torch's intra-op threads (default, or 0: all cores of this machine) and return the number used."""
    if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 0):
        raise SystemExit(f"--threads must be a positive integer (or 0 for all cores), got {num_threads!r}")
    n = num_threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def add_timing_arguments(parser, repeats: int = 5, warmup: int = 1, what: str = "contender") -> None:
    """The options every ``zoo bench`` command takes: ``--threads`` (torch threads, :func:`set_threads`),
    ``--repeats`` (timed rounds, interleaved) and ``--warmup`` (untimed calls of each first)."""
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=repeats,
                        help=f"timed runs of each {what}, interleaved (default {repeats})")
    parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed warm-up runs of each (default {warmup})")


def _sync(device: str | None) -> None:
    if device is not None and device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_samples(
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    device: str | None = None,
    min_time: float = 0.0,
) -> dict[str, list[float]]:
    """Seconds per call of each callable in every round; sample i of every function comes from round i (see
    :func:`paired_ratio`), so machine noise hits all alike.

    Round r starts with function r (mod n), so every function starts equally often; even rounds go on forwards
    through the cyclic order, odd rounds backwards: A B C, B A C, C A B, A C B, B C A, C B A (with two
    functions A B, B A, A B, ...; with four A B C D, B A D C, C D A B, D C B A). A rotation alone keeps the
    cyclic order (B would always follow A), and a call timed right after a different one pays for it (the
    thread pool's wake-up, caches, freed memory handed back to the kernel): going backwards gives every
    function two different predecessors. (Until 2026-12-06 the odd rounds reversed the rotated order, which
    made round 2k+1 start with round 2k's first function: two functions ran A B every round, and of four
    only A and C ever started.)

    Each measurement calls the function once, or, with ``min_time``, as many times as fill ``min_time`` after
    one untimed call (so the first timed call does not pay for its predecessor), and divides.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    inner = {}
    for name, fn in fns.items():
        inner[name] = 1
        if min_time > 0:
            start = time.perf_counter()
            fn()
            _sync(device)
            once = max(time.perf_counter() - start, 1e-6)
            inner[name] = max(1, int(min_time / once))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for repeat in range(repeats):
        step = -1 if repeat % 2 else 1
        for name in (names[(repeat + step * i) % len(names)] for i in range(len(names))):
            fn = fns[name]
            if inner[name] > 1:
                fn()  # settle: the timed calls below follow a call of the same function
            _sync(device)
            start = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - start) / inner[name])
    return samples


def interleaved_medians(
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    device: str | None = None,
    min_time: float = 0.0,
) -> dict[str, float]:
    """Median seconds per call of each callable ({name: seconds}), from :func:`interleaved_samples`."""
    return medians(interleaved_samples(fns, repeats=repeats, warmup=warmup, device=device, min_time=min_time))


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    """{name: median} of :func:`interleaved_samples`' result."""
    return {name: statistics.median(values) for name, values in samples.items()}


def paired_ratio(ours: list[float], theirs: list[float]) -> float:
    """Median over rounds of ours_i / theirs_i: a paired estimate of the time ratio. Both were measured in the
    same round, seconds apart, so the machine's slow drifts (other jobs, clock) cancel, which a ratio of two
    separate medians does not do."""
    if len(ours) != len(theirs) or not ours:
        raise ValueError("paired_ratio needs two equally long, non-empty sample lists")
    return statistics.median(a / b for a, b in zip(ours, theirs))


def minor_faults() -> int | None:
    """Minor page faults of this process so far (getrusage ru_minflt), or None where there is no getrusage.

    A fresh tensor larger than glibc's mmap threshold is zero pages until first written: each 4 KiB page
    faults once (about a microsecond here). Whether a model's intermediates land on such pages depends on the
    heap's history in the process, so CPU timings at batch 1 move with it (docs/bench_agent.md); the
    benchmarks print the count per forward beside the times.
    """
    if resource is None:  # pragma: no cover - not on this platform
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class FaultCounter:
    """Wraps a callable; counts its calls and the process's minor page faults during them (:func:`minor_faults`).

    ``per_call()`` is the mean since the last ``reset()``, None where faults cannot be counted.
    """

    def __init__(self, fn: Callable[[], object]):
        self.fn = fn
        self.reset()

    def reset(self) -> None:
        self.calls, self.faults = 0, 0

    def __call__(self):
        before = minor_faults()
        out = self.fn()
        if before is not None:
            self.faults += minor_faults() - before
        self.calls += 1
        return out

    def per_call(self) -> float | None:
        if resource is None or self.calls == 0:
            return None
        return self.faults / self.calls


def interleaved_samples_with_faults(
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    device: str | None = None,
    min_time: float = 0.0,
) -> tuple[dict[str, list[float]], dict[str, float | None]]:
    """:func:`interleaved_samples`, and each function's minor page faults per call over the calls after its
    warm-up (:class:`FaultCounter`; None where faults cannot be counted)."""
    counters = {name: FaultCounter(fn) for name, fn in fns.items()}
    for counter in counters.values():
        for _ in range(warmup):
            counter()
        counter.reset()
    samples = interleaved_samples(counters, repeats=repeats, warmup=0, device=device, min_time=min_time)
    return samples, {name: counter.per_call() for name, counter in counters.items()}


def output_and_grad_errors(x, ours, peer, *inputs) -> tuple[float, float]:
    """One forward + backward (of the output's sum) of each layer, called as ``layer(x, *inputs)`` with ``x``
    requiring grad: (max |out_ours - out_peer|, max |dx_ours - dx_peer| / max |dx_peer|). The benchmarks check
    with it that the two contenders compute the same thing before timing them."""
    results = []
    for layer in (ours, peer):
        out = layer(x, *inputs)
        out.sum().backward()
        results.append((out.detach(), x.grad.clone()))
        del out  # its autograd graph goes before the next layer runs
        x.grad = None
        layer.zero_grad(set_to_none=True)
    (o1, g1), (o2, g2) = results
    return (o1 - o2).abs().max().item(), ((g1 - g2).abs().max() / g2.abs().max().clamp_min(1e-12)).item()


def require_agreement(what: str, out_err: float, grad_err: float, out_tol: float = 1e-3, grad_tol: float = 1e-3) -> None:
    """Stop a benchmark whose two contenders disagree: a speed ratio of different computations means nothing
    (the graph and points tables used to print one beside errors of 5.9 and 7.4). ``out_err`` absolute (outputs
    of order one), ``grad_err`` relative, as :func:`output_and_grad_errors` gives them."""
    if not (out_err <= out_tol and grad_err <= grad_tol):  # (NaN fails too)
        # each error beside its tolerance, the one(s) over it said so (the message read "output error 5.5e-08 >
        # 0.0001 or gradient error 1 > 0.0001" when only the gradients disagreed)
        parts = [f"{name} error {err:.3g} {'<=' if err <= tol else '>'} {tol:g}"
                 for name, err, tol in (("output", out_err, out_tol), ("gradient", grad_err, grad_tol))]
        raise RuntimeError(f"{what}: the two sides disagree ({', '.join(parts)}); nothing was timed")


def compile_backend_arg(value: str) -> str:
    """argparse ``type`` of the benchmarks' ``--compile BACKEND``: a torch.compile backend name, checked as the
    training option's (zoo.train.module.compile_backend)."""
    from zoo.train.module import compile_backend

    try:
        return compile_backend(value, option="--compile")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def positive_int(value: str) -> int:
    """argparse ``type`` of counts that must be at least 1 (heads, channels): a bad value stops at the parser,
    with the option named, instead of as a torch traceback from inside a layer after the run header."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value!r}")
    return number


def format_faults(values) -> str:
    """Page faults per call of several functions as one table cell without spaces: "12/3400", "-" where not
    counted."""
    return "/".join("-" if v is None else f"{v:.0f}" for v in values)


def machine_description() -> str:
    """One line naming the machine and versions, for benchmark tables."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, python {platform.python_version()}"
    )


def peak_rss_mb_subprocess(code: str, *, env: dict | None = None) -> float:
    """Peak memory (MiB) of a fresh Python process running ``code``.

    The child's own high-water mark, VmHWM from /proc/self/status (Linux), or, when ``code`` prints a line
    ``CUDA_PEAK_BYTES=<n>``, that GPU figure. tracemalloc is blind to torch's allocator, so memory is
    compared process against process. ru_maxrss is not used: Linux carries the forking parent's peak
    across fork+exec, so after a large in-process run every child would report the parent's peak; VmHWM
    belongs to the address space exec creates. Elsewhere, ru_maxrss is the fallback.
    """
    probe = code + (
        "\nimport os as _os, resource as _r\n"
        "if _os.path.exists('/proc/self/status'):\n"
        "    print('PEAK_RSS_KB=' + [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n"
        "else:\n"
        "    print('PEAK_RSS_KB=%d' % _r.getrusage(_r.RUSAGE_SELF).ru_maxrss)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{result.stderr[-2000:]}")
    lines = result.stdout.splitlines()
    for line in lines:
        if line.startswith("CUDA_PEAK_BYTES="):
            return int(line.split("=", 1)[1]) / 2**20
    for line in lines[::-1]:
        if line.startswith("PEAK_RSS_KB="):
            return int(line.split("=", 1)[1]) / 1024
    raise RuntimeError("memory probe printed no PEAK_RSS_KB line")


def memory_cells(mem: dict, ours: str = "zoo", peer: str = "pyg", net_label: str = "") -> tuple[str, str, str]:
    """Table cells from peak memories in MB (``mem``: ours, the peer and "none", the baseline process):
    "peak (net)" for ours and for the peer, and "peer/ours x (net ratio x<net_label>)". A value that was not
    measured (NaN: --no-memory, or a peer skipped) is "-"."""
    def cell(key: str) -> str:
        peak, base = mem[key], mem["none"]
        return "-" if math.isnan(peak) else f"{peak:.0f} ({peak - base:.0f})"

    peak_ours, peak_peer = mem[ours], mem[peer]
    if math.isnan(peak_ours) or math.isnan(peak_peer):
        return cell(ours), cell(peer), "-"
    net_ours, net_peer = peak_ours - mem["none"], peak_peer - mem["none"]
    return cell(ours), cell(peer), f"{peak_peer / peak_ours:.1f}x ({net_peer / max(net_ours, 1):.1f}x{net_label})"


def load_average() -> str:
    """The 1/5/15-minute load averages as "a / b / c (1/5/15 min)" ("unavailable" where the OS has none)."""
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg()) + " (1/5/15 min)"
    except (AttributeError, OSError):  # pragma: no cover - platforms without getloadavg
        return "unavailable"


def run_header(name: str, argv, threads: int, details: str) -> str:
    """The lines a benchmark prints above its table: the command (``zoo bench <name>`` and ``argv``, or this
    process's arguments), the UTC date with the load average at start, and the machine with the torch thread
    count followed by ``details`` (what the table holds fixed). Markdown line breaks; ends with a blank line.
    Every ``zoo bench`` command prints it, and :func:`run_footer` under its table."""
    command = f"zoo bench {name} " + " ".join(argv if argv is not None else sys.argv[1:])
    return (f"command: `{command.strip()}`  \n"
            f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; load average at start "
            f"{load_average()}  \n"
            f"machine: {machine_description()}; torch threads {threads}; {details}\n")


def run_footer() -> str:
    """The line a benchmark prints under its table: the load average at the end. On a 2-core machine a load
    above about 2 means other jobs shared the cores, and multi-thread timings of that run are unreliable."""
    return f"load average at end {load_average()}"