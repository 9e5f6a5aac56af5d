"""Named experiment recipes: each builds configs, runs them and returns one comparison table.

``python -m fedmem.simulate --recipe NAME [--config FILE] [key=value ...]`` applies the
recipe's grid on top of the (overridden) base config. Every cell is an ordinary experiment
with its own cached run directory; the recipe writes its table as CSV and markdown to
``<output.dir>/recipes/<NAME>-<hash8>/`` and prints it; a recipe with a ``plot(base, rows,
out_dir)`` function also saves its figures there.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedmem.config import ExperimentConfig, config_hash
from fedmem.errors import ConfigError
from fedmem.reporting.tables import cell, md_table
from fedmem.runs.rundir import atomic_write_text

RECIPES = (
    "central_vs_federated",
    "central_gap",
    "dp_memorization",
    "early_learning",
    "localization",
    "lottery",
    "privacy_audit",
    "pruning_sweep",
    "resmem",
    "unlearning",
)

Row = dict[str, Any]


def write_table(rows: list[Row], out_dir: Path, title: str, console: Console) -> None:
    """Print ``rows`` and save them as ``table.csv`` and ``table.md`` in ``out_dir``."""
    columns = list(rows[0])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "table.csv", buf.getvalue())
    md = md_table(columns, [[r[c] for c in columns] for r in rows])
    atomic_write_text(out_dir / "table.md", f"# {title}\n\n{md}\n")
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c in ("setting", "run") else "right")
    for r in rows:
        table.add_row(*(cell(r[c]) for c in columns))
    console.print(table)
    console.print(f"saved {out_dir / 'table.csv'} and {out_dir / 'table.md'}")


def recipe_dir(name: str, base: ExperimentConfig) -> Path:
    """Where recipe ``name`` on ``base`` writes its table and figures (a recipe may also keep
    per-example data there for its ``plot``)."""
    key = hashlib.sha256(json.dumps([name, config_hash(base)]).encode()).hexdigest()[:8]
    return Path(base.output.dir) / "recipes" / f"{name}-{key}"


def run_recipe(
    name: str, base: ExperimentConfig, console: Console, force: bool = False
) -> list[Row]:
    if name not in RECIPES:
        raise ConfigError(f"--recipe: unknown {name!r}; allowed: {', '.join(RECIPES)}")
    module = importlib.import_module(f"simulations.{name}")
    run: Callable[[ExperimentConfig, Console, bool], list[Row]] = module.run
    rows = run(base, console, force)
    out_dir = recipe_dir(name, base)
    write_table(rows, out_dir, module.TITLE, console)
    plot = getattr(module, "plot", None)  # a recipe may also draw its figures there
    if plot is not None:
        for path in plot(base, rows, out_dir):
            console.print(f"saved {path}")
    return rows
