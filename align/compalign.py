"""CompAlign: one linear map per component into CLIP's image space.

``a_i(x) = c_i(x) W_i`` with ``W_i`` [d_model, d_clip]; the aligned representation is
``Σ_i a_i(x) + b`` (one shared bias ``b``), trained to point along CLIP's normalised image
embedding of the same image (see ``training``). Only labels and tensors are known here, no
architecture. Weights stay float32; maps are applied over chunks of components so that
memory holds one chunk's intermediate, not ``C`` of them.

Saved as ``DIR/aligner.safetensors`` (weights [C, d_model, d_clip], bias [d_clip]) plus
``DIR/aligner.json`` (model, level, component labels, CLIP model, training summary).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from decompose import ComponentLabel
from decompose.store import label_from_record, label_records

WEIGHTS_FILE = "aligner.safetensors"
METADATA_FILE = "aligner.json"
FORMAT_VERSION = 1


class AlignerMismatch(ValueError):
    """An aligner is used with components of another model, level or component list."""


def semi_orthogonal(count: int, rows: int, columns: int, generator: torch.Generator | None = None,
                    chunk: int = 16) -> torch.Tensor:
    """[count, rows, columns] random matrices with orthonormal columns (rows >= columns) or rows.

    Built ``chunk`` matrices at a time, so temporaries stay small next to the result.
    """
    out = torch.empty(count, rows, columns)
    for start in range(0, count, chunk):
        size = min(chunk, count - start)
        q, r = torch.linalg.qr(torch.randn(size, max(rows, columns), min(rows, columns), generator=generator))
        q *= torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # uniform (Haar) orientation
        out[start:start + size] = q if rows >= columns else q.transpose(-1, -2)
    return out


def check_component_source(aligner_model: str, aligner_level: str, aligner_keys: Sequence[str], model: str | None,
                           level: str | None, labels: Sequence[ComponentLabel] | None) -> None:
    """Raise ``AlignerMismatch`` unless the given model / level / labels (None: unchecked) are the aligner's."""
    for field, mine, theirs in (("model", aligner_model, model), ("level", aligner_level, level)):
        if theirs is not None and mine != theirs:
            raise AlignerMismatch(f"this aligner was trained on {field}={mine!r} components, not "
                                  f"{field}={theirs!r}; train one for these components with `vit-decompose align`")
    if labels is not None:
        keys = [label.key for label in labels]
        if keys != list(aligner_keys):
            extra = sorted(set(keys) - set(aligner_keys))[:3]
            absent = sorted(set(aligner_keys) - set(keys))[:3]
            raise AlignerMismatch(f"the components differ from the aligner's ({len(keys)} vs {len(aligner_keys)}; "
                                  f"not in aligner: {extra}, missing: {absent}); train an aligner for this "
                                  "decomposition")


class CompAlign(nn.Module):
    """Per-component linear maps into CLIP space.

    weights: [C, d_model, d_clip] float32 (``W_i``); bias: [d_clip]
    labels:  C ComponentLabels (the decomposition's order)
    model, level: what the components come from (checked when reused)
    clip:    ``{"identity": ..., "spec": {...}}`` of the CLIP model aligned to
    component_chunk: components per einsum (bounds the intermediate memory)
    """

    def __init__(self, labels: Sequence[ComponentLabel], d_model: int, d_clip: int, model: str = "",
                 level: str = "", clip: dict[str, Any] | None = None, component_chunk: int = 64,
                 generator: torch.Generator | None = None, weights: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None):
        """weights / bias: initial values (default: random semi-orthogonal maps, zero bias)."""
        super().__init__()
        self.labels = list(labels)
        self.model_name, self.level, self.clip = model, level, dict(clip or {})
        self.component_chunk = component_chunk
        self.training_summary: dict[str, Any] = {}
        if weights is None:
            weights = semi_orthogonal(len(self.labels), d_model, d_clip, generator)
        if tuple(weights.shape) != (len(self.labels), d_model, d_clip):
            raise ValueError(f"weights of shape {tuple(weights.shape)}, expected {(len(self.labels), d_model, d_clip)}")
        self.weights = nn.Parameter(weights.float())  # no copy when already float32
        self.bias = nn.Parameter(torch.zeros(d_clip) if bias is None else bias.float())

    @property
    def keys(self) -> list[str]:
        return [label.key for label in self.labels]

    @property
    def d_model(self) -> int:
        return self.weights.shape[1]

    @property
    def d_clip(self) -> int:
        return self.weights.shape[2]

    def _chunks(self) -> range:
        return range(0, len(self.labels), self.component_chunk)

    def map_components(self, components: torch.Tensor) -> torch.Tensor:
        """a_i = c_i W_i: components [C, B, d_model] (any float dtype) -> aligned [C, B, d_clip] (no bias)."""
        self._check_shape(components)
        return torch.cat([torch.einsum("cbd,cde->cbe", components[s:s + self.component_chunk].to(self.weights),
                                       self.weights[s:s + self.component_chunk]) for s in self._chunks()])

    def map_component(self, index: int, component: torch.Tensor) -> torch.Tensor:
        """a_i for one component: [B, d_model] -> [B, d_clip]."""
        return component.to(self.weights) @ self.weights[index]

    def forward(self, components: torch.Tensor) -> torch.Tensor:
        """Σ_i a_i + b: components [C, B, d_model] -> [B, d_clip] (never holds all C aligned rows)."""
        self._check_shape(components)
        total = self.bias.expand(components.shape[1], -1)
        for s in self._chunks():
            total = total + torch.einsum("cbd,cde->be", components[s:s + self.component_chunk].to(self.weights),
                                         self.weights[s:s + self.component_chunk])
        return total

    def orthogonality_penalty(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """[stop - start] ‖G_i − I‖²_F / m² with G_i the m×m Gram matrix of W_i's smaller side.

        m = min(d_model, d_clip): ``W_iᵀW_i`` when d_model >= d_clip, ``W_i W_iᵀ`` otherwise.
        """
        weights = self.weights[start:stop]                                       # [c, d_model, d_clip]
        if self.d_model >= self.d_clip:
            gram = weights.transpose(-1, -2) @ weights                           # [c, d_clip, d_clip]
        else:
            gram = weights @ weights.transpose(-1, -2)                           # [c, d_model, d_model]
        size = gram.shape[-1]
        identity = torch.eye(size, device=gram.device, dtype=gram.dtype)
        return (gram - identity).pow(2).sum((-1, -2)) / size**2

    @torch.no_grad()
    def orthogonality_deviation(self) -> torch.Tensor:
        """[C] each map's ‖G_i − I‖²_F / m² (0: norm-preserving on its smaller side)."""
        return torch.cat([self.orthogonality_penalty(s, s + self.component_chunk) for s in self._chunks()])

    def _check_shape(self, components: torch.Tensor) -> None:
        if components.dim() != 3 or components.shape[0] != len(self.labels) or components.shape[2] != self.d_model:
            raise AlignerMismatch(f"components of shape {tuple(components.shape)} do not fit this aligner "
                                  f"([C={len(self.labels)}, B, d_model={self.d_model}] expected)")

    # --- compatibility -------------------------------------------------------------------

    def check_matches(self, model: str | None = None, level: str | None = None,
                      labels: Sequence[ComponentLabel] | None = None) -> None:
        """Refuse (``AlignerMismatch``) components of another model, level or component list."""
        check_component_source(self.model_name, self.level, self.keys, model, level, labels)

    # --- files ---------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "model": self.model_name, "level": self.level,
                "d_model": self.d_model, "d_clip": self.d_clip, "clip": self.clip,
                "labels": label_records(self.labels),
                "training": self.training_summary}

    def save(self, directory: str | Path) -> Path:
        """Write ``aligner.safetensors`` + ``aligner.json`` into ``directory`` (atomically each)."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        weights_path = root / WEIGHTS_FILE
        temporary = weights_path.with_name(f".{WEIGHTS_FILE}.tmp-{os.getpid()}")
        save_file({"weights": self.weights.detach().float().cpu().contiguous(),
                   "bias": self.bias.detach().float().cpu().contiguous()}, str(temporary))
        os.replace(temporary, weights_path)
        metadata_path = root / METADATA_FILE
        temporary = metadata_path.with_name(f".{METADATA_FILE}.tmp-{os.getpid()}")
        temporary.write_text(json.dumps(self.metadata(), indent=1))
        os.replace(temporary, metadata_path)
        return root

    @classmethod
    def load(cls, directory: str | Path, model: str | None = None, level: str | None = None,
             labels: Sequence[ComponentLabel] | None = None, device: str | torch.device = "cpu") -> "CompAlign":
        """Read an aligner; with ``model`` / ``level`` / ``labels`` given, refuse a mismatch."""
        root = Path(directory)
        if not (root / METADATA_FILE).is_file() or not (root / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{root} is not an aligner folder ({METADATA_FILE} and {WEIGHTS_FILE} expected)")
        metadata = json.loads((root / METADATA_FILE).read_text())
        component_labels = [label_from_record(r) for r in metadata["labels"]]
        check_component_source(metadata["model"], metadata["level"], [l.key for l in component_labels],
                               model, level, labels)  # before reading the weights
        with safe_open(str(root / WEIGHTS_FILE), framework="pt", device=str(device)) as handle:
            weights, bias = handle.get_tensor("weights"), handle.get_tensor("bias")
        aligner = cls(component_labels, metadata["d_model"], metadata["d_clip"], metadata["model"],
                      metadata["level"], metadata["clip"], weights=weights, bias=bias)
        aligner.training_summary = metadata.get("training", {})
        return aligner
