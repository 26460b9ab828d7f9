"""The attention core on device types other than cpu / cuda, mask settings reassigned after construction, and how a
pinned backend (use_backend / ZOO_ATTN_BACKEND) meets weight requests and "auto" (review 7, findings 1-4).

Only the meta device is available here: automatic selection for mps / xpu / hpu is tested through the selection
code with a query that reports such a device (the backends' capability checks read its shape, as for a real one).
"""
from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

from zoo.attention import (
    BlockSparse,
    Causal,
    ChunkWindow,
    Dense,
    Edges,
    KeyPadding,
    MultiHeadAttention,
    Segments,
    Window,
    attend,
    capture_attention,
    use_backend,
)
from zoo.attention import backends as zb
from zoo.attention.masks import FULL
from zoo.attention.radial import Radial

from attention_reference import naive_attention  # tests/attention_reference.py (pytest puts tests/ on sys.path)

N = 16  # sequence length of the settings tests


def make_qkv(b, h, n, d, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g).to(device) for _ in range(3))


# ---- 1. device types other than cpu / cuda --------------------------------------------------------------------

class _QueryOn:
    """A query tensor as the selection code sees it, reporting another device type (no mps / xpu / hpu here):
    ``device`` is replaced, everything else (shape, dtype, ...) is the real tensor's."""

    def __init__(self, tensor: torch.Tensor, device_type: str) -> None:
        self._tensor, self.device = tensor, torch.device(device_type)

    def __getattr__(self, name):
        return getattr(self._tensor, name)


@pytest.mark.parametrize("device_type, expected", [
    ("mps", "sdpa"), ("xpu", "sdpa"), ("meta", "sdpa"), ("hpu", "torch"), ("privateuseone", "torch"),
])
@pytest.mark.parametrize("mask", [None, Causal(), Window(2, 0)], ids=["full", "causal", "window"])
def test_automatic_selection_on_other_device_types(device_type, expected, mask):
    """SDPA where torch has SDPA kernels (mps, xpu, meta), the reference elsewhere -- never "no backend"."""
    q, k, v = make_qkv(1, 2, 8, 16)
    args = (_QueryOn(q, device_type), k, v, Window(None, None) if mask is None else mask, None, 0.25, "softmax", 0.0,
            False)
    assert zb.select_backend(args, None).name == expected
    assert zb.select_backend(args, None, return_lse=True).name == "torch"  # SDPA gives no log-sum-exp
    weights_args = args[:-1] + (True,)
    assert zb.select_backend(weights_args, None).name == "torch"
    # the plain-call fast path is taken exactly where "sdpa" is the automatic choice for plain calls
    assert zb.sdpa_runs_plain_calls(device_type) == (expected == "sdpa")


def test_auto_devices_none_means_every_device_type():
    assert zb.get_backend("torch").auto_devices is None
    assert zb.get_backend("torch").auto_runs_on("anything")
    assert set(zb.SDPA_DEVICE_TYPES) <= zb.get_backend("sdpa").auto_devices
    assert not zb.get_backend("sdpa").auto_runs_on("hpu")
    backend = zb.Backend("x", lambda *a: None, lambda *a: None, auto_devices=None)
    assert backend.auto_runs_on("mps")
    with pytest.raises(TypeError, match="auto_devices must be a collection .* or None"):
        zb.register_backend("bad", lambda *a: None, lambda *a: None, auto_devices="cpu")


def test_no_backend_for_a_device_type_names_it(monkeypatch):
    """With the reference limited to cpu (a user's replacement), a meta call finds no backend: the error names the
    device type and auto_devices instead of an internal "should not happen"."""
    for name, backend in list(zb._BACKENDS.items()):
        monkeypatch.setitem(zb._BACKENDS, name, zb.Backend(**{**vars(backend), "auto_devices": frozenset({"cpu"})}))
    q, k, v = make_qkv(1, 2, 8, 16, device="meta")
    with pytest.raises(RuntimeError, match="no attention backend supports this call on device type 'meta'.*"
                                           "auto_devices"):
        attend(q, k, v, Window(2, 0))


@pytest.mark.parametrize("backend", [None, "auto", "torch", "sdpa"])
@pytest.mark.parametrize("mask", [None, Causal(), Window(2, 0), ChunkWindow(3, 1)],
                         ids=["full", "causal", "window", "chunk"])
def test_attend_on_meta(backend, mask):
    """Real tensors on the meta device (shapes only), as F.scaled_dot_product_attention takes them: outputs, biases
    and gradients of the right shapes, on meta."""
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 4, 8, 16, device="meta"))
    bias = torch.randn(1, 4, 8, 8, device="meta")
    for kwargs in ({}, {"bias": bias}):
        out = attend(q, k, v, mask, backend=backend, **kwargs)
        assert out.shape == (2, 4, 8, 16) and out.device.type == "meta"
    out.sum().backward()
    assert q.grad.shape == q.shape and q.grad.device.type == "meta"
    if backend in (None, "auto", "torch"):
        out, weights = attend(q, k, v, mask, backend=backend, return_weights=True)
        assert weights.shape == (2, 4, 8, 8) and weights.device.type == "meta"
        out, lse = attend(q, k, v, mask, backend=backend, return_lse=True)
        assert lse.shape == (2, 4, 8) and lse.device.type == "meta"
        assert attend(q, k, v, mask, backend=backend, score="sigmoid").device.type == "meta"


@pytest.mark.parametrize("name", ["vit_debug", "agent_deit_debug", "maxvit_debug"])
def test_zoo_models_run_on_meta(name):
    """A zoo model built and run under torch.device("meta") (shapes only; what timm models allow)."""
    from zoo.registry import create_model

    importlib.import_module("zoo.tasks.vision")  # registers the vision models

    with torch.device("meta"):
        model = create_model(name)
        out = model(torch.randn(2, 3, 32, 32))
    assert out.device.type == "meta" and out.shape == (2, model.num_classes)
    with torch.device("meta"):
        mha = MultiHeadAttention(32, 2)
        assert mha(torch.randn(1, 8, 32), mask=Causal()).shape == (1, 8, 32)


# ---- 2. mask settings reassigned after construction -----------------------------------------------------------

def _band(q_units: torch.Tensor, k_units: torch.Tensor, left, right) -> torch.Tensor:
    rel = k_units[None, :] - q_units[:, None]
    lo = -10**9 if left is None else -left
    hi = 10**9 if right is None else right
    return (rel >= lo) & (rel <= hi)


def _allowed(kind: str, settings: dict) -> torch.Tensor:
    """bool (N, N) written from indices for each mask kind (self attention, Nq = Nk = N), not from mask.dense."""
    i = torch.arange(N)
    if kind == "window":
        return _band(i, i, settings["left"], settings["right"])
    if kind == "chunk":
        c = settings["chunk_size"]
        return _band(i // c, i // c, settings["left"], settings["right"])
    if kind in ("segment_window", "segment_chunk"):
        seg, rank = i // 5, i % 5  # segments of 5, 5, 5, 1 tokens (Segments(i // 5))
        c = settings.get("chunk_size", 1)
        return (seg[:, None] == seg[None, :]) & _band(rank // c, rank // c, settings["left"], settings["right"])
    if kind == "block_sparse":
        tiles = settings["block_mask"].reshape(settings["block_mask"].shape[-2:])
        return tiles[i // settings["block_q"]][:, i // settings["block_k"]]
    if kind == "dense":
        return settings["mask"].reshape(N, N)
    if kind == "segments":
        q_ids, kv_ids = settings["q_ids"].reshape(N), settings["kv_ids"].reshape(N)
        return (q_ids[:, None] == kv_ids[None, :]) & (q_ids[:, None] >= 0) & (kv_ids[None, :] >= 0)
    if kind == "edges":
        allowed = torch.zeros(N, N, dtype=torch.bool)
        allowed[settings["edge_index"][1], settings["edge_index"][0]] = True  # query = target, key = source
        return allowed
    raise AssertionError(kind)


def _make(kind: str, settings: dict):
    if kind == "window":
        return Window(settings["left"], settings["right"])
    if kind == "chunk":
        return ChunkWindow(settings["chunk_size"], settings["left"], settings["right"])
    if kind == "segment_window":
        return Segments(torch.arange(N) // 5).window(settings["left"], settings["right"])
    if kind == "segment_chunk":
        return Segments(torch.arange(N) // 5).chunk(settings["chunk_size"], settings["left"], settings["right"])
    if kind == "block_sparse":
        return BlockSparse(settings["block_mask"], (settings["block_q"], settings["block_k"]))
    if kind == "dense":
        return Dense(settings["mask"])
    if kind == "segments":
        return Segments(settings["q_ids"], settings["kv_ids"])
    if kind == "edges":
        return Edges(settings["edge_index"])
    raise AssertionError(kind)


_KEY_MINUS_QUERY = torch.arange(N)[None, :] - torch.arange(N)[:, None]
_BAND = (_KEY_MINUS_QUERY >= -2) & (_KEY_MINUS_QUERY <= 0)  # a causal band of 3 keys: its transpose differs
_SEGMENT_IDS = torch.tensor([0, 0, 0, 1, 1, -1, 2, 2, 2, 2, 3, 3, 4, 4, 4, -1])
_EDGES = torch.tensor([[0, 1, 2, 3, 5, 7, 8, 9, 11, 15, 15], [1, 1, 4, 0, 5, 6, 2, 12, 13, 14, 3]])
_TILES = torch.tensor([[1, 0, 0, 1], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
# kind, constructor settings, a valid reassignment, invalid reassignments (value, error type, message)
SETTINGS_CASES = [
    ("window", dict(left=2, right=0), ("left", 5), [
        ("left", -5, ValueError, r"Window\(left=-5, right=0\) allows no key at all"),
        ("right", -3, ValueError, "allows no key at all"),
        ("left", 1.5, TypeError, "Window left must be an int or None, got 1.5"),
        ("left", "3", TypeError, "Window left must be an int or None"),
        ("right", True, TypeError, "Window right must be an int or None, got True"),
    ]),
    ("chunk", dict(chunk_size=2, left=1, right=0), ("chunk_size", 3), [
        ("chunk_size", 0, ValueError, "ChunkWindow chunk_size must be a positive int, got 0"),
        ("chunk_size", 2.5, ValueError, "ChunkWindow chunk_size must be a positive int, got 2.5"),
        ("left", -2, ValueError, r"ChunkWindow\(left=-2, right=0\) allows no chunk at all"),
    ]),
    ("segment_window", dict(left=2, right=0), ("right", 1), [
        ("left", -3, ValueError, r"SegmentWindow\(left=-3, right=0\) allows no key at all"),
        ("segments", Causal(), TypeError, "SegmentWindow: segments must be a Segments mask, got Causal"),
    ]),
    ("segment_chunk", dict(chunk_size=2, left=0, right=0), ("left", None), [
        ("chunk_size", 0, ValueError, "SegmentChunkWindow chunk_size must be a positive int, got 0"),
        ("right", -1, ValueError, "allows no chunk at all"),
    ]),
    ("block_sparse", dict(block_mask=_TILES, block_q=4, block_k=4), ("block_mask", _TILES.T.contiguous()), [
        ("block_q", 0, ValueError, "BlockSparse block_q must be a positive int, got 0"),
        ("block_k", 2.5, ValueError, "BlockSparse block_k must be a positive int, got 2.5"),
        ("block_mask", _TILES.float(), TypeError, "BlockSparse block_mask must be a bool tensor"),
        ("block_mask", _TILES[0], ValueError, r"must be \(QB, KB\) or \(B, H, QB, KB\)"),
    ]),
    # tensor settings: checked as their constructors check them (they used to be taken as given)
    ("dense", dict(mask=_BAND), ("mask", _BAND.T.contiguous()), [
        ("mask", _BAND.float(), TypeError, "Dense mask must be a torch.bool tensor"),
        ("mask", _BAND[0], ValueError, r"Dense mask must have 2 to 4 dims \(..., Nq, Nk\), got shape \(16,\)"),
    ]),
    ("segments", dict(q_ids=_SEGMENT_IDS, kv_ids=_SEGMENT_IDS), ("kv_ids", _SEGMENT_IDS.flip(0)), [
        ("kv_ids", _SEGMENT_IDS.float(), TypeError, "Segments kv_ids must be an integer tensor, got torch.float32"),
        ("q_ids", _SEGMENT_IDS[None, None], ValueError, r"Segments ids must have shape \(N,\) or \(B, N\)"),
    ]),
    ("edges", dict(edge_index=_EDGES), ("edge_index", _EDGES.flip(0)), [
        ("edge_index", _EDGES.float(), TypeError, "Edges: edge_index must hold integers"),
        ("edge_index", _EDGES[:1], ValueError, r"Edges: edge_index must have shape \(2, E\)"),
        ("edge_index", _EDGES - 1, ValueError, r"Edges: edge_index\[:, 0\] = \[-1, 0\] has a negative node index"),
    ]),
]


@pytest.mark.parametrize("kind, settings, valid, invalid", SETTINGS_CASES, ids=[c[0] for c in SETTINGS_CASES])
def test_reassigned_mask_settings_are_checked_and_reach_every_backend(kind, settings, valid, invalid):
    """A bad value is refused where it is assigned, with the constructor's message, and leaves the mask as it was;
    a valid one reaches every backend after their caches were filled (against a float64 reference built from
    indices)."""
    q, k, v = make_qkv(1, 2, N, 8, seed=1)
    mask = _make(kind, settings)
    backends = ("torch", "sdpa", "blocksparse", None)
    for backend in backends:  # fills block maps, plans and positions
        attend(q, k, v, mask, backend=backend)
    before = {name: getattr(mask, name) for name in settings}
    for name, value, error, message in invalid:
        with pytest.raises(error, match=message):
            setattr(mask, name, value)
        for key, old in before.items():
            now = getattr(mask, key)
            assert torch.equal(now.reshape(old.shape), old) if isinstance(old, torch.Tensor) else now == old
    name, value = valid
    setattr(mask, name, value)
    expected = naive_attention(q, k, v, _allowed(kind, {**settings, name: value}), None, 8 ** -0.5, "softmax")
    assert not torch.allclose(expected, naive_attention(q, k, v, _allowed(kind, settings), None, 8 ** -0.5,
                                                        "softmax"))  # the change matters
    for backend in backends:
        torch.testing.assert_close(attend(q, k, v, mask, backend=backend).double(), expected, atol=1e-5, rtol=1e-5)


def test_reassigned_settings_of_masks_inside_a_combination_reach_every_backend():
    """A setting reassigned on a mask held by an ``&`` / ``|`` combination changes the combination's version, so its
    block maps and plans are rebuilt (mutation audit 2026-12-07: a version that ignored nested masks served the old
    window, 2.48 off, and no test saw it); KeyPadding's reassigned mask must stay a (B, 1, 1, Nk) key row."""
    q, k, v = make_qkv(1, 2, N, 8, seed=3)
    window = Window(2, 0)
    ids = torch.arange(N) // 8
    for combined in (window & Segments(ids), window | Window(0, 0)):
        for backend in ("torch", "sdpa", "blocksparse", None):
            attend(q, k, v, combined, backend=backend)  # caches filled
        before = combined.dense(N, N)[0, 0].clone()
        window.left = 100
        allowed = combined.dense(N, N)[0, 0]  # from indices, uncached
        assert not torch.equal(allowed, before)
        want = naive_attention(q, k, v, allowed, None, 8 ** -0.5, "softmax")
        for backend in ("torch", "sdpa", "blocksparse", None):
            torch.testing.assert_close(attend(q, k, v, combined, backend=backend).double(), want, atol=1e-5, rtol=1e-5)
        window.left = 2
    padding = KeyPadding([10, 16])
    with pytest.raises(ValueError, match=r"KeyPadding.mask must be \(B, 1, 1, Nk\).*got shape \(1, 1, 16, 16\)"):
        padding.mask = torch.ones(16, 16, dtype=torch.bool).tril()
    padding.mask = torch.ones(2, 1, 1, 16, dtype=torch.bool)  # another key row fits
    assert padding.block_map(4, 16, 4).states.eq(FULL).all()


def test_reassigned_settings_are_normalised_as_in_the_constructor():
    import numpy as np

    window = Window(2, 0)
    window.left = np.int64(4)
    assert type(window.left) is int and window.left == 4
    blocks = BlockSparse(_TILES, 4)
    blocks.block_mask = _TILES[:2, :2]
    assert blocks.block_mask.shape == (1, 1, 2, 2)
    dense = Dense(_BAND)
    dense.mask = _BAND[:3]
    assert dense.mask.shape == (1, 1, 3, N)
    segments = Segments(_SEGMENT_IDS.expand(2, -1))
    segments.kv_ids = [1] * N  # a list, as the constructor takes it
    assert segments.kv_ids.dtype == torch.long and segments.kv_ids.shape == (1, N)
    with pytest.raises(ValueError, match="Segments: ids batch 2 and kv_ids batch 3 differ"):
        segments.kv_ids = _SEGMENT_IDS.expand(3, -1)
    segments.kv_ids = None  # the keys' ids are the queries' again, as in Segments(ids)
    assert segments.kv_ids is segments.q_ids


def test_causal_bounds_are_fixed():
    """A Causal with another band would still be handed to SDPA's is_causal: its bounds refuse reassignment."""
    causal = Causal()
    for name, value in (("left", 3), ("right", 1)):
        with pytest.raises(AttributeError, match=r"Causal\(\) has fixed bounds .*use Window\(left, right\)"):
            setattr(causal, name, value)
    assert (causal.left, causal.right) == (None, 0)
    causal.right = 0  # the same bound is fine


@pytest.mark.parametrize("backend", ["torch", "sdpa", "blocksparse"])
def test_radial_setting_reassigned_gets_radials_message_on_every_backend(backend):
    """Radial's settings are checked on assignment (tests/test_radial.py), so a refused one never reaches a
    backend; the mask as it was still runs on each."""
    q = torch.randn(1, 1, 16, 4)
    radial = Radial(2, 8, block_size=4)
    with pytest.raises(ValueError, match="Radial: block_size must be an int >= 1, got 0"):
        radial.block_size = 0
    assert radial.block_size == 4
    torch.testing.assert_close(attend(q, q, q, radial, backend=backend), attend(q, q, q, radial, backend="torch"))


# ---- 3. a pinned backend and weight requests ----------------------------------------------------------------

def _vision_model(name: str):
    from zoo.registry import create_model

    importlib.import_module("zoo.tasks.vision")  # registers the vision models

    torch.manual_seed(0)
    return create_model(name).eval()


@pytest.mark.parametrize("name", ["vit_debug", "agent_deit_debug", "maxvit_debug"])
@pytest.mark.parametrize("pin", ["context", "environment"])
def test_capture_attention_under_a_pinned_backend(name, pin, monkeypatch):
    """capture_attention under use_backend("sdpa") / ZOO_ATTN_BACKEND=sdpa records what it records unpinned (the
    reference's probabilities), and the model's outputs are unchanged."""
    model = _vision_model(name)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), capture_attention(model) as unpinned:
        expected = model(x)
    if pin == "environment":
        monkeypatch.setenv(zb.ENV_VAR, "sdpa")
        context = contextlib.nullcontext()
    else:
        context = use_backend("sdpa")
    with torch.no_grad(), context, capture_attention(model) as pinned:
        out = model(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert [r.name for r in pinned] == [r.name for r in unpinned] and len(pinned) > 0
    for got, want in zip(pinned, unpinned):
        torch.testing.assert_close(got.weights, want.weights)
        torch.testing.assert_close(got.weights.sum(-1), torch.ones_like(got.weights.sum(-1)))


@pytest.mark.parametrize("pinned", ["sdpa", "blocksparse", "edges"])
def test_weights_requests_run_on_the_reference_under_any_pin(pinned, monkeypatch):
    """return_weights without a backend= argument: the reference's weights, whatever the context or the environment
    pins; with backend= the named backend is still asked (and refuses)."""
    q, k, v = make_qkv(1, 2, 12, 8, seed=3)
    mask = Window(3, 1)
    expected = attend(q, k, v, mask, return_weights=True, backend="torch")
    allowed = _band(torch.arange(12), torch.arange(12), 3, 1)
    torch.testing.assert_close(expected[0].double(), naive_attention(q, k, v, allowed, None, 8 ** -0.5, "softmax"),
                               atol=1e-5, rtol=1e-5)
    with use_backend(pinned):
        for got, want in zip(attend(q, k, v, mask, return_weights=True), expected):
            torch.testing.assert_close(got, want)
        with pytest.raises(ValueError, match=f"backend '{pinned}' cannot run this call: "):
            attend(q, k, v, mask, return_weights=True, backend=pinned)
    monkeypatch.setenv(zb.ENV_VAR, pinned)
    torch.testing.assert_close(attend(q, k, v, mask, return_weights=True, backend="auto")[1], expected[1])
    mha = MultiHeadAttention(16, 2, attn_drop=0.1).eval()  # dropout: blocksparse would refuse it in training
    with capture_attention(mha) as records:
        mha(torch.randn(1, 5, 16))
    assert len(records) == 1 and records[0].weights.shape == (1, 2, 5, 5)


# ---- 4. "auto" and the environment variable -------------------------------------------------------------------

def test_use_backend_auto_restores_automatic_choice():
    q, k, v = make_qkv(1, 2, 8, 8)
    with use_backend("sdpa"):
        assert zb.requested_backend(None) == "sdpa"
        with use_backend("auto"):
            assert zb.requested_backend(None) is None
            # automatic again: sigmoid scores, which the pinned sdpa refuses, run
            assert attend(q, k, v, score="sigmoid").shape == (1, 2, 8, 8)
        assert zb.requested_backend(None) == "sdpa"
    with pytest.raises(ValueError, match=r"unknown attention backend 3; available: .*torch \(or 'auto'"):
        with use_backend(3):
            pass


def test_invalid_environment_backend_names_the_variable(monkeypatch):
    q, k, v = make_qkv(1, 2, 4, 8)
    monkeypatch.setenv(zb.ENV_VAR, "flash")
    with pytest.raises(ValueError, match=r"ZOO_ATTN_BACKEND='flash' \(environment variable\): unknown attention "
                                         r"backend; valid values: .*sdpa.*torch \(or 'auto'"):
        attend(q, k, v, Window(1, 1))
    with use_backend("torch"):  # a context takes precedence: the variable is not read
        attend(q, k, v)
    for value in ("auto", " sdpa ", ""):
        monkeypatch.setenv(zb.ENV_VAR, value)
        assert attend(q, k, v).shape == (1, 2, 4, 8)


def test_automatic_selection_leaves_traced_calls_to_sdpa(monkeypatch):
    """Under torch.compile / export the automatic choice skips the Triton kernel (its host-side launcher would
    split the graph at every attention call), while an explicit request still gets it. Checked on the kernel's
    capability hook with interpreter tensors (CUDA is where it matters: "triton" is chosen automatically there
    only; the kernel's own capability answer is stubbed to "supported", whatever this process imported). Mutation
    audit 2026-12-07: the rule had no test."""
    q = torch.randn(1, 2, 8, 16)
    call = (q, q, q, Causal(), None, 0.25, "softmax", 0.0, False)
    monkeypatch.setattr(zb, "_triton_supports", lambda *args: None)  # the kernel takes the call
    assert zb._triton_auto_supports(*call) is None
    monkeypatch.setattr(zb, "is_tracing", lambda: True)
    assert zb._triton_auto_supports(*call) == "tracing / torch.compile (automatic selection leaves the call to SDPA)"
    assert zb.get_backend("triton").supports is not zb._triton_auto_supports  # an explicit request is not refused
