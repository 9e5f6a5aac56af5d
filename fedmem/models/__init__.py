"""Models: the architectures (:mod:`fedmem.models.architectures`: ``mlp``, ``cnn1d``, ``cnn``,
``resnet9`` and :func:`build_model`) and the experiment's model factory
(:mod:`fedmem.models.factory`: :func:`experiment_model`, :func:`init_model`,
:func:`resolve_device`).
"""

from fedmem.models.architectures import CNN, MLP, REGISTRY, CNN1d, ResNet9, build_model
from fedmem.models.factory import experiment_model, init_model, resolve_device

__all__ = [
    "CNN",
    "MLP",
    "REGISTRY",
    "CNN1d",
    "ResNet9",
    "build_model",
    "experiment_model",
    "init_model",
    "resolve_device",
]
