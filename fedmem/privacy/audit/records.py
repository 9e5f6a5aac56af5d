"""The audited run: open a finished run directory, check what it can be audited for, and load
its models (one-line :class:`~fedmem.errors.InputError` on bad input)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from fedmem import config as config_mod
from fedmem.config import ExperimentConfig
from fedmem.data.table import ExampleTable, cached_table
from fedmem.errors import InputError
from fedmem.models.factory import experiment_model
from fedmem.runs.checkpoints import load as load_checkpoint
from fedmem.runs.records import ModelRecord, read_records
from fedmem.runs.rundir import COMPLETE, RunDir

# what each part of the audit needs in the run's config
NEEDS = {
    "membership": "audit.pool (membership candidates, e.g. audit.pool=2000)",
    "one_run_epsilon": "audit.canaries (audit canaries, e.g. audit.canaries=500)",
    "client_membership": "audit.heldout_clients (never-trained clients, e.g. 2)",
    "exposure": "data.canaries.count and data.canaries.reference (e.g. 10 and 100)",
}


@dataclass(frozen=True)
class AuditedRun:
    """A finished run directory, its config (with the audit's attack settings) and table."""

    rd: RunDir
    cfg: ExperimentConfig
    table: ExampleTable
    summary: dict[str, Any]

    @property
    def records(self) -> dict[str, ModelRecord]:
        """Lineage records of the run's models (:mod:`fedmem.runs.records`)."""
        return read_records(self.summary, self.cfg)

    @property
    def runs(self) -> list[str]:
        return list(self.records)


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
    rd = RunDir(path)
    summary = rd.read_summary()  # missing or corrupt: one line naming summary.json
    check_config_matches(path, config_mod.build(raw), summary)
    diverged = {
        name: s["diverged_at_round"]
        for name, s in summary["runs"].items()
        if isinstance(s, dict) and s.get("diverged_at_round") is not None
    }
    if diverged:
        name, r = next(iter(diverged.items()))
        raise InputError(
            f"RUN_DIR: {path}: the {name} model diverged at round {r} (summary.json; "
            "non-finite weights or loss), so there is nothing to audit; rerun with a smaller "
            "train.lr"
        )
    raw = config_mod.merge_dicts(raw, attack_overrides(overrides or []))
    cfg = config_mod.build(raw)
    for run in ("central", "federated") if cfg.federation.enabled else ("central",):
        if not rd.checkpoint_path(run).is_file():
            raise InputError(
                f"RUN_DIR: {path} has no checkpoints/{run}.pt (made by an older fedmem); "
                "rerun it with python -m fedmem.simulate --force"
            )
    return AuditedRun(rd, cfg, cached_table(cfg), summary)


def check_config_matches(path: Path, cfg: ExperimentConfig, summary: dict[str, Any]) -> None:
    """Refuse a run whose ``config.yaml`` no longer hashes to summary.json's ``config_hash``
    (:func:`fedmem.config.config_hash`): it was edited after the run, so its ground truth
    (members, canaries, clients) is not the trained models'."""
    stored = summary.get("config_hash")
    now = config_mod.config_hash(cfg)
    if stored is not None and stored != now:
        raise InputError(
            f"RUN_DIR: {path / 'config.yaml'} does not match the run (config hash {now[:8]}, "
            f"summary.json says {str(stored)[:8]}): it was changed after the run; restore it, "
            "or run python -m fedmem.simulate with that config and audit the new run"
        )


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
    """The final model ``name`` from the checkpoint its lineage record names."""
    model = experiment_model(run.cfg, run.table.input_shape, run.table.num_classes)
    record = run.records[name]
    checkpoint = record.checkpoint
    try:
        state = load_checkpoint(run.rd.path / checkpoint)
        if record.method == "resmem":  # the model plus its residual memory (ResMem)
            from fedmem.methods.resmem import ResMemModel, ResMemSettings

            settings = ResMemSettings(**record.details)
            return ResMemModel.from_state(model, state, settings).to(device).eval()
        from fedmem.methods.pruning import load_pruned

        load_pruned(model, state)  # a pruned model (lottery ticket) brings its masks
    except FileNotFoundError:
        raise InputError(
            f"RUN_DIR: {checkpoint} is missing; rerun with python -m fedmem.simulate --force"
        ) from None
    except (RuntimeError, OSError, KeyError, TypeError, AttributeError) as e:
        raise InputError(
            f"RUN_DIR: {checkpoint} does not fit the run's model ({str(e)[:80]}); "
            "rerun with python -m fedmem.simulate --force"
        ) from None
    return model.to(device).eval()
