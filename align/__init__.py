"""CLIP space: open_clip models and text banks, CompAlign maps, property scores, TextSpan, and the
applications built on them (retrieval, token heatmaps and segmentation, ablation, spurious-correlation
removal).

Nothing here knows architectures: only component labels and tensors [C, B, d_model].
"""
from .ablation import (
    AblationCurve,
    ablate,
    ablation_curve,
    component_indices,
    component_means,
    layer_steps,
    ordered_steps,
    store_component_means,
)
from .alignment_data import StoreAlignmentData, StreamingAlignmentData, TensorAlignmentData
from .attribution import Attribution, AttributionTargetError, attribute
from .classifiers import fit_linear_probe, predict, zero_shot_classifier
from .clip_models import ClipLoadError, ClipModel, load_clip, wrap_clip
from .compalign import AlignerMismatch, CompAlign
from .debias import (
    DebiasResult,
    GroupAccuracy,
    LabelledSplit,
    group_accuracy,
    remove_spurious,
    spurious_order,
    spurious_scores,
)
from .drawing import heatmap_figure, heatmap_overlay, line_plot
from .heatmaps import attention_heatmaps, branch_grids, grid_layout, head_selector, text_heatmaps, token_heatmaps
from .image_targets import clip_image_targets
from .parent_maps import (
    aligner_directions,
    aligner_rows,
    map_components_by_parent,
    per_image_aligner_directions,
    text_contributions,
)
from .properties import property_descriptions, shipped_properties
from .retrieval import (
    RetrievalChoice,
    choose_retrieval,
    image_retrieval_scores,
    precision_at_k,
    ranked,
    selected_sum,
    shares_value,
    text_retrieval_scores,
    top_components,
)
from .scoring import (
    PropertyScorer,
    Ranking,
    property_basis,
    property_scores,
    rank_components,
    specific_scores,
    variance_explained,
)
from .segmentation import SegmentationScores, average_precision, binarize, segmentation_scores
from .store_analysis import describe_store_component, property_bases, score_store
from .text_bank import TextEmbeddingCache, encode_descriptions, imagenet_templates
from .textspan import TextSpanResult, text_span
from .training import AlignmentReport, TrainingOptions, evaluate_alignment, train_compalign

__all__ = ["AblationCurve", "AlignerMismatch", "AlignmentReport", "Attribution", "AttributionTargetError", "ClipLoadError", "ClipModel", "CompAlign",
           "DebiasResult", "GroupAccuracy", "LabelledSplit", "PropertyScorer", "Ranking", "RetrievalChoice",
           "SegmentationScores", "StoreAlignmentData", "StreamingAlignmentData", "TensorAlignmentData",
           "TextEmbeddingCache", "TextSpanResult", "TrainingOptions", "ablate", "ablation_curve", "aligner_directions", "aligner_rows",
           "attention_heatmaps", "attribute", "average_precision", "binarize", "branch_grids", "choose_retrieval",
           "clip_image_targets", "component_indices", "component_means", "describe_store_component",
           "encode_descriptions", "evaluate_alignment", "fit_linear_probe", "grid_layout", "group_accuracy",
           "head_selector", "heatmap_figure", "heatmap_overlay", "image_retrieval_scores", "imagenet_templates",
           "layer_steps", "line_plot", "load_clip", "map_components_by_parent", "ordered_steps",
           "per_image_aligner_directions", "precision_at_k",
           "predict", "property_bases", "property_basis", "property_descriptions", "property_scores",
           "rank_components", "ranked", "remove_spurious", "score_store", "segmentation_scores", "selected_sum",
           "shares_value", "shipped_properties", "specific_scores", "spurious_order", "spurious_scores",
           "store_component_means", "text_contributions", "text_heatmaps", "text_retrieval_scores", "text_span", "token_heatmaps",
           "top_components", "train_compalign", "variance_explained", "wrap_clip", "zero_shot_classifier"]
