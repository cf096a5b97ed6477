"""How much does Flower plumbing cost on top of the training itself?

One workload, three ways, in one process run: digits, MLP(64), DP-SGD sigma = 1,
100 clients, 10 per round, 20 rounds (override with --rounds/--clients).
  (a) a bare loop: the same local trainer, the same sampled partitions, FedAvg in
      numpy and central evaluation, with no Flower at all: the compute limit;
  (b) fedsim's in-process runtime with the Opacus engine (the bare loop's trainer);
  (c) Flower's Ray simulation runtime through fedsim.
Prints b/a (target <= 1.10) and c/b.

    python benchmarks/runtime_overhead.py [--rounds 20] [--skip-ray]
"""

from __future__ import annotations

import argparse
import copy
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe  # noqa: E402

from fedsim.clients.app import settings_for  # noqa: E402
from fedsim.clients.trainer import evaluate, train_local  # noqa: E402
from fedsim.config import load_config  # noqa: E402
from fedsim.datasets import load_dataset  # noqa: E402
from fedsim.experiment import derive_seed  # noqa: E402
from fedsim.logs import setup_logging  # noqa: E402
from fedsim.models import build_model  # noqa: E402
from fedsim.partition import client_data  # noqa: E402
from fedsim.privacy.accounting import epsilon  # noqa: E402
from fedsim.run import run_experiment  # noqa: E402


def workload(rounds: int, clients: int, per_round: int):
    return load_config(None, {"name": "bench", "runtime.engine": "opacus", "data.dataset": "digits",
                              "model.name": "mlp",
                              "model.hidden": [64], "federation.num_clients": clients,
                              "federation.clients_per_round": per_round, "federation.rounds": rounds,
                              "client.batch_size": 8, "client.lr": 0.5,
                              "privacy.noise_multiplier": 1.0, "privacy.max_grad_norm": 1.0})


def bare_loop(cfg) -> float:
    """The compute limit: what fedsim does per round, minus Flower."""
    start = time.perf_counter()
    data = load_dataset(cfg.data, cfg.federation.num_clients, cfg.seed)
    model = build_model(cfg.model, data, cfg.seed)
    settings = settings_for(cfg, data.task)
    global_state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    histories: dict[int, list] = {}
    nodes = list(range(cfg.federation.num_clients))
    for rnd in range(1, cfg.federation.rounds + 1):
        random.seed(derive_seed(cfg.seed, rnd, "sample"))
        chosen = random.sample(nodes, cfg.federation.clients_per_round)
        updates, weights = [], []
        for pid in chosen:
            local = build_model(cfg.model, data, cfg.seed)
            local.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in global_state.items()})
            x, y = client_data(cfg, pid)
            res = train_local(local, x, y, settings, histories.get(pid, []),
                              seed=derive_seed(cfg.seed, rnd, pid, "train"))
            histories[pid] = res.history
            epsilon(res.history, cfg.privacy.delta)
            updates.append({k: v.detach().cpu().numpy() for k, v in local.state_dict().items()})
            weights.append(res.num_examples)
        w = np.asarray(weights, dtype=float) / sum(weights)
        global_state = {k: sum(wi * u[k] for wi, u in zip(w, updates)) for k in global_state}
        model.load_state_dict({k: torch.from_numpy(np.asarray(v, dtype=np.float32))
                               for k, v in global_state.items()})
        evaluate(model, data.x_test, data.y_test, data.task)
    return time.perf_counter() - start


def timed_run(cfg, runtime: str, out: Path) -> float:
    """One whole run in a fresh directory (a finished run's directory is refused)."""
    cfg = copy.deepcopy(cfg)
    cfg.runtime.name = runtime
    out.mkdir(parents=True, exist_ok=True)
    cfg.output.dir = tempfile.mkdtemp(prefix=f"{runtime}-", dir=out)
    start = time.perf_counter()
    run_experiment(cfg, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="best of N for (a) and (b)")
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    setup_logging(False)  # the CLI's quiet console: a run's INFO lines go to its run.log only
    logging.getLogger("flwr").setLevel(logging.ERROR)
    cfg = workload(args.rounds, args.clients, args.per_round)
    print(f"machine: {describe()}")
    print(f"workload: digits, MLP(64), DP-SGD sigma=1, {args.clients} clients, {args.per_round}/round, "
          f"{args.rounds} rounds")
    bare_loop(workload(1, args.clients, args.per_round))  # warm caches and imports for both
    with tempfile.TemporaryDirectory() as tmp:
        timed_run(workload(1, args.clients, args.per_round), "inprocess", Path(tmp) / "warm")
        a_times, b_times = [], []
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            a_times.append(bare_loop(cfg))
            b_times.append(timed_run(cfg, "inprocess", Path(tmp)))
        a, b = min(a_times), min(b_times)
        print(f"(a) bare loop          {a:8.2f} s   (runs: {', '.join(f'{t:.2f}' for t in a_times)})")
        print(f"(b) fedsim inprocess   {b:8.2f} s   (runs: {', '.join(f'{t:.2f}' for t in b_times)})")
        print(f"b/a = {b / a:.3f}   (target <= 1.10)")
        if not args.skip_ray:
            c = timed_run(cfg, "flower", Path(tmp))
            print(f"(c) fedsim flower      {c:8.2f} s")
            print(f"c/b = {c / b:.2f}")


if __name__ == "__main__":
    main()
