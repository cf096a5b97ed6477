"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020,
arXiv 1812.06127): FedAvg whose clients add (mu/2)||w - w_g||^2 to their local loss.

The server half is Flower's `FedProx`, which also sends ``proximal-mu`` to clients, so a
Flower client written for it works too; fedsim's client half (`clients.fedprox`) reads mu
from the same params.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.serverapp import strategy as flwr_strategy

from fedsim.config import param
from fedsim.strategies.fedavg import FedAvg, with_params


class FedProx(flwr_strategy.FedProx, FedAvg):
    """Flower's FedProx, averaging with fedsim's FedAvg."""


@dataclass(frozen=True)
class FedProxParams:
    """``[strategy.fedprox]``.

    mu : float
        Proximal weight: how strongly each local step is pulled back to the round's global
        model. 0 is FedAvg.
    """

    mu: float = param(0.01, "FedProx proximal weight mu (0 = FedAvg)", lo=0.0)


def build(params: FedProxParams, cfg: Any, fedavg_kwargs: dict) -> FedProx:
    return with_params(FedProx(**fedavg_kwargs, proximal_mu=params.mu), params)
