"""FedProx's client half (Li et al., MLSys 2020): the proximal term mu/2 ||w - w_g||^2.

Its gradient mu (w - w_g) is applied after each optimizer step rather than through the
loss: under DP-SGD Opacus rebuilds gradients from per-sample gradients and would drop a
parameter-only term, and applying it afterwards is post-processing. It uses the pre-step
distance, so w <- w - lr (g + mu (w_old - w_g)): exactly SGD on the proximal loss (with
momentum 0).
"""

from __future__ import annotations

from typing import Protocol

from fedsim.algorithms import ClientRule, Hyper, RoundStart, State, Tensors


class ProxParams(Protocol):
    """What this half reads of `fedsim.strategies.fedprox.FedProxParams` (the halves never import each other)."""

    mu: float


def setup(start: RoundStart) -> State:
    return {"anchor": start.global_params}


def post_step(new: Tensors, old: Tensors, state: State, hyper: Hyper[ProxParams]) -> Tensors:
    pull = hyper.lr * hyper.params.mu
    return {k: new[k] - pull * (old[k] - state["anchor"][k]) for k in new}


RULE = ClientRule(setup=setup, post_step=post_step)
