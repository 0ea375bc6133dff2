from locallearn.data.datasets import DATASETS, DataError, load_datasets
from locallearn.data.loader import ArrayDataset, Augment, Loader

__all__ = ["DATASETS", "ArrayDataset", "Augment", "DataError", "Loader", "load_datasets"]
