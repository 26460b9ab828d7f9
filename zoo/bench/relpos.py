"""``zoo bench relpos``: Transformer-XL relative-position attention (the Conformer layer), zoo vs ESPnet's form.

    zoo bench relpos [--cases 8x200,4x800] [--dim 256] [--heads 4] [--threads 2] [--repeats 7] [--warmup 2]
                     [--markdown]

For every case BxT (batch x frames) one process builds the zoo's ``MultiHeadAttention(dim, heads,
rel_pos="xl")`` and the ESPnet-layout layer kept in tests/test_relpos_xl.py (``EspnetStyleRelPosAttention``:
written from ESPnet's RelPositionMultiHeadedAttention formulas, explicit matmul + softmax, the positional table
rebuilt every call), gives the zoo layer the peer's weights (strict load), checks that outputs agree within
1e-4, then times, interleaved after warm-up (zoo.bench.timing.interleaved_samples):

* train: forward + backward of the summed output (gradients of the input and every parameter);
* infer: forward under ``torch.no_grad()``.

Ratios are the peer's time / the zoo's (higher: the zoo is faster), the median over rounds of the paired
ratios. On CPU, fp32. The peer lives in the test file, so the benchmark runs from a source checkout.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

from zoo.bench.timing import (
    add_timing_arguments,
    interleaved_samples, load_test_reference, medians, paired_ratio, run_footer, run_header, set_threads,
)

__all__ = ["main", "build_parser", "load_reference_module"]


def load_reference_module():
    """Import tests/test_relpos_xl.py (the ESPnet-layout reference) from the source tree."""
    return load_test_reference("test_relpos_xl.py", "ESPnet-layout reference")


def _parse_cases(text: str) -> list[tuple[int, int]]:
    cases = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        batch, _, frames = item.partition("x")
        cases.append((int(batch), int(frames)))
    return cases


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoo bench relpos", description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="8x200,4x800", help="comma list of BATCHxFRAMES")
    p.add_argument("--dim", type=int, default=256, help="model width C (even, divisible by --heads)")
    p.add_argument("--heads", type=int, default=4)
    add_timing_arguments(p, repeats=7, warmup=2, what="layer")
    p.add_argument("--markdown", action="store_true",
                   help="accepted for old command lines: the run header (command, date, load, machine) is always "
                        "printed now, as by every zoo bench command")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cases = _parse_cases(args.cases)
    except ValueError:
        parser.error("--cases takes a comma list of BATCHxFRAMES, e.g. 8x200,4x800")
    if not cases or min(min(c) for c in cases) < 1 or args.heads < 1 or args.dim < 2 or args.dim % 2 \
            or args.dim % args.heads or args.repeats < 1 or args.warmup < 0:
        parser.error("need cases with batch, frames >= 1, an even --dim divisible by --heads, --repeats >= 1, "
                     "--warmup >= 0")
    reference = load_reference_module()
    threads = set_threads(args.threads)
    print(run_header("relpos", argv, threads, f"fp32 CPU; C = {args.dim}, H = {args.heads}"))
    print("| batch | frames | zoo train ms | ESPnet-form train ms | train ratio | zoo infer ms | ESPnet-form infer ms "
          "| infer ratio | max out err |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for batch, frames in cases:
        torch.manual_seed(0)
        peer = reference.EspnetStyleRelPosAttention(args.dim, args.heads)
        ours = reference.zoo_from_espnet(peer)
        x = torch.randn(batch, frames, args.dim)
        with torch.no_grad():
            err = (ours(x) - peer(x)).abs().max().item()
        if not err <= 1e-4 * max(1.0, peer(x).abs().max().item()):
            raise SystemExit(f"zoo bench relpos: outputs differ by {err:.2e} at {batch}x{frames}; not timing")
        x.requires_grad_(True)

        def train(layer):
            def run():
                x.grad = None
                layer.zero_grad(set_to_none=True)
                layer(x).sum().backward()
            return run

        def infer(layer):
            def run():
                with torch.no_grad():
                    layer(x)
            return run

        samples = interleaved_samples({"zoo_train": train(ours), "peer_train": train(peer), "zoo_infer": infer(ours),
                                       "peer_infer": infer(peer)}, repeats=args.repeats, warmup=args.warmup)
        t = {k: v * 1e3 for k, v in medians(samples).items()}
        print(f"| {batch} | {frames} | {t['zoo_train']:.1f} | {t['peer_train']:.1f} | "
              f"{paired_ratio(samples['peer_train'], samples['zoo_train']):.2f}x | {t['zoo_infer']:.1f} | "
              f"{t['peer_infer']:.1f} | {paired_ratio(samples['peer_infer'], samples['zoo_infer']):.2f}x | "
              f"{err:.1e} |", flush=True)
    print("\nratio: ESPnet-form time / zoo time (> 1: the zoo is faster), median of per-round ratios.")
    print(run_footer())
    return 0


if __name__ == "__main__":
    sys.exit(main())
