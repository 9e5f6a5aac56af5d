"""``federation.excluded_clients``: clients that never train (the retrain reference of
unlearning). The others train exactly as in the full run; the central run leaves the
excluded clients' rows out."""

from __future__ import annotations

import json

import pytest

from fedmem.simulate import main
from tests.conftest import small_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(run_dir, name):
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def test_excluded_client_never_trains_and_the_others_start_the_same(tmp_path):
    base = [*small_overrides(tmp_path), "federation.backend=local", "train.rounds=2"]
    assert main(base) == 0
    assert main([*base, "federation.excluded_clients=[1]"]) == 0
    full, without = sorted((tmp_path / "runs").glob("default-*"), key=lambda p: p.stat().st_mtime)
    clients = _rows(without, "clients.jsonl")
    assert {c["client"] for c in clients} == {0, 2, 3}
    # round 1 starts from the same model: the remaining clients' first updates are identical
    first = {c["client"]: c["train_loss"] for c in _rows(full, "clients.jsonl") if c["round"] == 1}
    assert {c["client"]: c["train_loss"] for c in clients if c["round"] == 1} == {
        k: v for k, v in first.items() if k != 1
    }

    # the central run saw fewer examples: client 1's rows are left out
    def central_examples(run_dir):
        rows = [r for r in _rows(run_dir, "metrics.jsonl") if r["run"] == "central"]
        return rows[-1]["examples"]

    assert central_examples(without) < central_examples(full)


def test_excluded_clients_are_checked(tmp_path, capsys):
    assert main([*small_overrides(tmp_path), "federation.excluded_clients=[4]"]) == 2
    assert "federation.excluded_clients" in capsys.readouterr().err
    assert main([*small_overrides(tmp_path), "federation.excluded_clients=[0,1,2,3]"]) == 2
