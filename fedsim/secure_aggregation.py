"""Secure aggregation around any strategy that works from the sum of the updates.

``privacy.secure_aggregation = true``: the server learns the sum of the round's client
updates and nothing else about any one of them (the replies' metrics, which say how many
examples and what loss, stay in the clear). Two runtimes, one trust model:

* A deployment (`fedsim deploy local --secagg`, `flwr run`) runs Flower's SecAgg+ protocol
  (Bell et al., CCS 2020): `SecAggPlus` is Flower's ``SecAggPlusWorkflow`` and
  `LegacyStrategy` presents the fedsim strategy to it as the legacy
  ``flwr.server.strategy.Strategy`` the workflow drives (``configure_fit`` is the strategy's
  ``configure_train``; ``aggregate_fit`` gets the protocol's mean). The ClientApp's
  ``secagg_mod`` (`fedsim.privacy.secagg`) wraps Flower's ``secaggplus_mod``. No crypto here.
* A simulation has no protocol: `SecureAggregation.aggregate_train` sums the replies' updates
  itself (with each client's noise share) and hands the strategy only that sum.

Either way the wrapped strategy aggregates K' synthetic replies of weight 1 that all carry the
mean update (the sum over K'): its mean is the mean, its sum the sum and its count K' (Flower's
workflow does the same, giving every FitRes the aggregate), so FedAvg and its server
optimizers, SCAFFOLD's summed control variates and FedDyn's count-weighted h all run on the sum
as post-processing. Strategies that need each reply (FedLD) are refused by the config.

Every client weighs 1: example counts as weights would let one client scale its own
contribution (its sensitivity) and would need every count in the clear.

Under user-level DP each client clips its own update to C and adds N(0, sigma^2 C^2 / K), K the
round's clients, so the sum carries the noise of central DP-FedAvg and the user-level
accountant runs with the same sigma. If only K' < K clients' contributions survive, the sum
holds sigma sqrt(K'/K) C of noise, less than accounted: such a round is logged, and a round
below ``privacy.min_cohort`` fails.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategyBase
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsim import records as R
from fedsim.algorithms import stateful_strategy
from fedsim.config import secagg_shares
from fedsim.errors import ClientFailure, ConfigError
from fedsim.experiment import derive_seed
from fedsim.privacy import secagg
from fedsim.privacy.user_dp import check_cohort

log = logging.getLogger("fedsim")


class SecureAggregation(Strategy):
    """The wrapped strategy sees only the sum of the round's updates (see the module docstring).

    Parameters
    ----------
    strategy : Strategy
        The wrapped strategy; it reads replies only through their mean, sum and count.
    noise_multiplier : float
        sigma of the distributed user-level noise (0: none).
    clip : float
        C, the clip each client applies to its own update (sent as ``user-clip`` under DP).
    expected_cohort : int
        K, the clients a round asks: each adds N(0, sigma^2 C^2 / K).
    seed : int
        The experiment seed; a simulated client's share is drawn from (seed, round, partition).
    min_cohort : int
        A round with fewer contributions fails.
    """

    def __init__(self, strategy: Strategy, *, noise_multiplier: float, clip: float, expected_cohort: int,
                 seed: int, min_cohort: int = 1) -> None:
        super().__init__()
        if noise_multiplier < 0 or not clip > 0 or expected_cohort < 2 or min_cohort < 1:
            raise ValueError(f"SecureAggregation: noise_multiplier >= 0, clip > 0, expected_cohort >= 2, "
                             f"min_cohort >= 1 (got {noise_multiplier}, {clip}, {expected_cohort}, {min_cohort})")
        self.strategy = strategy
        self.noise_multiplier = noise_multiplier
        self.clip = float(clip)
        self.expected_cohort = expected_cohort
        self.seed = seed
        self.min_cohort = min_cohort
        self.share_std = secagg.noise_share_std(noise_multiplier, clip, expected_cohort)
        self.sent: dict[str, np.ndarray] = {}
        self.sampled = 0
        self.round_metadata = None
        self.short_rounds: list[tuple[int, int]] = []  # (round, contributions) of rounds below K

    @property
    def weighted_by_key(self) -> str:
        return self.strategy.weighted_by_key  # type: ignore[attr-defined]

    def summary(self) -> None:
        log.info("secure aggregation: the strategy sees only the sum of the updates, every client weighs 1%s, "
                 "min cohort %d", f"; each client adds N(0, ({self.share_std:.6g})^2) (sigma {self.noise_multiplier:g}"
                 f" x clip {self.clip:g} / sqrt({self.expected_cohort}))" if self.share_std else "", self.min_cohort)
        self.strategy.summary()

    def state_dict(self) -> dict[str, np.ndarray]:
        inner = stateful_strategy(self.strategy)
        if inner is None:
            raise TypeError(f"{type(self.strategy).__name__} does not expose its state")
        return inner.state_dict()

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        stateful_strategy(self.strategy).load_state_dict(dict(state))

    # ------------------------------------------------------------------ rounds
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.share_std > 0:  # each client clips its own update and adds its share of the noise
            config = ConfigRecord({**R.plain(config), R.USER_CLIP: self.clip, secagg.NOISE_STD: self.share_std})
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self.sent = R.record_to_numpy(R.record_of(messages[0].content, R.ARRAYS, ArrayRecord)) if messages else {}
        self.sampled = len(messages)
        self.round_metadata = messages[0].metadata if messages else None
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The simulated protocol: each reply's update plus its noise share, summed; the strategy
        sees only the sum (`aggregate_mean`)."""
        contents = sorted((R.plain(r.content) for r in R.successful_replies(list(replies))), key=_partition)
        if not contents:
            return None, None
        total: dict[str, np.ndarray] = {}
        layout: secagg.Layout = []
        for content in contents:
            vectors, layout = secagg.contribution(content, self.sent)
            if self.share_std > 0:
                gen = np.random.default_rng(derive_seed(self.seed, server_round, _partition(content), "secagg-noise"))
                vectors = [v + gen.normal(0.0, self.share_std, v.shape) for v in vectors]
            for (name, _, _), v in zip(layout, vectors):
                total[name] = total[name] + v if name in total else v
        mean = {name: v / len(contents) for name, v in total.items()}
        metrics = [R.plain(c[R.METRICS]) for c in contents]
        return self.aggregate_mean(server_round, mean, layout, metrics)

    def aggregate_mean(self, server_round: int, mean: dict[str, np.ndarray], layout: secagg.Layout,
                       metrics: list[dict]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Hand the strategy the mean update of `len(metrics)` contributions (named "record/key",
        float64, as `secagg.contribution` lays them out) as that many replies of weight 1, each
        holding the round's arrays plus the mean; `metrics` are the replies' own (in the clear)."""
        count = len(metrics)
        check_cohort(count, min(self.min_cohort, self.sampled or count), server_round)
        if self.share_std > 0 and count < self.expected_cohort:
            self.short_rounds.append((server_round, count))
            log.warning("round %d: %d of %d clients' noise shares reached the sum: it carries noise multiplier "
                        "%.4g, not the %g accounted", server_round, count, self.expected_cohort,
                        self.noise_multiplier * math.sqrt(count / self.expected_cohort), self.noise_multiplier)
        dtypes = {name: np.dtype(dtype) for name, _, dtype in layout}
        model, extra = {}, {}
        for name, value in mean.items():
            record_name, key = name.split("/", 1)
            if record_name == R.ARRAYS:
                if key not in self.sent:
                    raise ValueError(f"secure aggregation: the sum holds {key!r}, which the round did not send")
                model[key] = (self.sent[key].astype(np.float64) + value).astype(self.sent[key].dtype)
            else:
                extra[key] = value.astype(dtypes[name])
        content = {R.ARRAYS: R.numpy_to_record(model), R.METRICS: MetricRecord({self.weighted_by_key: 1.0})}
        if extra:
            content[R.ALGORITHM_ARRAYS] = R.numpy_to_record(extra)
        synthetic = Message.__new__(Message)
        synthetic.__dict__.update(_metadata=self.round_metadata, _content=R.trusted(RecordDict, content), _error=None)
        arrays, _ = self.strategy.aggregate_train(server_round, [synthetic] * count)
        metrics_fn = getattr(self.strategy, "train_metrics_aggr_fn", None) or R.aggregate_metrics
        return arrays, metrics_fn([R.trusted(RecordDict, {R.METRICS: MetricRecord(m)}) for m in metrics],
                                  self.weighted_by_key)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)


def _partition(content: dict) -> int:
    """The partition a reply trained on: replies are summed in partition order, so the sum is the
    same bits whichever order a runtime delivered them in."""
    metrics = content.get(R.METRICS)
    return int(R.plain(metrics).get(R.PARTITION_ID, -1)) if metrics is not None else -1


def build_secure_aggregation(strategy: Strategy, cfg: Any) -> SecureAggregation:
    """`SecureAggregation` around `strategy` from ``[privacy]`` (the config has refused what it
    cannot run: `fedsim.config._check_secure_aggregation`)."""
    p = cfg.privacy
    return SecureAggregation(strategy, noise_multiplier=p.user_noise_multiplier, clip=p.user_clip,
                             expected_cohort=cfg.federation.clients_per_round, seed=cfg.seed,
                             min_cohort=p.min_cohort)


def secure_layer(strategy: Any) -> SecureAggregation | None:
    """The `SecureAggregation` inside fedsim's wrappers (``inner``), or None."""
    while strategy is not None and not isinstance(strategy, SecureAggregation):
        strategy = getattr(strategy, "inner", None)
    return strategy


# --------------------------------------------------------------------------- Flower's SecAgg+ protocol

class LegacyStrategy(LegacyStrategyBase):
    """A fedsim strategy as the legacy Flower strategy ``SecAggPlusWorkflow`` drives, for one round.

    ``configure_fit`` runs the fedsim strategy's ``configure_train`` (sampling included) and keeps
    each message's content, which the workflow sends as the node's train instruction
    (`SecAggPlus.setup_stage`); the FitIns it returns carry nothing. ``aggregate_fit`` gets
    every surviving node's FitRes holding the protocol's mean of the contributions, turns it
    back into named arrays (the clients' layout, in their metrics) and hands it to
    `SecureAggregation.aggregate_mean`. The new global arrays are ``self.result``.
    """

    def __init__(self, *, strategy: Strategy, layer: SecureAggregation, grid: Grid, arrays: ArrayRecord) -> None:
        self.strategy = strategy
        self.layer = layer
        self.grid = grid
        self.arrays = arrays
        self.contents: dict[int, RecordDict] = {}
        self.result: ArrayRecord | None = None
        self.metrics: list[dict] = []  # each contributing client's metrics, for the run's records

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        messages = list(self.strategy.configure_train(server_round, self.arrays, ConfigRecord(), self.grid))
        self.contents = {m.metadata.dst_node_id: m.content for m in messages}
        empty = FitIns(Parameters(tensors=[], tensor_type=""), {})
        return [(GridClientProxy(node, self.grid, 0), empty) for node in self.contents]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict]:
        for failure in failures:
            log.warning("round %d: secure aggregation went on without a node: %s", server_round, failure)
        if not results:
            return None, {}
        layouts = {res.metrics.get(secagg.LAYOUT) for _, res in results}
        if len(layouts) != 1 or None in layouts:
            raise ValueError(f"secure aggregation: the clients' contributions differ in layout ({len(layouts)} seen)")
        layout = secagg.parse_layout(str(layouts.pop()))
        mean = secagg.unflatten(parameters_to_ndarrays(results[0][1].parameters), layout)
        self.metrics = [{k: v for k, v in res.metrics.items() if k != secagg.LAYOUT} for _, res in results]
        self.result, _ = self.layer.aggregate_mean(server_round, mean, layout, self.metrics)
        return ndarrays_to_parameters([]), {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[float | None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


class SecAggPlus(SecAggPlusWorkflow):
    """Flower's ``SecAggPlusWorkflow``, unchanged in protocol and crypto, with two additions:
    each node's train instruction (stage 2) is the fedsim strategy's own message content
    instead of a legacy FitIns, and the reason a round halted is kept for the error (the
    threshold checks of stages 0-2, and the unmask stage's own)."""

    def __init__(self, adapter: LegacyStrategy, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.adapter = adapter
        self.halted: str | None = None

    def setup_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        ok = super().setup_stage(grid, context, state)
        # a RecordDict per node: the workflow adds its own config record to the instruction
        state.nid_to_fitins = {node: RecordDict(dict(self.adapter.contents[node].items()))
                               for node in state.nid_to_fitins}
        return ok

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        ok = super().share_keys_stage(grid, context, state)
        # A node lost before its key shares were forwarded is in no one's masks (each node masks
        # only with the nodes whose shares it received): nothing of it is left to unmask. Flower
        # would still ask for its shares and halt, so a node lost in stage 0 or 1 is forgotten.
        state.sampled_node_ids = set(state.active_node_ids)
        return ok

    def _check_threshold(self, state: Any) -> bool:
        ok = super()._check_threshold(state)
        if not ok:
            self.halted = _short_of_shares(state, "", "")
        return ok

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        ok = super().unmask_stage(grid, context, state)
        # Flower halts here without `_check_threshold` when a node's mask has fewer shares than
        # the threshold: the nodes that died in this stage took theirs with them. Its active
        # nodes are now those that sent their shares.
        if not ok and self.halted is None:
            self.halted = _short_of_shares(state, " in the unmask stage", " to remove their masks")
        return ok


def _short_of_shares(state: Any, where: str, why: str) -> str:
    """Why SecAgg+ halted: how many nodes are left, and how many kept too few live holders of
    their key shares for the threshold."""
    short = [n for n in state.sampled_node_ids
             if len(state.nid_to_neighbours[n] & state.active_node_ids) < state.threshold]
    return (f"{len(state.active_node_ids)} of {len(state.sampled_node_ids)} nodes left{where}, and {len(short)} "
            f"node(s) kept fewer than {state.threshold} live share holders{why} (privacy.secagg_threshold)")


def secure_train_round(strategy: Strategy, grid: Any, server_round: int, arrays: ArrayRecord,
                       cfg: Any) -> tuple[ArrayRecord, list[dict]]:
    """One round through Flower's SecAgg+ protocol: the new global arrays and the contributing
    clients' metrics. `strategy` is fedsim's round strategy (sampling, then `SecureAggregation`);
    `grid` the run's tracked grid (the protocol's messages go to the grid below it, since its
    replies are protocol records, not fedsim's). A round the protocol cannot finish (too few
    nodes left for the threshold) raises `ClientFailure` naming why."""
    layer = secure_layer(strategy)
    if layer is None:
        raise ConfigError("privacy.secure_aggregation: the strategy has no secure aggregation layer")
    p = cfg.privacy
    shares, threshold = secagg_shares(cfg)
    expected = cfg.federation.clients_per_round
    adapter = LegacyStrategy(strategy=strategy, layer=layer, grid=grid, arrays=arrays)
    workflow = SecAggPlus(
        adapter, num_shares=1.0 if shares >= expected else shares,
        reconstruction_threshold=threshold if p.secagg_threshold else 0.5, max_weight=1.0,
        clipping_range=secagg.clipping_range(p.secagg_clipping_range, p.user_noise_multiplier, p.user_clip,
                                             expected, p.user_noise_multiplier > 0),
        quantization_range=p.secagg_quantization_range, modulus_range=p.secagg_modulus,
        timeout=cfg.runtime.round_timeout)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=adapter)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = arrays
    workflow(getattr(grid, "inner", grid), context)
    if adapter.result is None:
        raise ClientFailure(f"round {server_round}: secure aggregation failed: "
                            f"{workflow.halted or 'the protocol halted (see the run log)'}")
    return adapter.result, adapter.metrics
