"""Privacy audit of a finished run: canary exposure, membership inference, empirical epsilon.

For each model the run trained (``central`` and ``federated``, from ``checkpoints/``):

1. **Canary exposure** (Carlini et al. 2019) of every ``data.canaries`` canary among the
   never-inserted reference canaries, grouped by copies and by holding clients
   (:mod:`fedmem.privacy.exposure`).
2. **Record-level membership inference** on the ``audit.pool`` candidates (each trained on
   w.p. 1/2, :mod:`fedmem.data.table`): loss threshold (Yeom et al. 2018), LiRA online and
   offline (Carlini et al. 2022) and RMIA offline (Zarifzadeh et al. 2024), with
   ``audit.attack.shadows`` shadow models trained by the batched ensemble trainer on random
   halves of the candidates plus every non-candidate row, with the target's recipe
   (:mod:`fedmem.privacy.shadows`: central, or FedAvg over the same clients).
3. **Client-level membership inference**: the mean per-example loss score over a client's
   examples, training clients (members) vs ``audit.heldout_clients`` (non-members).
4. **Empirical epsilon in one run** (Steinke, Nasr & Jagielski 2023) from the attack scores of
   the ``audit.canaries`` audit canaries, beside the accountant's epsilon; a lower bound above
   a claimed epsilon is a violation (:func:`fedmem.privacy.audit_report.violations`): the DP
   code would be wrong.

:func:`run_audit` writes ``audit.json``, ``plots/audit_roc_<run>.png`` and an ``audit``
section in ``summary.json`` / ``report.md``. It is cached by the run's config hash and the
``audit.attack`` settings.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from rich.console import Console
from torch import nn

from fedmem import config as config_mod
from fedmem.analysis.memorization import roc_auc
from fedmem.central import experiment_model, resolve_device
from fedmem.config import ExperimentConfig
from fedmem.data.table import AUDIT_CANARY, AUDIT_POOL, ExampleTable, cached_table
from fedmem.errors import InputError
from fedmem.observer import predict
from fedmem.privacy import attacks, exposure, one_run
from fedmem.privacy.audit_report import headline
from fedmem.privacy.dp import default_delta
from fedmem.privacy.shadows import (
    ShadowModels,
    recipe_deviations,
    shadow_masks,
    train_central_shadows,
    train_fedavg_shadows,
)
from fedmem.progress import counting_bar
from fedmem.rundir import COMPLETE, RunDir, json_safe
from fedmem.seeding import derive_seed

ATTACKS = ("loss", "lira_online", "lira_offline", "rmia")
ATTACK_TITLES = {
    "loss": "loss threshold (Yeom 2018)",
    "lira_online": "LiRA online (Carlini 2022)",
    "lira_offline": "LiRA offline (Carlini 2022)",
    "rmia": "RMIA offline (Zarifzadeh 2024)",
}
# what each part of the audit needs in the run's config
NEEDS = {
    "membership": "audit.pool (membership candidates, e.g. audit.pool=2000)",
    "one_run_epsilon": "audit.canaries (audit canaries, e.g. audit.canaries=500)",
    "client_membership": "audit.heldout_clients (never-trained clients, e.g. 2)",
    "exposure": "data.canaries.count and data.canaries.reference (e.g. 10 and 100)",
}


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuditedRun:
    """A finished run directory, its config (with the audit's attack settings) and table."""

    rd: RunDir
    cfg: ExperimentConfig
    table: ExampleTable
    summary: dict[str, Any]

    @property
    def runs(self) -> list[str]:
        return list(self.summary.get("runs", {}))


def attack_overrides(overrides: list[str]) -> dict[str, Any]:
    """Parse ``audit.attack.key=value`` overrides; any other key is an input error."""
    parsed = config_mod.parse_overrides(overrides)
    other = [k for k in parsed if k != "audit"] + [
        f"audit.{k}" for k in (parsed.get("audit") or {}) if k != "attack"
    ]
    if other:
        raise InputError(
            f"{other[0]}: only audit.attack.* can change when auditing a finished run; to change "
            "the run itself, rerun python -m fedmem.simulate with that key"
        )
    return parsed


def open_run(path: str | Path, overrides: list[str] | None = None) -> AuditedRun:
    """Load a complete run directory for auditing, or raise a one-line :class:`InputError`."""
    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise InputError(f"RUN_DIR: {path} is not a run directory (no config.yaml)")
    if not (path / COMPLETE).is_file():
        raise InputError(
            f"RUN_DIR: {path} is incomplete (no {COMPLETE}); finish it with python -m "
            "fedmem.simulate first"
        )
    try:
        raw = yaml.safe_load((path / "config.yaml").read_text())
    except yaml.YAMLError as e:
        raise InputError(f"RUN_DIR: {path}/config.yaml is not valid YAML ({e})") from None
    raw = config_mod.merge_dicts(raw, attack_overrides(overrides or []))
    cfg = config_mod.build(raw)
    rd = RunDir(path)
    for run in ("central", "federated") if cfg.federation.enabled else ("central",):
        if not rd.checkpoint_path(run).is_file():
            raise InputError(
                f"RUN_DIR: {path} has no checkpoints/{run}.pt (made by an older fedmem); "
                "rerun it with python -m fedmem.simulate --force"
            )
    return AuditedRun(rd, cfg, cached_table(cfg), rd.read_summary())


def missing_parts(cfg: ExperimentConfig) -> dict[str, str]:
    """Parts of the audit the run's config gives no data for -> the keys to set."""
    au, can = cfg.audit, cfg.data.canaries
    have = {
        "membership": au.pool > 0,
        "one_run_epsilon": au.canaries > 0,
        "client_membership": au.heldout_clients > 0,
        "exposure": can.count > 0 and can.reference > 0,
    }
    return {part: NEEDS[part] for part, ok in have.items() if not ok}


def check_auditable(cfg: ExperimentConfig) -> dict[str, str]:
    """The missing parts; raises :class:`InputError` when no membership ground truth exists."""
    missing = missing_parts(cfg)
    if "membership" in missing and "one_run_epsilon" in missing:
        raise InputError(
            "audit.pool: the run kept no membership candidates; set audit.pool and "
            "audit.canaries (and audit.heldout_clients for client-level inference) in its config "
            "and rerun, e.g. python -m fedmem.simulate --config configs/audit.yaml"
        )
    return missing


def load_model(run: AuditedRun, name: str, device: torch.device) -> nn.Module:
    """The final model of run ``name`` (``central`` / ``federated``) from its checkpoint."""
    model = experiment_model(run.cfg, run.table.input_shape, run.table.num_classes)
    try:
        model.load_state_dict(run.rd.load_checkpoint(name))
    except (RuntimeError, OSError, KeyError) as e:
        raise InputError(
            f"RUN_DIR: checkpoints/{name}.pt does not fit the run's model ({str(e)[:80]}); "
            "rerun with python -m fedmem.simulate --force"
        ) from None
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# shadow data: every training row plus the candidates that were left out
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShadowData:
    """Rows the shadows draw from: the table's rows, then the non-member candidates.

    ``candidate_row[j]``: the row of candidate j (its table row when a member, else one of
    the appended rows). Every non-candidate row is in every shadow; shadow k holds candidate j
    when ``masks[k, j]`` (each candidate in exactly half the shadows).
    """

    x: torch.Tensor
    y: torch.Tensor
    client: torch.Tensor
    candidate_row: torch.Tensor

    def row_masks(self, candidate_masks: torch.Tensor) -> torch.Tensor:
        """(K, rows) bool: all non-candidate rows, plus each shadow's candidates."""
        masks = torch.ones(len(candidate_masks), len(self.y), dtype=torch.bool)
        masks[:, self.candidate_row] = candidate_masks
        return masks


def shadow_data(table: ExampleTable) -> ShadowData:
    out = ~table.audit_member
    n_out = int(out.sum())
    candidate_row = table.audit_row.clone()
    candidate_row[out] = len(table) + torch.arange(n_out)
    return ShadowData(
        x=torch.cat([table.x, table.audit_x[out]]),
        y=torch.cat([table.y_obs, table.audit_y[out]]),
        client=torch.cat([table.client, table.audit_client[out]]),
        candidate_row=candidate_row,
    )


def client_shadow_data(table: ExampleTable) -> ShadowData:
    """Rows of every client, training and held-out: the table's rows, then the held-out
    clients' (``candidate_row`` is empty: inclusion is per client)."""
    return ShadowData(
        x=torch.cat([table.x, table.heldout_x]),
        y=torch.cat([table.y_obs, table.heldout_y]),
        client=torch.cat([table.client, table.heldout_client]),
        candidate_row=torch.empty(0, dtype=torch.int64),
    )


# ---------------------------------------------------------------------------------------------
# pure pieces
# ---------------------------------------------------------------------------------------------
def canary_exposure(
    canary_losses: np.ndarray,
    reference_losses: np.ndarray,
    copies: np.ndarray,
    holders: np.ndarray,
) -> dict[str, Any]:
    """Exposure of each inserted canary, summarized overall, by copies and by holders."""
    exp = exposure.exposure(canary_losses, reference_losses)
    extra = exposure.exposure_extrapolated(canary_losses, reference_losses)
    groups = {"all": np.ones(len(exp), dtype=bool)}
    groups |= {f"copies={c}": copies == c for c in np.unique(copies)}
    groups |= {f"clients={h}": holders == h for h in np.unique(holders)}
    return {
        "references": len(reference_losses),
        "max_possible": math.log2(len(reference_losses) + 1),
        "by_group": exposure.exposure_summary(exp, groups),
        "extrapolated_by_group": exposure.exposure_summary(extra, groups),
        "per_canary": [float(v) for v in exp],
    }


def client_scores(scores: np.ndarray, clients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean per-example score of every client: (client ids ascending, mean scores)."""
    ids, inverse = np.unique(clients, return_inverse=True)
    sums = np.bincount(inverse, weights=scores, minlength=len(ids))
    return ids, sums / np.bincount(inverse, minlength=len(ids))


def mia_scores(
    target_logits: torch.Tensor,
    shadow_logits: torch.Tensor,
    labels: torch.Tensor,
    shadow_in: torch.Tensor,
    target_pop_logits: torch.Tensor,
    shadow_pop_logits: torch.Tensor,
    pop_labels: torch.Tensor,
    fixed_variance: bool,
) -> dict[str, np.ndarray]:
    """Scores of every attack for the candidates (higher = more likely a member).

    ``target_logits`` (M, C), ``shadow_logits`` (K, M, C) with ``shadow_in`` (K, M); the
    population (RMIA's z: test examples no model trained on) as ``*_pop_logits``.
    """
    phi = attacks.logit_confidence(target_logits, labels)
    shadow_phi = attacks.logit_confidence(shadow_logits, labels)
    out = {"loss": attacks.loss_scores(target_logits, labels)}
    for online in (True, False):
        out["lira_online" if online else "lira_offline"] = attacks.lira_scores(
            phi, shadow_phi, shadow_in, online=online, fixed_variance=fixed_variance
        )
    out["rmia"] = attacks.rmia_scores(
        attacks.label_probability(target_logits, labels),
        attacks.label_probability(shadow_logits, labels),
        shadow_in,
        attacks.label_probability(target_pop_logits, pop_labels),
        attacks.label_probability(shadow_pop_logits, pop_labels),
    )
    return out


def claimed_privacy(cfg: ExperimentConfig, summary: dict, run: str, n: int) -> list[dict]:
    """The (epsilon, delta) guarantees the run claims for one record of model ``run``.

    Central: its record-level accountant. Federated: the worst client's record-level
    accountant, and the user-level accountant (a record belongs to one user). Without DP one
    entry with epsilon ``inf`` at the default delta 1/(10 n).
    """
    priv = summary.get("privacy") or {}
    out = []
    rec = priv.get("record_level") or {}
    if run == "central" and "central" in rec:
        eps = rec["central"].get("epsilon")
        out.append({"accountant": "record_level", "epsilon": eps, "delta": _delta(cfg, n)})
    if run == "federated" and rec.get("clients"):
        worst = max(
            rec["clients"].values(),
            key=lambda c: math.inf if isinstance(c["epsilon"], str) else c["epsilon"],
        )
        out.append(
            {"accountant": "record_level", "epsilon": worst["epsilon"], "delta": worst["delta"]}
        )
    user = priv.get("user_level") or {}
    if run == "federated" and user:
        out.append({"accountant": "user_level", "epsilon": user["epsilon"], "delta": user["delta"]})
    return out or [{"accountant": "none", "epsilon": "inf", "delta": _delta(cfg, n)}]


def use_fixed_variance(cfg: ExperimentConfig, shadows: int) -> bool:
    """LiRA with one pooled variance: ``audit.attack.fixed_variance``, where ``auto`` means
    fewer than 64 shadows (Carlini et al. 2022 use it when shadow models are few)."""
    fixed = cfg.audit.attack.fixed_variance
    return shadows < 64 if fixed == "auto" else fixed == "yes"


def _delta(cfg: ExperimentConfig, n: int) -> float:
    return cfg.privacy.delta if cfg.privacy.delta is not None else default_delta(n)


def _eps(v: float | str | None) -> float:
    return math.inf if v is None or isinstance(v, str) else float(v)


# ---------------------------------------------------------------------------------------------
# one target model
# ---------------------------------------------------------------------------------------------
def audit_model(
    run: AuditedRun,
    name: str,
    model: nn.Module,
    shadows: ShadowModels | None,
    candidate_masks: torch.Tensor | None,
    missing: dict[str, str],
    client_shadows: tuple[ShadowModels, ShadowData, torch.Tensor] | None = None,
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Every audit part for one target model: its audit.json entry and its ROC curves."""
    cfg, table = run.cfg, run.table
    bs = cfg.train.eval_batch_size
    res: dict[str, Any] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    if "exposure" not in missing:
        first = np.unique(table.canary_id.numpy(), return_index=True)
        cid, rows = first[0][first[0] >= 0], first[1][first[0] >= 0]
        losses = F.cross_entropy(
            predict(model, table.x[rows], bs), table.y_obs[rows], reduction="none"
        )
        ref = F.cross_entropy(
            predict(model, table.canary_ref_x, bs), table.canary_ref_y, reduction="none"
        )
        copies = np.bincount(table.canary_id[table.is_canary].numpy(), minlength=len(cid))
        holders = np.array(
            [len(torch.unique(table.client[table.canary_id == c])) for c in cid], dtype=np.int64
        )
        res["exposure"] = canary_exposure(losses.numpy(), ref.numpy(), copies[cid], holders)

    if shadows is not None and candidate_masks is not None:
        cand_logits = predict(model, table.audit_x, bs)
        pop_logits = predict(model, table.x_test, bs)
        sh_cand = shadows.logits(table.audit_x, bs)
        sh_pop = shadows.logits(table.x_test, bs)
        fixed_variance = use_fixed_variance(cfg, len(shadows))
        scores = mia_scores(
            cand_logits,
            sh_cand,
            table.audit_y,
            candidate_masks,
            pop_logits,
            sh_pop,
            table.y_test,
            fixed_variance,
        )
        member = table.audit_member.numpy()
        kind = table.audit_kind.numpy()
        pool = kind == AUDIT_POOL
        if pool.any():
            noisy = (table.audit_y != table.audit_y_true).numpy()
            groups = {"mislabeled": pool & noisy, "clean label": pool & ~noisy}
            res["membership"] = {
                "candidates": int(pool.sum()),
                "members": int(member[pool].sum()),
                "fixed_variance": fixed_variance,
                "attacks": {
                    a: attacks.attack_summary(s[pool], member[pool]) for a, s in scores.items()
                },
                "auc_by_group": {
                    g: {a: roc_auc(s[m], member[m]) for a, s in scores.items()}
                    for g, m in groups.items()
                },
            }
            curves = {a: attacks.roc_curve(s[pool], member[pool]) for a, s in scores.items()}
        can = kind == AUDIT_CANARY
        if can.any():
            res["one_run_epsilon"] = one_run_epsilon(run, name, scores, member, can)

    if "client_membership" not in missing:
        res["client_membership"] = client_membership(run, model, client_shadows)
    return res, curves


def one_run_epsilon(
    run: AuditedRun, name: str, scores: dict[str, np.ndarray], member: np.ndarray, can: np.ndarray
) -> dict[str, Any]:
    """Steinke et al. (2023) lower bounds from each attack's scores on the audit canaries."""
    att = run.cfg.audit.attack
    claims = claimed_privacy(run.cfg, run.summary, name, len(run.table))
    bounds = []
    for claim in claims:
        per_attack = {
            a: one_run.one_run_epsilon(s[can], member[can], claim["delta"], att.confidence)
            for a, s in scores.items()
        }
        lb = per_attack[att.epsilon_attack]["epsilon_lower_bound"]
        bounds.append(
            {
                **claim,
                "lower_bound": lb,
                "violated": lb > _eps(claim["epsilon"]),
                "lower_bound_by_attack": {
                    a: r["epsilon_lower_bound"] for a, r in per_attack.items()
                },
                "guesses": per_attack[att.epsilon_attack],
            }
        )
    return {
        "attack": att.epsilon_attack,
        "canaries": int(can.sum()),
        "included": int(member[can].sum()),
        "confidence": att.confidence,
        "claims": bounds,
        "lower_bound": bounds[0]["lower_bound"],
        "accountant_epsilon": bounds[0]["epsilon"],
    }


def client_membership(
    run: AuditedRun,
    model: nn.Module,
    shadows: tuple[ShadowModels, ShadowData, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Client-level inference: did client k's data train the model?

    Per-example scores over every client's ordinary examples (canary copies left out: only
    training clients hold them), averaged per client; AUC of training (member) vs held-out
    (non-member) clients. ``loss``: the loss-threshold score (Yeom et al. 2018) aggregated.
    With client-level shadows (:func:`train_client_shadows`), also LiRA online / offline
    (Carlini et al. 2022) per example with "in" meaning *the example's client* was in the
    shadow's training, then averaged per client (the mean log-likelihood ratio; assumes the
    examples independent, as aggregating per-example tests does).
    """
    table, bs = run.table, run.cfg.train.eval_batch_size
    data = client_shadow_data(table)
    ordinary = torch.cat(
        [
            (table.canary_id < 0) & ~table.is_audit_canary,
            torch.ones(len(table.heldout_y), dtype=torch.bool),
        ]
    )
    x, y, client = data.x[ordinary], data.y[ordinary], data.client[ordinary].numpy()
    logits = predict(model, x, bs)
    scores = {"loss": attacks.loss_scores(logits, y)}
    if shadows is not None:
        sh, _, clients = shadows
        fixed_variance = use_fixed_variance(run.cfg, len(sh))
        phi = attacks.logit_confidence(logits, y)
        sh_phi = attacks.logit_confidence(sh.logits(x, bs), y)
        inside = clients[:, torch.from_numpy(client)]
        for online in (True, False):
            scores["lira_online" if online else "lira_offline"] = attacks.lira_scores(
                phi, sh_phi, inside, online=online, fixed_variance=fixed_variance
            )
    out: dict[str, Any] = {"attacks": {}, "score_per_client": {}}
    for a, s in scores.items():
        ids, means = client_scores(s, client)
        member = ids < table.num_clients
        out["attacks"][a] = roc_auc(means, member)
        out["score_per_client"][a] = {
            str(int(k)): float(v) for k, v in zip(ids, means, strict=True)
        }
    return {
        "clients": int(member.sum()),
        "heldout_clients": int((~member).sum()),
        "auc": out["attacks"]["loss"],
        "auc_by_attack": out["attacks"],
        "shadows": 0 if shadows is None else len(shadows[0]),
        "score_per_client": out["score_per_client"],
    }


# ---------------------------------------------------------------------------------------------
# the whole audit
# ---------------------------------------------------------------------------------------------
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
    :func:`fedmem.privacy.audit_report.violations` lists them after the results are written.
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
    for name in run.runs:
        model = load_model(run, name, device)
        shadows = cand = None
        recipe = "central" if name == "central" else "fedavg"
        if needs_shadows:
            shadows, cand = train_shadows(run, recipe, console)
            result["shadows"][name] = {
                "recipe": recipe,
                "models": len(shadows),
                "train_s": round(shadows.train_s, 2),
                "not_simulated": recipe_deviations(cfg, recipe),
            }
        client_sh = None
        if "client_membership" not in missing and cfg.audit.attack.client_shadows > 0:
            client_sh = train_client_shadows(run, recipe, console)
            result["client_shadows"][name] = {
                "recipe": recipe,
                "models": len(client_sh[0]),
                "clients": int(client_sh[2].shape[1]),
                "train_s": round(client_sh[0].train_s, 2),
            }
        res, curves = audit_model(run, name, model, shadows, cand, missing, client_sh)
        result["runs"][name] = res
        if curves:
            from fedmem import plots

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
        from fedmem import plots

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
    from fedmem.report import render_report

    render_report(run.rd.path)
    return result
