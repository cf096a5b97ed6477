"""FedLD's aggregation against a literal numpy re-derivation; margin control; FedProx and SCAFFOLD."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from clients.losses import margin_loss, proximal_step
from fedsim.run import run_experiment
from strategies.fedld import principal_gradient_update


def reference_update(g: np.ndarray, k_fraction: float, normalization: str) -> np.ndarray:
    """Steps 1-5 of the issue, one loop at a time."""
    m, d = g.shape
    h = g @ g.T / m
    e, s, _ = np.linalg.svd(h)
    k = max(1, int(k_fraction * m))
    v = [g.T @ e[:, j] for j in range(k)]
    for j in range(k):
        negative = sum(1 for i in range(m) if g[i] @ v[j] < 0)
        if negative > m - negative:
            v[j] = -v[j]
    total = s.sum() if normalization == "all" else s[:k].sum()
    out = np.zeros(d)
    for i in range(m):
        for j in range(k):
            norm_v = np.linalg.norm(v[j])
            if norm_v == 0 or total == 0:
                continue
            sign = 1.0 if g[i] @ v[j] >= 0 else -1.0
            out += sign * (s[j] / total) * np.linalg.norm(g[i]) * v[j] / norm_v
    return out / m


rng = np.random.default_rng(0)
CASES = {
    "random m=5": rng.normal(size=(5, 40)),
    "random m=10": rng.normal(size=(10, 7)),
    "m=1": rng.normal(size=(1, 12)),
    "m=2": rng.normal(size=(2, 12)),
    "rank-deficient": np.outer(rng.normal(size=4), rng.normal(size=9)),
    "rank-deficient, repeated rows": np.repeat(rng.normal(size=(2, 6)), 3, axis=0),
    "all zero": np.zeros((3, 5)),
}


@pytest.mark.parametrize("normalization", ["all", "topk"])
@pytest.mark.parametrize("case", list(CASES))
def test_aggregation_matches_numpy_rederivation(case, normalization):
    g = CASES[case]
    got = principal_gradient_update(g, 0.8, normalization)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, reference_update(g, 0.8, normalization), atol=1e-10)


def test_single_client_topk_returns_its_update():
    g = CASES["m=1"]
    np.testing.assert_allclose(principal_gradient_update(g, 0.8, "topk"), g[0], atol=1e-12)


def test_all_normalization_shrinks_updates_topk_does_not():
    g = rng.normal(size=(10, 50))
    assert np.linalg.norm(principal_gradient_update(g, 0.8, "all")) < np.linalg.norm(
        principal_gradient_update(g, 0.8, "topk"))


def test_margin_loss_closed_forms():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # softmax rows (.5,.5) and (.75,.25)
    sq = [0.5, 0.625]
    batch = margin_loss(0.1, "batch")(logits, None)
    sample = margin_loss(0.1, "sample")(logits, None)
    assert float(batch) == pytest.approx(0.1 * math.log(1 + sum(sq)))
    assert float(sample) == pytest.approx(0.1 * np.mean([math.log(1 + v) for v in sq]))


def test_proximal_post_step_equals_proximal_loss_gradient():
    """Without DP the post-step pull is exactly SGD on loss + mu/2 ||w - w_g||^2."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    mu, lr = 0.5, 0.1
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    anchor = {k: v.detach().clone() for k, v in a.named_parameters()}
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=lr), torch.optim.SGD(b.parameters(), lr=lr)
    pull = proximal_step(a, anchor, mu, lr)
    for _ in range(5):
        opt_a.zero_grad()
        torch.nn.functional.cross_entropy(a(x), y).backward()
        opt_a.step()
        pull()
        opt_b.zero_grad()
        prox = sum(((p - anchor[k]) ** 2).sum() for k, p in b.named_parameters())
        (torch.nn.functional.cross_entropy(b(x), y) + mu / 2 * prox).backward()
        opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


@pytest.mark.parametrize("strategy", ["fedld", "scaffold", "fedprox", "fedadam"])
def test_strategies_train_under_label_skew_with_dp(tiny, strategy):
    cfg = tiny(**{"strategy.name": strategy, "data.partitioner": "dirichlet", "data.alpha": 0.3,
                  "privacy.noise_multiplier": 0.5, "federation.rounds": 3})
    out = run_experiment(cfg, progress=False)
    rows = list(csv.DictReader((out / "rounds.csv").open()))
    assert len(rows) == 3 and all(math.isfinite(float(r["metric"])) for r in rows)
    assert float(rows[-1]["sample_epsilon_max"]) > 0  # post-processing keeps DP-SGD's epsilon


def test_scaffold_with_zero_controls_first_round_equals_fedavg(tiny, tmp_path):
    kw = {"federation.rounds": 1, "federation.clients_per_round": 6}
    a = run_experiment(tiny(**kw, **{"strategy.name": "fedavg", "output.dir": str(tmp_path / "a")}),
                       progress=False)
    b = run_experiment(tiny(**kw, **{"strategy.name": "scaffold", "output.dir": str(tmp_path / "b")}),
                       progress=False)
    ra = next(csv.DictReader((a / "rounds.csv").open()))
    rb = next(csv.DictReader((b / "rounds.csv").open()))
    assert float(ra["test_loss"]) == pytest.approx(float(rb["test_loss"]), rel=1e-6)
