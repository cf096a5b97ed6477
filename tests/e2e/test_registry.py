"""A user's own algorithm through the registry alone: two files in a package of their own and
one `register_algorithm` call, no change to fedsim. Here a user's own server momentum (Flower's
`FedAvgM`, not fedsim's built-in ``fedavgm``) under the name ``mymomentum``, with a
``[strategy.mymomentum]`` table."""

from __future__ import annotations

import csv
import importlib
import json
import sys
import textwrap

import pytest

from fedsim import algorithms
from fedsim.algorithms import Algorithm, get_algorithm, register_algorithm
from fedsim.config import load_config
from fedsim.errors import ConfigError
from fedsim.run import run_experiment

SERVER = '''
"""Server half: Flower's FedAvgM, its momentum from [strategy.mymomentum]."""
from dataclasses import dataclass

from flwr.serverapp.strategy import FedAvgM

from fedsim.config import param


@dataclass(frozen=True)
class Params:
    server_momentum: float = param(0.9, "server momentum beta", lo=0.0, hi=1.0)


def build(params, cfg, fedavg_kwargs):
    return FedAvgM(**fedavg_kwargs, server_momentum=params.server_momentum)
'''

CLIENT = '''
"""Client half: FedAvg's local SGD."""
from fedsim.algorithms import ClientRule

RULE = ClientRule()
'''


@pytest.fixture
def mymomentum(tmp_path, monkeypatch):
    """The toy algorithm, importable from tmp_path and registered for this test only."""
    package = tmp_path / "toyalgo"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "toyalgo_server.py").write_text(textwrap.dedent(SERVER))
    (package / "toyalgo_client.py").write_text(textwrap.dedent(CLIENT))
    monkeypatch.syspath_prepend(str(tmp_path))
    server = importlib.import_module("toyalgo.toyalgo_server")
    client = importlib.import_module("toyalgo.toyalgo_client")
    get_algorithm("fedavg")  # the built-ins first, so the toy's registration cannot be overwritten
    algorithm = register_algorithm(Algorithm("mymomentum", server.Params, server.build, client.RULE,
                                             summary="my server momentum"))
    try:
        yield algorithm
    finally:
        algorithms._REGISTRY.pop("mymomentum", None)
        for name in ("toyalgo.toyalgo_server", "toyalgo.toyalgo_client", "toyalgo"):
            sys.modules.pop(name, None)


def rounds(out):
    return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in csv.DictReader((out / "rounds.csv").open())]


def test_a_registered_algorithm_runs_from_its_own_table(mymomentum, tiny, tmp_path):
    kw = {"federation.rounds": 3}
    fedavg = run_experiment(tiny(**kw, **{"output.dir": str(tmp_path / "fedavg")}), progress=False)

    def run(momentum, name):
        cfg = tiny(**kw, **{"strategy.name": "mymomentum", "strategy.mymomentum.server_momentum": momentum,
                            "output.dir": str(tmp_path / name)})
        assert cfg.strategy.params == mymomentum.params(server_momentum=momentum)
        return run_experiment(cfg, progress=False)

    zero, half = run(0.0, "m0"), run(0.5, "m05")
    # momentum 0 (and server lr 1) is FedAvg, number for number
    assert rounds(zero) == rounds(fedavg)
    # momentum 0.5 is not: round 1 is the same (the momentum buffer starts at the first
    # pseudo-gradient; x - (x - avg) is avg up to rounding), later rounds add half the previous step
    first, first_fedavg = rounds(half)[0], rounds(fedavg)[0]
    assert float(first["test_loss"]) == pytest.approx(float(first_fedavg["test_loss"]), rel=1e-5)
    assert first["train_loss"] == first_fedavg["train_loss"]
    for later, later_fedavg in zip(rounds(half)[1:], rounds(fedavg)[1:]):
        assert later["test_loss"] != later_fedavg["test_loss"]
    # the run directory records the algorithm and its table
    resolved = load_config(half / "config.toml")
    assert resolved.strategy.name == "mymomentum" and resolved.strategy.params.server_momentum == 0.5
    assert "[strategy.mymomentum]" in (half / "config.toml").read_text()
    assert json.loads((half / "summary.json").read_text())["strategy"] == "mymomentum"


def test_a_registered_table_is_validated_like_the_built_ins(mymomentum, tiny):
    with pytest.raises(ConfigError, match=r"strategy\.mymomentum\.server_momentum: must be <= 1\.0"):
        tiny(**{"strategy.name": "mymomentum", "strategy.mymomentum.server_momentum": 1.5})
    with pytest.raises(ConfigError, match=r"strategy\.mymomentum\.nesterov: unknown key"):
        tiny(**{"strategy.name": "mymomentum", "strategy.mymomentum.nesterov": True})
    assert tiny(**{"strategy.name": "mymomentum"}).strategy.params.server_momentum == 0.9  # the default
    with pytest.raises(ValueError, match="registered already"):
        register_algorithm(mymomentum)


def test_unregistered_names_are_refused(tiny):
    with pytest.raises(ConfigError, match="strategy.name: must be one of"):
        tiny(**{"strategy.name": "mymomentum"})
    with pytest.raises(KeyError, match="no algorithm 'mymomentum'; registered: fedavg, fedprox"):
        get_algorithm("mymomentum")
