"""FedAvg over clients that learn from aggregate responses (bags).

Javanmard, Chen, Mirrokni, Badanidiyuru, Fu, "Learning from Aggregate Responses: Instance
Level versus Bag Level Loss Functions", ICLR 2024, arXiv 2401.11081.

The server half is plain example-weighted FedAvg. The method lives on the clients
(`clients.bags`): each builds its bags once, releases noisy bag means once (label-DP,
`fedsim.privacy.bag_mechanism`) and trains on them with
L_rho = (1 - rho) L_bag + rho L_ins. Its knobs are this table's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


from fedsim.config import param
from fedsim.strategies.fedavg import FedAvg, with_params
from fedsim.errors import ConfigError


@dataclass(frozen=True)
class BagsParams:
    """``[strategy.bags]``.

    bag_size : int
        k, samples per bag (1 = individual labels).
    rho : float
        Interpolation: 0 = bag-level loss, 1 = instance-level loss.
    label_epsilon : float
        Label-DP epsilon of the released bag means (0 = no noise).
    mechanism : str
        Noise on bag means: ``laplace`` (pure epsilon-DP) or ``gaussian`` (analytic Gaussian
        at privacy.delta).
    label_range : list of float
        Public response range [a, b] the responses are clipped to before the means are
        released, in the units the model sees (after ``data.label_range``'s standardization,
        which maps a public range onto [-3, 3]); regression with label-DP needs it set.
    """

    bag_size: int = param(1, "samples per bag k (1 = individual labels)", lo=1)
    rho: float = param(1.0, "interpolation rho: 0 = bag-level loss, 1 = instance-level loss", lo=0.0, hi=1.0)
    label_epsilon: float = param(0.0, "label-DP epsilon of released bag means (0 = no noise)", lo=0.0)
    mechanism: str = param("laplace", "noise on bag means", choices=("laplace", "gaussian"))
    label_range: list[float] = param([], "public response range [a, b] in model units; empty = no clipping "
                                                "(label-DP needs it)")

    def validate(self) -> None:
        r = self.label_range
        if len(r) not in (0, 2) or (len(r) == 2 and r[0] >= r[1]):
            raise ConfigError(f"strategy.bags.label_range: must be empty or [a, b] with a < b (got {list(r)})")


def check(params: BagsParams, cfg: Any, data: Any, sizes: list[int]) -> None:
    if cfg.privacy.noise_multiplier > 0 or cfg.privacy.target_epsilon > 0:
        raise ConfigError("privacy.noise_multiplier: the bags strategy protects labels with "
                          "strategy.bags.label_epsilon; set privacy.noise_multiplier = 0")
    if params.label_epsilon > 0 and data.task == "regression" and data.label_stats == "train":
        raise ConfigError("data.label_range: label-DP bag means need the target standardized by a public "
                          "range, not by the training labels' own mean and std; set data.label_range = [a, b], "
                          "the target's public range in its own units")
    if params.bag_size > min(sizes):
        small = sizes.index(min(sizes))
        raise ConfigError(f"strategy.bags.bag_size: {params.bag_size} is larger than client {small}'s "
                          f"{min(sizes)} samples; lower strategy.bags.bag_size or federation.num_clients")


def label_privacy(params: BagsParams, delta: float) -> dict | None:
    """The label-level statement of summary.json: Laplace bag means are pure epsilon-DP."""
    if params.label_epsilon <= 0:
        return None
    return {"epsilon": params.label_epsilon, "delta": 0.0 if params.mechanism == "laplace" else delta,
            "accountant": f"{params.mechanism.capitalize()} mechanism on bag means of {params.bag_size} "
                          f"(replace-one, parallel composition)"}


def build(params: BagsParams, cfg: Any, fedavg_kwargs: dict) -> FedAvg:
    return with_params(FedAvg(**fedavg_kwargs), params)
