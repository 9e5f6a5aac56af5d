"""Events and onsets from per-example trajectories (``(R, N)`` arrays, rounds x examples).

Input is what :meth:`fedmem.analysis.tracking.TrajectoryRecorder.to_arrays` returns (numpy) or
the same as torch tensors; outputs are numpy arrays and plain Python numbers (JSON-ready).

- Learning time: the first recorded round from which an example stays correct to the end, the
  "first-split learning time" of Maini, Garg, Lipton, Kolter 2022, "Characterizing Datapoints
  via Second-Split Forgetting" (NeurIPS), Sec. 3; the "learned" event of Toneva et al. 2019 and
  the learning-speed ordering of Jiang et al. 2021 ("Characterizing Structural Regularities of
  Labeled Data in Overparameterized Models", ICML).
- Forgetting events: Toneva et al. 2019, "An Empirical Study of Example Forgetting during Deep
  Neural Network Learning" (ICLR), Def. 1 (correct at t, incorrect at t+1).
- Early-learning onset: Liu et al. 2020, "Early-Learning Regularization Prevents Memorization of
  Noisy Labels" (NeurIPS), Fig. 1: the share of mislabeled examples predicted as their *true*
  label first rises (early learning) and then falls as the wrong labels get memorized; the onset
  is the round where it peaks. Arpit et al. 2017 ("A Closer Look at Memorization in Deep
  Networks", ICML) describe the same order: patterns first, noise later.

Events are measured between *recorded* rounds (full evaluations of the global model), not
between mini-batch presentations as in Toneva et al.: a forgetting event that is undone within a
round is invisible, so counts are lower bounds of theirs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fedmem.data.table import ExampleTable


def _np(a: Any) -> np.ndarray:
    """A numpy view of a numpy array, torch tensor (any device) or sequence."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _curve(values: Sequence[float | None]) -> np.ndarray:
    """Float array with None -> NaN."""
    return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)


def _check_rounds(num: int, rounds: Any) -> np.ndarray:
    r = _np(rounds).astype(np.int64).reshape(-1)
    if len(r) != num:
        raise ValueError(f"rounds has {len(r)} entries but the trajectory has {num} rows")
    return r


def learning_time(correct: Any, rounds: Any) -> np.ndarray:
    """(N,) int64: the round from which each example is correct at every later recorded round.

    Maini et al. 2022 (NeurIPS), first-split learning time:
    ``T_i = min{t* : correct_i(t) for all t >= t*}``, here over the recorded ``rounds``.
    ``-1`` when the example is incorrect at the last recorded round (not learned).
    Example (rounds 0, 1, 2): ``[F, T, T] -> 1``, ``[T, F, T] -> 2``, ``[T, T, F] -> -1``.
    """
    c = _np(correct).astype(bool)
    r = _check_rounds(len(c), rounds)
    if len(c) == 0:
        return np.full(c.shape[1:] if c.ndim == 2 else (0,), -1, dtype=np.int64)
    # stays[t, i] = correct_i(t') for every t' >= t  (suffix AND along rounds)
    stays = np.logical_and.accumulate(c[::-1], axis=0)[::-1]
    streak = stays.sum(0)  # length of the final all-correct run
    first = np.clip(len(c) - streak, 0, len(c) - 1)
    return np.where(streak > 0, r[first], -1).astype(np.int64)


def forgetting_events(correct: Any) -> np.ndarray:
    """(N,) int64: correct -> incorrect transitions between consecutive recorded rounds.

    Toneva et al. 2019 (ICLR), Def. 1: example i undergoes a forgetting event at t when
    ``acc_i(t) > acc_i(t+1)``.
    """
    c = _np(correct).astype(bool)
    if len(c) < 2:
        return np.zeros(c.shape[1:] if c.ndim == 2 else (0,), dtype=np.int64)
    return (c[:-1] & ~c[1:]).sum(0).astype(np.int64)


def never_learned(correct: Any) -> np.ndarray:
    """(N,) bool: examples never correct at any recorded round.

    Toneva et al. 2019 (ICLR), Sec. 3: such examples are counted as "never learned" (they
    assign them an infinite number of forgetting events when ranking).
    """
    c = _np(correct).astype(bool)
    return ~c.any(0)


def early_learning_onset(noisy_true_acc: Sequence[float | None], rounds: Any) -> int | None:
    """The round where ``noisy_true_acc`` (mislabeled examples predicted as their true label)
    peaks: the end of early learning, Liu et al. 2020 (ELR, NeurIPS), Fig. 1.

    The first such round on ties; None/NaN entries are skipped; None if no value is known.
    """
    vals = _curve(noisy_true_acc)
    r = _check_rounds(len(vals), rounds)
    if np.isnan(vals).all():
        return None
    return int(r[int(np.nanargmax(vals))])


def memorization_onset(
    noisy_memorized: Sequence[float | None], rounds: Any, share: float
) -> int | None:
    """The first round where ``noisy_memorized`` (mislabeled examples predicted as their
    given wrong label) exceeds ``share`` (strictly); None if it never does.

    The memorization phase of Liu et al. 2020 (ELR), Fig. 1 / Arpit et al. 2017: the threshold
    turns the rising memorization curve into one round.
    """
    vals = _curve(noisy_memorized)
    r = _check_rounds(len(vals), rounds)
    above = np.nan_to_num(vals, nan=-math.inf) > share
    return int(r[int(np.argmax(above))]) if above.any() else None


def table_groups(table: ExampleTable) -> dict[str, Any]:
    """The example kinds of an ExampleTable as masks: clean, mislabeled, outlier, canary (and
    audit_canary when the run has audit canaries)."""
    groups = {
        "clean": table.is_clean,
        "mislabeled": table.is_noisy,
        "outlier": table.is_outlier,
        "canary": table.is_canary,
    }
    if bool(table.is_audit_canary.any()):
        groups["audit_canary"] = table.is_audit_canary
    return groups


def group_summary(
    learning_time: Any, forgetting: Any, groups: Mapping[str, Any]
) -> dict[str, dict[str, float | int | None]]:
    """Per group (e.g. :func:`table_groups`): learning time and forgetting by example kind.

    For each ``name -> mask``: ``count``; ``share_learned`` (learning time >= 0, i.e. correct
    from some round to the end); ``mean_learning_time`` over the learned examples only;
    ``mean_forgetting`` (Toneva et al. 2019 forgetting events) over all examples of the group.
    Mislabeled examples are learned late (Jiang et al. 2021; Maini et al. 2022) and forgotten
    often (Toneva et al. 2019). Empty groups / no learned example give None.
    """
    lt = _np(learning_time).astype(np.int64)
    fg = _np(forgetting).astype(np.float64)
    out: dict[str, dict[str, float | int | None]] = {}
    for name, mask in groups.items():
        m = _np(mask).astype(bool)
        count = int(m.sum())
        learned = m & (lt >= 0)
        n_learned = int(learned.sum())
        out[name] = {
            "count": count,
            "share_learned": n_learned / count if count else None,
            "mean_learning_time": float(lt[learned].mean()) if n_learned else None,
            "mean_forgetting": float(fg[m].mean()) if count else None,
        }
    return out


def per_client_onsets(
    correct_obs: Any,
    correct_true: Any,
    is_noisy: Any,
    client: Any,
    rounds: Any,
    share: float,
) -> dict[int, dict[str, float | int | None]]:
    """Early-learning and memorization onsets per client, from its mislabeled examples only.

    For every client ``k`` present in ``client``: the curves ``noisy_true_acc_k(t)`` and
    ``noisy_memorized_k(t)`` (shares of k's mislabeled examples predicted as their true / given
    label) and from them ``early_learning_onset`` (:func:`early_learning_onset`, Liu et al.
    2020 Fig. 1 per client) and ``memorization_onset`` (:func:`memorization_onset` at
    ``share``). Also ``num_noisy`` and ``peak_noisy_true_acc``. Clients without mislabeled
    examples get None onsets.

    The per-client curves come from one ``bincount`` over (round, client) cells, so the cost is
    O(R * #mislabeled), independent of the number of clients.
    """
    co = _np(correct_obs).astype(bool)
    ct = _np(correct_true).astype(bool)
    noisy = _np(is_noisy).astype(bool)
    cl = _np(client).astype(np.int64)
    r = _check_rounds(len(co), rounds)
    if co.shape != ct.shape or co.shape[1:] != noisy.shape or noisy.shape != cl.shape:
        raise ValueError(
            f"shape mismatch: correct_obs {co.shape}, correct_true {ct.shape}, "
            f"is_noisy {noisy.shape}, client {cl.shape}"
        )
    clients, idx = np.unique(cl, return_inverse=True)
    k, num_rounds = len(clients), len(r)
    nidx = idx[noisy]
    counts = np.bincount(nidx, minlength=k)
    cell = (np.arange(num_rounds)[:, None] * k + nidx[None, :]).ravel()

    def per_client_share(c: np.ndarray) -> np.ndarray:
        hits = np.bincount(cell, weights=c[:, noisy].ravel(), minlength=num_rounds * k)
        with np.errstate(invalid="ignore", divide="ignore"):
            return hits.reshape(num_rounds, k) / counts  # NaN where a client has no noisy row

    true_acc, memorized = per_client_share(ct), per_client_share(co)
    out: dict[int, dict[str, float | int | None]] = {}
    for j, c in enumerate(clients.tolist()):
        n = int(counts[j])
        onset = early_learning_onset(true_acc[:, j].tolist(), r) if n else None
        out[int(c)] = {
            "num_noisy": n,
            "early_learning_onset": onset,
            "peak_noisy_true_acc": float(np.nanmax(true_acc[:, j])) if n and num_rounds else None,
            "memorization_onset": memorization_onset(memorized[:, j].tolist(), r, share)
            if n
            else None,
        }
    return out
