"""pfl-research's side of `benchmarks/peers.py`: runs in pfl's own interpreter, never fedsim's.

pfl 0.6.0 pins dp-accounting < 0.6 and fedsim needs >= 0.6, so the two cannot share one
environment; `peers.py` starts this file with the interpreter of a separate venv (its
docstring has the command) and keeps it running: one warm process, as fedsim's side is one
warm process, so that neither pays its imports inside a timed run.

Protocol: one JSON request a line on stdin, ``{"inputs": NPZ, "rounds": R}``; one line back on
the protocol stream, ``RESULT {...}``. pfl's own platform prints every iteration's metrics to
``sys.stdout``; that stays pfl's default path (the formatting is part of its run), written to
the null device, so the protocol stream is a duplicate of the original stdout.

Everything a run does is pfl's public API: `FederatedDataset.from_slices` over fedsim's
partition, `MinimizeReuseUserSampler` over fedsim's schedule (it cycles through a list of user
ids, so the list of every round's cohort in order makes pfl draw exactly those users),
`SimulatedBackend`, `FederatedAveraging`, `WeightByDatapoints` (FedAvg's weights) or
`WeightByUser` plus `CentrallyAppliedPrivacyMechanism(GaussianMechanism(C, sigma))` (central
DP with fixed clipping: clip each user's update to C, sum, add N(0, (sigma C)^2), divide by
the cohort, as fedsim's `fedsim.central_dp` does under fixed sampling), `CentralEvaluationCallback`
on the test split every round (fedsim evaluates centrally every round too).

This module imports neither pfl nor torch at the top, so that fedsim's tests can check the
decoding helpers (`user_slices`, `cohorts`) without pfl installed.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def user_slices(rows: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    """Each user's training-row indices: user i holds rows[offsets[i]:offsets[i + 1]]."""
    return [rows[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def cohorts(schedule: np.ndarray, rounds: int) -> list[list[int]]:
    """The user ids of rounds 1..rounds (schedule row r - 1)."""
    return [[int(u) for u in row] for row in schedule[:rounds]]


def run(inputs: dict, rounds: int) -> dict:
    """One pfl run of `rounds` rounds on these inputs (`peers.pfl_inputs`); its timings, final
    accuracy, and what it trained each round (user ids, pfl's own counts of users and points)."""
    import torch
    from pfl.aggregate.base import get_num_datapoints_weight_name, get_num_devices_weight_name
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByDatapoints, WeightByUser
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.common_types import Population
    from pfl.callback.central_evaluation import CentralEvaluationCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import MinimizeReuseUserSampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics, Weighted
    from pfl.model.pytorch import PyTorchModel
    from pfl.postprocessor.base import Postprocessor
    from pfl.privacy import CentrallyAppliedPrivacyMechanism, GaussianMechanism

    start = time.perf_counter()
    seed = int(inputs["seed"])
    np.random.seed(seed)
    torch.manual_seed(seed)
    x_train, y_train = torch.as_tensor(inputs["x_train"]), torch.as_tensor(inputs["y_train"])
    users = user_slices(inputs["user_rows"], inputs["user_offsets"])
    per_round = cohorts(inputs["schedule"], rounds)
    data = {u: [x_train[idx], y_train[idx]] for u, idx in enumerate(users)}
    sampler = MinimizeReuseUserSampler([u for cohort in per_round for u in cohort])
    train = FederatedDataset.from_slices(data, sampler)
    test = Dataset((torch.as_tensor(inputs["x_test"]), torch.as_tensor(inputs["y_test"])))

    class Net(torch.nn.Sequential):
        """fedsim's MLP (`fedsim.models.mlp`), with the two methods pfl's PyTorchModel needs."""

        def loss(self, x, y):
            self.train()
            return torch.nn.functional.cross_entropy(self(x), y)

        @torch.no_grad()
        def metrics(self, x, y):
            self.eval()
            logits = self(x)
            n = len(y)
            return {"loss": Weighted(torch.nn.functional.cross_entropy(logits, y, reduction="sum").item(), n),
                    "accuracy": Weighted((logits.argmax(1) == y).sum().item(), n)}

    weights = [inputs[k] for k in sorted((k for k in inputs if k.startswith("param_")),
                                          key=lambda k: int(k.split("_")[1]))]
    layers: list[torch.nn.Module] = [torch.nn.Flatten()]
    for w in weights[0::2]:
        layers += [torch.nn.Linear(w.shape[1], w.shape[0]), torch.nn.ReLU()]
    net = Net(*layers[:-1])
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():  # fedsim's initial weights: the same starting point
        for m, w, b in zip(linears, weights[0::2], weights[1::2]):
            m.weight.copy_(torch.as_tensor(w))
            m.bias.copy_(torch.as_tensor(b))
    model = PyTorchModel(model=net, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))

    sigma, clip = float(inputs["user_noise_multiplier"]), float(inputs["user_clip"])
    seen: list[list[int]] = []

    class Record(Postprocessor):
        """Which users the backend trained, in order (pfl hands each one's id to postprocessors)."""

        def postprocess_one_user_metrics(self, *, user_context):
            seen[-1].append(int(user_context.user_id))
            return Metrics()

    timing = {"loop": 0.0, "lap": 0.0}
    counts: list[tuple[int, int]] = []
    final: dict[str, float] = {}

    class LapStart(TrainingProcessCallback):
        """Last in the callback list: the next round's training starts after it."""

        def on_train_begin(self, *, model):
            timing["lap"] = time.perf_counter()
            seen.append([])
            return Metrics()

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            timing["lap"] = time.perf_counter()
            seen.append([])
            return False, Metrics()

    class LapEnd(TrainingProcessCallback):
        """First in the callback list: the round's training (sampling, local training,
        postprocessors, aggregation, the server's update) has just finished. Reads pfl's own
        count of the round's users and data points."""

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            timing["loop"] += time.perf_counter() - timing["lap"]
            devices = aggregate_metrics[get_num_devices_weight_name(Population.TRAIN)]
            points = aggregate_metrics[get_num_datapoints_weight_name(Population.TRAIN)]  # Weighted(sum, users)
            counts.append((int(getattr(devices, "weighted_value", devices)), int(points.weighted_value)))
            return False, Metrics()

    class Final(TrainingProcessCallback):
        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            final.update({k: float(v) for k, v in aggregate_metrics.to_simple_dict().items()
                          if k.startswith("Central val")})
            return False, Metrics()

    postprocessors: list[Postprocessor] = [Record()]
    if sigma > 0:
        postprocessors += [WeightByUser(), CentrallyAppliedPrivacyMechanism(GaussianMechanism(clip, sigma))]
    else:
        postprocessors.append(WeightByDatapoints())
    backend = SimulatedBackend(training_data=train, val_data=None, postprocessors=postprocessors)
    cohort = len(per_round[0])
    # evaluation_frequency only governs the users' own before/after metrics, which pfl takes
    # in iteration 0 whatever the frequency; central evaluation is the callback's.
    params = NNAlgorithmParams(central_num_iterations=rounds, evaluation_frequency=rounds + 1,
                               train_cohort_size=cohort, val_cohort_size=0)
    train_params = NNTrainHyperParams(local_num_epochs=int(inputs["local_epochs"]),
                                      local_learning_rate=float(inputs["lr"]),
                                      local_batch_size=int(inputs["batch_size"]))
    callbacks = [LapEnd(), CentralEvaluationCallback(test, NNEvalHyperParams(local_batch_size=None)), Final(),
                 LapStart()]
    FederatedAveraging().run(algorithm_params=params, backend=backend, model=model,
                             model_train_params=train_params, model_eval_params=NNEvalHyperParams(None),
                             callbacks=callbacks)
    e2e = time.perf_counter() - start
    return {"e2e_s": e2e, "loop_s": timing["loop"], "users": [sorted(s) for s in seen[:rounds]],
            "counts": counts, "accuracy": final.get("Central val | accuracy"),
            "pfl_version": _version()}


def _version() -> str:
    from importlib.metadata import version

    return version("pfl")


def main() -> None:
    pfl_version = _version()  # first: an interpreter without pfl fails before importing torch
    import torch

    torch.set_num_threads(int(os.environ.get("PEERS_TORCH_THREADS", "1")))
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = open(os.devnull, "w")  # pfl's platform prints each iteration's metrics here
    import logging

    logging.getLogger("pfl").setLevel(logging.WARNING)
    print("READY " + json.dumps({"pfl_version": pfl_version, "torch": torch.__version__}), file=protocol, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        with np.load(request["inputs"]) as npz:
            inputs = dict(npz)
        result = run(inputs, int(request["rounds"]))
        print("RESULT " + json.dumps(result), file=protocol, flush=True)


if __name__ == "__main__":
    main()
