"""The GPU benchmark of the Triton kernels (``python -m zoo.bench.attention --gpu``) as a dry run on CPU:
the same code path (zoo-triton under the Triton interpreter, SDPA, eager FlexAttention, the block-sparse
sweep and the target verdicts) at tiny sizes, so that the one-shot GPU run a later session makes does not
die on a bug nobody could see without a GPU. Also: the CPU part's masks hit their kept fractions."""
from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from zoo.bench import attention as bench  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning"),
]


@pytest.mark.skipif(HAS_CUDA, reason="the dry run is for CPU-only machines; the GPU runs the real thing")
def test_gpu_part_dry_run_on_cpu(capsys):
    from zoo.kernels import flash_attention as fa

    if not fa.INTERPRET:
        pytest.skip("kernel module imported without TRITON_INTERPRET=1")
    args = bench.build_parser().parse_args([
        "--gpu", "--gpu-device", "cpu", "--gpu-frames", "2", "--gpu-tokens", "48", "--gpu-head-dims", "16",
        "--gpu-dtype", "fp32", "--gpu-radial-block", "16", "--gpu-eager-flex", "--gpu-strict",
        "--repeats", "1", "--warmup", "0", "--fractions", "0.25", "--heads", "2",
    ])
    text = bench.bench_gpu(args)
    assert "Errors" not in text
    for name in ("dense", "causal", "window", "segments", "radial"):
        assert f"| {name} | 96 | 16 | fwd |" in text and f"| {name} | 96 | 16 | fwd+bwd |" in text, name
    # Outputs agree with SDPA (fp32): the error column of every forward row is small.
    errors = [float(line.rsplit("|", 2)[-2]) for line in text.splitlines() if "| fwd |" in line]
    assert len(errors) == 5 and max(errors) < 1e-4, errors
    assert "| 25% |" in text  # the block-sparse sweep
    verdicts = [line for line in text.splitlines() if line.startswith(("- PASS", "- FAIL"))]
    assert len(verdicts) == 4, verdicts  # 2 dense, 1 radial, 1 sweep (memory needs CUDA)


@pytest.mark.skipif(HAS_CUDA, reason="the dry run is for CPU-only machines; the GPU runs the real thing")
def test_gpu_part_refuses_a_kernel_whose_gradients_differ(monkeypatch):
    """The GPU table and sweep check the zoo kernel's q/k/v gradients against SDPA's before timing (a forward-only
    check published a forward+backward figure for any backward): a triton attend() whose output is right but whose
    dv is doubled becomes an error row in each table (or raises with --gpu-strict), and gives no verdict."""
    from zoo.kernels import flash_attention as fa

    if not fa.INTERPRET:
        pytest.skip("kernel module imported without TRITON_INTERPRET=1")
    real_attend = bench.attend

    def doubled_dv(q, k, v, mask=None, **kwargs):
        return real_attend(q, k, 2 * v - v.detach(), mask, **kwargs)

    monkeypatch.setattr(bench, "attend", doubled_dv)
    argv = ["--gpu", "--gpu-device", "cpu", "--gpu-frames", "2", "--gpu-tokens", "48", "--gpu-head-dims", "16",
            "--gpu-dtype", "fp32", "--gpu-radial-block", "16", "--gpu-eager-flex", "--repeats", "1", "--warmup", "0",
            "--fractions", "0.5", "--heads", "2"]
    with pytest.raises(RuntimeError, match=r"^dense N=96 D=16: zoo's q/k/v gradients differ from SDPA-flash's by 0.\d+ of the "
                                           r"largest gradient \(tolerance 0.001\)"):
        bench.bench_gpu(bench.build_parser().parse_args([*argv, "--gpu-strict"]))
    text = bench.bench_gpu(bench.build_parser().parse_args(argv))
    assert "sweep 50%: RuntimeError: sweep 50%: zoo's q/k/v gradients differ from SDPA (dense mask)'s" in text
    assert not [line for line in text.splitlines() if line.startswith(("- PASS", "- FAIL"))]


def test_gpu_flag_without_cuda_says_so(capsys):
    if HAS_CUDA:
        pytest.skip("CUDA present")
    assert bench.main(["--gpu"]) == 2
    assert "GPU timings need a GPU" in capsys.readouterr().err
    assert "GPU timings need a GPU" in bench.bench_gpu(bench.build_parser().parse_args([]))


def test_cpu_masks_reach_their_kept_fractions():
    n = 2048
    for fraction in (0.5, 0.25):
        masks = bench.sparse_masks(n, fraction, ["window", "chunk", "random"])
        for kind, mask in masks.items():
            kept = mask.block_map(n, n, 128, 128).kept_fraction()
            assert abs(kept - fraction) < 0.06, (kind, fraction, kept)
    radial = bench.radial_for_fraction(n, 0.25)
    assert 0.95 * n < radial.seq_len <= n
    varlen = bench.varlen_causal_for_fraction(n, 0.25)  # causal inside packed sequences of random lengths
    assert abs(varlen.block_map(n, n, 128, 128).kept_fraction() - 0.25) < 0.06
    assert varlen.segments.q_ids.shape == (1, n) and int(varlen.segments.q_ids.max()) >= 1
    with pytest.raises(ValueError, match="unknown mask kinds"):
        bench.sparse_masks(n, 0.5, ["nope"])


def test_interleaved_samples_rotate_and_paired_ratio_cancels_drift(monkeypatch):
    """Round r starts with function r (mod n) and every other one runs backwards (with three functions the six
    rounds are the six orders: each function follows every other one), min_time repeats a call after one
    untimed call, and the paired ratio of two functions is exact under a drift that scales both alike."""
    from zoo.bench import timing
    from zoo.bench.timing import interleaved_medians, interleaved_samples, paired_ratio

    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in "abc"}
    samples = interleaved_samples(fns, repeats=6, warmup=0)
    assert order == list("abc" "bac" "cab" "acb" "bca" "cba")
    assert all(len(values) == 6 for values in samples.values())
    assert set(interleaved_medians(fns, repeats=2, warmup=0)) == set("abc")
    calls, clock = [], [0.0]

    def slow():  # 1 ms per call on a fake clock
        calls.append(1)
        clock[0] += 1e-3

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    samples = interleaved_samples({"x": slow}, repeats=2, warmup=0, min_time=5e-3)
    monkeypatch.undo()
    # one call to size the loop; per round one untimed call and the 5 timed ones
    assert len(calls) == 1 + 2 * (1 + 5) and samples["x"] == pytest.approx([1e-3, 1e-3])

    drift = [1.0, 3.0, 0.5, 2.0, 10.0]  # the machine slows down and speeds up between rounds
    ours, theirs = [1.1 * d for d in drift], [1.0 * d for d in drift]
    assert paired_ratio(ours, theirs) == pytest.approx(1.1)
    with pytest.raises(ValueError, match="equally long"):
        paired_ratio([1.0], [1.0, 2.0])


def test_interleaved_rounds_start_with_every_function_equally_often():
    """Audit 2026-12-06: the docstring said round r starts with function r (mod n), but reversing the rotated
    order made every odd round start like the round before it: with two functions the order was A B in every
    round (B always timed right after A), with four only A and C ever started."""
    from zoo.bench.timing import interleaved_samples

    for names, repeats in (("ab", 6), ("abcd", 8), ("abcde", 10)):
        calls = []
        interleaved_samples({name: (lambda name=name: calls.append(name)) for name in names}, repeats=repeats,
                            warmup=0)
        n = len(names)
        rounds = ["".join(calls[i:i + n]) for i in range(0, len(calls), n)]
        assert all(sorted(r) == list(names) for r in rounds), rounds
        firsts = [r[0] for r in rounds]
        assert firsts == [names[r % n] for r in range(repeats)], rounds  # each starts repeats / n times
        for name in names:  # and is timed after two different functions (not always after the same one)
            before = {r[r.index(name) - 1] for r in rounds if r.index(name) > 0}
            assert len(before) == min(2, n - 1), (name, rounds)
        if n == 2:
            assert rounds == ["ab", "ba"] * 3


def test_fault_counter_counts_first_writes_to_fresh_pages():
    """FaultCounter: calls counted, and a function that writes to 64 MiB of fresh pages is seen faulting at least
    once per 4 KiB page it touches, while one that reuses a buffer it already wrote does not."""
    import mmap

    from zoo.bench.timing import FaultCounter, minor_faults

    if minor_faults() is None:
        pytest.skip("no getrusage here")
    pages = 64 * 2**20 // mmap.PAGESIZE
    buffer = torch.empty(16 * 2**20, dtype=torch.float32)  # 64 MiB
    buffer.fill_(1.0)

    def fresh():  # a new anonymous mapping of 64 MiB, written once: fresh pages whatever the heap holds
        with mmap.mmap(-1, 64 * 2**20) as mapping:
            torch.frombuffer(mapping, dtype=torch.uint8).fill_(1)

    fresh_counter, reuse_counter = FaultCounter(fresh), FaultCounter(lambda: buffer.fill_(2.0))
    for _ in range(2):
        fresh_counter()
        reuse_counter()
    assert fresh_counter.calls == 2 and reuse_counter.calls == 2
    assert fresh_counter.per_call() >= 0.9 * pages / 512  # at least one fault per 2 MiB huge page if THP serves it
    assert reuse_counter.per_call() < 0.01 * pages
    fresh_counter.reset()
    assert fresh_counter.calls == 0 and fresh_counter.per_call() is None


def test_fault_counts_cover_the_calls_after_warm_up():
    """interleaved_samples_with_faults: a function that writes fresh pages only on its first call shows them
    without warm-up and none after one warm-up call. (Fresh pages come from a new anonymous mapping: a large
    tensor may reuse heap pages that an earlier test in the process already faulted in.)"""
    import mmap

    from zoo.bench.timing import format_faults, interleaved_samples_with_faults, minor_faults

    if minor_faults() is None:
        pytest.skip("no getrusage here")

    def first_call_faults():
        mappings = []

        def run():
            if not mappings:  # a new anonymous mapping of 128 MiB (fresh pages whatever the heap holds), written once
                mappings.append(mmap.mmap(-1, 128 * 2**20))
                torch.frombuffer(mappings[0], dtype=torch.uint8).fill_(1)
            return mappings[0][0]

        return run

    for warmup, faulting in ((0, True), (1, False)):
        samples, faults = interleaved_samples_with_faults({"a": first_call_faults()}, repeats=2, warmup=warmup)
        assert len(samples["a"]) == 2
        # 128 MiB: 32768 faults of 4 KiB pages, or 64 of 2 MiB ones where transparent huge pages serve it
        assert (faults["a"] >= 40) == faulting and (faulting or faults["a"] < 8), (warmup, faults)
    assert format_faults([3.4, None, 1200]) == "3/-/1200"


def test_main_prints_the_run_record_around_its_parts(capsys):
    """`zoo bench attention` prints the shared record (command, UTC date and load, machine and threads) above
    its parts and the load at the end below them, as every `zoo bench` command does."""
    assert bench.main(["--parts", "core", "--core-sizes", "32", "--repeats", "1", "--warmup", "0",
                       "--min-time", "0", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "## zoo bench attention"
    assert lines[2].startswith("command: `zoo bench attention --parts core --core-sizes 32")
    assert lines[3].startswith("date: ") and "UTC; load average at start " in lines[3]
    assert lines[4].startswith("machine: ") and "torch threads 1;" in lines[4]
    assert any(line.startswith("| 32 |") for line in lines)
    assert lines[-1].startswith("load average at end ")


def test_core_part_prints_paired_ratios(capsys):
    args = bench.build_parser().parse_args(
        ["--parts", "core", "--core-sizes", "32", "--repeats", "2", "--warmup", "0", "--min-time", "0"]
    )
    text = bench.bench_core(args)
    assert "median over rounds" in text
    rows = [line for line in text.splitlines() if line.startswith("| 32 |")]
    assert len(rows) == 2 and all(float(row.split("|")[5]) > 0 for row in rows)


def test_sparse_part_draws_its_speed_ups(tmp_path, capsys):
    """--plot: the sparse part's speed-ups against the kept-tile fraction as a PNG, beside the table."""
    from PIL import Image

    out = tmp_path / "sparse.png"
    args = bench.build_parser().parse_args(
        ["--parts", "sparse", "--sparse-n", "512", "--fractions", "0.5,0.25", "--masks", "window,random",
         "--repeats", "1", "--warmup", "0", "--min-time", "0", "--plot", str(out)])
    text = bench.bench_sparse(args)
    assert len([line for line in text.splitlines() if line.startswith("| window |") or line.startswith("| random |")]) == 4
    assert f"plot: {out}" in capsys.readouterr().err
    with Image.open(out) as image:
        assert image.size[0] > 800 and image.size[1] > 300
    with pytest.raises(ValueError, match="use a .png file name"):
        bench.plot_sparse([("window", 0.5, 2.0, 1.5)], tmp_path / "x.jpg", "t")


def test_benchmarks_refuse_to_time_two_sides_that_disagree(monkeypatch):
    """A speed ratio of two different computations means nothing: the core table timed attend() against SDPA
    without comparing them, and graph / points printed ratios beside output errors of 5.9 and 7.4 (audit
    2026-12-06). The sides are now compared first, and a disagreement stops the run."""
    from zoo.bench.timing import require_agreement

    require_agreement("fine", 1e-6, 1e-6)
    for errors in ((5.9, 1e-6), (1e-6, 8.6), (float("nan"), 0.0)):
        with pytest.raises(RuntimeError, match="the two sides disagree .* nothing was timed"):
            require_agreement("case", *errors)
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    go = torch.randn(1, 2, 16, 8)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    bench._check_same("dense", lambda a, b, c: bench.attend(a, b, c), sdpa, q, k, v, go)
    with pytest.raises(RuntimeError, match="core dense: the two sides disagree"):
        bench._check_same("core dense", lambda a, b, c: sdpa(a, b, c) * 2, sdpa, q, k, v, go)
    assert bench._is_cuda("cuda:0") and bench._is_cuda(torch.device("cuda", 1)) and not bench._is_cuda("cpu")


def test_quick_is_a_smoke_run_of_every_code_path(monkeypatch, capsys):
    """--quick: one core size (the smallest), N = 1024 and the 25% fraction for the sparse and tiles parts with
    every mask kind, 3 repeats -- every code path once, about 12 s of wall time on 2 cores (docs/bench_attention.md),
    where it kept N = 256..1024, 2048-token sparse cases at all four fractions and took 4.5 minutes. With --gpu it
    keeps its own reduction (one frame count and head dim, the 25% point). The help text says the same."""
    seen = {}

    def record(part):
        def run(args):
            seen[part] = args
            return f"### {part}"
        return run

    for part in ("core", "sparse", "tiles", "gpu"):
        monkeypatch.setattr(bench, f"bench_{part}", record(part))
    assert bench.main(["--quick", "--parts", "core,sparse,tiles", "--masks", "window,radial,random,chunk,varlen"]) == 0
    args = seen["core"]
    assert (args.core_sizes, args.sparse_n, args.fractions, args.repeats, args.min_time) == ([256], 1024, [0.25], 3, 0.01)
    assert args.masks == ["window", "radial", "random", "chunk", "varlen"]
    assert bench.main(["--quick", "--parts", "sparse", "--fractions", "0.5,0.1", "--sparse-n", "512"]) == 0
    assert (seen["sparse"].fractions, seen["sparse"].sparse_n) == ([0.5], 512)  # the first fraction asked for
    bench.main(["--gpu", "--quick"])
    if "gpu" in seen:  # (exit 2 before the part without CUDA)
        assert seen["gpu"].gpu_head_dims == [64] and seen["gpu"].fractions == [0.25]
    capsys.readouterr()
    help_text = " ".join(bench.build_parser().format_help().split())
    assert "one core size, the smallest; N = 1024 and one fraction, 25%, for the sparse and tiles parts" in help_text
    assert "12 s on this project's 2-core CPU" in help_text


def test_bench_arguments_are_named(capsys):
    """Tracebacks before: 'NoneType' object is not subscriptable (--sparse-n 100 with radial), a '-100%' row
    (--fractions -1), and torch's CUDA error for zoo bench vision --device cuda without a GPU."""
    with pytest.raises(SystemExit, match=r"--batch, --heads, .* must be >= 1"):  # was an error from inside attend()
        bench.main(["--parts", "core", "--quick", "--heads", "0"])
    with pytest.raises(SystemExit, match="--sparse-n must be >= 256 tokens, got 100"):
        bench.main(["--parts", "sparse", "--sparse-n", "100", "--masks", "window,radial"])
    with pytest.raises(SystemExit, match=r"--fractions are kept fractions in \(0, 1\], got \[-1.0\]"):
        bench.main(["--parts", "sparse", "--fractions=-1"])
    with pytest.raises(SystemExit, match="--threads must be a positive integer"):
        bench.main(["--parts", "tiles", "--threads", "-1"])
    if not torch.cuda.is_available():
        from zoo.bench import vision

        with pytest.raises(SystemExit):
            vision.main(["--device", "cuda", "--no-attention"])
        assert "--device cuda: no CUDA device here" in capsys.readouterr().err


def test_radial_layouts_have_keys_in_every_row_and_exist_or_are_named():
    """Audit 2026-12-06: --sparse-n 270, 271 and 287 crashed with "'NoneType' object is not subscriptable" (no
    Radial layout fits), and the sweep built layouts such as 8 x 240 tokens whose block rows see no key, so
    every run at 1920 or 8192 tokens printed Radial's RuntimeWarnings. Such layouts are skipped now, and a
    length without a layout is a one-line error naming --sparse-n and lengths that work."""
    import warnings

    from zoo.attention.radial import _empty_block_rows

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        mask = bench.radial_for_fraction(1920, 0.5)
    assert len(_empty_block_rows(mask.num_frames, mask.tokens_per_frame, 128, 0)) == 0
    assert 0.95 * 1920 < mask.seq_len <= 1920
    with pytest.raises(ValueError, match="--sparse-n 270: no Radial layout .* use --sparse-n 269 or 272"):
        bench.radial_for_fraction(270, 0.5)


def test_bench_attention_checks_masks_and_lengths_before_any_part_runs(capsys):
    """A mistyped --masks was rejected only after the core part had run (minutes at the default sizes), and an
    impossible Radial length crashed inside the tiles part: both stop now before the run header."""
    from zoo import cli

    with pytest.raises(SystemExit, match=r"--masks: unknown mask kinds \['windw'\]; choose from"):
        cli.main(["bench", "attention", "--parts", "core,sparse", "--core-sizes", "32", "--sparse-n", "256",
                  "--fractions", "0.5", "--masks", "windw", "--repeats", "1", "--warmup", "0", "--min-time", "0",
                  "--threads", "1"])
    for n in ("270", "271", "287"):
        with pytest.raises(SystemExit, match=f"--sparse-n {n}: no Radial layout"):
            cli.main(["bench", "attention", "--parts", "tiles", "--sparse-n", n, "--fractions", "0.5", "--masks",
                      "radial", "--threads", "1"])
    assert capsys.readouterr().out == ""  # nothing ran, not even the header


def test_bench_attention_gpu_refuses_fp32_on_cuda():
    """--gpu --gpu-dtype fp32 pinned SDPA to FLASH_ATTENTION, which takes fp16 / bf16 only on CUDA: every dense
    and causal row would have been an error. Refused up front (the CPU dry run keeps fp32)."""
    from zoo import cli

    with pytest.raises(SystemExit, match="--gpu-dtype fp32: .* flash kernel, which runs fp16 and bf16 only"):
        cli.main(["bench", "attention", "--gpu", "--gpu-dtype", "fp32"])


# ------------------------------------------------------------------ mutation audit 2026-12-07 (zoo bench numbers)
# Every benchmark's figures come from interleaved_samples; replacing it with fixed per-round samples lets the
# printed medians, paired ratios and throughputs be checked against statistics.median by hand. The rounds are
# chosen so that the paired ratio (median of per-round ratios: 4, 1.5, 1.5 -> 1.5) differs from the ratio of
# the medians (4 / 2 = 2), from its inverse (0.67) and from a mean (zoo mean 2.33 ms, median 2 ms).
ZOO_MS, PEER_MS = [1.0, 2.0, 4.0], [4.0, 3.0, 6.0]


def _fake_samples(ms_of, seen=None, unit=1e-3):
    """A stand-in for interleaved_samples: ``ms_of(name)`` gives each function's per-round times (in ms, or in
    ``unit`` seconds)."""
    def fake(fns, **kwargs):
        if seen is not None:
            seen.append({"fns": dict(fns), **kwargs})
        return {name: [ms * unit for ms in ms_of(name)] for name in fns}

    return fake


def _cells(text: str, start: str) -> list[str]:
    rows = [line for line in text.splitlines() if line.startswith(start)]
    assert len(rows) == 1, (start, text)
    return [c.strip() for c in rows[0].strip().strip("|").split("|")]


@pytest.fixture
def keep_threads():
    """The commands below run with --threads 1 (set_threads): the process's thread count is restored after."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class _Shifted(torch.nn.Module):
    """A peer that computes something else (its output + 1): the benchmark must refuse to time it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return self.inner(*args) + 1.0


def test_timing_helpers_against_hand_computed_cases(monkeypatch):
    """medians are statistics.median (not the mean), the warm-up calls are not timed, set_threads() means all
    cores, memory_cells prints peak (net) and peer/ours, and output_and_grad_errors compares outputs and input
    gradients of the two layers it is given."""
    import os

    from zoo.bench import timing

    assert timing.medians({"a": [1.0, 2.0, 100.0], "b": [3.0, 1.0]}) == {"a": 2.0, "b": 2.0}
    clock, calls = [0.0], []

    def compiling():  # 1 s on the first call (a compilation), 1 ms afterwards
        clock[0] += 1.0 if not calls else 1e-3
        calls.append(1)

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    for warmup in (1, 2):
        calls.clear()
        samples = timing.interleaved_samples({"f": compiling}, repeats=2, warmup=warmup)
        assert len(calls) == warmup + 2 and samples["f"] == pytest.approx([1e-3, 1e-3]), (warmup, samples)
    monkeypatch.undo()

    before = torch.get_num_threads()
    try:
        assert timing.set_threads() == (os.cpu_count() or 1) == torch.get_num_threads()
        assert timing.set_threads(0) == (os.cpu_count() or 1)
        assert timing.set_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)

    assert timing.memory_cells({"none": 100.0, "zoo": 150.0, "pyg": 600.0}) == ("150 (50)", "600 (500)", "4.0x (10.0x)")
    nan = float("nan")
    assert timing.memory_cells({"none": 100.0, "zoo": 150.0, "pyg": nan}) == ("150 (50)", "-", "-")

    torch.manual_seed(0)
    ours = torch.nn.Linear(3, 2)
    x = torch.randn(5, 3, requires_grad=True)
    assert timing.output_and_grad_errors(x, ours, _Shifted(ours)) == pytest.approx((1.0, 0.0))

    class DoubleGrad(torch.nn.Module):  # the same output, twice the input gradient
        def forward(self, x):
            return ours(2 * x - x.detach())

    out_err, grad_err = timing.output_and_grad_errors(x, ours, DoubleGrad())
    assert out_err == 0.0 and grad_err == pytest.approx(0.5)  # max |g - 2g| / max |2g|


def test_peak_memory_probe_reports_the_high_water_mark():
    """peak_rss_mb_subprocess reports the child's peak, not its resident memory at the end: 256 MiB written and
    freed again still count."""
    from zoo.bench.timing import peak_rss_mb_subprocess

    baseline = peak_rss_mb_subprocess("pass")
    peak = peak_rss_mb_subprocess("block = b'\\x01' * (256 << 20)\ndel block")
    assert peak - baseline > 200, (baseline, peak)


def test_attention_tables_print_medians_and_paired_ratios_of_the_right_sides(monkeypatch):
    """core: attend / SDPA (lower is better); sparse: SDPA / zoo (the speed-up); both the median over rounds of the
    per-round ratio, beside the median times; the fwd+bwd columns time a backward through q, k, v and the fwd
    columns do not."""
    import statistics

    peer_over_zoo = statistics.median(p / z for z, p in zip(ZOO_MS, PEER_MS))  # 1.5
    zoo_over_peer = statistics.median(z / p for z, p in zip(ZOO_MS, PEER_MS))  # 0.67
    seen = []
    monkeypatch.setattr(bench, "interleaved_samples",
                        _fake_samples(lambda name: ZOO_MS if name.startswith("ours") else PEER_MS, seen))
    grads = []
    real_inputs = bench._inputs

    def inputs(*args, **kwargs):
        q, k, v, go = real_inputs(*args, **kwargs)
        for t in (q, k, v):
            t.register_hook(lambda grad: grads.append(1))
        return q, k, v, go

    monkeypatch.setattr(bench, "_inputs", inputs)
    common = ["--repeats", "3", "--warmup", "0", "--min-time", "0", "--heads", "2", "--head-dim", "8"]
    core = bench.bench_core(bench.build_parser().parse_args(["--core-sizes", "32", *common]))
    for name in ("dense", "causal"):
        cells = _cells(core, f"| 32 | {name} |")
        assert cells[2:8] == ["2.00", "4.00", f"{zoo_over_peer:.2f}", "2.00", "4.00", f"{zoo_over_peer:.2f}"], cells
    sparse = bench.bench_sparse(bench.build_parser().parse_args(
        ["--sparse-n", "256", "--fractions", "0.5", "--masks", "window", *common]))
    cells = _cells(sparse, "| window |")
    assert cells[5:] == ["2.00", "4.00", f"{peer_over_zoo:.2f}x", "2.00", "4.00", f"{peer_over_zoo:.2f}x"], cells
    assert len(seen) == 3
    for call in seen:
        for name, fn in call["fns"].items():
            before = len(grads)
            fn()
            assert (len(grads) - before == 3) == name.endswith("_fb"), name  # dq, dk, dv only with backward


def test_attention_parts_refuse_to_time_a_zoo_side_that_differs(monkeypatch):
    """The sparse and core parts compare outputs and all three gradients with SDPA's (the sparse one with the dense
    mask) before timing: an attend() whose output is off is refused, and so is one whose output is right but whose
    dv is doubled (the sparse table publishes a forward+backward speed-up; until 2026-12-07 its gate compared the
    forward outputs only)."""
    real_attend = bench.attend
    common = ["--repeats", "1", "--warmup", "0", "--min-time", "0", "--heads", "2", "--head-dim", "8"]
    sparse_args = bench.build_parser().parse_args(["--sparse-n", "256", "--fractions", "0.5", "--masks", "window",
                                                   *common])
    monkeypatch.setattr(bench, "attend", lambda q, k, v, mask=None: real_attend(q, k, v, mask) + 0.01)
    with pytest.raises(RuntimeError, match=r"sparse window 50%: the two sides disagree \(output error"):
        bench.bench_sparse(sparse_args)
    monkeypatch.setattr(bench, "attend", lambda q, k, v, mask=None: real_attend(q, k, 2 * v - v.detach(), mask))
    with pytest.raises(RuntimeError, match=r"sparse window 50%: the two sides disagree \(output error \S+ <= 0.0001, "
                                           r"gradient error 1 > 0.0001\)"):
        bench.bench_sparse(sparse_args)
    with pytest.raises(RuntimeError, match="core N=32 dense: the two sides disagree"):
        bench.bench_core(bench.build_parser().parse_args(["--core-sizes", "32", *common]))


def test_tiles_table_and_full_window_by_hand():
    """The tiles table at N = 256 against hand counts: causal visits the diagonal tiles (partial) and those below
    (full); 8 equal segments of 32 tokens only the diagonal ones. And the 100% window is full attention."""
    args = bench.build_parser().parse_args(["--sparse-n", "256", "--fractions", "0.5", "--masks", "window"])
    text = bench.bench_tiles(args)
    assert _cells(text, "| causal |")[2:] == ["3/4 (75.0%; 1 full, 2 partial)", "10/16 (62.5%; 6 full, 4 partial)"]
    assert _cells(text, "| segments (8 equal) |")[2:] == ["2/4 (50.0%; 0 full, 2 partial)",
                                                          "4/16 (25.0%; 0 full, 4 partial)"]
    assert bool(bench.window_for_fraction(512, 1.0).dense(512, 512).all())


@pytest.mark.skipif(HAS_CUDA, reason="the dry run is for CPU-only machines; the GPU runs the real thing")
def test_gpu_part_flops_ratios_and_verdicts_by_hand(monkeypatch):
    """The GPU table's TF/s against hand-counted allowed pairs (4 D FLOPs per pair and head: q.k and p.v; backward
    counted as 2.5x forward, so fwd+bwd is 3.5x), its peer/zoo ratios and PASS lines, and the sweep's kept
    fraction, under fixed times (the dry run's own code path, the Triton interpreter)."""
    from zoo.kernels import flash_attention as fa

    if not fa.INTERPRET:
        pytest.skip("kernel module imported without TRITON_INTERPRET=1")
    seconds = {"zoo-triton": 1e-11, "SDPA-flash": 2e-11, "SDPA (dense mask)": 2e-11, "FlexAttention": 4e-11,
               "zoo sparse": 1e-11, "zoo dense": 4e-11, "Flex sparse": 2e-11}
    monkeypatch.setattr(bench, "interleaved_medians", lambda fns, **kwargs: {name: seconds[name] for name in fns})
    args = bench.build_parser().parse_args([
        "--gpu", "--gpu-device", "cpu", "--gpu-frames", "2", "--gpu-tokens", "48", "--gpu-head-dims", "16",
        "--gpu-dtype", "fp32", "--gpu-radial-block", "16", "--gpu-eager-flex", "--gpu-strict",
        "--repeats", "1", "--warmup", "0", "--fractions", "0.25,0.5", "--heads", "2",
    ])
    text = bench.bench_gpu(args)
    n, flops_per_pair = 96, 4 * 1 * 2 * 16  # B = 1, H = 2, D = 16
    window_pairs = n * n - 2 * sum(n - d for d in range(49, n))  # |i - j| <= 48
    for name, pairs in (("dense", n * n), ("causal", n * (n + 1) // 2), ("window", window_pairs),
                        ("segments", 2 * 48 * 48)):
        for mode, factor in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            cells = _cells(text, f"| {name} | 96 | 16 | {mode} |")
            assert cells[4].endswith(f", {pairs * flops_per_pair * factor / 1e-11 / 1e12:.1f} TF/s"), (name, mode, cells)
            assert cells[7:9] == ["2.00x", "4.00x"], cells  # SDPA / zoo, Flex / zoo
    assert "- PASS: dense fwd N=96 D=16: zoo >= 0.9x SDPA-flash speed (2.00x)" in text
    assert "- PASS: dense fwd N=96 D=16: zoo >= FlexAttention speed (4.00x)" in text
    assert "- PASS: radial fwd+bwd N=96 D=16: zoo faster than FlexAttention (4.00x)" in text
    assert "- PASS: 25% kept tiles N=96 D=16: fwd+bwd >= 3x faster than dense (4.00x)" in text
    for fraction in (0.25, 0.5):  # the kept column is the tiles the map keeps (21 of 36 at 50%), not the target
        keep = bench.random_block_map(n, fraction, tile=16).block_mask[0, 0]
        assert keep.shape == (6, 6)
        sweep = _cells(text, f"| {fraction:.0%} |")
        assert sweep[1] == f"{keep.float().mean().item():.1%}" and sweep[4:7] == ["0.000", "4.00x", "2.00x"], sweep


def test_graph_and_points_speed_ups_gates_and_peer_guard(monkeypatch, capsys, keep_threads):
    """zoo bench graph / points: speed-up = median over rounds of PyG / zoo time beside the median times; a peer
    that differs stops the run; --skip-peer-above E still runs PyG at E edges; --compile never times the first
    (compiling) call; the PyG memory estimate counts the self loops (E + N edges)."""
    import statistics

    from zoo.bench import graph, points

    speedup = statistics.median(p / z for z, p in zip(ZOO_MS, PEER_MS))
    seen = []
    fake = _fake_samples(lambda name: ZOO_MS if name == "zoo" else PEER_MS, seen, unit=1.0)  # tables in seconds
    monkeypatch.setattr(graph, "interleaved_samples", fake)
    monkeypatch.setattr(points, "interleaved_samples", fake)
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)  # the warm-up logic only
    base = ["--sizes", "300:60", "--channels", "4", "--heads", "2", "--repeats", "3", "--warmup", "0", "--no-memory",
            "--threads", "1"]
    assert graph.main([*base, "--skip-peer-above", "300", "--compile", "eager"]) == 0
    cells = _cells(capsys.readouterr().out, "| 300 |")
    assert cells[4:7] == ["2.000", "4.000", f"{speedup:.2f}x"], cells
    assert seen[-1]["warmup"] == 1
    assert graph.peer_bytes_estimate(1_000_000, 100_000, 8, 64) == 26 * 1_100_000 * 8 * 64

    real_graph_case, real_points_case = graph.make_case, points.make_case

    def shifted_graph_case(*args, **kwargs):
        x, ei, ours, peer = real_graph_case(*args, **kwargs)
        return x, ei, ours, _Shifted(peer)

    monkeypatch.setattr(graph, "make_case", shifted_graph_case)
    with pytest.raises(RuntimeError, match="zoo bench graph E=300 C=4: the two sides disagree"):
        graph.main(base)

    assert points.main(["--sizes", "300", "--channels", "8", "--k", "4", "--repeats", "3", "--warmup", "0",
                        "--no-memory"]) == 0
    cells = _cells(capsys.readouterr().out, "| 300 |")
    assert cells[5:8] == ["2.000", "4.000", f"{speedup:.2f}x"], cells

    def shifted_points_case(*args, **kwargs):
        x, pos, ei, ours, peer = real_points_case(*args, **kwargs)
        return x, pos, ei, ours, _Shifted(peer)

    monkeypatch.setattr(points, "make_case", shifted_points_case)
    with pytest.raises(RuntimeError, match="zoo bench points N=300 C=8: the two sides disagree"):
        points.main(["--sizes", "300", "--channels", "8", "--k", "4", "--repeats", "1", "--warmup", "0", "--no-memory"])
    capsys.readouterr()


def test_relpos_ratios_and_inference_without_autograd(monkeypatch, capsys, keep_threads):
    """zoo bench relpos: ratios are ESPnet-form / zoo per round (median), and the infer columns run under no_grad
    while the train columns record the graph."""
    import statistics

    from zoo.bench import relpos

    grad_modes = []

    def fake(fns, **kwargs):
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda module, inputs, output: grad_modes.append((name, torch.is_grad_enabled())))
        try:
            for name, fn in fns.items():
                fn()
        finally:
            handle.remove()
        return _fake_samples(lambda name: ZOO_MS if name.startswith("zoo") else PEER_MS)(fns)

    monkeypatch.setattr(relpos, "interleaved_samples", fake)
    assert relpos.main(["--cases", "2x9", "--dim", "24", "--heads", "3", "--repeats", "3", "--warmup", "0",
                        "--threads", "1"]) == 0
    cells = _cells(capsys.readouterr().out, "| 2 | 9 |")
    ratio = f"{statistics.median(p / z for z, p in zip(ZOO_MS, PEER_MS)):.2f}x"
    assert cells[2:8] == ["2.0", "4.0", ratio, "2.0", "4.0", ratio], cells
    assert {name for name, _ in grad_modes} == {"zoo_train", "peer_train", "zoo_infer", "peer_infer"}
    assert all(enabled == name.endswith("train") for name, enabled in grad_modes), grad_modes


def test_vision_benchmarks_report_throughput_and_ratios_of_the_right_sides(monkeypatch, capsys, keep_threads):
    """zoo bench vision: throughput = batch / median time, zoo/peer throughput ratio = median of peer / zoo time
    per round, step ratio = median of zoo / peer time; the training step includes the optimizer's step; --compile
    warms up at least once. vision_agent: the same throughput ratios, and a reference that differs is refused.
    vision_maxvit: ms per Mpx per image and the per-pixel cost against the unpadded size."""
    import statistics

    from zoo.bench import vision, vision_agent, vision_maxvit

    peer_over_zoo = statistics.median(p / z for z, p in zip(ZOO_MS, PEER_MS))
    zoo_over_peer = statistics.median(z / p for z, p in zip(ZOO_MS, PEER_MS))

    class Tiny(torch.nn.Module):
        num_classes = 5

        def __init__(self, size):
            super().__init__()
            self.fc = torch.nn.Linear(3 * size * size, 5)

        def forward(self, x):
            return self.fc(x.flatten(1))

    fake = _fake_samples(lambda name: ZOO_MS if name == "zoo" else PEER_MS)
    monkeypatch.setattr(vision, "interleaved_samples", fake)
    monkeypatch.setattr(vision, "interleaved_samples_with_faults", lambda fns, **kwargs: (fake(fns), {n: None for n in fns}))
    case = vision.BenchCase("tiny", Tiny, Tiny, img_size=4)
    row = vision.run_case(case, batch=2, img_size=None, repeats=3, warmup=0, train=True, infer=True)
    assert row["infer_zoo"] == pytest.approx(2 / 2e-3) and row["infer_peer"] == pytest.approx(2 / 4e-3)
    assert row["infer_ratio"] == pytest.approx(peer_over_zoo) and row["train_ratio"] == pytest.approx(zoo_over_peer)
    assert row["train_zoo"] == pytest.approx(2e-3) and row["train_peer"] == pytest.approx(4e-3)

    model = Tiny(2)
    before = [p.detach().clone() for p in model.parameters()]
    vision._train_fn(model, torch.randn(3, 3, 2, 2), 5)()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # AdamW stepped

    warmups = []
    monkeypatch.setattr(vision, "run_case", lambda case, **kwargs: warmups.append(kwargs["warmup"]) or
                        {"case": case.name, "peer": case.peer_name, "batch": 1, "img_size": 32})
    assert vision.main(["--models", "vit_tiny_patch16_224", "--no-attention", "--compile", "eager", "--warmup", "0",
                        "--threads", "1"]) == 0
    assert warmups == [1]

    monkeypatch.setattr(vision_agent, "interleaved_samples_with_faults", lambda fns, **kwargs: (
        _fake_samples(lambda name: {"zoo": ZOO_MS, "timm": PEER_MS, "ref": [2 * t for t in ZOO_MS]}[name])(fns),
        {name: None for name in fns}))
    monkeypatch.setattr(vision_agent, "build_models", lambda size: (torch.nn.Flatten(),) * 3)
    assert vision_agent.main(["--sizes", "32", "--batches", "2", "--repeats", "3", "--warmup", "0", "--min-time", "0",
                              "--threads", "1", "--markdown"]) == 0
    cells = _cells(capsys.readouterr().out, "| 32 | 2 |")
    assert cells[2:7] == ["1000.0", "500.0", "500.0", f"{peer_over_zoo:.2f}", "2.00"], cells
    monkeypatch.setattr(vision_agent, "build_models",
                        lambda size: (torch.nn.Flatten(), torch.nn.Flatten(), _Shifted(torch.nn.Flatten())))
    with pytest.raises(RuntimeError, match="zoo and official-style logits differ by 1"):
        vision_agent.main(["--sizes", "32", "--batches", "1", "--repeats", "1", "--threads", "1"])

    unpadded, padded = [1.0, 2.0, 4.0], [1.0, 1.0, 2.0]  # ms per round at 64 px and 32 px
    monkeypatch.setattr(vision_maxvit, "interleaved_samples",
                        _fake_samples(lambda name: unpadded if name == "64x64" else padded))
    assert vision_maxvit.main(["--model", "maxvit_debug", "--size", "64", "--odd", "32", "--batch", "2",
                               "--repeats", "3", "--warmup", "0", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    per_pixel = statistics.median(p / u for u, p in zip(unpadded, padded)) * (64 * 64) / (32 * 32)  # 2.0
    assert _cells(out, "| 64x64 |")[1:] == ["2.0", "1000.0", f"{1e9 * 2e-3 / (64 * 64) / 2:.1f}", "1.000"]
    assert _cells(out, "| 32x32 |")[1:] == ["1.0", "2000.0", f"{1e9 * 1e-3 / (32 * 32) / 2:.1f}", f"{per_pixel:.3f}"]
