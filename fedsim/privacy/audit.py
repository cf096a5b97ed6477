"""Empirical privacy audits in one training run: from canary guesses to a lower bound on epsilon.

An accountant gives an UPPER bound on epsilon, true only if the code adds the noise, clips and
counts steps as the analysis assumes. An audit gives a LOWER bound measured on the trained
model: m canaries are each included independently with probability 1/2, the model is trained
once, an attacker scores every canary and guesses "in" for the highest scores and "out" for
the lowest (abstaining on the rest). If the mechanism were (epsilon, delta)-DP, many correct
guesses would be improbable; the largest epsilon that the observed count rejects at
confidence 1 - beta is the lower bound. A lower bound above the accountant's upper bound
(beyond the 1 - beta error allowance) means the code or the accounting is wrong.

This module is the math only (numpy and scipy; scipy arrives with scikit-learn). Planting
canaries, training and scoring are the caller's. The analyses, each a valid lower bound at
confidence 1 - beta on its own:

* ``steinke``: Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run",
  NeurIPS 2023 (arXiv:2305.08846). Under (epsilon, delta)-DP the number of correct guesses
  is stochastically dominated by Binomial(r, e^eps / (1 + e^eps)), up to a delta term
  (their theorem for approximate DP; the p-value and the bisection follow their appendix algorithm).
* ``fdp``: Mahloujifar, Melis & Chaudhuri, "Auditing f-Differential Privacy in One Run",
  ICML 2025 (arXiv:2410.22235). The same guesses tested against a whole trade-off curve, here
  the Gaussian one (mu-GDP), which is what DP-SGD's accountant really certifies; the tightest
  rejected mu is converted to epsilon at delta. The test is the paper's bound on correct
  guesses with abstention (the recursion its authors' code calls ``rh_with_cap`` /
  ``audit_rh_with_cap``), with alphabet size k = 2 (membership).
* ``gaussian`` (opt-in, not a worst-case guarantee): the scores themselves, not thresholded
  guesses, modelled as two Gaussians of equal variance, "in" shifted by mu standard
  deviations, as Agrawal et al., "Let's Ask Gauss: Improved One-Run Privacy Auditing" (2026,
  arXiv:2606.12733) argue white-box DP-SGD canary scores are (a normalised sum over steps).
  Their exact confidence procedure was not available to us; this is our construction: an
  exact lower confidence bound on mu under that model (a noncentral-t pivot), converted to
  epsilon at delta by the Gaussian hockey-stick divergence (`gdp_epsilon`). It holds only as
  far as the scores are independent, Gaussian and of equal variance (`score_sd_ratio`
  reports the last).

A lower bound from several analyses, or several numbers of guesses, is only valid at
1 - beta if the choice is paid for: `audit_bounds` splits beta over the candidate guess
counts (a union bound), and reports each analysis separately (the larger of two analyses
holds at 1 - 2 beta, not 1 - beta).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import optimize, special, stats

ANALYSES = ("steinke", "fdp")  # what audit_bounds computes unless told otherwise
ALL_ANALYSES = ("steinke", "fdp", "gaussian")

# Bisection stops when the epsilon (or mu) interval is this narrow; the lower end is
# returned, so the reported bound errs on the safe side by at most this much.
_TOLERANCE = 1e-6


def _check_counts(m: int, r: int, v: int) -> None:
    if not (0 <= v <= r <= m):
        raise ValueError(f"audit counts: need 0 <= correct <= guesses <= canaries (got correct={v}, "
                         f"guesses={r}, canaries={m})")


def _check_level(name: str, value: float, *, allow_zero: bool = False) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value < 1):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"{name}: must be in {interval} (got {value})")


def _bisect_largest(rejects, *, start: float = 1.0) -> float:
    """The largest x >= 0 with rejects(x) true, for a claim that gets harder to reject as x
    grows; 0 if even x = 0 is not rejected. Returns the lower end of the final bracket."""
    if not rejects(0.0):
        return 0.0
    lo, hi = 0.0, start
    while rejects(hi):
        lo, hi = hi, 2.0 * hi
        if hi > 1e6:  # nothing in this module rejects so weak a claim; guards a wrong input
            return lo
    while hi - lo > _TOLERANCE * max(1.0, lo):
        mid = 0.5 * (lo + hi)
        if rejects(mid):
            lo = mid
        else:
            hi = mid
    return lo


# --------------------------------------------------------------------------------------------
# Steinke, Nasr & Jagielski (2023)
# --------------------------------------------------------------------------------------------

def steinke_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of v or more correct guesses out of r (m canaries) if the mechanism is (epsilon, delta)-DP.

    Steinke et al. 2023, the approximate-DP theorem and its appendix algorithm: with q = e^eps / (1 + e^eps)
    (the accuracy of eps-DP randomized response) and f(v) = P[Binomial(r, q) >= v],

        p = f(v) + 2 m delta * max_{1 <= i <= v} (f(v - i) - f(v)) / i,

    capped at 1. For delta = 0 this is the binomial tail alone.
    """
    _check_counts(m, r, v)
    if epsilon < 0:
        raise ValueError(f"epsilon: must be >= 0 (got {epsilon})")
    _check_level("delta", delta, allow_zero=True)
    q = float(special.expit(epsilon))
    tail = float(stats.binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    below = np.arange(1, v + 1)
    # f(v - i) - f(v) = P[v - i <= B < v]: summed pmf, as the paper does, which keeps the
    # small differences exact where 1 - cdf would cancel.
    window = np.cumsum(stats.binom.pmf(v - below, r, q))
    alpha = float(np.max(window / below))
    return min(tail + 2.0 * m * delta * alpha, 1.0)


def steinke_epsilon_lower(m: int, r: int, v: int, *, delta: float, beta: float) -> float:
    """Lower bound on epsilon at confidence 1 - beta from v correct guesses out of r (m canaries).

    The largest epsilon whose p-value (`steinke_p_value`) is below beta, by bisection (the
    paper's `get_eps_audit`); 0 when no epsilon is rejected, e.g. at accuracy <= 1/2.
    The numbers of guesses must be fixed before looking at the inclusion bits; to choose
    them from the data, divide beta by the number of choices (`audit_bounds` does).
    """
    _check_counts(m, r, v)
    _check_level("beta", beta)
    _check_level("delta", delta, allow_zero=True)
    if r == 0:
        return 0.0
    return _bisect_largest(lambda eps: steinke_p_value(m, r, v, eps, delta) < beta)


# --------------------------------------------------------------------------------------------
# Gaussian differential privacy (Dong, Roth & Su 2022)
# --------------------------------------------------------------------------------------------

def gdp_delta(epsilon: float, mu: float) -> float:
    """delta(epsilon) of mu-GDP: Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2).

    mu-GDP is exactly the trade-off curve of N(0, 1) against N(mu, 1), i.e. of the Gaussian
    mechanism with sensitivity / sigma = mu (Dong, Roth & Su 2022, Corollary 2.13).
    """
    if mu < 0:
        raise ValueError(f"mu: must be >= 0 (got {mu})")
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    first = special.ndtr(-epsilon / mu + mu / 2)
    # e^eps * Phi(x) in log space: e^eps overflows long before the product does
    second = math.exp(epsilon + special.log_ndtr(-epsilon / mu - mu / 2))
    return float(max(first - second, 0.0))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest epsilon >= 0 with mu-GDP implying (epsilon, delta)-DP (delta decreases in epsilon)."""
    _check_level("delta", delta)
    if mu <= 0 or gdp_delta(0.0, mu) <= delta:
        return 0.0
    hi = max(1.0, mu * mu)
    while gdp_delta(hi, mu) > delta:
        hi *= 2.0
    return float(optimize.brentq(lambda eps: gdp_delta(eps, mu) - delta, 0.0, hi, xtol=1e-12, rtol=1e-12))


def gdp_mu(epsilon: float, delta: float) -> float:
    """The mu of the Gaussian mechanism that is exactly (epsilon, delta)-DP (inverse of `gdp_epsilon`)."""
    _check_level("delta", delta)
    if epsilon < 0:
        raise ValueError(f"epsilon: must be >= 0 (got {epsilon})")
    hi = 1.0
    while gdp_delta(epsilon, hi) < delta:
        hi *= 2.0
    return float(optimize.brentq(lambda mu: gdp_delta(epsilon, mu) - delta, 0.0, hi, xtol=1e-12, rtol=1e-12))


# --------------------------------------------------------------------------------------------
# Mahloujifar, Melis & Chaudhuri (2025)
# --------------------------------------------------------------------------------------------

def _gaussian_blow_up_inverse(x: float, mu: float) -> float:
    """Inverse of the mu-GDP blow-up x -> 1 - G_mu(x) = Phi(Phi^-1(x) + mu): x -> Phi(Phi^-1(x) - mu)."""
    return float(special.ndtr(special.ndtri(x) - mu))


def fdp_rejects_gdp(m: int, r: int, v: int, mu: float, *, beta: float) -> bool:
    """Whether v correct guesses out of r (m canaries) reject mu-GDP at confidence 1 - beta.

    Mahloujifar, Melis & Chaudhuri 2025, the bound on correct guesses with abstention for
    membership (alphabet size k = 2), specialised to the Gaussian trade-off curve: starting
    from r_v = beta v / m and h_v = beta (r - v) / m, for i = v-1, ..., 0

        h_i = max(h_{i+1}, fbar^-1(r_{i+1})),
        r_i = r_{i+1} + i / (r - i) * (h_i - h_{i+1}),

    with fbar^-1(x) = Phi(Phi^-1(x) - mu) the inverse blow-up of the mu-GDP curve; under
    mu-GDP, v or more correct guesses have probability below beta when r_0 + h_0 > r / m.
    """
    _check_counts(m, r, v)
    _check_level("beta", beta)
    correct = beta * v / m
    wrong = beta * (r - v) / m
    for i in range(v - 1, -1, -1):
        wrong_next = max(wrong, _gaussian_blow_up_inverse(correct, mu))
        if wrong_next == wrong:
            break  # a fixed point: neither term moves again
        correct = min(correct + i / (r - i) * (wrong_next - wrong), 1.0)
        wrong = wrong_next
    return correct + wrong > r / m


def fdp_mu_lower(m: int, r: int, v: int, *, beta: float) -> float:
    """The largest mu that v correct guesses out of r reject as mu-GDP at confidence 1 - beta (0 if none)."""
    _check_counts(m, r, v)
    _check_level("beta", beta)
    if r == 0:
        return 0.0
    return _bisect_largest(lambda mu: fdp_rejects_gdp(m, r, v, mu, beta=beta))


def fdp_epsilon_lower(m: int, r: int, v: int, *, delta: float, beta: float) -> float:
    """Lower bound on epsilon at delta from the f-DP audit: `fdp_mu_lower` converted by `gdp_epsilon`.

    A mechanism that is (epsilon, delta)-DP need not be mu-GDP for the mu with
    gdp_epsilon(mu, delta) = epsilon, so this bounds the GDP parameter, read at delta: it
    is the number to set beside an accountant that certifies a Gaussian-like curve (DP-SGD).
    """
    _check_level("delta", delta)
    return gdp_epsilon(fdp_mu_lower(m, r, v, beta=beta), delta)


# --------------------------------------------------------------------------------------------
# Gaussian model of the scores (after Agrawal et al. 2026; the confidence bound is ours)
# --------------------------------------------------------------------------------------------

def gaussian_pair_statistic(scores: np.ndarray, included: np.ndarray) -> tuple[float, int, float]:
    """(t, degrees of freedom, scale) of the two-sample t statistic of "in" minus "out" scores.

    With scores N(mu_in, s^2) and N(mu_out, s^2), t follows a noncentral t distribution with
    df = n_in + n_out - 2 and noncentrality mu / scale, where mu = (mu_in - mu_out) / s is
    the standardised shift and scale = sqrt(1/n_in + 1/n_out).
    """
    scores = np.asarray(scores, dtype=float).ravel()
    included = np.asarray(included, dtype=bool).ravel()
    if scores.shape != included.shape:
        raise ValueError(f"scores and included: lengths differ ({scores.size} vs {included.size})")
    if np.isnan(scores).any():
        raise ValueError("scores: contain NaN")
    inside, outside = scores[included], scores[~included]
    n_in, n_out = inside.size, outside.size
    if n_in < 2 or n_out < 2:
        raise ValueError(f"included: the Gaussian analysis needs at least 2 canaries in and 2 out "
                         f"(got {n_in} in, {n_out} out)")
    df = n_in + n_out - 2
    pooled = math.sqrt((((inside - inside.mean()) ** 2).sum() + ((outside - outside.mean()) ** 2).sum()) / df)
    scale = math.sqrt(1 / n_in + 1 / n_out)
    shift = float(inside.mean() - outside.mean())
    if pooled == 0:
        return (math.copysign(math.inf, shift) if shift else 0.0), df, scale
    return shift / (pooled * scale), df, scale


def gaussian_pair_mu_lower(scores: np.ndarray, included: np.ndarray, *, beta: float) -> float:
    """Lower confidence bound (level 1 - beta) on the standardised shift mu between "in" and "out"
    scores, under the equal-variance Gaussian model: the shift at which the observed t sits at
    the upper beta tail of its noncentral t, so that every smaller shift is rejected (0 if a
    zero shift is not)."""
    _check_level("beta", beta)
    t, df, scale = gaussian_pair_statistic(scores, included)
    if math.isinf(t):  # constant scores within each group: the model sees a perfect separation
        return math.inf if t > 0 else 0.0
    if not stats.nct.sf(t, df, 0.0) < beta:
        return 0.0
    # P[T >= t | nc] grows with nc and is about 1/2 at nc = t, so [0, t] brackets the root
    nc = optimize.brentq(lambda nc: stats.nct.sf(t, df, nc) - beta, 0.0, t, xtol=1e-10)
    return float(nc * scale)


def gaussian_pair_epsilon_lower(scores: np.ndarray, included: np.ndarray, *, delta: float,
                                beta: float) -> float:
    """`gaussian_pair_mu_lower` read as epsilon at delta: the hockey-stick divergence between
    N(mu, 1) and N(0, 1) is the mu-GDP curve (`gdp_epsilon`)."""
    _check_level("delta", delta)
    mu = gaussian_pair_mu_lower(scores, included, beta=beta)
    return math.inf if math.isinf(mu) else gdp_epsilon(mu, delta)


def score_sd_ratio(scores: np.ndarray, included: np.ndarray) -> float:
    """Standard deviation of the "in" scores over that of the "out" scores: 1 when the Gaussian
    analysis' equal-variance model fits (subsampling noise typically makes it exceed 1)."""
    scores = np.asarray(scores, dtype=float).ravel()
    included = np.asarray(included, dtype=bool).ravel()
    out_sd = float(np.std(scores[~included], ddof=1))
    return float(np.std(scores[included], ddof=1)) / out_sd if out_sd > 0 else math.inf


# --------------------------------------------------------------------------------------------
# From scores to guesses
# --------------------------------------------------------------------------------------------

def membership_guesses(scores: np.ndarray, *, k_in: int, k_out: int) -> np.ndarray:
    """Guesses from canary scores (higher = more likely included): +1 ("in") for the k_in highest,
    -1 ("out") for the k_out lowest, 0 (abstain) for the rest.

    Ties are broken by canary index (a stable sort), which does not depend on the inclusion
    bits, so the guesses stay a function of the trained model alone, as the theorems require.
    """
    scores = np.asarray(scores, dtype=float).ravel()
    m = scores.size
    if k_in < 0 or k_out < 0 or k_in + k_out > m:
        raise ValueError(f"guesses: need k_in, k_out >= 0 and k_in + k_out <= canaries={m} "
                         f"(got k_in={k_in}, k_out={k_out})")
    if np.isnan(scores).any():
        raise ValueError("scores: contain NaN")
    order = np.argsort(scores, kind="stable")
    guesses = np.zeros(m, dtype=np.int8)
    guesses[order[:k_out]] = -1
    if k_in:
        guesses[order[m - k_in:]] = 1
    return guesses


def count_correct(guesses: np.ndarray, included: np.ndarray) -> tuple[int, int]:
    """(guesses made, correct guesses) for +1/-1/0 guesses against the true inclusion bits."""
    guesses = np.asarray(guesses).ravel()
    included = np.asarray(included, dtype=bool).ravel()
    if guesses.shape != included.shape:
        raise ValueError(f"guesses and included: lengths differ ({guesses.size} vs {included.size})")
    made = guesses != 0
    truth = np.where(included, 1, -1)
    return int(made.sum()), int((guesses[made] == truth[made]).sum())


def guess_candidates(guesses: int | tuple[int, int] | Sequence[int | tuple[int, int]],
                     m: int) -> list[tuple[int, int]]:
    """Normalise `guesses` to a list of (k_in, k_out).

    An int k splits evenly: k_in = ceil(k / 2), k_out = floor(k / 2), which suits a
    mechanism that treats "in" and "out" alike (a Gaussian shift). A pair is taken as is.
    A list is a set of candidates to search over.
    """
    if isinstance(guesses, (int, np.integer)) or (
            isinstance(guesses, tuple) and len(guesses) == 2
            and all(isinstance(k, (int, np.integer)) for k in guesses)):
        guesses = [guesses]
    candidates = []
    for g in guesses:
        if isinstance(g, (int, np.integer)):
            pair = (int(g) - int(g) // 2, int(g) // 2)
        else:
            pair = (int(g[0]), int(g[1]))
        if pair[0] < 0 or pair[1] < 0 or sum(pair) == 0 or sum(pair) > m:
            raise ValueError(f"guesses: each candidate needs 1 <= k_in + k_out <= canaries={m}, "
                             f"k_in, k_out >= 0 (got {g!r})")
        candidates.append(pair)
    if not candidates:
        raise ValueError("guesses: give at least one number of guesses")
    return list(dict.fromkeys(candidates))


def audit_bounds(scores: np.ndarray, included: np.ndarray, *, delta: float, beta: float,
                 guesses: int | tuple[int, int] | Sequence[int | tuple[int, int]],
                 analyses: Sequence[str] = ANALYSES) -> dict:
    """Every analysis' lower bound on epsilon at delta, confidence 1 - beta, from one run's canary scores.

    `scores`: one number per canary, higher meaning "more likely trained on" (e.g. minus the
    loss, or the model's displacement along a gradient canary's direction). `included`: the
    true inclusion bits. `guesses`: the number of guesses (int, split evenly in/out), a pair
    (k_in, k_out), or a list of those to search. Searching uses a union bound: each candidate
    is tested at beta / len(candidates), and the best per analysis is kept, so the bound still
    holds with probability 1 - beta (Bonferroni; the paper's alternative, fixing the guesses
    in advance, is the one-candidate case).

    `analyses`: which of ALL_ANALYSES to run; "gaussian" uses every score and no guesses
    (its guesses and correct counts are reported as None), and only holds under its model.

    Returns a JSON-ready dict: ``epsilon_lower``, ``guesses``, ``correct``, ``guesses_in`` and
    ``guesses_out`` (each a dict keyed by analysis name), ``gdp_mu_lower`` (the f-DP audit's
    mu), ``canaries``, ``delta``, ``beta``, ``candidates`` (how many guess counts were
    searched) and, with "gaussian", ``gaussian_mu_lower`` and ``score_sd_ratio``.
    """
    scores = np.asarray(scores, dtype=float).ravel()
    included = np.asarray(included, dtype=bool).ravel()
    if scores.shape != included.shape:
        raise ValueError(f"scores and included: lengths differ ({scores.size} vs {included.size})")
    m = scores.size
    if m == 0:
        raise ValueError("scores: no canaries")
    _check_level("delta", delta)
    _check_level("beta", beta)
    unknown = [name for name in analyses if name not in ALL_ANALYSES]
    if unknown or not analyses:
        raise ValueError(f"analyses: must be a non-empty subset of {', '.join(ALL_ANALYSES)} (got {list(analyses)})")
    analyses = tuple(dict.fromkeys(analyses))
    candidates = guess_candidates(guesses, m)
    level = beta / len(candidates)

    best: dict[str, dict] = {}
    guessing = [name for name in analyses if name != "gaussian"]
    for k_in, k_out in candidates if guessing else []:
        r, v = count_correct(membership_guesses(scores, k_in=k_in, k_out=k_out), included)
        found = {}
        if "steinke" in guessing:
            found["steinke"] = (steinke_epsilon_lower(m, r, v, delta=delta, beta=level), None)
        if "fdp" in guessing:
            mu = fdp_mu_lower(m, r, v, beta=level)
            found["fdp"] = (gdp_epsilon(mu, delta), mu)
        for name, (eps, mu) in found.items():
            if name not in best or eps > best[name]["epsilon"]:
                best[name] = {"epsilon": eps, "r": r, "v": v, "k_in": k_in, "k_out": k_out, "mu": mu}
    out = {"canaries": m, "delta": delta, "beta": beta, "candidates": len(candidates)}
    if "gaussian" in analyses:
        mu = gaussian_pair_mu_lower(scores, included, beta=beta)
        best["gaussian"] = {"epsilon": math.inf if math.isinf(mu) else gdp_epsilon(mu, delta),
                            "r": None, "v": None, "k_in": None, "k_out": None, "mu": mu}
        out["gaussian_mu_lower"] = mu
        out["score_sd_ratio"] = score_sd_ratio(scores, included)
    out.update({
        "epsilon_lower": {name: best[name]["epsilon"] for name in analyses},
        "guesses": {name: best[name]["r"] for name in analyses},
        "correct": {name: best[name]["v"] for name in analyses},
        "guesses_in": {name: best[name]["k_in"] for name in analyses},
        "guesses_out": {name: best[name]["k_out"] for name in analyses},
    })
    if "fdp" in analyses:
        out["gdp_mu_lower"] = best["fdp"]["mu"]
    return out
