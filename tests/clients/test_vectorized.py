"""The vectorized engine against Opacus itself: same batches, same updates, same epsilon.

Each case prepares the same clients twice through the ClientApp's `prepare_job` (so the
algorithm's rule, node state and server arrays are the real ones), trains one copy with the
Opacus engine (`run_job`) and the other with the vectorized engine (`run_vectorized`), on
identical Poisson draws given as index arrays, and compares every trainable tensor.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedsim.clients.app import finish_job, prepare_job, run_job, run_vectorized
from fedsim.clients.vectorized import extend_history
from fedsim import records as R
from fedsim.datasets import load_dataset
from fedsim.experiment import run_config_for
from fedsim.models import build_model
from fedsim.privacy.accounting import poisson_sample_rate
from fedsim.run import run_experiment
from fedsim.runtime.inprocess import assign_message_id
from tests.conftest import assert_same_bits_on_cpu

ON_CUDA = torch.cuda.is_available()  # where runtime.device = "auto" trains


def _jobs(cfg, partitions, *, server_arrays=None, node_state=None, noise=0.0, dp_reference=True):
    """Two identical job lists (one per engine) for `partitions` in round 1."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # what a grid sets up
    data = load_dataset(cfg.data, cfg.federation.num_clients, cfg.seed)
    arrays = R.model_to_record(build_model(cfg.model, data, cfg.seed, cfg.output.dir))
    out = []
    for _ in range(2):
        jobs = []
        for pid in partitions:
            content = RecordDict({R.ARRAYS: arrays, R.CONFIG: ConfigRecord({R.SERVER_ROUND: 1})})
            if server_arrays is not None:
                content[R.ALGORITHM_ARRAYS] = R.numpy_to_record(server_arrays)
            msg = Message(content, 1000 + pid, "train")
            assign_message_id(msg, f"m{pid}")
            ctx = Context(run_id=1, node_id=1000 + pid, state=RecordDict(), run_config=run_config_for(cfg),
                          node_config={"partition-id": pid, "num-partitions": cfg.federation.num_clients})
            if node_state is not None:
                ctx.state[R.ALGORITHM_STATE] = R.numpy_to_record(node_state(pid))
            job = prepare_job(msg, ctx)
            job.settings = dataclasses.replace(job.settings, noise_multiplier=noise, dp_reference=dp_reference)
            jobs.append(job)
        out.append(jobs)
    return out


def _poisson_batches(jobs, rng, steps=None, empty_at=None):
    batches = []
    for job in jobs:
        n = len(job.y)
        q = poisson_sample_rate(n, job.settings.batch_size)
        k = steps or math.ceil(n / job.settings.batch_size)
        draws = [np.flatnonzero(rng.random(n) < q) for _ in range(k)]
        if empty_at is not None:
            draws[empty_at] = np.zeros(0, dtype=np.int64)
        batches.append(draws)
    return batches


def _trainable(model):
    return {k: p.detach().cpu() for k, p in model.named_parameters() if p.requires_grad}


def _compare(cfg, partitions=(0, 1, 2), steps=None, empty_at=None, atol=1e-5, **kw):
    opacus_jobs, vector_jobs = _jobs(cfg, partitions, **kw)
    batches = _poisson_batches(opacus_jobs, np.random.default_rng(0), steps, empty_at)
    outcomes = run_vectorized(vector_jobs, batches=batches)
    results = []
    for job, draws, outcome in zip(opacus_jobs, batches, outcomes):
        result = run_job(job, batches=draws)
        results.append(result)
        reference = _trainable(job.model)
        assert set(reference) == set(outcome.final)
        for name, value in reference.items():
            torch.testing.assert_close(outcome.final[name], value, atol=atol, rtol=0)
        assert outcome.result.steps == result.steps
        if math.isfinite(result.mean_loss):
            assert outcome.result.mean_loss == pytest.approx(result.mean_loss, rel=1e-5)
    return opacus_jobs, results, vector_jobs, outcomes


BASE = {"federation.num_clients": 6, "client.batch_size": 8, "client.lr": 0.5, "client.momentum": 0.5,
        "privacy.max_grad_norm": 0.5}


@pytest.mark.parametrize("model", ["mlp", "cnn", "logreg"])
def test_dp_sgd_at_sigma_zero_matches_opacus_per_client(tiny, model):
    _compare(tiny(**BASE, **{"model.name": model, "model.hidden": [16]}), steps=4)


def test_empty_poisson_batch_still_counts_as_a_step(tiny):
    _compare(tiny(**BASE), steps=4, empty_at=1)


def test_lora_b_only_matches_opacus(tiny):
    cfg = tiny(**BASE, **{"model.name": "lora-mlp", "strategy.name": "fedsvd", "data.classes": [5, 6, 7, 8, 9],
                          "model.pretrain_classes": [0, 1, 2, 3, 4], "model.pretrain_epochs": 2,
                          "model.hidden": [16], "model.lora_rank": 4})
    _, _, jobs, outcomes = _compare(cfg, steps=3)
    assert all(".lora_B." in k for k in outcomes[0].final)  # only B trains (and gets noise)
    assert not torch.equal(outcomes[0].final[next(iter(outcomes[0].final))],
                           _trainable(jobs[0].model)[next(iter(outcomes[0].final))])


def test_fedprox_pull_matches_opacus(tiny):
    _compare(tiny(**BASE, **{"strategy.name": "fedprox", "strategy.fedprox.mu": 0.7}), steps=4)


def test_fedld_margin_term_matches_opacus(tiny):
    """Under DP-SGD the per-sample form (what a DP run uses); without DP the authors' batch form,
    which the vectorized engine evaluates on padded batches with a mask."""
    fedld = {"strategy.name": "fedld", "strategy.fedld.margin_lambda": 2.0}
    _compare(tiny(**BASE, **fedld, **{"strategy.fedld.margin_mode": "sample"}), steps=3)
    _compare(tiny(**BASE, **fedld, **{"strategy.fedld.margin_mode": "batch"}), steps=3, dp_reference=False)


def test_non_private_sgd_matches_plain_torch_loop(tiny):
    _compare(tiny(**BASE, **{"model.name": "cnn"}), steps=4, empty_at=2, dp_reference=False)


def test_scaffold_with_nonzero_controls_matches_opacus(tiny):
    cfg = tiny(**BASE, **{"strategy.name": "scaffold", "model.hidden": [16]})
    data = load_dataset(cfg.data, cfg.federation.num_clients, cfg.seed)
    shapes = {k: v.shape for k, v in build_model(cfg.model, data, cfg.seed).state_dict().items()}
    rng = np.random.default_rng(3)
    server_c = {k: rng.normal(0, 0.3, s).astype(np.float32) for k, s in shapes.items()}
    local_c = {pid: {k: rng.normal(0, 0.3, s).astype(np.float32) for k, s in shapes.items()} for pid in range(3)}
    opacus_jobs, results, vector_jobs, outcomes = _compare(cfg, steps=3, server_arrays=server_c,
                                                           node_state=lambda pid: local_c[pid])
    # the replies' delta c_i agree too (option II from each engine's final tensors)
    for job_o, result, job_v, outcome in zip(opacus_jobs, results, vector_jobs, outcomes):
        ref = finish_job(job_o, result).content[R.ALGORITHM_ARRAYS]
        got = finish_job(job_v, outcome.result, outcome.final).content[R.ALGORITHM_ARRAYS]
        assert set(got) == set(server_c)
        for k in ref:
            np.testing.assert_allclose(R.from_array(got[k]), R.from_array(ref[k]), atol=1e-3)
            assert np.abs(R.from_array(got[k])).max() > 0


def test_noise_std_matches_closed_form(tiny):
    """One step, the same draws, sigma > 0 against sigma = 0: the update differs by lr * noise / int(q n),
    so its per-coordinate std is lr * sigma * C / int(q n)."""
    sigma, lr, clip = 1.3, 0.5, 0.5
    cfg = tiny(**{**BASE, "client.momentum": 0.0, "model.hidden": [64]})
    quiet, _ = _jobs(cfg, range(6), noise=0.0)
    noisy, _ = _jobs(cfg, range(6), noise=sigma, dp_reference=False)
    batches = _poisson_batches(quiet, np.random.default_rng(1), steps=1)
    reference = run_vectorized(quiet, batches=batches)
    for job in noisy:  # a different noise draw per client: vary the seed
        job.seed += 1
    noisy_out = run_vectorized(noisy, batches=batches)
    for job, a, b in zip(quiet, reference, noisy_out):
        n = len(job.y)
        expected = lr * sigma * clip / int(poisson_sample_rate(n, 8) * n)
        diff = torch.cat([(b.final[k] - a.final[k]).flatten() for k in a.final])
        assert diff.numel() > 4000
        assert float(diff.std()) == pytest.approx(expected, rel=0.05)
        assert abs(float(diff.mean())) < 4 * expected / math.sqrt(diff.numel())


def test_round_buffers_are_reused_but_never_leak_into_results(tiny):
    """The engine keeps its round-sized temporaries between calls (`scratch`): a later call
    must neither change an earlier call's results nor depend on what the buffers held (here
    zeros everywhere: a Poisson draw of 0 selects a sample, so a padding slot left unreset
    would be drawn)."""
    from fedsim.clients import vectorized as V

    cfg = tiny(**{**BASE, "model.hidden": [16], "data.partitioner": "dirichlet", "data.alpha": 0.5})
    first_jobs, again_jobs = _jobs(cfg, range(4), noise=1.0, dp_reference=False)
    assert len({len(job.y) for job in first_jobs}) > 1  # clients of different sizes: padded draws
    V.release_scratch()
    first = run_vectorized(first_jobs)
    kept = [{k: t.clone() for k, t in o.final.items()} for o in first]
    assert V._SCRATCH.buffers
    for buffer in V._SCRATCH.buffers.values():
        buffer.zero_()
    again = run_vectorized(again_jobs)  # the same clients and seeds as `first`
    for outcome, copy, repeat in zip(first, kept, again, strict=True):
        for key in copy:
            assert torch.equal(outcome.final[key], copy[key]), key
            assert torch.equal(repeat.final[key], copy[key]), key
    V.release_scratch()
    assert not hasattr(V._SCRATCH, "buffers")


def test_next_round_reuses_the_shared_model_with_the_same_results(lora_cfg, tmp_path, monkeypatch):
    """A vectorized round's shared model becomes the next round's (`clients.app.spare_models`):
    it must train exactly as a freshly built one (here FedSVD: the server's new A replaces the
    old, the frozen backbone stays), and the reuse must actually happen."""
    import fedsim.clients.app as app

    def outputs(name):
        out = run_experiment(lora_cfg(**{"federation.rounds": 3, "runtime.engine": "vectorized",
                                         "output.dir": str(tmp_path / name)}), progress=False)
        return [(out / f).read_bytes() for f in ("clients.csv", "model.safetensors")] + \
            [[r[k] for k in r if k != "wall_seconds"] for r in _rows(out / "rounds.csv")]

    builds = []
    real_build = app.build_model
    monkeypatch.setattr(app, "build_model", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    reused = outputs("reused")
    assert len(builds) == 1  # round 1 builds; rounds 2 and 3 reuse it

    real_prepare = app.prepare_job

    def fresh(*args, **kwargs):
        app.spare_models.cache_clear()
        return real_prepare(*args, **kwargs)
    monkeypatch.setattr(app, "prepare_job", fresh)
    assert outputs("fresh") == reused
    assert len(builds) == 1 + 3


def test_history_extends_like_opacus_accountant():
    assert extend_history([], 1.0, 0.5, 3) == [(1.0, 0.5, 3)]
    assert extend_history([(1.0, 0.5, 3)], 1.0, 0.5, 2) == [(1.0, 0.5, 5)]
    assert extend_history([(1.0, 0.5, 3)], 1.0, 0.25, 2) == [(1.0, 0.5, 3), (1.0, 0.25, 2)]
    assert extend_history([(1.0, 0.5, 3)], 1.0, 0.5, 0) == [(1.0, 0.5, 3)]


def _rows(path):
    return list(csv.DictReader(path.open()))


def test_engines_give_identical_epsilon_and_participations(tiny, tmp_path):
    kw = {"privacy.noise_multiplier": 0.8, "data.partitioner": "dirichlet", "federation.rounds": 3}
    a = run_experiment(tiny(**kw, **{"runtime.engine": "opacus", "output.dir": str(tmp_path / "a")}), progress=False)
    b = run_experiment(tiny(**kw, **{"runtime.engine": "vectorized", "output.dir": str(tmp_path / "b")}),
                       progress=False)
    ca, cb = _rows(a / "clients.csv"), _rows(b / "clients.csv")
    assert [(r["partition_id"], r["participations"], r["sample_epsilon"]) for r in ca] == \
           [(r["partition_id"], r["participations"], r["sample_epsilon"]) for r in cb]
    assert float(ca[0]["sample_epsilon"]) > 0


def test_vectorized_runs_are_deterministic_and_learn(tiny, tmp_path):
    kw = {"privacy.noise_multiplier": 0.5, "federation.rounds": 6, "runtime.engine": "vectorized",
          "federation.num_clients": 10, "federation.clients_per_round": 5, "client.batch_size": 16}
    a = run_experiment(tiny(**kw, **{"output.dir": str(tmp_path / "a")}), progress=False)
    b = run_experiment(tiny(**kw, **{"output.dir": str(tmp_path / "b")}), progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_seconds"} for r in rows]  # noqa: E731
    assert strip(_rows(a / "rounds.csv")) == strip(_rows(b / "rounds.csv"))
    assert float(_rows(a / "rounds.csv")[-1]["metric"]) > 0.5  # chance is 0.1


def test_auto_falls_back_to_opacus_for_dropout_and_explicit_vectorized_is_refused(lora_cfg, tmp_path, caplog):
    """A model vmap cannot run (LoRA dropout) trains under Opacus with `auto`, and an explicit
    `vectorized` is refused before any work. (Learning from bags, whose rule has its own loop,
    runs vectorized through its batched loop: tests/clients/test_bags.py.)"""
    from fedsim.errors import FedsimError

    kw = {"federation.rounds": 1, "model.lora_dropout": 0.1, "model.pretrain_epochs": 1}
    with caplog.at_level("INFO", logger="fedsim"):
        run_experiment(lora_cfg(**kw, **{"output.dir": str(tmp_path / "a")}), progress=False)
    assert "engine: Opacus" in caplog.text and "dropout" in caplog.text
    engine = json.loads((tmp_path / "a" / "summary.json").read_text())["engine"]  # what the result was made with
    assert engine["requested"] == "auto" and engine["used"] == "opacus" and "dropout" in engine["why"]
    run_experiment(lora_cfg(**{**kw, "model.lora_dropout": 0.0}, **{"output.dir": str(tmp_path / "c")}),
                   progress=False)
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["engine"] == {"requested": "auto",
                                                                                  "used": "vectorized"}
    with pytest.raises(FedsimError, match="runtime.engine: vectorized cannot train this experiment: module .* dropout"):
        run_experiment(lora_cfg(**kw, **{"runtime.engine": "vectorized", "output.dir": str(tmp_path / "b")}),
                       progress=False)


def test_dense_path_applies_to_linear_chains_only(tiny):
    """The dense (ghost-norm) path takes Linear/activation chains; conv, LoRA and a rule with a
    loss term (FedLD) take the vmap path."""
    from fedsim.algorithms import get_algorithm
    from fedsim.clients.vectorized import dense_chain

    data = load_dataset(tiny().data, 6, 0)
    fedavg, fedld = get_algorithm("fedavg").client, get_algorithm("fedld").client
    for name, expected in [("mlp", True), ("logreg", True), ("cnn", False)]:
        model = build_model(tiny(**{"model.name": name, "model.hidden": [16]}).model, data, 0)
        assert (dense_chain(model, fedavg) is not None) is expected, name
    mlp = build_model(tiny(**{"model.hidden": [16]}).model, data, 0)
    assert dense_chain(mlp, fedld) is None
    mlp[1].bias.requires_grad_(False)  # a frozen tensor: not a plain outer product to clip
    assert dense_chain(mlp, fedavg) is None


def _against_vmap_path(cfg, monkeypatch, private: bool, *paths: str) -> list:
    """(outcome, vmap path's outcome) per client: the same clients and draws (momentum, a
    partial batch and an empty one) trained as the engine chooses, then with the selectors of
    `paths` (`clients.vectorized_functional.dense_chain`, `outer_chain`) answering None."""
    import fedsim.clients.vectorized_functional as V

    runs = []
    for off in (False, True):
        if off:
            for name in paths:
                monkeypatch.setattr(V, name, lambda *args: None)
        _, jobs = _jobs(cfg, (0, 1, 2, 3), dp_reference=private)
        batches = _poisson_batches(jobs, np.random.default_rng(1), steps=4, empty_at=2)
        runs.append(run_vectorized(jobs, batches=batches))
    return list(zip(*runs))


@pytest.mark.parametrize("private", [True, False])
def test_dense_path_equals_vmap_path(tiny, monkeypatch, private):
    """The dense path against the vmap path on the same clients and draws, with momentum,
    a partial batch and an empty one: two independent derivations of the same clipped sum."""
    cfg = tiny(**BASE, **{"model.hidden": [16, 8]})
    for dense, vmapped in _against_vmap_path(cfg, monkeypatch, private, "dense_chain", "outer_chain"):
        assert dense.final.keys() == vmapped.final.keys()
        for name in dense.final:
            torch.testing.assert_close(dense.final[name], vmapped.final[name], atol=1e-6, rtol=0)
        assert dense.result.mean_loss == pytest.approx(vmapped.result.mean_loss, rel=1e-6)


LORA = {"model.name": "lora-mlp", "strategy.name": "fedsvd", "data.classes": [5, 6, 7, 8, 9],
        "model.pretrain_classes": [0, 1, 2, 3, 4], "model.pretrain_epochs": 2, "model.hidden": [16],
        "model.lora_rank": 4, "model.lora_alpha": 6.0}


@pytest.mark.parametrize("private", [True, False])
@pytest.mark.parametrize("setup", ["fedsvd", "fedavg-lora", "fedld"])
def test_outer_product_path_equals_vmap_path_through_the_engine(tiny, monkeypatch, setup, private):
    """Whole local trainings, outer-product path against vmap path, on the same clients and
    draws with momentum, a partial batch and an empty one: the same bits."""
    extra = {**LORA, "strategy.name": setup} if setup != "fedld" else \
        {"strategy.name": "fedld", "strategy.fedld.margin_lambda": 2.0, "model.hidden": [16]}
    for outer, vmapped in _against_vmap_path(tiny(**BASE, **extra), monkeypatch, private, "outer_chain"):
        assert outer.final.keys() == vmapped.final.keys()
        for name in outer.final:
            assert_same_bits_on_cpu(outer.final[name], vmapped.final[name], name)
        loss = vmapped.result.mean_loss
        assert outer.result.mean_loss == (pytest.approx(loss, rel=1e-6) if ON_CUDA else loss)


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("activation", [torch.nn.ReLU, torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.Identity])
def test_chain_rule_by_hand_gives_autograds_bits(task, activation):
    """`_chain_backward` against autograd on the same chain, weights and padded rows: the same
    bits for every supported activation, a Flatten, a Linear without bias and an activation
    after the last Linear; in-place and other activations are left to autograd."""
    from torch import nn

    from fedsim.clients.vectorized_grads import _dense_output_grads, by_hand, dense_chain
    from fedsim.models import loss_fn

    torch.manual_seed(0)
    out = 10 if task == "classification" else 1
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), activation(), nn.Linear(16, 8, bias=False), activation(),
                          nn.Linear(8, out), activation())
    chain = dense_chain(model)
    assert by_hand(chain)
    k, b = 5, 7
    params = {name: t.detach().expand(k, *t.shape) + 0.1 * torch.randn(k, *t.shape)
              for name, t in model.named_parameters()}
    x = torch.randn(k, b, 3, 4)
    y = torch.randint(0, 10, (k, b)) if task == "classification" else torch.randn(k, b)
    weight = (torch.rand(k, b) > 0.3).float() / 3.0  # padded rows weigh 0
    reference = _dense_output_grads(chain, params, x, y, weight, loss_fn(task, reduction="none"))
    by_hand_result = _dense_output_grads(chain, params, x, y, weight, None, task)
    assert torch.equal(reference[1], by_hand_result[1])
    assert len(reference[0]) == len(by_hand_result[0]) == 3
    for (name, a, g), (name2, a2, g2) in zip(reference[0], by_hand_result[0]):
        assert name == name2 and torch.equal(a, a2) and torch.equal(g, g2), name
    assert not by_hand(dense_chain(nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))))
    assert not by_hand(dense_chain(nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2))))


OUTER_CASES = ["fedsvd", "fedavg-lora", "head-only", "regression", "fedld", "fedld-batch-mode", "frozen-bias"]


@pytest.mark.parametrize("case", OUTER_CASES)
def test_outer_product_path_gives_the_vmap_paths_bits(case):
    """The outer-product path against ``vmap(grad)`` on the same stacked tensors, per sample
    (DP-SGD: the clipped sum against `Functional.per_sample_grads`) and per client over a
    padded batch (no DP: `Functional.batch_grads`): LoRA's B alone (FedSVD, FFA-LoRA), A and B
    (FedAvg-LoRA), LoRA on the head only (a frozen plain Linear before it), a regression
    output, an MLP under FedLD's margin term (per sample, and its batch form without DP) and
    an MLP with a frozen bias; the same bits. The LoRA scale is 1.5, so that a multiplication
    in another order would show."""
    from types import SimpleNamespace

    from torch import nn

    from fedsim.algorithms import Hyper, get_algorithm
    from fedsim.clients.vectorized_functional import Functional
    from fedsim.clients.vectorized_grads import clip_factor, outer_chain
    from fedsim.lora import LoRALinear, add_lora, set_trainable
    from fedsim.models import mlp

    torch.manual_seed(1)
    task = "regression" if case == "regression" else "classification"
    net = mlp(20, [16, 12], 1 if task == "regression" else 5)
    if case in ("fedsvd", "fedavg-lora", "head-only", "regression"):
        net = add_lora(net, 4, 6.0, targets=["5"] if case == "head-only" else None)  # scale 1.5: inexact
        for module in net.modules():
            if isinstance(module, LoRALinear):  # B0 = 0 would make every upstream gradient zero
                nn.init.normal_(module.lora_B.weight, std=0.3)
        set_trainable(net, get_algorithm("fedavg-lora" if case == "fedavg-lora" else "fedsvd").client.trainable)
    elif case == "frozen-bias":
        net[3].bias.requires_grad_(False)
    rule = get_algorithm("fedld" if case.startswith("fedld") else "fedavg").client
    params_of_rule = SimpleNamespace(margin_lambda=0.3, margin_mode="batch" if case == "fedld-batch-mode" else "sample")
    fn = Functional(net, rule, Hyper(params=params_of_rule, lr=0.1, private=True), task)
    assert fn.chain is None and fn.outer is not None
    k, b = 3, 6
    params = {name: t.expand(k, *t.shape) + 0.05 * torch.randn(k, *t.shape) for name, t in fn.trainable.items()}
    x = torch.randn(k, b, 20)
    y = torch.randn(k, b) if task == "regression" else torch.randint(0, 5, (k, b))
    mask = torch.ones(k, b)
    mask[1, 4:] = 0.0  # a padded batch
    assert len(fn.trainable) == {"fedavg-lora": 6, "head-only": 1, "fedsvd": 3, "regression": 3, "frozen-bias": 5}.get(
        case, 6)  # A and B per layer, the head's B, each layer's B, weights and biases
    if case != "fedld-batch-mode":  # DP-SGD uses FedLD's per-sample form only
        reference, reference_losses = fn.per_sample_grads(params, {}, x, y)
        grads, losses = fn.clipped_sum(params, {}, x, y, mask, max_grad_norm=1e9)  # no clipping: sums
        for name in reference:
            summed = torch.einsum("ab,ab...->a...", clip_factor(torch.ones(k, b), 1e9, mask), reference[name])
            assert torch.equal(grads[name], summed), name
        assert grads.keys() == reference.keys() and torch.equal(losses, reference_losses)
    fn.hyper = Hyper(params=params_of_rule, lr=0.1, private=False)
    batch_reference = fn.batch_grads(params, {}, x, y, mask)
    batch = fn.mean_grads(params, {}, x, y, mask)
    assert batch[0].keys() == batch_reference[0].keys()
    for name in batch_reference[0]:
        assert torch.equal(batch[0][name], batch_reference[0][name]), name
    assert torch.equal(batch[1], batch_reference[1])
    if case == "fedsvd":
        net[2] = nn.ReLU(inplace=True)
        assert outer_chain(net) is None


def test_outer_product_path_per_sample_gradients_are_vmaps():
    """The per-sample gradients themselves (before the norms and the sum) for FedLD's MLP."""
    from types import SimpleNamespace

    from fedsim.algorithms import Hyper, get_algorithm
    from fedsim.clients.vectorized_functional import Functional
    from fedsim.clients.vectorized_grads import outer_grads
    from fedsim.models import mlp

    torch.manual_seed(2)
    fn = Functional(mlp(20, [16], 5), get_algorithm("fedld").client,
                     Hyper(params=SimpleNamespace(margin_lambda=0.3, margin_mode="sample"), lr=0.1, private=True),
                     "classification")
    k, b = 2, 5
    params = {name: t.expand(k, *t.shape) + 0.05 * torch.randn(k, *t.shape) for name, t in fn.trainable.items()}
    x, y = torch.randn(k, b, 20), torch.randint(0, 5, (k, b))
    reference, _ = fn.per_sample_grads(params, {}, x, y)

    def output_grads(out):
        grads, values = fn.per_sample_output_grads(out, {}, y)
        return values, grads
    grads, _ = outer_grads(fn.outer, params, fn.frozen, x, output_grads, per_sample=True)
    for name in reference:
        assert grads[name].shape == reference[name].shape == (k, b, *fn.trainable[name].shape)
        assert torch.equal(grads[name], reference[name]), name


def test_drawn_indices_on_the_cpu_match_the_device_version():
    """The numpy selection of each client's drawn samples against the torch one that runs on
    a device: rows with no draw, one and all of them, and a chunk where nobody drew."""
    from fedsim.clients.vectorized import drawn_indices, drawn_indices_torch

    rng = torch.Generator().manual_seed(3)
    chosen = torch.rand(6, 9, generator=rng) < 0.4
    chosen[1] = False
    chosen[2] = True
    for case in (chosen, torch.zeros(3, 4, dtype=torch.bool), chosen[:1]):
        local, valid = drawn_indices(case)
        local_t, valid_t = drawn_indices_torch(case)
        assert torch.equal(valid, valid_t) and torch.equal(local[valid], local_t[valid_t])
        for row, (idx, ok) in enumerate(zip(local, valid)):
            assert idx[ok].tolist() == case[row].nonzero().flatten().tolist()


def test_non_private_mlp_matches_plain_torch_loop(tiny):
    _compare(tiny(**BASE), steps=4, empty_at=2, dp_reference=False)


def test_pad_matches_row_by_row_padding():
    """`_pad` (one scatter for all rows) gives what padding each row in turn gives."""
    from fedsim.clients.vectorized import _pad

    rows = [torch.tensor([3, 1, 4]), torch.tensor([], dtype=torch.long), torch.tensor([5]), torch.tensor([9, 2])]
    local, valid = _pad(rows, "cpu")
    assert local.tolist() == [[3, 1, 4], [0, 0, 0], [5, 0, 0], [9, 2, 0]]
    assert valid.tolist() == [[True] * 3, [False] * 3, [True, False, False], [True, True, False]]
    assert local.dtype == torch.long and valid.dtype == torch.bool
    empty_local, empty_valid = _pad([torch.tensor([], dtype=torch.long)] * 2, "cpu")
    assert empty_local.shape == empty_valid.shape == (2, 0)
