"""`fedsim.run.frozen_heap`: the in-process rounds run with the heap of their start frozen
(out of the collector's full collections), and the process gets its heap back afterwards."""

from __future__ import annotations

import gc

import fedsim.run as run


def test_frozen_during_and_given_back_after_also_when_nested():
    assert gc.get_freeze_count() == 0
    with run.frozen_heap():
        frozen = gc.get_freeze_count()
        assert frozen > 0
        with run.frozen_heap():  # a second run in this process (a sweep's threads) joins the first
            assert gc.get_freeze_count() >= frozen
        assert gc.get_freeze_count() == frozen  # the inner end does not unfreeze the outer run's heap
    assert gc.get_freeze_count() == 0


def test_a_heap_frozen_by_someone_else_or_a_disabled_collector_is_left_alone():
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        with run.frozen_heap():
            pass
        assert gc.get_freeze_count() == before  # not unfrozen: it was not ours
    finally:
        gc.unfreeze()
    gc.disable()
    try:
        with run.frozen_heap():
            assert gc.get_freeze_count() == 0
    finally:
        gc.enable()


def test_an_inprocess_run_trains_with_the_heap_frozen(tiny, tmp_path, monkeypatch):
    seen = []
    real = run.server_main
    monkeypatch.setattr(run, "server_main", lambda *a, **k: seen.append(gc.get_freeze_count()) or real(*a, **k))
    run.run_experiment(tiny(**{"output.dir": str(tmp_path / "r"), "federation.rounds": 1}), progress=False)
    assert seen and seen[0] > 0 and gc.get_freeze_count() == 0
