"""Image I/O, dataset loaders and synthetic data."""

from anomalens.data.csv_safe import csv_writer, safe_cell
from anomalens.data.datasets import (
    Dataset,
    Sample,
    calibration_split,
    find_mvtec_categories,
    load_csv,
    load_dataset,
    load_folder,
    load_mvtec,
)
from anomalens.data.io import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    MIN_SIDE,
    DatasetError,
    ImageHeader,
    ImageReadError,
    check_header,
    display_name,
    list_images,
    max_pixels_limit,
    read_header,
    read_image,
    read_mask,
)
from anomalens.data.synthetic import add_defect, make_synthetic_dataset, synthetic_image

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "MIN_SIDE",
    "Dataset",
    "DatasetError",
    "ImageHeader",
    "ImageReadError",
    "Sample",
    "add_defect",
    "calibration_split",
    "check_header",
    "csv_writer",
    "display_name",
    "find_mvtec_categories",
    "list_images",
    "load_csv",
    "load_dataset",
    "load_folder",
    "load_mvtec",
    "make_synthetic_dataset",
    "max_pixels_limit",
    "read_header",
    "read_image",
    "read_mask",
    "safe_cell",
    "synthetic_image",
]
