"""The real benchmarks, read from the user's data root (``--data-root``).

``cifar100`` reads the ``cifar-100-python`` pickles (downloading them with torchvision when
absent). The pre-trained-model CIL benchmarks of the APER / PILOT survey (ImageNet-R, ImageNet-A,
CUB-200, ObjectNet, OmniBenchmark, VTAB) and ``imagefolder`` share one reader of the
``{train,test}/<class>/<image>`` layout; their images stay on disk as paths. ``domainnet`` reads
the six DomainNet domains with the official ``<domain>_{train,test}.txt`` lists (as S-Prompts)
and labels every sample with its domain, for the ``Domains`` scenario. CORe50 and CDDB, the
other S-Prompts benchmarks, are not supported yet.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
import pickle
import re
import stat
from pathlib import Path

import numpy as np

from ..errors import DataError, RetainError
from .base import DataBundle, Dataset, Domains, Split, register_dataset

# The extensions torchvision's ImageFolder accepts (case-insensitive), as APER/PILOT read them.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FOLDER_LAYOUT = "train/<class>/<image> and test/<class>/<image>"
APER_REPO = "https://github.com/zhoudw-zdw/RevisitingCIL"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
WNID = re.compile(r"n\d{8}")


def require_root(name: str, root: Path | None, layout: str) -> Path:
    """``root``, or a DataError saying that ``--data-root`` is required."""
    if root is None:
        raise DataError(f"{name} is read from disk: pass `--data-root DIR` (Python: "
                        f"create_dataset({name!r}, root=DIR)), DIR holding {layout}")
    return root


# ---------------------------------------------------------------------------------- CIFAR-100

def find_cifar100(root: Path) -> Path | None:
    """The folder holding CIFAR-100's ``train``, ``test`` and ``meta`` pickles, if any."""
    for folder in (root / "cifar-100-python", root):
        if all((folder / f).is_file() for f in ("train", "test", "meta")):
            return folder
    return None


# md5 of the files inside the published cifar-100-python.tar.gz (as torchvision checks them)
CIFAR100_MD5 = {"train": "16019d7e3df5f24257cddd939b257f8d",
                "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
                "meta": "7973b15100ade9c7d40fb424638fde48"}
CIFAR100_TGZ_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
# what the published pickles need to rebuild (numpy arrays); any other global is refused
PICKLE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray",
                  "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")}


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds only plain containers and numpy arrays (defence in depth: the
    file's md5 was checked first)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def check_md5(path: Path, expected: str) -> None:
    """DataError unless the file ``path`` has the md5 ``expected`` (before it is unpickled)."""
    from ..io import open_regular

    h = hashlib.md5(usedforsecurity=False)
    try:
        with open_regular(path) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except RetainError as e:
        raise DataError(f"cifar100: {e}") from e
    if h.hexdigest() != expected:
        raise DataError(
            f"cifar100: {path} has md5 {h.hexdigest()}, not {expected}, the md5 of the published "
            f"CIFAR-100 file; retain unpickles only the published files (a pickle can run code). "
            f"Download {CIFAR100_URL} again (md5 {CIFAR100_TGZ_MD5}) and extract it.")


def unpickle(path: Path, keys: tuple[str, ...]) -> dict:
    """A CIFAR pickle (written by Python 2) as a dict, checking its md5 first, then that it has
    ``keys``."""
    check_md5(path, CIFAR100_MD5[path.name])
    try:
        with open(path, "rb") as f:
            entry = _ArraysOnly(f, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as exc:
        raise DataError(f"cifar100: cannot unpickle {path} ({exc}); extract it again") from exc
    missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
    if missing:
        raise DataError(f"cifar100: {path} lacks {missing}; is it the CIFAR-100 python version?")
    return entry


def read_cifar100_split(path: Path) -> Split:
    """Images (N, 32, 32, 3) uint8 and fine labels from one CIFAR-100 pickle."""
    entry = unpickle(path, ("data", "fine_labels"))
    data = np.asarray(entry["data"], dtype=np.uint8)  # (N, 3072): 1024 R, then G, then B
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(entry["fine_labels"]):
        raise DataError(f"cifar100: {path} holds data of shape {data.shape}, expected (N, 3072) "
                        f"with one fine label each")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
    return Split(np.ascontiguousarray(images), np.asarray(entry["fine_labels"], np.int64))


def download_cifar100(root: Path) -> None:
    """Download and extract CIFAR-100 into ``root/cifar-100-python`` with torchvision."""
    from torchvision.datasets import CIFAR100

    CIFAR100(str(root), train=True, download=True)


def cifar100_missing(root: Path, reason: str) -> DataError:
    """The error for CIFAR-100 found neither on disk nor by download."""
    return DataError(
        f"cifar100: no train/test/meta pickles in {root / 'cifar-100-python'} or {root}, and "
        f"downloading failed ({reason}). Expected layout: ROOT/cifar-100-python/{{train,test,"
        f"meta}}. Get {CIFAR100_URL} and extract it under ROOT (tar xzf cifar-100-python.tar.gz "
        "-C ROOT), then pass `--data-root ROOT`.")


@register_dataset("cifar100")
class CIFAR100(Dataset):
    """CIFAR-100, 50k / 10k 32x32 RGB images, 100 fine classes, from the python pickles."""

    name = "cifar100"
    num_classes = 100
    description = "CIFAR-100 (cifar-100-python pickles under --data-root), 50k/10k"

    def locate(self) -> tuple[Path, bool]:
        """The pickle folder, and whether it had to be downloaded first."""
        root = require_root(self.name, self.root, "cifar-100-python/{train,test,meta}")
        folder = find_cifar100(root)
        if folder is not None:
            return folder, False
        try:
            download_cifar100(root)
        except Exception as exc:  # torchvision missing, no network, bad checksum, ...
            raise cifar100_missing(root, f"{type(exc).__name__}: {exc}") from exc
        folder = find_cifar100(root)
        if folder is None:
            raise cifar100_missing(root, "torchvision left no cifar-100-python folder")
        return folder, True

    def load(self) -> DataBundle:
        folder, downloaded = self.locate()
        meta = unpickle(folder / "meta", ("fine_label_names",))
        names = tuple(str(n) for n in meta["fine_label_names"])
        if len(names) != self.num_classes:
            raise DataError(f"cifar100: {folder / 'meta'} names {len(names)} fine classes, "
                            f"expected {self.num_classes}")
        train, test = read_cifar100_split(folder / "train"), read_cifar100_split(folder / "test")
        source = {"path": str(folder.absolute()), "format": "cifar-100-python",
                  "downloaded": downloaded}
        return DataBundle(self.name, train, test, names, source)


# ------------------------------------------------------------------- {train,test}/<class>/<image>

MAX_DEPTH = 32  # folder levels below a class folder
MAX_ENTRIES = 20_000_000  # folder entries one dataset scan may look at


class Scan:
    """One scan of a dataset folder: its real path, the folders and image files already reached
    (by device and inode) and what is left of the entry budget.

    Symbolic links are followed only when they resolve inside the dataset folder. A folder or
    image reached twice (a link loop, a link into another class, an image linked into both
    train/ and test/) is an error naming both paths; so are image-named entries that are not
    regular files (a FIFO would block forever), empty images and dangling links. Each folder is
    entered once, at most ``MAX_DEPTH`` levels deep, and at most ``MAX_ENTRIES`` entries are
    looked at, so a scan's cost is bounded by the tree's size.
    """

    def __init__(self, root: Path):
        self.root = os.path.realpath(root)
        self.dirs: dict[tuple[int, int], str] = {}
        self.files: dict[tuple[int, int], str] = {}
        self.left = MAX_ENTRIES

    def follow(self, path: str) -> os.stat_result:
        """``stat`` of ``path``, a link resolved only inside the dataset folder."""
        if os.path.islink(path):
            real = os.path.realpath(path)
            if real != self.root and not real.startswith(self.root + os.sep):
                raise DataError(f"{path} is a symbolic link to {real}, outside the dataset folder "
                                f"{self.root}; retain does not follow links out of the dataset: "
                                "copy the files in, or pass the folder they are in as --data-root")
        try:
            return os.stat(path)
        except OSError as e:
            raise DataError(f"{path}: {e.strerror} (a dangling or looping symbolic link?); "
                            "remove it") from e

    def enter(self, path: str, st: os.stat_result) -> None:
        key = (st.st_dev, st.st_ino)
        if key in self.dirs:
            raise DataError(f"{path} leads to the folder {self.dirs[key]}, already scanned (a "
                            "symbolic link loop, or a link into another class folder); remove "
                            "the link")
        self.dirs[key] = path

    def image(self, path: str, st: os.stat_result) -> None:
        from ..io import file_kind

        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{path} is named like an image but is {file_kind(st.st_mode)}; "
                            "remove it")
        if st.st_size == 0:
            raise DataError(f"image {path} is empty (0 bytes); delete or replace it")
        key = (st.st_dev, st.st_ino)
        if key in self.files:
            raise DataError(f"{path} is the same file as {self.files[key]} (a link); each image "
                            "must appear once in a dataset: remove one of them")
        self.files[key] = path

    def entries(self, folder: str) -> list[os.DirEntry]:
        with os.scandir(folder) as it:
            found = []
            for e in it:
                self.left -= 1
                if self.left < 0:
                    raise DataError(f"scanning {self.root} looked at more than {MAX_ENTRIES} "
                                    "entries; point --data-root at the dataset itself")
                found.append(e)
        return found


def class_folders(split_dir: Path, scan: Scan | None = None) -> list[str]:
    """The sorted names of the (non-hidden) class folders in ``split_dir``."""
    scan = scan or Scan(split_dir)
    names = []
    for e in scan.entries(str(split_dir)):
        if not e.name.startswith(".") and (e.is_dir() or e.is_symlink()):
            if stat.S_ISDIR(scan.follow(e.path).st_mode):
                names.append(e.name)
    return sorted(names)


def image_files(class_dir: Path, scan: Scan | None = None) -> list[str]:
    """Absolute paths of the images under ``class_dir``, sorted as torchvision's ImageFolder
    (folder by folder in path order, files sorted), found by ``scan``'s rules."""
    scan = scan or Scan(class_dir)
    top = str(class_dir)
    scan.enter(top, scan.follow(top))
    found: dict[str, list[str]] = {}
    stack = [(top, 0)]
    while stack:
        folder, depth = stack.pop()
        found[folder] = []
        for e in scan.entries(folder):
            is_image = e.name.lower().endswith(IMAGE_EXTENSIONS)
            if not (is_image or e.is_dir() or e.is_symlink()):
                continue
            st = scan.follow(e.path)
            if stat.S_ISDIR(st.st_mode):
                if depth >= MAX_DEPTH:
                    raise DataError(f"{e.path} lies more than {MAX_DEPTH} folders below "
                                    f"{class_dir}; flatten the class folder")
                scan.enter(e.path, st)
                stack.append((e.path, depth + 1))
            elif is_image:
                scan.image(e.path, st)
                found[folder].append(e.name)
    return [os.path.join(d, f) for d in sorted(found) for f in sorted(found[d])]


def read_split_folder(split_dir: Path, classes: list[str], scan: Scan | None = None) -> Split:
    """Paths and labels of every image under ``split_dir/<class>/``, label = index in classes."""
    scan = scan or Scan(split_dir)
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = image_files(split_dir / name, scan)
        if not files:
            raise DataError(f"{split_dir / name} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        paths += files
        labels += [label] * len(files)
    return Split(np.array(paths, dtype=object), np.array(labels, dtype=np.int64))


def check_classes(folder: Path, train: list[str], test: list[str], expected: int) -> None:
    """DataError unless train/ and test/ hold the same class folders, ``expected`` of them."""
    if train != test:
        only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
        raise DataError(f"{folder}: train/ and test/ hold different class folders; only in "
                        f"train/: {only_train[:10]}, only in test/: {only_test[:10]}"
                        + (" (first 10 shown)" if max(len(only_train), len(only_test)) > 10
                           else ""))
    if expected and len(train) != expected:
        raise DataError(f"{folder / 'train'} holds {len(train)} class folders, expected "
                        f"{expected}; is DIR the right dataset?")
    if len(train) < 2:
        raise DataError(f"{folder / 'train'} holds {len(train)} class folder(s); need at least 2")


def read_image_folders(folder: Path, expected_classes: int = 0) -> tuple[Split, Split, list[str]]:
    """Train and test splits of ``folder/{train,test}/<class>/<image>``, and the class folders.

    Classes are the sorted folder names of train/ (test/ must hold the same ones); labels follow
    that order. ``expected_classes`` (0: any number, at least 2) is checked.
    """
    scan = Scan(folder)
    scan.enter(str(folder), scan.follow(str(folder)))  # so that a link back to them is a loop
    for part in ("train", "test"):
        scan.enter(str(folder / part), scan.follow(str(folder / part)))  # not linked outside
    classes = class_folders(folder / "train", scan)
    check_classes(folder, classes, class_folders(folder / "test", scan), expected_classes)
    return read_split_folder(folder / "train", classes, scan), \
        read_split_folder(folder / "test", classes, scan), classes


def find_split_folders(root: Path, folder_names: tuple[str, ...]) -> tuple[Path | None, list[Path]]:
    """The first of ``root``, ``root/<name>`` holding train/ and test/, and all those looked at."""
    looked = [root] + [root / name for name in folder_names]
    for folder in looked:
        if (folder / "train").is_dir() and (folder / "test").is_dir():
            return folder, looked
    return None, looked


def wordnet_names(wnids: list[str]) -> tuple[str, ...]:
    """Readable names (first WordNet lemma, from timm's shipped synset table) for WordNet ids.

    The ids themselves are kept when they are not all ids or when timm's table is absent.
    """
    spec = importlib.util.find_spec("timm")
    if not all(WNID.fullmatch(w) for w in wnids) or spec is None or spec.origin is None:
        return tuple(wnids)
    table = Path(spec.origin).parent / "data" / "_info" / "imagenet_synset_to_lemma.txt"
    if not table.is_file():
        return tuple(wnids)
    with open(table, newline="") as f:
        lemmas = dict(csv.reader(f, delimiter="\t"))
    names = [lemmas.get(w, w).split(",")[0].strip() for w in wnids]
    pairs = zip(names, wnids, strict=True)
    return tuple(n if names.count(n) == 1 else f"{n} ({w})" for n, w in pairs)


class FolderBenchmark(Dataset):
    """A benchmark stored as ``{train,test}/<class>/<image>``; subclasses set the facts below."""

    folder_names: tuple[str, ...] = ()  # conventional folder names under the data root
    archive: str = ""  # the APER/RevisitingCIL archive and its md5
    md5: str = ""
    wordnet_ids: bool = False  # class folders may be WordNet ids (n01443537)

    def how_to_get(self) -> str:
        """Where the data comes from and how to check the download."""
        return (f"These are author-sampled subsets from the APER/RevisitingCIL repository "
                f"({APER_REPO}, download links in its README); check the archive with "
                f"`md5sum {self.archive}` = {self.md5}, then extract it under DIR.")

    def not_found(self, looked: list[Path]) -> DataError:
        """The error for a data root holding none of the expected folders."""
        dirs = " or ".join(["--data-root itself"] + [f"--data-root/{n}" for n in self.folder_names])
        return DataError(f"{self.name}: no train/ and test/ folders in any of "
                         f"{[str(p) for p in looked]}. Expected layout: DIR holding "
                         f"{FOLDER_LAYOUT} (one folder per class), DIR being {dirs}. "
                         + self.how_to_get())

    def load(self) -> DataBundle:
        root = require_root(self.name, self.root, FOLDER_LAYOUT)
        folder, looked = find_split_folders(root, self.folder_names)
        if folder is None:
            raise self.not_found(looked)
        train, test, classes = read_image_folders(folder.absolute(), self.num_classes)
        names = wordnet_names(classes) if self.wordnet_ids else tuple(classes)
        source = {"path": str(folder.absolute()), "layout": "{train,test}/<class>/<image>"}
        return DataBundle(self.name, train, test, names, source)


@register_dataset("imagenet_r")
class ImageNetR(FolderBenchmark):
    """ImageNet-R, 200 classes of renditions (APER split: ~24k train / ~6k test)."""

    name, num_classes, folder_names = "imagenet_r", 200, ("imagenet-r",)
    description = "ImageNet-R, APER/RevisitingCIL split, 200 classes"
    archive, md5, wordnet_ids = "imagenet-r.zip", "730aa3fb9c7d2ec0b6381c6b23040681", True


@register_dataset("imagenet_a")
class ImageNetA(FolderBenchmark):
    """ImageNet-A, 200 classes of natural adversarial examples (APER split)."""

    name, num_classes, folder_names = "imagenet_a", 200, ("imagenet-a",)
    description = "ImageNet-A, APER/RevisitingCIL split, 200 classes"
    archive, md5, wordnet_ids = "ina.zip", "7f4aaf0b1532b7a0bd670822c152d3c5", True


@register_dataset("cub200")
class CUB200(FolderBenchmark):
    """CUB-200-2011 birds, 200 classes (APER split)."""

    name, num_classes, folder_names = "cub200", 200, ("cub",)
    description = "CUB-200-2011, APER/RevisitingCIL split, 200 classes"
    archive, md5 = "cub.zip", "85e342a2d5f941e740193602057df7a5"


@register_dataset("objectnet")
class ObjectNet(FolderBenchmark):
    """ObjectNet, the 200-class subset sampled by APER."""

    name, num_classes, folder_names = "objectnet", 200, ("objectnet",)
    description = "ObjectNet, APER/RevisitingCIL subset, 200 classes"
    archive, md5 = "objnet.tgz", "63ff7443a47bd682016a8ec59b8cc1bc"


@register_dataset("omnibenchmark")
class OmniBenchmark(FolderBenchmark):
    """OmniBenchmark, the 300-class subset sampled by APER."""

    name, num_classes, folder_names = "omnibenchmark", 300, ("omnibenchmark",)
    description = "OmniBenchmark, APER/RevisitingCIL subset, 300 classes"
    archive, md5 = "omnibenchmark.zip", "f1c30808a707f9197c6c811ea52e5cbb"


@register_dataset("vtab")
class VTAB(FolderBenchmark):
    """VTAB, the 50-class, 5-domain subset sampled by APER."""

    name, num_classes, folder_names = "vtab", 50, ("vtab-cil/vtab", "vtab")
    description = "VTAB, APER/RevisitingCIL subset, 50 classes"
    archive, md5 = "vtab.zip", "a9c37bde6105a2516c900b0c33a437c1"


@register_dataset("imagefolder")
class ImageFolder(FolderBenchmark):
    """Custom data in ``ROOT/{train,test}/<class>/<image>``, any number (>= 2) of classes."""

    name, num_classes = "imagefolder", 0
    description = "custom images in ROOT/{train,test}/<class>/<image>, any number of classes"

    def how_to_get(self) -> str:
        return "Put your own images there, one folder per class, the same classes in both."


# ------------------------------------------------------------------------------------ DomainNet

DOMAINNET_URL = "http://ai.bu.edu/M3SDA/"


def read_image_list(path: Path) -> tuple[list[str], list[int]]:
    """Relative paths and labels from a DomainNet list (``<domain>/<class>/<file> <label>``)."""
    paths, labels = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or not fields[1].isdigit():
                raise DataError(f"{path}:{n}: expected '<image path> <label>', got "
                                f"{line.strip()!r}")
            if Path(fields[0]).is_absolute() or ".." in Path(fields[0]).parts:
                raise DataError(f"{path}:{n}: {fields[0]!r} leaves the dataset folder; list "
                                "paths must be relative to it, without '..'")
            paths.append(fields[0])
            labels.append(int(fields[1]))
    return paths, labels


def names_from_paths(paths: list[str], labels: list[int], num_classes: int) -> tuple[str, ...]:
    """Class names from the ``<domain>/<class>/<file>`` paths (label i -> its folder name)."""
    names: dict[int, str] = {}
    for p, y in zip(paths, labels, strict=True):
        parts = p.split("/")
        name = parts[1] if len(parts) >= 3 else str(y)
        if names.setdefault(y, name) != name:
            raise DataError(f"domainnet: label {y} names both {names[y]!r} and {name!r}")
    missing = sorted(set(range(num_classes)) - set(names))
    if missing or len(names) != num_classes:
        raise DataError(f"domainnet: the train lists hold labels {sorted(names)[:3]}..., "
                        f"expected exactly 0..{num_classes - 1} (missing {missing[:10]})")
    return tuple(names[i] for i in range(num_classes))


@register_dataset("domainnet")
class DomainNet(Dataset):
    """DomainNet (Peng et al., ICCV 2019), 345 classes in six domains, with the official
    ``<domain>_{train,test}.txt`` lists as S-Prompts reads them; every sample carries its domain.
    """

    name, num_classes = "domainnet", 345
    description = "DomainNet, 6 domains x 345 classes, official train/test lists (Domains scenario)"
    domains: tuple[str, ...] = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
    folder_names: tuple[str, ...] = ("domainnet", "DomainNet")

    def lists(self, folder: Path) -> list[Path]:
        return [folder / f"{d}_{s}.txt" for s in ("train", "test") for d in self.domains]

    def locate(self) -> Path:
        """The folder holding every list file, or a DataError naming where it looked."""
        root = require_root(self.name, self.root, "<domain>_{train,test}.txt and <domain>/ folders")
        looked = [root] + [root / n for n in self.folder_names]
        for folder in looked:
            if all(p.is_file() for p in self.lists(folder)):
                return folder.absolute()
        missing = [p.name for p in self.lists(root) if not p.is_file()]
        raise DataError(
            f"{self.name}: no complete set of list files in any of {[str(p) for p in looked]} "
            f"(missing in {root}: {missing}). Expected layout: DIR/<domain>/<class>/<image> and "
            f"DIR/<domain>_train.txt, DIR/<domain>_test.txt for the domains {list(self.domains)}."
            f" Download the images (cleaned version) and the train/test lists of every domain "
            f"from {DOMAINNET_URL}, unzip them into DIR and pass `--data-root DIR`.")

    def read(self, folder: Path, split: str) -> tuple[Split, np.ndarray, list[str], list[int]]:
        """One split of every domain: the Split, domain ids, relative paths and labels."""
        rel, labels, domain = [], [], []
        for d, name in enumerate(self.domains):
            p, y = read_image_list(folder / f"{name}_{split}.txt")
            rel, labels, domain = rel + p, labels + y, domain + [d] * len(p)
        paths = np.array([str(folder / p) for p in rel], dtype=object)
        try:
            data = Split(paths, np.array(labels, dtype=np.int64))
        except FileNotFoundError as exc:
            raise DataError(f"{self.name}: {exc.filename} is named in the {split} lists but "
                            f"missing; unzip every domain's images into {folder}") from exc
        return data, np.array(domain, dtype=np.int64), rel, labels

    def load(self) -> DataBundle:
        folder = self.locate()
        train, train_domains, rel, labels = self.read(folder, "train")
        test, test_domains, _, test_labels = self.read(folder, "test")
        names = names_from_paths(rel, labels, self.num_classes)
        if test_labels and not 0 <= min(test_labels) <= max(test_labels) < self.num_classes:
            raise DataError(f"{self.name}: test labels outside 0..{self.num_classes - 1}")
        source = {"path": str(folder), "layout": "<domain>_{train,test}.txt lists",
                  "domains": list(self.domains)}
        return DataBundle(self.name, train, test, names, source,
                          Domains(self.domains, train_domains, test_domains))
