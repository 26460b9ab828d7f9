"""Small layers and helpers shared by the model families in zoo.tasks (the role timm.layers plays for timm).

* :func:`to_pair` -- an int or a pair of positive ints -> (int, int), with an error naming the argument.
* :class:`DropPath` -- stochastic depth (Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016).
* :class:`LayerScale` -- per-channel residual scale (Touvron et al., "Going deeper with Image
  Transformers" (CaiT), ICCV 2021); parameter ``gamma`` as in timm so state dicts match.
* :func:`check_finite_input` -- a cheap NaN/Inf check of a model input, raising with the input's name.
* :func:`is_tracing` -- True under jit tracing/scripting (ONNX's TorchScript exporter) or torch.compile /
  torch.export, where data-dependent Python branches must be avoided.
* :func:`call_outside_graph` -- run a function eagerly between torch.compile's graphs (an opaque kernel).
* :func:`activate_fresh` -- an activation module applied in place at inference to a tensor just computed.
* :func:`check_reset_classifier`, :func:`new_linear_head` -- the argument checks and the fresh head of the
  families' ``reset_classifier`` (timm's method).
* :func:`feature_take_indices` -- which blocks/stages ``forward_intermediates(indices=...)`` returns (timm's rule).

Attention itself is not here: it is zoo.attention (attend, MultiHeadAttention, ...).
"""
from __future__ import annotations

import contextlib
import math
import numbers
import operator
import os
from collections import abc
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

__all__ = [
    "IntOrPair", "check_positive_int", "positive_int", "to_pair", "DropPath", "LayerScale", "is_tracing", "is_exporting", "in_torch_export", "in_torch_compile", "call_outside_graph", "activate_fresh",
    "check_finite_input", "surely_finite", "check_reset_classifier", "new_linear_head", "feature_take_indices",
    "ACTIVATIONS", "QuickGELU", "create_act", "weights_stamp", "weights_kept_alive", "refuse_double_backward", "usable_cpus",
    "autocast_off", "autocast_dtype",
]

IntOrPair = Union[int, Sequence[int]]


def check_positive_int(value, name: str) -> None:
    """ValueError naming ``name`` unless ``value`` is an int >= 1 (bools are not ints here)."""
    check_ints(**{name: value})


def positive_int(value, name: str) -> int:
    """``value`` as a Python int >= 1: numpy integers and 0-d integer tensors too (counts read from a numpy config
    or computed with torch); ValueError naming ``name`` otherwise (bools are not ints here)."""
    if is_int(value):
        value = int(value)
    check_positive_int(value, name)
    return value


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity mask on Linux, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

_OPTIMIZER_STEPS = [0]  # optimizer steps taken in this process (any optimizer), for weights_stamp


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


# every torch.optim optimizer's step() runs the global post-hooks, fused ones included: AdamW(fused=True) changes
# the weights in place without bumping their version counters, so caches keyed on those alone went stale
register_optimizer_step_post_hook(_count_optimizer_step)


def weights_stamp(*tensors: Optional[torch.Tensor]) -> tuple:
    """What a cache derived from module weights (resized bias tables, projected position tables) is keyed on.

    The count of optimizer steps taken in this process (any torch.optim optimizer, fused ones included, which
    update in place without a version bump), and for each tensor its identity, storage address and version
    counter: ``load_state_dict``, ``p.data = t``, ``torch.nn.utils.vector_to_parameters`` or an in-place edit under
    ``torch.no_grad()`` changes one of them. A cache entry must keep the tensors and their storages alive
    (:func:`weights_kept_alive`), so that a replaced weight's id and address cannot be reused by its successor:
    ``p.data = t`` keeps the Parameter and its version counter but frees the old storage, whose address the
    allocator then hands to a later replacement (the stamp came out equal and a stale table was served). Values changed in place through ``.data``
    (``p.data.mul_(m)``) bump no counter and are not seen: edit weights under ``torch.no_grad()`` (``p.mul_(m)``).
    Weights made under ``torch.inference_mode()`` have no version counter: their in-place edits (possible only
    inside inference mode) are not seen either. A cache that may serve grad-mode calls also keys its entries on
    ``torch.is_inference_mode_enabled()``: what is built under ``torch.inference_mode()`` (Lightning's
    validation) cannot be saved for a later backward.
    """
    return (_OPTIMIZER_STEPS[0],) + tuple(
        (id(t), t.data_ptr(), None if t.is_inference() else t._version) for t in tensors if t is not None)


def weights_kept_alive(*tensors: Optional[torch.Tensor]) -> tuple:
    """What a cache entry keyed on :func:`weights_stamp` holds so that the stamp stays unique: each tensor (its id)
    and a detached view of it (its storage, whose address ``p.data = t`` would otherwise free for reuse)."""
    return tuple((t, t.detach()) for t in tensors if t is not None)


def refuse_double_backward(what: str, instead: str) -> None:
    """Call first in a custom autograd backward whose gradients are not themselves differentiable: under
    ``backward(create_graph=True)`` (gradient penalties, forces from energies) grad mode is on there, and
    autograd would otherwise treat the returned gradients as constants, dropping the second-order terms
    without a word (``once_differentiable`` raises only when the incoming gradients require grad)."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{what} has no second derivatives (backward with create_graph=True, as gradient "
                           f"penalties and forces from energies need): {instead}")


def check_flag(value, name: str) -> bool:
    """``value`` as a bool: True/False (numpy's too) or the ints 0/1; anything else is a TypeError naming
    ``name`` (a truthy string such as "no" used to switch the option on)."""
    if isinstance(value, (bool, np.bool_)) or is_int(value) and not isinstance(value, torch.Tensor) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def check_ints(minimum: int = 1, **values) -> None:
    """ValueError naming the first of ``values`` that is not an int >= ``minimum`` (bools are not ints here:
    ``num_classes=True`` used to build a 1-class head, or fail deep inside torch)."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
            raise ValueError(f"{name} must be {kind}, got {value!r}")


def check_rates(**rates) -> None:
    """ValueError naming the first of ``rates`` (dropout / drop-path probabilities) not a number in [0, 1)."""
    for name, rate in rates.items():  # numbers.Real: numpy floats too (np.float32(0.1) was "not a number")
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= rate < 1.0:
            raise ValueError(f"{name} must be a number in [0, 1), got {rate!r}")


def check_mlp_ratio(mlp_ratio, dim: int) -> None:
    """ValueError unless ``mlp_ratio`` is a number giving the MLP at least one hidden unit at width ``dim``
    (0 used to become ratio 1 through the MLP's default, a negative ratio torch's "negative dimension")."""
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, numbers.Real) or not math.isfinite(mlp_ratio) \
            or int(dim * mlp_ratio) < 1:  # (inf / nan reached int() and its OverflowError / ValueError)
        raise ValueError(f"mlp_ratio must be a number > 0 giving at least one hidden unit, got {mlp_ratio!r}")


def to_pair(value: IntOrPair, name: str) -> tuple[int, int]:
    """``value`` (a positive int or a pair of them; numpy ints count, bools and floats do not) as a tuple of
    Python ints; ValueError naming ``name`` otherwise."""
    if is_int(value) and not isinstance(value, torch.Tensor):
        pair = (value, value)
    elif isinstance(value, abc.Sequence) and not isinstance(value, str):
        pair = tuple(value)
    else:
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    if len(pair) != 2 or not all(is_int(v) and not isinstance(v, torch.Tensor) and operator.index(v) > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return operator.index(pair[0]), operator.index(pair[1])


def feature_take_indices(count: int, indices: Union[int, Sequence[int], None] = None,
                         name: str = "indices") -> tuple[list[int], int]:
    """The features ``forward_intermediates(indices=...)`` takes out of ``count`` (blocks or stages), with timm's
    rule (timm.models._features.feature_take_indices): None = all, an int n = the last n, a sequence = those
    indices (negative ones from the end). Returns (the absolute indices, ascending; the largest). ``name``: the
    argument's name in error messages.

    The maps come out in network order, so a sequence must name them in that order, each once: timm takes
    ``(2, 0)`` or ``(1, 1)`` and returns the maps in block order anyway, while ``feature_info`` follows the order
    given, and a neck wired from it reads the wrong maps. Here that is an error."""
    if indices is None:
        indices = count
    if is_int(indices):
        indices = operator.index(indices)
        if not 0 < indices <= count:
            raise ValueError(f"{name}: last-n ({indices}) is out of range (1 to {count})")
        take = list(range(count - indices, count))
    else:
        if isinstance(indices, (str, bytes)) or not isinstance(indices, abc.Sequence) and not (
                isinstance(indices, torch.Tensor) and indices.dim() == 1):
            raise TypeError(f"{name} must be an int (the last n) or a sequence of ints, got {indices!r}")
        take = []
        for i in indices:
            if not is_int(i):
                raise TypeError(f"{name} must be an int (the last n) or a sequence of ints, got {indices!r}")
            i = operator.index(i)
            idx = count + i if i < 0 else i
            if not 0 <= idx < count:
                raise ValueError(f"{name}: feature index {i} is out of range (0 to {count - 1})")
            take.append(idx)
        if not take:
            raise ValueError(f"{name}: an empty sequence selects no feature")
        if any(b <= a for a, b in zip(take, take[1:])):
            raise ValueError(f"{name} must name each feature once, in network order (the maps come out in that "
                             f"order); got {list(indices)}, which resolves to {take}: use {sorted(set(take))}")
    return take, max(take)


def is_int(value) -> bool:
    """A Python / numpy int or an integer 0-d tensor; not a bool (True would silently mean 1). No try/except,
    so torch.compile traces it (model forwards call to_pair)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    ndim = getattr(value, "ndim", None)
    if ndim is not None:  # numpy: an integer scalar or 0-d integer array (every ndarray has __index__, floats too)
        return ndim == 0 and getattr(getattr(value, "dtype", None), "kind", "") in ("i", "u")
    return hasattr(type(value), "__index__")  # other integer types (numpy's bool has no __index__)


def check_reset_classifier(num_classes, global_pool: Optional[str], pools: Sequence[str]) -> None:
    """The arguments of ``reset_classifier(num_classes, global_pool=None)``: an int >= 0 and, when given, one
    of the family's pooling names."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
    if global_pool is not None and global_pool not in pools:
        raise ValueError(f"global_pool must be one of {tuple(pools)}, got {global_pool!r}")


def new_linear_head(in_features: int, num_classes: int, like: torch.Tensor, training: bool,
                    init_std: Optional[float] = 0.02) -> nn.Module:
    """A fresh ``num_classes``-way linear classifier (``nn.Identity`` for 0) on ``like``'s device and dtype, in
    the given train/eval mode. ``init_std``: trunc-normal weights and zero bias (timm's ViT init); None keeps
    ``nn.Linear``'s default init (timm's MaxViT head)."""
    if num_classes == 0:
        return nn.Identity().train(training)
    head = nn.Linear(in_features, num_classes)
    if init_std is not None:
        nn.init.trunc_normal_(head.weight, std=init_std)
        nn.init.zeros_(head.bias)
    return head.to(device=like.device, dtype=like.dtype).train(training)


def python_size(n):
    """A tensor size as a Python int (numpy ints; torch.jit.trace's 0-d size tensors, which masks, loops and
    kernel launches cannot take), except a symbolic size under torch.export / torch.compile with a dynamic dim:
    int() would pin that to the traced value (the exported program then refuses every other size)."""
    return n if isinstance(n, torch.SymInt) else int(n)


def in_torch_func() -> bool:
    """True inside a torch.func transform (vmap, grad, jacrev, ...): custom autograd Functions without functorch
    rules cannot run there, and the transform hides its inputs' requires_grad (functorch levels)."""
    return torch._C._are_functorch_transforms_active()


def is_tracing() -> bool:
    """True under torch.jit tracing/scripting (used by ONNX's TorchScript exporter), torch.compile/export, or a
    torch.func transform (vmap, grad, jacrev, ...): no data-dependent Python (``.item()`` checks), no caches keyed on
    storage (batched tensors have none)."""
    if torch._C._get_tracing_state() is not None or torch.jit.is_scripting():
        return True
    return torch.compiler.is_compiling() or in_torch_func()


def in_torch_export() -> bool:
    """True while torch.export traces (strict or not; the dynamo ONNX exporter too) -- not jit tracing, the TorchScript
    ONNX exporter or torch.compile. torch.compiler's flag is read rather than ``torch.compiler.is_exporting()``, which
    Dynamo replaces by the constant True in everything it traces, under torch.compile too (torch 2.11;
    pytorch/pytorch#176347, fixed by #176499)."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def in_torch_compile() -> bool:
    """True while torch.compile traces (Dynamo) -- not torch.export, jit tracing or the TorchScript ONNX exporter: the
    code whose custom operators (zoo/attention/segment.py, graph.py, edge_backend.py) stand for eager functions."""
    return torch.compiler.is_compiling() and not in_torch_export() and torch._C._get_tracing_state() is None


def is_exporting() -> bool:
    """True while a program is exported: torch.export (strict or not, and so the dynamo ONNX exporter), torch.jit
    tracing/scripting, the TorchScript ONNX exporter. False under torch.compile, whose graphs guard on Python state
    and are re-traced when it changes -- state (a KV cache) may live there, not in an exported program
    (:func:`in_torch_export` for torch.export alone)."""
    if torch._C._get_tracing_state() is not None or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
        return True
    return in_torch_export()


def call_outside_graph(fn, *args):
    """``fn(*args)``; when torch.compile traces the caller, run eagerly between its graphs: one graph break,
    ``fn`` opaque to the compiler (its Python loops, data-dependent sizes and custom autograd stay as they are
    in eager mode).

    The ``torch.compiler.disable`` wrapper is made only when tracing reaches the call: making it at import
    time would import torch._dynamo with zoo (0.7 s on the benchmark machine)."""
    if not is_tracing():
        return fn(*args)
    return torch.compiler.disable(fn)(*args)


def hooked_within(*modules: nn.Module) -> bool:
    """True when a forward or backward (pre-)hook is registered globally or on any of ``modules`` or their
    submodules: a model that takes a shortcut through them (ViT's class-token-only last block) runs them in full
    instead, so that hooks see what timm's model shows them (every token; a backward hook got one token's
    gradient before)."""
    registry = nn.modules.module
    if (registry._global_forward_hooks or registry._global_forward_pre_hooks or registry._global_backward_hooks
            or registry._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for module in modules for m in module.modules())


_NUM_QUERIES_TYPES: dict = {}


def takes_num_queries(block: nn.Module) -> bool:
    """Whether ``block``'s forward takes ``num_queries`` (the zoo's own blocks), checked once per class: a block a
    user wrapped or replaced (an adapter around it) is run in full, as timm runs every block.

    Under tracing the answer is computed without the per-class cache: filling it inside traced code made
    Dynamo guard on the cache, so every model compiled twice on identical inputs (the second call saw it
    filled).

    A forward set on the instance (``block.forward = types.MethodType(...)``, a common way to instrument a module)
    replaces the class's: the block runs in full (it was called with ``num_queries`` and raised)."""
    if "forward" in block.__dict__:
        return False
    kind = type(block)
    if is_tracing():
        return _forward_takes_num_queries(kind)
    if kind not in _NUM_QUERIES_TYPES:
        _NUM_QUERIES_TYPES[kind] = _forward_takes_num_queries(kind)
    return _NUM_QUERIES_TYPES[kind]


def _forward_takes_num_queries(kind: type) -> bool:
    import inspect

    try:
        return "num_queries" in inspect.signature(kind.forward).parameters
    except (TypeError, ValueError):
        return False


def _has_forward_hooks(module: nn.Module) -> bool:
    """True when a forward (pre-)hook is registered on ``module`` or globally for every module."""
    registry = nn.modules.module  # torch's global hook dicts live there
    return bool(
        module._forward_hooks or module._forward_pre_hooks or registry._global_forward_hooks
        or registry._global_forward_pre_hooks
    )


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with (Radford et al., 2021; timm
    ``QuickGELU``, OpenCLIP's ``QuickGELU``). Its weights give different features under the exact GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


#: activation names taken by the model constructors, as timm's ``get_act_layer`` spells them
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "silu", "relu")


def create_act(name: str, options: Sequence[str] = ACTIVATIONS, what: str = "activation") -> nn.Module:
    """A fresh activation module from its timm name: "gelu" (exact, erf), "gelu_tanh" (tanh approximation,
    SigLIP 2's patch-16 towers), "quick_gelu" (OpenAI CLIP), "silu", "relu". ``options`` narrows the names a
    model accepts; ``what`` names the argument in the error."""
    if not isinstance(name, str) or name not in options:
        raise ValueError(f"{what} must be one of {tuple(options)}, got {name!r}")
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return QuickGELU()
    return nn.SiLU() if name == "silu" else nn.ReLU()


def activate_fresh(act: nn.Module, fresh: torch.Tensor, producer: Optional[nn.Module] = None) -> torch.Tensor:
    """``act(fresh)`` for a tensor the caller has just computed and holds alone (a linear, conv or norm output).

    At inference (no autograd graph, not tracing or exporting) GELU (either approximation), SiLU and ReLU run in
    place, as ``torch.ops.aten.<name>_``: no second tensor of the same size. The expanded activations of MLPs and
    inverted bottlenecks are the largest tensors of their blocks, and with glibc's default allocator each fresh
    one also pays page faults (docs/bench_agent.md). Other modules, autograd (which needs the input),
    exporters (which should see the module) and modules with forward hooks (feature extractors, activation
    statistics: the hooks must run and see the input) get the plain call. So does a ``producer`` (the submodule
    whose output ``fresh`` is, e.g. an MLP's fc1) with forward hooks: a hook may have kept that tensor.
    """
    if torch.is_grad_enabled() or is_tracing() or _has_forward_hooks(act) or (
            producer is not None and any(_has_forward_hooks(m) for m in producer.modules())):
        return act(fresh)  # (producer's submodules too: a hook on a wrapped fc1's inner Linear keeps this tensor)
    kind = type(act)
    if kind is nn.GELU:
        return torch.ops.aten.gelu_(fresh, approximate=act.approximate)
    if kind is nn.SiLU:
        return torch.ops.aten.silu_(fresh)
    if kind is nn.ReLU:
        return torch.ops.aten.relu_(fresh)
    return act(fresh)


_BLAS_DTYPES = (torch.float32, torch.float64)


def _flat_view(t: torch.Tensor) -> Optional[torch.Tensor]:
    """A 1-D view of a dense tensor stored in any dimension order (SDPA's CPU output is (B, N, H, D) in
    memory behind a (B, H, N, D) view), or None when it has gaps or overlaps."""
    if t.is_contiguous():
        return t.view(-1)
    in_memory_order = t.permute(sorted(range(t.dim()), key=lambda d: -t.stride(d)))
    return in_memory_order.view(-1) if in_memory_order.is_contiguous() else None


def surely_finite(a: torch.Tensor, b: Optional[torch.Tensor] = None) -> bool:
    """True when every element of ``a`` (and ``b``) is finite; False when one may not be (then scan them).

    A non-finite element makes a sum or dot product non-finite (NaN and Inf propagate; Inf - Inf and
    Inf * 0 are NaN), so one reduction answers for a whole tensor; an overflow of a finite sum only sends
    the caller to its exact scan. Dense fp32/fp64 tensors of equal size are reduced together as one BLAS dot
    product a . b (one call, no parallel region: ~5 us for 64k floats against ~20 us for two parallel
    sums); otherwise each is summed in fp32.
    """
    if b is a and a.dtype in _BLAS_DTYPES:  # one tensor: a . a (squares: Inf and NaN stay non-finite)
        if torch.is_grad_enabled():
            a = a.detach()
        a_flat = _flat_view(a)
        if a_flat is not None:
            return math.isfinite(torch.dot(a_flat, a_flat).item())
        return math.isfinite(float(a.sum(dtype=torch.float32)))
    if b is not None and a.dtype is b.dtype and a.dtype in _BLAS_DTYPES and a.numel() == b.numel():
        if torch.is_grad_enabled():  # detach only when a graph could be recorded (attend() calls this per call)
            a, b = a.detach(), b.detach()
        a_flat, b_flat = _flat_view(a), _flat_view(b)
        if a_flat is not None and b_flat is not None:
            return math.isfinite(torch.dot(a_flat, b_flat).item())
    a = a.detach()
    b = None if b is None else b.detach()
    total = a.sum(dtype=torch.float32)
    if b is not None:
        total = total + b.sum(dtype=torch.float32)
    return math.isfinite(float(total))


def check_image_batch(x, family: str, in_chans: int, weight: torch.Tensor) -> tuple[int, int, int, int]:
    """A vision model's input at its API boundary: a floating-point (B, in_chans, H, W) tensor of the dtype and
    device of ``weight`` (the model's first layer; any dtype under torch.autocast). Raises naming ``family``
    and what is wrong; returns the shape."""
    if not isinstance(x, torch.Tensor):
        if isinstance(x, torch.fx.Proxy):  # timm.models.create_feature_extractor / torch.fx.symbolic_trace
            raise TypeError(f"{family}: torch.fx symbolic tracing is not supported (the input checks branch on "
                            f"values); for feature maps use create_model(..., features_only=True) or "
                            f"forward_intermediates, for a graph torch.export or torch.compile")
        raise TypeError(f"{family} input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{family} input must be a 4-D image batch (B, {in_chans}, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{family} input must be a floating-point tensor, got {x.dtype}")
    if x.shape[1] != in_chans:
        raise ValueError(f"{family} expects {in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})")
    check_like_weights(x, weight, f"{family} input", "model")
    return tuple(x.shape)


def check_features(x, shape: str, width: int, width_dim: int, what: str) -> None:
    """``forward_head``'s input: a tensor of ``len(shape)`` dims (``shape`` names them, e.g. "(B, N, C)") whose
    dim ``width_dim`` is ``width`` -- what forward_features returns, not an image or pooled features."""
    if not isinstance(x, torch.Tensor) or x.dim() != len(shape.strip("()").split(",")) or x.shape[width_dim] != width:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} expects the output of forward_features, {shape} with C = {width}, got {got}")


def check_like_weights(x: torch.Tensor, weight: torch.Tensor, what: str, owner: str = "module") -> None:
    """``x`` on the device and of the dtype of ``weight`` (any dtype under torch.autocast): else an error naming
    ``what`` ("ViT input", "MultiHeadAttention: x") and both sides, instead of torch's "expected m1 and m2 to
    have the same dtype" from inside the first layer."""
    if weight.device.type == "meta":
        return
    if x.device != weight.device:
        raise ValueError(f"{what} is on {x.device} but the {owner} is on {weight.device}: move one of them "
                         f"(x.to('{weight.device}') or {owner}.to('{x.device}'))")
    autocast = torch.is_autocast_enabled(x.device.type) and x.dtype in _AUTOCAST_DTYPES  # it never casts fp64
    if x.dtype != weight.dtype and not autocast:
        raise TypeError(f"{what} is {x.dtype} but the {owner}'s weights are {weight.dtype}: convert one of them "
                        f"(the input's .to({weight.dtype}) or {owner}.to({x.dtype})), or run under torch.autocast")


_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype torch.autocast computes in on ``device_type`` now, or None when it is off there (or on meta, which
    has no autocast). Traceable: attend() asks under torch.compile, where Dynamo refuses
    torch.amp.is_autocast_available ("function marked as skipped")."""
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_off(device_type: str):
    """torch.autocast disabled for ``device_type`` ("cpu", "cuda", ...; a no-op context for a type without
    autocast, such as meta). Code that computes in fp32 on purpose (the attention backends, the fused graph
    paths) runs under it: autocast would lower its matmuls back to the half dtype."""
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def check_finite_input(x: torch.Tensor, what: str) -> None:
    """Raise ``ValueError("<what> contains NaN or Inf ...")`` for a non-finite CPU tensor.

    One fp32 sum (cheap); the element-wise scan runs only when the sum is not finite. Skipped on CUDA (it
    would force a device sync) and under tracing/compilation (it would be baked into the graph).
    """
    if x.device.type != "cpu" or is_tracing():
        return
    if not surely_finite(x) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} contains NaN or Inf values")


#: exp() on CPU leaves ATen's vector path for float32 arguments below about -87.3 (denormal or zero results) and
#: for -inf: per element 12x (-inf) to 110x (-95) slower (torch 2.11; docs/bench_attention.md), and
#: torch.set_flush_denormal does not help. A softmax of a trained model has many scores far below its row's
#: maximum, and masked scores are -inf: the zoo's CPU softmax paths keep exp() arguments at or above this.
EXP_FLOOR = -87.0
_FLUSH_BELOW = math.exp(EXP_FLOOR + 0.5)


def exp_flushed_(s: torch.Tensor) -> torch.Tensor:
    """In place: exp(s), exactly 0 where s <= EXP_FLOOR + 0.5 (-inf included), all on exp()'s vector path: clamp,
    exp, then the clamped entries zeroed (F.threshold_). For shifted softmax scores (s <= 0, the row maximum at
    0) this drops weights below 3e-38 next to the maximum's 1, far below float32 resolution; masked (-inf) entries
    stay exact zeros, and no such tiny weight reaches the products that follow, where it would become a
    denormal (slow on x86). Not for autograd (in place)."""
    return torch.nn.functional.threshold_(s.clamp_(min=EXP_FLOOR).exp_(), _FLUSH_BELOW, 0.0)


class CachesDroppedWhenCopied:
    """Mixin for an nn.Module that keeps caches derived from its parameters or inputs: pickling, ``torch.save``
    of the module and ``copy.deepcopy`` (EMA copies, export) leave them out, and they are rebuilt on the next call.
    ``_copied_without`` maps each cache attribute to a factory of its empty value (``dict``, or ``lambda: None``).
    Put it before ``nn.Module`` (or the module base) in the class's bases."""

    _copied_without: dict = {}

    def __getstate__(self):
        state = dict(super().__getstate__())
        for name, empty in self._copied_without.items():
            state[name] = empty()
        return state


class DropPath(nn.Module):
    """Stochastic depth: in training, drop a residual branch per sample with probability ``drop_prob`` and
    rescale the kept samples by 1 / (1 - drop_prob); identity in evaluation."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_path rate must be in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch: x * gamma, gamma initialised to ``init_values``."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x_BNC: torch.Tensor) -> torch.Tensor:
        return x_BNC * self.gamma
