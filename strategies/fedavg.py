"""FedAvg: example-weighted model averaging (McMahan et al., AISTATS 2017, arXiv 1602.05629),
and the base of every fedsim server half.

Flower's own `FedAvg`. Its sampling options (``fraction_train``, ``min_*_nodes``,
``weighted_by_key``) come from ``[federation]`` and the privacy settings, the same for every
algorithm (`fedsim.server.fedavg_kwargs`), so FedAvg has no table of its own.

`RoundFedAvg` is the base for a server half that needs the round's global arrays: it keeps
them (``self.current``), checks the clients' replies against them like Flower's FedOpt
(same keys, same shapes), sends extra arrays beside the model, and runs an optional pure
``server_update(current, aggregate, state, hyper) -> (new arrays, new state)``. An
algorithm whose server step is a function of the round's arrays, the averaged replies and
its own state (FedAvgM, FedDyn) is that one function, tested on arrays like a client rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, is_dataclass
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.exception import AggregationError

from fedsim import records as R

Arrays = dict[str, np.ndarray]  # parameter name -> array (the server works in numpy)


class FedAvg(flwr_strategy.FedAvg):
    """Flower's FedAvg with the aggregation of `fedsim.records.aggregate_train_replies`: the
    same numbers, without decoding every array through `np.load` (the largest server-side
    cost per client-round once clients train vectorized). Every fedsim strategy that averages
    builds on it; Flower strategies that average through ``super()`` (FedProx, FedAdam) get it
    by putting it after them in the bases.

    ``params``, when set (`with_params`), is the algorithm's ``[strategy.<name>]`` table:
    `summary` states every key of it, so run.log names each setting the run used.
    """

    params: Any = None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return R.aggregate_train_replies(list(replies), self.weighted_by_key, self.train_metrics_aggr_fn)

    def __init__(self, **kwargs: Any) -> None:
        if kwargs.get("train_metrics_aggr_fn") is None:  # Flower's subclasses pass None explicitly
            kwargs["train_metrics_aggr_fn"] = R.aggregate_metrics
        super().__init__(**kwargs)

    def summary(self) -> None:
        if is_dataclass(self.params) and fields(self.params):
            settings = " | ".join(f"{f.name} ({getattr(self.params, f.name)})" for f in fields(self.params))
            log(INFO, "\t├──> %s params:", type(self.params).__name__)
            log(INFO, "\t│\t└── %s", settings)
        super().summary()

    # State hooks (`fedsim.algorithms.stateful_strategy`): what the strategy carries from one
    # round into the next, for checkpoints. FedAvg carries nothing: the global model is all.
    # Subclasses with state (FedAdam's moments, SCAFFOLD's c) override both.
    def state_dict(self) -> Arrays:
        return {}

    def load_state_dict(self, state: Arrays) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state across rounds (got {sorted(state)[:3]})")


def with_params(strategy: FedAvg, params: Any) -> FedAvg:
    """`strategy` with its params table attached for `summary` (Flower's own strategies, such as
    FedAdam, take no extra constructor argument)."""
    strategy.params = params
    return strategy


@dataclass(frozen=True)
class FedAvgParams:
    """FedAvg has no knobs beyond sampling ([federation]) and local training ([client])."""


def build(params: FedAvgParams, cfg: Any, fedavg_kwargs: dict) -> FedAvg:
    return with_params(FedAvg(**fedavg_kwargs), params)


# ----------------------------------------------------------------------------- the round's arrays

@dataclass(frozen=True)
class Aggregate:
    """What a round's successful replies give a server update.

    mean       the models averaged by ``weighted_by_key`` (examples; uniform under central DP),
               exactly FedAvg's aggregate
    model_sum  sum_i y_i, the replying clients' models summed with no weights (papers that
               write (1/|P|) sum_i, such as FedDyn, read it with ``count``)
    count      |P|, the number of replies
    extra_sum  sum_i of the replies' extra arrays (`records.ALGORITHM_ARRAYS`), empty if none
    """

    mean: Arrays
    model_sum: Arrays
    count: int
    extra_sum: Arrays


@dataclass(frozen=True)
class ServerHyper:
    """What a server update reads besides arrays: the algorithm's params (its table), N the
    total number of clients, and the round."""

    params: Any
    num_clients: int
    server_round: int


ServerUpdate = Callable[[Arrays, Aggregate, Arrays, ServerHyper], tuple[Arrays, Arrays]]


def check_arrays(current: Arrays, arrays: Arrays, *, subset: bool = False) -> None:
    """Flower FedOpt's guard: the aggregated arrays have the round's keys (or some of them, for
    a strategy whose clients upload part of the model) and each the same shape, so that
    ``aggregate - current`` never broadcasts."""
    extra, missing = sorted(set(arrays) - set(current)), sorted(set(current) - set(arrays))
    if extra or (missing and not subset):
        raise AggregationError(reason=f"the aggregated arrays' keys do not match the round's (extra {extra[:3]}, "
                                      f"missing {missing[:3]})")
    for key, value in arrays.items():
        if value.shape != current[key].shape:
            raise AggregationError(reason=f"aggregated array {key!r} has shape {value.shape}, "
                                          f"the round's {current[key].shape}")


class RoundFedAvg(FedAvg):
    """A fedsim FedAvg that keeps the round's global arrays, for server halves that need them.

    Hooks, all optional (override the methods, or pass ``server_update``):

    ``prepare_round(server_round, arrays) -> arrays``
        The arrays this round sends, from the global ones (FedSVD refactorizes B A here).
        They are ``self.current`` until the next round.
    ``extra_arrays() -> Arrays``
        Arrays sent beside the model under `records.ALGORITHM_ARRAYS` (SCAFFOLD's c).
    ``server_update(current, aggregate, state, hyper) -> (new arrays, new state)``
        A pure function: the new global arrays from the round's arrays, the `Aggregate` of the
        replies and the strategy's state (named arrays, ``{}`` before the first update), with
        the `ServerHyper`. Its state is the strategy's checkpointed state. Without it the new
        global arrays are the average (with the keys the clients did not upload kept as sent).

    Parameters
    ----------
    server_update : callable, optional
        The pure update above.
    params : dataclass, optional
        The algorithm's params table, given to ``server_update`` and stated by `summary`.
    num_clients : int
        N, the total number of clients (``ServerHyper.num_clients``).
    **fedavg_kwargs
        Sampling and key options of `flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(self, *, server_update: ServerUpdate | None = None, params: Any = None, num_clients: int = 0,
                 **fedavg_kwargs: Any) -> None:
        super().__init__(**fedavg_kwargs)
        if server_update is not None and num_clients < 1:
            raise ValueError(f"{type(self).__name__}: num_clients must be >= 1 (got {num_clients})")
        self.server_update = server_update
        self.params = params
        self.num_clients = num_clients
        self.current: Arrays | None = None
        self.server_state: Arrays = {}

    def prepare_round(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        return arrays

    def extra_arrays(self) -> Arrays:
        return {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        arrays = self.prepare_round(server_round, arrays)
        self.current = R.record_to_numpy(arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        extra = self.extra_arrays()
        if extra:
            record = R.numpy_to_record(extra)
            for msg in messages:  # the messages share one RecordDict: set it once per message anyway
                msg.content[R.ALGORITHM_ARRAYS] = record
        return messages

    def round_arrays(self) -> Arrays:
        """``self.current``, or a clear error when no round has been configured."""
        if self.current is None:
            raise AggregationError(reason=f"{type(self).__name__}: no round's arrays; configure_train must run "
                                          "before aggregate_train")
        return self.current

    def aggregate_replies(self, replies: list[Message]) -> tuple[Aggregate, MetricRecord]:
        """The `Aggregate` of successful replies (non-empty), checked against the round's arrays."""
        views = R.model_views(replies, self.weighted_by_key)
        mean, metrics = R.weighted_average(views, self.weighted_by_key, self.train_metrics_aggr_fn)
        check_arrays(self.round_arrays(), mean)
        models = [R.record_to_numpy(R.record_of(v, R.ARRAYS, ArrayRecord)) for v in views]
        extras = [R.record_to_numpy(r) for r in (R.record_of(m.content, R.ALGORITHM_ARRAYS, ArrayRecord)
                                                 for m in replies) if r is not None]
        model_sum = {k: sum(m[k] for m in models) for k in mean}
        extra_sum = {k: sum(e[k] for e in extras) for k in extras[0]} if extras else {}
        return Aggregate(mean, model_sum, len(replies), extra_sum), metrics

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        current = self.round_arrays()
        valid = R.successful_replies(list(replies))
        if not valid:
            return None, None
        if self.server_update is None:  # the average; what the clients did not upload stays as sent
            views = R.model_views(valid, self.weighted_by_key)
            mean, metrics = R.weighted_average(views, self.weighted_by_key, self.train_metrics_aggr_fn)
            check_arrays(current, mean, subset=True)
            return R.numpy_to_record({**current, **mean}), metrics
        aggregate, metrics = self.aggregate_replies(valid)
        hyper = ServerHyper(self.params, self.num_clients, server_round)
        new, self.server_state = self.server_update(current, aggregate, self.server_state, hyper)
        return R.numpy_to_record(new), metrics

    def summary(self) -> None:
        if self.server_update is not None:
            log(INFO, "\t├──> server update %s | clients N (%d)", getattr(self.server_update, "__module__", "?"),
                self.num_clients)
        super().summary()

    def state_dict(self) -> Arrays:
        """The server update's state (empty before the first update, or without one)."""
        return dict(self.server_state)

    def load_state_dict(self, state: Arrays) -> None:
        if state and self.server_update is None:
            super().load_state_dict(state)  # refuses: no state to take
        self.server_state = {k: np.array(v) for k, v in state.items()}
