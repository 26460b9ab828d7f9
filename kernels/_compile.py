"""Ahead-of-time compilation of the zoo's Triton kernels for a CUDA target without a GPU (Triton's bundled
ptxas): the ``compile_check`` functions of the kernel modules use it so that CPU-only CI catches GPU-only
compile errors and shared-memory overflows. Kernel modules must be imported without TRITON_INTERPRET=1."""
from __future__ import annotations

import torch
import triton

__all__ = ["compile_for_gpu", "pointer_type"]


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
