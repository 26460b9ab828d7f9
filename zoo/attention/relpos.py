"""Relative-position biases for windowed attention, as :class:`zoo.attention.AttentionBias` objects.

Two kinds, both for a fixed 2-D window of ``Wh x Ww`` tokens flattened row-major (N = Wh * Ww):

* :class:`RelPosBiasTf` -- a learned table ``relative_position_bias_table`` [H, 2Wh-1, 2Ww-1] read at the
  offset *key minus query*: ``bias[h, (qy, qx), (ky, kx)] = table[h, ky - qy + Wh - 1, kx - qx + Ww - 1]``.
  This is the layout of the official MaxViT code (google-research/maxvit, maxvit/models/attention_utils.py,
  ``reindex_2d_einsum_lookup``) and of timm's ``RelPosBiasTf`` (timm/layers/pos_embed_rel.py), so their
  checkpoints load unchanged. We gather through a precomputed flat index instead of two one-hot einsums.
* :class:`RelPosMlp` -- the bias is computed by a small MLP (2 -> hidden -> H, ReLU, dropout 0.125 after
  the ReLU) from log-spaced offsets ``sign(d) * log(1 + |d|)`` of *query minus key* (timm's ``RelPosMlp``
  in mode "cr", after the continuous position bias of Swin V2, Liu et al., CVPR 2022, arXiv:2111.09883).
  Its parameters do not depend on the window, so a changed window needs no conversion.

Both keep their index/coordinate tables as non-persistent buffers (not in state dicts, as timm), and both
pass gradients to their parameters through :meth:`materialize`.

A changed window (a checkpoint trained at another resolution) is handled by :func:`resize_rel_pos_table`,
which follows timm's ``resize_rel_pos_bias_table`` for 3-D tables (itself after BEiT's fine-tuning code,
microsoft/unilm beit/run_class_finetuning.py): source offsets are placed on a geometric progression whose
span matches the new table, and the new integer offsets are interpolated linearly (clamped at the ends).
:class:`RelPosBiasTf` applies it when loading a state dict whose table has another shape, so
``model.load_state_dict(sd_from_another_window)`` just works.

Letters: H heads, N = Wh*Wh tokens of a window, Vh = 2Wh-1 / Vw = 2Ww-1 table rows/cols (the vocabulary
of offsets), D hidden width of the MLP.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn as nn

from zoo.attention.bias import AttentionBias
from zoo.layers import to_pair

__all__ = [
    "RelPosBiasTf",
    "RelPosMlp",
    "resize_rel_pos_table",
    "rel_pos_index_tf",
    "rel_pos_index_mlp",
    "log_coords",
]

WindowSize = Union[int, Sequence[int]]


def _window(window_size: WindowSize) -> tuple[int, int]:
    return to_pair(window_size, "window_size")


def _grid_coords(window: tuple[int, int], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every token of a window, row-major: two (N,) long tensors."""
    ys, xs = torch.meshgrid(
        torch.arange(window[0], device=device), torch.arange(window[1], device=device), indexing="ij"
    )
    return ys.reshape(-1), xs.reshape(-1)


def rel_pos_index_tf(window_size: WindowSize, device=None) -> torch.Tensor:
    """(N, N) long: flat index into a [Vh, Vw] table of the offset key - query (TF MaxViT convention)."""
    wh, ww = _window(window_size)
    ys, xs = _grid_coords((wh, ww), device)
    dy = ys[None, :] - ys[:, None] + (wh - 1)  # [query, key]
    dx = xs[None, :] - xs[:, None] + (ww - 1)
    return dy * (2 * ww - 1) + dx


def rel_pos_index_mlp(window_size: WindowSize, device=None) -> torch.Tensor:
    """(N, N) long: flat index into a [Vh, Vw] table of the offset query - key (Swin / timm convention)."""
    wh, ww = _window(window_size)
    ys, xs = _grid_coords((wh, ww), device)
    dy = ys[:, None] - ys[None, :] + (wh - 1)
    dx = xs[:, None] - xs[None, :] + (ww - 1)
    return dy * (2 * ww - 1) + dx


def log_coords(window_size: WindowSize, device=None, dtype=torch.float32) -> torch.Tensor:
    """(Vh, Vw, 2): every offset (dy, dx) in [-(W-1), W-1] mapped to sign(d) * log(1 + |d|), computed in fp32 (as
    timm) or in float64 when ``dtype`` is float64."""
    wh, ww = _window(window_size)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    dy = torch.arange(-(wh - 1), wh, device=device, dtype=compute)
    dx = torch.arange(-(ww - 1), ww, device=device, dtype=compute)
    grid = torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1)
    return (torch.sign(grid) * torch.log1p(grid.abs())).to(dtype)


# --------------------------------------------------------------------------------------------------
# Table resizing (new window size)
# --------------------------------------------------------------------------------------------------
def _progression_positions(src: int, dst: int) -> list[float]:
    """Source offsets for a table axis of ``src`` entries stretched to ``dst`` entries (BEiT / timm rule).

    The ``src // 2`` offsets on each side of 0 are placed at 1, 1 + q, 1 + q + q^2, ... with the ratio q in
    [1.01, 1.5] found by bisection so that the last one is as close as possible to ``dst // 2`` from below.
    """
    half_src, half_dst = src // 2, dst // 2
    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:
        q = (lo + hi) / 2.0
        span = (1.0 - q**half_src) / (1.0 - q)  # 1 + q + ... + q^(half_src - 1)
        if span > half_dst:
            hi = q
        else:
            lo = q
    pos, cur = [], 1.0
    for i in range(half_src):
        pos.append(cur)
        cur += q ** (i + 1)
    return [-p for p in reversed(pos)] + [0.0] + pos


def _linear_weights(src_pos: list[float], dst: int) -> torch.Tensor:
    """(dst, src) float64 matrix of 1-D linear interpolation from ``src_pos`` to the integer offsets
    -(dst//2) .. dst//2, clamped to the end values outside the source range."""
    p = torch.tensor(src_pos, dtype=torch.float64)
    half = dst // 2
    x = torch.arange(-half, half + 1, dtype=torch.float64)
    right = torch.bucketize(x, p).clamp(max=len(src_pos) - 1)
    left = (right - 1).clamp(min=0)
    d_left = (x - p[left]).clamp(min=0)
    d_right = (p[right] - x).clamp(min=0)
    both_zero = (d_left == 0) & (d_right == 0)  # exactly on a source point, or clamped at an end
    d_left = torch.where(both_zero, torch.ones_like(d_left), d_left)
    d_right = torch.where(both_zero, torch.ones_like(d_right), d_right)
    total = d_left + d_right
    weights = torch.zeros(dst, len(src_pos), dtype=torch.float64)
    rows = torch.arange(dst)
    weights.index_put_((rows, left), d_right / total, accumulate=True)
    weights.index_put_((rows, right), d_left / total, accumulate=True)
    return weights


def resize_rel_pos_table(table_HVV: torch.Tensor, new_window_size: WindowSize) -> torch.Tensor:
    """Resize a TF-style table [H, 2Wh-1, 2Ww-1] to the table of another window [H, 2Wh'-1, 2Ww'-1].

    Same result as timm's ``resize_rel_pos_bias_table`` (linear interpolation mode) for 3-D tables; a table
    that already has the target shape is returned unchanged. When only one axis changes (a 224 px checkpoint
    built at 224 x 384), the other is re-sampled too, by the progression with q near 1.01, as timm does: so
    timm's checkpoint filter and this one give the same model. Differentiable (a fixed linear map per axis).
    Computed in fp32 as timm does, or in float64 for a float64 table (float64 models, gradcheck).
    """
    if not isinstance(table_HVV, torch.Tensor) or table_HVV.dim() != 3 or not table_HVV.is_floating_point():
        raise ValueError(
            "resize_rel_pos_table expects a float tensor [heads, 2*Wh-1, 2*Ww-1], got "
            f"{getattr(table_HVV, 'shape', type(table_HVV).__name__)}"
        )
    src_h, src_w = table_HVV.shape[1:]
    if src_h % 2 == 0 or src_w % 2 == 0:
        raise ValueError(f"a relative-position table has odd sizes 2*W-1; got {tuple(table_HVV.shape)}")
    wh, ww = _window(new_window_size)
    dst_h, dst_w = 2 * wh - 1, 2 * ww - 1
    if (src_h, src_w) == (dst_h, dst_w):
        return table_HVV
    weights = [_linear_weights(_progression_positions(src, dst), dst) for src, dst in ((src_h, dst_h), (src_w, dst_w))]
    compute = torch.promote_types(table_HVV.dtype, torch.float32)
    m_h = weights[0].to(device=table_HVV.device, dtype=compute)
    m_w = weights[1].to(device=table_HVV.device, dtype=compute)
    out = torch.einsum("ay,hyx,bx->hab", m_h, table_HVV.to(compute), m_w)
    return out.to(table_HVV.dtype).contiguous()


# --------------------------------------------------------------------------------------------------
# Bias objects
# --------------------------------------------------------------------------------------------------
class _WindowBias(AttentionBias):
    """Shared plumbing: window size, the (N, N) index buffer, shape checks."""

    num_heads: int
    window_size: tuple[int, int]

    def _check_lengths(self, q_len: int, k_len: int) -> None:
        n = self.window_size[0] * self.window_size[1]
        if q_len != n or k_len != n:
            raise ValueError(
                f"{type(self).__name__} is built for a {self.window_size[0]}x{self.window_size[1]} window "
                f"({n} tokens) but attention has {q_len} queries and {k_len} keys; call set_window_size() "
                f"for another window"
            )

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, num_heads={self.num_heads}"


class RelPosBiasTf(_WindowBias):
    """Learned relative-position table [H, 2Wh-1, 2Ww-1] (official MaxViT / timm ``RelPosBiasTf`` layout).

    ``materialize(N, N)`` returns (1, H, N, N) with ``bias[0, h, q, k] = table[h, ky-qy+Wh-1, kx-qx+Ww-1]``.
    """

    def __init__(self, window_size: WindowSize, num_heads: int, init_std: float = 0.02):
        super().__init__()
        if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        self.window_size = _window(window_size)
        self.num_heads = num_heads
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.empty(num_heads, 2 * wh - 1, 2 * ww - 1))
        self.register_buffer("relative_position_index", rel_pos_index_tf(self.window_size), persistent=False)
        nn.init.normal_(self.relative_position_bias_table, std=init_std)

    def init_non_persistent_buffers(self) -> None:
        """Rebuild the index (not in the state dict) on the table's device: after ``to_empty`` of a model built
        on the meta device (timm's protocol; ``timm.models._manipulate.reinit_non_persistent_buffers`` calls it)."""
        index = rel_pos_index_tf(self.window_size, device=self.relative_position_bias_table.device)
        self.register_buffer("relative_position_index", index, persistent=False)

    def materialize(self, q_len: int, k_len: int, *, device=None, dtype=None) -> torch.Tensor:
        self._check_lengths(q_len, k_len)
        table_HV = self.relative_position_bias_table.flatten(1)
        index = self.relative_position_index
        if index.device != table_HV.device:
            index = index.to(table_HV.device)
        bias_HNN = table_HV[:, index]
        return bias_HNN.unsqueeze(0).to(device=device, dtype=dtype)

    def set_window_size(self, window_size: WindowSize) -> None:
        """Change the window: the table is resized (:func:`resize_rel_pos_table`) and the index rebuilt."""
        window = _window(window_size)
        if window == self.window_size:
            return
        table = self.relative_position_bias_table
        with torch.no_grad():
            resized = resize_rel_pos_table(table.detach(), window)
        self.relative_position_bias_table = nn.Parameter(resized, requires_grad=table.requires_grad)
        self.window_size = window
        index = rel_pos_index_tf(window, device=self.relative_position_index.device)
        self.register_buffer("relative_position_index", index, persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # A table saved for another window: resize it to ours before the (shape-checked) copy.
        key = prefix + "relative_position_bias_table"
        table = state_dict.get(key)
        own = self.relative_position_bias_table
        if isinstance(table, torch.Tensor) and table.dim() == 3 and tuple(table.shape) != tuple(own.shape):
            if table.shape[0] != own.shape[0]:
                error_msgs.append(
                    f"{key}: checkpoint table has {table.shape[0]} heads, the model {own.shape[0]}"
                )
            else:
                # on the checkpoint's device when the model is on meta (load_state_dict(..., assign=True) of a
                # model built on meta installs this tensor: moved to meta first, its values were lost)
                state_dict[key] = resize_rel_pos_table(table if own.is_meta else table.to(own.device),
                                                       self.window_size)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class _BiasMlp(nn.Module):
    """fc1 -> ReLU -> dropout -> fc2 (timm ``Mlp`` names, so ``mlp.fc1.*`` / ``mlp.fc2.*`` keys match)."""

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(2, hidden_dim)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, num_heads)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(coords))))


class RelPosMlp(_WindowBias):
    """Bias from an MLP over log-spaced offsets (timm ``RelPosMlp``, mode "cr").

    ``materialize(N, N)`` returns (1, H, N, N) with ``bias[0, :, q, k] = mlp(c(qy-ky), c(qx-kx))`` and
    ``c(d) = sign(d) log(1 + |d|)``. The MLP is evaluated once per offset (Vh*Vw rows), then gathered.
    """

    def __init__(self, window_size: WindowSize, num_heads: int, hidden_dim: int = 512, dropout: float = 0.125):
        super().__init__()
        if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if not isinstance(hidden_dim, int) or isinstance(hidden_dim, bool) or hidden_dim < 1:
            raise ValueError(f"hidden_dim must be a positive int, got {hidden_dim!r}")
        self.window_size = _window(window_size)
        self.num_heads = num_heads
        self.mlp = _BiasMlp(hidden_dim, num_heads, dropout)
        self._build_buffers(None)

    def _build_buffers(self, device) -> None:
        self.register_buffer("relative_position_index", rel_pos_index_mlp(self.window_size, device), persistent=False)
        self.register_buffer("rel_coords_log", log_coords(self.window_size, device), persistent=False)

    def init_non_persistent_buffers(self) -> None:
        """Rebuild the offset tables (not in the state dict) on the MLP's device: after ``to_empty`` of a model
        built on the meta device (timm's protocol; ``timm.models._manipulate.reinit_non_persistent_buffers`` calls it)."""
        self._build_buffers(self.mlp.fc1.weight.device)

    def materialize(self, q_len: int, k_len: int, *, device=None, dtype=None) -> torch.Tensor:
        self._check_lengths(q_len, k_len)
        weight = self.mlp.fc1.weight
        coords = self.rel_coords_log.to(device=weight.device, dtype=weight.dtype)
        table_VH = self.mlp(coords).reshape(-1, self.num_heads)
        bias_NNH = table_VH[self.relative_position_index.to(weight.device)]
        return bias_NNH.permute(2, 0, 1).unsqueeze(0).to(device=device, dtype=dtype)

    def set_window_size(self, window_size: WindowSize) -> None:
        """Change the window: only the offset tables are rebuilt (the MLP is window-independent)."""
        window = _window(window_size)
        if window != self.window_size:
            self.window_size = window
            self._build_buffers(self.rel_coords_log.device)
