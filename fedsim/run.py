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

from clients.app import choose_engine, make_client_app, train_round
from fedsim.algorithms import algorithm_names, get_algorithm
from fedsim.config import Config, check_before_training
from fedsim.datasets import load_dataset
from fedsim.errors import ConfigError
from fedsim.experiment import run_config_for
from fedsim.lora import set_trainable
from fedsim.models import build_model
from fedsim.partition import partition
from fedsim.privacy.accounting import calibrate_noise, poisson_sample_rate, steps_per_round
from fedsim.results import run_log
from fedsim.runtime.inprocess import SERVER_NODE_ID, InProcessGrid
from fedsim.runtime.ray_runtime import run_ray
from fedsim.server import RunRecorder, build_strategy, server_main

log = logging.getLogger("fedsim")

def default_out_dir(cfg: Config) -> str:
    return str(Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")


def client_sizes(cfg: Config) -> list[int]:
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


def is_lora_model(cfg: Config) -> bool:
    return cfg.model.name.startswith("lora-") or cfg.model.name == "hf-text"


def check_compatibility(cfg: Config, sizes: list[int]) -> None:
    """Cross-cutting rules between algorithm, model, data and privacy settings: the generic
    ones here, each algorithm's own in its `Algorithm.check` (e.g. bags refuses DP-SGD)."""
    algorithm = get_algorithm(cfg.strategy.name)
    if is_lora_model(cfg) and algorithm.client.trainable == "all":
        lora = [n for n in algorithm_names() if get_algorithm(n).client.trainable != "all"]
        raise ConfigError(f"strategy.name: model {cfg.model.name!r} trains LoRA adapters; use one of "
                          f"{', '.join(lora)} (got {cfg.strategy.name!r})")
    data = load_dataset(cfg.data, cfg.federation.num_clients, cfg.seed)
    if (cfg.model.name == "hf-text") != bool(data.tokenizer):
        raise ConfigError("model.name: hf-text reads tokenized text (data.dataset = 'text-topics', or a file "
                          "with data.text_column), and text data needs model hf-text "
                          f"(got model {cfg.model.name!r} with dataset {cfg.data.dataset!r})")
    algorithm.check(cfg.strategy.params, cfg, data, sizes)


def check_engine(cfg: Config, model) -> None:
    """An explicit ``runtime.engine = "vectorized"`` that cannot run is refused before any work."""
    if cfg.runtime.engine != "vectorized":
        return
    if cfg.runtime.name != "inprocess":
        raise ConfigError(f"runtime.engine: vectorized trains a round's clients together in the in-process "
                          f"runtime; runtime {cfg.runtime.name!r} runs one client per message (use auto)")
    rule = get_algorithm(cfg.strategy.name).client
    set_trainable(model, rule.trainable)
    choose_engine("vectorized", model, rule)


def warn_small_clients(cfg: Config, sizes: list[int]) -> list[str]:
    """Clients with n <= batch size get q = 1 under Opacus: no amplification by sampling."""
    if cfg.privacy.noise_multiplier <= 0:
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
    check_before_training(cfg, sizes)  # delta < 1/n, the device
    check_compatibility(cfg, sizes)
    model = build_model(cfg.model, data, cfg.seed, cfg.output.dir)
    check_engine(cfg, model)
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
            run_ray(cfg, progress=progress)
    return out_dir


def run_inprocess(cfg: Config, *, progress: bool = True) -> RunRecorder:
    run_config = run_config_for(cfg)
    grid = InProcessGrid(make_client_app(), cfg.federation.num_clients, run_config, train_round=train_round)
    context = Context(run_id=1, node_id=SERVER_NODE_ID, node_config={}, state=RecordDict(),
                      run_config=run_config)
    return server_main(grid, context, progress=progress)
