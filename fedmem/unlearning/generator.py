"""``generator``: the forgetting client's own dummy-gradient generator ("Learn to Forget", Liu,
Ma, Liu & Ma 2020, arXiv:2003.10933; design and our choices in
:mod:`fedmem.methods.forget_generator`).

The run trained every client's generator along the way (``plugins.forget_generator``; the
generators are the clients' private state, kept in their state files). At the request:

1. the forgetting client loads its generator and trains it ``steps`` more Adam steps against
   the *final* global model, on all its examples and the public reference rows;
2. its dummy gradient ``g`` (the generator's mean output over its examples) becomes its
   update ``-step_size * g`` on the target layers, which it submits in one FedAvg round in
   which the server samples only it (ours: FedAvg of a single reply is that reply, so the
   round is computed directly: ``w_{R+1} = w_R - step_size * g``; the server sees an update
   like any other);
3. optionally ``post_rounds`` ordinary FedAvg rounds without it (as :mod:`.ascent` does;
   default none: the generator's damage bound is meant to make them unnecessary).

Several clients forget one after another, each in its own round against the model the previous
one left (ours). Cost: the request's own time (steps 1-2, and 3); the per-round generator
training during the run is a cost of the run (each client's ``train-s`` includes it) and the
generators' files are the storage kept.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from fedmem.errors import InputError
from fedmem.federation.client_state import client_dir, load_state
from fedmem.methods.forget_generator import ForgetGenerator, stepped_params
from fedmem.models.factory import experiment_model
from fedmem.runs.checkpoints import load
from fedmem.unlearning.base import Request, Unlearned


@dataclass(frozen=True)
class GeneratorSettings:
    steps: int = 300  # generator steps at the request, against the final global model
    post_rounds: int = 0  # FedAvg rounds without the client(s) afterwards


def saved_generator(req: Request, client: int) -> dict:
    """The client's generator weights, from its newest state file."""
    folder = client_dir(req.rd.path / "client_state", client)
    state = load_state(req.rd.path / "client_state", client, req.cfg.train.rounds + 1)
    saved = state.plugins.get(ForgetGenerator.name, {})
    if not saved:
        raise InputError(
            f"--client: client {client} has no trained generator in {folder} (it never trained, "
            "or its state was already deleted when it was forgotten)"
        )
    return saved


def generator(req: Request, console, settings: GeneratorSettings | None = None) -> Unlearned:  # type: ignore[no-untyped-def]
    s = settings or GeneratorSettings()
    cfg, table = req.cfg, req.table
    if not cfg.plugins.forget_generator.enabled:
        raise InputError(
            "plugins.forget_generator.enabled: the generator method needs the generators the "
            "clients trained during the run; rerun the experiment with "
            "plugins.forget_generator.enabled=true"
        )
    if s.steps < 0 or s.post_rounds < 0:
        raise InputError("generator.steps and generator.post_rounds must be >= 0")
    saved = {c: saved_generator(req, c) for c in req.clients}
    t0 = time.perf_counter()
    state = load(req.rd.path / "checkpoints" / "federated.pt")
    model = experiment_model(cfg, table.input_shape, table.num_classes)
    model.load_state_dict(state)
    details: dict[str, dict] = {}
    for c in req.clients:
        plugin = ForgetGenerator(cfg)
        plugin.load_state_dict(saved[c])
        gen = plugin.build(model, table.num_classes)
        objective = plugin.objective(model, table, table.client_rows(c))
        with torch.no_grad():
            _, before = objective(gen)
        after = plugin.train(objective, s.steps)
        with torch.no_grad():
            g = objective.dummy_gradient(gen)
            new = stepped_params(model, objective.names, g, plugin.s.step_size)
            for name in objective.names:
                model.get_parameter(name).copy_(new[name])
        details[str(c)] = {
            "before": before,
            "after_training": after,
            "dummy_gradient_norm": float(g.norm()),
        }
    result = model.state_dict()
    if s.post_rounds:
        from fedmem.unlearning.ascent import post_train  # rounds R+1.. (the submission's
        # round is not simulated: its sample would be the forgetting client alone)

        result = post_train(req, result, s.post_rounds)
    return Unlearned(
        "generator",
        {k: v.detach().clone() for k, v in result.items()},
        wall_s=time.perf_counter() - t0,
        rounds=len(req.clients) + s.post_rounds,
        storage_bytes=sum(f.stat().st_size for f in req.rd.path.glob("client_state/*/*.pt")),
        details={**asdict(s), "clients": details},
    )
