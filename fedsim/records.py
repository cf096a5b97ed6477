"""Message keys and record helpers shared by strategies, clients and runtimes.

Strategies and clients never import each other; they agree through the names
defined here. A model travels as an ArrayRecord of its *federated* tensors: all
of them for ordinary models, only the adapters for LoRA models.
"""

from __future__ import annotations

import functools
import io
import time
from collections.abc import Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.exception import InconsistentMessageReplies
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
USER_UNCLIPPED = "user-unclipped"  # client-side user-level clipping: 1.0 if the update was within the clip

# ConfigRecord keys the server sends
SERVER_ROUND = "server-round"
USER_CLIP = "user-clip"  # client-side user-level clipping: the clip a client applies to its own update

# message types
QUERY_PARTITION = "query"  # discovery: which partition does this node hold?

# run_config key carrying the whole experiment as TOML (simulation and deployment alike)
RUN_CONFIG_KEY = "fedsim-config"
CONFIG_PATH_KEY = "config-path"  # ... or a path to it (what `fedsim deploy` passes to `flwr run`)
# run_config key: how many nodes discovery asks at a time (0 = all); set by `fedsim deploy local`,
# whose nodes share one machine's CPUs (fedsim.deploy)
DISCOVERY_WINDOW_KEY = "discovery-window"


NUMPY_STYPE = "numpy.ndarray"  # flwr's SType.NUMPY: the payload is a .npy file


def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:  # cached by `_name_and_header`
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
    return buf.getvalue()


def trusted(record_type: type, items: dict):
    """A Flower record (ArrayRecord, MetricRecord, ConfigRecord) holding ``items`` as they are.

    Flower's records type-check every key and value on insertion (`TypedDict.__setitem__`),
    and ``ArrayRecord(dict)`` rebuilds each Array: together about a third of fedsim's cost per
    client-round in the in-process runtime once the vectorized engine trains a round at once.
    The values built here (str keys; records; `Array`s from `to_array`; Python ints and floats, made so
    with ``int()``/``float()`` at the call site) cannot fail that check, so it is skipped. The
    records stay ordinary Flower records: `tests/test_records.py` checks they equal the checked
    construction and survive Flower's own message serialization, so a Flower change that breaks
    this shows up there, not in a run.
    """
    record = record_type()
    record.__dict__["_data"].update(items)
    return record


def reply_to(msg: Message, content: RecordDict) -> Message:
    """``Message(content, reply_to=msg)``, without Flower's argument checks and its two
    timestamps through `datetime`: in the in-process runtime they were a fifth of a reply's
    cost. The metadata is the one Flower derives (node and task ids swapped, the instruction's
    id, group and type, a TTL that ends when the instruction's does); `tests/test_records.py`
    checks it against Flower's own reply field by field.
    """
    sent = msg.metadata.__dict__
    current = time.time()
    metadata = Metadata.__new__(Metadata)
    metadata.__dict__.update(
        _run_id=sent["_run_id"], _message_id="", _src_node_id=sent["_dst_node_id"],
        _dst_node_id=sent["_src_node_id"], _src_task_id=sent["_dst_task_id"], _dst_task_id=sent["_src_task_id"],
        _reply_to_message_id=sent["_message_id"], _group_id=sent["_group_id"], _created_at=current,
        _ttl=sent["_created_at"] + sent["_ttl"] - current, _message_type=sent["_message_type"], _delivered_at="")
    reply = Message.__new__(Message)
    reply.__dict__.update(_metadata=metadata, _content=content, _error=None)
    return reply


def to_array(values: np.ndarray) -> Array:
    """Flower's Array in Flower's format (.npy bytes), with a cached header.

    `Array(ndarray)` runs np.save through a BytesIO and `Array.numpy()` np.load: their
    header parsing was the largest Flower cost per client-round in the runtime benchmark.
    The Array's fields are set as ``Array(dtype=, shape=, stype=, data=)`` sets them, without
    re-checking the types it was just given (see `trusted`). ``np.require``, not
    ``np.ascontiguousarray``: the latter turns a 0-d array (a step counter) into shape (1,).
    """
    if not values.flags.c_contiguous:
        values = np.require(values, requirements="C")
    dtype, header = _name_and_header(values.dtype, values.shape)
    return _array(dtype, values.shape, header, values)


_NAMES_AND_HEADERS: dict[tuple[np.dtype, tuple[int, ...]], tuple[str, bytes]] = {}


def _name_and_header(dtype: np.dtype, shape: tuple[int, ...]) -> tuple[str, bytes]:
    """An Array's dtype name and .npy header, by one dict lookup (numpy builds ``str(dtype)``
    and ``dtype.str`` anew on every call)."""
    found = _NAMES_AND_HEADERS.get((dtype, shape))
    if found is None:
        found = _NAMES_AND_HEADERS[(dtype, shape)] = (str(dtype), _npy_header(dtype.str, shape))
    return found


def _array(dtype: str, shape: tuple[int, ...], header: bytes, values: np.ndarray) -> Array:
    """An Array of C-contiguous `values`: header and values joined into its bytes in one copy
    (``header + values.tobytes()`` made two; a round of a 1.6M-parameter CNN's 50 replies
    moves 330 MB through here)."""
    array = Array.__new__(Array)
    array.__dict__.update(dtype=dtype, shape=shape, stype=NUMPY_STYPE, data=b"".join((header, values)),
                          _is_dirty=True)
    return array


def stacked_to_arrays(rows: np.ndarray | Sequence[np.ndarray]) -> list[Array]:
    """`to_array` of each row (one client's tensor per row: a stack, or a list of arrays of one
    shape and dtype), with the dtype name and header looked up once for all rows: the
    vectorized engine's replies, a round at a time."""
    # np.require costs 2 us a row even when there is nothing to do (a stack's rows are C-contiguous)
    rows = [row if isinstance(row, np.ndarray) and row.flags.c_contiguous else np.require(row, requirements="C")
            for row in rows]
    if not rows:
        return []
    dtype, header = _name_and_header(rows[0].dtype, rows[0].shape)
    return [_array(dtype, rows[0].shape, header, row) for row in rows]


def from_array(array: Array) -> np.ndarray:
    """Read-only view of an Array's values (the .npy payload sits at the end of its bytes)."""
    if array.stype != NUMPY_STYPE:
        return array.numpy()
    dtype, nbytes = _layout(array.dtype, array.shape)
    data = array.data
    return np.frombuffer(data, dtype=dtype, offset=len(data) - nbytes).reshape(array.shape)


@functools.lru_cache(maxsize=4096)
def _layout(dtype: str, shape: tuple[int, ...]) -> tuple[np.dtype, int]:
    """An Array's numpy dtype and payload size (parsing a dtype name is slow, and repeats)."""
    parsed = np.dtype(dtype)
    return parsed, int(np.prod(shape, dtype=np.int64)) * parsed.itemsize


def federated_keys(model: nn.Module) -> list[str]:
    """Names of the tensors that travel: a model may narrow them with `federated_keys`."""
    keys = getattr(model, "federated_keys", None)
    return list(keys) if keys is not None else list(model.state_dict().keys())


def arrays_to_record(arrays: dict[str, Array]) -> ArrayRecord:
    """An ArrayRecord holding these Arrays as they are (``ArrayRecord(dict)`` rebuilds each one)."""
    return trusted(ArrayRecord, {str(k): v for k, v in arrays.items()})


def model_to_record(model: nn.Module, keys: list[str] | None = None) -> ArrayRecord:
    state = model.state_dict()
    keys = federated_keys(model) if keys is None else keys
    return arrays_to_record({k: to_array(state[k].detach().cpu().numpy()) for k in keys})


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: from_array(v) for k, v in plain(record).items()}


def record_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Writable CPU tensors of a record (torch refuses read-only numpy views without a warning)."""
    return {k: torch.from_numpy(from_array(v).copy()) for k, v in record.items()}


def numpy_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return arrays_to_record({k: to_array(v) for k, v in arrays.items()})


_NUMPY_DTYPES = frozenset({torch.float16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32,
                           torch.int64, torch.uint8, torch.bool})  # a tensor numpy can view


def _plain_loading(model: nn.Module) -> bool:
    """Whether `load_state_dict` would only copy values into the model's tensors: no module
    overrides `_load_from_state_dict` (BatchNorm does, for instance) or hooks into loading."""
    return all(type(m)._load_from_state_dict is nn.Module._load_from_state_dict
               and not m._load_state_dict_pre_hooks and not m._load_state_dict_post_hooks
               for m in model.modules())


def load_record(model: nn.Module, record: ArrayRecord) -> None:
    """Copy the record's tensors into the model (other tensors keep their values).

    What ``model.load_state_dict(state, strict=False)`` does for a record that names only the
    model's own tensors, with its shapes: each value is copied into the tensor in place (cast
    to its dtype), here straight from the record's bytes, in 40% of the time (every round
    loads the global model into the server's and the clients' models). A model with a module
    that loads its own way (`_plain_loading`) goes through `load_state_dict` itself."""
    targets = model.state_dict(keep_vars=False)
    values = {k: from_array(v) for k, v in plain(record).items()}
    missing = set(values) - set(targets)
    if missing:
        raise KeyError(f"record has tensors the model lacks: {sorted(missing)[:3]}")
    if not _plain_loading(model):  # a module loads its own way: let it
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in values.items()}, strict=False)
        return
    for key, value in values.items():
        target = targets[key]
        if tuple(target.shape) != value.shape:
            raise RuntimeError(f"size mismatch for {key}: copying a param with shape {value.shape} from the "
                               f"record, the shape in the model is {tuple(target.shape)}")
        if target.device.type == "cpu" and target.dtype in _NUMPY_DTYPES:
            np.copyto(target.numpy(), value, casting="unsafe")  # no torch dispatch, no read-only warning
        else:
            with torch.no_grad():
                target.copy_(torch.from_numpy(value.copy()))


def successful_replies(replies: list[Message] | tuple[Message, ...]) -> list[Message]:
    """The replies that carry content (Flower's FedAvg does this in a private method)."""
    return [r for r in replies if not r.has_error()]


def plain(record: RecordDict | ArrayRecord | MetricRecord | ConfigRecord) -> dict:
    """The plain dict inside a Flower record, to read without Flower's per-access overhead.

    A record's Mapping methods run a ``typing.cast`` of a subscripted generic on every item,
    and ``RecordDict.array_records``/``metric_records`` rebuild and re-check a new dict on
    every access: at 100 clients a round, reading replies that way cost more than training
    them. Read-only use; `tests/test_records.py` checks this agrees with the Mapping view.
    """
    return record.__dict__["_data"]


def record_of(content: RecordDict, key: str, record_type: type):
    """The record of `record_type` under `key`, or None: what ``content.config_records.get(key)``
    (and the array/metric variants) return, without building the filtered view (0.16 ms a
    call, paid per client per message)."""
    value = plain(content).get(key)
    return value if isinstance(value, record_type) else None


def _only(content: RecordDict, record_type: type) -> list[tuple[str, object]]:
    return [(k, v) for k, v in plain(content).items() if isinstance(v, record_type)]


def _one_each(contents: list[RecordDict], record_type: type, one_reason: str, keys_reason: str
              ) -> tuple[str, set[str]]:
    """Every content holds exactly one record of `record_type`, under the first one's key and
    with its keys (Flower's two checks per record type); returns that key and those keys."""
    found = [_only(c, record_type) for c in contents]
    if any(len(f) != 1 for f in found):
        raise InconsistentMessageReplies(reason=one_reason)
    record_key, first = found[0][0]
    keys = set(plain(first))
    for content in contents[1:]:
        record = plain(content).get(record_key)
        if (plain(record).keys() if isinstance(record, record_type) else set()) != keys:
            raise InconsistentMessageReplies(reason=keys_reason)
    return record_key, keys


def check_replies(contents: list[RecordDict], weighted_by_key: str, check_arrayrecord: bool) -> None:
    """Flower's `validate_message_reply_consistency`, check for check and message for message,
    reading the records once each (`plain`) instead of through views rebuilt per access."""
    if not contents:
        return
    if check_arrayrecord:
        _one_each(contents, ArrayRecord, "Expected exactly one ArrayRecord in replies. Skipping aggregation.",
                  "All ArrayRecords must have the same keys for aggregation. This condition wasn't met. "
                  "Skipping aggregation.")
    record_key, all_keys = _one_each(
        contents, MetricRecord, "Expected exactly one MetricRecord in replies, but found more. Skipping aggregation.",
        "All MetricRecords must have the same keys for aggregation. This condition wasn't met. Skipping aggregation.")
    if weighted_by_key not in all_keys:
        raise InconsistentMessageReplies(
            reason=f"Missing required key `{weighted_by_key}` in the MetricRecord of reply messages. Cannot "
                   "average ArrayRecords and MetricRecords. Skipping aggregation.")
    if any(isinstance(plain(plain(c)[record_key])[weighted_by_key], list) for c in contents):
        raise InconsistentMessageReplies(
            reason=f"Key `{weighted_by_key}` in the MetricRecord of reply messages must be a single value "
                   "(int or float), but a list was found. Skipping aggregation.")


def model_views(replies: list[Message], weighted_by_key: str) -> list[RecordDict]:
    """Each reply's model ArrayRecord and MetricRecord alone, as new RecordDicts.

    Strategies whose replies carry extra arrays (SCAFFOLD's delta c_i) aggregate the model
    with Flower's helpers, which expect exactly one ArrayRecord: this view leaves the
    replies themselves untouched. Checked like Flower's consistency check (`check_replies`).
    """
    views = [trusted(RecordDict, {ARRAYS: plain(r.content)[ARRAYS], METRICS: plain(r.content)[METRICS]})
             for r in replies]
    check_replies(views, weighted_by_key, check_arrayrecord=True)
    return views


def aggregate_train_replies(replies: list[Message], weighted_by_key: str, metrics_fn
                            ) -> tuple[ArrayRecord | None, object | None]:
    """Flower's FedAvg.aggregate_train, with arrays decoded as views (`from_array`) instead of
    Flower's per-array `np.load`, which parses a .npy header with `ast.literal_eval` for every
    array of every reply. Same checks (`check_replies`), same weights, same accumulation
    order, so the result is bit-identical."""
    valid = successful_replies(list(replies))
    if not valid:
        return None, None
    contents = [r.content for r in valid]
    check_replies(contents, weighted_by_key, check_arrayrecord=True)
    averaged, metrics = weighted_average(contents, weighted_by_key, metrics_fn)
    return numpy_to_record(averaged), metrics


def _one(content: RecordDict, record_type: type):
    """The content's one record of this type (`check_replies` made sure there is one)."""
    for value in plain(content).values():
        if isinstance(value, record_type):
            return value
    raise KeyError(record_type.__name__)


def weighted_average(contents: list[RecordDict], weighted_by_key: str, metrics_fn
                     ) -> tuple[dict[str, np.ndarray], object]:
    """The weighted mean of validated contents' one ArrayRecord each (`weighted_mean`) and
    their metrics (`metrics_fn`); shared by FedAvg's and SCAFFOLD's aggregation."""
    weights = [float(plain(_one(c, MetricRecord))[weighted_by_key]) for c in contents]
    arrays = [record_to_numpy(_one(c, ArrayRecord)) for c in contents]
    return weighted_mean(arrays, weights), metrics_fn(contents, weighted_by_key)


def aggregate_metrics(contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Flower's `aggregate_metricrecords` (weighted mean of every metric but the weight), summed
    in the same order in plain floats and put into one MetricRecord at the end, instead of
    re-validating the record on every client's every key."""
    records = [plain(_one(c, MetricRecord)) for c in contents]
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
    `aggregate_arrayrecords` (so the float32 results agree bit for bit), with three numpy
    operations per key instead of Flower's record decoding per array.

    Why it is bit-identical: each product w_i/W * x_i is rounded in the array's dtype either
    way (a Python float is a weak scalar in numpy 2), and numpy reduces axis 0 of a stack row
    by row, in order, as Flower's running ``+=`` does (pairwise summation applies only along
    the contiguous last axis)."""
    if len(arrays) != len(weights):
        raise ValueError(f"weighted_mean: {len(arrays)} arrays, {len(weights)} weights")
    if not arrays:
        return {}
    total = float(sum(weights))
    factors = [w / total for w in weights]
    out: dict[str, np.ndarray] = {}
    for key, first in arrays[0].items():
        if first.ndim == 0 or len(arrays) == 1 or first.dtype.kind != "f":  # nothing to stack, or an
            # integer array, whose products are float64 (numpy's promotion), not its own dtype
            acc = first * factors[0]
            for values, factor in zip(arrays[1:], factors[1:]):
                acc += values[key] * factor
            out[key] = acc
            continue
        if first.size >= _RUNNING_SUM_FROM:  # large: a running sum, in the order the stack sums
            out[key] = _running_weighted_sum([values[key] for values in arrays], factors)
            continue
        stacked = np.stack([values[key] for values in arrays])
        scale = np.asarray(factors, dtype=stacked.dtype).reshape(-1, *([1] * first.ndim))
        out[key] = np.multiply(stacked, scale, out=stacked).sum(axis=0)
    return out


# From this many values per tensor on, `weighted_mean` sums client by client into one buffer:
# stacking 50 replies of a 1.6M-value tensor wrote 330 MB of fresh pages a round (0.1 s); a
# tensor the size of an MLP layer stacks faster than a Python loop over clients runs.
_RUNNING_SUM_FROM = 1 << 16
_BLOCK = 1 << 15  # values per block of `_running_weighted_sum`: the sum and a product, 256 KB in cache


def _running_weighted_sum(arrays: list[np.ndarray], factors: list[float]) -> np.ndarray:
    """sum_i factors[i] * arrays[i], each product rounded in the arrays' dtype and added in
    client order (the stack's sum, bit for bit), a block of values at a time: each block's
    running sum stays in cache while every client's block is added, so memory sees each
    reply once (client by client over whole tensors, it saw the sum and a product 50 times)."""
    first = arrays[0]
    scalars = [first.dtype.type(f) for f in factors]
    flat = [a.reshape(-1) for a in arrays]
    acc = np.empty(first.size, dtype=first.dtype)
    product = np.empty(min(_BLOCK, first.size), dtype=first.dtype)
    for start in range(0, first.size, _BLOCK):
        block = slice(start, start + _BLOCK)
        part = acc[block]
        np.multiply(flat[0][block], scalars[0], out=part)
        scratch = product[:len(part)]
        for values, factor in zip(flat[1:], scalars[1:]):
            part += np.multiply(values[block], factor, out=scratch)
    return acc.reshape(first.shape)
