"""Aggregate responses: the loss identity, the closed-form estimator, the label-DP mechanism."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dp_accounting.pld import common, privacy_loss_mechanism as plm

from clients.bags import client_bags, interpolated_loss, proportion_loss, squared_losses, train_bags
from fedsim.algorithms import Hyper, LocalTask, TrainSettings
from fedsim.config import load_config
from strategies.bags import BagsParams
from fedsim.privacy.bag_mechanism import (bag_sensitivity, make_bags, noise_scale, release_bag_means,
                                          release_label_proportions)


def test_instance_loss_is_bag_loss_plus_spread():
    rng = np.random.default_rng(0)
    pred = torch.tensor(rng.normal(size=(7, 5)))
    bag_y = torch.tensor(rng.normal(size=7))
    l_bag, r = squared_losses(pred, bag_y)
    l_ins = ((bag_y[:, None] - pred) ** 2).mean()  # (1/n) sum_a sum_i (y_a - f_i)^2
    assert float(l_ins) == pytest.approx(float(l_bag + r), rel=1e-12)
    for rho in (0.0, 0.3, 1.0):
        assert float(interpolated_loss(pred, bag_y, rho)) == pytest.approx(
            float((1 - rho) * l_bag + rho * l_ins), rel=1e-12)


def closed_form(x, y, bags, rho):
    """theta_rho = [X^T S X + rho X^T (I - S) X]^{-1} X^T S y with S = blockdiag(11^T / k)."""
    k = bags.shape[1]
    xs = x[bags.reshape(-1)]
    ys = y[bags.reshape(-1)]
    s_sorted = np.kron(np.eye(len(bags)), np.full((k, k), 1.0 / k))
    a = xs.T @ s_sorted @ xs + rho * xs.T @ (np.eye(len(ys)) - s_sorted) @ xs
    return np.linalg.solve(a, xs.T @ s_sorted @ ys)


@pytest.mark.parametrize("rho", [0.0, 0.5, 1.0])
def test_linear_model_converges_to_closed_form(rho, tiny):
    rng = np.random.default_rng(1)
    n, d, k = 240, 4, 4
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ rng.normal(size=d) + 0.3 * rng.normal(size=n)).astype(np.float32)
    model = torch.nn.Linear(d, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    settings = TrainSettings(task="regression", local_steps=4000, batch_size=n, lr=0.2)
    task = LocalTask(model, x, y, settings, Hyper(BagsParams(bag_size=k, rho=rho), 0.2, False), partition_id=0,
                     seed=0, experiment_seed=0, delta=1e-5, num_classes=1)
    train_bags(task)
    bags, _ = client_bags(task)
    expected = closed_form(x.astype(np.float64), y.astype(np.float64), bags, rho)
    np.testing.assert_allclose(model.weight.detach().numpy()[0], expected, atol=1e-3)


def test_noise_scales():
    delta_y = bag_sensitivity((0.0, 1.0), 32)
    assert delta_y == 1 / 32
    assert noise_scale("laplace", 1.0, 1e-5, delta_y) == pytest.approx(0.03125)
    assert noise_scale("gaussian", 1.0, 1e-5, delta_y) == pytest.approx(0.1166, abs=1e-4)
    # independently: dp-accounting's own calibration at another setting
    ref = plm.GaussianPrivacyLoss.from_privacy_guarantee(common.DifferentialPrivacyParameters(0.5, 1e-6),
                                                         sensitivity=6 / 8).standard_deviation
    assert noise_scale("gaussian", 0.5, 1e-6, bag_sensitivity((-3.0, 3.0), 8)) == pytest.approx(ref)


@pytest.mark.parametrize("mechanism, expected_var", [("laplace", 2 * (2 / 4 / 1.0) ** 2),
                                                     ("gaussian", None)])
def test_released_bag_means_have_the_expected_variance(mechanism, expected_var):
    rng = np.random.default_rng(0)
    y = rng.uniform(-1, 1, 40_000)
    bags = make_bags(len(y), 4, rng)
    released = release_bag_means(y, bags, epsilon=1.0, delta=1e-5, mechanism=mechanism,
                                 label_range=(-1.0, 1.0), rng=rng)
    noise = released - y[bags].mean(1)
    if expected_var is None:
        expected_var = noise_scale("gaussian", 1.0, 1e-5, 0.5) ** 2
    assert noise.var() == pytest.approx(expected_var, rel=0.05)
    assert abs(noise.mean()) < 0.05


def test_bags_are_disjoint_and_leftovers_dropped():
    bags = make_bags(23, 5, np.random.default_rng(0))
    assert bags.shape == (4, 5) and len(np.unique(bags)) == 20


def test_label_proportions_stay_on_the_simplex():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    props = release_label_proportions(labels, make_bags(60, 6, rng), 3, epsilon=0.5, delta=1e-5,
                                      mechanism="laplace", rng=rng)
    assert np.allclose(props.sum(1), 1) and (props >= 0).all()
    exact = release_label_proportions(labels, bags := make_bags(60, 6, np.random.default_rng(1)), 3,
                                      epsilon=0, delta=1e-5, mechanism="laplace", rng=rng)
    assert np.allclose(exact, np.eye(3)[labels][bags].mean(1))


def test_proportion_loss_interpolates():
    logits = torch.randn(3, 4, 5)
    props = torch.softmax(torch.randn(3, 5), -1)
    l0, l1 = proportion_loss(logits, props, 0.0), proportion_loss(logits, props, 1.0)
    assert float(proportion_loss(logits, props, 0.25)) == pytest.approx(float(0.75 * l0 + 0.25 * l1), rel=1e-6)
    assert float(l0) <= float(l1) + 1e-6  # Jensen: CE to the mean prediction is the smaller one


def test_cli_bags_run_and_sweep(cli, tmp_path):
    code, out, _ = cli("run", "configs/bags.toml", "--bag-size", "8", "--rho", "0.5", "--label-epsilon", "1",
                       "--rounds", "3", "--out", tmp_path / "run", "--no-progress")
    assert code == 0 and "mse" in out
    cfg = load_config(tmp_path / "run" / "config.toml")
    b = cfg.strategy.params
    assert (b.bag_size, b.rho, b.label_epsilon) == (8, 0.5, 1.0)
    code, out, _ = cli("sweep", "configs/bags.toml", "--rounds", "2", "--grid", "strategy.bags.rho=0,1",
                       "--grid", "strategy.bags.bag_size=2,4", "--seeds", "0", "--grid", "data.dataset=diabetes",
                       "--grid", "strategy.bags.label_epsilon=1", "--out", tmp_path / "sw")
    assert code == 0 and "4/4 cells finished" in out
    cell = ("data.dataset=diabetes__strategy.bags.label_epsilon=1__strategy.bags.bag_size=4__strategy.bags.rho=0"
            "__seed=0")
    summary = json.loads((tmp_path / "sw" / cell / "summary.json").read_text())
    assert summary["status"] == "finished"
