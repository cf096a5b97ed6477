"""The Python API, for notebooks and scripts: ``import fedsim``, then

* ``fedsim.run(config=None, **overrides) -> RunResult``: one experiment;
* ``fedsim.sweep(config=None, grid=..., seeds=..., **overrides) -> DataFrame``: a resumable grid;
* ``fedsim.report(path) -> DataFrame``: the privacy-utility table of runs or a sweep;
* ``fedsim.load_run(dir) -> RunResult`` and ``fedsim.load_model(dir)``: a finished run back.

Overrides are the command line's flags with underscores (``rounds=5``,
``noise_multiplier=0.5``, ``out="runs/x"``, ``target_epsilon=3``: `OVERRIDE_KEYS`, the one
table the CLI builds its flags from), plus ``set={"section.key": value}`` for any other key.
They go through the same validation as a TOML file, so a bad value is refused with the key's
name and allowed values (`fedsim.errors.ConfigError`).

Quiet by default: Flower's, Opacus' and MLflow's INFO lines go to the run's run.log, not
to the notebook; ``verbose=True`` shows them (`fedsim.logs.setup_logging`, as the CLI's -v).

This module imports only the standard library at import time, so ``import fedsim`` and
``fedsim --help`` stay fast; pandas, torch and Flower are imported by the calls that need them.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsim.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from fedsim.config import Config

# keyword (the CLI flag without "--", dashes as underscores) -> config key
OVERRIDE_KEYS: dict[str, str] = {
    "dataset": "data.dataset", "model": "model.name", "strategy": "strategy.name",
    "num_clients": "federation.num_clients", "clients_per_round": "federation.clients_per_round",
    "rounds": "federation.rounds", "local_epochs": "client.local_epochs",
    "batch_size": "client.batch_size", "lr": "client.lr",
    "noise_multiplier": "privacy.noise_multiplier", "max_grad_norm": "privacy.max_grad_norm",
    "delta": "privacy.delta", "accountant": "privacy.accountant",
    "partitioner": "data.partitioner", "alpha": "data.alpha",
    "runtime": "runtime.name", "engine": "runtime.engine", "device": "runtime.device",
    "seed": "seed", "out": "output.dir",
    "bag_size": "strategy.bags.bag_size", "rho": "strategy.bags.rho",
    "label_epsilon": "strategy.bags.label_epsilon",
    "target_epsilon": "privacy.target_epsilon",
}


# ----------------------------------------------------------------------------- configs

def builtin_config(name: str) -> Path | None:
    """The shipped experiment called `name` (e.g. "quickstart"), or None: every API call that
    takes a config accepts these names (`fedsim.config.builtin_configs`)."""
    from fedsim.config import builtin_configs

    return builtin_configs().get(name)


def _config_path(config: str | Path | None) -> Path | None:
    if config is None:
        return None
    if not isinstance(config, (str, Path)):
        raise ConfigError(f"config: expected a Config, a TOML path or None (got {type(config).__name__})")
    path = Path(config)
    if not path.is_file() and path.suffix == "" and len(path.parts) == 1:
        return builtin_config(str(config)) or path
    return path  # load_config refuses a missing file with its name


def _plain(value: Any) -> Any:
    """A notebook's values as the config schema takes them: numpy scalars as Python numbers
    (a loop over np.linspace gives np.float64, np.arange np.int64), tuples and arrays as
    lists, paths as strings."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple, range)):
        return [_plain(v) for v in value]
    if type(value).__module__ == "numpy":
        return _plain(value.tolist())
    return value


def override_keys(set: Mapping[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """Keyword overrides and ``set`` as one {config key: value} dict.

    An unknown keyword is refused with the allowed ones (and the closest, for a typo); a key
    given both ways with different values is refused rather than one silently winning.
    """
    unknown = sorted(name for name in overrides if name not in OVERRIDE_KEYS)
    if unknown:
        close = difflib.get_close_matches(unknown[0], OVERRIDE_KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{unknown[0]}: unknown override{hint}; allowed: {', '.join(OVERRIDE_KEYS)}, "
                          f"or set={{'section.key': value}} for any config key")
    out = {str(key): _plain(value) for key, value in (set or {}).items()}
    for name, value in overrides.items():
        key, value = OVERRIDE_KEYS[name], _plain(value)
        if key in out and out[key] != value:
            raise ConfigError(f"{key}: given twice, as {name}={value!r} and in set= as {out[key]!r}")
        out[key] = value
    if "output.dir" in out:
        out["output.dir"] = str(out["output.dir"])
    return out



def config_for(config: Config | str | Path | None = None, *, set: Mapping[str, Any] | None = None,
               **overrides: Any) -> Config:
    """The validated `Config` that `run` would use, without running it.

    config: a `Config`, a TOML path, or None for the built-in defaults. overrides: the CLI's
    flags as keywords (`OVERRIDE_KEYS`). set: {"section.key": value} for any key.
    """
    from fedsim.config import Config, config_to_dict, flatten, load_config

    keys = override_keys(set, **overrides)
    if isinstance(config, Config):  # its values as overrides of the defaults, validated again
        return load_config(None, {**flatten(config_to_dict(config)), **keys})
    return load_config(_config_path(config), keys)


def _fresh_out_dir(cfg: Config) -> None:
    """Give a run without output.dir its own new directory: the default name has a
    one-second timestamp, and two quick runs in one second must not share (and overwrite)
    a directory."""
    if cfg.output.dir:
        return
    from fedsim.run import default_out_dir

    base = default_out_dir(cfg)
    candidate, n = base, 1
    while Path(candidate).exists():
        n += 1
        candidate = f"{base}-{n}"
    cfg.output.dir = candidate


# ----------------------------------------------------------------------------- results

@dataclass(repr=False)
class RunResult:
    """A run directory, read back: ``rounds`` (rounds.csv, one row per round), ``clients``
    (clients.csv, one row per client that trained), ``summary`` (summary.json), ``config``
    (config.toml, validated) and ``model`` (the final global model, loaded when first asked
    for). Taken when the object is made: `load_run` again to see a run that is still going."""

    dir: Path
    rounds: pd.DataFrame
    clients: pd.DataFrame
    summary: dict[str, Any]

    @functools.cached_property
    def config(self) -> Config:
        from fedsim.config import loads_toml
        from fedsim.results import CONFIG_TOML

        return loads_toml((self.dir / CONFIG_TOML).read_text())

    @functools.cached_property
    def model(self) -> torch.nn.Module:
        return load_model(self.dir)

    def __repr__(self) -> str:
        s = self.summary
        text = f"RunResult(dir='{self.dir}', status={s.get('status')!r}, rounds={len(self.rounds)}"
        if s.get("final_metric") is not None:
            text += f", {s.get('metric_name')} final {s['final_metric']:.4f} best {s['best_metric']:.4f}"
        sample = s.get("sample_level") or {}
        if sample.get("accountant"):
            text += f", sample eps {sample['epsilon_max']:.2f} at delta={sample['delta']:g}"
        return text + ")"


def load_run(run_dir: str | Path) -> RunResult:
    """A run directory (finished or not) as a `RunResult`. Raises FileNotFoundError when the
    directory is not a run (it has no config.toml)."""
    import pandas as pd

    from fedsim.results import CLIENT_COLUMNS, CLIENTS_CSV, CONFIG_TOML, ROUND_COLUMNS, ROUNDS_CSV, read_summary

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_TOML).is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no {CONFIG_TOML})")

    def table(name: str, columns: list[str]) -> pd.DataFrame:
        path = run_dir / name
        return pd.read_csv(path, float_precision="round_trip") if path.is_file() else pd.DataFrame(columns=columns)

    return RunResult(dir=run_dir, rounds=table(ROUNDS_CSV, ROUND_COLUMNS),
                     clients=table(CLIENTS_CSV, CLIENT_COLUMNS), summary=read_summary(run_dir) or {})


def load_model(run_dir: str | Path | RunResult) -> torch.nn.Module:
    """The final global model of a run, rebuilt from its config and weights
    (`fedsim.checkpoint.load_model`)."""
    from fedsim.checkpoint import load_model as load

    return load(run_dir.dir if isinstance(run_dir, RunResult) else Path(run_dir))


# ----------------------------------------------------------------------------- calls

def run(config: Config | str | Path | None = None, *, set: Mapping[str, Any] | None = None,
        callbacks: Sequence[Any] = (), verbose: bool = False, progress: bool = True,
        **overrides: Any) -> RunResult:
    """Run one experiment and return its results.

    config: a `Config`, a TOML path, or None for the built-in defaults. overrides: the CLI's
    flags as keywords, e.g. ``rounds=5, noise_multiplier=0.5, out="runs/x"`` (`OVERRIDE_KEYS`).
    set: ``{"section.key": value}`` for any other key, e.g. ``{"strategy.fedprox.mu": 0.1}``.
    callbacks: objects with ``on_round_end(round, metrics)`` and/or ``on_run_end(summary)``
    (`fedsim.trackers`), called by this run. verbose: show fedsim's, Flower's and Opacus' INFO
    logs (they are in run.log either way). progress: show the progress bar.

    Without ``out`` the run gets a new directory ``runs/<name>-<timestamp>``. Raises
    `fedsim.errors.ConfigError` on bad input (before any training) and
    `fedsim.errors.ClientFailure` when a client fails.
    """
    from fedsim.logs import setup_logging
    from fedsim.run import run_experiment
    from fedsim.trackers import attached, check_available, check_callbacks

    cfg = config_for(config, set=set, **overrides)
    check_available(cfg.output.trackers)
    check_callbacks(list(callbacks))
    _fresh_out_dir(cfg)
    setup_logging(verbose)
    with attached(callbacks):
        out = run_experiment(cfg, progress=progress)
    return load_run(out)


def sweep(config: Config | str | Path | None = None, *, grid: Mapping[str, Sequence[Any]] | None = None,
          seeds: Sequence[int] | None = None, target_epsilons: Sequence[float] | None = None,
          jobs: int = 1, max_cells: int = 0, set: Mapping[str, Any] | None = None, verbose: bool = False,
          progress: bool = True, **overrides: Any) -> pd.DataFrame:
    """Run every cell of a grid that is not finished yet (`fedsim.sweep.run_sweep`); one row per cell.

    grid: {config key: values}, one axis each. seeds, target_epsilons: shorthand axes (a
    target of 0 is the non-private reference). A TOML's ``[sweep]`` table gives default axes.
    overrides and set: as for `run`, for every cell; ``out`` is the sweep directory (default
    ``sweeps/<name>``). jobs: cells run in parallel processes. Re-running the same call skips
    finished cells. ``frame.attrs["out"]`` is the sweep directory, for `report`.
    """
    from fedsim.config import Config, config_to_dict, flatten
    from fedsim.logs import setup_logging
    from fedsim.sweep import run_sweep
    from fedsim.trackers import check_available

    keys = override_keys(set, **overrides)
    path = None
    if isinstance(config, Config):
        keys = {**flatten(config_to_dict(config)), **keys}
    else:
        path = _config_path(config)
    check_available(config_for(path, set=keys).output.trackers)
    setup_logging(verbose)
    return run_sweep(path, grid={k: _plain(v) for k, v in (grid or {}).items()},
                     seeds=_plain(seeds) if seeds is not None else None,
                     target_epsilons=_plain(target_epsilons) if target_epsilons is not None else None,
                     overrides=keys, jobs=jobs, max_cells=max_cells, progress=progress)


def report(runs: str | Path | RunResult | pd.DataFrame, *, group_by: str | Sequence[str] = (),
           best_per: str | Sequence[str] = (), where: Mapping[str, Any] | None = None,
           pivot: str = "", paired_against: Any = None, unpaired: bool = False) -> pd.DataFrame:
    """The privacy-utility table (`fedsim.report.report`): one row per strategy and privacy
    level (and group-by value), averaged over seeds.

    runs: a sweep or run directory, a `RunResult`, or the frame `sweep` returned. group_by:
    config keys that split rows. best_per: keep the best row per group of these keys. where:
    only runs whose config has these values. pivot: one column per value of this column.
    Comparisons are paired by default, over the seeds both sides have: with pivot, every
    column but the reference holds its paired difference from it; without, a table of several
    strategies gains diff_vs_<reference> columns. paired_against: the reference (a value of the
    pivot column, or a strategy; default the first). unpaired: no differences.
    Render it with ``fedsim.report.render(table, "md")`` (or "csv", "latex", "json").
    """
    from fedsim.report import report as build

    if isinstance(runs, RunResult):
        runs = runs.dir
    elif not isinstance(runs, (str, Path)):  # the frame `sweep` returned
        if "out" not in getattr(runs, "attrs", {}):
            raise ConfigError("report: expected a run or sweep directory, a RunResult, or the frame "
                              f"fedsim.sweep returned (got {type(runs).__name__})")
        runs = runs.attrs["out"]
    return build(runs, group_by=group_by, best_per=best_per, where=where, pivot=pivot,
                 paired_against=paired_against, unpaired=unpaired)
