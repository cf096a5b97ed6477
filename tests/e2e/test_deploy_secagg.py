"""Flower's SecAgg+ in a real local deployment (SuperLink + 3 SuperNodes over gRPC).

Slow: every protocol stage starts a ClientApp process per node (4 stages x 3 nodes a round),
about 80 s a round on 2 busy cores, so the dropout cases run one round (the file: about 6 min).
The protocol's arithmetic against hand-computed arrays, dropouts included, is tested in memory
in tests/privacy/test_secure_aggregation.py.
"""

from __future__ import annotations

import csv
import json
import threading
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedsim.deploy import LocalDeployment, deploy_local
from fedsim.privacy.secagg import quantization_error_bound
from fedsim.run import prepare, run_experiment

pytestmark = pytest.mark.slow

KW = {"data.dataset": "digits", "federation.num_clients": 3, "federation.clients_per_round": 3,
      "federation.rounds": 2, "privacy.secure_aggregation": True}


def _sim_and_deploy(tiny, tmp_path, rounds: int):
    kw = {**KW, "federation.rounds": rounds}
    # SuperNodes train one message at a time: the simulation trains each client alone too
    # (chunks of 1), so the two differ by the protocol's quantization alone
    sim = run_experiment(tiny(**kw, **{"output.dir": str(tmp_path / "sim"), "runtime.engine_chunk": 1}),
                         progress=False)
    dep = deploy_local(prepare(tiny(**kw, **{"output.dir": str(tmp_path / "dep")})), 3, timeout=900)
    return sim, dep


def test_secaggplus_aggregate_equals_the_simulated_one_within_the_quantization_bound(tiny, tmp_path):
    """One round: the model the server holds is the round's aggregate, so the deployment and
    the simulation differ by SecAgg+'s quantization alone, at most 2r/Q per coordinate."""
    sim, dep = _sim_and_deploy(tiny, tmp_path, rounds=1)
    summary = json.loads((dep / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["secure_aggregation"]["protocol"] == "SecAgg+ (Flower)"
    bound = quantization_error_bound(8.0, 2**22)  # r = 8 without user-level DP, Q = 2**22
    assert summary["secure_aggregation"]["error_bound"] == bound
    a, b = load_file(sim / "model.safetensors"), load_file(dep / "model.safetensors")
    worst = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)
    assert 0 < worst <= bound


def test_secaggplus_deployment_runs_two_rounds(tiny, tmp_path):
    """The protocol over consecutive rounds: both finish, and round 1 reads as the simulation's.
    After round 2 the two models differ by round 1's quantization carried through a round of
    local training: measured 4.0e-6 in isolation and once 3.9e-4 in the full slow tier, which
    is why this test compares round 1 only and the bound is checked on one round above."""
    sim, dep = _sim_and_deploy(tiny, tmp_path, rounds=2)
    summary = json.loads((dep / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_completed"] == 2
    first = {name: list(csv.DictReader((run / "rounds.csv").open()))[0] for name, run in (("sim", sim), ("dep", dep))}
    for key in ("metric", "test_loss", "val_metric"):
        assert float(first["dep"][key]) == pytest.approx(float(first["sim"][key]), rel=1e-5), key
    # the clients withhold their training loss from a secure-aggregation server, deployed or not
    assert first["dep"]["train_loss"] in ("", "nan") and first["sim"]["train_loss"] in ("", "nan")


# logged once the round's nodes are sampled, before the protocol's first message goes out
SAMPLED = "configure_fit: strategy sampled"


def _kill_after(dep: LocalDeployment, nodes: list[int], marker: str, times: int, timeout: float = 600) -> None:
    """Stop SuperNodes once the run's log shows `marker` `times` times (mid-round)."""
    log = dep.log_dir / "flwr-run.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if text.count(marker) >= times:
            for pid in nodes:
                dep.group.stop(f"supernode-{pid}")
            return
        time.sleep(0.5)


def _deploy_and_kill(tiny, tmp_path, kill: list[int]) -> tuple[dict, str, list[str]]:
    """One round of 3 nodes whose SuperNodes `kill` die once they are sampled: the summary,
    run.log and each round's clients_trained."""
    cfg = prepare(tiny(**{**KW, "federation.rounds": 1, "runtime.round_timeout": 30.0,
                          "output.dir": str(tmp_path / "dep")}))
    dep = LocalDeployment(cfg, 3)
    try:
        dep.start_superlink()
        for pid in range(3):
            dep.start_supernode(pid)
        dep.wait_for_nodes(300)
        runner = threading.Thread(target=dep.submit, args=(900,))
        runner.start()
        _kill_after(dep, kill, SAMPLED, 1)
        runner.join(timeout=900)
    except Exception:  # noqa: BLE001 - a failed run raises from submit; the summary says why
        pass
    finally:
        dep.group.stop_all()
    out = tmp_path / "dep"
    trained = [r["clients_trained"] for r in csv.DictReader((out / "rounds.csv").open())] \
        if (out / "rounds.csv").exists() else []
    return json.loads((out / "summary.json").read_text()), (out / "run.log").read_text(), trained


def test_a_killed_supernode_is_survived_within_the_threshold(tiny, tmp_path):
    summary, log, trained = _deploy_and_kill(tiny, tmp_path, [2])  # 3 shares, threshold 2: one may go
    assert summary["status"] == "finished", summary.get("error")
    assert trained == ["2"]  # sampled 3, the protocol's sum holds the 2 that lived
    assert "round 1: secure aggregation went on without a node" in log


def test_beyond_the_threshold_the_round_fails_with_one_line(tiny, tmp_path):
    summary, _, trained = _deploy_and_kill(tiny, tmp_path, [1, 2])
    assert summary["status"] == "failed" and trained == []
    error = summary["error"]
    assert "\n" not in error
    # the text a run gave (`fedsim deploy local` prints it after "deployed run ended with status
    # 'failed': " and before "; logs in <dir>"): the 1 node left holds 1 share of each, below 2
    assert error == ("ClientFailure: round 1: secure aggregation failed: 1 of 3 nodes left, and 3 node(s) kept "
                     "fewer than 2 live share holders (privacy.secagg_threshold)")
