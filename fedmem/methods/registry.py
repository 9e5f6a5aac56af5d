"""Plug-ins by name, built from the experiment config.

Built-in plug-ins are listed in :data:`BUILTIN` in the order they act on a batch (their loss
terms are added in this order, so results do not depend on dict ordering). Researchers add
their own without editing fedmem: ``plugins.external=["mypkg.mymodule:MyPlugin"]`` imports
the class (a :class:`~fedmem.methods.base.Plugin` subclass) on the driver and on every client,
and builds it with ``MyPlugin.from_config(cfg, run)``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fedmem.errors import ConfigError
from fedmem.methods.base import Plugin
from fedmem.methods.elr import ELR
from fedmem.methods.forget_generator import ForgetGenerator
from fedmem.methods.proximal import Proximal
from fedmem.methods.tied_dropout import TiedDropoutPlugin

if TYPE_CHECKING:
    from fedmem.config import ExperimentConfig

BUILTIN: tuple[type[Plugin], ...] = (Proximal, ELR, TiedDropoutPlugin, ForgetGenerator)
RUNS = ("central", "federated")


def load_external(path: str) -> type[Plugin]:
    """The plug-in class at ``"module:Class"`` (ConfigError naming plugins.external if not)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"plugins.external: {path!r} must look like 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"plugins.external: cannot import {module_name!r} ({e})") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise ConfigError(f"plugins.external: {path!r} is not a fedmem.methods.Plugin subclass")
    if not cls.name:
        raise ConfigError(f"plugins.external: {path!r} has no `name`")
    return cls


def plugin_classes(cfg: ExperimentConfig) -> list[type[Plugin]]:
    """Built-in classes, then the external ones, with unique names."""
    classes = list(BUILTIN) + [load_external(p) for p in cfg.plugins.external]
    names = [c.name for c in classes]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"plugins.external: plug-in names {dup} are used twice")
    return classes


def build_plugins(cfg: ExperimentConfig, run: str) -> list[Plugin]:
    """The plug-ins active for ``run`` ("central" or "federated"), in acting order."""
    if run not in RUNS:
        raise ValueError(f"run must be one of {RUNS}, got {run!r}")
    out = []
    for cls in plugin_classes(cfg):
        plugin = cls.from_config(cfg, run)
        if plugin is not None:
            out.append(plugin)
    return out


def active_plugin_names(cfg: ExperimentConfig, run: str) -> list[str]:
    return [p.name for p in build_plugins(cfg, run)]
