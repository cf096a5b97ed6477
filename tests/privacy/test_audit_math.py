"""The one-run audit's math (fedsim.privacy.audit) against closed forms, literal re-derivations
of the papers' algorithms, dp-accounting, and simulated mechanisms whose privacy is exact."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special, stats

from fedsim.privacy import audit
from fedsim.privacy.bag_mechanism import analytic_gaussian_sigma

BETA = 0.05


def clopper_pearson_epsilon(r: int, v: int, beta: float) -> float:
    """delta = 0: P[Bin(r, q) >= v] < beta exactly when q < p_lo, the one-sided Clopper-Pearson
    lower bound of a binomial proportion; so epsilon_lower = logit(p_lo), or 0 below 1/2."""
    p_lo = stats.beta.ppf(beta, v, r - v + 1)
    return max(0.0, float(special.logit(p_lo)))


def steinke_p_value_literal(m, r, v, eps, delta):
    """The appendix algorithm of Steinke et al. 2023 as printed: a loop over i with a running sum."""
    q = 1 / (1 + math.exp(-eps))
    tail = stats.binom.sf(v - 1, r, q)
    alpha, running = 0.0, 0.0
    for i in range(1, v + 1):
        running += stats.binom.pmf(v - i, r, q)
        if running > i * alpha:
            alpha = running / i
    return min(tail + alpha * delta * 2 * m, 1.0)


def fdp_rejects_literal(m, r, v, mu, beta):
    """The f-DP recursion with abstention written out as two arrays, no early exit."""
    def inverse(x):
        return stats.norm.cdf(stats.norm.ppf(x) - mu)
    h = [0.0] * (v + 1)
    rr = [0.0] * (v + 1)
    h[v] = beta * (r - v) / m
    rr[v] = beta * v / m
    for i in range(v - 1, -1, -1):
        h[i] = max(h[i + 1], inverse(rr[i + 1]))
        rr[i] = min(rr[i + 1] + i / (r - i) * (h[i] - h[i + 1]), 1.0)
    return rr[0] + h[0] > r / m


# ------------------------------------------------------------------ Steinke et al.

@pytest.mark.parametrize("r,v", [(100, 100), (100, 80), (50, 40), (500, 300), (1000, 560), (20, 11)])
def test_steinke_delta_zero_is_clopper_pearson(r, v):
    got = audit.steinke_epsilon_lower(1000, r, v, delta=0.0, beta=BETA)
    assert got == pytest.approx(clopper_pearson_epsilon(r, v, BETA), abs=1e-5)


def test_steinke_perfect_guesses_closed_form():
    # all r guesses right: q^r < beta, so epsilon_lower = logit(beta^(1/r))
    for r in (10, 100, 1000):
        q = BETA ** (1 / r)
        got = audit.steinke_epsilon_lower(1000, r, r, delta=0.0, beta=BETA)
        assert got == pytest.approx(math.log(q / (1 - q)), abs=1e-5)


@pytest.mark.parametrize("m,r,v,eps,delta", [(1000, 200, 170, 1.0, 1e-5), (1000, 200, 170, 2.5, 1e-3),
                                            (100, 100, 100, 3.0, 1e-5), (5000, 1000, 600, 0.3, 1e-6),
                                            (1000, 50, 10, 0.5, 1e-2)])
def test_steinke_p_value_matches_the_papers_loop(m, r, v, eps, delta):
    assert audit.steinke_p_value(m, r, v, eps, delta) == pytest.approx(
        steinke_p_value_literal(m, r, v, eps, delta), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("m,r,v,beta,published", [(500, 100, 100, 0.05, 3.4791953936219215),
                                                  (500, 100, 100, 0.01, 3.023197554051876),
                                                  (500, 35, 23, 0.05, 0.014548719860613346),
                                                  (500, 100, 60, 0.05, 0.05073561053723097)])
def test_steinke_matches_values_published_by_an_independent_implementation(m, r, v, beta, published):
    # audit_results.json of the codedp-cpt-models on Hugging Face (delta = 1e-5), computed by
    # another implementation of the paper's appendix algorithm; agreement to the bisection's tolerance
    assert audit.steinke_epsilon_lower(m, r, v, delta=1e-5, beta=beta) == pytest.approx(published, abs=5e-6)


def test_steinke_delta_makes_the_bound_weaker():
    no_delta = audit.steinke_epsilon_lower(1000, 300, 280, delta=0.0, beta=BETA)
    small = audit.steinke_epsilon_lower(1000, 300, 280, delta=1e-5, beta=BETA)
    large = audit.steinke_epsilon_lower(1000, 300, 280, delta=1e-3, beta=BETA)
    assert no_delta > small > large > 0


# ------------------------------------------------------------------ both analyses

def bound(name, m, r, v, *, delta=1e-5, beta=BETA):
    return {"steinke": audit.steinke_epsilon_lower, "fdp": audit.fdp_epsilon_lower}[name](
        m, r, v, delta=delta, beta=beta)


@pytest.mark.parametrize("name", audit.ANALYSES)
def test_monotone_in_correct_and_guesses(name):
    m = 1000
    by_correct = [bound(name, m, 200, v) for v in range(110, 201, 10)]
    assert all(a < b for a, b in zip(by_correct, by_correct[1:])), by_correct
    # more guesses for the same correct count: lower accuracy, weaker bound
    by_guesses = [bound(name, m, r, 150) for r in (150, 160, 180, 200)]
    assert all(a > b for a, b in zip(by_guesses, by_guesses[1:])), by_guesses
    # the same (perfect) accuracy on more guesses: more evidence, stronger bound
    perfect = [bound(name, m, r, r) for r in (10, 50, 100, 400)]
    assert all(a < b for a, b in zip(perfect, perfect[1:])), perfect
    # and more confidence asked, weaker bound
    assert bound(name, m, 200, 180, beta=0.01) < bound(name, m, 200, 180, beta=0.1)


@pytest.mark.parametrize("name", audit.ANALYSES)
@pytest.mark.parametrize("r,v", [(100, 50), (100, 30), (1000, 500), (1, 0), (10, 5)])
def test_no_bound_at_chance_accuracy(name, r, v):
    assert bound(name, 1000, r, v) == 0.0


def test_no_guesses_no_bound():
    assert audit.steinke_epsilon_lower(100, 0, 0, delta=1e-5, beta=BETA) == 0.0
    assert audit.fdp_mu_lower(100, 0, 0, beta=BETA) == 0.0


@pytest.mark.parametrize("m,r,v,mu", [(1000, 200, 190, 0.5), (1000, 200, 190, 1.5), (1000, 200, 150, 0.3),
                                      (1000, 1000, 700, 0.8), (100, 100, 90, 2.0), (1000, 100, 100, 3.0)])
def test_fdp_test_is_the_papers_recursion(m, r, v, mu):
    assert audit.fdp_rejects_gdp(m, r, v, mu, beta=BETA) == fdp_rejects_literal(m, r, v, mu, BETA)


def test_fdp_rejection_is_monotone_in_mu():
    # fdp_mu_lower bisects, which is right only if a larger mu (a weaker claim) is never easier to reject
    for r, v in [(200, 150), (200, 199), (1000, 600), (50, 50)]:
        decisions = [audit.fdp_rejects_gdp(1000, r, v, mu, beta=BETA) for mu in np.linspace(0, 4, 81)]
        flips = sum(a != b for a, b in zip(decisions, decisions[1:]))
        assert decisions[0] and flips == 1 and not decisions[-1], (r, v, decisions)


def test_fdp_mu_lower_sits_on_the_rejection_boundary():
    mu = audit.fdp_mu_lower(1000, 200, 185, beta=BETA)
    assert mu > 0
    assert fdp_rejects_literal(1000, 200, 185, mu * (1 - 1e-4), BETA)
    assert not fdp_rejects_literal(1000, 200, 185, mu * (1 + 1e-4), BETA)


def test_fdp_is_tighter_than_steinke_on_the_same_guesses():
    # The papers' claim, on counts a Gaussian mechanism produces: a trade-off curve rejects more
    for r, v in [(200, 170), (200, 190), (100, 100), (1000, 700)]:
        assert bound("fdp", 1000, r, v) > bound("steinke", 1000, r, v) > 0


# ------------------------------------------------------------------ GDP conversion

@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0, 4.0, 8.0])
def test_gdp_matches_the_analytic_gaussian_mechanism_of_dp_accounting(eps):
    # mu-GDP is the Gaussian mechanism with sensitivity / sigma = mu; dp-accounting calibrates
    # sigma for (eps, delta) by Balle & Wang's analytic Gaussian mechanism
    sigma = analytic_gaussian_sigma(eps, 1e-5, 1.0)
    assert audit.gdp_mu(eps, 1e-5) == pytest.approx(1 / sigma, rel=1e-6)
    assert audit.gdp_epsilon(1 / sigma, 1e-5) == pytest.approx(eps, rel=1e-5)


def test_gdp_delta_edges():
    assert audit.gdp_delta(1.0, 0.0) == 0.0
    assert audit.gdp_epsilon(0.0, 1e-5) == 0.0
    # at eps = 0, delta is the total variation distance 2 Phi(mu/2) - 1
    assert audit.gdp_delta(0.0, 1.3) == pytest.approx(2 * stats.norm.cdf(0.65) - 1, rel=1e-12)
    assert audit.gdp_epsilon(1.3, 0.5) == 0.0  # TV distance below delta: no epsilon needed
    assert math.isfinite(audit.gdp_epsilon(40.0, 1e-10))


# ------------------------------------------------------------------ soundness by simulation

def test_steinke_is_sound_on_exact_randomized_response():
    """eps-DP randomized response reveals each canary's bit with probability e^eps/(1+e^eps):
    the audit may exceed eps in at most about beta of the runs."""
    eps, m, runs = 1.5, 300, 3000
    rng = np.random.default_rng(7)
    correct = rng.binomial(m, special.expit(eps), size=runs)  # every canary guessed from the released bit
    lower = {v: audit.steinke_epsilon_lower(m, m, int(v), delta=0.0, beta=BETA) for v in np.unique(correct)}
    found = np.array([lower[v] for v in correct])
    violations = float(np.mean(found > eps))
    assert violations <= BETA + 3 * math.sqrt(BETA * (1 - BETA) / runs), violations
    # and it is not vacuous: the median bound recovers most of eps
    assert np.median(found) > 0.75 * eps


def gaussian_canary_counts(mu, m, k_in, k_out, runs, seed):
    """Each canary's score is N(mu * included, 1): the release is exactly mu-GDP towards every
    canary. Returns the number of correct guesses in each run."""
    rng = np.random.default_rng(seed)
    included = rng.random((runs, m)) < 0.5
    scores = rng.normal(size=(runs, m)) + mu * included
    order = np.argsort(scores, axis=1)
    top = np.take_along_axis(included, order[:, m - k_in:], axis=1).sum(axis=1)
    bottom = k_out - np.take_along_axis(included, order[:, :k_out], axis=1).sum(axis=1)
    return top + bottom


@pytest.mark.parametrize("eps", [1.0, 4.0])
def test_both_analyses_are_sound_on_the_gaussian_mechanism(eps):
    """At the mechanism's true parameters, neither test rejects in more than about beta of the runs."""
    delta, m, k, runs = 1e-5, 1000, 200, 1000
    mu = audit.gdp_mu(eps, delta)
    correct = gaussian_canary_counts(mu, m, k // 2, k // 2, runs, seed=int(eps * 10))
    slack = 3 * math.sqrt(BETA * (1 - BETA) / runs)
    steinke = {v: audit.steinke_p_value(m, k, int(v), eps, delta) < BETA for v in np.unique(correct)}
    fdp = {v: audit.fdp_rejects_gdp(m, k, int(v), mu, beta=BETA) for v in np.unique(correct)}
    assert np.mean([steinke[v] for v in correct]) <= BETA + slack
    assert np.mean([fdp[v] for v in correct]) <= BETA + slack
    if eps >= 4:
        # and the f-DP test has power: a claim of half the true mu is rejected in most runs
        weaker = {v: audit.fdp_rejects_gdp(m, k, int(v), mu / 2, beta=BETA) for v in np.unique(correct)}
        assert np.mean([weaker[v] for v in correct]) > 0.5


# ------------------------------------------------------------------ guesses and audit_bounds

def test_membership_guesses_top_and_bottom():
    scores = np.array([0.3, 2.0, -1.0, 0.9, -0.5, 1.5])
    assert audit.membership_guesses(scores, k_in=2, k_out=1).tolist() == [0, 1, -1, 0, 0, 1]
    assert audit.membership_guesses(scores, k_in=0, k_out=3).tolist() == [-1, 0, -1, 0, -1, 0]
    # ties broken by index, whatever the inclusion bits
    assert audit.membership_guesses(np.zeros(4), k_in=1, k_out=1).tolist() == [-1, 0, 0, 1]
    r, v = audit.count_correct(np.array([0, 1, -1, 1, -1]), np.array([1, 1, 1, 0, 0], dtype=bool))
    assert (r, v) == (4, 2)


@pytest.mark.parametrize("k_in,k_out", [(-1, 2), (4, 3)])
def test_membership_guesses_refuses_bad_counts(k_in, k_out):
    with pytest.raises(ValueError, match="guesses"):
        audit.membership_guesses(np.zeros(6), k_in=k_in, k_out=k_out)


def test_guess_candidates():
    assert audit.guess_candidates(5, 10) == [(3, 2)]
    assert audit.guess_candidates((4, 0), 10) == [(4, 0)]
    assert audit.guess_candidates([2, (1, 1), 4], 10) == [(1, 1), (2, 2)]
    with pytest.raises(ValueError, match="guesses"):
        audit.guess_candidates(11, 10)
    with pytest.raises(ValueError, match="guesses"):
        audit.guess_candidates([], 10)


def test_audit_bounds_single_candidate_equals_the_functions():
    rng = np.random.default_rng(3)
    included = rng.random(500) < 0.5
    scores = rng.normal(size=500) + 1.2 * included
    out = audit.audit_bounds(scores, included, delta=1e-5, beta=BETA, guesses=100)
    r, v = audit.count_correct(audit.membership_guesses(scores, k_in=50, k_out=50), included)
    assert out["guesses"] == {"steinke": r, "fdp": r} and out["correct"] == {"steinke": v, "fdp": v}
    assert out["epsilon_lower"]["steinke"] == audit.steinke_epsilon_lower(500, r, v, delta=1e-5, beta=BETA)
    assert out["epsilon_lower"]["fdp"] == audit.fdp_epsilon_lower(500, r, v, delta=1e-5, beta=BETA)
    assert out["gdp_mu_lower"] == audit.fdp_mu_lower(500, r, v, beta=BETA)
    assert out["canaries"] == 500 and out["candidates"] == 1 and out["beta"] == BETA
    assert 0 < out["epsilon_lower"]["steinke"] < out["epsilon_lower"]["fdp"]


def test_audit_bounds_search_pays_a_union_bound():
    rng = np.random.default_rng(4)
    included = rng.random(600) < 0.5
    scores = rng.normal(size=600) + 1.5 * included
    grid = [20, 60, 200, 600]
    out = audit.audit_bounds(scores, included, delta=1e-5, beta=BETA, guesses=grid)
    assert out["candidates"] == 4
    each = []
    for k in grid:
        r, v = audit.count_correct(audit.membership_guesses(scores, k_in=k - k // 2, k_out=k // 2), included)
        each.append(audit.steinke_epsilon_lower(600, r, v, delta=1e-5, beta=BETA / 4))
    assert out["epsilon_lower"]["steinke"] == max(each)
    assert out["guesses"]["steinke"] == grid[int(np.argmax(each))]


def test_audit_bounds_without_signal_and_with_a_perfect_one():
    rng = np.random.default_rng(5)
    included = rng.random(1000) < 0.5
    blind = audit.audit_bounds(rng.normal(size=1000), included, delta=1e-5, beta=BETA, guesses=[100, 1000])
    assert blind["epsilon_lower"] == {"steinke": 0.0, "fdp": 0.0}
    split = (int(included.sum()), int((~included).sum()))
    seen = audit.audit_bounds(included.astype(float), included, delta=1e-5, beta=BETA, guesses=split)
    assert seen["correct"]["steinke"] == 1000
    assert seen["epsilon_lower"]["steinke"] > 4 and seen["epsilon_lower"]["fdp"] > 4


def test_audit_bounds_refuses_bad_input():
    with pytest.raises(ValueError, match="lengths differ"):
        audit.audit_bounds(np.zeros(3), np.zeros(4, dtype=bool), delta=1e-5, beta=BETA, guesses=2)
    with pytest.raises(ValueError, match="beta"):
        audit.audit_bounds(np.zeros(4), np.zeros(4, dtype=bool), delta=1e-5, beta=1.5, guesses=2)
    with pytest.raises(ValueError, match="delta"):
        audit.audit_bounds(np.zeros(4), np.zeros(4, dtype=bool), delta=0.0, beta=BETA, guesses=2)


# ------------------------------------------------------------------ the Gaussian model of the scores

def test_gaussian_pair_is_sound_under_its_model():
    """Scores N(mu * included, 1): the lower confidence bound exceeds the true mu in at most
    about beta of the runs (checked through the pivot, vectorised), and is tight."""
    mu, m, runs = 0.5, 400, 2000
    rng = np.random.default_rng(11)
    included = rng.random((runs, m)) < 0.5
    scores = rng.normal(size=(runs, m)) * 3.0 + 7.0 + 3.0 * mu * included  # any location and scale
    t, df, scale = np.array([audit.gaussian_pair_statistic(s, i) for s, i in zip(scores, included)]).T
    rejects_truth = stats.nct.sf(t, df, mu / scale) < BETA
    assert np.mean(rejects_truth) <= BETA + 3 * math.sqrt(BETA * (1 - BETA) / runs)
    assert np.mean(rejects_truth) >= BETA - 3 * math.sqrt(BETA * (1 - BETA) / runs)  # exact, not loose
    for s, i in list(zip(scores, included))[:5]:
        lower = audit.gaussian_pair_mu_lower(s, i, beta=BETA)
        t1, df1, scale1 = audit.gaussian_pair_statistic(s, i)
        assert stats.nct.sf(t1, df1, lower / scale1) == pytest.approx(BETA, rel=1e-6)


def test_gaussian_pair_matches_the_normal_approximation_on_many_canaries():
    # for large samples the noncentral-t bound is d - z_{1-beta} * se(d), with
    # se(d)^2 = 1/n_in + 1/n_out + d^2 / (2 (n_in + n_out)) (Hedges & Olkin 1985)
    rng = np.random.default_rng(12)
    included = rng.random(20000) < 0.5
    scores = rng.normal(size=20000) + 1.0 * included
    n_in, n_out = included.sum(), (~included).sum()
    t, _, scale = audit.gaussian_pair_statistic(scores, included)
    d = t * scale
    se = math.sqrt(1 / n_in + 1 / n_out + d * d / (2 * (n_in + n_out)))
    expected = d - stats.norm.ppf(1 - BETA) * se
    assert audit.gaussian_pair_mu_lower(scores, included, beta=BETA) == pytest.approx(expected, rel=2e-3)


def test_gaussian_pair_edges():
    rng = np.random.default_rng(13)
    included = rng.random(200) < 0.5
    # a shift the wrong way, and a perfect separation with no spread
    assert audit.gaussian_pair_mu_lower(-1.0 * included, included, beta=BETA) == 0.0
    assert audit.gaussian_pair_mu_lower(1.0 * included, included, beta=BETA) == math.inf
    assert audit.gaussian_pair_epsilon_lower(1.0 * included, included, delta=1e-5, beta=BETA) == math.inf
    with pytest.raises(ValueError, match="NaN"):
        audit.gaussian_pair_mu_lower(np.array([0.0, 1.0, np.nan, 2.0, 3.0]), np.array([1, 1, 0, 0, 0], dtype=bool),
                                     beta=BETA)
    with pytest.raises(ValueError, match="at least 2 canaries in and 2 out"):
        audit.gaussian_pair_mu_lower(np.zeros(5), np.array([1, 0, 0, 0, 0], dtype=bool), beta=BETA)


def test_audit_bounds_with_every_analysis():
    rng = np.random.default_rng(14)
    included = rng.random(1000) < 0.5
    scores = rng.normal(size=1000) + audit.gdp_mu(4.0, 1e-5) * included
    out = audit.audit_bounds(scores, included, delta=1e-5, beta=BETA, guesses=[100, 200],
                             analyses=audit.ALL_ANALYSES)
    assert set(out["epsilon_lower"]) == {"steinke", "fdp", "gaussian"}
    assert out["guesses"]["gaussian"] is None and out["correct"]["gaussian"] is None
    assert out["epsilon_lower"]["gaussian"] == audit.gaussian_pair_epsilon_lower(scores, included, delta=1e-5,
                                                                                 beta=BETA)
    assert out["score_sd_ratio"] == pytest.approx(1.0, abs=0.25)  # the model fits: equal spreads
    # on scores that fit its model, using every score beats thresholded guesses
    assert out["epsilon_lower"]["steinke"] < out["epsilon_lower"]["fdp"] < out["epsilon_lower"]["gaussian"] < 4.0
    only = audit.audit_bounds(scores, included, delta=1e-5, beta=BETA, guesses=100, analyses=["gaussian"])
    assert set(only["epsilon_lower"]) == {"gaussian"} and "gdp_mu_lower" not in only
    with pytest.raises(ValueError, match="analyses"):
        audit.audit_bounds(scores, included, delta=1e-5, beta=BETA, guesses=100, analyses=["lira"])
