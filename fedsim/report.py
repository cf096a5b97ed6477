"""`fedsim report`: privacy-utility tables from run directories, as a library.

Rows are strategy x privacy setting (plus any group-by keys), averaged over seeds:
final metric as mean +- 95% CI (Student t over seeds), best-round metric, and the
epsilon of each privacy level with its accountant and delta. A non-private row
(sigma = 0, epsilon = inf) is the reference. Every output format is rendered from the
same rounded numbers, so markdown, CSV, LaTeX and JSON agree digit for digit.
Unfinished or missing cells are listed, never dropped silently.

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

from fedsim.errors import FedsimError
from fedsim.results import CONFIG_TOML, read_summary

FORMATS = ("md", "csv", "latex", "json")
Where = Mapping[str, Any] | Sequence[tuple[str, Any]]

# Runs calibrated to a target epsilon have a sigma that depends on client sizes (and so on
# the seed): they are grouped by their target, not by sigma.
PRIVACY_KEYS = ["privacy.target_epsilon", "privacy.user_target_epsilon", "_sigma", "_user_sigma"]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = tuple(v) if isinstance(v, list) else v
    return out


def find_runs(path: Path) -> list[Path]:
    """`path` itself if it is a run directory, else every run directory below it."""
    if (path / CONFIG_TOML).is_file():
        return [path]
    return sorted(p.parent for p in path.rglob(CONFIG_TOML))


def load_runs(path: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """One row per finished run (its flattened config plus the summary's metrics and
    epsilons); plus the names of runs that are missing or unfinished, so that a caller can
    say which cells a table lacks."""
    from fedsim.sweep import read_manifest

    path = Path(path)
    if not path.exists():
        raise FedsimError(f"report: {path} does not exist")
    rows, unfinished = [], []
    for run in find_runs(path):
        summary = read_summary(run)
        if not summary or summary.get("status") != "finished":
            unfinished.append(f"{run.name} ({summary.get('status', 'no summary') if summary else 'no summary'})")
            continue
        cfg = _flatten(tomllib.loads((run / CONFIG_TOML).read_text()))
        sample, user = summary.get("sample_level") or {}, summary.get("user_level") or {}
        rows.append({**cfg, "run": run.name, "metric_name": summary["metric_name"],
                     "final_metric": summary["final_metric"], "best_metric": summary["best_metric"],
                     "sample_epsilon": sample.get("epsilon_max") if sample.get("accountant") else math.inf,
                     "sample_accountant": sample.get("accountant") or "",
                     "user_epsilon": user.get("epsilon") if user else None,
                     "user_accountant": user.get("accountant", "") if user else "",
                     "label_epsilon": (summary.get("label_level") or {}).get("epsilon"),
                     "label_accountant": (summary.get("label_level") or {}).get("accountant", ""),
                     "delta": sample.get("delta")})
    manifest = read_manifest(path) if path.is_dir() else None
    if manifest:
        present = {r["run"] for r in rows} | {u.split(" (")[0] for u in unfinished}
        unfinished += [f"{name} (not started)" for name in manifest if name not in present]
    if not rows:
        raise FedsimError(f"report: no finished runs under {path}" +
                          (f" ({len(unfinished)} unfinished)" if unfinished else ""))
    frame = pd.DataFrame(rows)
    names = frame["metric_name"].unique()
    if len(names) > 1:
        raise FedsimError(f"report: runs have incompatible metrics ({', '.join(names)}); "
                          f"report them separately")
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


def build_table(frame: pd.DataFrame, group_by: list[str]) -> pd.DataFrame:
    """The privacy-utility table, numbers already rounded for display."""
    is_acc = frame["metric_name"].iloc[0] == "accuracy"
    scale, digits = (100.0, 1) if is_acc else (1.0, 4)
    extra = [k for k in group_by if k in frame]
    frame = frame.assign(
        _sigma=frame["privacy.noise_multiplier"].where(frame["privacy.target_epsilon"] <= 0, -1.0),
        _user_sigma=frame["privacy.user_noise_multiplier"].where(frame["privacy.user_target_epsilon"] <= 0, -1.0))
    keys = ["strategy.name"] + extra + PRIVACY_KEYS
    out = []
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
            "sample_epsilon": round(float(sample_eps.mean()), 2) if np.isfinite(sample_eps).all() else math.inf,
            "sample_accountant": sub["sample_accountant"].iloc[0] or "-",
        })
        if sub["user_epsilon"].notna().any():
            row["user_sigma"] = round(float(sub["privacy.user_noise_multiplier"].mean()), 3)
            row["user_epsilon"] = round(float(sub["user_epsilon"].astype(float).mean()), 2)
            row["user_accountant"] = sub["user_accountant"].iloc[0]
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
    table = pd.DataFrame(out)
    if "label_epsilon" in table:  # a bags run without label noise is the non-private reference
        table["label_epsilon"] = table["label_epsilon"].fillna(math.inf)
        table["label_accountant"] = table["label_accountant"].fillna("-")
    # non-private reference first within each strategy, then by growing epsilon
    return table.sort_values(["strategy", "sample_epsilon", "sigma"], ascending=[True, False, True],
                             key=lambda s: s if s.name != "sample_epsilon" else s.replace(math.inf, 1e18),
                             ignore_index=True)


def best_rows(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The best row (by final metric) within each group of `keys`: e.g. the best
    (bag size, rho) at each label epsilon."""
    metric = next(c for c in table.columns if c.startswith("final_"))
    ascending = not metric.endswith("accuracy")
    missing = [k for k in keys if k not in table]
    if missing:
        raise FedsimError(f"report: --best-per key {missing[0]!r} is not a table column; "
                          f"add it to --group-by")
    ordered = table.sort_values(metric, ascending=ascending)
    return ordered.groupby(keys, sort=True, dropna=False).head(1).sort_values(keys, ignore_index=True)


def pivot_table(table: pd.DataFrame, column: str) -> pd.DataFrame:
    """One column per value of `column` (e.g. strategy) holding "final +- ci95"; the other
    descriptive columns stay as the row index. Compact tables for papers and READMEs."""
    metric = next(c for c in table.columns if c.startswith("final_"))
    if column not in table:
        raise FedsimError(f"report: --pivot column {column!r} is not in the table")
    drop = {metric, "ci95", f"best_{metric[6:]}", column, "seeds"}
    index = [c for c in table.columns if c not in drop]
    cells = table.assign(_v=[f"{m:g} ± {c:g}" if c == c else f"{m:g}" for m, c in zip(table[metric], table["ci95"])])
    wide = cells.pivot_table(index=index, columns=column, values="_v", aggfunc="first", sort=False)
    wide.columns = [str(c) for c in wide.columns]
    return wide.reset_index()


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


def to_markdown(table: pd.DataFrame, unit: str) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_cell(row[c], c) for c in cols) + " |")
    return "\n".join(lines) + (f"\n\nMetric: {unit}, mean over seeds; ci95 (or ±) is the half-width "
                                "of the 95% t-interval over seeds.\n")


def _latex_escape(text: str) -> str:
    return text.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


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


def to_json(table: pd.DataFrame, unfinished: list[str]) -> str:
    records = [{k: (None if isinstance(v, float) and math.isnan(v) else
                    ("inf" if isinstance(v, float) and math.isinf(v) else v))
                for k, v in row.items()} for row in table.to_dict("records")]
    return json.dumps({"rows": records, "unfinished": unfinished}, indent=2, default=str) + "\n"


def to_csv(table: pd.DataFrame) -> str:
    return table.to_csv(index=False)


def plot(table: pd.DataFrame, path: str | Path) -> None:
    """Metric against sample-level epsilon, one line per strategy, with a 95% CI band.
    The non-private reference (epsilon = inf) is a dashed horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = next(c for c in table.columns if c.startswith("final_"))
    eps_col = "sample_epsilon" if np.isfinite(table["sample_epsilon"]).any() else "user_epsilon"
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (strategy, sub) in enumerate(table.groupby("strategy")):
        color = f"C{i}"
        finite = sub[np.isfinite(sub[eps_col].astype(float))].sort_values(eps_col)
        ci = finite["ci95"].fillna(0)
        ax.plot(finite[eps_col], finite[metric], "o-", color=color, label=strategy)
        ax.fill_between(finite[eps_col], finite[metric] - ci, finite[metric] + ci, color=color, alpha=0.2)
        ref = sub[~np.isfinite(sub[eps_col].astype(float))]
        if len(ref):
            ax.axhline(float(ref[metric].iloc[0]), color=color, ls="--", lw=1)
    ax.set_xlabel(f"{eps_col.replace('_', ' ')} (delta = {table['delta'].iloc[0]:g})")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title("privacy-utility (dashed: non-private)")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
           where: Where | None = None, pivot: str = "") -> pd.DataFrame:
    """The privacy-utility table of the runs under `path` (a run or a sweep directory).

    group_by: extra config keys that split rows (e.g. ["data.alpha"]). best_per: keep only
    the best row per group of these columns (they must be table columns, so group-by keys).
    where: only runs whose config has these values (a dict, or (key, value) pairs). pivot:
    one column per value of this table column (e.g. "strategy") holding "final ± ci95".

    The numbers are already rounded for display. ``table.attrs`` holds ``unfinished`` (runs
    missing from the table, as "name (status)") and ``metric_name``, which `render` uses.
    Raises `FedsimError` for a missing path, no finished runs, mixed metrics or a bad key.
    """
    frame, unfinished = load_runs(path)
    if where:
        frame = apply_filters(frame, where)
    metric_name = str(frame["metric_name"].iloc[0])
    table = build_table(frame, _keys(group_by))
    if _keys(best_per):
        table = best_rows(table, _keys(best_per))
    if pivot:
        table = pivot_table(table, pivot)
    table.attrs.update(unfinished=list(unfinished), metric_name=metric_name)
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
        return to_markdown(table, unit)
    if fmt == "csv":
        return to_csv(table)
    if fmt == "latex":
        return to_latex(table)
    return to_json(table, unfinished)
