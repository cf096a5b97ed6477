"""The bags algorithm's client half (learning from aggregate responses, Javanmard et al.,
ICLR 2024): the losses' closed forms, the estimator they converge to, the one-time release,
and its batched loop (the vectorized engine) against `train_bags` client by client."""

from __future__ import annotations

import csv
import dataclasses
import math

import numpy as np
import pytest
import torch

from fedsim.clients.app import choose_engine, local_task, run_job, run_vectorized
from fedsim.clients.bags import (RULE, client_bags, interpolated_loss, proportion_loss, squared_losses, train_bags,
                                 train_bags_batched)
from fedsim.clients.vectorized import unsupported_reason
from fedsim.algorithms import ClientRule, Hyper, LocalTask, TrainSettings
from tests.conftest import assert_same_bits_on_cpu
from fedsim.config import load_config
from fedsim.errors import ConfigError
from fedsim.run import run_experiment
from fedsim.strategies.bags import BagsParams
from tests.clients.test_vectorized import _jobs


def test_squared_losses_by_hand():
    # one bag of k = 2 with predictions [1, 3] and released mean 1: f_a = 2,
    # L_bag = (1 - 2)^2 = 1, R = ((1 - 2)^2 + (3 - 2)^2) / 2 = 1, L_ins = (0^2 + 2^2) / 2 = 2
    l_bag, r = squared_losses(torch.tensor([[1.0, 3.0]]), torch.tensor([1.0]))
    assert (float(l_bag), float(r)) == (1.0, 1.0)
    assert float(interpolated_loss(torch.tensor([[1.0, 3.0]]), torch.tensor([1.0]), 0.25)) == 1.25


def test_proportion_loss_by_hand():
    # one bag of two samples with softmax rows (.75, .25) and (.5, .5), released proportion (1, 0):
    # L_bag = -log(mean prob of class 0) = -log .625, L_ins = -(log .75 + log .5) / 2
    logits = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]], dtype=torch.float64)
    props = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    l_bag, l_ins = -math.log(0.625), -(math.log(0.75) + math.log(0.5)) / 2
    assert float(proportion_loss(logits, props, 0.0)) == pytest.approx(l_bag, rel=1e-12)
    assert float(proportion_loss(logits, props, 1.0)) == pytest.approx(l_ins, rel=1e-12)
    assert float(proportion_loss(logits, props, 0.3)) == pytest.approx(0.7 * l_bag + 0.3 * l_ins, rel=1e-12)


def test_instance_loss_is_bag_loss_plus_spread():
    rng = np.random.default_rng(0)
    pred = torch.tensor(rng.normal(size=(7, 5)))
    bag_y = torch.tensor(rng.normal(size=7))
    l_bag, r = squared_losses(pred, bag_y)
    l_ins = ((bag_y[:, None] - pred) ** 2).mean()  # (1/n) sum_a sum_i (y_a - f_i)^2
    assert float(l_ins) == pytest.approx(float(l_bag + r), rel=1e-12)
    for rho in (0.0, 0.3, 1.0):
        assert float(interpolated_loss(pred, bag_y, rho)) == pytest.approx(
            float((1 - rho) * l_bag + rho * l_ins), rel=1e-12)


def closed_form(x, y, bags, rho):
    """theta_rho = [X^T S X + rho X^T (I - S) X]^{-1} X^T S y with S = blockdiag(11^T / k)."""
    k = bags.shape[1]
    xs = x[bags.reshape(-1)]
    ys = y[bags.reshape(-1)]
    s_sorted = np.kron(np.eye(len(bags)), np.full((k, k), 1.0 / k))
    a = xs.T @ s_sorted @ xs + rho * xs.T @ (np.eye(len(ys)) - s_sorted) @ xs
    return np.linalg.solve(a, xs.T @ s_sorted @ ys)


@pytest.mark.parametrize("rho", [0.0, 0.5, 1.0])
def test_linear_model_converges_to_closed_form(rho, tiny):
    rng = np.random.default_rng(1)
    n, d, k = 240, 4, 4
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ rng.normal(size=d) + 0.3 * rng.normal(size=n)).astype(np.float32)
    model = torch.nn.Linear(d, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    settings = TrainSettings(task="regression", local_steps=4000, batch_size=n, lr=0.2)
    task = LocalTask(model, x, y, settings, Hyper(BagsParams(bag_size=k, rho=rho), 0.2, False), partition_id=0,
                     seed=0, experiment_seed=0, delta=1e-5, num_classes=1)
    train_bags(task)
    bags, _ = client_bags(task)
    expected = closed_form(x.astype(np.float64), y.astype(np.float64), bags, rho)
    np.testing.assert_allclose(model.weight.detach().numpy()[0], expected, atol=1e-3)


def test_proportion_loss_interpolates():
    logits = torch.randn(3, 4, 5)
    props = torch.softmax(torch.randn(3, 5), -1)
    l0, l1 = proportion_loss(logits, props, 0.0), proportion_loss(logits, props, 1.0)
    assert float(proportion_loss(logits, props, 0.25)) == pytest.approx(float(0.75 * l0 + 0.25 * l1), rel=1e-6)
    assert float(l0) <= float(l1) + 1e-6  # Jensen: CE to the mean prediction is the smaller one




def test_bags_are_released_once_per_client():
    """Every round re-derives the identical bags and noisy means from the client's fixed seed
    (release once, reuse as post-processing); another client gets its own."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 3)).astype(np.float32), rng.uniform(-1, 1, 40).astype(np.float32)
    params = BagsParams(bag_size=4, label_epsilon=1.0, label_range=[-1.0, 1.0])

    def task(pid, seed):
        return LocalTask(torch.nn.Linear(3, 1), x, y, TrainSettings(task="regression"), Hyper(params, 0.1, False),
                         partition_id=pid, seed=seed, experiment_seed=0, delta=1e-5, num_classes=1)

    bags, means = client_bags(task(0, seed=1))
    again_bags, again_means = client_bags(task(0, seed=2))  # another round: another training seed
    np.testing.assert_array_equal(bags, again_bags)
    np.testing.assert_array_equal(means, again_means)
    assert bags.shape == (10, 4) and not np.allclose(means, y[bags].mean(1))  # noised
    other_bags, _ = client_bags(task(1, seed=1))
    assert not np.array_equal(bags, other_bags)
    assert RULE.local_train is train_bags
    assert RULE.local_train_batched is train_bags_batched


def test_masked_losses_equal_the_losses_of_the_real_bags():
    """A padded batch's loss over its real bags (mask) is the loss of those bags alone."""
    rng = np.random.default_rng(0)
    pred, targets = torch.tensor(rng.normal(size=(5, 3))), torch.tensor(rng.normal(size=5))
    logits, props = torch.tensor(rng.normal(size=(5, 3, 4))), torch.softmax(torch.tensor(rng.normal(size=(5, 4))), -1)
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    for rho in (0.0, 0.4, 1.0):
        assert float(interpolated_loss(pred, targets, rho, mask)) == pytest.approx(
            float(interpolated_loss(pred[:3], targets[:3], rho)), rel=1e-12)
        assert float(proportion_loss(logits, props, rho, mask)) == pytest.approx(
            float(proportion_loss(logits[:3], props[:3], rho)), rel=1e-12)
        assert float(interpolated_loss(pred, targets, rho, torch.ones(5))) == pytest.approx(
            float(interpolated_loss(pred, targets, rho)), rel=1e-12)


# Clients of different sizes (a power law), so different numbers of bags m and of steps, and
# bag sizes with m % per_batch != 0 for most clients (a partial last minibatch every epoch).
REGRESSION = {"data.dataset": "diabetes", "model.name": "linear", "strategy.bags.bag_size": 5,
              "client.batch_size": 15, "client.lr": 0.02, "strategy.bags.label_range": [-3.0, 3.0]}
CLASSIFICATION = {"data.dataset": "digits", "data.classes": [0, 1, 2, 3], "model.name": "mlp", "model.hidden": [16],
                  "strategy.bags.bag_size": 3, "client.batch_size": 12, "client.lr": 0.3}


def _bags_cfg(tiny, case, **kw):
    return tiny(**{"strategy.name": "bags", "data.partitioner": "quantity", "data.quantity_power": 1.0,
                   "federation.num_clients": 6, "client.local_epochs": 2, "strategy.bags.rho": 0.5,
                   **case, **kw})


@pytest.mark.parametrize("label_epsilon", [0.0, 2.0])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("case", [REGRESSION, CLASSIFICATION], ids=["diabetes-linear", "digits-mlp"])
def test_batched_loop_equals_train_bags_client_by_client(tiny, case, momentum, label_epsilon):
    cfg = _bags_cfg(tiny, case, **{"client.momentum": momentum, "strategy.bags.label_epsilon": label_epsilon})
    reference_jobs, jobs = _jobs(cfg, range(6), dp_reference=False)
    start = {k: p.detach().clone() for k, p in jobs[0].model.named_parameters()}
    outcomes = run_vectorized(jobs)
    for k, p in jobs[0].model.named_parameters():  # the shared model is read-only
        assert torch.equal(p.cpu(), start[k])
    per_batch = cfg.client.batch_size // cfg.strategy.params.bag_size
    bags = [len(job.y) // cfg.strategy.params.bag_size for job in jobs]
    assert sum(m % per_batch != 0 for m in bags) >= 3  # partial minibatches
    assert len({o.result.steps for o in outcomes}) >= 4  # clients finish at different steps
    for job, outcome in zip(reference_jobs, outcomes):
        result = run_job(job)  # train_bags, the Opacus engine's path
        reference = {k: p.detach().cpu() for k, p in job.model.named_parameters() if p.requires_grad}
        assert set(outcome.final) == set(reference)
        for name, value in reference.items():
            assert not torch.allclose(value, start[name], atol=1e-3)  # it trained
            torch.testing.assert_close(outcome.final[name], value, atol=1e-5, rtol=0)
        assert (outcome.result.num_examples, outcome.result.steps, outcome.result.history,
                outcome.result.sample_rate) == (result.num_examples, result.steps, result.history, result.sample_rate)
        assert outcome.result.mean_loss == pytest.approx(result.mean_loss, rel=1e-6)


def test_batched_loop_trains_only_the_trainable_tensors(tiny):
    """Frozen tensors go into the forward pass unchanged and come back from neither loop."""
    cfg = _bags_cfg(tiny, CLASSIFICATION, **{"client.momentum": 0.5})
    reference_jobs, jobs = _jobs(cfg, range(3), dp_reference=False)
    for job in reference_jobs + jobs:
        next(job.model.parameters()).requires_grad_(False)  # the first layer's weight
    frozen = next(k for k, p in jobs[0].model.named_parameters() if not p.requires_grad)
    outcomes = train_bags_batched([local_task(job) for job in jobs])
    for job, (result, final) in zip(reference_jobs, outcomes):
        train_bags(local_task(job))
        reference = {k: p.detach().cpu() for k, p in job.model.named_parameters() if p.requires_grad}
        assert frozen not in final and set(final) == set(reference)
        for name, value in reference.items():
            torch.testing.assert_close(final[name], value, atol=1e-5, rtol=0)


def test_local_steps_override_epochs_in_both_loops(tiny):
    cfg = _bags_cfg(tiny, REGRESSION, **{"client.local_steps": 7, "client.momentum": 0.9})
    reference_jobs, jobs = _jobs(cfg, range(4), dp_reference=False)
    for job, outcome in zip(reference_jobs, run_vectorized(jobs)):
        assert run_job(job).steps == outcome.result.steps == 7
        for name, value in job.model.state_dict().items():
            torch.testing.assert_close(outcome.final[name], value.cpu(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", [REGRESSION, CLASSIFICATION], ids=["diabetes-linear", "digits-mlp"])
def test_batched_loop_does_not_depend_on_chunks(tiny, case):
    outcomes = {}
    for chunk in (0, 1, 4):
        cfg = _bags_cfg(tiny, case, **{"client.momentum": 0.9, "runtime.engine_chunk": chunk})
        outcomes[chunk] = run_vectorized(_jobs(cfg, range(6), dp_reference=False)[1])
    for chunk in (1, 4):
        for whole, part in zip(outcomes[0], outcomes[chunk]):
            if torch.cuda.is_available():  # cuBLAS picks kernels by batch shape: the loss to rounding
                assert dataclasses.replace(part.result, mean_loss=whole.result.mean_loss) == whole.result
                assert part.result.mean_loss == pytest.approx(whole.result.mean_loss, rel=1e-6)
            else:
                assert whole.result == part.result
            for name, value in whole.final.items():
                assert_same_bits_on_cpu(part.final[name], value, name)


def test_engine_choice_for_a_rule_with_its_own_loop(tiny):
    model = torch.nn.Linear(3, 1)
    assert unsupported_reason(model, RULE) is None
    assert choose_engine("auto", model, RULE) == "vectorized" and choose_engine("opacus", model, RULE) == "opacus"
    loop_only = ClientRule(local_train=train_bags)  # no batched loop: one client at a time
    assert "own local loop" in unsupported_reason(model, loop_only)
    assert choose_engine("auto", model, loop_only) == "opacus"
    with pytest.raises(ConfigError, match="vectorized cannot train this experiment: the algorithm"):
        choose_engine("vectorized", model, loop_only)
    with pytest.raises(ValueError, match="needs local_train"):
        ClientRule(local_train_batched=train_bags_batched)
    dropout = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5))
    assert "dropout" in unsupported_reason(dropout, RULE)  # the model's own limits still apply


def _numbers(path):
    rows = list(csv.DictReader(path.open()))
    return [{k: float(v) for k, v in row.items() if k != "wall_seconds" and _is_number(v)} for row in rows]


def _is_number(value):
    try:
        float(value)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("dataset", ["diabetes", "digits"])
def test_configs_bags_same_rounds_under_both_engines(tmp_path, dataset, caplog):
    """configs/bags.toml, 3 rounds: the vectorized engine's rounds.csv is Opacus' (train_bags')."""
    over = {"federation.rounds": 3, "strategy.bags.bag_size": 3, "strategy.bags.label_epsilon": 1.0,
            "client.momentum": 0.5, "data.dataset": dataset}
    if dataset == "digits":
        over.update({"model.name": "logreg", "strategy.bags.label_range": [], "data.classes": [0, 1, 2, 3],
                     "client.local_epochs": 2})
    runs = {}
    for engine in ("vectorized", "opacus", "auto"):
        with caplog.at_level("INFO", logger="fedsim"):
            cfg = load_config("configs/bags.toml", {**over, "runtime.engine": engine,
                                                    "output.dir": str(tmp_path / engine)})
            runs[engine] = _numbers(run_experiment(cfg, progress=False) / "rounds.csv")
    assert "engine: Opacus" not in caplog.text  # auto: vectorized
    assert len(runs["opacus"]) == 3 and runs["opacus"][0].keys() == runs["vectorized"][0].keys()
    for ours, reference in zip(runs["vectorized"], runs["opacus"]):
        for key, value in reference.items():
            assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert runs["auto"] == runs["vectorized"]
