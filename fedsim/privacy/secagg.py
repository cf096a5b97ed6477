"""Secure aggregation: what a client hands Flower's SecAgg+ protocol, and the bounds on it.

SecAgg+ (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
CCS 2020; Flower's ``secaggplus_mod`` / ``SecAggPlusWorkflow``) lets the server learn the sum
of the clients' vectors and nothing else about any one of them, as long as no more than the
threshold's complement of a node's share holders collude or drop out. fedsim writes no crypto:
this module only decides what each client contributes, and says what the quantization costs.

A client's contribution is its update, not its model: every array it uploads minus the array
the round sent (and uplink-only arrays, SCAFFOLD's delta c_i, as they are), so that every
coordinate is bounded by the user-level clip C when the client clipped (``user-clip``) and
Flower's per-coordinate quantization range can be set from C. Under user-level DP the client
adds its noise share N(0, sigma^2 C^2 / K) to it (distributed DP, as in Kairouz et al., "The
Distributed Discrete Gaussian Mechanism", ICML 2021, with the continuous Gaussian): K clients'
shares sum to N(0, sigma^2 C^2), the noise of central DP-FedAvg, and the server only ever holds
the noised sum. A deployment draws the share from the operating system's entropy, never from
the experiment seed, which the server knows.

Quantization (Flower's ``quantize``): each coordinate x is clipped to [-r, r] and mapped to
(x + r) Q / (2r), rounded stochastically to an integer: an error below one step 2r/Q. With
every client at weight 1 (fedsim's secure aggregation weighs clients equally) the server's
dequantized mean of K' vectors is off by the mean of K' such errors, so by less than 2r/Q per
coordinate (`quantization_error_bound`), provided no coordinate exceeded r and the sum of
quantized values, at most K' Q, stays below the modulus M (fedsim's config refuses
``clients_per_round * quantization_range >= modulus``).
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedsim import records as R

NOISE_STD = "secagg-noise-std"  # train config: the std of each client's noise share
LAYOUT = "fedsim-secagg-layout"  # fit metrics: the names and shapes of the contributed arrays
NOISE_SIGMAS = 6.0  # the automatic clipping range leaves this many share stds above the clip


def noise_share_std(noise_multiplier: float, clip: float, expected_cohort: float) -> float:
    """sigma C / sqrt(K): the std of one client's share, so that K shares sum to sigma C."""
    return noise_multiplier * clip / math.sqrt(expected_cohort) if noise_multiplier > 0 else 0.0


def clipping_range(configured: float, noise_multiplier: float, clip: float, expected_cohort: float,
                   user_dp: bool) -> float:
    """r, the per-coordinate range SecAgg+ quantizes in. 0 configured: under user-level DP the
    clip plus `NOISE_SIGMAS` share stds (a clipped update has no coordinate above C, and a
    Gaussian coordinate exceeds 6 stds with probability 2e-9), else Flower's default 8."""
    if configured > 0:
        return float(configured)
    if user_dp:
        return clip + NOISE_SIGMAS * noise_share_std(noise_multiplier, clip, expected_cohort)
    return 8.0


def quantization_error_bound(clip_range: float, quantization_range: int) -> float:
    """The largest error of one coordinate of the dequantized mean (weights 1): one step 2r/Q."""
    return 2.0 * clip_range / quantization_range


Layout = list[tuple[str, tuple[int, ...], str]]  # ("record/key", shape, dtype) of each contributed array


def contribution(reply: dict, sent: dict[str, np.ndarray]) -> tuple[list[np.ndarray], Layout]:
    """A client's vector as float64 arrays and their layout: its uploaded model arrays minus
    those the round sent (`sent`, named arrays), then its uplink-only arrays
    (`records.ALGORITHM_ARRAYS`) as they are. `reply` is a plain dict of records (`records.plain`)."""
    vectors, layout = [], []
    for k, v in R.plain(reply[R.ARRAYS]).items():
        value = R.from_array(v)
        vectors.append(value.astype(np.float64) - np.asarray(sent[k], dtype=np.float64))
        layout.append((f"{R.ARRAYS}/{k}", tuple(value.shape), value.dtype.str))
    if R.ALGORITHM_ARRAYS in reply:
        for k, v in R.plain(reply[R.ALGORITHM_ARRAYS]).items():
            value = R.from_array(v)
            vectors.append(value.astype(np.float64))
            layout.append((f"{R.ALGORITHM_ARRAYS}/{k}", tuple(value.shape), value.dtype.str))
    return vectors, layout


def layout_text(layout: Layout) -> str:
    return json.dumps([[name, list(shape), dtype] for name, shape, dtype in layout])


def parse_layout(text: str) -> Layout:
    return [(name, tuple(shape), dtype) for name, shape, dtype in json.loads(text)]


def fit_content(reply: RecordDict, instruction: RecordDict, rng: np.random.Generator) -> RecordDict:
    """fedsim's train reply in the legacy fit layout that ``secaggplus_mod`` reads
    (`compat.fitres_to_recorddict`): the update vector with this client's noise share added (the
    std the round's config names; none without it), weight 1, the metrics in the clear."""
    content = R.plain(reply)
    vectors, layout = contribution(content, R.record_to_numpy(instruction[R.ARRAYS]))
    config = R.record_of(instruction, R.CONFIG, ConfigRecord)
    std = float(R.plain(config).get(NOISE_STD, 0.0)) if config is not None else 0.0
    if std > 0:
        vectors = [a + rng.normal(0.0, std, a.shape) for a in vectors]
    metrics = {**R.plain(content[R.METRICS]), LAYOUT: layout_text(layout)}
    fitres = FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters(vectors),
                    num_examples=1, metrics=metrics)
    return compat.fitres_to_recorddict(fitres, keep_input=True)


def secagg_mod(msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message],
               rng: np.random.Generator | None = None) -> Message:
    """The ClientApp's train mod: a train message of Flower's SecAgg+ protocol (it carries the
    protocol's config record) goes through ``secaggplus_mod``, with fedsim's reply turned into
    the fit layout and noised (`fit_content`); any other message passes untouched, so one
    ClientApp serves runs with and without secure aggregation. The noise share comes from the
    operating system's entropy unless `rng` is given (tests)."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content:
        return call_next(msg, ctxt)

    def train_in_fit_layout(inner: Message, context: Context) -> Message:
        reply = call_next(inner, context)
        if reply.has_error():
            raise RuntimeError(f"secure aggregation: training failed: {reply.error.reason}")
        share_rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
        return Message(fit_content(reply.content, inner.content, share_rng), reply_to=inner)

    return secaggplus_mod(msg, ctxt, train_in_fit_layout)


def unflatten(vectors: list[np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
    """The protocol's list of arrays back as named float64 arrays ("record/key"), checked
    against the layout."""
    if len(vectors) != len(layout):
        raise ValueError(f"secure aggregation: {len(vectors)} aggregated arrays, the layout names {len(layout)}")
    out = {}
    for (name, shape, _), value in zip(layout, vectors):
        if tuple(value.shape) != shape:
            raise ValueError(f"secure aggregation: aggregated {name!r} has shape {value.shape}, expected {shape}")
        out[name] = np.asarray(value, dtype=np.float64)
    return out
