"""The README's user-level privacy-utility row at sigma = 1 regenerates from its command:
the sweep's sigma = 1 cells (fixed and adaptive clipping, 10 seeds each) and `fedsim report`
give the quoted means, intervals, paired difference and epsilon (docs/results.md)."""

from __future__ import annotations

import json

import pytest

from fedsim.privacy.accounting import user_level_epsilon

README_ROW = {0.0: (81.6, 2.0), 0.5: (46.1, 7.5)}  # user_clip_quantile -> (final %, ci95)


@pytest.mark.slow  # 20 whole runs (about 10 s with the vectorized engine on 2 cores)
def test_the_user_level_row_at_sigma_one_regenerates(cli, tmp_path):
    out = tmp_path / "sweep"
    code, _, err = cli("sweep", "configs/privacy-utility-user.toml", "--grid", "privacy.user_noise_multiplier=1.0",
                       "--out", out, "--jobs", "2")
    assert code == 0, err
    code, table, err = cli("report", out, "--format", "json", "--group-by", "privacy.user_clip_quantile")
    assert code == 0, err
    rows = {float(r["privacy.user_clip_quantile"]): r for r in json.loads(table)["rows"]}
    for quantile, (final, ci95) in README_ROW.items():
        assert round(float(rows[quantile]["final_accuracy"]), 1) == final
        assert round(float(rows[quantile]["ci95"]), 1) == ci95
        assert int(rows[quantile]["seeds"]) == 10
        assert float(rows[quantile]["user_epsilon"]) == pytest.approx(10.16, abs=0.005)
    # the quoted epsilon is dp-accounting's Poisson-sampled Gaussian, from fedsim's RDP
    assert user_level_epsilon(noise_multiplier=1.0, num_clients=50, cohort_size=10, rounds=40, delta=1e-5,
                              sampling="poisson") == pytest.approx(10.16, abs=0.005)
