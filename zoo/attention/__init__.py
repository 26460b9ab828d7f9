"""The attention core shared by every model in the zoo.

    from zoo.attention import attend, Causal, Window, Segments
    out = attend(q, k, v, mask=Causal() & Window(128, 0))

See core.py (attend and the reference backend), masks.py (mask objects and block maps), bias.py
(bias objects), backends.py (backend registry and selection), capture.py (attention-map capture).
Modules built on attend() (MultiHeadAttention, AgentAttention) and the attention that is not QK^T
(GATv2Conv, GATConv: graph.py; PointTransformerConv, vector attention: vector.py) are exported here too.
"""
from zoo.attention.masks import (
    EMPTY,
    FULL,
    PARTIAL,
    And,
    BlockMap,
    BlockSparse,
    Causal,
    ChunkWindow,
    Dense,
    Edges,
    Full,
    KeyPadding,
    Mask,
    MaskMod,
    Or,
    SegmentChunkWindow,
    SegmentWindow,
    Segments,
    Window,
    as_mask,
)
from zoo.attention.bias import AttentionBias
from zoo.attention.backends import list_backends, register_backend, use_backend
from zoo.attention.core import attend, attention_reference, merge_attention_states
from zoo.attention.capture import AttentionRecord, capture_attention

_LAZY = {
    # name: module that defines it (imported on first access, unless attend()'s optional backends have
    # already imported it: radial, sparse and alibi are; keeps `import zoo.attention` light and lets modules that
    # are still being written not break the core)
    "MultiHeadAttention": "zoo.attention.modules",
    "Mlp": "zoo.attention.modules",
    "KVCache": "zoo.attention.modules",
    "AttentionPoolLatent": "zoo.attention.modules",
    "RotaryEmbedding": "zoo.attention.rope",
    "Radial": "zoo.attention.radial",
    "radial_block_mask": "zoo.attention.radial",
    "radial_token_mask": "zoo.attention.radial",
    "DenseWarmup": "zoo.attention.radial",
    "block_sparse_attention": "zoo.attention.sparse",
    "AgentAttention": "zoo.attention.agent",
    "GATv2Conv": "zoo.attention.graph",
    "GATConv": "zoo.attention.graph",
    "TransformerConv": "zoo.attention.graph",
    "PointTransformerConv": "zoo.attention.vector",
    "ALiBi": "zoo.attention.alibi",
    "alibi_slopes": "zoo.attention.alibi",
    "RelPosBiasTf": "zoo.attention.relpos",
    "RelPosMlp": "zoo.attention.relpos",
    "resize_rel_pos_table": "zoo.attention.relpos",
    "TransformerXLRelPos": "zoo.attention.relpos_xl",
    "relative_sinusoids": "zoo.attention.relpos_xl",
    "rel_shift": "zoo.attention.relpos_xl",
    "segment_softmax": "zoo.attention.segment",
    "segment_softmax_weighted_sum": "zoo.attention.segment",
}


# Backends defined in other modules (the block-sparse one) register on import. Importing them here, once,
# instead of on the first attend() call keeps attend() free of imports, which torch.compile cannot trace.
from zoo.attention import backends as _backends  # noqa: E402

_backends._load_optional_backends()


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later accesses are plain attribute lookups
        return value
    raise AttributeError(f"module 'zoo.attention' has no attribute {name!r}")


def __dir__():  # the lazy names too (tab completion, dir(zoo.attention))
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "attend",
    "attention_reference",
    "merge_attention_states",
    "Mask",
    "Full",
    "Causal",
    "Window",
    "ChunkWindow",
    "Segments",
    "SegmentWindow",
    "SegmentChunkWindow",
    "Dense",
    "KeyPadding",
    "BlockSparse",
    "Edges",
    "MaskMod",
    "And",
    "Or",
    "as_mask",
    "BlockMap",
    "EMPTY",
    "PARTIAL",
    "FULL",
    "AttentionBias",
    "register_backend",
    "use_backend",
    "list_backends",
    "capture_attention",
    "AttentionRecord",
    *_LAZY,
]
