"""The client path's fast ArrayRecord conversion and model reuse (issue 16, goal 1): the same
bytes and values as Flower's own conversion, in-memory arrays only for replies that stay in
the process, and a reused client model trains exactly like a fresh one. No Ray starts here."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedmem import config
from fedmem.federation import client_app
from fedmem.federation.arrays import (
    HeldArray,
    NpyArray,
    array_values,
    in_process,
    record_of,
    replies_in_process,
    state_dict_of,
)
from fedmem.federation.engine import run_federated
from tests.conftest import REPO, federated_job, small_overrides

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(300)]

VALUES = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.arange(12, dtype=np.float64).reshape(3, 4).T,  # Fortran order: np.save's own layout
    np.array(2.5, dtype=np.float32),  # 0-d
    np.zeros((2, 0, 3), dtype=np.float32),  # empty
    np.array([True, False]),
    np.arange(5, dtype=np.int64),
    np.array([1.5, -2.0], dtype=np.float16),
]


@pytest.mark.parametrize("values", VALUES, ids=lambda v: f"{v.dtype}{v.shape}")
def test_arrays_match_flowers_own_conversion(values):
    plain = Array(values)
    (made,) = record_of({"t": torch.from_numpy(values)}).values()
    assert type(made) is (NpyArray if values.flags.c_contiguous else Array)
    assert (made.dtype, made.shape, made.stype, made.data) == (
        plain.dtype,
        plain.shape,
        plain.stype,
        plain.data,
    )
    for _ in range(2):  # the header parse is cached after the first call
        out = array_values(plain)
        expected = plain.numpy()
        assert out.dtype == expected.dtype and out.shape == expected.shape
        assert np.array_equal(out, expected) and out.flags.writeable
    out[...] = ~out if out.dtype == bool else out + 1  # a copy: the bytes do not change
    assert np.array_equal(plain.numpy(), values)
    # what Flower's aggregation calls on a reply: the same values, a writable copy, also
    # after the array travelled pickled (as a Ray simulation moves messages)
    for arr in (made, pickle.loads(pickle.dumps(made))):
        assert type(arr) is type(made)
        got, expected = arr.numpy(), plain.numpy()
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert np.array_equal(got, expected) and got.flags.writeable
        got[...] = 0
        assert np.array_equal(arr.numpy(), values)


def test_state_dict_of_equals_to_torch_state_dict():
    state = {"w": torch.randn(5, 3), "b": torch.randn(5), "n": torch.tensor(7)}
    for record in (ArrayRecord(state), record_of(state, held=True)):
        ours, flowers = state_dict_of(record), record.to_torch_state_dict()
        assert list(ours) == list(flowers)
        for name, t in flowers.items():
            assert ours[name].dtype == t.dtype and torch.equal(ours[name], t)


def test_held_arrays_only_in_process():
    assert not replies_in_process()
    with in_process():
        assert replies_in_process()
    assert not replies_in_process()
    state = {"w": torch.ones(3)}
    held = record_of(state, held=True)["w"]
    assert isinstance(held, HeldArray) and held.data == Array(state["w"].numpy()).data


def _run(tmp_path, *extra: str):
    cfg = config.load(REPO / "configs" / "default.yaml", [*small_overrides(tmp_path), *extra])
    job, rows, clients = federated_job(cfg)
    run_federated(job)
    for row in rows + clients:
        row.pop("wall_s", None)
        row.pop("train_s", None)
    return rows, clients, job.final_state


@pytest.mark.parametrize("extra", [(), ("train.proximal_mu=0.1", "federation.strategy=fedprox")])
def test_reused_client_model_trains_like_a_fresh_one(tmp_path, monkeypatch, extra):
    overrides = ("federation.backend=local", *extra)
    reused = _run(tmp_path, *overrides)
    monkeypatch.setattr(client_app, "reusable", lambda *a: False)
    fresh = _run(tmp_path, *overrides)
    assert reused[0] == fresh[0] and reused[1] == fresh[1]
    for name, t in fresh[2].items():
        assert torch.equal(reused[2][name], t), name
