"""Whole runs with user-level (central) DP: each mechanism from the CLI, every strategy it is
sound for, and the same release under the in-process and Ray runtimes."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedsim.errors import FedsimError
from fedsim.run import run_experiment


def rounds(out):
    return list(csv.DictReader((out / "rounds.csv").open()))


@pytest.mark.parametrize("mechanism", [
    ["--set", "privacy.user_clip_quantile=0.5", "--set", "privacy.user_clip_count_noise=1"],
    ["--set", "privacy.user_mechanism=tree", "--set", "privacy.user_tree_restart=2"],
    ["--set", "privacy.noise_cohort_size=1000", "--set", "privacy.min_cohort=3", "--set", "federation.sampling=fixed"],
    ["--set", "privacy.user_clipping=client", "--set", "privacy.user_clip_quantile=0.5",
     "--set", "privacy.user_clip_count_noise=1", "--set", "strategy.name=scaffold"],
])
def test_each_mechanism_runs_from_the_cli_and_writes_finite_results(cli, tmp_path, mechanism):
    out = tmp_path / "run"
    code, _, err = cli("run", "configs/quickstart.toml", "--set", "privacy.user_noise_multiplier=1",
                       "--set", "privacy.noise_multiplier=0", "--set", "federation.rounds=3",
                       "--set", "federation.num_clients=6", "--set", "federation.clients_per_round=3",
                       "--set", f"output.dir={out}", *mechanism)
    assert code == 0, err
    rows = rounds(out)
    assert len(rows) == 3 and all(math.isfinite(float(r["metric"])) for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and math.isfinite(summary["user_level"]["epsilon"])
    assert "central DP: " in (out / "run.log").read_text()


@pytest.mark.parametrize("strategy", ["fedadam", "scaffold", "fedprox"])
def test_central_dp_runs_for_the_strategies_it_is_sound_for(tiny, strategy):
    out = run_experiment(tiny(**{"strategy.name": strategy, "privacy.user_noise_multiplier": 0.5,
                                 "privacy.user_clip": 0.5}), progress=False)
    assert all(math.isfinite(float(r["metric"])) for r in rounds(out))


def test_fedld_is_refused_from_the_cli_in_one_line(cli, tmp_path):
    code, _, err = cli("run", "configs/quickstart.toml", "--set", "privacy.user_noise_multiplier=1",
                       "--set", "strategy.name=fedld", "--set", f"output.dir={tmp_path / 'run'}")
    assert code == 2 and "central DP does not apply to strategy 'fedld'" in err and "Traceback" not in err


@pytest.mark.slow  # two whole runs, one of them starting Ray (about 35 s on 2 cores)
def test_ray_and_inprocess_release_the_same(tiny, tmp_path):
    """The same run under both runtimes. The layer sums the replies in partition order and
    draws its noise from (seed, round), so Ray's arrival order changes nothing in it (the bits
    of the layer itself: tests/privacy/test_user_dp.py). The clients' updates differ between
    the runtimes in their last bits (measured: 4e-9; Ray trains one client per message), so
    the models agree to float32 rounding, and the adaptive clip follows the same path."""
    kw = {"privacy.user_noise_multiplier": 1.0, "privacy.user_clip_quantile": 0.5,
          "privacy.user_clip_count_noise": 1.0, "federation.rounds": 2}
    a = run_experiment(tiny(**kw, **{"output.dir": str(tmp_path / "a")}), progress=False)
    pythonpath = os.environ.get("PYTHONPATH")
    b = run_experiment(tiny(**kw, **{"output.dir": str(tmp_path / "b"), "runtime.name": "ray"}), progress=False)
    if pythonpath is not None:
        os.environ["PYTHONPATH"] = pythonpath  # Flower's Ray backend rewrites it
    for x, y in zip(rounds(a), rounds(b), strict=True):
        assert x["metric"] == y["metric"]
        assert float(x["test_loss"]) == pytest.approx(float(y["test_loss"]), rel=1e-5)
    ma, mb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ma.keys() == mb.keys()
    for k in ma:
        np.testing.assert_allclose(ma[k], mb[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("strategy", ["fedsvd", "ffa-lora", "fedavg-lora"])
def test_central_dp_on_the_trained_lora_arrays(lora_cfg, strategy):
    """The LoRA strategies upload only their trained adapters; the layer privatizes those and
    leaves the frozen ones as sent (a run finishes with a finite metric every round)."""
    out = run_experiment(lora_cfg(strategy, **{"privacy.user_noise_multiplier": 1.0, "privacy.user_clip": 0.5,
                                               "privacy.user_clip_quantile": 0.5,
                                               "privacy.user_clip_count_noise": 1.0}), progress=False)
    assert all(math.isfinite(float(r["metric"])) for r in rounds(out))
    assert "central DP: " in (out / "run.log").read_text()


def test_a_round_below_min_cohort_fails_the_run_naming_round_and_count(tiny, monkeypatch):
    """Partition 0 always fails and is skipped: 5 of 6 expected replies. With min_cohort 5 the
    run goes on (dividing by 6); with 6 it stops in round 1, saying so."""
    import fedsim.clients.app as app

    real = app.prepare_job

    def flaky(msg, context, *args, **kwargs):
        if context.node_config["partition-id"] == 0:
            raise RuntimeError("boom")
        return real(msg, context, *args, **kwargs)

    monkeypatch.setattr(app, "prepare_job", flaky)
    kw = {"runtime.on_client_error": "skip", "federation.clients_per_round": 6, "privacy.user_noise_multiplier": 1.0}
    out = run_experiment(tiny(**kw, **{"privacy.min_cohort": 5}), progress=False)
    assert [int(r["clients_trained"]) for r in rounds(out)] == [5, 5]
    with pytest.raises(FedsimError, match=r"round 1: 5 client update\(s\) replied, fewer than privacy.min_cohort = 6"):
        run_experiment(tiny(**kw, **{"privacy.min_cohort": 6, "output.dir": str(out.parent / "strict")}),
                       progress=False)


def test_an_empty_poisson_round_still_releases_the_noise(tiny):
    """A Poisson round that drew nobody releases N(0, (zC)^2)/K all the same: the accountant
    counts every round as a sampled Gaussian, and a round that left the model untouched
    would tell that nobody was drawn. So the model moves in a round that trained no one."""
    cfg = tiny(**{"privacy.user_noise_multiplier": 1.0, "federation.sampling": "poisson",
                  "federation.num_clients": 4, "federation.clients_per_round": 1, "federation.rounds": 8})
    rows = rounds(run_experiment(cfg, progress=False))
    empty = [i for i, r in enumerate(rows) if int(r["clients_trained"]) == 0 and i > 0]
    assert empty, "this seed drew no empty round after the first"
    for i in empty:
        assert rows[i]["test_loss"] != rows[i - 1]["test_loss"]
    assert all(math.isfinite(float(r["user_epsilon"])) for r in rows)
