"""Canary exposure (Carlini et al. 2019): ranks, exposure, extrapolation, group summary."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedmem.privacy.audit.exposure import exposure, exposure_extrapolated, exposure_summary, ranks

REFERENCES = np.arange(1.0, 100.0)  # |R| = 99 reference losses 1, 2, ..., 99


def test_ranks_and_exposure_of_known_positions():
    canaries = np.array([0.5, 99.5, 49.5])
    assert ranks(canaries, REFERENCES).tolist() == [1, 100, 50]
    assert ranks(canaries, REFERENCES).dtype == np.int64
    e = exposure(canaries, REFERENCES)
    assert e.dtype == np.float64
    np.testing.assert_allclose(e, [math.log2(100), 0.0, 1.0], atol=1e-12)


def test_ties_count_against_the_canary():
    # 50.0 ties reference 50: rank = 1 + 49 (smaller) + 1 (tie) = 51, not 50
    assert ranks(np.array([50.0]), REFERENCES).tolist() == [51]
    assert ranks(np.array([1.0]), np.array([1.0, 1.0, 1.0])).tolist() == [4]
    assert exposure(np.array([1.0]), np.array([1.0, 1.0, 1.0]))[0] == 0.0


def test_exposure_range_and_torch_input():
    rng = np.random.default_rng(0)
    refs = rng.normal(size=500)
    e = exposure(torch.from_numpy(rng.normal(size=200)), torch.from_numpy(refs))
    assert np.all(e >= 0) and np.all(e <= math.log2(501) + 1e-12)


def test_nan_losses_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        ranks(np.array([np.nan]), REFERENCES)
    with pytest.raises(ValueError, match="NaN"):
        exposure(np.array([1.0]), np.array([1.0, np.nan]))


def test_extrapolated_exposure_exceeds_the_rank_cap_far_below_the_references():
    rng = np.random.default_rng(1)
    refs = rng.normal(10.0, 1.0, size=99)
    cap = math.log2(100)
    far, typical = exposure_extrapolated(np.array([2.0, 10.0]), refs)
    assert exposure(np.array([2.0]), refs)[0] == pytest.approx(cap)
    assert far > cap + 10  # ~8 sigma below: P ~ 1e-15, exposure ~ 50 bits
    assert 0.3 < typical < 1.7  # about the median: -log2(1/2) = 1


def test_extrapolated_exposure_matches_a_normal_fit_on_symmetric_data():
    refs = np.random.default_rng(2).normal(0.0, 2.0, size=5000)
    got = exposure_extrapolated(np.array([-4.0]), refs)[0]
    assert got == pytest.approx(-math.log2(0.02275), rel=0.05)  # Phi(-2) = 0.02275


def test_summary_by_group():
    e = np.array([1.0, 2.0, 6.0, np.nan, 0.5])
    groups = {
        "a": np.array([True, True, True, False, False]),
        "b": np.array([False, False, False, True, True]),
        "none": np.zeros(5, dtype=bool),
    }
    s = exposure_summary(e, groups)
    assert s["a"] == {"count": 3, "mean": 3.0, "median": 2.0, "max": 6.0}
    assert s["b"] == {"count": 1, "mean": 0.5, "median": 0.5, "max": 0.5}
    assert s["none"] == {"count": 0, "mean": None, "median": None, "max": None}
    assert isinstance(s["a"]["mean"], float) and isinstance(s["a"]["count"], int)
