"""Fuzzing the bad-input contract with hypothesis.

Random invalid values (NaN, infinities, negative, huge, wrong types, unknown keys, bad
choices, repeated keys) in config files, ``--set`` and flags, and config or sweep files with
random bytes, truncation or corruption, go through `fedsim.cli.main` in-process. Real runs
(see "real runs" below) take extreme floats, bounds at their edges, degenerate data files
and damaged checkpoints and summaries. Whatever the
input, the outcome is one of:

* refused: exit 2 (1 for an OS error), one ``error:`` line naming what is wrong, no
  traceback (under ``--strict`` nothing else; otherwise only fedsim's warning lines);
* valid: it reaches training, which is replaced by a stub here, so nothing trains
  (`partition`, which does not train, exits 0).

Where an independent oracle (`surely_invalid`: an unknown key, a value of the wrong type, a
NaN or an infinity) says the input is bad, it must be refused, not reach training.

Any other exception (a traceback) fails the example; so does one that runs past a
generous bound (a hang). `make test` runs a short budget; ``-m slow`` a long one.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import signal
import tempfile
import warnings
from pathlib import Path
from unittest import mock

import pytest
import tomli_w
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedsim.cli import RUN_FLAGS, main
from fedsim.config import describe_fields

REPO = Path(__file__).parent.parent
HANG_SECONDS = 300  # far beyond any validation; only a hang gets there
SHORT = settings(max_examples=50, deadline=None, database=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LONG = settings(max_examples=1000, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

KINDS = {key: kind for key, kind, *_ in describe_fields()}
KEYS = [key for key in KINDS if key != "output.dir"]  # the harness sets the run directory
SECTIONS = sorted({key.split(".")[0] for key in KEYS if "." in key})

# Values that are invalid for most keys, plus a few valid choice names so that invalid
# values also meet other datasets, partitioners, models and runtimes.
BAD_FLOATS = [math.nan, math.inf, -math.inf, -1.0, -1e308, 1e308, 1e19, 0.0]
BAD_INTS = [-1, 0, -(2**63), 2**63, 10**12, 10**30]
WORDS = ["", "x", "nan", "../../x", "a/b", "a\nb", "a\x00b", "file", "dirichlet", "shard", "linear", "synthetic",
         "ray", "cuda", "vectorized", "prv", "hf-text", "lora-mlp", "fedprox", "bags", "gaussian"]
scalars = st.one_of(st.sampled_from(BAD_FLOATS), st.sampled_from(BAD_INTS), st.sampled_from(WORDS),
                    st.booleans(), st.text(max_size=12), st.floats(), st.integers(min_value=-(2**70), max_value=2**70))
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.sampled_from(["a", "x"]), scalars,
                                                                            max_size=2))
unknown_keys = st.builds(lambda section, name: f"{section}.{name}" if section else name,
                         st.sampled_from(["", *SECTIONS, "strategy.fedprox", "strategy.nosuch", "sweep"]),
                         st.from_regex(r"[a-z_]{1,10}", fullmatch=True))
keys = st.one_of(st.sampled_from(KEYS), unknown_keys)
assignments = st.lists(st.tuples(keys, values), min_size=1, max_size=3)

FLAG_VALUES = ["nan", "inf", "-inf", "-1", "0", "1", "1e999", "99999999999999999999", "abc", "", "[1,2]",
               "{a=1}", "'x'", "true", "1.5", "[[[[", "\"a\\u0000b\""]
FLAGS = [f for f in RUN_FLAGS if f != "--out"] + ["--target-epsilon"]
flag_args = st.lists(st.tuples(st.sampled_from(FLAGS), st.one_of(st.sampled_from(FLAG_VALUES), st.text(max_size=8))),
                     min_size=1, max_size=3)
SHIPPED = sorted(p.name for p in (REPO / "configs").glob("*.toml"))


class ReachedTraining(BaseException):
    """Raised where training would start. A BaseException, like KeyboardInterrupt: a sweep
    reports a failing cell and goes on to the next, but this must end the whole command."""


class Hang(Exception):
    pass


def _stop(*_args, **_kwargs):
    raise ReachedTraining


@contextlib.contextmanager
def _bounded(seconds: int):
    """Raise `Hang` in this (the main) thread after `seconds`."""
    def alarm(*_args):
        raise Hang(f"no outcome after {seconds} s")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def outcome(argv: list[str], *, stop_at_training: bool = True) -> tuple[int | None, str]:
    """(exit code, stderr) of `fedsim argv`, bounded in time; with `stop_at_training` the run
    itself is not started, and the exit code is None when the input reached training."""
    from fedsim.logs import setup_logging

    setup_logging(False)
    handler = logging.getLogger("fedsim").handlers[0]
    err = io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_bounded(HANG_SECONDS))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")  # Python warnings are not fedsim's lines
        if stop_at_training:
            for target in ("fedsim.run.run_inprocess", "fedsim.run.run_ray", "fedsim.run.run_flower",
                           "fedsim.deploy.deploy_local"):
                stack.enter_context(mock.patch(target, _stop))
        stack.enter_context(contextlib.redirect_stderr(err))
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        previous = handler.setStream(err)
        try:
            code = main(argv)
        except ReachedTraining:
            return None, err.getvalue()
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
        finally:
            handler.setStream(previous)
    return code, err.getvalue()


def _flat(raw: dict, prefix: str = "") -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for name, value in raw.items():
        if isinstance(value, dict) and value:
            out += _flat(value, f"{prefix}{name}.")
        else:
            out.append((prefix + name, value))
    return out


def _non_finite(value: object) -> bool:
    values = value if isinstance(value, list) else [value]
    return any(isinstance(v, float) and not math.isfinite(v) for v in values)


def _type_ok(kind: str, value: object) -> bool:
    def one(inner: str, v: object) -> bool:
        if inner in ("integer", "int"):
            return isinstance(v, int) and not isinstance(v, bool)
        if inner in ("number", "float"):
            return isinstance(v, (int, float)) and not isinstance(v, bool)
        if inner in ("string", "str"):
            return isinstance(v, str)
        return isinstance(v, bool) if inner == "true/false" else True
    if kind.startswith("list of "):
        return isinstance(value, list) and all(one(kind[len("list of "):], v) for v in value)
    return one(kind, value)


def surely_invalid(raw: dict) -> bool:
    """True when an unknown key, a wrongly typed value, NaN or infinity is among `raw`'s keys
    (the ``[sweep]`` table aside): an oracle that knows only the keys and their types."""
    for key, value in _flat(raw):
        if key.split(".")[0] == "sweep" or value == {}:  # an empty table sets nothing
            continue
        if key not in KINDS or not _type_ok(KINDS[key], value) or _non_finite(value):
            return True
    return False


def assert_contract(argv: list[str], strict: bool, bad: bool = False) -> None:
    """The outcome is a one-line refusal, or (unless `bad`) valid input."""
    code, err = outcome(argv)
    if code is None or code == 0:  # `partition` has no training: a valid input just prints the split
        assert not bad, f"bad input was accepted: {argv}"
        event("valid")
        return
    event(f"refused with exit {code}")
    # a sweep's progress bar (stderr) may have started when a cell's data-dependent check refuses it
    lines = [line for line in err.strip().splitlines() if not (argv[0] == "sweep" and "cell/s]" in line)]
    assert code in (1, 2), (code, err)
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, lines
    if strict:
        assert len(lines) == 1, lines
    else:
        assert all(line.startswith(("error: ", "warning: ")) for line in lines), lines


def _nested(pairs: list[tuple[str, object]]) -> dict:
    raw: dict = {}
    for key, value in pairs:
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = value
    return raw


def _set_literal(value: object) -> str:
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


# --------------------------------------------------------------------------- the properties

def check_config_file(pairs, strict, command):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "exp.toml"
        raw = _nested(pairs)
        path.write_text(tomli_w.dumps(raw))
        assert_contract([command, str(path), "--out", f"{tmp}/out", "--rounds", "1",
                         *(["--strict"] if strict else [])], strict, surely_invalid(raw))


def check_set_overrides(pairs, strict):
    pairs = [(k, v) for k, v in pairs if not isinstance(v, dict)]  # an inline table is a file's business
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["run", "--out", f"{tmp}/out", "--rounds", "1", *(["--strict"] if strict else [])]
        for key, value in pairs:
            argv += ["--set", f"{key}={_set_literal(value)}"]
        assert_contract(argv, strict, surely_invalid(_nested(pairs)))


def check_flags(flags, strict, command):
    from fedsim.config import parse_value

    keys = {**RUN_FLAGS, "--target-epsilon": "privacy.target_epsilon"}
    bad = surely_invalid(_nested([(keys[flag], parse_value(value)) for flag, value in flags]))
    with tempfile.TemporaryDirectory() as tmp:
        argv = [*command, "--out", f"{tmp}/out", *(["--strict"] if strict else [])]
        for flag, value in flags:
            argv += [f"{flag}={value}"]
        if "--rounds" not in dict(flags):
            argv += ["--rounds", "1"]
        assert_contract(argv, strict, bad)


def check_file_bytes(data, command, strict):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "exp.toml"
        path.write_bytes(data)
        assert_contract([command, str(path), "--out", f"{tmp}/out", "--rounds", "1",
                         *(["--strict"] if strict else [])], strict)


def check_damaged_shipped_config(name, cut, position, byte, command, strict):
    text = (REPO / "configs" / name).read_bytes()
    cut = min(cut, len(text))
    damaged = bytearray(text[:cut])
    if damaged and byte is not None:
        damaged[position % len(damaged)] = byte
    check_file_bytes(bytes(damaged), command, strict)


config_file = given(assignments, st.booleans(), st.sampled_from(["run", "partition", "sweep"]))(check_config_file)
set_overrides = given(assignments, st.booleans())(check_set_overrides)
flags = given(flag_args, st.booleans(), st.sampled_from([["run"], ["partition"], ["sweep"],
                                                         ["deploy", "local", "--nodes", "2"]]))(check_flags)
file_bytes = given(st.binary(max_size=400), st.sampled_from(["run", "sweep"]), st.booleans())(check_file_bytes)
damaged = given(st.sampled_from(SHIPPED), st.integers(0, 3000), st.integers(0, 3000),
                st.none() | st.integers(0, 255), st.sampled_from(["run", "sweep"]),
                st.booleans())(check_damaged_shipped_config)

test_fuzz_config_file = SHORT(config_file)
test_fuzz_set_overrides = SHORT(set_overrides)
test_fuzz_flags = SHORT(flags)
test_fuzz_file_bytes = SHORT(file_bytes)
test_fuzz_damaged_shipped_config = SHORT(damaged)

test_fuzz_config_file_long = pytest.mark.slow(LONG(given(assignments, st.booleans(), st.sampled_from(
    ["run", "partition", "sweep"]))(check_config_file)))
test_fuzz_set_overrides_long = pytest.mark.slow(LONG(given(assignments, st.booleans())(check_set_overrides)))
test_fuzz_flags_long = pytest.mark.slow(LONG(given(flag_args, st.booleans(), st.sampled_from(
    [["run"], ["partition"], ["sweep"], ["deploy", "local", "--nodes", "2"]]))(check_flags)))
test_fuzz_file_bytes_long = pytest.mark.slow(LONG(given(st.binary(max_size=2000), st.sampled_from(
    ["run", "sweep"]), st.booleans())(check_file_bytes)))
test_fuzz_damaged_shipped_config_long = pytest.mark.slow(LONG(given(
    st.sampled_from(SHIPPED), st.integers(0, 3000), st.integers(0, 3000), st.none() | st.integers(0, 255),
    st.sampled_from(["run", "sweep"]), st.booleans())(check_damaged_shipped_config)))


# --------------------------------------------------------------------------- real runs: refused, or finite
#
# The classes above stop where training would start. These run it (a tiny experiment: two
# clients, one round, an MLP of 8), since extreme values, bounds at their edges and degenerate
# data files fail, if at all, in training. Every input ends one of these ways:
#
# * exit 2 with one line naming a key (or a flag);
# * a finished run whose every metric and epsilon is finite;
# * a run that diverged: exit 1 and one "error: run diverged at round R" line.
#
# Nothing else: no traceback, no client failure, no NaN in a finished run, no hang.

REAL = settings(max_examples=12, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
REAL_LONG = settings(max_examples=300, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.function_scoped_fixture])
TINY_RUN = ["--rounds", "1", "--num-clients", "2", "--clients-per-round", "2", "--set", "model.hidden=[8]",
            "--no-progress"]
NAMES_A_KEY = r"^error: (([A-Za-z_0-9-]+\.)*[A-Za-z_0-9-]+(\[\d+\])?|--[a-z-]+|deploy local): "
# What makes a key read (else it only warns that it has no effect): settings that use it.
USE = {
    "data.alpha": {"data.partitioner": "dirichlet"}, "data.quantity_power": {"data.partitioner": "quantity"},
    "data.feature_shift": {"data.partitioner": "feature-skew"},
    "data.feature_noise": {"data.partitioner": "feature-skew"},
    "data.synthetic_alpha": {"data.dataset": "synthetic"}, "data.synthetic_beta": {"data.dataset": "synthetic"},
    "data.linear_noise": {"data.dataset": "linear"},
    "privacy.max_grad_norm": {"privacy.noise_multiplier": 1.0},
    "privacy.user_clip": {"privacy.user_noise_multiplier": 1.0},
    "model.lora_alpha": {"model.name": "lora-mlp", "strategy.name": "ffa-lora", "model.pretrain_epochs": 1},
    "model.lora_dropout": {"model.name": "lora-mlp", "strategy.name": "ffa-lora", "model.pretrain_epochs": 1},
}
FLOAT_KEYS = [key for key, kind, *_ in describe_fields()
              if kind == "number" and not key.startswith("runtime.") and key != "data.test_fraction"]
EXTREMES = [1e300, -1e300, 1e-300, -1e-300, 1e12, -1e12, 1e12 * (1 + 2**-52), 5e-324, 3.4e38, 1e-12]


def _edges(key: str) -> list[float]:
    """The key's own bounds and their nearest neighbours on either side."""
    import dataclasses

    from fedsim.algorithms import get_algorithm
    from fedsim.config import Config

    parts = key.split(".")
    owner: object = Config()
    if parts[0] == "strategy":
        owner = get_algorithm(parts[1]).params()
        parts = parts[2:]
    for part in parts[:-1]:
        owner = getattr(owner, part)
    meta = next(f.metadata for f in dataclasses.fields(owner) if f.name == parts[-1])
    out = []
    for bound in (meta.get("lo"), meta.get("hi")):
        if bound is not None:
            out += [bound, math.nextafter(bound, -math.inf), math.nextafter(bound, math.inf)]
    return out


def real_outcome(argv: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of a real `fedsim argv`, bounded in time."""
    return outcome(argv, stop_at_training=False)


def assert_refused_or_finite(code: int, err: str, out: Path) -> None:
    import json
    import re

    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert "Traceback" not in err and "client traceback" not in err, err
    if code == 0:
        event("finished")
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "finished"
        for name in ("final_metric", "best_metric", "final_test_loss"):
            assert isinstance(summary[name], float | int) and math.isfinite(summary[name]), (name, summary)
        for level in ("sample_level", "user_level", "label_level"):
            eps = (summary.get(level) or {}).get("epsilon_max" if level == "sample_level" else "epsilon")
            assert eps is None or math.isfinite(eps), (level, summary[level])
        return
    assert len(lines) == 1, lines
    if code == 1 and lines[0].startswith("error: run diverged at round "):
        event("diverged")
        assert json.loads((out / "summary.json").read_text())["status"] == "diverged"
        return
    event(f"refused with exit {code}")
    assert code == 2 and re.match(NAMES_A_KEY, lines[0]), (code, lines)


def check_extreme_float(key: str, value: float, engine: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sets = {**USE.get(key, {}), key: value, "runtime.engine": engine}
        parts = key.split(".")
        if parts[0] == "strategy" and len(parts) == 3:
            sets["strategy.name"] = parts[1]
        argv = ["run", *TINY_RUN, "--out", f"{tmp}/out"]
        for k, v in sets.items():
            argv += ["--set", f"{k}={_set_literal(v)}"]
        code, err = real_outcome(argv)
        assert_refused_or_finite(code, err, Path(tmp) / "out")


extreme_floats = st.sampled_from(FLOAT_KEYS).flatmap(
    lambda key: st.tuples(st.just(key), st.sampled_from(EXTREMES + _edges(key))))
def check_extreme_pair(pair: tuple[str, float], engine: str) -> None:
    check_extreme_float(*pair, engine)


engines = st.sampled_from(["auto", "opacus"])
test_fuzz_extreme_floats_and_edges_in_real_runs = REAL(given(extreme_floats, engines)(check_extreme_pair))
test_fuzz_extreme_floats_and_edges_in_real_runs_long = pytest.mark.slow(REAL_LONG(given(
    extreme_floats, engines)(check_extreme_pair)))


# Data files: extreme values, degenerate shapes and widths, duplicated or dropped columns.
DATA_VALUES = st.one_of(st.sampled_from([1e300, -1e300, 1e-300, 3.4e38, 3.5e38, 1e19, 0.0, math.nan, 7.0]),
                        st.floats(allow_nan=False, allow_infinity=False, width=64))


@st.composite
def data_files(draw) -> tuple[str, list[str]]:
    """(CSV text, extra --set arguments) of a small, possibly degenerate table."""
    rows = draw(st.sampled_from([0, 1, 2, 12, 60]))
    width = draw(st.sampled_from([0, 1, 3, 40]))
    names = [f"f{i}" for i in range(width)]
    if width and draw(st.booleans()):
        names[-1] = names[0]  # a name twice
    labels = draw(st.sampled_from(["classes", "one class", "fractions", "huge", "ids"]))
    header = ",".join([*names, "label"])
    lines = [header]
    for r in range(rows):
        base = draw(DATA_VALUES) if draw(st.integers(0, 9)) == 0 else float(r % 7)
        cells = [repr(base if c == 0 else float((r * (c + 3)) % 11)) for c in range(width)]
        label = {"classes": r % 3, "one class": 1, "fractions": r * 0.37, "huge": 1e300 * (r % 2) + r,
                 "ids": r}[labels]
        lines.append(",".join([*cells, repr(label)]).replace("nan", ""))
    extra = draw(st.sampled_from([[], ['data.drop_columns=["label"]'], ['data.drop_columns=["f0"]'],
                                  ['data.task="classification"'], ['data.task="regression"'],
                                  ['data.classes=[0, 2]'], ['data.missing="error"']]))
    return "\n".join(lines) + "\n", extra


def check_data_file(file: tuple[str, list[str]]) -> None:
    text, extra = file
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.csv"
        path.write_text(text)
        argv = ["run", *TINY_RUN, "--out", f"{tmp}/out", "--dataset", "file", "--set", f"data.path='{path}'",
                "--set", "data.test_fraction=0.5"]
        for item in extra:
            argv += ["--set", item]
        code, err = real_outcome(argv)
        assert_refused_or_finite(code, err, Path(tmp) / "out")


test_fuzz_degenerate_data_files_in_real_runs = REAL(given(data_files())(check_data_file))
test_fuzz_degenerate_data_files_in_real_runs_long = pytest.mark.slow(REAL_LONG(given(data_files())(check_data_file)))


# --------------------------------------------------------------------------- repeated keys

def check_repeated_keys(key: str, first: object, second: object, where: str) -> None:
    """A key given twice: TOML refuses a duplicate key; flags and --set take the last; --grid
    merges. Whatever the values, the outcome keeps the contract (training stubbed)."""
    with tempfile.TemporaryDirectory() as tmp:
        if where == "toml":
            path = Path(tmp) / "exp.toml"
            section, _, name = key.rpartition(".")
            body = f"{name} = {_set_literal(first)}\n{name} = {_set_literal(second)}\n"
            path.write_text((f"[{section}]\n" if section else "") + body)
            argv = ["run", str(path), "--out", f"{tmp}/out"]
        elif where == "set":
            argv = ["run", "--set", f"{key}={_set_literal(first)}", "--set", f"{key}={_set_literal(second)}",
                    "--out", f"{tmp}/out"]
        else:
            argv = ["sweep", "--grid", f"{key}={_set_literal(first)}", "--grid", f"{key}={_set_literal(second)}",
                    "--out", f"{tmp}/out", "--rounds", "1"]
        code, err = outcome(argv)
        if where == "toml":
            assert code == 2 and "not valid TOML" in err, (code, err)
            return
        if code not in (None, 0):
            lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
            if where == "grid" and code == 1 and all(line.startswith("error: failed cell ") for line in lines):
                assert "Traceback" not in err, err  # a sweep names each failed cell on a line of its own
                return
            assert_contract(argv, strict=False)


repeated = given(st.sampled_from(KEYS), scalars, scalars, st.sampled_from(["toml", "set", "grid"]))
test_fuzz_repeated_keys = SHORT(repeated(check_repeated_keys))
test_fuzz_repeated_keys_long = pytest.mark.slow(LONG(repeated(check_repeated_keys)))


# --------------------------------------------------------------------------- damaged run directories

@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A run interrupted after round 1 of 3: summary.json, rounds.csv and a checkpoint."""
    import fedsim.server as server

    out = tmp_path_factory.mktemp("fuzz-run") / "run"
    real = server.save_checkpoint

    def stop(run_dir, ckpt, *rest):
        real(run_dir, ckpt, *rest)
        raise KeyboardInterrupt
    with mock.patch.object(server, "save_checkpoint", stop):
        code, err = real_outcome(["run", "--rounds", "3", "--num-clients", "2", "--clients-per-round", "2",
                                  "--set", "model.hidden=[8]", "--noise-multiplier", "1.0", "--out", str(out),
                                  "--no-progress"])
    assert code == 130 and (out / "checkpoint.safetensors").is_file(), err
    return out


def _damage(data: bytes, cut: int, position: int, byte: int | None) -> bytes:
    damaged = bytearray(data[:min(cut, len(data))])
    if damaged and byte is not None:
        damaged[position % len(damaged)] = byte
    return bytes(damaged)


def check_damaged_run_dir(run: Path, target: str, cut: int, position: int, byte: int | None) -> None:
    import shutil

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "run"
        shutil.copytree(run, copy)
        path = copy / target
        path.write_bytes(_damage(path.read_bytes(), cut, position, byte))
        code, err = real_outcome(["run", "--resume", str(copy), "--no-progress"])
        assert_refused_or_finite(code, err, copy)
        code, err = real_outcome(["report", str(copy)])
        assert "Traceback" not in err, err
        assert code in (0, 2) and len([e for e in err.splitlines() if e.startswith("error: ")]) <= 1, err


damaged_runs = (st.sampled_from(["checkpoint.safetensors", "summary.json", "config.toml"]), st.integers(0, 100_000),
                st.integers(0, 100_000), st.none() | st.integers(0, 255))


@REAL
@given(*damaged_runs)
def test_fuzz_damaged_checkpoint_and_summary(interrupted_run, target, cut, position, byte):
    check_damaged_run_dir(interrupted_run, target, cut, position, byte)


@pytest.mark.slow
@REAL_LONG
@given(*damaged_runs)
def test_fuzz_damaged_checkpoint_and_summary_long(interrupted_run, target, cut, position, byte):
    check_damaged_run_dir(interrupted_run, target, cut, position, byte)


def test_a_checkpoint_changed_on_disk_is_refused_by_its_checksum(interrupted_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(interrupted_run, copy)
    path = copy / "checkpoint.safetensors"
    data = path.read_bytes()
    assert data.count(b"lora_targets = []") == 1  # the config TOML in the checkpoint's JSON header
    path.write_bytes(data.replace(b"lora_targets = []", b"lora_targets ? []"))
    code, err = real_outcome(["run", "--resume", str(copy), "--no-progress"])
    lines = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert code == 2 and len(lines) == 1, err
    assert lines[0] == (f"error: --resume: {path}: unreadable checkpoint (ValueError: its checksum does not match "
                        f"its contents: the file was changed or damaged)"), err
