"""FedProx's client half: the pull after each step is exactly SGD on loss + mu/2 ||w - w_g||^2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.clients.fedprox import RULE, post_step, setup
from fedsim.clients.trainer import train_local
from fedsim.algorithms import Hyper, RoundStart, TrainSettings
from fedsim.strategies.fedprox import FedProxParams


def test_post_step_by_hand():
    t = lambda *v: {"w": torch.tensor(v, dtype=torch.float64)}  # noqa: E731
    hyper = Hyper(FedProxParams(mu=0.2), lr=0.5, private=False)
    state = setup(RoundStart(hyper, global_params=t(1.0, 1.0), server_arrays={}, node_state={}))
    np.testing.assert_array_equal(state["anchor"]["w"], [1.0, 1.0])
    # new - lr mu (old - anchor) = [1, 2] - 0.1 [2, 3] = [0.8, 1.7]: the pre-step distance, not new's
    np.testing.assert_allclose(post_step(t(1.0, 2.0), t(3.0, 4.0), state, hyper)["w"], [0.8, 1.7])
    assert post_step(t(1.0, 2.0), t(3.0, 4.0), state, Hyper(FedProxParams(mu=0.0), 0.5, False))["w"].tolist() == [1, 2]


@pytest.mark.parametrize("mu", [0.5, 2.0])
def test_post_step_equals_the_proximal_loss_gradient(mu):
    """Without DP, `train_local` with the rule's hooks is SGD on CE + mu/2 ||w - w_g||^2."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    lr, steps = 0.1, 5
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    anchor = {k: v.detach().clone() for k, v in a.named_parameters()}
    hyper = Hyper(FedProxParams(mu=mu), lr=lr, private=False)
    state = RULE.setup(RoundStart(hyper, anchor, {}, {}))
    train_local(a, x.numpy(), y.numpy(), TrainSettings(task="classification", local_steps=steps, batch_size=8, lr=lr),
                seed=0, post_step=lambda new, old, s: RULE.post_step(new, old, s, hyper), rule_state=state)
    opt = torch.optim.SGD(b.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        prox = sum(((p - anchor[k]) ** 2).sum() for k, p in b.named_parameters())
        (torch.nn.functional.cross_entropy(b(x), y) + mu / 2 * prox).backward()
        opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    # and the pull mattered: plain SGD ends elsewhere
    c = torch.nn.Linear(5, 3)
    c.load_state_dict({k: v for k, v in anchor.items()})
    train_local(c, x.numpy(), y.numpy(), TrainSettings(task="classification", local_steps=steps, batch_size=8, lr=lr))
    assert (c.weight - a.weight).abs().max() > 1e-3
