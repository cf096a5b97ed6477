"""`fedsim report`: privacy-utility tables from run directories, as a library.

Rows are strategy x privacy setting (plus any group-by keys), averaged over seeds:
final metric as mean +- 95% CI (Student t over seeds), best-round metric, and the
epsilon of each privacy level with its accountant and delta. Every epsilon column names its
statistic (`EPSILON_NOTE`, under every markdown table and in JSON): a run's sample-level
epsilon is its largest per-client one; across seeds, `sample_epsilon` is their mean and
`sample_epsilon_seed_max` their maximum (`median=True` adds the median client's). A non-private row
(sigma = 0, epsilon = inf) is the reference. Every output format is rendered from the
same rounded numbers, so markdown, CSV, LaTeX and JSON agree digit for digit.
Unfinished or missing cells are listed, never dropped silently.

Comparisons are paired by default: runs of two methods with the same seed share their data
split, partition and client sampling, so the per-seed difference has far less spread than
either method's own results. A pivoted table shows every value of its column but the
reference (the first, or ``paired_against``) as the paired difference from it over the seeds
both have; the long table, when it holds several strategies, adds the paired difference of
each row from the reference strategy's row at the same setting (`paired_columns`). Where no
seed is shared the comparison falls back to unpaired, and the caption says which
(``unpaired=True`` asks for unpaired throughout). "best" numbers are the test metric at the
round selected on the validation split (`BEST_NOTE`); best rows (``best_per``) are chosen on
validation too, where the runs have one.

From a notebook::

    from fedsim.report import report, render, plot
    table = report("sweeps/privacy-utility", group_by=["data.alpha"])
    print(render(table, "md"))
    plot(table, "pu.png")

This module knows nothing of argparse: `fedsim.cli` parses the command line and calls
`report`, `render` and `plot` with plain arguments.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tomllib

from fedsim.config import BEFORE_THE_KEY, flatten
from fedsim.errors import FedsimError
from fedsim.results import CONFIG_TOML, SUMMARY_JSON

FORMATS = ("md", "csv", "latex", "json")
Where = Mapping[str, Any] | Sequence[tuple[str, Any]]

# Runs calibrated to a target epsilon have a sigma that depends on client sizes (and so on
# the seed): they are grouped by their target, not by sigma.
PRIVACY_KEYS = ["privacy.target_epsilon", "privacy.user_target_epsilon", "_sigma", "_user_sigma"]

EPSILON_NOTE = ("sample_epsilon: per run the largest per-client sample-level epsilon, mean over seeds; "
                "sample_epsilon_seed_max: the largest of those over seeds; sample_epsilon_median (when shown): "
                "per run the median client's, mean over seeds; user_epsilon: the user-level epsilon of the "
                "run (one for all clients), mean over seeds, its accountant naming the client sampling; "
                "epsilon_lower (audited runs only): `fedsim audit`'s empirical lower bound, mean over seeds.")


def _flatten(d: dict) -> dict:
    """`flatten`, with lists as tuples: table cells that group and compare."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in flatten(d).items()}


def find_runs(path: Path) -> list[Path]:
    """`path` itself if it is a run directory, else every run directory below it."""
    if (path / CONFIG_TOML).is_file():
        return [path]
    return sorted(p.parent for p in path.rglob(CONFIG_TOML))


# Config keys `build_table` reads: a run whose config.toml lacks one is malformed.
REQUIRED_CONFIG = ("strategy.name", "privacy.noise_multiplier", "privacy.target_epsilon",
                   "privacy.user_noise_multiplier", "privacy.user_target_epsilon", "federation.rounds",
                   "federation.num_clients", "federation.clients_per_round")
# Keys of a finished summary.json that must hold a finite number (a run that diverged ends
# "diverged", never "finished": a NaN here is a damaged file).
REQUIRED_NUMBERS = ("final_metric", "best_metric")


BEST_NOTE = {"validation": "best_*: the test metric at the round with the best validation metric "
                             "(data.validation_fraction), mean over seeds",
             "test": "best_*: the best round's test metric, the round selected on the test split (these runs "
                     "have data.validation_fraction = 0): an optimistic number, not an estimate of held-out "
                     "performance"}


class MalformedRun(Exception):
    """A run directory that cannot be read: the message says which file and why."""


def _epsilon(value: Any) -> float:
    """An epsilon as summary.json holds it: a number, Infinity, or null/"inf" for "no
    guarantee" (writers differ; both mean epsilon = inf)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("inf", "infinity")):
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedRun(f"summary.json: epsilon {value!r} is not a number")
    if math.isnan(value) or value < 0:
        raise MalformedRun(f"summary.json: epsilon {value!r} is not >= 0")
    return float(value)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MalformedRun(f"{path.name} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MalformedRun(f"{path.name} cannot be read ({exc})") from None
    if not isinstance(data, dict):
        raise MalformedRun(f"{path.name} holds a {type(data).__name__}, not an object")
    return data


def _level(summary: dict, key: str) -> dict:
    value = summary.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedRun(f"summary.json: {key} is not an object")
    return value


def read_run(run: Path, summary: dict) -> dict:
    """One table row from a finished run's summary and config.toml; `MalformedRun` names
    the file and the key when either lacks what the table needs."""
    missing = [k for k in ("metric_name", *REQUIRED_NUMBERS) if k not in summary]
    if missing:
        raise MalformedRun(f"summary.json lacks {', '.join(missing)}")
    try:
        cfg = _flatten(tomllib.loads((run / CONFIG_TOML).read_text()))
    except tomllib.TOMLDecodeError as exc:
        raise MalformedRun(f"config.toml is not valid TOML ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MalformedRun(f"config.toml cannot be read ({exc})") from None
    lacking = [k for k in REQUIRED_CONFIG if k not in cfg]
    if lacking:
        raise MalformedRun(f"config.toml lacks {', '.join(lacking)}")
    # a run written before a key existed ran with what that key now names (`BEFORE_THE_KEY`):
    # read so, a sweep that mixes old and new cells of one setting is not "mixed settings"
    cfg = {**BEFORE_THE_KEY, **cfg}
    sample, user, label = _level(summary, "sample_level"), _level(summary, "user_level"), _level(summary, "label_level")
    private = bool(sample.get("accountant"))
    return {**cfg, "run": run.name, "metric_name": str(summary["metric_name"]),
            "final_metric": _finite(summary["final_metric"], "final_metric"),
            "best_metric": _finite(summary["best_metric"], "best_metric"),
            # runs written before the validation split selected their best round on the test split
            "best_selected_on": str(summary.get("best_selected_on") or "test"),
            "final_val_metric": _number(summary.get("final_val_metric"), "final_val_metric"),
            "sample_epsilon": _epsilon(sample.get("epsilon_max")) if private else math.inf,
            # runs written before summary.json kept the distribution have no median: NaN
            "sample_epsilon_median": (_epsilon(sample["epsilon_median"]) if sample.get("epsilon_median") is not None
                                      else math.nan) if private else math.inf,
            "sample_accountant": sample.get("accountant") or "",
            "user_epsilon": _epsilon(user.get("epsilon")) if user else None,
            "user_accountant": user.get("accountant", "") if user else "",
            "label_epsilon": _epsilon(label.get("epsilon")) if label else None,
            "label_accountant": label.get("accountant", "") if label else "",
            "delta": _number(sample.get("delta"), "sample_level.delta"),
            "epsilon_lower": _audited_lower(run)}


def _audited_lower(run: Path) -> float | None:
    """The run's audited lower bound (audit.json from `fedsim audit`, at its level), or None."""
    try:
        value = json.loads((run / "audit.json").read_text()).get("epsilon_lower")
    except (OSError, ValueError):
        return None
    return _epsilon(value) if value is not None else None


def _number(value: Any, key: str) -> float:
    """A number of summary.json, NaN where it is absent (null)."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedRun(f"summary.json: {key} = {value!r} is not a number")
    return float(value)


def _finite(value: Any, key: str) -> float:
    """A number a finished run must have: finite."""
    number = _number(value, key)
    if not math.isfinite(number):
        raise MalformedRun(f"summary.json: {key} = {value!r} is not a finite number, yet the run says finished")
    return number


def load_runs(path: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """One row per finished run (its flattened config plus the summary's metrics and
    epsilons); plus the names of runs that are missing or unfinished, so that a caller can
    say which cells a table lacks. Malformed runs (a non-JSON summary, missing keys, an
    unreadable config) are skipped, so one bad directory never hides the others; the
    frame's ``attrs["skipped"]`` lists them as "name: why"."""
    from fedsim.sweep import read_manifest

    path = Path(path)
    if not path.exists():
        raise FedsimError(f"report: {path} does not exist")
    rows, unfinished, skipped = [], [], []
    for run in find_runs(path):
        summary_path = run / SUMMARY_JSON
        if not summary_path.is_file():
            unfinished.append(f"{run.name} (no summary)")
            continue
        try:
            summary = _read_json(summary_path)
            if summary.get("status") != "finished":
                unfinished.append(f"{run.name} ({summary.get('status', 'no status')})")
                continue
            rows.append(read_run(run, summary))
        except MalformedRun as exc:
            skipped.append(f"{run.name}: {exc}")
    manifest = read_manifest(path) if path.is_dir() else None
    if manifest:
        present = {r["run"] for r in rows} | {u.split(" (")[0] for u in unfinished} | \
                  {s.split(": ")[0] for s in skipped}
        unfinished += [f"{name} (not started)" for name in manifest if name not in present]
    if not rows:
        notes = [f"{len(unfinished)} unfinished"] if unfinished else []
        notes += [f"{len(skipped)} malformed, e.g. {skipped[0]}"] if skipped else []
        raise FedsimError(f"report: no finished runs under {path}" + (f" ({'; '.join(notes)})" if notes else ""))
    frame = pd.DataFrame(rows)
    names = frame["metric_name"].unique()
    if len(names) > 1:
        raise FedsimError(f"report: runs have incompatible metrics ({', '.join(names)}); "
                          f"report them separately")
    frame.attrs["skipped"] = skipped
    return frame, unfinished


def mean_ci95(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (nan for one seed)."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    n = len(values)
    mean = float(values.mean())
    if n < 2:
        return mean, float("nan")
    return mean, float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n))


def _scale_digits(metric_name: str) -> tuple[float, int]:
    """How the tables show a metric: accuracy in % with one decimal, MSE with four."""
    return (100.0, 1) if metric_name == "accuracy" else (1.0, 4)


def _is_statistic(column: str) -> bool:
    """A column computed over seeds (the rest describe the setting and name the row)."""
    return column.startswith(("final_", "best_", "diff_")) or column in ("ci95", "seeds")


def _row_key(values: Mapping[str, Any]) -> tuple:
    """A table row's identity: its descriptive columns' values (NaN as None, so it matches)."""
    return tuple(sorted((c, None if isinstance(v, float) and math.isnan(v) else v)
                        for c, v in values.items() if not _is_statistic(c)))


def _epsilon_mean(values: pd.Series) -> float:
    """The mean over seeds of an epsilon, shown to 2 decimals; inf if any seed's is, NaN
    (shown "-") if a seed's is unknown."""
    values = values.astype(float)
    if values.isna().any():
        return math.nan
    return round(float(values.mean()), 2) if np.isfinite(values).all() else math.inf


# Config keys that may differ between the runs of one row: what the row averages over (seeds,
# their directories and names) and what calibration derives per run from the row's target.
PER_RUN_KEYS = {"seed", "name", "output.dir", "privacy.noise_multiplier", "privacy.user_noise_multiplier",
                "privacy.client_noise_multipliers"}


def mixed_settings(frame: pd.DataFrame, keys: list[str]) -> dict[str, list[str]]:
    """Config keys whose value differs between runs that land in one row (grouped by `keys`),
    each with its values: such a row would average different experiments without saying so
    (e.g. a sweep over privacy.user_clip_quantile reported without --group-by)."""
    config = [c for c in frame.columns if "." in c and not c.startswith("_") and c not in PER_RUN_KEYS
              and c not in keys]
    mixed: dict[str, set[str]] = {}
    for _, sub in frame.groupby(keys, sort=True, dropna=False):
        for column in config:
            values = {repr(v) for v in sub[column]}
            if len(values) > 1:
                mixed.setdefault(column, set()).update(values)
    return {k: sorted(v) for k, v in sorted(mixed.items())}


def build_table(frame: pd.DataFrame, group_by: list[str], median: bool = False) -> pd.DataFrame:
    """The privacy-utility table, numbers already rounded for display; `median` adds each
    run's median client beside its largest (`EPSILON_NOTE`). ``attrs["per_seed"]``
    maps each row (`_row_key`) to its runs' (seed, final metric in the display unit), unrounded:
    what `pivot_table(..., paired_against=...)` pairs."""
    scale, digits = _scale_digits(frame["metric_name"].iloc[0])
    unknown = [k for k in group_by if k not in frame]
    if unknown:
        raise FedsimError(f"report: --group-by key {unknown[0]!r} is not a config key of these runs")
    extra = list(group_by)
    frame = frame.assign(
        _sigma=frame["privacy.noise_multiplier"].where(frame["privacy.target_epsilon"] <= 0, -1.0),
        _user_sigma=frame["privacy.user_noise_multiplier"].where(frame["privacy.user_target_epsilon"] <= 0, -1.0))
    keys = ["strategy.name"] + extra + PRIVACY_KEYS
    out, per_seed, settings, val_means = [], [], [], []
    for group, sub in frame.groupby(keys, sort=True, dropna=False):
        group = dict(zip(keys, group if isinstance(group, tuple) else (group,)))
        final_mean, final_ci = mean_ci95(sub["final_metric"].to_numpy() * scale)
        best_mean, _ = mean_ci95(sub["best_metric"].to_numpy() * scale)
        sample_eps = sub["sample_epsilon"].astype(float)
        row = {"strategy": group["strategy.name"]}
        row.update({k: group[k] for k in extra})
        if (frame["privacy.target_epsilon"] > 0).any():
            row["target_epsilon"] = float(group["privacy.target_epsilon"]) or math.inf
        row.update({
            "sigma": round(float(sub["privacy.noise_multiplier"].mean()), 3),
            "sample_epsilon": _epsilon_mean(sample_eps),
            "sample_epsilon_seed_max": round(float(sample_eps.max()), 2) if np.isfinite(sample_eps).all()
            else math.inf,
        })
        if median:
            row["sample_epsilon_median"] = _epsilon_mean(sub["sample_epsilon_median"])
        row["sample_accountant"] = sub["sample_accountant"].iloc[0] or "-"
        if sub["user_epsilon"].notna().any():
            row["user_sigma"] = round(float(sub["privacy.user_noise_multiplier"].mean()), 3)
            row["user_epsilon"] = round(float(sub["user_epsilon"].astype(float).mean()), 2)
            row["user_accountant"] = sub["user_accountant"].iloc[0]
        if sub["epsilon_lower"].notna().any():  # audited runs (`fedsim audit`): the mean over audited seeds
            row["epsilon_lower"] = round(float(sub["epsilon_lower"].dropna().astype(float).mean()), 2)
        if sub["label_epsilon"].notna().any():
            row["label_epsilon"] = round(float(sub["label_epsilon"].astype(float).mean()), 2)
            row["label_accountant"] = sub["label_accountant"].iloc[0]
        row.update({
            "delta": float(sub["delta"].iloc[0]),
            f"final_{frame['metric_name'].iloc[0]}": round(final_mean, digits),
            "ci95": round(final_ci, digits) if np.isfinite(final_ci) else math.nan,
            f"best_{frame['metric_name'].iloc[0]}": round(best_mean, digits),
            "rounds": int(sub["federation.rounds"].iloc[0]),
            "clients": int(sub["federation.num_clients"].iloc[0]),
            "per_round": int(sub["federation.clients_per_round"].iloc[0]),
            "seeds": len(sub),
        })
        out.append(row)
        run_seeds = sub["seed"].tolist() if "seed" in sub else [None] * len(sub)
        per_seed.append(tuple(zip(run_seeds, (sub["final_metric"].to_numpy() * scale).tolist())))
        # the row's setting but its strategy: what a paired comparison of strategies matches on
        settings.append(tuple(None if isinstance(group[k], float) and math.isnan(group[k]) else group[k]
                              for k in keys[1:]))
        val = sub["final_val_metric"].to_numpy(dtype=float)
        val_means.append(float(val.mean()) if np.isfinite(val).all() else math.nan)
    table = pd.DataFrame(out)
    if "label_epsilon" in table:  # a bags run without label noise is the non-private reference
        table["label_epsilon"] = table["label_epsilon"].fillna(math.inf)
        table["label_accountant"] = table["label_accountant"].fillna("-")
    seeds: dict[tuple, tuple | None] = {}
    setting_of: dict[tuple, tuple | None] = {}
    val_of: dict[tuple, float] = {}
    for row, pairs, setting, val in zip(table.to_dict("records"), per_seed, settings, val_means):
        key = _row_key(row)
        seeds[key] = None if key in seeds else pairs  # None: two groups look alike, cannot pair
        setting_of[key] = None if key in setting_of else setting
        val_of[key] = math.nan if key in val_of else val
    # non-private reference first within each strategy, then by growing epsilon
    table = table.sort_values(["strategy", "sample_epsilon", "sigma"], ascending=[True, False, True],
                              key=lambda s: s if s.name != "sample_epsilon" else s.replace(math.inf, 1e18),
                              ignore_index=True)
    table.attrs["per_seed"] = seeds
    table.attrs["setting"] = setting_of
    table.attrs["val_mean"] = val_of
    table.attrs["best_selected_on"] = sorted(set(frame["best_selected_on"]))
    table.attrs["mixed"] = mixed_settings(frame, keys)
    return table


def best_rows(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The best row within each group of `keys` (e.g. the best (bag size, rho) at each label
    epsilon), chosen by the mean final validation metric when every run has a validation
    split, else by the final test metric. ``attrs["best_per_on"]`` says which: a row picked
    on the test split reports an optimistic, selected number."""
    metric = next(c for c in table.columns if c.startswith("final_"))
    ascending = not metric.endswith("accuracy")
    missing = [k for k in keys if k not in table]
    if missing:
        raise FedsimError(f"report: --best-per key {missing[0]!r} is not a table column; "
                          f"add it to --group-by")
    val_of = table.attrs.get("val_mean") or {}
    val = [val_of.get(_row_key(r), math.nan) for r in table.to_dict("records")]
    on_validation = bool(val) and all(math.isfinite(v) for v in val)
    ordered = table.assign(_by=val if on_validation else table[metric]).sort_values(
        "_by", ascending=ascending, kind="stable")
    out = (ordered.groupby(keys, sort=True, dropna=False).head(1).drop(columns="_by")
           .sort_values(keys, ignore_index=True))
    out.attrs["best_per_on"] = "validation" if on_validation else "test"
    return out


def paired_difference(a: pd.Series, b: pd.Series) -> tuple[float, float, int]:
    """Paired difference a - b over the seeds both have (the series' index): the mean of the
    per-seed differences d_s = a_s - b_s, the half-width of its 95% Student-t interval,
    t_{0.975, n-1} * sd(d) / sqrt(n) (nan for fewer than two seeds), and n. A seed on one
    side only is left out; (nan, nan, 0) when no seed is shared. Raises ValueError when a
    seed appears twice on one side (its runs cannot be paired)."""
    for side in (a, b):
        if side.index.has_duplicates:
            raise ValueError(f"seed {side.index[side.index.duplicated()][0]} appears twice")
    common = [s for s in a.index if s in b.index]
    if not common:
        return math.nan, math.nan, 0
    mean, ci = mean_ci95(a.loc[common].to_numpy(dtype=float) - b.loc[common].to_numpy(dtype=float))
    return mean, ci, len(common)


def check_paired(pivot: str, paired_against: Any, unpaired: bool = False) -> None:
    """--paired-against names a reference, --unpaired asks for none: the two together are
    refused before any run is read."""
    if paired_against not in (None, "") and unpaired:
        raise FedsimError(f"report: --paired-against {paired_against} and --unpaired contradict each other; "
                          f"give one (comparisons are paired by default)")


def welch_difference(a: pd.Series, b: pd.Series) -> tuple[float, float]:
    """Unpaired difference of means a - b and the half-width of its 95% Welch t-interval
    (nan for a side with fewer than two runs): the fallback where no seed is shared."""
    from scipy import stats

    a, b = a.to_numpy(dtype=float), b.to_numpy(dtype=float)
    mean = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return mean, math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return mean, 0.0
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return mean, float(stats.t.ppf(0.975, df) * math.sqrt(va + vb))


def _series(pairs: tuple) -> pd.Series:
    return pd.Series([v for _, v in pairs], index=[s for s, _ in pairs], dtype=float)


def paired_columns(table: pd.DataFrame, reference: Any = None) -> pd.DataFrame:
    """The long table with, for every row of a strategy other than the reference (the first
    strategy, or `reference`), its difference from the reference strategy's row at the same
    setting (group-by keys and privacy level): ``diff_vs_<reference>`` (in the table's unit),
    ``diff_ci95`` and ``diff_seeds``. Paired over the seeds both rows have
    (`paired_difference`); where they share none, unpaired (`welch_difference`, diff_seeds 0),
    which ``attrs["paired"]["unpaired"]`` lists. A table with one strategy comes back as it is."""
    metric = next(c for c in table.columns if c.startswith("final_"))
    strategies = list(dict.fromkeys(table["strategy"]))
    if reference not in (None, "") and str(reference) not in map(str, strategies):
        raise FedsimError(f"report: --paired-against {reference!r} is not a strategy of these runs; "
                          f"allowed: {', '.join(map(str, strategies))}")
    if len(strategies) < 2:
        return table
    base = next(s for s in strategies if str(s) == str(reference)) if reference not in (None, "") else strategies[0]
    per_seed, setting_of = table.attrs.get("per_seed") or {}, table.attrs.get("setting") or {}
    _, digits = _scale_digits(metric[len("final_"):])
    keys = [_row_key(r) for r in table.to_dict("records")]
    reference_rows = {setting_of.get(k): k for k, s in zip(keys, table["strategy"]) if s == base}
    column = f"diff_vs_{base}"
    diffs, cis, ns, unpaired, dropped = [], [], [], [], []
    for key, row in zip(keys, table.to_dict("records")):
        setting, pairs = setting_of.get(key), per_seed.get(key)
        ref = reference_rows.get(setting) if setting is not None else None
        ref_pairs = per_seed.get(ref) if ref is not None else None
        if row["strategy"] == base or setting is None or not pairs or not ref_pairs:
            diffs.append(math.nan), cis.append(math.nan), ns.append(0)
            continue
        a, b = _series(pairs), _series(ref_pairs)
        where = f"{row['strategy']} at sigma={_cell(row.get('sigma'), 'sigma')}"
        try:
            mean, ci, n = paired_difference(a, b)
        except ValueError:  # a seed twice on one side: the runs cannot be paired
            n = 0
        if n == 0:
            mean, ci = welch_difference(a, b)
            unpaired.append(where)
        elif n < max(len(a), len(b)):
            dropped.append(f"{where}: n = {n} of {len(a)} and {len(b)} {base} seeds")
        diffs.append(round(mean, digits) + 0.0)
        cis.append(round(ci, digits) if ci == ci else math.nan)
        ns.append(n)
    out = table.assign(**{column: diffs, "diff_ci95": cis, "diff_seeds": ns})
    out.attrs.update(table.attrs)
    out.attrs["paired"] = {"column": "strategy", "against": str(base), "long": True, "unpaired": unpaired,
                           "dropped": dropped, "n": {column: ns}}
    return out


def _plus_minus(mean: float, ci: float, sign: str = "") -> str:
    return f"{mean:{sign}g} ± {ci:g}" if ci == ci else f"{mean:{sign}g}"


def pivot_table(table: pd.DataFrame, column: str, paired_against: Any = None,
                unpaired: bool = False) -> pd.DataFrame:
    """One column per value of `column` (e.g. strategy); the other descriptive columns stay
    as the row index. Compact tables for papers and READMEs.

    Paired by default: the reference value (`paired_against`, else the column's first value)
    keeps "final +- ci95"; every other value V becomes a column "V − reference" holding the
    paired difference (`paired_difference`) over the seeds both have in that row, in the
    table's unit. A value that shares no seed with the reference in any row (or whose rows
    cannot be told apart, when the reference was not named) keeps "final +- ci95", unpaired,
    and the caption says so. ``attrs["paired"]`` holds the column, the reference, n per cell,
    the seeds left out and the unpaired columns; `render` writes them under the markdown
    table and into JSON. `unpaired` (--unpaired) gives "final +- ci95" in every column."""
    metric = next(c for c in table.columns if c.startswith("final_"))
    if column not in table:
        raise FedsimError(f"report: --pivot column {column!r} is not in the table")
    drop = {metric, "ci95", f"best_{metric[6:]}", column, "seeds"}
    index = [c for c in table.columns if c not in drop and not c.startswith("diff_")]
    cells = table.assign(_v=[_plus_minus(m, c) for m, c in zip(table[metric], table["ci95"])])
    wide = cells.pivot_table(index=index, columns=column, values="_v", aggfunc="first", sort=False)
    wide.columns = [str(c) for c in wide.columns]
    wide = wide.reset_index()
    for name in ("per_seed", "setting", "val_mean", "paired"):
        wide.attrs.pop(name, None)
    values = [c for c in wide.columns if c not in index]
    if unpaired or len(values) < 2 and paired_against in (None, ""):
        return wide
    named = paired_against not in (None, "")
    return _paired(wide, table, column, str(paired_against) if named else values[0], index, metric, named)


def _paired(wide: pd.DataFrame, table: pd.DataFrame, column: str, base: str, index: list[str],
            metric: str, named: bool = True) -> pd.DataFrame:
    """`wide` with each non-reference column replaced by its paired difference from `base`;
    `named`: the reference was asked for (--paired-against), so rows that cannot be paired are
    refused rather than shown unpaired."""
    original = {str(v): v for v in table[column].unique()}
    values = [c for c in wide.columns if c not in index]
    if base not in values:
        raise FedsimError(f"report: --paired-against {base!r} is not a value of --pivot column {column!r}; "
                          f"allowed: {', '.join(values)}")
    per_seed = table.attrs.get("per_seed")
    if per_seed is None:
        if not named:
            wide.attrs["paired"] = {"column": column, "against": base, "n": {}, "dropped": [],
                                    "unpaired": [v for v in values if v != base],
                                    "why": "the table holds no per-seed values"}
            return wide
        raise FedsimError("report: --paired-against needs the per-seed values that fedsim.report.report "
                          "keeps in the table's attrs; pivot a table it returned")
    _, digits = _scale_digits(metric[len("final_"):])
    varying: list[str] = []  # the fewest columns (in table order) that tell the rows apart, to name a row
    for c in index:
        if len({tuple(r) for r in wide[varying + [c]].astype(str).to_numpy()}) > \
                len({tuple(r) for r in wide[varying].astype(str).to_numpy()}):
            varying.append(c)
    others = [v for v in values if v != base]
    # a value that shares no seed with the reference in any row stays unpaired; rows that
    # cannot be told apart are refused below when the reference was named, else left unpaired
    try:
        kept = [v for v in others if _shares_seeds(wide, per_seed, original, index, column, base, v)]
    except FedsimError:
        kept = others if named else []
    if not kept:
        wide.attrs["paired"] = {"column": column, "against": base, "n": {}, "dropped": [], "unpaired": others}
        return wide
    unpaired_values = [v for v in others if v not in kept]
    others = kept
    headers = {v: f"{v} − {base}" for v in others}
    counts: dict[str, list[int]] = {headers[v]: [] for v in others}
    dropped: list[str] = []
    out = wide.copy()
    for i, row in wide.iterrows():
        setting = {c: row[c] for c in index}
        where = ", ".join(f"{c}={_cell(row[c], c)}" for c in varying)
        at = f" at {where}" if where else ""

        def runs(value: str, setting=setting) -> pd.Series | None:
            pairs = per_seed.get(_row_key({**setting, column: original[value]}), ())
            if pairs is None:
                raise FedsimError(f"report: --paired-against: two groups of runs share the row of {column}="
                                  f"{value}{at}; add the key that tells them apart to --group-by")
            return pd.Series([v for _, v in pairs], index=[s for s, _ in pairs], dtype=float) if pairs else None

        b = runs(base)
        for value in others:
            a = runs(value)
            if a is None:
                counts[headers[value]].append(0)
                continue
            if b is None:
                out.at[i, value] = math.nan
                counts[headers[value]].append(0)
                dropped.append(f"{value}{at}: no {base} run to pair with")
                continue
            try:
                mean, ci, n = paired_difference(a, b)
            except ValueError as exc:
                raise FedsimError(f"report: --paired-against: {exc} among the {value} or {base} runs{at}; "
                                  f"add the key that tells them apart to --group-by") from None
            counts[headers[value]].append(n)
            only_a, only_b = [s for s in a.index if s not in b.index], [s for s in b.index if s not in a.index]
            if only_a or only_b:
                sides = [f"seed{'s' * (len(s) > 1)} {', '.join(map(str, s))}, only in {name}"
                         for s, name in ((only_a, value), (only_b, base)) if s]
                dropped.append(f"{value} − {base}{at}: n = {n} (left out: {'; '.join(sides)})")
            if n == 0:
                out.at[i, value] = math.nan
                continue
            rounded = round(mean, digits) + 0.0  # + 0.0: no "-0"
            out.at[i, value] = _plus_minus(rounded, round(ci, digits) if ci == ci else ci, "+")
    out = out[index + [base] + [v for v in values if v != base]].rename(columns=headers)
    out.attrs["paired"] = {"column": column, "against": base, "n": counts, "dropped": dropped,
                           "unpaired": unpaired_values}
    return out


def _shares_seeds(wide: pd.DataFrame, per_seed: Mapping, original: Mapping, index: list[str], column: str,
                  base: str, value: str) -> bool:
    """Whether `value` shares a seed with `base` in some row of the pivot (and every row of
    both can be told apart); raises `FedsimError` where rows are ambiguous."""
    shared = False
    for _, row in wide.iterrows():
        setting = {c: row[c] for c in index}
        a = per_seed.get(_row_key({**setting, column: original[value]}), ())
        b = per_seed.get(_row_key({**setting, column: original[base]}), ())
        if a is None or b is None:
            raise FedsimError("ambiguous rows")
        if {s for s, _ in a} & {s for s, _ in b}:
            shared = True
    return shared


def paired_note(paired: Mapping[str, Any]) -> str:
    """The sentences under a paired table: what its difference columns hold, with n, and
    which comparisons are unpaired (no shared seed) instead."""
    ns = sorted({n for cells in paired["n"].values() for n in cells if n})
    n = "no seed" if not ns else f"n = {ns[0]}" if len(ns) == 1 else f"n = {ns[0]} to {ns[-1]} per cell"
    base = paired["against"]
    unpaired = paired.get("unpaired", [])
    if paired.get("long"):
        text = (f"Paired: diff_vs_{base} is each row's final metric minus {paired['column']} {base}'s at the "
                f"same setting, per seed, over the seeds both have (diff_seeds: {n}); mean ± diff_ci95, the "
                f"half-width of the 95% t-interval of the per-seed differences.")
        if unpaired:
            text += (" Unpaired (no shared seed; difference of means ± 95% Welch interval, diff_seeds 0): "
                     + "; ".join(unpaired) + ".")
    elif not paired["n"]:
        why = paired.get("why", "no seed is shared with it")
        text = (f"Unpaired: every column is its own mean ± ci95; no column could be paired with "
                f"{paired['column']} {base} ({why}).")
    else:
        text = (f"Paired: columns \"V − {base}\" are paired differences from {paired['column']} {base}: per "
                f"seed, V's final metric minus {base}'s, over the seeds both have in that row ({n}); mean ± "
                f"half-width of the 95% t-interval of the differences. The {base} column is its own mean ± ci95.")
        if unpaired:
            text += (f" Unpaired (no seed shared with {base}), each its own mean ± ci95: "
                     + ", ".join(unpaired) + ".")
    if paired["dropped"]:
        text += " Seeds on one side only are left out: " + "; ".join(paired["dropped"]) + "."
    return text


def best_note(selected_on: Sequence[str], best_per_on: str | None = None) -> str:
    """The sentence under a table on what its best_* column and --best-per rows selected on."""
    on = list(selected_on)
    text = BEST_NOTE[on[0]] if len(on) == 1 else (
        "best_*: the test metric at the best round, selected on the validation split where a run has one "
        "and on the test split (optimistic) where it has none (data.validation_fraction = 0)")
    if best_per_on == "validation":
        text += "; --best-per rows chosen by their mean final validation metric"
    elif best_per_on == "test":
        text += ("; --best-per rows chosen by their final test metric (the runs have no validation split): "
                 "the chosen rows' numbers are optimistic")
    return text + "."


def _cell(value, column: str) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        if math.isnan(value):
            return "-"
        if column.endswith("epsilon"):
            return f"{value:.2f}"
        return f"{value:g}"
    return str(value)


def to_markdown(table: pd.DataFrame, unit: str, paired: Mapping[str, Any] | None = None,
                epsilon_note: str = "", best: str = "") -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_cell(row[c], c) for c in cols) + " |")
    notes = (f"\n\nMetric: {unit}, mean over seeds; ci95 (or ±) is the half-width "
             "of the 95% t-interval over seeds.\n") + (paired_note(paired) + "\n" if paired else "")
    notes += f"Best: {best}\n" if best and any(c.startswith("best_") for c in cols) else ""
    return "\n".join(lines) + notes + (f"Epsilon: {epsilon_note}\n" if epsilon_note else "")


def _latex_escape(text: str) -> str:
    return (text.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")
            .replace("−", "$-$"))


def to_latex(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    align = "".join("r" if pd.api.types.is_numeric_dtype(table[c]) else "l" for c in cols)

    def cell(v, c):
        text = _cell(v, c)
        return r"$\infty$" if text == "inf" else _latex_escape(text)

    body = [" & ".join(_latex_escape(c) for c in cols) + r" \\", r"\midrule"]
    for _, row in table.iterrows():
        body.append(" & ".join(cell(row[c], c) for c in cols) + r" \\")
    return "\n".join([r"% requires \usepackage{booktabs}", rf"\begin{{tabular}}{{{align}}}", r"\toprule",
                      *body, r"\bottomrule", r"\end{tabular}"]) + "\n"


def to_json(table: pd.DataFrame, unfinished: list[str], skipped: Sequence[str] = (),
            paired: Mapping[str, Any] | None = None, epsilon_note: str = "", best: str = "") -> str:
    records = [{k: (None if isinstance(v, float) and math.isnan(v) else
                    ("inf" if isinstance(v, float) and math.isinf(v) else v))
                for k, v in row.items()} for row in table.to_dict("records")]
    extra = {"paired": {**paired, "note": paired_note(paired)}} if paired else {}
    if epsilon_note:
        extra["epsilon_note"] = epsilon_note
    if best:
        extra["best_note"] = best
    return json.dumps({"rows": records, "unfinished": unfinished, "skipped": list(skipped), **extra}, indent=2,
                      default=str) + "\n"


def to_csv(table: pd.DataFrame) -> str:
    return table.to_csv(index=False)


def plot(table: pd.DataFrame, path: str | Path | None = None, *, log_epsilon: bool = False):
    """Final metric against epsilon, one line per strategy and --group-by values, each with
    its 95% CI band and its non-private reference (dashed, same colour); see
    `fedsim.plots.privacy_utility_figure`. Returns the matplotlib Figure (shown inline in a
    notebook) and writes it to `path` (.png, .pdf, .svg, ...) when given."""
    from fedsim.plots import privacy_utility_figure, save_figure

    fig = privacy_utility_figure(table, log_epsilon=log_epsilon)
    if path is not None:
        save_figure(fig, path)
    return fig


def _keys(keys: str | Sequence[str]) -> list[str]:
    """Config keys given as a sequence, or as one comma-separated string (the CLI's form)."""
    if isinstance(keys, str):
        keys = keys.split(",")
    return [k.strip() for k in keys if k.strip()]


def apply_filters(frame: pd.DataFrame, where: Where) -> pd.DataFrame:
    """Keep runs whose config matches every key = value. A string value is compared with the
    config's value as text (what --where KEY=VALUE gives); any other value by equality.
    (key, value) pairs may repeat a key: all must match, as repeated --where flags do."""
    pairs = list(where.items() if isinstance(where, Mapping) else where)
    for key, value in pairs:
        if key not in frame:
            raise FedsimError(f"report: --where key {key!r} is not a config key of these runs")
        if isinstance(value, str):
            frame = frame[frame[key].astype(str) == value]
        else:  # element by element: a list value is stored as a tuple, and == would broadcast
            wanted = tuple(value) if isinstance(value, list) else value
            frame = frame[frame[key].map(lambda v, w=wanted: v == w).astype(bool)]
    if frame.empty:
        raise FedsimError(f"report: no finished runs match {' and '.join(f'{k}={v}' for k, v in pairs)}")
    return frame


def metric_unit(metric_name: str) -> str:
    """How the table's footnote names its metric."""
    return "% accuracy" if metric_name == "accuracy" else "test MSE"


def report(path: str | Path, *, group_by: str | Sequence[str] = (), best_per: str | Sequence[str] = (),
           where: Where | None = None, pivot: str = "", paired_against: Any = None,
           median: bool = False, unpaired: bool = False) -> pd.DataFrame:
    """The privacy-utility table of the runs under `path` (a run or a sweep directory).

    group_by: extra config keys that split rows (e.g. ["data.alpha"]). best_per: keep only
    the best row per group of these columns (they must be table columns, so group-by keys).
    where: only runs whose config has these values (a dict, or (key, value) pairs). pivot:
    one column per value of this table column (e.g. "strategy"). Comparisons are paired by
    default: with pivot every column but the reference becomes "V − reference", the paired
    difference over the seeds both have (`pivot_table`); without, a table of several
    strategies gains diff_vs_<reference>, diff_ci95 and diff_seeds (`paired_columns`).
    paired_against: the reference (a value of the pivot column, or a strategy; default the
    first). unpaired: no differences, every cell its own mean ± ci95. median: show each run's
    median client's sample-level epsilon beside its largest.

    The numbers are already rounded for display. ``table.attrs`` holds ``unfinished`` (runs
    missing from the table, as "name (status)"), ``skipped`` (malformed runs left out, as
    "name: why"), ``metric_name``, ``group_by``, ``epsilon_note`` (what each epsilon
    column holds), ``best_note`` (what the best_* column and best_per selected on: validation,
    or test for runs without a validation split), which `render` and `plot` use, and ``mixed``
    (`mixed_settings`: config keys whose runs differ within a row, which the CLI warns about).
    Raises `FedsimError` for a missing path, no finished runs, mixed metrics, a bad key, or
    paired_against with unpaired or not among the compared values.
    """
    check_paired(pivot, paired_against, unpaired)
    frame, unfinished = load_runs(path)
    skipped = list(frame.attrs.get("skipped", []))
    if where:
        frame = apply_filters(frame, where)
    metric_name = str(frame["metric_name"].iloc[0])
    table = build_table(frame, _keys(group_by), median)
    kept = {k: table.attrs[k] for k in ("per_seed", "setting", "val_mean")}
    mixed, selected_on = table.attrs["mixed"], table.attrs["best_selected_on"]
    best_per_on = None
    if not pivot and not unpaired:
        table = paired_columns(table, paired_against)
        if "paired" in table.attrs:
            kept["paired"] = table.attrs["paired"]
    if _keys(best_per):
        table = best_rows(table, _keys(best_per))
        best_per_on = table.attrs["best_per_on"]
    table.attrs.update(kept)
    if pivot:
        table = pivot_table(table, pivot, paired_against, unpaired)
    table.attrs.update(unfinished=list(unfinished), skipped=skipped, metric_name=metric_name, mixed=mixed,
                       group_by=_keys(group_by), epsilon_note=EPSILON_NOTE,
                       best_note=best_note(selected_on, best_per_on))
    return table


def render(table: pd.DataFrame, fmt: str = "md", unfinished: list[str] | None = None,
           unit: str | None = None) -> str:
    """The table as text: "md", "csv", "latex" or "json". `unfinished` (listed by json) and
    the metric's unit (markdown's footnote) default to what `report` put in table.attrs."""
    if fmt not in FORMATS:
        raise FedsimError(f"report: format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    if unfinished is None:
        unfinished = list(table.attrs.get("unfinished", []))
    if unit is None:
        name = table.attrs.get("metric_name") or next(
            (c[len("final_"):] for c in table.columns if c.startswith("final_")), "")
        unit = metric_unit(name)
    if fmt == "md":
        return to_markdown(table, unit, table.attrs.get("paired"), table.attrs.get("epsilon_note", ""),
                           table.attrs.get("best_note", ""))
    if fmt == "csv":
        return to_csv(table)
    if fmt == "latex":
        return to_latex(table)
    return to_json(table, unfinished, table.attrs.get("skipped", []), table.attrs.get("paired"),
                   table.attrs.get("epsilon_note", ""), table.attrs.get("best_note", ""))
