"""``flwr run .``: the experiment of ``python -m fedmem.simulate``, run the Flower way.

``pyproject.toml`` declares this module's :data:`server_app` and the ClientApp
(:data:`fedmem.federation.client_app.app`) as the Flower App's components. Flower builds the
project into a FAB, its SuperLink starts a simulation with ``num-supernodes`` SuperNodes and runs
:data:`server_app` with the app's run config (``[tool.flwr.app.config]``, changed per run with
``flwr run . --run-config "..."``):

- ``config``: the YAML config (a relative path is taken inside the app, like ``configs/...``);
- ``overrides``: dotted ``key=value`` overrides, space-separated, as for ``fedmem.simulate``;
- ``out``: parent folder of run directories (``--out``; empty: the config's ``output.dir``);
- ``force``: recompute a complete run (``--force``).

The ServerApp runs :func:`fedmem.runs.experiment.run_or_load`, so the run directory (named
from the config hash) gets the same files as with ``fedmem.simulate``: the central run trains
in the ServerApp's process, the federated rounds go through the Grid Flower hands the ServerApp
(:func:`fedmem.federation.engine.external_grid`) to the ClientApps in Flower's Ray actors.
Relative ``output.dir`` and ``data.cache_dir`` are taken from the working directory of the
process that runs the ServerApp (the SuperLink's), so give ``out`` as an absolute path.
The federation must have ``federation.num_clients`` SuperNodes (checked; one-line error).
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmem import config as config_mod
from fedmem.config import ExperimentConfig
from fedmem.errors import ConfigError, InputError, RunFailed
from fedmem.federation.client_app import app as client_app
from fedmem.progress import cli_console

__all__ = ["client_app", "server_app", "experiment_config", "check_federation_size"]

APP_DIR = Path(__file__).resolve().parents[1]  # the installed app (FAB) or the checkout
RUN_CONFIG_KEYS = ("config", "overrides", "out", "force")

server_app = ServerApp()


def experiment_config(
    run_config: dict[str, Any], app_dir: Path = APP_DIR, cwd: Path | None = None
) -> tuple[ExperimentConfig, bool]:
    """The experiment config and ``force`` flag for a ServerApp's ``context.run_config``.

    The same loading as ``python -m fedmem.simulate --config CONFIG [--out OUT] OVERRIDES``;
    relative ``output.dir`` and ``data.cache_dir`` are made absolute against ``cwd`` (both are
    left out of the config hash, so the run directory's name does not change).
    """
    unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS))
    if unknown:
        known = ", ".join(RUN_CONFIG_KEYS)
        raise ConfigError(f"flwr run: unknown run config key(s) {unknown}; known: {known}")
    path = Path(str(run_config.get("config") or "configs/default.yaml")).expanduser()
    if not path.is_absolute():
        path = app_dir / path
    overrides = shlex.split(str(run_config.get("overrides") or ""))
    if run_config.get("out"):
        overrides.append(f"output.dir={run_config['out']}")
    cfg = config_mod.load(path, overrides, default_name=path.stem)
    base = (cwd or Path.cwd()).resolve()
    absolute = [
        f"{key}={base / value}"
        for key, value in (("output.dir", cfg.output.dir), ("data.cache_dir", cfg.data.cache_dir))
        if not Path(value).is_absolute()
    ]
    if absolute:
        cfg = config_mod.load(path, overrides + absolute, default_name=path.stem)
    fed = cfg.federation
    if fed.enabled and fed.backend != "ray":
        raise ConfigError(
            f"federation.backend={fed.backend}: under flwr run Flower's simulation runtime runs"
            " the clients; drop the override or use python -m fedmem.simulate"
        )
    if fed.enabled and fed.ray_address:
        raise ConfigError(
            "federation.ray_address: under flwr run the SuperLink starts Ray; drop the override"
        )
    return cfg, bool(run_config.get("force", False))


def check_federation_size(grid: Grid, num_clients: int, timeout: float = 600.0) -> None:
    """One-line :class:`ConfigError` unless the federation has ``num_clients`` SuperNodes.

    Flower registers the simulated SuperNodes while the ServerApp starts, all at once: the
    count is read once it is non-zero and has not changed for half a second.
    """
    deadline = time.monotonic() + timeout
    count, since = 0, time.monotonic()
    while True:
        now = len(list(grid.get_node_ids()))
        if now != count:
            count, since = now, time.monotonic()
        elif count and time.monotonic() - since >= 0.5:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if count != num_clients:
        raise ConfigError(
            f"flwr run: the federation has {count} SuperNodes but federation.num_clients="
            f'{num_clients}; run with --federation-config "num-supernodes={num_clients}"'
        )


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or reuse) the experiment's run directory, like ``python -m fedmem.simulate``."""
    from fedmem.federation.engine import external_grid
    from fedmem.reporting.tables import runs_table
    from fedmem.runs.experiment import run_or_load

    console = cli_console()
    try:
        cfg, force = experiment_config(dict(context.run_config))
        if cfg.federation.enabled:
            check_federation_size(grid, cfg.federation.num_clients)
        with external_grid(grid):
            rd, summary = run_or_load(cfg, console, force)
    except (InputError, RunFailed) as e:
        console.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        raise
    console.print(runs_table(summary["runs"], title=f"{cfg.output.name}  ({rd.path})"))
