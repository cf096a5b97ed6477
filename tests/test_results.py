"""Run outputs as files: the modes they are created with, strict JSON, and telling a live run
from a dead one (`fedsim.results`)."""

from __future__ import annotations

import json
import math
import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from fedsim.results import read_summary, run_state, write_atomic, write_json


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring it after."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_results_are_created_with_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    write_atomic(tmp_path / "a.csv", "x\n")
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert stat.S_IMODE((tmp_path / "a.csv").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == mode
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.bin"]  # no temporary file left


def test_summary_json_is_strict(tmp_path):
    write_json(tmp_path / "summary.json", {"eps": math.inf, "loss": math.nan, "nested": [{"x": -math.inf}],
                                           "ok": 1.5})

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    data = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    assert data == {"eps": None, "loss": None, "nested": [{"x": None}], "ok": 1.5}


def test_read_summary_still_reads_older_infinity(tmp_path):
    (tmp_path / "summary.json").write_text('{"status": "finished", "sample_level": {"epsilon_max": Infinity}}')
    assert read_summary(tmp_path)["sample_level"]["epsilon_max"] == math.inf


def _summary(run, **fields):
    run.mkdir(exist_ok=True)
    write_json(run / "summary.json", fields)
    return run


def test_run_state_from_status_pid_and_heartbeat(tmp_path):
    host = socket.gethostname()
    assert run_state(tmp_path / "none") == "missing"
    for status in ("finished", "failed", "interrupted"):
        assert run_state(_summary(tmp_path / status, status=status)) == status
    # a live process on this host: this one
    assert run_state(_summary(tmp_path / "live", status="running", pid=os.getpid(), host=host,
                              updated_at=time.time() - 86400)) == "running"
    # a process that has exited (and been reaped): dead, however fresh its heartbeat
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert run_state(_summary(tmp_path / "gone", status="running", pid=gone.pid, host=host,
                              updated_at=time.time())) == "dead"
    # another host: the heartbeat decides (no update for max(10 min, 5 mean rounds))
    other = {"status": "running", "pid": 1, "host": host + "-elsewhere"}
    assert run_state(_summary(tmp_path / "fresh", **other, updated_at=time.time() - 60)) == "running"
    assert run_state(_summary(tmp_path / "stale", **other, updated_at=time.time() - 3600)) == "dead"
    slow = {**other, "updated_at": time.time() - 3600, "rounds_completed": 2, "wall_seconds": 2 * 1000.0}
    assert run_state(_summary(tmp_path / "slow", **slow)) == "running"  # 5 rounds of 1000 s not yet over
    # an older summary with no pid or heartbeat that says running: nobody is writing it
    assert run_state(_summary(tmp_path / "old", status="running")) == "dead"


def test_csv_text_with_a_line_memo_equals_csv_dictwriter_round_after_round():
    """rounds.csv and clients.csv are rewritten every round with a memo of formatted lines:
    the text must be what csv.DictWriter gives for the same rows, with rows changed, added,
    removed and repeated between calls, and the memo must not grow past the last file."""
    import csv
    import io

    from fedsim.results import _fmt, csv_text

    def reference(columns, rows):
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k)) for k in columns})
        return buf.getvalue()

    columns = ["id", "value", "note"]
    memo: dict = {}
    rows = [{"id": i, "value": 0.1 * i, "note": None} for i in range(5)]
    for step in range(4):
        assert csv_text(columns, rows, memo) == reference(columns, rows)
        assert len(memo) == len({tuple(r.get(k) for k in columns) for r in rows})
        rows[step]["value"] = float("nan") if step % 2 else 1 / 3  # changed in place, as a client's record is
        rows.append({"id": 10 + step, "value": float("inf"), "note": 'a "quoted", note'})
        rows.pop(0) if step == 2 else None


def test_background_writer_keeps_order_and_raises_the_first_failure(tmp_path):
    """A run's per-round files go through one writer thread: the last write asked for a path
    is what the path holds, every file is whole, and a failed write (here: a parent that is
    a file) is raised in the caller's thread, at the next write or at flush, never lost."""
    from fedsim.results import BackgroundWriter

    writer = BackgroundWriter()
    for i in range(200):
        writer.write(tmp_path / "rounds.csv", "round\n" + "".join(f"{r}\n" for r in range(i + 1)))
        writer.write(tmp_path / f"part-{i % 7}.bin", bytes([i % 256]) * (i + 1))
    writer.flush()
    assert (tmp_path / "rounds.csv").read_text().splitlines()[-1] == "199"
    for k in range(7):
        last = max(i for i in range(200) if i % 7 == k)
        assert (tmp_path / f"part-{k}.bin").read_bytes() == bytes([last % 256]) * (last + 1)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    (tmp_path / "not-a-dir").write_text("x")
    writer.write(tmp_path / "not-a-dir" / "summary.json", "{}")
    with pytest.raises(OSError):
        writer.flush()
    writer.write(tmp_path / "after.txt", "fine")  # the writer goes on after a reported failure
    writer.close()
    assert (tmp_path / "after.txt").read_text() == "fine"
