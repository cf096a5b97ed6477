"""`fedsim report` on directories that hold malformed runs, null epsilons and bad plot
paths: every bad run is named once and skipped, the others are still reported; bad input
is one line with exit 2, an unwritable file one line with exit 1."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import fedsim
from fedsim.cli import main
from fedsim.config import config_from_dict, dumps_toml, read_experiment
from fedsim.errors import FedsimError
from fedsim.report import paired_difference, render, report
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
    write_run(root, "negative-eps", sigma=1.0, final=0.1, eps=-2.0)
    bad["negative-eps"] = "epsilon -2.0 is not >= 0"
    write_run(root, "nan-final", sigma=1.0, final=math.nan, best=0.5, eps=3.0)  # json.dumps writes NaN
    bad["nan-final"] = "final_metric = nan is not a finite number, yet the run says finished"
    run = write_run(root, "null-best", sigma=1.0, final=0.1, eps=3.0)
    edit_summary(run, lambda summary: summary.update(best_metric=None))
    bad["null-best"] = "best_metric = None is not a finite number"
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


# ----------------------------------------------------------------------------- --paired-against

def hand_paired(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, int]:
    """The paired interval written out: d_s = a_s - b_s over shared seeds,
    mean(d) +- t_{0.975, n-1} sd(d) / sqrt(n)."""
    seeds = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in seeds])
    n = len(d)
    ci = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / np.sqrt(n) if n > 1 else math.nan
    return float(d.mean()), float(ci), n


def test_paired_difference_is_the_paired_t_interval():
    # the baseline varies a lot from seed to seed, the method beats it by about 2 on every seed
    base = pd.Series([50.0, 62.0, 71.0, 83.0, 90.0, 40.0], index=[0, 1, 2, 3, 4, 5])  # seed 5: baseline only
    method = pd.Series([53.0, 61.5, 72.0, 85.5, 92.0, 99.0], index=[0, 1, 2, 3, 4, 6])  # seed 6: method only
    method = method.iloc[[3, 0, 5, 2, 4, 1]]  # paired by seed, never by position
    mean, ci, n = paired_difference(method, base)
    d = np.array([53.0 - 50.0, 61.5 - 62.0, 72.0 - 71.0, 85.5 - 83.0, 92.0 - 90.0])
    assert n == 5
    assert mean == pytest.approx(d.mean()) == pytest.approx(1.6)
    assert ci == pytest.approx(stats.t.ppf(0.975, 4) * d.std(ddof=1) / math.sqrt(5))
    low, high = stats.ttest_rel([53.0, 61.5, 72.0, 85.5, 92.0], [50.0, 62.0, 71.0, 83.0, 90.0]).confidence_interval()
    assert (mean - ci, mean + ci) == (pytest.approx(low), pytest.approx(high))
    # unpaired, the seed-to-seed spread of the baseline swamps the difference
    shared = [0, 1, 2, 3, 4]
    unpaired = stats.ttest_ind(method.loc[shared], base.loc[shared]).confidence_interval()
    assert ci < (unpaired.high - unpaired.low) / 2 / 5
    assert paired_difference(base, method)[:2] == (pytest.approx(-mean), pytest.approx(ci))


def test_paired_difference_with_fewer_than_two_seeds():
    one = paired_difference(pd.Series([80.0, 70.0], index=[3, 4]), pd.Series([75.0, 1.0], index=[3, 9]))
    assert one[0] == 5.0 and math.isnan(one[1]) and one[2] == 1
    none = paired_difference(pd.Series([80.0], index=[3]), pd.Series([75.0], index=[4]))
    assert math.isnan(none[0]) and math.isnan(none[1]) and none[2] == 0
    with pytest.raises(ValueError, match="seed 3 appears twice"):
        paired_difference(pd.Series([80.0, 81.0], index=[3, 3]), pd.Series([75.0], index=[3]))


# finals (accuracy in [0, 1]) per strategy and seed; "scaffold" lacks seed 3, the baseline "fedavg" seed 4 at sigma 1;
# without DP, "scaffold" shares one seed with "fedavg" only
PAIRED_DP = {"fedavg": {0: 0.50, 1: 0.62, 2: 0.71, 3: 0.83},
             "fedprox": {0: 0.53, 1: 0.615, 2: 0.72, 3: 0.855},
             "scaffold": {0: 0.48, 1: 0.66, 2: 0.70, 4: 0.99}}
PAIRED_NODP = {"fedavg": {0: 0.90, 1: 0.92, 2: 0.91}, "fedprox": {0: 0.95, 1: 0.93, 2: 0.97},
               "scaffold": {2: 0.96, 7: 0.5}}


@pytest.fixture
def paired_runs(tmp_path):
    root = tmp_path / "runs"
    for sigma, finals in ((1.0, PAIRED_DP), (0.0, PAIRED_NODP)):
        for strategy, by_seed in finals.items():
            for seed, final in by_seed.items():
                write_run(root, f"{strategy}-{sigma}-{seed}", strategy=strategy, sigma=sigma, seed=seed,
                          final=final, eps=3.0 if sigma else math.inf)
    return root


def pct(finals: dict[int, float]) -> dict[int, float]:
    return {s: v * 100 for s, v in finals.items()}


def md_rows(out: str) -> list[dict[str, str]]:
    lines = [line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("|")]
    return [dict(zip(lines[0], row)) for row in lines[2:]]


def test_paired_against_columns_hold_the_paired_differences(cli, paired_runs):
    code, out, err = cli("report", paired_runs, "--pivot", "strategy", "--paired-against", "fedavg")
    assert code == 0, err
    rows = md_rows(out)
    assert list(rows[0])[-3:] == ["fedavg", "fedprox − fedavg", "scaffold − fedavg"]
    nodp, dp = rows  # non-private reference first
    assert nodp["sigma"] == "0" and dp["sigma"] == "1"
    for row, finals in ((dp, PAIRED_DP), (nodp, PAIRED_NODP)):
        for name in ("fedprox", "scaffold"):
            mean, ci, n = hand_paired(pct(finals[name]), pct(finals["fedavg"]))
            expected = f"{round(mean, 1) + 0.0:+g}" + (f" ± {round(ci, 1):g}" if n > 1 else "")
            assert row[f"{name} − fedavg"] == expected, (name, row)
    # by hand: d = 3, -0.5, 1, 2.5: mean 1.5, sd sqrt(7.5 / 3), t(0.975, 3) = 3.182; 96 - 91 on the one shared seed
    assert (dp["fedprox − fedavg"], dp["scaffold − fedavg"]) == ("+1.5 ± 2.5", "+0.3 ± 8")
    assert (nodp["fedprox − fedavg"], nodp["scaffold − fedavg"]) == ("+4 ± 6.6", "+5")  # one shared seed: no interval
    # paired by default: a plain --pivot pairs against its first value, fedavg, the same table
    assert cli("report", paired_runs, "--pivot", "strategy")[1] == out
    # the baseline column is the unpaired pivot's, unchanged
    plain = md_rows(cli("report", paired_runs, "--pivot", "strategy", "--unpaired")[1])
    assert [r["fedavg"] for r in rows] == [r["fedavg"] for r in plain]
    assert plain[1]["fedprox"] != dp["fedprox − fedavg"]
    # the footer says what the columns hold, with n, and which seeds were left out (also on stderr)
    footer = out.split("\n\n", 1)[1]
    assert 'Paired: columns "V − fedavg" are paired differences from strategy fedavg' in footer
    assert "(n = 1 to 4 per cell)" in footer
    assert "scaffold − fedavg at sigma=1: n = 3 (left out: seed 4, only in scaffold; seed 3, only in fedavg)" in footer
    warnings = [line for line in err.splitlines() if line.startswith("warning: paired: ")]
    assert len(warnings) == 2
    assert warnings[0].endswith("scaffold − fedavg at sigma=0: n = 1 (left out: seed 7, only in scaffold; "
                                "seeds 0, 1, only in fedavg)")


def test_paired_against_in_every_format(cli, paired_runs):
    argv = ("report", paired_runs, "--pivot", "strategy", "--paired-against", "fedavg", "--format")
    md = md_rows(cli(*argv, "md")[1])
    as_csv = list(csv.DictReader(io.StringIO(cli(*argv, "csv")[1])))
    as_json = json.loads(cli(*argv, "json")[1])
    latex = [line.rstrip(" \\").split(" & ") for line in cli(*argv, "latex")[1].splitlines() if " & " in line]
    assert latex[0][-2:] == ["fedprox $-$ fedavg", "scaffold $-$ fedavg"]
    for i, row in enumerate(md):
        for j, key in enumerate(row):
            if key in ("fedavg", "fedprox − fedavg", "scaffold − fedavg"):
                assert row[key] == as_csv[i][key] == as_json["rows"][i][key] == latex[i + 1][j], key
    assert as_json["paired"]["against"] == "fedavg" and as_json["paired"]["column"] == "strategy"
    assert as_json["paired"]["n"] == {"fedprox − fedavg": [3, 4], "scaffold − fedavg": [1, 3]}
    assert len(as_json["paired"]["dropped"]) == 2


def test_paired_against_from_python_matches_the_cli(cli, paired_runs):
    table = fedsim.report(paired_runs, pivot="strategy", paired_against="fedavg")
    assert render(table, "md") == cli("report", paired_runs, "--pivot", "strategy", "--paired-against", "fedavg")[1]
    assert table.attrs["paired"]["n"]["fedprox − fedavg"] == [3, 4]


@pytest.mark.parametrize("pivot, against, unpaired, message", [
    ("", "nope", False, "--paired-against 'nope' is not a strategy of these runs; allowed: fedavg, fedprox, scaffold"),
    ("strategy", "nope", False, "--paired-against 'nope' is not a value of --pivot column 'strategy'; "
                                "allowed: fedavg, fedprox, scaffold"),
    ("strategy", "fedavg", True, "--paired-against fedavg and --unpaired contradict each other; give one "
                                 "(comparisons are paired by default)"),
])
def test_paired_against_bad_input_is_one_line_exit_2(cli, paired_runs, pivot, against, unpaired, message):
    code, out, err = cli("report", paired_runs, *(["--pivot", pivot] if pivot else []), "--paired-against", against,
                         *(["--unpaired"] if unpaired else []))
    assert (code, out, err) == (2, "", f"error: report: {message}\n")
    with pytest.raises(FedsimError) as refused:
        fedsim.report(paired_runs, pivot=pivot, paired_against=against, unpaired=unpaired)
    assert str(refused.value) == f"report: {message}"


def test_paired_against_refuses_runs_it_cannot_pair(cli, paired_runs):
    write_run(paired_runs, "fedprox-again", strategy="fedprox", sigma=1.0, seed=0, final=0.1, eps=3.0, alpha=0.9)
    code, out, err = cli("report", paired_runs, "--pivot", "strategy", "--paired-against", "fedavg")
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert "seed 0 appears twice" in err and "--group-by" in err
    code, out, err = cli("report", paired_runs, "--pivot", "strategy", "--paired-against", "fedavg",
                         "--group-by", "data.alpha")
    assert code == 0, err


def test_report_help_shows_paired_against(capsys):
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    text = capsys.readouterr().out
    assert "--paired-against VALUE" in text and "--unpaired" in text
    assert "fedsim report sweeps/fedsvd --pivot strategy --paired-against fedavg-lora" in text


def test_rows_that_average_different_settings_are_named_in_one_warning(cli, tmp_path):
    """Two seeds each of client.lr 0.1 and 0.3 land in one row unless split: the report says
    which key differs, with its values, and the warning goes once --group-by splits them."""
    root = tmp_path / "runs"
    for seed in (0, 1):
        for lr, final in ((0.1, 0.6), (0.3, 0.8)):
            write_run(root, f"lr{lr}-{seed}", seed=seed, final=final, **{"client.lr": lr})
    code, out, err = cli("report", root, "--format", "csv")
    assert code == 0
    assert err.strip() == ("warning: report: rows average runs that differ in client.lr (0.1, 0.3); split them "
                           "with --group-by client.lr, or pick one with --where client.lr=VALUE")
    assert report(root).attrs["mixed"] == {"client.lr": ["0.1", "0.3"]}
    code, out, err = cli("report", root, "--format", "csv", "--group-by", "client.lr")
    assert code == 0 and err == "" and len(out.strip().splitlines()) == 3  # header + one row per lr


def test_per_client_sigmas_calibrated_per_seed_are_not_mixed_settings(cli, tmp_path):
    """Per-client calibration derives each seed's sigma list from its own client sizes, as
    worst-client calibration derives one sigma: seeds of one target are one setting."""
    root = tmp_path / "runs"
    for seed, sigmas in ((0, [1.5, 2.0, 3.0]), (1, [1.2, 2.5, 4.0])):
        write_run(root, f"pc-{seed}", sigma=max(sigmas), seed=seed, final=0.7, eps=3.0,
                  **{"privacy.calibration": "per-client", "privacy.client_noise_multipliers": sigmas,
                     "privacy.target_epsilon": 3.0, "federation.num_clients": 3,
                     "federation.clients_per_round": 3})
    code, out, err = cli("report", root, "--format", "csv")
    assert code == 0 and err == "", err
    assert len(out.strip().splitlines()) == 2  # header + the one row of both seeds


def test_a_run_from_before_a_key_reads_as_that_keys_old_value(cli, tmp_path):
    """A run whose config.toml predates data.validation_fraction ran without a validation
    split, and one that predates data.iid_fraction (read only by the iid-mix partitioner, which
    came with it) ran as its default would: beside a new run pinned at 0 it is the same
    setting, not "mixed settings"."""
    root = tmp_path / "runs"
    old = write_run(root, "old", seed=0, final=0.6, **{"data.validation_fraction": 0.0})
    text = (old / "config.toml").read_text()
    (old / "config.toml").write_text("\n".join(line for line in text.splitlines()
                                               if not line.startswith(("validation_fraction", "iid_fraction"))))
    write_run(root, "new", seed=1, final=0.8, **{"data.validation_fraction": 0.0})
    code, out, err = cli("report", root, "--format", "csv")
    assert code == 0 and err == "", err
    assert report(root).attrs["mixed"] == {}
    write_run(root, "split", seed=2, final=0.7, **{"data.validation_fraction": 0.1})  # a real difference
    assert report(root).attrs["mixed"] == {"data.validation_fraction": ["0.0", "0.1"]}


# ----------------------------------------------------------------------------- paired by default

def test_long_table_pairs_strategies_by_default(cli, paired_runs):
    """Without --pivot, a table of several strategies gains each row's paired difference from
    the first strategy's row at the same sigma: the numpy re-derivation of mean and 95%
    t-interval of the per-seed differences, n in diff_seeds; --unpaired drops the columns."""
    code, out, err = cli("report", paired_runs, "--format", "json")
    assert code == 0, err
    body = json.loads(out)
    rows = {(r["strategy"], r["sigma"]): r for r in body["rows"]}
    for sigma, finals in ((1.0, PAIRED_DP), (0.0, PAIRED_NODP)):
        assert rows[("fedavg", sigma)]["diff_vs_fedavg"] is None  # the reference itself
        for name in ("fedprox", "scaffold"):
            a, b = pct(finals[name]), pct(finals["fedavg"])
            seeds = sorted(set(a) & set(b))
            d = np.array([a[s] for s in seeds]) - np.array([b[s] for s in seeds])
            half = stats.t.ppf(0.975, len(d) - 1) * np.std(d, ddof=1) / np.sqrt(len(d)) if len(d) > 1 else None
            row = rows[(name, sigma)]
            assert row["diff_vs_fedavg"] == round(float(d.mean()), 1) + 0.0, (name, sigma)
            assert row["diff_ci95"] == (None if half is None else round(float(half), 1)), (name, sigma)
            assert row["diff_seeds"] == len(d)
    assert body["paired"]["against"] == "fedavg" and body["paired"]["unpaired"] == []
    assert "Paired: diff_vs_fedavg is each row's final metric minus strategy fedavg's" in body["paired"]["note"]
    # against another reference, and not at all
    other = json.loads(cli("report", paired_runs, "--format", "json", "--paired-against", "fedprox")[1])
    assert {r["strategy"]: r["diff_vs_fedprox"] for r in other["rows"] if r["sigma"] == 1.0}["fedprox"] is None
    unpaired = json.loads(cli("report", paired_runs, "--format", "json", "--unpaired")[1])
    assert "paired" not in unpaired and not any(k.startswith("diff_") for k in unpaired["rows"][0])
    assert [r["final_accuracy"] for r in unpaired["rows"]] == [r["final_accuracy"] for r in body["rows"]]


def test_no_shared_seed_falls_back_to_unpaired_and_says_so(cli, paired_runs):
    """A strategy whose seeds fedavg never ran: its long-table difference is Welch's unpaired
    interval (numpy re-derivation), its pivot column its own mean ± ci95; both captions say so."""
    other = {10: 0.61, 11: 0.75, 12: 0.70}
    for seed, final in other.items():
        write_run(paired_runs, f"fedadam-{seed}", strategy="fedadam", sigma=1.0, seed=seed, final=final, eps=3.0)
    # fedadam sorts first, so it would be the reference: name fedavg
    body = json.loads(cli("report", paired_runs, "--format", "json", "--paired-against", "fedavg")[1])
    row = next(r for r in body["rows"] if r["strategy"] == "fedadam")
    a, b = np.array(list(pct(other).values())), np.array(list(pct(PAIRED_DP["fedavg"]).values()))
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    assert row["diff_vs_fedavg"] == round(float(a.mean() - b.mean()), 1)
    assert row["diff_ci95"] == round(float(stats.t.ppf(0.975, df) * np.sqrt(va + vb)), 1)
    assert row["diff_seeds"] == 0
    assert "Unpaired (no shared seed; difference of means ± 95% Welch interval" in body["paired"]["note"]
    assert "fedadam at sigma=1" in body["paired"]["note"]
    code, out, err = cli("report", paired_runs, "--pivot", "strategy", "--paired-against", "fedavg")
    rows = md_rows(out)
    assert list(rows[0])[-4:] == ["fedavg", "fedadam", "fedprox − fedavg", "scaffold − fedavg"]
    mean, half = a.mean(), stats.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / np.sqrt(len(a))
    dp = next(r for r in rows if r["sigma"] == "1")
    assert dp["fedadam"] == f"{round(mean, 1):g} ± {round(half, 1):g}"
    assert "Unpaired (no seed shared with fedavg), each its own mean ± ci95: fedadam." in out


def test_best_is_the_validation_selected_number_and_the_caption_says_so(cli, tmp_path):
    """best_* is read from summary.json (the test metric at the best-validation round); the
    caption names the split that selected it, and --best-per picks rows on validation when
    every run has one: here the row with the higher test but lower validation metric loses."""
    root = tmp_path / "runs"
    for seed in (0, 1):
        for lr, final, val in ((0.1, 0.80, 0.60), (0.3, 0.70, 0.65)):
            run = write_run(root, f"lr{lr}-{seed}", seed=seed, final=final, **{"client.lr": lr})
            edit_summary(run, lambda s, v=val: s.update(best_selected_on="validation", final_val_metric=v))
    code, out, err = cli("report", root, "--group-by", "client.lr")
    assert code == 0, err
    assert "Best: best_*: the test metric at the round with the best validation metric" in out
    rows = md_rows(cli("report", root, "--group-by", "client.lr,privacy.delta", "--best-per", "privacy.delta")[1])
    assert [r["client.lr"] for r in rows] == ["0.3"]
    # runs without a validation split: selected on test, and said to be optimistic
    for run in root.iterdir():
        edit_summary(run, lambda s: (s.pop("best_selected_on"), s.pop("final_val_metric")))
    out = cli("report", root, "--group-by", "client.lr,privacy.delta", "--best-per", "privacy.delta")[1]
    assert [r["client.lr"] for r in md_rows(out)] == ["0.1"]
    assert "selected on the test split" in out and "--best-per rows chosen by their final test metric" in out
