"""The in-process runtime: Flower's `Grid` interface with no Ray and no polling.

Flower's simulation delivers each Message through a LinkState that is polled every
0.1 s and runs ClientApps in Ray actors, which costs about 1.1 s per round on a
2-core machine even for clients that do nothing. Here `push_messages` calls the
ClientApp directly, in this process, and keeps each node's `Context` (and so its
`context.state`: accountant history, SCAFFOLD control variates) across rounds.

Train messages of a round are handed over together to `train_round` (the ClientApp
module's round handler), so the vectorized engine can train them at once; discovery and
any other message go through the ClientApp one by one.

A client that raises never hangs the run: the exception becomes an error reply
carrying the node, partition and full traceback. A `FedsimError` (bad input
discovered on the client, e.g. a bag larger than the client's data) is re-raised
as it is, so the CLI can print its one line.
"""

from __future__ import annotations

import itertools
import traceback
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedsim.errors import FedsimError

SERVER_NODE_ID = 1  # Flower's SUPERLINK_NODE_ID
NODE_ID_OFFSET = 1000  # simulated node ids are 1000 + partition id


RoundHandler = Callable[[list[tuple[Message, Context]]], list[Message]]


def assign_message_id(msg: Message, message_id: str) -> None:
    """Give a message the id a SuperLink would. Flower's Metadata has no public setter for it
    (the LinkState assigns ids); this is the one place fedsim writes it."""
    msg.metadata.__dict__["_message_id"] = message_id


class InProcessGrid(Grid):
    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict, run_id: int = 1,
                 train_round: RoundHandler | None = None) -> None:
        self.client_app = client_app
        self.train_round = train_round
        self._run_id = run_id
        self.contexts = {
            NODE_ID_OFFSET + pid: Context(run_id=run_id, node_id=NODE_ID_OFFSET + pid,
                                          node_config={"partition-id": pid, "num-partitions": num_nodes},
                                          state=RecordDict(), run_config=dict(run_config))
            for pid in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}
        # message ids as a SuperLink's are unique within a run: a counter here (uuid4 cost 3 us a
        # message, and a counter makes them reproducible), 32 hex digits like a uuid's
        self._ids = itertools.count(1)
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

    # -- checkpoints: the nodes' kept state lives here, in this process -------------------
    def node_states(self) -> dict[int, RecordDict]:
        """Every node's ``context.state`` (accountant history, client-rule state), by node id:
        what a checkpoint saves. Ray and a SuperLink keep node state where fedsim cannot read
        it, so only this grid offers it."""
        return {node: context.state for node, context in self.contexts.items()}

    def restore_node_states(self, states: dict[int, RecordDict]) -> None:
        """Put saved records back into the nodes' states (a resumed run)."""
        unknown = sorted(set(states) - set(self.contexts))
        if unknown:
            raise ValueError(f"checkpoint has state for nodes this grid does not have: {unknown[:3]}")
        for node, state in states.items():
            for key, record in state.items():
                self.contexts[node].state[key] = record

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        ids = []
        for msg in messages:
            assign_message_id(msg, f"{next(self._ids):032x}")
            ids.append(msg.metadata.message_id)
        train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN
                 and m.metadata.dst_node_id in self.contexts]
        if self.train_round is not None and train:
            replies = self.train_round([(m, self.contexts[m.metadata.dst_node_id]) for m in train])
            for msg, reply in zip(train, replies):
                self._replies[msg.metadata.message_id] = reply
        for msg in messages:
            if msg.metadata.message_id not in self._replies:
                self._replies[msg.metadata.message_id] = self._deliver(msg)
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
