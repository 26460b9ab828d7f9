"""Agent attention: softmax attention routed through a few pooled "agent" tokens.

Paper: Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention" (ECCV 2024,
arXiv:2312.08874). Official code: LeapLabTHU/Agent-Attention @207ce3e,
agent_transformer/models/agent_deit.py ``AgentAttention`` -- parameter names, shapes, init and the
forward below follow it, so an official state dict loads unchanged and gives the same output.

For tokens x (P prefix tokens -- the class token -- then L = Gh*Gw patch tokens on a grid):

    q, k, v    = split(qkv(x))                                   per head
    A          = AdaptiveAvgPool2d(sqrt(n))(q of the patch tokens)  n agent tokens, head-split like q
    agent_v    = softmax(scale * A K^T + B1) V                    agent aggregation  (n x N)
    out        = softmax(scale * Q A^T + B2) agent_v              agent broadcast    (N x n)
    out[patch] += dwc(V[patch] as an image)                       3x3 depthwise conv (with bias)
    y          = proj(out)

Both softmax stages are :func:`zoo.attention.attend` calls with an additive bias, so every backend
(reference, SDPA, Triton) serves them. The cost is O(N n) instead of O(N^2).

Biases (learned, all initialised trunc-normal(0.02) as in the official code):

* B1 (n x N): ``an_bias`` [H, n, 7, 7] resized bilinearly (``align_corners=False``, F.interpolate's
  default) to the token grid, plus ``ah_bias`` [1, H, n, win, 1] + ``aw_bias`` [1, H, n, 1, win]; the
  class-token column is ``ac_bias`` [1, H, n, 1].
* B2 (N x n): ``na_bias`` resized the same way and transposed, plus ``ha_bias`` [1, H, win, 1, n] +
  ``wa_bias`` [1, H, 1, win, n]; the class-token row is ``ca_bias`` [1, H, 1, n].

Beyond the official module (which only runs at the square grid ``window x window`` it was built for):
any token grid Gh x Gw, square or not. ``an_bias``/``na_bias`` are resized to (Gh, Gw) directly, and the
row/column tables are resized along their axis with 1-D linear interpolation (``align_corners=False``);
at Gh = Gw = window this is the identity, so the official result is unchanged. Agents are pooled from
any grid (adaptive average pooling). When no gradient is needed the two bias tensors are cached per
(grid, dtype, inference mode) on the module's device (``.to()`` clears the cache) and rebuilt when a bias
parameter changes (tracked through tensor version counters).
The official code also re-interpolates the biases and repeats them per batch item on every call; here
they are built once per call at most (training: once per block call, as the tables change every step)
and broadcast over the batch, already summed into one (1, H, n, N) and one (1, H, N, n) tensor.

Inference fast path (no_grad/inference_mode, not exporting, not capturing): the two stages skip attend()'s
per-call NaN sums; the module checks its output once instead (``check_finite``; Agent-DeiT checks its image
once and turns it off). When attend() would hand both stages straight to SDPA (zoo.attention.backends:
sdpa_runs_plain_calls, sdpa_biased) the module makes that call itself, decided once per forward; otherwise
(a backend context, the environment, another backend, autocast dtypes) it calls attend(). That path
(``_mix_inference``: the output before the projection) is also what Agent-DeiT's fused inference blocks call.
Measured alternatives that were slower on this CPU and are not used: the pooling-matrix matmul instead of
adaptive_avg_pool2d (3-5x slower), a contiguous or channels-last copy before the depthwise conv, explicit
matmul+softmax instead of SDPA, contiguous copies of q/k/v for SDPA (see docs/bench_agent.md).

Letters: B batch, C model dim, H heads, D = C / H head dim, P prefix tokens (0 or 1), L = Gh*Gw patch
tokens on a Gh x Gw grid, N = P + L tokens, n agents (a square number), p = sqrt(n), W the ``window``
the row/column bias tables were built for.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.attention import backends as _backends
from zoo.attention import capture as _capture
from zoo.attention.core import attend
from zoo.attention.masks import cache_put
from zoo.layers import (
    CachesDroppedWhenCopied, check_finite_input, check_like_weights, check_rates, is_tracing, surely_finite, to_pair,
    weights_kept_alive, weights_stamp,
)

__all__ = ["AgentAttention", "agent_biases", "adaptive_pool_matrix"]

BIAS_NAMES = ("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias", "ac_bias", "ca_bias")




def tracing_or_exporting() -> bool:
    """zoo.layers.is_tracing(), or inside torch.onnx.export (either exporter): no data-dependent Python."""
    return is_tracing() or torch.onnx.is_in_onnx_export()


def _resize_1d(table: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Linearly resample ``table`` along ``dim`` to ``size`` (align_corners=False); identity when equal."""
    if table.shape[dim] == size:
        return table
    ndim = table.dim()
    dim = dim % ndim
    perm = [i for i in range(ndim) if i != dim] + [dim]  # explicit non-negative perms (ONNX Transpose)
    inverse = [perm.index(i) for i in range(ndim)]
    moved = table.permute(perm)
    lead = moved.shape[:-1]
    out = F.interpolate(moved.reshape(1, -1, moved.shape[-1]), size=size, mode="linear", align_corners=False)
    return out.reshape(*lead, size).permute(inverse)


def adaptive_pool_matrix(grid: tuple[int, int], out_size: int, prefix: int = 0,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(p*p, prefix + Gh*Gw) matrix M with M @ tokens == AdaptiveAvgPool2d(p) of the patch grid (prefix columns 0).

    Built in float64 and returned in ``dtype`` (AgentAttention asks for float64 and casts it to its tokens'
    dtype, so a float64 model pools with exact 1/6 weights, not fp32-rounded ones).

    Bin i of an axis of length S covers [floor(i*S/p), ceil((i+1)*S/p)), as torch's adaptive pooling, so
    the result is the same for any grid (smaller than p too). Used when exporting (ONNX has no general
    adaptive pooling).
    """
    gh, gw = grid

    def axis(size: int) -> torch.Tensor:
        weights = torch.zeros(out_size, size, dtype=torch.float64)
        for i in range(out_size):
            start, stop = (i * size) // out_size, -((-(i + 1) * size) // out_size)
            weights[i, start:stop] = 1.0 / (stop - start)
        return weights

    rows_ph, cols_pw = axis(gh), axis(gw)
    pool = torch.einsum("ah,bw->abhw", rows_ph, cols_pw).reshape(out_size * out_size, gh * gw)
    if prefix:
        pool = torch.cat((torch.zeros(out_size * out_size, prefix, dtype=pool.dtype), pool), dim=1)
    return pool.to(dtype)


def agent_biases(
    an_bias: torch.Tensor,
    na_bias: torch.Tensor,
    ah_bias: torch.Tensor,
    aw_bias: torch.Tensor,
    ha_bias: torch.Tensor,
    wa_bias: torch.Tensor,
    ac_bias: Optional[torch.Tensor],
    ca_bias: Optional[torch.Tensor],
    grid: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two additive biases of agent attention for a Gh x Gw token grid.

    Returns:
        B1 (1, H, n, P + L): agent aggregation bias (agents attend to tokens).
        B2 (1, H, P + L, n): agent broadcast bias (tokens attend to agents).
        P is 1 when ``ac_bias``/``ca_bias`` are given (class token first), else 0.
    """
    gh, gw = grid
    heads, n = an_bias.shape[0], an_bias.shape[1]
    an_1HnL = F.interpolate(an_bias, size=(gh, gw), mode="bilinear").reshape(1, heads, n, gh * gw)
    na_1HnL = F.interpolate(na_bias, size=(gh, gw), mode="bilinear").reshape(1, heads, n, gh * gw)
    rows_col_1HnL = (_resize_1d(ah_bias, gh, 3) + _resize_1d(aw_bias, gw, 4)).reshape(1, heads, n, gh * gw)
    rows_col_1HLn = (_resize_1d(ha_bias, gh, 2) + _resize_1d(wa_bias, gw, 3)).reshape(1, heads, gh * gw, n)
    b1 = an_1HnL + rows_col_1HnL
    b2 = na_1HnL.transpose(-1, -2) + rows_col_1HLn
    if ac_bias is not None:
        b1 = torch.cat((ac_bias, b1), dim=-1)
        b2 = torch.cat((ca_bias, b2), dim=-2)
    return b1.contiguous(), b2.contiguous()


def _rank4_format_for_5d_tables(fn):
    """``fn`` (what ``nn.Module.to`` / ``.cuda()`` / ``.half()`` apply to each tensor) made to work on the 5-D
    row/column bias tables under a 4-D memory format.

    ``model.to(memory_format=torch.channels_last)`` -- what timm's train.py ``--channels-last`` runs -- gives the
    format to every 4-D and 5-D tensor (torch/nn/modules/module.py ``Module.to``), and ``channels_last`` refuses
    rank 5: the official ``ah_bias`` / ``aw_bias`` / ``ha_bias`` / ``wa_bias`` (1, H, ., ., .) would make the call
    fail, where it works on every timm model (they have no 5-D tensors). A 5-D tensor that ``fn`` refuses is
    converted through its 4-D view (the leading size-1 axis merged into the heads), so it gets the device and
    dtype asked for, and comes back 5-D and contiguous (a valid layout for the broadcasts that read it); the 4-D
    tensors (``an_bias``, ``na_bias``, the depthwise conv) take the format as on any model. Any other failure
    is raised as it was."""

    def apply(tensor):
        try:
            return fn(tensor)
        except RuntimeError as error:
            if tensor.dim() != 5:
                raise
            refused = error
        try:
            return fn(tensor.flatten(0, 1)).reshape(tensor.shape).contiguous()
        except RuntimeError:
            raise refused from None

    return apply


class AgentAttention(CachesDroppedWhenCopied, nn.Module):
    """Agent attention over P prefix tokens followed by a Gh x Gw grid of patch tokens.

    Args:
        dim: C, the token width.
        num_heads: H (``dim`` must be divisible by it).
        qkv_bias: bias in the fused q/k/v projection (the official DeiT models use True).
        attn_drop: dropout on both attention probability maps (training only).
        proj_drop: dropout after the output projection.
        agent_num: n, the number of agent tokens; a square number (pooled to sqrt(n) x sqrt(n)).
        window: W, the grid side the row/column bias tables are built for (official: img_size // patch).
        num_prefix_tokens: 1 (a class token first, with its own bias row/column, as the official model)
            or 0 (patch tokens only; ``ac_bias``/``ca_bias`` are then absent).
        bias_grid: side of the ``an_bias``/``na_bias`` tables (7 in the official code).

    State dict (official order): an_bias, na_bias, ah_bias, aw_bias, ha_bias, wa_bias, ac_bias, ca_bias,
    qkv.{weight,bias}, proj.{weight,bias}, dwc.{weight,bias}.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        agent_num: int = 49,
        window: int = 14,
        num_prefix_tokens: int = 1,
        bias_grid: int = 7,
    ):
        super().__init__()
        for name, value in (("dim", dim), ("num_heads", num_heads), ("agent_num", agent_num), ("window", window),
                            ("bias_grid", bias_grid)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"AgentAttention: {name} must be a positive int, got {value!r}")
        if dim % num_heads:
            raise ValueError(f"AgentAttention: dim ({dim}) must be divisible by num_heads ({num_heads})")
        pool = math.isqrt(agent_num)
        if pool * pool != agent_num:
            raise ValueError(f"AgentAttention: agent_num must be a square number (agents form a grid), got {agent_num}")
        # type(...) is int: 1.0 and True compare equal to 1 but broke every forward later (range() of a float)
        if type(num_prefix_tokens) is not int or num_prefix_tokens not in (0, 1):
            raise ValueError(f"AgentAttention: num_prefix_tokens must be 0 or 1, got {num_prefix_tokens!r}")
        check_rates(**{"AgentAttention: attn_drop": attn_drop, "AgentAttention: proj_drop": proj_drop})
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.agent_num = agent_num
        self.pool_size = pool
        self.window = window
        self.num_prefix_tokens = num_prefix_tokens
        self.attn_drop = float(attn_drop)

        # Bias tables first: the official module registers them as its own parameters, which state_dict()
        # lists before the submodules' (qkv, proj, dwc).
        heads, n = num_heads, agent_num
        self.an_bias = nn.Parameter(torch.zeros(heads, n, bias_grid, bias_grid))
        self.na_bias = nn.Parameter(torch.zeros(heads, n, bias_grid, bias_grid))
        self.ah_bias = nn.Parameter(torch.zeros(1, heads, n, window, 1))
        self.aw_bias = nn.Parameter(torch.zeros(1, heads, n, 1, window))
        self.ha_bias = nn.Parameter(torch.zeros(1, heads, window, 1, n))
        self.wa_bias = nn.Parameter(torch.zeros(1, heads, 1, window, n))
        if num_prefix_tokens:
            self.ac_bias = nn.Parameter(torch.zeros(1, heads, n, 1))
            self.ca_bias = nn.Parameter(torch.zeros(1, heads, 1, n))
        else:
            self.ac_bias = None
            self.ca_bias = None
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self._bias_cache: dict = {}
        self._pool_cache: dict = {}
        self.reset_bias_parameters()

    def reset_bias_parameters(self) -> None:
        """trunc-normal(std 0.02) init of the bias tables (the official init)."""
        for name in BIAS_NAMES:
            param = getattr(self, name)
            if param is not None:
                nn.init.trunc_normal_(param, std=0.02)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, agent_num={self.agent_num}, window={self.window}, "
                f"num_prefix_tokens={self.num_prefix_tokens}")

    def _apply(self, fn, *args, **kwargs):  # .to() / .half() / .cuda(): drop cached biases
        self._bias_cache = {}
        self._pool_cache = {}
        return super()._apply(_rank4_format_for_5d_tables(fn), *args, **kwargs)

    # pickle / torch.save(model) / copy.deepcopy (EMA, export): without the per-size bias and pooling tables,
    # rebuilt on the next call (an Agent-DeiT-tiny that had served 8 image sizes saved at 65 MB instead of 23 MB)
    _copied_without = {"_bias_cache": dict, "_pool_cache": dict}

    def set_window(self, window: int) -> None:
        """Rebuild the row/column bias tables (ah/aw/ha/wa) for another ``window``, resampled along their axis
        as a checkpoint for another image size is (linear, align_corners=False; identity at the same size)."""
        if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
            raise ValueError(f"AgentAttention: window must be a positive int, got {window!r}")
        if window == self.window:
            return
        with torch.no_grad():
            for name, axis in (("ah_bias", 3), ("aw_bias", 4), ("ha_bias", 2), ("wa_bias", 3)):
                old = getattr(self, name)
                resized = _resize_1d(old.detach(), window, axis)
                setattr(self, name, nn.Parameter(resized, requires_grad=old.requires_grad))
        self.window = window
        self._bias_cache = {}

    # ------------------------------------------------------------------ biases
    def _bias_params(self) -> list[Optional[torch.Tensor]]:
        return [getattr(self, name) for name in BIAS_NAMES]

    def biases(
        self, grid: tuple[int, int], dtype: Optional[torch.dtype] = None, tracing: Optional[bool] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B1 (1, H, n, N), B2 (1, H, N, n)) for a Gh x Gw grid, cached when no gradient is needed.

        ``tracing``: the caller's tracing_or_exporting(), when it has it (saves the check)."""
        params = self._bias_params()
        dtype = dtype or self.an_bias.dtype
        needs_grad = torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)
        if needs_grad or (tracing_or_exporting() if tracing is None else tracing):
            b1, b2 = agent_biases(*params, grid=grid)
            return b1.to(dtype), b2.to(dtype)
        # Keyed on the parameters' weights_stamp (replaced, stepped, loaded) and inference mode; .to()/.half() clear
        # the cache in _apply. The entry keeps the tensors it was built from alive (see weights_stamp).
        versions = weights_stamp(*params)
        key = (tuple(grid), dtype, torch.is_inference_mode_enabled())  # one entry each: no thrashing between them
        hit = self._bias_cache.get(key)
        if hit is not None and hit[0] == versions:
            return hit[1], hit[2]
        with torch.no_grad():
            b1, b2 = agent_biases(*params, grid=grid)
            b1, b2 = b1.to(dtype), b2.to(dtype)
        cache_put(self._bias_cache, key, (versions, b1, b2, weights_kept_alive(*params)), limit=8)  # a few sizes; safe across threads
        return b1, b2

    def pool_matrix(self, grid: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """The (n, N) adaptive-average-pooling matrix of the patch grid (a constant), cached per grid. Not cached
        while torch.compile / export traces: a write to the module's state there is a side effect Dynamo refuses
        inside a checkpointed block (set_grad_checkpointing with fullgraph=True) and guards on otherwise."""
        key = (tuple(grid), like.device, like.dtype)
        pool = self._pool_cache.get(key)
        if pool is None:
            pool = adaptive_pool_matrix(grid, self.pool_size, self.num_prefix_tokens, torch.float64).to(
                like.device, like.dtype)
            if not tracing_or_exporting():
                cache_put(self._pool_cache, key, pool, limit=8)
        return pool

    # ------------------------------------------------------------------ forward
    def _grid_of(self, n_tok: int, grid: Optional[Sequence[int]]) -> tuple[int, int]:
        n_patch = n_tok - self.num_prefix_tokens
        if grid is None:
            side = math.isqrt(max(n_patch, 0))
            if n_patch <= 0 or side * side != n_patch:
                raise ValueError(
                    f"AgentAttention: {n_tok} tokens minus {self.num_prefix_tokens} prefix tokens is not a square "
                    f"grid; pass grid=(rows, cols)"
                )
            return side, side
        gh, gw = to_pair(grid, "AgentAttention: grid")  # (3.7, 3.2), "33" or (3, 3, 5) used to pass as (3, 3)
        if gh * gw != n_patch:
            raise ValueError(
                f"AgentAttention: grid {tuple(grid)} has {gh * gw} cells but the input has {n_patch} patch tokens "
                f"({n_tok} tokens, {self.num_prefix_tokens} prefix)"
            )
        return gh, gw

    def _project(self, x_BNC: torch.Tensor, grid: tuple[int, int], tracing: bool):
        """(q, k, v) (B, N, C) strided views of the fused qkv output, and the agents a (B, n, C).

        Agents: adaptive average pooling of the patch queries on their grid, read through a strided (B, C, Gh, Gw)
        view of the fused qkv output (faster than the equivalent pooling matmul on CPU). Exporters get the same
        pooling as one (n, N) @ (N, C) matmul (ONNX has no adaptive pooling for grids that p does not divide)."""
        batch, n_tok, dim = x_BNC.shape
        qkv_BN3C = self.qkv(x_BNC).view(batch, n_tok, 3, dim)
        q_BNC, k_BNC, v_BNC = qkv_BN3C.unbind(2)
        if tracing:
            a_BnC = torch.matmul(self.pool_matrix(grid, q_BNC), q_BNC)
        else:
            q_BCGG = q_BNC[:, self.num_prefix_tokens:].reshape(batch, grid[0], grid[1], dim).permute(0, 3, 1, 2)
            a_BCpp = F.adaptive_avg_pool2d(q_BCGG, self.pool_size)
            a_BnC = a_BCpp.permute(0, 2, 3, 1).reshape(batch, self.agent_num, dim)
        return q_BNC, k_BNC, v_BNC, a_BnC

    def _stage_inputs(self, x_BNC: torch.Tensor, grid: tuple[int, int], num_queries: Optional[int], tracing: bool):
        """The two stages' inputs, heads split as views: q (B, H, N or num_queries, D), k, v (B, H, N, D), the agents
        a (B, H, n, D), the biases B1 (1, H, n, N) and B2 (1, H, N or num_queries, n), and v (B, N, C) for the
        depthwise conv."""
        batch, n_tok, _ = x_BNC.shape
        heads, head_dim = self.num_heads, self.head_dim
        q_BNC, k_BNC, v_BNC, a_BnC = self._project(x_BNC, grid, tracing)
        a_BHnD = a_BnC.reshape(batch, self.agent_num, heads, head_dim).transpose(1, 2)
        k_BHND = k_BNC.view(batch, n_tok, heads, head_dim).transpose(1, 2)
        v_BHND = v_BNC.view(batch, n_tok, heads, head_dim).transpose(1, 2)
        b1_1HnN, b2_1HNn = self.biases(grid, x_BNC.dtype, tracing)
        if num_queries is None:
            q_BHND = q_BNC.view(batch, n_tok, heads, head_dim).transpose(1, 2)
        else:
            q_BHND = q_BNC[:, :num_queries].reshape(batch, num_queries, heads, head_dim).transpose(1, 2)
            b2_1HNn = b2_1HNn[:, :, :num_queries]
        return q_BHND, k_BHND, v_BHND, a_BHnD, b1_1HnN, b2_1HNn, v_BNC

    def _add_dwc(self, out_BNC: torch.Tensor, v_BNC: torch.Tensor, grid: tuple[int, int], tracing: bool) -> torch.Tensor:
        """out + the depthwise 3x3 conv of the patch values (prefix rows unchanged); in place without autograd.

        The conv sees V as a channels-last image. The patch rows of V are copied into one contiguous (B, L, C)
        block first (a few us): oneDNN's depthwise kernel takes a truly channels-last input directly, whereas the
        strided view out of the fused qkv output (row stride 3C, batch stride N * 3C) sends batches > 1 to a
        reorder path 8-12x slower (224 px batch 8: 0.92 ms -> 0.12 ms per block; docs/bench_agent.md)."""
        batch, _, dim = v_BNC.shape
        prefix, (gh, gw) = self.num_prefix_tokens, grid
        v_BCGG = v_BNC[:, prefix:].contiguous().view(batch, gh, gw, dim).permute(0, 3, 1, 2)
        dwc_BLC = self.dwc(v_BCGG).permute(0, 2, 3, 1).reshape(batch, gh * gw, dim)
        if prefix == 0:
            return out_BNC + dwc_BLC
        if tracing or (torch.is_grad_enabled() and (out_BNC.requires_grad or dwc_BLC.requires_grad)):
            return torch.cat((out_BNC[:, :prefix], out_BNC[:, prefix:] + dwc_BLC), dim=1)
        # no autograd: in place (not "+=", whose __setitem__ copies the view onto itself)
        out_BNC[:, prefix:].add_(dwc_BLC)
        return out_BNC

    def _mix_inference(self, x_BNC: torch.Tensor, grid: tuple[int, int], num_queries: Optional[int] = None,
                       sdpa_plain: bool = False) -> torch.Tensor:
        """The attention's output before the projection, (B, N or num_queries, C), on the inference fast path.

        For callers that have checked the input and the mode once (forward's fast path; AgentBlock's inference
        path, which adds its residual inside the projection's GEMM): no gradient, no tracing or export, no
        capture, no dropout. ``sdpa_plain``: the caller's ``sdpa_runs_plain_calls(device)``. When attend() would
        hand both stages straight to SDPA (zoo.attention.backends: sdpa_runs_plain_calls, sdpa_biased) the
        call is made here, without attend()'s per-call validation of tensors built here (3% of Agent-DeiT-Ti at
        224 px batch 1, docs/bench_agent.md); otherwise (a backend context, the environment, another backend,
        autocast dtypes) attend() is called without its per-call NaN check."""
        batch, _, dim = x_BNC.shape
        q_BHND, k_BHND, v_BHND, a_BHnD, b1_1HnN, b2_1HNn, v_BNC = self._stage_inputs(x_BNC, grid, num_queries, False)
        n_out = q_BHND.shape[2]
        if (sdpa_plain and _backends.sdpa_bias_ready(b1_1HnN, a_BHnD, k_BHND)
                and _backends.sdpa_bias_ready(b2_1HNn, q_BHND, a_BHnD)):
            agent_v_BHnD = _backends.sdpa_biased(a_BHnD, k_BHND, v_BHND, b1_1HnN, self.scale, 0.0)
            out_BHND = _backends.sdpa_biased(q_BHND, a_BHnD, agent_v_BHnD, b2_1HNn, self.scale, 0.0)
        else:
            agent_v_BHnD = attend(a_BHnD, k_BHND, v_BHND, bias=b1_1HnN, scale=self.scale, check_finite=False)
            out_BHND = attend(q_BHND, a_BHnD, agent_v_BHnD, bias=b2_1HNn, scale=self.scale, check_finite=False)
        # SDPA's CPU kernels write (B, N, H, D): the reshape is a view
        out_BNC = out_BHND.transpose(1, 2).reshape(batch, n_out, dim)
        if num_queries is None:
            out_BNC = self._add_dwc(out_BNC, v_BNC, grid, False)
        return out_BNC

    def _mix_general(self, x_BNC: torch.Tensor, grid: tuple[int, int], num_queries: Optional[int], tracing: bool,
                     capturing: bool, dropout_p: float) -> torch.Tensor:
        """The attention's output before the projection with autograd, tracing/export, capture or dropout: both
        stages through attend() (weights recorded while capturing)."""
        batch, _, dim = x_BNC.shape
        q_BHND, k_BHND, v_BHND, a_BHnD, b1_1HnN, b2_1HNn, v_BNC = self._stage_inputs(x_BNC, grid, num_queries, tracing)
        n_out = q_BHND.shape[2]
        if capturing:
            agent_v_BHnD, agent_w = attend(a_BHnD, k_BHND, v_BHND, bias=b1_1HnN, scale=self.scale,
                                           dropout_p=dropout_p, return_weights=True, check_finite=False)
            out_BHND, broadcast_w = attend(q_BHND, a_BHnD, agent_v_BHnD, bias=b2_1HNn, scale=self.scale,
                                           dropout_p=dropout_p, return_weights=True, check_finite=False)
            self._record(agent_w, broadcast_w, self.num_prefix_tokens, grid)
        else:
            agent_v_BHnD = attend(a_BHnD, k_BHND, v_BHND, bias=b1_1HnN, scale=self.scale, dropout_p=dropout_p,
                                  check_finite=False)
            out_BHND = attend(q_BHND, a_BHnD, agent_v_BHnD, bias=b2_1HNn, scale=self.scale, dropout_p=dropout_p,
                              check_finite=False)
        out_BNHD = out_BHND.transpose(1, 2)  # SDPA's CPU kernels write (B, N, H, D): the reshape is a view
        if tracing:  # exporters may decompose attention into another output layout: never assume a view
            out_BNHD = out_BNHD.clone(memory_format=torch.contiguous_format)
        out_BNC = out_BNHD.reshape(batch, n_out, dim)
        if num_queries is None:
            out_BNC = self._add_dwc(out_BNC, v_BNC, grid, tracing)
        return out_BNC

    def forward(
        self,
        x: torch.Tensor,
        grid: Optional[Sequence[int]] = None,
        num_queries: Optional[int] = None,
        check_finite: bool = True,
    ) -> torch.Tensor:
        """(B, N, C) tokens (prefix first, then the patch grid row-major) -> (B, N, C).

        Args:
            grid: (Gh, Gw) of the patch tokens; default a square grid.
            num_queries: compute only the first ``num_queries`` output tokens (prefix tokens only, e.g. 1 for
                the class token): agents, keys and values still come from every token; the broadcast stage
                runs for those rows and the depthwise conv is skipped. Returns (B, num_queries, C).
            check_finite: raise on NaN/Inf input, naming the input (on CPU, outside tracing: one fp32 sum of the
                output, standing in for attend()'s per-call checks, which would name the stages' internal q, k
                or v). Models that check their input once at the API boundary (AgentVisionTransformer) pass
                False.
        """
        x_BNC = x
        if not isinstance(x_BNC, torch.Tensor):
            raise TypeError(f"AgentAttention: input must be a (B, N, {self.dim}) tensor, got {type(x_BNC).__name__}")
        if x_BNC.dim() != 3 or x_BNC.shape[-1] != self.dim:
            raise ValueError(f"AgentAttention: input must have shape (B, N, {self.dim}), got {tuple(x_BNC.shape)}")
        if not x_BNC.is_floating_point():
            raise TypeError(f"AgentAttention: input must be a floating-point tensor, got {x_BNC.dtype}")
        check_like_weights(x_BNC, self.qkv.weight, "AgentAttention: input")
        batch, n_tok, dim = x_BNC.shape
        gh, gw = self._grid_of(n_tok, grid)
        prefix = self.num_prefix_tokens
        if num_queries is not None and not (isinstance(num_queries, int) and 1 <= num_queries <= prefix):
            raise ValueError(
                f"AgentAttention: num_queries must be an int in [1, {prefix}] (prefix tokens only), got {num_queries!r}"
            )
        tracing = tracing_or_exporting()
        capturing = _capture.is_capturing()
        dropout_p = self.attn_drop if self.training else 0.0
        # Inference fast path (no_grad / inference_mode, no export, no capture): both stages call attend()
        # without its per-call NaN check (replaced by one check per module call, below, unless
        # check_finite=False).
        fast = not (tracing or capturing or dropout_p or torch.is_grad_enabled())
        if fast:
            out_BNC = self._mix_inference(x_BNC, (gh, gw), num_queries, _backends.sdpa_runs_plain_calls(x_BNC.device.type))
        else:
            out_BNC = self._mix_general(x_BNC, (gh, gw), num_queries, tracing, capturing, dropout_p)
        if check_finite and not tracing and out_BNC.device.type == "cpu":
            # attend()'s NaN/Inf check, once per module instead of per stage, on every path (with autograd the
            # stages' own checks named their internal k): a non-finite input reaches the output (every output
            # row mixes every value), so one fp32 sum of the output covers it.
            if not surely_finite(out_BNC):
                check_finite_input(x_BNC, "AgentAttention: input")
        return self.proj_drop(self.proj(out_BNC))

    def _record(self, agent_w: torch.Tensor, broadcast_w: torch.Tensor, prefix: int, grid: tuple[int, int]) -> None:
        """While capturing: record the token-to-token map of the two stages, keep the agent maps.

        out = P2 (agent_v) = P2 P1 V, so P2 @ P1 (B, H, N, N) is the effective attention of the tokens (without
        the depthwise conv); it is recorded like any attention map (rollout works unchanged). The agent
        aggregation map P1 (B, H, n, N) and broadcast map P2 (B, H, N, n) go into the same record's ``extra``
        ("agent", "broadcast", with "grid") for agent-to-patch pictures; nothing stays on the module.
        """
        agent_w, broadcast_w = agent_w.detach(), broadcast_w.detach()
        _capture.record(self, torch.matmul(broadcast_w, agent_w), agent=agent_w, broadcast=broadcast_w, grid=grid)
