"""Attention backends: a small registry with capability checks.

Each backend is a pair of functions with the same arguments::

    forward(q, k, v, mask, bias, scale, score, dropout_p, return_weights) -> out | (out, weights)
    supports(q, k, v, mask, bias, scale, score, dropout_p, return_weights) -> None | "reason it cannot"

A backend registered with ``returns_lse=True`` can also give the row log-sum-exp: attend(..., return_lse=True)
calls it as ``forward(q, k, v, mask, bias, scale, score, dropout_p, False, return_lse=True)`` (softmax only), and it
returns ``(out, lse)`` with lse (B, H, Nq) = log sum_j exp(scale * q.k_j + bias_j) over the allowed keys, natural
log, in fp32 for fp16 / bf16 inputs and in the input dtype otherwise, -inf for a row with no allowed key, and
differentiable (its gradient is the softmax weights, so outputs merged with
:func:`~zoo.attention.merge_attention_states` train like one call). Backends without it are passed by for such
calls, and a backend named for one is refused with that reason.

``q`` (B, H, Nq, D), ``k`` (B, Hkv, Nk, D), ``v`` (B, Hkv, Nk, Dv) are validated by ``attend`` and never empty
(``attend`` computes a batch of 0, Nq = 0 or Nk = 0 itself; ``supports`` still decides whether a backend named
for such a call may run it); ``mask`` is always a :class:`~zoo.attention.masks.Mask` (``Full()`` when none was
given); ``bias`` is None or a 4-D float tensor broadcastable to (B, H, Nq, Nk); ``scale`` any finite float (0 and
negative values included); ``score`` "softmax" or "sigmoid".

Which backend runs: the ``backend=`` argument of ``attend`` > the innermost ``use_backend(...)``
context > the ``ZOO_ATTN_BACKEND`` environment variable > automatic (the highest-priority backend
whose ``supports`` returns None and whose ``auto_devices`` include the tensors' device type). ``"auto"`` names
automatic choice in all three places (``use_backend("auto")`` is ``use_backend(None)``). A backend
named explicitly that cannot run the call raises with its reason instead of silently falling back.
One exception to the precedence: a call with ``return_weights=True`` that names no backend in its argument runs
on the reference ("torch", which returns the probabilities) whatever a context or the environment pins, so that
``capture_attention`` and the modules' weight requests work under ``use_backend("sdpa")`` or
``ZOO_ATTN_BACKEND=blocksparse``; ``attend(..., return_weights=True, backend=name)`` still asks ``name``.

Devices: automatic selection considers a backend on the device types it lists (``auto_devices``; None: every
type). The reference runs on any device; "sdpa" is chosen automatically on the device types for which torch has
SDPA kernels (:data:`SDPA_DEVICE_TYPES`: cpu, cuda, mps, xpu, meta -- torch's native_functions.yaml dispatches
``_fused_sdp_choice`` to CPU, CUDA, XPU and Meta kernels and MPS has ``_scaled_dot_product_attention_math_for_mps``);
any other device type (hpu, privateuse1 backends) gets the reference unless a backend is named.

Built in: "torch" (the reference, see core.py), "sdpa" (torch.nn.functional.scaled_dot_product_attention)
and "triton" (zoo.kernels.flash_attention, CUDA; CPU tensors only when named explicitly and
TRITON_INTERPRET=1). The CPU block-sparse path registers itself from zoo/attention/sparse.py.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from zoo.attention.masks import Causal, Mask
from zoo.layers import call_outside_graph, in_torch_func, is_tracing, python_size

__all__ = [
    "Backend",
    "register_backend",
    "list_backends",
    "get_backend",
    "use_backend",
    "select_backend",
    "ENV_VAR",
]

ENV_VAR = "ZOO_ATTN_BACKEND"


@dataclass
class Backend:
    name: str
    forward: Callable
    supports: Callable
    priority: int = 0
    #: Device types on which automatic selection considers this backend; None: every device type.
    auto_devices: Optional[frozenset] = field(default_factory=lambda: frozenset({"cpu", "cuda"}))
    description: str = ""
    #: Extra check used only by automatic selection ("is it worth it here?"), on top of ``supports``
    #: ("can it run this at all?"). None: automatic selection uses ``supports`` alone.
    auto_supports: Optional[Callable] = None
    #: True when automatic selection never picks this backend for the masks SDPA runs natively -- Full,
    #: and Causal with Nq == Nk -- (its ``auto_supports`` refuses them): then the plain call (see
    #: :func:`sdpa_runs_plain_calls`) passes it by without asking.
    sparse_only: bool = False
    #: True when ``forward`` also takes ``return_lse=True`` and then returns (out, lse) (see the module docstring).
    returns_lse: bool = False

    def auto_runs_on(self, device_type: str) -> bool:
        """True when automatic selection considers this backend for tensors of ``device_type``."""
        return self.auto_devices is None or device_type in self.auto_devices


_BACKENDS: dict[str, Backend] = {}
class _ThreadStack(threading.local):
    """A per-thread stack: use_backend(...) in one thread does not steer another thread's attend() calls (a context
    kept process-wide did, and made a serving thread's return_weights calls fail inside another's
    use_backend("sdpa")), as torch's own modes (no_grad, autocast) are per thread."""

    def __init__(self) -> None:
        self.stack: list[str] = []


_CONTEXT_STATE = _ThreadStack()


def register_backend(
    name: str,
    forward: Callable,
    supports: Callable,
    priority: int = 0,
    *,
    auto_devices=("cpu", "cuda"),
    description: str = "",
    auto_supports: Optional[Callable] = None,
    sparse_only: bool = False,
    returns_lse: bool = False,
) -> Backend:
    """Register (or replace) a backend. Higher ``priority`` is tried first by automatic selection.

    ``supports`` decides whether the backend can run a call at all (an explicit request is refused with
    its reason); ``auto_supports``, when given, decides whether automatic selection should pick it (for
    example only when a sparse mask skips enough tiles to beat the dense path). ``sparse_only`` promises
    that automatic selection never picks it for a Full mask or a square Causal mask. ``returns_lse`` says that
    ``forward`` accepts ``return_lse=True`` (the row log-sum-exp; see the module docstring). ``auto_devices``: the
    device types on which automatic selection considers it, or None for every device type (a backend named by
    ``attend(..., backend=)``, ``use_backend`` or the environment runs on any device its ``supports`` accepts).
    """
    # checked here: a bad entry would otherwise break every later attend() call, far from this one
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_backend: name must be a non-empty str, got {name!r}")
    for arg, value in (("forward", forward), ("supports", supports)):
        if not callable(value):
            raise TypeError(f"register_backend({name!r}): {arg} must be callable, got {type(value).__name__}")
    if auto_supports is not None and not callable(auto_supports):
        raise TypeError(f"register_backend({name!r}): auto_supports must be callable or None, got {type(auto_supports).__name__}")
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise TypeError(f"register_backend({name!r}): priority must be an int, got {priority!r}")
    if auto_devices is not None and (
            isinstance(auto_devices, str) or not all(isinstance(d, str) for d in auto_devices)):
        raise TypeError(f"register_backend({name!r}): auto_devices must be a collection of device types such as "
                        f"('cpu', 'cuda'), or None for every device type, got {auto_devices!r}")
    for flag, value in (("sparse_only", sparse_only), ("returns_lse", returns_lse)):
        if not isinstance(value, bool):
            raise TypeError(f"register_backend({name!r}): {flag} must be True or False, got {value!r}")
    backend = Backend(
        name, forward, supports, priority, None if auto_devices is None else frozenset(auto_devices), description,
        auto_supports, sparse_only,
        returns_lse,
    )
    _BACKENDS[name] = backend
    return backend


_ORDER: list[Backend] = []  # registered backends by descending priority
_ORDER_OF: list[Backend] = []  # the registry's values that _ORDER was sorted from


def _by_priority() -> list[Backend]:
    """Backends by descending priority; re-sorted whenever the registry changed (also when a test or a
    user replaces an entry of _BACKENDS directly).

    Under torch.compile/export the order is sorted afresh and the cache neither read nor written: a write
    to module state inside traced code makes Dynamo guard on that state, so the first compiled call
    recompiled on the second (identical) one, and inside a checkpointed block (``set_grad_checkpointing``)
    fullgraph=True refused the write as an unsafe side effect."""
    _load_optional_backends()
    current = list(_BACKENDS.values())
    if is_tracing():
        return sorted(current, key=lambda b: -b.priority)
    if current != _ORDER_OF or not _ORDER:
        _ORDER[:] = sorted(current, key=lambda b: -b.priority)
        _ORDER_OF[:] = current
    return _ORDER


def list_backends() -> list[str]:
    """Names of the registered attention backends, highest priority first (the order in which attend()'s
    automatic selection asks them): e.g. ["edges", "triton", "blocksparse", "sdpa", "torch"]. Any of them can be
    pinned with ``attend(..., backend=name)``, ``use_backend(name)`` or the ZOO_ATTN_BACKEND environment variable
    ("auto" in any of the three: automatic choice)."""
    _load_optional_backends()
    return [backend.name for backend in _by_priority()]


def _valid_names() -> str:
    return f"{', '.join(list_backends())} (or 'auto' for automatic choice)"


def get_backend(name: str) -> Backend:
    _load_optional_backends()
    if not isinstance(name, str) or name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {_valid_names()}")
    return _BACKENDS[name]


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Run the ``attend`` calls inside the block on backend ``name``; None or "auto" restores automatic choice
    (inside an outer pinned block too). Calls with ``return_weights=True`` and no ``backend=`` argument still run
    on the reference (see the module docstring)."""
    if name is not None and name != "auto":
        get_backend(name)  # fail early on a typo
    stack = _CONTEXT_STATE.stack
    stack.append(name or "auto")
    try:
        yield
    finally:
        stack.pop()


def requested_backend(argument: Optional[str]) -> Optional[str]:
    """The backend asked for by argument > context > environment, or None for automatic."""
    if argument is not None:
        return None if argument == "auto" else argument
    stack = _CONTEXT_STATE.stack
    if stack:
        return None if stack[-1] == "auto" else stack[-1]
    env = os.environ.get(ENV_VAR, "").strip()
    if not env or env == "auto":
        return None
    if env not in _BACKENDS:
        _load_optional_backends()
        if env not in _BACKENDS:  # named here: a call that named no backend cannot tell where the name came from
            raise ValueError(f"{ENV_VAR}={env!r} (environment variable): unknown attention backend; valid values: "
                             f"{_valid_names()}, or unset")
    return env


def select_backend(args: tuple, requested: Optional[str], return_lse: bool = False) -> Backend:
    """The backend that will run ``args`` = (q, k, v, mask, bias, scale, score, dropout_p, return_weights), one that
    also gives the row log-sum-exp when ``return_lse``."""
    if requested is not None:
        backend = get_backend(requested)
        reason = backend.supports(*args)
        if reason is None and return_lse and not backend.returns_lse:
            able = ", ".join(b.name for b in _by_priority() if b.returns_lse)
            reason = f"return_lse=True (it does not give the row log-sum-exp; backends that do: {able})"
        if reason is not None:
            raise ValueError(f"attention backend {requested!r} cannot run this call: {reason}")
        return backend
    device_type = args[0].device.type
    for backend in _by_priority():
        if not backend.auto_runs_on(device_type) or (return_lse and not backend.returns_lse):
            continue
        check = backend.auto_supports or backend.supports
        if check(*args) is None:
            return backend
    # the "torch" reference takes every call on every device type unless it was replaced
    raise RuntimeError(f"no attention backend supports this call on device type {device_type!r} (automatic "
                       f"selection considers a backend only on the device types in its auto_devices; the "
                       f"'torch' reference has None: every type)")


def sdpa_runs_plain_calls(device_type: str) -> bool:
    """True when automatic selection is certain to pick the built-in "sdpa" backend for every plain call on
    this device type -- a Full mask or a square Causal one, no bias, softmax, no weights returned, nothing
    requested by context or environment -- without asking any backend; False when the choice may depend on
    the tensors (a user backend of higher priority, the Triton kernel on CUDA): then attend() takes the
    general path.

    ``attend(q, k, v)`` and ``attend(q, k, v, Causal())``, the calls most models make, and
    ``attend(q, k, v, bias=tensor)`` with a ready bias (:func:`sdpa_bias_ready`) thus skip the per-call
    selection (a few microseconds; 1-2% of an N = 256 CPU forward, see docs/bench_attention.md).
    """
    if _CONTEXT_STATE.stack or os.environ.get(ENV_VAR, "auto").strip() not in ("", "auto"):
        return False
    for backend in _by_priority():
        if backend.auto_runs_on(device_type) and not backend.sparse_only:
            return backend.forward is _sdpa_forward
    return False


_OPTIONAL = ["zoo.attention.sparse", "zoo.attention.edge_backend"]
_optional_loaded = False


def _load_optional_backends() -> None:
    """Backends defined in other modules register on import; import them once, quietly if absent."""
    global _optional_loaded
    if _optional_loaded:
        return
    _optional_loaded = True
    for module in _OPTIONAL:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise


# --------------------------------------------------------------------------------------------------
# "sdpa": torch.nn.functional.scaled_dot_product_attention
# --------------------------------------------------------------------------------------------------
# Masks whose dense form has more cells than this are not handed to SDPA as a dense tensor.
SDPA_DENSE_MASK_LIMIT = 1 << 28


def functorch_biased(bias) -> bool:
    """A bias tensor inside a torch.func transform (grad, vjp, jacrev, vmap). When the bias derives from parameters
    that require grad (a module's learned relative-position or agent biases), SDPA's CPU dispatcher still sends the
    call to its flash kernel, which has no attn_mask gradient, and the transform fails ("not differentiable with
    respect to argument 'attn_mask'") even when only the input is differentiated. Inside the transform the bias
    reports requires_grad=False (functorch levels), so any biased call there goes to the reference backend."""
    return isinstance(bias, torch.Tensor) and in_torch_func()


def _sdpa_supports(q, k, v, mask, bias, scale, score, dropout_p, return_weights):
    if functorch_biased(bias):
        return "a bias inside a torch.func transform (SDPA's CPU flash kernel has no bias gradient)"
    if score != "softmax":
        return f"score={score!r} (SDPA computes softmax attention only)"
    if return_weights:
        return "return_weights=True (SDPA does not return the attention probabilities)"
    if not mask.is_full and not sdpa_causal_ok(mask, q.shape[2], k.shape[2], scale):
        dims = (mask.batch_size, mask.num_heads, q.shape[2], k.shape[2])
        # symbolic sizes (torch.export with a dynamic batch): not compared, since the comparison would become a
        # guard bounding the batch (a padded MaxViT's B x windows batch: "Expected op to be '==', got <=")
        if all(type(d) is int for d in dims) and math.prod(dims) > SDPA_DENSE_MASK_LIMIT:
            return f"mask {mask!r} would need a dense {math.prod(dims)}-cell boolean tensor"
    return None


def _sdpa_causal(mask: Mask, q_len: int, k_len: int) -> bool:
    """SDPA's is_causal is top-left aligned: equal to ours only when Nq == Nk.

    A Python bool even for symbolic lengths (torch.export with a dynamic sequence length, a second length under
    torch.compile): SDPA's is_causal refuses the SymBool that ``q_len == k_len`` then is.

    Under torch.export, symbolic lengths are not compared, which would make the exporter guard on the answer:
    lengths that are one symbol (self attention) are equal without a guard; different symbols (cross attention
    exported with separate query and key Dims) answer False, so that the dense bottom-right mask runs, which is
    right whether or not the lengths turn out equal. (The guard made the exported program refuse inputs with
    Nq == Nk, and an export traced at Nq == Nk fail: "must always be equal".) Under Dynamo (torch.compile, strict
    export) the branch below decides it instead, a guard on the lengths' equality that torch.compile recompiles on;
    Dynamo leaves ``bool(q_len == k_len)`` and statically_known_true's answer SymBools."""
    if type(mask) is not Causal:
        return False
    symbolic = isinstance(q_len, torch.SymInt) or isinstance(k_len, torch.SymInt)
    if symbolic and not torch.compiler.is_dynamo_compiling():
        from torch.fx.experimental.symbolic_shapes import statically_known_true  # loaded by then: torch made the SymInt

        return statically_known_true(q_len == k_len)
    if q_len == k_len:  # jit.trace's sizes are 0-d tensors: the branch makes a bool of them too
        return True
    return False


def sdpa_causal_ok(mask: Mask, q_len: int, k_len: int, scale: float) -> bool:
    """True when SDPA's is_causal computes ``mask`` at this scale: a Causal mask with Nq == Nk (_sdpa_causal) and a
    positive scale. SDPA's CPU flash kernel (torch 2.11) returns NaN rows with is_causal=True and a scale of 0 or
    below, where its math kernel and a boolean causal mask are right (it scales the scores after writing -inf at
    the masked pairs: 0 * -inf is NaN, and a negative scale makes them +inf); such calls take the dense mask."""
    return scale > 0 and _sdpa_causal(mask, q_len, k_len)


def sdpa_plain(q, k, v, scale: float, dropout_p: float, is_causal: bool = False) -> torch.Tensor:
    """SDPA without mask tensor or bias: Full, or Causal with Nq == Nk (SDPA's is_causal is top-left aligned)
    -- the "sdpa" backend's common calls and attend()'s plain-call path."""
    gqa = int(q.shape[1]) != int(k.shape[1])  # int(): traced sizes are 0-d tensors under jit.trace
    return F.scaled_dot_product_attention(
        q, k, v, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=gqa
    )


def sdpa_bias_ready(bias, q: torch.Tensor, k: torch.Tensor) -> bool:
    """True when ``bias`` can go to SDPA as its ``attn_mask`` as it is: a 4-D tensor of q's dtype and device
    whose dims each equal the attention's or are 1 (attend()'s biased plain-call path; anything else takes
    the general path, which converts it or names the problem)."""
    if not isinstance(bias, torch.Tensor) or bias.dim() != 4 or bias.dtype != q.dtype or bias.device != q.device:
        return False
    (b, h, nq, nk), (bb, bh, bq, bk) = (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), bias.shape
    return bb in (1, b) and bh in (1, h) and bq in (1, nq) and bk in (1, nk)


def sdpa_attn_mask(bias: torch.Tensor) -> torch.Tensor:
    """``bias`` as SDPA's attn_mask. SDPA's CPU dispatcher sends a mask that requires grad to its math kernel
    (the flash kernel returns no mask gradient) even when grad mode is off: 3x slower for an (H, 49, 197)
    agent-attention call (docs/bench_agent.md). With grad mode off no gradient can flow, so it is detached."""
    if bias.requires_grad and not torch.is_grad_enabled():
        return bias.detach()
    return bias


def sdpa_biased(q, k, v, bias: torch.Tensor, scale: float, dropout_p: float) -> torch.Tensor:
    """SDPA with an additive bias and no mask (attend()'s biased plain-call path; see sdpa_bias_ready)."""
    gqa = int(q.shape[1]) != int(k.shape[1])
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=sdpa_attn_mask(bias), dropout_p=dropout_p, scale=scale, enable_gqa=gqa
    )


def _bias_in_dtype(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``bias`` in q's dtype for SDPA's attn_mask. A wider bias (fp32 under autocast, with fp16 / bf16 q) is first
    shifted by its row maximum (detached; rows with no finite entry are not shifted): softmax ignores a constant
    per row, and the cast then rounds only the differences that matter. Cast as it was, a bias of 1000 + b lost b
    to fp16's 0.5 steps (outputs 0.2 off where the other backends, which add in fp32, stayed at 1e-3), and a row
    of -1e9 became -inf (a zero row where the others attend uniformly)."""
    if bias.dtype == dtype or not bias.is_floating_point() or torch.finfo(bias.dtype).bits <= torch.finfo(dtype).bits:
        return bias.to(dtype)
    row_max = bias.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    return (bias - row_max).to(dtype)


def _sdpa_forward(q, k, v, mask, bias, scale, score, dropout_p, return_weights):
    if mask.is_full and bias is None:  # the common call: nothing to prepare
        return sdpa_plain(q, k, v, scale, dropout_p)
    gqa = int(q.shape[1]) != int(k.shape[1])
    q_len, k_len = python_size(q.shape[2]), python_size(k.shape[2])  # symbolic under export with a dynamic N
    if mask.is_full or sdpa_causal_ok(mask, q_len, k_len, scale):
        is_causal = not mask.is_full
        if bias is not None and is_causal:
            # SDPA refuses is_causal with an explicit mask: fold the causal mask into the bias.
            allowed = mask.dense(q_len, k_len, q.device)
            bias = torch.where(allowed, bias, float("-inf"))
            is_causal = False
        attn_mask = None if bias is None else sdpa_attn_mask(_bias_in_dtype(bias, q.dtype))
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=gqa
        )
    allowed = mask.dense(q_len, k_len, q.device)  # (Bm, Hm, Nq, Nk)
    has_key = allowed.any(dim=-1, keepdim=True)  # (Bm, Hm, Nq, 1)
    # Under torch.compile / export the check would be a data-dependent branch: take the safe path, which
    # gives the same result when no row is empty.
    # On the meta device there are no values to look at (shapes only): the safe path too.
    empty_rows = is_tracing() or q.device.type == "meta" or not bool(has_key.all())
    if empty_rows:
        # Rows with no allowed key: let them see everything (no NaN in forward or backward), zero them after.
        allowed = allowed | ~has_key
    if bias is None:
        attn_mask = allowed
    else:
        attn_mask = torch.where(allowed, _bias_in_dtype(bias, q.dtype), float("-inf"))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=False, scale=scale, enable_gqa=gqa
    )
    if empty_rows:
        out = out.masked_fill(~has_key, 0.0)
    return out


#: Device types on which automatic selection considers "sdpa": those with SDPA kernels in torch (see the module
#: docstring). On others the reference runs unless "sdpa" is named.
SDPA_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu", "meta")

register_backend(
    "sdpa",
    _sdpa_forward,
    _sdpa_supports,
    priority=10,
    auto_devices=SDPA_DEVICE_TYPES,
    description="torch scaled_dot_product_attention (flash / memory-efficient / math kernels)",
)


# --------------------------------------------------------------------------------------------------
# "triton": zoo.kernels.flash_attention (imported lazily: triton import costs time)
# --------------------------------------------------------------------------------------------------
def _triton_module():
    return importlib.import_module("zoo.kernels.flash_attention")


def _triton_supports(q, k, v, mask, bias, scale, score, dropout_p, return_weights):
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
    try:
        module = _triton_module()
    except ImportError as error:  # triton missing on this platform
        return f"zoo.kernels.flash_attention unavailable ({error})"
    return module.triton_supports(q, k, v, mask, bias, scale, score, dropout_p, return_weights)


def _triton_auto_supports(q, k, v, mask, bias, scale, score, dropout_p, return_weights):
    """Automatic selection skips the kernel under torch.compile / export: its launcher (block maps, autotune,
    custom autograd) is host-side Python that Dynamo cannot trace, so it would split the graph at every
    attention call; SDPA runs the call in the graph instead and the compiler generates its own kernels around
    it. An explicit request still gets the kernel (run outside the graph, see _triton_forward)."""
    if is_tracing():
        return "tracing / torch.compile (automatic selection leaves the call to SDPA)"
    return _triton_supports(q, k, v, mask, bias, scale, score, dropout_p, return_weights)


def _triton_call(q, k, v, mask, bias, scale, score, dropout_p, return_weights, return_lse):
    return _triton_module().triton_attention(q, k, v, mask, bias, scale, score, dropout_p, return_weights,
                                             return_lse=return_lse)


def _triton_forward(q, k, v, mask, bias, scale, score, dropout_p, return_weights, return_lse=False):
    # an explicit request under torch.compile: the kernel runs between the compiled graphs
    return call_outside_graph(_triton_call, q, k, v, mask, bias, scale, score, dropout_p, return_weights, return_lse)


register_backend(
    "triton",
    _triton_forward,
    _triton_supports,
    priority=100,
    auto_devices=("cuda",),
    description="block-sparse FlashAttention-2 Triton kernel (forward + backward)",
    auto_supports=_triton_auto_supports,
    returns_lse=True,
)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
