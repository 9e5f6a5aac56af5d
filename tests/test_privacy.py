"""Record-level DP-SGD (fedmem/privacy/dp/ through train_epochs): exact math, noise,
Poisson sampling, leaving the model as found, accounting, validation. Real Opacus throughout."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord
from opacus.accountants import PRVAccountant, RDPAccountant

from fedmem.config import ExperimentConfig, ModelConfig, PrivacyConfig, TrainConfig
from fedmem.errors import ConfigError
from fedmem.methods import Plugin
from fedmem.methods.proximal import Proximal
from fedmem.models import build_model
from fedmem.privacy.dp import (
    AccountantHistory,
    DPSession,
    check_delta,
    check_model,
    default_delta,
    dp_ready_model,
    resolve_grad_sample_mode,
    resolve_noise_multiplier,
    validate_record_level,
)
from fedmem.train import keyed_order, poisson_batch, train_epochs

MODES = ("hooks", "functorch", "ew", "ghost")


pytestmark = pytest.mark.usefixtures("one_thread")


# (name, input shape, ModelConfig): small versions of every registry model; resnet9 goes
# through dp_ready_model (BatchNorm -> GroupNorm).
MODELS = {
    "mlp": ((20,), ModelConfig(name="mlp", hidden=16, depth=2)),
    "cnn1d": ((20,), ModelConfig(name="cnn1d", channels=4)),
    "cnn": ((1, 8, 8), ModelConfig(name="cnn", channels=3)),
    "resnet9": ((3, 16, 16), ModelConfig(name="resnet9", channels=2)),
}


def _model(name: str, seed: int = 0) -> torch.nn.Module:
    shape, mc = MODELS[name]
    torch.manual_seed(seed)
    return dp_ready_model(build_model(mc, shape, 4))


def _data(name: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *MODELS[name][0], generator=g), torch.randint(0, 4, (n,), generator=g)


def _session(
    n: int,
    batch_size: int,
    *,
    noise: float = 0.0,
    clip: float = 1.0,
    mode: str = "auto",
    seed: int = 0,
    round_: int = 1,
    stream: int | str = 0,
    table_size: int | None = None,
) -> DPSession:
    privacy = PrivacyConfig(
        record_level=True, noise_multiplier=noise, max_grad_norm=clip, grad_sample_mode=mode
    )
    return DPSession.create(
        privacy,
        TrainConfig(batch_size=batch_size),
        n_local=n,
        seed=seed,
        round_=round_,
        stream=stream,
        table_size=table_size,
    )


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _order(n: int, round_: int = 1):
    return keyed_order(0, round_, torch.arange(n), n)


def _brute_force_step(model, x, y, clip: float, denom: float) -> torch.Tensor:
    """sum_i clip(grad loss_i) / denom, one example at a time (the definition of DP-SGD)."""
    total = torch.zeros_like(_flat(model))
    for i in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        total += g * min(1.0, clip / (float(g.norm()) + 1e-6))
    return total / denom


# ---------------------------------------------------------------------------------------------
# exact math: every mode is DP-SGD
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("mode", MODES)
def test_mode_matches_brute_force_clipping_and_plain_sgd(name, mode):
    """batch_size = n makes q = 1: one step over the whole batch, expected batch size n.

    float64, so that the applied step (a difference of weights) is exact to ~1e-12."""
    n = 6
    x, y = _data(name, n)
    x, base = x.double(), _model(name).double()
    cfg = TrainConfig(batch_size=n, lr=1.0, momentum=0.0)
    for clip in (0.05, 1e6):
        model = copy.deepcopy(base)
        res = train_epochs(model, x, y, cfg, _order(n), dp=_session(n, n, clip=clip, mode=mode))
        assert res.steps == 1 and res.examples == n
        step = _flat(base) - _flat(model)  # lr 1: the applied gradient
        ref = _brute_force_step(copy.deepcopy(base), x, y, clip, n)
        assert torch.allclose(step, ref, rtol=1e-7, atol=1e-9 * float(ref.abs().max())), (
            f"{mode}/{name} clip={clip}: max err {float((step - ref).abs().max())}"
        )
        if clip == 1e6:  # nothing clipped: plain SGD on the same batch
            plain = copy.deepcopy(base)
            train_epochs(plain, x, y, cfg, _order(n))
            assert torch.allclose(_flat(model), _flat(plain), rtol=1e-9, atol=1e-12)
        else:
            assert not torch.allclose(step, _brute_force_step(copy.deepcopy(base), x, y, 1e6, n))


def test_auto_mode_per_model():
    assert resolve_grad_sample_mode("auto", _model("mlp"), 256) == "ghost"
    default = {
        name: dp_ready_model(build_model(ModelConfig(name=name), shape, 10))
        for name, shape in (("mlp", (40,)), ("cnn1d", (40,)), ("cnn", (1, 28, 28)))
    }
    assert resolve_grad_sample_mode("auto", default["mlp"], 256) == "ghost"
    assert resolve_grad_sample_mode("auto", default["cnn1d"], 256) == "ew"
    assert resolve_grad_sample_mode("auto", default["cnn"], 64) == "ghost"
    assert resolve_grad_sample_mode("hooks", default["mlp"], 64) == "hooks"
    with pytest.raises(ConfigError, match="privacy.grad_sample_mode"):
        resolve_grad_sample_mode("vmap")
    x, y = _data("cnn1d", 8)
    s = _session(8, 4, noise=1.0)
    train_epochs(_model("cnn1d"), x, y, TrainConfig(batch_size=4), _order(8), dp=s)
    assert s.mode_used == "ew" and s.steps == 2


# ---------------------------------------------------------------------------------------------
# noise
# ---------------------------------------------------------------------------------------------
def test_noise_is_added_and_seeded():
    n = 32
    x, y = _data("mlp", n)
    cfg = TrainConfig(batch_size=8, lr=0.1)

    def run(noise: float, seed: int = 0, stream: int | str = 0, mode: str = "ghost"):
        m = _model("mlp")
        s = _session(n, 8, noise=noise, seed=seed, stream=stream, mode=mode)
        train_epochs(m, x, y, cfg, _order(n), dp=s)
        return _flat(m)

    quiet, noisy = run(0.0), run(1.0)
    assert not torch.allclose(quiet, noisy, atol=1e-3)
    assert torch.equal(noisy, run(1.0))  # same seed, same weights
    assert not torch.allclose(noisy, run(1.0, stream=1))  # another trainer's noise
    assert not torch.allclose(noisy, run(1.0, seed=1))
    # every mode draws the same noise from the same stream
    assert torch.allclose(noisy, run(1.0, mode="hooks"), atol=1e-5)
    # calibrated size: one step over the whole batch (q = 1, expected size n), lr 1: the
    # weights move by the clipped mean gradient plus N(0, (sigma C / n)^2) per coordinate
    one = TrainConfig(batch_size=n, lr=1.0, momentum=0.0)
    moved = {}
    for sigma in (0.0, 2.0):
        m = _model("mlp")
        train_epochs(m, x, y, one, _order(n), dp=_session(n, n, noise=sigma, clip=1.0))
        moved[sigma] = _flat(m)
    std = float((moved[2.0] - moved[0.0]).std())
    assert std == pytest.approx(2.0 * 1.0 / n, rel=0.1)


def test_empty_batches_are_noise_steps_in_every_mode(monkeypatch):
    """n = 3, batch 1: q = 1/3, P(empty) = 8/27; several models cannot even run on 0 rows."""
    n = 3
    for name in ("mlp", "cnn1d", "cnn"):
        x, y = _data(name, n)
        for mode in MODES:
            m = _model(name)
            s = _session(n, 1, noise=1.0, mode=mode)
            res = train_epochs(m, x, y, TrainConfig(batch_size=1), _order(n), dp=s, epochs=6)
            assert res.steps == 18 == s.steps
            assert res.examples < 18  # some batches were empty (seeded, so always true)
            assert all(torch.isfinite(p).all() for p in m.parameters())
    # an empty batch is a step that still moves the weights (noise only)
    import fedmem.train

    monkeypatch.setattr(
        fedmem.train, "poisson_batch", lambda *a, **k: torch.zeros(0, dtype=torch.long)
    )
    for mode in MODES:
        m = _model("cnn1d")
        before = _flat(m)
        s = _session(5, 1, noise=1.0, mode=mode)
        res = train_epochs(m, *_data("cnn1d", 5), TrainConfig(batch_size=1), _order(5), dp=s)
        assert res.examples == 0 and res.steps == 5 == s.steps
        assert not torch.allclose(before, _flat(m))


# ---------------------------------------------------------------------------------------------
# Poisson sampling
# ---------------------------------------------------------------------------------------------
def test_poisson_batches_have_the_right_law():
    n, q, steps = 40, 1 / 20, 3000
    rows = torch.arange(n)
    sizes = torch.tensor(
        [len(poisson_batch(7, 1, 0, t, rows, n, q)) for t in range(steps)], dtype=torch.float
    )
    assert float(sizes.mean()) == pytest.approx(q * n, abs=0.08)  # Binomial(40, 1/20): mean 2
    assert float(sizes.var()) == pytest.approx(n * q * (1 - q), rel=0.1)
    assert float((sizes == 0).float().mean()) == pytest.approx((1 - q) ** n, abs=0.03)
    # inclusion is per example and independent of position
    counts = torch.zeros(n)
    for t in range(steps):
        counts[poisson_batch(7, 1, 0, t, rows, n, q)] += 1
    assert float(counts.min()) > 0.6 * steps * q and float(counts.max()) < 1.4 * steps * q


def test_sampling_follows_opacus_conventions():
    s = _session(1000, 64)
    assert s.sample_rate == 1 / 16  # 1 / len(DataLoader(batch_size=64)) = 1 / ceil(1000/64)
    assert s.steps_per_epoch == 16 and s.expected_batch_size == pytest.approx(62.5)
    small = _session(30, 64)  # fewer examples than a batch: q = 1, every step sees all
    assert small.sample_rate == 1.0 and small.steps_per_epoch == 1
    x, y = _data("mlp", 100)
    res = train_epochs(
        _model("mlp"), x, y, TrainConfig(batch_size=32), _order(100), dp=_session(100, 32), epochs=2
    )
    assert res.steps == 8  # 2 epochs x ceil(100 / 32)


def test_one_client_with_all_rows_samples_like_the_central_run():
    table, q = 50, 0.2
    central = torch.arange(table)
    client = torch.tensor([3, 17, 4, 40, 22, 9])
    for step in range(20):
        picked = set(central[poisson_batch(0, 2, 1, step, central, table, q)].tolist())
        mine = set(client[poisson_batch(0, 2, 1, step, client, table, q)].tolist())
        assert mine == picked & set(client.tolist())
    # and a client holding every row (in another order) trains like the central run
    x, y = _data("mlp", table)
    perm = torch.randperm(table, generator=torch.Generator().manual_seed(3))
    cfg = TrainConfig(batch_size=10, lr=0.1)
    a, b = _model("mlp"), _model("mlp")
    train_epochs(
        a,
        x,
        y,
        cfg,
        _order(table),
        rows=central,
        dp=_session(table, 10, noise=0.5, stream="same", table_size=table),
    )
    train_epochs(
        b,
        x[perm],
        y[perm],
        cfg,
        _order(table),
        rows=perm,
        dp=_session(table, 10, noise=0.5, stream="same", table_size=table),
    )
    assert torch.allclose(_flat(a), _flat(b), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the model and optimizer are left as found
# ---------------------------------------------------------------------------------------------
def _hook_counts(model: torch.nn.Module) -> list[tuple[int, ...]]:
    return [
        (
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            len(m._backward_hooks),
            len(m._backward_pre_hooks),
            bool(m._is_full_backward_hook),
            len(m.__dict__),
        )
        for m in model.modules()
    ]


@pytest.mark.parametrize("mode", MODES)
def test_model_is_unwrapped_afterwards_and_optimizer_state_persists(mode):
    n = 24
    x, y = _data("cnn", n)
    model = _model("cnn")
    keys, hooks = list(model.state_dict()), _hook_counts(model)
    params = [id(p) for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cfg = TrainConfig(batch_size=8)
    for round_ in (1, 2):  # twice: a second attach must find no leftovers
        train_epochs(
            model,
            x,
            y,
            cfg,
            _order(n, round_),
            optimizer=opt,
            dp=_session(n, 8, noise=1.0, mode=mode, round_=round_),
        )
        assert list(model.state_dict()) == keys
        assert _hook_counts(model) == hooks
        assert [id(p) for p in model.parameters()] == params
        assert type(opt) is torch.optim.SGD
        for p in model.parameters():
            assert not any(
                hasattr(p, a)
                for a in (
                    "grad_sample",
                    "summed_grad",
                    "_forward_counter",
                    "_norm_sample",
                    "_current_grad_sample",
                )
            )
            assert "momentum_buffer" in opt.state[p]  # the caller's optimizer was stepped
    assert not hasattr(model, "autograd_grad_sample_hooks")
    res = train_epochs(model, x, y, cfg, _order(n, 3), optimizer=opt)  # non-DP still works
    assert math.isfinite(res.loss) and res.steps == 3


def test_proximal_term_and_hooks_under_dp():
    n = 32
    x, y = _data("mlp", n)
    start = _model("mlp")
    anchor = [p.detach().clone() for p in start.parameters()]
    dist = {}
    for mu in (0.0, 10.0):
        m = copy.deepcopy(start)
        cfg = TrainConfig(lr=0.1, batch_size=8, proximal_mu=mu, local_epochs=3)
        plugins = [Proximal(mu)] if mu else []
        train_epochs(m, x, y, cfg, _order(n), plugins=plugins, dp=_session(n, 8, noise=0.3))
        dist[mu] = float(
            sum(((p.detach() - a) ** 2).sum() for p, a in zip(m.parameters(), anchor, strict=True))
        )
    assert dist[10.0] < 0.5 * dist[0.0]

    class PerExample(Plugin):
        name = "per-example"
        calls = 0

        def extra_loss(self, ctx, model, logits, targets):
            PerExample.calls += 1
            assert len(ctx.rows) == len(targets)
            return 0.1 * logits.pow(2).mean(1)

    class Scalar(Plugin):
        name = "scalar"

        def extra_loss(self, ctx, model, logits, targets):
            return logits.pow(2).mean()

    cfg = TrainConfig(batch_size=8)
    train_epochs(_model("mlp"), x, y, cfg, _order(n), plugins=[PerExample()], dp=_session(n, 8))
    assert PerExample.calls > 0
    with pytest.raises(ValueError, match="per-example"):
        train_epochs(_model("mlp"), x, y, cfg, _order(n), plugins=[Scalar()], dp=_session(n, 8))


def test_dp_training_learns():
    n = 256
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20, 4, generator=g)
    x = torch.randn(n, 20, generator=g)
    y = (x @ w).argmax(1)
    model = _model("mlp")
    cfg = TrainConfig(batch_size=32, lr=0.5, momentum=0.5)
    first = train_epochs(model, x, y, cfg, _order(n), dp=_session(n, 32, noise=0.5))
    for r in range(2, 9):
        last = train_epochs(model, x, y, cfg, _order(n, r), dp=_session(n, 32, noise=0.5, round_=r))
    assert last.loss < 0.6 * first.loss


# ---------------------------------------------------------------------------------------------
# accounting
# ---------------------------------------------------------------------------------------------
def test_history_epsilon_equals_opacus_accountant_and_serializes():
    hist, acc = AccountantHistory(), RDPAccountant()
    plan = [(1.1, 0.05, 40), (1.1, 0.05, 40), (0.9, 0.1, 10), (1.1, 0.05, 5)]
    for sigma, q, steps in plan:
        hist.add(sigma, q, steps)
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    assert hist.entries == acc.history  # same merging of equal consecutive entries
    assert hist.steps == 95
    assert hist.epsilon(1e-5) == acc.get_epsilon(delta=1e-5)
    # round trip through Flower's ConfigRecord (context.state)
    record = ConfigRecord(hist.to_record())
    back = AccountantHistory.from_record(record)
    assert back.entries == hist.entries and back.epsilon(1e-5) == hist.epsilon(1e-5)
    assert AccountantHistory.from_record(ConfigRecord(AccountantHistory().to_record())).steps == 0
    short = AccountantHistory(hist.entries[:2])
    prv = PRVAccountant()
    prv.history = list(short.entries)
    eps_prv = short.epsilon(1e-5, "prv")
    assert eps_prv == prv.get_epsilon(delta=1e-5)
    assert eps_prv < short.epsilon(1e-5, "rdp")  # PRV is tighter


def test_epsilon_composes_over_rounds_and_grows():
    n = 40
    x, y = _data("mlp", n)
    hist = AccountantHistory()
    eps = [hist.epsilon(1e-3)]
    for r in range(1, 4):
        s = _session(n, 8, noise=1.0, round_=r)
        train_epochs(_model("mlp"), x, y, TrainConfig(batch_size=8), _order(n, r), dp=s)
        assert s.entry() == (1.0, 0.2, 5)
        hist.record(s)
        eps.append(hist.epsilon(1e-3))
    assert hist.entries == [(1.0, 0.2, 15)]
    assert eps[0] == 0.0 and all(a < b for a, b in zip(eps, eps[1:], strict=False))
    hist.add(2.0, 0.2, 1)  # a different step still adds privacy loss
    assert hist.epsilon(1e-3) > eps[-1]
    hist.add(0.0, 0.2, 1)
    assert hist.epsilon(1e-3) == math.inf


def test_target_epsilon_resolution_reaches_the_target():
    privacy = PrivacyConfig(record_level=True, target_epsilon=3.0)
    q, steps, delta = 1 / 16, 320, 1e-4
    sigma = resolve_noise_multiplier(privacy, q, steps, delta)
    eps = AccountantHistory([(sigma, q, steps)]).epsilon(delta)
    assert 3.0 - 0.05 < eps <= 3.0
    # the session plans for every round of the run: rounds x epochs x steps/epoch
    train = TrainConfig(batch_size=64, rounds=10, local_epochs=2)
    s = DPSession.create(privacy, train, n_local=1000, seed=0, round_=1, stream=0)
    assert s.delta == default_delta(1000) == 1e-4
    planned = AccountantHistory([(s.noise_multiplier, s.sample_rate, 10 * 2 * 16)])
    assert 2.95 < planned.epsilon(s.delta) <= 3.0
    fixed = PrivacyConfig(record_level=True, noise_multiplier=0.7)
    assert resolve_noise_multiplier(fixed, q, steps, delta) == 0.7


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def test_validation_errors_name_the_key():
    assert check_delta(None, 500) == pytest.approx(2e-4)
    assert check_delta(1e-5, 500) == 1e-5
    with pytest.raises(ConfigError, match=r"^privacy\.delta: .*1/n"):
        check_delta(0.01, 500)
    bn = build_model(ModelConfig(name="resnet9", channels=2), (3, 16, 16), 4)
    with pytest.raises(ConfigError, match=r"^model\.name: resnet9 .*BatchNorm") as err:
        check_model(bn, "resnet9")
    assert "\n" not in str(err.value)
    fixed = dp_ready_model(bn)
    check_model(fixed, "resnet9")
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fixed.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in fixed.modules())
    mlp = build_model(ModelConfig(name="mlp"), (40,), 10)
    assert dp_ready_model(mlp) is mlp
    # the whole check before training
    cfg = ExperimentConfig.model_validate(
        {"privacy": {"record_level": True, "target_epsilon": 1e-4, "delta": 1e-6}}
    )
    with pytest.raises(ConfigError, match=r"^privacy\.target_epsilon: "):
        validate_record_level(cfg, [400, 1000], mlp)
    cfg = ExperimentConfig.model_validate(
        {"privacy": {"record_level": True, "delta": 0.01, "noise_multiplier": 1.0}}
    )
    with pytest.raises(ConfigError, match=r"^privacy\.delta: "):
        validate_record_level(cfg, [400, 50], mlp)
    cfg = ExperimentConfig.model_validate(
        {"model": {"name": "resnet9"}, "privacy": {"record_level": True, "noise_multiplier": 1.0}}
    )
    with pytest.raises(ConfigError, match=r"^model\.name: resnet9"):
        validate_record_level(cfg, [400], bn)
    validate_record_level(cfg, [400], fixed)
