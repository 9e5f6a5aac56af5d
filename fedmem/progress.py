"""Console output for people: the CLIs' consoles, and the rich progress bar of a long batched
job (ensembles, shadow models): label, bar, done / total, elapsed time."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

LOG_WIDTH = 160  # columns when writing to a file or pipe (rich would assume 80 and cut names)


def cli_console(stderr: bool = False) -> Console:
    """A console for a CLI: the terminal's width, or :data:`LOG_WIDTH` when the output goes
    to a log file (unless ``COLUMNS`` says otherwise), so tables are not cut to "cent…"."""
    stream = sys.stderr if stderr else sys.stdout
    wide = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=LOG_WIDTH if wide else None)


def counting_bar(console: Console, label: str) -> Progress:
    """A progress bar showing ``label``, the bar, ``done/total`` and the elapsed time."""
    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
