"""Shared fixtures: tiny, fast experiment configs, a CLI runner, and Flower messages built by hand.

Layout: ``tests/strategies/test_<name>.py`` drives an algorithm's server half and
``tests/clients/test_<name>.py`` its client half, each on hand-computed arrays;
``tests/e2e/`` holds whole runs; the core units (accounting, partition, config and CLI
parsing, datasets, sweeps and reports) stay at the top level.
"""

from __future__ import annotations

import itertools
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from fedsim.config import Config, load_config  # noqa: E402


def tiny_config(tmp_path, **overrides) -> Config:
    """digits, MLP(32), 6 clients, 3 per round, 2 rounds: about a second per run."""
    base = {"name": "tiny", "model.hidden": [32], "federation.num_clients": 6,
            "federation.clients_per_round": 3, "federation.rounds": 2, "client.batch_size": 32,
            "client.lr": 0.3, "output.dir": str(tmp_path / "run")}
    base.update(overrides)
    return load_config(None, base)


@pytest.fixture(autouse=True)
def own_disk_cache(tmp_path_factory, monkeypatch):
    """Each test's on-disk cache (`fedsim.caches.cache_dir`) is a fresh directory of its own,
    inherited by the subprocesses it starts: tests never write to the user's ~/.cache, and
    none reads an entry that another test's run left."""
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path_factory.mktemp("fedsim-cache")))


@pytest.fixture(autouse=True, scope="session")
def full_float32_on_cuda():
    """On a machine with a GPU the suite trains there (``runtime.device = "auto"``). cuDNN's
    convolutions default to TF32, whose 10-bit mantissa alone moved a CNN's update by 3.5e-5
    on an H100, past the engine equivalence tests' 1e-5: full float32 for the session."""
    import torch

    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def assert_same_bits_on_cpu(got, expected, name: str = "") -> None:
    """Equal bits on the CPU, where the engine's paths are built to give them. On a GPU the
    same operations may take other cuBLAS/cuDNN kernels (chosen by shape), which round
    differently: there the two must agree to float32 rounding."""
    import torch

    if torch.cuda.is_available():
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5, msg=name or None)
    else:
        assert torch.equal(got, expected), name


@pytest.fixture
def tiny(tmp_path):
    return lambda **kw: tiny_config(tmp_path, **kw)


@pytest.fixture
def lora_cfg(tiny):
    """A LoRA experiment: lora-mlp pretrained on digits 0-4, fine-tuned on 5-9 under DP-SGD."""
    def make(strategy: str = "fedsvd", **kw) -> Config:
        return tiny(**{"model.name": "lora-mlp", "strategy.name": strategy, "data.classes": [5, 6, 7, 8, 9],
                       "model.pretrain_classes": [0, 1, 2, 3, 4], "model.pretrain_epochs": 3,
                       "model.hidden": [16], "model.lora_rank": 4, "client.local_steps": 3,
                       "privacy.noise_multiplier": 1.0, **kw})
    return make


@pytest.fixture
def cli(capsys):
    """Run the fedsim CLI in-process: returns (exit code, stdout, stderr)."""
    from fedsim.cli import main

    def run(*argv: str):
        code = main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


class FakeGrid:
    """What a strategy's ``configure_train`` asks of a grid: the connected node ids."""

    def __init__(self, num_nodes: int) -> None:
        self.node_ids = [1000 + i for i in range(num_nodes)]

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


class Messages:
    """Flower Messages outside a run: train instructions from the server and replies to them."""

    def __init__(self) -> None:
        self._ids = itertools.count()

    def train(self, content, node_id: int = 1000):
        from flwr.app import Message, MessageType

        msg = Message(content, node_id, MessageType.TRAIN)
        msg.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"  # what a grid sets when it pushes
        return msg

    def reply(self, content, node_id: int = 1000):
        """A client's reply carrying `content` (a RecordDict)."""
        from flwr.app import Message, RecordDict

        return Message(content, reply_to=self.train(RecordDict(), node_id))

    def error_reply(self, reason: str = "boom", node_id: int = 1000):
        from flwr.app import Error, Message, RecordDict

        return Message(Error(code=500, reason=reason), reply_to=self.train(RecordDict(), node_id))

    @staticmethod
    def grid(num_nodes: int) -> FakeGrid:
        return FakeGrid(num_nodes)


@pytest.fixture
def flower(monkeypatch):
    """`Messages`, with Flower's process identity set for this test only (an instruction
    Message reads it; the in-process runtime sets it for a whole run)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    return Messages()


@pytest.fixture(scope="module")
def restore_logging():
    """Loggers as they were before the module: the Python API (like the CLI) sets up fedsim's,
    Flower's, Opacus' and MLflow's loggers for the whole process, with propagation off, which
    would hide later tests' records from caplog."""
    import logging

    loggers = [logging.getLogger(name) for name in ("fedsim", "flwr", "opacus", "mlflow")]
    saved = [(lg, lg.level, lg.propagate, list(lg.handlers), {h: h.level for h in lg.handlers}) for lg in loggers]
    yield
    for logger, level, propagate, handlers, handler_levels in saved:
        logger.setLevel(level)
        logger.propagate = propagate
        logger.handlers = handlers
        for handler, handler_level in handler_levels.items():
            handler.setLevel(handler_level)


@pytest.fixture
def rounds_trained(monkeypatch):
    """Which partitions replied in each round of the runs inside the test, as the server saw them."""
    from fedsim.server import RunRecorder

    seen: list[list[int]] = [[]]
    on_reply, on_end = RunRecorder.on_train_reply, RunRecorder.on_round_end

    def reply(self, metrics):
        seen[-1].append(int(metrics["partition-id"]))
        on_reply(self, metrics)

    def end(self, server_round, evaluation, validation=None):
        seen.append([])
        on_end(self, server_round, evaluation, validation)

    monkeypatch.setattr(RunRecorder, "on_train_reply", reply)
    monkeypatch.setattr(RunRecorder, "on_round_end", end)
    return lambda: [sorted(r) for r in seen[:-1]]
