"""FedLD's server half: principal-gradient aggregation against a literal numpy re-derivation
of the steps in `strategies.fedld`, alone and through `FedLD.aggregate_train`."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedsim import records as R
from fedsim.strategies.fedld import FedLD, principal_gradient_update


def reference_update(g: np.ndarray, k_fraction: float, normalization: str) -> np.ndarray:
    """Steps 1-5 of the method, one loop at a time."""
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


def test_identical_clients_get_their_common_update():
    """All clients agree: G has rank 1, s_1 / S = 1, and every Delta~_i = Delta."""
    delta = rng.normal(size=8)
    np.testing.assert_allclose(principal_gradient_update(np.tile(delta, (4, 1)), 0.5, "all"), delta, atol=1e-12)


def test_all_normalization_shrinks_updates_topk_does_not():
    g = rng.normal(size=(10, 50))
    assert np.linalg.norm(principal_gradient_update(g, 0.8, "all")) < np.linalg.norm(
        principal_gradient_update(g, 0.8, "topk"))


# ----------------------------------------------------------------------------- the Strategy

THETA = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=3).astype(np.float32),
         "scale": np.array([2.0], np.float32)}
MODELS = [{k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in THETA.items()} for _ in range(5)]
SIZES = [10, 20, 30, 40, 500]  # FedLD ignores them: its means are plain


def replies(flower):
    return [flower.reply(RecordDict({R.ARRAYS: R.numpy_to_record(m),
                                     R.METRICS: MetricRecord({R.NUM_EXAMPLES: n})}), node_id=1000 + i)
            for i, (m, n) in enumerate(zip(MODELS, SIZES))]


def fedld(flower, normalization="all"):
    s = FedLD(k_fraction=0.8, normalization=normalization, weighted_by_key=R.NUM_EXAMPLES,
              fraction_train=1.0, min_train_nodes=5, min_available_nodes=5)
    list(s.configure_train(2, R.numpy_to_record(THETA), ConfigRecord(), flower.grid(5)))  # sets theta_g
    return s


def test_round_one_is_the_plain_mean(flower):
    arrays, _ = fedld(flower).aggregate_train(1, replies(flower))
    out = R.record_to_numpy(arrays)
    for k in THETA:
        np.testing.assert_allclose(out[k], np.mean([m[k] for m in MODELS], axis=0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("normalization", ["all", "topk"])
def test_later_rounds_add_the_principal_update_per_tensor(flower, normalization):
    arrays, _ = fedld(flower, normalization).aggregate_train(2, replies(flower))
    out = R.record_to_numpy(arrays)
    for k in ("w", "b"):
        deltas = np.stack([m[k].astype(np.float64) - THETA[k] for m in MODELS]).reshape(5, -1)
        expected = THETA[k] + reference_update(deltas, 0.8, normalization).reshape(THETA[k].shape)
        np.testing.assert_allclose(out[k], expected, rtol=1e-5, atol=1e-6)
        assert out[k].dtype == np.float32
        # and it is not the mean: the principal directions did change the step
        assert np.abs(out[k] - np.mean([m[k] for m in MODELS], axis=0)).max() > 1e-3
    # a scalar tensor has no directions to pick: the plain mean
    np.testing.assert_allclose(out["scale"], np.mean([m["scale"] for m in MODELS], axis=0), rtol=1e-6)


def test_errors_are_skipped_and_no_reply_gives_nothing(flower):
    s = fedld(flower)
    ok = replies(flower)
    arrays, _ = s.aggregate_train(1, [flower.error_reply(), *ok])
    np.testing.assert_allclose(R.record_to_numpy(arrays)["w"], np.mean([m["w"] for m in MODELS], axis=0),
                               rtol=1e-6, atol=1e-6)
    assert s.aggregate_train(2, [flower.error_reply()]) == (None, None)
    with pytest.raises(ValueError, match="k_fraction"):
        FedLD(k_fraction=0.0)
