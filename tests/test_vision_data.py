"""tasks/vision/data.py: the fixed digits split, preprocessing, ImageFolder, CIFAR messages, sampling."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits

from zoo.tasks.vision import data as vdata


def test_digits_test_split_is_fixed_stratified_and_disjoint():
    labels = load_digits().target
    a = vdata.digits_splits(val_fraction=0.1, seed=0)
    b = vdata.digits_splits(val_fraction=0.25, seed=7)
    c = vdata.digits_splits(val_fraction=0.0)
    assert len(a["test"]) == 360
    np.testing.assert_array_equal(a["test"], b["test"])  # the test split never depends on the config
    np.testing.assert_array_equal(a["test"], c["test"])
    for split in (a, b, c):
        parts = [split["train"], split["val"], split["test"]]
        union = np.concatenate(parts)
        assert len(union) == 1797 and len(np.unique(union)) == 1797
    assert len(c["val"]) == 0 and len(c["train"]) == 1437
    assert len(a["val"]) == 144
    # stratified: every class has 20% +- 1 image of its images in the test split
    for digit in range(10):
        total = int((labels == digit).sum())
        in_test = int((labels[a["test"]] == digit).sum())
        assert abs(in_test - total * 360 / 1797) <= 1.0, (digit, in_test, total)
    # independent re-derivation of the documented rule
    from sklearn.model_selection import train_test_split

    _, expected = train_test_split(np.arange(1797), test_size=360, stratify=labels, random_state=0)
    np.testing.assert_array_equal(a["test"], np.sort(expected))


def test_digits_datamodule_preprocessing():
    digits = load_digits()
    dm = vdata.DigitsDataModule(batch_size=16, val_fraction=0.1, mean=(0.5,), std=(0.25,))
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1293, 144, 360)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (256 if len(dm.test_set) >= 256 else len(dm.test_set), 1, 8, 8) and x.dtype == torch.float32
    first = vdata.digits_splits(0.1, 0)["test"][0]
    expected = (torch.tensor(digits.images[first], dtype=torch.float32) / 16.0 - 0.5) / 0.25
    torch.testing.assert_close(x[0, 0], expected)
    assert int(y[0]) == int(digits.target[first])
    # upsampled RGB variant
    dm3 = vdata.DigitsDataModule(batch_size=8, img_size=16, in_chans=3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    dm3.setup()
    x3, _ = dm3.test_set[0]
    assert x3.shape == (3, 16, 16)
    raw = torch.tensor(digits.images[first], dtype=torch.float32)[None, None] / 16.0
    up = F.interpolate(raw, size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(x3[1], (up - 0.5) / 0.5)
    assert dm3.describe() == {"img_size": 16, "in_chans": 3, "mean": [0.5] * 3, "std": [0.5] * 3,
                              "class_names": [str(i) for i in range(10)], "num_classes": 10,
                              "crop_pct": 1.0, "crop_mode": "center", "interpolation": "bilinear"}


def test_shift_augmentation_is_a_translation():
    dm = vdata.DigitsDataModule(augment="shift", shift=1, mean=(0.0,), std=(1.0,))
    dm.setup()
    base = dm.train_set.images[5, 0]
    seen = set()
    for epoch in range(30):
        dm.train_set.epoch = epoch
        shifted = dm.train_set[5][0][0]
        torch.manual_seed(epoch)  # the global RNG does not matter: (seed, epoch, index) decide
        assert torch.equal(dm.train_set[5][0][0], shifted)
        padded = F.pad(base, (1, 1, 1, 1))
        matches = [(dy, dx) for dy in range(3) for dx in range(3) if torch.equal(padded[dy:dy + 8, dx:dx + 8], shifted)]
        assert matches, "augmented image is not a shift of the original"
        seen.add(matches[0])
    assert len(seen) > 3
    # affine with no rotation, scaling or shift is the identity (the warp's coordinate convention is exact)
    warp = vdata.DigitsDataModule(augment="affine", shift=0, rotate=0.0, scale=0.0, mean=(0.0,), std=(1.0,))
    warp.setup()
    image = warp.train_set.images[5]
    torch.testing.assert_close(warp.train_set._warp(image, 0), image, atol=1e-6, rtol=0)
    rotating = vdata.DigitsDataModule(augment="affine", rotate=30.0, scale=0.2)
    rotating.setup()
    a = rotating.train_set[5][0]
    rotating.train_set.epoch = 1
    assert not torch.equal(a, rotating.train_set[5][0]) and torch.isfinite(a).all()
    with pytest.raises(ValueError, match="augment must be 'none', 'shift' or 'affine'"):
        vdata.DigitsDataModule(augment="rotate")


def test_epoch_shuffle_sampler_depends_only_on_seed_and_epoch():
    data = list(range(50))
    a, b = vdata.EpochShuffleSampler(data, seed=3), vdata.EpochShuffleSampler(data, seed=3)
    first = list(a)
    assert sorted(first) == data
    assert first == list(b)
    torch.manual_seed(123)  # the global RNG has no influence
    assert list(a) == first
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == data
    # two replicas split each epoch's permutation without overlap
    r0, r1 = vdata.EpochShuffleSampler(data, 3, num_replicas=2, rank=0), vdata.EpochShuffleSampler(data, 3, num_replicas=2, rank=1)
    assert sorted(list(r0) + list(r1)) == data
    # the epoch reaches the dataset (per-sample augmentation seeds)
    dm = vdata.DigitsDataModule(augment="shift")
    dm.setup()
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(4)
    assert dm.train_set.epoch == 4


def test_bad_datamodule_arguments():
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        vdata.DigitsDataModule(batch_size=0)
    with pytest.raises(ValueError, match=r"mean \(0.1, 0.2\) / std"):
        vdata.DigitsDataModule(mean=(0.1, 0.2))
    with pytest.raises(ValueError, match="data.num_classes=5"):
        vdata.DigitsDataModule(num_classes=5)


def _write_images(root, split, classes, per_class, size=(12, 10)):
    rng = np.random.default_rng(0)
    for name in classes:
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_image_folder_datamodule(tmp_path):
    _write_images(tmp_path, "train", ["cat", "dog", "eel"], 5)
    dm = vdata.ImageFolderDataModule(str(tmp_path), batch_size=4, img_size=8, in_chans=1, mean=(0.5,), std=(0.5,),
                                     augment="standard", val_fraction=0.2, num_classes=3)
    assert dm.class_names == ["cat", "dog", "eel"] and dm.num_classes == 3
    dm.setup()
    assert len(dm.train_set) == 12 and len(dm.val_set) == 3 and dm.test_set is dm.val_set
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 8, 8) and y.dtype == torch.int64
    # evaluation preprocessing equals load_image_file (what zoo predict uses)
    base = dm.val_set.base
    index = dm.val_set.indices[0]
    path = base.samples[index][0]
    torch.testing.assert_close(dm.val_set[0][0], vdata.load_image_file(path, 8, 1, (0.5,), (0.5,)))
    with pytest.raises(ValueError, match="data.num_classes=4"):
        vdata.ImageFolderDataModule(str(tmp_path), num_classes=4)
    _write_images(tmp_path, "val", ["cat", "dog"], 2)
    bad = vdata.ImageFolderDataModule(str(tmp_path), img_size=8)
    with pytest.raises(ValueError, match=r"val lacks classes \['eel'\] of .*train; give every split all class folders"):
        bad.setup()


def test_image_folder_reads_what_predict_reads_and_names_an_empty_class_folder(tmp_path):
    """GIFs were classified by zoo predict (IMAGE_EXTENSIONS) but silently left out of training and zoo eval
    (torchvision's ImageFolder default list has no .gif); an empty class folder in val/ gave torchvision's
    message, which names neither the split nor the folder."""
    _write_images(tmp_path, "train", ["cat", "dog"], 2)
    for name in ("cat", "dog"):
        Image.new("P", (12, 10), 3).save(tmp_path / "train" / name / "anim.GIF")
    dm = vdata.ImageFolderDataModule(str(tmp_path), img_size=8, val_fraction=0, num_classes=2)
    _write_images(tmp_path, "test", ["cat", "dog"], 1)
    dm.setup()
    assert len(dm.train_set) == 6
    (tmp_path / "val" / "cat").mkdir(parents=True)
    (tmp_path / "val" / "dog").mkdir(parents=True)
    (tmp_path / "val" / "cat" / "0.png").write_bytes((tmp_path / "test" / "cat" / "0.png").read_bytes())
    (tmp_path / "val" / "dog" / "notes.txt").write_text("no image here")
    with pytest.raises(FileNotFoundError, match=r"val/dog holds no image .*put at least one image in every class"):
        vdata.ImageFolderDataModule(str(tmp_path), img_size=8, num_classes=2).setup()


@pytest.mark.parametrize("variant", ["ten", 10.5, True, 20])
def test_cifar_variant_is_named(tmp_path, variant):
    """variant='ten' gave int()'s "invalid literal for int() with base 10" before the 10-or-100 check ran."""
    with pytest.raises(ValueError, match="CIFAR variant must be 10 or 100"):
        vdata.CIFARDataModule(str(tmp_path), variant=variant)


@pytest.mark.parametrize("augment", ["crop", "standard"])
def test_image_folder_hflip_probability(tmp_path, augment):
    # data.hflip is timm's --hflip: the training flip's probability. With the same per-sample seed, hflip=1
    # gives the mirror image of hflip=0's sample (the crop draws come first and are the same); digits or text,
    # whose mirror image is another class, train with hflip=0
    _write_images(tmp_path, "train", ["cat", "dog"], 3)
    _write_images(tmp_path, "test", ["cat", "dog"], 1)
    samples = {}
    for hflip in (0.0, 1.0):
        dm = vdata.ImageFolderDataModule(str(tmp_path), img_size=8, mean=(0.5,), std=(0.5,), augment=augment,
                                         val_fraction=0.0, hflip=hflip)
        dm.setup()
        samples[hflip] = torch.stack([dm.train_set[i][0] for i in range(len(dm.train_set))])
    assert not torch.equal(samples[0.0], samples[0.0].flip(-1))
    torch.testing.assert_close(samples[1.0], samples[0.0].flip(-1), rtol=0, atol=0)
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(ValueError, match="hflip must be a probability"):
            vdata.ImageFolderDataModule(str(tmp_path), hflip=bad)
    with pytest.raises(ValueError, match="hflip must be a probability"):
        vdata.CIFARDataModule(str(tmp_path), hflip=2)


def test_missing_local_data_says_what_to_put_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train/<class_name>/<image file>"):
        vdata.ImageFolderDataModule(str(tmp_path / "images"))
    with pytest.raises(FileNotFoundError) as info:
        vdata.CIFARDataModule(str(tmp_path), variant=10)
    message = str(info.value)
    assert "cifar-10-batches-py" in message and "data_batch_1" in message and "cifar-10-python.tar.gz" in message
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python.*train, test, meta"):
        vdata.CIFARDataModule(str(tmp_path), variant=100)
    with pytest.raises(ValueError, match="variant must be 10 or 100"):
        vdata.CIFARDataModule(str(tmp_path), variant=20)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P"])
def test_predict_preprocessing_of_other_image_modes_equals_training(tmp_path, mode):
    """zoo predict reads a file as training's ImageFolder does (RGB first): alpha channels (RGBA, LA) raised an
    unpacking error, and a grayscale file differed by one level from the training pipeline's values."""
    from PIL import Image

    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 255, (9, 11, 4), dtype=np.uint8), "RGBA").convert(mode)
    root = tmp_path / "set"
    (root / "train" / "only").mkdir(parents=True)
    (root / "train" / "other").mkdir(parents=True)
    for folder in ("only", "other"):
        for name in ("0.png", "1.png"):
            image.save(root / "train" / folder / name)
    for in_chans in (1, 3):
        stats = ((0.5,) * in_chans, (0.5,) * in_chans)
        dm = vdata.ImageFolderDataModule(str(root), img_size=8, in_chans=in_chans, mean=stats[0], std=stats[1],
                                         val_fraction=0.5, num_classes=2)
        dm.setup()
        path = dm.val_set.base.samples[dm.val_set.indices[0]][0]
        torch.testing.assert_close(vdata.load_image_file(path, 8, in_chans, *stats), dm.val_set[0][0], rtol=0, atol=0)


def test_image_folder_validation_choices_are_explicit(tmp_path):
    """val_fraction=0 trains on every train image and validates on test/ (as the digits do), or says what is
    missing; it used to become 0.1 silently. eval_batch_size=0 used to mean the default silently."""
    _write_images(tmp_path, "train", ["cat", "dog"], 3)
    dm = vdata.ImageFolderDataModule(str(tmp_path), img_size=8, val_fraction=0.0, num_classes=2)
    with pytest.raises(ValueError, match="val_fraction=0 trains on every image .* has neither val/ nor test/"):
        dm.setup()
    _write_images(tmp_path, "test", ["cat", "dog"], 2)
    dm = vdata.ImageFolderDataModule(str(tmp_path), img_size=8, val_fraction=0.0, num_classes=2)
    dm.setup()
    assert len(dm.train_set) == 6 and len(dm.val_set) == 4 and len(dm.test_set) == 4
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="eval_batch_size must be a positive int, or null"):
            vdata.ImageFolderDataModule(str(tmp_path), eval_batch_size=bad, num_classes=2)


def test_load_image_file_errors(tmp_path):
    (tmp_path / "note.png").write_text("not an image")
    with pytest.raises(ValueError, match="is not a readable image"):
        vdata.load_image_file(tmp_path / "note.png", 8, 1, (0.5,), (0.5,))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vdata.load_image_file(tmp_path / "missing.png", 8, 1, (0.5,), (0.5,))


def _write_cifar(root, variant: int, per_class: int = 3):
    """A tiny CIFAR root in the layout of the official python archives (pickled dicts of uint8 rows)."""
    import pickle

    num_classes = variant
    label_key = "labels" if variant == 10 else "fine_labels"
    folder = root / ("cifar-10-batches-py" if variant == 10 else "cifar-100-python")
    folder.mkdir(parents=True)
    rng = np.random.default_rng(variant)

    def batch(n):
        labels = [i % num_classes for i in range(n)]
        return {"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8), label_key: labels}

    names = [f"class{i}" for i in range(num_classes)]
    if variant == 10:
        for i in range(1, 6):
            (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(2 * num_classes)))
        (folder / "test_batch").write_bytes(pickle.dumps(batch(num_classes)))
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    else:
        (folder / "train").write_bytes(pickle.dumps(batch(per_class * num_classes)))
        (folder / "test").write_bytes(pickle.dumps(batch(num_classes)))
        (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": names}))
    return folder


@pytest.mark.parametrize("variant", [10, 100])
def test_cifar_datamodule_reads_a_local_root(tmp_path, monkeypatch, variant):
    """CIFAR-10/100 from a local root in torchvision's layout: splits, class names, preprocessing; a root with
    the right names but wrong contents fails torchvision's checksum and says to re-extract."""
    import torchvision.datasets.cifar as tv_cifar

    _write_cifar(tmp_path, variant)
    with pytest.raises(FileNotFoundError, match="incomplete or corrupt.*re-extract"):
        vdata.CIFARDataModule(str(tmp_path), variant=variant)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)  # our fake files have other md5s
    dm = vdata.CIFARDataModule(str(tmp_path), variant=variant, batch_size=4, val_fraction=0.1 if variant == 10 else 0.4, augment="crop", num_workers=0)
    assert dm.num_classes == variant and dm.class_names == [f"class{i}" for i in range(variant)]
    dm.setup()
    n_train = 10 * variant if variant == 10 else 3 * variant
    assert len(dm.train_set) + len(dm.val_set) == n_train and len(dm.test_set) == variant
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    # evaluation preprocessing: ToTensor + normalise with the dataset statistics, no augmentation
    image, label = dm.test_set[0]
    raw = torch.from_numpy(dm.test_set.base.data[0]).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(dm.mean).view(3, 1, 1), torch.tensor(dm.std).view(3, 1, 1)
    torch.testing.assert_close(image, (raw - mean) / std)
    assert label == 0


def test_normalisation_values_are_named(tmp_path):
    """data.mean=imagenet gave "could not convert string to float: 'i'", data.mean=0.5 "'float' object is not
    iterable"; a single number now means every channel, and a word other than 'model' is named."""
    _write_images(tmp_path, "train", ["cat", "dog"], 3)
    dm = vdata.ImageFolderDataModule(str(tmp_path), img_size=8, mean=0.5, std=0.25, num_classes=2)
    assert dm.mean == (0.5, 0.5, 0.5) and dm.std == (0.25, 0.25, 0.25)
    with pytest.raises(ValueError, match="mean must be a list of numbers .* or 'model'.*got 'imagenet'"):
        vdata.ImageFolderDataModule(str(tmp_path), img_size=8, mean="imagenet", std="imagenet", num_classes=2)


def test_loader_workers_auto_is_capped_at_the_cpus(monkeypatch):
    """The image-folder and CIFAR configs ask for data.num_workers=auto: 4 workers, at most the CPUs this process
    may use (the fixed 4 made torch warn on 2-core machines at every evaluation); ints pass, the rest is named."""
    from zoo.tasks.vision.data import loader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert loader_workers("auto") == 2 and loader_workers(0) == 0 and loader_workers(6) == 6
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert loader_workers("auto") == 4
    for bad in (-1, 1.5, True, "four"):
        with pytest.raises(ValueError, match=r"num_workers must be an int >= 0 or 'auto'"):
            loader_workers(bad)
    for name in ("image_folder", "cifar10", "cifar100"):
        text = (Path(__file__).resolve().parents[1] / "configs" / "data" / f"{name}.yaml").read_text()
        assert "\nnum_workers: auto" in text


def test_sixteen_bit_and_float_images_read_as_their_eight_bit_originals(tmp_path):
    """A 16-bit PNG (Pillow mode I;16) was read through Pillow's convert(), which clips every value above 255:
    the digit became almost pure white and zoo predict answered 8 for a 1, silently, in train / eval / predict /
    viz alike. 16-bit and 32-bit integer images are scaled to 8 bits (x / 257) and float images from [0, 1];
    a corrupt file in an image folder is named in a warning (it was a PIL traceback), and skipped."""
    eight = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(eight).save(tmp_path / "d8.png")
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "d16.png")
    Image.fromarray(eight.astype(np.int32) * 257).save(tmp_path / "d32.tiff")
    Image.fromarray(eight.astype(np.float32) / 255).save(tmp_path / "dF.tiff")
    assert Image.open(tmp_path / "d16.png").mode == "I;16"
    want = vdata.load_image_file(tmp_path / "d8.png", 8, 1, (0.5,), (0.5,))
    for name in ("d16.png", "d32.tiff", "dF.tiff"):
        torch.testing.assert_close(vdata.load_image_file(tmp_path / name, 8, 1, (0.5,), (0.5,)), want, rtol=0, atol=1e-6)
    for split in ("train", "val", "test"):
        for cls in ("a", "b"):
            (tmp_path / "root" / split / cls).mkdir(parents=True)
            Image.fromarray(eight).save(tmp_path / "root" / split / cls / "x8.png")
            Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "root" / split / cls / "x16.png")
    module = vdata.ImageFolderDataModule(root=str(tmp_path / "root"), img_size=8, in_chans=1, num_classes=2,
                                         batch_size=2, num_workers=0)
    module.setup("test")
    images = [module.test_set[i][0] for i in range(len(module.test_set))]
    torch.testing.assert_close(images[0], images[1])  # x16.png and x8.png of class a
    (tmp_path / "root" / "test" / "a" / "bad.png").write_bytes(b"not an image")
    module = vdata.ImageFolderDataModule(root=str(tmp_path / "root"), img_size=8, in_chans=1, num_classes=2,
                                         batch_size=2, num_workers=0)
    module.setup("test")
    with pytest.warns(UserWarning, match=r"bad\.png is not a readable image"):  # skipped, as timm skips it
        [module.test_set[i] for i in range(len(module.test_set))]


def test_numeric_data_options_are_checked_and_named(tmp_path):
    """data.shift=-3 silently turned the shift augmentation off (and 1.7 became 1), a NaN rotate / scale made every
    augmented image NaN, scale >= 1 zoomed by 1 + scale * u <= 0, and val_fraction='x' was a bare float() error
    (audit 2026-12-06): each is refused in one line naming the option."""
    for kwargs, message in [
        (dict(shift=-3), r"shift must be an integer >= 0, got -3"),
        (dict(shift=1.7), r"shift must be an integer >= 0, got 1.7"),
        (dict(shift="1"), r"shift must be an integer >= 0, got '1'"),
        (dict(rotate=float("nan")), r"rotate \(degrees\) must be a number in \[0.0, 180.0\], got nan"),
        (dict(rotate=-10.0), r"rotate \(degrees\) must be a number in \[0.0, 180.0\]"),
        (dict(scale=1.0), r"scale must be a number in \[0.0, 1.0\), got 1.0"),
        (dict(scale=float("inf")), r"scale must be a number in \[0.0, 1.0\), got inf"),
        (dict(val_fraction="x"), r"val_fraction must be a number in \[0.0, 1.0\), got 'x'"),
        (dict(val_fraction=float("nan")), r"val_fraction must be a number in \[0.0, 1.0\), got nan"),
        (dict(seed=1.5), r"seed must be an integer, got 1.5"),
        (dict(split_seed="a"), r"split_seed must be an integer >= 0, got 'a'"),
        (dict(crop_pct=0.0), r"crop_pct must be a number in \(0, 1\] .*or 'model'.*got 0.0"),
        (dict(crop_pct=float("nan")), r"crop_pct must be a number in \(0, 1\]"),
        (dict(interpolation="nearest"), r"interpolation must be bilinear, bicubic or 'model'.*got 'nearest'"),
        (dict(crop_pct=0.875), r"the digits are evaluated uncropped with a bilinear resize"),
    ]:
        with pytest.raises(ValueError, match=message):
            vdata.DigitsDataModule(augment="shift", **kwargs)
    _write_images(tmp_path, "train", ["cat", "dog"], 3)
    with pytest.raises(ValueError, match=r"crop_pct must be a number in \(0, 1\]"):
        vdata.ImageFolderDataModule(str(tmp_path), img_size=8, mean=0.5, std=0.5, crop_pct=1.5)
    assert vdata.DigitsDataModule(augment="shift", shift=0, rotate=0.0, scale=0.0).shift == 0  # the limits are valid


def test_seed_draws_the_order_and_augmentation_and_split_seed_the_validation_split():
    """data.seed drove both the training order / augmentation and the validation split, and the data configs fixed
    it at 0, so zoo train seed=S (timm's --seed) changed neither; with the seed now ${seed}, the split has its own
    split_seed, so runs of different seeds validate on the same images (audit 2026-12-06)."""
    def module(**kwargs):
        dm = vdata.DigitsDataModule(augment="shift", batch_size=32, **kwargs)
        dm.setup()
        return dm

    one, two, split = module(seed=1), module(seed=2), module(seed=1, split_seed=1)
    assert torch.equal(one.val_set.images, two.val_set.images) and torch.equal(one.val_set.labels, two.val_set.labels)
    assert not torch.equal(one.val_set.labels, split.val_set.labels)
    assert torch.equal(one.train_set.labels, two.train_set.labels)  # the same training images ...
    first, second = next(iter(one.train_dataloader())), next(iter(two.train_dataloader()))
    assert not torch.equal(first[1], second[1])  # ... in another order
    shifted = [not torch.equal(one.train_set[i][0], two.train_set[i][0]) for i in range(20)]
    assert any(shifted)  # ... and another augmentation of the same image
    again = next(iter(module(seed=1).train_dataloader()))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    expected = torch.tensor(load_digits().target[vdata.digits_splits(0.1, 0)["val"]])  # split_seed's default, 0
    assert torch.equal(module(seed=5).val_set.labels, expected)



def test_image_folder_validation_split_follows_split_seed_only(tmp_path):
    """The image folder's held-out images (val_fraction of train/) are drawn by split_seed, not by seed."""
    _write_images(tmp_path, "train", ["cat", "dog"], 10)

    def held_out(**kwargs):
        dm = vdata.ImageFolderDataModule(str(tmp_path), img_size=8, mean=0.5, std=0.5, val_fraction=0.3, num_classes=2,
                                         **kwargs)
        dm.setup()
        return dm.val_set.indices

    assert held_out(seed=1) == held_out(seed=2) != held_out(seed=1, split_seed=1)


@pytest.mark.parametrize("shape", [(61, 47), (30, 90)])
def test_model_crop_and_interpolation_evaluate_as_timm(tmp_path, shape):
    """Image folders evaluated with a bilinear resize and no crop, while timm's train.py / validate.py evaluate with
    the model's pretrained_cfg (vit_debug: bicubic, crop_pct 0.9). data.crop_pct=model data.interpolation=model give
    timm's evaluation transform, and eval_preprocessing() (recorded with released weights, what zoo predict and
    timm.data.create_transform read back) names the transform used (audit 2026-12-06)."""
    import timm.data

    import zoo

    _write_images(tmp_path, "train", ["cat", "dog"], 3, size=shape)
    model = zoo.create_model("vit_debug", num_classes=2)  # 32 px, bicubic, crop_pct 0.9, ImageNet statistics
    dm = vdata.ImageFolderDataModule(str(tmp_path), img_size=32, mean="model", std="model", crop_pct="model",
                                     interpolation="model", val_fraction=0.5, num_classes=2)
    dm.adopt_model_stats(model)
    dm.setup()
    assert dm.eval_preprocessing() == {"crop_pct": 0.9, "crop_mode": "center", "interpolation": "bicubic"}
    timm_eval = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    recorded = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=dict(
        input_size=(3, 32, 32), mean=dm.mean, std=dm.std, **dm.eval_preprocessing())))
    for index in range(len(dm.val_set)):
        path = dm.val_set.base.samples[dm.val_set.indices[index]][0]
        image = Image.open(path).convert("RGB")
        ours = dm.val_set[index][0]
        assert ours.shape == (3, 32, 32)
        std = torch.tensor(dm.std).view(3, 1, 1)
        for theirs in (timm_eval(image), recorded(image)):
            assert float(((ours - theirs) * std).abs().max()) <= 1 / 255 + 1e-6  # within one 8-bit level
        # what a predictor given the recorded facts computes (load_image_file: zoo predict's reader)
        torch.testing.assert_close(vdata.load_image_file(path, 32, 3, dm.mean, dm.std, **dm.eval_preprocessing()), ours)
    # the default still resizes bilinearly without a crop, and records that
    plain = vdata.ImageFolderDataModule(str(tmp_path), img_size=32, mean=0.5, std=0.5, val_fraction=0.5, num_classes=2)
    plain.adopt_model_stats(model)
    assert plain.eval_preprocessing() == {"crop_pct": 1.0, "crop_mode": "center", "interpolation": "bilinear"}
    unresolved = vdata.ImageFolderDataModule(str(tmp_path), img_size=32, mean=0.5, std=0.5, crop_pct="model", num_classes=2)
    with pytest.raises(RuntimeError, match="'model' need adopt_model_stats"):
        unresolved.setup()


# --------------------------------------------------------------------------------------------------
# timm train.py's augmentations: auto_augment, color_jitter (+ color_jitter_prob), grayscale_prob,
# gaussian_blur_prob, reprob / remode / recount, scale / ratio, vflip, train_interpolation
# --------------------------------------------------------------------------------------------------
def _augmented_folder(tmp_path, **options):
    """A 2-class image folder of 19x23 images, every image a training image, trained at 16 px with ``options``."""
    if not (tmp_path / "train").is_dir():
        _write_images(tmp_path, "train", ["cat", "dog"], 3, size=(19, 23))
        _write_images(tmp_path, "test", ["cat", "dog"], 1)
    options = {"img_size": 16, "mean": 0.5, "std": 0.25, "val_fraction": 0.0, "seed": 7, "num_classes": 2, **options}
    dm = vdata.ImageFolderDataModule(str(tmp_path), **options)
    dm.setup()
    return dm


def _training_images(dm, epochs=3) -> torch.Tensor:
    """Every training image of epochs 0..epochs-1, in 8-bit levels (mean 0.5, std 0.25 undone)."""
    images = []
    for epoch in range(epochs):
        dm.train_set.epoch = epoch
        images.append(torch.stack([dm.train_set[i][0].as_subclass(torch.Tensor) for i in range(len(dm.train_set))]))
    return (torch.stack(images) * 0.25 + 0.5) * 255


def _training_levels_digest(dm, epochs=3) -> str:
    """sha256 of the 8-bit levels of every training image, epochs 0..epochs-1 (:func:`_training_images`)."""
    import hashlib

    levels = torch.round(_training_images(dm, epochs)).to(torch.uint8)
    return hashlib.sha256(levels.numpy().tobytes()).hexdigest()[:16]


# digests of the training images before the timm options existed (the pipeline of 2026-12-06)
_DEFAULT_TRAINING_DIGESTS = {
    ("standard", 1): "9113f6e26ab639d7", ("standard", 3): "77ee3591e70d77e5",
    ("crop", 1): "24cd04b2abaaa6b5", ("crop", 3): "ca6c6cde13b41eb3",
}


@pytest.mark.parametrize("augment, in_chans", sorted(_DEFAULT_TRAINING_DIGESTS))
def test_default_augmentation_trains_on_the_same_tensors_as_before_the_timm_options(tmp_path, augment, in_chans):
    """Adding timm's augmentations (and seeding Python's and NumPy's RNGs per sample) must not change what an
    existing configuration trains on: the same seed gives the same training tensors as before, epoch by epoch,
    both with the options left out and with the values the data configs now spell out."""
    from omegaconf import OmegaConf

    config = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "data" / "image_folder.yaml")
    spelled_out = {name: config[name] for name in vdata._TIMM_AUGMENT_OPTIONS}
    assert spelled_out["auto_augment"] is None and spelled_out["reprob"] == 0 and spelled_out["color_jitter"] is None
    assert (spelled_out["vflip"], spelled_out["train_interpolation"], spelled_out["color_jitter_prob"],
            spelled_out["grayscale_prob"], spelled_out["gaussian_blur_prob"]) == (0, "bilinear", None, 0, 0)
    for options in ({}, spelled_out):
        dm = _augmented_folder(tmp_path, augment=augment, in_chans=in_chans, **options)
        assert _training_levels_digest(dm) == _DEFAULT_TRAINING_DIGESTS[augment, in_chans], options


_TIMM_OPTION_CASES = [
    dict(augment="standard", auto_augment="rand-m9-mstd0.5-inc1", reprob=0.5),
    dict(augment="standard", auto_augment="augmix-m5-w4-d2", reprob=0.6, remode="rand", recount=3,
         scale=[0.08, 1.0], ratio=[0.5, 2.0]),
    dict(augment="crop", auto_augment="3a", color_jitter=0.4, reprob=0.5, remode="const"),
    dict(augment="standard", color_jitter=0.4, in_chans=1, scale=(0.2, 0.6)),
    dict(augment="crop", auto_augment="original", in_chans=1, reprob=1.0),
    dict(augment="standard", vflip=0.5, train_interpolation="bicubic", color_jitter=[0.4, 0.3, 0.2, 0.1],
         color_jitter_prob=0.8),
    dict(augment="standard", train_interpolation="random", auto_augment="rand-m9-mstd0.5-inc1", grayscale_prob=0.5,
         gaussian_blur_prob=0.5, vflip=1.0, reprob=0.5),
    dict(augment="crop", vflip=0.5, train_interpolation="nearest", color_jitter=(0.4, 0.4, 0.4), grayscale_prob=0.3),
    dict(augment="standard", in_chans=1, train_interpolation="nearest", gaussian_blur_prob=1.0, vflip=0.3),
    dict(augment="crop", in_chans=1, train_interpolation="random", auto_augment="3a", color_jitter=[0.3, 0.3, 0.3, 0.2],
         gaussian_blur_prob=0.3),
]


def _timm_crop(options, in_chans, timm_crop):
    """The zoo's crop as timm's ops would make it: the image tensor resized bilinearly by torchvision (the default);
    with another train_interpolation, the PIL image resized with that filter: timm's own
    RandomResizedCropAndInterpolation (its box drawn by torchvision's get_params, from torch's RNG, as the zoo
    draws it), or for augment=crop (not a timm mode) torchvision's Resize with the filter timm's random.choice over
    timm's _RANDOM_INTERPOLATION picks. The channels are converted on the tensor before either (timm converts none;
    the zoo's conversion is the tensor's on every path). A PIL image out."""
    import random

    from timm.data.transforms import _RANDOM_INTERPOLATION, str_to_interp_mode
    from torchvision import transforms as T1
    from torchvision.transforms import v2 as T

    channels = T.Grayscale(1) if in_chans == 1 else T.RGB()
    interpolation = options.get("train_interpolation", "bilinear")
    padded_crop = [T.RandomCrop(16, padding=2)] if options["augment"] == "crop" else []
    if interpolation == "bilinear" and options["augment"] == "standard":
        crop = [T.ToImage(), channels, T.RandomResizedCrop(16, scale=options.get("scale", (0.35, 1.0)),
                                                           ratio=options.get("ratio", (3 / 4, 4 / 3)), antialias=True)]
    elif interpolation == "bilinear":
        crop = [T.ToImage(), channels, T.Resize(16, antialias=True), *padded_crop]
    elif options["augment"] == "standard":
        timm_crop.get_params = T1.RandomResizedCrop.get_params
        crop = [T.ToImage(), channels, T.ToPILImage(), timm_crop, T.ToImage()]
    else:
        def resize(image):
            mode = random.choice(_RANDOM_INTERPOLATION) if interpolation == "random" else str_to_interp_mode(interpolation)
            return T1.Resize(16, interpolation=mode)(image)
        crop = [T.ToImage(), channels, T.ToPILImage(), resize, T.ToImage(), *padded_crop]
    return T.Compose([*crop, T.ToPILImage()])


@pytest.mark.parametrize("options", _TIMM_OPTION_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_timm_augmentations_are_timms_ops_under_the_same_seed(tmp_path, options):
    """Each training image equals timm's ops applied in timm's order under the same per-sample RNG state: the zoo's
    crop (torchvision on the tensor, unchanged; with another train_interpolation timm's crop op, :func:`_timm_crop`),
    then the flips of the primary stage (hflip, vflip), the secondary stage (AA / colour jitter / grayscale / blur
    on the PIL image) and the final stage (normalise, RandomErasing) of timm.data.create_transform(is_training=True,
    separate=True, same options). The whole create_transform cannot match: its crop draws its box from Python's
    RNG where the zoo's draws from torch's, so every later draw would differ. ToTensor and ToDtype round 1/255
    differently (one float ulp): equal to 1e-6."""
    import timm.data

    dm = _augmented_folder(tmp_path, **options)
    in_chans, ta = dm.in_chans, dm.timm_augment
    mean, std = (0.5,) * in_chans, (0.25,) * in_chans
    primary, secondary, final = timm.data.create_transform(
        16, is_training=True, separate=True, scale=options.get("scale", (0.35, 1.0)),
        ratio=options.get("ratio", (3 / 4, 4 / 3)), hflip=0.5, vflip=options.get("vflip", 0.0),
        color_jitter=options.get("color_jitter"), color_jitter_prob=options.get("color_jitter_prob"),
        grayscale_prob=options.get("grayscale_prob", 0.0), gaussian_blur_prob=options.get("gaussian_blur_prob", 0.0),
        auto_augment=options.get("auto_augment"), interpolation=options.get("train_interpolation", "bilinear"),
        mean=mean, std=std, re_prob=options.get("reprob", 0.0), re_mode=options.get("remode", "pixel"),
        re_count=options.get("recount", 1))
    timm_crop, *timm_flips = primary.transforms
    assert len(timm_flips) == 1 + (options.get("vflip", 0) > 0)
    crop = _timm_crop(options, in_chans, timm_crop)
    plain = _augmented_folder(tmp_path, augment=options["augment"], in_chans=in_chans,
                              scale=ta.scale, ratio=ta.ratio)  # the same crop boxes, no timm ops
    compared = changed = 0
    for epoch in range(4):
        dm.train_set.epoch = plain.train_set.epoch = epoch
        for index in range(len(dm.train_set)):
            ours = dm.train_set[index][0]
            image = dm.train_set.base[index][0]
            with vdata._sample_rng(dm.seed, epoch, index):
                try:
                    flipped = crop(image)
                    for flip in timm_flips:
                        flipped = flip(flipped)
                    theirs = final(secondary(flipped))
                except ValueError as error:  # timm's posterize at 0 bits, which this Pillow refuses
                    assert "bits must be between" in str(error)
                    continue
            torch.testing.assert_close(ours.as_subclass(torch.Tensor), theirs, rtol=0, atol=1e-6)
            compared += 1
            changed += not torch.equal(ours, plain.train_set[index][0])
    assert compared >= 20 and changed >= compared // 2, (compared, changed)


@pytest.mark.parametrize("options", [
    dict(augment="standard", auto_augment="rand-m9-mstd0.5-inc1", reprob=0.5),
    dict(augment="standard", train_interpolation="random", vflip=0.5, color_jitter=[0.4, 0.4, 0.4, 0.1],
         color_jitter_prob=0.5, grayscale_prob=0.3, gaussian_blur_prob=0.5),
], ids=["aa-reprob", "timm-1.0-options"])
def test_timm_augmentations_are_seeded_per_sample(tmp_path, options):
    """timm's AA and random erasing draw from Python's random and NumPy (RandAugment's op choice), which the
    per-sample seeding left alone: a resumed run (or a DataLoader worker) augmented differently. The same
    (seed, epoch, index) now gives the same tensor whatever the global RNGs hold, another epoch another tensor,
    and the global RNGs are left as they were; so too for the vertical flip, colour jitter's RandomApply, the
    grayscale and blur (torch's RNG) and train_interpolation=random's pick (Python's)."""
    import random

    dm = _augmented_folder(tmp_path, **options)
    dm.train_set.epoch = 3
    first = [dm.train_set[i][0] for i in range(len(dm.train_set))]
    for noise in range(3):
        random.seed(100 + noise)
        np.random.seed(200 + noise)
        torch.manual_seed(300 + noise)
        state = random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state()
        again = [dm.train_set[i][0] for i in range(len(dm.train_set))]
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        assert random.getstate() == state[0] and np.array_equal(np.random.get_state()[1], state[1])
        assert torch.equal(torch.random.get_rng_state(), state[2])
    dm.train_set.epoch = 4
    assert all(not torch.equal(a, dm.train_set[i][0]) for i, a in enumerate(first))


@pytest.mark.parametrize("augment", ["crop", "standard"])
def test_vflip_flips_vertically(tmp_path, augment):
    """data.vflip is timm's --vflip: the vertical flip's probability, drawn after the horizontal flip. With the
    same per-sample seed, vflip=1 gives the upside-down image of vflip=0's sample (every earlier draw is the same),
    not the mirror image; the default 0 adds no flip and no draw."""
    samples = {}
    for vflip in (0.0, 1.0):
        dm = _augmented_folder(tmp_path, augment=augment, vflip=vflip)
        samples[vflip] = torch.stack([dm.train_set[i][0] for i in range(len(dm.train_set))])
    unflipped = samples[0.0]
    assert not torch.equal(unflipped, unflipped.flip(-2)) and not torch.equal(unflipped.flip(-1), unflipped.flip(-2))
    torch.testing.assert_close(samples[1.0], unflipped.flip(-2), rtol=0, atol=0)


def test_train_interpolation_resamples_the_crop_with_that_filter(tmp_path):
    """train_interpolation changes only the crop's filter, not its box (drawn from torch's RNG as by default):
    bilinear (the default) resizes the tensor, the others the PIL image with Pillow's filter as timm does (torch's
    bicubic and nearest kernels differ from Pillow's); random picks bilinear or bicubic per image, both occur."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2 as T

    by_mode = {mode: _augmented_folder(tmp_path, augment="standard", hflip=0.0, train_interpolation=mode)
               for mode in ("bicubic", "nearest", "random")}
    crop = T.RandomResizedCrop(16, scale=(0.35, 1.0))
    picks = set()
    for index in range(len(by_mode["random"].train_set)):
        image = by_mode["random"].train_set.base[index][0]
        with vdata._sample_rng(7, 0, index):
            box = crop.make_params([T.ToImage()(image)])
        want = {}
        for mode in ("bilinear", "bicubic", "nearest"):
            resized = T.functional.resized_crop(image, box["top"], box["left"], box["height"], box["width"], [16, 16],
                                                interpolation=InterpolationMode(mode))
            want[mode] = (T.functional.pil_to_tensor(resized).float() / 255 - 0.5) / 0.25
        for mode in ("bicubic", "nearest"):
            ours = by_mode[mode].train_set[index][0].as_subclass(torch.Tensor)
            torch.testing.assert_close(ours, want[mode], rtol=0, atol=1e-6)
        ours = by_mode["random"].train_set[index][0].as_subclass(torch.Tensor)
        picked = [mode for mode in ("bilinear", "bicubic") if torch.allclose(ours, want[mode], rtol=0, atol=1e-6)]
        assert picked, index
        picks.update(picked)
    assert picks == {"bilinear", "bicubic"}


@pytest.mark.parametrize("in_chans", [1, 3])
def test_train_interpolation_converts_channels_as_the_default_without_a_resize(tmp_path, in_chans):
    """A train_interpolation other than bilinear resizes the PIL image, and converted it to gray there with Pillow's
    convert("L"), which rounds where the default path's tensor conversion (and every evaluation's) truncates: with
    augment=crop at the images' own size, where nothing is resampled, 47% of the gray pixels came out one level
    brighter than bilinear's (review of c315f3c). The channels are now the tensor's conversion on every path, so
    with no resampling bicubic, nearest and random give exactly the default path's tensors (pinned by
    :func:`test_default_augmentation_trains_on_the_same_tensors_as_before_the_timm_options`), epoch by epoch; so
    does a bicubic evaluation at crop_pct 1.0 (zoo predict's reader)."""
    own_size = 19  # the shorter side of _augmented_folder's 19x23 images: the crop's resize keeps them as they are
    default = _training_images(_augmented_folder(tmp_path, augment="crop", img_size=own_size, in_chans=in_chans))
    for mode in ("bicubic", "nearest", "random"):
        dm = _augmented_folder(tmp_path, augment="crop", img_size=own_size, in_chans=in_chans, train_interpolation=mode)
        torch.testing.assert_close(_training_images(dm), default, rtol=0, atol=0,
                                   msg=lambda message: f"train_interpolation={mode}: {message}")
    path = dm.train_set.base.samples[0][0]
    stats = (0.5,) * in_chans, (0.25,) * in_chans
    torch.testing.assert_close(vdata.load_image_file(path, own_size, in_chans, *stats, interpolation="bicubic"),
                               vdata.load_image_file(path, own_size, in_chans, *stats), rtol=0, atol=0)


@pytest.mark.parametrize("augment", ["standard", "crop"])
def test_random_interpolation_picking_bilinear_is_within_a_level_of_the_default_for_gray_images(tmp_path, augment):
    """With a resize, train_interpolation=random's bilinear pick (Pillow's filter on the PIL image) differs from the
    default bilinear path (torch's on the tensor) by rounding only: at most one 8-bit level and no bias, for gray
    images as for colour ones. Gray images converted by Pillow (rounding) were two levels off and half a level
    brighter on average (review of c315f3c)."""
    import random

    for in_chans in (1, 3):
        default = _training_images(_augmented_folder(tmp_path, augment=augment, in_chans=in_chans))
        random_pick = _training_images(_augmented_folder(tmp_path, augment=augment, in_chans=in_chans,
                                                         train_interpolation="random"))
        differences = []
        for epoch in range(default.shape[0]):
            for index in range(default.shape[1]):
                with vdata._sample_rng(7, epoch, index):  # the pick: timm's random.choice([bilinear, bicubic])
                    bilinear_picked = random.choice([True, False])
                if bilinear_picked:
                    differences.append(random_pick[epoch, index] - default[epoch, index])
        differences = torch.stack(differences)
        assert len(differences) >= 5 and differences.shape[1] == in_chans
        assert float(differences.abs().max()) <= 1 + 1e-3, (in_chans, float(differences.abs().max()))
        assert abs(float(differences.mean())) < 0.1, (in_chans, float(differences.mean()))


def test_posterize_at_zero_bits_is_the_black_image_timm_expects():
    """RandAugment's PosterizeIncreasing keeps 0 bits at magnitude 10 (rand-m9-mstd0.5 reaches it), which Pillow
    now refuses ("bits must be between or equal to 1 and 8"): training stopped at a random step. Each level is
    Pillow's rule, the value masked with ~(2**(8 - bits) - 1), 0 bits included."""
    from timm.data import auto_augment

    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for mode in ("L", "RGB"):
        image = Image.fromarray(pixels).convert(mode)
        for bits in range(9):
            want = np.asarray(image) & (~(2 ** (8 - bits) - 1) & 0xFF)
            np.testing.assert_array_equal(np.asarray(vdata._posterize_any_bits(image, bits)), want)
    with pytest.raises(ValueError, match="bits must be between"):  # the failure this guards against
        auto_augment.posterize(Image.fromarray(pixels), 0)
    dm_kwargs = dict(augment="standard", auto_augment="rand-n15-m10-mstd0-inc1")  # every op, posterize at 0 bits
    transform = vdata._image_transform(16, 3, (0.5,) * 3, (0.5,) * 3, True, "standard",
                                       timm_augment=vdata._TimmAugment(dm_kwargs["augment"], 16, 3,
                                                                       auto_augment=dm_kwargs["auto_augment"]))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (19, 23, 3), dtype=np.uint8))
    for index in range(20):
        with vdata._sample_rng(0, 0, index):
            assert torch.isfinite(transform(image)).all()


def test_timm_augment_options_are_checked_and_named(tmp_path):
    """Each bad value is refused in one line naming the option (timm itself asserts, skips a section without a
    value, or fails at the first image); options that an augment mode would ignore are refused, as is colour
    jitter beside an AA policy (timm drops it silently); the in-memory digits refuse them all."""
    _write_images(tmp_path, "train", ["cat", "dog"], 3)
    cases = [
        (dict(auto_augment="rand-x9"), r"auto_augment='rand-x9' is not a timm policy string \(Unknown RandAugment"),
        (dict(auto_augment="rand-m9-inc"), r"auto_augment='rand-m9-inc' is not a timm policy string \(section 'inc'"),
        (dict(auto_augment="imagenet"), r"auto_augment='imagenet' is not a timm policy string"),
        (dict(auto_augment=""), r"auto_augment must be null or a timm policy string"),
        (dict(auto_augment=9), r"auto_augment must be null or a timm policy string"),
        (dict(reprob=1.5), r"reprob must be a probability in \[0, 1\], got 1.5"),
        (dict(reprob=float("nan")), r"reprob must be a probability in \[0, 1\]"),
        (dict(reprob="0.25"), r"reprob must be a probability in \[0, 1\]"),
        (dict(remode="noise"), r"remode must be one of pixel, rand, const .*got 'noise'"),
        (dict(recount=0), r"recount must be an integer >= 1, got 0"),
        (dict(recount=1.5), r"recount must be an integer >= 1, got 1.5"),
        (dict(color_jitter=-0.1), r"color_jitter must be null, a number >= 0"),
        (dict(color_jitter="strong"), r"color_jitter must be null, a number >= 0"),
        (dict(color_jitter=[0.4, 0.4]), r"color_jitter must be null, a number >= 0 .* or a list \[brightness, "
                                        r"contrast, saturation\] or \[..., hue\].*got \[0.4, 0.4\]"),
        (dict(color_jitter=[0.4] * 5), r"color_jitter must be null, a number >= 0 .*got \[0.4, 0.4, 0.4, 0.4, 0.4\]"),
        (dict(color_jitter=[0.4, -0.1, 0.4]), r"color_jitter must be .*numbers >= 0 with hue <= 0.5"),
        (dict(color_jitter=[0.4, 0.4, 0.4, 0.6]), r"color_jitter must be .*with hue <= 0.5 .*got \[0.4, 0.4, 0.4, 0.6\]"),
        (dict(color_jitter=[0.4, 0.4, 0.4, -0.1]), r"color_jitter must be .*with hue <= 0.5"),
        (dict(color_jitter=[0.4, float("nan"), 0.4]), r"color_jitter must be null, a number >= 0"),
        (dict(color_jitter=0.4, color_jitter_prob=1.5), r"color_jitter_prob must be a probability in \[0, 1\], got 1.5"),
        (dict(color_jitter_prob=0.5), r"color_jitter_prob=0.5 is the probability of the colour jitter, but "
                                      r"color_jitter is null"),
        (dict(grayscale_prob=2), r"grayscale_prob must be a probability in \[0, 1\], got 2"),
        (dict(grayscale_prob=0.2, in_chans=1), r"grayscale_prob=0.2 turns colour images gray, but in_chans=1"),
        (dict(gaussian_blur_prob=-0.5), r"gaussian_blur_prob must be a probability in \[0, 1\], got -0.5"),
        (dict(gaussian_blur_prob=0.5), r"gaussian_blur_prob needs img_size >= 12 .*got img_size=8"),
        (dict(vflip=1.5), r"vflip must be a probability in \[0, 1\], got 1.5"),
        (dict(vflip=-0.1), r"vflip must be a probability in \[0, 1\], got -0.1"),
        (dict(vflip="yes"), r"vflip must be a probability in \[0, 1\]"),
        (dict(train_interpolation="lanczos"), r"train_interpolation must be one of bilinear, bicubic, nearest, random "
                                              r"\(.*--train-interpolation\), got 'lanczos'"),
        (dict(train_interpolation=None), r"train_interpolation must be one of"),
        (dict(augment="none", vflip=0.5), r"vflip augment the training images, but augment=none"),
        (dict(augment="none", train_interpolation="bicubic"), r"train_interpolation augment the training images, but "
                                                             r"augment=none"),
        (dict(augment="none", grayscale_prob=0.1, gaussian_blur_prob=0.1),
         r"grayscale_prob and gaussian_blur_prob augment the training images, but augment=none"),
        (dict(scale=[0.0, 1.0]), r"scale must be a pair \[lo, hi\] of numbers in \(0, 1\] with lo <= hi"),
        (dict(scale=[0.8, 0.2]), r"scale must be a pair \[lo, hi\]"),
        (dict(scale=[0.5, 1.5]), r"scale must be a pair \[lo, hi\]"),
        (dict(scale=0.5), r"scale must be a pair \[lo, hi\].*got 0.5"),
        (dict(scale=[0.5]), r"scale must be a pair \[lo, hi\]"),
        (dict(scale="ab"), r"scale must be a pair \[lo, hi\]"),
        (dict(ratio=[0.0, 1.0]), r"ratio must be a pair \[lo, hi\] of numbers in \(0, inf\]"),
        (dict(ratio=[2.0, 0.5]), r"ratio must be a pair \[lo, hi\]"),
        (dict(augment="crop", scale=[0.08, 1.0]), r"scale and ratio set the random resized crop of augment=standard"),
        (dict(augment="none", reprob=0.25), r"reprob augment the training images, but augment=none"),
        (dict(auto_augment="rand-m9-mstd0.5", color_jitter=0.4), r"color_jitter is not applied with auto_augment="),
    ]
    for kwargs, message in cases:
        kwargs = {"augment": "standard", **kwargs}
        with pytest.raises(ValueError, match=message) as info:
            vdata.ImageFolderDataModule(str(tmp_path), img_size=8, mean=0.5, std=0.5, num_classes=2, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"reprob must be a probability"):  # before CIFAR looks for its files
        vdata.CIFARDataModule(str(tmp_path), reprob=2)
    for kwargs in (dict(reprob=0.25), dict(auto_augment="rand-m9-mstd0.5-inc1"), dict(color_jitter=0.4, ratio=[1, 1]),
                   dict(vflip=0.5), dict(color_jitter_prob=0.5, grayscale_prob=0.2, gaussian_blur_prob=0.1),
                   dict(train_interpolation="bilinear")):
        with pytest.raises(ValueError, match=rf"DigitsDataModule: {', '.join(kwargs)} \(timm's augmentations of PIL "
                                             rf"images.*augment=shift or affine"):
            vdata.DigitsDataModule(augment="shift", **kwargs)
    assert vdata.DigitsDataModule(augment="affine", scale=0.2).scale == 0.2  # the digits' own zoom, as before


def test_digits_refuse_timms_scale_range_by_name():
    """data.scale=[0.08, 1.0] (timm's crop-area range) on the digits said "data.scale must be a number in [0, 1)",
    inviting data.scale=0.08, which is the digits' zoom amplitude: it is named as a timm option they do not take."""
    with pytest.raises(ValueError, match=r"scale=\[lo, hi\] \(timm's augmentations"):
        vdata.DigitsDataModule(batch_size=8, scale=[0.08, 1.0])
    assert vdata.DigitsDataModule(batch_size=8, augment="affine", scale=0.2).scale == 0.2


def _write_pnm(path, magic: str, maxval: int, values) -> None:
    """A binary PGM (P5) / PPM (P6) with the given maxval, written byte by byte (Pillow saves only maxval 255 and
    65535): big-endian 16-bit samples above maxval 255, as the Netpbm format has them."""
    values = np.asarray(values)
    height, width = values.shape[:2]
    samples = values.astype(">u2" if maxval > 255 else np.uint8).tobytes()
    Path(path).write_bytes(f"{magic}\n{width} {height}\n{maxval}\n".encode() + samples)


def test_integer_images_have_one_scale_per_format_not_per_content(tmp_path):
    """A 16-bit PGM (Pillow: mode I) had its scale guessed from its largest pixel: with every value <= 255 it read
    as 8-bit, so 255 came out white and 256 almost black, 257 times brighter than the same image as a 16-bit PNG or
    TIFF. Every value of every deeper integer file now reads as round(v * 255 / maxval) (float64 reference; Pillow
    rescales 12-bit PGMs to 16 bits first, which may move a value by one level), whatever else the file holds;
    8-bit PGMs of a smaller maxval (Pillow: L, rescaled by Pillow) are unchanged."""
    cases = {  # name: (magic, maxval, values)
        "dark16.pgm": ("P5", 65535, [[0, 200, 255, 256]]),
        "darker16.pgm": ("P5", 65535, [[0, 200, 255, 100]]),  # every value <= 255: read as 8-bit, 255 white
        "light16.pgm": ("P5", 65535, [[0, 200, 65535, 40000]]),
        "dark12.pgm": ("P5", 4095, [[0, 16, 200, 255]]),
        "light12.pgm": ("P5", 4095, [[0, 16, 4095, 2048]]),
        "nine.pgm": ("P5", 511, [[0, 16, 511, 256]]),
        "four.pgm": ("P5", 15, [[0, 7, 15, 1]]),
    }
    for name, (magic, maxval, values) in cases.items():
        _write_pnm(tmp_path / name, magic, maxval, values)
        want = np.rint(np.asarray(values, dtype=np.float64) * 255 / maxval)
        got = np.asarray(vdata.read_image(tmp_path / name), dtype=np.float64)
        assert np.abs(got - want).max() <= (1 if maxval not in (255, 65535) else 0), (name, got, want)
    dark = np.full((4, 4), 200, dtype=np.uint16)
    Image.fromarray(dark).save(tmp_path / "dark.png")  # I;16
    Image.fromarray(dark).save(tmp_path / "dark.tif")  # I;16
    Image.fromarray(dark).save(tmp_path / "dark.pgm")  # maxval 65535: Pillow mode I
    assert Image.open(tmp_path / "dark.pgm").mode == "I"
    levels = {name: np.asarray(vdata.read_image(tmp_path / name)) for name in ("dark.png", "dark.tif", "dark.pgm")}
    assert all(np.array_equal(image, np.ones((4, 4), np.uint8)) for image in levels.values()), levels  # 200/257 -> 1


def _gray_folder(root, images):
    """An image folder of 8-bit gray PNGs (mode L) in train/ and test/, classes a and b, and the files' levels."""
    for split in ("train", "test"):
        for cls, picture in zip("ab", images):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(picture, "L").save(root / split / cls / "x.png")


def test_gray_images_keep_their_levels_on_every_path(tmp_path):
    """A gray file (L) was read as RGB and converted back with torchvision's truncating rgb_to_grayscale, whose
    weights sum to 0.9999: every level v > 0 became v - 1 in training, evaluation, zoo predict and zoo viz
    (load_image_file). A gray image now keeps its exact levels everywhere (the LA and 16-bit versions of the same
    image too); a colour image is converted as before, equal to torchvision's Grayscale on every path."""
    from torchvision.transforms import v2 as T

    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    colour = np.random.default_rng(5).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    _gray_folder(tmp_path / "gray", [ramp, ramp[::-1].copy()])
    Image.fromarray(ramp, "L").convert("LA").save(tmp_path / "ramp_la.png")
    Image.fromarray(ramp.astype(np.uint16) * 257).save(tmp_path / "ramp16.png")
    Image.fromarray(colour).save(tmp_path / "colour.png")
    stats = (0.0,), (1.0,)

    def levels(x):
        return torch.round(x.as_subclass(torch.Tensor) * 255)

    want = torch.from_numpy(ramp).float()[None]
    for name in ("gray/test/a/x.png", "ramp_la.png", "ramp16.png"):
        torch.testing.assert_close(levels(vdata.load_image_file(tmp_path / name, 16, 1, *stats)), want, rtol=0, atol=0)
        torch.testing.assert_close(levels(vdata.load_image_file(tmp_path / name, 16, 1, *stats, interpolation="bicubic")),
                                   want, rtol=0, atol=0)
    colour_want = T.Grayscale(1)(T.ToImage()(Image.fromarray(colour))).as_subclass(torch.Tensor).float()
    torch.testing.assert_close(levels(vdata.load_image_file(tmp_path / "colour.png", 16, 1, *stats)), colour_want,
                               rtol=0, atol=0)
    for train_interpolation in ("bilinear", "nearest"):
        dm = vdata.ImageFolderDataModule(str(tmp_path / "gray"), img_size=16, in_chans=1, mean=0.0, std=1.0,
                                         val_fraction=0.0, num_classes=2, augment="crop", hflip=0.0,
                                         train_interpolation=train_interpolation)
        dm.setup()
        files = {0: torch.from_numpy(ramp).float(), 1: torch.from_numpy(ramp[::-1].copy()).float()}
        for index in range(len(dm.test_set)):  # evaluation: the file itself
            image, label = dm.test_set[index]
            torch.testing.assert_close(levels(image)[0], files[label], rtol=0, atol=0)
        for epoch in range(3):  # training: a shift of the file (pad 2, random crop), never a darker copy
            dm.train_set.epoch = epoch
            for index in range(len(dm.train_set)):
                image, label = dm.train_set[index]
                padded = F.pad(files[label], (2, 2, 2, 2))
                shifts = [(dy, dx) for dy in range(5) for dx in range(5)
                          if torch.equal(padded[dy:dy + 16, dx:dx + 16], levels(image)[0])]
                assert shifts, (train_interpolation, epoch, index)


def test_gray_png_prediction_equals_timms_transform_of_the_shipped_vit_digits(tmp_path):
    """docs/training.md section 5: timm's create_transform of the released model's pretrained_cfg, on the file
    opened as L, gives the class and probability zoo predict prints. On the digits written as 8-bit gray PNGs the
    zoo's input was one level darker (every nonzero pixel) and the probabilities up to 0.067 apart."""
    import timm.data
    from sklearn.datasets import load_digits

    import zoo
    from zoo.train import run

    digits = load_digits()
    test_index = vdata.digits_splits()["test"][:24]
    paths = []
    for index in test_index:
        paths.append(tmp_path / f"{index}.png")
        Image.fromarray(np.rint(digits.images[index] / 16 * 255).astype(np.uint8), "L").save(paths[-1])
    model = zoo.create_model("vit_digits", pretrained=True).eval()
    config = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**config)
    timm_inputs = torch.stack([transform(Image.open(path).convert("L")) for path in paths])
    zoo_inputs = torch.stack([vdata.load_image_file(path, 8, 1, config["mean"], config["std"]) for path in paths])
    torch.testing.assert_close(zoo_inputs, timm_inputs, rtol=0, atol=1e-6)
    with torch.no_grad():
        timm_probs = model(timm_inputs).softmax(-1)
    rows = run.predict(zoo.hub.shipped_checkpoint("vit_digits"), [str(path) for path in paths], topk=1)
    for row, probs in zip(rows, timm_probs):
        name, probability = row["top"][0]
        assert int(name) == int(probs.argmax()) and probability == pytest.approx(float(probs.max()), abs=1e-5)


def test_image_folder_names_the_classes_a_split_lacks_and_hidden_folders(tmp_path):
    """"val/ or test/ lacks some classes of train/" named none, leaving a 100-class folder to be diffed by hand; the
    classes are now named, and a hidden folder among them (Jupyter's .ipynb_checkpoints, which torchvision's
    ImageFolder and timm count as a class) is pointed out."""
    _write_images(tmp_path / "lack", "train", ["cat", "dog", "eel"], 2)
    _write_images(tmp_path / "lack", "test", ["dog"], 1)
    with pytest.raises(ValueError, match=r"test lacks classes \['cat', 'eel'\] of .*lack/train; give every split all") as info:
        vdata.ImageFolderDataModule(str(tmp_path / "lack"), img_size=8, num_classes=3).setup()
    assert "hidden" not in str(info.value)
    _write_images(tmp_path / "jupyter", "train", ["cat", "dog", ".ipynb_checkpoints"], 1)
    _write_images(tmp_path / "jupyter", "test", ["cat", "dog"], 1)
    dm = vdata.ImageFolderDataModule(str(tmp_path / "jupyter"), img_size=8)
    assert dm.class_names == [".ipynb_checkpoints", "cat", "dog"]  # as torchvision's find_classes counts them
    with pytest.raises(ValueError, match=r"test lacks classes \['.ipynb_checkpoints'\] .*\.ipynb_checkpoints is a "
                                         r"hidden folder .*count as a class too: delete it from .*jupyter/train"):
        dm.setup()
    _write_images(tmp_path / "extra", "train", ["cat", "dog"], 1)
    _write_images(tmp_path / "extra", "test", ["cat", "dog", ".ipynb_checkpoints"], 1)
    with pytest.raises(ValueError, match=r"extra/test has classes \['.ipynb_checkpoints'\] that .*extra/train lacks; "
                                         r".*hidden folder.*delete it from .*extra/test"):
        vdata.ImageFolderDataModule(str(tmp_path / "extra"), img_size=8).setup()


@pytest.mark.parametrize("variant", [10, 100])
def test_cifar_checksum_failure_names_the_files_and_a_root_one_level_too_deep(tmp_path, monkeypatch, variant):
    """A CIFAR root failing torchvision's MD5 check quoted torchvision's "You can use download=True to download it"
    (no such zoo option; nothing is downloaded) and named no file: each failing file is now named
    (torchvision.datasets.utils.check_integrity per file). data.root pointing at the extracted folder itself says
    to give the folder above it."""
    import hashlib

    from torchvision.datasets import CIFAR10, CIFAR100

    folder = _write_cifar(tmp_path, variant)
    every = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
             "batches.meta"] if variant == 10 else ["train", "test", "meta"]
    with pytest.raises(FileNotFoundError) as info:
        vdata.CIFARDataModule(str(tmp_path), variant=variant)
    message = str(info.value)
    assert f"{', '.join(every)} fail torchvision's MD5 check" in message and "download=True" not in message
    assert "re-extract" in message and "\n" not in message
    cls = CIFAR10 if variant == 10 else CIFAR100

    def md5(name):
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    damaged = every[1]  # every file but this one carries its official checksum
    monkeypatch.setattr(cls, "train_list", [[name, md5(name) if name != damaged else md5s] for name, md5s in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[name, md5(name) if name != damaged else md5s] for name, md5s in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(cls.meta["filename"])})
    with pytest.raises(FileNotFoundError, match=rf"is incomplete or corrupt: {damaged} fails torchvision's MD5 check"):
        vdata.CIFARDataModule(str(tmp_path), variant=variant)
    with pytest.raises(FileNotFoundError, match=rf"is the extracted {folder.name} folder itself; give the folder above "
                                                rf"it, data.root={tmp_path}, which holds {folder.name}/"):
        vdata.CIFARDataModule(str(folder), variant=variant)


# --------------------------------------------------------------------------------------------------
# Mutation-audit gaps (audit 8, vision data): each test pins behaviour no earlier test did
# --------------------------------------------------------------------------------------------------
def test_digits_val_fraction_zero_trains_on_all_and_validates_on_the_test_split():
    """val_fraction=0 trains on all 1437 non-test images and validates on the fixed 360 test images (module
    docstring), never on training images (which would pick best.ckpt by training accuracy)."""
    dm = vdata.DigitsDataModule(val_fraction=0.0, mean=(0.0,), std=(1.0,))
    dm.setup()
    assert len(dm.train_set) == 1797 - 360 and len(dm.val_set) == 360
    torch.testing.assert_close(dm.val_set.images, dm.test_set.images, rtol=0, atol=0)
    assert torch.equal(dm.val_set.labels, dm.test_set.labels)
    digits = load_digits()
    test_index = vdata.digits_splits(0.0)["test"]
    torch.testing.assert_close(dm.val_set.images[:, 0], torch.tensor(digits.images[test_index], dtype=torch.float32) / 16,
                               rtol=0, atol=0)


def _warp_with(dataset, draws):
    """``dataset._warp`` of image 5 with its four uniform draws fixed (rotation, zoom, dx, dy in [0, 1))."""
    original = torch.rand
    torch.rand = lambda *args, **kwargs: torch.tensor(draws)
    try:
        return dataset._warp(dataset.images[5], 0)
    finally:
        torch.rand = original


def test_affine_augmentation_is_torchvisions_rotation_zoom_and_translation():
    """Each part of augment=affine, alone and together, equals torchvision's affine (bilinear, zeros outside) of
    the same amount: a rotation (not a shear or mirror), a zoom by 1 + scale * u, a translation by shift * u pixels
    (scaled with img_size as the shift augmentation is; not rotated or zoomed with the content)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    dm = vdata.DigitsDataModule(augment="affine", img_size=16, shift=1, rotate=30.0, scale=0.3, mean=(0.0,), std=(1.0,))
    dm.setup()
    ds, image = dm.train_set, dm.train_set.images[5]
    assert ds.shift == 2  # one 8x8 pixel is two pixels at 16 px
    cases = [  # (draws, torchvision's angle (counter-clockwise), translate, scale)
        ([1.0, 0.5, 0.5, 0.5], -30.0, [0.0, 0.0], 1.0),
        ([0.25, 0.5, 0.5, 0.5], 15.0, [0.0, 0.0], 1.0),
        ([0.5, 1.0, 0.5, 0.5], 0.0, [0.0, 0.0], 1.3),
        ([0.5, 0.0, 0.5, 0.5], 0.0, [0.0, 0.0], 0.7),
        ([0.5, 0.5, 1.0, 0.5], 0.0, [2.0, 0.0], 1.0),
        ([0.5, 0.5, 0.5, 0.25], 0.0, [0.0, -1.0], 1.0),
        # all three at once: the translation is not rotated or zoomed with the content (as torchvision's)
        ([1.0, 1.0, 1.0, 0.25], -30.0, [2.0, -1.0], 1.3),
        ([0.25, 0.0, 0.0, 1.0], 15.0, [-2.0, 2.0], 0.7),
    ]
    for draws, angle, translate, scale in cases:
        want = TF.affine(image, angle=angle, translate=translate, scale=scale, shear=[0.0, 0.0],
                         interpolation=InterpolationMode.BILINEAR)
        torch.testing.assert_close(_warp_with(ds, draws), want, rtol=0, atol=1e-5)


def test_affine_warp_of_a_non_square_image_is_torchvisions():
    """The warp rotates the pixels, not the [-1, 1] coordinates of each axis (which would shear a 16 x 32 image by up
    to 0.9 against torchvision), alone and with zoom and translation."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    image = torch.rand(1, 1, 16, 32, generator=torch.Generator().manual_seed(0))
    ds = vdata.TensorImageDataset(image, torch.zeros(1, dtype=torch.long), (0.0,), (1.0,), shift=3, affine=True,
                                  rotate=30.0, scale=0.3)
    for draws, angle, translate, scale in (([1.0, 0.5, 0.5, 0.5], -30.0, [0.0, 0.0], 1.0),
                                           ([1.0, 1.0, 1.0, 0.25], -30.0, [3.0, -1.5], 1.3),
                                           ([0.25, 0.0, 0.0, 1.0], 15.0, [-3.0, 3.0], 0.7)):
        want = TF.affine(image[0], angle=angle, translate=translate, scale=scale, shear=[0.0, 0.0],
                         interpolation=InterpolationMode.BILINEAR)
        original = torch.rand
        torch.rand = lambda *args, **kwargs: torch.tensor(draws)
        try:
            got = ds._warp(image[0], 0)
        finally:
            torch.rand = original
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_shift_augmentation_reaches_every_offset_scaled_with_img_size():
    """augment=shift moves by every offset in [-s, s]^2 (s = shift * img_size // 8), both directions, each axis
    drawn on its own."""
    for img_size, shift in ((8, 1), (16, 1)):
        dm = vdata.DigitsDataModule(augment="shift", shift=shift, img_size=img_size, mean=(0.0,), std=(1.0,))
        dm.setup()
        s = shift * img_size // 8
        seen = set()
        for index in range(250):
            base = dm.train_set.images[index, 0]
            padded = F.pad(base, (s, s, s, s))
            moved = dm.train_set[index][0][0]
            offsets = [(dy - s, dx - s) for dy in range(2 * s + 1) for dx in range(2 * s + 1)
                       if torch.equal(padded[dy:dy + img_size, dx:dx + img_size], moved)]
            assert offsets, f"image {index} at {img_size} px is not a shift by at most {s}"
            seen.update(offsets)
        assert {(dy, dx) for dy in range(-s, s + 1) for dx in range(-s, s + 1)} <= seen, (img_size, sorted(seen))


def test_digits_refuse_an_evaluation_transform_they_do_not_apply():
    """The digits resize bilinearly and never crop: another interpolation or crop_pct would be recorded in
    describe() (and released weights) without being applied, so it is refused."""
    for kwargs in ({"interpolation": "bicubic"}, {"crop_pct": 0.875}):
        with pytest.raises(ValueError, match="uncropped with a bilinear resize"):
            vdata.DigitsDataModule(**kwargs)


@pytest.mark.parametrize("variant", [10, 100])
def test_cifar_defaults_splits_and_val_fraction_zero(tmp_path, monkeypatch, variant):
    """CIFAR: the published per-variant channel statistics by default; split_seed (not seed) draws the validation
    images; val_fraction=0 trains on all training images and validates on the official test set."""
    import torchvision.datasets.cifar as tv_cifar

    _write_cifar(tmp_path, variant, per_class=4)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    stats = {10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
             100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}[variant]
    fraction = 0.2 if variant == 10 else 0.25

    def module(**kwargs):
        dm = vdata.CIFARDataModule(str(tmp_path), variant=variant, num_workers=0, **kwargs)
        dm.setup()
        return dm

    dm = module(val_fraction=fraction, seed=0, split_seed=0)
    assert (dm.mean, dm.std) == stats
    n_train = len(dm.train_set.base)
    assert len(dm.train_set) + len(dm.val_set) == n_train
    assert module(val_fraction=fraction, seed=7, split_seed=0).val_set.indices == dm.val_set.indices
    assert module(val_fraction=fraction, seed=0, split_seed=5).val_set.indices != dm.val_set.indices
    every = module(val_fraction=0.0)
    assert len(every.train_set) == n_train and every.val_set.base is every.test_set.base
    assert len(every.val_set) == len(every.test_set) == variant
    torch.testing.assert_close(every.val_set[0][0], every.test_set[0][0], rtol=0, atol=0)


def test_a_float_image_with_white_pixels_reads_as_zero_to_one(tmp_path):
    """An F (32-bit float) image with values in [0, 1] reads as rint(255 v), its white (exactly 1.0) included."""
    values = np.array([[0.0, 0.25, 0.5], [0.75, 1.0, 1.0]], dtype=np.float32)
    Image.fromarray(values, mode="F").save(tmp_path / "white.tif")
    got = np.asarray(vdata.read_image(tmp_path / "white.tif"))
    np.testing.assert_array_equal(got, np.rint(values * 255).astype(np.uint8))


def test_one_channel_conversion_of_a_colour_image_with_equal_red_and_green(tmp_path):
    """A colour image whose red and green agree but blue differs is colour: torchvision's rgb_to_grayscale, not
    its red channel, on the prediction path as in training."""
    from torchvision.transforms.v2 import functional as TF

    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0] = rgb[..., 1] = 100
    rgb[..., 2] = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    Image.fromarray(rgb).save(tmp_path / "bluish.png")
    want = TF.rgb_to_grayscale(torch.from_numpy(rgb).permute(2, 0, 1), num_output_channels=1).float()
    got = vdata.load_image_file(tmp_path / "bluish.png", 8, 1, (0.0,), (1.0,))
    torch.testing.assert_close(torch.round(got * 255), want, rtol=0, atol=0)


def test_load_image_file_hands_a_one_channel_transform_a_gray_image(tmp_path):
    """With a timm evaluation transform (zoo predict of a model released without a zoo record) and in_chans=1 the
    transform gets the image as L, giving 1 channel, as timm's transform of the file opened as L."""
    import timm.data

    gray = np.arange(100, dtype=np.uint8).reshape(10, 10) * 2
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    transform = timm.data.create_transform(8, interpolation="bilinear", crop_pct=1.0, mean=(0.5,), std=(0.5,))
    got = vdata.load_image_file(tmp_path / "gray.png", 8, 1, (0.5,), (0.5,), transform=transform)
    assert got.shape == (1, 8, 8)
    torch.testing.assert_close(got, transform(Image.open(tmp_path / "gray.png").convert("L")), rtol=0, atol=0)


def test_evaluation_only_root_validates_on_val_and_tests_on_test(tmp_path):
    """A root with val/ and test/ but no train/ (zoo eval) keeps them apart: val_set reads val/, test_set test/."""
    _write_images(tmp_path, "val", ["cat", "dog"], 2, size=(8, 8))
    rng = np.random.default_rng(1)
    for name in ("cat", "dog"):
        (tmp_path / "test" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "test" / name / f"{i}.png")
    dm = vdata.ImageFolderDataModule(str(tmp_path), img_size=8, num_classes=2)
    dm.setup("validate")
    assert len(dm.val_set) == 4 and len(dm.test_set) == 6
    assert Path(dm.val_set.base.root).name == "val" and Path(dm.test_set.base.root).name == "test"


def test_eval_batch_size_defaults_to_the_larger_of_batch_size_and_256():
    assert vdata.DigitsDataModule(batch_size=32).eval_batch_size == 256
    assert vdata.DigitsDataModule(batch_size=512).eval_batch_size == 512
    assert vdata.DigitsDataModule(batch_size=32, eval_batch_size=8).eval_batch_size == 8


def test_model_squash_crop_mode_evaluates_as_timm(tmp_path):
    """crop_pct=model also takes the model's crop_mode: a pretrained_cfg with crop_mode squash resizes both sides
    (non-square images are not centre-cropped), as timm's evaluation transform of that config."""
    import timm.data

    model = _squash_model(crop_pct=0.8)
    dm = _squash_datamodule(tmp_path, model, interpolation="model")
    assert dm.eval_preprocessing() == {"crop_pct": 0.8, "crop_mode": "squash", "interpolation": "bicubic"}
    _assert_val_set_is(dm, timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False))


def _squash_model(crop_pct: float) -> torch.nn.Module:
    """A model whose pretrained_cfg asks for timm's squash crop mode (bicubic, mean 0.5, std 0.25) at 16 px."""
    model = torch.nn.Module()
    model.pretrained_cfg = {"input_size": (3, 16, 16), "crop_pct": crop_pct, "crop_mode": "squash",
                            "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    return model


def _squash_datamodule(tmp_path, model, interpolation: str):
    """An ImageFolder of non-square 13 x 29 images, half held out, preprocessed as ``model`` asks; set up."""
    _write_images(tmp_path, "train", ["cat", "dog"], 2, size=(13, 29))
    dm = vdata.ImageFolderDataModule(str(tmp_path), img_size=16, mean="model", std="model", crop_pct="model",
                                     interpolation=interpolation, val_fraction=0.5, num_classes=2)
    dm.adopt_model_stats(model)
    return dm


def _assert_val_set_is(dm, timm_eval) -> None:
    """Every held-out image equals timm's evaluation transform of its file within one 8-bit level (std 0.25)."""
    dm.setup()
    for index in range(len(dm.val_set)):
        path = dm.val_set.base.samples[dm.val_set.indices[index]][0]
        theirs = timm_eval(Image.open(path).convert("RGB"))
        assert float(((dm.val_set[index][0] - theirs) * 0.25).abs().max()) <= 1 / 255 + 1e-6


# --------------------------------------------------------------------------------------------------
# Mutation-audit gaps (audit 10, vision data, second pass): edge cases no earlier test pinned
# --------------------------------------------------------------------------------------------------
def test_one_channel_conversion_of_a_colour_image_with_equal_red_and_blue(tmp_path):
    """A colour image is gray only when R = G = B at every pixel: one whose red and blue planes agree (greens,
    magentas) is still converted by torchvision's Grayscale, not kept at its red level."""
    from torchvision.transforms import v2 as T

    rng = np.random.default_rng(11)
    red_blue = rng.integers(0, 256, (10, 10), dtype=np.uint8)
    colour = np.stack([red_blue, rng.integers(0, 256, (10, 10), dtype=np.uint8), red_blue], axis=-1)
    Image.fromarray(colour).save(tmp_path / "rb.png")
    want = T.Grayscale(1)(T.ToImage()(Image.fromarray(colour))).as_subclass(torch.Tensor).float()
    got = torch.round(vdata.load_image_file(tmp_path / "rb.png", 10, 1, (0.0,), (1.0,)) * 255)
    assert got.shape == (1, 10, 10)  # the image's own size: no resampling
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_big_endian_sixteen_bit_tiff_reads_as_its_eight_bit_original(tmp_path):
    """A big-endian 16-bit TIFF opens as Pillow mode I;16B (not I;16): it is scaled by 1/257 like every 16-bit
    file (hand-computed: v * 257 reads as v), not clipped by Pillow's convert() to almost pure white."""
    eight = np.random.default_rng(2).integers(0, 256, (6, 7), dtype=np.uint8)
    Image.fromarray((eight.astype(np.uint16) * 257).astype(">u2")).save(tmp_path / "be16.tif")
    assert Image.open(tmp_path / "be16.tif").mode == "I;16B"
    np.testing.assert_array_equal(np.asarray(vdata.read_image(tmp_path / "be16.tif")), eight)


def test_thirty_two_bit_values_above_sixteen_bits_read_as_white(tmp_path):
    """32-bit integer files are read as 16-bit values, and anything above 65535 is white (255), never wrapped
    around modulo 256 (hand-computed levels)."""
    values = np.array([[0, 2570, 65535, 65536, 70000, 2**31 - 1]], dtype=np.int32)
    Image.fromarray(values).save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    np.testing.assert_array_equal(np.asarray(vdata.read_image(tmp_path / "i32.tif")), [[0, 10, 255, 255, 255, 255]])


def test_default_evaluation_of_a_non_square_image_equals_timms_bilinear_transform(tmp_path):
    """The default evaluation (crop_pct 1.0, bilinear) of a strongly shrunk non-square image is timm's
    create_transform with those settings (shorter side to img_size, antialiased, centre crop) within one 8-bit
    level, in the data module and in load_image_file (zoo predict)."""
    import timm.data

    _write_images(tmp_path, "train", ["cat", "dog"], 2, size=(48, 80))
    dm = vdata.ImageFolderDataModule(str(tmp_path), img_size=16, mean=0.0, std=1.0, val_fraction=0.5, num_classes=2)
    dm.setup()
    timm_eval = timm.data.create_transform(input_size=(3, 16, 16), crop_pct=1.0, interpolation="bilinear",
                                           mean=(0.0,) * 3, std=(1.0,) * 3)
    for index in range(len(dm.val_set)):
        path = dm.val_set.base.samples[dm.val_set.indices[index]][0]
        theirs = timm_eval(Image.open(path).convert("RGB"))
        for ours in (dm.val_set[index][0], vdata.load_image_file(path, 16, 3, (0.0,), (1.0,))):
            assert ours.shape == (3, 16, 16)
            assert float((ours - theirs).abs().max()) <= 1 / 255 + 1e-6


def test_squash_crop_mode_at_full_crop_with_bilinear_is_timms_squash(tmp_path):
    """A model's crop_mode squash at crop_pct 1.0 with data.interpolation=bilinear given explicitly resizes both
    sides of a non-square image (timm's squash transform of that config), not the shorter side plus a centre crop."""
    import timm.data

    dm = _squash_datamodule(tmp_path, _squash_model(crop_pct=1.0), interpolation="bilinear")
    assert dm.eval_preprocessing() == {"crop_pct": 1.0, "crop_mode": "squash", "interpolation": "bilinear"}
    _assert_val_set_is(dm, timm.data.create_transform(input_size=(3, 16, 16), crop_pct=1.0, crop_mode="squash",
                                                      interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3))


def test_image_folder_class_order_is_torchvisions_case_sensitive_order(tmp_path):
    """Class indices are torchvision's ImageFolder's (and timm's): the folder names sorted case-sensitively, so
    upper-case names come first; a checkpoint trained elsewhere on the same folder keeps its label ids."""
    from torchvision.datasets import ImageFolder

    _write_images(tmp_path, "train", ["b", "Cat", "a", "Dog"], 1)
    _write_images(tmp_path, "test", ["b", "Cat", "a", "Dog"], 1)
    reference = ImageFolder(str(tmp_path / "train"))
    assert reference.classes == ["Cat", "Dog", "a", "b"]
    dm = vdata.ImageFolderDataModule(str(tmp_path), img_size=8, val_fraction=0.0, num_classes=4)
    assert dm.class_names == reference.classes
    dm.setup()
    assert sorted(dm.train_set[i][1] for i in range(len(dm.train_set))) == [0, 1, 2, 3]
    assert [label for _, label in dm.train_set.base.samples] == reference.targets


def test_image_folder_holds_out_as_many_validation_images_as_sklearn(tmp_path):
    """val_fraction of a small folder holds out ceil(fraction * N) images, as sklearn's train_test_split counts
    them (0.3 of 6 images: 2, one per class), rather than refusing a split sklearn makes."""
    from sklearn.model_selection import train_test_split

    _write_images(tmp_path, "train", ["cat", "dog"], 3)
    dm = vdata.ImageFolderDataModule(str(tmp_path), img_size=8, val_fraction=0.3, num_classes=2)
    dm.setup()
    labels = [0, 0, 0, 1, 1, 1]
    _, held = train_test_split(np.arange(6), test_size=0.3, stratify=labels, random_state=0)
    assert len(dm.val_set) == len(held) == 2 and len(dm.train_set) == 4
    assert sorted(dm.val_set[i][1] for i in range(2)) == [0, 1]


def test_drop_last_keeps_a_training_set_smaller_than_one_batch(tmp_path):
    """drop_last=True drops the last incomplete batch, but a training set smaller than one batch still trains
    (one short batch, not an empty epoch); at batch_size 4 the 6 images give one batch of 4 (hand-counted)."""
    _write_images(tmp_path, "train", ["cat", "dog"], 3)
    _write_images(tmp_path, "test", ["cat", "dog"], 1)
    counts = {}
    for batch_size in (8, 4):
        dm = vdata.ImageFolderDataModule(str(tmp_path), img_size=8, val_fraction=0.0, num_classes=2,
                                         batch_size=batch_size, drop_last=True)
        dm.setup()
        counts[batch_size] = [len(y) for _, y in dm.train_dataloader()]
    assert counts == {8: [6], 4: [4]}


def test_digit_shift_augmentation_still_shifts_below_eight_pixels():
    """The digits' shift (in 8x8 pixels) scales with img_size // 8 but never below one pixel: img_size=4 still
    shifts by up to `shift` pixels (it used to be able to become 0, silently no augmentation)."""
    dm = vdata.DigitsDataModule(img_size=4, augment="shift", shift=1, batch_size=16)
    dm.setup()
    assert dm.train_set.shift == 1
    plain = (dm.train_set.images[:40] - 0.5) / 0.5
    augmented = torch.stack([dm.train_set[i][0] for i in range(40)])
    assert not torch.equal(augmented, plain)


def test_cifar_root_named_as_the_extracted_folder_says_to_give_the_folder_above(tmp_path):
    """data.root pointing at an (incomplete) cifar-10-batches-py / cifar-100-python folder itself is named as such,
    even when that folder lacks the first file the check looks for."""
    for variant, name in ((10, "cifar-10-batches-py"), (100, "cifar-100-python")):
        folder = tmp_path / name
        folder.mkdir()
        with pytest.raises(FileNotFoundError, match=rf"is the extracted {name} folder itself; give the folder above it"):
            vdata.CIFARDataModule(str(folder), variant=variant)


def test_a_root_with_only_val_is_an_evaluation_set(tmp_path):
    """A root holding only val/ serves zoo eval (the ImageFolder docstring), as one with only test/ does: its classes
    come from val/, and val/ stands in for test/."""
    _write_images(tmp_path, "val", ["cat", "dog"], 2)
    dm = vdata.ImageFolderDataModule(str(tmp_path), img_size=8, num_classes=2)
    assert dm.class_names == ["cat", "dog"]
    dm.setup("test")
    assert len(dm.val_set) == len(dm.test_set) == 4
    with pytest.raises(FileNotFoundError, match=r"train/<class_name>/<image file>"):
        dm.setup("fit")


def test_a_model_crop_mode_other_than_center_or_squash_is_refused_by_name(tmp_path):
    """timm also has crop_mode "border" (pad to the crop): a model asking for it is refused by name rather than
    evaluated with a centre crop, which would differ from timm's transform of that config unseen."""
    class Model(torch.nn.Module):
        pretrained_cfg = {"input_size": (3, 16, 16), "crop_pct": 0.9, "crop_mode": "border", "interpolation": "bicubic",
                          "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}

    _write_images(tmp_path, "train", ["cat", "dog"], 2)
    dm = vdata.ImageFolderDataModule(str(tmp_path), img_size=16, crop_pct="model", num_classes=2)
    with pytest.raises(ValueError, match=r"the model's crop_mode 'border' is not supported \(center, squash\)"):
        dm.adopt_model_stats(Model())


def test_crop_augmentation_still_translates_below_eight_pixels(tmp_path):
    """augment=crop pads by img_size // 8, but by at least one pixel: at img_size 4 the training images are still
    shifted copies of the (resized) image, some of them moved, not the unaugmented image every time."""
    _write_images(tmp_path, "train", ["cat", "dog"], 3, size=(4, 4))
    _write_images(tmp_path, "test", ["cat", "dog"], 1, size=(4, 4))
    dm = vdata.ImageFolderDataModule(str(tmp_path), img_size=4, mean=0.0, std=1.0, augment="crop", hflip=0.0,
                                     val_fraction=0.0, num_classes=2)
    dm.setup()
    from torchvision.transforms import v2 as T

    moved = 0
    for epoch in range(3):
        dm.train_set.epoch = epoch
        for index in range(len(dm.train_set)):
            path = dm.train_set.base.samples[index][0]
            plain = T.ToDtype(torch.float32, scale=True)(T.ToImage()(Image.open(path).convert("RGB")))
            moved += not torch.equal(dm.train_set[index][0].as_subclass(torch.Tensor), plain.as_subclass(torch.Tensor))
    assert moved > 0


def test_a_model_interpolation_the_zoo_cannot_record_is_refused_by_name(tmp_path):
    """interpolation=model with a pretrained_cfg asking for another filter (nearest) is refused by name at adoption,
    instead of evaluating and recording an interpolation that zoo predict's load_image_file then refuses."""
    class Model(torch.nn.Module):
        pretrained_cfg = {"input_size": (3, 16, 16), "crop_pct": 0.9, "interpolation": "nearest",
                          "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}

    _write_images(tmp_path, "train", ["cat", "dog"], 2)
    dm = vdata.ImageFolderDataModule(str(tmp_path), img_size=16, interpolation="model", num_classes=2)
    with pytest.raises(ValueError, match=r"the model's interpolation 'nearest' is not supported \(bilinear, bicubic\)"):
        dm.adopt_model_stats(Model())


def test_macos_appledouble_files_are_not_images(tmp_path):
    """``._0.png`` (the metadata Finder writes beside each file on non-Mac disks and into zip archives) was counted
    as an image, as torchvision's ImageFolder counts it, and training failed when an epoch reached it; training,
    zoo eval and zoo predict now leave such files out, and a class folder holding only them is named as empty."""
    from zoo.train import run

    _write_images(tmp_path, "train", ["cat", "dog"], 3)
    for name in ("cat", "dog"):
        (tmp_path / "train" / name / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    dm = vdata.ImageFolderDataModule(str(tmp_path), img_size=8, val_fraction=0.34, num_classes=2)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 6
    assert all(not Path(path).name.startswith("._") for path, _ in dm.train_set.base.samples)
    assert [p.name for p in run._image_files(tmp_path / "train" / "cat", vdata.IMAGE_EXTENSIONS)] == \
        ["0.png", "1.png", "2.png"]
    assert vdata.is_image_file_name("x/._a.PNG") is False and vdata.is_image_file_name("x/a._b.png") is True
    (tmp_path / "val" / "cat").mkdir(parents=True)
    (tmp_path / "val" / "dog").mkdir(parents=True)
    (tmp_path / "val" / "cat" / "0.png").write_bytes((tmp_path / "train" / "cat" / "0.png").read_bytes())
    (tmp_path / "val" / "dog" / "._0.png").write_bytes(b"\x00\x05\x16\x07")
    with pytest.raises(FileNotFoundError, match=r"val/dog holds no image"):
        vdata.ImageFolderDataModule(str(tmp_path), img_size=8, num_classes=2).setup()


def test_unreadable_images_are_replaced_by_the_next_one_deterministically(tmp_path):
    """One corrupt file stopped training when the shuffled order reached it (hours into an epoch, no checkpoint).
    As timm's ImageDataset (timm/data/dataset.py), it is skipped with a warning naming it and the next sample takes
    its place; the replacement depends on the index alone (a resumed run trains on what the interrupted one did),
    and MAX_UNREADABLE_IN_A_ROW bad files in a row stop with the last error."""
    _write_images(tmp_path, "train", ["cat", "dog"], 4)
    (tmp_path / "train" / "cat" / "1_corrupt.png").write_bytes(b"garbage")  # sorted between 1.png and 2.png
    dm = vdata.ImageFolderDataModule(str(tmp_path), batch_size=2, img_size=8, in_chans=1, mean=(0.5,), std=(0.5,),
                                     augment="standard", val_fraction=0.0, num_classes=2, hflip=0.5)
    (tmp_path / "test").symlink_to(tmp_path / "train", target_is_directory=True)
    dm.setup("fit")
    paths = [Path(p).name for p, _ in dm.train_set.base.samples]
    bad = paths.index("1_corrupt.png")
    with pytest.warns(UserWarning, match=rf"skipped an unreadable image \(sample {bad}\).*1_corrupt\.png is not a "):
        image, label = dm.train_set[bad]
    replacement, replacement_label = dm.train_set[bad + 1]  # the next file, augmented as its own index is
    torch.testing.assert_close(image, replacement)
    assert label == replacement_label == 0
    with pytest.warns(UserWarning):
        again = dm.train_set[bad]
    torch.testing.assert_close(again[0], image)  # the same draw every time: deterministic
    # a whole epoch through the loader: every sample, the bad one replaced
    with pytest.warns(UserWarning, match="1_corrupt.png"):
        batches = list(dm.train_dataloader())
    assert sum(len(b[1]) for b in batches) == len(dm.train_set) == 9
    # too many bad files in a row: an error naming the last
    for i in range(vdata.MAX_UNREADABLE_IN_A_ROW):
        (tmp_path / "train" / "dog" / f"z{i:02d}.png").write_bytes(b"garbage")
    dm = vdata.ImageFolderDataModule(str(tmp_path), batch_size=2, img_size=8, in_chans=1, mean=(0.5,), std=(0.5,),
                                     val_fraction=0.0, num_classes=2)
    dm.setup("fit")
    first = [Path(p).name for p, _ in dm.train_set.base.samples].index("z00.png")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"10 unreadable images in a row from sample "
                                                                    rf"{first} on \(the last: .*z09\.png"):
        dm.train_set[first]


def test_image_size_and_channels_are_checked_by_name_as_the_model_checks_them(tmp_path):
    """img_size 16.7 was rounded down, 0 meant the default, -4 failed at the first image with a resize error, a
    pair was a bare int() TypeError and in_chans=True was one channel: each is refused in one line naming it."""
    _write_images(tmp_path, "train", ["cat", "dog"], 2)
    for kwargs, message in [({"img_size": 16.7}, "img_size must be an integer >= 1, got 16.7"),
                            ({"img_size": 0}, "img_size must be an integer >= 1, got 0"),
                            ({"img_size": -4}, "img_size must be an integer >= 1, got -4"),
                            ({"img_size": True}, "img_size must be an integer >= 1, got True"),
                            ({"img_size": [16, 16]}, r"img_size must be an integer >= 1, got \[16, 16\]"),
                            ({"in_chans": True}, "in_chans must be an integer >= 1, got True"),
                            ({"in_chans": 0}, "in_chans must be an integer >= 1, got 0"),
                            ({"in_chans": 2}, "in_chans must be 1 or 3, got 2")]:
        with pytest.raises(ValueError, match=message):
            vdata.ImageFolderDataModule(str(tmp_path), mean=(0.5,), std=(0.5,), **kwargs)
        with pytest.raises(ValueError, match=message):
            vdata.DigitsDataModule(**kwargs)
    assert vdata.ImageFolderDataModule(str(tmp_path), mean=(0.5,), std=(0.5,), img_size=np.int64(12)).img_size == 12
    assert vdata.DigitsDataModule(img_size=None, in_chans=None).img_size == 8
