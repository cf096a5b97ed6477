"""User-level (central) DP as a layer around any averaging strategy.

`CentralDP` wraps a strategy. Each round it decodes every reply's update (reply arrays minus
the arrays the round sent, for every array the strategy aggregates: the model, and
SCAFFOLD's control-variate delta beside it), stacks them into one (clients, parameters)
matrix, and applies `fedsim.privacy.user_dp` to the whole stack: clip every client in one
tensor operation, sum, add noise (Gaussian, or DP-FTRL's tree noise), divide by the EXPECTED
cohort. The wrapped strategy then aggregates ONE synthetic reply of weight 1 that holds the
round's arrays plus the released mean update, so its own server step (FedAvg's mean,
FedAdam's and FedAvgM's server optimizer, SCAFFOLD's step and c update, FedSVD's
refactorization of B A) runs on the privatized mean, as post-processing. The real replies'
metrics are aggregated as before.

Why one synthetic reply: a strategy that averages m replies of weight 1 returns their mean,
so a single reply holding the released mean makes every averaging strategy step on it,
without a DP variant of each. Arrays a strategy SUMS instead of averaging (SCAFFOLD's
c <- c + (1/N) sum_i delta c_i, ``algorithm-arrays``) get the released sum estimate,
expected cohort x mean, in the synthetic reply.

The layer reads only the replies' arrays and a seed derived from (experiment seed, round),
so the same updates and seed give bit-identical output whichever engine or runtime
produced them; it keeps no generator state (tree noise is regenerated per node from its
seed), so a resumed run continues exactly. Its only state across rounds is the adaptive
clip (`state_dict`). Under ``privacy.secure_noise = "on"`` a secret key, drawn once per run
and kept in that state, replaces the seed (`fedsim.privacy.secure_noise`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim import records as R
from fedsim.algorithms import stateful_strategy
from fedsim.errors import ConfigError
from fedsim.experiment import derive_seed
from fedsim.privacy import accounting
from fedsim.privacy import user_dp
from fedsim.privacy.canaries import planted_canaries
from fedsim.privacy.faults import fault
from fedsim.privacy.secure_noise import announce, is_secret, keyed_generator, secret_key
from fedsim.schedule import user_accounting_args

log = logging.getLogger("fedsim")

MECHANISMS = ("gaussian", "tree")
_STATE_CLIP = "central-dp/clip"
_STATE_KEY = "central-dp/noise-key"


def user_epsilon(cfg: Any, rounds: int) -> float | None:
    """The user-level epsilon of this layer's releases after `rounds` rounds (None without
    central DP), stated for what the mechanism does: z the total noise multiplier (adaptive
    clipping's count noise included), the sampling that runs, the simulated population and
    cohort under ``noise_cohort_size``, the tree and its restarts under DP-FTRL
    (`fedsim.schedule.user_accounting_args`)."""
    p = cfg.privacy
    if p.user_noise_multiplier <= 0:
        return None
    return accounting.user_level_epsilon(noise_multiplier=p.user_noise_multiplier,
                                         **user_accounting_args(cfg, rounds))


class CentralDP(Strategy):
    """User-level DP over a round's stack of client updates, around any averaging strategy.

    DP-FedAvg with the fixed-denominator estimator (McMahan et al., "Learning Differentially
    Private Recurrent Language Models", ICLR 2018); adaptive clipping to a target quantile
    (Andrew et al., "Differentially Private Learning with Adaptive Clipping", NeurIPS 2021);
    pfl-research's noise cohort (Granqvist et al. 2024); DP-FTRL tree aggregation with restarts
    (Kairouz et al., "Practical and Private (Deep) Learning without Sampling or Shuffling",
    ICML 2021). The math is `fedsim.privacy.user_dp`.

    Parameters
    ----------
    strategy : Strategy
        The wrapped strategy; it must aggregate replies of weight 1 by their mean.
    noise_multiplier : float
        z, the user-level noise multiplier the accountant is told. With adaptive clipping the
        update gets z_Delta = (z^-2 - (2 count_noise)^-2)^-1/2 and the count the rest.
    clip : float
        The clip C (adaptive clipping: its start).
    expected_cohort : float
        qN, the expected number of clients per round: the fixed denominator.
    seed : int
        The experiment seed; each round's noise is drawn from (seed, round).
    min_cohort : int
        A round with fewer successful replies fails.
    target_quantile : float
        gamma; 0 = fixed clipping at ``clip``.
    clip_lr : float
        eta of the geometric clip update.
    count_noise : float
        sigma_b, the std of the noise on the unclipped count (must exceed z / 2).
    noise_cohort_size : int
        M > 0: the noise of a cohort of M while ``expected_cohort`` clients train (0 = off).
    mechanism : str
        "gaussian" (one release per round) or "tree" (DP-FTRL's tree aggregation).
    restart_every : int
        Tree only: restart the tree every n rounds (0 = one tree for the run).
    secure_noise : bool
        ``privacy.secure_noise`` resolved to on: every draw of noise comes from a generator keyed by
        a 256-bit key from the OS CSPRNG, drawn once per run (`fedsim.privacy.secure_noise`),
        instead of from (seed, round), so no one who holds the run config can regenerate it.
        The key is the layer's state (`state_dict`): a resumed run draws DP-FTRL's tree nodes
        again as they were, and a checkpoint holds the key until the run finishes.
    clipped_by_clients : bool
        ``privacy.user_clipping = "client"``: the round's clip goes to the clients in the train
        config (``user-clip``), each clips its own update before replying
        (`fedsim.privacy.client_clipping`) and, under adaptive clipping, reports b_i
        (``user-unclipped``). The server clips again all the same: a no-op on a clipped update,
        and a client that did not clip still cannot exceed the sensitivity.
    """

    def __init__(self, strategy: Strategy, *, noise_multiplier: float, clip: float, expected_cohort: float,
                 seed: int, min_cohort: int = 1, target_quantile: float = 0.0, clip_lr: float = 0.2,
                 count_noise: float = 0.0, noise_cohort_size: int = 0, mechanism: str = "gaussian",
                 restart_every: int = 0, clipped_by_clients: bool = False, secure_noise: bool = False) -> None:
        super().__init__()
        if noise_multiplier < 0 or not clip > 0 or not expected_cohort > 0 or min_cohort < 1:
            raise ValueError(f"CentralDP: noise_multiplier >= 0, clip > 0, expected_cohort > 0 and min_cohort >= 1 "
                             f"(got {noise_multiplier}, {clip}, {expected_cohort}, {min_cohort})")
        if mechanism not in MECHANISMS:
            raise ValueError(f"CentralDP: mechanism is one of {MECHANISMS} (got {mechanism!r})")
        if not 0 <= target_quantile < 1:
            raise ValueError(f"CentralDP: target_quantile in [0, 1) (got {target_quantile})")
        if target_quantile > 0 and mechanism == "tree":
            raise ConfigError("privacy.user_clip_quantile: adaptive clipping works with user_mechanism = 'gaussian' "
                              "(tree aggregation's analysis holds one clip for the whole tree)")
        self.strategy = strategy
        self.noise_multiplier = noise_multiplier
        self.clip = float(clip)
        self.expected_cohort = float(expected_cohort)
        self.seed = seed
        self.min_cohort = min_cohort
        self.target_quantile = target_quantile
        self.clip_lr = clip_lr
        self.count_noise = count_noise
        self.adaptive = target_quantile > 0
        self.update_noise = (user_dp.update_noise_multiplier(noise_multiplier, count_noise)
                             if self.adaptive and noise_multiplier > 0 else noise_multiplier)
        self.noise_cohort_size = noise_cohort_size
        self.noise_scale = user_dp.cohort_noise_scale(expected_cohort, noise_cohort_size)
        self.mechanism = mechanism
        self.restart_every = restart_every
        self.clipped_by_clients = clipped_by_clients
        self.noise_key = secret_key() if secure_noise else None
        self.sent: dict[str, np.ndarray] = {}
        self.sampled: float = math.inf  # clients this round's configure_train addressed
        self.round_metadata = None
        # "record/key" -> (shape, dtype) of the uplink-only arrays (SCAFFOLD's delta c_i)
        self.extra_layout: dict[str, tuple[tuple[int, ...], np.dtype]] = {}

    def summary(self) -> None:
        clipping = (f"adaptive to quantile {self.target_quantile:g} (eta {self.clip_lr:g}, count noise "
                    f"{self.count_noise:g}), from {self.clip:g}" if self.adaptive else f"fixed at {self.clip:g}")
        log.info("central DP: %s mechanism, z %g (on the update %.6g), clip %s by the %s, fixed denominator %g, "
                 "min cohort %d%s%s", self.mechanism, self.noise_multiplier, self.update_noise, clipping,
                 "clients" if self.clipped_by_clients else "server",
                 self.expected_cohort, self.min_cohort,
                 f", noise of a cohort of {self.noise_cohort_size} (user-level epsilon: a SIMULATED deployment "
                 f"sampling {self.noise_cohort_size} clients a round)" if self.noise_cohort_size else "",
                 f", tree restarts every {self.restart_every} rounds" if self.restart_every else "")
        self.strategy.summary()

    # ------------------------------------------------------------------ state (checkpoints)
    def state_dict(self) -> dict[str, np.ndarray]:
        inner = stateful_strategy(self.strategy)
        if inner is None:
            raise TypeError(f"{type(self.strategy).__name__} does not expose its state")
        state = {**inner.state_dict(), _STATE_CLIP: np.array(self.clip)}
        if self.noise_key is not None:
            state[_STATE_KEY] = np.frombuffer(self.noise_key, dtype=np.uint8).copy()
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        state = dict(state)
        if _STATE_CLIP in state:
            self.clip = float(state.pop(_STATE_CLIP))
        key = state.pop(_STATE_KEY, None)
        if key is not None and self.noise_key is not None:
            self.noise_key = np.asarray(key, dtype=np.uint8).tobytes()
        stateful_strategy(self.strategy).load_state_dict(state)

    # ------------------------------------------------------------------ rounds
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.clipped_by_clients:  # the clip each client applies to its own update (this round's, if adaptive)
            config = ConfigRecord({**R.plain(config), R.USER_CLIP: self.clip})
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        # the arrays the strategy actually sent (FedSVD refactorizes B A before sending)
        self.sent = R.record_to_numpy(R.record_of(messages[0].content, R.ARRAYS, ArrayRecord)) if messages else {}
        self.sampled = len(messages)
        self.round_metadata = messages[0].metadata if messages else None
        return messages

    def prepare_empty_round(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                            placeholder_grid: Grid) -> None:
        """A Poisson round that drew no client still releases the noise on an empty sum: the
        accountant counts every round as a sampled Gaussian, and skipping the noise when nobody
        was drawn would reveal that (the mechanism would no longer be the one accounted).
        The round is configured against one placeholder node, so that this layer and the
        wrapped strategy know the round's arrays; nothing is sent."""
        self.configure_train(server_round, arrays, config, placeholder_grid)
        self.sampled = 0

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = R.successful_replies(list(replies))
        # min_cohort guards against lost replies; a Poisson draw smaller than it is no loss
        user_dp.check_cohort(len(replies), min(self.min_cohort, self.sampled), server_round)
        # each reply's records as a plain dict, read once (Flower's content view is rebuilt per access)
        contents = _in_partition_order([R.plain(r.content) for r in replies])
        stack, layout = self._stack(contents) if contents else self._empty_stack()
        stack = torch.from_numpy(stack)
        plan = planted_canaries()
        if plan is not None and plan.level == "user":  # a user-level audit's canary clients (`fedsim.audit`)
            gen = torch.Generator().manual_seed(derive_seed(self.seed, server_round, "canary-clients"))
            stack = torch.cat([stack, plan.client_rows(layout, gen, stack.dtype)])
        released = self.release(stack, server_round, self._reported_unclipped(contents))
        content = self._synthetic_content(user_dp.unflatten_update(released, layout))
        synthetic = Message.__new__(Message)
        metadata = replies[0].metadata if replies else self.round_metadata
        synthetic.__dict__.update(_metadata=metadata, _content=content, _error=None)
        arrays, _ = self.strategy.aggregate_train(server_round, [synthetic])
        if not contents:
            return arrays, None
        weighted_by_key = self.strategy.weighted_by_key  # type: ignore[attr-defined]
        metrics_fn = getattr(self.strategy, "train_metrics_aggr_fn", None) or R.aggregate_metrics
        return arrays, metrics_fn([R.trusted(RecordDict, {R.METRICS: c[R.METRICS]}) for c in contents],
                                  weighted_by_key)

    def _empty_stack(self) -> tuple[np.ndarray, list[tuple[str, tuple[int, ...]]]]:
        """The (0, P) stack of a round with no update, laid out as the round's sent arrays and
        the uplink-only arrays of the last round that had replies (their shapes are the
        strategy's own, the same every round)."""
        layout = [(f"{R.ARRAYS}/{key}", tuple(a.shape)) for key, a in self.sent.items()]
        layout += [(name, shape) for name, (shape, _) in self.extra_layout.items()]
        dtype = np.result_type(*[a.dtype for a in self.sent.values()],
                               *[d for _, d in self.extra_layout.values()])
        return np.zeros((0, sum(math.prod(shape) for _, shape in layout)), dtype), layout

    def _reported_unclipped(self, contents: list[dict]) -> torch.Tensor | None:
        """Under adaptive clipping by the clients, each client's b_i as it reported it: the
        server sees only clipped updates, whose norms say nothing about b_i."""
        if not (self.clipped_by_clients and self.adaptive):
            return None
        reported = [R.plain(c[R.METRICS]).get(R.USER_UNCLIPPED) for c in contents]
        if any(b is None for b in reported):
            raise ValueError(f"central DP: privacy.user_clipping = 'client' with adaptive clipping needs every "
                             f"reply's {R.USER_UNCLIPPED!r} metric; {reported.count(None)} replies lack it")
        return torch.tensor(reported) > 0.5

    def release(self, stack: torch.Tensor, server_round: int, unclipped: torch.Tensor | None = None) -> torch.Tensor:
        """The round's released mean update, a (P,) row, from the (K, P) stack of updates;
        moves the adaptive clip, counting ``unclipped`` (the clients' own b_i, when they clip)
        or else the stack's norms. Everything random is drawn from (seed, round), or from the run's
        secret key under ``secure_noise``."""
        if self.noise_multiplier > 0:  # what this mode's noise hides and what it does not, once per process
            announce("off" if self.noise_key is None else "on")
        clipped_sum, norms = user_dp.clip_and_sum(stack, self.clip)
        std = self.update_noise * self.clip * self.noise_scale  # on the sum
        if self.mechanism == "tree":
            tree, step = user_dp.tree_position(server_round, self.restart_every)

            def node_noise(level: int, index: int) -> torch.Tensor:
                gen = self._generator("user-dp-tree", tree, level, index)
                return std * torch.randn(clipped_sum.shape, generator=gen, dtype=clipped_sum.dtype)

            noise = user_dp.tree_round_noise(step, node_noise) if std > 0 else None
            released = (clipped_sum if noise is None else clipped_sum + noise) / self.expected_cohort
        else:
            gen = self._generator(server_round, "user-dp")
            if fault("user_noise_by_replies"):  # test-only (`fedsim.privacy.faults`): an audit must catch it
                noise = std * torch.randn(clipped_sum.shape, generator=gen, dtype=clipped_sum.dtype)
                released = clipped_sum / self.expected_cohort + noise / max(len(stack), 1)
            else:
                released = user_dp.gaussian_release(clipped_sum, noise_std=std,
                                                    expected_cohort=self.expected_cohort, generator=gen)
        if self.adaptive:
            gen = self._generator(server_round, "user-dp-count")
            fraction = user_dp.noised_unclipped_fraction(
                norms <= self.clip if unclipped is None else unclipped,
                count_noise=self.count_noise if self.noise_multiplier > 0 else 0.0,
                expected_cohort=self.expected_cohort, generator=gen)
            clip = user_dp.next_clip(self.clip, fraction, target_quantile=self.target_quantile, lr=self.clip_lr)
            log.info("round %d: central DP clip %.6g -> %.6g (noised unclipped fraction %.4f, target %g)",
                     server_round, self.clip, clip, fraction, self.target_quantile)
            self.clip = clip
        return released

    def _generator(self, *parts: int | str) -> torch.Generator:
        """The generator of one draw of noise: from (seed, parts), or (secret key, parts)."""
        if self.noise_key is not None:
            return keyed_generator(self.noise_key, *parts)
        return torch.Generator().manual_seed(derive_seed(self.seed, *parts))

    def _stack(self, contents: list[dict]) -> tuple[np.ndarray, list[tuple[str, tuple[int, ...]]]]:
        """Every reply's update as one (K, P) matrix, and its layout ("record/key", shape).

        Per array: one stack of the K replies' read-only views, then one subtraction of the
        array sent, written straight into the array's columns of the matrix (no per-client
        arithmetic, no concatenation afterwards). Uplink-only arrays (SCAFFOLD's delta c_i)
        are updates already. Every array must be floating point: any other would pass
        unprivatized."""
        records = {R.ARRAYS: [R.plain(c[R.ARRAYS]) for c in contents]}
        if R.ALGORITHM_ARRAYS in contents[0]:
            records[R.ALGORITHM_ARRAYS] = [R.plain(c[R.ALGORITHM_ARRAYS]) for c in contents]
        columns = []
        for record_name, per_reply in records.items():
            keys = list(per_reply[0])
            if any(list(p) != keys for p in per_reply):
                raise ValueError(f"round replies carry different {record_name} arrays; central DP needs the same")
            for key in keys:
                first = R.from_array(per_reply[0][key])
                if not np.issubdtype(first.dtype, np.floating):
                    raise ValueError(f"central DP: array {key!r} is {first.dtype}, not floating point; its value "
                                     f"would pass unprivatized")
                if record_name == R.ARRAYS and key not in self.sent:
                    raise ValueError(f"central DP: replies carry {key!r}, which the round did not send")
                columns.append((record_name, key, first.shape, first.dtype))
        dtype = np.result_type(*[c[3] for c in columns])
        stack = np.empty((len(contents), sum(math.prod(c[2]) for c in columns)), dtype)
        start = 0
        layout = []
        for record_name, key, shape, _ in columns:
            size = math.prod(shape)
            rows = np.stack([R.from_array(p[key]) for p in records[record_name]]).reshape(len(contents), size)
            block = stack[:, start:start + size]
            if record_name == R.ARRAYS:
                np.subtract(rows, self.sent[key].reshape(size), out=block)
            else:
                block[...] = rows
            layout.append((f"{record_name}/{key}", tuple(shape)))
            if record_name != R.ARRAYS:
                self.extra_layout[f"{record_name}/{key}"] = (tuple(shape), block.dtype)
            start += size
        return stack, layout

    def _synthetic_content(self, released: dict[str, torch.Tensor]) -> RecordDict:
        """The one reply the wrapped strategy aggregates: the sent arrays plus the released
        mean (model arrays, which strategies average), and the released sum estimate
        (algorithm arrays, which SCAFFOLD sums over replies), weight 1; each array in the
        dtype it was sent or replied in."""
        model, extra = {}, {}
        for name, value in released.items():
            record_name, key = name.split("/", 1)
            values = value.numpy()
            if record_name == R.ARRAYS:
                model[key] = (self.sent[key] + values).astype(self.sent[key].dtype, copy=False)
            else:
                dtype = self.extra_layout[name][1]
                extra[key] = (values * self.expected_cohort).astype(dtype, copy=False)
        weighted_by_key = self.strategy.weighted_by_key  # type: ignore[attr-defined]
        content = {R.ARRAYS: R.numpy_to_record(model), R.METRICS: MetricRecord({weighted_by_key: 1.0})}
        if extra:
            content[R.ALGORITHM_ARRAYS] = R.numpy_to_record(extra)
        return R.trusted(RecordDict, content)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)


def _in_partition_order(contents: list[dict]) -> list[dict]:
    """Replies (their records, `R.plain`) sorted by the partition they trained on: Ray and a
    deployment deliver them in arrival order, and a sum in another order differs in its last
    bits; sorted, the release is bit-identical whichever runtime delivered the same updates."""
    def partition(content: dict) -> int:
        metrics = content.get(R.METRICS)
        return int(R.plain(metrics).get(R.PARTITION_ID, -1)) if metrics is not None else -1

    return sorted(contents, key=partition)


def build_central_dp(strategy: Strategy, cfg: Any, algorithm: Any) -> CentralDP:
    """`CentralDP` around `strategy` from ``[privacy]`` and ``[federation]``; refuses an
    algorithm whose aggregation the layer cannot privatize, with its reason."""
    p = cfg.privacy
    if not algorithm.central_dp:
        reason = getattr(algorithm, "central_dp_refused", "") or "its registry entry does not declare central_dp"
        raise ConfigError(f"privacy.user_noise_multiplier: central DP does not apply to strategy "
                          f"{cfg.strategy.name!r}: {reason}")
    count_noise = p.user_clip_count_noise or cfg.federation.clients_per_round / 20
    return CentralDP(strategy, noise_multiplier=p.user_noise_multiplier, clip=p.user_clip,
                     expected_cohort=cfg.federation.clients_per_round, seed=cfg.seed, min_cohort=p.min_cohort,
                     target_quantile=p.user_clip_quantile, clip_lr=p.user_clip_lr, count_noise=count_noise,
                     noise_cohort_size=p.noise_cohort_size, mechanism=p.user_mechanism,
                     restart_every=p.user_tree_restart, clipped_by_clients=p.user_clipping == "client",
                     secure_noise=is_secret(p.secure_noise))
