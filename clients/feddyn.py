"""FedDyn's client half (Acar et al., ICLR 2021): dynamic regularization.

Client i minimizes L_i(theta) - <g_i, theta> + (alpha/2) ||theta - theta^{t-1}||^2, where
theta^{t-1} is the round's global model and g_i its kept state (zero before its first round).
The two added terms depend on the parameters only, so they are applied after each optimizer
step, like FedProx's pull (under DP-SGD Opacus rebuilds the gradient from per-sample
gradients and would drop them; after the noisy step they are post-processing):

    theta <- theta - lr (grad L_i(theta_old) - g_i + alpha (theta_old - theta^{t-1}))

which is exactly SGD on the FedDyn objective (with momentum 0). After the round the client
updates its state by the first-order condition of that objective (Algorithm 1):

    g_i <- g_i - alpha (theta_i^t - theta^{t-1})

g_i stays in the node's state for its next participation; the reply carries only the model.
"""

from __future__ import annotations

import torch

from typing import Protocol

from fedsim.algorithms import ClientRule, Hyper, NodeState, RoundStart, State, Tensors


class DynParams(Protocol):
    """What this half reads of `fedsim.strategies.feddyn.FedDynParams` (the halves never import each other)."""

    alpha: float


def kept_gradient(start: RoundStart) -> Tensors:
    """g_i as the node kept it, or zeros at its first participation (node state ``{}``)."""
    return {k: start.node_state[k] if k in start.node_state else torch.zeros_like(v)
            for k, v in start.global_params.items()}


def setup(start: RoundStart) -> State:
    return {"anchor": start.global_params, "gradient": kept_gradient(start)}


def post_step(new: Tensors, old: Tensors, state: State, hyper: Hyper[DynParams]) -> Tensors:
    lr, alpha = hyper.lr, hyper.params.alpha
    return {k: new[k] + lr * state["gradient"][k] - lr * alpha * (old[k] - state["anchor"][k]) for k in new}


def finish(start: RoundStart, state: State, final: Tensors, steps: int,
           hyper: Hyper[DynParams]) -> tuple[Tensors, NodeState]:
    """No reply arrays; the node keeps g_i - alpha (theta_i^t - theta^{t-1})."""
    alpha = hyper.params.alpha
    kept = kept_gradient(start)
    return {}, {k: kept[k] - alpha * (final[k] - start.global_params[k]) for k in final}


RULE = ClientRule(setup=setup, post_step=post_step, finish=finish)
