"""``python -m fedmem.audit RUN_DIR``: privacy audit of a finished run.

    python -m fedmem.audit RUN_DIR [--force] [audit.attack.key=value ...]

Canary exposure, record- and client-level membership inference (loss, LiRA, RMIA with batched
shadow models) and the one-run empirical epsilon for the run's central and federated models
(:mod:`fedmem.privacy.audit`). Writes ``audit.json``, ``plots/audit_roc_*.png`` and an audit
section in ``report.md``; prints one table. Exit codes: 0 done, 2 bad input (e.g. a run
without audit records: the message names the config keys to set; a ``config.yaml`` changed
after the run, whose hash no longer matches summary.json's ``config_hash``; a missing or
unreadable summary.json or checkpoint; a model that diverged), 3 an empirical lower bound
exceeds a privacy claim that the audit canaries test soundly (a record-level claim, or the
per-record guarantee a user-level claim implies), at ``audit.attack.confidence`` over all
claims tested (Bonferroni); the message states the claim, the confidence and the number of
tests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedmem.errors import InputError
from fedmem.progress import cli_console

VIOLATION_EXIT = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedmem.audit",
        description="Privacy audit of a finished run: canary exposure, membership inference "
        "(loss, LiRA, RMIA; record and client level), one-run empirical epsilon.",
        epilog="The run needs audit records: see configs/audit.yaml (audit.pool, audit.canaries, "
        "audit.heldout_clients).",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--force", action="store_true", help="recompute a cached audit")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="audit.attack.key=value",
        help="attack settings, e.g. audit.attack.shadows=64 audit.attack.epsilon_attack=loss",
    )
    args = parser.parse_args(argv)
    console, err = cli_console(), cli_console(stderr=True)
    from fedmem.privacy.audit.engine import run_audit
    from fedmem.privacy.audit.records import open_run
    from fedmem.privacy.audit.report import audit_table, violations

    try:
        run = open_run(args.run_dir, args.overrides)
        result = run_audit(run, console, force=args.force)
    except InputError as e:
        err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        return e.exit_code
    console.print(audit_table(result, title=f"privacy audit  ({run.rd.path})"))
    bad = violations(result)
    for line in bad:
        err.print(f"error: DP violation: {line}", markup=False, highlight=False, soft_wrap=True)
    return VIOLATION_EXIT if bad else 0


if __name__ == "__main__":
    sys.exit(main())
