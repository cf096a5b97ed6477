"""Learning from aggregate responses: bag-level, instance-level and interpolating losses.

Javanmard, Chen, Mirrokni, Badanidiyuru, Fu, "Learning from Aggregate Responses:
Instance Level versus Bag Level Loss Functions", ICLR 2024 (arXiv 2401.11081).

With bags B_a of size k, released means y_a, f_i = f(x_i) and f_a = mean of f over B_a:
  L_bag = (1/m) sum_a l(y_a, f_a)
  L_ins = (1/n) sum_a sum_{i in B_a} l(y_a, f_i)
  for squared loss L_ins = L_bag + R,  R = (1/n) sum_a sum_{i in B_a} (f_i - f_a)^2
  L_rho = L_bag + rho R = (1 - rho) L_bag + rho L_ins.
For classification, bags carry label proportions; L_bag is the cross-entropy between the
proportion and the bag's mean predicted distribution (DLLP), L_ins uses the proportion as a
soft label, and L_rho interpolates the two linearly.
"""

from __future__ import annotations

import hashlib
import itertools
import math

import numpy as np
import torch

from fedsim.algorithms import ClientRule, LocalResult, LocalTask, seed_everything
from fedsim.caches import Key, cached
from fedsim.errors import FedsimError
from fedsim.experiment import derive_seed
from fedsim.privacy.bag_mechanism import make_bags, release_bag_means, release_label_proportions


def squared_losses(pred: torch.Tensor, bag_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_bag, R) for predictions of shape (m, k) and bag targets of shape (m,)."""
    bag_mean = pred.mean(dim=1)
    l_bag = ((bag_targets - bag_mean) ** 2).mean()
    r = ((pred - bag_mean[:, None]) ** 2).mean()
    return l_bag, r


def interpolated_loss(pred: torch.Tensor, bag_targets: torch.Tensor, rho: float) -> torch.Tensor:
    """L_rho = L_bag + rho * R for regression (pred (m, k), targets (m,))."""
    l_bag, r = squared_losses(pred, bag_targets)
    return l_bag + rho * r


def proportion_loss(logits: torch.Tensor, proportions: torch.Tensor, rho: float) -> torch.Tensor:
    """(1 - rho) CE(p_a, mean softmax) + rho * mean_i CE(p_a, softmax(z_i)); logits (m, k, C)."""
    log_probs = torch.log_softmax(logits, dim=-1)
    mean_probs = log_probs.exp().mean(dim=1).clamp_min(1e-12)
    l_bag = -(proportions * mean_probs.log()).sum(-1).mean()
    l_ins = -(proportions[:, None, :] * log_probs).sum(-1).mean()
    return (1 - rho) * l_bag + rho * l_ins


def client_bags(task: LocalTask) -> tuple[np.ndarray, np.ndarray]:
    """(bags, released targets) of one client: drawn and noised ONCE from a fixed seed.

    Every round re-derives the identical release (same seed), which is what "release once,
    reuse as post-processing" means in a stateless simulation. The release is cached per
    process (`fedsim.caches`) on everything it depends on: the labels by their digest.
    """
    b, y, pid = task.hyper.params, task.y, task.partition_id
    if b.bag_size > len(y):
        raise FedsimError(f"strategy.bags.bag_size: {b.bag_size} is larger than client {pid}'s "
                          f"{len(y)} samples; lower strategy.bags.bag_size or federation.num_clients")
    labels = np.ascontiguousarray(y)
    digest = hashlib.blake2b(labels.tobytes(), digest_size=16).hexdigest()
    key = (task.experiment_seed, pid, b.bag_size, b.label_epsilon, b.mechanism, tuple(b.label_range),
           task.delta, task.settings.task, task.num_classes, labels.dtype.str, labels.shape, digest)
    return _release(Key(key, payload=labels))


@cached(maxsize=4096)  # one entry per client of an experiment; each is two small arrays
def _release(key: Key) -> tuple[np.ndarray, np.ndarray]:
    seed, pid, bag_size, label_epsilon, mechanism, label_range, delta, task, num_classes = key.value[:9]
    y = key.payload
    rng = np.random.default_rng(derive_seed(seed, pid, bag_size, "bags"))
    bags = make_bags(len(y), bag_size, rng)
    if task == "classification":
        targets = release_label_proportions(y, bags, num_classes, epsilon=label_epsilon,
                                            delta=delta, mechanism=mechanism, rng=rng)
    else:
        label_range = label_range or None
        if label_epsilon > 0 and label_range is None:
            raise FedsimError("strategy.bags.label_range: label-DP on bag means needs a public response "
                              "range [a, b]; set strategy.bags.label_range")
        targets = release_bag_means(y, bags, epsilon=label_epsilon, delta=delta,
                                    mechanism=mechanism, label_range=label_range, rng=rng)
    return bags, targets


def _bag_batches(num_bags: int, per_batch: int, gen: torch.Generator):
    """Endless minibatches of bag indices, reshuffled every epoch."""
    while True:
        order = torch.randperm(num_bags, generator=gen)
        for start in range(0, num_bags, per_batch):
            yield order[start:start + per_batch]


def train_bags(task: LocalTask) -> LocalResult:
    """Local SGD on minibatches of bags with L_rho. Label-DP comes from the release, so no DP-SGD."""
    bags, targets = client_bags(task)
    settings, model, bag_size, rho = task.settings, task.model, task.hyper.params.bag_size, task.hyper.params.rho
    seed_everything(task.seed, settings.device)
    device = settings.device
    model.to(device).train()
    xt = torch.as_tensor(task.x, dtype=torch.float32, device=device)
    tt = torch.as_tensor(targets, dtype=torch.float32, device=device)
    m = len(bags)
    per_batch = max(1, settings.batch_size // bag_size)
    steps = settings.local_steps or settings.local_epochs * math.ceil(m / per_batch)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum)
    gen = torch.Generator().manual_seed(task.seed)
    losses = []
    for chosen in itertools.islice(_bag_batches(m, per_batch, gen), steps):
        idx = torch.as_tensor(bags[chosen.numpy()], device=device)
        out = model(xt[idx.reshape(-1)])
        if settings.task == "classification":
            loss = proportion_loss(out.reshape(len(chosen), bag_size, -1), tt[chosen], rho)
        else:
            loss = interpolated_loss(out.reshape(len(chosen), bag_size), tt[chosen], rho)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return LocalResult(m * bag_size, steps, float(np.mean(losses)), [], min(1.0, per_batch / m))


RULE = ClientRule(local_train=train_bags)
