"""``zoo viz mask`` (zoo/mask_viz.py): the tile counts it prints equal the tile states reduced from the token-level
mask, the picture shows the states in their colours, and bad arguments give clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from zoo.attention import EMPTY, FULL, PARTIAL, Causal, ChunkWindow, Radial, Segments, Window
from zoo.attention.masks import _states_from_dense
from zoo.cli import main as zoo_main
from zoo.mask_viz import mask_main

FULL_RGB, PARTIAL_RGB = (0x1F, 0x4E, 0x79), (0xF4, 0xA2, 0x59)

CASES = {
    "causal": (["mask=causal", "n=300", "block=32"], Causal(), 300, 32),
    "window": (["mask=window", "left=40", "right=none", "n=257", "block=16"], Window(40, None), 257, 16),
    "chunk": (["mask=chunk", "chunk=48", "left=2", "n=500"], ChunkWindow(48, 2, 0), 500, 64),
    "segments": (["mask=segments", "lengths=100,60,200", "block=32"],
                 Segments(torch.repeat_interleave(torch.arange(3), torch.tensor([100, 60, 200]))), 360, 32),
    # a point cloud's kNN attention in Z-order: the same mask as Edges.knn of the seeded sphere, re-derived here
    "knn": (["mask=knn", "n=300", "k=8", "block=32"], None, 300, 32),
    "radial": (["mask=radial", "frames=6", "tokens_per_frame=64", "sink=true", "block=32", "text=5"],
               Radial(6, 64, 1.0, True, block_size=32, text_tokens=5), 389, 32),
}


def _colour_pixels(pixels: np.ndarray, rgb: tuple[int, int, int]) -> int:
    return int((np.abs(pixels - np.array(rgb)).sum(-1) < 12).sum())


@pytest.mark.parametrize("name", list(CASES))
def test_counts_match_the_token_level_mask(name, tmp_path, capsys):
    from PIL import Image

    argv, mask, n, block = CASES[name]
    if name == "knn":
        from zoo.attention import Edges
        from zoo.geometry import morton_order

        points = torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        points = points / points.norm(dim=1, keepdim=True)
        mask = Edges.knn(points[morton_order(points)], 8)
    out = tmp_path / f"{name}.png"
    assert mask_main(argv + [f"out={out}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    dense = mask.dense(n, n)
    states = _states_from_dense(dense, block, block)[0, 0]
    want = {"empty": int((states == EMPTY).sum()), "partial": int((states == PARTIAL).sum()),
            "full": int((states == FULL).sum())}
    assert {k: summary[k] for k in want} == want
    assert (summary["q_len"], summary["k_len"], summary["block"], summary["tiles"]) == (n, n, block, states.numel())
    assert summary["kept_fraction"] == pytest.approx((want["partial"] + want["full"]) / states.numel(), abs=1e-6)
    assert summary["allowed_fraction"] == pytest.approx(float(dense.float().mean()), abs=1e-6)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 900
        pixels = np.asarray(im.convert("RGB"), dtype=np.int64)
    assert _colour_pixels(pixels, FULL_RGB) > 1000
    # PARTIAL tiles are drawn in their colour only when there are some (the legend swatch is small).
    assert (_colour_pixels(pixels, PARTIAL_RGB) > 400) == (want["partial"] > 0)


def test_large_masks_skip_the_token_panel(tmp_path, capsys):
    out = tmp_path / "w.png"
    assert mask_main(["mask=window", "left=64", "right=64", "n=8192", f"out={out}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "allowed_fraction" not in summary and summary["tiles"] == 128 * 128
    assert summary["partial"] + summary["full"] == 128 + 2 * 127  # the tridiagonal band of 64-token tiles


def test_cli_and_errors(tmp_path, capsys):
    assert zoo_main(["viz", "mask", "--help"]) == 0
    assert "zoo viz mask" in capsys.readouterr().out
    bad = {
        ("mask=diagonal",): "mask='diagonal': expected one of",
        ("mask=chunk", "lengths=3"): "mask=chunk does not take lengths",
        ("mask=chunk", "chunk=0"): "chunk=0: must be >= 1",
        ("mask=window", "left=x"): "left='x': expected an integer or none",
        ("mask=segments", "lengths=3,4", "n=9"): "segment lengths sum to 7",
        ("mask=radial", "n=100"): "leave n out",
        ("mask=radial", "sink=maybe"): "sink='maybe'",
        ("mask=knn", "order=hilbert"): "order='hilbert': expected morton or random",
        ("mask=knn", "k=0"): "k=0: must be >= 1",
        ("mask=window", "k=3"): "mask=window does not take k",
        ("tokens=sometimes",): "tokens='sometimes'",
        (f"out={tmp_path / 'a.jpg'}",): "PNG",
    }
    for argv, message in bad.items():
        out = [] if any(a.startswith("out=") for a in argv) else [f"out={tmp_path / 'x.png'}"]
        assert mask_main(list(argv) + out) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_pictures_too_large_to_draw_are_refused_before_any_work(tmp_path):
    """n=100000 block=1 asked for 10**10 tiles and failed after minutes with an 80 GB allocation error (n=1000000
    with the default block took 16 GB): refused at once, naming a block that works."""
    from zoo.mask_viz import draw_mask

    with pytest.raises(ValueError, match=r"is 10,000,000,000 tiles, more than a picture can show .*block=25 or more"):
        draw_mask(Causal(), 100_000, 100_000, 1, str(tmp_path / "m.png"))
    with pytest.raises(ValueError, match="tokens=on draws all 10000 x 10000 token pairs"):
        draw_mask(Causal(), 10_000, 10_000, 64, str(tmp_path / "m.png"), tokens="on")
    assert not (tmp_path / "m.png").exists()


# ------------------------------------------------------------------ mutation audit of the pictures (2026-12-07)
def test_documented_defaults(tmp_path, capsys):
    """The defaults the usage states: window left=128 right=0 (causal sliding window), chunk left=none right=0
    (block-causal), radial's block its own block size 128; checked against the masks built by hand."""
    from zoo.attention.radial import Radial

    for argv, mask, n, block in ((["mask=window", "n=300", "block=32"], Window(128, 0), 300, 32),
                                 (["mask=chunk", "n=200", "block=16"], ChunkWindow(64, None, 0), 200, 16),
                                 (["mask=radial", "frames=2", "tokens_per_frame=96"], Radial(2, 96, 1.0, False, block_size=128), 192, 128)):
        assert mask_main(argv + [f"out={tmp_path / 'd.png'}"]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (summary["q_len"], summary["block"]) == (n, block), argv
        assert summary["allowed_fraction"] == pytest.approx(float(mask.dense(n, n).float().mean()), abs=1e-6), argv
        states = _states_from_dense(mask.dense(n, n), block, block)[0, 0]
        assert summary["full"] == int((states == FULL).sum()) and summary["partial"] == int((states == PARTIAL).sum())


def test_tile_limit_counts_partial_tiles(tmp_path):
    """A length one token past whole tiles has one more tile row and column: 262145 tokens at block=64 are
    4097 x 4097 tiles, over the limit of 4096 x 4096, refused before any work."""
    from zoo.mask_viz import draw_mask

    with pytest.raises(ValueError, match=r"is 16,785,409 tiles, more than a picture can show"):
        draw_mask(Causal(), 262_145, 262_145, 64, str(tmp_path / "m.png"))
    assert not (tmp_path / "m.png").exists()


def test_token_panel_up_to_4096_tokens(tmp_path, capsys, monkeypatch):
    """tokens=auto draws the token-level panel when n <= 4096 (the usage's bound), not above."""
    import zoo.mask_viz as mask_viz

    monkeypatch.setattr(mask_viz, "save_figure", lambda fig, path, **kw: mask_viz.pyplot().close(fig) or path)
    for n, panel in ((4096, True), (4097, False)):
        summary = mask_viz.draw_mask(Causal(), n, n, 256, str(tmp_path / "t.png"))
        assert ("allowed_fraction" in summary) == panel, n
