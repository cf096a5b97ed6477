"""User data files (CSV, Parquet, NPZ) and a real data holder's own file on a SuperNode."""

from __future__ import annotations

import csv

import numpy as np
import pandas as pd
import pytest

from fedsim.datasets import load_dataset
from fedsim.node_data import node_data
from fedsim.run import run_experiment


def frame(n=120, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    return pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "target": (x[:, 0] > 0).astype(int),
                         "site": rng.integers(0, 4, n)})


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".npz"])
def test_user_file_trains(tiny, tmp_path, suffix):
    df = frame()
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        df.to_csv(path, index=False)
    elif suffix == ".parquet":
        df.to_parquet(path)
    else:
        np.savez(path, x=df[["a", "b", "c"]].to_numpy(), y=df["target"].to_numpy())
    cfg = tiny(**{"data.dataset": "file", "data.path": str(path), "data.label_column": "target",
                  "model.name": "logreg", "federation.num_clients": 4, "federation.clients_per_round": 2,
                  "federation.rounds": 10, "client.lr": 0.5})
    if suffix != ".npz":
        cfg.data.partitioner = "natural-id"
        cfg.data.natural_id_column = "site"
    data = load_dataset(cfg.data, 4, cfg.seed)
    assert data.task == "classification" and data.num_classes == 2 and data.num_features == 3
    out = run_experiment(cfg, progress=False)
    last = list(csv.DictReader((out / "rounds.csv").open()))[-1]
    assert float(last["metric"]) > 0.8  # the label is a threshold on feature a


def test_data_holder_reads_its_own_file(tiny, tmp_path):
    df = frame(50)
    df.to_csv(tmp_path / "mine.csv", index=False)
    cfg = tiny(**{"data.label_column": "target"})
    x, y = node_data(cfg, {"data-path": str(tmp_path / "mine.csv")})
    assert x.shape == (50, 4) and len(y) == 50  # features a, b, c, site; the whole file
    assert set(np.unique(y)) <= {0, 1}
