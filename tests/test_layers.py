"""zoo.layers: the small layers shared by the model families (checked against timm's equivalents)."""
from __future__ import annotations

import pytest
import torch
from timm.layers import DropPath as TimmDropPath
from timm.layers import LayerScale as TimmLayerScale

from zoo.layers import DropPath, LayerScale, check_finite_input, is_tracing, to_pair


def test_to_pair_accepts_ints_and_pairs_and_names_bad_values():
    assert to_pair(7, "img_size") == (7, 7)
    assert to_pair((3, 5), "img_size") == (3, 5)
    for bad in (0, -1, (1, 2, 3), (2, 0), True, (1.5, 2)):
        with pytest.raises(ValueError, match="img_size must be a positive int or a pair"):
            to_pair(bad, "img_size")


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
