"""Lottery tickets (central IMP with rewinding): rewinding restores exactly the round-k
weights on the survivors, masks stay through retraining, and a ticket run is deterministic."""

from __future__ import annotations

import pytest
import torch

from fedmem import config
from fedmem.data.table import cached_table
from fedmem.methods.lottery import imp, rewound
from fedmem.methods.pruning import prunable, prune
from fedmem.models.factory import init_model
from tests.conftest import REPO, small_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(tmp_path):
    cfg = config.load(
        REPO / "configs" / "default.yaml", [*small_overrides(tmp_path), "train.rounds=2"]
    )
    table = cached_table(cfg)
    init = init_model(cfg, table).state_dict()
    trained = init_model(cfg, table)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return cfg, table, init, trained.state_dict()


def test_rewinding_restores_the_round_k_weights_on_the_survivors(tmp_path):
    cfg, table, init, trained = _setup(tmp_path)
    model = init_model(cfg, table)
    model.load_state_dict(trained)
    masks = prune(model, 0.5)
    ticket = rewound(cfg, table, init, masks)
    for n, p in prunable(ticket).items():
        assert torch.equal(p[masks[n]], init[n][masks[n]])
        assert (p[~masks[n]] == 0).all()
    others = {k: v for k, v in ticket.state_dict().items() if not k.startswith("pruning_mask")}
    for k, v in others.items():
        if k not in masks:  # biases: rewound untouched
            assert torch.equal(v, init[k])


def test_imp_is_deterministic_and_keeps_masks(tmp_path):
    cfg, table, init, trained = _setup(tmp_path)
    a, ticket_a = imp(cfg, table, trained, init, 0, levels=2)
    b, ticket_b = imp(cfg, table, trained, init, 0, levels=2)
    assert a == b
    sa, sb = ticket_a.state_dict(), ticket_b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [(r["level"], r["variant"]) for r in a] == [
        (lvl, v) for lvl in (1, 2) for v in ("ticket", "reinit", "random mask")
    ]
    remaining = [r["weights_remaining"] for r in a if r["variant"] == "ticket"]
    assert remaining[0] > remaining[1] > 0.6
    # the random control has the ticket's counts
    for lvl in (1, 2):
        w = {r["variant"]: r["weights_remaining"] for r in a if r["level"] == lvl}
        assert w["ticket"] == w["reinit"] == w["random mask"]


def test_instability_barrier_is_measured_on_the_linear_path(tmp_path, monkeypatch):
    from fedmem.methods import lottery

    cfg, table, init, _ = _setup(tmp_path)
    res = lottery.instability(cfg, table, init, 0, points=5)
    errs = res["path_test_error"]
    assert len(errs) == 5 and all(0.0 <= e <= 1.0 for e in errs)
    assert res["barrier"] == pytest.approx(max(errs) - 0.5 * (errs[0] + errs[-1]))
    # the same batch order twice: both copies are identical, so the path is flat
    monkeypatch.setattr(lottery, "derive_seed", lambda seed, *keys: seed)
    flat = lottery.instability(cfg, table, init, 0, points=5)
    assert flat["barrier"] == pytest.approx(0.0, abs=1e-9)
    assert len(set(flat["path_test_error"])) == 1


# -- federated: masks broadcast by the server, enforced by clients and after aggregation ------
def _fed_setup(tmp_path, *extra):
    cfg = config.load(
        REPO / "configs" / "default.yaml",
        [*small_overrides(tmp_path), "train.rounds=2", "federation.backend=local", *extra],
    )
    table = cached_table(cfg)
    model = init_model(cfg, table)
    masks = prune(model, 0.6)
    return cfg, table, rewound(cfg, table, init_model(cfg, table).state_dict(), masks), masks


@pytest.mark.parametrize(
    "extra",
    [
        (),  # FedAvg: averaging identical masks keeps them
        ("federation.strategy=fedadam",),  # server optimizer moments
        ("privacy.user_level=true", "privacy.user_noise_multiplier=0.5"),  # noise everywhere
        ("privacy.record_level=true", "privacy.noise_multiplier=1.0"),  # Opacus on clients
    ],
    ids=["fedavg", "fedadam", "dp-fedavg", "dp-sgd"],
)
def test_federated_ticket_keeps_pruned_weights_exactly_zero(tmp_path, extra):
    from fedmem.methods.lottery import retrain_federated
    from fedmem.methods.pruning import attached_masks

    cfg, table, ticket, masks = _fed_setup(tmp_path, *extra)
    start = {n: p.detach().clone() for n, p in prunable(ticket).items()}
    out = retrain_federated(cfg, table, ticket, 0)
    assert {n: m.equal(masks[n]) for n, m in attached_masks(out).items()} == {
        n: True for n in masks
    }
    for n, p in prunable(out).items():
        assert (p[~masks[n]] == 0).all(), n
        assert not torch.equal(p[masks[n]], start[n][masks[n]]), f"{n} survivors did not train"


def test_federated_rewind_runs_only_the_rounds_after_k_and_is_deterministic(tmp_path):
    from fedmem.federation.engine import run_federated
    from tests.conftest import federated_job

    cfg, table, ticket, _ = _fed_setup(tmp_path, "train.rounds=3")
    state = ticket.state_dict()
    runs = []
    for _ in range(2):
        job, rows, clients = federated_job(cfg)
        job.start = (1, state)
        run_federated(job)
        runs.append((job.final_state, rows, clients))
    (a, rows, clients), (b, _, _) = runs
    assert [r["round"] for r in rows] == [2, 3]
    assert sorted({c["round"] for c in clients}) == [2, 3]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_federated_imp_and_order_seed(tmp_path):
    from fedmem.methods.lottery import retrain_federated

    cfg, table, ticket, _ = _fed_setup(tmp_path)
    init = init_model(cfg, table).state_dict()
    rows, _ = imp(cfg, table, ticket.state_dict(), init, 0, levels=1, trainer="federated")
    assert [(r["model"], r["variant"]) for r in rows] == [
        ("federated", v) for v in ("ticket", "reinit", "random mask")
    ]
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in rows)
    # another batch order on the clients gives other weights; the same one the same weights
    a = retrain_federated(cfg, table, ticket, 0).state_dict()
    b = retrain_federated(cfg, table, ticket, 0, order_seed=cfg.seed).state_dict()
    c = retrain_federated(cfg, table, ticket, 0, order_seed=cfg.seed + 1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
