"""ResMem: explicit memory of the training residuals (Yang et al. 2023, "ResMem: Learn what
you can and memorize the rest", NeurIPS).

After training, every training example i is stored as a key, its embedding z_i (the input of
the model's last linear layer), and a value, its residual

    r_i = onehot(y_i) - softmax(f(x_i) / T).

A query x is predicted by the model plus a distance-weighted sum of its k nearest stored
residuals,

    p(x) = softmax(f(x) / T) + sum_{j in kNN(x)} w_j(x) r_j,   w(x) = softmax_j(-d_j / sigma),

with d_j the Euclidean distance of the embeddings (the paper's rule). The kNN-LM rule
(Khandelwal et al. 2020) is the alternative: ``lam * p_knn + (1 - lam) * softmax(f(x)/T)``
with ``p_knn`` the same weights on the neighbours' one-hot labels.

Choices that are ours, not the paper's: embeddings are L2-normalized (so one ``sigma`` fits
every model and width here), and the embedding is taken generically as the input of the
model's last ``nn.Linear`` (every architecture in :mod:`fedmem.models` ends in one).
The kNN is exact and vectorized: ``torch.cdist`` over chunks of queries and ``topk``
(:func:`knn`), which scales to the training sets here (tens of thousands of keys).

A stored training example is its own nearest neighbour (distance 0), so ResMem reproduces the
training labels it stores, mislabeled ones included: it memorizes the noise on purpose, which
:func:`fedmem.methods.resmem_eval.evaluate` reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ResMemSettings:
    """ResMem's knobs: neighbours, kernel width, temperature, prediction rule."""

    k: int = 10
    sigma: float = 0.1  # kernel width on L2-normalized embeddings
    temperature: float = 1.0
    rule: Literal["resmem", "knn_lm"] = "resmem"
    lam: float = 0.5  # kNN-LM interpolation weight
    chunk: int = 2048  # queries per cdist block
    batch_size: int = 4096

    def __post_init__(self) -> None:
        if self.k < 1 or self.sigma <= 0 or self.temperature <= 0 or not 0 <= self.lam <= 1:
            raise ValueError(f"ResMemSettings out of range: {self}")


def last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear: no embedding for ResMem")
    return linears[-1]


@torch.no_grad()
def embed_and_logits(
    model: nn.Module, x: torch.Tensor, batch_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L2-normalized embeddings, logits) of ``x``: the embedding is the input of the model's
    last linear layer, caught by a forward pre-hook (eval mode)."""
    head = last_linear(model)
    caught: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: caught.append(args[0].detach()))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    zs, outs = [], []
    try:
        for i in range(0, len(x), batch_size):
            outs.append(model(x[i : i + batch_size].to(device)).float().cpu())
            zs.append(caught.pop().flatten(1).float().cpu())
    finally:
        hook.remove()
        model.train(was_training)
    return F.normalize(torch.cat(zs), dim=1), torch.cat(outs)


def residuals(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """``onehot(y) - softmax(logits / T)`` (Yang et al. 2023, the stored values)."""
    onehot = F.one_hot(labels.long(), logits.shape[1]).float()
    return onehot - F.softmax(logits / temperature, dim=1)


def knn(
    queries: torch.Tensor, keys: torch.Tensor, k: int, chunk: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest keys of every query: (distances (m, k) ascending, indices (m, k))."""
    k = min(k, len(keys))
    dists, idxs = [], []
    for i in range(0, len(queries), chunk):
        d = torch.cdist(queries[i : i + chunk], keys)
        v, j = torch.topk(d, k, dim=1, largest=False)
        dists.append(v)
        idxs.append(j)
    return torch.cat(dists), torch.cat(idxs)


@dataclass(frozen=True)
class ResidualMemory:
    """The stored training examples: keys (n, d), residuals (n, C), labels (n,)."""

    keys: torch.Tensor
    values: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def build(
        cls, model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: ResMemSettings
    ) -> ResidualMemory:
        z, logits = embed_and_logits(model, x, s.batch_size)
        return cls(z, residuals(logits, y, s.temperature), y.long().cpu())

    def __len__(self) -> int:
        return len(self.keys)


def predict(
    model: nn.Module, x: torch.Tensor, memory: ResidualMemory, s: ResMemSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the model's ``softmax(f(x)/T)``, the ResMem or kNN-LM prediction) for ``x``."""
    z, logits = embed_and_logits(model, x, s.batch_size)
    base = F.softmax(logits / s.temperature, dim=1)
    d, idx = knn(z, memory.keys, s.k, s.chunk)
    w = F.softmax(-d / s.sigma, dim=1).unsqueeze(-1)  # (m, k, 1)
    if s.rule == "resmem":
        return base, base + (w * memory.values[idx]).sum(1)
    onehot = F.one_hot(memory.labels[idx], base.shape[1]).float()
    return base, s.lam * (w * onehot).sum(1) + (1 - s.lam) * base


class ResMemModel(nn.Module):
    """A trained model with its residual memory, as one module (a derived model of the run).

    ``forward`` returns ``log(max(p, 1e-6))`` of the ResMem (or kNN-LM) prediction ``p``, so
    the audit and every tool that reads logits can score it (softmax renormalizes ``p``, whose
    entries need not sum to one). The memory is kept as buffers, so the module's state dict is
    the base model's weights plus ``memory_keys`` / ``memory_values`` / ``memory_labels``.
    """

    def __init__(self, base: nn.Module, memory: ResidualMemory, settings: ResMemSettings):
        super().__init__()
        self.base = base
        self.settings = settings
        self.register_buffer("memory_keys", memory.keys)
        self.register_buffer("memory_values", memory.values)
        self.register_buffer("memory_labels", memory.labels)

    @property
    def memory(self) -> ResidualMemory:
        """The memory on the CPU, where :func:`predict` compares embeddings."""
        keys, values, labels = (
            t.cpu() for t in (self.memory_keys, self.memory_values, self.memory_labels)
        )
        return ResidualMemory(keys, values, labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, p = predict(self.base, x, self.memory, self.settings)
        return p.clamp_min(1e-6).log().to(x.device)

    @classmethod
    def from_state(
        cls, base: nn.Module, state: dict[str, torch.Tensor], settings: ResMemSettings
    ) -> ResMemModel:
        """Rebuild from a saved state dict (``base`` an untrained model of the architecture)."""
        memory = ResidualMemory(
            state["memory_keys"], state["memory_values"], state["memory_labels"]
        )
        model = cls(base, memory, settings)
        model.load_state_dict(state)
        return model
