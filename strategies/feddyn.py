"""FedDyn: federated learning with dynamic regularization (Acar et al., "Federated Learning
Based on Dynamic Regularization", ICLR 2021, arXiv 2111.04263), server half.

Each client i keeps g_i, the gradient of its linear term, and minimizes
L_i(theta) - <g_i, theta> + (alpha/2) ||theta - theta^{t-1}||^2 (`clients.feddyn`). The
server keeps h, the running mean of the clients' g_i, and corrects the average with it
(Algorithm 1, with m the total number of clients and P_t the clients of round t):

    h^t     = h^{t-1} - alpha (1/m) sum_{i in P_t} (theta_i^t - theta^{t-1})
    theta^t = (1/|P_t|) sum_{i in P_t} theta_i^t - h^t / alpha

Both are one pure function, `server_update`; `RoundFedAvg` keeps the round's arrays, hands
it the replies' sum and count, and checkpoints h as the strategy's state.

Decisions:
  * The mean over P_t is uniform, as in the paper, not weighted by examples (FedDyn's
    h tracks sum_i g_i / m, which an example-weighted mean would bias towards large clients).
  * One alpha for every client (the paper's form); the authors' code divides it by each
    client's share of the data, a variant left out here.
  * Arrays that are not floating point (counters) take the plain mean and no h.
  * Central DP is off: the server step releases h / alpha beside the noisy average.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsim.config import param
from fedsim.strategies.fedavg import Aggregate, Arrays, RoundFedAvg, ServerHyper


@dataclass(frozen=True)
class FedDynParams:
    """``[strategy.feddyn]``: both halves of FedDyn.

    alpha : float
        The dynamic regularizer's weight alpha: each client's pull towards the round's model,
        and the server's step on h. The paper tunes it in {0.1, 0.01, 0.001}.
    """

    alpha: float = param(0.01, "dynamic regularization weight alpha (client pull and server h step)",
                         lo=0.0, lo_open=True, hi=100.0,
                         why="a bound against typos: the paper tunes alpha in 0.001 to 0.1")


def server_update(current: Arrays, aggregate: Aggregate, state: Arrays, hyper: ServerHyper
                  ) -> tuple[Arrays, Arrays]:
    """(theta^t, h^t) from theta^{t-1} (`current`), the replies and h^{t-1} (`state`, {} = 0)."""
    alpha, m = hyper.params.alpha, hyper.num_clients
    new, h = {}, {}
    for key, theta in current.items():
        mean = aggregate.model_sum[key] / aggregate.count
        if not np.issubdtype(theta.dtype, np.floating):
            new[key] = aggregate.mean[key]
            continue
        drift = aggregate.model_sum[key].astype(np.float64) - aggregate.count * theta.astype(np.float64)
        h[key] = (state.get(key, 0.0) - alpha / m * drift).astype(theta.dtype)
        new[key] = (mean - h[key].astype(np.float64) / alpha).astype(theta.dtype)
    return new, h


def build(params: FedDynParams, cfg: Any, fedavg_kwargs: dict) -> RoundFedAvg:
    return RoundFedAvg(**fedavg_kwargs, server_update=server_update, params=params,
                       num_clients=cfg.federation.num_clients)
