"""Example-tied dropout (Maini, Mozer, Sedghi, Lipton, Kolter, Zhang 2023, "Can Neural Network
Memorization Be Localized?", ICML, Sec. 5) and its baselines, as a ReLU that masks its units.

A layer's units (MLP features, CNN channels) are split: the first ``p_gen`` share are
*generalization* units, always on; each remaining *memorization* unit is on for an example
with probability ``p_mem``, in a subset fixed per example for the whole training. Examples
then share the generalization units and each memorizes in its own units; at evaluation the
memorization units can be dropped:

- ``drop`` mode: memorization units off, generalization units scaled by
  ``(p_gen + p_mem) / p_gen`` (the authors' code, ``models/dropout.py``; it keeps the expected
  activation sum only when ``p_mem`` is read as a share of the whole layer, while their
  training masks keep each memorization unit with probability ``p_mem``: we follow the code);
- ``all`` mode: every unit on, memorization units scaled by ``p_mem`` (their expected value in
  training; the authors' commented-out "test" mode).

The subset is a function of ``(layer, key, unit)`` through an integer hash (``seed`` 0: the
same subsets in every run of an architecture), so no mask tensor is stored (the reference code
keeps a dense (examples x units) tensor) and every client
derives the same subset for an example: the key is the example's global table row
(``example``), or its client (``client``: *client-tied* dropout, ours, a candidate forgetting
mechanism: dropping one client's units). Baselines (the paper's Table 3): ``standard`` dropout
at the same expected keep share ``p_gen + p_mem (1 - p_gen)``, masks redrawn every step from
``(seed, layer, row, step)`` (inverted scaling, identity at evaluation), and ``fixed``: one
sparse network of that size for every example (the same hashed subset for all keys).

The keys of a training batch are set on the modules by
:class:`fedmem.methods.tied_dropout.TiedDropoutPlugin` before each forward pass; a tied
module in training mode without keys raises. The module replaces the ReLU in place, so
parameter names (and state dicts) are those of the plain model.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Mode = Literal["drop", "all"]
_M32 = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (Wellons' "lowbias32") of int64 tensors holding values < 2^32;
    products wrap modulo 2^64, whose low 32 bits are the 32-bit products."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def unit_uniforms(seed: int, layer: int, keys: torch.Tensor, units: int) -> torch.Tensor:
    """(len(keys), units) numbers in [0, 1), a fixed function of ``(seed, layer, key, unit)``."""
    base = hash32(torch.tensor(seed, dtype=torch.int64) * 0x9E3779B1 + layer)
    k = hash32(base ^ hash32(keys.to(torch.int64).reshape(-1, 1)))
    u = torch.arange(units, dtype=torch.int64, device=keys.device).reshape(1, -1)
    return hash32(k ^ hash32(u + 0x632BE5AB)).to(torch.float64).div(2.0**32).float()


class TiedDropout(nn.Module):
    """ReLU followed by example-tied (or client-tied, standard, fixed) dropout on dim 1."""

    def __init__(self, kind: str, p_gen: float, p_mem: float, layer: int, seed: int = 0):
        super().__init__()
        self.kind, self.p_gen, self.p_mem, self.layer, self.seed = kind, p_gen, p_mem, layer, seed
        self.mode: Mode = "drop"
        self.keys: torch.Tensor | None = None  # per example of the batch (training only)
        self.step = 0  # standard dropout: a new mask every step
        self.drop_keys: torch.Tensor | None = None  # "all" mode: these keys' units stay off

    def extra_repr(self) -> str:
        return f"kind={self.kind}, p_gen={self.p_gen}, p_mem={self.p_mem}, layer={self.layer}"

    @property
    def keep_share(self) -> float:
        """Expected share of the layer's units on for a training example."""
        return self.p_gen + self.p_mem * (1.0 - self.p_gen)

    def memorization_mask(self, keys: torch.Tensor, width: int) -> torch.Tensor:
        """(len(keys), width) bool: the units on for each key in training (generalization
        units included)."""
        n_gen = int(self.p_gen * width)
        mask = unit_uniforms(self.seed, self.layer, keys, width) < self.p_mem
        mask[:, :n_gen] = True
        return mask

    def _masked(self, x: torch.Tensor, mask: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        shape = (*mask.shape, *([1] * (x.dim() - 2)))
        return x * mask.reshape(shape).to(x.dtype) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(x)
        width, n_gen = x.shape[1], int(self.p_gen * x.shape[1])
        if self.kind == "fixed":
            return self._masked(x, self.memorization_mask(torch.zeros(1, dtype=torch.int64), width))
        if self.kind == "standard":
            if not self.training:
                return x
            keys = self._keys(len(x)) * 1_000_003 + self.step
            mask = unit_uniforms(self.seed, self.layer, keys, width) < self.keep_share
            return self._masked(x, mask, 1.0 / self.keep_share)
        if self.training:
            return self._masked(x, self.memorization_mask(self._keys(len(x)), width))
        scale = torch.full((width,), self.p_mem, device=x.device, dtype=x.dtype)
        if self.mode == "drop":
            scale[:n_gen] = (self.p_gen + self.p_mem) / self.p_gen
            scale[n_gen:] = 0.0
        else:
            scale[:n_gen] = 1.0
            if self.drop_keys is not None and len(self.drop_keys):
                held = self.memorization_mask(self.drop_keys.to(x.device), width).any(0)
                held[:n_gen] = False
                scale[held] = 0.0
        return x * scale.reshape(1, width, *([1] * (x.dim() - 2)))

    def _keys(self, n: int) -> torch.Tensor:
        if self.keys is None or len(self.keys) != n:
            raise RuntimeError(
                f"TiedDropout ({self.kind}): training needs the batch's {n} example keys; "
                "train through fedmem.train.train_epochs with the tied_dropout plug-in"
            )
        return self.keys


def tied_modules(model: nn.Module) -> list[TiedDropout]:
    return [m for m in model.modules() if isinstance(m, TiedDropout)]


def set_mode(model: nn.Module, mode: Mode, drop_keys: torch.Tensor | None = None) -> None:
    """Evaluation mode of every tied module: ``drop`` or ``all`` (optionally with the
    memorization units of ``drop_keys``, e.g. one client, switched off)."""
    for m in tied_modules(model):
        m.mode, m.drop_keys = mode, drop_keys
