"""FFA-LoRA's server half: clients upload B only; the server merges the example-weighted mean
of B into the A it sent, which never changes (so averaging B averages the products B A)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedsim import records as R
from fedsim.errors import ConfigError
from fedsim.strategies.ffa_lora import FFALoRA, check

A = np.array([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]], np.float32)  # r = 2, d_in = 3
B0 = np.zeros((2, 2), np.float32)


def ffa():
    return FFALoRA(weighted_by_key=R.NUM_EXAMPLES, fraction_train=1.0, min_train_nodes=2, min_available_nodes=2)


def reply(flower, b, n):
    return flower.reply(RecordDict({R.ARRAYS: R.numpy_to_record({"0.lora_B.weight": b}),
                                    R.METRICS: MetricRecord({R.NUM_EXAMPLES: n})}))


def test_aggregate_merges_the_averaged_b_into_the_sent_a(flower):
    s = ffa()
    arrays = {"0.lora_A.weight": A, "0.lora_B.weight": B0}
    messages = list(s.configure_train(1, R.numpy_to_record(arrays), ConfigRecord(), flower.grid(2)))
    assert all(np.array_equal(R.record_to_numpy(m.content[R.ARRAYS])["0.lora_A.weight"], A) for m in messages)
    b1 = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    b2 = np.array([[-1.0, 0.0], [1.0, 0.0]], np.float32)
    merged = R.record_to_numpy(s.aggregate_train(1, [reply(flower, b1, 1), reply(flower, b2, 3)])[0])
    # (1 b1 + 3 b2) / 4 = [[-0.5, 0.5], [1.5, 1]]
    np.testing.assert_allclose(merged["0.lora_B.weight"], [[-0.5, 0.5], [1.5, 1.0]], rtol=1e-6)
    np.testing.assert_array_equal(merged["0.lora_A.weight"], A)
    # with A shared, the mean of B gives the mean of the products B_k A exactly
    np.testing.assert_allclose(merged["0.lora_B.weight"] @ A, (b1 @ A + 3 * b2 @ A) / 4, rtol=1e-6)
    # next round sends the merged adapters unchanged (FFA-LoRA never refactorizes)
    nxt = list(s.configure_train(2, R.numpy_to_record(merged), ConfigRecord(), flower.grid(2)))
    sent = R.record_to_numpy(nxt[0].content[R.ARRAYS])
    assert all(np.array_equal(sent[k], merged[k]) for k in merged)


def test_no_valid_reply_gives_no_model(flower):
    s = ffa()
    list(s.configure_train(1, R.numpy_to_record({"0.lora_A.weight": A, "0.lora_B.weight": B0}), ConfigRecord(),
                           flower.grid(2)))
    arrays, _ = s.aggregate_train(1, [flower.error_reply()])
    assert arrays is None


def test_check_needs_a_lora_model(tiny):
    with pytest.raises(ConfigError, match="model.name"):
        check(None, tiny(**{"model.name": "mlp"}), None, [10])
    check(None, tiny(**{"model.name": "lora-mlp", "strategy.name": "ffa-lora"}), None, [10])
