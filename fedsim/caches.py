"""Process-wide caches: one mechanism for all of them.

Every client-round of a simulation reads the same dataset, partition, initial model,
pretrained backbone, tokenizer and parsed config, so each is computed once per process
and kept. All of them are `functools.lru_cache` functions declared with `cached`, keyed on
hashable, immutable values, with a documented ``maxsize`` (least recently used first out):

==========================================  =======  ==========================================
cache                                       maxsize  key
==========================================  =======  ==========================================
`fedsim.datasets` datasets (also on disk)         8  data config, num_clients, seed
`fedsim.partition` partitions (also on disk)     16  data config, num_clients, seed
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
in memory a user file's contents are not part of the dataset key, only its path; on disk,
below, they are). Memos of pure
functions of scalars (the RDP curve per (sigma, q) in `fedsim.privacy.accounting`, noise
scales, .npy headers in `fedsim.records`) are plain `functools.lru_cache`s: they cannot go
stale, so they are not registered here.

On disk, across runs
--------------------
The two caches that every run of the same data rebuilds, the dataset (`fedsim.datasets`: a
user file read and encoded, a built-in loaded) and the partition (`fedsim.partition`:
flwr-datasets' partitioners, whose import alone, Hugging Face ``datasets``, pandas and
pyarrow, took longer than the rest of a quickstart run's start), also keep their results on
disk with `on_disk`, under `cache_dir()`: ``$FEDSIM_CACHE_DIR``, else
``$XDG_CACHE_HOME/fedsim``, else ``~/.cache/fedsim``; ``FEDSIM_CACHE_DIR=off`` turns the disk
layer off. ``fedsim cache clear`` (or ``rm -rf`` of the directory) empties it.

An entry's name is the SHA-256 of its key's text: the cache format (`DISK_FORMAT`), fedsim's
version, the entry's kind, the same frozen key as the in-process cache (every field of the
data config, the number of clients, the seed) and `Source` fingerprints of what the result
was built from: a user's data file by its content (`file_source`), the modules that build it
and the libraries whose code decides it by size and modification time (`module_source`),
so editing fedsim or upgrading a library makes new entries rather than reading stale ones.
An entry is written to a temporary file and renamed into place (`os.replace`), so a reader
sees a whole entry or none; it carries the SHA-256 of its payload and its key's text, and
one that does not check out (truncated, bit-flipped, another key, unreadable) is ignored and
rebuilt, with one log line. The log records a build emitted (a missing-value count, an
inferred task) are kept with it and logged again on a hit, so a cached run says what a fresh
one says. Entries are pickles, trusted like any file in your home directory: point
``FEDSIM_CACHE_DIR`` only at a directory no one else writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import logging
import os
import pickle
import tempfile
import threading
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

log = logging.getLogger("fedsim")

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


# --------------------------------------------------------------------------- on disk

CACHE_ENV = "FEDSIM_CACHE_DIR"
DISK_FORMAT = 1  # bumped when an entry's layout or a cached type's meaning changes
_MAGIC = b"fedsim-cache\n"
_DIGEST = hashlib.sha256().digest_size


def cache_dir() -> Path | None:
    """Where `on_disk` keeps its entries: ``$FEDSIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedsim``,
    else ``~/.cache/fedsim``; None when ``FEDSIM_CACHE_DIR`` is ``off``."""
    given = os.environ.get(CACHE_ENV, "")
    if given.strip().lower() == "off":
        return None
    if given.strip():
        return Path(given).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if xdg.strip() else Path.home() / ".cache") / "fedsim"


@dataclasses.dataclass(frozen=True)
class Source:
    """What a cached result was built from, in a disk key: a name and a fingerprint."""

    name: str
    fingerprint: Hashable


def file_source(name: str, path: str | os.PathLike) -> Source:
    """A data file by its size and content (SHA-256). Content, not modification time: a file
    rewritten within the clock's resolution, or copied with its times kept, is still a new
    file. Hashing reads the file once, far less than parsing it, and once per process (the
    dataset's and the partition's keys both name the file). A file that cannot be read
    fingerprints as None (the build then names the problem, and nothing is stored)."""
    try:
        st = os.stat(path)
        return Source(name, (st.st_size, _sha256(os.fspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                                                 st.st_ino)))
    except OSError:
        return Source(name, None)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    """The file's SHA-256, memoized on its stat: any write changes the inode's change time,
    which, unlike the modification time, no one can set back."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def module_source(name: str) -> Source:
    """A module's or package's source file by size and modification time, found without
    importing it: fedsim's own code (edited in a checkout) or a library that decides a result
    (reinstalled or upgraded). `name` is a top-level package or an imported module (finding a
    submodule imports its parents). None if it is not installed."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    origin = getattr(spec, "origin", None)
    if not origin:
        return Source(name, None)
    try:
        st = os.stat(origin)
    except OSError:
        return Source(name, None)
    return Source(name, (origin, st.st_size, st.st_mtime_ns))


def _entry_path(kind: str, key_text: str) -> Path | None:
    root = cache_dir()
    if root is None:
        return None
    return root / kind / (hashlib.sha256(key_text.encode()).hexdigest() + ".pkl")


def _key_text(kind: str, key: Hashable) -> str:
    from fedsim import __version__  # the package root: no layer of its own, imported first anyway

    # repr of frozen values (Snapshots, tuples, scalars) is deterministic across processes
    return repr((DISK_FORMAT, __version__, kind, key))


def on_disk(kind: str, key: Hashable, build: Callable[[], T], expect: type | None = None) -> T:
    """``build()``, kept on disk under `kind` and `key` (see "On disk" above) and read back by
    the next process that asks for the same key. `key` must be built from frozen values and
    `Source`s, whose repr is the same in every process; a key of None skips the disk (a
    result built from something that cannot be fingerprinted). A read entry that is not an
    instance of `expect` counts as corrupt. Errors of `build` propagate and store nothing; a
    cache that cannot be written (read-only, full) is only logged: the run goes on."""
    if key is None:
        return build()
    key_text = _key_text(kind, key)
    path = _entry_path(kind, key_text)
    if path is None:
        return build()
    found = _read(path, key_text, expect)
    if found is not None:
        value, records = found
        _replay(records)
        return value
    with _capturing() as records:
        value = build()
    _write(path, key_text, value, records)
    return value


def _read(path: Path, key_text: str, expect: type | None) -> tuple[Any, list] | None:
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.info("cache: cannot read %s (%s); rebuilding it", path, exc)
        return None
    try:
        if not blob.startswith(_MAGIC):
            raise ValueError("not a fedsim cache entry")
        digest, payload = blob[len(_MAGIC):len(_MAGIC) + _DIGEST], blob[len(_MAGIC) + _DIGEST:]
        if hashlib.sha256(payload).digest() != digest:
            raise ValueError("checksum mismatch (truncated or damaged)")
        stored_key, value, records = pickle.loads(payload)
        if stored_key != key_text:
            raise ValueError("entry of another key")
        if expect is not None and not isinstance(value, expect):
            raise ValueError(f"holds a {type(value).__name__}, not a {expect.__name__}")
        return value, list(records)
    except Exception as exc:  # noqa: BLE001 - any damaged entry is rebuilt, never fatal
        log.info("cache: ignoring damaged entry %s (%s); rebuilding it", path, exc)
        return None


def _write(path: Path, key_text: str, value: Any, records: list) -> None:
    try:
        payload = pickle.dumps((key_text, value, records), protocol=pickle.HIGHEST_PROTOCOL)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem[:16]}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(_MAGIC + hashlib.sha256(payload).digest() + payload)
            os.replace(tmp, path)  # atomic: a reader sees the old entry, none, or this whole one
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except Exception as exc:  # noqa: BLE001 - a cache that cannot be written slows the next run, no more
        log.info("cache: cannot write %s (%s); the next run rebuilds it", path, exc)


# The log records of the build in progress, innermost build last: a build that asks another
# `on_disk` cache (the partition loads the dataset) keeps only its own records, since the
# inner entry keeps and replays its own.
_building = threading.local()


class _Capture(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        stack = getattr(_building, "stack", None)
        if stack and stack[-1] is not None:
            stack[-1].append((record.name, record.levelno, record.getMessage()))


_CAPTURE = _Capture(level=logging.INFO)
_capture_lock = threading.Lock()
_capture_users = 0  # builds in progress, in all threads: the handler is on the logger while any runs


@contextlib.contextmanager
def _capturing() -> Iterator[list]:
    """The fedsim log records (INFO and up) this thread emits while the block builds a result."""
    global _capture_users
    records: list = []
    stack = _building.__dict__.setdefault("stack", [])
    with _capture_lock:
        if _capture_users == 0:
            logging.getLogger("fedsim").addHandler(_CAPTURE)
        _capture_users += 1
    stack.append(records)
    try:
        yield records
    finally:
        stack.pop()
        with _capture_lock:
            _capture_users -= 1
            if _capture_users == 0:
                logging.getLogger("fedsim").removeHandler(_CAPTURE)


def _replay(records: list) -> None:
    """Log a cached build's records again, as the build logged them (and not into the records
    of an enclosing build, which has its own entry for them)."""
    stack = getattr(_building, "stack", None)
    if stack is not None:
        stack.append(None)
    try:
        for name, level, message in records:
            logging.getLogger(name).log(level, "%s", message)
    finally:
        if stack is not None:
            stack.pop()


def disk_entries() -> list[Path]:
    """The entries in `cache_dir()` (none when it is off or missing)."""
    root = cache_dir()
    if root is None or not root.is_dir():
        return []
    return sorted(p for p in root.glob("*/*.pkl") if p.is_file())


def clear_disk() -> tuple[int, int]:
    """Delete every entry in `cache_dir()` (and temporary files left by killed writers): the
    (entries, bytes) removed. Only fedsim's own kinds of files go; the directory stays."""
    root = cache_dir()
    if root is None or not root.is_dir():
        return 0, 0
    count = size = 0
    for path in [*root.glob("*/*.pkl"), *root.glob("*/.*.tmp")]:
        with contextlib.suppress(OSError):
            size += path.stat().st_size
            path.unlink()
            count += path.suffix == ".pkl"
    for sub in root.iterdir():
        if sub.is_dir():
            with contextlib.suppress(OSError):
                sub.rmdir()  # empty kinds only
    return count, size
