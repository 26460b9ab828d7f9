"""``attend()``: the one attention call every model in the zoo makes, and its reference backend.

    out = attend(q, k, v, mask=None, bias=None, *, scale=None, score="softmax", dropout_p=0.0,
                 return_weights=False, return_lse=False, backend=None)

Letters: B batch, H query heads, Hkv key/value heads (H % Hkv == 0, grouped-query attention), G = H // Hkv
query heads per key/value head, Nq/Nk query/key lengths, D head dim of q and k, Dv head dim of v,
R a chunk of query rows.

Scores:
* ``"softmax"``: out_i = sum_j softmax_j(scale * q_i.k_j + bias_ij over allowed j) v_j. A query row
  with no allowed key returns zeros (not NaN), with zero gradients.
* ``"sigmoid"``: out_i = sum_j sigmoid(scale * q_i.k_j + bias_ij - log(Nk)) v_j over allowed j, no
  normalisation -- sigmoid self-attention with the bias b = -log(n) recommended by Ramapuram et al.,
  "Theory, Analysis, and Best Practices for Sigmoid Self-Attention" (ICLR 2025). Add ``log(Nk)`` to
  ``bias`` for a plain sigmoid.

The reference backend ("torch") works on any device with autograd, and automatic selection falls back to it on
device types no faster backend lists (zoo.attention.backends: ``auto_devices``). It processes the queries in chunks
of R rows so that the working set is O(B * H * R * Nk) rather than O(B * H * Nq * Nk); when gradients
are needed each chunk is recomputed in backward (activation checkpointing), so training memory is
bounded the same way.

Log-sum-exp (``return_lse=True``, softmax): lse_i = log sum_j exp(scale * q_i.k_j + bias_ij) over the allowed j,
the softmax's normaliser, as FlashAttention's ``softmax_lse`` and FlexAttention's ``return_lse`` give it. Two
attend() calls over disjoint key sets merge into the attention over their union with
:func:`merge_attention_states` (chunked prefill over a KV cache, ring / context-parallel attention), gradients
included, since the LSE is differentiable.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from zoo.attention import backends as _backends
from zoo.attention.alibi import ALiBi
from zoo.attention.bias import AttentionBias, resolve_bias
from zoo.attention.masks import Mask, as_mask
from zoo.layers import (
    autocast_dtype, autocast_off, check_finite_input, check_flag, exp_flushed_, in_torch_func, is_tracing, python_size,
    surely_finite,
)

__all__ = ["attend", "attention_reference", "merge_attention_states", "SCORES"]

SCORES = ("softmax", "sigmoid")

# Number of score elements (B * H * R * Nk) a chunk may hold in the reference backend.
CHUNK_ELEMENTS = int(os.environ.get("ZOO_ATTN_CHUNK_ELEMENTS", 1 << 23))



def _validate(q, k, v, score, dropout_p, scale, allow_empty: bool = False) -> None:
    """attend()'s argument checks (shared with zoo.attention.sparse.block_sparse_attention). ``allow_empty``:
    accept a batch of 0, Nq = 0 or Nk = 0 (attend() computes those itself, see _empty_attention); heads and head
    dims must be at least 1 either way."""
    if not (
        isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
        and q.dim() == 4 and k.dim() == 4 and v.dim() == 4
    ):
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"attend: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(
                    f"attend: {name} must have 4 dims (batch, heads, length, head_dim), got shape {tuple(t.shape)}"
                )
    dtype = q.dtype
    if not (dtype is k.dtype and dtype is v.dtype):
        raise TypeError(f"attend: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not dtype.is_floating_point:
        raise TypeError(f"attend: q, k, v must be floating-point tensors, got {dtype}")
    device = q.device
    if not (device == k.device and device == v.device):
        raise ValueError(f"attend: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    (b, h, _, d), (bk, hk, nk, dk), (bv, hv, nv, _) = q.shape, k.shape, v.shape
    if not (b == bk == bv):
        raise ValueError(f"attend: batch sizes differ: q {b}, k {bk}, v {bv}")
    if hk != hv or nk != nv:
        raise ValueError(f"attend: k {tuple(k.shape)} and v {tuple(v.shape)} must agree on heads and length")
    if hk == 0 or h % hk != 0:
        raise ValueError(
            f"attend: query heads ({h}) must be a multiple of key/value heads ({hk}) for grouped-query attention"
        )
    if d != dk:
        raise ValueError(f"attend: q head dim {d} != k head dim {dk}")
    if h == 0 or d == 0 or v.shape[-1] == 0:  # (hk == 0 is refused above)
        raise ValueError(f"attend: q, k, v need at least one head and head dims of at least 1 (a batch of 0, Nq = 0 "
                         f"or Nk = 0 is accepted), got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not allow_empty and (b == 0 or q.shape[2] == 0 or nk == 0):
        raise ValueError(f"attend: empty input (q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)})")
    if score not in SCORES:
        raise ValueError(f"attend: score must be one of {SCORES}, got {score!r}")
    if isinstance(dropout_p, bool) or not (isinstance(dropout_p, numbers.Real) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"attend: dropout_p must be in [0, 1), got {dropout_p!r}")
    if scale is not None:
        _check_scale(scale)


def _check_scale(scale) -> None:
    """``scale``: any finite real number -- zero (uniform weights over the allowed keys) and negative values
    included, as SDPA computes them -- or a 0-d real tensor, which attend() reads with float() as SDPA does."""
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 0 or scale.dtype == torch.bool or scale.is_complex():
            raise TypeError(f"attend: scale must be a real number or a 0-d real tensor, got a {scale.dtype} tensor "
                            f"of shape {tuple(scale.shape)}")
        if is_tracing() and not in_torch_func():
            # float() of a traced tensor is data-dependent: a graph break under torch.compile, an error under export
            raise TypeError("attend: scale is a tensor; under torch.compile / torch.export / jit tracing pass a Python "
                            "float (float(scale) outside the traced code)")
        if scale.requires_grad and torch.is_grad_enabled():
            # SDPA reads the value and drops the gradient silently; a learned temperature would never learn
            raise ValueError("attend: scale is a tensor that requires grad, but attend() takes its value only (no "
                             "gradient would reach it): scale q instead (attend(q * scale, k, v, scale=1.0)), or "
                             "pass scale.detach()")
        scale = float(scale)
    # numpy floats are numbers too; True is not. Comparisons rather than math.isfinite, which Dynamo cannot
    # trace on the symbolic float a module's scale becomes under torch.compile(dynamic=True); NaN fails both.
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"attend: scale must be a real number (or a 0-d tensor), got {type(scale).__name__} {scale!r}")
    if not -math.inf < scale < math.inf:
        raise ValueError(f"attend: scale must be a finite number, got {scale!r}")


def _check_finite(**inputs) -> None:
    """Raise naming the first input that holds NaN or Inf (zoo.layers.check_finite_input per tensor)."""
    for name, t in inputs.items():
        check_finite_input(t, f"attend: {name}")


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Union[Mask, torch.Tensor, None] = None,
    bias: Union[torch.Tensor, AttentionBias, None] = None,
    *,
    scale: Optional[float] = None,
    score: str = "softmax",
    dropout_p: float = 0.0,
    return_weights: bool = False,
    return_lse: bool = False,
    backend: Optional[str] = None,
    check_finite: bool = True,
):
    """Attention of q over (k, v), restricted by ``mask`` and shifted by ``bias``.

    Args:
        q: (B, H, Nq, D). k: (B, Hkv, Nk, D). v: (B, Hkv, Nk, Dv). H must be a multiple of Hkv. B, Nq and Nk may be
            0, as in SDPA: the output is then empty, or zeros (B, H, Nq, Dv) when Nk = 0 (no key to attend to), with
            zero or empty gradients; H, Hkv, D and Dv must be at least 1.
        mask: a mask object (Full, Causal, Window, ChunkWindow, Segments, SegmentWindow, SegmentChunkWindow,
            KeyPadding, Dense, BlockSparse, Radial, MaskMod, and their ``&``/``|`` combinations), a bool tensor
            (True = may attend) or None.
        bias: additive float tensor broadcastable to (B, H, Nq, Nk), or an AttentionBias object.
        scale: score scale, default 1/sqrt(D): any finite real number (0 gives uniform weights over the allowed
            keys; negative values are computed too, as SDPA does), or a 0-d tensor, read with float() as SDPA reads
            it (so no gradient reaches it: one that requires grad is refused; under torch.compile / export pass a
            Python float).
        score: "softmax" or "sigmoid" (see module docstring).
        dropout_p: dropout on the attention probabilities (pass 0.0 in evaluation).
        return_weights: also return the probabilities (B, H, Nq, Nk) (pre-dropout; reference backend).
        return_lse: also return the row log-sum-exp (B, H, Nq): log sum_j exp(scale * q.k_j + bias_j) over the
            allowed keys, natural log, fp32 for fp16 / bf16 inputs (the input dtype otherwise), -inf for a row with
            no allowed key, differentiable; with dropout, that of the scores before dropout. Softmax only, and not
            together with ``return_weights`` (the weights are exp(scores - lse)). Served by the backends that
            give it ("torch", "blocksparse", "triton"; not "sdpa": such a call leaves SDPA for the reference or
            block-sparse backend on CPU). Merge two calls over disjoint keys with :func:`merge_attention_states`.
        backend: force a backend by name ("torch", "sdpa", "triton", ...); see zoo.attention.backends.
        check_finite: on CPU, raise naming q, k or v when one holds NaN/Inf (one dot product q . out per call).
            Modules that check their own input once per forward (and call attend() several times on tensors
            derived from it) may pass False; the default keeps the check.

    Returns:
        (B, H, Nq, Dv) output, (output, weights) when ``return_weights``, (output, lse) when ``return_lse``.
    """
    _validate(q, k, v, score, dropout_p, scale, True)  # (positional: tests wrap _validate)
    if return_weights is not False and return_weights is not True:  # "no" would be truthy
        return_weights = check_flag(return_weights, "attend: return_weights")
    if return_lse is not False:
        return_lse = _check_return_lse(return_lse, return_weights, score)
    _, _, q_len, head_dim = q.shape
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)  # float(): a 0-d tensor too
    causal = _backends.sdpa_causal_ok(mask, q_len, k.shape[2], scale)  # SDPA's own causal kernel
    plain = (
        backend is None and not return_weights and not return_lse and score == "softmax" and not _is_empty(q, k)
        and (mask is None or (causal and bias is None)) and _backends.sdpa_runs_plain_calls(q.device.type)
    )
    if plain and bias is None:  # the plain calls most models make: straight to SDPA
        result = _backends.sdpa_plain(q, k, v, scale, float(dropout_p), causal)
    elif plain and _backends.sdpa_bias_ready(bias, q, k) and _autocast_dtype(q) is None \
            and not _backends.functorch_biased(bias):
        # relative-position / agent biases, no mask. Under autocast the general path instead: autocast would round
        # an fp32 bias to the half dtype as it is (bias + 1000 lost to bf16's steps of 8), where _dispatch shifts
        # each row by its maximum first, so attend() gives the same answer whether a backend is named or not
        result = _backends.sdpa_biased(q, k, v, bias, scale, float(dropout_p))
    else:
        result = _dispatch(q, k, v, mask, bias, scale, score, dropout_p, return_weights, backend, return_lse)
    if check_finite and q.is_cpu and not is_tracing():  # on CUDA: a device sync
        # NaN/Inf inputs: a non-finite v reaches the output, so the output answers for it; a NaN query may
        # not (SDPA's CPU kernel can return a finite row for it), and a -inf key is a key nobody attends to,
        # so q and k are reduced too: q . out and k . k (zoo.layers.surely_finite; Inf * 0 is NaN). Only when
        # one is not finite are the inputs scanned, so the error names the input at fault. With a mask, a NaN
        # value at a key nobody may attend reaches the output of the dense backends (0 * NaN) but not of the
        # block-sparse ones, which skip its tile: v is reduced too, so that every backend and length raises.
        # A NaN or +Inf bias makes its rows NaN, so it is looked at only then.
        out_finite = surely_finite(q, result[0] if return_weights or return_lse else result)
        if not (out_finite and surely_finite(k, k) and (mask is None or surely_finite(v, v))):
            _check_finite(q=q, k=k, v=v)
        if not out_finite and isinstance(bias, torch.Tensor) and bias.is_floating_point() and bias.numel():
            top = float(bias.detach().max())  # NaN and +Inf come out on top; -inf is a valid "never"
            if not top < math.inf:
                raise ValueError(f"attend: bias contains {'NaN' if math.isnan(top) else '+Inf'} values "
                                 f"(-inf or mask= forbid pairs)")
    return result


def _check_return_lse(return_lse, return_weights: bool, score: str) -> bool:
    """attend()'s return_lse: a flag, for softmax scores, not with return_weights."""
    return_lse = check_flag(return_lse, "attend: return_lse")
    if return_lse and score != "softmax":
        raise ValueError(f"attend: return_lse=True is defined for score='softmax' only (score={score!r} has no "
                         f"normaliser)")
    if return_lse and return_weights:
        raise ValueError("attend: return_weights=True and return_lse=True together: ask for one (the log-sum-exp of "
                         "a row is log(sum(exp(scores))); the weights are exp(scores - lse))")
    return return_lse


def merge_attention_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """Softmax attention over the union of two disjoint key sets, from each set's output and natural-log LSE
    (``attend(..., return_lse=True)``): out (B, H, N, Dv), lse (B, H, N) -> (out, lse) of the union, as FlashInfer's
    ``merge_state`` and xFormers' ``merge_attentions`` compute it. Differentiable: merged calls train like one call.
    Rows empty in both stay zero with LSE -inf.

    The weights are exp(lse_x - m) / (exp(lse_a - m) + exp(lse_b - m)) with m the larger LSE, so they sum to one
    even where the LSEs saturate (rows whose every key is biased by torch.finfo(float32).min have an LSE of
    about -3.4e38, where lse + log(2) rounds to lse: weights taken as exp(lse_x - logaddexp(...)) were 1 and 1, and
    the merged row the sum of the halves). Such rows merge with equal weights, not in proportion to the key counts.
    The output is formed in fp32 (float64 for float64 inputs) and returned in out_a's dtype. Shapes broadcast:
    out_a, out_b and the LSEs with a trailing unit dim (an LSE shared over the batch, say).
    """
    for name, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"merge_attention_states: {name} must be a floating-point tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    try:
        torch.broadcast_shapes(out_a.shape, out_b.shape, lse_a.shape + (1,), lse_b.shape + (1,))
    except RuntimeError:
        raise ValueError(f"merge_attention_states: out_a {tuple(out_a.shape)}, out_b {tuple(out_b.shape)} (..., Dv) "
                         f"and lse_a {tuple(lse_a.shape)}, lse_b {tuple(lse_b.shape)} (...) do not broadcast "
                         f"together") from None
    m = torch.maximum(lse_a, lse_b)
    safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(lse_a - safe), torch.exp(lse_b - safe)
    total = wa + wb
    denom = torch.where(total > 0, total, torch.ones_like(total))  # (no log(0) in the graph: a finite gradient)
    lse = torch.where(total > 0, safe + torch.log(denom), m)
    work = torch.float64 if out_a.dtype == torch.float64 else torch.float32
    out = out_a.to(work) * (wa / denom)[..., None].to(work) + out_b.to(work) * (wb / denom)[..., None].to(work)
    return out.to(out_a.dtype), lse


def _autocast_dtype(q: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype torch.autocast gives attention on q's device (None when it is off there, or for float64, which
    autocast leaves alone)."""
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    return autocast_dtype(q.device.type)


def _dispatch(q, k, v, mask, bias, scale: float, score, dropout_p, return_weights, backend, return_lse=False):
    """attend()'s general path: mask and bias checked against the shapes, then the selected backend.

    Under torch.autocast every backend sees what SDPA sees there: q, k, v in the autocast dtype (whatever
    dtype they came in), run with autocast off. Each backend then keeps the scores in fp32 as for any half
    input, and returns the autocast dtype, as SDPA. (Left on, autocast lowered the fp32 matmuls inside the
    reference and block-sparse backends: the block-sparse one failed writing bf16 tiles into its fp32 output,
    or overflowed fp16 in its shift-free exp, and the reference one rounded fp32 inputs' scores to bf16.)"""
    cast = _autocast_dtype(q)
    if cast is not None:
        with autocast_off(q.device.type):
            return _dispatch(q.to(cast), k.to(cast), v.to(cast), mask, bias, scale, score, dropout_p,
                             return_weights, backend, return_lse)
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    if mask is None:  # Full fits every shape
        mask = as_mask(None)
    else:
        mask = as_mask(mask)
        mask.check_shape(q_len, k_len, batch, heads)
        if mask.batch_size not in (1, batch):
            raise ValueError(f"attend: mask batch dim {mask.batch_size} does not broadcast to batch {batch}")
        if mask.num_heads not in (1, heads):
            raise ValueError(f"attend: mask head dim {mask.num_heads} does not broadcast to {heads} heads")
    requested = _backends.requested_backend(backend)
    if return_weights and (backend is None or backend == "auto"):
        # the weights come from the reference whatever a use_backend(...) context or ZOO_ATTN_BACKEND pins (those pin
        # the fast path; capture_attention and the modules' weight requests must keep working under them); only an
        # explicit backend= argument is asked for them (see zoo.attention.backends' module docstring)
        requested = "torch"
    bias_heads = getattr(bias, "num_heads", None) if isinstance(bias, AttentionBias) else None
    if isinstance(bias_heads, int) and bias_heads != heads:
        # its (1, h, Nq, Nk) tensor would broadcast for h = 1: ALiBi(1) gave every head the slope 1/256, silently
        raise ValueError(f"attend: bias {type(bias).__name__} has {bias_heads} heads but q has {heads}: build it with "
                         f"{heads} heads (its per-head slopes / tables); for one bias shared by every head, pass its "
                         f"tensor, bias.materialize({q_len}, {k_len})")
    empty = _is_empty(q, k)
    if isinstance(bias, ALiBi) and bias.num_heads == heads and not empty:
        # The Triton kernel computes ALiBi from its slopes (O(N) memory): choose the backend against a
        # zero-stride stand-in of the bias and hand the kernel the object; any other backend gets the tensor.
        stand_in = q.new_zeros(()).expand(1, heads, q_len, k_len)
        chosen = _backends.select_backend((q, k, v, mask, stand_in, scale, score, float(dropout_p),
                                           bool(return_weights)), requested, return_lse)
        if chosen.name == "triton":
            return _run_backend(chosen, (q, k, v, mask, bias, scale, score, float(dropout_p), bool(return_weights)),
                                return_lse)
    bias_t = None
    if bias is not None:
        # ALiBi with fp16 / bf16 q: materialised in fp32, as FlashAttention's alibi_slopes and the Triton kernel
        # compute it. The backends that add the bias to fp32 scores keep it exact; SDPA's _bias_in_dtype shifts each
        # row by its maximum before rounding. Materialised in q's dtype, -slope * distance was rounded to bf16's
        # steps (1/32 at |bias| in [4, 8)): 6% of autocast outputs off the correctly rounded ones, against 0.03%
        # without a bias.
        half = q.dtype in (torch.float16, torch.bfloat16) and isinstance(bias, ALiBi)
        bias_t = resolve_bias(bias, q_len, k_len, device=q.device, dtype=torch.float32 if half else q.dtype)
        if bias_t.shape[0] not in (1, batch) or bias_t.shape[1] not in (1, heads):
            raise ValueError(
                f"attend: bias of shape {tuple(bias_t.shape)} does not broadcast to ({batch}, {heads}, {q_len}, {k_len})"
            )
        if bias_t.device != q.device:
            raise ValueError(f"attend: bias is on {bias_t.device} but q is on {q.device}")
    args = (q, k, v, mask, bias_t, scale, score, float(dropout_p), bool(return_weights))
    if empty:
        if requested is not None:  # a backend named for the call still refuses what it cannot run (its reason)
            _backends.select_backend(args, requested, return_lse)
        return _empty_attention(q, k, v, bias_t, bool(return_weights), return_lse)
    return _run_backend(_backends.select_backend(args, requested, return_lse), args, return_lse)


def _run_backend(backend, args: tuple, return_lse: bool):
    """The chosen backend's forward; with ``return_lse`` it is asked for (out, lse) (backends registered with
    returns_lse; a forward without that keyword is never called with it)."""
    if return_lse:
        return backend.forward(*args, return_lse=True)
    return backend.forward(*args)


def _is_empty(q: torch.Tensor, k: torch.Tensor) -> bool:
    """A batch of 0, no queries or no keys (attend() validated that heads and head dims are not 0)."""
    return q.shape[0] == 0 or q.shape[2] == 0 or k.shape[2] == 0


def _empty_attention(q, k, v, bias: Optional[torch.Tensor], return_weights: bool, return_lse: bool = False):
    """attend() with nothing to attend: B = 0 or Nq = 0 (an empty output), or Nk = 0 (zeros (B, H, Nq, Dv): a row
    with no key is a row whose keys are all masked). SDPA returns the same (torch.nn.functional.
    scaled_dot_product_attention, torch 2.11, on CPU), and so does a softmax or sigmoid sum over no key. Computed
    here for every backend, none of which sees an empty tensor (the kernels' launch grids and the block maps
    need a length of at least 1).

    The scores (B, H, Nq, Nk) have no element in all three cases; the output is formed from them by the reference
    backend's products (q k^T, plus the bias, times v), so that autograd gives q, k, v and a bias that requires
    grad their gradients in their own shapes (zeros or empty), as SDPA's backward does. Weights: the empty scores,
    in the dtype the reference backend gives its weights (fp32 for fp16 / bf16 inputs, _score_dtype), so an
    empty batch's weights have the dtype of every other batch's. LSE: the log-sum-exp of those scores over the
    keys, (B, H, Nq) in the same dtype: -inf for each row when Nk = 0 (the sum over no key is 0)."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len, v_dim = k.shape[1], k.shape[2], v.shape[3]
    groups = heads // kv_heads
    q_g = q.reshape(batch, kv_heads, groups * q_len, head_dim)
    scores_BHQK = torch.matmul(q_g, k.transpose(-1, -2)).reshape(batch, heads, q_len, k_len)  # no element
    if bias is not None:
        scores_BHQK = scores_BHQK + bias.to(scores_BHQK.dtype)  # broadcasts: bias dims are 1 or the call's
    out = torch.matmul(scores_BHQK.reshape(batch, kv_heads, groups * q_len, k_len), v)
    out_BHQV = out.reshape(batch, heads, q_len, v_dim)
    if return_lse:
        return out_BHQV, torch.logsumexp(scores_BHQK.to(_score_dtype(q.dtype)), dim=-1)
    return (out_BHQV, scores_BHQK.to(_score_dtype(q.dtype))) if return_weights else out_BHQV


# --------------------------------------------------------------------------------------------------
# Reference backend ("torch")
# --------------------------------------------------------------------------------------------------
def _grouped(t: Optional[torch.Tensor], kv_heads: int, groups: int) -> Optional[torch.Tensor]:
    """(Bx, Hx, R, Nk) with Hx in {1, H} -> (Bx, Hkv|1, G|1, R, Nk) matching the grouped score layout."""
    if t is None:
        return None
    bx, hx, r, n = t.shape
    if hx == 1:
        return t.reshape(bx, 1, 1, r, n)
    return t.reshape(bx, kv_heads, groups, r, n)


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference backend computes scores and returns weights in: fp32 for fp16 / bf16 inputs (see
    _rows), the input dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _rows(
    q_rows: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_rows: Optional[torch.Tensor],
    allowed_rows: Optional[torch.Tensor],
    scale: float,
    score: str,
    dropout_p: float,
    want_weights: bool,
    want_lse: bool = False,
):
    """Attention for a chunk of query rows. q_rows (B, H, R, D) -> out (B, H, R, Dv) [, p (B, H, R, Nk)]
    [, lse (B, H, R) (softmax)]."""
    batch, heads, rows, head_dim = q_rows.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    q_g = q_rows.reshape(batch, kv_heads, groups * rows, head_dim)
    compute_dtype = _score_dtype(q_g.dtype)
    if compute_dtype != q_g.dtype:
        # fp16 / bf16 inputs: the scores in fp32, as SDPA's kernels and the other backends keep them. A product
        # in the input dtype rounds each score to it (bf16: 0.25 at |s| = 32) before the softmax: outputs 20x
        # further from float64 than SDPA's (0.15 against 0.008 in bf16), and capture_attention / return_weights,
        # which run this backend, changed a half-precision model's outputs. (It also cannot overflow fp16.)
        # (with autocast off: under torch.autocast, matmul would cast the fp32 copies back down)
        with autocast_off(q_g.device.type):
            s = torch.matmul(q_g.float(), k.float().transpose(-1, -2))
        s = s.view(batch, kv_heads, groups, rows, k_len) * scale
    else:
        s = torch.matmul(q_g, k.transpose(-1, -2)).view(batch, kv_heads, groups, rows, k_len) * scale
    if bias_rows is not None:
        s = s + _grouped(bias_rows, kv_heads, groups).to(compute_dtype)
    allowed = _grouped(allowed_rows, kv_heads, groups)
    if score == "softmax":
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        row_max = s.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
        e = s - row_max
        # No graph to record: exp in place, off ATen's slow path for masked (-inf) and far-off scores
        # (zoo.layers.EXP_FLOOR). With autograd: plain exp (an out-of-place flush cost ~10% there).
        e = torch.exp(e) if torch.is_grad_enabled() and e.requires_grad or is_tracing() else exp_flushed_(e)
        denom = e.sum(dim=-1, keepdim=True)
        has_key = denom > 0
        safe_denom = torch.where(has_key, denom, torch.ones_like(denom))
        p = e / safe_denom
        if want_lse:  # (the shift is detached: d lse / d s is p all the same)
            lse = torch.where(has_key, row_max + torch.log(safe_denom), float("-inf")).reshape(batch, heads, rows)
    else:
        p = torch.sigmoid(s - _log_length(k_len, s))
        if allowed is not None:
            p = p.masked_fill(~allowed, 0.0)
    weights = p if want_weights else None
    if dropout_p > 0.0:
        p = F.dropout(p, p=dropout_p, training=True)
    if compute_dtype != v.dtype:  # fp16 / bf16: the weights are not rounded to the input dtype either
        with autocast_off(v.device.type):
            out = torch.matmul(p.view(batch, kv_heads, groups * rows, k_len), v.to(compute_dtype)).to(v.dtype)
    else:
        out = torch.matmul(p.view(batch, kv_heads, groups * rows, k_len), v)
    out = out.view(batch, heads, rows, v.shape[-1])
    if want_weights:
        return out, weights.reshape(batch, heads, rows, k_len)
    return (out, lse) if want_lse else out


def _log_length(k_len, like: torch.Tensor):
    """log(Nk), the sigmoid score's shift: a Python float for a plain length; for a symbolic one (torch.export or
    torch.compile with a dynamic length) a 0-d tensor of ``like``'s dtype, computed in float64 as math.log is, since
    math.log would pin the length to its traced value."""
    if isinstance(k_len, int):
        return math.log(k_len)
    return torch.full((), k_len, dtype=torch.float64).log().to(like.device, like.dtype)


def _row_chunks(q_len, k_len, batch: int, heads: int) -> list:
    """(start, stop) of the query chunks the reference backend runs, each of at most CHUNK_ELEMENTS scores.

    One chunk when a length is symbolic (torch.export / torch.compile with a dynamic length): a Python loop over
    it would pin the length to its traced value ("specialized it to be a constant"). The working set is then
    O(B * H * Nq * Nk), as SDPA's math kernel's."""
    if not (isinstance(q_len, int) and isinstance(k_len, int)):
        return [(0, q_len)]
    chunk = max(1, min(q_len, CHUNK_ELEMENTS // max(batch * heads * k_len, 1)))
    return [(start, min(q_len, start + chunk)) for start in range(0, q_len, chunk)]


def attention_reference(q, k, v, mask: Mask, bias, scale, score, dropout_p, return_weights, return_lse=False):
    """The "torch" backend: exact attention in query chunks (autograd; bounded memory); (out, weights) with
    ``return_weights``, (out, lse) with ``return_lse`` (softmax)."""
    batch, heads, q_len, _ = q.shape
    # python_size: under ONNX/jit tracing the sizes are traced 0-d tensors and masks need Python ints; a symbolic
    # size (torch.export with a dynamic length) stays symbolic.
    q_len, k_len = python_size(q_len), python_size(k.shape[2])
    chunks = _row_chunks(q_len, k_len, python_size(batch), python_size(heads))
    if not (isinstance(q_len, int) and isinstance(k_len, int)) and k.shape[1] != heads:
        # Grouped-query attention at a symbolic length: k and v repeated per query head. The grouped layout's
        # reshape of the (Hkv, G, R, Nk) scores made torch.export guard on the length ("Not all values of n ...
        # satisfy the generated guard min(n, n*n) == n"); one group per head reshapes size-1 dims only.
        # (index_select: repeat_interleave and expand + reshape made guards of their own)
        kv_head = torch.arange(heads, device=k.device) // (heads // k.shape[1])
        k, v = k.index_select(1, kv_head), v.index_select(1, kv_head)
    needs_grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or (bias is not None and bias.requires_grad)
    )
    # Checkpoint chunks only when there are several (one chunk: plain autograd is cheaper).
    whole = len(chunks) == 1  # all rows at once: nothing sliced, no symbolic length compared
    use_checkpoint = needs_grad and not whole and not return_weights and dropout_p == 0.0
    outs, extras = [], []  # extras: each chunk's weights or LSE
    for start, stop in chunks:
        allowed = None if mask.is_full else mask.dense(q_len, k_len, q.device, rows=None if whole else (start, stop))
        bias_rows = None
        if bias is not None:
            bias_rows = bias if whole or bias.shape[-2] == 1 else bias[..., start:stop, :]
            bias_rows = bias_rows.expand(bias_rows.shape[0], bias_rows.shape[1], stop - start, k_len)
        q_rows = q if whole else q[:, :, start:stop]
        if use_checkpoint:
            out = checkpoint(
                _rows, q_rows, k, v, bias_rows, allowed, scale, score, 0.0, False, return_lse, use_reentrant=False
            )
        else:
            out = _rows(q_rows, k, v, bias_rows, allowed, scale, score, dropout_p, return_weights, return_lse)
        if return_weights or return_lse:
            out, extra = out
            extras.append(extra)
        outs.append(out)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    if return_weights or return_lse:
        return out, (extras[0] if len(extras) == 1 else torch.cat(extras, dim=2))
    return out


def _torch_supports(*args):
    return None


_backends.register_backend(
    "torch",
    attention_reference,
    _torch_supports,
    priority=0,
    auto_devices=None,  # every device type: the fallback of automatic selection
    description="reference: query-chunked PyTorch, any mask/bias/score, autograd, bounded memory",
    returns_lse=True,
)
