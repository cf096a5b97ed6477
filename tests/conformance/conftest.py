"""The experiment each registered algorithm is checked in, found without a list of algorithms.

An algorithm is checked in the first *world* below that its config and its
`Algorithm.check` accept (`fedsim.run.prepare`, the same validation a run does): FedAvg in
``dp-sgd``, the LoRA strategies in ``lora``, bags (which refuses DP-SGD) in ``no-dp-sgd``.
A new algorithm needs nothing here unless none of the worlds suits it (another model,
another kind of data): then it adds one world, small enough for the suite's time budget
(docs/architecture.md, "Add an algorithm").
"""

from __future__ import annotations

import functools
import tempfile

import pytest

from fedsim.algorithms import algorithm_names
from fedsim.config import Config, load_config
from fedsim.errors import ConfigError

# digits, a one-layer MLP, 6 clients, 3 a round, 2 rounds: about a second a run
BASE = {"name": "conformance", "model.hidden": [16], "federation.num_clients": 6,
        "federation.clients_per_round": 3, "federation.rounds": 2, "client.batch_size": 16,
        "client.lr": 0.3}

WORLDS: dict[str, dict] = {
    "dp-sgd": {"privacy.noise_multiplier": 1.0},
    "lora": {"model.name": "lora-mlp", "data.classes": [5, 6, 7, 8, 9], "model.pretrain_classes": [0, 1, 2, 3, 4],
             "model.pretrain_epochs": 2, "model.lora_rank": 4, "privacy.noise_multiplier": 1.0},
    "no-dp-sgd": {"privacy.noise_multiplier": 0.0},
}

ALGORITHMS = algorithm_names()  # collected from the registry: every built-in, no list to edit


@functools.lru_cache(maxsize=None)
def world_of(name: str) -> str:
    """The first world in which algorithm `name` passes validation with data."""
    from fedsim.run import prepare

    refusals = []
    with tempfile.TemporaryDirectory() as out:
        for world, settings in WORLDS.items():
            try:
                prepare(load_config(None, {**BASE, **settings, "strategy.name": name, "output.dir": out}))
            except ConfigError as exc:
                refusals.append(f"{world}: {exc}")
                continue
            return world
    raise AssertionError(f"no conformance world accepts {name!r}; add one to tests/conformance/conftest.py "
                         f"({'; '.join(refusals)})")


@pytest.fixture
def conformance_config(tmp_path):
    """``make(name, **overrides)``: algorithm `name`'s config in its world, writing under tmp_path."""
    def make(name: str, **overrides) -> Config:
        settings = {**BASE, **WORLDS[world_of(name)], "strategy.name": name,
                    "output.dir": str(tmp_path / "run"), **overrides}
        return load_config(None, settings)
    return make
