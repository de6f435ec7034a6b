"""``vit-decompose`` command line: exact component decompositions of vision transformers, their CLIP
alignment and its applications, and the toy-world demo.

    vit-decompose trace | decompose                         a model's components; a folder into a store
    vit-decompose align | rank | describe                   CompAlign into CLIP space; properties; TextSpan
    vit-decompose retrieve | heatmap | segment | ablate | debias   the applications on a store
    vit-decompose report                                    an HTML report of what a model's components do
    vit-decompose attribute                                 components and positions towards a class, text or vector
    vit-decompose demo | toyworld train                     the toy world: the whole pipeline against ground truth
"""
from __future__ import annotations

import argparse
import sys

from decompose.models import ModelLoadError

from .ablation_commands import add_ablation_commands
from .align_commands import add_align_commands
from .attribute_command import add_attribute_command
from .decompose_commands import add_decompose_commands
from .heatmap_commands import add_heatmap_commands
from .report_command import add_report_command
from .retrieve_command import add_retrieve_command
from .toyworld_commands import add_demo_command, add_toyworld_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vit-decompose", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for add_commands in (add_demo_command, add_decompose_commands, add_align_commands, add_retrieve_command,
                         add_heatmap_commands, add_ablation_commands, add_report_command, add_attribute_command,
                         add_toyworld_commands):
        add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a refused input (unknown model, missing file, mismatched store or aligner, ...)
    prints ``vit-decompose: error: ...`` and returns 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ModelLoadError, ValueError, FileNotFoundError) as error:   # ClipLoadError, AlignerMismatch: ValueErrors
        print(f"vit-decompose: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
