"""The ServerApp that `flwr run` loads (``[tool.flwr.app.components] serverapp``).

`flwr run .` hands fedsim a Flower run config and a federation. Before any training, `main`

1. resolves the experiment from the run config (`fedsim.experiment.experiment_from_run_config`:
   the default or named experiment with the flat keys applied), so bad input fails at once;
2. counts the federation's SuperNodes. A simulation registers all of them at once, so a
   number of clients that disagrees fails within seconds, naming the command that fixes it,
   instead of after a discovery timeout. Without a number from the submitter, the count
   becomes ``federation.num_clients``;
3. picks a fresh run directory inside the output root (`run_directory`): the run config
   comes from whoever submits the run, so no path in it may leave the root, and no run
   overwrites another;
4. validates with data and calibrates target epsilons (`fedsim.run.prepare`), then runs the
   same `server_main` as every other runtime.

fedsim's INFO log goes to the run's log stream (``flwr run --stream``, ``flwr log``) in
fedsim's console format (`run_log_stream`), and a failure ends it with one line,
``error: run failed: ...``, before Flower's traceback.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import InMemoryGrid

from fedsim.errors import ClientFailure, ConfigError
from fedsim.experiment import experiment_from_run_config, requested_num_clients, run_config_for
from fedsim.logs import FEDSIM_FORMAT, ConsoleHandler
from fedsim.results import CONFIG_TOML, ROUNDS_CSV, SUMMARY_JSON
from fedsim.run import prepare
from fedsim.server import server_main

log = logging.getLogger("fedsim")

OUTPUT_ROOT_ENV = "FEDSIM_OUTPUT_ROOT"


# --------------------------------------------------------------------------- output directory

def output_root() -> Path:
    """Where every run of this ServerApp writes: ``$FEDSIM_OUTPUT_ROOT``, set by whoever starts
    the SuperLink, else ``runs/`` in the ServerApp's working directory (for Flower's local
    SuperLink: the directory the first `flwr run` started it from). Never the run config's
    to choose."""
    return Path(os.environ.get(OUTPUT_ROOT_ENV) or "runs").resolve()


def safe_name(name: str) -> str:
    """A run name as one harmless path component: ``../../x`` becomes ``x``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip(".-") or "experiment"


def run_directory(requested: str, name: str, root: Path, stamp: str) -> Path:
    """The run's directory inside `root`, created.

    `requested` (``output.dir`` from the run config, "" if none) must stay inside the root:
    a relative path without ``..``, or an absolute one under the root; it must not hold an
    earlier run. Without one, the directory is ``<name>-<stamp>`` (``-1``, ``-2``... when a
    run of the same name started in the same second), claimed with an exclusive mkdir.
    """
    root = root.resolve()
    if requested:
        path = Path(requested)
        if ".." in path.parts:
            raise ConfigError(f"output.dir: {requested!r} must not contain '..' (runs stay inside {root})")
        target = (path if path.is_absolute() else root / path).resolve()  # resolve: symlinks too
        if not target.is_relative_to(root):
            raise ConfigError(f"output.dir: {requested!r} is outside the output root {root}; give a path "
                              f"relative to it (the root is ${OUTPUT_ROOT_ENV} where the SuperLink runs)")
        if any((target / f).exists() for f in (SUMMARY_JSON, ROUNDS_CSV, CONFIG_TOML)):
            raise ConfigError(f"output.dir: {target} already holds a run; give another directory, "
                              f"or none for a new <name>-<timestamp> one")
        target.mkdir(parents=True, exist_ok=True)
        return target
    root.mkdir(parents=True, exist_ok=True)
    base = f"{safe_name(name)}-{stamp}"
    for i in range(1000):
        target = root / (base if i == 0 else f"{base}-{i}")
        try:
            target.mkdir()
            return target
        except FileExistsError:
            continue
    raise ConfigError(f"output.dir: 1000 runs named {base} already exist in {root}")


# --------------------------------------------------------------------------- the federation

def _mismatch(requested: int, nodes: int, simulation: bool) -> ConfigError:
    if simulation:
        return ConfigError(
            f"federation.num_clients: the experiment has {requested} clients but the federation simulates "
            f"{nodes} SuperNodes (one client each); fix it with "
            f"`flwr run . --federation-config \"num-supernodes={requested}\"` (this run), "
            f"`flwr federation simulation-config --num-supernodes {requested}` (every run), "
            f"or `--run-config \"num-clients={nodes}\"`")
    return ConfigError(
        f"federation.num_clients: the experiment has {requested} clients but {nodes} SuperNodes are "
        f"connected (one client each); stop {nodes - requested} of them, "
        f"or run with `--run-config \"num-clients={nodes}\"`")


def federation_size(grid: Grid, requested: int | None, *, simulation: bool, timeout: float = 120.0,
                    settle: float = 2.0, poll: float = 0.1, clock: Callable[[], float] = time.monotonic,
                    sleep: Callable[[float], None] = time.sleep) -> int:
    """The number of SuperNodes, checked against the `requested` number of clients.

    A simulation registers all its SuperNodes at once, just after the ServerApp starts: the
    count is final once it has stayed the same for `settle` seconds, and a mismatch fails
    then. In a deployment nodes join over time: the run waits (up to `timeout`) for the
    requested number, fails at once if more are connected, and without a request takes the
    count once it has been steady for `settle` seconds.
    """
    start = clock()
    last, since = -1, start
    while True:
        nodes, now = len(list(grid.get_node_ids())), clock()
        if nodes != last:
            last, since = nodes, now
        steady = nodes > 0 and now - since >= settle
        if requested is not None and nodes > requested:
            raise _mismatch(requested, nodes, simulation)
        if simulation and steady:
            if requested is not None and nodes != requested:
                raise _mismatch(requested, nodes, simulation)
            return nodes
        if not simulation and (nodes == requested or (requested is None and steady)):
            return nodes
        if now - start >= timeout:
            if requested is None:
                raise ClientFailure(f"no SuperNode connected within {timeout:.0f} s")
            raise ClientFailure(f"only {nodes} of {requested} SuperNodes connected within {timeout:.0f} s; "
                                f"start the missing ones, or run with `--run-config \"num-clients={nodes}\"`")
        sleep(poll)


# --------------------------------------------------------------------------- the app

def is_deployment(grid: Grid) -> bool:
    """Whether this `flwr run` reaches real SuperNodes: Flower's simulation engine hands the
    ServerApp an `InMemoryGrid`, a SuperLink a gRPC one. What ``privacy.secure_noise = "auto"``
    turns on for."""
    return not isinstance(grid, InMemoryGrid)


def run_flower_app(grid: Grid, context: Context, *, root: Path | None = None, stamp: str | None = None,
                   timeout: float = 120.0) -> Path:
    """One `flwr run`: resolve, check, run. Returns the run directory."""
    run_config = dict(context.run_config)
    experiment_from_run_config(run_config)  # bad input is refused before waiting for SuperNodes
    simulation = not is_deployment(grid)
    nodes = federation_size(grid, requested_num_clients(run_config), simulation=simulation, timeout=timeout)
    cfg = experiment_from_run_config(run_config, nodes)
    out = run_directory(cfg.output.dir, cfg.name, output_root() if root is None else root,
                        stamp or time.strftime("%Y%m%d-%H%M%S"))
    cfg.output.dir = str(out)
    log.info("experiment %r: %d clients, %d per round, %d rounds; run directory %s", cfg.name,
             cfg.federation.num_clients, cfg.federation.clients_per_round, cfg.federation.rounds, out)
    try:
        cfg = prepare(cfg, deployment=is_deployment(grid))
    except BaseException:
        if not any(out.iterdir()):
            out.rmdir()  # nothing ran: leave no empty run directory behind
        raise
    server_context = Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                             state=context.state, run_config=run_config_for(cfg))
    server_main(grid, server_context, progress=False, secure_protocol=True)  # nodes run fedsim's ClientApp
    return out


@contextmanager
def run_log_stream() -> Iterator[None]:
    """fedsim's INFO lines, once each and in fedsim's console format (``info: ...``, as ``-v``
    prints them), on stderr, which Flower mirrors into the run's log stream; everything put
    back afterwards.

    Once each: Opacus calls ``logging.basicConfig`` when it is imported (the server imports it
    for some accountants), which gives the root logger a console handler of its own; every
    record that reached it through propagation showed a second time, in Opacus' format. So
    neither fedsim's logger nor Flower's propagates while the run is on. Flower's lines keep
    Flower's format (``INFO :      configure_train: ...``): its console handler is its own,
    reconfiguring it would change what `flwr log` shows for every app, and its lines are not
    fedsim's to restyle."""
    fedsim_log, flower_log = logging.getLogger("fedsim"), logging.getLogger("flwr")
    saved = fedsim_log.level, fedsim_log.propagate, flower_log.propagate
    ours = [h for h in fedsim_log.handlers if isinstance(h, ConsoleHandler)]  # the CLI's, where set up
    levels = [h.level for h in ours]
    added = None
    if not ours:
        added = ConsoleHandler(FEDSIM_FORMAT)
        fedsim_log.addHandler(added)
        ours = [added]
    for handler in ours:
        handler.setLevel(logging.INFO)
    if fedsim_log.level == logging.NOTSET or fedsim_log.level > logging.INFO:
        fedsim_log.setLevel(logging.INFO)
    fedsim_log.propagate = flower_log.propagate = False
    try:
        yield
    finally:
        if added is not None:
            fedsim_log.removeHandler(added)
        else:
            for handler, level in zip(ours, levels):
                handler.setLevel(level)
        fedsim_log.setLevel(saved[0])
        fedsim_log.propagate, flower_log.propagate = saved[1], saved[2]


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point when Flower loads fedsim as an app (`flwr run`, a deployment)."""
    with run_log_stream():
        try:
            out = run_flower_app(grid, context)
            log.info("run finished: %s", out)
        except BaseException as exc:
            log.error("run failed: %s",
                      str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            raise
