"""iid-mix: FedLD's label skew (Zeng et al., MICCAI 2024), against a literal re-derivation of
the authors' ``cifar_noniid_s`` counts, without any sample given twice."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.datasets import load_dataset
from fedsim.errors import ConfigError
from fedsim.partition import iid_mix_groups, iid_mix_indices, partition, partition_labels

# FedLD's data_loader.py: client i's skewed classes are this list's entry i % 5
AUTHORS_GROUPS = [[0, 1, 2], [2, 3, 4], [4, 5, 6], [6, 7, 8], [8, 9, 0]]
# ten classes of unequal size, so that the even classes (in two groups each) run short first
POOLS = [60, 75, 50, 90, 70, 65, 80, 55, 85, 100]


def small_labels(seed: int = 3) -> np.ndarray:
    labels = np.repeat(np.arange(10), POOLS)
    return np.random.default_rng(seed).permutation(labels)


def authors_counts(n: int, s: float, num_clients: int) -> np.ndarray:
    """The authors' loop (cifar_noniid_s), counting each client's samples per class instead
    of slicing the sorted index array: int(n s) IID samples, int(./10) per class with the
    remainder to class 9; the rest over group i % 5, int(./3) each, remainder to its last."""
    counts = np.zeros((num_clients, 10), dtype=int)
    num_imgs_iid = int(n * s)
    num_imgs_noniid = n - num_imgs_iid
    iid_per_label = int(num_imgs_iid / 10)
    iid_per_label_last = num_imgs_iid - 9 * iid_per_label
    for i in range(num_clients):
        for label_cnt, y in enumerate(range(10), start=1):
            counts[i, y] += iid_per_label_last if label_cnt == 10 else iid_per_label
        rand_label = AUTHORS_GROUPS[i % 5]
        noniid_per_num = int(num_imgs_noniid / 3)
        noniid_per_num_last = num_imgs_noniid - noniid_per_num * 2
        for label_cnt, y in enumerate(rand_label, start=1):
            counts[i, y] += noniid_per_num_last if label_cnt == 3 else noniid_per_num
    return counts


@pytest.mark.parametrize("s", [0.8, 0.2])
def test_class_counts_are_the_authors_at_the_largest_n_that_fits(s):
    labels, clients = small_labels(), 10
    # fedsim's n: the largest n <= N / clients whose authors' counts fit every class's pool
    n = next(n for n in range(len(labels) // clients, 0, -1)
             if np.all(authors_counts(n, s, clients).sum(0) <= POOLS))
    assert n < len(labels) // clients  # the pools bind: the search is exercised
    indices, left_out = iid_mix_indices(labels, clients, 3, s, seed=0)
    got = np.stack([np.bincount(labels[idx], minlength=10) for idx in indices])
    np.testing.assert_array_equal(got, authors_counts(n, s, clients))
    assert [len(idx) for idx in indices] == [n] * clients and left_out == len(labels) - clients * n


@pytest.mark.parametrize("s", [0.0, 0.2, 0.8, 1.0])
def test_no_sample_goes_to_two_clients(s):
    labels = small_labels()
    indices, left_out = iid_mix_indices(labels, 10, 3, s, seed=0)
    every = np.concatenate(indices)
    assert len(np.unique(every)) == len(every) == len(labels) - left_out
    assert every.min() >= 0 and every.max() < len(labels)


def test_iid_fraction_one_gives_every_client_the_same_histogram():
    labels = small_labels()
    indices, _ = iid_mix_indices(labels, 10, 3, 1.0, seed=0)
    counts = np.stack([np.bincount(labels[idx], minlength=10) for idx in indices])
    assert (counts == counts[0]).all()
    # n / 10 per class, the last class with the rounding remainder (< 10)
    assert (counts[0, :-1] == counts[0, 0]).all() and 0 <= counts[0, -1] - counts[0, 0] < 10


def test_skewed_classes_are_the_authors_groups():
    assert iid_mix_groups(10, 10, 3).tolist() == [AUTHORS_GROUPS[i % 5] for i in range(10)]
    labels = small_labels()
    indices, _ = iid_mix_indices(labels, 10, 3, 0.0, seed=0)  # s = 0: nothing but the group
    for i, idx in enumerate(indices):
        assert set(labels[idx].tolist()) == set(AUTHORS_GROUPS[i % 5])
    assert iid_mix_groups(4, 10, 1).ravel().tolist() == [0, 1, 2, 3]  # k = 1: stride 1


def test_one_seed_fixes_the_partition():
    labels = small_labels()
    first, _ = iid_mix_indices(labels, 10, 3, 0.8, seed=0)
    again, _ = iid_mix_indices(labels, 10, 3, 0.8, seed=0)
    other, _ = iid_mix_indices(labels, 10, 3, 0.8, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert any(set(a.tolist()) != set(b.tolist()) for a, b in zip(first, other))


def test_no_size_that_fits_is_refused_with_the_knob():
    labels = small_labels()
    labels = labels[labels != 9]  # class 9 is empty but still a class (labels of 0..9 only)
    labels = np.append(labels, 9)  # ...one sample: s = 1 gives each client at least one 9
    with pytest.raises(ConfigError, match=r"^federation\.num_clients: iid-mix cannot give 10 clients"):
        iid_mix_indices(labels, 10, 3, 1.0, seed=0)
    with pytest.raises(ConfigError, match=r"^data\.classes_per_client: .* got 11 > 10"):
        iid_mix_indices(small_labels(), 10, 11, 0.8, seed=0)


def test_config_partition_on_digits_keys_the_disk_cache_on_iid_fraction(tiny):
    """Through `partition(cfg)`: equal clients, nothing twice, the left-out rows counted; a
    second iid_fraction read from the disk cache (the process cache cleared) is its own."""
    from fedsim.caches import clear_all

    cfgs = {s: tiny(**{"data.partitioner": "iid-mix", "data.classes_per_client": 3, "data.iid_fraction": s,
                       "federation.num_clients": 10}) for s in (0.8, 0.2)}
    labels = partition_labels(load_dataset(cfgs[0.8].data, 10, 0))
    parts = {}
    for s, cfg in cfgs.items():
        clear_all()
        parts[s] = partition(cfg)
        expected, left_out = iid_mix_indices(labels, 10, 3, s, seed=cfg.seed)
        assert all(np.array_equal(a, b) for a, b in zip(parts[s].indices, expected))
        assert parts[s].left_out == left_out == len(labels) - sum(len(i) for i in expected) > 0
    clear_all()
    assert all(np.array_equal(a, b) for a, b in zip(partition(cfgs[0.8]).indices, parts[0.8].indices))
    assert not all(np.array_equal(a, b) for a, b in zip(parts[0.2].indices, parts[0.8].indices))
