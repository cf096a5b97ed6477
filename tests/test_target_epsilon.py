"""`--target-epsilon T` means every client's final epsilon is <= T, and the largest lies in
[0.9 T, T]: calibration plans with the realized participation schedule, which is the one
the server samples (checked here against real runs, round by round)."""

from __future__ import annotations

import csv
import json
import random

import pytest

from fedsim.config import load_config
from fedsim.experiment import derive_seed
from fedsim.privacy.accounting import calibrate_noise, epsilon, poisson_sample_rate, steps_per_round
from fedsim.run import client_sizes, run_experiment, sample_level_plans
from fedsim.schedule import participation_counts, participation_schedule


def small(tmp_path, **overrides):
    """Quickstart in small: label-skewed digits (clients of different sizes), 6 clients, 3 a round."""
    base = {"name": "small", "model.hidden": [16], "data.partitioner": "dirichlet", "data.alpha": 0.5,
            "federation.num_clients": 6, "federation.clients_per_round": 3, "federation.rounds": 4,
            "client.batch_size": 32, "client.lr": 0.3, "output.dir": str(tmp_path / "run")}
    return load_config(None, {**base, **overrides})


def clients_csv(out):
    return {int(r["partition_id"]): r for r in csv.DictReader((out / "clients.csv").open())}


def test_schedule_is_the_draw_flower_made_from_the_round_seed():
    """The schedule keeps what runs sampled before it existed: Flower's sample_nodes over the
    partition-ordered nodes after random.seed(derive_seed(seed, round, "sample"))."""
    for seed, n, k in [(0, 20, 10), (3, 6, 3), (7, 50, 10), (1, 4, 4)]:
        expected = []
        for rnd in range(1, 9):
            random.seed(derive_seed(seed, rnd, "sample"))
            expected.append(sorted(random.sample(list(range(n)), k)))
        assert participation_schedule(seed, 8, n, k) == expected
        counts = participation_counts(seed, 8, n, k)
        assert counts == [sum(pid in r for r in expected) for pid in range(n)] and sum(counts) == 8 * k


def test_calibration_plans_with_the_most_frequent_client(tmp_path):
    """Every client's epsilon at its realized (q, participations x steps), computed apart from
    `sample_level_plans`, is <= T; the tightest is within 0.1% of T."""
    for seed, target in [(0, 3.0), (1, 1.0), (2, 8.0)]:
        cfg = small(tmp_path, seed=seed, **{"federation.num_clients": 20, "federation.clients_per_round": 10,
                                            "federation.rounds": 5, "client.batch_size": 16})
        sizes = client_sizes(cfg)
        sigma = calibrate_noise(target, sample_level_plans(cfg, sizes), 1e-5)
        counts = participation_counts(seed, 5, 20, 10)
        assert max(counts) > 5 * 10 / 20  # someone trains more often than on average
        eps = [epsilon([(sigma, poisson_sample_rate(n, 16), k * steps_per_round(n, 16, 1, 0))], 1e-5)
               for n, k in zip(sizes, counts)]
        assert target * 0.999 <= max(eps) <= target, (seed, target, max(eps))


@pytest.mark.parametrize("seed, target, extra", [
    (0, 3.0, {}),
    pytest.param(1, 2.0, {"runtime.engine": "opacus", "client.local_steps": 3}, marks=pytest.mark.slow),
    pytest.param(2, 5.0, {"runtime.engine": "vectorized", "client.local_epochs": 2}, marks=pytest.mark.slow),
    pytest.param(1, 3.0, {"privacy.accountant": "prv", "runtime.engine": "opacus"}, marks=pytest.mark.slow),
    pytest.param(0, 3.0, {"federation.clients_per_round": 6, "federation.rounds": 2}, marks=pytest.mark.slow),
])
def test_every_client_ends_at_most_at_the_target(tmp_path, rounds_trained, seed, target, extra):
    cfg = small(tmp_path, seed=seed, **{"privacy.target_epsilon": target, **extra})
    fed = cfg.federation
    out = run_experiment(cfg, progress=False)
    # the server trained exactly the predicted clients, round by round
    assert rounds_trained() == participation_schedule(seed, fed.rounds, fed.num_clients, fed.clients_per_round)
    rows = clients_csv(out)
    counts = participation_counts(seed, fed.rounds, fed.num_clients, fed.clients_per_round)
    assert {pid: int(r["participations"]) for pid, r in rows.items()} == \
        {pid: k for pid, k in enumerate(counts) if k > 0}
    eps = [float(r["sample_epsilon"]) for r in rows.values()]
    assert all(e <= target for e in eps), eps
    assert max(eps) >= 0.9 * target
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sample_level"]["epsilon_max"] == max(eps)


@pytest.mark.slow
def test_a_skipped_client_only_lowers_epsilon(tmp_path, monkeypatch):
    """The client that trains most fails every time and is skipped: it never trains and
    everyone else still ends at most at the target."""
    import fedsim.clients.app as app

    cfg = small(tmp_path, seed=0, **{"privacy.target_epsilon": 3.0, "runtime.on_client_error": "skip"})
    counts = participation_counts(0, 4, 6, 3)
    busiest = counts.index(max(counts))
    real = app.prepare_job

    def flaky(msg, context, *args, **kwargs):
        if context.node_config["partition-id"] == busiest:
            raise RuntimeError("boom")
        return real(msg, context, *args, **kwargs)

    monkeypatch.setattr(app, "prepare_job", flaky)
    rows = clients_csv(run_experiment(cfg, progress=False))
    assert busiest not in rows and rows
    assert all(float(r["sample_epsilon"]) <= 3.0 for r in rows.values())


def test_user_level_target_holds(tmp_path):
    """Central DP: the reported user-level epsilon after the last round lies in [0.9 T, T]."""
    cfg = small(tmp_path, **{"privacy.user_target_epsilon": 3.0, "privacy.user_clip": 1.0,
                             "federation.rounds": 3})
    out = run_experiment(cfg, progress=False)
    summary = json.loads((out / "summary.json").read_text())
    assert 2.7 <= summary["user_level"]["epsilon"] <= 3.0
    rows = list(csv.DictReader((out / "rounds.csv").open()))
    assert float(rows[-1]["user_epsilon"]) == summary["user_level"]["epsilon"]
