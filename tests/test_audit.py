"""``python -m fedmem.audit``: a real small run audited end to end, input errors, DP checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fedmem import config
from fedmem.audit import VIOLATION_EXIT
from fedmem.audit import main as audit_main
from fedmem.data.table import build_table
from fedmem.errors import InputError
from fedmem.privacy.audit.data import shadow_data
from fedmem.privacy.audit.records import attack_overrides, check_auditable
from fedmem.privacy.audit.report import violations
from fedmem.privacy.audit.scoring import canary_exposure, claimed_privacy, client_scores
from fedmem.simulate import main as simulate_main
from tests.conftest import REPO, small_overrides

AUDIT = [
    "audit.pool=300",
    "audit.canaries=100",
    "audit.heldout_clients=2",
    "audit.attack.shadows=8",
    "audit.attack.client_shadows=4",
    "data.mnist1d.num_samples=1500",
    "data.noise.rate=0.1",
    "data.canaries.repeats=[1, 4]",
    "data.canaries.reference=200",
    "train.rounds=12",
    "model.hidden=128",
    "federation.backend=local",
    "analysis.gradients.enabled=false",
]


def _run(tmp_path, *extra: str):
    args = [*small_overrides(tmp_path), *AUDIT, *extra]
    assert simulate_main(args) == 0
    (d,) = (tmp_path / "runs").iterdir()
    return d


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """A small overfit non-private run (central + federated) and its audit."""
    tmp = tmp_path_factory.mktemp("audit")
    run_dir = _run(tmp)
    assert audit_main([str(run_dir)]) == 0
    return run_dir, json.loads((run_dir / "audit.json").read_text())


def test_audit_outputs_and_numbers(audited):
    run_dir, result = audited
    assert set(result["runs"]) == {"central", "federated"}
    assert result["skipped"] == {}
    assert result["shadows"]["central"]["recipe"] == "central"
    assert result["shadows"]["federated"]["recipe"] == "fedavg"
    for name, res in result["runs"].items():
        ex = res["exposure"]
        assert ex["references"] == 200
        per = np.array(ex["per_canary"])
        assert len(per) == 10 and (per >= 0).all() and (per <= math.log2(201) + 1e-9).all()
        assert set(ex["by_group"]) == {"all", "copies=1", "copies=4", "clients=1"}
        mem = res["membership"]
        assert mem["candidates"] == 300 and 100 < mem["members"] < 200
        for a in ("loss", "lira_online", "lira_offline", "rmia"):
            s = mem["attacks"][a]
            assert 0.0 <= s["auc"] <= 1.0 and 0.0 <= s["tpr_at_1pct_fpr"] <= 1.0, (name, a)
        cm = res["client_membership"]
        assert cm["clients"] == 4 and cm["heldout_clients"] == 2 and cm["shadows"] == 4
        assert set(cm["auc_by_attack"]) == {"loss", "lira_online", "lira_offline"}
        assert set(cm["score_per_client"]["lira_online"]) == {str(k) for k in range(6)}
        assert result["client_shadows"][name]["clients"] == 6
        one = res["one_run_epsilon"]
        assert one["canaries"] == 100 and one["claims"][0]["accountant"] == "none"
        assert one["claims"][0]["violated"] is False
    # the central model overfits (12 epochs, ~1k rows, no regularization): attacks see it
    central = result["runs"]["central"]
    assert central["membership"]["attacks"]["lira_online"]["auc"] > 0.6
    assert central["membership"]["attacks"]["loss"]["auc"] > 0.55
    assert central["one_run_epsilon"]["lower_bound"] > 0.2
    assert central["exposure"]["by_group"]["copies=4"]["mean"] > 2.0
    # outputs: plots, summary headline, report section
    for name in ("central", "federated", "exposure"):
        assert (run_dir / result["plots"][name]).is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (
        summary["audit"]["central"]["lira_online_auc"]
        == (central["membership"]["attacks"]["lira_online"]["auc"])
    )
    report = (run_dir / "report.md").read_text()
    assert "## Privacy audit" in report and "audit_roc_central.png" in report


def test_audit_is_cached_and_deterministic(audited, capsys):
    run_dir, result = audited
    assert audit_main([str(run_dir)]) == 0
    assert "cached" in capsys.readouterr().out
    again = json.loads((run_dir / "audit.json").read_text())
    assert again == result
    # recomputed: the same numbers (shadows, scores and bounds are seeded); timings aside
    assert audit_main([str(run_dir), "--force"]) == 0
    redone = json.loads((run_dir / "audit.json").read_text())

    def untimed(r: dict) -> dict:
        r = json.loads(json.dumps(r))
        r.pop("wall_s")
        for sh in [*r["shadows"].values(), *r["client_shadows"].values()]:
            sh.pop("train_s")
        return r

    assert untimed(redone) == untimed(result)
    # other attack settings: not the cached result, and the run itself is reused
    assert audit_main([str(run_dir), "audit.attack.shadows=4"]) == 0
    four = json.loads((run_dir / "audit.json").read_text())
    assert {sh["models"] for sh in four["shadows"].values()} == {4}
    assert four["attack_settings"]["shadows"] == 4


def test_dp_violation_is_reported(audited, tmp_path, capsys):
    """Claiming a tiny epsilon for an overfit non-private model must be caught (exit 3)."""
    import shutil

    run_dir, _ = audited
    fake = tmp_path / run_dir.name
    shutil.copytree(run_dir, fake)
    summary = json.loads((fake / "summary.json").read_text())
    summary["privacy"] = {"record_level": {"central": {"epsilon": 0.01}}}
    (fake / "summary.json").write_text(json.dumps(summary))
    assert audit_main([str(fake), "--force"]) == VIOLATION_EXIT
    err = capsys.readouterr().err
    assert "DP violation: central" in err and "0.01" in err
    res = json.loads((fake / "audit.json").read_text())["runs"]["central"]["one_run_epsilon"]
    assert res["claims"][0]["violated"] is True and res["lower_bound"] > 0.01


def test_user_level_dp_run_is_tested_per_record_through_group_privacy(tmp_path):
    """A DP-FedAvg run: its user-level epsilon is never tested as a per-record guarantee;
    the canaries test the record-level claim it implies, (2 eps, (1 + e^eps) delta)."""
    run_dir = _run(
        tmp_path,
        "privacy.user_level=true",
        "privacy.user_noise_multiplier=2",
        "audit.attack.shadows=4",
        "audit.attack.client_shadows=0",
        "train.rounds=4",
    )
    code = audit_main([str(run_dir)])
    result = json.loads((run_dir / "audit.json").read_text())
    user = json.loads((run_dir / "summary.json").read_text())["privacy"]["user_level"]
    eps, delta = user["epsilon"], user["delta"]
    assert 0 < eps < 50 and "zero-out" in user["neighbouring"]
    fed = result["runs"]["federated"]["one_run_epsilon"]
    (claim,) = [c for c in fed["claims"] if c["accountant"] == "user_level"]
    assert claim["level"] == "user" and claim["epsilon"] == eps
    assert claim["test_epsilon"] == pytest.approx(2 * eps)
    assert claim["test_delta"] == pytest.approx(min(1.0, (1 + math.exp(eps)) * delta))
    # no claim of this run is tested at the user epsilon itself
    assert all(c["test_epsilon"] != eps for c in fed["claims"])
    assert fed["tests"] == sum(math.isfinite(c["test_epsilon"]) for c in fed["claims"])
    assert claim["violated"] == (claim["tested"] and claim["lower_bound"] > claim["test_epsilon"])
    # the central model of a user-level run claims nothing
    (none,) = result["runs"]["central"]["one_run_epsilon"]["claims"]
    assert none["accountant"] == "none" and none["violated"] is False
    assert code == (VIOLATION_EXIT if violations(result) else 0)


def test_audit_reads_lineage_records_and_names_what_shadows_miss(audited, tmp_path):
    """A derived model (a copy of the federated weights, trained on from round 6 by a method
    the shadows cannot imitate) is audited with the recipe of its record, and audit.json says
    what its shadows do not simulate; its name decides nothing."""
    import shutil

    from fedmem.runs.records import ModelRecord, add_model

    run_dir, _ = audited
    run = tmp_path / run_dir.name
    shutil.copytree(run_dir, run)
    shutil.copy(run / "checkpoints" / "federated.pt", run / "checkpoints" / "odd-name.pt")
    record = ModelRecord(
        name="odd-name",
        trainer="federated",
        rounds=12,
        checkpoint="checkpoints/odd-name.pt",
        strategy="fedavg",
        plugins=("elr",),
        parent="federated@6",
        method="finetune",
    )
    summary = json.loads((run / "summary.json").read_text())
    add_model(run, record, summary["runs"]["federated"])
    overrides = ["audit.attack.shadows=4", "audit.attack.client_shadows=0"]
    assert audit_main([str(run), *overrides, "--force"]) == 0
    result = json.loads((run / "audit.json").read_text())
    assert set(result["runs"]) == {"central", "federated", "odd-name"}
    odd = result["shadows"]["odd-name"]
    assert odd["recipe"] == "fedavg"
    missing = " | ".join(odd["not_simulated"])
    assert "starts from federated@6" in missing and "finetune" in missing and "elr" in missing
    assert result["shadows"]["federated"]["not_simulated"] == []
    # the derived model claims no DP guarantee of its own
    claims = result["runs"]["odd-name"]["one_run_epsilon"]["claims"]
    assert [c["accountant"] for c in claims] == ["none"]


def test_dp_run_lower_bound_below_accountant(tmp_path):
    run_dir = _run(
        tmp_path,
        "federation.enabled=false",
        "privacy.record_level=true",
        "privacy.noise_multiplier=2.0",
    )
    assert audit_main([str(run_dir)]) == 0
    res = json.loads((run_dir / "audit.json").read_text())["runs"]["central"]
    one = res["one_run_epsilon"]
    claim = one["claims"][0]
    assert claim["accountant"] == "record_level" and isinstance(claim["epsilon"], float)
    assert one["lower_bound"] <= claim["epsilon"] and not claim["violated"]
    # strong noise: membership inference near chance (300 candidates: AUC s.e. ~0.035)
    for a, s in res["membership"]["attacks"].items():
        assert abs(s["auc"] - 0.5) < 0.15, (a, s["auc"])


# ---------------------------------------------------------------------------------------------
# input errors
# ---------------------------------------------------------------------------------------------
def test_run_without_audit_records_exits_2_naming_keys(tmp_path, capsys):
    args = [*small_overrides(tmp_path), "federation.enabled=false"]
    assert simulate_main(args) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert audit_main([str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: audit.pool:") and "audit.canaries" in err
    assert "\n" not in err
    assert not (run_dir / "audit.json").exists()


def test_not_a_run_dir_and_incomplete_and_bad_override(tmp_path, capsys):
    assert audit_main([str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    assert audit_main([str(tmp_path)]) == 2
    assert "incomplete" in capsys.readouterr().err
    with pytest.raises(InputError, match=r"^audit\.pool: only audit\.attack"):
        attack_overrides(["audit.pool=5"])
    with pytest.raises(InputError, match=r"^train: only audit\.attack"):
        attack_overrides(["train.lr=0.1"])
    assert attack_overrides(["audit.attack.shadows=4"]) == {"audit": {"attack": {"shadows": 4}}}


def test_missing_parts_name_their_keys():
    cfg = config.load(REPO / "configs" / "default.yaml", ["audit.pool=10"])
    missing = check_auditable(cfg)
    assert set(missing) == {"one_run_epsilon", "client_membership"}
    assert "audit.canaries" in missing["one_run_epsilon"]


# ---------------------------------------------------------------------------------------------
# pure pieces
# ---------------------------------------------------------------------------------------------
def test_client_scores_average_per_client():
    ids, means = client_scores(np.array([1.0, 3.0, 5.0, 10.0]), np.array([2, 0, 2, 0]))
    assert ids.tolist() == [0, 2] and means.tolist() == [6.5, 3.0]


def test_canary_exposure_groups():
    refs = np.arange(1.0, 100.0)  # 99 references
    res = canary_exposure(
        np.array([0.5, 99.5, 49.5, 0.5]),
        refs,
        copies=np.array([4, 1, 1, 4]),
        holders=np.array([1, 1, 2, 2]),
    )
    assert res["per_canary"] == pytest.approx([math.log2(100), 0.0, 1.0, math.log2(100)])
    assert res["by_group"]["copies=4"]["mean"] == pytest.approx(math.log2(100))
    assert res["by_group"]["copies=1"]["mean"] == pytest.approx(0.5)
    assert res["by_group"]["clients=2"]["count"] == 2


def test_shadow_data_covers_rows_and_candidates():
    cfg = config.load(
        REPO / "configs" / "default.yaml",
        ["audit.pool=200", "audit.canaries=40", "data.mnist1d.num_samples=1000"],
    )
    table = build_table(cfg)
    data = shadow_data(table)
    out = int((~table.audit_member).sum())
    assert len(data.y) == len(table) + out
    assert torch.equal(data.x[data.candidate_row], table.audit_x)
    assert torch.equal(data.y[data.candidate_row], table.audit_y)
    assert torch.equal(data.client[data.candidate_row], table.audit_client)
    cand = torch.zeros(2, 240, dtype=torch.bool)
    cand[0, :5] = True
    masks = data.row_masks(cand)
    non_candidates = torch.ones(len(data.y), dtype=torch.bool)
    non_candidates[data.candidate_row] = False
    assert masks[:, non_candidates].all()
    assert int(masks[0, data.candidate_row].sum()) == 5 and not masks[1, data.candidate_row].any()


def test_claimed_privacy_picks_the_worst_client_and_user_level():
    cfg = config.load(REPO / "configs" / "default.yaml")
    summary = {
        "privacy": {
            "record_level": {
                "clients": {
                    "0": {"epsilon": 2.0, "delta": 3e-4},
                    "1": {"epsilon": 5.0, "delta": 2e-4},
                }
            },
            "user_level": {"epsilon": 3.0, "delta": 1e-3},
        }
    }
    claims = claimed_privacy(cfg, summary, "federated", 1000)
    # record level: the largest epsilon and the largest delta over clients, tested as is
    assert [(c["accountant"], c["level"], c["epsilon"], c["delta"]) for c in claims] == [
        ("record_level", "record", 5.0, 3e-4),
        ("user_level", "user", 3.0, 1e-3),
    ]
    assert (claims[0]["test_epsilon"], claims[0]["test_delta"]) == (5.0, 3e-4)
    # user level: never tested as a per-record guarantee with its own epsilon; group
    # privacy of 2 client-level steps gives (2 eps, (1 + e^eps) delta) per record
    user = claims[1]
    assert user["test_epsilon"] == 6.0
    assert user["test_delta"] == pytest.approx((1 + math.exp(3.0)) * 1e-3)
    assert "zero-out" in user["neighbouring"]
    none = claimed_privacy(cfg, {}, "central", 1000)
    assert [(c["accountant"], c["epsilon"], c["delta"]) for c in none] == [("none", "inf", 1e-4)]
    assert math.isinf(none[0]["test_epsilon"])
    # a user claim too weak to bound one record (delta term >= 1) is not tested at all
    weak = {"privacy": {"user_level": {"epsilon": 10.0, "delta": 1e-3}}}
    (c,) = claimed_privacy(cfg, weak, "federated", 1000)
    assert math.isinf(c["test_epsilon"])


def test_violations_only_for_tested_claims_and_state_confidence():
    claim = {
        "accountant": "record_level",
        "level": "record",
        "epsilon": 1.0,
        "delta": 1e-5,
        "test_epsilon": 1.0,
        "test_delta": 1e-5,
        "tested_as": "one record",
        "confidence": 0.975,
        "lower_bound": 2.0,
    }
    untested = claim | {"accountant": "none", "epsilon": "inf", "test_epsilon": math.inf}
    result = {
        "runs": {
            "central": {
                "one_run_epsilon": {
                    "tests": 2,
                    "confidence": 0.95,
                    "claims": [
                        claim | {"violated": True, "tested": True},
                        untested | {"violated": False, "tested": False},
                    ],
                }
            }
        }
    }
    (line,) = violations(result)
    assert "record_level" in line and "97.50% confidence per test, 2 test(s)" in line
    result["runs"]["central"]["one_run_epsilon"]["claims"][0]["violated"] = False
    assert violations(result) == []


def test_client_auc_comes_with_a_permutation_p_value():
    from fedmem.stats import auc_test

    # 10 training vs 4 held-out clients, perfectly separated: the exact p-value is 1/C(14, 4)
    scores = np.r_[np.arange(10) + 10.0, np.arange(4)]
    member = np.r_[np.ones(10, bool), np.zeros(4, bool)]
    t = auc_test(scores, member)
    assert t["auc"] == 1.0 and t["p_value"] == pytest.approx(1 / math.comb(14, 4))
    assert t["p_value_method"] == "exact permutation"
    # one held-out client above every training one: AUC 30/40, p from the same enumeration
    scores[10] = 100.0
    t = auc_test(scores, member)
    assert t["auc"] == pytest.approx(0.75) and 0.05 < t["p_value"] < 0.5
    assert t["ci_low"] <= 0.75 <= t["ci_high"]
    # no signal: p-value near 1/2 over random scores, Monte Carlo when arrangements are many
    rng = np.random.default_rng(0)
    ps = [
        auc_test(rng.normal(size=60), np.r_[np.ones(30), np.zeros(30)], resamples=200)["p_value"]
        for _ in range(20)
    ]
    assert 0.25 < float(np.mean(ps)) < 0.75


# ---------------------------------------------------------------------------------------------
# the preset, full size (slow: ~5 minutes per run with its audit)
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("dp", [False, True])
def test_audit_preset_lira_beats_loss_and_dp_is_near_chance(tmp_path, dp):
    extra = ["privacy.record_level=true", "privacy.noise_multiplier=2"] if dp else []
    args = [
        "--config",
        str(REPO / "configs" / "audit.yaml"),
        f"output.dir={tmp_path / 'runs'}",
        "federation.backend=local",
        *extra,
    ]
    assert simulate_main(args) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert audit_main([str(run_dir)]) == 0
    result = json.loads((run_dir / "audit.json").read_text())
    central = result["runs"]["central"]["membership"]["attacks"]
    if not dp:
        # measured 2026-12-02 (20 + 10 clients): LiRA online 0.906 vs loss 0.780 AUC, TPR at
        # 1% FPR 0.285
        assert central["lira_online"]["auc"] > central["loss"]["auc"] + 0.05
        assert central["lira_online"]["tpr_at_1pct_fpr"] > 0.1
    else:
        for name, res in result["runs"].items():
            for a, s in res["membership"]["attacks"].items():
                assert abs(s["auc"] - 0.5) < 0.06, (name, a, s["auc"])
            one = res["one_run_epsilon"]
            assert one["lower_bound"] <= one["claims"][0]["epsilon"]
