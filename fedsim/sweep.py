"""`fedsim sweep`: a resumable grid of ordinary runs, as a library.

Each cell is a normal run directory under the sweep directory, named by the values
that make it a cell (floats exactly: ``0.1000001`` is not ``0.1``; names that would still
collide get a suffix from the cell's config hash). A cell's identity is its name AND its
resolved config: ``.cells/<name>.json`` records the config a cell was run with, and a
finished cell is reused only when the planned config is the same; a changed config
(``--rounds 6`` over a 5-round sweep) is refused with the keys that differ, before any work.
Anything unfinished in a cell's directory (a killed cell) is cleared and run anew. So the
same call, repeated, finishes an interrupted sweep.

Two sweeps on one directory share the work: a process claims a cell with
``.cells/<name>.lock`` (created O_CREAT|O_EXCL, holding its pid and host) before running
it, and a cell claimed by a live process is left to it; a lock whose process has died is
reclaimed. A failing cell never stops the others: with ``jobs = 1`` as with ``jobs > 1``
it is reported in its row (``error``) and the CLI exits 1.

Axes come from ``grid`` (any config key), ``seeds``, ``target_epsilons`` and a
``[sweep]`` table in the TOML (the arguments win over the table). A scalar where a list of
values is expected is one value (an axis of length 1):

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

import hashlib
import itertools
import json
import math
import multiprocessing
import os
import signal
import socket
import sys
import time
import tomllib
import traceback
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fedsim.config import (BEFORE_THE_KEY, Config, config_from_dict, config_to_dict, flatten, load_config, parse_value,
                           read_experiment, read_toml, report_unused, unused_keys)
from fedsim.errors import ClientFailure, ConfigError, FedsimError
from fedsim.logs import setup_logging
from fedsim.results import CONFIG_TOML, is_finished, read_summary, write_atomic, write_json
from fedsim.watchdog import die_with

TARGET_KEY = "privacy.target_epsilon"
MANIFEST = "sweep.json"
CELLS_DIR = ".cells"  # per cell: <name>.json (the config it was run with) and <name>.lock (who runs it)
NOT_STARTED = "not started"
CONFLICT = "conflict"
ERROR_FILE = "sweep-error.txt"
# Keys that cannot change a finished result (where it is written, resources, a timeout):
# left out of a cell's identity, so a sweep can be resumed with more CPUs or a longer timeout.
NOT_IDENTITY = ("output.dir", "runtime.num_cpus", "runtime.num_gpus", "runtime.round_timeout")
MAX_NAME_BYTES = 200  # below the usual 255-byte limit of a file name, with room for ".json"/".lock"
STALE_EMPTY_LOCK_SECONDS = 60.0


@dataclass
class Cell:
    """One planned run of a sweep: its name (= directory name), the axis values that make
    it a cell (one entry per config key) and its fully validated config."""

    name: str
    values: dict[str, Any]
    config: Config
    sweep_dir: Path

    @property
    def dir(self) -> Path:
        return Path(self.config.output.dir)

    @property
    def identity(self) -> dict[str, Any]:
        return config_identity(self.config)

    @property
    def record_path(self) -> Path:
        return self.sweep_dir / CELLS_DIR / f"{self.name}.json"

    @property
    def lock_path(self) -> Path:
        return self.sweep_dir / CELLS_DIR / f"{self.name}.lock"


# ----------------------------------------------------------------------------- axes and names

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


def parse_grid(texts: list[str]) -> dict[str, list[Any]]:
    """The --grid flags as one grid: a key given twice gets the values of both, in order
    (``--grid client.lr=0.1 --grid client.lr=0.2`` is ``client.lr=0.1,0.2``); a value that an
    axis lists twice would run the same cell twice, and is refused."""
    grid: dict[str, list[Any]] = {}
    for text in texts:
        key, values = parse_axis(text)
        grid.setdefault(key, []).extend(values)
    for key, values in grid.items():
        twice = [v for i, v in enumerate(values) if v in values[:i]]
        if twice:
            raise ConfigError(f"--grid: {key} lists {twice[0]!r} twice (got {', '.join(map(repr, values))}); "
                              f"each value once")
    return grid


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
        raise ConfigError(f"sweep.grid: expected a [sweep.grid] table of KEY = [V1, V2, ...], "
                          f"got {table['grid']!r}"[:200])
    if not isinstance(table.get("out", ""), str):
        raise ConfigError(f"sweep.out: expected a directory name, got {table['out']!r}"[:200])
    return table


def _as_list(value: Any) -> list[Any]:
    """A list of values stays one; a scalar is one value (an axis of length 1)."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def build_axes(table: Mapping[str, Any], grid: Mapping[str, Any] | None = None,
               seeds: Sequence[int] | None = None,
               target_epsilons: Sequence[float] | None = None) -> list[tuple[str, list[Any]]]:
    """Ordered axes: the TOML grid, then `grid`, then target epsilons, then seeds.

    An argument replaces the TOML's value for the same key (keeping the TOML's position),
    so the command line or a notebook can narrow a shipped sweep without editing it.
    """
    if grid is not None and not isinstance(grid, Mapping):
        raise ConfigError(f"sweep.grid: must map config keys to lists of values (got {grid!r})")
    axes: dict[str, list[Any]] = {}
    for key, values in table.get("grid", {}).items():
        axes[key] = _as_list(values)
    for key, values in (grid or {}).items():
        axes[str(key).strip()] = _as_list(values)
    targets = target_epsilons if target_epsilons is not None else table.get("target_epsilons")
    if targets is not None and _as_list(targets):
        axes[TARGET_KEY] = _as_list(targets)
    chosen_seeds = seeds if seeds is not None else table.get("seeds")
    if chosen_seeds is not None and _as_list(chosen_seeds):
        axes["seed"] = _as_list(chosen_seeds)
    for key, values in axes.items():
        if not values:
            raise ConfigError(f"sweep.grid: {key} has no values")
    return list(axes.items())


def _fmt(value: Any, top: bool = True) -> str:
    """A value as it appears in a cell name: faithful, so two different values never read
    alike. Floats in their short form only where it is exact (0.5, 1e-05), else repr
    (0.1000001); nested lists keep their brackets."""
    if isinstance(value, (list, tuple)):
        inner = ",".join(_fmt(v, top=False) for v in value)
        return inner if top else f"[{inner}]"
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


def cell_name(assignment: dict[str, Any]) -> str:
    """The cell's directory name and its name in messages: a control character in a value
    (a carriage return, a newline) is written as its escape, so that neither a directory
    name nor a one-line error is broken by it."""
    name = "__".join(f"{k}={_fmt(v)}" for k, v in assignment.items()).replace("/", "_") or "base"
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in name)


def config_identity(cfg: Config) -> dict[str, Any]:
    """What makes a run what it is: the resolved config, flattened to dotted keys, less the
    keys that cannot change a result (`NOT_IDENTITY`)."""
    flat = _flatten(config_to_dict(cfg))
    return {k: v for k, v in flat.items() if k not in NOT_IDENTITY}


def config_hash(identity: Mapping[str, Any]) -> str:
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flatten(d: Mapping[str, Any]) -> dict[str, Any]:
    """`flatten`, with tuples as the lists TOML reads back (a cell's identity compares both)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in flatten(d).items()}


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


def _unique_names(names: list[str], identities: list[dict[str, Any]]) -> list[str]:
    """Cell names that name one cell each. Two cells whose names still collide (a "/" made
    "_", or 1 next to 1.0 for a float key) get a suffix from their config hash; two cells
    with the same name AND the same config are one value listed twice, refused. Overlong
    names are cut and suffixed the same way."""
    hashes = [config_hash(i) for i in identities]
    seen: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        seen.setdefault(name, []).append(i)
    out = list(names)
    for name, idx in seen.items():
        if len({hashes[i] for i in idx}) < len(idx):
            raise ConfigError(f"sweep.grid: cell {name!r} appears {len(idx)} times with the same config "
                              f"(a value listed twice?)")
        if len(idx) > 1:
            for i in idx:
                out[i] = f"{name}~{hashes[i][:8]}"
    for i, name in enumerate(out):
        if len(name.encode()) > MAX_NAME_BYTES:
            cut = name.encode()[:MAX_NAME_BYTES - 10].decode(errors="ignore")
            out[i] = f"{cut}~{hashes[i][:8]}"
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
    planned = []
    unused: dict[str, str] | None = None
    for values in itertools.product(*[v for _, v in axes]):
        assignment = dict(zip([k for k, _ in axes], values))
        raw = read_experiment(config, {**base_overrides, **cell_overrides(assignment), "output.dir": ""})
        cfg = config_from_dict(raw)
        cell_unused = unused_keys(raw, cfg)  # reported only if no cell reads the key
        unused = cell_unused if unused is None else {k: v for k, v in unused.items() if k in cell_unused}
        planned.append((cell_name(assignment), _split(assignment), cfg))
    report_unused(unused or {}, strict)
    names = _unique_names([n for n, _, _ in planned], [config_identity(c) for _, _, c in planned])
    cells = []
    for name, (_, values, cfg) in zip(names, planned):
        cfg.output.dir = str(sweep_dir / name)
        cells.append(Cell(name, values, cfg, sweep_dir))
    return sweep_dir, cells


# ----------------------------------------------------------------------------- what a cell directory holds

def _recorded_identity(cell: Cell) -> dict[str, Any] | None:
    """The config the cell's directory was run with: from the sweep's record, or, for a
    cell run before records existed, from its config.toml (with the calibrated sigmas,
    which prepare fills in, left out). None when the directory holds no run."""
    if not cell.dir.exists():
        return None
    if cell.record_path.is_file():
        try:
            return json.loads(cell.record_path.read_text())["config"]
        except (json.JSONDecodeError, KeyError):
            pass
    if (cell.dir / CONFIG_TOML).is_file():
        recorded = _flatten(tomllib.loads((cell.dir / CONFIG_TOML).read_text()))
        recorded = {k: v for k, v in recorded.items() if k not in NOT_IDENTITY}
        planned = cell.identity
        for target, sigma in (("privacy.target_epsilon", "privacy.noise_multiplier"),
                              ("privacy.user_target_epsilon", "privacy.user_noise_multiplier")):
            if recorded.get(target) and sigma in planned:
                recorded[sigma] = planned[sigma]
        return recorded
    return None


def config_differences(recorded: Mapping[str, Any], planned: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every key whose value differs. A key the record lacks (added
    to fedsim since) differs only if the planned value is not the one such runs had: its
    default, or `BEFORE_THE_KEY`'s value where the key's default changed what runs do."""
    defaults = {**config_identity(load_config(None)), **BEFORE_THE_KEY}
    out = []
    for key in sorted(set(recorded) | set(planned)):
        if key not in planned:
            continue  # a key fedsim no longer has
        old = recorded.get(key, defaults.get(key))
        if old != planned[key]:
            out.append(f"{key}: {old!r} -> {planned[key]!r}")
    return out


def _conflict(cell: Cell) -> list[str]:
    """Why the cell's directory holds another experiment than the one planned (empty: it
    holds this one, or nothing)."""
    recorded = _recorded_identity(cell)
    if recorded is None:
        if is_finished(cell.dir):
            return ["a finished run whose config is unknown (no config.toml)"]
        return []
    if config_hash(recorded) == config_hash(cell.identity):
        return []
    return config_differences(recorded, cell.identity)


def _status(cell: Cell) -> str:
    if _conflict(cell):
        return CONFLICT
    summary = read_summary(cell.dir)
    if summary:
        return str(summary.get("status", "unknown"))
    return "no summary" if cell.dir.exists() else NOT_STARTED


def _refuse_conflicts(sweep_dir: Path, cells: list[Cell]) -> None:
    conflicts = [(c, why) for c in cells if (why := _conflict(c))]
    if not conflicts:
        return
    cell, why = conflicts[0]
    more = f"; {len(conflicts) - 1} more cells differ too" if len(conflicts) > 1 else ""
    raise ConfigError(f"sweep: cell {cell.name!r} in {sweep_dir} was run with another config "
                      f"({', '.join(why[:3])}{', ...' if len(why) > 3 else ''}){more}; choose a new --out "
                      f"or delete those cell directories to run them again")


def plan_sweep(config: str | Path | None, *, grid: Mapping[str, Any] | None = None,
               seeds: Sequence[int] | None = None, target_epsilons: Sequence[float] | None = None,
               overrides: Mapping[str, Any] | None = None, out: str | Path | None = None,
               strict: bool = False) -> pd.DataFrame:
    """The cells `run_sweep` would run, without running anything.

    One row per cell: ``cell`` (its name), ``dir``, one column per axis key, ``status`` (what
    its directory holds now: "finished", "running", "failed", "not started", "conflict" for a
    run of another config, ...), ``config_hash`` and ``config`` (the validated `Config`).
    ``frame.attrs["out"]`` is the sweep directory. Raises `ConfigError` on a bad key or value
    in any cell, and under `strict` on a key that does nothing in every cell.
    """
    sweep_dir, cells = _plan(config, grid, seeds, target_epsilons, overrides, out, strict)
    frame = pd.DataFrame([{"cell": c.name, "dir": str(c.dir), **c.values, "status": _status(c),
                           "config_hash": config_hash(c.identity), "config": c.config} for c in cells])
    frame.attrs["out"] = str(sweep_dir)
    return frame


# ----------------------------------------------------------------------------- claiming a cell

def _lock_owner(path: Path) -> tuple[int, str] | None:
    """(pid, host) written in a lock file; None while it is being written or unreadable."""
    try:
        pid, host = path.read_text().split(maxsplit=1)
        return int(pid), host.strip()
    except (OSError, ValueError):
        return None


def _alive(pid: int, host: str) -> bool:
    """Whether the process holding a lock may still run. On another host we cannot tell,
    so the lock stands."""
    if host != socket.gethostname():
        return True
    if pid == os.getpid():
        return False  # this process holds no lock it does not know of: a leftover of its own
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(path: Path) -> tuple[bool, int | None]:
    """Create the lock file `path` exclusively, holding this process's pid and host.

    Returns (True, None) once claimed, or (False, pid) while a live process holds it. A
    lock whose process has died (or that stayed empty for a minute) is reclaimed: renamed
    away first, so of two processes reclaiming it at once only one succeeds.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(path)
            if owner is None:
                try:
                    if time.time() - path.stat().st_mtime < STALE_EMPTY_LOCK_SECONDS:
                        return False, None
                except FileNotFoundError:
                    continue
            elif _alive(*owner):
                return False, owner[0]
            stale = path.with_name(f"{path.name}.stale-{os.getpid()}")
            try:
                os.replace(path, stale)
            except FileNotFoundError:
                continue  # someone else reclaimed it first: try again
            if _lock_owner(stale) != owner:  # it was a fresh lock by then: put it back
                try:
                    os.link(stale, path)
                except FileExistsError:
                    pass
                stale.unlink(missing_ok=True)
                return False, None
            stale.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{os.getpid()} {socket.gethostname()}\n")
        return True, None
    return False, None


def release(path: Path) -> None:
    """Remove a lock this process holds (never another's)."""
    owner = _lock_owner(path)
    if owner is not None and owner[0] == os.getpid():
        path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- running cells

def _run_cell(cell: Cell, threads: int) -> dict:
    """Run one cell that this process has claimed; returns its summary.

    The one place a cell runs. An unfinished cell (a killed or interrupted sweep) continues
    from its last checkpoint (`run_experiment(resume=True)`), so its finished rounds are not
    trained again; one without a checkpoint starts over.
    """
    from fedsim.run import run_experiment
    from fedsim.threads import torch_threads

    write_json(cell.record_path, {"cell": cell.name, "values": cell.values,
                                  "config_hash": config_hash(cell.identity), "config": cell.identity})
    # the cell's share of the cores, put back afterwards: a thread count left behind slowed
    # (and made flaky) whatever ran next in this process
    with torch_threads(threads):
        out = run_experiment(cell.config, progress=False, resume=True)
    return read_summary(out) or {}


@dataclass
class Outcome:
    """What became of one cell in this call: ran (summary), failed (error), or held by another
    live process (busy_pid), or found finished by another sweep meanwhile (summary, ran False)."""

    summary: dict | None = None
    error: str | None = None
    busy: bool = False
    busy_pid: int | None = None
    ran: bool = False


def describe_error(exc: BaseException) -> str:
    """One line for a failed cell: fedsim's own errors by their message, anything else
    with its type."""
    if isinstance(exc, (FedsimError, ClientFailure)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _attempt(cell: Cell, threads: int) -> Outcome:
    """Claim, check and run one cell, turning any failure into the cell's `Outcome`: the same
    function in this process (jobs = 1) and in a worker (jobs > 1), so both report alike."""
    try:
        claimed, pid = claim(cell.lock_path)
        if not claimed:
            return Outcome(busy=True, busy_pid=pid)
        try:
            why = _conflict(cell)  # another sweep may have run it meanwhile, with another config
            if why:
                raise ConfigError(f"sweep: cell {cell.name!r} was run meanwhile with another config "
                                  f"({', '.join(why[:3])})")
            if is_finished(cell.dir):  # another sweep finished it meanwhile
                return Outcome(summary=read_summary(cell.dir))
            return Outcome(summary=_run_cell(cell, threads), ran=True)
        finally:
            release(cell.lock_path)
    except Exception as exc:  # noqa: BLE001 - a failed cell is reported, the others go on
        _keep_traceback(cell, exc)
        return Outcome(error=describe_error(exc), ran=True)


def _keep_traceback(cell: Cell, exc: BaseException) -> None:
    """A traceback worth keeping (not fedsim's one-line errors) goes to the cell's directory."""
    if isinstance(exc, FedsimError):
        return
    text = "".join(traceback.format_exception(exc))
    if isinstance(exc, ClientFailure) and exc.client_traceback:
        text += "\nclient traceback:\n" + exc.client_traceback
    try:
        write_atomic(cell.dir / ERROR_FILE, text)
    except OSError:
        pass


def _result_row(cell: Cell, outcome: Outcome | None) -> dict[str, Any]:
    """What a notebook wants of one cell, read back from its summary.json."""
    summary = read_summary(cell.dir) or {}
    sample = summary.get("sample_level") or {}
    user = summary.get("user_level") or {}
    label = summary.get("label_level") or {}
    if outcome is not None and outcome.error:
        status = "diverged" if summary.get("status") == "diverged" else "failed"
    elif outcome is not None and outcome.busy:
        status = "running elsewhere" + (f" (pid {outcome.busy_pid})" if outcome.busy_pid else "")
    else:
        status = _status(cell)
    if sample:
        sample_eps = sample.get("epsilon_max") if sample.get("accountant") else math.inf
    else:
        sample_eps = math.nan
    return {"cell": cell.name, "dir": str(cell.dir), **cell.values, "status": status,
            "ran": bool(outcome and outcome.ran),
            "metric_name": summary.get("metric_name"), "final_metric": summary.get("final_metric"),
            "best_metric": summary.get("best_metric"), "best_round": summary.get("best_round"),
            "rounds_completed": summary.get("rounds_completed"),
            "noise_multiplier": sample.get("noise_multiplier"), "sample_epsilon": sample_eps,
            "user_epsilon": user.get("epsilon"), "label_epsilon": label.get("epsilon"),
            "delta": sample.get("delta"), "wall_seconds": summary.get("wall_seconds"),
            "config_hash": config_hash(cell.identity), "error": outcome.error if outcome else None}


def run_sweep(config: str | Path | None, *, grid: Mapping[str, Any] | None = None,
              seeds: Sequence[int] | None = None, target_epsilons: Sequence[float] | None = None,
              overrides: Mapping[str, Any] | None = None, jobs: int = 1, max_cells: int = 0,
              out: str | Path | None = None, progress: bool = True, strict: bool = False) -> pd.DataFrame:
    """Run every cell of a grid that is not finished yet; returns one row per cell.

    config: an experiment TOML (its ``[sweep]`` table gives default axes and ``out``) or None
    for the built-in defaults. grid: config key -> values (an axis each; "a.x,a.y" sets two
    keys together from lists; a scalar is one value). seeds, target_epsilons: shorthand axes
    (target 0 is the non-private reference). overrides: config key -> value for every cell.
    jobs: cells run in parallel processes. max_cells: run at most this many new cells (0 =
    all). out: the sweep directory (default: ``overrides["output.dir"]``, then the table's
    ``out``, then ``sweeps/<name>``). progress: print the plan line and show a progress bar. strict: refuse
    a key that does nothing in every cell (otherwise a warning names it).

    Columns: ``cell``, ``dir``, the axis keys, ``status`` ("finished", "failed", "not
    started" for cells beyond max_cells, "running elsewhere (pid N)" for a cell another
    process holds, ...), ``ran`` (attempted by this call), the summary's metric and
    epsilons, ``config_hash`` and ``error`` (a failed cell's one-line reason; a traceback
    that is not one of fedsim's one-line errors is kept in the cell's sweep-error.txt).
    ``frame.attrs["out"]`` is the sweep directory. A failing cell never stops the others,
    with any number of jobs. Raises `ConfigError`, before running anything, on bad input
    or when a cell's directory holds a run of another config.

    With jobs = 1 the cells run in this process under the caller's logging and warnings
    settings (`fedsim.logs.setup_logging(False)` gives the CLI's quiet ones); worker
    processes (jobs > 1) are set up quiet.
    """
    from tqdm.auto import tqdm

    if jobs < 1:
        raise ConfigError(f"--jobs: must be >= 1 (got {jobs})")
    if max_cells < 0:
        raise ConfigError(f"--max-cells: must be >= 0, 0 for all (got {max_cells})")
    sweep_dir, cells = _plan(config, grid, seeds, target_epsilons, overrides, out, strict)
    _refuse_conflicts(sweep_dir, cells)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json(sweep_dir / MANIFEST, {"cells": [c.name for c in cells],
                                      "config_hashes": {c.name: config_hash(c.identity) for c in cells}})
    todo = [cell for cell in cells if not is_finished(cell.dir)]
    finished = len(cells) - len(todo)
    if max_cells:
        todo = todo[:max_cells]
    if progress:
        print(f"sweep {sweep_dir}: {len(cells)} cells, {finished} already finished, running {len(todo)}")
    # a bar only on a terminal (None: tqdm's own check), never in a log file or a pipe
    bar = tqdm(total=len(todo), unit="cell", dynamic_ncols=True, disable=None if progress else True)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    from fedsim.run import sigterm_as_interrupt  # fedsim.run imports torch: only once cells run

    with sigterm_as_interrupt():  # SIGTERM stops the sweep as Ctrl-C does, workers included
        try:
            outcomes = _run_cells(todo, jobs, threads, bar)
        finally:  # end the bar's line, so that an error is a line of its own
            bar.close()
    frame = pd.DataFrame([_result_row(c, outcomes.get(c.name)) for c in cells])
    frame.attrs["out"] = str(sweep_dir)
    return frame


def _run_cells(todo: list[Cell], jobs: int, threads: int, bar) -> dict[str, Outcome]:
    """Run the cells in this process (jobs = 1) or in `jobs` worker processes; their outcomes by name."""
    outcomes: dict[str, Outcome] = {}
    if jobs == 1:
        for cell in todo:
            outcomes[cell.name] = _attempt(cell, threads)
            _tick(bar, cell.name, outcomes[cell.name])
        return outcomes
    from fedsim.privacy.secure_noise import shared_record  # imports torch, as running a cell does

    context = _pool_context()
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_init,
                               initargs=(os.getpid(), shared_record(context or multiprocessing)))
    try:
        futures = {pool.submit(_attempt_in_worker, cell, threads): cell for cell in todo}
        for fut in as_completed(futures):
            cell = futures[fut]
            try:
                outcomes[cell.name] = fut.result()
            except Exception as exc:  # noqa: BLE001 - the worker itself died (e.g. out of memory)
                outcomes[cell.name] = Outcome(error=describe_error(exc), ran=True)
            _tick(bar, cell.name, outcomes[cell.name])
    except BaseException:  # Ctrl-C, SIGTERM (fedsim.run.Terminated) or an error here: stop now
        _stop_workers(pool)
        raise
    pool.shutdown()
    return outcomes


def _pool_context() -> multiprocessing.context.BaseContext | None:
    """The platform's default start (fork on Linux: cheap, the modules come loaded), unless this
    process has initialized CUDA (a run of the Python API on a GPU before the sweep): a forked
    child cannot use it ("Cannot re-initialize CUDA in forked subprocess"), so then spawn."""
    torch = sys.modules.get("torch")  # not imported for this: a sweep on the CPU never needs it here
    if torch is not None and torch.cuda.is_initialized():
        return multiprocessing.get_context("spawn")
    return None


def _worker_init(parent: int, statements: Any) -> None:
    """Set up a sweep worker: as quiet as the CLI, once (so a warning shown "once" is shown once
    per worker, not per cell); the statement of what the DP noise hides made once per sweep,
    not per worker (``statements``, `fedsim.privacy.secure_noise.share_announcements`);
    Ctrl-C left to the parent, which stops the workers; SIGTERM ending the worker once its
    cell has closed (`_stop_cell`); and, on Linux, SIGTERM when the parent dies, even by
    ``kill -9``."""
    from fedsim.privacy.secure_noise import share_announcements

    setup_logging(False)
    share_announcements(statements)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A handler of fedsim's, not SIG_DFL: a run turns a default SIGTERM into an interrupt of
    # its own (`fedsim.run.sigterm_as_interrupt`), which would end the cell and leave the worker
    # going on to the next one.
    signal.signal(signal.SIGTERM, _stop_cell)
    die_with(parent)


_cell_running = False  # in a worker: whether a cell runs now (SIGTERM then interrupts it first)


def _stop_cell(signum: int, frame: object) -> None:
    """SIGTERM in a worker: an idle worker exits at once; a running cell is interrupted like
    Ctrl-C, so that its run writes status "interrupted" and its lock is released, and
    `_attempt_in_worker` then exits."""
    if not _cell_running:
        os._exit(128 + signum)
    raise KeyboardInterrupt(f"signal {signum} (SIGTERM)")


def _attempt_in_worker(cell: Cell, threads: int) -> Outcome:
    """`_attempt` in a worker process, which an interrupt ends after the cell has closed."""
    global _cell_running
    _cell_running = True
    try:
        return _attempt(cell, threads)
    except KeyboardInterrupt:
        os._exit(128 + signal.SIGTERM)
    finally:
        _cell_running = False


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel the cells not started and end the running ones now: an interrupted cell keeps its
    finished rounds and checkpoint, and the next `fedsim sweep` resumes it (its lock is stale
    once its worker is gone, and is reclaimed). Without this, ``shutdown`` would wait for every
    running cell, and workers outlive a parent that SIGTERM ended."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # the stdlib has no public handle
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=10)


def _tick(bar, name: str, outcome: Outcome) -> None:
    summary = outcome.summary or {}
    metric = summary.get("final_metric")
    if outcome.error:
        text = f"{name}: failed"
    elif outcome.busy:
        text = f"{name}: running elsewhere"
    else:
        text = f"{name}: {summary.get('metric_name')}={metric:.4f}" if metric is not None else name
    bar.set_postfix_str(text)
    bar.update(1)


def read_manifest(sweep_dir: Path) -> list[str] | None:
    p = sweep_dir / MANIFEST
    return json.loads(p.read_text())["cells"] if p.is_file() else None
