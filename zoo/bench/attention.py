"""``zoo bench attention``: attention speed, ours vs the peers, in one process, interleaved.

    zoo bench attention [--parts core,sparse,tiles,gpu] [--quick] [--repeats 5] [--warmup 1] [--threads N]
                        [--batch 1] [--heads 4] [--head-dim 64]
                        [--core-sizes 256,512,1024,2048,4096]
                        [--sparse-n 8192] [--fractions 1.0,0.5,0.25,0.1] [--masks window,radial,random|chunk|varlen]
                        [--gpu-frames 16,32] [--gpu-tokens 1024] [--gpu-head-dims 64,128] [--gpu-dtype bf16]
    zoo bench attention --gpu [--quick]     # the one-shot GPU run: gpu part only, targets checked, exit 1 on FAIL

Parts (default: core, sparse, tiles on CPU; gpu as well when CUDA is available):

* ``core`` (issue 2): ``attend()`` vs ``torch.nn.functional.scaled_dot_product_attention`` for no mask and
  causal, N = 256..4096, forward (no_grad) and forward+backward, fp32 (target: attend <= 1.1x SDPA).
* ``sparse`` (issue 5, CPU): the zoo block-sparse CPU path (``attend`` on the "blocksparse" backend) vs
  SDPA given the equivalent dense boolean mask, forward and forward+backward, for Window, Radial and
  random block maps (``--masks chunk``: a symmetric ChunkWindow of 96-token chunks too) at kept-tile
  fractions 100/50/25/10% (the achieved fraction at 128x128 tiles is printed: a Radial layout reaches only
  some fractions at a given length). Target at N = 8192, ~25% kept
  tiles (2 cores, fp32, H = 4, D = 64): >= 2.5x SDPA for Window and Radial, >= 2x for random maps.
* ``tiles``: the tiles the Triton kernel would visit (non-EMPTY; FULL / PARTIAL) vs dense, at 128x128 and
  64x64 tiles, for the masks above and causal / Segments.
* ``gpu`` (issue 5, CUDA): zoo-triton (``attend(..., backend="triton")``) vs SDPA (flash for dense and
  causal; the dense boolean mask otherwise) vs FlexAttention (``torch.compile(flex_attention)`` with the
  same block mask), for dense, causal, sliding window, Segments (varlen packing) and Radial at video
  lengths (frames x tokens), D = 64 and 128, bf16: time, TFLOP/s (useful FLOPs: allowed pairs only;
  backward counted as 2.5x forward), ratios and the max error against SDPA; a block-sparse sweep (random
  block maps at the kept fractions vs zoo dense and FlexAttention); the peak memory of a Radial
  forward+backward; PASS/FAIL lines for the issue's H100 targets. Without a GPU this part prints that GPU
  timings need one (``--gpu-device cpu`` runs it under the Triton interpreter at tiny sizes, for tests).

Every figure: medians of ``--repeats`` interleaved rounds after ``--warmup`` calls (zoo.bench.timing:
rounds rotate and every other one runs backwards), fixed threads and seeds. CPU ratios are medians of the
per-round ratios (paired_ratio): attend / SDPA time in the core part (lower is better), SDPA / zoo time in
the sparse part (the speed-up); the GPU part reports ratios of medians. Tables are printed as Markdown, ready
for docs/bench_attention.md.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.attention
import torch.nn.functional as F

from zoo.attention import BlockSparse, Causal, ChunkWindow, Mask, Segments, Window, attend, use_backend
from zoo.attention.radial import Radial, _empty_block_rows
from zoo.bench.timing import (
    add_timing_arguments,
    interleaved_medians, interleaved_samples, medians, paired_ratio, require_agreement, run_footer, run_header,
    set_threads,
)

__all__ = ["main", "window_for_fraction", "chunk_for_fraction", "radial_for_fraction", "varlen_causal_for_fraction",
           "random_block_map", "sparse_masks", "radial_layouts", "MASK_KINDS"]

TILE = 128  # the tile at which kept fractions are reported and masks are chosen


# --------------------------------------------------------------------------------------------------
# Masks at a target kept-tile fraction
# --------------------------------------------------------------------------------------------------
def _kept(mask: Mask, n: int, tile: int = TILE) -> float:
    return mask.block_map(n, n, tile, tile).kept_fraction()


def _closest(n: int, fraction: float, masks) -> Mask:
    """The first of ``masks`` whose kept-tile fraction at 128x128 tiles is closest to ``fraction``."""
    return min(masks, key=lambda mask: abs(_kept(mask, n) - fraction))


def window_for_fraction(n: int, fraction: float) -> Window:
    """Symmetric Window(w, w) whose kept-tile fraction at 128x128 tiles is closest to ``fraction``."""
    if fraction >= 1.0:
        return Window(n, n)
    return _closest(n, fraction, (Window(w, w) for w in range(0, n, max(1, TILE // 8))))


def chunk_for_fraction(n: int, fraction: float, chunk: int = 96) -> ChunkWindow:
    """Symmetric ChunkWindow(chunk, c, c) (each chunk sees c chunks on each side: local attention over frames
    or speech chunks) whose kept-tile fraction at 128x128 tiles is closest to ``fraction``. The default chunk
    is not a multiple of the tile, so the CPU path's chunk-aligned tiles matter."""
    if fraction >= 1.0:
        return ChunkWindow(chunk, None, None)
    return _closest(n, fraction, (ChunkWindow(chunk, c, c) for c in range(0, math.ceil(n / chunk))))


def radial_layouts(n: int):
    """The (frames, tokens per frame) Radial layouts the benchmarks choose from for about ``n`` tokens: at least
    2 frames of at least 128 tokens (a multiple of 8, or of 32 above 16384 tokens) with F*T in (0.95 n, n], and
    no block row at the 128 block without a key. Such rows (8 x 240 or 16 x 488 tokens: frames too short against
    the block for the published one-third rule) make Radial warn that attention returns zeros there, which is
    not a layout to time; they are skipped before a mask is built, so the sweep prints no warnings."""
    for tokens in range(128, n // 2 + 1, 8 if n <= 16384 else 32):
        frames = n // tokens
        if frames < 2 or frames * tokens <= 0.95 * n:
            continue
        if len(_empty_block_rows(frames, tokens, 128, 0)):
            continue
        yield frames, tokens


def radial_layout_error(n: int) -> Optional[str]:
    """Why no Radial layout fits ``n`` tokens (:func:`radial_layouts`), naming the nearest lengths that have one;
    None where one does."""
    if next(radial_layouts(n), None) is not None:
        return None
    below = next((m for m in range(n - 1, 255, -1) if next(radial_layouts(m), None)), None)
    above = next((m for m in range(n + 1, 2 * n + 512) if next(radial_layouts(m), None)), None)
    nearest = " or ".join(str(m) for m in (below, above) if m is not None)
    return (f"--sparse-n {n}: no Radial layout of >= 2 frames x >= 128 tokens covers more than 95% of {n} tokens "
            f"without block rows that see no key; use --sparse-n {nearest}, or drop radial from --masks")


def radial_for_fraction(n: int, fraction: float, decay_factor: float = 1.0) -> Radial:
    """The Radial layout of :func:`radial_layouts` whose kept fraction at 128x128 tiles is closest to
    ``fraction`` (ties: the longest sequence). Longer frames mean fewer, denser frame pairs, so only some
    fractions are reachable at a given length. ValueError where ``n`` has no layout (270, 271, 287 tokens)."""
    best = None
    for frames, tokens in radial_layouts(n):
        mask = Radial(frames, tokens, decay_factor)
        key = (round(abs(_kept(mask, frames * tokens) - fraction), 6), n - frames * tokens)
        if best is None or key < best[0]:
            best = (key, mask)
    if best is None:
        raise ValueError(radial_layout_error(n))
    return best[1]


def random_block_map(n: int, fraction: float, seed: int = 0, tile: int = TILE) -> BlockSparse:
    """Random tile x tile (default 128) block map with about ``fraction`` kept; the diagonal tile is always
    kept so no row is empty (SDPA returns NaN for rows without keys)."""
    nb = math.ceil(n / tile)
    g = torch.Generator().manual_seed(seed)
    p = max(0.0, (fraction * nb - 1) / max(nb - 1, 1)) if fraction < 1.0 else 1.0
    keep = torch.rand(nb, nb, generator=g) < p
    keep.diagonal().fill_(True)
    return BlockSparse(keep, tile)


def varlen_causal_for_fraction(n: int, fraction: float, seed: int = 0) -> Mask:
    """Causal attention inside packed sequences (``Segments.from_cu_seqlens(cu).causal()``, flash_attn_varlen_func's
    causal=True) of random lengths (between half and one and a half times the mean) summing to n, with the number
    of sequences whose kept-tile fraction at 128x128 tiles is closest to ``fraction`` (one sequence: plain causal,
    about half of the tiles)."""
    g = torch.Generator().manual_seed(seed)

    def packed(count: int) -> Mask:
        weights = 0.5 + torch.rand(count, generator=g, dtype=torch.float64)
        lengths = torch.clamp((weights / weights.sum() * n).floor().long(), min=1)
        lengths[-1] += n - int(lengths.sum())
        cu = [0] + torch.cumsum(lengths, 0).tolist()
        return Segments.from_cu_seqlens(cu).causal()

    return _closest(n, fraction, (packed(count) for count in range(1, max(2, n // TILE))))


MASK_KINDS = ("chunk", "radial", "random", "varlen", "window")  # --masks


def unknown_masks_error(kinds) -> Optional[str]:
    """The error for mask kinds outside :data:`MASK_KINDS`, None where all are known."""
    unknown = [k for k in kinds if k not in MASK_KINDS]
    return f"unknown mask kinds {unknown}; choose from {list(MASK_KINDS)}" if unknown else None


def sparse_masks(n: int, fraction: float, kinds) -> dict[str, Mask]:
    error = unknown_masks_error(kinds)
    if error:
        raise ValueError(error)
    makers = {
        "window": lambda: window_for_fraction(n, fraction),
        "chunk": lambda: chunk_for_fraction(n, fraction),
        "varlen": lambda: varlen_causal_for_fraction(n, fraction),
        "radial": lambda: radial_for_fraction(n, fraction),
        "random": lambda: random_block_map(n, fraction),
    }
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
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if seconds < 10 else f"{ms:.0f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------------
def _outputs_and_grads(fn, q, k, v, go) -> tuple[torch.Tensor, tuple]:
    qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = fn(qq, kk, vv)
    return out.detach(), torch.autograd.grad(out, (qq, kk, vv), go)


def _grad_error(grads_ours, grads_ref) -> float:
    """Largest dq / dk / dv difference, relative to the largest reference gradient (fp32). Not per gradient: where
    a query sees one key (a window of 0), dq and dk are exactly 0 and both sides return rounding noise of 1e-7."""
    scale = max(float(g.float().abs().max()) for g in grads_ref)
    return max(float((a.float() - b.float()).abs().max()) for a, b in zip(grads_ours, grads_ref)) / max(scale, 1e-12)


def _check_same(what: str, ours, peer, q, k, v, go) -> None:
    """Outputs and q/k/v gradients of the two sides agree before anything is timed (fp32: 1e-4 relative)."""
    (o1, g1), (o2, g2) = (_outputs_and_grads(fn, q, k, v, go) for fn in (ours, peer))
    out_err = ((o1 - o2).abs().max() / o2.abs().max().clamp_min(1e-12)).item()
    require_agreement(f"zoo bench attention {what}", out_err, _grad_error(g1, g2), 1e-4, 1e-4)


def bench_core(args) -> str:
    """attend() vs SDPA, no mask and causal (issue 2)."""
    rows = []
    for n in args.core_sizes:
        q, k, v, go = _inputs(args.batch, args.heads, n, args.head_dim, grad=True)
        for name, mask, causal in (("dense", None, False), ("causal", Causal(), True)):
            ours = lambda q_, k_, v_, m=mask: attend(q_, k_, v_, m)  # noqa: E731
            peer = lambda q_, k_, v_, c=causal: F.scaled_dot_product_attention(q_, k_, v_, is_causal=c)  # noqa: E731
            _check_same(f"core N={n} {name}", ours, peer, q, k, v, go)
            samples = interleaved_samples(
                {
                    "ours_f": _forward(ours, q, k, v),
                    "sdpa_f": _forward(peer, q, k, v),
                    "ours_fb": _forward_backward(ours, q, k, v, go),
                    "sdpa_fb": _forward_backward(peer, q, k, v, go),
                },
                repeats=args.repeats,
                warmup=args.warmup,
                min_time=args.min_time,
            )
            t = medians(samples)
            rows.append(
                [n, name, _ms(t["ours_f"]), _ms(t["sdpa_f"]), f"{paired_ratio(samples['ours_f'], samples['sdpa_f']):.2f}",
                 _ms(t["ours_fb"]), _ms(t["sdpa_fb"]), f"{paired_ratio(samples['ours_fb'], samples['sdpa_fb']):.2f}"]
            )
            print(f"  core N={n} {name}: fwd {rows[-1][4]}x, fwd+bwd {rows[-1][7]}x", file=sys.stderr, flush=True)
    headers = ["N", "mask", "attend fwd ms", "SDPA fwd ms", "attend/SDPA fwd", "attend fwd+bwd ms",
               "SDPA fwd+bwd ms", "attend/SDPA fwd+bwd"]
    return (
        f"### attend() vs torch SDPA (B={args.batch}, H={args.heads}, D={args.head_dim}, fp32; "
        "ratio = median over rounds of attend time / SDPA time in that round, target <= 1.1)\n\n" + _table(headers, rows)
    )


def plot_sparse(points: list[tuple[str, float, float, float]], path, title: str):
    """Speed-up over SDPA (forward, forward+backward) against the kept-tile fraction, one line per mask kind,
    with the ideal 1 / kept and the issue-5 targets at 25% kept (``points``: kind, kept, fwd, fwd+bwd)."""
    from zoo.plotting import png_path, pyplot, save_figure

    path = png_path(str(path))
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    kinds = sorted({kind for kind, *_ in points})
    kept_all = sorted({kept for _, kept, *_ in points})
    grid = [min(kept_all) * 0.9 + (max(kept_all) * 1.02 - min(kept_all) * 0.9) * i / 99 for i in range(100)]
    for ax, column, name in ((axes[0], 2, "forward"), (axes[1], 3, "forward + backward")):
        ax.plot(grid, [1 / x for x in grid], color="0.6", linestyle="--", label="ideal: 1 / kept")
        ax.axhline(1.0, color="0.3", linewidth=0.8)
        for kind in kinds:
            pts = sorted((p[1], p[column]) for p in points if p[0] == kind)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=kind)
        if column == 3:  # the issue-5 CPU targets, at about 25% kept tiles
            ax.plot([0.25], [2.5], marker="*", markersize=12, color="black", linestyle="none",
                    label="target: window, radial >= 2.5x")
            ax.plot([0.25], [2.0], marker="*", markersize=12, color="0.5", linestyle="none",
                    label="target: random >= 2x")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("kept-tile fraction")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speed-up over SDPA with the dense mask")
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def bench_sparse(args) -> str:
    """zoo block-sparse CPU path vs SDPA with the dense boolean mask (issue 5, CPU)."""
    rows, points = [], []
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

            # both compute the same thing (no empty rows in these masks), outputs and q/k/v gradients: the table
            # publishes a forward+backward speed-up, so a wrong sparse backward must stop it too
            _check_same(f"sparse {kind} {fraction:.0%}", ours, peer, q, k, v, go)
            samples = interleaved_samples(
                {
                    "ours_f": _forward(ours, q, k, v),
                    "sdpa_f": _forward(peer, q, k, v),
                    "ours_fb": _forward_backward(ours, q, k, v, go),
                    "sdpa_fb": _forward_backward(peer, q, k, v, go),
                },
                repeats=args.repeats,
                warmup=args.warmup,
            )
            t = medians(samples)
            speedup_f = paired_ratio(samples["sdpa_f"], samples["ours_f"])
            speedup_fb = paired_ratio(samples["sdpa_fb"], samples["ours_fb"])
            points.append((kind, kept, speedup_f, speedup_fb))
            rows.append(
                [kind, f"{fraction:.0%}", f"{kept:.1%}", n, _describe(mask), _ms(t["ours_f"]), _ms(t["sdpa_f"]),
                 f"{speedup_f:.2f}x", _ms(t["ours_fb"]), _ms(t["sdpa_fb"]), f"{speedup_fb:.2f}x"]
            )
            print(f"  sparse {kind} {fraction:.0%} (kept {kept:.1%}): fwd {rows[-1][7]}, fwd+bwd {rows[-1][10]}",
                  file=sys.stderr, flush=True)
            del allowed
    headers = ["kind", "target kept", "kept tiles", "N", "mask", "zoo fwd ms", "SDPA fwd ms", "speed-up fwd",
               "zoo fwd+bwd ms", "SDPA fwd+bwd ms", "speed-up fwd+bwd"]
    if args.plot and points:
        from zoo.bench.timing import machine_description

        title = (f"zoo CPU block-sparse path vs SDPA with the dense mask, N={args.sparse_n}, B={args.batch}, "
                 f"H={args.heads}, D={args.head_dim}, fp32, {torch.get_num_threads()} threads\n"
                 f"{machine_description()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        print(f"  plot: {plot_sparse(points, args.plot, title)}", file=sys.stderr, flush=True)
    return (
        f"### zoo block-sparse CPU path vs SDPA with the dense boolean mask (B={args.batch}, H={args.heads}, "
        f"D={args.head_dim}, fp32, {TILE}x{TILE} tiles; speed-up = median over rounds of SDPA time / zoo time in "
        "that round)\n\n" + _table(headers, rows)
    )


def _describe(mask: Mask) -> str:
    if isinstance(mask, Radial):
        return f"Radial({mask.num_frames}x{mask.tokens_per_frame}, decay {mask.decay_factor:g})"
    if isinstance(mask, Window):
        return f"Window({mask.left}, {mask.right})"
    if isinstance(mask, ChunkWindow):
        return f"ChunkWindow({mask.chunk_size}, {mask.left}, {mask.right})"
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


def _flops_per_pair(batch: int, heads: int, head_dim: int) -> float:
    """Forward FLOPs of one allowed (query, key) pair: q.k and p.v, 2 * D multiply-adds each."""
    return 4.0 * batch * heads * head_dim


def _gpu_device(args) -> str:
    return getattr(args, "gpu_device", None) or "cuda"


def _is_cuda(device) -> bool:
    """"cuda", "cuda:0", torch.device("cuda", 1): all the GPU path (a plain string test sent cuda:0 to the
    CPU dry run: no synchronisation, eager FlexAttention on detached inputs)."""
    return torch.device(device).type == "cuda"


def _agree(what: str, reference: torch.Tensor, flex_out: torch.Tensor, zoo_err: float, peer: str,
           zoo_grad_err: float = 0.0) -> None:
    """The zoo kernel and FlexAttention both match the SDPA reference before a case is timed, and so do the zoo
    kernel's q/k/v gradients (``zoo_grad_err``, relative to the largest reference gradient; FlexAttention's
    backward is the peer's own affair). Tolerances: outputs 1e-3 of their scale in fp32 and 2e-2 in fp16 / bf16,
    gradients 1e-3 and 5e-2 (two half-precision kernels' gradients differ by more than their outputs; a wrong
    gradient is off by the gradients' own scale). Otherwise the case becomes an error row and gives no verdict."""
    half = flex_out.dtype in (torch.float16, torch.bfloat16)
    rel_tol, grad_tol = (2e-2, 5e-2) if half else (1e-3, 1e-3)
    tol = rel_tol * float(reference.abs().max().clamp_min(1e-6))
    flex_err = float((flex_out.float() - reference).abs().max())
    if not (zoo_err <= tol and flex_err <= tol):
        raise RuntimeError(f"{what}: outputs differ from {peer} (zoo {zoo_err:.2g}, FlexAttention {flex_err:.2g}, "
                           f"tolerance {tol:.2g}); not timed")
    if not zoo_grad_err <= grad_tol:  # (NaN fails too)
        raise RuntimeError(f"{what}: zoo's q/k/v gradients differ from {peer}'s by {zoo_grad_err:.2g} of the largest "
                           f"gradient (tolerance {grad_tol:.2g}); not timed")


def _errors_against(ours, reference, q, k, v, go) -> tuple[torch.Tensor, float, float]:
    """One forward + backward of each: (the reference output in fp32, max |ours - reference| of the outputs,
    :func:`_grad_error` of the gradients)."""
    (out, grads), (ref_out, ref_grads) = (_outputs_and_grads(fn, q, k, v, go) for fn in (ours, reference))
    ref_out = ref_out.float()
    return ref_out, float((out.float() - ref_out).abs().max()), _grad_error(grads, ref_grads)


def bench_gpu(args) -> str:
    """zoo-triton vs SDPA vs FlexAttention on CUDA (issue 5), with the issue's targets checked.

    Sections: (1) per mask (dense, causal, sliding window, Segments varlen packing, Radial) at each video
    length and head dim: time and TF/s of the three, the max |zoo - SDPA| of the forward output (the zoo kernel's
    gradients checked against SDPA's too, :func:`_agree`); (2) a
    block-sparse sweep (random 128x128 block maps at the kept fractions) against zoo's own dense time and
    FlexAttention with the same block mask; (3) peak memory of a zoo forward+backward (O(N) check);
    (4) PASS/FAIL against the H100 targets. ``args.gpu_device="cpu"`` runs the same code under the Triton
    interpreter at tiny sizes (tests/test_sparse_bench.py), with eager FlexAttention.
    """
    device = _gpu_device(args)
    title = "### GPU: zoo-triton vs SDPA vs FlexAttention"
    if _is_cuda(device) and not torch.cuda.is_available():
        return (f"{title}\n\nGPU timings need a GPU: no CUDA device here. On a CUDA machine run "
                "`python -m zoo.bench.attention --gpu` (docs/bench_attention.md, section GPU).")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _is_cuda(device):
        compile_flex = not getattr(args, "gpu_eager_flex", False)
        # Every (mask_mod, shape) is a new graph of the one compiled function: above Dynamo's default of 8
        # recompiles it would silently fall back to eager flex_attention (which materialises the scores).
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 256)
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 1024)
        flex = torch.compile(flex_attention, dynamic=False) if compile_flex else flex_attention
    else:
        def flex(q_, k_, v_, block_mask):
            """Dry run only: FlexAttention has no CPU backward, so its forward runs on detached inputs and
            the result is tied to q, k, v by a zero term to let the fwd+bwd timing loop run."""
            with torch.no_grad():
                out = flex_attention(q_.detach(), k_.detach(), v_.detach(), block_mask=block_mask)
            return out + 0.0 * (q_.sum() + k_.sum() + v_.sum())
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.gpu_dtype]
    radial_block = getattr(args, "gpu_radial_block", 128)
    flex_block = min(128, radial_block) if not _is_cuda(device) else 128
    timing = dict(repeats=args.repeats, warmup=max(args.warmup, 2 if _is_cuda(device) else 0),
                  device=device if _is_cuda(device) else None)
    rows, sweep_rows, verdicts = [], [], []
    errors: list[str] = []

    def flex_mask(mask_mod, n):
        return create_block_mask(mask_mod, None, None, n, n, device=device, BLOCK_SIZE=flex_block)

    def timed_pair(fns, q, k, v, go):
        out = {}
        for mode in ("fwd", "fwd+bwd"):
            calls = {label: (_forward(fn, q, k, v) if mode == "fwd" else _forward_backward(fn, q, k, v, go))
                     for label, fn in fns.items()}
            out[mode] = interleaved_medians(calls, **timing)
        return out

    # (1) masks x lengths x head dims
    for frames in args.gpu_frames:
        n = frames * args.gpu_tokens
        window = args.gpu_tokens  # one frame to each side
        ids = torch.repeat_interleave(torch.arange(frames, device=device), args.gpu_tokens)
        radial = Radial(frames, args.gpu_tokens, 1.0, block_size=radial_block)
        radial_blocks = radial.block_mask.to(device)
        cases = {
            # name: (zoo mask, FlexAttention mask_mod); "dense" runs without a block mask.
            "dense": (None, None),
            "causal": (Causal(), lambda b, h, i, j: i >= j),
            "window": (Window(window, window), lambda b, h, i, j: (i - j).abs() <= window),
            "segments": (Segments(ids), lambda b, h, i, j: ids[i] == ids[j]),
            "radial": (radial, lambda b, h, i, j: radial_blocks[i // radial_block, j // radial_block]),
        }
        for d in args.gpu_head_dims:
            q, k, v, go = _inputs(args.batch, args.heads, n, d, dtype=dtype, device=device, grad=True)
            for name, (mask, mask_mod) in cases.items():
                try:
                    pairs = n * n if mask is None else _count_allowed(mask, n, device)
                    block_mask = None if mask is None else flex_mask(mask_mod, n)
                    if mask is None or isinstance(mask, Causal):
                        causal = mask is not None

                        def sdpa(q_, k_, v_, c=causal):
                            if not _is_cuda(device):
                                return F.scaled_dot_product_attention(q_, k_, v_, is_causal=c)
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
                    reference, err, grad_err = _errors_against(fns["zoo-triton"], sdpa, q, k, v, go)
                    with torch.no_grad():
                        flex_out = fns["FlexAttention"](q, k, v)
                    _agree(f"{name} N={n} D={d}", reference, flex_out, err, sdpa_name, grad_err)
                    t = timed_pair(fns, q, k, v, go)
                except Exception as error:  # one failing case must not hide the other figures
                    if getattr(args, "gpu_strict", False):
                        raise
                    errors.append(f"{name} N={n} D={d}: {type(error).__name__}: {str(error)[:200]}")
                    rows.append([name, n, d, "-", f"error: {type(error).__name__}"] + [""] * 5)
                    continue
                for mode, times in t.items():
                    flops = pairs * _flops_per_pair(args.batch, args.heads, d) * (1.0 if mode == "fwd" else 3.5)
                    ours = times["zoo-triton"]
                    cells = [name, n, d, mode]
                    for label in fns:
                        cells.append(f"{label}: {_ms(times[label])} ms, {flops / times[label] / 1e12:.1f} TF/s")
                    cells += [f"{times[sdpa_name] / ours:.2f}x", f"{times['FlexAttention'] / ours:.2f}x",
                              f"{err:.1e}" if mode == "fwd" else ""]
                    rows.append(cells)
                    print("  gpu", " | ".join(str(c) for c in cells), file=sys.stderr, flush=True)
                    if name == "dense" and mode == "fwd":
                        verdicts.append((f"dense fwd N={n} D={d}: zoo >= 0.9x SDPA-flash speed",
                                         times[sdpa_name] / ours >= 0.9, f"{times[sdpa_name] / ours:.2f}x"))
                        verdicts.append((f"dense fwd N={n} D={d}: zoo >= FlexAttention speed",
                                         times["FlexAttention"] / ours >= 1.0, f"{times['FlexAttention'] / ours:.2f}x"))
                    if name == "radial" and mode == "fwd+bwd":
                        verdicts.append((f"radial fwd+bwd N={n} D={d}: zoo faster than FlexAttention",
                                         times["FlexAttention"] / ours > 1.0, f"{times['FlexAttention'] / ours:.2f}x"))
            del q, k, v, go

    # (2) block-sparse sweep at the first length and head dim: time should follow the kept fraction.
    n = args.gpu_frames[0] * args.gpu_tokens
    d = args.gpu_head_dims[0]
    q, k, v, go = _inputs(args.batch, args.heads, n, d, dtype=dtype, device=device, grad=True)
    dense_fn = lambda q_, k_, v_: attend(q_, k_, v_, None, backend="triton")  # noqa: E731
    for fraction in args.fractions:
        try:
            blocks = random_block_map(n, fraction, tile=flex_block)
            keep = blocks.block_mask[0, 0].to(device)
            kept = blocks.block_map(n, n, flex_block, flex_block).kept_fraction()
            bm = flex_mask(lambda b, h, i, j, kp=keep: kp[i // flex_block, j // flex_block], n)
            fns = {
                "zoo dense": dense_fn,
                "zoo sparse": lambda q_, k_, v_, m=blocks: attend(q_, k_, v_, m, backend="triton"),
                "Flex sparse": lambda q_, k_, v_, m=bm: flex(q_, k_, v_, block_mask=m),
            }
            allowed = blocks.dense(n, n, device)

            def masked_sdpa(q_, k_, v_, a=allowed):
                return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=a)

            # the sparse pattern computed three ways: the zoo kernel, Flex, dense SDPA
            reference, err, grad_err = _errors_against(fns["zoo sparse"], masked_sdpa, q, k, v, go)
            with torch.no_grad():
                flex_out = fns["Flex sparse"](q, k, v)
            _agree(f"sweep {fraction:.0%}", reference, flex_out, err, "SDPA (dense mask)", grad_err)
            t = timed_pair(fns, q, k, v, go)
        except Exception as error:
            if getattr(args, "gpu_strict", False):
                raise
            errors.append(f"sweep {fraction:.0%}: {type(error).__name__}: {str(error)[:200]}")
            continue
        cells = [f"{fraction:.0%}", f"{kept:.1%}", n, d]
        for mode in ("fwd", "fwd+bwd"):
            times = t[mode]
            cells += [_ms(times["zoo sparse"]), f"{times['zoo dense'] / times['zoo sparse']:.2f}x",
                      f"{times['Flex sparse'] / times['zoo sparse']:.2f}x"]
        sweep_rows.append(cells)
        print("  gpu sweep", " | ".join(str(c) for c in cells), file=sys.stderr, flush=True)
        if abs(fraction - 0.25) < 1e-9:
            speedup = t["fwd+bwd"]["zoo dense"] / t["fwd+bwd"]["zoo sparse"]
            verdicts.append((f"25% kept tiles N={n} D={d}: fwd+bwd >= 3x faster than dense", speedup >= 3.0,
                             f"{speedup:.2f}x"))

    # (3) memory: O(N) in forward and backward (the score matrix is never stored).
    memory_line = "peak memory: not measured (needs CUDA)"
    if _is_cuda(device):
        radial = Radial(args.gpu_frames[-1], args.gpu_tokens, 1.0, block_size=radial_block)
        n = radial.seq_len
        q, k, v, go = _inputs(args.batch, args.heads, n, args.gpu_head_dims[-1], dtype=dtype, device=device, grad=True)
        attend(q, k, v, radial, backend="triton").backward(go)  # warm-up: compile, caches
        q.grad = k.grad = v.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        attend(q, k, v, radial, backend="triton").backward(go)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        scores = args.batch * args.heads * n * n * q.element_size()
        io = 4 * q.numel() * q.element_size()  # out, dq, dk, dv
        memory_line = (f"peak memory of a Radial fwd+bwd at N={n}, D={args.gpu_head_dims[-1]}: {extra / 2**20:.0f} MiB "
                       f"above the inputs (out + grads alone: {io / 2**20:.0f} MiB; one {q.dtype} score matrix "
                       f"B*H*N*N: {scores / 2**20:.0f} MiB)")
        verdicts.append((f"memory O(N): Radial fwd+bwd N={n} extra < 4 x (out + grads) + 64 MiB",
                         extra < 4 * io + (64 << 20), f"{extra / 2**20:.0f} MiB"))
    name = torch.cuda.get_device_name(device) if _is_cuda(device) else f"{device} (Triton interpreter dry run)"
    headers = ["mask", "N", "D", "pass", "zoo-triton", "SDPA", "FlexAttention", "SDPA/zoo", "Flex/zoo",
               "max abs err vs SDPA"]
    out = [
        f"{title} ({name}, {args.gpu_dtype}, B={args.batch}, H={args.heads}; TF/s over allowed pairs, backward "
        "counted as 2.5x forward; ratio = peer time / zoo time)\n\n" + _table(headers, rows),
        f"#### Block-sparse sweep (random {flex_block}x{flex_block} block maps; speed-up = zoo dense time / zoo "
        "sparse time; Flex/zoo = FlexAttention with the same block mask / zoo sparse)\n\n"
        + _table(["target kept", "kept tiles", "N", "D", "zoo fwd ms", "vs dense fwd", "Flex/zoo fwd",
                  "zoo fwd+bwd ms", "vs dense fwd+bwd", "Flex/zoo fwd+bwd"], sweep_rows),
        memory_line,
        "#### Targets (issue 5, H100 bf16)\n\n"
        + "\n".join(f"- {'PASS' if ok else 'FAIL'}: {what} ({value})" for what, ok, value in verdicts),
    ]
    if errors:
        out.append("#### Errors\n\n" + "\n".join(f"- {e}" for e in errors))
    return "\n\n".join(out)


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
    p.add_argument("--quick", action="store_true",
                   help="a smoke run of every code path, not a measurement (one core size, the smallest; N = 1024 "
                        "and one fraction, 25%%, for the sparse and tiles parts; 3 repeats): 12 s on this project's "
                        "2-core CPU (docs/bench_attention.md). With --gpu: one frame count and head dim, the 25%% "
                        "point")
    add_timing_arguments(p)
    p.add_argument("--min-time", type=float, default=0.05,
                   help="core part: seconds per timing sample (calls repeated and averaged); a single call of a "
                        "sub-millisecond op is dominated by which op ran before it")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--core-sizes", type=_ints, default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--sparse-n", type=int, default=8192)
    p.add_argument("--fractions", type=_floats, default=[1.0, 0.5, 0.25, 0.1])
    p.add_argument("--masks", type=lambda s: [x for x in s.split(",") if x], default=["window", "radial", "random"])
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also draw the sparse part's speed-ups against the kept-tile fraction into this PNG")
    p.add_argument("--gpu-frames", type=_ints, default=[16, 32])
    p.add_argument("--gpu-tokens", type=int, default=1024)
    p.add_argument("--gpu-head-dims", type=_ints, default=[64, 128])
    p.add_argument("--gpu-dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--gpu", action="store_true",
                   help="the one-shot GPU run: only the gpu part, with its targets checked (exit 2 without CUDA)")
    p.add_argument("--gpu-radial-block", type=int, default=128, help="Radial block size in the gpu part")
    p.add_argument("--gpu-strict", action="store_true", help="raise on the first failing gpu case")
    p.add_argument("--gpu-device", default="cuda",
                   help="'cpu' runs the gpu part under the Triton interpreter at tiny sizes (a dry run for tests)")
    p.add_argument("--gpu-eager-flex", action="store_true", help="FlexAttention without torch.compile")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        # A smoke run: every part's code path once (core: dense and causal at one size; sparse and tiles: every
        # --masks kind at one kept fraction), at small sizes, not a measurement (docs/bench_attention.md)
        args.repeats = min(args.repeats, 3)
        args.gpu_frames = args.gpu_frames[:1]
        if args.gpu:  # one head dim and the 25% point: every target still checked, a third of the compiles
            args.gpu_head_dims = args.gpu_head_dims[:1]
            args.fractions = [f for f in args.fractions if abs(f - 0.25) < 1e-9] or [0.25]
        else:  # the 25% point when asked for (the default fractions include it), else the first fraction given
            args.fractions = [f for f in args.fractions if abs(f - 0.25) < 1e-9] or args.fractions[:1]
            args.min_time = min(args.min_time, 0.01)
            args.core_sizes = [min(args.core_sizes)] if args.core_sizes else args.core_sizes
            args.sparse_n = min(args.sparse_n, 1024)
    if args.repeats < 1 or args.warmup < 0 or args.min_time < 0:
        raise SystemExit("--repeats must be >= 1, --warmup >= 0 and --min-time >= 0")
    if min(args.batch, args.heads, args.head_dim, args.gpu_tokens, args.gpu_radial_block) < 1 \
            or not all(n >= 1 for n in args.core_sizes + args.gpu_frames + args.gpu_head_dims):
        raise SystemExit("--batch, --heads, --head-dim, --core-sizes, --gpu-frames, --gpu-tokens, --gpu-head-dims and "
                         "--gpu-radial-block must be >= 1")
    if not args.fractions or not all(0.0 < f <= 1.0 for f in args.fractions):
        raise SystemExit(f"--fractions are kept fractions in (0, 1], got {args.fractions}")
    if args.sparse_n < 256:  # below 256 tokens the masks' geometry (radial's frames, 128-token tiles) breaks down
        raise SystemExit(f"--sparse-n must be >= 256 tokens, got {args.sparse_n}")
    if args.gpu and args.parts not in (None, "gpu"):
        raise SystemExit("--gpu runs the gpu part only; drop --parts")
    parts = ["gpu"] if args.gpu else args.parts.split(",") if args.parts else ["core", "sparse", "tiles", "gpu"]
    unknown = set(parts) - {"core", "sparse", "tiles", "gpu"}
    if unknown:
        raise SystemExit(f"unknown --parts {sorted(unknown)}; choose from core,sparse,tiles,gpu")
    # Everything a later part would reject is checked here, before the first part runs for minutes.
    if {"sparse", "tiles"} & set(parts):
        if unknown_masks_error(args.masks):
            raise SystemExit(f"--masks: {unknown_masks_error(args.masks)}")
        if "radial" in args.masks and radial_layout_error(args.sparse_n):
            raise SystemExit(radial_layout_error(args.sparse_n))
    if "gpu" in parts and _is_cuda(args.gpu_device) and args.gpu_dtype == "fp32":
        # The SDPA contender of the dense and causal rows is pinned to FLASH_ATTENTION, which takes fp16 / bf16
        # only on CUDA: every such row would fail. (The CPU dry run, --gpu-device cpu, runs fp32.)
        raise SystemExit("--gpu-dtype fp32: the GPU part compares against SDPA's flash kernel, which runs fp16 and "
                         "bf16 only; use --gpu-dtype bf16 (default) or fp16")
    if args.gpu:
        args.parts = "gpu"
        if _is_cuda(args.gpu_device) and not torch.cuda.is_available():
            print("zoo bench attention --gpu: no CUDA device here; GPU timings need a GPU.", file=sys.stderr)
            return 2
    threads = set_threads(args.threads)
    torch.manual_seed(0)
    print("## zoo bench attention\n\n" + run_header("attention", argv, threads, "see each part for its shapes and dtype"),
          flush=True)
    failed = False
    for part in parts:
        result = {"core": bench_core, "sparse": bench_sparse, "tiles": bench_tiles, "gpu": bench_gpu}[part](args)
        print(result + "\n", flush=True)
        failed = failed or "- FAIL:" in result or "#### Errors" in result
    print(run_footer(), flush=True)
    return 1 if (args.gpu and failed) else 0


if __name__ == "__main__":
    raise SystemExit(main())
