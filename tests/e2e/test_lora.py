"""LoRA strategies end to end: what clients may change in a run, FedSVD against FFA-LoRA,
LoRA on a user's own model."""

from __future__ import annotations

import numpy as np
import torch

from fedsim import records as R
from fedsim.datasets import load_dataset
from fedsim.lora import lora_layers
from fedsim.models import build_model


def test_a_is_never_changed_by_a_client_in_a_run(lora_cfg, monkeypatch):
    """Record every A a client trains from and every A in its model afterwards."""
    import fedsim.clients.app as app

    seen = []
    real = app.train_local

    def spy(model, *args, **kwargs):
        before = {n: layer.lora_A.weight.detach().to("cpu", copy=True) for n, layer in lora_layers(model).items()}
        result = real(model, *args, **kwargs)
        after = {n: layer.lora_A.weight.detach().cpu() for n, layer in lora_layers(model).items()}
        seen.append(all(torch.equal(after[n], before[n]) for n in before))
        return result

    monkeypatch.setattr(app, "train_local", spy)
    from fedsim.run import run_experiment

    run_experiment(lora_cfg(**{"runtime.engine": "opacus"}), progress=False)  # spies on the Opacus trainer
    assert seen and all(seen)


def _final(out, column="test_loss") -> float:
    import csv

    return float(list(csv.DictReader(open(out / "rounds.csv")))[-1][column])


def _rounds(out) -> list[tuple[float, float]]:
    import csv

    return [(float(r["metric"]), float(r["test_loss"])) for r in csv.DictReader(open(out / "rounds.csv"))]


def test_fedsvd_is_ffa_lora_on_an_orthonormal_basis_of_the_same_span(lora_cfg, tmp_path):
    """The rows of B A are combinations of the rows of A, so the SVD only re-bases A inside
    its row space; B's SGD update is equivariant to that rotation. FedSVD therefore follows
    FFA-LoRA started from the same A0 with orthonormalized rows, round for round (no noise
    here, so the comparison is exact up to float error). This is why FedSVD's gain over
    FFA-LoRA is about A's basis (scale, conditioning), not about a new subspace."""
    from fedsim.run import run_experiment

    runs = {}
    for strategy in ("fedsvd", "ffa-lora"):
        cfg = lora_cfg(strategy, **{"model.lora_init": "orthogonal", "privacy.noise_multiplier": 0.0,
                                           "federation.rounds": 4, "client.lr": 0.5,
                                           "output.dir": str(tmp_path / strategy)})
        runs[strategy] = _rounds(run_experiment(cfg, progress=False))
    np.testing.assert_allclose(runs["fedsvd"], runs["ffa-lora"], rtol=1e-4)
    # and the refactorization did act: with peft's Kaiming A0 the two differ
    cfg = lora_cfg("fedsvd", **{"privacy.noise_multiplier": 0.0, "federation.rounds": 4,
                                       "client.lr": 0.5, "output.dir": str(tmp_path / "kaiming")})
    assert _rounds(run_experiment(cfg, progress=False)) != runs["ffa-lora"]


def test_fedsvd_beats_ffa_lora_under_dp_at_equal_hyperparameters(lora_cfg, tmp_path):
    """FedSVD < FFA-LoRA in test loss for every seed, at epsilon = 6 (delta = 1e-5, RDP).

    Why it holds: both train only B, with the same lr, clip C and DP noise on B, as in the
    paper's protocol. FedSVD's A has orthonormal rows; FFA-LoRA keeps peft's Kaiming A0,
    whose rows have norm ~ 1/sqrt(3) and, at r / d_in = 32 / 64, singular values spread
    from ~0.3 to ~1.7 times that. So in W = W0 + s B A, FFA-LoRA's per-step signal is ~3x
    smaller and badly conditioned while the noise injected on B is the same size: less
    signal per unit of privacy. (The test above shows the re-basis is all FedSVD changes;
    scaling FFA-LoRA's lr by ~3 recovers most of the gap, which the README reports.)
    Measured: final test loss 0.50 / 0.45 / 0.46 (FedSVD) vs 0.87 / 0.75 / 0.87 (FFA-LoRA),
    accuracy 0.85 / 0.84 / 0.88 vs 0.73 / 0.83 / 0.78; at sigma = 1 seeds 3, 4 agree.
    """
    from fedsim.run import run_experiment

    losses, accs = {"fedsvd": [], "ffa-lora": []}, {"fedsvd": [], "ffa-lora": []}
    for seed in (0, 1, 2):
        for strategy in losses:
            cfg = lora_cfg(strategy, **{
                "seed": seed, "model.hidden": [64], "model.lora_rank": 32, "model.pretrain_epochs": 30,
                "data.partitioner": "iid", "federation.num_clients": 4, "federation.clients_per_round": 4,
                "federation.rounds": 10, "client.local_steps": 10, "client.batch_size": 16, "client.lr": 0.5,
                "privacy.noise_multiplier": 0.0, "privacy.target_epsilon": 6.0, "privacy.max_grad_norm": 2.0,
                "output.dir": str(tmp_path / f"{strategy}-{seed}")})
            out = run_experiment(cfg, progress=False)
            losses[strategy].append(_final(out))
            accs[strategy].append(_final(out, "metric"))
    assert all(s < f - 0.1 for s, f in zip(losses["fedsvd"], losses["ffa-lora"])), losses
    assert np.mean(accs["fedsvd"]) > np.mean(accs["ffa-lora"]) + 0.03, accs


def test_rank_above_a_layers_input_width_is_refused(tiny, cli, tmp_path):
    code, _, err = cli("run", "--set", "model.name=lora-mlp", "--set", "strategy.name=fedsvd",
                       "--set", "model.hidden=[16]", "--set", "model.lora_rank=32",
                       "--set", f"output.dir={tmp_path / 'r'}")
    assert code == 2 and "model.lora_rank" in err and "16" in err and "Traceback" not in err


def test_any_registered_torch_model_can_be_fine_tuned_with_lora(tiny, monkeypatch):
    """A user model (here a small CNN) registered as lora-*, wrapped with add_lora: FedSVD
    trains and sends only the adapters of the targeted Linear layers."""
    import csv

    from torch import nn

    import fedsim.clients.app as app

    from fedsim.lora import add_lora
    from fedsim.models import register_model
    from fedsim.run import run_experiment

    @register_model("lora-user-cnn")
    def _user_cnn(cfg, data, cache_dir=""):
        net = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
                            nn.Linear(4 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, data.num_classes))
        return add_lora(net, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.lora_init)

    cfg = tiny(**{"model.name": "lora-user-cnn", "strategy.name": "fedsvd", "model.lora_rank": 4,
                  "runtime.engine": "opacus",  # the spy watches the Opacus trainer
                  "model.lora_targets": ["4"], "federation.rounds": 2, "privacy.noise_multiplier": 1.0})
    model = build_model(cfg.model, load_dataset(cfg.data, 6, 0), 0)
    assert sorted(R.federated_keys(model)) == ["4.lora_A.weight", "4.lora_B.weight"]
    assert not model[1].weight.requires_grad  # the conv layer is frozen, not adapted

    changed, real = [], app.train_local

    def spy(model, *args, **kwargs):  # which tensors did each client's training change?
        before = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        result = real(model, *args, **kwargs)
        changed.append(sorted(k for k, v in model.state_dict().items() if not torch.equal(v.cpu(), before[k])))
        return result

    monkeypatch.setattr(app, "train_local", spy)
    out = run_experiment(cfg, progress=False)
    assert changed == [["4.lora_B.weight"]] * (2 * 3)  # every client-round: B of layer 4, nothing else
    assert len(list(csv.DictReader(open(out / "rounds.csv")))) == 2
    clients = list(csv.DictReader(open(out / "clients.csv")))
    assert clients and all(0 < float(c["sample_epsilon"]) < float("inf") for c in clients)
