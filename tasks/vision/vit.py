"""Vision Transformer (ViT), state-dict and forward compatible with timm.

Paper: Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale"
(ICLR 2021, arXiv:2010.11929). Options from later work: layer scale (Touvron et al., "Going deeper with
Image Transformers", CaiT, ICCV 2021), stochastic depth (Huang et al., ECCV 2016), register tokens (Darcet
et al., "Vision Transformers Need Registers", ICLR 2024), position embeddings that skip the prefix tokens
(DeiT III, Touvron et al., ECCV 2022), qk-norm (Dehghani et al., ICML 2023).

Peer: timm 1.0.x, timm/models/vision_transformer.py ``VisionTransformer`` (and layers/patch_embed.py,
layers/pos_embed.py ``resample_abs_pos_embed``). Parameter names, init and forward follow it, so a timm
ViT state dict loads with ``strict=True`` and gives the same logits; the attention step is
:func:`zoo.attention.attend` through :class:`zoo.attention.MultiHeadAttention`.

Letters: B batch, C embedding dim, Hi/Wi image height/width, Gh/Gw patch grid rows/cols, L = Gh*Gw
patch tokens, P prefix tokens (class + register), N = P + L tokens, K classes.
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
from zoo.attention.modules import AttentionPoolLatent, Mlp, MultiHeadAttention
from zoo.layers import (
    DropPath, IntOrPair, LayerScale, check_features, check_finite_input, check_flag, check_image_batch, check_ints,
    check_mlp_ratio, check_rates, check_reset_classifier, create_act, feature_take_indices, hooked_within, is_tracing,
    new_linear_head, python_size, takes_num_queries, to_pair,
)
from zoo.hub import unwrap_state_dict
from zoo.registry import DIGITS_PREPROCESSING, note_model_args, register_model

log = logging.getLogger(__name__)

__all__ = [
    "VisionTransformer",
    "Block",
    "PatchEmbed",
    "LayerScale",
    "DropPath",
    "resample_abs_pos_embed",
    "checkpoint_filter_fn",
]

GLOBAL_POOLS = ("", "token", "avg", "max", "avgmax", "map")
MLP_ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")  # the ViT act_layer names (timm's get_act_layer spelling)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)  # the augreg ViT weights in timm are normalised to [-1, 1]
INCEPTION_STD = (0.5, 0.5, 0.5)


# --------------------------------------------------------------------------------------------------
# Position-embedding resampling
# --------------------------------------------------------------------------------------------------
def resample_abs_pos_embed(
    pos_embed_1NC: torch.Tensor,
    new_size: Sequence[int],
    old_size: Optional[Sequence[int]] = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample a (1, P + Gh*Gw, C) absolute position embedding to a new patch grid.

    The P prefix rows are kept; the grid rows are interpolated as an image (in fp32) with
    ``F.interpolate(mode=interpolation, antialias=antialias)``, the same operation as timm's
    ``resample_abs_pos_embed`` (bicubic, anti-aliased). ``old_size`` defaults to a square grid.
    """
    new_h, new_w = python_size(new_size[0]), python_size(new_size[1])  # symbolic under a dynamic-size export
    n_old = pos_embed_1NC.shape[1] - num_prefix_tokens
    if old_size is None:
        side = math.isqrt(n_old)
        if side * side != n_old:
            raise ValueError(
                f"position embedding has {n_old} grid tokens, which is not a square grid; pass old_size=(rows, cols)"
            )
        old_size = (side, side)
    old_h, old_w = int(old_size[0]), int(old_size[1])
    if old_h * old_w != n_old:
        raise ValueError(f"position embedding has {n_old} grid tokens but old_size {old_size} has {old_h * old_w}")
    # under torch.compile / export no guard on the (symbolic) new size; jit.trace (ONNX) takes the shortcut as before
    if not torch.compiler.is_compiling() and (old_h, old_w) == (new_h, new_w):
        return pos_embed_1NC
    prefix_1PC = pos_embed_1NC[:, :num_prefix_tokens]
    grid_1LC = pos_embed_1NC[:, num_prefix_tokens:]
    dim = grid_1LC.shape[-1]
    grid_1CGG = grid_1LC.float().reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2)
    grid_1CGG = F.interpolate(grid_1CGG, size=(new_h, new_w), mode=interpolation, antialias=antialias)
    grid_1LC = grid_1CGG.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim).to(pos_embed_1NC.dtype)
    return torch.cat((prefix_1PC, grid_1LC), dim=1) if num_prefix_tokens else grid_1LC


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Image to patch tokens: a Conv2d with kernel = stride = patch size (timm ``PatchEmbed``, NCHW -> NLC).

    ``dynamic_img_pad``: zero-pad the image at the bottom / right to whole patches first (timm's option of
    the same name), so the grid is ceil(size / patch) instead of dropping the last partial patch row/column.
    ``drop_img_remainder``: accept sizes the patch does not divide and ignore the last partial row / column
    of pixels, as timm's patch convolution does without a word (timm's ``vit_so400m_patch14_siglip_384``:
    384 = 27 * 14 + 6). Without either option such a size is refused.
    """

    def __init__(self, img_size: IntOrPair, patch_size: IntOrPair, in_chans: int, embed_dim: int, bias: bool = True,
                 dynamic_img_pad: bool = False, drop_img_remainder: bool = False):
        super().__init__()
        self.dynamic_img_pad = check_flag(dynamic_img_pad, "dynamic_img_pad")
        self.drop_img_remainder = check_flag(drop_img_remainder, "drop_img_remainder")
        if self.dynamic_img_pad and self.drop_img_remainder:
            raise ValueError("dynamic_img_pad (pad to whole patches) and drop_img_remainder (drop the partial "
                             "patches; the 384-px so400m/14 tower is built with it) exclude each other: pass "
                             "drop_img_remainder=False with dynamic_img_pad=True")
        self.patch_size = to_pair(patch_size, "patch_size")
        self.set_img_size(img_size)
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)

    def set_img_size(self, img_size: IntOrPair) -> tuple[tuple[int, int], tuple[int, int]]:
        """Set the native image size (its patch grid); returns (old grid, new grid) for the position embedding."""
        size = to_pair(img_size, "img_size")
        if any(i < p for i, p in zip(size, self.patch_size)):
            raise ValueError(f"img_size {size} is smaller than patch_size {self.patch_size}")
        if any(i % p for i, p in zip(size, self.patch_size)) and not (self.dynamic_img_pad or self.drop_img_remainder):
            # timm builds it and its patch conv drops the last partial row / column of patches without a word
            cut = tuple(i % p for i, p in zip(size, self.patch_size))
            raise ValueError(
                f"img_size {size} is not divisible by patch_size {self.patch_size}: the last {cut[0]} row(s) and "
                f"{cut[1]} column(s) of pixels would be ignored; use a multiple of the patch size, "
                f"dynamic_img_pad=True to zero-pad images to whole patches, or drop_img_remainder=True to ignore "
                f"those pixels as timm does"
            )
        old_grid = getattr(self, "grid_size", None)
        self.img_size = size
        self.grid_size = (size[0] // self.patch_size[0], size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        return old_grid, self.grid_size

    def forward(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, in_chans, Hi, Wi) -> ((B, L, C), (Gh, Gw))."""
        if self.dynamic_img_pad:
            ph, pw = self.patch_size
            pad_h, pad_w = (-x_BCHW.shape[-2]) % ph, (-x_BCHW.shape[-1]) % pw
            if pad_h or pad_w:
                x_BCHW = F.pad(x_BCHW, (0, pad_w, 0, pad_h))
        x_BCGG = self.proj(x_BCHW)
        grid = (x_BCGG.shape[-2], x_BCGG.shape[-1])
        return x_BCGG.flatten(2).transpose(1, 2), grid


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)) (timm ``Block`` names)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: Optional[float] = None,
        drop_path: float = 0.0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        act_layer=nn.GELU,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = MultiHeadAttention(
            dim,
            num_heads,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            norm_layer=norm_layer,
            proj_bias=proj_bias,
        )
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, bias=proj_bias, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x_BNC: torch.Tensor, num_queries: Optional[int] = None) -> torch.Tensor:
        """(B, N, C) -> (B, N, C); with ``num_queries`` only the first tokens are updated and returned
        (B, num_queries, C): they attend to every token, the others are not computed."""
        if num_queries is None:
            x_BNC = x_BNC + self.drop_path1(self.ls1(self.attn(self.norm1(x_BNC))))
            return x_BNC + self.drop_path2(self.ls2(self.mlp(self.norm2(x_BNC))))
        x_BQC = x_BNC[:, :num_queries] + self.drop_path1(self.ls1(self.attn(self.norm1(x_BNC), num_queries=num_queries)))
        return x_BQC + self.drop_path2(self.ls2(self.mlp(self.norm2(x_BQC))))


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
class TokenFeaturesMixin:
    """timm's dense-prediction and optimizer API for the plain-token transformers (ViT, Agent-DeiT):
    ``forward_intermediates`` and ``group_matcher``. The class provides ``_tokens(x) -> (tokens, grid)``,
    ``_run_blocks(tokens, blocks, grid)``, ``blocks``, ``norm`` and ``num_prefix_tokens``."""

    #: the taps ``create_model(..., features_only=True)`` returns by default: the last 3 blocks, as timm's ViT
    default_out_indices = 3

    def forward_intermediates(
        self,
        x_BCHW: torch.Tensor,
        indices: Union[int, Sequence[int], None] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Block outputs for dense-prediction users, timm's method and semantics
        (timm.models.vision_transformer.VisionTransformer.forward_intermediates); any size the model takes.

        Args:
            indices: blocks to return: None = all, an int n = the last n, a list (negative from the end).
            return_prefix_tokens: return (patch map, prefix tokens (B, P, C)) pairs.
            norm: apply the final norm to each intermediate.
            stop_early: run no block after the last one asked for.
            output_fmt: "NCHW" (B, C, Gh, Gw) maps or "NLC" (B, Gh*Gw, C) tokens, prefix tokens removed.
            intermediates_only: return only the list.
        Returns:
            (final normalised tokens (B, N, C), [intermediates]) or the list.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        return_prefix_tokens = check_flag(return_prefix_tokens, "forward_intermediates: return_prefix_tokens")
        norm = check_flag(norm, "forward_intermediates: norm")
        stop_early = check_flag(stop_early, "forward_intermediates: stop_early")
        intermediates_only = check_flag(intermediates_only, "forward_intermediates: intermediates_only")
        take, last = feature_take_indices(len(self.blocks), indices)
        x_BNC, (gh, gw) = self._tokens(x_BCHW)
        blocks = self.blocks[: last + 1] if stop_early else self.blocks
        outs = []
        for i, block in enumerate(blocks):
            x_BNC = self._run_blocks(x_BNC, [block], (gh, gw))
            if i in take:
                outs.append(self.norm(x_BNC) if norm else x_BNC)
        prefix = self.num_prefix_tokens
        maps = [y[:, prefix:] for y in outs]
        if output_fmt == "NCHW":
            # (the width named, not -1: an empty batch has no elements to infer it from; timm's reshape fails there)
            maps = [y.reshape(y.shape[0], gh, gw, y.shape[-1]).permute(0, 3, 1, 2).contiguous() for y in maps]
        if return_prefix_tokens and prefix:
            maps = list(zip(maps, [y[:, :prefix] for y in outs]))
        if intermediates_only:
            return maps
        return self.norm(x_BNC), maps

    def get_intermediate_layers(
        self,
        x_BCHW: torch.Tensor,
        n: Union[int, Sequence[int]] = 1,
        reshape: bool = False,
        return_prefix_tokens: bool = False,
        norm: bool = False,
    ):
        """DINO / DINOv2's accessor, as timm keeps it: the last ``n`` blocks' outputs (or blocks ``n``), as
        (B, C, Gh, Gw) maps with ``reshape``, else (B, Gh*Gw, C) tokens; forward_intermediates underneath."""
        return self.forward_intermediates(x_BCHW, n, return_prefix_tokens=return_prefix_tokens, norm=norm,
                                          output_fmt="NCHW" if reshape else "NLC", intermediates_only=True)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups by depth, timm's ViT regexes (timm.optim's layer-wise decay reads them)."""
        return dict(stem=r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @staticmethod
    def block_feature_info(depth: int, dim: int, patch_size: tuple[int, int]) -> list[dict]:
        """timm's feature_info of a plain-token transformer: one entry per block, at the patch stride."""
        ph, pw = patch_size
        return [dict(module=f"blocks.{i}", num_chs=dim, reduction=ph if ph == pw else (ph, pw)) for i in range(depth)]

    def _keep_blocks(self, indices, prune_norm: bool, prune_head: bool) -> tuple[list[int], int]:
        """The shared part of ``prune_intermediate_layers``: blocks (and feature_info) after the last of
        ``indices`` dropped, the final norm too with ``prune_norm``; returns (taken indices, last). Both flags
        are checked first (a truthy string such as "no" dropped the trained head)."""
        prune_norm = check_flag(prune_norm, "prune_intermediate_layers: prune_norm")
        check_flag(prune_head, "prune_intermediate_layers: prune_head")
        take, last = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: last + 1]
        self.feature_info = self.feature_info[: last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        return take, last


class VisionTransformer(TokenFeaturesMixin, nn.Module):
    """ViT image classifier with timm's parameter names, init and forward.

    Args:
        img_size: training image size (int or (H, W)); sets the position-embedding grid.
        patch_size: patch size (int or (h, w)).
        in_chans: image channels.
        num_classes: K; 0 gives no head (``forward`` returns pooled features).
        global_pool: "token" (class token), "avg", "max", "avgmax" over patch tokens, "map" (attention pooling
            with a learned latent query, SigLIP's head: zoo.attention.AttentionPoolLatent), or "" (no pooling).
        embed_dim, depth, num_heads, mlp_ratio: width, blocks, heads, MLP hidden ratio.
        qkv_bias, qk_norm, proj_bias: attention projection options.
        init_values: layer-scale init value (None: no layer scale).
        class_token: prepend a class token. reg_tokens: number of register tokens after it.
        no_embed_class: position embeddings cover patch tokens only (DeiT III / big_vision style).
        pos_embed: "learn" or "none".
        pre_norm: LayerNorm before the blocks (CLIP style; patch-embed conv then has no bias).
        final_norm: LayerNorm after the blocks. fc_norm: put that norm after pooling instead
            (default: True for avg/max pooling, as timm).
        norm_eps: every LayerNorm's epsilon (1e-6 as timm's ViT; CLIP's towers use 1e-5).
        act_layer: the MLP activation (blocks and attention-pooling head), by timm's name: "gelu" (exact),
            "gelu_tanh" (SigLIP 2's patch-16 towers) or "quick_gelu" (OpenAI-trained CLIP weights).
        dynamic_img_size: accept any image size divisible by the patch size, resampling the position
            embedding (bicubic, anti-aliased) on the fly; otherwise the size must equal img_size.
        dynamic_img_pad: zero-pad images at the bottom / right to whole patches (timm's option): with
            dynamic_img_size any size is accepted; with a fixed img_size that the patch does not divide, the
            padded grid is one row / column larger than the position embedding's, which is then resampled
            (timm's model fails on that combination).
        drop_img_remainder: accept an img_size that the patch does not divide and ignore the last partial
            row / column of pixels, as timm's fixed-size model does silently (vit_so400m_patch14_siglip_384);
            with dynamic_img_size, images of such sizes too (timm's dynamic model refuses them). Excludes
            dynamic_img_pad.
        drop_rate, pos_drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate: dropout rates (head,
            after position embedding, projections, attention probabilities, stochastic depth max).
    """

    def __init__(
        self,
        img_size: IntOrPair = 224,
        patch_size: IntOrPair = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_bias: bool = True,
        init_values: Optional[float] = None,
        class_token: bool = True,
        reg_tokens: int = 0,
        no_embed_class: bool = False,
        pos_embed: str = "learn",
        pre_norm: bool = False,
        final_norm: bool = True,
        fc_norm: Optional[bool] = None,
        norm_eps: float = 1e-6,
        act_layer: str = "gelu",
        dynamic_img_size: bool = False,
        dynamic_img_pad: bool = False,
        drop_img_remainder: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True (or use global_pool='avg')")
        if pos_embed not in ("learn", "none", ""):
            raise ValueError(f"pos_embed must be 'learn' or 'none', got {pos_embed!r}")
        check_ints(in_chans=in_chans, embed_dim=embed_dim, depth=depth, num_heads=num_heads)
        check_ints(0, num_classes=num_classes, reg_tokens=reg_tokens)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        check_mlp_ratio(mlp_ratio, embed_dim)
        check_rates(drop_rate=drop_rate, pos_drop_rate=pos_drop_rate, proj_drop_rate=proj_drop_rate,
                    attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate)
        use_fc_norm = global_pool in ("avg", "max", "avgmax") if fc_norm is None else fc_norm
        if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or not 0 < norm_eps < 1:
            raise ValueError(f"norm_eps must be a number in (0, 1), got {norm_eps!r}")
        norm_layer = partial(nn.LayerNorm, eps=float(norm_eps))
        create_act(act_layer, MLP_ACTIVATIONS, "act_layer")  # refused here, not inside the first block
        mlp_act = partial(create_act, act_layer, MLP_ACTIVATIONS, "act_layer")

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.has_class_token = class_token
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = int(class_token) + reg_tokens
        self.no_embed_class = no_embed_class
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        self.class_token_last_block = True  # forward(): last block computes only the class token (see forward)

        self.patch_embed = PatchEmbed(
            img_size, patch_size, in_chans, embed_dim, bias=not pre_norm, dynamic_img_pad=dynamic_img_pad,
            drop_img_remainder=drop_img_remainder,
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        self.dist_token: Optional[nn.Parameter] = None  # DeiT's distillation token (VisionTransformerDistilled)
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, embed_dim)) if pos_embed == "learn" else None
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.norm_pre = norm_layer(embed_dim) if pre_norm else nn.Identity()
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # stochastic depth (cpu: meta builds)
        self.blocks = nn.Sequential(
            *[
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_norm=qk_norm,
                    proj_bias=proj_bias,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    init_values=init_values,
                    drop_path=rates[i],
                    norm_layer=norm_layer,
                    act_layer=mlp_act,
                )
                for i in range(depth)
            ]
        )
        self.feature_info = self.block_feature_info(depth, embed_dim, self.patch_embed.patch_size)
        self.norm = norm_layer(embed_dim) if final_norm and not use_fc_norm else nn.Identity()
        # "map": a learned latent query attends over the patch tokens (SigLIP's MAP head, timm's attn_pool)
        self.attn_pool = (AttentionPoolLatent(embed_dim, num_heads, mlp_ratio, norm_eps=norm_eps, act_layer=mlp_act)
                          if global_pool == "map" else None)
        self.fc_norm = norm_layer(embed_dim) if final_norm and use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    # ------------------------------------------------------------------ init / bookkeeping
    def init_weights(self) -> None:
        """timm's default ('') ViT init: trunc-normal(0.02) linears and pos_embed, tiny class/register tokens."""
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token", "reg_token"}

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
        if global_pool == "token" and not self.has_class_token:
            raise ValueError("global_pool='token' needs a class token; this model has none")
        if global_pool == "map" and self.attn_pool is None:
            raise ValueError("global_pool='map' needs the attention-pooling head, which only the constructor builds "
                             "(create the model with global_pool='map'), as in timm")
        if global_pool is not None:
            if global_pool != "map":
                self.attn_pool = None  # timm drops the pooling head with another pooling
            self.global_pool = global_pool
            # The norm's place (after the blocks or after pooling) stays as built; the config says which, since
            # the constructor would otherwise derive it from the new pooling.
            note_model_args(self, global_pool=global_pool, fc_norm=not isinstance(self.fc_norm, nn.Identity))
        self.num_classes = num_classes
        self.head = new_linear_head(self.embed_dim, num_classes, next(self.parameters()), self.training)
        note_model_args(self, num_classes=num_classes)

    def set_input_size(self, img_size: IntOrPair) -> None:
        """Change the native image size, resampling the learned position embedding to the new grid."""
        old_grid, new_grid = self.patch_embed.set_img_size(img_size)
        size = self.patch_embed.img_size
        if self.pos_embed is not None and new_grid != old_grid:
            prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            with torch.no_grad():
                resampled = resample_abs_pos_embed(self.pos_embed, new_grid, old_grid, prefix)
            self.pos_embed = nn.Parameter(resampled, requires_grad=self.pos_embed.requires_grad)
        note_model_args(self, img_size=list(size))  # keep the config for save_pretrained right

    # ------------------------------------------------------------------ forward
    def _check_image(self, x) -> None:
        _, _, h, w = check_image_batch(x, "ViT", self.in_chans, self.patch_embed.proj.weight)
        ph, pw = self.patch_embed.patch_size
        padded = self.dynamic_img_size and self.patch_embed.dynamic_img_pad  # any size: zero-padded to whole patches
        if (h < ph or w < pw) and not padded:
            raise ValueError(f"image {h}x{w} is smaller than the patch size {ph}x{pw}")
        if self.dynamic_img_size:
            if (h % ph or w % pw) and not (self.patch_embed.dynamic_img_pad or self.patch_embed.drop_img_remainder):
                raise ValueError(
                    f"image {h}x{w} is not divisible by the patch size {ph}x{pw}; build the model with "
                    f"dynamic_img_pad=True to zero-pad it to whole patches (or drop_img_remainder=True to ignore "
                    f"the partial ones, as timm does)"
                )
        elif (h, w) != self.patch_embed.img_size:
            eh, ew = self.patch_embed.img_size
            raise ValueError(
                f"image {h}x{w} does not match the model's img_size {eh}x{ew}; resize it, build the model with "
                f"img_size=({h}, {w}) (weights are resampled on load) or with dynamic_img_size=True"
            )
        check_finite_input(x, "ViT input image")

    def _pos_embed(self, x_BLC: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Add position embeddings and prepend class/register tokens: (B, L, C) -> (B, N, C)."""
        batch = x_BLC.shape[0]
        prefix = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(batch, -1, -1))
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(batch, -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(batch, -1, -1))
        pos_embed = self.pos_embed
        # Traced with dynamic_img_size (torch.export with a symbolic image size), the table is always resampled,
        # as timm's ViT does: comparing the grid with the native one pinned the exported program to the traced size
        # ("Guard failed: x.size()[2] // 8 == 4" at any other). Resampling to the native grid is the identity.
        resample = self.dynamic_img_size and torch.compiler.is_compiling()  # not jit.trace (ONNX): no bicubic_aa
        if pos_embed is not None and (resample or grid != self.patch_embed.grid_size):
            pos_embed = resample_abs_pos_embed(
                pos_embed, grid, self.patch_embed.grid_size, 0 if self.no_embed_class else self.num_prefix_tokens
            )
        if pos_embed is None:
            x_BNC = torch.cat(prefix + [x_BLC], dim=1) if prefix else x_BLC
        elif self.no_embed_class:
            x_BNC = x_BLC + pos_embed
            x_BNC = torch.cat(prefix + [x_BNC], dim=1) if prefix else x_BNC
        else:
            x_BNC = torch.cat(prefix + [x_BLC], dim=1) if prefix else x_BLC
            x_BNC = x_BNC + pos_embed
        return self.pos_drop(x_BNC)

    def _tokens(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Checked images -> (embedded tokens (B, N, C), patch grid (Gh, Gw))."""
        self._check_image(x_BCHW)
        x_BLC, grid = self.patch_embed(x_BCHW)
        return self.norm_pre(self._pos_embed(x_BLC, grid)), grid

    def _embed(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self._tokens(x_BCHW)[0]

    def _run_blocks(self, x_BNC: torch.Tensor, blocks, grid: Optional[tuple[int, int]] = None) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            for block in blocks:
                x_BNC = checkpoint(block, x_BNC, use_reentrant=False)
            return x_BNC
        if blocks is self.blocks:  # the Sequential itself, as timm calls it: hooks registered on model.blocks run
            return self.blocks(x_BNC)
        for block in blocks:
            x_BNC = block(x_BNC)
        return x_BNC

    def forward_features(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Images (B, in_chans, Hi, Wi) -> normalised tokens (B, N, C), prefix tokens first."""
        return self.norm(self._run_blocks(self._embed(x_BCHW), self.blocks))

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and the final norm / the head), timm's method.
        Returns the absolute indices kept for :meth:`forward_intermediates`. save_pretrained records the
        pruned shape (zoo.registry.note_model_args)."""
        take, last = self._keep_blocks(indices, prune_norm, prune_head)
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        has_norm, has_fc_norm = not isinstance(self.norm, nn.Identity), not isinstance(self.fc_norm, nn.Identity)
        note_model_args(self, depth=last + 1, final_norm=has_norm or has_fc_norm, fc_norm=has_fc_norm)
        return take

    def pool(self, x_BNC: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        if not pool_type:
            return x_BNC
        if pool_type == "token":
            return x_BNC[:, 0]
        if pool_type == "map":
            if self.attn_pool is None:
                raise ValueError("pool_type='map' needs the attention-pooling head (global_pool='map' at construction)")
            return self.attn_pool(x_BNC[:, self.num_prefix_tokens :])
        patches_BLC = x_BNC[:, self.num_prefix_tokens :]
        if pool_type == "avg":
            return patches_BLC.mean(dim=1)
        if pool_type == "max":
            return patches_BLC.amax(dim=1)
        return 0.5 * (patches_BLC.amax(dim=1) + patches_BLC.mean(dim=1))  # avgmax

    def forward_head(self, x_BNC: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, N, C) -> logits (B, K), or the pooled features (B, C) with ``pre_logits``."""
        check_features(x_BNC, "(B, N, C)", self.embed_dim, -1, "ViT forward_head")
        pre_logits = check_flag(pre_logits, "forward_head: pre_logits")
        x_BC = self.head_drop(self.fc_norm(self.pool(x_BNC)))
        return x_BC if pre_logits else self.head(x_BC)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Images (B, in_chans, Hi, Wi) -> logits (B, K).

        With class-token pooling only the class token of the last block reaches the head, so the last
        block computes just that token (its query row of attention and its MLP; keys and values still come
        from every token). The logits equal ``forward_head(forward_features(x))``; the saving is about
        two thirds of a block. Set ``model.class_token_last_block = False`` to run the full last block.
        Attention capture (zoo.attention.capture_attention), forward hooks on the last block, on ``blocks`` or on
        the final norm (or global ones), and a last block that is not the zoo's own (wrapped or replaced: it takes
        no ``num_queries``) run the full model too, so that hooks see every token as in timm.
        """
        if (self.global_pool == "token" and self.class_token_last_block and not _capture.is_capturing()
                and not hooked_within(self.blocks[-1], self.norm)
                and not (self.blocks._forward_hooks or self.blocks._forward_pre_hooks)
                and takes_num_queries(self.blocks[-1])):
            x_BNC = self._run_blocks(self._embed(x_BCHW), self.blocks[:-1])
            head_tokens = 1 if self.dist_token is None else 2  # the class token (and DeiT's distillation token)
            x_BQC = self.blocks[-1](x_BNC, num_queries=head_tokens)
            return self.forward_head(self.norm(x_BQC))
        return self.forward_head(self.forward_features(x_BCHW))

    # ------------------------------------------------------------------ weights
    def load_timm_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True):
        """Load a timm ViT state dict (any wrapping, resampling the position embedding as needed)."""
        return self.load_state_dict(checkpoint_filter_fn(state_dict, self), strict=strict)


class VisionTransformerDistilled(VisionTransformer):
    """DeiT's ViT with a distillation token and head ("Training data-efficient image transformers & distillation
    through attention", Touvron et al., ICML 2021; timm/models/deit.py ``VisionTransformerDistilled``: the same
    names, ``dist_token`` and ``head_dist``, so timm's state dicts load).

    The distillation token follows the class token (both have position embeddings); the logits are the mean of
    the two heads', or both as a pair while training with ``set_distilled_training(True)`` (the teacher's
    loss is the training script's, as in DeiT). Class-token pooling only.
    """

    def __init__(self, **kwargs: Any) -> None:
        if kwargs.get("global_pool", "token") != "token" or not kwargs.get("class_token", True):
            raise ValueError("VisionTransformerDistilled reads the class and distillation tokens: global_pool must be "
                             "'token' with a class token")
        if kwargs.get("reg_tokens", 0):
            raise ValueError("VisionTransformerDistilled has no register tokens (DeiT has none)")
        super().__init__(**kwargs)
        dim = self.embed_dim
        self.num_prefix_tokens += 1
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.dist_token, std=0.02)
        if self.pos_embed is not None and not self.no_embed_class:  # one more prefix position
            self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + self.num_prefix_tokens, dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.head_dist = new_linear_head(dim, self.num_classes, self.dist_token, self.training)
        self.distilled_training = False

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        """Return (class-head logits, distillation-head logits) in training mode, for a distillation loss."""
        self.distilled_training = check_flag(enable, "set_distilled_training: enable")

    @torch.jit.ignore
    def get_classifier(self) -> tuple[nn.Module, nn.Module]:
        return self.head, self.head_dist

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's VisionTransformerDistilled regexes: the distillation token with the stem."""
        return dict(stem=r"^cls_token|pos_embed|patch_embed|dist_token",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def pretrained_head_keys(self) -> list[str]:
        return super().pretrained_head_keys() + ["head_dist.weight", "head_dist.bias"]

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New class and distillation heads (pooling stays the class token, as timm's)."""
        if global_pool not in (None, "", "token"):
            raise ValueError(f"VisionTransformerDistilled reads the class and distillation tokens: global_pool must "
                             f"stay 'token', got {global_pool!r}")
        super().reset_classifier(num_classes, None)
        self.head_dist = new_linear_head(self.embed_dim, num_classes, self.dist_token, self.training)

    def forward_head(self, x_BNC: torch.Tensor, pre_logits: bool = False):
        """Tokens (B, N, C) -> the mean of the two heads' logits (B, K); ``pre_logits``: the mean of the two
        tokens (B, C); while distillation-training: (class logits, distillation logits)."""
        check_features(x_BNC, "(B, N, C)", self.embed_dim, -1, "ViT forward_head")
        pre_logits = check_flag(pre_logits, "forward_head: pre_logits")
        cls_BC, dist_BC = self.head_drop(x_BNC[:, 0]), self.head_drop(x_BNC[:, 1])
        if pre_logits:
            return (cls_BC + dist_BC) / 2
        cls_BK, dist_BK = self.head(cls_BC), self.head_dist(dist_BC)
        if self.distilled_training and self.training and not is_tracing():
            return cls_BK, dist_BK
        return (cls_BK + dist_BK) / 2


# --------------------------------------------------------------------------------------------------
# Weight converter
# --------------------------------------------------------------------------------------------------
def _from_dinov2(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DINOv2 state dict in the original layout (facebookresearch/dinov2, dinov2/models/vision_transformer.py)
    -> timm's layout, as timm's ``vision_transformer._convert_dinov2``: the masked-modelling ``mask_token`` is
    dropped; with registers, ``register_tokens`` become ``reg_token`` and the class token's position row is added
    into ``cls_token`` (timm's reg4 models embed no prefix token: ``no_embed_class``), the grid rows staying in
    ``pos_embed``; the SwiGLU MLP's ``w12`` / ``w3`` are named ``fc1`` / ``fc2``."""
    out = {key: value for key, value in state_dict.items() if key != "mask_token"}
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        pos_embed = out.pop("pos_embed")
        out["cls_token"] = out.pop("cls_token") + pos_embed[:, :1]
        out["pos_embed"] = pos_embed[:, 1:]
    renamed = {}
    for key, value in out.items():
        parts = key.split(".")
        if len(parts) == 5 and parts[0] == "blocks" and parts[2] == "mlp" and parts[3] in ("w12", "w3"):
            key = ".".join(parts[:3] + ["fc1" if parts[3] == "w12" else "fc2", parts[4]])
        renamed[key] = value
    return renamed


def _resample_patch_kernel(kernel_OIhw: torch.Tensor, new_size: tuple[int, int], interpolation: str,
                           antialias: bool) -> torch.Tensor:
    """A (C_out, C, h, w) patch-embedding kernel resampled to ``new_size`` with timm's
    ``timm.layers.resample_patch_embed`` (FlexiViT), as timm's ViT checkpoint filter calls it."""
    from timm.layers import resample_patch_embed

    log.info("patch_embed.proj.weight: resampled the checkpoint's %s patch kernel to the model's %s (FlexiViT, "
             "timm.layers.resample_patch_embed)", tuple(kernel_OIhw.shape[-2:]), tuple(new_size))
    return resample_patch_embed(kernel_OIhw, list(new_size), interpolation=interpolation, antialias=antialias)


def checkpoint_filter_fn(
    state_dict: dict[str, Any],
    model: VisionTransformer,
    interpolation: str = "bicubic",
    antialias: bool = True,
    saved_model: Optional[VisionTransformer] = None,
) -> dict[str, torch.Tensor]:
    """Adapt a timm (PyTorch) ViT state dict to ``model``.

    Handles: {"model": ...} / {"state_dict": ...} wrappers and a "module." (DDP) prefix; the pre-conv
    linear patch embedding (2-D weight) reshaped to a conv kernel; the position embedding resampled to
    the model's grid when the checkpoint was trained at another image size (bicubic, anti-aliased, as
    timm); DeiT III layer-scale names (``gamma_1`` -> ``ls1.gamma``); the unused ``pre_logits`` layer.
    A checkpoint with another patch size (a model built with ``patch_size=8`` from 16-px weights) has its patch
    kernel resampled FlexiViT-style by timm's own ``timm.layers.resample_patch_embed`` (Beyer et al., "FlexiViT:
    One Model for All Patch Sizes", CVPR 2023: the pseudo-inverse of resizing, so a patch resized with the kernel
    gives the old token), and its position embedding resampled to the new grid, as timm's
    ``vision_transformer.checkpoint_filter_fn`` does. DINOv2 checkpoints
    in the original layout (facebookresearch/dinov2 ``*_pretrain.pth``: ``mask_token``, ``register_tokens``, a
    position row for the class token) are converted as timm's ``_convert_dinov2`` does (see _from_dinov2).

    ``saved_model``: the checkpoint's own model (zoo.from_pretrained builds it on the meta device from
    config.json). Its patch grid is the embedding's layout, so a 2 x 8 grid is resampled as 2 x 8, not read as
    4 x 4; without it the old grid is taken to be square, as timm does. A different number of prefix tokens
    (class token, registers) raises.
    """
    state_dict = unwrap_state_dict(state_dict)
    if "mask_token" in state_dict:
        state_dict = _from_dinov2(state_dict)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("pre_logits"):
            continue
        if key == "patch_embed.proj.weight":
            kh, kw = model.patch_embed.proj.weight.shape[-2:]
            if value.dim() not in (2, 4) or value.dim() == 2 and value.shape[1] % (kh * kw):
                raise ValueError(f"patch_embed.proj.weight: checkpoint {tuple(value.shape)} is neither a conv kernel "
                                 f"(C_out, C, kh, kw) nor a linear (C_out, C * {kh} * {kw}) weight")
            if value.dim() < 4:
                value = value.reshape(value.shape[0], -1, kh, kw)
            if tuple(value.shape[-2:]) != (kh, kw):
                value = _resample_patch_kernel(value, (kh, kw), interpolation, antialias)
        elif key == "pos_embed" and model.pos_embed is not None and (
                value.shape != model.pos_embed.shape or saved_model is not None
                and tuple(saved_model.patch_embed.grid_size) != tuple(model.patch_embed.grid_size)):
            if value.dim() != 3 or value.shape[0] != 1:  # (a width mismatch is reported with the others at load)
                raise ValueError(f"pos_embed: checkpoint {tuple(value.shape)} is not (1, tokens, width)")
            prefix = 0 if model.no_embed_class else model.num_prefix_tokens
            old_size = None
            if saved_model is not None:
                saved_prefix = 0 if saved_model.no_embed_class else saved_model.num_prefix_tokens
                if saved_prefix != prefix:
                    raise ValueError(
                        f"the checkpoint's position embedding has {saved_prefix} prefix row(s), the model's {prefix}: "
                        f"class_token, reg_tokens and no_embed_class must stay as saved "
                        f"(class_token={saved_model.cls_token is not None}, "
                        f"reg_tokens={saved_model.num_reg_tokens}, no_embed_class={saved_model.no_embed_class})"
                    )
                old_size = saved_model.patch_embed.grid_size
            value = resample_abs_pos_embed(
                value, model.patch_embed.grid_size, old_size, prefix, interpolation=interpolation, antialias=antialias
            )
        elif ".gamma_" in key:
            key = key.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------------
# Registered constructors
# --------------------------------------------------------------------------------------------------
def _cfg(img_size: int = 224, num_classes: int = 1000, in_chans: int = 3, mean=INCEPTION_MEAN, std=INCEPTION_STD, **extra):
    return {
        "input_size": (in_chans, img_size, img_size),
        "num_classes": num_classes,
        "mean": mean,
        "std": std,
        "interpolation": "bicubic",
        "crop_pct": 0.9 if img_size <= 224 else 1.0,
        "crop_mode": "center",
        "classifier": "head",
        "first_conv": "patch_embed.proj",
        **extra,
    }


def _create(model_args: dict[str, Any], overrides: dict[str, Any], cls: type = VisionTransformer) -> VisionTransformer:
    return cls(**{**model_args, **overrides})


@register_model(task="vision", family="vit", default_cfg=_cfg(32, 10, mean=IMAGENET_MEAN, std=IMAGENET_STD))
def vit_debug(**kwargs) -> VisionTransformer:
    """Tiny ViT for tests: 32 px, patch 8, dim 32, depth 2, 2 heads."""
    return _create(dict(img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=2, num_heads=2), kwargs)


@register_model(task="vision", family="vit", default_cfg=_cfg(8, 10, in_chans=1, mean=(0.5,), std=(0.5,), **DIGITS_PREPROCESSING))
def vit_digits(**kwargs) -> VisionTransformer:
    """Small ViT for the 8x8 grayscale scikit-learn digits: patch 2 (16 tokens), dim 64, depth 4, 4 heads.

    Inputs: pixel / 16 normalised with mean 0.5, std 0.5 (to [-1, 1]). A plain recipe (AdamW, one-cycle lr
    3e-3, batch 64, label smoothing 0.1, 150 epochs, no augmentation) reached 98.1% on a stratified 20%
    test split in about 50 s on one CPU core.
    """
    return _create(
        dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0),
        kwargs,
    )


@register_model(task="vision", family="vit", default_cfg=_cfg(224))
def vit_tiny_patch16_224(**kwargs) -> VisionTransformer:
    """ViT-Ti/16 at 224 px (timm ``vit_tiny_patch16_224``)."""
    return _create(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), kwargs)


@register_model(task="vision", family="vit", default_cfg=_cfg(384))
def vit_tiny_patch16_384(**kwargs) -> VisionTransformer:
    """ViT-Ti/16 at 384 px (timm ``vit_tiny_patch16_384``)."""
    return _create(dict(img_size=384, patch_size=16, embed_dim=192, depth=12, num_heads=3), kwargs)


@register_model(task="vision", family="vit", default_cfg=_cfg(224))
def vit_small_patch16_224(**kwargs) -> VisionTransformer:
    """ViT-S/16 at 224 px (timm ``vit_small_patch16_224``)."""
    return _create(dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), kwargs)


@register_model(task="vision", family="vit", default_cfg=_cfg(384))
def vit_small_patch16_384(**kwargs) -> VisionTransformer:
    """ViT-S/16 at 384 px (timm ``vit_small_patch16_384``)."""
    return _create(dict(img_size=384, patch_size=16, embed_dim=384, depth=12, num_heads=6), kwargs)


@register_model(task="vision", family="vit", default_cfg=_cfg(224))
def vit_small_patch32_224(**kwargs) -> VisionTransformer:
    """ViT-S/32 at 224 px (timm ``vit_small_patch32_224``)."""
    return _create(dict(patch_size=32, embed_dim=384, depth=12, num_heads=6), kwargs)


@register_model(task="vision", family="vit", default_cfg=_cfg(224))
def vit_base_patch16_224(**kwargs) -> VisionTransformer:
    """ViT-B/16 at 224 px (timm ``vit_base_patch16_224``)."""
    return _create(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), kwargs)


@register_model(task="vision", family="vit", default_cfg=_cfg(384))
def vit_base_patch16_384(**kwargs) -> VisionTransformer:
    """ViT-B/16 at 384 px (timm ``vit_base_patch16_384``)."""
    return _create(dict(img_size=384, patch_size=16, embed_dim=768, depth=12, num_heads=12), kwargs)


@register_model(task="vision", family="vit", default_cfg=_cfg(224))
def vit_base_patch32_224(**kwargs) -> VisionTransformer:
    """ViT-B/32 at 224 px (timm ``vit_base_patch32_224``)."""
    return _create(dict(patch_size=32, embed_dim=768, depth=12, num_heads=12), kwargs)


@register_model(task="vision", family="vit", default_cfg=_cfg(256, crop_pct=0.95))  # timm's sbb2_e200_in12k_ft_in1k
def vit_betwixt_patch16_reg4_gap_256(**kwargs) -> VisionTransformer:
    """ViT-b/16 ("betwixt", dim 640) with 4 registers, layer scale, no class token, average pooling, 256 px
    (timm ``vit_betwixt_patch16_reg4_gap_256``)."""
    return _create(
        dict(img_size=256, patch_size=16, embed_dim=640, depth=12, num_heads=10, init_values=1e-5,
             class_token=False, no_embed_class=True, reg_tokens=4, global_pool="avg"),
        kwargs,
    )


@register_model(task="vision", family="vit", default_cfg=_cfg(224))
def vit_large_patch16_224(**kwargs) -> VisionTransformer:
    """ViT-L/16 at 224 px (timm ``vit_large_patch16_224``)."""
    return _create(dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), kwargs)


@register_model(task="vision", family="vit", default_cfg=_cfg(384))
def vit_large_patch16_384(**kwargs) -> VisionTransformer:
    """ViT-L/16 at 384 px (timm ``vit_large_patch16_384``)."""
    return _create(dict(img_size=384, patch_size=16, embed_dim=1024, depth=24, num_heads=16), kwargs)


# DeiT (Touvron et al., ICML 2021) and DeiT III (ECCV 2022): ViTs trained on ImageNet-1k alone; timm's deit.py
# builds them as VisionTransformer (the distilled variants, with a second token and head, are not here).
_DEIT = dict(_cfg(224, mean=IMAGENET_MEAN, std=IMAGENET_STD))


@register_model(task="vision", family="vit", default_cfg=_DEIT)
def deit_tiny_patch16_224(**kwargs) -> VisionTransformer:
    """DeiT-Ti/16 at 224 px (timm ``deit_tiny_patch16_224``)."""
    return _create(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), kwargs)


@register_model(task="vision", family="vit", default_cfg=_DEIT)
def deit_small_patch16_224(**kwargs) -> VisionTransformer:
    """DeiT-S/16 at 224 px (timm ``deit_small_patch16_224``)."""
    return _create(dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), kwargs)


@register_model(task="vision", family="vit", default_cfg=_DEIT)
def deit_base_patch16_224(**kwargs) -> VisionTransformer:
    """DeiT-B/16 at 224 px (timm ``deit_base_patch16_224``)."""
    return _create(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), kwargs)


@register_model(task="vision", family="vit", default_cfg=_cfg(384, mean=IMAGENET_MEAN, std=IMAGENET_STD))
def deit_base_patch16_384(**kwargs) -> VisionTransformer:
    """DeiT-B/16 at 384 px (timm ``deit_base_patch16_384``)."""
    return _create(dict(img_size=384, patch_size=16, embed_dim=768, depth=12, num_heads=12), kwargs)


def _deit_distilled(embed_dim: int, depth: int, num_heads: int, img_size: int, kwargs) -> VisionTransformerDistilled:
    return _create(dict(img_size=img_size, patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=num_heads), kwargs,
                   VisionTransformerDistilled)


_DEIT_DISTILLED = dict(_DEIT, classifier=("head", "head_dist"))


@register_model(task="vision", family="vit", default_cfg=_DEIT_DISTILLED)
def deit_tiny_distilled_patch16_224(**kwargs) -> VisionTransformerDistilled:
    """DeiT-Ti/16 with the distillation token at 224 px (timm ``deit_tiny_distilled_patch16_224``)."""
    return _deit_distilled(192, 12, 3, 224, kwargs)


@register_model(task="vision", family="vit", default_cfg=_DEIT_DISTILLED)
def deit_small_distilled_patch16_224(**kwargs) -> VisionTransformerDistilled:
    """DeiT-S/16 with the distillation token at 224 px (timm ``deit_small_distilled_patch16_224``)."""
    return _deit_distilled(384, 12, 6, 224, kwargs)


@register_model(task="vision", family="vit", default_cfg=_DEIT_DISTILLED)
def deit_base_distilled_patch16_224(**kwargs) -> VisionTransformerDistilled:
    """DeiT-B/16 with the distillation token at 224 px (timm ``deit_base_distilled_patch16_224``)."""
    return _deit_distilled(768, 12, 12, 224, kwargs)


@register_model(task="vision", family="vit",
                default_cfg=_cfg(384, mean=IMAGENET_MEAN, std=IMAGENET_STD, classifier=("head", "head_dist")))
def deit_base_distilled_patch16_384(**kwargs) -> VisionTransformerDistilled:
    """DeiT-B/16 with the distillation token at 384 px (timm ``deit_base_distilled_patch16_384``)."""
    return _deit_distilled(768, 12, 12, 384, kwargs)


def _deit3(embed_dim: int, depth: int, num_heads: int, kwargs, img_size: int = 224, patch_size: int = 16
           ) -> VisionTransformer:
    """DeiT III: layer scale (init 1e-6) and a position embedding for the patches only (timm deit.py)."""
    return _create(dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                        num_heads=num_heads, no_embed_class=True, init_values=1e-6), kwargs)


_DEIT_384 = dict(_cfg(384, mean=IMAGENET_MEAN, std=IMAGENET_STD))


@register_model(task="vision", family="vit", default_cfg=_DEIT)
def deit3_small_patch16_224(**kwargs) -> VisionTransformer:
    """DeiT III-S/16 at 224 px (timm ``deit3_small_patch16_224``)."""
    return _deit3(384, 12, 6, kwargs)


@register_model(task="vision", family="vit", default_cfg=_DEIT)
def deit3_medium_patch16_224(**kwargs) -> VisionTransformer:
    """DeiT III-M/16 at 224 px (timm ``deit3_medium_patch16_224``)."""
    return _deit3(512, 12, 8, kwargs)


@register_model(task="vision", family="vit", default_cfg=_DEIT)
def deit3_base_patch16_224(**kwargs) -> VisionTransformer:
    """DeiT III-B/16 at 224 px (timm ``deit3_base_patch16_224``)."""
    return _deit3(768, 12, 12, kwargs)


@register_model(task="vision", family="vit", default_cfg=_DEIT)
def deit3_large_patch16_224(**kwargs) -> VisionTransformer:
    """DeiT III-L/16 at 224 px (timm ``deit3_large_patch16_224``)."""
    return _deit3(1024, 24, 16, kwargs)


@register_model(task="vision", family="vit", default_cfg=_DEIT)
def deit3_huge_patch14_224(**kwargs) -> VisionTransformer:
    """DeiT III-H/14 at 224 px (timm ``deit3_huge_patch14_224``)."""
    return _deit3(1280, 32, 16, kwargs, patch_size=14)


@register_model(task="vision", family="vit", default_cfg=_DEIT_384)
def deit3_small_patch16_384(**kwargs) -> VisionTransformer:
    """DeiT III-S/16 at 384 px (timm ``deit3_small_patch16_384``)."""
    return _deit3(384, 12, 6, kwargs, img_size=384)


@register_model(task="vision", family="vit", default_cfg=_DEIT_384)
def deit3_base_patch16_384(**kwargs) -> VisionTransformer:
    """DeiT III-B/16 at 384 px (timm ``deit3_base_patch16_384``)."""
    return _deit3(768, 12, 12, kwargs, img_size=384)


@register_model(task="vision", family="vit", default_cfg=_DEIT_384)
def deit3_large_patch16_384(**kwargs) -> VisionTransformer:
    """DeiT III-L/16 at 384 px (timm ``deit3_large_patch16_384``)."""
    return _deit3(1024, 24, 16, kwargs, img_size=384)


# DINOv2 (Oquab et al., TMLR 2024) backbones, and with 4 registers ("Vision Transformers Need Registers",
# Darcet et al., ICLR 2024): patch 14 at 518 px, layer scale 1e-5, no classifier (timm vision_transformer.py).
_DINOV2 = _cfg(518, num_classes=0, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _dinov2(embed_dim: int, depth: int, num_heads: int, registers: bool, kwargs) -> VisionTransformer:
    extra = dict(reg_tokens=4, no_embed_class=True) if registers else {}
    return _create(dict(img_size=518, patch_size=14, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                        init_values=1e-5, num_classes=0, **extra), kwargs)


@register_model(task="vision", family="vit", default_cfg=_DINOV2)
def vit_small_patch14_dinov2(**kwargs) -> VisionTransformer:
    """DINOv2 ViT-S/14 (timm ``vit_small_patch14_dinov2``)."""
    return _dinov2(384, 12, 6, False, kwargs)


@register_model(task="vision", family="vit", default_cfg=_DINOV2)
def vit_base_patch14_dinov2(**kwargs) -> VisionTransformer:
    """DINOv2 ViT-B/14 (timm ``vit_base_patch14_dinov2``)."""
    return _dinov2(768, 12, 12, False, kwargs)


@register_model(task="vision", family="vit", default_cfg=_DINOV2)
def vit_large_patch14_dinov2(**kwargs) -> VisionTransformer:
    """DINOv2 ViT-L/14 (timm ``vit_large_patch14_dinov2``)."""
    return _dinov2(1024, 24, 16, False, kwargs)


@register_model(task="vision", family="vit", default_cfg=_DINOV2)
def vit_small_patch14_reg4_dinov2(**kwargs) -> VisionTransformer:
    """DINOv2 ViT-S/14 with 4 registers (timm ``vit_small_patch14_reg4_dinov2``)."""
    return _dinov2(384, 12, 6, True, kwargs)


@register_model(task="vision", family="vit", default_cfg=_DINOV2)
def vit_base_patch14_reg4_dinov2(**kwargs) -> VisionTransformer:
    """DINOv2 ViT-B/14 with 4 registers (timm ``vit_base_patch14_reg4_dinov2``)."""
    return _dinov2(768, 12, 12, True, kwargs)


@register_model(task="vision", family="vit", default_cfg=_DINOV2)
def vit_large_patch14_reg4_dinov2(**kwargs) -> VisionTransformer:
    """DINOv2 ViT-L/14 with 4 registers (timm ``vit_large_patch14_reg4_dinov2``)."""
    return _dinov2(1024, 24, 16, True, kwargs)


# CLIP and SigLIP image towers, one table row per timm name (timm vision_transformer.py vit_*_clip_* and
# vit_*_siglip_*): the architecture comes from the tower's width class, the rest of the row is what differs by
# name. The data configs (num_classes, crop, mean/std) are timm's default tags'; tests/test_data_config.py
# compares every name with timm's.
#
# CLIP (Radford et al., ICML 2021; OpenCLIP, MetaCLIP, DFN weights): a LayerNorm before the blocks, no
# patch-embedding bias, LayerNorm eps 1e-5, class-token pooling. The "_quickgelu" names take the weights trained
# with QuickGELU (OpenAI's, MetaCLIP's, DFN's); their num_classes is the image-text projection width.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# width class -> (embed_dim, depth, num_heads, mlp_ratio)
_CLIP_WIDTHS = {
    "xsmall": (256, 10, 4, 4.0), "medium": (512, 12, 8, 4.0), "betwixt": (640, 12, 10, 4.0),
    "base": (768, 12, 12, 4.0), "base_plus": (896, 12, 14, 4.0), "large": (1024, 24, 16, 4.0),
    "huge": (1280, 32, 16, 4.0), "giant": (1408, 40, 16, 48 / 11), "gigantic": (1664, 48, 16, 64 / 13),
}
# name -> (width class, patch, img_size, act_layer, num_classes, data-config changes from _cfg's defaults)
_OPENAI = dict(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
_CLIP_TOWERS = {
    "vit_xsmall_patch16_clip_224": ("xsmall", 16, 224, "gelu", 512, _OPENAI),
    "vit_medium_patch16_clip_224": ("medium", 16, 224, "gelu", 512, _OPENAI),
    "vit_medium_patch32_clip_224": ("medium", 32, 224, "gelu", 512, _OPENAI),
    "vit_betwixt_patch32_clip_224": ("betwixt", 32, 224, "gelu", 512, _OPENAI),
    "vit_base_patch32_clip_224": ("base", 32, 224, "gelu", 1000, _OPENAI),
    "vit_base_patch32_clip_256": ("base", 32, 256, "gelu", 512, _OPENAI),
    "vit_base_patch32_clip_384": ("base", 32, 384, "gelu", 1000, _OPENAI),
    "vit_base_patch32_clip_448": ("base", 32, 448, "gelu", 1000, _OPENAI),
    "vit_base_patch32_clip_quickgelu_224": ("base", 32, 224, "quick_gelu", 512, _OPENAI),
    "vit_base_patch16_clip_224": ("base", 16, 224, "gelu", 1000, dict(_OPENAI, crop_pct=0.95)),
    "vit_base_patch16_clip_384": ("base", 16, 384, "gelu", 1000, dict(_OPENAI, crop_mode="squash")),
    "vit_base_patch16_clip_quickgelu_224": ("base", 16, 224, "quick_gelu", 512, dict(_OPENAI, crop_pct=1.0)),
    "vit_base_patch16_plus_clip_240": ("base_plus", 16, 240, "gelu", 640, _OPENAI),
    "vit_large_patch14_clip_224": ("large", 14, 224, "gelu", 1000, dict(crop_pct=1.0)),
    "vit_large_patch14_clip_336": ("large", 14, 336, "gelu", 1000, dict(crop_mode="squash")),
    "vit_large_patch14_clip_quickgelu_224": ("large", 14, 224, "quick_gelu", 768, dict(_OPENAI, crop_pct=1.0)),
    "vit_large_patch14_clip_quickgelu_336": ("large", 14, 336, "quick_gelu", 768, _OPENAI),
    "vit_huge_patch14_clip_224": ("huge", 14, 224, "gelu", 1000, dict(_OPENAI, crop_pct=1.0)),
    "vit_huge_patch14_clip_336": ("huge", 14, 336, "gelu", 1000, dict(_OPENAI, crop_mode="squash")),
    "vit_huge_patch14_clip_378": ("huge", 14, 378, "gelu", 1024, _OPENAI),
    "vit_huge_patch14_clip_quickgelu_224": ("huge", 14, 224, "quick_gelu", 1024, dict(_OPENAI, crop_pct=1.0)),
    "vit_huge_patch14_clip_quickgelu_378": ("huge", 14, 378, "quick_gelu", 1024, _OPENAI),
    "vit_giant_patch14_clip_224": ("giant", 14, 224, "gelu", 1024, dict(_OPENAI, crop_pct=1.0)),
    "vit_gigantic_patch14_clip_224": ("gigantic", 14, 224, "gelu", 1280, dict(_OPENAI, crop_pct=1.0)),
    "vit_gigantic_patch14_clip_378": ("gigantic", 14, 378, "gelu", 1280, dict(_OPENAI, crop_mode="squash")),
    "vit_gigantic_patch14_clip_quickgelu_224": ("gigantic", 14, 224, "quick_gelu", 1280, dict(_OPENAI, crop_pct=1.0)),
}

# SigLIP (Zhai et al., ICCV 2023) and SigLIP 2 (Tschannen et al., 2025; timm's default tags): no class token,
# attention pooling with a learned latent ("map"; the "_gap" names average the patch tokens instead, as PaliGemma
# reads them), no classifier, [-1, 1] inputs. SigLIP 2's new patch-16/32 towers use the tanh GELU. The 384-px
# so400m/14 keeps the first SigLIP's size: 384 = 27 * 14 + 6, and timm's patch embedding ignores the last 6 pixel
# rows and columns (drop_img_remainder here; the 378-px names are the divisible successors).
_SIGLIP_WIDTHS = {
    "base": (768, 12, 12, 4.0), "large": (1024, 24, 16, 4.0), "so400m": (1152, 27, 16, 3.7362),
    "giantopt": (1536, 40, 16, 4.0),
}
# name -> (width class, patch, img_size, act_layer, crop_pct)
_SIGLIP_TOWERS = {
    "vit_base_patch16_siglip_224": ("base", 16, 224, "gelu", 0.9),
    "vit_base_patch16_siglip_256": ("base", 16, 256, "gelu", 0.9),
    "vit_base_patch16_siglip_384": ("base", 16, 384, "gelu", 0.9),
    "vit_base_patch16_siglip_512": ("base", 16, 512, "gelu", 0.9),
    "vit_base_patch32_siglip_256": ("base", 32, 256, "gelu_tanh", 0.9),
    "vit_large_patch16_siglip_256": ("large", 16, 256, "gelu", 0.9),
    "vit_large_patch16_siglip_384": ("large", 16, 384, "gelu", 0.9),
    "vit_large_patch16_siglip_512": ("large", 16, 512, "gelu_tanh", 0.9),
    "vit_so400m_patch14_siglip_224": ("so400m", 14, 224, "gelu", 0.9),
    "vit_so400m_patch14_siglip_378": ("so400m", 14, 378, "gelu", 0.9),
    "vit_so400m_patch14_siglip_384": ("so400m", 14, 384, "gelu", 0.9),
    "vit_so400m_patch16_siglip_256": ("so400m", 16, 256, "gelu_tanh", 0.9),
    "vit_so400m_patch16_siglip_384": ("so400m", 16, 384, "gelu_tanh", 0.9),
    "vit_so400m_patch16_siglip_512": ("so400m", 16, 512, "gelu_tanh", 0.9),
    "vit_giantopt_patch16_siglip_256": ("giantopt", 16, 256, "gelu_tanh", 0.9),
    "vit_giantopt_patch16_siglip_384": ("giantopt", 16, 384, "gelu_tanh", 0.9),
    "vit_base_patch16_siglip_gap_224": ("base", 16, 224, "gelu", 0.9),
    "vit_base_patch16_siglip_gap_256": ("base", 16, 256, "gelu", 0.9),
    "vit_base_patch16_siglip_gap_384": ("base", 16, 384, "gelu", 0.9),
    "vit_base_patch16_siglip_gap_512": ("base", 16, 512, "gelu", 0.9),
    "vit_base_patch32_siglip_gap_256": ("base", 32, 256, "gelu_tanh", 0.9),
    "vit_large_patch16_siglip_gap_256": ("large", 16, 256, "gelu", 0.9),
    "vit_large_patch16_siglip_gap_384": ("large", 16, 384, "gelu", 0.9),
    "vit_large_patch16_siglip_gap_512": ("large", 16, 512, "gelu_tanh", 0.9),
    "vit_so400m_patch14_siglip_gap_224": ("so400m", 14, 224, "gelu", 0.9),
    "vit_so400m_patch14_siglip_gap_378": ("so400m", 14, 378, "gelu", 0.9),
    "vit_so400m_patch14_siglip_gap_384": ("so400m", 14, 384, "gelu", 1.0),
    "vit_so400m_patch14_siglip_gap_448": ("so400m", 14, 448, "gelu", 1.0),
    "vit_so400m_patch14_siglip_gap_896": ("so400m", 14, 896, "gelu", 1.0),
    "vit_so400m_patch16_siglip_gap_256": ("so400m", 16, 256, "gelu_tanh", 0.9),
    "vit_so400m_patch16_siglip_gap_384": ("so400m", 16, 384, "gelu_tanh", 0.9),
    "vit_so400m_patch16_siglip_gap_512": ("so400m", 16, 512, "gelu_tanh", 0.9),
    "vit_giantopt_patch16_siglip_gap_256": ("giantopt", 16, 256, "gelu_tanh", 0.9),
    "vit_giantopt_patch16_siglip_gap_384": ("giantopt", 16, 384, "gelu_tanh", 0.9),
}


def _tower_args(widths: dict, width: str, patch_size: int, img_size: int, act_layer: str, **extra) -> dict[str, Any]:
    embed_dim, depth, num_heads, mlp_ratio = widths[width]
    return dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                mlp_ratio=mlp_ratio, act_layer=act_layer, **extra)


def _clip_args(width: str, patch_size: int, img_size: int, act_layer: str, num_classes: int) -> dict[str, Any]:
    return _tower_args(_CLIP_WIDTHS, width, patch_size, img_size, act_layer, num_classes=num_classes,
                       pre_norm=True, norm_eps=1e-5)


def _siglip_args(name: str, width: str, patch_size: int, img_size: int, act_layer: str) -> dict[str, Any]:
    pooling = dict(global_pool="avg", fc_norm=False) if "_gap_" in name else dict(global_pool="map")
    remainder = dict(drop_img_remainder=True) if img_size % patch_size else {}
    return _tower_args(_SIGLIP_WIDTHS, width, patch_size, img_size, act_layer, class_token=False, num_classes=0,
                       **pooling, **remainder)


def _register_tower(name: str, model_args: dict[str, Any], default_cfg: dict[str, Any], doc: str) -> None:
    def constructor(**kwargs) -> VisionTransformer:
        return _create(model_args, kwargs)

    constructor.__name__ = constructor.__qualname__ = name
    constructor.__doc__ = doc
    register_model(constructor, task="vision", family="vit", default_cfg=default_cfg)


for _name, (_width, _patch, _size, _act, _classes, _data) in _CLIP_TOWERS.items():
    _register_tower(_name, _clip_args(_width, _patch, _size, _act, _classes), _cfg(_size, _classes, **_data),
                    f"CLIP {_width} ViT/{_patch} image tower at {_size} px, {_act} (timm ``{_name}``).")
for _name, (_width, _patch, _size, _act, _crop) in _SIGLIP_TOWERS.items():
    _register_tower(_name, _siglip_args(_name, _width, _patch, _size, _act), _cfg(_size, 0, crop_pct=_crop),
                    f"SigLIP {_width} ViT/{_patch} image tower at {_size} px, {_act} (timm ``{_name}``).")
del _name, _width, _patch, _size, _act, _classes, _data, _crop
