"""FedLD's client half (Zeng et al., MICCAI 2024): margin control, lambda log(1 + ||softmax(z)||^2).

``batch`` (the authors' code): the Frobenius norm over the whole batch x classes matrix, so
the term grows with the batch size. ``sample``: the mean over samples of
log(1 + ||softmax(z_i)||^2), which does not depend on the batch size and is separable.
Under DP-SGD fedsim always uses ``sample``: per-sample clipping must bound each sample's
own loss, and the batch form couples them. On a batch of one the two forms agree.
"""

from __future__ import annotations

from typing import Protocol

import torch

from fedsim.algorithms import ClientRule, Hyper, State


class MarginParams(Protocol):
    """What this half reads of `fedsim.strategies.fedld.FedLDParams` (the halves never import each other)."""

    margin_lambda: float
    margin_mode: str


def margin_term(logits: torch.Tensor, mask: torch.Tensor | None, lam: float, mode: str) -> torch.Tensor:
    """lambda * log(1 + ||softmax(z)||^2), over the batch or per sample; `mask` marks real rows."""
    probs = torch.softmax(logits, dim=1)
    if mask is None:
        if mode == "batch":
            return lam * torch.log1p((probs ** 2).sum())
        return lam * torch.log1p((probs ** 2).sum(dim=1)).mean()
    squares = (probs ** 2).sum(dim=1)
    if mode == "batch":
        return lam * torch.log1p((squares * mask).sum())
    return lam * (torch.log1p(squares) * mask).sum() / mask.sum().clamp_min(1.0)


def loss_term(logits: torch.Tensor, mask: torch.Tensor | None, state: State,
              hyper: Hyper[MarginParams]) -> torch.Tensor:
    p = hyper.params
    return margin_term(logits, mask, p.margin_lambda, "sample" if hyper.private else p.margin_mode)


RULE = ClientRule(loss_term=loss_term)
