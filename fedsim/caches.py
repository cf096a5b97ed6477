"""Process-wide caches: one mechanism for all of them.

Every client-round of a simulation reads the same dataset, partition, initial model,
pretrained backbone, tokenizer and parsed config, so each is computed once per process
and kept. All of them are `functools.lru_cache` functions declared with `cached`, keyed on
hashable, immutable values, with a documented ``maxsize`` (least recently used first out):

==========================================  =======  ==========================================
cache                                       maxsize  key
==========================================  =======  ==========================================
`fedsim.datasets` datasets                        8  data config, num_clients, seed
`fedsim.partition` partitions                    16  data config, num_clients, seed
`fedsim.models` slow-to-build models              4  model config, data shape, seed, run dir
`fedsim.lora_models` pretrained backbones         4  source task, widths, epochs, seed
`fedsim.text` tokenizers                          4  model directory
`fedsim.experiment` parsed configs               16  the experiment TOML
`clients.bags` bag releases                    4096  seed, client, bag params, labels' digest
`clients.app` a node's dataset view, (x, y)    4096  experiment TOML, node config, data spec
`clients.app` a node's (x, y) on the GPU       4096  the same, and the device
`clients.app` a node's view, by object (memo)  4096  the node config's and data spec's ids
`clients.app` spare round model (a pool)          4  experiment TOML
==========================================  =======  ==========================================

Config sections are mutable dataclasses (a run fills in its directory and calibrated sigma),
so a cache never keys on one: it keys on `frozen(section)`, an immutable snapshot taken at
the call, and rebuilds the section from the snapshot (`Snapshot.thaw`) when it computes.
Mutating a config after a call therefore never returns stale data: the next call takes a
new snapshot, which is a different key. Inputs that a computation needs but that must not
split the cache (the loaded dataset a model is built for, the run directory a backbone is
saved in) ride along in a `Key`'s ``payload``, which equality and hashing ignore.

The memo in front of the node cache (`clients.app.node_inputs`) skips taking the snapshot on
every client-round: it keeps the node config and spec objects themselves, with copies of what
they held, and answers only while they are those objects, unchanged, under the same TOML.

The ClientApp's caches (`clients.app`) hold a run's client data, so the in-process runtime
empties them when a run ends (`clients.app.release_run`); a new run with the same
experiment TOML would find the same entries, by construction.

`clear_all` empties every cache (tests, or a long-lived process that changed files on disk:
a user file's contents are not part of the dataset key, only its path). Memos of pure
functions of scalars (the RDP curve per (sigma, q) in `fedsim.privacy.accounting`, noise
scales, .npy headers in `fedsim.records`) are plain `functools.lru_cache`s: they cannot go
stale, so they are not registered here.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_CACHES: list[Any] = []


def cached(maxsize: int) -> Callable[[F], F]:
    """`functools.lru_cache(maxsize)`, registered so that `clear_all` and `cache_infos` see it."""
    def wrap(fn: F) -> F:
        wrapped = functools.lru_cache(maxsize=maxsize)(fn)
        _CACHES.append(wrapped)
        return wrapped  # type: ignore[return-value]
    return wrap


def clear_all() -> None:
    """Empty every cache declared with `cached` (in the modules imported so far)."""
    for cache in _CACHES:
        cache.cache_clear()


def cache_infos() -> dict[str, Any]:
    """``module.function`` -> `functools._CacheInfo` (hits, misses, maxsize, currsize) per cache."""
    return {f"{c.__module__}.{c.__qualname__}": c.cache_info() for c in _CACHES}


class FrozenList(tuple):
    """A list inside a `Snapshot`: a tuple, thawed back to a list."""

    __slots__ = ()


class FrozenDict(tuple):
    """A dict inside a `Snapshot`: its (key, value) pairs sorted by key, thawed back to a dict."""

    __slots__ = ()


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """An immutable, hashable copy of a dataclass instance: its class and (field, value) pairs."""

    cls: type
    items: tuple[tuple[str, Hashable], ...]

    def thaw(self) -> Any:
        """A new instance equal to the one the snapshot was taken of."""
        return self.cls(**{name: _thaw(value) for name, value in self.items})

    def get(self, name: str) -> Any:
        """The (thawed) value of one field."""
        for key, value in self.items:
            if key == name:
                return _thaw(value)
        raise KeyError(name)


def frozen(value: Any) -> Any:
    """An immutable, hashable snapshot of `value`: dataclasses become `Snapshot`s, lists and
    tuples tuples, dicts sorted pairs, recursively. Scalars (str, int, float, bool, None) stay.

    Taken on every cached call (each client's first visit of a run reads the dataset and
    partition through it), so scalars, the bulk of a config, return first."""
    if value is None or type(value) in _SCALARS:
        return value
    names = _field_names(type(value))
    if names is not None:
        return Snapshot(type(value), tuple((name, frozen(getattr(value, name))) for name in names))
    if isinstance(value, list):
        return FrozenList(frozen(v) for v in value)
    if isinstance(value, tuple):
        return tuple(frozen(v) for v in value)
    if isinstance(value, dict):
        return FrozenDict((k, frozen(v)) for k, v in sorted(value.items()))
    hash(value)  # anything else must be hashable already (a TypeError names it)
    return value


_SCALARS = frozenset({str, int, float, bool})


@functools.lru_cache(maxsize=None)
def _field_names(cls: type) -> tuple[str, ...] | None:
    """A dataclass' field names (None for other types), looked up once per class."""
    if dataclasses.is_dataclass(cls):
        return tuple(f.name for f in dataclasses.fields(cls))
    return None


def _thaw(value: Any) -> Any:
    if isinstance(value, Snapshot):
        return value.thaw()
    if isinstance(value, FrozenList):
        return [_thaw(v) for v in value]
    if isinstance(value, FrozenDict):
        return {k: _thaw(v) for k, v in value}
    if isinstance(value, tuple):
        return tuple(_thaw(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class Key:
    """A cache key (`value`, hashable) plus a `payload` that equality and hashing ignore.

    The payload carries what the computation needs on a miss but what must not split the
    cache, because the key already determines the result (the dataset a model is built
    for: its name and shapes are in the key). A cache holds the payload of the first call
    of each key until the entry is evicted.
    """

    value: Hashable
    payload: Any = dataclasses.field(default=None, compare=False, repr=False)
