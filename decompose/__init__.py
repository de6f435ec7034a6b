"""Exact decompositions of vision-transformer representations into component sums."""
from .decomposer import Decomposer, trace_and_decompose
from .decomposition import Decomposition
from .labels import ComponentLabel

__all__ = ["trace_and_decompose", "Decomposer", "Decomposition", "ComponentLabel"]
