"""Label-DP for aggregate responses: noisy bag means (Javanmard et al., ICLR 2024).

Math kept apart from training: `bag_sensitivity` and `noise_scale` are closed
forms; `release_bag_means` applies them once per client.

Neighbouring datasets differ in ONE response (replace-one, label-DP's relation). A
replaced response in [a, b] can move the bag's sum by the full range b - a, so a bag
mean of k responses moves by at most Delta = (b - a)/k. Half of it, (b - a)/(2k), is
the sensitivity under add/remove neighbours with responses centred on (a + b)/2; used
for replace-one it would understate Delta by 2 (and double the true epsilon of Laplace
noise), so fedsim uses (b - a)/k. docs/methods.md says the same.

Bags are disjoint, so each label is in exactly one released mean: by parallel
composition the whole release is (epsilon, delta)-label-DP. Each client releases
its bag means once; reusing them every round is post-processing and costs nothing.
"""

from __future__ import annotations

import functools

import numpy as np


def bag_sensitivity(label_range: tuple[float, float], bag_size: int) -> float:
    """Replace-one sensitivity of a mean of `bag_size` responses clipped to [a, b]:
    (b - a)/k, not the add/remove-with-centring (b - a)/(2k) (module docstring)."""
    a, b = label_range
    return (b - a) / bag_size


@functools.lru_cache(maxsize=256)
def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Smallest Gaussian std giving (epsilon, delta)-DP: the analytic Gaussian
    mechanism (Balle & Wang 2018), as calibrated by dp-accounting."""
    from dp_accounting.pld import common, privacy_loss_mechanism as plm

    loss = plm.GaussianPrivacyLoss.from_privacy_guarantee(
        common.DifferentialPrivacyParameters(epsilon, delta), sensitivity=sensitivity)
    return float(loss.standard_deviation)


def noise_scale(mechanism: str, epsilon: float, delta: float, sensitivity: float) -> float:
    """Laplace scale b = Delta/epsilon, or the analytic-Gaussian sigma at (epsilon, delta)."""
    if mechanism == "laplace":
        return sensitivity / epsilon
    if mechanism == "gaussian":
        return analytic_gaussian_sigma(epsilon, delta, sensitivity)
    raise ValueError(f"bags.mechanism: must be laplace or gaussian (got {mechanism!r})")


def make_bags(num_examples: int, bag_size: int, rng: np.random.Generator) -> np.ndarray:
    """Random disjoint bags, shape (m, k).

    Leftover rule: the n mod k samples that do not fill a bag are dropped. A smaller
    last bag would need its own, larger sensitivity (b - a)/k'; dropping keeps one
    noise scale for every released mean.
    """
    m = num_examples // bag_size
    return rng.permutation(num_examples)[: m * bag_size].reshape(m, bag_size)


def release_bag_means(responses: np.ndarray, bags: np.ndarray, *, epsilon: float, delta: float,
                      mechanism: str, label_range: tuple[float, float] | None,
                      rng: np.random.Generator) -> np.ndarray:
    """Noisy bag means of scalar responses (regression). epsilon = 0 means no noise."""
    y = np.asarray(responses, dtype=np.float64)
    if label_range is not None:
        y = np.clip(y, *label_range)
    means = y[bags].mean(axis=1)
    if epsilon <= 0:
        return means
    scale = noise_scale(mechanism, epsilon, delta, bag_sensitivity(label_range, bags.shape[1]))
    noise = rng.laplace(0, scale, means.shape) if mechanism == "laplace" else rng.normal(0, scale, means.shape)
    return means + noise


def release_label_proportions(labels: np.ndarray, bags: np.ndarray, num_classes: int, *,
                              epsilon: float, delta: float, mechanism: str,
                              rng: np.random.Generator) -> np.ndarray:
    """Noisy per-bag class proportions (classification), projected back onto the simplex.

    Replacing one label moves two coordinates by 1/k each: L1 sensitivity 2/k (Laplace,
    per coordinate) and L2 sensitivity sqrt(2)/k (Gaussian). Clipping negatives and
    renormalizing afterwards is post-processing.
    """
    one_hot = np.eye(num_classes)[labels]
    props = one_hot[bags].mean(axis=1)
    if epsilon <= 0:
        return props
    k = bags.shape[1]
    if mechanism == "laplace":
        props = props + rng.laplace(0, (2.0 / k) / epsilon, props.shape)
    else:
        props = props + rng.normal(0, noise_scale("gaussian", epsilon, delta, np.sqrt(2.0) / k), props.shape)
    props = np.clip(props, 0, None)
    total = props.sum(axis=1, keepdims=True)
    return np.where(total > 0, props / np.where(total > 0, total, 1), 1.0 / num_classes)
