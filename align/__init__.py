"""CLIP space: open_clip models and text banks, CompAlign maps, property scores, TextSpan.

Nothing here knows architectures: only component labels and tensors [C, B, d_model].
"""
from .alignment_data import StoreAlignmentData, StreamingAlignmentData, TensorAlignmentData
from .clip_models import ClipLoadError, ClipModel, load_clip, wrap_clip
from .compalign import AlignerMismatch, CompAlign
from .image_targets import clip_image_targets
from .properties import property_descriptions, shipped_properties
from .scoring import (PropertyScorer, property_basis, property_scores, rank_components, specific_scores,
                      variance_explained)
from .store_analysis import describe_store_component, property_bases, score_store
from .text_bank import TextEmbeddingCache, encode_descriptions, imagenet_templates
from .textspan import TextSpanResult, text_span
from .training import AlignmentReport, TrainingOptions, evaluate_alignment, train_compalign

__all__ = ["load_clip", "wrap_clip", "ClipModel", "ClipLoadError", "encode_descriptions", "imagenet_templates",
           "TextEmbeddingCache", "CompAlign", "AlignerMismatch", "TrainingOptions", "AlignmentReport",
           "train_compalign", "evaluate_alignment", "TensorAlignmentData", "StoreAlignmentData",
           "StreamingAlignmentData", "clip_image_targets", "property_basis", "property_scores", "variance_explained",
           "specific_scores", "rank_components", "PropertyScorer", "property_descriptions", "shipped_properties",
           "text_span", "TextSpanResult", "score_store", "property_bases", "describe_store_component"]
