"""LoRA layers for FedSVD and its baselines, built so Opacus can privatize them.

W = W0 + (alpha / r) * B A, with A in R^{r x d_in} and B in R^{d_out x r}.
A and B are bias-free ``nn.Linear`` submodules (``lora_A.weight`` is A,
``lora_B.weight`` is B): Opacus has per-sample gradient rules for Linear, so it
privatizes exactly the adapters that are trainable, with no custom grad sampler.
The base layer and every non-LoRA parameter are frozen, the head included.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update (peft's initialization)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        # Round 0 of FedSVD: A0 Kaiming-uniform with a = sqrt(5) as in peft, B0 = 0.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(self.dropout(x)))


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
             targets: list[str] | None = None) -> nn.Module:
    """Replace the targeted Linear modules (all, if targets is empty) by LoRALinear, in place.

    Freezes every other parameter and narrows the model's federated tensors to the adapters.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [n for n in names if not targets or any(t == n or n.endswith("." + t) for t in targets)]
    if not chosen:
        raise ValueError(f"model.lora_targets: none of {targets} matches a Linear module; modules: {names}")
    for name in chosen:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, LoRALinear(getattr(owner, leaf), rank, alpha, dropout))
    model.federated_keys = [k for k in model.state_dict() if ".lora_" in k]
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def select_keys(model: nn.Module, which: str) -> list[str]:
    """State-dict keys of one of the tensor groups strategies talk about.

    ``all``: every federated tensor; ``lora``: A and B; ``lora-b``: B only (FedSVD, FFA-LoRA).
    """
    from fedsim.records import federated_keys

    keys = federated_keys(model)
    if which == "all":
        return keys
    if which == "lora":
        return [k for k in keys if ".lora_A." in k or ".lora_B." in k]
    if which == "lora-b":
        return [k for k in keys if ".lora_B." in k]
    raise ValueError(f"unknown tensor group {which!r}; allowed: all, lora, lora-b")


def set_trainable(model: nn.Module, which: str) -> None:
    """Freeze everything but the named group. Call BEFORE Opacus make_private."""
    if which == "all" and not lora_layers(model):
        return
    keep = set(select_keys(model, which))
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
