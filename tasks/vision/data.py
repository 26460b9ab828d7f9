"""Image-classification data: the embedded digits (offline default), ImageFolder and CIFAR-10/100.

Every source is a :class:`lightning.pytorch.LightningDataModule` with the same knobs (``img_size``,
``in_chans``, ``mean``/``std``, ``augment``, batch sizes) and ``num_classes``/``class_names`` attributes,
and nothing here ever downloads: real data sets are read from a local ``root`` and a missing file gives a
message saying which file to put where.

Embedded default -- scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``: 1797
grayscale 8x8 images, 10 classes, pixel values 0..16; the UCI "Optical Recognition of Handwritten Digits"
test set, shipped inside the scikit-learn wheel). Splits (fixed, so every model card reports on the same
images):

* test: 360 images (20%), ``sklearn.model_selection.train_test_split(stratify=labels, random_state=0)``
  over all 1797 images. This split never depends on configuration (``DIGITS_TEST_SEED`` is a constant).
* validation: ``val_fraction`` of the remaining 1437 (stratified, ``split_seed``); 0 trains on all 1437 and
  validates on the test split (the model cards say which).

Pixels are scaled to [0, 1] (value / 16), resized to ``img_size`` if it is not 8 (bilinear, once, in
memory), optionally replicated to ``in_chans=3``, and normalised with ``mean``/``std`` (default 0.5/0.5,
as the ``vit_digits`` default_cfg). ``augment="shift"`` moves each training image by up to ``shift``
pixels (zero padding = background); "affine" also rotates (up to ``rotate`` degrees) and scales (up to
``1 +- scale``), bilinearly; "none" disables augmentation. Augmentation randomness is seeded per sample
by ``(seed, epoch, index)``.

Two seeds, as timm's ``--seed`` changes the order and augmentation but never which images are in which split:
``seed`` (the configs' ``${seed}``, so ``zoo train seed=S`` changes it) drives the training order
(:class:`EpochShuffleSampler`) and the per-sample augmentation; ``split_seed`` (default 0) draws the validation
split, so runs with different seeds are validated (and their best checkpoints picked) on the same images.

Letters: B batch, C channels, H/W image height/width.
"""
from __future__ import annotations

import math
import os
import random
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from zoo.layers import check_flag, is_int, usable_cpus
from zoo.train.order import EpochShuffleSampler, ResumableTrainingOrder  # noqa: F401  (EpochShuffleSampler: re-exported)

__all__ = [
    "DIGITS_TEST_SEED",
    "DIGITS_TEST_SIZE",
    "digits_splits",
    "EpochShuffleSampler",
    "VisionDataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "CIFARDataModule",
    "load_image_file",
    "IMAGE_EXTENSIONS",
    "is_image_file_name",
]

DIGITS_TEST_SEED = 0
DIGITS_TEST_SIZE = 360
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


# --------------------------------------------------------------------------------------------------
# Sampling and datasets
# --------------------------------------------------------------------------------------------------
class _sample_rng:
    """Context: the global RNGs seeded from ``(seed, epoch, index)``, restored afterwards, so that a sample's
    augmentation depends on nothing else (a resumed run draws exactly what the interrupted one drew).

    All three global RNGs the training transforms draw from: torch (torchvision's crops, horizontal and vertical
    flips, ColorJitter and the RandomApply around it (``color_jitter_prob``), RandomGrayscale, GaussianBlur's sigma
    and its RandomApply, the noise of timm's random erasing), Python's ``random`` (timm's RandAugment / AutoAugment
    magnitudes, probabilities and, with ``train_interpolation=random``, resampling filters, the random-erasing
    boxes, the crop's bilinear-or-bicubic pick of :class:`_RandomInterpolation`) and NumPy's (timm's RandAugment
    op choice, AugMix's weights). Torch gets the same seed as before the other two were added, so the default
    augmentations draw what they drew."""

    def __init__(self, seed: int, epoch: int, index: int):
        self.seed = hash((seed, epoch, index)) % (2**63 - 1)

    def __enter__(self):
        self.states = torch.random.get_rng_state(), random.getstate(), np.random.get_state()
        torch.manual_seed(self.seed)
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)

    def __exit__(self, *exc):
        torch_state, python_state, numpy_state = self.states
        torch.random.set_rng_state(torch_state)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class TensorImageDataset(Dataset):
    """In-memory images in [0, 1] (N, C, H, W) + labels; optional random shift or affine warp; normalisation.

    ``shift``: integer translation by up to ``shift`` pixels (zero padding). ``affine``: rotation by up to
    ``rotate`` degrees, scaling by up to ``1 +- scale`` and translation by up to ``shift`` pixels, bilinear
    (``F.affine_grid``/``F.grid_sample``, zeros outside), as the affine augmentations used for MNIST-style
    digits (Simard et al., ICDAR 2003).
    """

    def __init__(self, images_NCHW: torch.Tensor, labels_N: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 shift: int = 0, seed: int = 0, affine: bool = False, rotate: float = 0.0, scale: float = 0.0):
        self.images = images_NCHW
        self.labels = labels_N
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.shift = int(shift)
        self.affine, self.rotate, self.scale = check_flag(affine, "affine"), float(rotate), float(scale)
        self.seed, self.epoch = int(seed), 0

    def _warp(self, image_CHW: torch.Tensor, index: int) -> torch.Tensor:
        _, height, width = image_CHW.shape
        with _sample_rng(self.seed, self.epoch, index):
            u = torch.rand(4) * 2 - 1  # rotation, scale, dx, dy in [-1, 1]
        angle = math.radians(self.rotate) * float(u[0])
        zoom = 1.0 + self.scale * float(u[1])
        dx, dy = self.shift * float(u[2]), self.shift * float(u[3])
        cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom  # theta maps output -> input coordinates
        # theta acts on coordinates normalised to [-1, 1] per axis, n = D p with D = diag(2 / W, 2 / H): a rotation
        # of the pixels is D R D^-1 there (R itself would shear a non-square image). input = A (output - t) with t
        # the shift in normalised coordinates, so the content moves by exactly (dx, dy) pixels whatever the rotation
        # and zoom (theta's last column is -A t, not -t)
        a00, a01, a10, a11 = cos, -sin * height / width, sin * width / height, cos
        tx, ty = 2 * dx / width, 2 * dy / height
        theta = torch.tensor([[a00, a01, -(a00 * tx + a01 * ty)], [a10, a11, -(a10 * tx + a11 * ty)]],
                             dtype=image_CHW.dtype)
        grid = F.affine_grid(theta[None], [1, *image_CHW.shape], align_corners=False)
        return F.grid_sample(image_CHW[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image_CHW = self.images[index]
        if self.affine:
            image_CHW = self._warp(image_CHW, index)
        elif self.shift > 0:
            s = self.shift
            with _sample_rng(self.seed, self.epoch, index):
                dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
            padded = F.pad(image_CHW, (s, s, s, s))
            image_CHW = padded[:, dy : dy + image_CHW.shape[1], dx : dx + image_CHW.shape[2]]
        return (image_CHW - self.mean) / self.std, self.labels[index]


# consecutive unreadable images a dataset replaces before it stops (timm/data/dataset.py's _ERROR_RETRY: 10)
MAX_UNREADABLE_IN_A_ROW = 10


class _TransformedSubset(Dataset):
    """A (subset of a) torchvision dataset with a transform seeded per sample by (seed, epoch, index).

    An image file that cannot be read (corrupt, truncated, deleted since the folder was listed) is replaced by the
    next sample of the subset, with a warning naming the file, as timm's ``ImageDataset.__getitem__`` does
    (timm/data/dataset.py: it retries ``index + 1`` and stops after ``_ERROR_RETRY`` consecutive failures), instead
    of stopping the run when the shuffled order reaches the file. The replacement is a function of the index alone
    (the next readable one, augmented as that index is), so the training order stays deterministic and a resumed
    run trains on exactly what the interrupted one did. Evaluation counts the replacing image in the bad one's
    place, as timm's validate.py does. ``MAX_UNREADABLE_IN_A_ROW`` bad files in a row stop with the last error."""

    def __init__(self, base: Dataset, indices: Optional[Sequence[int]], transform: Callable, seed: int = 0):
        self.base, self.indices, self.transform = base, None if indices is None else list(indices), transform
        self.seed, self.epoch = int(seed), 0

    def __len__(self) -> int:
        return len(self.base) if self.indices is None else len(self.indices)

    def _read(self, index: int):
        """(image, label, the index read): ``index``'s sample, else the next readable one (module docstring)."""
        for attempt in range(min(MAX_UNREADABLE_IN_A_ROW, len(self))):
            position = (index + attempt) % len(self)
            try:
                image, label = self.base[position if self.indices is None else self.indices[position]]
                return image, label, position
            except (ValueError, OSError) as error:  # read_image names the file (a ValueError, FileNotFoundError)
                problem = error
                warnings.warn(f"skipped an unreadable image (sample {position}), training and evaluation take the "
                              f"next one in its place: {error}", stacklevel=2)
        raise ValueError(f"{min(MAX_UNREADABLE_IN_A_ROW, len(self))} unreadable images in a row from sample {index} "
                         f"on (the last: {problem}); check the image files") from None

    def __getitem__(self, index: int):
        image, label, position = self._read(index)
        with _sample_rng(self.seed, self.epoch, position):
            return self.transform(image), int(label)


def _stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out) with ``fraction`` held out, stratified by label."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    if fraction <= 0:
        return index, index[:0]
    num_held, num_classes = int(np.ceil(fraction * len(labels))), len(np.unique(labels))
    if num_held < num_classes or len(labels) - num_held < num_classes:
        raise ValueError(
            f"val_fraction={fraction} of {len(labels)} images holds out {num_held}, but a stratified split needs at "
            f"least one image per class ({num_classes}) on each side; change val_fraction or add a val/ folder"
        )
    kept, held = train_test_split(index, test_size=fraction, stratify=labels, random_state=seed)
    return np.sort(kept), np.sort(held)


def digits_splits(val_fraction: float = 0.1, seed: int = 0) -> dict[str, np.ndarray]:
    """Indices into ``load_digits()`` for train / val / test (test fixed, see the module docstring)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=DIGITS_TEST_SIZE, stratify=labels, random_state=DIGITS_TEST_SEED)
    rest, test = np.sort(rest), np.sort(test)
    kept, held = _stratified_split(labels[rest], val_fraction, seed)
    return {"train": rest[kept], "val": rest[held], "test": test}


def _integer(value, name: str, minimum: Optional[int] = None) -> int:
    """An int (not a bool, not 1.5 rounded down), at least ``minimum``, or a one-line ValueError naming ``name``."""
    if isinstance(value, bool) or not is_int(value) or (minimum is not None and int(value) < minimum):
        raise ValueError(f"{name} must be an integer{f' >= {minimum}' if minimum is not None else ''}, got {value!r}")
    return int(value)


def _number(value, name: str, low: float, high: float, high_inclusive: bool = True) -> float:
    """A finite number in [low, high] (or [low, high)), or a one-line ValueError naming ``name`` (NaN used to pass
    checks that compare, and then made every image NaN)."""
    inside = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and (
        low <= value <= high if high_inclusive else low <= value < high)
    if not inside:
        raise ValueError(f"{name} must be a number in [{low}, {high}{']' if high_inclusive else ')'}, got {value!r}")
    return float(value)


_INTERPOLATIONS = ("bilinear", "bicubic")


def _crop_pct(value) -> float | str:
    if value == "model":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value <= 1:
        raise ValueError(f"crop_pct must be a number in (0, 1] (the centre fraction evaluation keeps) or 'model' (the "
                         f"model's pretrained_cfg crop_pct, as timm's validate.py), got {value!r}")
    return float(value)


def _interpolation(value) -> str:
    if value not in (*_INTERPOLATIONS, "model"):
        raise ValueError(f"interpolation must be {', '.join(_INTERPOLATIONS)} or 'model' (the model's pretrained_cfg "
                         f"interpolation, as timm's validate.py), got {value!r}")
    return value


def _probability(value, name: str) -> float:
    """A number in [0, 1], or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _check_stats(mean: Sequence[float], std: Sequence[float], in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    stats = []
    for name, value in (("mean", mean), ("std", std)):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = (value,)  # one number for every channel
        try:
            stats.append(tuple(float(v) for v in value))
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a list of numbers (one, or one per channel) or 'model' (the model's "
                             f"pretrained_cfg statistics), got {value!r}") from None
    mean, std = stats
    if len(mean) == 1 and in_chans > 1:
        mean = mean * in_chans
    if len(std) == 1 and in_chans > 1:
        std = std * in_chans
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(f"mean {mean} / std {std} must have 1 or in_chans={in_chans} values")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {std}")
    return mean, std


# timm train.py's training augmentations for the image folders and CIFAR (not the in-memory digits)
_DEFAULT_CROP_SCALE = (0.35, 1.0)  # the "standard" crop's area range: milder than timm's 0.08 for small data sets
_DEFAULT_CROP_RATIO = (3 / 4, 4 / 3)  # its aspect-ratio range: timm's and torchvision's default
_ERASING_MODES = ("pixel", "rand", "const")
# timm's --train-interpolation: "random" picks bilinear or bicubic per image (timm/data/transforms.py)
_TRAIN_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "random")
_MIN_BLUR_SIZE = 12  # timm's GaussianBlur(kernel_size=23) reflect-pads by 11 pixels, which needs 12 per side
_TIMM_AUGMENT_OPTIONS = ("auto_augment", "color_jitter", "color_jitter_prob", "grayscale_prob", "gaussian_blur_prob",
                         "reprob", "remode", "recount", "scale", "ratio", "vflip", "train_interpolation")


def _number_pair(value, name: str, low: float, high: float, low_inclusive: bool, meaning: str) -> tuple[float, float]:
    """[lo, hi] with low < (or <=) lo <= hi <= high, both finite numbers, or a one-line ValueError naming ``name``."""
    try:
        pair = tuple(value) if not isinstance(value, (str, bytes)) else ()
    except TypeError:
        pair = ()
    numbers = all(not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) for v in pair)
    if len(pair) != 2 or not numbers or not ((low <= pair[0]) if low_inclusive else (low < pair[0])) \
            or not pair[0] <= pair[1] <= high:
        interval = f"{'[' if low_inclusive else '('}{low:g}, {high:g}]"
        raise ValueError(f"{name} must be a pair [lo, hi] of numbers in {interval} with lo <= hi ({meaning}), got {value!r}")
    return float(pair[0]), float(pair[1])


def _color_jitter(value) -> Optional[float | tuple[float, ...]]:
    """null, one number >= 0 (brightness, contrast and saturation alike: timm's --color-jitter) or a list of 3 or 4
    (brightness, contrast, saturation[, hue]), as ``timm.data.create_transform`` takes it (a tuple: timm tests
    ``isinstance(color_jitter, (list, tuple))``, which a Hydra ListConfig fails). torchvision's ColorJitter bounds
    the hue jitter to [0, 0.5] (half the hue circle either way)."""
    def number(v) -> bool:
        return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0

    if value is None:
        return None
    if number(value):
        return float(value)
    try:
        factors = tuple(value) if not isinstance(value, (str, bytes)) else ()
    except TypeError:
        factors = ()
    if len(factors) not in (3, 4) or not all(number(v) for v in factors) or (len(factors) == 4 and factors[3] > 0.5):
        raise ValueError(f"color_jitter must be null, a number >= 0 (brightness, contrast and saturation, timm's "
                         f"--color-jitter) or a list [brightness, contrast, saturation] or [..., hue] of numbers >= 0 "
                         f"with hue <= 0.5 (timm's create_transform), got {value!r}")
    return tuple(float(v) for v in factors)


def _posterize_any_bits(image, bits_to_keep: int, **_):
    """timm's ``posterize`` (timm/data/auto_augment.py) for every level its policies reach. RandAugment's
    PosterizeIncreasing keeps 0 bits at magnitude 10 (``rand-m9-mstd0.5-inc1`` draws it for about 2% of its
    posterizes) and AutoAugment v0's Posterize at low levels; Pillow used to turn 0 bits into a black image (its
    mask ``~(2**8 - 1)`` keeps nothing), and the Pillow installed here refuses it ("bits must be between or equal
    to 1 and 8"), which stopped training at a random step. 0 bits is that black image again."""
    from PIL import Image
    from timm.data.auto_augment import posterize

    return Image.new(image.mode, image.size) if bits_to_keep <= 0 else posterize(image, bits_to_keep)


def _with_any_posterize_bits(policy: Callable) -> None:
    """Make the posterize ops of ``policy`` (timm's RandAugment, AugMix or AutoAugment) :func:`_posterize_any_bits`."""
    from timm.data import auto_augment

    ops = [op for sub in policy.policy for op in sub] if hasattr(policy, "policy") else getattr(policy, "ops", [])
    for op in ops:
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = _posterize_any_bits


class _TimmAugment:
    """timm train.py's training augmentations, on top of the zoo's crop and flip (``augment`` "standard" or "crop"):

    * ``auto_augment``: timm's ``--aa`` policy string: RandAugment ("rand-m9-mstd0.5-inc1"), AugMix
      ("augmix-m5-w4-d2"), AutoAugment ("original", "v0", "3a", ...); null for none.
    * ``color_jitter``: ``--color-jitter``, the ColorJitter strength of brightness, contrast and saturation, or a
      list [brightness, contrast, saturation(, hue)] as create_transform takes; null for none. timm leaves it out
      under an AA policy (except "3a" ones): refused with one here, not ignored. ``color_jitter_prob``
      (``--color-jitter-prob``): jitter only this fraction of the images (null: every image).
    * ``grayscale_prob`` / ``gaussian_blur_prob``: ``--grayscale-prob`` / ``--gaussian-blur-prob``, the SimCLR-style
      RandomGrayscale and RandomApply(GaussianBlur(kernel_size=23), sigma 0.1-2) after the colour jitter.
    * ``vflip``: ``--vflip``, the vertical flip's probability, after the horizontal one (the zoo's ``hflip``).
    * ``train_interpolation``: ``--train-interpolation``, the training crop's resampling and AA's: bilinear (the
      zoo's default; timm's is random), bicubic, nearest, or random (bilinear or bicubic per image, and per AA
      op, from Python's RNG as timm draws it). Bilinear resizes the image tensor, as every zoo run trained; the
      others resize the PIL image with Pillow's filters, as timm's RandomResizedCropAndInterpolation does.
    * ``reprob`` / ``remode`` / ``recount``: ``--reprob`` / ``--remode`` / ``--recount``, random erasing (Zhong et
      al. 2017) of the normalised image: its probability, fill ("pixel": per-pixel normal noise, "rand": one
      normal colour per box, "const": zeros) and the most boxes per image.
    * ``scale`` / ``ratio``: ``--scale`` / ``--ratio``, the area fraction and aspect-ratio ranges of augment
      "standard"'s random resized crop ([0.35, 1] and [3/4, 4/3] by default).

    timm builds them (``timm.data.create_transform(is_training=True, separate=True)``: the AA, colour jitter,
    grayscale and blur of its secondary stage on the PIL image, the RandomErasing of its final stage on the
    normalised tensor), so their semantics and order are timm's (transforms_imagenet_train,
    timm/data/transforms_factory.py; train.py's argument help), with AA's fill colour from the normalisation mean
    as timm's. By design, the crop and flips stay the zoo's (torchvision, crop boxes and flips drawn from torch's
    RNG: the default training tensors are unchanged; timm draws its crop box from Python's RNG), and AA's
    rotations, shears and translations resample with ``train_interpolation``, as the crop does (bilinear unless
    set; timm's train.py defaults to random).
    Posterize's 0-bit level gives a black image, as timm's policies were designed with (:func:`_posterize_any_bits`).
    """

    def __init__(self, augment: str, img_size: int, in_chans: int, auto_augment: Optional[str] = None,
                 color_jitter: Optional[float | Sequence[float]] = None, reprob: float = 0.0, remode: str = "pixel",
                 recount: int = 1, scale: Sequence[float] = _DEFAULT_CROP_SCALE,
                 ratio: Sequence[float] = _DEFAULT_CROP_RATIO, vflip: float = 0.0,
                 color_jitter_prob: Optional[float] = None, grayscale_prob: float = 0.0,
                 gaussian_blur_prob: float = 0.0, train_interpolation: str = "bilinear"):
        if auto_augment is not None and (not isinstance(auto_augment, str) or not auto_augment):
            raise ValueError(f"auto_augment must be null or a timm policy string (e.g. rand-m9-mstd0.5-inc1, "
                             f"augmix-m5-w4-d2, original, v0, 3a: timm's --aa), got {auto_augment!r}")
        if remode not in _ERASING_MODES:
            raise ValueError(f"remode must be one of {', '.join(_ERASING_MODES)} (random erasing's fill, timm's "
                             f"--remode), got {remode!r}")
        if train_interpolation not in _TRAIN_INTERPOLATIONS:
            raise ValueError(f"train_interpolation must be one of {', '.join(_TRAIN_INTERPOLATIONS)} (the training "
                             f"crop's resampling, timm's --train-interpolation), got {train_interpolation!r}")
        self.auto_augment, self.remode, self.train_interpolation = auto_augment, remode, train_interpolation
        self.color_jitter = _color_jitter(color_jitter)
        self.color_jitter_prob = None if color_jitter_prob is None else _probability(color_jitter_prob,
                                                                                       "color_jitter_prob")
        self.grayscale_prob = _probability(grayscale_prob, "grayscale_prob")
        self.gaussian_blur_prob = _probability(gaussian_blur_prob, "gaussian_blur_prob")
        self.vflip = _probability(vflip, "vflip")
        self.reprob, self.recount = _probability(reprob, "reprob"), _integer(recount, "recount", 1)
        self.scale = _number_pair(scale, "scale", 0.0, 1.0, False, "the crop's area fraction, timm's --scale")
        self.ratio = _number_pair(ratio, "ratio", 0.0, math.inf, False, "the crop's aspect ratio, timm's --ratio")
        if (self.scale, self.ratio) != (_DEFAULT_CROP_SCALE, _DEFAULT_CROP_RATIO) and augment != "standard":
            raise ValueError(f"scale and ratio set the random resized crop of augment=standard, but augment={augment!r} "
                             f"has none; use augment=standard or leave them at their defaults")
        given = [name for name, off in (("auto_augment", auto_augment is None), ("color_jitter", color_jitter is None),
                                        ("grayscale_prob", self.grayscale_prob == 0),
                                        ("gaussian_blur_prob", self.gaussian_blur_prob == 0), ("reprob", self.reprob == 0),
                                        ("vflip", self.vflip == 0), ("train_interpolation",
                                                                     train_interpolation == "bilinear")) if not off]
        if given and augment == "none":
            raise ValueError(f"{' and '.join(given)} augment the training images, but augment=none trains on them "
                             f"unaugmented; use augment=standard or crop, or leave {' and '.join(given)} unset")
        if color_jitter_prob is not None and color_jitter is None:
            raise ValueError(f"color_jitter_prob={color_jitter_prob} is the probability of the colour jitter, but "
                             f"color_jitter is null; set color_jitter (e.g. 0.4) or leave color_jitter_prob null")
        if self.grayscale_prob > 0 and in_chans == 1:
            raise ValueError(f"grayscale_prob={grayscale_prob} turns colour images gray, but in_chans=1 trains on gray "
                             f"images already; leave grayscale_prob at 0 or use in_chans=3")
        if self.gaussian_blur_prob > 0 and img_size < _MIN_BLUR_SIZE:
            raise ValueError(f"gaussian_blur_prob needs img_size >= {_MIN_BLUR_SIZE} (timm's blur kernel is 23 pixels "
                             f"wide, reflect-padded by 11), got img_size={img_size}; leave it at 0 or train larger")
        if auto_augment is not None and color_jitter is not None and "3a" not in auto_augment:
            raise ValueError(f"color_jitter is not applied with auto_augment={auto_augment!r}: timm turns colour jitter "
                             f"off under an AA policy other than 3a; leave color_jitter null or use a 3a policy")
        if auto_augment is not None:
            self._check_policy(img_size, in_chans)

    def _check_policy(self, img_size: int, in_chans: int) -> None:
        """timm parses the policy string when it builds the transform (asserting, or failing on an unknown op), and
        skips a section without a number (e.g. "inc" for "inc1") silently: refused too, as a typo would change the
        policy unseen."""
        valueless = [part for part in self.auto_augment.split("-")[1:] if not any(c.isdigit() for c in part)]
        try:
            if valueless:
                raise ValueError(f"section {valueless[0]!r} has no value")
            self.stages(img_size, (0.5,) * in_chans, (0.5,) * in_chans)
        except (AssertionError, ValueError, KeyError, IndexError, TypeError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"auto_augment={self.auto_augment!r} is not a timm policy string ({reason}); use e.g. "
                             f"rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original, v0 or 3a (timm's --aa), or null") from None

    def stages(self, img_size: int, mean: Sequence[float], std: Sequence[float]) -> tuple[Optional[Callable], Optional[Callable]]:
        """(AA, colour jitter, grayscale and blur of a PIL image, random erasing of the normalised tensor): timm's,
        each None when off."""
        if (self.auto_augment, self.color_jitter, self.grayscale_prob, self.gaussian_blur_prob, self.reprob) == (
                None, None, 0, 0, 0):
            return None, None
        import timm.data
        from timm.data.random_erasing import RandomErasing

        _, secondary, final = timm.data.create_transform(
            img_size, is_training=True, separate=True, scale=self.scale, ratio=self.ratio, hflip=0.0,
            color_jitter=self.color_jitter, color_jitter_prob=self.color_jitter_prob,
            grayscale_prob=self.grayscale_prob, gaussian_blur_prob=self.gaussian_blur_prob,
            auto_augment=self.auto_augment, interpolation=self.train_interpolation, mean=tuple(mean), std=tuple(std),
            re_prob=self.reprob, re_mode=self.remode, re_count=self.recount)
        for step in secondary.transforms:
            _with_any_posterize_bits(step)
        erasing = [step for step in final.transforms if isinstance(step, RandomErasing)]
        return secondary if secondary.transforms else None, erasing[0] if erasing else None


def _evaluation_sampler(dataset: Dataset, what: str = "evaluation split", fix: str = "raise its size",
                        unit: str = "image"):
    """None in one process. Under DDP, each image on exactly one process: Lightning's default
    DistributedSampler pads a split that does not divide by the process count with repeated images, which
    the synced metrics then counted twice (test accuracy 3/34 for 3 right of 33; the padded val accuracy
    also picked best.ckpt). Lightning leaves a DistributedSampler it is given alone.

    A process left without an item would skip the evaluation while the others wait for it in the metrics'
    reduction (Lightning's sampler asserts on one process only): refused on every process alike, ``what`` naming
    the split, ``unit`` its items, ``fix`` the setting that enlarges it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    processes = dist.get_world_size()
    if len(dataset) < processes:
        raise ValueError(f"the {what} holds {len(dataset)} {unit}(s) for {processes} DDP processes: each process "
                         f"scores its share and needs at least one; {fix}, or use fewer trainer.devices")
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(dataset, shuffle=False)


# --------------------------------------------------------------------------------------------------
# Data modules
# --------------------------------------------------------------------------------------------------
def loader_workers(num_workers: Union[int, str]) -> int:
    """DataLoader worker processes: an int >= 0, or "auto" = 4 capped at the CPUs this process may use (the
    image folder and CIFAR defaults: torch warns when a loader asks for more workers than there are CPUs)."""
    if num_workers == "auto":
        return min(4, usable_cpus())
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0 or 'auto' (4, at most the CPU count), got {num_workers!r}")
    return num_workers


class VisionDataModule(ResumableTrainingOrder, pl.LightningDataModule):
    """Shared loaders; subclasses set ``self.train_set``/``val_set``/``test_set`` in ``setup``."""

    # the data keys that define which images train: a mid-epoch resume refuses a change of them (another train / val
    # split trained images twice, others never, and moved trained images into validation: audit 2026-12-06); the
    # augmentation options, img_size (the same images resized), batch_size and num_workers may change there
    # (ResumableTrainingOrder.check_same_data)
    mid_epoch_fixed_keys = ("_target_", "root", "variant", "val_fraction", "split_seed")

    num_classes: int = 0
    class_names: list[str] = []
    default_img_size: int = 32
    default_in_chans: int = 3

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: Optional[int] = None,
        num_workers: Union[int, str] = 0,
        img_size: Optional[int] = None,
        in_chans: Optional[int] = None,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
        augment: str = "none",
        val_fraction: float = 0.1,
        seed: int = 0,
        num_classes: Optional[int] = None,
        drop_last: bool = False,
        split_seed: int = 0,
        crop_pct: float | str = 1.0,
        interpolation: str = "bilinear",
    ):
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        _number(val_fraction, "val_fraction", 0.0, 1.0, high_inclusive=False)  # a string was a bare float() error
        if eval_batch_size is not None and (isinstance(eval_batch_size, bool) or not isinstance(eval_batch_size, int)
                                            or eval_batch_size < 1):  # 0 used to mean the default, silently
            raise ValueError(f"eval_batch_size must be a positive int, or null for max(batch_size, 256), got "
                             f"{eval_batch_size!r}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or max(batch_size, 256)
        self.num_workers = loader_workers(num_workers)
        # as the models check theirs: 16.7 was rounded down, 0 meant the default and -4 failed at the first image
        self.img_size = self.default_img_size if img_size is None else _integer(img_size, "img_size", 1)
        self.in_chans = self.default_in_chans if in_chans is None else _integer(in_chans, "in_chans", 1)
        if self.in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans!r}")
        self._stats_from_model = mean == "model" or std == "model"
        if self._stats_from_model:
            if mean != std:
                raise ValueError(f"mean and std are both 'model' (the model's pretrained_cfg) or both numbers, got "
                                 f"mean={mean!r}, std={std!r}")
            self.mean = self.std = None  # set by adopt_model_stats, before setup
        else:
            self.mean, self.std = _check_stats(mean, std, self.in_chans)
        self.augment = augment
        self.val_fraction = float(val_fraction)
        self.seed = _integer(seed, "seed")  # training order and augmentation
        self.split_seed = _integer(split_seed, "split_seed", 0)  # which images are validation images
        # evaluation resize and crop; "model": resolved by adopt_model_stats, before setup
        self.crop_pct, self.interpolation = _crop_pct(crop_pct), _interpolation(interpolation)
        self.crop_mode = "center"
        self.expected_num_classes = num_classes
        self.drop_last = check_flag(drop_last, "drop_last")
        self.train_set = self.val_set = self.test_set = None

    def adopt_model_stats(self, model) -> None:
        """With ``mean=std="model"``: normalise as ``model`` expects, by its ``pretrained_cfg`` mean and std --
        what timm's train.py does by default (timm.data.resolve_data_config), so fine-tuning timm's weights
        (mean 0.5 for the augreg ViTs, ImageNet's for others) or a zoo checkpoint feeds them the statistics they
        were trained with. Numbers given as data.mean / data.std are kept.

        With ``crop_pct="model"`` / ``interpolation="model"``: evaluate with the model's crop_pct, crop_mode and
        interpolation, resolved by ``timm.data.resolve_model_data_config`` (its defaults 0.875 / bicubic where the
        model's pretrained_cfg has none), as timm's train.py and validate.py evaluate."""
        self._adopt_model_eval_transform(model)
        if not self._stats_from_model:
            return
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if cfg.get("mean") is None or cfg.get("std") is None:
            raise ValueError(f"data.mean=model: {type(model).__name__} has no pretrained_cfg mean/std; give data.mean "
                             f"and data.std as numbers")
        try:
            self.mean, self.std = _check_stats(cfg["mean"], cfg["std"], self.in_chans)
        except ValueError as error:
            raise ValueError(f"data.mean=model: the model's pretrained_cfg does not fit the data ({error})") from None

    def _adopt_model_eval_transform(self, model) -> None:
        if "model" not in (self.crop_pct, self.interpolation):
            return
        import timm.data

        cfg = timm.data.resolve_model_data_config(model)
        if self.crop_pct == "model":
            self.crop_pct = float(cfg["crop_pct"])
            self.crop_mode = cfg.get("crop_mode") or "center"
            if self.crop_mode not in ("center", "squash"):
                raise ValueError(f"data.crop_pct=model: the model's crop_mode {self.crop_mode!r} is not supported "
                                 f"(center, squash); give data.crop_pct as a number")
        if self.interpolation == "model":
            self.interpolation = cfg["interpolation"]
            if self.interpolation not in _INTERPOLATIONS:
                raise ValueError(f"data.interpolation=model: the model's interpolation {self.interpolation!r} is not "
                                 f"supported ({', '.join(_INTERPOLATIONS)}); give data.interpolation")

    def _require_stats(self) -> None:
        if "model" in (self.crop_pct, self.interpolation):
            raise RuntimeError(f"{type(self).__name__}: crop_pct / interpolation 'model' need adopt_model_stats(model) "
                               f"before setup (zoo train calls it)")
        if self.mean is None:
            raise RuntimeError(f"{type(self).__name__}: mean='model' needs adopt_model_stats(model) before setup "
                               f"(zoo train calls it)")

    def _check_num_classes(self) -> None:
        if self.expected_num_classes is not None and int(self.expected_num_classes) != self.num_classes:
            raise ValueError(
                f"data.num_classes={self.expected_num_classes} but {type(self).__name__} found {self.num_classes} classes "
                f"({', '.join(self.class_names[:10])}{', ...' if self.num_classes > 10 else ''})"
            )

    def describe(self) -> dict[str, Any]:
        """Preprocessing facts stored with released weights and in the .ckpt (zoo predict, zoo eval and zoo viz use
        them): size, channels, normalisation and the evaluation resize/crop (``eval_preprocessing``, resolved), and
        for image folders and CIFAR the absolute root (zoo eval of a run whose config stored a relative data.root
        reads it, as for graph data: zoo.train.run._pin_stored_data_paths)."""
        self._require_stats()
        return {
            "img_size": self.img_size,
            "in_chans": self.in_chans,
            "mean": list(self.mean),
            "std": list(self.std),
            "class_names": list(self.class_names),
            "num_classes": self.num_classes,
            **self.eval_preprocessing(),
            **({"root": os.path.abspath(self.root)} if getattr(self, "root", None) is not None else {}),
        }

    def eval_preprocessing(self) -> dict[str, Any]:
        """The evaluation transform in timm's ``pretrained_cfg`` terms, recorded with released weights so that
        ``timm.data.create_transform(**resolve_model_data_config(model))`` preprocesses as training evaluated:
        the ``crop_pct`` / ``interpolation`` used (by default a bilinear resize to the model's size and no crop;
        the registry's defaults are timm's bicubic and 0.875-0.95 crops)."""
        self._require_stats()
        return {"crop_pct": self.crop_pct, "crop_mode": self.crop_mode, "interpolation": self.interpolation}

    def _eval_transform(self) -> Callable:
        """The evaluation split's transform (image folders, CIFAR)."""
        return _image_transform(self.img_size, self.in_chans, self.mean, self.std, False, self.augment,
                                crop_pct=self.crop_pct, interpolation=self.interpolation, crop_mode=self.crop_mode)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run")
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=self.training_sampler(dataset, self.batch_size) if train else _evaluation_sampler(
                dataset, "val or test split", "raise data.val_fraction / the split's size"),
            num_workers=self.num_workers,
            drop_last=train and self.drop_last and len(dataset) >= self.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)


class _PictureDataModule(VisionDataModule):
    """Image folders and CIFAR (PIL images): ``augment`` "none", "standard" (random resized crop of ``scale`` of
    the area, ``ratio`` aspect, + flip) or "crop" (pad, random crop, flip); ``hflip`` the flip's probability (0.5;
    0 turns it off); and timm train.py's ``vflip``, ``train_interpolation``, ``auto_augment``, ``color_jitter`` /
    ``color_jitter_prob``, ``grayscale_prob``, ``gaussian_blur_prob``, ``reprob`` / ``remode`` / ``recount``
    (:class:`_TimmAugment`; all off by default). Every random op is seeded per sample."""

    def __init__(self, *args, hflip: float = 0.5, auto_augment: Optional[str] = None,
                 color_jitter: Optional[float | Sequence[float]] = None, reprob: float = 0.0, remode: str = "pixel",
                 recount: int = 1, scale: Sequence[float] = _DEFAULT_CROP_SCALE,
                 ratio: Sequence[float] = _DEFAULT_CROP_RATIO, vflip: float = 0.0,
                 color_jitter_prob: Optional[float] = None, grayscale_prob: float = 0.0, gaussian_blur_prob: float = 0.0,
                 train_interpolation: str = "bilinear", **kwargs):
        super().__init__(*args, **kwargs)
        self.hflip = _probability(hflip, "hflip")
        if self.augment not in ("none", "standard", "crop"):
            # (the digits experiments set augment=shift, which an image folder or CIFAR does not take)
            raise ValueError(f"{type(self).__name__}: data.augment must be 'none', 'standard' or 'crop', got "
                             f"{self.augment!r} (set by the experiment for the digits: give data.augment=crop or "
                             f"standard with this data)" if self.augment in ("shift", "affine") else
                             f"{type(self).__name__}: data.augment must be 'none', 'standard' or 'crop', got "
                             f"{self.augment!r}")
        self.timm_augment = _TimmAugment(self.augment, self.img_size, self.in_chans, auto_augment=auto_augment,
                                         color_jitter=color_jitter, reprob=reprob, remode=remode, recount=recount,
                                         scale=scale, ratio=ratio, vflip=vflip, color_jitter_prob=color_jitter_prob,
                                         grayscale_prob=grayscale_prob, gaussian_blur_prob=gaussian_blur_prob,
                                         train_interpolation=train_interpolation)

    def _train_transform(self) -> Callable:
        """The training split's transform (after adopt_model_stats: timm's AA fills with the normalisation mean)."""
        return _image_transform(self.img_size, self.in_chans, self.mean, self.std, True, self.augment, self.hflip,
                                timm_augment=self.timm_augment)


def image_folder_classes(root: Path) -> tuple[Optional[Path], list[str]]:
    """(the folder whose sub-folders name the classes, those names sorted as torchvision's ImageFolder numbers
    them) for an image-folder ``root``: ``root/train``, else ``root/test``, else ``root/val`` (a root with only an
    evaluation split serves zoo eval); (None, []) when there is none of them."""
    folder = next((root / split for split in ("train", "test", "val") if (root / split).is_dir()), None)
    return folder, (sorted(entry.name for entry in folder.iterdir() if entry.is_dir()) if folder is not None else [])


def image_folder_layout_message(root, problem: Optional[str] = None) -> str:
    """What to put where for ``data=image_folder`` under ``root`` (``problem`` defaults to its missing train/)."""
    root = Path(root)
    problem = problem or f"{root / 'train'} does not exist"
    return (f"ImageFolder data: {problem}. Put the images as {root}/train/<class_name>/<image file> (optionally "
            f"{root}/val/... and {root}/test/... in the same layout; a root with only test/ or val/ serves zoo eval).")


class DigitsDataModule(VisionDataModule):
    """scikit-learn's bundled 8x8 digits with the fixed held-out test split (module docstring)."""

    num_classes = 10
    class_names = [str(i) for i in range(10)]
    default_img_size = 8
    default_in_chans = 1

    def __init__(self, *args, shift: int = 1, rotate: float = 10.0, scale: float = 0.1, **kwargs):
        timm_options = [name for name in _TIMM_AUGMENT_OPTIONS if name in kwargs]  # scale: the digits' own zoom
        if isinstance(scale, (list, tuple)):  # timm's --scale (a crop-area range), not the digits' zoom amplitude
            timm_options.append("scale=[lo, hi]")
        if timm_options:
            raise ValueError(f"DigitsDataModule: {', '.join(timm_options)} (timm's augmentations of PIL images, for image "
                             f"folders and CIFAR) do not apply to the in-memory digit tensors; augment them with "
                             f"augment=shift or affine (shift, rotate, scale: one number, the zoom amplitude), or "
                             f"train on an image folder of the digits")
        super().__init__(*args, **kwargs)
        if self.augment not in ("none", "shift", "affine"):
            raise ValueError(f"DigitsDataModule: augment must be 'none', 'shift' or 'affine', got {self.augment!r}")
        # shift < 0 silently turned the shift off, 1.7 became 1; a NaN rotate or scale made every image NaN, and
        # scale >= 1 zooms by 1 + scale * u <= 0 for some images (a division by zero, or a mirrored digit)
        self.shift = _integer(shift, "shift", 0)
        self.rotate = _number(rotate, "rotate (degrees)", 0.0, 180.0)
        self.scale = _number(scale, "scale", 0.0, 1.0, high_inclusive=False)
        self._check_eval_transform()
        self._check_num_classes()

    def _check_eval_transform(self) -> None:
        """The digits are resized once in memory (bilinear, every split) and never cropped: crop_pct and
        interpolation are 1.0 and bilinear, or "model" for a model that asks for exactly that (vit_digits)."""
        if self.crop_pct not in (1.0, "model") or self.interpolation not in ("bilinear", "model"):
            raise ValueError(f"DigitsDataModule: the digits are evaluated uncropped with a bilinear resize (crop_pct=1.0, "
                             f"interpolation=bilinear), got crop_pct={self.crop_pct}, interpolation={self.interpolation}; "
                             f"use an image folder of the digits for other evaluation transforms")

    def _adopt_model_eval_transform(self, model) -> None:
        super()._adopt_model_eval_transform(model)
        self._check_eval_transform()

    def _images(self) -> tuple[torch.Tensor, torch.Tensor]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
        if self.img_size != images.shape[-1]:
            images = F.interpolate(images, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
            images = images.clamp_(0.0, 1.0)
        if self.in_chans == 3:
            images = images.expand(-1, 3, -1, -1).contiguous()
        return images, torch.tensor(digits.target, dtype=torch.long)

    def setup(self, stage: Optional[str] = None) -> None:
        self._require_stats()
        if self.train_set is not None:
            return
        images, labels = self._images()
        split = digits_splits(self.val_fraction, self.split_seed)
        shift = self.shift * max(1, self.img_size // 8) if self.augment != "none" else 0
        self.train_set = TensorImageDataset(images[split["train"]], labels[split["train"]], self.mean, self.std, shift, self.seed,
                                            affine=self.augment == "affine", rotate=self.rotate, scale=self.scale)
        val_index = split["val"] if len(split["val"]) else split["test"]
        self.val_set = TensorImageDataset(images[val_index], labels[val_index], self.mean, self.std)
        self.test_set = TensorImageDataset(images[split["test"]], labels[split["test"]], self.mean, self.std)


class _RandomInterpolation:
    """timm's ``train_interpolation="random"``: each image resized by one of ``resize(mode)`` for bilinear and
    bicubic, picked by Python's ``random.choice`` in timm's order (``_RANDOM_INTERPOLATION`` and
    ``RandomResizedCropAndInterpolation.__call__``, timm/data/transforms.py), so the pick is timm's and is seeded
    per sample by :class:`_sample_rng`; the crop box still comes from torch's RNG, unchanged by the pick."""

    def __init__(self, resize: Callable[[Any], Callable]):
        from torchvision.transforms import InterpolationMode

        self.resizes = [resize(mode) for mode in (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)]

    def __call__(self, image):
        return random.choice(self.resizes)(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({' or '.join(map(repr, self.resizes))})"


class _OneChannel:
    """``in_chans=1``: an 8-bit image tensor (3 channels, as the loaders read every file, or 1) to one channel, the
    zoo's conversion on every path (training, evaluation, zoo predict, zoo viz; before any PIL resize). A gray image
    (R = G = B at every pixel: every L, LA, 16-bit, ... file, which the loaders read as RGB) keeps its levels; a
    colour image gets torchvision's ``rgb_to_grayscale`` (0.2989 R + 0.587 G + 0.114 B truncated to an integer),
    what every zoo run trained on, unchanged. torchvision's weights sum to 0.9999, and the truncation took a gray
    level v to v - 1 for every v > 0, so gray files read one level darker than themselves, and than timm's
    transform of the file opened as ``L`` (Pillow's weights sum to 1: PIL/Convert.c). The choice is per image, not
    per pixel, so that the gray pixels of a colour image stay as every zoo run trained them."""

    def __call__(self, image_CHW: torch.Tensor) -> torch.Tensor:
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as TF

        if image_CHW.shape[-3] == 1:
            return image_CHW
        plain = image_CHW.as_subclass(torch.Tensor)
        red, green, blue = plain.unbind(-3)
        if torch.equal(red, green) and torch.equal(green, blue):
            converted_1HW = red.unsqueeze(-3).clone()
        else:
            converted_1HW = TF.rgb_to_grayscale(plain, num_output_channels=1)
        return tv_tensors.Image(converted_1HW) if isinstance(image_CHW, tv_tensors.Image) else converted_1HW

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _image_transform(img_size: int, in_chans: int, mean, std, train: bool, augment: str, hflip: float = 0.5,
                     crop_pct: float = 1.0, interpolation: str = "bilinear", crop_mode: str = "center",
                     timm_augment: Optional[_TimmAugment] = None) -> Callable:
    """torchvision v2 pipeline; ``hflip`` is the probability of the training augmentations' horizontal flip
    (timm's ``--hflip``; 0 for data whose mirror image is another class, e.g. digits or text).

    Training with ``timm_augment``: its crop ``scale`` / ``ratio`` and ``train_interpolation``, its ``vflip`` after
    the horizontal flip (timm's order), then timm's AA, colour jitter, grayscale and blur (on the PIL image, as timm
    applies them) and, after normalisation, timm's random erasing. The crop resizes the image tensor bilinearly
    (every zoo run's default); another ``train_interpolation`` resizes the PIL image with Pillow's filter, as timm's
    RandomResizedCropAndInterpolation (torch's bicubic kernel differs from Pillow's), from the same crop box.

    Evaluation (``train=False``, or augment "none"): resize to ``floor(img_size / crop_pct)`` with
    ``interpolation`` and crop the centre ``img_size`` square, as timm's ``transforms_imagenet_eval``
    (timm/data/transforms_factory.py; ``crop_mode`` "center" resizes the shorter side, "squash" both). The
    default (1.0, bilinear) resizes the image tensor, what every zoo checkpoint was evaluated with; any other
    setting resizes the PIL image, as timm does, since torch's bicubic kernel differs from Pillow's (by up to 16
    8-bit levels on a strongly shrunk image), so that the pipeline equals ``timm.data.create_transform``.

    Channels (``in_chans``) are converted on the 8-bit image tensor on every path, the PIL ones included (tensor,
    channels, back to a PIL image: lossless): torchvision's tensor ``rgb_to_grayscale`` truncates where Pillow's
    ``convert("L")`` rounds, so converting the PIL image made about half the gray pixels one level brighter on
    exactly the paths that resize the PIL image, a train_interpolation other than bilinear even without any
    resampling, and a gray evaluation other than the default. A gray image keeps its levels
    (:class:`_OneChannel`). (timm converts no channels: this step is the zoo's.)"""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2 as T

    channels = _OneChannel() if in_chans == 1 else T.RGB()
    channels_of_pil = [T.ToImage(), channels, T.ToPILImage()]  # the tensor's conversion, for the PIL resizes
    vflip = timm_augment.vflip if timm_augment else 0.0
    flips = [T.RandomHorizontalFlip(hflip)] if hflip > 0 else []
    if vflip > 0:  # after the horizontal flip, as timm's primary stage
        flips.append(T.RandomVerticalFlip(vflip))
    crop_scale, crop_ratio = (timm_augment.scale, timm_augment.ratio) if timm_augment else (_DEFAULT_CROP_SCALE,
                                                                                          _DEFAULT_CROP_RATIO)
    train_interpolation = timm_augment.train_interpolation if timm_augment else "bilinear"
    colour, erasing = timm_augment.stages(img_size, mean, std) if train and timm_augment else (None, None)
    if train and augment in ("standard", "crop"):
        def resize(mode: InterpolationMode) -> Callable:
            """standard: the random resized crop; crop (CIFAR style): the resize before padding 4 (at 32 px)."""
            if augment == "standard":
                return T.RandomResizedCrop(img_size, scale=crop_scale, ratio=crop_ratio, interpolation=mode,
                                           antialias=True)
            return T.Resize(img_size, interpolation=mode, antialias=True)

        padded_crop = [T.RandomCrop(img_size, padding=max(1, img_size // 8))] if augment == "crop" else []
        if train_interpolation == "bilinear":  # the image tensor, as every zoo run trained
            steps: list[Any] = [T.ToImage(), channels, resize(InterpolationMode.BILINEAR), *padded_crop, *flips]
        else:  # the PIL image with Pillow's filter, as timm
            chosen = (_RandomInterpolation(resize) if train_interpolation == "random"
                      else resize(InterpolationMode(train_interpolation)))
            steps = [*channels_of_pil, chosen, T.ToImage(), *padded_crop, *flips]
    elif (crop_pct, interpolation, crop_mode) == (1.0, "bilinear", "center"):
        steps = [T.ToImage(), channels, T.Resize(img_size, antialias=True), T.CenterCrop(img_size)]
    else:
        scale = math.floor(img_size / crop_pct)
        mode = InterpolationMode(interpolation)
        resize = T.Resize((scale, scale) if crop_mode == "squash" else scale, interpolation=mode, antialias=True)
        steps = [*channels_of_pil, resize, T.CenterCrop(img_size), T.ToImage()]
    if colour is not None:  # 8-bit tensor <-> PIL image: lossless
        steps += [T.ToPILImage(), colour, T.ToImage()]
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]
    if erasing is not None:
        steps.append(erasing)
    return T.Compose(steps)


def is_image_file_name(name: str) -> bool:
    """Whether a file name is an image this zoo reads: its suffix (any case) in ``IMAGE_EXTENSIONS``, and not a
    macOS AppleDouble file (``._photo.png``: the resource-fork metadata Finder writes beside each file on non-Mac
    disks and into zip archives; not an image). torchvision's ImageFolder counts those and fails when an epoch reaches
    one; training, zoo eval and zoo predict leave them out."""
    base = os.path.basename(name)
    return base.lower().endswith(IMAGE_EXTENSIONS) and not base.startswith("._")


def _folder_image(path: str):
    """ImageFolder's loader: read_image, then RGB as torchvision's pil_loader gives (the transforms take RGB)."""
    return read_image(path).convert("RGB")


class ImageFolderDataModule(_PictureDataModule):
    """Images in class folders under a local ``root``::

        <root>/train/<class_name>/<image>.png   required
        <root>/val/<class_name>/...             optional (else ``val_fraction`` of train, stratified; with
                                                val_fraction=0, every train image trains and test/ validates)
        <root>/test/<class_name>/...            optional (else the validation images)

    A root with only test/ (or val/) is an evaluation set: ``zoo eval ckpt=... data=image_folder data.root=...``.

    ``augment``: "none", "standard" (random resized crop of 35-100% of the area + flip) or "crop" (pad, random
    crop, flip); ``hflip`` the flip's probability (0.5; 0 turns it off). "standard" is milder than timm's training
    default (crop scale 0.08-1.0 plus ColorJitter(0.4)): it is tuned for the small datasets this zoo trains from
    scratch; timm's are options: ``scale=[0.08, 1] color_jitter=0.4``, and ``auto_augment``, ``reprob``,
    ``vflip``, ``train_interpolation``, ... (:class:`_TimmAugment`).

    Images are the files whose suffix (any case) is in ``IMAGE_EXTENSIONS``, the list ``zoo predict`` reads (macOS
    AppleDouble ``._*`` files left out: :func:`is_image_file_name`).

    Evaluation resizes to ``img_size / crop_pct`` with ``interpolation`` and keeps the centre (defaults 1.0 and
    bilinear: the whole image); ``crop_pct="model"`` / ``interpolation="model"`` take the model's pretrained_cfg
    values, as timm's train.py and validate.py evaluate (``adopt_model_stats``).
    """

    def __init__(self, root: str, *args, classes: Optional[Sequence[str]] = None, **kwargs):
        """``classes``: the class names the targets index, for an evaluation set (zoo eval passes the model's
        trained classes when the folders are some of them): each folder is matched to its class by name, so a test
        set of a few classes' images is scored against the model's own class indices. None: the sorted class
        folders, as torchvision's ImageFolder numbers them."""
        super().__init__(*args, **kwargs)
        self.root = Path(os.path.expanduser(str(root)))
        # the class folders come from train/; a root holding only test/ (or val/) serves evaluation (zoo eval)
        self._class_dir, folders = image_folder_classes(self.root)
        if self._class_dir is None:
            raise FileNotFoundError(self._no_train_message())
        if not folders:
            raise FileNotFoundError(f"ImageFolder data: {self._class_dir} has no class sub-folders (expected "
                                    f"{self._class_dir}/<class_name>/<image>)")
        self._named_classes = classes is not None
        if classes is not None:
            classes = [str(name) for name in classes]
            if len(set(classes)) != len(classes) or not classes:
                raise ValueError(f"ImageFolder data: classes must be distinct names, got {classes}")
            unknown = sorted(set(folders) - set(classes))
            if unknown:
                raise ValueError(f"ImageFolder data: {self._class_dir} has folders {unknown} that are not among the "
                                 f"classes {classes[:10]}{' ...' if len(classes) > 10 else ''}")
        self.class_names = folders if classes is None else classes
        self.num_classes = len(self.class_names)
        self._check_num_classes()

    def _no_train_message(self) -> str:
        return image_folder_layout_message(self.root)

    def _folder(self, split: str):
        from torchvision.datasets import ImageFolder

        directory = self.root / split
        if not directory.is_dir():
            return None
        try:  # IMAGE_EXTENSIONS: the files zoo predict reads (torchvision's default list has no .gif)
            dataset = ImageFolder(str(directory), loader=_folder_image, is_valid_file=is_image_file_name)
        except FileNotFoundError as error:  # torchvision names the class but not the split it looked in
            empty = [name for name in self.class_names if (directory / name).is_dir()
                     and not any(is_image_file_name(p.name) for p in (directory / name).rglob("*"))]
            raise FileNotFoundError(f"ImageFolder data: {directory}/{empty[0] if empty else '<class>'} holds no image "
                                    f"({', '.join(IMAGE_EXTENSIONS)}); put at least one image in every class folder "
                                    f"or remove the folder from every split") from error
        if self._named_classes:  # folders matched to the given classes by name (a subset of them is fine)
            extra = sorted(set(dataset.classes) - set(self.class_names))
            if extra:
                raise ValueError(f"ImageFolder data: {directory} has folders {extra} that are not among the classes")
            index = {name: self.class_names.index(name) for name in dataset.classes}
            dataset.samples = [(path, index[dataset.classes[target]]) for path, target in dataset.samples]
            dataset.imgs = dataset.samples
            dataset.targets = [target for _, target in dataset.samples]
            dataset.classes, dataset.class_to_idx = list(self.class_names), {n: i for i, n in enumerate(self.class_names)}
            return dataset
        if dataset.classes != self.class_names:
            extra = sorted(set(dataset.classes) - set(self.class_names))
            missing = sorted(set(self.class_names) - set(dataset.classes))
            where, names = (directory, extra) if extra else (self._class_dir, missing)
            hidden = [name for name in names if name.startswith(".")]
            hint = (f"; {', '.join(hidden)} {'is a hidden folder' if len(hidden) == 1 else 'are hidden folders'} "
                    f"(Jupyter leaves .ipynb_checkpoints behind), which torchvision's ImageFolder and timm count as a "
                    f"class too: delete {'it' if len(hidden) == 1 else 'them'} from {where}" if hidden else "")
            raise ValueError(f"ImageFolder data: {directory} has classes {extra} that {self._class_dir} lacks{hint}"
                             if extra else
                             f"ImageFolder data: {directory} lacks classes {missing} of {self._class_dir}; give every "
                             f"split all class folders{hint}")
        return dataset

    def setup(self, stage: Optional[str] = None) -> None:
        self._require_stats()
        if self.train_set is not None or (stage in ("test", "validate") and self.test_set is not None):
            return
        train_tf = self._train_transform()
        eval_tf = self._eval_transform()
        train = self._folder("train")
        val = self._folder("val")
        test = self._folder("test")
        if train is None:  # evaluation only (zoo eval): test/ and val/ stand in for each other
            if stage not in ("test", "validate"):
                raise FileNotFoundError(self._no_train_message())
            self.val_set = _TransformedSubset(val if val is not None else test, None, eval_tf)
            self.test_set = _TransformedSubset(test if test is not None else val, None, eval_tf)
            return
        if val is None and self.val_fraction == 0:  # train on every image, validate on test/ (as the digits do)
            if test is None:
                raise ValueError(f"val_fraction=0 trains on every image of {self.root / 'train'} and validates on a "
                                 f"test/ folder, but {self.root} has neither val/ nor test/; give val_fraction > 0 "
                                 f"or add one of them")
            self.train_set = _TransformedSubset(train, None, train_tf, self.seed)
            self.val_set = _TransformedSubset(test, None, eval_tf)
        elif val is None:
            kept, held = _stratified_split(np.array(train.targets), self.val_fraction, self.split_seed)
            self.train_set = _TransformedSubset(train, kept, train_tf, self.seed)
            self.val_set = _TransformedSubset(train, held, eval_tf)
        else:
            self.train_set = _TransformedSubset(train, None, train_tf, self.seed)
            self.val_set = _TransformedSubset(val, None, eval_tf)
        self.test_set = _TransformedSubset(test, None, eval_tf) if test is not None else self.val_set


_CIFAR_FILES = {
    10: ("cifar-10-batches-py", ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta"],
         "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    100: ("cifar-100-python", ["train", "test", "meta"], "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}


class CIFARDataModule(_PictureDataModule):
    """torchvision CIFAR-10 / CIFAR-100 read from a local ``root`` (never downloaded).

    ``root`` must hold the extracted python version: ``<root>/cifar-10-batches-py/`` (data_batch_1..5,
    test_batch, batches.meta) or ``<root>/cifar-100-python/`` (train, test, meta). Validation is
    ``val_fraction`` of the 50 000 training images (stratified); test is the official test set.
    """

    default_img_size = 32
    default_in_chans = 3

    def __init__(self, root: str, variant: int = 10, *args, **kwargs):
        if isinstance(variant, bool) or not is_int(variant) or int(variant) not in _CIFAR_FILES:
            raise ValueError(f"CIFAR variant must be 10 or 100, got {variant!r}")
        kwargs.setdefault("mean", (0.4914, 0.4822, 0.4465) if int(variant) == 10 else (0.5071, 0.4865, 0.4409))
        kwargs.setdefault("std", (0.2470, 0.2435, 0.2616) if int(variant) == 10 else (0.2673, 0.2564, 0.2762))
        super().__init__(*args, **kwargs)
        self.variant = int(variant)
        self.root = Path(os.path.expanduser(str(root)))
        folder, files, url = _CIFAR_FILES[self.variant]
        missing = [name for name in files if not (self.root / folder / name).is_file()]
        if missing and ((self.root / files[0]).is_file() or self.root.name == folder):  # the extracted folder itself
            raise FileNotFoundError(
                f"CIFAR-{self.variant}: root (data.root) {self.root} is the extracted {folder} folder itself; give the "
                f"folder above it, data.root={self.root.parent}, which holds {folder}/ (as torchvision's "
                f"{'CIFAR10' if self.variant == 10 else 'CIFAR100'}(root) expects)")
        if missing:
            raise FileNotFoundError(
                f"CIFAR-{self.variant} not found: {self.root / folder} lacks {', '.join(missing)}. Nothing is downloaded: "
                f"fetch {url} yourself and extract it into {self.root} (tar xzf {url.rsplit('/', 1)[-1]} -C {self.root}) "
                f"so that {self.root / folder}/{files[0]} exists."
            )
        self.num_classes = self.variant
        self.class_names = self._read_class_names(folder)
        self._check_num_classes()

    def _read_class_names(self, folder: str) -> list[str]:
        from torchvision.datasets import CIFAR10, CIFAR100

        cls = CIFAR10 if self.variant == 10 else CIFAR100
        try:
            dataset = cls(str(self.root), train=False, download=False)
        except RuntimeError as error:  # torchvision's md5 check failed; its message advises download=True
            raise FileNotFoundError(self._corrupt_message(cls, folder, error)) from None
        return list(dataset.classes)

    def _corrupt_message(self, cls, folder: str, error: Exception) -> str:
        """Which files of the extracted archive fail torchvision's MD5 check (``check_integrity`` per file, the
        check torchvision's CIFAR10 / CIFAR100 run on them all at once, naming none), and what to do: re-extract
        the archive. torchvision's own text ("You can use download=True") names an option the zoo does not have."""
        from torchvision.datasets.utils import check_integrity

        expected = [*cls.train_list, *cls.test_list, [cls.meta["filename"], cls.meta["md5"]]]
        failing = [name for name, md5 in expected if not check_integrity(str(self.root / folder / name), md5)]
        archive = _CIFAR_FILES[self.variant][2].rsplit("/", 1)[-1]
        if failing:
            problem = (f"{', '.join(failing)} {'fails' if len(failing) == 1 else 'fail'} torchvision's MD5 check (not "
                       f"the files of the official {archive}, or damaged)")
        else:  # another failure of torchvision's reader
            problem = f"torchvision cannot read it ({str(error).split(' You can use download=True')[0]})"
        return (f"CIFAR-{self.variant} under {self.root / folder} is incomplete or corrupt: {problem}. Nothing is "
                f"downloaded: re-extract {archive} into {self.root} (tar xzf {archive} -C {self.root})")

    def setup(self, stage: Optional[str] = None) -> None:
        self._require_stats()
        if self.train_set is not None:
            return
        from torchvision.datasets import CIFAR10, CIFAR100

        cls = CIFAR10 if self.variant == 10 else CIFAR100
        train = cls(str(self.root), train=True, download=False)
        test = cls(str(self.root), train=False, download=False)
        train_tf = self._train_transform()
        eval_tf = self._eval_transform()
        kept, held = _stratified_split(np.array(train.targets), self.val_fraction, self.split_seed)
        self.train_set = _TransformedSubset(train, kept, train_tf, self.seed)
        self.val_set = _TransformedSubset(train, held, eval_tf) if len(held) else _TransformedSubset(test, None, eval_tf)
        self.test_set = _TransformedSubset(test, None, eval_tf)


# --------------------------------------------------------------------------------------------------
# Single images (zoo predict)
# --------------------------------------------------------------------------------------------------
def read_image(path: str | os.PathLike):
    """An image file as an 8-bit PIL image (RGB, RGBA, L, P, ... as stored), for the image folders and ``zoo
    predict``. Integer images of more than 8 bits are scaled to 8 bits with one scale for every file, x / 257 (the
    16-bit range 0..65535 to 0..255), and float images (F) from [0, 1]: Pillow's own convert() clips every value
    above 255, so a 16-bit digit read as almost pure white. An unreadable file is a ValueError naming it.

    Pillow already brings each format's bit depth to these ranges (PIL/PngImagePlugin.py, TiffImagePlugin.py,
    PpmImagePlugin.py): 16-bit PNG and TIFF open as I;16 (as I in some Pillow versions), a PGM whose maxval exceeds 255
    (12-bit, 16-bit) as I rescaled to 0..65535, a PGM of maxval <= 255 as L rescaled to 0..255, and a colour PPM of
    any maxval as 8-bit RGB. 32-bit integer files (TIFF) are read as 16-bit values too (above 65535: white). The
    scale used to be guessed from the image's largest pixel, so a dark 16-bit PGM (every value <= 255) read as an
    8-bit one, 257 times too bright, and a darker file of a folder could come out brighter than a lighter one."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            picture = image.copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory, not an image file") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path} is not a readable image: {error}") from None
    except Image.DecompressionBombError as error:  # a plain Exception, not an OSError
        raise ValueError(f"{path} is larger than Pillow's limit for one image ({error}); raise PIL.Image."
                         f"MAX_IMAGE_PIXELS in your own code if the file is trusted, or shrink it") from None
    if picture.mode.startswith("I") or picture.mode == "F":
        values = np.asarray(picture, dtype=np.float64)
        if picture.mode == "F":
            top = 1.0 if values.size == 0 or values.max() <= 1.0 else 255.0
        else:  # I;16*, I: 16-bit values, whatever the image holds (see the docstring)
            top = 65535.0
        picture = Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    return picture


def load_image_file(path: str | os.PathLike, img_size: int, in_chans: int, mean: Sequence[float], std: Sequence[float],
                    transform: Optional[Callable] = None, crop_pct: float = 1.0, interpolation: str = "bilinear",
                    crop_mode: str = "center") -> torch.Tensor:
    """One image file -> normalised (C, H, W) tensor, preprocessed like the evaluation split (``crop_pct``,
    ``interpolation``, ``crop_mode``: the run's, as ``eval_preprocessing`` records them) or by ``transform``
    (e.g. timm's evaluation transform, given the image in RGB, or L for one channel)."""
    return _picture_tensor(read_image(path), img_size, in_chans, mean, std, transform, crop_pct, interpolation,
                           crop_mode)


def _picture_tensor(picture, img_size: int, in_chans: int, mean: Sequence[float], std: Sequence[float],
                    transform: Optional[Callable] = None, crop_pct: float = 1.0, interpolation: str = "bilinear",
                    crop_mode: str = "center") -> torch.Tensor:
    """A PIL image (as :func:`read_image` gives) -> normalised (C, H, W) tensor: :func:`load_image_file`'s
    preprocessing, for a picture that is no file (zoo predict's ``digits:N`` of a run evaluated with a crop)."""
    if transform is not None:
        return transform(picture.convert("L" if in_chans == 1 else "RGB"))
    mean, std = _check_stats(mean, std, in_chans)
    if "model" in (crop_pct, interpolation) or crop_mode not in ("center", "squash"):
        raise ValueError(f"load_image_file needs resolved values: crop_pct {crop_pct!r}, interpolation {interpolation!r}, "
                         f"crop_mode {crop_mode!r} (center or squash)")
    # RGB first, as ImageFolder's loader reads training images (torchvision's pil_loader): alpha (RGBA, LA) and
    # palette images work, and every file gets the training pipeline's channel conversion (_OneChannel: a gray
    # file keeps its levels, a colour one is converted as in training)
    return _image_transform(img_size, in_chans, mean, std, False, "none", crop_pct=_crop_pct(crop_pct),
                            interpolation=_interpolation(interpolation), crop_mode=crop_mode)(picture.convert("RGB"))
