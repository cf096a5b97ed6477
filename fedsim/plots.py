"""Plots: per-client label distributions and privacy-utility curves (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedsim.config import Config  # noqa: E402


def plot_label_distribution(cfg: Config, counts: np.ndarray, path: Path) -> None:
    """Stacked bars of label counts per client (flwr-datasets' bar layout, from our counts so
    that feature-skew and regression deciles are shown too)."""
    from flwr_datasets.visualization import plot_label_distributions

    from fedsim.partition import partition

    part = partition(cfg).partitioner
    fig, _, _ = plot_label_distributions(part, label_name="label", plot_type="bar", size_unit="absolute",
                                         partition_id_axis="x", legend=True, verbose_labels=False,
                                         title=f"{cfg.data.dataset}: {cfg.data.partitioner} over "
                                               f"{len(counts)} clients")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
