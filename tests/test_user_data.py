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
    frame(200).to_csv(tmp_path / "server.csv", index=False)
    frame(50, seed=3).to_csv(tmp_path / "mine.csv", index=False)
    cfg = tiny(**{"data.dataset": "file", "data.path": str(tmp_path / "server.csv"), "data.label_column": "target"})
    x, y = node_data(cfg, {"data-path": str(tmp_path / "mine.csv")})
    assert x.shape == (50, 4) and len(y) == 50  # features a, b, c, site; the whole file
    assert set(np.unique(y)) <= {0, 1}


def test_data_holder_needs_only_the_servers_data_spec(tiny, tmp_path):
    """A SuperNode with its own file trains although the experiment's file lives only with the
    server: discovery hands it the data spec; its rows get the same columns, standardization
    and class ids as the server's data (labels matched by their original value)."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedsim.clients.app import query, train
    from fedsim import records as R
    from fedsim.config import dumps_toml
    from fedsim.models import build_model
    from fedsim.node_data import data_spec

    server_file = tmp_path / "server.csv"
    df = frame(200)
    df["target"] = np.where(df["target"] == 1, 7, 3)  # original labels 3 and 7 -> classes 0 and 1
    df.to_csv(server_file, index=False)
    cfg = tiny(**{"data.dataset": "file", "data.path": str(server_file), "data.label_column": "target",
                  "model.name": "logreg", "federation.num_clients": 2, "federation.clients_per_round": 2,
                  "privacy.noise_multiplier": 1.0})
    data = load_dataset(cfg.data, 2, cfg.seed)
    spec = data_spec(data)
    assert spec["feature-columns"] == ["a", "b", "c", "site"] and spec["label-values"] == ["3", "7"]

    mine = frame(40, seed=5)
    mine["target"] = np.where(mine["target"] == 1, 7, 3)
    mine = mine.assign(extra=1.0)[["site", "target", "c", "extra", "a", "b"]]  # other order, one more column
    mine.to_csv(tmp_path / "mine.csv", index=False)
    server_file.unlink()  # the node cannot see the server's data

    node_config = {"data-path": str(tmp_path / "mine.csv")}
    context = Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 5
    discovery = Message(RecordDict({R.CONFIG: ConfigRecord({R.RUN_CONFIG_KEY: dumps_toml(cfg)}),
                                    R.DATA_SPEC: ConfigRecord(spec)}), 5, R.QUERY_PARTITION)
    discovery.metadata.__dict__["_message_id"] = "q1"
    query(discovery, context)

    from fedsim.node_data import node_data, node_dataset

    node_view = node_dataset(cfg, node_config, context.state.config_records[R.DATA_SPEC])
    x, y = node_data(cfg, node_config, node_view)
    expected = (mine[["a", "b", "c", "site"]].to_numpy(np.float32) - data.encoding.shift) / data.encoding.scale
    np.testing.assert_allclose(x, expected, rtol=1e-5)
    np.testing.assert_array_equal(y, (mine["target"] == 7).astype(int))

    model = build_model(cfg.model, data, cfg.seed)
    msg = Message(RecordDict({R.ARRAYS: R.model_to_record(model),
                              R.CONFIG: ConfigRecord({R.SERVER_ROUND: 1})}), 5, "train")
    msg.metadata.__dict__["_message_id"] = "t1"
    reply = train(msg, context)
    assert not reply.has_error()
    assert reply.content[R.METRICS][R.NUM_EXAMPLES] == 40
    # one epoch of DP-SGD on its 40 rows: ceil(40 / 32) = 2 steps at q = 1/2, sigma = 1
    from fedsim.privacy.accounting import epsilon

    assert reply.content[R.METRICS][R.LOCAL_STEPS] == 2
    assert reply.content[R.METRICS][R.EPSILON] == pytest.approx(epsilon([(1.0, 0.5, 2)], 1e-5), rel=1e-9)


@pytest.mark.parametrize("name", ["digits", "breast-cancer"])
def test_builtin_tables_read_from_sklearns_files_equal_sklearns_loaders(name, monkeypatch):
    """digits and breast-cancer read scikit-learn's shipped files directly (its import costs
    about 1.2 s of every run's start): the arrays must be exactly its loaders', and the
    fallback (file not found) must give the same."""
    from sklearn import datasets as skd

    from fedsim import datasets as D

    read = {"digits": D.load_digits_arrays, "breast-cancer": D.load_breast_cancer_arrays}[name]
    want = {"digits": skd.load_digits, "breast-cancer": skd.load_breast_cancer}[name]()
    for found in (True, False):
        if not found:
            monkeypatch.setattr(D, "_sklearn_data_file", lambda file_name: None)
        data, target = read()
        assert data.dtype == want.data.dtype and target.dtype == want.target.dtype
        np.testing.assert_array_equal(data, want.data)
        np.testing.assert_array_equal(target, want.target)


def test_a_digits_run_does_not_import_sklearn():
    import subprocess
    import sys

    code = ("import sys\nfrom fedsim.config import load_config\nfrom fedsim.datasets import load_dataset\n"
            "d = load_dataset(load_config(None).data, 10, 0)\nassert len(d.y_train) > 1000\n"
            "print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_values_near_float32s_limit_are_standardized_not_turned_into_nan(tmp_path):
    """3e38 fits float32, but its square (the std) and a difference of two (the shift) do not:
    those inputs are standardized in float64, so a finite file gives finite inputs and labels."""
    import numpy as np
    import pandas as pd

    from fedsim.config import load_config
    from fedsim.datasets import _load

    n = 60
    frame = pd.DataFrame({"big": np.where(np.arange(n) % 2, 3e38, -3e38), "small": np.arange(n) * 0.1,
                          "target": np.where(np.arange(n) % 3, 3e38, -3e38)})
    frame.to_csv(tmp_path / "big.csv", index=False)
    data = _load(load_config(None, {"data.dataset": "file", "data.path": str(tmp_path / "big.csv"),
                                    "data.label_column": "target", "data.task": "regression"}).data, 2, 0)
    for array in (data.x_train, data.x_test, data.y_train, data.y_test):
        assert array.dtype == np.float32 and np.isfinite(array).all()
    column = data.x_train[:, 0].astype(np.float64)  # standardized on the training split: mean 0, std 1
    assert abs(column.mean()) < 1e-5 and abs(column.std() - 1) < 1e-5
    assert abs(data.y_train.astype(np.float64).mean()) < 1e-5 and abs(data.y_train.std() - 1) < 1e-5
