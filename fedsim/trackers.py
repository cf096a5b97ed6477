"""Experiment trackers: each finished round and the run's summary, handed to callbacks.

A callback is any object with one or both of these methods:

* ``on_round_end(round: int, metrics: dict)``, after the round is written: ``metrics`` is the
  round's row of rounds.csv (``metric_name``, ``metric``, ``test_loss``, ``train_loss``,
  ``sample_epsilon_max``, ``sample_epsilon_mean``, ``user_epsilon`` (None without central
  DP), ``clients_trained``, ``wall_seconds``), a copy the callback may keep;
* ``on_run_end(summary: dict)``, once, when the run ends for any reason: summary.json's
  dict, whose ``status`` says "finished", "failed" or "interrupted".

Two are built in, as optional extras, and enabled by ``output.trackers``: TensorBoard
(``pip install 'fedsim[tensorboard]'``, event files in ``<run>/tensorboard``) and MLflow
(``pip install 'fedsim[mlflow]'``, a SQLite store ``<run>/mlflow.db``, or the store named
by ``MLFLOW_TRACKING_URI``). They sit on the server side, so they work under every runtime
and in deployments. Python callbacks are added by `fedsim.run(..., callbacks=[...])`,
which wraps the run in `attached`: they are process-local, so they reach the in-process
and Ray runtimes (whose ServerApp runs in this process), not a deployment's SuperLink.

Why the MLflow store is SQLite and not a ``file:`` directory: MLflow 3 refuses its file
store unless an environment variable opts back in; SQLite is MLflow's own serverless
backend (its SQLAlchemy and Alembic come with Flower) and needs no server either.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from fedsim.config import Config, config_to_dict, flatten
from fedsim.errors import ConfigError

log = logging.getLogger("fedsim")

# tracker -> (module it imports, the fedsim extra that installs it)
REQUIREMENTS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}
CALLBACK_METHODS = ("on_round_end", "on_run_end")
# rounds.csv columns that are not numbers to plot
_NOT_SCALARS = ("round", "metric_name")


class Callback(Protocol):
    """What a tracker implements (either method may be left out)."""

    def on_round_end(self, round: int, metrics: dict[str, Any]) -> None: ...

    def on_run_end(self, summary: dict[str, Any]) -> None: ...


def check_available(names: Iterable[str]) -> None:
    """Refuse, with the extra to install, a tracker whose library is missing (without importing it)."""
    for name in names:
        module, extra = REQUIREMENTS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"output.trackers: {name} needs the {module} package; "
                              f"install it with: pip install 'fedsim[{extra}]'")


def check_callbacks(callbacks: Sequence[Any]) -> None:
    """A callback must have at least one of the two methods, so a typo is refused up front."""
    for callback in callbacks:
        if not any(callable(getattr(callback, m, None)) for m in CALLBACK_METHODS):
            raise ConfigError(f"callbacks: {callback!r} has neither {' nor '.join(CALLBACK_METHODS)}")


def round_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of one rounds.csv row, as trackers name them: every numeric column under
    its own name, except ``metric``, which goes under its metric's name (accuracy or mse).
    A missing value (None: no central DP) is left out; nan and inf are kept as they are."""
    out = {}
    for key, value in metrics.items():
        if key in _NOT_SCALARS or value is None:
            continue
        out[metrics["metric_name"] if key == "metric" else key] = float(value)
    return out


class TensorBoardTracker:
    """Scalars per round (step = round) and the summary as text, in ``log_dir``."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        log.info("tensorboard: writing to %s (tensorboard --logdir %s)", log_dir, log_dir)

    def on_round_end(self, round: int, metrics: dict[str, Any]) -> None:
        for tag, value in round_scalars(metrics).items():
            self.writer.add_scalar(tag, value, round)
        self.writer.flush()  # one flush a round: a live dashboard shows each round as it ends

    def on_run_end(self, summary: dict[str, Any]) -> None:
        text = json.dumps(summary, indent=2, sort_keys=True, default=str)
        self.writer.add_text("summary", "    " + text.replace("\n", "\n    "))  # markdown code block
        self.writer.close()



class MLflowTracker:
    """One MLflow run: the config as params, one metric per rounds.csv column (step = round),
    the summary as the artifact summary.json, and the run's end status.

    Uses an explicit `MlflowClient`, not MLflow's fluent API, so a notebook's own active
    MLflow run is left alone.
    """

    STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}

    def __init__(self, cfg: Config, out_dir: Path) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        local = not os.environ.get("MLFLOW_TRACKING_URI")
        self.uri = f"sqlite:///{(out_dir / 'mlflow.db').resolve()}" if local else os.environ["MLFLOW_TRACKING_URI"]
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = self.client.get_experiment_by_name(cfg.name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:  # artifacts beside the store, not in the current directory (MLflow's default)
            artifacts = (out_dir / "mlartifacts").resolve().as_uri() if local else None
            experiment_id = self.client.create_experiment(cfg.name, artifact_location=artifacts)
        self.run_id = self.client.create_run(experiment_id, run_name=out_dir.name,
                                             tags={"fedsim.run_dir": str(out_dir.resolve())}).info.run_id
        params = [Param(key, str(value)) for key, value in flatten(config_to_dict(cfg)).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        log.info("mlflow: run %s in %s (mlflow ui --backend-store-uri %s)", self.run_id, self.uri, self.uri)

    def on_round_end(self, round: int, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, round)
                                                    for key, value in round_scalars(metrics).items()])

    def on_run_end(self, summary: dict[str, Any]) -> None:
        self.client.log_dict(self.run_id, json.loads(json.dumps(summary, default=str)), "summary.json")
        self.client.set_terminated(self.run_id, self.STATUS.get(summary.get("status"), "FINISHED"))


def _open(name: str, cfg: Config, out_dir: Path) -> Callback:
    if name == "tensorboard":
        return TensorBoardTracker(out_dir / "tensorboard")
    return MLflowTracker(cfg, out_dir)


class Trackers:
    """What `fedsim.server.RunRecorder` calls: the configured trackers, then the attached
    callbacks, in order. A callback that raises fails the run (a round's files are written
    before any callback sees it); at the run's end every callback is still called, and the
    first error is raised after all of them."""

    def __init__(self, callbacks: Sequence[Any]) -> None:
        self.callbacks = list(callbacks)

    def on_round_end(self, round: int, metrics: dict[str, Any]) -> None:
        for callback in self.callbacks:
            method = getattr(callback, "on_round_end", None)
            if method is not None:
                method(round, dict(metrics))

    def on_run_end(self, summary: dict[str, Any]) -> None:
        errors = []
        for callback in self.callbacks:
            method = getattr(callback, "on_run_end", None)
            try:
                if method is not None:
                    method(dict(summary))
            except Exception as exc:  # noqa: BLE001 - the others are still closed; raised below
                errors.append(exc)
        if errors:
            raise errors[0]


_attached: list[Any] = []


@contextlib.contextmanager
def attached(callbacks: Sequence[Any]) -> Iterator[None]:
    """Every run that starts in this process while inside also calls `callbacks`."""
    callbacks = list(callbacks)
    check_callbacks(callbacks)
    _attached.extend(callbacks)
    try:
        yield
    finally:
        for callback in callbacks:
            _attached.remove(callback)


def open_trackers(cfg: Config, out_dir: Path) -> Trackers:
    """The run's trackers: those named in ``output.trackers`` (opened now, so a missing
    library is refused before the first round) and the attached callbacks."""
    check_available(cfg.output.trackers)
    opened: list[Any] = []
    try:
        for name in cfg.output.trackers:
            opened.append(_open(name, cfg, out_dir))
    except BaseException:
        with contextlib.suppress(Exception):  # close what opened; the opening error is the one to see
            Trackers(opened).on_run_end({"status": "failed"})
        raise
    return Trackers([*opened, *_attached])
