"""zoo.layers: the small layers shared by the model families (checked against timm's equivalents)."""
from __future__ import annotations

import pytest
import torch
from timm.layers import DropPath as TimmDropPath
from timm.layers import LayerScale as TimmLayerScale

import math

from torch import nn

from zoo.layers import (
    EXP_FLOOR, DropPath, LayerScale, activate_fresh, check_finite_input, check_flag, exp_flushed_, is_tracing,
    surely_finite, to_pair,
)


def test_to_pair_accepts_ints_and_pairs_and_names_bad_values():
    assert to_pair(7, "img_size") == (7, 7)
    assert to_pair((3, 5), "img_size") == (3, 5)
    for bad in (0, -1, (1, 2, 3), (2, 0), True, (1.5, 2)):
        with pytest.raises(ValueError, match="img_size must be a positive int or a pair"):
            to_pair(bad, "img_size")


def test_check_flag_takes_booleans_numpy_booleans_and_0_1_only():
    """numpy 2 names its bool type "bool", not "bool_": np.True_ (a comparison of numpy scalars, a value read
    from an .npz) was refused as "must be True or False"."""
    import numpy as np

    for value, want in [(True, True), (False, False), (np.True_, True), (np.bool_(False), False), (1, True),
                        (0, False), (np.int64(1), True)]:
        assert check_flag(value, "flag") is want
    for bad in ("no", "True", 2, -1, 1.0, None, torch.tensor(True), [True]):
        with pytest.raises(TypeError, match="flag must be True or False"):
            check_flag(bad, "flag")


def test_drop_path_matches_timm_in_training_and_is_identity_in_eval():
    x = torch.randn(64, 5, 8)
    ours, theirs = DropPath(0.3), TimmDropPath(0.3)
    torch.manual_seed(0)
    out_ours = ours(x)
    torch.manual_seed(0)
    out_theirs = theirs(x)
    torch.testing.assert_close(out_ours, out_theirs)
    kept = (out_ours.abs().sum(dim=(1, 2)) > 0).float().mean()
    assert 0.45 < kept < 0.95  # about 70% of samples kept
    torch.testing.assert_close(out_ours[out_ours.abs().sum(dim=(1, 2)) > 0] * 0.7,
                               x[out_ours.abs().sum(dim=(1, 2)) > 0])
    assert ours.eval()(x) is x
    with pytest.raises(ValueError, match="drop_path rate"):
        DropPath(1.0)


def test_layer_scale_state_dict_and_output_match_timm():
    ours, theirs = LayerScale(8, 0.1), TimmLayerScale(8, 0.1)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(ours(x), theirs(x))


def test_check_finite_input_names_the_input_and_skips_under_tracing():
    check_finite_input(torch.randn(3, 4), "image")
    bad = torch.randn(3, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="image contains NaN or Inf"):
        check_finite_input(bad, "image")
    assert not is_tracing()

    def traced(t):
        assert is_tracing()
        check_finite_input(t, "image")  # skipped: a data-dependent check cannot be traced
        return t * 2

    torch.jit.trace(traced, (bad,), check_trace=False)


def _layouts(t: torch.Tensor):
    """The same values as a contiguous tensor, a permuted dense view, and a strided (non-dense) slice."""
    permuted = t.transpose(1, 2).contiguous().transpose(1, 2)  # dense, stored (B, N, H, D) like SDPA's output
    padded = torch.zeros(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype)
    padded[..., : t.shape[-1]] = t
    return {"contiguous": t, "permuted": permuted, "strided": padded[..., : t.shape[-1]]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "permuted", "strided"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("in_second", [False, True])
def test_surely_finite_finds_one_nonfinite_element_in_any_layout(dtype, layout, value, in_second):
    """One NaN/+-Inf anywhere in either tensor is reported (the dot path and the sum path), whatever the
    other tensor holds at that position (zeros included: Inf * 0 is NaN)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 5, 4, generator=g).to(dtype)
    b = torch.randn(2, 3, 5, 4, generator=g).to(dtype)
    b[1, 2] = 0.0
    assert surely_finite(_layouts(a)[layout], _layouts(b)[layout])
    assert surely_finite(_layouts(a)[layout])
    bad = (b if in_second else a).clone()
    bad[1, 2, 3, 1] = value
    pair = (a, bad) if in_second else (bad, b)
    assert not surely_finite(_layouts(pair[0])[layout], _layouts(pair[1])[layout])
    assert not surely_finite(_layouts(bad)[layout])


def test_surely_finite_sizes_and_overflow():
    """Different sizes fall back to two sums; an overflowing product only sends the caller to its scan
    (False), never hides a NaN."""
    a, b = torch.randn(3, 4), torch.randn(5)
    assert surely_finite(a, b)
    b[2] = float("nan")
    assert not surely_finite(a, b)
    huge = torch.full((4,), 3e38)
    assert not surely_finite(huge, huge)  # finite, but the dot overflows: the exact scan decides
    check_finite_input(huge, "x")  # ... and the scan finds nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exp_flushed_is_exp_with_exact_zeros_below_the_floor_and_keeps_nan(dtype):
    """exp_flushed_: exp() above EXP_FLOOR + 0.5, exactly 0 at or below it and for -inf (so a softmax never
    feeds exp() the arguments that leave its vector path), NaN and +inf unchanged (NaN checks still fire)."""
    x = torch.tensor(
        [-math.inf, -1000.0, -100.0, -87.0, -86.6, -86.4, -10.0, 0.0, 3.0, math.inf, math.nan], dtype=dtype
    )
    got = exp_flushed_(x.clone())
    want = torch.exp(x)
    below = x <= EXP_FLOOR + 0.5
    assert (got[below] == 0).all()
    torch.testing.assert_close(got[~below & ~x.isnan()], want[~below & ~x.isnan()], rtol=1e-6, atol=0.0)
    assert torch.isnan(got[-1]) and got[-2] == math.inf
    big = torch.linspace(-300.0, 0.0, 10_000, dtype=dtype)
    out = big.clone()
    assert exp_flushed_(out) is out  # in place


@pytest.mark.parametrize(
    "act", [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.ReLU()], ids=["gelu", "gelu_tanh", "silu", "relu"]
)
def test_activate_fresh_in_place_only_at_inference(act):
    """activate_fresh: the module's values; in place (same storage) under no_grad, out of place with autograd
    (whose gradient stays right) and under tracing; other modules as called."""
    x = torch.randn(4, 33, dtype=torch.float64)
    expected = act(x)
    fresh = x.clone()
    with torch.no_grad():
        out = activate_fresh(act, fresh)
    assert out.data_ptr() == fresh.data_ptr()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)

    leaf = x.clone().requires_grad_(True)
    fresh = leaf * 1.0
    out = activate_fresh(act, fresh)
    assert out.data_ptr() != fresh.data_ptr()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(out.sum(), leaf)
    (ref_grad,) = torch.autograd.grad(act(leaf).sum(), leaf)
    torch.testing.assert_close(grad, ref_grad)

    traced = torch.jit.trace(lambda t: activate_fresh(act, t * 1.0), x)
    assert not [n.kind() for n in traced.graph.nodes() if n.kind().endswith("_")]  # no in-place op recorded
    torch.testing.assert_close(traced(x), expected)

    other = nn.Tanh()
    with torch.no_grad():
        fresh = x.clone()
        out = activate_fresh(other, fresh)
    assert out.data_ptr() != fresh.data_ptr()
    torch.testing.assert_close(out, torch.tanh(x))

    # A forward hook (feature extraction) must run and see the untouched input: the plain call.
    seen = []
    handle = act.register_forward_hook(lambda mod, args, output: seen.append((args[0].clone(), output)))
    with torch.no_grad():
        fresh = x.clone()
        out = activate_fresh(act, fresh)
    handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0][0], x) and out.data_ptr() != fresh.data_ptr()
    handle = nn.modules.module.register_module_forward_pre_hook(lambda mod, args: seen.append(mod))
    try:
        with torch.no_grad():
            fresh = x.clone()
            out = activate_fresh(act, fresh)
    finally:
        handle.remove()
    assert seen[-1] is act and out.data_ptr() != fresh.data_ptr()


def test_mlp_hook_on_fc1_sees_fc1s_output_at_inference():
    """A forward hook on Mlp.fc1 keeps fc1's output (feature extraction, activation statistics); the in-place
    activation at inference overwrote it with GELU(fc1(x)) (audit 2026-12-06). timm's Mlp is the reference."""
    import timm.layers

    from zoo.attention import Mlp

    torch.manual_seed(0)
    ours, theirs = Mlp(8, 16), timm.layers.Mlp(8, 16)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 8)
    kept = {}
    for name, mlp in (("zoo", ours), ("timm", theirs)):
        handle = mlp.fc1.register_forward_hook(lambda mod, args, output, name=name: kept.__setitem__(name, output))
        with torch.no_grad():
            out = mlp(x)
        handle.remove()
        torch.testing.assert_close(out, theirs(x).detach())
    torch.testing.assert_close(kept["zoo"], kept["timm"], rtol=0, atol=0)
    torch.testing.assert_close(kept["zoo"], torch.nn.functional.linear(x, ours.fc1.weight, ours.fc1.bias))


def test_numpy_arrays_are_ints_only_as_0d_integer_arrays():
    """is_int took every numpy array (ndarray has __index__): positive_int(np.array(2.5)) gave 2,
    np.array(True) gave 1, and a 1-d array reached numpy's own TypeError instead of the argument's message."""
    import numpy as np

    from zoo.layers import is_int, positive_int, to_pair

    assert is_int(np.int64(3)) and is_int(np.array(3)) and is_int(np.uint8(2))
    assert not any(is_int(v) for v in (np.array(2.5), np.array(True), np.array([2, 3]), np.float32(2.0)))
    for bad in (np.array(2.5), np.array(True)):
        with pytest.raises(ValueError, match="must be a positive int"):
            positive_int(bad, "chunk_size")
    with pytest.raises(ValueError, match="patch_size"):
        to_pair(np.array([2, 3]), "patch_size")


def test_in_place_activation_respects_hooks_inside_a_wrapped_producer():
    """activate_fresh checked only the producer's own hooks: a forward hook on the Linear inside a wrapped fc1
    (an adapter's base layer, nn.Sequential) kept fc1's output, which GELU then overwrote in place (the hook's
    'pre-activation' was gelu(pre)); timm's hook sees the pre-activation values."""
    from zoo.layers import activate_fresh

    torch.manual_seed(0)
    inner = nn.Linear(4, 8)
    producer = nn.Sequential(inner)
    kept = []
    inner.register_forward_hook(lambda module, args, out: kept.append(out))
    x = torch.randn(3, 4)
    with torch.no_grad():
        pre = inner(x).clone()
        kept.clear()
        activate_fresh(nn.GELU(), producer(x), producer)
    torch.testing.assert_close(kept[0], pre)


def test_class_token_shortcut_is_off_under_backward_hooks():
    """ViT's last block computed only the class token unless a forward hook watched it: a backward hook on the
    block's MLP got the gradient of one token, where timm's model gives it every token's."""
    import zoo

    model = zoo.create_model("vit_debug").eval()
    shapes = []
    model.blocks[-1].mlp.register_full_backward_hook(lambda m, gin, gout: shapes.append(tuple(gout[0].shape)))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    assert shapes == [(2, tokens, model.embed_dim)]


def test_a_forward_replaced_on_the_block_instance_runs_in_full():
    """ViT asked the block's class whether forward takes num_queries; a forward replaced on the instance (to
    instrument it) was then called with num_queries and raised TypeError."""
    import types

    import zoo

    model = zoo.create_model("vit_debug").eval()
    block = model.blocks[-1]
    original = block.forward
    calls = []

    def instrumented(self, x):
        calls.append(tuple(x.shape))
        return original(x)

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        block.forward = types.MethodType(instrumented, block)
        torch.testing.assert_close(model(x), expected)
    assert len(calls) == 1


def test_rate_and_ratio_checks_take_numpy_floats_and_name_infinities():
    """check_rates refused np.float32(0.1) as 'not a number in [0, 1)'; check_mlp_ratio let inf / nan reach int()
    (OverflowError / ValueError naming no argument)."""
    import numpy as np

    from zoo.layers import check_mlp_ratio, check_rates

    check_rates(drop_rate=np.float32(0.1))
    check_mlp_ratio(np.float32(4.0), 16)
    check_mlp_ratio(np.int64(4), 16)
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="mlp_ratio must be a number > 0"):
            check_mlp_ratio(bad, 16)


def test_layer_scale_starts_at_init_values_as_timm():
    """LayerScale's gamma starts at init_values (timm's LayerScale(dim, init_values)); the state-dict test above loads
    our gamma into timm's, so a constructor that ignored init_values went unseen."""
    for init in (0.1, 1.0, 1e-6):
        ours, theirs = LayerScale(4, init), TimmLayerScale(4, init)
        torch.testing.assert_close(ours.gamma.detach(), theirs.gamma.detach())
        x = torch.randn(2, 3, 4)
        torch.testing.assert_close(ours(x), x * init)


def test_check_rates_refuses_one_and_booleans():
    """A rate is a number in [0, 1): 1.0 (drop everything) and True (a flag passed as drop_rate) are refused with
    the rate's name; 0 and 0.999 pass."""
    from zoo.layers import check_rates

    check_rates(drop_rate=0.0, attn_drop_rate=0, drop_path_rate=0.999)
    for bad in (1.0, 1, True, False, -0.1, float("nan"), "0.1"):
        with pytest.raises(ValueError, match=r"drop_rate must be a number in \[0, 1\)"):
            check_rates(drop_rate=bad)


def test_check_image_batch_refuses_other_ranks_and_float64_under_autocast():
    """The input check: only a 4-D batch (a 5-D video batch got an unpacking error inside the model), and under
    torch.autocast only the dtypes autocast casts (it never casts float64: a float64 batch for a float32 model
    reached torch's dtype mismatch inside the first layer)."""
    from zoo.layers import check_image_batch, check_like_weights

    weight = torch.zeros(8, 3, 2, 2)
    assert check_image_batch(torch.zeros(2, 3, 5, 6), "ViT", 3, weight) == (2, 3, 5, 6)
    for shape in ((3, 5, 6), (2, 3, 5, 6, 1)):
        with pytest.raises(ValueError, match="ViT input must be a 4-D image batch"):
            check_image_batch(torch.zeros(shape), "ViT", 3, weight)
    with pytest.raises(ValueError, match="ViT expects 3 input channels, got 4"):
        check_image_batch(torch.zeros(2, 4, 5, 6), "ViT", 3, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        check_like_weights(torch.zeros(2, 3), weight, "x")  # float32 and bfloat16: autocast casts them
        check_like_weights(torch.zeros(2, 3, dtype=torch.bfloat16), weight, "x")
        with pytest.raises(TypeError, match="x is torch.float64 but the module's weights are torch.float32"):
            check_like_weights(torch.zeros(2, 3, dtype=torch.float64), weight, "x")


def test_new_linear_head_initialises_as_documented():
    """reset_classifier's head: trunc-normal weights of std init_std and a zero bias (timm's ViT head init); with
    init_std=None nn.Linear's default (uniform in +-1/sqrt(fan_in), bias too); nn.Identity for 0 classes. On the
    device and dtype of ``like``, in the given mode."""
    from zoo.layers import new_linear_head

    torch.manual_seed(0)
    like = torch.zeros(1, dtype=torch.float64)
    head = new_linear_head(256, 400, like, training=False)
    assert isinstance(head, nn.Linear) and head.weight.dtype == torch.float64 and not head.training
    assert torch.count_nonzero(head.bias) == 0
    weight = head.weight.detach()
    assert 0.019 < float(weight.std()) < 0.021 and abs(float(weight.mean())) < 1e-3
    default = new_linear_head(256, 400, like, training=True, init_std=None).requires_grad_(False)
    bound = 1 / math.sqrt(256)
    assert default.training and float(default.bias.abs().max()) <= bound and torch.count_nonzero(default.bias) > 0
    assert 0.9 * bound < float(default.weight.abs().max()) <= bound  # uniform, not std 0.02
    assert isinstance(new_linear_head(256, 0, like, training=False), nn.Identity)


def test_feature_take_indices_follows_timms_rule_and_refuses_repeats():
    """feature_take_indices as timm's (None = all, n = the last n, negatives from the end); a repeated or
    out-of-order index is an error here (timm silently returns the maps in network order)."""
    from timm.models._features import feature_take_indices as timm_take

    from zoo.layers import feature_take_indices

    for indices in (None, 1, 4, (0, 2), (1, -1), [-4, -3], torch.tensor([0, 3])):
        take, last = feature_take_indices(4, indices)
        want, want_last = timm_take(4, indices)
        assert (take, last) == (list(want), want_last), indices
    for bad in ((1, 1), (2, 0), (-1, 3)):
        with pytest.raises(ValueError, match="network order"):
            feature_take_indices(4, bad)
    for bad in (0, 5, (4,), (-5,)):
        with pytest.raises(ValueError, match="out of range"):
            feature_take_indices(4, bad)


@pytest.mark.parametrize("shape", [(1, 5, 8), (64, 8), (6, 3, 4, 4), (64,)])
def test_drop_path_drops_whole_samples_at_any_rank_and_batch_one_as_timm(shape):
    """DropPath draws one keep/drop per sample (dim 0) and rescales by 1 / (1 - p), for every input rank (a 2-D
    (B, C) input and a 4-D conv map as well as (B, N, C)) and for a batch of one; checked against timm's DropPath
    with the same random draws over several seeds, and per sample: each row is either all zero or x / 0.7."""
    x = torch.randn(shape)
    ours, theirs = DropPath(0.3), TimmDropPath(0.3)
    for seed in range(8):
        torch.manual_seed(seed)
        out_ours = ours(x)
        torch.manual_seed(seed)
        torch.testing.assert_close(out_ours, theirs(x))
        for row_out, row_x in zip(out_ours, x):
            assert torch.equal(row_out, torch.zeros_like(row_x)) or torch.allclose(row_out * 0.7, row_x), seed
    assert ours.train()(x) is not x and DropPath(0.0).train()(x) is x and ours.eval()(x) is x  # p = 0: timm's identity


def test_drop_path_refuses_rates_outside_zero_to_one():
    """A negative rate is an error naming drop_path (timm's bernoulli_ raises only for the rate's keep > 1, deep inside
    the first training step); 0 and 0.999 are rates."""
    DropPath(0.0), DropPath(0.999)
    for bad in (-0.1, -1.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="drop_path rate must be in"):
            DropPath(bad)


def test_layer_scale_leaves_its_input_unchanged_in_every_grad_mode():
    """LayerScale computes x * gamma into a new tensor, as timm's LayerScale (inplace=False, its default): under
    torch.no_grad / inference_mode too the caller's tensor is not scaled in place."""
    ours, theirs = LayerScale(8, 0.5), TimmLayerScale(8, 0.5)
    for context in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        with context():
            x = torch.randn(2, 3, 8)
            before = x.clone()
            out = ours(x)
            torch.testing.assert_close(out, theirs(before))
            assert torch.equal(x, before), context.__name__


def test_to_pair_takes_numpy_ints_as_python_ints_and_refuses_tensors():
    """numpy integers count as ints (img_size read from a numpy config) and come back as Python ints; 0-d tensors, in
    a pair too, are refused like other non-ints."""
    import numpy as np

    for value, want in [(np.int64(7), (7, 7)), ((np.int32(3), np.int64(5)), (3, 5)), ([4, np.uint8(6)], (4, 6))]:
        got = to_pair(value, "img_size")
        assert got == want and all(type(v) is int for v in got), value
    for bad in (torch.tensor(3), (torch.tensor(3), 4), (np.int64(0), 2), np.float32(3.0)):
        with pytest.raises(ValueError, match="img_size must be a positive int or a pair"):
            to_pair(bad, "img_size")
    with pytest.raises(TypeError, match="flag must be True or False"):
        check_flag(torch.tensor(1), "flag")  # a 0-d int tensor is not one of the ints 0 / 1 here


def test_feature_take_indices_names_an_empty_selection_and_reset_classifier_checks_pools():
    """An empty index sequence is an error naming the argument (not max()'s "empty sequence"); reset_classifier's
    global_pool must be one of the family's pools, "" included only where the family lists it (Agent-DeiT does not)."""
    from zoo.layers import check_reset_classifier, feature_take_indices

    for empty in ((), [], torch.tensor([], dtype=torch.long)):
        with pytest.raises(ValueError, match="out_indices: an empty sequence selects no feature"):
            feature_take_indices(4, empty, name="out_indices")
    check_reset_classifier(3, "", ("", "token"))
    check_reset_classifier(0, None, ("token", "avg"))
    for bad in ("", "max", "Token"):
        with pytest.raises(ValueError, match=r"global_pool must be one of \('token', 'avg'\)"):
            check_reset_classifier(3, bad, ("token", "avg"))
