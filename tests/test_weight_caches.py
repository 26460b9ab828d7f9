"""Caches derived from weights (Agent attention's resized bias tables, Agent-DeiT's resized position embedding,
Transformer-XL's projected table, RoPE's cos/sin) never serve stale values or inference tensors.

Each case is compared with a freshly built model holding the same weights (or the grad-mode path, which never
uses a cache); every case here failed before zoo.layers.weights_stamp keyed the caches (audit 2026-12-06).
"""
from __future__ import annotations

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
