"""The bags algorithm's client half (learning from aggregate responses, Javanmard et al.,
ICLR 2024): the losses' closed forms, the estimator they converge to, the one-time release."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsim.clients.bags import RULE, client_bags, interpolated_loss, proportion_loss, squared_losses, train_bags
from fedsim.algorithms import Hyper, LocalTask, TrainSettings
from fedsim.strategies.bags import BagsParams


def test_squared_losses_by_hand():
    # one bag of k = 2 with predictions [1, 3] and released mean 1: f_a = 2,
    # L_bag = (1 - 2)^2 = 1, R = ((1 - 2)^2 + (3 - 2)^2) / 2 = 1, L_ins = (0^2 + 2^2) / 2 = 2
    l_bag, r = squared_losses(torch.tensor([[1.0, 3.0]]), torch.tensor([1.0]))
    assert (float(l_bag), float(r)) == (1.0, 1.0)
    assert float(interpolated_loss(torch.tensor([[1.0, 3.0]]), torch.tensor([1.0]), 0.25)) == 1.25


def test_proportion_loss_by_hand():
    # one bag of two samples with softmax rows (.75, .25) and (.5, .5), released proportion (1, 0):
    # L_bag = -log(mean prob of class 0) = -log .625, L_ins = -(log .75 + log .5) / 2
    logits = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]], dtype=torch.float64)
    props = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    l_bag, l_ins = -math.log(0.625), -(math.log(0.75) + math.log(0.5)) / 2
    assert float(proportion_loss(logits, props, 0.0)) == pytest.approx(l_bag, rel=1e-12)
    assert float(proportion_loss(logits, props, 1.0)) == pytest.approx(l_ins, rel=1e-12)
    assert float(proportion_loss(logits, props, 0.3)) == pytest.approx(0.7 * l_bag + 0.3 * l_ins, rel=1e-12)


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


def test_proportion_loss_interpolates():
    logits = torch.randn(3, 4, 5)
    props = torch.softmax(torch.randn(3, 5), -1)
    l0, l1 = proportion_loss(logits, props, 0.0), proportion_loss(logits, props, 1.0)
    assert float(proportion_loss(logits, props, 0.25)) == pytest.approx(float(0.75 * l0 + 0.25 * l1), rel=1e-6)
    assert float(l0) <= float(l1) + 1e-6  # Jensen: CE to the mean prediction is the smaller one




def test_bags_are_released_once_per_client():
    """Every round re-derives the identical bags and noisy means from the client's fixed seed
    (release once, reuse as post-processing); another client gets its own."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 3)).astype(np.float32), rng.uniform(-1, 1, 40).astype(np.float32)
    params = BagsParams(bag_size=4, label_epsilon=1.0, label_range=[-1.0, 1.0])

    def task(pid, seed):
        return LocalTask(torch.nn.Linear(3, 1), x, y, TrainSettings(task="regression"), Hyper(params, 0.1, False),
                         partition_id=pid, seed=seed, experiment_seed=0, delta=1e-5, num_classes=1)

    bags, means = client_bags(task(0, seed=1))
    again_bags, again_means = client_bags(task(0, seed=2))  # another round: another training seed
    np.testing.assert_array_equal(bags, again_bags)
    np.testing.assert_array_equal(means, again_means)
    assert bags.shape == (10, 4) and not np.allclose(means, y[bags].mean(1))  # noised
    other_bags, _ = client_bags(task(1, seed=1))
    assert not np.array_equal(bags, other_bags)
    assert RULE.local_train is train_bags
