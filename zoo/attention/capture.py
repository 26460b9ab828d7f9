"""Capture attention weights for pictures and analysis.

    with zoo.attention.capture_attention() as maps:
        model(images)
    maps[0].name, maps[0].weights   # (B, H, Nq, Nk) per MultiHeadAttention call, in call order
                                    # (AttentionPoolLatent, global_pool="map", is not recorded)

While a capture is active, attention modules call ``attend(..., return_weights=True)`` and :func:`record` the
weights, detached. Such a call runs on the reference backend, which returns the probabilities, also inside a
``use_backend(...)`` block or under ``ZOO_ATTN_BACKEND`` (a pin serves the calls that need no weights; see
zoo.attention.backends). Nothing is recorded
and nothing is slowed down outside the context manager.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn

__all__ = ["AttentionRecord", "capture_attention", "is_capturing", "record"]


@dataclass
class AttentionRecord:
    name: str  # qualified module name when known, else the module's class name
    weights: torch.Tensor  # (B, H, Nq, Nk) attention probabilities, detached
    module: nn.Module | None = None
    extra: dict = field(default_factory=dict)  # a module's other maps (AgentAttention: "agent", "broadcast", "grid")


@dataclass
class _Capture:
    sink: list[AttentionRecord]
    names: dict[int, str]  # id(module) -> qualified name in the model given to capture_attention


class _ThreadCaptures(threading.local):
    """The captures open in this thread: a capture_attention block records this thread's attention calls only (a
    process-wide list gave one thread's capture every other thread's maps, and sent those threads down the capture
    path), as torch's own modes are per thread."""

    def __init__(self) -> None:
        self.active: list[_Capture] = []


_STATE = _ThreadCaptures()


def is_capturing() -> bool:
    return bool(_STATE.active)


def record(module: nn.Module | None, weights: torch.Tensor, name: str | None = None, **extra) -> None:
    """Append ``weights`` (and ``extra`` maps, kept in the record only) to every active capture, named as that
    capture's model names ``module``."""
    active = _STATE.active
    if not active:
        return
    weights = weights.detach()
    extra = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
    for capture in active:
        label = name or capture.names.get(id(module)) or type(module).__name__
        capture.sink.append(AttentionRecord(label, weights, module, dict(extra)))


@contextlib.contextmanager
def capture_attention(model: nn.Module | None = None) -> Iterator[list[AttentionRecord]]:
    """Record the attention weights of the attention modules called inside the block that record them:
    :class:`zoo.attention.MultiHeadAttention` (and the blocks built on it), :class:`zoo.attention.AgentAttention` and
    MaxViT's partition attention. Not recorded: :class:`zoo.attention.AttentionPoolLatent` (the latent-query pooling
    head of ``global_pool="map"`` ViTs, SigLIP's MAP head), other modules and direct :func:`attend` calls, so a
    rollout of a "map" model covers its transformer blocks, not its pooling head.

    If ``model`` is given, records of its submodules carry their qualified names in it (e.g. ``blocks.3.attn``),
    so records can be matched to layers; the modules themselves are not touched.
    """
    names = {} if model is None else {id(module): name for name, module in model.named_modules()}
    capture = _Capture([], names)
    active = _STATE.active
    active.append(capture)
    try:
        yield capture.sink
    finally:
        for i, open_capture in enumerate(active):
            if open_capture is capture:
                del active[i]
                break
