"""Ground-truth checks: does a component selection carry the factor it was scored for?

A linear probe reads a factor from the summed contributions of k components; the top-k
components for that factor should beat k random and k bottom-ranked ones.
"""
from __future__ import annotations

import torch


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor, classes: int, weight_decay: float = 1e-3, steps: int = 60) -> float:
    """Test accuracy of multinomial logistic regression fit on (train_x [N, D], train_y [N]).

    Features are standardised with the training statistics; L-BFGS on the full batch (float64).
    """
    mean, std = train_x.double().mean(0), train_x.double().std(0).clamp_min(1e-8)
    train = (train_x.double() - mean) / std
    test = (test_x.double() - mean) / std
    weight = torch.zeros(train.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(train @ weight + bias, train_y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(((test @ weight + bias).argmax(1) == test_y).double().mean())


def selection_probe(components: torch.Tensor, order: list[int], labels: torch.Tensor, train: torch.Tensor,
                    test: torch.Tensor, classes: int, k: int, draws: int = 5, seed: int = 0) -> dict[str, float]:
    """Probe accuracy from Σ of the top-k, k random and the bottom-k components of ``order``.

    components: [C, N, D] raw contributions; order: the eligible rows, most tied to the factor
    first (leave out constants: they carry nothing about any image); labels: [N] factor values;
    train/test: row indices
    """
    candidates = torch.tensor(order)

    def accuracy(rows: torch.Tensor) -> float:
        features = components[rows].sum(0).flatten(1)                                  # [N, D]
        return linear_probe_accuracy(features[train], labels[train], features[test], labels[test], classes)

    generator = torch.Generator().manual_seed(seed)
    random = [accuracy(candidates[torch.randperm(len(candidates), generator=generator)[:k]]) for _ in range(draws)]
    return {"k": k, "top_k": accuracy(candidates[:k]), "random_k": sum(random) / draws,
            "bottom_k": accuracy(candidates[-k:])}
