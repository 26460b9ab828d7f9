"""zoo eval data=GROUP and zoo predict preprocess as the run evaluated: the evaluation crop kept by data=GROUP
(review J, finding 1), class folders matched by name in any order (2), unreadable images skipped (3), digits:N
through the run's crop (4), predict streamed in batches on a chosen device (5).

The reference is always the zoo's own other path on the same files: the run's stored config for zoo eval, the
image-file path (load_image_file) for digits:N, one batch of every input for the streamed prediction."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zoo import cli
from zoo.train import run

ROOT = Path(__file__).resolve().parents[1]
VIT_DIGITS = ROOT / "checkpoints" / "vit_digits"


def _digits_folder(root: Path, split: str, indices, names=None) -> Path:
    """Digits ``indices`` as root/<split>/<class>/<index>.png (8 bit, as a user's files are)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in indices:
        label = int(digits.target[i])
        folder = root / split / (names[label] if names else str(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(digits.images[i] * 255 / 16).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def crop_run(tmp_path_factory) -> Path:
    """The shipped digits ViT fine-tuned for two batches on an image folder of the digits, evaluated with a 0.6
    bicubic centre crop (data.crop_pct, data.interpolation), the run's released directory."""
    from zoo.tasks.vision.data import digits_splits

    base = tmp_path_factory.mktemp("crop")
    splits = digits_splits()
    folder = _digits_folder(base / "pngs", "train", splits["train"][:64])
    _digits_folder(folder, "test", splits["test"][:120])
    assert cli.main(["train", "experiment=vit_digits", f"model.pretrained={VIT_DIGITS}", "debug=fast",
                     "num_threads=1", "data=image_folder", f"data.root={folder}", "data.img_size=8", "data.in_chans=1",
                     "data.augment=none", "data.hflip=0", "data.batch_size=16", "data.val_fraction=0", "data.crop_pct=0.6",
                     "data.interpolation=bicubic", "trainer.limit_test_batches=null",
                     f"run_dir={base / 'run'}"]) == 0
    return base / "run"


def _stored_root(run_dir: Path) -> Path:
    config = json.loads((run_dir / "released" / "config.json").read_text())
    return Path(config["metadata"]["zoo_config"]["data"]["root"])


def test_eval_on_another_data_config_keeps_the_runs_evaluation_crop(crop_run, capsys):
    """data=image_folder on the run's own folder scores what the run's own config scores (its crop_pct 0.6 and
    bicubic resize were replaced by image_folder.yaml's 1.0 / bilinear: other metrics, without a word); an explicit
    data.crop_pct still wins."""
    released = crop_run / "released"
    own = run.evaluate(released)
    other_data = ["data=image_folder", f"data.root={_stored_root(crop_run)}", "data.val_fraction=0"]
    other = run.evaluate(released, other_data)
    assert own["test/acc1"] == pytest.approx(other["test/acc1"], abs=1e-7)
    assert own["test/loss"] == pytest.approx(other["test/loss"], rel=1e-6)
    uncropped = run.evaluate(released, [*other_data, "data.crop_pct=1.0", "data.interpolation=bilinear"])
    assert abs(uncropped["test/loss"] - own["test/loss"]) > 1e-3  # the crop matters on these images
    # the digits take no crop: the refusal names the run's evaluation transform as the reason and the way out
    assert cli.main(["eval", f"ckpt={released}", "data=digits"]) == 1
    err = capsys.readouterr().err
    assert "crop_pct=0.6, interpolation=bicubic is the run's evaluation transform" in err
    assert "data.crop_pct=1.0 data.interpolation=bilinear" in err


def test_digits_input_gets_the_runs_crop_as_the_same_digit_saved_as_png(crop_run, tmp_path):
    """digits:N was upsampled without the run's crop while the same digit as a PNG file was cropped: the same image
    got different classes depending on how it was given. Now both give the same probabilities."""
    from zoo.tasks.vision.data import digits_splits

    indices = [int(i) for i in digits_splits()["test"][:6]]
    _digits_folder(tmp_path, "x", indices)
    files = sorted(str(p) for p in (tmp_path / "x").rglob("*.png"))
    by_index = {int(Path(f).stem): f for f in files}
    released = crop_run / "released"
    from_files = run.predict(released, [by_index[i] for i in indices], topk=10)
    from_digits = run.predict(released, [f"digits:{i}" for i in indices], topk=10)
    for file_row, digit_row in zip(from_files, from_digits):
        assert [name for name, _ in file_row["top"]] == [name for name, _ in digit_row["top"]]
        np.testing.assert_allclose([p for _, p in file_row["top"]], [p for _, p in digit_row["top"]], atol=1e-6)
    # a run evaluated without a crop keeps the digits' own upsampling (what the digits experiments train on)
    info = {"crop_pct": 1.0, "interpolation": "bilinear", "crop_mode": "center"}
    plain = run._digits_image("digits:5", 8, 1, [0.5], [0.5], crop=run._eval_crop(info))
    from sklearn.datasets import load_digits

    expected = (torch.tensor(load_digits().images[5], dtype=torch.float32) / 16.0 - 0.5) / 0.5
    torch.testing.assert_close(plain[0], expected)


def test_viz_digits_input_gets_the_runs_crop_as_the_same_digit_saved_as_png(crop_run, tmp_path):
    """zoo viz's input (tasks/vision/viz.load_image) of digits:N equals its input of the same digit as a PNG for a
    run evaluated with a crop, as zoo predict's do (the digit was upsampled without the crop there)."""
    import zoo
    from zoo.tasks.vision.viz import load_image

    model = zoo.create_model("vit_digits", pretrained=str(crop_run / "released"))
    _digits_folder(tmp_path, "x", [21])
    png = next(str(p) for p in (tmp_path / "x").rglob("*.png"))
    from_png, _, _ = load_image(png, model)
    from_digit, _, label = load_image("digits:21", model)
    torch.testing.assert_close(from_digit, from_png, rtol=0, atol=1e-6)
    assert label is not None


def test_eval_matches_folders_that_are_the_models_classes_in_another_order(tmp_path, capsys):
    """A model whose class order is not the sorted folder order (trained with data.classes): folders named exactly
    its classes were scored by position (class i of the data as the model's class i). The shipped ViT with its
    head and class names reversed scores on the digits' PNGs what the original scores."""
    from safetensors.torch import load_file, save_file

    reversed_model = tmp_path / "reversed"
    shutil.copytree(VIT_DIGITS, reversed_model)
    weights = load_file(str(reversed_model / "model.safetensors"))
    weights["head.weight"], weights["head.bias"] = weights["head.weight"].flip(0), weights["head.bias"].flip(0)
    save_file(weights, str(reversed_model / "model.safetensors"))
    config = json.loads((reversed_model / "config.json").read_text())
    config["metadata"]["data"]["class_names"] = [str(9 - k) for k in range(10)]
    (reversed_model / "config.json").write_text(json.dumps(config))
    from zoo.tasks.vision.data import digits_splits

    folder = _digits_folder(tmp_path / "pngs", "test", digits_splits()["test"])
    overrides = ["data=image_folder", f"data.root={folder}", "data.num_workers=0"]
    original = run.evaluate(VIT_DIGITS, overrides)
    capsys.readouterr()
    reordered = run.evaluate(reversed_model, overrides)
    err = capsys.readouterr().err
    assert "are the model's classes in another order" in err and "warning" not in err
    assert reordered["test/acc1"] == pytest.approx(original["test/acc1"], abs=1e-7) and original["test/acc1"] > 0.95
    assert reordered["test/loss"] == pytest.approx(original["test/loss"], rel=1e-5)


def _counting_model(monkeypatch):
    """Patches zoo predict's image reading and model to record, at each forward, how many images were read so far."""
    import zoo.tasks.vision.data as vision_data

    reads, seen_at_forward = [], []
    real_read = vision_data.read_image

    def counting_read(path):
        reads.append(path)
        return real_read(path)

    monkeypatch.setattr(vision_data, "read_image", counting_read)
    real_inference_model = run._inference_model

    def with_hook(ckpt):
        model, info, cfg = real_inference_model(ckpt)
        model.register_forward_pre_hook(lambda module, args: seen_at_forward.append((len(reads), args[0].shape[0])))
        return model, info, cfg

    monkeypatch.setattr(run, "_inference_model", with_hook)
    return reads, seen_at_forward


def test_predict_streams_batches_and_equals_one_batch(tmp_path, monkeypatch):
    """zoo predict read every file before the first forward (all of ImageNet val held at once); it reads
    batch_size files per forward now, and gives what one batch of every input gives."""
    from zoo.tasks.vision.data import digits_splits

    _digits_folder(tmp_path, "x", digits_splits()["test"][:23])
    whole = run.predict(VIT_DIGITS, [str(tmp_path / "x"), "digits:3"], topk=3, batch_size=1000)
    reads, seen_at_forward = _counting_model(monkeypatch)
    streamed = run.predict(VIT_DIGITS, [str(tmp_path / "x"), "digits:3"], topk=3, batch_size=5)
    assert [size for _, size in seen_at_forward] == [5, 5, 5, 5, 4]  # 23 files then the digit
    assert [read for read, _ in seen_at_forward] == [5, 10, 15, 20, 23]  # never more read than the batch needs
    assert [row["input"] for row in streamed] == [row["input"] for row in whole] and len(whole) == 24
    for a, b in zip(streamed, whole):
        assert [n for n, _ in a["top"]] == [n for n, _ in b["top"]] and a.get("label") == b.get("label")
        np.testing.assert_allclose([p for _, p in a["top"]], [p for _, p in b["top"]], atol=1e-5)


def test_predict_skips_unreadable_files_and_names_them(tmp_path, capsys):
    """One corrupt file stopped zoo predict over a folder, reporting none of the good images; it is skipped with
    a line naming it (timm's ImageDataset skips it too), and only inputs none of which can be read are an error."""
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "b_corrupt.png").write_bytes(b"garbage")
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tmp_path / "c.png")
    rows = run.predict(VIT_DIGITS, [str(tmp_path)], topk=1, batch_size=2)
    assert [Path(row["input"]).name for row in rows] == ["a.png", "c.png"]
    assert "zoo predict: skipped" in capsys.readouterr().err
    assert cli.main(["predict", f"ckpt={VIT_DIGITS}", f"input={tmp_path}", "json=true", "batch_size=1"]) == 0
    captured = capsys.readouterr()
    assert [Path(r["input"]).name for r in json.loads(captured.out)] == ["a.png", "c.png"]
    assert f"skipped {tmp_path / 'b_corrupt.png'} is not a readable image" in captured.err
    assert cli.main(["predict", f"ckpt={VIT_DIGITS}", f"input={tmp_path / 'b_corrupt.png'}"]) == 1
    assert "b_corrupt.png is not a readable image" in capsys.readouterr().err


def test_predict_batch_size_and_device_are_checked_by_name(capsys):
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            run.predict(VIT_DIGITS, ["digits:0"], batch_size=bad)
    with pytest.raises(SystemExit, match="batch_size must be an integer, got 'x'"):
        cli.main(["predict", f"ckpt={VIT_DIGITS}", "input=digits:0", "batch_size=x"])
    assert cli.main(["predict", f"ckpt={VIT_DIGITS}", "input=digits:0", "batch_size=0"]) == 1
    assert "batch_size must be a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="device must be cpu, cuda or cuda:<index>, got 'gpu'"):
        run.predict(VIT_DIGITS, ["digits:0"], device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device=cuda: no CUDA GPU is visible here"):
            run.predict(VIT_DIGITS, ["digits:0"], device="cuda")
    else:  # the same classes and probabilities on the GPU
        cpu, gpu = (run.predict(VIT_DIGITS, ["digits:0", "digits:1"], topk=3, device=d) for d in ("cpu", "cuda"))
        for a, b in zip(cpu, gpu):
            assert [n for n, _ in a["top"]] == [n for n, _ in b["top"]]
            np.testing.assert_allclose([p for _, p in a["top"]], [p for _, p in b["top"]], atol=1e-4)
