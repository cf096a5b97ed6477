"""SCAFFOLD's client half with non-zero controls (Karimireddy et al. 2020, Algorithm 1):

    local step   y <- y - lr (grad f_i(y) + c - c_i)                       (line 10)
    option II    c_i+ = c_i - c + (x - y_i) / (K lr)                       (eq. 4)
    reply        delta c_i = c_i+ - c_i;  the node keeps c_i+

Both controls are non-zero and different everywhere, so a sign or an argument swapped
anywhere (c vs c_i, x vs y, the correction added instead of subtracted) changes a number.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from fedsim.clients.scaffold import RULE, option_two, post_step, setup
from fedsim.clients.trainer import train_local
from fedsim import records as R
from fedsim.algorithms import Hyper, RoundStart, TrainSettings
from fedsim.strategies.scaffold import ScaffoldParams


def test_option_two_by_hand():
    # x = [1, 2], y_i = [0.5, 1], K = 2, lr = 0.25: (x - y_i) / (K lr) = [0.5, 1] / 0.5 = [1, 2]
    # c_i+ = c_i - c + [1, 2] = [0.3 - 0.1 + 1, 0.4 + 0.2 + 2] = [1.2, 2.6]; delta = c_i+ - c_i = [0.9, 2.2]
    t = lambda *v: {"w": torch.tensor(v, dtype=torch.float64)}  # noqa: E731
    delta, new_c = option_two(t(1.0, 2.0), t(0.5, 1.0), server_c=t(0.1, -0.2), local_c=t(0.3, 0.4),
                              steps=2, lr=0.25)
    np.testing.assert_allclose(new_c["w"], [1.2, 2.6], rtol=1e-12)
    np.testing.assert_allclose(delta["w"], [0.9, 2.2], rtol=1e-12)
    # the node state goes out as it comes in (`RoundStart.node_state`): tensors
    assert isinstance(delta["w"], torch.Tensor) and isinstance(new_c["w"], torch.Tensor)


def test_setup_and_post_step_by_hand():
    t = lambda *v: {"w": torch.tensor(v, dtype=torch.float64)}  # noqa: E731
    hyper = Hyper(ScaffoldParams(), lr=0.5, private=False)
    start = RoundStart(hyper, global_params=t(0.0, 0.0), server_arrays=t(0.1, -0.2), node_state=t(0.3, 0.4))
    state = setup(start)
    np.testing.assert_allclose(state["correction"]["w"], [0.1 - 0.3, -0.2 - 0.4])  # c - c_i
    # new - lr (c - c_i) = [1, 2] - 0.5 [-0.2, -0.6] = [1.1, 2.3]
    np.testing.assert_allclose(post_step(t(1.0, 2.0), t(9.0, 9.0), state, hyper)["w"], [1.1, 2.3])
    # first participation: no c_i kept yet, so c_i = 0
    first = setup(RoundStart(hyper, t(0.0, 0.0), t(0.1, -0.2), {}))
    np.testing.assert_allclose(first["correction"]["w"], [0.1, -0.2])


def numpy_scaffold(w, b, x, y, c, c_i, lr, steps):
    """K full-batch steps of y <- y - lr (grad f(y) + c - c_i) for f = mean((x w^T + b - y)^2), float64."""
    w, b = w.astype(np.float64), b.astype(np.float64)
    n = len(y)
    for _ in range(steps):
        r = (x @ w.T)[:, 0] + b[0] - y  # residuals, (n,)
        grad_w = 2.0 / n * (r @ x)[None, :]
        grad_b = np.array([2.0 / n * r.sum()])
        w = w - lr * (grad_w + c["weight"] - c_i["weight"])
        b = b - lr * (grad_b + c["bias"] - c_i["bias"])
    return {"weight": w, "bias": b}


def test_k_local_steps_and_option_two_match_a_literal_numpy_loop():
    rng = np.random.default_rng(0)
    n, d, lr, steps = 12, 3, 0.1, 5
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5]) + 0.3).astype(np.float32)
    torch.manual_seed(0)
    model = torch.nn.Linear(d, 1)
    x0 = {k: p.detach().double().numpy().copy() for k, p in model.named_parameters()}
    c = {"weight": rng.normal(size=(1, d)), "bias": rng.normal(size=1)}
    c_i = {"weight": rng.normal(size=(1, d)), "bias": rng.normal(size=1)}
    as_torch = lambda a: {k: torch.tensor(v, dtype=torch.float32) for k, v in a.items()}  # noqa: E731

    hyper = Hyper(ScaffoldParams(), lr=lr, private=False)
    start = RoundStart(hyper, {k: p.detach().clone() for k, p in model.named_parameters()},
                       server_arrays=as_torch(c), node_state=as_torch(c_i))
    state = RULE.setup(start)
    settings = TrainSettings(task="regression", local_steps=steps, batch_size=n, lr=lr)  # full batch, no DP
    result = train_local(model, x, y, settings, seed=0, rule_state=state,
                         post_step=lambda new, old, s: RULE.post_step(new, old, s, hyper))
    assert result.steps == steps

    expected = numpy_scaffold(x0["weight"], x0["bias"], x.astype(np.float64), y.astype(np.float64),
                              c, c_i, lr, steps)
    final = {k: p.detach().clone() for k, p in model.named_parameters()}
    for k in expected:
        np.testing.assert_allclose(final[k].double().numpy(), expected[k], rtol=1e-5, atol=1e-6)
    # the correction did act: plain SGD lands elsewhere
    plain = numpy_scaffold(x0["weight"], x0["bias"], x.astype(np.float64), y.astype(np.float64),
                           {k: 0 * v for k, v in c.items()}, {k: 0 * v for k, v in c.items()}, lr, steps)
    assert np.abs(plain["weight"] - expected["weight"]).max() > 0.05

    delta, new_c = RULE.finish(start, state, final, result.steps, hyper)
    for k in expected:
        hand_new = c_i[k] - c[k] + (x0[k] - expected[k]) / (steps * lr)
        np.testing.assert_allclose(new_c[k], hand_new, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(delta[k], hand_new - c_i[k], rtol=1e-4, atol=1e-5)


def test_clientapp_train_reads_c_and_c_i_and_replies_delta_c_i(tiny, flower):
    """Through the ClientApp handler: c arrives in the message, c_i in the node's state; the
    reply carries delta c_i and the node keeps c_i+ (checked against the reply's own model)."""
    from fedsim.clients.app import train
    from fedsim.datasets import load_dataset
    from fedsim.experiment import run_config_for
    from fedsim.models import build_model

    lr, steps = 0.1, 3
    cfg = tiny(**{"strategy.name": "scaffold", "model.name": "logreg", "client.lr": lr,
                  "client.local_steps": steps})
    data = load_dataset(cfg.data, cfg.federation.num_clients, cfg.seed)
    sent = R.model_to_record(build_model(cfg.model, data, cfg.seed))
    x = {k: v.astype(np.float64) for k, v in R.record_to_numpy(sent).items()}
    rng = np.random.default_rng(1)
    c = {k: (0.5 * rng.normal(size=v.shape)).astype(np.float32) for k, v in x.items()}
    c_i = {k: (0.5 * rng.normal(size=v.shape)).astype(np.float32) for k, v in x.items()}

    def train_with(server_c, node_c):
        content = RecordDict({R.ARRAYS: sent, R.CONFIG: ConfigRecord({R.SERVER_ROUND: 1}),
                              R.ALGORITHM_ARRAYS: R.numpy_to_record(server_c)})
        msg = flower.train(content, node_id=1000)
        ctx = Context(run_id=1, node_id=1000, node_config={"partition-id": 0, "num-partitions": 6},
                      state=RecordDict({R.ALGORITHM_STATE: R.numpy_to_record(node_c)}),
                      run_config=run_config_for(cfg))
        return train(msg, ctx), ctx

    reply, ctx = train_with(c, c_i)
    assert reply.content[R.METRICS][R.LOCAL_STEPS] == steps
    y = {k: v.astype(np.float64) for k, v in R.record_to_numpy(reply.content[R.ARRAYS]).items()}
    delta = R.record_to_numpy(reply.content[R.ALGORITHM_ARRAYS])
    kept = R.record_to_numpy(ctx.state.array_records[R.ALGORITHM_STATE])
    assert set(delta) == set(kept) == set(x)
    for k in x:
        hand_new = c_i[k] - c[k] + (x[k] - y[k]) / (steps * lr)
        np.testing.assert_allclose(kept[k], hand_new, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(delta[k], hand_new - c_i[k], rtol=1e-4, atol=1e-5)

    # the drift correction points the right way: against plain SGD from the same batches (same
    # seed), the model moved by about -K lr (c - c_i); the gradients differ only at second order
    plain, _ = train_with({k: 0 * v for k, v in c.items()}, {k: 0 * v for k, v in c.items()})
    y0 = R.record_to_numpy(plain.content[R.ARRAYS])
    moved = np.concatenate([(y[k] - y0[k]).ravel() for k in x])
    predicted = np.concatenate([(-steps * lr * (c[k] - c_i[k])).ravel() for k in x])
    cosine = moved @ predicted / np.linalg.norm(moved) / np.linalg.norm(predicted)
    assert cosine > 0.99, cosine  # measured 0.9998 (norm ratio 0.997); a flipped sign gives -1
    assert np.linalg.norm(moved) == pytest.approx(np.linalg.norm(predicted), rel=0.05)
