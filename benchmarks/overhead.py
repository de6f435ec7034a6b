"""Time and peak memory of each decomposition level against a plain forward pass.

    python -m benchmarks.overhead                 # CPU table, batch 8
    python -m benchmarks.overhead --scaling       # + image size and depth scaling
    python -m benchmarks.overhead --models vit_small_patch16_224 --batch 32 --levels head

Everything is measured in one process on the same model and batch: warm-up, then the
median of ``--repeats`` runs. CPU peak memory is the high-water mark of the process's
resident set (``tracemalloc`` does not see torch's allocator), read in a fresh child process
per measurement so runs do not hide each other; on CUDA, ``torch.cuda.max_memory_allocated``
and CUDA events. Targets (DESIGN §4 / the cost issue): head ≤ 1.3× time and ≤ 1.5× memory
of a plain forward; token ≤ 3× time.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
import warnings

import torch

DEFAULT_MODELS = ["vit_small_patch16_224", "vit_base_patch16_224", "swin_tiny_patch4_window7_224",
                  "maxvit_tiny_tf_224"]


def _build(name: str, image_size: int | None, depth: int | None):
    import timm

    kwargs = {}
    if image_size:
        kwargs["img_size"] = image_size
    if depth:
        kwargs["depth"] = depth
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _measure(name, batch, level, repeats, image_size, depth, device, queue):
    """Runs in a child process: (median seconds, peak bytes over baseline) for one task."""
    warnings.simplefilter("ignore")
    sys.path.insert(0, ".")
    from decompose import trace_and_decompose

    torch.manual_seed(0)
    model = _build(name, image_size, depth).to(device)
    size = image_size or model.pretrained_cfg["input_size"][-1]
    images = torch.randn(batch, 3, size, size, device=device)
    if level == "forward":
        def run():
            with torch.no_grad():
                return model.forward_head(model.forward_features(images), pre_logits=True)
    else:
        decomposer = trace_and_decompose(model)
        decomposer(images[:1], level=level)  # trace analysis for this input shape (cached)

        def run():
            return decomposer(images, level=level)
    baseline = _resident_bytes() if device == "cpu" else torch.cuda.memory_allocated()
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    run()  # warm-up (counted in the peak: freed memory may stay resident)
    times = []
    for _ in range(repeats):
        if device == "cpu":
            started = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - started)
        else:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        del out
    if device == "cpu":
        peak = _peak_resident_bytes() - baseline
    else:
        peak = torch.cuda.max_memory_allocated() - baseline
    queue.put((statistics.median(times), max(peak, 1)))


def _resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(name, batch, level, repeats=3, image_size=None, depth=None, device="cpu"):
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(name, batch, level, repeats, image_size, depth, device, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def table(models, batch, levels, repeats, device, image_size=None, depth=None) -> list[dict]:
    rows = []
    for name in models:
        forward_time, forward_peak = measure(name, batch, "forward", repeats, image_size, depth, device)
        row = {"model": name, "batch": batch, "image_size": image_size, "depth": depth,
               "forward_s": forward_time, "forward_peak_mb": forward_peak / 2**20,
               "images_per_s": batch / forward_time}
        for level in levels:
            seconds, peak = measure(name, batch, level, repeats, image_size, depth, device)
            row[f"{level}_time_x"] = seconds / forward_time
            row[f"{level}_memory_x"] = peak / forward_peak
            row[f"{level}_images_per_s"] = batch / seconds
            row[f"{level}_peak_mb"] = peak / 2**20
        rows.append(row)
        _print_row(row, levels)
    return rows


def _print_row(row, levels):
    parts = [f"{row['model']:32s} b={row['batch']:<3d}"]
    if row["image_size"]:
        parts.append(f"img={row['image_size']}")
    if row["depth"]:
        parts.append(f"depth={row['depth']}")
    parts.append(f"fwd {row['forward_s'] * 1000:8.1f} ms {row['forward_peak_mb']:7.1f} MB")
    for level in levels:
        parts.append(f"{level}: {row[f'{level}_time_x']:5.2f}x time {row[f'{level}_memory_x']:5.2f}x mem "
                     f"({row[f'{level}_peak_mb']:.0f} MB)")
    print("  ".join(parts), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--levels", nargs="+", default=["branch", "head", "token"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scaling", action="store_true", help="time/memory vs image size and depth (ViT-S)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    rows = table(args.models, args.batch, args.levels, args.repeats, args.device)
    if args.scaling:
        print("\nscaling (vit_small_patch16_224): image size")
        for size in (112, 224, 448):
            rows += table(["vit_small_patch16_224"], args.batch, args.levels, args.repeats, args.device, image_size=size)
        print("\nscaling (vit_small_patch16_224): depth")
        for depth in (3, 6, 12):
            rows += table(["vit_small_patch16_224"], args.batch, args.levels, args.repeats, args.device, depth=depth)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
