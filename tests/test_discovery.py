"""Discovery (`fedsim.server.TrackedGrid.discover`) against a fake SuperLink grid: how many
nodes are asked at a time, and what the error says when some never answer."""

from __future__ import annotations

import itertools

import pytest
from flwr.app import Message, MetricRecord, RecordDict

from fedsim import records as R
from fedsim.errors import ClientFailure
from fedsim.server import TrackedGrid


class FakeLink:
    """What a SuperLink's grid does with queries: a node answers at the second pull after its
    query was pushed (its ClientApp takes a while to start); `silent` nodes never answer."""

    def __init__(self, num_nodes: int, silent: tuple[int, ...] = ()) -> None:
        self.nodes = [7000 + i for i in range(num_nodes)]
        self.silent = {self.nodes[i] for i in silent}
        self.in_flight: dict[str, tuple[Message, int]] = {}  # message id -> (query, pulls seen)
        self.most_in_flight = 0
        self.ids = itertools.count()

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages) -> list[str]:
        out = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"q{next(self.ids)}"
            self.in_flight[msg.metadata.message_id] = (msg, 0)
            out.append(msg.metadata.message_id)
        self.most_in_flight = max(self.most_in_flight, len(self.in_flight))
        return out

    def pull_messages(self, message_ids) -> list[Message]:
        replies = []
        for mid in list(message_ids):
            msg, pulls = self.in_flight[mid]
            if pulls >= 1 and msg.metadata.dst_node_id not in self.silent:
                del self.in_flight[mid]
                partition = self.nodes.index(msg.metadata.dst_node_id)
                replies.append(Message(RecordDict({R.METRICS: MetricRecord({R.PARTITION_ID: partition})}),
                                       reply_to=msg))
            else:
                self.in_flight[mid] = (msg, pulls + 1)
        return replies

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        ids = self.push_messages(messages)
        return self.pull_messages(ids) + self.pull_messages(ids)


@pytest.fixture
def fast_polls(monkeypatch):
    """Discovery's pauses between polls, without the waiting."""
    monkeypatch.setattr("fedsim.server.time.sleep", lambda seconds: None)


def test_discovery_asks_at_most_window_nodes_at_a_time(flower, fast_polls):
    link = FakeLink(20)
    grid = TrackedGrid(link, recorder=None)
    grid.discover(20, timeout=60, config_text="", window=3)
    assert link.most_in_flight == 3  # never more queries waiting, and the window was used
    assert grid.partition_of == {node: i for i, node in enumerate(link.nodes)}
    assert grid.get_node_ids() == link.nodes  # partition order


def test_discovery_without_window_asks_all_nodes_at_once(flower, fast_polls):
    link = FakeLink(20)
    grid = TrackedGrid(link, recorder=None)
    grid.discover(20, timeout=60, config_text="")
    assert link.most_in_flight == 20
    assert len(grid.partition_of) == 20


def test_discovery_names_the_nodes_that_never_answered(flower, monkeypatch):
    clock = itertools.count(step=5.0)  # every look at the clock: 5 s later
    monkeypatch.setattr("fedsim.server.time.monotonic", lambda: next(clock))
    monkeypatch.setattr("fedsim.server.time.sleep", lambda seconds: None)
    link = FakeLink(6, silent=(2, 4))
    grid = TrackedGrid(link, recorder=None)
    with pytest.raises(ClientFailure) as err:
        grid.discover(6, timeout=100, config_text="", window=2)
    text = str(err.value)
    # the two silent nodes held the window only until their patience ran out: the rest answered
    assert sorted(grid.partition_of.values()) == [0, 1, 3, 5]
    assert f"node(s) {link.nodes[2]}, {link.nodes[4]} (2 of 6) did not answer" in text
    assert "runtime.discovery_timeout = 100" in text and "raise runtime.discovery_timeout" in text
    assert "\n" not in text
