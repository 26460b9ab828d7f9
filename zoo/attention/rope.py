"""Rotary position embeddings (RoPE): 1D for sequences, 2D axial for image patch grids, 3D for video.

Papers:
* 1D: Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding" (2021,
  arXiv:2104.09864). Channel pairs (x_2i, x_2i+1) of q and k are rotated by the angle p * w_i with
  w_i = theta^(-2i/D), theta = 10000, so that <R(p) q, R(p') k> depends only on p - p'.
* 2D axial: Heo et al., "Rotary Position Embedding for Vision Transformer" (ECCV 2024,
  arXiv:2403.13298; official code naver-ai/rope-vit, models/vit_rope.py, ``compute_axial_cis``). Half of
  the rotary pairs are rotated by the patch column x, the other half by the patch row y, both with the
  frequencies w_i = theta^(-4i/D), i < D/4, and theta = 100. As in the official code the column (x)
  pairs come first. Scores then depend only on (row - row', col - col').
* 3D (video tokens: frame, row, col), as the video diffusion transformers use it (Wan 2.1, Wan-Video/Wan2.1,
  wan/modules/model.py ``rope_params`` / ``rope_apply``; HunyuanVideo's ``rope_dim_list``): the head dim is
  split into three consecutive channel slices of ``axes_dims`` (default Wan's: D - 4*(D//6) channels for the
  frame, 2*(D//6) each for row and column), and each slice is a 1D RoPE of its own width
  (w_i = theta^(-2i/d_axis), theta = 10000) driven by its coordinate. Scores then depend only on
  (frame - frame', row - row', col - col').

Layout: channel pairs are adjacent (interleaved, as in RoFormer and the complex-number form of RoPE-ViT),
not the "rotate half" layout of GPT-NeoX.

Letters: B batch, H heads, N tokens, D head dim, P = D // 2 rotary pairs.

Positions: 1D positions are (N,) or (B, N) numbers; 2D positions are (N, 2) or (B, N, 2) numbers in
(row, col) order, or a grid size ``(rows, cols)`` meaning the row-major patch grid; 3D positions are (N, 3)
or (B, N, 3) numbers in (frame, row, col) order, or a grid size ``(frames, rows, cols)`` meaning the
frame-major, row-major token layout (the layout of zoo.attention.Radial). By default 1D uses 0..N-1 and 2D a
square grid; 3D needs positions or a grid size. The first ``num_prefix_tokens`` tokens (class / register tokens) are not
rotated, as in RoPE-ViT; a call whose tokens are all prefix tokens rotates none: it takes positions=None or positions
for 0 tokens and refuses others (they would be ignored).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from zoo.layers import CachesDroppedWhenCopied, check_ints, is_int, is_tracing

__all__ = ["RotaryEmbedding", "apply_rotary", "rope_frequencies", "grid_positions", "default_axes_dims", "DEFAULT_THETA"]

# Default base per mode: RoFormer uses 10000 for text, RoPE-ViT uses 100 for the 2D axial variant, Wan 10000
# for each of its three video axes.
DEFAULT_THETA = {"1d": 10000.0, "2d": 100.0, "3d": 10000.0}

Positions = Union[torch.Tensor, Sequence[int], None]


def rope_frequencies(head_dim: int, mode: str, theta: float, axes_dims: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Angular frequencies in fp64: (D/2,) for "1d"; (D/4,) for "2d" (shared by rows and columns); for "3d"
    (D/2,): the frame, row and column axes' own 1D frequencies, concatenated (widths ``axes_dims``)."""
    if mode == "1d":
        return theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if mode == "3d":
        return torch.cat([theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d) for d in axes_dims])
    return theta ** (-torch.arange(0, head_dim, 4, dtype=torch.float64)[: head_dim // 4] / head_dim)


def default_axes_dims(head_dim: int) -> tuple[int, int, int]:
    """Wan 2.1's split of an even head dim over (frame, row, col): D - 4*(D//6), 2*(D//6), 2*(D//6)."""
    sixth = head_dim // 6
    return head_dim - 4 * sixth, 2 * sixth, 2 * sixth


def grid_positions(*sizes: int, device=None) -> torch.Tensor:
    """(prod(sizes), len(sizes)) float positions of a row-major grid: ``grid_positions(rows, cols)`` gives the
    (row, col) of a patch grid, ``grid_positions(frames, rows, cols)`` the (frame, row, col) of video tokens."""
    axes = [torch.arange(n, device=device, dtype=torch.float32) for n in sizes]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(math.prod(sizes), len(sizes))


def apply_rotary(x_BHND: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x`` by angles with cos/sin of shape broadcastable to (B, H, N, P).

    Computed in the dtype of ``cos`` (fp32 for half-precision inputs) and cast back to x's dtype.
    """
    x_pairs = x_BHND.to(cos.dtype).unflatten(-1, (-1, 2))
    x0, x1 = x_pairs[..., 0], x_pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x_BHND.dtype)


class RotaryEmbedding(CachesDroppedWhenCopied, nn.Module):
    """Rotary position embedding applied to q and k of shape (B, H, N, D).

    Args:
        head_dim: D; even for "1d" and "3d", a multiple of 4 for "2d".
        mode: "1d" (RoFormer), "2d" (axial RoPE-ViT) or "3d" (video: frame, row, col).
        theta: frequency base (default 10000 for "1d" and "3d", 100 for "2d").
        num_prefix_tokens: leading tokens left unrotated (class / register tokens).
        axes_dims: "3d" only: the channels given to (frame, row, col), even numbers summing to D (default
            :func:`default_axes_dims`, Wan's split; HunyuanVideo uses (16, 56, 56) for D = 128).

    ``freqs`` (the fp64 angular frequencies, see :func:`rope_frequencies`) and ``theta`` may be changed on a built
    module, as position interpolation and NTK-style base scaling do: assigning ``theta`` recomputes ``freqs``;
    ``freqs`` may be assigned (``rope.freqs = rope.freqs / 4``) or edited in place (``rope.freqs.mul_(0.25)``).
    The cos/sin kept for default and grid positions are keyed on the frequencies (their identity, storage and
    version counter), so the next call uses the new ones. An edit through ``.data`` bumps no version counter and
    is not seen, as for weights (zoo.layers.weights_stamp). After ``freqs`` is assigned, ``theta`` still shows the
    base it was last computed from. ``freqs`` is a plain tensor, not a buffer or parameter: an edit is not in the
    state dict (a checkpoint restores the constructor's frequencies; rebuild the module with the new ``theta``, or
    edit it again after loading), and an ``nn.Parameter`` cannot be assigned to it.
    """

    def __init__(self, head_dim: int, mode: str = "1d", theta: Optional[float] = None, num_prefix_tokens: int = 0,
                 axes_dims: Optional[Sequence[int]] = None):
        super().__init__()
        if mode not in DEFAULT_THETA:
            raise ValueError(f"RotaryEmbedding: mode must be '1d', '2d' or '3d', got {mode!r}")
        multiple = 4 if mode == "2d" else 2
        if not isinstance(head_dim, int) or isinstance(head_dim, bool):
            # a numpy int (e.g. from a config array) failed the check below as "not a multiple of 2, got 16"
            raise TypeError(f"RotaryEmbedding: head_dim must be a Python int, got {type(head_dim).__name__} "
                            f"{head_dim} (pass int(head_dim))")
        if head_dim <= 0 or head_dim % multiple:
            raise ValueError(f"RotaryEmbedding: {mode} RoPE needs a head_dim that is a multiple of {multiple}, got {head_dim}")
        if axes_dims is not None and mode != "3d":
            raise ValueError("RotaryEmbedding: axes_dims is a 3d RoPE argument")
        if mode == "3d":
            axes_dims = default_axes_dims(head_dim) if axes_dims is None else tuple(int(d) for d in axes_dims)
            if len(axes_dims) != 3 or any(d <= 0 or d % 2 for d in axes_dims) or sum(axes_dims) != head_dim:
                raise ValueError(f"RotaryEmbedding: axes_dims must be three positive even numbers summing to "
                                 f"head_dim={head_dim}, got {axes_dims}")
        if num_prefix_tokens < 0:
            raise ValueError(f"RotaryEmbedding: num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        self.head_dim = head_dim
        self.mode = mode
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.axes_dims = axes_dims
        self._cache: dict = {}
        self.theta = DEFAULT_THETA[mode] if theta is None else theta  # checked; computes self.freqs

    @property
    def theta(self) -> float:
        """The frequency base; assigning it recomputes ``freqs`` (checked as in ``__init__``)."""
        return self._theta

    @theta.setter
    def theta(self, value) -> None:
        try:
            theta = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"RotaryEmbedding: theta must be a finite number > 1, got {value!r}") from None
        if not (math.isfinite(theta) and theta > 1.0):
            raise ValueError(f"RotaryEmbedding: theta must be a finite number > 1, got {theta}")
        self._theta = theta
        self.freqs = rope_frequencies(self.head_dim, self.mode, theta, self.axes_dims)

    @property
    def freqs(self) -> torch.Tensor:
        """fp64 angular frequencies: (D/2,) for "1d" and "3d", (D/4,) for "2d". A plain attribute, not a buffer:
        .half() / .to(dtype) must not round them. Assignable (checked, converted to fp64) and editable in place."""
        return self._freqs

    @freqs.setter
    def freqs(self, value: torch.Tensor) -> None:
        count = self.head_dim // 4 if self.mode == "2d" else self.head_dim // 2
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or tuple(value.shape) != (count,):
            got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"RotaryEmbedding: freqs must be a floating-point tensor of shape ({count},) for "
                             f"{self.mode} RoPE with head_dim={self.head_dim}, got {got}")
        if not is_tracing() and not bool(torch.isfinite(value).all()):
            raise ValueError("RotaryEmbedding: freqs contain NaN or Inf")
        value = value.detach().to(torch.float64)  # no copy when already fp64: later in-place edits are seen
        if value.is_inference():  # (built under torch.inference_mode): a normal tensor, whose version counter
            with torch.inference_mode(False):  # counts in-place edits for the cache's stamp
                value = value.clone()
        self._freqs = value

    @staticmethod
    def _freqs_stamp(freqs: torch.Tensor) -> tuple:
        """What the kept cos/sin are keyed on: the frequencies' identity, storage and version counter (no counter
        for an inference tensor, as in zoo.layers.weights_stamp); an entry keeps them alive, so neither the id nor
        the address can be reused while it exists."""
        return id(freqs), freqs.data_ptr(), None if freqs.is_inference() else freqs._version

    def extra_repr(self) -> str:
        axes = f", axes_dims={self.axes_dims}" if self.axes_dims else ""
        return (f"head_dim={self.head_dim}, mode={self.mode!r}, theta={self.theta}, "
                f"num_prefix_tokens={self.num_prefix_tokens}{axes}")

    # ------------------------------------------------------------------ positions and angles
    def default_positions(self, num_tokens: int, device=None) -> torch.Tensor:
        """Positions of the ``num_tokens`` rotated tokens when none are given."""
        if self.mode == "1d":
            return torch.arange(num_tokens, device=device, dtype=torch.float32)
        if self.mode == "3d":
            raise ValueError(f"3D RoPE: pass positions=(frames, rows, cols) or a ({num_tokens}, 3) tensor of "
                             "(frame, row, col) positions")
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(
                f"2D RoPE: {num_tokens} patch tokens do not form a square grid; pass positions=(rows, cols) "
                f"or a (N, 2) tensor of (row, col) positions"
            )
        return grid_positions(side, side, device=device)

    def _grid_size(self, positions, num_tokens: int) -> tuple[int, ...]:
        """A grid size given as positions ((rows, cols), or (frames, rows, cols) for 3D), checked."""
        if not isinstance(positions, (tuple, list)):
            raise TypeError(f"RoPE positions must be a tensor, or a grid size (a tuple of ints) for 2D / 3D RoPE, "
                            f"got {type(positions).__name__}")
        if self.mode == "1d":
            raise TypeError(f"1d RoPE takes positions as a ({num_tokens},) or (B, {num_tokens}) tensor, got the "
                            f"{type(positions).__name__} {tuple(positions)} (a grid size is for 2D / 3D RoPE)")
        if not all(is_int(p) and not isinstance(p, torch.Tensor) and int(p) > 0 for p in positions):
            raise ValueError(f"{self.mode} RoPE: a grid size is positive ints, got {tuple(positions)}")
        sizes = tuple(int(p) for p in positions)
        axes = 3 if self.mode == "3d" else 2
        if len(sizes) != axes:
            raise ValueError(f"{self.mode} RoPE: a grid size has {axes} numbers, got {tuple(positions)}")
        if math.prod(sizes) != num_tokens:
            axes_names = "(frame, row, col)" if self.mode == "3d" else "(row, col)"
            raise ValueError(
                f"{self.mode} RoPE: grid {'x'.join(map(str, sizes))} has {math.prod(sizes)} cells but there are "
                f"{num_tokens} tokens. Tokens before the grid (a class token) stay unrotated with num_prefix_tokens; "
                f"for tokens after it (the text tokens of Radial(..., text_tokens=...)) pass positions as a "
                f"({num_tokens}, {axes}) tensor of {axes_names} positions with zero rows for them (a rotation by "
                f"angle 0 is the identity)")
        return sizes

    def _check_positions(self, positions: torch.Tensor, num_tokens: int) -> torch.Tensor:
        if not isinstance(positions, torch.Tensor):
            raise TypeError(f"RoPE positions must be a tensor or a (rows, cols) grid size, got {type(positions).__name__}")
        if positions.is_complex() or positions.dtype == torch.bool:
            raise TypeError(f"RoPE positions must be real numbers, got {positions.dtype}")
        if self.mode == "1d":
            ok = positions.dim() in (1, 2) and positions.shape[-1] == num_tokens
            expected = f"({num_tokens},) or (B, {num_tokens})"
        else:
            axes = 3 if self.mode == "3d" else 2
            ok = positions.dim() in (2, 3) and positions.shape[-2:] == (num_tokens, axes)
            expected = f"({num_tokens}, {axes}) or (B, {num_tokens}, {axes})"
        if not ok:
            raise ValueError(f"{self.mode} RoPE positions must have shape {expected}, got {tuple(positions.shape)}")
        if not is_tracing() and not bool(torch.isfinite(positions).all()):  # traced: a data-dependent branch
            raise ValueError("RoPE positions contain NaN or Inf")
        return positions

    def _check_no_rotated_positions(self, positions, num_tokens: int, num_prefix_tokens: int) -> None:
        """Positions given for a call that rotates no token (all of its ``num_tokens`` are among the
        ``num_prefix_tokens`` leading ones): only positions for 0 tokens fit. Anything else was ignored silently,
        hiding a call whose tokens were meant to be rotated (a KV-cache step taken for the stream's prefix)."""
        if isinstance(positions, torch.Tensor):
            token_axis = -1 if self.mode == "1d" else -2
            if positions.dim() >= 1 and positions.dim() + token_axis >= 0 and positions.shape[token_axis] == 0:
                self._check_positions(positions, 0)  # the shape of positions for no token (and the dtype)
                return
            given = f"positions of shape {tuple(positions.shape)}"
        else:
            given = f"the grid size {tuple(positions) if isinstance(positions, (tuple, list)) else positions!r}"
        raise ValueError(f"RoPE: {given} given, but this call rotates no token: its {num_tokens} tokens are all "
                         f"among the num_prefix_tokens={num_prefix_tokens} leading tokens left unrotated. Pass "
                         f"positions=None (or positions for 0 tokens), or feed the tokens to rotate")

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """Rotation angles (..., N, D/2) in fp64 for positions (..., N) [1d] or (..., N, 2) [2d]."""
        freqs = self.freqs.to(device=positions.device)
        pos = positions.to(torch.float64)
        if self.mode == "1d":
            ang = pos[..., None] * freqs
        elif self.mode == "3d":  # each axis drives its own slice of the pairs
            pairs = [d // 2 for d in self.axes_dims]
            ang = torch.cat([pos[..., a, None] * f for a, f in enumerate(freqs.split(pairs))], dim=-1)
        else:
            rows, cols = pos[..., 0], pos[..., 1]
            ang = torch.cat((cols[..., None] * freqs, rows[..., None] * freqs), dim=-1)  # x pairs first
        return ang

    def cos_sin(self, num_tokens: int, positions: Positions = None, *, device=None, dtype=torch.float32):
        """cos, sin of shape (N, P) or (B, 1, N, P) for the rotated tokens (cached for default/grid positions)."""
        compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        sizes = None if positions is None or isinstance(positions, torch.Tensor) else self._grid_size(positions, num_tokens)
        key = None
        # Not while traced: torch.export's symbolic N cannot key a dict, and a cache write is module state that
        # Dynamo would guard on (a recompile per length)
        if not isinstance(positions, torch.Tensor) and not is_tracing():
            # an entry built under inference mode holds inference tensors, which autograd cannot save later; an
            # entry made from other frequencies (theta or freqs changed since) is rebuilt in its slot
            key = (num_tokens, sizes, str(device), compute_dtype, torch.is_inference_mode_enabled())
            freqs = self._freqs  # stamped and kept together, whatever another thread assigns meanwhile
            stamp = self._freqs_stamp(freqs)
            hit = self._cache.get(key)  # one read: other threads may store or clear meanwhile
            if hit is not None and hit[0] == stamp:
                return hit[1], hit[2]
        if positions is None:
            pos = self.default_positions(num_tokens, device)
        elif sizes is not None:
            pos = grid_positions(*sizes, device=device)
        else:
            pos = self._check_positions(positions, num_tokens).to(device)
        ang = self.angles(pos)  # fp64: large positions keep their precision
        if ang.dim() == 3:  # per-sample positions (B, N, P) -> (B, 1, N, P)
            ang = ang.unsqueeze(1)
        cos, sin = ang.cos().to(compute_dtype), ang.sin().to(compute_dtype)
        if key is not None:
            if len(self._cache) > 16:
                self._cache.clear()
            self._cache[key] = (stamp, cos, sin, freqs)  # the frequencies kept alive: the stamp stays unique
        return cos, sin

    # ------------------------------------------------------------------ apply
    def forward(self, x_BHND: torch.Tensor, positions: Positions = None,
                num_prefix_tokens: Optional[int] = None) -> torch.Tensor:
        """Rotate the non-prefix tokens of ``x`` (B, H, N, D); the prefix tokens pass through unchanged.
        ``num_prefix_tokens`` overrides the module's count for this call (a KV cache step: the prefix tokens are
        the stream's first ones, so later calls hold none). With no token to rotate, ``positions`` must be None or
        for 0 tokens."""
        if x_BHND.dim() != 4 or x_BHND.shape[-1] != self.head_dim:
            raise ValueError(f"RoPE expects (B, H, N, {self.head_dim}), got {tuple(x_BHND.shape)}")
        if not x_BHND.is_floating_point():
            raise TypeError(f"RoPE expects a floating-point tensor, got {x_BHND.dtype} (rotated values would be "
                            f"truncated)")
        per_sample = 2 if self.mode == "1d" else 3  # (B, N) or (B, N, P)
        if isinstance(positions, torch.Tensor) and positions.dim() == per_sample \
                and positions.shape[0] not in (1, x_BHND.shape[0]):
            raise ValueError(f"RoPE: per-sample positions {tuple(positions.shape)} are for batch {positions.shape[0]} "
                             f"but x has batch {x_BHND.shape[0]}")
        if num_prefix_tokens is not None:
            check_ints(0, num_prefix_tokens=num_prefix_tokens)
        npt = self.num_prefix_tokens if num_prefix_tokens is None else num_prefix_tokens
        num_tokens = x_BHND.shape[2] - npt
        if num_tokens <= 0:  # prefix tokens only (e.g. one latent query of a cross attention): nothing to rotate
            if positions is not None:
                self._check_no_rotated_positions(positions, x_BHND.shape[2], npt)
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

    # pickle / torch.save(module) / copy.deepcopy: without the kept cos/sin (rebuilt on the next call; one
    # 4000-token call doubled a MultiHeadAttention(256, 4, rope="1d") file)
    _copied_without = {"_cache": dict}

    def __setstate__(self, state):
        # modules pickled before theta and freqs became checked properties hold them as plain attributes
        state = dict(state)
        for name in ("theta", "freqs"):
            if name in state:
                state["_" + name] = state.pop(name)
        super().__setstate__(state)
