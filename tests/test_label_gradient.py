"""Label-dependent vs label-independent gradient parts (Stephenson et al. 2021, Eq. 25):
exact decomposition of every example's cross-entropy gradient, the statistics against a
brute-force computation, equal-size samples, and a real run with the key enabled."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmem import config
from fedmem.analysis.gradients import layer_groups
from fedmem.analysis.label_gradient import (
    STAT_FIELDS,
    equal_samples,
    label_gradient_stats,
    per_example_parts,
)
from fedmem.config import ModelConfig
from fedmem.models import build_model
from fedmem.simulate import main
from tests.conftest import REPO, small_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = [  # (model config, input shape): every architecture of the registry, small
    (ModelConfig(name="mlp", hidden=16, depth=2), (12,)),
    (ModelConfig(name="cnn1d", channels=8), (1, 16)),
    (ModelConfig(name="cnn", channels=3), (1, 8, 8)),
    (ModelConfig(name="resnet9", channels=4), (3, 8, 8)),
]


def _model_and_data(cfg: ModelConfig, shape: tuple[int, ...], n: int = 5, classes: int = 4):
    torch.manual_seed(0)
    model = build_model(cfg, shape, classes)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    with torch.no_grad():  # BatchNorm running statistics away from their initial values
        model.train()(torch.randn(16, *shape, generator=g) * 2 + 0.5)
    return model, x, y


def _loop_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target) -> list[dict]:
    """Reference: per example, ``torch.autograd.grad`` of ``target(logits, y_i)`` in eval mode,
    one example at a time (a plain loop)."""
    model.eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(len(x)):
        z = model(x[i : i + 1])[0]
        out.append(dict(zip(names, torch.autograd.grad(target(z, y[i]), params), strict=True)))
    return out


@pytest.mark.parametrize(("cfg", "shape"), MODELS, ids=[c.name for c, _ in MODELS])
def test_parts_sum_to_the_autograd_gradient_for_every_layer(cfg, shape):
    model, x, y = _model_and_data(cfg, shape)
    model.train()
    indep, dep = per_example_parts(model, x, y)
    assert model.training  # the mode is restored
    ref = _loop_grads(model, x, y, lambda z, t: F.cross_entropy(z[None], t[None]))
    groups = layer_groups(model)
    assert len(groups) >= 3
    for layer, names in groups.items():
        nonzero = 0
        for i in range(len(x)):
            got = torch.cat([(indep[n][i] + dep[n][i]).flatten() for n in names])
            want = torch.cat([ref[i][n].flatten() for n in names])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=layer)
            nonzero += int(want.abs().max() > 0)
        assert nonzero >= len(x) // 2, layer  # a real check, not zeros against zeros


@pytest.mark.parametrize(("cfg", "shape"), MODELS[:3], ids=[c.name for c, _ in MODELS[:3]])
def test_each_part_is_its_own_vector_jacobian_product(cfg, shape):
    """-J^T e_y is the gradient of -z_y; J^T p the gradient of p . z with p held fixed."""
    model, x, y = _model_and_data(cfg, shape)
    indep, dep = per_example_parts(model, x, y)
    ref_dep = _loop_grads(model, x, y, lambda z, t: -z[t])
    ref_indep = _loop_grads(model, x, y, lambda z, t: (torch.softmax(z, -1).detach() * z).sum())
    for i in range(len(x)):
        for name in dep:
            torch.testing.assert_close(dep[name][i], ref_dep[i][name], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(indep[name][i], ref_indep[i][name], rtol=1e-5, atol=1e-6)


def test_stats_match_brute_force_and_do_not_depend_on_chunks():
    model, x, y = _model_and_data(*MODELS[0], n=9)
    indep, dep = per_example_parts(model, x, y)
    whole = label_gradient_stats(model, x, y)
    chunked = label_gradient_stats(model, x, y, chunk_size=2)
    n = len(x)
    for layer, names in layer_groups(model).items():
        a = torch.cat([indep[k].reshape(n, -1) for k in names], 1).double()
        d = torch.cat([dep[k].reshape(n, -1) for k in names], 1).double()
        scale = math.sqrt(a.shape[1])
        pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
        u = {"indep": sum(float(a[i] @ a[j]) for i, j in pairs) / len(pairs)}
        u["dep"] = sum(float(d[i] @ d[j]) for i, j in pairs) / len(pairs)
        want = {
            "indep_norm_of_mean": math.sqrt(max(u["indep"], 0.0)) / scale,
            "dep_norm_of_mean": math.sqrt(max(u["dep"], 0.0)) / scale,
            "indep_norm": float(a.norm(dim=1).mean()) / scale,
            "dep_norm": float(d.norm(dim=1).mean()) / scale,
            "cos_of_mean_parts": float(F.cosine_similarity(a.mean(0), d.mean(0), dim=0)),
            "cos_parts": float(F.cosine_similarity(a, d, dim=1).mean()),
        }
        for key in STAT_FIELDS:
            assert whole[layer][key] == pytest.approx(want[key], rel=1e-5, abs=1e-9), key
            assert chunked[layer][key] == pytest.approx(whole[layer][key], rel=1e-6), key
        assert whole[layer]["num_examples"] == n
        assert whole[layer]["num_params"] == a.shape[1]


def test_label_dependent_mean_vanishes_for_random_labels_at_initialization():
    """Eq. 25 on a case it covers: a zero-initialized linear model (uniform softmax) on
    centered inputs. The mean label-dependent part is -E[e_y x^T]: zero in expectation for
    labels independent of x, not for labels that depend on x."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 20, generator=g)
    clean = (x[:, 0] > 0).long()
    shuffled = torch.randint(0, 2, (2000,), generator=g)
    model = nn.Linear(20, 2, bias=False)
    nn.init.zeros_(model.weight)
    s_clean = label_gradient_stats(model, x, clean)["weight"]
    s_random = label_gradient_stats(model, x, shuffled)["weight"]
    # clean: -E[e_y x^T] has rows -/+ E[x_0 1{+-x_0 > 0}] e_0 = -/+ phi(0) e_0 (phi: N(0,1)
    # density), so its norm is sqrt(2) phi(0), divided by sqrt(#params = 40)
    assert s_clean["dep_norm_of_mean"] == pytest.approx(
        math.sqrt(2) / math.sqrt(2 * math.pi) / math.sqrt(40), rel=0.1
    )
    assert s_random["dep_norm_of_mean"] < 0.2 * s_clean["dep_norm_of_mean"]
    # each example's own label-dependent part is just as large in both groups
    assert s_random["dep_norm"] == pytest.approx(s_clean["dep_norm"], rel=0.05)


def test_equal_samples_are_equal_sized_within_their_masks_and_seeded():
    clean = torch.zeros(100, dtype=torch.bool)
    clean[:70] = True
    noisy = ~clean
    for cap, size in ((10, 10), (50, 30), (1000, 30)):
        a, b = equal_samples([clean, noisy], cap, np.random.default_rng(3))
        assert len(a) == len(b) == size
        assert bool(clean[a].all()) and bool(noisy[b].all())
        assert len(set(a.tolist())) == size and a.tolist() == sorted(a.tolist())
        again = equal_samples([clean, noisy], cap, np.random.default_rng(3))
        assert a.tolist() == again[0].tolist() and b.tolist() == again[1].tolist()
    empty = equal_samples([clean, torch.zeros(100, dtype=torch.bool)], 10, np.random.default_rng(0))
    assert [len(r) for r in empty] == [0, 0]


def test_default_config_hash_leaves_the_key_out():
    """Off by default: the section is all defaults, so it is not hashed and no existing run
    directory is renamed; enabling it gives a different run directory."""
    base = config.load(REPO / "configs" / "default.yaml", [])
    assert "label_gradient" not in config.non_default(base).get("analysis", {})
    on = config.load(REPO / "configs" / "default.yaml", ["analysis.label_gradient.enabled=true"])
    assert config.config_hash(on) != config.config_hash(base)


def test_real_run_writes_label_parts_rows(tmp_path):
    args = small_overrides(tmp_path) + [
        "train.rounds=2",
        "federation.backend=local",
        "analysis.gradients.enabled=false",
        "analysis.label_gradient.enabled=true",
        "analysis.label_gradient.max_examples=40",
    ]
    assert main(args) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = [json.loads(line) for line in (run_dir / "gradients.jsonl").read_text().splitlines()]
    assert rows and all(r["kind"] == "label_parts" for r in rows)
    assert {r["run"] for r in rows} == {"central", "federated"}
    assert {r["round"] for r in rows} == {0, 1, 2}
    assert {r["group"] for r in rows} == {"clean", "noisy"}
    assert {r["layer"] for r in rows} == {"net.1", "net.3", "net.5"}
    assert len(rows) == 2 * 3 * 3 * 2  # runs x rounds x layers x groups
    for r in rows:
        assert r["num_examples"] == 40  # equal samples: the cap, in both groups
        for key in STAT_FIELDS:
            assert isinstance(r[key], float) and math.isfinite(r[key]), (key, r)
        assert r["dep_norm"] > 0 and r["indep_norm"] > 0
        assert -1.0 <= r["cos_parts"] <= 1.0 and -1.0 <= r["cos_of_mean_parts"] <= 1.0
    # the same initial model: round 0 of both runs agrees
    first = {(r["run"], r["layer"], r["group"]): r for r in rows if r["round"] == 0}
    for (run, layer, group), r in first.items():
        if run == "federated":
            c = first[("central", layer, group)]
            assert r["dep_norm_of_mean"] == pytest.approx(c["dep_norm_of_mean"], rel=1e-5)
    report = (run_dir / "report.md").read_text()
    assert "![label-dependent vs label-independent gradient](plots/label_parts.png)" in report
    assert (run_dir / "plots" / "label_parts.png").stat().st_size > 10_000
