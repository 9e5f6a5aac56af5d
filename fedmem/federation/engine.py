"""``run_federated``: the only place that starts Ray and calls ``flwr.simulation.run_simulation``.

- A local Ray binds to loopback only: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is put in the
  environment before Ray starts (Ray then uses 127.0.0.1 for every address).
- ``federation.ray_address`` (e.g. ``auto`` or ``127.0.0.1:6379``) joins an existing cluster
  instead; clients there rebuild the ExampleTable from the config.
- A local Ray inlines task arguments and results up to 8 MiB (:data:`RAY_SYSTEM_CONFIG`: the
  models in Flower's messages skip Ray's object store).
- Client actors get ``federation.client_resources`` (``num_cpus``, fractional ``num_gpus``) and
  set ``torch.set_num_threads`` to their ``num_cpus``.
- Flower's and Ray's logging are kept quiet and telemetry is off.
- ``federation.backend=local`` runs the same ServerApp and ClientApp in this process through
  :class:`~fedmem.federation.local_grid.LocalGrid` (no Ray): fast on one small machine.
- ``federation.backend=batched``: the same ServerApp and strategies; all clients of a round are
  trained at once as stacked models (:class:`~fedmem.federation.batched_grid.BatchedGrid`).
- Inside :func:`external_grid` (``flwr run``: :mod:`fedmem.flwr_app`) the same ServerApp logic
  drives the Grid that Flower handed to the ServerApp; Flower runs the clients.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

from flwr.app import Context, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

from fedmem.federation.client_app import THREADS_ENV  # noqa: E402
from fedmem.federation.server_app import FederatedJob, make_server_app, run_job  # noqa: E402
from fedmem.observer import stops_here  # noqa: E402

# Every train message carries the global model and every reply a client's. Ray passes
# arguments and results above 100 KiB through its shared-memory object store (a put, a raylet
# round trip and a fetch each); inlined in the task's RPC up to 8 MiB, the issue-16 workload's
# rounds (100 clients, 0.3 MB models) took 0.8 s instead of 1.2-1.3 s, and the raylet's CPU
# per round fell from 0.4 s to ~0.
RAY_SYSTEM_CONFIG = {"max_direct_call_object_size": 8 * 1024 * 1024}


@dataclass(frozen=True)
class EngineTiming:
    ray_start_s: float  # ray.init (local start or connecting to a cluster)
    simulation_s: float  # run_simulation, rounds and evaluations included


def client_threads(num_cpus: float) -> int:
    """Torch threads of one client: its ``num_cpus`` (at least 1), on either backend."""
    return max(1, int(num_cpus))


def _quiet_logs() -> None:
    for name in ("flwr", "ray", "filelock"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _init_ray(address: str | None, client_threads: int) -> None:
    import ray

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    pythonpath = os.pathsep.join(p for p in sys.path if p)
    env_vars = {
        "PYTHONPATH": pythonpath,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "FLWR_TELEMETRY_ENABLED": "0",
        THREADS_ENV: str(client_threads),
    }
    common = {
        "runtime_env": {"env_vars": env_vars},
        "log_to_driver": False,
        "logging_level": logging.ERROR,
        "include_dashboard": False,
    }
    if address:
        ray.init(address=address, **common)
    else:  # a cluster's system config is its own: set only on the Ray started here
        ray.init(num_cpus=os.cpu_count() or 1, _system_config=RAY_SYSTEM_CONFIG, **common)


def run_federated(job: FederatedJob) -> EngineTiming:
    """Run the federated experiment described by ``job`` through Flower.

    ``federation.backend=ray`` (default): Flower's simulation engine with clients in Ray
    actors; Ray is shut down afterwards, also when the run fails. ``local``: the same
    ServerApp and ClientApp driven in this process by :class:`LocalGrid`. ``batched``: the
    same ServerApp, the round's clients trained at once by :class:`BatchedGrid`.
    Results arrive through ``job`` (observer rows, client rows).
    """
    grid = _EXTERNAL_GRID.get()
    if grid is not None:  # flwr run: Flower's runtime, Flower's logging
        t0 = time.perf_counter()
        run_job(job, grid)
        _check(job)
        return EngineTiming(ray_start_s=0.0, simulation_s=time.perf_counter() - t0)
    _quiet_logs()
    if job.cfg.federation.backend in ("local", "batched"):
        return _run_local(job)
    return _run_ray(job)


_EXTERNAL_GRID: ContextVar[Grid | None] = ContextVar("fedmem_external_grid", default=None)


@contextmanager
def external_grid(grid: Grid) -> Iterator[None]:
    """Within: :func:`run_federated` runs its rounds through ``grid`` (a ServerApp's, under
    ``flwr run``) instead of starting a simulation itself."""
    token = _EXTERNAL_GRID.set(grid)
    try:
        yield
    finally:
        _EXTERNAL_GRID.reset(token)


def _run_local(job: FederatedJob) -> EngineTiming:
    from fedmem.federation import client_app
    from fedmem.federation.local_grid import RUN_ID, LocalGrid

    t0 = time.perf_counter()
    fed = job.cfg.federation
    if fed.backend == "batched":
        from fedmem.federation.batched_grid import BatchedGrid

        grid: LocalGrid = BatchedGrid(client_app.app, fed.num_clients)
    else:
        threads = client_threads(fed.client_resources.num_cpus)
        grid = LocalGrid(client_app.app, fed.num_clients, threads)
    context = Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(), run_config={})
    make_server_app(job)(grid, context)
    _check(job)
    return EngineTiming(ray_start_s=0.0, simulation_s=time.perf_counter() - t0)


def _check(job: FederatedJob) -> None:
    if job.error is not None:
        raise job.error
    first = job.start[0] + 1 if job.start is not None else 1  # rewound tickets start later
    expected = job.cfg.train.rounds - first + 1 + (first == 1)  # round 0 is observed at 1
    if job.rows and stops_here(job.cfg, job.rows[-1]):
        expected = int(job.rows[-1]["round"]) + 1  # stopped where the model diverged
    if len(job.rows) != expected:
        raise RuntimeError(
            f"federated run observed {len(job.rows)} of {expected} rounds; see Flower's log"
        )


def _run_ray(job: FederatedJob) -> EngineTiming:
    import ray
    from flwr.simulation import run_simulation

    from fedmem.federation import client_app
    from fedmem.federation.linkstate_patch import fast_message_lookup
    from fedmem.federation.prompt_delivery import prompt_delivery

    cfg = job.cfg
    t0 = time.perf_counter()
    if ray.is_initialized():
        ray.shutdown()
    resources = cfg.federation.client_resources
    _init_ray(cfg.federation.ray_address, client_threads(resources.num_cpus))
    t1 = time.perf_counter()
    try:
        # Flower's per-tick scan is O(nodes x messages); its loops poll every 0.1 s
        with fast_message_lookup(), prompt_delivery():
            run_simulation(
                server_app=make_server_app(job),
                client_app=client_app.app,
                num_supernodes=cfg.federation.num_clients,
                backend_config={
                    "client_resources": {
                        "num_cpus": resources.num_cpus,
                        "num_gpus": resources.num_gpus,
                    },
                    "init_args": {"log_to_driver": False, "logging_level": logging.ERROR},
                },
            )
    finally:
        if ray.is_initialized():
            ray.shutdown()
        _quiet_logs()
    _check(job)
    return EngineTiming(ray_start_s=t1 - t0, simulation_s=time.perf_counter() - t1)
