"""The in-process runtime: Flower's `Grid` interface with no Ray and no polling.

Flower's simulation delivers each Message through a LinkState that is polled every
0.1 s and runs ClientApps in Ray actors, which costs about 1.1 s per round on a
2-core machine even for clients that do nothing. Here `push_messages` calls the
ClientApp directly, in this process, and keeps each node's `Context` (and so its
`context.state`: accountant history, SCAFFOLD control variates) across rounds.

A client that raises never hangs the run: the exception becomes an error reply
carrying the node, partition and full traceback. A `FedsimError` (bad input
discovered on the client, e.g. a bag larger than the client's data) is re-raised
as it is, so the CLI can print its one line.
"""

from __future__ import annotations

import traceback
import uuid
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedsim.errors import FedsimError

SERVER_NODE_ID = 1  # Flower's SUPERLINK_NODE_ID
NODE_ID_OFFSET = 1000  # simulated node ids are 1000 + partition id


class InProcessGrid(Grid):
    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict, run_id: int = 1) -> None:
        self.client_app = client_app
        self._run_id = run_id
        self.contexts = {
            NODE_ID_OFFSET + pid: Context(run_id=run_id, node_id=NODE_ID_OFFSET + pid,
                                          node_config={"partition-id": pid, "num-partitions": num_nodes},
                                          state=RecordDict(), run_config=dict(run_config))
            for pid in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SERVER_NODE_ID

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return getattr(self, "_run", None)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg_id = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = msg_id
            self._replies[msg_id] = self._deliver(msg)
            ids.append(msg_id)
        return ids

    def _deliver(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        context = self.contexts.get(node)
        if context is None:
            return Message(Error(code=404, reason=f"no node {node}"), reply_to=msg)
        try:
            reply = self.client_app(msg, context)
        except FedsimError:
            raise
        except Exception:  # noqa: BLE001 - any client exception becomes an error reply
            return Message(Error(code=500, reason=traceback.format_exc()), reply_to=msg)
        return reply

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))
