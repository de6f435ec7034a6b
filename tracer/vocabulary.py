"""The closed vocabularies every package shares: what a component is, and how finely births split.

Members are their strings (``ComponentKind.BIAS == "bias"``, ``f"{Level.HEAD}"`` is ``head``), so
labels stored as JSON and user code that compares with strings keep working.
"""
from __future__ import annotations

import enum


class Vocabulary(str, enum.Enum):
    """A closed vocabulary whose members compare, hash, format and serialise as their values."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class ComponentKind(Vocabulary):
    EMBEDDING = "embedding"   # the image through the linear stem (or everything before a cut)
    CONSTANT = "constant"     # class/register tokens, position embeddings: parameters added to the stream
    BIAS = "bias"             # an op's bias (or constant term) carried to the output
    ATTENTION = "attention"   # an attention branch, or one of its heads / source tokens
    BRANCH = "branch"         # any other residual branch: MLP, conv block, gate


class Level(Vocabulary):
    """How finely a birth is split: per residual branch, per attention head, per head and source token."""

    BRANCH = "branch"
    HEAD = "head"
    TOKEN = "token"
