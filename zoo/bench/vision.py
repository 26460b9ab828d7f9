"""``zoo bench vision``: zoo vision models vs their peer (timm / official code), same config, same weights.

    zoo bench vision [--models vit_tiny_patch16_224,vit_small_patch16_224] [--batch 8] [--img-size 224]
                     [--threads 2] [--repeats 5] [--warmup 1] [--device cpu] [--no-train] [--no-infer]
                     [--attention-sizes 256,512,1024,2048,4096] [--no-attention]
                     [--full-last-block] [--compile inductor] [--markdown] [--list]

One run prints the two issue-2 tables, all measured in this process:

1. ``attend()`` vs ``torch.nn.functional.scaled_dot_product_attention`` (no mask and causal, N = 256..4096,
   B=1, H=4, D=64, fp32; forward and forward+backward; ratio = median over rounds of attend time / SDPA time, target <= 1.1).
   This is the ``core`` part of ``zoo bench attention`` (zoo.bench.attention.bench_core), run here so that
   one command gives both figures; ``--no-attention`` skips it.
2. For every vision case, interleaved (zoo, peer, zoo, peer, ...) after warm-up
   (zoo.bench.timing.interleaved_samples; ratios are medians of the per-round ratios, zoo.bench.timing.paired_ratio):

   * inference throughput (images/s, eval mode, no_grad) of both and the ratio zoo/peer (higher is better);
   * the training-step time (forward + cross-entropy + backward + AdamW step, train mode) of both and the
     ratio zoo/peer (lower is better; issue 2 target for ViT: <= 1.0).

``--compile BACKEND`` compiles both models of every case in place (``nn.Module.compile(backend=BACKEND,
dynamic=False)``) after the outputs are checked; compilation happens in the warm-up.

Cases are ``BenchCase(name, zoo_builder, peer_builder)``: ``peer_builder(img_size)`` returns the peer model,
``zoo_builder(img_size)`` ours; the peer's weights are then copied into ours with ``copy_weights``
(default: a strict ``load_state_dict`` of the peer's state dict), and the outputs are checked to agree
before anything is timed. The ViT cases live here; other families add theirs in optional modules
``zoo/bench/vision_<family>.py`` exposing ``CASES`` (a list of BenchCase or plain 3-tuples), imported when
present (see OPTIONAL_CASE_MODULES).
"""
from __future__ import annotations

import argparse
import fnmatch
import importlib
import sys
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.bench.timing import (
    add_timing_arguments,
    compile_backend_arg, format_faults, interleaved_samples, interleaved_samples_with_faults, medians,
    paired_ratio, run_footer, run_header, set_threads,
)

__all__ = ["BenchCase", "CASES", "OPTIONAL_CASE_MODULES", "PeerCannotRun", "all_cases", "main"]

OPTIONAL_CASE_MODULES = ["zoo.bench.vision_maxvit", "zoo.bench.vision_agent"]


def _strict_copy(zoo_model: nn.Module, peer_model: nn.Module) -> None:
    zoo_model.load_state_dict(peer_model.state_dict(), strict=True)


class BenchCase(NamedTuple):
    name: str
    zoo_builder: Callable[[int], nn.Module]  # img_size -> our model
    peer_builder: Callable[[int], nn.Module]  # img_size -> the peer model
    copy_weights: Optional[Callable[[nn.Module, nn.Module], None]] = None  # (ours, peer); default strict load
    img_size: int = 224  # default image size
    in_chans: int = 3
    peer_name: str = "timm"
    atol: float = 1e-4  # outputs of ours and the peer must agree to this before timing


def _vit_case(name: str, img_size: int = 224) -> BenchCase:
    def zoo_builder(size: int) -> nn.Module:
        import zoo
        import zoo.tasks.vision.vit  # noqa: F401  (registers the ViT names even before the package lists it)

        return zoo.create_model(name, img_size=size)

    def peer_builder(size: int) -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, img_size=size)

    return BenchCase(name, zoo_builder, peer_builder, img_size=img_size)


CASES: list[BenchCase] = [
    _vit_case("vit_tiny_patch16_224"),
    _vit_case("vit_small_patch16_224"),
    _vit_case("vit_base_patch16_224"),
]

DEFAULT_MODELS = "vit_tiny_patch16_224,vit_small_patch16_224"


def all_cases() -> list[BenchCase]:
    """The ViT cases plus those of the optional case modules that exist."""
    cases = list(CASES)
    for module_name in OPTIONAL_CASE_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:
                continue
            raise
        for case in getattr(module, "CASES", []):
            cases.append(case if isinstance(case, BenchCase) else BenchCase(*case))
    return cases


def _select(cases: list[BenchCase], spec: str) -> list[BenchCase]:
    patterns = [p.strip() for p in spec.split(",") if p.strip()]
    chosen = [c for c in cases if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
    if not chosen:
        names = ", ".join(c.name for c in cases)
        raise SystemExit(f"zoo bench vision: no case matches {spec!r}; available: {names}")
    return chosen


class PeerCannotRun(RuntimeError):
    """The peer model cannot be built or run at the requested size (timm's MaxViT needs multiples of its
    partitions, for instance): the case is skipped with this message, the others still run."""


def _peer_call(case: BenchCase, img_size: int, fn: Callable[[], object], what: str):
    try:
        return fn()
    except Exception as error:  # the peer's own assertion / shape error, reported with the size that caused it
        raise PeerCannotRun(
            f"{case.name}: the peer ({case.peer_name}) cannot {what} at img_size {img_size} "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); pick a size the peer "
            f"supports (e.g. its default, {case.img_size})"
        ) from error


def _build_pair(case: BenchCase, img_size: int, batch: int, device: str = "cpu") -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    peer = _peer_call(case, img_size, lambda: case.peer_builder(img_size), "be built")
    ours = case.zoo_builder(img_size)
    (case.copy_weights or _strict_copy)(ours, peer)
    peer.to(device)
    ours.to(device)
    x = torch.randn(batch, case.in_chans, img_size, img_size, device=device)
    ours.eval()
    peer.eval()
    with torch.no_grad():
        peer_out = _peer_call(case, img_size, lambda: peer(x), "run")
    _check_agreement(case, ours, peer_out, x)
    return ours, peer, x


def _check_agreement(case: BenchCase, ours: nn.Module, peer_out: torch.Tensor, x: torch.Tensor, what: str = "") -> None:
    with torch.no_grad():
        diff = (ours(x) - peer_out).abs().max().item()
    if not diff <= case.atol:
        raise RuntimeError(f"{case.name}: zoo and {case.peer_name} outputs{what} differ by {diff:.3g} (> {case.atol}); "
                           "not timing")


def _infer_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return model(x)

    return run


def _train_fn(model: nn.Module, x: torch.Tensor, num_classes: int) -> Callable[[], object]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target = torch.randint(0, max(num_classes, 1), (x.shape[0],), generator=torch.Generator().manual_seed(0)).to(x.device)

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits, target) if num_classes > 0 else logits.float().pow(2).mean()
        loss.backward()
        opt.step()
        return loss

    return step


def run_case(case: BenchCase, *, batch: int, img_size: Optional[int], repeats: int, warmup: int, train: bool, infer: bool,
             full_last_block: bool = False, device: str = "cpu", compile_backend: Optional[str] = None):
    size = img_size or case.img_size
    ours, peer, x = _build_pair(case, size, batch, device)
    if full_last_block and hasattr(ours, "class_token_last_block"):
        ours.class_token_last_block = False
    if compile_backend:  # both compiled in place, static graphs (as zoo bench vision_agent / graph)
        ours.compile(backend=compile_backend, dynamic=False)
        peer.compile(backend=compile_backend, dynamic=False)
        with torch.no_grad():  # the compiled models are checked again (this call compiles their inference graphs)
            _check_agreement(case, ours, peer(x), x, f" under torch.compile (backend {compile_backend})")
    row = {"case": case.name, "peer": case.peer_name, "batch": batch, "img_size": size}
    if infer:
        ours.eval()
        peer.eval()
        s, faults = interleaved_samples_with_faults({"zoo": _infer_fn(ours, x), "peer": _infer_fn(peer, x)},
                                                    repeats=repeats, warmup=warmup, device=device)
        t = medians(s)
        row.update(infer_zoo=batch / t["zoo"], infer_peer=batch / t["peer"],
                   infer_ratio=paired_ratio(s["peer"], s["zoo"]),
                   infer_faults=format_faults((faults["zoo"], faults["peer"])))
    if train:
        ours.train()
        peer.train()
        num_classes = getattr(peer, "num_classes", 0)
        s = interleaved_samples(
            {"zoo": _train_fn(ours, x, num_classes), "peer": _train_fn(peer, x, num_classes)},
            repeats=repeats,
            warmup=warmup,
            device=device,
        )
        t = medians(s)
        row.update(train_zoo=t["zoo"], train_peer=t["peer"], train_ratio=paired_ratio(s["zoo"], s["peer"]))
    return row


def _table(rows: list[dict], markdown: bool) -> str:
    header = ["case", "peer", "batch", "img", "infer zoo img/s", "infer peer img/s", "zoo/peer thr.",
              "infer page faults/fwd zoo/peer", "step zoo ms", "step peer ms", "zoo/peer time"]
    lines = []
    for r in rows:
        cells = [r["case"], r["peer"], str(r["batch"]), str(r["img_size"])]
        if "infer_zoo" in r:
            cells += [f"{r['infer_zoo']:.1f}", f"{r['infer_peer']:.1f}", f"{r['infer_ratio']:.3f}", r["infer_faults"]]
        else:
            cells += ["-", "-", "-", "-"]
        if "train_zoo" in r:
            cells += [f"{1e3 * r['train_zoo']:.1f}", f"{1e3 * r['train_peer']:.1f}", f"{r['train_ratio']:.3f}"]
        else:
            cells += ["-", "-", "-"]
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(c) + " |" for c in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = "  ".join("{:>%d}" % w for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*c) for c in lines])


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError(f"sequence lengths must be >= 1, got {text!r}")
    return sizes


def attention_table(sizes: list[int], *, repeats: int, warmup: int) -> str:
    """The attend() vs SDPA table (markdown) of ``zoo bench attention --parts core`` at these lengths."""
    from zoo.bench.attention import bench_core, build_parser

    # The attention benchmark's own parser: its defaults (shapes, --min-time, ...) apply unchanged.
    args = build_parser().parse_args(
        ["--core-sizes", ",".join(str(n) for n in sizes), "--repeats", str(repeats), "--warmup", str(warmup)]
    )
    return bench_core(args)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="zoo bench vision",
        description="zoo vision models vs their peer: inference img/s and training-step time, interleaved, as ratios.",
    )
    parser.add_argument("--models", default=DEFAULT_MODELS,
                        help=f"comma-separated case names or shell patterns (default {DEFAULT_MODELS}; 'all' for every case)")
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--img-size", type=int, default=None, help="image size (default: each case's own)")
    parser.add_argument("--device", default="cpu", help="device to run on (default cpu; e.g. cuda)")
    add_timing_arguments(parser, what="model")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step timing")
    parser.add_argument("--no-infer", action="store_true", help="skip the inference timing")
    parser.add_argument("--attention-sizes", type=_sizes, default=[256, 512, 1024, 2048, 4096],
                        help="sequence lengths of the attend() vs SDPA table (default 256,512,1024,2048,4096)")
    parser.add_argument("--no-attention", action="store_true", help="skip the attend() vs SDPA table")
    parser.add_argument("--markdown", action="store_true", help="print the model table as markdown")
    parser.add_argument("--full-last-block", action="store_true",
                        help="ablation: make zoo ViTs run the full last block (no class-token-only shortcut)")
    parser.add_argument("--compile", default=None, metavar="BACKEND", type=compile_backend_arg,
                        help="torch.compile ours and the peer with this backend (e.g. inductor) before timing")
    parser.add_argument("--list", action="store_true", help="list the available cases and exit")
    args = parser.parse_args(argv)
    cases = all_cases()
    if args.list:
        for case in cases:
            print(f"{case.name}  (peer: {case.peer_name}, default img_size {case.img_size})")
        return 0
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--batch and --repeats must be >= 1, --warmup >= 0")
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here")
    if args.compile:  # the first call of a compiled model compiles it: never timed, whatever --warmup says
        args.warmup = max(args.warmup, 1)
    if args.img_size is not None and args.img_size < 1:
        parser.error("--img-size must be >= 1")
    threads = set_threads(args.threads)
    chosen = cases if args.models.strip() == "all" else _select(cases, args.models)
    details = (f"device {args.device}; fp32; repeats {args.repeats}, warmup {args.warmup}"
               + ("; zoo ViT last block in full (ablation)" if args.full_last_block else "")
               + (f"; models under torch.compile backend {args.compile}" if args.compile else ""))
    print("## zoo bench vision\n\n" + run_header("vision", argv, threads, details), flush=True)
    if not args.no_attention and args.device == "cpu":
        print()
        print(attention_table(args.attention_sizes, repeats=args.repeats, warmup=args.warmup))
        print(flush=True)
    rows, skipped = [], []
    for case in chosen:
        try:
            rows.append(
                run_case(case, batch=args.batch, img_size=args.img_size, repeats=args.repeats, warmup=args.warmup,
                         train=not args.no_train, infer=not args.no_infer, full_last_block=args.full_last_block,
                         device=args.device, compile_backend=args.compile)
            )
        except PeerCannotRun as error:
            skipped.append(str(error))
            print(f"# skipped {error}", flush=True)
            continue
        print(f"# done {case.name}", flush=True)
    if not rows:
        print("zoo bench vision: no case could run: " + "; ".join(skipped), file=sys.stderr)
        return 2
    print(_table(rows, args.markdown))
    print("# infer: zoo/peer throughput ratio (higher is better); step: zoo/peer training-step time ratio "
          "(lower is better); each ratio is the median over rounds of that round's ratio, not the quotient of "
          "the median columns; page faults: minor faults of the process per inference forward (first writes to "
          "fresh pages)")
    print(run_footer())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
