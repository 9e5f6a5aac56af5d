"""fedmem: federated-learning simulation for studying memorization."""

import os

# OpenMP threads sleep instead of spinning while they wait: a run sharing the machine with
# others (a sweep) then slows down in proportion instead of collapsing (fedmem.runs.devices).
# Only effective when set before torch is first imported; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
