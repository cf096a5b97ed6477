"""FedAvgM's server half (Hsu et al. 2019) on hand arrays, and against Flower's `FedAvgM` on
the same replies:

    d = x - avg_i y_i        v <- beta v + d   (v = d at first)        x <- x - eta v
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvgM as FlowerFedAvgM

from fedsim import records as R
from fedsim.strategies.fedavgm import FedAvgMParams, build

X = {"w": np.array([1.0, 2.0], np.float32)}
CLIENTS = [({"w": [3.0, 0.0]}, 1), ({"w": [-1.0, 4.0]}, 3)]  # example-weighted mean [0, 3]


def replies(flower, clients):
    return [flower.reply(RecordDict({R.ARRAYS: R.numpy_to_record({k: np.asarray(v, np.float32) for k, v in y.items()}),
                                     R.METRICS: MetricRecord({R.NUM_EXAMPLES: n, R.TRAIN_LOSS: 1.0})}), 1000 + i)
            for i, (y, n) in enumerate(clients)]


def strategy(tiny, **table):
    cfg = tiny(**{"strategy.name": "fedavgm", "federation.num_clients": 2, "federation.clients_per_round": 2,
                  **{f"strategy.fedavgm.{k}": v for k, v in table.items()}})
    return build(cfg.strategy.params, cfg, {"weighted_by_key": R.NUM_EXAMPLES, "min_train_nodes": 2,
                                            "min_available_nodes": 2})


def step(s, flower, rnd, arrays, clients=CLIENTS):
    list(s.configure_train(rnd, arrays, ConfigRecord(), flower.grid(2)))
    out, _ = s.aggregate_train(rnd, replies(flower, clients))
    return out


def test_two_rounds_by_hand(tiny, flower):
    s = strategy(tiny, server_lr=0.5, server_momentum=0.9)
    x1 = step(s, flower, 1, R.numpy_to_record(X))
    # d = [1, 2] - [0, 3] = [1, -1] = v; x = [1, 2] - 0.5 [1, -1] = [0.5, 2.5]
    np.testing.assert_allclose(R.record_to_numpy(x1)["w"], [0.5, 2.5], rtol=1e-6)
    np.testing.assert_allclose(s.state_dict()["w"], [1.0, -1.0], rtol=1e-6)
    x2 = step(s, flower, 2, x1)
    # d = [0.5, -0.5]; v = 0.9 [1, -1] + d = [1.4, -1.4]; x = [0.5, 2.5] - 0.5 v = [-0.2, 3.2]
    np.testing.assert_allclose(R.record_to_numpy(x2)["w"], [-0.2, 3.2], rtol=1e-6)
    np.testing.assert_allclose(s.state_dict()["w"], [1.4, -1.4], rtol=1e-6)


@pytest.mark.parametrize("lr, momentum", [(1.0, 0.0), (0.7, 0.0), (1.0, 0.9), (0.3, 0.5)])
def test_matches_flowers_fedavgm_round_by_round(tiny, flower, lr, momentum):
    rng = np.random.default_rng(0)
    shapes = {"a": (3, 2), "b": (4,)}
    ours = strategy(tiny, server_lr=lr, server_momentum=momentum)
    theirs = FlowerFedAvgM(server_learning_rate=lr, server_momentum=momentum, weighted_by_key=R.NUM_EXAMPLES,
                           min_train_nodes=2, min_available_nodes=2)
    x0 = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    mine, flowers = R.numpy_to_record(x0), R.numpy_to_record(x0)
    for rnd in (1, 2, 3):
        clients = [({k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}, n) for n in (2, 5)]
        mine, flowers = step(ours, flower, rnd, mine, clients), step(theirs, flower, rnd, flowers, clients)
        got, want = R.record_to_numpy(mine), R.record_to_numpy(flowers)
        for k in shapes:
            np.testing.assert_array_equal(got[k], want[k])  # the same operations in the same order


def test_momentum_zero_and_lr_one_is_fedavg_bit_for_bit(tiny, flower):
    from fedsim.strategies.fedavg import FedAvg

    s = strategy(tiny, server_lr=1.0, server_momentum=0.0)
    out = R.record_to_numpy(step(s, flower, 1, R.numpy_to_record(X)))
    fedavg, _ = FedAvg(weighted_by_key=R.NUM_EXAMPLES).aggregate_train(1, replies(flower, CLIENTS))
    np.testing.assert_array_equal(out["w"], R.record_to_numpy(fedavg)["w"])
    assert s.state_dict() == {}


def test_table_bounds(tiny):
    from fedsim.errors import ConfigError

    with pytest.raises(ConfigError, match=r"strategy\.fedavgm\.server_momentum: must be < 1"):
        strategy(tiny, server_momentum=1.0)
    assert strategy(tiny).params == FedAvgMParams(server_lr=1.0, server_momentum=0.9)
