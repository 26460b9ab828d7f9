"""MaxViT: multi-axis attention (block + grid) after an MBConv in every block, state-dict compatible with timm.

Paper: Tu, Talebi, Zhang, Yang, Milanfar, Bovik, Li, "MaxViT: Multi-Axis Vision Transformer" (ECCV 2022,
arXiv:2204.01697). Official code: google-research/maxvit (TensorFlow). Each block is
MBConv (with squeeze-excitation) -> block attention (non-overlapping P x P windows) -> grid attention
(a G x G grid of tokens spread over the whole map, stride H/G), each attention followed by an MLP.

Peer: timm 1.0.x, timm/models/maxxvit.py (``MaxxVit`` with ``MaxxVitBlock``, ``PartitionAttentionCl``,
``MbConvBlock``, ``Stem``) and timm/layers/pos_embed_rel.py (``RelPosBiasTf``, ``RelPosMlp``). Module and
parameter names follow it, so ``timm.create_model(name, img_size=s).state_dict()`` loads here with
``strict=True`` and gives the same logits. Two families of configurations, both registered below:

* ``maxvit_*_tf_*`` (ports of the official TF weights): "same" padding convs (TF-style asymmetric padding
  for the stride-2 convs and the stride-2 average pool), BatchNorm eps 1e-3, tanh-approximated GELU,
  MBConv expansion from the output width, q/k/v interleaved per head (``head_first=False``:
  qkv channels are [3, heads, head_dim]), a learned relative-position table per layer
  (:class:`zoo.attention.relpos.RelPosBiasTf`), an MLP head with a tanh pre-logits layer.
* ``maxvit_rmlp_*_rw_*`` (timm's own): symmetric padding, SiLU MBConvs with expansion from the input width
  and no output bias, q/k/v grouped per head (``head_first=True``: [heads, 3, head_dim]), an MLP
  relative-position bias over log-spaced offsets (:class:`zoo.attention.relpos.RelPosMlp`), a final
  LayerNorm and a linear head.

Attention goes through :func:`zoo.attention.attend` with the relative-position module as the bias object.

Beyond timm: **any input size**. timm fixes window = grid = img_size // 32 at build time and needs every
stage's map to be a multiple of it. Here each partition attention pads its (normalised) map at the bottom
and right to a multiple of the partition size, gives attention a key mask that excludes the padded tokens
(so they are never attended; padded queries are computed and thrown away), and crops back. Relative
positions between real tokens are unchanged by the padding, so at a size that is already a multiple
nothing changes. timm's rw stride-2 shortcut pool floors odd sizes while the strided conv rounds up (its
"size of tensor a (38) must match (37)" error); we pool with ``ceil_mode`` (a partial last window averages
the pixels it has), which equals timm at even sizes. A checkpoint trained with another window loads: TF
tables are resized (:func:`zoo.attention.relpos.resize_rel_pos_table`, timm's rule), MLP biases need nothing.

Letters: B batch, C channels, H/W feature-map height/width (Hp/Wp padded to partition multiples),
P = Ph*Pw tokens per partition (window or grid), nP partitions per image, K classes, Hd heads,
D head dim.
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict, abc
from functools import partial
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from zoo.attention import Dense, attend
from zoo.attention import capture as _capture
from zoo.attention.modules import Mlp, check_module_output
from zoo.attention.relpos import RelPosBiasTf, RelPosMlp, resize_rel_pos_table
from zoo.layers import (
    DropPath, IntOrPair, LayerScale, activate_fresh, check_features, check_finite_input, check_flag, check_image_batch,
    check_ints, check_rates, check_reset_classifier, create_act, feature_take_indices, new_linear_head, to_pair,
)
from zoo.hub import unwrap_state_dict
from zoo.registry import DIGITS_PREPROCESSING, note_model_args, register_model

__all__ = [
    "MaxVit",
    "MaxVitBlock",
    "MbConvBlock",
    "PartitionAttention",
    "WindowAttention",
    "Stem",
    "checkpoint_filter_fn",
    "partition",
    "unpartition",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")
PADDINGS = ("", "same")
REL_POS_TYPES = ("bias_tf", "mlp")
GLOBAL_POOLS = ("avg", "max", "avgmax", "catavgmax", "")  # timm's SelectAdaptivePool2d names
STEM_STRIDE = 2


def _make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Round ``value`` to a multiple of ``divisor`` without going more than 10% below it (timm rule)."""
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if out < round_limit * value:
        out += divisor
    return out


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) of one axis: output ceil(size / stride).

    Integer arithmetic only, and no max() when kernel >= stride (the total is then never negative): a symbolic
    size (torch.compile's automatic dynamic shapes at a second image size) went through math.ceil of a float
    division and max(), and four stages of those nested into expressions Dynamo's symbolic shapes did not
    simplify in minutes."""
    out = (size + stride - 1) // stride
    total = (out - 1) * stride + kernel - size
    if kernel < stride:
        total = max(total, 0)
    return total // 2, total - total // 2


# --------------------------------------------------------------------------------------------------
# Conv-side layers
# --------------------------------------------------------------------------------------------------
class Conv2dSame(nn.Conv2d):
    """Conv2d with TF "SAME" padding computed from the input size (for strided convs; timm Conv2dSame)."""

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        sh, sw = self.stride
        top, bottom = _same_pad(x_BCHW.shape[-2], kh, sh)
        left, right = _same_pad(x_BCHW.shape[-1], kw, sw)
        if top or bottom or left or right:
            x_BCHW = F.pad(x_BCHW, (left, right, top, bottom))
        return super().forward(x_BCHW)


def _conv(in_chs: int, out_chs: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False, padding: str = "") -> nn.Conv2d:
    """timm ``create_conv2d``: symmetric padding ((stride-1) + (k-1)) // 2, or "same" (dynamic when strided)."""
    if padding == "same" and stride > 1:
        return Conv2dSame(in_chs, out_chs, kernel, stride=stride, padding=0, groups=groups, bias=bias)
    pad = (kernel - 1) // 2 if padding == "same" else ((stride - 1) + (kernel - 1)) // 2
    return nn.Conv2d(in_chs, out_chs, kernel, stride=stride, padding=pad, groups=groups, bias=bias)


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm followed by an activation (timm BatchNormAct2d; same state-dict keys as BatchNorm2d)."""

    def __init__(self, num_features: int, eps: float = 1e-5, act: Optional[str] = None):
        super().__init__(num_features, eps=eps)
        self.act = create_act(act, ACTIVATIONS) if act else nn.Identity()

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return activate_fresh(self.act, super().forward(x_BCHW))  # in place at inference


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        x_BHWC = x_BCHW.permute(0, 2, 3, 1)
        x_BHWC = F.layer_norm(x_BHWC, self.normalized_shape, self.weight, self.bias, self.eps)
        return x_BHWC.permute(0, 3, 1, 2)


class Downsample2d(nn.Module):
    """Stride-2 shortcut: 2x2 average pool, then a 1x1 conv when the width changes (timm Downsample2d "avg2").

    With ``padding="same"`` odd sizes are zero-padded at the bottom/right and the zeros count in the
    average (timm AvgPool2dSame); otherwise the pool uses ``ceil_mode`` (the partial last window averages
    its in-image pixels) where timm floors and then fails to add the branches.
    """

    def __init__(self, in_chs: int, out_chs: int, padding: str = "", bias: bool = True):
        super().__init__()
        self.padding = padding
        self.expand = nn.Conv2d(in_chs, out_chs, 1, bias=bias) if in_chs != out_chs else nn.Identity()

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        if self.padding == "same":
            top, bottom = _same_pad(x_BCHW.shape[-2], 2, 2)
            left, right = _same_pad(x_BCHW.shape[-1], 2, 2)
            if top or bottom or left or right:
                x_BCHW = F.pad(x_BCHW, (left, right, top, bottom))
            x_BCHW = F.avg_pool2d(x_BCHW, 2, 2)
        else:
            x_BCHW = F.avg_pool2d(x_BCHW, 2, 2, ceil_mode=True)
        return self.expand(x_BCHW)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al., CVPR 2018): channel gates from the global mean (timm SEModule)."""

    def __init__(self, channels: int, rd_channels: int, act: str = "silu"):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=True)
        self.act = create_act(act, ACTIVATIONS)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=True)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        s_BC11 = self.fc2(self.act(self.fc1(x_BCHW.mean((2, 3), keepdim=True))))
        return x_BCHW * torch.sigmoid(s_BC11)


class MbConvBlock(nn.Module):
    """Pre-norm inverted bottleneck: BN -> 1x1 expand -> BN-act -> depthwise kxk (stride) -> BN-act -> SE -> 1x1.

    timm MbConvBlock with stride_mode "dw" (the stride is in the depthwise conv) and SE after norm2.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        expand_ratio: float = 4.0,
        expand_output: bool = True,
        se_ratio: float = 0.25,
        act: str = "gelu",
        norm_eps: float = 1e-5,
        padding: str = "",
        output_bias: bool = True,
        kernel_size: int = 3,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"MbConvBlock stride must be 1 or 2, got {stride}")
        if stride == 1 and in_chs != out_chs:
            raise ValueError(f"MbConvBlock with stride 1 needs in_chs == out_chs, got {in_chs} and {out_chs}")
        mid_chs = _make_divisible((out_chs if expand_output else in_chs) * expand_ratio)
        self.shortcut = Downsample2d(in_chs, out_chs, padding, output_bias) if stride == 2 else nn.Identity()
        self.pre_norm = BatchNormAct2d(in_chs, norm_eps, act=None)
        self.conv1_1x1 = _conv(in_chs, mid_chs, 1)
        self.norm1 = BatchNormAct2d(mid_chs, norm_eps, act)
        self.conv2_kxk = _conv(mid_chs, mid_chs, kernel_size, stride=stride, groups=mid_chs, padding=padding)
        self.norm2 = BatchNormAct2d(mid_chs, norm_eps, act)
        self.se = SqueezeExcite(mid_chs, int(se_ratio * (out_chs if expand_output else mid_chs)), "silu")
        self.conv3_1x1 = _conv(mid_chs, out_chs, 1, bias=output_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x_BCHW)
        x = self.norm1(self.conv1_1x1(self.pre_norm(x_BCHW)))
        x = self.se(self.norm2(self.conv2_kxk(x)))
        return self.drop_path(self.conv3_1x1(x)) + shortcut


class Stem(nn.Module):
    """3x3 stride-2 conv -> BN-act -> 3x3 conv."""

    def __init__(self, in_chs: int, out_chs: tuple[int, int], bias: bool, act: str, norm_eps: float, padding: str):
        super().__init__()
        self.stride = STEM_STRIDE
        self.conv1 = _conv(in_chs, out_chs[0], 3, stride=2, bias=bias, padding=padding)
        self.norm1 = BatchNormAct2d(out_chs[0], norm_eps, act)
        self.conv2 = _conv(out_chs[0], out_chs[1], 3, stride=1, bias=bias, padding=padding)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.norm1(self.conv1(x_BCHW)))


# --------------------------------------------------------------------------------------------------
# Partition (block / grid) attention
# --------------------------------------------------------------------------------------------------
def partition(x_BHWC: torch.Tensor, size: tuple[int, int], kind: str) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of ``size`` -> (B*nP, P, C).

    "block": non-overlapping Ph x Pw windows, row-major over windows. "grid": a Ph x Pw grid of tokens with
    stride (H/Ph, W/Pw); partition (i, j) holds the tokens at rows i + a*H/Ph and cols j + b*W/Pw.
    """
    b, h, w, c = x_BHWC.shape
    ph, pw = size
    if kind == "block":
        x = x_BHWC.reshape(b, h // ph, ph, w // pw, pw, c).permute(0, 1, 3, 2, 4, 5)
    else:
        x = x_BHWC.reshape(b, ph, h // ph, pw, w // pw, c).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, ph * pw, c)


def unpartition(x_BPC: torch.Tensor, size: tuple[int, int], kind: str, hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`partition`: (B*nP, P, C) -> (B, H, W, C)."""
    h, w = hw
    ph, pw = size
    c = x_BPC.shape[-1]
    if kind == "block":
        x = x_BPC.reshape(-1, h // ph, w // pw, ph, pw, c).permute(0, 1, 3, 2, 4, 5)
    else:
        x = x_BPC.reshape(-1, h // ph, w // pw, ph, pw, c).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(-1, h, w, c)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each partition, relative-position bias as the attend() bias object.

    ``head_first=True``: qkv channels are [Hd, 3, D] (timm rw models); False: [3, Hd, D] (TF models).
    """

    def __init__(
        self,
        dim: int,
        partition_size: tuple[int, int],
        dim_head: int = 32,
        head_first: bool = True,
        rel_pos_type: str = "bias_tf",
        rel_pos_dim: int = 512,
        bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % dim_head:
            raise ValueError(f"attention width {dim} is not a multiple of dim_head {dim_head}")
        self.num_heads = dim // dim_head
        self.dim_head = dim_head
        self.head_first = head_first
        self.scale = dim_head**-0.5
        self.attn_drop = float(attn_drop)
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        if rel_pos_type == "bias_tf":
            self.rel_pos = RelPosBiasTf(partition_size, self.num_heads)
        elif rel_pos_type == "mlp":
            self.rel_pos = RelPosMlp(partition_size, self.num_heads, hidden_dim=rel_pos_dim)
        else:
            raise ValueError(f"rel_pos_type must be one of {REL_POS_TYPES}, got {rel_pos_type!r}")
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x_BPC: torch.Tensor, key_valid_BP: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B', P, C) -> (B', P, C); ``key_valid_BP`` bool (B', P): keys that may be attended (None: all)."""
        b, n, c = x_BPC.shape
        qkv = self.qkv(x_BPC)
        if self.head_first:
            q, k, v = qkv.view(b, n, self.num_heads, 3 * self.dim_head).transpose(1, 2).chunk(3, dim=3)
        else:
            q, k, v = qkv.view(b, n, 3, self.num_heads, self.dim_head).permute(2, 0, 3, 1, 4).unbind(0)
        mask = None
        if key_valid_BP is not None:
            mask = Dense(key_valid_BP[:, None, None, :].expand(-1, 1, n, n))
        dropout_p = self.attn_drop if self.training else 0.0
        # the module checks its own input and output (zoo.attention.modules.check_module_output), not attend()
        if _capture.is_capturing():
            out_BHPD, weights = attend(q, k, v, mask, self.rel_pos, scale=self.scale, dropout_p=dropout_p,
                                       return_weights=True, check_finite=False)
            _capture.record(self, weights)
        else:
            out_BHPD = attend(q, k, v, mask, self.rel_pos, scale=self.scale, dropout_p=dropout_p, check_finite=False)
        out_BPC = self.proj_drop(self.proj(out_BHPD.transpose(1, 2).reshape(b, n, c)))
        check_module_output(self, "MaxViT attention", out_BPC, x=x_BPC)
        return out_BPC


class TransformerMlp(Mlp):
    """The transformer MLP of timm's maxxvit (fc1, act, fc2): the shared :class:`zoo.attention.modules.Mlp`
    with the activation given by name (its GELU runs in place at inference)."""

    def __init__(self, dim: int, hidden: int, act: str, drop: float = 0.0):
        super().__init__(dim, hidden, act_layer=partial(create_act, act, ACTIVATIONS), drop=drop)


class PartitionAttention(nn.Module):
    """Pre-norm block or grid attention + MLP on a channels-last map (timm PartitionAttentionCl).

    Maps that are not partition multiples are padded (bottom/right) for the attention only; the padded
    keys are masked out and the padded rows cropped off again.
    """

    def __init__(
        self,
        dim: int,
        kind: str,
        partition_size: tuple[int, int],
        dim_head: int = 32,
        head_first: bool = True,
        rel_pos_type: str = "bias_tf",
        rel_pos_dim: int = 512,
        expand_ratio: float = 4.0,
        act: str = "gelu",
        norm_eps: float = 1e-6,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: Optional[float] = None,
    ):
        super().__init__()
        if kind not in ("block", "grid"):
            raise ValueError(f"partition kind must be 'block' or 'grid', got {kind!r}")
        self.kind = kind
        self.partition_size = to_pair(partition_size, f"{kind} size")
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = WindowAttention(
            dim, self.partition_size, dim_head, head_first, rel_pos_type, rel_pos_dim, True, attn_drop, proj_drop
        )
        self.attn.partition_kind = kind  # for attention-map pictures (tasks/vision/viz_maxvit.py)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()  # timm's ls1 / ls2 (rmlp_small)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = TransformerMlp(dim, int(dim * expand_ratio), act, proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def set_partition_size(self, size: IntOrPair) -> None:
        self.partition_size = to_pair(size, f"{self.kind} size")
        self.attn.rel_pos.set_window_size(self.partition_size)

    def padded_size(self, h: int, w: int) -> tuple[int, int]:
        # Ceil division on non-negative operands only: under ONNX tracing h and w are graph values and
        # ``//`` becomes ONNX integer Div, which truncates toward zero, so -(-h // p) would round down.
        ph, pw = self.partition_size
        return (h + ph - 1) // ph * ph, (w + pw - 1) // pw * pw

    def _partition_attn(self, x_BHWC: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x_BHWC.shape
        hp, wp = self.padded_size(h, w)
        key_valid = None
        if (hp, wp) != (h, w):
            x_BHWC = F.pad(x_BHWC, (0, 0, 0, wp - w, 0, hp - h))
            valid_1HW1 = torch.zeros(1, hp, wp, 1, dtype=torch.bool, device=x_BHWC.device)
            valid_1HW1[:, :h, :w] = True
            valid_nP = partition(valid_1HW1, self.partition_size, self.kind)[..., 0]  # (nP, P)
            key_valid = valid_nP.repeat(b, 1)  # (b * nP, P), batch-major like partition()
        parts_BPC = partition(x_BHWC, self.partition_size, self.kind)
        parts_BPC = self.attn(parts_BPC, key_valid)
        out_BHWC = unpartition(parts_BPC, self.partition_size, self.kind, (hp, wp))
        if (hp, wp) != (h, w):
            out_BHWC = out_BHWC[:, :h, :w]
        return out_BHWC

    def forward(self, x_BHWC: torch.Tensor) -> torch.Tensor:
        x_BHWC = x_BHWC + self.drop_path1(self.ls1(self._partition_attn(self.norm1(x_BHWC))))
        return x_BHWC + self.drop_path2(self.ls2(self.mlp(self.norm2(x_BHWC))))


class MaxVitBlock(nn.Module):
    """MBConv -> block attention + MLP -> grid attention + MLP (timm MaxxVitBlock)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, conv_args: dict, attn_args: dict, drop_path: float):
        super().__init__()
        self.conv = MbConvBlock(in_chs, out_chs, stride, drop_path=drop_path, **conv_args)
        window, grid = attn_args.pop("window_size"), attn_args.pop("grid_size")
        self.attn_block = PartitionAttention(out_chs, "block", window, drop_path=drop_path, **attn_args)
        self.attn_grid = PartitionAttention(out_chs, "grid", grid, drop_path=drop_path, **attn_args)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        x_BHWC = self.conv(x_BCHW).permute(0, 2, 3, 1)
        x_BHWC = self.attn_grid(self.attn_block(x_BHWC))
        return x_BHWC.permute(0, 3, 1, 2)


class MaxVitStage(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, depth: int, conv_args: dict, attn_args: dict, drop_path: Sequence[float]):
        super().__init__()
        self.grad_checkpointing = False
        blocks = []
        for i in range(depth):
            blocks.append(MaxVitBlock(in_chs if i == 0 else out_chs, out_chs, 2 if i == 0 else 1, dict(conv_args), dict(attn_args), drop_path[i]))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            for block in self.blocks:
                x_BCHW = checkpoint(block, x_BCHW, use_reentrant=False)
            return x_BCHW
        return self.blocks(x_BCHW)


class ClassifierHead(nn.Module):
    """Global pool -> [LayerNorm -> Linear-tanh pre-logits] -> dropout -> Linear.

    With ``hidden_size`` this is timm's NormMlpClassifierHead (the TF models: keys head.norm,
    head.pre_logits.fc, head.fc); without, timm's ClassifierHead (head.fc only; the model's final norm
    comes before the pool).

    ``pool`` as timm's SelectAdaptivePool2d: "avg", "max", "avgmax" (their mean), "catavgmax" (both,
    concatenated: twice the features; not with ``hidden_size``, as in timm) or "" (no pooling: the head runs
    at every position and returns (B, K, H, W); its linears are then 1x1 convolutions, as in timm, so a
    timm state dict of that configuration loads as it is).
    """

    def __init__(self, in_features: int, num_classes: int, hidden_size: Optional[int], norm_eps: float, pool: str, drop_rate: float):
        super().__init__()
        self.in_features, self.hidden_size = in_features, hidden_size
        self.pool = self._checked_pool(pool)
        self.norm = nn.LayerNorm(in_features, eps=norm_eps) if hidden_size else nn.Identity()
        if hidden_size:
            fc = self._linear(in_features, hidden_size)
            self.pre_logits = nn.Sequential(OrderedDict(fc=fc, act=nn.Tanh()))
        else:
            self.pre_logits = nn.Identity()
        self.drop = nn.Dropout(drop_rate)
        self.fc = self._linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @property
    def num_features(self) -> int:
        """Width of the pre-logits features (what ``fc`` reads)."""
        return self.hidden_size or self.in_features * (2 if self.pool == "catavgmax" else 1)

    def _checked_pool(self, pool: str) -> str:
        if pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {pool!r}")
        if pool == "catavgmax" and self.hidden_size:
            raise ValueError("global_pool='catavgmax' doubles the pooled width, which the normalised MLP head of the "
                             "TF models (head_hidden_size) does not take (as in timm): use 'avg', 'max' or 'avgmax'")
        return pool

    def _linear(self, in_features: int, out_features: int) -> nn.Module:
        return nn.Conv2d(in_features, out_features, 1) if self.pool == "" else nn.Linear(in_features, out_features)

    def set_pool(self, pool: str) -> None:
        """Change the pooling; the pre-logits linear keeps its weights (reshaped between Linear and 1x1 conv,
        as timm's ``reset``). The caller rebuilds ``fc``."""
        pool = self._checked_pool(pool)
        was_conv, self.pool = self.pool == "", pool
        if self.hidden_size and was_conv != (pool == ""):
            old = self.pre_logits.fc
            new = self._linear(self.in_features, self.hidden_size).to(old.weight.device, old.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(old.weight.reshape(new.weight.shape))
                new.bias.copy_(old.bias)
            new.weight.requires_grad_(old.weight.requires_grad)
            new.bias.requires_grad_(old.bias.requires_grad)
            self.pre_logits.fc = new.train(old.training)

    def new_fc(self, num_classes: int, like: torch.Tensor) -> nn.Module:
        """A fresh ``num_classes``-way classifier (``nn.Identity`` for 0) on ``like``'s device and dtype."""
        if self.pool != "" or num_classes == 0:
            return new_linear_head(self.num_features, num_classes, like, self.training, init_std=None)
        return self._linear(self.num_features, num_classes).to(like.device, like.dtype).train(self.training)

    def forward(self, x_BCHW: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.pool == "":  # per position: LayerNorm over channels, 1x1 convs
            x = self.norm(x_BCHW.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        elif self.pool == "avg":
            x = self.norm(x_BCHW.mean((2, 3)))
        elif self.pool == "max":
            x = self.norm(x_BCHW.amax((2, 3)))
        elif self.pool == "avgmax":
            x = self.norm(0.5 * (x_BCHW.mean((2, 3)) + x_BCHW.amax((2, 3))))
        else:  # catavgmax (no norm: the models with a norm before the pool)
            x = torch.cat((x_BCHW.mean((2, 3)), x_BCHW.amax((2, 3))), dim=1)
        x = self.drop(self.pre_logits(x))
        return x if pre_logits else self.fc(x)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
class MaxVit(nn.Module):
    """MaxViT classifier (timm ``MaxxVit`` with all-"M" stages).

    Constructor arguments are flat and JSON-serialisable (config.json of zoo.save_pretrained).
    ``window_size``/``grid_size`` default to ``img_size // partition_ratio`` (timm); any input size runs.
    ``final_norm=False`` leaves out the norm after the last stage (what ``prune_intermediate_layers`` and
    ``reset_classifier(reset_other=True)`` on the TF models record).
    ``init_values``: layer scale (``ls1`` / ``ls2``) on the attention and MLP branches of the partition blocks, as
    timm's ``TransformerCfg.init_values`` (maxvit_rmlp_small_rw_*); None: none.
    """

    def __init__(
        self,
        img_size: IntOrPair = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (2, 2, 5, 2),
        stem_width: IntOrPair = 64,
        stem_bias: bool = False,
        dim_head: int = 32,
        window_size: Optional[IntOrPair] = None,
        grid_size: Optional[IntOrPair] = None,
        partition_ratio: int = 32,
        padding: str = "",
        conv_act: str = "gelu",
        conv_norm_eps: float = 1e-5,
        conv_expand_output: bool = True,
        conv_se_ratio: float = 0.25,
        conv_output_bias: bool = True,
        transformer_act: str = "gelu",
        transformer_norm_eps: float = 1e-6,
        head_first: bool = True,
        rel_pos_type: str = "bias_tf",
        rel_pos_dim: int = 512,
        head_hidden_size: Optional[int] = None,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        final_norm: bool = True,
        init_values: Optional[float] = None,
    ):
        super().__init__()
        self.img_size = to_pair(img_size, "img_size")
        if init_values is not None and (isinstance(init_values, bool) or not isinstance(init_values, (int, float))
                                        or not 0 < init_values < float("inf")):
            raise ValueError(f"init_values must be None or a positive number (layer-scale init), got {init_values!r}")
        if not all(isinstance(v, abc.Sequence) and not isinstance(v, str) for v in (embed_dim, depths)) or not embed_dim \
                or len(embed_dim) != len(depths) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1
                                                           for d in (*embed_dim, *depths)):
            raise ValueError(f"embed_dim {embed_dim!r} and depths {depths!r} must be non-empty lists of one length "
                             f"of positive ints (one per stage)")
        embed_dim, depths = list(embed_dim), list(depths)
        for value, name, options in ((padding, "padding", PADDINGS), (conv_act, "conv_act", ACTIVATIONS),
                                     (transformer_act, "transformer_act", ACTIVATIONS),
                                     (rel_pos_type, "rel_pos_type", REL_POS_TYPES), (global_pool, "global_pool", GLOBAL_POOLS)):
            if value not in options:
                raise ValueError(f"{name} must be one of {options}, got {value!r}")
        check_ints(in_chans=in_chans, dim_head=dim_head, partition_ratio=partition_ratio)
        check_ints(0, num_classes=num_classes)
        if head_hidden_size is not None:
            check_ints(head_hidden_size=head_hidden_size)
        if any(d % dim_head for d in embed_dim):
            raise ValueError(f"every stage width {embed_dim} must be divisible by dim_head ({dim_head})")
        if isinstance(conv_se_ratio, bool) or not isinstance(conv_se_ratio, (int, float)) or not 0.0 < conv_se_ratio <= 1.0:
            raise ValueError(f"conv_se_ratio must be a number in (0, 1], got {conv_se_ratio!r}")
        check_rates(drop_rate=drop_rate, drop_path_rate=drop_path_rate, attn_drop_rate=attn_drop_rate,
                    proj_drop_rate=proj_drop_rate)
        self.partition_ratio = partition_ratio
        derived = tuple(max(1, s // self.partition_ratio) for s in self.img_size)
        self.window_size = to_pair(window_size, "window_size") if window_size is not None else derived
        self.grid_size = to_pair(grid_size, "grid_size") if grid_size is not None else self.window_size
        # partition sizes given to the constructor (maxvit_digits: 4 at 32 px) stay when set_input_size changes the
        # image size, as loading the checkpoint at that size keeps them; derived ones follow the size (timm). Only
        # the constructor's: a size given to set_input_size holds for that call.
        self._fixed_partition = (self.window_size if window_size is not None else None,
                                 self.grid_size if grid_size is not None or window_size is not None else None)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim[-1]
        self.drop_rate = drop_rate
        stem_chs = to_pair(stem_width, "stem_width")

        self.stem = Stem(in_chans, stem_chs, stem_bias, conv_act, conv_norm_eps, padding)
        self.feature_info = [dict(num_chs=stem_chs[1], reduction=STEM_STRIDE, module="stem")]
        conv_args = dict(
            expand_output=conv_expand_output, se_ratio=conv_se_ratio, act=conv_act, norm_eps=conv_norm_eps,
            padding=padding, output_bias=conv_output_bias,
        )
        attn_args = dict(
            window_size=self.window_size, grid_size=self.grid_size, dim_head=dim_head, head_first=head_first,
            rel_pos_type=rel_pos_type, rel_pos_dim=rel_pos_dim, act=transformer_act, norm_eps=transformer_norm_eps,
            attn_drop=attn_drop_rate, proj_drop=proj_drop_rate, init_values=init_values,
        )
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(depths)
        stages, in_chs, stride = [], stem_chs[1], STEM_STRIDE
        for i, (dim, depth) in enumerate(zip(embed_dim, depths)):
            stages.append(MaxVitStage(in_chs, dim, depth, conv_args, attn_args, rates[i].tolist()))
            in_chs, stride = dim, stride * 2
            self.feature_info.append(dict(num_chs=dim, reduction=stride, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        if head_hidden_size or not final_norm:  # the TF models normalise in the head
            self.norm = nn.Identity()
        else:
            self.norm = LayerNorm2d(self.num_features, eps=transformer_norm_eps)
        self.head = ClassifierHead(self.num_features, num_classes, head_hidden_size, transformer_norm_eps, global_pool, drop_rate)
        self.head_hidden_size = self.head.num_features
        self.init_weights()

    # ------------------------------------------------------------------ init / timm-style methods
    def init_weights(self) -> None:
        """timm's "vit_eff" scheme: EfficientNet-style convs, Xavier transformer linears, tables N(0, 0.02)."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Conv2d) and not name.startswith("head"):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear) and ".attn_" in name:
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    if "mlp" in name:
                        nn.init.normal_(module.bias, std=1e-6)
                    else:
                        nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {k for k, _ in self.named_parameters() if "relative_position_bias_table" in k or "rel_pos.mlp" in k}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of storing its activations."""
        enable = check_flag(enable, "set_grad_checkpointing: enable")
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def pretrained_head_keys(self) -> list[str]:
        """State-dict keys of the classifier (re-initialised when a checkpoint's class count differs)."""
        return ["head.fc.weight", "head.fc.bias"]

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False) -> None:
        """Replace the final linear with a fresh ``num_classes``-way one (0: none); the pre-logits stay, unless
        ``reset_other``: then the TF models' head norm and tanh pre-logits MLP go too (timm's
        ``MaxxVit.reset_classifier`` -> ``NormMlpClassifierHead.reset(reset_other=True)``, timm/layers/classifier.py),
        so ``forward_head(pre_logits=True)`` gives the pooled last-stage map itself; on the rw models' plain head
        it changes nothing (timm's ``ClassifierHead.reset``). Without the normalised head ``global_pool`` may then
        be "catavgmax" (timm asserts on it before the reset). save_pretrained then writes the new class count,
        pooling and head (zoo.registry.note_model_args)."""
        check_reset_classifier(num_classes, global_pool, GLOBAL_POOLS)
        reset_other = check_flag(reset_other, "reset_classifier: reset_other")
        if reset_other:
            self._drop_head_norm_and_pre_logits(self.global_pool if global_pool is None else global_pool)
        if global_pool is not None:
            self.head.set_pool(global_pool)
            self.global_pool = global_pool
            self.head_hidden_size = self.head.num_features
            note_model_args(self, global_pool=global_pool)
        self.num_classes = num_classes
        self.head.fc = self.head.new_fc(num_classes, next(self.parameters()))
        note_model_args(self, num_classes=num_classes)

    def _drop_head_norm_and_pre_logits(self, pool: str) -> None:
        """The head without its norm and pre-logits MLP (timm's ``NormMlpClassifierHead.reset(reset_other=True)``):
        pooling, dropout and no classifier (the caller sets ``head.fc``); recorded so that a saved model rebuilds
        it (no head_hidden_size, and no final norm where the model had none: the TF models normalise in the head)."""
        self.head = ClassifierHead(self.num_features, 0, None, 1e-6, pool, self.head.drop.p).train(self.training)
        self.num_classes, self.head_hidden_size, self.global_pool = 0, self.head.num_features, pool
        note_model_args(self, num_classes=0, head_hidden_size=None, global_pool=pool,
                        final_norm=not isinstance(self.norm, nn.Identity))

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last of ``indices`` (feature 0 is the stem), timm's method
        (timm.models.maxxvit.MaxxVit.prune_intermediate_layers): when stages are cut, the final norm and the
        head's norm / pre-logits go too (they are sized for the last stage); a pruned head also drops the pooling
        (global_pool='': forward returns the last map, as timm's). Returns the absolute indices
        kept; save_pretrained records the pruned shape. At least one stage is kept."""
        prune_norm = check_flag(prune_norm, "prune_intermediate_layers: prune_norm")
        prune_head = check_flag(prune_head, "prune_intermediate_layers: prune_head")  # "no" dropped the head
        take, last = feature_take_indices(len(self.stages) + 1, indices)
        if last == 0:
            raise ValueError("prune_intermediate_layers keeps at least one stage (index >= 1); for the stem alone "
                             "use model.stem")
        cut = last < len(self.stages)
        if prune_norm or cut:
            self.norm = nn.Identity()
        self.stages = self.stages[:last]
        self.feature_info = self.feature_info[: last + 1]
        if cut:
            self.num_features = self.embed_dim = self.feature_info[last]["num_chs"]
            note_model_args(self, embed_dim=[f["num_chs"] for f in self.feature_info[1:]],
                            depths=[len(stage.blocks) for stage in self.stages])
        if prune_head or cut:  # timm's reset_classifier(0, '', reset_other=True): no pooling, nothing learned
            self._drop_head_norm_and_pre_logits("")
        note_model_args(self, final_norm=not isinstance(self.norm, nn.Identity))
        return take

    def set_input_size(self, img_size: Optional[IntOrPair] = None, window_size: Optional[IntOrPair] = None,
                       grid_size: Optional[IntOrPair] = None, partition_ratio: Optional[int] = None) -> None:
        """Change the native size and the partition sizes; TF tables are resized to the new window, MLP biases
        re-indexed. The result equals building, or loading the checkpoint, at that size.

        A window or grid size not given is ``img_size // partition_ratio``, as timm's
        ``MaxxVit.set_input_size`` derives it on every call, except one the model was built with explicitly
        (maxvit_digits), which is kept. A size given to one call applies to that call only: a later call
        without it derives again (timm), as a model built at the later size would.

        ``partition_ratio`` (timm 1.0.31's argument) replaces the model's ratio for this and later calls and
        derives the window and grid sizes not given to the call, also on a model built with fixed ones (they give
        way to the new ratio; a window or grid given to the same call still wins, as in timm). Unlike timm's, the
        forward runs when a stage's map is not a multiple of the derived size (padding)."""
        if partition_ratio is not None:
            check_ints(partition_ratio=partition_ratio)
        new_img_size = to_pair(img_size, "img_size") if img_size is not None else self.img_size
        window_size = to_pair(window_size, "window_size") if window_size is not None else None
        grid_size = to_pair(grid_size, "grid_size") if grid_size is not None else None
        self.img_size = new_img_size  # every argument checked before the model changes
        if partition_ratio is not None:
            self.partition_ratio = partition_ratio
            self._fixed_partition = (None, None)
            args = getattr(self, "zoo_model_args", None)
            if isinstance(args, dict):  # timm's name for it (a timm export's model_args) gives way to the zoo's
                args.pop("transformer_partition_ratio", None)
            note_model_args(self, partition_ratio=partition_ratio)
        derived = tuple(max(1, s // self.partition_ratio) for s in self.img_size)
        fixed_window, fixed_grid = getattr(self, "_fixed_partition", (None, None))
        window = window_size if window_size is not None else fixed_window if fixed_window is not None else derived
        grid = grid_size if grid_size is not None else fixed_grid if fixed_grid is not None else derived
        self.window_size, self.grid_size = window, grid
        for stage in self.stages:
            for block in stage.blocks:
                block.attn_block.set_partition_size(window)
                block.attn_grid.set_partition_size(grid)
        # config.json records a partition size only where it is not derived from img_size, so a model loaded from
        # it derives the others again on its own set_input_size, as this one does; a recorded window records the
        # grid too, which the constructor would otherwise set to the window
        args = getattr(self, "zoo_model_args", None)
        if isinstance(args, dict):  # timm's names for them (a timm export's model_args) give way to the zoo's
            for key in ("transformer_window_size", "transformer_grid_size"):
                args.pop(key, None)
        keep_window = window_size is not None or fixed_window is not None
        keep_grid = keep_window or grid_size is not None or fixed_grid is not None
        note_model_args(self, img_size=list(self.img_size), window_size=list(window) if keep_window else None,
                        grid_size=list(grid) if keep_grid else None)

    # ------------------------------------------------------------------ forward
    def _check_image(self, x) -> None:
        _, _, h, w = check_image_batch(x, "MaxViT", self.in_chans, self.stem.conv1.weight)
        if h < STEM_STRIDE or w < STEM_STRIDE:
            raise ValueError(f"image {h}x{w} is smaller than the stem stride {STEM_STRIDE}")
        check_finite_input(x, "MaxViT input image")

    def forward_features(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Images (B, in_chans, Hi, Wi) -> final feature map (B, C, ceil(Hi/32), ceil(Wi/32))."""
        self._check_image(x_BCHW)
        return self.norm(self.stages(self.stem(x_BCHW)))

    def forward_head(self, x_BCHW: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> logits (B, K), or the pooled pre-logits features with ``pre_logits``; with
        ``global_pool=""`` per position: (B, K, H, W) (pre-logits (B, C, H, W))."""
        check_features(x_BCHW, "(B, C, H, W)", self.num_features, 1, "MaxViT forward_head")
        pre_logits = check_flag(pre_logits, "forward_head: pre_logits")
        return self.head(x_BCHW, pre_logits=pre_logits)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x_BCHW))

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups by depth, timm's MaxxVit regexes (timm.optim's layer-wise decay reads them)."""
        return dict(stem=r"^stem", blocks=[(r"^stages\.(\d+)", None), (r"^norm", (99999,))])

    def forward_intermediates(
        self,
        x_BCHW: torch.Tensor,
        indices: Optional[Union[int, Sequence[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Per-stage feature maps (timm semantics). Feature 0 is the stem, 1..S the stages.

        ``indices``: None = all, an int n = the last n, a list = those (negative from the end).
        ``norm`` applies the final norm to the last stage's map. Returns ``(final_features, [maps])`` or,
        with ``intermediates_only``, the list.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        norm = check_flag(norm, "forward_intermediates: norm")
        stop_early = check_flag(stop_early, "forward_intermediates: stop_early")
        intermediates_only = check_flag(intermediates_only, "forward_intermediates: intermediates_only")
        take, last = feature_take_indices(len(self.stages) + 1, indices)
        self._check_image(x_BCHW)
        outs = []
        x = self.stem(x_BCHW)
        if 0 in take:
            outs.append(x)
        stages = self.stages[:last] if stop_early else self.stages
        for i, stage in enumerate(stages, start=1):
            x = stage(x)
            if i in take:
                outs.append(self.norm(x) if norm and i == len(self.stages) else x)
        if output_fmt == "NHWC":
            outs = [o.permute(0, 2, 3, 1) for o in outs]
        if intermediates_only:
            return outs
        if len(stages) == len(self.stages):
            x = self.norm(x)
        return x, outs

    # ------------------------------------------------------------------ weights
    def load_timm_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True):
        """Load a timm MaxViT state dict (any wrapping; TF tables resized to this model's window)."""
        return self.load_state_dict(checkpoint_filter_fn(state_dict, self), strict=strict)

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A checkpoint of this family (timm's or ours, any window) made to fit this model's shapes."""
        return checkpoint_filter_fn(state_dict, self)


# --------------------------------------------------------------------------------------------------
# Weight converter
# --------------------------------------------------------------------------------------------------
def checkpoint_filter_fn(state_dict: dict[str, Any], model: MaxVit) -> dict[str, torch.Tensor]:
    """Adapt a timm (or zoo) MaxViT state dict to ``model``.

    Handles {"model": ...} / {"state_dict": ...} wrappers and a "module." prefix; relative-position tables
    of another window size are resized (:func:`zoo.attention.relpos.resize_rel_pos_table`, timm's
    interpolation); 1x1 conv <-> linear weights of equal size are reshaped (as timm's filter).
    """
    state_dict = unwrap_state_dict(state_dict)
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        target = own.get(key)
        if key.endswith("relative_position_bias_table") and target is not None and value.shape != target.shape:
            if value.dim() != 3 or value.shape[0] != target.shape[0]:
                raise ValueError(f"{key}: checkpoint table {tuple(value.shape)} cannot be resized to {tuple(target.shape)}")
            window = ((target.shape[1] + 1) // 2, (target.shape[2] + 1) // 2)
            value = resize_rel_pos_table(value, window)
        elif target is not None and value.dim() != target.dim() and value.numel() == target.numel() and value.dim() in (2, 4):
            value = value.reshape(target.shape)
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------------
# Registered constructors
# --------------------------------------------------------------------------------------------------
def _cfg(img_size: int, num_classes: int = 1000, in_chans: int = 3, mean=IMAGENET_MEAN, std=IMAGENET_STD, **extra):
    return {
        "input_size": (in_chans, img_size, img_size),
        "num_classes": num_classes,
        "mean": mean,
        "std": std,
        "interpolation": "bicubic",
        "crop_pct": 0.95,
        "crop_mode": "center",
        "classifier": "head.fc",
        "first_conv": "stem.conv1",
        **extra,
    }


_TF = dict(  # timm _tf_cfg(): ports of the official TensorFlow weights
    padding="same", conv_act="gelu_tanh", conv_norm_eps=1e-3, conv_expand_output=True, conv_se_ratio=0.25,
    conv_output_bias=True, transformer_act="gelu_tanh", transformer_norm_eps=1e-5, head_first=False,
    rel_pos_type="bias_tf", stem_bias=True,
)
_RW_MLP = dict(  # timm _rw_max_cfg(rel_pos_type="mlp")
    padding="", conv_act="silu", conv_norm_eps=1e-5, conv_expand_output=False, conv_se_ratio=1 / 16,
    conv_output_bias=False, transformer_act="gelu", transformer_norm_eps=1e-6, head_first=True,
    rel_pos_type="mlp", rel_pos_dim=512, stem_bias=False,
)

# The TF ports' layouts (timm model_cfgs maxvit_<size>_tf); at 384 and 512 px (maxvit_*_tf_384 / _512) the same
# layouts run at the larger size (window and grid 12 / 16), evaluated on the whole image resized ("squash",
# crop 1.0) and normalised to [-1, 1].
_TF_LAYOUTS = {
    "tiny": dict(embed_dim=(64, 128, 256, 512), depths=(2, 2, 5, 2), stem_width=64, head_hidden_size=512),
    "small": dict(embed_dim=(96, 192, 384, 768), depths=(2, 2, 5, 2), stem_width=64, head_hidden_size=768),
    "base": dict(embed_dim=(96, 192, 384, 768), depths=(2, 6, 14, 2), stem_width=64, head_hidden_size=768),
    "large": dict(embed_dim=(128, 256, 512, 1024), depths=(2, 6, 14, 2), stem_width=128, head_hidden_size=1024),
    "xlarge": dict(embed_dim=(192, 384, 768, 1536), depths=(2, 6, 14, 2), stem_width=192, head_hidden_size=1536),
}


# The rmlp ("rw") layouts (timm model_cfgs maxvit_rmlp_<size>_rw), at the sizes timm registers them; the small
# ones add layer scale on the partition blocks.
_RW_LAYOUTS = {
    "pico": dict(embed_dim=(32, 64, 128, 256), depths=(2, 2, 5, 2), stem_width=(24, 32)),
    "nano": dict(embed_dim=(64, 128, 256, 512), depths=(1, 2, 3, 1), stem_width=(32, 64)),
    "tiny": dict(embed_dim=(64, 128, 256, 512), depths=(2, 2, 5, 2), stem_width=(32, 64)),
    "small": dict(embed_dim=(96, 192, 384, 768), depths=(2, 2, 5, 2), stem_width=(32, 64), init_values=1e-6),
    "base": dict(embed_dim=(96, 192, 384, 768), depths=(2, 6, 14, 2), stem_width=(32, 64), head_hidden_size=768),
}


# timm's MaxxVit takes its block configs' fields as conv_<field> / transformer_<field> keywords (maxxvit.py
# _overlay_kwargs), and save_for_hf records them (set_input_size's partition sizes, dropout) in config.json's
# model_args: the zoo's names for the fields that have one. (The zoo's own conv_norm_eps, conv_expand_output,
# conv_output_bias and transformer_norm_eps are spelled as timm's.)
_TIMM_KWARGS = {"transformer_window_size": "window_size", "transformer_grid_size": "grid_size",
                "transformer_partition_ratio": "partition_ratio", "transformer_dim_head": "dim_head",
                "transformer_init_values": "init_values", "transformer_attn_drop": "attn_drop_rate",
                "transformer_proj_drop": "proj_drop_rate", "transformer_rel_pos_type": "rel_pos_type",
                "transformer_rel_pos_dim": "rel_pos_dim", "transformer_head_first": "head_first",
                "transformer_act_layer": "transformer_act", "conv_act_layer": "conv_act", "conv_padding": "padding",
                "conv_attn_ratio": "conv_se_ratio"}


def _create(model_args: dict[str, Any], overrides: dict[str, Any]) -> MaxVit:
    renamed = {}
    for key, value in overrides.items():
        name = _TIMM_KWARGS.get(key, key)
        if name in renamed:
            raise TypeError(f"MaxVit: {name} given twice (as {name!r} and as timm's {key})")
        renamed[name] = value
    if ("transformer_grid_size" in overrides and "transformer_window_size" not in overrides
            and renamed.get("window_size", model_args.get("window_size")) is None):
        # timm's cfg_window_size replaces both partition sizes by img_size // partition_ratio when the window size
        # is None, so a lone transformer_grid_size changes nothing there: a timm export that records one is read
        # as timm reads it (the zoo's own grid_size= sets the grid alone)
        warnings.warn(f"MaxVit: transformer_grid_size={overrides['transformer_grid_size']!r} without a window size "
                      f"is ignored, as timm ignores it (both partitions are img_size // partition_ratio); pass "
                      f"transformer_window_size too, or the zoo's grid_size=", stacklevel=3)
        del renamed["grid_size"]
    return MaxVit(**{**model_args, **renamed})


def _tf_sized(layout: str, img_size: int, kwargs) -> MaxVit:
    return _create(dict(img_size=img_size, **_TF_LAYOUTS[layout], **_TF), kwargs)


def _rw_sized(layout: str, img_size: int, kwargs) -> MaxVit:
    return _create(dict(img_size=img_size, **_RW_LAYOUTS[layout], **_RW_MLP), kwargs)


def _squash_cfg(img_size: int) -> dict:
    """timm's data config of the 384 / 512 px weights: the whole image resized, crop 1.0, [-1, 1]."""
    return _cfg(img_size, mean=INCEPTION_MEAN, std=INCEPTION_STD, crop_pct=1.0, crop_mode="squash")


@register_model(task="vision", family="maxvit", default_cfg=_cfg(64, 10))
def maxvit_debug(**kwargs) -> MaxVit:
    """Tiny TF-style MaxViT for tests and quick runs: widths 16-64, one block per stage, 2-8 heads of 8."""
    return _create(
        dict(img_size=64, num_classes=10, embed_dim=(16, 32, 48, 64), depths=(1, 1, 1, 1), stem_width=(8, 16),
             dim_head=8, head_hidden_size=64, **_TF),
        kwargs,
    )


@register_model(task="vision", family="maxvit", default_cfg=_cfg(32, 10, in_chans=1, mean=(0.5,), std=(0.5,), **DIGITS_PREPROCESSING))
def maxvit_digits(**kwargs) -> MaxVit:
    """maxvit_debug's layout for the 8x8 scikit-learn digits upsampled to 32x32, grayscale, window/grid 4.

    Trained weights ship in checkpoints/maxvit_digits (see its README.md).
    """
    return _create(
        dict(img_size=32, in_chans=1, num_classes=10, embed_dim=(16, 32, 48, 64), depths=(1, 1, 1, 1),
             stem_width=(8, 16), dim_head=8, head_hidden_size=64, window_size=4, grid_size=4, **_TF),
        kwargs,
    )


@register_model(task="vision", family="maxvit", default_cfg=_cfg(224))
def maxvit_tiny_tf_224(**kwargs) -> MaxVit:
    return _tf_sized("tiny", 224, kwargs)


@register_model(task="vision", family="maxvit", default_cfg=_cfg(224))
def maxvit_small_tf_224(**kwargs) -> MaxVit:
    return _tf_sized("small", 224, kwargs)


@register_model(task="vision", family="maxvit", default_cfg=_cfg(224))
def maxvit_base_tf_224(**kwargs) -> MaxVit:
    return _tf_sized("base", 224, kwargs)


@register_model(task="vision", family="maxvit", default_cfg=_cfg(256, mean=INCEPTION_MEAN, std=INCEPTION_STD))
def maxvit_rmlp_pico_rw_256(**kwargs) -> MaxVit:
    return _rw_sized("pico", 256, kwargs)


@register_model(task="vision", family="maxvit", default_cfg=_cfg(256, mean=INCEPTION_MEAN, std=INCEPTION_STD))
def maxvit_rmlp_nano_rw_256(**kwargs) -> MaxVit:
    return _rw_sized("nano", 256, kwargs)


@register_model(task="vision", family="maxvit", default_cfg=_cfg(224))
def maxvit_large_tf_224(**kwargs) -> MaxVit:
    return _tf_sized("large", 224, kwargs)


@register_model(task="vision", family="maxvit", default_cfg=_squash_cfg(384))
def maxvit_tiny_tf_384(**kwargs) -> MaxVit:
    return _tf_sized("tiny", 384, kwargs)


@register_model(task="vision", family="maxvit", default_cfg=_squash_cfg(512))
def maxvit_tiny_tf_512(**kwargs) -> MaxVit:
    return _tf_sized("tiny", 512, kwargs)


@register_model(task="vision", family="maxvit", default_cfg=_squash_cfg(384))
def maxvit_small_tf_384(**kwargs) -> MaxVit:
    return _tf_sized("small", 384, kwargs)


@register_model(task="vision", family="maxvit", default_cfg=_squash_cfg(512))
def maxvit_small_tf_512(**kwargs) -> MaxVit:
    return _tf_sized("small", 512, kwargs)


@register_model(task="vision", family="maxvit", default_cfg=_squash_cfg(384))
def maxvit_base_tf_384(**kwargs) -> MaxVit:
    return _tf_sized("base", 384, kwargs)


@register_model(task="vision", family="maxvit", default_cfg=_squash_cfg(512))
def maxvit_base_tf_512(**kwargs) -> MaxVit:
    return _tf_sized("base", 512, kwargs)


@register_model(task="vision", family="maxvit", default_cfg=_squash_cfg(384))
def maxvit_large_tf_384(**kwargs) -> MaxVit:
    return _tf_sized("large", 384, kwargs)


@register_model(task="vision", family="maxvit", default_cfg=_squash_cfg(512))
def maxvit_large_tf_512(**kwargs) -> MaxVit:
    return _tf_sized("large", 512, kwargs)


@register_model(task="vision", family="maxvit", default_cfg=_cfg(224, 21843, mean=INCEPTION_MEAN, std=INCEPTION_STD))
def maxvit_xlarge_tf_224(**kwargs) -> MaxVit:
    """timm's ImageNet-21k weights: a 21843-class head."""
    return _tf_sized("xlarge", 224, {"num_classes": 21843, **kwargs})


@register_model(task="vision", family="maxvit", default_cfg=_squash_cfg(384))
def maxvit_xlarge_tf_384(**kwargs) -> MaxVit:
    return _tf_sized("xlarge", 384, kwargs)


@register_model(task="vision", family="maxvit", default_cfg=_squash_cfg(512))
def maxvit_xlarge_tf_512(**kwargs) -> MaxVit:
    return _tf_sized("xlarge", 512, kwargs)


@register_model(task="vision", family="maxvit", default_cfg=_cfg(256, mean=INCEPTION_MEAN, std=INCEPTION_STD))
def maxvit_rmlp_tiny_rw_256(**kwargs) -> MaxVit:
    return _rw_sized("tiny", 256, kwargs)


@register_model(task="vision", family="maxvit", default_cfg=_cfg(224, mean=INCEPTION_MEAN, std=INCEPTION_STD))
def maxvit_rmlp_base_rw_224(**kwargs) -> MaxVit:
    return _rw_sized("base", 224, kwargs)


@register_model(task="vision", family="maxvit", default_cfg=_squash_cfg(384))
def maxvit_rmlp_base_rw_384(**kwargs) -> MaxVit:
    return _rw_sized("base", 384, kwargs)


@register_model(task="vision", family="maxvit", default_cfg=_cfg(224, mean=INCEPTION_MEAN, std=INCEPTION_STD, crop_pct=0.9))
def maxvit_rmlp_small_rw_224(**kwargs) -> MaxVit:
    return _rw_sized("small", 224, kwargs)


@register_model(task="vision", family="maxvit", default_cfg=_cfg(256, mean=INCEPTION_MEAN, std=INCEPTION_STD))
def maxvit_rmlp_small_rw_256(**kwargs) -> MaxVit:
    return _rw_sized("small", 256, kwargs)
