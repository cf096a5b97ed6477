"""fedsim against pfl-research (and Flower's own simulation engine), on one workload, in one run.

The workload is the digits shape of `engine_speed.py`'s workload (ii): digits, MLP(64), 200
clients, 100 a round, batch 8, one local epoch. Two of them:

  (a) digits-fedavg      no DP, lr 0.5, 30 rounds; FedAvg weighted by the clients' sizes
  (b) digits-central-dp  the same with central (user-level) DP: each client's update clipped
                         to C = 1, the sum noised with N(0, sigma^2 C^2), sigma = 1, divided by
                         the cohort (DP-FedAvg, McMahan et al. 2018), fixed clipping

pfl-research trains on fedsim's own partition (the client index lists of
`fedsim.partition.partition`), fedsim's schedule (each round's clients,
`fedsim.schedule.participation_schedule`) and fedsim's initial weights, and this script checks
that both did: pfl's users of every round are the schedule's, pfl's own counts of users and
data points per round are the schedule's and the partition's, and fedsim's rounds.csv and
clients.csv agree with them. Both evaluate centrally on fedsim's test split every round and
the final accuracies are printed side by side, so that the times compare the same work.

Both workloads use ``federation.sampling = "fixed"`` (K of N without replacement): pfl's cohort
has a fixed size, and its average divides the (clipped, noised) sum by the users' total weight,
the cohort; fedsim's central DP divides by the expected cohort, which under fixed sampling is
the same number. (fedsim's default under central DP is Poisson sampling, which pfl's cohorts
do not do.)

pfl-research has no per-sample DP-SGD inside a user (its local training is plain SGD; its
privacy mechanisms act on a user's whole update), so fedsim's DP-SGD workloads have no pfl
counterpart and are left out.

Every repetition runs fedsim, then pfl, then (workload (a) only) fedsim on Flower's
simulation engine (``runtime.name = "flower"``), after one untimed one-round run of each:

    peers workload=NAME fedsim_loop_s=... pfl_loop_s=... loop_ratio=... fedsim_e2e_s=... pfl_e2e_s=...
          e2e_ratio=... [flower_e2e_s=...]   (one line)
    floor workload=NAME message_floor_ms=... pfl_round_ms=... fedsim_round_ms=... engine_round_ms=...
          best_loop_ratio=... best_loop_ratio_trained=...   (one line; see `floor_line`)
    accuracy workload=NAME fedsim=... pfl=... [flower=...]
    followed workload=NAME rounds=... users=... datapoints=... fedsim=yes pfl=yes

``*_loop_s`` is the median time of the training rounds alone: for fedsim the server's
`_train_round` (sampling, messages, local training, aggregation, central DP), for pfl the time
from the start of a central iteration to its first callback (sampling, local training,
postprocessors, aggregation, noise, the server's update), both without central evaluation.
``*_e2e_s`` is a whole run: fedsim's `run_experiment` (set-up, rounds, evaluation, files), pfl's
from reading fedsim's arrays to the end of `FederatedAveraging.run` (datasets, model, rounds,
evaluation). The ratios are pfl over fedsim: the median of the ratios of the runs timed side by
side. Targets on the 2-core CPU: loop_ratio >= 10 and e2e_ratio >= 3.

pfl 0.6.0 pins dp-accounting < 0.6, which fedsim's environment cannot hold, so pfl runs in an
interpreter of its own (``--pfl-python``, or the environment variable FEDSIM_PFL_PYTHON, or
``.pflvenv`` in the checkout), kept running for the whole benchmark (`peers_pfl.py`). Make it:

    make peers-venv     # python3.11 -m venv .pflvenv; pip install torch==2.13.0; pip install pfl==0.6.0 numpy

    python benchmarks/peers.py [--quick] [--repeats 3] [--pfl-python PATH] [--threads 1] [--skip-flower]

Both sides run torch with the same thread count, 1 by default (see `engine_speed.py`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_speed as es  # noqa: E402
from _machine import describe  # noqa: E402

from fedsim.config import Config, load_config  # noqa: E402
from fedsim.datasets import load_dataset  # noqa: E402
from fedsim.logs import ConsoleHandler, setup_logging  # noqa: E402
from fedsim.models import build_model  # noqa: E402
from fedsim.partition import partition  # noqa: E402
from fedsim.schedule import client_sampling, participation_schedule  # noqa: E402

HERE = Path(__file__).resolve().parent
PFL_ENV = "FEDSIM_PFL_PYTHON"
DEFAULT_PFL_PYTHON = HERE.parent / ".pflvenv" / "bin" / "python"
MAKE_IT = "make peers-venv (python3.11 -m venv .pflvenv && .pflvenv/bin/pip install torch==2.13.0 && " \
          ".pflvenv/bin/pip install pfl==0.6.0 numpy)"


def workloads(rounds: int = 30) -> list[tuple[str, dict]]:
    """(a) and (b): engine_speed's digits workload (ii) without DP-SGD, lr 0.5, fixed sampling."""
    plain = {**es.LOCAL, **es.DIGITS_200X100, "client.lr": 0.5, "federation.rounds": rounds,
             "federation.sampling": "fixed"}
    central = {**plain, "privacy.user_noise_multiplier": 1.0, "privacy.user_clip": 1.0}
    return [("digits-fedavg", plain), ("digits-central-dp", central)]


def pfl_inputs(cfg: Config) -> dict[str, np.ndarray]:
    """What pfl needs to train exactly what fedsim trains, as arrays: fedsim's training and test
    split, its partition (user i holds ``user_rows[user_offsets[i]:user_offsets[i + 1]]``), its
    schedule (row r - 1: the partition ids of round r), its initial weights (``param_<i>``, in
    the model's order) and the local and central-DP settings."""
    if cfg.data.partitioner == "feature-skew":  # its shifts live in fedsim.partition.client_data
        raise ValueError("peers: data.partitioner 'feature-skew' changes the clients' features; not exported")
    fed, p = cfg.federation, cfg.privacy
    data = load_dataset(cfg.data, fed.num_clients, cfg.seed)
    indices = partition(cfg, data).indices
    schedule = participation_schedule(cfg.seed, fed.rounds, fed.num_clients, fed.clients_per_round,
                                      client_sampling(cfg))
    if len({len(c) for c in schedule}) != 1:
        raise ValueError("peers: pfl's cohorts have one size; use federation.sampling = 'fixed'")
    model = build_model(cfg.model, data, cfg.seed)
    params = {f"param_{i}": t.detach().numpy().copy() for i, t in enumerate(model.state_dict().values())}
    return {"x_train": data.x_train, "y_train": data.y_train, "x_test": data.x_test, "y_test": data.y_test,
            "user_rows": np.concatenate(indices), "user_offsets": np.cumsum([0] + [len(i) for i in indices]),
            "schedule": np.asarray(schedule, dtype=np.int64), **params,
            "seed": np.asarray(cfg.seed), "lr": np.asarray(cfg.client.lr),
            "batch_size": np.asarray(cfg.client.batch_size), "local_epochs": np.asarray(cfg.client.local_epochs),
            "user_noise_multiplier": np.asarray(p.user_noise_multiplier), "user_clip": np.asarray(p.user_clip)}


def followed(inputs: dict[str, np.ndarray], pfl: dict, fedsim_dir: Path) -> list[str]:
    """What in pfl's result (`peers_pfl.run`) or fedsim's run directory departs from the
    exported schedule and partition; [] when both trained exactly those users on those sizes."""
    schedule = inputs["schedule"].tolist()
    offsets = inputs["user_offsets"]
    sizes = np.diff(offsets)
    problems = []
    for r, (want, got) in enumerate(zip(schedule, pfl["users"]), start=1):
        if sorted(want) != got:
            problems.append(f"pfl round {r}: trained users {got[:5]}..., fedsim's schedule {sorted(want)[:5]}...")
    if len(pfl["users"]) != len(schedule):
        problems.append(f"pfl trained {len(pfl['users'])} rounds, the schedule has {len(schedule)}")
    for r, (want, (users, points)) in enumerate(zip(schedule, pfl["counts"]), start=1):
        if (users, points) != (len(want), int(sizes[want].sum())):
            problems.append(f"pfl round {r}: {users} users and {points} data points by pfl's count, "
                            f"{len(want)} and {int(sizes[want].sum())} by the schedule")
    with open(fedsim_dir / "rounds.csv") as fh:
        trained = [int(row["clients_trained"]) for row in csv.DictReader(fh)]
    if trained != [len(c) for c in schedule]:
        problems.append(f"fedsim's rounds.csv: clients trained {trained}, the schedule {[len(c) for c in schedule]}")
    counts = np.bincount(np.concatenate([np.asarray(c, dtype=np.int64) for c in schedule]), minlength=len(sizes))
    with open(fedsim_dir / "clients.csv") as fh:
        for row in csv.DictReader(fh):
            pid = int(row["partition_id"])
            if (int(row["participations"]), int(row["num_examples"])) != (counts[pid], sizes[pid]):
                problems.append(f"fedsim's clients.csv: client {pid} trained {row['participations']} times on "
                                f"{row['num_examples']} examples; the schedule says {counts[pid]} on {sizes[pid]}")
    return problems


def pfl_python(given: str) -> str:
    """The interpreter that holds pfl-research, or one line on stderr and exit 2."""
    path = given or os.environ.get(PFL_ENV, "") or (str(DEFAULT_PFL_PYTHON) if DEFAULT_PFL_PYTHON.exists() else "")
    if not path:
        _refuse(f"no interpreter with pfl-research: pass --pfl-python PATH or set {PFL_ENV}; make one with {MAKE_IT}")
    if not Path(path).exists():
        _refuse(f"--pfl-python: {path} does not exist; make one with {MAKE_IT}")
    return path


def _refuse(text: str) -> None:
    print(f"peers: {text}", file=sys.stderr)
    raise SystemExit(2)


class PflWorker:
    """`peers_pfl.py` running in pfl's interpreter, one run per request."""

    def __init__(self, python: str, threads: int, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen([python, str(HERE / "peers_pfl.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
                                     env={**os.environ, "PEERS_TORCH_THREADS": str(threads)})
        ready = self._answer("READY ")
        if ready is None:
            _refuse(f"--pfl-python: {python} cannot run pfl-research ({self._last_error()}); make one with {MAKE_IT}")
        self.version = ready["pfl_version"]

    def _answer(self, prefix: str) -> dict | None:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return json.loads(line[len(prefix):])
        return None

    def _last_error(self) -> str:
        lines = [line.strip() for line in self.log.read_text().splitlines() if line.strip()]
        return lines[-1] if lines else f"exit code {self.proc.wait()}"

    def run(self, inputs: Path, rounds: int) -> dict:
        self.proc.stdin.write(json.dumps({"inputs": str(inputs), "rounds": rounds}) + "\n")
        self.proc.stdin.flush()
        result = self._answer("RESULT ")
        if result is None:
            raise SystemExit(f"peers: pfl's run failed: {self._last_error()} (full log: {self.log})")
        return result

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def fedsim_run(overrides: dict, out: Path) -> tuple[float, float, float, float]:
    """One fedsim run: (end-to-end s, training rounds s, final accuracy, in-engine training s)."""
    es.LOOP_SECONDS[0] = 0.0
    e2e, engine = es.run_once(overrides, "vectorized", out)
    accuracy = json.loads((out / "summary.json").read_text())["final_metric"]
    return e2e, es.LOOP_SECONDS[0], accuracy, engine


def floor_line(name: str, rounds: int, floors: list[float], fed: list[tuple], pfl: list[tuple]) -> str:
    """The ``floor`` line: what the loop target asks against what the message contract allows.

    ``message_floor_ms`` is one round's Flower messages and FedAvg's aggregation alone
    (`engine_speed.message_floor`, 100 clients of this model), measured beside each pair of
    runs. ``best_loop_ratio`` is pfl's loop over that floor times the rounds: the ratio a
    fedsim loop that spent nothing on training, sampling, accounting or state would reach.
    ``best_loop_ratio_trained`` adds the engine's own measured training time. A value under
    the target says no engine reaches it while every client gets an ordinary Flower reply."""
    med = statistics.median
    best = med(p[1] / (rounds * f) for f, p in zip(floors, pfl))
    trained = med(p[1] / (rounds * f + r[3]) for f, p, r in zip(floors, pfl, fed))
    return (f"floor workload={name} message_floor_ms={med(floors) * 1e3:.2f} "
            f"pfl_round_ms={med(p[1] for p in pfl) / rounds * 1e3:.2f} "
            f"fedsim_round_ms={med(r[1] for r in fed) / rounds * 1e3:.2f} "
            f"engine_round_ms={med(r[3] for r in fed) / rounds * 1e3:.2f} "
            f"best_loop_ratio={best:.1f} best_loop_ratio_trained={trained:.1f}")


def _quiet() -> None:
    """The runs' own INFO lines and warnings go to each run's run.log, not between the results."""
    setup_logging(False)
    for handler in logging.getLogger("fedsim").handlers:
        if isinstance(handler, ConsoleHandler):
            handler.setLevel(logging.ERROR)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="example: python benchmarks/peers.py --quick --pfl-python .pflvenv/bin/python")
    parser.add_argument("--quick", action="store_true", help="3 repetitions of each (under 10 min)")
    parser.add_argument("--repeats", type=int, default=0, help="timed runs of fedsim and pfl (default 5, quick 3)")
    parser.add_argument("--flower-repeats", type=int, default=-1,
                        help="timed runs on Flower's engine, workload (a) (default 3)")
    parser.add_argument("--skip-flower", action="store_true", help="leave out Flower's simulation engine")
    parser.add_argument("--rounds", type=int, default=30, help="rounds of each workload (default 30)")
    parser.add_argument("--pfl-python", default="", help=f"pfl-research's interpreter (default: ${PFL_ENV}, "
                        "else .pflvenv/bin/python)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides (default 1)")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)
    flower_repeats = 0 if args.skip_flower else (args.flower_repeats if args.flower_repeats >= 0
                                                 else 3)
    python = pfl_python(args.pfl_python)
    torch.set_num_threads(args.threads)
    _quiet()
    es._timed_loop()
    es._timed_engine()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        worker = PflWorker(python, args.threads, tmp / "pfl.log")
        for name, overrides in workloads(args.rounds):
            cfg = load_config(None, {**overrides, "name": "bench"})
            inputs = pfl_inputs(cfg)
            npz = tmp / f"{name}.npz"
            np.savez(npz, **inputs)
            flower = flower_repeats if name == "digits-fedavg" else 0
            fedsim_run({**overrides, "federation.rounds": 1}, tmp / f"{name}-warm")  # warm-ups, untimed
            worker.run(npz, 1)
            if flower:
                fedsim_run({**overrides, "federation.rounds": 1, "runtime.name": "flower"}, tmp / f"{name}-warm-fl")
            runs: dict[str, list[tuple[float, ...]]] = {"fedsim": [], "pfl": [], "flower": []}
            floors: list[float] = []
            shapes = {}
            for r in range(repeats):
                runs["fedsim"].append(fedsim_run(overrides, tmp / f"{name}-{r}"))
                result = worker.run(npz, args.rounds)
                runs["pfl"].append((result["e2e_s"], result["loop_s"], result["accuracy"]))
                shapes = shapes or es.model_shapes(tmp / f"{name}-{r}")
                floors.append(es.message_floor(overrides["federation.clients_per_round"], shapes))
                problems = followed(inputs, result, tmp / f"{name}-{r}")
                if problems:
                    raise SystemExit(f"peers: {name} did not train the same work: " + "; ".join(problems[:5]))
                if r < flower:
                    runs["flower"].append(fedsim_run({**overrides, "runtime.name": "flower"}, tmp / f"{name}-fl-{r}"))
            print(peers_line(name, runs), flush=True)
            print(floor_line(name, args.rounds, floors, runs["fedsim"], runs["pfl"]), flush=True)
            accuracy = " ".join(f"{k}={statistics.median(run[2] for run in v):.4f}" for k, v in runs.items() if v)
            print(f"accuracy workload={name} {accuracy}", flush=True)
            schedule = inputs["schedule"]
            points = int(np.diff(inputs["user_offsets"])[schedule].sum())
            print(f"followed workload={name} rounds={len(schedule)} users={schedule.size} datapoints={points} "
                  f"fedsim=yes pfl=yes", flush=True)
        worker.close()
    print("note: pfl-research has no per-sample DP-SGD inside a user; fedsim's DP-SGD workloads are left out")
    print(f"machine: {describe()}; pfl-research {worker.version} in {python}")


def peers_line(name: str, runs: dict[str, list[tuple[float, ...]]]) -> str:
    """The ``peers`` line: medians, and pfl-over-fedsim ratios as medians of side-by-side pairs."""
    fed, pfl = runs["fedsim"], runs["pfl"]
    med = statistics.median
    line = (f"peers workload={name} fedsim_loop_s={med(f[1] for f in fed):.3f} pfl_loop_s={med(p[1] for p in pfl):.3f} "
            f"loop_ratio={med(p[1] / f[1] for f, p in zip(fed, pfl)):.1f} "
            f"fedsim_e2e_s={med(f[0] for f in fed):.3f} pfl_e2e_s={med(p[0] for p in pfl):.3f} "
            f"e2e_ratio={med(p[0] / f[0] for f, p in zip(fed, pfl)):.1f}")
    if runs["flower"]:
        line += f" flower_e2e_s={med(f[0] for f in runs['flower']):.3f}"
    return line


if __name__ == "__main__":
    main()
