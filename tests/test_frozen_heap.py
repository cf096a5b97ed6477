"""`fedsim.run.frozen_heap`: the in-process rounds run with the heap of their start frozen
(out of the collector's full collections), and the process gets its heap back afterwards."""

from __future__ import annotations

import gc

import fedsim.run as run


def _spy(monkeypatch) -> list[str]:
    """gc.freeze and gc.unfreeze, recorded as they are called (and still done). The frozen
    count itself is no witness: objects freed by reference counting while frozen leave it."""
    calls: list[str] = []
    for name in ("freeze", "unfreeze"):
        real = getattr(gc, name)
        monkeypatch.setattr(gc, name, lambda real=real, name=name: calls.append(name) or real())
    return calls


def test_frozen_during_and_given_back_after_also_when_nested(monkeypatch):
    assert gc.get_freeze_count() == 0
    calls = _spy(monkeypatch)
    with run.frozen_heap():
        assert gc.get_freeze_count() > 0
        with run.frozen_heap():  # a second run in this process (a sweep's threads) joins the first
            pass
        assert calls == ["freeze"]  # the inner end does not unfreeze the outer run's heap
        assert gc.get_freeze_count() > 0
    assert calls == ["freeze", "unfreeze"] and gc.get_freeze_count() == 0


def test_a_heap_frozen_by_someone_else_or_a_disabled_collector_is_left_alone(monkeypatch):
    gc.freeze()
    try:
        calls = _spy(monkeypatch)
        with run.frozen_heap():
            pass
        assert calls == []  # neither frozen again nor unfrozen: that heap was not ours
        monkeypatch.undo()
    finally:
        gc.unfreeze()
    calls = _spy(monkeypatch)
    gc.disable()
    try:
        with run.frozen_heap():
            assert gc.get_freeze_count() == 0
    finally:
        gc.enable()
    assert calls == []


def test_an_inprocess_run_trains_with_the_heap_frozen(tiny, tmp_path, monkeypatch):
    seen = []
    real = run.server_main
    monkeypatch.setattr(run, "server_main", lambda *a, **k: seen.append(gc.get_freeze_count()) or real(*a, **k))
    run.run_experiment(tiny(**{"output.dir": str(tmp_path / "r"), "federation.rounds": 1}), progress=False)
    assert seen and seen[0] > 0 and gc.get_freeze_count() == 0
