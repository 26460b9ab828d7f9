"""Backbones for dense prediction: ``zoo.create_model(name, features_only=True, out_indices=...)``, as timm's
``features_only`` (timm.models._features: FeatureInfo, FeatureGetterNet).

The wrapper returns a list of feature maps (B, C_i, H_i, W_i), one per index in ``out_indices`` of the model's
``feature_info`` (ViT / Agent-DeiT: blocks; MaxViT: stem and stages), computed by the model's own
``forward_intermediates``. Layers after the last index are pruned where the family supports it (the head
always goes), so the backbone holds no unused parameters. ``feature_info`` answers what detection and
segmentation necks ask: ``channels()``, ``reduction()``, ``module_name()``.

Default ``out_indices`` as timm's: the last 3 blocks for the token transformers, every tap for MaxViT.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from zoo.layers import feature_take_indices

__all__ = ["FeatureInfo", "FeatureExtractor"]


class FeatureInfo:
    """The taps a feature extractor returns: for each, ``num_chs`` (channels), ``reduction`` (stride from the
    input) and ``module`` (where it is taken), with timm's FeatureInfo accessors."""

    def __init__(self, feature_info: Sequence[dict], out_indices: Sequence[int]):
        self.info = [dict(entry) for entry in feature_info]
        for index, entry in enumerate(self.info):
            entry.setdefault("index", index)  # timm's FeatureInfo numbers its taps too
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx: Optional[Union[int, Sequence[int]]] = None):
        """``key`` of every returned tap (``idx`` None), of tap ``idx``, or of those taps."""
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [self[i][key] for i in idx]
        return self[idx][key]

    def get_dicts(self, keys: Optional[Sequence[str]] = None, idx=None):
        chosen = self.out_indices if idx is None else ([idx] if isinstance(idx, int) else list(idx))
        dicts = [self[i] for i in chosen]
        dicts = dicts if keys is None else [{k: d[k] for k in keys} for d in dicts]
        return dicts[0] if isinstance(idx, int) else dicts

    def channels(self, idx=None):
        return self.get("num_chs", idx)

    def reduction(self, idx=None):
        return self.get("reduction", idx)

    def module_name(self, idx=None):
        return self.get("module", idx)

    def __getitem__(self, item: Union[int, slice]):
        """Tap ``item``'s dict; a slice gives a list of them (timm's FeatureInfo, whose necks slice it)."""
        if isinstance(item, slice):
            return self.info[item]
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):
            raise TypeError(f"FeatureInfo: taps are indexed by an int or a slice, got {type(item).__name__}")
        if not -len(self.info) <= item < len(self.info):
            raise IndexError(f"FeatureInfo: tap {item} is out of range: the model has {len(self.info)} taps "
                             f"(0 to {len(self.info) - 1}); out_indices {self.out_indices} are the ones returned")
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)

    def __repr__(self) -> str:
        return f"FeatureInfo(out_indices={self.out_indices}, channels={self.channels()}, reduction={self.reduction()})"


def _from_timm_feature_list_keys(state_dict, prefix, *args) -> None:
    """Load-time key map from timm's ``FeatureListNet`` (the features_only form of its hierarchical models, e.g.
    MaxViT), which holds the model's top-level modules flattened into one namespace (``stages.0`` becomes
    ``stages_0``) and no ``model.`` wrapper, to this extractor's ``model.stages.0``; so a timm features_only
    state dict loads strictly. Keys already in the zoo's form are left as they are (timm's FeatureGetterNet,
    used for ViT, has the zoo's keys anyway)."""
    ours = prefix + "model."
    theirs = [k for k in state_dict if k.startswith(prefix) and not k.startswith(ours)]
    for key in theirs:
        head, _, rest = key[len(prefix):].partition(".")
        stem, _, index = head.rpartition("_")
        name = f"{stem}.{index}" if stem and index.isdigit() else head
        state_dict[f"{ours}{name}.{rest}" if rest else f"{ours}{name}"] = state_dict.pop(key)


class FeatureExtractor(nn.Module):
    """A model's ``forward_intermediates`` as a backbone: images -> [feature maps at ``out_indices``].

    Args:
        model: a zoo vision model (it has ``feature_info`` and ``forward_intermediates``).
        out_indices: taps to return: an int n = the last n, a sequence (negative from the end), None = the
            family's default (``model.default_out_indices``, else all).
        norm: apply the model's final norm to the token transformers' maps (timm's ``norm``); otherwise the
            final norm is pruned with the head.
    """

    def __init__(self, model: nn.Module, out_indices: Union[int, Sequence[int], None] = None, norm: bool = False):
        super().__init__()
        if not (hasattr(model, "feature_info") and hasattr(model, "forward_intermediates")):
            raise TypeError(f"{type(model).__name__} has no feature_info / forward_intermediates: it cannot be a "
                            f"features_only backbone")
        if out_indices is None:  # the family's default; "the last n" of a shallower model is all of it
            out_indices = getattr(model, "default_out_indices", None)
            if isinstance(out_indices, int):
                out_indices = min(out_indices, len(model.feature_info))
        take, _ = feature_take_indices(len(model.feature_info), out_indices, name="out_indices")
        info = FeatureInfo(model.feature_info, take)
        pruned = False
        if hasattr(model, "prune_intermediate_layers"):
            try:
                model.prune_intermediate_layers(take, prune_norm=not norm, prune_head=True)
                pruned = True
            except ValueError:  # a cut the family cannot make (MaxViT's stem alone): keep the layers
                pass
        if not pruned and hasattr(model, "reset_classifier"):
            model.reset_classifier(0)
        self.model = model
        self.out_indices = tuple(take)
        self.norm = bool(norm)
        self.feature_info = info
        # the model's data config (mean / std / size / crop), so that timm.data.resolve_model_data_config(backbone)
        # gives the backbone's preprocessing, as for timm's FeatureListNet (without it: ImageNet's, silently)
        cfg = getattr(model, "pretrained_cfg", None)
        if cfg is not None:
            self.pretrained_cfg = self.default_cfg = cfg
        self.grad_checkpointing = False
        self._register_load_state_dict_pre_hook(_from_timm_feature_list_keys)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the wrapped model's blocks in backward instead of storing their activations (the model's own
        ``set_grad_checkpointing``, which its ``forward_intermediates`` honours). Detection and segmentation code
        calls this on its backbone, as on timm's FeatureListNet (timm.models._features); outputs and gradients
        are unchanged, memory goes down."""
        set_model = getattr(self.model, "set_grad_checkpointing", None)
        if not callable(set_model):
            raise TypeError(f"{type(self.model).__name__} has no set_grad_checkpointing: gradient checkpointing is not "
                            f"available for this backbone")
        set_model(enable)  # validates enable
        self.grad_checkpointing = bool(enable)

    def forward(self, x_BCHW: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x_BCHW, indices=list(self.out_indices), norm=self.norm,
                                                stop_early=True, intermediates_only=True)

