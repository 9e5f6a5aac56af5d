"""Record-level DP-SGD through Opacus, for the one training loop of ``fedmem/train.py``.

The central run and every federated client train with :func:`fedmem.train.train_epochs`; with
``dp=DPSession`` that loop does DP-SGD (Abadi et al. 2016) exactly as Opacus'
``PrivacyEngine.make_private`` would, without Opacus' DataLoader:

- **Sampling.** Every step includes each local example independently with probability
  ``q = 1 / ceil(n / batch_size)``: the rule and the ``q`` of Opacus' ``DPDataLoader`` built from
  a ``DataLoader(batch_size)`` over ``n`` examples. An epoch has ``round(1 / q)`` steps (Opacus'
  ``UniformWithReplacementSampler``) and an empty batch is still a step (noise only). The
  inclusion draws come from the keyed stream ``(seed, "poisson", round, epoch, step)`` over the
  whole ExampleTable, indexed by the trainer's rows (:func:`fedmem.train.poisson_batch`), so a
  client holding every row samples exactly like the central run.
- **Clipping and noise.** Opacus' per-sample-gradient machinery (``grad_sample_mode``: hooks,
  functorch, ew, or ghost = fast gradient clipping, Li et al. 2022 / Bu et al. 2023) and its
  ``DPOptimizer`` / ``DPOptimizerFastGradientClipping``: clip every example's gradient to
  ``max_grad_norm``, sum, add ``N(0, (noise_multiplier * max_grad_norm)^2)`` per coordinate
  from the seeded generator ``(seed, "dp-noise", round, stream)``, divide by the expected batch
  size ``q * n`` (Opacus' "mean" reduction; Opacus itself truncates it to ``int(q * n)``).
- **Model left as found.** The hooks are attached to the caller's model object (Opacus'
  non-wrapping mode; ``ew`` wraps temporarily) and removed afterwards together with every
  attribute Opacus put on parameters and modules: ``state_dict()`` keys, hooks and the optimizer
  object are unchanged, so FedAvg, the observer and a persistent central optimizer (momentum
  kept across rounds) keep working.
- **Data-independent terms.** FedProx's proximal gradient ``mu (w - w_global)`` is added after
  the noise (it depends on no example, so it costs no privacy); hook losses must be per-example
  (shape ``(batch,)``) and are clipped together with the cross-entropy.

Accounting composes across rounds: each session records ``(noise_multiplier, sample_rate,
steps)``; a trainer keeps an :class:`AccountantHistory` (plain lists, for Flower's
``context.state`` ConfigRecord) and asks it for epsilon, which a *fresh* Opacus accountant
computes from exactly that history (:meth:`AccountantHistory.epsilon`).

BatchNorm (resnet9) mixes examples within a batch, so per-example gradients do not exist for it.
:func:`dp_ready_model` replaces it with GroupNorm (Opacus' ``ModuleValidator.fix``; GroupNorm is
the usual choice for DP-SGD, De et al. 2022). The replacement changes the architecture, so every
model of a DP experiment (central, clients, server/observer) must be built through it.

Speed (``benchmarks/dp_overhead.py``): ``grad_sample_mode=auto`` picks ghost clipping for
Linear-dominated models (the MLP: 2.6-2.8x the non-private step at batch 256) and
ExpandedWeights for small convolutional ones (:func:`resolve_grad_sample_mode`). Modes that
materialize per-sample gradients slow down about 2x when glibc returns large buffers to the
OS; :func:`tune_malloc` (or starting the process with :data:`MALLOC_ENV`) prevents that.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from fedmem.errors import ConfigError
from fedmem.seeding import derive_seed

if TYPE_CHECKING:
    from fedmem.config import ExperimentConfig, PrivacyConfig, TrainConfig

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")
ACCOUNTANTS = ("rdp", "prv")

#: Environment for processes that train with DP, set *before* the process starts (glibc reads it
#: once): keep freed >32 MiB buffers in the heap instead of returning them to the OS.
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "8589934592"}

Entry = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)


# ---------------------------------------------------------------------------------------------
# sampling rate, delta, noise
# ---------------------------------------------------------------------------------------------
def sample_rate(n: int, batch_size: int) -> float:
    """Poisson inclusion probability of Opacus' DPDataLoader over ``n`` examples: 1/ceil(n/B)."""
    if n < 1:
        raise ValueError(f"record-level DP needs at least one local example, got n={n}")
    return 1.0 / math.ceil(n / batch_size)


def steps_per_epoch(q: float) -> int:
    """Steps per epoch at sample rate ``q`` (Opacus: ``1 / q`` batches)."""
    return max(1, round(1.0 / q))


def planned_steps(n: int, train: TrainConfig) -> int:
    """DP steps of a trainer with ``n`` examples that trains in every round of the run.

    A federated client plans for taking part in every round (the worst case for its epsilon);
    with ``federation.fraction_train < 1`` its actual epsilon ends lower.
    """
    return train.rounds * train.local_epochs * steps_per_epoch(sample_rate(n, train.batch_size))


def default_delta(n: int) -> float:
    """delta = 1 / (10 n) for a holder of ``n`` examples."""
    return 1.0 / (10 * n)


def check_delta(delta: float | None, n: int, key: str = "privacy.delta") -> float:
    """The delta to use for a holder of ``n`` examples; ``delta >= 1/n`` is a ConfigError."""
    if delta is None:
        return default_delta(n)
    if not 0 < delta < 1.0 / n:
        raise ConfigError(
            f"{key}: {delta} is too large for a holder of {n} examples; allowed: "
            f"0 < delta < 1/n = {1.0 / n:.3g} (default 1/(10 n) = {default_delta(n):.3g})"
        )
    return float(delta)


@functools.lru_cache(maxsize=256)
def _noise_for_target(
    target_epsilon: float, delta: float, q: float, steps: int, accountant: str
) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            # the search visits extreme noise levels where RDP's best order is the largest alpha
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=q,
                    steps=steps,
                    accountant=accountant,
                )
            )
    except ValueError as e:  # "The privacy budget is too low."
        raise ConfigError(
            f"privacy.target_epsilon: {target_epsilon} cannot be reached in {steps} steps at "
            f"sample rate {q:.3g} and delta {delta:.3g} ({e}); raise it or train fewer steps"
        ) from None


def resolve_noise_multiplier(
    privacy: PrivacyConfig, sample_rate: float, total_steps: int, delta: float
) -> float:
    """``privacy.noise_multiplier``, or the one that spends ``privacy.target_epsilon`` at delta
    after ``total_steps`` steps at ``sample_rate`` (Opacus ``get_noise_multiplier``, its
    accountant ``privacy.accountant``, epsilon within 0.01 below the target).

    ``total_steps`` is the whole run's plan (:func:`planned_steps`): a client plans for taking
    part in every round, the worst case.
    """
    if privacy.noise_multiplier is not None:
        return float(privacy.noise_multiplier)
    if privacy.target_epsilon is None:
        raise ConfigError(
            "privacy.noise_multiplier: set exactly one of privacy.noise_multiplier and "
            "privacy.target_epsilon"
        )
    return _noise_for_target(
        float(privacy.target_epsilon),
        float(delta),
        float(sample_rate),
        int(total_steps),
        privacy.accountant,
    )


# ---------------------------------------------------------------------------------------------
# accounting
# ---------------------------------------------------------------------------------------------
def _make_accountant(name: str) -> Any:
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return PRVAccountant()
    raise ConfigError(f"privacy.accountant: unknown {name!r}; allowed: {', '.join(ACCOUNTANTS)}")


@dataclass
class AccountantHistory:
    """The DP-SGD steps a trainer has taken: ``(noise_multiplier, sample_rate, steps)`` entries.

    Consecutive entries with the same noise and rate merge, as in Opacus' accountants, so the
    history equals the one an Opacus accountant would hold after the same ``step`` calls.
    Serializes to plain lists (:meth:`to_record` / :meth:`from_record`) for Flower's
    ``context.state``.
    """

    entries: list[Entry] = field(default_factory=list)

    def add(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        if steps <= 0:
            return
        entry = (float(noise_multiplier), float(sample_rate), int(steps))
        if self.entries and self.entries[-1][:2] == entry[:2]:
            last = self.entries.pop()
            entry = (last[0], last[1], last[2] + entry[2])
        self.entries.append(entry)

    def record(self, session: DPSession) -> None:
        """Add the steps a session took."""
        self.add(*session.entry())

    @property
    def steps(self) -> int:
        return sum(e[2] for e in self.entries)

    def to_record(self) -> dict[str, list[float] | list[int]]:
        """Plain lists (valid ConfigRecord values)."""
        return {
            "noise-multiplier": [e[0] for e in self.entries],
            "sample-rate": [e[1] for e in self.entries],
            "steps": [e[2] for e in self.entries],
        }

    @classmethod
    def from_record(cls, record: Any) -> AccountantHistory:
        """Inverse of :meth:`to_record` (a dict or a Flower ConfigRecord)."""
        if record is None:
            return cls()
        cols = [list(record[k]) for k in ("noise-multiplier", "sample-rate", "steps")]
        return cls([(float(a), float(b), int(c)) for a, b, c in zip(*cols, strict=True)])

    def accountant(self, accountant: str = "rdp") -> Any:
        """A fresh Opacus accountant whose history is this one."""
        acc = _make_accountant(accountant)
        acc.history = list(self.entries)
        return acc

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        """Epsilon spent at ``delta``, computed by a fresh Opacus accountant (``rdp``/``prv``).

        0 without steps; ``inf`` when any step had no noise.
        """
        if not self.entries:
            return 0.0
        if any(e[0] == 0 for e in self.entries):
            return math.inf
        return float(self.accountant(accountant).get_epsilon(delta=delta))


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def _model_errors(model: nn.Module) -> list[Exception]:
    from opacus.validators import ModuleValidator
    from opacus.validators.errors import IllegalModuleConfigurationError

    errors = ModuleValidator.validate(model, strict=False)
    # eval mode is not a property of the architecture: train_epochs switches to train mode
    return [e for e in errors if not isinstance(e, IllegalModuleConfigurationError)]


def dp_ready_model(model: nn.Module) -> nn.Module:
    """``model`` itself when Opacus can train it, else a copy with BatchNorm -> GroupNorm.

    Opacus' ``ModuleValidator.fix`` replaces each BatchNorm(C) by GroupNorm(gcd(32, C), C)
    (fresh affine weights 1 / 0); other weights are copied. The result depends only on the
    input model, so building every model of a DP experiment as
    ``dp_ready_model(build_model(...))`` (central run, clients, server) gives one architecture
    everywhere. Models without such layers (mlp, cnn1d, cnn) are returned unchanged.
    """
    if not _model_errors(model):
        return model
    from opacus.validators import ModuleValidator

    return ModuleValidator.fix(model)


def check_model(model: nn.Module, model_name: str = "model") -> None:
    """Raise ConfigError (``model.name``) when Opacus cannot compute per-example gradients."""
    errors = _model_errors(model)
    if errors:
        what = "; ".join(str(e).strip() for e in errors)[:300].replace("\n", " ")
        raise ConfigError(
            f"model.name: {model_name} cannot be trained with record-level DP "
            f"(privacy.record_level=true): {what}; build it with "
            "fedmem.privacy.dp_ready_model (BatchNorm -> GroupNorm) or use mlp, cnn1d or cnn"
        )


#: ``auto`` uses ExpandedWeights ("ew") only while every example's gradient, materialized at
#: once, stays below glibc's largest dynamic mmap threshold (32 MiB): beyond it each step's
#: buffers go back to the OS and per-sample modes slow down by about 2x (see MALLOC_ENV).
EW_AUTO_MAX_BYTES = 32 * 2**20


def _param_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters in convolutions, all trainable parameters)."""
    conv = sum(
        p.numel()
        for m in model.modules()
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)
        for p in m.parameters(recurse=False)
        if p.requires_grad
    )
    return conv, sum(p.numel() for p in model.parameters() if p.requires_grad)


def resolve_grad_sample_mode(
    mode: str, model: nn.Module | None = None, batch_size: float = 256
) -> str:
    """The Opacus mode for ``mode``; ``auto`` picks the fastest correct one for ``model``.

    Every mode computes the same clipped, noised step (``tests/test_privacy.py`` checks each
    against brute-force per-example clipping); they differ in speed and memory
    (``benchmarks/dp_overhead.py``, 1 thread, batch 64/256, DP/non-DP step time):

    - ``ghost`` (fast gradient clipping) never materializes per-example gradients of Linear
      layers: fastest for Linear-dominated models (default MLP 2.6-3.8x; ew 6-17x, hooks
      8-19x). For convolutions it still builds per-example gradients and pays a second
      backward pass.
    - ``ew`` (ExpandedWeights) is fastest when convolutions hold most parameters and the
      per-example gradients are small (cnn1d ~2-2.3x, ghost ~3.4x; small resnet9 1.6-1.7x,
      ghost 2.4x).

    ``auto`` = ``ew`` when convolutions hold at least half of the trainable parameters and
    ``parameters x batch_size x 4 bytes <= EW_AUTO_MAX_BYTES``; otherwise ``ghost``. So: mlp
    and cnn (its classifier holds 95% of the weights) -> ghost, cnn1d -> ew, resnet9 -> ew at
    few channels, ghost at the default width (ew would need GBs per step).
    """
    if mode == "auto":
        if model is None:
            return "ghost"
        conv, total = _param_counts(model)
        if 2 * conv >= total and total * batch_size * 4 <= EW_AUTO_MAX_BYTES:
            return "ew"
        return "ghost"
    if mode not in GRAD_SAMPLE_MODES:
        raise ConfigError(
            f"privacy.grad_sample_mode: unknown {mode!r}; allowed: auto, "
            + ", ".join(GRAD_SAMPLE_MODES)
        )
    return mode


def tune_malloc() -> bool:
    """Apply :data:`MALLOC_ENV` to the running process via glibc ``mallopt`` (else no-op).

    Same effect as starting the process with the environment variables (measured), for
    allocations made afterwards: freed large buffers stay in the heap, so per-sample-gradient
    modes do not pay page faults every step (about 2x for ew/hooks on the MLP and cnn; ghost
    and non-DP are unaffected). The process keeps up to 2 GiB of freed memory. Returns whether
    it was applied (glibc only).
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from malloc.h
    ok = libc.mallopt(m_mmap_max, 0) == 1
    return libc.mallopt(m_trim_threshold, 2**31 - 1) == 1 and ok


# ---------------------------------------------------------------------------------------------
# the session: one trainer, one round
# ---------------------------------------------------------------------------------------------
@dataclass
class DPSession:
    """DP-SGD settings of one ``train_epochs`` call (one trainer, one round) and its steps.

    Build it with :meth:`create`. ``stream`` separates the noise of trainers in the same round
    (client partition id, or ``"central"``). After training, ``steps`` holds the DP steps
    taken and :meth:`entry` the ``(noise_multiplier, sample_rate, steps)`` to account.
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    n_local: int
    seed: int
    round: int
    stream: int | str
    grad_sample_mode: str = "auto"
    table_size: int | None = None  # rows index a table of this size (default: n_local)
    delta: float | None = None
    accountant: str = "rdp"
    steps: int = 0
    mode_used: str | None = None  # resolved grad_sample_mode, set when training starts

    @classmethod
    def create(
        cls,
        privacy: PrivacyConfig,
        train: TrainConfig,
        *,
        n_local: int,
        seed: int,
        round_: int,
        stream: int | str,
        table_size: int | None = None,
        noise_multiplier: float | None = None,
    ) -> DPSession:
        """The session of a trainer with ``n_local`` examples in round ``round_``.

        ``noise_multiplier`` (default: :func:`resolve_noise_multiplier` over
        :func:`planned_steps`) and delta (``privacy.delta`` or ``1/(10 n_local)``) are derived
        from the configs; ``table_size`` is the ExampleTable size the rows index.
        """
        q = sample_rate(n_local, train.batch_size)
        delta = check_delta(privacy.delta, n_local)
        if noise_multiplier is None:
            noise_multiplier = resolve_noise_multiplier(
                privacy, q, planned_steps(n_local, train), delta
            )
        return cls(
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=float(privacy.max_grad_norm),
            sample_rate=q,
            n_local=int(n_local),
            seed=int(seed),
            round=int(round_),
            stream=stream,
            grad_sample_mode=privacy.grad_sample_mode,
            table_size=table_size,
            delta=delta,
            accountant=privacy.accountant,
        )

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.sample_rate)

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.n_local

    def entry(self) -> Entry:
        return (self.noise_multiplier, self.sample_rate, self.steps)

    def noise_generator(self, device: torch.device) -> torch.Generator:
        gen = torch.Generator(device=device)
        return gen.manual_seed(derive_seed(self.seed, "dp-noise", self.round, self.stream))

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> PrivateStep:
        """Attach Opacus to ``model``/``optimizer`` for this session (close it afterwards)."""
        if self.n_local < 1:
            raise ValueError("DPSession.n_local must be >= 1")
        self.mode_used = resolve_grad_sample_mode(
            self.grad_sample_mode, model, self.expected_batch_size
        )
        return PrivateStep(self, model, optimizer, self.mode_used)


_PARAM_ATTRS = (
    "grad_sample",
    "summed_grad",
    "_forward_counter",
    "_current_grad_sample",
    "_norm_sample",
)
_MODULE_ATTRS = ("activations", "max_batch_len", "ft_compute_sample_grad")


class PrivateStep:
    """One DP-SGD step at a time on the caller's model; :meth:`close` removes every trace.

    Per batch: ``forward(x)`` for the logits, then ``step(per_example_loss)``; an empty batch
    is ``empty_step()`` (several models and Opacus modes cannot run a forward pass on zero
    examples).
    """

    def __init__(
        self, session: DPSession, model: nn.Module, optimizer: torch.optim.Optimizer, mode: str
    ):
        from opacus.grad_sample import (
            GradSampleHooks,
            GradSampleHooksFastGradientClipping,
            GradSampleModuleExpandedWeights,
        )
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

        self.session, self.model, self.mode = session, model, mode
        opt_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if any(id(p) not in opt_params for p in model.parameters() if p.requires_grad):
            raise ValueError("DP-SGD: the optimizer must hold every trainable model parameter")
        self._full_bw = {m: m._is_full_backward_hook for m in model.modules()}
        self._had_hook_list = hasattr(model, "autograd_grad_sample_hooks")
        self.hooks: Any = None
        self._module: nn.Module = model
        device = next(model.parameters()).device
        try:
            if mode in ("hooks", "functorch"):
                self.hooks = GradSampleHooks(
                    model, loss_reduction="mean", force_functorch=mode == "functorch"
                )
            elif mode == "ghost":
                self.hooks = GradSampleHooksFastGradientClipping(
                    model,
                    loss_reduction="mean",
                    max_grad_norm=session.max_grad_norm,
                    use_ghost_clipping=True,
                )
            elif mode == "ew":
                self.hooks = GradSampleModuleExpandedWeights(model, loss_reduction="mean")
                self._module = self.hooks
            else:
                raise ValueError(f"unknown grad_sample_mode {mode!r}")
            self.hooks.forbid_grad_accumulation()
            opt_cls = DPOptimizerFastGradientClipping if mode == "ghost" else DPOptimizer
            self.optimizer = opt_cls(
                optimizer,
                noise_multiplier=session.noise_multiplier,
                max_grad_norm=session.max_grad_norm,
                expected_batch_size=session.expected_batch_size,
                loss_reduction="mean",
                generator=session.noise_generator(device),
            )
        except BaseException:
            self.close()
            raise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch, with gradients and per-sample state of the last step cleared."""
        self.optimizer.zero_grad(set_to_none=True)
        return self._module(x)

    def step(
        self,
        loss_per_example: torch.Tensor,
        proximal: tuple[Sequence[torch.Tensor], float] | None = None,
    ) -> None:
        """Clip, noise and apply the gradient of ``loss_per_example`` (shape ``(batch,)``).

        ``proximal = (anchor, mu)`` adds FedProx's data-independent ``mu (w - anchor)`` to the
        noised gradient.
        """
        opt = self.optimizer
        with warnings.catch_warnings():
            # layers whose input needs no gradient (the first one) make torch warn once
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            if self.mode == "ghost":
                from opacus.utils.fast_gradient_clipping_utils import (
                    DPTensorFastGradientClipping,
                )

                DPTensorFastGradientClipping(self.hooks, opt, loss_per_example, "mean").backward()
            else:
                loss_per_example.mean().backward()
        self._finish(proximal)

    def empty_step(self, proximal: tuple[Sequence[torch.Tensor], float] | None = None) -> None:
        """The step of an empty Poisson batch: no forward pass, noise only (as in Opacus).

        Feeds Opacus' optimizer a zero-example gradient (``grad_sample`` of batch size 0, or a
        zero ``grad`` for ghost clipping), so the noise comes from the same code and stream.
        """
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        for p in _trainable(self.model):
            if self.mode == "ghost":
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = p.new_zeros((0, *p.shape))
        self._finish(proximal)

    def _finish(self, proximal: tuple[Sequence[torch.Tensor], float] | None) -> None:
        opt = self.optimizer
        if not opt.pre_step():  # clip + noise + scale; False only for skipped (virtual) steps
            raise RuntimeError("DP-SGD step was skipped unexpectedly")
        if proximal is not None:
            anchor, mu = proximal
            with torch.no_grad():
                for p, a in zip(_trainable(self.model), anchor, strict=True):
                    p.grad.add_(p - a, alpha=mu)
        opt.original_optimizer.step()
        self.session.steps += 1

    def close(self) -> None:
        """Detach Opacus: hooks, wrapper, and every attribute it set on parameters/modules."""
        if self.hooks is not None:
            try:
                self.hooks.remove_hooks()
            finally:
                self.hooks = None
        if not self._had_hook_list and hasattr(self.model, "autograd_grad_sample_hooks"):
            delattr(self.model, "autograd_grad_sample_hooks")
        for p in self.model.parameters():
            for attr in _PARAM_ATTRS:
                if hasattr(p, attr):
                    delattr(p, attr)
        for m in self.model.modules():
            for attr in _MODULE_ATTRS:
                if attr in m.__dict__:
                    delattr(m, attr)
            if m in self._full_bw:
                m._is_full_backward_hook = self._full_bw[m]
        self._module = self.model

    def __enter__(self) -> PrivateStep:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _trainable(model: nn.Module) -> Iterable[nn.Parameter]:
    return (p for p in model.parameters() if p.requires_grad)


def per_example_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example (the DP loop clips each example's gradient of it)."""
    return F.cross_entropy(logits, targets, reduction="none")


# ---------------------------------------------------------------------------------------------
# validation before any training starts
# ---------------------------------------------------------------------------------------------
def validate_record_level(
    cfg: ExperimentConfig, holder_sizes: Sequence[int], model: nn.Module | None = None
) -> None:
    """Check a record-level DP experiment before training; raise a one-line ConfigError.

    ``holder_sizes``: the example counts of every trainer (central: the table; federated: each
    client). ``model``: the model as it will be trained (after :func:`dp_ready_model`).
    Checks delta against each holder, the grad_sample_mode and accountant names, that Opacus
    can train the model, and that ``target_epsilon`` is reachable for every holder.
    """
    privacy = cfg.privacy
    if not privacy.record_level:
        return
    resolve_grad_sample_mode(privacy.grad_sample_mode, model)
    if privacy.accountant not in ACCOUNTANTS:
        _make_accountant(privacy.accountant)
    if model is not None:
        check_model(model, cfg.model.name)
    for n in sorted(set(int(s) for s in holder_sizes)):
        if n < 1:
            raise ConfigError(f"privacy.record_level: a trainer holds {n} examples; needs >= 1")
        delta = check_delta(privacy.delta, n)
        q = sample_rate(n, cfg.train.batch_size)
        resolve_noise_multiplier(privacy, q, planned_steps(n, cfg.train), delta)
