"""Run outputs, written atomically as each round completes.

A killed run keeps every finished round: each file is rewritten whole into a
temporary file in the same directory and renamed over the old one, which is atomic
on POSIX, so a reader never sees half a file and a killed process never leaves one.
(No fsync: that would add power-loss durability at a cost of milliseconds per file
per round, which the runtime benchmark showed as a visible share of a round.)

Files are created with the user's umask (0644 under the usual 022), like any file a
program writes: the temporary file is opened with mode 0666 and the kernel applies the
umask, where `tempfile.mkstemp` would have made every result 0600.

`summary.json` is strict JSON: a value that JSON cannot hold (the infinite epsilon of a
run without DP, a NaN loss) is written as null; the summary says why next to it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedsim.errors import FedsimError

ROUNDS_CSV = "rounds.csv"
CLIENTS_CSV = "clients.csv"
SUMMARY_JSON = "summary.json"
CONFIG_TOML = "config.toml"
RUN_LOG = "run.log"
CHECKPOINT = "checkpoint.safetensors"
MODEL = "model.safetensors"
MODEL_BEST = "model-best.safetensors"
# What a run writes; `--overwrite` removes exactly these (and nothing else in the directory).
RUN_FILES = (ROUNDS_CSV, CLIENTS_CSV, SUMMARY_JSON, CONFIG_TOML, RUN_LOG, CHECKPOINT, MODEL, MODEL_BEST)

ROUND_COLUMNS = ["round", "metric_name", "metric", "test_loss", "val_metric", "val_loss", "train_loss",
                 "sample_epsilon_max", "sample_epsilon_mean", "user_epsilon",
                 "clients_trained", "wall_seconds"]
CLIENT_COLUMNS = ["partition_id", "num_examples", "participations", "sample_epsilon", "sample_rate"]


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class BackgroundWriter:
    """`write_atomic` on one background thread, in the order the writes were asked for.

    A run writes rounds.csv, clients.csv, summary.json and a checkpoint after every round:
    each a write and a rename, 0.2-0.9 ms on a local disk (about 10% of a small round under
    the vectorized engine) and far more on a network filesystem. The next round need not
    wait for them. What a file will hold is fixed when the write is asked for (the caller
    passes the finished text or bytes), one thread keeps them in order, and every file still
    appears whole, by rename. The first failure (a full disk) is raised in the caller's
    thread at the next `write` or at `flush`; `close` flushes, and Python's exit waits for
    the thread, so an exception or Ctrl-C loses nothing that was asked for.
    """

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedsim-writer")
        self._pending: list = []  # futures of writes not yet seen done, oldest first

    def write(self, path: str | Path, data: str | bytes) -> None:
        self._collect(wait=False)
        self._pending.append(self._pool.submit(write_atomic, path, data))

    def flush(self) -> None:
        """Wait for every write asked so far; raise the first that failed."""
        self._collect(wait=True)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._pool.shutdown(wait=True)

    def _collect(self, wait: bool) -> None:
        while self._pending and (wait or self._pending[0].done()):
            self._pending.pop(0).result()  # re-raises the write's exception here


def csv_text(columns: list[str], rows: list[dict[str, Any]], memo: dict[tuple, str] | None = None) -> str:
    """The rows as CSV with a header line, missing values empty, floats as ``repr`` (exact).

    `memo` (a dict the caller keeps between calls, updated here) maps a row's values to its
    line, so that rows unchanged since the last call are not formatted again: a run rewrites
    rounds.csv and clients.csv every round, and most of their rows are the same as before."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    lines = [buf.getvalue()]
    used: dict[tuple, str] = {}
    for row in rows:
        key = tuple(row.get(k) for k in columns)
        line = memo.get(key) if memo is not None else None
        if line is None:
            buf.seek(0)
            buf.truncate()
            writer.writerow([_fmt(v) for v in key])
            line = buf.getvalue()
        used[key] = line
        lines.append(line)
    if memo is not None:  # only this call's rows: the memo stays the size of the file
        memo.clear()
        memo.update(used)
    return "".join(lines)


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value) if value == value else "nan"
    return "" if value is None else value


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no Infinity or NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def json_text(data: dict) -> str:
    """Strict JSON (non-finite floats become null), sorted keys, indented."""
    return json.dumps(strict_json(data), indent=2, sort_keys=True, default=str, allow_nan=False) + "\n"


def write_json(path: str | Path, data: dict) -> None:
    """`json_text`, written atomically."""
    write_atomic(path, json_text(data))


def read_summary(run_dir: str | Path) -> dict | None:
    """A run's summary.json, or None if there is none (or it cannot be parsed).

    Reads both forms: today's strict JSON (null where a value is not finite: ``epsilon_max``
    of a run without DP, whose ``sample_level.accountant`` is null too) and the older files
    that wrote ``Infinity``.
    """
    p = Path(run_dir) / SUMMARY_JSON
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def is_finished(run_dir: str | Path) -> bool:
    summary = read_summary(run_dir)
    return bool(summary) and summary.get("status") == "finished"


# A run on another host whose summary has not been touched for this long is taken for dead
# (its process cannot be asked): the larger of 10 minutes and 5 rounds at its mean pace.
STALE_SECONDS = 600.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def run_state(run_dir: str | Path) -> str:
    """What a run directory holds: ``"finished"``, ``"running"`` (a live process writes it),
    ``"dead"`` (its summary says running but the process is gone: killed by SIGKILL, the OOM
    killer or a power cut), ``"failed"``, ``"interrupted"`` (SIGINT or SIGTERM), or
    ``"missing"`` (no summary.json).

    A run records its host, pid and ``updated_at`` (seconds since the epoch, rewritten every
    round) in summary.json. On the same host the pid decides; on another host the heartbeat
    does: no update for max(10 minutes, 5 mean rounds) means dead.
    """
    summary = read_summary(run_dir)
    if summary is None:
        return "missing"
    status = str(summary.get("status", "missing"))
    if status != "running":
        return status
    pid, host = summary.get("pid"), summary.get("host")
    if isinstance(pid, int) and host == socket.gethostname():
        return "running" if _alive(pid) else "dead"
    updated = summary.get("updated_at")
    if not isinstance(updated, (int, float)):
        return "dead"  # no heartbeat: written by a version that did not record one, or broken
    rounds = summary.get("rounds_completed") or 0
    pace = (summary.get("wall_seconds") or 0.0) / rounds if rounds else 0.0
    return "running" if time.time() - updated <= max(STALE_SECONDS, 5 * pace) else "dead"


def remove_run_files(run_dir: str | Path) -> None:
    """Delete a run's own files (`RUN_FILES`) from its directory: what ``--overwrite`` does."""
    if not Path(run_dir).is_dir():
        return
    for name in RUN_FILES:
        with contextlib.suppress(FileNotFoundError):
            (Path(run_dir) / name).unlink()


@contextlib.contextmanager
def run_log(out_dir: str | Path) -> Iterator[None]:
    """Everything fedsim logs at INFO and above also goes to <run>/run.log while inside.

    An exception that leaves the block is written there too, with its traceback (and a
    failing client's own traceback), but only to the file: the console keeps its one line.
    Nested uses for the same run (run_experiment around server_main in process) attach the
    file once, so no line is written twice.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = str((out_dir / RUN_LOG).resolve())
    logger = logging.getLogger("fedsim")
    if any(isinstance(h, logging.FileHandler) and h.baseFilename == path for h in logger.handlers):
        yield
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logger.addHandler(handler)
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield
    except BaseException as exc:
        _log_failure(logger, handler, exc)
        raise
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
        handler.close()


def _log_failure(logger: logging.Logger, handler: logging.Handler, exc: BaseException) -> None:
    if isinstance(exc, KeyboardInterrupt):
        text, level, info = f"run interrupted ({type(exc).__name__})", logging.WARNING, None
    elif isinstance(exc, FedsimError):  # bad input or a diverged run: its one line says it all
        text, level, info = f"run stopped: {exc}", logging.ERROR, None
    else:
        text, level, info = f"run failed: {type(exc).__name__}: {exc}", logging.ERROR, sys.exc_info()
        client_tb = getattr(exc, "client_traceback", None)
        if client_tb:
            text += "\nclient traceback:\n" + client_tb.rstrip()
    handler.handle(logger.makeRecord(logger.name, level, __file__, 0, text, (), info))
