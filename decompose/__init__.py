"""Exact decompositions of vision-transformer representations into component sums."""
from .dataset import decompose_dataset
from .decomposer import Decomposer, trace_and_decompose
from .decomposition import Decomposition
from .labels import ComponentLabel
from .store import DecompositionStore
from .sum_check import InexactSum, InexactSumError, InexactSumWarning

__all__ = ["trace_and_decompose", "Decomposer", "Decomposition", "ComponentLabel", "decompose_dataset",
           "DecompositionStore", "InexactSum", "InexactSumError", "InexactSumWarning"]
