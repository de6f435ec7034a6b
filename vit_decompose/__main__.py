"""``python -m vit_decompose``: the ``vit-decompose`` command line."""
import sys

from .cli import main

sys.exit(main())
