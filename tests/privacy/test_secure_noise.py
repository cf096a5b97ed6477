"""privacy.secure_noise: under "on" no draw of DP noise or Poisson mask can be regenerated from the
run config; under "off" every draw is the seeded one; "auto" is on only under a deployment.

"Cannot be regenerated" is shown the only way a test can: the draw the config's seed gives
(what "off" uses, recomputed here from `derive_seed`) is not the one that ran, and two runs
of the same config differ. That the state is secret rests on `secrets` (the OS CSPRNG) and on
every bit of torch's generator state coming from it, which the generator tests check.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
import torch
from flwr.superlink.grid import InMemoryGrid

from fedsim.central_dp import CentralDP
from fedsim.clients.app import run_job, run_vectorized
from fedsim.errors import ConfigError
from fedsim.experiment import derive_seed
from fedsim.privacy import secure_noise as sn
from fedsim.privacy.accounting import poisson_sample_rate
from fedsim.privacy.secure_noise import keyed_generator, resolve_secure_noise, secret_generator
from fedsim.strategies.fedavg import FedAvg
from tests.clients.test_vectorized import BASE, _jobs, _poisson_batches


# ----------------------------------------------------------------------------- the resolver

def test_auto_is_on_only_under_a_deployment():
    assert resolve_secure_noise("auto", deployment=True) == "on"
    assert resolve_secure_noise("auto", deployment=False) == "off"
    for mode in ("on", "off"):
        assert resolve_secure_noise(mode, deployment=True) == mode == resolve_secure_noise(mode, deployment=False)
    with pytest.raises(ConfigError, match=r"privacy.secure_noise: must be one of auto, on, off"):
        resolve_secure_noise("yes", deployment=True)


def test_flwr_run_tells_a_superlink_from_flowers_simulation():
    from fedsim.runtime.inprocess import InProcessGrid
    from fedsim.serverapp import is_deployment

    assert not is_deployment(InMemoryGrid.__new__(InMemoryGrid))  # what `flwr run` hands a simulation
    assert is_deployment(InProcessGrid.__new__(InProcessGrid))  # any other grid reaches real SuperNodes


def test_prepare_resolves_auto_and_keeps_an_explicit_mode(tiny):
    """A deployment writes on into the experiment its nodes receive; a simulation keeps auto
    (its config.toml is what sweeps and resumes compare), which every reader takes as off."""
    from fedsim.run import prepare

    cfg = tiny(**{"privacy.noise_multiplier": 1.0})
    assert cfg.privacy.secure_noise == "auto"
    assert prepare(cfg).privacy.secure_noise == "auto" and not sn.is_secret("auto")
    assert prepare(cfg, deployment=True).privacy.secure_noise == "on" and sn.is_secret("on")
    cfg.privacy.secure_noise = "off"
    assert prepare(cfg, deployment=True).privacy.secure_noise == "off"


def test_deploy_local_resolves_auto_to_on(cli, tmp_path, monkeypatch):
    """`fedsim deploy local` resolves the experiment before writing it for the ServerApp: auto must
    become on there, not the simulation's off."""
    import fedsim.deploy

    seen = {}

    def fake_deploy(cfg, nodes, **_kw):
        seen["cfg"] = cfg
        return tmp_path / "out"

    monkeypatch.setattr(fedsim.deploy, "deploy_local", fake_deploy)
    rc, _, err = cli("deploy", "local", "--nodes", "2", "--rounds", "1", "--noise-multiplier", "1",
                     "--out", tmp_path / "r")
    assert rc == 0, err
    assert seen["cfg"].privacy.secure_noise == "on"
    rc, _, err = cli("deploy", "local", "--nodes", "2", "--rounds", "1", "--noise-multiplier", "1",
                     "--set", "privacy.secure_noise=off", "--out", tmp_path / "r2")
    assert rc == 0, err
    assert seen["cfg"].privacy.secure_noise == "off"


@pytest.mark.parametrize("command", ["run", "deploy"])
def test_a_bad_mode_is_one_line_naming_the_key_and_the_choices(cli, tmp_path, command):
    argv = ["run"] if command == "run" else ["deploy", "local", "--nodes", "2"]
    rc, _, err = cli(*argv, "--set", "privacy.secure_noise=yes", "--out", tmp_path / "r")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "privacy.secure_noise" in lines[0] and all(m in lines[0] for m in ("auto", "on", "off")), err


# ----------------------------------------------------------------------------- the generators

def test_torchs_cpu_generator_keeps_only_32_bits_of_a_seed():
    """Why a 64-bit seed from os.urandom would not do on a CPU: 2**32 seeds cover every noise draw."""
    low = torch.randn(4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(low, torch.randn(4, generator=torch.Generator().manual_seed(2**40 + 5)))


def test_every_word_of_the_generator_state_comes_from_the_key():
    key = bytes(range(32))
    a, b = keyed_generator(key, 1, "x"), keyed_generator(key, 1, "x")
    assert torch.equal(torch.randn(1000, generator=a), torch.randn(1000, generator=b))  # a key regenerates
    assert not torch.equal(torch.randn(8, generator=keyed_generator(key, 2, "x")),
                           torch.randn(8, generator=keyed_generator(key, 1, "x")))
    state = keyed_generator(key, 1, "x").get_state().numpy()
    words = state[sn._MT_OFFSET:sn._MT_OFFSET + 8 * sn._MT_WORDS].view("<u8")
    import hashlib
    expected = np.frombuffer(hashlib.shake_256(key + b"\x00" + b"1/x").digest(4 * 624), "<u4")
    np.testing.assert_array_equal(words, expected)  # the state is SHAKE-256's 19,968 bits, all of them
    # ... and those words, not the seed fields around them, decide the draws: flip one bit of the
    # last word and the draws change; overwrite the recorded seed and they do not
    reference = torch.randn(700, generator=keyed_generator(key, 1, "x"))
    flipped = state.copy()
    flipped[sn._MT_OFFSET + 8 * 623] ^= 1
    reseeded = state.copy()
    reseeded[:8] = 7
    g = torch.Generator()
    g.set_state(torch.from_numpy(flipped))
    assert not torch.equal(torch.randn(700, generator=g), reference)
    g.set_state(torch.from_numpy(reseeded))
    assert torch.equal(torch.randn(700, generator=g), reference)


def test_secret_generators_differ_and_no_32_bit_seed_reaches_them():
    draws = [torch.randn(6, generator=secret_generator()) for _ in range(3)]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    seeded = {tuple(torch.randn(6, generator=torch.Generator().manual_seed(s)).tolist()) for s in range(2000)}
    assert not {tuple(d.tolist()) for d in draws} & seeded


def test_fp_safe_draw_is_standard_normal():
    """Four draws summed and halved (Opacus' secure_mode): still N(0, 1)."""
    z = sn.fp_safe_standard_normal((200_000,), generator=keyed_generator(b"k" * 32), device="cpu")
    assert abs(float(z.mean())) < 4 / math.sqrt(z.numel())
    assert float(z.std()) == pytest.approx(1.0, abs=0.01)


def test_the_statement_is_made_once_per_process_and_mode(monkeypatch):
    monkeypatch.setattr(sn, "_ANNOUNCED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            sn.announce("off")
            sn.announce("on")
    texts = [str(w.message) for w in caught]
    assert len(texts) == 2
    assert texts[0].startswith("Secure RNG turned off") and "regenerate" in texts[0]
    assert texts[1].startswith("Secure noise on") and "os.urandom" in texts[1] and "not reproducible" in texts[1]


def test_processes_that_share_a_record_make_each_statement_once(monkeypatch):
    """A sweep's workers share one record: a second process (its own, empty, per-process set)
    stays silent about a statement the first made, and still makes one not made yet."""
    monkeypatch.setattr(sn, "_SHARED", None)
    sn.share_announcements(sn.shared_record())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # two processes, each with its own record of what it said
            monkeypatch.setattr(sn, "_ANNOUNCED", set())
            sn.announce("off")
        sn.announce("on")
    texts = [str(w.message) for w in caught]
    assert len(texts) == 2
    assert texts[0].startswith("Secure RNG turned off") and texts[1].startswith("Secure noise on")


# ----------------------------------------------------------------------------- the engines

def _train(cfg, engine: str, secure: bool, sigma: float = 1.0):
    """Partitions 0-2 of round 1 trained with Poisson sampling (no given batches) and noise."""
    jobs, _ = _jobs(cfg, (0, 1, 2), noise=sigma, dp_reference=False)
    for job in jobs:
        job.settings = dataclasses.replace(job.settings, secure_noise=secure)
    if engine == "vectorized":
        return [{k: v.clone() for k, v in o.final.items()} for o in run_vectorized(jobs)]
    out = []
    for job in jobs:
        run_job(job)
        out.append({k: p.detach().cpu().clone() for k, p in job.model.named_parameters() if p.requires_grad})
    return out


def _same(a, b) -> bool:
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


@pytest.mark.parametrize("engine", ["vectorized", "opacus"])
def test_secret_noise_differs_per_run_and_is_not_the_seeded_draw(tiny, engine):
    """Off: the same config gives the same bits (the draws come from derive_seed(seed, round,
    partition, "train")). On: the same config gives other bits every time, and never the seeded
    draw, which is what anyone holding the run config could compute."""
    cfg = tiny(**BASE, **{"client.local_steps": 3})
    seeded = _train(cfg, engine, secure=False)
    assert _same(seeded, _train(cfg, engine, secure=False))
    first, second = _train(cfg, engine, secure=True), _train(cfg, engine, secure=True)
    for one, other in ((first, second), (first, seeded), (second, seeded)):
        for x, y in zip(one, other):
            assert all(not torch.equal(x[k], y[k]) for k in x)


def test_secret_noise_has_the_dp_sgd_std(tiny):
    """One step on given batches, sigma > 0 against sigma = 0, secret generators: the update
    differs by lr * noise / int(q n), std lr * sigma * C / int(q n), as with seeded noise."""
    sigma, lr, clip = 1.3, 0.5, 0.5
    cfg = tiny(**{**BASE, "client.momentum": 0.0, "model.hidden": [64]})
    quiet, _ = _jobs(cfg, range(4), noise=0.0)
    noisy, _ = _jobs(cfg, range(4), noise=sigma, dp_reference=False)
    for job in noisy:
        job.settings = dataclasses.replace(job.settings, secure_noise=True)
    batches = _poisson_batches(quiet, np.random.default_rng(1), steps=1)
    reference, noisy_out = run_vectorized(quiet, batches=batches), run_vectorized(noisy, batches=batches)
    for job, a, b in zip(quiet, reference, noisy_out):
        n = len(job.y)
        expected = lr * sigma * clip / int(poisson_sample_rate(n, 8) * n)
        diff = torch.cat([(b.final[k] - a.final[k]).flatten() for k in a.final])
        assert float(diff.std()) == pytest.approx(expected, rel=0.05)


# ----------------------------------------------------------------------------- central noise

def _central(mode: str, mechanism: str = "gaussian", quantile: float = 0.0) -> CentralDP:
    return CentralDP(FedAvg(), noise_multiplier=1.0, clip=1.0, expected_cohort=4, seed=7, mechanism=mechanism,
                     target_quantile=quantile, count_noise=1.0 if quantile else 0.0, secure_noise=mode == "on")


def _seeded_gaussian_release(stack: torch.Tensor, server_round: int) -> torch.Tensor:
    """The release "off" makes, recomputed from the config's seed alone."""
    total, _ = sn_user_dp().clip_and_sum(stack, 1.0)
    gen = torch.Generator().manual_seed(derive_seed(7, server_round, "user-dp"))
    return (total + 1.0 * torch.randn(total.shape, generator=gen, dtype=total.dtype)) / 4


def sn_user_dp():
    from fedsim.privacy import user_dp
    return user_dp


def test_central_noise_under_on_is_not_the_seeded_draw_and_differs_per_run():
    stack = torch.randn(4, 2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.01
    seeded = _seeded_gaussian_release(stack, 3)
    assert torch.equal(_central("off").release(stack, 3), seeded)  # off: anyone with the seed has the noise
    first, second = _central("on").release(stack, 3), _central("on").release(stack, 3)
    assert not torch.equal(first, seeded) and not torch.equal(first, second)
    clipped, _ = sn_user_dp().clip_and_sum(stack, 1.0)
    noise = first * 4 - clipped  # the release is (sum + N(0, (z C)^2)) / qN
    assert float(noise.std()) == pytest.approx(1.0, rel=0.05)


def test_secret_tree_noise_survives_a_resume_through_the_layers_state():
    """DP-FTRL reuses each tree node's noise in later rounds: the key drawn once per run is the
    layer's state, so a resumed layer releases what the original would have; a fresh layer
    (another key) does not, and the seeded tree is neither."""
    stack = torch.randn(4, 500, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.01
    original = _central("on", "tree")
    original.release(stack, 1)
    resumed = _central("on", "tree")
    resumed.load_state_dict({**original.state_dict()})
    assert torch.equal(resumed.release(stack, 2), original.release(stack, 2))
    assert not torch.equal(_central("on", "tree").release(stack, 2), original.release(stack, 2))
    assert not torch.equal(_central("off", "tree").release(stack, 2), original.release(stack, 2))
    assert "central-dp/noise-key" not in _central("off", "tree").state_dict()


# ----------------------------------------------------------------------------- whole runs

def _run(cfg):
    from fedsim.run import run_experiment
    from safetensors.numpy import load_file

    out = run_experiment(cfg, progress=False)
    return load_file(str(out / "model.safetensors")), json.loads((out / "summary.json").read_text())


def test_two_runs_of_one_config_under_on_give_different_models(tiny, tmp_path):
    base = {"privacy.noise_multiplier": 1.0, "federation.rounds": 1, "privacy.user_noise_multiplier": 0.5,
            "privacy.delta": 1e-3, "privacy.secure_noise": "on"}
    a, summary = _run(tiny(**base, **{"output.dir": str(tmp_path / "a")}))
    b, _ = _run(tiny(**base, **{"output.dir": str(tmp_path / "b")}))
    assert summary["secure_noise"] == "on"
    assert all(not np.array_equal(a[k], b[k]) for k in a)
    c, summary = _run(tiny(**{**base, "privacy.secure_noise": "auto", "output.dir": str(tmp_path / "c")}))
    d, _ = _run(tiny(**{**base, "privacy.secure_noise": "auto", "output.dir": str(tmp_path / "d")}))
    assert summary["secure_noise"] == "off"  # auto in simulation
    assert all(np.array_equal(c[k], d[k]) for k in c)


def test_flwr_run_against_supernodes_turns_secret_noise_on(tmp_path):
    """The ServerApp's whole path on fedsim's in-process grid, which stands in for a SuperLink's
    (`is_deployment`): auto resolves to on, the clients receive on with the experiment, and two
    runs of one run config train different models."""
    from flwr.app import Context, RecordDict
    from safetensors.numpy import load_file

    from fedsim.clients.app import make_client_app
    from fedsim.runtime.inprocess import SERVER_NODE_ID, InProcessGrid
    from fedsim.serverapp import run_flower_app
    from tests.test_run_config import run_config

    models = []
    for stamp in ("a", "b"):
        rc = run_config("num-server-rounds=1 num-clients=2 fraction-train=1.0 noise-multiplier=1.0 "
                        "dataset='breast-cancer'")
        grid = InProcessGrid(make_client_app(), 2, rc)
        context = Context(run_id=1, node_id=SERVER_NODE_ID, node_config={}, state=RecordDict(), run_config=rc)
        out = run_flower_app(grid, context, root=tmp_path / "runs", stamp=stamp)
        assert json.loads((out / "summary.json").read_text())["secure_noise"] == "on"
        assert 'secure_noise = "on"' in (out / "config.toml").read_text()
        models.append(load_file(str(out / "model.safetensors")))
    assert all(not np.array_equal(models[0][k], models[1][k]) for k in models[0])
