"""Epsilon from a DP-SGD history, fast enough to call every client-round.

A history is Opacus's: a list of (noise_multiplier, sample_rate, steps). Opacus's
`get_epsilon` costs 100-300 ms per call because it recomputes the RDP curve each
time. RDP composes additively, so the curve of one step is computed once per
(sigma, q) and scaled by the step count: the same epsilon in about 0.05 ms. The curve itself
is Opacus' `compute_rdp`, vectorized over orders and series terms (`fedsim.privacy.rdp`):
2-25 ms instead of 15-500 ms per (sigma, q), which matters because every client size gives
its own q and calibration tries many sigmas.
PRV has no such shortcut, so its results are cached per whole history (clients
with the same size share a history, so the cache hits often).

Every epsilon fedsim prints names its level, accountant, delta and sampling
(`accountant_label`, `user_accountant_label`).

`privacy.accountant` picks the accountant at both levels: ``rdp`` (fedsim's RDP curve above,
Opacus' formulas), ``prv`` (Opacus' PRV accountant) or ``pld`` (dp-accounting's privacy loss
distributions, Meiser and Mohammadi 2018, Koskela et al. 2020; ``PLDAccountant``), all three
for Poisson sampling. The user level (`user_level_epsilon`) adds the events whose sampling or
neighbouring relation differs, from dp-accounting: fixed-size cohorts without replacement,
cyclic cohorts (no sampling randomness) and DP-FTRL tree aggregation.
"""

from __future__ import annotations

import functools
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from fedsim.errors import ConfigError
from fedsim.privacy.faults import fault
from fedsim.privacy.rdp import compute_rdp_curve, privacy_spent

History = Sequence[tuple[float, float, int]]
# Opacus' orders, plus larger ones (as dp-accounting has): with large sigma or few steps the
# best order lies above 63, where Opacus' list stops (it then warns and overstates epsilon).
# Wherever the best order is <= 63, epsilon equals Opacus' get_epsilon exactly.
# Opacus' RDPAccountant.DEFAULT_ALPHAS, written out (a test holds them equal) so that computing an
# epsilon does not import Opacus, whose import costs 2-3 s of every run's start.
OPACUS_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
ORDERS: tuple[float, ...] = OPACUS_ORDERS + (80, 96, 128, 192, 256, 512, 1024)
ACCOUNTANTS = ("rdp", "prv", "pld")
SAMPLING_MODES = ("poisson", "fixed", "cyclic")  # how the server picks a round's clients (`fedsim.schedule`)
USER_MECHANISMS = ("gaussian", "tree")


def accountant_label(name: str) -> str:
    """How an accountant is named next to every epsilon fedsim reports."""
    return {"rdp": "RDP (Opacus)", "prv": "PRV (Opacus)", "pld": "PLD (dp-accounting)"}[name]


@functools.lru_cache(maxsize=4096)
def rdp_curve(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of ONE step of the subsampled Gaussian mechanism at every order in ORDERS (read-only:
    it is cached). Equals Opacus' `compute_rdp(q, sigma, steps=1, orders=ORDERS)` up to float
    rounding: |difference| <= 1e-9 |value| + 1e-12 / (alpha - 1), see `fedsim.privacy.rdp`."""
    curve = np.asarray(compute_rdp_curve(sample_rate, noise_multiplier, ORDERS), dtype=float)
    curve.flags.writeable = False
    return curve


def _normalize(history: Iterable[tuple[float, float, int]]) -> tuple[tuple[float, float, int], ...]:
    return tuple((float(s), float(q), int(n)) for s, q, n in history if n > 0)


@functools.lru_cache(maxsize=4096)
def _rdp_epsilon(hist: tuple[tuple[float, float, int], ...], delta: float) -> float:
    total = sum(n * rdp_curve(s, q) for s, q, n in hist)
    eps, _ = privacy_spent(ORDERS, total, delta)
    return float(eps)


@functools.lru_cache(maxsize=256)
def _one_step_pld(noise_multiplier: float, sample_rate: float):
    """dp-accounting's PLD of ONE Poisson-subsampled Gaussian step (add/remove neighbours,
    discretization 1e-4, as `PLDAccountant` builds it): about 0.6 s, half the cost of an
    epsilon, so it is built once per (sigma, q) and self-composed per history."""
    from dp_accounting.pld import privacy_loss_distribution

    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier, sampling_prob=sample_rate, value_discretization_interval=1e-4)


@functools.lru_cache(maxsize=1024)
def _pld_epsilon(hist: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """dp-accounting's PLD accountant on the same Poisson-subsampled Gaussian steps: each
    (sigma, q) step's PLD self-composed over its steps, then composed (what `PLDAccountant`
    does), 0.2-0.8 s per history, hence the memo."""
    total = None
    for sigma, q, steps in hist:
        if q == 0:  # never sampled: releases nothing (as PLDAccountant skips it)
            continue
        part = _one_step_pld(sigma, q).self_compose(steps)
        total = part if total is None else total.compose(part)
    return 0.0 if total is None else float(total.get_epsilon_for_delta(delta))


def memoize_opacus_rdp() -> None:
    """Memoize Opacus' one-order RDP of the subsampled Gaussian, a pure function of
    (q, sigma, order). Opacus' PRV accountant sizes its domain with an RDP bound over 150
    orders, the fractional ones a slow series in Python: 90% of a PRV epsilon's 0.3 s. A
    run asks for each client's epsilon every round at the same (q, sigma), so the memo
    makes those calls cheap and leaves every value bit for bit what Opacus computes."""
    from opacus.accountants.analysis import rdp as opacus_rdp

    if not hasattr(opacus_rdp._compute_rdp, "cache_info"):
        opacus_rdp._compute_rdp = functools.lru_cache(maxsize=1 << 16)(opacus_rdp._compute_rdp)


@functools.lru_cache(maxsize=1024)
def _prv_epsilon(hist: tuple[tuple[float, float, int], ...], delta: float) -> float:
    from opacus.accountants import PRVAccountant  # here: Opacus' import costs 2-3 s

    memoize_opacus_rdp()
    acc = PRVAccountant()
    acc.history = list(hist)
    with warnings.catch_warnings():
        # Opacus sizes the PRV's domain with an RDP bound at delta_error / (8 * steps); that
        # bound's best order often sits at the grid's edge, which only makes the domain wider
        # (safe, slower). The warning speaks of that bound, not of the epsilon reported here.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        # Opacus' PRV pdf evaluates log((e^t + q - 1) / q) on the whole grid and masks the
        # points t <= log(1 - q) with np.where; where the grid hits t = log(1 - q) numpy
        # warns of a log(0) that the mask then discards
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(acc.get_epsilon(delta=delta))


def clear_memos() -> None:
    """Forget every memoized RDP curve and epsilon, so the next calls compute as a fresh
    process would (benchmarks time runs that way; the memos themselves cannot go stale)."""
    for memo in (rdp_curve, _rdp_epsilon, _prv_epsilon, _pld_epsilon, _one_step_pld, _user_epsilon,
                 without_replacement_rdp):
        memo.cache_clear()
    opacus_rdp = sys.modules.get("opacus.accountants.analysis.rdp")
    if opacus_rdp is not None and hasattr(opacus_rdp._compute_rdp, "cache_clear"):
        opacus_rdp._compute_rdp.cache_clear()


def epsilon(history: History, delta: float, accountant: str = "rdp") -> float:
    """(epsilon, delta)-DP of a DP-SGD history: 0 with no steps, inf when a step had no noise."""
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"privacy.accountant: must be one of {', '.join(ACCOUNTANTS)} (got {accountant!r})")
    hist = _normalize(history)
    if fault("accountant_half_q"):  # test-only (`fedsim.privacy.faults`): an audit must catch it
        hist = tuple((s, q / 2, n) for s, q, n in hist)
    if not hist:
        return 0.0
    if any(s == 0 for s, _, _ in hist):
        return math.inf
    memo = {"rdp": _rdp_epsilon, "prv": _prv_epsilon, "pld": _pld_epsilon}[accountant]
    return memo(hist, delta)


def rdp_epsilon(history: History, delta: float) -> float:
    return epsilon(history, delta, "rdp")


def poisson_sample_rate(num_examples: int, batch_size: int) -> float:
    """The q Opacus uses: make_private rebuilds the loader with q = 1/len(loader) = 1/ceil(n/B)."""
    return 1.0 / math.ceil(num_examples / batch_size)


def steps_per_round(num_examples: int, batch_size: int, local_epochs: int, local_steps: int) -> int:
    """DP-SGD steps one participation adds: fixed local steps, or epochs x ceil(n/B)."""
    return local_steps if local_steps > 0 else local_epochs * math.ceil(num_examples / batch_size)


# --------------------------------------------------------------------------- user level

# What each user-level mechanism and sampling mode can be accounted with, and why not otherwise.
USER_ACCOUNTANTS: dict[tuple[str, str], tuple[str, ...]] = {
    ("gaussian", "poisson"): ("rdp", "prv", "pld"),
    ("gaussian", "fixed"): ("rdp",),  # neither dp-accounting's PLD nor Opacus' PRV has this event
    ("gaussian", "cyclic"): ("rdp", "pld"),  # plain Gaussian compositions: no subsampling to amplify
    ("tree", "poisson"): ("rdp",),    # dp-accounting's tree events exist for RDP only
    ("tree", "fixed"): ("rdp",),
    ("tree", "cyclic"): ("rdp",),
}


def supported_user_accounting() -> str:
    """The supported (mechanism, sampling, accountants) combinations, for error messages."""
    return "; ".join(f"{m} with {s} sampling: {', '.join(a)}" for (m, s), a in USER_ACCOUNTANTS.items())


def check_user_accounting(accountant: str, sampling: str, mechanism: str = "gaussian") -> None:
    """Refuse, with one line, a user-level accountant that cannot bound this mechanism and
    sampling. Called before any training (`fedsim.run.calibrate`) and by `user_level_epsilon`."""
    if sampling not in SAMPLING_MODES:
        raise ConfigError(f"federation.sampling: must be one of {', '.join(SAMPLING_MODES)} (got {sampling!r})")
    if mechanism not in USER_MECHANISMS:
        raise ConfigError(f"privacy.user_mechanism: must be one of {', '.join(USER_MECHANISMS)} (got {mechanism!r})")
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"privacy.accountant: must be one of {', '.join(ACCOUNTANTS)} (got {accountant!r})")
    allowed = USER_ACCOUNTANTS[(mechanism, sampling)]
    if accountant not in allowed:
        what = ("DP-FTRL tree aggregation" if mechanism == "tree"
                else "a fixed cohort drawn without replacement (federation.sampling = 'fixed')" if sampling == "fixed"
                else "cyclic cohorts (federation.sampling = 'cyclic')")
        raise ConfigError(f"privacy.accountant: {accountant!r} cannot account {what} at the user level; use "
                          f"{' or '.join(repr(a) for a in allowed)}"
                          + (", or federation.sampling = 'poisson'" if mechanism == "gaussian" else "")
                          + f" (supported: {supported_user_accounting()})")


def user_accountant_label(accountant: str, sampling: str, mechanism: str = "gaussian", restart_every: int = 0) -> str:
    """The accountant, sampling and neighbouring relation behind a user-level epsilon, as
    summary.json, the run log and the tables name it."""
    if mechanism == "tree":
        trees = f"restarted every {restart_every} rounds" if restart_every else "one tree"
        return (f"RDP (dp-accounting), DP-FTRL tree aggregation ({trees}), no sampling assumption "
                f"(realized participations per tree), replace-with-zero neighbours")
    if sampling == "fixed":
        return ("RDP (dp-accounting), fixed cohort of K of N without replacement, replace-one neighbours "
                "(sensitivity 2C)")
    if sampling == "cyclic":
        name = {"rdp": "RDP", "pld": "PLD"}.get(accountant, accountant.upper())
        return (f"{name} (dp-accounting), cyclic cohorts, no sampling assumption (each client's realized "
                f"participations), replace-with-zero neighbours")
    return f"{accountant_label(accountant)}, Poisson client sampling (q = K/N), add/remove neighbours"


def _dp_accounting_rdp(neighbours: str):
    import dp_accounting as dpa
    from dp_accounting.rdp import RdpAccountant

    return dpa, RdpAccountant(orders=list(ORDERS), neighboring_relation=getattr(dpa.NeighboringRelation, neighbours))


@functools.lru_cache(maxsize=256)
def without_replacement_rdp(noise_multiplier: float, num_clients: int, cohort_size: int) -> np.ndarray:
    """RDP at ORDERS of ONE round that draws `cohort_size` of `num_clients` without replacement
    and adds N(0, z^2 C^2) to the sum of updates clipped to C, under replace-one neighbours:
    replacing one client moves the sum by up to 2C, so the Gaussian's noise multiplier on that
    sensitivity is z / 2. dp-accounting's ``SampledWithoutReplacementDpEvent`` (Wang, Balle
    and Kasiviswanathan 2019, "Subsampled Renyi differential privacy and analytical moments
    accountant"); it costs 0.2-0.7 s of dp-accounting's scalar Python, and RDP composes
    additively, so T rounds are T times this curve (read-only: it is cached, in memory and on
    disk under `fedsim.caches.on_disk`, keyed by its inputs and dp-accounting's source, so the
    next run of the same federation reads it back: 0.7 s was a third of a 30-round run)."""
    from fedsim.caches import module_source, on_disk

    key = (float(noise_multiplier), int(num_clients), int(cohort_size), tuple(float(a) for a in ORDERS),
           module_source(__name__), module_source("dp_accounting"))
    curve = on_disk("without-replacement-rdp", key,
                    lambda: _without_replacement_rdp(noise_multiplier, num_clients, cohort_size), np.ndarray)
    curve.flags.writeable = False
    return curve


def _without_replacement_rdp(noise_multiplier: float, num_clients: int, cohort_size: int) -> np.ndarray:
    import logging

    dpa, acc = _dp_accounting_rdp("REPLACE_ONE")
    absl = logging.getLogger("absl")  # some fractional orders do not converge and are dropped (inf)
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        acc.compose(dpa.SampledWithoutReplacementDpEvent(num_clients, cohort_size,
                                                         dpa.GaussianDpEvent(noise_multiplier / 2)))
    finally:
        absl.setLevel(level)
    return np.array(acc.rdp, dtype=float)


def _dp_accounting_epsilon(rdp: np.ndarray, delta: float) -> float:
    """dp-accounting's RDP-to-(epsilon, delta) conversion (`RdpAccountant.get_epsilon`)."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    return float(compute_epsilon(np.asarray(ORDERS, dtype=float), rdp, delta)[0])


def tree_aggregation_event(noise_multiplier: float, rounds: int, restart_every: int = 0,
                           max_participations: int = 1):
    """dp-accounting's event for `rounds` rounds of DP-FTRL's tree aggregation (Kairouz et al.
    2021, "Practical and private (deep) learning without sampling or shuffling", appendix D),
    the tree restarted every `restart_every` rounds (0: one tree over the run).

    ``SingleEpochTreeAggregationDpEvent`` bounds one tree in which each client contributes at
    most once; clients come back in later trees, so the trees are composed (a full tree
    `rounds // restart_every` times, then the partial one), as its docstring asks. A client
    that contributes k times to one tree changes at most k C per tree node, on each of the
    tree's depth levels, so its sensitivity is at most k times the single-contribution one: the
    same event at noise multiplier z / k bounds it (k = `max_participations`, the most rounds
    any client trains in within one tree, known in advance from the seeded schedule)."""
    import dp_accounting as dpa

    z = noise_multiplier / max(max_participations, 1)
    every = restart_every if restart_every > 0 else rounds
    full, rest = divmod(rounds, every)
    events = []
    if full:
        events.append(dpa.SelfComposedDpEvent(dpa.SingleEpochTreeAggregationDpEvent(z, every), full))
    if rest:
        events.append(dpa.SingleEpochTreeAggregationDpEvent(z, rest))
    return dpa.ComposedDpEvent(events)


def _cyclic_epsilon(noise_multiplier: float, participations: int, delta: float, accountant: str) -> float:
    """A client that trains in m rounds, each releasing the sum (its update clipped to C) plus
    N(0, z^2 C^2), with no randomness in who trains: m Gaussian releases of sensitivity C under
    replace-with-zero neighbours (the schedule stays the same). dp-accounting's
    ``GaussianDpEvent(z)`` composed m times, under RDP or PLD."""
    if participations <= 0:
        return 0.0
    import dp_accounting as dpa

    if accountant == "pld":
        from dp_accounting.pld import PLDAccountant

        acc = PLDAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_SPECIAL)
    else:
        _, acc = _dp_accounting_rdp("REPLACE_SPECIAL")
    acc.compose(dpa.GaussianDpEvent(noise_multiplier), participations)
    return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=4096)
def _user_epsilon(noise_multiplier: float, num_clients: int, cohort_size: int, rounds: int, delta: float,
                  sampling: str, accountant: str, mechanism: str, restart_every: int,
                  max_participations: int) -> float:
    if mechanism == "tree":
        dpa, acc = _dp_accounting_rdp("REPLACE_SPECIAL")
        acc.compose(tree_aggregation_event(noise_multiplier, rounds, restart_every, max_participations))
        return float(acc.get_epsilon(delta))
    if sampling == "poisson":
        return epsilon([(noise_multiplier, cohort_size / num_clients, rounds)], delta, accountant)
    if sampling == "cyclic":
        return _cyclic_epsilon(noise_multiplier, max_participations, delta, accountant)
    return _dp_accounting_epsilon(rounds * without_replacement_rdp(noise_multiplier, num_clients, cohort_size),
                                  delta)


def user_level_epsilon(*, noise_multiplier: float, num_clients: int, cohort_size: int, rounds: int,
                       delta: float, sampling: str, accountant: str = "rdp", mechanism: str = "gaussian",
                       restart_every: int = 0, max_participations: int = 1) -> float:
    """(epsilon, delta) of central DP after `rounds` rounds: N(0, z^2 C^2) on the sum of the
    round's client updates, each clipped to C (z = `noise_multiplier`).

    Each sampling mode is accounted as what the server does (`fedsim.schedule.sample_round`):

    * ``poisson``: each client joins a round independently with q = K/N, add/remove neighbours:
      the subsampled Gaussian of DP-FedAvg (McMahan et al. 2018, "Learning differentially
      private recurrent language models", whose moments accountant assumes exactly this
      independent selection). ``rdp``: fedsim's curve (Opacus' formulas), ``prv``: Opacus' PRV,
      ``pld``: dp-accounting's PLD.
    * ``fixed``: K of N without replacement, replace-one neighbours (sensitivity 2C):
      dp-accounting's ``SampledWithoutReplacementDpEvent`` under RDP (`without_replacement_rdp`).
    * ``cyclic``: blocks of one fixed order, no randomness to amplify: `max_participations`
      (the most rounds any client has trained in) Gaussian releases of sensitivity C under
      replace-with-zero neighbours (`_cyclic_epsilon`); rdp or pld (dp-accounting).
    * mechanism ``tree`` (DP-FTRL, `tree_aggregation_event`): no amplification by sampling is
      assumed, whatever `sampling` is; `max_participations` is the most rounds any client
      trains in within one tree (1 under cyclic cohorts when trees restart at most every
      floor(N/K) rounds).

    A combination no accountant here bounds raises a ConfigError naming the supported ones
    (`check_user_accounting`). Memoized: the server asks every round.
    """
    check_user_accounting(accountant, sampling, mechanism)
    if not 1 <= cohort_size <= num_clients:
        raise ConfigError(f"federation.clients_per_round: must be in [1, num_clients = {num_clients}] "
                          f"(got {cohort_size})")
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    return _user_epsilon(float(noise_multiplier), int(num_clients), int(cohort_size), int(rounds), float(delta),
                         sampling, accountant, mechanism, int(restart_every), int(max_participations))


def undominated(plans: Sequence[tuple[float, int]]) -> list[tuple[float, int]]:
    """The plans no other plan dominates: epsilon grows with both q and the step count, so a
    plan with q and steps both <= another's can never be the tightest. Calibration then
    evaluates a handful of curves instead of one per client size (with fixed local steps,
    one plan: the largest q)."""
    unique = sorted(set(plans), key=lambda p: (-p[0], -p[1]))
    kept: list[tuple[float, int]] = []
    most_steps = -1
    for q, steps in unique:  # q non-increasing: keep a plan only if it has more steps than all before
        if steps > most_steps:
            kept.append((q, steps))
            most_steps = steps
    return kept


def calibrate_noise(target_epsilon: float, plans: Sequence[tuple[float, int]], delta: float,
                    accountant: str = "rdp", rel_tol: float = 1e-3) -> float:
    """Smallest sigma such that every plan (q, total_steps) has epsilon <= target.

    Bisection on log(sigma): epsilon falls monotonically as sigma grows. The result's
    epsilon lies in [target * (1 - rel_tol), target] for the tightest plan. Under PRV or PLD
    (about a second an evaluation, against microseconds for RDP's cached curves) the search
    starts just below RDP's answer, which bounds theirs from above in practice.
    """
    tight = undominated(plans)

    def worst(sigma: float) -> float:
        return max(epsilon([(sigma, q, steps)], delta, accountant) for q, steps in tight)

    bracket = (0.05, 1.0)
    if accountant != "rdp":
        hint = calibrate_noise(target_epsilon, plans, delta, "rdp", rel_tol)
        bracket = (max(0.05, hint * 0.7), hint)
    return bisect_sigma(worst, target_epsilon, delta, "privacy.target_epsilon", rel_tol, bracket)


def calibrate_per_client(target_epsilon: float, plans: Sequence[tuple[float, int] | None], delta: float,
                         accountant: str = "rdp", rel_tol: float = 1e-3) -> list[float | None]:
    """Per-client calibration: each plan (q, total_steps) its own smallest sigma whose epsilon
    is <= target, so that every client's epsilon lies in [target * (1 - rel_tol), target].

    This is the FedSVD authors' setting (seanie12/fed-svd, ``dp_init``: each client's sigma
    from its own sampling rate and steps), which assumes the clients' sizes are public. A
    client that never trains (None) gets None; equal plans share one bisection.
    """
    found: dict[tuple[float, int], float] = {}
    for plan in plans:
        if plan is not None and plan not in found:
            found[plan] = calibrate_noise(target_epsilon, [plan], delta, accountant, rel_tol)
    return [None if plan is None else found[plan] for plan in plans]


def calibrate_user_noise(target_epsilon: float, *, num_clients: int, cohort_size: int, rounds: int, delta: float,
                         sampling: str, accountant: str = "rdp", mechanism: str = "gaussian",
                         restart_every: int = 0, max_participations: int = 1, rel_tol: float = 1e-3) -> float:
    """Smallest user-level z whose `user_level_epsilon` (the same arguments) is <= target."""
    check_user_accounting(accountant, sampling, mechanism)

    def eps(sigma: float) -> float:
        return user_level_epsilon(noise_multiplier=sigma, num_clients=num_clients, cohort_size=cohort_size,
                                  rounds=rounds, delta=delta, sampling=sampling, accountant=accountant,
                                  mechanism=mechanism, restart_every=restart_every,
                                  max_participations=max_participations)

    return bisect_sigma(eps, target_epsilon, delta, "privacy.user_target_epsilon", rel_tol)


def bisect_sigma(worst: Callable[[float], float], target_epsilon: float, delta: float, key: str,
                 rel_tol: float = 1e-3, bracket: tuple[float, float] = (0.05, 1.0)) -> float:
    """Smallest sigma with worst(sigma) <= target, by bisection on log(sigma) (epsilon falls
    monotonically as sigma grows); worst(result) lies in [target * (1 - rel_tol), target].
    `bracket` is where the search starts; it grows upward until it holds the answer."""
    if target_epsilon <= 0:
        raise ConfigError(f"{key}: must be > 0 to calibrate")
    with warnings.catch_warnings():
        # the search probes sigmas far from the answer, where the best RDP order sits at the
        # edge of the grid; that warning speaks of those probes, not of the epsilon the run
        # reports (whose own accounting warns if it applies)
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return _bisect(worst, target_epsilon, delta, key, rel_tol, bracket)


def _bisect(worst: Callable[[float], float], target_epsilon: float, delta: float, key: str,
            rel_tol: float, bracket: tuple[float, float]) -> float:
    lo, hi = bracket
    while worst(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ConfigError(f"{key}: {target_epsilon} is unreachable at delta={delta}")
    if worst(lo) <= target_epsilon:
        if lo > bracket[0] or lo <= 0.05:
            raise ConfigError(f"{key}: {target_epsilon} is so large that sigma < {max(lo, 0.05)} "
                              f"suffices; use a noise multiplier instead")
        return _bisect(worst, target_epsilon, delta, key, rel_tol, (0.05, 1.0))  # the hint was too high
    while True:
        mid = math.sqrt(lo * hi)
        eps = worst(mid)
        if eps > target_epsilon:
            lo = mid
        else:
            hi = mid
            if eps >= target_epsilon * (1 - rel_tol):
                return hi
        if hi / lo < 1 + 1e-9:
            return hi


def accounted_cohort(num_clients: int, clients_per_round: int, noise_cohort_size: int) -> tuple[int, int]:
    """(population, cohort) the user-level epsilon is stated for. With ``noise_cohort_size`` M
    the noise is a cohort of M's, so the statement is that of a deployment sampling M clients
    at the same rate K/N from a population of N M / K (pfl-research's convention): a simulated
    deployment, not the K clients that trained here."""
    if noise_cohort_size <= 0:
        return num_clients, clients_per_round
    return round(num_clients * noise_cohort_size / clients_per_round), noise_cohort_size
