"""Batched ensemble training: every model trains exactly as train.py would train it alone."""

from __future__ import annotations

import pytest
import torch

from fedmem.config import ModelConfig, TrainConfig
from fedmem.ensemble import (
    Ensemble,
    ensemble_order,
    member_init_state,
    train_ensemble,
)
from fedmem.models import build_model
from fedmem.seeding import derive_seed
from fedmem.train import keyed_order, train_epochs

D, C = 20, 4
MLP = ModelConfig(name="mlp", hidden=32, depth=2)
CNN1D = ModelConfig(name="cnn1d", channels=8)
SGD = TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=32)
ADAM = TrainConfig(optimizer="adam", lr=3e-3, weight_decay=1e-3, batch_size=32)
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 300, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, C, generator=g)
    x = torch.randn(n, D, generator=g)
    return x, (x @ w).argmax(1)


def _init(cfg: ModelConfig, seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model(cfg, (D,), C).state_dict()


def _train_alone(
    cfg: ModelConfig, tcfg: TrainConfig, init, x, y, mask, *, seed: int, k: int, epochs: int
):
    """Model k trained by train.py on its rows, in the ensemble's batch order."""
    model = build_model(cfg, (D,), C)
    model.load_state_dict(init)
    rows = torch.nonzero(mask).flatten()
    res = train_epochs(
        model,
        x[rows],
        y[rows],
        tcfg,
        lambda e: ensemble_order(seed, k, e, rows, len(y)),
        epochs=epochs,
    )
    return model, res


def _max_diff(ens: Ensemble, k: int, model: torch.nn.Module) -> float:
    sd = ens.state_dict(k)
    return max(float((sd[n] - v).abs().max()) for n, v in model.state_dict().items())


@pytest.mark.parametrize("tcfg", [SGD, ADAM], ids=["sgd", "adam"])
def test_single_model_matches_train_epochs_mlp(tcfg):
    x, y = _data()  # 300 rows, batch 32: the last batch of each epoch has 12 rows
    init = _init(MLP)
    masks = torch.ones(1, len(y), dtype=torch.bool)
    ens = train_ensemble(MLP, tcfg, (D,), C, x, y, masks, epochs=2, seed=3, init_states=[init])
    model, res = _train_alone(MLP, tcfg, init, x, y, masks[0], seed=3, k=0, epochs=2)
    assert _max_diff(ens, 0, model) < TOL
    assert _max_diff(ens, 0, build_model(MLP, (D,), C)) > 1e-3  # it did train
    assert ens.train_loss.shape == (1, 2)
    assert float(ens.train_loss.mean()) == pytest.approx(res.loss, rel=1e-5)


@pytest.mark.parametrize("tcfg", [SGD, ADAM], ids=["sgd", "adam"])
def test_single_model_matches_train_epochs_cnn1d_vmap(tcfg):
    x, y = _data(n=200)
    init = _init(CNN1D)
    masks = torch.ones(1, len(y), dtype=torch.bool)
    ens = train_ensemble(CNN1D, tcfg, (D,), C, x, y, masks, epochs=2, seed=5, init_states=[init])
    model, _ = _train_alone(CNN1D, tcfg, init, x, y, masks[0], seed=5, k=0, epochs=2)
    assert _max_diff(ens, 0, model) < TOL
    assert torch.allclose(ens.logits(x)[0], model(x), atol=1e-5)


@pytest.mark.parametrize("tcfg", [SGD, ADAM], ids=["sgd", "adam"])
@pytest.mark.parametrize("backend", ["bmm", "vmap"])
def test_each_model_equals_training_it_alone_with_uneven_subsets(tcfg, backend):
    x, y = _data()
    g = torch.Generator().manual_seed(7)
    sizes = [100, 170, 300, 33]  # uneven: 4, 6, 10 and 2 steps per epoch
    masks = torch.zeros(len(sizes), len(y), dtype=torch.bool)
    for k, s in enumerate(sizes):
        masks[k, torch.randperm(len(y), generator=g)[:s]] = True
    ens = train_ensemble(MLP, tcfg, (D,), C, x, y, masks, epochs=3, seed=11, backend=backend)
    assert len(ens) == len(sizes)
    for k in range(len(sizes)):
        init = member_init_state(MLP, (D,), C, 11, k)
        model, res = _train_alone(MLP, tcfg, init, x, y, masks[k], seed=11, k=k, epochs=3)
        assert _max_diff(ens, k, model) < TOL, k
        assert float(ens.train_loss[k].mean()) == pytest.approx(res.loss, rel=1e-4)


def test_chunks_and_backends_agree_and_ensemble_of_one_is_a_member():
    x, y = _data()
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(5, len(y), generator=g) < 0.6
    kw = dict(epochs=2, seed=2)
    whole = train_ensemble(MLP, SGD, (D,), C, x, y, masks, **kw)
    chunked = train_ensemble(MLP, SGD, (D,), C, x, y, masks, chunk=2, **kw)
    vmapped = train_ensemble(MLP, SGD, (D,), C, x, y, masks, backend="vmap", **kw)
    for name, p in whole.params.items():
        assert torch.allclose(p, chunked.params[name], atol=TOL)  # models are independent
        assert torch.allclose(p, vmapped.params[name], atol=TOL)
    # member 3 trained alone (first=3: member 3's init and batch order) is the same model
    alone = train_ensemble(MLP, SGD, (D,), C, x, y, masks[3:4], first=3, **kw)
    sd = whole.state_dict(3)
    assert all(torch.allclose(sd[n], v[0], atol=TOL) for n, v in alone.params.items())


@pytest.mark.parametrize("cfg", [MLP, CNN1D], ids=["mlp-bmm", "cnn1d-vmap"])
def test_parallel_workers_give_the_same_models(cfg):
    x, y = _data(n=200)
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(5, len(y), generator=g) < 0.5
    one = train_ensemble(cfg, ADAM, (D,), C, x, y, masks, epochs=2, seed=4, workers=1)
    seen: list[int] = []
    three = train_ensemble(
        cfg, ADAM, (D,), C, x, y, masks, epochs=2, seed=4, workers=3, progress=seen.append
    )
    for name, p in one.params.items():
        assert torch.allclose(p, three.params[name], atol=TOL)
    assert torch.allclose(one.train_loss, three.train_loss)
    assert sorted(seen) == seen and seen[-1] == 10  # 5 models x 2 epochs
    assert torch.get_num_threads() == 1  # restored (the fixture set 1)


def test_member_init_seeding():
    state = member_init_state(MLP, (D,), C, 4, 2)
    torch.manual_seed(derive_seed(4, "ensemble-init", 2))
    ref = build_model(MLP, (D,), C).state_dict()
    assert all(torch.equal(state[n], v) for n, v in ref.items())
    other = member_init_state(MLP, (D,), C, 4, 3)
    assert not torch.equal(state["net.1.weight"], other["net.1.weight"])
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    member_init_state(MLP, (D,), C, 4, 2)
    assert torch.equal(torch.rand(3), before)  # the global RNG is untouched


def test_ensemble_order_is_keyed_like_train_py():
    n = 50
    rows = torch.tensor([3, 7, 8, 20, 41, 49])
    perm = ensemble_order(9, 1, 0, rows, n)
    assert sorted(perm.tolist()) == list(range(len(rows)))
    full = ensemble_order(9, 1, 0, torch.arange(n), n)
    # the subset visits its rows in the order the full table's keys give them
    visit_full = [r for r in full.tolist() if r in set(rows.tolist())]
    assert rows[perm].tolist() == visit_full
    assert not torch.equal(perm, ensemble_order(9, 2, 0, rows, n))  # per model
    assert not torch.equal(perm, ensemble_order(9, 1, 1, rows, n))  # per epoch
    assert not torch.equal(full, keyed_order(9, 1, torch.arange(n), n)(0))  # own stream


def test_logits_and_model_agree():
    x, y = _data()
    masks = torch.ones(3, len(y), dtype=torch.bool)
    ens = train_ensemble(MLP, SGD, (D,), C, x, y, masks, epochs=1, seed=0)
    logits = ens.logits(x, batch_size=64)
    assert logits.shape == (3, len(y), C)
    assert not logits.requires_grad
    for k in range(3):
        with torch.no_grad():
            assert torch.allclose(logits[k], ens.model(k)(x), atol=1e-5)


def test_progress_and_errors():
    x, y = _data(n=64)
    masks = torch.ones(3, len(y), dtype=torch.bool)
    seen: list[int] = []
    train_ensemble(MLP, SGD, (D,), C, x, y, masks, epochs=2, seed=0, chunk=2, progress=seen.append)
    assert seen == [2, 4, 5, 6]  # (model, epoch) pairs done: chunk {0, 1} then {2}
    with pytest.raises(ValueError, match="BatchNorm"):
        train_ensemble(
            ModelConfig(name="resnet9", channels=4),
            SGD,
            (3, 8, 8),
            C,
            torch.randn(8, 3, 8, 8),
            torch.zeros(8, dtype=torch.long),
            torch.ones(2, 8, dtype=torch.bool),
            epochs=1,
            seed=0,
        )
    with pytest.raises(ValueError, match="masks"):
        train_ensemble(MLP, SGD, (D,), C, x, y, masks[:, :10], epochs=1, seed=0)
    with pytest.raises(ValueError, match="bmm"):
        train_ensemble(CNN1D, SGD, (D,), C, x, y, masks, epochs=1, seed=0, backend="bmm")
