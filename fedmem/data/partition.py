"""Split training examples over clients: iid, Dirichlet label skew, or class shards.

Every function takes the labels and a numpy Generator and returns one index array per client.
The arrays are disjoint, together cover ``range(len(labels))``, and are sorted.
"""

from __future__ import annotations

import numpy as np

from fedmem.errors import ConfigError


def iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Uniformly random split into ``num_clients`` parts whose sizes differ by at most one."""
    perm = rng.permutation(len(labels))
    return [np.sort(part) for part in np.array_split(perm, num_clients)]


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Label-skewed split (Hsu, Qi & Brown 2019): for each class c, client shares ~ Dir(alpha).

    Small ``alpha`` gives each client few classes. Draws are repeated until every client holds
    at least ``min_size`` examples, as in the usual NIID-Bench recipe (Li et al. 2022).
    """
    classes = np.unique(labels)
    if min_size * num_clients > len(labels):
        raise ConfigError(
            f"partition.min_size: {min_size} x {num_clients} clients exceeds the "
            f"{len(labels)} training examples; lower partition.min_size"
        )
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise ConfigError(
        f"partition.alpha: no Dirichlet({alpha}) split gave every one of {num_clients} clients "
        f"{min_size} examples in {max_tries} draws; raise partition.alpha or lower "
        "partition.min_size"
    )


def shards(
    labels: np.ndarray, num_clients: int, classes_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Pathological non-iid split (McMahan et al. 2017): each client holds ``k`` classes.

    Classes are dealt to clients in a random cyclic order, so client i gets k consecutive
    classes of that order and every class goes to ``num_clients * k / C`` clients (rounded);
    each class's examples are split evenly over the clients that hold it.
    """
    classes = np.unique(labels)
    k = classes_per_client
    if k > len(classes):
        raise ConfigError(
            f"partition.classes_per_client: {k} exceeds the {len(classes)} classes of the data"
        )
    if k * num_clients < len(classes):
        raise ConfigError(
            f"partition.classes_per_client: {k} classes x {num_clients} clients cannot cover "
            f"{len(classes)} classes; raise it to at least {-(-len(classes) // num_clients)}"
        )
    order = rng.permutation(classes)
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for client in range(num_clients):
        for j in range(k):
            holders[int(order[(client * k + j) % len(order)])].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, clients in holders.items():
        idx = rng.permutation(np.flatnonzero(labels == c))
        for client, chunk in zip(clients, np.array_split(idx, len(clients)), strict=True):
            parts[client].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.empty(0, dtype=np.int64) for p in parts]


def partition(
    labels: np.ndarray,
    num_clients: int,
    kind: str,
    rng: np.random.Generator,
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Dispatch to :func:`iid`, :func:`dirichlet` or :func:`shards` by ``kind``."""
    if num_clients > len(labels):
        raise ConfigError(
            f"federation.num_clients: {num_clients} clients but only {len(labels)} training "
            "examples"
        )
    if kind == "iid":
        return iid(labels, num_clients, rng)
    if kind == "dirichlet":
        return dirichlet(labels, num_clients, alpha, rng, min_size=min_size)
    if kind == "shards":
        return shards(labels, num_clients, classes_per_client, rng)
    raise ConfigError(f"partition.kind: unknown {kind!r}; allowed: iid, dirichlet, shards")
