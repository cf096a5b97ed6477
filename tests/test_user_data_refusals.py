"""A user file fedsim cannot train on is refused before any work: one line naming the key,
the file and the problem, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tests.test_user_data_tables import MEASUREMENTS, penguins, with_missing


def write_csv(text: str):
    def make(path):
        path.with_suffix(".csv").write_text(text)
        return path.with_suffix(".csv")
    return make


def make_penguins(path, change=lambda df: df, suffix=".csv", numeric=False):
    """A penguins-like file; ``numeric``: the label and the four measurements only, a file the
    code before categorical support read, so a refusal case fails there for its own reason."""
    target = path.with_suffix(suffix)
    df = penguins()
    df = change(df[["species", *MEASUREMENTS]] if numeric else df)
    df.to_parquet(target) if suffix == ".parquet" else df.to_csv(target, index=False)
    return target


def corrupt_parquet(path):
    target = path.with_suffix(".parquet")
    penguins().to_parquet(target)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])  # cut off, footer lost
    return target


def garbage_npz(path):
    target = path.with_suffix(".npz")
    target.write_bytes(b"this is no zip archive at all")
    return target


def corrupt_npz(path):
    target = path.with_suffix(".npz")
    np.savez(target, x=np.ones((50, 3)), y=np.arange(50) % 2)
    data = bytearray(target.read_bytes())
    data[200:260] = b"\xff" * 60  # inside the first array: its CRC no longer matches
    target.write_bytes(bytes(data))
    return target


def pickled_npz(path):
    target = path.with_suffix(".npz")
    x = np.empty((50, 2), dtype=object)
    x[:] = "a"
    np.savez(target, x=x, y=np.arange(50) % 2)
    return target


def with_datetimes(df):
    return df.assign(seen=pd.date_range("2024-01-01", periods=len(df), freq="D"))


def with_inf(df):
    df.loc[[4, 17], "body_mass_g"] = np.inf
    return df


def with_huge(df):
    df.loc[[4, 17], "body_mass_g"] = 1e308  # finite in float64, infinite in float32
    return df


def with_list_column(path):
    target = path.with_suffix(".parquet")
    df = penguins()
    df["tags"] = [[1, 2]] * len(df)
    df.to_parquet(target)
    return target


def wide_csv(path):
    from fedsim.config import MAX_WIDTH

    target = path.with_suffix(".csv")
    header = ",".join(f"c{i}" for i in range(MAX_WIDTH + 1)) + ",species"
    target.write_text(header + "\n" + ",".join(["0"] * (MAX_WIDTH + 1)) + ",a\n")
    return target


def a_directory(path):
    path.mkdir()
    return path


CASES = {
    # name: (make the file, extra overrides, the key that starts the line, a phrase of the problem)
    "inf in a feature": (lambda p: make_penguins(p, with_inf, numeric=True), [], "data.path", "infinite"),
    "1e308 in a feature": (lambda p: make_penguins(p, with_huge, numeric=True), [], "data.path",
                           "beyond float32's range (e.g. 1e+308"),
    "1e308 in a regression label": (lambda p: make_penguins(p, lambda df: df.assign(
        species=np.where(np.arange(len(df)) == 3, 1e308, np.arange(len(df)) * 0.5)), numeric=True),
        [], "data.label_column", "beyond float32's range"),
    "parquet list column": (with_list_column, [], "data.path", "column 'tags'"),
    "wider than MAX_WIDTH": (wide_csv, [], "data.path", "65538 columns; at most 65536"),
    "a directory": (a_directory, [], "data.path", "is a directory"),
    "label dropped": (lambda p: make_penguins(p, numeric=True), ['data.drop_columns=["species"]'],
                      "data.drop_columns", "'species' is data.label_column"),
    "fractional labels as classes": (lambda p: make_penguins(p, lambda df: df.assign(
        species=np.arange(len(df)) * 0.37), numeric=True), ['data.task="classification"'], "data.task",
        "holds fractions such as 0.37"),
    "150 integer class ids under auto": (lambda p: make_penguins(p, lambda df: df.assign(
        species=np.arange(len(df)) % 150), numeric=True), [], "data.task", "150 distinct integers 0..149"),
    "one class": (lambda p: make_penguins(p, lambda df: df.assign(species="Adelie"), numeric=True), [],
                  "data.label_column", "single class (Adelie)"),
    "empty file": (write_csv(""), [], "data.path", "empty"),
    "whitespace only": (write_csv("\n\n"), [], "data.path", "empty"),
    "header only": (write_csv("a,b,species\n"), [], "data.path", "no rows"),
    "corrupt parquet": (corrupt_parquet, [], "data.path", "not a readable Parquet file"),
    "garbage npz": (garbage_npz, [], "data.path", "not an NPZ file"),
    "corrupt npz": (corrupt_npz, [], "data.path", "corrupt NPZ file"),
    "pickled npz": (pickled_npz, [], "data.path", "pickled Python objects"),
    "no label column": (lambda p: make_penguins(p, lambda df: df.drop(columns="species")), [],
                        "data.label_column", "'species' is not a column"),
    "ragged csv": (write_csv("a,b,species\n1,2,x\n3,4,y,5,6\n"), [], "data.path", "not a readable CSV file"),
    "datetime column": (lambda p: make_penguins(p, with_datetimes, ".parquet"), [], "data.path",
                        "column 'seen'"),
    "missing values, policy error": (lambda p: make_penguins(p, with_missing), ["data.missing='error'"],
                                     "data.missing", "sex 8"),
    "every row incomplete": (lambda p: make_penguins(p, lambda df: df.assign(bill_depth_mm=np.nan), numeric=True),
                             [], "data.path", "every row"),
    "tiny test split": (lambda p: make_penguins(p, numeric=True), ["data.test_fraction=0.0001"],
                        "data.test_fraction", "holds out 0; central evaluation needs at least 5"),
    "test split below the classes": (lambda p: make_penguins(p, lambda df: df.assign(
        species=[f"s{i % 40}" for i in range(len(df))]), numeric=True), ["data.test_fraction=0.1"],
        "data.test_fraction", "needs at least 40"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unusable_file_is_one_line_exit_2(cli, tmp_path, case):
    make, extra, key, phrase = CASES[case]
    path = make(tmp_path / "data")
    sets = [arg for item in extra for arg in ("--set", item)]
    code, _, err = cli("run", "--set", 'data.dataset="file"', "--set", f"data.path='{path}'",
                       "--set", 'data.label_column="species"', *sets, "--num-clients", "2",
                       "--clients-per-round", "2", "--rounds", "1", "--out", tmp_path / "run")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: {key}: ") and phrase in lines[0], lines[0]
    if key in ("data.path", "data.missing"):
        assert str(path) in lines[0]  # names the file
    assert not (tmp_path / "run" / "rounds.csv").exists()  # refused before any round


def test_one_class_left_after_dropping_incomplete_rows_is_refused(tiny, tmp_path):
    from fedsim.datasets import load_dataset
    from fedsim.errors import ConfigError

    path = make_penguins(tmp_path / "data", lambda df: df.assign(
        species=np.where(np.arange(len(df)) < 5, None, "Gentoo")), numeric=True)
    cfg = tiny(**{"data.dataset": "file", "data.path": str(path), "data.label_column": "species"})
    with pytest.raises(ConfigError, match=r"^data\.label_column: 'species' of .*data\.csv holds a single class "
                                          r"\(Gentoo\); classification needs at least 2 classes$"):
        load_dataset(cfg.data, 2, 0)


def test_tiny_test_split_names_a_fraction_that_works(cli, tmp_path):
    path = make_penguins(tmp_path / "data", numeric=True)
    code, _, err = cli("run", "--set", 'data.dataset="file"', "--set", f"data.path='{path}'",
                       "--set", 'data.label_column="species"', "--set", "data.test_fraction=0.0001",
                       "--out", tmp_path / "run")
    assert code == 2 and "data.test_fraction >= 0.017" in err  # 5 of 300 rows
    code, _, err = cli("run", "--set", 'data.dataset="file"', "--set", f"data.path='{path}'",
                       "--set", 'data.label_column="species"', "--set", "data.test_fraction=0.017",
                       "--num-clients", "2", "--clients-per-round", "2", "--rounds", "1", "--out", tmp_path / "run")
    assert code == 0, err


def test_data_holder_file_is_refused_like_the_servers(tiny, tmp_path):
    """A data holder reads its file with the same code: its bad file is one line too."""
    from fedsim.datasets import load_dataset
    from fedsim.errors import ConfigError
    from fedsim.node_data import node_data

    server = make_penguins(tmp_path / "server", numeric=True)
    cfg = tiny(**{"data.dataset": "file", "data.path": str(server), "data.label_column": "species"})
    load_dataset(cfg.data, cfg.federation.num_clients, cfg.seed)
    mine = make_penguins(tmp_path / "mine", with_inf, numeric=True)
    with pytest.raises(ConfigError, match=r"^data\.path: feature column 'body_mass_g' of .*mine\.csv holds 2 inf"):
        node_data(cfg, {"data-path": str(mine)})
    text = tmp_path / "text.csv"
    penguins()[["species", *MEASUREMENTS]].assign(body_mass_g="heavy").to_csv(text, index=False)
    with pytest.raises(ConfigError, match=r"^data\.path: feature column 'body_mass_g' .* holds 'heavy'; the "
                                          r"experiment's column is numeric"):
        node_data(cfg, {"data-path": str(text)})
    cfg.data.missing = "error"
    incomplete = make_penguins(tmp_path / "incomplete", lambda df: df.assign(body_mass_g=np.nan), numeric=True)
    with pytest.raises(ConfigError, match=r"^data\.missing: .*incomplete\.csv has missing values"):
        node_data(cfg, {"data-path": str(incomplete)})


def test_subprocess_refusal_is_one_line_without_traceback(tmp_path):
    path = make_penguins(tmp_path / "penguins", with_missing)
    res = subprocess.run([sys.executable, "-m", "fedsim.cli", "run", "--set", 'data.dataset="file"',
                          "--set", f"data.path='{path}'", "--set", 'data.label_column="species"',
                          "--set", 'data.missing="error"', "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith(f"error: data.missing: {path} has missing values")
