"""FedAvg: example-weighted model averaging (McMahan et al., AISTATS 2017, arXiv 1602.05629).

Flower's own `FedAvg`. Its sampling options (``fraction_train``, ``min_*_nodes``,
``weighted_by_key``) come from ``[federation]`` and the privacy settings, the same for every
algorithm (`fedsim.server.fedavg_kwargs`), so FedAvg has no table of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.serverapp.strategy import FedAvg


@dataclass(frozen=True)
class FedAvgParams:
    """FedAvg has no knobs beyond sampling ([federation]) and local training ([client])."""


def build(params: FedAvgParams, cfg: Any, fedavg_kwargs: dict) -> FedAvg:
    return FedAvg(**fedavg_kwargs)
