"""ExampleTable: every training example with a stable id, its labels, its flags and its client.

Built deterministically from the config (:func:`build_table`):

    source --> outliers (inputs corrupted, labels kept) --> partition over the true labels
           --> label noise (global or per-client rate, never on outliers)
           --> audit split (held-out clients and non-member candidates leave the training rows)
           --> canaries appended (each copy a row, placed at the chosen clients)
           --> member audit canaries appended (one row each)

Row ``i`` has id ``i``: the source's training examples that are trained on come first, in source
order (all of them, ``0..n-1``, without an ``audit`` section), then the canary copies, then the
audit canaries that were drawn in. Never-inserted reference canaries, every audit candidate
(member or not) and the held-out clients' examples are kept beside the rows.
"""

from __future__ import annotations

import os
import sys
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from fedmem.config import ExperimentConfig, config_hash
from fedmem.data import corrupt
from fedmem.data.backdoor import apply_backdoor
from fedmem.data.partition import partition
from fedmem.data.sources import Source, load_source
from fedmem.errors import ConfigError, DataError
from fedmem.seeding import np_rng

AUDIT_POOL, AUDIT_CANARY = 0, 1  # ExampleTable.audit_kind

# fields of an ExampleTable that must have equal lengths (a check of a cached table)
_SAME_LENGTH = (
    ("x", "y_obs", "y_true", "is_noisy", "is_outlier", "is_canary", "canary_id", "client"),
    ("x", "is_backdoor"),
    ("backdoor_x_test", "backdoor_y_test"),
    ("x", "audit_id"),
    ("x_test", "y_test"),
    ("canary_ref_x", "canary_ref_y"),
    ("audit_x", "audit_y", "audit_y_true", "audit_kind", "audit_member", "audit_client"),
    ("audit_x", "audit_row"),
    ("heldout_x", "heldout_y", "heldout_y_true", "heldout_client"),
)


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
    # audit (empty without an ``audit`` section): membership candidates, each drawn in w.p. 1/2
    audit_id: torch.Tensor  # (N,) int64, the row's candidate number (-1 if not a candidate)
    audit_x: torch.Tensor  # (M, *input_shape) every candidate, member or not
    audit_y: torch.Tensor  # (M,) the label it is (or would be) trained with
    audit_y_true: torch.Tensor  # (M,)
    audit_kind: torch.Tensor  # (M,) int64: AUDIT_POOL (a source example) or AUDIT_CANARY
    audit_member: torch.Tensor  # (M,) bool, trained on
    audit_client: torch.Tensor  # (M,) int64, the client that holds (or would hold) it
    audit_row: torch.Tensor  # (M,) int64, its row when a member, else -1
    heldout_x: torch.Tensor  # (H_rows, *input_shape) examples of never-trained clients
    heldout_y: torch.Tensor  # (H_rows,) observed labels (noise applied like everywhere)
    heldout_y_true: torch.Tensor
    heldout_client: torch.Tensor  # (H_rows,) int64, ids num_clients .. num_clients + H - 1
    # backdoor (empty without data.backdoor.clients): poisoned rows and the triggered test set
    is_backdoor: torch.Tensor  # (N,) bool, trigger added and label set to the target
    backdoor_x_test: torch.Tensor  # test examples whose label is not the target, triggered
    backdoor_y_test: torch.Tensor  # their true labels
    backdoor_target: int  # the label the trigger maps to (-1: no backdoor)

    @property
    def ids(self) -> torch.Tensor:
        return torch.arange(len(self.y_obs))

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def is_audit_canary(self) -> torch.Tensor:
        """Rows that are audit canaries drawn into training (random input and label)."""
        if len(self.audit_kind) == 0:
            return torch.zeros(len(self), dtype=torch.bool)
        kind = torch.where(self.audit_id >= 0, self.audit_kind[self.audit_id.clamp(min=0)], -1)
        return kind == AUDIT_CANARY

    @property
    def is_clean(self) -> torch.Tensor:
        """Regular examples: correct label, typical input, not a canary of either kind."""
        return ~(
            self.is_noisy
            | self.is_outlier
            | self.is_canary
            | self.is_audit_canary
            | self.is_backdoor
        )

    @property
    def num_heldout_clients(self) -> int:
        return int(len(torch.unique(self.heldout_client)))

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
        try:  # a temporary file and a rename: the cache file is whole or absent
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> ExampleTable:
        """Read a saved table; ValueError when its arrays do not fit together."""
        with np.load(path) as z:
            kw = {}
            for f in fields(cls):
                a = z[f.name]
                kw[f.name] = int(a) if a.ndim == 0 else torch.from_numpy(a)
        for group in _SAME_LENGTH:
            lengths = {name: len(kw[name]) for name in group}
            if len(set(lengths.values())) > 1:
                raise ValueError(f"arrays of different lengths: {lengths}")
        return cls(**kw)


def build_table(cfg: ExperimentConfig, source: Source | None = None) -> ExampleTable:
    """The experiment's ExampleTable, a pure function of the config (and its seed)."""
    src = source if source is not None else load_source(cfg.data, cfg.seed)
    seed, dc = cfg.seed, cfg.data
    n, num_classes = len(src.y_train), src.num_classes
    num_clients = cfg.federation.num_clients
    heldout = cfg.audit.heldout_clients
    x = src.x_train.numpy().copy()
    y_true = src.y_train.numpy().astype(np.int64)

    # outliers: atypical inputs, labels kept
    is_outlier = np.zeros(n, dtype=bool)
    out_idx = corrupt.choose_exact(np.arange(n), dc.outliers.share, n, np_rng(seed, "outliers"))
    is_outlier[out_idx] = True
    x[out_idx] = corrupt.corrupt_inputs(
        x[out_idx], dc.outliers.kind, dc.outliers.strength, np_rng(seed, "outliers", "inputs")
    )

    # partition over the true labels (clients own data; labels get corrupted afterwards);
    # held-out clients (audit) are the last ``heldout`` parts: partitioned like the others
    parts = partition(
        y_true,
        num_clients + heldout,
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
    is_backdoor, bd_x_test, bd_y_test = apply_backdoor(
        cfg, parts, x, y_obs, is_outlier | is_noisy, src
    )

    # audit split: membership candidates from the training clients, each kept w.p. 1/2
    split = _audit_split(cfg, client, num_classes, src.input_shape)
    keep = (client < num_clients) & ~np.isin(np.arange(n), split.pool[~split.pool_member])
    kept = np.flatnonzero(keep)
    row_of = np.full(n, -1, dtype=np.int64)
    row_of[kept] = np.arange(len(kept))
    is_held = client >= num_clients

    # canaries: inserted copies + never-inserted reference set from the same distribution
    can = dc.canaries
    crng = np_rng(seed, "canaries")
    cx, cy = corrupt.make_canaries(can.count + can.reference, src.input_shape, num_classes, crng)
    ref_x, ref_y = cx[can.count :], cy[can.count :]
    cx, cy = cx[: can.count], cy[: can.count]
    can_clients = crng.choice(num_clients, size=min(can.num_clients, num_clients), replace=False)
    placement = corrupt.place_canaries(can.kinds(), can.count, np.sort(can_clients), crng)
    copies = np.repeat(np.arange(can.count), [len(p) for p in placement]).astype(np.int64)
    m = len(copies)
    can_client = np.concatenate(placement).astype(np.int64) if m else client[:0]

    # candidates: pool examples, then audit canaries; members get rows after the canaries
    n_pool, n_ac = len(split.pool), len(split.canary_y)
    ac_member_idx = np.flatnonzero(split.canary_member)
    audit_row = np.concatenate(
        [
            np.where(split.pool_member, row_of[split.pool], -1),
            np.full(n_ac, -1, dtype=np.int64),
        ]
    ).astype(np.int64)
    audit_row[n_pool + ac_member_idx] = len(kept) + m + np.arange(len(ac_member_idx))
    n_rows = len(kept) + m + len(ac_member_idx)
    audit_id = np.full(n_rows, -1, dtype=np.int64)
    audit_id[audit_row[audit_row >= 0]] = np.flatnonzero(audit_row >= 0)
    ac_x = split.canary_x[ac_member_idx]
    ac_y = split.canary_y[ac_member_idx]
    ac_n = len(ac_member_idx)

    def cat(*arrays: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(arrays))

    false = np.zeros(m + ac_n, dtype=bool)
    bd = dc.backdoor
    return ExampleTable(
        x=cat(x[kept], cx[copies].reshape(m, *src.input_shape), ac_x),
        y_obs=cat(y_obs[kept], cy[copies].astype(np.int64), ac_y),
        y_true=cat(y_true[kept], cy[copies].astype(np.int64), ac_y),
        is_noisy=cat(is_noisy[kept], false),
        is_outlier=cat(is_outlier[kept], false),
        is_canary=cat(np.zeros(len(kept), dtype=bool), np.ones(m, dtype=bool), false[:ac_n]),
        canary_id=cat(
            np.full(len(kept), -1, dtype=np.int64),
            copies.astype(np.int64),
            np.full(ac_n, -1, dtype=np.int64),
        ),
        client=cat(client[kept], can_client, split.canary_client[ac_member_idx]),
        x_test=src.x_test,
        y_test=src.y_test,
        canary_ref_x=torch.from_numpy(ref_x),
        canary_ref_y=torch.from_numpy(ref_y.astype(np.int64)),
        num_classes=num_classes,
        num_clients=num_clients,
        audit_id=torch.from_numpy(audit_id),
        audit_x=cat(x[split.pool], split.canary_x),
        audit_y=cat(y_obs[split.pool], split.canary_y),
        audit_y_true=cat(y_true[split.pool], split.canary_y),
        audit_kind=cat(
            np.full(n_pool, AUDIT_POOL, dtype=np.int64), np.full(n_ac, AUDIT_CANARY, np.int64)
        ),
        audit_member=cat(split.pool_member, split.canary_member),
        audit_client=cat(client[split.pool], split.canary_client),
        audit_row=torch.from_numpy(audit_row),
        heldout_x=torch.from_numpy(x[is_held]),
        heldout_y=torch.from_numpy(y_obs[is_held]),
        heldout_y_true=torch.from_numpy(y_true[is_held]),
        heldout_client=torch.from_numpy(client[is_held]),
        is_backdoor=cat(is_backdoor[kept], false),
        backdoor_x_test=torch.from_numpy(bd_x_test),
        backdoor_y_test=torch.from_numpy(bd_y_test),
        backdoor_target=bd.target if bd.clients else -1,
    )


@dataclass(frozen=True)
class _AuditSplit:
    pool: np.ndarray  # source indices of the pool candidates (sorted)
    pool_member: np.ndarray  # bool
    canary_x: np.ndarray
    canary_y: np.ndarray
    canary_member: np.ndarray  # bool
    canary_client: np.ndarray  # int64, the training client that holds (would hold) it


def _audit_split(
    cfg: ExperimentConfig,
    client: np.ndarray,
    num_classes: int,
    input_shape: tuple[int, ...],
) -> _AuditSplit:
    """Draw the membership candidates of ``cfg.audit``, each included independently w.p. 1/2.

    Pool candidates are uniform among the training clients' examples (mislabeled and outliers
    included: they are part of the data an attacker targets); audit canaries are random inputs
    with random labels (like ``data.canaries``), each held by a uniformly chosen training client.
    Independent Bernoulli(1/2) inclusion is what the one-run audit of Steinke et al. (2023)
    needs and what LiRA's member / non-member split assumes.
    """
    au, num_clients = cfg.audit, cfg.federation.num_clients
    eligible = np.flatnonzero(client < num_clients)
    if au.pool > len(eligible):
        raise ConfigError(
            f"audit.pool: {au.pool} exceeds the {len(eligible)} training examples of the "
            "training clients; lower audit.pool or generate more data"
        )
    rng = np_rng(cfg.seed, "audit", "pool")
    pool = np.sort(rng.choice(eligible, size=au.pool, replace=False))
    pool_member = rng.random(au.pool) < 0.5
    crng = np_rng(cfg.seed, "audit", "canaries")
    cx, cy = corrupt.make_canaries(au.canaries, input_shape, num_classes, crng)
    canary_member = crng.random(au.canaries) < 0.5
    canary_client = crng.integers(0, num_clients, size=au.canaries).astype(np.int64)
    return _AuditSplit(pool, pool_member, cx, cy.astype(np.int64), canary_member, canary_client)


TABLE_KEYS = ("seed", "data", "partition", "federation.num_clients", "audit")


def table_key(cfg: ExperimentConfig) -> str:
    """Hash of everything the table depends on: seed, data (not its cache), partition, clients,
    audit records (:func:`fedmem.config.config_hash` restricted to :data:`TABLE_KEYS`)."""
    return config_hash(cfg, only=TABLE_KEYS)[:16]


def cached_table(cfg: ExperimentConfig) -> ExampleTable:
    """:func:`build_table`, cached on disk under ``data.cache_dir/tables/`` by :func:`table_key`.

    Federated clients call this to rebuild their partition from the config alone; on one
    machine they read the file the driver wrote, on a cluster each node builds it once.
    A cache file that cannot be read or whose arrays do not fit together (truncated,
    corrupt, foreign) is rebuilt, with one line on stderr saying so.
    """
    path = Path(cfg.data.cache_dir) / "tables" / f"{table_key(cfg)}.npz"
    if path.is_file():
        try:
            return ExampleTable.load(path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            print(
                f"note: the table cache {path} is unreadable ({type(e).__name__}); rebuilding it",
                file=sys.stderr,
                flush=True,
            )
            path.unlink(missing_ok=True)
    table = build_table(cfg)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        table.save(path)
    except OSError as e:
        raise DataError(
            f"data.cache_dir: cannot write the table cache {path} ({e.strerror or e}); choose "
            "a writable folder"
        ) from None
    return table
