"""FedAdam: adaptive server optimization (Reddi et al., "Adaptive Federated Optimization",
ICLR 2021, arXiv 2003.00295).

Flower's `FedAdam`: the averaged client update is a pseudo-gradient for a server-side Adam
step. Clients train as in FedAvg (`clients.fedavg`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.serverapp import strategy as flwr_strategy

from fedsim.config import param
from strategies.fedavg import FedAvg


class FedAdam(flwr_strategy.FedAdam, FedAvg):
    """Flower's FedAdam; its ``super().aggregate_train`` is fedsim's FedAvg."""


@dataclass(frozen=True)
class FedAdamParams:
    """``[strategy.fedadam]``; defaults are Flower's except ``server_lr``.

    server_lr : float
        Server learning rate eta.
    beta_1, beta_2 : float
        Adam's first- and second-moment decay.
    tau : float
        Adaptivity: added to the square root of the second moment.
    """

    server_lr: float = param(1.0, "server learning rate eta", lo=0.0, lo_open=True)
    beta_1: float = param(0.9, "first-moment decay", lo=0.0, hi=1.0)
    beta_2: float = param(0.99, "second-moment decay", lo=0.0, hi=1.0)
    tau: float = param(1e-3, "adaptivity (added to the root of the second moment)", lo=0.0, lo_open=True)


def build(params: FedAdamParams, cfg: Any, fedavg_kwargs: dict) -> FedAdam:
    return FedAdam(**fedavg_kwargs, eta=params.server_lr, eta_l=cfg.client.lr, beta_1=params.beta_1,
                   beta_2=params.beta_2, tau=params.tau)
