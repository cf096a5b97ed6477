"""SCAFFOLD's server half on hand arrays (Karimireddy et al. 2020, Algorithm 1, lines 16-17):

    x <- x + eta_g (avg_i y_i - x)          c <- c + (1/N) sum_i delta c_i

with avg_i weighted by the clients' example counts (fedsim's documented choice) and N the
total number of clients, not the m that replied.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.exception import AggregationError

from fedsim import records as R
from fedsim.strategies.scaffold import Scaffold, ScaffoldParams, build

# the model x, the server control c, and three clients' (y_i, n_i, delta c_i)
X = {"w": np.array([2.0, -1.0], np.float32), "m": np.array([[0.5, -0.25], [1.5, 3.0]], np.float32)}
C = {"w": np.array([0.2, -0.4], np.float32), "m": np.array([[0.1, 0.0], [-0.3, 0.2]], np.float32)}
CLIENTS = [
    ({"w": np.array([4.0, 1.0], np.float32), "m": np.array([[1.0, 0.0], [2.0, 2.0]], np.float32)}, 1,
     {"w": np.array([0.4, 0.8], np.float32), "m": np.array([[0.2, 0.4], [0.0, -0.4]], np.float32)}),
    ({"w": np.array([0.0, -3.0], np.float32), "m": np.array([[0.0, -1.0], [1.0, 4.0]], np.float32)}, 3,
     {"w": np.array([-0.2, 0.4], np.float32), "m": np.array([[0.6, 0.0], [0.2, 0.0]], np.float32)}),
]
ETA_G, N = 0.5, 4


def reply_content(y, n, delta_c, loss=1.0):
    return RecordDict({R.ARRAYS: R.numpy_to_record(y),
                       R.METRICS: MetricRecord({R.NUM_EXAMPLES: n, R.TRAIN_LOSS: loss}),
                       R.ALGORITHM_ARRAYS: R.numpy_to_record(delta_c)})


def snapshot(msg):
    """Everything a reply carries, as plain bytes and numbers."""
    content = msg.content
    return ({name: {k: bytes(a.data) for k, a in rec.items()} for name, rec in content.array_records.items()},
            {name: dict(rec) for name, rec in content.metric_records.items()})


def strategy(**kw):
    return Scaffold(global_lr=ETA_G, num_clients=N, weighted_by_key=R.NUM_EXAMPLES, **kw)


def test_model_and_control_updates_match_the_hand_computation(flower):
    s = strategy()
    s.current = {k: v.copy() for k, v in X.items()}
    s.control = {k: v.copy() for k, v in C.items()}
    replies = [flower.reply(reply_content(y, n, dc, loss), node_id=1000 + i)
               for i, ((y, n, dc), loss) in enumerate(zip(CLIENTS, (2.0, 1.0)))]
    before = [snapshot(r) for r in replies]

    arrays, metrics = s.aggregate_train(3, replies)
    out = R.record_to_numpy(arrays)

    # "w" by hand: avg = (1 [4, 1] + 3 [0, -3]) / 4 = [1, -2]; x + 0.5 (avg - x) = [1.5, -1.5]
    np.testing.assert_allclose(out["w"], [1.5, -1.5], rtol=1e-6)
    # c + (1/4) ([0.4, 0.8] + [-0.2, 0.4]) = [0.2 + 0.05, -0.4 + 0.3] = [0.25, -0.1]
    np.testing.assert_allclose(s.control["w"], [0.25, -0.1], rtol=1e-6)
    # "m": the same formulas in float64
    ns = np.array([n for _, n, _ in CLIENTS], np.float64)
    avg = sum(n * y["m"].astype(np.float64) for y, n, _ in CLIENTS) / ns.sum()
    np.testing.assert_allclose(out["m"], X["m"] + ETA_G * (avg - X["m"]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s.control["m"], C["m"] + sum(dc["m"] for _, _, dc in CLIENTS) / N,
                               rtol=1e-6, atol=1e-7)
    assert out["w"].dtype == np.float32 and set(out) == set(X)
    assert metrics[R.TRAIN_LOSS] == pytest.approx((1 * 2.0 + 3 * 1.0) / 4)  # example-weighted too
    # the replies are read, never changed: the same records, byte for byte
    assert [snapshot(r) for r in replies] == before


def test_eta_g_one_with_zero_control_is_the_weighted_average(flower):
    s = Scaffold(global_lr=1.0, num_clients=2, weighted_by_key=R.NUM_EXAMPLES)
    s.current, s.control = dict(X), {k: np.zeros_like(v) for k, v in X.items()}
    arrays, _ = s.aggregate_train(1, [flower.reply(reply_content(y, n, dc)) for y, n, dc in CLIENTS])
    np.testing.assert_allclose(R.record_to_numpy(arrays)["w"], [1.0, -2.0], rtol=1e-6)


def test_error_replies_are_left_out_of_both_updates(flower):
    s = strategy()
    s.current, s.control = dict(X), dict(C)
    y, n, dc = CLIENTS[1]
    arrays, _ = s.aggregate_train(2, [flower.error_reply(), flower.reply(reply_content(y, n, dc))])
    # one client: avg = y; x + 0.5 (y - x) = [1, -2]; c + [-0.2, 0.4] / 4 = [0.15, -0.3]
    np.testing.assert_allclose(R.record_to_numpy(arrays)["w"], [1.0, -2.0], rtol=1e-6)
    np.testing.assert_allclose(s.control["w"], [0.15, -0.3], rtol=1e-6)
    assert s.aggregate_train(3, [flower.error_reply()]) == (None, None)


def test_configure_sends_c_and_the_next_round_sends_the_updated_c(flower):
    """Round 1 sends c = 0 beside the model; after aggregation round 2 sends c + mean delta c_i
    (over N) and the new model, to every sampled node."""
    s = Scaffold(global_lr=ETA_G, num_clients=N, weighted_by_key=R.NUM_EXAMPLES, fraction_train=1.0,
                 min_train_nodes=2, min_available_nodes=2)
    grid = flower.grid(2)
    messages = list(s.configure_train(1, R.numpy_to_record(X), ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == grid.node_ids
    for msg in messages:
        sent_c = R.record_to_numpy(msg.content.array_records[R.ALGORITHM_ARRAYS])
        assert set(sent_c) == set(X) and all(not v.any() for v in sent_c.values())
        np.testing.assert_array_equal(R.record_to_numpy(msg.content.array_records[R.ARRAYS])["w"], X["w"])
    arrays, _ = s.aggregate_train(1, [flower.reply(reply_content(y, n, dc)) for y, n, dc in CLIENTS])
    messages = list(s.configure_train(2, arrays, ConfigRecord(), grid))
    for msg in messages:
        sent_c = R.record_to_numpy(msg.content.array_records[R.ALGORITHM_ARRAYS])
        np.testing.assert_allclose(sent_c["w"], [(0.4 - 0.2) / 4, (0.8 + 0.4) / 4], rtol=1e-6)
        np.testing.assert_allclose(R.record_to_numpy(msg.content.array_records[R.ARRAYS])["w"], [1.5, -1.5])
    assert msg.content.config_records[R.CONFIG][R.SERVER_ROUND] == 2


def test_aggregate_before_configure_is_refused(flower):
    with pytest.raises(AggregationError, match="configure_train"):
        strategy().aggregate_train(1, [flower.reply(reply_content(*CLIENTS[0]))])


def test_build_takes_eta_g_from_the_table_and_n_from_the_federation(tiny):
    cfg = tiny(**{"strategy.name": "scaffold", "strategy.scaffold.server_lr": 0.25, "federation.num_clients": 7})
    s = build(cfg.strategy.params, cfg, {"weighted_by_key": R.NUM_EXAMPLES})
    assert (s.global_lr, s.num_clients) == (0.25, 7) and cfg.strategy.params == ScaffoldParams(server_lr=0.25)
    with pytest.raises(ValueError, match="num_clients"):
        Scaffold(num_clients=0)
