"""``runtime.torch_threads``: a run uses the count it resolves to and leaves the caller's as
it found it (a sweep cell too); the vectorized engine gives the same bits at any count."""

from __future__ import annotations

import csv

import pytest
import torch

from fedsim.run import run_experiment
from fedsim.threads import auto_threads, run_threads, torch_threads


def rows(out, name):
    return [{k: v for k, v in row.items() if k != "wall_seconds"} for row in csv.DictReader((out / name).open())]


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_auto_rule_and_explicit_count(tiny, restore_threads):
    assert auto_threads(16) == 1 and auto_threads(1) == 1  # CPU: 1 won every measured workload
    assert auto_threads(16, cuda=True) == 4 and auto_threads(2, cuda=True) == 2
    assert run_threads(tiny(**{"runtime.torch_threads": 3}).runtime) == 3
    torch.set_num_threads(1)  # what a sweep gives each of its processes: auto stays within it
    assert run_threads(tiny(**{"runtime.device": "cpu"}).runtime) == 1


def test_context_puts_the_count_back(restore_threads):
    torch.set_num_threads(2)
    with torch_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("a failed run")
    assert torch.get_num_threads() == 2


def test_run_applies_threads_and_restores_them(tiny, tmp_path, restore_threads):
    torch.set_num_threads(2)
    out = run_experiment(tiny(**{"runtime.torch_threads": 1, "output.dir": str(tmp_path / "one")}),
                         progress=False)
    assert torch.get_num_threads() == 2
    assert "torch: 1 intra-op thread(s) in this process (runtime.torch_threads = 1)" in (out / "run.log").read_text()


def test_sweep_cell_restores_the_thread_count(tiny, tmp_path, restore_threads, monkeypatch):
    """A cell used to leave its thread count behind in the sweep's worker process."""
    import fedsim.run
    from fedsim import sweep

    seen = []
    monkeypatch.setattr(fedsim.run, "run_experiment", lambda *a, **k: seen.append(torch.get_num_threads())
                        or tmp_path)
    cell = type("Cell", (), {"record_path": tmp_path / "cell.json", "name": "c", "values": {}, "identity": {},
                             "config": None})()
    monkeypatch.setattr(sweep, "config_hash", lambda identity: "h")
    torch.set_num_threads(2)
    sweep._run_cell(cell, 1)
    assert seen == [1] and torch.get_num_threads() == 2


def test_vectorized_engine_same_bits_at_one_and_two_threads(tiny, tmp_path, restore_threads):
    """On small layers (digits, MLP(64)) the vectorized engine's rounds agree to the bit across
    1 and 2 threads. Measured with benchmarks/threads.py, they do not on an MLP [256, 256]
    (torch splits larger matmuls' sums by thread) nor under Opacus: docs/engines.md, "Threads"."""
    kw = {"privacy.noise_multiplier": 1.0, "runtime.engine": "vectorized", "model.hidden": [64]}
    a = run_experiment(tiny(**kw, **{"runtime.torch_threads": 1, "output.dir": str(tmp_path / "a")}), progress=False)
    b = run_experiment(tiny(**kw, **{"runtime.torch_threads": 2, "output.dir": str(tmp_path / "b")}), progress=False)
    assert rows(a, "rounds.csv") == rows(b, "rounds.csv")
    assert rows(a, "clients.csv") == rows(b, "clients.csv")


def test_a_clientapp_process_takes_the_runs_thread_rule(tiny):
    """A deployed ClientApp process starts at torch's default (a thread per core) and must
    train at the count its simulation used: `apply_run_threads` sets it, sets it again when
    something else changed it since, and follows an explicit runtime.torch_threads."""
    import torch

    from fedsim.threads import apply_run_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert apply_run_threads(tiny(**{"runtime.device": "cpu"}).runtime) == 1 == torch.get_num_threads()
        torch.set_num_threads(2)  # changed behind its back: the next message puts the rule back
        assert apply_run_threads(tiny(**{"runtime.device": "cpu"}).runtime) == 1 == torch.get_num_threads()
        assert apply_run_threads(tiny(**{"runtime.torch_threads": 3}).runtime) == 3 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
