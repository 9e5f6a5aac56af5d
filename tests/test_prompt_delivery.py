"""Prompt delivery: Flower's simulation loops hand over messages and replies when they are
stored (not on the next 0.1 s tick), with Flower's messages, order and timeouts."""

from __future__ import annotations

import threading
import time
from queue import Queue
from types import SimpleNamespace

from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fedmem.federation import prompt_delivery as pd
from fedmem.federation.linkstate_patch import _get_message_ins, applies
from tests.test_linkstate_patch import FakeState


class FakeGrid:
    """``push_messages`` / ``pull_messages`` over replies that ``reply`` stores later."""

    def __init__(self, pull_interval: float):
        self.pull_interval = pull_interval
        self.stored: list[SimpleNamespace] = []
        self.pulls = 0
        self.lock = threading.Lock()

    def push_messages(self, messages):
        return [m.id for m in messages]

    def pull_messages(self, ids):
        self.pulls += 1
        with self.lock:
            found = [r for r in self.stored if r.metadata.reply_to_message_id in ids]
            self.stored = [r for r in self.stored if r not in found]
        return found

    def reply(self, msg_id: str) -> None:
        with self.lock:
            self.stored.append(
                SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=msg_id))
            )
        pd._SIGNALS.reply_stored()


def test_replies_are_pulled_when_stored_not_after_the_pull_interval():
    grid = FakeGrid(pull_interval=5.0)
    messages = [SimpleNamespace(id=f"m{i}") for i in range(4)]

    def answer():
        for m in messages:
            time.sleep(0.02)
            grid.reply(m.id)

    threading.Thread(target=answer).start()
    t = time.perf_counter()
    got = pd.send_and_receive(grid, messages, timeout=None)
    took = time.perf_counter() - t
    assert sorted(r.metadata.reply_to_message_id for r in got) == ["m0", "m1", "m2", "m3"]
    assert took < 1.0  # Flower's loop would sleep 5 s after its first (empty) pull
    assert grid.pulls <= 1 + len(messages)


def test_a_timeout_still_ends_the_wait():
    grid = FakeGrid(pull_interval=0.05)
    t = time.perf_counter()
    got = pd.send_and_receive(grid, [SimpleNamespace(id="m0")], timeout=0.3)
    assert list(got) == [] and 0.25 < time.perf_counter() - t < 1.0


def test_extractor_hands_over_each_nodes_messages_in_node_order_when_stored(monkeypatch):
    monkeypatch.setattr(pd, "IDLE_WAIT", 5.0)
    state = FakeState([("a", 3, 1), ("b", 1, 1), ("c", 1, 1), ("d", 2, 1)], set())
    state.get_message_ins = lambda node_id, limit: _get_message_ins(state, node_id, limit)
    queue: Queue = Queue()
    f_stop = threading.Event()
    nodes = {1: 0, 2: 1, 3: 2, 4: 3}
    worker = threading.Thread(target=pd.add_messages_to_queue, args=(state, queue, nodes, f_stop))
    worker.start()
    try:
        got = [queue.get(timeout=2).id for _ in range(4)]
        assert got == ["b", "d", "a", "c"]  # one per node per pass, nodes in order (Flower's)
        time.sleep(0.05)  # the extractor now waits for a stored message
        with state.lock:
            state.message_ins_store["e"] = SimpleNamespace(
                id="e", metadata=SimpleNamespace(dst_node_id=4, run_id=1, delivered_at="")
            )
        t = time.perf_counter()
        pd._SIGNALS.ins_stored.set()
        assert queue.get(timeout=2).id == "e"
        assert time.perf_counter() - t < 1.0  # not after IDLE_WAIT (5 s)
    finally:
        f_stop.set()
        pd._SIGNALS.ins_stored.set()
        worker.join(timeout=10)
    assert not worker.is_alive()


def test_applied_only_inside_the_block(monkeypatch):
    originals = (
        vce_api.add_messages_to_queue,
        InMemoryGrid.send_and_receive,
        InMemoryLinkState.store_message_ins,
        InMemoryLinkState.store_message_res,
    )
    with pd.prompt_delivery() as active:
        assert active == applies()
        assert (vce_api.add_messages_to_queue is pd.add_messages_to_queue) == active
        assert (InMemoryGrid.send_and_receive is pd.send_and_receive) == active
        assert (InMemoryLinkState.store_message_res is not originals[3]) == active
    assert originals == (
        vce_api.add_messages_to_queue,
        InMemoryGrid.send_and_receive,
        InMemoryLinkState.store_message_ins,
        InMemoryLinkState.store_message_res,
    )
    monkeypatch.setenv("FEDMEM_FLOWER_LINKSTATE", "original")
    with pd.prompt_delivery() as active:
        assert not active and vce_api.add_messages_to_queue is originals[0]
