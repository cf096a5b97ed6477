"""Real deployment on loopback: SuperLink + SuperNodes over gRPC, TLS, a lost node, a killed
`fedsim`, 20 authenticated nodes; and `deploy certs` and failure messages without processes.

Bounded in time (every wait has a timeout), on free ports, and every process a test
starts is stopped by the test itself (process groups, so Flower's own children too).
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fedsim.deploy import LocalDeployment, deploy_local, make_certificates
from fedsim.errors import ClientFailure
from fedsim.run import prepare, run_experiment

ROOT = Path(__file__).resolve().parents[2]


def rows(out):
    return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in csv.DictReader((out / "rounds.csv").open())]


def test_deployment_over_tls_with_node_auth_matches_simulation(tiny, tmp_path):
    # secure_noise off: a deployment's auto is on, whose noise no seed reproduces
    kw = {"federation.num_clients": 2, "federation.clients_per_round": 2, "federation.rounds": 2,
          "privacy.noise_multiplier": 1.0, "privacy.secure_noise": "off"}
    # SuperNodes train one message at a time with the default engine (vectorized here): the
    # simulation trains each client alone too (chunks of 1), so the bits agree, not only the draws
    sim = run_experiment(tiny(**kw, **{"output.dir": str(tmp_path / "sim"), "runtime.engine_chunk": 1}),
                         progress=False)
    cfg = prepare(tiny(**kw, **{"output.dir": str(tmp_path / "dep")}))
    dep = deploy_local(cfg, 2, auth=True, timeout=240)  # TLS + registered SuperNode keys
    # same partitions (same seed), same sampling, same noise: the deployed run is identical
    assert rows(dep) == rows(sim)
    assert json.loads((dep / "summary.json").read_text())["status"] == "finished"
    assert (dep / "clients.csv").read_text() == (sim / "clients.csv").read_text()


def test_supernode_without_the_ca_cannot_join(tiny, tmp_path):
    cfg = tiny(**{"federation.num_clients": 1, "federation.clients_per_round": 1})
    dep = LocalDeployment(cfg, 1, certs=make_certificates(tmp_path / "certs"))
    stranger_ca = make_certificates(tmp_path / "other").ca_cert
    try:
        dep.start_superlink()
        node = dep.start_supernode(0, root_cert=stranger_ca, max_wait=5)
        node.wait(timeout=90)
        assert node.returncode != 0
        text = (dep.group.log_dir / "supernode-0.log").read_text().lower()
        assert any(w in text for w in ("certificate", "ssl", "handshake", "unavailable"))
    finally:
        dep.group.stop_all()
    assert all(p.poll() is not None for _, p in dep.group.procs)
    with socket.socket() as s:  # the port is free again
        s.bind(("127.0.0.1", dep.link_port))


def test_supernode_with_an_unregistered_key_cannot_join(tiny, tmp_path):
    cfg = tiny(**{"federation.num_clients": 1, "federation.clients_per_round": 1})
    dep = LocalDeployment(cfg, 1, certs=make_certificates(tmp_path / "certs"), auth=True)
    try:
        dep.start_superlink()
        dep.node_key(0)  # a registered key exists, but the node signs in with another one
        stranger = dep.node_key(1, register=False)
        node = dep.start_supernode(0, key=stranger, max_wait=5)
        with pytest.raises(ClientFailure) as err:  # waiting for it to come online ends when it exits
            dep.wait_for_nodes(timeout=120)
        assert node.returncode != 0
        assert "failed to activate supernode" in (dep.group.log_dir / "supernode-0.log").read_text().lower()
        assert "SuperNode 0 exited" in str(err.value)
        assert "the SuperLink refused SuperNode(s) 0" in str(err.value)
    finally:
        dep.group.stop_all()
    assert all(p.poll() is not None for _, p in dep.group.procs)


@pytest.mark.slow
def test_killed_supernode_mid_run_loses_nothing(tiny, tmp_path):
    cfg = prepare(tiny(**{"federation.num_clients": 3, "federation.clients_per_round": 2, "federation.rounds": 4,
                          "runtime.round_timeout": 20.0, "output.dir": str(tmp_path / "dep")}))
    dep = LocalDeployment(cfg, 3)
    out = tmp_path / "dep"
    try:
        dep.start_superlink()
        for pid in range(3):
            dep.start_supernode(pid)
        runner = threading.Thread(target=dep.submit, args=(400,))
        runner.start()
        deadline = time.monotonic() + 240
        while not (out / "rounds.csv").is_file() or len(rows(out)) < 1:
            assert time.monotonic() < deadline, "no round finished"
            time.sleep(0.5)
        before = rows(out)
        dep.group.stop("supernode-2")
        runner.join(timeout=400)
        assert not runner.is_alive()
    finally:
        dep.group.stop_all()
    after = rows(out)
    assert after[: len(before)] == before  # nothing already written is lost
    summary = json.loads((out / "summary.json").read_text())
    log = (out / "run.log").read_text() if (out / "run.log").exists() else ""
    # either the run finished with the two remaining nodes, or it failed naming the lost one
    assert summary["status"] == "finished" or "partition 2" in log


# ----------------------------------------------------------------------------- processes

def proc_stat(pid: int) -> tuple[int, int, str, int] | None:
    """(parent pid, session id, state, start time) of a process from /proc, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[1]), int(fields[3]), fields[0].decode(), int(fields[19])


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def descendants(root: int) -> dict[int, int]:
    """pid -> start time of every living descendant of `root`."""
    stats = {pid: st for pid in all_pids() if (st := proc_stat(pid))}
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _, state, start) in stats.items():
            if ppid == parent and pid not in found and state != "Z":
                found[pid] = start
                frontier.append(pid)
    return found


def survivors(family: dict[int, int], sessions: set[int]) -> list[int]:
    """Processes of `family` (same pid and start time) or of `sessions` that are still running."""
    left = []
    for pid in all_pids():
        st = proc_stat(pid)
        if st is None or st[2] == "Z":
            continue
        if family.get(pid) == st[3] or st[1] in sessions:
            left.append(pid)
    return left


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def port_open(superlink_cmdline: str) -> bool:
    port = int(re.search(r"--port (\d+)", superlink_cmdline).group(1))
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_fedsim_kills_every_process_it_started(tmp_path):
    """`kill -9` of `fedsim deploy local` runs none of its cleanup: the SuperLink, the SuperNodes,
    Flower's SuperExecs (one in a session of its own) and the watchdog must still all end."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedsim.cli", "deploy", "local", "--dataset", "digits", "--num-clients", "2",
           "--clients-per-round", "2", "--rounds", "5", "--set", "model.hidden=[8]", "--nodes", "2",
           "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    fedsim = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sessions: set[int] = set()
    try:
        # wait, by what runs (not by fedsim's logs), until the SuperLink's port is up and
        # Flower has started a SuperExec for the SuperLink and for each SuperNode
        deadline = time.monotonic() + 300
        while True:
            assert fedsim.poll() is None, f"fedsim exited early with code {fedsim.returncode}"
            assert time.monotonic() < deadline, "the deployment did not start"
            family = descendants(fedsim.pid)
            commands = {pid: cmdline(pid) for pid in family}
            link = [c for c in commands.values() if "flower-superlink" in c]
            if link and sum("flower-superexec" in c for c in commands.values()) >= 3 and port_open(link[0]):
                break
            time.sleep(0.2)
        sessions = {st[1] for pid in family if (st := proc_stat(pid))} | {fedsim.pid}
        assert len(family) >= 6  # SuperLink, 2 SuperNodes, their 3 SuperExecs (and the watchdog)
        fedsim.send_signal(signal.SIGKILL)
        fedsim.wait()
        deadline = time.monotonic() + 30  # the watchdog's grace is 5 s; room for a loaded machine
        while (left := survivors(family, sessions)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"still running after fedsim was killed: {left}"
    finally:
        if fedsim.poll() is None:
            fedsim.kill()
            fedsim.wait()
        for session in sessions:  # never leave a failed test's processes behind
            for pid in survivors({}, {session}):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


# ----------------------------------------------------------------------------- failures and certificates

def test_a_failed_deployment_names_its_cause_from_the_logs(tiny, tmp_path):
    """What the logs of the README's failed 20-node run held, reduced to two nodes: Flower
    revoked node 1's ClientApp tokens, and the ServerApp gave up on discovery. The error is
    one line that says both, maps Flower's node id to the SuperNode, and says where to look."""
    cfg = tiny(**{"federation.num_clients": 2, "federation.clients_per_round": 2})
    dep = LocalDeployment(cfg, 2)
    logs = dep.log_dir
    logs.mkdir(parents=True)
    (logs / "supernode-0.log").write_text("INFO :      SuperNode ID: 1111\n")
    revoked = "\x1b[91mERROR \x1b[0m:     [/v1/runtime/pull-task-input][ApiError:1008] Runtime task-token " \
              "authentication failed.\n"
    (logs / "supernode-1.log").write_text("INFO :      SuperNode ID: 2222\n" + revoked * 3)
    (logs / "flwr-run.log").write_text(
        "Traceback (most recent call last):\n  File \"server.py\", line 1\n"
        "fedsim.errors.ClientFailure: discovery: node(s) 2222 (1 of 2) did not answer within 600 s\n"
        "ERROR :     Exit Code: 201\n")
    text = str(dep.failure("deployed run ended with status 'failed'"))
    assert "\n" not in text
    assert text.startswith("deployed run ended with status 'failed': discovery: node(s) 2222 (1 of 2) did not answer")
    assert "node 2222 is SuperNode 1" in text and "SuperNode 0" not in text
    assert "SuperNode(s) 1 did not report within Flower's 30 s and were dropped 3 times" in text
    assert text.endswith(f"logs in {logs}")


def test_deploy_certs_refuses_a_file_and_never_overwrites_silently(cli, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    code, _, err = cli("deploy", "certs", a_file)
    assert code == 2 and err == f"error: deploy certs: {a_file} is a file, not a directory; " \
                                "name a directory to write into\n"
    code, _, err = cli("deploy", "certs", a_file / "certs")  # an OS error: one line, exit 1
    assert code == 1 and err.count("\n") == 1 and "Not a directory" in err

    certs = tmp_path / "certs"
    assert cli("deploy", "certs", certs)[0] == 0
    first = {p.name: p.read_bytes() for p in certs.iterdir()}
    assert sorted(first) == ["ca.crt", "server.key", "server.pem"]
    assert (certs / "server.key").stat().st_mode & 0o777 == 0o600
    code, _, err = cli("deploy", "certs", certs)
    assert code == 2 and err.count("\n") == 1 and "already exist; pass --overwrite" in err
    assert {p.name: p.read_bytes() for p in certs.iterdir()} == first  # untouched
    assert cli("deploy", "certs", certs, "--overwrite")[0] == 0
    assert (certs / "ca.crt").read_bytes() != first["ca.crt"]
    assert (certs / "server.key").stat().st_mode & 0o777 == 0o600


# ----------------------------------------------------------------------------- the app bundle

BUNDLE_PROBE = """
import json, sys
# fedsim as a wheel installs it: an editable install's finder would serve the checkout's
# clients/ and strategies/ beside the bundle's fedsim/, and hide what a wheel user meets
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
from flwr.supercore.object_ref import load_app  # what a SuperNode's ClientApp process calls
app = load_app("fedsim.clients.app:app", ValueError, sys.argv[1])
import fedsim, fedsim.clients.app, fedsim.strategies.fedavg
print(json.dumps([type(app).__name__] + [m.__file__ for m in (fedsim, fedsim.clients.app, fedsim.strategies.fedavg)]))
"""


def test_the_app_bundle_imports_its_own_clients_and_strategies(tmp_path):
    """`flwr run .` and `fedsim deploy local` ship the checkout as a Flower App Bundle, which
    leaves out symbolic links such as fedsim/clients and fedsim/strategies. Unpacked and
    loaded as a SuperNode loads it, it must still import fedsim.clients and
    fedsim.strategies, from the bundle itself (not from an installed fedsim)."""
    import zipfile
    from io import BytesIO

    from flwr.cli.build import build_fab_from_disk

    bundle = tmp_path / "app"
    with zipfile.ZipFile(BytesIO(build_fab_from_disk(ROOT))) as fab:
        fab.extractall(bundle)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run([sys.executable, "-c", BUNDLE_PROBE, str(bundle)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    kind, *files = json.loads(done.stdout.strip().splitlines()[-1])
    assert kind == "ClientApp"
    assert [Path(f).relative_to(bundle).as_posix() for f in files] == [
        "fedsim/__init__.py", "clients/app.py", "strategies/fedavg.py"]


@pytest.mark.slow
def test_twenty_authenticated_nodes_end_to_end(tiny, tmp_path):
    """The README's `deploy local --nodes 20 --auth` on the tiny experiment (2 rounds, 4 nodes a
    round): every node registers, comes online and answers discovery on this machine's CPUs."""
    cfg = prepare(tiny(**{"federation.num_clients": 20, "federation.clients_per_round": 4,
                          "federation.rounds": 2, "runtime.discovery_timeout": 1200.0,
                          "output.dir": str(tmp_path / "dep")}))
    started = time.monotonic()
    out = deploy_local(cfg, 20, auth=True, timeout=1800)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_completed"] == 2
    deploy_log = (out / "deploy" / "logs" / "deploy.log").read_text()
    assert "registered 20 SuperNode key(s)" in deploy_log and "all 20 SuperNodes online" in deploy_log
    print(f"20 authenticated nodes, 2 rounds: {time.monotonic() - started:.0f} s")  # for docs/deployment.md
