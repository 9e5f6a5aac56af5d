"""A faster message lookup for Flower's in-memory link state, for the Ray simulation only.

Flower's simulation engine (``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``)
asks the link state for every node's next message ten times a second, and Flower 1.42's
``InMemoryLinkState.get_message_ins`` validates *every* stored message on each of those calls
(expiry and federation membership, ``_check_stored_messages``) before it looks at the
destination. With ``n`` nodes and ``n`` stored messages that is ``n^2`` validations per tick:
at 100 clients it was most of the driver's CPU (benchmarks/README.md, ``federation_overhead``).

:func:`fast_message_lookup` replaces the method, while a simulation runs, by one that first
selects the node's own undelivered messages (a dict scan without validation) and validates only
those, in the same order, with the same limit and the same ``delivered_at`` stamp. Messages for
other nodes are validated when their own node is asked, as Flower's own loop does every tick;
replies, expiry and federation checks are Flower's code. Applied only to the pinned Flower
version it was written against (``flwr>=1.42,<1.43`` in pyproject.toml); any other version
keeps Flower's method untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

SUPPORTED = ("1.42.",)


def _get_message_ins(
    self: Any, node_id: int, limit: int | None, *, run_id: int | None = None
) -> list[Any]:
    """``InMemoryLinkState.get_message_ins`` validating only ``node_id``'s messages."""
    from flwr.supercore.date import now

    if limit is not None and limit < 1:
        raise AssertionError("`limit` must be >= 1")
    found: list[Any] = []
    with self.lock:
        mine = [
            msg_id
            for msg_id, msg in self.message_ins_store.items()
            if msg.metadata.dst_node_id == node_id
            and msg.metadata.delivered_at == ""
            and (run_id is None or msg.metadata.run_id == run_id)
        ]
        for msg_id in mine:
            self._check_stored_messages({msg_id})  # Flower's validation; may delete it
            if (msg := self.message_ins_store.get(msg_id)) is not None:
                found.append(msg)
            if limit and len(found) == limit:
                break
    delivered_at = now().isoformat()
    for msg in found:
        msg.metadata.delivered_at = delivered_at
    return found


def applies() -> bool:
    """The pinned Flower version, unless ``FEDMEM_FLOWER_LINKSTATE=original`` (benchmarks)."""
    import os

    import flwr

    if os.environ.get("FEDMEM_FLOWER_LINKSTATE") == "original":
        return False
    return str(flwr.__version__).startswith(SUPPORTED)


@contextlib.contextmanager
def fast_message_lookup() -> Iterator[bool]:
    """Within the block, Flower's in-memory link state uses :func:`_get_message_ins`; yields
    whether it does (False on an unsupported Flower version)."""
    if not applies():
        yield False
        return
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    original = InMemoryLinkState.get_message_ins
    InMemoryLinkState.get_message_ins = _get_message_ins  # type: ignore[method-assign]
    try:
        yield True
    finally:
        InMemoryLinkState.get_message_ins = original  # type: ignore[method-assign]
