"""One experiment, from a validated config to a finished run directory.

`prepare` does everything that can fail on bad input *before* any training:
partitioning, model and strategy construction, target-epsilon calibration, bag sizes.
`run_experiment` then hands the config to the chosen runtime.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

from flwr.app import Context, RecordDict

from fedsim.config import Config
from fedsim.datasets import load_dataset
from fedsim.errors import ConfigError
from fedsim.experiment import run_config_for
from fedsim.models import build_model
from fedsim.privacy.accounting import calibrate_noise, poisson_sample_rate, steps_per_round
from fedsim.results import run_log

log = logging.getLogger("fedsim")

def default_out_dir(cfg: Config) -> str:
    return str(Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")


def client_sizes(cfg: Config) -> list[int]:
    from fedsim.partition import partition

    return [len(idx) for idx in partition(cfg).indices]


def sample_level_plans(cfg: Config, sizes: list[int]) -> list[tuple[float, int]]:
    """Distinct (q, total steps) of the clients at their expected participation.

    A client takes part in rounds * K / N rounds on average (rounded to the nearest
    integer, at least 1); clients sampled more often than that will exceed the target.
    """
    fed, c = cfg.federation, cfg.client
    participations = max(1, round(fed.rounds * fed.clients_per_round / fed.num_clients))
    return sorted({(poisson_sample_rate(n, c.batch_size),
                    participations * steps_per_round(n, c.batch_size, c.local_epochs, c.local_steps))
                   for n in sizes})


def calibrate(cfg: Config, sizes: list[int]) -> Config:
    """Replace target epsilons by the noise multipliers that reach them."""
    p, fed = cfg.privacy, cfg.federation
    if p.target_epsilon > 0:
        p.noise_multiplier = calibrate_noise(p.target_epsilon, sample_level_plans(cfg, sizes),
                                             p.delta, p.accountant)
        log.info("target sample-level epsilon %.3g -> noise_multiplier %.4f", p.target_epsilon, p.noise_multiplier)
    if p.user_target_epsilon > 0:
        p.user_noise_multiplier = calibrate_noise(
            p.user_target_epsilon, [(fed.clients_per_round / fed.num_clients, fed.rounds)], p.delta, p.accountant)
        log.info("target user-level epsilon %.3g -> user_noise_multiplier %.4f",
                 p.user_target_epsilon, p.user_noise_multiplier)
    return cfg


def check_compatibility(cfg: Config, sizes: list[int]) -> None:
    """Cross-cutting rules between strategy, model, data and privacy settings."""
    from strategies import LORA_STRATEGIES

    s = cfg.strategy.name
    is_lora_model = cfg.model.name.startswith("lora-") or cfg.model.name == "hf-text"
    if s in LORA_STRATEGIES and not is_lora_model:
        raise ConfigError(f"model.name: strategy {s!r} needs a LoRA model (lora-mlp or hf-text), "
                          f"got {cfg.model.name!r}")
    if is_lora_model and s not in LORA_STRATEGIES:
        raise ConfigError(f"strategy.name: model {cfg.model.name!r} trains LoRA adapters; use one of "
                          f"{', '.join(LORA_STRATEGIES)} (got {s!r})")
    data = load_dataset(cfg.data, cfg.federation.num_clients, cfg.seed)
    if (cfg.model.name == "hf-text") != bool(data.tokenizer):
        raise ConfigError("model.name: hf-text reads tokenized text (data.dataset = 'text-topics', or a file "
                          "with data.text_column), and text data needs model hf-text "
                          f"(got model {cfg.model.name!r} with dataset {cfg.data.dataset!r})")
    if s == "bags":
        if cfg.privacy.noise_multiplier > 0 or cfg.privacy.target_epsilon > 0:
            raise ConfigError("privacy.noise_multiplier: the bags strategy protects labels with "
                              "bags.label_epsilon; set privacy.noise_multiplier = 0")
        if cfg.bags.bag_size > min(sizes):
            small = sizes.index(min(sizes))
            raise ConfigError(f"bags.bag_size: {cfg.bags.bag_size} is larger than client {small}'s "
                              f"{min(sizes)} samples; lower bags.bag_size or federation.num_clients")
    if s == "fedld" and data.task != "classification":
        raise ConfigError("strategy.name: fedld's margin control needs a classification dataset")


def warn_small_clients(cfg: Config, sizes: list[int]) -> list[str]:
    """Clients with n <= batch size get q = 1 under Opacus: no amplification by sampling."""
    if cfg.privacy.noise_multiplier <= 0 or cfg.strategy.name == "bags":
        return []
    full = [i for i, n in enumerate(sizes) if poisson_sample_rate(n, cfg.client.batch_size) >= 1.0]
    if not full:
        return []
    msg = (f"{len(full)} of {len(sizes)} clients have at most batch_size={cfg.client.batch_size} samples "
           f"(e.g. client {full[0]} with {sizes[full[0]]}): their sampling rate is q = 1, so DP-SGD "
           f"gets no amplification by sampling and their epsilon is much larger")
    log.warning(msg)
    return [msg]


def prepare(cfg: Config) -> Config:
    """Validate everything that needs data, resolve defaults and calibrate; returns a copy."""
    cfg = copy.deepcopy(cfg)
    if not cfg.output.dir:
        cfg.output.dir = default_out_dir(cfg)
    data = load_dataset(cfg.data, cfg.federation.num_clients, cfg.seed)
    sizes = client_sizes(cfg)
    check_compatibility(cfg, sizes)
    build_model(cfg.model, data, cfg.seed, cfg.output.dir)
    from strategies import build_strategy

    build_strategy(cfg)
    calibrate(cfg, sizes)
    warn_small_clients(cfg, sizes)
    return cfg


def run_experiment(cfg: Config, *, progress: bool = True) -> Path:
    """Run one experiment; returns its run directory (rounds.csv, clients.csv, summary.json...)."""
    out_dir = Path(cfg.output.dir or default_out_dir(cfg))
    cfg = copy.deepcopy(cfg)
    cfg.output.dir = str(out_dir)
    with run_log(out_dir):
        cfg = prepare(cfg)
        if cfg.runtime.name == "inprocess":
            run_inprocess(cfg, progress=progress)
        else:
            from fedsim.runtime.ray_runtime import run_ray

            run_ray(cfg, progress=progress)
    return out_dir


def run_inprocess(cfg: Config, *, progress: bool = True):
    from clients.app import make_client_app
    from fedsim.runtime.inprocess import SERVER_NODE_ID, InProcessGrid
    from fedsim.server import server_main

    run_config = run_config_for(cfg)
    grid = InProcessGrid(make_client_app(), cfg.federation.num_clients, run_config)
    context = Context(run_id=1, node_id=SERVER_NODE_ID, node_config={}, state=RecordDict(),
                      run_config=run_config)
    return server_main(grid, context, progress=progress)
