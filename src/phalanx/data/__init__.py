"""Datasets: digits (embedded), MNIST, Fashion-MNIST, CIFAR-10/100 from their standard files."""

from phalanx.data.datasets import (
    DATASETS,
    DatasetSplits,
    Split,
    iterate_batches,
    load_dataset,
    num_batches,
    stratified_split,
)
from phalanx.data.files import DATA_DIR_ENV, default_data_dir, read_idx, write_idx

__all__ = [
    "DATASETS", "DATA_DIR_ENV", "DatasetSplits", "Split", "default_data_dir", "iterate_batches",
    "load_dataset", "num_batches", "read_idx", "stratified_split", "write_idx",
]
