"""The shared training loop: it learns, it is deterministic, its knobs do what they say."""

from __future__ import annotations

import torch

from fedmem.config import ModelConfig, TrainConfig
from fedmem.methods import Plugin
from fedmem.methods.proximal import Proximal, proximal_term
from fedmem.models import build_model
from fedmem.train import keyed_order, train_epochs


def _data(n: int = 512, d: int = 20, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, classes, generator=g)
    x = torch.randn(n, d, generator=g)
    return x, (x @ w).argmax(1)


def _order(n: int, round_: int = 1):
    return keyed_order(0, round_, torch.arange(n), n)


def _model(seed: int = 0, d: int = 20, classes: int = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(name="mlp", hidden=32, depth=1), (d,), classes)


def test_loss_falls():
    x, y = _data()
    model = _model()
    cfg = TrainConfig(lr=0.1, batch_size=32)
    first = train_epochs(model, x, y, cfg, _order(len(y), 1))
    for r in range(2, 6):
        last = train_epochs(model, x, y, cfg, _order(len(y), r))
    assert first.examples == 512 and first.steps == 16
    assert last.loss < 0.5 * first.loss


def test_same_seed_same_weights_other_seed_differs():
    x, y = _data()
    cfg = TrainConfig(lr=0.1, batch_size=32)
    models = [_model(), _model(), _model()]
    for m, s in zip(models, (1, 1, 2), strict=True):
        train_epochs(m, x, y, cfg, _order(len(y), s))
    p = [torch.cat([q.flatten() for q in m.parameters()]) for m in models]
    assert torch.equal(p[0], p[1])
    assert not torch.allclose(p[0], p[2])


def test_epochs_and_partial_batches():
    x, y = _data(n=100)
    res = train_epochs(_model(), x, y, TrainConfig(batch_size=32, local_epochs=3), _order(len(y)))
    assert res.examples == 300 and res.steps == 12  # 4 batches (32, 32, 32, 4) x 3


def test_proximal_term_pulls_towards_anchor():
    x, y = _data()
    start = _model()
    anchor = [p.detach().clone() for p in start.parameters()]
    dist = {}
    for mu in (0.0, 10.0):
        m = _model()
        train_epochs(
            m,
            x,
            y,
            TrainConfig(lr=0.1, batch_size=32, proximal_mu=mu, local_epochs=3),
            _order(len(y)),
            plugins=[Proximal(mu)] if mu else [],  # its anchor: the weights at round start
        )
        dist[mu] = float(proximal_term(m, anchor, 2.0).detach())  # = ||w - w0||^2
    assert dist[10.0] < 0.5 * dist[0.0]


def test_adam_and_weight_decay_run_and_differ():
    x, y = _data()
    out = []
    for cfg in (TrainConfig(optimizer="adam", lr=0.01), TrainConfig(weight_decay=0.1)):
        m = _model()
        train_epochs(m, x, y, cfg, _order(len(y)))
        out.append(torch.cat([q.flatten() for q in m.parameters()]))
    assert not torch.allclose(out[0], out[1])


def test_plugins_see_rows_and_add_loss():
    x, y = _data(n=64)
    seen: list[torch.Tensor] = []
    epochs: list[int] = []

    class Probe(Plugin):
        name = "probe"
        steps = 0
        ended = 0

        def extra_loss(self, ctx, model, logits, targets):
            seen.append(ctx.rows.clone())
            epochs.append(ctx.epoch)
            return 5.0 * logits.pow(2).mean()  # strong penalty: logits shrink

        def after_step(self, ctx, model):
            Probe.steps += 1

        def end_round(self, ctx, model, result):
            Probe.ended += 1

    rows = torch.arange(1000, 1064)
    m = _model()
    train_epochs(
        m,
        x,
        y,
        TrainConfig(batch_size=16, lr=0.05),
        _order(len(y)),
        rows=rows,
        plugins=[Probe()],
        epochs=5,
    )
    assert Probe.steps == 20 and Probe.ended == 1
    assert epochs == [e for e in range(5) for _ in range(4)]
    assert torch.equal(torch.sort(torch.cat(seen[:4])).values, rows)
    plain = _model()
    train_epochs(plain, x, y, TrainConfig(batch_size=16, lr=0.05), _order(len(y)), epochs=5)
    with torch.no_grad():
        assert m(x).abs().mean() < 0.2 * plain(x).abs().mean()
