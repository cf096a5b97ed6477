"""The bags algorithm's server half: plain FedAvg, plus the rules and the label-level privacy
statement that come with ``[strategy.bags]``."""

from __future__ import annotations

import pytest

from fedsim.errors import ConfigError
from fedsim.strategies.bags import BagsParams, check, label_privacy


def test_label_privacy_statement():
    assert label_privacy(BagsParams(label_epsilon=0.0), 1e-5) is None  # no noise, no statement
    laplace = label_privacy(BagsParams(bag_size=8, label_epsilon=1.5, mechanism="laplace"), 1e-5)
    assert (laplace["epsilon"], laplace["delta"]) == (1.5, 0.0)  # pure epsilon-DP
    assert "Laplace" in laplace["accountant"] and "bag means of 8" in laplace["accountant"]
    gaussian = label_privacy(BagsParams(bag_size=4, label_epsilon=2.0, mechanism="gaussian"), 1e-6)
    assert (gaussian["epsilon"], gaussian["delta"]) == (2.0, 1e-6)


def test_check_refuses_dp_sgd_and_bags_larger_than_a_client(tiny):
    cfg = tiny(**{"strategy.name": "bags", "data.dataset": "diabetes"})
    check(BagsParams(bag_size=4), cfg, None, [10, 4, 7])
    with pytest.raises(ConfigError, match="strategy.bags.bag_size: 5 is larger than client 1's 4 samples"):
        check(BagsParams(bag_size=5), cfg, None, [10, 4, 7])
    dp = tiny(**{"strategy.name": "bags", "data.dataset": "diabetes", "privacy.noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="privacy.noise_multiplier"):
        check(BagsParams(), dp, None, [10])


def test_label_range_must_be_an_interval(tiny):
    with pytest.raises(ConfigError, match="strategy.bags.label_range"):
        tiny(**{"strategy.name": "bags", "strategy.bags.label_range": [1.0, -1.0]})
