"""FedAdam's server half: Flower's FedAdam, with its knobs from ``[strategy.fedadam]``: one
server step on hand arrays shows that ``server_lr`` is the server's eta (not the clients' lr)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedsim import records as R
from fedsim.server import fedavg_kwargs
from fedsim.strategies.fedadam import FedAdamParams, build


def test_one_server_adam_step_by_hand(tiny, flower):
    cfg = tiny(**{"strategy.name": "fedadam", "strategy.fedadam.server_lr": 0.05, "strategy.fedadam.beta_1": 0.8,
                  "strategy.fedadam.beta_2": 0.9, "strategy.fedadam.tau": 0.01, "client.lr": 0.3})
    assert cfg.strategy.params == FedAdamParams(server_lr=0.05, beta_1=0.8, beta_2=0.9, tau=0.01)
    s = build(cfg.strategy.params, cfg, fedavg_kwargs(cfg))
    assert (s.eta, s.eta_l, s.beta_1, s.beta_2, s.tau) == (0.05, 0.3, 0.8, 0.9, 0.01)
    x = np.array([1.0, -1.0], np.float32)
    list(s.configure_train(1, R.numpy_to_record({"w": x}), ConfigRecord(), flower.grid(6)))
    replies = [flower.reply(RecordDict({R.ARRAYS: R.numpy_to_record({"w": np.array(w, np.float32)}),
                                        R.METRICS: MetricRecord({R.NUM_EXAMPLES: n, R.UNIT_WEIGHT: 1.0})}))
               for w, n in (([2.0, -1.0], 1), ([1.0, -3.0], 3))]
    arrays, _ = s.aggregate_train(1, replies)
    # Adam on the pseudo-gradient delta = avg - x = [1.25, -2.5] - [1, -1] = [0.25, -1.5]:
    # m = (1 - b1) delta, v = (1 - b2) delta^2, Flower's bias-corrected step size at round t = 1
    delta = np.array([0.25, -1.5])
    m, v = 0.2 * delta, 0.1 * delta ** 2
    eta_t = 0.05 * np.sqrt(1 - 0.9 ** 2) / (1 - 0.8 ** 2)
    np.testing.assert_allclose(R.record_to_numpy(arrays)["w"], x + eta_t * m / (np.sqrt(v) + 0.01), rtol=1e-5)


def test_server_lr_must_be_positive(tiny):
    from fedsim.errors import ConfigError

    with pytest.raises(ConfigError, match="strategy.fedadam.server_lr"):
        tiny(**{"strategy.name": "fedadam", "strategy.fedadam.server_lr": 0.0})
