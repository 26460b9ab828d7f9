"""Agent-DeiT speed: zoo ``agent_deit_tiny`` vs timm ``vit_tiny_patch16_224`` vs the official-style forward.

Two entry points:

* ``CASES`` for ``zoo bench vision`` (zoo/bench/vision.py): ``agent_deit_tiny`` against timm's ViT-Ti (a
  different architecture of the same width and depth, so no weights are copied and outputs are not
  compared), and ``agent_deit_tiny_official`` against the official-style reference forward (the official
  weights layout: the reference's state dict is loaded strictly and the logits must agree within 1e-4);
* ``main(argv)`` (``python -m zoo.bench.vision_agent``): the issue-4 table -- the three models timed in
  one process, interleaved (zoo, timm, reference, zoo, ...) after warm-up, at several image sizes and
  batch sizes, with the ratios zoo/timm and zoo/reference of throughput (higher is better).

The official-style reference is the independent re-derivation of the official forward kept in
tests/test_agent.py (``OfficialAgentDeiT``: explicit softmax, biases re-interpolated and repeated per batch
item on every call, as LeapLabTHU/Agent-Attention agent_deit.py does); it is loaded from the source tree,
so this comparison needs a checkout with tests/ (an editable install).

    python -m zoo.bench.vision_agent [--sizes 224,448] [--batches 1,8] [--repeats 7] [--warmup 2]
                                     [--threads 2] [--compile inductor [--freeze]] [--markdown]

``--compile BACKEND`` times the three models each wrapped in ``torch.compile(model, backend=BACKEND,
dynamic=False)``
(compilation happens in the correctness check and warm-up, before the timed calls: at least one warm-up call
even with ``--warmup 0``, as in ``zoo bench vision`` and ``zoo bench graph``). ``--freeze`` sets
inductor's ``freezing`` option for the run: parameters become constants and what depends on them alone is
folded at compile time (for Agent-DeiT, the agent biases interpolated from the learned tables).
"""
from __future__ import annotations

import argparse
import contextlib
import math
from typing import Optional

import torch
import torch.nn as nn

from zoo.bench.timing import (
    add_timing_arguments,
    compile_backend_arg, format_faults, interleaved_samples_with_faults, load_test_reference, medians,
    paired_ratio, run_footer, run_header, set_threads,
)

__all__ = ["CASES", "load_reference_module", "build_models", "main"]

TINY = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)


def load_reference_module():
    """Import tests/test_agent.py (the official-style reference) from the source tree."""
    return load_test_reference("test_agent.py", "official-style Agent-DeiT reference")


def _zoo_tiny(img_size: int) -> nn.Module:
    import zoo
    import zoo.tasks.vision.agent_deit  # noqa: F401  (registers the names before the package lists them)

    return zoo.create_model("agent_deit_tiny", img_size=img_size)


def _timm_tiny(img_size: int) -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size)


def _reference_tiny(img_size: int) -> nn.Module:
    return load_reference_module().OfficialAgentDeiT(img_size=img_size, **TINY)


def _no_copy(ours: nn.Module, peer: nn.Module) -> None:
    """Different architectures: nothing to copy."""


def _strict_copy(ours: nn.Module, peer: nn.Module) -> None:
    ours.load_state_dict(peer.state_dict(), strict=True)


def _cases():
    from zoo.bench.vision import BenchCase

    return [
        BenchCase("agent_deit_tiny", _zoo_tiny, _timm_tiny, copy_weights=_no_copy, img_size=224,
                  peer_name="timm vit_tiny", atol=math.inf),
        BenchCase("agent_deit_tiny_official", _zoo_tiny, _reference_tiny, copy_weights=_strict_copy, img_size=224,
                  peer_name="official-style", atol=1e-4),
    ]


CASES = _cases()


def build_models(img_size: int, seed: int = 0) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(zoo agent_deit_tiny, timm vit_tiny, official-style reference with the zoo model's weights), eval mode."""
    torch.manual_seed(seed)
    reference = _reference_tiny(img_size)
    ours = _zoo_tiny(img_size)
    ours.load_state_dict(reference.state_dict(), strict=True)
    vit = _timm_tiny(img_size)
    return ours.eval(), vit.eval(), reference.eval()


def _runner(model: nn.Module, x: torch.Tensor):
    def run():
        with torch.no_grad():
            return model(x)

    return run


def _inductor_freezing(enabled: bool):
    """A context with torch._inductor.config.freezing set (``--freeze``), or one that does nothing."""
    if not enabled:
        return contextlib.nullcontext()
    import torch._inductor.config

    return torch._inductor.config.patch(freezing=True)


def _measure(args, sizes: list[int], batches: list[int], rows: list) -> None:
    for size in sizes:
        ours, vit, reference = build_models(size)
        if args.compile:
            # dynamic=False: every (size, batch) gets its own static graph, as a served model would. With
            # automatic dynamic shapes the second size recompiled symbolically, and inductor's freezing then
            # failed a stride assertion in its fused mkldnn convolution (torch 2.11).
            ours, vit, reference = (torch.compile(m, backend=args.compile, dynamic=False)
                                    for m in (ours, vit, reference))
        for batch in batches:
            x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size + batch))
            with torch.no_grad():
                diff = (ours(x) - reference(x)).abs().max().item()
            if not diff <= 1e-4:
                raise RuntimeError(f"zoo and official-style logits differ by {diff:.3g} at {size} px; not timing")
            samples, faults = interleaved_samples_with_faults(
                {"zoo": _runner(ours, x), "timm": _runner(vit, x), "ref": _runner(reference, x)},
                repeats=args.repeats, warmup=args.warmup, min_time=args.min_time,
            )
            t = medians(samples)
            # Ratios: medians over rounds of the per-round ratio (the three ran seconds apart in each round).
            vs_timm, vs_ref = paired_ratio(samples["timm"], samples["zoo"]), paired_ratio(samples["ref"], samples["zoo"])
            rows.append([str(size), str(batch), f"{batch / t['zoo']:.1f}", f"{batch / t['timm']:.1f}",
                         f"{batch / t['ref']:.1f}", f"{vs_timm:.2f}", f"{vs_ref:.2f}",
                         format_faults(faults[name] for name in ("zoo", "timm", "ref"))])
            print(f"# done {size} px batch {batch}", flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="zoo bench vision_agent",
        description="zoo agent_deit_tiny vs timm vit_tiny_patch16_224 vs the official-style forward: inference "
                    "img/s measured interleaved in one process, and the ratios.",
    )
    parser.add_argument("--sizes", default="224,448", help="image sizes, multiples of 16 (default 224,448)")
    parser.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    add_timing_arguments(parser, repeats=7, warmup=2, what="model")
    parser.add_argument("--min-time", type=float, default=0.2,
                        help="seconds per timing sample: forwards repeated and averaged (default 0.2)")
    parser.add_argument("--compile", default=None, metavar="BACKEND", type=compile_backend_arg,
                        help="torch.compile all three models with this backend (e.g. inductor) before timing")
    parser.add_argument("--freeze", action="store_true",
                        help="with --compile inductor: inductor freezing (parameters folded as constants)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    if args.freeze and args.compile != "inductor":
        parser.error("--freeze is an inductor option: use it with --compile inductor")
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        parser.error("--sizes and --batches take comma-separated integers")
    if not sizes or not batches or min(sizes) < 16 or min(batches) < 1 or args.repeats < 1 or args.warmup < 0 \
            or args.min_time < 0:
        parser.error("need sizes >= 16, batches >= 1, --repeats >= 1, --warmup >= 0, --min-time >= 0")
    if any(size % 16 for size in sizes):
        # The patch size is 16: the zoo pads a partial patch, the official-style reference (like the official
        # code) drops it, so the logits differ at other sizes and the agreement check would stop the run.
        parser.error(f"--sizes must be multiples of 16 (the patch size), got {[s for s in sizes if s % 16]}: at "
                     "other sizes the zoo pads the last partial patch and the official-style reference drops it, "
                     "so the two are not comparable")
    if args.compile:  # the first call of a compiled model compiles it: never timed, whatever --warmup says
        # (the agreement check calls the zoo and the reference first, but not timm's ViT)
        args.warmup = max(args.warmup, 1)
    threads = set_threads(args.threads)
    details = (f"fp32; eval, no_grad; repeats {args.repeats}, warmup {args.warmup}; min time {args.min_time} s; "
               f"{'torch.compile backend ' + args.compile if args.compile else 'eager'}"
               f"{' (freezing)' if args.freeze else ''}; interleaved rounds, medians; ratios = medians of the "
               "per-round ratios")
    print("## agent_deit_tiny vs timm vit_tiny_patch16_224 vs official-style\n\n"
          + run_header("vision_agent", argv, threads, details), flush=True)
    header = ["img", "batch", "zoo img/s", "timm img/s", "official-style img/s", "zoo/timm", "zoo/official",
              "page faults/fwd zoo/timm/official"]
    rows = []
    with _inductor_freezing(args.freeze):
        _measure(args, sizes, batches, rows)
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
        fmt = "  ".join("{:>%d}" % w for w in widths)
        print(fmt.format(*header))
        for r in rows:
            print(fmt.format(*r))
    print("# ratios: throughput of zoo / throughput of the peer (higher is better); page faults: minor faults of "
          "the process per forward during the timed calls (first writes to fresh pages; they move batch-1 times)")
    print(run_footer() + " (above ~2 on 2 cores, multi-thread timings are unreliable)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
