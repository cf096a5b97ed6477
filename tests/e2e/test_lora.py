"""FedSVD: refactorization math, what travels, what clients may change."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from clients.app import train
from fedsim import records as R
from fedsim.datasets import load_dataset
from fedsim.experiment import run_config_for
from fedsim.lora import lora_layers
from fedsim.models import build_model
from strategies.fedsvd import refactorize

rng = np.random.default_rng(0)


@pytest.mark.parametrize("method", ["exact", "randomized"])
@pytest.mark.parametrize("shape", [(32, 20, 4), (5, 64, 8), (64, 64, 8), (10, 10, 10)])
def test_refactorization_preserves_product_and_orthonormalizes_a(method, shape):
    d_out, d_in, r = shape
    b, a = rng.normal(size=(d_out, r)), rng.normal(size=(r, d_in))
    b_new, a_new = refactorize(b, a, method)
    np.testing.assert_allclose(b_new @ a_new, b @ a, atol=1e-9)
    np.testing.assert_allclose(a_new @ a_new.T, np.eye(r), atol=1e-9)
    # B_new = U_r S_r: its columns are orthogonal with non-increasing norms (the singular values)
    gram = b_new.T @ b_new
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-8)
    assert np.all(np.diff(np.sqrt(np.diag(gram))) <= 1e-9)


def test_rank_deficient_product_keeps_a_orthonormal():
    b = np.zeros((16, 4))
    b[:, 0] = rng.normal(size=16)  # rank(BA) = 1
    a = rng.normal(size=(4, 12))
    b_new, a_new = refactorize(b, a)
    np.testing.assert_allclose(b_new @ a_new, b @ a, atol=1e-10)
    np.testing.assert_allclose(a_new @ a_new.T, np.eye(4), atol=1e-10)


def _lora_cfg(tiny, strategy="fedsvd", **kw):
    return tiny(**{"model.name": "lora-mlp", "strategy.name": strategy, "data.classes": [5, 6, 7, 8, 9],
                   "model.pretrain_classes": [0, 1, 2, 3, 4], "model.pretrain_epochs": 3,
                   "model.hidden": [16], "model.lora_rank": 4, "client.local_steps": 3,
                   "privacy.noise_multiplier": 1.0, **kw})


def _train_once(cfg):
    data = load_dataset(cfg.data, cfg.federation.num_clients, cfg.seed)
    model = build_model(cfg.model, data, cfg.seed)
    arrays = R.model_to_record(model)
    content = RecordDict({R.ARRAYS: arrays, R.CONFIG: ConfigRecord(
        {R.SERVER_ROUND: 1})})
    msg = Message(content, 1000, "train")
    msg.metadata.__dict__["_message_id"] = "m1"
    ctx = Context(run_id=1, node_id=1000, node_config={"partition-id": 0, "num-partitions": 6},
                  state=RecordDict(), run_config=run_config_for(cfg))
    return R.record_to_numpy(arrays), R.record_to_numpy(train(msg, ctx).content[R.ARRAYS])


def test_uplink_carries_only_b_half_of_fedavg_lora(tiny):
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    cfg = _lora_cfg(tiny, **{"model.hidden": [64], "model.lora_targets": ["1"]})  # one 64x64 layer
    sent, fedsvd_reply = _train_once(cfg)
    _, fedavg_reply = _train_once(_lora_cfg(tiny, "fedavg-lora", **{"model.hidden": [64],
                                                                    "model.lora_targets": ["1"]}))
    assert all(".lora_B." in k for k in fedsvd_reply)
    size = lambda d: sum(v.size for v in d.values())  # noqa: E731
    assert size(fedsvd_reply) * 2 == size(fedavg_reply)  # square A (4x64) and B (64x4)
    b_keys = [k for k in sent if ".lora_B." in k]
    assert any(np.abs(fedsvd_reply[k] - sent[k]).max() > 0 for k in b_keys)  # B did train


def test_a_is_never_changed_by_a_client_in_a_run(tiny, monkeypatch):
    """Record every A a client trains from and every A in its model afterwards."""
    import clients.app as app

    seen = []
    real = app.train_local

    def spy(model, *args, **kwargs):
        before = {n: layer.lora_A.weight.detach().clone() for n, layer in lora_layers(model).items()}
        result = real(model, *args, **kwargs)
        seen.append(all(bool((layer.lora_A.weight == before[n]).all()) for n, layer in lora_layers(model).items()))
        return result

    monkeypatch.setattr(app, "train_local", spy)
    from fedsim.run import run_experiment

    run_experiment(_lora_cfg(tiny), progress=False)
    assert seen and all(seen)


def _final(out, column="test_loss") -> float:
    import csv

    return float(list(csv.DictReader(open(out / "rounds.csv")))[-1][column])


def _rounds(out) -> list[tuple[float, float]]:
    import csv

    return [(float(r["metric"]), float(r["test_loss"])) for r in csv.DictReader(open(out / "rounds.csv"))]


def test_fedsvd_is_ffa_lora_on_an_orthonormal_basis_of_the_same_span(tiny, tmp_path):
    """The rows of B A are combinations of the rows of A, so the SVD only re-bases A inside
    its row space; B's SGD update is equivariant to that rotation. FedSVD therefore follows
    FFA-LoRA started from the same A0 with orthonormalized rows, round for round (no noise
    here, so the comparison is exact up to float error). This is why FedSVD's gain over
    FFA-LoRA is about A's basis (scale, conditioning), not about a new subspace."""
    from fedsim.run import run_experiment

    runs = {}
    for strategy in ("fedsvd", "ffa-lora"):
        cfg = _lora_cfg(tiny, strategy, **{"model.lora_init": "orthogonal", "privacy.noise_multiplier": 0.0,
                                           "federation.rounds": 4, "client.lr": 0.5,
                                           "output.dir": str(tmp_path / strategy)})
        runs[strategy] = _rounds(run_experiment(cfg, progress=False))
    np.testing.assert_allclose(runs["fedsvd"], runs["ffa-lora"], rtol=1e-4)
    # and the refactorization did act: with peft's Kaiming A0 the two differ
    cfg = _lora_cfg(tiny, "fedsvd", **{"privacy.noise_multiplier": 0.0, "federation.rounds": 4,
                                       "client.lr": 0.5, "output.dir": str(tmp_path / "kaiming")})
    assert _rounds(run_experiment(cfg, progress=False)) != runs["ffa-lora"]


def test_fedsvd_beats_ffa_lora_under_dp_at_equal_hyperparameters(tiny, tmp_path):
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
            cfg = _lora_cfg(tiny, strategy, **{
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


def test_lora_inits_orthogonal_keeps_the_span_and_pissa_keeps_the_output():
    import torch
    from torch import nn

    from fedsim.lora import LoRALinear

    def layer(init):
        torch.manual_seed(0)
        return LoRALinear(nn.Linear(24, 10), rank=6, alpha=12.0, init=init)

    kaiming = layer("kaiming").lora_A.weight.detach().double()
    orth = layer("orthogonal").lora_A.weight.detach().double()
    np.testing.assert_allclose((orth @ orth.T).numpy(), np.eye(6), atol=1e-6)
    # same row space: projecting the Kaiming rows onto the orthonormal rows loses nothing
    np.testing.assert_allclose((kaiming @ orth.T @ orth).numpy(), kaiming.numpy(), atol=1e-6)

    torch.manual_seed(0)
    w0 = nn.Linear(24, 10).weight.detach().double()
    pissa = layer("pissa")
    a, b = pissa.lora_A.weight.detach().double(), pissa.lora_B.weight.detach().double()
    u, s, vt = np.linalg.svd(w0.numpy())
    # the scaled product is the top-6 SVD of W0, the frozen base holds the rest
    np.testing.assert_allclose((pissa.scaling * b @ a).numpy(), (u[:, :6] * s[:6]) @ vt[:6], atol=1e-5)
    residual = pissa.base.weight.detach().double()
    np.testing.assert_allclose((residual + pissa.scaling * b @ a).numpy(), w0.numpy(), atol=1e-5)
    x = torch.randn(3, 24)
    torch.manual_seed(0)
    plain = nn.Linear(24, 10)
    with torch.no_grad():
        torch.testing.assert_close(pissa(x), plain(x), atol=1e-5, rtol=1e-5)


def test_rank_above_a_layers_input_width_is_refused(tiny, cli, tmp_path):
    code, _, err = cli("run", "--set", "model.name=lora-mlp", "--set", "strategy.name=fedsvd",
                       "--set", "model.hidden=[16]", "--set", "model.lora_rank=32",
                       "--set", f"output.dir={tmp_path / 'r'}")
    assert code == 2 and "model.lora_rank" in err and "16" in err and "Traceback" not in err


def test_any_registered_torch_model_can_be_fine_tuned_with_lora(tiny):
    """A user model (here a small CNN) registered as lora-*, wrapped with add_lora: FedSVD
    trains and sends only the adapters of the targeted Linear layers."""
    import csv

    from torch import nn

    from fedsim.lora import add_lora
    from fedsim.models import register_model
    from fedsim.run import run_experiment

    @register_model("lora-user-cnn")
    def _user_cnn(cfg, data, cache_dir=""):
        net = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
                            nn.Linear(4 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, data.num_classes))
        return add_lora(net, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.lora_init)

    cfg = tiny(**{"model.name": "lora-user-cnn", "strategy.name": "fedsvd", "model.lora_rank": 4,
                  "model.lora_targets": ["4"], "federation.rounds": 2, "privacy.noise_multiplier": 1.0})
    model = build_model(cfg.model, load_dataset(cfg.data, 6, 0), 0)
    assert sorted(R.federated_keys(model)) == ["4.lora_A.weight", "4.lora_B.weight"]
    assert not model[1].weight.requires_grad  # the conv layer is frozen, not adapted
    out = run_experiment(cfg, progress=False)
    assert len(list(csv.DictReader(open(out / "rounds.csv")))) == 2
