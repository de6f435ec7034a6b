"""Readers for the datasets of the paper's experiments, in their own file formats: Waterbirds' ``metadata.csv``,
ImageNet-Segmentation's ``gtsegs_ijcv.mat`` and ImageNet-style ``ImageFolder`` class folders. Tables come out
keyed by image id (the path relative to the image folder a store was decomposed from)."""
from .image_folder import class_texts, image_folder_labels, read_class_names
from .imagenet_segmentation import ImageNetSegmentation
from .waterbirds import WATERBIRDS_COLUMNS, read_waterbirds

__all__ = ["ImageNetSegmentation", "WATERBIRDS_COLUMNS", "class_texts", "image_folder_labels", "read_class_names",
           "read_waterbirds"]
