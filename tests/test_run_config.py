"""`flwr run`'s run config: flat keys onto fedsim keys, the node count, the output root.

The run configs here are parsed by Flower's own `parse_config_args`, exactly as
`flwr run --run-config "..."` parses them, and fused with the defaults in pyproject.toml.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import tomllib
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common.config import parse_config_args

from fedsim.config import describe_fields, dumps_toml, load_config
from fedsim.errors import ClientFailure, ConfigError
from fedsim.experiment import (FLAT_KEYS, config_from_context, experiment_from_run_config,
                               flat_key_table, requested_num_clients, run_config_keys)
from fedsim.records import CLIENT_STATE, RUN_CONFIG_KEY
from fedsim.serverapp import (federation_size, output_root, run_directory, run_flower_app, run_log_stream,
                              safe_name)

PROJECT_DIR = Path(__file__).resolve().parents[1]  # the checkout

PYPROJECT = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())
DEFAULTS = PYPROJECT["tool"]["flwr"]["app"]["config"]


def run_config(text: str = "") -> dict:
    """What the ServerApp's context.run_config holds after `flwr run --run-config text`."""
    return {**DEFAULTS, **parse_config_args([text] if text else None)}


# --------------------------------------------------------------------------- the table

def test_pyproject_declares_every_key_unset():
    # Flower refuses an override of an undeclared key; "" means "the experiment's value"
    assert list(DEFAULTS) == run_config_keys()
    assert set(DEFAULTS.values()) == {""}
    assert PYPROJECT["tool"]["flwr"]["app"]["components"]["serverapp"] == "fedsim.serverapp:app"


def test_every_flat_key_targets_a_config_key():
    keys = {key for key, *_ in describe_fields()}
    assert set(FLAT_KEYS.values()) <= keys


def test_deployment_doc_has_the_table():
    assert flat_key_table() in (PROJECT_DIR / "docs" / "deployment.md").read_text()


def test_no_run_config_is_the_default_experiment():
    assert experiment_from_run_config(run_config()) == load_config(PROJECT_DIR / "configs" / "quickstart.toml")
    assert requested_num_clients(run_config()) is None


def test_flat_keys_set_their_fedsim_keys():
    cfg = experiment_from_run_config(run_config(
        "num-server-rounds=5 noise-multiplier=0.8 max-grad-norm=2 local-epochs=3 lr=0.05 batch-size=8 "
        "seed=7 strategy='fedprox' dataset='breast-cancer' partitioner='iid' alpha=0.3 delta=1e-6 "
        "accountant='prv' clients-per-round=4 name='mine' output-dir='sub/x'"))
    assert (cfg.federation.rounds, cfg.privacy.noise_multiplier, cfg.privacy.max_grad_norm) == (5, 0.8, 2.0)
    assert (cfg.client.local_epochs, cfg.client.lr, cfg.client.batch_size) == (3, 0.05, 8)
    assert (cfg.seed, cfg.strategy.name, cfg.data.dataset, cfg.data.partitioner) == (7, "fedprox", "breast-cancer",
                                                                                    "iid")
    assert (cfg.data.alpha, cfg.privacy.delta, cfg.privacy.accountant) == (0.3, 1e-6, "prv")
    assert (cfg.federation.clients_per_round, cfg.name, cfg.output.dir) == (4, "mine", "sub/x")
    # everything else is the default experiment's
    base = load_config(PROJECT_DIR / "configs" / "quickstart.toml")
    assert (cfg.federation.num_clients, cfg.model.hidden, cfg.client.momentum) == (20, base.model.hidden, 0.0)


def test_unknown_key_and_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        experiment_from_run_config({**run_config(), "bogus": 1})
    with pytest.raises(ConfigError, match=r"^run config lr -> client.lr: must be > 0"):
        experiment_from_run_config(run_config("lr=-1"))
    with pytest.raises(ConfigError, match=r"^run config strategy -> strategy.name: must be one of"):
        experiment_from_run_config(run_config("strategy='nope'"))
    with pytest.raises(ConfigError, match="fraction-train: must be a number > 0 and <= 1"):
        experiment_from_run_config(run_config("fraction-train=1.5"))
    with pytest.raises(ConfigError, match="not both"):
        experiment_from_run_config(run_config("fraction-train=0.5 clients-per-round=2"))
    with pytest.raises(ConfigError, match="num-clients: must be an integer"):
        requested_num_clients(run_config("num-clients=2.5"))


def test_named_experiment_from_file_or_text(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('name = "exp"\n[federation]\nnum_clients = 6\nclients_per_round = 3\n')
    rc = run_config(f"config-path='{path}' num-server-rounds=4")
    cfg = experiment_from_run_config(rc)
    assert (cfg.name, cfg.federation.num_clients, cfg.federation.rounds) == ("exp", 6, 4)
    assert requested_num_clients(rc) == 6  # the submitter's experiment gives the number
    text = {**run_config(), RUN_CONFIG_KEY: 'name = "t"\n[client]\nlr = 0.2\n'}
    assert experiment_from_run_config(text).client.lr == 0.2
    assert requested_num_clients(text) is None  # it names no number: the federation's
    with pytest.raises(ConfigError, match="not a file"):
        experiment_from_run_config(run_config(f"config-path='{tmp_path / 'missing.toml'}'"))


# --------------------------------------------------------------------------- the node count

def test_node_count_becomes_num_clients_and_keeps_the_share():
    cfg = experiment_from_run_config(run_config(), num_nodes=2)  # quickstart: 10 of 20 per round
    assert (cfg.federation.num_clients, cfg.federation.clients_per_round) == (2, 1)
    cfg = experiment_from_run_config(run_config(), num_nodes=7)
    assert (cfg.federation.num_clients, cfg.federation.clients_per_round) == (7, 3)  # floor(0.5 * 7)
    cfg = experiment_from_run_config(run_config("fraction-train=1.0"), num_nodes=2)
    assert cfg.federation.clients_per_round == 2
    cfg = experiment_from_run_config(run_config("fraction-train=0.29 num-clients=100"), num_nodes=100)
    assert cfg.federation.clients_per_round == 29  # 0.29 * 100 = 28.999... in floats
    # a number the submitter gave is kept (the ServerApp checks it against the federation)
    cfg = experiment_from_run_config(run_config("num-clients=4"), num_nodes=2)
    assert (cfg.federation.num_clients, cfg.federation.clients_per_round) == (4, 2)


class Nodes:
    """A grid whose SuperNodes register over (fake) time: `counts` gives the count per poll."""

    def __init__(self, counts: list[int]) -> None:
        self.counts, self.polls, self.now = counts, 0, 0.0

    def get_node_ids(self) -> list[int]:
        n = self.counts[min(self.polls, len(self.counts) - 1)]
        self.polls += 1
        return list(range(1000, 1000 + n))

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def size(nodes: Nodes, requested: int | None, simulation: bool) -> int:
    return federation_size(nodes, requested, simulation=simulation, timeout=120.0, settle=2.0, poll=0.1,
                           clock=nodes.clock, sleep=nodes.sleep)


def test_simulation_mismatch_fails_in_seconds_with_the_fix():
    nodes = Nodes([0, 0, 0, 2])  # Flower registers the 2 simulated SuperNodes just after start
    with pytest.raises(ConfigError) as err:
        size(nodes, 20, simulation=True)
    assert nodes.now < 5  # the settle time, not the 120 s timeout
    text = str(err.value)
    assert "20 clients" in text and "simulates 2 SuperNodes" in text
    assert '--federation-config "num-supernodes=20"' in text
    assert "flwr federation simulation-config --num-supernodes 20" in text
    assert '--run-config "num-clients=2"' in text
    with pytest.raises(ConfigError, match="simulates 3 SuperNodes"):
        size(Nodes([3]), 2, simulation=True)  # more nodes than clients: at the first poll
    assert size(Nodes([0, 2]), 2, simulation=True) == 2
    assert size(Nodes([0, 0, 5]), None, simulation=True) == 5


def test_deployment_waits_for_joining_nodes():
    nodes = Nodes([1] * 30 + [2] * 30 + [3])  # SuperNodes join over 6 s
    assert size(nodes, 3, simulation=False) == 3
    with pytest.raises(ConfigError, match="4 SuperNodes are connected"):
        size(Nodes([4]), 3, simulation=False)
    nodes = Nodes([2])
    with pytest.raises(ClientFailure, match="only 2 of 3 SuperNodes connected within 120 s"):
        size(nodes, 3, simulation=False)
    assert size(Nodes([0, 1, 2]), None, simulation=False) == 2  # steady for the settle time


# --------------------------------------------------------------------------- the output root

def test_run_names_and_paths_cannot_leave_the_root(tmp_path):
    root = tmp_path / "runs"
    out = run_directory("", "../../x", root, "20260101-000000")
    assert out == root.resolve() / "x-20260101-000000" and out.is_dir()
    assert safe_name("a/b c") == "a-b-c" and safe_name("..") == "experiment"
    for bad in ("../escape", "a/../../b", str(tmp_path / "elsewhere"), "/etc"):
        with pytest.raises(ConfigError, match="output.dir"):
            run_directory(bad, "n", root, "s")
    (root / "link").symlink_to(tmp_path)  # a symlink inside the root that points out of it
    with pytest.raises(ConfigError, match="outside the output root"):
        run_directory("link/x", "n", root, "s")
    assert run_directory("sub/y", "n", root, "s") == root.resolve() / "sub" / "y"
    assert run_directory(str(root / "abs"), "n", root, "s") == root.resolve() / "abs"  # absolute, inside
    assert not (tmp_path / "escape").exists() and not (tmp_path / "elsewhere").exists()


def test_no_run_overwrites_another(tmp_path):
    root = tmp_path / "runs"
    first = run_directory("", "q", root, "20260101-000000")
    second = run_directory("", "q", root, "20260101-000000")  # same name, same second
    assert second != first and second.name == "q-20260101-000000-1"
    (first / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a run"):
        run_directory(str(first.relative_to(root.resolve())), "q", root, "s")


def test_output_root_is_the_operators(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDSIM_OUTPUT_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert output_root() == tmp_path.resolve() / "runs"
    monkeypatch.setenv("FEDSIM_OUTPUT_ROOT", str(tmp_path / "elsewhere"))
    assert output_root() == tmp_path.resolve() / "elsewhere"


# --------------------------------------------------------------------------- clients and the whole app

def test_a_client_trains_the_servers_experiment_not_the_run_config():
    # under `flwr run` a ClientApp's run config holds the submitter's raw keys (here an
    # experiment TOML); the server's resolved experiment, sent at discovery, must win
    server = dumps_toml(load_config(None, {"client.lr": 0.05}))
    state = RecordDict({CLIENT_STATE: ConfigRecord({RUN_CONFIG_KEY: server})})
    context = Context(run_id=1, node_id=5, node_config={}, state=state,
                      run_config={**run_config(), RUN_CONFIG_KEY: 'name = "raw"\n[client]\nlr = 0.9\n'})

    assert config_from_context(context).client.lr == 0.05


def test_flwr_run_config_end_to_end_in_process(tmp_path):
    """The ServerApp's whole path on fedsim's in-process grid (a stand-in for a deployment of
    3 SuperNodes): flat keys reach the clients, the count comes from the federation."""
    from fedsim.clients.app import make_client_app
    from fedsim.runtime.inprocess import SERVER_NODE_ID, InProcessGrid

    rc = run_config("num-server-rounds=2 lr=0.2 fraction-train=1.0 noise-multiplier=0 dataset='breast-cancer'")
    grid = InProcessGrid(make_client_app(), 3, rc)
    context = Context(run_id=1, node_id=SERVER_NODE_ID, node_config={}, state=RecordDict(), run_config=rc)
    out = run_flower_app(grid, context, root=tmp_path / "runs", stamp="s")
    assert out == (tmp_path / "runs" / "quickstart-s").resolve()
    rows = list(csv.DictReader((out / "rounds.csv").open()))
    assert [r["clients_trained"] for r in rows] == ["3", "3"]
    saved = load_config(out / "config.toml")
    assert (saved.federation.num_clients, saved.client.lr, saved.data.dataset) == (3, 0.2, "breast-cancer")
    assert re.search(r'"status": "finished"', (out / "summary.json").read_text())
    assert Path(saved.output.dir) == out


def test_the_run_log_stream_shows_fedsims_lines_once_in_fedsims_format(capsys):
    """Opacus' import calls ``logging.basicConfig``: a root console handler that printed every
    fedsim and Flower line of the ServerApp a second time, in Opacus' format. Inside the
    ServerApp's set-up a fedsim line shows once, as the CLI's ``-v`` shows it, nothing reaches
    the root, and the loggers are put back afterwards."""
    from flwr.common.logger import log as flower_log

    fedsim_log, flower_logger = logging.getLogger("fedsim"), logging.getLogger("flwr")
    before = (fedsim_log.level, fedsim_log.propagate, list(fedsim_log.handlers),
              [h.level for h in fedsim_log.handlers], flower_logger.propagate)
    root_lines = io.StringIO()
    root = logging.StreamHandler(root_lines)  # as Opacus' basicConfig leaves it: level NOTSET
    logging.getLogger().addHandler(root)
    try:
        with run_log_stream():
            fedsim_log.info("experiment 'x': 2 clients")
            fedsim_log.error("run failed: no")
            flower_log(logging.INFO, "configure_train: Sampled 2 nodes (out of 2)")
    finally:
        logging.getLogger().removeHandler(root)
    err = capsys.readouterr().err.splitlines()
    assert err.count("info: experiment 'x': 2 clients") == 1 and err.count("error: run failed: no") == 1
    assert not any("experiment 'x'" in line for line in err if not line.startswith("info: "))
    assert root_lines.getvalue() == ""
    assert (fedsim_log.level, fedsim_log.propagate, list(fedsim_log.handlers),
            [h.level for h in fedsim_log.handlers], flower_logger.propagate) == before
