"""ALiBi: attention with linear biases (Press, Smith, Lewis, "Train Short, Test Long: Attention with Linear
Biases Enables Input Length Extrapolation", ICLR 2022).

No position embedding; instead head h adds ``-m_h * distance`` to the score of every (query, key) pair, so
attention fades linearly (in log space) with distance and models extrapolate to longer inputs than they
were trained on. The slopes m_h are a fixed geometric sequence:

* H a power of two: m_h = 2 ** (-8 h / H), h = 1..H (H = 8: 1/2, 1/4, ..., 1/256);
* otherwise, with P the largest power of two below H (P < H < 2P): the P slopes of P heads, then the slopes of 2P heads
  at odd h (1, 3, 5, ...) for the H - P remaining heads, as the official code builds them
  (ofirpress/attention_with_linear_biases, fairseq/models/transformer.py, ``get_slopes``).

Distance follows FlashAttention's ``alibi_slopes`` (flash_attn_func: bias ``-m_h * |i + Nk - Nq - j|``):
queries are bottom-right aligned like every zoo mask, and the distance is absolute, so the bias also serves
bidirectional encoders; under a causal mask it is the paper's ``-m_h (i - j)``. The official causal code
adds ``m_h * j`` instead, which differs from this by a constant per row and so gives the same softmax.

:class:`ALiBi` is an :class:`~zoo.attention.AttentionBias`: ``attend(q, k, v, mask, bias=ALiBi(H))`` or
``MultiHeadAttention(..., rel_pos_bias=ALiBi(H))`` on every backend. The Triton kernel computes it from the
slopes inside its tiles (O(N) memory, as FlashAttention's ``alibi_slopes``; ``attend()`` hands it the object
when it selects that backend); the other backends get it materialised as a (1, H, Nq, Nk) tensor per call.
The slopes are a non-persistent buffer: state dicts do not change, and they get no gradient. The buffer is the
truth in every dtype: edited in place (``alibi.slopes.mul_(2)``) or reassigned, its values are used. A float64
bias, and a bias of a bf16 / fp16 module, computes a head whose entry still holds the constructor's slope (as
the buffer rounds it) from that slope's float64 value, so rounding the buffer costs no precision.

Over a KV cache the distance of a key is its index among the cached keys, the same for every batch row: pad a
batch of prompts of different lengths on the left (padding first), not on the right, or the shorter rows' new
tokens are scored as if the padding were tokens (MultiHeadAttention refuses a right-padded ``Segments`` mask).

Its head count must be the attention's: MultiHeadAttention refuses another as ``rel_pos_bias=`` or ``bias=``, and
``attend()`` refuses it too (a (1, 1, Nq, Nk) ``ALiBi(1)`` would broadcast its one slope to every head; pass
``materialize(Nq, Nk)``'s tensor for that).

Letters: H heads, Nq / Nk query / key lengths.
"""
from __future__ import annotations

import math

import torch

from zoo.attention.bias import AttentionBias
from zoo.layers import CachesDroppedWhenCopied, check_positive_int, is_tracing

__all__ = ["ALiBi", "alibi_slopes"]


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """float64 (H,) slopes of ALiBi for ``num_heads`` heads (see the module docstring)."""
    check_positive_int(num_heads, "alibi_slopes: num_heads")
    base = 2 ** int(math.floor(math.log2(num_heads)))  # largest power of two <= H
    h = torch.arange(1, base + 1, dtype=torch.float64)
    slopes = torch.pow(2.0, -8.0 * h / base)
    extra = num_heads - base
    if extra:
        odd = torch.arange(1, 2 * extra, 2, dtype=torch.float64)  # h = 1, 3, 5, ... of 2 * base heads
        slopes = torch.cat([slopes, torch.pow(2.0, -8.0 * odd / (2 * base))])
    return slopes


class ALiBi(CachesDroppedWhenCopied, AttentionBias):
    """ALiBi bias for ``num_heads`` heads: ``materialize(Nq, Nk)`` -> (1, H, Nq, Nk) with entries
    ``-slope[h] * |i + Nk - Nq - j|``. ``slopes``: custom per-head slopes (H,) instead of the paper's."""

    distance_only = True  # bottom-right aligned distances: exact over a KV cache

    def __init__(self, num_heads: int, slopes=None) -> None:
        super().__init__()
        if slopes is None:
            values = alibi_slopes(num_heads)
        else:
            check_positive_int(num_heads, "ALiBi: num_heads")
            values = torch.as_tensor(slopes, dtype=torch.float64)
            if values.shape != (num_heads,):
                raise ValueError(f"ALiBi: slopes must be {num_heads} numbers (one per head), got shape "
                                 f"{tuple(values.shape)}")
            if not bool(torch.isfinite(values).all()):
                raise ValueError(f"ALiBi: slopes must be finite, got {values.tolist()}")
        self.num_heads = num_heads
        self.register_buffer("slopes", values.float(), persistent=False)
        # a float64 bias takes the heads the buffer still holds from these (fp32 slopes are off by ~1e-8 relative)
        self._slopes_fp64 = values
        self._exact_slopes_cache: dict = {}

    def materialize(self, q_len: int, k_len: int, *, device=None, dtype=None) -> torch.Tensor:
        device = self.slopes.device if device is None else device
        exact = dtype == torch.float64 or self.slopes.dtype == torch.float64
        # .bfloat16() / .half() on the module rounds the buffer (bf16: 3 significant digits); the bias is still
        # computed from the exact slopes of the heads not edited since, in fp32 at least (the caller's dtype only
        # rounds the result)
        rounded = self.slopes.dtype not in (torch.float32, torch.float64)
        compute = torch.float64 if exact else torch.float32
        if exact or rounded:
            slopes = self._exact_slopes(device, compute)
        else:
            slopes = self.slopes.to(device, compute)
        i = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
        j = torch.arange(k_len, device=device)[None, :]
        distance = (i - j).abs().to(compute)
        bias = -slopes[:, None, None] * distance  # (H, Nq, Nk)
        return bias[None].to(dtype or compute)

    def _exact_slopes(self, device, dtype: torch.dtype) -> torch.Tensor:
        """The slopes in ``dtype`` on ``device``: per head, the float64 slope of the constructor while the buffer
        still holds it (as rounded to fp32 and then to the buffer's dtype, the way the constructor and .half() /
        .bfloat16() / .double() made it, or by way of bf16 / fp16: ``.half().float()`` leaves the fp16 rounding in
        an fp32 buffer), else the buffer's own value (an edit, in place or by assignment).
        Branch-free (no device sync, traceable). The float64 slopes and their unedited buffer values are kept per
        (device, dtype): they live on the CPU (a plain attribute, so .bfloat16() cannot round them), and a bf16 /
        fp16 module on CUDA copied them to the device at every call. Not cached while traced (no module state
        written under torch.compile)."""
        buffer = self.slopes.to(device)
        if is_tracing():  # first: Dynamo cannot trace the dict lookup on __dict__ (a graph break, fullgraph fails)
            exact, unedited = self._slopes_fp64.to(device, dtype), self._unedited_values(device, buffer.dtype)
        else:
            key = (str(device), dtype, buffer.dtype)
            cached = self._exact_slopes_cache.get(key)
            if cached is None:
                cached = (self._slopes_fp64.to(device, dtype), self._unedited_values(device, buffer.dtype))
                self._exact_slopes_cache = {**self._exact_slopes_cache, key: cached}
            exact, unedited = cached
        return torch.where((buffer == unedited).any(0), exact, buffer.to(dtype))

    def _unedited_values(self, device, buffer_dtype: torch.dtype) -> torch.Tensor:
        """(3, H): what the buffer holds for a head nobody edited, in ``buffer_dtype``: the fp32 slope, or its bf16 /
        fp16 rounding (the module went through .bfloat16() / .half(), and maybe back)."""
        fp32 = self._slopes_fp64.float()
        return torch.stack([fp32, fp32.bfloat16().float(), fp32.half().float()]).to(device, buffer_dtype)

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda(): the per-device copies go with the old device
        self._exact_slopes_cache = {}
        return super()._apply(fn, *args, **kwargs)

    # pickle / torch.save(module) / copy.deepcopy: without the per-device copies (rebuilt on the next call)
    _copied_without = {"_exact_slopes_cache": dict}

    def __setstate__(self, state):
        # a module pickled by an earlier version kept its copies in another form (one tensor per entry): dropped
        super().__setstate__({**state, "_exact_slopes_cache": {}})

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"
