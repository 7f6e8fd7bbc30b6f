"""Task- and domain-incremental streams (the architecture methods' benchmarks).

- ``TaskIncremental``: the class splits of ``ClassIncremental`` (Split MNIST 5 x 2, Split
  CIFAR-100 10 x 10, CIFAR-100 superclasses 20 x 5) with the task id known at test time.
- ``PermutedStream``: every task permutes the pixels with its own fixed permutation, seeded
  ``seed + t`` (task 0 permuted too, as SupSup's ``PermutedMNIST``); labels shared by all tasks.
- ``RotatedStream``: every task rotates the images by its own angle; labels shared.
- ``DomainIncremental``: one task per domain of a dataset whose samples carry a domain label
  (DomainNet's six domains, as S-Prompts), in a configurable domain order; labels shared.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..datasets.base import DataBundle, Split
from ..errors import ConfigError
from .base import Task
from .class_incremental import ClassIncremental

# The canonical CIFAR-100 grouping: 20 superclasses of 5 fine classes (Krizhevsky, 2009).
CIFAR100_SUPERCLASSES = {
    "aquatic mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit and vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household electrical devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large man-made outdoor things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large natural outdoor scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large omnivores and herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium-sized mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles 1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles 2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}


class TaskIncremental(ClassIncremental):
    """Class splits whose task id is given at test time (predictions restricted to the task)."""

    kind = "task"

    def _task(self, t: int) -> Task:
        task = super()._task(t)
        return Task(task.id, task.classes, task.new_classes, task.seen_classes, task.train,
                    task.test, kind="task", class_names=task.class_names)


def superclass_order(class_names: Sequence[str], seed: int | None = None) -> np.ndarray:
    """A CIFAR-100 class order that groups the 5 fine classes of each superclass together; the
    superclasses are shuffled by ``RandomState(seed)`` (natural order when seed is None)."""
    index = {n: i for i, n in enumerate(class_names)}
    missing = [n for g in CIFAR100_SUPERCLASSES.values() for n in g if n not in index]
    if missing:
        raise ConfigError(f"the superclass split needs CIFAR-100's fine classes; missing "
                          f"{missing[:5]} (use --dataset cifar100)")
    groups = list(CIFAR100_SUPERCLASSES.values())
    if seed is not None:
        groups = [groups[i] for i in np.random.RandomState(seed).permutation(len(groups))]
    return np.array([index[n] for g in groups for n in g], dtype=np.int64)


class _DomainStream:
    """Base of streams whose tasks share one label space and differ in their inputs."""

    kind = "domain"

    def __init__(self, bundle: DataBundle, num_tasks: int):
        if num_tasks < 1:
            raise ConfigError("a stream needs at least one task")
        self.bundle = bundle
        self.num_tasks = num_tasks
        self.class_order = np.arange(bundle.num_classes)
        self.sizes = [bundle.num_classes] + [0] * (num_tasks - 1)  # new classes per task

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.bundle.class_names

    def __len__(self) -> int:
        return self.num_tasks

    def __iter__(self) -> Iterator[Task]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, key: int | slice) -> Task | list[Task]:
        if isinstance(key, slice):
            return [self[i] for i in range(*key.indices(len(self)))]
        if not -len(self) <= key < len(self):
            raise IndexError(f"task {key} out of range for {len(self)} tasks")
        t = key % len(self)
        classes = tuple(range(self.bundle.num_classes))
        return Task(t, classes, classes if t == 0 else (), classes, *self._splits(t),
                    kind="domain", class_names=tuple(self.bundle.class_names))

    def _splits(self, t: int) -> tuple[Split, Split]:
        """Train and test split of task ``t``."""
        return self._transform(self.bundle.train, t), self._transform(self.bundle.test, t)

    def _transform(self, split: Split, t: int) -> Split:
        raise NotImplementedError


class PermutedStream(_DomainStream):
    """Permuted MNIST-style tasks: pixel permutation of task t seeded ``seed + t``."""

    def __init__(self, bundle: DataBundle, num_tasks: int, seed: int = 1993):
        super().__init__(bundle, num_tasks)
        self.seed = seed

    def permutation(self, t: int) -> np.ndarray:
        pixels = int(np.prod(self.bundle.train.data.shape[1:3]))
        return np.random.RandomState(self.seed + t).permutation(pixels)

    def _transform(self, split: Split, t: int) -> Split:
        if split.is_paths:
            raise ConfigError("permuted streams need in-memory images (e.g. mnist5k)")
        n, h, w = split.data.shape[:3]
        flat = split.data.reshape(n, h * w, *split.data.shape[3:])
        data = np.ascontiguousarray(flat[:, self.permutation(t)].reshape(split.data.shape))
        return Split(data, split.targets)  # new content: its own cache key


class RotatedStream(_DomainStream):
    """Rotated MNIST-style tasks: task t rotates every image by ``angles[t]`` degrees."""

    def __init__(self, bundle: DataBundle, angles: Sequence[float]):
        super().__init__(bundle, len(angles))
        self.angles = tuple(float(a) for a in angles)

    def _transform(self, split: Split, t: int) -> Split:
        if split.is_paths:
            raise ConfigError("rotated streams need in-memory images (e.g. mnist5k)")
        return Split(rotate(split.data, self.angles[t]), split.targets)


class DomainIncremental(_DomainStream):
    """One task per domain of ``bundle.domains`` (e.g. DomainNet), in ``order`` (domain names
    or ids; default: the dataset's own order); every task holds every class. Task splits are
    subsets of the full splits, so cached features of each image are reused across tasks.
    """

    def __init__(self, bundle: DataBundle, order: Sequence[str | int] | None = None):
        domains = bundle.domains
        if domains is None:
            raise ConfigError(f"a domain-incremental stream needs a dataset whose samples carry a "
                              f"domain label (e.g. domainnet); {bundle.name!r} has none (Rotated"
                              f"{{n}} / Permuted{{n}} build domains from in-memory images)")
        self.order = tuple(_domain_id(domains.names, d) for d in
                           (range(len(domains.names)) if order is None else order))
        if len(set(self.order)) != len(self.order):
            raise ConfigError(f"domain order {list(order)} repeats a domain")
        super().__init__(bundle, len(self.order))
        empty = [domains.names[d] for d in self.order if not (domains.train == d).any()]
        if empty:
            raise ConfigError(f"{bundle.name}: domain(s) {empty} have no training sample")

    @property
    def domain_names(self) -> tuple[str, ...]:
        """The domain of each task, in stream order."""
        return tuple(self.bundle.domains.names[d] for d in self.order)

    def _splits(self, t: int) -> tuple[Split, Split]:
        d, b = self.order[t], self.bundle
        return (b.train.subset(np.flatnonzero(b.domains.train == d)),
                b.test.subset(np.flatnonzero(b.domains.test == d)))


def _domain_id(names: tuple[str, ...], d: str | int) -> int:
    """The id of domain ``d`` (a name or an id) among ``names``."""
    if isinstance(d, str) and d in names:
        return names.index(d)
    if isinstance(d, str) and d.isdigit():
        d = int(d)
    if isinstance(d, int | np.integer) and 0 <= d < len(names):
        return int(d)
    raise ConfigError(f"unknown domain {d!r}; the dataset's domains are {list(names)}")


def rotate(images: np.ndarray, degrees: float) -> np.ndarray:
    """uint8 images (N, H, W[, C]) rotated about their centre (bilinear, zero fill)."""
    x = torch.from_numpy(images).float()
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W)
    a = np.deg2rad(degrees)
    theta = torch.tensor([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0]],
                         dtype=torch.float32).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = y.round().clamp(0, 255).to(torch.uint8)
    return (y[:, 0] if images.ndim == 3 else y.permute(0, 2, 3, 1)).numpy()
