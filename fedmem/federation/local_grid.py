"""An in-process Flower Grid: the same ServerApp and ClientApp, no Ray, no message transport.

``flwr.serverapp.Grid`` is a public interface; :class:`LocalGrid` implements it by calling the
ClientApp (``client_app(message, context)``) directly, one node after another, in the driver
process, with a persistent ``Context`` per node (so ``context.state`` survives rounds exactly
as in the simulation engine). A client that raises yields an error reply, as in Flower's
simulation runtime. Use it (``federation.backend=local``) for fast sweeps and tests on one
machine; use the Ray backend for parallel clients, GPUs and clusters.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from uuid import uuid4

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedmem.federation.arrays import in_process

RUN_ID = 1
FIRST_NODE_ID = 1000  # node ids must differ from SUPERLINK_NODE_ID


class LocalGrid(Grid):
    """Node ``FIRST_NODE_ID + k`` holds partition ``k``.

    ``client_threads``: torch threads while a client runs (as a Ray actor with ``num_cpus``
    would use; the driver's own count is restored afterwards), so both backends compute the
    same floating-point numbers.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, client_threads: int | None = None):
        self.client_app = client_app
        self.client_threads = client_threads
        self.contexts = {
            node_id: Context(
                run_id=RUN_ID,
                node_id=node_id,
                node_config={"partition-id": node_id - FIRST_NODE_ID, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for node_id in range(FIRST_NODE_ID, FIRST_NODE_ID + num_nodes)
        }
        self._run = Run.create_empty(RUN_ID)
        self._replies: dict[str, Message] = {}
        # what Flower's simulation sets for the ServerApp's process (new Messages read it)
        TaskIdentity.task_id, TaskIdentity.run_id = 1, RUN_ID
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def _deliver(self, msg: Message) -> Message:
        meta = msg.metadata.__dict__
        meta["_message_id"] = str(uuid4())
        meta["_created_at"] = time.time()
        context = self.contexts[msg.metadata.dst_node_id]
        driver_threads = torch.get_num_threads()
        if self.client_threads:
            torch.set_num_threads(self.client_threads)
        try:
            with in_process():  # the reply is not serialized: it may hold arrays in memory
                reply = self.client_app(msg, context)
        except Exception as ex:  # reported, not raised, as in Flower's simulation runtime
            reason = f"{type(ex)}:<'{ex}'>"
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg
            )
        finally:
            torch.set_num_threads(driver_threads)
        return reply

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            reply = self._deliver(msg)
            self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return list(self.pull_messages(self.push_messages(messages)))
