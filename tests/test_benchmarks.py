"""The benchmark scripts still run, and print what the docs quote, in the issue's format.

Timings are never asserted (they belong to benchmarks/); these run each script on its
smallest workload and check that it finishes and that its lines have the promised shape.
"""

from __future__ import annotations

import re
import subprocess

import pytest
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NUMBER = r"[0-9]+(?:\.[0-9]+)?"


def run_script(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_engine_speed_prints_the_issue_line_the_split_line_and_the_floor_line():
    out = run_script("benchmarks/engine_speed.py", "--quick", "--repeats", "1", "--only", "digits-mlp-100x10",
                     "--split", "--floor")
    lines = out.splitlines()
    assert re.fullmatch(
        rf"workload=digits-mlp-100x10 clients=100 per_round=10 opacus_s={NUMBER} vectorized_s={NUMBER} "
        rf"speedup={NUMBER} e2e_over_engine={NUMBER} peak_rss_mb={NUMBER}", lines[0]), lines[0]
    assert re.fullmatch(
        rf"split workload=digits-mlp-100x10 opacus_engine_s={NUMBER} vectorized_engine_s={NUMBER} "
        rf"engine_speedup={NUMBER} opacus_rest_s=-?{NUMBER} vectorized_rest_s=-?{NUMBER}", lines[1]), lines[1]
    floor = re.fullmatch(
        rf"floor workload=digits-mlp-100x10 message_floor_ms=({NUMBER}) targets_leave_ms={NUMBER} "
        rf"longest_client_s=({NUMBER}) best_speedup={NUMBER} best_e2e_over_engine=({NUMBER}) "
        rf"critical_speedup={NUMBER}", lines[2])
    assert floor, lines[2]
    # a round's messages take time, the longest client trains, and the floor only adds to training
    assert float(floor[1]) > 0 and float(floor[2]) > 0 and float(floor[3]) > 1
    assert lines[3].startswith("machine: ") and len(lines) == 4


def test_runtime_overhead_runs_into_fresh_run_directories():
    """Its repeated runs used to reuse one directory, which fedsim refuses once a run there finished."""
    out = run_script("benchmarks/runtime_overhead.py", "--rounds", "2", "--clients", "6", "--per-round", "2",
                     "--repeats", "2", "--skip-ray")
    assert re.search(rf"^b/a = {NUMBER}", out, re.M), out


def test_engine_speed_prints_the_central_dp_line():
    out = run_script("benchmarks/engine_speed.py", "--quick", "--repeats", "1", "--only", "central", "--central-dp")
    lines = out.splitlines()
    line = re.fullmatch(rf"central_dp workload=digits-mlp-200x100 loop_plain_s=({NUMBER}) loop_central_s=({NUMBER}) "
                        rf"ratio={NUMBER}", lines[0])
    assert line, lines[0]
    assert float(line[1]) > 0 and float(line[2]) > 0
    assert lines[1].startswith("machine: ") and len(lines) == 2


@pytest.mark.slow
def test_scale_out_prints_the_issue_line_and_the_machine():
    out = run_script("benchmarks/scale_out.py", "--repeats", "1", "--clients", "20", "--per-round", "6",
                     "--rounds", "2")
    lines = out.splitlines()
    assert lines[0].startswith("AMD") or "cores" in lines[0]
    line = re.fullmatch(
        rf"scale_out workload=synthetic-20x6-mlp256x256 workers=2 inprocess_s={NUMBER} ray_s=({NUMBER}) "
        rf"speedup={NUMBER} inprocess_e2e_s={NUMBER} ray_e2e_s={NUMBER} ray_workers_s=({NUMBER}) "
        rf"ray_beyond_s={NUMBER}( target>=1.6)?", lines[1])
    assert line, lines[1]
    # round 2's log line was read: its slowest worker trained for part of the round's time
    assert 0 < float(line[2]) <= float(line[1]) + 0.005
