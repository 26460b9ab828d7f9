"""Additive attention biases that are objects rather than tensors.

``attend(..., bias=...)`` takes either a float tensor broadcastable to (B, H, Nq, Nk) or an
:class:`AttentionBias`: an ``nn.Module`` that produces such a tensor on demand for the problem size at
hand. Relative-position tables (Swin/MaxViT, zoo/attention/relpos.py) subclass it, so the table and the
index live together, the table stays a learned parameter (its gradient flows through ``materialize``),
and backends that can read a bias tensor with broadcasting serve it.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["AttentionBias", "resolve_bias"]


class AttentionBias(nn.Module):
    """Base class of bias objects: subclasses implement :meth:`materialize`.

    ``distance_only``: True for a bias that depends only on the key position minus the query position, with
    queries at the last keys (bottom-right), as ALiBi: its (Nq, Nk) block is then exact for new tokens over a
    KV cache, so MultiHeadAttention(rel_pos_bias=...) accepts a cache with it."""

    distance_only: bool = False

    def materialize(self, q_len: int, k_len: int, *, device=None, dtype=None) -> torch.Tensor:
        """A float tensor broadcastable to (B, H, q_len, k_len)."""
        raise NotImplementedError

    def forward(self, q_len: int, k_len: int) -> torch.Tensor:  # nn.Module call convenience
        return self.materialize(q_len, k_len)


def resolve_bias(bias, q_len: int, k_len: int, *, device, dtype) -> torch.Tensor | None:
    """Turn ``bias`` (None, tensor or AttentionBias) into a 4-D float tensor, checking broadcastability."""
    if bias is None:
        return None
    if isinstance(bias, AttentionBias):
        tensor = bias.materialize(q_len, k_len, device=device, dtype=dtype)
        origin = type(bias).__name__
    elif isinstance(bias, torch.Tensor):
        tensor = bias
        origin = "bias"
    else:
        raise TypeError(
            f"bias must be a float tensor broadcastable to (B, H, Nq, Nk) or a zoo.attention.AttentionBias, "
            f"got {type(bias).__name__}"
        )
    if not tensor.is_floating_point():
        raise TypeError(f"{origin} must be a floating-point tensor, got {tensor.dtype} (use mask= for bool masks)")
    if tensor.dim() > 4:
        raise ValueError(f"{origin} has {tensor.dim()} dims; expected at most 4 (B, H, Nq, Nk)")
    while tensor.dim() < 4:
        tensor = tensor.unsqueeze(0)
    if not (_broadcasts(tensor.shape[-2], q_len) and _broadcasts(tensor.shape[-1], k_len)):
        raise ValueError(
            f"{origin} of shape {tuple(tensor.shape)} does not broadcast to (B, H, {q_len}, {k_len})"
        )
    return tensor


def _broadcasts(size, length) -> bool:
    """Whether a bias dim of ``size`` broadcasts to ``length``: spelled as two comparisons, not ``size in (1,
    length)``, which Dynamo got wrong once the sizes were symbolic (a second image size under torch.compile,
    dynamic=True): it raised this module's ValueError on a bias that fits."""
    return size == 1 or size == length
