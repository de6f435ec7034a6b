"""Procedural images with known, independent factors: the toy world's ground truth.

One object on a textured background scene. Every factor is drawn independently and
uniformly from its list, deterministically from ``(seed, index)``; the object's pixel mask
is returned with the image, and a caption names a random subset of the factors.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "ring")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20)}
PATTERNS = ("solid", "stripes", "dots", "checker")
SCENES = ("water", "grass", "sand", "sky")
POSITIONS = {"left": (0.5, 0.27), "right": (0.5, 0.73), "top": (0.27, 0.5), "bottom": (0.73, 0.5),
             "centre": (0.5, 0.5)}
SIZES = {"small": 0.16, "large": 0.27}
FACTORS = {"shape": SHAPES, "colour": tuple(COLOURS), "pattern": PATTERNS, "scene": SCENES,
           "position": tuple(POSITIONS), "size": tuple(SIZES)}
# the caption word for each scene
SCENE_WORDS = {"water": "water", "grass": "grass", "sand": "sand", "sky": "the sky"}


@dataclass
class ToyImage:
    """image [H, W, 3] uint8, mask [H, W] bool (the object's pixels), factors, caption; label: the
    object class (index into ``classes.OBJECT_CLASSES``) of an image drawn by class, else None."""

    image: np.ndarray
    mask: np.ndarray
    factors: dict[str, str]
    caption: str
    label: int | None = None


def draw_factors(rng: np.random.Generator) -> dict[str, str]:
    return {name: values[int(rng.integers(len(values)))] for name, values in FACTORS.items()}


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates as fractions of the side: rows [size, 1], cols [1, size] (float32)."""
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size
    return centres[:, None], centres[None, :]


def shape_mask(shape: str, size: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    """[size, size] bool: the shape with its centre and radius as fractions of the image side."""
    rows, cols = _grid(size)
    y, x = np.broadcast_arrays((rows - centre[0]) / radius, (cols - centre[1]) / radius)
    r, angle = np.hypot(x, y), np.arctan2(y, x)
    if shape == "circle":
        return r <= 1
    if shape == "square":
        return (np.abs(x) <= 0.85) & (np.abs(y) <= 0.85)
    if shape == "triangle":
        return (y <= 0.8) & (np.abs(x) <= (y + 0.9) / 1.7 * 0.95)  # apex up
    if shape == "star":
        return r <= 0.45 + 0.55 * np.abs(np.cos(2.5 * angle)) ** 3
    if shape == "cross":
        return ((np.abs(x) <= 0.3) & (np.abs(y) <= 1)) | ((np.abs(y) <= 0.3) & (np.abs(x) <= 1))
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= 1
    if shape == "hexagon":
        return (np.abs(y) <= 0.87) & (np.abs(y) * 0.577 + np.abs(x) <= 1)
    if shape == "ring":
        return (r <= 1) & (r >= 0.55)
    raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def pattern_mask(pattern: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """[size, size] bool: where the object shows its colour (elsewhere a darker shade)."""
    rows, cols = np.arange(size)[:, None], np.arange(size)[None, :]
    period = max(4, size // 8)
    phase = int(rng.integers(period))
    if pattern == "solid":
        return np.ones((size, size), bool)
    if pattern == "stripes":
        return ((rows + cols + phase) // (period // 2)) % 2 == 0
    if pattern == "dots":
        dy, dx = (rows + phase) % period - period / 2, (cols + phase) % period - period / 2
        return np.hypot(dy, dx) > period / 4
    if pattern == "checker":
        return ((rows + phase) // (period // 2) + (cols + phase) // (period // 2)) % 2 == 0
    raise ValueError(f"unknown pattern {pattern!r}; choose from {PATTERNS}")


SCENE_VARIANTS = 32


def scene(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """[size, size, 3] float32 textured background in [0, 255]: one of ``SCENE_VARIANTS`` textures."""
    return _scene_bank(name, size)[int(rng.integers(SCENE_VARIANTS))]


def scene_textures(size: int) -> np.ndarray:
    """[len(SCENES) * SCENE_VARIANTS, size, size, 3] float32 in [0, 255]: every object-free background."""
    return np.concatenate([_scene_bank(name, size) for name in SCENES])


@functools.lru_cache(maxsize=64)
def _scene_bank(name: str, size: int) -> np.ndarray:
    """[SCENE_VARIANTS, size, size, 3] textures of one scene (drawn once per size)."""
    if name not in SCENES:
        raise ValueError(f"unknown scene {name!r}; choose from {SCENES}")
    bank = np.stack([_texture(name, size, np.random.default_rng([SCENES.index(name), variant]))
                     for variant in range(SCENE_VARIANTS)])
    bank.flags.writeable = False
    return bank


def _texture(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """[size, size, 3] float32 textured background in [0, 255]."""
    rows, cols = (np.arange(size, dtype=np.float32)[:, None] / size,
                  np.arange(size, dtype=np.float32)[None, :] / size)
    noise = rng.standard_normal((size, size), dtype=np.float32)
    if name == "water":
        waves = np.sin(2 * np.pi * (6 * rows + 1.5 * np.sin(2 * np.pi * cols) + rng.random()))
        base, detail = np.array([30, 90, 160]), waves[..., None] * np.array([15, 25, 30])
    elif name == "grass":
        blades = np.sin(2 * np.pi * 16 * cols + 3 * noise)
        base, detail = np.array([60, 130, 40]), blades[..., None] * np.array([15, 30, 10])
    elif name == "sand":
        base, detail = np.array([205, 180, 130]), noise[..., None] * np.array([14, 12, 10])
    elif name == "sky":
        clouds = np.clip(np.sin(2 * np.pi * (2 * cols + rng.random())) * np.sin(2 * np.pi * (1.5 * rows)), 0, 1)
        base = np.array([120, 170, 235])
        detail = -rows[..., None] * np.array([40, 40, 20]) + clouds[..., None] * np.array([100, 70, 15])
    else:
        raise ValueError(f"unknown scene {name!r}; choose from {SCENES}")
    return np.clip(base.astype(np.float32) + detail, 0, 255).astype(np.float32)


CAPTION_TEMPLATES = (
    "a {size} {colour} {pattern} {shape} on {scene}",
    "a {shape}, {colour}, {position}, over {scene}",
    "{colour} {shape} in the {position}",
    "a {pattern} {shape} on {scene}",
    "a {size} {shape}",
    "a photo of a {colour} {shape} at the {position} with {scene} behind it",
    "{scene} with a {size} {pattern} {colour} {shape}",
    "a {colour} {pattern} object",
)


def caption(factors: dict[str, str], rng: np.random.Generator) -> str:
    words = dict(factors, scene=SCENE_WORDS[factors["scene"]],
                 pattern="plain" if factors["pattern"] == "solid" else
                 {"stripes": "striped", "dots": "dotted", "checker": "checkered"}[factors["pattern"]])
    return CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(**words)


def render(factors: dict[str, str], size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(image [size, size, 3] uint8, object mask [size, size] bool) for the given factors."""
    background = scene(factors["scene"], size, rng)
    jitter = rng.uniform(-0.04, 0.04, 2)
    centre = tuple(np.array(POSITIONS[factors["position"]]) + jitter)
    mask = shape_mask(factors["shape"], size, centre, SIZES[factors["size"]])
    colour = np.array(COLOURS[factors["colour"]], np.float32)
    lit = pattern_mask(factors["pattern"], size, rng)
    image = np.round(background).astype(np.uint8)
    image[mask & lit] = np.round(colour).astype(np.uint8)
    image[mask & ~lit] = np.round(colour * 0.45 + 20).astype(np.uint8)  # the pattern's darker shade
    return image, mask


def toy_image(seed: int, index: int, size: int = 64) -> ToyImage:
    """The ``index``-th image of the world ``seed`` (deterministic)."""
    rng = np.random.default_rng([seed, index])
    factors = draw_factors(rng)
    image, mask = render(factors, size, rng)
    return ToyImage(image, mask, factors, caption(factors, rng))
