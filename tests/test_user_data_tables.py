"""User tables as people download them: string labels, string / boolean / pandas-categorical
feature columns, missing values. The encoding is checked against ``pandas.get_dummies`` on the
training split; data holders must encode identical rows identically."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pandas as pd
import pytest

from fedsim.datasets import load_dataset
from fedsim.errors import ConfigError

MEASUREMENTS = ["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g"]


def penguins(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """Palmer-penguins-like: a string label, two string categoricals (island, sex), four numbers."""
    rng = np.random.default_rng(seed)
    species = rng.choice(["Adelie", "Chinstrap", "Gentoo"], n)
    adelie, chinstrap, gentoo = (species == s for s in ("Adelie", "Chinstrap", "Gentoo"))
    island = np.where(gentoo, "Biscoe", rng.choice(["Biscoe", "Dream", "Torgersen"], n))
    return pd.DataFrame({
        "species": species, "island": island,
        "bill_length_mm": (np.select([adelie, chinstrap], [38.8, 48.8], 47.5) + rng.normal(0, 2.5, n)).round(1),
        "bill_depth_mm": (np.where(gentoo, 15.0, 18.4) + rng.normal(0, 1.0, n)).round(1),
        "flipper_length_mm": (np.select([adelie, chinstrap], [190.0, 196.0], 217.0) + rng.normal(0, 6, n)).round(),
        "body_mass_g": (np.where(gentoo, 5076.0, 3720.0) + rng.normal(0, 400, n)).round(),
        "sex": rng.choice(["female", "male"], n)})


# Missing cells of `with_missing`, per column; 9 rows have at least one.
MISSING = {"species": 1, "bill_length_mm": 2, "bill_depth_mm": 2, "flipper_length_mm": 2, "body_mass_g": 2,
           "sex": 8}


def with_missing(df: pd.DataFrame) -> pd.DataFrame:
    """Like the real penguins: two rows without any measurement or sex, sex unknown in five
    more, one blank sex, one row without a label."""
    df = df.astype({"sex": object, "species": object})
    df.loc[[3, 271], MEASUREMENTS + ["sex"]] = np.nan
    df.loc[[8, 9, 10, 11, 47], "sex"] = None
    df.loc[60, "sex"] = "  "  # a blank string is missing too
    df.loc[100, "species"] = np.nan
    return df


def complete_rows(raw: pd.DataFrame) -> pd.DataFrame:
    """The rows without a missing value, by an independent rule: NaN/None or a blank string."""
    blank = raw.apply(lambda col: col.map(lambda v: isinstance(v, str) and not v.strip()))
    return raw[~(raw.isna() | blank).any(axis=1)]


def split_positions(n: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """fedsim's documented split: a seeded permutation, the first round(fraction * n) held out."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(test_fraction * n))
    return np.sort(order[n_test:]), order[:n_test]


def file_cfg(tiny, path, label="species", **kw):
    """A user file's config, without a validation split: these tests hold the test split and the
    encoding to their re-derivations on the whole training split (tests/test_partition.py holds
    the validation split to its own)."""
    return tiny(**{"data.dataset": "file", "data.path": str(path), "data.label_column": label,
                   "data.validation_fraction": 0.0, **kw})


@pytest.fixture
def fedsim_log(caplog, monkeypatch):
    """fedsim's log records (its logger stops propagating once the CLI has set it up)."""
    monkeypatch.setattr(logging.getLogger("fedsim"), "propagate", True)
    return caplog


def test_penguins_csv_is_one_hot_encoded_like_get_dummies_on_the_train_split(tiny, tmp_path, fedsim_log):
    df = with_missing(penguins())
    kept = complete_rows(df).index.to_numpy()
    train, test = split_positions(len(kept))
    df.loc[kept[test[0]], "island"] = "Atlantis"  # a category only the test split holds
    path = tmp_path / "penguins.csv"
    df.to_csv(path, index=False)

    data = load_dataset(file_cfg(tiny, path).data, 6, 0)

    raw = complete_rows(pd.read_csv(path)).reset_index(drop=True)
    assert len(raw) == len(df) - 9
    tr, te = raw.iloc[train].drop(columns="species"), raw.iloc[test].drop(columns="species")
    expected = pd.get_dummies(tr, columns=["island", "sex"], dtype=np.float32)
    assert data.encoding.input_names == tuple(expected.columns)
    assert "island_Atlantis" not in expected.columns
    mean, std = tr[MEASUREMENTS].mean(), tr[MEASUREMENTS].std(ddof=0) + 1e-8
    expected[MEASUREMENTS] = (expected[MEASUREMENTS] - mean) / std  # one-hot inputs stay 0/1
    np.testing.assert_allclose(data.x_train, expected.to_numpy(np.float32), rtol=1e-5, atol=1e-5)
    expected_test = pd.get_dummies(te, columns=["island", "sex"], dtype=np.float32)
    expected_test = expected_test.reindex(columns=expected.columns, fill_value=0.0)
    expected_test[MEASUREMENTS] = (expected_test[MEASUREMENTS] - mean) / std
    np.testing.assert_allclose(data.x_test, expected_test.to_numpy(np.float32), rtol=1e-5, atol=1e-5)
    islands = [i for i, name in enumerate(data.encoding.input_names) if name.startswith("island_")]
    assert len(islands) == 3 and not data.x_test[0, islands].any()  # unseen in training: all zeros

    assert data.task == "classification" and data.label_values == ("Adelie", "Chinstrap", "Gentoo")
    np.testing.assert_array_equal(data.y_train, pd.Categorical(raw.species.iloc[train]).codes)
    np.testing.assert_array_equal(data.y_test, pd.Categorical(raw.species.iloc[test]).codes)

    drops = [r.getMessage() for r in fedsim_log.records if "missing" in r.getMessage()]
    assert len(drops) == 1, drops
    assert f"dropped 9 of {len(df)} rows" in drops[0]
    assert ("per column: species 1, bill_length_mm 2, bill_depth_mm 2, flipper_length_mm 2, body_mass_g 2, "
            "sex 8") in drops[0]


def adult_like(n: int = 400, seed: int = 1) -> pd.DataFrame:
    """Census-like: many categoricals of every kind pandas has (pandas category, str, bool)."""
    rng = np.random.default_rng(seed)
    education = rng.choice(["Bachelors", "HS-grad", "Masters", "Some-college", "Doctorate"], n)
    df = pd.DataFrame({
        "age": rng.integers(17, 80, n),
        "workclass": pd.Categorical(rng.choice(["Private", "Self-emp", "Federal-gov", "Local-gov"], n)),
        "education": education,
        "married": rng.random(n) < 0.5,
        "occupation": pd.Categorical(rng.choice(["Tech-support", "Craft-repair", "Sales", "Exec-managerial"], n)),
        "hours_per_week": rng.normal(40, 10, n).round(1),
        "native_country": rng.choice(["United-States", "Mexico", "India", "Germany"], n, p=[0.7, 0.1, 0.1, 0.1])})
    score = (np.isin(education, ["Masters", "Doctorate"]) * 2.0 + df.married + (df.hours_per_week - 40) / 10
             + rng.normal(0, 0.5, n))
    df["income"] = np.where(score > 1.0, ">50K", "<=50K")
    return df


def test_parquet_with_pandas_categories_booleans_and_blank_strings(tiny, tmp_path, fedsim_log):
    df = adult_like()
    df["native_country"] = df["native_country"].astype(object)
    df.loc[[5, 6], "native_country"] = ""  # empty strings survive Parquet: they are missing values
    df.loc[7, "native_country"] = None
    path = tmp_path / "adult.parquet"
    df.to_parquet(path)
    assert pd.read_parquet(path).workclass.dtype == "category"

    data = load_dataset(file_cfg(tiny, path, label="income").data, 6, 0)

    raw = pd.read_parquet(path).drop(index=[5, 6, 7]).reset_index(drop=True)
    train, test = split_positions(len(raw))
    categorical = ["workclass", "education", "married", "occupation", "native_country"]
    expected = pd.get_dummies(raw.iloc[train].drop(columns="income"), columns=categorical, dtype=np.float32)
    assert data.encoding.input_names == tuple(expected.columns)
    assert {"married_False", "married_True", "workclass_Private"} <= set(data.encoding.input_names)
    numeric = ["age", "hours_per_week"]
    tr = raw.iloc[train][numeric].astype(np.float32)
    expected[numeric] = (expected[numeric].astype(np.float32) - tr.mean()) / (tr.std(ddof=0) + 1e-8)
    np.testing.assert_allclose(data.x_train, expected.to_numpy(np.float32), rtol=1e-5, atol=1e-5)
    assert data.label_values == ("<=50K", ">50K")
    (drop,) = [r.getMessage() for r in fedsim_log.records if "missing" in r.getMessage()]
    assert "dropped 3 of 400 rows" in drop and "(per column: native_country 3)" in drop


def test_regression_with_a_categorical_column(tiny, tmp_path):
    rng = np.random.default_rng(2)
    n = 200
    region = rng.choice(["north", "south", "east"], n)
    size = rng.normal(100, 20, n)
    price = 3.0 * size + np.select([region == "north", region == "south"], [50.0, -50.0], 0.0) + rng.normal(0, 5, n)
    path = tmp_path / "houses.csv"
    pd.DataFrame({"size": size, "region": region, "price": price}).to_csv(path, index=False)

    data = load_dataset(file_cfg(tiny, path, label="price").data, 6, 0)

    assert data.task == "regression" and data.num_classes == 1
    assert data.encoding.input_names == ("size", "region_east", "region_north", "region_south")
    train, _ = split_positions(n)
    raw = pd.read_csv(path)
    assert data.y_shift == pytest.approx(raw.price.iloc[train].mean(), rel=1e-6)
    np.testing.assert_allclose(data.y_train * data.y_scale + data.y_shift, raw.price.iloc[train], rtol=1e-5)
    np.testing.assert_array_equal(data.x_train[:, 1:], pd.get_dummies(raw.region.iloc[train], dtype=np.float32))


def test_missing_error_policy_refuses_naming_columns_and_counts(tiny, tmp_path):
    path = tmp_path / "penguins.csv"
    with_missing(penguins()).to_csv(path, index=False)
    with pytest.raises(ConfigError) as err:
        load_dataset(file_cfg(tiny, path, **{"data.missing": "error"}).data, 6, 0)
    message = str(err.value)
    assert message.startswith("data.missing: ") and "\n" not in message and str(path) in message
    assert "in 9 of 300 rows" in message
    assert "species 1, bill_length_mm 2, bill_depth_mm 2, flipper_length_mm 2, body_mass_g 2, sex 8" in message


def test_npz_nan_features_and_labels_follow_the_missing_policy(tiny, tmp_path, fedsim_log):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(100, 4))
    y = (x[:, 0] > 0).astype(float)
    x[[2, 5], 1] = np.nan
    x[5, 3] = np.nan
    y[9] = np.nan
    path = tmp_path / "data.npz"
    np.savez(path, x=x, y=y)

    data = load_dataset(file_cfg(tiny, path, label="y").data, 6, 0)

    assert len(data.y_train) + len(data.y_test) == 97
    assert np.isfinite(data.x_train).all() and np.isfinite(data.x_test).all()
    assert data.label_values == ("0", "1")
    (drop,) = [r.getMessage() for r in fedsim_log.records if "missing" in r.getMessage()]
    assert "dropped 3 of 100 rows" in drop and "x[:, 1] 2, x[:, 3] 1, y 1" in drop
    with pytest.raises(ConfigError, match=r"^data\.missing: .*in 3 of 100 rows"):
        load_dataset(file_cfg(tiny, path, label="y", **{"data.missing": "error"}).data, 6, 0)


def test_builtin_data_with_nan_is_not_trained_on_silently(tiny, monkeypatch, fedsim_log):
    """The built-ins have no NaN today; a generator that produced one goes through the same policy."""
    import fedsim.datasets as datasets

    clean = datasets.linear_gaussian

    def with_nan(*args, **kwargs):
        x, y = clean(*args, **kwargs)
        x[0, 2] = np.nan
        y[1] = np.nan
        return x, y

    monkeypatch.setattr(datasets, "linear_gaussian", with_nan)
    cfg = tiny(**{"data.dataset": "linear", "data.linear_dim": 5, "data.synthetic_samples": 20})
    data = load_dataset(cfg.data, 6, 0)
    assert len(data.y_train) + len(data.y_val) + len(data.y_test) == 120 - 2 and np.isfinite(data.x_train).all()
    (drop,) = [r.getMessage() for r in fedsim_log.records if "missing" in r.getMessage()]
    assert "dropped 2 of 120 rows of linear" in drop
    cfg.data.missing = "error"
    with pytest.raises(ConfigError, match=r"^data\.missing: linear has missing values .* x\[:, 2\] 1, y 1"):
        load_dataset(cfg.data, 6, 0)


def test_data_holder_encodes_identical_rows_identically(tiny, tmp_path):
    """A node's file holds some of the server's rows, shuffled, columns in another order, one
    row with a category the training split never saw, one incomplete row; its 'zone' column
    reads as integers where the server's reads as text. Through the data spec (as a Flower
    ConfigRecord carries it) every shared row gets exactly the server's inputs and class id."""
    from flwr.app import ConfigRecord

    from fedsim.node_data import data_spec, dataset_from_spec, node_data

    df = with_missing(penguins())
    df["zone"] = np.random.default_rng(4).choice(["1", "2", "X"], len(df))
    server_file = tmp_path / "server.csv"
    df.to_csv(server_file, index=False)
    cfg = file_cfg(tiny, server_file)
    data = load_dataset(cfg.data, 6, 0)
    assert {"zone_1", "zone_2", "zone_X"} <= set(data.encoding.input_names)

    kept = complete_rows(df)
    train, test = split_positions(len(kept))
    server_x = np.empty((len(kept), data.num_features), np.float32)
    server_x[train], server_x[test] = data.x_train, data.x_test
    server_y = np.empty(len(kept), np.int64)
    server_y[train], server_y[test] = data.y_train, data.y_test

    rng = np.random.default_rng(5)
    picks = rng.permutation(np.flatnonzero(kept.zone.isin(["1", "2"]).to_numpy()))[:40]
    mine = kept.iloc[picks][["sex", "body_mass_g", "zone", "species", "island", "flipper_length_mm",
                             "bill_depth_mm", "bill_length_mm"]]
    unseen = mine.iloc[[0]].assign(island="Atlantis")
    incomplete = mine.iloc[[1]].assign(body_mass_g=np.nan)
    pd.concat([mine, unseen, incomplete]).to_csv(tmp_path / "mine.csv", index=False)
    assert pd.read_csv(tmp_path / "mine.csv").zone.dtype == np.int64
    server_file.unlink()  # the node never sees the server's file

    spec = dict(ConfigRecord(data_spec(data)))
    x, y = node_data(cfg, {"data-path": str(tmp_path / "mine.csv")}, dataset_from_spec(cfg, spec))

    assert x.shape == (41, data.num_features)  # the incomplete row is dropped
    np.testing.assert_array_equal(x[:40], server_x[picks])
    np.testing.assert_array_equal(y[:40], server_y[picks])
    islands = [i for i, name in enumerate(data.encoding.input_names) if name.startswith("island_")]
    others = [i for i in range(data.num_features) if i not in islands]
    assert not x[40, islands].any()
    np.testing.assert_array_equal(x[40, others], server_x[picks[0], others])


def test_penguins_csv_trains_from_the_cli(cli, tmp_path):
    """The user report: a downloaded penguins-like CSV (string label, two string columns, missing
    values) trains with the three keys set, and clearly beats guessing the majority class."""
    path = tmp_path / "penguins.csv"
    with_missing(penguins()).to_csv(path, index=False)
    out = tmp_path / "run"
    code, stdout, err = cli("run", "--set", 'data.dataset="file"', "--set", f"data.path='{path}'",
                            "--set", 'data.label_column="species"', "--num-clients", "4", "--clients-per-round",
                            "2", "--rounds", "2", "--local-epochs", "2", "--lr", "0.3", "--out", out)
    assert code == 0, err
    final = float(list(csv.DictReader((out / "rounds.csv").open()))[-1]["metric"])
    test_species = complete_rows(with_missing(penguins())).species.iloc[split_positions(291)[1]]
    majority = test_species.value_counts(normalize=True).max()
    assert final > majority + 0.3, (final, majority)


def test_drop_columns_keeps_rows_a_mostly_empty_column_would_drop(tiny, tmp_path):
    """Titanic-like: an id column and a mostly empty 'cabin'. By default cabin's gaps drop most
    rows and the id is one-hot encoded; data.drop_columns leaves both out and keeps every row."""
    df = penguins(200)
    df["passenger"] = [f"p{i}" for i in range(len(df))]
    df["cabin"] = np.where(np.arange(len(df)) % 5 == 0, "C85", None)
    path = tmp_path / "titanic-like.csv"
    df.to_csv(path, index=False)
    n_test = int(round(0.2 * len(df)))
    default = load_dataset(file_cfg(tiny, path).data, 4, 0)
    assert len(default.y_train) + len(default.y_test) == len(df) // 5  # only rows with a cabin survive
    assert any(name.startswith("passenger_") for name in default.encoding.input_names)
    dropped = load_dataset(file_cfg(tiny, path, **{"data.drop_columns": ["passenger", "cabin"]}).data, 4, 0)
    assert (len(dropped.y_train), len(dropped.y_test)) == (len(df) - n_test, n_test)
    assert not any(name.startswith(("passenger", "cabin")) for name in dropped.encoding.input_names)
    with pytest.raises(ConfigError, match="data.drop_columns: .*'Cabin'"):
        load_dataset(file_cfg(tiny, path, **{"data.drop_columns": ["Cabin"]}).data, 4, 0)
