"""MaxViT cases for ``zoo bench vision`` (driver: zoo/bench/vision.py): zoo vs timm, same weights.

Each case builds timm's model (``timm.create_model(name, pretrained=False, img_size=size)``) and ours at the
same size, loads timm's state dict into ours strictly, checks the logits agree (1e-4) and then times both
interleaved (inference img/s and the training step), as every vision case does. timm derives window = grid
= img_size // 32, so ``--img-size`` must be a multiple of 32 for timm to run; ours runs any size (see
docs/bench_maxvit.md for the cost of the padded path, measured with ``python -m zoo.bench.vision_maxvit``).

    zoo bench vision --models 'maxvit*' [--batch 8] [--img-size 224] [--threads 2]
    python -m zoo.bench.vision_maxvit [--size 224] [--odd 200] [--batch 8] [--repeats 7] [--threads 2]

The second form times one zoo model on a multiple-of-32 image (no padding, timm-equal path) against itself
on a smaller image whose stage maps are not window multiples (200 px with maxvit_tiny_tf_224, window 7:
stage maps 50, 25, 13 are padded to 56, 28, 14 and masked; note that 223 px would NOT pad: the stride-2
"same" convs round up to the 224-px maps), interleaved, and reports the time and the cost per input pixel
of each: the padded image does the attention work of the padded size.
"""
from __future__ import annotations

import argparse
from typing import Optional

import torch
import torch.nn as nn

from zoo.bench.timing import (
    add_timing_arguments, interleaved_samples, medians, paired_ratio, run_footer, run_header, set_threads,
)

__all__ = ["CASES", "main"]


def _maxvit_case(name: str, img_size: int):
    from zoo.bench.vision import BenchCase

    def zoo_builder(size: int) -> nn.Module:
        import zoo
        import zoo.tasks.vision.maxvit  # noqa: F401  (registers the names even before the package lists them)

        return zoo.create_model(name, img_size=size)

    def peer_builder(size: int) -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, img_size=size)

    return BenchCase(name, zoo_builder, peer_builder, img_size=img_size)


def _cases():
    return [
        _maxvit_case("maxvit_tiny_tf_224", 224),
        _maxvit_case("maxvit_small_tf_224", 224),
        _maxvit_case("maxvit_base_tf_224", 224),
        _maxvit_case("maxvit_rmlp_pico_rw_256", 256),
        _maxvit_case("maxvit_rmlp_nano_rw_256", 256),
    ]


CASES = _cases()


def main(argv: Optional[list[str]] = None) -> int:
    """Padded (odd size) vs unpadded (multiple of the partition) forward of one zoo MaxViT, interleaved."""
    parser = argparse.ArgumentParser(prog="zoo bench vision_maxvit", description=main.__doc__)
    parser.add_argument("--model", default="maxvit_tiny_tf_224")
    parser.add_argument("--size", type=int, default=224, help="multiple-of-32 size (no padding)")
    parser.add_argument("--odd", type=int, default=200, help="size whose stage maps are padded (default 200)")
    parser.add_argument("--batch", type=int, default=8)
    add_timing_arguments(parser, repeats=7, warmup=2, what="model")
    args = parser.parse_args(argv)
    if min(args.size, args.odd, args.batch, args.repeats) < 1 or args.warmup < 0 or (args.threads or 1) < 1:
        parser.error("need --size, --odd, --batch, --repeats, --threads >= 1 and --warmup >= 0")
    if args.size % 32:  # the model is built at --size: its windows of size // 32 tile every stage exactly then
        parser.error(f"--size {args.size} is the unpadded baseline and must be a multiple of 32 (e.g. 224); "
                     f"padded sizes go to --odd")
    if args.odd == args.size:  # one input: the table would have a single row and compare nothing
        parser.error(f"--odd {args.odd} equals --size: the benchmark compares the padded --odd image against the "
                     f"unpadded --size one; pick another --odd (default 200)")
    import zoo
    import zoo.tasks.vision.maxvit  # noqa: F401
    from zoo.registry import UnknownModelError

    threads = set_threads(args.threads)
    torch.manual_seed(0)
    try:
        model = zoo.create_model(args.model, img_size=args.size).eval()
    except UnknownModelError as error:
        parser.error(str(error))
    inputs = {
        f"{args.size}x{args.size}": torch.randn(args.batch, model.in_chans, args.size, args.size),
        f"{args.odd}x{args.odd}": torch.randn(args.batch, model.in_chans, args.odd, args.odd),
    }

    def run(x):
        def f():
            with torch.no_grad():
                return model(x)

        return f

    # The header first: its load average is the one at the start of the timing, as in every zoo bench command.
    print(run_header("vision_maxvit", argv, threads, f"fp32; no_grad; batch {args.batch}; repeats {args.repeats}, "
                     f"warmup {args.warmup}"), flush=True)
    samples = interleaved_samples({k: run(x) for k, x in inputs.items()}, repeats=args.repeats, warmup=args.warmup)
    times = medians(samples)
    base_key = f"{args.size}x{args.size}"
    base_px = args.size * args.size
    # per-pixel cost ratio: median over rounds of (t / px) / (t_base / px_base), both timed in the same round
    print("| input | median ms | img/s | ms per Mpx | per-pixel cost vs unpadded |")
    print("|---|---|---|---|---|")
    for key, x in inputs.items():
        px = x.shape[-1] * x.shape[-2]
        per_px_ratio = paired_ratio(samples[key], samples[base_key]) * base_px / px
        print(f"| {key} | {1e3 * times[key]:.1f} | {args.batch / times[key]:.1f} | "
              f"{1e9 * times[key] / px / args.batch:.1f} | {per_px_ratio:.3f} |")
    print(run_footer())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
