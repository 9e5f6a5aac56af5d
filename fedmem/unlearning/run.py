"""The ``python -m fedmem.unlearn`` pipeline: check the request, run the methods, register
their models in the run's lineage, measure everything side by side, write the results."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fedmem.errors import InputError
from fedmem.unlearning import METHODS
from fedmem.unlearning.base import Request, Unlearned


def _model(req: Request, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    from fedmem.models.factory import experiment_model

    model = experiment_model(req.cfg, req.table.input_shape, req.table.num_classes)
    model.load_state_dict(state)
    return model.eval()


def _check(run: Any, clients: tuple[int, ...], methods: list[str]) -> None:
    fed = run.cfg.federation
    if not fed.enabled:
        raise InputError(f"RUN_DIR: {run.rd.path} has no federated run (federation.enabled=false)")
    bad = [c for c in clients if not 0 <= c < fed.num_clients]
    if bad:
        raise InputError(f"--client: {bad} out of range; allowed: 0..{fed.num_clients - 1}")
    again = sorted(set(clients) & set(fed.excluded_clients))
    if again:
        raise InputError(
            f"--client: {again} never trained in this run (federation.excluded_clients)"
        )
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"--method: unknown {unknown}; allowed: {', '.join(METHODS)}")


CONTINUE = ("ascent", "generator")  # methods that continue from the final global model


def _register(req: Request, res: Unlearned) -> str:
    from fedmem.runs.checkpoints import save_atomic
    from fedmem.runs.records import add_model, read_records

    name = f"federated-{res.method}-{req.tag}"
    checkpoint = f"checkpoints/{name}.pt"
    save_atomic({k: v.detach().cpu() for k, v in res.state.items()}, req.rd.path / checkpoint)
    base = read_records(req.rd.read_summary(), req.cfg)["federated"]
    rounds = req.cfg.train.rounds
    record = replace(
        base,
        name=name,
        checkpoint=checkpoint,
        rounds=rounds + res.rounds if res.method in CONTINUE else res.rounds,
        parent=f"federated@{rounds}" if res.method in CONTINUE else None,
        method=f"unlearn-{res.method}",
        details={"clients": list(req.clients), **res.details},
    )
    add_model(req.rd, record, {"rounds": record.rounds})
    return name


def warm_up() -> None:
    """Pay torch's one-time lazy imports before any method is timed: the first optimizer step
    of a process imports ``torch._dynamo`` (1-2 s here), which would land on whichever method
    happens to run first."""
    layer = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
    layer(torch.zeros(1, 1)).sum().backward()
    optimizer.step()


def forget_private_state(req: Request) -> list[str]:
    """Delete what the forgotten clients kept for themselves in the run (their state files:
    record-level DP accountant, plug-in state), as a client that leaves would; returns the
    removed folders (relative to the run)."""
    import shutil

    from fedmem.federation.client_state import client_dir

    removed = []
    for c in req.clients:
        folder = client_dir(req.rd.path / "client_state", c)
        if folder.exists():
            shutil.rmtree(folder)
            removed.append(str(folder.relative_to(req.rd.path)))
    return removed


def unlearn(
    run_dir: Path, clients: tuple[int, ...], methods: list[str], settings: dict, console: Console
) -> dict[str, Any]:
    from fedmem.privacy.audit.records import load_model, open_run
    from fedmem.reporting.report import render_report
    from fedmem.runs.rundir import json_safe
    from fedmem.unlearning.ascent import ascent
    from fedmem.unlearning.evaluate import measures
    from fedmem.unlearning.federaser import federaser
    from fedmem.unlearning.generator import generator
    from fedmem.unlearning.inference import forgotten_inference_for
    from fedmem.unlearning.retrain import retrain

    run = open_run(run_dir)
    _check(run, clients, methods)
    req = Request(run.rd, run.cfg, run.table, tuple(sorted(set(clients))))
    warm_up()
    console.print(f"retraining without client(s) {list(req.clients)} (the reference)")
    results = {"retrain": retrain(req, console)}
    for m in dict.fromkeys(methods):
        if m == "ascent":
            console.print("ascent: projected gradient ascent, then FedAvg without the client(s)")
            results[m] = ascent(req, console, settings.get("ascent"))
        elif m == "federaser":
            console.print("federaser: replaying the stored rounds with calibrated updates")
            results[m] = federaser(req, console, settings.get("federaser"))
        elif m == "generator":
            console.print("generator: the client's dummy-gradient generator submits its step")
            results[m] = generator(req, console, settings.get("generator"))
    retrained = _model(req, results["retrain"].state)
    original = load_model(run, "federated", torch.device("cpu"))
    seed = run.cfg.seed
    # LiRA and client-level inference on the forgotten clients: the audit's client shadows
    inference = forgotten_inference_for(run, req.clients, console)
    rows: dict[str, dict[str, Any]] = {
        "federated": {
            **measures(original, run.table, req.clients, retrained, seed),
            **inference.measure(original),
        }
    }
    for res in results.values():
        name = _register(req, res)
        model = _model(req, res.state)
        rows[name] = {
            **measures(model, run.table, req.clients, retrained, seed, original),
            **inference.measure(model),
            "wall_s": res.wall_s,
            "rounds": res.rounds,
            "speed_up": results["retrain"].wall_s / res.wall_s if res.wall_s > 0 else None,
            "storage_bytes": res.storage_bytes,
        }
    out = json_safe(
        {
            "clients": list(req.clients),
            "models": rows,
            "details": {m: r.details for m, r in results.items()},
            "inference": inference.details(),
        }
    )
    out["removed_client_state"] = forget_private_state(req)
    run.rd.write_json("unlearning.json", out)
    summary = run.rd.read_summary()
    summary.setdefault("unlearning", {})[req.tag] = rows
    run.rd.write_json("summary.json", json_safe(summary))
    render_report(run.rd.path)
    return out
