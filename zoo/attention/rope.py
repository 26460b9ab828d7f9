"""Rotary position embeddings (RoPE): 1D for sequences, 2D axial for image patch grids.

Papers:
* 1D: Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding" (2021,
  arXiv:2104.09864). Channel pairs (x_2i, x_2i+1) of q and k are rotated by the angle p * w_i with
  w_i = theta^(-2i/D), theta = 10000, so that <R(p) q, R(p') k> depends only on p - p'.
* 2D axial: Heo et al., "Rotary Position Embedding for Vision Transformer" (ECCV 2024,
  arXiv:2403.13298; official code naver-ai/rope-vit, models/vit_rope.py, ``compute_axial_cis``). Half of
  the rotary pairs are rotated by the patch column x, the other half by the patch row y, both with the
  frequencies w_i = theta^(-4i/D), i < D/4, and theta = 100. As in the official code the column (x)
  pairs come first. Scores then depend only on (row - row', col - col').

Layout: channel pairs are adjacent (interleaved, as in RoFormer and the complex-number form of RoPE-ViT),
not the "rotate half" layout of GPT-NeoX.

Letters: B batch, H heads, N tokens, D head dim, P = D // 2 rotary pairs.

Positions: 1D positions are (N,) or (B, N) numbers; 2D positions are (N, 2) or (B, N, 2) numbers in
(row, col) order, or a grid size ``(rows, cols)`` meaning the row-major patch grid. By default 1D uses
0..N-1 and 2D a square grid. The first ``num_prefix_tokens`` tokens (class / register tokens) are not
rotated, as in RoPE-ViT.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

__all__ = ["RotaryEmbedding", "apply_rotary", "rope_frequencies", "grid_positions", "DEFAULT_THETA"]

# Default base per mode: RoFormer uses 10000 for text, RoPE-ViT uses 100 for the 2D axial variant.
DEFAULT_THETA = {"1d": 10000.0, "2d": 100.0}

Positions = Union[torch.Tensor, Sequence[int], None]


def rope_frequencies(head_dim: int, mode: str, theta: float) -> torch.Tensor:
    """Angular frequencies in fp64: (D/2,) for "1d"; (D/4,) for "2d" (shared by rows and columns)."""
    if mode == "1d":
        return theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return theta ** (-torch.arange(0, head_dim, 4, dtype=torch.float64)[: head_dim // 4] / head_dim)


def grid_positions(rows: int, cols: int, device=None) -> torch.Tensor:
    """(rows * cols, 2) float (row, col) positions of a row-major patch grid."""
    r = torch.arange(rows, device=device, dtype=torch.float32)
    c = torch.arange(cols, device=device, dtype=torch.float32)
    return torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=-1).reshape(rows * cols, 2)


def apply_rotary(x_BHND: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x`` by angles with cos/sin of shape broadcastable to (B, H, N, P).

    Computed in the dtype of ``cos`` (fp32 for half-precision inputs) and cast back to x's dtype.
    """
    x_pairs = x_BHND.to(cos.dtype).unflatten(-1, (-1, 2))
    x0, x1 = x_pairs[..., 0], x_pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x_BHND.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding applied to q and k of shape (B, H, N, D).

    Args:
        head_dim: D; even for "1d", a multiple of 4 for "2d".
        mode: "1d" (RoFormer) or "2d" (axial RoPE-ViT).
        theta: frequency base (default 10000 for "1d", 100 for "2d").
        num_prefix_tokens: leading tokens left unrotated (class / register tokens).
    """

    def __init__(self, head_dim: int, mode: str = "1d", theta: Optional[float] = None, num_prefix_tokens: int = 0):
        super().__init__()
        if mode not in DEFAULT_THETA:
            raise ValueError(f"RotaryEmbedding: mode must be '1d' or '2d', got {mode!r}")
        multiple = 2 if mode == "1d" else 4
        if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % multiple:
            raise ValueError(f"RotaryEmbedding: {mode} RoPE needs a head_dim that is a multiple of {multiple}, got {head_dim}")
        theta = DEFAULT_THETA[mode] if theta is None else float(theta)
        if not (math.isfinite(theta) and theta > 1.0):
            raise ValueError(f"RotaryEmbedding: theta must be a finite number > 1, got {theta}")
        if num_prefix_tokens < 0:
            raise ValueError(f"RotaryEmbedding: num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        self.head_dim = head_dim
        self.mode = mode
        self.theta = theta
        self.num_prefix_tokens = int(num_prefix_tokens)
        # fp64 frequencies kept as a plain attribute (not a buffer: .half()/.to(dtype) must not round them).
        self.freqs = rope_frequencies(head_dim, mode, theta)
        self._cache: dict = {}

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, mode={self.mode!r}, theta={self.theta}, num_prefix_tokens={self.num_prefix_tokens}"

    # ------------------------------------------------------------------ positions and angles
    def default_positions(self, num_tokens: int, device=None) -> torch.Tensor:
        """Positions of the ``num_tokens`` rotated tokens when none are given."""
        if self.mode == "1d":
            return torch.arange(num_tokens, device=device, dtype=torch.float32)
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(
                f"2D RoPE: {num_tokens} patch tokens do not form a square grid; pass positions=(rows, cols) "
                f"or a (N, 2) tensor of (row, col) positions"
            )
        return grid_positions(side, side, device)

    def _check_positions(self, positions: torch.Tensor, num_tokens: int) -> torch.Tensor:
        if not isinstance(positions, torch.Tensor):
            raise TypeError(f"RoPE positions must be a tensor or a (rows, cols) grid size, got {type(positions).__name__}")
        if positions.is_complex() or positions.dtype == torch.bool:
            raise TypeError(f"RoPE positions must be real numbers, got {positions.dtype}")
        if self.mode == "1d":
            ok = positions.dim() in (1, 2) and positions.shape[-1] == num_tokens
            expected = f"({num_tokens},) or (B, {num_tokens})"
        else:
            ok = positions.dim() in (2, 3) and positions.shape[-2:] == (num_tokens, 2)
            expected = f"({num_tokens}, 2) or (B, {num_tokens}, 2)"
        if not ok:
            raise ValueError(f"{self.mode} RoPE positions must have shape {expected}, got {tuple(positions.shape)}")
        if not bool(torch.isfinite(positions).all()):
            raise ValueError("RoPE positions contain NaN or Inf")
        return positions

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """Rotation angles (..., N, D/2) in fp64 for positions (..., N) [1d] or (..., N, 2) [2d]."""
        freqs = self.freqs.to(device=positions.device)
        pos = positions.to(torch.float64)
        if self.mode == "1d":
            ang = pos[..., None] * freqs
        else:
            rows, cols = pos[..., 0], pos[..., 1]
            ang = torch.cat((cols[..., None] * freqs, rows[..., None] * freqs), dim=-1)  # x pairs first
        return ang

    def cos_sin(self, num_tokens: int, positions: Positions = None, *, device=None, dtype=torch.float32):
        """cos, sin of shape (N, P) or (B, 1, N, P) for the rotated tokens (cached for default/grid positions)."""
        compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        key = None
        if positions is None or (not isinstance(positions, torch.Tensor) and len(positions) == 2):
            key = (num_tokens, None if positions is None else tuple(int(p) for p in positions), str(device), compute_dtype)
            hit = self._cache.get(key)
            if hit is not None:
                return hit
        if positions is None:
            pos = self.default_positions(num_tokens, device)
        elif not isinstance(positions, torch.Tensor):
            if self.mode != "2d":
                raise TypeError("a (rows, cols) grid size is only meaningful for 2D RoPE; pass a tensor of positions")
            rows, cols = (int(p) for p in positions)
            if rows * cols != num_tokens:
                raise ValueError(f"2D RoPE: grid {rows}x{cols} has {rows * cols} cells but there are {num_tokens} patch tokens")
            pos = grid_positions(rows, cols, device)
        else:
            pos = self._check_positions(positions, num_tokens).to(device)
        ang = self.angles(pos)  # fp64: large positions keep their precision
        if ang.dim() == 3:  # per-sample positions (B, N, P) -> (B, 1, N, P)
            ang = ang.unsqueeze(1)
        out = (ang.cos().to(compute_dtype), ang.sin().to(compute_dtype))
        if key is not None:
            if len(self._cache) > 16:
                self._cache.clear()
            self._cache[key] = out
        return out

    # ------------------------------------------------------------------ apply
    def forward(self, x_BHND: torch.Tensor, positions: Positions = None) -> torch.Tensor:
        """Rotate the non-prefix tokens of ``x`` (B, H, N, D); the prefix tokens pass through unchanged."""
        if x_BHND.dim() != 4 or x_BHND.shape[-1] != self.head_dim:
            raise ValueError(f"RoPE expects (B, H, N, {self.head_dim}), got {tuple(x_BHND.shape)}")
        npt = self.num_prefix_tokens
        num_tokens = x_BHND.shape[2] - npt
        if num_tokens <= 0:
            return x_BHND
        compute_dtype = torch.float64 if x_BHND.dtype == torch.float64 else torch.float32
        cos, sin = self.cos_sin(num_tokens, positions, device=x_BHND.device, dtype=compute_dtype)
        if npt == 0:
            return apply_rotary(x_BHND, cos, sin)
        rotated = apply_rotary(x_BHND[:, :, npt:], cos, sin)
        return torch.cat((x_BHND[:, :, :npt], rotated), dim=2)

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda() invalidate the cos/sin cache
        self._cache = {}
        return super()._apply(fn, *args, **kwargs)
