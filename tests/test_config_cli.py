"""Config validation and the CLI's bad-input contract: one line naming the key, exit 2."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fedsim.config import load_config
from fedsim.errors import ConfigError


def write(tmp_path, text: str):
    p = tmp_path / "exp.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("toml, expected", [
    ('[federation]\nnum_clientz = 3\n', "federation.num_clientz: unknown key"),
    ('[federation]\nrounds = "ten"\n', "federation.rounds: expected an integer"),
    ('[federation]\nrounds = 0\n', "federation.rounds: must be >= 1"),
    ('[privacy]\naccountant = "gdp"\n', "privacy.accountant: must be one of rdp, prv, pld"),
    ('[strategy.bags]\nrho = 1.5\n', "strategy.bags.rho: must be <= 1.0"),
    ('[bags]\nrho = 0.5\n', "bags.rho: renamed to strategy.bags.rho"),
    ('[strategy]\nproximal_mu = 0.5\n', "strategy.proximal_mu: renamed to strategy.fedprox.mu"),
    ('[client]\nmargin_lambda = 0.5\n', "client.margin_lambda: renamed to strategy.fedld.margin_lambda"),
    ('[strategy.fedld]\nk_fraction = 0\n', "strategy.fedld.k_fraction: must be > 0.0"),
    ('[strategy.fedprox]\nmu = "big"\n', "strategy.fedprox.mu: expected a number"),
    ('[strategy.nosuch]\nx = 1\n', "strategy.nosuch: unknown key in strategy"),
    ('[federation]\nnum_clients = 3\nclients_per_round = 5\n', "federation.clients_per_round: must be <="),
    ('[data]\ndataset = "mnist"\n', "data.dataset: must be one of digits"),
    ('rounds = 3\n', "rounds: unknown key in top level"),
])
def test_bad_config_names_the_key(tmp_path, toml, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        load_config(write(tmp_path, toml))


def test_override_beats_file_and_ints_are_floats(tmp_path):
    cfg = load_config(write(tmp_path, "[client]\nlr = 0.5\n"), {"client.lr": 1, "seed": 3})
    assert cfg.client.lr == 1.0 and isinstance(cfg.client.lr, float) and cfg.seed == 3


def test_a_wrong_value_in_the_file_is_refused_even_when_overridden(tmp_path):
    """An override replaces the file's value, but does not excuse it (a fuzz case: ``rounds =
    nan`` in the file, ``--rounds 1`` on the command line); a valid file value still yields."""
    path = write(tmp_path, "[federation]\nrounds = nan\nnum_clients = 10\n[client]\nlr = 0.5\n")
    with pytest.raises(ConfigError, match=r"federation\.rounds: .*nan .*command line overrides"):
        load_config(path, {"federation.rounds": 1})
    assert load_config(write(tmp_path, "[client]\nlr = 0.5\n"), {"client.lr": 1.0}).client.lr == 1.0
    with pytest.raises(ConfigError, match=r"client\.lr"):  # out of range in the file
        load_config(write(tmp_path, "[client]\nlr = -1.0\n"), {"client.lr": 0.1})


@pytest.mark.parametrize("argv, key", [
    (["run", "--rounds", "abc"], "federation.rounds"),
    (["run", "--accountant", "gdp"], "privacy.accountant"),
    (["run", "--set", "privacy.nois=1"], "privacy.nois"),
    (["run", "--num-clients", "3", "--clients-per-round", "4"], "federation.clients_per_round"),
    (["run", "--model", "resnet"], "model.name"),
    (["run", "--dataset", "file", "--set", "data.path='/nonexistent.csv'"], "data.path"),
    (["run", "--strategy", "bags", "--dataset", "diabetes", "--num-clients", "10",
      "--clients-per-round", "2", "--bag-size", "64"], "strategy.bags.bag_size"),
    (["run", "--partitioner", "iid", "--num-clients", "2000", "--clients-per-round", "2"], "data.partitioner"),
    (["report", "/nonexistent-dir"], "report"),
])
def test_cli_bad_input_is_one_line_exit_2(cli, tmp_path, argv, key):
    code, out, err = cli(*argv, *(["--out", str(tmp_path / "r")] if argv[0] == "run" else []))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], err
    assert "Traceback" not in err


def test_cli_subprocess_bad_input_no_traceback(tmp_path):
    p = write(tmp_path, "[privacy]\naccountant = 'gdp'\n")
    res = subprocess.run([sys.executable, "-m", "fedsim.cli", "run", str(p)], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip() == "error: privacy.accountant: must be one of rdp, prv, pld (got 'gdp')"


def test_bags_non_numeric_label_is_refused(cli, tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("a,b,label\n" + "".join(f"{i},{i * 2},{'yes' if i % 2 else 'no'}\n" for i in range(60)))
    code, _, err = cli("run", "--strategy", "bags", "--dataset", "file", "--set", f"data.path='{data}'",
                       "--set", "data.task='regression'", "--num-clients", "2", "--clients-per-round", "2",
                       "--out", tmp_path / "r")
    assert code == 2 and "data.label_column" in err and "numeric" in err


COMMANDS = [["run"], ["audit"], ["partition"], ["datasets"], ["sweep"], ["report"], ["deploy"], ["deploy", "local"],
            ["deploy", "certs"], ["cache"], ["cache", "info"], ["cache", "clear"]]


def help_text(command: list[str]) -> str:
    from fedsim.cli import build_parser

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            build_parser().parse_args([*command, "--help"])
        except SystemExit as exc:
            assert exc.code == 0
    return out.getvalue()


def help_examples(command: list[str]) -> list[str]:
    """The command lines under a help text's ``example:`` / ``examples:`` heading."""
    text = help_text(command)
    tail = re.split(r"^examples?:$", text, flags=re.M)
    return [line.strip() for line in tail[1].splitlines() if line.strip()] if len(tail) == 2 else []


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_example(cli, command):
    with pytest.raises(SystemExit) as exc:
        cli(*command, "--help")
    assert exc.value.code == 0
    examples = help_examples(command)
    assert examples and all(e.startswith("fedsim " + " ".join(command)) for e in examples), examples


@pytest.mark.parametrize("example", [e for c in COMMANDS for e in help_examples(c)])
def test_help_examples_are_valid_commands(example, monkeypatch, tmp_path):
    """Every example a help text shows parses, and its config (every sweep cell) validates."""
    from fedsim.cli import build_parser, overrides_from
    from fedsim.sweep import parse_axis, plan_sweep

    monkeypatch.chdir(Path(__file__).parent.parent)  # examples name configs/... from the repo root
    args = build_parser().parse_args(shlex.split(example)[1:])
    if not hasattr(args, "set"):  # no experiment config (report, datasets, deploy certs)
        return
    cfg = load_config(args.config, overrides_from(args))
    assert cfg.federation.rounds >= 1
    if args.command == "sweep":
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
        cells = plan_sweep(args.config, grid=dict(parse_axis(t) for t in args.grid), seeds=seeds,
                           overrides=overrides_from(args), out=tmp_path / "sw")
        assert len(cells) >= 1 and not (tmp_path / "sw").exists()


def test_help_texts_name_only_current_config_keys():
    from fedsim.config import describe_fields

    keys = {k for k, *_ in describe_fields()}
    sections = "seed|name|data|model|federation|client|privacy|strategy|runtime|output|bags"
    stale = {(" ".join(c), token) for c in COMMANDS
             for token in re.findall(rf"(?<![\w./-])((?:{sections})\.[a-z_][a-z0-9_.]*[a-z0-9_])", help_text(c))
             if token not in keys}
    assert not stale, sorted(stale)


def test_cli_end_to_end_digits(cli, tmp_path):
    out = tmp_path / "run"
    code, stdout, _ = cli("run", "--dataset", "digits", "--num-clients", "6", "--clients-per-round", "3",
                          "--rounds", "2", "--noise-multiplier", "1.0", "--batch-size", "32",
                          "--out", out, "--no-progress")
    assert code == 0 and "RDP (Opacus)" in stdout and "delta=1e-05" in stdout
    rows = list(csv.DictReader((out / "rounds.csv").open()))
    assert [r["round"] for r in rows] == ["1", "2"]
    assert all(0 <= float(r["metric"]) <= 1 and int(r["clients_trained"]) == 3 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["sample_level"]["accountant"] == "RDP (Opacus)"
    assert (out / "config.toml").is_file() and (out / "clients.csv").is_file()
    resolved = load_config(out / "config.toml")
    assert resolved.privacy.noise_multiplier == 1.0 and resolved.federation.rounds == 2


def test_partition_command_prints_counts_and_plots(cli, tmp_path):
    png = tmp_path / "labels.png"
    code, out, _ = cli("partition", "--partitioner", "dirichlet", "--alpha", "0.3", "--num-clients", "5",
                       "--clients-per-round", "2", "--plot", png)
    assert code == 0 and png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    body = [line.split() for line in out.splitlines()[2:7]]
    # 80% of the 1,797 digits (1,438), less the validation split's 10% of those (144)
    assert sum(int(r[1]) for r in body) == 1294


def test_datasets_lists_builtins(cli):
    code, out, _ = cli("datasets")
    assert code == 0 and all(n in out for n in ["digits", "breast-cancer", "diabetes", "synthetic"])


def test_readme_config_reference_matches_the_schema():
    from pathlib import Path

    from fedsim.config import reference_table

    doc = (Path(__file__).parent.parent / "docs" / "config.md").read_text()
    assert reference_table() in doc, "regenerate docs/config.md's config reference from reference_table()"


@pytest.mark.parametrize("path", sorted(p.name for p in (Path(__file__).parent.parent / "configs").glob("*.toml")))
def test_every_shipped_config_passes_validation(path, tmp_path):
    """Each config in configs/ loads and passes everything `fedsim run` checks before training
    (data, partition, model, strategy, calibration)."""
    from fedsim.run import prepare

    cfg = load_config(Path(__file__).parent.parent / "configs" / path, {"output.dir": str(tmp_path / "run")})
    prepared = prepare(cfg)
    if cfg.privacy.target_epsilon > 0:
        assert prepared.privacy.noise_multiplier > 0


def test_python_dash_m_fedsim_is_the_cli():
    """``python -m fedsim`` runs the same command line as the ``fedsim`` script."""
    res = subprocess.run([sys.executable, "-m", "fedsim", "run", "--help"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: fedsim run")
    bad = subprocess.run([sys.executable, "-m", "fedsim", "run", "--rounds", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "federation.rounds" in bad.stderr, bad.stderr


def test_shipped_experiments_in_a_flower_app_bundle_without_the_configs_symlink(tmp_path, monkeypatch):
    """`flwr run .` bundles the checkout but drops the fedsim/configs symlink: the experiments
    are then the bundle's configs/ (next to its pyproject.toml), and only there, so an
    installed fedsim never picks up some other package's configs/ folder in site-packages."""
    from fedsim import config as C

    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "quickstart.toml").write_text('name = "quickstart"\n')
    monkeypatch.setattr(C, "SHIPPED_CONFIGS", bundle / "fedsim" / "configs")  # the dropped symlink
    monkeypatch.setattr(C, "APP_CONFIGS", bundle / "configs")
    assert C.builtin_configs() == {}  # no pyproject.toml: not a bundle
    (bundle / "pyproject.toml").write_text("[project]\nname = 'fedsim'\n")
    assert C.builtin_configs() == {"quickstart": bundle / "configs" / "quickstart.toml"}


# ----------------------------------------------------------------------------- warnings: one style, each once

def test_a_file_key_the_command_line_makes_moot_is_not_called_useless(caplog):
    """The README's `fedsim run configs/quickstart.toml --target-epsilon 3`: the file's sigma is
    replaced on purpose. A key that the file sets in vain by itself is still named."""
    import logging

    from fedsim.config import load_config

    quickstart = Path(__file__).resolve().parents[1] / "configs" / "quickstart.toml"
    with caplog.at_level(logging.WARNING, logger="fedsim"):
        load_config(quickstart, {"privacy.target_epsilon": 3.0})
    assert not [r for r in caplog.records if "has no effect" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="fedsim"):
        load_config(quickstart, {"strategy.fedprox.mu": 0.1, "privacy.target_epsilon": 3.0})
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["strategy.fedprox.mu"]


def test_the_secure_rng_warning_shows_once_per_process_whatever_catch_warnings_does():
    """Python's own "once" forgets at every `warnings.catch_warnings` (libraries enter one per
    call): the quiet console keeps its own record, so a sweep shows the statement once. In a
    subprocess: pytest records warnings itself."""
    script = """
import warnings
from fedsim.logs import setup_logging
setup_logging(False)
for _ in range(3):
    with warnings.catch_warnings():  # what a library does between two sweep cells
        pass
    warnings.warn("Secure RNG turned off: test statement", UserWarning)
    warnings.warn("another warning, every time", UserWarning)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    lines = done.stderr.splitlines()
    assert done.returncode == 0 and lines.count("warning: Secure RNG turned off: test statement") == 1, done.stderr
    assert lines.count("warning: another warning, every time") == 3


def test_fedsim_and_python_warnings_share_one_console_style(cli, tmp_path):
    code, _, err = cli("partition", "--set", "data.alpha=0.3", "--num-clients", "2")
    assert code == 0
    assert "warning: data.alpha: has no effect" in err and "WARNING" not in err
