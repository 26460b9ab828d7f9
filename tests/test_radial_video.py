"""Radial attention in use: a small video transformer that TRAINS with the Radial mask (the published
Radial Attention code is inference-only), on the CPU block-sparse path chosen automatically by attend(),
and a diffusion-style sampling loop driven by the DenseWarmup schedule.

Video tokens are frame-major (frame f holds tokens [f*T, (f+1)*T)), the layout Radial expects.
Letters: B batch, F frames, T tokens per frame, N = F*T tokens, C channels.
"""
from __future__ import annotations

import torch
from torch import nn

from zoo.attention import Dense, DenseWarmup, Full, MultiHeadAttention, Radial, use_backend
from zoo.attention import backends as zb

FRAMES, TOKENS, BLOCK, DIM, HEADS = 12, 128, 32, 32, 2


class TinyVideoTransformer(nn.Module):
    """Pre-norm transformer blocks over (B, N, C) video tokens; the attention mask is chosen per layer."""

    def __init__(self, dim: int = DIM, heads: int = HEADS, depth: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.attns = nn.ModuleList(MultiHeadAttention(dim, heads) for _ in range(depth))
        self.head = nn.Linear(dim, dim)

    def forward(self, x_BNC: torch.Tensor, mask_for_layer) -> torch.Tensor:
        for layer, (norm, attn) in enumerate(zip(self.norms, self.attns)):
            x_BNC = x_BNC + attn(norm(x_BNC), mask=mask_for_layer(layer))
        return self.head(x_BNC)


def _chosen_backend(mask, n: int, dtype=torch.float32) -> str:
    q = torch.zeros(1, HEADS, n, DIM // HEADS, dtype=dtype)
    return zb.select_backend((q, q, q, mask, None, 0.25, "softmax", 0.0, False), None).name


def test_radial_training_matches_dense_reference_and_learns():
    radial = Radial(FRAMES, TOKENS, 1.0, frame0_sink=True, block_size=BLOCK)
    n = radial.seq_len
    assert radial.density() < 0.55
    assert _chosen_backend(radial, n) == "blocksparse"  # attend() picks the sparse CPU path by itself

    # One step: parameter gradients through the Radial mask equal those of the reference backend given
    # the equivalent dense boolean mask (float64).
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, n, DIM, generator=g, dtype=torch.float64)
    target = torch.randn(1, n, DIM, generator=g, dtype=torch.float64)
    model = TinyVideoTransformer().double()
    grads = []
    for mask, backend in ((radial, None), (Dense(radial.dense(n, n)), "torch")):
        model.zero_grad()
        with use_backend(backend):
            loss = (model(x, lambda layer, m=mask: m) - target).pow(2).mean()
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)

    # Training: a student learns a teacher that uses the same Radial attention (fp32, Adam).
    teacher, student = TinyVideoTransformer(seed=2), TinyVideoTransformer(seed=3)
    x = torch.randn(1, n, DIM, generator=g)
    with torch.no_grad():
        y = teacher(x, lambda layer: radial)
    opt = torch.optim.Adam(student.parameters(), lr=5e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = (student(x, lambda layer: radial) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_dense_warmup_sampling_loop():
    """Diffusion-style sampling: dense attention for the first steps, the last step and the first layer,
    Radial elsewhere; the dense calls run on SDPA and the sparse ones on the block-sparse path."""
    radial = Radial(FRAMES, TOKENS, 1.0, frame0_sink=False, block_size=BLOCK)
    n = radial.seq_len
    schedule = DenseWarmup(num_steps=6, dense_first_steps=2, dense_last_steps=1, dense_first_layers=1)
    model = TinyVideoTransformer(depth=2, seed=4).eval()
    x = torch.randn(1, n, DIM, generator=torch.Generator().manual_seed(5))
    used = []

    def mask_for(step):
        def pick(layer):
            mask = schedule.mask(step, layer, radial)
            used.append((step, layer, type(mask).__name__, _chosen_backend(mask, n)))
            return mask

        return pick

    with torch.no_grad():
        for step in range(schedule.num_steps):
            x = x - 0.1 * model(x, mask_for(step))  # a stand-in denoising update
    assert torch.isfinite(x).all()
    for step, layer, kind, backend in used:
        dense = step < 2 or step == 5 or layer == 0
        assert kind == ("Full" if dense else "Radial"), (step, layer)
        assert backend == ("sdpa" if dense else "blocksparse"), (step, layer)
    assert sum(kind == "Radial" for _, _, kind, _ in used) == 3  # steps 2-4, layer 1
    assert schedule.sparse_fraction(2) == 3 / 12
    assert isinstance(schedule.mask(0, 1, radial), Full)


def test_rope_grid_error_says_how_to_leave_trailing_text_tokens_unrotated():
    """Radial's layout puts text tokens after the video; a (frames, rows, cols) grid size covers only the video, and
    the error says what to pass instead. Following it: the text rows come back unchanged and the video rows are
    rotated exactly as with the grid size alone."""
    import pytest

    from zoo.attention import RotaryEmbedding
    from zoo.attention.rope import grid_positions

    frames, rows, cols, text = 2, 3, 4, 5
    rope = RotaryEmbedding(12, mode="3d")
    x = torch.randn(1, 2, frames * rows * cols + text, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"grid 2x3x4 has 24 cells but there are 29 tokens\. .*for tokens after it "
                                         r"\(the text tokens of Radial\(\.\.\., text_tokens=\.\.\.\)\) pass positions "
                                         r"as a \(29, 3\) tensor of \(frame, row, col\) positions with zero rows"):
        rope(x, (frames, rows, cols))
    positions = torch.cat((grid_positions(frames, rows, cols), torch.zeros(text, 3)))
    out = rope(x, positions)
    torch.testing.assert_close(out[:, :, -text:], x[:, :, -text:], rtol=0, atol=0)
    torch.testing.assert_close(out[:, :, :-text], rope(x[:, :, :-text], (frames, rows, cols)), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Mutation audit m25: RoPE against a float64 rotation written from the definition
# --------------------------------------------------------------------------------------------------
def _rope_reference(x, positions, axes_dims, theta):
    """float64 RoPE from the definition: for each axis a of width d (channels in consecutive slices), adjacent
    channel pair i of the slice is rotated by position[a] * theta ** (-2i / d)."""
    x, positions = x.double(), positions.double()
    out, start = x.clone(), 0
    for axis, width in enumerate(axes_dims):
        for i in range(width // 2):
            angle = positions[:, axis] * theta ** (-2 * i / width)
            c, s = torch.cos(angle), torch.sin(angle)
            a, b = x[..., start + 2 * i], x[..., start + 2 * i + 1]
            out[..., start + 2 * i] = a * c - b * s
            out[..., start + 2 * i + 1] = a * s + b * c
        start += width
    return out


def test_rope_takes_large_integer_and_float64_positions_at_full_precision():
    """Positions are turned into angles in float64: int64 positions past 2**24 (odd ones are not float32 numbers)
    and float64 fractional positions (position interpolation) rotated as if rounded to float32 before -- a whole
    radian off at position 2**24 + 1 for the frequency-1 pair."""
    from zoo.attention import RotaryEmbedding

    g = torch.Generator().manual_seed(0)
    rope = RotaryEmbedding(8)
    x = torch.randn(1, 2, 3, 8, generator=g, dtype=torch.float64)
    for positions in (torch.tensor([2**24 + 1, 2**24 + 3, 5], dtype=torch.int64),
                      torch.tensor([0.1, 1e7 + 0.3, 12345.678], dtype=torch.float64)):
        expected = _rope_reference(x, positions[:, None], (8,), 10000.0)
        torch.testing.assert_close(rope(x, positions), expected, rtol=0, atol=1e-6)


def test_rope_3d_in_bfloat16_rotates_in_float32():
    """Half-precision q/k are rotated in float32 and rounded once: each bf16 output is within half a bf16 step of
    the float64 rotation of the same inputs (relative 2**-8), which a rotation computed in bf16 (cos/sin and the
    products rounded) misses by several steps. 3D with uneven axes (6, 10, 16) and a 2 x 3 x 4 grid."""
    from zoo.attention import RotaryEmbedding
    from zoo.attention.rope import grid_positions

    rope = RotaryEmbedding(32, mode="3d", axes_dims=(6, 10, 16))
    x = torch.randn(2, 2, 24, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    out = rope(x, (2, 3, 4))
    assert out.dtype == torch.bfloat16
    expected = _rope_reference(x, grid_positions(2, 3, 4), (6, 10, 16), 10000.0)
    error = (out.double() - expected).abs()
    assert bool((error <= 2.0**-8 * expected.abs() + 1e-30).all()), float((error / expected.abs()).max())


def test_rope_3d_with_prefix_tokens_only_and_odd_axes():
    """A call holding only prefix tokens (nothing to rotate) returns x unchanged, also for 3D RoPE, which has no
    default positions; odd axes_dims are refused naming axes_dims (not a freqs shape the user never passed)."""
    import pytest

    from zoo.attention import RotaryEmbedding

    rope = RotaryEmbedding(12, mode="3d", num_prefix_tokens=2)
    x = torch.randn(1, 2, 2, 12)
    assert torch.equal(rope(x), x)
    with pytest.raises(ValueError, match="axes_dims must be three positive even numbers"):
        RotaryEmbedding(64, mode="3d", axes_dims=(15, 25, 24))
