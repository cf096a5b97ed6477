"""Flower server strategies, built by name from an experiment config.

Each strategy lives in its own module; Flower's own FedAvg, FedProx and FedAdam are
used as they are. `build_strategy` is the one place that maps config to constructor
arguments, including the shared sampling rules and the optional central DP wrapper.
"""

from __future__ import annotations

from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    Strategy,
)

from fedsim import records as R
from fedsim.config import Config
from fedsim.errors import ConfigError
from strategies.bags import BagsFedAvg
from strategies.fedavg_lora import FedAvgLoRA
from strategies.fedld import FedLD
from strategies.fedsvd import FedSVD
from strategies.ffa_lora import FFALoRA
from strategies.scaffold import Scaffold

LORA_STRATEGIES = ("fedsvd", "ffa-lora", "fedavg-lora")
CENTRAL_DP_STRATEGIES = ("fedavg", "fedprox")


def sampling_kwargs(cfg: Config) -> dict:
    """FedAvg options shared by every strategy.

    Exactly clients_per_round nodes train per round; fedsim's discovery waits for all
    num_clients nodes before round 1 (Flower's round-1 race), and Flower's own wait asks
    only for clients_per_round, so a lost node never makes it wait forever (fedsim's grid
    raises a clear error instead when too few nodes are left); no federated evaluation,
    because fedsim evaluates the global model centrally on the held-out split.
    Under central DP the average is unweighted: with example weights a large client's
    influence would exceed C/K and the noise would no longer cover it.
    """
    fed = cfg.federation
    central_dp = cfg.privacy.user_noise_multiplier > 0
    return dict(fraction_train=fed.clients_per_round / fed.num_clients,
                min_train_nodes=fed.clients_per_round, min_available_nodes=fed.clients_per_round,
                fraction_evaluate=0.0, min_evaluate_nodes=0,
                weighted_by_key=R.UNIT_WEIGHT if central_dp else R.NUM_EXAMPLES)


def build_strategy(cfg: Config) -> Strategy:
    s, common = cfg.strategy, sampling_kwargs(cfg)
    name = s.name
    if name == "fedavg":
        strategy: Strategy = FedAvg(**common)
    elif name == "fedprox":
        strategy = FedProx(**common, proximal_mu=s.proximal_mu)
    elif name == "fedadam":
        strategy = FedAdam(**common, eta=s.server_lr, eta_l=cfg.client.lr)
    elif name == "scaffold":
        strategy = Scaffold(**common, global_lr=s.server_lr, num_clients=cfg.federation.num_clients)
    elif name == "fedld":
        strategy = FedLD(**common, k_fraction=s.fedld_k_fraction, normalization=s.fedld_normalization,
                         margin_lambda=cfg.client.margin_lambda)
    elif name == "fedsvd":
        strategy = FedSVD(**common, svd_period=s.svd_period, svd_method=s.svd_method)
    elif name == "ffa-lora":
        strategy = FFALoRA(**common)
    elif name == "fedavg-lora":
        strategy = FedAvgLoRA(**common)
    elif name == "bags":
        strategy = BagsFedAvg(**common, bag_size=cfg.bags.bag_size, rho=cfg.bags.rho)
    else:
        raise ConfigError(f"strategy.name: unknown strategy {name!r}")
    if cfg.privacy.user_noise_multiplier > 0:
        if name not in CENTRAL_DP_STRATEGIES:
            raise ConfigError(f"privacy.user_noise_multiplier: central DP works with "
                              f"{', '.join(CENTRAL_DP_STRATEGIES)} (got strategy {name!r})")
        strategy = DifferentialPrivacyServerSideFixedClipping(
            strategy, noise_multiplier=cfg.privacy.user_noise_multiplier,
            clipping_norm=cfg.privacy.user_clip, num_sampled_clients=cfg.federation.clients_per_round)
    return strategy
