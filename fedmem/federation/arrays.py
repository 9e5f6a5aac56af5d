"""Torch state dicts <-> Flower ArrayRecords without an ``np.save`` / ``np.load`` per tensor.

A :class:`flwr.app.Array` holds its values as ``np.save`` bytes: ``ArrayRecord(state_dict)``
writes every tensor with ``np.save`` and ``Array.numpy`` reads it back with ``np.load``, whose
header parse (``ast.literal_eval``) costs more than the copy for the small tensors of a client
model. Here the header is made and parsed once per (dtype, shape), with the same results:

- :func:`record_of`: the ArrayRecord ``ArrayRecord(state)`` gives (same keys, order, dtypes,
  shapes and bytes); with ``held=True`` (:class:`HeldArray` values) for messages that never
  leave this process;
- :func:`state_dict_of`: ``record.to_torch_state_dict()`` (same values, writable tensors);
- :func:`in_process` / :func:`replies_in_process`: an in-process Grid (``LocalGrid``) marks the
  ClientApp calls whose replies stay in this process, so the client may answer with
  :class:`HeldArray` values (Flower's aggregation then reads them without parsing bytes). A
  reply that Flower transports (Ray, ``flwr run``) always holds plain ``Array`` values.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from io import BytesIO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

_headers: dict[tuple[str, tuple[int, ...]], bytes] = {}
# npy header bytes -> (dtype, shape, element count), None: let np.load read it
_parsed: dict[bytes, tuple[np.dtype, tuple[int, ...], int] | None] = {}
_MAX_CACHED = 4096  # distinct (dtype, shape) pairs kept; a model has a few dozen

_IN_PROCESS: ContextVar[bool] = ContextVar("fedmem_replies_in_process", default=False)


@contextmanager
def in_process() -> Iterator[None]:
    """Within: replies made here stay in this process (an in-process Grid's ClientApp call)."""
    token = _IN_PROCESS.set(True)
    try:
        yield
    finally:
        _IN_PROCESS.reset(token)


def replies_in_process() -> bool:
    return _IN_PROCESS.get()


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The ``np.save`` header of an array of this dtype and shape (cached)."""
    key = (np.dtype(dtype).str, tuple(shape))
    if key not in _headers:
        if len(_headers) >= _MAX_CACHED:
            _headers.clear()
        buf = BytesIO()
        np.save(buf, np.zeros(shape, dtype=dtype), allow_pickle=False)
        data = buf.getvalue()
        _headers[key] = data[: len(data) - np.zeros(shape, dtype=dtype).nbytes]
    return _headers[key]


class HeldArray(Array):
    """An :class:`flwr.app.Array` made in memory from an ndarray it keeps (not a copy: the
    caller hands it over and does not change it). ``data`` is exactly the bytes
    ``Array(ndarray)`` holds (``np.save`` format), made on first access (in one process nothing
    reads it: messages are not serialized); :meth:`numpy` returns a copy of the values instead
    of parsing ``data`` (the parse dominates the cost of aggregating many small arrays)."""

    def __init__(self, values: np.ndarray):  # noqa: D107 (the fields as Array's)
        if not values.flags.c_contiguous:
            values = values.copy(order="C")  # (np.ascontiguousarray makes 0-d arrays 1-d)
        # the fields Array.__init__ sets, without its argument dispatch; data comes on demand
        self.__dict__.update(
            dtype=_dtype_name(values.dtype),
            shape=values.shape,  # a tuple of ints
            stype=SType.NUMPY,
            _values=values,
        )

    @property  # type: ignore[override]
    def data(self) -> bytes:  # the np.save bytes of the values
        d = self.__dict__
        if "_data" not in d:
            values = d["_values"]
            d["_data"] = b"".join((npy_header(values.dtype, values.shape), values.data))
        return d["_data"]

    @data.setter
    def data(self, value: bytes) -> None:  # new bytes replace the values
        self.__dict__["_data"] = value
        self.__dict__.pop("_values", None)

    def numpy(self) -> np.ndarray:
        values = self.__dict__.get("_values")
        return values.copy() if values is not None else super().numpy()


def held_record(state: Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of CPU tensors (or ndarrays), as ``ArrayRecord(state)`` holds them (same
    keys, order and bytes), built from :class:`HeldArray` values (which share their memory).

    The values go into the record's dict directly: Flower's ``TypedDict.__setitem__`` only
    checks ``isinstance(key, str)`` and ``isinstance(value, Array)``, true here by
    construction, but builds a ``typing`` alias on every call (most of the cost of a record
    of a few small tensors)."""
    record = ArrayRecord()
    items = {
        str(name): HeldArray(t if isinstance(t, np.ndarray) else t.detach().numpy())
        for name, t in state.items()
    }
    record.__dict__["_data"].update(items)
    return record


_DTYPE_NAMES: dict[str, str] = {}


def _dtype_name(dtype: np.dtype) -> str:
    """``str(dtype)``, cached by the array-protocol string (``'<f4'``): numpy's ``__str__``
    is slow, and so is comparing the dtype objects of tensors' arrays as dict keys."""
    key = dtype.str
    name = _DTYPE_NAMES.get(key)
    if name is None:
        name = _DTYPE_NAMES[key] = str(dtype)
    return name


class NpyArray(Array):
    """An :class:`flwr.app.Array` (the same fields and ``np.save`` bytes, which it holds and
    which travel with it) whose :meth:`numpy` reads the values with the parsed header from the
    cache instead of ``np.load`` (whose header parse, ``ast.literal_eval``, costs more than the
    copy for a client model's small arrays). Where Flower pickles messages (its Ray
    simulation) the class travels with them, so the server's aggregation reads replies this
    way; a message that Flower serializes itself (``flwr run``) arrives as a plain Array."""

    def numpy(self) -> np.ndarray:
        return array_values(self)


def plain_array(values: np.ndarray) -> Array:
    """``Array(values)`` (the same fields and bytes) with the header from the cache, as an
    :class:`NpyArray`."""
    if not values.flags.c_contiguous or values.dtype.hasobject:
        return Array(values)  # np.save's own layout (Fortran order) or refusal
    data = b"".join((npy_header(values.dtype, values.shape), values.data))
    return NpyArray(
        dtype=_dtype_name(values.dtype),
        shape=values.shape,
        stype=SType.NUMPY,
        data=data,
    )


def record_of(state: dict[str, torch.Tensor], *, held: bool = False) -> ArrayRecord:
    """``ArrayRecord(state)`` (tensors on any device). ``held``: :class:`HeldArray` values
    sharing the memory of CPU tensors, for a record that stays in this process and whose
    tensors nobody changes afterwards; else plain Arrays holding their own bytes."""
    record = ArrayRecord()
    for name, t in state.items():
        values = t.detach().cpu().numpy()
        record[name] = HeldArray(values) if held else plain_array(values)
    return record


def _parse(header: bytes) -> tuple[np.dtype, tuple[int, ...], int] | None:
    fp = BytesIO(header)
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        return None
    if fortran or dtype.hasobject:
        return None
    return dtype, tuple(shape), int(np.prod(shape, dtype=np.int64))


def array_values(array: Array) -> np.ndarray:
    """``array.numpy()``: a new writable ndarray of the values."""
    held = array.__dict__.get("_values")
    if held is not None:
        return held.copy()
    data = array.data
    if array.stype != SType.NUMPY or len(data) < 12 or data[:6] != b"\x93NUMPY":
        return Array.numpy(array)
    # npy: magic, version (2 bytes), header length (2 bytes in version 1, else 4), header
    end = (
        10 + int.from_bytes(data[8:10], "little")
        if data[6] == 1
        else 12 + int.from_bytes(data[8:12], "little")
    )
    header = data[:end]
    if header not in _parsed:
        if len(_parsed) >= _MAX_CACHED:
            _parsed.clear()
        _parsed[header] = _parse(header)
    parsed = _parsed[header]
    if parsed is None:
        return Array.numpy(array)
    dtype, shape, count = parsed
    return np.frombuffer(data, dtype=dtype, count=count, offset=end).reshape(shape).copy()


def state_dict_of(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """``record.to_torch_state_dict()``: CPU tensors with their own (writable) memory."""
    return {name: torch.from_numpy(array_values(a)) for name, a in record.items()}
