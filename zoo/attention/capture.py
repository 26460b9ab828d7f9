"""Capture attention weights for pictures and analysis.

    with zoo.attention.capture_attention() as maps:
        model(images)
    maps[0].name, maps[0].weights   # (B, H, Nq, Nk) per MultiHeadAttention call, in call order

While a capture is active, attention modules call ``attend(..., return_weights=True)`` (the reference
backend, which returns the probabilities) and :func:`record` the weights, detached. Nothing is recorded
and nothing is slowed down outside the context manager.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn

__all__ = ["AttentionRecord", "capture_attention", "is_capturing", "record"]


@dataclass
class AttentionRecord:
    name: str  # qualified module name when known, else the module's class name
    weights: torch.Tensor  # (B, H, Nq, Nk) attention probabilities, detached
    module: nn.Module | None = None


_ACTIVE: list[list[AttentionRecord]] = []


def is_capturing() -> bool:
    return bool(_ACTIVE)


def record(module: nn.Module | None, weights: torch.Tensor, name: str | None = None) -> None:
    """Append ``weights`` to every active capture."""
    if not _ACTIVE:
        return
    label = name or getattr(module, "zoo_name", None) or type(module).__name__
    for sink in _ACTIVE:
        sink.append(AttentionRecord(label, weights.detach(), module))


@contextlib.contextmanager
def capture_attention(model: nn.Module | None = None) -> Iterator[list[AttentionRecord]]:
    """Record the attention weights of every attention module called inside the block.

    If ``model`` is given, its submodules are labelled with their qualified names first
    (e.g. ``blocks.3.attn``), so records can be matched to layers.
    """
    if model is not None:
        for name, module in model.named_modules():
            module.zoo_name = name  # type: ignore[attr-defined]
    sink: list[AttentionRecord] = []
    _ACTIVE.append(sink)
    try:
        yield sink
    finally:
        for i, active in enumerate(_ACTIVE):
            if active is sink:
                del _ACTIVE[i]
                break
