"""The faster message lookup for Flower's in-memory link state returns what Flower's own
method returns, validates only the asked node's messages, and is applied only while a Ray
simulation runs."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

from fedmem.federation.linkstate_patch import _get_message_ins, applies, fast_message_lookup


class FakeState:
    """The parts of InMemoryLinkState that ``get_message_ins`` touches; messages whose id is in
    ``expired`` are deleted by the validation, like Flower's expired messages."""

    def __init__(self, messages: list[tuple[str, int, int]], expired: set[str]):
        self.lock = threading.RLock()
        self.message_ins_store = {
            mid: SimpleNamespace(
                id=mid, metadata=SimpleNamespace(dst_node_id=node, run_id=run, delivered_at="")
            )
            for mid, node, run in messages
        }
        self.expired = expired
        self.checked: list[str] = []

    def _check_stored_messages(self, ids: set[str], run_id: int | None = None) -> None:
        for mid in ids:
            self.checked.append(mid)
            if mid in self.expired:
                self.message_ins_store.pop(mid, None)


MESSAGES = [
    (f"m{i}", node, run)
    for i, (node, run) in enumerate([(1, 7), (2, 7), (1, 7), (3, 7), (2, 8), (1, 7), (3, 7)])
]


@pytest.mark.parametrize("limit", [1, 2, None])
def test_same_messages_as_flowers_lookup(limit):
    ours, flowers = FakeState(MESSAGES, {"m2"}), FakeState(MESSAGES, {"m2"})
    for node, run in [(1, None), (2, 7), (3, None), (1, None), (2, None), (1, None), (4, None)]:
        got = [m.id for m in _get_message_ins(ours, node, limit, run_id=run)]
        want = [m.id for m in InMemoryLinkState.get_message_ins(flowers, node, limit, run_id=run)]
        assert got == want
    for mid, msg in ours.message_ins_store.items():  # same delivered / left / expired messages
        assert (msg.metadata.delivered_at == "") == (
            flowers.message_ins_store[mid].metadata.delivered_at == ""
        )
    assert set(ours.message_ins_store) == set(flowers.message_ins_store)


def test_only_the_nodes_own_messages_are_validated():
    state = FakeState(MESSAGES, set())
    assert [m.id for m in _get_message_ins(state, 3, 1)] == ["m3"]
    assert state.checked == ["m3"]  # Flower's method validates m0, m1, m2, m3
    flowers = FakeState(MESSAGES, set())
    InMemoryLinkState.get_message_ins(flowers, 3, 1)
    assert flowers.checked == ["m0", "m1", "m2", "m3"]
    with pytest.raises(AssertionError):
        _get_message_ins(state, 3, 0)


def test_applied_only_inside_the_block(monkeypatch):
    original = InMemoryLinkState.get_message_ins
    with fast_message_lookup() as active:
        assert active == applies()
        assert (InMemoryLinkState.get_message_ins is _get_message_ins) == active
    assert InMemoryLinkState.get_message_ins is original
    monkeypatch.setenv("FEDMEM_FLOWER_LINKSTATE", "original")
    with fast_message_lookup() as active:
        assert not active and InMemoryLinkState.get_message_ins is original
