"""The experimenter's view: evaluate a model on the whole ExampleTable and the test set.

:func:`fit_metrics` is a pure function of predictions and ground truth. It measures the
early-learning / memorization split of Liu et al. 2020 (ELR, Fig. 1) and Arpit et al. 2017:
on mislabeled examples, ``noisy_true_acc`` (predicting the true label: early learning) versus
``noisy_memorized`` (predicting the given wrong label: memorization).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fedmem.data.table import ExampleTable

Row = dict[str, Any]


def _share(mask: torch.Tensor, hit: torch.Tensor) -> float | None:
    """Mean of ``hit`` over ``mask``; None (JSON null) for an empty group."""
    count = int(mask.sum())
    return float(hit[mask].sum()) / count if count else None


def fit_metrics(pred: torch.Tensor, table: ExampleTable) -> dict[str, float | None]:
    """What the model fits on the training table, by example kind.

    - ``train_acc_clean``: accuracy on regular examples (clean label, typical input).
    - ``noisy_memorized``: share of mislabeled examples predicted as their *given wrong* label.
    - ``noisy_true_acc``: share of mislabeled examples predicted as their *true* label.
    - ``outlier_acc``: accuracy on atypical examples (their labels are correct).
    - ``canary_acc``: share of inserted canary copies predicted as their random label.
    - ``audit_canary_acc`` (only when the run has audit canaries): the same for the audit
      canaries drawn into training.
    - ``backdoor_fit`` (only with ``data.backdoor``): share of the poisoned rows predicted as
      the backdoor's target.
    """
    on_obs = pred == table.y_obs
    out: dict[str, float | None] = {
        "train_acc_clean": _share(table.is_clean, on_obs),
        "noisy_memorized": _share(table.is_noisy, on_obs),
        "noisy_true_acc": _share(table.is_noisy, pred == table.y_true),
        "outlier_acc": _share(table.is_outlier, on_obs),
        "canary_acc": _share(table.is_canary, on_obs),
    }
    audit_canary = table.is_audit_canary
    if bool(audit_canary.any()):
        out["audit_canary_acc"] = _share(audit_canary, on_obs)
    if bool(table.is_backdoor.any()):
        out["backdoor_fit"] = _share(table.is_backdoor, on_obs)
    return out


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits of ``model`` on ``x`` (eval mode, batched, on the model's device), on the CPU."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [model(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def evaluate_logits(
    model: nn.Module, table: ExampleTable, batch_size: int = 4096
) -> tuple[Row, torch.Tensor]:
    """Test accuracy and loss plus :func:`fit_metrics`, and the logits on the training table."""
    test_logits = predict(model, table.x_test, batch_size)
    train_logits = predict(model, table.x, batch_size)
    row = {
        "test_acc": float((test_logits.argmax(1) == table.y_test).float().mean()),
        "test_loss": float(F.cross_entropy(test_logits, table.y_test)),
        "train_loss": float(F.cross_entropy(train_logits, table.y_obs)),
        **fit_metrics(train_logits.argmax(1), table),
    }
    if len(table.backdoor_y_test):
        row["backdoor_asr"] = backdoor_success(model, table, batch_size)
    return row, train_logits


def backdoor_success(model: nn.Module, table: ExampleTable, batch_size: int = 4096) -> float:
    """Attack success rate: share of triggered test examples (true label not the target)
    predicted as the backdoor's target."""
    pred = predict(model, table.backdoor_x_test, batch_size).argmax(1)
    return float((pred == table.backdoor_target).float().mean())


def diverged(model: nn.Module, row: Row) -> bool:
    """Whether training has diverged: a non-finite weight, or a non-finite loss in ``row``."""
    losses = [v for k, v in row.items() if k.endswith("loss") and isinstance(v, float)]
    if not all(math.isfinite(v) for v in losses):
        return True
    return not all(bool(torch.isfinite(p).all()) for p in model.state_dict().values())


def stops_here(cfg: Any, row: Row) -> bool:
    """Whether a run ends after ``row``'s round: its model diverged and
    ``train.on_divergence`` is ``stop`` (``cfg``: an ExperimentConfig)."""
    return bool(row.get("diverged")) and cfg.train.on_divergence == "stop"


def evaluate(model: nn.Module, table: ExampleTable, batch_size: int = 4096) -> Row:
    """Test accuracy and loss plus :func:`fit_metrics` on the training table."""
    return evaluate_logits(model, table, batch_size)[0]


class Probe(Protocol):
    """Something measured after a round from the model and its training-table logits.

    Returns extra fields for the metrics row (or None). Probes keep their own results
    (per-example trajectories, gradient geometry) and write them at the end of a run.
    """

    def __call__(
        self, round_: int, model: nn.Module, train_logits: torch.Tensor
    ) -> dict[str, Any] | None: ...


class Observer:
    """Evaluates the model after every round and hands a metrics row to ``sink``.

    Keeps a CPU copy of the latest model's weights (``last_state``): the run's final model,
    saved as a checkpoint when the run ends.

    Rows: ``{"run", "round", <evaluate() fields>, <extra fields>, "wall_s"}``; ``wall_s`` is
    the time since :meth:`start`, evaluations included. A row whose model has diverged
    (:func:`diverged`: non-finite weights or loss) also has ``"diverged": True``; its
    non-finite numbers are written as null (:func:`fedmem.runs.rundir.json_safe`).
    """

    TIMING_FIELDS = ("wall_s",)

    def __init__(
        self,
        table: ExampleTable,
        run: str,
        sink: Callable[[Row], None],
        batch_size: int = 4096,
        probes: Sequence[Probe] = (),
    ):
        self.table, self.run, self.sink, self.batch_size = table, run, sink, batch_size
        self.probes = list(probes)
        self.rows: list[Row] = []
        self.last_state: dict[str, torch.Tensor] | None = None  # the latest model's weights
        self._t0 = time.perf_counter()

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def restore(self, rows: list[Row]) -> None:
        """Continue a resumed run whose rows so far are ``rows``: ``wall_s`` goes on from the
        last row's, and probes that keep results (``restore(round)``) reload them."""
        self.rows = list(rows)
        if not rows:
            return
        self._t0 = time.perf_counter() - float(rows[-1].get("wall_s") or 0.0)
        for probe in self.probes:
            restore = getattr(probe, "restore", None)
            if restore is not None:
                restore(int(rows[-1]["round"]))

    def __call__(self, round_: int, model: nn.Module, **extra: Any) -> Row:
        metrics, train_logits = evaluate_logits(model, self.table, self.batch_size)
        row = {"run": self.run, "round": round_, **metrics, **extra}
        for probe in self.probes:
            row.update(probe(round_, model, train_logits) or {})
        if diverged(model, row):
            row["diverged"] = True
        row["wall_s"] = round(time.perf_counter() - self._t0, 4)
        self.last_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        self.rows.append(row)
        self.sink(row)
        return row
