"""fedsim's record helpers build ordinary Flower records, only faster.

`records.trusted` and `records.to_array` skip Flower's per-item checks (the in-process
runtime's largest cost per client-round once a round trains at once). These tests pin what
that relies on: the records equal the checked construction, Flower's serialization reads them
back unchanged, and `from_array` reads them as Flower's own `Array.numpy()` does.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from fedsim import records as R

ARRAYS = {"0.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "0.bias": np.array([1.5, -2.0], np.float64),
          "steps": np.array(7, dtype=np.int64), "mask": np.ones((2, 0, 3), np.float32)}


@pytest.mark.parametrize("key", sorted(ARRAYS))
def test_to_array_equals_flowers_array(key: str) -> None:
    values = ARRAYS[key]
    fast, flower = R.to_array(values), Array(values)
    assert fast.__dict__ == flower.__dict__  # dtype, shape, stype, data and the dirty flag
    assert fast.object_id == flower.object_id
    np.testing.assert_array_equal(fast.numpy(), values)
    np.testing.assert_array_equal(R.from_array(flower), values)


def test_stacked_to_arrays_equals_to_array_of_each_row() -> None:
    stacked = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4).transpose(0, 2, 1)  # not contiguous
    for row, fast in zip(stacked, R.stacked_to_arrays(stacked), strict=True):
        assert fast.__dict__ == Array(np.ascontiguousarray(row)).__dict__


def test_reply_to_builds_flowers_reply(flower) -> None:
    """`reply_to` skips Flower's checks: its metadata must still be the one Flower derives,
    field by field (the creation time and the TTL that follows from it within a second)."""
    from flwr.app import Message

    content = RecordDict({"metrics": MetricRecord({"n": 1})})
    sent = Message(content, dst_node_id=17, message_type="train", group_id="3", ttl=500.0)
    sent.metadata.__dict__.update(_message_id="abc", _src_node_id=1, _src_task_id=4, _dst_task_id=9)
    fast, flower = R.reply_to(sent, content), Message(content, reply_to=sent)
    assert list(fast.__dict__) == list(flower.__dict__)
    assert fast.content is content and not fast.has_error()
    ours, theirs = fast.metadata.__dict__, flower.metadata.__dict__
    assert list(ours) == list(theirs)
    for key in ours:
        if key in ("_created_at", "_ttl"):
            assert ours[key] == pytest.approx(theirs[key], abs=1.0), key
        else:
            assert ours[key] == theirs[key], key
    assert fast.metadata.reply_to_message_id == "abc" and fast.metadata.dst_node_id == 1
    assert fast.metadata.created_at + fast.metadata.ttl == pytest.approx(500.0 + sent.metadata.created_at)


def test_trusted_records_equal_checked_ones_and_survive_serialization() -> None:
    metrics = {"num-examples": 12, "epsilon": 1.25, "losses": [0.5, 0.25]}
    config = {"sigma": [1.0, 1.0], "steps": [3, 4], "name": "x"}
    fast = RecordDict({"arrays": R.numpy_to_record(ARRAYS), "metrics": R.trusted(MetricRecord, metrics),
                       "config": R.trusted(ConfigRecord, config)})
    checked = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in ARRAYS.items()}),
                          "metrics": MetricRecord(metrics), "config": ConfigRecord(config)})
    assert fast.metric_records["metrics"] == checked.metric_records["metrics"]
    assert fast.config_records["config"] == checked.config_records["config"]
    assert fast.array_records["arrays"].object_id == checked.array_records["arrays"].object_id
    back = recorddict_from_proto(recorddict_to_proto(fast))
    assert dict(back.metric_records["metrics"]) == metrics
    assert dict(back.config_records["config"]) == config
    for key, values in ARRAYS.items():
        np.testing.assert_array_equal(back.array_records["arrays"][key].numpy(), values)


def test_trusted_record_is_still_checked_on_later_writes() -> None:
    record = R.trusted(MetricRecord, {"a": 1.0})
    with pytest.raises(TypeError):
        record["b"] = "not a metric"


def _content(arrays: dict | None = None, metrics: dict | None = None, extra: dict | None = None) -> RecordDict:
    records: dict = {}
    if arrays is not None:
        records["arrays"] = R.numpy_to_record(arrays)
    if metrics is not None:
        records["metrics"] = MetricRecord(metrics)
    records.update(extra or {})
    return RecordDict(records)


GOOD = {"w": np.ones(2, np.float32)}
CASES = {
    "consistent": [_content(GOOD, {"n": 3}), _content(GOOD, {"n": 5})],
    "two array records": [_content(GOOD, {"n": 3}, {"more": R.numpy_to_record(GOOD)})],
    "no array record": [_content(None, {"n": 3})],
    "array keys differ": [_content(GOOD, {"n": 3}), _content({"v": np.ones(2)}, {"n": 3})],
    "two metric records": [_content(GOOD, {"n": 3}, {"m2": MetricRecord({"n": 1})})],
    "metric keys differ": [_content(GOOD, {"n": 3}), _content(GOOD, {"n": 3, "loss": 1.0})],
    "weight missing": [_content(GOOD, {"loss": 3.0})],
    "weight is a list": [_content(GOOD, {"n": [1, 2]})],
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("check_arrays", [True, False])
def test_check_replies_agrees_with_flowers_check(case: str, check_arrays: bool) -> None:
    from flwr.serverapp.exception import InconsistentMessageReplies
    from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

    def outcome(check) -> str:
        try:
            check(CASES[case], "n", check_arrayrecord=check_arrays)
        except InconsistentMessageReplies as err:
            return str(err)
        return "ok"
    expected = outcome(validate_message_reply_consistency)
    assert outcome(R.check_replies) == expected
    assert (expected == "ok") == (case == "consistent" or (not check_arrays and "array" in case))


def test_plain_reads_what_the_mapping_view_reads() -> None:
    content = _content(GOOD, {"n": 3}, {"c": ConfigRecord({"k": "v"})})
    assert R.plain(content) == dict(content.items())
    assert R.plain(content["metrics"]) == dict(content["metrics"].items())


def test_record_of_returns_what_flowers_typed_views_return() -> None:
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(2))}), "config": ConfigRecord({"a": 1}),
                          "metrics": MetricRecord({"m": 1.0})})
    views = {ArrayRecord: content.array_records, ConfigRecord: content.config_records,
             MetricRecord: content.metric_records}
    for record_type, view in views.items():
        for key in ("arrays", "config", "metrics", "absent"):
            assert R.record_of(content, key, record_type) is view.get(key), (record_type, key)


@pytest.mark.parametrize("clients", [1, 2, 7, 100])
def test_aggregation_is_bit_identical_to_flowers(clients: int) -> None:
    """`aggregate_train_replies` stacks each key's arrays (or, for a large one, sums them into one
    buffer) instead of Flower's running sum of records: its result must still be Flower's
    `aggregate_arrayrecords`, byte for byte, for float32, float64, integer, 0-d and large arrays
    and uneven weights (a summation in another order fails this)."""
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    rng = np.random.default_rng(clients)
    contents = []
    for _ in range(clients):
        arrays = {"w": rng.normal(size=(5, 3)).astype(np.float32) * 10.0 ** rng.integers(-3, 4),
                  "b": rng.normal(size=4), "steps": np.array(rng.integers(1, 9), np.int64),
                  "scale": np.array(rng.normal(), np.float32), "empty": np.zeros((0, 2), np.float32),
                  "large": rng.normal(size=(R._RUNNING_SUM_FROM // 128 + 1, 128)).astype(np.float32)}
        contents.append(RecordDict({R.ARRAYS: R.numpy_to_record(arrays),
                                    R.METRICS: MetricRecord({R.NUM_EXAMPLES: int(rng.integers(1, 50))})}))
    ours = R.record_to_numpy(R.numpy_to_record(R.weighted_average(contents, R.NUM_EXAMPLES, lambda *a: None)[0]))
    flower = R.record_to_numpy(aggregate_arrayrecords(contents, R.NUM_EXAMPLES))
    assert list(ours) == list(flower)
    for key in flower:
        assert ours[key].dtype == flower[key].dtype and ours[key].shape == flower[key].shape, key
        assert ours[key].tobytes() == flower[key].tobytes(), key


def test_load_record_does_what_load_state_dict_does() -> None:
    """`load_record` copies in place instead of `load_state_dict`: the same tensors after, for
    parameters, float and integer buffers and a record naming only some of them; the same
    refusals for a tensor the model lacks and for a shape that differs; and a model with a
    module that loads its own way (a hook, BatchNorm) still goes through `load_state_dict`."""
    import torch
    from torch import nn

    class Shift(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("shift", torch.zeros(3))
            self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def model(norm: type[nn.Module] = Shift) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 3), norm() if norm is Shift else norm(3), nn.Linear(3, 2, bias=False))

    for norm in (Shift, nn.BatchNorm1d):
        torch.manual_seed(0)
        source, ours, theirs = model(norm), model(norm), model(norm)
        for buffer in source[1].buffers():
            buffer += 7
        assert R._plain_loading(ours) == (norm is Shift)
        theirs.load_state_dict(ours.state_dict())
        state = source.state_dict()
        partial = {k: v for k, v in state.items() if k != "2.weight"}
        record = R.numpy_to_record({k: v.numpy() for k, v in partial.items()})
        R.load_record(ours, record)
        theirs.load_state_dict(partial, strict=False)
        for (key, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), key
        assert not torch.equal(ours[2].weight, source[2].weight)  # not in the record: kept
        with pytest.raises(KeyError, match="lacks"):
            R.load_record(ours, R.numpy_to_record({"9.weight": np.ones(2, np.float32)}))
        with pytest.raises(RuntimeError, match="size mismatch for 0.bias"):
            R.load_record(ours, R.numpy_to_record({"0.bias": np.ones(4, np.float32)}))
    hooked, calls = model(), []
    hooked[2].register_load_state_dict_pre_hook(lambda *args: calls.append(args[2]))
    R.load_record(hooked, R.numpy_to_record({"0.bias": np.ones(3, np.float32)}))
    assert calls == ["2."] and torch.equal(hooked[0].bias, torch.ones(3))
