"""The label-DP mechanism of the bags algorithm: disjoint bags, noise calibration, released
means and label proportions (`fedsim.privacy.bag_mechanism`)."""

from __future__ import annotations

import numpy as np
import pytest
from dp_accounting.pld import common, privacy_loss_mechanism as plm

from fedsim.privacy.bag_mechanism import (bag_sensitivity, make_bags, noise_scale, release_bag_means,
                                          release_label_proportions)


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


def test_bag_sensitivity_is_the_replace_one_change_of_a_bag_mean():
    """Measured: over bags of k responses clipped to [a, b], replacing one response moves the
    mean by up to (b - a)/k, which bag_sensitivity returns; the add/remove-with-centring
    change (the removed response counted as the centre) reaches only half of it."""
    a, b, k = -3.0, 5.0, 8
    rng = np.random.default_rng(0)
    bags = np.clip(rng.uniform(a - 2, b + 2, (2000, k)), a, b)
    bags[0] = a  # a bag at one end of the range: its worst neighbour sits at the other
    replaced = bags.copy()
    replaced[:, 0] = np.where(bags[:, 0] - a > b - bags[:, 0], a, b)  # the farthest value in range
    replace_one = np.abs(replaced.mean(1) - bags.mean(1)).max()
    centred = bags.copy()
    centred[:, 0] = (a + b) / 2
    add_remove = np.abs(centred.mean(1) - bags.mean(1)).max()
    assert replace_one == pytest.approx(bag_sensitivity((a, b), k)) == pytest.approx((b - a) / k)
    assert add_remove == pytest.approx(bag_sensitivity((a, b), k) / 2)
