"""`fedsim sweep`: a resumable grid of ordinary runs, as a library.

Each cell is a normal run directory under the sweep directory, named by the values
that make it a cell. A cell whose summary.json says "finished" is never touched
again; anything else in its directory (a killed cell) is cleared and run anew. So the
same call, repeated, finishes an interrupted sweep.

Axes come from ``grid`` (any config key), ``seeds``, ``target_epsilons`` and a
``[sweep]`` table in the TOML (the arguments win over the table):

    [sweep]
    out = "sweeps/privacy-utility"
    seeds = [0, 1, 2]
    [sweep.grid]
    "privacy.noise_multiplier" = [0.0, 0.5, 1.0, 2.0]
    "strategy.name" = ["fedavg", "fedprox"]

From a notebook::

    from fedsim.logs import setup_logging
    from fedsim.sweep import run_sweep
    setup_logging(False)  # the CLI's quiet logs; without it Flower logs every round
    cells = run_sweep("configs/quickstart.toml", grid={"privacy.noise_multiplier": [0.0, 1.0]},
                      seeds=[0, 1], overrides={"federation.rounds": 5})

This module knows nothing of argparse: `fedsim.cli` parses the command line and calls
`run_sweep` with plain arguments.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fedsim.config import (Config, config_from_dict, parse_value, read_experiment, read_toml, report_unused,
                           unused_keys)
from fedsim.errors import ConfigError
from fedsim.logs import setup_logging
from fedsim.results import is_finished, read_summary, write_json

TARGET_KEY = "privacy.target_epsilon"
MANIFEST = "sweep.json"
NOT_STARTED = "not started"


@dataclass
class Cell:
    """One planned run of a sweep: its name (= directory name), the axis values that make
    it a cell (one entry per config key) and its fully validated config."""

    name: str
    values: dict[str, Any]
    config: Config

    @property
    def dir(self) -> Path:
        return Path(self.config.output.dir)


def parse_axis(text: str) -> tuple[str, list[Any]]:
    """``KEY=V1,V2,...`` (the text of a --grid flag) -> (KEY, [V1, V2, ...]), each value
    parsed as a TOML literal."""
    if "=" not in text:
        raise ConfigError(f"--grid: expected KEY=V1,V2,... (got {text!r})")
    key, values = text.split("=", 1)
    parsed = [parse_value(v.strip()) for v in values.split(",") if v.strip()]
    if not parsed:
        raise ConfigError(f"--grid: {key} has no values")
    return key.strip(), parsed


def sweep_table(config_path: str | Path | None) -> dict:
    """The TOML's ``[sweep]`` table (empty without a file), its keys checked."""
    if not config_path:
        return {}
    table = read_toml(config_path).get("sweep", {})
    if not isinstance(table, dict):
        raise ConfigError(f"sweep: expected a [sweep] table, got {table!r}"[:200])
    allowed = {"grid", "seeds", "target_epsilons", "out"}
    unknown = set(table) - allowed
    if unknown:
        raise ConfigError(f"sweep.{sorted(unknown)[0]}: unknown key; allowed: {', '.join(sorted(allowed))}")
    if not isinstance(table.get("grid", {}), dict):
        raise ConfigError(f"sweep.grid: expected a [sweep.grid] table of key = [values], got {table['grid']!r}"[:200])
    if not isinstance(table.get("out", ""), str):
        raise ConfigError(f"sweep.out: expected a directory name, got {table['out']!r}"[:200])
    return table


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def build_axes(table: Mapping[str, Any], grid: Mapping[str, Any] | None = None,
               seeds: Sequence[int] | None = None,
               target_epsilons: Sequence[float] | None = None) -> list[tuple[str, list[Any]]]:
    """Ordered axes: the TOML grid, then `grid`, then target epsilons, then seeds.

    An argument replaces the TOML's value for the same key (keeping the TOML's position),
    so the command line or a notebook can narrow a shipped sweep without editing it.
    """
    axes: dict[str, list[Any]] = {}
    for key, values in table.get("grid", {}).items():
        axes[key] = _as_list(values)
    for key, values in (grid or {}).items():
        axes[str(key).strip()] = _as_list(values)
    targets = target_epsilons if target_epsilons else table.get("target_epsilons")
    if targets:
        axes[TARGET_KEY] = _as_list(targets)
    chosen_seeds = seeds if seeds else table.get("seeds")
    if chosen_seeds:
        axes["seed"] = _as_list(chosen_seeds)
    for key, values in axes.items():
        if not values:
            raise ConfigError(f"sweep.grid: {key} has no values")
    return list(axes.items())


def _fmt(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(_fmt(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def cell_name(assignment: dict[str, Any]) -> str:
    return "__".join(f"{k}={_fmt(v)}" for k, v in assignment.items()).replace("/", "_") or "base"


def _split(assignment: dict[str, Any]) -> dict[str, Any]:
    """One entry per config key: an axis naming several keys ("data.partitioner,data.alpha")
    takes one list per value and sets them together, for axes that are not a cross product
    (IID next to Dirichlet alphas)."""
    out: dict[str, Any] = {}
    for key, value in assignment.items():
        keys = [k.strip() for k in key.split(",")]
        values = value if len(keys) > 1 else [value]
        if len(keys) > 1 and (not isinstance(value, list) or len(value) != len(keys)):
            raise ConfigError(f"sweep.grid: {key!r} needs lists of {len(keys)} values (got {value!r})")
        out.update(zip(keys, values))
    return out


def cell_overrides(assignment: dict[str, Any]) -> dict[str, Any]:
    """Config overrides of one cell. A target epsilon of 0 is the non-private reference
    cell: sigma = 0."""
    out = _split(assignment)
    if TARGET_KEY in out and not out[TARGET_KEY]:
        out["privacy.noise_multiplier"] = 0.0
    return out


def _plan(config: str | Path | None, grid: Mapping[str, Any] | None, seeds: Sequence[int] | None,
          target_epsilons: Sequence[float] | None, overrides: Mapping[str, Any] | None,
          out: str | Path | None, strict: bool = False) -> tuple[Path, list[Cell]]:
    """The sweep directory and every cell, each config validated up front (a typo in the
    last cell fails before the first one trains). A key that does nothing in every cell is
    reported once (a warning, or an error under `strict`); one that some cell reads is not."""
    base_overrides = dict(overrides or {})
    if out is not None:
        base_overrides["output.dir"] = str(out)
    table = sweep_table(config)
    axes = build_axes(table, grid, seeds, target_epsilons)
    base = config_from_dict(read_experiment(config, base_overrides))
    sweep_dir = Path(base_overrides.get("output.dir") or table.get("out") or f"sweeps/{base.name}")
    cells = []
    unused: dict[str, str] | None = None
    for values in itertools.product(*[v for _, v in axes]):
        assignment = dict(zip([k for k, _ in axes], values))
        name = cell_name(assignment)
        cell_cfg = {**base_overrides, **cell_overrides(assignment), "output.dir": str(sweep_dir / name)}
        raw = read_experiment(config, cell_cfg)
        cell = Cell(name, _split(assignment), config_from_dict(raw))
        cell_unused = unused_keys(raw, cell.config)
        unused = cell_unused if unused is None else {k: v for k, v in unused.items() if k in cell_unused}
        cells.append(cell)
    report_unused(unused or {}, strict)
    return sweep_dir, cells


def _status(cell_dir: Path) -> str:
    summary = read_summary(cell_dir)
    if summary:
        return str(summary.get("status", "unknown"))
    return "no summary" if cell_dir.exists() else NOT_STARTED


def plan_sweep(config: str | Path | None, *, grid: Mapping[str, Any] | None = None,
               seeds: Sequence[int] | None = None, target_epsilons: Sequence[float] | None = None,
               overrides: Mapping[str, Any] | None = None, out: str | Path | None = None,
               strict: bool = False) -> pd.DataFrame:
    """The cells `run_sweep` would run, without running anything.

    One row per cell: ``cell`` (its name), ``dir``, one column per axis key, ``status`` (what
    its directory holds now: "finished", "running", "failed", "not started", ...) and
    ``config`` (the validated `Config`). ``frame.attrs["out"]`` is the sweep directory.
    Raises `ConfigError` on a bad key or value in any cell, and under `strict` on a key that
    does nothing in every cell.
    """
    sweep_dir, cells = _plan(config, grid, seeds, target_epsilons, overrides, out, strict)
    frame = pd.DataFrame([{"cell": c.name, "dir": str(c.dir), **c.values, "status": _status(c.dir),
                           "config": c.config} for c in cells])
    frame.attrs["out"] = str(sweep_dir)
    return frame


def _run_cell(cfg: Config, threads: int) -> dict:
    import torch

    from fedsim.run import run_experiment

    torch.set_num_threads(threads)
    out = run_experiment(cfg, progress=False)
    return read_summary(out) or {}


def _result_row(cell: Cell, ran: bool, error: str | None) -> dict[str, Any]:
    """What a notebook wants of one cell, read back from its summary.json."""
    summary = read_summary(cell.dir) or {}
    sample = summary.get("sample_level") or {}
    user = summary.get("user_level") or {}
    label = summary.get("label_level") or {}
    status = "failed" if error else _status(cell.dir)
    if sample:
        sample_eps = sample.get("epsilon_max") if sample.get("accountant") else math.inf
    else:
        sample_eps = math.nan
    return {"cell": cell.name, "dir": str(cell.dir), **cell.values, "status": status, "ran": ran,
            "metric_name": summary.get("metric_name"), "final_metric": summary.get("final_metric"),
            "best_metric": summary.get("best_metric"), "best_round": summary.get("best_round"),
            "rounds_completed": summary.get("rounds_completed"),
            "noise_multiplier": sample.get("noise_multiplier"), "sample_epsilon": sample_eps,
            "user_epsilon": user.get("epsilon"), "label_epsilon": label.get("epsilon"),
            "delta": sample.get("delta"), "wall_seconds": summary.get("wall_seconds"), "error": error}


def run_sweep(config: str | Path | None, *, grid: Mapping[str, Any] | None = None,
              seeds: Sequence[int] | None = None, target_epsilons: Sequence[float] | None = None,
              overrides: Mapping[str, Any] | None = None, jobs: int = 1, max_cells: int = 0,
              out: str | Path | None = None, progress: bool = True, strict: bool = False) -> pd.DataFrame:
    """Run every cell of a grid that is not finished yet; returns one row per cell.

    config: an experiment TOML (its ``[sweep]`` table gives default axes and ``out``) or None
    for the built-in defaults. grid: config key -> values (an axis each; "a.x,a.y" sets two
    keys together from lists). seeds, target_epsilons: shorthand axes (target 0 is the
    non-private reference). overrides: config key -> value for every cell. jobs: cells run
    in parallel processes. max_cells: run at most this many new cells (0 = all). out: the
    sweep directory (default: ``overrides["output.dir"]``, then the table's ``out``, then
    ``sweeps/<name>``). progress: print the plan line and show a progress bar. strict: refuse
    a key that does nothing in every cell (otherwise a warning names it).

    Columns: ``cell``, ``dir``, the axis keys, ``status`` ("finished", "failed", "not
    started" for cells beyond max_cells, ...), ``ran`` (run by this call), the summary's
    metric and epsilons, and ``error`` (a parallel cell's exception). ``frame.attrs["out"]``
    is the sweep directory. With jobs = 1 a failing cell raises (as `run_experiment` does);
    with jobs > 1 the others go on and the failure is in its row.

    With jobs = 1 the cells run in this process under the caller's logging and warnings
    settings (`fedsim.logs.setup_logging(False)` gives the CLI's quiet ones); worker
    processes (jobs > 1) are set up quiet.
    """
    from tqdm.auto import tqdm

    sweep_dir, cells = _plan(config, grid, seeds, target_epsilons, overrides, out, strict)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json(sweep_dir / MANIFEST, {"cells": [c.name for c in cells]})
    todo = []
    for cell in cells:
        if is_finished(cell.dir):
            continue
        if cell.dir.exists():
            shutil.rmtree(cell.dir)  # an interrupted cell: start it afresh
        todo.append(cell)
    if max_cells:
        todo = todo[:max_cells]
    if progress:
        print(f"sweep {sweep_dir}: {len(cells)} cells, {len(cells) - len(todo)} already finished, "
              f"running {len(todo)}")
    bar = tqdm(total=len(todo), unit="cell", dynamic_ncols=True, disable=not progress)
    jobs = max(1, jobs)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    errors: dict[str, str] = {}
    if jobs == 1:
        try:
            for cell in todo:
                summary = _run_cell(cell.config, threads)
                _tick(bar, cell.name, summary)
        finally:  # end the bar's line, so that an error is a line of its own
            bar.close()
    else:
        # Each worker is set up once, as quiet as the CLI (a spawned worker inherits nothing), so a
        # warning shown "once" is shown once per worker, not once per cell.
        with ProcessPoolExecutor(max_workers=jobs, initializer=setup_logging, initargs=(False,)) as pool:
            futures = {pool.submit(_run_cell, cell.config, threads): cell.name for cell in todo}
            for fut in as_completed(futures):
                try:
                    _tick(bar, futures[fut], fut.result())
                except Exception as exc:  # noqa: BLE001 - report and keep the other cells
                    errors[futures[fut]] = str(exc)
    bar.close()
    ran = {cell.name for cell in todo}
    frame = pd.DataFrame([_result_row(c, c.name in ran, errors.get(c.name)) for c in cells])
    frame.attrs["out"] = str(sweep_dir)
    return frame


def _tick(bar, name: str, summary: dict) -> None:
    metric = summary.get("final_metric")
    bar.set_postfix_str(f"{name}: {summary.get('metric_name')}={metric:.4f}" if metric is not None else name)
    bar.update(1)


def read_manifest(sweep_dir: Path) -> list[str] | None:
    p = sweep_dir / MANIFEST
    return json.loads(p.read_text())["cells"] if p.is_file() else None
