"""Thread counts that keep parallel runs from collapsing (issue 16): ``train.threads=auto``
trains small models on one torch thread, restores the process's count for the analysis, and
OpenMP waits passively unless the user chose otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from fedmem import config
from fedmem.runs.devices import training_threads
from tests.conftest import small_overrides


def test_auto_is_one_thread_for_small_models_and_torch_default_for_convnets():
    def threads(**train):
        return lambda name: training_threads(
            config.build({"model": {"name": name}, "train": train}), default=7
        )

    auto = threads()
    assert [auto(n) for n in ("mlp", "cnn1d", "cnn", "resnet9")] == [1, 1, 7, 7]
    assert threads(threads=3)("mlp") == 3
    assert threads(threads=None)("mlp") == 7


def test_omp_waits_passively_unless_the_user_set_it():
    code = "import fedmem, os; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "ACTIVE"


def test_the_central_loop_runs_on_the_resolved_threads_and_the_count_is_restored(
    tmp_path, monkeypatch
):
    from fedmem.runs import experiment
    from fedmem.simulate import main

    seen = []
    real = experiment.run_central

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(experiment, "run_central", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        args = [*small_overrides(tmp_path), "federation.enabled=false", "train.rounds=1"]
        assert main(args) == 0
        assert seen == [1]
        assert torch.get_num_threads() == 2
        assert main([*args, "train.threads=2", "output.name=two"]) == 0
        assert seen == [1, 2]
    finally:
        torch.set_num_threads(before)
