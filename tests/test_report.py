"""`fedsim report` on directories that hold malformed runs, null epsilons and bad plot
paths: every bad run is named once and skipped, the others are still reported; bad input
is one line with exit 2, an unwritable file one line with exit 1."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedsim.config import config_from_dict, dumps_toml, read_experiment
from fedsim.report import report
from fedsim.results import write_json


def write_run(root: Path, name: str, *, strategy: str = "fedavg", sigma: float = 0.0, seed: int = 0,
              final: float = 0.9, best: float | None = None, eps: float | None = math.inf,
              metric: str = "accuracy", alpha: float = 0.5, user: dict | None = None, **cfg) -> Path:
    """A finished run directory as fedsim writes it (config.toml, summary.json, rounds.csv),
    with the numbers given; what `report` reads of it is config.toml and summary.json."""
    # not load_config: it would warn that data.alpha does nothing under the default iid partitioner
    config = config_from_dict(read_experiment(None, {
        "strategy.name": strategy, "privacy.noise_multiplier": sigma, "seed": seed, "data.alpha": alpha,
        "federation.rounds": 5, "federation.num_clients": 10, "federation.clients_per_round": 5, **cfg}))
    run = root / name
    run.mkdir(parents=True)
    (run / "config.toml").write_text(dumps_toml(config))
    # json.dumps, not fedsim's writer (which writes null): older runs spell no guarantee Infinity
    (run / "summary.json").write_text(json.dumps({
        "status": "finished", "metric_name": metric, "final_metric": final,
        "best_metric": final if best is None else best,
        "sample_level": {"epsilon_max": eps, "delta": 1e-5, "accountant": "RDP (Opacus)" if sigma else None},
        "user_level": user}))
    (run / "rounds.csv").write_text(f"round,metric_name,metric\n1,{metric},{final}\n")
    return run


@pytest.fixture
def good_runs(tmp_path):
    """Two seeds of a DP setting and of the non-private reference: finals known by hand."""
    root = tmp_path / "runs"
    for seed, final in enumerate((0.70, 0.80)):
        write_run(root, f"dp-{seed}", sigma=1.0, seed=seed, final=final, eps=3.0)
        write_run(root, f"nodp-{seed}", sigma=0.0, seed=seed, final=0.9, eps=math.inf)
    return root


def edit_summary(run: Path, change) -> None:
    """Rewrite a run's summary.json after `change` edits the parsed dict in place."""
    summary = json.loads((run / "summary.json").read_text())
    change(summary)
    write_json(run / "summary.json", summary)


def break_runs(root: Path) -> dict[str, str]:
    """Malformed run directories beside the good ones: name -> the reason report must give."""
    bad = {}
    run = write_run(root, "not-json", sigma=1.0, final=0.1, eps=3.0)
    (run / "summary.json").write_text('{"status": "finished", "final_metric": 0.')  # cut off mid-write
    bad["not-json"] = "summary.json is not valid JSON"
    run = write_run(root, "no-final", sigma=1.0, final=0.1, eps=3.0)
    edit_summary(run, lambda summary: (summary.pop("final_metric"), summary.pop("best_metric")))
    bad["no-final"] = "summary.json lacks final_metric, best_metric"
    run = write_run(root, "a-list", sigma=1.0, final=0.1, eps=3.0)
    (run / "summary.json").write_text("[1, 2]")
    bad["a-list"] = "summary.json holds a list, not an object"
    run = write_run(root, "text-eps", sigma=1.0, final=0.1, eps=3.0)
    edit_summary(run, lambda summary: summary["sample_level"].update(epsilon_max="three"))
    bad["text-eps"] = "epsilon 'three' is not a number"
    run = write_run(root, "bad-toml", sigma=1.0, final=0.1, eps=3.0)
    (run / "config.toml").write_text("[privacy\nnoise_multiplier = 1")
    bad["bad-toml"] = "config.toml is not valid TOML"
    run = write_run(root, "old-config", sigma=1.0, final=0.1, eps=3.0)
    text = (run / "config.toml").read_text()
    (run / "config.toml").write_text("\n".join(line for line in text.splitlines()
                                               if not line.startswith("target_epsilon")))
    bad["old-config"] = "config.toml lacks privacy.target_epsilon"
    return bad


def test_malformed_runs_are_skipped_with_one_warning_each(cli, good_runs):
    bad = break_runs(good_runs)
    # a truncated rounds.csv does not make a run malformed: the table reads summary.json
    (good_runs / "dp-0" / "rounds.csv").write_text("round,metric_na")
    code, out, err = cli("report", good_runs, "--format", "json")
    assert code == 0, err
    assert "Traceback" not in err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == len(bad), err
    for name, reason in bad.items():
        line = next(w for w in warnings if f"run {name}:" in w)
        assert reason in line, (name, line)
    result = json.loads(out)
    assert sorted(s.split(":")[0] for s in result["skipped"]) == sorted(bad)
    rows = result["rows"]
    assert [r["seeds"] for r in rows] == [2, 2]  # only the good runs, both seeds each
    dp = next(r for r in rows if r["sigma"] == 1.0)
    assert dp["final_accuracy"] == 75.0 and dp["sample_epsilon"] == 3.0


def test_report_library_lists_skipped_runs(good_runs):
    bad = break_runs(good_runs)
    table = report(good_runs)
    assert sorted(s.split(":")[0] for s in table.attrs["skipped"]) == sorted(bad)
    assert table["seeds"].tolist() == [2, 2]


def test_nothing_valid_left_is_one_line_exit_2(cli, tmp_path):
    root = tmp_path / "runs"
    write_run(root, "ok", sigma=1.0, eps=3.0)
    (root / "ok" / "summary.json").write_text("not json")
    code, out, err = cli("report", root)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith("error: report: no finished runs") and "1 malformed" in lines[0]
    assert "ok: summary.json is not valid JSON" in lines[0]


@pytest.mark.parametrize("non_private", [math.inf, None], ids=["Infinity", "null"])
def test_non_private_epsilon_as_infinity_or_null(tmp_path, non_private):
    """summary.json writers differ in how they spell "no guarantee": both read as inf."""
    root = tmp_path / "runs"
    write_run(root, "nodp", sigma=0.0, final=0.9, eps=non_private)
    write_run(root, "dp", sigma=1.0, final=0.7, eps=2.5)
    write_run(root, "user", sigma=0.0, final=0.8, eps=non_private, **{"privacy.user_noise_multiplier": 1.0},
              user={"epsilon": non_private, "delta": 1e-5, "accountant": "RDP (Opacus)"})
    text = (root / "nodp" / "summary.json").read_text()
    assert ("null" if non_private is None else "Infinity") in text
    table = report(root)
    assert table["sample_epsilon"].tolist() == [math.inf, math.inf, 2.5]
    user_row = table[table["user_sigma"] == 1.0].iloc[0]
    assert user_row["user_epsilon"] == math.inf


def test_unknown_group_by_key_is_refused(cli, good_runs):
    """It used to be dropped silently, giving a table that did not split as asked."""
    code, out, err = cli("report", good_runs, "--group-by", "data.alpa")
    assert code == 2 and out == "" and err.strip() == (
        "error: report: --group-by key 'data.alpa' is not a config key of these runs")


def test_plot_with_pivot_draws_the_long_table(cli, good_runs, tmp_path):
    png = tmp_path / "pu.png"
    code, out, err = cli("report", good_runs, "--pivot", "strategy", "--plot", png)
    assert code == 0, err
    assert "| fedavg |" in out.splitlines()[0]  # the pivoted table is printed: a column per strategy
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_bad_extension_is_refused_before_any_work(cli, good_runs, tmp_path):
    code, out, err = cli("report", good_runs, "--plot", tmp_path / "pu.xyz")
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and "--plot" in lines[0] and ".png" in lines[0], err
    assert not (tmp_path / "pu.xyz").exists()
    code, out, err = cli("partition", "--num-clients", "4", "--plot", tmp_path / "labels")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "--plot" in err


def test_unwritable_plot_is_one_line_exit_1(cli, good_runs, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a directory")
    code, _, err = cli("report", good_runs, "--plot", blocker / "pu.png")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: report: cannot write"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "runs"]
