"""What every registered algorithm must do, checked for each name in `algorithm_names()`:
a new algorithm is covered by its registry line, with no test list to edit.

* the two engines agree at sigma = 0 on identical draws, over two rounds (so node state and
  the server's extra arrays are exercised): the trained tensors, the replies and the kept
  node state (1e-5);
* a SIGKILLed run resumes bit for bit (one algorithm per engine here; every algorithm
  under both engines in the slow tier);
* the strategy's declared state round-trips through a checkpoint file and the strategy
  continues exactly, and any state it declares makes a difference;
* the strategy's `summary()` names every key of its params table;
* a bad value for every key of the table, and an unknown key, are refused at the CLI with
  exit code 2 and one line.

Each algorithm runs in the first world of `conftest.WORLDS` it accepts.
"""

from __future__ import annotations

import dataclasses
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedsim import records as R
from fedsim.algorithms import get_algorithm, load_strategy_state, strategy_state
from fedsim.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedsim.clients.app import engine_used, finish_job, prepare_job, run_job, run_vectorized
from fedsim.datasets import load_dataset
from fedsim.experiment import run_config_for
from fedsim.models import build_model
from fedsim.privacy.accounting import poisson_sample_rate
from fedsim.runtime.inprocess import assign_message_id
from fedsim.server import _flower_summary, build_strategy
from tests.conformance.conftest import ALGORITHMS
from tests.conftest import FakeGrid

REPO = Path(__file__).resolve().parents[2]
ATOL = 1e-5


def initial_arrays(cfg) -> ArrayRecord:
    data = load_dataset(cfg.data, cfg.federation.num_clients, cfg.seed)
    return R.model_to_record(build_model(cfg.model, data, cfg.seed, cfg.output.dir))


def sent_content(strategy, server_round: int, arrays: ArrayRecord, num_clients: int) -> RecordDict:
    """What the strategy's train messages of a round carry (they share one RecordDict)."""
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid(num_clients)))
    return messages[0].content


# ----------------------------------------------------------------------------- engines agree

def _jobs(cfg, content: RecordDict, contexts: dict[int, Context], server_round: int):
    jobs = []
    for pid, ctx in contexts.items():
        msg = Message(content, 1000 + pid, "train")
        assign_message_id(msg, f"m{server_round}-{pid}")
        job = prepare_job(msg, ctx)
        # sigma = 0 through Opacus' per-sample clipping, the reference the vectorized engine meets
        job.settings = dataclasses.replace(job.settings, noise_multiplier=0.0,
                                           dp_reference=job.rule.local_train is None)
        jobs.append(job)
    return jobs


def _draws(jobs, rng, steps: int = 3) -> list[list[np.ndarray]]:
    out = []
    for job in jobs:
        n = len(job.y)
        q = poisson_sample_rate(n, job.settings.batch_size)
        out.append([np.flatnonzero(rng.random(n) < q) for _ in range(steps)])
    return out


def _close(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), what
    for k in want:
        torch.testing.assert_close(torch.as_tensor(np.asarray(got[k])), torch.as_tensor(np.asarray(want[k])),
                                   atol=ATOL, rtol=0, msg=lambda m, k=k: f"{what} {k}: {m}")


def _record(content: RecordDict, key: str) -> dict:
    rec = R.record_of(content, key, ArrayRecord)
    return R.record_to_numpy(rec) if rec is not None else {}


def _node_state(ctx: Context) -> dict:
    rec = R.record_of(ctx.state, R.ALGORITHM_STATE, ArrayRecord)
    return R.record_to_numpy(rec) if rec is not None else {}


@pytest.mark.parametrize("name", ALGORITHMS)
def test_engines_agree_at_sigma_zero_on_identical_draws(conformance_config, flower, name):
    cfg = conformance_config(name, **{"client.momentum": 0.5, "privacy.max_grad_norm": 0.5})
    strategy = build_strategy(cfg)
    pids = (0, 1, 2)
    contexts = {engine: {pid: Context(run_id=1, node_id=1000 + pid, state=RecordDict(),
                                      run_config=run_config_for(cfg),
                                      node_config={"partition-id": pid, "num-partitions": cfg.federation.num_clients})
                         for pid in pids} for engine in ("opacus", "vectorized")}
    arrays = initial_arrays(cfg)
    rng = np.random.default_rng(0)
    for server_round in (1, 2):
        content = sent_content(strategy, server_round, arrays, cfg.federation.num_clients)
        reference = _jobs(cfg, content, contexts["opacus"], server_round)
        jobs = _jobs(cfg, content, contexts["vectorized"], server_round)
        engine, why = engine_used("auto", jobs[0].model, jobs[0].rule)
        if engine != "vectorized":
            pytest.skip(f"{name} trains on the Opacus engine only: {why}")
        own_loop = jobs[0].rule.local_train is not None  # draws its own batches, seeded like Opacus'
        draws = None if own_loop else _draws(reference, rng)
        outcomes = run_vectorized(jobs, batches=draws)
        replies = []
        for i, (ref_job, job, outcome) in enumerate(zip(reference, jobs, outcomes)):
            result = run_job(ref_job, batches=None if own_loop else draws[i])
            trained = {k: p.detach().cpu() for k, p in ref_job.model.named_parameters() if p.requires_grad}
            _close(outcome.final, trained, f"round {server_round} client {i} trained")
            start = job.start.global_params
            assert max(float((trained[k] - start[k]).abs().max()) for k in start) > 1e-3  # it trained
            assert outcome.result.steps == result.steps
            if math.isfinite(result.mean_loss):
                assert outcome.result.mean_loss == pytest.approx(result.mean_loss, rel=1e-5)
            want, got = finish_job(ref_job, result), finish_job(job, outcome.result, outcome.final)
            for key in (R.ARRAYS, R.ALGORITHM_ARRAYS):
                _close(_record(got.content, key), _record(want.content, key), f"round {server_round} reply {key}")
            _close(_node_state(job.context), _node_state(ref_job.context), f"round {server_round} node state")
            replies.append(want)
        # round 2 starts both engines from the Opacus engine's server step and node state
        arrays, _ = strategy.aggregate_train(server_round, replies)
        for pid in pids:
            kept = R.record_of(contexts["opacus"][pid].state, R.ALGORITHM_STATE, ArrayRecord)
            if kept is not None:
                contexts["vectorized"][pid].state[R.ALGORITHM_STATE] = kept


# ----------------------------------------------------------------------------- checkpointed state

def _replies(flower, content: RecordDict, rng, server_round: int) -> list[Message]:
    """Three clients' replies to `content`: the sent arrays moved a little, extra arrays likewise."""
    out = []
    for i, n in enumerate((5, 9, 14)):
        reply = {R.ARRAYS: R.numpy_to_record({k: v + rng.normal(0, 0.05, v.shape).astype(v.dtype)
                                              if v.dtype.kind == "f" else v
                                              for k, v in _record(content, R.ARRAYS).items()}),
                 R.METRICS: MetricRecord({R.NUM_EXAMPLES: n, R.UNIT_WEIGHT: 1.0, R.TRAIN_LOSS: 1.0,
                                          R.PARTITION_ID: i})}
        extra = _record(content, R.ALGORITHM_ARRAYS)
        if extra:
            reply[R.ALGORITHM_ARRAYS] = R.numpy_to_record(
                {k: v + rng.normal(0, 0.05, v.shape).astype(v.dtype) for k, v in extra.items()})
        out.append(flower.reply(RecordDict(reply), node_id=1000 + i))
    return out


def _round(strategy, flower, cfg, server_round: int, arrays: ArrayRecord):
    """(new global arrays, what the round sent) as bytes, from seeded replies."""
    content = sent_content(strategy, server_round, arrays, cfg.federation.num_clients)
    new, _ = strategy.aggregate_train(server_round, _replies(flower, content, np.random.default_rng(server_round),
                                                             server_round))
    sent = {name: {k: bytes(a.data) for k, a in rec.items()} for name, rec in content.array_records.items()}
    return new, sent


def _bytes(record: ArrayRecord) -> dict:
    return {k: v.tobytes() for k, v in R.record_to_numpy(record).items()}


@pytest.mark.parametrize("name", ALGORITHMS)
def test_strategy_state_round_trips_through_a_checkpoint(conformance_config, flower, tmp_path, name):
    cfg = conformance_config(name)
    original = build_strategy(cfg)
    arrays = initial_arrays(cfg)
    for server_round in (1, 2):
        arrays, _ = _round(original, flower, cfg, server_round, arrays)
    state = strategy_state(original)
    save_checkpoint(tmp_path, Checkpoint(round=2, config="", arrays=R.record_to_numpy(arrays), strategy=state))
    loaded = load_checkpoint(tmp_path).strategy
    assert list(loaded) == list(state)
    assert all(loaded[k].dtype == v.dtype and loaded[k].tobytes() == v.tobytes() for k, v in state.items())

    resumed, fresh = build_strategy(cfg), build_strategy(cfg)
    load_strategy_state(resumed, loaded)
    want_arrays, want_sent = _round(original, flower, cfg, 3, arrays)
    got_arrays, got_sent = _round(resumed, flower, cfg, 3, arrays)
    assert got_sent == want_sent and _bytes(got_arrays) == _bytes(want_arrays)
    if state:  # declared state is state that matters: without it round 3 comes out otherwise
        fresh_arrays, fresh_sent = _round(fresh, flower, cfg, 3, arrays)
        assert (fresh_sent, _bytes(fresh_arrays)) != (want_sent, _bytes(want_arrays))


# ----------------------------------------------------------------------------- the params table

@pytest.mark.parametrize("name", ALGORITHMS)
def test_summary_names_every_param(conformance_config, name):
    cfg = conformance_config(name)
    text = "\n".join(_flower_summary(build_strategy(cfg)))
    missing = [f.name for f in dataclasses.fields(get_algorithm(name).params) if f.name not in text]
    assert not missing, f"{name}'s summary() does not name {missing}:\n{text}"


def bad_values(field: dataclasses.Field) -> list[str]:
    """Values for `--set` that the field's declared bounds refuse."""
    meta = field.metadata
    choices = meta.get("choices")
    if choices is not None and not callable(choices):
        return ["not-a-choice"]
    out = []
    if meta.get("lo") is not None:
        out.append(str(meta["lo"] - 1))
    if meta.get("hi") is not None:
        out.append(str(meta["hi"] + 1))
    if isinstance(field.default, (int, float)) and not isinstance(field.default, bool):
        out.append("not-a-number")
    if isinstance(field.default, str) and meta.get("pattern"):
        out.append("!!")
    return out


@pytest.mark.parametrize("name", ALGORITHMS)
def test_bad_params_are_refused_with_exit_2_and_one_line(cli, tmp_path, name):
    cases = [(f.name, bad) for f in dataclasses.fields(get_algorithm(name).params) for bad in bad_values(f)]
    cases.append(("no_such_key", "1"))
    for key, bad in cases:
        code, _, err = cli("run", REPO / "configs/quickstart.toml", "--set", f"strategy.name={name}",
                           "--set", f"strategy.{name}.{key}={bad}", "--out", tmp_path / "never")
        assert code == 2 and err.count("\n") == 1 and f"strategy.{name}.{key}" in err, (key, bad, err)
        assert "Traceback" not in err
    assert not (tmp_path / "never").exists()


# ----------------------------------------------------------------------------- SIGKILL and resume

def resume_cases():
    """Every algorithm under both engines; the default tier keeps one algorithm per engine
    (FedDyn: state on both halves), the slow tier the rest."""
    cases = []
    for name in ALGORITHMS:
        for engine in ("auto", "opacus"):
            fast = name == "feddyn"
            cases.append(pytest.param(name, engine, id=f"{name}-{engine}",
                                      marks=() if fast else pytest.mark.slow))
    return cases


@pytest.mark.parametrize("name, engine", resume_cases())
def test_killed_run_resumes_bit_for_bit(conformance_config, cli, tmp_path, name, engine):
    from tests.e2e.test_resume import check_resumed_like_reference, start_held

    kw = {"federation.rounds": 4, "runtime.engine": engine}
    cfg = conformance_config(name, **kw, **{"output.dir": str(tmp_path / "killed")})
    proc, out = start_held(tmp_path, cfg, hold=2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    check_resumed_like_reference(cli, cfg, out, conformance_config(name, **kw, **{"output.dir": str(tmp_path / "ref")}))
