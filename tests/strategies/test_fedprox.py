"""FedProx's server half: Flower's FedProx, built from ``[strategy.fedprox]``; it sends mu to
the clients (``proximal-mu``, for Flower clients) and averages like FedAvg."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedsim import records as R
from fedsim.server import fedavg_kwargs
from fedsim.strategies.fedprox import FedProxParams, build


def test_mu_from_the_table_is_sent_with_every_train_message(tiny, flower):
    cfg = tiny(**{"strategy.name": "fedprox", "strategy.fedprox.mu": 0.3})
    assert cfg.strategy.params == FedProxParams(mu=0.3)
    s = build(cfg.strategy.params, cfg, fedavg_kwargs(cfg))
    messages = list(s.configure_train(4, R.numpy_to_record({"w": np.zeros(2, np.float32)}), ConfigRecord(),
                                      flower.grid(6)))
    assert len(messages) == cfg.federation.clients_per_round == 3
    for msg in messages:
        config = msg.content.config_records[R.CONFIG]
        assert config["proximal-mu"] == 0.3 and config[R.SERVER_ROUND] == 4


def test_aggregation_is_the_example_weighted_mean(tiny, flower):
    cfg = tiny(**{"strategy.name": "fedprox"})
    s = build(cfg.strategy.params, cfg, fedavg_kwargs(cfg))
    replies = [flower.reply(RecordDict({R.ARRAYS: R.numpy_to_record({"w": np.array(w, np.float32)}),
                                        R.METRICS: MetricRecord({R.NUM_EXAMPLES: n, R.UNIT_WEIGHT: 1.0})}))
               for w, n in (([2.0, 0.0], 1), ([-2.0, 4.0], 3))]
    arrays, _ = s.aggregate_train(1, replies)
    np.testing.assert_allclose(R.record_to_numpy(arrays)["w"], [-1.0, 3.0])  # (1 [2, 0] + 3 [-2, 4]) / 4
