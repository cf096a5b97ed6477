"""One experiment, from a validated config to a finished run directory.

`prepare` does everything that can fail on bad input *before* any training:
partitioning, model and strategy construction, target-epsilon calibration, bag sizes.
`run_experiment` then hands the config to the chosen runtime, after making sure it
overwrites nothing: a finished run or an unfinished one with results is refused unless
the caller resumes it or asks to overwrite it.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import gc
import logging
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from flwr.app import Context, RecordDict

from fedsim.clients.app import choose_engine, make_client_app, release_run, train_round
from fedsim.algorithms import algorithm_names, get_algorithm
from fedsim.checkpoint import Checkpoint, config_difference, load_checkpoint
from fedsim.config import Config, check_before_training, dumps_toml
from fedsim.datasets import Dataset, load_dataset
from fedsim.errors import ConfigError, FedsimError
from fedsim.experiment import run_config_for
from fedsim.lora import set_trainable
from fedsim.models import build_model
from fedsim.partition import partition
from fedsim.privacy.accounting import (calibrate_noise, calibrate_per_client, calibrate_user_noise,
                                      check_user_accounting, poisson_sample_rate, steps_per_round)
from fedsim.results import read_summary, remove_run_files, run_log, run_state
from fedsim.runtime.inprocess import SERVER_NODE_ID, InProcessGrid
from fedsim.runtime.ray_engine import run_ray
from fedsim.runtime.ray_runtime import run_flower
from fedsim.privacy.faults import FAULT_ENV, active_fault
from fedsim.privacy.secure_noise import resolve_secure_noise
from fedsim.threads import run_threads, torch_threads
from fedsim.schedule import client_sampling, participation_counts, user_accounting_args, user_mechanism
from fedsim.server import RunRecorder, build_strategy, server_main

log = logging.getLogger("fedsim")

def default_out_dir(cfg: Config) -> str:
    return str(Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")


def client_sizes(cfg: Config, data: Dataset | None = None) -> list[int]:
    """Each client's number of training rows (`data`: the experiment's dataset, if loaded)."""
    return [len(idx) for idx in partition(cfg, data).indices]


def sample_level_plans(cfg: Config, sizes: list[int]) -> list[tuple[float, int]]:
    """Distinct (q, total DP-SGD steps) of the clients that train, at their REALIZED participation.

    Which clients train in which round is seeded and data-independent (`fedsim.schedule`,
    the same function the server samples with), so each client's number of participations
    is known before the run. Calibrating to the expected rounds * K / N instead leaves every
    client sampled more often than average above the target. Clients the schedule never
    picks release nothing and add no plan.
    """
    return sorted({plan for plan in client_plans(cfg, sizes) if plan is not None})


def client_plans(cfg: Config, sizes: list[int]) -> list[tuple[float, int] | None]:
    """Each client's (q, total DP-SGD steps) at its realized participations, by partition
    id; None for a client the schedule never picks."""
    fed, c = cfg.federation, cfg.client
    counts = participation_counts(cfg.seed, fed.rounds, fed.num_clients, fed.clients_per_round,
                                  client_sampling(cfg))
    return [(poisson_sample_rate(n, c.batch_size), times * steps_per_round(n, c.batch_size, c.local_epochs,
                                                                           c.local_steps)) if times > 0 else None
            for n, times in zip(sizes, counts)]


def calibrate(cfg: Config, sizes: list[int]) -> Config:
    """Replace target epsilons by the noise multipliers that reach them.

    Sample level: the smallest sigma at which EVERY client's final epsilon is <= the target
    (the tightest client, by realized participations and size, lands within 0.1% below it).
    A client that fails and is skipped trains less, so its epsilon only falls. User level:
    `user_level_epsilon` itself, for the sampling mode that runs (`client_sampling`) and the
    mechanism, over the rounds: the reported user-level epsilon lands in [0.999 T, T]. A
    user-level accountant that cannot bound the sampling mode is refused here, before any work.
    """
    p = cfg.privacy
    if p.target_epsilon > 0 and p.calibration == "per-client":
        found = calibrate_per_client(p.target_epsilon, client_plans(cfg, sizes), p.delta, p.accountant)
        worst = max(v for v in found if v is not None)
        # a client the schedule never picks never trains: the largest sigma, should a resumed
        # or redeployed federation pick it after all
        p.client_noise_multipliers = [worst if v is None else v for v in found]
        p.noise_multiplier = worst
        trained = sorted(v for v in found if v is not None)
        log.info("target sample-level epsilon %.3g, per client -> noise_multiplier %.4f to %.4f (median %.4f)",
                 p.target_epsilon, trained[0], trained[-1], trained[len(trained) // 2])
    elif p.target_epsilon > 0:
        p.client_noise_multipliers = []
        p.noise_multiplier = calibrate_noise(p.target_epsilon, sample_level_plans(cfg, sizes),
                                             p.delta, p.accountant)
        log.info("target sample-level epsilon %.3g -> noise_multiplier %.4f", p.target_epsilon, p.noise_multiplier)
    if p.user_noise_multiplier > 0 or p.user_target_epsilon > 0:
        check_user_accounting(p.accountant, client_sampling(cfg), user_mechanism(cfg))
    if p.user_target_epsilon > 0:
        p.user_noise_multiplier = calibrate_user_noise(p.user_target_epsilon, **user_accounting_args(cfg))
        log.info("target user-level epsilon %.3g -> user_noise_multiplier %.4f",
                 p.user_target_epsilon, p.user_noise_multiplier)
    return cfg


def is_lora_model(cfg: Config) -> bool:
    return cfg.model.name.startswith("lora-") or cfg.model.name == "hf-text"


def check_compatibility(cfg: Config, sizes: list[int], data: Dataset) -> None:
    """Cross-cutting rules between algorithm, model, data and privacy settings: the generic
    ones here, each algorithm's own in its `Algorithm.check` (e.g. bags refuses DP-SGD).
    `data` is the experiment's loaded dataset."""
    algorithm = get_algorithm(cfg.strategy.name)
    if is_lora_model(cfg) and algorithm.client.trainable == "all":
        lora = [n for n in algorithm_names() if get_algorithm(n).client.trainable != "all"]
        raise ConfigError(f"strategy.name: model {cfg.model.name!r} trains LoRA adapters; use one of "
                          f"{', '.join(lora)} (got {cfg.strategy.name!r})")
    if (cfg.model.name == "hf-text") != bool(data.tokenizer):
        raise ConfigError("model.name: hf-text reads tokenized text (data.dataset = 'text-topics', or a file "
                          "with data.text_column), and text data needs model hf-text "
                          f"(got model {cfg.model.name!r} with dataset {cfg.data.dataset!r})")
    algorithm.check(cfg.strategy.params, cfg, data, sizes)


def check_engine(cfg: Config, model) -> None:
    """An explicit ``runtime.engine = "vectorized"`` that cannot run is refused before any work."""
    if cfg.runtime.engine != "vectorized":
        return
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


def warn_private_label_stats(cfg: Config, data) -> list[str]:
    """A DP run whose regression target is standardized by its training labels' own mean and
    std releases two statistics of the private labels that no accountant covers."""
    p = cfg.privacy
    private = p.noise_multiplier > 0 or p.target_epsilon > 0 or p.user_noise_multiplier > 0 or p.user_target_epsilon > 0
    if not private or data.task != "regression" or data.label_stats != "train":
        return []
    msg = (f"the regression target of {cfg.data.path or cfg.data.dataset} is standardized with its training "
           f"labels' mean and std, which epsilon does not cover; set data.label_range to the target's public "
           f"range [a, b]")
    log.warning(msg)
    return [msg]


def prepare(cfg: Config, *, deployment: bool = False) -> Config:
    """Validate everything that needs data, resolve defaults and calibrate; returns a copy.
    The dataset is loaded once here and handed to each step that reads it. `deployment`:
    the clients are real SuperNodes (`fedsim.serverapp`), which ``privacy.secure_noise =
    "auto"`` turns on for; the resolved mode is what the clients receive."""
    cfg = copy.deepcopy(cfg)
    resolve_noise_mode(cfg, deployment=deployment)
    if not cfg.output.dir:
        cfg.output.dir = default_out_dir(cfg)
    data = load_dataset(cfg.data, cfg.federation.num_clients, cfg.seed)
    sizes = client_sizes(cfg, data)
    check_before_training(cfg, sizes)  # delta < 1/n, the device
    check_compatibility(cfg, sizes, data)
    model = build_model(cfg.model, data, cfg.seed, cfg.output.dir)
    check_engine(cfg, model)
    build_strategy(cfg)
    calibrate(cfg, sizes)
    warn_small_clients(cfg, sizes)
    warn_private_label_stats(cfg, data)
    return cfg


def resolve_noise_mode(cfg: Config, *, deployment: bool) -> None:
    """``privacy.secure_noise = "auto"`` resolved, and said so in the run log. Under a
    deployment `cfg` gets ``on``: the nodes read it from the experiment the server sends them.
    A simulation keeps ``auto``, which every reader takes as off (`is_secret`): its
    config.toml stays what the user wrote, as sweeps and resumes compare it."""
    resolved = resolve_secure_noise(cfg.privacy.secure_noise, deployment=deployment)
    if cfg.privacy.secure_noise == "auto":
        log.info("privacy.secure_noise: auto is %s (%s)", resolved,
                 "a deployment: noise from the OS CSPRNG" if deployment
                 else "a simulation: noise from the seed, reproducible")
        if deployment:
            cfg.privacy.secure_noise = resolved


class Terminated(KeyboardInterrupt):
    """SIGTERM (a timeout, ``docker stop``, a batch scheduler) during a run. It is a
    KeyboardInterrupt so that it ends the run as Ctrl-C does: status "interrupted", finished
    rounds and the last checkpoint kept. The CLI exits with 143 (128 + 15) for it, 130 for Ctrl-C."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into `Terminated` inside the block. Only from the main thread (where Python
    runs signal handlers) and only when no one else handles SIGTERM: a handler the caller
    installed is left alone."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
            signal.SIG_DFL, None):
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated(f"signal {signum} (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def claim_run_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> tuple[str, Checkpoint | None]:
    """What to do with `out_dir` before a run starts in it: ``("fresh", None)`` (the old run's
    files, if any, are removed), ``("resume", checkpoint)``, or ``("finished", None)`` (resume
    asked of a finished run: nothing to do).

    Refuses (`FedsimError`) a directory a live run is writing, and, unless told to resume or
    overwrite, a finished run or an unfinished one that has finished rounds or a checkpoint.
    """
    state = run_state(out_dir)
    summary = read_summary(out_dir) or {}
    if state == "running":
        raise FedsimError(f"output.dir: {out_dir}: a run is writing it (pid {summary.get('pid')} on "
                          f"{summary.get('host')}); stop it first")
    if overwrite:
        remove_run_files(out_dir)
        return "fresh", None
    if state == "finished":
        if resume:
            return "finished", None
        raise FedsimError(f"output.dir: {out_dir}: finished run; use --resume, or --overwrite")
    checkpoint = load_checkpoint(out_dir)
    if resume and checkpoint is not None:
        return "resume", checkpoint
    done = summary.get("rounds_completed") or 0
    if not resume and (checkpoint is not None or done):
        raise FedsimError(f"output.dir: {out_dir}: unfinished run ({state} after round {done} of "
                          f"{summary.get('rounds_planned', '?')}); use --resume, or --overwrite")
    remove_run_files(out_dir)  # nothing to keep: no round finished, or resume without a checkpoint
    return "fresh", None


def check_resumable(cfg: Config, checkpoint: Checkpoint, out_dir: Path) -> None:
    """A checkpoint continues only the config it was taken with (the run directory may move)."""
    if cfg.runtime.name == "flower":
        raise ConfigError("runtime.name: resuming needs a runtime whose node state a checkpoint holds, "
                          "inprocess or ray (got 'flower')")
    diff = config_difference(checkpoint.config, dumps_toml(cfg))
    if diff is not None:
        raise ConfigError(f"--resume: {out_dir} was checkpointed with another config: {diff}; resume with the "
                          f"same config, or start again with --overwrite")


def run_experiment(cfg: Config, *, progress: bool = True, resume: bool = False, overwrite: bool = False) -> Path:
    """Run one experiment; returns its run directory (rounds.csv, clients.csv, summary.json,
    config.toml, run.log, model.safetensors).

    The directory (``cfg.output.dir``, default ``runs/<name>-<timestamp>``) must not hold
    another run's results: a finished run, or an unfinished one with finished rounds, is
    refused with a `FedsimError`. ``resume=True`` continues an unfinished run there from its
    checkpoint (the same config, else `ConfigError`), returns a finished one as it is, and
    starts afresh if there is no checkpoint. ``overwrite=True`` deletes the run's files
    first. SIGTERM ends the run like Ctrl-C (`Terminated`, a KeyboardInterrupt): status
    "interrupted", the checkpoint kept for a resume.
    """
    if resume and overwrite:
        raise ConfigError("run: resume and overwrite exclude each other (got both)")
    out_dir = Path(cfg.output.dir or default_out_dir(cfg))
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "output.dir is a file, not a directory", str(out_dir))
    cfg = copy.deepcopy(cfg)
    cfg.output.dir = str(out_dir)
    action, checkpoint = claim_run_dir(out_dir, resume=resume, overwrite=overwrite)
    if action == "finished":
        log.info("%s: finished run, nothing to resume", out_dir)
        return out_dir
    with sigterm_as_interrupt(), run_log(out_dir):
        if fault := active_fault():
            log.warning("%s=%s is set: this run contains a deliberate privacy bug of fedsim's audit tests, "
                        "and its epsilon is wrong (summary.json records test_fault)", FAULT_ENV, fault)
        cfg = prepare(cfg)
        if checkpoint is not None:
            check_resumable(cfg, checkpoint, out_dir)
        with torch_threads(run_threads(cfg.runtime)) as threads:
            log.info("torch: %d intra-op thread(s) in this process (runtime.torch_threads = %d%s)", threads,
                     cfg.runtime.torch_threads, ", auto" if not cfg.runtime.torch_threads else "")
            if cfg.runtime.name == "inprocess":
                run_inprocess(cfg, progress=progress, resume=checkpoint)
            elif cfg.runtime.name == "ray":
                run_ray(cfg, progress=progress, resume=checkpoint)
            else:
                run_flower(cfg, progress=progress)
    return out_dir


def run_inprocess(cfg: Config, *, progress: bool = True, resume: Checkpoint | None = None) -> RunRecorder:
    run_config = run_config_for(cfg)
    grid = InProcessGrid(make_client_app(), cfg.federation.num_clients, run_config, train_round=train_round)
    context = Context(run_id=1, node_id=SERVER_NODE_ID, node_config={}, state=RecordDict(),
                      run_config=run_config)
    try:
        with frozen_heap():
            return server_main(grid, context, progress=progress, resume=resume)
    finally:
        release_run()  # what the clients kept between rounds (buffers, a model), not between runs


_FREEZERS = [0]  # runs of this process inside `frozen_heap` now (a sweep may run several in threads)
_FREEZE_LOCK = threading.Lock()


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """The objects alive when the rounds start (torch, Flower, the datasets: about 300k) moved
    out of the collector's reach (`gc.freeze`) until the last run in here ends (`gc.unfreeze`).

    A round's replies live long enough to be promoted to the oldest generation, so every few
    dozen rounds they trigger a full collection, which walks every object of the process: 0.15 s
    of CPU on the 2-core machine, over a quarter of the rounds' own CPU time on the digits
    workload of benchmarks/peers.py (docs/engines.md). Frozen objects are still freed by reference counting; only cycles
    among them wait for the unfreeze. A process whose heap something else froze, or with the
    collector off, is left as it is."""
    with _FREEZE_LOCK:
        mine = _FREEZERS[0] > 0 or (gc.isenabled() and gc.get_freeze_count() == 0)
        if mine:
            if _FREEZERS[0] == 0:
                gc.freeze()
            _FREEZERS[0] += 1
    try:
        yield
    finally:
        if mine:
            with _FREEZE_LOCK:
                _FREEZERS[0] -= 1
                if _FREEZERS[0] == 0:
                    gc.unfreeze()
