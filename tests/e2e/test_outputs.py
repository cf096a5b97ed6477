"""What a run leaves in its directory: the trained model, a run.log that says what ran and why
it failed, a strict summary.json, files a user can read, and failures that are not hidden."""

from __future__ import annotations

import csv
import errno
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim import records as R
from fedsim.checkpoint import load_model
from fedsim.errors import ClientFailure, FedsimError
from fedsim.run import run_experiment


def strict(path: Path) -> dict:
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_non_private_run_outputs(tiny, tmp_path):
    """One run without DP: strict summary.json with a note instead of Infinity, the report
    reads it, every file readable under the umask, run.log with the settings and each round."""
    old = os.umask(0o022)
    try:
        out = run_experiment(tiny(**{"federation.rounds": 2}), progress=False)
    finally:
        os.umask(old)
    summary = strict(out / "summary.json")
    sample = summary["sample_level"]
    assert sample["epsilon_max"] is None and sample["accountant"] is None and "no DP-SGD" in sample["note"]
    assert summary["status"] == "finished" and summary["pid"] == os.getpid() and summary["updated_at"] > 0
    assert summary["client_failures_skipped"] == 0

    from fedsim.report import report

    table = report(out)
    assert table["sample_epsilon"].tolist() == [float("inf")]  # the non-private reference

    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert {"rounds.csv", "clients.csv", "summary.json", "config.toml", "run.log", "model.safetensors"} <= set(modes)
    assert set(modes.values()) == {0o644}, modes

    log = (out / "run.log").read_text()
    for line in ("federation: 6 clients, 3 per round, 2 rounds", "privacy: noise_multiplier 0",
                 "strategy fedavg (", "Sampling:", "round 1/2: accuracy=", "round 2/2: accuracy="):
        assert line in log, line


def test_failed_run_logs_the_error_and_its_traceback(tiny, monkeypatch):
    import fedsim.clients.app as app

    real = app.prepare_job

    def flaky(msg, context, *args, **kwargs):
        if int(msg.content[R.CONFIG][R.SERVER_ROUND]) == 2:
            raise RuntimeError("disk on fire")
        return real(msg, context, *args, **kwargs)

    monkeypatch.setattr(app, "prepare_job", flaky)
    cfg = tiny(**{"federation.rounds": 3})
    with pytest.raises(ClientFailure):
        run_experiment(cfg, progress=False)
    out = Path(cfg.output.dir)
    summary = strict(out / "summary.json")
    assert summary["status"] == "failed" and "failed in round 2: RuntimeError: disk on fire" in summary["error"]
    log = (out / "run.log").read_text()
    assert "ERROR fedsim: run failed: ClientFailure: node" in log
    assert "Traceback" in log and "client traceback:" in log and 'raise RuntimeError("disk on fire")' in log
    assert "round 1/3" in log and not (out / "model.safetensors").exists()


def test_saved_models_rebuild_without_the_dataset(tiny, monkeypatch):
    """model.safetensors is the final global model, model-best.safetensors the best round's:
    loaded back, each scores exactly what summary.json says, and loading reads no data."""
    from fedsim.clients.trainer import evaluate
    from fedsim.datasets import load_dataset

    cfg = tiny(**{"federation.rounds": 4, "privacy.noise_multiplier": 2.0, "client.lr": 1.0, "output.keep_best": True})
    out = run_experiment(cfg, progress=False)
    summary = strict(out / "summary.json")
    data = load_dataset(cfg.data, cfg.federation.num_clients, cfg.seed)

    import fedsim.datasets

    def no_data(*args, **kwargs):
        raise AssertionError("load_model loaded the dataset")

    monkeypatch.setattr(fedsim.datasets, "load_dataset", no_data)
    monkeypatch.setattr("fedsim.node_data.load_dataset", no_data)
    final, best = load_model(out), load_model(out, best=True)
    monkeypatch.undo()
    assert isinstance(final, torch.nn.Module) and not final.training
    assert evaluate(final, data.x_test, data.y_test, data.task)["accuracy"] == summary["final_metric"]
    assert evaluate(best, data.x_test, data.y_test, data.task)["accuracy"] == summary["best_metric"]
    rounds = list(csv.DictReader((out / "rounds.csv").open()))
    if summary["best_round"] != 4:  # a different round's model indeed
        assert any(not torch.equal(a, b) for a, b in zip(final.state_dict().values(), best.state_dict().values()))
    # the best round is the first with the highest validation accuracy; its test accuracy is the number
    val = [float(r["val_metric"]) for r in rounds]
    chosen = val.index(max(val))
    assert summary["best_selected_on"] == "validation" and summary["best_round"] == chosen + 1
    assert float(rounds[chosen]["metric"]) == summary["best_metric"]
    assert evaluate(best, data.x_val, data.y_val, data.task)["accuracy"] == max(val) == summary["best_val_metric"]

    plain = run_experiment(tiny(**{"federation.rounds": 1, "output.dir": str(out.parent / "plain")}), progress=False)
    assert not (plain / "model-best.safetensors").exists()
    with pytest.raises(FedsimError, match="no saved model .*keep_best"):
        load_model(plain, best=True)
    x = torch.as_tensor(np.asarray(data.x_test[:3]), dtype=torch.float32)
    assert load_model(plain)(x).shape == (3, data.num_classes)


def test_skip_policy_fails_when_no_client_trains_and_counts_skips(tiny, monkeypatch):
    import fedsim.clients.app as app

    real = app.prepare_job

    def flaky(msg, context, *args, **kwargs):
        if int(msg.content[R.CONFIG][R.SERVER_ROUND]) == 2 or context.node_config["partition-id"] == 0:
            raise RuntimeError("boom")
        return real(msg, context, *args, **kwargs)

    monkeypatch.setattr(app, "prepare_job", flaky)
    cfg = tiny(**{"runtime.on_client_error": "skip", "federation.rounds": 3})
    with pytest.raises(ClientFailure, match=r"round 2: no client trained \(every reply was an error"):
        run_experiment(cfg, progress=False)
    out = Path(cfg.output.dir)
    summary = strict(out / "summary.json")
    rows = list(csv.DictReader((out / "rounds.csv").open()))
    assert summary["status"] == "failed" and len(rows) == 1
    # round 1 skipped partition 0 if it was sampled; round 2 skipped all 3 sampled clients
    assert summary["client_failures_skipped"] == 3 + (3 - int(rows[0]["clients_trained"]))


@pytest.mark.parametrize("where", ["file", "under-file", "proc"])
def test_unusable_out_is_one_line_exit_1(cli, tmp_path, where):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    out = {"file": afile, "under-file": afile / "run", "proc": Path("/proc/fedsim-run")}[where]
    code, _, err = cli("run", "--num-clients", "4", "--clients-per-round", "2", "--rounds", "1", "--out", out,
                       "--no-progress")
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert afile.read_text() == "not a directory"


def test_full_disk_is_one_line_exit_1(cli, tmp_path, monkeypatch):
    import fedsim.server

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(fedsim.server, "write_atomic", full)
    code, _, err = cli("run", "--num-clients", "4", "--clients-per-round", "2", "--rounds", "1",
                       "--out", tmp_path / "run", "--no-progress")
    assert code == 1 and err == f"error: No space left on device: {tmp_path / 'run' / 'config.toml'}\n"
