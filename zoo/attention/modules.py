"""Attention modules built on :func:`zoo.attention.attend`: MultiHeadAttention and a timm-style Mlp.

MultiHeadAttention is the multi-head attention of Vaswani et al., "Attention Is All You Need" (NeurIPS
2017), with the options later models added:

* fused qkv projection with timm's parameter names and layout (``qkv``, ``q_norm``, ``k_norm``, ``proj``;
  qkv rows are [q; k; v] with the heads contiguous inside each; timm/layers/attention.py ``Attention``),
  so timm ViT state dicts load unchanged;
* grouped-query attention (Ainslie et al., "GQA", EMNLP 2023): ``num_kv_heads`` < ``num_heads``; the fused
  qkv then has rows [q (H*D); k (Hkv*D); v (Hkv*D)] and attend() serves the groups without copying k/v;
* cross attention (``kv_dim`` given): separate ``q`` and ``kv`` projections, ``forward(x, context)``;
* qk-norm (Dehghani et al., "Scaling Vision Transformers to 22 Billion Parameters", ICML 2023): a norm
  over the head dim of q and k;
* rotary position embeddings, 1D (RoFormer), 2D axial (RoPE-ViT) or 3D for video (Wan), see
  zoo/attention/rope.py;
* a relative position bias (any :class:`zoo.attention.AttentionBias`, e.g. Swin/MaxViT tables);
* Transformer-XL relative positions (``rel_pos="xl"``, the Conformer encoder's attention): a query-dependent
  score term, see zoo/attention/relpos_xl.py;
* sigmoid attention (Ramapuram et al., ICLR 2025) through ``score="sigmoid"``;
* incremental (autoregressive) decoding with a :class:`KVCache` per layer: self attention appends each
  step's keys/values (after qk-norm and RoPE: 1D positions continue from the cache length, 2D / 3D ones are
  given for each step's tokens) and attends over all of them; cross attention projects the context once. A
  decoder then costs O(new tokens x cached tokens) per step instead of re-running the whole prefix (speech and
  text decoders, autoregressive video).

Letters: B batch, N query tokens, M context (key) tokens, C model dim, H query heads, Hkv key/value heads,
D head dim.
"""
from __future__ import annotations

import math
import weakref
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.attention import capture as _capture
from zoo.attention.bias import AttentionBias, resolve_bias
from zoo.attention.core import attend
from zoo.attention.masks import (
    And, ChunkWindow, Edges, Mask, Or, SegmentChunkWindow, SegmentWindow, Segments, Window, as_mask,
)
from zoo.attention.relpos_xl import TransformerXLRelPos
from zoo.attention.rope import RotaryEmbedding
from zoo.layers import (
    activate_fresh, check_finite_input, check_flag, check_ints, check_like_weights, check_rates, is_exporting, is_int,
    is_tracing, surely_finite,
)

__all__ = ["MultiHeadAttention", "Mlp", "KVCache", "AttentionPoolLatent"]


class KVCache:
    """The keys and values one attention layer has seen, for incremental decoding with
    ``MultiHeadAttention(..., cache=cache)`` (one cache per layer and per decoding run).

    Self attention: every call appends its tokens' keys/values (B, Hkv, n, D) and returns all of them. The
    storage grows by doubling along the token axis, so appending one token at a time copies each key a bounded
    number of times. Cross attention: the first call stores the projected context; later calls reuse it
    (``context=None``, or the same context tensor).

    ``max_length`` bounds the memory of long streams (a rolling cache): after each call only the last
    ``max_length`` tokens are kept, so a call attends over at most ``max_length`` earlier tokens plus its own.
    That is exact for attention that never looks further back: Mistral's sliding window (``Window(w, 0)``
    with ``max_length=w``) and streaming speech encoders with limited left context (WeNet's attention
    cache, NeMo's cache-aware streaming: ``ChunkWindow(c, left=L)`` with ``max_length=L * c``, fed whole
    chunks of c tokens, so the kept tokens start on a chunk boundary). RoPE positions keep counting every
    token seen (``position``), not only the kept ones. MultiHeadAttention refuses a mask that looks back
    further than the bound (``Causal()``, ``ChunkWindow(c)`` included) or a ChunkWindow whose chunk size does
    not divide it; ``mask=None`` (one token per call) is the sliding window of the bound. Self attention only:
    a cross-attention cache keeps the whole context. A mask that looks ahead (``right`` above 0 or None) is
    refused with any cache: the keys it would see have not been fed yet.

    Cross attention counts the queries of its calls (``query_position``): they are one stream, as a decoder's
    tokens are, so RoPE leaves the stream's first ``num_prefix_tokens`` queries unrotated, not the first ones of
    every call. Masks that place a query by its index within the call (``Causal()``, ``Window``, ``ChunkWindow``,
    ``segments.window`` / ``chunk``) are refused there: nothing tells the layer where a call's queries sit in the
    whole query sequence; pass the call's rows of the whole pass's mask as a bool tensor instead.

    ``reorder(index)`` picks batch rows (beam search: the surviving beams); ``reset()`` empties the cache.
    For inference (``torch.no_grad()`` / ``inference_mode``): appending writes into the storage in place, so
    gradients do not flow through cached keys (train decoders on whole sequences with ``mask=Causal()``). A cache
    filled under ``inference_mode`` can be continued outside it (its storage is copied once to normal tensors).
    A call with a cache compiles (``torch.compile`` re-traces as the cache grows) but is refused while exporting
    (``torch.export``, ``torch.onnx.export``, ``torch.jit.trace``): the program would freeze the cache's state at
    the traced call; export the step with the past keys and values as explicit inputs and outputs instead.
    """

    def __init__(self, max_length: Optional[int] = None) -> None:
        if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool)
                                       or max_length < 1):
            raise ValueError(f"KVCache: max_length must be a positive int or None, got {max_length!r}")
        self.max_length = max_length
        self._k = self._v = None  # (B, Hkv, capacity, D)
        self._start = 0  # first live slot of the storage (a rolling cache drops tokens from the front)
        self.length = 0
        self.dropped = 0  # tokens dropped from the front: the cached token t is stream position dropped + t
        self.context = None  # cross attention: the context tensor whose projection is stored
        # cross attention: queries seen so far (the stream position of the next query; RoPE leaves the stream's
        # first num_prefix_tokens queries unrotated, not the first ones of every call)
        self.query_position = 0
        self._owner = None  # weakref to the layer that uses this cache (bound on its first call)

    def __getstate__(self) -> dict:
        # copy.deepcopy / pickle: a copy is not bound to a layer yet (a weakref cannot be pickled, and a copied one
        # still named the original layer, so the copy of a (layer, cache) pair refused its own layer); the first
        # layer that uses the copy owns it, as for a new cache
        state = dict(self.__dict__)
        state["_owner"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        # a cache pickled before query_position existed: its cross-attention queries were not counted
        self.__dict__.update({"query_position": 0, **state})

    def __len__(self) -> int:
        return self.length

    @property
    def position(self) -> int:
        """Tokens seen so far (kept and dropped): the stream position of the next token."""
        return self.dropped + self.length

    @property
    def keys(self) -> Optional[torch.Tensor]:
        return None if self._k is None else self._k[:, :, self._start : self._start + self.length]

    @property
    def values(self) -> Optional[torch.Tensor]:
        return None if self._v is None else self._v[:, :, self._start : self._start + self.length]

    def append(self, k_BHnD: torch.Tensor, v_BHnD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add n tokens' keys and values; returns the keys and values of every cached token and the new ones
        (views). With ``max_length``, the tokens beyond it are then dropped from the front (the returned views
        stay valid until the next append)."""
        for name, t in (("keys", k_BHnD), ("values", v_BHnD)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"KVCache: new {name} must be a (B, Hkv, n, D) tensor, got {shape}")
        if k_BHnD.shape[:3] != v_BHnD.shape[:3] or k_BHnD.dtype != v_BHnD.dtype:
            raise ValueError(f"KVCache: keys {tuple(k_BHnD.shape)} {k_BHnD.dtype} and values {tuple(v_BHnD.shape)} "
                             f"{v_BHnD.dtype} must share batch, heads, token count and dtype")
        n = k_BHnD.shape[2]
        if self._k is not None:
            if k_BHnD.shape[:2] != self._k.shape[:2] or k_BHnD.shape[3] != self._k.shape[3]:
                raise ValueError(
                    f"KVCache: new keys {tuple(k_BHnD.shape)} do not continue the cached "
                    f"{tuple(self.keys.shape)} (batch, heads and head dim must match; reorder() for beams)"
                )
            if k_BHnD.dtype != self._k.dtype or k_BHnD.device != self._k.device:
                raise ValueError(f"KVCache: new keys are {k_BHnD.dtype} on {k_BHnD.device}, the cache holds "
                                 f"{self._k.dtype} on {self._k.device}")
        if self._k is None or self._start + self.length + n > self._k.shape[2]:
            # Unbounded: grow by doubling. Rolling: room for twice the bound plus this call, the live tokens
            # (at most max_length) moved to the front, so the next move comes max_length tokens or more later.
            need = self.length + n
            if self.max_length is None:
                capacity = max(need, 2 * (0 if self._k is None else self._k.shape[2]), 16)
            else:
                capacity = max(need, 2 * self.max_length + n, 16)
            k_new = k_BHnD.new_empty(*k_BHnD.shape[:2], capacity, k_BHnD.shape[3])
            v_new = v_BHnD.new_empty(*v_BHnD.shape[:2], capacity, v_BHnD.shape[3])
            if self.length:
                k_new[:, :, : self.length] = self.keys
                v_new[:, :, : self.length] = self.values
            self._k, self._v, self._start = k_new, v_new, 0
        elif self._k.is_inference() and not torch.is_inference_mode_enabled():
            # filled under torch.inference_mode() (a prefill in Lightning's predict loop), continued outside it
            # (decoding under torch.no_grad()): torch refuses in-place writes to inference tensors there, so the
            # storage is copied once to normal tensors (the cost of one growth step) instead of refusing the call
            self._k, self._v = self._k.clone(), self._v.clone()
        end = self._start + self.length
        self._k[:, :, end : end + n] = k_BHnD
        self._v[:, :, end : end + n] = v_BHnD
        self.length += n
        keys, values = self.keys, self.values
        if self.max_length is not None and self.length > self.max_length:
            drop = self.length - self.max_length
            self._start, self.length, self.dropped = self._start + drop, self.max_length, self.dropped + drop
        return keys, values

    def _snapshot(self) -> tuple:
        """What :meth:`_restore` needs to undo the appends (or store) of a call that then failed: references
        only. An append writes past the live tokens (or into new storage), so the live ones stay intact."""
        return (self._k, self._v, self._start, self.length, self.dropped, self.context, self.query_position,
                self._owner)

    def _restore(self, state: tuple) -> None:
        (self._k, self._v, self._start, self.length, self.dropped, self.context, self.query_position,
         self._owner) = state

    def store(self, k_BHMD: torch.Tensor, v_BHMD: torch.Tensor, context: torch.Tensor) -> None:
        """Cross attention: keep the projected context (replacing what was there)."""
        self._k, self._v, self.length, self.context = k_BHMD, v_BHMD, k_BHMD.shape[2], context
        self._start = self.dropped = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the batch rows ``index`` (B') in that order, e.g. the beams that survive a search step."""
        if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.is_floating_point() or index.dtype == torch.bool:
            raise TypeError(f"KVCache.reorder: index must be a 1-D integer tensor of batch rows, got {index!r}")
        batch = None if self._k is None else self._k.shape[0]
        if batch is not None and index.numel() and not (-batch <= int(index.min()) and int(index.max()) < batch):
            raise ValueError(f"KVCache.reorder: index {index.tolist()} is out of range for the cached batch of {batch}")
        if batch is not None:
            index = torch.where(index < 0, index + batch, index)  # -1: the last row, as tensor indexing reads it
        if self._k is not None:
            self._k, self._v = self._k.index_select(0, index), self._v.index_select(0, index)
        if self.context is not None:
            self.context = self.context.index_select(0, index)

    def reset(self) -> None:
        self.__init__(self.max_length)

    def __repr__(self) -> str:
        shape = None if self._k is None else tuple(self.keys.shape)
        bound = "" if self.max_length is None else f", max_length={self.max_length}, position={self.position}"
        return f"KVCache(length={self.length}, keys={shape}{bound})"


class MultiHeadAttention(nn.Module):
    """Multi-head (self or cross) attention whose attention step is :func:`zoo.attention.attend`.

    Args:
        dim: C, width of the query input (and of the output).
        num_heads: H query heads.
        qkv_bias: bias in the q/k/v projections (timm ViT uses True).
        qk_norm: normalise q and k over the head dim with ``norm_layer`` before attention.
        attn_drop: dropout on the attention probabilities (training only).
        proj_drop: dropout after the output projection.
        num_kv_heads: Hkv key/value heads (grouped-query attention); default H.
        kv_dim: width of the context for cross attention; None makes this a self-attention module with a
            fused ``qkv`` projection, a number makes it cross attention with ``q`` and ``kv`` projections.
        head_dim: D; default ``dim // num_heads``.
        rope: None, "1d", "2d" or "3d" (video: frame, row, col) rotary position embedding on q and k.
        rope_theta: RoPE frequency base (default 10000 for 1d and 3d, 100 for 2d).
        rope_axes_dims: 3d RoPE only: head-dim channels per (frame, row, col) axis (default Wan's split).
        rel_pos_bias: an AttentionBias module added to the scores (owned by this module: its parameters
            are part of this module's state dict); one with a ``num_heads`` must have this module's.
        rel_pos: None or "xl": Transformer-XL relative positions (Dai et al. 2019; the attention of Conformer
            encoders), a :class:`TransformerXLRelPos` named ``rel_pos`` (``linear_pos``, ``pos_bias_u``,
            ``pos_bias_v``) whose sinusoids have the width ``dim``. Self attention only; not with RoPE. The
            new tokens of a call are the last ones (after a KV cache's), the first ones with num_queries.
            With a KV cache, a padded batch must be left-padded (as with ALiBi): distances are counted over the
            cached keys alike for every row, so a decode step after a right-padded ``Segments`` mask is refused
            (checked for ids on CPU only: on CUDA the check would sync the device at every step).
        score: "softmax" or "sigmoid".
        sigmoid_length: with score="sigmoid", the n of the bias b = -log(n) (Ramapuram et al.) as a fixed
            number. None (default): attend()'s -log(Nk) with Nk the keys of each call, so a KV cache's steps (1,
            2, ... keys) and padded keys score otherwise than the whole sequence; set it (e.g. to the training
            length) to make decoding step by step and padded batches equal the full, unpadded pass.
        norm_layer: norm constructor for qk-norm, called as ``norm_layer(head_dim)``.
        proj_bias: bias in the output projection.
        num_prefix_tokens: leading tokens (class/register tokens) that RoPE leaves unrotated. In cross attention
            the context's first ``num_prefix_tokens`` tokens are left unrotated too (one rotary module serves both
            sides), so context positions cover the others. With a :class:`KVCache` they are the stream's first
            tokens (self attention) or queries (cross attention): the first call holds them, later calls none.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        num_kv_heads: Optional[int] = None,
        kv_dim: Optional[int] = None,
        head_dim: Optional[int] = None,
        rope: Optional[str] = None,
        rope_theta: Optional[float] = None,
        rope_axes_dims: Optional[tuple] = None,
        rel_pos_bias: Optional[AttentionBias] = None,
        rel_pos: Optional[str] = None,
        score: str = "softmax",
        sigmoid_length: Optional[int] = None,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        proj_bias: bool = True,
        num_prefix_tokens: int = 0,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_ints(**{"MultiHeadAttention: dim": dim, "MultiHeadAttention: num_heads": num_heads,
                      "MultiHeadAttention: num_kv_heads": num_kv_heads})
        if num_heads % num_kv_heads:
            raise ValueError(
                f"MultiHeadAttention: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(
                    f"MultiHeadAttention: dim ({dim}) is not divisible by num_heads ({num_heads}); pass head_dim"
                )
            head_dim = dim // num_heads
        if not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"MultiHeadAttention: head_dim must be a positive int, got {head_dim!r}")
        if kv_dim is not None and (not isinstance(kv_dim, int) or kv_dim <= 0):
            raise ValueError(f"MultiHeadAttention: kv_dim must be a positive int or None, got {kv_dim!r}")
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"MultiHeadAttention: score must be 'softmax' or 'sigmoid', got {score!r}")
        check_rates(**{"MultiHeadAttention: attn_drop": attn_drop, "MultiHeadAttention: proj_drop": proj_drop})
        check_ints(0, **{"MultiHeadAttention: num_prefix_tokens": num_prefix_tokens})
        if rope is None and (rope_theta is not None or rope_axes_dims is not None):
            raise ValueError("MultiHeadAttention: rope_theta / rope_axes_dims were given but rope=None (pass "
                             "rope='1d', '2d' or '3d')")
        if rel_pos_bias is not None and not isinstance(rel_pos_bias, AttentionBias):
            raise TypeError(
                f"MultiHeadAttention: rel_pos_bias must be a zoo.attention.AttentionBias, got {type(rel_pos_bias).__name__}"
            )
        bias_heads = getattr(rel_pos_bias, "num_heads", None)
        if is_int(bias_heads) and bias_heads != num_heads:
            # a (1, h, Nq, Nk) bias broadcasts when h == 1: ALiBi(1) gave every head the one slope 1/256 silently
            raise ValueError(f"MultiHeadAttention: rel_pos_bias {type(rel_pos_bias).__name__} has {bias_heads} heads "
                             f"but this module has num_heads={num_heads}; build it with {num_heads} heads")
        if rope not in (None, "1d", "2d", "3d"):
            raise ValueError(f"MultiHeadAttention: rope must be None, '1d', '2d' or '3d', got {rope!r}")
        if rel_pos not in (None, "xl"):
            raise ValueError(f"MultiHeadAttention: rel_pos must be None or 'xl', got {rel_pos!r}")
        if rel_pos is not None and rope is not None:
            raise ValueError("MultiHeadAttention: choose one position scheme: rel_pos='xl' or rope, not both")
        if rel_pos is not None and kv_dim is not None:
            raise ValueError("MultiHeadAttention: rel_pos='xl' is for self attention (queries and keys on one "
                             "time axis); this module has kv_dim (cross attention)")

        self.dim = dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.kv_attn_dim = num_kv_heads * head_dim
        self.scale = head_dim**-0.5
        self.score = score
        if sigmoid_length is not None:
            if score != "sigmoid":
                raise ValueError(f"MultiHeadAttention: sigmoid_length is the n of sigmoid attention's -log(n) bias; "
                                 f"it needs score='sigmoid', got score={score!r}")
            check_ints(**{"MultiHeadAttention: sigmoid_length": sigmoid_length})
        self.sigmoid_length = sigmoid_length
        self.attn_drop = float(attn_drop)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.is_cross = kv_dim is not None
        self.kv_dim = kv_dim if kv_dim is not None else dim

        if self.is_cross:
            self.q = nn.Linear(dim, self.attn_dim, bias=qkv_bias)
            self.kv = nn.Linear(kv_dim, 2 * self.kv_attn_dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, self.attn_dim + 2 * self.kv_attn_dim, bias=qkv_bias)
        qk_norm = check_flag(qk_norm, "MultiHeadAttention: qk_norm")
        self.q_norm = norm_layer(head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim) if qk_norm else nn.Identity()
        self.rope = (
            RotaryEmbedding(head_dim, rope, theta=rope_theta, num_prefix_tokens=num_prefix_tokens,
                            axes_dims=rope_axes_dims) if rope else None
        )
        self.rel_pos_bias = rel_pos_bias
        self.rel_pos = TransformerXLRelPos(dim, num_heads, head_dim) if rel_pos == "xl" else None
        self.proj = nn.Linear(self.attn_dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        parts = [f"dim={self.dim}", f"num_heads={self.num_heads}", f"head_dim={self.head_dim}"]
        if self.num_kv_heads != self.num_heads:
            parts.append(f"num_kv_heads={self.num_kv_heads}")
        if self.is_cross:
            parts.append(f"kv_dim={self.kv_dim}")
        if self.score != "softmax":
            parts.append(f"score={self.score!r}")
        if self.sigmoid_length is not None:
            parts.append(f"sigmoid_length={self.sigmoid_length}")
        if self.attn_drop:
            parts.append(f"attn_drop={self.attn_drop}")
        return ", ".join(parts)

    # ------------------------------------------------------------------ helpers
    def _check_input(self, name: str, t, width: int) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"MultiHeadAttention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 3 or t.shape[-1] != width:
            letter = "M" if name == "context" else "N"
            raise ValueError(f"MultiHeadAttention: {name} must have shape (B, {letter}, {width}), got {tuple(t.shape)}")
        # (B, N, C) with B = 0 or N = 0 is accepted, as nn.MultiheadAttention and timm's Attention accept it:
        # attend() returns the empty output (no queries), or zeros (no keys: an empty context or sequence)
        if not t.is_floating_point():
            raise TypeError(f"MultiHeadAttention: {name} must be a floating-point tensor, got {t.dtype}")
        layer = (self.kv if name == "context" else self.q) if self.is_cross else self.qkv
        check_like_weights(t, layer.weight, f"MultiHeadAttention: {name}")

    def project(self, x_BNC: torch.Tensor, context_BMC: Optional[torch.Tensor] = None, num_queries: Optional[int] = None):
        """q (B, H, Nq, D), k and v (B, Hkv, M, D) after qk-norm (before RoPE). In cross attention without a
        context (its keys and values come from a :class:`KVCache`) k and v are None.

        ``num_queries`` (self attention only): only the first Nq tokens are projected to queries; keys and
        values still come from every token (the q rows of the fused weight are applied to those tokens only).
        """
        batch, n_tok, _ = x_BNC.shape
        if self.is_cross:
            q_BHND = self.q(x_BNC).view(batch, n_tok, self.num_heads, self.head_dim).transpose(1, 2)
            if context_BMC is None:
                return self.q_norm(q_BHND), None, None
            n_k = context_BMC.shape[1]
            kv = self.kv(context_BMC).view(batch, n_k, 2, self.num_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            k_BHMD, v_BHMD = kv.unbind(0)
        elif num_queries is not None:
            weight, bias = self.qkv.weight, self.qkv.bias
            a = self.attn_dim
            q_BNC = F.linear(x_BNC[:, :num_queries], weight[:a], None if bias is None else bias[:a])
            kv = F.linear(x_BNC, weight[a:], None if bias is None else bias[a:])
            kv = kv.view(batch, n_tok, 2, self.num_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q_BHND = q_BNC.view(batch, num_queries, self.num_heads, self.head_dim).transpose(1, 2)
            k_BHMD, v_BHMD = kv.unbind(0)
        elif self.num_kv_heads == self.num_heads:
            qkv = self.qkv(x_BNC).view(batch, n_tok, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q_BHND, k_BHMD, v_BHMD = qkv.unbind(0)
        else:
            qkv = self.qkv(x_BNC)
            q_BNC, k_BMC, v_BMC = qkv.split((self.attn_dim, self.kv_attn_dim, self.kv_attn_dim), dim=-1)
            q_BHND = q_BNC.reshape(batch, n_tok, self.num_heads, self.head_dim).transpose(1, 2)
            k_BHMD = k_BMC.reshape(batch, n_tok, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v_BHMD = v_BMC.reshape(batch, n_tok, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return self.q_norm(q_BHND), self.k_norm(k_BHMD), v_BHMD

    def _check_cache(self, cache, x_BNC: torch.Tensor, num_queries, positions) -> None:
        if not isinstance(cache, KVCache):
            raise TypeError(f"MultiHeadAttention: cache must be a zoo.attention.KVCache, got {type(cache).__name__}")
        if is_exporting():
            # first, before the cache is bound or written: an exported program runs the tensor ops only, so the
            # cache's Python state (its length, the growth of its storage) would be baked in at this call's values
            # and later steps would ignore the cache, while the cache itself kept the tracer's fake tensors (the
            # next eager step then failed inside torch); the grad check below would blame autograd instead
            raise RuntimeError("MultiHeadAttention: a KVCache cannot be exported (torch.export, torch.onnx.export, "
                               "torch.jit.trace); export the decode step with the past keys and values as explicit "
                               "inputs and outputs, or export the module without cache=")
        owner = None if cache._owner is None else cache._owner()
        if owner is None:  # unused (or reset, or its layer is gone): this layer's from now on
            cache._owner = weakref.ref(self)
        elif owner is not self:
            raise ValueError("MultiHeadAttention: this KVCache holds another layer's keys and values; use one "
                             "KVCache per layer (and reset() or a new cache for a new sequence)")
        if torch.is_grad_enabled() and (x_BNC.requires_grad or any(p.requires_grad for p in self.parameters())):
            # appending writes the cache's storage in place: backward would fail on a modified saved tensor
            raise RuntimeError("MultiHeadAttention: a KVCache is for inference; decode under torch.no_grad() or "
                               "torch.inference_mode() (train on whole sequences with mask=Causal())")
        if num_queries is not None:
            raise ValueError("MultiHeadAttention: num_queries cannot be combined with a cache")
        if self.is_cross and cache.max_length is not None:
            raise ValueError(f"MultiHeadAttention: KVCache(max_length={cache.max_length}) bounds a self-attention "
                             "stream, but this is cross attention, whose cache keeps the whole context: use KVCache()")
        if self.rel_pos_bias is not None and not self.rel_pos_bias.distance_only:
            raise ValueError(f"MultiHeadAttention: a KV cache with rel_pos_bias={type(self.rel_pos_bias).__name__} is "
                             "not supported (its tables are built for whole sequences; ALiBi, whose bias depends "
                             "on distances alone, is)")
        if self.rope is not None and self.rope.mode != "1d" and not self.is_cross:
            axes = "(frame, row, col)" if self.rope.mode == "3d" else "(row, col)"
            tensor = f"a (n, {len(axes.split(','))}) tensor"
            example = "(e.g. grid_positions(...)[start:stop] of the whole pass's grid)"
            rotates = x_BNC.shape[1] > self.num_prefix_tokens - cache.position  # (a call of prefix tokens alone: none)
            if positions is None and rotates:
                # 1D positions continue from cache.position; a 2D / 3D position (row, col) or (frame, row, col) cannot
                # be inferred from a token count (the whole pass needs them given too)
                raise ValueError(f"MultiHeadAttention: {self.rope.mode} RoPE with a KV cache needs positions= for the "
                                 f"new tokens at every call, {tensor} of their {axes} positions {example}: only 1D "
                                 f"RoPE continues its positions from cache.position")
            rotated_before = cache.position - self.num_prefix_tokens  # rotated tokens the stream has fed already
            if isinstance(positions, (tuple, list)) and rotated_before > 0:
                # a grid size is the grid from its origin: a later call's tokens were rotated as the grid's first row
                # (or frame) again, 0.07 off the whole pass; only a stream's first rotated tokens may start there
                raise ValueError(f"MultiHeadAttention: positions={tuple(positions)!r} is a grid size, which numbers "
                                 f"the call's tokens from the grid's origin, but the KV cache stream has already fed "
                                 f"{rotated_before} rotated tokens: pass {tensor} of the new tokens' {axes} "
                                 f"positions {example}")
        if len(cache) and cache.keys.shape[0] != x_BNC.shape[0]:
            raise ValueError(f"MultiHeadAttention: the cache holds batch {cache.keys.shape[0]} but x has batch "
                             f"{x_BNC.shape[0]} (KVCache.reorder selects beams)")

    @staticmethod
    def _check_stream(cache: KVCache, mask) -> None:
        """The conditions under which a self-attention KV cache gives the whole pass's result for a windowed
        mask (KVCache's docstring); otherwise the output would be silently wrong. Every Window / ChunkWindow
        inside an ``&`` / ``|`` combination (e.g. ``mask & Segments(...)`` for padding) is checked as a bare one.

        A mask that looks ahead (a Window, ChunkWindow or SegmentWindow with ``right`` above 0 or None) is refused:
        a call's queries would see future keys that the whole pass has and the stream has not fed yet (its last
        chunk's look-ahead was simply cut off: 0.40 to 0.45 off the whole pass). ``right=0`` is exact: a
        ChunkWindow's queries see only their own chunk ahead, which the same call feeds (whole chunks per call,
        checked below). ``a & b`` looks ahead only if both parts do; ``a | b`` if either does. ``segments.chunk``
        is refused first: a stream would have to feed whole chunks of every packed segment per call.
        ``segments.window(left, 0)`` is checked against a rolling cache as ``Window(left, 0)`` is (sequences packed
        back to back keep their latest keys together; ``segments.causal()`` looks back without limit)."""
        for part in _mask_parts(mask):
            # chunks counted per packed segment: a stream would have to feed whole chunks of every segment per call
            if isinstance(part, SegmentChunkWindow):
                raise ValueError(f"MultiHeadAttention: {part!r} counts chunks per packed segment, which a KV cache "
                                 f"stream does not follow: stream one sequence per batch row with "
                                 f"ChunkWindow({part.chunk_size}, left={part.left}) & Segments.from_lengths(lengths)")
        ahead = _look_ahead_leaf(mask)
        if ahead is not None and ahead is not _SAYS_NOTHING:
            if ahead.right is None:
                reach = "right=None: without limit"
            elif isinstance(ahead, ChunkWindow):
                reach = f"right={ahead.right}: {ahead.right} chunk(s) of {ahead.chunk_size} tokens"
            else:
                reach = f"right={ahead.right} tokens"
            if isinstance(ahead, ChunkWindow):
                zero_right = f"ChunkWindow({ahead.chunk_size}, left={ahead.left}, right=0)"
            elif isinstance(ahead, Window):
                zero_right = f"Window({ahead.left}, 0)"
            else:
                zero_right = f"segments.window({ahead.left}, 0)"
            raise ValueError(
                f"MultiHeadAttention: {ahead!r} looks ahead ({reach}), but with a KV cache the future keys have not "
                f"been fed when a call's queries attend, so the output would differ from the whole pass. A cache "
                f"needs right=0 (e.g. {zero_right}); for a streaming encoder with look-ahead, feed the look-ahead "
                f"frames and delay the outputs that need them; without a cache the mask works over the whole sequence")
        leaves = _window_leaves(mask)
        if not leaves:
            return
        if cache.max_length is not None:
            history, leaf = _needed_history(mask)
            if history == math.inf:
                # Causal(), Window(None, 0), ChunkWindow(c): the whole pass sees every earlier token, the rolling
                # cache only its last max_length (mask=None over a rolling cache is that sliding window, on purpose)
                if isinstance(leaf, Or):
                    bounded = ("& instead of |: a part without a window (Segments, a bool mask) joined by | sees "
                               "back to its segment's start")
                elif isinstance(leaf, Window):
                    bounded = f"Window({cache.max_length}, 0), the sliding window this cache holds"
                elif isinstance(leaf, SegmentWindow):
                    bounded = f"segments.window({cache.max_length}, 0), the sliding window this cache holds"
                else:
                    bounded = f"ChunkWindow({leaf.chunk_size}, left=L) with KVCache(max_length=L * {leaf.chunk_size})"
                raise ValueError(f"MultiHeadAttention: {leaf!r} looks back without limit but the KVCache keeps only "
                                 f"max_length={cache.max_length} tokens, so the output would differ from the whole "
                                 f"pass: give the mask a bounded left ({bounded}) or use KVCache() without max_length")
            if history is not None and history > cache.max_length:
                if isinstance(leaf, (Window, SegmentWindow)):
                    raise ValueError(f"MultiHeadAttention: {leaf!r} looks back {leaf.left} tokens but the KVCache "
                                     f"keeps max_length={cache.max_length}: use KVCache(max_length={leaf.left}) or more")
                raise ValueError(f"MultiHeadAttention: {leaf!r} looks back {leaf.left} chunks ({history} tokens) but "
                                 f"the KVCache keeps max_length={cache.max_length}: use KVCache(max_length={history})")
        for leaf in leaves:
            if not isinstance(leaf, ChunkWindow):
                continue
            chunk = leaf.chunk_size
            if len(cache) and cache.position % chunk:
                raise ValueError(f"MultiHeadAttention: the stream is at token {cache.position}, inside a chunk of "
                                 f"{chunk} ({leaf!r}): feed whole chunks; only the last call of a stream may be short")
            if cache.max_length is not None and cache.max_length % chunk:
                # the mask numbers chunks from the first kept key: once the cache rolls, that key must start a chunk
                fit = -(-cache.max_length // chunk) * chunk
                raise ValueError(f"MultiHeadAttention: {leaf!r} counts chunks of {chunk} tokens from the first kept "
                                 f"key, but KVCache(max_length={cache.max_length}) is not a multiple of {chunk}, so "
                                 f"the kept keys would start inside a chunk: use KVCache(max_length={fit})")

    def _check_padding_side(self, mask, bias, cache: KVCache, positions) -> None:
        """ALiBi (any distance-only bias) and rel_pos='xl' over a KV cache take a key's distance from its index
        among the cached keys, the same for every batch row: exact when each row's padding comes first (left
        padding), wrong for a right-padded batch (Segments.from_lengths' layout), whose new tokens sit after the
        padding of the shorter rows. 1D RoPE without ``positions`` does the same (its default positions continue
        from ``cache.position`` for every row: a right-padded row's new token was rotated as if its padding were
        tokens, 0.01 off its unpadded pass, silently); with per-row ``positions=(B, n)`` (e.g. ``lengths + step``)
        each row counts its own tokens and either padding side is exact, so those calls are not checked.
        A valid key after a gap of padded keys (negative ids) that follows a valid one, in a Segments part of
        ``mask``, is refused: the first call that would score the padding as distance (a right-padded prompt
        itself, or a streaming encoder's padded last chunk, is exact). Masks given as bool tensors are not
        inspected, nor anything under tracing. Ids on CPU only (on CUDA the answer would be a device sync per layer
        and decode step), and only once keys are cached (a first call is exact whatever its layout): on CPU it
        added about 60 us per decode step to a 32-wide 4-row toy layer (255 -> 323 us)."""
        distance_biases = [b for b in (self.rel_pos_bias, bias) if isinstance(b, AttentionBias) and b.distance_only]
        default_rope = self.rope is not None and self.rope.mode == "1d" and positions is None
        if (self.rel_pos is None and not distance_biases and not default_rope) or is_tracing() or len(cache) == 0:
            return
        for kv_ids in _segment_kv_ids(mask):
            if not kv_ids.is_cpu:
                continue
            valid = (kv_ids >= 0).reshape(-1, kv_ids.shape[-1]).to(torch.uint8)
            gap = (1 - valid) * valid.cummax(-1).values  # a padded key after a valid one
            if bool((valid * gap.cummax(-1).values).any()):  # ... followed by a valid one
                if self.rel_pos is not None:
                    scheme, fix = "rel_pos='xl'", "pad on the left"
                elif distance_biases:
                    scheme, fix = type(distance_biases[0]).__name__, "pad on the left"
                else:  # only the RoPE default positions count the padding: per-row positions fix it
                    scheme = "1D RoPE's default positions (continued from cache.position for every row)"
                    fix = ("pad on the left, or pass per-row positions=(B, n) of the new tokens (e.g. "
                           "(lengths + step)[:, None] for one token per row and step)")
                raise ValueError(f"MultiHeadAttention: with {scheme} and a KV cache, a batch must be left-padded "
                                 f"(padding before each row's tokens), but valid keys follow a row's padding: the "
                                 f"distances to them would count the padding; {fix}")

    def _combined_bias(self, bias, n_q: int, n_k: int, like: torch.Tensor):
        if self.rel_pos_bias is None:
            return bias
        if bias is None:
            return self.rel_pos_bias  # attend() materialises it (one code path for the checks)
        rel = self.rel_pos_bias.materialize(n_q, n_k, device=like.device, dtype=like.dtype)
        # the user's bias gets attend()'s checks before the sum (a bool tensor would add as 0/1)
        return rel + resolve_bias(bias, n_q, n_k, device=like.device, dtype=like.dtype)

    def _first_query_rows(self, mask, bias, n_q: int, n_tok: int, like: torch.Tensor):
        """With ``num_queries``: the mask and biases of the first ``n_q`` of the ``n_tok`` tokens. Masks and
        biases place Nq queries at the last Nq key positions (bottom-right, as for a KV cache), but these
        queries are the first tokens: their rows of the (n_tok, n_tok) pattern are taken instead. A tensor
        already shaped for the n_q queries (or broadcast over them) is kept as it is."""
        def for_queries(t) -> bool:
            return isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-2] in (1, n_q) and n_q != n_tok

        if isinstance(mask, Edges):  # its first rows stay an Edges mask (the O(E) edge backend serves them)
            mask = mask.first_queries(n_q)
        elif mask is not None and not for_queries(mask):
            mask = as_mask(mask)
            mask = None if mask.is_full else mask.dense(n_tok, n_tok, like.device, rows=(0, n_q))
        biases = [b for b in (self.rel_pos_bias, bias) if b is not None]
        total = None
        for b in biases:
            if for_queries(b):
                rows = resolve_bias(b, n_q, n_tok, device=like.device, dtype=like.dtype)
            else:
                rows = resolve_bias(b, n_tok, n_tok, device=like.device, dtype=like.dtype)[..., :n_q, :]
            total = rows if total is None else total + rows
        return mask, total

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        context: Optional[torch.Tensor] = None,
        mask: Union[Mask, torch.Tensor, None] = None,
        bias: Union[torch.Tensor, AttentionBias, None] = None,
        positions=None,
        num_queries: Optional[int] = None,
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """Attention of the tokens ``x_BNC`` over themselves (or over ``context`` (B, M, kv_dim)).

        Args:
            x: (B, N, dim) queries (and keys/values in self attention).
            context: (B, M, kv_dim) keys/values for cross attention; required iff ``kv_dim`` was given.
            mask: a zoo.attention mask or bool tensor (True = may attend), see attend().
            bias: additive score bias (tensor broadcastable to (B, H, N, M) or AttentionBias), added to
                ``rel_pos_bias`` when both are present. An AttentionBias with a ``num_heads`` (ALiBi) must have
                this module's, as ``rel_pos_bias`` must.
            positions: RoPE positions of the non-prefix tokens (see zoo/attention/rope.py); in cross
                attention the same positions apply to queries and keys unless a pair (q_pos, k_pos) is given
                (with no query to rotate, e.g. one class query, a single positions is the context's). A call that
                rotates no token takes positions for no token or None; others are refused.
                With a self-attention ``cache`` they are the new tokens' positions: 1D ones default to
                ``cache.position``, ``cache.position + 1``, ... (every token the stream has seen, the ones a rolling
                cache dropped included, less the prefix tokens), the same for every batch row, so a right-padded
                batch is refused once valid keys would follow a row's padding (as for ALiBi): pad on the left or
                pass per-row (B, n) positions; 2D / 3D RoPE needs them at every call as a tensor (e.g. the call's
                slice of the whole pass's ``grid_positions(frames, rows, cols)``; a grid size numbers the tokens
                from the origin, so only a stream's first rotated tokens may take one). Prefix tokens are the
                stream's first tokens: the first call holds them all, the positions cover the rotated ones. With a
                cross-attention ``cache`` the query positions are those of the call's rotated queries, the
                queries being counted over the calls (the first call holds the prefix queries).
            cache: a :class:`KVCache` for incremental decoding. Self attention attends over the cached tokens
                and these (pass ``mask=Causal()`` when a call adds several tokens: it is bottom-right aligned,
                so each new token sees the cache and the new tokens up to itself); cross attention projects
                ``context`` once and may then be called with ``context=None``. A mask that looks ahead (a Window,
                ChunkWindow or SegmentWindow with ``right`` > 0 or None, unless ``&`` with a part whose right is
                0) is refused: the keys it would see have not been fed yet. Cross attention refuses any Window /
                ChunkWindow / SegmentWindow part (``Causal()`` included): aligned to each call's queries, it
                differs from the whole pass; give the call's rows, ``mask.dense(N, M, rows=(start, stop))``.

        Returns:
            (B, N, dim).

        A call that raises (a mask of the wrong shape, a NaN input) leaves ``cache`` as it was, so the call can be
        retried exactly: the keys it appended are rolled back.
        """
        if cache is None or not isinstance(cache, KVCache):
            return self._forward(x, context, mask, bias, positions, num_queries, cache)
        state = cache._snapshot()
        try:
            return self._forward(x, context, mask, bias, positions, num_queries, cache)
        except BaseException:
            cache._restore(state)
            raise

    def _forward(self, x, context, mask, bias, positions, num_queries, cache) -> torch.Tensor:
        """forward() without the cache's rollback on failure."""
        x_BNC = x
        self._check_input("x", x_BNC, self.dim)
        stream_started = isinstance(cache, KVCache) and not self.is_cross and cache.position > 0
        if self.rope is not None and not self.is_cross and 0 < x_BNC.shape[1] < self.num_prefix_tokens \
                and not stream_started:
            # RoPE rotates the tokens after the prefix: with fewer tokens than the prefix it rotated none, silently
            # (a cross attention's queries may be fewer: one latent query against a context with a class token).
            # With a KV cache the prefix is the stream's first tokens: its first call holds all of them.
            raise ValueError(f"MultiHeadAttention: {x_BNC.shape[1]} tokens are fewer than num_prefix_tokens="
                             f"{self.num_prefix_tokens} (the leading tokens RoPE leaves unrotated; with a KV cache, "
                             f"the first call of a stream must hold all of them)")
        bias_heads = getattr(bias, "num_heads", None) if isinstance(bias, AttentionBias) else None
        if bias_heads is not None and is_int(bias_heads) and bias_heads != self.num_heads:
            # as for rel_pos_bias: a (1, 1, Nq, Nk) bias broadcasts, so ALiBi(1) gave every head the slope 1/256
            raise ValueError(f"MultiHeadAttention: bias {type(bias).__name__} has {bias_heads} heads but this module "
                             f"has num_heads={self.num_heads}; build it with {self.num_heads} heads")
        if cache is not None:
            self._check_cache(cache, x_BNC, num_queries, positions)
            if not self.is_cross:
                self._check_stream(cache, mask)
                self._check_padding_side(mask, bias, cache, positions)
            else:
                _check_cross_stream_mask(mask)
            if self.is_cross and self.rope is not None and positions is None:
                raise ValueError("MultiHeadAttention: cross attention with RoPE and a KV cache needs "
                                 "positions=(query positions, context positions) at every call: the cache "
                                 "continues positions for self attention only (each query would be rotated at 0)")
        # whether the cache holds a context, not its length: an empty context (B, 0, kv_dim) is stored with 0 keys
        cached_context = (
            cache is not None and self.is_cross and cache.context is not None
            and (context is None or context is cache.context)
        )
        if cached_context:
            context = cache.context
        if self.is_cross:
            if context is None:
                raise ValueError("MultiHeadAttention: this is a cross-attention module (kv_dim given); pass context")
            self._check_input("context", context, self.kv_dim)
            if context.shape[0] != x_BNC.shape[0]:
                raise ValueError(
                    f"MultiHeadAttention: batch of x ({x_BNC.shape[0]}) and context ({context.shape[0]}) differ"
                )
        elif context is not None:
            raise ValueError(
                "MultiHeadAttention: context given to a self-attention module; build it with kv_dim=... for cross attention"
            )
        if num_queries is not None:
            if self.is_cross:
                raise ValueError("MultiHeadAttention: num_queries applies to self attention only")
            if self.rope is not None:
                raise ValueError("MultiHeadAttention: num_queries cannot be combined with RoPE")
            if not isinstance(num_queries, int) or not 1 <= num_queries <= x_BNC.shape[1]:
                raise ValueError(f"MultiHeadAttention: num_queries must be an int in [1, {x_BNC.shape[1]}], got {num_queries!r}")
        q_BHND, k_BHMD, v_BHMD = self.project(x_BNC, None if cached_context else context, num_queries)
        if cached_context:  # the keys and values of the context are in the cache
            k_BHMD, v_BHMD = cache.keys, cache.values
        batch, n_q = x_BNC.shape[0], q_BHND.shape[2]
        if self.rope is not None and cache is not None and not self.is_cross:
            # the prefix tokens RoPE leaves unrotated are the stream's first tokens: the first call holds them all
            # (checked above), later calls none
            prefix = max(0, self.num_prefix_tokens - cache.position)
            if positions is None and self.rope.mode == "1d":  # the rotated tokens' count continues (2D / 3D need
                # positions, checked, unless the call holds prefix tokens alone)
                start = cache.position + prefix - self.num_prefix_tokens
                positions = torch.arange(start, start + max(0, n_q - prefix), device=x_BNC.device)
            q_BHND = self.rope(q_BHND, positions, num_prefix_tokens=prefix)
            k_BHMD = self.rope(k_BHMD, positions, num_prefix_tokens=prefix)
        elif self.rope is not None:
            q_pos, k_pos, shared = positions, positions, True
            if self.is_cross and isinstance(positions, tuple) and len(positions) == 2 and not is_int(positions[0]):
                (q_pos, k_pos), shared = positions, False
            # with a cache the queries form one stream over the calls (a decoder's tokens), as a self-attention
            # cache's tokens do: the unrotated prefix queries are the stream's first ones, later calls hold none
            # (every call re-treating its first queries as prefix was 0.19 off the whole pass)
            q_prefix = self.num_prefix_tokens
            if cache is not None:
                q_prefix = max(0, q_prefix - cache.query_position)
            if shared and self.is_cross and n_q <= q_prefix:
                # one positions for both sides, and no query to rotate (a class / latent query): they are the
                # context's (an explicit pair's query positions are checked against the rotated queries: none)
                q_pos = None
            q_BHND = self.rope(q_BHND, q_pos, num_prefix_tokens=q_prefix)
            if not cached_context:
                k_BHMD = self.rope(k_BHMD, k_pos)
        elif positions is not None:
            raise ValueError("MultiHeadAttention: positions given but this module has no RoPE (rope=None)")
        if cache is not None and not cached_context:
            if self.is_cross:
                cache.store(k_BHMD, v_BHMD, context)
            else:
                k_BHMD, v_BHMD = cache.append(k_BHMD, v_BHMD)
        if cache is not None and self.is_cross:
            cache.query_position += n_q  # (rolled back with the rest of the cache if this call fails)
        n_k = k_BHMD.shape[2]
        if num_queries is not None and num_queries < n_k:
            mask, bias = self._first_query_rows(mask, bias, n_q, n_k, q_BHND)
        else:
            bias = self._combined_bias(bias, n_q, n_k, q_BHND)
        if self.rel_pos is not None and n_q > 0 and n_k > 0:  # (nothing to score: attend() returns the empty output)
            # queries q + u, and the (b) + (d) terms as a bias: the new tokens are the last n_q of the n_k keys
            # (a KV cache's first), or the first n_q with num_queries
            q_BHND, xl_bias = self.rel_pos(q_BHND, n_k, self.scale, q_offset=0 if num_queries is not None else None)
            if bias is not None:  # attend()'s checks before the sum (a bool tensor would add as 0/1)
                bias = resolve_bias(bias, n_q, n_k, device=q_BHND.device, dtype=q_BHND.dtype)
            bias = xl_bias if bias is None else xl_bias + bias
        if self.sigmoid_length is not None and n_k != self.sigmoid_length and n_k > 0:
            # attend() subtracts log(Nk); the fixed -log(n) is log(Nk / n) more
            shift = torch.full((1, 1, 1, 1), math.log(n_k / self.sigmoid_length), device=q_BHND.device, dtype=q_BHND.dtype)
            bias = shift if bias is None else resolve_bias(bias, n_q, n_k, device=q_BHND.device, dtype=q_BHND.dtype) + shift
        dropout_p = self.attn_drop if self.training else 0.0
        # attend()'s per-call NaN/Inf check reduces its strided q and k views (~30 us at 197 tokens); the module
        # checks its own contiguous input and output instead (one dot product x . out), below
        if _capture.is_capturing():
            out_BHND, weights = attend(
                q_BHND, k_BHMD, v_BHMD, mask, bias, scale=self.scale, score=self.score, dropout_p=dropout_p,
                return_weights=True, check_finite=False,
            )
            _capture.record(self, weights)
        else:
            out_BHND = attend(q_BHND, k_BHMD, v_BHMD, mask, bias, scale=self.scale, score=self.score,
                              dropout_p=dropout_p, check_finite=False)
        out_BNHD = out_BHND.transpose(1, 2)
        if is_tracing() or torch.onnx.is_in_onnx_export():
            # exporters may decompose attention into another output layout (rel_pos="xl" through the dynamo ONNX
            # exporter: strides (352, 8, 88, 1) for (2, 11, 4, 8), which its reshape cannot view): never assume a
            # view while tracing, as zoo/attention/agent.py does before its head merge (eager keeps the view)
            out_BNHD = out_BNHD.clone(memory_format=torch.contiguous_format)
        out_BNC = self.proj_drop(self.proj(out_BNHD.reshape(batch, n_q, self.attn_dim)))
        check_module_output(self, "MultiHeadAttention", out_BNC, x=x_BNC, context=context)
        return out_BNC


def _mask_parts(mask) -> list:
    """The masks ``mask`` combines through any ``&`` / ``|`` (itself when it combines none)."""
    if isinstance(mask, (And, Or)):
        return _mask_parts(mask.a) + _mask_parts(mask.b)
    return [mask]


def _check_cross_stream_mask(mask) -> None:
    """Cross attention over a KV cache: refuse a mask that places a call's queries by their index (Window, Causal,
    ChunkWindow, SegmentWindow, SegmentChunkWindow: bottom-right aligned to the call's Nq queries). Nothing tells
    the layer where a call's queries sit among the whole query sequence (a self-attention cache's length does), so
    a lone query saw the whole context under Causal() (0.46 off the whole pass decoded token by token; Window(1, 0):
    1.07). Masks that do not depend on the query index (Segments, KeyPadding, a bool tensor) are the caller's per
    call and pass."""
    for part in _mask_parts(mask):
        if isinstance(part, (Window, ChunkWindow, SegmentWindow, SegmentChunkWindow)):
            raise ValueError(
                f"MultiHeadAttention: {part!r} places each query by its index, bottom-right aligned to the call's "
                f"queries, but a cross-attention KV cache does not know where a call's queries sit among the whole "
                f"query sequence, so the output would differ from the whole pass: pass the call's rows of the "
                f"whole pass's mask as a bool tensor (mask.dense(N, M, rows=(start, stop)) for queries start..stop "
                f"of N), or a mask that ignores query positions (Segments, KeyPadding), or call without a cache")


def _window_leaves(mask) -> list:
    """The Window / ChunkWindow / SegmentWindow parts of ``mask`` (the others, e.g. Segments or a bool tensor, say
    nothing about how far back a query looks)."""
    return [part for part in _mask_parts(mask) if isinstance(part, (Window, ChunkWindow, SegmentWindow))]


_SAYS_NOTHING = object()  # a mask part that does not say how far ahead a query looks (Segments, a bool tensor)


def _look_ahead_leaf(mask):
    """The Window / ChunkWindow / SegmentWindow part of ``mask`` that lets a call's queries see keys a KV cache
    stream has not fed yet (``right`` above 0 or None), None when ``mask`` sees nothing ahead of that, or
    _SAYS_NOTHING when no part bounds it either way. ``a & b`` looks ahead only when both parts do (a part with
    right=0 bounds the intersection; a part that says nothing leaves it to the other); ``a | b`` when either does."""
    if isinstance(mask, (And, Or)):
        a, b = _look_ahead_leaf(mask.a), _look_ahead_leaf(mask.b)
        if isinstance(mask, And) and (a is None or b is None):
            return None
        for part in (a, b):
            if part is not None and part is not _SAYS_NOTHING:
                return part
        return None if a is None or b is None else _SAYS_NOTHING
    if isinstance(mask, (Window, ChunkWindow, SegmentWindow)):
        return None if mask.right is not None and mask.right <= 0 else mask
    return _SAYS_NOTHING


def _segment_kv_ids(mask) -> list:
    """The key ids of every Segments (or SegmentWindow) part of ``mask``."""
    parts = (part.segments if isinstance(part, SegmentWindow) else part for part in _mask_parts(mask))
    return [part.kv_ids for part in parts if isinstance(part, Segments)]


def _needed_history(mask) -> tuple:
    """(tokens, leaf): how many earlier tokens a call's first query may see under ``mask`` (chunk-aligned calls
    for a ChunkWindow: ``left * chunk_size``), math.inf when unbounded, None when no Window / ChunkWindow
    bounds it; ``leaf`` is the part that sets the number. ``a & b`` needs the smaller history of the two (the
    tighter window excludes the rest), ``a | b`` the larger."""
    if isinstance(mask, (And, Or)):
        both = (_needed_history(mask.a), _needed_history(mask.b))
        parts = [p for p in both if p[0] is not None]
        if not parts:
            return None, None
        if isinstance(mask, Or) and len(parts) < 2:
            # a | b where b has no window (Segments, a bool tensor): b reaches back to its segment's start, so the
            # union looks back without limit (Window(4, 0) | Segments(...) over max_length=4 was 0.82 off); the
            # union is what the error names
            return math.inf, mask
        pick = min if isinstance(mask, And) else max
        return pick(parts, key=lambda p: p[0])
    if isinstance(mask, (Window, SegmentWindow)):  # SegmentWindow: left counts its segment's tokens
        return (math.inf if mask.left is None else mask.left), mask
    if isinstance(mask, ChunkWindow):
        return (math.inf if mask.left is None else mask.left * mask.chunk_size), mask
    return None, None


def check_module_output(module: nn.Module, what: str, out: torch.Tensor, **inputs: Optional[torch.Tensor]) -> None:
    """A module's NaN/Inf check, in place of attend()'s per call: one dot product of its first input with its
    output (contiguous, same size: a BLAS dot; else two sums) on CPU, outside tracing. When the output is not
    finite, the input at fault is named, else the module's non-finite weights, else an overflow. attend()'s own
    check reduces q . out and k . k, which are strided views of a fused qkv projection in these modules
    (about 30 us per call at 197 tokens, against about 5 us here)."""
    first = next(iter(inputs.values()))
    if not out.is_cpu or is_tracing() or surely_finite(first, out):
        return
    for name, t in inputs.items():
        if t is not None:
            check_finite_input(t, f"{what}: {name}")
    if not bool(torch.isfinite(out).all()):
        bad = [n for n, p in module.named_parameters() if not bool(torch.isfinite(p).all())]
        raise ValueError(f"{what}: the output is not finite although the input is: "
                         + (f"non-finite weights in {bad[:4]}" if bad else f"an overflow (inputs too large for "
                            f"{out.dtype}?)"))


class Mlp(nn.Module):
    """Two-layer MLP of the transformer block (timm/layers/mlp.py ``Mlp`` names: fc1, act, fc2)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        bias: bool = True,
        drop: float = 0.0,
    ):
        super().__init__()
        if hidden_features is not None and hidden_features < 1 or out_features is not None and out_features < 1:
            raise ValueError(f"Mlp: hidden_features ({hidden_features}) and out_features ({out_features}) must be >= 1 "
                             f"(None: in_features)")
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features): fc1, activation, dropout, fc2, dropout."""
        x_BNC = x
        # At inference the activation runs in place on fc1's fresh output (zoo.layers.activate_fresh): the hidden
        # activation is the largest tensor of the block (Agent-DeiT-Ti at 448 px, batch 1: 64.7 -> 48.0 ms per
        # forward in one interleaved run; docs/bench_agent.md).
        hidden_BNF = self.fc1(x_BNC)
        # (an fc1 swapped for nn.Identity would hand back the input itself: never overwrite the caller's tensor)
        hidden_BNF = self.act(hidden_BNF) if hidden_BNF is x_BNC else activate_fresh(self.act, hidden_BNF, self.fc1)
        return self.drop2(self.fc2(self.drop1(hidden_BNF)))


class AttentionPoolLatent(nn.Module):
    """Attention pooling with a learned latent query ("MAP" head): the latent attends over the tokens, then a
    residual MLP -- SigLIP's pooling (Zhai et al., ICCV 2023; big_vision's MAPHead), with the names and
    semantics of timm/layers/attention_pool.py ``AttentionPoolLatent`` (latent, q, kv, proj, norm, mlp), so a
    timm state dict loads. The attention is :func:`attend` (any backend, masks for padded tokens).

    Args:
        dim: token width (also the output width).
        num_heads: heads of the pooling attention (dim % num_heads == 0).
        mlp_ratio: hidden ratio of the residual MLP.
        latent_len: number of latent queries; the output is the first one's (timm's ``pool_type="token"``).
        qkv_bias: biases of the q and kv projections.
        norm_eps: the LayerNorm before the MLP.

    timm's ``AttentionPoolLatent`` has this norm only when built with ``norm_layer`` (timm's ViTs pass their
    LayerNorm, eps 1e-6, as SigLIP's MAP head); a bare timm module (``norm_layer=None``) has no ``norm.*`` keys,
    so its state dict loads only into a zoo module whose norm is then the identity (``pool.norm =
    nn.Identity()`` before loading).

    forward(x (B, N, dim), mask=None) -> (B, dim). ``mask``: what attend() takes for latent_len queries over
    the N tokens, e.g. the padding of a variable-length batch as a bool (B, 1, 1, N) tensor (True: attend).
    """

    def __init__(self, dim: int, num_heads: int = 8, mlp_ratio: float = 4.0, latent_len: int = 1,
                 qkv_bias: bool = True, norm_eps: float = 1e-6, act_layer: Callable[[], nn.Module] = nn.GELU):
        super().__init__()
        check_ints(dim=dim, num_heads=num_heads, latent_len=latent_len)
        if dim % num_heads:
            raise ValueError(f"AttentionPoolLatent: dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim, self.num_heads, self.head_dim, self.latent_len = dim, num_heads, dim // num_heads, latent_len
        self.latent = nn.Parameter(torch.zeros(1, latent_len, dim))
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)
        nn.init.trunc_normal_(self.latent, std=dim ** -0.5)

    def forward(self, x: torch.Tensor, mask: Union[Mask, torch.Tensor, None] = None) -> torch.Tensor:
        """(B, N, dim) tokens -> (B, dim), the first latent's output; ``mask`` as attend() takes it for the
        latent queries over the N tokens (a (B, N) key-padding mask as mask[:, None, None, :])."""
        x_BNC = x
        if not isinstance(x_BNC, torch.Tensor) or x_BNC.dim() != 3 or x_BNC.shape[-1] != self.dim:
            raise ValueError(f"AttentionPoolLatent: input must be (B, N, {self.dim}) tokens, got "
                             f"{tuple(x_BNC.shape) if isinstance(x_BNC, torch.Tensor) else type(x_BNC).__name__}")
        if not x_BNC.is_floating_point():
            raise TypeError(f"AttentionPoolLatent: input must be a floating-point tensor, got {x_BNC.dtype}")
        check_like_weights(x_BNC, self.kv.weight, "AttentionPoolLatent: input")
        check_finite_input(x_BNC, "AttentionPoolLatent: input")
        batch, n_tok, _ = x_BNC.shape
        heads, head_dim = self.num_heads, self.head_dim
        q_BHLD = self.q(self.latent).view(1, self.latent_len, heads, head_dim).transpose(1, 2).expand(batch, -1, -1, -1)
        kv_BN2HD = self.kv(x_BNC).view(batch, n_tok, 2, heads, head_dim)
        k_BHND, v_BHND = kv_BN2HD[:, :, 0].transpose(1, 2), kv_BN2HD[:, :, 1].transpose(1, 2)
        out_BHLD = attend(q_BHLD, k_BHND, v_BHND, mask=mask)
        x_BLC = self.proj(out_BHLD.transpose(1, 2).reshape(batch, self.latent_len, self.dim))
        x_BLC = x_BLC + self.mlp(self.norm(x_BLC))
        return x_BLC[:, 0]
