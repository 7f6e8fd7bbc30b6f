"""Datasets by name: ``create_dataset("mnist5k").load()`` returns a ``DataBundle``.

Offline datasets (``mnist5k``, ``digits``, ``fashion_mnist``) and full ``mnist`` (IDX files from
``--data-root``) live in ``offline``; the real benchmarks read from ``--data-root``
(``cifar100``, ``imagenet_r``, ``imagenet_a``, ``cub200``, ``objectnet``, ``omnibenchmark``,
``vtab``, ``imagefolder``, ``domainnet``) live in ``folders``.
"""

from . import folders, offline
from .base import (
    DATASETS,
    DataBundle,
    Dataset,
    Domains,
    Split,
    create_dataset,
    per_class_subset,
    register_dataset,
)

__all__ = ["DATASETS", "DataBundle", "Dataset", "Domains", "Split", "create_dataset", "folders",
           "offline", "per_class_subset", "register_dataset"]
