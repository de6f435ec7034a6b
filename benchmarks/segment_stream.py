"""Zero-shot segmentation of many generated toy-world images, streamed through scores along directions.

    python -m benchmarks.segment_stream                       # 1000 images, the toy DeiT, batch 32
    python -m benchmarks.segment_stream --images 200 --target swin

A CompAlign is trained for the target on a first sample (head level, as the demo does). Then batches of
new images are generated one at a time; each image's token components are scored along its object's
text ("a red circle" less the mean scene text) through the aligner's maps
(``align.per_image_aligner_directions``: each image its own text, at the cost of one):
``decomposer(x, "token", directions=...)`` returns ``[C, b, 1]`` scores and never the component vectors. Heatmaps are summed per source position and scored against the object
masks batch by batch (``SegmentationTally``). Peak memory of the whole streamed run is compared with a
plain forward over the same batches, each in a fresh process (resident high-water mark, see
``benchmarks.overhead``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import torch


def _aligner(target: str, fit_images: int, seed: int):
    from align import TensorAlignmentData, TrainingOptions, train_compalign
    from decompose import trace_and_decompose
    from toyworld.experiments import decompose_batches
    from toyworld.models import load_target, load_toy_clip, toy_clip_preprocess
    from toyworld.sample import toy_sample

    clip = load_toy_clip()
    model = load_target(target)
    decomposer = trace_and_decompose(model)
    sample = toy_sample(seed, fit_images)
    dec, _ = decompose_batches(decomposer, sample.images, "head", 64)
    targets = torch.cat([clip.encode_images(toy_clip_preprocess(sample.images[s:s + 256]))
                         for s in range(0, len(sample), 256)])
    data = TensorAlignmentData(dec.components, targets, dec.labels, heldout_fraction=0.2, model=target, level="head")
    aligner, report = train_compalign(data, TrainingOptions(max_epochs=40, patience=5, lr=1e-3, progress=False))
    return model, decomposer, clip, aligner, report


def _batches(count: int, batch: int, seed: int):
    from toyworld.sample import toy_sample

    for start in range(0, count, batch):
        yield toy_sample(seed, min(batch, count - start), start=start)


def _stream(target, count, batch, seed, fit_images, queue):
    """Child process: train the aligner, then segment ``count`` images; peak bytes of the streamed part."""
    warnings.simplefilter("ignore")
    sys.path.insert(0, ".")
    from align import encode_descriptions, per_image_aligner_directions, token_heatmaps
    from align.segmentation import SegmentationTally
    from benchmarks.overhead import _peak_resident_bytes, _release_free_memory, _reset_peak, _resident_bytes
    from toyworld.demo import TEXT_TEMPLATES
    from toyworld.experiments import object_directions
    from toyworld.models import target_preprocess

    torch.manual_seed(seed)
    model, decomposer, clip, aligner, report = _aligner(target, fit_images, seed)
    tally = SegmentationTally()
    first = next(_batches(batch, batch, seed + 1))
    decomposer(target_preprocess(first.images[:1]), level="token")  # plan and key positions, once
    _release_free_memory()
    baseline = _resident_bytes()
    _reset_peak()
    started = time.perf_counter()
    for sample in _batches(count, batch, seed + 1):
        rows = torch.arange(len(sample))
        wanted = object_directions(lambda texts: encode_descriptions(clip, texts, TEXT_TEMPLATES), sample, rows)
        dec = decomposer(target_preprocess(sample.images), level="token",
                         directions=per_image_aligner_directions(aligner, wanted))       # [C, b, 1]
        tally.add(token_heatmaps(dec.scores[..., 0].float(), dec.labels, tuple(sample.images.shape[-2:])),
                  sample.masks)
    seconds = time.perf_counter() - started
    peak = _peak_resident_bytes() - baseline
    queue.put({"scores": tally.scores().__dict__, "seconds": seconds, "peak_bytes": peak,
               "aligner_heldout_cosine": getattr(report, "heldout_cosine", None)})


def _forward(target, count, batch, seed, queue):
    """Child process: the same batches through the plain model; peak bytes and seconds."""
    warnings.simplefilter("ignore")
    sys.path.insert(0, ".")
    from benchmarks.overhead import _peak_resident_bytes, _release_free_memory, _reset_peak, _resident_bytes
    from toyworld.models import load_target, target_preprocess

    model = load_target(target)
    first = next(_batches(batch, batch, seed + 1))
    with torch.no_grad():
        model(target_preprocess(first.images))
    _release_free_memory()
    baseline = _resident_bytes()
    _reset_peak()
    started = time.perf_counter()
    with torch.no_grad():
        for sample in _batches(count, batch, seed + 1):
            model(target_preprocess(sample.images))
    queue.put({"seconds": time.perf_counter() - started, "peak_bytes": _peak_resident_bytes() - baseline})


def main(argv=None):
    from benchmarks.overhead import _fix_mmap_threshold, _in_child

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--target", default="deit", help="a toy-world target (toyworld.models.TARGET_NAMES)")
    parser.add_argument("--fit-images", type=int, default=512, help="images the aligner is trained on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    _fix_mmap_threshold()
    forward = _in_child(_forward, args.target, args.images, args.batch, args.seed)
    stream = _in_child(_stream, args.target, args.images, args.batch, args.seed, args.fit_images)
    if forward is None or stream is None:
        raise SystemExit("a child process died (see above)")
    scores = stream["scores"]
    print(f"{args.images} toy-world images, target {args.target}, batch {args.batch}, torch threads "
          f"{torch.get_num_threads()}")
    print(f"segmentation: pixel accuracy {scores['pixel_accuracy']:.3f}, foreground IoU {scores['foreground_iou']:.3f}, "
          f"mIoU {scores['mean_iou']:.3f}, mAP {scores['mean_average_precision']:.3f}")
    print(f"streamed token scores: {stream['seconds']:.1f} s, peak {stream['peak_bytes'] / 2**20:.1f} MB; "
          f"plain forward: {forward['seconds']:.1f} s, peak {forward['peak_bytes'] / 2**20:.1f} MB; "
          f"ratio time {stream['seconds'] / forward['seconds']:.2f}x, memory "
          f"{stream['peak_bytes'] / max(forward['peak_bytes'], 1):.2f}x")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "stream": stream, "forward": forward}, handle, indent=2)


if __name__ == "__main__":
    main()
