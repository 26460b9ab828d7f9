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
