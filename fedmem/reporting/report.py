"""``report.md`` and ``plots/`` of a run directory, rendered from the files in it, and the
table that compares several run directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from fedmem.reporting.tables import _fmt, columns_for, md_table, run_label


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _clients(count: int | None, share: float | None) -> str:
    """A group of clients as ``count (mean mislabeled share)``."""
    return f"{count} ({_fmt(share, '{:.3f}')})"


def _runs_md(runs: dict[str, dict[str, Any]]) -> str:
    columns = columns_for(runs)
    header = ["run"] + [name for _, name, _ in columns]
    return md_table(
        header,
        [[run_label(run, s)] + [s.get(k) for k, _, _ in columns] for run, s in runs.items()],
    )


def _models_md(models: dict[str, dict[str, Any]]) -> list[str]:
    """The run's lineage records (:mod:`fedmem.runs.records`) as a table."""
    if not models:
        return []

    def dp(m: dict[str, Any]) -> str:
        kinds = [k for k, on in (("record", m.get("record_dp")), ("user", m.get("user_dp"))) if on]
        return "+".join(kinds) or "-"

    rows = [
        [
            name,
            m.get("trainer"),
            m.get("strategy") or "-",
            ", ".join(m.get("plugins") or []) or "-",
            dp(m),
            m.get("parent") or "initialization",
            m.get("method") or "-",
        ]
        for name, m in models.items()
    ]
    header = ["model", "trained", "strategy", "plug-ins", "DP", "starts from", "derived by"]
    return ["## Models", "", md_table(header, rows), ""]


def render_report(run_dir: str | Path) -> Path:
    """(Re)write ``report.md`` and ``plots/*.png`` of a run directory from its files."""
    from fedmem.reporting import plots
    from fedmem.runs.rundir import atomic_write_text, read_summary

    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    rows = _read_jsonl(run_dir / "metrics.jsonl")
    out = [f"# {summary.get('name', run_dir.name)} — `{summary.get('config_hash', '')[:8]}`", ""]
    ex = summary.get("examples", {})
    if ex:
        out += [
            f"{ex.get('train')} training rows ({ex.get('noisy')} mislabeled, "
            f"{ex.get('outliers')} outliers, {ex.get('canary_copies')} canary copies), "
            f"{ex.get('test')} test examples; seed {summary.get('seed')}.",
            "",
        ]
    out += ["## Final metrics", "", _runs_md(summary["runs"]), ""]
    m = summary.get("central_matching")
    if m:
        kept = "kept across rounds" if m["optimizer"] == "keep" else "reset every round"
        out += [
            f"Central run matched on {m['match']}: {m['steps_per_round']} optimizer steps per "
            f"round (clients: {m['client_steps_mean']:.1f} local steps on average), optimizer "
            f"state {kept} (config section `central`).",
            "",
        ]
    out += _models_md(summary.get("models") or {})
    trainers = {
        name: m["trainer"] if m.get("parent") is None else "derived"
        for name, m in (summary.get("models") or {}).items()
    }
    curves = plots.learning_curves(
        rows, run_dir / "plots" / "curves.png", summary.get("name", ""), trainers
    )
    out += [f"![learning curves]({curves.relative_to(run_dir)})", ""]

    analysis = summary.get("analysis") or {}
    if analysis:
        out += [
            "## When: early learning, memorization, learning and forgetting",
            "",
            "Early-learning onset: round where mislabeled examples are most often predicted "
            "as their true label (Liu et al. 2020). Memorization onset: first round where "
            "the share predicted as their given wrong label exceeds "
            f"{analysis.get('memorization_share')}. Learning time: first round after "
            "which an example stays correct; forgetting events: correct -> incorrect "
            "transitions (Toneva et al. 2019).",
            "",
        ]
        header = [
            "run",
            "early-learning onset",
            "memorization onset",
            "group",
            "share learned",
            "mean learning time",
            "mean forgetting events",
        ]
        table_rows = []
        for run, a in analysis.items():
            if not isinstance(a, dict) or "groups" not in a:
                continue
            for i, (group, g) in enumerate(a["groups"].items()):
                table_rows.append(
                    [
                        run if i == 0 else "",
                        a.get("early_learning_onset") if i == 0 else "",
                        a.get("memorization_onset") if i == 0 else "",
                        group,
                        g.get("share_learned"),
                        g.get("mean_learning_time"),
                        g.get("mean_forgetting"),
                    ]
                )
        out += [md_table(header, table_rows), ""]
        per_client = (analysis.get("federated") or {}).get("per_client") or {}
        if per_client:
            out += [
                "Per client (federated; from each client's own mislabeled examples):",
                "",
                md_table(
                    ["client", "mislabeled", "early-learning onset", "memorization onset"],
                    [
                        [
                            k,
                            v.get("num_noisy"),
                            v.get("early_learning_onset"),
                            v.get("memorization_onset"),
                        ]
                        for k, v in per_client.items()
                    ],
                ),
                "",
            ]
    grad_rows = _read_jsonl(run_dir / "gradients.jsonl")
    heat = plots.gradient_heatmap(grad_rows, run_dir / "plots" / "gradient_cosine.png")
    if heat is not None:
        out += [
            "## Where: clean vs mislabeled gradients per layer",
            "",
            "Cosine between the summed gradients of clean and of mislabeled training "
            "examples, per layer and round (Maini et al. 2023, Fig. 2). Norms are of each "
            "group's *mean* gradient (`norm_of_mean_*` in `gradients.jsonl`, an unbiased "
            "estimate of the squared norm, divided by sqrt(#params)), so groups of different "
            "sizes compare (0: below the estimate's sampling noise; Maini et al.'s sums grow "
            "with the group sizes, `population_*`).",
            "",
            f"![gradient cosine]({heat.relative_to(run_dir)})",
            "",
        ]
        last = [g for g in grad_rows if g.get("kind", "examples") == "examples"]
        last = [g for g in last if g["round"] == max(h["round"] for h in last)]
        if last and "norm_of_mean_clean" in last[0]:
            out += [
                md_table(
                    ["run", "round", "layer", "cos", "norm of mean: clean", "mislabeled", "ratio"],
                    [
                        [
                            g["run"],
                            g["round"],
                            g["layer"],
                            _fmt(g["cos"], "{:.3f}"),
                            _fmt(g["norm_of_mean_clean"], "{:.3g}"),
                            _fmt(g["norm_of_mean_noisy"], "{:.3g}"),
                            _fmt(
                                _ratio(g["norm_of_mean_noisy"], g["norm_of_mean_clean"]), "{:.2f}"
                            ),
                        ]
                        for g in last
                    ],
                ),
                "",
            ]
    upd = [g for g in grad_rows if g.get("kind") == "client_updates"]
    if upd:
        last = [g for g in upd if g["round"] == upd[-1]["round"]]
        out += [
            "Federated analogue: cosine between the mean update of the noisier and of the "
            "cleaner clients of a round, per layer, in `gradients.jsonl` "
            "(`kind: client_updates`). `mislabeled_vs_clean`: clients holding mislabeled "
            "data vs clients without; `noisy_share_above_median` (noise on every client): "
            "clients whose mislabeled share is above the round's median vs the others: a "
            "contrast between more and less noise (the groups' mean shares), not noise vs none.",
            "",
            md_table(
                ["round", "layer", "cos", "split", "noisier: clients (share)", "cleaner"],
                [
                    [
                        g["round"],
                        g["layer"],
                        _fmt(g["cos"], "{:.3f}"),
                        g.get("split"),
                        _clients(g.get("noisier_clients"), g.get("noisier_mean_share")),
                        _clients(g.get("cleaner_clients"), g.get("cleaner_mean_share")),
                    ]
                    for g in last
                ],
            ),
            "",
        ]
    out += _label_parts_md(grad_rows, run_dir)
    mem = summary.get("memorization_scores") or {}
    for level, m in mem.items():
        if not isinstance(m, dict):
            continue
        out += [
            f"## How much: memorization scores ({level} level)",
            "",
            f"Feldman & Zhang (2020) scores from {m.get('models')} models trained on random "
            f"{m.get('subset')} subsets ({level}s). ROC-AUC for telling mislabeled from "
            f"clean examples by mem score: **{_fmt(m.get('auc_mislabeled_vs_clean'), '{:.3f}')}**. "
            f"Spearman(mem, confidence) = {_fmt(m.get('spearman_mem_confidence'), '{:.3f}')}, "
            f"Spearman(mem, agreement) = {_fmt(m.get('spearman_mem_agreement'), '{:.3f}')} "
            "(Carlini, Erlingsson & Papernot 2019).",
            "",
        ]
        means = m.get("mean_mem") or {}
        if means:
            out += [md_table(["group", "mean mem score"], [[k, v] for k, v in means.items()]), ""]
        hist = m.get("histogram")
        if hist:
            out += [f"![memorization scores]({hist})", ""]
    out += _audit_md(run_dir)
    out += _unlearning_md(summary)
    atomic_write_text(run_dir / "report.md", "\n".join(out) + "\n")
    return run_dir / "report.md"


def _label_parts_md(grad_rows: list[dict[str, Any]], run_dir: Path) -> list[str]:
    """The label-dependent / label-independent gradient section (rows of ``kind:
    label_parts``, Stephenson et al. 2021): the figure, and a table of the first and last
    measured rounds of every run."""
    from fedmem.reporting import plots

    rows = [g for g in grad_rows if g.get("kind") == "label_parts"]
    fig = plots.label_parts_curves(rows, run_dir / "plots" / "label_parts.png")
    if fig is None:
        return []
    by_key = {(g["run"], g["round"], g["layer"], g["group"]): g for g in rows}
    table = []
    for run in dict.fromkeys(g["run"] for g in rows):
        rounds = sorted({g["round"] for g in rows if g["run"] == run})
        for r in dict.fromkeys((rounds[0], rounds[-1])):
            for layer in dict.fromkeys(g["layer"] for g in rows if g["run"] == run):
                c, n = (by_key.get((run, r, layer, grp), {}) for grp in ("clean", "noisy"))
                fields = ("dep_norm_of_mean", "indep_norm_of_mean", "dep_norm")
                cells = [_fmt(g.get(k), "{:.3g}") for k in fields for g in (c, n)]
                table.append([run, r, layer, *cells])
    n_ex = rows[0].get("num_examples")
    return [
        "## Where: label-dependent vs label-independent gradient",
        "",
        "Each example's cross-entropy gradient is J^T p (label-independent) plus -J^T e_y "
        "(label-dependent) (Stephenson et al. 2021, Eq. 25, Fig. A.1), per layer, on "
        f"{n_ex} clean and {n_ex} mislabeled training examples (`kind: label_parts` in "
        "`gradients.jsonl`). Norm of mean: the norm of the group's mean part (unbiased "
        "estimate; 0: below sampling noise); per-example: the mean of each example's own "
        "part norm; both / sqrt(#params). The paper finds the mislabeled examples' mean "
        "label-dependent part close to zero early in training, the clean examples' not.",
        "",
        f"![label-dependent vs label-independent gradient]({fig.relative_to(run_dir)})",
        "",
        md_table(
            [
                "run",
                "round",
                "layer",
                "label-dep. mean: clean",
                "mislabeled",
                "label-indep. mean: clean",
                "mislabeled",
                "label-dep. per-example: clean",
                "mislabeled",
            ],
            table,
        ),
        "",
    ]


def _audit_md(run_dir: Path) -> list[str]:
    """The privacy-audit section, when ``python -m fedmem.audit`` has written audit.json."""
    path = run_dir / "audit.json"
    if not path.is_file():
        return []
    from fedmem.privacy.audit.report import AUDIT_COLUMNS, audit_rows

    result = json.loads(path.read_text())
    out = [
        "## Privacy audit",
        "",
        "Canary exposure (Carlini et al. 2019; mean over inserted canaries), record-level "
        "membership inference on the audit pool (loss threshold, Yeom et al. 2018; LiRA, "
        "Carlini et al. 2022; RMIA, Zarifzadeh et al. 2024; TPR at 1% FPR), client-level "
        "inference (training vs held-out clients) and the one-run empirical epsilon lower bound "
        "(Steinke et al. 2023) beside the accountant's epsilon.",
        "",
        md_table(["model", *(label for _, label in AUDIT_COLUMNS)], audit_rows(result)),
        "",
    ]
    for name, sh in (result.get("shadows") or {}).items():
        note = "; ".join(sh.get("not_simulated") or []) or "same recipe as the target"
        out.append(f"- {name}: {sh['models']} {sh['recipe']} shadow models ({note}).")
    for name, sh in (result.get("client_shadows") or {}).items():
        out.append(
            f"- {name}: {sh['models']} {sh['recipe']} client-level shadow models, each holding "
            f"a random half of the {sh['clients']} training and held-out clients."
        )
    for part, keys in (result.get("skipped") or {}).items():
        out.append(f"- skipped {part}: set {keys}.")
    out.append("")
    for name, plot in (result.get("plots") or {}).items():
        what = "canary exposure" if name == "exposure" else f"membership inference ROC, {name}"
        out += [f"![{what}]({plot})", ""]
    return out


def _unlearning_md(summary: dict[str, Any]) -> list[str]:
    """One table per ``python -m fedmem.unlearn`` request (``summary["unlearning"]``)."""
    requests = summary.get("unlearning") or {}
    if not requests:
        return []
    from fedmem.unlearning.evaluate import COLUMNS

    out = [
        "## Unlearning",
        "",
        "Each method's model beside the original and the model retrained without the "
        "client(s) (the reference: forgetting is good when a measure matches retrain's, not when "
        "it falls below it). Membership inference on the forgotten rows: loss threshold "
        "(Yeom et al. 2018) AUC against test rows, LiRA (Carlini et al. 2022) against held-out "
        "clients' rows; forgetting rate: members before (Yeom's oracle) judged non-members "
        "after (Liu et al. 2020); canary exposure; backdoor attack success; L2 / KL to retrain; "
        "wall seconds and speed-up against retraining (`unlearning.json` has the details).",
        "",
    ]
    for tag, rows in requests.items():
        out += [
            f"### Forgetting client(s) {tag[1:].replace('-', ', ')}",
            "",
            md_table(
                ["model", *COLUMNS], [[n, *(r.get(c) for c in COLUMNS)] for n, r in rows.items()]
            ),
            "",
        ]
    return out


def compare_table(run_dirs: list[Path]) -> Table:
    """One table over several run directories: every run of each, final metrics."""
    from fedmem.runs.rundir import read_summary

    table = Table(title="runs compared")
    table.add_column("run directory")
    table.add_column("run", style="bold")
    summaries = {d: read_summary(d) for d in run_dirs}
    columns = columns_for(
        {f"{d}/{r}": s for d, m in summaries.items() for r, s in m["runs"].items()}
    )
    for _, name, _ in columns:
        table.add_column(name, justify="right")
    for d, summary in summaries.items():
        for run, s in summary["runs"].items():
            cells = (_fmt(s.get(k), f) for k, _, f in columns)
            table.add_row(d.name, run_label(run, s), *cells)
    return table
