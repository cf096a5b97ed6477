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

Every epsilon fedsim prints names its accountant and delta (`accountant_label`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence

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
ACCOUNTANTS = ("rdp", "prv")


def accountant_label(name: str) -> str:
    """How an accountant is named next to every epsilon fedsim reports."""
    return {"rdp": "RDP (Opacus)", "prv": "PRV (Opacus)"}[name]


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


@functools.lru_cache(maxsize=1024)
def _prv_epsilon(hist: tuple[tuple[float, float, int], ...], delta: float) -> float:
    from opacus.accountants import PRVAccountant  # here: Opacus' import costs 2-3 s

    acc = PRVAccountant()
    acc.history = list(hist)
    return float(acc.get_epsilon(delta=delta))


def clear_memos() -> None:
    """Forget every memoized RDP curve and epsilon, so the next calls compute as a fresh
    process would (benchmarks time runs that way; the memos themselves cannot go stale)."""
    for memo in (rdp_curve, _rdp_epsilon, _prv_epsilon):
        memo.cache_clear()


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
    return _rdp_epsilon(hist, delta) if accountant == "rdp" else _prv_epsilon(hist, delta)


def rdp_epsilon(history: History, delta: float) -> float:
    return epsilon(history, delta, "rdp")


def poisson_sample_rate(num_examples: int, batch_size: int) -> float:
    """The q Opacus uses: make_private rebuilds the loader with q = 1/len(loader) = 1/ceil(n/B)."""
    return 1.0 / math.ceil(num_examples / batch_size)


def steps_per_round(num_examples: int, batch_size: int, local_epochs: int, local_steps: int) -> int:
    """DP-SGD steps one participation adds: fixed local steps, or epochs x ceil(n/B)."""
    return local_steps if local_steps > 0 else local_epochs * math.ceil(num_examples / batch_size)


def user_level_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float,
                       accountant: str = "rdp") -> float:
    """Central DP-FedAvg: one Gaussian release per round, clients sampled at rate q.

    The accountant assumes Poisson sampling of clients; Flower samples a fixed number
    per round. That is the usual approximation (as in McMahan et al. 2018), and
    docs/privacy.md says so next to every user-level epsilon.
    """
    return epsilon([(noise_multiplier, sample_rate, rounds)], delta, accountant)


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
    epsilon lies in [target * (1 - rel_tol), target] for the tightest plan.
    """
    if target_epsilon <= 0:
        raise ConfigError("privacy.target_epsilon: must be > 0 to calibrate")

    tight = undominated(plans)

    def worst(sigma: float) -> float:
        return max(epsilon([(sigma, q, steps)], delta, accountant) for q, steps in tight)

    lo, hi = 0.05, 1.0
    while worst(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ConfigError(f"privacy.target_epsilon: {target_epsilon} is unreachable at delta={delta}")
    if worst(lo) <= target_epsilon:
        raise ConfigError(f"privacy.target_epsilon: {target_epsilon} is so large that sigma < {lo} "
                          f"suffices; use noise_multiplier instead")
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
