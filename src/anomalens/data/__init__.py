"""Image I/O, dataset loaders and synthetic data."""

from anomalens.data.datasets import (
    Dataset,
    Sample,
    calibration_split,
    find_mvtec_categories,
    load_csv,
    load_dataset,
    load_folder,
    load_mvtec,
    load_products,
)
from anomalens.data.io import (
    IMAGE_EXTENSIONS,
    DatasetError,
    ImageReadError,
    list_images,
    read_image,
    read_mask,
)
from anomalens.data.synthetic import add_defect, make_synthetic_dataset, synthetic_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "Dataset",
    "DatasetError",
    "ImageReadError",
    "Sample",
    "add_defect",
    "calibration_split",
    "find_mvtec_categories",
    "list_images",
    "load_csv",
    "load_dataset",
    "load_folder",
    "load_mvtec",
    "load_products",
    "make_synthetic_dataset",
    "read_image",
    "read_mask",
    "synthetic_image",
]
