"""Training CompAlign (the paper's objective) with a held-out split and early stopping.

    loss = mean_x (1 − cos(Σ_i a_i(x) + b, clip(x)))  +  λ · mean_i ‖G_i − I‖²_F / m²

``G_i`` is the Gram matrix of ``W_i``'s smaller side (see ``CompAlign.orthogonality_penalty``),
λ = 1 and Adam with lr 3e-4 by default (the paper's choices). After every epoch the loss on
the held-out images decides whether to stop; the best maps (lowest held-out loss) are kept.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .alignment_data import AlignmentData
from .compalign import CompAlign


@dataclass
class TrainingOptions:
    lr: float = 3e-4
    orthogonality_weight: float = 1.0  # λ
    max_epochs: int = 100
    patience: int = 5                   # epochs without held-out improvement before stopping
    min_improvement: float = 1e-5       # smaller held-out gains do not count as improvement
    component_chunk: int = 64           # components per einsum / Gram batch
    seed: int = 0
    device: str | None = None           # default: cuda when available
    progress: bool = True


@dataclass
class AlignmentReport:
    """heldout_cosine: mean cos(Σ a_i + b, clip(x)) on held-out images (best epoch);
    orthogonality_deviation: component key -> ‖G_i − I‖²_F / m²."""

    heldout_cosine: float
    heldout_loss: float
    epochs: int
    best_epoch: int
    seconds: float
    orthogonality_deviation: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-able, without the per-component deviations (those go to ``deviation_stats``)."""
        values = sorted(self.orthogonality_deviation.values())
        record = {k: v for k, v in asdict(self).items() if k != "orthogonality_deviation"}
        record["orthogonality_deviation"] = {"mean": sum(values) / max(len(values), 1),
                                             "max": values[-1] if values else 0.0}
        return record


def cosine_loss(aligner: CompAlign, components: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B] 1 − cos(Σ_i a_i + b, target) for components [C, B, d_model], targets [B, d_clip]."""
    predicted = aligner(components)
    return 1 - torch.nn.functional.cosine_similarity(predicted, targets.to(predicted), dim=-1)


def orthogonality_term(aligner: CompAlign) -> torch.Tensor:
    """mean_i ‖G_i − I‖²_F / m², over chunks of components (scalar, differentiable)."""
    chunk = aligner.component_chunk
    total = sum(aligner.orthogonality_penalty(s, s + chunk).sum() for s in range(0, len(aligner.labels), chunk))
    return total / len(aligner.labels)


def training_step_backward(aligner: CompAlign, components: torch.Tensor, targets: torch.Tensor,
                           orthogonality_weight: float) -> float:
    """Accumulate the gradient of the loss on one batch; returns the loss.

    The penalty is differentiated one chunk of components at a time, so only one chunk's Gram
    matrices [chunk, m, m] are alive at once (the gradient is the same as for the whole sum).
    """
    cosine = cosine_loss(aligner, components, targets).mean()
    cosine.backward()
    penalty = 0.0
    count, chunk = len(aligner.labels), aligner.component_chunk
    for start in range(0, count, chunk):
        part = aligner.orthogonality_penalty(start, start + chunk).sum() / count
        (orthogonality_weight * part).backward()
        penalty += float(part.detach())
    return float(cosine.detach()) + orthogonality_weight * penalty


@torch.no_grad()
def evaluate_alignment(aligner: CompAlign, data: AlignmentData, split: str = "heldout") -> dict[str, float]:
    """Mean cosine of Σ a_i + b with the CLIP target, and the loss, over ``split``."""
    device = aligner.weights.device
    cosine_sum, count = 0.0, 0
    for components, targets in data.batches(split):
        losses = cosine_loss(aligner, components.to(device), targets.to(device))
        cosine_sum += float((1 - losses).sum())
        count += len(losses)
    if count == 0:
        raise ValueError(f"no {split} images to evaluate on; use a larger heldout_fraction or more images")
    cosine = cosine_sum / count
    return {"cosine": cosine, "loss": 1 - cosine}


def _adam(parameters, lr: float) -> torch.optim.Adam:
    # fused Adam updates in place (no full-size temporaries): matters at ~400 × 1024 × 768 weights
    try:
        return torch.optim.Adam(parameters, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(parameters, lr=lr)


def train_compalign(data: AlignmentData, options: TrainingOptions | None = None, aligner: CompAlign | None = None,
                    clip: dict[str, Any] | None = None) -> tuple[CompAlign, AlignmentReport]:
    """Fit one map per component of ``data`` (a new ``CompAlign`` unless ``aligner`` is given).

    clip: ``{"identity": ..., "spec": ...}`` of the CLIP model whose embeddings are the targets
    Returns the aligner at its best held-out epoch and a report (also stored in
    ``aligner.training_summary`` and saved with it).
    """
    options = options or TrainingOptions()
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if aligner is None:
        aligner = CompAlign(data.labels, data.d_model, data.d_clip, model=data.model, level=data.level, clip=clip,
                            component_chunk=options.component_chunk,
                            generator=torch.Generator().manual_seed(options.seed))
    aligner = aligner.to(device)
    optimizer = _adam(aligner.parameters(), options.lr)
    started = time.perf_counter()
    best = {"loss": math.inf, "epoch": -1, "cosine": float("nan")}
    best_state = {k: v.detach().to("cpu", copy=True) for k, v in aligner.state_dict().items()}
    history: list[dict[str, float]] = []
    bar = tqdm(total=options.max_epochs, desc="compalign", unit="epoch", disable=not options.progress)
    epoch = 0
    for epoch in range(options.max_epochs):
        train_loss, batches = 0.0, 0
        for components, targets in data.batches("train", epoch=epoch):
            optimizer.zero_grad(set_to_none=True)
            loss = training_step_backward(aligner, components.to(device, non_blocking=True), targets.to(device),
                                          options.orthogonality_weight)
            optimizer.step()
            train_loss, batches = train_loss + loss, batches + 1
        heldout = evaluate_alignment(aligner, data, "heldout")
        with torch.no_grad():
            penalty = float(orthogonality_term(aligner))
        heldout_loss = heldout["loss"] + options.orthogonality_weight * penalty
        history.append({"epoch": epoch, "train_loss": train_loss / max(batches, 1), "heldout_loss": heldout_loss,
                        "heldout_cosine": heldout["cosine"], "orthogonality": penalty})
        bar.update(1)
        bar.set_postfix(heldout_cos=f"{heldout['cosine']:.4f}", ortho=f"{penalty:.2e}")
        if heldout_loss < best["loss"] - options.min_improvement:
            best = {"loss": heldout_loss, "epoch": epoch, "cosine": heldout["cosine"]}
            for key, value in aligner.state_dict().items():
                best_state[key].copy_(value)  # in place: one CPU copy of the maps, never two
        elif epoch - best["epoch"] >= options.patience:
            break
    bar.close()
    aligner.load_state_dict(best_state)
    deviation = aligner.orthogonality_deviation().cpu()
    report = AlignmentReport(heldout_cosine=best["cosine"], heldout_loss=best["loss"], epochs=epoch + 1,
                             best_epoch=best["epoch"], seconds=time.perf_counter() - started,
                             orthogonality_deviation=dict(zip(aligner.keys, deviation.tolist())),
                             history=history, data=data.summary())
    aligner.training_summary = dict(report.summary(), options={k: v for k, v in asdict(options).items()
                                                              if k not in ("progress",)})
    return aligner, report
