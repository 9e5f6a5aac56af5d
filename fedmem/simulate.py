"""``python -m fedmem.simulate``: the main job.

    python -m fedmem.simulate [--config FILE] [--out DIR] [--force] [--wait [S]] [key=value ...]

Loads and validates the config (bad input: one line, exit code 2, nothing written), builds the
ExampleTable, runs the experiment into ``<out>/<name>-<hash8>/`` (:mod:`fedmem.runs.experiment`)
and prints the final table. A complete run directory is reused unless ``--force``; an
interrupted one (killed, Ctrl-C, power loss) continues from its last checkpoint when the same
command is run again. Ctrl-C stops with one line and exit code 130. Another ``simulate`` of
the same run makes this one exit with code 2 (or wait, with ``--wait``).

Exit codes: 0 done (also when a model diverged: the run is complete, says "diverged at round
r" and is marked in the table and summary.json; ``train.on_divergence`` chooses whether that
model stops there or trains on), 2 bad input (a key, a file, ``--out``), 4 the run failed
without a result (every federated round was lost: nothing is marked complete, and the same
command retrains the federated model), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

import fedmem
from fedmem import config as config_mod
from fedmem.config import ExperimentConfig
from fedmem.errors import InputError, RunFailed
from fedmem.progress import cli_console
from fedmem.reporting.tables import runs_table
from fedmem.runs.central import matching_title
from fedmem.runs.experiment import run_or_load
from fedmem.runs.rundir import RunDir

DEFAULT_CONFIG = Path("configs") / "default.yaml"


def default_config_path() -> Path:
    """``configs/default.yaml`` in the working directory, else beside the installed package."""
    if DEFAULT_CONFIG.is_file():
        return DEFAULT_CONFIG
    return Path(fedmem.__file__).resolve().parents[1] / DEFAULT_CONFIG


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fedmem.simulate",
        description="Run a fedmem experiment (central and federated) from a YAML config.",
        epilog=config_mod.describe_sections(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", type=Path, default=None, help=f"YAML config (default: {DEFAULT_CONFIG})"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="parent folder of run directories (overrides output.dir)",
    )
    parser.add_argument("--force", action="store_true", help="recompute a complete run")
    parser.add_argument(
        "--wait",
        type=float,
        nargs="?",
        const=-1.0,
        default=0.0,
        metavar="S",
        help="if another process is running this config, wait for it (S seconds at most; "
        "no value: as long as it takes) instead of exiting with code 2",
    )
    parser.add_argument(
        "--recipe",
        default=None,
        help="run a named experiment recipe from "
        "simulations/ (e.g. central_vs_federated) on top of the config",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted config overrides, e.g. train.lr=0.1 data.noise.rate=0.4",
    )
    return parser.parse_args(argv)


def load_config(args: argparse.Namespace) -> ExperimentConfig:
    path = args.config if args.config is not None else default_config_path()
    overrides = list(args.overrides)
    if args.out is not None:
        overrides.append(f"output.dir={args.out}")
    return config_mod.load(path, overrides, default_name=Path(path).stem)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = cli_console()
    err = cli_console(stderr=True)
    wait = None if args.wait < 0 else args.wait
    cfg = None
    try:
        cfg = load_config(args)
        if args.recipe is not None:
            from simulations import run_recipe

            run_recipe(args.recipe, cfg, console, force=args.force)
            return 0
        rd, summary = run_or_load(cfg, console, args.force, wait=wait)
    except (InputError, RunFailed) as e:
        err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        where = f" ({RunDir.for_config(cfg).path})" if cfg is not None else ""
        err.print(
            f"interrupted: the partial run{where} is kept; run the same command again to resume",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        return 130
    matched = matching_title(summary.get("central_matching"))
    title = f"{cfg.output.name}  ({rd.path})" + (f"\n{matched}" if matched else "")
    console.print(runs_table(summary["runs"], title=title))
    if (cfg.audit.pool or cfg.audit.canaries) and "audit" not in summary:
        console.print(f"privacy audit of this run: python -m fedmem.audit {rd.path}")
    return 0


def exit_with(code: int) -> None:
    """``sys.exit(code)``; after Ctrl-C without waiting for threads that cannot finish.

    An interrupted federated run leaves Flower's ServerApp thread waiting for client replies
    that will never come (Ray's actors got the same SIGINT); everything the run keeps is
    already on disk (atomic writes), so the process ends at once instead of hanging.
    """
    if code == 130:
        stuck = [
            t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon
        ]
        if stuck:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_with(main())
