"""Experiment trackers: TensorBoard and MLflow read back with their own readers and held
equal to rounds.csv and summary.json; Python callbacks; refusals (unknown tracker, missing
library) and a callback that fails."""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest

import fedsim
from fedsim.config import load_config
from fedsim.errors import ConfigError
from fedsim.results import read_summary

pytestmark = pytest.mark.usefixtures("restore_logging")

# digits, MLP(32), 6 clients, 3 per round, 2 rounds, DP-SGD (finite epsilons)
TINY = dict(num_clients=6, clients_per_round=3, rounds=2, batch_size=32, lr=0.3, noise_multiplier=1.0)
SCALARS = {"accuracy": "metric", "test_loss": "test_loss", "val_metric": "val_metric", "val_loss": "val_loss",
           "train_loss": "train_loss",
           "sample_epsilon_max": "sample_epsilon_max", "sample_epsilon_mean": "sample_epsilon_mean",
           "clients_trained": "clients_trained", "wall_seconds": "wall_seconds"}  # tracker name -> column


class Recorder:
    """A user callback that keeps what it is given."""

    def __init__(self) -> None:
        self.rounds: list[tuple[int, dict]] = []
        self.summaries: list[dict] = []

    def on_round_end(self, round: int, metrics: dict) -> None:
        self.rounds.append((round, metrics))

    def on_run_end(self, summary: dict) -> None:
        self.summaries.append(summary)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, monkeypatch_module):
    """One run with both trackers and a Python callback."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)  # the run's own store, never a server
    recorder = Recorder()
    result = fedsim.run(out=tmp_path_factory.mktemp("tracked") / "run", progress=False, callbacks=[recorder],
                        set={"name": "tracked", "model.hidden": [32],
                             "output.trackers": ["tensorboard", "mlflow"]}, **TINY)
    return result, recorder


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_tensorboard_scalars_are_rounds_csv(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    result, _ = tracked
    rounds = pd.read_csv(result.dir / "rounds.csv")
    events = EventAccumulator(str(result.dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(SCALARS)  # user_epsilon is None without central DP
    for tag, column in SCALARS.items():
        written = events.Scalars(tag)
        assert [e.step for e in written] == rounds["round"].tolist()
        assert [e.value for e in written] == pytest.approx(rounds[column].tolist(), rel=1e-6)  # float32
    (text,) = events.Tensors("summary/text_summary")
    assert json.loads(tensor_util.make_ndarray(text.tensor_proto).item().decode()) == read_summary(result.dir)


def test_mlflow_run_is_rounds_csv_config_and_summary(tracked, tmp_path):
    from mlflow.tracking import MlflowClient

    result, _ = tracked
    rounds = pd.read_csv(result.dir / "rounds.csv", float_precision="round_trip")
    client = MlflowClient(tracking_uri=f"sqlite:///{result.dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tracked")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == result.dir.name
    assert run.data.params["federation.rounds"] == "2"
    assert run.data.params["privacy.noise_multiplier"] == "1.0"
    assert run.data.params["output.trackers"] == str(["tensorboard", "mlflow"])
    for name, column in SCALARS.items():
        history = sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
        assert [m.step for m in history] == rounds["round"].tolist()
        assert [m.value for m in history] == rounds[column].tolist()  # float64 all the way
    path = client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))
    assert json.loads(open(path).read()) == read_summary(result.dir)


def test_callback_gets_each_row_and_the_summary(tracked):
    result, recorder = tracked
    rounds = pd.read_csv(result.dir / "rounds.csv", float_precision="round_trip", keep_default_na=False)
    assert [r for r, _ in recorder.rounds] == [1, 2]
    for (_, metrics), (_, row) in zip(recorder.rounds, rounds.iterrows()):
        assert metrics["user_epsilon"] is None
        assert {k: v for k, v in metrics.items() if k != "user_epsilon"} == \
               {k: v for k, v in row.to_dict().items() if k != "user_epsilon"}
    (summary,) = recorder.summaries
    assert json.loads(json.dumps(summary, default=str)) == read_summary(result.dir)
    assert summary["status"] == "finished"


def test_unknown_tracker_is_refused_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"^output\.trackers: each must be one of tensorboard, mlflow "
                                          r"\(got 'wandb'\)$"):
        load_config(None, {"output.trackers": ["wandb"]})
    with pytest.raises(ConfigError, match="listed twice"):
        load_config(None, {"output.trackers": ["mlflow", "mlflow"]})


def test_missing_library_names_the_extra(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what find_spec sees when mlflow is not installed
    line = "error: output.trackers: mlflow needs the mlflow package; install it with: pip install 'fedsim[mlflow]'\n"
    code, out, err = cli("run", "--num-clients", "4", "--clients-per-round", "2", "--rounds", "1",
                         "--out", tmp_path / "cli", "--set", 'output.trackers=["mlflow"]', "--no-progress")
    assert (code, err) == (2, line)
    assert not (tmp_path / "cli" / "rounds.csv").exists()  # refused before the first round
    with pytest.raises(ConfigError, match=r"pip install 'fedsim\[mlflow\]'"):
        fedsim.run(out=tmp_path / "api", set={"output.trackers": ["mlflow"]})
    assert not (tmp_path / "api").exists()  # the API refuses before anything is written


def test_failing_callback_fails_the_run_and_every_tracker_is_closed(tmp_path):
    class Boom(Exception):
        pass

    class Fails:
        def on_round_end(self, round: int, metrics: dict) -> None:
            raise Boom(f"round {round}")

    recorder = Recorder()
    with pytest.raises(Boom, match="round 1"):
        fedsim.run(out=tmp_path / "run", progress=False, callbacks=[recorder, Fails()],
                   set={"model.hidden": [32]}, **TINY)
    assert len(pd.read_csv(tmp_path / "run" / "rounds.csv")) == 1  # written before the callbacks ran
    assert [s["status"] for s in recorder.summaries] == ["failed"]
    assert read_summary(tmp_path / "run")["status"] == "failed"


def test_a_callback_without_either_method_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="has neither on_round_end nor on_run_end"):
        fedsim.run(out=tmp_path / "run", callbacks=[print])
