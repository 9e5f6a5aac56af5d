"""Membership-inference scores (loss, LiRA, RMIA) and ROC summaries on synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import expit

from fedmem.privacy.audit.attacks import (
    attack_summary,
    label_probability,
    lira_scores,
    logit_confidence,
    loss_scores,
    rmia_scores,
    roc_curve,
    tpr_at_fpr,
)
from fedmem.stats import roc_auc


# ---------------------------------------------------------------------------------------------
# per-example signals
# ---------------------------------------------------------------------------------------------
def test_logit_confidence_matches_the_naive_formula():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 50, 10, generator=g)
    labels = torch.randint(0, 10, (50,), generator=g)
    p = torch.softmax(logits.double(), -1)[..., torch.arange(50), labels]
    phi = logit_confidence(logits, labels)
    assert phi.shape == (4, 50) and phi.dtype == torch.float64
    torch.testing.assert_close(phi, torch.log(p / (1 - p)))
    torch.testing.assert_close(label_probability(logits, labels), p)
    ce = torch.nn.functional.cross_entropy(logits[1], labels, reduction="none").double()
    np.testing.assert_allclose(loss_scores(logits, labels)[1], -ce.numpy(), rtol=1e-5, atol=1e-5)


def test_logit_confidence_is_finite_for_huge_logits():
    logits = torch.tensor([[1e4, 0.0, -1e4], [1e4, 1e4 - 1, 0.0]])
    phi = logit_confidence(logits, torch.tensor([0, 2]))
    assert torch.isfinite(phi).all()
    assert phi[0].item() == pytest.approx(1e4)  # 1e4 - logsumexp(0, -1e4)
    assert phi[1].item() == pytest.approx(-1e4 - math.log1p(math.exp(-1)))
    # the naive formula overflows here
    p = torch.softmax(logits, -1)[0, 0]
    assert not torch.isfinite(torch.log(p / (1 - p)))


# ---------------------------------------------------------------------------------------------
# LiRA
# ---------------------------------------------------------------------------------------------
def _gaussian_world(n: int, shadows: int, seed: int):
    """phi of member ~ N(mu_out_i + 2, 1), non-member ~ N(mu_out_i, 1), mu_out_i ~ N(0, 5^2)."""
    rng = np.random.default_rng(seed)
    mu_out = rng.normal(0, 5, size=n)
    shadow_in = rng.random((shadows, n)) < 0.5
    shadow_phi = mu_out + 2 * shadow_in + rng.normal(size=(shadows, n))
    member = rng.random(n) < 0.5
    target_phi = mu_out + 2 * member + rng.normal(size=n)
    return target_phi, shadow_phi, shadow_in, member


@pytest.mark.parametrize(("shadows", "fixed"), [(64, False), (64, True), (8, True)])
def test_lira_beats_the_loss_attack_when_difficulty_varies(shadows, fixed):
    target_phi, shadow_phi, shadow_in, member = _gaussian_world(2000, shadows, seed=shadows)
    # binary logits [phi, 0] with label 0 have logit-scaled confidence phi: the loss attack's
    # score is then a global threshold on phi
    logits = torch.stack([torch.from_numpy(target_phi), torch.zeros(2000, dtype=torch.float64)], 1)
    loss_auc = roc_auc(loss_scores(logits, torch.zeros(2000, dtype=torch.long)), member)
    assert loss_auc < 0.7  # Phi(2 / sqrt(2 * 26)) = 0.61
    for online in (True, False):
        s = lira_scores(target_phi, shadow_phi, shadow_in, online=online, fixed_variance=fixed)
        # NaN exactly where a needed group is empty (8 shadows: all IN or all OUT w.p. 1/256)
        n_in = shadow_in.sum(0)
        undefined = (n_in == shadows) | ((n_in == 0) & online)
        np.testing.assert_array_equal(np.isnan(s), undefined)
        assert roc_auc(s, member) > 0.85  # ideal: Phi(2 / sqrt(2)) = 0.92


def test_lira_online_score_is_the_gaussian_log_likelihood_ratio():
    shadow_phi = np.array([[0.0, 1.0], [2.0, 1.0], [10.0, 5.0], [12.0, 9.0]])
    shadow_in = np.array([[False, False], [False, False], [True, True], [True, True]])
    target = np.array([3.0, 4.0])
    got = lira_scores(target, shadow_phi, shadow_in, online=True, fixed_variance=False)
    # example 0: in N(11, 2), out N(1, 2); example 1: in N(7, 8), out N(1, 0 -> floor)
    want0 = (-((3 - 11) ** 2) + (3 - 1) ** 2) / (2 * 2)
    assert got[0] == pytest.approx(want0)
    assert 1e6 < got[1] < math.inf  # far from a zero-variance OUT Gaussian: huge, finite
    off = lira_scores(target, shadow_phi, shadow_in, online=False, fixed_variance=False)
    assert off[0] == pytest.approx(
        math.log(0.5 * math.erfc(-(3 - 1) / math.sqrt(2) / math.sqrt(2)))
    )
    # fixed variance: pooled residual variances (1 + 1 + 0 + 0) / 2 = 1 (OUT) and
    # (1 + 1 + 4 + 4) / 2 = 5 (IN), each with one degree of freedom per example
    fix = lira_scores(target, shadow_phi, shadow_in, online=True, fixed_variance=True)
    want0 = -((3 - 11) ** 2) / (2 * 5) - 0.5 * math.log(5) + (3 - 1) ** 2 / 2
    assert fix[0] == pytest.approx(want0)


def test_lira_nan_where_a_gaussian_cannot_be_fitted():
    shadow_phi = np.array([[0.0, 1.0, 2.0], [1.0, 2.0, np.nan], [2.0, 3.0, 4.0]])
    shadow_in = np.array([[True, False, False], [True, True, True], [True, True, False]])
    target = np.array([1.0, 1.0, 1.0])
    # example 0: no OUT; example 1: one OUT, two IN; example 2: two OUT (NaN one dropped), no IN
    per = dict(fixed_variance=False)
    off = lira_scores(target, shadow_phi, shadow_in, online=False, **per)
    assert np.isnan(off[0]) and np.isnan(off[1]) and np.isfinite(off[2])
    assert np.isnan(lira_scores(target, shadow_phi, shadow_in, online=True, **per)).all()
    off_fixed = lira_scores(target, shadow_phi, shadow_in, online=False, fixed_variance=True)
    assert np.isnan(off_fixed[0]) and np.isfinite(off_fixed[1:]).all()
    lira_nan_target = lira_scores(
        np.array([np.nan, 1, 1]), shadow_phi, shadow_in, online=False, **per
    )
    assert np.isnan(lira_nan_target[0])


# ---------------------------------------------------------------------------------------------
# RMIA
# ---------------------------------------------------------------------------------------------
def _prob_world(n: int, z: int, refs: int, shift: float, seed: int):
    """Pr(x | model) = sigmoid(b_x + shift * in + noise) with per-example difficulty b_x."""
    rng = np.random.default_rng(seed)

    def probs(base, member):
        return expit(base + shift * member + 0.5 * rng.normal(size=member.shape))

    bx, bz = rng.normal(0, 2, size=n), rng.normal(0, 2, size=z)
    ref_in = rng.random((refs, n)) < 0.5
    member = rng.random(n) < 0.5
    zeros = np.zeros(z, dtype=bool)
    return (
        probs(bx, member),
        probs(bx, ref_in),
        ref_in,
        probs(bz, zeros),
        probs(bz, np.zeros((refs, z), dtype=bool)),
        member,
    )


def test_rmia_beats_chance_and_the_global_threshold():
    target_px, ref_px, ref_in, target_pz, ref_pz, member = _prob_world(3000, 3000, 4, 1.5, 0)
    s = rmia_scores(target_px, ref_px, ref_in, target_pz, ref_pz)
    np.testing.assert_array_equal(np.isnan(s), ref_in.all(0))  # no OUT reference: 1 / 16
    assert np.nanmin(s) >= 0 and np.nanmax(s) <= 1
    auc = roc_auc(s, member)
    assert auc > 0.7
    assert auc > roc_auc(target_px, member) + 0.1


def test_rmia_without_signal_is_chance():
    target_px, ref_px, ref_in, target_pz, ref_pz, member = _prob_world(4000, 2000, 4, 0.0, 1)
    s = rmia_scores(target_px, ref_px, ref_in, target_pz, ref_pz)
    assert roc_auc(s, member) == pytest.approx(0.5, abs=0.04)


def test_rmia_matches_the_pairwise_definition():
    target_px, ref_px, ref_in, target_pz, ref_pz, _ = _prob_world(60, 40, 3, 1.0, 2)
    a, gamma = 0.3, 1.5
    with np.errstate(invalid="ignore"):
        mean_out = np.where(ref_in, 0.0, ref_px).sum(0) / (~ref_in).sum(0)
    pr_x = 0.5 * ((1 + a) * mean_out + (1 - a))
    pr_z = 0.5 * ((1 + a) * ref_pz.mean(0) + (1 - a))
    lr = (target_px / pr_x)[:, None] / (target_pz / pr_z)[None, :]
    want = np.where(np.isnan(mean_out), np.nan, (lr >= gamma).mean(1))
    got = rmia_scores(target_px, ref_px, ref_in, target_pz, ref_pz, a=a, gamma=gamma)
    np.testing.assert_allclose(got, want, atol=1e-12)
    # an example every reference trained on has no OUT estimate
    ref_in[:, 0] = True
    assert np.isnan(rmia_scores(target_px, ref_px, ref_in, target_pz, ref_pz)[0])


# ---------------------------------------------------------------------------------------------
# ROC summaries
# ---------------------------------------------------------------------------------------------
def test_roc_curve_and_tpr_at_fpr_on_a_hand_made_example():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    labels = np.array([1, 1, 0, 1, 0, 0], dtype=bool)
    fpr, tpr = roc_curve(scores, labels)
    np.testing.assert_allclose(fpr, [0, 0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1])
    assert tpr_at_fpr(scores, labels, 0.0) == pytest.approx(2 / 3)
    assert tpr_at_fpr(scores, labels, 0.3) == pytest.approx(2 / 3)
    assert tpr_at_fpr(scores, labels, 1 / 3) == pytest.approx(1.0)


def test_roc_curve_ties_and_nan():
    scores = np.array([1.0, 1.0, 0.0, np.nan])
    labels = np.array([True, False, False, True])
    fpr, tpr = roc_curve(scores, labels)
    np.testing.assert_allclose(fpr, [0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 1, 1])
    assert tpr_at_fpr(scores, labels, 0.4) == 0.0  # the tie cannot be split
    assert np.isnan(tpr_at_fpr(scores, np.ones(4, dtype=bool), 0.1))


def test_attack_summary():
    rng = np.random.default_rng(0)
    labels = rng.random(10000) < 0.5
    scores = labels + rng.normal(size=10000)
    scores[:10] = np.nan
    s = attack_summary(scores, labels)
    assert set(s) == {"auc", "tpr_at_0.1pct_fpr", "tpr_at_1pct_fpr", "members", "nonmembers"}
    assert s["members"] + s["nonmembers"] == 9990
    assert s["members"] == int(labels[10:].sum())
    assert s["auc"] == pytest.approx(0.76, abs=0.02)  # Phi(1 / sqrt(2))
    assert 0 < s["tpr_at_0.1pct_fpr"] < s["tpr_at_1pct_fpr"] < 0.2
    assert all(type(v) is float for k, v in s.items() if k not in ("members", "nonmembers"))
    empty = attack_summary(np.ones(3), np.zeros(3, dtype=bool))
    assert math.isnan(empty["auc"]) and math.isnan(empty["tpr_at_1pct_fpr"])
    assert empty["members"] == 0 and empty["nonmembers"] == 3
