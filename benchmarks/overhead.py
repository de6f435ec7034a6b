"""Time and peak memory of each decomposition level against a plain forward pass.

    python -m benchmarks.overhead                 # CPU table, batch 8
    python -m benchmarks.overhead --scaling       # + image size and depth scaling
    python -m benchmarks.overhead --models vit_small_patch16_224 --batch 32 --levels head

Everything is measured in one process on the same model and batch: warm-up, then the
median of ``--repeats`` runs. Times are medians with the plain forward and every level
interleaved in one process (fair under machine load). CPU peak memory is what one call adds to
the resident set's high-water mark (freed heap returned to the OS first, VmHWM reset), each in
a fresh child process; on CUDA, ``torch.cuda.max_memory_allocated`` and CUDA events.

glibc raises its mmap threshold (up to 32 MB) each time it frees a large block, after which
freed tensors stay in a fragmenting heap, so a resident peak depends on what ran before it: a
plain forward measured after a decomposer's planning shows about twice its peak in a fresh
process. ``--allocator fixed`` (default) pins the threshold in the memory children so that the
resident peak is the live peak of every call alike; ``--allocator default`` keeps glibc's
behaviour (then the forward runs once before it is measured, as the decomposer plans once).

Scores along directions are levels too: ``token@k8`` is level token with 8 shared random directions,
``token@aligner`` with per-component directions (a random CompAlign map per head and branch, one
text), e.g. ``--levels token@k1 token@k8 token@k64 token@aligner``; ``token@perimage`` one random direction per
image, ``token@aligner-perimage`` the CompAlign's maps with one text per image (``per_image_aligner_directions``).
``head@compiled`` runs level head as one recorded graph (``decomposer.compiled``; recording it is not timed), ``token@k8@compiled`` its scores.

Targets (docs/design.md §4, Cost): head ≤ 1.3× time and ≤ 1.5× memory of a plain forward;
token ≤ 3× time; scores along ≤ 8 shared directions at level token ≤ 1.5× time, an aligner's ≤ 3×.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue as queue_module
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


def _setup(name, batch, image_size, depth, device):
    warnings.simplefilter("ignore")
    sys.path.insert(0, ".")
    torch.manual_seed(0)
    model = _build(name, image_size, depth).to(device)
    size = image_size or model.pretrained_cfg["input_size"][-1]
    images = torch.randn(batch, 3, size, size, device=device)
    return model, images


def _runner(model, images, level):
    from decompose import trace_and_decompose

    if level == "forward":
        def run():
            with torch.no_grad():
                return model.forward_head(model.forward_features(images), pre_logits=True)
        return run
    decomposer = trace_and_decompose(model)
    level, *variants = level.split("@")
    compiled = "compiled" in variants
    scored = next((variant for variant in variants if variant != "compiled"), None)
    decomposer(images[:1], level=level)  # graph analysis for this input shape (cached, once per shape)
    directions = _directions(decomposer, images, level, scored) if scored else None
    if compiled:  # the decomposition recorded as one graph, its sum checked as the interpreter's
        graph = decomposer.compiled(level, images, directions=directions)
        return lambda: graph.decompose(images)
    if directions is None:
        return lambda: decomposer(images, level=level)
    decomposer(images[:1], level=level, directions=_of_first_image(directions))
    return lambda: decomposer(images, level=level, directions=directions)


def _directions(decomposer, images, level: str, scored: str):
    """``kN``: N shared random directions; ``perimage``: one random direction per image; ``aligner``: a random
    CompAlign's per-component directions (``aligner-perimage``: one text per image)."""
    from decompose.directions import per_image

    width = decomposer(images[:1], level="branch").representation[0].numel()
    generator = torch.Generator().manual_seed(0)
    if scored.startswith("k"):
        return torch.randn(int(scored[1:]), width, generator=generator).to(images)
    if scored == "perimage":
        return per_image(torch.randn(images.shape[0], width, generator=generator).to(images))
    if scored not in ("aligner", "aligner-perimage"):
        raise SystemExit(f"unknown scores variant {scored!r}: use @kN, @perimage, @aligner or @aligner-perimage")
    from align.compalign import CompAlign
    from align.parent_maps import aligner_directions, per_image_aligner_directions

    labels = decomposer(images[:1], level="head").labels
    aligner = CompAlign(labels, width, 512, generator=generator)
    if scored == "aligner-perimage":
        return per_image_aligner_directions(aligner, torch.randn(images.shape[0], 512, generator=generator))
    return aligner_directions(aligner, torch.randn(512, generator=generator))


def _of_first_image(directions):
    """The directions of the batch's first image (directions per image), else ``directions`` (a warm-up call)."""
    from decompose.directions import Directions

    if isinstance(directions, Directions) and directions.images is not None:
        return Directions(directions.table[:, :1], directions.row_of)
    return directions


def _timings(name, batch, levels, repeats, image_size, depth, device, queue):
    """Child process: median seconds per level, forward and levels interleaved (fair under load);
    on CUDA also each level's peak memory (``"peak"``: level -> bytes), measured in the same process."""
    model, images = _setup(name, batch, image_size, depth, device)
    runners = {level: _runner(model, images, level) for level in ("forward", *levels)}
    times = {level: [] for level in runners}
    for run in runners.values():
        run()  # warm-up
    for _ in range(repeats):
        for level, run in runners.items():
            times[level].append(_elapsed(run, device))
    result = {level: statistics.median(values) for level, values in times.items()}
    if device != "cpu":
        result["peak"] = {level: _cuda_peak(run) for level, run in runners.items()}
    queue.put(result)


def _cuda_peak(run) -> int:
    """Bytes one call adds to the CUDA allocator's high-water mark (model and plan excluded)."""
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return max(torch.cuda.max_memory_allocated() - baseline, 1)


def _elapsed(run, device) -> float:
    if device == "cpu":
        started = time.perf_counter()
        run()
        return time.perf_counter() - started
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000


def _peak_memory(name, batch, level, image_size, depth, device, allocator, queue):
    """Child process (CPU): peak bytes one call of ``level`` adds to the resident set (model and plan
    excluded)."""
    if allocator == "fixed":
        _fix_mmap_threshold()
    model, images = _setup(name, batch, image_size, depth, device)
    run = _runner(model, images, level)
    if allocator == "default" and level == "forward":
        run()  # the decomposer's runner has planned on one image: both have allocated and freed once
    _release_free_memory()
    baseline = _resident_bytes()
    _reset_peak()
    result = run()
    queue.put((max(_peak_resident_bytes() - baseline, 1), _output_bytes(result)))


def _output_bytes(result) -> int:
    """Bytes of what a call returns for the user: the scores [C, B, k] or the components [C, B, *D]
    (0 for a plain forward, whose output the forward's own peak holds)."""
    value = getattr(result, "values", None)
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def _fix_mmap_threshold() -> None:
    """Blocks above 128 kB are mmapped and returned to the OS when freed (no dynamic threshold)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _release_free_memory() -> None:
    """Give freed heap pages back to the OS so that the resident size measures live memory."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _reset_peak() -> None:
    try:  # Linux: writing 5 to clear_refs resets VmHWM to the current resident size
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def _resident_bytes() -> int:
    return _status_bytes("VmRSS:")


def _peak_resident_bytes() -> int:
    return _status_bytes("VmHWM:")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def _in_child(target, *args):
    """``target(*args, queue)`` in a fresh process; None when it dies without an answer (e.g. killed
    for memory: the row then says so instead of waiting forever)."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not process.is_alive() and queue.empty():
                print(f"  {target.__name__}{args[:3]}: the child process died (exit code {process.exitcode}; "
                      f"{'killed, likely out of memory' if process.exitcode == -9 else 'see its error above'})")
                return None
    process.join()
    return result


def table(models, batch, levels, repeats, device, image_size=None, depth=None, allocator="fixed") -> list[dict]:
    """One row per model; a level whose child process dies (out of memory) is reported as failed."""
    rows = []
    for name in models:
        times = _in_child(_timings, name, batch, levels, repeats, image_size, depth, device)
        if times is None:  # one level killed the interleaved run: time each level on its own
            times = {}
            for level in levels:
                alone = _in_child(_timings, name, batch, [level], repeats, image_size, depth, device) or {}
                times.setdefault("forward", alone.get("forward"))
                times[level] = alone.get(level)
        if device == "cpu":  # resident peaks need a fresh process per level
            measured = {level: _in_child(_peak_memory, name, batch, level, image_size, depth, device, allocator)
                        for level in ("forward", *levels)}
            memory = {level: None if found is None else found[0] for level, found in measured.items()}
            output = {level: None if found is None else found[1] for level, found in measured.items()}
        else:
            memory = times.pop("peak", None) or {}
            memory = {level: memory.get(level) for level in ("forward", *levels)}
            output = {level: None for level in levels}
        row = {"model": name, "batch": batch, "image_size": image_size, "depth": depth,
               "forward_s": times["forward"], "forward_peak_mb": _ratio(memory["forward"], 2**20),
               "images_per_s": _ratio(batch, times["forward"])}
        for level in levels:
            row[f"{level}_time_x"] = _ratio(times.get(level), times["forward"])
            row[f"{level}_memory_x"] = _ratio(memory[level], memory["forward"])
            row[f"{level}_images_per_s"] = _ratio(batch, times.get(level))
            row[f"{level}_peak_mb"] = _ratio(memory[level], 2**20)
            row[f"{level}_output_mb"] = _ratio(output[level], 2**20)
            beyond = None if memory[level] is None or output[level] is None else memory[level] - output[level]
            row[f"{level}_memory_x_beyond_output"] = _ratio(beyond, memory["forward"])
        rows.append(row)
        _print_row(row, levels)
    return rows


def _ratio(a, b):
    return None if a is None or b is None else a / b


def _print_row(row, levels):
    parts = [f"{row['model']:32s} b={row['batch']:<3d}"]
    if row["image_size"]:
        parts.append(f"img={row['image_size']}")
    if row["depth"]:
        parts.append(f"depth={row['depth']}")
    parts.append(f"fwd {row['forward_s'] * 1000:8.1f} ms {row['images_per_s']:7.1f} img/s "
                 + (f"{row['forward_peak_mb']:7.1f} MB" if row["forward_peak_mb"] is not None else "failed mem"))
    for level in levels:
        time_x, memory_x, peak, rate = (row[f"{level}_{key}"] for key in ("time_x", "memory_x", "peak_mb",
                                                                          "images_per_s"))
        parts.append(f"{level}: " + (f"{time_x:5.2f}x time ({rate:.1f} img/s)" if time_x is not None
                                     else "failed time") + " "
                     + (f"{memory_x:5.2f}x mem ({peak:.0f} MB)" if memory_x is not None else "failed mem")
                     + (f", output {row[f'{level}_output_mb']:.0f} MB: {row[f'{level}_memory_x_beyond_output']:.2f}x "
                        "beyond it" if row[f"{level}_output_mb"] else ""))
    print("  ".join(parts), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--levels", nargs="+", default=["branch", "head", "token"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scaling", action="store_true", help="time/memory vs image size and depth (ViT-S)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--allocator", choices=["fixed", "default"], default="fixed",
                        help="CPU memory: glibc mmap threshold fixed (live peak) or glibc's default (see above)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"allocator {args.allocator}")
    if args.device.startswith("cuda"):
        print(f"  {torch.cuda.get_device_name(args.device)}; TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, "
              f"TF32 cuDNN {torch.backends.cudnn.allow_tf32}")
    options = {"allocator": args.allocator}
    rows = table(args.models, args.batch, args.levels, args.repeats, args.device, **options)
    if args.scaling:
        print("\nscaling (vit_small_patch16_224): image size")
        for size in (112, 224, 448):
            rows += table(["vit_small_patch16_224"], args.batch, args.levels, args.repeats, args.device,
                          image_size=size, **options)
        print("\nscaling (vit_small_patch16_224): depth")
        for depth in (3, 6, 12):
            rows += table(["vit_small_patch16_224"], args.batch, args.levels, args.repeats, args.device,
                          depth=depth, **options)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
