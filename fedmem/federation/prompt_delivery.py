"""Messages delivered when they are stored, not on Flower's next 0.1 s tick (Ray simulation).

In Flower 1.42's simulation a round's messages wait on two polling loops: the engine's
extractor thread (``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``) asks the
link state for every node's next message and then sleeps 0.1 s, and the ServerApp's
``InMemoryGrid.send_and_receive`` pulls the replies and sleeps ``pull_interval`` (0.1 s)
between pulls. A round so waits 0.05 + 0.05 s on average and up to 0.2 s for nothing: with 100
clients on this machine ~0.1 s of a 0.5 s round (``benchmarks/engine.py``).

:func:`prompt_delivery` keeps both loops and their semantics and wakes them when there is
something to do:

- storing a message (``InMemoryLinkState.store_message_ins``, Flower's method, then a signal)
  wakes the extractor, which asks every node that has an undelivered message for one
  (``get_message_ins(node_id, limit=1)``, in node order, as Flower's loop does) and scans again
  at once while it finds any; otherwise it waits for the next signal (at most
  :data:`IDLE_WAIT` s, so ``f_stop`` is seen);
- storing a reply (``store_message_res``) counts it; ``send_and_receive`` pulls as Flower's
  does and, while replies are missing, waits until as many replies as are missing were stored
  since its last pull (or ``pull_interval`` passed), then pulls again. A reply counted early
  (another caller's, or one pulled already) only causes an extra pull.

Messages, replies, their order per node, timeouts and errors are Flower's; only the waiting
changes. Applied with :func:`fedmem.federation.linkstate_patch.fast_message_lookup`'s version pin
and switch (``FEDMEM_FLOWER_LINKSTATE=original`` runs Flower's loops unchanged).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator
from queue import Queue
from typing import Any

from fedmem.federation.linkstate_patch import applies

IDLE_WAIT = 0.5  # s: the extractor's longest sleep without a stored message (sees f_stop)


class _Signals:
    """Stored messages (an event) and the number of stored replies (a condition)."""

    def __init__(self) -> None:
        self.ins_stored = threading.Event()
        self.res = threading.Condition()
        self.res_count = 0

    def reply_stored(self) -> None:
        with self.res:
            self.res_count += 1
            self.res.notify_all()

    def wait_replies(self, target: int, timeout: float) -> None:
        with self.res:
            self.res.wait_for(lambda: self.res_count >= target, timeout)


_SIGNALS = _Signals()


def _pending_nodes(state: Any) -> set[int]:
    """Nodes with an undelivered message in ``state`` (one scan of its store)."""
    with state.lock:
        return {
            msg.metadata.dst_node_id
            for msg in state.message_ins_store.values()
            if msg.metadata.delivered_at == ""
        }


def add_messages_to_queue(
    state: Any, queue: Queue, nodes_mapping: dict[int, int], f_stop: threading.Event
) -> None:
    """Flower's extractor loop, woken by stored messages instead of a 0.1 s sleep."""
    signals = _SIGNALS
    while not f_stop.is_set():
        signals.ins_stored.clear()
        pending = _pending_nodes(state)
        found = 0
        for node_id in nodes_mapping:
            if node_id not in pending:
                continue
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
                found += 1
        if not found:
            signals.ins_stored.wait(IDLE_WAIT)


def send_and_receive(
    self: Any, messages: Iterable[Any], *, timeout: float | None = None
) -> Iterable[Any]:
    """``InMemoryGrid.send_and_receive`` waiting for stored replies instead of sleeping."""
    signals = _SIGNALS
    msg_ids = set(self.push_messages(messages))
    del messages
    end_time = time.time() + (timeout if timeout is not None else 0.0)
    ret: list[Any] = []
    while timeout is None or time.time() < end_time:
        seen = signals.res_count
        res_msgs = self.pull_messages(msg_ids)
        ret.extend(res_msgs)
        msg_ids.difference_update({msg.metadata.reply_to_message_id for msg in res_msgs})
        if len(msg_ids) == 0:
            break
        wait = self.pull_interval
        if timeout is not None:
            wait = max(0.0, min(wait, end_time - time.time()))
        signals.wait_replies(seen + len(msg_ids), wait)
    return ret


@contextlib.contextmanager
def prompt_delivery() -> Iterator[bool]:
    """Within the block, Flower's simulation delivers messages and replies when they are
    stored; yields whether it does (False on an unsupported Flower version)."""
    if not applies():
        yield False
        return
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    store_ins, store_res = InMemoryLinkState.store_message_ins, InMemoryLinkState.store_message_res

    def store_message_ins(self: Any, message: Any) -> Any:
        try:
            return store_ins(self, message)
        finally:
            _SIGNALS.ins_stored.set()

    def store_message_res(self: Any, message: Any) -> Any:
        try:
            return store_res(self, message)
        finally:
            _SIGNALS.reply_stored()

    originals = (vce_api.add_messages_to_queue, InMemoryGrid.send_and_receive)
    vce_api.add_messages_to_queue = add_messages_to_queue
    InMemoryGrid.send_and_receive = send_and_receive  # type: ignore[method-assign]
    InMemoryLinkState.store_message_ins = store_message_ins  # type: ignore[method-assign]
    InMemoryLinkState.store_message_res = store_message_res  # type: ignore[method-assign]
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue, InMemoryGrid.send_and_receive = originals
        InMemoryLinkState.store_message_ins = store_ins  # type: ignore[method-assign]
        InMemoryLinkState.store_message_res = store_res  # type: ignore[method-assign]
