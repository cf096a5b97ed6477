"""FedLD's client half: the margin-control term lambda log(1 + ||softmax(z)||^2), its closed
forms, padded batches, the per-sample form under DP-SGD, and its gradient in the local loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsim.clients.fedld import RULE, loss_term, margin_term
from fedsim.clients.trainer import train_local
from fedsim.algorithms import Hyper, TrainSettings
from fedsim.strategies.fedld import FedLDParams


def test_margin_closed_forms():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # softmax rows (.5,.5) and (.75,.25)
    sq = [0.5, 0.625]  # squared norms of the rows
    assert float(margin_term(logits, None, 0.1, "batch")) == pytest.approx(0.1 * math.log(1 + sum(sq)))
    assert float(margin_term(logits, None, 0.1, "sample")) == pytest.approx(
        0.1 * np.mean([math.log(1 + v) for v in sq]))
    # on a batch of one the two forms agree
    one = logits[1:]
    assert float(margin_term(one, None, 0.3, "batch")) == pytest.approx(float(margin_term(one, None, 0.3, "sample")))


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_masked_value_is_the_value_on_the_real_rows(mode):
    torch.manual_seed(0)
    logits = torch.randn(7, 4)
    logits[[1, 4, 6]] = 50.0 * torch.randn(3, 4)  # padding rows with wild values
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 0], dtype=torch.float32)
    real = logits[mask.bool()]
    masked = margin_term(logits, mask, 0.2, mode)
    assert float(masked) == pytest.approx(float(margin_term(real, None, 0.2, mode)), rel=1e-6)
    # an all-ones mask is the unmasked value
    assert float(margin_term(logits, torch.ones(7), 0.2, mode)) == pytest.approx(
        float(margin_term(logits, None, 0.2, mode)), rel=1e-6)


def test_dp_sgd_always_uses_the_per_sample_form():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    params = FedLDParams(margin_lambda=0.1, margin_mode="batch")
    batch, sample = margin_term(logits, None, 0.1, "batch"), margin_term(logits, None, 0.1, "sample")
    assert float(batch) != pytest.approx(float(sample))
    assert float(loss_term(logits, None, {}, Hyper(params, 0.1, private=False))) == pytest.approx(float(batch))
    assert float(loss_term(logits, None, {}, Hyper(params, 0.1, private=True))) == pytest.approx(float(sample))
    assert RULE.loss_term is loss_term and RULE.post_step is None and RULE.trainable == "all"


def test_the_local_loop_descends_task_loss_plus_margin():
    """Through `train_local` with the rule's loss_term: full-batch SGD on CE + lambda margin."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    hyper = Hyper(FedLDParams(margin_lambda=0.5, margin_mode="batch"), lr=0.2, private=False)
    train_local(a, x.numpy(), y.numpy(), TrainSettings(task="classification", local_steps=4, batch_size=16, lr=0.2),
                seed=0, loss_term=lambda out, mask, s: RULE.loss_term(out, mask, s, hyper), rule_state={})
    opt = torch.optim.SGD(b.parameters(), lr=0.2)
    for _ in range(4):
        opt.zero_grad()
        out = b(x)
        (torch.nn.functional.cross_entropy(out, y) + 0.5 * torch.log1p((torch.softmax(out, 1) ** 2).sum())).backward()
        opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
