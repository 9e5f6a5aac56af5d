"""Feldman-Zhang memorization scores, Carlini et al. outlier metrics, AUC and Spearman."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from fedmem import config
from fedmem.analysis.memorization import (
    client_subset_masks,
    confidence,
    ensemble_agreement,
    in_out_accuracy,
    memorization_report,
    memorization_scores,
    subset_masks,
)
from fedmem.data.table import cached_table
from fedmem.ensemble import train_ensemble
from fedmem.seeding import np_rng
from fedmem.stats import roc_auc, spearman

from .conftest import CACHE, REPO

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# memorization scores on constructed cases
# ---------------------------------------------------------------------------------------------
def test_memorization_scores_known_cases():
    masks = torch.tensor(
        [
            [1, 1, 1, 0, 1],
            [1, 0, 1, 0, 1],
            [0, 1, 1, 0, 1],
            [0, 0, 1, 0, 1],
        ],
        dtype=torch.bool,
    )
    correct = torch.zeros_like(masks)
    correct[:, 0] = masks[:, 0]  # row 0: correct iff trained on -> mem 1
    correct[:, 1] = True  # row 1: always correct -> mem 0
    correct[:, 2] = True  # row 2: in every subset -> NaN
    # row 3: never in a subset -> NaN; row 4: in every subset -> NaN
    correct[0, 3] = True
    mem = memorization_scores(correct, masks)
    assert mem.dtype == torch.float64
    assert mem[0] == 1.0 and mem[1] == 0.0
    assert torch.isnan(mem[2:]).all()
    # correct iff NOT trained on -> -1; half of the in-models right, no out-model -> 0.5
    masks2 = torch.tensor([[1, 1], [1, 1], [0, 0], [0, 0]], dtype=torch.bool)
    correct2 = torch.tensor([[0, 1], [0, 0], [1, 0], [1, 0]], dtype=torch.bool)
    assert memorization_scores(correct2, masks2).tolist() == [-1.0, 0.5]
    p_in, p_out = in_out_accuracy(correct2, masks2)
    assert p_in.tolist() == [0.0, 0.5] and p_out.tolist() == [1.0, 0.0]


def test_subset_masks_have_exact_sizes():
    masks = subset_masks(101, 7, 0.7, np.random.default_rng(0))
    assert masks.shape == (7, 101) and masks.dtype == torch.bool
    assert masks.sum(1).tolist() == [71] * 7  # round(0.7 * 101) = 71
    assert len({tuple(m.tolist()) for m in masks}) == 7  # different subsets
    again = subset_masks(101, 7, 0.7, np.random.default_rng(0))
    assert torch.equal(masks, again)
    with pytest.raises(ValueError, match="share"):
        subset_masks(3, 2, 0.1, np.random.default_rng(0))  # round(0.3) = 0 rows


def test_client_subset_masks_include_whole_clients():
    rng = np.random.default_rng(1)
    client = torch.from_numpy(rng.integers(0, 10, size=500))
    masks = client_subset_masks(client, 10, 20, 0.7, np.random.default_rng(2))
    assert masks.shape == (20, 500)
    for m in masks:
        inside = set(client[m].tolist())
        assert len(inside) == 7  # round(0.7 * 10) clients
        assert not (set(client[~m].tolist()) & inside)  # a client is wholly in or out
        assert m.sum() == sum(int((client == c).sum()) for c in inside)
    with pytest.raises(ValueError, match="clients"):
        client_subset_masks(client, 2, 3, 0.9, np.random.default_rng(0))  # all clients


# ---------------------------------------------------------------------------------------------
# Carlini et al. metrics
# ---------------------------------------------------------------------------------------------
def test_confidence_is_mean_label_probability_over_selected_models():
    probs = torch.tensor(
        [
            [[0.9, 0.1], [0.2, 0.8]],
            [[0.5, 0.5], [0.6, 0.4]],
            [[0.1, 0.9], [0.3, 0.7]],
        ]
    )  # (K=3, N=2, C=2)
    y = torch.tensor([0, 1])
    masks = torch.tensor([[1, 1], [1, 0], [0, 0]], dtype=torch.bool)
    conf_in = confidence(probs, y, masks)
    conf_out = confidence(probs, y, masks, held_out=True)
    assert conf_in.tolist() == pytest.approx([0.7, 0.8])
    assert conf_out.tolist() == pytest.approx([0.1, 0.55])
    masks_all = torch.ones(3, 2, dtype=torch.bool)
    assert torch.isnan(confidence(probs, y, masks_all, held_out=True)).all()


def test_ensemble_agreement_is_mean_pairwise_js_in_bits():
    onehot = torch.eye(3)
    # row 0: all models identical -> 0; row 1: two disjoint one-hots -> 1 bit
    # row 2: models a, b, c with pairwise JS computed by hand
    pa, pb, pc = torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.0, 0.5, 0.5]), onehot[0]
    probs = torch.stack(
        [
            torch.stack([onehot[1], onehot[0], pa]),
            torch.stack([onehot[1], onehot[2], pb]),
            torch.stack([onehot[1], onehot[2], pc]),
        ]
    )  # (K=3, N=3, C=3)
    masks = torch.zeros(3, 3, dtype=torch.bool)  # held-out = all models
    masks[2, 1] = True  # row 1: model 2 trained on it -> held out: models 0, 1

    def js(p, q):
        m = (p + q) / 2

        def h(v):
            v = v[v > 0]
            return float(-(v * torch.log2(v)).sum())

        return h(m) - (h(p) + h(q)) / 2

    expected_row2 = (js(pa, pb) + js(pa, pc) + js(pb, pc)) / 3
    agr = ensemble_agreement(probs, masks)
    assert agr[0].item() == pytest.approx(0.0, abs=1e-7)
    assert agr[1].item() == pytest.approx(1.0, abs=1e-6)
    assert agr[2].item() == pytest.approx(expected_row2, abs=1e-6)
    # among in-models: row 1 has one model only -> NaN
    assert math.isnan(ensemble_agreement(probs, masks, held_out=False)[1].item())


# ---------------------------------------------------------------------------------------------
# AUC and Spearman
# ---------------------------------------------------------------------------------------------
def test_roc_auc_known_values():
    labels = np.array([0, 0, 1, 1], dtype=bool)
    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    assert roc_auc(np.ones(4), labels) == 0.5
    # one tie between a positive and a negative: (3 + 0.5) / 4
    assert roc_auc(np.array([0.1, 0.5, 0.5, 0.9]), labels) == pytest.approx(0.875)
    # NaN scores are dropped; no negatives left -> NaN
    assert roc_auc(torch.tensor([float("nan"), 0.2, 0.8, 0.9]), labels) == 1.0
    assert math.isnan(roc_auc(np.array([float("nan")] * 2 + [0.1, 0.2]), labels))


def test_roc_auc_matches_brute_force_pair_count():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 8, size=300).astype(float)  # many ties
    labels = rng.random(300) < 0.3
    pos, neg = scores[labels], scores[~labels]
    diff = pos[:, None] - neg[None, :]
    brute = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
    assert roc_auc(scores, labels) == pytest.approx(brute, abs=1e-12)


def test_spearman_known_values():
    a = np.array([1.0, 2, 3, 4, 5])
    assert spearman(a, 2 * a + 1) == pytest.approx(1.0)
    assert spearman(a, -(a**3)) == pytest.approx(-1.0)
    b = np.array([5.0, 6, 7, 8, 7])  # ranks 1, 2, 3.5, 5, 3.5
    assert spearman(a, b) == pytest.approx(8 / math.sqrt(95))
    with_nan = np.array([5.0, 6, float("nan"), 7, 8])
    assert spearman(a, with_nan) == pytest.approx(1.0)  # the NaN pair is dropped
    assert math.isnan(spearman(a, np.ones(5)))
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 200).astype(float), rng.normal(size=200)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_memorization_report_on_constructed_logits():
    k, n = 6, 4
    masks = torch.tensor([[1, 1, 1, 0]] * 3 + [[0, 0, 1, 1]] * 3, dtype=torch.bool)
    y = torch.tensor([0, 1, 2, 0])
    logits = torch.zeros(k, n, 3)
    logits[:, 0, 0] = 5.0  # row 0: always right -> mem 0
    logits[:, 1, 2] = 5.0  # row 1: predicted 2 by default...
    logits[:3, 1, 1] = 10.0  # ...but its label 1 by the models that trained on it -> mem 1
    logits[:, 2, 2] = 5.0  # row 2: in every model's subset -> mem NaN
    logits[:, 3, 1] = 5.0  # row 3: never right -> mem 0
    groups = {
        "clean": torch.tensor([True, False, False, True]),
        "mislabeled": torch.tensor([False, True, False, False]),
    }
    rep = memorization_report(logits, y, masks, groups)
    mem = rep["per_row"]["mem"]
    assert mem[[0, 1, 3]].tolist() == [0.0, 1.0, 0.0] and np.isnan(mem[2])
    s = rep["summary"]
    assert s["models"] == 6 and s["rows"] == 4
    assert s["mem_mean"]["clean"] == 0.0 and s["mem_mean"]["mislabeled"] == 1.0
    assert s["count"] == {"clean": 2, "mislabeled": 1}
    assert s["auc_mislabeled_vs_clean"] == 1.0
    assert set(rep["per_row"]) == {
        "mem",
        "acc_in",
        "acc_out",
        "confidence",
        "confidence_out",
        "agreement",
        "agreement_in",
    }
    assert all(v.shape == (n,) for v in rep["per_row"].values())


# ---------------------------------------------------------------------------------------------
# integration: an ensemble of small MLPs finds the mislabeled rows
# ---------------------------------------------------------------------------------------------
def _memorization_run(overrides: list[str], models: int, epochs: int) -> dict:
    cfg = config.load(
        REPO / "configs" / "default.yaml",
        [
            f"data.cache_dir={CACHE}",
            "federation.num_clients=4",
            "data.canaries.num_clients=2",
            "data.noise.rate=0.2",
            *overrides,
        ],
    )
    table = cached_table(cfg)
    masks = subset_masks(len(table), models, 0.7, np_rng(cfg.seed, "memorization"))
    ens = train_ensemble(
        cfg.model,
        cfg.train,
        table.input_shape,
        table.num_classes,
        table.x,
        table.y_obs,
        masks,
        epochs=epochs,
        seed=cfg.seed,
    )
    groups = {
        "clean": table.is_clean,
        "mislabeled": table.is_noisy,
        "canary": table.is_canary,
    }
    return memorization_report(ens.logits(table.x), table.y_obs, masks, groups)["summary"]


def test_memorization_separates_mislabeled_digits():
    # sklearn digits (1437 train rows + 40 canary copies), 20% symmetric noise, 16 MLPs on
    # 70% subsets, 40 epochs. Measured: AUC 0.960, mean mem clean 0.154 / mislabeled 0.846,
    # canary 0.025, Spearman(mem, confidence) -0.556.
    s = _memorization_run(["data.name=digits", "model.hidden=128"], models=16, epochs=40)
    assert s["auc_mislabeled_vs_clean"] > 0.9
    assert s["mem_mean"]["mislabeled"] > s["mem_mean"]["clean"] + 0.5
    # each canary is inserted 4 times: its held-out models saw its copies, so its
    # self-memorization is small (Feldman-Zhang measure a row, not a duplicated example)
    assert s["mem_mean"]["canary"] < 0.2
    assert s["spearman_mem_confidence"] < -0.3  # memorized rows: low confidence


def test_memorization_on_small_mnist1d():
    # MNIST-1D with 1000 samples (800 train + 40 canary copies), 20% noise, 16 MLPs (hidden
    # 64) x 60 epochs. An MLP on 560 MNIST-1D rows generalizes poorly (held-out accuracy on
    # clean rows ~0.3), so clean rows are memorized too: measured AUC 0.707, mean mem clean
    # 0.697 / mislabeled 0.921. (A cnn1d with Adam does not do much better: AUC 0.752.)
    s = _memorization_run(
        ["data.mnist1d.num_samples=1000", "model.hidden=64"], models=16, epochs=60
    )
    assert s["auc_mislabeled_vs_clean"] > 0.65
    assert s["mem_mean"]["mislabeled"] > s["mem_mean"]["clean"] + 0.15


def test_one_row_per_group_equals_subset_masks():
    a = subset_masks(57, 5, 0.7, np.random.default_rng(3))
    b = client_subset_masks(np.arange(57), 57, 5, 0.7, np.random.default_rng(3))
    assert torch.equal(a, b)


def test_example_level_keeps_canary_copies_together():
    from fedmem.analysis.pipeline import _masks, example_units

    cfg = config.load(
        REPO / "configs" / "memscores.yaml",
        [
            f"data.cache_dir={CACHE}",
            "data.mnist1d.num_samples=1000",
            "analysis.memorization_scores.models=16",
        ],
    )
    table = cached_table(cfg)
    units = example_units(table)
    assert int(units.max()) + 1 == len(table) - int(table.is_canary.sum()) + int(
        table.canary_id.max() + 1
    )
    masks = _masks(cfg, table, "example")
    for c in range(int(table.canary_id.max()) + 1):
        cols = masks[:, table.canary_id == c]
        assert (cols == cols[:, :1]).all(), "all copies of a canary are in or out together"
    # about the configured share of units is in each model
    assert abs(float(masks[:, ~table.is_canary].float().mean()) - 0.7) < 0.02
