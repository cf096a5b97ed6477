"""A regression target is standardized by a public range, so that a label-DP release does not
rest on statistics of the private labels: diabetes by its documented range, a file by
``data.label_range``; a file without one falls back to its training labels' mean and std, which
label-DP (bags) refuses and DP-SGD runs are warned about."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_diabetes

from fedsim.datasets import load_dataset
from fedsim.errors import ConfigError
from fedsim.run import prepare


def houses(path, seed: int = 0, n: int = 200):
    rng = np.random.default_rng(seed)
    size = rng.normal(100, 20, n)
    pd.DataFrame({"size": size, "price": 3.0 * size + rng.normal(0, 5, n)}).to_csv(path, index=False)
    return path


def file_cfg(tiny, path, **kw):
    return tiny(**{"data.dataset": "file", "data.path": str(path), "data.label_column": "price", **kw})


def test_diabetes_is_standardized_by_its_documented_range(tiny):
    data = load_dataset(tiny(**{"data.dataset": "diabetes", "data.validation_fraction": 0.0}).data, 6, 0)
    # scikit-learn documents the targets as "integer 25 - 346"; [25, 346] maps onto [-3, 3]
    assert (data.y_shift, data.y_scale, data.label_stats) == (185.5, 53.5, "public")
    raw = np.sort(load_diabetes().target)
    restored = np.sort(np.concatenate([data.y_train, data.y_test]).astype(np.float64) * 53.5 + 185.5)
    np.testing.assert_allclose(restored, raw, rtol=1e-6)
    assert -3.0 <= data.y_train.min() and data.y_train.max() <= 3.0


def test_a_stated_range_does_not_depend_on_the_training_labels(tiny, tmp_path):
    whole = {"data.label_range": [0.0, 600.0], "data.validation_fraction": 0.0}
    a = load_dataset(file_cfg(tiny, houses(tmp_path / "a.csv", 0), **whole).data, 6, 0)
    b = load_dataset(file_cfg(tiny, houses(tmp_path / "b.csv", 1), **{"data.label_range": [0.0, 600.0]}).data, 6, 0)
    assert (a.y_shift, a.y_scale, a.label_stats) == (b.y_shift, b.y_scale, "public") == (300.0, 100.0, "public")
    raw = pd.read_csv(tmp_path / "a.csv").price.to_numpy()
    np.testing.assert_allclose(np.sort(np.concatenate([a.y_train, a.y_test]) * 100.0 + 300.0), np.sort(raw),
                               rtol=1e-5)


def test_a_file_without_a_range_uses_its_training_statistics_and_says_so(tiny, tmp_path):
    data = load_dataset(file_cfg(tiny, houses(tmp_path / "h.csv"), **{"data.validation_fraction": 0.0}).data, 6, 0)
    assert data.label_stats == "train"
    assert float(np.mean(data.y_train)) == pytest.approx(0.0, abs=1e-5)
    assert float(np.std(data.y_train)) == pytest.approx(1.0, abs=1e-4)


def test_label_dp_refuses_private_standardization(tiny, tmp_path):
    bags = {"strategy.name": "bags", "strategy.bags.label_epsilon": 1.0, "strategy.bags.label_range": [-3.0, 3.0],
            "strategy.bags.bag_size": 2, "privacy.noise_multiplier": 0.0, "model.name": "linear"}
    with pytest.raises(ConfigError, match=r"^data\.label_range: label-DP bag means need"):
        prepare(file_cfg(tiny, houses(tmp_path / "h.csv"), **bags))
    prepare(file_cfg(tiny, tmp_path / "h.csv", **bags, **{"data.label_range": [0.0, 600.0]}))  # public: accepted


def test_dp_sgd_on_training_statistics_warns(tiny, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("fedsim"), "propagate", True)
    dp = {"privacy.noise_multiplier": 1.0, "model.name": "linear"}
    prepare(file_cfg(tiny, houses(tmp_path / "h.csv"), **dp))
    assert any("standardized with its training labels' mean and std" in r.getMessage() for r in caplog.records)
    caplog.clear()
    prepare(file_cfg(tiny, tmp_path / "h.csv", **dp, **{"data.label_range": [0.0, 600.0]}))
    assert not any("training labels' mean" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("bad", [[1.0], [3.0, 1.0], [2.0, 2.0]])
def test_bad_ranges_are_refused(tiny, tmp_path, bad):
    with pytest.raises(ConfigError, match=r"^data\.label_range: must be empty or \[a, b\] with finite a < b"):
        load_dataset(file_cfg(tiny, houses(tmp_path / "h.csv"), **{"data.label_range": bad}).data, 6, 0)


def test_a_range_on_classification_is_refused(tiny):
    with pytest.raises(ConfigError, match=r"^data\.label_range: standardizes a regression target"):
        load_dataset(tiny(**{"data.label_range": [0.0, 9.0]}).data, 6, 0)
