"""The wheel as a user installs it: one top-level package, its declared dependencies and
nothing else, run from outside the checkout.

Builds the wheel from this checkout and installs it into a fresh virtual environment in a
temporary directory. No package index is reachable, so the environment's dependencies come
from the test environment, but only those the wheel declares: a directory of links to the
files of exactly the distributions its ``Requires-Dist`` names, followed transitively
(extras and markers evaluated), goes into the new environment through a .pth line. A module
that fedsim imports but does not declare (``safetensors`` once came only through an extra)
is then missing there as it would be after ``pip install fedsim``.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import venv
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT_DIR = Path(__file__).resolve().parents[2]  # the checkout


def run(cmd: list, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}  # not the checkout
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def declared_closure(requires: list[str]) -> dict[str, metadata.Distribution]:
    """The installed distributions that `requires` (Requires-Dist lines) pulls in, transitively."""
    found: dict[str, metadata.Distribution] = {}
    todo = [(Requirement(text), "") for text in requires]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        known = found.get(name)
        try:
            dist = known or metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"declared dependency {req.name} is not installed in the test environment")
        found[name] = dist
        # a distribution is walked once, plus once for each extra asked of it
        for wanted in ([""] if known is None else []) + sorted(req.extras):
            todo += [(Requirement(text), wanted) for text in dist.requires or []]
    return found


def dependency_view(dists: dict[str, metadata.Distribution], target: Path) -> Path:
    """A directory of links to the top-level files of `dists` only (their RECORD)."""
    target.mkdir()
    for dist in dists.values():
        root = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            link = target / top
            if not link.exists() and (root / top).exists():
                link.symlink_to(root / top)
    return target


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """(the wheel, its environment's python, a work directory outside the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                 tmp / "dist", PROJECT_DIR], cwd=tmp)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp / "dist").glob("fedsim-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        info = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        requires = Parser().parsestr(archive.read(info).decode()).get_all("Requires-Dist") or []

    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip())
    view = dependency_view(declared_closure(requires), tmp / "declared-deps")
    (site / "declared-deps.pth").write_text(f"{view}\n")
    installed = run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q",
                     wheel], cwd=tmp)
    assert installed.returncode == 0, installed.stderr
    work = tmp / "elsewhere"
    work.mkdir()
    return wheel, python, work


def test_wheel_with_its_declared_dependencies_runs_quickstart(wheel_env) -> None:
    """The default tier's smoke test: `fedsim run quickstart --rounds 1` from a temporary
    directory, in an environment that holds the wheel and its declared dependencies only."""
    wheel, python, work = wheel_env
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"fedsim", wheel.name.split("-py")[0] + ".dist-info"}
    assert {"fedsim/clients/app.py", "fedsim/strategies/fedavg.py", "fedsim/configs/quickstart.toml"} <= set(names)
    where = run([python, "-c", "import fedsim, fedsim.clients.app as a; print(fedsim.__file__, a.__file__)"], work)
    assert where.returncode == 0 and str(PROJECT_DIR) not in where.stdout, where
    for absent in ("clients", "strategies", "pytest", "transformers"):  # only fedsim and what it declares
        assert run([python, "-c", f"import {absent}"], work).returncode != 0, absent

    done = run([python, "-m", "fedsim", "run", "quickstart", "--rounds", "1", "--out", "qs", "--no-progress"], work)
    assert done.returncode == 0, done.stderr
    assert (work / "qs" / "rounds.csv").read_text().count("\n") == 2  # header and round 1
    assert (work / "qs" / "model.safetensors").is_file()


@pytest.mark.slow
def test_wheel_init_and_every_way_to_name_a_shipped_experiment(wheel_env) -> None:
    _, python, work = wheel_env
    fedsim = python.parent / "fedsim"
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
