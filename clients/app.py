"""fedsim's ClientApp: one handler per message type, the same in simulation and deployment.

A node learns which data it holds from ``context.node_config`` (``partition-id``, or
``data-path`` for a real data holder) and everything else from the experiment config in
``context.run_config`` (or, on a SuperNode, from what the server sent at discovery). What
to train and how comes from the algorithm's `ClientRule`, looked up in the registry by
``strategy.name``: this module names no algorithm.

A train message goes through three steps, so that a runtime holding a whole round of
messages can train them together (the vectorized engine) and still build the same replies:
`prepare_job` (message + node state -> a `ClientJob`), an engine (`run_job` here: Opacus,
one client), and `finish_job` (result -> reply, node state saved).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import traceback
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim.clients.trainer import train_local
from fedsim.clients.vectorized import (VectorClient, VectorOutcome, release_scratch, train_clients,
                                       unsupported_reason)
from fedsim import records as R
from fedsim.caches import Key, cached, frozen
from fedsim.algorithms import (ClientRule, Hyper, LocalResult, LocalTask, RoundStart, State, Tensors,
                               TrainSettings, get_algorithm, resolve_device)
from fedsim.config import Config
from fedsim.datasets import Dataset
from fedsim.errors import ConfigError, FedsimError
from fedsim.experiment import config_from_context, derive_seed, experiment_text
from fedsim.lora import select_keys, set_trainable
from fedsim.threads import apply_run_threads
from fedsim.models import as_tensors, build_model
from fedsim.node_data import node_data, node_dataset, node_partition_id
from fedsim.privacy.accounting import History, epsilon
from fedsim.privacy.canaries import planted_canaries
from fedsim.privacy.client_clipping import clip_own_update
from fedsim.privacy.secure_noise import is_secret
from fedsim.privacy.secagg import secagg_mod
from fedsim.startup import startup_probe


def query(msg: Message, context: Context, config_text: str | None = None) -> Message:
    """Discovery: the server asks which partition this node holds, to sample reproducibly,
    and hands over the experiment, which this node keeps for the rounds to come."""
    sent = R.plain(R.record_of(msg.content, R.CONFIG, ConfigRecord) or ConfigRecord()).get(R.RUN_CONFIG_KEY)
    state = R.plain(context.state)  # str keys, records: Flower's per-item check cannot fail
    if sent:
        state[R.CLIENT_STATE] = R.trusted(ConfigRecord, {R.RUN_CONFIG_KEY: sent})
    spec = R.record_of(msg.content, R.DATA_SPEC, ConfigRecord)
    if spec is not None:
        state[R.DATA_SPEC] = spec
    pid = node_partition_id(context.node_config)
    return R.reply_to(msg, R.trusted(RecordDict, {R.METRICS: R.trusted(MetricRecord, {R.PARTITION_ID: int(pid)})}))


def load_history(context: Context) -> History:
    rec = R.record_of(context.state, R.ACCOUNTANT_STATE, ConfigRecord)
    if rec is None:
        return []
    values = R.plain(rec)
    return list(zip(values["sigma"], values["q"], values["steps"]))


def save_history(context: Context, history: History) -> None:
    # straight into the state's dict (`R.plain`): a trusted record of str keys needs no re-check
    R.plain(context.state)[R.ACCOUNTANT_STATE] = R.trusted(ConfigRecord, {
        "sigma": [float(h[0]) for h in history], "q": [float(h[1]) for h in history],
        "steps": [int(h[2]) for h in history]})


def settings_for(cfg: Config, task: str) -> TrainSettings:
    c, p = cfg.client, cfg.privacy
    return TrainSettings(task=task, local_epochs=c.local_epochs, local_steps=c.local_steps,
                         batch_size=c.batch_size, lr=c.lr, momentum=c.momentum,
                         noise_multiplier=p.noise_multiplier, max_grad_norm=p.max_grad_norm,
                         device=resolve_device(cfg.runtime.device),
                         secure_noise=is_secret(p.secure_noise))


@dataclass
class ClientJob:
    """One client's round, prepared from its message and node state, engine-independent."""

    msg: Message
    context: Context
    cfg: Config
    partition_id: int
    server_round: int
    data: Dataset
    x: np.ndarray
    y: np.ndarray
    model: torch.nn.Module
    rule: ClientRule
    settings: TrainSettings
    seed: int
    history: History
    start: RoundStart
    state: State
    upload_keys: list[str]  # the state-dict keys of the reply's arrays (the rule's `upload` group)
    node_key: Hashable = None  # what this node's inputs are cached under (`node_inputs`)
    # a white-box audit's gradient canaries this client holds, and their draws' seed (`fedsim.audit`)
    canaries: dict[str, torch.Tensor] | None = None
    canary_seed: int = 0


# The client side's caches, in `fedsim.caches` (one mechanism, `clear_all`), keyed on the
# experiment's TOML text (the whole experiment, calibrated sigma included) and the node's own
# config: a new experiment, or the same node config under another, never reads stale inputs.
# `release_run` empties them when a run ends (a run's client data, on a GPU too).

def node_key(text: str, node_config: Mapping, spec: ConfigRecord | None) -> Hashable:
    """What a node's inputs are determined by: the experiment, its node config (partition or
    data file) and, for a data holder, the data spec the server sent."""
    return text, frozen(dict(node_config)), frozen(R.plain(spec)) if spec is not None else None


def node_inputs(cfg: Config, context: Context, text: str) -> tuple[Hashable, Dataset, np.ndarray, np.ndarray]:
    """This node's key (`node_key`), dataset view and local (x, y), computed once per experiment.

    Read on every client-round, so a node's answer is remembered with what it came from
    (`_node_memo`): taking the key anew (`frozen` over the node config and the data spec,
    then hashing it) cost 75 us a client-round on the digits workload, more than training.
    The memo is trusted only while the node config and spec are the very objects it saw,
    holding what they held then (two dict comparisons, most values by identity), under the
    same experiment text: a record mutated or replaced, or another experiment, takes the key
    anew, as every call did before."""
    spec = R.record_of(context.state, R.DATA_SPEC, ConfigRecord)
    node_config = context.node_config
    memo = _node_memo(id(node_config), id(spec))
    if memo:
        config_seen, config_then, spec_seen, spec_then, found = memo
        if (config_seen is node_config and spec_seen is spec and found[0][0] == text
                and config_then == node_config and (spec is None or spec_then == R.plain(spec))):
            return found
    key = node_key(text, node_config, spec)
    found = (key, *_node_inputs(Key(key, payload=(cfg, node_config, spec))))
    # the memo holds the objects themselves, so their ids stay theirs while it holds them
    memo[:] = [node_config, copy.deepcopy(dict(node_config)), spec,
               copy.deepcopy(dict(R.plain(spec))) if spec is not None else None, found]
    return found


@cached(maxsize=4096)  # one per node, as `_node_inputs`
def _node_memo(node_config_id: int, spec_id: int) -> list:
    """The last `node_inputs` answer for this node config and data spec (by identity), with
    copies of what they held then: filled and checked by `node_inputs`."""
    return []


@cached(maxsize=4096)  # one per node: the in-process runtime holds a whole federation in one process
def _node_inputs(key: Key) -> tuple[Dataset, np.ndarray, np.ndarray]:
    cfg, node_config, spec = key.payload
    data = node_dataset(cfg, node_config, spec)
    return (data, *node_data(cfg, node_config, data))


@cached(maxsize=4)
def spare_models(text: str) -> list[torch.nn.Module]:
    """A pool of at most one model per experiment: the last vectorized round's shared model,
    which the engine never changed and the next round takes instead of building one (all its
    arrays are replaced from the message; building anew cost 0.4 ms a round). A list, not
    the model, because a job takes it (Opacus trains in place) and the round gives it back."""
    return []


@cached(maxsize=4096)  # one per node and device, as `_node_inputs`
def _device_inputs(key: Key) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, task = key.payload
    return as_tensors(x, y, task, key.value[1])


@dataclass
class RoundTemplate:
    """What every client of a round shares when they start from the same arrays: one model
    (read-only under the vectorized engine), its trainable tensors, the server's extra arrays."""

    model: torch.nn.Module
    global_params: dict[str, torch.Tensor]
    server_arrays: dict[str, torch.Tensor]
    upload_keys: list[str]
    cfg: Config | None = None  # the experiment the settings below were derived from
    settings: TrainSettings | None = None
    hyper: Hyper | None = None


def prepare_job(msg: Message, context: Context, config_text: str | None = None,
                template: RoundTemplate | None = None) -> ClientJob:
    """A train message and its node's state as a `ClientJob`. With `template`, the job shares
    the template's model instead of building its own (the vectorized engine never changes it)."""
    text = experiment_text(context, config_text)
    cfg = config_from_context(context, config_text)
    if template is None or template.cfg is not cfg:  # the round's first job set them for the others
        apply_run_threads(cfg.runtime)  # a SuperNode's process sums as its simulation does
    server_cfg = R.record_of(msg.content, R.CONFIG, ConfigRecord)
    server_round = int(R.plain(server_cfg).get(R.SERVER_ROUND, 0)) if server_cfg is not None else 0
    pid = node_partition_id(context.node_config)
    key, data, x, y = node_inputs(cfg, context, text)
    plan = planted_canaries()
    examples = plan.examples_held_by(pid) if plan is not None else None
    if examples is not None:  # a black-box audit's canary examples: from here on ordinary samples
        x, y = np.concatenate([x, examples[0]]), np.concatenate([y, examples[1].astype(y.dtype)])
        key = (key, "canary-examples")  # the device copy of this node's data (`_on_device`) holds them
    rule = get_algorithm(cfg.strategy.name).client
    if template is None:
        pool = spare_models(text)
        model = pool.pop() if pool else build_model(cfg.model, data, cfg.seed, cfg.output.dir)
        R.load_record(model, msg.content[R.ARRAYS])
        set_trainable(model, rule.trainable)
        extra = msg.content.get(R.ALGORITHM_ARRAYS)
        template = RoundTemplate(
            # on the CPU, as RoundStart promises: last round's model may sit on the training device
            model, {k: p.detach().to("cpu", copy=True) for k, p in model.named_parameters() if p.requires_grad},
            R.record_to_tensors(extra) if extra is not None else {}, select_keys(model, rule.upload))
    if template.cfg is cfg:  # the round's other clients: the same experiment, the same settings
        settings, hyper = template.settings, template.hyper
    else:
        settings = settings_for(cfg, data.task)
        hyper = Hyper(params=cfg.strategy.params, lr=settings.lr, private=settings.noise_multiplier > 0)
    sigmas = cfg.privacy.client_noise_multipliers
    if sigmas and sigmas[pid] != settings.noise_multiplier:  # per-client calibration: this client's own sigma
        settings = dataclasses.replace(settings, noise_multiplier=sigmas[pid])
    kept = R.record_of(context.state, R.ALGORITHM_STATE, ArrayRecord)
    model = template.model
    start = RoundStart(hyper=hyper, global_params=template.global_params, server_arrays=template.server_arrays,
                       node_state=R.record_to_tensors(kept) if kept is not None else {})
    state = rule.setup(start) if rule.setup is not None else {}
    return ClientJob(msg, context, cfg, pid, server_round, data, x, y, model, rule, settings,
                     derive_seed(cfg.seed, server_round, pid, "train"), load_history(context), start, state,
                     template.upload_keys, key, plan.held_by(pid) if plan is not None else None,
                     derive_seed(cfg.seed, server_round, pid, "canaries"))


def local_task(job: ClientJob) -> LocalTask:
    """The job as a rule with its own local loop sees it."""
    return LocalTask(job.model, job.x, job.y, job.settings, job.start.hyper, job.partition_id,
                     job.seed, job.cfg.seed, job.cfg.privacy.delta, job.data.num_classes)


def run_job(job: ClientJob, batches: list[np.ndarray] | None = None) -> LocalResult:
    """Train one job with the Opacus engine (or the rule's own loop)."""
    startup_probe()
    rule, hyper = job.rule, job.start.hyper
    if rule.local_train is not None:
        return rule.local_train(local_task(job))
    loss_term = post_step = None
    if rule.loss_term is not None:
        def loss_term(out, mask, state):
            return rule.loss_term(out, mask, state, hyper)
    if rule.post_step is not None:
        def post_step(new, old, state):
            return rule.post_step(new, old, state, hyper)
    return train_local(job.model, job.x, job.y, job.settings, job.history, seed=job.seed,
                       loss_term=loss_term, post_step=post_step, rule_state=job.state, batches=batches,
                       canaries=job.canaries, canary_seed=job.canary_seed)


def finish_job(job: ClientJob, result: LocalResult, final: dict[str, torch.Tensor] | None = None,
               arrays: ArrayRecord | None = None) -> Message:
    """The reply of a trained job; saves the accountant history and the rule's node state.

    `final` (trainable tensors after training, from the vectorized engine) is read from the
    job's model unless given; `arrays`, the reply's model record, is built from them unless
    given (`reply_arrays` builds a round's at once).
    """
    context, cfg = job.context, job.cfg
    if arrays is None and final is None:
        arrays = R.model_to_record(job.model, job.upload_keys)
    elif arrays is None:
        (arrays,) = reply_arrays([job], [VectorOutcome(result, final)])
    save_history(context, result.history)
    private = job.settings.noise_multiplier > 0
    eps = epsilon(result.history, cfg.privacy.delta, cfg.privacy.accountant) if private else math.inf
    content = R.trusted(RecordDict, {
        R.ARRAYS: arrays,
        R.METRICS: R.trusted(MetricRecord, {
            R.NUM_EXAMPLES: int(result.num_examples), R.UNIT_WEIGHT: 1.0, R.PARTITION_ID: int(job.partition_id),
            R.EPSILON: float(eps) if math.isfinite(eps) else -1.0,  # -1 = no DP (MetricRecord is finite-only)
            # -1 = no loss to report: every Poisson batch was empty (MetricRecord takes no NaN), or
            # secure aggregation, whose server is not trusted with anything but the sum: a client's
            # training loss is a function of its data that no noise covers, so it is withheld
            R.TRAIN_LOSS: (float(result.mean_loss) if math.isfinite(result.mean_loss)
                           and not cfg.privacy.secure_aggregation else -1.0),
            R.LOCAL_STEPS: int(result.steps),
            R.SAMPLE_RATE: float(result.sample_rate)}),
    })
    if job.rule.finish is not None:
        if final is None:
            final = {k: p.detach().cpu() for k, p in job.model.named_parameters() if p.requires_grad}
        extra_arrays, node_state = job.rule.finish(job.start, job.state, final, result.steps, job.start.hyper)
        if extra_arrays:
            content[R.ALGORITHM_ARRAYS] = tensors_to_record(extra_arrays, "reply arrays")
        if node_state:  # {} keeps the node's previous state (`ClientRule.finish`)
            R.plain(context.state)[R.ALGORITHM_STATE] = tensors_to_record(node_state, "node state")
    clip_own_update(content, job.msg.content)  # privacy.user_clipping = "client"; else nothing
    return R.reply_to(job.msg, content)


def tensors_to_record(tensors: Tensors, what: str) -> ArrayRecord:
    """What a rule's `finish` returned (flat dicts of tensors) as the ArrayRecord a reply or the
    node's Flower state holds; `RoundStart` hands node state back as tensors (`prepare_job`)."""
    arrays = {}
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"ClientRule.finish: {what}[{name!r}] must be a torch.Tensor (got {type(value).__name__})")
        arrays[name] = value.detach().cpu().numpy()
    return R.numpy_to_record(arrays)


def reply_arrays(jobs: list[ClientJob], outcomes: list[VectorOutcome]) -> list[ArrayRecord | None]:
    """The reply model records of jobs trained together (one template model, one rule), built a
    tensor at a time: the clients' trained tensors stacked, then one `R.stacked_to_arrays`
    per tensor. A tensor the engine did not train (frozen, yet uploaded) comes from the shared
    model. None where a job's outcome lacks a trained tensor the others have: `finish_job`
    builds that one's record alone (a batch of one, the same code)."""
    keys = jobs[0].upload_keys
    trained = [k for k in keys if all(k in o.final for o in outcomes)]
    if any(set(o.final) & set(keys) != set(trained) for o in outcomes):
        return [None] * len(jobs)
    # each client's row as it came (a view of its chunk's stack): no re-stacking before the copy into bytes
    columns = {k: R.stacked_to_arrays([o.final[k].numpy() for o in outcomes]) for k in trained}
    untrained = jobs[0].model.state_dict() if len(trained) < len(keys) else {}
    for k in keys:
        if k not in columns:
            values = untrained[k].detach().cpu().numpy()
            columns[k] = [R.to_array(values) for _ in jobs]
    return [R.trusted(ArrayRecord, {k: columns[k][i] for k in keys}) for i in range(len(jobs))]


def train(msg: Message, context: Context, config_text: str | None = None) -> Message:
    """One train message (Ray, a SuperNode): the vectorized engine with one client where it can
    run, else Opacus. Each client draws from its own generators, seeded by (seed, round,
    partition), so a client trains exactly as it does in an in-process round of many."""
    job = prepare_job(msg, context, config_text)
    if choose_engine(job.cfg.runtime.engine, job.model, job.rule) == "vectorized":
        (outcome,) = run_vectorized([job])
        return finish_job(job, outcome.result, outcome.final)
    return finish_job(job, run_job(job))


def engine_used(wanted: str, model: torch.nn.Module, rule: ClientRule) -> tuple[str, str | None]:
    """The engine that trains this model and rule, and why it is not the vectorized one (None
    when it is). The same in every runtime: the in-process grid trains a round's messages
    together, Ray and SuperNodes one message at a time."""
    if wanted == "opacus":
        return "opacus", "runtime.engine = 'opacus'"
    reason = unsupported_reason(model, rule)
    return ("vectorized", None) if reason is None else ("opacus", reason)


def choose_engine(wanted: str, model: torch.nn.Module, rule: ClientRule) -> str:
    """``runtime.engine`` resolved for a model and rule: ``auto`` is vectorized unless they
    cannot be; an explicit ``vectorized`` that cannot run is a `ConfigError` (`fedsim.run.prepare`
    asks this before any work). Each run's run.log says which engine it used and why
    (`fedsim.server`)."""
    engine, reason = engine_used(wanted, model, rule)
    if wanted == "vectorized" and engine != "vectorized":
        raise ConfigError(f"runtime.engine: vectorized cannot train this experiment: {reason}; "
                          f"use runtime.engine = 'auto' or 'opacus'")
    return engine


def release_run() -> None:
    """Forget what the in-process runtime kept between a run's rounds: nodes' inputs (on the
    host and the device), the spare model and the engine's round buffers
    (`vectorized.release_scratch`)."""
    for cache in (_node_memo, _node_inputs, spare_models, _device_inputs):
        cache.cache_clear()
    release_scratch()


def _error_reply(msg: Message) -> Message:
    return Message(Error(code=500, reason=traceback.format_exc()), reply_to=msg)


def train_round(pairs: list[tuple[Message, Context]], config_text: str | None = None) -> list[Message]:
    """Train a round's train messages together: what the in-process runtime calls.

    Jobs that can run vectorized and start from the same arrays train in one batched
    computation (`clients.vectorized`); the rest go through Opacus one at a time. Every
    message gets an ordinary reply, in order; a client that raises gets an error reply
    carrying its traceback (a `FedsimError`, bad input, propagates as it is).
    """
    replies: list[Message | None] = [None] * len(pairs)
    groups: dict[int, list[tuple[int, ClientJob]]] = {}
    engines: dict[int, str] = {}  # chosen once per set of arrays sent (the same model and rule)
    templates: dict[int, RoundTemplate] = {}  # clients sent the same arrays share one model
    for i, (msg, context) in enumerate(pairs):
        try:
            key = id(R.plain(msg.content).get(R.ARRAYS))  # what `prepare_job` loads (Flower's checked view: 2 us)
            job = prepare_job(msg, context, config_text, templates.get(key))
            if key not in engines:
                engines[key] = choose_engine(job.cfg.runtime.engine, job.model, job.rule)
            if engines[key] == "opacus":
                replies[i] = finish_job(job, run_job(job))
            else:
                if key not in templates:  # the round's first job built it; the others share it
                    templates[key] = RoundTemplate(job.model, job.start.global_params, job.start.server_arrays,
                                                   job.upload_keys, job.cfg, job.settings, job.start.hyper)
                groups.setdefault(key, []).append((i, job))
        except FedsimError:
            raise
        except Exception:  # noqa: BLE001 - one client's failure is its reply, as in the ClientApp
            replies[i] = _error_reply(msg)
    for members in groups.values():
        jobs = [job for _, job in members]
        try:
            outcomes = run_vectorized(jobs)
            for (i, job), outcome, arrays in zip(members, outcomes, reply_arrays(jobs, outcomes)):
                replies[i] = finish_job(job, outcome.result, outcome.final, arrays)
            # the engine never changes the shared model: the next round's template
            spare_models(experiment_text(jobs[0].context, config_text))[:] = [jobs[0].model]
        except FedsimError:
            raise
        except Exception:  # noqa: BLE001 - the batch failed: every client in it reports the error
            for i, job in members:
                replies[i] = _error_reply(job.msg)
    return replies  # type: ignore[return-value]


def _on_device(job: ClientJob) -> tuple:
    """A client's data on the accelerator, copied there once per run (pfl-research's trick: the
    host-to-device copies, not the training, would otherwise bound a round on a GPU)."""
    device = job.settings.device
    if not device.startswith("cuda") or job.partition_id < 0:
        return job.x, job.y
    return _device_inputs(Key((job.node_key, device), payload=(job.x, job.y, job.settings.task)))


def run_vectorized(jobs: list[ClientJob], batches=None) -> list[VectorOutcome]:
    """Train jobs that start from the same arrays with the vectorized engine (or the rule's
    own batched loop, `ClientRule.local_train_batched`)."""
    startup_probe()
    first = jobs[0]
    if first.rule.local_train_batched is not None:
        if batches is not None:
            raise ValueError("run_vectorized: given batches are for the DP-SGD loop, not a rule's own loop")
        done = first.rule.local_train_batched([local_task(job) for job in jobs], first.cfg.runtime.engine_chunk)
        return [VectorOutcome(result, final) for result, final in done]
    clients = [VectorClient(*_on_device(job), job.history, job.seed, job.state, job.canaries, job.canary_seed,
                            job.settings.noise_multiplier) for job in jobs]
    return train_clients(first.model, first.rule, first.start.hyper, first.settings, clients,
                         chunk=first.cfg.runtime.engine_chunk, batches=batches)


def make_client_app(config_text: str | None = None) -> ClientApp:
    """The ClientApp. `config_text` is the experiment TOML for runtimes that deliver no
    run config (Flower's `run_simulation`); `flwr run` and the in-process grid deliver it."""
    client_app = ClientApp()

    @client_app.query()
    def _query(msg: Message, context: Context) -> Message:
        return query(msg, context, config_text)

    @client_app.train(mods=[secagg_mod])  # Flower's SecAgg+ when the server runs it; else a no-op
    def _train(msg: Message, context: Context) -> Message:
        return train(msg, context, config_text)

    return client_app


app = make_client_app()  # what `[tool.flwr.app.components] clientapp` points at
