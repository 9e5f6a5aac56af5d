"""The central run: the federated experiment's data pooled on one machine.

Central round ``r`` makes the same example visits as federated round ``r`` at full
participation (``train.local_epochs`` passes over every training row), so both runs' curves
share one x-axis. Both runs start from :func:`fedmem.models.init_model`'s weights.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fedmem.config import ExperimentConfig
from fedmem.data.table import ExampleTable
from fedmem.models.factory import init_model, resolve_device
from fedmem.observer import Observer
from fedmem.privacy.epsilon import privacy_fields
from fedmem.train import keyed_order, make_optimizer, train_epochs


def run_central(
    cfg: ExperimentConfig,
    table: ExampleTable,
    observer: Observer,
    on_round: Callable[[int, dict], None] | None = None,
) -> nn.Module:
    """Train on all rows of ``table`` for ``cfg.train.rounds`` rounds; observe every round.

    The optimizer (and its momentum) persists across rounds, as in ordinary central training.
    Returns the final model.
    """
    device = resolve_device(cfg.train.device)
    model = init_model(cfg, table).to(device)
    optimizer = make_optimizer(model, cfg.train)
    x, y = table.x.to(device), table.y_obs.to(device)
    rows = table.ids
    history = dp_delta = None
    if cfg.privacy.record_level:
        from fedmem.privacy.dp import AccountantHistory, DPSession

        history = AccountantHistory()
    observer.start()
    row = observer(
        0,
        model,
        round_loss=None,
        examples=0,
        **privacy_fields(history, None, cfg.privacy.accountant),
    )
    if on_round:
        on_round(0, row)
    examples = 0
    for r in range(1, cfg.train.rounds + 1):
        order = keyed_order(cfg.seed, r, rows, len(table))
        dp = None
        if history is not None:
            dp = DPSession.create(
                cfg.privacy,
                cfg.train,
                n_local=len(table),
                seed=cfg.seed,
                round_=r,
                stream="central",
                table_size=len(table),
            )
            dp_delta = dp.delta
        res = train_epochs(model, x, y, cfg.train, order, optimizer=optimizer, rows=rows, dp=dp)
        if dp is not None:
            history.record(dp)
        examples += res.examples
        privacy = privacy_fields(history, dp_delta, cfg.privacy.accountant)
        row = observer(r, model, round_loss=res.loss, examples=examples, **privacy)
        if on_round:
            on_round(r, row)
    return model
