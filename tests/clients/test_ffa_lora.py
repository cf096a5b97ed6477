"""The LoRA client halves through the ClientApp: FFA-LoRA / FedSVD train and upload B only,
FedAvg-LoRA both adapters (twice the uplink for square adapters)."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, RecordDict

from fedsim.clients import fedavg_lora, ffa_lora
from fedsim.clients.app import train
from fedsim import records as R
from fedsim.datasets import load_dataset
from fedsim.experiment import run_config_for
from fedsim.models import build_model


def _train_once(cfg, flower):
    data = load_dataset(cfg.data, cfg.federation.num_clients, cfg.seed)
    model = build_model(cfg.model, data, cfg.seed)
    arrays = R.model_to_record(model)
    msg = flower.train(RecordDict({R.ARRAYS: arrays, R.CONFIG: ConfigRecord({R.SERVER_ROUND: 1})}), node_id=1000)
    ctx = Context(run_id=1, node_id=1000, node_config={"partition-id": 0, "num-partitions": 6},
                  state=RecordDict(), run_config=run_config_for(cfg))
    return R.record_to_numpy(arrays), R.record_to_numpy(train(msg, ctx).content[R.ARRAYS])


def test_rules():
    assert (ffa_lora.RULE.trainable, ffa_lora.RULE.upload) == ("lora-b", "lora-b")
    assert (fedavg_lora.RULE.trainable, fedavg_lora.RULE.upload) == ("lora", "lora")


def test_uplink_carries_only_b_half_of_fedavg_lora(lora_cfg, flower):
    one_layer = {"model.hidden": [64], "model.lora_targets": ["1"]}  # one 64x64 layer
    sent, fedsvd_reply = _train_once(lora_cfg("fedsvd", **one_layer), flower)
    _, fedavg_reply = _train_once(lora_cfg("fedavg-lora", **one_layer), flower)
    assert sorted(fedsvd_reply) == ["1.lora_B.weight"]
    assert sorted(fedavg_reply) == ["1.lora_A.weight", "1.lora_B.weight"]
    size = lambda d: sum(v.size for v in d.values())  # noqa: E731
    assert size(fedsvd_reply) * 2 == size(fedavg_reply)  # square A (4x64) and B (64x4)
    assert np.abs(fedsvd_reply["1.lora_B.weight"] - sent["1.lora_B.weight"]).max() > 0  # B did train
    assert np.abs(fedavg_reply["1.lora_A.weight"] - sent["1.lora_A.weight"]).max() > 0  # FedAvg-LoRA trains A
