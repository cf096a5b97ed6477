"""Figures: per-client label distributions and privacy-utility curves.

Every figure is built as a `matplotlib.figure.Figure` without pyplot: no global figure
state, nothing to close, no backend switched under a notebook's feet, and a caller (or a
test) can inspect the returned object before `save_figure` writes it. The builders take
plain arrays and tables, so they run without a dataset or a run directory.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from fedsim.errors import FedsimError

# Table columns `fedsim.report.build_table` writes; any other column is a --group-by key.
REPORT_COLUMNS = frozenset({
    "strategy", "target_epsilon", "sigma", "sample_epsilon", "sample_epsilon_seed_max", "sample_epsilon_median",
    "sample_accountant", "user_sigma",
    "user_epsilon", "user_accountant", "label_epsilon", "label_accountant", "delta", "ci95",
    "rounds", "clients", "per_round", "seeds"})

MARKERS = "osD^vP*Xph"


def plot_formats() -> frozenset[str]:
    """File extensions matplotlib can write (png, pdf, svg, ...): checked before any work."""
    return frozenset(Figure().canvas.get_supported_filetypes())


def check_plot_path(path: str | Path) -> Path:
    """The plot's path, refused (one line, exit 2) when matplotlib cannot write its extension."""
    path = Path(path)
    ext = path.suffix.lstrip(".").lower()
    if ext not in plot_formats():
        allowed = ", ".join("." + e for e in sorted(plot_formats()))
        raise FedsimError(f"--plot: {path} must end in one of {allowed} (got {path.suffix or 'no extension'!r})")
    return path


def save_figure(fig: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Write `fig` atomically (a temporary file in the same directory, then a rename), so a
    crash or a full disk never leaves a half-written figure where a good one was."""
    path = check_plot_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, dpi=dpi, format=path.suffix.lstrip(".").lower())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# ----------------------------------------------------------------------------- partitions

def label_colors(num_labels: int, ordinal: bool) -> list:
    """Distinct colours for categorical labels (tab10, then tab20: no order is implied); a
    sequential ramp (viridis) for ordered bins such as regression deciles. Beyond 20
    categories no qualitative palette stays distinguishable, so the ramp is used too."""
    from matplotlib import colormaps

    if not ordinal and num_labels <= 10:
        return [colormaps["tab10"](i) for i in range(num_labels)]
    if not ordinal and num_labels <= 20:
        return [colormaps["tab20"](i) for i in range(num_labels)]
    ramp = colormaps["viridis"]
    return [ramp(i / max(1, num_labels - 1)) for i in range(num_labels)]


def label_distribution_figure(counts: np.ndarray, *, regression: bool = False,
                              label_names: Sequence[str] = (), title: str = "") -> Figure:
    """Stacked bars of label counts per client, drawn from `counts` (clients x labels) itself,
    so the figure shows exactly the split the run trains on (leftover assignment and empty-
    client filling included). For regression the "labels" are target deciles, and the
    legend and title say so."""
    counts = np.asarray(counts)
    num_clients, num_labels = counts.shape
    if regression:
        edges = np.linspace(0, 100, num_labels + 1)
        names = [f"{lo:.0f}–{hi:.0f}%" for lo, hi in zip(edges[:-1], edges[1:])]
        legend_title = "target decile"
    else:
        names = list(label_names) if len(label_names) == num_labels else [str(i) for i in range(num_labels)]
        legend_title = "label"
    colors = label_colors(num_labels, ordinal=regression)
    fig = Figure(figsize=(min(14.0, 4.5 + 0.25 * num_clients), 4.2), layout="constrained")
    ax = fig.subplots()
    x = np.arange(num_clients)
    bottom = np.zeros(num_clients)
    for j in range(num_labels):
        ax.bar(x, counts[:, j], bottom=bottom, width=0.85 if num_clients <= 60 else 1.0, color=colors[j],
               label=names[j], linewidth=0)
        bottom += counts[:, j]
    ax.set_xlim(-0.6, num_clients - 0.4)
    ax.set_ylim(0, max(1.0, float(bottom.max())) * 1.04)
    ax.set_xlabel("client (partition id)")
    ax.set_ylabel("training samples")
    if num_clients <= 30:
        ax.set_xticks(x)
    if regression:
        title = f"{title}\n(colours: deciles of the regression target)" if title else \
            "colours: deciles of the regression target"
    ax.set_title(title, fontsize=10)
    # Legend entries top to bottom in the order of the stack (last label on top).
    handles, labels = ax.get_legend_handles_labels()
    ncol = 1 if num_labels <= 20 else math.ceil(num_labels / 20)
    ax.legend(handles[::-1], labels[::-1], title=legend_title, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              frameon=False, fontsize=8, ncol=ncol)
    return fig


def plot_label_distribution(cfg, counts: np.ndarray, path: str | Path) -> Path:
    """`fedsim partition --plot`: the figure of `label_distribution_figure`, titled with the
    dataset and partitioner, written to `path`."""
    from fedsim.datasets import load_dataset

    data = load_dataset(cfg.data, cfg.federation.num_clients, cfg.seed)
    d = cfg.data
    how = d.partitioner + {"dirichlet": f", α = {d.alpha:g}",
                           "iid-mix": f", s = {d.iid_fraction:g}, k = {d.classes_per_client}"}.get(d.partitioner, "")
    fig = label_distribution_figure(counts, regression=data.task == "regression", label_names=data.label_values,
                                    title=f"{d.dataset}: {how}, {len(counts)} clients, seed {cfg.seed}")
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- privacy-utility

def _delta_text(delta: float) -> str:
    """1e-05 -> 1e-5; 0 -> 0."""
    if delta == 0:
        return "0"
    return re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m.group(1) == "-" else "") + m.group(2), f"{delta:.3g}")


def _epsilon_column(table: pd.DataFrame) -> str:
    """The privacy level the x axis shows: sample-level where any run has DP-SGD, else
    user-level (central DP), else label-level (bags)."""
    for col in ("sample_epsilon", "user_epsilon", "label_epsilon"):
        if col in table and np.isfinite(table[col].astype(float)).any():
            return col
    raise FedsimError("report: --plot needs at least one private run (a finite epsilon); "
                      "every run here is non-private")


def epsilon_axis_label(table: pd.DataFrame, eps_col: str) -> str:
    """"ε (sample-level, largest client, mean over seeds, RDP (Opacus), δ=1e-5)": the level,
    the statistic the points are (`fedsim.report.EPSILON_NOTE`), the accountant when all
    private rows share one, and δ (every distinct one)."""
    level = eps_col.split("_")[0]
    finite = table[np.isfinite(table[eps_col].astype(float))]
    parts = [f"{level}-level"] + (["largest client, mean over seeds"] if level == "sample" else
                                  ["mean over seeds"] if level == "user" else [])
    acc_col = f"{level}_accountant"
    if acc_col in finite:
        accountants = sorted({str(a).split(", ")[0] for a in finite[acc_col] if a and a != "-"})
        if len(accountants) == 1:
            parts.append(accountants[0])
    if level == "label" or "delta" not in finite:
        return f"ε ({', '.join(parts)})"
    deltas = sorted(set(finite["delta"].astype(float)))
    parts.append("δ=" + "/".join(_delta_text(d) for d in deltas))
    return f"ε ({', '.join(parts)})"


def group_keys(table: pd.DataFrame) -> list[str]:
    """The columns that name a line besides the strategy: `report`'s --group-by keys."""
    keys = table.attrs.get("group_by")
    if keys is not None:
        return [k for k in keys if k in table]
    return [c for c in table.columns if c not in REPORT_COLUMNS and c != "strategy"
            and not c.startswith(("final_", "best_", "diff_"))]


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """The shortest dotted suffix that still tells each key apart: "strategy.bags.bag_size"
    -> "bag_size", but "data.alpha" and "strategy.x.alpha" keep enough to differ."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if sum(k == suffix or k.endswith("." + suffix) for k in keys) == 1:
                out[key] = suffix
                break
        else:
            out[key] = key
    return out


def _value_text(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "[" + ", ".join(_value_text(v) for v in value) + "]"
    return str(value)


def privacy_utility_figure(table: pd.DataFrame, *, log_epsilon: bool = False) -> Figure:
    """Final metric against ε: one line per (strategy, group-by values), with its 95% CI band
    clipped to the metric's range (accuracy in [0, 100] %, MSE >= 0), and that group's
    non-private reference (ε = ∞) as a dashed line of the same colour. Colours tell groups
    apart; markers tell strategies apart (for grayscale print)."""
    metric = next((c for c in table.columns if c.startswith("final_")), None)
    if metric is None:
        raise FedsimError("report: --plot needs the long table (one row per setting); "
                          "this one is pivoted")
    if table.empty:
        raise FedsimError("report: nothing to plot")
    is_acc = metric == "final_accuracy"
    lo_bound, hi_bound = (0.0, 100.0) if is_acc else (0.0, math.inf)
    eps_col = _epsilon_column(table)
    keys = group_keys(table)
    names = short_names(keys)
    strategies = sorted(table["strategy"].astype(str).unique())

    fig = Figure(figsize=(7.4, 4.2), layout="constrained")
    ax = fig.subplots()
    groups = list(table.groupby(["strategy", *keys], sort=True, dropna=False))
    palette = "tab10" if len(groups) <= 10 else "tab20"
    from matplotlib import colormaps

    colors = [colormaps[palette](i % (10 if palette == "tab10" else 20)) for i in range(len(groups))]
    drawn = []  # every y value drawn, to set limits inside the metric's range
    any_reference = False
    for color, (values, sub) in zip(colors, groups):
        values = values if isinstance(values, tuple) else (values,)
        strategy = str(values[0])
        label = ", ".join([strategy] + [f"{names[k]}={_value_text(v)}" for k, v in zip(keys, values[1:])])
        eps = sub[eps_col].astype(float)
        line = sub[np.isfinite(eps) & sub[metric].notna()].sort_values(eps_col)
        if log_epsilon:
            line = line[line[eps_col].astype(float) > 0]
        marker = MARKERS[strategies.index(strategy) % len(MARKERS)]
        if len(line):
            x = line[eps_col].astype(float).to_numpy()
            y = line[metric].astype(float).to_numpy()
            ci = line["ci95"].astype(float).fillna(0.0).to_numpy()
            low, high = np.clip(y - ci, lo_bound, hi_bound), np.clip(y + ci, lo_bound, hi_bound)
            ax.plot(x, y, marker=marker, ls="-", color=color, label=label, ms=5, lw=1.6)
            if len(x) > 1:
                # a light fill with its edges drawn, so overlapping bands stay tellable apart
                ax.fill_between(x, low, high, facecolor=to_rgba(color, 0.12), edgecolor=to_rgba(color, 0.45),
                                lw=0.6)
            else:  # a band needs two points; one point gets an error bar
                ax.errorbar(x, y, yerr=[y - low, high - y], color=color, capsize=3, lw=1, ls="none")
            drawn += [*low, *high, *y]
        ref = sub[np.isinf(eps) & sub[metric].notna()]
        if len(ref):
            level = float(ref[metric].astype(float).mean())
            ax.axhline(level, color=color, ls="--", lw=1.1, label=None if len(line) else label)
            drawn.append(level)
            any_reference = True
    if not drawn:
        raise FedsimError("report: nothing to plot (no row has a metric)")
    if log_epsilon:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")  # ticks at 1, 2, 3, 5 x 10^k, written as plain numbers
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    low, high = min(drawn), max(drawn)
    pad = max(0.05 * (high - low), 0.5 if is_acc else 1e-3 * max(abs(high), 1e-9))
    ax.set_ylim(max(lo_bound, low - pad), min(hi_bound, high + pad))
    ax.set_xlabel(epsilon_axis_label(table, eps_col) + (", log scale" if log_epsilon else ""))
    ax.set_ylabel("final accuracy (%)" if is_acc else f"final test {metric[len('final_'):].upper()}")
    ax.grid(True, alpha=0.3, lw=0.5)
    handles, labels = ax.get_legend_handles_labels()
    if any_reference:
        handles.append(Line2D([], [], color="0.35", ls="--", lw=1.1))
        labels.append("non-private (ε = ∞)")
    handles.append(Line2D([], [], color="0.35", lw=6, alpha=0.2))
    labels.append("95% CI over seeds")
    # Outside the axes, so that no band or reference line is hidden behind it.
    fig.legend(handles, labels, fontsize=8, frameon=False, loc="outside right upper")
    return fig
