"""Datasets: COCO reading and validation, VOC -> COCO, the search split, and the
bundled ``shapes`` and ``digits`` generators."""

from paploss.data.bundled import BUNDLED, make_dataset
from paploss.data.coco import CocoFormatError, category_index, load_coco, validate_coco
from paploss.data.split import search_split, split_image_ids
from paploss.data.voc import VOC_CLASSES, voc_to_coco

__all__ = [
    "BUNDLED",
    "CocoFormatError",
    "VOC_CLASSES",
    "category_index",
    "load_coco",
    "make_dataset",
    "search_split",
    "split_image_ids",
    "validate_coco",
    "voc_to_coco",
]
