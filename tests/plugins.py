"""Plug-ins used by the tests (loaded through ``plugins.external=["tests.plugins:..."]``)."""

from __future__ import annotations

from fedmem.methods.base import BatchContext, Plugin, RoundContext


class CallCounter(Plugin):
    """Counts its calls; keeps a running total per trainer (per client) across rounds."""

    name = "counter"

    def __init__(self) -> None:
        self.rounds = 0  # begin_round calls, all rounds so far (state)
        self.steps = 0  # after_step calls, all rounds so far (state)
        self.losses = 0  # extra_loss calls this round
        self.last_round = -1
        self.seen_rows = 0  # batch rows seen this round
        self.client: int | None = None

    @classmethod
    def from_config(cls, cfg, run):
        return cls()

    def state_dict(self):
        return {"rounds": self.rounds, "steps": self.steps, "last_round": self.last_round}

    def load_state_dict(self, state):
        self.rounds = int(state.get("rounds", 0))
        self.steps = int(state.get("steps", 0))
        self.last_round = int(state.get("last_round", -1))

    def begin_round(self, ctx: RoundContext, model, optimizer):
        assert ctx.round > self.last_round, (ctx.round, self.last_round)
        self.rounds += 1
        self.last_round = ctx.round
        self.client = ctx.client
        return model, optimizer

    def extra_loss(self, ctx: BatchContext, model, logits, targets):
        self.losses += 1
        self.seen_rows += len(ctx.rows)
        return None

    def after_step(self, ctx: BatchContext, model):
        self.steps += 1

    def metrics(self):
        return {
            "rounds": self.rounds,
            "steps": self.steps,
            "losses": self.losses,
            "rows": self.seen_rows,
        }


class FailingClient(Plugin):
    """Raises in every federated client, every round (every federated round is lost); the
    central run does not use it."""

    name = "failing"
    fail_rounds: tuple[int, ...] | None = None  # None: every round

    @classmethod
    def from_config(cls, cfg, run):
        return cls() if run == "federated" else None

    def begin_round(self, ctx: RoundContext, model, optimizer):
        if self.fail_rounds is None or ctx.round in self.fail_rounds:
            raise RuntimeError(f"injected client failure in round {ctx.round}")
        return model, optimizer


class FailingRound2(FailingClient):
    """Every federated client fails in round 2 only (that one round is lost)."""

    name = "failing_round2"
    fail_rounds = (2,)


class InterruptFederatedOnce(Plugin):
    """Ctrl-C (KeyboardInterrupt) in the first federated client training after
    ``armed = True``: the run is interrupted after its central run; later rounds train."""

    name = "interrupt_once"
    armed = False

    @classmethod
    def from_config(cls, cfg, run):
        return cls() if run == "federated" else None

    def begin_round(self, ctx: RoundContext, model, optimizer):
        if InterruptFederatedOnce.armed:
            InterruptFederatedOnce.armed = False
            raise KeyboardInterrupt
        return model, optimizer
