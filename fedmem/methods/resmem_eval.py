"""ResMem on a finished run: the central model and the federated global model, each with and
without its residual memory (:mod:`fedmem.methods.resmem`), written to ``resmem.json``.

- Central: one memory over every training row (observed labels, noise included).
- Federated: a memory per client over its own rows, kept on the client (personalized
  prediction), and a global memory over all rows as the option a federation could only build
  by pooling residuals. Client-local test accuracy weights the per-class test accuracy by the
  client's label mix: ``sum_c pi_k(c) acc_k(c)``, with ``pi_k`` the share of class c among the
  client's examples (true labels: the test set is clean) and ``acc_k`` the accuracy of the
  predictor the client uses (the global model, or the global model with the client's memory).

Per model: test accuracy, clean training accuracy, and the accuracy of mislabeled training
examples on their *given* label (ResMem stores those residuals, so it should reproduce them:
the noise is memorized on purpose).

The privacy cost of the memory, where the run keeps the records (:func:`privacy_cost`):
loss-threshold membership inference (Yeom et al. 2018) on the audit pool and canary exposure
(Carlini et al. 2019) of the model alone vs the model with the (central or global) memory. Both
need no shadow models; the prediction's probability of the label is clamped to
``[1e-6, 1]`` (ResMem's output is not a distribution). LiRA / RMIA and the one-run bound
through ``python -m fedmem.audit`` would need shadows with memories of their own: not done.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

import numpy as np
import torch

from fedmem.data.table import AUDIT_POOL
from fedmem.methods.resmem import ResidualMemory, ResMemModel, ResMemSettings, predict
from fedmem.privacy.audit import attacks
from fedmem.privacy.audit.records import AuditedRun, load_model
from fedmem.privacy.audit.scoring import canary_exposure
from fedmem.privacy.audit.target import canary_rows


def class_accuracy(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Accuracy per class (num_classes,); NaN for a class without examples."""
    hit = (pred == y).float()
    n = torch.bincount(y, minlength=num_classes).float()
    acc = torch.bincount(y, weights=hit, minlength=num_classes) / n
    return torch.where(n > 0, acc, torch.full_like(acc, float("nan")))


def mixed_accuracy(acc: torch.Tensor, mix: torch.Tensor) -> float:
    """``sum_c mix(c) acc(c)`` over the classes the test set has."""
    ok = ~torch.isnan(acc)
    return float((mix[ok] * acc[ok]).sum() / mix[ok].sum())


def _rates(p_base: torch.Tensor, p_mem: torch.Tensor, y: torch.Tensor) -> dict[str, float | None]:
    if len(y) == 0:
        return {"base": None, "resmem": None}
    return {
        "base": float((p_base.argmax(1) == y).float().mean()),
        "resmem": float((p_mem.argmax(1) == y).float().mean()),
    }


def evaluate(
    run: AuditedRun, s: ResMemSettings | None = None, register: bool = False
) -> dict[str, Any]:
    """ResMem for every trained model of ``run``; also written to ``resmem.json``.

    ``register``: also keep each model with its (central / global) memory as a derived model
    of the run, ``<name>-resmem`` (:class:`~fedmem.methods.resmem.ResMemModel` in
    ``checkpoints/<name>-resmem.pt``, a lineage record with ``method="resmem"``), which
    ``python -m fedmem.audit`` then attacks like any other model.
    """
    s = s or ResMemSettings()
    table = run.table
    device = torch.device("cpu")
    x, y = table.x, table.y_obs
    clean, noisy = table.is_clean, table.is_noisy
    out: dict[str, Any] = {"settings": asdict(s), "runs": {}}
    for name in [n for n in run.runs if run.records[n].method is None]:
        model = load_model(run, name, device)
        memory = ResidualMemory.build(model, x, y, s)
        base_t, mem_t = predict(model, table.x_test, memory, s)
        base_tr, mem_tr = predict(model, x, memory, s)
        res: dict[str, Any] = {
            "memory": len(memory),
            "test_acc": _rates(base_t, mem_t, table.y_test),
            "train_acc_clean": _rates(base_tr[clean], mem_tr[clean], y[clean]),
            "noisy_memorized": _rates(base_tr[noisy], mem_tr[noisy], y[noisy]),
        }
        if run.records[name].trainer == "federated":
            res["client_local"] = _client_local(run, model, base_t, s)
        cost = privacy_cost(run, model, memory, s)
        if cost:
            res["privacy"] = cost
        out["runs"][name] = res
        if register:
            res["derived_model"] = _register(run, name, ResMemModel(model, memory, s), res)
    run.rd.write_json("resmem.json", out)
    return out


def _client_local(
    run: AuditedRun, model: torch.nn.Module, base_test: torch.Tensor, s: ResMemSettings
) -> dict[str, Any]:
    table = run.table
    c = table.num_classes
    base_acc = class_accuracy(base_test.argmax(1), table.y_test, c)
    per: dict[str, dict[str, float | int]] = {}
    for k in range(table.num_clients):
        rows = table.client_rows(k)
        if len(rows) == 0:
            continue
        mix = torch.bincount(table.y_true[rows], minlength=c).float() / len(rows)
        memory = ResidualMemory.build(model, table.x[rows], table.y_obs[rows], s)
        _, mem_test = predict(model, table.x_test, memory, s)
        per[str(k)] = {
            "memory": len(memory),
            "base": mixed_accuracy(base_acc, mix),
            "resmem": mixed_accuracy(class_accuracy(mem_test.argmax(1), table.y_test, c), mix),
        }
    vals = list(per.values())
    return {
        "base_mean": sum(v["base"] for v in vals) / len(vals),
        "resmem_mean": sum(v["resmem"] for v in vals) / len(vals),
        "per_client": per,
    }


def _label_loss(probs: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """-log p(y), with p clamped to [1e-6, 1] (ResMem's output may leave [0, 1])."""
    p = probs.gather(1, y.long()[:, None]).squeeze(1).clamp(1e-6, 1.0)
    return (-p.log()).numpy().astype(np.float64)


def privacy_cost(
    run: AuditedRun, model: torch.nn.Module, memory: ResidualMemory, s: ResMemSettings
) -> dict[str, Any]:
    """Loss-threshold membership AUC / TPR at 1% FPR on the audit pool, and mean canary
    exposure, of the model alone (``base``) and with ``memory`` (``resmem``)."""
    table = run.table
    out: dict[str, Any] = {}
    pool = table.audit_kind == AUDIT_POOL
    if bool(pool.any()):
        x, y, member = table.audit_x[pool], table.audit_y[pool], table.audit_member[pool]
        base, mem = predict(model, x, memory, s)
        out["membership_loss"] = {
            k: attacks.attack_summary(-_label_loss(p, y), member.numpy())
            for k, p in (("base", base), ("resmem", mem))
        }
    if bool((table.canary_id >= 0).any()) and len(table.canary_ref_y):
        rows, copies, holders = canary_rows(table)
        can = predict(model, table.x[rows], memory, s)
        ref = predict(model, table.canary_ref_x, memory, s)
        out["exposure_mean"] = {
            k: canary_exposure(
                _label_loss(can[i], table.y_obs[rows]),
                _label_loss(ref[i], table.canary_ref_y),
                copies,
                holders,
            )["by_group"]["all"]["mean"]
            for i, k in ((0, "base"), (1, "resmem"))
        }
    return out


def _register(run: AuditedRun, name: str, model: ResMemModel, res: dict[str, Any]) -> str:
    """Save ``model`` and add it to the run's lineage as ``<name>-resmem``."""
    from fedmem.runs.checkpoints import save_atomic
    from fedmem.runs.records import add_model

    base = run.records[name]
    derived = f"{name}-resmem"
    checkpoint = f"checkpoints/{derived}.pt"
    save_atomic({k: v.cpu() for k, v in model.state_dict().items()}, run.rd.path / checkpoint)
    record = replace(
        base,
        name=derived,
        checkpoint=checkpoint,
        parent=f"{name}@{base.rounds}",
        method="resmem",
        details=asdict(model.settings),
    )
    metrics = {
        "rounds": base.rounds,
        "test_acc": res["test_acc"]["resmem"],
        "train_acc_clean": res["train_acc_clean"]["resmem"],
        "noisy_memorized": res["noisy_memorized"]["resmem"],
    }
    add_model(run.rd, record, metrics)
    return derived
