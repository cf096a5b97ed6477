"""Secure aggregation: the simulated trust model and the adapter to Flower's SecAgg+ protocol,
against hand-computed arrays; the protocol itself (Flower's workflow and mod, real crypto)
run in memory, without processes, its aggregate within the quantization bound."""

from __future__ import annotations

import copy
import itertools
import logging

import numpy as np
import pytest
from flwr.app import Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Stage
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.serverapp import Grid

from fedsim import records as R
from fedsim.config import load_config
from fedsim.errors import ClientFailure, ConfigError
from fedsim.privacy import secagg
from fedsim.secure_aggregation import SecureAggregation, secure_train_round
from fedsim.strategies.fedavg import FedAvg, RoundFedAvg

pytestmark = pytest.mark.usefixtures("flower")  # Flower's process identity, which a Message reads

SENT = {"w": np.array([1.0, 2.0, 3.0], np.float32), "b": np.array([[0.5]], np.float32)}
# three clients' trained arrays (hand-made, off the quantization grid), and their updates' mean by hand:
#   w: [1.1,0,-1] + [-1,2.2,0] + [0,-2,3.3] = [0.1,0.2,2.3] -> mean [0.1/3, 0.2/3, 2.3/3];  b: 0.25+0.25-0.5 = 0
TRAINED = [{"w": [2.1, 2.0, 2.0], "b": [[0.75]]}, {"w": [0.0, 4.2, 3.0], "b": [[0.75]]},
           {"w": [1.0, 0.0, 6.3], "b": [[0.0]]}]
EXPECTED = {"w": np.array([1.0 + 0.1 / 3, 2.0 + 0.2 / 3, 3.0 + 2.3 / 3]), "b": np.array([[0.5]])}


def metrics(pid: int) -> MetricRecord:
    return MetricRecord({R.NUM_EXAMPLES: 10 * (pid + 1), R.UNIT_WEIGHT: 1.0, R.PARTITION_ID: pid,
                         R.EPSILON: -1.0, R.TRAIN_LOSS: 0.5, R.LOCAL_STEPS: 1, R.SAMPLE_RATE: 1.0})


def reply(pid: int, trained: dict, extra: dict | None = None) -> Message:
    content = RecordDict({R.ARRAYS: R.numpy_to_record({k: np.array(v, np.float32) for k, v in trained.items()}),
                          R.METRICS: metrics(pid)})
    if extra is not None:
        content[R.ALGORITHM_ARRAYS] = R.numpy_to_record({k: np.array(v, np.float32) for k, v in extra.items()})
    return Message(content, dst_node_id=100 + pid, message_type=MessageType.TRAIN)


def layer_around(strategy, **kw) -> SecureAggregation:
    layer = SecureAggregation(strategy, **{"noise_multiplier": 0.0, "clip": 1.0, "expected_cohort": 3, "seed": 0,
                                           **kw})
    layer.sent, layer.sampled = dict(SENT), 3
    return layer


def unit_fedavg(**kw):
    return FedAvg(weighted_by_key=R.UNIT_WEIGHT, **kw)


# --------------------------------------------------------------------------- the simulated trust model

def test_the_strategy_gets_the_mean_of_the_updates_added_to_the_round_arrays():
    layer = layer_around(unit_fedavg())
    arrays, metrics_out = layer.aggregate_train(1, [reply(i, t) for i, t in enumerate(TRAINED)])
    got = R.record_to_numpy(arrays)
    for key, value in EXPECTED.items():
        np.testing.assert_allclose(got[key], value, rtol=0, atol=1e-6)
        assert got[key].dtype == np.float32
    # metrics travel in the clear, unit-weighted: the mean example count of 10, 20, 30
    assert R.plain(metrics_out)[R.NUM_EXAMPLES] == pytest.approx(20.0)


def test_sums_and_counts_survive_the_replicas():
    """SCAFFOLD sums its delta c_i and FedDyn reads sum_i y_i and the count: K' replicas of the
    mean give exactly those."""
    seen = {}

    def capture(current, aggregate, state, hyper):
        seen["aggregate"] = aggregate
        return current, state

    inner = RoundFedAvg(server_update=capture, num_clients=3, weighted_by_key=R.UNIT_WEIGHT)
    inner.current = dict(SENT)
    layer = layer_around(inner)
    extras = [{"c": [1.0, -1.0]}, {"c": [2.0, 0.5]}, {"c": [-0.5, 4.0]}]
    layer.aggregate_train(1, [reply(i, t, e) for i, (t, e) in enumerate(zip(TRAINED, extras))])
    agg = seen["aggregate"]
    assert agg.count == 3
    np.testing.assert_allclose(agg.extra_sum["c"], [2.5, 3.5], atol=1e-6)  # sum_i delta c_i by hand
    np.testing.assert_allclose(agg.model_sum["w"], [3.1, 6.2, 11.3], atol=1e-5)  # sum_i y_i by hand
    np.testing.assert_allclose(agg.mean["w"], EXPECTED["w"], atol=1e-6)


def test_each_client_adds_its_share_so_the_sum_carries_sigma_c(caplog):
    sigma, clip, k = 2.0, 0.5, 4
    size = 200_000
    layer = SecureAggregation(unit_fedavg(), noise_multiplier=sigma, clip=clip, expected_cohort=k, seed=7)
    layer.sent, layer.sampled = {"w": np.zeros(size, np.float32)}, 3
    zero = [Message(RecordDict({R.ARRAYS: R.numpy_to_record({"w": np.zeros(size, np.float32)}),
                                R.METRICS: metrics(i)}), dst_node_id=100 + i, message_type=MessageType.TRAIN)
            for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="fedsim"):
        arrays, _ = layer.aggregate_train(1, zero)
    noise_sum = R.record_to_numpy(arrays)["w"].astype(np.float64) * 3  # the mean update times K'
    # 3 of the 4 shares, each sigma C / sqrt(4): the sum's std is sigma C sqrt(3/4)
    assert np.std(noise_sum) == pytest.approx(sigma * clip * np.sqrt(3 / 4), rel=0.02)
    assert layer.short_rounds == [(1, 3)]
    assert "noise multiplier 1.732" in caplog.text  # sigma sqrt(3/4) = 1.732, less than accounted
    # the same seed draws the same shares, whatever order the replies arrived in
    layer2 = SecureAggregation(unit_fedavg(), noise_multiplier=sigma, clip=clip, expected_cohort=k, seed=7)
    layer2.sent, layer2.sampled = layer.sent, 3
    np.testing.assert_array_equal(R.record_to_numpy(layer2.aggregate_train(1, zero[::-1])[0])["w"],
                                  R.record_to_numpy(arrays)["w"])


def test_a_round_below_min_cohort_fails():
    layer = layer_around(unit_fedavg(), min_cohort=3)
    with pytest.raises(Exception, match="fewer than privacy.min_cohort = 3"):
        layer.aggregate_train(1, [reply(i, t) for i, t in enumerate(TRAINED[:2])])


# --------------------------------------------------------------------------- Flower's protocol in memory

class MemoryGrid(Grid):
    """Delivers each message straight to `app` with the node's own persistent Context: Flower's
    SecAgg+ workflow and secaggplus_mod talk as over a SuperLink, without processes."""

    def __init__(self, app: ClientApp, nodes: list[int]) -> None:
        self.app = app
        self.ids = itertools.count()
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                         for n in nodes}

    def set_run(self, run):  # pragma: no cover - unused
        pass

    @property
    def run(self):  # pragma: no cover - unused
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):  # pragma: no cover - unused
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover - unused
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for sent in messages:
            # a copy, as the wire gives each node (the workflow sends one record to several nodes)
            msg = Message(copy.deepcopy(sent.content), dst_node_id=sent.metadata.dst_node_id,
                          message_type=sent.metadata.message_type, group_id=sent.metadata.group_id)
            msg.metadata.__dict__["_message_id"] = f"m{next(self.ids)}"  # what a grid sets when it pushes
            try:
                out.append(self.app(msg, self.contexts[msg.metadata.dst_node_id]))
            except Exception as exc:  # noqa: BLE001 - a node that fails answers with an error, as a SuperNode does
                out.append(Message(Error(code=500, reason=str(exc)), reply_to=msg))
        return out


def client_app(trained: dict[int, dict], failing: set[int] = frozenset(), seed: int = 0) -> ClientApp:
    app = ClientApp()
    rng = np.random.default_rng(seed)

    def mod(msg, ctxt, call_next):
        return secagg.secagg_mod(msg, ctxt, call_next, rng=rng)

    @app.train(mods=[mod])
    def _train(msg: Message, context: Context) -> Message:
        assert R.ARRAYS in msg.content  # fedsim's own instruction arrives, not a legacy FitIns
        if context.node_id in failing:
            raise RuntimeError(f"node {context.node_id} dropped")
        pid = context.node_id - 100
        content = RecordDict({R.ARRAYS: R.numpy_to_record({k: np.array(v, np.float32)
                                                           for k, v in trained[context.node_id].items()}),
                              R.METRICS: metrics(pid)})
        return Message(content, reply_to=msg)

    return app


def secagg_cfg(tmp_path, **kw):
    base = {"federation.num_clients": 3, "federation.clients_per_round": 3, "privacy.secure_aggregation": True,
            "privacy.secagg_clipping_range": 8.0, "privacy.secagg_quantization_range": 2**10,
            "output.dir": str(tmp_path)}
    return load_config(None, {**base, **kw})


def run_protocol(cfg, trained: list[dict], failing=frozenset(), seed=0):
    nodes = [100 + i for i in range(len(trained))]
    grid = MemoryGrid(client_app(dict(zip(nodes, trained)), set(failing), seed), nodes)
    layer = SecureAggregation(unit_fedavg(fraction_train=1.0, min_available_nodes=len(nodes)),
                              noise_multiplier=0.0, clip=1.0, expected_cohort=len(nodes), seed=0)
    arrays, client_metrics = secure_train_round(layer, grid, 1, R.numpy_to_record(SENT), cfg)
    return R.record_to_numpy(arrays), client_metrics


def test_secaggplus_aggregate_is_the_mean_within_the_quantization_bound(tmp_path):
    cfg = secagg_cfg(tmp_path)
    bound = secagg.quantization_error_bound(8.0, 2**10)  # 2r/Q = 0.015625
    got, client_metrics = run_protocol(cfg, TRAINED)
    errors = []
    for key, value in EXPECTED.items():
        error = np.abs(got[key].astype(np.float64) - value)
        # plus float32's half ulp: the new global arrays are float32, as sent
        assert np.all(error <= bound + np.spacing(np.abs(value).astype(np.float32))), (key, error, bound)
        errors.append(error.max())
    assert max(errors) > 1e-4  # it was quantized (not the exact mean): this test sees the protocol's arithmetic
    assert sorted(m[R.PARTITION_ID] for m in client_metrics) == [0, 1, 2]  # metrics travel in the clear


def test_a_coordinate_beyond_the_clipping_range_breaks_the_bound(tmp_path):
    """The bound holds only for coordinates within [-r, r]: an update of 10 with r = 8 is clipped
    (the test above would catch a protocol that lost precision this way)."""
    trained = [dict(t) for t in TRAINED]
    trained[0] = {"w": [11.0, 2.0, 2.0], "b": [[0.75]]}  # update 10 in w[0]
    got, _ = run_protocol(secagg_cfg(tmp_path), trained)
    exact = 1.0 + (10.0 - 1.0 + 0.0) / 3  # clipped to 8, the protocol gets 1 + 7/3
    assert abs(got["w"][0] - exact) > secagg.quantization_error_bound(8.0, 2**10)


def test_a_dropped_node_is_survived_up_to_the_threshold(tmp_path):
    cfg = secagg_cfg(tmp_path)  # 3 shares, threshold 2: one node may drop
    got, client_metrics = run_protocol(cfg, TRAINED, failing={102})
    # the mean of the two survivors' updates, by hand: w [0.05, 1.1, -0.5], b 0.25
    bound = secagg.quantization_error_bound(8.0, 2**10)
    np.testing.assert_allclose(got["w"], [1.05, 3.1, 2.5], atol=bound + 1e-6)
    np.testing.assert_allclose(got["b"], [[0.75]], atol=bound + 1e-6)
    assert sorted(m[R.PARTITION_ID] for m in client_metrics) == [0, 1]


def test_a_node_lost_before_sharing_its_keys_is_survived(tmp_path):
    """A SuperNode killed as the round starts never answers the setup stage: the others never
    mask with it, and the round aggregates them."""
    nodes = [100, 101, 102]
    app = client_app(dict(zip(nodes, TRAINED)))
    grid = MemoryGrid(app, nodes)
    real = grid.send_and_receive

    def without_102(messages, *, timeout=None):
        return [r for r in real([m for m in messages if m.metadata.dst_node_id != 102], timeout=timeout)]

    grid.send_and_receive = without_102
    layer = SecureAggregation(unit_fedavg(fraction_train=1.0, min_available_nodes=3), noise_multiplier=0.0,
                              clip=1.0, expected_cohort=3, seed=0)
    arrays, client_metrics = secure_train_round(layer, grid, 1, R.numpy_to_record(SENT), secagg_cfg(tmp_path))
    bound = secagg.quantization_error_bound(8.0, 2**10)
    np.testing.assert_allclose(R.record_to_numpy(arrays)["w"], [1.05, 3.1, 2.5], atol=bound + 1e-6)
    assert sorted(m[R.PARTITION_ID] for m in client_metrics) == [0, 1]


def test_beyond_the_threshold_the_round_fails_with_one_line(tmp_path):
    with pytest.raises(ClientFailure) as err:
        run_protocol(secagg_cfg(tmp_path), TRAINED, failing={101, 102})
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith("round 1: secure aggregation failed: 1 of 3 nodes left")
    assert "privacy.secagg_threshold" in text


def dying_in_the_unmask_stage(grid: MemoryGrid, dead: set[int]) -> None:
    """`dead` answer every stage up to their masked vectors, then nothing: killed before they
    send their shares of the others' masks (no reply, as from a SuperNode gone)."""
    real = grid.send_and_receive

    def send_and_receive(messages, *, timeout=None):
        def unmask(m):
            return m.content.config_records[RECORD_KEY_CONFIGS][SecAggKey.STAGE] == Stage.UNMASK
        return real([m for m in messages if not (unmask(m) and m.metadata.dst_node_id in dead)], timeout=timeout)

    grid.send_and_receive = send_and_receive


def unmask_round(tmp_path, dead: set[int]):
    nodes = [100, 101, 102]
    grid = MemoryGrid(client_app(dict(zip(nodes, TRAINED))), nodes)
    dying_in_the_unmask_stage(grid, dead)
    layer = SecureAggregation(unit_fedavg(fraction_train=1.0, min_available_nodes=3), noise_multiplier=0.0,
                              clip=1.0, expected_cohort=3, seed=0)
    arrays, client_metrics = secure_train_round(layer, grid, 1, R.numpy_to_record(SENT), secagg_cfg(tmp_path))
    return R.record_to_numpy(arrays), client_metrics


def test_a_node_lost_in_the_unmask_stage_still_counts(tmp_path):
    """Its masked vector is in the sum already; the two others' shares (threshold 2) remove its
    mask, so the round's mean is all three clients'."""
    got, client_metrics = unmask_round(tmp_path, {102})
    bound = secagg.quantization_error_bound(8.0, 2**10)
    for key, value in EXPECTED.items():
        np.testing.assert_allclose(got[key], value, atol=bound + 1e-6)
    assert sorted(m[R.PARTITION_ID] for m in client_metrics) == [0, 1, 2]


def test_too_few_nodes_left_in_the_unmask_stage_fail_naming_it(tmp_path):
    """Two of three die after sending their masked vectors: each mask has 1 share of the 2 it
    needs. The one line names the stage and who was left, not a generic halt."""
    with pytest.raises(ClientFailure) as err:
        unmask_round(tmp_path, {101, 102})
    assert str(err.value) == ("round 1: secure aggregation failed: 1 of 3 nodes left in the unmask stage, and 3 "
                              "node(s) kept fewer than 2 live share holders to remove their masks "
                              "(privacy.secagg_threshold)")


def test_client_noise_shares_reach_the_protocol_sum(tmp_path):
    """sigma > 0: each client adds N(0, (sigma C)^2 / K) before masking (its share, drawn on the
    client); the protocol's mean then differs from the exact mean by those shares' mean."""
    cfg = secagg_cfg(tmp_path, **{"privacy.user_noise_multiplier": 1.0, "privacy.user_clipping": "client",
                                  "privacy.user_clip": 100.0, "privacy.secagg_clipping_range": 1000.0,
                                  "privacy.secagg_quantization_range": 2**22})
    nodes = [100, 101, 102]
    grid = MemoryGrid(client_app(dict(zip(nodes, TRAINED)), seed=3), nodes)
    layer = SecureAggregation(unit_fedavg(fraction_train=1.0, min_available_nodes=3), noise_multiplier=1.0,
                              clip=100.0, expected_cohort=3, seed=0)
    arrays, _ = secure_train_round(layer, grid, 1, R.numpy_to_record(SENT), cfg)
    deviation = R.record_to_numpy(arrays)["w"] - EXPECTED["w"]
    # the mean of 3 shares of std 100/sqrt(3) has std 100/3: far beyond 2r/Q = 4.8e-4
    assert np.abs(deviation).max() > 1.0


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("overrides, message", [
    ({"strategy.name": "fedld"}, "privacy.secure_aggregation: strategy 'fedld' cannot work from the sum"),
    ({"privacy.user_noise_multiplier": 1.0}, "privacy.user_clipping: must be 'client'"),
    ({"privacy.user_noise_multiplier": 1.0, "privacy.user_clipping": "client", "federation.sampling": "poisson"},
     "federation.sampling: must be 'fixed'"),
    ({"privacy.secagg_quantization_range": 2**31}, "privacy.secagg_modulus: federation.clients_per_round x"),
    ({"privacy.secagg_modulus": 3 * 2**20}, "privacy.secagg_modulus: must be a power of 2"),
    ({"privacy.secagg_threshold": 3}, "privacy.secagg_threshold: must be 0"),
    ({"federation.clients_per_round": 1}, "federation.clients_per_round: secure aggregation needs at least 2"),
])
def test_secure_aggregation_refuses_what_cannot_work_from_the_sum(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        secagg_cfg(tmp_path, **overrides)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_the_cli_refuses_fedld_under_secure_aggregation_with_exit_2(cli):
    code, _, err = cli("run", "--set", "privacy.secure_aggregation=true", "--set", "strategy.name=fedld",
                       "--num-clients", "3")
    assert code == 2
    assert err.count("\n") == 1 and "cannot work from the sum" in err


def test_automatic_sampling_is_fixed_under_secure_aggregation(tmp_path):
    from fedsim.schedule import client_sampling

    cfg = secagg_cfg(tmp_path, **{"privacy.user_noise_multiplier": 1.0, "privacy.user_clipping": "client"})
    assert client_sampling(cfg) == "fixed"


def test_clients_withhold_their_training_loss_from_a_secure_aggregation_server(tmp_path):
    # the server is trusted with the sum only: a client's training loss (a function of its data
    # that no noise covers) must not reach it; the same run without secure aggregation reports it
    import csv

    from fedsim.run import run_experiment

    losses = {}
    for secure in (True, False):
        out = tmp_path / str(secure)
        cfg = secagg_cfg(out, **{"privacy.secure_aggregation": secure, "federation.rounds": 2,
                                 "model.hidden": [8]})
        run_experiment(cfg, progress=False)
        with open(out / "rounds.csv") as f:
            losses[secure] = [row["train_loss"] for row in csv.DictReader(f)]
    assert all(float(v) > 0 for v in losses[False])
    assert all(v in ("", "nan") for v in losses[True]), losses[True]
