"""Pruning masks (open_lth / Frankle & Carbin 2019 style): what magnitude and random pruning
remove, iterative pruning of the remaining weights, masks as buffers that survive a state-dict
round trip and averaging, and pruned weights that stay exactly zero through momentum and
DP-SGD steps (the common bug: momentum or noise revives them)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedmem.config import PrivacyConfig, TrainConfig
from fedmem.methods import RoundContext
from fedmem.methods.pruning import (
    MaskPlugin,
    attach_masks,
    attached_masks,
    prunable,
    prune,
    sparsity,
)
from fedmem.train import keyed_order, train_epochs

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5)
    )


def test_global_magnitude_removes_the_smallest_hidden_weights_and_half_the_output_rate():
    model = _mlp()
    masks = prune(model, 0.6)
    w = {n: p.detach() for n, p in prunable(model).items()}
    hidden, output = ["0.weight", "2.weight"], "4.weight"
    n_hidden = sum(w[n].numel() for n in hidden)
    removed = sum(int((~masks[n]).sum()) for n in hidden)
    assert removed == round(0.6 * n_hidden)
    kept_min = min(float(w[n][masks[n]].abs().min()) for n in hidden)
    gone_max = max(float(w[n][~masks[n]].abs().max()) for n in hidden)
    assert gone_max <= kept_min  # one global threshold over the hidden layers
    assert int((~masks[output]).sum()) == round(0.3 * w[output].numel())
    # layer-wise: each hidden layer at the rate on its own
    lw = prune(model, 0.6, scope="layerwise")
    for n in hidden:
        assert int((~lw[n]).sum()) == round(0.6 * w[n].numel())
        assert float(w[n][~lw[n]].abs().max()) <= float(w[n][lw[n]].abs().min())


def test_iterative_pruning_removes_a_fraction_of_the_remaining_weights():
    model = _mlp()
    m1 = prune(model, 0.2)
    m2 = prune(model, 0.2, masks=m1)
    for n in m1:
        assert not (m2[n] & ~m1[n]).any()  # nested: nothing comes back
    hidden = ["0.weight", "2.weight"]
    total = sum(m1[n].numel() for n in hidden)
    alive = sum(int(m2[n].sum()) for n in hidden)
    assert alive == total - round(0.2 * total) - round(0.2 * (total - round(0.2 * total)))
    assert 0.3 < sparsity(m2) < 0.36


def test_random_pruning_has_the_same_counts_per_layer_and_is_seeded():
    model = _mlp()
    mag = prune(model, 0.7)
    rnd = prune(model, 0.7, method="random", seed=3)
    assert prune(model, 0.7, method="random", seed=3)["0.weight"].equal(rnd["0.weight"])
    for n in mag:
        assert int(mag[n].sum()) == int(rnd[n].sum())
    assert not rnd["0.weight"].equal(mag["0.weight"])


def test_masks_are_buffers_that_survive_state_dicts_and_averaging():
    model = attach_masks(_mlp(), prune(_mlp(), 0.5))
    masks = attached_masks(model)
    state = model.state_dict()
    assert "pruning_mask__0__weight" in state and "pruning_mask__4__weight" in state
    for n, p in prunable(model).items():
        assert (p[~masks[n]] == 0).all()
    # FedAvg of two clients with the same mask: the averaged state keeps it
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    avg = {k: (state[k] + other.state_dict()[k]) / 2 for k in state}
    fresh = attach_masks(_mlp(seed=5), {n: torch.ones_like(m) for n, m in masks.items()})
    fresh.load_state_dict(avg)
    assert all(attached_masks(fresh)[n].equal(masks[n]) for n in masks)


def _train(model, plugins, dp=None, momentum=0.9):
    torch.manual_seed(1)
    x, y = torch.randn(256, 20), torch.randint(0, 5, (256,))
    rows = torch.arange(256)
    cfg = TrainConfig(batch_size=32, lr=0.1, momentum=momentum, weight_decay=1e-3)
    ctx = RoundContext("central", 1, None, rows, 256)
    for r in (1, 2):
        train_epochs(
            model,
            x,
            y,
            cfg,
            keyed_order(0, r, rows, 256),
            rows=rows,
            plugins=plugins,
            context=ctx,
            dp=dp,
        )
    return model


def test_pruned_weights_stay_zero_through_momentum_and_weight_decay():
    masks = prune(_mlp(), 0.8)
    model = _train(attach_masks(_mlp(), masks), [MaskPlugin(masks)])
    for n, p in prunable(model).items():
        assert (p[~masks[n]] == 0).all()
        assert (p[masks[n]] != 0).all()
    # without the plug-in, momentum and weight decay revive them: the test can fail
    bare = _train(attach_masks(_mlp(), masks), [])
    assert any((p[~masks[n]] != 0).any() for n, p in prunable(bare).items())


def test_pruned_weights_stay_zero_through_dp_sgd_noise():
    from fedmem.privacy.dp import DPSession

    masks = prune(_mlp(), 0.8)
    privacy = PrivacyConfig(record_level=True, noise_multiplier=1.0, max_grad_norm=1.0)
    dp = DPSession.create(
        privacy, TrainConfig(batch_size=32), n_local=256, seed=0, round_=1, stream=0
    )
    model = attach_masks(_mlp(), masks)
    torch.manual_seed(1)
    x, y, rows = torch.randn(256, 20), torch.randint(0, 5, (256,)), torch.arange(256)
    cfg = TrainConfig(batch_size=32, lr=0.1, momentum=0.9)
    ctx = RoundContext("central", 1, None, rows, 256)
    train_epochs(
        model,
        x,
        y,
        cfg,
        keyed_order(0, 1, rows, 256),
        rows=rows,
        plugins=[MaskPlugin(masks)],
        context=ctx,
        dp=dp,
    )
    assert dp.steps > 0
    for n, p in prunable(model).items():
        assert (p[~masks[n]] == 0).all()


def test_pruning_identified_exemplars_follow_the_modal_predictions():
    from fedmem.methods.pies import enrichment, modal_prediction, pie_mask

    dense = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3], [1, 1, 0, 3]])
    pruned = torch.tensor([[0, 2, 2, 1], [0, 2, 1, 1], [0, 1, 1, 3]])
    assert modal_prediction(dense).tolist() == [0, 1, 2, 3]
    assert modal_prediction(pruned).tolist() == [0, 2, 1, 1]
    pies = pie_mask(dense, pruned)
    assert pies.tolist() == [False, True, True, True]
    groups = {"a": torch.tensor([False, True, False, False]), "b": torch.tensor([True] * 4)}
    # P(a | PIE) = 1/3 over P(a) = 1/4; every example is in b
    assert enrichment(pies, groups) == pytest.approx({"a": 4 / 3, "b": 1.0})
    assert enrichment(torch.zeros(4, dtype=torch.bool), groups) == {"a": None, "b": None}


def test_population_sweep_counts_pies_against_the_dense_population():
    from fedmem.methods.pies import population_sweep

    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)) for _ in range(3)]
    x, x_test = torch.randn(50, 5), torch.randn(20, 5)
    y_test = torch.randint(0, 3, (20,))
    groups = {"first half": torch.arange(50) < 25}
    rows = population_sweep(models, x, groups, x_test, y_test, (0.0, 0.9))
    assert rows[0]["pie_share"] == 0.0 and rows[0]["weights_remaining"] == 1.0
    # 90% of the hidden weights, 45% of the output layer: 34 of 128 remain
    assert rows[1]["weights_remaining"] == pytest.approx(34 / 128, abs=1 / 128)
    assert rows[1]["pie_share"] > 0.0
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in rows)
