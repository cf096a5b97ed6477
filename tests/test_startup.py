"""Start-up: what the command line imports before it needs it, the start-up probe, and a
second run of the same data starting from the disk cache (`fedsim.caches.on_disk`).

No timings are asserted (benchmarks/startup.py measures them); these check the behaviour the
timings come from: which modules a process has imported, and what the probe reports.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

HEAVY = ("torch", "flwr", "ray", "pandas", "matplotlib", "opacus", "scipy", "sklearn", "datasets", "flwr_datasets")


def imported_after(code: str) -> set[str]:
    """The top-level packages among `HEAVY` that a fresh interpreter has imported after `code`."""
    probe = code + "\nimport sys\nprint(sorted({m.split('.')[0] for m in sys.modules} & set(%r)))" % (HEAVY,)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(eval(done.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["cache", "--help"]], ids=" ".join)
def test_help_imports_no_heavy_library(argv):
    code = ("import contextlib, io\nfrom fedsim.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            f"    try:\n        main({argv!r})\n    except SystemExit as exc:\n        assert exc.code == 0\n"
            "assert 'usage: fedsim' in out.getvalue()")
    assert imported_after(code) == set()


def test_the_probe_fires_before_the_first_round_trains_and_ends_the_process(tmp_path):
    out = tmp_path / "run"
    env_code = ("import os\nos.environ['FEDSIM_STARTUP_PROBE'] = '1'\nfrom fedsim.cli import main\n"
                f"main(['run', '--dataset', 'digits', '--num-clients', '4', '--clients-per-round', '2', "
                f"'--rounds', '3', '--no-progress', '--out', {str(out)!r}])\n"
                "raise SystemExit('the run went on past the probe')")
    before = time.monotonic()
    done = subprocess.run([sys.executable, "-c", env_code], capture_output=True, text=True, timeout=300)
    after = time.monotonic()
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.findall(r"fedsim-startup-probe monotonic=([0-9.]+)", done.stderr)
    assert len(found) == 1 and before < float(found[0]) < after
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "running" and not summary.get("rounds_completed")  # abandoned before round 1 ended


@pytest.mark.slow  # two processes, the first importing flwr-datasets: about 5 s on 2 cores
def test_a_second_process_on_the_same_data_imports_neither_flwr_datasets_nor_pandas():
    """The partition and the dataset come from the disk cache (the conftest's own directory,
    inherited), so the libraries that build them are not imported at all."""
    code = ("from fedsim.config import load_config\nfrom fedsim.partition import partition\n"
            "cfg = load_config(None, {'data.partitioner': 'dirichlet', 'data.alpha': 0.5, "
            "'federation.num_clients': 20, 'federation.clients_per_round': 10})\n"
            "assert len(partition(cfg).indices) == 20")
    assert {"flwr_datasets", "datasets", "pandas"} <= imported_after(code)  # the first builds them
    assert imported_after(code) & {"flwr_datasets", "datasets", "pandas", "pyarrow", "scipy"} == set()
