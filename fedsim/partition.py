"""Heterogeneity partitioners: which training sample goes to which client.

The label- and size-based splits are flwr-datasets partitioners run over a local
``datasets.Dataset`` holding only the label and the row index (no hub, no copy of
the features). fedsim adds three things they don't have: a power-law ``quantity``
size vector, ``feature-skew`` (an IID split whose clients each see shifted or
noisier features; the shift itself is applied in `client_data`) and ``iid-mix``
(FedLD's label skew: a share of each client IID, the rest over a few classes;
`iid_mix_indices`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.machinery
import importlib.util
import logging
import math
import os
import sys
import types
import warnings
from dataclasses import dataclass

import numpy as np

from fedsim.caches import Snapshot, cached, frozen, module_source, on_disk
from fedsim.config import Config, FederationConfig
from fedsim.datasets import Dataset, disk_key, load_dataset
from fedsim.errors import ConfigError, FedsimError

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
log = logging.getLogger("fedsim")

REGRESSION_BINS = 10  # label-skew partitioners see regression targets as deciles


def partition_labels(data: Dataset) -> np.ndarray:
    """The labels partitioners split on. Decision: for regression, label skew is
    defined on target deciles, since Dirichlet/shard splits need discrete classes."""
    if data.task == "classification":
        return data.y_train
    edges = np.quantile(data.y_train, np.linspace(0, 1, REGRESSION_BINS + 1)[1:-1])
    return np.digitize(data.y_train, edges)


def power_law_sizes(n: int, num_clients: int, power: float, seed: int) -> list[int]:
    """Client sizes proportional to rank^-power (power 0 = equal), each at least 1, summing to n."""
    if n < num_clients:
        raise FedsimError(f"data: {n} training samples cannot give {num_clients} clients one sample each")
    weights = np.arange(1, num_clients + 1, dtype=float) ** -power
    np.random.default_rng(seed).shuffle(weights)
    sizes = np.maximum(1, np.floor(weights / weights.sum() * n)).astype(int)
    while sizes.sum() > n:  # the max(1, .) floor can overshoot by a few
        sizes[np.argmax(sizes)] -= 1
    sizes[np.argmax(sizes)] += n - sizes.sum()
    return sizes.tolist()


def iid_mix_groups(num_clients: int, num_classes: int, k: int) -> np.ndarray:
    """(num_clients, k) skewed classes of each client for ``iid-mix``: k consecutive classes
    (mod C) from class i * (k - 1) mod C (stride 1 for k = 1). Consecutive groups share one
    class, so for C = 10, k = 3 they are exactly FedLD's list [[0,1,2], [2,3,4], [4,5,6],
    [6,7,8], [8,9,0]], client i taking group i mod 5 (Zeng et al., MICCAI 2024, their
    ``data_loader.py``)."""
    start = np.arange(num_clients)[:, None] * max(k - 1, 1)
    return (start + np.arange(k)[None, :]) % num_classes


def iid_mix_counts(n: int, iid_fraction: float, groups: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_clients, C) class counts of ``iid-mix`` clients of n samples each, with FedLD's
    integer rounding (``cifar_noniid_s``): floor(n s) IID samples, floor(./C) per class and the
    remainder to the last class; the other n - floor(n s) over the client's group, floor(./k)
    per class and the remainder to the group's last class. The 1e-9 keeps a decimal share
    exact (float gives 100 * 0.29 = 28.999...; the authors' int() takes 28 there)."""
    num_clients, k = groups.shape
    n_iid = math.floor(n * iid_fraction + 1e-9)
    iid = np.full(num_classes, n_iid // num_classes, dtype=np.int64)
    iid[-1] = n_iid - (num_classes - 1) * (n_iid // num_classes)
    n_skew = n - n_iid
    skew = np.full(k, n_skew // k, dtype=np.int64)
    skew[-1] = n_skew - (k - 1) * (n_skew // k)
    counts = np.tile(iid, (num_clients, 1))
    np.add.at(counts, (np.repeat(np.arange(num_clients), k), groups.ravel()), np.tile(skew, num_clients))
    return counts


def iid_mix_indices(labels: np.ndarray, num_clients: int, k: int, iid_fraction: float,
                    seed: int) -> tuple[list[np.ndarray], int]:
    """FedLD's label skew (Zeng et al., MICCAI 2024; ``--noniid_s`` = 100 s): every client
    gets n samples, a share s spread evenly over all C classes and the rest evenly over its
    group of k classes (`iid_mix_groups`, `iid_mix_counts`). Returns each client's row
    indices and the number of rows left out.

    The authors fix n (``local_size`` 600) and, when a class runs out, start over at its
    first sample, so clients share samples. fedsim never gives a sample to two clients:
    n is the largest value <= floor(N / num_clients) whose class counts, summed over the
    clients, fit in every class (demand is not monotone in n, as the last class takes a
    rounding remainder, so every n is tried downward). Each client then draws its counts
    without replacement from per-class pools shuffled by the seed. The samples no client
    needs, N - num_clients * n (the classes in fewer groups keep most of them), are LEFT
    OUT of training: the caller logs how many.
    """
    num_classes = int(labels.max()) + 1
    if k > num_classes:
        raise ConfigError(f"data.classes_per_client: iid-mix groups k of the {num_classes} classes; "
                          f"got {k} > {num_classes}")
    pools = np.bincount(labels, minlength=num_classes)
    groups = iid_mix_groups(num_clients, num_classes, k)
    n = len(labels) // num_clients
    while n > 0 and np.any(iid_mix_counts(n, iid_fraction, groups, num_classes).sum(0) > pools):
        n -= 1
    if n == 0:
        raise ConfigError(f"federation.num_clients: iid-mix cannot give {num_clients} clients one sample each "
                          f"without reusing one (class sizes {pools.tolist()}, data.classes_per_client {k}, "
                          f"data.iid_fraction {iid_fraction:g}); lower federation.num_clients")
    counts = iid_mix_counts(n, iid_fraction, groups, num_classes)
    rng = np.random.default_rng(seed)
    order = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    # client i's rows of class c: the next counts[i, c] of the class's shuffled pool
    ends = np.cumsum(counts, axis=0)
    indices = [rng.permutation(np.concatenate([order[c][ends[i, c] - counts[i, c]:ends[i, c]]
                                               for c in range(num_classes)])).astype(np.int64)
               for i in range(num_clients)]
    return indices, len(labels) - num_clients * n


# flwr-datasets' package import also imports its plotting and metrics helpers (seaborn,
# scipy.stats, matplotlib: about 1.3 s of every run's start), which fedsim never calls.
DEFERRED_SUBMODULES = ("flwr_datasets.visualization", "flwr_datasets.metrics")


class _DeferredModule(types.ModuleType):
    """A module whose code runs on the first use of one of its own (non-dunder) attributes.

    Not `importlib.util.LazyLoader`: its modules load on *any* attribute access, and the
    import system reads ``__spec__`` of every module it finds in ``sys.modules``, so the
    parent package's ``from . import name`` loaded it at once. Here the import system's
    dunders are plain attributes; ``plot_label_distributions`` or any other name loads it."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        self.__class__ = types.ModuleType  # from now on an ordinary module
        self.__spec__.loader.exec_module(self)
        return getattr(self, name)


def _defer(name: str) -> None:
    """Put submodule `name` in ``sys.modules`` unexecuted (`_DeferredModule`), before its
    parent package is imported, so that the parent's ``from . import name`` binds it without
    running it. Found through the parent's directory, which ``find_spec`` of a top-level
    package gives without running the package. Whoever uses the module gets the real one."""
    if name in sys.modules:
        return
    parent = importlib.util.find_spec(name.rpartition(".")[0])
    if parent is None or not parent.submodule_search_locations:
        return
    spec = importlib.machinery.PathFinder.find_spec(name, list(parent.submodule_search_locations))
    if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
        return
    module = importlib.util.module_from_spec(spec)
    module.__class__ = _DeferredModule
    sys.modules[name] = module


def partitioners_module():
    """``flwr_datasets.partitioner``, imported without running flwr-datasets' plotting and
    metrics modules (they run if anything uses them later)."""
    if "flwr_datasets" not in sys.modules:
        for name in DEFERRED_SUBMODULES:
            _defer(name)
    from flwr_datasets import partitioner

    return partitioner


def _make_partitioner(cfg: Config, labels: np.ndarray, groups: np.ndarray | None,
                      min_partition_size: int = 1):
    fp = partitioners_module()

    d, n_clients, seed = cfg.data, cfg.federation.num_clients, cfg.seed
    kind = d.partitioner
    if kind in ("iid", "feature-skew"):
        return fp.IidPartitioner(num_partitions=n_clients)
    if kind == "dirichlet":
        return fp.DirichletPartitioner(num_partitions=n_clients, partition_by="label", alpha=d.alpha,
                                       min_partition_size=min_partition_size, self_balancing=False, seed=seed)
    if kind == "shard":
        return fp.ShardPartitioner(num_partitions=n_clients, partition_by="label",
                                   num_shards_per_partition=d.classes_per_client,
                                   keep_incomplete_shard=True, seed=seed)
    if kind == "pathological":
        # first-deterministic: client i's first class is i mod C, so every class is held
        # by some client whenever num_clients >= number of classes
        return fp.PathologicalPartitioner(num_partitions=n_clients, partition_by="label",
                                          num_classes_per_partition=d.classes_per_client,
                                          class_assignment_mode="first-deterministic", seed=seed)
    if kind == "quantity":
        return fp.SizePartitioner(power_law_sizes(len(labels), n_clients, d.quantity_power, seed))
    if kind == "natural-id":
        if groups is None:
            raise FedsimError(f"data.partitioner: 'natural-id' needs a group column; dataset "
                              f"{d.dataset!r} has none (use 'synthetic' or a file with data.natural_id_column)")
        n_groups = len(np.unique(groups))
        if n_groups != n_clients:
            raise FedsimError(f"federation.num_clients: natural-id found {n_groups} groups, "
                              f"so num_clients must be {n_groups} (got {n_clients})")
        return fp.NaturalIdPartitioner(partition_by="group")
    raise FedsimError(f"data.partitioner: unknown {kind!r}")


def _hf_dataset(labels: np.ndarray, groups: np.ndarray | None, seed: int, shuffle: bool):
    from datasets import Dataset as HFDataset

    order = np.random.default_rng(seed).permutation(len(labels)) if shuffle else np.arange(len(labels))
    columns = {"idx": order, "label": labels[order]}
    if groups is not None:
        columns["group"] = groups[order]
    # Arrow format: a column is then a pyarrow array that numpy converts at once. In the default
    # format (datasets 4) it is a lazy Column that np.array reads row by row, as flwr-datasets'
    # partitioners do over the label or group column and `_load_all` over "idx": for 1,000
    # natural-id clients that took 15 s. The partitions are the same (tests/test_partition.py).
    return HFDataset.from_dict(columns).with_format("arrow")


def _load_all(part, num_clients: int) -> list[np.ndarray]:
    """Every client's row indices (the dataset is in Arrow format: see `_hf_dataset`)."""
    with _quiet_natural_id_progress(), warnings.catch_warnings():
        # datasets' `sort` (flwr-datasets' shard partitioner) passes pyarrow an option that
        # pyarrow 25 deprecates: a FutureWarning on every shard run that no fedsim user can act on
        warnings.filterwarnings("ignore", message=".*null_placement.*", category=FutureWarning)
        return [np.asarray(part.load_partition(i)["idx"], dtype=np.int64) for i in range(num_clients)]


@contextlib.contextmanager
def _quiet_natural_id_progress():
    """flwr-datasets' NaturalIdPartitioner wraps its pass over the rows in a tqdm bar
    ("Generating partition_id_to_indices") written to stderr, in the middle of fedsim's own
    console and progress bar; it is turned off while fedsim partitions."""
    from flwr_datasets.partitioner import natural_id_partitioner as natural_id

    real = getattr(natural_id, "tqdm", None)
    if real is None:  # a later flwr-datasets without the bar
        yield
        return
    natural_id.tqdm = functools.partial(real, disable=True)
    try:
        yield
    finally:
        natural_id.tqdm = real


def fill_empty_clients(indices: list[np.ndarray]) -> list[np.ndarray]:
    """Move one sample from the currently largest client to each empty client."""
    indices = [idx.copy() for idx in indices]
    for i, idx in enumerate(indices):
        if len(idx) == 0:
            donor = max(range(len(indices)), key=lambda j: len(indices[j]))
            if len(indices[donor]) < 2:
                break  # fewer samples than clients: refused below
            indices[i], indices[donor] = indices[donor][-1:], indices[donor][:-1]
    return indices


def assign_leftovers(indices: list[np.ndarray], labels: np.ndarray, cfg: Config) -> list[np.ndarray]:
    """Give every sample a client. flwr-datasets' shard and pathological partitioners leave
    some samples out (incomplete shards, classes no client drew). Documented rule: each
    left-out sample goes to a client that already holds its label, round-robin, so the
    label skew is kept. A label that no client holds is refused, with the knobs to turn.
    """
    taken = np.zeros(len(labels), dtype=bool)
    for idx in indices:
        taken[idx] = True
    left = np.flatnonzero(~taken)
    if len(left) == 0:
        return indices
    holders = {lab: [i for i, idx in enumerate(indices) if np.any(labels[idx] == lab)]
               for lab in np.unique(labels[left])}
    orphan = [lab for lab, who in holders.items() if not who]
    if orphan:
        raise FedsimError(f"data.partitioner: with {cfg.federation.num_clients} clients and "
                          f"{cfg.data.classes_per_client} classes per client no client holds label {orphan[0]}; "
                          f"raise data.classes_per_client or federation.num_clients")
    extra: dict[int, list[int]] = {}
    for lab, who in holders.items():
        for j, sample in enumerate(left[labels[left] == lab]):
            extra.setdefault(who[j % len(who)], []).append(sample)
    return [np.concatenate([idx, np.asarray(extra.get(i, []), dtype=np.int64)]) for i, idx in enumerate(indices)]


@dataclass(frozen=True)
class Partition:
    """Row indices of the training split for each client; `left_out`: training rows no
    client holds (only ``iid-mix`` leaves any out)."""

    indices: list[np.ndarray]
    left_out: int = 0


def partition(cfg: Config, data: Dataset | None = None) -> Partition:
    """Split the training rows across ``cfg.federation.num_clients`` clients.

    Every row goes to exactly one client, except under ``iid-mix``, which leaves out the
    rows that equal-sized clients cannot use without reusing a sample (`iid_mix_indices`;
    logged, and counted in `Partition.left_out`). A client left with no rows is refused here,
    with the knob to turn, rather than crashing inside training later. Clients smaller
    than a batch are allowed: Poisson sampling handles them (with q = 1, see the warning
    in `clients.trainer`).

    The partition is a function of ``cfg.data``, the number of clients and the seed alone,
    and is cached per process on them and on disk across runs (`fedsim.caches`), so a
    second run of the same data imports neither flwr-datasets nor Hugging Face ``datasets``.
    `data` is accepted from callers that hold the experiment's dataset; it is not needed,
    since a miss loads the same dataset from its own cache
    (``load_dataset(cfg.data, num_clients, seed)``).
    """
    return _partition_cached(frozen(cfg.data), cfg.federation.num_clients, cfg.seed)


@cached(maxsize=16)
def _partition_cached(data_cfg: Snapshot, num_clients: int, seed: int) -> Partition:
    data_key = disk_key(data_cfg, num_clients, seed)
    # the dataset's key (its files' contents) and the code that splits it
    key = None if data_key is None else (data_key, module_source(__name__), module_source("flwr_datasets"))
    return on_disk("partition", key, lambda: _partition(data_cfg, num_clients, seed), Partition)


def _partition(data_cfg: Snapshot, num_clients: int, seed: int) -> Partition:
    # Only these three fields are read below; the rest of the Config keeps its defaults.
    cfg = Config(seed=seed, data=data_cfg.thaw(),
                 federation=FederationConfig(num_clients=num_clients, clients_per_round=num_clients))
    data = load_dataset(cfg.data, num_clients, seed)
    if len(data.y_train) < cfg.federation.num_clients:
        raise FedsimError(f"data.partitioner: {len(data.y_train)} training samples cannot give "
                          f"{cfg.federation.num_clients} clients one sample each; lower federation.num_clients")
    labels = partition_labels(data)
    if cfg.data.partitioner == "iid-mix":
        indices, left_out = iid_mix_indices(labels, cfg.federation.num_clients, cfg.data.classes_per_client,
                                            cfg.data.iid_fraction, cfg.seed)
        log.info("data.partitioner: iid-mix gives each of %d clients %d samples (data.iid_fraction %g over all "
                 "classes, the rest over %d); %d of %d training samples are left out, as more would reuse "
                 "a sample", cfg.federation.num_clients, len(indices[0]), cfg.data.iid_fraction,
                 cfg.data.classes_per_client, left_out, len(labels))
        return Partition(indices, left_out)
    # quantity (SizePartitioner) takes contiguous rows, so it needs a shuffled dataset;
    # the other partitioners shuffle on their own and see the rows in order.
    shuffled = cfg.data.partitioner in ("quantity", "iid", "feature-skew")
    def split(min_partition_size: int):
        part = _make_partitioner(cfg, labels, data.groups_train, min_partition_size)
        part.dataset = _hf_dataset(labels, data.groups_train, cfg.seed, shuffled)
        return _load_all(part, cfg.federation.num_clients)

    try:
        indices = split(1)
    except ValueError as exc:
        if cfg.data.partitioner != "dirichlet":
            raise FedsimError(f"data.partitioner: {cfg.data.partitioner} could not split "
                              f"{len(labels)} samples over {cfg.federation.num_clients} clients: {exc}") from None
        # flwr-datasets gave up after 10 draws that each left a client empty (tiny alpha).
        # Documented rule: draw once with no minimum size, then give each empty client one
        # sample from the largest client, so every sample still goes to exactly one client.
        indices = split(0)
        indices = fill_empty_clients(indices)
    indices = assign_leftovers(indices, labels, cfg)
    empty = [i for i, idx in enumerate(indices) if len(idx) == 0]
    if empty:
        raise FedsimError(f"data.partitioner: client {empty[0]} got no samples "
                          f"({len(empty)} empty clients); raise data.alpha or lower federation.num_clients")
    return Partition(indices)


def client_data(cfg: Config, partition_id: int, data: Dataset | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The (x, y) training arrays of one client, with its feature skew applied. `data` is the
    experiment's loaded dataset, if the caller holds it (else it is loaded, from the cache)."""
    data = data if data is not None else load_dataset(cfg.data, cfg.federation.num_clients, cfg.seed)
    idx = partition(cfg, data).indices[partition_id]
    x, y = data.x_train[idx], data.y_train[idx]
    if cfg.data.partitioner == "feature-skew":
        rng = np.random.default_rng([cfg.seed, partition_id, 7])
        shift = rng.normal(0, cfg.data.feature_shift, x.shape[1:]).astype(np.float32)
        noise = rng.normal(0, cfg.data.feature_noise, x.shape).astype(np.float32)
        x = x + shift + noise
    return x, y


def label_counts(cfg: Config) -> np.ndarray:
    """(num_clients, num_labels) count matrix of the partition labels."""
    data = load_dataset(cfg.data, cfg.federation.num_clients, cfg.seed)
    labels = partition_labels(data)
    n_labels = int(labels.max()) + 1
    return np.stack([np.bincount(labels[idx], minlength=n_labels) for idx in partition(cfg, data).indices])
