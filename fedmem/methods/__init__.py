"""Training plug-ins and methods, one file each.

- :mod:`~fedmem.methods.base`: the plug-in seam (:class:`Plugin`, its contexts)
- :mod:`~fedmem.methods.registry`: plug-ins by name, built from the config
- :mod:`~fedmem.methods.proximal`: FedProx's proximal term (Li et al. 2020)
"""

from fedmem.methods.base import BatchContext, Plugin, RoundContext
from fedmem.methods.registry import build_plugins

__all__ = ["BatchContext", "Plugin", "RoundContext", "build_plugins"]
