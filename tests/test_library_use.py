"""The models and attention modules used as components of a researcher's own PyTorch code (not through zoo train):
fused optimizers, models built under inference mode, torch.func transforms, wrapped blocks, hooks on containers.
Compared with the cache-free computation, with timm, or with plain autograd."""
from __future__ import annotations

import timm
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import zoo
from zoo.attention import AgentAttention, MultiHeadAttention


def _cache_free(module: nn.Module, *args):
    """The module's output with its weight caches bypassed (grad mode on builds everything from the weights)."""
    with torch.enable_grad():
        return module(*args).detach()


def test_caches_follow_a_fused_optimizer_step():
    """AdamW(fused=True) updates the weights in place without bumping their version counters: an eval forward
    under no_grad after a step reused bias tables built from the old weights (0.02 off for AgentAttention)."""
    torch.manual_seed(0)
    for module, x in ((AgentAttention(32, num_heads=2, agent_num=4, window=4), torch.randn(2, 17, 32)),
                      (MultiHeadAttention(32, 2, rel_pos="xl"), torch.randn(2, 9, 32))):
        module.eval()
        with torch.no_grad():
            module(x)  # fills the caches
        optimizer = torch.optim.AdamW(module.parameters(), lr=0.1, fused=True)
        module(x).square().sum().backward()
        optimizer.step()
        with torch.no_grad():
            torch.testing.assert_close(module(x), _cache_free(module, x), rtol=0, atol=1e-6)


def test_models_built_under_inference_mode_run():
    """Parameters made under torch.inference_mode() (a serving script) have no version counter: Agent-DeiT and
    MultiHeadAttention(rel_pos='xl') raised "Inference tensors do not track version counter"."""
    torch.manual_seed(0)
    with torch.inference_mode():
        model = zoo.create_model("agent_deit_debug").eval()
        mha = MultiHeadAttention(32, 2, rel_pos="xl").eval()
        x, tokens = torch.randn(1, 3, 32, 32), torch.randn(1, 9, 32)
        first, first_mha = model(x), mha(tokens)
        torch.testing.assert_close(model(x), first)  # and again, from the cache
        torch.testing.assert_close(mha(tokens), first_mha)
    plain = zoo.create_model("agent_deit_debug").eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(x.clone()), first.clone(), rtol=0, atol=1e-6)


def test_per_sample_gradients_with_torch_func_as_timm():
    """torch.func's per-sample-gradient recipe, vmap(grad(loss)): every zoo model failed ("vmap: It looks like
    you're calling .item()" from the finite checks; Agent-DeiT's caches read a batched tensor's storage). The
    per-sample gradients equal one backward per sample."""
    torch.manual_seed(0)
    for name in ("vit_debug", "agent_deit_debug", "maxvit_debug"):
        model = zoo.create_model(name, num_classes=3).eval()
        size = model.pretrained_cfg["input_size"][1]
        x, y = torch.randn(3, 3, size, size), torch.tensor([0, 1, 2])
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = {k: v.detach() for k, v in model.named_buffers()}

        def loss(p, xi, yi):
            logits = functional_call(model, (p, buffers), (xi[None],))
            return nn.functional.cross_entropy(logits, yi[None])

        per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
        for i in range(3):
            model.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
            for key, p in model.named_parameters():  # (None: unused by the class-token shortcut, e.g. the last dwc)
                want = p.grad if p.grad is not None else torch.zeros_like(p)
                torch.testing.assert_close(per_sample[key][i], want, rtol=1e-4, atol=1e-6, msg=f"{name} {key}")
    mha = MultiHeadAttention(32, 2)  # vmap over samples, as torch.nn.MultiheadAttention allows
    tokens = torch.randn(4, 5, 32)
    torch.testing.assert_close(vmap(lambda t: mha(t[None])[0])(tokens), mha(tokens), rtol=1e-5, atol=1e-6)


class _Adapter(nn.Module):
    """A researcher's wrapper around a block (adapters, LoRA-style bypasses): forward(x) only."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)


def test_wrapped_vit_blocks_and_hooks_on_the_block_container_as_timm():
    """The class-token shortcut called blocks[-1](x, num_queries=...): a wrapped last block raised TypeError. And
    ViT looped over model.blocks without calling it, so hooks registered on model.blocks never fired (timm's do)."""
    torch.manual_seed(0)
    ours = zoo.create_model("vit_debug").eval()
    peer = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ours(x)
        ours.blocks = nn.Sequential(*[_Adapter(b) for b in ours.blocks])
        torch.testing.assert_close(ours(x), want, rtol=0, atol=1e-6)
    for model in (ours, peer):
        seen = []
        handle = model.blocks.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
        with torch.no_grad():
            model(x)
            model.forward_features(x)
        handle.remove()
        assert seen == [(2, 17, 32)] * 2, (type(model).__name__, seen)


def test_capture_and_backend_contexts_belong_to_their_thread():
    """capture_attention and use_backend were process-wide: a capture in one thread collected another thread's
    attention maps, and inside another thread's use_backend("sdpa") block, attend(return_weights=True) failed."""
    import threading

    from zoo.attention import attend, capture_attention, use_backend

    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2).eval()
    x = torch.randn(1, 6, 16)
    entered, leave = threading.Event(), threading.Event()

    def other_thread():
        with capture_attention() as records, use_backend("sdpa"):
            entered.set()
            leave.wait(10)
            other_records.extend(records)

    other_records: list = []
    worker = threading.Thread(target=other_thread)
    worker.start()
    assert entered.wait(10)
    try:
        with torch.no_grad():
            mha(x)  # not recorded by the other thread's capture
            q = torch.randn(1, 2, 4, 8)
            out, weights = attend(q, q, q, return_weights=True)  # not steered to sdpa, which cannot return weights
        assert weights.shape == (1, 2, 4, 4)
        with capture_attention() as mine, torch.no_grad():
            mha(x)
        assert len(mine) == 1
    finally:
        leave.set()
        worker.join()
    assert other_records == []
