"""Shadow models for the privacy audit: masks, central recipe, FedAvg recipe (batched)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from fedmem import config
from fedmem.ensemble import member_init_state, train_ensemble
from fedmem.privacy.audit.shadows import (
    fedavg_round_plan,
    fedavg_round_seed,
    recipe_deviations,
    sampled_clients,
    shadow_masks,
    train_central_shadows,
    train_fedavg_shadows,
)

D, C = 20, 4


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(rounds: int = 2, local_epochs: int = 2, clients: int = 3, fraction: float = 1.0):
    return config.build(
        {
            "model": {"name": "mlp", "hidden": 32, "depth": 2},
            "train": {
                "rounds": rounds,
                "local_epochs": local_epochs,
                "batch_size": 32,
                "lr": 0.05,
                "momentum": 0.9,
                "weight_decay": 1e-3,
            },
            "federation": {"num_clients": clients, "fraction_train": fraction},
        }
    )


def _data(n: int = 240, seed: int = 0, random_labels: bool = False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, C, generator=g)
    x = torch.randn(n, D, generator=g)
    y = torch.randint(0, C, (n,), generator=g) if random_labels else (x @ w).argmax(1)
    return x, y


def _member(cfg, x, y, mask, *, init, seed: int, first: int, epochs: int):
    """One model trained by train_ensemble alone: its state dict."""
    ens = train_ensemble(
        cfg.model,
        cfg.train,
        (D,),
        C,
        x,
        y,
        mask.unsqueeze(0),
        epochs=epochs,
        seed=seed,
        init_states=[init],
        first=first,
    )
    return ens.state_dict(0)


def _position(plan, shadow: int, client: int) -> int:
    hit = torch.nonzero((plan.shadow == shadow) & (plan.client == client)).flatten()
    assert len(hit) == 1
    return int(hit[0])


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------
def test_shadow_masks_put_every_candidate_in_half_the_shadows():
    m = shadow_masks(500, 8, seed=3)
    assert m.dtype == torch.bool and m.shape == (8, 500)
    assert (m.sum(0) == 4).all()
    assert torch.equal(m, shadow_masks(500, 8, seed=3))  # deterministic
    assert not torch.equal(m, shadow_masks(500, 8, seed=4))
    share = m.float().mean(1)  # each shadow holds about half the candidates
    assert ((share > 0.4) & (share < 0.6)).all()
    # pairs of shadows are not tied together: shadow 0 and 1 agree on about half (1/2 - 1/14)
    agree = float((m[0] == m[1]).float().mean())
    assert 0.3 < agree < 0.6
    for bad in (3, 1, 0):
        with pytest.raises(ValueError, match="audit.attack.shadows"):
            shadow_masks(10, bad, seed=0)


# ---------------------------------------------------------------------------------------------
# central recipe
# ---------------------------------------------------------------------------------------------
def test_central_shadow_is_train_ensemble_with_the_run_length():
    cfg = _cfg(rounds=2, local_epochs=2)
    x, y = _data()
    masks = shadow_masks(len(y), 2, seed=1)
    seen: list[tuple[int, int]] = []
    shadows = train_central_shadows(
        cfg, x, y, masks[:1], seed=7, num_classes=C, progress=lambda d, t: seen.append((d, t))
    )
    ref = train_ensemble(cfg.model, cfg.train, (D,), C, x, y, masks[:1], epochs=4, seed=7)
    assert shadows.recipe == "central" and len(shadows) == 1 and shadows.train_s > 0
    assert torch.equal(shadows.masks, masks[:1])
    for name, p in ref.params.items():
        assert_close(shadows.params[name], p, rtol=0, atol=0)
    assert seen[-1] == (4, 4) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    logits = shadows.logits(x, batch_size=50)
    assert logits.shape == (1, len(y), C) and logits.device.type == "cpu"
    with torch.no_grad():
        assert_close(logits[0], shadows.ensemble.model(0)(x))


def test_central_shadows_fit_members_better_than_non_members():
    """Random labels can only be memorized: members' loss is far below non-members'."""
    cfg = _cfg(rounds=15, local_epochs=2)
    x, y = _data(n=200, seed=1, random_labels=True)
    masks = shadow_masks(len(y), 4, seed=0)
    shadows = train_central_shadows(cfg, x, y, masks, seed=0, num_classes=C)
    logits = shadows.logits(x)
    ce = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(masks)), reduction="none")
    ce = ce.view(len(masks), -1)
    members, others = ce[masks].mean(), ce[~masks].mean()
    assert members < 0.5 * others, (float(members), float(others))
    # and per example: a candidate's mean loss is lower in the shadows that trained on it
    in_mean = (ce * masks).sum(0) / masks.sum(0)
    out_mean = (ce * ~masks).sum(0) / (~masks).sum(0)
    assert float((in_mean < out_mean).float().mean()) > 0.8


# ---------------------------------------------------------------------------------------------
# FedAvg recipe
# ---------------------------------------------------------------------------------------------
def test_fedavg_with_one_client_is_round_by_round_training():
    """One client holding everything: averaging is the identity, each round one fresh run."""
    cfg = _cfg(rounds=3, local_epochs=2, clients=1)
    x, y = _data()
    client = torch.zeros(len(y), dtype=torch.int64)
    masks = shadow_masks(len(y), 2, seed=2)
    shadows = train_fedavg_shadows(cfg, x, y, client, masks, seed=5, num_classes=C)
    assert shadows.recipe == "fedavg" and shadows.ensemble.train_loss.shape == (2, 6)
    counts = masks.sum(1, keepdim=True)
    for k in range(2):
        state = member_init_state(cfg.model, (D,), C, 5, k)
        for r in range(1, 4):
            plan = fedavg_round_plan(cfg, counts, 5, r)
            state = _member(
                cfg,
                x,
                y,
                masks[k],
                init=state,
                seed=fedavg_round_seed(5, r),
                first=_position(plan, k, 0),
                epochs=2,
            )
        for name, p in state.items():
            assert_close(shadows.state_dict(k)[name], p)
        init = member_init_state(cfg.model, (D,), C, 5, k)
        assert not torch.allclose(state["net.1.weight"], init["net.1.weight"])  # it trained


def test_fedavg_round_is_the_example_weighted_average_of_client_models():
    cfg = _cfg(rounds=1, local_epochs=2, clients=3)
    x, y = _data(n=300)
    client = torch.tensor([0] * 50 + [1] * 150 + [2] * 100)[torch.randperm(300)]
    masks = shadow_masks(len(y), 2, seed=4)
    masks[1, client == 2] = False  # shadow 1: client 2 has no rows (skipped, weight 0)
    shadows = train_fedavg_shadows(cfg, x, y, client, masks, seed=9, num_classes=C)
    counts = torch.stack([torch.bincount(client[m], minlength=3) for m in masks])
    plan = fedavg_round_plan(cfg, counts, 9, 1)
    assert len(plan.shadow) == 5  # 3 pairs for shadow 0, 2 for shadow 1
    for k in range(2):
        init = member_init_state(cfg.model, (D,), C, 9, k)
        total = int(counts[k].sum())
        expected: dict[str, torch.Tensor] = {}
        for c in range(3):
            if counts[k, c] == 0:
                continue
            sd = _member(
                cfg,
                x,
                y,
                masks[k] & (client == c),
                init=init,
                seed=fedavg_round_seed(9, 1),
                first=_position(plan, k, c),
                epochs=2,
            )
            for name, p in sd.items():
                expected[name] = expected.get(name, 0) + p * (int(counts[k, c]) / total)
        got = shadows.state_dict(k)
        for name, p in expected.items():
            assert_close(got[name], p, rtol=1e-5, atol=1e-6)
        # ... and not simply one client's model or the init
        assert not torch.allclose(got["net.1.weight"], init["net.1.weight"])


def test_fedavg_shadow_without_rows_keeps_its_init_and_progress_counts_shadow_epochs():
    cfg = _cfg(rounds=2, local_epochs=1, clients=2)
    x, y = _data(n=100)
    client = torch.arange(100) % 2
    masks = torch.ones(2, 100, dtype=torch.bool)
    masks[1] = False
    seen: list[tuple[int, int]] = []
    shadows = train_fedavg_shadows(
        cfg, x, y, client, masks, seed=1, num_classes=C, progress=lambda d, t: seen.append((d, t))
    )
    init = member_init_state(cfg.model, (D,), C, 1, 1)
    for name, p in init.items():
        assert torch.equal(shadows.state_dict(1)[name], p)
    assert torch.isnan(shadows.ensemble.train_loss[1]).all()
    assert torch.isfinite(shadows.ensemble.train_loss[0]).all()
    assert seen[-1] == (4, 4)  # K=2 shadows x 2 rounds x 1 epoch
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_fedavg_sampling_per_shadow_and_round():
    cfg = _cfg(clients=6, fraction=0.5)
    picks = {(k, r): sampled_clients(cfg, 3, k, r) for k in range(4) for r in range(1, 4)}
    assert all(len(p) == 3 and p == sorted(set(p)) for p in picks.values())
    assert len({tuple(p) for p in picks.values()}) > 1  # shadows and rounds sample apart
    assert picks[(0, 1)] == sampled_clients(cfg, 3, 0, 1)
    counts = torch.full((4, 6), 10)
    counts[0, picks[(0, 1)][0]] = 0  # a sampled client without rows does not train
    plan = fedavg_round_plan(cfg, counts, 3, 1)
    assert len(plan.shadow) == 4 * 3 - 1
    for k in range(4):
        assert sorted(plan.client[plan.shadow == k].tolist()) == [
            c for c in picks[(k, 1)] if counts[k, c] > 0
        ]
    assert sampled_clients(_cfg(clients=6), 3, 0, 1) == list(range(6))  # fraction 1: all


def test_errors_and_deviations():
    cfg = _cfg()
    x, y = _data(n=60)
    masks = torch.ones(2, 60, dtype=torch.bool)
    with pytest.raises(ValueError, match="client ids"):
        train_fedavg_shadows(cfg, x, y, torch.full((60,), 3), masks, seed=0)
    with pytest.raises(ValueError, match="masks"):
        train_central_shadows(cfg, x, y, masks[:, :10], seed=0)
    assert recipe_deviations(cfg, "fedavg") == []
    prox = config.build({"train": {"proximal_mu": 0.1}, "federation": {"strategy": "fedprox"}})
    dev = recipe_deviations(prox, "fedavg")
    assert any("fedprox" in d for d in dev) and any("proximal_mu" in d for d in dev)
    assert recipe_deviations(prox, "central") == []


def test_fedavg_lock_step_groups_and_workers_change_nothing(monkeypatch):
    """Partial participation over 3 rounds; groups of 2 pairs in 2 threads = one group."""
    import fedmem.privacy.audit.shadows as shadows_mod

    cfg = _cfg(rounds=3, local_epochs=1, clients=4, fraction=0.5)
    x, y = _data(n=200)
    client = torch.arange(200) % 4
    masks = shadow_masks(len(y), 4, seed=6)
    kw = dict(seed=2, num_classes=C)
    one = train_fedavg_shadows(cfg, x, y, client, masks, workers=1, **kw)
    monkeypatch.setattr(shadows_mod, "FEDAVG_CHUNK", 2)
    grouped = train_fedavg_shadows(cfg, x, y, client, masks, workers=2, **kw)
    for name, p in one.params.items():
        assert_close(grouped.params[name], p, rtol=1e-5, atol=1e-6)
    assert_close(grouped.ensemble.train_loss, one.ensemble.train_loss)
    # half the clients per round is another recipe than all of them
    everyone = _cfg(rounds=3, local_epochs=1, clients=4)
    full = train_fedavg_shadows(everyone, x, y, client, masks, **kw)
    assert not torch.allclose(full.params["net.1.weight"], one.params["net.1.weight"])
