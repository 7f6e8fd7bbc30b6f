"""Deterministic evaluation preprocessing: images of a ``Split`` -> a normalised float batch.

Small in-memory images (MNIST, CIFAR) are resized as a whole batch with torch; image files are
decoded with PIL, resized on the shorter side and centre-cropped, as timm's eval transform does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .datasets.base import Split


@dataclass(frozen=True)
class Preprocess:
    """Resize to ``size`` (files: shorter side to size/crop_pct, then centre crop), normalise."""

    size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    gray: bool = False  # one channel (MNIST-style networks); mean/std then use their first value

    @property
    def key(self) -> str:
        d = asdict(self)
        return "-".join(f"{k}={v}" for k, v in sorted(d.items()))

    @property
    def channels(self) -> int:
        return 1 if self.gray else 3

    def __call__(self, split: Split, positions: np.ndarray) -> torch.Tensor:
        """Images at ``positions`` of ``split`` as a (B, 3, size, size) float32 tensor."""
        if split.is_paths:
            x = torch.stack([self._file(split.image(int(i))) for i in positions])  # (B,3,S,S)
        else:
            x = self._array(split.data[positions])
        if self.gray:
            x = x.mean(1, keepdim=True)  # (B,1,S,S)
        c = self.channels
        mean = torch.tensor(self.mean[:c]).view(1, c, 1, 1)
        std = torch.tensor(self.std[:c]).view(1, c, 1, 1)
        return (x - mean) / std

    def _array(self, a: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(a)).float().div_(255.0)
        x = x.unsqueeze(1).expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        if x.shape[-1] == self.size and x.shape[-2] == self.size:
            return x.contiguous()
        mode = "bicubic" if self.interpolation == "bicubic" else "bilinear"
        x = F.interpolate(x, size=(self.size, self.size), mode=mode, align_corners=False,
                          antialias=True)
        return x.clamp_(0.0, 1.0)  # (B,3,S,S)

    def _file(self, im: Image.Image) -> torch.Tensor:
        short = int(round(self.size / self.crop_pct))
        w, h = im.size
        scale = short / min(w, h)
        resample = Image.BICUBIC if self.interpolation == "bicubic" else Image.BILINEAR
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)
        w, h = im.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        im = im.crop((left, top, left + self.size, top + self.size))
        a = np.asarray(im, dtype=np.float32) / 255.0  # (S,S,3)
        return torch.from_numpy(a).permute(2, 0, 1)


@dataclass(frozen=True)
class Augment:
    """Training augmentation on a preprocessed batch: RandomResizedCrop + horizontal flip, as
    LAMDA-PILOT's ``build_transform`` (scale (0.05, 1), ratio (3/4, 4/3)), seeded by the caller."""

    scale: tuple[float, float] = (0.05, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        out = torch.empty_like(x)  # (B, 3, S, S)
        for i in range(len(x)):
            top, left, h, w = self._box(x.shape[-2], x.shape[-1], generator)
            crop = x[i : i + 1, :, top : top + h, left : left + w]
            out[i] = F.interpolate(crop, size=x.shape[-2:], mode="bilinear", align_corners=False,
                                   antialias=True)[0]
            if self.flip and torch.rand(1, generator=generator) < 0.5:
                out[i] = out[i].flip(-1)
        return out

    def _box(self, height: int, width: int, g: torch.Generator) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop.get_params, with an explicit generator."""
        area = height * width
        log_ratio = torch.log(torch.tensor(self.ratio))
        for _ in range(10):
            target = area * float(torch.empty(1).uniform_(*self.scale, generator=g))
            aspect = float(torch.exp(torch.empty(1).uniform_(*log_ratio.tolist(), generator=g)))
            w = int(round((target * aspect) ** 0.5))
            h = int(round((target / aspect) ** 0.5))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=g))
                left = int(torch.randint(0, width - w + 1, (1,), generator=g))
                return top, left, h, w
        side = min(height, width)  # fall back to a central square crop
        return (height - side) // 2, (width - side) // 2, side, side


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
