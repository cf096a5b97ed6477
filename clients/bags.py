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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch


from fedsim.algorithms import ClientRule, LocalResult, LocalTask, Tensors, seed_everything
from fedsim.caches import Key, cached
from fedsim.clients.vectorized import by_steps_in_chunks, dense_chain, momentum_direction, stacked_forward
from fedsim.errors import FedsimError
from fedsim.experiment import derive_seed
from fedsim.privacy.bag_mechanism import make_bags, release_bag_means, release_label_proportions


def _mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean over bags (the last axis); with ``mask`` (1 = a real bag, 0 = padding) over the
    real bags only. Leading axes (clients, under the batched loop) are kept."""
    if mask is None:
        return values.mean(-1)
    return (values * mask).sum(-1) / mask.sum(-1)


def squared_losses(pred: torch.Tensor, bag_targets: torch.Tensor,
                   mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_bag, R) for predictions of shape (m, k) and bag targets of shape (m,).

    ``mask`` (m,) marks the real bags of a padded batch: both terms are then means over those.
    Leading axes on all three (one per client) give one (L_bag, R) per client."""
    bag_mean = pred.mean(dim=-1)
    l_bag = _mean((bag_targets - bag_mean) ** 2, mask)
    r = _mean(((pred - bag_mean.unsqueeze(-1)) ** 2).mean(dim=-1), mask)
    return l_bag, r


def interpolated_loss(pred: torch.Tensor, bag_targets: torch.Tensor, rho: float,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """L_rho = L_bag + rho * R for regression (pred (m, k), targets (m,)), over ``mask``'s bags."""
    l_bag, r = squared_losses(pred, bag_targets, mask)
    return l_bag + rho * r


def proportion_loss(logits: torch.Tensor, proportions: torch.Tensor, rho: float,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """(1 - rho) CE(p_a, mean softmax) + rho * mean_i CE(p_a, softmax(z_i)); logits (m, k, C),
    averaged over ``mask``'s bags (all of them without a mask); leading axes are kept."""
    log_probs = torch.log_softmax(logits, dim=-1)
    mean_probs = log_probs.exp().mean(dim=-2).clamp_min(1e-12)
    l_bag = _mean(-(proportions * mean_probs.log()).sum(-1), mask)
    l_ins = _mean(-(proportions.unsqueeze(-2) * log_probs).sum(-1).mean(dim=-1), mask)
    return (1 - rho) * l_bag + rho * l_ins


def bag_loss(out: torch.Tensor, targets: torch.Tensor, bag_size: int, rho: float, task: str,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of a minibatch of bags from the model's outputs (samples, outputs) on their
    samples, bag after bag; outputs (clients, samples, outputs) give one loss per client."""
    lead, num_bags = out.shape[:-2], out.shape[-2] // bag_size
    if task == "classification":
        return proportion_loss(out.reshape(*lead, num_bags, bag_size, out.shape[-1]), targets, rho, mask)
    return interpolated_loss(out.reshape(*lead, num_bags, bag_size), targets, rho, mask)


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


@dataclass
class _Plan:
    """One client's round: its released bags and targets, and its minibatches of bags."""

    bags: np.ndarray  # (m, k) sample indices
    targets: np.ndarray  # (m,) bag means or (m, C) label proportions
    per_batch: int  # bags per minibatch
    steps: int
    batches: Iterator[torch.Tensor]  # the bag indices of each step, `steps` of them

    @classmethod
    def of(cls, task: LocalTask) -> _Plan:
        bags, targets = client_bags(task)
        settings, m = task.settings, len(bags)
        per_batch = max(1, settings.batch_size // task.hyper.params.bag_size)
        steps = settings.local_steps or settings.local_epochs * math.ceil(m / per_batch)
        gen = torch.Generator().manual_seed(task.seed)
        return cls(bags, targets, per_batch, steps, itertools.islice(_bag_batches(m, per_batch, gen), steps))

    def result(self, mean_loss: float) -> LocalResult:
        m = len(self.bags)
        return LocalResult(m * self.bags.shape[1], self.steps, mean_loss, [], min(1.0, self.per_batch / m))


def train_bags(task: LocalTask) -> LocalResult:
    """Local SGD on minibatches of bags with L_rho. Label-DP comes from the release, so no DP-SGD."""
    plan = _Plan.of(task)
    settings, model, bag_size, rho = task.settings, task.model, task.hyper.params.bag_size, task.hyper.params.rho
    seed_everything(task.seed, settings.device)
    device = settings.device
    model.to(device).train()
    xt = torch.as_tensor(task.x, dtype=torch.float32, device=device)
    tt = torch.as_tensor(plan.targets, dtype=torch.float32, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum)
    losses = []
    for chosen in plan.batches:
        idx = torch.as_tensor(plan.bags[chosen.numpy()], device=device)
        loss = bag_loss(model(xt[idx.reshape(-1)]), tt[chosen], bag_size, rho, settings.task)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return plan.result(float(np.mean(losses)))


def train_bags_batched(tasks: Sequence[LocalTask], chunk: int = 0) -> list[tuple[LocalResult, Tensors]]:
    """`train_bags` for a round's clients at once (`ClientRule.local_train_batched`).

    Each client's parameters are stacked on a leading axis; one batched forward
    (`clients.vectorized.stacked_forward`: matmuls for Linear chains, else ``vmap``), each
    client's bag loss, and ordinary autograd on their sum take a step for all of them, since
    the clients are independent: the same bags, minibatches (from each client's own
    generator) and SGD with momentum as `train_bags`, client by client. An
    epoch's last, smaller minibatch is padded and its loss is the mean over its real bags.
    Clients are sorted by their number of steps, so the ones still training at a step are a
    prefix of the stack; ``chunk`` (0: all) caps the clients per stack.
    """
    plans = [_Plan.of(task) for task in tasks]
    return by_steps_in_chunks([plan.steps for plan in plans], chunk,
                              lambda ids: _train_stack([tasks[i] for i in ids], [plans[i] for i in ids]))


def _train_stack(tasks: list[LocalTask], plans: list[_Plan]) -> list[tuple[LocalResult, Tensors]]:
    """Clients sorted by steps (most first), trained together from the shared model."""
    first = tasks[0]
    settings, model = first.settings, first.model
    bag_size, rho, device = first.hyper.params.bag_size, first.hyper.params.rho, settings.device
    trainable = {k: p.detach().to(device) for k, p in model.named_parameters() if p.requires_grad}
    frozen = {k: v.detach().to(device) for k, v in itertools.chain(model.named_parameters(), model.named_buffers())
              if k not in trainable}
    # every client's minibatches up front, padded to per_batch bags: rows into the stacked data
    count, per_batch, steps = len(tasks), plans[0].per_batch, [p.steps for p in plans]
    longest = max(steps)
    sample_at = np.cumsum([0] + [len(t.x) for t in tasks])
    bag_at = np.cumsum([0] + [len(p.bags) for p in plans])
    samples = np.zeros((longest, count, per_batch, bag_size), dtype=np.int64)
    rows = np.zeros((longest, count, per_batch), dtype=np.int64)
    real = np.zeros((longest, count, per_batch), dtype=np.float32)
    for i, plan in enumerate(plans):
        for t, chosen in enumerate(plan.batches):
            c = chosen.numpy()
            samples[t, i, :len(c)] = plan.bags[c] + sample_at[i]
            rows[t, i, :len(c)] = c + bag_at[i]
            real[t, i, :len(c)] = 1.0
    samples_t = torch.as_tensor(samples.reshape(longest, count, per_batch * bag_size), device=device)
    rows_t, real_t = torch.as_tensor(rows, device=device), torch.as_tensor(real, device=device)
    x = torch.as_tensor(np.concatenate([t.x for t in tasks]), dtype=torch.float32, device=device)
    targets = torch.as_tensor(np.concatenate([p.targets for p in plans]), dtype=torch.float32, device=device)

    chain = dense_chain(model)
    params = {name: t.unsqueeze(0).expand(count, *t.shape).clone() for name, t in trainable.items()}
    momentum = {name: torch.zeros_like(p) for name, p in params.items()} if settings.momentum else None
    losses = torch.zeros(longest, count, dtype=torch.float64, device=device)
    for t in range(longest):
        active = sum(1 for s in steps if s > t)
        current = {name: p[:active] for name, p in params.items()}
        leaves = {name: p.detach().requires_grad_() for name, p in current.items()}
        with torch.enable_grad():  # clients are independent: the gradient of the sum is each one's own
            out = stacked_forward(model, chain, leaves, frozen, x[samples_t[t, :active]])
            values = bag_loss(out, targets[rows_t[t, :active]], bag_size, rho, settings.task, real_t[t, :active])
            grads = dict(zip(leaves, torch.autograd.grad(values.sum(), list(leaves.values()))))
        values = values.detach()
        losses[t, :active] = values.double()
        direction = momentum_direction(grads, momentum, active, settings.momentum)
        for name, p in current.items():
            p.sub_(settings.lr * direction[name])
    counts = torch.as_tensor(steps, dtype=torch.float64, device=device)
    mean_losses = (losses.sum(0) / counts.clamp_min(1)).tolist()
    final = {name: p.detach().cpu() for name, p in params.items()}
    return [(plan.result(mean_losses[i] if plan.steps else float("nan")), {name: p[i] for name, p in final.items()})
            for i, plan in enumerate(plans)]


RULE = ClientRule(local_train=train_bags, local_train_batched=train_bags_batched)
