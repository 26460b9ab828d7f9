"""Attention rollout: a hand computation on a 2-layer ViT (attention probabilities recomputed from the
blocks' own weights, rolled out with the paper's 0.5 W + 0.5 I in numpy), and `zoo viz rollout`
writing a non-trivial PNG from a checkpoint."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import zoo
import zoo.tasks.vision.vit  # noqa: F401  registers the ViT names
from zoo.tasks.vision import viz


def _peaked_vit_debug(sharpen: float = 20.0, **kwargs):
    """vit_debug in eval mode with its qkv weights scaled by ``sharpen``: peaked attention, so that maps computed
    differently (another fusion, row or grid) differ visibly."""
    model = zoo.create_model("vit_debug", **kwargs).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(sharpen)
    return model


def _hand_attention_probs(model, x):
    """Per block, softmax(q k^T / sqrt(d)) computed from the block's qkv weights on its norm1 input (numpy, fp64)."""
    inputs = []
    hooks = [blk.attn.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach())) for blk in model.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    probs = []
    for blk, tokens in zip(model.blocks, inputs):
        attn = blk.attn
        t = tokens.double().numpy()
        w = attn.qkv.weight.detach().double().numpy()
        b = attn.qkv.bias.detach().double().numpy()
        qkv = t @ w.T + b  # (B, N, 3C)
        bsz, n, _ = qkv.shape
        qkv = qkv.reshape(bsz, n, 3, attn.num_heads, attn.head_dim).transpose(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(attn.head_dim)
        s = np.exp(s - s.max(-1, keepdims=True))
        probs.append(s / s.sum(-1, keepdims=True))
    return probs


def test_rollout_matches_hand_computation_on_two_layer_model():
    torch.manual_seed(0)
    model = _peaked_vit_debug(depth=2, reg_tokens=1)  # sharper attention than the tiny init gives
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    logits, maps = viz.compute_rollout(model, x)
    probs = _hand_attention_probs(model, x)
    n = probs[0].shape[-1]
    eye = np.eye(n)
    a1 = 0.5 * probs[0].mean(axis=1) + 0.5 * eye
    a2 = 0.5 * probs[1].mean(axis=1) + 0.5 * eye
    rollout = a2 @ a1  # (B, N, N)
    expected = rollout[:, 0, 2:].reshape(2, 4, 4)  # class-token row over the 4x4 patches (class + 1 register first)
    np.testing.assert_allclose(maps.numpy(), expected, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x))
    # the rollout function itself on the captured maps, and its other head fusions
    with zoo.attention.capture_attention() as records:
        with torch.no_grad():
            model(x)
    r = viz.attention_rollout([rec.weights for rec in records])
    np.testing.assert_allclose(r.numpy(), rollout, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(r.sum(-1).numpy(), np.ones((2, n)), atol=1e-12)
    r_max = viz.attention_rollout([rec.weights for rec in records], head_fusion="max")
    m1 = probs[0].max(axis=1) + eye
    m2 = probs[1].max(axis=1) + eye
    m1 /= m1.sum(-1, keepdims=True)
    m2 /= m2.sum(-1, keepdims=True)
    np.testing.assert_allclose(r_max.numpy(), m2 @ m1, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="head_fusion"):
        viz.attention_rollout([rec.weights for rec in records], head_fusion="median")


def test_rollout_without_class_token_averages_patch_rows():
    torch.manual_seed(0)
    model = zoo.create_model("vit_debug", depth=2, class_token=False, global_pool="avg").eval()
    x = torch.randn(1, 3, 32, 32)
    _, maps = viz.compute_rollout(model, x)
    probs = _hand_attention_probs(model, x)
    eye = np.eye(16)
    rollout = (0.5 * probs[1].mean(1) + 0.5 * eye) @ (0.5 * probs[0].mean(1) + 0.5 * eye)
    np.testing.assert_allclose(maps.numpy(), rollout.mean(axis=1).reshape(1, 4, 4), rtol=1e-5, atol=1e-7)


def _lightning_style_ckpt(model, path):
    state = {"model." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"model": {"name": "vit_digits", "depth": 2}}}, path)


def test_rollout_main_writes_png(tmp_path, capsys):
    from PIL import Image

    torch.manual_seed(0)
    model = zoo.create_model("vit_digits", depth=2).eval()
    ckpt = tmp_path / "last.ckpt"
    _lightning_style_ckpt(model, ckpt)
    out = tmp_path / "pics" / "rollout.png"
    assert viz.rollout_main([f"ckpt={ckpt}", "image=digits:7", f"out={out}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["out"] == str(out) and summary["label"] == 7
    x, _, _ = viz.load_image("digits:7", model)
    with torch.no_grad():
        assert summary["predicted"] == int(model(x).argmax())
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 600 and im.size[1] > 250
        pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert pixels.std() > 20.0, "the picture should not be blank"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, "expected a heat map, not a flat image"


def test_rollout_main_from_save_pretrained_dir(tmp_path, capsys):
    torch.manual_seed(0)
    model = zoo.create_model("vit_debug")
    zoo.save_pretrained(model, tmp_path / "released")
    image = tmp_path / "in.png"
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "r.png"
    assert viz.rollout_main([f"ckpt={tmp_path / 'released'}", f"image={image}", f"out={out}"]) == 0
    assert out.stat().st_size > 5000


def test_rollout_main_errors_are_clear(tmp_path, capsys):
    assert viz.rollout_main(["ckpt=" + str(tmp_path / "missing.ckpt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert viz.rollout_main(["ckpt=x", "colour=red"]) == 2
    assert "unknown argument 'colour'" in capsys.readouterr().err
    assert viz.rollout_main(["image=digits:0"]) == 2
    assert "ckpt=<checkpoint> is required" in capsys.readouterr().err
    model = zoo.create_model("vit_digits", depth=2)
    ckpt = tmp_path / "m.ckpt"
    _lightning_style_ckpt(model, ckpt)
    assert viz.rollout_main([f"ckpt={ckpt}", "image=digits:99999", f"out={tmp_path / 'a.png'}"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert viz.rollout_main([f"ckpt={ckpt}", f"out={tmp_path / 'a.jpg'}"]) == 2
    assert "PNG" in capsys.readouterr().err
    assert viz.rollout_main(["--help"]) == 0


def test_load_image_names_a_model_that_is_not_an_image_model():
    """Called directly (the `zoo viz` command guards this before), a graph model used to fail with
    "'GATNodeClassifier' object has no attribute 'img_size'"."""
    from zoo.tasks.vision.viz import load_image

    graph_model = zoo.create_model("gatv2_node", in_channels=4, num_classes=2)
    with pytest.raises(ValueError, match="gatv2_node is not an image model"):
        load_image("digits:0", graph_model)


def test_picture_commands_name_their_problems(tmp_path, capsys, monkeypatch):
    """From the pictures audit (2026-12-06): rollout on a MaxViT said 'does not match (B=4, N=16)'; maxvit
    head=7 / head=x were torch's index error and int()'s message; zoo viz graph --help exited 1; a repeated
    edge was labelled with one copy's attention only; zoo predict topk beyond the class count printed empty
    columns; a padded dynamic-size ViT's rollout used the floor grid."""
    from zoo import cli
    from zoo.tasks.graph import viz as graph_viz

    maxvit = str(zoo.hub.shipped_checkpoint("maxvit_digits"))
    assert viz.rollout_main([f"ckpt={maxvit}", f"out={tmp_path / 'r.png'}"]) == 2
    assert "for MaxViT, zoo viz maxvit draws its window and grid attention" in capsys.readouterr().err
    for arg, message in (("head=7", "head=7 is out of range: the block attention has"), ("head=x", "head='x' is not an integer"),
                         ("block=x", "block='x' is not an integer")):
        assert cli.main(["viz", "maxvit", f"ckpt={maxvit}", arg, f"out={tmp_path / 'm.png'}"]) != 0
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:  # usage, exit status 0, as the other kinds
        cli.main(["viz", "graph", "--help"])
    assert done.value.code == 0 and "Graph attention pictures" in capsys.readouterr().out
    drawn = {}
    import networkx as nx

    real = nx.draw_networkx_edge_labels
    monkeypatch.setattr(nx, "draw_networkx_edge_labels", lambda G, pos, **kw: drawn.update(kw["edge_labels"]) or real(G, pos, **kw))
    edge_index = torch.tensor([[1, 2, 2, 0], [0, 0, 0, 0]])  # 2 -> 0 twice, and a self loop
    graph_viz.draw_neighbourhood(edge_index, torch.tensor([[0.2], [0.3], [0.4], [0.1]]), 0, str(tmp_path / "g.png"))
    assert drawn == {(1, 0): "0.20", (2, 0): "0.70"}
    monkeypatch.undo()
    assert cli.main(["predict", "ckpt=" + str(zoo.hub.shipped_checkpoint("vit_digits")), "input=digits:0", "topk=20"]) == 0
    assert "top-10 predictions" in capsys.readouterr().out
    model = zoo.create_model("vit_debug", dynamic_img_size=True, dynamic_img_pad=True).eval()
    _, maps = viz.compute_rollout(model, torch.randn(1, 3, 36, 36))
    assert maps.shape == (1, 5, 5)  # 36 / 8 rounded up: the padded grid


def test_pictures_of_a_training_checkpoint_use_what_it_evaluates(tmp_path):
    """zoo viz on a zoo train .ckpt drew the raw weights (not the EMA average zoo eval / predict use and zoo train
    releases) normalised with the registry's mean/std (not the run's data.mean / data.std); zoo export of the .ckpt
    wrote the registry's mean/std into the ONNX metadata too (load_for_inference)."""
    from conftest import FAST_RUN
    from zoo.train import run

    result = run.train(run.compose([*FAST_RUN, f"run_dir={tmp_path / 'run'}", "test=false", "export=false",
                                    "task.ema_decay=0.5", "data.mean=[0.2]", "data.std=[0.3]"]))
    ckpt = result["last_ckpt"]
    drawn = viz.load_model(ckpt)
    evaluated, _ = run.load_for_inference(ckpt)
    for key, value in evaluated.state_dict().items():
        torch.testing.assert_close(drawn.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert drawn.pretrained_cfg["mean"] == evaluated.pretrained_cfg["mean"] == (0.2,)
    assert drawn.pretrained_cfg["std"] == evaluated.pretrained_cfg["std"] == (0.3,)
    stored = torch.load(ckpt, weights_only=True)["state_dict"]
    assert not torch.equal(stored["model.head.weight"], stored["model_ema.module.head.weight"])  # the EMA differs


def test_image_files_are_read_as_zoo_predict_reads_them(tmp_path):
    """zoo viz read files with its own loader: a 16-bit PNG clipped to 0/1 (convert("L")), a non-square image
    stretched. It now uses the evaluation split's reading and preprocessing (read_image, resize + centre crop)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from zoo.tasks.vision.data import load_image_file

    model = zoo.create_model("vit_digits", pretrained=True)
    digit = load_digits().images[3] / 16.0
    Image.fromarray(np.round(digit * 255).astype(np.uint8)).save(tmp_path / "d8.png")
    Image.fromarray(np.round(digit * 65535).astype(np.uint16)).save(tmp_path / "d16.png")
    x8, display8, _ = viz.load_image(str(tmp_path / "d8.png"), model)
    x16, display16, _ = viz.load_image(str(tmp_path / "d16.png"), model)
    torch.testing.assert_close(x16, x8, rtol=0, atol=2.01 / 255 / 0.5)  # the same picture, one 8-bit step apart
    assert display16.min() >= 0 and display16.max() <= 1 and np.abs(display16 - display8).max() <= 2.01 / 255
    wide = np.zeros((48, 64), dtype=np.uint8)
    wide[:, 8:56] = np.kron(np.round(digit * 255).astype(np.uint8), np.ones((6, 6), dtype=np.uint8))
    Image.fromarray(wide).save(tmp_path / "wide.png")
    cfg = model.pretrained_cfg
    want = load_image_file(tmp_path / "wide.png", 8, 1, cfg["mean"], cfg["std"])[None]
    torch.testing.assert_close(viz.load_image(str(tmp_path / "wide.png"), model)[0], want)


def test_pictures_leave_the_model_mode_and_statistics_alone():
    """From the pictures audit (2026-12-06, t7_state): compute_rollout switched a training model to eval and left it
    there; maxvit_attention_maps ran a training model as it was (BatchNorm's batch statistics: 39 running buffers
    updated, two calls on one image gave maps 0.045 apart). Both now draw the eval-mode model and restore the mode."""
    import zoo.tasks.vision.maxvit  # noqa: F401  registers the MaxViT names
    from zoo.tasks.vision.viz_maxvit import maxvit_attention_maps

    torch.manual_seed(0)
    vit = zoo.create_model("vit_debug", drop_rate=0.5).train()
    x = torch.randn(1, 3, 32, 32)
    _, maps = viz.compute_rollout(vit, x)
    assert vit.training
    _, reference = viz.compute_rollout(vit.eval(), x)
    torch.testing.assert_close(maps, reference, rtol=0, atol=0)

    maxvit = zoo.create_model("maxvit_debug", drop_path_rate=0.5).train()
    before = {k: v.clone() for k, v in maxvit.state_dict().items()}
    image = torch.randn(1, 3, 64, 64)
    _, first = maxvit_attention_maps(maxvit, image)
    _, second = maxvit_attention_maps(maxvit, image)
    assert maxvit.training
    changed = [k for k, v in maxvit.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == [], f"drawing updated {changed[:3]}"
    _, reference = maxvit_attention_maps(maxvit.eval(), image)  # the model in eval mode: the trusted maps
    for got, again, want in zip(first, second, reference):
        for kind in ("block", "grid"):
            np.testing.assert_array_equal(got[kind], want[kind])
            np.testing.assert_array_equal(again[kind], want[kind])


def test_maxvit_maps_of_another_model_name_it():
    """maxvit_attention_maps on a ViT raised "'VisionTransformer' object has no attribute 'stages'"."""
    from zoo.tasks.vision.viz_maxvit import maxvit_attention_maps

    with pytest.raises(ValueError, match="vit_debug is not a MaxViT model .*zoo viz rollout"):
        maxvit_attention_maps(zoo.create_model("vit_debug"), torch.randn(1, 3, 32, 32))


def _drawn_images(monkeypatch):
    """Spy on Axes.imshow: the list of (array, vmin, vmax) the picture draws."""
    import matplotlib.axes

    drawn = []
    real = matplotlib.axes.Axes.imshow

    def spy(self, X, *args, **kwargs):
        drawn.append((np.asarray(X), kwargs.get("vmin"), kwargs.get("vmax")))
        return real(self, X, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", spy)
    return drawn


def test_overlay_puts_each_patch_where_it_lies(tmp_path, monkeypatch):
    """The overlay stretched the (Gh, Gw) grid over the whole image: a 30 px image cut into 8 px patches (a 3x3 grid
    over pixels 0..23, the remainder dropped) showed the last patch column's attention at pixels 20..29, and
    Agent-DeiT's 8x8 grid of 4 px patches (the 30 px image padded to 32) at 26..29. Patch j covers pixels
    [j*pw, (j+1)*pw): the grid is upsampled to whole patches, then cropped or padded to the image."""
    import zoo.tasks.vision.agent_deit  # noqa: F401  registers the Agent-DeiT names
    from zoo.tasks.vision.viz_agent import save_agent_png

    drawn = _drawn_images(monkeypatch)
    heat = np.zeros((3, 3))
    heat[:, 2] = 1.0  # all attention on the last patch column: pixels 16..23
    viz.save_rollout_png(str(tmp_path / "r.png"), np.full((30, 30, 3), 0.5), heat, "t", patch_size=(8, 8))
    overlay = drawn[-1][0]
    assert overlay.shape == (30, 30)
    np.testing.assert_array_equal(np.where(np.nan_to_num(overlay).max(axis=0) > 0.5)[0], np.arange(16, 24))
    assert np.isnan(overlay[:, 24:]).all() and np.isnan(overlay[24:]).all()  # no patch covers pixels 24..29
    assert not np.isnan(overlay[:24, :24]).any()
    # bilinear upsampling by 8 (half-pixel centres) of the one-hot column, by hand: pixel x samples (x + 0.5) / 8 - 0.5
    source = np.clip((np.arange(24) + 0.5) / 8 - 0.5, 0, 2)
    np.testing.assert_allclose(overlay[5, :24], np.clip(source - 1.0, 0, 1), atol=1e-12)

    drawn.clear()
    agents = np.zeros((16, 8, 8))
    agents[:, :, 7] = 1.0 / 8  # the last patch column: pixels 28..31, of which 28 and 29 are in the image
    save_agent_png(str(tmp_path / "a.png"), np.full((30, 30, 3), 0.5), agents, "t", patch_size=(4, 4))
    overlay = [image for image, _, _ in drawn if image.shape == (30, 30)][-1]
    np.testing.assert_array_equal(np.where(overlay.max(axis=0) > 0.5 / 8)[0], [28, 29])

    # a padded dynamic-size ViT: 36 px in 8 px patches is a 5x5 grid over 40 px, cropped to the image
    model = zoo.create_model("vit_debug", dynamic_img_size=True, dynamic_img_pad=True).eval()
    _, maps = viz.compute_rollout(model, torch.randn(1, 3, 36, 36))
    drawn.clear()
    viz.save_rollout_png(str(tmp_path / "p.png"), np.full((36, 36, 3), 0.5), maps[0].numpy(), "t",
                         patch_size=model.patch_embed.patch_size)
    heat = maps[0].double()
    heat = (heat - heat.min()) / (heat.max() - heat.min())
    want = torch.nn.functional.interpolate(heat[None, None], size=(40, 40), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(drawn[-1][0], want[0, 0, :36, :36].numpy(), atol=1e-12)


def test_maxvit_and_agent_pictures_have_colour_scales(tmp_path, monkeypatch):
    """The MaxViT and Agent pictures had no colour scale, and the agent tiles were each stretched to their own
    min..max without saying so. Now every MaxViT map has a colour bar, the agent tiles share one scale (0 to the
    largest probability) with a colour bar, and the titles say so."""
    import matplotlib.figure

    from zoo.tasks.vision.viz_agent import save_agent_png
    from zoo.tasks.vision.viz_maxvit import save_maxvit_png

    bars, texts = [], []
    real_colorbar, real_suptitle, real_text = (matplotlib.figure.Figure.colorbar, matplotlib.figure.Figure.suptitle,
                                               matplotlib.figure.Figure.text)
    monkeypatch.setattr(matplotlib.figure.Figure, "colorbar", lambda self, m, **kw: bars.append(m) or real_colorbar(self, m, **kw))
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle", lambda self, t, **kw: texts.append(t) or real_suptitle(self, t, **kw))
    monkeypatch.setattr(matplotlib.figure.Figure, "text", lambda self, x, y, t, **kw: texts.append(t) or real_text(self, x, y, t, **kw))
    drawn = _drawn_images(monkeypatch)
    rng = np.random.default_rng(0)
    maps = [{"stage": s, "hw": (4, 4), "query": (1, 1), "block": rng.random((4, 4)), "grid": rng.random((4, 4)),
             "block_size": (2, 2), "grid_size": (2, 2)} for s in range(2)]
    save_maxvit_png(str(tmp_path / "m.png"), np.full((16, 16, 1), 0.5), maps, (4, 4), "t")
    assert len(bars) == 4  # block and grid, per stage
    assert any("each map on its own scale" in t for t in texts)
    bars.clear(), texts.clear(), drawn.clear()
    agents = rng.random((4, 2, 2)) * np.array([1.0, 0.5, 0.25, 0.1])[:, None, None]
    save_agent_png(str(tmp_path / "a.png"), np.full((8, 8, 3), 0.5), agents, "t", patch_size=(4, 4))
    assert len(bars) == 2  # the mean map's and the tiles' shared one
    tiles = [(image, lo, hi) for image, lo, hi in drawn if image.shape == (2, 2)]
    assert len(tiles) == 4
    for (image, lo, hi), want in zip(tiles, agents):
        np.testing.assert_array_equal(image, want)  # probabilities as they are, not stretched per tile
        assert lo == 0 and hi == pytest.approx(agents.max())
    assert any("one shared scale" in t for t in texts)


def test_viz_preprocesses_a_released_folder_as_zoo_predict(tmp_path, capsys):
    """A folder released with zoo.save_pretrained (no zoo train record): zoo predict preprocesses it with timm's
    evaluation transform of its pretrained_cfg (crop_pct, bicubic); zoo viz used the evaluation split's resize, so
    the same picture gave other probabilities (inputs up to 1.8 apart). zoo predict is the reference."""
    from PIL import Image

    from zoo.train import run

    torch.manual_seed(0)
    zoo.save_pretrained(zoo.create_model("vit_debug"), tmp_path / "released")
    image = tmp_path / "wide.png"
    Image.fromarray((np.random.default_rng(0).random((100, 150, 3)) * 255).astype(np.uint8)).save(image)
    for spec in (str(image), "digits:3"):
        [predicted] = run.predict(tmp_path / "released", [spec], topk=1)
        assert viz.rollout_main([f"ckpt={tmp_path / 'released'}", f"image={spec}", f"out={tmp_path / 'r.png'}"]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (str(summary["predicted"]), summary["probability"]) == (predicted["top"][0][0], round(predicted["top"][0][1], 4))
    model, transform = viz.load_model_and_transform(str(tmp_path / "released"))
    x, display, _ = viz.load_image(str(image), model, transform)
    with torch.no_grad():
        probs = model.eval()(x).softmax(-1)[0]
    [predicted] = run.predict(tmp_path / "released", [str(image)], topk=10)
    for name, prob in predicted["top"]:
        assert float(probs[int(name)]) == pytest.approx(prob, abs=1e-6)
    assert display.shape == (32, 32, 3) and display.min() >= 0 and display.max() <= 1


def test_out_directory_is_refused_before_the_work(tmp_path, capsys, monkeypatch):
    """out=<an existing directory ending in .png> failed after the picture was computed with "[Errno 21] Is a
    directory" and left <dir>.tmp.png behind."""
    from zoo.plotting import pyplot, save_figure
    from zoo.tasks.vision import viz_agent, viz_maxvit

    folder = tmp_path / "dir.png"
    folder.mkdir()

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before out= was checked")

    monkeypatch.setattr(viz, "load_model_and_transform", no_work, raising=False)
    monkeypatch.setattr(viz, "load_model", no_work)
    monkeypatch.setattr(zoo, "create_model", no_work)
    for main, extra in ((viz.rollout_main, "ckpt=x"), (viz_maxvit.maxvit_main, "model=maxvit_debug"),
                        (viz_agent.agent_main, "model=agent_deit_debug")):
        assert main([extra, f"out={folder}"]) == 2
        assert f"out='{folder}' is an existing directory; give a .png file name" in capsys.readouterr().err
    fig = pyplot().figure()
    with pytest.raises(OSError):
        save_figure(fig, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.png"]  # no dir.png.tmp.png left behind


def test_capture_docstring_names_what_it_does_not_record():
    """capture_attention said it records "every attention module called inside the block"; AttentionPoolLatent
    (global_pool="map", SigLIP's MAP head) records nothing, and the docstring now says so."""
    from zoo.attention import AttentionPoolLatent, capture_attention

    model = zoo.create_model("vit_debug", global_pool="map").eval()
    with capture_attention(model) as records, torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert [r.name for r in records] == ["blocks.0.attn", "blocks.1.attn"]
    assert isinstance(model.attn_pool, AttentionPoolLatent)
    doc = " ".join(capture_attention.__doc__.split())
    assert "Not recorded: :class:`zoo.attention.AttentionPoolLatent`" in doc


# ------------------------------------------------------------------ mutation audit of the pictures (2026-12-07)
def _hand_rollout(probs, fuse=lambda p: p.mean(axis=1)):
    """The rollout of per-layer attention probabilities (numpy fp64): rownorm(fuse(W_l) + I), multiplied in order."""
    n = probs[0].shape[-1]
    result = np.broadcast_to(np.eye(n), probs[0].shape[:1] + (n, n))
    for p in probs:
        a = fuse(p) + np.eye(n)
        result = (a / a.sum(-1, keepdims=True)) @ result
    return result


def test_rollout_head_fusions_reach_the_picture():
    """head_fusion=max / min as zoo viz rollout passes it to compute_rollout, against the hand rollout (fp64) of the
    recomputed attention probabilities: the fused maps differ from the mean's, so a fusion dropped on the way (the
    mean drawn) or one fusion computed as another fails."""
    torch.manual_seed(0)
    model = _peaked_vit_debug(depth=2)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    probs = _hand_attention_probs(model, x)
    mean_map = _hand_rollout(probs)[:, 0, 1:].reshape(1, 4, 4)
    for fusion, fuse in (("max", lambda p: p.max(axis=1)), ("min", lambda p: p.min(axis=1))):
        want = _hand_rollout(probs, fuse)
        _, maps = viz.compute_rollout(model, x, head_fusion=fusion)
        np.testing.assert_allclose(maps.numpy(), want[:, 0, 1:].reshape(1, 4, 4), rtol=1e-5, atol=1e-7)
        assert np.abs(maps.numpy() - mean_map).max() > 1e-3, fusion  # the test can tell the fusions apart
        with zoo.attention.capture_attention() as records, torch.no_grad():
            model(x)
        np.testing.assert_allclose(viz.attention_rollout([r.weights for r in records], head_fusion=fusion).numpy(),
                                   want, rtol=1e-5, atol=1e-7)


def test_rollout_without_class_token_averages_the_patch_rows_only():
    """No class token but register tokens: the map is the mean of the patch tokens' rows (the registers' rows left
    out, as the docstring says), hand-computed."""
    torch.manual_seed(0)
    model = _peaked_vit_debug(depth=2, class_token=False, reg_tokens=2, global_pool="avg")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    _, maps = viz.compute_rollout(model, x)
    rollout = _hand_rollout(_hand_attention_probs(model, x))
    want = rollout[:, 2:, 2:].mean(axis=1).reshape(1, 4, 4)
    np.testing.assert_allclose(maps.numpy(), want, rtol=1e-5, atol=1e-7)
    assert np.abs(rollout[:, :, 2:].mean(axis=1).reshape(1, 4, 4) - want).max() > 1e-4  # registers' rows matter


@pytest.mark.parametrize("size, pad, grid", [((32, 48), False, (4, 6)), ((32, 48), True, (4, 6)),
                                             ((36, 44), True, (5, 6))])
def test_rollout_grid_of_non_square_and_padded_images(size, pad, grid):
    """A dynamic-size ViT on a 32x48 image has a 4x6 patch grid (rows from the height), also when it pads to whole
    patches and the image already is whole patches; 36x44 padded is 5x6. Values: the hand rollout's class row."""
    torch.manual_seed(0)
    model = _peaked_vit_debug(depth=2, dynamic_img_size=True, dynamic_img_pad=pad)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(4))
    _, maps = viz.compute_rollout(model, x)
    assert maps.shape == (1, *grid)
    want = _hand_rollout(_hand_attention_probs(model, x))[:, 0, 1:].reshape(1, *grid)
    np.testing.assert_allclose(maps.numpy(), want, rtol=1e-5, atol=1e-7)


def test_display_image_is_the_file_as_read(tmp_path):
    """The image drawn under the heat map is the model input un-normalised: a uniform grey file of value 0.8 is
    drawn as 0.8 (vit_digits normalises with mean 0.5, std 0.5, so the input is 0.6)."""
    from PIL import Image

    model = zoo.create_model("vit_digits")
    Image.fromarray(np.full((24, 24), 204, dtype=np.uint8)).save(tmp_path / "grey.png")
    x, display, label = viz.load_image(str(tmp_path / "grey.png"), model)
    assert label is None and display.shape == (8, 8, 1)
    np.testing.assert_allclose(x.numpy(), np.full((1, 1, 8, 8), (0.8 - 0.5) / 0.5), atol=1e-6)
    np.testing.assert_allclose(display, np.full((8, 8, 1), 0.8), atol=1e-6)


@pytest.mark.parametrize("kind", ["block", "grid"])
def test_maxvit_map_is_laid_out_as_the_model_partitions(kind):
    """partition_attention_map against the model's own partition() of an index map (what the forward attends over):
    a non-square padded 7x10 map, 3x2 partitions, each query, one head and the head mean. Every map value must be
    weights[query's partition, head, query's slot, key slot] at that key's position."""
    from zoo.tasks.vision.maxvit import partition
    from zoo.tasks.vision.viz_maxvit import partition_attention_map

    (h, w), size = (7, 10), (3, 2)
    hp, wp = 9, 10
    parts = partition(torch.arange(hp * wp).reshape(1, hp, wp, 1), size, kind)[..., 0]  # (nP, P) token positions
    weights = torch.rand(parts.shape[0], 2, 6, 6, generator=torch.Generator().manual_seed(0))
    for qy in range(h):
        for qx in range(w):
            part, slot = [int(v[0]) for v in torch.nonzero(parts == qy * wp + qx, as_tuple=True)]
            for head in (None, 1):
                row = weights[part, :, slot].mean(0) if head is None else weights[part, head, slot]
                want = torch.zeros(hp, wp)
                for key, pos in enumerate(parts[part].tolist()):
                    want[pos // wp, pos % wp] = row[key]
                got = partition_attention_map(weights, kind, size, (h, w), (qy, qx), head)
                torch.testing.assert_close(got, want[:h, :w], rtol=0, atol=0, msg=f"{kind} query {(qy, qx)} head {head}")


def test_maxvit_rows_are_titled_with_their_stage(tmp_path, monkeypatch):
    """Row r of the MaxViT picture is stage r + 1 (stages counted from 1, as the model card's table does) with its map
    size, and each map names its partition."""
    import matplotlib.axes

    from zoo.tasks.vision.viz_maxvit import save_maxvit_png

    titles = []
    real = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda self, t, *a, **kw: titles.append(t) or real(self, t, *a, **kw))
    rng = np.random.default_rng(0)
    maps = [{"stage": s, "hw": (8 >> s, 8 >> s), "query": (1, 1), "block": rng.random((8 >> s, 8 >> s)),
             "grid": rng.random((8 >> s, 8 >> s)), "block_size": (2, 2), "grid_size": (4 >> s, 4 >> s)} for s in range(2)]
    save_maxvit_png(str(tmp_path / "m.png"), np.full((16, 16, 1), 0.5), maps, (4, 4), "t")
    assert titles == ["stage 1: 8x8 map", "block attention (2x2)", "grid attention (4x4)",
                      "stage 2: 4x4 map", "block attention (2x2)", "grid attention (2x2)"]


def test_agent_maps_mean_over_heads_and_tiles_in_the_agents_grid(tmp_path, monkeypatch):
    """agent_maps without head= is the mean of the per-head maps (head=h is checked against a recomputation in
    test_agent.py), and agent i's tile is drawn in row i // side, column i % side of the mosaic (the agent pooled from
    region (i // side, i % side))."""
    import matplotlib.axes

    import zoo.tasks.vision.agent_deit  # noqa: F401  registers the Agent-DeiT names
    from zoo.tasks.vision.viz_agent import agent_maps, save_agent_png

    torch.manual_seed(0)
    model = zoo.create_model("agent_deit_debug").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    _, mean_maps, _ = agent_maps(model, x, layer=0)
    per_head = torch.stack([agent_maps(model, x, layer=0, head=h)[1] for h in range(2)])
    torch.testing.assert_close(mean_maps, per_head.mean(0), rtol=1e-6, atol=1e-7)
    assert (per_head[0] - per_head[1]).abs().max() > 1e-3

    placed = []
    real = matplotlib.axes.Axes.imshow
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", lambda self, X, *a, **kw: placed.append((np.asarray(X), self))
                        or real(self, X, *a, **kw))
    agents = np.arange(16, dtype=np.float64)[:, None, None] * np.ones((16, 2, 2))  # agent i's tile holds i
    save_agent_png(str(tmp_path / "a.png"), np.full((8, 8, 3), 0.5), agents, "t", patch_size=(4, 4))
    tiles = [(image, ax) for image, ax in placed if image.shape == (2, 2)]
    assert len(tiles) == 16
    for image, ax in tiles:
        i = int(image[0, 0])
        spec = ax.get_subplotspec()
        assert (spec.rowspan.start, spec.colspan.start) == (i // 4, i % 4), f"agent {i}"


def test_graph_picture_draws_every_head_and_the_layer_asked_for(tmp_path, monkeypatch):
    """draw_neighbourhood: panel h labels each in-edge with head h's attention (hand-made alpha of 2 heads) and
    titles the self loop's; zoo viz graph layer=1 draws the second layer's return_attention_weights, not the first."""
    import matplotlib.axes
    import networkx as nx

    from zoo.tasks.graph import viz as graph_viz

    labels, titles = [], []
    real_labels, real_title = nx.draw_networkx_edge_labels, matplotlib.axes.Axes.set_title
    monkeypatch.setattr(nx, "draw_networkx_edge_labels", lambda G, pos, **kw: labels.append(kw["edge_labels"])
                        or real_labels(G, pos, **kw))
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda self, t, *a, **kw: titles.append(t) or real_title(self, t, *a, **kw))
    edge_index = torch.tensor([[1, 2, 0, 3], [0, 0, 0, 1]])
    alpha = torch.tensor([[0.2, 0.6], [0.5, 0.1], [0.3, 0.3], [1.0, 1.0]])
    graph_viz.draw_neighbourhood(edge_index, alpha, 0, str(tmp_path / "g.png"))
    assert labels == [{(1, 0): "0.20", (2, 0): "0.50"}, {(1, 0): "0.60", (2, 0): "0.10"}]
    assert titles == ["head 0  (self 0.30)", "head 1  (self 0.30)"]
    monkeypatch.undo()

    drawn, built = [], []
    real_create = zoo.create_model
    monkeypatch.setattr(zoo, "create_model", lambda *a, **kw: built.append(real_create(*a, **kw)) or built[-1])
    monkeypatch.setattr(graph_viz, "draw_neighbourhood", lambda edge_index, alpha, node, out, **kw: drawn.append(
        (edge_index, alpha, kw["title"])) or out)
    assert graph_viz.main(["data=karate", "node=5", "layer=1", "epochs=0", "heads=3", f"out={tmp_path / 'k.png'}"]) == 0
    from zoo.tasks.graph import datasets

    data = datasets.load_node_dataset("karate", None, seed=0)
    with torch.no_grad():
        _, attention = built[-1].eval()(data["x"], data["edge_index"], return_attention_weights=True)
    [(edge_index, alpha, title)] = drawn
    assert title.startswith("karate: node 5, layer 1")
    assert torch.equal(edge_index, attention[1][0]) and alpha.shape == attention[1][1].shape == (edge_index.shape[1], 1)
    torch.testing.assert_close(alpha, attention[1][1], rtol=0, atol=0)


def test_overlay_of_a_non_square_grid(tmp_path, monkeypatch):
    """A 2x3 grid of 4 px patches on a 10x14 image: the grid is upsampled to 8x12 pixels (rows from the grid's rows),
    the rest NaN; the values, bilinear with half-pixel centres, by hand along each axis."""
    from zoo.plotting import patch_heat_on_image

    heat = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    out = patch_heat_on_image(heat, (4, 4), (10, 14))
    assert out.shape == (10, 14)
    assert not np.isnan(out[:8, :12]).any() and np.isnan(out[8:]).all() and np.isnan(out[:, 12:]).all()
    source = np.clip((np.arange(12) + 0.5) / 4 - 0.5, 0, 2)  # pixel x samples column (x + 0.5) / 4 - 0.5
    for row in range(8):
        np.testing.assert_allclose(out[row, :12], np.clip(source - 1.0, 0, 1), atol=1e-12)


def test_pictures_leave_an_eval_model_in_eval_mode_and_read_dashed_keys():
    """evaluation_mode restores eval as well as train; --head-fusion=max reads as head_fusion=max."""
    from zoo.plotting import evaluation_mode, parse_key_values

    model = zoo.create_model("vit_debug").eval()
    viz.compute_rollout(model, torch.randn(1, 3, 32, 32))
    assert not model.training
    with pytest.raises(RuntimeError):
        with evaluation_mode(model.train()):
            raise RuntimeError("drawing failed")
    assert model.training
    assert parse_key_values(["--head-fusion=max", "out=a.png"], ("head_fusion", "out")) == {"head_fusion": "max", "out": "a.png"}


def _discarded(fused_BNN, ratio):
    """jacobgil/vit-explain's filter on one layer's fused weights (numpy, every image): the int(N*N*ratio) smallest
    entries of each image's map set to 0, entry (0, 0) kept."""
    out = fused_BNN.copy()
    b, n, _ = out.shape
    for i in range(b):
        flat = out[i].reshape(-1)
        drop = np.argsort(flat, kind="stable")[:int(n * n * ratio)]
        flat[drop[drop != 0]] = 0.0
    return out


def test_rollout_discard_ratio_is_vit_explains_filter_on_every_image(tmp_path, capsys):
    """discard_ratio against the hand rollout (fp64) with jacobgil/vit-explain's filter applied to each image of a
    batch of two; 0 is the paper's rollout; zoo viz rollout passes discard_ratio= through and refuses a ratio
    outside [0, 1) before loading anything."""
    torch.manual_seed(0)
    model = _peaked_vit_debug(depth=2, sharpen=5.0)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    probs = _hand_attention_probs(model, x)
    for ratio in (0.5, 0.9):
        want = _hand_rollout(probs, lambda p: _discarded(p.mean(axis=1), ratio))
        _, maps = viz.compute_rollout(model, x, discard_ratio=ratio)
        np.testing.assert_allclose(maps.numpy(), want[:, 0, 1:].reshape(2, 4, 4), rtol=1e-5, atol=1e-9)
        plain = _hand_rollout(probs)[:, 0, 1:].reshape(2, 4, 4)
        assert np.abs(maps.numpy() - plain).max() > 1e-3  # the filter changes both images' maps
        assert np.abs(maps.numpy()[1] - plain[1]).max() > 1e-3
    _, maps0 = viz.compute_rollout(model, x, discard_ratio=0.0)
    np.testing.assert_allclose(maps0.numpy(), _hand_rollout(probs)[:, 0, 1:].reshape(2, 4, 4), rtol=1e-5, atol=1e-9)

    ckpt = tmp_path / "last.ckpt"
    _lightning_style_ckpt(zoo.create_model("vit_digits", depth=2), ckpt)
    assert viz.rollout_main([f"ckpt={ckpt}", "discard_ratio=0.9", f"out={tmp_path / 'a.png'}"]) == 0
    assert (tmp_path / "a.png").stat().st_size > 5000
    titles, draw = [], viz.save_rollout_png
    with pytest.MonkeyPatch.context() as patch:  # the picture's title names settings other than the paper's
        patch.setattr(viz, "save_rollout_png", lambda out, display, heat, title, patch_size: (
            titles.append(title), draw(out, display, heat, title, patch_size))[1])
        for extra in ([], ["discard_ratio=0.9"], ["head_fusion=min", "discard_ratio=0.5"]):
            assert viz.rollout_main([f"ckpt={ckpt}", *extra, f"out={tmp_path / 'b.png'}"]) == 0
    assert "rollout with" not in titles[0]
    assert titles[1].endswith("; rollout with discard_ratio=0.9")
    assert titles[2].endswith("; rollout with head_fusion=min, discard_ratio=0.5")
    capsys.readouterr()
    for bad in ("1", "-0.1", "most", "nan"):
        assert viz.rollout_main([f"ckpt={tmp_path / 'missing.ckpt'}", f"discard_ratio={bad}"]) == 2
        assert "discard_ratio must be a number in [0, 1)" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"discard_ratio must be a number in \[0, 1\).*got True"):
        viz.attention_rollout([torch.from_numpy(p) for p in probs], discard_ratio=True)
    # NumPy scalars and one-element tensors are numbers too (a ratio read from an array or a config tensor)
    want = viz.attention_rollout([torch.from_numpy(p) for p in probs], discard_ratio=0.5)
    for ratio in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5), np.int64(0)):
        got = viz.attention_rollout([torch.from_numpy(p) for p in probs], discard_ratio=ratio)
        if float(ratio) == 0.5:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="discard_ratio must be a number"):
        viz.attention_rollout([torch.from_numpy(p) for p in probs], discard_ratio=torch.tensor([0.5, 0.5]))


def test_pictures_name_the_models_classes_and_show_digit_labels_only_to_digit_models(tmp_path, capsys):
    """A model fine-tuned to other classes (even / odd) drawn on digits:3: the picture names the predicted class and
    shows no "true class 3" (a class it does not have), as zoo predict decides; a digits model keeps the label."""
    from zoo.tasks.vision import viz_agent, viz_maxvit

    torch.manual_seed(0)
    cases = [("vit_digits", viz.rollout_main, {"depth": 2}), ("agent_deit_digits", viz_agent.agent_main, {}),
             ("maxvit_digits", viz_maxvit.maxvit_main, {})]
    for name, main, args in cases:
        for names in (["even", "odd"], [str(i) for i in range(10)]):
            model = zoo.create_model(name, num_classes=len(names), **args).eval()
            released = tmp_path / f"{name}_{len(names)}"
            zoo.save_pretrained(model, released, metadata={"data": {"class_names": names}})
            out = tmp_path / f"{name}_{len(names)}.png"
            assert main([f"ckpt={released}", "image=digits:3", f"out={out}"]) == 0
            summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
            if len(names) == 2:
                assert "label" not in summary, (name, summary)
                assert summary["class_name"] == names[summary["predicted"]], (name, summary)
            else:
                assert summary["label"] == 3 and "class_name" not in summary, (name, summary)
    title, pred, _ = zoo.plotting.prediction_title(torch.tensor([[0.0, 2.0]]), None, ["even", "odd"])
    assert pred == 1 and title.startswith("predicted odd (class 1, p=0.88)")
