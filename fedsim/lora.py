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

from fedsim.errors import ConfigError
from fedsim.records import federated_keys


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update.

    ``init`` chooses A0 (B0 = 0 unless stated):

    * ``kaiming``: peft's default, Kaiming-uniform with a = sqrt(5). Its rows have norm
      about 1/sqrt(3) and, unless r << d_in, a spread of singular values.
    * ``orthogonal``: the same Kaiming draw with its rows orthonormalized (QR), so the same
      row space. FedSVD's refactorization only ever changes A's basis *within* its row
      space (the rows of B A are combinations of the rows of A), so FFA-LoRA with this
      init is the ablation that isolates what FedSVD's orthogonalization buys.
    * ``pissa`` (Meng et al. 2024, arXiv 2404.02948): with W0 = U S V^T, A0 = sqrt(S_r) V_r^T
      and B0 = U_r sqrt(S_r), both divided by sqrt(alpha / r) so that the *scaled* product
      equals U_r S_r V_r^T; the frozen base becomes the residual W0 - U_r S_r V_r^T, so the
      layer's output is unchanged at init. (Our decision: the paper has no LoRA scale.)
      Where min(d_out, d_in) < r the extra rows of A stay from the Kaiming draw, with zero
      columns in B.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 init: str = "kaiming") -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        self.scaling = alpha / rank
        # Round 0 of FedSVD: A0 Kaiming-uniform with a = sqrt(5) as in peft, B0 = 0.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        with torch.no_grad():
            if init == "orthogonal":
                q, _ = torch.linalg.qr(self.lora_A.weight.T.double())
                self.lora_A.weight.copy_(q.T)
            elif init == "pissa":
                self._pissa_init()
            elif init != "kaiming":
                raise ConfigError(f"model.lora_init: unknown {init!r}; allowed: kaiming, orthogonal, pissa")
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _pissa_init(self) -> None:
        u, s, vt = torch.linalg.svd(self.base.weight.double(), full_matrices=False)
        k = min(len(s), self.lora_A.out_features)
        root = (s[:k] / self.scaling).sqrt()
        self.lora_A.weight[:k] = root[:, None] * vt[:k]
        self.lora_B.weight[:, :k] = u[:, :k] * root
        self.base.weight -= (u[:, :k] * s[:k]) @ vt[:k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(self.dropout(x)))


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
             targets: list[str] | None = None, init: str = "kaiming") -> nn.Module:
    """Replace the targeted Linear modules (all, if targets is empty) by LoRALinear, in place.

    Freezes every other parameter and narrows the model's federated tensors to the adapters.
    A rank above a layer's input width is refused: rank(B A) <= d_in, and A could not have
    r orthonormal rows (FedSVD's refactorization needs them).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [n for n in names if not targets or any(t == n or n.endswith("." + t) for t in targets)]
    if not chosen:
        raise ConfigError(f"model.lora_targets: none of {targets} matches a Linear module; modules: {names}")
    for name in chosen:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        layer = getattr(owner, leaf)
        if rank > layer.in_features:
            raise ConfigError(f"model.lora_rank: {rank} exceeds the input width {layer.in_features} of "
                              f"layer {name!r}; use a rank <= {layer.in_features} or leave the layer out "
                              f"of model.lora_targets")
        setattr(owner, leaf, LoRALinear(layer, rank, alpha, dropout, init))
    model.federated_keys = [k for k in model.state_dict() if ".lora_" in k]
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def select_keys(model: nn.Module, which: str) -> list[str]:
    """State-dict keys of one of the tensor groups strategies talk about.

    ``all``: every federated tensor; ``lora``: A and B; ``lora-b``: B only (FedSVD, FFA-LoRA).
    """
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
