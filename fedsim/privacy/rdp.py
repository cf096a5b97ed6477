"""RDP of one step of the subsampled Gaussian mechanism, at many orders at once.

The same math as Opacus' `opacus.accountants.analysis.rdp` (Mironov, Talwar and Zhang 2019,
Section 3.3: https://arxiv.org/abs/1908.10530), term for term, but with numpy over all the
orders and all the series' terms instead of a Python loop per order and per term:

* integer alpha: log A = log sum_{i=0..alpha} C(alpha, i) q^i (1-q)^(alpha-i) exp((i^2 - i) / (2 sigma^2));
* fractional alpha: the two erfc series, whose terms change sign with C(alpha, i), summed up to
  and including the first i where both terms' logs are < -30 (Opacus' stopping rule, per order);
* RDP = log A / (alpha - 1); q == 0: 0; sigma == 0: inf; q == 1: alpha / (2 sigma^2); alpha == inf: inf.

The terms are Opacus' own expressions, so only the summation differs: one log-sum-exp per
order instead of a running `_log_add`/`_log_sub`. Against the exact (50-digit) sum of the same
double-precision terms, this one errs by about 1e-15 max(|log A|, 1), Opacus' running sum by up to
~2e-13 absolute (rounding of partial sums near 1, over up to ~16,000 terms). Hence the two agree
to |difference in log A| <= 1e-9 |log A| + 1e-12 (largest seen on a grid of sigma in [0.3, 50],
q in [1e-6, 0.999]: 2e-13), not to 1e-9 relative where log A is tiny: at q = 1e-6 and sigma
>= 10, log A ~ 1e-16 and Opacus returns 0 or even a negative RDP, i.e. rounding noise. On
epsilon that is at most steps x 1e-12 / (alpha - 1).

Opacus' own function is used instead wherever this one cannot reproduce it: for the whole
curve when q is outside [0, 1], sigma is negative or not finite, or an order is <= 1; for one
order when its signed sum does not come out positive (Opacus' `_log_sub` raises there). Neither
happens for 0 < q < 1, 0 < sigma and the orders fedsim uses.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import numpy as np

# Opacus stops a fractional order's series after the first term i with max(log_s0, log_s1) < this.
SERIES_STOP = -30.0
FIRST_CHUNK = 64  # terms per order in the first block of a fractional series; blocks then double


def _special():
    """scipy.special, imported at the first curve rather than with the module: its import
    (about 0.1 s) is then not part of a run's start, which reaches its first round without
    asking for epsilon."""
    from scipy import special

    return special


def log_erfc(x: np.ndarray) -> np.ndarray:
    """log(erfc(x)), accurate for large x (Opacus' `_log_erfc`, elementwise)."""
    return math.log(2) + _special().log_ndtr(-x * 2**0.5)


def signed_logsumexp(log_terms: np.ndarray, signs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (m, s) with sum_k signs_k exp(log_terms_k) = s exp(m). Rows of -inf give (-inf, 0)."""
    m = np.max(log_terms, axis=1)
    shift = np.where(np.isfinite(m), m, 0.0)
    s = np.sum(signs * np.exp(log_terms - shift[:, None]), axis=1)
    return m, s


def merge_scaled(m1: np.ndarray, s1: np.ndarray, m2: np.ndarray, s2: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """s1 exp(m1) + s2 exp(m2) as (m, s), without overflow."""
    m = np.maximum(m1, m2)
    shift = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(invalid="ignore"):  # -inf - -inf: an empty part, weight 0
        w1 = np.where(np.isneginf(m1), 0.0, np.exp(m1 - shift))
        w2 = np.where(np.isneginf(m2), 0.0, np.exp(m2 - shift))
    return m, s1 * w1 + s2 * w2


def log_a_int_terms(q: float, sigma: float, alpha: np.ndarray, i: np.ndarray, log_binom: np.ndarray) -> np.ndarray:
    """The log of term i of A_alpha for integer alpha (Opacus' `_compute_log_a_for_int_alpha`),
    from log C(alpha, i), the part free of q and sigma (`_integer_terms`)."""
    log_coef = log_binom + i * math.log(q) + (alpha - i) * math.log(1 - q)
    return log_coef + (i * i - i) / (2 * (sigma**2))


@functools.lru_cache(maxsize=64)
def _integer_terms(alphas: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For integer orders, every term's (order, i) laid out flat, order after order: (starts of
    each order's terms, each term's order index, its order, its i, log C(order, i)). None of it
    depends on q or sigma, so a process builds it once per set of orders (read-only)."""
    values = np.asarray(alphas, dtype=float)
    counts = values.astype(np.int64) + 1
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    row = np.repeat(np.arange(values.size), counts)
    i = (np.arange(counts.sum()) - starts[row]).astype(float)
    alpha = values[row]
    with np.errstate(divide="ignore"):  # C(alpha, i) = 0 would be -inf: no term (i <= alpha here)
        log_binom = np.log(_special().binom(alpha, i))
    for array in (starts, row, alpha, i, log_binom):
        array.setflags(write=False)
    return starts, row, alpha, i, log_binom


def log_a_int(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """log(A_alpha) for integer orders, 0 < q < 1: all terms i = 0..alpha of every order at once."""
    alphas = np.asarray(alphas, dtype=float)
    if alphas.size == 0:
        return np.empty(0)
    starts, row, alpha, i, log_binom = _integer_terms(tuple(alphas.tolist()))
    s = log_a_int_terms(q, sigma, alpha, i, log_binom)
    m = np.maximum.reduceat(s, starts)
    total = np.add.reduceat(np.exp(s - m[row]), starts)
    return m + np.log(total)


def log_binomial(alpha: np.ndarray, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log |C(alpha, i)|, sign of C(alpha, i)) elementwise: the part of a fractional order's
    series that depends on neither q nor sigma."""
    coef = _special().binom(alpha, i)
    return np.log(np.abs(coef)), np.where(coef > 0, 1.0, -1.0)


@functools.lru_cache(maxsize=8192)
def _binomial_rows(alphas: tuple[float, ...], start: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """`log_binomial` of these orders (rows) for every i in [start, start + size), kept for the
    process (read-only). `special.binom` was half the cost of an RDP curve, and a run asks for
    one curve per client sampling rate (1,000 heterogeneous clients: about 50), target-epsilon
    calibration for one per candidate sigma, all over the same orders and blocks of i."""
    log_coef, sign = log_binomial(np.asarray(alphas, dtype=float)[:, None],
                                  np.arange(start, start + size, dtype=float)[None, :])
    log_coef.setflags(write=False)
    sign.setflags(write=False)
    return log_coef, sign


def _binomial_block(alphas: np.ndarray, start: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """`log_binomial` of the orders still summing (rows) for every i in [start, start + size).
    A curve's first block holds every order, so it is kept as one; the later, longer blocks
    serve the few orders whose series has not stopped, and which those are depends on q and
    sigma, so they are kept an order at a time and stacked."""
    if start == 0:
        return _binomial_rows(tuple(alphas.tolist()), start, size)
    rows = [_binomial_rows((alpha,), start, size) for alpha in alphas.tolist()]
    return np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])


def log_a_frac_terms(q: float, sigma: float, alpha: np.ndarray, i: np.ndarray,
                     binomial: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Terms i of the two series of A_alpha for fractional alpha (Opacus'
    `_compute_log_a_for_frac_alpha`), from `binomial` = `log_binomial(alpha, i)`, the part free
    of q and sigma (`_binomial_block`): (log_s0, log_s1, sign), sign = +1 where C(alpha, i) > 0
    (Opacus adds the terms) and -1 otherwise (Opacus subtracts them)."""
    log_coef, sign = binomial
    j = alpha - i
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5

    log_t0 = log_coef + i * math.log(q) + j * math.log(1 - q)
    log_t1 = log_coef + j * math.log(q) + i * math.log(1 - q)

    log_e0 = math.log(0.5) + log_erfc((i - z0) / (math.sqrt(2) * sigma))
    log_e1 = math.log(0.5) + log_erfc((z0 - j) / (math.sqrt(2) * sigma))

    log_s0 = log_t0 + (i * i - i) / (2 * (sigma**2)) + log_e0
    log_s1 = log_t1 + (j * j - j) / (2 * (sigma**2)) + log_e1
    return log_s0, log_s1, sign


def log_a_frac(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """log(A_alpha) for fractional orders, 0 < q < 1; nan where the signed sum is not positive.

    Every order sums exactly Opacus' terms: i = 0 up to and including the first i with
    max(log_s0, log_s1) < SERIES_STOP. The terms come in blocks of i (FIRST_CHUNK, then
    doubling) for the orders whose series has not stopped yet; each order's sum is kept as
    s exp(m) so that blocks add without overflow.
    """
    alphas = np.asarray(alphas, dtype=float)
    m = np.full(alphas.size, -np.inf)
    s = np.zeros(alphas.size)
    pending = np.arange(alphas.size)
    start, size = 0, FIRST_CHUNK
    while pending.size:
        i = np.arange(start, start + size, dtype=float)
        log_s0, log_s1, sign = log_a_frac_terms(q, sigma, alphas[pending, None], i[None, :],
                                                _binomial_block(alphas[pending], start, size))
        below = np.maximum(log_s0, log_s1) < SERIES_STOP
        stopped = below.any(axis=1)
        last = np.where(stopped, below.argmax(axis=1), size - 1)  # the stopping term is included
        keep = np.arange(size)[None, :] <= last[:, None]
        terms = np.concatenate([np.where(keep, log_s0, -np.inf), np.where(keep, log_s1, -np.inf)], axis=1)
        bm, bs = signed_logsumexp(terms, np.concatenate([sign, sign], axis=1))
        m[pending], s[pending] = merge_scaled(m[pending], s[pending], bm, bs)
        pending = pending[~stopped]
        start, size = start + size, 2 * size
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s > 0, m + np.log(s), np.nan)


def compute_rdp_curve(q: float, sigma: float, orders: Sequence[float]) -> np.ndarray:
    """RDP of one step of the subsampled Gaussian mechanism at every order: Opacus'
    `compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)`, vectorized."""
    alphas = np.asarray(orders, dtype=float)
    if q == 0:
        return np.zeros(alphas.size)
    if sigma == 0:
        return np.full(alphas.size, np.inf)
    if q == 1.0:
        return alphas / (2 * sigma**2)
    if not (0 < q < 1 and 0 < sigma < math.inf and np.all(alphas > 1)):
        from opacus.accountants.analysis import rdp as opacus_rdp  # edge cases only: Opacus' import costs 2-3 s

        return opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[float(a) for a in alphas])

    rdp = np.full(alphas.size, np.inf)  # alpha = inf stays inf
    integer = np.isfinite(alphas) & (alphas == np.floor(alphas))
    fractional = np.isfinite(alphas) & ~integer
    rdp[integer] = log_a_int(q, sigma, alphas[integer]) / (alphas[integer] - 1)
    rdp[fractional] = log_a_frac(q, sigma, alphas[fractional]) / (alphas[fractional] - 1)
    for k in np.flatnonzero(np.isnan(rdp)):  # a signed sum that did not come out positive
        from opacus.accountants.analysis import rdp as opacus_rdp

        rdp[k] = opacus_rdp._compute_rdp(q, sigma, float(alphas[k]))
    return rdp


def privacy_spent(orders: Sequence[float], rdp: np.ndarray, delta: float) -> tuple[float, float]:
    """(epsilon, best order) of RDP values at `orders` for this delta: Opacus'
    `get_privacy_spent` (Balle et al. 2020, "Hypothesis testing interpretations and Renyi
    differential privacy", Theorem 21), the same arithmetic, with its warning when the best
    order is the first or last one (the bound would tighten with more orders)::

        eps(alpha) = rdp(alpha) - (log delta + log alpha) / (alpha - 1) + log((alpha - 1) / alpha)

    Here, not imported, because importing Opacus costs 2-3 s of every run's start (it pulls in
    torch.distributed and scipy's statistics) while this is five lines of numpy; a test holds
    it equal to Opacus' function."""
    alphas, values = np.atleast_1d(np.asarray(orders, dtype=float)), np.atleast_1d(rdp)
    if alphas.shape != values.shape:
        raise ValueError(f"privacy_spent: {alphas.size} orders, {values.size} RDP values")
    eps = values - (np.log(delta) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)
    if np.isnan(eps).all():  # no privacy at all
        return math.inf, math.nan
    best = int(np.nanargmin(eps))
    if best in (0, eps.size - 1):
        warnings.warn(f"Optimal order is the {'smallest' if best == 0 else 'largest'} alpha. Please consider "
                      "expanding the range of alphas to get a tighter privacy bound.", stacklevel=2)
    return float(eps[best]), float(alphas[best])
