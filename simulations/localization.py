"""Where memorization lives in the trained central and federated models (Maini et al. 2023,
"Can Neural Network Memorization Be Localized?", ICML).

The base experiment is trained once (its cached run directory, keeping ``REWIND_ROUNDS``);
then, for the final central model and the final federated global model, one section each:

- ``flip`` (:func:`fedmem.analysis.localization.flip_units`, Sec. 4): up to
  ``EXAMPLES_PER_KIND`` training examples per kind (mislabeled, clean, outlier, one copy per
  canary) that the model predicts as their given label; units zeroed greedily until the
  prediction flips (at most ``MAX_SHARE`` of all units). Per kind: the share that flipped, the
  quartiles of the units needed (flipped examples), the test accuracy those units cost
  (``acc_drop``, on ``CHECK`` test examples); ``flip-layer`` rows: the share of the zeroed
  units in each layer. The paper: mislabeled examples flip after a few units, clean ones need
  more, and the units are spread over the layers.
- ``rewind`` (:func:`fedmem.analysis.layer_rewinding.rewinding`, Sec. 3.2): each layer group
  rewound to each of ``REWIND_ROUNDS`` of the same run (0: the initialization; the authors
  rewind to several early epochs); clean and mislabeled training accuracy. The paper: most
  single layers are redundant for memorization (rewinding them leaves it), and the layers
  that matter are, in general, not the last ones.
- ``tied`` / ``client-tied`` (:func:`tied_dropout`, Sec. 5): the experiment retrained with
  example-tied dropout, standard dropout and a fixed sparse network of the same keep share,
  and client-tied dropout (ours); all units vs drop mode, and one client's units off.
- ``retrain`` (:func:`fedmem.analysis.layer_rewinding.retrain_layer`, Sec. 3.3): each group
  reset to the run's round-0 weights, the rest frozen, ``RETRAIN_EPOCHS`` epochs on the clean
  examples only (centrally, for the federated model too: ours); mislabeled accuracy on their
  given labels at the epochs ``REPORT_EPOCHS``.

Every section is a function of a :class:`Context` returning rows over :data:`COLUMNS`; more
sections append to :data:`SECTIONS`. The per-example flip results
are kept as ``flips.json`` next to the table (for the histogram).

    python -m fedmem.simulate --recipe localization --config configs/localization.yaml
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from fedmem.config import ExperimentConfig, build, to_dict
from fedmem.data.table import ExampleTable

TITLE = "where memorization lives: neuron flipping, layer rewinding and retraining"
EXAMPLES_PER_KIND = 100
MAX_SHARE = 0.1  # of all units: the flipping cap
REFERENCE = 128  # training rows whose loss the flipping objective holds down
CHECK = 512  # test examples for the accuracy cost of an example's zeroed units
REWIND_ROUNDS = (0, 2, 6)
RETRAIN_EPOCHS = 10
REPORT_EPOCHS = (0, 1, 2, 5, 10)
TIED_KINDS = ("example", "standard", "fixed", "client")  # model.dropout.kind per variant
FORGET_CLIENT = 0  # client-tied dropout: whose memorization units are switched off
COLUMNS = (
    "section",
    "run",
    "setting",
    "layer",
    "examples",
    "flipped",
    "units_q1",
    "units_median",
    "units_q3",
    "unit_share",
    "acc_drop",
    "train_acc_clean",
    "noisy_memorized",
    "noisy_true_acc",
    "outlier_acc",
    "canary_acc",
    "test_acc",
    "mia_auc",
)
Row = dict[str, Any]


@dataclass
class Context:
    """What every section sees: the experiment, its table, its run directory and the final
    weights of each run (``central``, ``federated``), and a store for per-example data."""

    cfg: ExperimentConfig
    table: ExampleTable
    run_dir: Path
    console: Console
    finals: dict[str, dict[str, torch.Tensor]]
    extra: dict[str, Any] = field(default_factory=dict)

    def model(self, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        from fedmem.models.factory import experiment_model

        model = experiment_model(self.cfg, self.table.input_shape, self.table.num_classes)
        model.load_state_dict(state)
        return model.eval()

    def checkpoint(self, run: str, round_: int) -> dict[str, torch.Tensor]:
        from fedmem.runs.checkpoints import load

        return load(self.run_dir / "checkpoints" / run / f"round-{round_:05d}.pt")["model"]


def base_config(base: ExperimentConfig) -> ExperimentConfig:
    raw = to_dict(base)
    raw["checkpoints"]["rounds"] = sorted({*raw["checkpoints"]["rounds"], *REWIND_ROUNDS} - {0})
    raw["analysis"]["gradients"]["enabled"] = False
    raw["federation"]["enabled"] = True
    return build(raw)


def _kinds(table: ExampleTable) -> dict[str, torch.Tensor]:
    first_copy = torch.zeros(len(table), dtype=torch.bool)
    ids = table.canary_id
    for c in ids[ids >= 0].unique().tolist():  # copies are identical: one per canary
        first_copy[int(torch.nonzero(ids == c)[0])] = True
    return {
        "mislabeled": table.is_noisy,
        "clean": table.is_clean,
        "outlier": table.is_outlier,
        "canary": first_copy,
    }


def _quartiles(values: list[int]) -> dict[str, float | None]:
    if not values:
        return {"units_q1": None, "units_median": None, "units_q3": None}
    q = np.percentile(values, [25, 50, 75])
    return {"units_q1": float(q[0]), "units_median": float(q[1]), "units_q3": float(q[2])}


def flipping(ctx: Context) -> list[Row]:
    from fedmem.analysis.localization import flip_units
    from fedmem.observer import predict
    from fedmem.seeding import np_rng

    table, seed = ctx.table, ctx.cfg.seed
    ref = torch.from_numpy(np_rng(seed, "localization", "reference").permutation(len(table)))
    ref = ref[:REFERENCE]
    check = torch.from_numpy(np_rng(seed, "localization", "check").permutation(len(table.y_test)))
    check = check[:CHECK]
    rows: list[Row] = []
    for run, state in ctx.finals.items():
        model = ctx.model(state)
        on_given = predict(model, table.x, ctx.cfg.train.eval_batch_size).argmax(1) == table.y_obs
        for kind, mask in _kinds(table).items():
            eligible = torch.nonzero(mask & on_given).flatten()
            pick = np_rng(seed, "localization", run, kind).permutation(len(eligible))
            chosen = eligible[torch.from_numpy(pick[:EXAMPLES_PER_KIND])].sort().values
            ctx.console.print(f"neuron flipping: {run}, {len(chosen)} {kind} examples")
            res = flip_units(
                model,
                table.x[chosen],
                table.y_obs[chosen],
                table.x[ref],
                table.y_obs[ref],
                max_share=MAX_SHARE,
                check=(table.x_test[check], table.y_test[check]),
            )
            units = [u for u in res.units if u is not None]
            drops = [d for d in res.acc_drop if d is not None]
            flipped = [z for s, z in zip(res.status, res.zeroed, strict=True) if s == "flipped"]
            layers = [res.layer_of(u) for z in flipped for u in z]
            ctx.extra.setdefault("flips", {}).setdefault(run, {})[kind] = {
                "rows": chosen.tolist(),
                "status": res.status,
                "units": res.units,
                "layers": [[res.layer_of(u) for u in z] for z in res.zeroed],
            }
            rows.append(
                {
                    "section": "flip",
                    "run": run,
                    "setting": kind,
                    "layer": "all",
                    "examples": len(chosen),
                    "flipped": len(units) / len(chosen) if len(chosen) else None,
                    **_quartiles(units),
                    "acc_drop": float(np.mean(drops)) if drops else None,
                }
            )
            for layer in dict.fromkeys(u.layer for u in res.layers):
                share = layers.count(layer) / len(layers) if layers else None
                rows.append(
                    {
                        "section": "flip-layer",
                        "run": run,
                        "setting": kind,
                        "layer": layer,
                        "examples": len(units),
                        "unit_share": share,
                    }
                )
    return rows


def rewinding(ctx: Context) -> list[Row]:
    from fedmem.analysis.gradients import layer_groups
    from fedmem.analysis.layer_rewinding import rewinding as rewind_rows

    rows: list[Row] = []
    for run, state in ctx.finals.items():
        model = ctx.model(state)
        earlier = {k: ctx.checkpoint(run, k) for k in REWIND_ROUNDS}
        ctx.console.print(f"layer rewinding: {run}")
        for r in rewind_rows(model, ctx.table, state, earlier, layer_groups(model)):
            k = r.pop("rewind_round")
            setting = "final" if k is None else f"to round {k}"
            layer = r.pop("group")
            rows.append({"section": "rewind", "run": run, "setting": setting, "layer": layer, **r})
    return rows


def retraining(ctx: Context) -> list[Row]:
    from fedmem.analysis.gradients import layer_groups
    from fedmem.analysis.layer_rewinding import retrain_layer

    rows: list[Row] = []
    for run, state in ctx.finals.items():
        init = ctx.checkpoint(run, 0)
        for name, params in layer_groups(ctx.model(state)).items():
            ctx.console.print(f"layer retraining on clean examples: {run}, {name}")
            per_epoch, _ = retrain_layer(ctx.cfg, ctx.table, state, init, params, RETRAIN_EPOCHS)
            for r in per_epoch:
                epoch = r.pop("epoch")
                if epoch in REPORT_EPOCHS:
                    setting = f"epoch {epoch}"
                    rows.append(
                        {"section": "retrain", "run": run, "setting": setting, "layer": name, **r}
                    )
    return rows


def tied_dropout(ctx: Context) -> list[Row]:
    """Example-tied dropout and its baselines (Sec. 5, Table 3; :mod:`fedmem.models.
    tied_dropout`): the same experiment trained with each ``model.dropout.kind`` of
    ``TIED_KINDS`` (its own cached run), each final model evaluated with all units and in drop
    mode; client-tied dropout also with ``FORGET_CLIENT``'s memorization units off
    (:func:`fedmem.methods.tied_dropout_eval.client_forgetting`)."""
    from fedmem.data.table import cached_table
    from fedmem.methods.tied_dropout_eval import client_forgetting, mode_rows
    from fedmem.runs.checkpoints import load
    from fedmem.runs.experiment import run_or_load

    rows: list[Row] = []
    for kind in TIED_KINDS:
        raw = to_dict(ctx.cfg)
        raw["model"]["dropout"]["kind"] = kind
        raw["output"]["name"] = f"{ctx.cfg.output.name}-{kind}-dropout"
        cfg = build(raw)
        ctx.console.print(f"tied dropout: training with model.dropout.kind={kind}")
        rd, _ = run_or_load(cfg, ctx.console)
        table = cached_table(cfg)
        for run in ("central", "federated"):
            sub = Context(cfg, table, rd.path, ctx.console, {})
            model = sub.model(load(rd.path / "checkpoints" / f"{run}.pt"))
            for r in mode_rows(model, table):
                mode = "" if r["mode"] == "-" else f" ({r['mode']})"
                rows.append({"section": "tied", "run": run, "setting": f"{kind}{mode}", **r})
            if kind == "client":
                for r in client_forgetting(model, table, FORGET_CLIENT, cfg.seed):
                    rows.append(
                        {
                            "section": "client-tied",
                            "run": run,
                            "setting": r["state"],
                            "layer": r["group"],
                            "train_acc_clean": r["train_acc"],
                            "mia_auc": r["mia_auc"],
                        }
                    )
    return rows


SECTIONS: list[Callable[[Context], list[Row]]] = [flipping, rewinding, retraining, tied_dropout]


def run(base: ExperimentConfig, console: Console, force: bool = False) -> list[Row]:
    from fedmem.data.table import cached_table
    from fedmem.runs.checkpoints import load
    from fedmem.runs.experiment import run_or_load
    from fedmem.runs.rundir import atomic_write_text
    from simulations import recipe_dir

    cfg = base_config(base)
    rd, _ = run_or_load(cfg, console, force)
    finals = {
        name: load(rd.path / "checkpoints" / f"{name}.pt") for name in ("central", "federated")
    }
    ctx = Context(cfg, cached_table(cfg), rd.path, console, finals)
    rows = [{c: r.get(c) for c in COLUMNS} for section in SECTIONS for r in section(ctx)]
    out = recipe_dir("localization", base)
    atomic_write_text(out / "flips.json", json.dumps(ctx.extra.get("flips", {})))
    return rows


def plot(base: ExperimentConfig, rows: list[Row], out_dir: Any) -> list[Any]:
    """The recipe's figures (:func:`simulations.localization_plots.plot`)."""
    from simulations.localization_plots import plot as draw

    return draw(base, rows, out_dir)
