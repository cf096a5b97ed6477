"""The vectorized engine against Opacus, end to end through fedsim's in-process runtime.

Each workload runs `fedsim.run.run_experiment` with ``runtime.engine = "opacus"`` and
``"vectorized"`` in turn (interleaved, after one warm-up round of each), in this one
process, and prints one line per workload:

    workload=NAME clients=N per_round=K opacus_s=... vectorized_s=... speedup=... e2e_over_engine=... peak_rss_mb=...

``opacus_s`` and ``vectorized_s`` are median end-to-end seconds of a whole run (data,
partition, calibration, Flower messages, aggregation, evaluation, files). ``speedup`` is
their ratio. ``e2e_over_engine`` is the vectorized run's end-to-end time over the time
spent inside the engine's own training (`clients.vectorized.train_clients`): what the
message path costs on top. ``peak_rss_mb`` is the process' peak resident memory so far.

Workloads (DP-SGD sigma = 1, C = 1, batch 8, one local epoch, as in the issue):
  (i)   digits MLP(64), 100 clients, 10 a round
  (ii)  digits MLP(64), 200 clients, 100 a round
  (iii) synthetic (FedProx's Synthetic(1,1)), 1,000 clients, 100 a round
  steps-heavy: digits MLP(64), 50 clients, 10 a round, 3 local epochs, 10 rounds (also in
        --quick): a round's clients take about 12 steps each, where in (i)-(iii) most take 1-4,
        so ``e2e_over_engine`` shows what the message path costs beside real local training
  steps-heavy-20: the same with 5 local epochs, so that clients take the 20 steps a round that
        the e2e target names (digits' 50 clients hold about 26 samples: 4 batches of 8 an epoch)
  (iv)  with a GPU: pfl-research's CIFAR-10 CNN (without its dropout) on random 32x32x3 data,
        1,000 users of 50 images, 50 a round; also reports rounds per second.

    python benchmarks/engine_speed.py [--quick] [--repeats 3] [--threads 1] [--split] [--floor] [--central-dp]

``--central-dp`` adds the central-DP workload: workload (ii) with user-level DP on (z = 1,
adaptive clipping to the median, `fedsim.central_dp`), beside the same run without it, both
on the vectorized engine, interleaved, in this one process:

    central_dp workload=NAME loop_plain_s=... loop_central_s=... ratio=...

``loop_*_s`` is the median time spent in the rounds' train-and-aggregate step
(`fedsim.server._train_round`: messages, training, the strategy's aggregation and, with
central DP, the layer on the round's stack), without set-up and central evaluation, which
central DP does not touch. ``ratio`` is the median of the ratios of runs timed side by side
(central after plain, each pair within a second): a shared host's drift moves both runs of a
pair alike, where it would move the two medians apart. ``--only central`` runs this line alone.

``--split`` adds a line per workload with each engine's own training time (the vectorized
engine's `train_clients`, Opacus' `run_job` per client) and what the rest of each run took.

``--floor`` adds a line per workload with the least time any run of it can take while every
client gets an ordinary Flower reply, as the runtime's contract with strategies requires:

    floor workload=NAME message_floor_ms=... targets_leave_ms=... longest_client_s=...
          best_speedup=... best_e2e_over_engine=... critical_speedup=...   (one line)

``message_floor_ms`` is one round's Flower messages and nothing else (`message_floor`): the
round's train messages as Flower's FedAvg builds them, each client's reply built from the
trained stack with fedsim's cheapest helpers (the runtime's own), and FedAvg's aggregation.
No accounting, node state, evaluation, files or set-up. It is measured after each pair of
timed runs (the median of those), so that the host's drift in speed moves it and them alike.
``targets_leave_ms`` is the most a round may spend outside the engine's training if a run is
to meet both targets at 100 a round, whatever the engine's speed: with Opacus' time O,
training time E and the rest X, O / (E + X) >= 25 and (E + X) / E <= 1.5 give X <= O / 75,
spread over the rounds (a floor above it means no engine can meet both). ``best_speedup``
and ``best_e2e_over_engine`` put that floor beside this run's vectorized training time: what
a run would give if it did nothing but train and exchange messages. ``longest_client_s`` trains
each round's largest client alone (an extra run, untimed otherwise): its sequential DP-SGD
steps bound any batching of the round, and ``critical_speedup`` is Opacus' time over that
plus the floor, as if every other client trained for free.

Both engines run with the same torch thread count, 1 by default: on the 2-core CI-class
machine, torch's 2-thread kernels were 3-4x slower than 1 thread on these small tensors
(an elementwise op on 384k floats: 16 ms against 0.5 ms) and erratic under any other load.
"""

from __future__ import annotations

import argparse
import gc
import logging
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe  # noqa: E402

import fedsim.clients.app as client_app  # noqa: E402
from fedsim import records as R  # noqa: E402
from fedsim.config import load_config  # noqa: E402
from fedsim.logs import ConsoleHandler, setup_logging  # noqa: E402
from fedsim.models import register_model  # noqa: E402
from fedsim.privacy.accounting import clear_memos  # noqa: E402
from fedsim.run import run_experiment  # noqa: E402

ENGINE_SECONDS = [0.0]
LOOP_SECONDS = [0.0]
CENTRAL_DP = {"privacy.user_noise_multiplier": 1.0, "privacy.user_clip": 0.5, "privacy.user_clip_quantile": 0.5}
TARGET_SPEEDUP, TARGET_E2E_OVER_ENGINE = 25.0, 1.5  # the targets at 100 clients a round, on the 2-core CPU


def _time_into(module, name: str, total: list[float]) -> None:
    """Replace ``module.<name>`` by a wrapper that adds its time to ``total[0]``."""
    real = getattr(module, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - start
    setattr(module, name, timed)


def _timed_engine() -> None:
    """Time each engine's own training: the vectorized engine's `train_clients` for a round,
    and Opacus' `run_job` for one client (model, data loader, PrivacyEngine, local loop)."""
    _time_into(client_app, "train_clients", ENGINE_SECONDS)
    _time_into(client_app, "run_job", ENGINE_SECONDS)


def _timed_loop() -> None:
    """Add the time spent in the server's `_train_round` to LOOP_SECONDS."""
    import fedsim.server as server

    _time_into(server, "_train_round", LOOP_SECONDS)


def central_dp_line(name: str, overrides: dict, repeats: int, tmp: Path) -> str:
    """The central_dp line: the rounds' loop time of `overrides` with and without user-level DP
    (`CENTRAL_DP`), vectorized engine, interleaved after one warm-up run of each."""
    central = {**overrides, **CENTRAL_DP}
    for label, config in (("plain", overrides), ("central", central)):
        run_once({**config, "federation.rounds": 1}, "vectorized", tmp / f"central-{name}-warm-{label}")
    loops: dict[str, list[float]] = {"plain": [], "central": []}
    for r in range(repeats):
        for label, config in (("plain", overrides), ("central", central)):
            LOOP_SECONDS[0] = 0.0
            run_once(config, "vectorized", tmp / f"central-{name}-{label}-{r}")
            loops[label].append(LOOP_SECONDS[0])
    p, c = statistics.median(loops["plain"]), statistics.median(loops["central"])
    ratio = statistics.median(b / a for a, b in zip(loops["plain"], loops["central"]))
    return f"central_dp workload={name} loop_plain_s={p:.3f} loop_central_s={c:.3f} ratio={ratio:.2f}"


@register_model("bench-cifar-cnn")
def _cifar_cnn(cfg, data, cache_dir=""):
    """pfl-research's CIFAR-10 CNN (benchmarks/image_classification), without its dropout layers."""
    return nn.Sequential(nn.Unflatten(1, (3, 32, 32)), nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 14 * 14, 128), nn.ReLU(),
                         nn.Linear(128, 10))


# DP-SGD and the local training of every workload here (benchmarks/peers.py takes the same
# local training and the digits shape of workload (ii), without DP-SGD)
DP_SGD = {"privacy.noise_multiplier": 1.0, "privacy.max_grad_norm": 1.0}
LOCAL = {"client.batch_size": 8, "client.local_epochs": 1, "client.lr": 0.3, "model.name": "mlp", "model.hidden": [64]}
DIGITS_200X100 = {"federation.num_clients": 200, "federation.clients_per_round": 100}


def workloads(quick: bool, tmp: Path) -> list[tuple[str, dict]]:
    dp = {**DP_SGD, **LOCAL}
    out = [
        ("digits-mlp-100x10", {**dp, "federation.num_clients": 100, "federation.clients_per_round": 10,
                               "federation.rounds": 10 if quick else 20}),
        ("digits-mlp-200x100", {**dp, **DIGITS_200X100, "federation.rounds": 5 if quick else 10}),
        ("steps-heavy", {**dp, "federation.num_clients": 50, "federation.clients_per_round": 10,
                         "client.local_epochs": 3, "federation.rounds": 10}),
        ("steps-heavy-20", {**dp, "federation.num_clients": 50, "federation.clients_per_round": 10,
                            "client.local_epochs": 5, "federation.rounds": 10}),
        ("synthetic-1000x100", {**dp, "data.dataset": "synthetic", "data.partitioner": "natural-id",
                                "federation.num_clients": 1000, "federation.clients_per_round": 100,
                                "federation.rounds": 3 if quick else 10}),
    ]
    if torch.cuda.is_available():
        rng = np.random.default_rng(0)
        path = tmp / "cifar-shaped.npz"
        n = 1000 * 50
        np.savez(path, x=rng.random((int(n / 0.8), 3 * 32 * 32), dtype=np.float32),
                 y=rng.integers(0, 10, int(n / 0.8)))
        out.append(("cifar-cnn-1000x50-gpu", {**dp, "data.dataset": "file", "data.path": str(path),
                                              "data.label_column": "y", "model.name": "bench-cifar-cnn",
                                              "federation.num_clients": 1000, "federation.clients_per_round": 50,
                                              "client.batch_size": 16, "runtime.device": "cuda",
                                              "federation.rounds": 3 if quick else 10}))
    return out


def run_once(overrides: dict, engine: str, out: Path) -> tuple[float, float]:
    """One run's (end-to-end, in-engine) seconds. The accountant's memos are cleared first:
    the engines sample the same clients, so the second engine would otherwise find every
    client's RDP curve computed by the first. And the heap is collected first (as `timeit`
    does by disabling the collector): the process holds about 500k objects (torch, Flower,
    datasets), so a full collection costs about 0.25 s, and the garbage of one run (Opacus'
    mostly) would otherwise trigger one inside the next, timing one engine's garbage against
    the other. Collections a run's own garbage triggers still count."""
    cfg = load_config(None, {**overrides, "runtime.engine": engine, "output.dir": str(out), "name": "bench"})
    clear_memos()
    gc.collect()
    ENGINE_SECONDS[0] = 0.0
    start = time.perf_counter()
    run_experiment(cfg, progress=False)
    return time.perf_counter() - start, ENGINE_SECONDS[0]


def message_floor(per_round: int, shapes: dict[str, tuple[int, ...]], repeats: int = 100) -> float:
    """Median seconds of one round's Flower messages alone, at `per_round` clients of a model
    with these tensor shapes: the train messages (one `Message` per node over one shared
    content, as Flower's `FedAvg.configure_train` builds them), every reply as the in-process
    runtime builds it from the engine's stack (`R.stacked_to_arrays` per tensor, trusted
    records of the reply's 7 metrics, `R.reply_to`), and FedAvg's aggregation
    (`R.aggregate_train_replies`). A run does all of this and more, so it is a floor."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedsim.runtime.inprocess import assign_message_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # as the grid sets them
    rng = np.random.default_rng(0)
    sent = R.numpy_to_record({k: rng.random(s, dtype=np.float32) for k, s in shapes.items()})
    trained = {k: rng.random((per_round, *s), dtype=np.float32) for k, s in shapes.items()}

    def one_round() -> float:
        start = time.perf_counter()
        content = RecordDict({R.ARRAYS: sent, R.CONFIG: ConfigRecord({R.SERVER_ROUND: 1})})
        messages = [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=1000 + i)
                    for i in range(per_round)]
        for i, msg in enumerate(messages):
            assign_message_id(msg, f"{i:032x}")
        columns = {k: R.stacked_to_arrays(list(stack)) for k, stack in trained.items()}
        replies = [R.reply_to(msg, R.trusted(RecordDict, {
            R.ARRAYS: R.trusted(ArrayRecord, {k: columns[k][i] for k in shapes}),
            R.METRICS: R.trusted(MetricRecord, {
                R.NUM_EXAMPLES: 8, R.UNIT_WEIGHT: 1.0, R.PARTITION_ID: i, R.EPSILON: 1.0, R.TRAIN_LOSS: 1.0,
                R.LOCAL_STEPS: 1, R.SAMPLE_RATE: 1.0})})) for i, msg in enumerate(messages)]
        R.aggregate_train_replies(replies, R.NUM_EXAMPLES, R.aggregate_metrics)
        return time.perf_counter() - start

    for _ in range(repeats // 10):
        one_round()
    return statistics.median(one_round() for _ in range(repeats))


def longest_client_seconds(overrides: dict, out: Path) -> float:
    """One more vectorized run in which each round's largest client is also trained alone,
    again (the same job, the same draws): the sum of those times."""
    real, alone = client_app.run_vectorized, [0.0]

    def with_longest_alone(jobs, batches=None):
        outcomes = real(jobs, batches)
        longest = max(jobs, key=lambda job: len(job.y))
        start = time.perf_counter()
        real([longest])
        alone[0] += time.perf_counter() - start
        return outcomes
    client_app.run_vectorized = with_longest_alone
    try:
        run_once(overrides, "vectorized", out)
    finally:
        client_app.run_vectorized = real
    return alone[0]


def model_shapes(run_dir: Path) -> dict[str, tuple[int, ...]]:
    """The federated tensors' shapes of a finished run's model."""
    from safetensors.numpy import load_file
    return {k: v.shape for k, v in load_file(run_dir / "model.safetensors").items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and repeats (under 10 min on 2 cores)")
    parser.add_argument("--repeats", type=int, default=0, help="timed runs per engine (default 3, quick 2)")
    parser.add_argument("--only", default="", help="run only workloads whose name contains this")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both engines (default 1)")
    parser.add_argument("--split", action="store_true",
                        help="also print each engine's own training time (split workload=... lines)")
    parser.add_argument("--floor", action="store_true",
                        help="also print the least time the Flower messages allow (floor workload=... lines)")
    parser.add_argument("--central-dp", action="store_true",
                        help="also time workload (ii) with user-level DP beside it without (central_dp line)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 3)
    setup_logging(False)  # the CLI's quiet console: a run's INFO lines go to its run.log only
    # ...and quieter still: every timed run would repeat the same warnings about the workloads
    # themselves (digits' 200 clients hold at most one batch each: q = 1; Opacus' and the
    # engine's "secure RNG off"), burying the results; each run's run.log keeps them
    for handler in logging.getLogger("fedsim").handlers:
        if isinstance(handler, ConsoleHandler):
            handler.setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    _timed_engine()
    _timed_loop()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for name, overrides in workloads(args.quick, tmp):
            if args.central_dp and name == "digits-mlp-200x100" and (not args.only or args.only in "central"):
                print(central_dp_line(name, overrides, repeats, tmp), flush=True)
            if args.only and args.only not in name:
                continue
            warm = {**overrides, "federation.rounds": 1}
            for engine in ("opacus", "vectorized"):
                run_once(warm, engine, tmp / f"{name}-warm-{engine}")
            times = {"opacus": [], "vectorized": []}
            inside_engine = {"opacus": [], "vectorized": []}
            engine_share = []
            floors, shapes = [], {}
            for r in range(repeats):
                for engine in ("opacus", "vectorized"):
                    wall, inside = run_once(overrides, engine, tmp / f"{name}-{engine}-{r}")
                    times[engine].append(wall)
                    inside_engine[engine].append(inside)
                    if engine == "vectorized":
                        engine_share.append(wall / inside)
                if args.floor:  # beside each pair of runs, so that a host's drift moves both alike
                    shapes = shapes or model_shapes(tmp / f"{name}-vectorized-0")
                    floors.append(message_floor(overrides["federation.clients_per_round"], shapes))
            o, v = statistics.median(times["opacus"]), statistics.median(times["vectorized"])
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            line = (f"workload={name} clients={overrides['federation.num_clients']} "
                    f"per_round={overrides['federation.clients_per_round']} opacus_s={o:.2f} vectorized_s={v:.2f} "
                    f"speedup={o / v:.1f} e2e_over_engine={statistics.median(engine_share):.2f} "
                    f"peak_rss_mb={rss:.0f}")
            if "gpu" in name:
                rounds = overrides["federation.rounds"]
                line += f" opacus_rounds_per_s={rounds / o:.2f} vectorized_rounds_per_s={rounds / v:.2f}"
            print(line, flush=True)
            if args.split:
                oe, ve = statistics.median(inside_engine["opacus"]), statistics.median(inside_engine["vectorized"])
                print(f"split workload={name} opacus_engine_s={oe:.3f} vectorized_engine_s={ve:.3f} "
                      f"engine_speedup={oe / ve:.1f} opacus_rest_s={o - oe:.2f} vectorized_rest_s={v - ve:.2f}",
                      flush=True)
            if args.floor:
                ve = statistics.median(inside_engine["vectorized"])
                rounds = overrides["federation.rounds"]
                floor = statistics.median(floors)
                longest = longest_client_seconds(overrides, tmp / f"{name}-longest")
                leave = o * (1 - 1 / TARGET_E2E_OVER_ENGINE) / TARGET_SPEEDUP / rounds
                print(f"floor workload={name} message_floor_ms={floor * 1000:.2f} targets_leave_ms={leave * 1000:.2f} "
                      f"longest_client_s={longest:.3f} "
                      f"best_speedup={o / (ve + rounds * floor):.1f} "
                      f"best_e2e_over_engine={(ve + rounds * floor) / ve:.2f} "
                      f"critical_speedup={o / (longest + rounds * floor):.1f}", flush=True)
    print(f"machine: {describe()}")


if __name__ == "__main__":
    main()
