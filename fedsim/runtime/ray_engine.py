"""The Ray runtime: the vectorized engine on a pool of Ray actors ("engine workers").

Flower's simulation engine (`fedsim.runtime.ray_runtime`, ``runtime.name = "flower"``) runs
one ClientApp call per message in a Ray actor: about 80 ms a client-round, against well
under 1 ms for a client trained in a batched round in process. This runtime keeps the
batching and spreads it. As with the in-process grid, the server loop, the strategy and
every node's `Context` live in the driver (so checkpoints and ``--resume`` are unchanged);
each round's train messages are split across the workers, balanced by the clients' local
steps (the vectorized engine's cost), and each worker trains its share with
`fedsim.clients.app.train_round`, the in-process runtime's round handler, and sends back one
ordinary Flower reply per client with the node's updated state.

Why a node's state travels with its message instead of living on one worker: a round's
sampled clients are balanced afresh each round, so a node trains on whichever worker is
least loaded; its state (accountant history, control variates) is small next to the model
each message carries, and keeping it in the driver is what lets a checkpoint hold it.
What stays resident on a worker for the whole run is the heavy part: the clients' data (on
the worker's GPU when it has one), the engine's buffers and the round's model.

A worker that dies (or stays silent past ``runtime.round_timeout``) fails the run with one
line naming it, its round and its nodes (`ClientFailure`, exit 1), or, under
``runtime.on_client_error = "skip"``, its clients get error replies and a fresh worker
takes its place. Ray is shut down when the run ends, however it ends, unless the caller
had started it (then only this run's actors are killed).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ConfigRecord, Context, Error, Message, RecordDict

from fedsim import records as R
from fedsim.checkpoint import Checkpoint
from fedsim.clients.app import make_client_app, release_run, train_round
from fedsim.config import Config
from fedsim.errors import ClientFailure, ConfigError, FedsimError
from fedsim.experiment import run_config_for
from fedsim.partition import partition
from fedsim.privacy.accounting import steps_per_round
from fedsim.runtime.inprocess import SERVER_NODE_ID, InProcessGrid
from fedsim.threads import auto_threads
from fedsim.server import RunRecorder, server_main

log = logging.getLogger("fedsim")

READY_TIMEOUT_S = 300.0  # a worker that is not up by then cannot be placed (or cannot import fedsim)


def array_to_wire(array: Array) -> tuple:
    """A Flower `Array` as Ray sends it from a worker: its payload as a numpy view, which Ray's
    serializer moves out of band (one copy into the object store), where the `bytes` it holds
    would be copied into the pickle stream, the stream into the store and out again. 100
    replies of the scale-out benchmark's MLP (34 MB) cross in 42 ms instead of 74."""
    return array.dtype, array.shape, array.stype, np.frombuffer(array.data, dtype=np.uint8)


def array_from_wire(wire: tuple) -> Array:
    """`array_to_wire` undone in the driver. The payload is copied into `bytes` (Flower's type
    for it): a view would pin the worker's whole reply buffer in Ray's object store for as
    long as any node state kept one of its arrays."""
    dtype, shape, stype, payload = wire
    array = Array.__new__(Array)
    array.__dict__.update(dtype=dtype, shape=tuple(shape), stype=stype, data=payload.tobytes(), _is_dirty=True)
    return array


class EngineWorker:
    """One engine worker (a Ray actor): trains the train messages it is handed with the
    in-process round handler. Its process keeps the clients' data and the engine's buffers
    between rounds (`fedsim.clients.app`'s caches), so a client's data is read once a run."""

    def __init__(self, threads: int) -> None:
        import ray
        import torch

        torch.set_num_threads(threads)
        # in this process only: the replies it returns; the driver needs nothing registered
        # (the deserializer travels by reference, as a function of this module)
        ray.util.register_serializer(Array, serializer=array_to_wire, deserializer=array_from_wire)

    def where(self) -> tuple[int, str, str]:
        """(pid, host IP, Ray node id): what a failure report names."""
        import ray

        return os.getpid(), ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()

    def train(self, pairs: list[tuple[Message, Context]]) -> tuple[list[Message], list[RecordDict], float]:
        """The replies, the nodes' updated states, and the seconds the training took here
        (what the driver's round log sets against its own wait)."""
        start = time.perf_counter()
        replies = train_round(pairs)
        return replies, [context.state for _, context in pairs], time.perf_counter() - start

    def release(self) -> None:
        release_run()


def balance(steps: list[int], workers: int) -> list[list[int]]:
    """Split clients (their indices) across workers so that the most loaded worker has as
    few local steps as possible: longest first, each to the least loaded worker (Graham's
    LPT rule, within 4/3 of the optimum). Each worker's share keeps the round's order, so a
    one-worker split trains exactly the in-process round."""
    loads = [0] * workers
    shares: list[list[int]] = [[] for _ in range(workers)]
    for i in sorted(range(len(steps)), key=lambda i: (-steps[i], i)):
        w = min(range(workers), key=lambda w: (loads[w], w))
        loads[w] += steps[i]
        shares[w].append(i)
    return [sorted(share) for share in shares]


def default_workers(cluster: dict[str, float]) -> int:
    """One worker per GPU, else one per two CPU cores (each worker runs torch on its cores)."""
    gpus = int(cluster.get("GPU", 0))
    return gpus if gpus > 0 else max(1, int(cluster.get("CPU", 1)) // 2)


def workers_that_fit(nodes: list[dict], num_cpus: float, num_gpus: float) -> int:
    """How many workers of this size the live Ray nodes can hold at once (a worker sits on one node)."""
    total = 0
    for node in nodes:
        if not node.get("Alive", True):
            continue
        have = node.get("Resources", {})
        fits = [int(have.get("CPU", 0) / num_cpus + 1e-9)] if num_cpus > 0 else []
        if num_gpus > 0:
            fits.append(int(have.get("GPU", 0) / num_gpus + 1e-9))
        total += min(fits) if fits else 0
    return total


def cpus_per_worker(cluster: dict[str, float], workers: int) -> float:
    """The cluster's CPUs shared out: Ray refuses fractions above 1, so whole CPUs from 1 up."""
    share = cluster.get("CPU", 1) / workers
    return float(int(share)) if share >= 1 else round(share, 4)


class WorkerPool:
    """The Ray actors of one run, started, replaced and stopped here."""

    def __init__(self, size: int, *, threads: int, num_cpus: float, num_gpus: float,
                 worker_class: type = EngineWorker, runtime_env: dict | None = None) -> None:
        import ray

        self._options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_restarts": 0,
                         "scheduling_strategy": "SPREAD", **({"runtime_env": runtime_env} if runtime_env else {})}
        self._remote = ray.remote(worker_class)
        self.threads = threads
        self.actors: list = [None] * size
        self.places: list[tuple[int, str, str]] = [(0, "?", "?")] * size
        self.start(*range(size))

    def start(self, *indices: int) -> None:
        """Start the workers at these positions, together (each imports torch and fedsim:
        seconds), and wait until each can be reached."""
        import ray

        actors = {i: self._remote.options(**self._options).remote(self.threads) for i in indices}
        try:
            places = ray.get([actor.where.remote() for actor in actors.values()], timeout=READY_TIMEOUT_S)
        except ray.exceptions.RayActorError as exc:  # its constructor raised: fedsim or torch is missing there
            for actor in actors.values():
                ray.kill(actor)
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise ClientFailure(f"ray: an engine worker failed to start: {reason}") from None
        except ray.exceptions.GetTimeoutError:
            for actor in actors.values():
                ray.kill(actor)
            raise FedsimError(f"runtime.workers: {len(actors)} engine worker(s) could not be placed within "
                              f"{READY_TIMEOUT_S:g} s ({self._options['num_cpus']:g} CPUs and "
                              f"{self._options['num_gpus']:g} GPUs each; the cluster has "
                              f"{ray.cluster_resources()})") from None
        for (i, actor), place in zip(actors.items(), places):
            self.actors[i], self.places[i] = actor, place

    def describe(self, index: int) -> str:
        pid, ip, _ = self.places[index]
        return f"engine worker {index} (pid {pid} on {ip})"

    def stop(self) -> None:
        import ray

        for actor in self.actors:
            if actor is not None:
                ray.kill(actor)
        self.actors = []


class RayEngineGrid(InProcessGrid):
    """The in-process grid whose round handler sends the round's train messages to the
    workers. Everything else (discovery, node states, checkpoints) is the in-process grid's."""

    def __init__(self, pool: WorkerPool, num_nodes: int, run_config: dict, client_steps: list[int], *,
                 on_client_error: str, round_timeout: float) -> None:
        super().__init__(make_client_app(), num_nodes, run_config, train_round=self._train_on_workers)
        self.pool = pool
        self.client_steps = client_steps
        self.on_client_error = on_client_error
        self.round_timeout = round_timeout
        self.used_hosts: set[str] = set()  # the Ray nodes whose workers trained (a run's record, tests)

    def _train_on_workers(self, pairs: list[tuple[Message, Context]]) -> list[Message]:
        import ray

        pids = [context.node_config["partition-id"] for _, context in pairs]
        shares = balance([self.client_steps[p] for p in pids], len(self.pool.actors))
        start = time.monotonic()  # before the dispatch, which the round's log counts in the wait
        calls = {i: self.pool.actors[i].train.remote([pairs[j] for j in share])
                 for i, share in enumerate(shares) if share}
        replies: list[Message | None] = [None] * len(pairs)
        deadline = time.monotonic() + self.round_timeout
        trained: list[float] = []
        failure: ClientFailure | None = None
        for index, call in calls.items():
            share = shares[index]
            try:
                answers, states, seconds = ray.get(call, timeout=max(0.0, deadline - time.monotonic()))
            except ray.exceptions.RayTaskError as exc:  # the worker lives; the code in it raised
                if isinstance(exc.cause, FedsimError):
                    raise exc.cause from None
                # outside any one client (each client's own exception is its error reply)
                cause = exc.cause if exc.cause is not None else exc
                last = (str(cause).strip().splitlines() or [""])[-1]
                raise ClientFailure(f"round {self._round_of(pairs)}: {self.pool.describe(index)} raised "
                                    f"{type(cause).__name__}: {last}", str(exc)) from None
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                failure = failure or self._lost(index, share, pairs, exc, replies)
                continue
            self.used_hosts.add(self.pool.places[index][2])
            trained.append(seconds)
            for j, reply, state in zip(share, answers, states):
                replies[j] = reply
                self.contexts[pairs[j][1].node_id].state = state
        if failure is not None:
            raise failure
        if trained:
            # where a round's time goes past one process: the slowest worker's training, and
            # the rest (dispatch, the replies' trip back, an uneven split); benchmarks read it
            waited = time.monotonic() - start
            log.info("ray: round %s: workers trained %.3f-%.3f s, the driver waited %.3f s (%.3f s beyond "
                     "the slowest)", self._round_of(pairs), min(trained), max(trained), waited,
                     waited - max(trained))
        return replies  # type: ignore[return-value]

    @staticmethod
    def _round_of(pairs: list[tuple[Message, Context]]) -> object:
        """The server round a round's train messages carry ("?" if they carry none)."""
        config = R.record_of(pairs[0][0].content, R.CONFIG, ConfigRecord) if pairs else None
        return R.plain(config).get(R.SERVER_ROUND, "?") if config is not None else "?"

    def _lost(self, index: int, share: list[int], pairs: list[tuple[Message, Context]], exc: Exception,
              replies: list[Message | None]) -> ClientFailure | None:
        """A worker died or went silent: the run fails with one line (fail, returned for the
        caller to raise once the other workers' replies are in), or its clients' replies are
        errors and a fresh worker takes its place for the rounds that follow (skip)."""
        import ray

        nodes = [pairs[j][1].node_id for j in share]
        server_round = self._round_of([pairs[j] for j in share])
        what = "stayed silent past runtime.round_timeout" if isinstance(exc, ray.exceptions.GetTimeoutError) \
            else "died"
        shown = ", ".join(str(n) for n in nodes[:8]) + (f" and {len(nodes) - 8} more" if len(nodes) > 8 else "")
        text = (f"round {server_round}: {self.pool.describe(index)} {what} while training "
                f"{len(nodes)} client(s), nodes {shown}")
        ray.kill(self.pool.actors[index])
        if self.on_client_error == "fail":
            return ClientFailure(text)
        for j in share:
            replies[j] = Message(Error(code=500, reason=text), reply_to=pairs[j][0])
        self.pool.start(index)
        return None


def run_ray(cfg: Config, *, progress: bool = True, resume: Checkpoint | None = None,
            worker_class: type | None = None) -> RunRecorder:
    """Run `cfg` on engine workers. With ``RAY_ADDRESS`` set, Ray joins that cluster; else it
    starts one on this machine. A Ray instance the caller already started is used as it is
    (and left running); one started here is shut down when the run ends. `worker_class`: an
    `EngineWorker` subclass (tests make one that dies), this module's `EngineWorker` if None."""
    import ray

    started = not ray.is_initialized()
    if started:
        # "local" when RAY_ADDRESS is unset: Ray's own default (None) would join whatever cluster
        # `ray start` last left on this machine (/tmp/ray/ray_current_cluster), someone else's
        address = os.environ.get("RAY_ADDRESS") or "local"
        if address != "local":
            log.info("joining the Ray cluster at RAY_ADDRESS=%s", address)
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
                 configure_logging=False)
        # ray.init installs its own SIGTERM handler, which aborts the process (exit 134): put
        # fedsim's back, so SIGTERM ends the run as Ctrl-C does (finished rounds kept, exit 143)
        if threading.current_thread() is threading.main_thread():
            for sig, handler in handlers.items():
                if handler is not None:
                    signal.signal(sig, handler)
    pool = None
    try:
        cluster = ray.cluster_resources()
        workers = cfg.runtime.workers or default_workers(cluster)
        num_cpus = cpus_per_worker(cluster, workers)
        # a GPU each where the cluster has them (and the run may use them), as the default count assumes
        gpus = cfg.runtime.worker_gpus or (1.0 if cluster.get("GPU", 0) >= 1 and cfg.runtime.device != "cpu" else 0.0)
        threads = cfg.runtime.torch_threads or auto_threads(max(1, int(num_cpus)), cuda=gpus > 0)
        fit = workers_that_fit(ray.nodes(), num_cpus, gpus)
        if fit < workers:
            raise ConfigError(f"runtime.workers: {workers} workers of {num_cpus:g} CPU(s) and {gpus:g} GPU(s) "
                              f"each do not fit the Ray cluster's nodes (room for {fit}); use fewer workers, "
                              f"or set runtime.worker_gpus to a fraction")
        # fedsim must import in the workers: on a cluster started elsewhere, put this checkout
        # (its parent directory) on their path
        root = str(Path(__file__).resolve().parent.parent.parent)
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join([root, *[p for p in sys.path if p and p != root]])}}
        pool = WorkerPool(workers, threads=threads, num_cpus=num_cpus, num_gpus=gpus,
                          worker_class=worker_class or EngineWorker, runtime_env=env)
        log.info("ray: %d engine worker(s), %g CPU(s) and %g GPU(s) each, %d torch thread(s); Ray nodes: %d",
                 workers, num_cpus, gpus, threads, len({p[2] for p in pool.places}))
        data_sizes = [len(idx) for idx in partition(cfg).indices]
        c = cfg.client
        steps = [steps_per_round(n, c.batch_size, c.local_epochs, c.local_steps) for n in data_sizes]
        run_config = run_config_for(cfg)
        grid = RayEngineGrid(pool, cfg.federation.num_clients, run_config, steps,
                             on_client_error=cfg.runtime.on_client_error, round_timeout=cfg.runtime.round_timeout)
        context = Context(run_id=1, node_id=SERVER_NODE_ID, node_config={}, state=RecordDict(),
                          run_config=run_config)
        try:
            return server_main(grid, context, progress=progress, resume=resume)
        finally:
            log.info("ray: engine workers on %d Ray node(s) trained clients", len(grid.used_hosts))
    finally:
        if pool is not None:
            pool.stop()
        release_run()  # discovery ran in this process: what it cached
        if started:
            ray.shutdown()

