"""benchmarks/peers.py hands pfl-research fedsim's own partition and schedule, and its check
that both sides trained them catches a departure.

The default tier needs no pfl: the export is decoded with the worker's own helpers (which
import neither pfl nor torch) and compared with fedsim's lists and with the records of a real
fedsim run. The one case that runs pfl needs its separate interpreter (FEDSIM_PFL_PYTHON,
`make peers-venv`) and is skipped without it.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from fedsim.config import load_config
from fedsim.partition import partition
from fedsim.run import run_experiment
from fedsim.schedule import participation_schedule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peers  # noqa: E402
import peers_pfl  # noqa: E402

TINY = {"name": "peers", "data.dataset": "digits", "data.partitioner": "dirichlet", "model.name": "mlp",
        "model.hidden": [16], "federation.num_clients": 12, "federation.clients_per_round": 5,
        "federation.rounds": 3, "federation.sampling": "fixed", "client.batch_size": 8, "client.lr": 0.5}


@pytest.fixture(scope="module")
def fedsim_run(tmp_path_factory):
    """A finished fedsim run of TINY and the arrays the benchmark hands pfl for it."""
    out = tmp_path_factory.mktemp("peers") / "run"
    cfg = load_config(None, {**TINY, "output.dir": str(out)})
    inputs = peers.pfl_inputs(cfg)
    run_experiment(cfg, progress=False)
    return cfg, inputs, out


def as_pfl_would(inputs) -> dict:
    """The result of a pfl run that trained exactly the exported users."""
    sizes = np.diff(inputs["user_offsets"])
    rounds = peers_pfl.cohorts(inputs["schedule"], len(inputs["schedule"]))
    return {"users": [sorted(c) for c in rounds], "counts": [(len(c), int(sizes[c].sum())) for c in rounds]}


def test_the_export_decodes_to_fedsims_partition_and_schedule(fedsim_run):
    cfg, inputs, _ = fedsim_run
    users = peers_pfl.user_slices(inputs["user_rows"], inputs["user_offsets"])
    want = partition(cfg).indices
    assert len(users) == len(want) == 12
    assert all(np.array_equal(u, w) for u, w in zip(users, want))
    # every training row goes to exactly one user
    assert np.array_equal(np.sort(inputs["user_rows"]), np.arange(len(inputs["y_train"])))
    assert peers_pfl.cohorts(inputs["schedule"], 3) == participation_schedule(cfg.seed, 3, 12, 5, "fixed")
    # the initial weights are the model's, in its order: Linear(64, 16), Linear(16, 10)
    assert [inputs[f"param_{i}"].shape for i in range(4)] == [(16, 64), (16,), (10, 16), (10,)]


def test_the_check_passes_a_run_that_followed_and_names_each_departure(fedsim_run):
    cfg, inputs, out = fedsim_run
    exact = as_pfl_would(inputs)
    assert peers.followed(inputs, exact, out) == []  # fedsim's own records agree with the export

    other = copy.deepcopy(exact)
    outside = next(u for u in range(12) if u not in other["users"][1])
    other["users"][1] = sorted(other["users"][1][1:] + [outside])
    problems = peers.followed(inputs, other, out)
    assert len(problems) == 1 and problems[0].startswith("pfl round 2: trained users")

    fewer = copy.deepcopy(exact)
    fewer["counts"][2] = (fewer["counts"][2][0], fewer["counts"][2][1] - 1)
    problems = peers.followed(inputs, fewer, out)
    assert len(problems) == 1 and problems[0].startswith("pfl round 3: 5 users and")

    # another seed's schedule, which fedsim did not run: its clients.csv says so
    shifted = {**inputs, "schedule": np.asarray(participation_schedule(cfg.seed + 1, 3, 12, 5, "fixed"))}
    problems = peers.followed(shifted, as_pfl_would(shifted), out)
    assert any(p.startswith("fedsim's clients.csv") for p in problems)


def test_no_pfl_interpreter_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv(peers.PFL_ENV, raising=False)
    monkeypatch.setattr(peers, "DEFAULT_PFL_PYTHON", tmp_path / "absent")
    with pytest.raises(SystemExit) as exc:
        peers.pfl_python("")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--pfl-python" in err and "make peers-venv" in err
    with pytest.raises(SystemExit) as exc:
        peers.pfl_python(str(tmp_path / "missing-python"))
    assert exc.value.code == 2 and "missing-python does not exist" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("pfl") is not None, reason="this interpreter holds pfl")
def test_an_interpreter_without_pfl_is_one_line_and_exit_2(capsys, tmp_path):
    """fedsim's own interpreter cannot hold pfl 0.6.0 (dp-accounting < 0.6): the worker dies on
    start, and the benchmark says which interpreter and why, without a traceback."""
    with pytest.raises(SystemExit) as exc:
        peers.PflWorker(sys.executable, 1, tmp_path / "pfl.log")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot run pfl-research" in err and "PackageNotFoundError" in err


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FEDSIM_PFL_PYTHON"), reason="needs pfl's own interpreter (FEDSIM_PFL_PYTHON)")
def test_pfl_trains_the_schedule_and_matches_fedsims_fedavg(tmp_path):
    """With one batch per client (batch 128 > every client's size) local training does not
    depend on shuffling, so pfl's FedAvg from fedsim's weights on fedsim's clients must land
    where fedsim's does: the same final accuracy, up to float summation order."""
    cfg = load_config(None, {**TINY, "data.partitioner": "iid", "client.batch_size": 128,
                             "output.dir": str(tmp_path / "run")})
    inputs = peers.pfl_inputs(cfg)
    np.savez(tmp_path / "in.npz", **inputs)
    run_experiment(cfg, progress=False)
    worker = peers.PflWorker(os.environ["FEDSIM_PFL_PYTHON"], 1, tmp_path / "pfl.log")
    try:
        result = worker.run(tmp_path / "in.npz", 3)
    finally:
        worker.close()
    assert peers.followed(inputs, result, tmp_path / "run") == []
    fedsim_accuracy = peers.json.loads((tmp_path / "run" / "summary.json").read_text())["final_metric"]
    assert abs(result["accuracy"] - fedsim_accuracy) <= 1 / len(inputs["y_test"])


def test_floor_line_divides_pfl_loop_by_the_message_floor_over_the_rounds():
    # two side-by-side pairs, hand-computed: pfl loops 3.0 s and 2.4 s over 30 rounds against
    # floors of 10 ms and 8 ms: 3.0 / 0.30 = 10 and 2.4 / 0.24 = 10, median 10; with the engine's
    # training (0.2 s, 0.16 s) added, 3.0 / 0.5 = 6 and 2.4 / 0.4 = 6
    fed = [(1.0, 0.6, 0.9, 0.2), (1.1, 0.5, 0.9, 0.16)]
    pfl = [(4.0, 3.0, 0.9), (3.5, 2.4, 0.9)]
    line = peers.floor_line("x", 30, [0.010, 0.008], fed, pfl)
    fields = dict(item.split("=") for item in line.split()[1:])
    assert fields["workload"] == "x"
    assert float(fields["best_loop_ratio"]) == pytest.approx(10.0)
    assert float(fields["best_loop_ratio_trained"]) == pytest.approx(6.0)
    assert float(fields["message_floor_ms"]) == pytest.approx(9.0)
    assert float(fields["pfl_round_ms"]) == pytest.approx(2.7 / 30 * 1e3, abs=0.01)
    assert float(fields["engine_round_ms"]) == pytest.approx(0.18 / 30 * 1e3, abs=0.01)
