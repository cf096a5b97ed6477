"""fedsim's ServerApp logic: discovery, the strategy's rounds, central evaluation, outputs.

`server_main(grid, context)` is the same function for every runtime: fedsim's
in-process grid, Flower's Ray simulation and a real SuperLink. It wraps the grid in
`TrackedGrid`, which

* asks every node which partition it holds (a ``query`` message) and then lists node
  ids in partition order. Together with a per-round seed of Python's ``random`` (which
  Flower's ``sample_nodes`` uses), set by `SeededRounds` where each round starts, the same
  partitions train in the same rounds in every runtime, although node ids differ.
* waits until all nodes are connected before round 1 (Flower's round-1 race).
* hands every train reply to the `RunRecorder`, and turns a client's error reply into a
  `ClientFailure` that names the node, partition and round (or skips it, by config).

The rounds themselves are the loop of Flower's `Strategy.start`, driven here (`_run_rounds`)
so that a run writes a checkpoint between rounds (`fedsim.checkpoint`) and a resumed run
starts at the round after it. The finished run's global model is `model.safetensors`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim.clients.app import engine_used
from fedsim.clients.trainer import evaluate
from fedsim import records as R
from fedsim.algorithms import (get_algorithm, load_strategy_state, resolve_device,
                               stateful_strategy, strategy_state)
from fedsim.central_dp import build_central_dp
from fedsim.central_dp import user_epsilon as central_dp_epsilon
from fedsim.checkpoint import Checkpoint, NodeMemo, checkpoint_path, model_meta, save_checkpoint, save_model
from fedsim.config import Config, dumps_toml, secagg_shares
from fedsim.datasets import load_dataset
from fedsim.errors import ClientFailure, ConfigError, Diverged
from fedsim.experiment import config_from_context, derive_seed
from fedsim.models import as_tensors, build_model
from fedsim.node_data import data_spec
from fedsim.privacy.accounting import accountant_label, user_accountant_label
from fedsim.privacy.faults import active_fault
from fedsim.privacy.secure_noise import is_secret
from fedsim.privacy.secagg import clipping_range, quantization_error_bound
from fedsim.results import (CLIENT_COLUMNS, CLIENTS_CSV, CONFIG_TOML, MODEL, MODEL_BEST, ROUND_COLUMNS,
                            ROUNDS_CSV, SUMMARY_JSON, BackgroundWriter, csv_text, json_text, run_log, write_atomic)
from fedsim.secure_aggregation import build_secure_aggregation, secure_train_round
from fedsim.schedule import (ForwardingGrid, SampledGrid, client_sampling, sample_round, user_accounting_args,
                             user_mechanism)
from fedsim.trackers import open_trackers

log = logging.getLogger("fedsim")


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("fedsim", "flwr", "opacus", "torch", "dp-accounting", "flwr-datasets", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass
class ClientRecord:
    num_examples: int = 0
    participations: int = 0
    epsilon: float = 0.0
    sample_rate: float = float("nan")


@dataclass
class RunRecorder:
    """Everything the outputs say, updated per reply and written per round.

    `restored` (a checkpoint's `state()`) continues a run: its rows, client records, wall
    time and skipped failures come back before anything is written.
    """

    cfg: Config
    out_dir: Path
    progress: bool = True
    restored: dict | None = None
    secure_protocol: bool = False  # rounds run Flower's SecAgg+ protocol (a deployment)
    clients: dict[int, ClientRecord] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    trained_this_round: int = 0
    train_losses: list[float] = field(default_factory=list)
    skipped_failures: int = 0  # client exceptions skipped under runtime.on_client_error = "skip"
    engine: dict | None = None  # which engine trains the clients (`_engine_record`), once discovery is done
    started: float = field(default_factory=time.perf_counter)
    earlier_seconds: float = 0.0  # wall time of the sessions before a resume
    _bar: object = None
    _csv_memo: dict = field(default_factory=lambda: {ROUNDS_CSV: {}, CLIENTS_CSV: {}})  # `csv_text`'s line memos
    # the per-round files (and the checkpoints) are written off the training thread, in order
    writer: BackgroundWriter = field(default_factory=BackgroundWriter, repr=False)

    def __post_init__(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.trackers = open_trackers(self.cfg, self.out_dir)  # output.trackers and Python callbacks
        if self.restored is not None:
            self.restore(self.restored)
        write_atomic(self.out_dir / CONFIG_TOML, dumps_toml(self.cfg))
        self.write(status="running")  # the pid and heartbeat from the start: a dead run is told apart
        if self.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.cfg.federation.rounds, initial=len(self.rows), desc=self.cfg.name,
                             unit="round", leave=True, dynamic_ncols=True)

    @property
    def private(self) -> bool:
        return self.cfg.privacy.noise_multiplier > 0

    @property
    def wall_seconds(self) -> float:
        return self.earlier_seconds + time.perf_counter() - self.started

    def state(self) -> dict:
        """What a checkpoint keeps of the recorder (plain JSON values)."""
        return {"rows": self.rows, "wall_seconds": self.wall_seconds, "skipped_failures": self.skipped_failures,
                # in first-participation order, as the live dict holds them: the epsilon mean
                # sums them in this order, so a resumed run gives the same last bit
                "clients": [[pid, c.num_examples, c.participations, c.epsilon, c.sample_rate]
                            for pid, c in self.clients.items()]}

    def restore(self, state: dict) -> None:
        self.rows = [dict(r) for r in state["rows"]]
        self.clients = {int(pid): ClientRecord(int(n), int(k), float(eps), float(q))
                        for pid, n, k, eps, q in state["clients"]}
        self.skipped_failures = int(state.get("skipped_failures", 0))
        self.earlier_seconds = float(state["wall_seconds"])
        self.started = time.perf_counter()

    def on_train_reply(self, metrics: Mapping[str, Any]) -> None:
        """Count a client's reply; `metrics` is its MetricRecord's plain dict (`R.plain`)."""
        pid = int(metrics[R.PARTITION_ID])
        rec = self.clients.setdefault(pid, ClientRecord())
        rec.num_examples = int(metrics[R.NUM_EXAMPLES])
        rec.participations += 1
        rec.epsilon = float(metrics[R.EPSILON]) if self.private else math.inf
        rec.sample_rate = float(metrics[R.SAMPLE_RATE])
        self.trained_this_round += 1
        if metrics[R.TRAIN_LOSS] >= 0:  # -1: the client measured no loss
            self.train_losses.append(float(metrics[R.TRAIN_LOSS]))

    def user_epsilon(self, rounds: int) -> float | None:
        """The user-level epsilon after `rounds` rounds, accounted for the sampling mode that
        runs (`fedsim.schedule.user_accounting_args`); None without central DP."""
        return central_dp_epsilon(self.cfg, rounds)

    def on_round_end(self, server_round: int, evaluation: dict[str, float],
                     validation: dict[str, float] | None = None) -> None:
        """Record a round: the test split's `evaluation`, and the validation split's (None
        without one, data.validation_fraction = 0), the one the best round is selected on."""
        metric_name = "accuracy" if "accuracy" in evaluation else "mse"
        check_finite(self.cfg, server_round, {"test_loss": evaluation["loss"], metric_name: evaluation[metric_name],
                                              **({"val_loss": validation["loss"]} if validation else {})})
        # Sample-level epsilon over clients that have trained at least once; a client that
        # never trained has released nothing (epsilon 0) and is left out of the mean.
        eps = [c.epsilon for c in self.clients.values()]
        row = {
            "round": server_round, "metric_name": metric_name, "metric": evaluation[metric_name],
            "test_loss": evaluation["loss"],
            "val_metric": validation[metric_name] if validation else None,
            "val_loss": validation["loss"] if validation else None,
            "train_loss": float(np.mean(self.train_losses)) if self.train_losses else float("nan"),
            "sample_epsilon_max": max(eps) if eps and self.private else (math.inf if eps else 0.0),
            # fsum is exact, so the mean does not depend on the order clients joined in (a resumed
            # run restores them sorted by partition): resumed and uninterrupted runs agree to the bit
            "sample_epsilon_mean": math.fsum(eps) / len(eps) if eps and self.private else (math.inf if eps else 0.0),
            "user_epsilon": self.user_epsilon(server_round),
            "clients_trained": self.trained_this_round,
            "wall_seconds": self.wall_seconds,
        }
        self.rows.append(row)
        self.trained_this_round, self.train_losses = 0, []
        self.write(status="running")
        text = f"{metric_name}={row['metric']:.4f}"
        if self.private:  # the accountants, delta and sampling behind both are in run.log's header
            text += f" sample_eps_max={row['sample_epsilon_max']:.2f}"
        if row["user_epsilon"] is not None:
            text += f" user_eps={row['user_epsilon']:.2f}"
        log.info("round %d/%d: %s test_loss=%.4f train_loss=%.4f clients=%d (%.1f s)", server_round,
                 self.cfg.federation.rounds, text, row["test_loss"], row["train_loss"], row["clients_trained"],
                 row["wall_seconds"])
        self.trackers.on_round_end(server_round, row)
        if self._bar is not None:
            self._bar.set_postfix_str(text)
            self._bar.update(1)

    @property
    def selected_on(self) -> str:
        """The split the best round is selected on: validation, or test where there is none
        (data.validation_fraction = 0; its best test number is then an optimistic one)."""
        return "validation" if self.rows and self.rows[-1].get("val_metric") is not None else "test"

    def best_row(self) -> dict:
        """The row of the best round on the validation split (on the test split without
        one; the first such round, on ties); {} before round 1. Its "metric" is the test
        metric at that round: the test split is never what picks it, when there is a choice."""
        if not self.rows:
            return {}
        better = max if self.rows[-1]["metric_name"] == "accuracy" else min
        key = "val_metric" if self.selected_on == "validation" else "metric"
        return better(self.rows, key=lambda r: r[key])

    def summary(self, status: str, error: str | None = None) -> dict:
        p = self.cfg.privacy
        last = self.rows[-1] if self.rows else {}
        metric_name = last.get("metric_name", "accuracy")
        best = self.best_row()
        sample = {"epsilon_max": last.get("sample_epsilon_max"), "epsilon_mean": last.get("sample_epsilon_mean"),
                  "delta": p.delta, "accountant": accountant_label(p.accountant) if self.private else None,
                  "noise_multiplier": p.noise_multiplier, "max_grad_norm": p.max_grad_norm}
        if not self.private:  # strict JSON has no Infinity: say why there is no number
            sample.update(epsilon_max=None, epsilon_mean=None,
                          note="no DP-SGD (noise_multiplier = 0): no finite sample-level epsilon")
        if self.private:  # the distribution over clients that trained, not only its largest
            sample.update(epsilon_stats([c.epsilon for c in self.clients.values()]))
        if p.client_noise_multipliers:  # per-client calibration: sigma differs by client
            sigmas = sorted(p.client_noise_multipliers)
            sample.update(calibration=p.calibration, noise_multiplier_min=sigmas[0],
                          noise_multiplier_median=float(np.median(sigmas)), noise_multiplier_max=sigmas[-1])
        sampling = client_sampling(self.cfg)
        user = None
        if p.user_noise_multiplier > 0:
            args = user_accounting_args(self.cfg)
            user = {"epsilon": last.get("user_epsilon"), "delta": p.delta,
                    "accountant": user_accountant_label(p.accountant, sampling, args["mechanism"],
                                                        args["restart_every"]),
                    "sampling": sampling, "mechanism": args["mechanism"],
                    "noise_multiplier": p.user_noise_multiplier, "clip": p.user_clip}
            if args["mechanism"] == "tree":
                user["max_participations_per_tree"] = args["max_participations"]
            if p.noise_cohort_size > 0:  # the noise of a cohort of M: a deployment this run only simulates
                user["simulated"] = {"population": args["num_clients"], "cohort_size": args["cohort_size"],
                                     "note": "epsilon of a deployment sampling noise_cohort_size clients a round "
                                             "at the same rate; the clients trained here were fewer"}
        if user is not None and p.secure_aggregation:
            user["noise"] = ("distributed: each client adds N(0, (sigma C)^2 / clients_per_round); a round with "
                             "fewer contributions carries less noise than accounted (run.log warns)")
        label = get_algorithm(self.cfg.strategy.name).label_privacy(self.cfg.strategy.params, p.delta)
        out = {
            "status": status, "name": self.cfg.name, "seed": self.cfg.seed,
            "strategy": self.cfg.strategy.name, "dataset": self.cfg.data.dataset,
            "rounds_completed": len(self.rows), "rounds_planned": self.cfg.federation.rounds,
            "num_clients": self.cfg.federation.num_clients,
            "clients_per_round": self.cfg.federation.clients_per_round,
            "sampling": sampling,  # federation.sampling that ran (auto resolved)
            "metric_name": metric_name, "final_metric": last.get("metric"),
            # the test metric at the round of the best validation metric (`best_row`)
            "best_metric": best.get("metric"), "best_round": best.get("round"),
            "best_selected_on": self.selected_on, "best_val_metric": best.get("val_metric"),
            "final_val_metric": last.get("val_metric"),
            "final_test_loss": last.get("test_loss"),
            "sample_level": sample, "user_level": user, "label_level": label,
            "secure_aggregation": self.secure_aggregation(),
            "client_failures_skipped": self.skipped_failures, "engine": self.engine,
            # privacy.secure_noise that ran (auto resolved): whether the noise came from the seed
            "secure_noise": "on" if is_secret(self.cfg.privacy.secure_noise) else "off",
            "wall_seconds": self.wall_seconds, "versions": package_versions(),
            # who writes this run, and when it last did: `fedsim.results.run_state` tells a
            # live run from one whose process is gone
            "pid": os.getpid(), "host": socket.gethostname(), "updated_at": time.time(),
        }
        if error is not None:
            out["error"] = error
        if fault := active_fault():  # a deliberate privacy bug of the audit tests: this run's epsilon is wrong
            out["test_fault"] = fault
        return out

    def secure_aggregation(self) -> dict | None:
        """What secure aggregation did (None when off): Flower's protocol and its quantization
        bound in a deployment, the trust model alone in simulation."""
        p, k = self.cfg.privacy, self.cfg.federation.clients_per_round
        if not p.secure_aggregation:
            return None
        if not self.secure_protocol:
            return {"protocol": "simulated: the strategy sees only the exact sum of the updates"}
        r = clipping_range(p.secagg_clipping_range, p.user_noise_multiplier, p.user_clip, k,
                           p.user_noise_multiplier > 0)
        shares, threshold = secagg_shares(self.cfg)
        return {"protocol": "SecAgg+ (Flower)", "clipping_range": r, "quantization_range": p.secagg_quantization_range,
                "modulus": p.secagg_modulus, "shares": shares, "threshold": threshold,
                "error_bound": quantization_error_bound(r, p.secagg_quantization_range)}

    def write(self, status: str, error: str | None = None) -> dict:
        self.writer.write(self.out_dir / ROUNDS_CSV, csv_text(ROUND_COLUMNS, self.rows, self._csv_memo[ROUNDS_CSV]))
        client_rows = [{"partition_id": pid, "num_examples": c.num_examples,
                        "participations": c.participations,
                        "sample_epsilon": c.epsilon, "sample_rate": c.sample_rate}
                       for pid, c in sorted(self.clients.items())]
        self.writer.write(self.out_dir / CLIENTS_CSV,
                          csv_text(CLIENT_COLUMNS, client_rows, self._csv_memo[CLIENTS_CSV]))
        summary = self.summary(status, error)
        self.writer.write(self.out_dir / SUMMARY_JSON, json_text(summary))
        return summary

    def close(self, status: str, error: str | None = None) -> None:
        if self._bar is not None:
            self._bar.close()
        summary = self.write(status, error)
        self.writer.close()  # every file on disk before the run is reported over
        self.trackers.on_run_end(summary)


def epsilon_stats(values: list[float]) -> dict:
    """min, median and max of the per-client sample-level epsilons (clients that trained);
    None each before any client has trained."""
    if not values:
        return {"epsilon_min": None, "epsilon_median": None, "epsilon_max": None}
    return {"epsilon_min": float(np.min(values)), "epsilon_median": float(np.median(values)),
            "epsilon_max": float(np.max(values))}


def check_finite(cfg: Config, server_round: int, values: Mapping[str, float]) -> None:
    """Stop a run whose global model evaluates to NaN or infinity (`Diverged`, exit 1): its round
    is not recorded, the rounds before it are. A finished run with NaN metrics would pass for a
    result in every table built from it."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        what = ", ".join(f"{k} is {v}" for k, v in bad.items())
        raise Diverged(f"run diverged at round {server_round}: {what} ({divergence_hint(cfg)})")


def divergence_hint(cfg: Config) -> str:
    """The settings that most often make a run diverge, with their values."""
    c, p = cfg.client, cfg.privacy
    knobs = [f"client.lr = {c.lr:g}"]
    if c.momentum:
        knobs.append(f"client.momentum = {c.momentum:g}")
    if p.noise_multiplier > 0 or p.target_epsilon > 0:
        knobs.append(f"privacy.max_grad_norm = {p.max_grad_norm:g} (noise std is sigma x C)")
    if p.user_noise_multiplier > 0:
        knobs.append(f"privacy.user_clip = {p.user_clip:g}")
    params = cfg.strategy.params
    for name in ("server_lr", "beta_1", "beta_2", "mu"):
        if hasattr(params, name):
            knobs.append(f"strategy.{cfg.strategy.name}.{name} = {getattr(params, name):g}")
    return "lower " + knobs[0] + ("; check " + ", ".join(knobs[1:]) if knobs[1:] else "")


class TrackedGrid(ForwardingGrid):
    """A Grid wrapper: partition-ordered node ids, reply tracking, error policy."""

    def __init__(self, inner: Grid, recorder: RunRecorder, on_client_error: str = "fail",
                 min_nodes: int = 1) -> None:
        super().__init__(inner)
        self.recorder = recorder
        self.on_client_error = on_client_error
        self.min_nodes = min_nodes
        self.lost: set[int] = set()
        self.partition_of: dict[int, int] = {}
        self.current_round = 0  # set by SeededRounds when a round starts
        self.last_skipped: tuple[str, str | None] | None = None  # the last client error skipped

    # -- what fedsim adds (the rest is forwarded) ------------------------------------
    def get_node_ids(self) -> list[int]:
        """Discovered nodes that are still connected, in partition order."""
        live = set(self.inner.get_node_ids())
        for node in sorted(set(self.partition_of) - live - self.lost):
            self.lost.add(node)
            log.warning("node %d (partition %s) disconnected", node, self.partition_of[node])
        nodes = sorted((n for n in self.partition_of if n in live), key=self.partition_of.get)
        if len(nodes) < self.min_nodes:
            lost = ", ".join(f"node {n} (partition {self.partition_of[n]})" for n in sorted(self.lost))
            raise ClientFailure(f"only {len(nodes)} nodes left, {self.min_nodes} needed per round; lost: {lost}")
        return nodes

    def discover(self, expected: int, timeout: float, config_text: str, spec: dict | None = None,
                 window: int | None = None) -> None:
        """Wait for `expected` nodes, then ask each which partition it holds, handing each the
        experiment TOML and the data spec (a SuperNode keeps both in its state for the train
        messages; a data holder builds its model and reads its file with the spec).

        Both steps together take at most `timeout` seconds. `window` caps how many nodes are
        asked at a time (`fedsim deploy local` passes its CPU count: there each answer starts
        a ClientApp process on the same CPUs, and Flower drops one that has not reported within
        30 s); None asks all at once."""
        started = time.monotonic()
        deadline = started + timeout
        while len(nodes := list(self.inner.get_node_ids())) < expected:
            if time.monotonic() > deadline:
                raise ClientFailure(f"discovery: only {len(nodes)} of {expected} nodes connected within "
                                    f"{timeout:.0f} s; check that every SuperNode runs and reaches the "
                                    f"SuperLink, or raise runtime.discovery_timeout")
            time.sleep(0.05)
        content = RecordDict({R.CONFIG: ConfigRecord({R.RUN_CONFIG_KEY: config_text})})
        if spec is not None:
            content[R.DATA_SPEC] = ConfigRecord(spec)
        query = [Message(content, node, R.QUERY_PARTITION) for node in nodes]
        if window is None:
            replies = list(self.inner.send_and_receive(query, timeout=max(deadline - time.monotonic(), 0.0)))
        else:
            replies = self._send_paced(query, window, deadline)
        self._raise_errors(replies, "discovery")
        for reply in replies:
            if not reply.has_error():
                self.partition_of[reply.metadata.src_node_id] = int(reply.content[R.METRICS][R.PARTITION_ID])
        silent = sorted(set(nodes) - set(self.partition_of))
        if len(self.partition_of) < expected:
            raise ClientFailure(
                f"discovery: node(s) {', '.join(map(str, silent))} ({len(silent)} of {len(nodes)}) did not answer "
                f"within {time.monotonic() - started:.0f} s (runtime.discovery_timeout = {timeout:g}); a node whose "
                f"ClientApp cannot start in time never answers (see its SuperNode's log): raise "
                f"runtime.discovery_timeout, or run fewer nodes per machine")

    def _send_paced(self, messages: list[Message], window: int, deadline: float,
                    patience: float = 60.0) -> list[Message]:
        """`send_and_receive` with at most `window` messages awaiting a reply at a time, until
        all are answered or `deadline` (time.monotonic()) passes. A message unanswered for
        `patience` seconds stops counting against the window (its reply is still collected),
        so nodes that died cannot hold back the others."""
        waiting, pushed_at, replies = list(messages), {}, []
        while (waiting or pushed_at) and (now := time.monotonic()) < deadline:
            while waiting and sum(now - t < patience for t in pushed_at.values()) < window:
                pushed_at.update((i, now) for i in self.inner.push_messages([waiting.pop(0)]) if i)
            for reply in self.inner.pull_messages(list(pushed_at)):
                pushed_at.pop(reply.metadata.reply_to_message_id, None)
                replies.append(reply)
            if pushed_at:
                time.sleep(0.5)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        # Replies in partition order: Ray and a SuperLink return them in arrival order, and
        # float sums in aggregation depend on order, so this makes every runtime bit-identical.
        replies = sorted(self.inner.send_and_receive(messages, timeout=timeout),
                         key=lambda r: self.partition_of.get(r.metadata.src_node_id, -1))
        is_train = bool(messages) and messages[0].metadata.message_type == MessageType.TRAIN
        if is_train:
            answered = {r.metadata.reply_to_message_id for r in replies}
            lost = [m.metadata.dst_node_id for m in messages if m.metadata.message_id not in answered]
            for node in lost:
                log.warning("round %d: node %d (partition %s) did not reply; the round goes on without it",
                            self.current_round, node, self.partition_of.get(node, "?"))
            self._raise_errors(replies, f"round {self.current_round}", messages)
            for reply in replies:
                if not reply.has_error():
                    self.recorder.on_train_reply(R.plain(R.plain(reply.content)[R.METRICS]))
        return replies

    def _raise_errors(self, replies: list[Message], where: str, sent: list[Message] = ()) -> None:
        """A client's exception fails the run (or is skipped, by config); a node that the
        SuperLink reports unavailable is dropped from the round with a warning."""
        destination = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
        for reply in replies:
            if not reply.has_error():
                continue
            node = destination.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            reason = reply.error.reason.strip().splitlines()[-1] if reply.error.reason else "no reason given"
            text = f"node {node} (partition {self.partition_of.get(node, '?')}) failed in {where}: {reason}"
            if node != reply.metadata.src_node_id:  # the error comes from the SuperLink: node lost
                log.warning("%s; the round goes on without it", text)
            elif self.on_client_error == "fail":
                raise ClientFailure(text, reply.error.reason)
            else:
                log.warning("%s (skipped)", text)
                self.last_skipped = (text, reply.error.reason)
                if sent:
                    self.recorder.skipped_failures += 1


def evaluation_function(cfg: Config, recorder: RunRecorder):
    """Central evaluation after every round, which also writes the round: on the validation
    split (which selects the best round) and on the test split (the reported numbers)."""
    data = load_dataset(cfg.data, cfg.federation.num_clients, cfg.seed)
    model = build_model(cfg.model, data, cfg.seed, cfg.output.dir)
    device = resolve_device(cfg.runtime.device)
    x_test, y_test, x_val, y_val = data.x_test, data.y_test, data.x_val, data.y_val
    if device != "cpu":  # on the device once per run, not copied there every round
        x_test, y_test = as_tensors(x_test, y_test, data.task, device)
        if x_val is not None:
            x_val, y_val = as_tensors(x_val, y_val, data.task, device)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        R.load_record(model, arrays)
        result = evaluate(model, x_test, y_test, data.task, device)
        validation = evaluate(model, x_val, y_val, data.task, device) if x_val is not None else None
        if server_round > 0:
            recorder.on_round_end(server_round, result, validation)
        return MetricRecord(result)

    return model, evaluate_fn


def fedavg_kwargs(cfg: Config) -> dict:
    """FedAvg options shared by every strategy.

    The round's clients come from `fedsim.schedule.sample_round` (`SeededRounds` shows the
    strategy only them), and the strategy takes every node it is shown: exactly
    clients_per_round of them, or under Poisson sampling (``fraction_train`` = 1, at least 1
    node) however many were drawn. fedsim's discovery waits for all num_clients nodes before
    round 1 (Flower's round-1 race), and Flower's own wait asks only for the nodes shown, so a
    lost node never makes it wait forever (fedsim's grid raises a clear error instead when too
    few nodes are left); no federated evaluation,
    because fedsim evaluates the global model centrally on the held-out split.
    Under central DP the average is unweighted: with example weights a large client's
    influence would exceed C/K and the noise would no longer cover it.
    So is it under secure aggregation (`fedsim.secure_aggregation`).
    """
    # under secure aggregation too: the server learns a sum, to which every client adds once
    central_dp = cfg.privacy.user_noise_multiplier > 0 or cfg.privacy.secure_aggregation
    fed = cfg.federation
    poisson = client_sampling(cfg) == "poisson"
    k = 1 if poisson else fed.clients_per_round
    return dict(fraction_train=1.0 if poisson else fed.clients_per_round / fed.num_clients,
                min_train_nodes=k, min_available_nodes=k,
                fraction_evaluate=0.0, min_evaluate_nodes=0,
                weighted_by_key=R.UNIT_WEIGHT if central_dp else R.NUM_EXAMPLES)


def build_strategy(cfg: Config) -> Strategy:
    """The configured algorithm's strategy from the registry, wrapped in fedsim's user-level
    DP layer (`fedsim.central_dp`) when a user-level noise multiplier is set, or in the secure
    aggregation layer (`fedsim.secure_aggregation`, whose clients add that noise)."""
    algorithm = get_algorithm(cfg.strategy.name)
    strategy = algorithm.build(cfg.strategy.params, cfg, fedavg_kwargs(cfg))
    if cfg.privacy.secure_aggregation:  # the clients add the user-level noise; the server never sees an update
        return build_secure_aggregation(strategy, cfg)
    if cfg.privacy.user_noise_multiplier > 0:
        strategy = build_central_dp(strategy, cfg, algorithm)
    return strategy


class SeededRounds(Strategy):
    """Delegates to a strategy, seeding each round's random draws where the round starts.

    The round's clients are `fedsim.schedule.sample_round`'s in `sampling` mode (the schedule
    target-epsilon calibration plans with); the strategy sees only them and takes all. A
    Poisson round that drew no client sends nothing and its ``aggregate_train`` gets no
    replies; the inner strategy's ``configure_train`` is not called, except through a
    central-DP layer's ``prepare_empty_round``, which still releases (and the accountant still
    counts) that round's noised zero sum. Flower orders them
    with Python's `random`, a strategy may draw from numpy's global generator (fedsim's
    user-level DP layer draws from its own, seeded per round: `fedsim.central_dp`), and
    server-side torch draws (FedSVD's randomized SVD) use torch's. Seeding all three from
    (experiment seed, round) at the start of `configure_train` makes every round reproducible
    on its own, whatever ran before (a resumed run included), and tells the grid which round
    it is in.
    """

    def __init__(self, inner: Strategy, seed: int, grid: TrackedGrid, clients_per_round: int,
                 sampling: str = "fixed", num_clients: int | None = None) -> None:
        self.inner = inner
        self.seed = seed
        self.grid = grid
        self.clients_per_round = clients_per_round
        self.sampling = sampling
        self.num_clients = num_clients

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        random.seed(derive_seed(self.seed, server_round, "sample"))
        np.random.seed(derive_seed(self.seed, server_round, "server-noise"))
        # torch's global generator too (FedSVD's randomized SVD draws from it): then no
        # generator state carries over between rounds, and a checkpoint needs to store none
        torch.default_generator.manual_seed(derive_seed(self.seed, server_round, "server-torch"))
        self.grid.current_round = server_round
        # The clients come from fedsim.schedule, the function target-epsilon calibration reads.
        chosen = sample_round(self.seed, server_round, grid.get_node_ids(), self.clients_per_round,
                              self.sampling, self.num_clients)
        if not chosen:
            log.info("round %d: Poisson client sampling drew no client; the round trains nothing", server_round)
            prepare = getattr(self.inner, "prepare_empty_round", None)
            if prepare is not None:  # central DP: the round's noise is still released (and accounted)
                placeholder = list(grid.get_node_ids())[:1]
                prepare(server_round, arrays, config, SampledGrid(grid, placeholder))
            return []
        return self.inner.configure_train(server_round, arrays, config, SampledGrid(grid, chosen))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        return self.inner.aggregate_evaluate(server_round, replies)


def server_main(grid: Grid, context: Context, *, progress: bool = True, config_text: str | None = None,
                resume: Checkpoint | None = None, secure_protocol: bool = False) -> RunRecorder:
    """Run the experiment of `context` on `grid`; `resume` continues from a checkpoint (the
    in-process runtime only: it is the one whose node states a checkpoint can hold).
    `secure_protocol`: the grid's nodes run fedsim's ClientApp (a deployment), so that
    ``privacy.secure_aggregation`` runs Flower's SecAgg+ protocol rather than its simulation."""
    cfg = config_from_context(context, config_text)
    recorder = RunRecorder(cfg, Path(cfg.output.dir or "runs/deployed"), progress=progress,
                           restored=resume.recorder if resume is not None else None,
                           secure_protocol=secure_protocol and cfg.privacy.secure_aggregation)
    # set by `fedsim deploy local`, whose nodes share this machine's CPUs (fedsim.deploy)
    window = int(context.run_config.get(R.DISCOVERY_WINDOW_KEY) or 0) or None
    with run_log(recorder.out_dir):
        _run_rounds(cfg, grid, recorder, window, resume)
    return recorder


def _run_rounds(cfg: Config, grid: Grid, recorder: RunRecorder, discovery_window: int | None = None,
                resume: Checkpoint | None = None) -> None:
    """Discovery, then the rounds: fedsim drives the loop of Flower's `Strategy.start` itself
    (configure_train, send, aggregate_train, configure/aggregate_evaluate, central
    evaluation), so that a resumed run starts at the round after its checkpoint and a
    checkpoint is written between rounds. The model is saved when the last round is done."""
    tracked = TrackedGrid(grid, recorder, cfg.runtime.on_client_error, cfg.federation.clients_per_round)
    status, error = "failed", None
    try:
        spec = data_spec(load_dataset(cfg.data, cfg.federation.num_clients, cfg.seed))
        config_text = dumps_toml(cfg)  # what discovery hands the nodes, and every checkpoint keeps
        tracked.discover(cfg.federation.num_clients, cfg.runtime.discovery_timeout, config_text, spec,
                         discovery_window)
        model, evaluate_fn = evaluation_function(cfg, recorder)
        strategy = SeededRounds(build_strategy(cfg), cfg.seed, tracked, cfg.federation.clients_per_round,
                                client_sampling(cfg), cfg.federation.num_clients)
        log_settings(cfg, strategy)
        recorder.engine = _engine_record(cfg, model, grid)
        can_checkpoint = _checkpoints_possible(cfg, grid, strategy)
        arrays = R.model_to_record(model)
        first = 1
        if resume is not None:
            if not can_checkpoint:
                raise ConfigError("--resume: this run cannot restore its state (see run.log)")
            arrays = R.numpy_to_record(resume.arrays)
            load_strategy_state(strategy, resume.strategy)
            grid.restore_node_states(resume.nodes)  # type: ignore[attr-defined]
            first = resume.round + 1
            log.info("resumed after round %d of %d from %s", resume.round, cfg.federation.rounds,
                     checkpoint_path(recorder.out_dir))
        every = cfg.output.checkpoint_every
        node_memo: NodeMemo = {}  # nodes that did not train since the last checkpoint are not re-encoded
        for server_round in range(first, cfg.federation.rounds + 1):
            if recorder.secure_protocol:
                arrays = _secure_round(strategy, tracked, recorder, server_round, arrays, cfg)
            else:
                arrays = _train_round(strategy, tracked, recorder, server_round, arrays, cfg.runtime.round_timeout)
            evaluate_fn(server_round, arrays)  # loads `arrays` into `model` and writes the round
            if cfg.output.keep_best and recorder.best_row().get("round") == server_round:
                save_model(recorder.out_dir / MODEL_BEST, model, model_meta(cfg, spec, server_round))
            if can_checkpoint and every and server_round % every == 0 and server_round < cfg.federation.rounds:
                save_checkpoint(recorder.out_dir, Checkpoint(
                    server_round, config_text, R.record_to_numpy(arrays), strategy_state(strategy),
                    {node: _kept_state(state) for node, state in grid.node_states().items()},  # type: ignore
                    recorder.state()), node_memo, recorder.writer.write)
        R.load_record(model, arrays)
        save_model(recorder.out_dir / MODEL, model, model_meta(cfg, spec, cfg.federation.rounds))
        status = "finished"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except Diverged as exc:
        status, error = "diverged", str(exc)
        raise
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        recorder.close(status, error)
    checkpoint_path(recorder.out_dir).unlink(missing_ok=True)  # finished: model.safetensors is the result


def _engine_record(cfg: Config, model: torch.nn.Module, grid: Grid) -> dict:
    """Which engine trains this run's clients (for summary.json and run.log): ``auto`` resolved,
    so a result says what produced it."""
    rule = get_algorithm(cfg.strategy.name).client
    engine, why = engine_used(cfg.runtime.engine, model, rule)
    if why is None:
        together = getattr(grid, "train_round", None) is not None  # the in-process grid batches a round
        log.info("engine: vectorized, %s", "a round's clients trained together" if together
                 else "one client per message (this runtime delivers them one at a time)")
    elif cfg.runtime.engine == "opacus":
        log.info("engine: opacus, as runtime.engine asks")
    else:  # auto fell back
        log.info("engine: Opacus, one client at a time (%s)", why)
    return {"requested": cfg.runtime.engine, "used": engine, **({"why": why} if why else {})}


def _train_round(strategy: Strategy, grid: TrackedGrid, recorder: RunRecorder, server_round: int,
                 arrays: ArrayRecord, timeout: float) -> ArrayRecord:
    """One round of `Strategy.start`'s loop; the new global arrays. A round in which clients
    were sent work but none trained fails the run, whatever the error policy: skipping every
    client would otherwise finish a run that learned nothing. A Poisson round that drew no
    client sends nothing and goes on (`SeededRounds`)."""
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    replies = grid.send_and_receive(messages, timeout=timeout) if messages else []
    if messages and recorder.trained_this_round == 0:
        skipped = grid.last_skipped
        text = f"round {server_round}: no client trained"
        if skipped is not None:
            text += f" (every reply was an error, skipped by runtime.on_client_error; last: {skipped[0]})"
        raise ClientFailure(text, skipped[1] if skipped is not None else None)
    aggregated, _ = strategy.aggregate_train(server_round, replies)
    if aggregated is not None:  # as in Flower's loop: nothing aggregated keeps the model
        arrays = aggregated
    evaluate_replies = grid.send_and_receive(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid),
                                             timeout=timeout)
    strategy.aggregate_evaluate(server_round, evaluate_replies)
    return arrays


def _secure_round(strategy: Strategy, grid: TrackedGrid, recorder: RunRecorder, server_round: int,
                  arrays: ArrayRecord, cfg: Config) -> ArrayRecord:
    """One round through Flower's SecAgg+ protocol (`fedsim.secure_aggregation`); the
    contributing clients' metrics are recorded as replies are in `_train_round`."""
    arrays, metrics = secure_train_round(strategy, grid, server_round, arrays, cfg)
    for values in metrics:
        recorder.on_train_reply(values)
    evaluate_replies = grid.send_and_receive(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid),
                                             timeout=cfg.runtime.round_timeout)
    strategy.aggregate_evaluate(server_round, evaluate_replies)
    return arrays


# Node-state records that discovery sends again in every run (the experiment TOML, the data
# spec): a checkpoint leaves them out.
_DISCOVERY_RECORDS = (R.CLIENT_STATE, R.DATA_SPEC)


def _kept_state(state: RecordDict) -> dict:
    """A node's records a checkpoint keeps, as a plain dict (read through `R.plain`: Flower's
    Mapping view and a new RecordDict per node per round cost more than the rest of a checkpoint)."""
    return {k: v for k, v in R.plain(state).items() if k not in _DISCOVERY_RECORDS}


def _checkpoints_possible(cfg: Config, grid: Grid, strategy: Strategy) -> bool:
    """Whether this run can write (and resume from) checkpoints; if not, run.log says why."""
    if cfg.output.checkpoint_every == 0:
        log.info("checkpoints: off (output.checkpoint_every = 0)")
        return False
    if not hasattr(grid, "node_states"):
        log.info("checkpoints: off (runtime %s keeps the nodes' state where fedsim cannot save it; "
                 "the in-process runtime can)", cfg.runtime.name)
        return False
    if stateful_strategy(strategy) is None:
        log.warning("checkpoints: off (strategy %s does not expose its state: state_dict / load_state_dict)",
                    cfg.strategy.name)
        return False
    log.info("checkpoints: every %d round(s) to %s", cfg.output.checkpoint_every, checkpoint_path(cfg.output.dir))
    return True


def _flower_summary(strategy: Strategy) -> list[str]:
    """The lines `strategy.summary()` logs through Flower's logger, caught without showing them."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage().replace("\t", " ").rstrip())

    flwr_log = logging.getLogger("flwr")
    saved = flwr_log.handlers[:], flwr_log.level, flwr_log.propagate
    flwr_log.handlers, flwr_log.propagate = [Collect(logging.INFO)], False
    flwr_log.setLevel(logging.INFO)
    try:
        strategy.summary()
    finally:
        flwr_log.handlers, flwr_log.propagate = saved[0], saved[2]
        flwr_log.setLevel(saved[1])
    return [line for line in lines if line.strip()]


def log_settings(cfg: Config, strategy: Strategy) -> None:
    """The resolved settings, at the top of run.log: the key config values and the strategy's
    own `summary()` (config.toml beside it has every key)."""
    fed, c, p, rt, d = cfg.federation, cfg.client, cfg.privacy, cfg.runtime, cfg.data
    knobs = {"dirichlet": f" (alpha {d.alpha:g})", "shard": f" ({d.classes_per_client} classes a client)",
             "pathological": f" ({d.classes_per_client} classes a client)",
             "iid-mix": f" (iid_fraction {d.iid_fraction:g}, {d.classes_per_client} classes)",
             "quantity": f" (power {d.quantity_power:g})"}
    log.info("run %s: seed %d; data %s, partitioner %s%s; model %s", cfg.name, cfg.seed, d.dataset,
             d.partitioner, knobs.get(d.partitioner, ""), cfg.model.name)
    log.info("federation: %d clients, %d per round, %d rounds, %s client sampling; local: %s, batch %d, lr %g, "
             "momentum %g", fed.num_clients, fed.clients_per_round, fed.rounds, client_sampling(cfg),
             f"{c.local_steps} steps" if c.local_steps else f"{c.local_epochs} epoch(s)", c.batch_size, c.lr,
             c.momentum)
    log.info("privacy: noise_multiplier %g, max_grad_norm %g, delta %g, accountant %s, user_noise_multiplier %g",
             p.noise_multiplier, p.max_grad_norm, p.delta, p.accountant, p.user_noise_multiplier)
    if p.noise_multiplier > 0:
        log.info("epsilon, sample level: per client at delta %g, %s, Poisson batches and realized participations; "
                 "the rounds' sample_eps_max is the largest client's", p.delta, accountant_label(p.accountant))
    if p.user_noise_multiplier > 0:
        log.info("epsilon, user level: at delta %g, %s", p.delta,
                 user_accountant_label(p.accountant, client_sampling(cfg), user_mechanism(cfg),
                                       user_accounting_args(cfg)["restart_every"]))
    log.info("runtime %s, engine %s, device %s, on_client_error %s", rt.name, rt.engine, rt.device,
             rt.on_client_error)
    algorithm = get_algorithm(cfg.strategy.name)
    log.info("strategy %s (%s): %s", cfg.strategy.name, algorithm.summary, cfg.strategy.params)
    for line in _flower_summary(strategy):
        log.info("  %s", line)

