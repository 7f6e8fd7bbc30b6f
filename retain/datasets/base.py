"""Dataset vocabulary: a ``Split`` of samples, a loaded ``DataBundle``, and the ``Dataset`` base.

A ``Dataset`` stores where its data lives and does no I/O until ``load()`` is called. Images are
either an in-memory uint8 array (N, H, W) or (N, H, W, 3), or an array of file paths decoded on
demand. Every split knows a content key and the position of each sample in the full split, so
frozen-backbone features can be cached per image and reused across tasks, methods and seeds.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from ..errors import DataError, RetainError
from ..registry import Registry

# Formats decoded from files (those of torchvision's ImageFolder extensions; MPO is how PIL
# names many camera JPEGs). Never EPS, which PIL hands to Ghostscript.
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "PPM", "BMP", "TIFF", "WEBP")
MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold (MAX_IMAGE_PIXELS), as an error


class Split:
    """Images and integer labels of one split (or a subset of it).

    ``data``: uint8 array (N, H, W) / (N, H, W, 3), or object array of image paths.
    ``targets``: int64 array (N,).  ``index``: positions in the full split (for caching).
    ``key``: content hash of the full split this one was cut from. ``size``: the number of
    samples of that full split (None when unknown, e.g. rebuilt from an older checkpoint).
    """

    def __init__(self, data: np.ndarray, targets: np.ndarray, *, key: str | None = None,
                 index: np.ndarray | None = None, size: int | None = None):
        targets = np.asarray(targets, dtype=np.int64)
        if len(data) != len(targets):
            raise ValueError(f"{len(data)} images but {len(targets)} labels")
        self.data = data
        self.targets = targets
        self.index = np.arange(len(targets)) if index is None else np.asarray(index, np.int64)
        self.size = len(targets) if index is None else size
        self.key = key if key is not None else content_key(data)

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def is_paths(self) -> bool:
        return self.data.dtype == object

    def subset(self, positions: np.ndarray) -> Split:
        """The samples at ``positions`` (relative to this split), keeping the cache key."""
        positions = np.asarray(positions, dtype=np.int64)
        return Split(self.data[positions], self.targets[positions], key=self.key,
                     index=self.index[positions], size=self.size)

    def relabel(self, targets: np.ndarray) -> Split:
        """The same samples with other labels (e.g. remapped by a class order)."""
        return Split(self.data, targets, key=self.key, index=self.index, size=self.size)

    def image(self, i: int) -> Image.Image:
        """Sample ``i`` as an RGB PIL image."""
        if self.is_paths:
            return decode_image(self.data[i])
        return Image.fromarray(self.data[i]).convert("RGB")

    @staticmethod
    def concat(splits: list[Split]) -> Split:
        """Samples of several subsets of the same full split, in order."""
        keys = {s.key for s in splits}
        if len(keys) != 1:
            raise ValueError("can only concatenate subsets of one split")
        sizes = {s.size for s in splits} - {None}
        return Split(np.concatenate([s.data for s in splits]),
                     np.concatenate([s.targets for s in splits]), key=keys.pop(),
                     index=np.concatenate([s.index for s in splits]),
                     size=sizes.pop() if len(sizes) == 1 else None)


def decode_image(path: str | os.PathLike | BinaryIO) -> Image.Image:
    """The image file ``path`` (or an in-memory binary stream, as ``retain serve`` keeps uploads)
    as RGB; a ``DataError`` naming the file for anything but a regular, non-empty file that
    decodes (in a format of ``IMAGE_FORMATS``) to at most ``MAX_PIXELS`` pixels. A FIFO never
    blocks; truncated files, junk and bombs never pass."""
    from ..io import open_regular

    if hasattr(path, "read"):  # already open: bytes held in memory
        path.seek(0)
        return _decode(path, "uploaded image")
    try:
        f = open_regular(path)
    except RetainError as e:
        raise DataError(str(e)) from e
    with f:
        if os.fstat(f.fileno()).st_size == 0:
            raise DataError(f"image {path} is empty (0 bytes); delete or replace it")
        return _decode(f, path)


def _decode(f: BinaryIO, path) -> Image.Image:
    """The image in the open stream ``f`` as RGB (see ``decode_image``)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.init()  # registers every plugin (idempotent); older PIL opens MPO apart
            with Image.open(f, formats=[x for x in IMAGE_FORMATS if x in Image.OPEN]) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise DataError(f"image {path} is {w}x{h} pixels, more than the "
                                    f"{MAX_PIXELS} allowed (a decompression bomb?); "
                                    "shrink or remove it")
                return im.convert("RGB")
    except DataError:
        raise
    except Image.UnidentifiedImageError as e:
        raise DataError(f"image {path} is not a readable {'/'.join(IMAGE_FORMATS)} file; "
                        "delete or replace it") from e
    except Exception as e:  # PIL raises many types on malformed data
        raise DataError(f"image {path} cannot be decoded ({type(e).__name__}: "
                        f"{str(e)[:120]}); delete or replace it") from e


def content_key(data: np.ndarray) -> str:
    """A hash of the images' bytes, or of the paths with their sizes and modification times."""
    h = hashlib.sha256()
    if data.dtype == object:
        for p in data:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        h.update(str(data.shape).encode())
        h.update(np.ascontiguousarray(data).tobytes())
    return h.hexdigest()[:20]


@dataclass(frozen=True, eq=False)
class Domains:
    """The domain of every sample of a bundle: ``names[d]`` is domain d; ``train`` (N_train,)
    and ``test`` (N_test,) int64 domain ids, aligned with the bundle's splits."""

    names: tuple[str, ...]
    train: np.ndarray
    test: np.ndarray

    def __post_init__(self):
        for part in ("train", "test"):
            ids = np.asarray(getattr(self, part), dtype=np.int64)
            if len(ids) and not 0 <= ids.min() <= ids.max() < len(self.names):
                raise ValueError(f"{part} domain ids must lie in 0..{len(self.names) - 1}")
            object.__setattr__(self, part, ids)


@dataclass(frozen=True)
class DataBundle:
    """A loaded dataset: train and test splits and the class names (label i = class_names[i]).

    ``domains``: the domain of every sample, for datasets made of several domains over one label
    space (DomainNet); None for all others.
    """

    name: str
    train: Split
    test: Split
    class_names: tuple[str, ...]
    source: dict = field(default_factory=dict)  # where it came from (paths, package versions)
    domains: Domains | None = None

    def __post_init__(self):
        d = self.domains
        if d is not None and (len(d.train), len(d.test)) != (len(self.train), len(self.test)):
            raise ValueError(f"{len(d.train)}/{len(d.test)} domain labels for "
                             f"{len(self.train)}/{len(self.test)} train/test samples")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class Dataset(ABC):
    """A named dataset. ``__init__`` only stores the root; ``load()`` reads the data."""

    name: str = ""
    num_classes: int = 0
    description: str = ""

    def __init__(self, root: str | Path | None = None):
        self.root = None if root is None else Path(root)

    @abstractmethod
    def load(self) -> DataBundle:
        """Read the data; raise ``DataError`` saying where it looked and how to get the data."""

    def available(self) -> bool:
        """Whether ``load`` would find the data on this machine, by a cheap look (no reading):
        here, a data root that is a folder; datasets that ship offline say so themselves."""
        return self.root is not None and self.root.is_dir()


DATASETS: Registry[type[Dataset]] = Registry("dataset")
register_dataset = DATASETS.register


def create_dataset(name: str, root: str | Path | None = None) -> Dataset:
    """The dataset registered as ``name``, reading from ``root`` where it needs one."""
    return DATASETS.get(name)(root=root)


def per_class_subset(bundle: DataBundle, train: int | None = None, test: int | None = None, *,
                     seed: int = 1993) -> DataBundle:
    """At most ``train`` training and ``test`` test images of every class (None: all), drawn
    without replacement by ``numpy.random.RandomState(seed)``, in their original order.

    The splits are ``Split.subset``s, so each image keeps its position in the full split and its
    cached features; domains, if any, are cut alike. ``source["subset"]`` records the request
    and the sizes drawn.
    """
    rng = np.random.RandomState(seed)

    def pick(split: Split, n: int | None) -> np.ndarray:
        if n is None:
            return np.arange(len(split))
        chosen = [rng.choice(np.flatnonzero(split.targets == c),
                             min(n, int((split.targets == c).sum())), replace=False)
                  for c in np.unique(split.targets)]
        return np.sort(np.concatenate(chosen)) if chosen else np.arange(0)

    tr, te = pick(bundle.train, train), pick(bundle.test, test)
    domains = bundle.domains
    if domains is not None:
        domains = Domains(domains.names, domains.train[tr], domains.test[te])
    record = {"train_per_class": train, "test_per_class": test, "seed": seed,
              "train_size": len(tr), "test_size": len(te)}
    return DataBundle(bundle.name, bundle.train.subset(tr), bundle.test.subset(te),
                      bundle.class_names, bundle.source | {"subset": record}, domains)
