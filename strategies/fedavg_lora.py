"""FedAvg-LoRA: clients train both A and B (under DP-SGD, both noised); the server
averages A and B separately (the baseline of FFA-LoRA and FedSVD).

Averaging A and B separately does not average the products: mean(B) mean(A) differs from
mean(B A), and under DP the noise in A and B multiplies. That is the failure FFA-LoRA and
FedSVD are built to avoid. It also uploads twice FedSVD's parameters for square A and B.

Parameters
----------
**fedavg_kwargs
    Sampling and key options of `flwr.serverapp.strategy.FedAvg`.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsim import records as R


class FedAvgLoRA(FedAvg):
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config[R.TRAINABLE] = "lora"
        config[R.UPLOAD] = "lora"
        return super().configure_train(server_round, arrays, config, grid)
