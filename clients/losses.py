"""Loss terms and post-step corrections that strategies switch on from the server.

See `clients.trainer` for why proximal and SCAFFOLD terms are post-step corrections
rather than loss terms under DP-SGD.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def margin_loss(lam: float, mode: str = "batch") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """FedLD margin control (Zeng et al., MICCAI 2024): lam * log(1 + ||softmax(z)||_F^2).

    ``batch``: the authors' code takes the Frobenius norm over the whole batch x classes
    matrix, so the term grows with the batch size. ``sample``: the mean over samples of
    log(1 + ||softmax(z_i)||^2), which does not depend on the batch size and is separable
    (needed for per-sample clipping under DP-SGD).
    """
    def term(logits: torch.Tensor, _targets: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits, dim=1)
        if mode == "batch":
            return lam * torch.log1p((probs ** 2).sum())
        return lam * torch.log1p((probs ** 2).sum(dim=1)).mean()
    return term


def proximal_step(model: nn.Module, anchor: dict[str, torch.Tensor], mu: float,
                  lr: float) -> Callable[[], None]:
    """FedProx (Li et al. 2020): the gradient of mu/2 ||w - w_g||^2, applied after each step.

    The pull uses the pre-step distance, so w <- w - lr*(g + mu (w_old - w_g)) exactly as
    if the term had been in the loss.
    """
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    last: dict[str, torch.Tensor] = {}
    anchors: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step() -> None:
        # built on the first step, when the trainer has moved the model to its device
        for k, p in params.items():
            if k not in anchors:
                anchors[k] = anchor[k].to(p.device)
                last[k] = anchors[k].clone()  # the first step starts from w_g
            p.sub_(lr * mu * (last[k] - anchors[k]))
            last[k].copy_(p)
    return step


def scaffold_step(model: nn.Module, server_c: dict[str, torch.Tensor], local_c: dict[str, torch.Tensor],
                  lr: float) -> Callable[[], None]:
    """SCAFFOLD drift correction: y <- y - lr * (c - c_i) after each local step."""
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    correction: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step() -> None:
        for k, p in params.items():
            if k not in correction:  # on the model's device, known only once training runs
                correction[k] = (server_c[k] - local_c[k]).to(p.device, p.dtype)
            p.sub_(lr * correction[k])
    return step
