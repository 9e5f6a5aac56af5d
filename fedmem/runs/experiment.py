"""Orchestration of one experiment: check the inputs, run every part into a run directory,
write ``summary.json`` and ``report.md``; or reuse a complete run directory.

:func:`run_or_load` is what ``python -m fedmem.simulate`` and the recipes in ``simulations/``
call.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import fedmem
from fedmem import config as config_mod
from fedmem.analysis.probes import GradientProbe, TrajectoryProbe, label_probes, trajectory_summary
from fedmem.analysis.tracking import save_trajectories
from fedmem.config import ExperimentConfig
from fedmem.data.table import ExampleTable, cached_table
from fedmem.errors import ConfigError, RunFailed
from fedmem.models.factory import init_model
from fedmem.observer import Observer, stops_here
from fedmem.reporting.report import render_report
from fedmem.reporting.tables import summarize_rows
from fedmem.runs.central import central_matching, run_central
from fedmem.runs.checkpoints import KeepPolicy, ModelCheckpoints, UpdateLog
from fedmem.runs.devices import check_devices, training_threads
from fedmem.runs.lock import RunLock
from fedmem.runs.records import experiment_records
from fedmem.runs.rundir import RunDir, check_output_dir
from strategies.sampling import user_dp_sampling


def prepare(cfg: ExperimentConfig) -> ExampleTable:
    """Everything that can fail on bad input, before any result is written."""
    check_devices(cfg)  # GPUs asked for but missing: exit 2 now, not a Ray hang later
    table = cached_table(cfg)
    model = init_model(cfg, table)
    if cfg.federation.enabled:
        import strategies

        strategies.validate(cfg)
    if cfg.privacy.record_level:
        from fedmem.privacy.dp import validate_record_level

        sizes = [len(table)]
        if cfg.federation.enabled:
            sizes += [len(table.client_rows(k)) for k in range(table.num_clients)]
        validate_record_level(cfg, sizes, model, dataset_size=len(table))
    if cfg.privacy.user_level and not cfg.federation.enabled:
        raise ConfigError("privacy.user_level: needs federation.enabled=true")
    return table


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
    )


def _status(row: dict) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    return (
        f"test {f(row['test_acc'])}  noisy mem {f(row['noisy_memorized'])}"
        f"  noisy true {f(row['noisy_true_acc'])}"
    )


def run_experiment(
    cfg: ExperimentConfig, table: ExampleTable, rd: RunDir, console: Console
) -> dict:
    """Run every part of the experiment into ``rd`` and return summary.json's content."""
    before = torch.get_num_threads()
    torch.set_num_threads(training_threads(cfg, before))  # the training loops only
    models = ["central"] + (["federated"] if cfg.federation.enabled else [])
    policy = keep_policy(cfg)
    ckpts = {m: ModelCheckpoints(rd.path, m, policy) for m in models}
    resumed = rd.begin(cfg, ckpts, cfg.train.rounds)
    for m, r in resumed.items():
        console.print(f"resuming {m} from its checkpoint of round {r} ({rd.path})")
    t0 = time.perf_counter()
    timing: dict[str, float] = {}
    with _progress(console) as progress:

        def tracker(name: str) -> Callable[[int, dict], None]:
            task = progress.add_task(name, total=cfg.train.rounds, status="")

            def on_round(r: int, row: dict) -> None:
                progress.update(task, completed=r, status=_status(row))

            return on_round

        trajectories: dict[str, TrajectoryProbe] = {}
        observers: dict[str, Observer] = {}

        def observer(run: str) -> Observer:
            probes: list = []
            if cfg.analysis.track_examples:
                trajectories[run] = TrajectoryProbe(table, rd.partial_dir / "trajectories" / run)
                probes.append(trajectories[run])
            if cfg.analysis.gradients.enabled:
                probes.append(
                    GradientProbe(table, cfg.analysis.gradients, cfg.seed, run, gradient_sink)
                )
            probes += label_probes(cfg, table, run, gradient_sink)
            obs = Observer(table, run, rd.append_metrics, cfg.train.eval_batch_size, probes)
            obs.restore([r for r in rd.read_metrics() if r["run"] == run])
            observers[run] = obs
            return obs

        def gradient_sink(row: dict) -> None:
            rd.append_jsonl("gradients.jsonl", row)

        run_central(cfg, table, observer("central"), tracker("central"), ckpts["central"])
        if cfg.federation.enabled:
            from fedmem.federation.server_app import FederatedJob

            fed_obs = observer("federated")
            job = FederatedJob(
                cfg,
                table,
                fed_obs,
                client_sink=lambda row: rd.append_jsonl("clients.jsonl", row),
                gradient_sink=gradient_sink if cfg.analysis.gradients.enabled else None,
                on_round=tracker("federated"),
                rows=list(fed_obs.rows),
                checkpoints=ckpts["federated"],
                updates=UpdateLog(rd.path, cfg.checkpoints.update_dtype)
                if cfg.checkpoints.client_updates
                else None,
                state_dir=str(rd.path / "client_state"),
            )
            stopped = bool(fed_obs.rows) and stops_here(cfg, fed_obs.rows[-1])
            if resumed.get("federated") == cfg.train.rounds or stopped:
                job.final_state = ckpts["federated"].load_resume()["model"]  # type: ignore[index]
                fed_obs.last_state = job.final_state
            else:
                from fedmem.federation.engine import run_federated

                engine = (
                    f"in this process (backend={cfg.federation.backend})"
                    if cfg.federation.backend in ("local", "batched")
                    else "on Ray (Flower's simulation engine)"
                )
                progress.console.print(f"federated: starting {engine} ...")
                eng = run_federated(job)
                timing = {
                    "ray_start_s": round(eng.ray_start_s, 3),
                    "federated_simulation_s": round(eng.simulation_s, 3),
                }
    torch.set_num_threads(before)
    rows = rd.read_metrics()
    if cfg.federation.enabled:
        check_rounds_lost(rd, [r for r in rows if r["run"] == "federated"], ckpts["federated"])
    for run, obs in observers.items():
        if obs.last_state is not None:
            ckpts[run].save_final(obs.last_state)
    runs = {
        name: summarize_rows([r for r in rows if r["run"] == name])
        for name in dict.fromkeys(r["run"] for r in rows)
    }
    analysis: dict = {}
    if trajectories:
        arrays = {run: probe.recorder.to_arrays() for run, probe in trajectories.items()}
        save_trajectories(rd.path / "examples.npz", arrays)
        analysis = {"memorization_share": cfg.analysis.memorization_share}
        for run, arr in arrays.items():
            analysis[run] = trajectory_summary(
                arr,
                [r for r in rows if r["run"] == run],
                table,
                cfg.analysis.memorization_share,
                per_client=(run == "federated"),
            )
    summary = {
        "name": cfg.output.name,
        "config_hash": config_mod.config_hash(cfg),
        "seed": cfg.seed,
        "fedmem_version": fedmem.__version__,
        "torch_version": torch.__version__,
        "central_matching": central_matching(cfg, table),
        "examples": {
            "train": len(table),
            "test": len(table.y_test),
            "noisy": int(table.is_noisy.sum()),
            "outliers": int(table.is_outlier.sum()),
            "canary_copies": int(table.is_canary.sum()),
        },
        "runs": runs,
        "models": {n: r.to_dict() for n, r in experiment_records(cfg).items()},
        "analysis": analysis,
        "wall_s": round(time.perf_counter() - t0, 3),
        **timing,
    }
    privacy = privacy_summary(cfg, rows, rd)
    if privacy:
        summary["privacy"] = privacy
    if cfg.analysis.memorization_scores.enabled:
        from fedmem.analysis.pipeline import memorization_scores_stage

        console.print(
            f"memorization scores: training {cfg.analysis.memorization_scores.models} models ..."
        )
        summary["memorization_scores"] = memorization_scores_stage(cfg, table, rd.path, console)
        summary["wall_s"] = round(time.perf_counter() - t0, 3)
    summary["checkpoints"] = checkpoint_summary(cfg, rd, ckpts)
    rd.write_json("summary.json", summary)
    render_report(rd.path)
    rd.finish(keep_client_state=cfg.plugins.forget_generator.enabled)
    return summary


def check_rounds_lost(rd: RunDir, rows: list[dict], ckpt: ModelCheckpoints) -> None:
    """Raise :class:`RunFailed` when every round of the federated run was lost (no client
    update was ever aggregated: its model is the initialization). Its resume state is
    removed first, so the same command retrains it (the central run is kept)."""
    trained = [r for r in rows if r["round"] > 0]
    if not trained or not all(r.get("round_lost") for r in trained):
        return
    failures = sum(int(r.get("clients_failed") or 0) for r in trained)
    first = next((c for c in rd.read_jsonl("clients.jsonl") if c.get("failed")), None)
    why = f"; first: client {first['client']} in round {first['round']}: " if first else ""
    why += str(first.get("reason", ""))[:200] if first else ""
    ckpt.resume_path.unlink(missing_ok=True)
    raise RunFailed(
        f"federated: all {len(trained)} rounds were lost ({failures} client failures{why}); "
        f"no model was trained. Fix the cause (clients.jsonl in {rd.path}) and run the same "
        "command again"
    )


def run_notes(runs: dict[str, dict], rounds: int) -> list[str]:
    """One line per run that diverged or lost rounds (from summary.json's ``runs``)."""
    lines = []
    for run, s in runs.items():
        r = s.get("diverged_at_round")
        if r is not None:
            then = (
                "stopped there (train.on_divergence=stop)"
                if s.get("rounds") == r
                else f"continued to round {s.get('rounds')} (train.on_divergence=continue)"
            )
            lines.append(
                f"warning: {run} diverged at round {r} (non-finite weights or loss); {then}; "
                "a smaller train.lr may help"
            )
        if s.get("lost_rounds"):
            lines.append(
                f"warning: {run}: {s['lost_rounds']} of {rounds} rounds lost "
                f"({s.get('client_failures')} client failures; reasons in clients.jsonl)"
            )
    return lines


def privacy_summary(cfg: ExperimentConfig, rows: list[dict], rd: RunDir) -> dict:
    """summary.json's ``privacy`` section: what each run and client has really spent."""
    out: dict = {}
    p = cfg.privacy
    if p.record_level:
        rec: dict = {
            "max_grad_norm": p.max_grad_norm,
            "accountant": p.accountant,
            "delta_convention": p.delta_convention,
            "neighbouring": "add/remove one record",
        }
        central = [r for r in rows if r["run"] == "central"]
        if central:
            rec["central"] = {
                "epsilon": central[-1].get("epsilon"),
                "delta": central[-1].get("delta"),
                "steps": central[-1].get("dp_steps"),
            }
        clients: dict[int, dict] = {}
        for c in rd.read_jsonl("clients.jsonl"):
            if "epsilon" in c:
                clients[c["client"]] = {
                    k: c.get(k)
                    for k in (
                        "epsilon",
                        "delta",
                        "noise_multiplier",
                        "sample_rate",
                        "dp_steps_total",
                    )
                }
        if clients:
            eps = [c["epsilon"] for c in clients.values() if isinstance(c["epsilon"], float)]
            rec["epsilon_max"] = max(eps) if eps else "inf"
            rec["epsilon_per_client"] = {str(k): v["epsilon"] for k, v in sorted(clients.items())}
            rec["clients"] = {str(k): v for k, v in sorted(clients.items())}
        out["record_level"] = rec
    if p.user_level:
        fed = [r for r in rows if r["run"] == "federated"]
        import strategies

        n = cfg.federation.num_clients
        per_round = strategies.clients_per_round(cfg)
        q, sampling = user_dp_sampling(per_round, n)
        out["user_level"] = {
            "epsilon": fed[-1].get("user_epsilon") if fed else None,
            "delta": p.user_delta or 1.0 / (10 * n),
            "noise_multiplier": p.user_noise_multiplier,
            "clip_norm": p.user_clip_norm,
            "clients_per_round": per_round,
            "sample_rate": q,  # the rate the accountant used
            "sampling": sampling,
            "neighbouring": "zero-out one client (its update replaced by none); add/remove of a "
            "client when every client trains every round",
            "rounds_released": sum(1 for r in fed[1:] if not r.get("round_lost")),
        }
    return out


def keep_policy(cfg: ExperimentConfig) -> KeepPolicy:
    c = cfg.checkpoints
    return KeepPolicy(
        final=cfg.train.rounds,
        rounds=frozenset(c.rounds),
        every=c.every,
        resume_every=c.resume_every,
    )


def checkpoint_summary(
    cfg: ExperimentConfig, rd: RunDir, ckpts: dict[str, ModelCheckpoints]
) -> dict:
    """summary.json's ``checkpoints``: kept rounds per model and the disk they take."""
    out: dict = {m: {"rounds": c.kept_rounds(), "bytes": c.kept_bytes()} for m, c in ckpts.items()}
    if cfg.checkpoints.client_updates:
        log = UpdateLog(rd.path, cfg.checkpoints.update_dtype)
        sizes = log.sizes()
        out["client_updates"] = {
            "dtype": cfg.checkpoints.update_dtype,
            "rounds": len(sizes),
            "bytes_per_round": round(sum(sizes.values()) / max(len(sizes), 1)),
            "bytes": sum(sizes.values()),
        }
    return out


def run_or_load(
    cfg: ExperimentConfig, console: Console, force: bool = False, wait: float | None = 0.0
) -> tuple[RunDir, dict]:
    """The experiment's run directory and summary: computed, resumed, or reused when complete.

    One process at a time per run directory (:class:`~fedmem.runs.lock.RunLock`): another
    ``simulate`` of the same config waits ``wait`` seconds for it (None: as long as it takes),
    then exits with code 2.
    """
    rd, summary = _run_or_load(cfg, console, force, wait)
    for line in run_notes(summary["runs"], cfg.train.rounds):
        console.print(line, markup=False, highlight=False)
    return rd, summary


def _run_or_load(
    cfg: ExperimentConfig, console: Console, force: bool, wait: float | None
) -> tuple[RunDir, dict]:
    rd = RunDir.for_config(cfg)
    if rd.complete and not force:
        console.print(f"cached: {rd.path} is complete (use --force to recompute)")
        return rd, rd.read_summary()
    check_output_dir(cfg)  # an unusable --out fails here, before any work
    table = prepare(cfg)  # bad input fails here, before the run directory exists
    check_output_dir(cfg, create=True)
    with RunLock(rd.path, wait=wait):
        if rd.complete and not force:  # another process finished it meanwhile
            console.print(f"cached: {rd.path} is complete (use --force to recompute)")
            return rd, rd.read_summary()
        if force:
            rd.clear()
        return rd, run_experiment(cfg, table, rd, console)
