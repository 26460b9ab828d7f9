"""Incremental decoding with zoo.attention.KVCache: a decoder run token by token (or chunk by chunk) through
MultiHeadAttention with a cache gives the outputs of the whole causal sequence in one call (which
tests/test_modules.py checks against the float64 reference), for GQA, qk-norm and 1D RoPE, on every backend
that serves the calls; cross attention projects its context once; beams reorder; misuse gives clear errors."""
from __future__ import annotations

import math

import pytest
import torch

from zoo.attention import Causal, ChunkWindow, KVCache, MultiHeadAttention, Segments, Window, use_backend

TOL = dict(atol=2e-5, rtol=2e-5)


def _decoder(**kwargs):
    torch.manual_seed(0)
    return MultiHeadAttention(32, num_heads=4, num_kv_heads=2, qk_norm=True, rope="1d", qkv_bias=True,
                              **kwargs).eval()


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("steps", [[11], [1] * 11, [4, 1, 1, 1, 3, 1]], ids=["one call", "token by token", "mixed"])
def test_incremental_decoding_equals_the_whole_sequence(backend, steps):
    mha = _decoder()
    x = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), use_backend(backend):
        full = mha(x, mask=Causal())
        cache, outs, t = KVCache(), [], 0
        for n in steps:
            outs.append(mha(x[:, t:t + n], mask=Causal() if n > 1 else None, cache=cache))
            t += n
    torch.testing.assert_close(torch.cat(outs, dim=1), full, **TOL)
    assert len(cache) == 11 and cache.keys.shape == (2, 2, 11, 8)


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("left", [None, 1])
@pytest.mark.parametrize("rel_pos", [None, "xl"])
def test_streaming_chunks_equal_the_whole_utterance(backend, left, rel_pos):
    """A streaming encoder (WeNet / NeMo chunked attention) fed one chunk of frames at a time through the
    cache, with ChunkWindow (bottom-right aligned), gives the whole utterance's chunk-masked outputs; the
    last chunk is short."""
    torch.manual_seed(0)
    kw = dict(rope="1d") if rel_pos is None else dict(rel_pos="xl")
    mha = MultiHeadAttention(32, num_heads=4, qkv_bias=True, **kw).eval()
    x = torch.randn(2, 18, 32, generator=torch.Generator().manual_seed(2))
    mask = ChunkWindow(4, left=left)
    with torch.no_grad(), use_backend(backend):
        full = mha(x, mask=mask)
        cache = KVCache()
        outs = [mha(x[:, t:t + 4], mask=mask, cache=cache) for t in range(0, 18, 4)]
        unlimited = mha(x, mask=ChunkWindow(4))
        # WeNet's attention cache: keep only the left context (one chunk here), exact for the limited mask
        rolling = KVCache(max_length=4) if left == 1 else None
        rolled = None if rolling is None else [mha(x[:, t:t + 4], mask=mask, cache=rolling) for t in range(0, 18, 4)]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, **TOL)
    if rolling is not None:
        torch.testing.assert_close(torch.cat(rolled, dim=1), full, **TOL)
        assert len(rolling) == 4 and rolling.position == 18
    # The first two chunks have at most one chunk of history; later ones lose what the limit cuts off.
    torch.testing.assert_close(full[:, :8], unlimited[:, :8], **TOL)
    assert torch.allclose(full, unlimited, **TOL) == (left is None)


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("steps", [[1] * 23, [5, 1, 3, 1, 1, 7, 2, 3]], ids=["token by token", "mixed"])
def test_rolling_cache_is_exact_for_a_sliding_window(backend, steps):
    """Mistral's rolling buffer: a sliding-window decoder (Window(w, 0)) with KVCache(max_length=w) gives the
    whole sequence's outputs while holding at most 2w + n keys; RoPE positions count every token seen; the
    kept keys are the last ones of an unbounded cache fed the same calls."""
    mha, w = _decoder(), 6
    x = torch.randn(2, 23, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), use_backend(backend):
        full = mha(x, mask=Window(w, 0))
        rolling, unbounded, outs, t = KVCache(max_length=w), KVCache(), [], 0
        for n in steps:
            outs.append(mha(x[:, t:t + n], mask=Window(w, 0), cache=rolling))
            mha(x[:, t:t + n], mask=Window(w, 0), cache=unbounded)
            t += n
            assert len(rolling) == min(t, w) and rolling.position == t and rolling.dropped == t - len(rolling)
            assert rolling._k.shape[2] <= max(2 * w + max(steps), 16)
            assert torch.equal(rolling.keys, unbounded.keys[:, :, t - len(rolling):])
            assert torch.equal(rolling.values, unbounded.values[:, :, t - len(rolling):])
        # token by token the bound alone is the window: no mask needed
        bare = KVCache(max_length=w)
        alone = [mha(x[:, i:i + 1], cache=bare) for i in range(23)]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, **TOL)
    torch.testing.assert_close(torch.cat(alone, dim=1), full, **TOL)
    assert repr(bare) == "KVCache(length=6, keys=(2, 2, 6, 8), max_length=6, position=23)"
    bare.reset()
    assert len(bare) == 0 and bare.position == 0 and bare.max_length == w
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_length must be a positive int"):
            KVCache(max_length=bad)


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("rel_pos", [None, "xl"])
def test_a_call_with_no_new_tokens_returns_nothing_and_leaves_the_stream_as_it_was(backend, rel_pos):
    """A decode step with no new tokens (an empty (B, 0, C) input: a batch whose requests all finished this step)
    returns (B, 0, C) and appends nothing: the steps around it still give the whole sequence's outputs, RoPE
    positions and Transformer-XL distances unchanged. (MultiHeadAttention refused it: "x has no tokens".) An empty
    first call, on an empty cache, too."""
    torch.manual_seed(0)
    positions = dict(rel_pos="xl") if rel_pos else dict(rope="1d")
    mha = MultiHeadAttention(32, num_heads=4, qkv_bias=True, **positions).eval()
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), use_backend(backend):
        full = mha(x, mask=Causal())
        cache, outs = KVCache(), []
        assert mha(x[:, :0], cache=cache).shape == (2, 0, 32) and len(cache) == 0
        outs.append(mha(x[:, :4], mask=Causal(), cache=cache))
        empty = mha(x[:, 4:4], mask=Causal(), cache=cache)
        assert empty.shape == (2, 0, 32) and len(cache) == 4 and cache.position == 4
        outs.append(mha(x[:, 4:5], cache=cache))
        outs.append(mha(x[:, 5:6], cache=cache))
    torch.testing.assert_close(torch.cat(outs, dim=1), full, **TOL)


def test_cache_grows_by_doubling_and_keeps_every_key():
    cache = KVCache()
    keys = [torch.randn(1, 2, 1, 4) for _ in range(40)]
    capacities = set()
    for k in keys:
        got_k, got_v = cache.append(k, -k)
        capacities.add(cache._k.shape[2])
    assert capacities == {16, 32, 64}  # amortised: a handful of reallocations for 40 tokens
    torch.testing.assert_close(got_k, torch.cat(keys, dim=2))
    torch.testing.assert_close(got_v, -torch.cat(keys, dim=2))
    cache.reset()
    assert len(cache) == 0 and cache.keys is None


def test_cross_attention_projects_the_context_once():
    torch.manual_seed(0)
    cross = MultiHeadAttention(32, num_heads=4, kv_dim=24, qk_norm=True).eval()
    context = torch.randn(2, 7, 24)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        want = cross(x, context=context)
        cache = KVCache()
        calls = []
        handle = cross.kv.register_forward_hook(lambda *a: calls.append(1))
        first = cross(x[:, :2], context=context, cache=cache)
        rest = cross(x[:, 2:], cache=cache)  # context from the cache
        again = cross(x[:, 2:], context=context, cache=cache)  # the same tensor: not projected again
        handle.remove()
    torch.testing.assert_close(torch.cat([first, rest], dim=1), want, **TOL)
    torch.testing.assert_close(again, rest, **TOL)
    assert len(calls) == 1
    other = torch.randn(2, 3, 24)
    with torch.no_grad():  # another context replaces the stored one
        torch.testing.assert_close(cross(x, context=other, cache=cache), cross(x, context=other), **TOL)
    assert len(cache) == 3


def test_an_empty_cross_attention_context_is_cached_like_any_other():
    """An empty context (B, 0, kv_dim), which MultiHeadAttention accepts as nn.MultiheadAttention does, is stored
    by the first call with a cache; the decode steps after it reuse it (the module decided from len(cache), which
    is 0 for it, and refused them with "pass context"). Every step gives nn.MultiheadAttention's result for the
    empty context (zero attention, then the output projection), and the context is projected once."""
    torch.manual_seed(0)
    cross = MultiHeadAttention(32, num_heads=4, kv_dim=24, qkv_bias=True).eval()
    peer = torch.nn.MultiheadAttention(32, 4, kdim=24, vdim=24, batch_first=True).eval()
    with torch.no_grad():
        peer.q_proj_weight.copy_(cross.q.weight)
        peer.k_proj_weight.copy_(cross.kv.weight[:32])
        peer.v_proj_weight.copy_(cross.kv.weight[32:])
        peer.in_proj_bias.copy_(torch.cat([cross.q.bias, cross.kv.bias]))
        peer.out_proj.load_state_dict(cross.proj.state_dict())
    context, x = torch.randn(2, 0, 24), torch.randn(2, 4, 32)
    cache, calls = KVCache(), []
    handle = cross.kv.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        steps = [cross(x[:, :2], context=context, cache=cache), cross(x[:, 2:3], cache=cache),
                 cross(x[:, 3:], context=context, cache=cache)]
        want = peer(x, context, context, need_weights=False)[0]
    handle.remove()
    torch.testing.assert_close(torch.cat(steps, dim=1), want, **TOL)
    assert len(calls) == 1 and len(cache) == 0 and cache.context is context


def test_reorder_selects_beams():
    mha = _decoder()
    x = torch.randn(3, 6, 32, generator=torch.Generator().manual_seed(2))
    beams = torch.tensor([2, 2, 0])
    with torch.no_grad():
        cache = KVCache()
        mha(x[:, :4], mask=Causal(), cache=cache)
        cache.reorder(beams)
        step = mha(x[beams, 4:6], mask=Causal(), cache=cache)
        want = mha(x[beams], mask=Causal())[:, 4:6]
        # negative rows count from the end, as tensor indexing reads them (index_select raised a bare IndexError)
        cache = KVCache()
        mha(x[:, :4], mask=Causal(), cache=cache)
        cache.reorder(torch.tensor([-1, 2, -3]))
        from_the_end = mha(x[beams, 4:6], mask=Causal(), cache=cache)
    torch.testing.assert_close(step, want, **TOL)
    torch.testing.assert_close(from_the_end, want, **TOL)


def test_cache_misuse_raises_clear_errors():
    mha = _decoder()
    cache = KVCache()
    with torch.no_grad():
        mha(torch.randn(2, 3, 32), mask=Causal(), cache=cache)
        with pytest.raises(ValueError, match="batch 2 but x has batch 3"):
            mha(torch.randn(3, 1, 32), cache=cache)
        with pytest.raises(ValueError, match="num_queries"):
            mha(torch.randn(2, 1, 32), cache=cache, num_queries=1)
        with pytest.raises(TypeError, match="KVCache"):
            mha(torch.randn(2, 1, 32), cache={})
        with pytest.raises(ValueError, match="2d RoPE with a KV cache needs positions= for the new tokens"):
            MultiHeadAttention(32, num_heads=4, rope="2d")(torch.randn(1, 4, 32), cache=KVCache())
    # with autograd, appending in place made backward fail on a modified saved tensor (raw RuntimeError)
    with pytest.raises(RuntimeError, match="a KVCache is for inference; decode under torch.no_grad"):
        mha(torch.randn(2, 1, 32), cache=KVCache())
    frozen = _decoder().requires_grad_(False)
    frozen(torch.randn(2, 2, 32), mask=Causal(), cache=KVCache())  # nothing to differentiate: allowed
    c = KVCache()
    c.append(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    with pytest.raises(ValueError, match="do not continue"):
        c.append(torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4))
    with pytest.raises(ValueError, match="float64"):
        c.append(torch.randn(1, 2, 1, 4, dtype=torch.float64), torch.randn(1, 2, 1, 4, dtype=torch.float64))


def test_a_cache_belongs_to_one_layer_and_checks_what_it_is_given():
    """Two layers sharing one cache (or a cross-attention cache handed to a self-attention layer) used to mix
    their keys silently; append() and reorder() name bad arguments instead of torch's index errors."""
    with torch.no_grad():
        first, second = MultiHeadAttention(16, 4).eval(), MultiHeadAttention(16, 4).eval()
        cache = KVCache()
        first(torch.randn(1, 3, 16), cache=cache)
        with pytest.raises(ValueError, match="holds another layer's keys and values; use one KVCache per layer"):
            second(torch.randn(1, 3, 16), cache=cache)
        assert len(cache) == 3
        cache.reset()  # a new sequence: any layer may take it
        second(torch.randn(1, 2, 16), cache=cache)
        assert len(cache) == 2
        cross, cross_cache = MultiHeadAttention(16, 4, kv_dim=12).eval(), KVCache()
        cross(torch.randn(1, 2, 16), torch.randn(1, 7, 12), cache=cross_cache)
        with pytest.raises(ValueError, match="another layer"):
            first(torch.randn(1, 1, 16), cache=cross_cache)
    cache = KVCache()
    with pytest.raises(ValueError, match=r"new keys must be a \(B, Hkv, n, D\) tensor, got \(2, 3, 4\)"):
        cache.append(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    cache.append(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match="must share batch, heads, token count and dtype"):
        cache.append(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 2, 4))
    with pytest.raises(ValueError, match="must share"):
        cache.append(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4).double())
    with pytest.raises(ValueError, match=r"index \[0, 5\] is out of range for the cached batch of 1"):
        cache.reorder(torch.tensor([0, 5]))
    with pytest.raises(TypeError, match="1-D integer tensor"):
        cache.reorder([0])


@pytest.mark.parametrize("backend", ["torch", "blocksparse"])  # SDPA is softmax only
def test_sigmoid_attention_with_a_fixed_length_decodes_as_the_whole_sequence(backend):
    """score="sigmoid" subtracts log(Nk) of each call: decoding step by step (Nk = 1, 2, ...) or padded keys
    differ from the whole pass (up to 0.12 here). sigmoid_length fixes the n of b = -log(n), and then both equal
    the whole, unpadded sequence; the whole pass is checked against the definition written out."""
    torch.manual_seed(0)
    n = 6
    mha = MultiHeadAttention(16, 2, score="sigmoid", sigmoid_length=n).double().eval()
    x = torch.randn(2, n, 16, dtype=torch.float64)
    with torch.no_grad(), use_backend(backend):
        full = mha(x, mask=Causal())
        cache = KVCache()
        steps = torch.cat([mha(x[:, t:t + 1], cache=cache) for t in range(n)], dim=1)
        padded = torch.cat([x, torch.randn(2, 3, 16, dtype=torch.float64)], dim=1)
        keep = torch.arange(n + 3) < n
        unpadded = mha(padded, mask=keep[None, None, None, :])[:, :n]
        bidirectional = mha(x)
        # the definition: sigmoid(scale q.k - log n) over the allowed keys
        q, k, v = mha.qkv(x).view(2, n, 3, 2, 8).permute(2, 0, 3, 1, 4)
        weights = torch.sigmoid(q @ k.transpose(-1, -2) * mha.scale - torch.log(torch.tensor(n, dtype=torch.float64)))
        weights = weights.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), 0.0)
        want = mha.proj((weights @ v).transpose(1, 2).reshape(2, n, 16))
        default = MultiHeadAttention(16, 2, score="sigmoid").double().eval()
        default.load_state_dict(mha.state_dict())
        per_call = torch.cat([default(x[:, t:t + 1], cache=c) for c in [KVCache()] for t in range(n)], dim=1)
    torch.testing.assert_close(full, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(steps, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(unpadded, bidirectional, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(per_call, full, atol=1e-3)  # the per-call default: what sigmoid_length is for
    assert "sigmoid_length=6" in repr(mha)
    with pytest.raises(ValueError, match="sigmoid_length .* needs score='sigmoid'"):
        MultiHeadAttention(16, 2, sigmoid_length=6)
    with pytest.raises(ValueError, match="sigmoid_length must be a positive int"):
        MultiHeadAttention(16, 2, score="sigmoid", sigmoid_length=0)


def test_cache_misuse_that_would_be_silently_wrong_is_refused():
    """Three uses of a KV cache gave wrong outputs without a word: cross attention with RoPE decoded without
    positions (every query rotated at 0: 0.1 off the whole pass), a Window looking further back than a rolling
    cache keeps (0.38 off), and a ChunkWindow stream continued after a short chunk (0.54 off). Each is now an
    error saying what to do; the right use still equals the whole pass."""
    torch.manual_seed(0)
    cross = MultiHeadAttention(32, 4, kv_dim=16, rope="1d").double().eval()
    x, ctx = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 7, 16, dtype=torch.float64)
    with torch.no_grad():
        whole = cross(x, ctx, positions=(torch.arange(5), torch.arange(7)))
        cache = KVCache()
        with pytest.raises(ValueError, match=r"cross attention with RoPE and a KV cache needs positions=\(query "
                                             r"positions, context positions\) at every call"):
            cross(x[:, :1], ctx, cache=cache)
        steps = [cross(x[:, t:t + 1], ctx if t == 0 else None, positions=(torch.tensor([t]), torch.arange(7)),
                       cache=cache) for t in range(5)]
        torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=0, atol=1e-12)

        layer = MultiHeadAttention(32, 4).double().eval()
        seq = torch.randn(1, 12, 32, dtype=torch.float64)
        with pytest.raises(ValueError, match=r"Window\(left=8, right=0\) looks back 8 tokens but the KVCache keeps "
                                             r"max_length=4: use KVCache\(max_length=8\) or more"):
            layer(seq[:, :1], mask=Window(8, 0), cache=KVCache(max_length=4))
        stream = KVCache(max_length=8)
        layer(seq[:, :4], mask=ChunkWindow(4, left=2), cache=stream)
        layer(seq[:, 4:6], mask=ChunkWindow(4, left=2), cache=stream)  # a short chunk: fine as the last call
        with pytest.raises(ValueError, match=r"the stream is at token 6, inside a chunk of 4 .* feed whole chunks"):
            layer(seq[:, 6:10], mask=ChunkWindow(4, left=2), cache=stream)
        with pytest.raises(ValueError, match=r"looks back 2 chunks \(8 tokens\) but the KVCache keeps max_length=6"):
            layer(seq[:, :4], mask=ChunkWindow(4, left=2), cache=KVCache(max_length=6))


def test_alibi_as_rel_pos_bias_decodes_with_a_cache():
    """MultiHeadAttention(rel_pos_bias=ALiBi(H)) refused every KV cache, though ALiBi depends on distances alone
    (bottom-right aligned): token by token it now equals the whole causal pass; a learned table is still refused."""
    from zoo.attention import ALiBi, RelPosBiasTf

    torch.manual_seed(1)
    layer = MultiHeadAttention(32, 4, rel_pos_bias=ALiBi(4)).double().eval()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    with torch.no_grad():
        whole = layer(x, mask=Causal())
        cache = KVCache()
        steps = torch.cat([layer(x[:, t:t + 1], cache=cache) for t in range(9)], 1)
    torch.testing.assert_close(steps, whole, rtol=0, atol=1e-12)
    table = MultiHeadAttention(32, 4, rel_pos_bias=RelPosBiasTf((3, 3), 4)).eval()
    with torch.no_grad(), pytest.raises(ValueError, match=r"rel_pos_bias=RelPosBiasTf is not supported .* ALiBi"):
        table(torch.randn(1, 9, 32), cache=KVCache())


def test_a_layer_and_its_cache_copy_and_pickle_together():
    """copy.deepcopy((layer, cache)) refused the copied layer ("this KVCache holds another layer's keys"): the
    cache's weakref to its owner was copied as it was; pickle raised "cannot pickle 'weakref.ReferenceType'". A
    copy is unbound until a layer uses it; decoding on from the copy equals decoding on from the original."""
    import copy
    import pickle

    from zoo.attention import KVCache, MultiHeadAttention

    torch.manual_seed(0)
    layer = MultiHeadAttention(16, 2).eval()
    cache = KVCache()
    prompt, step = torch.randn(1, 5, 16), torch.randn(1, 1, 16)
    with torch.no_grad():
        layer(prompt, cache=cache)
        for copied_layer, copied_cache in (copy.deepcopy((layer, cache)), pickle.loads(pickle.dumps((layer, cache)))):
            forked = copy.deepcopy(cache)  # a beam: the same layer, a forked cache
            want = layer(step, cache=forked)
            torch.testing.assert_close(copied_layer(step, cache=copied_cache), want)
        torch.testing.assert_close(layer(step, cache=cache), want)


def test_a_cache_filled_in_inference_mode_continues_under_no_grad():
    """A prompt run under torch.inference_mode() (Lightning's predict loop), decoding continued under
    torch.no_grad(): torch's "Inplace update to inference tensor outside InferenceMode" came out of KVCache.append
    (its storage is an inference tensor). The storage is now copied once to normal tensors; the outputs equal the
    whole causal sequence's, through switches both ways."""
    mha = _decoder()
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = mha(x, mask=Causal())
    cache, outs = KVCache(), []
    for (start, stop), mode in zip(((0, 4), (4, 5), (5, 6), (6, 8), (8, 9)), (torch.inference_mode, torch.no_grad,
                                   torch.inference_mode, torch.no_grad, torch.no_grad)):
        with mode():
            outs.append(mha(x[:, start:stop], mask=Causal() if stop - start > 1 else None, cache=cache).clone())
    torch.testing.assert_close(torch.cat(outs, dim=1), full, **TOL)
    assert not cache.keys.is_inference()


def _stream(layer, x, mask, cache, step):
    """``x`` fed ``step`` tokens per call through ``cache``; the outputs concatenated."""
    return torch.cat([layer(x[:, t:t + step], mask=mask, cache=cache) for t in range(0, x.shape[1], step)], 1)


def test_a_chunk_window_over_a_rolling_cache_needs_a_multiple_of_the_chunk():
    """ChunkWindow numbers chunks from the first kept key: KVCache(max_length=6) with chunks of 4 kept keys
    starting inside a chunk once it rolled (0.17 off the whole pass, silently). A bound that is not a multiple of
    the chunk size is refused; a multiple equals the whole pass."""
    torch.manual_seed(0)
    layer = MultiHeadAttention(32, 4, rope="1d").double().eval()
    x = torch.randn(1, 16, 32, dtype=torch.float64)
    mask = ChunkWindow(4, left=1)
    with torch.no_grad():
        whole = layer(x, mask=mask)
        for bound in (6, 10):
            with pytest.raises(ValueError, match=rf"KVCache\(max_length={bound}\) is not a multiple of 4, so the kept "
                                                 rf"keys would start inside a chunk: use KVCache\(max_length=\d+\)"):
                _stream(layer, x, mask, KVCache(max_length=bound), 4)
        for bound in (4, 8):
            torch.testing.assert_close(_stream(layer, x, mask, KVCache(max_length=bound), 4), whole, rtol=0, atol=1e-12)


def test_combined_masks_get_the_stream_checks_of_their_parts():
    """``mask & Segments(...)`` (padding) skipped every check of _check_stream (0.16 to 0.28 off the whole pass);
    each Window / ChunkWindow part is now checked as a bare one. ``&`` with a window the cache holds is exact
    even beside an unbounded part (the tighter window decides), ``|`` needs every part held."""
    torch.manual_seed(0)
    layer = MultiHeadAttention(32, 4).double().eval()
    x = torch.randn(1, 12, 32, dtype=torch.float64)
    pad = Segments(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))  # for 4 queries, 8 keys
    with torch.no_grad():
        warm = KVCache(max_length=4)
        layer(x[:, :4], mask=Window(4, 0), cache=warm)
        with pytest.raises(ValueError, match=r"Window\(left=8, right=0\) looks back 8 tokens but the KVCache keeps "
                                             r"max_length=4"):
            layer(x[:, 4:8], mask=Window(8, 0) & pad, cache=warm)
        with pytest.raises(ValueError, match=r"looks back 2 chunks \(8 tokens\) but the KVCache keeps max_length=4"):
            layer(x[:, 4:8], mask=ChunkWindow(4, left=2) & pad, cache=warm)
        with pytest.raises(ValueError, match=r"Window\(left=8, right=0\) looks back 8 tokens"):
            layer(x[:, 4:8], mask=Window(2, 0) | Window(8, 0), cache=warm)
        stream = KVCache(max_length=8)
        layer(x[:, :6], mask=ChunkWindow(4, left=2), cache=stream)  # ends inside a chunk
        with pytest.raises(ValueError, match=r"the stream is at token 6, inside a chunk of 4"):
            layer(x[:, 6:10], mask=Segments(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 12, dtype=torch.long))
                  & ChunkWindow(4, left=2), cache=stream)
        assert len(warm) == 4 and len(stream) == 6  # the refused calls appended nothing
        whole = layer(x, mask=Window(4, 0))
        got = _stream(layer, x, Causal() & Window(4, 0), KVCache(max_length=4), 3)
    torch.testing.assert_close(got, whole, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mask", [Causal(), Window(None, 0), ChunkWindow(4)], ids=repr)
def test_unbounded_masks_over_a_rolling_cache_are_refused(mask):
    """Causal(), Window(None, 0) and ChunkWindow(c) see every earlier token in the whole pass, a rolling cache
    keeps max_length of them: accepted before, 0.16 to 0.28 off. Refused now, saying what to use; over an
    unbounded cache they equal the whole pass, and mask=None over a rolling cache stays the sliding window of
    its bound (test_rolling_cache_is_exact_for_a_sliding_window)."""
    torch.manual_seed(0)
    layer = MultiHeadAttention(32, 4, rope="1d").double().eval()
    x = torch.randn(1, 12, 32, dtype=torch.float64)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"looks back without limit but the KVCache keeps only max_length=4 "
                                             r"tokens, so the output would differ from the whole pass: give the mask "
                                             r"a bounded left \((Window\(4, 0\)|ChunkWindow\(4, left=L\))"):
            layer(x[:, :4], mask=mask, cache=KVCache(max_length=4))
        torch.testing.assert_close(_stream(layer, x, mask, KVCache(), 4), layer(x, mask=mask), rtol=0, atol=1e-12)


def test_a_failed_call_leaves_the_cache_as_it_was():
    """A call that raised after appending (a mask of the wrong shape, a NaN input) left its keys in the cache: a
    corrected retry decoded against a duplicated token (0.08 off), and NaN keys made every later call fail. The
    cache is rolled back (length, dropped, keys), so the retry equals the whole pass, rolling cache included."""
    torch.manual_seed(0)
    layer = MultiHeadAttention(32, 4, rope="1d").double().eval()
    x = torch.randn(1, 9, 32, dtype=torch.float64)
    nan_step = x[:, 5:6].clone()
    nan_step[0, 0, 0] = float("nan")
    with torch.no_grad():
        for bound, mask, whole in ((None, None, layer(x, mask=Causal())), (3, None, layer(x, mask=Window(3, 0)))):
            cache = KVCache(max_length=bound)
            outs = [layer(x[:, :5], mask=Causal() if bound is None else Window(3, 0), cache=cache)]
            before = (len(cache), cache.position, cache.keys.clone())
            with pytest.raises(ValueError, match="Dense mask has shape"):
                layer(x[:, 5:6], mask=torch.ones(1, 1, 1, 2, dtype=torch.bool), cache=cache)
            with pytest.raises(ValueError, match="contains NaN"):
                layer(nan_step, cache=cache)
            assert (len(cache), cache.position) == before[:2] and torch.equal(cache.keys, before[2])
            outs += [layer(x[:, t:t + 1], mask=mask, cache=cache) for t in range(5, 9)]
            torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=0, atol=1e-12)


def _right_padded_batch(layer, rows, lengths, width):
    """(each row's outputs after its prompt, decoded alone under Causal(); the right-padded Segments of the
    prompts; the (B, width, C) prompt batch, row b's first lengths[b] tokens then zeros) for ``rows``, one
    (1, n + steps, C) sequence per batch row."""
    alone = torch.cat([layer(r, mask=Causal())[:, n:] for r, n in zip(rows, lengths)])
    right = Segments.from_lengths(lengths, width)
    prompt = torch.zeros(len(rows), width, rows[0].shape[-1], dtype=rows[0].dtype)
    for b, (r, n) in enumerate(zip(rows, lengths)):
        prompt[b, :n] = r[0, :n]
    return alone, right, prompt


@pytest.mark.parametrize("scheme", ["alibi", "xl"])
def test_padded_batches_decode_left_padded_and_refuse_right_padding(scheme):
    """ALiBi and rel_pos='xl' count a key's distance over the cached keys alike for every row: a right-padded
    batch (Segments.from_lengths) decoded its shorter row 0.05 to 0.09 off, silently. The right-padded prompt
    itself is exact (its padding comes last); the first step that puts valid keys after the padding is refused.
    Left padding gives each row's outputs decoded alone."""
    from zoo.attention import ALiBi

    torch.manual_seed(0)
    kw = dict(rel_pos_bias=ALiBi(4)) if scheme == "alibi" else dict(rel_pos="xl")
    layer = MultiHeadAttention(32, 4, **kw).double().eval()
    lengths, width, steps = [6, 3], 6, 3
    rows = [torch.randn(1, n + steps, 32, dtype=torch.float64) for n in lengths]
    with torch.no_grad():
        alone, right, prompt = _right_padded_batch(layer, rows, lengths, width)
        right_cache = KVCache()
        prefill = layer(prompt, mask=Causal() & right, cache=right_cache)
        for b, (r, n) in enumerate(zip(rows, lengths)):  # the prompt's valid rows are exact
            torch.testing.assert_close(prefill[b, :n], layer(r[:, :n], mask=Causal())[0], rtol=0, atol=1e-12)
        next_ids = torch.cat([right.kv_ids, torch.zeros(2, 1, dtype=torch.long)], 1)
        step = torch.stack([r[0, n] for r, n in zip(rows, lengths)])[:, None]
        with pytest.raises(ValueError, match=r"a batch must be left-padded .* pad on the left"):
            layer(step, mask=Segments(torch.zeros(2, 1, dtype=torch.long), next_ids), cache=right_cache)
        assert len(right_cache) == width  # the refused step appended nothing
        ids = torch.tensor([[0] * 6, [-1] * 3 + [0] * 3])  # left padding
        prompt = torch.stack([torch.cat([torch.zeros(width - n, 32, dtype=torch.float64), r[0, :n]])
                              for r, n in zip(rows, lengths)])
        cache = KVCache()
        layer(prompt, mask=Causal() & Segments(ids), cache=cache)
        outs = []
        for t in range(steps):
            ids = torch.cat([ids, torch.zeros(2, 1, dtype=torch.long)], 1)
            step = torch.stack([r[0, n + t] for r, n in zip(rows, lengths)])[:, None]
            outs.append(layer(step, mask=Segments(torch.zeros(2, 1, dtype=torch.long), ids), cache=cache))
    torch.testing.assert_close(torch.cat(outs, 1), alone, rtol=0, atol=1e-12)


def test_misconfigurations_are_refused_where_they_are_made():
    """Three silent or misleading cases: ALiBi(1) on a 4-head layer broadcast one slope to every head;
    KVCache(max_length=2) on cross attention was ignored; RotaryEmbedding(np.int64(16)) said 'needs a head_dim
    that is a multiple of 2, got 16'."""
    import numpy as np

    from zoo.attention import ALiBi
    from zoo.attention.rope import RotaryEmbedding

    with pytest.raises(ValueError, match=r"rel_pos_bias ALiBi has 1 heads but this module has num_heads=4; build it "
                                         r"with 4 heads"):
        MultiHeadAttention(32, 4, rel_pos_bias=ALiBi(1))
    MultiHeadAttention(32, 4, rel_pos_bias=ALiBi(4))
    cross = MultiHeadAttention(32, 4, kv_dim=8).eval()
    with torch.no_grad(), pytest.raises(ValueError, match=r"KVCache\(max_length=2\) bounds a self-attention stream, "
                                                          r"but this is cross attention.*use KVCache\(\)"):
        cross(torch.randn(2, 3, 32), torch.randn(2, 9, 8), cache=KVCache(max_length=2))
    with pytest.raises(TypeError, match=r"head_dim must be a Python int, got int64 16 \(pass int\(head_dim\)\)"):
        RotaryEmbedding(np.int64(16))
    assert RotaryEmbedding(int(np.int64(16))).head_dim == 16


def test_a_window_or_segments_over_a_rolling_cache_is_refused():
    """Window(4, 0) | Segments(...) counted as looking back 4 tokens (the Segments part was ignored), so over
    KVCache(max_length=4) it was accepted and 0.82 off the whole pass; the union looks back without limit."""
    layer = MultiHeadAttention(16, 2).eval()
    ids = torch.zeros(1, 4, dtype=torch.long)
    with torch.no_grad(), pytest.raises(ValueError, match=r"\(Window\(left=4, right=0\) \| Segments.*looks back "
                                                          r"without limit.*& instead of \|"):
        layer(torch.randn(1, 4, 16), mask=Window(4, 0) | Segments(ids), cache=KVCache(max_length=4))
    with torch.no_grad():  # & keeps the window's bound
        layer(torch.randn(1, 4, 16), mask=Window(4, 0) & Segments(ids), cache=KVCache(max_length=4))


class _Decoder(torch.nn.Module):
    """A decode step that keeps its own cache, as a model exported for streaming would be written."""

    def __init__(self, layer: MultiHeadAttention, cache: KVCache):
        super().__init__()
        self.layer, self.cache = layer, cache

    def forward(self, x):
        return self.layer(x, mask=Causal(), cache=self.cache)


def _export_dynamo_onnx(module, example):
    pytest.importorskip("onnxscript")
    torch.onnx.export(module, (example,), dynamo=True, verbose=False)


def _export_torchscript_onnx(module, example):
    import io

    torch.onnx.export(module, (example,), io.BytesIO(), dynamo=False)


@pytest.mark.parametrize("exporter", [
    pytest.param(lambda m, x: torch.export.export(m, (x,)), id="torch.export"),
    pytest.param(lambda m, x: torch.export.export(m, (x,), strict=True), id="torch.export strict"),
    pytest.param(lambda m, x: torch.jit.trace(m, (x,)), id="torch.jit.trace"),
    pytest.param(_export_torchscript_onnx, id="onnx torchscript"),
    pytest.param(_export_dynamo_onnx, id="onnx dynamo"),
])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_exporting_a_kv_cache_is_refused_and_leaves_the_cache_usable(exporter, grad):
    """torch.export of a module holding a KVCache: with grad enabled it failed with "a KVCache is for inference;
    decode under torch.no_grad()" (the wrong cause); under no_grad it "succeeded" with a program that ignored the
    cache (its second and third steps 0.52 and 0.68 off the causal sequence) and left the module's cache holding
    FakeTensors, so the next eager step failed inside torch (audit 2026-12-06). An export is refused in one line
    naming the way out, and the cache stays empty and usable: eager decoding afterwards equals the whole pass."""
    if exporter is _export_torchscript_onnx or exporter is _export_dynamo_onnx:
        pytest.importorskip("onnx")
    layer = _decoder()
    decoder = _Decoder(layer, KVCache()).eval()
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(1))
    with torch.set_grad_enabled(grad), pytest.raises(Exception) as caught:
        exporter(decoder, x[:, :1])
    chain, error = [], caught.value
    while error is not None:  # torch.onnx wraps what the traced code raised; Dynamo (strict) quotes it
        chain.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    assert ("MultiHeadAttention: a KVCache cannot be exported (torch.export, torch.onnx.export, torch.jit.trace); "
            "export the decode step with the past keys and values as explicit inputs and outputs, or export the "
            "module without cache=") in "\n".join(chain), chain[:2]
    assert len(decoder.cache) == 0 and decoder.cache.keys is None and decoder.cache._owner is None
    with torch.no_grad():
        steps = torch.cat([decoder(x[:, t:t + 1]) for t in range(3)], 1)
        torch.testing.assert_close(steps, layer(x, mask=Causal()), **TOL)


def test_torch_compile_of_a_kv_cache_decoder_still_decodes_the_whole_sequence():
    """The export refusal above must not fire under torch.compile, whose graphs are re-traced as the cache grows:
    torch.compiler.is_exporting() is True there too in torch 2.11 (pytorch/pytorch#176347), so a refusal keyed
    on it would break compiled decoding (checked). Token-by-token compiled steps, unbounded and rolling, equal the
    whole pass."""
    layer = _decoder()
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1))
    step = torch.compile(lambda tokens, cache, mask: layer(tokens, mask=mask, cache=cache), backend="eager")
    with torch.no_grad():
        for cache, mask, whole in ((KVCache(), None, layer(x, mask=Causal())),
                                   (KVCache(max_length=3), Window(3, 0), layer(x, mask=Window(3, 0)))):
            steps = torch.cat([step(x[:, t:t + 1], cache, mask) for t in range(6)], 1)
            torch.testing.assert_close(steps, whole, **TOL)
            assert cache.position == 6


def _look_ahead_masks():
    pad = Segments(torch.zeros(1, 4, dtype=torch.long))  # the first call: 4 queries, 4 keys
    return [
        ChunkWindow(4, left=1, right=1), ChunkWindow(4, left=None, right=None), Window(8, 2), Window(8, None),
        Window(None, None), ChunkWindow(4, left=1, right=1) & pad, Causal() | Window(2, 1), pad.window(None, 1),
        Window(0, 2) & ChunkWindow(4, left=0, right=1),
    ]


def test_rope_prefix_count_of_one_call():
    """RotaryEmbedding(x, positions, num_prefix_tokens=n) leaves the first n tokens of this call unrotated (what a
    KV-cache step after the prefix uses, n = 0): equal to a module built with that count; not an int >= 0 refused."""
    from zoo.attention import RotaryEmbedding

    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    with_prefix, without = RotaryEmbedding(8, num_prefix_tokens=2), RotaryEmbedding(8)
    torch.testing.assert_close(with_prefix(x, num_prefix_tokens=0), without(x), rtol=0, atol=0)
    torch.testing.assert_close(without(x, num_prefix_tokens=2), with_prefix(x), rtol=0, atol=0)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=rf"num_prefix_tokens must be an int >= 0, got {bad!r}"):
            without(x, num_prefix_tokens=bad)


@pytest.mark.parametrize("index", range(len(_look_ahead_masks())),
                         ids=[repr(m).replace(" ", "") for m in _look_ahead_masks()])
def test_masks_that_look_ahead_are_refused_over_a_cache(index):
    """A mask with right context (a NeMo att_context_size [L, R] with R > 0) lets each query see keys that a
    stream has not fed yet: streamed chunk by chunk through a cache it was 0.40 to 0.45 off the whole pass,
    silently (the last chunk's look-ahead was cut off). Refused now, naming the part that looks ahead and what to
    do; ``&`` with a part whose right is 0 does not look ahead (test_masks_whose_right_context_is_bounded_...)."""
    mask = _look_ahead_masks()[index]
    ahead = {0: r"ChunkWindow\(chunk_size=4, left=1, right=1\) looks ahead \(right=1: 1 chunk\(s\) of 4 tokens\)",
             1: r"ChunkWindow\(chunk_size=4, left=None, right=None\) looks ahead \(right=None: without limit\)",
             2: r"Window\(left=8, right=2\) looks ahead \(right=2 tokens\)",
             3: r"Window\(left=8, right=None\) looks ahead \(right=None: without limit\)",
             4: r"Window\(left=None, right=None\) looks ahead \(right=None: without limit\)",
             5: r"ChunkWindow\(chunk_size=4, left=1, right=1\) looks ahead",
             6: r"Window\(left=2, right=1\) looks ahead \(right=1 tokens\)",
             7: r"SegmentWindow\(.*left=None, right=1\) looks ahead",
             8: r"Window\(left=0, right=2\) looks ahead"}[index]
    torch.manual_seed(0)
    layer = MultiHeadAttention(32, 4, rel_pos="xl").double().eval()
    x = torch.randn(1, 4, 32, dtype=torch.float64)
    cache = KVCache()
    with torch.no_grad():
        with pytest.raises(ValueError, match=ahead + r".*with a KV cache the future keys have not been fed.*"
                                                     r"needs right=0.*feed the look-ahead frames and delay the "
                                                     r"outputs.*without a cache the mask works"):
            layer(x, mask=mask, cache=cache)
        assert len(cache) == 0  # nothing appended
        layer(x, mask=mask)  # without a cache the mask works


def test_per_segment_masks_over_a_cache_are_checked_as_their_windows():
    """segments.chunk(...) counts chunks from each packed segment's start: a KV cache stream would have to feed whole
    chunks of every segment per call, which nothing checked; refused, naming the per-row form that streams.
    segments.window(w, 0) over a rolling cache is checked as Window(w, 0) is (a first version of this check
    refused it outright, although sequences packed back to back keep their latest keys together and the stream
    is exact): w within the bound streams exactly, token by token across a sequence boundary; a w beyond the bound
    and segments.causal() (unbounded) are refused."""
    torch.manual_seed(0)
    layer = MultiHeadAttention(32, 4).double().eval()
    ids = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]])
    x = torch.randn(1, ids.shape[1], 32, dtype=torch.float64)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"SegmentChunkWindow\(.*chunk_size=2, left=1, right=0\) counts chunks per "
                                             r"packed segment, which a KV cache stream does not follow: stream one "
                                             r"sequence per batch row with ChunkWindow\(2, left=1\) & "
                                             r"Segments\.from_lengths\(lengths\)"):
            layer(x[:, :4], mask=Segments(ids[:, :4]).chunk(2, left=1), cache=KVCache())
        whole = layer(x, mask=Segments(ids).window(3, 0))
        cache, outs = KVCache(max_length=4), []
        for t in range(ids.shape[1]):
            kept = len(cache) + 1  # the keys this call attends: the kept ones and the new token
            step_mask = Segments(ids[:, t:t + 1], ids[:, t + 1 - kept:t + 1]).window(3, 0)
            outs.append(layer(x[:, t:t + 1], mask=step_mask, cache=cache))
        torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=0, atol=1e-12)
        first = Segments(ids[:, :1])
        with pytest.raises(ValueError, match=r"SegmentWindow\(.*left=8, right=0\) looks back 8 tokens but the KVCache "
                                             r"keeps max_length=4: use KVCache\(max_length=8\) or more"):
            layer(x[:, :1], mask=first.window(8, 0), cache=KVCache(max_length=4))
        with pytest.raises(ValueError, match=r"SegmentWindow\(.*left=None, right=0\) looks back without limit but the "
                                             r"KVCache keeps only max_length=4 .*\(segments\.window\(4, 0\)"):
            layer(x[:, :1], mask=first.causal(), cache=KVCache(max_length=4))
        torch.testing.assert_close(layer(x, mask=Segments(ids).causal(), cache=KVCache()),
                                   layer(x, mask=Segments(ids).causal()), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mask", [Window(8, 2) & Causal(), ChunkWindow(4, left=1, right=1) & Window(3, 0),
                                  Window(0, 2) & ChunkWindow(4, left=1), ChunkWindow(4, left=1, right=0)], ids=repr)
def test_masks_whose_right_context_is_bounded_by_the_chunk_or_a_causal_part_stream_exactly(mask):
    """What the look-ahead check must still accept: a part with right=0 bounds the intersection (it sees no key a
    call has not fed), and so does a ChunkWindow with right=0 fed whole chunks (its queries see ahead only
    inside their own chunk, which the same call feeds). Streamed 4 tokens per call they equal the whole pass."""
    torch.manual_seed(0)
    layer = MultiHeadAttention(32, 4, rel_pos="xl").double().eval()
    x = torch.randn(1, 16, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(_stream(layer, x, mask, KVCache(), 4), layer(x, mask=mask), rtol=0, atol=1e-12)


def test_3d_rope_decodes_video_frame_by_frame_with_explicit_positions():
    """Autoregressive video: 3D RoPE (Wan's (frame, row, col) split) over a frame-causal ChunkWindow(tokens per
    frame), decoded one frame per call with the frame's slice of the whole pass's grid positions, equals the
    whole pass (the cache used to refuse any RoPE but 1D). Without positions nothing says where a new token sits
    in the grid: refused, saying to pass them. Cross attention with 2D RoPE gives its positions at every call."""
    from zoo.attention.rope import grid_positions

    torch.manual_seed(0)
    frames, rows, cols = 4, 2, 3
    per_frame = rows * cols
    layer = MultiHeadAttention(32, 2, num_kv_heads=1, qk_norm=True, rope="3d").double().eval()
    x = torch.randn(2, frames * per_frame, 32, dtype=torch.float64)
    pos = grid_positions(frames, rows, cols)
    mask = ChunkWindow(per_frame)
    cache = KVCache()
    with torch.no_grad():
        whole = layer(x, mask=mask, positions=pos)
        frame = slice(0, per_frame)
        streamed = [layer(x[:, frame], mask=mask, cache=cache, positions=pos[frame])]
        with pytest.raises(ValueError, match=r"3d RoPE with a KV cache needs positions= for the new tokens at every "
                                             r"call, a \(n, 3\) tensor of their \(frame, row, col\) positions"):
            layer(x[:, per_frame:2 * per_frame], mask=mask, cache=cache)
        for f in range(1, frames):
            frame = slice(f * per_frame, (f + 1) * per_frame)
            streamed.append(layer(x[:, frame], mask=mask, cache=cache, positions=pos[frame]))
        # cross attention (queries and context on 2D grids): positions are required at every call anyway
        cross = MultiHeadAttention(32, 2, kv_dim=16, rope="2d").double().eval()
        context = torch.randn(2, 6, 16, dtype=torch.float64)
        q_pos, k_pos = grid_positions(2, 2).double() + 0.5, grid_positions(2, 3)
        cross_cache = KVCache()
        cross_steps = [cross(x[:, :4], context, cache=cross_cache, positions=(q_pos, k_pos)),
                       cross(x[:, 4:8], cache=cross_cache, positions=(q_pos, k_pos))]
        cross_alone = [cross(x[:, :4], context, positions=(q_pos, k_pos)), cross(x[:, 4:8], context,
                                                                                positions=(q_pos, k_pos))]
    assert cache.position == frames * per_frame
    torch.testing.assert_close(torch.cat(streamed, 1), whole, rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.cat(cross_steps, 1), torch.cat(cross_alone, 1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("rope", ["1d", "2d"])
def test_rope_with_prefix_tokens_decodes_with_a_cache(rope):
    """RoPE leaves the first num_prefix_tokens (class / register tokens) unrotated. With a cache they are the
    stream's first tokens: the first call must hold them all, later calls rotate every token. 1D positions
    continue by themselves (a rotated token's position counts the rotated tokens before it, as in the whole
    pass); 2D ones are given for each call's rotated tokens. Both equal the whole causal pass."""
    from zoo.attention.rope import grid_positions

    torch.manual_seed(0)
    layer = MultiHeadAttention(32, 4, rope=rope, num_prefix_tokens=2).double().eval()
    x = torch.randn(2, 2 + 12, 32, dtype=torch.float64)
    pos = grid_positions(3, 4) if rope == "2d" else torch.arange(12)
    steps = [3, 1, 4, 1, 5]  # the first call: both prefix tokens and one rotated token
    cache, outs, t = KVCache(), [], 0
    with torch.no_grad():
        whole = layer(x, mask=Causal(), positions=pos)
        with pytest.raises(ValueError, match=r"1 tokens are fewer than num_prefix_tokens=2 .*with a KV cache, the "
                                             r"first call of a stream must hold all of them"):
            layer(x[:, :1], cache=KVCache())
        for n in steps:
            rotated = slice(max(t, 2) - 2, t + n - 2)
            outs.append(layer(x[:, t:t + n], mask=Causal(), cache=cache,
                              positions=pos[rotated] if rope == "2d" else None))
            t += n
    torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["window", "segment window"])
def test_a_window_one_token_longer_than_a_rolling_cache_is_refused(kind):
    """The bound of the history check (audit 2026-12-07, mutation testing): a window that looks back exactly
    max_length tokens streams exactly (the whole pass is the reference), one token more must be refused, as the
    rolling cache no longer holds the oldest key that window's queries see (silently 0.17 off otherwise)."""
    torch.manual_seed(0)
    layer = MultiHeadAttention(32, 4).double().eval()
    x = torch.randn(1, 12, 32, dtype=torch.float64)

    def mask(left, t=0, n=12):  # one segment: the kept keys are the last 4 (at most) and the call's n
        if kind == "window":
            return Window(left, 0)
        q_ids, kv_ids = torch.zeros(1, n, dtype=torch.long), torch.zeros(1, min(t, 4) + n, dtype=torch.long)
        return Segments(q_ids, kv_ids).window(left, 0)

    with torch.no_grad():
        whole = layer(x, mask=mask(4))
        cache = KVCache(max_length=4)
        outs = [layer(x[:, t:t + 1], mask=mask(4, t, 1), cache=cache) for t in range(12)]
        torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=0, atol=1e-12)
        with pytest.raises(ValueError, match=r"looks back 5 tokens but the KVCache keeps max_length=4"):
            layer(x[:, :1], mask=mask(5, 0, 1), cache=KVCache(max_length=4))


def test_a_cross_attention_cache_follows_beams_that_shrink_the_batch():
    """KVCache.reorder must reorder the stored context with the keys: a beam search that keeps fewer rows than
    it started with then decodes on from the cache alone (context=None) and equals the uncached module on the
    selected rows (audit 2026-12-07: without the context reordered the step failed on a batch mismatch)."""
    torch.manual_seed(0)
    cross = MultiHeadAttention(32, num_heads=4, kv_dim=24).double().eval()
    context = torch.randn(3, 7, 24, dtype=torch.float64)
    x = torch.randn(3, 4, 32, dtype=torch.float64)
    beams = torch.tensor([2, 0])
    with torch.no_grad():
        cache = KVCache()
        cross(x[:, :2], context=context, cache=cache)
        cache.reorder(beams)
        assert cache.context.shape[0] == 2
        torch.testing.assert_close(cache.context, context[beams], rtol=0, atol=0)
        step = cross(x[beams, 2:], cache=cache)
        want = cross(x[beams], context=context[beams])[:, 2:]
    torch.testing.assert_close(step, want, rtol=0, atol=1e-12)


def test_a_rolling_cache_moves_its_keys_once_per_max_length_tokens():
    """The rolling storage holds twice the bound plus a call, so decoding token by token moves the kept keys at
    most once every max_length tokens, not at every step (a storage of max_length slots reallocated at each token
    past the bound: O(max_length) copies per token); the kept keys stay the stream's last ones."""
    w = 32  # above the 16 slots every storage has at least
    cache = KVCache(max_length=w)
    keys = [torch.randn(1, 2, 1, 4) for _ in range(200)]
    storages, last = 0, None
    for t, k in enumerate(keys):
        got_k, got_v = cache.append(k, -k)
        if cache._k is not last:
            storages, last = storages + 1, cache._k
        torch.testing.assert_close(got_k, torch.cat(keys[max(0, t - w):t + 1], dim=2), rtol=0, atol=0)
        torch.testing.assert_close(got_v, -got_k, rtol=0, atol=0)
    assert storages <= 200 // w + 1, f"{storages} storages for 200 tokens with max_length={w}"
    assert cache.position == 200 and len(cache) == w


def test_a_first_call_with_padding_inside_the_batch_is_exact_with_alibi():
    """A first call is exact whatever its padding layout (every distance is within the call), so the left-padding
    check of ALiBi over a KV cache starts once keys are cached: valid keys after a gap of padding in the first
    call are accepted and equal the uncached call."""
    from zoo.attention import ALiBi

    torch.manual_seed(0)
    layer = MultiHeadAttention(32, 4, rel_pos_bias=ALiBi(4)).double().eval()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    ids = torch.tensor([[0, 0, -1, 0, 0], [0, 0, 0, 0, 0]])
    with torch.no_grad():
        want = layer(x, mask=Causal() & Segments(ids))
        got = layer(x, mask=Causal() & Segments(ids), cache=KVCache())
    valid = ids >= 0
    torch.testing.assert_close(got[valid], want[valid], rtol=0, atol=1e-12)


def test_rope_default_positions_over_a_right_padded_batch_are_refused_and_per_row_positions_are_exact():
    """1D RoPE continues its default positions from cache.position for every row: after a right-padded prompt
    (Segments.from_lengths) the shorter row's new token was rotated as if its padding were tokens, 0.01 off its
    unpadded pass, silently (review C, finding 1), while ALiBi and rel_pos='xl' refused the same call. It is refused
    too, naming both fixes; per-row positions=(B, n) (lengths + step) and left padding equal each row alone."""
    torch.manual_seed(0)
    layer = MultiHeadAttention(32, 4, rope="1d").double().eval()
    lengths, width, steps = [5, 3], 5, 3
    rows = [torch.randn(1, n + steps, 32, dtype=torch.float64) for n in lengths]
    step_ids = torch.zeros(2, 1, dtype=torch.long)
    with torch.no_grad():
        alone, right, prompt = _right_padded_batch(layer, rows, lengths, width)
        cache = KVCache()
        layer(prompt, mask=Causal() & right, cache=cache)  # the right-padded prompt itself is exact
        ids, outs = right.kv_ids, []
        for t in range(steps):
            ids = torch.cat([ids, torch.zeros(2, 1, dtype=torch.long)], 1)
            step = torch.stack([r[0, n + t] for r, n in zip(rows, lengths)])[:, None]
            if t == 0:
                with pytest.raises(ValueError, match=r"1D RoPE's default positions .* must be left-padded .* pad on "
                                                     r"the left, or pass per-row positions=\(B, n\)"):
                    layer(step, mask=Segments(step_ids, ids), cache=cache)
                assert len(cache) == width  # the refused step appended nothing
            per_row = (torch.tensor(lengths) + t)[:, None]
            outs.append(layer(step, mask=Segments(step_ids, ids), cache=cache, positions=per_row))
        torch.testing.assert_close(torch.cat(outs, 1), alone, rtol=0, atol=1e-12)
        ids = torch.tensor([[0] * width, [-1] * (width - lengths[1]) + [0] * lengths[1]])  # left padding
        prompt = torch.stack([torch.cat([torch.zeros(width - n, 32, dtype=torch.float64), r[0, :n]])
                              for r, n in zip(rows, lengths)])
        cache, outs = KVCache(), []
        layer(prompt, mask=Causal() & Segments(ids), cache=cache)
        for t in range(steps):
            ids = torch.cat([ids, torch.zeros(2, 1, dtype=torch.long)], 1)
            step = torch.stack([r[0, n + t] for r, n in zip(rows, lengths)])[:, None]
            outs.append(layer(step, mask=Segments(step_ids, ids), cache=cache))
    torch.testing.assert_close(torch.cat(outs, 1), alone, rtol=0, atol=1e-12)


@pytest.mark.parametrize("steps", [[3, 2], [1, 1, 1, 1, 1], [2, 3]], ids=["prefix and one", "token by token",
                                                                          "prefix and more"])
def test_cross_attention_with_rope_prefix_queries_decodes_as_the_whole_pass(steps):
    """Cross attention with RoPE and num_prefix_tokens left the first query of every cached call unrotated, so a
    query stream decoded over a cache was 0.19 off the whole pass and the right positions were refused (review C,
    finding 2). With a cache the prefix queries are the stream's first ones (KVCache.query_position counts them), as
    for self attention: each call gives the positions of its rotated queries and equals the whole pass. A failed
    call leaves the count as it was; a cache pickled before the count existed loads with 0."""
    import pickle

    torch.manual_seed(0)
    layer = MultiHeadAttention(32, 4, kv_dim=16, rope="1d", num_prefix_tokens=1).double().eval()
    x, context = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 7, 16, dtype=torch.float64)
    q_pos, k_pos = torch.arange(4), torch.arange(6) + 0.5  # 4 rotated queries, 6 rotated context tokens
    with torch.no_grad():
        whole = layer(x, context, positions=(q_pos, k_pos))
        cache, outs, t = KVCache(), [], 0
        for n in steps:
            rotated = slice(max(t, 1) - 1, t + n - 1)
            if t > 0:
                with pytest.raises(ValueError, match=r"1d RoPE positions must have shape"):
                    layer(x[:, t:t + n], positions=(q_pos[rotated][:-1], k_pos), cache=cache)
                with pytest.raises(ValueError, match=r"contains NaN"):  # raised after the count: rolled back
                    layer(x[:, t:t + n] * float("nan"), positions=(q_pos[rotated], k_pos), cache=cache)
                assert cache.query_position == t  # the failed calls counted nothing
            outs.append(layer(x[:, t:t + n], context if t == 0 else None, positions=(q_pos[rotated], k_pos),
                              cache=cache))
            t += n
    assert cache.query_position == 5
    torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=0, atol=1e-12)
    state = dict(cache.__dict__)
    del state["query_position"]
    old = KVCache.__new__(KVCache)
    old.__setstate__(state)
    assert old.query_position == 0 and pickle.loads(pickle.dumps(cache)).query_position == 5


def test_cross_attention_over_a_cache_refuses_masks_aligned_by_query_index():
    """Masks bottom-right aligned to a call's queries (Causal, Window, ChunkWindow, segments.window) cannot be
    served by a cross-attention cache: nothing says where a call's queries sit among the whole query sequence, and
    a lone query saw the whole context under Causal() (0.46 off the whole pass; Window(1, 0): 1.07; review C,
    finding 3). They are refused at every call, inside & / | too; the call's rows of the whole pass's mask, as the
    error suggests, decode exactly, and so does a mask that ignores query positions (KeyPadding)."""
    from zoo.attention import KeyPadding

    torch.manual_seed(0)
    layer = MultiHeadAttention(32, 4, kv_dim=12).double().eval()
    x, context = torch.randn(3, 4, 32, dtype=torch.float64), torch.randn(3, 6, 12, dtype=torch.float64)
    segments = Segments(torch.zeros(1, dtype=torch.long), torch.zeros(6, dtype=torch.long))
    refused = [Causal(), Window(1, 0), ChunkWindow(2), Causal() & KeyPadding([6, 5, 4]),
               Window(0, 0) | KeyPadding([6, 5, 4]), segments.window(2, 0)]
    with torch.no_grad():
        for mask in refused:
            cache = KVCache()
            with pytest.raises(ValueError, match=r"places each query by its index, bottom-right aligned to the "
                                                 r"call's queries, but a cross-attention KV cache .*\(mask\.dense\(N, "
                                                 r"M, rows=\(start, stop\)\)"):
                layer(x[:, :1], context, mask=mask, cache=cache)
            assert cache.context is None and cache.query_position == 0
        for mask in (Causal(), Window(1, 0), KeyPadding([6, 5, 4])):
            whole = layer(x, context, mask=mask)
            cache = KVCache()
            steps = [layer(x[:, t:t + 1], context if t == 0 else None, cache=cache,
                           mask=mask if isinstance(mask, KeyPadding) else mask.dense(4, 6, rows=(t, t + 1)))
                     for t in range(4)]
            torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rope", ["2d", "3d"])
def test_a_grid_size_is_refused_after_a_streams_first_rotated_tokens(rope):
    """A grid size numbers a call's tokens from the grid's origin: fed row by row (2D) or frame by frame (3D) with
    positions=(1, cols) / (1, rows, cols) every call after the first was rotated as row / frame 0 again, 0.07 off
    the whole pass, silently (review C, finding 4). Refused once the stream has rotated tokens, naming the tensor
    form; a first call (after the prefix tokens alone, too) may use one, and the sliced grid_positions equal the
    whole pass."""
    from zoo.attention.rope import grid_positions

    torch.manual_seed(0)
    grid = (3, 4) if rope == "2d" else (3, 2, 2)
    per_call = math.prod(grid[1:])
    layer = MultiHeadAttention(16, 2, rope=rope, num_prefix_tokens=1).double().eval()
    x = torch.randn(1, 1 + math.prod(grid), 16, dtype=torch.float64)
    pos = grid_positions(*grid)
    with torch.no_grad():
        whole = layer(x, mask=Causal(), positions=grid)
        cache = KVCache()
        outs = [layer(x[:, :1], cache=cache), layer(x[:, 1:1 + per_call], mask=Causal(), cache=cache,
                                                    positions=(1, *grid[1:]))]
        for r in range(1, grid[0]):
            tokens = slice(1 + r * per_call, 1 + (r + 1) * per_call)
            with pytest.raises(ValueError, match=rf"positions=\(1, {', '.join(map(str, grid[1:]))}\) is a grid size, "
                                                 rf"which numbers the call's tokens from the grid's origin, but the KV "
                                                 rf"cache stream has already fed {r * per_call} rotated tokens"):
                layer(x[:, tokens], mask=Causal(), cache=cache, positions=(1, *grid[1:]))
            outs.append(layer(x[:, tokens], mask=Causal(), cache=cache,
                              positions=pos[r * per_call:(r + 1) * per_call]))
        torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=0, atol=1e-12)
        cache = KVCache()  # the prefix token alone first: the whole grid may then follow as a grid size
        outs = [layer(x[:, :1], cache=cache), layer(x[:, 1:], mask=Causal(), cache=cache, positions=grid)]
    torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=0, atol=1e-12)
