"""The rich progress bar of a long batched job (ensembles, shadow models): label, bar, done / total,
elapsed time."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def counting_bar(console: Console, label: str) -> Progress:
    """A progress bar showing ``label``, the bar, ``done/total`` and the elapsed time."""
    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
