"""The vectorized engine on one process against the same engine on Ray engine workers.

One compute-bound workload, run in this one call by both runtimes, alternately:

  synthetic (FedProx's Synthetic(1,1)), 1,000 clients, 200 a round, MLP [256, 256],
  DP-SGD sigma = 1, C = 1, batch 8, one local epoch

  * in-process (``runtime.name = "inprocess"``), torch at 1 thread;
  * ``runtime.name = "ray"`` with 2 engine workers, each at 1 thread.

and prints, with the machine:

    scale_out workload=NAME workers=2 inprocess_s=... ray_s=... speedup=... inprocess_e2e_s=... ray_e2e_s=...

``inprocess_s`` and ``ray_s`` are the medians of the rounds after the first, summed: the
steady state a long run spends its time in (the first round is where each worker reads its
clients' data; Ray's own start, about 8 s here, is in the ``_e2e_s`` figures, which are whole
runs). ``speedup`` is ``inprocess_s / ray_s``; the target on a 2-core machine is >= 1.6.
Of ``ray_s``, ``ray_workers_s`` is the slowest worker's training each round and
``ray_beyond_s`` the driver's wait beyond it (dispatch, the replies' trip back, an uneven
split), read from the run's log; the rest of ``ray_s`` is the driver's own work (the
aggregation, the central evaluation, the accounting and the files).
With a GPU, each worker takes one (``runtime.worker_gpus = 1``) and a line per worker count
up to the GPUs reports the scaling per GPU.

    python benchmarks/scale_out.py [--quick] [--repeats 2] [--workers 2] [--clients 1000 --per-round 200 --rounds 8]
"""

from __future__ import annotations

import argparse
import csv
import gc
import logging
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe  # noqa: E402

from fedsim.config import load_config  # noqa: E402
from fedsim.logs import setup_logging  # noqa: E402
from fedsim.privacy.accounting import clear_memos  # noqa: E402
from fedsim.run import run_experiment  # noqa: E402

TARGET_SPEEDUP = 1.6  # 2 workers on 2 cores


def workload(rounds: int, clients: int = 1000, per_round: int = 200) -> dict:
    return {"data.dataset": "synthetic", "data.partitioner": "natural-id", "federation.num_clients": clients,
            "federation.clients_per_round": per_round, "federation.rounds": rounds,
            "model.name": "mlp", "model.hidden": [256, 256], "privacy.noise_multiplier": 1.0,
            "privacy.max_grad_norm": 1.0, "client.batch_size": 8, "client.local_epochs": 1, "client.lr": 0.1,
            "runtime.torch_threads": 1, "output.checkpoint_every": 0}


ROUND_LINE = re.compile(r"ray: round (\d+): workers trained [\d.]+-([\d.]+) s, the driver waited ([\d.]+) s")


def ray_split(out: Path) -> tuple[float, float]:
    """From a Ray run's log, over the rounds after the first: (seconds the slowest worker
    trained, seconds the driver waited beyond it: dispatch, the replies' trip, an uneven split)."""
    rounds = [(float(slowest), float(waited)) for number, slowest, waited
              in ROUND_LINE.findall((out / "run.log").read_text()) if int(number) > 1]
    return sum(s for s, _ in rounds), sum(w - s for s, w in rounds)


def run_once(overrides: dict, out: Path) -> tuple[float, float]:
    """(seconds of the rounds after the first, end-to-end seconds) of one run."""
    cfg = load_config(None, {**overrides, "output.dir": str(out), "name": "scale-out"})
    clear_memos()  # both runtimes sample the same clients: no RDP curve computed for the other
    gc.collect()
    start = time.perf_counter()
    run_experiment(cfg, progress=False, overwrite=True)
    e2e = time.perf_counter() - start
    with open(out / "rounds.csv") as fh:
        wall = [float(row["wall_seconds"]) for row in csv.DictReader(fh)]
    return wall[-1] - wall[0], e2e


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 rounds instead of 8 (under 5 minutes on 2 cores)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each runtime, interleaved")
    parser.add_argument("--workers", type=int, default=2, help="Ray engine workers")
    parser.add_argument("--clients", type=int, default=1000, help="clients (a smaller workload, for tests)")
    parser.add_argument("--per-round", type=int, default=200, help="clients a round")
    parser.add_argument("--rounds", type=int, default=0, help="rounds (default 4 with --quick, else 8)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    setup_logging(False)
    logging.getLogger("fedsim").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    base = workload(args.rounds or (4 if args.quick else 8), args.clients, args.per_round)
    name = f"synthetic-{args.clients}x{args.per_round}-mlp256x256"
    gpus = torch.cuda.device_count()
    counts = list(range(1, gpus + 1)) if gpus > 1 else [args.workers]
    print(describe(), f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for workers in counts:
            ray_cfg = {**base, "runtime.name": "ray", "runtime.workers": workers,
                       **({"runtime.worker_gpus": 1.0} if gpus > 1 else {})}
            inproc, ray, splits = [], [], []
            for i in range(args.repeats):
                inproc.append(run_once(base, Path(tmp) / f"inprocess-{i}"))
                ray.append(run_once(ray_cfg, Path(tmp) / f"ray-{i}"))
                splits.append(ray_split(Path(tmp) / f"ray-{i}"))
            a = statistics.median(x for x, _ in inproc)
            b = statistics.median(x for x, _ in ray)
            print(f"scale_out workload={name} workers={workers} inprocess_s={a:.2f} "
                  f"ray_s={b:.2f} speedup={a / b:.2f} inprocess_e2e_s={statistics.median(e for _, e in inproc):.2f} "
                  f"ray_e2e_s={statistics.median(e for _, e in ray):.2f} "
                  f"ray_workers_s={statistics.median(w for w, _ in splits):.3f} "
                  f"ray_beyond_s={statistics.median(x for _, x in splits):.3f}"
                  + (f" target>={TARGET_SPEEDUP}" if gpus <= 1 else ""), flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
