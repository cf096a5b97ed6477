"""The figures, checked as matplotlib objects (lines, labels, limits, colours), not only as
files: the privacy-utility plot of `fedsim report` and the label plot of `fedsim partition`."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba

import fedsim.plots
from fedsim.plots import label_distribution_figure, save_figure, short_names
from fedsim.report import plot, report
from tests.test_report import write_run

ALPHAS = (0.1, 1.0)
SIGMAS = {0.0: math.inf, 0.5: 40.0, 1.0: 12.0}


def final_of(strategy: str, alpha: float, sigma: float, seed: int) -> float:
    """A distinct accuracy per cell, so each line's y values identify its group."""
    return 0.5 + 0.2 * (strategy == "fedprox") + 0.1 * (alpha == 1.0) - 0.1 * sigma + 0.02 * seed


@pytest.fixture
def alpha_runs(tmp_path):
    root = tmp_path / "runs"
    for strategy in ("fedavg", "fedprox"):
        for alpha in ALPHAS:
            for sigma, eps in SIGMAS.items():
                for seed in (0, 1):
                    write_run(root, f"{strategy}-{alpha}-{sigma}-{seed}", strategy=strategy, alpha=alpha,
                              sigma=sigma, seed=seed, eps=eps, final=final_of(strategy, alpha, sigma, seed))
    return root


def solid_and_dashed(ax):
    solid = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    return solid, dashed


def test_group_by_draws_one_line_and_one_reference_per_group(alpha_runs):
    """Before: the groups of --group-by data.alpha were merged into one zig-zag line per
    strategy, and only the first group's reference was drawn."""
    fig = plot(report(alpha_runs, group_by="data.alpha"))
    ax = fig.axes[0]
    solid, dashed = solid_and_dashed(ax)
    assert sorted(line.get_label() for line in solid) == [
        "fedavg, alpha=0.1", "fedavg, alpha=1", "fedprox, alpha=0.1", "fedprox, alpha=1"]
    assert len(dashed) == 4
    for line in solid:
        strategy, alpha = line.get_label().split(", alpha=")
        alpha = float(alpha)
        assert list(line.get_xdata()) == [12.0, 40.0]  # finite epsilons, increasing
        expected = [round(100 * np.mean([final_of(strategy, alpha, s, seed) for seed in (0, 1)]), 1)
                    for s in (1.0, 0.5)]
        assert list(line.get_ydata()) == pytest.approx(expected)
        reference = 100 * np.mean([final_of(strategy, alpha, 0.0, seed) for seed in (0, 1)])
        ref = [d for d in dashed if d.get_ydata()[0] == pytest.approx(reference, abs=0.05)]
        assert len(ref) == 1 and to_rgba(ref[0].get_color()) == to_rgba(line.get_color()), line.get_label()
    assert len({to_rgba(line.get_color()) for line in solid}) == 4
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "fedavg, alpha=0.1" in legend and "non-private (ε = ∞)" in legend


def test_axes_carry_units_and_the_accountant(alpha_runs):
    ax = plot(report(alpha_runs)).axes[0]
    assert ax.get_ylabel() == "final accuracy (%)"
    assert ax.get_xlabel() == "ε (sample-level, largest client, mean over seeds, RDP (Opacus), δ=1e-5)"
    assert ax.get_xscale() == "linear"


def test_log_epsilon_axis_from_the_cli(cli, alpha_runs, tmp_path, monkeypatch):
    figures = []
    real_save = fedsim.plots.save_figure
    monkeypatch.setattr(fedsim.plots, "save_figure", lambda fig, path: figures.append(fig) or real_save(fig, path))
    code, _, err = cli("report", alpha_runs, "--group-by", "data.alpha", "--plot", tmp_path / "pu.pdf",
                       "--log-epsilon")
    assert code == 0, err
    assert (tmp_path / "pu.pdf").read_bytes()[:5] == b"%PDF-"
    ax = figures[0].axes[0]
    assert ax.get_xscale() == "log" and ax.get_xlabel().endswith(", log scale")
    assert len(solid_and_dashed(ax)[0]) == 4


def band_limits(ax) -> tuple[float, float]:
    ys = np.concatenate([p.vertices[:, 1] for c in ax.collections for p in c.get_paths()])
    return float(ys.min()), float(ys.max())


def test_confidence_bands_are_clipped_to_the_metric_range(tmp_path):
    """Three seeds at 0.99, 1.0, 0.8: the t-interval (± 36 points) runs past 100% and the
    MSE one below 0; neither the band nor the axis may leave the metric's range."""
    acc, mse = tmp_path / "acc", tmp_path / "mse"
    for seed, final in enumerate((0.99, 1.0, 0.8)):
        for sigma, eps in ((0.5, 4.0), (1.0, 2.0)):
            write_run(acc, f"{sigma}-{seed}", sigma=sigma, seed=seed, eps=eps, final=final)
            write_run(mse, f"{sigma}-{seed}", sigma=sigma, seed=seed, eps=eps, final=1.0 - final, metric="mse")
    table = report(acc)
    assert (table["final_accuracy"] + table["ci95"]).max() > 120  # the unclipped band would pass 100
    ax = plot(table).axes[0]
    low, high = band_limits(ax)
    assert 0 <= low and high == 100.0
    assert 0 <= ax.get_ylim()[0] and ax.get_ylim()[1] <= 100
    table = report(mse)
    assert (table["final_mse"] - table["ci95"]).min() < 0
    ax = plot(table).axes[0]
    assert band_limits(ax)[0] == 0.0 and ax.get_ylim()[0] >= 0
    assert ax.get_ylabel() == "final test MSE"


def test_label_level_axis_and_a_single_point_gets_an_error_bar():
    """A bags table: no DP-SGD, so ε is the label-level one (pure ε-DP: no δ)."""
    rows = [{"strategy": "bags", "strategy.bags.bag_size": k, "sigma": 0.0, "sample_epsilon": math.inf,
             "sample_accountant": "-", "label_epsilon": eps, "label_accountant": "Laplace", "delta": 1e-5,
             "final_mse": mse, "ci95": 0.1, "best_mse": mse, "seeds": 2}
            for k, eps, mse in ((1, math.inf, 0.5), (1, 1.0, 8.0), (8, math.inf, 0.7), (8, 1.0, 0.9), (8, 4.0, 0.8))]
    table = pd.DataFrame(rows)
    table.attrs["group_by"] = ["strategy.bags.bag_size"]
    ax = plot(table).axes[0]
    assert ax.get_xlabel() == "ε (label-level, Laplace)"
    solid, dashed = solid_and_dashed(ax)
    assert sorted(line.get_label() for line in solid) == ["bags, bag_size=1", "bags, bag_size=8"]
    assert len(dashed) == 2
    assert len(ax.containers) == 1  # bag size 1 has one private point: an error bar, not a band


def test_short_names_keep_keys_apart():
    assert short_names(["data.alpha", "strategy.x.alpha", "client.lr"]) == {
        "data.alpha": "data.alpha", "strategy.x.alpha": "x.alpha", "client.lr": "lr"}


def bar_colors(ax) -> list:
    return [to_rgba(c.patches[0].get_facecolor()) for c in ax.containers]


def test_label_plot_uses_a_qualitative_palette_and_the_counts():
    """Before: flwr-datasets' default diverging palette (neighbouring labels in near-equal
    colours), drawn from the partitioner rather than the counts the run trains on."""
    from matplotlib import colormaps

    counts = np.random.default_rng(0).integers(0, 30, size=(6, 10))
    ax = label_distribution_figure(counts, label_names=[f"c{i}" for i in range(10)], title="t").axes[0]
    assert bar_colors(ax) == [to_rgba(colormaps["tab10"](i)) for i in range(10)]
    tops = np.max([[p.get_y() + p.get_height() for p in c.patches] for c in ax.containers], axis=0)
    assert tops.tolist() == counts.sum(axis=1).tolist()  # stacked to each client's size
    assert ax.get_legend().get_title().get_text() == "label"
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == sorted(f"c{i}" for i in range(10))
    ax = label_distribution_figure(np.ones((3, 14), dtype=int)).axes[0]
    assert bar_colors(ax) == [to_rgba(colormaps["tab20"](i)) for i in range(14)]


def test_regression_label_plot_says_target_deciles(cli, tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(fedsim.plots, "save_figure", lambda fig, path: figures.append(fig))
    code, _, err = cli("partition", "--dataset", "diabetes", "--num-clients", "4", "--clients-per-round", "2",
                       "--partitioner", "dirichlet", "--alpha", "0.5", "--plot", tmp_path / "labels.png")
    assert code == 0, err
    ax = figures[0].axes[0]
    assert "deciles of the regression target" in ax.get_title()
    assert ax.get_legend().get_title().get_text() == "target decile"
    assert [t.get_text() for t in ax.get_legend().get_texts()][-1] == "0–10%"


def test_save_figure_writes_atomically(tmp_path):
    fig = label_distribution_figure(np.ones((2, 2), dtype=int))
    save_figure(fig, tmp_path / "sub" / "labels.svg")
    assert (tmp_path / "sub" / "labels.svg").read_text().lstrip().startswith("<?xml")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["labels.svg"]  # no temporary file left
