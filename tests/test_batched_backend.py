"""The batched federation backend (issue 16): ``federation.backend=batched`` trains all clients
of a round at once as stacked models and must give what the in-process Flower path
(``federation.backend=local``, one ClientApp call per client) gives, within float tolerance:
the same metrics rows, client rows and final weights, for every FedAvg-family strategy it
supports; the same failed and sampled clients; and a one-line error for what it does not
support. No Ray starts here.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedmem import config
from fedmem.errors import ConfigError
from fedmem.federation.arrays import HeldArray, held_record, npy_header
from fedmem.federation.batched_support import STRATEGIES
from fedmem.federation.batched_train import chunk_size, train_clients
from fedmem.federation.engine import run_federated
from fedmem.models import build_model
from fedmem.observer import Observer
from fedmem.simulate import main
from fedmem.train import keyed_order, train_epochs
from tests.conftest import REPO, federated_job, simulate_cli, small_overrides

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(300)]

DEFAULT = REPO / "configs" / "default.yaml"
RTOL, ATOL = 1e-4, 1e-6  # metrics (float32 sums in another order)
WEIGHT_ATOL = 1e-4  # final weights (FedAdam & co. rescale small update differences)
# per strategy: what it needs (fedprox: its mu, applied by the clients)
STRATEGY_ARGS = {"fedprox": ["train.proximal_mu=0.1"]}


def _run(tmp_path, backend: str, *extra: str):
    overrides = [*small_overrides(tmp_path), f"federation.backend={backend}", *extra]
    cfg = config.load(DEFAULT, overrides)
    job, rows, clients = federated_job(cfg)
    run_federated(job)
    return rows, clients, job.final_state


def _close(a, b, where: str) -> None:
    """Equal rows: numbers within tolerance, everything else exactly."""
    assert set(a) == set(b), (where, set(a) ^ set(b))
    for key, va in a.items():
        vb = b[key]
        if isinstance(va, float) and isinstance(vb, int | float) and not isinstance(vb, bool):
            assert math.isclose(va, vb, rel_tol=RTOL, abs_tol=ATOL), (where, key, va, vb)
        else:
            assert va == vb, (where, key, va, vb)


def _assert_same(reference, batched, weight_atol: float = WEIGHT_ATOL) -> None:
    rows_a, clients_a, final_a = reference
    rows_b, clients_b, final_b = batched
    strip = Observer.TIMING_FIELDS
    assert len(rows_a) == len(rows_b)
    for ra, rb in zip(rows_a, rows_b, strict=True):
        _close(
            {k: v for k, v in ra.items() if k not in strip},
            {k: v for k, v in rb.items() if k not in strip},
            f"metrics round {ra['round']}",
        )
    assert len(clients_a) == len(clients_b)
    for ca, cb in zip(clients_a, clients_b, strict=True):
        where = f"client {ca['client']} round {ca['round']}"
        _close(
            {k: v for k, v in ca.items() if k != "train_s"},
            {k: v for k, v in cb.items() if k != "train_s"},
            where,
        )
    assert final_a.keys() == final_b.keys()
    for k in final_a:
        torch.testing.assert_close(final_b[k], final_a[k], rtol=0, atol=weight_atol)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batched_equals_the_flower_path_for_every_supported_strategy(tmp_path, strategy):
    """Dirichlet partition (unequal clients), momentum 0.9, 3 rounds, 4 clients."""
    extra = [f"federation.strategy={strategy}", *STRATEGY_ARGS.get(strategy, [])]
    reference = _run(tmp_path / "local", "local", *extra)
    batched = _run(tmp_path / "batched", "batched", *extra)
    _assert_same(reference, batched)
    assert reference[0][-1]["round"] == 3


@pytest.mark.parametrize(
    "extra",
    [
        ["train.momentum=0", "train.batch_size=10"],  # the fused plain-SGD path
        ["train.weight_decay=0.01", "train.local_epochs=2", "train.batch_size=16"],
        ["train.optimizer=adam", "train.lr=0.002", "train.weight_decay=0.001"],
        ["model.name=cnn1d", "train.batch_size=32", "train.proximal_mu=0.05"],  # torch.func
        ["privacy.user_level=true", "privacy.user_noise_multiplier=0.5"],  # DP-FedAvg server
    ],
    ids=["plain-sgd", "decay-epochs", "adam", "cnn1d-prox", "user-dp"],
)
def test_batched_equals_the_flower_path_for_optimizers_and_models(tmp_path, extra):
    reference = _run(tmp_path / "l", "local", *extra)
    batched = _run(tmp_path / "b", "batched", *extra)
    if "train.optimizer=adam" not in extra:
        _assert_same(reference, batched)
        return
    # Adam divides each coordinate by its own gradient scale: where the gradient is float
    # noise, a last-bit difference becomes a step of up to lr. Metrics agree as above; the
    # weights agree to 1e-4 but in a few coordinates, each off by at most a few steps.
    _assert_same(reference, batched, weight_atol=3 * 0.002)
    close = [(reference[2][k] - batched[2][k]).abs() <= WEIGHT_ATOL for k in reference[2]]
    assert sum(int(c.sum()) for c in close) >= 0.97 * sum(c.numel() for c in close)


def test_failures_and_partial_participation_hit_the_same_clients(tmp_path):
    extra = [
        "federation.num_clients=6",
        "federation.fraction_train=0.5",
        "federation.client_failure_rate=0.3",
        "federation.strategy=fedavgm",
    ]
    reference = _run(tmp_path / "l", "local", *extra)
    batched = _run(tmp_path / "b", "batched", *extra)
    _assert_same(reference, batched)  # failed rows carry the same reason
    failed = [(c["round"], c["client"]) for c in batched[1] if c.get("failed")]
    assert failed, "the config should make some client fail"
    sampled = {r["round"]: r["clients_sampled"] for r in batched[0] if r["round"] > 0}
    assert set(sampled.values()) == {3}


def test_the_cli_run_writes_the_same_metrics_as_the_local_backend(tmp_path):
    """Through ``fedmem.simulate`` (run directory, client state files): metrics.jsonl rows of
    the federated run are equal within tolerance."""
    rows = {}
    for backend in ("local", "batched"):
        out = tmp_path / backend
        args = [
            *small_overrides(out),
            f"federation.backend={backend}",
            "train.rounds=2",
            "checkpoints.client_updates=true",  # the server keeps the replies' arrays
        ]
        assert main(args) == 0
        (run_dir,) = (out / "runs").iterdir()
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        rows[backend] = [r for r in map(json.loads, lines) if r["run"] == "federated"]
    assert len(rows["local"]) == len(rows["batched"]) == 3
    strip = Observer.TIMING_FIELDS
    for a, b in zip(rows["local"], rows["batched"], strict=True):
        _close(
            {k: v for k, v in a.items() if k not in strip},
            {k: v for k, v in b.items() if k not in strip},
            f"round {a['round']}",
        )


# --------------------------------------------------------------------------------------------
# the stacked trainer and the replies' arrays, on their own
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "opt", [{"momentum": 0.9}, {"momentum": 0.0}, {"optimizer": "adam", "lr": 0.01}]
)
def test_each_client_equals_train_epochs_with_its_keyed_order(opt):
    """Uneven clients (one empty, one a single partial batch), two epochs."""
    torch.manual_seed(0)
    n, d, c = 90, 12, 4
    x, y = torch.randn(n, d), torch.randint(0, c, (n,))
    model_cfg = config.ModelConfig(name="mlp", hidden=16, depth=2)
    tcfg = config.TrainConfig(**{"batch_size": 8, "local_epochs": 2, "lr": 0.1, **opt})
    template = build_model(model_cfg, (d,), c)
    start = {k: v.detach() for k, v in template.named_parameters()}
    perm = torch.randperm(n)
    rows = [perm[:37].sort().values, perm[37:40].sort().values, perm[:0], perm[40:].sort().values]
    result = train_clients(template, start, x, y, rows, tcfg, seed=5, round_=3)
    for k, r in enumerate(rows):
        model = build_model(model_cfg, (d,), c)
        model.load_state_dict(start)
        ref = train_epochs(model, x[r], y[r], tcfg, keyed_order(5, 3, r, n), rows=r)
        assert (result.steps[k], result.examples[k]) == (ref.steps, ref.examples)
        assert math.isclose(result.loss[k], ref.loss, rel_tol=1e-5, abs_tol=1e-7)
        got = result.weights(k)
        for name, p in model.named_parameters():
            torch.testing.assert_close(got[name], p.detach(), rtol=0, atol=2e-6)


def test_chunks_and_worker_threads_change_nothing(monkeypatch):
    """Clients split into chunks trained by two threads give the numbers of one chunk."""
    import fedmem.federation.batched_train as batched_train

    torch.manual_seed(1)
    n, d, c = 200, 10, 3
    x, y = torch.randn(n, d), torch.randint(0, c, (n,))
    tcfg = config.TrainConfig(batch_size=8, momentum=0.9, lr=0.05)
    template = build_model(config.ModelConfig(name="mlp", hidden=16, depth=1), (d,), c)
    start = {k: v.detach() for k, v in template.named_parameters()}
    rows = list(torch.randperm(n).split([3, 40, 17, 60, 25, 55]))
    rows = [r.sort().values for r in rows]
    one = train_clients(template, start, x, y, rows, tcfg, seed=0, round_=1)
    client_bytes = sum(t.numel() * t.element_size() for t in start.values())
    monkeypatch.setattr(batched_train, "CHUNK_BYTES", 2 * client_bytes)  # 2 clients a chunk
    split = train_clients(template, start, x, y, rows, tcfg, seed=0, round_=1, workers=2)
    assert len(split.chunks) == 3 and split.steps == one.steps
    for k in range(len(rows)):
        for name, t in one.weights(k).items():
            torch.testing.assert_close(split.weights(k)[name], t, rtol=0, atol=1e-6)
        assert math.isclose(split.loss[k], one.loss[k], rel_tol=1e-6)


def test_chunk_size_splits_evenly_over_workers_within_the_memory_cap(monkeypatch):
    import fedmem.federation.batched_train as batched_train

    monkeypatch.setattr(batched_train, "CHUNK_BYTES", 1000)
    assert chunk_size(100, 1, 10) == 100  # one chunk per worker
    assert chunk_size(100, 2, 10) == 50
    assert chunk_size(101, 2, 10) == 51
    assert chunk_size(100, 1, 30) == 25  # 33 fit under the cap: four chunks of 25
    assert chunk_size(100, 1, 5000) == 1  # one client over the cap still trains
    assert chunk_size(3, 8, 10) == 1
    assert chunk_size(0, 2, 10) == 1  # a round without clients trains no chunk


def test_held_arrays_hold_what_flower_arrays_hold():
    state = {"w": torch.randn(5, 3), "b": torch.randn(5), "s": torch.tensor(2.0)}
    record = held_record(state)
    assert list(record) == list(state)
    for name, t in state.items():
        values = t.numpy()
        held, plain = record[name], Array(values)
        assert isinstance(held, HeldArray)
        assert (held.dtype, held.shape, held.stype, held.data) == (
            plain.dtype,
            plain.shape,
            plain.stype,
            plain.data,
        )
        out = held.numpy()
        assert out.flags.writeable and np.array_equal(out, plain.numpy())
        out += 1  # a copy: the record does not change
        assert np.array_equal(held.numpy(), values)
        assert ArrayRecord({name: held})[name] == plain  # Flower's copy reads data
    replaced = held_record({"w": torch.zeros(2)})["w"]
    replaced.data = Array(np.ones(3, dtype=np.float32)).data  # new bytes replace the values
    assert np.array_equal(replaced.numpy(), np.ones(3, dtype=np.float32))
    assert npy_header(np.dtype("float32"), (5, 3)) == Array(state["w"].numpy()).data[:-60]


# --------------------------------------------------------------------------------------------
# what it does not support: one line naming the setting, never another path silently
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "key"),
    [
        (["federation.strategy=krum"], "federation.strategy"),
        (["privacy.record_level=true", "privacy.noise_multiplier=1.0"], "privacy.record_level"),
        (["model.name=resnet9"], "model.name"),
        (["model.dropout.kind=example"], "model.dropout.kind"),
        (["plugins.elr.enabled=true"], "plugins.elr.enabled"),
        (["plugins.external=[tests.plugins:InterruptFederatedOnce]"], "plugins.external"),
    ],
)
def test_unsupported_settings_are_one_line_config_errors(tmp_path, extra, key):
    with pytest.raises(ConfigError) as err:
        config.load(DEFAULT, [*small_overrides(tmp_path), "federation.backend=batched", *extra])
    message = str(err.value)
    assert message.startswith(f"{key}: ") and "federation.backend=batched" in message
    assert "\n" not in message
    # the same settings on the local backend are fine
    config.load(DEFAULT, [*small_overrides(tmp_path), "federation.backend=local", *extra])


def test_elr_on_the_central_run_only_is_fine(tmp_path):
    extra = ["plugins.elr.enabled=true", "plugins.elr.runs=central"]
    config.load(DEFAULT, [*small_overrides(tmp_path), "federation.backend=batched", *extra])


def test_the_cli_exits_2_with_one_line(tmp_path):
    proc = simulate_cli(
        *small_overrides(tmp_path), "federation.backend=batched", "federation.strategy=fedmedian"
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "federation.strategy" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
