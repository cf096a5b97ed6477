"""`flwr run .` from the checkout, the Flower way: the command of the README, on Flower's
own local SuperLink and its default simulation federation (2 SuperNodes), with runtime
dependency installation off (the app runs in this interpreter's environment).

Flower keeps the local SuperLink it starts (and its SuperExec) running after `flwr run`
returns, to serve the next run; everything else must be gone, and stopping the SuperLink
must take the rest with it.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsim.config import load_config
from fedsim.run import run_experiment

PROJECT_DIR = Path(__file__).resolve().parents[2]  # the checkout

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="scans /proc for processes")]

BIN = Path(sys.executable).parent
DAEMONS = {"flower-superlink", "flower-superexec"}  # what Flower keeps for the next `flwr run`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_processes(home: Path) -> dict[int, str]:
    """pid -> program of every process started for this test's Flower: they all inherit
    ``FLWR_HOME=<home>`` (SuperLink, SuperExec, flwr-simulation, Ray), and no other process has it."""
    marker = f"FLWR_HOME={home}".encode()
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours
            continue
        programs = [Path(a.decode()).name for a in argv[:2] if a]
        found[int(proc.name)] = next((p for p in programs if p.startswith(("flower-", "flwr"))),
                                     " ".join(programs) or "?")
    return found


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in rows]


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return condition()


@pytest.fixture
def flower(tmp_path):
    """The environment of `FLWR_HOME=$(mktemp -d) FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
    flwr run ...` in an activated venv; every process it leaves is stopped at the end."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           # an activated venv: Flower starts flower-superlink, flower-superexec and flwr-simulation by name
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           # this checkout's code wherever Flower imports fedsim before installing the app
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_DIR), os.environ.get("PYTHONPATH")])),
           # Flower's local SuperLink listens on fixed ports (39091, 39093) by default: another one
           # there (yours, a parallel test's) would take the run, with its own environment
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           "FEDSIM_OUTPUT_ROOT": str(tmp_path / "runs"),  # where the ServerApp writes: not the checkout
           # Flower's simulation calls ray.init() with no address, which joins the Ray instance
           # another test has running on this machine (its CPUs taken: "ActorPool is empty");
           # Ray reads RAY_ADDRESS first, and "local" starts one of its own
           "RAY_ADDRESS": "local"}
    yield env, home
    for pid in flower_processes(home):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def flwr(env: dict, *args: str) -> subprocess.CompletedProcess:
    """`flwr run . --stream ...` from the checkout, output (the run's log stream) in stdout.

    Flower gives the local SuperLink it starts a fixed 15 s to come up (and kills it after);
    a loaded machine can miss that, so a start that timed out is tried again, up to 4 times."""
    for _ in range(4):
        done = subprocess.run([str(BIN / "flwr"), "run", ".", "--stream", *args], cwd=PROJECT_DIR, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900,
                              stdin=subprocess.DEVNULL)

        if "Failed to start local SuperLink" not in done.stdout:
            break
    return done


def test_flwr_run_from_the_checkout(flower, tmp_path):
    env, home = flower
    runs = tmp_path / "runs"

    # a number of clients the federation does not have fails at discovery, naming the fix
    # (flwr 1.41 still exits 0 when a run fails: the stream and `flwr ls` say it)
    bad = flwr(env, "--run-config", "num-clients=3")
    assert "run failed: federation.num_clients: the experiment has 3 clients" in bad.stdout, bad.stdout[-4000:]
    assert "simulates 2 SuperNodes" in bad.stdout and '--federation-config "num-supernodes=3"' in bad.stdout
    assert not list(runs.glob("*/rounds.csv"))  # nothing ran, nothing was written

    done = flwr(env, "--run-config", "num-server-rounds=2")
    assert done.returncode == 0, done.stdout[-4000:]
    assert "run failed" not in done.stdout
    (run,) = [p for p in runs.iterdir() if p.is_dir()]  # one run directory, timestamped
    assert run.name.startswith("quickstart-")
    rows = list(csv.DictReader((run / "rounds.csv").open()))
    assert [r["round"] for r in rows] == ["1", "2"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["num_clients"] == 2  # the default federation's SuperNodes
    assert f"run finished: {run}" in done.stdout
    # the same experiment in process, each client trained alone as Flower's ClientApps train
    # one message each (with the same engine), gives the same rounds
    cfg = load_config(run / "config.toml", {"output.dir": str(tmp_path / "inprocess"), "runtime.engine_chunk": 1})
    same = list(csv.DictReader((run_experiment(cfg, progress=False) / "rounds.csv").open()))
    assert without_time(rows) == without_time(same)

    # the simulation and Ray are gone; Flower's own SuperLink and SuperExec stay for the next run
    assert wait_until(lambda: set(flower_processes(home).values()) <= DAEMONS, 60), flower_processes(home)
    superlinks = [pid for pid, name in flower_processes(home).items() if name == "flower-superlink"]
    assert len(superlinks) == 1
    os.kill(superlinks[0], signal.SIGTERM)  # stopping it takes the rest with it
    assert wait_until(lambda: not flower_processes(home), 60), flower_processes(home)
