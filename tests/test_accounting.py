"""Accounting: fedsim's cached RDP/PRV against dp-accounting, per client and per user."""

from __future__ import annotations

import csv
import json
import math

import numpy as np

import dp_accounting as dpa
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

from fedsim.privacy.accounting import (ORDERS, calibrate_noise, epsilon, rdp_curve, rdp_epsilon,
                                      undominated, user_level_epsilon)
from fedsim.privacy.rdp import compute_rdp_curve
from fedsim.run import run_experiment


def reference_rdp(history, delta):
    """dp-accounting's independent RDP implementation, on fedsim's grid of orders."""
    acc = RdpAccountant(orders=list(ORDERS))
    for sigma, q, steps in history:
        acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def reference_pld(history, delta):
    acc = PLDAccountant()
    for sigma, q, steps in history:
        acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("history", [[(1.0, 0.1, 100)], [(1.0, 0.2, 45)], [(0.8, 0.05, 300)],
                                     [(1.0, 0.1, 10), (2.0, 0.25, 40)],
                                     [(20.0, 1 / 3, 1)]])  # best order ~190: beyond Opacus' 63
def test_rdp_matches_dp_accounting(history):
    # same orders, two implementations of the subsampled-Gaussian RDP and its conversion to
    # (epsilon, delta); they differ by < 0.5% (fractional orders), exactly at integer optima
    assert epsilon(history, 1e-5, "rdp") == pytest.approx(reference_rdp(history, 1e-5), rel=0.005)


def test_published_reference_values():
    assert rdp_epsilon([(1.0, 0.1, 100)], 1e-5) == pytest.approx(7.899, abs=0.001)
    assert epsilon([(1.0, 0.1, 100)], 1e-5, "prv") == pytest.approx(7.057, abs=0.01)
    assert rdp_epsilon([(1.0, 0.2, 45)], 1e-5) == pytest.approx(10.730, abs=0.001)


def test_prv_matches_pld():
    hist = [(1.0, 0.1, 100)]
    assert epsilon(hist, 1e-5, "prv") == pytest.approx(reference_pld(hist, 1e-5), rel=0.02)


def test_prv_memo_keeps_opacus_values_and_is_reused():
    # the memo on Opacus' one-order RDP must change no value: compare against Opacus' PRV
    # accountant computing with the unwrapped function, on histories that grow step by step
    # as a run's per-round epsilon does, and check that the growth is answered from the memo
    from opacus.accountants import PRVAccountant

    from fedsim.privacy.accounting import clear_memos, memoize_opacus_rdp

    memoize_opacus_rdp()
    clear_memos()
    ours = [epsilon([(1.1, 0.125, n)], 1e-5, "prv") for n in (30, 31, 32)]
    assert opacus_rdp._compute_rdp.cache_info().hits > 0
    memo = opacus_rdp._compute_rdp
    try:
        opacus_rdp._compute_rdp = memo.__wrapped__
        for n, ours_n in zip((30, 31, 32), ours):
            acc = PRVAccountant()
            acc.history = [(1.1, 0.125, n)]
            assert ours_n == acc.get_epsilon(delta=1e-5)
    finally:
        opacus_rdp._compute_rdp = memo


def test_cached_curve_equals_opacus_get_epsilon():
    acc = RDPAccountant()
    acc.history = [(1.1, 0.125, 37), (0.9, 0.5, 4)]
    assert rdp_epsilon(acc.history, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)


def assert_matches_opacus_rdp(new, old, orders):
    """fedsim's vectorized curve against Opacus' compute_rdp: inf exactly where Opacus has inf;
    elsewhere |difference| <= 1e-9 |value| + 1e-12 / (alpha - 1), i.e. 1e-12 absolute in log A.
    The absolute part is float rounding of a sum near 1: Opacus' running _log_add/_log_sub errs
    by up to ~2e-13 in log A (fedsim.privacy.rdp), which is all there is where log A is tiny
    (at q = 1e-6, sigma = 50 Opacus returns 0 or a negative RDP)."""
    new, old, orders = np.asarray(new, float), np.asarray(old, float), np.asarray(orders, float)
    assert new.shape == old.shape
    np.testing.assert_array_equal(np.isinf(new), np.isinf(old))
    np.testing.assert_array_equal(np.isnan(new), np.isnan(old))
    finite = np.isfinite(old)
    if not finite.any():
        return
    bound = 1e-9 * np.abs(old[finite]) + 1e-12 / (orders[finite] - 1)
    excess = np.abs(new[finite] - old[finite]) - bound
    worst = int(np.argmax(excess))
    assert excess[worst] <= 0, (f"order {orders[finite][worst]}: {new[finite][worst]!r} vs Opacus "
                                f"{old[finite][worst]!r}")


GRID_Q = [1e-6, 1e-4, 0.001, 0.01, 0.0123, 0.05, 0.1, 1 / 3, 0.5, 0.9, 0.999, 1.0]


@pytest.mark.parametrize("sigma", [0.3, 0.5, 0.7, 1, 1.5, 2, 5, 10, 50])
def test_rdp_curve_matches_opacus_compute_rdp(sigma):
    """Every order of ORDERS (fractional up to 10.9, integer up to 1024) on a grid of q from
    1e-6 to 1: the series with huge terms (sigma = 0.3), the long ones (q = 0.5, sigma = 50:
    ~16,000 terms) and q next to 0 and 1."""
    rdp_curve.cache_clear()
    for q in GRID_Q:
        old = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(ORDERS))
        assert_matches_opacus_rdp(rdp_curve(sigma, q), old, ORDERS)


@pytest.mark.parametrize("q, sigma", [(0.0, 1.0), (0.0, 0.0), (0.1, 0.0), (1.0, 0.0), (1.0, 0.7), (0.3, 1e3)])
def test_rdp_curve_edge_cases_match_opacus(q, sigma):
    """q = 0: 0; sigma = 0: inf; q = 1: alpha / (2 sigma^2); and an order of inf gives inf."""
    orders = list(ORDERS) + [math.inf]
    new = compute_rdp_curve(q, sigma, orders)
    old = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)
    assert_matches_opacus_rdp(new, old, orders)
    if q == 0 or sigma == 0 or q == 1:
        np.testing.assert_array_equal(new, old)


def test_rdp_curve_outside_the_domain_behaves_as_opacus():
    with pytest.raises(ValueError):
        opacus_rdp.compute_rdp(q=1.5, noise_multiplier=1.0, steps=1, orders=list(ORDERS))
    with pytest.raises(ValueError):
        compute_rdp_curve(1.5, 1.0, ORDERS)


def test_cached_rdp_curve_is_read_only():
    with pytest.raises(ValueError):
        rdp_curve(1.0, 0.1)[0] = 0.0


@pytest.mark.parametrize("sigma, q", [(0.5, 0.5), (1.0, 1 / 6), (3.0, 0.01), (1.0, 1e-4)])
def test_rdp_curve_is_the_same_bits_order_by_order_and_with_its_q_free_parts_cached(sigma, q):
    """The binomial coefficients of each order's series are computed once per process
    (`rdp._binomial_rows`, `rdp._integer_terms`) and stacked for the orders a block still needs:
    a curve must not depend on that, nor on which other orders it is computed with."""
    from fedsim.privacy import rdp
    rdp._binomial_rows.cache_clear()
    rdp._integer_terms.cache_clear()
    cold = compute_rdp_curve(q, sigma, ORDERS)
    assert rdp._binomial_rows.cache_info().currsize > 0 and rdp._integer_terms.cache_info().currsize == 1
    warm = compute_rdp_curve(q, sigma, ORDERS)
    order_by_order = np.array([compute_rdp_curve(q, sigma, [alpha])[0] for alpha in ORDERS])
    assert cold.tobytes() == warm.tobytes() == order_by_order.tobytes()
    log_coef, sign = rdp._binomial_rows((1.5, 2.5), 0, 4)
    with pytest.raises(ValueError):
        log_coef[0, 0] = 0.0
    # C(1.5, i) for i = 0..3: 1, 1.5, 0.375, -0.0625
    np.testing.assert_allclose(np.exp(log_coef[0]) * sign[0], [1.0, 1.5, 0.375, -0.0625])


@pytest.mark.parametrize("history", [[(1.0, 0.01, 1000)], [(0.7, 0.05, 200), (1.3, 0.1, 50)],
                                     [(2.0, 1 / 3, 30)], [(0.5, 0.001, 10000)],
                                     [(1.1, 0.125, 37), (0.9, 0.5, 4), (3.0, 0.0123, 500)],
                                     [(0.3, 0.02, 5), (1.0, 0.999, 1)]])
@pytest.mark.parametrize("delta", [1e-5, 1e-8])
def test_rdp_epsilon_equals_opacus_get_epsilon(history, delta):
    """Histories whose best order is one of Opacus' (<= 63), so both use the same order."""
    acc = RDPAccountant()
    acc.history = list(history)
    _, best = acc.get_privacy_spent(delta=delta)
    assert 1.1 < best < 63
    rdp_curve.cache_clear()
    assert rdp_epsilon(history, delta) == pytest.approx(acc.get_epsilon(delta), rel=1e-9)


def test_no_noise_is_infinite_and_no_steps_is_zero():
    assert math.isinf(epsilon([(0.0, 0.1, 10)], 1e-5))
    assert epsilon([], 1e-5) == 0.0


def test_client_epsilon_after_participations_matches_dp_accounting(tiny):
    cfg = tiny(**{"privacy.noise_multiplier": 1.1, "federation.rounds": 4, "client.local_epochs": 2})
    out = run_experiment(cfg, progress=False)
    rows = list(csv.DictReader((out / "clients.csv").open()))
    assert sum(int(r["participations"]) for r in rows) == 4 * 3  # only participation adds steps
    for r in rows:
        n, r_ = int(r["num_examples"]), int(r["participations"])
        steps_per_epoch = math.ceil(n / cfg.client.batch_size)
        history = [(1.1, 1 / steps_per_epoch, r_ * 2 * steps_per_epoch)]
        assert float(r["sample_epsilon"]) == pytest.approx(reference_rdp(history, 1e-5), rel=0.01)


def test_user_level_epsilon_matches_dp_accounting(tiny):
    """auto sampling is Poisson under central DP, and so is its accountant (more in tests/privacy)."""
    cfg = tiny(**{"privacy.user_noise_multiplier": 1.0, "privacy.user_clip": 1.0, "federation.rounds": 3})
    out = run_experiment(cfg, progress=False)
    summary = json.loads((out / "summary.json").read_text())
    expected = reference_rdp([(1.0, 3 / 6, 3)], 1e-5)
    assert summary["user_level"]["epsilon"] == pytest.approx(expected, rel=0.01)
    assert "Poisson client sampling" in summary["user_level"]["accountant"]
    assert summary["user_level"]["sampling"] == summary["sampling"] == "poisson"
    assert user_level_epsilon(noise_multiplier=1.0, num_clients=6, cohort_size=3, rounds=3, delta=1e-5,
                              sampling="poisson") == pytest.approx(expected, rel=0.01)


def test_pld_at_the_sample_level_is_dp_accountings():
    hist = [(1.0, 0.1, 10), (2.0, 0.25, 40)]
    assert epsilon(hist, 1e-5, "pld") == pytest.approx(reference_pld(hist, 1e-5), rel=1e-9)
    assert epsilon(hist, 1e-5, "pld") == pytest.approx(epsilon(hist, 1e-5, "prv"), rel=0.02)


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_calibrated_sigma_lands_at_target_sample_level(target):
    plans = [(1 / 4, 40), (1 / 8, 80)]
    sigma = calibrate_noise(target, plans, 1e-5)
    achieved = max(reference_rdp([(sigma, q, steps)], 1e-5) for q, steps in plans)
    assert achieved <= target * 1.005  # the libraries differ by < 0.5% here
    assert achieved >= target * 0.95


def test_calibration_only_needs_the_undominated_plans():
    """Pruning plans that another beats in both q and steps never changes the worst epsilon."""
    rng = np.random.default_rng(3)
    plans = [(1 / int(rng.integers(2, 20)), int(rng.integers(5, 200))) for _ in range(12)]
    kept = undominated(plans)
    assert len(kept) < len(set(plans))
    for sigma in (0.7, 1.3, 3.0):
        worst_all = max(rdp_epsilon([(sigma, q, n)], 1e-5) for q, n in plans)
        assert max(rdp_epsilon([(sigma, q, n)], 1e-5) for q, n in kept) == worst_all
    assert undominated([(0.25, 10), (0.1, 10), (0.5, 10)]) == [(0.5, 10)]  # fixed local steps: largest q


@pytest.mark.parametrize("target", [1.0, 3.0])
def test_calibrated_sigma_lands_at_target_user_level(target):
    sigma = calibrate_noise(target, [(0.1, 100)], 1e-5, "prv")
    achieved = reference_pld([(sigma, 0.1, 100)], 1e-5)
    assert target * 0.95 <= achieved <= target * 1.01


def test_target_epsilon_run_reports_at_most_target(tiny):
    cfg = tiny(**{"privacy.target_epsilon": 3.0, "federation.rounds": 2, "federation.clients_per_round": 6})
    out = run_experiment(cfg, progress=False)
    summary = json.loads((out / "summary.json").read_text())
    # every client trains every round here, so its participation equals the planned one
    assert 0.95 * 3.0 <= summary["sample_level"]["epsilon_max"] <= 3.0


def test_orders_start_with_opacus_default_alphas():
    """fedsim writes Opacus' orders out instead of importing them (Opacus' import costs seconds)."""
    from fedsim.privacy.accounting import OPACUS_ORDERS

    assert list(OPACUS_ORDERS) == list(RDPAccountant.DEFAULT_ALPHAS)
    assert ORDERS[:len(OPACUS_ORDERS)] == OPACUS_ORDERS


@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-9])
@pytest.mark.parametrize("sigma,q,steps", [(1.0, 0.01, 1000), (0.6, 0.3, 40), (4.0, 1.0, 3), (20.0, 0.5, 1)])
def test_privacy_spent_equals_opacus_get_privacy_spent(sigma, q, steps, delta):
    """`fedsim.privacy.rdp.privacy_spent` is Opacus' RDP-to-(eps, delta) conversion, value and
    order, bit for bit, including where the best order is an extreme one (and both warn)."""
    import warnings

    from fedsim.privacy.rdp import privacy_spent

    rdp = steps * np.asarray(opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(ORDERS)))
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        want = opacus_rdp.get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=delta)
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        got = privacy_spent(ORDERS, rdp, delta)
    assert got == (float(want[0]), float(want[1]))
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]


def test_no_privacy_and_mismatched_lengths():
    from fedsim.privacy.rdp import privacy_spent

    eps, order = privacy_spent([2.0, 3.0], np.array([np.nan, np.nan]), 1e-5)
    assert math.isinf(eps) and math.isnan(order)
    with pytest.raises(ValueError, match="2 orders, 1 RDP values"):
        privacy_spent([2.0, 3.0], np.array([1.0]), 1e-5)


def test_an_rdp_epsilon_does_not_import_opacus():
    """Importing Opacus costs 2-3 s; computing an RDP epsilon (every DP run, every client) and
    the vectorized engine must not need it, so a run that does not train with Opacus starts fast."""
    import subprocess
    import sys

    code = ("import sys\nfrom fedsim.privacy.accounting import epsilon\nimport fedsim.clients.app\n"
            "assert epsilon([(1.0, 0.1, 100)], 1e-5) > 0\nprint('opacus' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
