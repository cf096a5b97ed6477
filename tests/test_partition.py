"""Partitioners: coverage, measured skew, quantity sizes, natural ids, feature skew."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.datasets import load_dataset
from fedsim.errors import FedsimError
from fedsim.partition import client_data, label_counts, partition, power_law_sizes


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "shard", "pathological", "quantity", "feature-skew"])
def test_every_sample_goes_to_exactly_one_client(tiny, partitioner):
    cfg = tiny(**{"data.partitioner": partitioner, "federation.num_clients": 10})
    indices = np.concatenate(partition(cfg).indices)
    n = len(load_dataset(cfg.data, 10, cfg.seed).y_train)
    assert np.array_equal(np.sort(indices), np.arange(n))


def mean_total_variation(counts: np.ndarray) -> float:
    """Mean over clients of TV distance between the client's and the global label mix."""
    global_mix = counts.sum(0) / counts.sum()
    client_mix = counts / counts.sum(1, keepdims=True)
    return float(0.5 * np.abs(client_mix - global_mix).sum(1).mean())


def test_dirichlet_skew_grows_as_alpha_falls(tiny):
    tv = {a: mean_total_variation(label_counts(tiny(**{"data.partitioner": "dirichlet", "data.alpha": a,
                                                          "federation.num_clients": 10})))
          for a in (100.0, 0.5, 0.05)}
    # measured with seed 0: about 0.07, 0.50 and 0.82
    assert tv[100.0] < 0.15 < tv[0.5] < tv[0.05]
    assert tv[0.05] > 0.7


def test_pathological_gives_k_classes_per_client(tiny):
    counts = label_counts(tiny(**{"data.partitioner": "pathological", "data.classes_per_client": 2,
                                  "federation.num_clients": 10}))
    assert ((counts > 0).sum(1) <= 2).all()


def test_quantity_sizes_follow_the_power_law(tiny):
    cfg = tiny(**{"data.partitioner": "quantity", "data.quantity_power": 1.5, "federation.num_clients": 8})
    sizes = sorted((len(i) for i in partition(cfg).indices), reverse=True)
    n = sum(sizes)
    expected = np.arange(1, 9) ** -1.5 / (np.arange(1, 9) ** -1.5).sum() * n
    # each size is floored (off by < 1); the largest client takes the remainder (< 8)
    assert np.all(np.abs(np.array(sizes[1:]) - expected[1:]) <= 1) and abs(sizes[0] - expected[0]) < 8
    assert sorted(power_law_sizes(n, 8, 1.5, cfg.seed), reverse=True) == sizes


def test_natural_id_keeps_synthetic_groups(tiny, capfd):
    cfg = tiny(**{"data.dataset": "synthetic", "data.partitioner": "natural-id", "federation.num_clients": 5,
                  "seed": 1234})  # a seed of its own: not cached by an earlier test
    data = load_dataset(cfg.data, 5, cfg.seed)
    for part, idx in enumerate(partition(cfg).indices):
        assert len(np.unique(data.groups_train[idx])) == 1
    # flwr-datasets' own progress bar over the rows stays off fedsim's console
    assert "partition_id_to_indices" not in capfd.readouterr().err


def test_synthetic_scales_to_1000_clients(tiny):
    cfg = tiny(**{"data.dataset": "synthetic", "data.partitioner": "natural-id", "federation.num_clients": 1000,
                  "data.synthetic_samples": 20})
    sizes = [len(i) for i in partition(cfg).indices]
    assert len(sizes) == 1000 and min(sizes) >= 1


def test_feature_skew_shifts_each_client(tiny):
    cfg = tiny(**{"data.partitioner": "feature-skew", "data.feature_shift": 1.0})
    data = load_dataset(cfg.data, cfg.federation.num_clients, cfg.seed)
    x0, _ = client_data(cfg, 0)
    raw = data.x_train[partition(cfg).indices[0]]
    shift = x0 - raw
    assert np.allclose(shift, shift[0])  # one constant shift per client...
    assert 0.5 < shift[0].std() < 1.5  # ...drawn with std feature_shift


def test_empty_client_is_refused_with_the_knob_to_turn(tiny):
    cfg = tiny(**{"data.partitioner": "shard", "data.classes_per_client": 1, "federation.num_clients": 1500,
                  "federation.clients_per_round": 2})
    with pytest.raises(FedsimError, match="data.partitioner"):
        partition(cfg)


@pytest.mark.parametrize("kind, clients", [("natural-id", 100), ("dirichlet", 40), ("iid", 40), ("shard", 20),
                                           ("pathological", 20), ("quantity", 40)])
def test_partition_equals_flwr_datasets_in_its_default_format(tiny, kind, clients):
    """fedsim hands flwr-datasets an Arrow-format dataset (columns convert to numpy at once,
    not row by row); the partitions must be the ones the default format gives."""
    from datasets import Dataset as HFDataset

    from fedsim import partition as P

    extra = {"data.dataset": "synthetic", "federation.num_clients": clients} if kind == "natural-id" else \
        {"federation.num_clients": clients}
    cfg = tiny(**{"data.partitioner": kind, **extra})
    data = load_dataset(cfg.data, clients, cfg.seed)
    labels = P.partition_labels(data)
    reference = P._make_partitioner(cfg, labels, data.groups_train)
    arrow = P._hf_dataset(labels, data.groups_train, cfg.seed, kind in ("quantity", "iid"))
    assert arrow.format["type"] == "arrow"
    reference.dataset = HFDataset.from_dict(arrow.with_format(None)[:])  # the same rows, default format
    expected = [np.asarray(reference.load_partition(i)["idx"]) for i in range(clients)]
    got = P._load_all(_with(P._make_partitioner(cfg, labels, data.groups_train), arrow), clients)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))


def _with(partitioner, dataset):
    partitioner.dataset = dataset
    return partitioner


def test_partitioners_import_without_flwr_datasets_plotting_and_the_plots_still_work():
    """fedsim defers flwr-datasets' plotting and metrics modules (seaborn, scipy.stats,
    matplotlib: about 1.3 s of every run's start). They must not load for a partition, and
    must work as the real modules as soon as anything uses them."""
    import subprocess
    import sys

    code = """
import sys
from fedsim.config import load_config
from fedsim.datasets import load_dataset
from fedsim.partition import partition
cfg = load_config(None, {"data.partitioner": "dirichlet", "federation.num_clients": 10})
assert len(partition(cfg, load_dataset(cfg.data, 10, cfg.seed)).indices) == 10
print(sorted(m for m in ("seaborn", "scipy.stats", "matplotlib.pyplot") if m in sys.modules))
import flwr_datasets.visualization as visualization
from flwr_datasets.metrics import compute_counts
from flwr_datasets.partitioner import IidPartitioner
print(visualization.plot_label_distributions.__name__, compute_counts.__name__, type(visualization).__name__)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[]", "plot_label_distributions compute_counts module"]


def test_shard_partition_is_silent(tiny):
    """flwr-datasets' shard partitioner sorts through datasets, which passes pyarrow an option
    it deprecates: the FutureWarning is not the user's to act on, so a run never shows it."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        partition(tiny(**{"data.partitioner": "shard", "data.classes_per_client": 2}))
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


# ----------------------------------------------------------------------------- the validation split

def _rows(x: np.ndarray) -> list[bytes]:
    return [r.tobytes() for r in np.asarray(x)]


def test_validation_rows_leave_the_training_pool_before_partitioning(tiny):
    """data.validation_fraction = 0.1 moves round(0.1 n) of the n training rows (a seeded draw)
    to x_val: train and validation together are exactly the training split of fraction 0, in
    its order, the test split is untouched, and no client's partition holds a validation row."""
    whole = load_dataset(tiny(**{"data.validation_fraction": 0.0}).data, 10, 0)
    cfg = tiny(**{"federation.num_clients": 10})
    data = load_dataset(cfg.data, 10, 0)
    assert whole.x_val is None and cfg.data.validation_fraction == 0.1
    n = len(whole.y_train)
    assert len(data.y_val) == int(round(0.1 * n)) and len(data.y_train) + len(data.y_val) == n
    np.testing.assert_array_equal(data.x_test, whole.x_test)
    position = {row: i for i, row in enumerate(_rows(whole.x_train))}
    assert len(position) == n  # digits rows are distinct: a row names its position
    train_at, val_at = [position[r] for r in _rows(data.x_train)], [position[r] for r in _rows(data.x_val)]
    assert train_at == sorted(train_at) and not set(train_at) & set(val_at)
    np.testing.assert_array_equal(data.y_val, whole.y_train[val_at])
    clients = np.concatenate([client_data(cfg, pid)[0] for pid in range(10)])
    assert not set(_rows(clients)) & set(_rows(data.x_val)) and len(clients) == len(data.y_train)
    # one seed, the same rows; another seed, others
    again = load_dataset(tiny(**{"data.validation_fraction": 0.1, "data.test_fraction": 0.2}).data, 10, 0)
    np.testing.assert_array_equal(again.x_val, data.x_val)
    other = load_dataset(cfg.data, 10, 1)
    assert set(_rows(other.x_val)) != set(_rows(data.x_val))


def test_validation_split_keeps_every_natural_group_and_refuses_too_few_rows(tiny):
    cfg = tiny(**{"data.dataset": "synthetic", "data.validation_fraction": 0.5, "federation.num_clients": 30,
                  "data.synthetic_samples": 10})
    whole = load_dataset(tiny(**{"data.dataset": "synthetic", "data.validation_fraction": 0.0,
                                 "data.synthetic_samples": 10}).data, 30, 0)
    data = load_dataset(cfg.data, 30, 0)
    assert set(data.groups_train) == set(whole.groups_train)
    small = tiny(**{"data.dataset": "breast-cancer", "data.validation_fraction": 0.005})
    with pytest.raises(FedsimError, match=r"^data\.validation_fraction: 0\.005 of 455 training samples holds out 2; "
                                          r"model selection needs at least 5 .* set data\.validation_fraction >= "
                                          r"0\.011, or 0 for no validation split"):
        load_dataset(small.data, 10, 0)
