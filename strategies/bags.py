"""FedAvg over clients that learn from aggregate responses (bags).

Javanmard, Chen, Mirrokni, Badanidiyuru, Fu, "Learning from Aggregate Responses: Instance
Level versus Bag Level Loss Functions", ICLR 2024, arXiv 2401.11081.

The strategy owns the two knobs of the method and sends them to every client: the bag
size k and the interpolation rho of L_rho = (1 - rho) L_bag + rho L_ins. Clients build
their bags once, release noisy bag means once (label-DP, `fedsim.privacy.bag_mechanism`)
and train on them; aggregation is plain example-weighted FedAvg.

Parameters
----------
bag_size : int
    k, samples per bag (1 = individual labels).
rho : float
    0 = bag-level loss, 1 = instance-level loss.
**fedavg_kwargs
    Sampling and key options of `flwr.serverapp.strategy.FedAvg`.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsim import records as R


class BagsFedAvg(FedAvg):
    def __init__(self, *, bag_size: int = 1, rho: float = 1.0, **fedavg_kwargs) -> None:
        super().__init__(**fedavg_kwargs)
        self.bag_size = bag_size
        self.rho = rho

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config[R.BAG_SIZE] = self.bag_size
        config[R.RHO] = self.rho
        return super().configure_train(server_round, arrays, config, grid)
