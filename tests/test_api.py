"""The Python API (`import fedsim`): overrides named as the CLI's flags, results as
DataFrames, names that are both submodules and functions, and quiet logs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import fedsim
from fedsim.api import OVERRIDE_KEYS, config_for
from fedsim.config import config_to_dict, load_config
from fedsim.errors import ConfigError
from fedsim.results import read_summary

pytestmark = pytest.mark.usefixtures("restore_logging")

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(num_clients=6, clients_per_round=3, rounds=2, batch_size=32, lr=0.3, set={"model.hidden": [32]})

# one valid, non-default value per override: a new flag must be added here to be tested
VALUES = {
    "dataset": "breast-cancer", "model": "logreg", "strategy": "fedprox", "num_clients": 7,
    "clients_per_round": 2, "rounds": 3, "local_epochs": 2, "batch_size": 16, "lr": 0.25,
    "noise_multiplier": 0.5, "max_grad_norm": 2.0, "delta": 1e-6, "accountant": "prv",
    "partitioner": "shard", "alpha": 0.3, "runtime": "ray", "engine": "opacus", "device": "cpu", "seed": 3,
    "out": "runs/x", "bag_size": 4, "rho": 0.5, "label_epsilon": 2.0, "target_epsilon": 3.0,
}


def python(code: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter: import order and logging set-up as a new notebook has them."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_every_override_is_the_cli_flag_of_the_same_key():
    from fedsim.cli import build_parser, overrides_from

    assert set(VALUES) == set(OVERRIDE_KEYS)
    parser = build_parser()
    for name, value in VALUES.items():
        flag = "--" + name.replace("_", "-")
        args = parser.parse_args(["run", flag, str(value)])
        via_cli = load_config(None, overrides_from(args))
        via_api = config_for(**{name: value})
        assert config_to_dict(via_api) == config_to_dict(via_cli), name
        assert config_to_dict(via_api) != config_to_dict(load_config(None)), f"{name}: value is the default"


def test_unknown_override_names_the_allowed_ones():
    with pytest.raises(ConfigError) as err:
        config_for(round=2)
    text = str(err.value)
    assert text.startswith("round: unknown override (did you mean 'rounds'?); allowed: dataset, model, ")
    assert "target_epsilon" in text and "set={'section.key': value}" in text


def test_set_reaches_any_key_and_a_key_given_twice_is_refused():
    cfg = config_for(set={"strategy.name": "fedprox", "strategy.fedprox.mu": 0.1, "model.hidden": (16, 8)},
                     noise_multiplier=np.float64(0.5), seed=np.int64(3), out=Path("runs") / "y")
    assert (cfg.strategy.params.mu, cfg.model.hidden, cfg.privacy.noise_multiplier, cfg.seed) == (0.1, [16, 8], 0.5, 3)
    assert type(cfg.seed) is int and cfg.output.dir == str(Path("runs") / "y")
    with pytest.raises(ConfigError, match=r"^federation\.rounds: given twice, as rounds=2 and in set= as 3$"):
        config_for(rounds=2, set={"federation.rounds": 3})
    with pytest.raises(ConfigError, match=r"^federation\.rounds: must be >= 1 and <= 1000000 \(got 0\)$"):
        config_for(rounds=0)


def test_config_object_keeps_its_values_under_overrides(tmp_path):
    base = load_config(ROOT / "configs" / "quickstart.toml")
    cfg = config_for(base, rounds=4)
    assert cfg.federation.rounds == 4
    base.federation.rounds = 4
    assert config_to_dict(cfg) == config_to_dict(base)
    assert config_to_dict(config_for(ROOT / "configs" / "quickstart.toml", rounds=4)) == config_to_dict(base)
    with pytest.raises(ConfigError, match="config: file not found: nope"):
        config_for("nope")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    return fedsim.run(out=out, progress=False, noise_multiplier=1.0, **TINY), out


def test_run_returns_its_tables_summary_and_config(tiny_run):
    result, out = tiny_run
    assert result.dir == out
    assert result.rounds.equals(pd.read_csv(out / "rounds.csv", float_precision="round_trip"))
    assert result.rounds["round"].tolist() == [1, 2]
    assert result.clients.equals(pd.read_csv(out / "clients.csv", float_precision="round_trip"))
    assert result.summary == read_summary(out) and result.summary["status"] == "finished"
    assert result.config.federation.rounds == 2 and result.config.privacy.noise_multiplier == 1.0
    assert result.summary["final_metric"] == result.rounds["metric"].iloc[-1]
    assert "accuracy final" in repr(result) and "sample eps" in repr(result)
    again = fedsim.load_run(out)
    assert again.rounds.equals(result.rounds) and again.summary == result.summary
    assert len(fedsim.report(result)) == 1  # a RunResult is a report's input too


def test_model_of_a_run_is_its_final_global_model(tiny_run):
    pytest.importorskip("fedsim.checkpoint")
    import torch

    result, out = tiny_run
    model = result.model
    assert isinstance(model, torch.nn.Module)
    for name, tensor in fedsim.load_model(out).state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name])


def test_load_run_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        fedsim.load_run(tmp_path)


def test_default_run_directory_is_never_shared(tmp_path, monkeypatch):
    import fedsim.run as run_module
    from fedsim.api import _fresh_out_dir

    monkeypatch.setattr(run_module, "default_out_dir", lambda cfg: str(tmp_path / "runs" / "same-second"))
    first = config_for()
    _fresh_out_dir(first)
    Path(first.output.dir).mkdir(parents=True)
    second = config_for()
    _fresh_out_dir(second)
    assert (first.output.dir, second.output.dir) == (str(tmp_path / "runs" / "same-second"),
                                                     str(tmp_path / "runs" / "same-second-2"))


def test_sweep_and_report_from_python(tmp_path):
    cells = fedsim.sweep(config_for(**TINY), grid={"privacy.noise_multiplier": np.array([0.0, 1.0])},
                         out=tmp_path / "sw", rounds=1, progress=False)
    assert cells["status"].tolist() == ["finished", "finished"]
    assert cells.attrs["out"] == str(tmp_path / "sw")
    table = fedsim.report(cells)
    assert len(table) == 2
    assert fedsim.report.render(table, "csv").startswith("strategy,")  # the module's functions still there


def test_import_is_light_and_names_are_callable_whatever_was_imported_first():
    code = """
        import sys
        import fedsim
        heavy = [m for m in ("flwr", "pandas", "torch", "fedsim.api", "fedsim.run", "fedsim.sweep")
                 if m in sys.modules]
        assert not heavy, heavy
        import fedsim.cli                       # --help, report, status: no torch either
        assert "torch" not in sys.modules
        import fedsim.sweep                     # the module first, as internal code does
        from fedsim.report import render        # a from-import first
        import fedsim.run as run_module
        assert fedsim.sweep.run_sweep and fedsim.report.render is render and run_module.run_experiment
        assert callable(fedsim.run) and callable(fedsim.sweep) and callable(fedsim.report)
        import inspect
        assert "noise_multiplier" not in inspect.signature(fedsim.run).parameters
        assert "callbacks" in inspect.signature(fedsim.run).parameters
        print(fedsim.load_run.__module__, fedsim.RunResult.__name__)
    """
    done = python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "fedsim.api RunResult\n"


def test_quiet_by_default_and_each_flower_line_once_when_verbose(tmp_path):
    """Flower's INFO lines go to run.log only, unless verbose; then each is printed once.
    (Opacus calls logging.basicConfig on import, so Flower's records propagating to the root
    logger printed every line a second time.)"""
    code = f"""
        import sys
        import fedsim
        tiny = {TINY!r}
        fedsim.run(out="quiet", progress=False, **tiny)
        print("=== verbose", file=sys.stderr, flush=True)
        fedsim.run(out="verbose", progress=False, verbose=True, **tiny)
    """
    done = python(code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    quiet, verbose = done.stderr.split("=== verbose\n")
    banner = "configure_train: Sampled"  # Flower's FedAvg, once per round (TINY has 2 rounds)
    assert banner not in quiet and "INFO" not in quiet
    assert verbose.count(banner) == 2
    assert done.stdout == ""
    for run in ("quiet", "verbose"):
        log = (tmp_path / run / "run.log").read_text()
        assert log.count(banner) == 2 and log.count("round 2/2:") == 1, run
