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
