"""One validation layer: every non-finite or out-of-range value, bad file and bad flag is one
line naming the key, exit 2, before any work; keys that do nothing are named; deploy and
partition defaults follow the number of clients.

The CLI cases run `fedsim.cli.main` in-process with training replaced by a stub that fails
the test: input that validation lets through would otherwise train (or hang) instead.
"""

from __future__ import annotations

import logging
import math

import pytest

from fedsim.config import describe_fields, load_config
from fedsim.errors import ConfigError

TINY = ["--num-clients", "2", "--rounds", "1"]


class ReachedTraining(Exception):
    pass


@pytest.fixture
def no_training(monkeypatch):
    """Training (in-process and Ray) raises: what reaches it passed every check."""
    import fedsim.run

    def stop(*_args, **_kwargs):
        raise ReachedTraining("validation let this through to training")

    monkeypatch.setattr(fedsim.run, "run_inprocess", stop)
    monkeypatch.setattr(fedsim.run, "run_ray", stop)
    monkeypatch.setattr(fedsim.run, "run_flower", stop)


@pytest.fixture
def refused(cli, tmp_path, no_training):
    """Run the CLI; assert exit 2 (or `code`) with exactly one line naming `key`; returns that line."""
    def run(argv: list, key: str, code: int = 2) -> str:
        extra = ["--out", tmp_path / "r"] if argv[0] in ("run", "sweep", "deploy") else []
        rc, _, err = cli(*argv, *extra)
        lines = err.strip().splitlines()
        assert rc == code and len(lines) == 1, err
        assert lines[0].startswith("error: ") and key in lines[0] and "Traceback" not in err, err
        return lines[0]
    return run


# --------------------------------------------------------------------------- non-finite and out of range

def _numeric_keys() -> list[str]:
    return [key for key, kind, *_ in describe_fields() if kind in ("number", "list of float")]


LIST_KEYS = {key for key, kind, *_ in describe_fields() if kind == "list of float"}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", _numeric_keys())
def test_every_float_key_refuses_non_finite(key, value):
    """NaN passes every `<`/`>` comparison, so range checks alone let it through."""
    literal = [1.0, value] if key in LIST_KEYS else value
    with pytest.raises(ConfigError, match=rf"^{key}(\[1\])?: must be a finite number \(got -?(nan|inf)\)$"):
        load_config(None, {key: literal})


@pytest.mark.parametrize("argv, key", [
    (["--max-grad-norm", "nan", "--noise-multiplier", "1"], "privacy.max_grad_norm"),
    (["--partitioner", "dirichlet", "--alpha", "nan"], "data.alpha"),
    (["--lr", "nan"], "client.lr"),
    (["--lr", "inf"], "client.lr"),
    (["--noise-multiplier", "nan"], "privacy.noise_multiplier"),
    (["--noise-multiplier", "inf"], "privacy.noise_multiplier"),
    (["--delta", "nan", "--noise-multiplier", "1"], "privacy.delta"),
    (["--target-epsilon", "nan"], "privacy.target_epsilon"),
    (["--set", "client.momentum=nan"], "client.momentum"),
    (["--set", "privacy.user_noise_multiplier=nan"], "privacy.user_noise_multiplier"),
    (["--set", "privacy.user_noise_multiplier=inf"], "privacy.user_noise_multiplier"),
    (["--strategy", "fedprox", "--set", "strategy.fedprox.mu=nan"], "strategy.fedprox.mu"),
])
def test_cli_refuses_non_finite_values(refused, argv, key):
    assert "must be a finite number" in refused(["run", *TINY, *argv], key)


@pytest.mark.parametrize("argv, key, allowed", [
    (["--delta", "1", "--noise-multiplier", "1"], "privacy.delta", "must be < 1.0"),
    (["--set", "model.hidden=[-3]"], "model.hidden[0]", "must be >= 1"),
    (["--set", "model.hidden=[100000]"], "model.hidden[0]", "must be <= 65536 (got 100000); the simulation holds"),
    (["--set", "model.hidden=[8192, 8192]"], "model.hidden", "at most 16777216"),
    (["--rounds", "100000000"], "federation.rounds", "must be <= 1000000"),
    (["--set", "client.momentum=1.0"], "client.momentum", "must be < 1.0"),
    (["--set", "data.validation_fraction=1"], "data.validation_fraction", "must be < 1.0"),
    (["--set", "data.validation_fraction=-0.1"], "data.validation_fraction", "must be >= 0"),
    (["--set", "seed=-1"], "seed", "must be >= 0"),
    (["--partitioner", "iid-mix", "--set", "data.iid_fraction=-0.1"], "data.iid_fraction", "must be >= 0"),
    (["--partitioner", "iid-mix", "--set", "data.iid_fraction=1.5"], "data.iid_fraction", "must be <= 1"),
    (["--set", "name='../../x'"], "name", "must match [A-Za-z0-9][A-Za-z0-9._-]{0,99}"),
    (["--set", "name='a/b'"], "name", "must match"),
    (["--set", "data.path=\"a\\u0000b\"", "--dataset", "file"], "data.path", "NUL"),
    (["--dataset", "synthetic", "--num-clients", "100000", "--set", "data.synthetic_samples=1000"],
     "data.synthetic_samples", "held in memory"),
])
def test_cli_refuses_out_of_range_values(refused, argv, key, allowed):
    line = refused(["run", *argv], key)
    assert allowed in line, line


@pytest.mark.parametrize("value", [1e300, -1e300, 1e13], ids=["1e300", "-1e300", "1e13"])
@pytest.mark.parametrize("key", _numeric_keys())
def test_every_float_key_refuses_magnitudes_that_overflow_float32(key, value):
    """No float key reaches training beyond MAX_FLOAT: a finite 1e308 becomes inf in float32."""
    from fedsim.config import MAX_FLOAT

    literal = [1.0, value] if key in LIST_KEYS else value
    with pytest.raises(ConfigError, match=rf"^{key}(\[1\])?: must be "):
        load_config(None, {key: literal})
    assert abs(value) > MAX_FLOAT


@pytest.mark.parametrize("key", ["privacy.noise_multiplier", "privacy.user_noise_multiplier"])
@pytest.mark.parametrize("value", [1e-300, 1e-5, 0.0099, 1.1e6, 1e12])
def test_noise_multiplier_is_zero_or_within_its_documented_range(key, value):
    """Below the floor the RDP series at fractional orders runs for ever (sigma = 1e-300 hung
    round 1); above the ceiling sigma**2 heads for overflow."""
    with pytest.raises(ConfigError, match=rf"^{key}: must be 0 \(off\) or between 0.01 and 1e\+06 "):
        load_config(None, {key: value})
    assert getattr(load_config(None, {key: 0.01}).privacy, key.split(".")[1]) == 0.01


@pytest.mark.parametrize("key, value", [("data.classes", [1, 1, 2]), ("data.drop_columns", ["b", "a", "a"]),
                                        ("model.pretrain_classes", [0, 0]), ("model.lora_targets", ["x", "x"])])
def test_a_value_listed_twice_is_refused(key, value):
    with pytest.raises(ConfigError, match=rf"^{key}: {value[1]!r} is listed twice"):
        load_config(None, {key: value})


@pytest.mark.parametrize("beta", ["beta_1", "beta_2"])
def test_fedadam_betas_stay_below_one(beta):
    """At beta = 1 Adam's bias correction divides by zero and the first round is NaN."""
    with pytest.raises(ConfigError, match=rf"^strategy.fedadam.{beta}: must be < 1.0 \(got 1.0\); at 1 "):
        load_config(None, {"strategy.name": "fedadam", f"strategy.fedadam.{beta}": 1.0})


def test_upper_bounds_say_why():
    with pytest.raises(ConfigError, match=r"federation\.rounds: must be <= 1000000 \(got 10000000\); .*typos"):
        load_config(None, {"federation.rounds": 10**7})
    with pytest.raises(ConfigError, match=r"^name: must match .*directory name"):
        load_config(None, {"name": "../../x"})


@pytest.mark.parametrize("name", ["quickstart", "run_1.v2-a", "A"])
def test_plain_run_names_are_accepted(name):
    assert load_config(None, {"name": name}).name == name


def test_integers_beyond_toml_are_refused():
    """The resolved config.toml must be able to hold every value (TOML integers are 64-bit)."""
    with pytest.raises(ConfigError, match="seed: must be <= 9223372036854775807"):
        load_config(None, {"seed": 10**30})


@pytest.mark.parametrize("value, expected", [
    ("ten", "expected an integer, got 'ten'"), (3.0, "expected an integer, got 3.0"),
    (True, "expected an integer, got True"), ([3], "expected an integer, got [3]")])
def test_wrong_types_are_named(value, expected):
    with pytest.raises(ConfigError, match=r"^federation\.rounds: " + expected.replace("[", r"\[").replace(
            "]", r"\]")):
        load_config(None, {"federation.rounds": value})


def test_delta_of_one_is_refused_before_accounting():
    """delta = 1 used to give epsilon = -3.21 and exit 0."""
    with pytest.raises(ConfigError, match=r"privacy\.delta: must be < 1\.0"):
        load_config(None, {"privacy.delta": 1.0, "privacy.noise_multiplier": 1.0})


# --------------------------------------------------------------------------- checks with the data

def test_check_delta_is_strict_at_one_over_n():
    from fedsim.config import check_delta

    check_delta(0.0099, 100)
    with pytest.raises(ConfigError, match=r"privacy\.delta: must be < 1/n = 0\.01, n = 100 .*releasing a whole"):
        check_delta(0.01, 100)


def test_delta_against_largest_client(refused):
    """digits: 1,438 training samples, 144 of them the validation split, 1,294 over 2 clients,
    647 each, so delta must be < 1/647; without the validation split 719 each."""
    line = refused(["run", *TINY, "--noise-multiplier", "1", "--delta", "0.002"], "privacy.delta")
    assert "n = 647 samples in the largest client" in line
    line = refused(["run", *TINY, "--noise-multiplier", "1", "--delta", "0.002", "--set",
                    "data.validation_fraction=0"], "privacy.delta")
    assert "n = 719 samples in the largest client" in line


def test_delta_against_clients_for_user_level_dp(refused):
    line = refused(["run", "--num-clients", "4", "--clients-per-round", "2", "--rounds", "1",
                    "--set", "privacy.user_noise_multiplier=1.0", "--delta", "0.3"], "privacy.delta")
    assert "n = 4 clients" in line


def test_small_delta_without_dp_is_not_checked_against_n(cli, no_training, tmp_path):
    """No guarantee uses delta: no data-dependent check (and it is reported as unused)."""
    with pytest.raises(ReachedTraining):
        cli("run", *TINY, "--delta", "0.5", "--out", tmp_path / "r")


def test_cuda_without_a_device_is_one_line(refused, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = refused(["run", *TINY, "--device", "cuda"], "runtime.device")
    assert line == "error: runtime.device: 'cuda' but no CUDA device is available on this machine; allowed here: " \
                   "auto, cpu"


# --------------------------------------------------------------------------- files and flags

def test_binary_config_file(refused, tmp_path):
    path = tmp_path / "x.toml"
    path.write_bytes(bytes(range(256)) * 4)
    assert "not a TOML text file" in refused(["run", path], "config")


def test_unreadable_config_is_an_os_error(refused, tmp_path):
    path = tmp_path / "locked.toml"
    path.write_text("name = 'x'\n")
    path.chmod(0)
    try:
        path.read_bytes()
        pytest.skip("this user reads any file (root)")
    except PermissionError:
        pass
    assert "cannot read" in refused(["run", path], "config", code=1)


@pytest.mark.parametrize("text, expected", [
    ("[federation\nrounds = 3\n", "not valid TOML"),
    ("[sweep]\ngrid = 1\n", "sweep.grid: expected a [sweep.grid] table"),
    ("sweep = 3\n", "sweep: expected a [sweep] table"),
    ("[sweep]\nout = 5\n", "sweep.out: expected a directory name"),
    ("[sweep.grid]\n\"a,b\" = [1, 2]\n", "needs lists of 2 values"),
    ("[sweep.grid]\n\"client.lr\" = [0.1, nan]\n", "client.lr: must be a finite number"),
    ("a = " + "[" * 2000 + "]" * 2000 + "\n", "nested too deeply"),
])
def test_bad_sweep_files(refused, tmp_path, text, expected):
    path = tmp_path / "s.toml"
    path.write_text(text)
    assert expected in refused(["sweep", path], "")


def test_binary_sweep_file(refused, tmp_path):
    path = tmp_path / "s.toml"
    path.write_bytes(b"\xff\xfe[sweep]\x00")
    assert "not a TOML text file" in refused(["sweep", path], "config")


@pytest.mark.parametrize("argv, flag", [
    (["deploy", "local", "--nodes", "0"], "--nodes"),
    (["deploy", "local", "--nodes", "x"], "--nodes"),
    (["deploy", "local", "--nodes", "2", "--timeout", "nan"], "--timeout"),
    (["deploy", "local", "--nodes", "2", "--timeout", "-1"], "--timeout"),
    (["sweep", "--jobs", "0"], "--jobs"),
    (["sweep", "--max-cells", "-1"], "--max-cells"),
])
def test_bad_flags_are_one_line(argv, flag, capsys, no_training, tmp_path):
    from fedsim.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in [*argv, "--out", tmp_path / "o"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and flag in err[0], err


def test_a_key_with_a_newline_stays_one_line(refused):
    refused(["run", "--set", "data.a\nb=1"], "unknown key")


# --------------------------------------------------------------------------- keys that do nothing

@pytest.fixture
def fedsim_warnings():
    """Messages fedsim logs at WARNING (its logger does not propagate once the CLI set it up)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("fedsim")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


@pytest.mark.parametrize("overrides, key", [
    ({"strategy.fedprox.mu": 0.1}, "strategy.fedprox.mu"),
    ({"strategy.name": "fedprox", "strategy.scaffold.server_lr": 0.5}, "strategy.scaffold.server_lr"),
    ({"data.alpha": 0.1}, "data.alpha"),
    ({"data.partitioner": "dirichlet", "data.classes_per_client": 3}, "data.classes_per_client"),
    ({"data.quantity_power": 2.0}, "data.quantity_power"),
    ({"data.iid_fraction": 0.5}, "data.iid_fraction"),
    ({"data.partitioner": "shard", "data.iid_fraction": 0.5}, "data.iid_fraction"),
    ({"data.feature_shift": 1.0}, "data.feature_shift"),
    ({"data.synthetic_alpha": 0.5}, "data.synthetic_alpha"),
    ({"data.linear_dim": 5}, "data.linear_dim"),
    ({"data.label_column": "y"}, "data.label_column"),
    ({"data.max_length": 16}, "data.max_length"),
    ({"model.name": "logreg", "model.hidden": [8]}, "model.hidden"),
    ({"model.lora_rank": 4}, "model.lora_rank"),
    ({"model.pretrain_epochs": 3}, "model.pretrain_epochs"),
    ({"client.local_steps": 5, "client.local_epochs": 3}, "client.local_epochs"),
    ({"privacy.max_grad_norm": 2.0}, "privacy.max_grad_norm"),
    ({"privacy.target_epsilon": 3.0, "privacy.noise_multiplier": 1.0}, "privacy.noise_multiplier"),
    ({"privacy.user_clip": 2.0}, "privacy.user_clip"),
    ({"privacy.accountant": "prv"}, "privacy.accountant"),
    ({"privacy.delta": 1e-6}, "privacy.delta"),
    ({"runtime.num_cpus": 2.0}, "runtime.num_cpus"),
    ({"runtime.engine": "opacus", "runtime.engine_chunk": 4}, "runtime.engine_chunk"),
])
def test_key_that_does_nothing_warns_or_is_refused_under_strict(overrides, key, fedsim_warnings):
    load_config(None, overrides)
    warned = [m for m in fedsim_warnings if m.startswith(f"{key}: has no effect")]
    assert len(warned) == 1 and "(--strict refuses it)" in warned[0], fedsim_warnings
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}: has no effect: read only when"):
        load_config(None, overrides, strict=True)


@pytest.mark.parametrize("overrides", [
    {"strategy.name": "fedprox", "strategy.fedprox.mu": 0.1},
    {"data.partitioner": "dirichlet", "data.alpha": 0.1},
    {"data.partitioner": "shard", "data.classes_per_client": 3},
    {"data.partitioner": "iid-mix", "data.classes_per_client": 3, "data.iid_fraction": 0.2},
    {"privacy.noise_multiplier": 1.0, "privacy.max_grad_norm": 2.0, "privacy.accountant": "prv",
     "privacy.delta": 1e-6},
    {"privacy.target_epsilon": 3.0, "privacy.max_grad_norm": 2.0},
    {"privacy.user_noise_multiplier": 1.0, "privacy.user_clip": 2.0},
    {"strategy.name": "bags", "strategy.bags.label_epsilon": 1.0, "strategy.bags.mechanism": "gaussian",
     "privacy.delta": 1e-6},
    {"client.local_epochs": 2},
    {"model.name": "lora-mlp", "model.lora_rank": 4, "model.pretrain_epochs": 3, "model.hidden": [16]},
    {"model.name": "my-registered-model", "model.hidden": [8]},  # a user's model may read any key
    {"runtime.name": "flower", "runtime.num_cpus": 2.0},
    {"runtime.name": "ray", "runtime.workers": 2},
    {"data.dataset": "linear", "data.linear_dim": 5, "data.synthetic_samples": 20},
    {"privacy.target_epsilon": 0.0, "privacy.noise_multiplier": 1.0},
])
def test_keys_that_are_read_are_not_reported(overrides):
    load_config(None, overrides, strict=True)


def test_strict_flag_on_run(refused):
    refused(["run", *TINY, "--set", "strategy.fedprox.mu=0.1", "--strict"], "strategy.fedprox.mu: has no effect")


def test_without_strict_the_run_goes_on(cli, no_training, tmp_path):
    with pytest.raises(ReachedTraining):
        cli("run", *TINY, "--set", "strategy.fedprox.mu=0.1", "--out", tmp_path / "r")


def test_renamed_key_is_still_refused(refused):
    refused(["run", "--set", "strategy.proximal_mu=0.1"], "strategy.proximal_mu: renamed to strategy.fedprox.mu")


def test_sweep_reports_a_key_only_if_no_cell_reads_it(tmp_path):
    """[strategy.fedprox] is read by the fedprox cells: fine. An alpha axis under IID is read by none."""
    from fedsim.sweep import plan_sweep

    plan_sweep(None, grid={"strategy.name": ["fedavg", "fedprox"]}, overrides={"strategy.fedprox.mu": 0.1},
               out=tmp_path / "a", strict=True)
    with pytest.raises(ConfigError, match=r"^data\.alpha: has no effect"):
        plan_sweep(None, grid={"data.alpha": [0.1, 0.5]}, out=tmp_path / "b", strict=True)


def test_strict_flag_on_sweep_and_deploy(refused):
    refused(["sweep", "--grid", "data.alpha=0.1,0.5", "--strict"], "data.alpha: has no effect")
    refused(["deploy", "local", "--nodes", "2", "--set", "data.alpha=0.1", "--strict"], "data.alpha: has no effect")


# --------------------------------------------------------------------------- deployment and partition defaults

def test_unset_clients_per_round_follows_num_clients():
    assert load_config(None, {"federation.num_clients": 3}).federation.clients_per_round == 3
    assert load_config(None, {"federation.num_clients": 30}).federation.clients_per_round == 5
    with pytest.raises(ConfigError, match=r"federation\.clients_per_round: must be <= federation\.num_clients \(3\)"):
        load_config(None, {"federation.num_clients": 3, "federation.clients_per_round": 5})


def test_partition_with_few_clients(cli):
    code, out, err = cli("partition", "--num-clients", "3")
    assert code == 0 and "over 3 clients" in out, err


@pytest.fixture
def fake_deploy(monkeypatch):
    """deploy_local records what it was given instead of starting a SuperLink."""
    import fedsim.deploy

    seen = {}

    def deploy_local(cfg, nodes, **_kwargs):
        seen.update(cfg=cfg, nodes=nodes)
        return cfg.output.dir

    monkeypatch.setattr(fedsim.deploy, "deploy_local", deploy_local)
    return seen


def test_deploy_nodes_sets_num_clients(cli, fake_deploy, tmp_path):
    code, _, err = cli("deploy", "local", "--nodes", "2", "--dataset", "digits", "--rounds", "2",
                       "--out", tmp_path / "d")
    assert code == 0, err
    fed = fake_deploy["cfg"].federation
    assert (fake_deploy["nodes"], fed.num_clients, fed.clients_per_round) == (2, 2, 2)


def test_deploy_nodes_and_num_clients_must_agree(refused):
    refused(["deploy", "local", "--nodes", "2", "--num-clients", "3", "--set", "federation.clients_per_round=2"],
            "--nodes: 2 must equal federation.num_clients (3)")


def test_a_resolved_config_is_not_reported(tmp_path):
    """A run directory's config.toml lists every key (the calibrated sigma beside the target
    epsilon, data.alpha under IID...): reloading it (a resume, a repeat) names nothing, while the
    same keys in a user's file are named."""
    from fedsim.config import dumps_toml

    cfg = load_config(None, {"privacy.target_epsilon": 3.0})
    cfg.privacy.noise_multiplier = 1.2  # what calibration writes
    resolved = tmp_path / "config.toml"
    resolved.write_text(dumps_toml(cfg))
    assert load_config(resolved, strict=True).privacy.noise_multiplier == 1.2
    partial = tmp_path / "mine.toml"
    partial.write_text("[privacy]\ntarget_epsilon = 3.0\nnoise_multiplier = 1.2\n")
    with pytest.raises(ConfigError, match=r"^privacy\.noise_multiplier: has no effect"):
        load_config(partial, strict=True)


# --------------------------------------------------------------------------- the rules, measured

def _rounds(out) -> list[dict]:
    import csv

    rows = csv.DictReader((out / "rounds.csv").open())
    return [{k: v for k, v in row.items() if k != "wall_seconds"} for row in rows]


@pytest.mark.slow
@pytest.mark.parametrize("setting, key, values, inert", [
    ({}, "strategy.fedprox.mu", (0.0, 5.0), True),
    ({}, "data.alpha", (0.05, 5.0), True),
    ({"client.local_steps": 2}, "client.local_epochs", (1, 3), True),
    ({}, "privacy.max_grad_norm", (0.01, 100.0), True),
    ({"privacy.target_epsilon": 5.0}, "privacy.noise_multiplier", (0.1, 10.0), True),
    ({"privacy.noise_multiplier": 1.0}, "privacy.max_grad_norm", (0.01, 100.0), False),  # read: results differ
    ({"strategy.name": "fedprox"}, "strategy.fedprox.mu", (0.0, 5.0), False),
])
def test_keys_reported_unused_change_nothing(tiny, tmp_path, setting, key, values, inert):
    """Two runs that differ only in a key `unused_keys` names give the same rounds, number for
    number; the controls (the key read) differ, so the comparison can see a difference."""
    from fedsim.config import read_experiment, unused_keys
    from fedsim.run import run_experiment

    outs = []
    for value in values:
        raw = read_experiment(None, {**setting, key: value})
        assert (key in unused_keys(raw, load_config(None, {**setting, key: value}))) == inert
        cfg = tiny(**setting, **{key: value, "output.dir": str(tmp_path / str(value))})
        outs.append(_rounds(run_experiment(cfg, progress=False)))
    assert (outs[0] == outs[1]) == inert, outs


# --------------------------------------------------------------------------- divergence

def test_a_run_that_diverges_stops_with_exit_1_and_keeps_the_rounds_before(cli, tmp_path, monkeypatch):
    """Round 2's global model evaluates to NaN: the run ends `diverged` at round 2 with one line
    naming the round, the value and the learning rate; round 1 stays in rounds.csv."""
    import json

    import fedsim.server
    from fedsim.results import run_state

    real, calls = fedsim.server.evaluate, []

    def nan_in_round_2(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        # a round evaluates the test split, then the validation split: call 3 is round 2's test
        return {**result, "loss": math.nan} if len(calls) == 3 else result

    monkeypatch.setattr(fedsim.server, "evaluate", nan_in_round_2)
    out = tmp_path / "run"
    code, _, err = cli("run", "--num-clients", "2", "--rounds", "3", "--lr", "0.25", "--out", out, "--no-progress")
    lines = [line for line in err.splitlines() if not line.startswith("warning")]
    assert code == 1 and lines == [lines[0]], err
    assert lines[0].startswith("error: run diverged at round 2: test_loss is nan (lower client.lr = 0.25"), lines
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["rounds_completed"] == 1
    assert math.isfinite(summary["final_metric"]) and run_state(out) == "diverged"
    assert len((out / "rounds.csv").read_text().splitlines()) == 2  # the header and round 1


def test_a_learning_rate_that_overflows_the_model_ends_diverged(cli, tmp_path):
    code, _, err = cli("run", "--dataset", "diabetes", "--set", 'model.name="linear"', "--lr", "1e9",
                       "--num-clients", "2", "--rounds", "2", "--out", tmp_path / "run", "--no-progress")
    assert code == 1 and ("error: run diverged at round 1: test_loss is nan, mse is nan, val_loss is nan "
                          "(lower client.lr = 1e+09") in err


# --------------------------------------------------------------------------- inputs once taken silently or misnamed

@pytest.mark.parametrize("make, argv, key, phrase", [
    (lambda d: d, [], "config", "is a directory; give a TOML file"),
    (lambda d: (d / "f.toml").write_text("federation = 5\n") and d / "f.toml", ["--num-clients", "3"], "federation",
     "expected a [federation] table, got 5 (so federation.num_clients cannot be set)"),
    (lambda d: d, ["--set", "name='" + "a" * 5000 + "'"], "name", "at most 100 characters"),
])
def test_inputs_refused_naming_the_right_key(refused, tmp_path, make, argv, key, phrase):
    path = make(tmp_path)
    line = refused(["run", *([path] if path is not None and key != "name" else []), *argv], key)
    assert line.startswith(f"error: {key}: ") and phrase in line, line


@pytest.mark.parametrize("out", ["", " "])
def test_an_empty_out_is_refused(cli, no_training, out):
    code, _, err = cli("run", *TINY, "--out", out)
    assert code == 2 and err.startswith("error: output.dir: --out got an empty path") and len(err.splitlines()) == 1


def test_a_toml_file_with_a_byte_order_mark_reads_like_without(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbfname = \"bom\"\n[federation]\nrounds = 3\n")
    cfg = load_config(path)
    assert (cfg.name, cfg.federation.rounds) == ("bom", 3)


@pytest.mark.parametrize("flag, value", [("--seeds", ""), ("--seeds", "0,,1"), ("--target-epsilons", "")])
def test_sweep_refuses_an_empty_list(refused, flag, value):
    line = refused(["sweep", *TINY, flag, value], flag)
    assert "expected comma-separated values" in line


def test_a_repeated_grid_key_merges_its_values_and_refuses_a_value_twice():
    from fedsim.sweep import parse_grid

    assert parse_grid(["client.lr=0.1", "seed=1,2", "client.lr=0.2,0.3"]) == {"client.lr": [0.1, 0.2, 0.3],
                                                                            "seed": [1, 2]}
    with pytest.raises(ConfigError, match=r"^--grid: client.lr lists 0.1 twice"):
        parse_grid(["client.lr=0.1", "client.lr=0.1"])


def test_a_sweep_cell_that_diverges_says_so_and_the_others_finish(cli, tmp_path):
    import pandas as pd

    code, _, err = cli("sweep", "--dataset", "diabetes", "--set", 'model.name="linear"', "--grid", "client.lr=1e9,0.01",
                       "--num-clients", "2", "--rounds", "1", "--out", tmp_path / "sw")
    assert code == 1 and "error: failed cell client.lr=1e+09: run diverged at round 1" in err, err
    from fedsim.sweep import run_sweep

    cells = run_sweep(None, grid={"client.lr": [1e9, 0.01]}, overrides={
        "data.dataset": "diabetes", "model.name": "linear", "federation.num_clients": 2, "federation.rounds": 1},
        out=tmp_path / "sw", progress=False)
    assert isinstance(cells, pd.DataFrame)
    assert dict(zip(cells["client.lr"], cells["status"])) == {1e9: "diverged", 0.01: "finished"}
