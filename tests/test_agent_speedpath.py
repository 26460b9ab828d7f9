"""Agent-DeiT's inference path with the residual adds fused into the projections' GEMMs
(AgentBlock._forward_inference, chosen once per model call by AgentVisionTransformer._fusable_blocks) against the
module-by-module forward it replaces, on every branch: the class-token shortcut and the full token path, batch 1
and > 1, square and non-square grids, float32 and float64, no_grad and inference_mode; and the cases that must
keep the module-by-module forward (autograd, hooks, active dropout, capture, autocast, a swapped module)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import zoo
import zoo.tasks.vision.agent_deit as agent_deit
from zoo.attention import capture_attention
from zoo.attention.agent import AgentAttention


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial values for every parameter (biases, LayerNorms, bias tables are zero / one at init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (0.5 if name.endswith("_bias") else 0.05))


def _model(name: str = "agent_deit_debug", **kwargs) -> agent_deit.AgentVisionTransformer:
    model = zoo.create_model(name, **kwargs).eval()
    _randomize(model)
    return model


def _module_by_module(model, fn, *args):
    """``fn(*args)`` with the fused path refused: every block called as a module (the reference)."""
    original = agent_deit.AgentVisionTransformer._fusable_blocks
    agent_deit.AgentVisionTransformer._fusable_blocks = lambda self, blocks, x: False
    try:
        return fn(*args)
    finally:
        agent_deit.AgentVisionTransformer._fusable_blocks = original


@pytest.fixture
def fused_calls(monkeypatch):
    """The num_queries of every AgentBlock._forward_inference call (None: every token)."""
    calls = []
    original = agent_deit.AgentBlock._forward_inference

    def counting(self, x, grid, num_queries=None, sdpa_plain=False):
        calls.append(num_queries)
        return original(self, x, grid, num_queries, sdpa_plain)

    monkeypatch.setattr(agent_deit.AgentBlock, "_forward_inference", counting)
    return calls


@pytest.mark.parametrize("batch, size, dtype, mode", [
    (1, (32, 32), torch.float32, torch.no_grad),
    (3, (32, 32), torch.float32, torch.inference_mode),
    (2, (24, 40), torch.float32, torch.no_grad),  # non-square grid (6 x 10), agents pooled with uneven cells
    (2, (30, 30), torch.float64, torch.no_grad),  # partial patches: zero-padded to an 8 x 8 grid
])
def test_fused_path_equals_module_forward(batch, size, dtype, mode, fused_calls):
    model = _model().to(dtype)
    x = torch.randn(batch, 3, *size, dtype=dtype)
    with mode():
        expected_logits = _module_by_module(model, model, x)
        expected_tokens = _module_by_module(model, model.forward_features, x)
        assert fused_calls == []
        logits = model(x)
        assert fused_calls == [None, 1]  # the class-token shortcut: the last block computes the class token
        tokens = model.forward_features(x)
        assert fused_calls == [None, 1, None, None]
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(logits, expected_logits, atol=atol, rtol=0)
    torch.testing.assert_close(tokens, expected_tokens, atol=atol, rtol=0)


def test_fused_path_tiny_at_224_within_1e5():
    """The real model (12 blocks of width 192) with random weights: the summation order is the only difference."""
    torch.manual_seed(0)
    model = _model("agent_deit_tiny")
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        expected = _module_by_module(model, model, x)
        logits = model(x)
    assert expected.abs().max() > 0.1  # not a vanishing output that would hide a difference
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_fused_path_leaves_the_callers_tokens_alone():
    model = _model()
    tokens = torch.randn(2, 65, 32)
    kept = tokens.clone()
    with torch.no_grad():
        out = model._run_blocks(tokens, model.blocks, (8, 8))
        block_out = model.blocks[0]._forward_inference(tokens, (8, 8), num_queries=1)
    assert torch.equal(tokens, kept)
    with torch.no_grad():
        expected = _module_by_module(model, model._run_blocks, tokens, model.blocks, (8, 8))
        expected_block = model.blocks[0](tokens, (8, 8), num_queries=1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(block_out, expected_block, atol=1e-5, rtol=0)


def test_fused_path_without_linear_biases():
    """qkv_bias=False and Linear layers without bias: the residual is copied, not offset by a bias."""
    model = agent_deit.AgentVisionTransformer(img_size=32, patch_size=4, num_classes=10, embed_dim=32, depth=2,
                                              num_heads=2, agent_num=16, qkv_bias=False).eval()
    _randomize(model)
    for block in model.blocks:
        block.attn.proj.bias = None
        block.mlp.fc2.bias = None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _module_by_module(model, model, x), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.forward_features(x), _module_by_module(model, model.forward_features, x),
                                   atol=1e-5, rtol=0)


def _dropout_train(model):
    model.train()
    for block in model.blocks:
        block.mlp.drop1.p = 0.5


def _add_hook(model):
    model.blocks[0].mlp.fc1.register_forward_hook(lambda *args: None)


def _swap_act(model):
    model.blocks[0].mlp.act = nn.ReLU()


def _instance_forward(model):
    block = model.blocks[0]
    block.forward = block.forward  # a bound method set on the instance (instrumentation)


def _add_pre_hook_on_block(model):
    model.blocks[0].register_forward_pre_hook(lambda *args: None)


def _add_module(model):
    model.blocks[0].attn.extra = nn.Identity()  # e.g. an adapter a forward override would call


def _leaf_instance_forward(model):
    linear = model.blocks[0].attn.proj
    linear.forward = linear.forward


@pytest.mark.parametrize("change", [_dropout_train, _add_hook, _add_pre_hook_on_block, _swap_act, _instance_forward,
                                    _add_module, _leaf_instance_forward])
def test_fused_path_refused_where_it_would_differ(change, fused_calls):
    model = _model()
    change(model)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert fused_calls == []


def test_fused_path_refused_under_a_global_hook(fused_calls):
    model = _model()
    handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
    finally:
        handle.remove()
    assert fused_calls == []
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert fused_calls == [None, 1]


def test_training_mode_without_dropout_fuses_under_no_grad(fused_calls):
    """Dropout of rate 0 and stochastic depth of rate 0 are identities in training mode too."""
    model = _model().train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = _module_by_module(model, model, x)
        out = model(x)
    assert fused_calls == [None, 1]  # the class-token shortcut too (no autograd)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_autograd_capture_and_autocast_keep_module_forward(fused_calls):
    model = _model()
    x = torch.randn(1, 3, 32, 32)
    model(x).sum().backward()
    assert model.blocks[0].mlp.fc2.weight.grad is not None
    with torch.no_grad(), capture_attention(model) as maps:
        model(x)
    assert len(maps) == 2
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert fused_calls == []


def test_attention_fast_path_equals_general_path_without_prefix():
    """AgentAttention's own inference path (_mix_inference) with 0 prefix tokens and with num_queries."""
    torch.manual_seed(3)
    for prefix in (0, 1):
        attn = AgentAttention(16, 2, qkv_bias=True, agent_num=4, window=5, num_prefix_tokens=prefix).eval()
        _randomize(attn)
        x = torch.randn(2, prefix + 20, 16)
        expected = attn(x, grid=(4, 5)).detach()  # autograd: the general path
        with torch.no_grad():
            torch.testing.assert_close(attn(x, grid=(4, 5)), expected, atol=1e-6, rtol=0)
        if prefix:
            expected_cls = attn(x, grid=(4, 5), num_queries=1).detach()
            with torch.no_grad():
                torch.testing.assert_close(attn(x, grid=(4, 5), num_queries=1), expected_cls, atol=1e-6, rtol=0)


class _WrappedWeight(nn.Parameter):
    """A parameter subclass, standing in for torchao's quantized weights (quantize_ swaps a Linear's weight for a
    tensor subclass and leaves the module as it is; t() / addmm_ on it raised NotImplementedError)."""


def test_tensor_subclass_weights_take_the_module_path(fused_calls):
    model = _model()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = _module_by_module(model, model, x)
    fc1 = model.blocks[0].mlp.fc1
    fc1.weight = _WrappedWeight(fc1.weight.detach())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
    assert fused_calls == []


@pytest.mark.parametrize("owner, name", [(AgentAttention, "forward"), (agent_deit.AgentBlock, "forward"),
                                         (nn.Linear, "forward"), (torch.nn.functional, "linear")])
def test_a_forward_patched_on_its_class_is_called(owner, name, fused_calls, monkeypatch):
    """The recipe 'wrap Attention.forward to keep what it computes' recorded nothing under no_grad: the fused path
    does not call those forwards. A patch on a class (or on F.linear) now sends the model to the module path."""
    model = _model()
    original, calls = getattr(owner, name), []

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert calls and fused_calls == []
