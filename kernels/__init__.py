"""Triton GPU kernels of the zoo, each beside its PyTorch reference (installed as ``zoo.kernels``).

* :mod:`zoo.kernels.flash_attention` -- block-sparse FlashAttention-2, forward and backward, driven by
  zoo.attention block maps: ``flash_attention``, ``flash_attention_ref``, ``merge_attention_states``,
  and the "triton" backend hooks ``triton_supports`` / ``triton_attention``.
* :mod:`zoo.kernels.block_index` -- the kernel's view of a mask: per-tile lists of kept tiles (and their
  transposes for the backward pass) and the in-kernel predicate program.
* :mod:`zoo.kernels.edge_softmax` -- fused GATv2 edge softmax over CSR graphs (``gatv2_edge_softmax``).
* :mod:`zoo.kernels.vector_softmax` -- vector attention's per-channel softmax and weighted sum over CSR graphs
  (``vector_softmax_sum``, the forward of zoo.attention.segment_softmax_weighted_sum on CUDA).

Names are imported lazily: ``import zoo.kernels`` does not import Triton. Set ``TRITON_INTERPRET=1``
before the first import of a kernel module to run the kernels on CPU tensors (tests, CI). See
docs/kernels.md.
"""
import importlib

_LAZY = {
    "flash_attention": "zoo.kernels.flash_attention",
    "flash_attention_ref": "zoo.kernels.flash_attention",
    "merge_attention_states": "zoo.kernels.flash_attention",
    "triton_supports": "zoo.kernels.flash_attention",
    "triton_attention": "zoo.kernels.flash_attention",
    "tile_lists": "zoo.kernels.block_index",
    "kernel_tile_lists": "zoo.kernels.block_index",
    "lower_mask": "zoo.kernels.block_index",
    "gatv2_edge_softmax": "zoo.kernels.edge_softmax",
    "gatv2_edge_softmax_ref": "zoo.kernels.edge_softmax",
    "vector_softmax_sum": "zoo.kernels.vector_softmax",
    "vector_softmax_sum_ref": "zoo.kernels.vector_softmax",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'zoo.kernels' has no attribute {name!r}")
