"""Which clients train in which round: one seeded function for the server and for calibration.

The participation schedule depends only on (seed, round, number of live nodes, clients per
round), never on data or on results. So it is known before the run: `fedsim.run.calibrate`
reads every client's realized number of participations from `participation_counts` and
sizes σ so that the client that trains most often (per size) lands at the target ε, and
the server samples each round through `sample_round` too (`SampledGrid`), so the
prediction and the run cannot drift apart.

Each round's draw is ``random.Random(derive_seed(seed, round, "sample")).sample(nodes, K)``
over the live nodes in partition order: the same choice Flower's ``sample_nodes`` made when
the server seeded Python's global `random` with that seed, so runs keep their schedules.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import TypeVar

from flwr.app import Message
from flwr.serverapp import Grid

from fedsim.experiment import derive_seed

T = TypeVar("T")


def sampling_seed(seed: int, server_round: int) -> int:
    """The seed of round `server_round`'s draw of clients (rounds count from 1)."""
    return derive_seed(seed, server_round, "sample")


def sample_round(seed: int, server_round: int, nodes: Sequence[T], k: int) -> list[T]:
    """The `k` of `nodes` (live nodes in partition order) that train in `server_round`.

    Only the positions matter, so the server (node ids) and the planner (partition ids
    0..N-1) get the same clients while every node is connected.
    """
    return random.Random(sampling_seed(seed, server_round)).sample(list(nodes), k)


def participation_schedule(seed: int, rounds: int, num_clients: int, clients_per_round: int) -> list[list[int]]:
    """Partition ids that train in rounds 1..rounds (sorted per round), as the server samples them."""
    return [sorted(sample_round(seed, r, range(num_clients), clients_per_round)) for r in range(1, rounds + 1)]


def participation_counts(seed: int, rounds: int, num_clients: int, clients_per_round: int) -> list[int]:
    """How many rounds each partition trains in over the whole run (index = partition id)."""
    counts = [0] * num_clients
    for chosen in participation_schedule(seed, rounds, num_clients, clients_per_round):
        for pid in chosen:
            counts[pid] += 1
    return counts


class ForwardingGrid(Grid):
    """A Grid that forwards everything to `inner`: the base of grids that change one thing
    (`SampledGrid` the node ids, `fedsim.server.TrackedGrid` ordering and reply tracking)."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def set_run(self, run) -> None:
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.inner.send_and_receive(messages, timeout=timeout)


class SampledGrid(ForwardingGrid):
    """A grid that shows a strategy's ``configure_train`` only this round's sampled nodes.

    Flower's strategies sample inside ``configure_train`` (``sample_nodes``: K of the
    grid's node ids). Shown exactly the K nodes `sample_round` chose, with
    ``min_train_nodes`` = K, they take all of them: the clients that train are the ones the
    schedule says, whatever Flower's sampling code does. Everything else goes to `inner`.
    """

    def __init__(self, inner: Grid, nodes: Sequence[int]) -> None:
        super().__init__(inner)
        self.nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)
