"""The user-level DP mechanisms (`fedsim.privacy.user_dp`) on hand-computed stacks and
measured statistics, and the layer that applies them to a round (`fedsim.central_dp`)
against Flower's own DP wrapper and each strategy's server step."""

from __future__ import annotations

import math

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

from fedsim import records as R
from fedsim.algorithms import load_strategy_state, strategy_state
from fedsim.central_dp import CentralDP
from fedsim.errors import ConfigError, FedsimError
from fedsim.privacy import user_dp
from fedsim.server import build_strategy
from fedsim.strategies.fedadam import FedAdam
from fedsim.strategies.fedavg import FedAvg
from fedsim.strategies.scaffold import Scaffold


# ----------------------------------------------------------------------------- clipping

def test_clip_and_sum_on_hand_computed_updates():
    updates = np.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]], np.float32)
    total, norms = user_dp.clip_and_sum(updates, 1.0)
    np.testing.assert_allclose(norms.numpy(), [5.0, 0.5, 0.0], rtol=1e-6)
    # 3-4-5 scaled to norm 1, the small one kept, the zero one kept (no division by zero)
    np.testing.assert_allclose(total.numpy(), [0.6 + 0.3, 0.8 + 0.4], rtol=1e-6)
    np.testing.assert_allclose(user_dp.clip_stack(updates, 1.0).numpy(), [[0.6, 0.8], [0.3, 0.4], [0, 0]], rtol=1e-6)


def test_the_norm_runs_over_all_arrays_of_a_client():
    """FlatClip: a client's norm is over every array it uploads, not per array."""
    updates = {"w": np.array([[[3.0]], [[1.0]]], np.float32), "b": np.array([[4.0, 0.0], [0.0, 0.0]], np.float32)}
    stack, layout = user_dp.flatten_updates(updates)
    assert stack.shape == (2, 3) and layout == [("w", (1, 1)), ("b", (2,))]
    total, norms = user_dp.clip_and_sum(stack, 2.5)
    np.testing.assert_allclose(norms.numpy(), [5.0, 1.0])
    back = user_dp.unflatten_update(total, layout)
    np.testing.assert_allclose(back["w"].numpy(), [[3.0 * 0.5 + 1.0]])  # client 0 scaled by 2.5/5 in both arrays
    np.testing.assert_allclose(back["b"].numpy(), [4.0 * 0.5, 0.0])


# ----------------------------------------------------------------------------- fixed denominator

@pytest.mark.parametrize("replies", [10, 6, 3])
def test_fixed_denominator_holds_the_noise_std_when_replies_drop(replies):
    """McMahan et al. 2018: the noise std on the released mean is sigma C / (q N) however many
    of the expected q N clients replied; dividing by the replies would give sigma C / m."""
    sigma, clip, expected = 1.0, 2.0, 10
    gen = torch.Generator().manual_seed(replies)
    updates = torch.randn(replies, 50_000, generator=gen, dtype=torch.float64) * 0.01
    total, _ = user_dp.clip_and_sum(updates, clip)
    draws = user_dp.gaussian_release(total, noise_std=sigma * clip, expected_cohort=expected, generator=gen)
    measured = float((draws - total / expected).std())
    assert measured == pytest.approx(sigma * clip / expected, rel=0.02)
    if replies < expected:
        assert abs(measured - sigma * clip / replies) > 0.1 * sigma * clip / replies


def test_a_round_below_min_cohort_fails_naming_round_and_count():
    user_dp.check_cohort(5, 5, 3)
    with pytest.raises(FedsimError, match=r"round 7: 4 client update\(s\).*min_cohort = 5"):
        user_dp.check_cohort(4, 5, 7)


# ----------------------------------------------------------------------------- adaptive clipping

def test_update_noise_multiplier_closed_form_and_its_range():
    # 1/z^2 = 1/z_delta^2 + 1/(2 sigma_b)^2
    assert user_dp.update_noise_multiplier(1.0, 1.0) == pytest.approx((1 - 0.25) ** -0.5)
    z, sb = 0.8, 2.5
    zd = user_dp.update_noise_multiplier(z, sb)
    assert 1 / zd ** 2 + 1 / (2 * sb) ** 2 == pytest.approx(1 / z ** 2)
    with pytest.raises(ConfigError, match="user_clip_count_noise.*> user_noise_multiplier / 2 = 0.5"):
        user_dp.update_noise_multiplier(1.0, 0.5)


def test_update_and_count_release_together_cost_what_z_costs_in_dp_accounting():
    """Andrew et al. 2021, checked with dp-accounting: the update (sensitivity C, noise
    z_Delta C) and the centered count (sensitivity 1/2, noise sigma_b, i.e. multiplier 2 sigma_b),
    Poisson-sampled together for 40 rounds, cost the epsilon of one Gaussian at z."""
    z, sb, q, rounds = 1.0, 0.9, 0.2, 40
    zd = user_dp.update_noise_multiplier(z, sb)
    both = RdpAccountant()
    both.compose(dpa.PoissonSampledDpEvent(q, dpa.ComposedDpEvent(
        [dpa.GaussianDpEvent(zd), dpa.GaussianDpEvent(2 * sb)])), rounds)
    one = RdpAccountant()
    one.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), rounds)
    # the composed pair inside one sampling event is exactly a Gaussian of z (same Renyi curve)
    assert both.get_epsilon(1e-5) == pytest.approx(one.get_epsilon(1e-5), rel=1e-9)


def test_noised_unclipped_fraction_without_noise_is_the_fraction():
    norms = torch.tensor([0.5, 1.0, 1.5, 3.0])
    assert user_dp.noised_unclipped_fraction(norms <= 1.0, count_noise=0, expected_cohort=4) == 0.5
    assert user_dp.noised_unclipped_fraction(norms <= 1.0, count_noise=0, expected_cohort=8) == 0.5 + (2 - 2) / 8
    # the fixed denominator again: 3 of an expected 8 within the clip, 1 not: (3 - 2) / 8 + 1/2
    assert user_dp.noised_unclipped_fraction(norms <= 1.6, count_noise=0, expected_cohort=8) == 0.625
    assert user_dp.next_clip(2.0, 0.5, target_quantile=0.5, lr=0.2) == 2.0
    assert user_dp.next_clip(2.0, 1.0, target_quantile=0.5, lr=0.2) == pytest.approx(2.0 * math.exp(-0.1))


@pytest.mark.parametrize("quantile", [0.5, 0.9])
def test_adaptive_clip_converges_to_the_target_quantile(quantile):
    """Norms ~ Uniform(0, 2): the gamma-quantile is 2 gamma. With count noise K/20 (the paper's
    choice) the geometric update settles around it from a start 20x too small."""
    gen = torch.Generator().manual_seed(1)
    clip, cohort, history = 0.05, 100, []
    for _ in range(400):
        norms = 2 * torch.rand(cohort, generator=gen, dtype=torch.float64)
        fraction = user_dp.noised_unclipped_fraction(norms <= clip, count_noise=cohort / 20, expected_cohort=cohort,
                                                     generator=gen)
        clip = user_dp.next_clip(clip, fraction, target_quantile=quantile, lr=0.2)
        history.append(clip)
    assert np.mean(history[-200:]) == pytest.approx(2 * quantile, rel=0.05)


# ----------------------------------------------------------------------------- noise cohort

def test_noise_cohort_size_gives_the_mean_the_noise_of_a_cohort_of_m():
    sigma, clip, trained, simulated = 1.0, 1.0, 10, 1000
    scale = user_dp.cohort_noise_scale(trained, simulated)
    assert scale == pytest.approx(0.01) and user_dp.cohort_noise_scale(trained, 0) == 1.0
    gen = torch.Generator().manual_seed(0)
    total = torch.zeros(200_000, dtype=torch.float64)
    draws = user_dp.gaussian_release(total, noise_std=sigma * clip * scale, expected_cohort=trained, generator=gen)
    assert float(draws.std()) == pytest.approx(sigma * clip / simulated, rel=0.01)


# ----------------------------------------------------------------------------- tree aggregation

def test_tree_nodes_are_the_binary_decomposition_of_the_prefix():
    assert user_dp.tree_nodes(0) == []
    assert user_dp.tree_nodes(1) == [(0, 0)]
    assert user_dp.tree_nodes(5) == [(2, 0), (0, 4)]  # steps 1-4, 5
    assert user_dp.tree_nodes(6) == [(2, 0), (1, 2)]  # steps 1-4, 5-6
    assert user_dp.tree_nodes(7) == [(2, 0), (1, 2), (0, 6)]
    for t in range(1, 70):
        covered = sorted(s for level, j in user_dp.tree_nodes(t) for s in range(j * 2 ** level + 1,
                                                                                 (j + 1) * 2 ** level + 1))
        assert covered == list(range(1, t + 1)) and len(user_dp.tree_nodes(t)) == bin(t).count("1")


def test_tree_round_noises_add_up_to_each_prefix_with_the_std_of_the_analysis():
    """Kairouz et al. 2021: the noise of prefix t is the sum of popcount(t) node draws, so its
    std is sigma C sqrt(popcount(t)); the released residuals telescope to exactly that."""
    std, size, steps = 0.5, 40_000, 12

    def node_noise(level: int, index: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1000 * level + index)
        return std * torch.randn(size, generator=gen, dtype=torch.float64)

    prefix = torch.zeros(size, dtype=torch.float64)
    for t in range(1, steps + 1):
        prefix = prefix + user_dp.tree_round_noise(t, node_noise)
        direct = sum(node_noise(*node) for node in user_dp.tree_nodes(t))
        torch.testing.assert_close(prefix, direct, rtol=0, atol=1e-12)
        assert float(prefix.std()) == pytest.approx(std * math.sqrt(bin(t).count("1")), rel=0.03)


def test_tree_position_with_restarts():
    assert [user_dp.tree_position(r, 0) for r in (1, 5)] == [(0, 1), (0, 5)]
    assert [user_dp.tree_position(r, 4) for r in (1, 4, 5, 8, 9)] == [(0, 1), (0, 4), (1, 1), (1, 4), (2, 1)]


# ----------------------------------------------------------------------------- the layer on a round

G0 = {"w": np.array([1.0, -1.0, 0.0], np.float32), "b": np.array([0.5], np.float32)}
MODELS = [{"w": [4.0, 3.0, 0.0], "b": [0.5]},     # update norm 5: clipped
          {"w": [1.2, -1.0, 0.1], "b": [0.4]},     # small: kept
          {"w": [-2.0, -1.0, 1.0], "b": [2.5]},    # norm 4.24: clipped
          {"w": [1.0, -1.0, 0.0], "b": [0.5]}]     # no update


def _replies(flower, models=MODELS, extra=None):
    out = []
    for i, model in enumerate(models):
        content = RecordDict({
            R.ARRAYS: R.numpy_to_record({k: np.asarray(v, np.float32) for k, v in model.items()}),
            R.METRICS: MetricRecord({R.NUM_EXAMPLES: 10 + i, R.UNIT_WEIGHT: 1.0, R.TRAIN_LOSS: float(i)})})
        if extra is not None:
            content[R.ALGORITHM_ARRAYS] = R.numpy_to_record({k: np.asarray(v, np.float32) for k, v in extra[i].items()})
        out.append(flower.reply(content, node_id=1000 + i))
    return out


def _round(strategy, flower, replies, server_round=1, arrays=G0):
    list(strategy.configure_train(server_round, R.numpy_to_record(arrays), ConfigRecord(), flower.grid(4)))
    out, metrics = strategy.aggregate_train(server_round, replies)
    return R.record_to_numpy(out), metrics


def _fedavg():
    return FedAvg(fraction_train=1.0, min_train_nodes=4, min_available_nodes=4, fraction_evaluate=0.0,
                  min_evaluate_nodes=0, weighted_by_key=R.UNIT_WEIGHT)


def test_fixed_clipping_at_noise_zero_equals_flowers_wrapper(flower):
    # Flower divides by the norm of a zero update (ZeroDivisionError); the layer keeps it as 0
    models = MODELS[:3] + [{"w": [1.0, -1.0, 0.25], "b": [0.5]}]
    ours, _ = _round(CentralDP(_fedavg(), noise_multiplier=0.0, clip=1.5, expected_cohort=4, seed=0), flower,
                     _replies(flower, models))
    theirs, _ = _round(DifferentialPrivacyServerSideFixedClipping(_fedavg(), noise_multiplier=0.0, clipping_norm=1.5,
                                                                  num_sampled_clients=4), flower,
                       _replies(flower, models))
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-6, atol=1e-7)
    # and it did clip: the plain mean differs
    plain, _ = _round(_fedavg(), flower, _replies(flower, models))
    assert not np.allclose(plain["w"], ours["w"])


def test_the_layer_divides_by_the_expected_cohort_and_keeps_real_metrics(flower):
    strategy = CentralDP(_fedavg(), noise_multiplier=0.0, clip=100.0, expected_cohort=8, seed=0)
    out, metrics = _round(strategy, flower, _replies(flower))
    deltas = np.array([np.concatenate([np.asarray(m["w"]) - G0["w"], np.asarray(m["b"]) - G0["b"]]) for m in MODELS])
    expected = deltas.sum(0) / 8  # 4 replies of an expected 8: the fixed denominator
    np.testing.assert_allclose(out["w"], G0["w"] + expected[:3], rtol=1e-6)
    np.testing.assert_allclose(out["b"], G0["b"] + expected[3:], rtol=1e-6)
    assert metrics[R.TRAIN_LOSS] == pytest.approx(1.5)  # the mean of the real replies' 0, 1, 2, 3


def test_the_layer_is_bit_identical_for_the_same_updates_and_seed(flower):
    def run(seed):
        strategy = CentralDP(_fedavg(), noise_multiplier=1.0, clip=1.0, expected_cohort=4, seed=seed,
                             target_quantile=0.5, count_noise=1.0)
        out, _ = _round(strategy, flower, _replies(flower), server_round=3)
        return {k: v.tobytes() for k, v in out.items()}, strategy.clip

    assert run(7) == run(7)
    assert run(7)[0] != run(8)[0]


def test_the_release_does_not_depend_on_the_order_replies_arrive_in(flower):
    """Ray and a deployment deliver replies as they come: the layer sums them in partition order."""
    models = [{"w": np.random.default_rng(i).normal(size=3).astype(np.float32) * 1e3, "b": [0.1 * i]}
              for i in range(4)]

    def run(order):
        strategy = CentralDP(_fedavg(), noise_multiplier=1.0, clip=1e3, expected_cohort=4, seed=1)
        replies = _replies(flower, models)
        for reply, i in zip(replies, range(4)):
            reply.content[R.METRICS][R.PARTITION_ID] = i
        out, _ = _round(strategy, flower, [replies[i] for i in order])
        return {k: v.tobytes() for k, v in out.items()}

    assert run([0, 1, 2, 3]) == run([3, 1, 0, 2]) == run([2, 3, 1, 0])


def test_the_release_has_the_configured_noise_std(flower):
    """Over many rounds at a clip no update reaches, the released mean minus the true mean has
    std z_Delta C / (qN), z_Delta the adaptive update multiplier (measured)."""
    strategy = CentralDP(_fedavg(), noise_multiplier=1.0, clip=50.0, expected_cohort=4, seed=0,
                         target_quantile=0.5, clip_lr=1e-9, count_noise=2.0)
    stack = torch.zeros(4, 20_000, dtype=torch.float64)
    draws = torch.stack([strategy.release(stack, r) for r in range(1, 6)])
    want = user_dp.update_noise_multiplier(1.0, 2.0) * 50.0 / 4
    assert float(draws.std()) == pytest.approx(want, rel=0.02)


def test_min_cohort_fails_the_round(flower):
    strategy = CentralDP(_fedavg(), noise_multiplier=1.0, clip=1.0, expected_cohort=4, seed=0, min_cohort=4)
    list(strategy.configure_train(2, R.numpy_to_record(G0), ConfigRecord(), flower.grid(4)))
    replies = _replies(flower)[:3] + [flower.error_reply()]
    with pytest.raises(FedsimError, match="round 2: 3 client update"):
        strategy.aggregate_train(2, replies)


def test_scaffold_control_variates_share_the_sensitivity_and_are_summed(flower):
    """Both arrays of a SCAFFOLD reply are one update of one client: clipped together. The
    model steps on the mean, c on the sum over N (the strategy's own c <- c + sum/N)."""
    models = [{"w": [4.0, -1.0, 0.0], "b": [0.5]}, {"w": [1.0, -1.0, 0.0], "b": [0.5]}]
    extra = [{"w": [0.0, 4.0, 0.0], "b": [0.0]}, {"w": [0.0, 0.0, 0.0], "b": [0.1]}]
    inner = Scaffold(global_lr=1.0, num_clients=10, fraction_train=1.0, min_train_nodes=2, min_available_nodes=2,
                     fraction_evaluate=0.0, min_evaluate_nodes=0, weighted_by_key=R.UNIT_WEIGHT)
    out, _ = _round(CentralDP(inner, noise_multiplier=0.0, clip=1.0, expected_cohort=2, seed=0), flower,
                    _replies(flower, models, extra))
    # client 0: model delta (3, 0, 0, 0), c delta (0, 4, 0, 0): joint norm 5, factor 0.2
    np.testing.assert_allclose(out["w"], G0["w"] + np.array([0.6, 0, 0]) / 2, rtol=1e-6)
    np.testing.assert_allclose(inner.control["w"], np.array([0, 0.8, 0]) / 10, rtol=1e-6)
    np.testing.assert_allclose(inner.control["b"], np.array([0.1]) / 10, rtol=1e-6)


def test_fedadam_steps_on_the_released_mean(flower):
    """The layer hands FedAdam one reply at the released mean: the same step as FedAdam
    given that mean directly."""
    def adam():
        return FedAdam(eta=0.1, eta_l=0.1, fraction_train=1.0, min_train_nodes=1, min_available_nodes=1,
                       fraction_evaluate=0.0, min_evaluate_nodes=0, weighted_by_key=R.UNIT_WEIGHT)

    strategy = CentralDP(adam(), noise_multiplier=0.7, clip=1.0, expected_cohort=4, seed=3)
    out, _ = _round(strategy, flower, _replies(flower), server_round=2)
    list(strategy.configure_train(2, R.numpy_to_record(G0), ConfigRecord(), flower.grid(4)))
    stack, layout = strategy._stack([R.plain(r.content) for r in _replies(flower)])
    twin = CentralDP(adam(), noise_multiplier=0.7, clip=1.0, expected_cohort=4, seed=3)
    released = user_dp.unflatten_update(twin.release(torch.from_numpy(stack), 2), layout)
    direct, _ = _round(adam(), flower, _replies(flower, [{k: G0[k] + released[f"arrays/{k}"].numpy() for k in G0}]),
                       server_round=2)
    for k in G0:
        np.testing.assert_array_equal(out[k], direct[k])


def test_the_adaptive_clip_is_checkpointed_with_the_inner_state(flower):
    strategy = CentralDP(_fedavg(), noise_multiplier=1.0, clip=1.0, expected_cohort=4, seed=0,
                         target_quantile=0.5, count_noise=1.0)
    _round(strategy, flower, _replies(flower))
    assert strategy.clip != 1.0
    state = strategy_state(strategy)
    fresh = CentralDP(_fedavg(), noise_multiplier=1.0, clip=1.0, expected_cohort=4, seed=0,
                      target_quantile=0.5, count_noise=1.0)
    load_strategy_state(fresh, state)
    assert fresh.clip == strategy.clip


@pytest.mark.parametrize("name, why", [("fedld", "depends on each reply"), ("bags", "label-DP")])
def test_fedld_and_bags_are_refused_with_their_reason(tiny, name, why):
    with pytest.raises(ConfigError, match=f"central DP does not apply to strategy '{name}'.*{why}"):
        build_strategy(tiny(**{"strategy.name": name, "privacy.user_noise_multiplier": 1.0}))


@pytest.mark.parametrize("overrides, match", [
    ({"privacy.min_cohort": 4}, "privacy.min_cohort: must be <= federation.clients_per_round"),
    ({"privacy.noise_cohort_size": 2}, "privacy.noise_cohort_size: must be 0"),
    ({"privacy.user_clip_quantile": 0.5, "privacy.user_mechanism": "tree"}, "privacy.user_clip_quantile"),
    ({"privacy.user_clip_quantile": 0.5}, r"user_clip_count_noise: must be > .* got 0.15 \(clients_per_round / 20"),
    ({"privacy.user_clip_quantile": 0.5, "privacy.user_clip_count_noise": 0.4}, "user_clip_count_noise"),
])
def test_inconsistent_user_dp_settings_are_refused(tiny, overrides, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**{"privacy.user_noise_multiplier": 1.0, **overrides})


def test_fedsvd_privatizes_the_b_it_trained_from_the_refactorized_b_it_sent(flower):
    """FedSVD refactorizes B A before sending (round 2 on): the update is the reply's B minus
    the B the round SENT, A is not uploaded and stays as sent, and B A moves by the clipped
    mean update only."""
    from fedsim.strategies.fedsvd import FedSVD

    rng = np.random.default_rng(0)
    start = {"l.lora_A.w": rng.normal(size=(2, 4)).astype(np.float32),
             "l.lora_B.w": rng.normal(size=(3, 2)).astype(np.float32)}
    inner = FedSVD(fraction_train=1.0, min_train_nodes=2, min_available_nodes=2, fraction_evaluate=0.0,
                   min_evaluate_nodes=0, weighted_by_key=R.UNIT_WEIGHT)
    strategy = CentralDP(inner, noise_multiplier=0.0, clip=1.0, expected_cohort=2, seed=0)
    sent = list(strategy.configure_train(2, R.numpy_to_record(start), ConfigRecord(), flower.grid(2)))
    sent_arrays = R.record_to_numpy(sent[0].content[R.ARRAYS])
    assert not np.allclose(sent_arrays["l.lora_B.w"], start["l.lora_B.w"])  # refactorized
    deltas = [np.full((3, 2), 1.0, np.float32), np.full((3, 2), 0.1, np.float32)]  # norms 2.45 and 0.245
    replies = [flower.reply(RecordDict({
        R.ARRAYS: R.numpy_to_record({"l.lora_B.w": sent_arrays["l.lora_B.w"] + d}),
        R.METRICS: MetricRecord({R.UNIT_WEIGHT: 1.0, R.NUM_EXAMPLES: 5})}), node_id=1000 + i)
        for i, d in enumerate(deltas)]
    out, _ = strategy.aggregate_train(2, replies)
    out = R.record_to_numpy(out)
    mean = (deltas[0] / np.sqrt(6.0) + deltas[1]) / 2
    np.testing.assert_allclose(out["l.lora_B.w"], sent_arrays["l.lora_B.w"] + mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["l.lora_A.w"], sent_arrays["l.lora_A.w"])


def test_the_epsilon_is_stated_for_z_and_the_simulated_cohort(tiny):
    """Adaptive clipping: the accountant gets z (not z_Delta). Cohort noise: the deployment of
    M clients a round at the same rate K/N, from a population of N M / K."""
    from fedsim.central_dp import user_epsilon
    from fedsim.privacy.accounting import accounted_cohort

    assert accounted_cohort(20, 10, 0) == (20, 10) and accounted_cohort(20, 10, 1000) == (2000, 1000)
    cfg = tiny(**{"privacy.user_noise_multiplier": 1.2, "privacy.user_clip_quantile": 0.5,
                  "privacy.user_clip_count_noise": 2.0, "federation.num_clients": 6,
                  "federation.clients_per_round": 3})
    reference = RdpAccountant()
    reference.compose(dpa.PoissonSampledDpEvent(0.5, dpa.GaussianDpEvent(1.2)), 7)
    assert user_epsilon(cfg, 7) == pytest.approx(reference.get_epsilon(1e-5), rel=0.01)
    assert user_epsilon(tiny(), 7) is None


# ----------------------------------------------------------------------------- client-side clipping

def test_a_client_clips_its_own_update_jointly_over_everything_it_uploads(flower):
    from fedsim.privacy.client_clipping import clip_own_update

    sent = RecordDict({R.ARRAYS: R.numpy_to_record({"w": np.array([1.0, 1.0], np.float32)}),
                       R.CONFIG: ConfigRecord({R.USER_CLIP: 2.5})})
    reply = RecordDict({R.ARRAYS: R.numpy_to_record({"w": np.array([4.0, 1.0], np.float32)}),  # update (3, 0)
                        R.ALGORITHM_ARRAYS: R.numpy_to_record({"w": np.array([0.0, 4.0], np.float32)}),
                        R.METRICS: MetricRecord({R.UNIT_WEIGHT: 1.0})})
    clip_own_update(reply, sent)  # joint norm 5 > 2.5: factor 0.5
    np.testing.assert_allclose(R.record_to_numpy(reply[R.ARRAYS])["w"], [2.5, 1.0])
    np.testing.assert_allclose(R.record_to_numpy(reply[R.ALGORITHM_ARRAYS])["w"], [0.0, 2.0])
    assert reply[R.METRICS][R.USER_UNCLIPPED] == 0.0
    untouched = RecordDict({R.ARRAYS: R.numpy_to_record({"w": np.array([4.0, 1.0], np.float32)}),
                            R.METRICS: MetricRecord({R.UNIT_WEIGHT: 1.0})})
    clip_own_update(untouched, RecordDict({R.ARRAYS: sent[R.ARRAYS], R.CONFIG: ConfigRecord({})}))
    assert R.record_to_numpy(untouched[R.ARRAYS])["w"].tolist() == [4.0, 1.0]
    assert R.USER_UNCLIPPED not in untouched[R.METRICS]


def test_client_side_clipping_releases_what_server_side_clipping_does(flower):
    """The same updates, clipped by each client (which also report b_i) or by the server: the
    same release and the same adaptive clip trajectory, up to float rounding."""
    from fedsim.privacy.client_clipping import clip_own_update

    def layer(by_clients):
        return CentralDP(_fedavg(), noise_multiplier=1.0, clip=1.5, expected_cohort=4, seed=5,
                         target_quantile=0.5, count_noise=1.0, clipped_by_clients=by_clients)

    server, client = layer(False), layer(True)
    arrays = G0
    for rnd in (1, 2, 3):
        out_s, _ = _round(server, flower, _replies(flower), rnd, arrays)
        clip_before = client.clip
        sent = list(client.configure_train(rnd, R.numpy_to_record(arrays), ConfigRecord(), flower.grid(4)))
        assert sent[0].content[R.CONFIG][R.USER_CLIP] == clip_before  # the clients clip at this round's clip
        replies = _replies(flower)
        for reply in replies:
            clip_own_update(reply.content, sent[0].content)
        out_c, _ = client.aggregate_train(rnd, replies)
        out_c = R.record_to_numpy(out_c)
        for k in out_s:
            np.testing.assert_allclose(out_c[k], out_s[k], rtol=1e-5, atol=1e-6)
        assert client.clip == pytest.approx(server.clip, rel=1e-12)
