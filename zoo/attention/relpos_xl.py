"""Transformer-XL relative positions: a content-dependent score term, as Conformer encoders use it.

Dai et al., "Transformer-XL: Attentive Language Models Beyond a Fixed-Length Context" (ACL 2019), Sec. 3.3,
write the score of query i and key j as four terms:

    score_ij = q_i . k_j  +  q_i . p_(i-j)  +  u . k_j  +  v . p_(i-j)
               (a)           (b)             (c)          (d)

where p_r = W_pos s(r) is a learned projection of a sinusoid of the relative distance r = i - j, and u, v are
learned per-head vectors. Grouped as ((q_i + u) . k_j) + ((q_i + v) . p_(i-j)), the first part is ordinary
dot-product attention with shifted queries and the second is an additive bias that depends on the queries.
Gulati et al., "Conformer" (Interspeech 2020), use exactly this in every block; ESPnet
(espnet/nets/pytorch_backend/transformer/attention.py, RelPositionMultiHeadedAttention with
RelPositionalEncoding) and NeMo (nemo/collections/asr/parts/submodules/multi_head_attention.py,
RelPositionMultiHeadAttention) are the implementations most checkpoints come from. This module follows their
conventions, so their weights map one to one:

* the sinusoid of a relative distance r interleaves sin and cos: s(r)[2m] = sin(r w_m), s(r)[2m + 1] =
  cos(r w_m), w_m = 10000^(-2m / dim);
* ``linear_pos`` (dim -> H * D, no bias) projects it; ``pos_bias_u`` and ``pos_bias_v`` are (H, D);
* the whole score is divided by sqrt(D) (the (b) + (d) bias included).

Here that bias goes to :func:`zoo.attention.attend` as its additive ``bias`` (scaled by the caller's scale),
with q + u as the queries. Masks (padding as ``Segments``, causal or chunked streaming), dropout, the KV cache
and every backend therefore work unchanged; no model writes its own softmax.

The bias is computed the way Transformer-XL does it (Appendix B): one matmul of the queries against the
projected sinusoids of all Nq + Nk - 1 distances, then a "relative shift" that moves row i left by Nq - 1 - i
(:func:`rel_shift`: a strided view in eager mode, a zero pad and reshapes when traced, so it exports to ONNX). Queries are at positions q_offset + i and keys at j; by
default q_offset = Nk - Nq, the last Nq of Nk tokens (self attention, or new tokens over a KV cache).

Letters: B batch, H heads, Nq queries, Nk keys, D head dim, L = Nq + Nk - 1 relative distances.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.attention.masks import cache_put
from zoo.attention.rope import rope_frequencies
from zoo.layers import (
    CachesDroppedWhenCopied, autocast_dtype, check_like_weights, is_tracing, weights_kept_alive, weights_stamp,
)

__all__ = ["TransformerXLRelPos", "relative_sinusoids", "rel_shift"]


def relative_sinusoids(
    n_q: int, n_k: int, dim: int, *, q_offset: Optional[int] = None, device=None, dtype=torch.float32
) -> torch.Tensor:
    """(Nq + Nk - 1, dim) sinusoids of the relative distances from the largest to the smallest.

    Queries sit at positions q_offset + i (default q_offset = Nk - Nq), keys at j; row m is the distance
    r = (q_offset + Nq - 1) - m, so the rows run from q_offset + Nq - 1 down to q_offset - (Nk - 1). For
    Nq = Nk = T this is ESPnet's RelPositionalEncoding table (T - 1 down to -(T - 1)).
    """
    if dim <= 0 or dim % 2:
        raise ValueError(f"relative_sinusoids: dim must be a positive even int, got {dim!r}")
    if q_offset is None:
        q_offset = n_k - n_q
    top = q_offset + n_q - 1
    distance = torch.arange(top, top - (n_q + n_k - 1), -1, device=device, dtype=torch.float64)
    freq = rope_frequencies(dim, "1d", 10000.0).to(device)  # w_m = 10000^(-2m / dim), as 1D RoPE's
    angle_LM = distance[:, None] * freq[None, :]
    return torch.stack((angle_LM.sin(), angle_LM.cos()), dim=-1).flatten(1).to(dtype)


def rel_shift(scores_BHQL: torch.Tensor, n_k: int) -> torch.Tensor:
    """(..., Nq, Nq + Nk - 1) scores against the distances of :func:`relative_sinusoids` -> (..., Nq, Nk)
    scores against the keys: out[..., i, j] = scores[..., i, Nq - 1 - i + j].

    The rows are re-read with a stride one element shorter, which shifts row i left by Nq - 1 - i without an
    index tensor: in eager mode a strided view of the scores; traced or exported, Transformer-XL's form
    (Appendix B: a zero column padded on the left, reshapes and slices), which ONNX can express.
    """
    *lead, n_q, length = scores_BHQL.shape
    if length != n_q + n_k - 1:
        raise ValueError(f"rel_shift: the last dim must be Nq + Nk - 1 = {n_q + n_k - 1}, got {length}")
    if not (is_tracing() or torch.onnx.is_in_onnx_export()):
        # Eager: the same rows as a strided view (row stride L - 1, first element at Nq - 1), no copy; its
        # backward writes the gradient into one zero (..., Nq, L) tensor. Rows never overlap (L - 1 >= Nk when
        # Nq >= 2), so autograd takes as_strided's plain path.
        scores = scores_BHQL.contiguous()
        return scores.as_strided((*lead, n_q, n_k), (*scores.stride()[:-2], length - 1, 1),
                                 scores.storage_offset() + n_q - 1)
    padded = F.pad(scores_BHQL, (1, 0)).reshape(*lead, n_q * (length + 1))
    return padded[..., n_q:].reshape(*lead, n_q, length)[..., :n_k]


class TransformerXLRelPos(CachesDroppedWhenCopied, nn.Module):
    """The (b) + (d) terms of Transformer-XL attention, for one attention layer.

    Args:
        dim: width of the sinusoid embedding (the model width in ESPnet / NeMo Conformers); even.
        num_heads: H.
        head_dim: D (default ``dim // num_heads``).

    Parameters (ESPnet / NeMo names): ``linear_pos.weight`` (H * D, dim), ``pos_bias_u`` and ``pos_bias_v``
    (H, D).

    ``forward(q_BHND, n_k, scale)`` returns (q + u, bias): the queries to attend with and the (B, H, Nq, Nk)
    additive bias scale * ((q + v) . p_(i-j)). Without gradients, the projected sinusoids are kept for the
    distances seen so far and sliced per call (a decoder step needs the one row of distances it has not seen):
    one table per (device, dtype, autocast dtype), so fp32 calls and calls under ``torch.autocast`` keep their
    own, safe when threads share the layer, and left out of ``copy.deepcopy`` / pickle / ``torch.save(module)``.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: Optional[int] = None):
        super().__init__()
        for name, value in (("dim", dim), ("num_heads", num_heads)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TransformerXLRelPos: {name} must be a positive int, got {value!r}")
        if dim % 2:
            raise ValueError(f"TransformerXLRelPos: dim must be even (sin/cos pairs), got {dim}")
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"TransformerXLRelPos: dim ({dim}) is not divisible by num_heads ({num_heads}); "
                                 "pass head_dim")
            head_dim = dim // num_heads
        if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0:
            raise ValueError(f"TransformerXLRelPos: head_dim must be a positive int, got {head_dim!r}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.linear_pos = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(num_heads, head_dim))
        self.pos_bias_v = nn.Parameter(torch.empty(num_heads, head_dim))
        # without gradients, per (device, dtype, autocast dtype): (weights_stamp, reach, projected (H, 2 reach + 1,
        # D), the weight it was built from); see positions()
        self._tables: dict = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """ESPnet's init: Xavier-uniform u and v; ``linear_pos`` keeps nn.Linear's default."""
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)
        self.linear_pos.reset_parameters()
        self._tables = {}

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"

    def _apply(self, fn, *args, **kwargs):  # .to() / .half(): drop the kept tables
        self._tables = {}
        return super()._apply(fn, *args, **kwargs)

    # pickle / torch.save(module) / copy.deepcopy (EMA, export): without the kept tables, rebuilt on the next call
    # (one 4000-token call made a C = 256 layer's file 7x larger, with a second copy of linear_pos.weight that the
    # copy could never use)
    _copied_without = {"_tables": dict}

    def __setstate__(self, state):
        # layers pickled before the tables were kept per slot hold a single one as _table
        state = dict(state)
        state.pop("_table", None)
        state.setdefault("_tables", {})
        super().__setstate__(state)

    def _project(self, sinusoids_LC: torch.Tensor) -> torch.Tensor:
        length = sinusoids_LC.shape[0]
        return self.linear_pos(sinusoids_LC).view(length, self.num_heads, self.head_dim).transpose(0, 1)

    def positions(self, n_q: int, n_k: int, q_offset: int, like: torch.Tensor) -> torch.Tensor:
        """(H, Nq + Nk - 1, D) projected sinusoids p_r, r from q_offset + Nq - 1 down to q_offset - Nk + 1."""
        weight = self.linear_pos.weight
        top = q_offset + n_q - 1
        length = n_q + n_k - 1
        # With gradients enabled the table is never used, frozen weights included, so nothing built under
        # no_grad / inference_mode enters an autograd graph.
        if torch.is_grad_enabled() or is_tracing() or torch.onnx.is_in_onnx_export():
            sinusoids = relative_sinusoids(n_q, n_k, self.dim, q_offset=q_offset, device=like.device, dtype=like.dtype)
            return self._project(sinusoids)
        # Without gradients: one projected table over distances [-reach, reach], grown by doubling, per slot
        # (device, dtype, autocast dtype the projection runs under: a table built under autocast is in its dtype,
        # whatever q's), so a model served both with and without autocast keeps both. The entry holds the
        # weight's weights_stamp (an optimizer step or load_state_dict rebuilds it) and keeps the weight alive.
        # Threads may share the layer: the entry is read once into locals (another thread may store a smaller
        # table or another slot's meanwhile) and stored with cache_put (bounded, under masks._CACHE_LOCK).
        stamp = weights_stamp(weight, self.linear_pos.bias)
        slot = (like.device, like.dtype, autocast_dtype(like.device.type))
        reach = max(abs(top), abs(top - length + 1))
        entry = self._tables.get(slot)
        if entry is None or entry[0] != stamp or entry[1] < reach:
            new_reach = max(reach, 2 * entry[1] if entry is not None and entry[0] == stamp else 16)
            with torch.no_grad():
                sinusoids = relative_sinusoids(1, 2 * new_reach + 1, self.dim, q_offset=new_reach,
                                               device=like.device, dtype=like.dtype)
                entry = (stamp, new_reach, self._project(sinusoids), weights_kept_alive(weight, self.linear_pos.bias))
            kept = self._tables.get(slot)  # a larger table another thread stored meanwhile stays
            if kept is None or kept[0] != stamp or kept[1] < new_reach:
                cache_put(self._tables, slot, entry, limit=4)
        _, reach_kept, table_HRD, _ = entry
        start = reach_kept - top  # row of distance `top` (rows run from +reach down to -reach)
        return table_HRD[:, start:start + length]

    def forward(
        self, q_BHND: torch.Tensor, n_k: int, scale: float, q_offset: Optional[int] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries (B, H, Nq, D) at positions q_offset + i (default Nk - Nq) over Nk keys at 0..Nk-1.

        Returns (q + u (B, H, Nq, D), bias (B, H, Nq, Nk)); attend(q + u, k, v, bias=bias, scale=scale) is the
        Transformer-XL attention.
        """
        if not isinstance(q_BHND, torch.Tensor) or q_BHND.dim() != 4 or q_BHND.shape[1] != self.num_heads \
                or q_BHND.shape[3] != self.head_dim:
            shape = tuple(q_BHND.shape) if isinstance(q_BHND, torch.Tensor) else type(q_BHND).__name__
            raise ValueError(f"TransformerXLRelPos: queries must have shape (B, {self.num_heads}, Nq, "
                             f"{self.head_dim}), got {shape}")
        check_like_weights(q_BHND, self.linear_pos.weight, "TransformerXLRelPos: q", "TransformerXLRelPos")
        n_q = q_BHND.shape[2]
        if not is_tracing() and (not isinstance(n_k, int) or isinstance(n_k, bool) or n_k <= 0):
            raise ValueError(f"TransformerXLRelPos: n_k must be a positive int, got {n_k!r}")
        if q_offset is None:
            q_offset = n_k - n_q
        p_HLD = self.positions(n_q, n_k, q_offset, q_BHND)
        u_H1D = self.pos_bias_u.to(q_BHND.dtype).unsqueeze(1)
        v_H1D = self.pos_bias_v.to(q_BHND.dtype).unsqueeze(1)
        # the scale goes on the (B, H, Nq, D) queries, not on the (B, H, Nq, Nk) bias; in eager mode the shifted
        # bias is a strided view of the product (attention reads it once)
        bd_BHQL = torch.matmul((q_BHND + v_H1D) * scale, p_HLD.transpose(-1, -2))
        return q_BHND + u_H1D, rel_shift(bd_BHQL, n_k)
