"""Training plug-ins: context, per-client state across rounds (both backends), FedProx."""

from __future__ import annotations

import math

import pytest
import torch

from fedmem import config
from fedmem.config import TrainConfig
from fedmem.data.table import cached_table
from fedmem.errors import ConfigError
from fedmem.federation.engine import run_federated
from fedmem.methods import RoundContext, build_plugins
from fedmem.methods.proximal import Proximal, proximal_term
from fedmem.observer import Observer
from fedmem.runs.central import run_central
from fedmem.train import keyed_order, make_optimizer, train_epochs
from strategies import sample_partitions
from tests.conftest import REPO, federated_job, small_overrides

COUNTER = 'plugins.external=["tests.plugins:CallCounter"]'


def _cfg(tmp_path, *extra):
    return config.load(
        REPO / "configs" / "default.yaml",
        small_overrides(tmp_path)
        + [COUNTER, "federation.fraction_train=0.5", "analysis.gradients.enabled=false"]
        + list(extra),
    )


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_counter_keeps_per_client_state_across_rounds(tmp_path, backend):
    cfg = _cfg(tmp_path, f"federation.backend={backend}", "federation.client_resources.num_cpus=2")
    job, _, clients = federated_job(cfg)
    run_federated(job)
    table = cached_table(cfg)
    fed, b = cfg.federation, cfg.train.batch_size
    seen: dict[int, int] = {}
    checked = 0
    for r in range(1, cfg.train.rounds + 1):
        sampled = sample_partitions(cfg.seed, r, fed.num_clients, 0.5, fed.min_train_clients)
        rows = {c["client"]: c for c in clients if c["round"] == r}
        assert sorted(rows) == sampled
        for pid in sampled:
            n = len(table.client_rows(pid))
            steps = math.ceil(n / b) * cfg.train.local_epochs
            seen[pid] = seen.get(pid, 0) + 1
            row = rows[pid]
            assert row["counter/rounds"] == seen[pid]  # state survived the rounds in between
            assert row["counter/losses"] == steps  # this round's calls only
            assert row["counter/rows"] == n * cfg.train.local_epochs
            # running total over every round this client trained
            assert row["counter/steps"] == steps * seen[pid]
            checked += 1
    assert checked == 2 * cfg.train.rounds and max(seen.values()) >= 2


def test_counter_in_the_central_run(tmp_path):
    cfg = _cfg(tmp_path)
    table = cached_table(cfg)
    rows: list[dict] = []
    run_central(cfg, table, Observer(table, "central", rows.append))
    steps = math.ceil(len(table) / cfg.train.batch_size)
    assert [r.get("counter/rounds") for r in rows] == [None, 1, 2, 3]
    assert [r.get("counter/steps") for r in rows[1:]] == [steps, 2 * steps, 3 * steps]


def test_bad_plugin_path_is_a_config_error(tmp_path):
    for path, hint in (
        ("nomodule", "must look like"),
        ("tests.nosuchmodule:X", "cannot import"),
        ("tests.plugins:REPO", "not a fedmem.methods.Plugin"),
    ):
        cfg = _cfg(tmp_path, f'plugins.external=["{path}"]')
        with pytest.raises(ConfigError, match=rf"^plugins\.external: .*{hint}"):
            build_plugins(cfg, "federated")


def _old_fedprox_loop(model, x, y, cfg, order, anchor, mu):
    """The pre-plug-in loop body with FedProx (ce + proximal term), for comparison."""
    import torch.nn.functional as F

    opt = make_optimizer(model, cfg)
    perm = order(0)
    for start in range(0, len(y), cfg.batch_size):
        idx = perm[start : start + cfg.batch_size]
        loss = F.cross_entropy(model(x[idx]), y[idx]) + proximal_term(model, anchor, mu)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def test_fedprox_plugin_gives_the_same_numbers_as_the_old_loop():
    torch.manual_seed(0)
    x, y = torch.randn(100, 40), torch.randint(0, 10, (100,))
    cfg = TrainConfig(batch_size=16, lr=0.1, proximal_mu=0.5)
    order = keyed_order(0, 1, torch.arange(100), 100)
    torch.manual_seed(1)
    a = torch.nn.Sequential(torch.nn.Linear(40, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    b = torch.nn.Sequential(torch.nn.Linear(40, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    b.load_state_dict(a.state_dict())
    anchor = [p.detach().clone() for p in b.parameters()]
    ctx = RoundContext("federated", 1, 0, torch.arange(100), 100)
    train_epochs(a, x, y, cfg, order, plugins=[Proximal(0.5)], context=ctx)
    _old_fedprox_loop(b, x, y, cfg, order, anchor, 0.5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    moved = sum(
        float((p.detach() - q).abs().sum()) for p, q in zip(a.parameters(), anchor, strict=True)
    )
    assert moved > 0


def test_proximal_is_federated_only(tmp_path):
    cfg = _cfg(tmp_path, "train.proximal_mu=0.1", "plugins.external=[]")
    assert [p.name for p in build_plugins(cfg, "federated")] == ["proximal"]
    assert build_plugins(cfg, "central") == []
