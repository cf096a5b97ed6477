"""`draw_batch`, the vectorized engine's one way to draw a step's batch, in its three modes,
against literal re-derivations from each client's generator."""

from __future__ import annotations

import math

import numpy as np
import torch

from fedsim.algorithms import TrainSettings
from fedsim.clients.vectorized import batch_draws, draw_batch
from fedsim.privacy.accounting import poisson_sample_rate

SIZES = [23, 16, 9]  # sorted by steps, as the engine orders a chunk
B = 5


def _draws(private: bool, batches=None, sizes=SIZES, seeds=(11, 12, 13)):
    settings = TrainSettings(task="classification", batch_size=B)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return batch_draws(settings, list(sizes), [math.ceil(n / B) for n in sizes], gens, batches, private)


def _rows(local, valid):
    return [local[i][valid[i]].tolist() for i in range(len(local))]


def test_poisson_draws_are_each_clients_own_rand_below_q():
    draws = _draws(private=True)
    reference = [torch.Generator().manual_seed(s) for s in (11, 12, 13)]
    for t, active in enumerate((3, 3, 2, 1)):  # clients leave in order: the active ones are a prefix
        local, valid = draw_batch(draws, t, active)
        assert local.shape == valid.shape and local.shape[0] == active
        expected = [np.flatnonzero((torch.rand(n, generator=g) < poisson_sample_rate(n, B)).numpy()).tolist()
                    for n, g in zip(SIZES[:active], reference)]
        assert _rows(local, valid) == expected
        assert local.shape[1] == max(len(r) for r in expected)  # padded to the widest draw


def test_a_clients_poisson_draws_do_not_depend_on_its_chunk():
    together = _draws(private=True)
    alone = _draws(private=True, sizes=SIZES[1:2], seeds=(12,))
    for t in range(5):
        assert _rows(*draw_batch(together, t, 3))[1] == _rows(*draw_batch(alone, t, 1))[0]


def test_shuffled_epochs_cover_every_sample_once_in_batches_of_b():
    draws = _draws(private=False)
    reference = [torch.Generator().manual_seed(s) for s in (11, 12, 13)]
    epochs = 2
    steps = [epochs * math.ceil(n / B) for n in SIZES]
    seen = [[] for _ in SIZES]
    for t in range(max(steps)):
        active = sum(1 for s in steps if s > t)
        for i, row in enumerate(_rows(*draw_batch(draws, t, active))):
            seen[i].append(row)
    for i, n in enumerate(SIZES):
        per_epoch = math.ceil(n / B)
        for e in range(epochs):
            batches = seen[i][e * per_epoch:(e + 1) * per_epoch]
            assert [len(b) for b in batches] == [B] * (per_epoch - 1) + [n - B * (per_epoch - 1)]
            assert sum(batches, []) == torch.randperm(n, generator=reference[i]).tolist()


def test_given_batches_come_back_as_given_an_empty_one_included():
    given = [[np.array([3, 1]), np.array([], dtype=np.int64)], [np.array([0, 2, 4]), np.array([5])]]
    draws = _draws(private=True, batches=given, sizes=SIZES[:2], seeds=(1, 2))
    assert _rows(*draw_batch(draws, 0, 2)) == [[3, 1], [0, 2, 4]]
    local, valid = draw_batch(draws, 1, 2)
    assert _rows(local, valid) == [[], [5]] and valid.sum() == 1
