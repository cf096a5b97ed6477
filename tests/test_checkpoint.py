"""Checkpoint files (`fedsim.checkpoint`): what goes in comes out, exactly, in order."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedsim import records as R
from fedsim.checkpoint import Checkpoint, config_difference, load_checkpoint, save_checkpoint
from fedsim.config import dumps_toml, load_config
from fedsim.errors import FedsimError


def test_checkpoint_round_trip_keeps_values_types_and_order(tmp_path):
    node_state = RecordDict({
        R.ACCOUNTANT_STATE: ConfigRecord({"sigma": [1.1, 1.1], "q": [0.03125, 0.5], "steps": [12, 3]}),
        "odd": ConfigRecord({"text": "x", "blob": b"\x00\xff", "blobs": [b"a", b"b"], "flag": True, "empty": []}),
        "metrics": MetricRecord({"m": 0.1 + 0.2, "n": 7}),
        R.ALGORITHM_STATE: R.numpy_to_record({"z.weight": np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
                                              "a.bias": np.array([np.pi], np.float64)}),
    })
    arrays = {"layer2.weight": np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32),
              "layer1.bias": np.array([1e-45, -0.0, np.inf], np.float32), "count": np.array(3, np.int64)}
    strategy = {"m_t/w": np.full(3, 0.1, np.float32), "v_t/w": np.zeros((0,), np.float32)}
    rows = [{"round": 1, "metric": 0.1 + 0.2, "train_loss": float("nan"), "user_epsilon": None}]
    cfg = dumps_toml(load_config(None))
    save_checkpoint(tmp_path, Checkpoint(3, cfg, arrays, strategy, {1000: node_state, 1002: RecordDict()},
                                         {"rows": rows}))
    back = load_checkpoint(tmp_path)
    assert back.round == 3 and back.config == cfg
    assert list(back.arrays) == list(arrays) and list(back.strategy) == list(strategy)
    for got, want in [*zip(back.arrays.values(), arrays.values()), *zip(back.strategy.values(), strategy.values())]:
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes() and got.shape == want.shape
    assert sorted(back.nodes) == [1000, 1002] and not list(back.nodes[1002].items())
    state = back.nodes[1000]
    assert list(state.keys()) == list(node_state.keys())
    for key in (R.ACCOUNTANT_STATE, "odd", "metrics"):
        assert dict(state[key]) == dict(node_state[key]) and type(state[key]) is type(node_state[key])
    kept, saved = R.record_to_numpy(state[R.ALGORITHM_STATE]), R.record_to_numpy(node_state[R.ALGORITHM_STATE])
    assert list(kept) == list(saved) and all(kept[k].tobytes() == saved[k].tobytes() for k in saved)
    assert back.recorder["rows"][0]["metric"] == 0.1 + 0.2 and back.recorder["rows"][0]["user_epsilon"] is None
    assert np.isnan(back.recorder["rows"][0]["train_loss"])


def test_no_checkpoint_and_a_damaged_one(tmp_path):
    assert load_checkpoint(tmp_path) is None
    (tmp_path / "checkpoint.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(FedsimError, match="unreadable checkpoint"):
        load_checkpoint(tmp_path)


def test_config_difference_names_the_key_and_ignores_the_directory():
    a = dumps_toml(load_config(None, {"output.dir": "runs/a"}))
    assert config_difference(a, dumps_toml(load_config(None, {"output.dir": "/elsewhere/a"}))) is None
    diff = config_difference(a, dumps_toml(load_config(None, {"federation.rounds": 7})))
    assert diff == "federation.rounds (checkpoint 10, now 7)"


def test_a_checkpoint_from_before_the_validation_split_resumes_only_at_fraction_zero():
    """A checkpoint whose config has no data.validation_fraction trained on the whole training
    split: resuming it under the new default 0.1 would change its data, and is refused."""
    old = "\n".join(line for line in dumps_toml(load_config(None)).splitlines()
                    if not line.startswith("validation_fraction"))
    assert "validation_fraction" not in old
    diff = config_difference(old, dumps_toml(load_config(None)))
    assert diff == "data.validation_fraction (checkpoint 0.0, now 0.1)"
    assert config_difference(old, dumps_toml(load_config(None, {"data.validation_fraction": 0.0}))) is None


def test_node_memo_reencodes_exactly_the_nodes_whose_records_were_replaced(tmp_path):
    """A run passes one memo to every checkpoint: a node that trained since the last one holds
    new record objects and must be encoded anew, the others may reuse their encoding. The file
    must be byte-identical to one written without the memo, round after round."""
    def accountant(steps: int) -> ConfigRecord:
        return ConfigRecord({"sigma": [1.0], "q": [0.5], "steps": [steps]})

    def kept(value: float):
        return R.numpy_to_record({"c": np.full(3, value, np.float32)})

    nodes = {n: {R.ACCOUNTANT_STATE: accountant(n), R.ALGORITHM_STATE: kept(n)} for n in range(4)}
    cfg = dumps_toml(load_config(None))
    memo: dict = {}
    for round_, trained in [(1, [0, 1, 2, 3]), (2, [1]), (3, [3]), (4, [])]:
        for n in trained:  # what a client does: new records, never an old one changed in place
            nodes[n] = {R.ACCOUNTANT_STATE: accountant(10 * round_ + n), R.ALGORITHM_STATE: kept(round_ + n / 10)}
        ckpt = Checkpoint(round_, cfg, {"w": np.zeros(2, np.float32)}, {}, dict(nodes), {})
        with_memo = (save_checkpoint(tmp_path / "memo", ckpt, memo)).read_bytes()
        without = (save_checkpoint(tmp_path / "plain", ckpt)).read_bytes()
        assert with_memo == without, f"round {round_}"
        back = load_checkpoint(tmp_path / "memo").nodes
        for n in range(4):
            assert dict(back[n][R.ACCOUNTANT_STATE]) == dict(nodes[n][R.ACCOUNTANT_STATE])
            assert R.record_to_numpy(back[n][R.ALGORITHM_STATE])["c"].tolist() == \
                R.record_to_numpy(nodes[n][R.ALGORITHM_STATE])["c"].tolist()
