"""A DINO-style self-supervised objective for the toy world's ViT (the DINO / DINOv2 analogue).

Caron et al. 2021, scaled down: a student and a teacher (the student's exponential moving
average) each put a ViT's class token through a projection head (MLP, L2-normalised bottleneck,
weight-normalised prototypes); the teacher sees two global crops, the student those (and
``local_crops`` small ones), and the student's softmax over the prototypes is trained to match the
teacher's centred (``centering``), sharpened softmax of another view. No labels. Crops are random
resized crops drawn on the whole batch at once (``random_boxes``, ``crop``); each view is turned to
grey with probability ``grayscale_probability``, so that matching views needs more than their
colours, while colour stays a cue most pairs of views share. A global view's background is swapped
for another scene's texture with probability ``background_swap_probability`` (``swap_backgrounds``,
Ryali et al. 2021), so that two views of an image may share only the object; an object restyle
(``restyle_probability``, ``restyle_objects``) fills the object with one flat colour, so that they may
share only its outline. A contrastive term (``contrastive_weight``, MoCo v3's InfoNCE) has each student
global view's class token pick the teacher's of the image's other view among the batch's. DINOv2's
KoLeo term (``koleo_weight``) pushes the student's class tokens of a batch apart on the sphere; its iBOT
term (``ibot_weight``) has masked student patches predict the teacher's. The region term
(``region_weight``, I-JEPA-like) has the student's global class token, told where a small crop lies in
its view, predict the teacher's output of that crop.

The shipped target (``RECIPES["dino"]``: these defaults, 8000 steps, 2026-12-05) encodes 5 of 6 factors
(held-out probes colour 0.97, pattern 0.72, scene 1.00, position 1.00, size 1.00; shape 0.55, its gate
0.56). Restyles and the contrastive term lifted shape from 0.29; every variant measured on the way is in
``docs/toyworld-dino.md``.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn


class Centering(str, Enum):
    """How the teacher's outputs become targets (before sharpening's softmax)."""

    MOMENTUM = "momentum"     # DINO: subtract a moving average of the teacher's outputs
    SINKHORN = "sinkhorn"     # DINOv2: Sinkhorn-Knopp, each batch spread evenly over the prototypes

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class DinoOptions:
    """The objective's settings (the defaults are those of the shipped target)."""

    prototypes: int = 1024                # teacher / student output dimension
    hidden: int = 192                     # projection MLP width
    bottleneck: int = 64                  # L2-normalised width before the prototypes
    global_size: int = 64                 # pixels per side of a global crop
    global_scale: tuple[float, float] = (0.8, 1.0)   # fraction of the image's area (0.5-1 moved the object)
    local_crops: int = 0                  # the former recipe's 4 moved the object to anywhere
    local_size: int = 32
    local_scale: tuple[float, float] = (0.2, 0.5)
    grayscale_probability: float = 0.5
    flip_probability: float = 0.0         # chance a crop is mirrored left-right (0: left stays left)
    channel_permutation_probability: float = 0.0  # chance a view's RGB channels are shuffled (a hue change)
    blur_probability: float = 0.0         # chance a view is blurred (Gaussian, sigma uniform in blur_sigma pixels)
    blur_sigma: tuple[float, float] = (0.5, 2.0)
    background_swap_probability: float = 0.5  # chance a global view's background is swapped (``swap_backgrounds``)
    restyle_probability: float = 0.25    # chance a global view's object turns one flat colour (``restyle_objects``)
    contrastive_weight: float = 1.0      # MoCo v3's InfoNCE between the views' class tokens (0: off)
    contrastive_temperature: float = 0.2
    student_temperature: float = 0.1
    teacher_temperature: float = 0.04
    center_momentum: float = 0.9
    centering: Centering = Centering.SINKHORN
    sinkhorn_iterations: int = 3
    teacher_momentum: float = 0.98        # at the start; cosine schedule to 1 at the last step
    sincos_positions: bool = True         # start the backbone's patch position embeddings at 2-D sin-cos (MAE)
    koleo_weight: float = 0.1             # DINOv2's KoLeo term on the student's global class tokens (0: off)
    ibot_weight: float = 0.0              # DINOv2's iBOT masked-patch term (0: off)
    mask_probability: float = 0.5         # iBOT: chance a student global view has masked patches
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # iBOT: fraction of such a view's patches masked (uniform)
    region_weight: float = 1.0            # the region term: the student's global class token and a box predict
    region_crops: int = 4                 #   the teacher's output of that crop (I-JEPA-like; 0: off)
    region_size: int = 32
    region_scale: tuple[float, float] = (0.1, 0.3)


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


def sinkhorn_knopp(logits: torch.Tensor, temperature: float, iterations: int) -> torch.Tensor:
    """[N, K] targets of teacher logits [N, K]: softmax(logits / temperature) rescaled ``iterations``
    times so that each prototype gets 1/K of the batch's mass and each row sums to 1 (DINOv2)."""
    q = torch.exp((logits - logits.max()) / temperature).T.double()                       # [K, N]
    q /= q.sum()
    prototypes, rows = q.shape
    for _ in range(iterations):
        q /= q.sum(1, keepdim=True) * prototypes
        q /= q.sum(0, keepdim=True) * rows
    return (q * rows).T.to(logits.dtype)


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


def swap_backgrounds(images: torch.Tensor, masks: torch.Tensor, backgrounds: torch.Tensor, probability: float,
                     generator: torch.Generator) -> torch.Tensor:
    """images [B, 3, H, W] with, for each image with ``probability``, every pixel outside its object (masks
    [B, H, W] bool) taken from one of ``backgrounds`` [V, 3, H, W] (uniform; object-free scene textures):
    the background augmentation of Ryali et al. 2021, so that two views of an image may share only the object."""
    draws = torch.rand(images.shape[0], generator=generator)
    chosen = torch.randint(len(backgrounds), (images.shape[0],), generator=generator)
    inside = masks.unsqueeze(1).to(images.dtype)
    swapped = inside * images + (1 - inside) * backgrounds[chosen]
    return torch.where((draws < probability).view(-1, 1, 1, 1), swapped, images)


def restyle_objects(images: torch.Tensor, masks: torch.Tensor, probability: float,
                    generator: torch.Generator) -> torch.Tensor:
    """images [B, 3, H, W] in [0, 1] with, for each image with ``probability``, its object's pixels (masks
    [B, H, W] bool) set to one uniformly random colour: the silhouette stays, its colour and pattern go (as
    Stylized-ImageNet keeps shapes and changes textures)."""
    draws = torch.rand(images.shape[0], generator=generator)
    fill = torch.rand(images.shape[0], 3, 1, 1, generator=generator)
    inside = masks.unsqueeze(1).to(images.dtype)
    restyled = inside * fill + (1 - inside) * images
    return torch.where((draws < probability).view(-1, 1, 1, 1), restyled, images)


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """[] InfoNCE of queries [B, d] against keys [B, d] (row i's positive is key i, the other rows its
    negatives), on L2-normalised vectors."""
    logits = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T / temperature                 # [B, B]
    return F.cross_entropy(logits, torch.arange(len(queries)))


def random_blur(images: torch.Tensor, probability: float, sigma: tuple[float, float],
                generator: torch.Generator) -> torch.Tensor:
    """images [B, C, H, W] with each image blurred with ``probability`` by a Gaussian of standard deviation
    uniform in ``sigma`` (pixels; separable, kernel radius 3 sigma of the largest, reflected borders)."""
    batch, channels, height, width = images.shape
    draws = torch.rand(batch, 2, generator=generator)
    sigmas = sigma[0] + (sigma[1] - sigma[0]) * draws[:, 1]                             # [B]
    radius = math.ceil(3 * sigma[1])
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernels = torch.exp(-0.5 * (offsets / sigmas.view(-1, 1)) ** 2)
    kernels = kernels / kernels.sum(-1, keepdim=True)                                  # [B, 2r + 1]
    kernels = kernels.repeat_interleave(channels, 0)                                   # [B * C, 2r + 1]
    flat = images.reshape(1, batch * channels, height, width)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernels.view(-1, 1, 1, 2 * radius + 1),
                    groups=batch * channels)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernels.view(-1, 1, 2 * radius + 1, 1),
                    groups=batch * channels)
    chosen = (draws[:, 0] < probability).view(-1, 1, 1, 1)
    return torch.where(chosen, flat.view_as(images), images)


def random_crops(images: torch.Tensor, count: int, size: int, scale: tuple[float, float],
                 generator: torch.Generator, flip_probability: float = 0.5) -> list[torch.Tensor]:
    """``count`` random resized crops of every image: a list of [B, C, size, size].

    images: [B, C, H, W] float. Each crop covers ``scale`` of the area (uniform), aspect ratio
    log-uniform in [3/4, 4/3], lies inside the image, is flipped left-right with ``flip_probability``,
    and is resampled bilinearly (``random_boxes``, then ``crop``).
    """
    return crop(images, random_boxes(count, images.shape[0], scale, generator, flip_probability), size)


def random_boxes(count: int, batch: int, scale: tuple[float, float], generator: torch.Generator,
                 flip_probability: float = 0.5) -> torch.Tensor:
    """[count, B, 2, 3] affine maps from a crop's coordinates to its image's (``affine_grid``'s theta,
    both in [-1, 1]): a box of ``scale`` of the area, aspect log-uniform in [3/4, 4/3], inside the image,
    mirrored left-right (a negative x scale) with ``flip_probability``."""
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
    return theta


def crop(images: torch.Tensor, theta: torch.Tensor, size: int) -> list[torch.Tensor]:
    """images [B, C, H, W] resampled (bilinear) through each of the maps theta [count, B, 2, 3]:
    a list of ``count`` crops [B, C, size, size]."""
    batch, channels = images.shape[:2]
    grids = [F.affine_grid(view, [batch, channels, size, size], align_corners=False) for view in theta]
    return [F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
            for grid in grids]


def box_in_view(box: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """[..., 5] where a box lies in a view, both maps [..., 2, 3] as ``random_boxes`` draws them: the box's
    centre (x, y) and half-sides (width, height) in the view's coordinates ([-1, 1] spans the view), and
    +1 / -1: the box mirrored relative to the view or not."""
    scale_x, scale_y = view[..., 0, 0], view[..., 1, 1]                         # signed: a flip is negative
    return torch.stack([(box[..., 0, 2] - view[..., 0, 2]) / scale_x, (box[..., 1, 2] - view[..., 1, 2]) / scale_y,
                        (box[..., 0, 0] / scale_x).abs(), box[..., 1, 1] / scale_y,
                        torch.sign(box[..., 0, 0] * scale_x)], -1)


def random_patch_masks(views: int, batch: int, patches: int, probability: float, ratio: tuple[float, float],
                       generator: torch.Generator) -> torch.Tensor:
    """[views, batch, patches] bool: each image of each view masked with ``probability``, then a
    uniform fraction in ``ratio`` of its patches (rounded), chosen uniformly; the others unmasked."""
    draws = torch.rand(views, batch, 2, generator=generator)
    counts = torch.round((ratio[0] + (ratio[1] - ratio[0]) * draws[..., 1]) * patches)
    counts = torch.where(draws[..., 0] < probability, counts, 0.0)
    ranks = torch.rand(views, batch, patches, generator=generator).argsort(-1).argsort(-1)
    return ranks < counts.unsqueeze(-1)


@torch.no_grad()
def sincos_position_init(backbone: nn.Module) -> None:
    """Set a timm ViT's learnt position embeddings of its patches (``pos_embed`` [1, prefix + N, d], the
    prefix tokens' rows zeroed) to the fixed 2-D sin-cos embedding of its patch grid (MAE's initialisation;
    they stay trainable). timm's default (normal, std 0.02) is so small beside the patches' embeddings
    that the tiny ViT did not learn to read the object's position even when trained on it: 1000
    supervised steps left the probe at 0.35; from sin-cos 300 steps reach 0.97 (2026-12-05)."""
    from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

    embedding, grid = getattr(backbone, "pos_embed", None), tuple(backbone.patch_embed.grid_size)
    patches = grid[0] * grid[1]
    if embedding is None or embedding.ndim != 3 or embedding.shape[1] < patches:
        raise ValueError(f"sincos_positions needs a learnt pos_embed [1, prefix + {patches}, d] over the "
                         f"{grid} patch grid; {type(backbone).__name__} has "
                         f"{None if embedding is None else tuple(embedding.shape)}: set sincos_positions=False")
    prefix = embedding.shape[1] - patches
    embedding[:, :prefix] = 0
    embedding[0, prefix:] = build_sincos2d_pos_embed(list(grid), embedding.shape[-1]).to(embedding.dtype)


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
                 normalise: Callable[[torch.Tensor], torch.Tensor] = lambda images: images,
                 backgrounds: torch.Tensor | None = None):
        super().__init__()
        if options.background_swap_probability and backgrounds is None:
            raise ValueError("background_swap_probability needs backgrounds: object-free textures [V, 3, H, W] "
                             "in [0, 1] (toyworld.pools.background_textures)")
        self.options, self.normalise, self.backgrounds = options, normalise, backgrounds
        if options.sincos_positions:
            sincos_position_init(backbone)
        self.student = nn.ModuleDict({"backbone": backbone, "head": ProjectionHead(backbone.num_features, options)})
        if options.ibot_weight:
            self.student["mask_token"] = MaskToken(backbone.embed_dim)
        if options.region_weight:  # [B, d + 5] class token and box -> [B, d], read by the head
            width = backbone.num_features
            self.student["predictor"] = nn.Sequential(nn.Linear(width + 5, options.hidden), nn.GELU(),
                                                      nn.Linear(options.hidden, width))
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.register_buffer("center", torch.zeros(options.prototypes))
        self.register_buffer("patch_center", torch.zeros(options.prototypes))
        self.register_buffer("region_center", torch.zeros(options.prototypes))
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

    def views(self, images: torch.Tensor, generator: torch.Generator, masks: torch.Tensor | None = None
              ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(2 global views, ``local_crops`` local views) of images [B, 3, H, W] in [0, 1], normalised;
        masks [B, H, W] bool: the objects' pixels (needed for background swaps and object restyles only)."""
        global_views, local_views, _ = self._views(images, generator, masks)
        return global_views, local_views

    def _views(self, images: torch.Tensor, generator: torch.Generator, masks: torch.Tensor | None = None):
        """``views`` and the global views' boxes [2, B, 2, 3] (``random_boxes``)."""
        o = self.options
        boxes = random_boxes(2, images.shape[0], o.global_scale, generator, o.flip_probability)
        global_crops = [crop(self._swap_and_restyle(images, masks, generator), box[None], o.global_size)[0]
                        for box in boxes]
        crops = (global_crops,
                 random_crops(images, o.local_crops, o.local_size, o.local_scale, generator, o.flip_probability))
        global_views, local_views = ([self.normalise(self._recolour(c, generator)) for c in group] for group in crops)
        return global_views, local_views, boxes

    def _swap_and_restyle(self, images: torch.Tensor, masks: torch.Tensor | None, generator: torch.Generator
                          ) -> torch.Tensor:
        """images [B, 3, H, W] with backgrounds swapped and objects restyled as the options ask (each global
        view draws its own)."""
        o = self.options
        if (o.background_swap_probability or o.restyle_probability) and masks is None:
            raise ValueError("background swaps and object restyles need the objects' masks [B, H, W]")
        if o.background_swap_probability:
            images = swap_backgrounds(images, masks, self.backgrounds, o.background_swap_probability, generator)
        if o.restyle_probability:
            images = restyle_objects(images, masks, o.restyle_probability, generator)
        return images

    def _recolour(self, view: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        o = self.options
        if o.channel_permutation_probability:
            view = random_channel_permutation(view, o.channel_permutation_probability, generator)
        if o.blur_probability:
            view = random_blur(view, o.blur_probability, o.blur_sigma, generator)
        return random_grayscale(view, o.grayscale_probability, generator)

    def loss(self, images: torch.Tensor, generator: torch.Generator, masks: torch.Tensor | None = None
             ) -> torch.Tensor:
        """The training loss of one batch of images [B, 3, H, W] in [0, 1] (objects' ``masks`` [B, H, W]
        for background swaps and object restyles): ``terms`` weighted and summed."""
        o = self.options
        terms = self.terms(images, generator, masks)
        weights = {"dino": 1.0, "koleo": o.koleo_weight, "ibot": o.ibot_weight, "region": o.region_weight,
                   "contrastive": o.contrastive_weight}
        return sum(weights[name] * term for name, term in terms.items())

    def terms(self, images: torch.Tensor, generator: torch.Generator, masks: torch.Tensor | None = None
              ) -> dict[str, torch.Tensor]:
        """{"dino", and "koleo" / "ibot" / "region" / "contrastive" where their weight is not 0}: the unweighted
        terms of one batch of images [B, 3, H, W] in [0, 1] (objects' ``masks`` [B, H, W] for swaps and
        restyles); updates the centres (momentum centering)."""
        o = self.options
        global_views, local_views, global_boxes = self._views(images, generator, masks)
        patch_masks = self._patch_masks(images.shape[0], generator) if o.ibot_weight else [None, None]
        with torch.no_grad():
            teacher_tokens = [self.teacher["backbone"].forward_features(v) for v in global_views]  # each [B, T, d]
            teacher_features = [self.teacher["backbone"].forward_head(t) for t in teacher_tokens]  # each [B, d]
            teacher = torch.stack([self.teacher["head"](f) for f in teacher_features])          # [2, B, K]
            targets = self._targets(teacher, self.center)                                  # [2, B, K]
        student_tokens = [self._student_tokens(v, m) for v, m in zip(global_views, patch_masks)]  # each [B, T, d]
        backbone = self.student["backbone"]
        features = [backbone.forward_head(t) for t in student_tokens] + [backbone(v) for v in local_views]
        student = [self.student["head"](f) for f in features]                               # each [B, K]
        pairs = [self._cross_entropy(target, view).mean() for t, target in enumerate(targets)
                 for s, view in enumerate(student) if s != t]
        self._update_center(self.center, teacher.mean((0, 1)))
        terms = {"dino": torch.stack(pairs).mean()}
        if o.koleo_weight:
            terms["koleo"] = torch.stack([koleo(f) for f in features[:2]]).mean()
        if o.ibot_weight:
            terms["ibot"] = self._ibot(teacher_tokens, student_tokens, patch_masks)
        if o.region_weight:
            terms["region"] = self._region(images, torch.stack(features[:2]), global_boxes, generator)
        if o.contrastive_weight:  # each student global view against the teacher's other view
            terms["contrastive"] = (info_nce(features[0], teacher_features[1], o.contrastive_temperature)
                                    + info_nce(features[1], teacher_features[0], o.contrastive_temperature)) / 2
        return terms

    def _region(self, images: torch.Tensor, features: torch.Tensor, global_boxes: torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
        """The region term: for each student global view (class tokens ``features`` [2, B, d], boxes
        [2, B, 2, 3]) and each of ``region_crops`` random crops of the images (no colour changes), the
        predictor reads the class token and where the crop lies in the view (``box_in_view``); through
        the head it predicts the teacher's (centred, sharpened) output of the crop. A class token that
        does not say where the object is cannot tell which crops show it. Updates ``region_center``."""
        o = self.options
        boxes = random_boxes(o.region_crops, images.shape[0], o.region_scale, generator, o.flip_probability)
        with torch.no_grad():
            teacher = torch.stack([self.teacher["head"](self.teacher["backbone"](self.normalise(c)))
                                   for c in crop(images, boxes, o.region_size)])                # [R, B, K]
            targets = self._targets(teacher, self.region_center)
            self._update_center(self.region_center, teacher.mean((0, 1)))
        where = box_in_view(boxes.unsqueeze(0), global_boxes.unsqueeze(1))                       # [2, R, B, 5]
        tokens = features.unsqueeze(1).expand(-1, o.region_crops, -1, -1)                       # [2, R, B, d]
        predicted = self.student["head"](self.student["predictor"](torch.cat([tokens, where], -1)))
        return self._cross_entropy(targets.unsqueeze(0), predicted).mean()

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
        prefix = self.student["backbone"].num_prefix_tokens
        with torch.no_grad():
            teacher = torch.stack([self.teacher["head"](t[:, prefix:]) for t in teacher_tokens])   # [2, B, N, K]
            targets = self._targets(teacher[masks], self.patch_center) if masks.any() else None   # [M, K]
            self._update_center(self.patch_center, teacher.mean((0, 1, 2)))
        if targets is None:
            return teacher.new_zeros(())
        student = torch.cat([self.student["head"](t[:, prefix:][m]) for t, m in zip(student_tokens, masks)])  # [M, K]
        return self._cross_entropy(targets, student).mean()

    def _targets(self, teacher: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """[..., K] the teacher's sharpened targets of its logits [..., K] (``options.centering``)."""
        o = self.options
        if o.centering is Centering.SINKHORN:
            flat = teacher.reshape(-1, teacher.shape[-1])
            return sinkhorn_knopp(flat, o.teacher_temperature, o.sinkhorn_iterations).view_as(teacher)
        return F.softmax((teacher - center) / o.teacher_temperature, dim=-1)

    @torch.no_grad()
    def _update_center(self, center: torch.Tensor, mean: torch.Tensor) -> None:
        """Move ``center`` [K] towards the teacher's batch mean [K]; only momentum centering reads it."""
        if self.options.centering is Centering.MOMENTUM:
            center.mul_(self.options.center_momentum).add_(mean, alpha=1 - self.options.center_momentum)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        for teacher, student in zip(self.teacher.parameters(), self.student.parameters()):
            teacher.mul_(momentum).add_(student.detach(), alpha=1 - momentum)

    def teacher_momentum(self, step: int, steps: int) -> float:
        """Cosine schedule from ``options.teacher_momentum`` at step 0 to 1 at the last step."""
        start = self.options.teacher_momentum
        return 1 - (1 - start) * (1 + math.cos(math.pi * step / max(1, steps - 1))) / 2
