"""Labels of components: what each row of ``Decomposition.components`` is."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from tracer.vocabulary import ComponentKind


@dataclass(frozen=True)
class ComponentLabel:
    """One component of a decomposition.

    name:  module or parameter path (``blocks.3.attn``, ``pos_embed``, ``norm.bias``)
    kind:  a ``ComponentKind`` (equal to its string): ``embedding`` (the image through the linear
           stem), ``constant`` (class/register tokens, position embeddings), ``bias`` (an op's bias
           carried to the output), ``attention`` (an attention branch or one of its heads),
           ``branch`` (any other residual branch: MLP, conv block, gate)
    layer: index of the residual block the component joins (None outside blocks)
    head:  attention head index (level ``head`` and ``token``)
    token: source token (level ``token``)
    node:  fx node where the component is born
    position: level ``token``: the source token's ``(row, col)`` or the parameter that made it
    note:  what the component holds when its name does not say it (an ``embedding`` that holds
           everything before a nonlinear op cut by ``cut_nonlinear_trunk``)
    """

    name: str
    kind: ComponentKind
    layer: int | None = None
    head: int | None = None
    token: int | None = None
    node: str = ""
    position: tuple[int, int] | str | None = None
    note: str | None = None

    def __post_init__(self):
        if not isinstance(self.kind, ComponentKind):  # a string (a store's labels, a user's)
            object.__setattr__(self, "kind", ComponentKind(self.kind))

    @cached_property
    def key(self) -> str:
        """Unique, stable text key: ``blocks.3.attn.h5`` / ``blocks.3.attn.h5.t17`` (made once)."""
        key = self.name
        if self.head is not None:
            key += f".h{self.head}"
        if self.token is not None:
            key += f".t{self.token}"
        return key

    def __str__(self) -> str:
        return self.key
