"""The Ray runtime (engine workers): the same results as the in-process runtime, checkpoints
that resume, and a dying worker reported in one line.

One Ray instance serves the module (starting Ray costs about 8 s on a 2-core machine);
`run_ray` uses a running instance as it is and leaves it running.
"""

from __future__ import annotations

import csv
import json
import os

import pytest

ray = pytest.importorskip("ray")

from fedsim import records as R  # noqa: E402
from fedsim.errors import ClientFailure  # noqa: E402
from fedsim.runtime import ray_engine  # noqa: E402
from fedsim.runtime.ray_engine import (EngineWorker, balance, cpus_per_worker, default_workers,  # noqa: E402
                                       workers_that_fit)
from fedsim.run import run_experiment  # noqa: E402

DIE_IN_ROUND = 2


class DiesInRound(EngineWorker):
    """A worker whose process exits while it trains round DIE_IN_ROUND: a crash as the
    driver sees one (no exception, no reply; the actor is gone)."""

    def train(self, pairs):
        rounds = {R.plain(msg.content[R.CONFIG])[R.SERVER_ROUND] for msg, _ in pairs}
        if DIE_IN_ROUND in rounds:
            os._exit(1)
        return super().train(pairs)


class OneDiesInRound(EngineWorker):
    """The first worker to reach round DIE_IN_ROUND exits; the others (and its replacement)
    train on. Which one is decided by a file only one process can create, at `marker`: a
    path the test sets in a fresh subclass (pickled by value into the workers), so no file
    left by an earlier run, in this Ray session or another, can keep the worker alive."""

    marker = ""

    def train(self, pairs):
        rounds = {R.plain(msg.content[R.CONFIG])[R.SERVER_ROUND] for msg, _ in pairs}
        if DIE_IN_ROUND in rounds:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                os._exit(1)
        return super().train(pairs)


@pytest.fixture(scope="module")
def ray_instance():
    # "local": a fresh instance, never a cluster another test (test_ray_cluster.py, in the
    # other pytest worker) has running on this machine at the time
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def rows(out, name="rounds.csv"):
    return [{k: v for k, v in row.items() if k != "wall_seconds"} for row in csv.DictReader((out / name).open())]


def weights(out):
    """The saved model's tensors (its header also holds the config, which names the runtime)."""
    from safetensors.numpy import load_file

    return {k: v.tobytes() for k, v in load_file(out / "model.safetensors").items()}


def experiment(tiny, out, **kw):
    base = {"privacy.noise_multiplier": 1.0, "federation.num_clients": 10, "federation.clients_per_round": 6,
            "federation.rounds": 3, "data.partitioner": "dirichlet", "output.dir": str(out)}
    return tiny(**{**base, **kw})


def test_balance_by_steps_keeps_round_order():
    # LPT: 9 steps alone, 5 + 4 together; each share in the round's order
    assert balance([5, 9, 4], 2) == [[1], [0, 2]]
    assert balance([1, 1, 1, 1], 1) == [[0, 1, 2, 3]]
    assert balance([3], 2) == [[0], []]


def test_pool_size_from_the_cluster():
    assert default_workers({"CPU": 16.0, "GPU": 4.0}) == 4 and default_workers({"CPU": 16.0}) == 8
    assert default_workers({"CPU": 1.0}) == 1
    assert cpus_per_worker({"CPU": 2.0}, 2) == 1.0 and cpus_per_worker({"CPU": 5.0}, 2) == 2.0
    assert cpus_per_worker({"CPU": 1.0}, 4) == 0.25  # Ray takes fractions below 1 only
    nodes = [{"Alive": True, "Resources": {"CPU": 1.0}}, {"Alive": True, "Resources": {"CPU": 3.0, "GPU": 1.0}},
             {"Alive": False, "Resources": {"CPU": 64.0}}]
    assert workers_that_fit(nodes, 2.0, 0.0) == 1  # a worker sits on one node: 1 + 3 CPUs hold one of 2
    assert workers_that_fit(nodes, 1.0, 0.0) == 4
    assert workers_that_fit(nodes, 1.0, 1.0) == 1 and workers_that_fit(nodes, 1.0, 0.5) == 2


class Echo:
    """An actor that registers the workers' wire format, as `EngineWorker` does, and sends back
    what it is given."""

    def __init__(self) -> None:
        EngineWorker.__init__(self, 1)

    def echo(self, value):
        return value


def test_replies_cross_from_a_worker_unchanged(ray_instance):
    """A reply's Arrays reach the driver with the same dtype, shape, stype and bytes (Flower's
    own `numpy()` reads them back), as `bytes`: a view would pin Ray's buffer."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, RecordDict

    values = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.zeros(0, dtype=np.float64),
              "i": np.array([[1, -2]], dtype=np.int64).T}
    sent = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in values.items()})})
    back = ray.get(ray.remote(Echo).remote().echo.remote(sent))
    for key, value in values.items():
        a, b = sent["arrays"][key], back["arrays"][key]
        assert type(b.data) is bytes and b.data == a.data
        assert (b.dtype, b.shape, b.stype) == (a.dtype, a.shape, a.stype)
        np.testing.assert_array_equal(b.numpy(), value)
    assert ray_engine.array_from_wire(ray_engine.array_to_wire(sent["arrays"]["w"])) == sent["arrays"]["w"]


def test_two_workers_equal_inprocess(ray_instance, tiny, tmp_path):
    """With one client per batched computation the chunk boundaries match whatever the
    split: rounds, clients and model bit for bit (SCAFFOLD, whose nodes keep control
    variates). With the default chunks (the in-process round in one batch, each worker its
    share) within 1e-6, per-client epsilon identical."""
    one = {"runtime.engine_chunk": 1, "strategy.name": "scaffold"}  # control variates: node state travels
    a = run_experiment(experiment(tiny, tmp_path / "a", **one), progress=False)
    b = run_experiment(experiment(tiny, tmp_path / "b", **one, **{"runtime.name": "ray", "runtime.workers": 2}),
                       progress=False)
    assert rows(a) == rows(b)
    assert (a / "clients.csv").read_bytes() == (b / "clients.csv").read_bytes()
    assert weights(a) == weights(b)
    assert json.loads((b / "summary.json").read_text())["engine"]["used"] == "vectorized"
    assert "ray: 2 engine worker(s)" in (b / "run.log").read_text()

    c = run_experiment(experiment(tiny, tmp_path / "c"), progress=False)
    d = run_experiment(experiment(tiny, tmp_path / "d", **{"runtime.name": "ray", "runtime.workers": 2}),
                       progress=False)
    for x, y in zip(rows(c) + rows(c, "clients.csv"), rows(d) + rows(d, "clients.csv"), strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if "eps" in key or key in ("round", "partition", "metric_name", "clients_trained"):
                assert x[key] == y[key], key  # the accountant sees the same steps and rates
            elif x[key]:
                assert float(x[key]) == pytest.approx(float(y[key]), rel=1e-6, abs=1e-9), key


def test_dead_worker_is_one_line_and_the_run_resumes(ray_instance, tiny, tmp_path, monkeypatch, capsys):
    """A worker process that exits mid-round fails the run with one line naming the round, the
    worker and its nodes (exit 1 at the CLI); the checkpoint of the round before resumes on
    healthy workers to the in-process result, bit for bit."""
    from fedsim.cli import main

    kw = {"runtime.engine_chunk": 1, "output.checkpoint_every": 1}
    ref = run_experiment(experiment(tiny, tmp_path / "ref", **kw), progress=False)
    cfg = experiment(tiny, tmp_path / "ray", **kw, **{"runtime.name": "ray", "runtime.workers": 2})
    monkeypatch.setattr(ray_engine, "EngineWorker", DiesInRound)
    with pytest.raises(ClientFailure) as failure:
        run_experiment(cfg, progress=False)
    text = str(failure.value)
    assert len(text.splitlines()) == 1 and failure.value.client_traceback is None
    assert text.startswith(f"round {DIE_IN_ROUND}: engine worker ") and " died while training " in text
    assert "nodes 10" in text
    assert [r["round"] for r in rows(tmp_path / "ray")] == ["1"]

    rc = main(["run", "--no-progress", "--out", str(tmp_path / "cli"), "--set", "runtime.name=ray",
               "--set", "runtime.workers=2", "--set", "model.hidden=[8]", "--set", "federation.num_clients=4",
               "--set", "federation.clients_per_round=2", "--set", f"federation.rounds={DIE_IN_ROUND}"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # (log lines may come before)
    assert rc == 1 and "Traceback" not in err and err.strip().splitlines()[-1:] == errors, err
    assert len(errors) == 1 and errors[0].startswith(f"error: round {DIE_IN_ROUND}: engine worker"), err

    monkeypatch.setattr(ray_engine, "EngineWorker", EngineWorker)
    resumed = run_experiment(cfg, progress=False, resume=True)
    assert rows(resumed) == rows(ref)
    assert (resumed / "clients.csv").read_bytes() == (ref / "clients.csv").read_bytes()
    assert weights(resumed) == weights(ref)


@pytest.mark.slow
def test_dead_worker_skipped(ray_instance, tiny, tmp_path, monkeypatch):
    """Under on_client_error = "skip" the dead worker's clients are skipped for that round and
    a fresh worker serves the rounds after it."""
    marker = tmp_path / "one-worker-died"
    monkeypatch.setattr(ray_engine, "EngineWorker", type("OneDies", (OneDiesInRound,), {"marker": str(marker)}))
    cfg = experiment(tiny, tmp_path / "skip", **{"runtime.name": "ray", "runtime.workers": 2,
                                                 "runtime.on_client_error": "skip"})
    out = run_experiment(cfg, progress=False)
    trained = [int(r["clients_trained"]) for r in rows(out)]
    assert trained[0] == trained[2] == 6 and 0 < trained[1] < 6
    assert json.loads((out / "summary.json").read_text())["client_failures_skipped"] == 6 - trained[1]
    assert marker.exists()


def test_without_ray_address_each_runtime_starts_a_fresh_local_instance(tiny, tmp_path, monkeypatch):
    """Ray's default address (None) joins the cluster `ray start` last left on this machine,
    someone else's; without RAY_ADDRESS both Ray runtimes ask for a fresh one ("local")."""
    import flwr.simulation

    from fedsim.runtime.ray_runtime import run_flower

    class Stop(Exception):
        pass

    seen: dict = {}

    def capture(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", capture)
    with pytest.raises(Stop):
        ray_engine.run_ray(experiment(tiny, tmp_path / "engine", **{"runtime.name": "ray"}), progress=False)
    assert seen["address"] == "local"
    seen.clear()
    monkeypatch.setattr(flwr.simulation, "run_simulation", capture)
    with pytest.raises(Stop):
        run_flower(experiment(tiny, tmp_path / "flower", **{"runtime.name": "flower"}), progress=False)
    assert seen["backend_config"]["init_args"]["address"] == "local"
