"""Agent-DeiT: DeiT/ViT with agent attention, state-dict compatible with the official code.

Paper: Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention" (ECCV 2024,
arXiv:2312.08874); backbone: Touvron et al., "Training data-efficient image transformers & distillation
through attention" (DeiT, ICML 2021). Official code: LeapLabTHU/Agent-Attention @207ce3e,
agent_transformer/models/agent_deit.py (``VisionTransformer``, ``AgentBlock``, ``agent_deit_tiny/small/base``).

The official model is timm's ViT with the first ``agent_layer`` blocks' attention replaced by
:class:`zoo.attention.AgentAttention` (all 12 for tiny and small, the first 4 for base, ordinary
attention after): LayerNorm eps 1e-6, class token, learned position embedding over class + patch tokens,
class-token pooling. The state dict has exactly the official keys, shapes and order (272 tensors for
tiny), so an official checkpoint's ``"model"`` entry loads with ``strict=True`` and gives the same logits.

Beyond the official code:

* any image size, square or not, at inference and training: the image is zero-padded on the right and
  bottom to a multiple of the patch size, the position embedding is resized to the actual patch grid
  (bilinear, align_corners=False, as the official ``resize_pos_embed`` helper of agent_deit.py; a checkpoint
  loaded at another size, or ``set_input_size``, resamples it once, bicubically, as the official high-resolution
  fine-tuning ``utils.load_pretrained`` does), and every agent block resizes its
  biases to that grid and pools its agents from it (see zoo/attention/agent.py); in eval mode the resized
  tensors are cached per grid;
* the last block computes only the class token when the class token is pooled (the head reads nothing
  else); the logits are unchanged (tested), about two thirds of a block is saved;
* at inference (no autograd, tracing, capture or autocast; no hook on the blocks; no active dropout) the blocks run
  AgentBlock._forward_inference, decided once per model call: each residual add is folded into the GEMM of the
  projection before it (``(x + b).addmm_(h, W^T)``), which saves a bias copy, an add and a temporary per residual
  and the per-module Python (tests/test_agent_speedpath.py checks it against the module-by-module forward);
* the timm methods forward_features, forward_head(pre_logits=...), reset_classifier,
  set_grad_checkpointing, pretrained_head_keys, and gradient checkpointing per block.

Letters: B batch, C embedding dim, Hi/Wi image height/width, Gh/Gw patch grid, L = Gh*Gw patch tokens,
N = 1 + L tokens (class token first), K classes.
"""
from __future__ import annotations

import logging
import math
from functools import partial
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from zoo.attention import capture as _capture
from zoo.attention.agent import AgentAttention, tracing_or_exporting
from zoo.attention.backends import sdpa_runs_plain_calls
from zoo.attention.masks import cache_put
from zoo.attention.modules import Mlp
from zoo.layers import (
    CachesDroppedWhenCopied, DropPath, IntOrPair, check_features, check_flag, check_image_batch, check_ints,
    check_mlp_ratio, check_rates, check_reset_classifier, hooked_within, new_linear_head, takes_num_queries, to_pair,
    weights_kept_alive, weights_stamp,
)
from zoo.hub import unwrap_state_dict
from zoo.registry import DIGITS_PREPROCESSING, note_model_args, register_model
from zoo.tasks.vision.vit import Block, PatchEmbed, TokenFeaturesMixin

__all__ = ["AgentBlock", "AgentVisionTransformer", "resize_pos_embed", "checkpoint_filter_fn"]

log = logging.getLogger(__name__)

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
GLOBAL_POOLS = ("token", "avg", "")  # "": no pooling, every token (timm's ViT)
# Official stage rule: block i uses agent_num[STAGE_OF_PAIR[i // 2]].
STAGE_OF_PAIR = {0: 0, 1: 1, 2: 2, 3: 2, 4: 2, 5: 3}
# The position embedding resized on the fly to an input's grid: bilinear, as the official ``resize_pos_embed`` helper
# (loading at another size and set_input_size resample bicubically, resize_pos_embed's default)
RUN_TIME_RESIZE = {"interpolation": "bilinear", "antialias": False}
# Width and heads of the official variants (agent_deit.py agent_deit_tiny / small / base), named in loading errors
OFFICIAL_VARIANTS = {(192, 3): "agent_deit_tiny", (384, 6): "agent_deit_small", (768, 12): "agent_deit_base"}


def resize_pos_embed(pos_embed_1NC: torch.Tensor, new_grid: Sequence[int], old_grid: Sequence[int],
                     num_prefix_tokens: int = 1, interpolation: str = "bicubic", antialias: bool = False) -> torch.Tensor:
    """Resize a (1, P + Gh*Gw, C) position embedding to another grid (non-square too); the P prefix rows are kept.

    The default is the resampling of a checkpoint loaded at another size: bicubic, align_corners=False, no
    antialiasing, as the official high-resolution fine-tuning (Agent-Attention agent_transformer/utils.py
    ``load_pretrained``: ``F.interpolate(mode='bicubic')``) and timm's ``timm.layers.resample_abs_pos_embed`` with
    ``antialias=False`` (the same values, tested). timm's own default, ``antialias=True``, is another function even
    when upsampling (PyTorch's antialiased bicubic kernel uses a = -0.5, the plain one a = -0.75): pass
    ``antialias=True`` for it. The forward at another image size uses ``interpolation="bilinear"`` (RUN_TIME_RESIZE),
    the official ``resize_pos_embed`` helper of agent_deit.py. Unlike timm's function, a float64 embedding is
    resampled in float64 (fp16 / bf16 / fp32 in fp32, as timm).
    """
    (new_h, new_w), (old_h, old_w) = (int(new_grid[0]), int(new_grid[1])), (int(old_grid[0]), int(old_grid[1]))
    if pos_embed_1NC.shape[1] != num_prefix_tokens + old_h * old_w:
        raise ValueError(
            f"position embedding of shape {tuple(pos_embed_1NC.shape)} does not hold {num_prefix_tokens} prefix "
            f"tokens and a {old_h}x{old_w} grid"
        )
    if (new_h, new_w) == (old_h, old_w):
        return pos_embed_1NC
    dim = pos_embed_1NC.shape[-1]
    grid_1CGG = pos_embed_1NC[:, num_prefix_tokens:].reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2)
    # in fp32 as timm.layers.resample_abs_pos_embed runs it (fp16 / bf16 weights too); a float64 model in float64
    work_dtype = torch.float64 if pos_embed_1NC.dtype == torch.float64 else torch.float32
    grid_1CGG = F.interpolate(grid_1CGG.to(work_dtype), size=(new_h, new_w), mode=interpolation,
                              align_corners=False, antialias=antialias)
    grid_1LC = grid_1CGG.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim).to(pos_embed_1NC.dtype)
    return torch.cat((pos_embed_1NC[:, :num_prefix_tokens], grid_1LC), dim=1)


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------
class AgentBlock(nn.Module):
    """Pre-norm block with agent attention: x + attn(norm1(x), grid), then x + mlp(norm2(x)) (official names)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        agent_num: int = 49,
        window: int = 14,
        num_prefix_tokens: int = 1,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        act_layer=nn.GELU,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = AgentAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop,
                                   agent_num=agent_num, window=window, num_prefix_tokens=num_prefix_tokens)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x_BNC: torch.Tensor, grid: tuple[int, int], num_queries: Optional[int] = None) -> torch.Tensor:
        """(B, N, C) -> (B, N, C); with ``num_queries`` only the first (prefix) tokens, (B, num_queries, C)."""
        # The model checks its input image for NaN/Inf once (AgentVisionTransformer._check_image), so the
        # attention skips its own check on the inference fast path.
        if num_queries is None:
            x_BNC = x_BNC + self.drop_path(self.attn(self.norm1(x_BNC), grid, check_finite=False))
            return x_BNC + self.drop_path(self.mlp(self.norm2(x_BNC)))
        x_BQC = x_BNC[:, :num_queries] + self.drop_path(
            self.attn(self.norm1(x_BNC), grid, num_queries=num_queries, check_finite=False))
        return x_BQC + self.drop_path(self.mlp(self.norm2(x_BQC)))

    def _fusable(self) -> bool:
        """Whether :meth:`_forward_inference` computes exactly what ``forward`` does for this block as it is now:
        the modules it was built with and nothing more (an exact LayerNorm / Linear / GELU / Conv2d / Dropout /
        Identity, the zoo ``Mlp`` and ``AgentAttention``), no forward set on an instance, no hook on any of them,
        and no dropout or stochastic depth that is active. The caller checks the mode (no autograd, tracing,
        capture, autocast) and the global hooks. Read through ``_modules`` (a plain dict): nn.Module.__getattr__
        made this check 25 us per block, 1-2% of a 224 px forward."""
        mods = self._modules
        attn, mlp, drop_path = mods.get("attn"), mods.get("mlp"), mods.get("drop_path")
        if type(attn) is not AgentAttention or type(mlp) is not Mlp or len(mods) != 5:
            return False
        attn_mods, mlp_mods = attn._modules, mlp._modules
        if len(attn_mods) != 4 or len(mlp_mods) != 5:
            return False
        norm1, norm2 = mods.get("norm1"), mods.get("norm2")
        qkv, proj, proj_drop, dwc = (attn_mods.get(name) for name in ("qkv", "proj", "proj_drop", "dwc"))
        fc1, act, drop1, fc2, drop2 = (mlp_mods.get(name) for name in ("fc1", "act", "drop1", "fc2", "drop2"))
        if not (type(norm1) is nn.LayerNorm and type(norm2) is nn.LayerNorm and type(qkv) is nn.Linear
                and type(proj) is nn.Linear and type(dwc) is nn.Conv2d and type(fc1) is nn.Linear
                and type(act) is nn.GELU and type(fc2) is nn.Linear):
            return False
        if attn.training and attn.attn_drop:
            return False
        for drop in (proj_drop, drop1, drop2):
            if type(drop) is not nn.Identity and not (type(drop) is nn.Dropout and (not drop.training or drop.p == 0)):
                return False
        if not (type(drop_path) is nn.Identity or (
                type(drop_path) is DropPath and (not drop_path.training or drop_path.drop_prob == 0))):
            return False
        for module in (self, norm1, attn, qkv, proj, proj_drop, dwc, drop_path, norm2, mlp, fc1, act, drop1, fc2, drop2):
            if (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                    or module._backward_pre_hooks or "forward" in module.__dict__):
                return False
        # the tensors the fused path reads itself (layer_norm, addmm_, linear): plain ones only. A tensor subclass
        # (torchao's quantize_ swaps Linear weights for one, the module unchanged) works through its module's own
        # forward, not necessarily through t() / addmm_
        for tensor in (norm1.weight, norm1.bias, norm2.weight, norm2.bias, proj.weight, proj.bias, fc1.weight, fc1.bias,
                       fc2.weight, fc2.bias):
            if tensor is not None and type(tensor) not in _PLAIN_TENSOR_TYPES:
                return False
        return dwc.padding_mode == "zeros"

    def _forward_inference(self, x_BNC: torch.Tensor, grid: tuple[int, int], num_queries: Optional[int] = None,
                           sdpa_plain: bool = False) -> torch.Tensor:
        """``forward`` for inference, for a caller that has checked the mode and the block once
        (AgentVisionTransformer._fusable_blocks): the same operations, with each residual add folded into the GEMM of
        the layer before it. ``x + (h W^T + b)`` is computed as ``(x + b)`` then ``addmm_(h, W^T)`` into that buffer:
        the bias is not first copied into a fresh output (what ``addmm`` does for ``F.linear``) and no third tensor is
        made for the sum; the MLP's residual is accumulated in place into the block's own intermediate tokens. The
        float results differ from ``forward``'s only by the order of the additions (~1e-7 relative; tested)."""
        attn, mlp = self.attn, self.mlp
        dim = x_BNC.shape[-1]
        hidden_BNC = F.layer_norm(x_BNC, self.norm1.normalized_shape, self.norm1.weight, self.norm1.bias, self.norm1.eps)
        mixed_BQC = attn._mix_inference(hidden_BNC, grid, num_queries, sdpa_plain)
        residual_BQC = x_BNC if num_queries is None else x_BNC[:, :num_queries]
        # a fresh contiguous tensor (never the caller's x): x + proj bias
        x_BQC = (residual_BQC + attn.proj.bias if attn.proj.bias is not None
                 else residual_BQC.clone(memory_format=torch.contiguous_format))
        x_BQC.view(-1, dim).addmm_(mixed_BQC.reshape(-1, dim), attn.proj.weight.t())
        hidden_BQC = F.layer_norm(x_BQC, self.norm2.normalized_shape, self.norm2.weight, self.norm2.bias, self.norm2.eps)
        hidden_BQF = torch.ops.aten.gelu_(F.linear(hidden_BQC, mlp.fc1.weight, mlp.fc1.bias),
                                          approximate=mlp.act.approximate)
        if mlp.fc2.bias is not None:
            x_BQC.add_(mlp.fc2.bias)
        x_BQC.view(-1, dim).addmm_(hidden_BQF.view(-1, hidden_BQF.shape[-1]), mlp.fc2.weight.t())
        return x_BQC


# What AgentBlock._forward_inference stands in for without calling it: each as it was when this module was imported.
# A patch on a class (AgentAttention.forward wrapped to keep attention maps) or on F.linear sends the model back to
# the module-by-module path, which calls them.
_FORWARDS_AS_IMPORTED = tuple(
    (owner, name, getattr(owner, name)) for owner, name in (
        (AgentBlock, "forward"), (AgentAttention, "forward"), (Mlp, "forward"), (nn.LayerNorm, "forward"),
        (nn.Linear, "forward"), (nn.GELU, "forward"), (nn.Conv2d, "forward"), (nn.Dropout, "forward"),
        (F, "linear"), (F, "layer_norm")))
_PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)


class _PlainBlock(Block):
    """The ordinary ViT block (zoo.tasks.vision.vit.Block) with the agent block's call signature."""

    def forward(self, x_BNC: torch.Tensor, grid: tuple[int, int], num_queries: Optional[int] = None) -> torch.Tensor:
        return super().forward(x_BNC, num_queries=num_queries)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
class AgentVisionTransformer(CachesDroppedWhenCopied, TokenFeaturesMixin, nn.Module):
    """Agent-DeiT image classifier (official parameter names; any input size).

    Args:
        img_size: native image size (int or (H, W)): sets the position-embedding grid and the agent
            blocks' ``window`` (official: img_size // patch_size); other sizes are accepted at run time. The
            position grid is img_size // patch_size (timm's convention) while images are zero-padded to whole
            patches, so a native size that is not a multiple of the patch (150 x 100) runs on embeddings resampled
            to the padded grid, and a non-square one resamples its row or column tables (``window`` is the longer
            side): prefer multiples of the patch size. A checkpoint of another size runs at this one as saved
            (resampled on the fly); built at this size from it, the tables are resampled once at loading instead,
            which is not the same function (the order of the two resamplings differs).
        patch_size: patch size (int).
        in_chans: image channels. num_classes: K (0: no head, forward returns pooled features).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the ViT shape.
        agent_num: agents per stage, a list of 4 square numbers (block i uses
            agent_num[{0:0,1:1,2:2,3:2,4:2,5:3}[i // 2]], the official rule); an int means all stages.
        agent_layer: blocks [0, agent_layer) use agent attention, the rest ordinary attention;
            -1 (or 0) means every block (the official convention).
        global_pool: "token" (class token, official), "avg" (mean of the patch tokens after the final norm) or
            "" (no pooling: forward returns every token, (B, N, K) or (B, N, C) without a head, as timm's ViT).
        drop_rate: dropout on the pooled features before the classifier (timm's ``drop_rate``, train.py's
            ``--drop``). pos_drop_rate: after the position embedding; proj_drop_rate: after each attention
            projection and in the MLPs. The official code's single ``drop_rate`` is pos_drop_rate =
            proj_drop_rate = that rate (with no head dropout), as timm's ViT split it.
        attn_drop_rate, drop_path_rate: dropout on attention probabilities, stochastic depth max.
        dynamic_img_size: accepted for timm's ViT-backbone code, True only: Agent-DeiT always takes any image
            size (the position embedding and agent biases are resampled to the actual grid).
        final_norm: LayerNorm after the blocks (official: yes; False after ``prune_intermediate_layers``
            removed it).
    """

    def __init__(
        self,
        img_size: IntOrPair = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        agent_num: Union[int, Sequence[int]] = (49, 49, 49, 49),
        agent_layer: int = -1,
        global_pool: str = "token",
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        final_norm: bool = True,
        dynamic_img_size: bool = True,
    ):
        super().__init__()
        check_ints(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth, num_heads=num_heads)
        check_ints(0, num_classes=num_classes)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
        agents = [agent_num] * 4 if isinstance(agent_num, int) else list(agent_num)
        if len(agents) != 4 or not all(isinstance(a, int) and a > 0 and math.isqrt(a) ** 2 == a for a in agents):
            raise ValueError(f"agent_num must be a square number or a list of 4 of them, got {agent_num!r}")
        if not isinstance(agent_layer, int) or isinstance(agent_layer, bool) or not -1 <= agent_layer <= depth:
            # (-4 is not "all but the last 4": only -1 and 0 mean every block, as in the official code)
            raise ValueError(f"agent_layer must be an int in [1, depth={depth}], or -1 / 0 for every block, "
                             f"got {agent_layer!r}")
        check_rates(drop_rate=drop_rate, pos_drop_rate=pos_drop_rate, proj_drop_rate=proj_drop_rate,
                    attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate)
        if dynamic_img_size is not True:
            raise ValueError(f"dynamic_img_size: Agent-DeiT always takes any image size (position embedding and "
                             f"agent biases follow the actual patch grid); only True is accepted, got {dynamic_img_size!r}")
        check_mlp_ratio(mlp_ratio, embed_dim)
        size = to_pair(img_size, "img_size")
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        agent_layer = agent_layer if agent_layer > 0 else depth

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.agent_layer = agent_layer
        self.grad_checkpointing = False
        self.class_token_last_block = True

        self.patch_embed = PatchEmbed(size, patch_size, in_chans, embed_dim, dynamic_img_pad=True)  # any size
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        # The official window is img_size // patch_size (square images); for a non-square native size the
        # row/column tables get the longer side (they are resized to the actual grid in any case).
        window = max(grid)
        blocks = []
        for i in range(depth):
            if i < agent_layer:
                blocks.append(AgentBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, drop=proj_drop_rate,
                                         attn_drop=attn_drop_rate, drop_path=rates[i],
                                         agent_num=agents[STAGE_OF_PAIR[min(i // 2, 5)]], window=window))
            else:
                blocks.append(_PlainBlock(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                          proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=rates[i]))
        self.blocks = nn.Sequential(*blocks)
        self.feature_info = self.block_feature_info(depth, embed_dim, self.patch_embed.patch_size)
        self.norm = norm_layer(embed_dim) if final_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._pos_cache: dict = {}
        self.init_weights()

    # ------------------------------------------------------------------ init / bookkeeping
    def init_weights(self) -> None:
        """The official init ('' mode): trunc-normal(0.02) pos_embed, class token and linears, zero biases,
        unit LayerNorms; convs keep PyTorch's default; agent bias tables trunc-normal(0.02)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _apply(self, fn, *args, **kwargs):
        self._pos_cache = {}
        return super()._apply(fn, *args, **kwargs)

    # pickle / torch.save(model) / copy.deepcopy (EMA, export): without the resized position tables (rebuilt on
    # the next call)
    _copied_without = {"_pos_cache": dict}

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of storing its activations."""
        self.grad_checkpointing = check_flag(enable, "set_grad_checkpointing: enable")

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def pretrained_head_keys(self) -> list[str]:
        """State-dict keys of the classifier (re-initialised when a checkpoint's class count differs)."""
        return ["head.weight", "head.bias"]

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head with a fresh ``num_classes``-way linear (0: none); optionally change pooling.
        save_pretrained then writes the new class count and pooling (zoo.registry.note_model_args)."""
        check_reset_classifier(num_classes, global_pool, GLOBAL_POOLS)
        if global_pool is not None:
            self.global_pool = global_pool
            note_model_args(self, global_pool=global_pool)
        self.num_classes = num_classes
        self.head = new_linear_head(self.embed_dim, num_classes, self.pos_embed, self.training)
        note_model_args(self, num_classes=num_classes)

    def set_input_size(self, img_size: IntOrPair) -> None:
        """Change the native image size (timm's method): the position embedding is resampled to the new grid
        (bicubic, resize_pos_embed) and the agent blocks' row/column bias tables to the new window, as loading a
        checkpoint at that size does (checkpoint_filter_fn). Other sizes still run at any time; save_pretrained records the new one."""
        old_grid, new_grid = self.patch_embed.set_img_size(img_size)
        size = self.patch_embed.img_size
        if new_grid != old_grid:
            with torch.no_grad():
                resized = resize_pos_embed(self.pos_embed, new_grid, old_grid)
            self.pos_embed = nn.Parameter(resized, requires_grad=self.pos_embed.requires_grad)
            self._pos_cache = {}
        for block in self.blocks:
            if isinstance(getattr(block, "attn", None), AgentAttention):
                block.attn.set_window(max(new_grid))
        note_model_args(self, img_size=list(size))

    # ------------------------------------------------------------------ forward
    def _check_image(self, x) -> None:
        _, _, h, w = check_image_batch(x, "Agent-DeiT", self.in_chans, self.patch_embed.proj.weight)
        ph, pw = self.patch_embed.patch_size
        if h < ph or w < pw:
            raise ValueError(f"image {h}x{w} is smaller than the patch size {ph}x{pw}")
        if x.device.type == "cpu" and not tracing_or_exporting():
            if not math.isfinite(float(x.detach().sum(dtype=torch.float32))) and not bool(torch.isfinite(x).all()):
                raise ValueError("Agent-DeiT input image contains NaN or Inf pixels")

    def _grid_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        native = self.patch_embed.grid_size
        if grid == native:
            return self.pos_embed
        if (torch.is_grad_enabled() and self.pos_embed.requires_grad) or tracing_or_exporting():
            return resize_pos_embed(self.pos_embed, grid, native, **RUN_TIME_RESIZE)
        key = weights_stamp(self.pos_embed)
        slot = (grid, torch.is_inference_mode_enabled())  # inference mode has its own entry (no thrashing)
        hit = self._pos_cache.get(slot)
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad():
            resized = resize_pos_embed(self.pos_embed, grid, native, **RUN_TIME_RESIZE)
        # the entry keeps pos_embed alive (its id cannot be reused); cache_put: bounded and safe across threads
        cache_put(self._pos_cache, slot, (key, resized, weights_kept_alive(self.pos_embed)), limit=8)
        return resized

    def _embed(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images -> tokens (B, N, C) with class token and position embedding, and the patch grid (Gh, Gw)."""
        self._check_image(x_BCHW)
        x_BLC, grid = self.patch_embed(x_BCHW)  # zero-pads right/bottom to whole patches (dynamic_img_pad)
        grid = (int(grid[0]), int(grid[1]))
        x_BNC = torch.cat((self.cls_token.expand(x_BLC.shape[0], -1, -1), x_BLC), dim=1)
        return self.pos_drop(x_BNC + self._grid_pos_embed(grid)), grid

    def _fusable_blocks(self, blocks, x_BNC: torch.Tensor) -> bool:
        """Whether ``blocks`` may run through AgentBlock._forward_inference, decided once per model call: no autograd,
        tracing/export, capture or autocast; every block an AgentBlock as built (AgentBlock._fusable: no active
        dropout, no module swapped or added, no forward set on an instance, no hook on any of its modules: the fused
        path does not call them as modules); no global hook."""
        if torch.is_grad_enabled() or tracing_or_exporting() or _capture.is_capturing():
            return False
        if torch.is_autocast_enabled(x_BNC.device.type):
            return False
        if hooked_within():  # global hooks; each block checks its own modules' hooks (every module it has)
            return False
        if any(getattr(owner, name) is not original for owner, name, original in _FORWARDS_AS_IMPORTED):
            return False  # a forward patched on its class (to record attention maps, say) runs on the module path
        return all(type(block) is AgentBlock and block._fusable() for block in blocks)

    def _run_blocks(self, x_BNC: torch.Tensor, blocks, grid: tuple[int, int]) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            for block in blocks:
                x_BNC = checkpoint(block, x_BNC, grid, use_reentrant=False)
            return x_BNC
        if self._fusable_blocks(blocks, x_BNC):
            sdpa_plain = sdpa_runs_plain_calls(x_BNC.device.type)
            for block in blocks:
                x_BNC = block._forward_inference(x_BNC, grid, sdpa_plain=sdpa_plain)
            return x_BNC
        for block in blocks:
            x_BNC = block(x_BNC, grid)
        return x_BNC

    def forward_features(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Images (B, in_chans, Hi, Wi) -> normalised tokens (B, N, C), class token first."""
        x_BNC, grid = self._embed(x_BCHW)
        return self.norm(self._run_blocks(x_BNC, self.blocks, grid))

    _tokens = _embed  # the name TokenFeaturesMixin.forward_intermediates calls

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and the final norm / the head), timm's method.
        Returns the absolute indices kept; save_pretrained records the pruned shape."""
        take, last = self._keep_blocks(indices, prune_norm, prune_head)
        self.agent_layer = min(self.agent_layer, last + 1)
        if prune_head:  # timm: no head and no pooling, forward returns every token
            self.reset_classifier(0, "")
        note_model_args(self, depth=last + 1, agent_layer=self.agent_layer,
                        final_norm=not isinstance(self.norm, nn.Identity))
        return take

    def pool(self, x_BNC: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == "token":
            return x_BNC[:, 0]
        if pool_type == "":
            return x_BNC
        return x_BNC[:, self.num_prefix_tokens:].mean(dim=1)

    def forward_head(self, x_BNC: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, N, C) -> logits (B, K), or pooled features (B, C) with ``pre_logits`` (with
        ``global_pool=""``: per token, (B, N, K) or (B, N, C))."""
        check_features(x_BNC, "(B, N, C)", self.embed_dim, -1, "Agent-DeiT forward_head")
        pre_logits = check_flag(pre_logits, "forward_head: pre_logits")
        x_BC = self.head_drop(self.pool(x_BNC))
        return x_BC if pre_logits else self.head(x_BC)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Images (B, in_chans, Hi, Wi) -> logits (B, K) (every token, (B, N, K), with ``global_pool=""``).

        With class-token pooling and no gradient recorded (inference) the last block computes only the class
        token (the agents, keys and values still come from every token), as ``forward_head(forward_features(x))``
        would give; attention capture, forward hooks on the last block or the final norm (or global ones) and
        ``class_token_last_block = False`` run the full last block. With autograd the full last block runs: the
        shortcut skips its depthwise conv, whose parameters then took no part in the loss, and DDP (without
        find_unused_parameters, Lightning's default) stopped at the second step (their true gradient is zero, which
        the full block gives them).
        """
        if (self.global_pool == "token" and self.class_token_last_block and not torch.is_grad_enabled()
                and not _capture.is_capturing() and not hooked_within(self.blocks[-1], self.norm)
                and takes_num_queries(self.blocks[-1])):
            x_BNC, grid = self._embed(x_BCHW)
            if self._fusable_blocks(self.blocks, x_BNC):  # decided once for every block, the last one included
                sdpa_plain = sdpa_runs_plain_calls(x_BNC.device.type)
                for block in self.blocks[:-1]:
                    x_BNC = block._forward_inference(x_BNC, grid, sdpa_plain=sdpa_plain)
                x_B1C = self.blocks[-1]._forward_inference(x_BNC, grid, num_queries=1, sdpa_plain=sdpa_plain)
                return self.forward_head(self.norm(x_B1C))
            x_BNC = self._run_blocks(x_BNC, self.blocks[:-1], grid)
            x_B1C = self.blocks[-1](x_BNC, grid, num_queries=1)
            return self.forward_head(self.norm(x_B1C))
        return self.forward_head(self.forward_features(x_BCHW))

    # ------------------------------------------------------------------ weights
    def load_official_state_dict(self, state_dict: dict[str, Any], strict: bool = True, use_ema: bool = False):
        """Load an official Agent-DeiT checkpoint (``{"model": ...}`` or a bare state dict), adapted by
        :func:`checkpoint_filter_fn`: the ``"model"`` entry, the one the official evaluation loads (utils.py
        ``load_checkpoint``), also when the file holds an EMA copy (main_ema.py's ``"state_dict_ema"``), which
        ``use_ema=True`` loads instead. ``strict=False`` skips agent bias tables built for another head or agent
        count with a warning, as the official ``load_pretrained`` does. Read the file with
        ``zoo.hub.load_state_dict_file`` (no arbitrary unpickling) or ``torch.load`` on a trusted file."""
        use_ema = check_flag(use_ema, "load_official_state_dict: use_ema")
        state = checkpoint_filter_fn(unwrap_state_dict(state_dict, ema=True if use_ema else None), self,
                                     strict=check_flag(strict, "load_official_state_dict: strict"))
        return self.load_state_dict(state, strict=strict)


# --------------------------------------------------------------------------------------------------
# Weight converter
# --------------------------------------------------------------------------------------------------
_TABLE_AXIS = {"ah_bias": 3, "aw_bias": 4, "ha_bias": 2, "wa_bias": 3}  # the axis that has the window's length
_AGENT_TABLES = ("an_bias", "na_bias", "ac_bias", "ca_bias", *_TABLE_AXIS)


def _agent_layout(state: dict[str, Any]) -> dict[str, Any]:
    """What a state dict says about the Agent-DeiT it came from: width, depth, and heads and agents of each agent
    block (read from ``blocks.<i>.attn.an_bias``, (heads, agents, 7, 7))."""
    width = next((state[k].shape[-1] for k in ("cls_token", "pos_embed") if k in state), None)
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    agents = [tuple(state[f"blocks.{i}.attn.an_bias"].shape[:2]) for i in range(depth)
              if getattr(state.get(f"blocks.{i}.attn.an_bias"), "ndim", 0) == 4]
    return {"width": width, "depth": depth, "agents": agents}


def _variant_of(layout: dict[str, Any]) -> Optional[str]:
    """The official variant with this width and these heads (agent_deit_tiny / small / base), if any."""
    heads = {h for h, _ in layout["agents"]}
    return OFFICIAL_VARIANTS.get((layout["width"], heads.pop())) if len(heads) == 1 else None


def _describe_layout(layout: dict[str, Any]) -> str:
    heads = sorted({h for h, _ in layout["agents"]})
    counts = [n for _, n in layout["agents"]]
    agents = f"{counts[0]} agents each" if len(set(counts)) == 1 else f"agents per block {counts}"
    name = _variant_of(layout)
    return (f"width {layout['width']}, {'/'.join(map(str, heads))} heads, {layout['depth']} blocks, {len(counts)} "
            f"with agent attention, {agents}" + (f" (the width and heads of {name})" if name else ""))


def _layout_hint(saved: dict[str, Any], own: dict[str, Any]) -> str:
    """How to build the model the checkpoint fits: its variant, or the agent_num / agent_layer it was trained with."""
    if saved["width"] != own["width"] or saved["depth"] != own["depth"] or \
            {h for h, _ in saved["agents"]} != {h for h, _ in own["agents"]}:
        name = _variant_of(saved)
        return (f"Build {name} for it (zoo.create_model({name!r}, pretrained=...))" if name
                else "Build the model with the checkpoint's embed_dim, num_heads and depth")
    per_stage: dict[int, int] = {}
    for i, (_, count) in enumerate(saved["agents"]):
        per_stage.setdefault(STAGE_OF_PAIR[min(i // 2, 5)], count)
    stages = [per_stage.get(s, per_stage[max(per_stage)]) for s in range(4)]
    hint = f"Build the model with agent_num={stages}"
    if len(saved["agents"]) != len(own["agents"]):
        hint += f", agent_layer={len(saved['agents'])}"
    return hint + " for it"


def checkpoint_filter_fn(state_dict: dict[str, Any], model: AgentVisionTransformer,
                         saved_model: Optional[AgentVisionTransformer] = None, *, strict: bool = True) -> dict[str, torch.Tensor]:
    """Adapt an official Agent-DeiT checkpoint to ``model``.

    Handles the ``{"model": ...}`` wrapper of the official release (and ``state_dict``/``module.`` wrappers; of
    ``"model"`` and an EMA copy, ``"model"``, as the official evaluation), a position embedding trained at another
    image size (resampled bicubically, :func:`resize_pos_embed`, as the official high-resolution fine-tuning
    ``utils.load_pretrained``; logged, a warning when the model was not built at a size asked for: its
    input size is then not the checkpoint's) and row/column bias tables (ah/aw/ha/wa) built for another ``window``
    (resized along their axis with linear interpolation, as ``load_pretrained``). ``an_bias``/``na_bias`` never
    change shape. A checkpoint of another variant or agent count (heads, agents, width, depth differ) is a
    ValueError naming both layouts and the model it fits; with ``strict=False`` its agent bias tables that do not
    fit are skipped with a warning, as ``load_pretrained`` skips them ("Error in loading {k}, passing").
    ``saved_model``: the checkpoint's own model (zoo.from_pretrained builds it on the meta device); its patch
    grid is the position embedding's layout (without it the old grid is taken to be square, as officially).
    """
    state_dict = unwrap_state_dict(state_dict)
    own = model.state_dict()
    saved_layout, own_layout = _agent_layout(state_dict), _agent_layout(own)
    if saved_layout["agents"] and strict and (saved_layout["width"], saved_layout["depth"], saved_layout["agents"]) != (
            own_layout["width"], own_layout["depth"], own_layout["agents"]):
        name = getattr(model, "zoo_model_name", type(model).__name__)
        raise ValueError(
            f"the checkpoint is another Agent-DeiT variant or agent count than the model: checkpoint "
            f"{_describe_layout(saved_layout)}; model {name}: {_describe_layout(own_layout)}. "
            f"{_layout_hint(saved_layout, own_layout)}, or load with model.load_official_state_dict(checkpoint, "
            f"strict=False), which skips the agent bias tables that do not fit, as the official load_pretrained"
        )
    saved_grid = None if saved_model is None else tuple(saved_model.patch_embed.grid_size)
    out: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, value in state_dict.items():
        target = own.get(key)
        table = key.rsplit(".", 1)[-1]
        if key == "pos_embed" and target is not None and (
                value.shape != target.shape or saved_grid not in (None, tuple(model.patch_embed.grid_size))):
            if value.dim() != 3 or value.shape[0] != 1 or value.shape[1] < 2:
                raise ValueError(f"checkpoint pos_embed {tuple(value.shape)} is not (1, 1 + grid, width)")
            old_grid = saved_grid
            if old_grid is None:
                side = math.isqrt(value.shape[1] - 1)
                if side * side != value.shape[1] - 1:
                    raise ValueError(f"checkpoint pos_embed {tuple(value.shape)} is not a class token plus a square grid")
                old_grid = (side, side)
            elif old_grid[0] * old_grid[1] != value.shape[1] - 1:
                raise ValueError(f"checkpoint pos_embed {tuple(value.shape)} is not a class token plus its "
                                 f"{old_grid[0]} x {old_grid[1]} patch grid")
            _log_resize(model, old_grid, asked=saved_model is not None)
            value = resize_pos_embed(value, model.patch_embed.grid_size, old_grid)
        elif target is not None and value.shape != target.shape and table in _AGENT_TABLES:
            axis = _TABLE_AXIS.get(table)
            if axis is None or value.dim() != target.dim() or any(
                    a != b for i, (a, b) in enumerate(zip(value.shape, target.shape)) if i != axis):
                if not strict:
                    skipped.append(f"{key} {tuple(value.shape)} vs {tuple(target.shape)}")
                    continue
                raise ValueError(f"{key}: checkpoint table {tuple(value.shape)} cannot be resized to "
                                 f"{tuple(target.shape)}: only its window axis ({axis}) may differ")
            from zoo.attention.agent import _resize_1d

            value = _resize_1d(value, target.shape[axis], axis)
        out[key] = value
    if skipped:
        log.warning("skipped %d agent bias table(s) that do not fit the model (other heads or agent count), as the "
                    "official load_pretrained does; they keep the model's initialisation: %s%s", len(skipped),
                    "; ".join(skipped[:4]), f"; ... ({len(skipped)} in all)" if len(skipped) > 4 else "")
    return out


def _log_resize(model: AgentVisionTransformer, old_grid: Sequence[int], asked: bool) -> None:
    """Say that a checkpoint's position embedding was resampled: a warning when the model's size was not asked for
    (a 448-px checkpoint read into agent_deit_tiny's default 224 becomes a 224-px model, and timm's data pipeline
    feeds it 224-px images), information when it was (fine-tuning at a new resolution)."""
    new_grid = tuple(model.patch_embed.grid_size)
    patch_h, patch_w = model.patch_embed.patch_size
    old_px, new_px = (old_grid[0] * patch_h, old_grid[1] * patch_w), (new_grid[0] * patch_h, new_grid[1] * patch_w)
    size = lambda px: str(px[0]) if px[0] == px[1] else f"{px[0]} x {px[1]}"  # noqa: E731
    asked = asked or "img_size" in (getattr(model, "zoo_model_args", None) or {})
    message = (f"checkpoint position embedding resampled from its {old_grid[0]} x {old_grid[1]} patch grid "
               f"({size(old_px)} px) to the model's {new_grid[0]} x {new_grid[1]} ({size(new_px)} px), bicubic")
    if asked:
        log.info("%s", message)
    else:
        log.warning("%s: the model was built at its default size, not the checkpoint's; to run it at the size it was "
                    "trained at, build it with img_size=%s", message,
                    old_px[0] if old_px[0] == old_px[1] else f"({old_px[0]}, {old_px[1]})")


# --------------------------------------------------------------------------------------------------
# Registered constructors
# --------------------------------------------------------------------------------------------------
def _cfg(img_size: int = 224, num_classes: int = 1000, in_chans: int = 3, mean=IMAGENET_DEFAULT_MEAN,
         std=IMAGENET_DEFAULT_STD, **extra) -> dict[str, Any]:
    return {
        "input_size": (in_chans, img_size, img_size),
        "num_classes": num_classes,
        "mean": mean,
        "std": std,
        "interpolation": "bicubic",
        # official evaluation (agent_transformer/data/build.py): resize to 256/224 of the size, centre crop
        "crop_pct": 0.875,
        "crop_mode": "center",
        "classifier": "head",
        "first_conv": "patch_embed.proj",
        "paper": "arXiv:2312.08874",
        "official": "LeapLabTHU/Agent-Attention agent_transformer/models/agent_deit.py",
        **extra,
    }


def _create(model_args: dict[str, Any], overrides: dict[str, Any]) -> AgentVisionTransformer:
    return AgentVisionTransformer(**{**model_args, **overrides})


@register_model(task="vision", family="agent_deit", default_cfg=_cfg(32, 10))
def agent_deit_debug(**kwargs) -> AgentVisionTransformer:
    """Tiny Agent-DeiT for tests: 32 px, patch 4 (8x8 grid), dim 32, depth 2, 2 heads, 16 agents."""
    return _create(dict(img_size=32, patch_size=4, num_classes=10, embed_dim=32, depth=2, num_heads=2,
                        agent_num=[16, 16, 16, 16]), kwargs)


@register_model(task="vision", family="agent_deit", default_cfg=_cfg(224))
def agent_deit_tiny(**kwargs) -> AgentVisionTransformer:
    """Agent-DeiT-T at 224 px (official ``agent_deit_tiny``): dim 192, depth 12, 3 heads, 49 agents, all agent blocks."""
    return _create(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), kwargs)


@register_model(task="vision", family="agent_deit", default_cfg=_cfg(224))
def agent_deit_small(**kwargs) -> AgentVisionTransformer:
    """Agent-DeiT-S at 224 px (official ``agent_deit_small``): dim 384, depth 12, 6 heads, 49 agents."""
    return _create(dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), kwargs)


@register_model(task="vision", family="agent_deit", default_cfg=_cfg(224))
def agent_deit_base(**kwargs) -> AgentVisionTransformer:
    """Agent-DeiT-B at 224 px (official ``agent_deit_base``): dim 768, depth 12, 12 heads; agent attention in
    the first 4 blocks, ordinary attention after (agent_layer=4)."""
    return _create(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, agent_layer=4), kwargs)


@register_model(task="vision", family="agent_deit", default_cfg=_cfg(8, 10, in_chans=1, mean=(0.5,), std=(0.5,), **DIGITS_PREPROCESSING))
def agent_deit_digits(**kwargs) -> AgentVisionTransformer:
    """Small Agent-ViT for the 8x8 grayscale scikit-learn digits: patch 2 (a 4x4 grid of 16 tokens), 9 agents
    (3x3, adaptive pooling with overlapping cells), dim 64, depth 4, 4 heads, MLP ratio 2.
    Inputs: pixel / 16 normalised with mean 0.5, std 0.5. Trained: checkpoints/agent_digits/."""
    return _create(dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4,
                        mlp_ratio=2.0, agent_num=[9, 9, 9, 9]), kwargs)
