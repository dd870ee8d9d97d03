"""Prepared-dataset format: sources and writer, validation, rank-sharded parquet reader.

Importing this package does not import torch (``prepare_data`` stays quick); the torch parts are
``gankd_ray.data.transforms`` and ``gankd_ray.data.loader`` (``DetectionBatchLoader``).
"""

from gankd_ray.data.reader import count_rows, rank_range, read_dataset_info, read_split
from gankd_ray.data.records import SPLITS, Annotation, DatasetError, ImageRecord, Rejections, SourceData
from gankd_ray.data.sources import DatasetSource, available_sources, get_source, register_source
from gankd_ray.data.writer import write_dataset

__all__ = [
    "SPLITS",
    "Annotation",
    "DatasetError",
    "DatasetSource",
    "ImageRecord",
    "Rejections",
    "SourceData",
    "available_sources",
    "count_rows",
    "get_source",
    "rank_range",
    "read_dataset_info",
    "read_split",
    "register_source",
    "write_dataset",
]
