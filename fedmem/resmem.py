"""``python -m fedmem.resmem RUN_DIR``: ResMem (Yang et al. 2023) on a finished run.

    python -m fedmem.resmem RUN_DIR [--k 10] [--sigma 0.1] [--temperature 1] [--rule resmem]
                                    [--lam 0.5] [--register]

Every trained model of the run with and without its residual memory
(:mod:`fedmem.methods.resmem_eval`): test accuracy, mislabeled examples on their given label,
client-local accuracy with each client's own memory (federated), and the memory's privacy
cost. Writes ``resmem.json`` and prints one table. ``--register`` also adds ``<model>-resmem``
derived models to the run (then ``python -m fedmem.audit RUN_DIR`` attacks them too).
Exit codes: 0 done, 2 bad input (not a finished run; a setting out of range).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.table import Table

from fedmem.errors import InputError
from fedmem.progress import cli_console
from fedmem.reporting.tables import cell


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedmem.resmem",
        description="ResMem on a finished run: each model with and without its residual memory.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--k", type=int, default=10, help="neighbours (default 10)")
    parser.add_argument("--sigma", type=float, default=0.1, help="kernel width (default 0.1)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature T")
    parser.add_argument("--rule", choices=("resmem", "knn_lm"), default="resmem")
    parser.add_argument("--lam", type=float, default=0.5, help="kNN-LM interpolation weight")
    parser.add_argument("--register", action="store_true", help="add <model>-resmem models")
    args = parser.parse_args(argv)
    console, err = cli_console(), cli_console(stderr=True)
    from fedmem.methods.resmem import ResMemSettings
    from fedmem.methods.resmem_eval import evaluate
    from fedmem.privacy.audit.records import open_run

    try:
        try:
            settings = ResMemSettings(
                k=args.k,
                sigma=args.sigma,
                temperature=args.temperature,
                rule=args.rule,
                lam=args.lam,
            )
        except ValueError:
            raise InputError(
                "--k/--sigma/--temperature/--lam: need k >= 1, sigma > 0, temperature > 0 and "
                "0 <= lam <= 1"
            ) from None
        result = evaluate(open_run(args.run_dir), settings, register=args.register)
    except InputError as e:
        err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        return e.exit_code
    table = Table(title=f"ResMem  ({args.run_dir})")
    for col in ("model", "test base", "test ResMem", "noisy mem base", "noisy mem ResMem"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, r in result["runs"].items():
        table.add_row(
            name,
            cell(r["test_acc"]["base"]),
            cell(r["test_acc"]["resmem"]),
            cell(r["noisy_memorized"]["base"]),
            cell(r["noisy_memorized"]["resmem"]),
        )
    console.print(table)
    console.print(f"saved {args.run_dir / 'resmem.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
