"""FedDyn's client half (Acar et al. 2021, Algorithm 1) on hand arrays:

    local step   theta <- theta - lr (grad L_i(theta) - g_i + alpha (theta - theta^{t-1}))
    after K      g_i <- g_i - alpha (theta_i^t - theta^{t-1});  the node keeps g_i, replies nothing

g_i and theta^{t-1} are non-zero and different everywhere, so a swapped sign or argument
changes a number.
"""

from __future__ import annotations

import numpy as np
import torch

from fedsim.algorithms import Hyper, RoundStart, TrainSettings
from fedsim.clients.feddyn import RULE, finish, post_step, setup
from fedsim.clients.trainer import train_local
from fedsim.strategies.feddyn import FedDynParams


def t(*v):
    return {"w": torch.tensor(v, dtype=torch.float64)}


def test_setup_post_step_and_finish_by_hand():
    hyper = Hyper(FedDynParams(alpha=0.5), lr=0.1, private=False)
    start = RoundStart(hyper, global_params=t(1.0, -1.0), server_arrays={}, node_state=t(0.2, 0.4))
    state = setup(start)
    # new + lr g_i - lr alpha (old - anchor) = [2, 3] + 0.1 [0.2, 0.4] - 0.05 ([3, 1] - [1, -1]) = [1.92, 2.94]
    np.testing.assert_allclose(post_step(t(2.0, 3.0), t(3.0, 1.0), state, hyper)["w"], [1.92, 2.94])
    # g_i - alpha (final - theta) = [0.2, 0.4] - 0.5 ([2, 0] - [1, -1]) = [-0.3, -0.1]
    reply, kept = finish(start, state, t(2.0, 0.0), steps=3, hyper=hyper)
    assert reply == {} and isinstance(kept["w"], torch.Tensor)
    np.testing.assert_allclose(kept["w"], [-0.3, -0.1])
    # first participation: g_i = 0
    first = RoundStart(hyper, t(1.0, -1.0), {}, {})
    np.testing.assert_allclose(setup(first)["gradient"]["w"], [0.0, 0.0])
    np.testing.assert_allclose(finish(first, setup(first), t(2.0, 0.0), 3, hyper)[1]["w"], [-0.5, -0.5])


def numpy_feddyn(w, b, x, y, anchor, g, lr, alpha, steps):
    """K full-batch steps of SGD on mean((x w^T + b - y)^2) - <g, theta> + alpha/2 ||theta - anchor||^2."""
    n = len(y)
    for _ in range(steps):
        r = (x @ w.T)[:, 0] + b[0] - y
        grad_w = 2.0 / n * (r @ x)[None, :] - g["weight"] + alpha * (w - anchor["weight"])
        grad_b = np.array([2.0 / n * r.sum()]) - g["bias"] + alpha * (b - anchor["bias"])
        w, b = w - lr * grad_w, b - lr * grad_b
    return {"weight": w, "bias": b}


def test_k_local_steps_match_sgd_on_the_feddyn_objective():
    rng = np.random.default_rng(0)
    n, d, lr, alpha, steps = 12, 3, 0.1, 0.7, 5
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5]) + 0.3).astype(np.float32)
    torch.manual_seed(0)
    model = torch.nn.Linear(d, 1)
    theta = {k: p.detach().clone() for k, p in model.named_parameters()}
    g = {"weight": rng.normal(size=(1, d)), "bias": rng.normal(size=1)}
    # the model starts away from the anchor, so the pull acts from the first step
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    x0 = {k: p.detach().double().numpy().copy() for k, p in model.named_parameters()}

    hyper = Hyper(FedDynParams(alpha=alpha), lr=lr, private=False)
    start = RoundStart(hyper, theta, {}, {k: torch.tensor(v, dtype=torch.float32) for k, v in g.items()})
    state = RULE.setup(start)
    settings = TrainSettings(task="regression", local_steps=steps, batch_size=n, lr=lr)  # full batch, no DP
    result = train_local(model, x, y, settings, seed=0, rule_state=state,
                         post_step=lambda new, old, s: RULE.post_step(new, old, s, hyper))
    anchor = {k: v.double().numpy() for k, v in theta.items()}
    expected = numpy_feddyn(x0["weight"], x0["bias"], x.astype(np.float64), y.astype(np.float64), anchor, g,
                            lr, alpha, steps)
    final = {k: p.detach().clone() for k, p in model.named_parameters()}
    for k in expected:
        np.testing.assert_allclose(final[k].double().numpy(), expected[k], rtol=1e-5, atol=1e-6)
    plain = numpy_feddyn(x0["weight"], x0["bias"], x.astype(np.float64), y.astype(np.float64), anchor,
                         {k: 0 * v for k, v in g.items()}, lr, 0.0, steps)
    assert np.abs(plain["weight"] - expected["weight"]).max() > 0.05  # the two terms did act

    _, kept = RULE.finish(start, state, final, result.steps, start.hyper)
    for k in expected:
        np.testing.assert_allclose(kept[k], g[k] - alpha * (expected[k] - anchor[k]), rtol=1e-4, atol=1e-5)
