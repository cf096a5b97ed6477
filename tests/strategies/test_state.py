"""The server halves' state hooks (`state_dict` / `load_state_dict`): a strategy rebuilt from
its state continues exactly as the original, and the state is what makes the difference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedsim import records as R
from fedsim.algorithms import algorithm_names, load_strategy_state, stateful_strategy, strategy_state
from fedsim.server import SeededRounds, build_strategy

X0 = {"w": np.array([1.0, -1.0], np.float32), "b": np.array([0.5], np.float32)}
CLIENTS = [({"w": [2.0, -1.0], "b": [0.0]}, 1, {"w": [0.1, 0.2], "b": [0.3]}),
           ({"w": [1.0, -3.0], "b": [1.0]}, 3, {"w": [-0.4, 0.0], "b": [0.1]})]


def replies(flower, shift: float, extra: bool):
    out = []
    for i, (y, n, dc) in enumerate(CLIENTS):
        content = RecordDict({
            R.ARRAYS: R.numpy_to_record({k: np.asarray(v, np.float32) + shift for k, v in y.items()}),
            R.METRICS: MetricRecord({R.NUM_EXAMPLES: n, R.UNIT_WEIGHT: 1.0, R.TRAIN_LOSS: 1.0})})
        if extra:  # SCAFFOLD's delta c_i
            content[R.ALGORITHM_ARRAYS] = R.numpy_to_record({k: np.asarray(v, np.float32) * (1 + shift)
                                                             for k, v in dc.items()})
        out.append(flower.reply(content, node_id=1000 + i))
    return out


def one_round(strategy, flower, server_round, arrays):
    """The round's new global arrays and what its train messages carried, as bytes."""
    sent = list(strategy.configure_train(server_round, arrays, ConfigRecord(), flower.grid(2)))
    extra = R.ALGORITHM_ARRAYS in sent[0].content.array_records
    out, _ = strategy.aggregate_train(server_round, replies(flower, 0.25 * server_round, extra))
    carried = {name: {k: bytes(a.data) for k, a in rec.items()} for name, rec in sent[0].content.array_records.items()}
    return out, carried


@pytest.mark.parametrize("name, extra", [("fedadam", {"strategy.fedadam.server_lr": 0.1}),
                                         ("scaffold", {"strategy.scaffold.server_lr": 0.5})])
def test_a_strategy_rebuilt_from_its_state_continues_exactly(tiny, flower, name, extra):
    cfg = tiny(**{"strategy.name": name, "federation.num_clients": 2, "federation.clients_per_round": 2, **extra})
    original = build_strategy(cfg)
    arrays = R.numpy_to_record(X0)
    for rnd in (1, 2):
        arrays, _ = one_round(original, flower, rnd, arrays)
    state = strategy_state(original)
    assert state and all(isinstance(v, np.ndarray) for v in state.values())
    resumed, fresh = build_strategy(cfg), build_strategy(cfg)
    load_strategy_state(resumed, {k: v.copy() for k, v in state.items()})

    def outcome(strategy):
        out, carried = one_round(strategy, flower, 3, arrays)
        return {k: v.tobytes() for k, v in R.record_to_numpy(out).items()}, carried

    want = outcome(original)
    assert outcome(resumed) == want
    # without the state round 3 comes out otherwise: FedAdam's step (its moments), SCAFFOLD's
    # message (its control variate c)
    assert outcome(fresh) != want


def test_every_builtin_strategy_declares_its_state_through_wrappers(tiny):
    for name in algorithm_names():
        cfg = tiny(**{"strategy.name": name})
        wrapped = SeededRounds(build_strategy(cfg), 0, None, cfg.federation.clients_per_round)
        assert stateful_strategy(wrapped) is not None, name
    dp = build_strategy(tiny(**{"privacy.user_noise_multiplier": 1.0}))  # the central DP layer around FedAvg
    assert stateful_strategy(dp) is dp and set(strategy_state(dp)) == {"central-dp/clip"}


def test_seeded_rounds_reseed_torch_on_the_server(tiny, flower):
    """No generator state carries over between rounds (checkpoints store none): a round draws
    the same from torch's global generator whatever ran before it."""
    cfg = tiny(**{"federation.num_clients": 2, "federation.clients_per_round": 2})
    draws = []
    for before in (1, 2):
        torch.manual_seed(before)
        torch.rand(before)
        rounds = SeededRounds(build_strategy(cfg), cfg.seed, type("G", (), {"current_round": 0})(),
                              cfg.federation.clients_per_round)
        list(rounds.configure_train(3, R.numpy_to_record(X0), ConfigRecord(), flower.grid(2)))
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[1])
