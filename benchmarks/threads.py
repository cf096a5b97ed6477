"""torch's intra-op thread count against fedsim's run time, for each engine: what
``runtime.torch_threads = 0`` (auto) is chosen from (docs/engines.md, "Threads").

Runs each workload at 1, 2 and all cores' threads (the distinct ones), interleaved, in this
one process, and prints one line per workload, engine and thread count:

    threads workload=NAME engine=E threads=N run_s=... over_1_thread=...

``run_s`` is the median of end-to-end seconds of whole runs (``runtime.torch_threads = N``),
after one untimed warm-up run; ``over_1_thread`` is that over the 1-thread median (above 1:
slower). Also checks that the runs' rounds.csv agree across thread counts and prints
``identical=yes|no`` per workload and engine.

    python benchmarks/threads.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import gc
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe  # noqa: E402

from fedsim.config import load_config  # noqa: E402
from fedsim.logs import setup_logging  # noqa: E402
from fedsim.privacy.accounting import clear_memos  # noqa: E402
from fedsim.run import run_experiment  # noqa: E402
from fedsim.threads import available_cores  # noqa: E402

DP = {"privacy.noise_multiplier": 1.0, "privacy.max_grad_norm": 1.0, "client.batch_size": 8,
      "client.local_epochs": 1, "client.lr": 0.3, "model.name": "mlp", "output.checkpoint_every": 0}


def workloads(quick: bool) -> list[tuple[str, dict, tuple[str, ...]]]:
    return [
        ("digits-mlp64-100x10", {**DP, "model.hidden": [64], "federation.num_clients": 100,
                                 "federation.clients_per_round": 10, "federation.rounds": 3 if quick else 6},
         ("vectorized", "opacus")),
        ("synthetic-mlp256x256-1000x100", {**DP, "model.hidden": [256, 256], "data.dataset": "synthetic",
                                           "data.partitioner": "natural-id", "federation.num_clients": 1000,
                                           "federation.clients_per_round": 100,
                                           "federation.rounds": 2 if quick else 4},
         ("vectorized",)),  # Opacus: minutes a run at 2 threads here
    ]


def run_once(overrides: dict, out: Path) -> tuple[float, list[dict]]:
    cfg = load_config(None, {**overrides, "output.dir": str(out), "name": "threads"})
    clear_memos()
    gc.collect()
    start = time.perf_counter()
    run_experiment(cfg, progress=False, overwrite=True)
    seconds = time.perf_counter() - start
    with open(out / "rounds.csv") as fh:
        rows = [{k: v for k, v in row.items() if k != "wall_seconds"} for row in csv.DictReader(fh)]
    return seconds, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    setup_logging(False)
    logging.getLogger("fedsim").setLevel(logging.ERROR)
    counts = sorted({1, 2, available_cores()})
    print(describe(), f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides, engines in workloads(args.quick):
            for engine in engines:
                times: dict[int, list[float]] = {n: [] for n in counts}
                results: dict[int, list[dict]] = {}
                # untimed: the first run of a workload reads and partitions its data
                run_once({**overrides, "runtime.engine": engine}, Path(tmp) / "warm-up")
                for i in range(args.repeats):
                    for n in counts:
                        s, rows = run_once({**overrides, "runtime.engine": engine, "runtime.torch_threads": n},
                                           Path(tmp) / f"{name}-{engine}-{n}")
                        times[n].append(s)
                        results[n] = rows
                one = statistics.median(times[1])
                for n in counts:
                    t = statistics.median(times[n])
                    print(f"threads workload={name} engine={engine} threads={n} run_s={t:.2f} "
                          f"over_1_thread={t / one:.2f}", flush=True)
                same = all(results[n] == results[1] for n in counts)
                print(f"threads workload={name} engine={engine} identical={'yes' if same else 'no'}", flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
