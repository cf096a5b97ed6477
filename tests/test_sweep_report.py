"""Sweeps (cells, resume) and reports (seed aggregation, formats agree), through the CLI and
as library functions; and which warnings the CLI's quiet mode hides (only harmless ones)."""

from __future__ import annotations

import ast
import csv
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from scipy import stats

from fedsim.config import dumps_toml, load_config
from fedsim.errors import ConfigError, FedsimError
from fedsim.logs import setup_logging
from fedsim.report import load_runs, plot, render, report
from fedsim.results import write_json
from fedsim.sweep import plan_sweep, run_sweep

ROOT = Path(__file__).parent.parent

SWEEP_ARGS = ["--num-clients", "4", "--clients-per-round", "2", "--rounds", "2", "--set", "model.hidden=[16]",
              "--grid", "privacy.noise_multiplier=0,1", "--grid", "strategy.name=fedavg,fedprox"]


def cells(sweep):
    """The cell directories (the sweep's own records live in the hidden .cells)."""
    return sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_tiny_sweep_makes_the_expected_cells(cli, tmp_path):
    code, out, _ = cli("sweep", *SWEEP_ARGS, "--out", tmp_path / "sw")
    assert code == 0
    assert cells(tmp_path / "sw") == sorted(
        f"privacy.noise_multiplier={s}__strategy.name={n}" for s in (0, 1) for n in ("fedavg", "fedprox"))
    for cell in (tmp_path / "sw").iterdir():
        if cell.is_dir() and not cell.name.startswith("."):
            summary = json.loads((cell / "summary.json").read_text())
            assert summary["status"] == "finished" and summary["rounds_completed"] == 2
            private = "noise_multiplier=1" in cell.name
            assert summary["strategy"] == cell.name.split("strategy.name=")[1]
            # DP cells report a finite sample-level epsilon with its accountant, the others none
            # (null in strict JSON, with a note)
            assert (summary["sample_level"]["accountant"] == "RDP (Opacus)") == private
            eps = summary["sample_level"]["epsilon_max"]
            assert 0 < eps < math.inf if private else (eps is None and "note" in summary["sample_level"])
    cfg = load_config(tmp_path / "sw" / "privacy.noise_multiplier=1__strategy.name=fedprox" / "config.toml")
    assert cfg.strategy.name == "fedprox" and cfg.privacy.noise_multiplier == 1.0


def test_interrupted_sweep_resumes_and_keeps_finished_cells(cli, tmp_path):
    sweep = tmp_path / "sw"
    code, out, _ = cli("sweep", *SWEEP_ARGS, "--out", sweep, "--max-cells", "2")  # "killed" after 2
    done = {c: (sweep / c / "summary.json").stat().st_mtime_ns for c in cells(sweep)}
    assert len(done) == 2
    # a third cell that died mid-run: its summary says "running"
    broken = sweep / "privacy.noise_multiplier=1__strategy.name=fedavg"
    broken.mkdir()
    write_json(broken / "summary.json", {"status": "running"})
    code, out, _ = cli("sweep", *SWEEP_ARGS, "--out", sweep)
    assert code == 0 and "2 already finished, running 2" in out
    assert all((sweep / c / "summary.json").stat().st_mtime_ns == t for c, t in done.items())
    assert json.loads((broken / "summary.json").read_text())["status"] == "finished"
    code, out, _ = cli("sweep", *SWEEP_ARGS, "--out", sweep)
    assert "4 already finished, running 0" in out


ONE_CELL = ["--num-clients", "4", "--clients-per-round", "2", "--rounds", "1", "--set", "model.hidden=[8]",
            "--grid", "client.lr=0.1"]


def test_a_changed_config_is_refused_never_reused(cli, tmp_path):
    """A cell is its values AND its resolved config: re-running with --rounds 2 over a 1-round
    sweep used to say "1 already finished" and keep the 1-round result."""
    sweep = tmp_path / "sw"
    code, out, _ = cli("sweep", *ONE_CELL, "--out", sweep)
    assert code == 0 and "0 already finished, running 1" in out
    summary = sweep / "client.lr=0.1" / "summary.json"
    before = summary.read_bytes()
    code, out, err = cli("sweep", *ONE_CELL, "--rounds", "2", "--out", sweep)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "federation.rounds: 1 -> 2" in lines[0], err
    assert "client.lr=0.1" in lines[0] and summary.read_bytes() == before
    assert list(plan_sweep(None, grid={"client.lr": [0.1]}, out=sweep, overrides={
        "federation.num_clients": 4, "federation.clients_per_round": 2, "federation.rounds": 2,
        "model.hidden": [8]})["status"]) == ["conflict"]
    # the same config is reused, also with a longer round timeout (it cannot change a result)
    code, out, _ = cli("sweep", *ONE_CELL, "--set", "runtime.round_timeout=900", "--out", sweep)
    assert code == 0 and "1 already finished, running 0" in out and summary.read_bytes() == before
    # a cell made before sweeps kept a record of its config is checked against its config.toml
    shutil.rmtree(sweep / ".cells")
    assert cli("sweep", *ONE_CELL, "--out", sweep)[0] == 0
    code, _, err = cli("sweep", *ONE_CELL, "--set", "client.momentum=0.9", "--out", sweep)
    assert code == 2 and "client.momentum: 0.0 -> 0.9" in err and summary.read_bytes() == before


def test_a_cell_made_before_the_validation_split_is_reused_at_fraction_zero(cli, tmp_path):
    """A cell recorded before data.validation_fraction existed trained on the whole training
    split: it is the planned cell at validation_fraction = 0 (what the published configs pin),
    and another experiment under the new default 0.1."""
    sweep = tmp_path / "sw"
    pinned = [*ONE_CELL, "--set", "data.validation_fraction=0"]
    assert cli("sweep", *pinned, "--out", sweep)[0] == 0
    record = sweep / ".cells" / "client.lr=0.1.json"
    old = json.loads(record.read_text())
    del old["config"]["data.validation_fraction"]  # as a cell of an earlier fedsim recorded it
    record.write_text(json.dumps(old))
    code, out, _ = cli("sweep", *pinned, "--out", sweep)
    assert code == 0 and "1 already finished, running 0" in out
    code, _, err = cli("sweep", *ONE_CELL, "--out", sweep)
    assert code == 2 and "data.validation_fraction: 0.0 -> 0.1" in err


def test_close_values_make_distinct_faithful_cells(tmp_path):
    plan = plan_sweep(None, grid={"client.lr": [0.1, 0.1000001, 1 / 3, 1e-5, 2.0]}, out=tmp_path / "sw")
    names = list(plan["cell"])
    assert names == ["client.lr=0.1", "client.lr=0.1000001", "client.lr=0.3333333333333333", "client.lr=1e-05",
                     "client.lr=2"]
    for name, cfg in zip(names, plan["config"]):  # the name reads back as the exact value
        assert float(name.split("=")[1]) == cfg.client.lr and Path(cfg.output.dir).name == name
    # names that still collide ("/" is not allowed in a directory name) get a config-hash suffix
    plan = plan_sweep(None, grid={"data.path": ["a/b.csv", "a_b.csv"]}, out=tmp_path / "sw")
    assert len(set(plan["cell"])) == 2 and all(n.startswith("data.path=a_b.csv~") for n in plan["cell"])
    assert [c.data.path for c in plan["config"]] == ["a/b.csv", "a_b.csv"]
    with pytest.raises(ConfigError, match="appears 2 times with the same config"):
        plan_sweep(None, seeds=[0, 0], out=tmp_path / "sw")  # one cell twice would run twice into one dir


@pytest.mark.parametrize("toml, error", [
    ('grid = {"client.lr" = 0.1}', None),  # a scalar is one value
    ("grid = 0.1", "sweep.grid: expected a [sweep.grid] table"),
    ("seeds = 3", None),
    ("out = 3", "sweep.out: expected a directory name"),
])
def test_scalar_sweep_values(cli, tmp_path, toml, error):
    path = tmp_path / "s.toml"
    path.write_text(f"[sweep]\n{toml}\n")
    if error is None:
        assert len(plan_sweep(path, out=tmp_path / "sw")) == 1
        return
    code, _, err = cli("sweep", path, "--out", tmp_path / "sw")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and error in err, err
    path.write_text("[sweep\n")
    code, _, err = cli("sweep", path, "--out", tmp_path / "sw")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not valid TOML" in err


@pytest.mark.parametrize("flag", [["--jobs", "0"], ["--max-cells", "-1"]])
def test_sweep_counts_are_checked(tmp_path, capsys, flag):
    from fedsim.cli import main

    with pytest.raises(SystemExit) as exit_info:  # argparse refuses the flag: one line, exit 2
        main(["sweep", "--out", str(tmp_path / "sw"), *flag])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and flag[0] in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match=flag[0]):  # and the library names it too
        run_sweep(None, out=tmp_path / "sw2", **({"jobs": 0} if flag[0] == "--jobs" else {"max_cells": -1}))


def test_a_failed_cell_is_reported_alike_with_one_and_two_jobs(cli, tmp_path):
    """target epsilon 0.001 is unreachable (prepare refuses it); the non-private cell still runs,
    and both job counts print the same lines and exit 1."""
    results = {}
    for jobs in (1, 2):
        out_dir = tmp_path / f"jobs{jobs}"
        code, out, err = cli("sweep", "--num-clients", "4", "--clients-per-round", "2", "--rounds", "1",
                             "--set", "model.hidden=[8]", "--target-epsilons", "0.001,0", "--jobs", jobs,
                             "--out", out_dir)
        results[jobs] = (code, out.replace(str(out_dir), "DIR"), err)
    assert results[1] == results[2]
    code, out, err = results[1]
    assert code == 1
    assert ("error: failed cell privacy.target_epsilon=0.001: privacy.target_epsilon: 0.001 is unreachable"
            in err.splitlines()[0])
    assert "1/2 cells finished" in out
    cells = run_sweep(None, target_epsilons=[0.001, 0], out=tmp_path / "jobs1", progress=False,
                      overrides={"federation.num_clients": 4, "federation.clients_per_round": 2,
                                 "federation.rounds": 1, "model.hidden": [8]})
    assert list(cells["status"]) == ["failed", "finished"] and list(cells["ran"]) == [True, False]


def test_workers_spawn_once_this_process_has_used_cuda(tmp_path, monkeypatch):
    """A forked child cannot use CUDA once its parent has (a GPU run of the Python API before
    the sweep): then the workers spawn, and give what one process gives."""
    import torch

    import fedsim.sweep as sweep_module

    tiny = {**TINY, "federation.rounds": 1}
    alone = run_sweep(None, seeds=[0, 1], overrides=tiny, out=tmp_path / "one", progress=False)
    if not torch.cuda.is_initialized():
        assert sweep_module._pool_context() is None  # fork, the platform's default
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert sweep_module._pool_context().get_start_method() == "spawn"
    spawned = run_sweep(None, seeds=[0, 1], overrides=tiny, out=tmp_path / "two", jobs=2, progress=False)
    assert list(spawned["status"]) == ["finished", "finished"]
    assert list(spawned["final_metric"]) == list(alone["final_metric"])


def test_a_cell_claimed_by_a_live_process_is_left_to_it(tmp_path):
    """Two sweeps on one directory: a cell whose lock a live process holds is not computed
    twice; once that process is gone, its stale lock is reclaimed."""
    from fedsim.sweep import claim, release

    tiny = {**TINY, "federation.rounds": 1}
    plan = plan_sweep(None, seeds=[0], overrides=tiny, out=tmp_path / "sw")
    lock = tmp_path / "sw" / ".cells" / f"{plan['cell'][0]}.lock"
    lock.parent.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        lock.write_text(f"{other.pid} {socket.gethostname()}\n")
        cells = run_sweep(None, seeds=[0], overrides=tiny, out=tmp_path / "sw", progress=False)
        assert list(cells["status"]) == [f"running elsewhere (pid {other.pid})"]
        assert not Path(cells["dir"][0]).exists() and lock.read_text().split()[0] == str(other.pid)
        assert claim(lock) == (False, other.pid)
    finally:
        other.kill()
        other.wait()
    assert claim(lock) == (True, None)  # the holder died: reclaimed
    assert lock.read_text().split()[0] == str(os.getpid())
    release(lock)
    assert not lock.exists()
    lock.write_text(f"{other.pid} elsewhere.example\n")  # another host: cannot tell, so it stands
    assert claim(lock) == (False, other.pid)


def fake_run(root, name, strategy, sigma, seed, final, best, eps, metric="accuracy"):
    cfg = load_config(None, {"strategy.name": strategy, "privacy.noise_multiplier": sigma, "seed": seed,
                             "federation.rounds": 5, "federation.num_clients": 10,
                             "federation.clients_per_round": 5})
    run = root / name
    run.mkdir(parents=True)
    (run / "config.toml").write_text(dumps_toml(cfg))
    write_json(run / "summary.json", {
        "status": "finished", "metric_name": metric, "final_metric": final, "best_metric": best,
        "sample_level": {"epsilon_max": eps, "delta": 1e-5,
                         "accountant": "RDP (Opacus)" if sigma else None}, "user_level": None})


@pytest.fixture
def fixture_runs(tmp_path):
    root = tmp_path / "runs"
    finals = [0.80, 0.82, 0.90]
    for seed, f in enumerate(finals):
        fake_run(root, f"dp-{seed}", "fedavg", 1.0, seed, f, f + 0.01, 2.0 + seed * 0.01)
        fake_run(root, f"nodp-{seed}", "fedavg", 0.0, seed, 0.95, 0.96, math.inf)
    (root / "dead").mkdir()
    (root / "dead" / "config.toml").write_text(dumps_toml(load_config(None)))
    return root, finals


def test_report_mean_and_ci_match_hand_computation(cli, fixture_runs):
    root, finals = fixture_runs
    code, out, err = cli("report", root, "--format", "json")
    rows = json.loads(out)["rows"]
    dp = next(r for r in rows if r["sigma"] == 1.0)
    mean = sum(finals) / 3 * 100
    sd = (sum((f * 100 - mean) ** 2 for f in finals) / 2) ** 0.5
    ci = stats.t.ppf(0.975, 2) * sd / 3 ** 0.5
    assert dp["final_accuracy"] == round(mean, 1) and dp["ci95"] == round(ci, 1)
    assert dp["best_accuracy"] == round(mean + 1, 1)
    assert dp["sample_epsilon"] == 2.01 and dp["sample_accountant"] == "RDP (Opacus)" and dp["seeds"] == 3
    ref = next(r for r in rows if r["sigma"] == 0.0)
    assert ref["sample_epsilon"] == "inf" and rows[0] is not dp  # reference row first
    assert "dead (no summary)" in json.loads(out)["unfinished"] and "unfinished: dead" in err


def test_all_formats_carry_the_same_numbers(cli, fixture_runs):
    root, _ = fixture_runs
    outputs = {fmt: cli("report", root, "--format", fmt)[1] for fmt in ("md", "csv", "latex", "json")}
    from_csv = list(csv.DictReader(io.StringIO(outputs["csv"])))
    from_json = json.loads(outputs["json"])["rows"]
    md_rows = [line.strip("| ").split(" | ") for line in outputs["md"].splitlines()[2:] if line.startswith("|")]
    tex_rows = [line.rstrip(" \\").split(" & ") for line in outputs["latex"].splitlines()
                if "&" in line and not line.startswith("strategy")]
    assert r"\toprule" in outputs["latex"] and r"\bottomrule" in outputs["latex"]
    for i, row in enumerate(from_csv):
        for j, key in enumerate(row):
            as_json = from_json[i][key]
            for other in (md_rows[i][j], tex_rows[i][j].replace(r"$\infty$", "inf").replace("\\_", "_")):
                if key in ("final_accuracy", "ci95", "best_accuracy", "sample_epsilon", "sigma"):
                    assert float(other) == float(row[key]) == float(as_json), (key, other, row[key], as_json)


def test_report_refuses_empty_and_mixed_metrics(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = cli("report", tmp_path / "empty")
    assert code == 2 and "no finished runs" in err
    fake_run(tmp_path / "mixed", "a", "fedavg", 0.0, 0, 0.9, 0.9, math.inf)
    fake_run(tmp_path / "mixed", "b", "fedavg", 0.0, 1, 0.5, 0.5, math.inf, metric="mse")
    code, _, err = cli("report", tmp_path / "mixed")
    assert code == 2 and "incompatible metrics" in err


def test_report_plot(cli, fixture_runs, tmp_path):
    root, _ = fixture_runs
    code, out, _ = cli("report", root, "--plot", tmp_path / "pu.png")
    png = (tmp_path / "pu.png").read_bytes()
    assert code == 0 and len(png) > 1000 and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| fedavg |" in out  # the table is still printed


# ----------------------------------------------------------------------------- the library

TINY = {"federation.num_clients": 4, "federation.clients_per_round": 2, "federation.rounds": 2,
        "model.hidden": [16]}


def test_sweep_and_report_as_library_functions(tmp_path, capsys):
    """A notebook's view: plan, run, re-run and report a 2-cell sweep with plain arguments;
    every number in the frames is the one in the cells' summary.json."""
    out = tmp_path / "sw"
    grid = {"privacy.noise_multiplier": [0.0, 1.0]}
    plan = plan_sweep(None, grid=grid, overrides=TINY, out=out)
    assert list(plan["cell"]) == ["privacy.noise_multiplier=0", "privacy.noise_multiplier=1"]
    assert list(plan["status"]) == ["not started"] * 2 and plan.attrs["out"] == str(out)
    assert [c.privacy.noise_multiplier for c in plan["config"]] == [0.0, 1.0]
    assert not out.exists()  # planning writes nothing

    cells = run_sweep(None, grid=grid, overrides=TINY, out=out, progress=False)
    assert capsys.readouterr().out == ""  # progress=False: silent
    assert len(cells) == 2 and cells.attrs["out"] == str(out) and cells["ran"].all()
    assert list(cells["privacy.noise_multiplier"]) == [0.0, 1.0]
    for row in cells.to_dict("records"):
        summary = json.loads((Path(row["dir"]) / "summary.json").read_text())
        assert Path(row["dir"]).parent == out and Path(row["dir"]).name == row["cell"]
        assert row["status"] == summary["status"] == "finished" and row["error"] is None
        assert row["metric_name"] == summary["metric_name"] == "accuracy"
        assert row["final_metric"] == summary["final_metric"] and row["best_metric"] == summary["best_metric"]
        assert row["rounds_completed"] == summary["rounds_completed"] == 2
        sample = summary["sample_level"]
        expected_eps = sample["epsilon_max"] if sample["accountant"] else math.inf
        assert row["sample_epsilon"] == expected_eps and row["noise_multiplier"] == sample["noise_multiplier"]
    assert math.isinf(cells["sample_epsilon"].iloc[0]) and 0 < cells["sample_epsilon"].iloc[1] < math.inf

    again = run_sweep(None, grid=grid, overrides=TINY, out=out, progress=False)  # resumable: nothing to do
    assert not again["ran"].any() and list(again["final_metric"]) == list(cells["final_metric"])
    assert list(plan_sweep(None, grid=grid, overrides=TINY, out=out)["status"]) == ["finished"] * 2

    table = report(out)
    assert table.attrs["unfinished"] == [] and table.attrs["metric_name"] == "accuracy"
    assert list(table["sigma"]) == [0.0, 1.0]  # non-private reference first
    for (_, row), final, eps in zip(table.iterrows(), cells["final_metric"], cells["sample_epsilon"]):
        assert row["final_accuracy"] == round(final * 100, 1) and row["seeds"] == 1
        assert row["sample_epsilon"] == (round(eps, 2) if math.isfinite(eps) else math.inf)
    only_dp = report(out, where={"privacy.noise_multiplier": 1.0})
    assert list(only_dp["sigma"]) == [1.0]
    frame, unfinished = load_runs(out)
    assert sorted(frame["run"]) == sorted(cells["cell"]) and unfinished == []


def test_run_sweep_max_cells_leaves_rows_not_started(tmp_path):
    cells = run_sweep(None, seeds=[0, 1], overrides={**TINY, "federation.rounds": 1}, out=tmp_path / "sw",
                      max_cells=1, progress=False)
    assert list(cells["seed"]) == [0, 1] and list(cells["status"]) == ["finished", "not started"]
    assert list(cells["ran"]) == [True, False] and math.isnan(cells["final_metric"].iloc[1])
    table = report(tmp_path / "sw")
    assert table.attrs["unfinished"] == ["seed=1 (not started)"]


def test_report_library_matches_the_cli(cli, fixture_runs, tmp_path):
    root, _ = fixture_runs
    table = report(root)
    assert "dead (no summary)" in table.attrs["unfinished"]
    for fmt in ("md", "csv", "latex", "json"):
        assert render(table, fmt) == cli("report", root, "--format", fmt)[1], fmt
    text = cli("report", root, "--format", "csv", "--where", "privacy.noise_multiplier=1.0")[1]
    assert render(report(root, where={"privacy.noise_multiplier": 1.0}), "csv") == text
    assert render(report(root, where={"privacy.noise_multiplier": "1.0"}), "csv") == text  # text, as --where
    wide = report(root, pivot="strategy")
    assert "fedavg" in wide.columns and render(wide, "md") == cli("report", root, "--pivot", "strategy")[1]
    plot(table, tmp_path / "pu.png")
    assert (tmp_path / "pu.png").stat().st_size > 1000


@pytest.mark.parametrize("call, key", [
    (lambda out: plan_sweep(None, grid={"privacy.nois": [0, 1]}, out=out), "privacy.nois"),
    (lambda out: plan_sweep(None, grid={"federation.rounds": []}, out=out), "federation.rounds"),
    (lambda out: plan_sweep(None, grid={"data.partitioner,data.alpha": ["iid"]}, out=out),
     "data.partitioner,data.alpha"),
    (lambda out: run_sweep(None, overrides={"federation.rounds": 0}, out=out, progress=False), "federation.rounds"),
])
def test_sweep_library_bad_input_names_the_key(tmp_path, call, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        call(tmp_path / "sw")
    assert not (tmp_path / "sw").exists()  # refused before anything is written


def test_report_library_bad_input(fixture_runs):
    root, _ = fixture_runs
    with pytest.raises(FedsimError, match="--where key 'data.nope'"):
        report(root, where={"data.nope": 1})
    with pytest.raises(FedsimError, match="--best-per key 'data.alpha'"):
        report(root, best_per=["data.alpha"])
    with pytest.raises(FedsimError, match="no finished runs match"):
        report(root, where={"seed": 99})


@pytest.mark.parametrize("argv, key", [
    (["sweep", "--grid", "privacy.nois=0,1"], "privacy.nois"),
    (["sweep", "--grid", "privacy.noise_multiplier"], "--grid"),
    (["sweep", "--seeds", "0,x"], "seed"),
    (["report", "--where", "data.nope=1"], "data.nope"),
])
def test_sweep_and_report_cli_bad_input_is_one_line_exit_2(cli, tmp_path, fixture_runs, argv, key):
    extra = ["--out", tmp_path / "sw"] if argv[0] == "sweep" else []
    argv = [argv[0], fixture_runs[0], *argv[1:]] if argv[0] == "report" else argv
    code, _, err = cli(*argv, *extra)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], err


def test_library_modules_do_not_import_the_cli():
    """sweep, report and logs sit below the CLI: importing it (even lazily) would be a cycle."""
    for name in ("sweep", "report", "logs"):
        tree = ast.parse((ROOT / "fedsim" / f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "fedsim.cli" not in imported and "argparse" not in imported, name


# ----------------------------------------------------------------------------- warnings

FAKE_MODULES: dict[str, dict] = {}


def warn_from(module: str, message: str, category: type[Warning] = UserWarning) -> None:
    """warnings.warn as if called inside `module`: filters match the caller's __name__, and
    repeated calls share one module (one __warningregistry__), as a real module's do."""
    if module not in FAKE_MODULES:
        FAKE_MODULES[module] = {"__name__": module, "warnings": warnings}
        code = compile("def warn(message, category):\n    warnings.warn(message, category)\n",
                       f"/site-packages/{module.replace('.', '/')}.py", "exec")
        exec(code, FAKE_MODULES[module])
    FAKE_MODULES[module]["warn"](message, category)


@pytest.fixture
def quiet_cli_warnings():
    """The warnings a user sees after the CLI's setup_logging(False), starting from the
    strictest baseline (python -W always), not from pytest's ignore-UserWarning filters."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        setup_logging(False)
        yield caught


def test_quiet_mode_hides_only_harmless_warnings(quiet_cli_warnings):
    caught = quiet_cli_warnings
    warn_from("fedsim.clients.trainer", "Full backward hook is firing when gradients are computed with respect to "
              "module outputs since no inputs require gradients. See https://docs.pytorch.org/ for more details.")
    warn_from("ray._private.worker", "Tip: In future versions of Ray, Ray will no longer override accelerator "
              "visible devices env var if num_gpus=0 or num_gpus=None (default).", FutureWarning)
    warn_from("typer", "'click.utils.get_text_stream' is deprecated", DeprecationWarning)
    assert [str(w.message) for w in caught] == []
    # privacy statements from Opacus pass, and so does anything unknown
    warn_from("opacus.accountants.analysis.rdp", "Optimal order is the largest alpha. Please consider "
              "expanding the range of alphas to get a tighter privacy bound.")
    warn_from("opacus.privacy_engine", "Secure RNG turned off. This is perfectly fine for experimentation "
              "(test a)")
    warn_from("opacus.accountants.gdp", "GDP accounting is experimental and can underestimate privacy expenditure.")
    warn_from("fedsim.run", "Full backward hook is firing: but as a FutureWarning", FutureWarning)
    warn_from("opacus.grad_sample", "a deprecated Opacus API", DeprecationWarning)
    assert [str(w.message).split(" ")[0] for w in caught] == ["Optimal", "Secure", "GDP", "Full", "a"]
    assert caught[1].category is UserWarning


def test_secure_rng_warning_is_shown_once_not_per_client(quiet_cli_warnings):
    for _ in range(5):  # one make_private per client-round
        warn_from("opacus.privacy_engine", "Secure RNG turned off. This is perfectly fine (test once)")
    assert len(quiet_cli_warnings) == 1


def test_secure_rng_warning_stays_once_when_logging_is_set_up_again(quiet_cli_warnings):
    """The API and an in-process sweep set up logging per run; re-adding the filters made
    Python forget the "once" warnings it had shown, so a sweep printed one per DP cell."""
    for _ in range(3):
        setup_logging(False)
        warn_from("opacus.privacy_engine", "Secure RNG turned off. This is perfectly fine (test again)")
    assert len(quiet_cli_warnings) == 1


def test_console_lines_and_warnings_go_around_a_progress_bar(monkeypatch):
    """A fedsim console line and a Python warning printed while a run's bar is on the console
    clear the bar's line first (and the bar is drawn again after), instead of landing at the
    end of the bar's line."""
    import io
    import logging

    from tqdm import tqdm

    from fedsim import logs

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(warnings, "formatwarning", logs._one_line_warning)
    bar = tqdm(total=3, desc="run", unit="round", file=err)
    bar.update(1)
    logs.ConsoleHandler("%(message)s").emit(logging.LogRecord("fedsim", logging.WARNING, "x", 1,
                                                              "a console line", None, None))
    logs._show_warning("careful", UserWarning, "f.py", 1)
    bar.close()
    text = err.getvalue()
    for line in ("a console line\n", "warning: careful\n"):
        before, after = text.split(line)
        assert before.endswith("\r") and not before.rstrip("\r ").endswith("\n"), repr(before[-40:])
        assert after.lstrip("\r").startswith("run:"), repr(after[:40])  # the bar again


def test_cli_run_shows_the_secure_rng_warning_once_and_no_noise(tmp_path):
    """The real thing: a DP run of 2 rounds x 2 clients (4 make_private calls, 4+ backward
    hooks firing), as a user runs it."""
    res = subprocess.run([sys.executable, "-m", "fedsim.cli", "run", "--num-clients", "4",
                          "--clients-per-round", "2", "--rounds", "2", "--set", "model.hidden=[16]",
                          "--noise-multiplier", "1.0", "--no-progress", "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert len(list(csv.DictReader((tmp_path / "r" / "rounds.csv").open()))) == 2
    assert "sample-level eps" in res.stdout  # the DP run's one-line result
    assert res.stderr.count("Secure RNG turned off") == 1, res.stderr
    assert "Full backward hook" not in res.stderr
    # one line, as fedsim's console shows a warning: no file path, no library source line
    assert res.stderr.splitlines() == [line for line in res.stderr.splitlines() if line.startswith("warning: ")]


def test_a_parallel_sweep_shows_the_secure_rng_warning_once(tmp_path):
    """Two DP cells in two worker processes: the statement of what seeded noise hides is a
    property of the sweep, said once, not once per worker (each worker used to say it)."""
    res = subprocess.run([sys.executable, "-m", "fedsim", "sweep", "--num-clients", "4", "--clients-per-round",
                          "2", "--rounds", "1", "--set", "model.hidden=[8]", "--noise-multiplier", "1.0",
                          "--seeds", "0,1", "--jobs", "2", "--out", str(tmp_path / "sw")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "2/2 cells finished" in res.stdout
    assert all((tmp_path / "sw" / f"seed={s}" / "summary.json").is_file() for s in (0, 1))
    assert res.stderr.count("Secure RNG turned off") == 1, res.stderr


def test_an_interrupted_cell_resumes_from_its_checkpoint(cli, tmp_path, monkeypatch):
    """A sweep killed inside a cell continues that cell at the round after its last checkpoint
    (run.log says so) and ends with the rows an uninterrupted sweep writes."""
    from fedsim import server

    args = ["--num-clients", "4", "--clients-per-round", "2", "--rounds", "3", "--set", "model.hidden=[8]",
            "--grid", "client.lr=0.1"]
    real = server.save_checkpoint

    def stop(run_dir, ckpt, *rest):
        real(run_dir, ckpt, *rest)
        if ckpt.round == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(server, "save_checkpoint", stop)
    code, _, _ = cli("sweep", *args, "--out", tmp_path / "a")  # "killed" after round 2 (Ctrl-C)
    assert code != 0
    monkeypatch.undo()
    code, out, err = cli("sweep", *args, "--out", tmp_path / "a")
    assert code == 0, err
    cell = tmp_path / "a" / "client.lr=0.1"
    assert "resumed after round 2 of 3" in (cell / "run.log").read_text()
    code, _, err = cli("sweep", *args, "--out", tmp_path / "b")
    assert code == 0, err

    def rows(d):
        return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in csv.DictReader(open(d / "rounds.csv"))]
    assert rows(cell) == rows(tmp_path / "b" / "client.lr=0.1")


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_a_stopped_parallel_sweep_leaves_no_worker_running(tmp_path, sig):
    """SIGTERM to `fedsim sweep --jobs 2` ends it with 143 (Ctrl-C: 130) and its workers with it
    (they went on to the next cell, orphaned), each running cell closed as "interrupted" with
    its lock released; after a kill -9 of the parent, the kernel ends the workers."""
    import signal
    import time

    out = tmp_path / "stopped-sweep"
    proc = subprocess.Popen([sys.executable, "-m", "fedsim", "sweep", "configs/quickstart.toml", "--jobs", "2",
                             "--seeds", "0,1,2,3", "--rounds", "40", "--engine", "opacus", "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("*/summary.json"))) < 2:  # both workers are inside a cell's rounds
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.2)
        assert len(_processes_mentioning(str(out))) == 3  # the sweep and its two workers
        proc.send_signal(getattr(signal, sig))
        rc = proc.wait(timeout=30)
        assert rc == {"SIGTERM": 143, "SIGINT": 130, "SIGKILL": -9}[sig]
        deadline = time.monotonic() + 15
        while _processes_mentioning(str(out)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_mentioning(str(out)) == []
        assert not list(out.glob("*/summary.json")) or all(
            json.loads(p.read_text())["status"] != "finished" for p in out.glob("*/summary.json")
            if p.parent.name == "seed=3")  # the cells not started were cancelled, not run
        if sig != "SIGKILL":
            statuses = [json.loads(p.read_text())["status"] for p in out.glob("*/summary.json")]
            assert statuses and set(statuses) == {"interrupted"}, statuses
            assert list(out.glob(".cells/*.lock")) == []
    finally:
        for pid in _processes_mentioning(str(out)):
            os.kill(pid, 9)


def test_a_control_character_in_a_grid_value_is_escaped_in_the_cell_name():
    """A cell's name is a directory name and part of one-line errors: a carriage return or a
    newline from a value would break both (the long fuzz found data.text_column = '\\r')."""
    from fedsim.sweep import cell_name

    assert cell_name({"data.text_column": "\r"}) == "data.text_column=\\r"
    assert cell_name({"data.path": "a/b\nc"}) == "data.path=a_b\\nc"
    assert cell_name({"client.lr": 0.1, "strategy.name": "fedavg"}) == "client.lr=0.1__strategy.name=fedavg"
