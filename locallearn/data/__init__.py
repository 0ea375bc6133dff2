from locallearn.data.datasets import DATASETS, load_datasets
from locallearn.data.errors import DataError
from locallearn.data.loader import ArrayDataset, Augment, Loader

__all__ = ["DATASETS", "ArrayDataset", "Augment", "DataError", "Loader", "load_datasets"]
