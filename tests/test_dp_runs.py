"""Record-level DP-SGD in both runs and user-level DP-FedAvg: the reported epsilons are the
composition of everything each trainer really did (recomputed here with fresh Opacus
accountants), clients keep their accountant across rounds, and bad settings are config errors."""

from __future__ import annotations

import json
import math

import pytest
from opacus.accountants import RDPAccountant

from fedmem.config import ConfigError
from fedmem.runs.experiment import prepare
from fedmem.simulate import load_config, main, parse_args
from strategies import sample_partitions
from tests.conftest import small_overrides

DP = ["privacy.record_level=true", "privacy.noise_multiplier=1.0", "privacy.max_grad_norm=1.0"]


def _run(tmp_path, *extra):
    args = [*small_overrides(tmp_path), "federation.backend=local", *extra]
    assert main(args) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    clients = [json.loads(x) for x in (run_dir / "clients.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return rows, clients, summary


def _fresh_epsilon(entries, delta):
    acc = RDPAccountant()
    for noise, q, steps in entries:
        for _ in range(steps):
            acc.step(noise_multiplier=noise, sample_rate=q)
    return acc.get_epsilon(delta=delta)


def test_record_level_epsilons_compose_across_rounds(tmp_path):
    rows, clients, summary = _run(tmp_path, *DP, "train.rounds=4", "federation.fraction_train=0.5")
    # central: one trainer, every round
    central = [r for r in rows if r["run"] == "central"]
    assert central[0]["epsilon"] == 0.0
    eps = [r["epsilon"] for r in central[1:]]
    assert all(b > a for a, b in zip(eps, eps[1:], strict=False))
    n = summary["examples"]["train"]
    q = 1 / math.ceil(n / 64)
    steps_per_round = round(1 / q)
    assert central[-1]["dp_steps"] == 4 * steps_per_round
    expected = _fresh_epsilon([(1.0, q, 4 * steps_per_round)], 1 / (10 * n))
    assert central[-1]["epsilon"] == pytest.approx(expected, rel=1e-9)

    # clients: each reported epsilon is the composition of all its rounds so far
    by_client: dict[int, list[dict]] = {}
    for c in sorted(clients, key=lambda c: c["round"]):
        by_client.setdefault(c["client"], []).append(c)
    for k, history in by_client.items():
        sampled = [r for r in range(1, 5) if k in sample_partitions(0, r, 4, 0.5, 1)]
        assert [c["round"] for c in history] == sampled
        for i, c in enumerate(history):
            assert c["dp_steps_total"] == sum(h["dp_steps"] for h in history[: i + 1])
            entries = [
                (h["noise_multiplier"], h["sample_rate"], h["dp_steps"]) for h in history[: i + 1]
            ]
            assert c["epsilon"] == pytest.approx(_fresh_epsilon(entries, c["delta"]), rel=1e-9)
            if i:
                assert c["epsilon"] > history[i - 1]["epsilon"]
    # the run's epsilon after each round is the largest client epsilon so far; a client
    # that was not sampled keeps its value
    fed = [r for r in rows if r["run"] == "federated"]
    last: dict[int, float] = {}
    for r in fed[1:]:
        for c in clients:
            if c["round"] == r["round"]:
                last[c["client"]] = c["epsilon"]
        assert r["epsilon"] == pytest.approx(max(last.values()))
    rec = summary["privacy"]["record_level"]
    assert rec["epsilon_max"] == pytest.approx(max(last.values()))
    assert set(rec["epsilon_per_client"]) == {str(k) for k in by_client}

    # one delta convention (default "dataset"): central and every client state epsilon at
    # 1/(10 N), N the run's training examples, so the final table's epsilons are comparable
    assert rec["delta_convention"] == "dataset"
    assert {c["delta"] for c in clients} == {1 / (10 * n)}
    assert summary["runs"]["central"]["delta"] == summary["runs"]["federated"]["delta"]
    assert summary["runs"]["central"]["delta"] == pytest.approx(1 / (10 * n))
    assert rec["central"]["delta"] == pytest.approx(1 / (10 * n))


def test_holder_delta_convention_gives_each_client_its_own_delta(tmp_path):
    extra = [*DP, "privacy.delta_convention=holder"]
    rows, clients, summary = _run(tmp_path, *extra)
    n = summary["examples"]["train"]
    table = prepare(load_config(parse_args([*small_overrides(tmp_path), *extra])))
    for c in clients:
        assert c["delta"] == pytest.approx(1 / (10 * len(table.client_rows(c["client"]))))
    central = summary["runs"]["central"]
    assert central["delta"] == pytest.approx(1 / (10 * n))
    # the federated row states the largest client delta, beside the largest epsilon
    assert summary["runs"]["federated"]["delta"] == pytest.approx(max(c["delta"] for c in clients))


def test_user_level_epsilon_is_opacus_rdp_over_rounds(tmp_path):
    rows, _, summary = _run(
        tmp_path,
        "train.rounds=3",
        "privacy.user_level=true",
        "privacy.user_noise_multiplier=1.5",
        "privacy.user_clip_norm=5.0",
    )
    fed = [r for r in rows if r["run"] == "federated"]
    delta = 1 / (10 * 4)
    for r in fed[1:]:
        expected = _fresh_epsilon([(1.5, 1.0, r["round"])], delta)
        assert r["user_epsilon"] == pytest.approx(expected, rel=1e-9)
    assert summary["privacy"]["user_level"]["rounds_released"] == 3
    # without record-level DP the record-level epsilon is infinite, never 0
    assert all(r["epsilon"] == "inf" for r in rows)


def test_user_level_epsilon_with_half_the_clients_per_round_is_not_amplified(tmp_path):
    """fraction_train=0.5 samples a fixed-size set without replacement: that sampling may not
    be accounted as Poisson at q = 0.5, so the user epsilon is RDP at q = 1 over the rounds."""
    rows, clients, summary = _run(
        tmp_path,
        "train.rounds=3",
        "federation.fraction_train=0.5",
        "privacy.user_level=true",
        "privacy.user_noise_multiplier=1.5",
    )
    fed = [r for r in rows if r["run"] == "federated"]
    assert all(r["clients_sampled"] == 2 for r in fed[1:])  # 2 of 4 clients per round
    for r in fed[1:]:
        assert r["user_epsilon"] == pytest.approx(
            _fresh_epsilon([(1.5, 1.0, r["round"])], 1 / 40), rel=1e-9
        )
        # what Poisson accounting at q = 0.5 would have claimed is smaller
        assert r["user_epsilon"] > _fresh_epsilon([(1.5, 0.5, r["round"])], 1 / 40)
    user = summary["privacy"]["user_level"]
    assert user["sample_rate"] == 1.0 and user["clients_per_round"] == 2
    assert "without amplification" in user["sampling"]


def test_user_level_dp_with_client_failures(tmp_path, monkeypatch):
    """Failed clients are dropped, the others aggregated with noise for their own count
    (std z * C / n_ok), and only released rounds are accounted."""
    import flwr.serverapp.strategy.dp_fixed_clipping as flower_dp

    calls: list[tuple[float, float, int]] = []
    real = flower_dp.compute_stdv

    def spy(noise_multiplier, clipping_norm, num_sampled_clients):
        calls.append((noise_multiplier, clipping_norm, num_sampled_clients))
        return real(noise_multiplier, clipping_norm, num_sampled_clients)

    monkeypatch.setattr(flower_dp, "compute_stdv", spy)
    rows, clients, summary = _run(
        tmp_path,
        "train.rounds=6",
        "privacy.user_level=true",
        "privacy.user_noise_multiplier=1.5",
        "privacy.user_clip_norm=5.0",
        "federation.client_failure_rate=0.3",
        "federation.min_train_clients=2",
    )
    fed = [r for r in rows if r["run"] == "federated"][1:]
    released = [r for r in fed if not r["round_lost"]]
    assert any(r["clients_failed"] > 0 for r in released), "the seed gives partial rounds"
    assert [c[2] for c in calls] == [r["clients_ok"] for r in released]
    assert all(c[:2] == (1.5, 5.0) for c in calls)
    assert all(r["clients_ok"] >= 2 for r in released)
    assert all(r["clients_ok"] < 2 for r in fed if r["round_lost"])
    failed_rows = [c for c in clients if c.get("failed")]
    assert len(failed_rows) == sum(r["clients_failed"] for r in fed)
    assert all("injected" in c["reason"] for c in failed_rows)
    for i, r in enumerate(fed):
        n_released = sum(1 for x in fed[: i + 1] if not x["round_lost"])
        expected = _fresh_epsilon([(1.5, 1.0, n_released)], 1 / 40) if n_released else 0.0
        assert r["user_epsilon"] == pytest.approx(expected, rel=1e-9)
    assert summary["privacy"]["user_level"]["rounds_released"] == len(released)
    # a round with failures still moves the model
    losses = [r["test_loss"] for r in fed]
    assert len(set(losses)) == len(losses)


def test_no_dp_reports_infinite_epsilon(tmp_path):
    rows, _, summary = _run(tmp_path, "train.rounds=1")
    assert {r["epsilon"] for r in rows} == {"inf"}
    assert "privacy" not in summary


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["privacy.record_level=true", "privacy.target_epsilon=0"], "privacy.target_epsilon"),
        (
            ["privacy.record_level=true", "privacy.noise_multiplier=1", "privacy.target_epsilon=3"],
            "privacy.noise_multiplier",
        ),
        ([*DP, "privacy.delta=0.5"], "privacy.delta"),
        (["privacy.user_level=true", "federation.strategy=krum"], "privacy.user_level"),
    ],
)
def test_bad_privacy_settings_are_config_errors(tmp_path, overrides, key):
    args = parse_args([*small_overrides(tmp_path), *overrides])
    with pytest.raises(ConfigError) as exc:
        prepare(load_config(args))
    assert str(exc.value).startswith(key + ":"), str(exc.value)
