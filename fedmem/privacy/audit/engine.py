"""The whole audit of a run: shadow training for both recipes, every target model, caching
by config hash and attack settings, plots, ``audit.json`` and the summary / report update."""

from __future__ import annotations

import json
import time
from typing import Any

import torch
from rich.console import Console

from fedmem import config as config_mod
from fedmem.config import ExperimentConfig
from fedmem.ensemble import SIMULATED_PLUGINS
from fedmem.models.factory import resolve_device
from fedmem.privacy.audit.data import ShadowData, client_shadow_data, shadow_data
from fedmem.privacy.audit.records import AuditedRun, check_auditable, load_model
from fedmem.privacy.audit.report import headline
from fedmem.privacy.audit.shadows import (
    ShadowModels,
    shadow_masks,
    train_central_shadows,
    train_fedavg_shadows,
)
from fedmem.privacy.audit.target import audit_model
from fedmem.progress import counting_bar
from fedmem.runs.records import deviations, shadow_recipe
from fedmem.runs.rundir import json_safe
from fedmem.seeding import derive_seed

ATTACK_TITLES = {
    "loss": "loss threshold (Yeom 2018)",
    "lira_online": "LiRA online (Carlini 2022)",
    "lira_offline": "LiRA offline (Carlini 2022)",
    "rmia": "RMIA offline (Zarifzadeh 2024)",
}


def _attack_settings(cfg: ExperimentConfig) -> dict[str, Any]:
    return config_mod.to_dict(cfg)["audit"]["attack"]


def cached_audit(run: AuditedRun) -> dict[str, Any] | None:
    """``audit.json`` when it was made for this config and these attack settings."""
    path = run.rd.path / "audit.json"
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    same = old.get("config_hash") == config_mod.config_hash(run.cfg)
    return old if same and old.get("attack_settings") == _attack_settings(run.cfg) else None


def _train(
    cfg: ExperimentConfig,
    recipe: str,
    data: ShadowData,
    masks: torch.Tensor,
    seed: int,
    num_classes: int,
    label: str,
    console: Console,
) -> ShadowModels:
    """Shadows with ``recipe``'s training on the rows ``masks`` (K, rows) of ``data``."""
    device = resolve_device(cfg.train.device)
    x, y = data.x.to(device), data.y.to(device)
    with counting_bar(console, label) as progress:
        task = progress.add_task("", total=None)

        def tick(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        if recipe == "central":
            return train_central_shadows(
                cfg, x, y, masks, seed=seed, progress=tick, num_classes=num_classes
            )
        return train_fedavg_shadows(
            cfg, x, y, data.client, masks, seed=seed, progress=tick, num_classes=num_classes
        )


def train_shadows(
    run: AuditedRun, recipe: str, console: Console
) -> tuple[ShadowModels, torch.Tensor]:
    """Record-level shadows: ``audit.attack.shadows`` models with ``recipe``'s training, each
    on every non-candidate row plus half the candidates; and their candidate masks (K, M)."""
    cfg, table = run.cfg, run.table
    seed = derive_seed(cfg.seed, "audit", "shadows", recipe)
    cand = shadow_masks(len(table.audit_y), cfg.audit.attack.shadows, seed)
    data = shadow_data(table)
    sh = _train(
        cfg,
        recipe,
        data,
        data.row_masks(cand),
        seed,
        table.num_classes,
        f"shadows ({recipe})",
        console,
    )
    return sh, cand


def train_client_shadows(
    run: AuditedRun, recipe: str, console: Console
) -> tuple[ShadowModels, ShadowData, torch.Tensor]:
    """Client-level shadows: ``audit.attack.client_shadows`` models, each on all rows of a
    random half of the clients (training and held-out clients alike, each client in exactly
    half the shadows), with ``recipe``'s training (FedAvg over ``num_clients + heldout``
    clients, of which a shadow's excluded ones hold no rows).

    Returns the shadows, their rows and the client masks (K, num_clients + heldout).
    """
    cfg, table = run.cfg, run.table
    n_all = table.num_clients + table.num_heldout_clients
    seed = derive_seed(cfg.seed, "audit", "client-shadows", recipe)
    clients = shadow_masks(n_all, cfg.audit.attack.client_shadows, seed)
    data = client_shadow_data(table)
    fed = cfg.federation.model_copy(update={"num_clients": n_all})
    sh = _train(
        cfg.model_copy(update={"federation": fed}),
        recipe,
        data,
        clients[:, data.client],
        seed,
        table.num_classes,
        f"client shadows ({recipe})",
        console,
    )
    return sh, data, clients


def run_audit(run: AuditedRun, console: Console, force: bool = False) -> dict[str, Any]:
    """Audit every model of ``run``; write and return ``audit.json``'s content.

    A one-run lower bound above a claimed epsilon is recorded (``violated: true``), not raised:
    :func:`fedmem.privacy.audit.report.violations` lists them after the results are written.
    """
    missing = check_auditable(run.cfg)
    cached = None if force else cached_audit(run)
    if cached is not None:
        console.print(f"cached: {run.rd.path / 'audit.json'} (use --force to recompute)")
        return cached
    for part, keys in missing.items():
        console.print(f"[yellow]skipped {part}[/]: set {keys}")
    t0 = time.perf_counter()
    cfg = run.cfg
    device = resolve_device(cfg.train.device)
    needs_shadows = "membership" not in missing or "one_run_epsilon" not in missing
    result: dict[str, Any] = {
        "config_hash": config_mod.config_hash(cfg),
        "attack_settings": _attack_settings(cfg),
        "skipped": missing,
        "shadows": {},
        "client_shadows": {},
        "runs": {},
    }
    plots_made: dict[str, str] = {}
    # shadows depend on the recipe only (seeded by it): models of one recipe share them
    record_shadows: dict[str, tuple[ShadowModels, torch.Tensor]] = {}
    client_shadows: dict[str, tuple[ShadowModels, ShadowData, torch.Tensor]] = {}
    for name in run.runs:
        model = load_model(run, name, device)
        shadows = cand = None
        record = run.records[name]
        recipe = shadow_recipe(record)
        if needs_shadows:
            if recipe not in record_shadows:
                record_shadows[recipe] = train_shadows(run, recipe, console)
            shadows, cand = record_shadows[recipe]
            result["shadows"][name] = {
                "recipe": recipe,
                "models": len(shadows),
                "train_s": round(shadows.train_s, 2),
                "not_simulated": deviations(record, recipe, SIMULATED_PLUGINS),
            }
        client_sh = None
        if "client_membership" not in missing and cfg.audit.attack.client_shadows > 0:
            if recipe not in client_shadows:
                client_shadows[recipe] = train_client_shadows(run, recipe, console)
            client_sh = client_shadows[recipe]
            result["client_shadows"][name] = {
                "recipe": recipe,
                "models": len(client_sh[0]),
                "clients": int(client_sh[2].shape[1]),
                "train_s": round(client_sh[0].train_s, 2),
            }
        res, curves = audit_model(run, name, model, shadows, cand, missing, client_sh)
        result["runs"][name] = res
        if curves:
            from fedmem.reporting import plots

            path = plots.roc_curves(
                {
                    f"{ATTACK_TITLES[a]}, AUC {res['membership']['attacks'][a]['auc']:.3f}": c
                    for a, c in curves.items()
                },
                run.rd.path / "plots" / f"audit_roc_{name}.png",
                f"membership inference on the {name} model",
            )
            plots_made[name] = str(path.relative_to(run.rd.path))
    exposures = {n: r["exposure"] for n, r in result["runs"].items() if "exposure" in r}
    if exposures:
        from fedmem.reporting import plots

        path = plots.exposure_bars(
            {n: {g: v["mean"] for g, v in e["by_group"].items()} for n, e in exposures.items()},
            next(iter(exposures.values()))["max_possible"],
            run.rd.path / "plots" / "audit_exposure.png",
        )
        plots_made["exposure"] = str(path.relative_to(run.rd.path))
    result["plots"] = plots_made
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    result = json_safe(result)
    run.rd.write_json("audit.json", result)
    summary = run.rd.read_summary()
    summary["audit"] = headline(result)
    run.rd.write_json("summary.json", summary)
    from fedmem.reporting.report import render_report

    render_report(run.rd.path)
    return result
