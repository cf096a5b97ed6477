"""FedDyn's server half on hand arrays (Acar et al. 2021, Algorithm 1):

    h^t     = h^{t-1} - alpha (1/m) sum_{i in P_t} (theta_i - theta^{t-1})
    theta^t = (1/|P_t|) sum_{i in P_t} theta_i - h^t / alpha

with m the total number of clients and the mean over the replying clients uniform (not
example-weighted, the documented decision).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedsim import records as R
from fedsim.algorithms import Hyper, RoundStart
from fedsim.clients.feddyn import finish
from fedsim.strategies.fedavg import Aggregate, RoundFedAvg, ServerHyper
from fedsim.strategies.feddyn import FedDynParams, build, server_update

THETA = {"w": np.array([1.0, -1.0], np.float32), "step": np.array(7, np.int64)}
CLIENTS = [({"w": [3.0, 1.0], "step": 9}, 1), ({"w": [1.0, -5.0], "step": 11}, 3)]
ALPHA, M = 0.5, 4


def reply(flower, y, n, node):
    arrays = {"w": np.asarray(y["w"], np.float32), "step": np.array(y["step"], np.int64)}
    return flower.reply(RecordDict({R.ARRAYS: R.numpy_to_record(arrays),
                                    R.METRICS: MetricRecord({R.NUM_EXAMPLES: n, R.TRAIN_LOSS: 1.0})}), node)


def strategy():
    return RoundFedAvg(server_update=server_update, params=FedDynParams(alpha=ALPHA), num_clients=M,
                       weighted_by_key=R.NUM_EXAMPLES)


def test_update_by_hand_through_the_strategy(flower):
    s = strategy()
    s.current = dict(THETA)
    s.server_state = {"w": np.array([0.2, 0.4], np.float32)}
    arrays, _ = s.aggregate_train(2, [reply(flower, y, n, 1000 + i) for i, (y, n) in enumerate(CLIENTS)])
    out = R.record_to_numpy(arrays)
    # sum = [4, -4], |P| = 2, mean = [2, -2]; sum - |P| theta = [2, -2]
    # h = [0.2, 0.4] - 0.5 / 4 [2, -2] = [-0.05, 0.65]; theta = [2, -2] - h / 0.5 = [2.1, -3.3]
    np.testing.assert_allclose(s.server_state["w"], [-0.05, 0.65], rtol=1e-6)
    np.testing.assert_allclose(out["w"], [2.1, -3.3], rtol=1e-6)
    assert out["w"].dtype == np.float32 and s.state_dict().keys() == {"w"}
    # an integer array takes the example-weighted mean, with no h: (1 * 9 + 3 * 11) / 4
    assert out["step"] == pytest.approx(10.5)


def test_first_round_starts_from_h_zero_and_the_mean_is_uniform(flower):
    s = strategy()
    s.current = dict(THETA)
    arrays, _ = s.aggregate_train(1, [reply(flower, y, n, 1000 + i) for i, (y, n) in enumerate(CLIENTS)])
    # h = -0.5 / 4 [2, -2] = [-0.25, 0.25]; theta = [2, -2] + [0.5, -0.5]. The example-weighted
    # mean would have been [1.5, -3.5]
    np.testing.assert_allclose(R.record_to_numpy(arrays)["w"], [2.5, -2.5], rtol=1e-6)


def test_server_h_is_the_mean_of_the_clients_kept_gradients():
    """Both halves together: with g_i <- g_i - alpha (theta_i - theta) on each client that
    trained (`clients.feddyn.finish`) and h updated over m, h = (1/m) sum_i g_i over all m
    clients in every round, under partial participation too (the paper's invariant)."""
    rng = np.random.default_rng(0)
    theta = {"w": rng.normal(size=3)}
    g = [np.zeros(3) for _ in range(M)]
    h: dict = {}
    params = FedDynParams(alpha=ALPHA)
    for rnd, clients in enumerate([(0, 1), (1, 2, 3), (0, 3)], start=1):
        trained = {i: {"w": theta["w"] + rng.normal(size=3)} for i in clients}
        for i, final in trained.items():
            start = RoundStart(Hyper(params, 0.1, False), {"w": torch.tensor(theta["w"])}, {},
                               {"w": torch.tensor(g[i])})
            _, kept = finish(start, {}, {"w": torch.tensor(final["w"])}, 1, start.hyper)
            g[i] = kept["w"].numpy()
        total = {"w": sum(t["w"] for t in trained.values())}
        aggregate = Aggregate(mean=total, model_sum=total, count=len(trained), extra_sum={})
        theta, h = server_update(theta, aggregate, h, ServerHyper(params, M, rnd))
        np.testing.assert_allclose(h["w"], sum(g) / M, rtol=1e-12, atol=1e-15)


def test_the_next_round_sends_the_corrected_model_and_no_extra_arrays(flower):
    s = strategy()
    messages = list(s.configure_train(1, R.numpy_to_record(THETA), ConfigRecord(), flower.grid(2)))
    assert all(R.ALGORITHM_ARRAYS not in m.content.array_records for m in messages)
    arrays, _ = s.aggregate_train(1, [reply(flower, y, n, 1000 + i) for i, (y, n) in enumerate(CLIENTS)])
    messages = list(s.configure_train(2, arrays, ConfigRecord(), flower.grid(2)))
    np.testing.assert_allclose(R.record_to_numpy(messages[0].content[R.ARRAYS])["w"], [2.5, -2.5], rtol=1e-6)


def test_replies_that_do_not_match_the_round_are_refused(flower):
    from flwr.serverapp.exception import AggregationError

    s = strategy()
    s.current = {"w": np.zeros(3, np.float32), "step": np.array(7, np.int64)}
    with pytest.raises(AggregationError, match="shape"):
        s.aggregate_train(1, [reply(flower, *CLIENTS[0], 1000)])
    s.current = {"v": np.zeros(2, np.float32)}
    with pytest.raises(AggregationError, match="keys"):
        s.aggregate_train(1, [reply(flower, *CLIENTS[0], 1000)])
    with pytest.raises(AggregationError, match="configure_train"):
        strategy().aggregate_train(1, [reply(flower, *CLIENTS[0], 1000)])


def test_build_takes_alpha_from_the_table_and_m_from_the_federation(tiny):
    cfg = tiny(**{"strategy.name": "feddyn", "strategy.feddyn.alpha": 0.1, "federation.num_clients": 7})
    s = build(cfg.strategy.params, cfg, {"weighted_by_key": R.NUM_EXAMPLES})
    assert (s.params.alpha, s.num_clients, s.server_update) == (0.1, 7, server_update)
    with pytest.raises(ValueError, match="num_clients"):
        RoundFedAvg(server_update=server_update, num_clients=0)
