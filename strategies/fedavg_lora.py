"""FedAvg-LoRA: clients train both A and B (under DP-SGD, both noised); the server averages
A and B separately (the baseline of FFA-LoRA and FedSVD).

Averaging A and B separately does not average the products: mean(B) mean(A) differs from
mean(B A), and under DP the noise in A and B multiplies. That is the failure FFA-LoRA and
FedSVD are built to avoid. It also uploads twice FedSVD's parameters for square A and B.
The client half is `clients.fedavg_lora`; the server half is Flower's FedAvg on A and B.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


from fedsim.strategies.fedavg import FedAvg, with_params
from fedsim.strategies.ffa_lora import check_lora_model


@dataclass(frozen=True)
class FedAvgLoRAParams:
    """FedAvg-LoRA has no knobs of its own; the adapters' rank and init are in ``[model]``."""


check = check_lora_model


def build(params: FedAvgLoRAParams, cfg: Any, fedavg_kwargs: dict) -> FedAvg:
    return with_params(FedAvg(**fedavg_kwargs), params)
