"""``python -m fedmem.report RUN_DIR [RUN_DIR ...]``: re-render each run's ``report.md`` and
``plots/`` from the files in its directory (:mod:`fedmem.reporting.report`) and print one table
comparing the runs. Exit codes: 0 done, 2 a RUN_DIR that is not a complete run directory or
whose summary.json is missing or unreadable (one line naming the file and the fix).
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedmem.errors import InputError
from fedmem.reporting.report import compare_table, render_report


def main(argv: list[str] | None = None) -> int:
    import argparse

    from fedmem.progress import cli_console

    parser = argparse.ArgumentParser(
        prog="python -m fedmem.report",
        description="Re-render report.md and plots of finished runs; compare runs in one table.",
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    args = parser.parse_args(argv)
    console, err = cli_console(), cli_console(stderr=True)
    for d in args.run_dirs:
        if not (d / "COMPLETE").is_file() or not (d / "summary.json").is_file():
            err.print(
                f"error: RUN_DIR {d} is not a complete run directory (no COMPLETE or "
                "summary.json); run python -m fedmem.simulate first",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
            return 2
    try:
        for d in args.run_dirs:
            console.print(f"wrote {render_report(d)}")
        table = compare_table(args.run_dirs)
    except InputError as e:  # e.g. a corrupt summary.json
        err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        return e.exit_code
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
