"""Per-client calibration (``privacy.calibration = "per-client"``): each client its own sigma,
its own epsilon at the target. Checked against the accountant itself, plan by plan."""

from __future__ import annotations

import pytest

from fedsim.config import load_config
from fedsim.errors import ConfigError
from fedsim.privacy.accounting import calibrate_noise, calibrate_per_client, epsilon
from fedsim.run import client_plans, client_sizes, prepare
from fedsim.datasets import load_dataset

T, DELTA = 3.0, 1e-5


def test_each_plan_lands_at_the_target_and_equal_plans_share_a_sigma():
    plans = [(0.25, 40), None, (1.0, 10), (0.25, 40), (0.05, 400)]
    sigmas = calibrate_per_client(T, plans, DELTA, "rdp")
    assert sigmas[1] is None and sigmas[0] == sigmas[3]
    for plan, sigma in zip(plans, sigmas):
        if plan is None:
            continue
        eps = epsilon([(sigma, plan[0], plan[1])], DELTA, "rdp")
        assert 0.999 * T <= eps <= T, (plan, sigma, eps)
    # the worst-client sigma is the largest of them: the same bisection on the tightest plan
    assert calibrate_noise(T, [p for p in plans if p], DELTA, "rdp") == max(s for s in sigmas if s)


@pytest.mark.parametrize("accountant", ["rdp", pytest.param("prv", marks=pytest.mark.slow)])  # PRV: ~1 s a call
def test_quickstart_every_trained_client_at_the_target(tmp_path, accountant):
    cfg = load_config("configs/quickstart.toml", {"privacy.target_epsilon": T, "privacy.calibration": "per-client",
                                                  "privacy.accountant": accountant, "output.dir": str(tmp_path)})
    done = prepare(cfg)
    p = done.privacy
    sizes = client_sizes(done, load_dataset(done.data, done.federation.num_clients, done.seed))
    plans = client_plans(done, sizes)
    assert len(p.client_noise_multipliers) == 20 and p.noise_multiplier == max(p.client_noise_multipliers)
    eps = [epsilon([(s, *plan)], DELTA, accountant) for s, plan in zip(p.client_noise_multipliers, plans) if plan]
    assert all(0.98 * T <= e <= T for e in eps), eps
    # the clients differ in size and participations: one sigma for all would put most far below T
    assert min(p.client_noise_multipliers) < 0.8 * p.noise_multiplier


def test_worst_client_calibration_leaves_no_per_client_list(tmp_path):
    cfg = load_config("configs/quickstart.toml", {"privacy.target_epsilon": T, "output.dir": str(tmp_path)})
    assert prepare(cfg).privacy.client_noise_multipliers == []


def test_a_list_of_the_wrong_length_or_max_is_refused(tiny):
    with pytest.raises(ConfigError, match=r"^privacy\.client_noise_multipliers: one sigma per client, 6"):
        tiny(**{"privacy.noise_multiplier": 1.0, "privacy.client_noise_multipliers": [1.0, 1.0]})
    with pytest.raises(ConfigError, match=r"^privacy\.noise_multiplier: with privacy\.client_noise_multipliers"):
        tiny(**{"privacy.noise_multiplier": 1.0, "privacy.client_noise_multipliers": [0.5] * 6})
    with pytest.raises(ConfigError, match=r"^privacy\.calibration: must be one of"):
        tiny(**{"privacy.calibration": "median-client"})


@pytest.mark.parametrize("engine", ["vectorized", "opacus"])
def test_a_run_puts_every_client_at_the_target(tmp_path, engine):
    """The engines train each client at its own sigma: the epsilon every client reports at the
    end (clients.csv, from its own accountant history) lies in [0.98 T, T]."""
    import csv

    from fedsim.run import run_experiment

    cfg = load_config("configs/quickstart.toml", {
        "privacy.target_epsilon": T, "privacy.calibration": "per-client", "federation.rounds": 6,
        "runtime.engine": engine, "output.dir": str(tmp_path / engine)})
    out = run_experiment(cfg, progress=False)
    final = {row["partition_id"]: float(row["sample_epsilon"]) for row in csv.DictReader((out / "clients.csv").open())
             if int(row["participations"]) > 0}
    assert len(final) >= 15
    assert all(0.98 * T <= e <= T for e in final.values()), final
    import json

    sample = json.loads((out / "summary.json").read_text())["sample_level"]
    assert sample["calibration"] == "per-client" and sample["noise_multiplier_max"] == sample["noise_multiplier"]
    assert sample["noise_multiplier_min"] < sample["noise_multiplier_median"] <= sample["noise_multiplier_max"]


def test_the_vectorized_noise_has_each_clients_own_std():
    """The noise a client's clipped sum gets has its own sigma * C: measured over 40,000 draws."""
    import torch

    from fedsim.clients.vectorized import _Noise

    stds = torch.tensor([[0.5], [2.0], [1.0]])
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    noise = _Noise({"w": torch.Size([40_000])}, 3, stds, "cpu", gens)
    summed = {"w": torch.zeros(3, 40_000)}
    noise.add_to(summed, 3)
    measured = summed["w"].std(dim=1)
    assert torch.allclose(measured, stds[:, 0], rtol=0.02), measured
    summed = {"w": torch.zeros(2, 40_000)}  # a prefix of the clients still active: their own stds
    noise.add_to(summed, 2)
    assert torch.allclose(summed["w"].std(dim=1), stds[:2, 0], rtol=0.02)


def test_calibration_probes_do_not_warn_about_the_rdp_order_grid():
    """The search's probes at sigmas far from the answer put RDP's best order at the edge of
    its grid; Opacus' warning about that speaks of a probe, not of the reported epsilon."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sigma = calibrate_noise(T, [(0.13, 1000)], DELTA, "rdp")
    assert not [w for w in caught if "Optimal order" in str(w.message)]
    assert 0.999 * T <= epsilon([(sigma, 0.13, 1000)], DELTA, "rdp") <= T


def test_each_clients_epsilon_agrees_with_dp_accounting():
    """The second check of a per-client claim: dp-accounting's own RDP accountant, on fedsim's
    orders, puts each calibrated client at the target too (its series differ from Opacus' by
    under 0.5% at fractional orders; test_accounting.py)."""
    import dp_accounting as dpa
    from dp_accounting.rdp import RdpAccountant

    from fedsim.privacy.accounting import ORDERS

    plans = [(0.25, 40), (1.0, 10), (0.05, 400), (1 / 15, 300)]
    for (q, steps), sigma in zip(plans, calibrate_per_client(T, plans, DELTA, "rdp")):
        acc = RdpAccountant(orders=list(ORDERS))
        acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
        assert acc.get_epsilon(DELTA) == pytest.approx(T, rel=0.005), (q, steps, sigma)
