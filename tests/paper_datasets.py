"""Tiny datasets written in the paper's own file formats, from toy-world pictures (shapes on backgrounds, with
their object masks). Where each layout comes from:

* Waterbirds (``waterbird_complete95_forest2water2/``): kohpangwei/group_DRO
  ``dataset_scripts/generate_waterbirds.py`` reads CUB's ``images.txt`` into a DataFrame indexed by ``img_id``
  with ``img_filename`` (``001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg``), adds ``y``
  (1 waterbird), ``split`` (0 train, 1 val, 2 test), ``place`` (1 water background) and ``place_filename``
  (``/o/ocean/00002153.jpg``), writes it with ``df.to_csv(ROOT/metadata.csv)`` (so the header is
  ``img_id,img_filename,y,split,place,place_filename``) and saves each picture at ``ROOT/img_filename``.
* ImageNet-Segmentation ``gtsegs_ijcv.mat``: a MATLAB v7.3 file, i.e. HDF5 after a 512-byte MATLAB header (the
  HDF5 user block). As read by hila-chefer/Transformer-Explainability ``data/imagenet.py``:
  ``f[f['/value/img'][i, 0]]`` is the image, transposed (2, 1, 0) to [H, W, 3]; ``f[f[f['/value/gt'][i, 0]][0, 0]]``
  is the mask, transposed (1, 0) to [H, W] (a cell inside a cell); ``len(f['/value/img'])`` is the image count,
  so both hold [N, 1] references. MATLAB writes the referenced data under ``/#refs#`` and tags every dataset
  with a ``MATLAB_class`` attribute.
* ImageNet ImageFolder: ``ROOT/<WordNet id>/<name>.JPEG``.
"""
from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from toyworld.generator import draw_factors, render
from toyworld.spurious import BACKGROUND_GROUPS, SHAPE_GROUPS

SPECIES = {0: "017.Cardinal", 1: "001.Black_footed_Albatross"}         # y 0 landbird, 1 waterbird (CUB folders)
PLACES = {0: "/b/bamboo_forest", 1: "/o/ocean"}
WATERBIRDS_HEADER = ["img_id", "img_filename", "y", "split", "place", "place_filename"]
MATLAB_HEADER = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
WORDNET_IDS = ("n01440764", "n02102040")                                 # tench, English springer


def toy_picture(y: int, place: int, seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [size, size, 3], object mask bool [size, size]): a shape of label group ``y`` on a background
    of group ``place`` (toyworld.spurious's toy Waterbirds)."""
    rng = np.random.default_rng(seed)
    factors = draw_factors(rng)
    factors["shape"] = SHAPE_GROUPS[y][int(rng.integers(len(SHAPE_GROUPS[y])))]
    factors["scene"] = BACKGROUND_GROUPS[place][int(rng.integers(len(BACKGROUND_GROUPS[place])))]
    return render(factors, size, rng)


def write_waterbirds(root: Path, per_group_and_split: int = 2, size: int = 64) -> Path:
    """``root/metadata.csv`` and ``root/<species>/<name>.jpg``: every (y, place) group in every split."""
    root.mkdir(parents=True, exist_ok=True)
    rows, img_id = [], 0
    for split in (0, 1, 2):
        for y in (0, 1):
            for place in (0, 1):
                for _ in range(per_group_and_split):
                    img_id += 1
                    species = SPECIES[y]
                    name = species.split(".", 1)[1].replace("footed", "Footed")
                    filename = f"{species}/{name}_{img_id:04d}_{100 + img_id}.jpg"
                    (root / species).mkdir(exist_ok=True)
                    Image.fromarray(toy_picture(y, place, seed=img_id, size=size)[0]).save(root / filename,
                                                                                           quality=95)
                    rows.append([img_id, filename, y, split, place, f"{PLACES[place]}/{img_id:08d}.jpg"])
    with open(root / "metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(WATERBIRDS_HEADER)
        writer.writerows(rows)
    return root


def write_gtsegs(path: Path, images: list[np.ndarray], masks: list[np.ndarray]) -> Path:
    """A MATLAB v7.3 file laid out as gtsegs_ijcv.mat: images uint8 [H, W, 3], masks [H, W] (nonzero = object)."""
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        value = f.create_group("value")
        value.attrs["MATLAB_class"] = np.bytes_("struct")
        image_refs = value.create_dataset("img", (len(images), 1), dtype=h5py.ref_dtype)
        mask_refs = value.create_dataset("gt", (len(images), 1), dtype=h5py.ref_dtype)
        for dataset in (image_refs, mask_refs):
            dataset.attrs["MATLAB_class"] = np.bytes_("cell")
        for i, (image, mask) in enumerate(zip(images, masks)):
            picture = refs.create_dataset(f"img{i}", data=np.ascontiguousarray(image.transpose(2, 1, 0)))
            picture.attrs["MATLAB_class"] = np.bytes_("uint8")
            image_refs[i, 0] = picture.ref
            truth = refs.create_dataset(f"gt{i}", data=np.ascontiguousarray(mask.astype(np.uint8).transpose(1, 0)))
            truth.attrs["MATLAB_class"] = np.bytes_("uint8")
            cell = refs.create_dataset(f"cell{i}", (1, 1), dtype=h5py.ref_dtype)
            cell.attrs["MATLAB_class"] = np.bytes_("cell")
            cell[0, 0] = truth.ref
            mask_refs[i, 0] = cell.ref
    with open(path, "r+b") as handle:                      # MATLAB's text header in the HDF5 user block
        handle.write(MATLAB_HEADER.ljust(116) + bytes(8) + b"\x00\x02IM")
    return path


def toy_segmentation_pairs(count: int, size: int = 64, width: int = 48) -> tuple[list, list]:
    """``count`` non-square (size × width) toy pictures and their object masks."""
    pairs = [toy_picture(k % 2, (k // 2) % 2, seed=1000 + k, size=size) for k in range(count)]
    return [image[:, :width].copy() for image, _ in pairs], [mask[:, :width].copy() for _, mask in pairs]


def write_image_folder(root: Path, per_class: int = 4, size: int = 64) -> Path:
    """``root/<WordNet id>/<name>.JPEG``, toy pictures."""
    for label, wordnet_id in enumerate(WORDNET_IDS):
        (root / wordnet_id).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            image = toy_picture(label, k % 2, seed=2000 + 10 * label + k, size=size)[0]
            Image.fromarray(image).save(root / wordnet_id / f"ILSVRC2012_val_{10 * label + k:08d}.JPEG")
    return root
