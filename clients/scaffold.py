"""SCAFFOLD's client half (Karimireddy et al., ICML 2020): drift correction and option II.

Each local step is corrected by y <- y - lr (c - c_i) (after the step, as post-processing
under DP-SGD). After K steps the client's control variate moves by option II (eq. 4):

    c_i+ = c_i - c + (x - y_i) / (K lr)

c_i+ stays in the node's state for its next participation (zero before the first); the
reply carries delta c_i = c_i+ - c_i for the server's update of c.
"""

from __future__ import annotations

from typing import Any

import torch

from fedsim.algorithms import ClientRule, Hyper, NodeState, RoundStart, State, Tensors


def setup(start: RoundStart) -> State:
    server_c = start.server_arrays
    local_c = start.node_state or {k: torch.zeros_like(v) for k, v in server_c.items()}
    return {"correction": {k: server_c[k] - local_c[k] for k in start.global_params}}


def post_step(new: Tensors, old: Tensors, state: State, hyper: Hyper[Any]) -> Tensors:
    return {k: new[k] - hyper.lr * state["correction"][k] for k in new}


def option_two(start_params: Tensors, final_params: Tensors, server_c: Tensors, local_c: Tensors,
               steps: int, lr: float) -> tuple[Tensors, NodeState]:
    """(delta c_i, c_i+) of option II, tensors keyed like c."""
    new_c, delta = {}, {}
    for k in server_c:
        drift = (start_params[k] - final_params[k]) / (steps * lr)
        new_c[k] = local_c[k] - server_c[k] + drift
        delta[k] = new_c[k] - local_c[k]
    return delta, new_c


def finish(start: RoundStart, state: State, final: Tensors, steps: int, hyper: Hyper[Any]) -> tuple[Tensors, NodeState]:
    server_c = start.server_arrays
    local_c = start.node_state or {k: torch.zeros_like(v) for k, v in server_c.items()}
    return option_two(start.global_params, final, server_c, local_c, steps, hyper.lr)


RULE = ClientRule(setup=setup, post_step=post_step, finish=finish)
