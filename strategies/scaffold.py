"""SCAFFOLD: stochastic controlled averaging (Karimireddy et al., ICML 2020, arXiv 1910.06378).

Each client corrects its local steps by (c - c_i), the difference between the server's
and its own control variate, to cancel client drift under heterogeneity. Clients keep
c_i in their node state across the rounds they take part in (option II update), and
reply with delta c_i beside their model.

Parameters
----------
global_lr : float
    Server step eta_g: x <- x + eta_g * mean_i(y_i - x).
num_clients : int
    N, the total number of clients: c <- c + (1/N) sum_i delta c_i.
**fedavg_kwargs
    Sampling and key options of `flwr.serverapp.strategy.FedAvg`.

Decision: the model step averages client models weighted by examples, like FedAvg (so
with eta_g = 1 and c = 0 SCAFFOLD is exactly FedAvg); the paper writes a uniform mean.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsim import records as R


class Scaffold(FedAvg):
    def __init__(self, *, global_lr: float = 1.0, num_clients: int, **fedavg_kwargs) -> None:
        super().__init__(**fedavg_kwargs)
        self.global_lr = global_lr
        self.num_clients = num_clients
        self.control: dict[str, np.ndarray] | None = None
        self.current: dict[str, np.ndarray] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current = R.record_to_numpy(arrays)
        if self.control is None:
            self.control = {k: np.zeros_like(v) for k, v in self.current.items()
                            if np.issubdtype(v.dtype, np.floating)}
        config[R.USE_SCAFFOLD] = True
        messages = list(super().configure_train(server_round, arrays, config, grid))
        control = R.numpy_to_record(self.control)
        for msg in messages:
            msg.content[R.CONTROL] = control
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [r for r in replies if not r.has_error()]
        if not replies:
            return None, None
        deltas = [R.record_to_numpy(r.content[R.CONTROL]) for r in replies]
        for r in replies:  # FedAvg's consistency check expects exactly one ArrayRecord
            del r.content[R.CONTROL]
        averaged, metrics = super().aggregate_train(server_round, replies)
        if averaged is None:
            return None, metrics
        new = R.record_to_numpy(averaged)
        out = {k: self.current[k] + self.global_lr * (new[k] - self.current[k]) for k in new}
        for k in self.control:
            self.control[k] = self.control[k] + sum(d[k] for d in deltas) / self.num_clients
        return R.numpy_to_record(out), metrics
