"""Planning time per stage: what a first call pays before any component is computed.

    python -m benchmarks.planning                                  # default models, all levels
    python -m benchmarks.planning --models davit_tiny --timeout 900
    python -m benchmarks.planning --models maxvit_tiny_tf_224 --levels token
    python -m benchmarks.planning --threads 1 --max-memory 10    # a call needing more fails fast

Each model runs in a fresh process at its timm default input size, random weights, batch 2.
Stages are timed by wrapping the planning functions ``Decomposer.plan`` calls (no change to the
code measured): trace, probe, roles (``plan_trunk``), relevance masks and compaction, early pooling,
and, on the first token-level call, the token key positions. ``first <level>`` is the whole first
call at that level (the first one includes the plan); ``then`` the second call (the plan cached).
A model that runs past ``--timeout`` shows the stage it was in as ``>N``; a call that fails (out of
memory, or past ``--max-memory`` GiB of address space) shows ``error`` and its message goes to stderr.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import queue as queue_module
import resource
import sys
import time
import warnings

DEFAULT_MODELS = ["vit_base_patch16_224", "swin_tiny_patch4_window7_224", "maxvit_tiny_tf_224",
                  "efficientformer_l1", "gcvit_xxtiny", "volo_d1_224", "davit_tiny"]
STAGES = ["trace", "probe", "roles", "relevance", "compaction", "pooling", "positions"]
LEVELS = ["branch", "head", "token"]

# name in decompose.decomposer -> the stage it is timed as
TIMED_FUNCTIONS = {"run_probe": "probe", "plan_trunk": "roles", "relevance_masks": "relevance",
                   "plan_compaction": "compaction", "early_pooling_for": "pooling"}


def _measure(name: str, batch: int, levels: list[str], threads: int, max_memory: float | None, cut: bool,
             events) -> None:
    """Child process: put ("start", stage), ("done", stage, seconds) and ("result", row) on ``events``."""
    if max_memory:  # an allocation past it raises (caught below) instead of swapping a shared host
        limit = int(max_memory * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    warnings.simplefilter("ignore")
    sys.path.insert(0, ".")
    import timm
    import torch

    import decompose.decomposer as decomposer_module

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    images = torch.randn(batch, *model.pretrained_cfg["input_size"])
    seconds: dict[str, float] = {}

    def timed(stage, function):
        def run(*args, **kwargs):
            events.put(("start", stage))
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                if stage != "probe" or "probe" not in seconds:  # the plan's probe, not the positions' one
                    seconds[stage] = seconds.get(stage, 0.0) + elapsed
                events.put(("done", stage, elapsed))
        return run

    for function, stage in TIMED_FUNCTIONS.items():
        setattr(decomposer_module, function, timed(stage, getattr(decomposer_module, function)))
    positions = decomposer_module.Decomposer.key_positions
    decomposer_module.Decomposer.key_positions = lambda self, plan: (
        timed("positions", positions)(self, plan) if plan.key_positions is None else positions(self, plan))
    events.put(("start", "trace"))
    decomposer = decomposer_module.trace_and_decompose(model, cut_nonlinear_trunk=cut)
    seconds["trace"] = decomposer.trace_seconds
    events.put(("done", "trace", decomposer.trace_seconds))
    for level in levels:
        for call in ("first", "then"):
            events.put(("start", f"{call} {level}"))
            started = time.perf_counter()
            try:
                dec = decomposer(images, level=level)
            except (RuntimeError, ValueError) as error:  # e.g. out of memory at one level: the rest still runs
                print(f"{name} {level}: {type(error).__name__}: {str(error)[:300]}", file=sys.stderr)
                seconds[f"{call} {level}"] = float("nan")
                events.put(("done", f"{call} {level}", float("nan")))
                break
            seconds[f"{call} {level}"] = time.perf_counter() - started
            events.put(("done", f"{call} {level}", seconds[f"{call} {level}"]))
            assert dec.relative_error() < 1e-3, (name, level, dec.relative_error())
    events.put(("result", seconds))


def measure(name: str, batch: int, levels: list[str], threads: int, timeout: float, max_memory: float | None = None,
            cut: bool = False) -> tuple[dict, list[str]]:
    """Stage -> seconds for ``name`` in a fresh process; and the stages it was in when it timed out."""
    context = mp.get_context("spawn")
    events = context.Queue()
    process = context.Process(target=_measure, args=(name, batch, levels, threads, max_memory, cut, events))
    started = time.perf_counter()
    process.start()
    seconds: dict[str, float] = {}
    running: list[tuple[str, float]] = []  # stages in progress (a call's plan stages nest in it)
    while True:
        try:
            event = events.get(timeout=1)
        except queue_module.Empty:
            if time.perf_counter() - started > timeout:
                process.kill()
                process.join()
                for stage, stage_start in running:
                    seconds[stage] = time.perf_counter() - stage_start
                return seconds, [stage for stage, _ in running] or ["setup"]
            if not process.is_alive() and events.empty():
                return seconds, [f"died (exit code {process.exitcode})"]
            continue
        if event[0] == "start":
            running.append((event[1], time.perf_counter()))
        elif event[0] == "done":
            running.pop()
            seconds[event[1]] = seconds.get(event[1], 0.0) + event[2]
        else:
            seconds = event[1]
            process.join()
            return seconds, []


def _cell(seconds: dict, key: str, unfinished: list[str]) -> str:
    if key not in seconds:
        return "-"
    if seconds[key] != seconds[key]:
        return "error"
    return f">{seconds[key]:.0f}" if key in unfinished else f"{seconds[key]:.1f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--levels", nargs="+", default=LEVELS, choices=LEVELS)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per model")
    parser.add_argument("--cut-nonlinear-trunk", action="store_true",
                        help="trace_and_decompose(model, cut_nonlinear_trunk=True) (Hiera's max-pooled shortcuts)")
    parser.add_argument("--max-memory", type=float, default=None, help="GiB of address space per model process")
    args = parser.parse_args(argv)
    columns = STAGES + [f"{call} {level}" for level in args.levels for call in ("first", "then")]
    print("| model | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|", flush=True)
    for name in args.models:
        seconds, unfinished = measure(name, args.batch, args.levels, args.threads, args.timeout, args.max_memory,
                                      args.cut_nonlinear_trunk)
        note = f" (stopped in {unfinished[-1]})" if unfinished else ""
        print(f"| {name}{note} | " + " | ".join(_cell(seconds, c, unfinished) for c in columns) + " |", flush=True)


if __name__ == "__main__":
    main()
