"""`fedsim sweep`: a resumable grid of ordinary runs.

Each cell is a normal run directory under the sweep directory, named by the values
that make it a cell. A cell whose summary.json says "finished" is never touched
again; anything else in its directory (a killed cell) is cleared and run anew. So the
same command, re-run, finishes an interrupted sweep.

Axes come from ``--grid KEY=V1,V2`` (any config key), ``--seeds``,
``--target-epsilons`` and a ``[sweep]`` table in the TOML:

    [sweep]
    out = "sweeps/privacy-utility"
    seeds = [0, 1, 2]
    [sweep.grid]
    "privacy.noise_multiplier" = [0.0, 0.5, 1.0, 2.0]
    "strategy.name" = ["fedavg", "fedprox"]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import tomllib

from fedsim.config import Config, load_config, parse_value
from fedsim.errors import ConfigError
from fedsim.results import is_finished, read_summary, write_json

TARGET_KEY = "privacy.target_epsilon"
MANIFEST = "sweep.json"


def parse_axis(text: str) -> tuple[str, list[Any]]:
    if "=" not in text:
        raise ConfigError(f"--grid: expected KEY=V1,V2,... (got {text!r})")
    key, values = text.split("=", 1)
    parsed = [parse_value(v.strip()) for v in values.split(",") if v.strip()]
    if not parsed:
        raise ConfigError(f"--grid: {key} has no values")
    return key.strip(), parsed


def sweep_table(config_path: str | None) -> dict:
    if not config_path or not Path(config_path).is_file():
        return {}
    table = tomllib.loads(Path(config_path).read_text()).get("sweep", {})
    allowed = {"grid", "seeds", "target_epsilons", "out"}
    unknown = set(table) - allowed
    if unknown:
        raise ConfigError(f"sweep.{sorted(unknown)[0]}: unknown key; allowed: {', '.join(sorted(allowed))}")
    return table


def build_axes(args: argparse.Namespace, table: dict) -> list[tuple[str, list[Any]]]:
    """Ordered axes: TOML grid, then --grid, then target epsilons, then seeds (CLI wins)."""
    axes: dict[str, list[Any]] = {}
    for key, values in table.get("grid", {}).items():
        axes[key] = values if isinstance(values, list) else [values]
    for text in args.grid:
        key, values = parse_axis(text)
        axes[key] = values
    targets = table.get("target_epsilons")
    if args.target_epsilons:
        targets = [parse_value(v) for v in args.target_epsilons.split(",")]
    if targets:
        axes[TARGET_KEY] = targets
    seeds = table.get("seeds")
    if args.seeds:
        seeds = [parse_value(v) for v in args.seeds.split(",")]
    if seeds:
        axes["seed"] = seeds
    return list(axes.items())


def _fmt(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(_fmt(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def cell_name(assignment: dict[str, Any]) -> str:
    return "__".join(f"{k}={_fmt(v)}" for k, v in assignment.items()).replace("/", "_") or "base"


def cell_overrides(assignment: dict[str, Any]) -> dict[str, Any]:
    """Config overrides of one cell.

    A key naming several config keys ("data.partitioner,data.alpha") takes one list per
    value and sets them together, for axes that are not a cross product (IID next to
    Dirichlet alphas). A target epsilon of 0 is the non-private reference cell: sigma = 0.
    """
    out: dict[str, Any] = {}
    for key, value in assignment.items():
        keys = [k.strip() for k in key.split(",")]
        values = value if len(keys) > 1 else [value]
        if len(keys) > 1 and (not isinstance(value, list) or len(value) != len(keys)):
            raise ConfigError(f"sweep.grid: {key!r} needs lists of {len(keys)} values (got {value!r})")
        out.update(zip(keys, values))
    if TARGET_KEY in out and not out[TARGET_KEY]:
        out["privacy.noise_multiplier"] = 0.0
    return out


def plan_cells(args: argparse.Namespace, base_overrides: dict) -> tuple[Path, list[tuple[str, Config]]]:
    table = sweep_table(args.config)
    axes = build_axes(args, table)
    base = load_config(args.config, base_overrides)
    out = Path(base_overrides.get("output.dir") or table.get("out") or f"sweeps/{base.name}")
    cells = []
    for values in itertools.product(*[v for _, v in axes]):
        assignment = dict(zip([k for k, _ in axes], values))
        name = cell_name(assignment)
        overrides = {**base_overrides, **cell_overrides(assignment), "output.dir": str(out / name)}
        cells.append((name, load_config(args.config, overrides)))  # validates every cell up front
    return out, cells


def _run_cell(cfg: Config, threads: int) -> dict:
    import torch

    from fedsim.logs import setup_logging
    from fedsim.run import run_experiment

    setup_logging(False)
    torch.set_num_threads(threads)
    out = run_experiment(cfg, progress=False)
    return read_summary(out) or {}


def run_sweep(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from fedsim.cli import overrides_from

    out, cells = plan_cells(args, overrides_from(args))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MANIFEST, {"cells": [name for name, _ in cells]})
    todo = []
    for name, cfg in cells:
        cell_dir = Path(cfg.output.dir)
        if is_finished(cell_dir):
            continue
        if cell_dir.exists():
            shutil.rmtree(cell_dir)  # an interrupted cell: start it afresh
        todo.append((name, cfg))
    if args.max_cells:
        todo = todo[: args.max_cells]
    print(f"sweep {out}: {len(cells)} cells, {len(cells) - len(todo)} already finished, running {len(todo)}")
    bar = tqdm(total=len(todo), unit="cell", dynamic_ncols=True)
    jobs = max(1, args.jobs)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    failures = []
    if jobs == 1:
        for name, cfg in todo:
            summary = _run_cell(cfg, threads)
            _tick(bar, name, summary)
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(_run_cell, cfg, threads): name for name, cfg in todo}
            for fut in as_completed(futures):
                try:
                    _tick(bar, futures[fut], fut.result())
                except Exception as exc:  # noqa: BLE001 - report and keep the other cells
                    failures.append(f"{futures[fut]}: {exc}")
    bar.close()
    for line in failures:
        print(f"failed cell {line}")
    finished = sum(is_finished(Path(cfg.output.dir)) for _, cfg in cells)
    print(f"{finished}/{len(cells)} cells finished; table: fedsim report {out}")
    return 1 if failures else 0


def _tick(bar, name: str, summary: dict) -> None:
    metric = summary.get("final_metric")
    bar.set_postfix_str(f"{name}: {summary.get('metric_name')}={metric:.4f}" if metric is not None else name)
    bar.update(1)


def read_manifest(sweep_dir: Path) -> list[str] | None:
    p = sweep_dir / MANIFEST
    return json.loads(p.read_text())["cells"] if p.is_file() else None
