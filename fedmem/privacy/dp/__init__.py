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

Modules: :mod:`~fedmem.privacy.dp.planning` (sample rate, steps, delta, noise),
:mod:`~fedmem.privacy.dp.accounting` (:class:`AccountantHistory`), :mod:`~fedmem.privacy.dp.models`
(:func:`dp_ready_model`, :func:`check_model`), :mod:`~fedmem.privacy.dp.session`
(:class:`DPSession`, :class:`PrivateStep`, grad-sample modes, allocator) and
:mod:`~fedmem.privacy.dp.validate` (:func:`validate_record_level`). Importing this package is
cheap; Opacus is imported when DP training or accounting starts.
"""

from fedmem.privacy.dp.accounting import AccountantHistory
from fedmem.privacy.dp.models import check_model, dp_ready_model
from fedmem.privacy.dp.planning import (
    check_delta,
    default_delta,
    planned_steps,
    record_delta,
    resolve_noise_multiplier,
    sample_rate,
    steps_per_epoch,
)
from fedmem.privacy.dp.session import (
    MALLOC_ENV,
    DPSession,
    PrivateStep,
    resolve_grad_sample_mode,
    tune_malloc,
)
from fedmem.privacy.dp.validate import validate_record_level

__all__ = [
    "MALLOC_ENV",
    "AccountantHistory",
    "DPSession",
    "PrivateStep",
    "check_delta",
    "check_model",
    "default_delta",
    "record_delta",
    "dp_ready_model",
    "planned_steps",
    "resolve_grad_sample_mode",
    "resolve_noise_multiplier",
    "sample_rate",
    "steps_per_epoch",
    "tune_malloc",
    "validate_record_level",
]
