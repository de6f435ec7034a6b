"""``vit-decompose toyworld train``: (re)train the toy-world models and write their weights.

    vit-decompose toyworld train                       # every model, into the package's weights folder
    vit-decompose toyworld train --out DIR --only deit --only clip --steps 2

``add_toyworld_commands(subparsers)`` registers the command on an argparse subparsers object.
"""
from __future__ import annotations

import argparse
import time


def _command_train(args) -> int:
    from .models import WEIGHTS_DIR
    from .training import train_models

    out = args.out or WEIGHTS_DIR
    started, cpu_started = time.perf_counter(), time.process_time()
    train_models(out, only=args.only, steps=args.steps, eval_images=args.eval_images)
    print(f"wrote {out} in {time.perf_counter() - started:.0f} s wall time "
          f"({time.process_time() - cpu_started:.0f} s of CPU time)")
    return 0


def add_toyworld_commands(subparsers) -> None:
    """Add ``toyworld train`` to an argparse subparsers object (sets ``run``)."""
    from .training import RECIPES

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
