"""Shared fixtures: tiny, fast experiment configs and a CLI runner."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from fedsim.config import Config, load_config  # noqa: E402


def tiny_config(tmp_path, **overrides) -> Config:
    """digits, MLP(32), 6 clients, 3 per round, 2 rounds: about a second per run."""
    base = {"name": "tiny", "model.hidden": [32], "federation.num_clients": 6,
            "federation.clients_per_round": 3, "federation.rounds": 2, "client.batch_size": 32,
            "client.lr": 0.3, "output.dir": str(tmp_path / "run")}
    base.update(overrides)
    return load_config(None, base)


@pytest.fixture
def tiny(tmp_path):
    return lambda **kw: tiny_config(tmp_path, **kw)


@pytest.fixture
def cli(capsys):
    """Run the fedsim CLI in-process: returns (exit code, stdout, stderr)."""
    from fedsim.cli import main

    def run(*argv: str):
        code = main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err
    return run
