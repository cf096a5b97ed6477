"""Start-up: from process start to the first round's training, against ``import torch``.

Times, in fresh processes, interleaved (one of each per repeat, so load on a shared machine
falls on all of them alike):

* ``import_torch_s``: ``python -c "import torch"``, from just before the process is started
  to the moment the import has returned (the child prints ``time.monotonic()``, a clock
  shared by every process on Linux);
* ``fedsim_first_round_s``: ``python -m fedsim run CONFIG``, from just before the process is
  started to the moment its first round's first engine call is about to train, which the run
  reports with ``FEDSIM_STARTUP_PROBE=1`` (`fedsim.startup`) and exits. Everything before
  the first gradient step counts: interpreter, imports, config, data, partition, model,
  strategy, discovery, the clients' preparation of round 1. The disk cache is warm (one
  untimed run fills it first), as for every run of the same data after the first;
* ``uncached_s``: the same with ``FEDSIM_CACHE_DIR=off``, as a first run on new data;
* ``help_s``: ``python -m fedsim --help``, start to exit.

Prints one line, medians over the repeats, then the machine and its load:

    startup import_torch_s=... fedsim_first_round_s=... ratio=... help_s=... uncached_s=...
        uncached_ratio=... cpu_ratio=... uncached_cpu_ratio=...

``ratio`` = fedsim_first_round_s / import_torch_s (target <= 1.6; help_s target <= 0.4).
The ``cpu_`` ratios are of the children's CPU seconds at the same two moments
(`time.process_time`): on a loaded machine, where wall times wait for a core, they move less.
The runs go to a temporary directory, with a temporary cache directory of their own.

    python benchmarks/startup.py [--repeats 7] [--config configs/quickstart.toml]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
PROBE = re.compile(r"fedsim-startup-probe monotonic=([0-9.]+) cpu=([0-9.]+)")


def child_env(**extra: str) -> dict[str, str]:
    """The children import this checkout's fedsim, whatever is installed, and keep its compiled
    bytecode (__pycache__, git-ignored) as an installed fedsim does: under
    PYTHONDONTWRITEBYTECODE=1 every run would compile fedsim's 60-odd modules again, a cost of
    the environment, not of fedsim's start-up."""
    env = dict(os.environ, **extra)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return env


def time_torch() -> tuple[float, float]:
    """(wall seconds from before the start to after the import, the child's CPU seconds by then)."""
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", "import torch, time; print(time.monotonic(), time.process_time())"],
                          capture_output=True, text=True, check=True, env=child_env())
    now, cpu = map(float, done.stdout.split())
    return now - start, cpu


def time_first_round(config: str, out: Path, cache: str) -> tuple[float, float]:
    """(wall seconds from before the start to the probe, the child's CPU seconds by then)."""
    env = child_env(FEDSIM_STARTUP_PROBE="1", FEDSIM_CACHE_DIR=cache)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "fedsim", "run", config, "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, env=env, cwd=REPO)
    found = PROBE.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"fedsim run did not reach its first round (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return float(found.group(1)) - start, float(found.group(2))


def time_help() -> float:
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "fedsim", "--help"], capture_output=True, check=True, env=child_env())
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--config", default="configs/quickstart.toml")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedsim-startup-") as tmp:
        cache, runs = str(Path(tmp) / "cache"), Path(tmp) / "runs"
        time_first_round(args.config, runs / "warm-up", cache)  # fills the cache (and the page cache)
        time_torch()
        times: dict[str, list[tuple[float, float]]] = {"torch": [], "first": [], "uncached": []}
        help_s = []
        for i in range(args.repeats):
            times["torch"].append(time_torch())
            times["first"].append(time_first_round(args.config, runs / f"cached-{i}", cache))
            times["uncached"].append(time_first_round(args.config, runs / f"uncached-{i}", "off"))
            help_s.append(time_help())
    wall = {name: statistics.median(t[0] for t in values) for name, values in times.items()}
    cpu = {name: statistics.median(t[1] for t in values) for name, values in times.items()}
    print(f"startup import_torch_s={wall['torch']:.3f} fedsim_first_round_s={wall['first']:.3f} "
          f"ratio={wall['first'] / wall['torch']:.2f} help_s={statistics.median(help_s):.3f} "
          f"uncached_s={wall['uncached']:.3f} uncached_ratio={wall['uncached'] / wall['torch']:.2f} "
          f"cpu_ratio={cpu['first'] / cpu['torch']:.2f} uncached_cpu_ratio={cpu['uncached'] / cpu['torch']:.2f}")
    from _machine import describe

    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {describe()}; load average {load}; {args.repeats} repeats")


if __name__ == "__main__":
    main()
