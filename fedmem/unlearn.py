"""``python -m fedmem.unlearn RUN_DIR --client K``: forget a client of a finished run.

    python -m fedmem.unlearn RUN_DIR --client 3 [7 ...] [--method retrain ascent]
                                     [ascent.lr=0.01 ascent.post_rounds=2 ...]

Every method (:mod:`fedmem.unlearning`) produces a new global model without the client(s);
``retrain`` (the reference) always runs. Each model is added to the run as a derived model
(``federated-<method>-c<K>``, run lineage), measured beside the original and the retrained
model (:mod:`fedmem.unlearning.evaluate`), and the results go to ``unlearning.json`` and
``summary.json["unlearning"]``. Exit codes: 0 done, 2 bad input (not a finished federated run,
a client out of range, an unknown method or setting, a method needing what the run did not
keep).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from rich.table import Table

from fedmem.errors import InputError
from fedmem.progress import cli_console
from fedmem.reporting.tables import cell
from fedmem.unlearning.evaluate import COLUMNS


def settings(overrides: list[str]) -> dict:
    """``method.key=value`` overrides -> the methods' settings objects."""
    from fedmem.unlearning.ascent import AscentSettings
    from fedmem.unlearning.federaser import FedEraserSettings
    from fedmem.unlearning.generator import GeneratorSettings

    kinds = {
        "ascent": AscentSettings,
        "federaser": FedEraserSettings,
        "generator": GeneratorSettings,
    }
    values: dict[str, dict] = {m: {} for m in kinds}
    for item in overrides:
        key, sep, value = item.partition("=")
        method, _, name = key.partition(".")
        known = {f.name: f.type for f in fields(kinds[method])} if method in kinds else {}
        if not sep or name not in known:
            allowed = ", ".join(f"{m}.{f.name}" for m, k in kinds.items() for f in fields(k))
            raise InputError(f"{key}: unknown setting; allowed: {allowed}")
        try:
            values[method][name] = float(value) if "." in value or "e" in value else int(value)
        except ValueError:
            raise InputError(f"{key}: {value!r} is not a number") from None
    return {m: kinds[m](**values[m]) for m in kinds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedmem.unlearn",
        description="Forget client(s) of a finished federated run; compare with retraining.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--client", type=int, nargs="+", required=True, metavar="K")
    parser.add_argument("--method", nargs="+", default=["ascent"], help="methods besides retrain")
    parser.epilog = "settings: method.key=value (e.g. ascent.lr=0.01), anywhere after RUN_DIR"
    argv = list(sys.argv[1:] if argv is None else argv)
    # method.key=value settings may follow any option (--client / --method take lists)
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = parser.parse_args([a for a in argv if a not in overrides])
    args.overrides = overrides
    console, err = cli_console(), cli_console(stderr=True)
    from fedmem.unlearning.run import unlearn

    try:
        result = unlearn(
            args.run_dir, tuple(args.client), args.method, settings(args.overrides), console
        )
    except InputError as e:
        err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        return e.exit_code
    table = Table(title=f"unlearning client(s) {args.client}  ({args.run_dir})")
    table.add_column("model", justify="left")
    for c in COLUMNS:
        table.add_column(c, justify="right")
    for name, row in result["models"].items():
        table.add_row(name, *(cell(row.get(c)) for c in COLUMNS))
    console.print(table)
    console.print(f"saved {args.run_dir / 'unlearning.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
