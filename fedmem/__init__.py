"""fedmem: federated-learning simulation for studying memorization."""

__version__ = "0.1.0"
