"""The float64 attention reference the attention tests compare every backend against (one copy, shared)."""
from __future__ import annotations

import math

import torch


def naive_attention(q, k, v, allowed, bias, scale, score):
    """float64, explicit: softmax (or sigmoid with -log Nk) over allowed keys; empty rows -> 0."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    s = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.double()
    allowed = allowed.expand_as(s)
    if score == "softmax":
        s = s.masked_fill(~allowed, -math.inf)
        p = torch.softmax(s, dim=-1)
        p = torch.where(allowed.any(-1, keepdim=True), p, torch.zeros_like(p))
    else:
        p = torch.sigmoid(s - math.log(k.shape[2])) * allowed
    return p @ v
