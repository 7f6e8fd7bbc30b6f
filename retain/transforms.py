"""Image preprocessing: the backbone's declared transform, one path for arrays and image files.

Every image, whether it sits in an in-memory array (MNIST, CIFAR) or in a file, goes through the
same steps, those of timm's and torchvision's eval transform: resize the shorter side to
⌊size / crop_pct⌋ with the declared interpolation (``Resize(int)``: the longer side becomes
⌊short · long / short_in⌋), centre-crop size × size (``CenterCrop``: offsets
round((h − size) / 2)), scale to [0, 1] (``ToTensor``), normalise by mean/std. Resizing is done by
PIL on the uint8 image, as those transforms do, so the pixels equal the reference pipeline's
bit for bit whatever the Pillow version (a batch that needs no resize is converted as a whole).
LAMDA-PILOT's test transform (``utils/data.py::build_transform``: ``Resize(256, bicubic)``,
``CenterCrop(224)``, ``ToTensor()``, no normalisation) is
``Preprocess(224, (0, 0, 0), (1, 1, 1), crop_pct=0.875, interpolation="bicubic")``.

Training augmentation (:class:`Augment`) is torchvision's ``RandomResizedCrop`` + horizontal
flip on the *original* image: a box drawn from the image as stored, cropped, then resized to
size × size (``resized_crop``), with an explicit generator.

A run can override the declared transform from its config (``preprocess: {mean, std, crop_pct,
interpolation}``; :func:`overrides` checks them): every value is part of ``Preprocess.key``, so
the feature cache keeps their features apart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from .config import PREPROCESS_KEYS
from .datasets.base import Split
from .errors import ConfigError

RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
            "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}
OVERRIDABLE = PREPROCESS_KEYS  # `preprocess:` keys of a config (retain.config, torch-free)


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ⌊size / crop_pct⌋, centre-crop size × size, normalise."""

    size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    gray: bool = False  # one channel (MNIST-style networks); mean/std then use their first value

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"preprocess.size = {self.size!r} must be a positive integer")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if len(v) != 3 or not all(isinstance(x, int | float) for x in v):
                raise ConfigError(f"preprocess.{name} = {v!r} must be three numbers (R, G, B)")
            object.__setattr__(self, name, tuple(float(x) for x in v))
        if min(self.std) <= 0:
            raise ConfigError(f"preprocess.std = {self.std} must be positive")
        if not 0 < self.crop_pct <= 1:
            raise ConfigError(f"preprocess.crop_pct = {self.crop_pct!r} must lie in (0, 1] "
                              "(1: resize to the size, no crop; timm's default 0.875)")
        if self.interpolation not in RESAMPLE:
            raise ConfigError(f"preprocess.interpolation = {self.interpolation!r} is not one of "
                              f"{list(RESAMPLE)}")

    @property
    def key(self) -> str:
        """The transform's identity in feature-cache keys (``v2``: PIL resize + centre crop for
        arrays too; features of the earlier pipeline are never reused)."""
        d = asdict(self)
        return "v2-" + "-".join(f"{k}={v}" for k, v in sorted(d.items()))

    @property
    def channels(self) -> int:
        return 1 if self.gray else 3

    @property
    def resize_to(self) -> int:
        """The shorter side before the centre crop, ⌊size / crop_pct⌋ (timm's ``scale_size``)."""
        return math.floor(self.size / self.crop_pct)

    def describe(self) -> dict[str, Any]:
        """The transform as written next to results: its fields and the steps they make."""
        steps = (f"resize shorter side to {self.resize_to} ({self.interpolation}), centre crop "
                 f"{self.size}, /255, normalise by mean/std")
        return asdict(self) | {"resize_to": self.resize_to, "steps": steps}

    def with_overrides(self, given: Mapping[str, Any] | None) -> Preprocess:
        """This transform with a config's ``preprocess`` values (checked by :func:`overrides`)."""
        return replace(self, **overrides(given)) if given else self

    def __call__(self, split: Split, positions: np.ndarray, augment: Augment | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Images at ``positions`` of ``split`` as a normalised (B, C, size, size) float32
        tensor; with ``augment`` (and its ``generator``) the training augmentation replaces the
        resize and centre crop."""
        positions = np.asarray(positions, dtype=np.int64)
        if augment is not None:
            if generator is None:
                raise ValueError("augmentation needs a generator")
            pixels = np.stack([augment.apply(self._source(split, int(i)), self.size,
                                             generator) for i in positions])
        elif not split.is_paths and self._unchanged(split.data.shape[1:3]):
            pixels = split.data[positions]  # (B, S, S[, 3]) as stored, nothing to resample
        else:
            pixels = np.stack([self.image(self._source(split, int(i))) for i in positions])
        return self.normalise(pixels)

    def image(self, im: Image.Image) -> np.ndarray:
        """One PIL image through resize + centre crop: (size, size[, 3]) uint8."""
        im = _resize_shorter(im, self.resize_to, RESAMPLE[self.interpolation])
        w, h = im.size
        top, left = int(round((h - self.size) / 2.0)), int(round((w - self.size) / 2.0))
        return np.asarray(im)[top : top + self.size, left : left + self.size]

    def normalise(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 (B, S, S) or (B, S, S, 3) -> (B, C, S, S) float32, (x/255 - mean) / std."""
        x = torch.from_numpy(np.ascontiguousarray(pixels)).float().div_(255.0)
        x = x.unsqueeze(1).expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        if self.gray:
            x = x.mean(1, keepdim=True)  # (B,1,S,S)
        c = self.channels
        mean = torch.tensor(self.mean[:c]).view(1, c, 1, 1)
        std = torch.tensor(self.std[:c]).view(1, c, 1, 1)
        return ((x - mean) / std).contiguous()

    def _unchanged(self, hw: tuple[int, int]) -> bool:
        """Whether resize and crop leave an (h, w) image as it is."""
        return hw[0] == hw[1] == self.size == self.resize_to

    @staticmethod
    def _source(split: Split, i: int) -> Image.Image:
        """Sample ``i`` as stored: a file decoded to RGB, or the array (gray stays 'L')."""
        return split.image(i) if split.is_paths else Image.fromarray(split.data[i])


def _resize_shorter(im: Image.Image, short: int, resample: int) -> Image.Image:
    """torchvision's ``Resize(short)`` on a PIL image (no change when already that short)."""
    w, h = im.size
    if min(w, h) == short:
        return im
    if w <= h:
        size = (short, int(short * h / w))
    else:
        size = (int(short * w / h), short)
    return im.resize(size, resample)


def overrides(given: Mapping[str, Any] | None) -> dict[str, Any]:
    """The config's ``preprocess`` mapping, checked: only :data:`OVERRIDABLE` keys, each of the
    right type (the values themselves are checked by ``Preprocess``)."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(OVERRIDABLE))
    if unknown:
        hint = " (the resolution is the config key image_size)" if "size" in unknown else ""
        raise ConfigError(f"unknown preprocess key(s) {unknown}; valid: "
                          f"{', '.join(OVERRIDABLE)}{hint}")
    out: dict[str, Any] = {}
    for key, value in given.items():
        if key in ("mean", "std"):
            if isinstance(value, int | float) and not isinstance(value, bool):
                value = (value,) * 3
            if not isinstance(value, list | tuple) or len(value) != 3 or not all(
                    isinstance(v, int | float) and not isinstance(v, bool) for v in value):
                raise ConfigError(f"preprocess.{key} = {value!r} must be three numbers "
                                  "(R, G, B) or one number for all channels")
            out[key] = tuple(float(v) for v in value)
        elif key == "crop_pct":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"preprocess.crop_pct = {value!r} must be a number in (0, 1]")
            out[key] = float(value)
        else:
            out[key] = value
    Preprocess(**out)  # values in range (defaults for the rest)
    return out


@dataclass(frozen=True)
class Augment:
    """Training augmentation on the original image: torchvision's ``RandomResizedCrop(size,
    scale, ratio, interpolation)`` then ``RandomHorizontalFlip(0.5)``, drawn from an explicit
    generator. Defaults: LAMDA-PILOT's ``build_transform`` (scale (0.05, 1), ratio (3/4, 4/3),
    torchvision's default bilinear)."""

    scale: tuple[float, float] = (0.05, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    interpolation: str = "bilinear"

    def apply(self, im: Image.Image, size: int, generator: torch.Generator) -> np.ndarray:
        """One augmented view of ``im``: (size, size[, 3]) uint8."""
        top, left, h, w = self.box(im.size[1], im.size[0], generator)
        crop = im.crop((left, top, left + w, top + h))
        if crop.size != (size, size):
            crop = crop.resize((size, size), RESAMPLE[self.interpolation])
        out = np.asarray(crop)
        if self.flip and float(torch.rand(1, generator=generator)) < 0.5:
            out = out[:, ::-1]
        return out

    def box(self, height: int, width: int, g: torch.Generator) -> tuple[int, int, int, int]:
        """(top, left, h, w): torchvision's ``RandomResizedCrop.get_params`` with ``g``."""
        area = height * width
        log_ratio = torch.log(torch.tensor(self.ratio))
        for _ in range(10):
            target = area * float(torch.empty(1).uniform_(*self.scale, generator=g))
            aspect = math.exp(float(torch.empty(1).uniform_(*log_ratio.tolist(), generator=g)))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=g))
                left = int(torch.randint(0, width - w + 1, (1,), generator=g))
                return top, left, h, w
        ratio = width / height  # fallback: the central crop torchvision takes
        if ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class ColorJitter:
    """torchvision's ``ColorJitter(b, c, s, h)`` with b = c = s = h = ``strength`` on a batch
    normalised by ``mean``/``std`` (taken back to [0, 1] pixels, jittered, normalised again): per
    image, in a random order, brightness x·f, contrast f·x + (1−f)·mean(gray(x)), saturation
    f·x + (1−f)·gray(x) with f ~ U(1−s, 1+s), clamped to [0, 1], and a hue shift by U(−h, h) of a
    turn (LayUP's ``src/data/aug.py``: 0.1 each). One-channel batches get brightness and contrast
    only. Seeded by the caller."""

    strength: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        c = x.shape[1]
        mean = torch.tensor(self.mean[:c], device=x.device).view(1, c, 1, 1)
        std = torch.tensor(self.std[:c], device=x.device).view(1, c, 1, 1)
        pixels = x * std + mean  # (B, C, S, S) in [0, 1]
        out = torch.stack([self._one(p, generator) for p in pixels])
        return (out - mean) / std

    def _one(self, img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        order = torch.randperm(4, generator=g).tolist()  # as ColorJitter.get_params
        s = self.strength
        f = [float(torch.empty(1).uniform_(1 - s, 1 + s, generator=g)) for _ in range(3)]
        hue = float(torch.empty(1).uniform_(-s, s, generator=g))
        for op in order:
            if op == 0:
                img = (img * f[0]).clamp(0, 1)
            elif op == 1:
                img = (f[1] * img + (1 - f[1]) * _gray(img).mean()).clamp(0, 1)
            elif op == 2 and img.shape[0] == 3:
                img = (f[2] * img + (1 - f[2]) * _gray(img)).clamp(0, 1)
            elif op == 3 and img.shape[0] == 3:
                img = _shift_hue(img, hue)
        return img


def _gray(img: torch.Tensor) -> torch.Tensor:
    """(C, H, W) -> (1, H, W) luma, ITU-R 601 weights (a one-channel image is its own)."""
    if img.shape[0] == 1:
        return img
    return (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]).unsqueeze(0)


def _shift_hue(img: torch.Tensor, shift: float) -> torch.Tensor:
    """RGB (3, H, W) in [0, 1] with its HSV hue rotated by ``shift`` turns."""
    top, arg = img.max(0)  # (H, W) value and the channel that holds it
    delta = top - img.min(0).values  # (H, W) chroma
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    r, g, b = img
    h = torch.stack([((g - b) / safe) % 6, (b - r) / safe + 2, (r - g) / safe + 4])  # (3, H, W)
    h = torch.where(delta > 0, h.gather(0, arg[None])[0], torch.zeros_like(top)) / 6
    sat = torch.where(top > 0, delta / torch.where(top > 0, top, torch.ones_like(top)), top * 0)
    h = (h + shift) % 1.0
    k = (torch.tensor([5.0, 3.0, 1.0], device=img.device).view(3, 1, 1) + h * 6) % 6
    return top - top * sat * (torch.minimum(k, 4 - k).clamp(0, 1))  # (3, H, W) back to RGB
