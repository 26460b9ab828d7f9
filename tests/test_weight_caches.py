"""Caches derived from weights (Agent attention's resized bias tables, Agent-DeiT's resized position embedding,
Transformer-XL's projected tables, RoPE's cos/sin) never serve stale values or inference tensors, serve threads
that share a model, and stay out of copies and pickles.

Each case is compared with a freshly built model holding the same weights (or the grad-mode path, which never
uses a cache, or a single-thread run); the first cases failed before zoo.layers.weights_stamp keyed the caches
(audit 2026-12-06), the Transformer-XL thread, autocast and copy cases and the RoPE frequency edits before the
fixes of the audit of 2026-12-07.
"""
from __future__ import annotations

import contextlib
import sys
import time

import pytest
import torch

import zoo
from zoo.attention import AgentAttention, MultiHeadAttention


def _agent_deit():
    torch.manual_seed(0)
    model = zoo.create_model("agent_deit_tiny", img_size=64, depth=2, agent_num=[9, 9, 9, 9], num_classes=5).eval()
    with torch.no_grad():  # non-zero tables, so a stale one shows
        for name, p in model.named_parameters():
            if name.endswith("_bias") or name == "pos_embed":
                p.normal_(0, 0.5)
    return model


def _fresh_logits(model, x):
    twin = zoo.create_model("agent_deit_tiny", img_size=64, depth=2, agent_num=[9, 9, 9, 9], num_classes=5).eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        return twin(x)


def _edit(param: torch.nn.Parameter, how: str, module: torch.nn.Module) -> None:
    if how == "data_assign":  # replaces the storage; the version counter stays
        param.data = param.data * 3.0
    else:  # torch.nn.utils.vector_to_parameters assigns .data too
        vector = torch.nn.utils.parameters_to_vector(module.parameters())
        torch.nn.utils.vector_to_parameters(vector * 1.5, module.parameters())


@pytest.mark.parametrize("how", ["data_assign", "vector_to_parameters"])
@pytest.mark.parametrize("target", ["an_bias", "pos_embed"])
def test_agent_deit_caches_follow_replaced_weights(how, target):
    model, x = _agent_deit(), torch.randn(1, 3, 48, 80)  # not the built size: both caches are used
    with torch.no_grad():
        before = model(x)
        param = model.blocks[0].attn.an_bias if target == "an_bias" else model.pos_embed
        _edit(param, how, model)
        after = model(x)
    assert not torch.allclose(before, after, atol=1e-3)
    torch.testing.assert_close(after, _fresh_logits(model, x), rtol=0, atol=1e-5)


def test_agent_deit_position_cache_survives_replacement_at_a_reused_address():
    """pos_embed replaced by fresh Parameters (version 0) twice: the successor may land at the cached one's
    freed address; the entry now keeps its source alive, so the address cannot be reused."""
    model, x = _agent_deit(), torch.randn(1, 3, 48, 80)
    for step in range(6):
        with torch.no_grad():
            model(x)
            model.pos_embed = torch.nn.Parameter(torch.randn_like(model.pos_embed) * (step + 1))
            torch.testing.assert_close(model(x), _fresh_logits(model, x), rtol=0, atol=1e-5)


def test_agent_caches_built_in_inference_mode_never_reach_autograd():
    # a frozen model (saliency): the input gradient after an inference_mode forward at the same size
    model, x = _agent_deit(), torch.randn(1, 3, 48, 80)
    model.requires_grad_(False)
    with torch.inference_mode():
        model(x)
    x_grad = x.clone().requires_grad_(True)
    model(x_grad).sum().backward()
    reference = x.clone().requires_grad_(True)
    twin = _agent_deit()
    twin.requires_grad_(False)
    twin(reference).sum().backward()
    torch.testing.assert_close(x_grad.grad, reference.grad)
    # only the bias tables frozen (a parameter-efficient fine-tune), validated under inference_mode
    layer = AgentAttention(16, 2, agent_num=4, window=3).eval()
    for name in ("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias", "ac_bias", "ca_bias"):
        getattr(layer, name).requires_grad_(False)
    tokens = torch.randn(2, 10, 16)
    with torch.inference_mode():
        layer(tokens)
    layer(tokens).sum().backward()
    assert layer.qkv.weight.grad is not None and torch.isfinite(layer.qkv.weight.grad).all()


@pytest.mark.parametrize("rope", ["1d", "2d"])
def test_rope_cos_sin_built_in_inference_mode_never_reach_autograd(rope):
    layer = MultiHeadAttention(8, 2, rope=rope, head_dim=4)
    x = torch.randn(2, 4, 8)
    with torch.inference_mode():
        layer(x)
    layer(x).sum().backward()  # "Inference tensors cannot be saved for backward" before
    assert torch.isfinite(layer.qkv.weight.grad).all()


@pytest.mark.parametrize("how", ["data_assign", "vector_to_parameters"])
def test_transformer_xl_table_follows_replaced_weights(how):
    layer = MultiHeadAttention(8, 2, rel_pos="xl").double()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        layer(x)  # builds the kept table
        _edit(layer.rel_pos.linear_pos.weight, how, layer.rel_pos)
        cached = layer(x)
    torch.testing.assert_close(cached, layer(x), rtol=0, atol=1e-12)  # grad mode never uses the table


def test_agent_attention_biases_follow_replaced_tables():
    layer = AgentAttention(16, 2, agent_num=4, window=3).double().eval()
    x = torch.randn(1, 10, 16, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
        layer.an_bias.data = layer.an_bias.data + 1.0
        cached = layer(x)
    torch.testing.assert_close(cached, layer(x), rtol=0, atol=1e-12)


def test_alternating_inference_mode_and_no_grad_reuses_both_entries():
    """The inference-mode flag was in the stamp but not the key: alternating an inference_mode and a no_grad
    forward rebuilt every bias table each time (review 2026-12-06). Each mode now keeps its entry."""
    layer = AgentAttention(16, 2, agent_num=4, window=3).eval()
    with torch.no_grad():
        plain = layer.biases((3, 3))
    with torch.inference_mode():
        inference = layer.biases((3, 3))
    with torch.no_grad():
        assert layer.biases((3, 3))[0] is plain[0]
    with torch.inference_mode():
        assert layer.biases((3, 3))[0] is inference[0]



@contextlib.contextmanager
def _fast_thread_switches():
    """Python's thread switch interval at 1 us for the block (threads interleave inside the caches' code)."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def _run_threads(threads) -> None:
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


class _PreemptedDict(dict):
    """A dict that lets other threads run inside each of its operations (``time.sleep(0)`` releases the GIL), as a
    busy server's scheduler may at any bytecode: the races of a cache show in a few calls instead of once in tens of
    thousands (the audit's repro)."""

    def __iter__(self):
        for key in super().__iter__():
            time.sleep(0)
            yield key

    def __setitem__(self, key, value):
        time.sleep(0)
        super().__setitem__(key, value)

    def __delitem__(self, key):
        time.sleep(0)
        super().__delitem__(key)

    def pop(self, *args):
        time.sleep(0)
        return super().pop(*args)


def test_shared_caches_serve_threads():
    """Threads sharing one model (a server's thread pool): AgentAttention's 8-entry bias and pooling caches evicted
    with ``cache.pop(next(iter(cache)))`` and the per-mask block-map cache (``cache_put`` iterated it; ``block_map``
    tested ``key in cache`` and read it back) raised KeyError, StopIteration or "dictionary changed size during
    iteration" when another thread evicted at the same time. Many sizes (more than the caches hold), caches that
    switch threads inside every operation and a tiny switch interval: no exception, every result equal to the
    single-thread one."""
    import threading

    from zoo.attention import Window

    layer = AgentAttention(16, 2, agent_num=4, window=3).eval()
    mask = Window(5, 0)
    grids = [(a, b) for a in range(2, 8) for b in range(2, 8)]  # 36 sizes through 8-entry caches
    lengths = range(8, 58)  # 50 sizes through the mask's 32
    with torch.no_grad():
        want_biases = {g: layer.biases(g) for g in grids}
        want_pools = {g: layer.pool_matrix(g, want_biases[g][0]) for g in grids}
    want_maps = {n: Window(5, 0).block_map(n, n, 4).states for n in lengths}
    layer._bias_cache, layer._pool_cache, mask._block_cache = _PreemptedDict(), _PreemptedDict(), _PreemptedDict()
    failures, served = [], []
    start = threading.Barrier(4)

    def worker(tid):
        start.wait()
        try:
            for it in range(100):
                g, n = grids[(it * 7 + tid * 5) % len(grids)], lengths[(it + tid) % len(lengths)]
                with torch.no_grad():
                    b1, b2 = layer.biases(g)
                    served.append((g, n, b1, b2, layer.pool_matrix(g, b1), mask.block_map(n, n, 4).states))
        except BaseException as error:  # noqa: B036 -- reported by the main thread
            failures.append(f"thread {tid}: {type(error).__name__}: {error}")

    with _fast_thread_switches():
        _run_threads([threading.Thread(target=worker, args=(tid,)) for tid in range(4)])
    assert not failures, failures[:3]
    for g, n, b1, b2, pool, states in served:  # checked here: the threads spend their time in the caches
        assert torch.equal(b1, want_biases[g][0]) and torch.equal(b2, want_biases[g][1]), g
        assert torch.equal(pool, want_pools[g]) and torch.equal(states, want_maps[n]), (g, n)
    assert len(served) == 400 and len(layer._bias_cache) <= 8 and len(mask._block_cache) <= 33


def test_saving_or_copying_an_agent_model_leaves_its_size_caches_behind():
    """torch.save(model) / copy.deepcopy(model) (the EMA and export copies) of an Agent-DeiT that had served a few
    image sizes carried every resized bias, pooling and position table (agent_deit_tiny: 23 MB fresh, 65 MB after 8
    sizes), as CachedGraphLayer's graph cache once did. They are rebuilt on the copy's first call."""
    import copy
    import io

    def saved_bytes(model):
        buffer = io.BytesIO()
        torch.save(model, buffer)
        return buffer.getvalue()

    torch.manual_seed(0)
    model = zoo.create_model("agent_deit_debug").eval()
    images = [torch.randn(1, 3, h, w) for h, w in ((40, 56), (24, 24), (48, 32), (56, 56))]
    fresh = len(saved_bytes(model))
    with torch.no_grad():
        want = [model(x) for x in images]
    assert model._pos_cache and model.blocks[0].attn._bias_cache  # the sizes were cached
    saved = saved_bytes(model)
    assert len(saved) == fresh, f"{len(saved)} bytes after serving 4 sizes, {fresh} fresh"
    for twin in (torch.load(io.BytesIO(saved), weights_only=False), copy.deepcopy(model)):
        assert not twin._pos_cache and not twin.blocks[0].attn._bias_cache and not twin.blocks[0].attn._pool_cache
        with torch.no_grad():
            for x, out in zip(images, want):
                torch.testing.assert_close(twin(x), out, rtol=0, atol=0)
    assert model._pos_cache  # the original keeps its own


def test_edge_index_fingerprint_weights_stay_bounded():
    """The graph cache's fingerprint kept int64 position weights as long as the largest edge count ever seen, per
    device, for the life of the process (64 MiB of CPU or GPU memory after one 4M-edge graph). They are now capped
    and longer rows summed in chunks; the fingerprint is still the wrapping sum of ``index * (2 * position + 1)``
    per row (the reference below), for every chunk size."""
    from zoo.attention import edge_backend  # the graph layers' cache fingerprint lives there

    edge_index = torch.randint(0, 50_000, (2, 300_001), generator=torch.Generator().manual_seed(0))
    weights = 2 * torch.arange(edge_index.size(1)) + 1
    want = (edge_index * weights).sum(dim=1).tolist()  # int64, wrapping as the fingerprint's dot

    def sums(fingerprint):
        return list(fingerprint[1:3])  # key (dtype, shape), then the per-row sums, mins and maxes

    edge_backend._FINGERPRINT_WEIGHTS.clear()
    assert sums(edge_backend._edge_index_fingerprint(edge_index)) == want
    kept = sum(w.numel() * w.element_size() for w in edge_backend._FINGERPRINT_WEIGHTS.values())
    assert 0 < kept <= 1 << 20, f"{kept} bytes of fingerprint weights kept for a 300k-edge graph"
    small = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    assert sums(edge_backend._edge_index_fingerprint(small)) == (small * (2 * torch.arange(5) + 1)).sum(1).tolist()
    huge = torch.full((2, 70_000), 2**62 + 12345)  # the products wrap mod 2**64, in chunks as in one dot
    want_huge = (huge * (2 * torch.arange(70_000) + 1)).sum(1).tolist()
    assert sums(edge_backend._edge_index_fingerprint(huge)) == want_huge


def test_weights_replaced_through_data_never_hit_a_stale_entry():
    """``p.data = t`` keeps the Parameter and its version counter and frees the old storage; the allocator handed
    its address to a later replacement, the stamp came out equal and TransformerXLRelPos served the table of the
    old weights (25.7 off). Cache entries now keep the old storage alive, so its address cannot come back."""
    import copy

    from zoo.attention.relpos_xl import TransformerXLRelPos

    torch.manual_seed(0)
    module = TransformerXLRelPos(64, 4).eval()
    q = torch.randn(1, 4, 5, 16)
    weight = module.linear_pos.weight
    for replacements in range(1, 6):
        weight.data = torch.randn(64, 64)
        with torch.no_grad():
            module(q, 5, 0.25)  # an entry keyed on these weights
        for _ in range(replacements):  # replaced, not evaluated: the second one may land on the first's address
            weight.data = torch.randn(64, 64)
        with torch.no_grad():
            _, cached = module(q, 5, 0.25)
            fresh = copy.deepcopy(module)
            fresh._tables = {}  # (deepcopy leaves the tables behind already)
            _, expected = fresh(q, 5, 0.25)
        torch.testing.assert_close(cached, expected, rtol=0, atol=0)


def _preempted_xl_layer():
    """A rel_pos="xl" MultiHeadAttention whose TransformerXLRelPos lets other threads run at every read of its kept
    tables (``time.sleep(0)`` releases the GIL), as _PreemptedDict does for dict-based caches: a race between a
    thread's check and its read back shows in a few rounds instead of a few times in thousands of calls."""
    from zoo.attention.relpos_xl import TransformerXLRelPos

    class PreemptedReads(TransformerXLRelPos):
        def __getattribute__(self, name):
            if name.startswith("_table"):
                time.sleep(0)
            return super().__getattribute__(name)

    torch.manual_seed(0)
    layer = MultiHeadAttention(32, 2, rel_pos="xl").eval()
    return layer, PreemptedReads


def test_transformer_xl_table_serves_threads():
    """Threads sharing a rel_pos="xl" layer, half of the calls under autocast (audit 2026-12-07): the single kept
    table was tested, stored and read back in separate steps, so another thread's smaller table or its bf16 one
    could be sliced instead ("rel_shift: the last dim must be ...", "expected m1 and m2 to have the same dtype", or
    values of the wrong precision). Each round starts with no table (.float() drops them, as .to(device) does) and
    lengths that make it grow; every result equals the single-thread one."""
    import threading

    layer, preempted = _preempted_xl_layer()
    lengths = (5, 20, 40, 70, 130, 9, 33)
    inputs = [torch.randn(1, n, 32) for n in lengths]
    with torch.no_grad():
        want = [layer(x) for x in inputs]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want_bf16 = [layer(x) for x in inputs]
    layer.rel_pos.__class__ = preempted
    failures, served = [], []

    def worker(tid, start):
        start.wait()
        try:
            for it in range(8):
                index, bf16 = (it * 3 + tid) % len(inputs), (it + tid) % 2 == 1
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    served.append((index, bf16, layer(inputs[index])))
        except BaseException as error:  # noqa: B036 -- reported by the main thread
            failures.append(f"thread {tid}: {type(error).__name__}: {error}")

    with _fast_thread_switches():
        for _ in range(6):
            layer.float()  # no table: the threads build and grow them
            start = threading.Barrier(4)
            _run_threads([threading.Thread(target=worker, args=(tid, start)) for tid in range(4)])
    assert not failures, failures[:3]
    assert len(served) == 6 * 4 * 8
    for index, bf16, out in served:
        if bf16:
            assert out.dtype == torch.bfloat16
            torch.testing.assert_close(out, want_bf16[index])
        else:
            torch.testing.assert_close(out, want[index], rtol=0, atol=1e-5)
    assert len(layer.rel_pos._tables) == 2  # one table per autocast mode


def test_transformer_xl_keeps_a_table_per_autocast_mode():
    """A model served both with and without torch.autocast rebuilt its one kept table at every switch (19 of 20
    calls alternating fp32 / bf16 autocast, audit 2026-12-07). Each mode keeps its own now; the outputs equal the
    grad-mode path (no table) and the first calls."""
    torch.manual_seed(0)
    layer = MultiHeadAttention(32, 2, rel_pos="xl").eval()
    x = torch.randn(1, 40, 32)
    projected = []
    project = layer.rel_pos._project
    layer.rel_pos._project = lambda sinusoids: projected.append(len(sinusoids)) or project(sinusoids)
    with torch.no_grad():
        first = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            first_bf16 = layer(x)
        assert len(projected) == 2
        for step in range(6):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=step % 2 == 1):
                out = layer(x)
            assert torch.equal(out, first_bf16 if step % 2 else first), step
    assert len(projected) == 2, f"{len(projected) - 2} tables rebuilt in 6 alternating calls"
    torch.testing.assert_close(first, layer(x), rtol=0, atol=1e-6)  # grad mode: projected per call
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 rounds the per-call rows' product otherwise
        torch.testing.assert_close(first_bf16, layer(x), rtol=0.02, atol=2e-3)


@pytest.mark.parametrize("kwargs,n", [({"rel_pos": "xl"}, 400), ({"rope": "1d"}, 400), ({"rope": "2d"}, 400)])
def test_saving_or_copying_xl_and_rope_layers_leaves_their_tables_behind(kwargs, n):
    """torch.save(module) / copy.deepcopy / pickle of a rel_pos="xl" or RoPE layer carried its kept tables (XL: a
    C = 256 layer saved 7x larger after one 4000-token call, with a copy of linear_pos.weight the copy could never
    use), as Agent-DeiT once did. The copies rebuild them on their first call and give the same outputs."""
    import copy
    import io
    import pickle

    def saved_bytes(module):
        buffer = io.BytesIO()
        torch.save(module, buffer)
        return buffer.getvalue()

    def kept(module):
        return module.rel_pos._tables if module.rel_pos is not None else module.rope._cache

    torch.manual_seed(0)
    layer = MultiHeadAttention(64, 4, **kwargs).eval()
    x = torch.randn(1, n, 64)
    fresh = len(saved_bytes(layer))
    with torch.no_grad():
        want = layer(x)
    saved = saved_bytes(layer)
    assert len(saved) == fresh, f"{len(saved)} bytes after one {n}-token call, {fresh} fresh"
    assert kept(layer)  # the original keeps its own
    copies = (torch.load(io.BytesIO(saved), weights_only=False), copy.deepcopy(layer),
              pickle.loads(pickle.dumps(layer)))
    for twin in copies:
        assert not kept(twin)
        with torch.no_grad():
            torch.testing.assert_close(twin(x), want, rtol=0, atol=0)
        assert kept(twin)


def _rope_layer(mode, theta=None):
    torch.manual_seed(0)
    return MultiHeadAttention(32, 2, rope=mode, rope_theta=theta).eval()


@pytest.mark.parametrize("mode", ["1d", "2d", "3d"])
@pytest.mark.parametrize("edit", ["theta", "assign_freqs", "freqs_in_place"])
def test_rope_frequency_edits_take_effect(mode, edit):
    """Position interpolation and NTK-style base scaling change a built model's rotary frequencies. The cos/sin
    kept for default positions ignored the change, in no_grad and grad mode alike, and rope.theta was read only in
    __init__ (audit 2026-12-07). Each way of editing now gives what a fresh module built with the new base
    gives."""
    from zoo.attention.rope import rope_frequencies

    layer = _rope_layer(mode)
    x = torch.randn(1, 24, 32)
    positions = (2, 3, 4) if mode == "3d" else (4, 6) if mode == "2d" else None
    rope = layer.rope
    new_theta = rope.theta * 8
    twin = _rope_layer(mode, theta=new_theta)
    twin.load_state_dict(layer.state_dict())
    with torch.no_grad():
        before = layer(x, positions=positions)  # fills the cos/sin cache
    if edit == "theta":
        rope.theta = new_theta
    elif edit == "assign_freqs":
        rope.freqs = rope_frequencies(rope.head_dim, mode, new_theta, rope.axes_dims)
    else:
        rope.freqs.copy_(rope_frequencies(rope.head_dim, mode, new_theta, rope.axes_dims))
    with torch.no_grad():
        after, want = layer(x, positions=positions), twin(x, positions=positions)
    assert not torch.allclose(before, want, atol=1e-3)
    torch.testing.assert_close(after, want, rtol=0, atol=0)
    torch.testing.assert_close(layer(x, positions=positions), twin(x, positions=positions), rtol=0, atol=0)


def test_rope_built_under_inference_mode_sees_in_place_frequency_edits():
    """A RotaryEmbedding built under torch.inference_mode held inference-tensor frequencies, which have no version
    counter: an in-place edit left the old cos/sin in use (review, 2026-12-07)."""
    from zoo.attention.rope import rope_frequencies

    with torch.inference_mode():
        layer = _rope_layer("1d")
        x = torch.randn(1, 24, 32)
        layer(x)  # fills the cos/sin cache
        rope = layer.rope
        rope.freqs.copy_(rope_frequencies(rope.head_dim, "1d", rope.theta * 8, rope.axes_dims))
        twin = _rope_layer("1d", theta=rope.theta * 8)
        twin.load_state_dict(layer.state_dict())
        torch.testing.assert_close(layer(x), twin(x), rtol=0, atol=0)


def test_rope_frequencies_are_checked_when_assigned():
    rope = _rope_layer("2d").rope
    with pytest.raises(ValueError, match=r"freqs must be a floating-point tensor of shape \(4,\) for 2d RoPE"):
        rope.freqs = torch.ones(8, dtype=torch.float64)
    with pytest.raises(ValueError, match="freqs contain NaN or Inf"):
        rope.freqs = torch.full((4,), float("inf"))
    with pytest.raises(ValueError, match="theta must be a finite number > 1, got 0.5"):
        rope.theta = 0.5
    rope.freqs = torch.ones(4)  # fp32 accepted, kept in fp64
    assert rope.freqs.dtype == torch.float64 and rope.theta == 100.0


def test_layers_pickled_before_the_cache_changes_still_load():
    """RoPE modules pickled before theta and freqs became properties kept them as plain attributes, and
    TransformerXLRelPos layers kept one table as _table: both layouts still load and compute."""
    from zoo.attention.relpos_xl import TransformerXLRelPos

    rope = _rope_layer("1d").rope
    state = rope.__getstate__()
    state["theta"], state["freqs"] = state.pop("_theta"), state.pop("_freqs")  # the old layout
    old_rope = type(rope).__new__(type(rope))
    old_rope.__setstate__(state)
    assert old_rope.theta == rope.theta
    q = torch.randn(1, 2, 7, 16)
    torch.testing.assert_close(old_rope(q), rope(q), rtol=0, atol=0)

    xl = TransformerXLRelPos(16, 2).eval()
    state = xl.__getstate__()
    del state["_tables"]
    state["_table"] = None  # the old layout
    old_xl = TransformerXLRelPos.__new__(TransformerXLRelPos)
    old_xl.__setstate__(state)
    q = torch.randn(1, 2, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(old_xl(q, 5, 0.5), xl(q, 5, 0.5), rtol=0, atol=0)
    assert old_xl._tables and not hasattr(old_xl, "_table")
