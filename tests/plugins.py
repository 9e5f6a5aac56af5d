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
