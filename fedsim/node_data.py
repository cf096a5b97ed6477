"""Which data a node holds, from its ``node_config``.

Simulated nodes and SuperNodes that deploy a built-in dataset carry
``partition-id`` / ``num-partitions`` and re-create the same partition from the
experiment seed, so their shards are identical to simulation. A real data holder
carries ``data-path`` instead: its own CSV/Parquet/NPZ file.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedsim.config import Config
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


def node_data(cfg: Config, node_config: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of this node's local training data."""
    from fedsim.partition import client_data

    if DATA_PATH in node_config:
        from dataclasses import replace

        from fedsim.datasets import load_dataset, read_user_file

        # A data holder trains on its whole file, with labels as they are: class ids must
        # already be 0..C-1, since re-encoding per node would disagree between nodes that
        # lack a class. The task and shapes come from the experiment's dataset.
        task = load_dataset(cfg.data, cfg.federation.num_clients, cfg.seed).task
        x, y, _ = read_user_file(replace(cfg.data, dataset="file", path=str(node_config[DATA_PATH]),
                                         partitioner="iid"))
        return x, (np.asarray(y, dtype=np.int64) if task == "classification" else np.asarray(y, np.float32))
    pid = node_partition_id(node_config)
    n = int(node_config.get(NUM_PARTITIONS, cfg.federation.num_clients))
    if n != cfg.federation.num_clients or not 0 <= pid < n:
        raise ConfigError(f"node config: partition-id {pid} / num-partitions {n} does not match "
                          f"federation.num_clients = {cfg.federation.num_clients}")
    return client_data(cfg, pid)
