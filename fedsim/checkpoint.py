"""Checkpoints of a run in progress, and the trained model of a finished one.

A checkpoint (``checkpoint.safetensors`` in the run directory) is everything the rounds after
round k depend on, taken when round k has ended:

* the global model's federated arrays (what the next round's train messages carry);
* the strategy's state (`fedsim.algorithms.strategy_state`: FedAdam's moments, SCAFFOLD's c);
* every node's ``context.state``: the accountant history behind its epsilon, the client rule's
  kept tensors (SCAFFOLD's c_i), anything else a node keeps;
* the recorder's rows and per-client records (rounds.csv and clients.csv so far) and the wall
  time spent;
* the config it was taken with, so that a resume with another config is refused.

No random generator state is stored, because none carries over from one round to the next:
the server seeds Python's ``random``, numpy's and torch's global generators from (seed, round)
where each round starts (`fedsim.server.SeededRounds`), and every client seeds its own from
(seed, round, partition) (`clients.app.prepare_job`). A resumed run therefore repeats the
uninterrupted one bit for bit.

The format is safetensors: arrays as named tensors, the rest as one JSON string in the
header's metadata (a single key: safetensors writes several metadata keys in a random order,
which would make equal files differ). Nothing is pickled, so loading a checkpoint or model
runs no code from the file.

``model.safetensors`` (every finished run) and ``model-best.safetensors`` (``output.keep_best``)
hold the global model's whole ``state_dict``, with the config (less ``output.dir``) and the
data spec (input shape, classes) in the metadata: `load_model` rebuilds the model from them
without loading the dataset (except a ``lora-mlp`` whose pretrained backbone is not cached in
the run directory).
"""

from __future__ import annotations

import base64
import copy
import json
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsim import records as R
from fedsim.config import BEFORE_THE_KEY, config_to_dict, dumps_toml, flatten, loads_toml
from fedsim.errors import FedsimError
from fedsim.models import build_model
from fedsim.node_data import dataset_from_spec
from fedsim.results import CHECKPOINT, MODEL, MODEL_BEST, write_atomic

FORMAT_VERSION = 1
META_KEY = "fedsim"


@dataclass
class Checkpoint:
    """The state of a run after round `round` (see the module docstring)."""

    round: int
    config: str  # the run's config as TOML (`dumps_toml`)
    arrays: dict[str, np.ndarray]  # the global model's federated arrays, in record order
    strategy: dict[str, np.ndarray] = field(default_factory=dict)
    # node id -> its context.state records (a RecordDict, or a plain mapping of them when saving)
    nodes: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)
    recorder: dict[str, Any] = field(default_factory=dict)  # `RunRecorder.state()`


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT


# ----------------------------------------------------------------------------- records <-> JSON

def _encode(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes": base64.b64encode(value).decode()}
    if isinstance(value, list):
        return [_encode(v) for v in value] if any(isinstance(v, bytes) for v in value) else value
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"bytes"}:
        return base64.b64decode(value["bytes"])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _node_parts(node: int, state: Mapping[str, Any], tensors: dict[str, np.ndarray]) -> list:
    """One node's records as JSON entries [name, kind, payload]; arrays go into `tensors`."""
    parts = []
    for name, record in state.items():
        if isinstance(record, ArrayRecord):
            values = R.record_to_numpy(record)
            for key, value in values.items():
                tensors[f"node/{node}/{name}/{key}"] = value
            parts.append([name, "arrays", list(values)])
        elif isinstance(record, ConfigRecord):  # read through `R.plain`: Flower's view casts every item
            parts.append([name, "config", {k: _encode(v) for k, v in R.plain(record).items()}])
        elif isinstance(record, MetricRecord):
            parts.append([name, "metrics", dict(R.plain(record))])
        else:  # pragma: no cover - RecordDict holds only these three
            raise TypeError(f"node {node}: record {name!r} of type {type(record).__name__} cannot be saved")
    return parts


def _node_state(node: int, parts: list, tensors: Mapping[str, np.ndarray]) -> RecordDict:
    state = RecordDict()
    for name, kind, payload in parts:
        if kind == "arrays":
            state[name] = R.numpy_to_record({k: tensors[f"node/{node}/{name}/{k}"] for k in payload})
        elif kind == "config":
            state[name] = ConfigRecord({k: _decode(v) for k, v in payload.items()})
        else:
            state[name] = MetricRecord(payload)
    return state


# ----------------------------------------------------------------------------- checkpoints

NodeMemo = dict[int, tuple[list[tuple[str, Any]], list, dict[str, np.ndarray]]]


def _node_parts_memo(node: int, state: Mapping[str, Any], tensors: dict[str, np.ndarray],
                     memo: NodeMemo | None) -> list:
    """`_node_parts`, reused while the node holds the very same record objects as at the last
    checkpoint. fedsim replaces a node's records when it trains and never changes one in place,
    so only the round's clients are encoded again (every node, every round, was O(nodes))."""
    items = list(state.items())
    hit = memo.get(node) if memo is not None else None
    if hit is not None and len(hit[0]) == len(items) and \
            all(n == m and r is s for (n, r), (m, s) in zip(hit[0], items)):
        tensors.update(hit[2])
        return hit[1]
    own: dict[str, np.ndarray] = {}
    parts = _node_parts(node, state, own)
    tensors.update(own)
    if memo is not None:
        memo[node] = (items, parts, own)
    return parts


def save_checkpoint(run_dir: str | Path, ckpt: Checkpoint, memo: NodeMemo | None = None,
                    write: Callable[[Path, bytes], None] = write_atomic) -> Path:
    """Write `ckpt` to ``<run_dir>/checkpoint.safetensors`` atomically (temporary file + rename).

    `memo` (one dict per run, kept by the caller) lets a node whose records did not change
    since the last checkpoint reuse their encoding. `write` does the atomic write (a run
    passes its `fedsim.results.BackgroundWriter`'s, which writes it after the round's results)."""
    from safetensors.numpy import save

    tensors: dict[str, np.ndarray] = {}
    for key, value in ckpt.arrays.items():
        tensors[f"arrays/{key}"] = value
    for key, value in ckpt.strategy.items():
        tensors[f"strategy/{key}"] = value
    nodes = {str(node): _node_parts_memo(node, state, tensors, memo) for node, state in sorted(ckpt.nodes.items())}
    meta = {"version": FORMAT_VERSION, "round": ckpt.round, "config": ckpt.config,
            "order": {"arrays": list(ckpt.arrays), "strategy": list(ckpt.strategy)},
            "nodes": nodes, "recorder": ckpt.recorder}
    tensors = {k: np.require(v, requirements='C') for k, v in tensors.items()}  # keeps 0-d arrays 0-d
    path = checkpoint_path(run_dir)
    meta[DIGEST_KEY] = _digest(json.dumps(meta), tensors)  # one metadata entry: safetensors orders several at random
    write(path, save(tensors, metadata={META_KEY: json.dumps(meta)}))
    return path


DIGEST_KEY = "sha256"  # of the rest of the metadata and every tensor: a damaged checkpoint is refused, never resumed


def _digest(text: str, tensors: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the metadata text and each tensor's name, dtype, shape and bytes, in name order."""
    import hashlib

    h = hashlib.sha256(text.encode())
    for name in sorted(tensors):
        value = np.ascontiguousarray(tensors[name])
        h.update(f"\0{name}\0{value.dtype.str}\0{value.shape}\0".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def load_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    """The run's checkpoint, or None if it has none; an unreadable one is a `FedsimError`."""
    from safetensors import safe_open

    path = checkpoint_path(run_dir)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = json.loads((fh.metadata() or {})[META_KEY])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        digest = meta.pop(DIGEST_KEY, None) if isinstance(meta, dict) else None  # absent before fedsim wrote one
        if digest is not None and digest != _digest(json.dumps(meta), tensors):
            raise ValueError("its checksum does not match its contents: the file was changed or damaged")
    except Exception as exc:  # noqa: BLE001 - a damaged file of any kind is one line
        raise FedsimError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or meta.get("version") != FORMAT_VERSION:
        version = meta.get("version") if isinstance(meta, dict) else None
        raise FedsimError(f"{path}: checkpoint format {version!r}, this fedsim reads {FORMAT_VERSION}")
    try:
        return Checkpoint(
            round=int(meta["round"]), config=str(meta["config"]),
            arrays={k: tensors[f"arrays/{k}"] for k in meta["order"]["arrays"]},
            strategy={k: tensors[f"strategy/{k}"] for k in meta["order"]["strategy"]},
            nodes={int(node): _node_state(int(node), parts, tensors) for node, parts in meta["nodes"].items()},
            recorder=meta["recorder"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a damaged header names no key or array
        raise FedsimError(f"{path}: unreadable checkpoint (damaged header: {type(exc).__name__}: {exc})") from None


def config_difference(saved: str, current: str) -> str | None:
    """The first config key whose value differs between two config TOMLs, as
    ``"key (saved X, now Y)"``; None if they agree. ``output.dir`` is not compared: a run
    directory may be resumed under another path. A key a TOML lacks that `BEFORE_THE_KEY`
    names holds the value runs had before it existed, not today's default."""
    def flat(text: str) -> dict[str, Any]:
        out: dict[str, Any] = {}

        def walk(node: Any, prefix: str) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(v, f"{prefix}{k}.")
            else:
                out[prefix[:-1]] = node
        walk(config_to_dict(loads_toml(text)), "")
        named = flatten(tomllib.loads(text))
        out.update({k: v for k, v in BEFORE_THE_KEY.items() if k not in named})
        out.pop("output.dir", None)
        return out

    a, b = flat(saved), flat(current)
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"{key} (checkpoint {a.get(key)!r}, now {b.get(key)!r})"
    return None


# ----------------------------------------------------------------------------- models

def model_meta(cfg: Any, spec: Mapping, server_round: int) -> dict[str, Any]:
    """What `load_model` needs besides the weights: the config (less the run directory, so
    equal models give equal files wherever they were trained), the data spec, the round."""
    bare = copy.deepcopy(cfg)
    bare.output.dir = ""
    return {"config": dumps_toml(bare), "data_spec": dict(spec), "round": int(server_round)}


def save_model(path: str | Path, model: torch.nn.Module, meta: Mapping[str, Any]) -> Path:
    """The model's whole state_dict as safetensors, `meta` as JSON in its metadata, atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    write_atomic(path, save(tensors, metadata={META_KEY: json.dumps(dict(meta), sort_keys=True)}))
    return Path(path)


def load_model(run_dir: str | Path, *, best: bool = False) -> torch.nn.Module:
    """The trained global model of a run: ``model.safetensors`` (the final round), or with
    ``best=True`` ``model-best.safetensors`` (the best evaluated round; needs
    ``output.keep_best``). Rebuilt from the config and data spec stored in the file, weights
    loaded, in eval mode, on the CPU.

    >>> model = load_model("runs/quickstart-20261123-101500")
    >>> model(torch.as_tensor(x_test[:5])).argmax(1)
    """
    from safetensors import safe_open

    run_dir = Path(run_dir)
    path = run_dir / (MODEL_BEST if best else MODEL)
    if not path.is_file():
        why = ("the run kept no best model (output.keep_best = false) or has not evaluated a round" if best
               else "the run has not finished")
        raise FedsimError(f"{path}: no saved model ({why})")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})[META_KEY])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # noqa: BLE001
        raise FedsimError(f"{path}: unreadable model file ({type(exc).__name__}: {exc})") from None
    cfg = loads_toml(meta["config"])
    data = dataset_from_spec(cfg, meta["data_spec"])
    model = build_model(cfg.model, data, cfg.seed, str(run_dir))
    model.load_state_dict(tensors, strict=True)
    return model.eval()
