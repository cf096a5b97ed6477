"""Process-wide caches (`fedsim.caches`): hits for equal configs, misses for changed or
mutated ones, and one `clear_all`."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedsim.clients import app  # noqa: F401 - registers the ClientApp's caches for cache_infos
from fedsim.clients.bags import client_bags
from fedsim import caches, models
from fedsim.algorithms import Hyper, LocalTask, TrainSettings
from fedsim.caches import Key, Snapshot, clear_all, frozen
from fedsim.config import DataConfig, dumps_toml, loads_toml
from fedsim.datasets import load_dataset
from fedsim.experiment import _parse
from fedsim.models import build_model
from fedsim.partition import partition
from fedsim.strategies.bags import BagsParams


@pytest.fixture(autouse=True)
def empty_caches():
    clear_all()
    yield
    clear_all()


def test_frozen_snapshot_is_hashable_and_thaws_to_an_equal_config(tiny):
    cfg = tiny(**{"data.classes": [1, 2], "model.hidden": [16, 8], "strategy.name": "fedprox"})
    snap = frozen(cfg)
    assert isinstance(snap, Snapshot)
    assert hash(snap) == hash(frozen(copy.deepcopy(cfg)))
    assert snap == frozen(loads_toml(dumps_toml(cfg)))
    back = snap.thaw()
    assert back == cfg and back is not cfg
    assert back.data.classes == [1, 2] and isinstance(back.data.classes, list)
    assert back.data.classes is not cfg.data.classes  # a copy: mutating one leaves the other
    assert snap.get("seed") == cfg.seed
    cfg.data.classes.append(3)
    assert frozen(cfg) != snap and back.data.classes == [1, 2]


def test_key_payload_does_not_split_the_cache():
    assert Key(("a", 1), payload=np.zeros(3)) == Key(("a", 1), payload="anything")
    assert hash(Key(("a", 1), payload=[1])) == hash(Key(("a", 1)))
    assert Key(("a", 1)) != Key(("a", 2))


def test_dataset_cached_for_an_equal_config_and_not_for_a_changed_one():
    a = load_dataset(DataConfig(dataset="digits"), 6, 0)
    assert load_dataset(DataConfig(dataset="digits"), 6, 0) is a  # equal, not the same object
    assert load_dataset(DataConfig(dataset="digits", test_fraction=0.3), 6, 0) is not a
    assert load_dataset(DataConfig(dataset="digits"), 6, 1) is not a
    cfg = DataConfig(dataset="digits", classes=[0, 1])
    b = load_dataset(cfg, 6, 0)
    cfg.classes.append(2)  # mutated after the call: the next call sees the new classes
    c = load_dataset(cfg, 6, 0)
    assert c is not b and b.num_classes == 2 and c.num_classes == 3


def test_partition_cached_and_changed_alpha_gives_a_new_partition(tiny):
    cfg = tiny(**{"data.partitioner": "dirichlet", "data.alpha": 0.5})
    first = partition(cfg)
    assert partition(copy.deepcopy(cfg)) is first
    other = partition(tiny(**{"data.partitioner": "dirichlet", "data.alpha": 0.1}))
    assert other is not first
    assert any(not np.array_equal(a, b) for a, b in zip(first.indices, other.indices))


def test_mutated_config_does_not_return_stale_partition(tiny):
    cfg = tiny(**{"data.partitioner": "dirichlet", "data.alpha": 0.5})
    before = partition(cfg)
    cfg.data.alpha = 0.1  # run.py and tests mutate configs in place
    after = partition(cfg)
    assert after is not before
    fresh = partition(tiny(**{"data.partitioner": "dirichlet", "data.alpha": 0.1}))
    assert fresh is after  # the same key as a config built with alpha = 0.1
    cfg.federation.num_clients = 4
    assert len(partition(cfg).indices) == 4


def test_cached_results_are_bit_identical_to_fresh_ones(tiny, monkeypatch):
    cfg = tiny(**{"data.partitioner": "shard"})
    cached = [idx.copy() for idx in partition(cfg).indices]
    clear_all()
    monkeypatch.setenv(caches.CACHE_ENV, "off")  # built again, not read from disk
    fresh = partition(cfg).indices
    assert all(np.array_equal(a, b) for a, b in zip(cached, fresh))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_slow_model_is_kept_and_copied(tiny, monkeypatch):
    monkeypatch.setattr(models, "SLOW_BUILD_SECONDS", -1.0)  # every model counts as slow
    cfg = tiny()
    data = load_dataset(cfg.data, 6, 0)
    m1 = build_model(cfg.model, data, 0)
    m2 = build_model(copy.deepcopy(cfg.model), data, 0)
    assert m1 is not m2 and _same_weights(m1, m2)
    info = models._slow_template.cache_info()
    assert (info.hits, info.misses, info.currsize) == (1, 1, 1)
    with torch.no_grad():
        next(m1.parameters()).add_(1.0)  # training one copy leaves the kept model alone
    assert _same_weights(build_model(cfg.model, data, 0), m2)
    cfg.model.hidden = [8]  # mutated: a new model
    m3 = build_model(cfg.model, data, 0)
    assert m3[1].out_features == 8 and models._slow_template.cache_info().currsize == 2


def test_fast_model_is_built_again_with_the_same_weights(tiny, monkeypatch):
    monkeypatch.setattr(models, "SLOW_BUILD_SECONDS", float("inf"))
    cfg = tiny()
    data = load_dataset(cfg.data, 6, 0)
    m1, m2 = build_model(cfg.model, data, 0), build_model(cfg.model, data, 0)
    assert m1 is not m2 and _same_weights(m1, m2)
    assert models._slow_template(Key((frozen(cfg.model), data.name, data.input_shape, data.num_classes,
                                      data.tokenizer, 0, ""))) is None
    assert not _same_weights(m1, build_model(cfg.model, data, 1))  # another seed, another init


def _bags_task(y: np.ndarray) -> LocalTask:
    settings = TrainSettings(task="regression", batch_size=8)
    params = BagsParams(bag_size=4, label_epsilon=1.0, label_range=[-3.0, 3.0])
    return LocalTask(torch.nn.Linear(1, 1), np.zeros((len(y), 1), np.float32), y, settings,
                     Hyper(params, 0.1, False), partition_id=0, seed=0, experiment_seed=0, delta=1e-5,
                     num_classes=1)


def test_bag_release_is_cached_on_the_labels_not_only_their_count():
    y = np.linspace(-1, 1, 16).astype(np.float32)
    bags, targets = client_bags(_bags_task(y))
    again = client_bags(_bags_task(y.copy()))
    assert again[1] is targets  # same labels: the same release
    other = client_bags(_bags_task(-y))  # same count, other labels: released anew
    assert np.array_equal(other[0], bags) and not np.allclose(other[1], targets)


def test_clear_all_empties_every_cache(tiny):
    cfg = tiny()
    partition(cfg)
    _parse(dumps_toml(cfg))
    infos = caches.cache_infos()
    assert {"fedsim.datasets._load_cached", "fedsim.partition._partition_cached", "fedsim.models._slow_template",
            "fedsim.lora_models._backbone", "fedsim.text._tokenizer", "fedsim.experiment._parse",
            "fedsim.clients.bags._release", "fedsim.clients.app._node_inputs", "fedsim.clients.app.spare_models",
            "fedsim.clients.app._device_inputs"} <= set(infos)
    assert infos["fedsim.partition._partition_cached"].currsize == 1
    assert infos["fedsim.experiment._parse"].currsize == 1
    clear_all()
    assert all(info.currsize == 0 for info in caches.cache_infos().values())


def _node_jobs(cfg, pid=0):
    """This node's job, prepared twice (fresh Contexts, the experiment's text made anew)."""
    from tests.clients.test_vectorized import _jobs

    first, second = _jobs(cfg, [pid], dp_reference=False)
    return first[0], second[0]


def test_node_inputs_hit_on_the_same_experiment_and_miss_on_a_changed_one(tiny):
    """Keyed on content (the experiment's TOML, the node config), not on the output folder or
    on object identity: two experiments in the same folder get each its own data."""
    from fedsim.partition import client_data

    first, again = _node_jobs(tiny(**{"data.partitioner": "dirichlet", "data.alpha": 0.5}))
    info = app._node_inputs.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    assert again.cfg is first.cfg and again.x is first.x and again.node_key == first.node_key

    changed, _ = _node_jobs(tiny(**{"data.partitioner": "dirichlet", "data.alpha": 5.0}))
    assert changed.cfg.output.dir == first.cfg.output.dir
    assert changed.node_key != first.node_key and app._node_inputs.cache_info().misses == 2
    x, y = client_data(changed.cfg, 0)
    np.testing.assert_array_equal(changed.x, x)
    np.testing.assert_array_equal(changed.y, y)
    assert len(changed.y) != len(first.y)  # the Dirichlet split did change

    other_node, _ = _node_jobs(tiny(**{"data.partitioner": "dirichlet", "data.alpha": 0.5}), pid=1)
    assert other_node.node_key != first.node_key
    np.testing.assert_array_equal(other_node.x, client_data(first.cfg, 1)[0])


def test_spare_model_and_device_inputs_are_kept_per_key_and_released_with_the_run():
    model = torch.nn.Linear(2, 2)
    app.spare_models("experiment A")[:] = [model]
    assert app.spare_models("experiment B") == []
    assert app.spare_models("experiment A") == [model]

    x, y = np.arange(6, dtype=np.float32).reshape(3, 2), np.array([0, 1, 1])
    on_device = app._device_inputs(Key(("node 0", "cpu"), payload=(x, y, "classification")))
    assert app._device_inputs(Key(("node 0", "cpu"), payload=(None, None, None))) is on_device
    assert torch.equal(on_device[0], torch.from_numpy(x)) and on_device[1].dtype == torch.long
    other = app._device_inputs(Key(("node 1", "cpu"), payload=(2 * x, y, "classification")))
    assert torch.equal(other[0], torch.from_numpy(2 * x))

    app.release_run()
    assert all(f.cache_info().currsize == 0 for f in (app._node_inputs, app.spare_models, app._device_inputs))


def test_prepare_loads_the_dataset_once_and_hands_it_on(tiny, monkeypatch):
    import fedsim.run as run

    loaded, checked = [], []
    real_load, real_check = run.load_dataset, run.check_compatibility
    monkeypatch.setattr(run, "load_dataset", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    monkeypatch.setattr(run, "check_compatibility", lambda cfg, sizes, data: checked.append(data)
                        or real_check(cfg, sizes, data))
    run.prepare(tiny())
    assert len(loaded) == 1 and checked == loaded


# ----------------------------------------------------------------------------- on disk, across runs

def _entries(kind: str) -> list:
    return [p for p in caches.disk_entries() if p.parent.name == kind]


def _forbid_builds(monkeypatch) -> None:
    """Any dataset load or partition computed from scratch fails the test: what follows must
    come from the disk."""
    from fedsim import datasets, partition as partition_module

    def refuse(*args, **kwargs):
        raise AssertionError("built again instead of read from the disk cache")

    monkeypatch.setattr(datasets, "_load", refuse)
    monkeypatch.setattr(partition_module, "_partition", refuse)


def test_the_test_suite_never_writes_to_the_users_cache():
    from pathlib import Path

    root = caches.cache_dir()
    assert root is not None and not root.is_relative_to(Path.home() / ".cache")


def test_a_disk_hit_equals_a_fresh_build(tiny, monkeypatch):
    cfg = tiny(**{"data.partitioner": "dirichlet", "data.alpha": 0.3})
    data, part = load_dataset(cfg.data, 6, cfg.seed), partition(cfg)
    assert len(_entries("dataset")) == 1 and len(_entries("partition")) == 1
    clear_all()  # as a new process: nothing in memory, the entries on disk
    _forbid_builds(monkeypatch)
    again, part_again = load_dataset(cfg.data, 6, cfg.seed), partition(cfg)
    assert again is not data and part_again is not part
    for name in ("x_train", "y_train", "x_test", "y_test"):
        got, want = getattr(again, name), getattr(data, name)
        assert got.dtype == want.dtype and np.array_equal(got, want), name
    assert (again.num_classes, again.input_shape, again.label_values) == (data.num_classes, data.input_shape,
                                                                          data.label_values)
    assert len(part_again.indices) == 6
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(part_again.indices, part.indices))


def test_a_disk_entry_is_per_key(tiny):
    partition(tiny(**{"data.partitioner": "dirichlet", "data.alpha": 0.3}))
    clear_all()
    other = partition(tiny(**{"data.partitioner": "dirichlet", "data.alpha": 3.0}))
    assert len(_entries("partition")) == 2
    clear_all()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(caches.CACHE_ENV, "off")
        fresh = partition(tiny(**{"data.partitioner": "dirichlet", "data.alpha": 3.0}))
    assert all(np.array_equal(a, b) for a, b in zip(other.indices, fresh.indices))


def _csv(path, rows) -> None:
    path.write_text("a,b,label\n" + "".join(f"{a},{b},{y}\n" for a, b, y in rows))


def test_a_changed_data_file_is_read_again_even_with_its_size_and_times_kept(tmp_path):
    import os

    path = tmp_path / "data.csv"
    rows = [(i % 7, (3 * i) % 5, i % 2) for i in range(40)]
    _csv(path, rows)
    cfg = DataConfig(dataset="file", path=str(path), test_fraction=0.25, validation_fraction=0.0)
    first = load_dataset(cfg, 2, 0)
    stat = path.stat()
    _csv(path, [(a if i else 9, b, y) for i, (a, b, y) in enumerate(rows)])  # one digit: 0 -> 9, same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    clear_all()
    caches._sha256.cache_clear()  # as in the next run's process: nothing kept in memory
    second = load_dataset(cfg, 2, 0)
    assert len(_entries("dataset")) == 2
    both = np.concatenate([second.x_train, second.x_test]), np.concatenate([first.x_train, first.x_test])
    assert not np.array_equal(*both)  # the new file's values, not the old entry's
    clear_all()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(caches.CACHE_ENV, "off")
        fresh = load_dataset(cfg, 2, 0)
    assert np.array_equal(second.x_train, fresh.x_train) and np.array_equal(second.x_test, fresh.x_test)


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty", "other key"])
def test_a_damaged_entry_is_rebuilt_not_fatal(tiny, damage, caplog):
    cfg = tiny(**{"data.partitioner": "dirichlet", "data.alpha": 0.3})
    want = [idx.copy() for idx in partition(cfg).indices]
    [entry] = _entries("partition")
    blob = entry.read_bytes()
    if damage == "flip":  # inside the index arrays' bytes: it still unpickles, to other indices
        mid = len(blob) // 2
        entry.write_bytes(blob[:mid] + bytes([blob[mid] ^ 0x01]) + blob[mid + 1:])
    elif damage == "truncate":
        entry.write_bytes(blob[:len(blob) // 2])
    elif damage == "garbage":
        entry.write_bytes(b"\x80\x05not a pickle at all")
    elif damage == "empty":
        entry.write_bytes(b"")
    else:  # a whole, valid entry of another key under this key's name
        partition(tiny(**{"data.partitioner": "dirichlet", "data.alpha": 3.0}))
        [other] = [p for p in _entries("partition") if p != entry]
        entry.write_bytes(other.read_bytes())
    clear_all()
    with caplog.at_level("INFO", logger="fedsim"):
        got = partition(cfg).indices
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    assert any("damaged entry" in r.getMessage() for r in caplog.records)
    assert entry.read_bytes() == blob  # rewritten whole
    assert not list(entry.parent.glob(".*.tmp"))  # no temporary file left behind


def test_a_cached_build_logs_what_the_build_logged(tmp_path, caplog):
    """A user file with missing values: the warning that rows were dropped is logged again when
    the dataset comes from the disk, once (not again through the partition's entry)."""
    path = tmp_path / "data.csv"
    path.write_text("a,b,label\n" + "".join(f"{i % 5},{'' if i % 10 == 3 else i % 3},{i % 2}\n" for i in range(60)))
    from fedsim.config import Config, FederationConfig

    cfg = Config(data=DataConfig(dataset="file", path=str(path), partitioner="iid", validation_fraction=0.0),
                 federation=FederationConfig(num_clients=3, clients_per_round=3))

    def dropped() -> list[str]:
        return [r.getMessage() for r in caplog.records if "missing values" in r.getMessage()]

    with caplog.at_level("INFO", logger="fedsim"):
        partition(cfg)
        first = dropped()
        assert len(first) == 1 and "dropped 6 of 60 rows" in first[0]
        caplog.clear()
        clear_all()
        partition(cfg)
        load_dataset(cfg.data, 3, cfg.seed)
        assert dropped() == first


def test_the_disk_cache_can_be_turned_off(tiny, monkeypatch):
    monkeypatch.setenv(caches.CACHE_ENV, "off")
    assert caches.cache_dir() is None
    partition(tiny(**{"data.partitioner": "dirichlet"}))
    assert caches.disk_entries() == []


def test_an_unwritable_cache_directory_does_not_fail_the_run(tiny, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory would be")
    monkeypatch.setenv(caches.CACHE_ENV, str(blocker))
    assert len(partition(tiny()).indices) == 6


def test_cache_info_and_clear_commands(cli, tiny):
    partition(tiny(**{"data.partitioner": "dirichlet"}))
    code, out, _ = cli("cache", "info")
    assert code == 0 and "2 entries" in out and "dataset: 1, partition: 1" in out
    code, out, _ = cli("cache", "clear")
    assert code == 0 and "removed 2 entries" in out
    assert caches.disk_entries() == [] and caches.cache_dir().is_dir()
    code, out, _ = cli("cache", "info")
    assert "0 entries" in out


def test_node_inputs_memo_hits_the_same_node_and_retakes_the_key_after_any_change(tiny, monkeypatch):
    """`node_inputs` remembers a node's answer by the node config and data spec it was
    computed from, but only while they are the same objects with the same contents, under
    the same experiment text: mutating either in place, or another text, takes the key anew
    (`node_key`), exactly as without the memo."""
    from flwr.app import ConfigRecord, Context, RecordDict

    from fedsim import records as R
    from fedsim.experiment import run_config_for

    cfg = tiny()
    (text,) = run_config_for(cfg).values()
    spec = ConfigRecord({"task": "classification", "x-shift": [0.0, 1.0]})
    node_config = {"partition-id": 1, "num-partitions": cfg.federation.num_clients}
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict({R.DATA_SPEC: spec}),
                      run_config={})
    keys = []
    real = app.node_key
    monkeypatch.setattr(app, "node_key", lambda *a: keys.append(real(*a)) or keys[-1])
    first = app.node_inputs(cfg, context, text)
    assert app.node_inputs(cfg, context, text) is first and len(keys) == 1  # the memo: no new key
    assert first[0] == real(text, context.node_config, spec)

    R.plain(spec)["x-shift"].append(2.0)  # the spec's list mutated in place: a new key
    changed = app.node_inputs(cfg, context, text)
    assert len(keys) == 2 and changed[0] != first[0] and changed[0] == real(text, context.node_config, spec)

    context.node_config["partition-id"] = 2  # the node config mutated in place: a new key, other data
    moved = app.node_inputs(cfg, context, text)
    assert len(keys) == 3 and moved[0] != changed[0]
    assert not np.array_equal(moved[2], changed[2]) or len(moved[3]) != len(changed[3])

    other = app.node_inputs(cfg, context, text + "\n")  # another experiment text: a new key
    assert len(keys) == 4 and other[0][0] == text + "\n"

    app.release_run()
    assert app._node_memo.cache_info().currsize == 0
    app.node_inputs(cfg, context, text)
    assert len(keys) == 5  # released with the run
