"""What Flower's simulation engine on Ray costs over the same local training done in one process.

    python benchmarks/federation_overhead.py [--clients 10 100] [--rounds 6] [--quick]

For each client count N it runs the default experiment (MNIST-1D, 2-layer MLP; overrides:
``federation.num_clients=N partition.kind=iid data.noise.rate=0.2 data.canaries.count=0
train.rounds=R``, tables cached under ``.cache/benchmarks``) twice:

- **floor**: one process, no Flower, no Ray. Each round, for each client: build the model, load
  the global weights, ``train_epochs`` on the client's rows with the client's batch order
  (``keyed_order``), then FedAvg the state dicts weighted by example count (plain torch). This
  is the work every federated client does, minus the federation machinery. Training runs with
  ``torch.set_num_threads(1)``, like one client actor (``num_cpus=1``). The floor runs once
  before and once after the Flower run (absolute times drift on a shared machine) and the mean
  is reported.
- **flower**: ``run_federated(FederatedJob(...))``, i.e. ``flwr.simulation.run_simulation`` on a
  local Ray with ``num_cpus = os.cpu_count()``. With ``client_resources.num_cpus=1`` Ray runs
  ``cpu_count`` client actors in parallel (2 on a 2-core machine), so an overhead-free Flower
  could be up to ``cpu_count`` times *faster* than the single-threaded floor
  (``slowdown_vs_ideal_parallel_floor`` = slowdown x actors measures against that ideal).

Threads of this process: ``--driver-threads`` (default 1) is set once for the whole benchmark.
It governs the evaluation in both paths (the ServerApp runs in this process). One thread keeps
the evaluation from oversubscribing the 2 cores while the actors or other users' processes
run; a 2-thread evaluation on a busy core pair was seen to take 20x longer.

Evaluation: both paths evaluate the global model with the same :class:`fedmem.observer.Observer`
after every round, so both ``wall_s`` clocks include the same evaluation work. (The evaluation
time of one observer call is also measured on its own and reported as ``eval_s``.)

Throughput counts steady-state rounds only (round 1 pays actor start-up, imports and the table
load in every actor)::

    examples/s = (examples[R] - examples[1]) / (wall_s[R] - wall_s[1])
    s/round    = (wall_s[R] - wall_s[1]) / (R - 1)

``slowdown`` = flower s/round / floor s/round = floor examples/s / flower examples/s (> 1: Flower
is slower). Reported separately: ``ray_start_s`` (``EngineTiming.ray_start_s``),
``first_round_s`` (wall_s[1] - wall_s[0]) and ``outside_rounds_s`` (the part of
``EngineTiming.simulation_s`` not covered by the observer clock: run_simulation start-up,
the partition-id query to every node, shut-down).

Where the time goes. ``phases``: one Flower run cut into Ray start, Flower start, the first
message to every node (the actors start and import), round-0 evaluation, first round, later
rounds, teardown and ``ray.shutdown``. ``steady_round`` (mean of rounds 2..R): evaluation, the
clients' own ``train-s`` (whole ``train`` handler) summed, and the time Flower's worker threads
spend in ``RayBackend.process_message`` per message (submit to an actor, run, fetch the reply),
the rest being Flower's polling (0.1 s on each side) and aggregation. To get these, the benchmark
wraps ``server_app.partition_map``, ``RayBackend.process_message`` and ``ray.shutdown`` in its
own process while the run lasts (timing only; no code is edited, the originals are restored).
CPU: at the end of every round the benchmark reads the CPU seconds of this process, of its Ray
descendants (client actors, raylet, gcs_server, ...) and of the whole machine from /proc.
``cpu_s_per_round`` (our processes only) and ``cpu_ratio`` = flower / floor are robust to other
users' load, which wall-clock times are not; ``other_processes`` shows that load.
``--profile`` additionally runs cProfile on every Python thread of this process during the
Flower run (ServerApp, Flower's message threads and workers; it slows them down, so results go
to ``federation_overhead_profile.json``).

Results: a rich table on stdout and JSON in ``benchmarks/results/federation_overhead.json``
(``--quick``: ``federation_overhead_quick.json``, ``--profile``: ``..._profile.json``).
Ray is shut down after every Flower run; the benchmark waits until the Ray processes it
started have exited and fails (exit code 1) if any is left.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import cProfile  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import pstats  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import flwr  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from fedmem import config  # noqa: E402
from fedmem.config import ExperimentConfig, FederationConfig  # noqa: E402
from fedmem.data.table import ExampleTable, cached_table  # noqa: E402
from fedmem.federation.engine import run_federated  # noqa: E402
from fedmem.federation.server_app import FederatedJob  # noqa: E402
from fedmem.models import (
    build_model,  # noqa: E402
    init_model,  # noqa: E402
)
from fedmem.observer import Observer  # noqa: E402
from fedmem.train import keyed_order, train_epochs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
Row = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
def make_config(
    num_clients: int, rounds: int, cache_dir: Path, quick: bool, backend: str = "ray"
) -> ExperimentConfig:
    overrides = [
        f"federation.num_clients={num_clients}",
        "partition.kind=iid",
        "data.noise.rate=0.2",
        "data.canaries.count=0",
        f"train.rounds={rounds}",
        f"data.cache_dir={cache_dir}",
        "output.name=federation_overhead",
    ]
    if "backend" in FederationConfig.model_fields:  # pin the engine (ray unless --backend)
        overrides.append(f"federation.backend={backend}")
    if quick:
        overrides += ["data.mnist1d.num_samples=1000"]
    return config.load(REPO / "configs" / "default.yaml", overrides)


# ---------------------------------------------------------------------------------------------
# timing helpers
# ---------------------------------------------------------------------------------------------
def steady(rows: list[Row]) -> dict[str, float]:
    """Steady-state throughput from observer rows 0..R (rounds 2..R)."""
    by_round = {int(r["round"]): r for r in rows}
    last = max(by_round)
    if last < 2:
        raise ValueError("need at least 2 rounds for a steady-state measurement")
    r1, rn, r0 = by_round[1], by_round[last], by_round[0]
    span = rn["wall_s"] - r1["wall_s"]
    return {
        "examples_per_s": (rn["examples"] - r1["examples"]) / span,
        "s_per_round": span / (last - 1),
        "first_round_s": r1["wall_s"] - r0["wall_s"],
        "round0_eval_s": r0["wall_s"],
        "total_wall_s": rn["wall_s"],
        "final_test_acc": rn["test_acc"],
    }


def eval_time(table: ExampleTable, cfg: ExperimentConfig, repeats: int = 7) -> float:
    """Median seconds of one observer call (evaluation of the full table and the test set)."""
    model = init_model(cfg, table)
    obs = Observer(table, "eval", lambda row: None, cfg.train.eval_batch_size)
    obs(0, model)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        obs(0, model)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# floor: the same client work in one process
# ---------------------------------------------------------------------------------------------
def fedavg(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    total = float(sum(weights))
    return {
        k: sum(
            s[k].to(torch.float64) * (w / total) for s, w in zip(states, weights, strict=True)
        ).to(states[0][k].dtype)
        for k in states[0]
    }


def run_floor(
    cfg: ExperimentConfig, table: ExampleTable
) -> tuple[list[Row], dict[str, torch.Tensor], list[float], dict[str, float]]:
    """Every client trained in turn in this process.

    Returns the observer rows, the final global weights, the training (+ FedAvg) seconds
    of each round (evaluation excluded) and CPU seconds per steady-state round.
    """
    default_threads = torch.get_num_threads()
    rows: list[Row] = []
    observer = Observer(table, "floor", rows.append, cfg.train.eval_batch_size)
    global_model = init_model(cfg, table)
    examples = 0
    train_s: list[float] = []
    snaps: list[dict[str, float]] = []
    observer.start()
    observer(0, global_model, examples=0)
    for r in range(1, cfg.train.rounds + 1):
        t = time.perf_counter()
        torch.set_num_threads(1)
        global_state = global_model.state_dict()
        states, weights = [], []
        for pid in range(cfg.federation.num_clients):
            model = build_model(cfg.model, table.input_shape, table.num_classes)
            model.load_state_dict(global_state)
            rows_k = table.client_rows(pid)
            x, y = table.x[rows_k], table.y_obs[rows_k]
            order = keyed_order(cfg.seed, r, rows_k, len(table))
            res = train_epochs(model, x, y, cfg.train, order, rows=rows_k)
            examples += res.examples
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(len(rows_k))
        global_model.load_state_dict(fedavg(states, weights))
        torch.set_num_threads(default_threads)
        train_s.append(time.perf_counter() - t)
        observer(r, global_model, examples=examples)
        rows[-1]["process_s"] = time.process_time()  # CPU of this process, round by round
        snaps.append(cpu_snapshot())
    final = {k: v.detach().clone() for k, v in global_model.state_dict().items()}
    return rows, final, train_s, cpu_per_round(snaps)


# ---------------------------------------------------------------------------------------------
# flower: the real simulation engine
# ---------------------------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, str, float]]:
    """pid -> (ppid, command name, CPU seconds so far) for every live process (Linux /proc)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z":  # zombie: already dead
            continue
        out[int(entry)] = (int(fields[1]), name, (int(fields[11]) + int(fields[12])) / _TICK)
    return out


def descendants(
    root: int, procs: dict[int, tuple[int, str, float]] | None = None
) -> dict[int, str]:
    procs = procs if procs is not None else _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = {}, [root]
    while stack:
        for c in children.get(stack.pop(), []):
            found[c] = procs[c][1]
            stack.append(c)
    return found


def wait_gone(procs: dict[int, str], timeout: float = 30.0) -> tuple[dict[int, str], float]:
    """Wait until the processes ``procs`` have exited (Ray's actors exit asynchronously after
    ``ray.shutdown``). Returns those still alive after ``timeout`` and the seconds waited."""
    t0 = time.perf_counter()
    while True:
        alive = _proc_table()
        left = {p: n for p, n in procs.items() if p in alive and alive[p][1] == n}
        waited = time.perf_counter() - t0
        if not left or waited > timeout:
            return left, waited
        time.sleep(0.1)


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores; /proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICK  # minus idle and iowait


def _group(name: str, pid: int) -> str:
    if pid == os.getpid():
        return "driver"
    if name.startswith("ray::ClientApp"):
        return "client_actors"
    if name in ("raylet", "gcs_server"):
        return name
    return "other_ray"


def cpu_snapshot() -> dict[str, float]:
    """CPU seconds so far of this process, its Ray descendants by kind, and the machine."""
    procs = _proc_table()
    ours = {os.getpid(): procs[os.getpid()][1], **descendants(os.getpid(), procs)}
    out = {"wall": time.perf_counter(), "machine": _machine_busy_s()}
    for pid, name in ours.items():
        key = _group(name, pid)
        out[key] = out.get(key, 0.0) + procs[pid][2]
    return out


def cpu_per_round(snaps: list[dict[str, float]]) -> dict[str, float]:
    """Mean CPU seconds per interval between consecutive snapshots, by process kind.

    ``other_processes`` is the machine's busy time not spent by this benchmark's processes
    (other users' work competing for the cores). Processes that exit between snapshots
    are missed, hence clipped at 0.
    """
    keys = sorted({k for s in snaps for k in s} - {"wall", "machine"})
    out: dict[str, list[float]] = {}
    for a, b in zip(snaps, snaps[1:], strict=False):
        d = {k: max(0.0, b.get(k, 0.0) - a.get(k, 0.0)) for k in keys}
        d["other_processes"] = max(0.0, b["machine"] - a["machine"] - sum(d.values()))
        d["wall"] = b["wall"] - a["wall"]
        for k, v in d.items():
            out.setdefault(k, []).append(v)
    return {k: statistics.fmean(v) for k, v in out.items()}


class _AllThreadsProfiler:
    """cProfile every Python thread this process starts while active (Flower's ServerApp
    thread, its message extractor/injector threads and its worker threads) and merge them.

    cProfile only sees the thread that enables it, so ``threading.Thread.run`` is wrapped.
    The profile covers the whole Flower run (start-up and round 1 included).
    """

    def __init__(self) -> None:
        self.profiles: list[tuple[str, cProfile.Profile]] = []
        self._orig_run: Any = None

    def __enter__(self) -> _AllThreadsProfiler:
        orig_run = self._orig_run = threading.Thread.run
        profiles = self.profiles

        def run(thread: threading.Thread) -> None:
            prof = cProfile.Profile()
            profiles.append((thread.name, prof))
            prof.enable()
            try:
                orig_run(thread)
            finally:
                prof.disable()

        threading.Thread.run = run  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        threading.Thread.run = self._orig_run  # type: ignore[method-assign]

    WAITS = re.compile(
        r"\b(acquire|sleep|wait|select|poll|epoll_wait|recv|recv_into|accept|"
        r"get_objects|listen_error_messages)\b"
    )

    def report(self, limit: int = 30) -> str:
        """Functions by own time, waiting (locks, sleeps, ray.get) summed into one line."""
        profs = [p for _, p in self.profiles]
        if not profs:
            return "no threads profiled\n"
        stats = pstats.Stats(profs[0])
        for prof in profs[1:]:
            stats.add(prof)
        entries = stats.stats  # type: ignore[attr-defined]
        busy, waiting = [], 0.0
        for (file, line, func), (_, ncalls, tottime, cumtime, _) in entries.items():
            if self.WAITS.search(func):
                waiting += tottime
            else:
                where = f"{Path(file).name}:{line}({func})" if file != "~" else func
                busy.append((tottime, cumtime, ncalls, where))
        busy.sort(reverse=True)
        names = sorted({n.split(" ")[0].split("_")[0] for n, _ in self.profiles})
        lines = [
            f"{len(profs)} threads ({', '.join(names)}); whole run, start-up included",
            f"waiting (locks, sleeps, ray.get, ...): {waiting:.2f} s over all threads",
            f"busy, top {limit} by own time:",
            f"{'own s':>8} {'cum s':>8} {'calls':>8}  function",
        ]
        for tot, cum, n, where in busy[:limit]:
            lines.append(f"{tot:8.3f} {cum:8.3f} {n:8d}  {where}")
        lines.append(f"busy total: {sum(b[0] for b in busy):.2f} s over all threads")
        return "\n".join(lines) + "\n"


class _TimedObserver(Observer):
    """An Observer that also keeps the absolute time of ``start`` and of each call."""

    def start(self) -> None:
        super().start()
        self.t_start = time.perf_counter()
        self.calls: list[tuple[int, float, float]] = []  # (round, begin, end)

    def __call__(self, round_: int, model: Any, **extra: Any) -> Row:
        t = time.perf_counter()
        row = super().__call__(round_, model, **extra)
        self.calls.append((round_, t, time.perf_counter()))
        return row


class _Probe:
    """Times Flower's moving parts by wrapping them in this process (nothing is edited).

    - ``fedmem.federation.server_app.partition_map``: the first message to every node;
    - ``RayBackend.process_message``: one ClientApp call as a Flower worker thread sees it
      (submit to an actor, run, fetch the reply), per message, with its round;
    - ``ray.shutdown``.
    """

    def __init__(self) -> None:
        self.partition_map: tuple[float, float] | None = None
        # (round or 0 = query, begin, end, worker thread)
        self.messages: list[tuple[int, float, float, int]] = []
        self.shutdowns: list[float] = []
        self._undo: list[tuple[Any, str, Any]] = []

    def _patch(self, owner: Any, name: str, wrapper: Any) -> None:
        self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, wrapper)

    def __enter__(self) -> _Probe:
        from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

        from fedmem.federation import server_app

        orig_pm = server_app.partition_map
        orig_pm_msg = RayBackend.process_message
        orig_shutdown = ray.shutdown

        def partition_map(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return orig_pm(*a, **kw)
            finally:
                self.partition_map = (t, time.perf_counter())

        def process_message(backend: Any, message: Any, context: Any) -> Any:
            try:
                round_ = int(message.content["config"]["server-round"])
            except (KeyError, TypeError):
                round_ = 0
            t = time.perf_counter()
            try:
                return orig_pm_msg(backend, message, context)
            finally:
                self.messages.append((round_, t, time.perf_counter(), threading.get_ident()))

        def shutdown(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return orig_shutdown(*a, **kw)
            finally:
                self.shutdowns.append(time.perf_counter() - t)

        self._patch(server_app, "partition_map", partition_map)
        self._patch(RayBackend, "process_message", process_message)
        self._patch(ray, "shutdown", shutdown)
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, orig in reversed(self._undo):
            setattr(owner, name, orig)
        self._undo.clear()


def run_flower(cfg: ExperimentConfig, table: ExampleTable, profile: bool) -> Row:
    rows: list[Row] = []
    clients: list[Row] = []
    ray_procs: dict[int, str] = {}
    snaps: list[dict[str, float]] = []

    def on_round(r: int, row: Row) -> None:
        if r == 1:  # Ray and every actor are up: remember what we started
            ray_procs.update(descendants(os.getpid()))
        if r >= 1:  # CPU counters at the end of rounds 1..R: intervals = rounds 2..R
            snaps.append(cpu_snapshot())

    observer = _TimedObserver(table, "flower", rows.append, cfg.train.eval_batch_size)
    job = FederatedJob(cfg, table, observer, client_sink=clients.append, on_round=on_round)
    profiler = _AllThreadsProfiler()
    with _Probe() as probe, profiler if profile else contextlib.nullcontext():
        t_call = time.perf_counter()
        timing = run_federated(job)
        t_return = time.perf_counter()
    assert job.final_state is not None
    return {
        "rows": rows,
        "clients": clients,
        "final_state": job.final_state,
        "timing": timing,
        "ray_procs": ray_procs,
        "cpu_per_round": cpu_per_round(snaps),
        "profile": profiler.report() if profile else None,
        "phases": phases(timing, probe, observer, t_call, t_return),
        "steady_breakdown": steady_breakdown(rows, clients, probe, observer),
    }


def phases(
    timing: Any, probe: _Probe, obs: _TimedObserver, t_call: float, t_return: float
) -> dict[str, float]:
    """Wall time of one Flower run, phase by phase (seconds; they add up to ``total_s``)."""
    t_ray = t_call + timing.ray_start_s
    pm0, pm1 = probe.partition_map or (obs.t_start, obs.t_start)
    calls = {r: (b, e) for r, b, e in obs.calls}
    last = max(calls)
    return {
        "ray_start_s": timing.ray_start_s,
        "flower_start_s": pm0 - t_ray,  # run_simulation set-up until the ServerApp asks nodes
        "node_query_s": pm1 - pm0,  # first message to every node (actors start, import)
        "round0_eval_s": calls[0][1] - obs.t_start,
        "first_round_s": calls[1][1] - calls[0][1],
        "later_rounds_s": calls[last][1] - calls[1][1],
        "teardown_s": t_return - calls[last][1] - sum(probe.shutdowns),
        "ray_shutdown_s": sum(probe.shutdowns),
        "total_s": t_return - t_call,
    }


def steady_breakdown(
    rows: list[Row], clients: list[Row], probe: _Probe, obs: _TimedObserver
) -> dict[str, float]:
    """Mean over rounds 2..R of where a round's wall time goes (seconds per round).

    - ``eval_s``: the observer call (in the ServerApp thread);
    - ``client_handler_s``: sum of the clients' own ``train-s`` (inside the actors);
    - ``ray_call_s``: sum of ``RayBackend.process_message`` times (handler + Ray task
      submission, (de)serialisation of message and context, result fetch);
    - ``ray_call_per_worker_s``: ``ray_call_s`` / number of Flower worker threads (= actors);
    - ``dispatch_idle_s``: round - eval - ray_call_per_worker: polling intervals of Flower's
      in-memory message passing (0.1 s each side), aggregation, waiting on the slowest worker.
    """
    calls = {r: (b, e) for r, b, e in obs.calls}
    rounds = [r for r in sorted(calls) if r >= 2]
    workers = max(1, len({th for r, _, _, th in probe.messages if r >= 2}))
    out: dict[str, list[float]] = {}
    for r in rounds:
        round_s = calls[r][1] - calls[r - 1][1]
        eval_s = calls[r][1] - calls[r][0]
        handler = sum(c.get("train_s", 0.0) for c in clients if c["round"] == r)
        ray_call = sum(e - b for rr, b, e, _ in probe.messages if rr == r)
        n_msgs = sum(1 for m in probe.messages if m[0] == r)
        vals = {
            "round_s": round_s,
            "eval_s": eval_s,
            "client_handler_s": handler,
            "ray_call_s": ray_call,
            "ray_call_per_worker_s": ray_call / workers,
            "dispatch_idle_s": round_s - eval_s - ray_call / workers,
            "mean_handler_ms": 1000 * handler / max(1, n_msgs),
            "mean_ray_call_ms": 1000 * ray_call / max(1, n_msgs),
        }
        for k, v in vals.items():
            out.setdefault(k, []).append(v)
    res = {k: statistics.fmean(v) for k, v in out.items()}
    res["workers"] = workers
    return res


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def bench(num_clients: int, args: argparse.Namespace, console: Console) -> Row:
    cfg = make_config(num_clients, args.rounds, args.cache_dir, args.quick, args.backend)
    table = cached_table(cfg)
    ev = eval_time(table, cfg)

    console.print(f"[bold]{num_clients} clients[/]: floor (before) ...")
    floor_a, state_a, train_a, cpu_a = run_floor(cfg, table)
    console.print(f"[bold]{num_clients} clients[/]: flower ...")
    fl = run_flower(cfg, table, args.profile)
    still_running, exit_s = wait_gone(fl["ray_procs"])
    console.print(f"[bold]{num_clients} clients[/]: floor (after) ...")
    floor_b, state_b, train_b, cpu_b = run_floor(cfg, table)

    fa, fb, fs = steady(floor_a), steady(floor_b), steady(fl["rows"])
    floor_ex_s = statistics.fmean([fa["examples_per_s"], fb["examples_per_s"]])
    floor_s_round = statistics.fmean([fa["s_per_round"], fb["s_per_round"]])
    workers = fl["steady_breakdown"]["workers"]
    floor_cpu = statistics.fmean([cpu_a["driver"], cpu_b["driver"]])
    flower_cpu = sum(
        v for k, v in fl["cpu_per_round"].items() if k not in ("wall", "other_processes")
    )
    fl_state = fl["final_state"]
    max_diff = max(float((fl_state[k].float() - state_a[k].float()).abs().max()) for k in state_a)
    return {
        "clients": num_clients,
        "rounds": cfg.train.rounds,
        "train_examples": len(table),
        "examples_per_client": len(table) / num_clients,
        "eval_s": ev,
        "floor": {
            "examples_per_s": floor_ex_s,
            "s_per_round": floor_s_round,
            "train_s_per_round": statistics.fmean(train_a[1:] + train_b[1:]),
            "runs": [{**fa, "cpu_per_round": cpu_a}, {**fb, "cpu_per_round": cpu_b}],
        },
        "flower": {
            **fs,
            "ray_start_s": fl["timing"].ray_start_s,
            "simulation_s": fl["timing"].simulation_s,
            "outside_rounds_s": fl["timing"].simulation_s - fs["total_wall_s"],
            "phases": fl["phases"],
            "steady_round": fl["steady_breakdown"],
            "cpu_per_round": fl["cpu_per_round"],
        },
        "slowdown": floor_ex_s / fs["examples_per_s"],
        "cpu_s_per_round": {"floor": floor_cpu, "flower": flower_cpu},
        "cpu_ratio": flower_cpu / floor_cpu,
        "slowdown_vs_ideal_parallel_floor": floor_ex_s * workers / fs["examples_per_s"],
        "check": {
            "max_abs_weight_diff_flower_vs_floor": max_diff,
            "floor_runs_identical": all(torch.equal(state_a[k], state_b[k]) for k in state_a),
            "ray_initialized_after": ray.is_initialized(),
            "ray_processes_started": len(fl["ray_procs"]),
            "ray_processes_gone_after_s": exit_s,
            "ray_processes_left": sorted(f"{p}:{n}" for p, n in still_running.items()),
        },
        **({"driver_profile": fl["profile"]} if fl["profile"] else {}),
    }


def machine_info() -> Row:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": flwr.__version__,
        "ray": ray.__version__,
        "driver_torch_threads": torch.get_num_threads(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "loadavg_start": list(os.getloadavg()),
    }


def print_tables(results: list[Row], console: Console) -> None:
    t = Table(title="Flower on Ray vs the one-process floor (steady-state rounds 2..R)")
    for col in (
        "clients",
        "floor ex/s",
        "flower ex/s",
        "slowdown",
        "floor s/round",
        "flower s/round",
        "cpu-s/round floor",
        "cpu-s/round flower",
        "cpu ratio",
        "ray start s",
        "1st round s",
        "eval s",
    ):
        t.add_column(col, justify="right")
    for r in results:
        f = r["flower"]
        t.add_row(
            str(r["clients"]),
            f"{r['floor']['examples_per_s']:,.0f}",
            f"{f['examples_per_s']:,.0f}",
            f"{r['slowdown']:.1f}x",
            f"{r['floor']['s_per_round']:.3f}",
            f"{f['s_per_round']:.3f}",
            f"{r['cpu_s_per_round']['floor']:.3f}",
            f"{r['cpu_s_per_round']['flower']:.3f}",
            f"{r['cpu_ratio']:.1f}x",
            f"{f['ray_start_s']:.2f}",
            f"{f['first_round_s']:.2f}",
            f"{r['eval_s']:.3f}",
        )
    console.print(t)

    p = Table(title="One Flower run, phase by phase (s)")
    keys = list(results[0]["flower"]["phases"])
    p.add_column("clients", justify="right")
    for k in keys:
        p.add_column(k.removesuffix("_s"), justify="right")
    for r in results:
        p.add_row(str(r["clients"]), *(f"{r['flower']['phases'][k]:.2f}" for k in keys))
    console.print(p)

    b = Table(title="A steady-state Flower round (s; mean of rounds 2..R)")
    cols = (
        "round_s",
        "eval_s",
        "client_handler_s",
        "ray_call_s",
        "ray_call_per_worker_s",
        "dispatch_idle_s",
        "mean_handler_ms",
        "mean_ray_call_ms",
    )
    b.add_column("clients", justify="right")
    b.add_column("floor train", justify="right")
    for c in cols:
        b.add_column(c.removesuffix("_s"), justify="right")
    for r in results:
        sr = r["flower"]["steady_round"]
        b.add_row(
            str(r["clients"]),
            f"{r['floor']['train_s_per_round']:.3f}",
            *(f"{sr[c]:.3f}" if c.endswith("_s") else f"{sr[c]:.1f}" for c in cols),
        )
    console.print(b)

    c = Table(title="CPU seconds per steady-state round, by process (2 cores = 2 CPU-s per s)")
    kinds = ("driver", "client_actors", "raylet", "gcs_server", "other_ray", "other_processes")
    for col in ("clients", "path", "wall s", *kinds):
        c.add_column(col, justify="right")
    for r in results:
        for path, cpu in (
            ("floor", r["floor"]["runs"][0]["cpu_per_round"]),
            ("floor", r["floor"]["runs"][1]["cpu_per_round"]),
            ("flower", r["flower"]["cpu_per_round"]),
        ):
            c.add_row(
                str(r["clients"]),
                path,
                f"{cpu['wall']:.3f}",
                *(f"{cpu.get(k, 0.0):.3f}" for k in kinds),
            )
    console.print(c)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--clients",
        type=int,
        nargs="+",
        default=None,
        help="client counts (default: 10 100; --quick: 4)",
    )
    p.add_argument("--rounds", type=int, default=None, help="rounds R >= 3 (default 6; quick 3)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke mode: 1000 MNIST-1D examples, 4 clients, 3 rounds",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="cProfile every Flower thread of this process (slows the run; writes "
        "federation_overhead_profile.json)",
    )
    p.add_argument(
        "--driver-threads",
        type=int,
        default=1,
        help="torch threads of this process (evaluation in both paths; default 1)",
    )
    p.add_argument(
        "--backend",
        choices=("ray", "local", "batched"),
        default="ray",
        help="the federated engine measured against the floor (default ray; local and batched "
        "run in this process: the Ray-specific columns stay empty). The three-way comparison "
        "plain / local / batched with medians: benchmarks/batched_backend.py",
    )
    p.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "benchmarks")
    p.add_argument("--out", type=Path, default=None, help="JSON output file")
    args = p.parse_args(argv)
    args.clients = args.clients or ([4] if args.quick else [10, 100])
    args.rounds = args.rounds or (3 if args.quick else 6)
    if args.rounds < 3:
        p.error("--rounds must be >= 3 (round 1 is warm-up; throughput needs rounds 2..R)")
    suffix = "_quick" if args.quick else "_profile" if args.profile else ""
    suffix += "" if args.backend == "ray" else f"_{args.backend}"
    args.out = args.out or RESULTS / f"federation_overhead{suffix}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=180)
    torch.set_num_threads(args.driver_threads)
    info = machine_info()
    results = []
    try:
        for n in args.clients:
            results.append(bench(n, args, console))
    finally:
        if ray.is_initialized():
            ray.shutdown()
    info["loadavg_end"] = list(os.getloadavg())
    print_tables(results, console)
    for r in results:
        if "driver_profile" in r:
            console.print(f"[bold]driver threads' profile, {r['clients']} clients, whole run[/]")
            console.print(r["driver_profile"], markup=False, highlight=False)
    doc = {
        "benchmark": "federation_overhead",
        "method": "steady-state rounds 2..R; both paths evaluate with the same Observer each "
        "round; floor = 1 torch thread, one process, mean of a run before and after "
        "the Flower run; slowdown = floor ex/s / flower ex/s",
        "machine": info,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    left = [p for r in results for p in r["check"]["ray_processes_left"]]
    if ray.is_initialized() or left:
        console.print(f"[red]Ray not fully shut down: initialized={ray.is_initialized()} {left}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
