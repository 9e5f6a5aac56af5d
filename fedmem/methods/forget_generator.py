"""A per-client dummy-gradient generator for unlearning ("learn to forget"), as a plug-in.

Liu, Ma, Liu & Ma 2020, "Learn to Forget: User-Level Memorization Elimination in Federated
Learning" (arXiv:2003.10933; "Forsaken"). Every client holds a trainable generator; once
trained, it produces *dummy gradients* that "stimulate the neurons" of the model so that the
model no longer remembers the client's data, and the client can submit the result as an
ordinary update. The paper publishes no code and leaves most of the design open; this file
builds it from the paper's description. Every choice below marked (ours) is ours.

The generator ``G_phi`` (:class:`DummyGradientGenerator`) maps what the model outputs on one of
the client's examples, its softmax ``p(x)`` next to the one-hot label ``y``, to a dummy
gradient for the model's last ``layers`` parametrised layers (ours: the classifier layer by
default; a generator for every weight would be larger than the model). The dummy gradient of a
set ``F`` of examples is the mean of ``G_phi`` over them, applied as one SGD step of size
``step_size``:

    theta'(phi) = theta - step_size * mean_{x in F} G_phi(p_theta(x), y)

``G_phi`` is trained (Adam, ``lr``) to make the model after the step treat the client's
examples like data it never saw, with a bound on the damage to other data (:func:`objective`):

- forgetting (ours, the paper's target made concrete): the distribution of the LiRA
  logit-confidence ``phi = log p_y / (1 - p_y)`` (Carlini et al. 2022) of ``F`` under
  ``theta'`` is matched to its distribution on ``reference`` non-member examples under
  ``theta``, by the 1-D Wasserstein-2 distance between the empirical distributions (sorted
  values against the reference's quantiles). Matching a distribution rather than pushing the
  confidence down keeps the generator from "forgetting too much", which is as detectable as not
  forgetting (Halimi et al. 2022);
- damage bound (ours): the mean KL divergence between the model's predictions on the reference
  examples before and after the step, penalised by ``damage_weight`` once it exceeds
  ``damage_bound`` (a hinge: below the bound the reference predictions may move freely).

The reference examples are ``reference`` rows of the test split (a fixed seeded choice, the same
for every client: public data of the task that no client contributed; ours, the paper assumes
such non-member data at the user).

During federated training (this plug-in, ``plugins.forget_generator.enabled``) each sampled
client trains its generator for ``steps_per_round`` steps against the global model it just
received, on its own examples, before its ordinary local training (which the generator never
touches: the run's models are the same with or without it). The generator's weights are client
state (Flower ``context.state`` and the client's own state file): never sent to the server, kept
after the run so a client can ask to be forgotten later, and deleted when it is
(:func:`fedmem.unlearning.run.forget_private_state`). At the request,
:mod:`fedmem.unlearning.generator` continues training the forgetting client's generator against
the final global model and submits the step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedmem.methods.base import Plugin, RoundContext
from fedmem.privacy.audit.attacks import logit_confidence

if TYPE_CHECKING:
    from fedmem.config import ExperimentConfig
    from fedmem.data.table import ExampleTable


class DummyGradientGenerator(nn.Module):
    """``G_phi``: (softmax, one-hot label) -> a flat dummy gradient of ``out_dim`` values."""

    def __init__(self, num_classes: int, out_dim: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * num_classes, hidden), nn.ReLU(), nn.Linear(hidden, out_dim)
        )
        nn.init.zeros_(self.net[2].weight)  # ours: start from "no change"
        nn.init.zeros_(self.net[2].bias)

    def forward(self, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One dummy gradient per example, (n, out_dim)."""
        return self.net(self._inputs(probs, labels))

    def mean_gradient(self, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The examples' mean dummy gradient (out_dim,): the output layer is linear, so the
        mean of the hidden units goes through it once (equal to ``forward(...).mean(0)``)."""
        hidden = self.net[1](self.net[0](self._inputs(probs, labels))).mean(0)
        return self.net[2](hidden)

    @staticmethod
    def _inputs(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.cat([probs, F.one_hot(labels, probs.shape[1]).to(probs.dtype)], 1)


def target_names(model: nn.Module, layers: int) -> list[str]:
    """Parameter names of the model's last ``layers`` modules that own parameters."""
    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    if not 1 <= layers <= len(owners):
        raise ValueError(f"forget_generator.layers: {layers} not in 1..{len(owners)}")
    chosen = {id(m) for m in owners[-layers:]}
    names = []
    for mod_name, mod in model.named_modules():
        if id(mod) in chosen:
            names += [
                f"{mod_name}.{n}" if mod_name else n for n, _ in mod.named_parameters(recurse=False)
            ]
    return names


def stepped_params(
    model: nn.Module, names: list[str], flat_grad: torch.Tensor, step_size: float
) -> dict[str, torch.Tensor]:
    """Every parameter, detached, with ``theta - step_size * g`` for the target ones (``g``
    flat, in ``names`` order): only the generator receives gradients."""
    out = {n: p.detach() for n, p in model.named_parameters()}
    at = 0
    for n in names:
        p = out[n]
        out[n] = p - step_size * flat_grad[at : at + p.numel()].view_as(p)
        at += p.numel()
    return out


def wasserstein2(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Squared 1-D Wasserstein-2 distance between the empirical distributions of ``values``
    (differentiable) and ``reference``: sorted values against the reference's quantiles at the
    same levels."""
    v = torch.sort(values).values
    levels = (torch.arange(len(v), dtype=reference.dtype, device=reference.device) + 0.5) / len(v)
    q = torch.quantile(reference, levels)
    return ((v - q.to(v.dtype)) ** 2).mean()


def frozen_tail(
    model: nn.Module,
    names: list[str],
    inputs: list[torch.Tensor],
    outputs: list[torch.Tensor] | None = None,
) -> tuple[nn.Module, dict[str, str], list[torch.Tensor]] | None:
    """Only the target layers change, so everything before them can be computed once.

    Returns ``(tail, rename, features)``: a module computing the model's output from the
    input of the first target layer (the rest of its ``nn.Sequential``, or the layer alone),
    the target names inside ``tail``, and that input for each of ``inputs``; ``None`` when the
    model's output is not ``tail(features)`` (checked numerically: the general path is used).
    ``outputs``: a list that receives the model's outputs on ``inputs`` (computed anyway).
    """
    first = names[0].rsplit(".", 1)[0]
    module = model.get_submodule(first)
    parent_path, _, idx = first.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    candidates: list[tuple[nn.Module, str, int]] = [(module, first, -1)]
    if isinstance(parent, nn.Sequential) and idx.isdigit():
        candidates.insert(0, (nn.Sequential(*list(parent)[int(idx) :]), parent_path, int(idx)))
    captured: list[torch.Tensor] = []
    hook = module.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            computed = [model(x) for x in inputs]
    finally:
        hook.remove()
    if outputs is not None:
        outputs.extend(computed)
    if len(captured) != len(inputs):
        return None
    for tail, path, start in candidates:
        if path and not all(n.startswith(path + ".") for n in names):
            continue  # a target outside this candidate
        rename = {}
        for n in names:
            local = n[len(path) + 1 :] if path else n
            if start >= 0:  # inside the Sequential: re-index from its first target
                head, _, rest = local.partition(".")
                local = f"{int(head) - start}.{rest}"
            rename[n] = local
        if not set(rename.values()) <= {k for k, _ in tail.named_parameters()}:
            continue
        with torch.no_grad():
            same = all(
                torch.allclose(tail(f), out, atol=1e-5, rtol=1e-4)
                for f, out in zip(captured, computed, strict=True)
            )
        if same:
            return tail, rename, captured
    return None


class Objective:
    """What the generator minimises for one model, one client's data and the reference."""

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        x: torch.Tensor,
        y: torch.Tensor,
        ref_x: torch.Tensor,
        ref_y: torch.Tensor,
        step_size: float,
        damage_bound: float,
        damage_weight: float,
    ):
        self.model, self.names, self.x, self.y = model, names, x, y
        self.step_size, self.bound, self.weight = step_size, damage_bound, damage_weight
        self.ref_x, self.ref_y = ref_x, ref_y
        model.eval()
        outputs: list[torch.Tensor] = []  # one forward pass gives the outputs and the features
        self.tail = frozen_tail(model, names, [x, ref_x], outputs)
        logits, ref_logits = outputs
        self.probs = F.softmax(logits, 1)
        self.ref_logp = F.log_softmax(ref_logits, 1)
        self.ref_phi = logit_confidence(ref_logits, ref_y)

    def _logits(self, new: dict[str, torch.Tensor], which: int) -> torch.Tensor:
        """The model's logits with the stepped parameters on ``x`` (0) or the reference (1)."""
        if self.tail is None:
            return functional_call(self.model, new, ((self.x, self.ref_x)[which],))
        tail, rename, features = self.tail
        params = {n: p.detach() for n, p in tail.named_parameters()}
        params.update({rename[n]: new[n] for n in self.names})
        return functional_call(tail, params, (features[which],))

    def dummy_gradient(self, generator: DummyGradientGenerator) -> torch.Tensor:
        return generator.mean_gradient(self.probs, self.y)

    def __call__(self, generator: DummyGradientGenerator) -> tuple[torch.Tensor, dict[str, float]]:
        new = stepped_params(self.model, self.names, self.dummy_gradient(generator), self.step_size)
        phi = logit_confidence(self._logits(new, 0), self.y)
        forget = wasserstein2(phi, self.ref_phi)
        ref_logp = F.log_softmax(self._logits(new, 1), 1)
        damage = F.kl_div(ref_logp, self.ref_logp, log_target=True, reduction="batchmean")
        loss = forget.float() + self.weight * F.relu(damage - self.bound)
        return loss, {"forget": float(forget.detach()), "damage": float(damage.detach())}


def reference_rows(table: ExampleTable, size: int, seed: int) -> torch.Tensor:
    """The fixed seeded choice of ``size`` test rows every client uses as non-member data."""
    from fedmem.seeding import np_rng

    n = min(size, len(table.y_test))
    rng = np_rng(seed, "forget-generator", "reference")
    return torch.from_numpy(rng.choice(len(table.y_test), n, False))


_TABLES: dict[int, tuple[Any, Any]] = {}


def _table(cfg: ExperimentConfig) -> ExampleTable:
    """The run's table, kept per config object (a client process gets the same config object
    every round: reading the table cache each round cost a third of the plug-in's time)."""
    hit = _TABLES.get(id(cfg))
    if hit is None or hit[0] is not cfg:
        from fedmem.data.table import cached_table

        _TABLES.clear()
        hit = _TABLES[id(cfg)] = (cfg, cached_table(cfg))
    return hit[1]


class ForgetGenerator(Plugin):
    """Trains the client's dummy-gradient generator against each global model it receives."""

    name = "forget_generator"

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.s = cfg.plugins.forget_generator
        self.generator: DummyGradientGenerator | None = None
        self._saved: dict[str, Any] = {}
        self._last: dict[str, float] = {}

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, run: str) -> ForgetGenerator | None:
        return cls(cfg) if cfg.plugins.forget_generator.enabled and run == "federated" else None

    # -- state: the generator, never sent ----------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.generator is None:
            return dict(self._saved)
        return {f"g.{k}": v.detach().cpu() for k, v in self.generator.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._saved = {k: v for k, v in state.items() if k.startswith("g.")}
        self.generator = None

    def build(self, model: nn.Module, num_classes: int) -> DummyGradientGenerator:
        """The generator for ``model``: the saved weights when there are some."""
        if self.generator is None:
            names = target_names(model, self.s.layers)
            params = dict(model.named_parameters())
            out_dim = sum(params[n].numel() for n in names)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed)
                g = DummyGradientGenerator(num_classes, out_dim, self.s.hidden)
            if self._saved:
                g.load_state_dict({k[2:]: torch.as_tensor(v) for k, v in self._saved.items()})
            self.generator = g
        return self.generator.to(next(model.parameters()).device)

    def objective(self, model: nn.Module, table: ExampleTable, rows: torch.Tensor) -> Objective:
        device = next(model.parameters()).device
        ref = reference_rows(table, self.s.reference, self.cfg.seed)
        return Objective(
            model,
            target_names(model, self.s.layers),
            table.x[rows].to(device),
            table.y_obs[rows].to(device),
            table.x_test[ref].to(device),
            table.y_test[ref].to(device),
            self.s.step_size,
            self.s.damage_bound,
            self.s.damage_weight,
        )

    def train(self, objective: Objective, steps: int) -> dict[str, float]:
        """``steps`` Adam steps on the generator; the last step's terms."""
        assert self.generator is not None, "build first"
        opt = torch.optim.Adam(self.generator.parameters(), lr=self.s.lr)
        terms: dict[str, float] = {}
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss, terms = objective(self.generator)
            loss.backward()
            opt.step()
        return terms

    # -- hooks -------------------------------------------------------------------------------
    def begin_round(
        self, ctx: RoundContext, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        table = _table(self.cfg)
        self.build(model, table.num_classes)
        was_training = model.training
        with torch.enable_grad():
            self._last = self.train(self.objective(model, table, ctx.rows), self.s.steps_per_round)
        model.train(was_training)
        return model, optimizer

    def metrics(self) -> dict[str, float]:
        """``forget_generator/forget``: the Wasserstein term of the round's last generator
        step; ``.../damage``: its KL on the reference examples."""
        return dict(self._last)
