"""Every epsilon a table shows names its statistic: per run the largest per-client epsilon;
across seeds their mean and their maximum; on request the median client beside the largest."""

from __future__ import annotations

import json
import math

import pytest

from fedsim.report import EPSILON_NOTE, render, report
from fedsim.server import epsilon_stats
from tests.test_report import edit_summary, write_run


@pytest.fixture
def three_seeds(tmp_path):
    """One DP setting over three seeds whose largest clients sit at 5.8, 7.0, 9.9 and whose
    median clients at 3.9, 4.1, 4.6; plus a non-private reference."""
    root = tmp_path / "runs"
    for seed, (largest, median) in enumerate([(5.8, 3.9), (7.0, 4.1), (9.9, 4.6)]):
        run = write_run(root, f"dp-{seed}", sigma=2.0, seed=seed, final=0.7, eps=largest)
        edit_summary(run, lambda s, m=median: s["sample_level"].update(epsilon_median=m))
        write_run(root, f"nodp-{seed}", sigma=0.0, seed=seed, final=0.9, eps=math.inf)
    return root


def test_table_shows_the_mean_and_the_largest_over_seeds_of_each_runs_largest_client(three_seeds):
    table = report(three_seeds)
    dp = table[table["sigma"] == 2.0].iloc[0]
    assert dp["sample_epsilon"] == round((5.8 + 7.0 + 9.9) / 3, 2)
    assert dp["sample_epsilon_seed_max"] == 9.9
    assert "sample_epsilon_median" not in table
    ref = table[table["sigma"] == 0.0].iloc[0]
    assert math.isinf(ref["sample_epsilon"]) and math.isinf(ref["sample_epsilon_seed_max"])
    md = render(table, "md")
    assert f"Epsilon: {EPSILON_NOTE}" in md and "| sample_epsilon | sample_epsilon_seed_max |" in md
    assert json.loads(render(table, "json"))["epsilon_note"] == EPSILON_NOTE


def test_median_client_beside_the_largest(three_seeds, cli):
    table = report(three_seeds, median=True)
    dp = table[table["sigma"] == 2.0].iloc[0]
    assert dp["sample_epsilon_median"] == round((3.9 + 4.1 + 4.6) / 3, 2)
    assert math.isinf(table[table["sigma"] == 0.0].iloc[0]["sample_epsilon_median"])
    code, out, _ = cli("report", three_seeds, "--median-client", "--format", "csv")
    assert code == 0 and "sample_epsilon_median" in out.splitlines()[0]


def test_a_run_without_the_distribution_shows_no_median(tmp_path):
    write_run(tmp_path / "old", "dp", sigma=1.0, eps=3.0)  # summary.json from before the distribution
    assert math.isnan(report(tmp_path / "old", median=True)["sample_epsilon_median"].iloc[0])


def test_epsilon_stats():
    assert epsilon_stats([3.0, 1.0, 2.0, 10.0]) == {"epsilon_min": 1.0, "epsilon_median": 2.5, "epsilon_max": 10.0}
    assert epsilon_stats([]) == {"epsilon_min": None, "epsilon_median": None, "epsilon_max": None}
