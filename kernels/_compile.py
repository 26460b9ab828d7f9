"""What the zoo's Triton kernel modules share about launching and compiling their kernels.

* :func:`on_device_of`: the CUDA device guard around every launch. Triton launches on the *current* CUDA device
  and its current stream (Triton 3.6, ``triton/runtime/jit.py``: ``driver.active.get_current_device()``, which is
  ``torch.cuda.current_device``), not on the device of the tensors it is given; FlashAttention's CUDA extension
  opens a ``CUDAGuard`` on ``q.device()`` for the same reason.
* :func:`single_config_requested`: ``ZOO_TRITON_SINGLE_CONFIG=1`` asks every kernel module for one autotune
  config per kernel on a GPU too (correctness runs compile a few times less; tests/run_gpu_kernels.sh sets it).
* :func:`compile_for_gpu`: ahead-of-time compilation for a CUDA target without a GPU (Triton's bundled ptxas):
  the ``compile_check`` functions of the kernel modules use it so that CPU-only CI catches GPU-only compile
  errors and shared-memory overflows. Kernel modules must be imported without TRITON_INTERPRET=1 for it.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton

__all__ = ["compile_for_gpu", "on_device_of", "pointer_type", "single_config_requested"]


def on_device_of(tensor: torch.Tensor):
    """Context manager under which kernels that read and write ``tensor`` are launched: ``torch.cuda.device`` of
    its device for a CUDA tensor (so a model moved to cuda:1 is not run, autotuned and compiled on cuda:0 while
    that one is current), nothing for a CPU tensor (the interpreter)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def single_config_requested() -> bool:
    """Whether ``ZOO_TRITON_SINGLE_CONFIG=1`` is set: one autotune config per kernel instead of the tuned list (read
    by each kernel module when it is imported, since its autotuners are built then)."""
    return os.environ.get("ZOO_TRITON_SINGLE_CONFIG", "0") == "1"


def pointer_type(dtype: torch.dtype) -> str:
    """Triton signature type of a pointer to ``dtype`` elements (the kernels' fp16 / bf16 / fp32 inputs)."""
    return {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]


def compile_for_gpu(kernel, types: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int = 1,
                    default_type: str = "i32") -> int:
    """Compile one specialisation of ``kernel`` (a @triton.jit function, or an autotuner around one) for
    sm_<arch>; returns its shared memory in bytes.

    ``types``: Triton signature types of the runtime parameters ("*fp16", "*i64", "fp32", ...); parameters named
    in neither ``types`` nor ``constexprs`` are ``default_type``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(kernel, "fn", kernel)
    signature = {p.name: "constexpr" if p.name in constexprs else types.get(p.name, default_type) for p in fn.params}
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    return int(compiled.metadata.shared)
