"""The ``vit-decompose`` command line (``python -m vit_decompose``): it sits on top of the library packages
(``tracer`` < ``decompose`` < ``align`` < ``toyworld``) and builds the parser in ``cli``."""
