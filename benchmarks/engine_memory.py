"""Peak memory of the vectorized engine with 1,000 clients in ONE round, against the same
process doing everything but training.

Each measurement runs in a fresh subprocess (peak RSS is a process' high-water mark, so two
runs in one process would hide the second): the synthetic data (FedProx's Synthetic(1,1),
natural-id partition, MLP(64), DP-SGD sigma = 1, C = 1, batch 8, one local epoch) and

  setup       the run with 0 clients trained: data, partition, model, discovery of 1,000 nodes
              (federation.rounds = 0 is not a valid run, so this runs one round with 1 client);
  vectorized  1,000 clients in one round under `runtime.engine = "vectorized"`, with the
              default chunking (`runtime.engine_chunk = 0`: from free memory, at most 1 GiB of
              per-sample gradients on a CPU);
  chunk=100   the same with `runtime.engine_chunk = 100`.

It prints one line per case, ``case=... peak_rss_mb=... wall_s=...``, then the machine.
The issue's target: 1,000 clients in one round within 4 GB RSS on the 2-core, 24 GB machine.

    python benchmarks/engine_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe  # noqa: E402

CHILD = r"""
import json, resource, sys, tempfile, time
import torch
torch.set_num_threads(1)
from fedsim.config import load_config
from fedsim.logs import setup_logging
from fedsim.run import run_experiment
setup_logging(False)
overrides = json.loads(sys.argv[1])
with tempfile.TemporaryDirectory() as out:
    cfg = load_config(None, {**overrides, "output.dir": out + "/run", "name": "memory"})
    start = time.perf_counter()
    run_experiment(cfg, progress=False)
    wall = time.perf_counter() - start
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "wall_s": wall}))
"""

BASE = {"data.dataset": "synthetic", "data.partitioner": "natural-id", "federation.num_clients": 1000,
        "federation.rounds": 1, "model.name": "mlp", "model.hidden": [64], "privacy.noise_multiplier": 1.0,
        "privacy.max_grad_norm": 1.0, "client.batch_size": 8, "client.local_epochs": 1, "client.lr": 0.3,
        "runtime.engine": "vectorized"}

CASES = {
    "setup": {"federation.clients_per_round": 1},
    "vectorized": {"federation.clients_per_round": 1000},
    "chunk=100": {"federation.clients_per_round": 1000, "runtime.engine_chunk": 100},
}


def main() -> None:
    for name, extra in CASES.items():
        res = subprocess.run([sys.executable, "-c", CHILD, json.dumps({**BASE, **extra})],
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            print(f"case={name} failed: {res.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        out = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"case={name} peak_rss_mb={out['peak_rss_mb']:.0f} wall_s={out['wall_s']:.2f}", flush=True)
    print(f"machine: {describe()}")


if __name__ == "__main__":
    main()
