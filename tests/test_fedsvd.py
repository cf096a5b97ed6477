"""FedSVD: refactorization math, what travels, what clients may change."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from clients.app import train
from fedsim import records as R
from fedsim.datasets import load_dataset
from fedsim.experiment import run_config_for
from fedsim.lora import lora_layers
from fedsim.models import build_model
from strategies.fedsvd import refactorize

rng = np.random.default_rng(0)


@pytest.mark.parametrize("method", ["exact", "randomized"])
@pytest.mark.parametrize("shape", [(32, 20, 4), (5, 64, 8), (64, 64, 8), (10, 10, 10)])
def test_refactorization_preserves_product_and_orthonormalizes_a(method, shape):
    d_out, d_in, r = shape
    b, a = rng.normal(size=(d_out, r)), rng.normal(size=(r, d_in))
    b_new, a_new = refactorize(b, a, method)
    np.testing.assert_allclose(b_new @ a_new, b @ a, atol=1e-9)
    np.testing.assert_allclose(a_new @ a_new.T, np.eye(r), atol=1e-9)
    # B_new = U_r S_r: its columns are orthogonal with non-increasing norms (the singular values)
    gram = b_new.T @ b_new
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-8)
    assert np.all(np.diff(np.sqrt(np.diag(gram))) <= 1e-9)


def test_rank_deficient_product_keeps_a_orthonormal():
    b = np.zeros((16, 4))
    b[:, 0] = rng.normal(size=16)  # rank(BA) = 1
    a = rng.normal(size=(4, 12))
    b_new, a_new = refactorize(b, a)
    np.testing.assert_allclose(b_new @ a_new, b @ a, atol=1e-10)
    np.testing.assert_allclose(a_new @ a_new.T, np.eye(4), atol=1e-10)


def _lora_cfg(tiny, strategy="fedsvd", **kw):
    return tiny(**{"model.name": "lora-mlp", "strategy.name": strategy, "data.classes": [5, 6, 7, 8, 9],
                   "model.pretrain_classes": [0, 1, 2, 3, 4], "model.pretrain_epochs": 3,
                   "model.hidden": [16], "model.lora_rank": 4, "client.local_steps": 3,
                   "privacy.noise_multiplier": 1.0, **kw})


def _train_once(cfg, trainable: str, upload: str):
    data = load_dataset(cfg.data, cfg.federation.num_clients, cfg.seed)
    model = build_model(cfg.model, data, cfg.seed)
    arrays = R.model_to_record(model)
    content = RecordDict({R.ARRAYS: arrays, R.CONFIG: ConfigRecord(
        {R.SERVER_ROUND: 1, R.TRAINABLE: trainable, R.UPLOAD: upload})})
    msg = Message(content, 1000, "train")
    msg.metadata.__dict__["_message_id"] = "m1"
    ctx = Context(run_id=1, node_id=1000, node_config={"partition-id": 0, "num-partitions": 6},
                  state=RecordDict(), run_config=run_config_for(cfg))
    return R.record_to_numpy(arrays), R.record_to_numpy(train(msg, ctx).content[R.ARRAYS])


def test_uplink_carries_only_b_half_of_fedavg_lora(tiny):
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    cfg = _lora_cfg(tiny, **{"model.hidden": [64], "model.lora_targets": ["1"]})  # one 64x64 layer
    sent, fedsvd_reply = _train_once(cfg, "lora-b", "lora-b")
    _, fedavg_reply = _train_once(_lora_cfg(tiny, "fedavg-lora", **{"model.hidden": [64],
                                                                    "model.lora_targets": ["1"]}), "lora", "lora")
    assert all(".lora_B." in k for k in fedsvd_reply)
    size = lambda d: sum(v.size for v in d.values())  # noqa: E731
    assert size(fedsvd_reply) * 2 == size(fedavg_reply)  # square A (4x64) and B (64x4)
    b_keys = [k for k in sent if ".lora_B." in k]
    assert any(np.abs(fedsvd_reply[k] - sent[k]).max() > 0 for k in b_keys)  # B did train


def test_a_is_never_changed_by_a_client_in_a_run(tiny, monkeypatch):
    """Record every A a client trains from and every A in its model afterwards."""
    import clients.app as app

    seen = []
    real = app.train_local

    def spy(model, *args, **kwargs):
        before = {n: l.lora_A.weight.detach().clone() for n, l in lora_layers(model).items()}
        result = real(model, *args, **kwargs)
        seen.append(all(bool((l.lora_A.weight == before[n]).all()) for n, l in lora_layers(model).items()))
        return result

    monkeypatch.setattr(app, "train_local", spy)
    from fedsim.run import run_experiment

    run_experiment(_lora_cfg(tiny), progress=False)
    assert seen and all(seen)
