"""Which data a node holds, from its ``node_config``.

Simulated nodes and SuperNodes that deploy a built-in dataset carry
``partition-id`` / ``num-partitions`` and re-create the same partition from the
experiment seed, so their shards are identical to simulation. A real data holder
carries ``data-path`` instead: its own CSV/Parquet/NPZ file.

A data holder cannot load the experiment's dataset (it lives with the server), yet its
rows must become the same model inputs: the server sends a *data spec* at discovery
(`data_spec`): task, input shape, classes with their original labels, and the feature
encoding fitted on the train split (columns, one-hot categories, standardization). The
node builds its model from it (`dataset_from_spec`) and reads its own file with the same
code as the server, then encodes it with it (`node_data`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from fedsim.config import Config
from fedsim.datasets import Dataset, Encoding, category_text, encode, load_dataset, read_user_file
from fedsim.errors import ConfigError

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
DATA_PATH = "data-path"


def node_partition_id(node_config: Mapping) -> int:
    if PARTITION_ID in node_config:
        return int(node_config[PARTITION_ID])
    if DATA_PATH in node_config:
        return -1  # a real data holder: no partition of a shared dataset
    raise ConfigError(f"node config: needs {PARTITION_ID!r} (and {NUM_PARTITIONS!r}) or {DATA_PATH!r}")


def is_data_holder(node_config: Mapping) -> bool:
    return DATA_PATH in node_config and PARTITION_ID not in node_config


def data_spec(data: Dataset) -> dict:
    """What a data holder needs to turn its own rows into the experiment's model inputs
    (values a Flower ConfigRecord can carry: scalars and flat lists).

    The encoding travels as flat lists: ``feature-columns`` (numeric, then categorical),
    ``one-hot-columns`` and ``one-hot-values`` (one entry per one-hot input: its column and
    category), and ``x-shift`` / ``x-scale`` per input."""
    enc = data.encoding
    spec = {"task": data.task, "input-shape": list(data.input_shape), "num-classes": data.num_classes,
            "feature-columns": list(enc.columns), "label-values": list(data.label_values),
            "one-hot-columns": [col for col, values in enc.categories for _ in values],
            "one-hot-values": [value for _, values in enc.categories for value in values],
            "y-shift": float(data.y_shift), "y-scale": float(data.y_scale), "label-stats": data.label_stats}
    if enc.shift is not None:
        spec["x-shift"] = [float(v) for v in enc.shift]
        spec["x-scale"] = [float(v) for v in enc.scale]
    return spec


def encoding_from_spec(spec: Mapping) -> Encoding:
    """The experiment's `Encoding`, rebuilt from a data spec (`data_spec`)."""
    categories: dict[str, list[str]] = {}
    for column, value in zip(spec.get("one-hot-columns", []), spec.get("one-hot-values", [])):
        categories.setdefault(str(column), []).append(str(value))
    shift = np.asarray(spec["x-shift"], np.float32) if "x-shift" in spec else None
    scale = np.asarray(spec["x-scale"], np.float32) if "x-scale" in spec else None
    return Encoding(columns=tuple(str(c) for c in spec["feature-columns"]),
                    categories=tuple((col, tuple(values)) for col, values in categories.items()),
                    shift=shift, scale=scale)


def dataset_from_spec(cfg: Config, spec: Mapping) -> Dataset:
    """The experiment's Dataset as a data holder knows it: shapes and transforms, no rows."""
    empty = np.zeros((0, *spec["input-shape"]), np.float32)
    tokenizer = ""
    if cfg.model.name == "hf-text":
        from fedsim.text import resolve_model_dir

        tokenizer = str(resolve_model_dir(cfg.data.tokenizer, "data.tokenizer"))
    return Dataset(name=cfg.data.dataset, task=str(spec["task"]), x_train=empty, y_train=np.zeros(0),
                   x_test=empty, y_test=np.zeros(0), num_classes=int(spec["num-classes"]),
                   input_shape=tuple(int(v) for v in spec["input-shape"]), groups_train=None,
                   tokenizer=tokenizer, encoding=encoding_from_spec(spec), y_shift=float(spec["y-shift"]),
                   y_scale=float(spec["y-scale"]), label_values=tuple(spec["label-values"]),
                   label_stats=str(spec.get("label-stats", "public")))


def node_dataset(cfg: Config, node_config: Mapping, spec: Mapping | None) -> Dataset:
    """The experiment's dataset as this node sees it: loaded, or (data holder) from the spec."""
    if is_data_holder(node_config) and spec is not None:
        return dataset_from_spec(cfg, spec)
    return load_dataset(cfg.data, cfg.federation.num_clients, cfg.seed)


def node_data(cfg: Config, node_config: Mapping, data: Dataset | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of this node's local training data.

    A data holder trains on its whole file, transformed like the experiment's data
    (`data`, by default the loaded experiment dataset): the same missing-value policy, feature
    columns, one-hot categories and standardization, labels mapped to the experiment's class
    ids by their original value.
    """
    from fedsim.partition import client_data

    if is_data_holder(node_config):
        data = data if data is not None else load_dataset(cfg.data, cfg.federation.num_clients, cfg.seed)
        path = str(node_config[DATA_PATH])
        # The same reading, missing-value policy and encoding as the server's (`fedsim.datasets`).
        rows = read_user_file(replace(cfg.data, dataset="file", path=path, partitioner="iid"), data.encoding)
        x = encode(rows.features, data.encoding)
        width = int(np.prod(x.shape[1:]))
        if width != data.num_features:
            raise ConfigError(f"data.path: {path} gives {width} inputs per row; the experiment's model "
                              f"takes {data.num_features}")
        if data.task == "classification":
            ids = {v: i for i, v in enumerate(data.label_values)}
            labels = category_text(rows.y)
            unknown = sorted(set(labels) - set(ids))
            if unknown:
                raise ConfigError(f"data.label_column: {path} has labels {', '.join(unknown[:5])} that the "
                                  f"experiment does not know (classes: {', '.join(data.label_values)})")
            return x, np.asarray([ids[v] for v in labels], np.int64)
        if not np.issubdtype(rows.y.dtype, np.number):
            raise ConfigError(f"data.label_column: regression needs a numeric label column; {path} has values "
                              f"like {rows.y[0]!r}")
        return x, ((rows.y.astype(np.float32) - data.y_shift) / data.y_scale).astype(np.float32)
    pid = node_partition_id(node_config)
    n = int(node_config.get(NUM_PARTITIONS, cfg.federation.num_clients))
    if n != cfg.federation.num_clients or not 0 <= pid < n:
        raise ConfigError(f"node config: partition-id {pid} / num-partitions {n} does not match "
                          f"federation.num_clients = {cfg.federation.num_clients}")
    return client_data(cfg, pid, data)
