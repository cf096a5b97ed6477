"""The wheel as a user installs it: one top-level package, runs from outside the checkout.

Builds the wheel from this checkout, installs it into a fresh virtual environment in a
temporary directory, and runs `fedsim init` and `fedsim run` there. The new environment
borrows the test environment's third-party packages (torch, Flower...) through a .pth line,
which imports them but not fedsim itself (an editable install is a .pth of its own, and .pth
files are read only in site directories), so the fedsim that runs is the wheel's.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parents[2]  # the checkout

pytestmark = pytest.mark.slow


def run(cmd: list, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_wheel_installs_only_fedsim_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", PROJECT_DIR],
                cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("fedsim-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"fedsim", wheel.name.split("-py")[0] + ".dist-info"}
    assert {"fedsim/clients/app.py", "fedsim/strategies/fedavg.py", "fedsim/configs/quickstart.toml"} <= set(names)

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=tmp_path).stdout.strip())
    (site / "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel],
                    cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run([python, "-c", "import fedsim, fedsim.clients.app as a; print(fedsim.__file__, a.__file__)"], work)
    assert where.returncode == 0 and str(site) in where.stdout and str(PROJECT_DIR) not in where.stdout, where
    for generic in ("clients", "strategies"):  # nothing but fedsim is installed
        assert run([python, "-c", f"import {generic}"], work).returncode != 0

    fedsim = env_dir / "bin" / "fedsim"
    init = run([fedsim, "init", "study"], work)
    assert init.returncode == 0 and (work / "study" / "quickstart.toml").is_file(), init.stderr
    small = ["--rounds", "1", "--num-clients", "4", "--clients-per-round", "2", "--engine", "opacus"]
    for config, out in (("study/quickstart.toml", "a"), ("quickstart", "b"), ("configs/quickstart.toml", "c")):
        done = run([fedsim, "run", config, *small, "--out", out, "--no-progress"], work)
        assert done.returncode == 0, (config, done.stderr)
        assert (work / out / "rounds.csv").read_text().count("\n") == 2  # header and round 1
    # the copy, the name and the README's path are one experiment: the same numbers
    metrics = {out: next(csv.DictReader(open(work / out / "rounds.csv")))["metric"] for out in "abc"}
    assert len(set(metrics.values())) == 1, metrics
