"""Unlearning: remove a client's contribution from a finished federated run, and judge how well
it was forgotten against retraining without it (``python -m fedmem.unlearn``).

One method, one file, each returning an :class:`~fedmem.unlearning.base.Unlearned` global
model with what it cost:

- :mod:`~fedmem.unlearning.retrain`: FedAvg from the same initialization without the client,
  the same rounds and the remaining clients' same sampling (``federation.excluded_clients``):
  the gold standard every other method is judged against;
- :mod:`~fedmem.unlearning.ascent`: projected gradient ascent on the client's data around the
  model of the other clients, then a few FedAvg rounds without it (Halimi et al. 2022);
- :mod:`~fedmem.unlearning.federaser`: replay the stored rounds without the client, each
  remaining client's stored update calibrated by a short local training (Liu et al. 2021);
- :mod:`~fedmem.unlearning.generator`: the client's own dummy-gradient generator, trained
  during the run, submits one step that makes its data look unseen ("Learn to Forget", Liu
  et al. 2020).

:mod:`~fedmem.unlearning.evaluate` measures every model side by side (forgetting, utility,
distance to the retrained model, cost).
"""

from __future__ import annotations

METHODS = ("retrain", "ascent", "federaser", "generator")
