"""User-level DP mechanisms on a round's stack of client updates: pure math, no Flower.

A round's client updates arrive as one stack: a ``(clients, parameters)`` matrix, or a dict
of stacked tensors ``name -> (clients, *shape)`` (`flatten_updates` turns the dict into the
matrix). Every function here works on the whole stack at once, in torch (numpy arrays are
taken without a copy), so a round of a hundred clients costs a few tensor operations and no
Python loop over clients. The application layer (`fedsim.central_dp`) decodes the replies,
calls these, and hands the strategy the released mean.

The mechanisms and their papers:

* `clip_and_sum`: per-client L2 clipping over all arrays of a client (FlatClip), then the
  sum (McMahan et al. 2018).
* `gaussian_release`: Gaussian noise on the clipped sum, divided by the EXPECTED cohort
  size, never by the number of replies (McMahan et al. 2018, "Learning Differentially
  Private Recurrent Language Models", ICLR 2018, arXiv 1710.06963).
* `update_noise_multiplier`, `noised_unclipped_fraction`, `next_clip`: adaptive clipping to
  a target quantile (Andrew et al. 2021, "Differentially Private Learning with Adaptive
  Clipping", NeurIPS 2021, arXiv 1905.03871).
* `cohort_noise_scale`: pfl-research's ``noise_cohort_size`` (Granqvist et al. 2024,
  "pfl-research: simulation framework for accelerating research in Private Federated
  Learning", arXiv 2404.06430): the noise of a cohort of M while K clients train.
* `tree_nodes`, `tree_round_noise`: tree aggregation for DP-FTRL (Kairouz et al. 2021,
  "Practical and Private (Deep) Learning without Sampling or Shuffling", ICML 2021,
  arXiv 2103.00039), with restarts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from fedsim.errors import ConfigError, FedsimError

Stack = torch.Tensor | np.ndarray


def flatten_updates(updates: Mapping[str, Stack]) -> tuple[torch.Tensor, list[tuple[str, tuple[int, ...]]]]:
    """A dict of stacked updates ``name -> (K, *shape)`` as one ``(K, P)`` matrix, and the
    layout (name, per-client shape) that `unflatten_update` needs to split a row back.

    One matrix lets a client's norm run over all its arrays, and clipping plus summing be a
    single matrix-vector product (`clip_and_sum`). The concatenation is the one copy.
    """
    layout = []
    columns = []
    clients = None
    for name, stack in updates.items():
        tensor = torch.as_tensor(stack)
        if clients is None:
            clients = tensor.shape[0]
        elif tensor.shape[0] != clients:
            raise ValueError(f"flatten_updates: {name!r} stacks {tensor.shape[0]} clients, the others {clients}")
        layout.append((name, tuple(tensor.shape[1:])))
        columns.append(tensor.reshape(clients, -1))
    if not columns:
        raise ValueError("flatten_updates: no arrays")
    return torch.cat(columns, dim=1), layout


def unflatten_update(row: torch.Tensor, layout: Sequence[tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """One ``(P,)`` row (a released mean or sum) split back into named arrays (views)."""
    out = {}
    start = 0
    for name, shape in layout:
        size = math.prod(shape)
        out[name] = row[start:start + size].reshape(shape)
        start += size
    if start != row.numel():
        raise ValueError(f"unflatten_update: the layout holds {start} values, the row {row.numel()}")
    return out


def clip_factors(norms: torch.Tensor, clip: float) -> torch.Tensor:
    """min(1, C / norm) per client (Flower's and TensorFlow Federated's FlatClip factor); a
    zero update keeps factor 1 instead of dividing by zero."""
    return torch.where(norms > clip, clip / torch.clamp(norms, min=torch.finfo(norms.dtype).tiny),
                       torch.ones_like(norms))


def clip_and_sum(updates: Stack, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the clipped updates, each client's norm before clipping), for a ``(K, P)`` stack.

    McMahan et al. 2018 ("Learning Differentially Private Recurrent Language Models",
    arXiv 1710.06963), FlatClip: each client's whole update is scaled to L2 norm at most C,
    so adding or removing one client moves the sum by at most C. The norm covers every array
    a client uploads (one row). Clipping and summing are one product, factors @ updates:
    no clipped copy of the stack is made.
    """
    stack = torch.as_tensor(updates)
    if stack.dim() != 2:
        raise ValueError(f"clip_and_sum: a (clients, parameters) stack, got shape {tuple(stack.shape)}")
    if not clip > 0:
        raise ValueError(f"clip_and_sum: the clip must be > 0 (got {clip})")
    norms = torch.linalg.vector_norm(stack, dim=1)
    return clip_factors(norms, clip).to(stack.dtype) @ stack, norms


def clip_stack(updates: Stack, clip: float) -> torch.Tensor:
    """Each client's update (one row) scaled to L2 norm at most C: the stack, clipped (the
    client-side variant clips its own row with this; see `clip_and_sum`)."""
    stack = torch.as_tensor(updates)
    norms = torch.linalg.vector_norm(stack.reshape(stack.shape[0], -1), dim=1)
    return stack * clip_factors(norms, clip).to(stack.dtype).reshape(-1, *([1] * (stack.dim() - 1)))


def check_cohort(replies: int, min_cohort: int, server_round: int) -> None:
    """A round whose replies fall below ``privacy.min_cohort`` fails (McMahan et al. 2018's
    fixed denominator keeps the noise right for any cohort, but the signal shrinks with it:
    a round of too few replies is mostly noise, and a deployment should stop, not step on it)."""
    if replies < min_cohort:
        raise FedsimError(f"round {server_round}: {replies} client update(s) replied, fewer than "
                          f"privacy.min_cohort = {min_cohort}; the round is not released")


def gaussian_release(clipped_sum: torch.Tensor, *, noise_std: float, expected_cohort: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """The noised mean: (clipped sum + N(0, noise_std^2 I)) / expected cohort size.

    McMahan et al. 2018 ("Learning Differentially Private Recurrent Language Models",
    arXiv 1710.06963), the fixed-denominator estimator: dividing by the EXPECTED cohort
    qN, never by the number m of replies, keeps the sensitivity of the mean at C/(qN) and the
    noise std on the mean at noise_std/(qN) whatever m is. Dividing by m (as averaging the
    replies does) would scale the signal up by qN/m while the noise stays put. ``noise_std``
    is the std on the SUM (z C for the plain Gaussian mechanism).
    """
    if expected_cohort <= 0:
        raise ValueError(f"gaussian_release: the expected cohort must be > 0 (got {expected_cohort})")
    noised = clipped_sum
    if noise_std > 0:
        noised = clipped_sum + noise_std * torch.randn(clipped_sum.shape, generator=generator,
                                                       dtype=clipped_sum.dtype)
    return noised / expected_cohort


# ----------------------------------------------------------------------------- adaptive clipping

def update_noise_multiplier(noise_multiplier: float, count_noise: float) -> float:
    """z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2): the update's share of a total budget z.

    Andrew et al. 2021 ("Differentially Private Learning with Adaptive Clipping",
    arXiv 1905.03871): releasing the update sum (sensitivity C, noise z_Delta C) and
    the centered unclipped count sum_i (b_i - 1/2) (sensitivity 1/2, noise sigma_b) together is
    one Gaussian mechanism with 1/z^2 = 1/z_Delta^2 + 1/(2 sigma_b)^2. So the accountant is told
    z, and the update gets z_Delta > z. It exists only for sigma_b > z/2; the paper suggests
    sigma_b = K/20 for an expected cohort of K.
    """
    if noise_multiplier <= 0:
        raise ValueError(f"update_noise_multiplier: z must be > 0 (got {noise_multiplier})")
    if count_noise <= noise_multiplier / 2:
        raise ConfigError(f"privacy.user_clip_count_noise: must be > user_noise_multiplier / 2 = "
                          f"{noise_multiplier / 2:g} for adaptive clipping (Andrew et al. 2021: the count "
                          f"noise would take the whole budget z), got {count_noise:g}")
    return (noise_multiplier ** -2 - (2 * count_noise) ** -2) ** -0.5


def noised_unclipped_fraction(unclipped: torch.Tensor, *, count_noise: float, expected_cohort: float,
                              generator: torch.Generator | None = None) -> float:
    """b~: the noised fraction of updates within the clip, from each client's indicator
    b_i = 1[||Delta_i|| <= C] (``norms <= clip`` on the server; reported by each client when
    clients clip their own updates).

    Andrew et al. 2021 (arXiv 1905.03871): the centered sum sum_i (b_i - 1/2) has
    sensitivity 1/2; its Gaussian release (std sigma_b) over the expected cohort, plus 1/2,
    estimates the fraction.
    """
    centered = float(unclipped.to(torch.float64).sum()) - 0.5 * unclipped.numel()
    if count_noise > 0:
        centered += count_noise * float(torch.randn((), generator=generator, dtype=torch.float64))
    return centered / expected_cohort + 0.5


def next_clip(clip: float, unclipped_fraction: float, *, target_quantile: float, lr: float) -> float:
    """C <- C exp(-eta (b~ - gamma)): the geometric update of Andrew et al. 2021 (arXiv
    1905.03871). Too many updates under the clip (b~ > gamma) shrink it, too few grow
    it; its fixed point is the gamma-quantile of the update norms."""
    return clip * math.exp(-lr * (unclipped_fraction - target_quantile))


# ----------------------------------------------------------------------------- cohort noise

def cohort_noise_scale(cohort: float, noise_cohort: int) -> float:
    """K / M: the factor on the std of the noise on the sum (pfl-research's
    ``noise_cohort_size``, Granqvist et al. 2024, arXiv 2404.06430).

    The sum of K clipped updates gets noise z C K/M, so the mean over K has noise z C / M:
    the std the mean of a cohort of M would have. The model trains as a deployment of M
    would, while the privacy statement is that deployment's (a simulated one); the K who
    actually trained are NOT protected at that level.
    """
    if noise_cohort <= 0:
        return 1.0
    return cohort / noise_cohort


# ----------------------------------------------------------------------------- tree aggregation

def tree_nodes(step: int) -> list[tuple[int, int]]:
    """The dyadic intervals (level, index) whose union is steps 1..t of a binary tree.

    Kairouz et al. 2021 ("Practical and Private (Deep) Learning without Sampling or
    Shuffling", arXiv 2103.00039; the binary mechanism of Dwork et al. 2010 and Chan et al.
    2011): the node (level l, index j) covers steps j 2^l + 1 .. (j + 1) 2^l and carries its
    own Gaussian noise, so the prefix sum to t adds popcount(t) noise draws, and each step lies in at
    most ceil(log2 T) + 1 nodes.
    """
    if step < 0:
        raise ValueError(f"tree_nodes: step must be >= 0 (got {step})")
    nodes = []
    covered = 0
    for level in reversed(range(step.bit_length())):
        if step & (1 << level):
            nodes.append((level, covered >> level))
            covered += 1 << level
    return nodes


def tree_round_noise(step: int, node_noise: Callable[[int, int], torch.Tensor]) -> torch.Tensor | None:
    """The noise of the released round t: noisy prefix(t) - noisy prefix(t-1).

    Kairouz et al. 2021 (arXiv 2103.00039): DP-FTRL steps from noisy prefix sums,
    theta_t = theta_0 + noisy_prefix(t) / K; a server that steps on per-round updates
    reproduces that trajectory with the residual noisy_prefix(t) - noisy_prefix(t-1)
    (TensorFlow Federated's tree residual query). Nodes both prefixes share cancel exactly
    (they are not added at all), so the residual holds only the nodes that differ.
    ``node_noise(level, index)`` returns that node's noise; it must return the same draw
    every time it is asked (derive it from a seed), so no tree state is kept across rounds.
    """
    now = set(tree_nodes(step))
    before = set(tree_nodes(step - 1))
    noise = None
    for node in sorted(now - before):
        noise = node_noise(*node) if noise is None else noise + node_noise(*node)
    for node in sorted(before - now):
        noise = -node_noise(*node) if noise is None else noise - node_noise(*node)
    return noise


def tree_position(server_round: int, restart_every: int) -> tuple[int, int]:
    """(tree, step in that tree) of a round, 1-based rounds and steps: with restarts every
    n rounds a new tree starts at rounds 1, n + 1, 2n + 1, ... (Kairouz et al. 2021's
    restarts); 0 = one tree for the whole run."""
    if restart_every <= 0:
        return 0, server_round
    return (server_round - 1) // restart_every, (server_round - 1) % restart_every + 1
