"""FedAvg: example-weighted model averaging (McMahan et al., AISTATS 2017, arXiv 1602.05629).

Flower's own `FedAvg`. Its sampling options (``fraction_train``, ``min_*_nodes``,
``weighted_by_key``) come from ``[federation]`` and the privacy settings, the same for every
algorithm (`fedsim.server.fedavg_kwargs`), so FedAvg has no table of its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import strategy as flwr_strategy

from fedsim import records as R


class FedAvg(flwr_strategy.FedAvg):
    """Flower's FedAvg with the aggregation of `fedsim.records.aggregate_train_replies`: the
    same numbers, without decoding every array through `np.load` (the largest server-side
    cost per client-round once clients train vectorized). Every fedsim strategy that averages
    builds on it; Flower strategies that average through ``super()`` (FedProx, FedAdam) get it
    by putting it after them in the bases."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return R.aggregate_train_replies(list(replies), self.weighted_by_key, self.train_metrics_aggr_fn)

    def __init__(self, **kwargs: Any) -> None:
        if kwargs.get("train_metrics_aggr_fn") is None:  # Flower's subclasses pass None explicitly
            kwargs["train_metrics_aggr_fn"] = R.aggregate_metrics
        super().__init__(**kwargs)

    # State hooks (`fedsim.algorithms.stateful_strategy`): what the strategy carries from one
    # round into the next, for checkpoints. FedAvg carries nothing: the global model is all.
    # Subclasses with state (FedAdam's moments, SCAFFOLD's c) override both.
    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state across rounds (got {sorted(state)[:3]})")


@dataclass(frozen=True)
class FedAvgParams:
    """FedAvg has no knobs beyond sampling ([federation]) and local training ([client])."""


def build(params: FedAvgParams, cfg: Any, fedavg_kwargs: dict) -> FedAvg:
    return FedAvg(**fedavg_kwargs)
