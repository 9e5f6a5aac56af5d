"""ExampleTable: every training example with a stable id, its labels, its flags and its client.

Built deterministically from the config (:func:`build_table`):

    source --> outliers (inputs corrupted, labels kept) --> partition over the true labels
           --> label noise (global or per-client rate, never on outliers)
           --> canaries appended (each copy a row, placed at the chosen clients)

Row ``i`` has id ``i``: ids ``0..n-1`` are the source's training examples in source order, the
canary copies follow. Never-inserted reference canaries are kept beside the table.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from fedmem.config import ExperimentConfig, to_dict
from fedmem.data import corrupt
from fedmem.data.partition import partition
from fedmem.data.sources import Source, load_source
from fedmem.errors import ConfigError
from fedmem.seeding import np_rng


@dataclass(frozen=True)
class ExampleTable:
    """Training examples with ground truth, the test set and the canary reference set."""

    x: torch.Tensor  # (N, *input_shape) float32
    y_obs: torch.Tensor  # (N,) int64, the label training sees
    y_true: torch.Tensor  # (N,) int64, the clean label
    is_noisy: torch.Tensor  # (N,) bool, y_obs != y_true by construction
    is_outlier: torch.Tensor  # (N,) bool, input corrupted, label kept
    is_canary: torch.Tensor  # (N,) bool, a copy of an inserted canary
    canary_id: torch.Tensor  # (N,) int64, which canary a copy is (-1 otherwise)
    client: torch.Tensor  # (N,) int64, the client that holds the row
    x_test: torch.Tensor
    y_test: torch.Tensor
    canary_ref_x: torch.Tensor  # never inserted, same distribution as the canaries
    canary_ref_y: torch.Tensor
    num_classes: int
    num_clients: int

    @property
    def ids(self) -> torch.Tensor:
        return torch.arange(len(self.y_obs))

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def is_clean(self) -> torch.Tensor:
        """Regular examples: correct label, typical input, not a canary."""
        return ~(self.is_noisy | self.is_outlier | self.is_canary)

    def __len__(self) -> int:
        return len(self.y_obs)

    def client_rows(self, client: int) -> torch.Tensor:
        """Row ids held by ``client`` (ascending)."""
        return torch.nonzero(self.client == client).flatten()

    def save(self, path: str | Path) -> None:
        arrays = {}
        for f in fields(self):
            v = getattr(self, f.name)
            arrays[f.name] = v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        path = Path(path)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> ExampleTable:
        with np.load(path) as z:
            kw = {}
            for f in fields(cls):
                a = z[f.name]
                kw[f.name] = int(a) if a.ndim == 0 else torch.from_numpy(a)
        return cls(**kw)


def build_table(cfg: ExperimentConfig, source: Source | None = None) -> ExampleTable:
    """The experiment's ExampleTable, a pure function of the config (and its seed)."""
    src = source if source is not None else load_source(cfg.data, cfg.seed)
    seed, dc = cfg.seed, cfg.data
    n, num_classes = len(src.y_train), src.num_classes
    num_clients = cfg.federation.num_clients
    x = src.x_train.numpy().copy()
    y_true = src.y_train.numpy().astype(np.int64)

    # outliers: atypical inputs, labels kept
    is_outlier = np.zeros(n, dtype=bool)
    out_idx = corrupt.choose_exact(np.arange(n), dc.outliers.share, n, np_rng(seed, "outliers"))
    is_outlier[out_idx] = True
    x[out_idx] = corrupt.corrupt_inputs(
        x[out_idx], dc.outliers.kind, dc.outliers.strength, np_rng(seed, "outliers", "inputs")
    )

    # partition over the true labels (clients own data; labels get corrupted afterwards)
    parts = partition(
        y_true,
        num_clients,
        cfg.partition.kind,
        np_rng(seed, "partition"),
        alpha=cfg.partition.alpha,
        classes_per_client=cfg.partition.classes_per_client,
        min_size=cfg.partition.min_size,
    )
    client = np.empty(n, dtype=np.int64)
    for k, rows in enumerate(parts):
        client[rows] = k

    # label noise, exact count per scope, never on outliers
    is_noisy = np.zeros(n, dtype=bool)
    if dc.noise.client_rates is not None:
        scopes = [(parts[k], r, ("noise", k)) for k, r in dc.noise.client_rates.items()]
    else:
        scopes = [(np.arange(n), dc.noise.rate, ("noise",))]
    for rows, rate, key in scopes:
        eligible = rows[~is_outlier[rows]]
        try:
            chosen = corrupt.choose_exact(eligible, rate, len(rows), np_rng(seed, *key))
        except ValueError as e:
            where = f"client {key[1]}" if len(key) > 1 else "the training set"
            raise ConfigError(f"data.noise: {e} in {where}; lower the noise rate") from None
        is_noisy[chosen] = True
    y_obs = y_true.copy()
    noisy_idx = np.flatnonzero(is_noisy)
    y_obs[noisy_idx] = corrupt.flip_labels(
        y_true[noisy_idx], num_classes, dc.noise.kind, np_rng(seed, "noise", "labels")
    )

    # canaries: inserted copies + never-inserted reference set from the same distribution
    can = dc.canaries
    crng = np_rng(seed, "canaries")
    cx, cy = corrupt.make_canaries(can.count + can.reference, src.input_shape, num_classes, crng)
    ref_x, ref_y = cx[can.count :], cy[can.count :]
    cx, cy = cx[: can.count], cy[: can.count]
    can_clients = crng.choice(num_clients, size=min(can.num_clients, num_clients), replace=False)
    placement = corrupt.place_canaries(
        can.count, can.repeats, np.sort(can_clients), can.clients_per_canary, crng
    )
    copies = np.repeat(np.arange(can.count), can.repeats)
    m = len(copies)

    def cat(a: np.ndarray, b: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([a, b]))

    return ExampleTable(
        x=cat(x, cx[copies].reshape(m, *src.input_shape)),
        y_obs=cat(y_obs, cy[copies].astype(np.int64)),
        y_true=cat(y_true, cy[copies].astype(np.int64)),
        is_noisy=cat(is_noisy, np.zeros(m, dtype=bool)),
        is_outlier=cat(is_outlier, np.zeros(m, dtype=bool)),
        is_canary=cat(np.zeros(n, dtype=bool), np.ones(m, dtype=bool)),
        canary_id=cat(np.full(n, -1, dtype=np.int64), copies.astype(np.int64)),
        client=cat(client, np.concatenate(placement).astype(np.int64) if m else client[:0]),
        x_test=src.x_test,
        y_test=src.y_test,
        canary_ref_x=torch.from_numpy(ref_x),
        canary_ref_y=torch.from_numpy(ref_y.astype(np.int64)),
        num_classes=num_classes,
        num_clients=num_clients,
    )


def table_key(cfg: ExperimentConfig) -> str:
    """Hash of everything the table depends on: seed, data (not its cache), partition, clients."""
    d = to_dict(cfg)
    d["data"].pop("cache_dir", None)
    blob = json.dumps(
        [d["seed"], d["data"], d["partition"], d["federation"]["num_clients"]], sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_table(cfg: ExperimentConfig) -> ExampleTable:
    """:func:`build_table`, cached on disk under ``data.cache_dir/tables/`` by :func:`table_key`.

    Federated clients call this to rebuild their partition from the config alone; on one
    machine they read the file the driver wrote, on a cluster each node builds it once.
    """
    path = Path(cfg.data.cache_dir) / "tables" / f"{table_key(cfg)}.npz"
    if path.is_file():
        try:
            return ExampleTable.load(path)
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)  # a torn or stale file: rebuild
    table = build_table(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.save(path)
    return table
