"""SCAFFOLD: stochastic controlled averaging (Karimireddy et al., ICML 2020, arXiv 1910.06378).

Each client corrects its local steps by (c - c_i), the difference between the server's and
its own control variate, to cancel client drift under heterogeneity (`clients.scaffold`).
The server sends c beside the model and updates, with the m replying clients' delta c_i,

    x <- x + eta_g * (avg_i(y_i) - x)          c <- c + (1/N) sum_i delta c_i

Decision: the model step averages client models weighted by examples, like FedAvg (so with
eta_g = 1 and c = 0 SCAFFOLD is exactly FedAvg); the paper writes a uniform mean.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp.exception import AggregationError

from fedsim import records as R
from fedsim.config import param
from fedsim.strategies.fedavg import RoundFedAvg, check_arrays, with_params


@dataclass(frozen=True)
class ScaffoldParams:
    """``[strategy.scaffold]``.

    server_lr : float
        Global step eta_g: x <- x + eta_g * (avg_i y_i - x). 1 takes the average as it is.
    """

    server_lr: float = param(1.0, "global step eta_g", lo=0.0, lo_open=True)


class Scaffold(RoundFedAvg):
    """SCAFFOLD's server half (option II control variates on the clients).

    Parameters
    ----------
    global_lr : float
        eta_g, the server step on the averaged model delta.
    num_clients : int
        N, the total number of clients: c moves by (1/N) sum_i delta c_i.
    **fedavg_kwargs
        Sampling and key options of `flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(self, *, global_lr: float = 1.0, num_clients: int, **fedavg_kwargs: Any) -> None:
        super().__init__(**fedavg_kwargs)
        if num_clients < 1:
            raise ValueError(f"Scaffold: num_clients must be >= 1 (got {num_clients})")
        self.global_lr = global_lr
        self.num_clients = num_clients
        self.control: dict[str, np.ndarray] | None = None

    def summary(self) -> None:
        log(INFO, "\t├──> SCAFFOLD settings:")
        log(INFO, "\t│\t└── global lr eta_g (%s) | clients N (%d)", f"{self.global_lr:.6g}", self.num_clients)
        super().summary()

    def state_dict(self) -> dict[str, np.ndarray]:
        """The server control variate c (empty before round 1, when it is still zero)."""
        return dict(self.control or {})

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.control = {k: np.array(v) for k, v in state.items()} or None

    def extra_arrays(self) -> dict[str, np.ndarray]:
        """c, sent beside the model (zero for every float array before the first update)."""
        if self.control is None:
            self.control = {k: np.zeros_like(v) for k, v in self.round_arrays().items()
                            if np.issubdtype(v.dtype, np.floating)}
        return self.control

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        current = self.round_arrays()
        if self.control is None:
            raise AggregationError(reason="Scaffold.aggregate_train: configure_train has not run (no control "
                                          "variate)")
        replies = R.successful_replies(list(replies))
        if not replies:
            return None, None
        aggregate, metrics = self.aggregate_replies(replies)
        out = {k: current[k] + self.global_lr * (v - current[k]) for k, v in aggregate.mean.items()}
        check_arrays(self.control, aggregate.extra_sum)
        for k in self.control:
            self.control[k] = self.control[k] + aggregate.extra_sum[k] / self.num_clients
        return R.numpy_to_record(out), metrics


def build(params: ScaffoldParams, cfg: Any, fedavg_kwargs: dict) -> Scaffold:
    return with_params(Scaffold(**fedavg_kwargs, global_lr=params.server_lr, num_clients=cfg.federation.num_clients),
                       params)
