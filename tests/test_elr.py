"""ELR (Liu et al. 2020) as a plug-in: the loss and the target update equal a direct
computation of the reference code's formulas; every client keeps its targets across rounds
(both backends) and never sends them; with DP-SGD the term is per example and spends no
extra privacy."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmem import config
from fedmem.data.table import cached_table
from fedmem.federation import client_app
from fedmem.federation.client_state import load_state
from fedmem.federation.engine import run_federated
from fedmem.methods import RoundContext, build_plugins
from fedmem.methods.base import BatchContext
from fedmem.methods.elr import ELR
from fedmem.models.factory import init_model
from fedmem.train import keyed_order, make_optimizer, train_epochs
from tests.conftest import REPO, federated_job, small_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

ELR_ON = ["plugins.elr.enabled=true", "plugins.elr.beta=0.7", "plugins.elr.lam=3"]


def _reference_step(t, logits, labels, lam, beta):
    """The reference code's ELR loss (shengliu66/ELR model/loss.py elr_loss.forward)."""
    y_pred = F.softmax(logits, dim=1)
    y_pred = torch.clamp(y_pred, 1e-4, 1.0 - 1e-4)
    y_pred_ = y_pred.data.detach()
    t = beta * t + (1 - beta) * (y_pred_ / y_pred_.sum(dim=1, keepdim=True))
    ce = F.cross_entropy(logits, labels)
    reg = ((1 - (t * y_pred).sum(dim=1)).log()).mean()
    return t, ce + lam * reg


def test_elr_loss_and_targets_equal_the_reference_formulas():
    torch.manual_seed(0)
    n, c = 12, 5
    rows = torch.arange(100, 100 + n)  # a trainer's table rows, not starting at 0
    plugin = ELR(lam=3.0, beta=0.7)
    plugin.begin_round(RoundContext("central", 1, None, rows, 200), nn.Identity(), None)
    t_ref = torch.zeros(n, c)
    for step, batch in enumerate([torch.tensor([0, 3, 5]), torch.tensor([3, 7, 0, 11])]):
        logits = torch.randn(len(batch), c, requires_grad=True)
        labels = torch.randint(0, c, (len(batch),))
        ctx = BatchContext(RoundContext("central", 1, None, rows, 200), 0, step, rows[batch])
        term = plugin.extra_loss(ctx, nn.Identity(), logits, labels)
        ours = F.cross_entropy(logits, labels) + term.mean()
        t_new, ref = _reference_step(t_ref[batch], logits, labels, 3.0, 0.7)
        t_ref[batch] = t_new
        assert term.shape == (len(batch),)
        assert torch.allclose(plugin.targets, t_ref, atol=1e-7)
        assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
        g_ours = torch.autograd.grad(ours, logits)[0]
        g_ref = torch.autograd.grad(ref, logits)[0]
        assert torch.allclose(g_ours, g_ref, atol=1e-6)
    # untouched rows keep zero targets; visited twice: row sums 1 - beta^2
    sums = plugin.targets.sum(1)
    assert torch.allclose(sums[[0, 3]], torch.full((2,), 1 - 0.7**2))
    assert torch.allclose(sums[[5, 7, 11]], torch.full((3,), 0.3))
    assert sums[[1, 2, 4]].abs().max() == 0


def test_elr_in_the_loop_trains_like_the_reference_loss(tmp_path):
    cfg = config.load(REPO / "configs" / "default.yaml", [*small_overrides(tmp_path), *ELR_ON])
    table = cached_table(cfg)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(table.x.shape[-1], 16), nn.ReLU(), nn.Linear(16, table.num_classes)
    )
    twin = copy.deepcopy(model)
    x, y, rows = table.x[:200], table.y_obs[:200], table.ids[:200]
    order = keyed_order(0, 1, rows, len(table))
    (plugin,) = build_plugins(cfg, "central")
    ctx = RoundContext("central", 1, None, rows, len(table))
    train_epochs(model, x, y, cfg.train, order, rows=rows, plugins=[plugin], context=ctx)
    # the same steps by hand with the reference loss
    opt = make_optimizer(twin, cfg.train)
    t = torch.zeros(len(rows), table.num_classes)
    perm = order(0)
    for start in range(0, len(rows), cfg.train.batch_size):
        idx = perm[start : start + cfg.train.batch_size]
        t_new, loss = _reference_step(t[idx], twin(x[idx]), y[idx], 3.0, 0.7)
        t[idx] = t_new
        opt.zero_grad()
        loss.backward()
        opt.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(plugin.targets, t, atol=1e-6)


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_client_targets_persist_across_rounds_and_are_never_sent(tmp_path, backend, monkeypatch):
    cfg = config.load(
        REPO / "configs" / "default.yaml",
        [
            *small_overrides(tmp_path),
            *ELR_ON,
            "federation.fraction_train=0.5",
            "analysis.gradients.enabled=false",
            f"federation.backend={backend}",
            "federation.client_resources.num_cpus=2",
        ],
    )
    sent: list[tuple[set[str], set[str]]] = []
    if backend == "local":  # the local backend runs the ClientApp here: watch its replies
        real = client_app.Message

        def spy(content, *args, **kwargs):
            if "arrays" in content:
                sent.append((set(content["arrays"].keys()), set(content["metrics"].keys())))
            return real(content, *args, **kwargs)

        monkeypatch.setattr(client_app, "Message", spy)
    job, _, clients = federated_job(cfg)
    job = dataclasses.replace(job, state_dir=str(tmp_path / "client_state"))
    run_federated(job)
    table = cached_table(cfg)
    beta, epochs = 0.7, cfg.train.local_epochs
    trained = {}
    for c in clients:
        trained[c["client"]] = max(trained.get(c["client"], 0), c["rounds_trained"])
    assert max(trained.values()) >= 2  # some client trained in two (not adjacent) rounds
    for pid, rounds in trained.items():
        state = load_state(job.state_dir, pid, cfg.train.rounds + 1)
        elr = state.plugins["elr"]
        assert torch.equal(torch.as_tensor(elr["rows"]), table.client_rows(pid))
        # every row was visited once per epoch of every round this client trained: each
        # target's sum is 1 - beta^visits (targets start at 0 and average distributions)
        sums = torch.as_tensor(elr["targets"]).sum(1)
        expected = 1 - beta ** (rounds * epochs)
        assert torch.allclose(sums, torch.full_like(sums, expected), atol=1e-5), (pid, rounds)
    if backend == "local":
        model_keys = set(init_model(cfg, table).state_dict())
        assert len(sent) == sum(1 for _ in clients)
        for arrays, metrics in sent:
            assert arrays == model_keys  # the model's weights, nothing else
            assert {k for k in metrics if k.startswith("elr/")} == {"elr/term"}


def test_elr_with_dp_sgd_spends_no_extra_privacy(tmp_path):
    from fedmem.simulate import main

    base = [
        *small_overrides(tmp_path),
        "federation.enabled=false",
        "privacy.record_level=true",
        "privacy.noise_multiplier=1.0",
        "analysis.gradients.enabled=false",
    ]
    eps = {}
    for name, extra in (("ce", []), ("elr", ELR_ON)):
        out = tmp_path / name
        assert main([*base, *extra, f"output.dir={out}"]) == 0
        (run_dir,) = out.iterdir()
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        eps[name] = rows[-1]["epsilon"]
        if name == "elr":
            assert all(math.isfinite(r["elr/term"]) for r in rows[1:])
    assert eps["elr"] == eps["ce"] and 0 < eps["ce"] < 50
