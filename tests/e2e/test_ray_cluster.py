"""The Ray runtime on a two-node Ray cluster (both on loopback), joined through RAY_ADDRESS
as a user joins theirs: each node has one CPU, so the two engine workers land one a node."""

from __future__ import annotations

import csv

import pytest

ray = pytest.importorskip("ray")

from fedsim.run import run_experiment  # noqa: E402


def rows(out, name):
    return [{k: v for k, v in row.items() if k != "wall_seconds"} for row in csv.DictReader((out / name).open())]


@pytest.mark.slow
def test_ray_cluster_two_nodes_through_ray_address(tiny, tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster
    from safetensors.numpy import load_file

    kw = {"privacy.noise_multiplier": 1.0, "federation.num_clients": 10, "federation.clients_per_round": 6,
          "federation.rounds": 3, "data.partitioner": "dirichlet", "runtime.engine_chunk": 1}
    ref = run_experiment(tiny(**kw, **{"output.dir": str(tmp_path / "ref")}), progress=False)
    assert not ray.is_initialized()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        out = run_experiment(tiny(**kw, **{"output.dir": str(tmp_path / "ray"), "runtime.name": "ray",
                                           "runtime.workers": 2}), progress=False)
        assert not ray.is_initialized()  # the run disconnected what it connected
    finally:
        cluster.shutdown()
    log = (out / "run.log").read_text()
    assert "joining the Ray cluster at RAY_ADDRESS=" in log
    assert "ray: 2 engine worker(s), 1 CPU(s)" in log and "Ray nodes: 2" in log
    assert "engine workers on 2 Ray node(s) trained clients" in log
    for name in ("rounds.csv", "clients.csv"):
        assert rows(out, name) == rows(ref, name)
    a, b = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
