"""Attention masks as objects.

A mask says WHICH (query, key) pairs may attend. Every mask answers two questions:

* ``dense(q_len, k_len)`` -- the truth: a bool tensor broadcastable to (B, H, Nq, Nk), always 4-D
  with size-1 batch/head dims where the mask does not depend on them. Used by the reference backend,
  by SDPA (as a boolean mask) and by tests. ``rows=(start, stop)`` gives just those query rows, so the
  chunked reference path never builds the whole Nq x Nk matrix.
* ``block_map(q_len, k_len, block_q, block_k)`` -- a :class:`BlockMap`: for every (query tile,
  key tile) whether it is EMPTY (skip), FULL (no element-wise masking needed) or PARTIAL. This is what
  the block-sparse kernels iterate over (like FlexAttention's BlockMask). For structured masks
  (Full, Causal, Window, ChunkWindow, Segments, SegmentWindow, SegmentChunkWindow, KeyPadding, BlockSparse,
  Edges and their combinations) it is computed from tile
  coordinates and never materialises Nq x Nk. Results are cached per (shape, tiles, device).

Masks combine with ``&`` (both allow) and ``|`` (either allows).

Alignment when Nq != Nk: query i sits at key position ``i + (Nk - Nq)`` ("bottom-right", as in
FlashAttention >= 2.1 and ``torch.nn.attention.bias.causal_lower_right``), so a query block attending
to a KV cache behaves as the last rows of the square mask. For Nq == Nk this is the usual diagonal.

Letters: B batch, H heads, Nq/Nk query/key lengths, QB/KB number of query/key tiles.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import threading
import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from zoo.layers import check_ints, is_int, is_tracing, positive_int, to_pair

__all__ = [
    "EMPTY",
    "PARTIAL",
    "FULL",
    "BlockMap",
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
]

EMPTY, PARTIAL, FULL = 0, 1, 2
_VERSION_KEY = "__mask_version__"  # the entry of a per-mask cache that records the version it was filled at
# Problem sizes one mask object keeps derived data for (block maps, kernel tile lists and programs): a mask
# reused while the key length grows (decoding with a KV cache) would otherwise keep one entry per step.
CACHE_ENTRIES_PER_MASK = 32


# Taken around the size-changing operations of the bounded caches (cache_put, a version change in
# Mask.versioned_cache): threads sharing one model or mask (a server's thread pool) evicted the same entry at once
# (KeyError) or iterated a cache that another thread was changing (RuntimeError). Lookups take no lock: readers do
# ``hit = cache.get(key)``, and on a miss build into a local, ``cache_put`` it and return the local (never
# ``if key in cache: return cache[key]``: another thread may evict in between). Reentrant: dropping an entry may run
# a finalizer that fills another cache.
_CACHE_LOCK = threading.RLock()


def _cache_lock():
    """``_CACHE_LOCK``, or no lock while torch.compile / export traces the caller (Dynamo cannot enter a lock, and
    a traced graph's cache updates run at trace time, in the tracing thread)."""
    return contextlib.nullcontext() if is_tracing() else _CACHE_LOCK


def cache_put(cache: dict, key, value, limit: int = CACHE_ENTRIES_PER_MASK) -> None:
    """``cache[key] = value`` in a bounded cache (per-mask derived data, a layer's per-size tables), dropping its
    oldest entries beyond ``limit`` entries (the version record of :meth:`Mask.versioned_cache` does not count).
    Safe when threads share the cache (see ``_CACHE_LOCK`` for the reader's side)."""
    with _cache_lock():
        if key not in cache:
            entries = [k for k in cache if k != _VERSION_KEY]
            for oldest in entries[: max(0, len(entries) - limit + 1)]:
                del cache[oldest]
        cache[key] = value


@dataclass(frozen=True)
class BlockMap:
    """Tile states of a mask: ``states`` int8 (Bm, Hm, QB, KB) with values EMPTY / PARTIAL / FULL.

    Bm is 1 or the batch size and Hm is 1 or the number of heads (masks that do not depend on the
    batch or head keep size 1). Tile (a, b) covers query rows [a*block_q, (a+1)*block_q) and key
    columns [b*block_k, (b+1)*block_k), cropped to the sequence lengths. FULL means every in-range pair
    of the tile is allowed; the kernels still bound-check the sequence ends themselves.
    """

    states: torch.Tensor
    block_q: int
    block_k: int
    q_len: int
    k_len: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.states.shape[-2:])  # type: ignore[return-value]

    def kept(self) -> torch.Tensor:
        """bool (Bm, Hm, QB, KB): tiles that must be visited (PARTIAL or FULL)."""
        return self.states != EMPTY

    def kept_fraction(self) -> float:
        """Fraction of tiles visited (averaged over batch and heads)."""
        return float(self.kept().float().mean())

    def transposed(self) -> "BlockMap":
        """Key-major map (for the backward pass: for each key tile, the query tiles that see it)."""
        return BlockMap(self.states.transpose(-1, -2).contiguous(), self.block_k, self.block_q, self.k_len, self.q_len)

    def to_dense(self) -> torch.Tensor:
        """bool (Bm, Hm, Nq, Nk) with every kept tile on: an upper bound of the mask it came from."""
        kept = self.kept()
        dense = kept.repeat_interleave(self.block_q, dim=-2).repeat_interleave(self.block_k, dim=-1)
        return dense[..., : self.q_len, : self.k_len]


def _num_blocks(length: int, block: int) -> int:
    return max(1, math.ceil(length / block))


def _check_lengths(q_len: int, k_len: int) -> None:
    # SymInt: a symbolic length (torch.export / torch.compile with a dynamic sequence dim)
    if not (isinstance(q_len, (int, torch.SymInt)) and isinstance(k_len, (int, torch.SymInt))) or q_len < 1 or k_len < 1:
        raise ValueError(f"sequence lengths must be positive ints, got q_len={q_len!r}, k_len={k_len!r}")


class Mask:
    """Base class. Subclasses implement ``_dense_rows`` and ``_block_states``."""

    #: True when the mask forbids nothing (lets backends skip masking altogether).
    is_full: bool = False

    def __init__(self) -> None:
        self._block_cache: dict = {}

    def __getstate__(self):
        # pickle / torch.save(model) / copy.deepcopy: without the block maps derived from the mask (rebuilt on use);
        # their version records hold weak references, which cannot be pickled (a model keeping a Radial mask it had
        # used failed to save)
        state = dict(self.__dict__)
        for key in ("_block_cache", "_positions"):
            if key in state:
                state[key] = {}
        return state

    # ---- public API -------------------------------------------------------------------------
    def dense(self, q_len: int, k_len: int, device=None, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """bool (Bm, Hm, R, Nk) for query rows ``rows`` (default all): True where attention is allowed."""
        _check_lengths(q_len, k_len)
        start, stop = (0, q_len) if rows is None else rows
        if not (0 <= start < stop <= q_len):
            raise ValueError(f"rows {rows} out of range for q_len={q_len}")
        self.check_shape(q_len, k_len)
        out = self._dense_rows(q_len, k_len, start, stop, device)
        assert out.dim() == 4 and out.dtype == torch.bool, type(self).__name__
        return out

    def block_map(self, q_len: int, k_len: int, block_q: int, block_k: Optional[int] = None, device=None) -> BlockMap:
        """Tile states at the given tile sizes (cached per shape, tile size and device)."""
        _check_lengths(q_len, k_len)
        block_k = block_q if block_k is None else block_k
        if block_q < 1 or block_k < 1:
            raise ValueError(f"block sizes must be >= 1, got {block_q}, {block_k}")
        self.check_shape(q_len, k_len)
        if is_tracing():  # not cached while traced: see _build_block_map
            return self._build_block_map(q_len, k_len, block_q, block_k, device)
        key = (q_len, k_len, block_q, block_k, str(device))
        cache = self.versioned_cache(self.__dict__.setdefault("_block_cache", {}))
        bmap = cache.get(key)  # one lookup: another thread may evict between a test and a read
        if bmap is None:
            bmap = self._build_block_map(q_len, k_len, block_q, block_k, device)
            cache_put(cache, key, bmap)
        return bmap

    def _build_block_map(self, q_len, k_len, block_q, block_k, device) -> BlockMap:
        """The block map, uncached. :meth:`block_map` neither reads nor writes its cache under torch.export /
        torch.compile / jit tracing (zoo.layers.is_tracing), as RoPE and ALiBi keep their tables: a map built there
        holds FakeTensors or symbolic sizes, and the eager calls after the export read it (a wrong pattern, or a
        crash on the data-dependent fake values)."""
        states = self._block_states(q_len, k_len, block_q, block_k, device).to(torch.int8)
        assert states.dim() == 4, type(self).__name__
        return BlockMap(states.contiguous(), block_q, block_k, q_len, k_len)

    def check_shape(self, q_len: int, k_len: int, batch: Optional[int] = None, heads: Optional[int] = None) -> None:
        """Raise ValueError when the mask cannot apply to this problem size (default: any size fits)."""

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors the mask reads (ids, a dense mask, a block map); derived data is cached per version."""
        return ()

    def version(self) -> tuple:
        """A key of everything the mask's derived data depends on; it changes when the mask changes:

        * a tensor of :meth:`tensors` edited in place (its version counter) or replaced by another tensor (even one
          allocated at the freed address of the recorded one: see :class:`_SameObject`);
        * a public setting reassigned (``window.left = 8``), in this mask or in the masks it is built from;
        * for a :class:`MaskMod`, its predicate reassigned or a plain value it reads changed (see
          :meth:`MaskMod.version`).

        Edits that bypass the version counter (through ``.data``, or a numpy array sharing the memory) are not
        seen: build a new mask after such an edit. Tensors made under ``torch.inference_mode()`` have no version
        counter: a mask reading one gets a new key at every call (its derived data is rebuilt each time)."""
        return self._version_with(self.tensors())

    def _version_with(self, tensors) -> tuple:
        """:meth:`version` from the public settings and the given :meth:`tensors`."""
        parts = []
        for name, value in vars(self).items():
            if name.startswith("_"):
                continue
            if isinstance(value, Mask):
                parts.append(value.version())
            elif value is None or isinstance(value, (bool, int, float, str, tuple)):
                parts.append(value)
        for t in tensors:
            if t.is_inference():
                return (object(),)  # equal to nothing: no version counter to tell an edit
            parts.append((_SameObject(t), t._version))
        return tuple(parts)

    def versioned_cache(self, cache: dict) -> dict:
        """``cache``, a dict of data derived from this mask (block maps, kernel tile lists, plans), emptied when the
        mask changed since it was filled (see :meth:`version`): every backend then sees the edit, as the dense mask
        does (cached block maps used to keep the old pattern, silently)."""
        version = self.version()
        recorded = cache.get(_VERSION_KEY)
        if recorded is None or recorded != version:
            with _cache_lock():  # no cache_put of another thread iterates the cache meanwhile
                if cache.get(_VERSION_KEY, version) != version:
                    cache.clear()
                cache[_VERSION_KEY] = version
        return cache

    @property
    def batch_size(self) -> int:
        """1 when the mask does not depend on the batch, else the batch size it was built for."""
        return 1

    @property
    def num_heads(self) -> int:
        return 1

    def __and__(self, other: "Mask") -> "Mask":
        return And(self, as_mask(other))

    def __or__(self, other: "Mask") -> "Mask":
        return Or(self, as_mask(other))

    # a bool tensor on the left (``keep & Causal()``): torch's operator gives way to these
    def __rand__(self, other) -> "Mask":
        return And(as_mask(other), self)

    def __ror__(self, other) -> "Mask":
        return Or(as_mask(other), self)

    # ---- to implement -------------------------------------------------------------------------
    def _dense_rows(self, q_len, k_len, start, stop, device) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _block_states(self, q_len, k_len, block_q, block_k, device) -> torch.Tensor:
        """Default: reduce the dense mask (only for masks that are dense anyway)."""
        dense = self.dense(q_len, k_len, device)
        return _states_from_dense(dense, block_q, block_k)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _SameObject:
    """A part of :meth:`Mask.version` standing for one object (a tensor the mask reads, a MaskMod predicate): equal
    only to a record of the same object, while that object lives. The version used to record ``id(tensor)`` alone,
    keeping nothing alive: a replacement tensor allocated at the freed address, with version counter 0, matched the
    record, and the block maps and plans of the old pattern were served. ``zoo.layers.weights_stamp`` keeps the
    weights themselves in its cache entries; here a weak reference does the same job (a dead one equals nothing, so
    a reused id never matches) without keeping a replaced tensor alive, or keeping alive, through the module-level
    plan caches (WeakKeyDictionary values), a predicate that reaches its own mask (a bound method of the object
    holding the mask). Objects without weak references are held strongly."""

    __slots__ = ("_ref", "_obj")

    def __init__(self, obj) -> None:
        try:
            self._ref, self._obj = weakref.ref(obj), None
        except TypeError:
            self._ref, self._obj = None, obj

    def target(self):
        """The object, or None once it is gone."""
        return self._obj if self._ref is None else self._ref()

    def __eq__(self, other) -> bool:
        if not isinstance(other, _SameObject):
            return NotImplemented
        obj = self.target()
        return obj is not None and obj is other.target()

    def __hash__(self) -> int:
        return id(self.target())


def _states_from_dense(dense: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """EMPTY/PARTIAL/FULL per tile of a dense bool (Bm, Hm, Nq, Nk); out-of-range cells count as allowed
    for FULL and as forbidden for EMPTY."""
    *lead, q_len, k_len = dense.shape
    qb, kb = _num_blocks(q_len, block_q), _num_blocks(k_len, block_k)
    pad = (0, kb * block_k - k_len, 0, qb * block_q - q_len)
    tiles_any = torch.nn.functional.pad(dense, pad, value=False)
    tiles_all = torch.nn.functional.pad(dense, pad, value=True)
    tiles_any = tiles_any.reshape(*lead, qb, block_q, kb, block_k).any(dim=-1).any(dim=-2)
    tiles_all = tiles_all.reshape(*lead, qb, block_q, kb, block_k).all(dim=-1).all(dim=-2)
    states = torch.full(tiles_any.shape, PARTIAL, dtype=torch.int8, device=dense.device)
    states[~tiles_any] = EMPTY
    states[tiles_all] = FULL
    return states


def _tile_bounds(length: int, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last (inclusive, cropped) index of every tile."""
    n = _num_blocks(length, block)
    first = torch.arange(n, device=device) * block
    last = torch.clamp(first + block - 1, max=length - 1)
    return first, last


def _check_band(mask_name: str, unit: str, left, right) -> None:
    """Window / ChunkWindow bounds: ints or None (unbounded) that leave some ``unit`` allowed."""
    for name, value in (("left", left), ("right", right)):
        if value is not None and (not is_int(value) or isinstance(value, torch.Tensor)):
            raise TypeError(f"{mask_name} {name} must be an int or None, got {value!r}")
        if value is not None and abs(int(value)) >= 2**62:  # positions are int64 tensors: no such distance exists
            raise ValueError(f"{mask_name} {name}={value} is beyond any sequence length: use {name}=None for an "
                             f"unbounded side")
    if left is not None and right is not None and left + right < 0:
        raise ValueError(f"{mask_name}(left={left}, right={right}) allows no {unit} at all")


class _CheckedSettings:
    """Mixin for masks whose scalar settings may be reassigned after construction (``window.left = 8``, as
    docs/core.md invites): an assignment to a name in ``_SETTINGS`` runs the constructor's own checks
    (:meth:`_checked_settings`) on the mask's settings with the new value, so a mask never holds a setting that
    its constructor refuses. (Unchecked, ``window.left = -5`` zeroed every row silently, ``chunk.chunk_size = 0``
    raised a bare ZeroDivisionError inside a backend, and ``chunk_size = 2.5`` was computed by some backends and
    refused by others.) A valid change moves :meth:`Mask.version`, so cached block maps are rebuilt.

    Placed before :class:`Mask` in the bases (the frozen dataclass Mask cannot define ``__setattr__`` itself)."""

    #: The settings checked on assignment; the constructor sets them through :meth:`_init_settings`.
    _SETTINGS: tuple[str, ...] = ()

    def _checked_settings(self, settings: dict) -> dict:  # pragma: no cover - every user overrides it
        """``settings`` (a value for every name of ``_SETTINGS``) checked and normalised as the constructor does;
        raises TypeError / ValueError naming the problem."""
        raise NotImplementedError

    def _init_settings(self, **settings) -> None:
        """The constructor's assignment of every setting at once (checked together: bounds depend on each other)."""
        for name, value in self._checked_settings(settings).items():
            object.__setattr__(self, name, value)  # (not __dict__.update: torch.compile cannot trace that)

    def __setattr__(self, name: str, value) -> None:
        if name in self._SETTINGS:
            # (.get: a setting deleted with ``del mask.mask`` is being set again)
            proposed = {setting: self.__dict__.get(setting) for setting in self._SETTINGS}
            proposed[name] = value
            value = self._checked_settings(proposed)[name]
        super().__setattr__(name, value)


def _checked_band(mask_name: str, unit: str, settings: dict) -> dict:
    """``settings`` with ``left`` / ``right`` checked by :func:`_check_band` and made Python ints (numpy ints too:
    they become kernel arguments)."""
    left, right = settings["left"], settings["right"]
    _check_band(mask_name, unit, left, right)
    return {**settings, "left": None if left is None else int(left), "right": None if right is None else int(right)}


def _band_rows(rel: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """bool (1, 1, R, Nk): ``lo <= rel <= hi`` for the (R, Nk) position differences ``rel`` (+-inf: unbounded)."""
    # Out of place: the TorchScript ONNX exporter (torch.onnx.export(dynamo=False)) has no aten::__iand_, so an
    # in-place ``&=`` failed the export of every materialised Window, ChunkWindow, Causal and SegmentWindow mask.
    allowed = torch.ones(rel.shape, dtype=torch.bool, device=rel.device)
    if lo != -math.inf:
        allowed = allowed & (rel >= lo)
    if hi != math.inf:
        allowed = allowed & (rel <= hi)
    return allowed[None, None]


def _band_states(q_first, q_last, k_first, k_last, lo: float, hi: float) -> torch.Tensor:
    """int8 (1, 1, QB, KB) tile states of ``lo <= key position - query position <= hi``, from the first and last
    position of every query and key tile. Positions must step by at most one from index to index (token
    positions, chunk numbers), so that every difference between a tile's extremes occurs in it: the tile spans
    [k_first - q_last, k_last - q_first] and the states are exact."""
    rel_min = (k_first[None, :] - q_last[:, None]).double()
    rel_max = (k_last[None, :] - q_first[:, None]).double()
    empty = (rel_max < lo) | (rel_min > hi)
    full = (rel_min >= lo) & (rel_max <= hi)
    states = torch.full(empty.shape, PARTIAL, dtype=torch.int8, device=empty.device)
    states[empty] = EMPTY
    states[full] = FULL
    return states[None, None]


class Full(Mask):
    """Every query attends to every key."""

    is_full = True

    def _dense_rows(self, q_len, k_len, start, stop, device):
        return torch.ones(1, 1, stop - start, k_len, dtype=torch.bool, device=device)

    def _block_states(self, q_len, k_len, block_q, block_k, device):
        qb, kb = _num_blocks(q_len, block_q), _num_blocks(k_len, block_k)
        return torch.full((1, 1, qb, kb), FULL, dtype=torch.int8, device=device)


class Window(_CheckedSettings, Mask):
    """Band mask: query i (at key position p = i + Nk - Nq) sees keys j with p - left <= j <= p + right.

    ``left`` / ``right`` of ``None`` mean unbounded. ``Window(None, 0)`` is causal; ``Window(w, 0)`` is
    causal sliding-window attention (Mistral-style with window w + 1 keys); ``Window(r, r)`` is a
    symmetric local window. Computed from indices in every backend. ``left`` and ``right`` may be reassigned;
    an assignment is checked as the constructor checks them.
    """

    _SETTINGS = ("left", "right")

    def __init__(self, left: Optional[int] = None, right: Optional[int] = None) -> None:
        super().__init__()
        self._init_settings(left=left, right=right)

    def _checked_settings(self, settings: dict) -> dict:
        return _checked_band("Window", "key", settings)

    def offsets(self, q_len: int, k_len: int) -> tuple[float, float]:
        """Allowed range of ``j - i`` as (lo, hi), bounds inclusive, +-inf when unbounded."""
        shift = k_len - q_len
        lo = -math.inf if self.left is None else shift - self.left
        hi = math.inf if self.right is None else shift + self.right
        return lo, hi

    def _dense_rows(self, q_len, k_len, start, stop, device):
        rel = torch.arange(k_len, device=device)[None, :] - torch.arange(start, stop, device=device)[:, None]
        return _band_rows(rel, *self.offsets(q_len, k_len))

    def _block_states(self, q_len, k_len, block_q, block_k, device):
        return _band_states(*_tile_bounds(q_len, block_q, device), *_tile_bounds(k_len, block_k, device),
                            *self.offsets(q_len, k_len))

    def __repr__(self) -> str:
        return f"Window(left={self.left}, right={self.right})"


class Causal(Window):
    """Causal mask, bottom-right aligned when Nq != Nk (see module docstring). Its bounds are fixed (the backends
    hand a square Causal to SDPA's ``is_causal``): reassigning ``left`` / ``right`` is refused; use ``Window``."""

    def __init__(self) -> None:
        super().__init__(left=None, right=0)

    def _checked_settings(self, settings: dict) -> dict:
        if settings["left"] is not None or settings["right"] != 0:
            raise AttributeError(f"Causal() has fixed bounds left=None, right=0 (got left={settings['left']!r}, "
                                 f"right={settings['right']!r}): use Window(left, right) for another band")
        return settings

    def __repr__(self) -> str:
        return "Causal()"


class ChunkWindow(_CheckedSettings, Mask):
    """Window over chunks: tokens form consecutive chunks of ``chunk_size``; a query in chunk ``a`` sees
    every key in chunks ``a - left`` .. ``a + right`` (``None`` = unbounded).

    The chunk-level analogue of :class:`Window`, for attention that is local or causal per block of
    tokens rather than per token:

    * ``ChunkWindow(c)`` (left=None, right=0) is *block-causal* attention: a token sees its whole chunk
      and every earlier one (autoregressive video with ``c = tokens_per_frame``; streaming speech
      encoders with full history).
    * ``ChunkWindow(c, left=L)`` is the streaming ASR mask of WeNet's ``subsequent_chunk_mask(size, c,
      num_left_chunks=L)`` and NeMo's ``att_context_style="chunked_limited"``: the current chunk plus
      ``L`` chunks of left context.
    * ``ChunkWindow(c, 0, 0)`` is block-diagonal (per-chunk / per-frame attention);
      ``ChunkWindow(c, 1, 1)`` lets each frame see its neighbouring frames.

    Chunks are counted from key 0. Queries are bottom-right aligned as everywhere in this module: query
    i sits at key position ``p = i + Nk - Nq`` and belongs to chunk ``floor(p / c)`` (so a KV-cache
    decoder feeding one chunk of queries at a time gets the last rows of the full mask). Queries at
    negative positions (Nq > Nk) belong to negative chunks. ``ChunkWindow(1, l, r)`` equals
    ``Window(l, r)``. Like Window it is computed from indices in every backend: its block map comes from
    tile coordinates and is exact (chunk numbers are monotone, so every chunk pair between a tile's
    first and last is present), and the Triton kernel evaluates it in its window slots. ``chunk_size``,
    ``left`` and ``right`` may be reassigned; an assignment is checked as the constructor checks them.
    """

    _SETTINGS = ("chunk_size", "left", "right")

    def __init__(self, chunk_size: int, left: Optional[int] = None, right: Optional[int] = 0) -> None:
        super().__init__()
        self._init_settings(chunk_size=chunk_size, left=left, right=right)

    def _checked_settings(self, settings: dict) -> dict:
        chunk_size = positive_int(settings["chunk_size"], "ChunkWindow chunk_size")
        return {**_checked_band("ChunkWindow", "chunk", settings), "chunk_size": chunk_size}

    def chunk_bounds(self) -> tuple[float, float]:
        """Allowed range of ``key chunk - query chunk`` as (lo, hi), inclusive, +-inf when unbounded."""
        lo = -math.inf if self.left is None else -self.left
        hi = math.inf if self.right is None else self.right
        return lo, hi

    def _query_chunks(self, index: torch.Tensor, q_len: int, k_len: int) -> torch.Tensor:
        """Chunk numbers of query rows ``index`` (bottom-right aligned; negative positions floor down)."""
        return torch.div(index + (k_len - q_len), self.chunk_size, rounding_mode="floor")

    def _dense_rows(self, q_len, k_len, start, stop, device):
        q_chunk = self._query_chunks(torch.arange(start, stop, device=device), q_len, k_len)
        rel = (torch.arange(k_len, device=device) // self.chunk_size)[None, :] - q_chunk[:, None]
        return _band_rows(rel, *self.chunk_bounds())

    def _block_states(self, q_len, k_len, block_q, block_k, device):
        # Chunk numbers step by at most one from token to token, as _band_states needs.
        q_chunks = (self._query_chunks(t, q_len, k_len) for t in _tile_bounds(q_len, block_q, device))
        k_chunks = (t // self.chunk_size for t in _tile_bounds(k_len, block_k, device))
        return _band_states(*q_chunks, *k_chunks, *self.chunk_bounds())

    def __repr__(self) -> str:
        return f"ChunkWindow(chunk_size={self.chunk_size}, left={self.left}, right={self.right})"


class Segments(_CheckedSettings, Mask):
    """Tokens attend only inside their own segment (packed variable-length batches, 3D part attention).

    ``ids``: int tensor (N,) or (B, N) of segment ids for the queries; ``kv_ids`` the same for the keys
    (default: ``ids``, i.e. self-attention). A negative id marks padding: such a key is never attended
    and such a query attends to nothing (its output row is zero).
    The block map is exact for sorted ids (the packed-varlen case) and conservative (PARTIAL where
    unsure, never wrong) otherwise. :meth:`from_lengths` builds the ids of a right-padded batch from its lengths,
    :meth:`from_cu_seqlens` those of sequences packed as FlashAttention's varlen API packs them.
    """

    _SETTINGS = ("q_ids", "kv_ids")

    def __init__(self, ids: torch.Tensor, kv_ids: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self._init_settings(q_ids=ids, kv_ids=kv_ids)

    def _checked_settings(self, settings: dict) -> dict:
        """The ids checked as the constructor checks them, also when reassigned (``segments.kv_ids = ...``;
        ``kv_ids = None``: the keys' ids are the queries')."""
        q_ids = self._check_ids(settings["q_ids"], "ids")
        kv_ids = q_ids if settings["kv_ids"] is None else self._check_ids(settings["kv_ids"], "kv_ids")
        if q_ids.shape[0] != kv_ids.shape[0] and 1 not in (q_ids.shape[0], kv_ids.shape[0]):
            raise ValueError(f"Segments: ids batch {q_ids.shape[0]} and kv_ids batch {kv_ids.shape[0]} differ")
        return {"q_ids": q_ids, "kv_ids": kv_ids}

    @classmethod
    def from_lengths(cls, lengths, max_len: Optional[int] = None, *, kv_lengths=None,
                     kv_max_len: Optional[int] = None) -> "Segments":
        """Padding of a right-padded batch: row b holds ``lengths[b]`` tokens, then padding (the layout of
        torchaudio, ESPnet and NeMo, which pass the lengths beside the (B, T, ...) batch).

        ``lengths``: B ints >= 0 (a list or an integer tensor); ``max_len``: the padded length T (default
        ``max(lengths)``). Empty batches are described too, as nn.MultiheadAttention takes a (0, T) or (B, 0)
        ``key_padding_mask``: no lengths (B = 0) with ``max_len`` given, and ``max_len=0`` (every length 0) for
        sequences of no token. For cross attention over a context padded differently, ``kv_lengths`` and
        ``kv_max_len`` describe the keys (default: the queries'). Padded keys are never attended; a padded
        query attends to nothing and its output row is zero (nn.MultiheadAttention's ``key_padding_mask``
        gives such rows an average over the valid keys instead; both are discarded downstream). The ids describe
        Nq = Nk = ``max_len``: to hide padded keys from any number of queries (attention pooling's one query,
        cross attention to a padded context), use :class:`KeyPadding`.
        """
        q_ids = cls._padding_ids(lengths, max_len, "lengths", "max_len")
        kv_ids = None if kv_lengths is None and kv_max_len is None else cls._padding_ids(
            lengths if kv_lengths is None else kv_lengths, kv_max_len, "kv_lengths", "kv_max_len")
        if kv_ids is not None and kv_ids.shape[0] != q_ids.shape[0]:
            raise ValueError(f"Segments.from_lengths: {q_ids.shape[0]} lengths but {kv_ids.shape[0]} kv_lengths")
        return cls(q_ids, kv_ids)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens, kv_cu_seqlens=None) -> "Segments":
        """Sequences packed back to back in one row, given as FlashAttention's varlen API gives them
        (``flash_attn_varlen_func``'s ``cu_seqlens_q`` / ``cu_seqlens_k``): sequence s holds the tokens
        ``cu_seqlens[s] : cu_seqlens[s + 1]``, so ``cu_seqlens`` starts at 0, never decreases and ends at the
        packed length. Attention stays inside each sequence, as flash_attn_varlen_func's does; for the packed
        q (total, H, D) of that API, pass ``q.transpose(0, 1)[None]`` (1, H, total, D) to attend().

        ``kv_cu_seqlens`` (same number of sequences) packs the keys differently, for cross attention. With
        equal query and key lengths, ``Causal() & Segments.from_cu_seqlens(cu)`` is varlen ``causal=True``;
        where a sequence's query and key lengths differ, Causal aligns the packed rows, not each sequence:
        ``Segments.from_cu_seqlens(cu_q, cu_k).causal()`` aligns each sequence, as FlashAttention does.
        """
        q_ids = cls._packed_ids(cu_seqlens, "cu_seqlens")
        if kv_cu_seqlens is None:
            return cls(q_ids)
        kv_ids = cls._packed_ids(kv_cu_seqlens, "kv_cu_seqlens")
        if len(cu_seqlens) != len(kv_cu_seqlens):
            raise ValueError(f"Segments.from_cu_seqlens: cu_seqlens has {len(cu_seqlens) - 1} sequences but "
                             f"kv_cu_seqlens has {len(kv_cu_seqlens) - 1}")
        return cls(q_ids, kv_ids)

    def causal(self) -> "SegmentWindow":
        """Causal attention inside each segment, bottom-right aligned per segment: flash_attn_varlen_func's
        ``causal=True`` (see :class:`SegmentWindow`)."""
        return SegmentWindow(self, left=None, right=0)

    def window(self, left: Optional[int] = None, right: Optional[int] = None) -> "SegmentWindow":
        """A key window inside each segment, aligned per segment: flash_attn_varlen_func's ``window_size``
        (``left`` / ``right`` None = unbounded, as its -1; see :class:`SegmentWindow`)."""
        return SegmentWindow(self, left=left, right=right)

    def chunk(self, chunk_size: int, left: Optional[int] = None, right: Optional[int] = 0) -> "SegmentChunkWindow":
        """:class:`ChunkWindow` inside each segment, chunks counted from each segment's first token: chunked
        streaming attention over utterances packed back to back (see :class:`SegmentChunkWindow`).
        ``ChunkWindow(c, left=L) & segments`` instead counts chunks from the packed row's start."""
        return SegmentChunkWindow(self, chunk_size, left=left, right=right)

    @staticmethod
    def _int_vector(values, name: str, where: str, allow_empty: bool = False) -> torch.Tensor:
        """``values`` as a 1-D int64 tensor; ``where`` (``"Segments.from_lengths"``) names the caller in errors."""
        if isinstance(values, torch.Tensor):
            vector = values.detach()
        elif type(values).__module__ == "numpy" and hasattr(values, "dtype"):  # a numpy array of lengths
            vector = torch.as_tensor(values)
        elif isinstance(values, (list, tuple)) and all(is_int(v) for v in values):
            vector = torch.tensor([int(v) for v in values], dtype=torch.long)
        else:
            raise TypeError(f"{where}: {name} must be a list of ints or an integer tensor / array, got {values!r}")
        if vector.dtype.is_floating_point or vector.dtype == torch.bool or vector.is_complex():
            raise TypeError(f"{where}: {name} must hold integers, got {vector.dtype}")
        if vector.dim() != 1 or (vector.numel() == 0 and not allow_empty):
            kind = "a 1-D sequence" if allow_empty else "a non-empty 1-D sequence"
            raise ValueError(f"{where}: {name} must be {kind}, got shape {tuple(vector.shape)}")
        return vector.long()

    @classmethod
    def _padding_ids(cls, lengths, max_len, name: str, max_name: str,
                     where: str = "Segments.from_lengths") -> torch.Tensor:
        # B = 0 (an empty batch) is accepted: ids (0, T), with T from max_len
        lengths_B = cls._int_vector(lengths, name, where, allow_empty=True)
        if bool((lengths_B < 0).any()):
            raise ValueError(f"{where}: {name} must be >= 0, got {lengths_B.tolist()}")
        longest = int(lengths_B.max()) if lengths_B.numel() else 0
        if max_len is None:
            if lengths_B.numel() == 0:
                raise ValueError(f"{where}: {name} is empty (a batch of 0); give {max_name}, the padded "
                                 f"length of the batch")
            if longest == 0:
                raise ValueError(f"{where}: every {name} is 0; give {max_name} "
                                 f"({max_name}=0 for sequences of no token)")
            max_len = longest
        if is_int(max_len):  # numpy / 0-d tensor ints, as the lengths themselves may be
            max_len = int(max_len)
        check_ints(0, **{max_name: max_len})  # 0: sequences of no token, (B, 0)
        if longest > max_len:
            raise ValueError(f"{where}: {name} holds {longest}, longer than {max_name}={max_len}")
        positions = torch.arange(max_len, device=lengths_B.device)
        return torch.where(positions[None] < lengths_B[:, None], 0, -1)

    @classmethod
    def _packed_ids(cls, cu_seqlens, name: str) -> torch.Tensor:
        cu_S1 = cls._int_vector(cu_seqlens, name, "Segments.from_cu_seqlens")
        if cu_S1.numel() < 2 or int(cu_S1[0]) != 0 or bool((cu_S1[1:] < cu_S1[:-1]).any()) or int(cu_S1[-1]) < 1:
            raise ValueError(f"Segments.from_cu_seqlens: {name} must start at 0, never decrease and end at the "
                             f"packed length (> 0), got {cu_S1.tolist()}")
        lengths_S = cu_S1[1:] - cu_S1[:-1]
        return torch.repeat_interleave(torch.arange(lengths_S.numel(), device=cu_S1.device), lengths_S)

    @staticmethod
    def _check_ids(ids, name) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor):
            ids = torch.tensor(ids)  # a copy (as_tensor would share a numpy int64 array, edits and all)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise TypeError(f"Segments {name} must be an integer tensor, got {ids.dtype}")
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise ValueError(f"Segments {name} must have shape (N,) or (B, N), got {tuple(ids.shape)}")
        return ids.long()

    @property
    def batch_size(self) -> int:
        return max(self.q_ids.shape[0], self.kv_ids.shape[0])

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.q_ids,) if self.kv_ids is self.q_ids else (self.q_ids, self.kv_ids)

    def check_shape(self, q_len, k_len, batch=None, heads=None):
        if self.q_ids.shape[1] != q_len or self.kv_ids.shape[1] != k_len:
            hint = ""
            if self.kv_ids.shape[1] == k_len:  # the keys fit: padding meant for the keys only (pooling)
                hint = ("; to hide padded keys from any number of queries (attention pooling, cross attention to a "
                        "padded context), as nn.MultiheadAttention's key_padding_mask does, use "
                        f"KeyPadding(lengths, max_len={k_len}): keys at positions >= lengths[b] hidden, any Nq")
            raise ValueError(
                f"Segments ids have lengths (q={self.q_ids.shape[1]}, kv={self.kv_ids.shape[1]}) but attention "
                f"has Nq={q_len}, Nk={k_len}{hint}"
            )
        if batch is not None and self.batch_size not in (1, batch):
            raise ValueError(f"Segments ids have batch {self.batch_size} but attention has batch {batch}")

    def _dense_rows(self, q_len, k_len, start, stop, device):
        q = self.q_ids[:, start:stop].to(device)[:, :, None]
        kv = self.kv_ids.to(device)[:, None, :]
        return ((q == kv) & (q >= 0) & (kv >= 0))[:, None]

    @staticmethod
    def _tile_ranges(ids: torch.Tensor, block: int):
        """Per tile: min and max of the non-negative ids, and whether the tile holds any (B, T)."""
        b, n = ids.shape
        t = _num_blocks(n, block)
        padded = torch.nn.functional.pad(ids, (0, t * block - n), value=-1).reshape(b, t, block)
        valid = padded >= 0
        big = torch.iinfo(torch.long).max
        lo = torch.where(valid, padded, torch.full_like(padded, big)).amin(-1)
        hi = torch.where(valid, padded, torch.full_like(padded, -1)).amax(-1)
        # A tile is "pure" when every in-range token is valid and all share one id.
        in_range = torch.arange(t * block, device=ids.device).reshape(t, block) < n
        all_valid = (valid | ~in_range[None]).all(-1)
        pure = all_valid & (lo == hi)
        return lo, hi, valid.any(-1), pure

    def _block_states(self, q_len, k_len, block_q, block_k, device):
        q_lo, q_hi, q_any, q_pure = self._tile_ranges(self.q_ids.to(device), block_q)
        k_lo, k_hi, k_any, k_pure = self._tile_ranges(self.kv_ids.to(device), block_k)
        q_lo, q_hi, q_any, q_pure = (x[:, :, None] for x in (q_lo, q_hi, q_any, q_pure))
        k_lo, k_hi, k_any, k_pure = (x[:, None, :] for x in (k_lo, k_hi, k_any, k_pure))
        overlap = (q_lo <= k_hi) & (k_lo <= q_hi) & q_any & k_any
        full = q_pure & k_pure & (q_lo == k_lo)
        states = torch.full(overlap.shape, PARTIAL, dtype=torch.int8, device=device)
        states[~overlap] = EMPTY
        states[full] = FULL
        return states[:, None]

    def __repr__(self) -> str:
        return f"Segments(batch={self.batch_size}, q_len={self.q_ids.shape[1]}, kv_len={self.kv_ids.shape[1]})"


class _PerSegmentBand(_CheckedSettings, Mask):
    """Shared part of :class:`SegmentWindow` and :class:`SegmentChunkWindow`: a band ``lo <= key unit - query unit
    <= hi`` inside every segment of ``segments``, where the units (:meth:`_band_positions`) are counted per segment
    from the tokens' ranks (:meth:`positions`); ``left`` / ``right`` bound the band in those units (``unit``:
    "key" or "chunk", for messages; None = unbounded). Subclasses may count other units (``_band_positions``).
    ``segments``, ``left`` and ``right`` (and a subclass's ``_SETTINGS``) may be reassigned; an assignment is
    checked as the constructor checks them."""

    _SETTINGS = ("segments", "left", "right")

    def __init__(self, segments: "Segments", mask_name: str, unit: str, left: Optional[int],
                 right: Optional[int], **more_settings) -> None:
        super().__init__()
        self._mask_name, self._unit = mask_name, unit
        self._init_settings(segments=segments, left=left, right=right, **more_settings)
        self._positions: dict = {}

    def _checked_settings(self, settings: dict) -> dict:
        segments = settings["segments"]
        if not isinstance(segments, Segments):
            raise TypeError(f"{self._mask_name}: segments must be a Segments mask, got {type(segments).__name__}")
        return _checked_band(self._mask_name, self._unit, settings)

    def _offsets(self) -> tuple[float, float]:
        """Allowed range of ``key unit - query unit`` inside a segment, inclusive, +-inf when unbounded."""
        lo = -math.inf if self.left is None else -self.left
        hi = math.inf if self.right is None else self.right
        return lo, hi

    def _band_positions(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(query units, key units), (B, Nq) and (B, Nk) int64, that the band compares."""
        return self.positions(device)

    @property
    def batch_size(self) -> int:
        return self.segments.batch_size

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.segments.tensors()

    def check_shape(self, q_len, k_len, batch=None, heads=None):
        self.segments.check_shape(q_len, k_len, batch, heads)

    @staticmethod
    def _ranks(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of (B, N) ids: each token's rank among the tokens of its id, and the ids sorted."""
        order = torch.sort(ids, dim=1, stable=True)
        sorted_ids, index = order.values, order.indices
        n = ids.shape[1]
        arange = torch.arange(n, device=ids.device).expand_as(ids)
        starts = torch.ones_like(sorted_ids, dtype=torch.bool)
        starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
        run_start = torch.cummax(torch.where(starts, arange, torch.zeros_like(arange)), dim=1).values
        ranks = torch.empty_like(ids)
        ranks.scatter_(1, index, arange - run_start)
        return ranks, sorted_ids

    @staticmethod
    def _count_of(values: torch.Tensor, sorted_ids: torch.Tensor) -> torch.Tensor:
        """How many of each row's sorted ids equal each entry of ``values`` (B, M)."""
        left = torch.searchsorted(sorted_ids, values, right=False)
        right = torch.searchsorted(sorted_ids, values, right=True)
        return right - left

    def positions(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(query positions, key positions), (Bq, Nq) and (Bk, Nk) int64: key ranks, and query ranks shifted
        to the key axis by Lk - Lq of their segment (the per-segment bottom-right alignment)."""
        if is_tracing():
            # Computed, not cached, while traced (as Mask.block_map): under torch.export the positions are
            # FakeTensors, and an entry written then was read by every eager call after the export (outputs 0.6
            # off, or a crash).
            return self._compute_positions(device)
        key = str(device)
        hit = self.versioned_cache(self._positions).get(key)
        if hit is None:
            hit = self._compute_positions(device)
            cache_put(self._positions, key, hit)
        return hit

    def _compute_positions(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`positions`, uncached."""
        batch = self.segments.batch_size  # ids of batch 1 apply to every row
        q_ids = self.segments.q_ids.to(device).expand(batch, -1).contiguous()
        kv_ids = self.segments.kv_ids.to(device).expand(batch, -1).contiguous()
        q_rank, q_sorted = self._ranks(q_ids)
        k_rank, k_sorted = self._ranks(kv_ids)
        shift = self._count_of(q_ids, k_sorted) - self._count_of(q_ids, q_sorted)
        return q_rank + shift, k_rank

    def _dense_rows(self, q_len, k_len, start, stop, device):
        same = self.segments._dense_rows(q_len, k_len, start, stop, device)  # (B, 1, R, Nk)
        q_pos, k_pos = self._band_positions(device)
        rel = k_pos[:, None, :] - q_pos[:, start:stop, None]  # (B, R, Nk)
        return same & _band_rows(rel, *self._offsets())[0, 0][:, None]

    def _block_states(self, q_len, k_len, block_q, block_k, device):
        states = self.segments._block_states(q_len, k_len, block_q, block_k, device)  # (B, 1, QB, KB)
        q_pos, k_pos = self._band_positions(device)
        q_min, q_max = _tile_extremes(q_pos, block_q)
        k_min, k_max = _tile_extremes(k_pos, block_k)
        rel_min = (k_min[:, None, :] - q_max[:, :, None]).double()[:, None]  # (B, 1, QB, KB)
        rel_max = (k_max[:, None, :] - q_min[:, :, None]).double()[:, None]
        lo, hi = self._offsets()
        # FULL by ids means both tiles hold one and the same segment: there the positions decide exactly
        # (bounds over the tiles). Mixed tiles stay PARTIAL: ranks of different segments are not comparable.
        full_by_ids = states == FULL
        states = states.clone()
        states[full_by_ids & ((rel_max < lo) | (rel_min > hi))] = EMPTY
        states[full_by_ids & ~((rel_min >= lo) & (rel_max <= hi)) & (states == FULL)] = PARTIAL
        return states


class SegmentWindow(_PerSegmentBand):
    """A :class:`Window` inside every segment, with positions counted per segment: causal or sliding-window
    attention over sequences packed back to back, as ``flash_attn_varlen_func(causal=True, window_size=...)``
    computes it (Dao, FlashAttention-2, flash_attn_interface.py).

    A token's position is its rank among the tokens of its segment (so the segments need not be contiguous);
    a segment with Lq queries and Lk keys aligns its queries bottom-right, query rank r sitting at key rank
    r + Lk - Lq, as FlashAttention aligns each sequence (with Lq == Lk the usual diagonal). That query sees the
    keys of its segment at ranks p - left .. p + right. ``Causal() & segments`` instead aligns the packed rows as
    a whole, which is the same only when every segment has as many queries as keys (self attention, no cache).
    Padding (negative ids) behaves as in :class:`Segments`. Built by ``segments.causal()`` /
    ``segments.window(left, right)``.

    Every backend computes it; the block map skips the tiles that the ids or the windows rule out, so the
    CPU sparse path and the Triton kernel visit only the others. The Triton kernel evaluates its partial tiles
    from the ids and the per-token positions (:meth:`positions`, read beside the ids): O(N) memory, as for
    Segments.
    """

    def __init__(self, segments: Segments, left: Optional[int] = None, right: Optional[int] = 0) -> None:
        super().__init__(segments, "SegmentWindow", "key", left, right)

    def __repr__(self) -> str:
        return f"SegmentWindow({self.segments!r}, left={self.left}, right={self.right})"


class SegmentChunkWindow(_PerSegmentBand):
    """A :class:`ChunkWindow` inside every segment, with chunks counted from each segment's first token: chunked
    streaming attention (WeNet's ``subsequent_chunk_mask(size, chunk_size, num_left_chunks)``, NeMo's
    ``att_context_style="chunked_limited"``) over utterances packed back to back, each masked as if it ran alone
    (WeNet and NeMo build the mask per padded utterance, whose frames start at index 0). Built by
    ``segments.chunk(chunk_size, left, right)``.

    A token's position is its rank among the tokens of its segment, as in :class:`SegmentWindow`; a segment with
    Lq queries and Lk keys aligns its queries bottom-right (query rank r at key rank p = r + Lk - Lq, as
    ChunkWindow aligns a whole row), so that query belongs to chunk ``floor(p / chunk_size)`` of its segment and
    sees the keys of its segment in chunks ``a - left`` .. ``a + right`` (``None`` = unbounded). With one segment
    covering the row it is ``ChunkWindow(chunk_size, left, right)``. ``ChunkWindow(c, left=L) & segments`` instead
    counts chunks from the packed row's start, so a sequence that does not start on a multiple of c gets other
    chunk boundaries than when run alone. Padding (negative ids) behaves as in :class:`Segments`.

    Every backend computes it. Its block map comes from the ids and the per-tile extremes of the chunk numbers
    (never wrong; a tile that crosses a segment boundary may stay PARTIAL although empty, as for SegmentWindow)
    and never materialises Nq x Nk; the CPU block-sparse path evaluates the rows of its PARTIAL tiles. The Triton
    kernel evaluates its partial tiles from the ids and the per-token chunk numbers read beside them (the window
    slot's POS flag, as SegmentWindow's positions): O(N) memory (kernels/block_index.py).
    """

    _SETTINGS = ("segments", "chunk_size", "left", "right")

    def __init__(self, segments: Segments, chunk_size: int, left: Optional[int] = None,
                 right: Optional[int] = 0) -> None:
        super().__init__(segments, "SegmentChunkWindow", "chunk", left, right, chunk_size=chunk_size)

    def _checked_settings(self, settings: dict) -> dict:
        checked = super()._checked_settings(settings)
        return {**checked, "chunk_size": positive_int(settings["chunk_size"], "SegmentChunkWindow chunk_size")}

    def _band_positions(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(query chunks, key chunks) inside each segment: the :meth:`positions` floored to chunk numbers (a query
        at a negative aligned position, Lq > Lk, is in a negative chunk, as in ChunkWindow)."""
        q_pos, k_pos = self.positions(device)
        return (torch.div(q_pos, self.chunk_size, rounding_mode="floor"),
                torch.div(k_pos, self.chunk_size, rounding_mode="floor"))

    def __repr__(self) -> str:
        return (f"SegmentChunkWindow({self.segments!r}, chunk_size={self.chunk_size}, left={self.left}, "
                f"right={self.right})")


def _tile_extremes(values: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of (B, N) ints and tile of ``block``: min and max over the tile's in-range entries."""
    b, n = values.shape
    t = _num_blocks(n, block)
    big = torch.iinfo(torch.long).max // 4
    padded_hi = torch.nn.functional.pad(values, (0, t * block - n), value=big).reshape(b, t, block)
    padded_lo = torch.nn.functional.pad(values, (0, t * block - n), value=-big).reshape(b, t, block)
    return padded_hi.amin(-1), padded_lo.amax(-1)


class Dense(_CheckedSettings, Mask):
    """An explicit bool mask of shape (B|1, H|1, Nq|1, Nk); True = may attend. Batch, head and query dims of 1
    broadcast, as SDPA's attn_mask does: a (B, 1, 1, Nk) key-padding mask serves any number of queries. The key
    dim must be Nk (SDPA would also broadcast a key dim of 1, a per-query all-or-nothing mask: expand it).
    ``dense.mask = other`` is checked as the constructor checks ``mask``."""

    _SETTINGS = ("mask",)

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self._init_settings(mask=mask)

    def _checked_settings(self, settings: dict) -> dict:
        mask = settings["mask"]
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(
                "Dense mask must be a torch.bool tensor (True = may attend); "
                f"got {type(mask).__name__} {getattr(mask, 'dtype', '')}. For an additive float mask pass it as bias="
            )
        if mask.dim() < 2 or mask.dim() > 4:
            raise ValueError(f"Dense mask must have 2 to 4 dims (..., Nq, Nk), got shape {tuple(mask.shape)}")
        while mask.dim() < 4:
            mask = mask[None]
        return {"mask": mask}

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.mask,)

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def num_heads(self) -> int:
        return self.mask.shape[1]

    def check_shape(self, q_len, k_len, batch=None, heads=None):
        if self.mask.shape[-1] != k_len or self.mask.shape[-2] not in (1, q_len):
            wanted = f"(..., 1, {k_len})" if q_len == 1 else (f"(..., {q_len}, {k_len}) (or (..., 1, {k_len}), the "
                                                              f"same keys for every query)")
            hint = ""
            if self.mask.shape[-1] == 1 and k_len != 1:
                hint = f"; a key dim of 1 does not broadcast here: expand it, mask.expand(..., {k_len})"
            elif self.mask.dim() == 4 and self.mask.shape[:2] == (1, 1) and self.mask.shape[-1] == k_len:
                hint = (f"; a (B, {k_len}) key-padding mask is given as mask[:, None, None, :] "
                        f"(B, 1, 1, {k_len})")
            raise ValueError(f"Dense mask has shape {tuple(self.mask.shape)} but attention needs {wanted}{hint}")
        if batch is not None and self.mask.shape[0] not in (1, batch):
            raise ValueError(f"Dense mask batch dim {self.mask.shape[0]} does not broadcast to batch {batch}")
        if heads is not None and self.mask.shape[1] not in (1, heads):
            raise ValueError(f"Dense mask head dim {self.mask.shape[1]} does not broadcast to {heads} heads")

    def _dense_rows(self, q_len, k_len, start, stop, device):
        if self.mask.shape[-2] == 1 and q_len != 1:  # one key mask for every query: a stride-0 view of the rows
            return self.mask.to(device).expand(*self.mask.shape[:2], stop - start, self.mask.shape[-1])
        return self.mask[..., start:stop, :].to(device)

    def __repr__(self) -> str:
        return f"Dense(shape={tuple(self.mask.shape)})"


class KeyPadding(Dense):
    """Key padding from lengths: in batch row b the keys at positions >= ``lengths[b]`` are hidden from every
    query, whatever the number of queries -- ``nn.MultiheadAttention``'s ``key_padding_mask`` (True = padding)
    for a right-padded batch, given as lengths (the layout of torchaudio, ESPnet and NeMo). For attention pooling
    (``AttentionPoolLatent``: a few learned queries over N tokens), cross attention to a padded context, or a
    query block over keys that end in padding. ``max_len`` is the padded key length Nk (default
    ``max(lengths)``); ``lengths`` are B ints >= 0 (a list or an integer tensor), as for
    :meth:`Segments.from_lengths`, which instead pads the queries too and needs Nq = Nk.

    A query whose keys are all padding (``lengths[b] == 0``) attends to nothing: its output row is zero, as
    attend() defines for a row with no allowed key (nn.MultiheadAttention returns NaN there). The mask is the
    (B, 1, 1, Nk) bool ``Dense`` mask that broadcasts over heads and queries, so every backend reads it in O(B * Nk)
    memory (the Triton kernel through its dense slot with a zero query stride); its block map comes from the
    lengths (a key tile is EMPTY past the length, FULL before it, PARTIAL across it), never from Nq x Nk.
    """

    def __init__(self, lengths, max_len: Optional[int] = None) -> None:
        ids_BT = Segments._padding_ids(lengths, max_len, "lengths", "max_len", where="KeyPadding")
        super().__init__((ids_BT >= 0)[:, None, None, :])

    def _checked_settings(self, settings: dict) -> dict:
        """A reassigned ``mask`` must stay a key row per batch row, (B, 1, 1, Nk): the block map reads that row
        (a (1, 1, Nq, Nk) mask assigned here was read as its first query's row, 0.44 off on the block-sparse path)."""
        settings = super()._checked_settings(settings)
        if settings["mask"].shape[1:3] != (1, 1):
            raise ValueError(f"KeyPadding.mask must be (B, 1, 1, Nk), the keys each batch row hides from every "
                             f"query, got shape {tuple(settings['mask'].shape)}: for another pattern use Dense(mask)")
        return settings

    def check_shape(self, q_len, k_len, batch=None, heads=None):
        if self.mask.shape[-1] != k_len:
            raise ValueError(f"KeyPadding was built for {self.mask.shape[-1]} keys (max_len) but attention has "
                             f"Nk={k_len}: give KeyPadding(lengths, max_len={k_len})")
        if batch is not None and self.mask.shape[0] not in (1, batch):
            raise ValueError(f"KeyPadding has {self.mask.shape[0]} lengths but attention has batch {batch}")

    def _block_states(self, q_len, k_len, block_q, block_k, device):
        # From the (B, Nk) key row, tile by key tile (exact for any key pattern, also after an in-place edit)
        keys_BN = self.mask[:, 0, 0, :].to(device)
        kb = _num_blocks(k_len, block_k)
        pad = kb * block_k - k_len
        any_BK = torch.nn.functional.pad(keys_BN, (0, pad), value=False).reshape(-1, kb, block_k).any(-1)
        all_BK = torch.nn.functional.pad(keys_BN, (0, pad), value=True).reshape(-1, kb, block_k).all(-1)
        states_BK = torch.full(any_BK.shape, PARTIAL, dtype=torch.int8, device=device)
        states_BK[~any_BK] = EMPTY  # the whole tile is padding
        states_BK[all_BK] = FULL  # no padding in the tile
        return states_BK[:, None, None, :].expand(-1, 1, _num_blocks(q_len, block_q), -1)

    def __repr__(self) -> str:
        return f"KeyPadding(batch={self.mask.shape[0]}, max_len={self.mask.shape[-1]})"


class BlockSparse(_CheckedSettings, Mask):
    """Tile-level mask: ``block_mask`` bool (QB, KB) or (B|1, H|1, QB, KB); a kept tile is fully on.

    ``block_size`` is an int or (block_q, block_k). Its block map at the same tile size is the map
    itself (kept tiles FULL); at another tile size it is derived from 2-D prefix sums over the map,
    never from the token-level mask. ``block_mask``, ``block_q`` and ``block_k`` may be reassigned; an assignment
    is checked as the constructor checks them (a 2-D map is stored as (1, 1, QB, KB)).
    """

    _SETTINGS = ("block_mask", "block_q", "block_k")

    def __init__(self, block_mask: torch.Tensor, block_size) -> None:
        super().__init__()
        block_q, block_k = to_pair(block_size, "BlockSparse block_size")
        self._init_settings(block_mask=block_mask, block_q=block_q, block_k=block_k)

    def _checked_settings(self, settings: dict) -> dict:
        block_mask = settings["block_mask"]
        if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
            raise TypeError(f"BlockSparse block_mask must be a bool tensor, got {getattr(block_mask, 'dtype', type(block_mask))}")
        if block_mask.dim() == 2:
            block_mask = block_mask[None, None]
        if block_mask.dim() != 4:
            raise ValueError(f"BlockSparse block_mask must be (QB, KB) or (B, H, QB, KB), got {tuple(block_mask.shape)}")
        block_q = positive_int(settings["block_q"], "BlockSparse block_q")
        block_k = positive_int(settings["block_k"], "BlockSparse block_k")
        return {"block_mask": block_mask, "block_q": block_q, "block_k": block_k}

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.block_mask,)

    @property
    def batch_size(self) -> int:
        return self.block_mask.shape[0]

    @property
    def num_heads(self) -> int:
        return self.block_mask.shape[1]

    def check_shape(self, q_len, k_len, batch=None, heads=None):
        # ceil(N / block) tiles: 0 for no token (attend() accepts Nq = 0 and Nk = 0); one tile is accepted there
        # too, the 1-tile minimum of the other masks' block maps (_num_blocks)
        need = (math.ceil(q_len / self.block_q), math.ceil(k_len / self.block_k))
        tiles = tuple(self.block_mask.shape[-2:])
        if not all(got == want or (want == 0 and got == 1) for got, want in zip(tiles, need)):
            raise ValueError(
                f"BlockSparse map has {tiles} tiles but Nq={q_len}, Nk={k_len} with blocks "
                f"({self.block_q}, {self.block_k}) need {need}"
            )
        if batch is not None and self.batch_size not in (1, batch):
            raise ValueError(f"BlockSparse map batch dim {self.batch_size} does not broadcast to batch {batch}")
        if heads is not None and self.num_heads not in (1, heads):
            raise ValueError(f"BlockSparse map head dim {self.num_heads} does not broadcast to {heads} heads")

    def _dense_rows(self, q_len, k_len, start, stop, device):
        first_block, last_block = start // self.block_q, (stop - 1) // self.block_q
        rows = self.block_mask[..., first_block : last_block + 1, :].to(device)
        dense = rows.repeat_interleave(self.block_q, dim=-2).repeat_interleave(self.block_k, dim=-1)
        offset = first_block * self.block_q
        return dense[..., start - offset : stop - offset, :k_len]

    def _block_states(self, q_len, k_len, block_q, block_k, device):
        src = self.block_mask.to(device)
        if (block_q, block_k) == (self.block_q, self.block_k):
            return torch.where(src, FULL, EMPTY).to(torch.int8)
        # Source tiles overlapped by each requested tile, counted with a 2-D prefix sum.
        csum = torch.nn.functional.pad(src.long().cumsum(-1).cumsum(-2), (1, 0, 1, 0))
        q_first, q_last = _tile_bounds(q_len, block_q, device)
        k_first, k_last = _tile_bounds(k_len, block_k, device)
        r0, r1 = q_first // self.block_q, q_last // self.block_q + 1
        c0, c1 = k_first // self.block_k, k_last // self.block_k + 1
        kept = (
            csum[..., r1[:, None], c1[None, :]]
            - csum[..., r0[:, None], c1[None, :]]
            - csum[..., r1[:, None], c0[None, :]]
            + csum[..., r0[:, None], c0[None, :]]
        )
        total = (r1 - r0)[:, None] * (c1 - c0)[None, :]
        states = torch.full(kept.shape, PARTIAL, dtype=torch.int8, device=device)
        states[kept == 0] = EMPTY
        states[kept == total] = FULL
        return states

    def __repr__(self) -> str:
        return f"BlockSparse(tiles={tuple(self.block_mask.shape)}, block=({self.block_q}, {self.block_k}))"


class Edges(_CheckedSettings, Mask):
    """Graph attention as a mask: query i may attend to key j exactly where the edge j -> i is in ``edge_index``.

    ``edge_index``: an integer tensor (2, E) in PyG's layout and flow "source_to_target" -- row 0 the source (a key
    index), row 1 the target (a query index) -- one graph for every batch row; or (B, 2, E), a graph per batch row,
    E columns each, where a column of two -1 entries is padding (rows with fewer edges share one tensor). Indices
    are absolute: with Nq != Nk (bipartite, or queries over a context) the sources index the keys and the targets
    the queries, with no bottom-right alignment. For dot-product attention over each point's k nearest neighbours
    (:meth:`knn`, or ``Edges(zoo.geometry.knn_graph(pos, k, loop=True))``), a graph transformer's sparse pattern
    (graph edges, expander or virtual-node edges), or any adjacency list too large to write as Nq x Nk.

    What it computes: the softmax over each query's incoming edges, as ``torch_geometric.utils.softmax(alpha,
    edge_index[1])`` followed by a sum of the messages -- the attention of PyG's TransformerConv without its
    projections (tests/test_edges_mask.py compares against PyG's softmax and scatter in float64). A mask holds no
    multiplicity: an edge listed twice is one allowed pair here, where PyG's softmax counts it twice. A query
    with no incoming edge attends to nothing: its output row is zero (PyG aggregates no message to zero). Self
    loops are edges like any other: ``knn_graph(..., loop=True)``, or ``Edges(edge_index) | Window(0, 0)`` (the
    diagonal) to add them; the combination is no longer an Edges mask, which the "edges" backend needs.

    Cost: the block map comes from the edges in O(E) (a tile is EMPTY without an edge, FULL when every one of its
    cells is an edge, PARTIAL otherwise), the dense rows of a query chunk in O(E + rows x Nk), never Nq x Nk at
    once on the chunked reference and block-sparse paths. SDPA reads the whole dense mask; the Triton kernel reads a
    bitmask of the 64 x 64 bit tiles that hold an edge, built from the edges in O(E) plus a tile table
    (kernels/block_index.py, ``edge_bitmask``: no Nq x Nk tensor); the "edges" backend
    (zoo/attention/edge_backend.py) reads the edges alone. The attention itself is what the backend does with the map: points
    ordered so that neighbours have nearby indices (sorted along a space-filling curve, or as :meth:`knn` keeps
    them: clouds usually come that way) leave most tiles EMPTY, which the block-sparse backends skip; a graph in
    random node order visits nearly every tile. Where each query has few edges and the order is random, the
    O(E) message-passing layer (:class:`zoo.attention.TransformerConv`) is the faster route.

    The indices are checked once per version of ``edge_index`` (one host sync): negative entries outside padding
    columns when built, and sources >= Nk or targets >= Nq when a call gives the lengths.

    Caching and edits: derived data (block maps, the Triton kernel's bitmask) is cached per version of
    ``edge_index`` (:meth:`Mask.version`); an in-place torch op bumps it. An edit that bypasses the version counter
    (through a numpy array sharing the memory, or ``.data``) is not seen by the block-sparse and Triton backends:
    build a new mask after such an edit. The torch and SDPA backends read the edges at every call, and the "edges"
    backend (zoo/attention/edge_backend.py, ``edge_graph``) also keys its graph on a content fingerprint of
    ``edge_index`` (as the graph layers' cache does; 3-8 ms per million edges on one thread of the project's loaded
    2-core CPU), so those three see the edit; the "edges" backend then checks the edited indices again.
    """

    _SETTINGS = ("edge_index",)

    def __init__(self, edge_index: torch.Tensor) -> None:
        super().__init__()
        self._init_settings(edge_index=edge_index)
        self._edge_cache: dict = {}
        self._bounds()  # bad indices named now, not at the first call

    def _checked_settings(self, settings: dict) -> dict:
        edge_index = settings["edge_index"]
        if not isinstance(edge_index, torch.Tensor):
            raise TypeError(f"Edges: edge_index must be an integer tensor (2, E) or (B, 2, E), got "
                            f"{type(edge_index).__name__}")
        if edge_index.dtype.is_floating_point or edge_index.dtype == torch.bool or edge_index.is_complex():
            raise TypeError(f"Edges: edge_index must hold integers (node indices), got {edge_index.dtype}")
        if edge_index.dim() not in (2, 3) or edge_index.shape[-2] != 2:
            raise ValueError(f"Edges: edge_index must have shape (2, E) (row 0 source = key, row 1 target = query) "
                             f"or (B, 2, E), got {tuple(edge_index.shape)}")
        return {"edge_index": edge_index}

    def __setattr__(self, name: str, value) -> None:
        if name != "edge_index" or "edge_index" not in self.__dict__:
            super().__setattr__(name, value)
            return
        # ``edges.edge_index = other``: its indices are checked now, as the constructor checks them, and a
        # refused graph leaves the mask as it was
        previous = self.__dict__["edge_index"]
        super().__setattr__(name, value)
        try:
            self._bounds()
        except ValueError:
            object.__setattr__(self, name, previous)
            raise

    @classmethod
    def knn(cls, pos: torch.Tensor, k: int, *, loop: bool = True, cosine: bool = False) -> "Edges":
        """Each point attends to its ``k`` nearest points (squared Euclidean, or cosine distance): ``pos`` (N, D)
        for one cloud, or (B, N, D) for a batch of clouds of N points each (a graph per batch row).

        ``loop=True`` (the default here, unlike ``knn_graph``) counts the point itself among its k neighbours, as
        Point Transformer's neighbourhoods do; ``loop=False`` gives k other points. Built with
        :func:`zoo.geometry.knn_graph` (exact; ties to the lower index); a cloud of fewer than k points (k + 1
        without loops) attends to all of them."""
        from zoo.geometry import knn_graph

        if not isinstance(pos, torch.Tensor) or pos.dim() not in (2, 3) or not pos.is_floating_point():
            raise ValueError(f"Edges.knn: pos must be a floating-point (N, D) or (B, N, D) tensor, got "
                             f"{tuple(pos.shape) if isinstance(pos, torch.Tensor) else type(pos).__name__}")
        if pos.numel() and not bool(torch.isfinite(pos).all()):  # named here: knn_graph would call it x
            raise ValueError("Edges.knn: pos contains NaN or Inf values")
        if pos.dim() == 2:
            return cls(knn_graph(pos, k, loop=loop, cosine=cosine))
        batch, n = pos.shape[:2]
        if batch == 0 or n == 0:
            raise ValueError(f"Edges.knn: pos has no point, shape {tuple(pos.shape)}")
        example_P = torch.arange(batch, device=pos.device).repeat_interleave(n)
        ei_2E = knn_graph(pos.reshape(batch * n, -1), k, batch=example_P, loop=loop, cosine=cosine)
        # knn_graph lists the edges grouped by centre, in order (hence by cloud), and every cloud has n points,
        # hence min(k, n) (loop) or min(k, n - 1) edges per point: the same count per cloud
        ei_B2E = (ei_2E - example_P[ei_2E[1]] * n).reshape(2, batch, -1).transpose(0, 1)
        return cls(ei_B2E.contiguous())

    def __getstate__(self):
        state = super().__getstate__()
        state["_edge_cache"] = {}  # derived, with weak references in its version record
        return state

    def first_queries(self, num_queries: int) -> "Edges":
        """The edges into queries 0 .. num_queries - 1 only, as a (B, 2, E) Edges mask whose other columns are
        padding: the rows of the pattern for the first queries over the same keys (``MultiHeadAttention``'s
        ``num_queries``, e.g. a class token's row), still an Edges mask that the edge backend serves."""
        ei = self.edge_index if self.edge_index.dim() == 3 else self.edge_index[None]
        outside = (ei[:, 1:2] >= num_queries).expand_as(ei)
        return Edges(ei.masked_fill(outside, -1))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.edge_index,)

    @property
    def batch_size(self) -> int:
        return self.edge_index.shape[0] if self.edge_index.dim() == 3 else 1

    @property
    def num_edges(self) -> int:
        """E, the columns of ``edge_index`` (padding columns included)."""
        return self.edge_index.shape[-1]

    def _columns(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(batch row, source, target, valid) per column, each flattened over the batch: int64 on ``device``."""
        ei = self.edge_index.to(device).long()
        if ei.dim() == 2:
            ei = ei[None]
        batch, _, num = ei.shape
        row_BE = torch.arange(batch, device=device)[:, None].expand(batch, num)
        src, dst = ei[:, 0], ei[:, 1]
        valid = (src >= 0) & (dst >= 0)
        return row_BE.reshape(-1), src.reshape(-1), dst.reshape(-1), valid.reshape(-1)

    def _bounds(self) -> tuple[int, int]:
        """(largest source + 1, largest target + 1), checked and cached per version of ``edge_index``."""
        if is_tracing():
            return 0, 0
        cache = self.versioned_cache(self.__dict__.setdefault("_edge_cache", {}))
        hit = cache.get("bounds")
        if hit is not None:
            return hit
        ei = self.edge_index
        padding = (ei == -1).all(dim=-2, keepdim=True) if ei.dim() == 3 else torch.zeros_like(ei[:1], dtype=torch.bool)
        bad = (ei < 0) & ~padding
        if bool(bad.any()):
            where = bad.nonzero()[0].tolist()
            column = where[-1]
            at = f"edge_index[{where[0]}, :, {column}]" if ei.dim() == 3 else f"edge_index[:, {column}]"
            value = (ei[where[0], :, column] if ei.dim() == 3 else ei[:, column]).tolist()
            raise ValueError(f"Edges: {at} = {value} has a negative node index (only a column of two -1 entries is "
                             f"padding, in the batched (B, 2, E) form)")
        if ei.numel() == 0:
            bounds = (0, 0)
        else:
            bounds = (int(ei.select(-2, 0).max()) + 1, int(ei.select(-2, 1).max()) + 1)
        cache_put(cache, "bounds", bounds)
        return bounds

    def check_shape(self, q_len, k_len, batch=None, heads=None):
        keys, queries = self._bounds()
        for row, what, reach, length in ((0, "source (key)", keys, k_len), (1, "target (query)", queries, q_len)):
            if reach > length:
                raise ValueError(
                    f"Edges: edge_index row {row} holds {what} index {reach - 1} but attention has "
                    f"{'Nk' if row == 0 else 'Nq'}={length} (row 0 of edge_index indexes the keys, row 1 the queries)"
                )
        if batch is not None and self.batch_size not in (1, batch):
            raise ValueError(f"Edges: edge_index holds {self.batch_size} graphs (B, 2, E) but attention has batch "
                             f"{batch}")

    def _dense_rows(self, q_len, k_len, start, stop, device):
        row_E, src_E, dst_E, valid_E = self._columns(device)
        rows = stop - start
        # Edges outside the rows (and padding) are written to one spare row and column, cut off after: a fixed
        # shape, no data-dependent selection (traceable)
        keep_E = valid_E & (dst_E >= start) & (dst_E < stop)
        r = torch.where(keep_E, dst_E - start, rows)
        c = torch.where(keep_E, src_E, k_len)
        dense = torch.zeros(self.batch_size, rows + 1, k_len + 1, dtype=torch.bool, device=device)
        dense = dense.index_put((row_E, r, c), torch.ones((), dtype=torch.bool, device=device))
        return dense[:, None, :rows, :k_len]

    def distinct_edges(self, q_len: int, k_len: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(batch row, target, source) of every distinct edge, padding left out, sorted by batch row, then target,
        then source (int64 on ``device``): a mask allows a pair once, however often ``edge_index`` lists it."""
        row_E, src_E, dst_E, valid_E = self._columns(device)
        row_E, src_E, dst_E = row_E[valid_E], src_E[valid_E], dst_E[valid_E]
        cell = torch.unique((row_E * q_len + dst_E) * k_len + src_E)
        return cell // (q_len * k_len), (cell // k_len) % q_len, cell % k_len

    def _block_states(self, q_len, k_len, block_q, block_k, device):
        # distinct cells: a repeated edge must not count twice towards FULL
        row_E, dst_E, src_E = self.distinct_edges(q_len, k_len, device)
        qb, kb = _num_blocks(q_len, block_q), _num_blocks(k_len, block_k)
        tile_E = (row_E * qb + dst_E // block_q) * kb + src_E // block_k
        count = torch.bincount(tile_E, minlength=self.batch_size * qb * kb).reshape(self.batch_size, qb, kb)
        q_first, q_last = _tile_bounds(q_len, block_q, device)
        k_first, k_last = _tile_bounds(k_len, block_k, device)
        area = (q_last - q_first + 1)[:, None] * (k_last - k_first + 1)[None, :]
        states = torch.full(count.shape, PARTIAL, dtype=torch.int8, device=device)
        states[count == 0] = EMPTY
        states[count == area] = FULL
        return states[:, None]

    def __repr__(self) -> str:
        return f"Edges(batch={self.batch_size}, edges={self.num_edges})"


class MaskMod(Mask):
    """A mask given by a predicate in FlexAttention's form: ``mask_mod(b, h, q_idx, kv_idx) -> bool``, True
    where query ``q_idx`` of batch ``b`` and head ``h`` may attend to key ``kv_idx`` (the function behind
    ``torch.nn.attention.flex_attention.create_block_mask``; ``MaskMod(block_mask.mask_mod)`` reuses one).

    The predicate is called with broadcastable index tensors -- b (Bm, 1, 1, 1), h (1, Hm, 1, 1), q_idx
    (1, 1, R, 1), kv_idx (1, 1, 1, C), int64 -- and must return a bool tensor that broadcasts to
    (Bm, Hm, R, C). FlexAttention calls it on scalars under vmap; a predicate written with tensor operations
    (comparisons, ``&``, ``|``, ``torch.where``, indexing a tensor by ``q_idx``) works either way. Indices are
    raw, as FlexAttention's: no bottom-right alignment when Nq != Nk. ``batch_size`` / ``num_heads``: how many
    batch rows and heads the predicate distinguishes (1: b and h are always 0; FlexAttention's B=None,
    H=None).

    The block map evaluates the predicate over row chunks of at most ``chunk_cells`` cells and reduces them
    per tile, never holding Nq x Nk at once (the time is still O(Nq Nk), as FlexAttention's
    create_block_mask). The Triton kernel cannot run Python predicates: it reads PARTIAL tiles from one
    materialised dense mask (exact; ``triton_supports`` refuses masks over 2**28 cells), and the CPU
    block-sparse path evaluates the predicate for the rows of its PARTIAL tiles.
    """

    def __init__(self, mask_mod, batch_size: int = 1, num_heads: int = 1, chunk_cells: int = 1 << 24) -> None:
        super().__init__()
        if not callable(mask_mod):
            raise TypeError(f"MaskMod needs a callable mask_mod(b, h, q_idx, kv_idx), got {type(mask_mod).__name__}")
        batch_size, num_heads, chunk_cells = (positive_int(value, f"MaskMod {name}") for name, value in (
            ("batch_size", batch_size), ("num_heads", num_heads), ("chunk_cells", chunk_cells)))
        self.mask_mod = mask_mod
        self._batch, self._heads, self.chunk_cells = batch_size, num_heads, chunk_cells

    @property
    def batch_size(self) -> int:
        return self._batch

    @property
    def num_heads(self) -> int:
        return self._heads

    def check_shape(self, q_len, k_len, batch=None, heads=None):
        if batch is not None and self._batch not in (1, batch):
            raise ValueError(f"MaskMod was built for batch {self._batch} but attention has batch {batch}")
        if heads is not None and self._heads not in (1, heads):
            raise ValueError(f"MaskMod was built for {self._heads} heads but attention has {heads} heads")

    def _evaluate(self, start: int, stop: int, k_len: int, device) -> torch.Tensor:
        """bool (Bm, Hm, stop - start, Nk) from the predicate, with a clear error when it returns anything else."""
        b = torch.arange(self._batch, device=device).view(-1, 1, 1, 1)
        h = torch.arange(self._heads, device=device).view(1, -1, 1, 1)
        q = torch.arange(start, stop, device=device).view(1, 1, -1, 1)
        kv = torch.arange(k_len, device=device).view(1, 1, 1, -1)
        out = self.mask_mod(b, h, q, kv)
        if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
            raise TypeError(f"MaskMod: mask_mod {self._name} must return a bool tensor, got "
                            f"{getattr(out, 'dtype', type(out).__name__)}")
        shape = (self._batch, self._heads, stop - start, k_len)
        try:
            fits = torch.broadcast_shapes(out.shape, shape) == shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"MaskMod: mask_mod {self._name} returned shape {tuple(out.shape)}, which does not "
                             f"broadcast to (batch, heads, rows, keys) = {shape}")
        return out.to(device).expand(shape)

    def _dense_rows(self, q_len, k_len, start, stop, device):
        return self._evaluate(start, stop, k_len, device)

    def _block_states(self, q_len, k_len, block_q, block_k, device):
        per_row = self._batch * self._heads * k_len
        rows = max(block_q, self.chunk_cells // max(per_row, 1) // block_q * block_q)  # whole query tiles
        parts = []
        for start in range(0, q_len, rows):
            stop = min(q_len, start + rows)
            parts.append(_states_from_dense(self._evaluate(start, stop, k_len, device), block_q, block_k))
        return torch.cat(parts, dim=-2)

    def _predicate_inputs(self) -> list:
        """The values the predicate reads through its closure cells and the module globals its code names (the
        walk behind :meth:`tensors` and :meth:`version`)."""
        fn = self.mask_mod
        found = list(map(_cell_value, getattr(fn, "__closure__", None) or ()))
        code, module_globals = getattr(fn, "__code__", None), getattr(fn, "__globals__", None)
        if code is not None and module_globals is not None:
            found += [module_globals[n] for n in code.co_names if n in module_globals]
        return found

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors the predicate reads through its closure or module globals (a document-id tensor, as in
        FlexAttention's document masking), so an in-place edit of one rebuilds the cached maps. Tensors it reaches
        otherwise (an object's attribute, an argument of functools.partial, a helper function's globals) are not
        seen: build a new MaskMod after editing those."""
        return tuple(v for v in self._predicate_inputs() if isinstance(v, torch.Tensor))

    def version(self) -> tuple:
        """:meth:`Mask.version`, plus the predicate: which function it is (``m.mask_mod = other`` rebuilds) and the
        plain values -- None, bool, numbers, strings and tuples of them -- it reads through its closure or module
        globals (``WINDOW = 100`` for a predicate comparing with ``WINDOW``). The cached block maps of the old
        predicate used to be served after either change (a wrong result on the block-sparse backend, silently).
        Values reached otherwise (an object's attribute, a helper function's globals) are not seen, as for
        :meth:`tensors`."""
        inputs = self._predicate_inputs()  # walked once for both
        tensors = tuple(v for v in inputs if isinstance(v, torch.Tensor))
        return self._version_with(tensors) + (_SameObject(self.mask_mod),) + tuple(filter(_is_setting, inputs))

    @property
    def _name(self) -> str:
        return getattr(self.mask_mod, "__name__", type(self.mask_mod).__name__)

    def __repr__(self) -> str:
        return f"MaskMod({self._name}, batch_size={self._batch}, num_heads={self._heads})"  # the constructor's names


def _is_setting(value) -> bool:
    """A plain value a version can record and compare: None, a bool, a number, a string, or a tuple of them."""
    if value is None or isinstance(value, (bool, int, float, str)):  # the common cases before the slower ABC check
        return True
    if isinstance(value, tuple):
        return all(map(_is_setting, value))
    return isinstance(value, numbers.Number)  # numpy scalars, Fraction, Decimal


def _cell_value(cell):
    """A closure cell's value, or None for a cell not yet filled."""
    try:
        return cell.cell_contents
    except ValueError:
        return None


class _Combined(Mask):
    def __init__(self, a: Mask, b: Mask) -> None:
        super().__init__()
        self.a, self.b = as_mask(a), as_mask(b)

    @property
    def batch_size(self) -> int:
        return max(self.a.batch_size, self.b.batch_size)

    @property
    def num_heads(self) -> int:
        return max(self.a.num_heads, self.b.num_heads)

    def check_shape(self, q_len, k_len, batch=None, heads=None):
        self.a.check_shape(q_len, k_len, batch, heads)
        self.b.check_shape(q_len, k_len, batch, heads)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.a.tensors() + self.b.tensors()

    def __repr__(self) -> str:
        op = "&" if isinstance(self, And) else "|"
        return f"({self.a!r} {op} {self.b!r})"


class And(_Combined):
    """Allowed where both masks allow."""

    @property
    def is_full(self) -> bool:  # type: ignore[override]
        return self.a.is_full and self.b.is_full

    def _dense_rows(self, q_len, k_len, start, stop, device):
        return self.a.dense(q_len, k_len, device, (start, stop)) & self.b.dense(q_len, k_len, device, (start, stop))

    def _block_states(self, q_len, k_len, block_q, block_k, device):
        sa = self.a.block_map(q_len, k_len, block_q, block_k, device).states
        sb = self.b.block_map(q_len, k_len, block_q, block_k, device).states
        # EMPTY if either is empty, FULL only if both full: the minimum of the two states.
        return torch.minimum(sa, sb)


class Or(_Combined):
    """Allowed where either mask allows."""

    @property
    def is_full(self) -> bool:  # type: ignore[override]
        return self.a.is_full or self.b.is_full

    def _dense_rows(self, q_len, k_len, start, stop, device):
        return self.a.dense(q_len, k_len, device, (start, stop)) | self.b.dense(q_len, k_len, device, (start, stop))

    def _block_states(self, q_len, k_len, block_q, block_k, device):
        sa = self.a.block_map(q_len, k_len, block_q, block_k, device).states
        sb = self.b.block_map(q_len, k_len, block_q, block_k, device).states
        # FULL if either is full, EMPTY only if both empty: the maximum of the two states.
        return torch.maximum(sa, sb)


def as_mask(mask) -> Mask:
    """None -> Full(); a bool tensor -> Dense; a Mask unchanged; anything else is an error."""
    if mask is None:
        return Full()
    if isinstance(mask, Mask):
        return mask
    if isinstance(mask, torch.Tensor):
        if mask.dtype == torch.bool:
            return Dense(mask)
        raise TypeError(
            f"mask must be a zoo.attention mask object or a bool tensor, got a {mask.dtype} tensor; "
            "pass additive float masks as bias="
        )
    raise TypeError(f"mask must be a zoo.attention mask object or a bool tensor, got {type(mask).__name__}")
