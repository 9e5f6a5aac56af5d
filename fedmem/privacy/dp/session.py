"""A DP-SGD session: one trainer's round of clipped, noised steps through Opacus.

:class:`DPSession` holds the settings of one ``train_epochs`` call and counts its steps;
:class:`PrivateStep` attaches Opacus to the caller's model and optimizer and removes every
trace afterwards. Also the choice of Opacus' per-sample-gradient mode
(:func:`resolve_grad_sample_mode`) and the allocator settings that keep those modes fast
(:data:`MALLOC_ENV`, :func:`tune_malloc`). The overview is in :mod:`fedmem.privacy.dp`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from fedmem.errors import ConfigError
from fedmem.privacy.dp.accounting import Entry
from fedmem.privacy.dp.planning import (
    planned_steps,
    record_delta,
    resolve_noise_multiplier,
    sample_rate,
    steps_per_epoch,
)
from fedmem.seeding import derive_seed

if TYPE_CHECKING:
    from fedmem.config import PrivacyConfig, TrainConfig

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")

#: Environment for processes that train with DP, set *before* the process starts (glibc reads it
#: once): keep freed >32 MiB buffers in the heap instead of returning them to the OS.
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "8589934592"}

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
        n_dataset: int | None = None,
    ) -> DPSession:
        """The session of a trainer with ``n_local`` of the run's ``n_dataset`` training
        examples in round ``round_``.

        ``noise_multiplier`` (default: :func:`resolve_noise_multiplier` over
        :func:`planned_steps`) and delta (:func:`record_delta`) are derived from the configs;
        ``table_size`` is the ExampleTable size the rows index.
        """
        q = sample_rate(n_local, train.batch_size)
        delta = record_delta(privacy, n_local, n_dataset)
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
        after_noise: Callable[[], None] | None = None,
    ) -> None:
        """Clip, noise and apply the gradient of ``loss_per_example`` (shape ``(batch,)``).

        ``after_noise`` runs between the noise and the update: data-independent gradient terms
        (plug-in penalties such as FedProx's ``mu (w - anchor)``) are added there, unclipped.
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
        self._finish(after_noise)

    def empty_step(self, after_noise: Callable[[], None] | None = None) -> None:
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
        self._finish(after_noise)

    def _finish(self, after_noise: Callable[[], None] | None) -> None:
        opt = self.optimizer
        if not opt.pre_step():  # clip + noise + scale; False only for skipped (virtual) steps
            raise RuntimeError("DP-SGD step was skipped unexpectedly")
        if after_noise is not None:
            after_noise()
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
