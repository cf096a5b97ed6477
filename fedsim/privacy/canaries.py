"""Gradient canaries for white-box one-run audits (Steinke, Nasr & Jagielski 2023, section 6).

A gradient canary is a fixed random direction u of the trainable parameter space whose
norm is at least the clip bound C. An included canary is one more "sample" of one client:
Poisson sampling draws it at each DP-SGD step with the client's rate q, like any sample,
and its per-sample gradient is u, clipped (to C when correct) and summed with the others
before the noise is added once. After training, a canary's score is the model's
displacement against it, -<theta_T - theta_0, u> / |u| (SGD steps against a gradient):
included canaries push the model that way at every step that drew them, excluded ones
only see noise and cross-talk.

The plan (which canaries exist, which are included, which client holds each) is built by
`fedsim.audit` and planted for the duration of one in-process run (`planted`); each engine
asks `held_by` for the client it trains. Nothing here is reachable from a config.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class GradientCanaries:
    """m gradient canaries over the trainable tensors `names` (shapes `shapes`).

    ``directions`` is (m, P) in the flat order of `names`, each row of norm ``norm``;
    ``included`` the inclusion bits (each 1/2, seeded); ``holders`` the partition id that
    holds each canary (whether or not it is included).
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    directions: torch.Tensor
    included: np.ndarray
    holders: np.ndarray
    norm: float
    # "sample": per-sample gradients inside DP-SGD; "user": canary clients whose whole update is
    # the direction, added to the user-level layer's stack of updates at rate `client_rate`
    level: str = "sample"
    client_rate: float = 1.0

    @property
    def count(self) -> int:
        return int(self.directions.shape[0])

    def examples_held_by(self, partition_id: int) -> None:
        return None  # gradient canaries are no examples

    def held_by(self, partition_id: int) -> dict[str, torch.Tensor] | None:
        """The included canaries a client holds, as {name: (c, *shape)}; None if it holds none."""
        if self.level != "sample":
            return None
        rows = np.flatnonzero(self.included & (self.holders == partition_id))
        if rows.size == 0:
            return None
        return unflatten(self.directions[torch.as_tensor(rows)], self.names, self.shapes)

    def scores(self, before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> np.ndarray:
        """Each canary's score: how far the trainable tensors moved against its direction (SGD
        descends a gradient, so an included canary's steps move the model along -u), or, for
        canary clients, along it (their update is added to the model)."""
        sign = 1.0 if self.level == "user" else -1.0
        delta = torch.cat([(after[n].detach().double() - before[n].detach().double()).reshape(-1)
                           for n in self.names])
        return (sign * (self.directions.double() @ delta) / self.norm).numpy()


    def client_rows(self, layout: list[tuple[str, tuple[int, ...]]], generator: torch.Generator,
                    dtype: torch.dtype) -> torch.Tensor:
        """This round's canary clients as rows of the user-level layer's (clients, P) stack:
        each included canary joins with probability ``client_rate`` (Poisson sampling, as the
        user-level accountant assumes), its update its direction in the model's arrays
        (``layout`` names them "arrays/<name>"), zero in any other array."""
        joined = torch.as_tensor(self.included) & (torch.rand(self.count, generator=generator) < self.client_rate)
        chosen = joined.nonzero().squeeze(1)
        parts = unflatten(self.directions.index_select(0, chosen), self.names, self.shapes)
        columns = []
        for name, shape in layout:
            key = name.split("/", 1)[1] if name.startswith("arrays/") else None
            if key in parts:
                columns.append(parts[key].reshape(len(chosen), -1).to(dtype))
            else:
                columns.append(torch.zeros((len(chosen), int(np.prod(shape))), dtype=dtype))
        return torch.cat(columns, dim=1)


def unflatten(flat: torch.Tensor, names: tuple[str, ...],
              shapes: tuple[tuple[int, ...], ...]) -> dict[str, torch.Tensor]:
    """Rows of flat vectors (c, P) as {name: (c, *shape)}."""
    sizes = [int(np.prod(s)) for s in shapes]
    return {n: part.reshape(flat.shape[0], *s) for n, s, part in zip(names, shapes, flat.split(sizes, dim=1))}


def make_gradient_canaries(shapes: Mapping[str, tuple[int, ...]], m: int, *, norm: float, holders: int,
                           seed: int, level: str = "sample", client_rate: float = 1.0) -> GradientCanaries:
    """m canaries of norm `norm`, each held by one of `holders` partitions, included with probability 1/2.

    The directions are orthonormal (times `norm`) when the parameter count P is at least m, so
    that one canary's pushes do not show in another's score; otherwise independent uniform
    directions, whose cross-talk (about norm / sqrt(P) each) blurs the scores and weakens,
    but never invalidates, the audit. Everything is drawn from `seed`, before and apart from training.
    """
    if m < 1:
        raise ValueError(f"canaries: must be >= 1 (got {m})")
    if holders < 1:
        raise ValueError(f"holders: must be >= 1 (got {holders})")
    names = tuple(shapes)
    shape_list = tuple(tuple(int(d) for d in shapes[n]) for n in names)
    total = sum(int(np.prod(s)) for s in shape_list)
    gen = torch.Generator().manual_seed(int(seed))
    gaussian = torch.randn((total, m), generator=gen, dtype=torch.float64)
    if total >= m:
        basis, _ = torch.linalg.qr(gaussian)  # (P, m), orthonormal columns
        directions = basis.T
    else:
        directions = gaussian.T / gaussian.T.norm(dim=1, keepdim=True)
    rng = np.random.default_rng(int(seed) + 1)
    included = rng.random(m) < 0.5
    owner = rng.integers(0, holders, size=m)
    return GradientCanaries(names, shape_list, (directions * norm).to(torch.float32).contiguous(), included,
                            owner, float(norm), level, float(client_rate))


@dataclass(frozen=True)
class ExampleCanaries:
    """Black-box canaries: m out-of-distribution examples with random labels. An included one
    is appended to its holder's data and is from then on an ordinary sample (Poisson-sampled,
    clipped, noised, counted in the client's n and so in its q); the score is minus the final
    model's loss on it (`fedsim.audit` computes it)."""

    x: np.ndarray
    y: np.ndarray
    included: np.ndarray
    holders: np.ndarray
    level: str = "sample"

    @property
    def count(self) -> int:
        return int(len(self.y))

    def held_by(self, partition_id: int) -> None:
        return None  # no gradient canaries

    def examples_held_by(self, partition_id: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The included canary examples a client holds, (x, y); None if it holds none."""
        rows = np.flatnonzero(self.included & (self.holders == partition_id))
        return (self.x[rows], self.y[rows]) if rows.size else None


def make_example_canaries(x: np.ndarray, num_classes: int, m: int, *, holders: int, seed: int) -> ExampleCanaries:
    """m canary examples shaped like the rows of `x`: Gaussian inputs at 3x the data's spread
    (out of distribution), each with a uniformly random label, each held by one of `holders`
    partitions and included with probability 1/2; drawn from `seed` alone."""
    if m < 1:
        raise ValueError(f"canaries: must be >= 1 (got {m})")
    rng = np.random.default_rng(int(seed))
    scale = float(np.std(x)) or 1.0
    inputs = (float(np.mean(x)) + 3.0 * scale * rng.standard_normal((m, *x.shape[1:]))).astype(x.dtype)
    labels = rng.integers(0, max(num_classes, 1), size=m)
    included = rng.random(m) < 0.5
    owner = rng.integers(0, holders, size=m)
    return ExampleCanaries(inputs, labels, included, owner)


_PLANTED: list = []


@contextlib.contextmanager
def planted(plan: GradientCanaries | ExampleCanaries) -> Iterator[GradientCanaries | ExampleCanaries]:
    """Make `plan` the canaries every engine in this process trains with, for the block."""
    if _PLANTED:
        raise RuntimeError("canaries: an audit is already running in this process")
    _PLANTED.append(plan)
    try:
        yield plan
    finally:
        _PLANTED.clear()


def planted_canaries() -> GradientCanaries | ExampleCanaries | None:
    """The canaries of the audit running in this process, or None (every ordinary run)."""
    return _PLANTED[0] if _PLANTED else None
