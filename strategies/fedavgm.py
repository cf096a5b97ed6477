"""FedAvgM: FedAvg with server momentum (Hsu, Qi, Brown, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification", 2019, arXiv 1909.06335).

The averaged client update is a pseudo-gradient for server SGD with momentum, in PyTorch's
convention (Flower's `FedAvgM` uses the same):

    d = x - avg_i y_i        v <- beta v + d   (v = d in the first round)        x <- x - eta v

One pure function, `server_update`, on `RoundFedAvg`: the momentum v is the strategy's
checkpointed state. Its tests hold it to hand-computed arrays and to Flower's `FedAvgM`
on the same replies. Clients train as in FedAvg (the registry reuses `clients.fedavg`).
Momentum 0 with eta = 1 is FedAvg.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsim.config import param
from fedsim.strategies.fedavg import Aggregate, Arrays, RoundFedAvg, ServerHyper


@dataclass(frozen=True)
class FedAvgMParams:
    """``[strategy.fedavgm]``.

    server_lr : float
        Server learning rate eta (1 with momentum 0 is FedAvg).
    server_momentum : float
        Server momentum beta.
    """

    server_lr: float = param(1.0, "server learning rate eta", lo=0.0, lo_open=True)
    server_momentum: float = param(0.9, "server momentum beta (0 = FedAvg with server_lr 1)", lo=0.0, hi=1.0,
                                   hi_open=True, why="a momentum of 1 never forgets a step")


def server_update(current: Arrays, aggregate: Aggregate, state: Arrays, hyper: ServerHyper
                  ) -> tuple[Arrays, Arrays]:
    """(x_new, v) from x (`current`), the weighted average and the momentum v (`state`, {} at first)."""
    eta, beta = hyper.params.server_lr, hyper.params.server_momentum
    if eta == 1.0 and beta == 0.0:  # FedAvg, bit for bit (x - (x - avg) may round otherwise)
        return dict(aggregate.mean), {}
    new, momentum = {}, {}
    for key, x in current.items():
        if not np.issubdtype(x.dtype, np.floating):
            new[key] = aggregate.mean[key]
            continue
        step = x - aggregate.mean[key]
        if beta > 0:
            step = beta * state[key] + step if key in state else step
            momentum[key] = step
        new[key] = x - eta * step
    return new, momentum


def build(params: FedAvgMParams, cfg: Any, fedavg_kwargs: dict) -> RoundFedAvg:
    return RoundFedAvg(**fedavg_kwargs, server_update=server_update, params=params,
                       num_clients=cfg.federation.num_clients)
