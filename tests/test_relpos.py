"""Relative-position bias objects (zoo/attention/relpos.py) against timm's (timm/layers/pos_embed_rel.py)."""
from __future__ import annotations

import pytest
import timm.layers.pos_embed_rel as timm_rel
import torch

from zoo.attention import AttentionBias, attend
from zoo.attention.relpos import (
    RelPosBiasTf,
    RelPosMlp,
    log_coords,
    rel_pos_index_mlp,
    rel_pos_index_tf,
    resize_rel_pos_table,
)


@pytest.mark.parametrize("window", [(3, 3), (4, 2), (1, 5)])
def test_tf_table_matches_timm(window):
    torch.manual_seed(0)
    heads = 3
    ours = RelPosBiasTf(window, heads)
    peer = timm_rel.RelPosBiasTf(window, heads)
    peer.load_state_dict(ours.state_dict(), strict=True)
    n = window[0] * window[1]
    bias = ours.materialize(n, n, device=torch.device("cpu"), dtype=torch.float32)
    assert isinstance(ours, AttentionBias)
    assert bias.shape == (1, heads, n, n)
    torch.testing.assert_close(bias[0], peer.get_bias(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("window", [(3, 3), (2, 4)])
def test_mlp_bias_matches_timm(window):
    torch.manual_seed(0)
    heads = 4
    ours = RelPosMlp(window, heads, hidden_dim=16).eval()
    peer = timm_rel.RelPosMlp(window, heads, hidden_dim=16).eval()
    peer.load_state_dict(ours.state_dict(), strict=True)
    n = window[0] * window[1]
    torch.testing.assert_close(ours.materialize(n, n), peer.get_bias(), rtol=1e-6, atol=1e-6)
    # the buffers are non-persistent, as timm's: a state dict holds only the MLP
    assert sorted(ours.state_dict()) == ["mlp.fc1.bias", "mlp.fc1.weight", "mlp.fc2.bias", "mlp.fc2.weight"]


def test_index_and_coords_conventions():
    # TF: key - query; MLP: query - key (so the two index tables are transposes of each other)
    idx_tf, idx_mlp = rel_pos_index_tf((2, 3)), rel_pos_index_mlp((2, 3))
    assert torch.equal(idx_tf, idx_mlp.T)
    assert torch.equal(idx_mlp, timm_rel.gen_relative_position_index((2, 3)))
    coords = log_coords((2, 3))
    expected = timm_rel.gen_relative_log_coords((2, 3), mode="cr")
    torch.testing.assert_close(coords, expected)


@pytest.mark.parametrize(
    "src,dst",
    [((2, 2), (4, 4)), ((4, 4), (7, 7)), ((7, 7), (4, 4)), ((3, 5), (6, 2)), ((7, 7), (12, 12)),
     ((7, 7), (7, 12)), ((3, 3), (3, 5)), ((4, 6), (2, 6))],  # one axis unchanged: timm re-samples it too
)
def test_resize_matches_timm(src, dst):
    torch.manual_seed(0)
    table = torch.randn(2, 2 * src[0] - 1, 2 * src[1] - 1)
    ours = resize_rel_pos_table(table, dst)
    peer = timm_rel.resize_rel_pos_bias_table(table, new_window_size=dst, new_bias_shape=(2, 2 * dst[0] - 1, 2 * dst[1] - 1))
    assert ours.shape == (2, 2 * dst[0] - 1, 2 * dst[1] - 1)
    torch.testing.assert_close(ours, peer, rtol=1e-5, atol=1e-5)


def test_resize_identity_and_errors():
    table = torch.randn(2, 5, 5)
    assert resize_rel_pos_table(table, (3, 3)) is table
    with pytest.raises(ValueError, match="float tensor"):
        resize_rel_pos_table(torch.randn(5, 5), (3, 3))
    with pytest.raises(ValueError, match="odd"):
        resize_rel_pos_table(torch.randn(2, 4, 4), (3, 3))
    with pytest.raises(ValueError, match="window_size"):
        resize_rel_pos_table(table, (0, 3))
    from zoo.attention import RelPosBiasTf, RelPosMlp

    for cls in (RelPosMlp, RelPosBiasTf):  # a float window was "'float' object is not iterable"
        with pytest.raises(ValueError, match="window_size must be a positive int or a pair of them, got 2.5"):
            cls(2.5, 2)


def test_set_window_size_and_state_dict_from_other_window():
    torch.manual_seed(0)
    small = RelPosBiasTf((2, 2), 2)
    big = RelPosBiasTf((4, 4), 2)
    big.load_state_dict(small.state_dict(), strict=True)  # resized on load
    expected = resize_rel_pos_table(small.relative_position_bias_table.detach(), (4, 4))
    torch.testing.assert_close(big.relative_position_bias_table.detach(), expected)
    small.set_window_size(4)
    torch.testing.assert_close(small.relative_position_bias_table.detach(), expected)
    assert small.materialize(16, 16).shape == (1, 2, 16, 16)
    mlp = RelPosMlp((2, 2), 2, hidden_dim=8)
    before = mlp.state_dict()
    mlp.set_window_size((3, 2))
    assert mlp.materialize(6, 6).shape == (1, 2, 6, 6)
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())


def test_set_window_size_keeps_a_frozen_table_frozen():
    """A frozen table (requires_grad=False: frozen backbone, linear probing) stays frozen when the window changes,
    and a trainable one stays trainable (the resized table is a new Parameter)."""
    frozen = RelPosBiasTf((4, 2), 2)
    frozen.relative_position_bias_table.requires_grad_(False)
    trainable = RelPosBiasTf((4, 2), 2)
    for bias in (frozen, trainable):
        bias.set_window_size(6)
        assert bias.relative_position_bias_table.shape == (2, 11, 11)
    assert not frozen.relative_position_bias_table.requires_grad
    assert trainable.relative_position_bias_table.requires_grad


def test_wrong_length_raises():
    bias = RelPosBiasTf((2, 2), 2)
    with pytest.raises(ValueError, match="2x2 window"):
        bias.materialize(5, 5)
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="2x2 window"):
        attend(q, q, q, bias=bias)


@pytest.mark.parametrize("cls", [RelPosBiasTf, RelPosMlp])
def test_gradients_reach_parameters_through_attend(cls):
    torch.manual_seed(0)
    bias = cls((2, 3), 2).double().eval()  # eval: RelPosMlp has dropout
    q, k, v = (torch.randn(3, 2, 6, 4, dtype=torch.float64) for _ in range(3))
    params = [p for p in bias.parameters()]

    out = attend(q, k, v, bias=bias, backend="torch")
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    # the gradient of the table/MLP matches finite differences (float64)
    p0 = params[0]
    direction = torch.randn_like(p0)
    eps = 1e-6
    with torch.no_grad():
        p0 += eps * direction
        plus = attend(q, k, v, bias=bias, backend="torch").square().sum()
        p0 -= 2 * eps * direction
        minus = attend(q, k, v, bias=bias, backend="torch").square().sum()
        p0 += eps * direction
    numeric = (plus - minus) / (2 * eps)
    torch.testing.assert_close(numeric, (p0.grad * direction).sum(), rtol=1e-5, atol=1e-7)


def test_table_from_another_window_loads_into_a_meta_model_with_assign():
    """load_state_dict(..., assign=True) of a model built on meta (torch's low-memory load) moved the checkpoint's
    table to meta before resizing it, so the installed table had no values and the forward raised."""
    source = RelPosBiasTf((3, 3), 2)
    with torch.no_grad():
        source.relative_position_bias_table.normal_()
    with torch.device("meta"):
        target = RelPosBiasTf((4, 4), 2)
    target.load_state_dict(source.state_dict(), assign=True)
    table = target.relative_position_bias_table
    assert not table.is_meta
    torch.testing.assert_close(table, resize_rel_pos_table(source.relative_position_bias_table.detach(), (4, 4)))


def test_float64_tables_resize_in_float64_and_bools_are_not_head_counts():
    """resize_rel_pos_table and log_coords computed in fp32 whatever the dtype (1e-7 off a float64 linear map, so
    gradcheck failed); num_heads=True passed the checks and failed inside torch.empty."""
    table = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: resize_rel_pos_table(t, (5, 2)), (table,))
    coords = log_coords((4, 3), dtype=torch.float64)
    d = torch.arange(-3, 4, dtype=torch.float64)
    torch.testing.assert_close(coords[:, 1, 0], torch.sign(d) * torch.log1p(d.abs()), rtol=0, atol=1e-15)
    for make in (lambda: RelPosBiasTf(3, num_heads=True), lambda: RelPosMlp(3, num_heads=True),
                 lambda: RelPosMlp(3, 2, hidden_dim=True)):
        with pytest.raises(ValueError, match="must be a positive int, got True"):
            make()


@pytest.mark.parametrize("cls", [RelPosBiasTf, RelPosMlp])
@pytest.mark.parametrize("q_len,k_len", [(4, 5), (5, 4), (1, 4)])
def test_one_length_off_the_window_is_enough_to_raise(cls, q_len, k_len):
    """A window bias is built for N = Wh * Ww queries and keys: materialize() refuses a call where either length
    differs (not only both), instead of returning an (N, N) bias for another problem size."""
    bias = cls((2, 2), 2)
    with pytest.raises(ValueError, match="2x2 window"):
        bias.materialize(q_len, k_len)
    assert bias.materialize(4, 4).shape == (1, 2, 4, 4)


@pytest.mark.parametrize(
    "cls,src,dst",
    [(RelPosBiasTf, (3, 3), (2, 4)), (RelPosBiasTf, (3, 3), (4, 2)), (RelPosBiasTf, (2, 4), (4, 2)),
     (RelPosMlp, (2, 2), (2, 3)), (RelPosMlp, (3, 2), (3, 4))],
)
def test_set_window_size_to_a_non_square_window_equals_timm_built_for_it(cls, src, dst):
    """set_window_size() to a window that is not square (or that changes only its width) gives the bias of timm's
    module built for the new window, loaded with the same weights (the TF table resized by timm's
    resize_rel_pos_bias_table). Square windows, and width-preserving changes, hid a transposed index and a width
    change that kept the old offset tables."""
    torch.manual_seed(0)
    ours = cls(src, 2, hidden_dim=8).eval() if cls is RelPosMlp else cls(src, 2)
    if cls is RelPosBiasTf:
        with torch.no_grad():
            ours.relative_position_bias_table.normal_()
        sd = {"relative_position_bias_table": timm_rel.resize_rel_pos_bias_table(
            ours.relative_position_bias_table.detach(), new_window_size=dst,
            new_bias_shape=(2, 2 * dst[0] - 1, 2 * dst[1] - 1))}
        peer = timm_rel.RelPosBiasTf(dst, 2)
    else:
        sd = {k: v.clone() for k, v in ours.state_dict().items()}
        peer = timm_rel.RelPosMlp(dst, 2, hidden_dim=8).eval()
    peer.load_state_dict(sd, strict=True)
    ours.set_window_size(dst)
    assert ours.window_size == dst
    n = dst[0] * dst[1]
    torch.testing.assert_close(ours.materialize(n, n)[0], peer.get_bias().reshape(2, n, n), rtol=1e-5, atol=1e-5)


def test_fresh_table_has_timm_init():
    """A new RelPosBiasTf table is N(0, 0.02^2), as timm's RelPosBiasTf (nn.init.normal_(..., std=.02)) and the
    official MaxViT code: a model trained from scratch starts from the same biases."""
    torch.manual_seed(0)
    table = RelPosBiasTf((16, 16), 8).relative_position_bias_table.detach()  # 7688 draws: std within ~2%
    assert abs(float(table.std()) - 0.02) < 0.002 and abs(float(table.mean())) < 0.002
