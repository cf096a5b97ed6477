"""Which clients train in which round: one seeded function for the server and for calibration.

The participation schedule depends only on (seed, round, number of live nodes, clients per
round), never on data or on results. So it is known before the run: `fedsim.run.calibrate`
reads every client's realized number of participations from `participation_counts` and
sizes σ so that the client that trains most often (per size) lands at the target ε, and
the server samples each round through `sample_round` too (`SampledGrid`), so the
prediction and the run cannot drift apart.

Three sampling modes (`federation.sampling`), each accounted as what it is
(`fedsim.privacy.accounting.user_level_epsilon`):

* ``fixed``: each round's draw is ``random.Random(derive_seed(seed, round, "sample")).sample(nodes, K)``
  over the live nodes in partition order: the same choice Flower's ``sample_nodes`` made when
  the server seeded Python's global `random` with that seed, so runs keep their schedules.
* ``poisson``: each node joins independently with q = K/N, one uniform draw per node in
  partition order from ``numpy.random.default_rng(derive_seed(seed, round, "sample"))``. The
  cohort's size varies around K, and a round may have no client at all: the schedule then
  returns [] and the server still releases (and accounts) that round's noised zero sum.
* ``cyclic``: the nodes in one seeded order (``random.Random(derive_seed(seed, 0, "cyclic"))``),
  cut into B = floor(N/K) blocks of K; round r trains block (r - 1) mod B. Each client trains at
  most once in any B consecutive rounds, and no accounting assumes randomness: what DP-FTRL
  (Kairouz et al. 2021) needs, each tree seeing a client at most once when it restarts at
  most every B rounds. The last N mod K clients of the order never train.

``auto`` (the default) is ``poisson`` when user-level DP is on, whose accountant assumes
independent selection (McMahan et al. 2018), ``cyclic`` under DP-FTRL (``privacy.user_mechanism
= "tree"``), and ``fixed`` otherwise (`resolve_sampling`).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterable, Sequence
from typing import TypeVar

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from fedsim.config import Config
from fedsim.experiment import derive_seed
from fedsim.privacy.accounting import accounted_cohort

T = TypeVar("T")


def sampling_seed(seed: int, server_round: int) -> int:
    """The seed of round `server_round`'s draw of clients (rounds count from 1)."""
    return derive_seed(seed, server_round, "sample")


def resolve_sampling(sampling: str, user_dp: bool, mechanism: str = "gaussian") -> str:
    """The sampling mode that runs: ``auto`` is ``cyclic`` under DP-FTRL, ``poisson`` under
    other user-level DP, else ``fixed``."""
    if sampling == "auto":
        return ("cyclic" if mechanism == "tree" else "poisson") if user_dp else "fixed"
    return sampling


def client_sampling(cfg: Config) -> str:
    """`federation.sampling` of this config, ``auto`` resolved (what summary.json records)."""
    p = cfg.privacy
    if p.secure_aggregation and cfg.federation.sampling == "auto":
        return "fixed"  # each client's noise share assumes the cohort it is one of (fedsim.secure_aggregation)
    return resolve_sampling(cfg.federation.sampling, p.user_noise_multiplier > 0 or p.user_target_epsilon > 0,
                            user_mechanism(cfg))


def user_mechanism(cfg: Config) -> str:
    """The user-level mechanism: ``gaussian`` (one Gaussian release per round) or ``tree`` (DP-FTRL)."""
    return cfg.privacy.user_mechanism


def user_accounting_args(cfg: Config, rounds: int | None = None) -> dict:
    """The keyword arguments of `fedsim.privacy.accounting.user_level_epsilon` for this config
    after `rounds` rounds (default: all), user_noise_multiplier aside: the sampling mode that
    runs and `max_participations`, read from the same seeded schedule the server samples with:
    for DP-FTRL the most rounds any client trains in within one tree, for cyclic cohorts the
    most rounds any client has trained in so far."""
    fed, p = cfg.federation, cfg.privacy
    sampling, mechanism = client_sampling(cfg), user_mechanism(cfg)
    rounds = fed.rounds if rounds is None else rounds
    restart_every = p.user_tree_restart
    most = 1
    if mechanism == "tree" or sampling == "cyclic":
        window = restart_every if mechanism == "tree" else 0
        profile = _participation_profile(cfg.seed, fed.rounds, fed.num_clients, fed.clients_per_round, sampling,
                                         window)
        most = int(profile[min(max(rounds, 1), len(profile)) - 1])
    population, cohort = accounted_cohort(fed.num_clients, fed.clients_per_round, p.noise_cohort_size)
    return dict(num_clients=population, cohort_size=cohort, rounds=rounds, delta=p.delta,
                sampling=sampling, accountant=p.accountant, mechanism=mechanism, restart_every=restart_every,
                max_participations=most)


@functools.lru_cache(maxsize=64)
def _participation_profile(seed: int, rounds: int, num_clients: int, clients_per_round: int, sampling: str,
                           window: int) -> tuple[int, ...]:
    """Entry r - 1: `max_participations_per_window` over rounds 1..r (at least 1), for every r at once."""
    window = window if window > 0 else max(rounds, 1)
    out, most, counts = [], 1, {}
    for r, chosen in enumerate(participation_schedule(seed, rounds, num_clients, clients_per_round, sampling)):
        if r % window == 0:
            counts = {}
        for pid in chosen:
            counts[pid] = counts.get(pid, 0) + 1
            most = max(most, counts[pid])
        out.append(most)
    return tuple(out)


def sample_round(seed: int, server_round: int, nodes: Sequence[T], k: int, sampling: str = "fixed",
                 num_clients: int | None = None) -> list[T]:
    """The nodes of `nodes` (live nodes in partition order) that train in `server_round`.

    ``fixed``: `k` of them without replacement. ``poisson``: each independently with
    q = k / `num_clients` (default: len(nodes)); q stays K/N when nodes are lost, as the
    accountant assumes. Possibly none. ``cyclic``: block (round - 1) mod floor(n/k) of one
    seeded order of the nodes. Only the positions matter, so the server (node ids) and the
    planner (partition ids 0..N-1) get the same clients while every node is connected.
    """
    nodes = list(nodes)
    if sampling == "cyclic":
        order = random.Random(derive_seed(seed, 0, "cyclic")).sample(range(len(nodes)), len(nodes))
        block = (server_round - 1) % (len(nodes) // k)
        return [nodes[i] for i in order[block * k:(block + 1) * k]]
    if sampling == "poisson":
        q = k / (num_clients or len(nodes))
        joins = np.random.default_rng(sampling_seed(seed, server_round)).random(len(nodes)) < q
        return [node for node, joined in zip(nodes, joins.tolist()) if joined]
    if sampling != "fixed":
        raise ValueError(f"sampling must be 'poisson', 'fixed' or 'cyclic' (got {sampling!r})")
    return random.Random(sampling_seed(seed, server_round)).sample(nodes, k)


def participation_schedule(seed: int, rounds: int, num_clients: int, clients_per_round: int,
                           sampling: str = "fixed") -> list[list[int]]:
    """Partition ids that train in rounds 1..rounds (sorted per round), as the server samples them."""
    return [sorted(sample_round(seed, r, range(num_clients), clients_per_round, sampling))
            for r in range(1, rounds + 1)]


def participation_counts(seed: int, rounds: int, num_clients: int, clients_per_round: int,
                         sampling: str = "fixed") -> list[int]:
    """How many rounds each partition trains in over the whole run (index = partition id)."""
    counts = [0] * num_clients
    for chosen in participation_schedule(seed, rounds, num_clients, clients_per_round, sampling):
        for pid in chosen:
            counts[pid] += 1
    return counts


def max_participations_per_window(schedule: Sequence[Sequence[int]], window: int) -> int:
    """The most rounds any client trains in within one window of `window` consecutive rounds
    (rounds 1..window, window+1..2 window, ...; 0 = the whole schedule): what DP-FTRL's tree
    accounting needs per tree (`fedsim.privacy.accounting.tree_aggregation_event`)."""
    window = window if window > 0 else max(len(schedule), 1)
    most = 0
    for start in range(0, len(schedule), window):
        counts: dict[int, int] = {}
        for chosen in schedule[start:start + window]:
            for pid in chosen:
                counts[pid] = counts.get(pid, 0) + 1
        most = max([most, *counts.values()])
    return most


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

    Flower's strategies sample inside ``configure_train`` (``sample_nodes``: a share of the
    grid's node ids). Shown exactly the nodes `sample_round` chose, with ``min_train_nodes`` = K
    (or, under Poisson sampling, ``fraction_train`` = 1 and ``min_train_nodes`` = 1: however many
    were drawn; `fedsim.server.fedavg_kwargs`), they take all of them: the clients that train
    are the ones the schedule says, whatever Flower's sampling code does. Everything else goes
    to `inner`.
    """

    def __init__(self, inner: Grid, nodes: Sequence[int]) -> None:
        super().__init__(inner)
        self.nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)
