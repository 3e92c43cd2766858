"""COCO-format data: `CocoInstances` (any instances JSON + image folder), its errors and image reading."""

from iuq.data.coco import CocoInstances, DatasetError, read_image

__all__ = ["CocoInstances", "DatasetError", "read_image"]
