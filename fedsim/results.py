"""Run outputs, written atomically as each round completes.

A killed run keeps every finished round: each file is rewritten whole into a
temporary file in the same directory and renamed over the old one, which is atomic
on POSIX, so a reader never sees half a file and a killed process never leaves one.
(No fsync: that would add power-loss durability at a cost of milliseconds per file
per round, which the runtime benchmark showed as a visible share of a round.)
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROUNDS_CSV = "rounds.csv"
CLIENTS_CSV = "clients.csv"
SUMMARY_JSON = "summary.json"
CONFIG_TOML = "config.toml"

ROUND_COLUMNS = ["round", "metric_name", "metric", "test_loss", "train_loss",
                 "sample_epsilon_max", "sample_epsilon_mean", "user_epsilon",
                 "clients_trained", "wall_seconds"]
CLIENT_COLUMNS = ["partition_id", "num_examples", "participations", "sample_epsilon", "sample_rate"]


def write_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def csv_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in columns})
    return buf.getvalue()


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value) if value == value else "nan"
    return "" if value is None else value


def write_json(path: str | Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_summary(run_dir: str | Path) -> dict | None:
    p = Path(run_dir) / SUMMARY_JSON
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def is_finished(run_dir: str | Path) -> bool:
    summary = read_summary(run_dir)
    return bool(summary) and summary.get("status") == "finished"


@contextlib.contextmanager
def run_log(out_dir: str | Path) -> Iterator[None]:
    """Everything fedsim logs at INFO and above also goes to <run>/run.log while inside.

    Nested uses for the same run (run_experiment around server_main in process) attach the
    file once, so no line is written twice.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = str((out_dir / "run.log").resolve())
    logger = logging.getLogger("fedsim")
    if any(isinstance(h, logging.FileHandler) and h.baseFilename == path for h in logger.handlers):
        yield
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
