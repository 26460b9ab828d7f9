"""Radial attention: the O(n log n) static sparse mask for video diffusion transformers.

Paper: Xingyang Li, Muyang Li, Tianle Cai, et al., "Radial Attention: O(n log n) Sparse Attention with
Energy Decay for Long Video Generation", NeurIPS 2025 (arXiv:2506.19852).
Reference generator: mit-han-lab/radial-attention, ``radial_attn/attn_mask.py`` at 72788d4 (Nov 2025),
functions ``get_diagonal_split_mask``, ``get_window_width``, ``shrinkMaskStrict`` and
``gen_log_mask_shrinked``. This module re-derives that rule (it is written out in issue 5, section 2) and
reproduces the published block map bit for bit (checked against the published generator outside this
repository -- no test here runs it -- by a second engineer on 8,000 grid and 158,988 frame-pair cases, and on
165 cases by a third audit; docs/radial.md lists them; in the tests, test_block_map_matches_quantised_token_mask
checks 9 cases against an independent quantisation of the token rule), but computes it
in closed form: the published code builds
a tokens_per_frame x tokens_per_frame boolean matrix for every one of the num_frames**2 frame pairs
(minutes for 128 frames of 3600 tokens); here a frame pair's block pattern is a function of its
in-frame band width and of the two frames' offsets modulo the block size only, so each distinct pattern
is computed once, from interval lengths, without any token-level matrix.

The rule, tokens laid out frame-major (frame f holds tokens [f*T, (f+1)*T), T = tokens_per_frame,
row-major inside the frame). Query frame i, key frame j, dist = |i - j|:

* ``frame0_sink`` and j == 0 (Wan): the whole frame pair is on (attention sink on the first frame).
* otherwise, with g = dist.bit_length() (0 for dist 0), P = 2 ** T.bit_length() and L = P / 2**g:
  the pair is kept only if L >= 128 or dist % int(128 / L) == 0 (128 is a constant of the generator,
  not the block size); inside a kept pair, token p of frame i sees token p' of frame j iff
  |p - p'| <= w, with w = T when dist <= 1, else w = max(L * decay_factor, block_size).
  The band shrinks by half each time the distance doubles: that is the "energy decay" and why the
  number of kept entries grows as O(n log n) in the number of frames.
* Block quantisation (what the kernels run): a frame pair's token mask is placed at row offset
  (i*T) mod block and column offset (j*T) mod block of a zero array that is cropped to
  ceil(T/block)*block rows and columns (spill-over is dropped); a block is kept iff, among its columns
  holding at least one True, more than 60% have a column density (fraction of the block's rows that
  are True) above 1/3. The pair's blocks are OR-ed into the global map at block offset
  (i*T // block, j*T // block).
* Block rows and columns with index >= S // block (S = num_frames * T: a trailing partial block and
  any text tokens appended after the video) are fully on.
* A block row can end up with no kept block (its tokens see no key; attention returns zeros there): only
  when S is a multiple of the block and there are no text tokens, and no frame has more than a third of a
  block in that row (short frames: 8 x 16 or 16 x 120 tokens at block 128, but also 8 x 1008). The map is
  kept as published, with a RuntimeWarning naming the rows and a block size that has none.

Semantics of the :class:`Radial` mask object: a kept block lets all its query tokens see all its key
tokens (the published attention is block-sparse FlashInfer / SpargeAttn over this map), so its dense
form is the block map at ``block_size`` expanded to tokens, and its block map at ``block_size`` is the
published map with every kept tile FULL (no element-wise masking in any kernel). At other tile sizes
the map is derived from prefix sums over the published map (see :class:`~zoo.attention.masks.BlockSparse`).
The un-quantised token rule is available as :func:`radial_token_mask` (small sizes; used by tests).

Also here: :class:`DenseWarmup`, the schedule that keeps attention dense for the first denoising steps,
the last steps and the first transformer layers (the published pipelines expose ``dense_timesteps`` and
``dense_layers``; dense final steps are a common refinement), sparse elsewhere.

Letters: F frames, T tokens per frame, S = F*T video tokens, N = S + text tokens, NB blocks.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from zoo.attention.masks import BlockSparse, Full, Mask, _CheckedSettings
from zoo.layers import check_flag, is_tracing

__all__ = ["Radial", "radial_block_mask", "radial_token_mask", "radial_pair_rule", "DenseWarmup"]

# The generator's hard-coded split threshold (equal to its default block size, but a constant).
_SPLIT_THRESHOLD = 128


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"Radial: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_decay(decay_factor) -> float:
    """``decay_factor`` as a Python float: any real number (numpy floats included, not bool), positive and finite."""
    if isinstance(decay_factor, (bool, np.bool_)) or not isinstance(decay_factor, numbers.Real) or not (
        math.isfinite(float(decay_factor)) and float(decay_factor) > 0
    ):
        raise ValueError(f"Radial: decay_factor must be a positive finite number, got {decay_factor!r}")
    return float(decay_factor)


def _check_args(num_frames, tokens_per_frame, decay_factor, block_size, text_tokens=0):
    num_frames = _check_int("num_frames", num_frames, 1)
    tokens_per_frame = _check_int("tokens_per_frame", tokens_per_frame, 1)
    block_size = _check_int("block_size", block_size, 1)
    text_tokens = _check_int("text_tokens", text_tokens, 0)
    return num_frames, tokens_per_frame, _check_decay(decay_factor), block_size, text_tokens


def _empty_block_rows(num_frames: int, tokens_per_frame: int, block: int, text_tokens: int) -> np.ndarray:
    """Indices of the block rows of the published map that keep no block (their query tokens see no key).

    Closed form, without building the map: a frame pair's block can only be kept where more than a third of a
    block's rows belong to the query frame (column density > 1/3), and the frame's own pair (dist 0, whole band)
    keeps exactly those blocks, on the diagonal. So block row r is empty iff no frame has more than block / 3 of
    its tokens in r (counting only the frame's first ceil(T / block) block rows: the generator crops the rest).
    A trailing partial block or text tokens add a fully-on block column, so no row can be empty then.
    """
    video = num_frames * tokens_per_frame
    if text_tokens or video % block:
        return np.zeros(0, dtype=np.int64)
    nb = -(-tokens_per_frame // block)
    start = np.arange(num_frames, dtype=np.int64)[:, None] * tokens_per_frame
    row = start // block + np.arange(nb, dtype=np.int64)[None, :]
    overlap = np.minimum(start + tokens_per_frame, (row + 1) * block) - np.maximum(start, row * block)
    inside = row < video // block
    largest = np.zeros(video // block, dtype=np.int64)
    np.maximum.at(largest, row[inside], overlap[inside])
    return np.flatnonzero(3 * largest <= block)


def _warn_empty_rows(num_frames: int, tokens_per_frame: int, block: int, text_tokens: int, stacklevel: int) -> None:
    """Warn when the published rule leaves query tokens with no key at all: attention returns zeros for them,
    silently otherwise. A warning, not an error: the map is the published one (the published generator builds
    the same), and layouts such as 8 x 1008 or 16 x 488 tokens at block 128 have only a few such rows."""
    empty = _empty_block_rows(num_frames, tokens_per_frame, block, text_tokens)
    if len(empty) == 0:
        return
    smaller = 1 << (block - 1).bit_length() - 1  # largest power of two < block
    while smaller > 1 and len(_empty_block_rows(num_frames, tokens_per_frame, smaller, text_tokens)):
        smaller //= 2
    shown = ", ".join(str(int(r)) for r in empty[:8]) + (", ..." if len(empty) > 8 else "")
    warnings.warn(
        f"Radial: {num_frames} frames x {tokens_per_frame} tokens at block_size={block} leave {len(empty)} of "
        f"{num_frames * tokens_per_frame // block} block rows ({shown}; {len(empty) * block} video tokens) with no "
        f"key: the published 60% / one-third rule drops every tile there and attention returns zeros for them; "
        f"use a smaller block_size (block_size={smaller} has no empty row) or more tokens per frame",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )


def radial_pair_rule(dist: int, tokens_per_frame: int, decay_factor: float = 1.0, block_size: int = 128):
    """(kept, band) for a non-sink frame pair at frame distance ``dist``.

    ``kept`` says whether the pair survives the distance split; ``band`` is the largest |p - p'| allowed
    inside the pair (an int, at most tokens_per_frame). Floating point is used exactly as the reference
    generator uses it: powers of two are exact, ``L * decay_factor`` is a Python float, and the generator
    compares the integer distances with it in torch's default float32 (``torch.abs(col - row) <= window``),
    so the band is floor(float32(window)): a window just below a whole number (L * (1 - 1e-8) = 127.99999872)
    rounds up to it there, one token wider than floor() of the float64 value. ``dist`` is an int of either sign
    (i - j or j - i); the other arguments are checked as in :func:`radial_block_mask`.
    """
    if isinstance(dist, bool) or not isinstance(dist, (int, np.integer)):
        raise ValueError(f"Radial: dist must be an int (a frame distance), got {dist!r}")
    dist = abs(int(dist))
    tokens_per_frame = _check_int("tokens_per_frame", tokens_per_frame, 1)
    decay_factor = _check_decay(decay_factor)
    block_size = _check_int("block_size", block_size, 1)
    group = dist.bit_length()
    decay_length = 2 ** tokens_per_frame.bit_length() / 2**group  # L
    if decay_length >= _SPLIT_THRESHOLD:
        kept = True
    else:
        kept = dist % int(_SPLIT_THRESHOLD / decay_length) == 0
    if dist <= 1:
        window = float(tokens_per_frame)
    else:
        window = max(decay_length * decay_factor, float(block_size))
    # the published generator compares in float32; a window past float32's range (decay_factor ~3.4e38 and up) is inf
    # there, the whole band, which the min() gives without converting inf to an int
    window32 = float(np.float32(window)) if window < float(np.finfo(np.float32).max) else math.inf
    return kept, tokens_per_frame if window32 >= tokens_per_frame else int(math.floor(window32))


def radial_token_mask(
    num_frames: int,
    tokens_per_frame: int,
    decay_factor: float = 1.0,
    frame0_sink: bool = False,
    block_size: int = 128,
    *,
    text_tokens: int = 0,
) -> torch.Tensor:
    """The token-level rule before block quantisation: bool (N, N), N = S + text_tokens, the text tokens (after
    the video, as in radial_block_mask) seeing and seen by every token. O(N^2) memory: small sizes only."""
    num_frames, tpf, decay_factor, block_size, text_tokens = _check_args(
        num_frames, tokens_per_frame, decay_factor, block_size, text_tokens)
    s = num_frames * tpf
    out = torch.zeros(s + text_tokens, s + text_tokens, dtype=torch.bool)
    out[s:, :] = True
    out[:, s:] = True
    p = torch.arange(tpf)
    offset_PP = (p[:, None] - p[None, :]).abs()
    for i in range(num_frames):
        for j in range(num_frames):
            if frame0_sink and j == 0:
                pair = torch.ones(tpf, tpf, dtype=torch.bool)
            else:
                kept, band = radial_pair_rule(i - j, tpf, decay_factor, block_size)
                if not kept:
                    continue
                pair = offset_PP <= band
            out[i * tpf : (i + 1) * tpf, j * tpf : (j + 1) * tpf] = pair
    return out


def _pair_blocks(tpf: int, block: int, row_offset: int, col_offset: int, band: int) -> np.ndarray:
    """Block pattern (nb, nb) of one frame pair whose token mask is the band |p - p'| <= band.

    Equivalent to placing the pair mask at (row_offset, col_offset) in a zero array, cropping it to
    nb*block rows and columns, nb = ceil(tpf / block), and applying the 60% / one-third column-density
    rule per block -- but from interval lengths: the number of True rows of block a in padded column c is
    the length of [a*block - row_offset, (a+1)*block - 1 - row_offset] & [0, tpf-1] & [p'-band, p'+band]
    with p' = c - col_offset (zero when p' is outside the frame).
    """
    nb = -(-tpf // block)
    n = nb * block
    a = np.arange(nb, dtype=np.int64)[:, None]  # block row
    c = np.arange(n, dtype=np.int64)[None, :]  # padded column
    pk = c - col_offset  # in-frame key index of the column
    lo = np.maximum(np.maximum(a * block - row_offset, 0), pk - band)
    hi = np.minimum(np.minimum((a + 1) * block - 1 - row_offset, tpf - 1), pk + band)
    count = np.clip(hi - lo + 1, 0, None)
    count[:, ((pk < 0) | (pk >= tpf))[0]] = 0
    count = count.reshape(nb, nb, block)  # (block row, block col, column in block)
    # Column density > 1/3  <=>  3 * count > block;  share of dense columns > 0.6  <=>  5 * dense > 3 * nonzero
    # (the reference's float32 arithmetic gives the same answers: the margins exceed float32 rounding).
    dense_cols = (3 * count > block).sum(-1)
    nonzero_cols = (count > 0).sum(-1)
    return (5 * dense_cols > 3 * nonzero_cols) & (nonzero_cols > 0)


def radial_block_mask(
    num_frames: int,
    tokens_per_frame: int,
    decay_factor: float = 1.0,
    frame0_sink: bool = False,
    block_size: int = 128,
    *,
    text_tokens: int = 0,
) -> torch.BoolTensor:
    """The published Radial Attention block map: bool (ceil(N/block), ceil(N/block)), N = S + text_tokens.

    Wan 2.1 uses ``frame0_sink=True``, HunyuanVideo ``False``. Block rows/columns >= S // block (a trailing
    partial block and the text tokens) are fully on. Each distinct (row offset, column offset, band)
    pattern is computed once, so the 128-frame x 3600-token map (3600 x 3600 blocks) takes seconds.

    When frames are short compared with the block (8 x 16 or 16 x 120 tokens at block 128, no text tokens)
    the published rule keeps no tile at all in some block rows, so their query tokens see no key and attention
    returns zeros for them: the map is still the published one, with a RuntimeWarning naming the rows and a
    block size without empty rows.
    """
    num_frames, tpf, decay_factor, block, text_tokens = _check_args(
        num_frames, tokens_per_frame, decay_factor, block_size, text_tokens
    )
    frame0_sink = check_flag(frame0_sink, "radial_block_mask: frame0_sink")
    _warn_empty_rows(num_frames, tpf, block, text_tokens, stacklevel=2)
    return _published_block_map(num_frames, tpf, decay_factor, frame0_sink, block, text_tokens)


def _published_block_map(num_frames: int, tpf: int, decay_factor: float, frame0_sink: bool, block: int,
                         text_tokens: int) -> torch.BoolTensor:
    """:func:`radial_block_mask` on checked arguments, without the empty-row warning."""
    video = num_frames * tpf
    total_blocks = -(-(video + text_tokens) // block)
    border = video // block
    out_NB = np.zeros((total_blocks, total_blocks), dtype=bool)
    out_NB[border:, :] = True
    out_NB[:, border:] = True
    nb = -(-tpf // block)
    # Per distance: kept?, band (sink pairs are handled separately).
    rules = [radial_pair_rule(d, tpf, decay_factor, block) for d in range(num_frames)]
    patterns: dict = {}
    for i in range(num_frames):
        row_offset, row_block = (i * tpf) % block, (i * tpf) // block
        row_end = min(row_block + nb, total_blocks)
        for j in range(num_frames):
            if frame0_sink and j == 0:
                band = tpf
            else:
                kept, band = rules[abs(i - j)]
                if not kept:
                    continue
            col_offset, col_block = (j * tpf) % block, (j * tpf) // block
            key = (row_offset, col_offset, band)
            pattern = patterns.get(key)
            if pattern is None:
                pattern = patterns[key] = _pair_blocks(tpf, block, row_offset, col_offset, band)
            col_end = min(col_block + nb, total_blocks)
            out_NB[row_block:row_end, col_block:col_end] |= pattern[: row_end - row_block, : col_end - col_block]
    return torch.from_numpy(out_NB)


class Radial(_CheckedSettings, Mask):
    """Radial attention mask over ``num_frames * tokens_per_frame`` video tokens (+ ``text_tokens``).

    Self-attention only (Nq = Nk = S + text_tokens). The block map at ``block_size`` is the published map
    (:func:`radial_block_mask`), computed lazily once and cached; every kept tile is FULL. See the module
    docstring for the rule and the semantics. The settings may be reassigned (``radial.num_frames = 32``): an
    assignment is checked as the constructor checks it, and the map is rebuilt at its next use.
    """

    _SETTINGS = ("num_frames", "tokens_per_frame", "decay_factor", "frame0_sink", "block_size", "text_tokens")

    def __init__(
        self,
        num_frames: int,
        tokens_per_frame: int,
        decay_factor: float = 1.0,
        frame0_sink: bool = False,
        block_size: int = 128,
        text_tokens: int = 0,
    ) -> None:
        super().__init__()
        self._init_settings(num_frames=num_frames, tokens_per_frame=tokens_per_frame, decay_factor=decay_factor,
                            frame0_sink=frame0_sink, block_size=block_size, text_tokens=text_tokens)
        # Layouts whose published map leaves query tokens with no key are flagged here, not at the first attend()
        # (cheap: the map itself is built lazily); settings changed later are checked when the map is rebuilt.
        _warn_empty_rows(self.num_frames, self.tokens_per_frame, self.block_size, self.text_tokens, stacklevel=2)
        self._warned_settings = self._settings()
        self._blocks: Optional[BlockSparse] = None

    @property
    def video_tokens(self) -> int:
        return self.num_frames * self.tokens_per_frame

    @property
    def seq_len(self) -> int:
        return self.video_tokens + self.text_tokens

    @property
    def block_mask(self) -> torch.Tensor:
        """bool (NB, NB): the published block map at ``block_size`` (built on first use)."""
        return self._block_sparse().block_mask[0, 0]

    def density(self) -> float:
        """Kept fraction of the video x video blocks (S // block)^2, the figure the paper reports."""
        border = self.video_tokens // self.block_size
        if border == 0:
            return 1.0
        return float(self.block_mask[:border, :border].float().mean())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The published block map once built (``block_mask`` is a view of it): an in-place edit of it reaches every
        backend."""
        return () if self._blocks is None else self._blocks.tensors()

    def _checked_settings(self, settings: dict) -> dict:
        frames, tpf, decay, block, text = _check_args(settings["num_frames"], settings["tokens_per_frame"],
                                                      settings["decay_factor"], settings["block_size"],
                                                      settings["text_tokens"])
        return {"num_frames": frames, "tokens_per_frame": tpf, "decay_factor": decay,
                "frame0_sink": check_flag(settings["frame0_sink"], "Radial: frame0_sink"), "block_size": block,
                "text_tokens": text}

    def _settings(self) -> tuple:
        return (self.num_frames, self.tokens_per_frame, self.decay_factor, self.frame0_sink, self.block_size,
                self.text_tokens)

    def _block_sparse(self) -> BlockSparse:
        """The published map as a BlockSparse mask, built once and again if a setting is changed.

        While traced (torch.export / torch.compile / jit tracing, zoo.layers.is_tracing) a map built then is not
        kept, as RoPE and ALiBi keep no tables built then: under torch.export it is a FakeTensor, and the eager
        calls after the export read it (they failed on its data-dependent values). A map built before is used."""
        settings = self._settings()
        if self._blocks is not None and self._blocks_settings == settings:
            return self._blocks
        frames, tpf, decay, block, text = _check_args(self.num_frames, self.tokens_per_frame, self.decay_factor,
                                                      self.block_size, self.text_tokens)
        sink = check_flag(self.frame0_sink, "Radial: frame0_sink")
        blocks = BlockSparse(_published_block_map(frames, tpf, decay, sink, block, text), block)
        if is_tracing():
            return blocks
        if settings != self._warned_settings:  # a setting was reassigned: check the new layout once
            _warn_empty_rows(frames, tpf, block, text, stacklevel=4)
            self._warned_settings = settings
        self._blocks_settings = settings
        self._blocks = blocks
        return blocks

    def check_shape(self, q_len, k_len, batch=None, heads=None):
        if q_len != self.seq_len or k_len != self.seq_len:
            raise ValueError(
                f"Radial mask is for self-attention over {self.num_frames} frames x {self.tokens_per_frame} tokens"
                f" + {self.text_tokens} text tokens = {self.seq_len} tokens, but attention has Nq={q_len}, Nk={k_len}"
            )

    def _dense_rows(self, q_len, k_len, start, stop, device):
        return self._block_sparse().dense(q_len, k_len, device, rows=(start, stop))

    def _block_states(self, q_len, k_len, block_q, block_k, device):
        return self._block_sparse().block_map(q_len, k_len, block_q, block_k, device).states

    def __repr__(self) -> str:
        return (
            f"Radial(num_frames={self.num_frames}, tokens_per_frame={self.tokens_per_frame}, "
            f"decay_factor={self.decay_factor}, frame0_sink={self.frame0_sink}, block_size={self.block_size}, "
            f"text_tokens={self.text_tokens})"
        )


def _check_schedule_int(name: str, value, minimum: int, below: Optional[int] = None) -> None:
    """ValueError naming ``name`` unless ``value`` is an int (Python or numpy; not a bool) in [minimum, below)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"DenseWarmup: {name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum or (below is not None and value >= below):
        bounds = f">= {minimum}" if below is None else f"in [{minimum}, {below})"
        raise ValueError(f"DenseWarmup: {name} must be {bounds}, got {value}")


@dataclass(frozen=True)
class DenseWarmup:
    """When to run dense attention during diffusion sampling, sparse otherwise.

    (Counts may be numpy ints; ``dense_first_steps`` / ``dense_last_steps`` above ``num_steps`` are refused as
    settings meant for another sampler length; dense steps covering every step are a dense baseline, allowed.)

    Dense for denoising steps ``step < dense_first_steps`` and ``step >= num_steps - dense_last_steps``,
    and for transformer layers ``layer < dense_first_layers``; sparse elsewhere. The published Radial
    pipelines (``--dense_timesteps``, ``--dense_layers``: ``numeral_timestep < dense_timestep or
    layer_idx < dense_block``) are the case ``dense_last_steps=0``. Steps and layers count from 0.

        schedule = DenseWarmup(num_steps=50, dense_first_steps=12, dense_first_layers=1)
        mask = schedule.mask(step, layer, radial)   # Full() or radial
    """

    num_steps: int
    dense_first_steps: int = 0
    dense_last_steps: int = 0
    dense_first_layers: int = 0

    def __post_init__(self) -> None:
        for name in ("num_steps", "dense_first_steps", "dense_last_steps", "dense_first_layers"):
            value = getattr(self, name)
            _check_schedule_int(name, value, minimum=1 if name == "num_steps" else 0)
            object.__setattr__(self, name, int(value))  # numpy ints (schedules built with numpy) as Python ints
        for name in ("dense_first_steps", "dense_last_steps"):
            if getattr(self, name) > self.num_steps:  # a setting meant for another sampler length
                raise ValueError(f"DenseWarmup: {name}={getattr(self, name)} is more than num_steps="
                                 f"{self.num_steps} (the sampler's denoising steps)")

    def is_dense(self, step: int, layer: int = 0) -> bool:
        """Whether the call at denoising ``step`` (0 .. num_steps - 1) and transformer ``layer`` runs dense."""
        _check_schedule_int("step", step, minimum=0, below=self.num_steps)
        _check_schedule_int("layer", layer, minimum=0)
        step, layer = int(step), int(layer)
        return (
            step < self.dense_first_steps
            or step >= self.num_steps - self.dense_last_steps
            or layer < self.dense_first_layers
        )

    def mask(self, step: int, layer: int, sparse: Mask) -> Mask:
        """``Full()`` where the schedule is dense, else ``sparse``."""
        return Full() if self.is_dense(step, layer) else sparse

    def sparse_fraction(self, num_layers: int) -> float:
        """Share of (step, layer) attention calls that run sparse, for a model with ``num_layers`` layers."""
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"DenseWarmup: num_layers must be an int >= 1 (the model's layers), got {num_layers!r}")
        calls = [not self.is_dense(s, l) for s in range(self.num_steps) for l in range(num_layers)]
        return sum(calls) / len(calls)
