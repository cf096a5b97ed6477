"""FedAdam: adaptive server optimization (Reddi et al., "Adaptive Federated Optimization",
ICLR 2021, arXiv 2003.00295).

Flower's `FedAdam`: the averaged client update is a pseudo-gradient for a server-side Adam
step. Clients train as in FedAvg (`clients.fedavg`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.serverapp import strategy as flwr_strategy

from fedsim.config import param
from fedsim.strategies.fedavg import FedAvg, with_params


class FedAdam(flwr_strategy.FedAdam, FedAvg):
    """Flower's FedAdam; its ``super().aggregate_train`` is fedsim's FedAvg.

    Its state across rounds is Adam's first and second moments ``m_t`` and ``v_t`` (per
    parameter name; empty before the first aggregation). The bias correction reads the round
    number, which the loop supplies, so the moments are all a checkpoint needs.
    """

    def state_dict(self) -> dict[str, np.ndarray]:
        return {**{f"m_t/{k}": v for k, v in (self.m_t or {}).items()},
                **{f"v_t/{k}": v for k, v in (self.v_t or {}).items()}}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        unknown = [k for k in state if not k.startswith(("m_t/", "v_t/"))]
        if unknown:
            raise ValueError(f"FedAdam.load_state_dict: unknown keys {unknown[:3]}")
        self.m_t = {k[4:]: np.array(v) for k, v in state.items() if k.startswith("m_t/")} or None
        self.v_t = {k[4:]: np.array(v) for k, v in state.items() if k.startswith("v_t/")} or None


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
    beta_1: float = param(0.9, "first-moment decay", lo=0.0, hi=1.0, hi_open=True,
                          why="at 1 Adam's bias correction divides by 1 - beta**t = 0")
    beta_2: float = param(0.99, "second-moment decay", lo=0.0, hi=1.0, hi_open=True,
                          why="at 1 Adam's bias correction divides by 1 - beta**t = 0")
    tau: float = param(1e-3, "adaptivity (added to the root of the second moment)", lo=0.0, lo_open=True)


def build(params: FedAdamParams, cfg: Any, fedavg_kwargs: dict) -> FedAdam:
    return with_params(FedAdam(**fedavg_kwargs, eta=params.server_lr, eta_l=cfg.client.lr, beta_1=params.beta_1,
                               beta_2=params.beta_2, tau=params.tau), params)
