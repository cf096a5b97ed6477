"""FedSVD's server half: the refactorization B A = B' A' with orthonormal A', when it runs
(`prepare_round`), and that the averaged B is merged into the A that was sent."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedsim import records as R
from fedsim.strategies.fedsvd import FedSVD, refactorize

rng = np.random.default_rng(0)


@pytest.mark.parametrize("method", ["exact", "randomized"])
@pytest.mark.parametrize("shape", [(32, 20, 4), (5, 64, 8), (64, 64, 8), (10, 10, 10)])
def test_refactorization_preserves_product_and_orthonormalizes_a(method, shape):
    d_out, d_in, r = shape
    b, a = rng.normal(size=(d_out, r)), rng.normal(size=(r, d_in))
    b_new, a_new = refactorize(b, a, method)
    np.testing.assert_allclose(b_new @ a_new, b @ a, atol=1e-9)
    np.testing.assert_allclose(a_new @ a_new.T, np.eye(r), atol=1e-9)
    # B_new = U_r S_r: its columns are orthogonal with non-increasing norms (the singular values)
    gram = b_new.T @ b_new
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-8)
    assert np.all(np.diff(np.sqrt(np.diag(gram))) <= 1e-9)


def test_rank_deficient_product_keeps_a_orthonormal():
    b = np.zeros((16, 4))
    b[:, 0] = rng.normal(size=16)  # rank(BA) = 1
    a = rng.normal(size=(4, 12))
    b_new, a_new = refactorize(b, a)
    np.testing.assert_allclose(b_new @ a_new, b @ a, atol=1e-10)
    np.testing.assert_allclose(a_new @ a_new.T, np.eye(4), atol=1e-10)


@pytest.mark.parametrize("method", ["exact", "randomized"])
@pytest.mark.parametrize("shape", [(16, 12, 4), (3, 12, 6)])  # rank(B A) = 1 < r, and d_out < r
def test_rank_deficient_product_keeps_a_in_the_span_of_the_previous_a(method, shape):
    """The rows of B A lie in span(A), so a refactorized A must too, including the rows that
    complete it where B A has fewer than r directions: those come from the previous A, never
    from the randomized SVD's random projection (FedSVD's A_i stays in span(A_0))."""
    d_out, d_in, r = shape
    b = np.zeros((d_out, r))
    b[:, 0] = rng.normal(size=d_out)  # rank(B A) = 1
    a = rng.normal(size=(r, d_in))
    b_new, a_new = refactorize(b, a, method)
    np.testing.assert_allclose(b_new @ a_new, b @ a, atol=1e-10)
    np.testing.assert_allclose(a_new @ a_new.T, np.eye(r), atol=1e-10)
    projector = a.T @ np.linalg.solve(a @ a.T, a)  # onto span(rows of A)
    residual = np.abs(a_new - a_new @ projector).max()
    assert residual < 1e-6, f"A left span(A) by {residual:.2g}"


def test_refactorization_by_hand():
    """B A = [[3, 0], [0, 0]] (rank 1) with A = [[0, 1], [1, 0]]: A' = [[+-1, 0], [0, +-1]],
    B' = [[3, 0], [0, 0]] up to the signs, which B' A' fixes."""
    b, a = np.array([[0.0, 3.0], [0.0, 0.0]]), np.array([[0.0, 1.0], [1.0, 0.0]])
    b_new, a_new = refactorize(b, a)
    np.testing.assert_allclose(np.abs(a_new), np.eye(2), atol=1e-12)
    np.testing.assert_allclose(np.abs(b_new[:, 0]), [3.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(b_new @ a_new, [[3.0, 0.0], [0.0, 0.0]], atol=1e-12)


# ----------------------------------------------------------------------------- the Strategy

def adapters():
    """Two LoRA layers and one plain tensor, as a lora-mlp's federated record holds them."""
    return {"0.lora_A.weight": rng.normal(size=(3, 6)).astype(np.float32),
            "0.lora_B.weight": rng.normal(size=(5, 3)).astype(np.float32),
            "2.lora_A.weight": rng.normal(size=(3, 5)).astype(np.float32),
            "2.lora_B.weight": rng.normal(size=(4, 3)).astype(np.float32),
            "2.base.bias": rng.normal(size=4).astype(np.float32)}


def sent_arrays(strategy, server_round, arrays, flower):
    messages = list(strategy.configure_train(server_round, R.numpy_to_record(arrays), ConfigRecord(),
                                             flower.grid(2)))
    assert len(messages) == 2
    return R.record_to_numpy(messages[0].content.array_records[R.ARRAYS])


def fedsvd(period=1, method="exact"):
    return FedSVD(svd_period=period, svd_method=method, weighted_by_key=R.NUM_EXAMPLES, fraction_train=1.0,
                  min_train_nodes=2, min_available_nodes=2)


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_prepare_round_refactorizes_every_layer_from_round_two(flower, method):
    arrays = adapters()
    s = fedsvd(method=method)
    first = sent_arrays(s, 1, arrays, flower)  # round 1: B0 A0 as initialized
    assert all(np.array_equal(first[k], arrays[k]) for k in arrays)
    sent = sent_arrays(s, 2, arrays, flower)
    for layer in ("0", "2"):
        a, b = sent[f"{layer}.lora_A.weight"], sent[f"{layer}.lora_B.weight"]
        assert a.shape == arrays[f"{layer}.lora_A.weight"].shape and a.dtype == np.float32
        np.testing.assert_allclose(b @ a, arrays[f"{layer}.lora_B.weight"] @ arrays[f"{layer}.lora_A.weight"],
                                   atol=1e-4)
        np.testing.assert_allclose(a @ a.T, np.eye(3), atol=1e-5)
        assert not np.allclose(a, arrays[f"{layer}.lora_A.weight"])
    np.testing.assert_array_equal(sent["2.base.bias"], arrays["2.base.bias"])  # not an adapter: untouched
    # prepare_round on a record gives what configure_train sent (the same factors for "exact";
    # "randomized" draws its own projection, so compare the products there)
    direct = R.record_to_numpy(fedsvd(method=method).prepare_round(2, R.numpy_to_record(arrays)))
    for layer in ("0", "2"):
        a, b = f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"
        np.testing.assert_allclose(direct[b] @ direct[a], sent[b] @ sent[a], atol=1e-4)
        if method == "exact":
            np.testing.assert_allclose(direct[a], sent[a], atol=1e-6)
    assert fedsvd().prepare_round(1, record := R.numpy_to_record(arrays)) is record  # round 1: as it is


def test_period_skips_rounds_in_between(flower):
    arrays = adapters()
    s = fedsvd(period=2)
    for server_round, refactorized in [(1, False), (2, False), (3, True), (4, False), (5, True)]:
        sent = sent_arrays(s, server_round, arrays, flower)
        assert (not np.array_equal(sent["0.lora_A.weight"], arrays["0.lora_A.weight"])) == refactorized


def test_averaged_b_is_merged_into_the_refactorized_a_that_was_sent(flower):
    arrays = adapters()
    s = fedsvd()
    sent = sent_arrays(s, 2, arrays, flower)
    b_keys = ["0.lora_B.weight", "2.lora_B.weight"]
    clients = [({k: rng.normal(size=arrays[k].shape).astype(np.float32) for k in b_keys}, n) for n in (1, 3)]
    replies = [flower.reply(RecordDict({R.ARRAYS: R.numpy_to_record(b), R.METRICS: MetricRecord({R.NUM_EXAMPLES: n})}))
               for b, n in clients]
    merged = R.record_to_numpy(s.aggregate_train(2, replies)[0])
    assert set(merged) == set(arrays)
    for k in b_keys:
        np.testing.assert_allclose(merged[k], (clients[0][0][k] + 3 * clients[1][0][k]) / 4, rtol=1e-5, atol=1e-6)
    for k in ("0.lora_A.weight", "2.lora_A.weight", "2.base.bias"):
        np.testing.assert_array_equal(merged[k], sent[k])  # A as sent this round, not the old A


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="svd_period"):
        FedSVD(svd_period=0)
    with pytest.raises(ValueError, match="svd_method"):
        FedSVD(svd_method="qr")
