"""Per-example statistics, trajectories, events and onsets on cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedmem.analysis.tracking import (
    TrajectoryRecorder,
    example_stats,
    load_trajectories,
    save_trajectories,
)
from fedmem.analysis.trajectories import (
    early_learning_onset,
    forgetting_events,
    group_summary,
    learning_time,
    memorization_onset,
    never_learned,
    per_client_onsets,
)

T, F = True, False


# ---------------------------------------------------------------- example_stats


def test_example_stats_known_values():
    logits = torch.tensor(
        [
            [2.0, 0.0, 0.0],  # predicted 0; observed 0, true 0
            [0.0, 3.0, 1.0],  # predicted 1; observed 2 (mislabeled), true 1
            [1.0, 1.0, 1.0],  # uniform: loss log 3, margin 0, argmax 0
        ]
    )
    y_obs = torch.tensor([0, 2, 1])
    y_true = torch.tensor([0, 1, 1])
    s = example_stats(logits, y_obs, y_true)

    lse0 = math.log(math.exp(2) + 2)
    lse1 = math.log(1 + math.exp(3) + math.exp(1))
    expected_loss = [lse0 - 2.0, lse1 - 1.0, math.log(3)]
    assert torch.allclose(s["loss"], torch.tensor(expected_loss), atol=1e-6)
    assert s["correct_obs"].tolist() == [True, False, False]
    assert s["correct_true"].tolist() == [True, True, False]
    # margin = z_obs - max other: 2-0, 1-3, 1-1
    assert torch.allclose(s["margin"], torch.tensor([2.0, -2.0, 0.0]))
    assert s["loss"].dtype == torch.float32 and s["correct_obs"].dtype == torch.bool


def test_margin_sign_matches_prediction():
    torch.manual_seed(0)
    logits = torch.randn(500, 7)
    y = torch.randint(0, 7, (500,))
    s = example_stats(logits, y, y)
    assert torch.equal(s["margin"] > 0, s["correct_obs"])
    assert torch.allclose(s["loss"], torch.nn.functional.cross_entropy(logits, y, reduction="none"))


# ---------------------------------------------------------------- recorder / storage


def test_recorder_stacks_rounds():
    rec = TrajectoryRecorder()
    y = torch.tensor([0, 1])
    rec.record(1, torch.tensor([[1.0, 0.0], [1.0, 0.0]]), y, y)
    rec.record(3, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), y, y)
    arr = rec.to_arrays()
    assert arr["rounds"].tolist() == [1, 3]
    assert arr["correct_obs"].tolist() == [[T, F], [T, T]]
    assert arr["loss"].shape == (2, 2) and arr["loss"].dtype == np.float32
    assert arr["margin"].dtype == np.float32 and arr["correct_true"].dtype == np.bool_
    with pytest.raises(ValueError, match="same examples"):
        rec.record(4, torch.zeros(3, 2), torch.zeros(3).long(), torch.zeros(3).long())


def test_recorder_empty():
    arr = TrajectoryRecorder().to_arrays()
    assert arr["rounds"].shape == (0,) and arr["loss"].shape == (0, 0)


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    runs = {
        "central": {
            "rounds": np.arange(1, 4),
            "loss": rng.random((3, 5)).astype(np.float32),
            "correct_obs": rng.random((3, 5)) > 0.5,
        },
        "federated": {"rounds": np.arange(1, 3), "margin": rng.random((2, 5)).astype(np.float32)},
    }
    path = tmp_path / "examples.npz"
    save_trajectories(path, runs)
    save_trajectories(path, runs)  # overwrite in place
    back = load_trajectories(path)
    assert set(back) == {"central", "federated"}
    for run, stats in runs.items():
        assert set(back[run]) == set(stats)
        for name, a in stats.items():
            assert back[run][name].dtype == a.dtype
            np.testing.assert_array_equal(back[run][name], a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["examples.npz"]  # no temp left
    with np.load(path) as z:
        assert "central/loss" in z.files


def test_save_rejects_bad_run_name(tmp_path):
    with pytest.raises(ValueError):
        save_trajectories(tmp_path / "x.npz", {"a/b": {"loss": np.zeros(1)}})


# ---------------------------------------------------------------- learning / forgetting

# columns = examples, rows = rounds 0, 1, 2
CORRECT = np.array(
    [
        [F, T, T, F, T],
        [T, F, T, F, T],
        [T, T, F, F, T],
    ]
)


def test_learning_time_and_forgetting():
    assert learning_time(CORRECT, [0, 1, 2]).tolist() == [1, 2, -1, -1, 0]
    assert learning_time(CORRECT, [5, 10, 15]).tolist() == [10, 15, -1, -1, 5]  # round labels
    assert forgetting_events(CORRECT).tolist() == [0, 1, 1, 0, 0]
    assert never_learned(CORRECT).tolist() == [F, F, F, T, F]


def test_learning_time_accepts_tensors_and_multiple_forgetting():
    c = torch.tensor([[T], [F], [T], [F], [T], [T]])
    assert learning_time(c, torch.arange(6)).tolist() == [4]
    assert forgetting_events(c).tolist() == [2]


def test_learning_time_rounds_mismatch():
    with pytest.raises(ValueError, match="rounds"):
        learning_time(CORRECT, [0, 1])


def test_group_summary():
    lt = learning_time(CORRECT, [0, 1, 2])  # [1, 2, -1, -1, 0]
    fg = forgetting_events(CORRECT)  # [0, 1, 1, 0, 0]
    groups = {
        "clean": np.array([T, F, F, F, T]),
        "mislabeled": np.array([F, T, T, T, F]),
        "canary": np.zeros(5, bool),
    }
    s = group_summary(lt, fg, groups)
    assert s["clean"] == {
        "count": 2,
        "share_learned": 1.0,
        "mean_learning_time": 0.5,
        "mean_forgetting": 0.0,
    }
    assert s["mislabeled"]["count"] == 3
    assert s["mislabeled"]["share_learned"] == pytest.approx(1 / 3)
    assert s["mislabeled"]["mean_learning_time"] == 2.0
    assert s["mislabeled"]["mean_forgetting"] == pytest.approx(2 / 3)
    assert s["canary"] == {
        "count": 0,
        "share_learned": None,
        "mean_learning_time": None,
        "mean_forgetting": None,
    }


# ---------------------------------------------------------------- onsets


def test_early_learning_onset():
    rounds = [1, 2, 3, 4, 5]
    assert early_learning_onset([0.2, 0.5, 0.7, 0.4, 0.1], rounds) == 3
    assert early_learning_onset([0.2, 0.7, 0.7, 0.4, 0.1], rounds) == 2  # first on ties
    assert early_learning_onset([None, 0.3, float("nan"), 0.9, 0.1], rounds) == 4
    assert early_learning_onset([None, None], [1, 2]) is None
    assert early_learning_onset([float("nan")], [1]) is None
    assert early_learning_onset([], []) is None


def test_memorization_onset():
    rounds = [1, 2, 3, 4]
    assert memorization_onset([0.0, 0.3, 0.6, 0.9], rounds, 0.5) == 3
    assert memorization_onset([0.0, 0.5, 0.5, 0.5], rounds, 0.5) is None  # strictly exceeds
    assert memorization_onset([None, 0.9, None, 0.1], rounds, 0.5) == 2
    assert memorization_onset([0.1, 0.2], [10, 20], 0.5) is None


def test_per_client_onsets():
    # rounds 1..5; client 0 holds examples 0-3 (0, 1 mislabeled), client 1 holds 4-7 (4, 5, 6
    # mislabeled), client 2 holds example 8 (clean only).
    rounds = np.arange(1, 6)
    client = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2])
    is_noisy = np.array([T, T, F, F, T, T, T, F, F])
    r = rounds[:, None]
    n = len(client)
    # client 0's mislabeled examples: predicted true label at round 1, given label from round 2.
    # client 1's: true-label share 2/3, 3/3, 1/3, 0, 0 over rounds 1-5 (peak at round 2),
    # given label from round 4. Clean examples always correct.
    correct_obs = np.zeros((5, n), bool)
    correct_true = np.zeros((5, n), bool)
    correct_obs[:, [0, 1]] = r >= 2
    correct_true[:, [0, 1]] = r < 2
    correct_obs[:, [4, 5, 6]] = r >= 4
    correct_true[:, 4] = (r == 2).ravel()
    correct_true[:, 5] = (r <= 3).ravel()
    correct_true[:, 6] = (r <= 2).ravel()
    correct_obs[:, [2, 3, 7, 8]] = True
    correct_true[:, [2, 3, 7, 8]] = True

    out = per_client_onsets(correct_obs, correct_true, is_noisy, client, rounds, share=0.5)
    assert set(out) == {0, 1, 2}
    assert out[0]["memorization_onset"] == 2
    assert out[0]["early_learning_onset"] == 1
    assert out[0]["num_noisy"] == 2 and out[0]["peak_noisy_true_acc"] == 1.0
    assert out[1]["memorization_onset"] == 4
    assert out[1]["early_learning_onset"] == 2
    assert out[1]["num_noisy"] == 3 and out[1]["peak_noisy_true_acc"] == 1.0
    assert out[2] == {
        "num_noisy": 0,
        "early_learning_onset": None,
        "peak_noisy_true_acc": None,
        "memorization_onset": None,
    }
    # same answer from torch tensors
    out_t = per_client_onsets(
        torch.from_numpy(correct_obs),
        torch.from_numpy(correct_true),
        torch.from_numpy(is_noisy),
        torch.from_numpy(client),
        torch.from_numpy(rounds),
        share=0.5,
    )
    assert out_t == out


def test_per_client_onsets_match_global_for_one_client():
    rng = np.random.default_rng(1)
    co, ct = rng.random((6, 40)) > 0.5, rng.random((6, 40)) > 0.5
    noisy = rng.random(40) > 0.6
    rounds = np.arange(6)
    out = per_client_onsets(co, ct, noisy, np.zeros(40, int), rounds, share=0.4)
    true_acc = ct[:, noisy].mean(1).tolist()
    mem = co[:, noisy].mean(1).tolist()
    assert out[0]["early_learning_onset"] == early_learning_onset(true_acc, rounds)
    assert out[0]["memorization_onset"] == memorization_onset(mem, rounds, 0.4)
