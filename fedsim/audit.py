"""`fedsim audit`: an empirical lower bound on epsilon beside the accountant's upper bound.

One training run with canaries (Steinke, Nasr & Jagielski, NeurIPS 2023, "Privacy Auditing
with One (1) Training Run"): m canaries, each included independently with probability 1/2,
are planted in the clients' data; the experiment runs once, exactly as `fedsim run` would;
each canary is scored on the final model, the most and least confident are guessed "in"
and "out", and the number of correct guesses becomes a lower bound on epsilon at the
run's delta with confidence 1 - beta (`fedsim.privacy.audit`).

Levels and modes:

* ``sample`` / ``whitebox``: gradient canaries (`fedsim.privacy.canaries`), a fixed random
  direction per canary whose per-sample gradient enters DP-SGD's clipped sum (both engines),
  scored by the model's displacement along it. The canary's norm is ``canary_norm`` x C: a
  correct clip cuts it to C, a missing one shows.
* ``user`` / ``whitebox``: canary clients (McMahan et al. 2018's user-level unit), whose whole
  update is a fixed direction of norm ``canary_norm`` x ``privacy.user_clip``; each included
  one joins every round with the Poisson client rate q = K/N and goes through the user-level
  layer (`fedsim.central_dp`): clipped with the real updates, summed, noised once, divided by
  the expected cohort. Scored by the model's displacement along the direction.

The audit is a test of the code as much as of the accounting: a lower bound above the
upper bound means one of them is wrong (tests/privacy/test_audit.py injects such bugs).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch


from fedsim.algorithms import get_algorithm
from fedsim.checkpoint import load_model
from fedsim.config import Config
from fedsim.datasets import load_dataset
from fedsim.errors import ConfigError
from fedsim.lora import set_trainable
from fedsim.models import as_tensors, build_model, loss_fn
from fedsim.privacy.audit import ALL_ANALYSES, audit_bounds
from fedsim.privacy.canaries import make_example_canaries, make_gradient_canaries, planted
from fedsim.results import read_summary
from fedsim.run import run_experiment
from fedsim.schedule import client_sampling

log = logging.getLogger("fedsim")

AUDIT_JSON = "audit.json"
LEVELS = ("sample", "user")
MODES = ("whitebox", "blackbox")
REFERENCE = "steinke"  # the analysis whose bound is `epsilon_lower`: sound against any accountant


def default_guesses(m: int) -> list[int]:
    """The numbers of guesses searched (beta is split over them): from 2% of the canaries
    (a few very confident guesses, best when epsilon is large) to all of them."""
    return sorted({max(1, round(f * m)) for f in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)})


def _check(cfg: Config, level: str, mode: str, canaries: int, beta: float, canary_norm: float) -> None:
    if level not in LEVELS:
        raise ConfigError(f"--level: must be one of {', '.join(LEVELS)} (got {level!r})")
    if mode not in MODES:
        raise ConfigError(f"--mode: must be one of {', '.join(MODES)} (got {mode!r})")
    if canaries < 2:
        raise ConfigError(f"--canaries: must be >= 2 (got {canaries})")
    if not 0 < beta < 1:
        raise ConfigError(f"--beta: must be in (0, 1) (got {beta})")
    if not canary_norm >= 1:
        raise ConfigError(f"--canary-norm: must be >= 1 (a multiple of privacy.max_grad_norm; got {canary_norm})")
    if cfg.runtime.name != "inprocess":
        raise ConfigError(f"runtime.name: an audit plants its canaries in this process's clients, so it needs "
                          f"'inprocess' (got {cfg.runtime.name!r})")
    rule = get_algorithm(cfg.strategy.name).client
    p = cfg.privacy
    if level == "user" and mode != "whitebox":
        raise ConfigError("--mode: a user-level audit is white-box (canary clients' updates); use --mode whitebox")
    if mode == "blackbox" and cfg.model.name == "hf-text":
        raise ConfigError("--mode: black-box canary examples are numeric feature rows; model.name 'hf-text' "
                          "takes token ids: use --mode whitebox")
    if level == "user":
        if not (p.user_noise_multiplier > 0 or p.user_target_epsilon > 0):
            raise ConfigError("privacy.user_noise_multiplier: a user-level audit needs the user-level DP layer "
                              "(user_noise_multiplier or user_target_epsilon > 0)")
        if client_sampling(cfg) != "poisson":
            raise ConfigError(f"federation.sampling: a user-level audit draws its canary clients by Poisson "
                              f"sampling, the sampling its epsilon must then be accounted for; set 'poisson' "
                              f"(got {client_sampling(cfg)!r})")
        if p.user_mechanism != "gaussian" or p.user_clip_quantile > 0:
            raise ConfigError("privacy.user_mechanism: a user-level audit needs the Gaussian mechanism at a fixed "
                              "clip (user_mechanism = 'gaussian', user_clip_quantile = 0)")
        return
    if rule.local_train is not None:
        raise ConfigError(f"strategy.name: {cfg.strategy.name!r} trains with its own local loop, which takes no "
                          f"gradient canaries; audit a DP-SGD algorithm (fedavg, fedprox, scaffold, ...)")


def run_audit(cfg: Config, *, level: str = "sample", mode: str = "whitebox", canaries: int = 1000,
              beta: float = 0.05, canary_norm: float = 4.0, guesses: list[int] | None = None,
              analyses: tuple[str, ...] = ALL_ANALYSES, progress: bool = False, overwrite: bool = False) -> dict:
    """Run `cfg` once with `canaries` canaries and write ``audit.json`` into its run directory.

    Returns the record written: ``epsilon_lower`` (Steinke et al., the reference),
    ``epsilon_upper`` and ``accountant`` (the run's largest sample-level epsilon, and who
    computed it; None without DP), ``ratio``, ``delta``, ``beta``, ``canaries``,
    ``guesses``, ``correct``, ``level``, ``mode``, ``run_dir``, and ``analyses``: each
    analysis' bound with its guesses (each holds at 1 - beta on its own).
    """
    _check(cfg, level, mode, canaries, beta, canary_norm)
    cfg = copy.deepcopy(cfg)
    data = load_dataset(cfg.data, cfg.federation.num_clients, cfg.seed)
    start = build_model(cfg.model, data, cfg.seed, cfg.output.dir)
    set_trainable(start, get_algorithm(cfg.strategy.name).client.trainable)
    before = {k: p.detach().clone() for k, p in start.named_parameters() if p.requires_grad}
    fed = cfg.federation
    clip = cfg.privacy.user_clip if level == "user" else cfg.privacy.max_grad_norm
    if mode == "blackbox":
        plan = make_example_canaries(np.asarray(data.x_test), data.num_classes, canaries, holders=fed.num_clients,
                                     seed=cfg.seed + 7919)
    else:
        plan = make_gradient_canaries({k: tuple(v.shape) for k, v in before.items()}, canaries,
                                      norm=canary_norm * clip, holders=fed.num_clients, seed=cfg.seed + 7919,
                                      level=level, client_rate=fed.clients_per_round / fed.num_clients)
    with planted(plan):
        run_dir = run_experiment(cfg, progress=progress, overwrite=overwrite)
    final = load_model(run_dir)
    if mode == "blackbox":
        scores = example_scores(final, plan.x, plan.y, data.task)
    else:
        scores = plan.scores(before, dict(final.named_parameters()))
    summary = read_summary(run_dir) or {}
    claim = (summary.get("user_level") if level == "user" else summary.get("sample_level")) or {}
    upper = claim.get("epsilon_max") if level == "sample" else claim.get("epsilon")
    delta = float(cfg.privacy.delta)
    bounds = audit_bounds(scores, plan.included, delta=delta, beta=beta,
                          guesses=guesses or default_guesses(canaries), analyses=analyses)
    lower = bounds["epsilon_lower"][REFERENCE] if REFERENCE in analyses else max(bounds["epsilon_lower"].values())
    reference = REFERENCE if REFERENCE in analyses else max(bounds["epsilon_lower"], key=bounds["epsilon_lower"].get)
    record = {
        "level": level, "mode": mode, "canaries": canaries, "included": int(plan.included.sum()),
        "canary_norm": getattr(plan, "norm", None), "delta": delta, "beta": beta,
        "epsilon_lower": _finite(lower), "analysis": reference,
        "epsilon_upper": upper, "accountant": claim.get("accountant"),
        "noise_multiplier": claim.get("noise_multiplier"),
        "ratio": _finite(lower / upper) if upper else None,
        "guesses": bounds["guesses"][reference], "correct": bounds["correct"][reference],
        "analyses": {name: {"epsilon_lower": _finite(bounds["epsilon_lower"][name]),
                            "guesses": bounds["guesses"][name], "correct": bounds["correct"][name],
                            "guesses_in": bounds["guesses_in"][name], "guesses_out": bounds["guesses_out"][name]}
                     for name in bounds["epsilon_lower"]},
        "candidates": bounds["candidates"],
        "gdp_mu_lower": bounds.get("gdp_mu_lower"),
        "gaussian_mu_lower": _finite(bounds.get("gaussian_mu_lower")),
        "score_sd_ratio": _finite(bounds.get("score_sd_ratio")),
        "run_dir": str(run_dir),
    }
    (Path(run_dir) / AUDIT_JSON).write_text(json.dumps(record, indent=2) + "\n")
    log.info("audit: epsilon_lower=%.3f (%s, beta=%g) epsilon_upper=%s (%s) guesses=%s correct=%s", lower,
             reference, beta, f"{upper:.3f}" if upper is not None else "none", record["accountant"],
             record["guesses"], record["correct"])
    return record


@torch.no_grad()
def example_scores(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, task: str) -> np.ndarray:
    """Minus each canary example's loss under the trained model: a trained-on example fits better."""
    model.eval()
    inputs, labels = as_tensors(x, y, task)
    return (-loss_fn(task, reduction="none")(model(inputs), labels)).double().numpy()


def _finite(value):
    """JSON has no Infinity: an infinite bound (perfect separation) is written as a string."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else "inf"


def read_audit(run_dir: str | Path) -> dict | None:
    """A run directory's audit.json, or None."""
    path = Path(run_dir) / AUDIT_JSON
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


__all__ = ["AUDIT_JSON", "default_guesses", "read_audit", "run_audit"]
