"""A DINO-style self-supervised objective for the toy world's ViT (the DINO / DINOv2 analogue).

Caron et al. 2021, scaled down: a student and a teacher (the student's exponential moving
average) each put a ViT's class token through a projection head (MLP, L2-normalised bottleneck,
weight-normalised prototypes); the teacher sees two global crops, the student those and
``local_crops`` small ones, and the student's softmax over the prototypes is trained to match the
teacher's centred, sharpened softmax of another view. No labels. Crops are random resized crops
with horizontal flips, drawn on the whole batch at once (``random_crops``); each view is turned
to grey with probability ``grayscale_probability`` (no other colour jitter), so that matching
views needs more than their colours, while colour stays a cue most pairs of views share.
DINOv2's KoLeo term (``koleo_weight``) pushes the student's class tokens of a batch apart on the
sphere. Without it (and with 256 prototypes) the trained teacher's representation kept the near-rank-2
spread of a random initialisation (effective rank 2.8 after 1500 steps, random init 2.4; scene and
colour); with KoLeo 0.1 and 1024 prototypes it has effective rank 20.9 and reads pattern better
(held-out probe 0.52 -> 0.61), but shape (0.23) and position (0.27) stay close to chance: the crops
and flips make the views disagree on where the object is, and shape is not needed to match them
(2026-12-05).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DinoOptions:
    """The objective's settings (the defaults are those of the shipped target)."""

    prototypes: int = 1024                # teacher / student output dimension
    hidden: int = 192                     # projection MLP width
    bottleneck: int = 64                  # L2-normalised width before the prototypes
    global_size: int = 64                 # pixels per side of a global crop
    global_scale: tuple[float, float] = (0.5, 1.0)   # fraction of the image's area
    local_crops: int = 4
    local_size: int = 32
    local_scale: tuple[float, float] = (0.2, 0.5)
    grayscale_probability: float = 0.5
    flip_probability: float = 0.5         # chance a crop is mirrored left-right (0: left stays left)
    channel_permutation_probability: float = 0.0  # chance a view's RGB channels are shuffled (a hue change)
    student_temperature: float = 0.1
    teacher_temperature: float = 0.04
    center_momentum: float = 0.9
    teacher_momentum: float = 0.996       # at the start; cosine schedule to 1 at the last step
    koleo_weight: float = 0.1             # DINOv2's KoLeo term on the student's global class tokens (0: off)
    ibot_weight: float = 0.0              # DINOv2's iBOT masked-patch term (0: off)
    mask_probability: float = 0.5         # iBOT: chance a student global view has masked patches
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # iBOT: fraction of such a view's patches masked (uniform)


class ProjectionHead(nn.Module):
    """[B, d] -> [B, prototypes]: MLP (GELU), L2-normalised bottleneck, weight-normalised prototypes (no bias)."""

    def __init__(self, width: int, options: DinoOptions):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, options.hidden), nn.GELU(), nn.Linear(options.hidden, options.hidden),
                                 nn.GELU(), nn.Linear(options.hidden, options.bottleneck))
        self.prototypes = nn.Linear(options.bottleneck, options.prototypes, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        bottleneck = F.normalize(self.mlp(features), dim=-1)
        return bottleneck @ F.normalize(self.prototypes.weight, dim=-1).T


def koleo(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's KoLeo regulariser of features [B, d]: minus the mean log distance of each L2-normalised
    row to its nearest other row (Sablayrolles et al. 2019). Falls as the batch spreads over the sphere."""
    unit = F.normalize(features, dim=-1, eps=eps)
    with torch.no_grad():
        similarity = unit @ unit.T
        similarity.fill_diagonal_(-2.0)
        nearest = similarity.argmax(-1)
    return -torch.log(F.pairwise_distance(unit, unit[nearest], eps=eps) + eps).mean()


def random_grayscale(images: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """images [B, 3, H, W] in [0, 1] with each image turned to grey (ITU-R 601 luma) with ``probability``."""
    luma = (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True).expand_as(images)
    chosen = torch.rand(images.shape[0], generator=generator) < probability
    return torch.where(chosen.view(-1, 1, 1, 1), luma, images)


def random_channel_permutation(images: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """images [B, 3, H, W] with each image's channels put in a random other order (one of the 5
    non-identity permutations, uniform) with ``probability``: a colour change that keeps the luma's layout."""
    permutations = torch.tensor([[0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])
    draws = torch.rand(images.shape[0], 2, generator=generator)
    chosen = permutations[(draws[:, 1] * len(permutations)).long().clamp(max=len(permutations) - 1)]   # [B, 3]
    chosen = torch.where((draws[:, 0] < probability).view(-1, 1), chosen, torch.arange(3))
    index = chosen.view(-1, 3, 1, 1).expand_as(images)
    return images.gather(1, index)


def random_crops(images: torch.Tensor, count: int, size: int, scale: tuple[float, float],
                 generator: torch.Generator, flip_probability: float = 0.5) -> list[torch.Tensor]:
    """``count`` random resized crops of every image: a list of [B, C, size, size].

    images: [B, C, H, W] float. Each crop covers ``scale`` of the area (uniform), aspect ratio
    log-uniform in [3/4, 4/3], lies inside the image, is flipped left-right with ``flip_probability``,
    and is resampled bilinearly.
    """
    batch = images.shape[0]
    draws = torch.rand(count, batch, 5, generator=generator)                    # [count, B, 5] in [0, 1)
    area = scale[0] + (scale[1] - scale[0]) * draws[..., 0]
    aspect = torch.exp(math.log(3 / 4) + math.log(16 / 9) * draws[..., 1])
    width, height = (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)  # of the side
    centre_x = (2 * draws[..., 2] - 1) * (1 - width)                            # crop inside [-1, 1]
    centre_y = (2 * draws[..., 3] - 1) * (1 - height)
    flip = torch.where(draws[..., 4] < flip_probability, -1.0, 1.0)
    theta = torch.zeros(count, batch, 2, 3)
    theta[..., 0, 0], theta[..., 0, 2] = width * flip, centre_x
    theta[..., 1, 1], theta[..., 1, 2] = height, centre_y
    crops = []
    for view in theta:                                                          # [B, 2, 3]
        grid = F.affine_grid(view, [batch, images.shape[1], size, size], align_corners=False)
        crops.append(F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False))
    return crops


def random_patch_masks(views: int, batch: int, patches: int, probability: float, ratio: tuple[float, float],
                       generator: torch.Generator) -> torch.Tensor:
    """[views, batch, patches] bool: each image of each view masked with ``probability``, then a
    uniform fraction in ``ratio`` of its patches (rounded), chosen uniformly; the others unmasked."""
    draws = torch.rand(views, batch, 2, generator=generator)
    counts = torch.round((ratio[0] + (ratio[1] - ratio[0]) * draws[..., 1]) * patches)
    counts = torch.where(draws[..., 0] < probability, counts, 0.0)
    ranks = torch.rand(views, batch, patches, generator=generator).argsort(-1).argsort(-1)
    return ranks < counts.unsqueeze(-1)


class MaskToken(nn.Module):
    """The learnt patch embedding [d] that replaces a masked patch's (iBOT)."""

    def __init__(self, width: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(width))


class Dino(nn.Module):
    """Student and teacher around one backbone (a timm ViT whose ``forward`` returns the class
    token's features [B, d], i.e. built with ``num_classes=0`` and ``dynamic_img_size=True`` so
    that it reads crops of any size); ``normalise`` maps views in [0, 1] to the backbone's input;
    ``teacher_backbone`` is the model to keep."""

    def __init__(self, backbone: nn.Module, options: DinoOptions = DinoOptions(),
                 normalise: Callable[[torch.Tensor], torch.Tensor] = lambda images: images):
        super().__init__()
        self.options, self.normalise = options, normalise
        self.student = nn.ModuleDict({"backbone": backbone, "head": ProjectionHead(backbone.num_features, options)})
        if options.ibot_weight:
            self.student["mask_token"] = MaskToken(backbone.embed_dim)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.register_buffer("center", torch.zeros(options.prototypes))
        self.register_buffer("patch_center", torch.zeros(options.prototypes))
        self._mask: list[torch.Tensor | None] = [None]  # the patch mask [B, N] the student's next view takes
        if options.ibot_weight:
            backbone.patch_embed.register_forward_hook(self._masked_embedding)  # the student's only

    def _masked_embedding(self, module: nn.Module, inputs, tokens: torch.Tensor) -> torch.Tensor | None:
        """patch_embed's output [B, N, d] or [B, H, W, d] with the masked patches' embedding replaced."""
        mask = self._mask[0]
        if mask is None:
            return None
        mask = mask.view(*tokens.shape[:-1], 1)
        return torch.where(mask, self.student["mask_token"].embedding.to(tokens.dtype), tokens)

    @property
    def teacher_backbone(self) -> nn.Module:
        return self.teacher["backbone"]

    def views(self, images: torch.Tensor, generator: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(2 global views, ``local_crops`` local views) of images [B, 3, H, W] in [0, 1], normalised."""
        o = self.options
        crops = (random_crops(images, 2, o.global_size, o.global_scale, generator, o.flip_probability),
                 random_crops(images, o.local_crops, o.local_size, o.local_scale, generator, o.flip_probability))
        return tuple([self.normalise(self._recolour(crop, generator)) for crop in group] for group in crops)

    def _recolour(self, view: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        o = self.options
        if o.channel_permutation_probability:
            view = random_channel_permutation(view, o.channel_permutation_probability, generator)
        return random_grayscale(view, o.grayscale_probability, generator)

    def loss(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The training loss of one batch of images [B, 3, H, W] in [0, 1]: ``terms`` weighted and summed."""
        o = self.options
        terms = self.terms(images, generator)
        weights = {"dino": 1.0, "koleo": o.koleo_weight, "ibot": o.ibot_weight}
        return sum(weights[name] * term for name, term in terms.items())

    def terms(self, images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """{"dino", and "koleo" / "ibot" where their weight is not 0}: the unweighted terms of one batch
        of images [B, 3, H, W] in [0, 1]; updates the centres."""
        o = self.options
        global_views, local_views = self.views(images, generator)
        masks = self._patch_masks(images.shape[0], generator) if o.ibot_weight else [None, None]
        with torch.no_grad():
            teacher_tokens = [self.teacher["backbone"].forward_features(v) for v in global_views]  # each [B, T, d]
            teacher = torch.stack([self.teacher["head"](self.teacher["backbone"].forward_head(t))
                                   for t in teacher_tokens])                                    # [2, B, K]
            targets = F.softmax((teacher - self.center) / o.teacher_temperature, dim=-1)
        student_tokens = [self._student_tokens(v, m) for v, m in zip(global_views, masks)]      # each [B, T, d]
        backbone = self.student["backbone"]
        features = [backbone.forward_head(t) for t in student_tokens] + [backbone(v) for v in local_views]
        student = [self.student["head"](f) for f in features]                               # each [B, K]
        pairs = [self._cross_entropy(target, view).mean() for t, target in enumerate(targets)
                 for s, view in enumerate(student) if s != t]
        with torch.no_grad():
            self.center.mul_(o.center_momentum).add_(teacher.mean((0, 1)), alpha=1 - o.center_momentum)
        terms = {"dino": torch.stack(pairs).mean()}
        if o.koleo_weight:
            terms["koleo"] = torch.stack([koleo(f) for f in features[:2]]).mean()
        if o.ibot_weight:
            terms["ibot"] = self._ibot(teacher_tokens, student_tokens, masks)
        return terms

    def _cross_entropy(self, target: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        """[...] the cross-entropy of the student's logits [..., K] against the teacher's target [..., K]."""
        return torch.sum(-target * F.log_softmax(student / self.options.student_temperature, dim=-1), dim=-1)

    def _patch_masks(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """[2, B, N] the masks of the student's global views (iBOT)."""
        o, embed = self.options, self.student["backbone"].patch_embed
        patches = (o.global_size // embed.patch_size[0]) * (o.global_size // embed.patch_size[1])
        return random_patch_masks(2, batch, patches, o.mask_probability, o.mask_ratio, generator)

    def _student_tokens(self, view: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """[B, T, d] the student backbone's tokens of a view [B, 3, H, W], its patches ``mask`` [B, N] masked."""
        self._mask[0] = mask
        try:
            return self.student["backbone"].forward_features(view)
        finally:
            self._mask[0] = None

    def _ibot(self, teacher_tokens: list[torch.Tensor], student_tokens: list[torch.Tensor],
              masks: torch.Tensor) -> torch.Tensor:
        """iBOT: the student's masked patch tokens predict the teacher's (centred, sharpened) tokens of the
        same unmasked view, through the shared head; mean over the masked patches. Updates ``patch_center``."""
        o, prefix = self.options, self.student["backbone"].num_prefix_tokens
        with torch.no_grad():
            teacher = torch.stack([self.teacher["head"](t[:, prefix:]) for t in teacher_tokens])   # [2, B, N, K]
            targets = F.softmax((teacher - self.patch_center) / o.teacher_temperature, dim=-1)
            self.patch_center.mul_(o.center_momentum).add_(teacher.mean((0, 1, 2)), alpha=1 - o.center_momentum)
        if not masks.any():
            return teacher.new_zeros(())
        student = torch.cat([self.student["head"](t[:, prefix:][m]) for t, m in zip(student_tokens, masks)])  # [M, K]
        return self._cross_entropy(targets[masks], student).mean()

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        for teacher, student in zip(self.teacher.parameters(), self.student.parameters()):
            teacher.mul_(momentum).add_(student.detach(), alpha=1 - momentum)

    def teacher_momentum(self, step: int, steps: int) -> float:
        """Cosine schedule from ``options.teacher_momentum`` at step 0 to 1 at the last step."""
        start = self.options.teacher_momentum
        return 1 - (1 - start) * (1 + math.cos(math.pi * step / max(1, steps - 1))) / 2
