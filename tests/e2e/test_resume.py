"""Nothing lost: a killed run resumes to exactly the uninterrupted run; SIGTERM ends a run as
"interrupted" with its checkpoint; a run directory that holds results is never silently reused.

The kill tests run the CLI in a subprocess whose checkpoint writer holds the run after round
`HOLD` (so the kill lands mid-run, not after the run has finished by chance), SIGKILL or
SIGTERM it there, then resume in this process and compare with an uninterrupted run. The
kill-and-resume case for every registered algorithm and both engines is in
tests/conformance (`check_resumed_like_reference` below).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fedsim.server as server
from fedsim.config import dumps_toml
from fedsim.privacy.accounting import epsilon, poisson_sample_rate, steps_per_round
from fedsim.results import run_state
from fedsim.run import run_experiment

REPO = Path(__file__).resolve().parents[2]

# The child: the fedsim CLI, with the checkpoint writer holding the run (sleeping) once it has
# written the checkpoint of round HOLD, after touching the file MARK.
CHILD = """
import os, sys, time
from pathlib import Path
import fedsim.server as server
real = server.save_checkpoint
from fedsim.checkpoint import load_checkpoint
def hold(run_dir, ckpt, *rest):
    path = real(run_dir, ckpt, *rest)
    if ckpt.round == int(os.environ["HOLD"]):
        # the run's writer thread writes the checkpoint (after the round's results): wait for it
        while (on_disk := load_checkpoint(run_dir)) is None or on_disk.round != ckpt.round:
            time.sleep(0.01)
        Path(os.environ["MARK"]).write_text("held")
        time.sleep(600)
    return path
server.save_checkpoint = hold
from fedsim.cli import main
sys.exit(main(sys.argv[1:]))
"""


def rows(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "rounds.csv").open()))


def without_wall(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in rows(out)]


def client_eps(out: Path) -> dict[int, tuple[int, float]]:
    return {int(r["partition_id"]): (int(r["participations"]), float(r["sample_epsilon"]))
            for r in csv.DictReader((out / "clients.csv").open())}


def start_held(tmp_path: Path, cfg, hold: int, preexec_fn=None) -> tuple[subprocess.Popen, Path]:
    """Start `fedsim run` on `cfg` in a subprocess; return once it holds after round `hold`."""
    toml = tmp_path / f"{Path(cfg.output.dir).name}.toml"
    toml.write_text(dumps_toml(cfg))
    mark = tmp_path / f"{Path(cfg.output.dir).name}.held"
    env = {**os.environ, "HOLD": str(hold), "MARK": str(mark),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, "run", str(toml), "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)
    deadline = time.monotonic() + 600  # a guard against a hung child on a loaded machine, not a timing
    while not mark.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before round {hold} was held: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run did not reach the hold point")
        time.sleep(0.05)
    return proc, Path(cfg.output.dir)


def check_resumed_like_reference(cli, cfg, out: Path, reference_cfg) -> None:
    """A run killed (SIGKILL) after round 2 resumes through the CLI to exactly the uninterrupted
    run of `reference_cfg` (the same config, another directory). What the conformance suite
    (tests/conformance) asserts for every registered algorithm."""
    assert len(rows(out)) == 2 and (out / "checkpoint.safetensors").is_file()
    assert run_state(out) == "dead"  # its summary still says "running", but nobody writes it
    at_kill = client_eps(out)

    code, _, err = cli("run", "--resume", out, "--no-progress")
    assert code == 0, err
    reference = run_experiment(reference_cfg, progress=False)

    assert [r["round"] for r in rows(out)] == [str(r) for r in range(1, cfg.federation.rounds + 1)]
    assert without_wall(out) == without_wall(reference)
    assert (out / "clients.csv").read_bytes() == (reference / "clients.csv").read_bytes()
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
    assert not (out / "checkpoint.safetensors").exists()  # finished: the model is the result
    if cfg.privacy.noise_multiplier > 0:
        check_epsilon_continued(cfg, out, at_kill)


def check_epsilon_continued(cfg, out: Path, at_kill: dict[int, tuple[int, float]]) -> None:
    """No client's epsilon restarted: each one's is that of all its participations, before and
    after the kill, by the RDP accountant (q and steps per round from its size); one that
    trained again after the kill has a larger epsilon than at the kill."""
    sizes = {int(r["partition_id"]): int(r["num_examples"]) for r in csv.DictReader((out / "clients.csv").open())}
    c = cfg.client
    for pid, (participations, eps) in client_eps(out).items():
        steps = steps_per_round(sizes[pid], c.batch_size, c.local_epochs, c.local_steps)
        expected = epsilon([(cfg.privacy.noise_multiplier, poisson_sample_rate(sizes[pid], c.batch_size),
                             participations * steps)], cfg.privacy.delta, "rdp")
        assert eps == pytest.approx(expected, rel=1e-12), pid
        if pid in at_kill:
            assert eps >= at_kill[pid][1]
            assert (eps > at_kill[pid][1]) == (participations > at_kill[pid][0])


def test_killed_run_with_adaptive_central_dp_resumes_bit_for_bit(tiny, cli, tmp_path):
    """The adaptive user-level clip is strategy state: a resumed run that lost it would clip
    round 3 at the starting clip and differ from the uninterrupted run."""
    kw = {"federation.rounds": 4, "privacy.noise_multiplier": 1.0, "privacy.user_noise_multiplier": 1.0,
          "privacy.user_clip_quantile": 0.5, "privacy.user_clip_count_noise": 1.0}
    cfg = tiny(**kw, **{"output.dir": str(tmp_path / "killed")})
    proc, out = start_held(tmp_path, cfg, hold=2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    check_resumed_like_reference(cli, cfg, out, tiny(**kw, **{"output.dir": str(tmp_path / "reference")}))


def test_sigterm_ends_the_run_as_interrupted_with_its_checkpoint(tiny, tmp_path):
    cfg = tiny(**{"federation.rounds": 3, "privacy.noise_multiplier": 1.0, "output.dir": str(tmp_path / "run")})
    proc, out = start_held(tmp_path, cfg, hold=1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    assert proc.returncode == 143
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted:")
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    assert run_state(out) == "interrupted"
    assert len(rows(out)) == 1 and (out / "checkpoint.safetensors").is_file()
    assert "run interrupted (Terminated)" in (out / "run.log").read_text()


def test_ctrl_c_stops_a_run_that_inherited_sigint_ignored(tiny, tmp_path):
    """A run started with `&` by a non-interactive shell inherits SIGINT ignored; fedsim listens
    anyway, and ends the run "interrupted" with exit 130."""
    cfg = tiny(**{"federation.rounds": 3, "output.dir": str(tmp_path / "run")})
    proc, out = start_held(tmp_path, cfg, hold=1, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"


# ----------------------------------------------------------------------------- in-process cases

def interrupt_after(monkeypatch, round_: int) -> None:
    """Make the next run stop (KeyboardInterrupt, as Ctrl-C) right after checkpointing `round_`."""
    real = server.save_checkpoint

    def stop(run_dir, ckpt, *rest):
        real(run_dir, ckpt, *rest)
        if ckpt.round == round_:
            raise KeyboardInterrupt

    monkeypatch.setattr(server, "save_checkpoint", stop)


def test_resume_refuses_another_config_and_a_run_without_checkpoint(tiny, cli, tmp_path, monkeypatch):
    cfg = tiny(**{"federation.rounds": 3, "output.dir": str(tmp_path / "run")})
    interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, progress=False)
    monkeypatch.undo()
    out = Path(cfg.output.dir)
    assert run_state(out) == "interrupted"

    code, _, err = cli("run", "--resume", out, "--rounds", "5")  # a flag that changes the config
    assert code == 2 and err.count("\n") == 1
    assert "federation.rounds (checkpoint 3, now 5)" in err
    text = (out / "config.toml").read_text()
    (out / "config.toml").write_text(text.replace("lr = 0.3", "lr = 0.2"))  # an edited config.toml
    code, _, err = cli("run", "--resume", out)
    assert code == 2 and "client.lr (checkpoint 0.3, now 0.2)" in err and err.count("\n") == 1
    (out / "config.toml").write_text(text)
    code, _, err = cli("run", "configs/quickstart.toml", "--resume", out)
    assert code == 2 and "give no config file" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = cli("run", "--resume", empty)
    assert code == 2 and "not a run directory" in err
    (out / "checkpoint.safetensors").unlink()
    code, _, err = cli("run", "--resume", out)
    assert code == 2 and "no checkpoint to resume from" in err and err.count("\n") == 1


def test_a_finished_run_is_refused_unless_overwritten(tiny, cli, tmp_path):
    cfg = tiny(**{"federation.rounds": 1, "output.dir": str(tmp_path / "run")})
    out = run_experiment(cfg, progress=False)
    before = (out / "summary.json").read_text()
    args = ["run", "--num-clients", "6", "--clients-per-round", "3", "--rounds", "1", "--out", out, "--no-progress"]
    code, _, err = cli(*args)
    assert code == 2 and err == f"error: output.dir: {out}: finished run; use --resume, or --overwrite\n"
    assert (out / "summary.json").read_text() == before  # untouched
    code, _, err = cli("run", "--resume", out)
    assert code == 2 and "finished run, nothing to resume" in err
    assert run_experiment(cfg, progress=False, resume=True) == out  # the library: nothing to do
    assert (out / "summary.json").read_text() == before

    code, _, err = cli(*args, "--overwrite")
    assert code == 0, err
    assert (out / "summary.json").read_text() != before
    log = (out / "run.log").read_text()
    assert log.count("round 1/1") == 1  # the old run's log went with it


def test_an_unfinished_run_with_rounds_is_refused_and_a_live_one_always(tiny, tmp_path, monkeypatch):
    from fedsim.errors import FedsimError

    cfg = tiny(**{"federation.rounds": 3, "output.dir": str(tmp_path / "run")})
    interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, progress=False)
    monkeypatch.undo()
    with pytest.raises(FedsimError, match=r"unfinished run \(interrupted after round 1 of 3\); use --resume"):
        run_experiment(cfg, progress=False)
    # a run whose summary says a live process (this one) writes it: refused whatever is asked
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    (tmp_path / "run" / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    for kw in ({}, {"resume": True}, {"overwrite": True}):
        with pytest.raises(FedsimError, match="a run is writing it"):
            run_experiment(cfg, progress=False, **kw)


def test_library_resume_continues_or_starts_fresh(tiny, tmp_path, monkeypatch):
    kw = {"federation.rounds": 3, "privacy.noise_multiplier": 1.0, "strategy.name": "fedadam"}
    cfg = tiny(**kw, **{"output.dir": str(tmp_path / "run")})
    interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, progress=False)
    monkeypatch.undo()
    out = run_experiment(cfg, progress=False, resume=True)
    reference = run_experiment(tiny(**kw, **{"output.dir": str(tmp_path / "ref")}), progress=False)
    assert without_wall(out) == without_wall(reference)
    assert "resumed after round 2 of 3" in (out / "run.log").read_text()
    # resume=True where there is nothing to resume from: a fresh run
    fresh = run_experiment(tiny(**kw, **{"output.dir": str(tmp_path / "fresh")}), progress=False, resume=True)
    assert without_wall(fresh) == without_wall(reference)


def test_checkpoint_every_n_rounds_and_never(tiny, tmp_path, monkeypatch):
    saved = []
    real = server.save_checkpoint
    monkeypatch.setattr(server, "save_checkpoint", lambda d, c, *rest: (saved.append(c.round), real(d, c, *rest))[1])
    run_experiment(tiny(**{"federation.rounds": 5, "output.checkpoint_every": 2,
                           "output.dir": str(tmp_path / "two")}), progress=False)
    assert saved == [2, 4]  # not after the last round: the finished run has model.safetensors
    saved.clear()
    out = run_experiment(tiny(**{"output.checkpoint_every": 0, "output.dir": str(tmp_path / "off")}),
                         progress=False)
    assert saved == [] and "checkpoints: off (output.checkpoint_every = 0)" in (out / "run.log").read_text()


def test_the_epsilon_mean_does_not_depend_on_the_order_clients_joined(tiny, tmp_path):
    """A resumed run restores its clients sorted by partition; an uninterrupted one holds them in
    the order they first trained. The mean of their epsilons must not see the difference:
    (0.1 + 0.2) + 0.3 and (0.3 + 0.2) + 0.1 differ in the last bit."""
    from fedsim import records as R

    def mean_after(order: list[int]) -> float:
        cfg = tiny(**{"privacy.noise_multiplier": 1.0, "output.dir": str(tmp_path / f"r{order[0]}")})
        recorder = server.RunRecorder(cfg, Path(cfg.output.dir), progress=False)
        for pid in order:
            recorder.on_train_reply({R.PARTITION_ID: pid, R.NUM_EXAMPLES: 10, R.EPSILON: [0.1, 0.2, 0.3][pid],
                                     R.SAMPLE_RATE: 0.5, R.TRAIN_LOSS: 1.0})
        recorder.on_round_end(1, {"accuracy": 0.5, "loss": 1.0})
        recorder.close("finished")
        return recorder.rows[-1]["sample_epsilon_mean"]

    assert (0.1 + 0.2) + 0.3 != (0.3 + 0.2) + 0.1
    assert mean_after([0, 1, 2]) == mean_after([2, 1, 0]) == 0.6 / 3
