"""Zero-shot segmentation from heatmaps, scored against masks.

A heatmap [H, W] is clipped at zero, divided by its maximum and thresholded at the mean of
that normalised map (the protocol of the paper, after Gandelsman et al.). Scores, as in
Chefer et al.'s ImageNet-segmentation protocol: pixel accuracy and IoU pooled over all
pixels of all images (foreground IoU, and the mean of foreground and background IoU), and
mAP = mean over images of the average precision of the map's pixel scores against the mask.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


def normalised(heatmaps: torch.Tensor) -> torch.Tensor:
    """[B, H, W] clipped at 0 and divided by each map's maximum (all-zero maps stay zero)."""
    clipped = heatmaps.float().clamp_min(0)
    top = clipped.flatten(1).amax(1).clamp_min(torch.finfo(torch.float32).tiny)
    return clipped / top.view(-1, 1, 1)


def binarize(heatmaps: torch.Tensor) -> torch.Tensor:
    """bool [B, H, W]: pixels of the normalised map above its mean."""
    maps = normalised(heatmaps)
    return maps > maps.flatten(1).mean(1).view(-1, 1, 1)


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """AP of ``scores`` [N] ranking the True ``targets`` [N] first (tied scores form one threshold)."""
    scores, targets = scores.flatten().double(), targets.flatten().bool()
    positives = int(targets.sum())
    if positives == 0:
        return float("nan")
    order = scores.argsort(descending=True, stable=True)
    sorted_scores, hits = scores[order], targets[order].double()
    true_positives = hits.cumsum(0)
    last_of_tie = torch.ones_like(sorted_scores, dtype=torch.bool)
    last_of_tie[:-1] = sorted_scores[1:] != sorted_scores[:-1]           # one threshold per distinct score
    tp = true_positives[last_of_tie]
    predicted = (torch.arange(1, len(scores) + 1, dtype=torch.float64, device=scores.device))[last_of_tie]
    precision, recall = tp / predicted, tp / positives
    recall_steps = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((recall_steps * precision).sum())


@dataclass
class SegmentationScores:
    pixel_accuracy: float
    foreground_iou: float
    mean_iou: float                 # mean of foreground and background IoU
    mean_average_precision: float   # mean over images with a non-empty mask
    images: int

    def as_dict(self) -> dict:
        return asdict(self)


class SegmentationTally:
    """``segmentation_scores`` over batches: running pixel counts and per-image APs, one batch in memory."""

    def __init__(self) -> None:
        self.correct = self.pixels = self.images = 0
        self.intersections, self.unions = [0, 0], [0, 0]       # foreground, background
        self.precisions: list[float] = []

    def add(self, heatmaps: torch.Tensor, masks: torch.Tensor) -> None:
        """Count heatmaps [B, H, W] against bool masks [B, H, W] (heatmaps are resized bilinearly if needed)."""
        masks = masks.bool()
        if heatmaps.shape[0] != masks.shape[0]:
            raise ValueError(f"{heatmaps.shape[0]} heatmaps for {masks.shape[0]} masks")
        if heatmaps.shape[-2:] != masks.shape[-2:]:
            heatmaps = torch.nn.functional.interpolate(heatmaps.unsqueeze(1).float(), size=masks.shape[-2:],
                                                       mode="bilinear", align_corners=False).squeeze(1)
        predicted = binarize(heatmaps)
        self.correct += int((predicted == masks).sum())
        self.pixels += masks.numel()
        self.images += int(masks.shape[0])
        for index, foreground in enumerate((True, False)):
            p, m = predicted == foreground, masks == foreground
            self.intersections[index] += int((p & m).sum())
            self.unions[index] += int((p | m).sum())
        self.precisions += [average_precision(h, m) for h, m in zip(heatmaps, masks) if bool(m.any())]

    def scores(self) -> SegmentationScores:
        if not self.images:
            raise ValueError("no images were scored")
        ious = [i / u if u > 0 else float("nan") for i, u in zip(self.intersections, self.unions)]
        precisions = self.precisions
        return SegmentationScores(pixel_accuracy=self.correct / self.pixels, foreground_iou=ious[0],
                                  mean_iou=sum(ious) / 2,
                                  mean_average_precision=sum(precisions) / len(precisions) if precisions else float("nan"),
                                  images=self.images)


def segmentation_scores(heatmaps: torch.Tensor, masks: torch.Tensor) -> SegmentationScores:
    """Scores of heatmaps [B, H, W] against bool masks [B, H, W] (heatmaps are resized bilinearly if needed)."""
    tally = SegmentationTally()
    tally.add(heatmaps, masks)
    return tally.scores()
