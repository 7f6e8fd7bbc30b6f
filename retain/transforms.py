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
