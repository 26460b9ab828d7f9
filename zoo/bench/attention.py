"""``zoo bench attention``: attention speed, ours vs the peers, in one process, interleaved.

    zoo bench attention [--parts core,sparse,tiles,gpu] [--quick] [--repeats 5] [--warmup 1] [--threads N]
                        [--batch 1] [--heads 4] [--head-dim 64]
                        [--core-sizes 256,512,1024,2048,4096]
                        [--sparse-n 8192] [--fractions 1.0,0.5,0.25,0.1] [--masks window,radial,random]
                        [--gpu-frames 16,32] [--gpu-tokens 1024] [--gpu-head-dims 64,128] [--gpu-dtype bf16]

Parts (default: core, sparse, tiles on CPU; gpu as well when CUDA is available):

* ``core`` (issue 2): ``attend()`` vs ``torch.nn.functional.scaled_dot_product_attention`` for no mask and
  causal, N = 256..4096, forward (no_grad) and forward+backward, fp32 (target: attend <= 1.1x SDPA).
* ``sparse`` (issue 5, CPU): the zoo block-sparse CPU path (``attend`` on the "blocksparse" backend) vs
  SDPA given the equivalent dense boolean mask, forward and forward+backward, for Window, Radial and
  random block maps at kept-tile fractions 100/50/25/10% (the achieved fraction at 128x128 tiles is
  printed: a Radial layout reaches only some fractions at a given length). Target at N = 8192, ~25% kept
  tiles (2 cores, fp32, H = 4, D = 64): >= 2.5x SDPA for Window and Radial, >= 2x for random maps.
* ``tiles``: the tiles the Triton kernel would visit (non-EMPTY; FULL / PARTIAL) vs dense, at 128x128 and
  64x64 tiles, for the masks above and causal / Segments.
* ``gpu`` (issue 5, CUDA): zoo-triton (``attend(..., backend="triton")``) vs SDPA (flash for dense and
  causal; the dense boolean mask otherwise) vs FlexAttention (``torch.compile(flex_attention)`` with the
  same block mask), for dense, causal, sliding window, Segments (varlen packing) and Radial at video
  lengths (frames x tokens), D = 64 and 128, bf16: time, TFLOP/s (useful FLOPs: allowed pairs only;
  backward counted as 2.5x forward) and ratios. Without a GPU this part prints that GPU timings need one.

Every figure: the median of ``--repeats`` interleaved runs (A B A B ...) after ``--warmup`` calls
(zoo.bench.timing.interleaved_medians), fixed threads and seeds. Ratios are peer time / ours (higher is
better for us). Tables are printed as Markdown, ready for docs/bench_attention.md.
"""
from __future__ import annotations

import argparse
import datetime
import math
import sys
from typing import Callable, Optional

import torch
import torch.nn.attention
import torch.nn.functional as F

from zoo.attention import BlockSparse, Causal, Full, Mask, Segments, Window, attend, use_backend
from zoo.attention.radial import Radial
from zoo.bench.timing import interleaved_medians, machine_description, set_threads

__all__ = ["main", "window_for_fraction", "radial_for_fraction", "random_block_map", "sparse_masks"]

TILE = 128  # the tile at which kept fractions are reported and masks are chosen


# --------------------------------------------------------------------------------------------------
# Masks at a target kept-tile fraction
# --------------------------------------------------------------------------------------------------
def _kept(mask: Mask, n: int, tile: int = TILE) -> float:
    return mask.block_map(n, n, tile, tile).kept_fraction()


def window_for_fraction(n: int, fraction: float) -> Window:
    """Symmetric Window(w, w) whose kept-tile fraction at 128x128 tiles is closest to ``fraction``."""
    if fraction >= 1.0:
        return Window(n, n)
    best = None
    for w in range(0, n, max(1, TILE // 8)):
        error = abs(_kept(Window(w, w), n) - fraction)
        if best is None or error < best[0]:
            best = (error, w)
    return Window(best[1], best[1])


def radial_for_fraction(n: int, fraction: float, decay_factor: float = 1.0) -> Radial:
    """A Radial layout (frames x tokens, no text; at least 128 tokens per frame) with F*T in (0.95 n, n]
    whose kept fraction at 128x128 tiles is closest to ``fraction`` (ties: the longest sequence). Longer
    frames mean fewer, denser frame pairs, so only some fractions are reachable at a given length."""
    best = None
    for tokens in range(128, n // 2 + 1, 8 if n <= 16384 else 32):
        frames = n // tokens
        if frames < 2 or frames * tokens <= 0.95 * n:
            continue
        mask = Radial(frames, tokens, decay_factor)
        key = (round(abs(_kept(mask, frames * tokens) - fraction), 6), n - frames * tokens)
        if best is None or key < best[0]:
            best = (key, mask)
    return best[1]


def random_block_map(n: int, fraction: float, seed: int = 0) -> BlockSparse:
    """Random 128x128 block map with about ``fraction`` kept; the diagonal tile is always kept so no row
    is empty (SDPA returns NaN for rows without keys)."""
    nb = math.ceil(n / TILE)
    g = torch.Generator().manual_seed(seed)
    p = max(0.0, (fraction * nb - 1) / max(nb - 1, 1)) if fraction < 1.0 else 1.0
    keep = torch.rand(nb, nb, generator=g) < p
    keep.diagonal().fill_(True)
    return BlockSparse(keep, TILE)


def sparse_masks(n: int, fraction: float, kinds) -> dict[str, Mask]:
    makers = {
        "window": lambda: window_for_fraction(n, fraction),
        "radial": lambda: radial_for_fraction(n, fraction),
        "random": lambda: random_block_map(n, fraction),
    }
    unknown = [k for k in kinds if k not in makers]
    if unknown:
        raise ValueError(f"unknown mask kinds {unknown}; choose from {sorted(makers)}")
    return {kind: makers[kind]() for kind in kinds}


def _mask_len(mask: Mask, n: int) -> int:
    return mask.seq_len if isinstance(mask, Radial) else n


# --------------------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------------------
def _inputs(b, h, n, d, dtype=torch.float32, device="cpu", seed=0, grad=False):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float32).to(device, dtype) for _ in range(3))
    grad_out = torch.randn(b, h, n, d, generator=g, dtype=torch.float32).to(device, dtype)
    if grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v, grad_out


def _forward(fn: Callable, q, k, v) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return fn(q, k, v)

    return run


def _forward_backward(fn: Callable, q, k, v, grad_out) -> Callable[[], object]:
    def run():
        out = fn(q, k, v)
        torch.autograd.backward(out, grad_out)
        q.grad = k.grad = v.grad = None

    return run


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 10 else f"{seconds * 1e3:.0f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------------
def bench_core(args) -> str:
    """attend() vs SDPA, no mask and causal (issue 2)."""
    rows = []
    for n in args.core_sizes:
        q, k, v, go = _inputs(args.batch, args.heads, n, args.head_dim, grad=True)
        for name, mask, causal in (("dense", None, False), ("causal", Causal(), True)):
            ours = lambda q_, k_, v_, m=mask: attend(q_, k_, v_, m)  # noqa: E731
            peer = lambda q_, k_, v_, c=causal: F.scaled_dot_product_attention(q_, k_, v_, is_causal=c)  # noqa: E731
            t = interleaved_medians(
                {
                    "ours_f": _forward(ours, q, k, v),
                    "sdpa_f": _forward(peer, q, k, v),
                    "ours_fb": _forward_backward(ours, q, k, v, go),
                    "sdpa_fb": _forward_backward(peer, q, k, v, go),
                },
                repeats=args.repeats,
                warmup=args.warmup,
            )
            rows.append(
                [n, name, _ms(t["ours_f"]), _ms(t["sdpa_f"]), f"{t['ours_f'] / t['sdpa_f']:.2f}",
                 _ms(t["ours_fb"]), _ms(t["sdpa_fb"]), f"{t['ours_fb'] / t['sdpa_fb']:.2f}"]
            )
            print(f"  core N={n} {name}: fwd {rows[-1][4]}x, fwd+bwd {rows[-1][7]}x", file=sys.stderr, flush=True)
    headers = ["N", "mask", "attend fwd ms", "SDPA fwd ms", "attend/SDPA fwd", "attend fwd+bwd ms",
               "SDPA fwd+bwd ms", "attend/SDPA fwd+bwd"]
    return (
        f"### attend() vs torch SDPA (B={args.batch}, H={args.heads}, D={args.head_dim}, fp32; "
        "ratio = attend time / SDPA time, target <= 1.1)\n\n" + _table(headers, rows)
    )


def bench_sparse(args) -> str:
    """zoo block-sparse CPU path vs SDPA with the dense boolean mask (issue 5, CPU)."""
    rows = []
    for fraction in args.fractions:
        for kind, mask in sparse_masks(args.sparse_n, fraction, args.masks).items():
            n = _mask_len(mask, args.sparse_n)
            kept = _kept(mask, n)
            allowed = mask.dense(n, n)  # (1, 1, N, N) bool: what SDPA is given
            q, k, v, go = _inputs(args.batch, args.heads, n, args.head_dim, grad=True)

            def ours(q_, k_, v_, m=mask):
                with use_backend("blocksparse"):
                    return attend(q_, k_, v_, m)

            def peer(q_, k_, v_, a=allowed):
                return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=a)

            with torch.no_grad():  # both compute the same thing (no empty rows in these masks)
                err = float((ours(q, k, v) - peer(q, k, v)).abs().max())
            if not err < 1e-3:
                raise RuntimeError(f"{kind}: block-sparse output differs from SDPA by {err}")
            t = interleaved_medians(
                {
                    "ours_f": _forward(ours, q, k, v),
                    "sdpa_f": _forward(peer, q, k, v),
                    "ours_fb": _forward_backward(ours, q, k, v, go),
                    "sdpa_fb": _forward_backward(peer, q, k, v, go),
                },
                repeats=args.repeats,
                warmup=args.warmup,
            )
            rows.append(
                [kind, f"{fraction:.0%}", f"{kept:.1%}", n, _describe(mask), _ms(t["ours_f"]), _ms(t["sdpa_f"]),
                 f"{t['sdpa_f'] / t['ours_f']:.2f}x", _ms(t["ours_fb"]), _ms(t["sdpa_fb"]),
                 f"{t['sdpa_fb'] / t['ours_fb']:.2f}x"]
            )
            print(f"  sparse {kind} {fraction:.0%} (kept {kept:.1%}): fwd {rows[-1][7]}, fwd+bwd {rows[-1][10]}",
                  file=sys.stderr, flush=True)
            del allowed
    headers = ["kind", "target kept", "kept tiles", "N", "mask", "zoo fwd ms", "SDPA fwd ms", "speed-up fwd",
               "zoo fwd+bwd ms", "SDPA fwd+bwd ms", "speed-up fwd+bwd"]
    return (
        f"### zoo block-sparse CPU path vs SDPA with the dense boolean mask (B={args.batch}, H={args.heads}, "
        f"D={args.head_dim}, fp32, {TILE}x{TILE} tiles; speed-up = SDPA time / zoo time)\n\n" + _table(headers, rows)
    )


def _describe(mask: Mask) -> str:
    if isinstance(mask, Radial):
        return f"Radial({mask.num_frames}x{mask.tokens_per_frame}, decay {mask.decay_factor:g})"
    if isinstance(mask, Window):
        return f"Window({mask.left}, {mask.right})"
    if isinstance(mask, BlockSparse):
        return f"BlockSparse({mask.block_mask.shape[-1]}^2 tiles)"
    return repr(mask)


def _tile_counts(mask: Mask, n: int, tile: int) -> str:
    states = mask.block_map(n, n, tile, tile).states
    total = states.numel()
    full = int((states == 2).sum())
    partial = int((states == 1).sum())
    return f"{full + partial}/{total} ({(full + partial) / total:.1%}; {full} full, {partial} partial)"


def bench_tiles(args) -> str:
    """Tiles the Triton kernel would visit vs dense."""
    n = args.sparse_n
    masks: dict[str, Mask] = {"causal": Causal()}
    ids = torch.repeat_interleave(torch.arange(8), math.ceil(n / 8))[:n]
    masks["segments (8 equal)"] = Segments(ids)
    for fraction in args.fractions:
        for kind, mask in sparse_masks(n, fraction, args.masks).items():
            masks[f"{kind} {fraction:.0%}: {_describe(mask)}"] = mask
    rows = []
    for name, mask in masks.items():
        length = _mask_len(mask, n)
        rows.append([name, length] + [_tile_counts(mask, length, t) for t in (128, 64)])
    return (
        f"### Tiles the Triton kernel would visit (non-EMPTY) vs dense, N ~ {n}\n\n"
        + _table(["mask", "N", "128x128 tiles", "64x64 tiles"], rows)
    )


def _count_allowed(mask: Mask, n: int, device) -> int:
    """Allowed (query, key) pairs, counted in row chunks."""
    chunk = max(1, (1 << 26) // n)
    total = 0
    for start in range(0, n, chunk):
        total += int(mask.dense(n, n, device, rows=(start, min(n, start + chunk))).sum())
    return total


def bench_gpu(args) -> str:
    """zoo-triton vs SDPA vs FlexAttention on CUDA (issue 5)."""
    if not torch.cuda.is_available():
        return "### GPU (zoo-triton vs SDPA-flash vs FlexAttention)\n\nGPU timings need a GPU: no CUDA device here."
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.gpu_dtype]
    device = "cuda"
    rows = []
    for frames in args.gpu_frames:
        n = frames * args.gpu_tokens
        window = args.gpu_tokens  # one frame to each side
        ids = torch.repeat_interleave(torch.arange(frames, device=device), args.gpu_tokens)
        radial = Radial(frames, args.gpu_tokens, 1.0)
        radial_blocks = radial.block_mask.to(device)
        block = radial.block_size
        cases = {
            # name: (zoo mask, FlexAttention mask_mod); "dense" runs without a block mask.
            "dense": (None, None),
            "causal": (Causal(), lambda b, h, i, j: i >= j),
            "window": (Window(window, window), lambda b, h, i, j: (i - j).abs() <= window),
            "segments": (Segments(ids), lambda b, h, i, j: ids[i] == ids[j]),
            "radial": (radial, lambda b, h, i, j: radial_blocks[i // block, j // block]),
        }
        for d in args.gpu_head_dims:
            q, k, v, go = _inputs(args.batch, args.heads, n, d, dtype=dtype, device=device, grad=True)
            for name, (mask, mask_mod) in cases.items():
                pairs = n * n if mask is None else _count_allowed(mask, n, device)
                flops_f = 4.0 * args.batch * args.heads * d * pairs
                block_mask = None
                if mask is not None:
                    block_mask = create_block_mask(mask_mod, None, None, n, n, device=device, BLOCK_SIZE=128)
                if mask is None or isinstance(mask, Causal):
                    causal = mask is not None

                    def sdpa(q_, k_, v_, c=causal):
                        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                            return F.scaled_dot_product_attention(q_, k_, v_, is_causal=c)

                    sdpa_name = "SDPA-flash"
                else:
                    allowed = mask.dense(n, n, device)

                    def sdpa(q_, k_, v_, a=allowed):
                        return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=a)

                    sdpa_name = "SDPA (dense mask)"
                fns = {
                    "zoo-triton": lambda q_, k_, v_, m=mask: attend(q_, k_, v_, m, backend="triton"),
                    sdpa_name: sdpa,
                    "FlexAttention": lambda q_, k_, v_, bm=block_mask: flex(q_, k_, v_, block_mask=bm),
                }
                for mode in ("fwd", "fwd+bwd"):
                    timed = {}
                    for label, fn in fns.items():
                        timed[label] = _forward(fn, q, k, v) if mode == "fwd" else _forward_backward(fn, q, k, v, go)
                    try:
                        t = interleaved_medians(timed, repeats=args.repeats, warmup=max(args.warmup, 2), device=device)
                    except Exception as error:  # one failing peer must not hide the others' figures
                        rows.append([name, n, d, mode, f"error: {type(error).__name__}: {str(error)[:80]}"] + [""] * 4)
                        continue
                    flops = flops_f * (1.0 if mode == "fwd" else 3.5)
                    ours = t["zoo-triton"]
                    cells = [name, n, d, mode]
                    for label in fns:
                        cells.append(f"{label}: {_ms(t[label])} ms, {flops / t[label] / 1e12:.0f} TF/s")
                    cells.append(f"{t[sdpa_name] / ours:.2f}x")
                    cells.append(f"{t['FlexAttention'] / ours:.2f}x")
                    rows.append(cells)
                    print("  gpu", " | ".join(str(c) for c in cells), file=sys.stderr, flush=True)
    headers = ["mask", "N", "D", "pass", "zoo-triton", "SDPA", "FlexAttention", "SDPA/zoo", "Flex/zoo"]
    return (
        f"### GPU: zoo-triton vs SDPA vs FlexAttention ({torch.cuda.get_device_name()}, {args.gpu_dtype}, "
        f"B={args.batch}, H={args.heads}; TF/s over allowed pairs; ratio = peer time / zoo time)\n\n"
        + _table(headers, rows)
    )


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoo bench attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=None, help="comma list of core,sparse,tiles,gpu (default: all that apply)")
    p.add_argument("--quick", action="store_true", help="small sizes and 3 repeats (a smoke run of a minute)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--core-sizes", type=_ints, default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--sparse-n", type=int, default=8192)
    p.add_argument("--fractions", type=_floats, default=[1.0, 0.5, 0.25, 0.1])
    p.add_argument("--masks", type=lambda s: [x for x in s.split(",") if x], default=["window", "radial", "random"])
    p.add_argument("--gpu-frames", type=_ints, default=[16, 32])
    p.add_argument("--gpu-tokens", type=int, default=1024)
    p.add_argument("--gpu-head-dims", type=_ints, default=[64, 128])
    p.add_argument("--gpu-dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 3)
        args.core_sizes = [n for n in args.core_sizes if n <= 1024]
        args.sparse_n = min(args.sparse_n, 2048)
        args.gpu_frames = args.gpu_frames[:1]
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    parts = args.parts.split(",") if args.parts else ["core", "sparse", "tiles", "gpu"]
    unknown = set(parts) - {"core", "sparse", "tiles", "gpu"}
    if unknown:
        raise SystemExit(f"unknown --parts {sorted(unknown)}; choose from core,sparse,tiles,gpu")
    threads = set_threads(args.threads)
    torch.manual_seed(0)
    command = "zoo bench attention " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"## zoo bench attention\n\ncommand: `{command.strip()}`  ")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  ")
    print(f"machine: {machine_description()}; torch threads {threads}\n", flush=True)
    for part in parts:
        result = {"core": bench_core, "sparse": bench_sparse, "tiles": bench_tiles, "gpu": bench_gpu}[part](args)
        print(result + "\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
