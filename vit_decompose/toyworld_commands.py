"""``vit-decompose demo | toyworld train``: the whole pipeline on the toy world, and (re)training its models.

    vit-decompose demo --out DIR                       # DIR/report.html and DIR/metrics.json
    vit-decompose toyworld train                       # every model, into the package's weights folder
    vit-decompose toyworld train --out DIR --only deit --only clip --steps 2
"""
from __future__ import annotations

import argparse
import time

from toyworld.demo import DemoSettings, quick_settings, run_demo
from toyworld.models import WEIGHTS_DIR
from toyworld.training import RECIPES, train_models


def _command_demo(args) -> int:
    settings = quick_settings() if args.quick else DemoSettings()
    if args.models:
        settings.models = tuple(args.models.split(","))
    settings.threads, settings.weights = args.threads, args.weights
    run_demo(args.out, settings)
    return 0


def _command_train(args) -> int:
    out = args.out or WEIGHTS_DIR
    started, cpu_started = time.perf_counter(), time.process_time()
    train_models(out, only=args.only, steps=args.steps, eval_images=args.eval_images)
    print(f"wrote {out} in {time.perf_counter() - started:.0f} s wall time "
          f"({time.process_time() - cpu_started:.0f} s of CPU time)")
    return 0


def add_demo_command(subparsers) -> None:
    """Register ``demo``."""
    demo = subparsers.add_parser("demo", help="the whole pipeline on the toy world's shipped tiny models: "
                                 "DIR/report.html and DIR/metrics.json, checked against ground truth")
    demo.add_argument("--out", required=True, help="output folder (report.html, metrics.json)")
    demo.add_argument("--quick", action="store_true", help="a small sample (for tests; numbers are noisier)")
    demo.add_argument("--models", help="comma-separated subset of the toy targets (default: all)")
    demo.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    demo.add_argument("--weights", help="models trained by `vit-decompose toyworld train --out DIR` "
                      "(default: the shipped ones)")
    demo.set_defaults(run=_command_demo)


def add_toyworld_commands(subparsers) -> None:
    """Register ``toyworld train``."""
    toyworld = subparsers.add_parser("toyworld", help="the toy world's models (train)")
    commands = toyworld.add_subparsers(dest="toyworld_command", required=True)
    train = commands.add_parser("train", help="train the toy-world targets and CLIP with fixed seeds",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--out", help="output folder (default: the package's toyworld/weights)")
    train.add_argument("--only", action="append", choices=sorted(RECIPES), metavar="NAME",
                       help=f"train only this model (repeatable; one of {', '.join(RECIPES)}); "
                            "the others' entries in an existing models.json are kept")
    train.add_argument("--steps", type=int, help="override every recipe's step count; the training images shrink "
                       "to what those steps read (smoke tests)")
    train.add_argument("--eval-images", type=int, help="override every recipe's held-out image count")
    train.set_defaults(run=_command_train)
