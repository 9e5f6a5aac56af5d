"""K small models trained at once, each on its own subset of rows (subsample / shadow models).

:func:`train_ensemble` runs the training loop of :func:`fedmem.train.train_epochs` for K
models side by side, on stacked parameters (leading dimension K), with the same semantics:

- mini-batches of ``train_cfg.batch_size`` rows (the last batch of an epoch may be smaller),
  loss = cross-entropy averaged over the real examples of the batch;
- optimizer ``train_cfg.optimizer``: ``sgd`` follows ``torch.optim.SGD`` (weight decay added to
  the gradient, momentum buffer ``b <- momentum * b + g`` started at the first gradient,
  ``w <- w - lr * b``), ``adam`` follows ``torch.optim.Adam`` (L2 weight decay added to the
  gradient, bias-corrected moments, ``eps`` 1e-8, betas 0.9 / 0.999), a fresh optimizer per
  model at the start of training (like a federated client's first round);
- ``train_cfg.proximal_mu`` and training hooks do not apply (there is no global model).

Batch order (:func:`ensemble_order`): in epoch ``e`` every row of ``x`` draws a key from the
stream ``(seed, "ensemble", k, e)`` (``torch.rand(len(x))`` with that generator) and model ``k``
visits the rows of its mask by ascending key (ties by row id). This is :func:`keyed_order` with
the stream named per model instead of per round: orders are independent across models and a
row's key does not depend on which other rows a model trains on.

Initialization: model ``k`` is ``build_model(model_cfg, ...)`` under
``torch.manual_seed(derive_seed(seed, "ensemble-init", k))`` (:func:`member_init_state`), the
global RNG untouched; ``init_states`` overrides it (pass
``[fedmem.models.init_model(cfg, table).state_dict()]`` to start from the experiment's init).
Model ``k``'s init and batch order depend only on ``(seed, k)``, where ``k = first + i`` for
the i-th mask of a call: models are independent, so an ensemble of K models equals K calls with
one mask each (``first=k``), and ``chunk`` changes nothing but memory use (up to float
rounding).

Uneven subsets: each model takes ``ceil(|mask_k| / batch_size)`` steps per epoch. Steps run in
lock-step up to the largest subset's count; a model whose epoch is over skips the remaining
steps entirely (no weight decay, no momentum or Adam moment update, no Adam step count).

Two implementations, the same numbers up to float rounding:

- ``bmm`` (MLP only, the default for it): forward and a hand-written backward with batched
  matrix products (``torch.baddbmm``/``bmm``) over weights stacked as (K, out, in); with SGD
  and momentum the weight gradient is accumulated straight into the momentum buffer inside its
  matrix product (``buf.baddbmm_(..., beta=momentum)``), which saves several passes over
  memory per step (rounding differs from torch's ``buf * momentum + grad`` in the last bits);
- ``vmap`` (any model without BatchNorm): ``torch.func.vmap(grad(loss))`` over
  ``functional_call`` with the stacked parameters (as ``torch.func.stack_module_state`` stacks
  them, here from state dicts).

The optimizer update is applied to the stacked tensors (vectorized over K) in both. Models with
BatchNorm (``resnet9``) are refused: their running statistics do not fit a vmapped update.

Threads (CPU): the models are split over ``workers`` Python threads (default: torch's thread
count), each running its share single-threaded; the matrix products release the GIL, so two
workers use two cores without OpenMP barriers (see :func:`train_ensemble`). Speed on the 2-core
development machine: ``benchmarks/ensemble.py``.

Modules: :mod:`~fedmem.ensemble.trainer` (:func:`train_ensemble`, :class:`Ensemble`, orders
and inits), :mod:`~fedmem.ensemble.kernels` (``bmm`` and ``vmap`` gradients) and
:mod:`~fedmem.ensemble.optim` (stacked SGD / Adam).
"""

from fedmem.ensemble.trainer import (
    SIMULATED_PLUGINS,
    Backend,
    Ensemble,
    ensemble_keys,
    ensemble_order,
    member_init_state,
    train_ensemble,
)

__all__ = [
    "SIMULATED_PLUGINS",
    "Backend",
    "Ensemble",
    "ensemble_keys",
    "ensemble_order",
    "member_init_state",
    "train_ensemble",
]
