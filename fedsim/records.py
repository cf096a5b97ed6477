"""Message keys and record helpers shared by strategies, clients and runtimes.

Strategies and clients never import each other; they agree through the names
defined here. A model travels as an ArrayRecord of its *federated* tensors: all
of them for ordinary models, only the adapters for LoRA models.
"""

from __future__ import annotations

import functools
import io

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency
from torch import nn

# RecordDict keys
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
ALGORITHM_ARRAYS = "algorithm-arrays"  # an algorithm's extra arrays: downlink (SCAFFOLD's c), uplink (delta c_i)
ALGORITHM_STATE = "algorithm-state"  # key in a node's context.state: what its client rule keeps (c_i)
ACCOUNTANT_STATE = "fedsim-accountant"  # key in a node's context.state
CLIENT_STATE = "fedsim-client"
DATA_SPEC = "fedsim-data-spec"  # discovery: how a data holder's rows become model inputs

# MetricRecord keys in train replies
NUM_EXAMPLES = "num-examples"
UNIT_WEIGHT = "unit-weight"  # 1.0 for every client: uniform averaging under central DP
PARTITION_ID = "partition-id"
EPSILON = "epsilon"
TRAIN_LOSS = "train-loss"
LOCAL_STEPS = "local-steps"
SAMPLE_RATE = "sample-rate"

# ConfigRecord keys the server sends
SERVER_ROUND = "server-round"

# message types
QUERY_PARTITION = "query"  # discovery: which partition does this node hold?

# run_config key carrying the whole experiment as TOML (simulation and deployment alike)
RUN_CONFIG_KEY = "fedsim-config"
CONFIG_PATH_KEY = "config-path"  # ... or a path to it (what `fedsim deploy` passes to `flwr run`)


NUMPY_STYPE = "numpy.ndarray"  # flwr's SType.NUMPY: the payload is a .npy file


@functools.lru_cache(maxsize=4096)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
    return buf.getvalue()


def to_array(values: np.ndarray) -> Array:
    """Flower's Array in Flower's format (.npy bytes), with a cached header.

    `Array(ndarray)` runs np.save through a BytesIO and `Array.numpy()` np.load: their
    header parsing was the largest Flower cost per client-round in the runtime benchmark.
    """
    values = np.ascontiguousarray(values)
    return Array(dtype=str(values.dtype), shape=tuple(values.shape), stype=NUMPY_STYPE,
                 data=_npy_header(values.dtype.str, tuple(values.shape)) + values.tobytes())


def from_array(array: Array) -> np.ndarray:
    """Read-only view of an Array's values (the .npy payload sits at the end of its bytes)."""
    if array.stype != NUMPY_STYPE:
        return array.numpy()
    dtype = np.dtype(array.dtype)
    nbytes = int(np.prod(array.shape, dtype=np.int64)) * dtype.itemsize
    return np.frombuffer(array.data, dtype=dtype, offset=len(array.data) - nbytes).reshape(array.shape)


def federated_keys(model: nn.Module) -> list[str]:
    """Names of the tensors that travel: a model may narrow them with `federated_keys`."""
    keys = getattr(model, "federated_keys", None)
    return list(keys) if keys is not None else list(model.state_dict().keys())


def arrays_to_record(arrays: dict[str, Array]) -> ArrayRecord:
    """An ArrayRecord holding these Arrays as they are (``ArrayRecord(dict)`` rebuilds each one)."""
    record = ArrayRecord()
    for key, array in arrays.items():
        record[key] = array
    return record


def model_to_record(model: nn.Module, keys: list[str] | None = None) -> ArrayRecord:
    state = model.state_dict()
    keys = federated_keys(model) if keys is None else keys
    return arrays_to_record({k: to_array(state[k].detach().cpu().numpy()) for k in keys})


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: from_array(v) for k, v in record.items()}


def record_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Writable CPU tensors of a record (torch refuses read-only numpy views without a warning)."""
    return {k: torch.from_numpy(from_array(v).copy()) for k, v in record.items()}


def numpy_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return arrays_to_record({k: to_array(v) for k, v in arrays.items()})


def load_record(model: nn.Module, record: ArrayRecord) -> None:
    """Copy the record's tensors into the model (other tensors keep their values)."""
    state = {k: torch.from_numpy(from_array(v).copy()) for k, v in record.items()}
    missing = set(state) - set(model.state_dict())
    if missing:
        raise KeyError(f"record has tensors the model lacks: {sorted(missing)[:3]}")
    model.load_state_dict(state, strict=False)


def successful_replies(replies: list[Message] | tuple[Message, ...]) -> list[Message]:
    """The replies that carry content (Flower's FedAvg does this in a private method)."""
    return [r for r in replies if not r.has_error()]


def model_views(replies: list[Message], weighted_by_key: str) -> list[RecordDict]:
    """Each reply's model ArrayRecord and MetricRecord alone, as new RecordDicts.

    Strategies whose replies carry extra arrays (SCAFFOLD's delta c_i) aggregate the model
    with Flower's helpers, which expect exactly one ArrayRecord: this view leaves the
    replies themselves untouched. Checked with Flower's public consistency check.
    """
    views = [RecordDict({ARRAYS: r.content.array_records[ARRAYS], METRICS: r.content.metric_records[METRICS]})
             for r in replies]
    if views:
        validate_message_reply_consistency(views, weighted_by_key, check_arrayrecord=True)
    return views


def aggregate_train_replies(replies: list[Message], weighted_by_key: str, metrics_fn
                            ) -> tuple[ArrayRecord | None, object | None]:
    """Flower's FedAvg.aggregate_train, with arrays decoded as views (`from_array`) instead of
    Flower's per-array `np.load`, which parses a .npy header with `ast.literal_eval` for every
    array of every reply. Same checks (`validate_message_reply_consistency`), same weights,
    same accumulation order, so the result is bit-identical."""
    valid = successful_replies(list(replies))
    if not valid:
        return None, None
    contents = [r.content for r in valid]
    validate_message_reply_consistency(contents, weighted_by_key, check_arrayrecord=True)
    averaged, metrics = weighted_average(contents, weighted_by_key, metrics_fn)
    return numpy_to_record(averaged), metrics


def weighted_average(contents: list[RecordDict], weighted_by_key: str, metrics_fn
                     ) -> tuple[dict[str, np.ndarray], object]:
    """The weighted mean of validated contents' one ArrayRecord each (`weighted_mean`) and
    their metrics (`metrics_fn`); shared by FedAvg's and SCAFFOLD's aggregation."""
    weights = [float(next(iter(c.metric_records.values()))[weighted_by_key]) for c in contents]
    arrays = [record_to_numpy(next(iter(c.array_records.values()))) for c in contents]
    return weighted_mean(arrays, weights), metrics_fn(contents, weighted_by_key)


def aggregate_metrics(contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Flower's `aggregate_metricrecords` (weighted mean of every metric but the weight), summed
    in the same order in plain floats and put into one MetricRecord at the end, instead of
    re-validating the record on every client's every key."""
    records = [next(iter(c.metric_records.values())) for c in contents]
    weights = [float(r[weighted_by_key]) for r in records]
    total = sum(weights)
    out: dict = {}
    for record, w in zip(records, weights, strict=True):
        factor = w / total
        for key, value in record.items():
            if key == weighted_by_key:
                continue
            if isinstance(value, list):
                scaled = [v * factor for v in value]
                out[key] = scaled if key not in out else [a + b for a, b in zip(out[key], scaled, strict=True)]
            else:
                out[key] = value * factor if key not in out else out[key] + value * factor
    return MetricRecord(out)


def weighted_mean(arrays: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """sum_i w_i x_i / sum_i w_i per key, accumulated in client order like Flower's
    `aggregate_arrayrecords` (so the float32 results agree bit for bit), with one numpy
    operation per client and key instead of Flower's record decoding per array."""
    total = float(sum(weights))
    out: dict[str, np.ndarray] = {}
    for values, w in zip(arrays, weights, strict=True):
        factor = w / total
        for key, value in values.items():
            if key in out:
                out[key] += value * factor
            else:
                out[key] = value * factor
    return out
