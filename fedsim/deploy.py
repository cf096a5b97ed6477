"""`fedsim deploy`: the same ServerApp and ClientApp on a real Flower SuperLink and SuperNodes.

`deploy local` starts one SuperLink and N SuperNodes on loopback as subprocesses, waits
until every node is online, submits the experiment with `flwr run`, waits for it, and stops
every process it started, on success, failure and Ctrl-C alike (each child runs in its own
process group, which is terminated, then killed). If `fedsim` itself is killed (even with
``kill -9``), its children die with it: the kernel signals each direct child
(``PR_SET_PDEATHSIG``) and `fedsim.watchdog` stops the process groups below them. Ports are
picked free; nothing binds beyond 127.0.0.1 unless ``--host`` says so.

The experiment reaches the apps as a file path in the run config (``config-path``);
the ServerApp reads it and hands the TOML to every node in the discovery message, so a
SuperNode needs nothing but its ``--node-config``.

Why the start-up is paced (measured with 20 authenticated nodes on 2 cores): every message
to a node starts a fresh ClientApp process, which must report to its SuperNode within
Flower's 30 s or its task token is revoked ("Runtime task-token authentication failed") and
the task is retried. Twenty processes importing Flower at once on two cores all miss that
window together, and the retries miss it again, so nodes never answered discovery. Hence:
the SuperLink keeps its state in memory (a SQLite file adds "database is locked" errors under
that load), all keys are registered in one process before any node starts, the run is submitted only once
`flwr supernode list` shows every node online, and the ServerApp asks at most as many nodes
at a time as this machine has CPUs (``discovery-window`` in the run config). A failed run's
cause, read from the processes' logs, goes into ``deploy/logs/deploy.log``, ``run.log`` and
the error message.

`deploy certs DIR` writes a self-signed CA and a server certificate for 127.0.0.1 /
localhost with Python's `cryptography`, for local TLS tests. It refuses to replace existing
files unless asked to (``overwrite``).

With ``auth`` (which implies TLS) the SuperLink only admits registered SuperNodes: each
node gets an EC key pair in OpenSSH format, its public key is registered with
`flwr supernode register` once the SuperLink is up, and the node proves it holds the
private key (``--auth-supernode-private-key``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fedsim.config import Config, dumps_toml
from fedsim.errors import ClientFailure, FedsimError
from fedsim.results import is_finished, read_summary, run_log
from fedsim.watchdog import die_with_parent

log = logging.getLogger("fedsim.deploy")
FEDERATION = "fedsim-local"
CONNECTED_LINE = re.compile(r"SuperNode ID: (\d+)")  # what a SuperNode logs once the SuperLink admitted it
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ClientFailure(f"deploy: a process exited with code {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise ClientFailure(f"deploy: nothing listens on {host}:{port} after {timeout:.0f} s")


def project_root() -> Path:
    """The Flower App directory: the checkout that holds fedsim's pyproject.toml."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise FedsimError("deploy: needs fedsim's source checkout (pip install -e .), "
                          "since `flwr run` builds the app from it")
    return root


# --------------------------------------------------------------------------- certificates

@dataclass(frozen=True)
class Certificates:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def _write_private(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` atomically with `mode` from the start (a key is never readable by others,
    not even for a moment, and a crash never leaves half a certificate)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def make_certificates(directory: str | Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                      days: int = 30, overwrite: bool = False) -> Certificates:
    """A self-signed CA and a server certificate signed by it (EC P-256), for testing only.

    Refuses (`FedsimError`) a `directory` that is a file, and existing certificate files
    unless `overwrite`: a CA that SuperNodes already trust must not be replaced by accident.
    OS errors (unwritable directory, full disk) propagate as `OSError`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise FedsimError(f"deploy certs: {out} is a file, not a directory; name a directory to write into")
    paths = Certificates(out / "ca.crt", out / "server.pem", out / "server.key")
    existing = [str(p) for p in (paths.ca_cert, paths.server_cert, paths.server_key) if p.exists()]
    if existing and not overwrite:
        raise FedsimError(f"deploy certs: {', '.join(existing)} already exist; pass --overwrite to replace them "
                          f"(SuperNodes that trust the old CA will then refuse the SuperLink)")
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsim test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    _write_private(paths.server_key, key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                                       serialization.NoEncryption()), 0o600)
    _write_private(paths.server_cert, cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths.ca_cert, ca.public_bytes(serialization.Encoding.PEM))
    return paths


@dataclass(frozen=True)
class NodeKey:
    private: Path
    public: Path


def make_node_key(directory: str | Path, name: str) -> NodeKey:
    """An EC P-384 key pair in OpenSSH format: what SuperNode authentication expects."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    paths = NodeKey(out / name, out / f"{name}.pub")
    _write_private(paths.private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                    serialization.NoEncryption()), 0o600)
    _write_private(paths.public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                               serialization.PublicFormat.OpenSSH))
    return paths


# --------------------------------------------------------------------------- processes

@dataclass
class ProcessGroup:
    """Children started in their own sessions, so stopping them stops their children too.

    They die with this process however it ends: each gets SIGTERM from the kernel when it
    dies, and a watchdog process (`fedsim.watchdog`) stops every process group below them."""

    log_dir: Path
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    watchdog: subprocess.Popen | None = None

    def start(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._watch_start()
        with open(self.log_dir / f"{name}.log", "wb") as logfile:
            proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=env or child_env(), stdin=subprocess.DEVNULL,
                                    preexec_fn=die_with_parent())
        self.procs.append((name, proc))
        self._tell(f"+{proc.pid}")
        return proc

    def _watch_start(self) -> None:
        if self.watchdog is not None:
            return
        script = Path(__file__).with_name("watchdog.py")
        self.watchdog = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                                         stdout=subprocess.DEVNULL, start_new_session=True)

    def _tell(self, line: str) -> None:
        if self.watchdog is not None and self.watchdog.stdin is not None:
            try:
                self.watchdog.stdin.write(f"{line}\n".encode())
                self.watchdog.stdin.flush()
            except BrokenPipeError:  # the watchdog is gone; the kernel signal still applies
                pass

    def stop(self, name: str, timeout: float = 10.0) -> None:
        for n, proc in self.procs:
            if n == name:
                _stop(proc, timeout)

    def stop_all(self, timeout: float = 10.0) -> None:
        for _, proc in reversed(self.procs):
            _stop(proc, timeout)
        if self.watchdog is not None:  # closing its stdin makes it stop what Flower left behind
            with contextlib.suppress(BrokenPipeError):
                self.watchdog.stdin.close()
            try:
                self.watchdog.wait(timeout)
            except subprocess.TimeoutExpired:
                self.watchdog.kill()
                self.watchdog.wait()
            self.watchdog = None


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:  # the group may hold children (flower-superexec, flwr-clientapp) that outlive the leader
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def child_env(**extra: str) -> dict[str, str]:
    """Our environment with this interpreter's bin/ first: Flower's processes start further
    Flower processes (flower-superexec, flwr-clientapp) by name. Telemetry is off: a local
    deployment has no business phoning home, and with no network each attempt only costs time."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "FLWR_TELEMETRY_ENABLED": "0", **extra}


def _bin(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        raise FedsimError(f"deploy: {name} not found; install flwr in this environment")
    return found


def _read(path: Path) -> str:
    try:
        return ANSI.sub("", path.read_text(errors="replace"))
    except OSError:
        return ""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(empty log)"


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """fedsim.deploy's messages also go to `path` while inside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()


@dataclass
class LocalDeployment:
    """A SuperLink and its SuperNodes on this machine (see `deploy_local`)."""

    cfg: Config
    nodes: int
    host: str = "127.0.0.1"
    certs: Certificates | None = None
    auth: bool = False
    work: Path = field(init=False)
    group: ProcessGroup = field(init=False)
    link_port: int = field(init=False)

    def __post_init__(self) -> None:
        if self.auth and self.certs is None:
            raise FedsimError("deploy: SuperNode authentication needs TLS (--auth implies --tls)")
        self.work = Path(self.cfg.output.dir) / "deploy"
        self.group = ProcessGroup(self.work / "logs")
        self.link_port = free_port(self.host)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.link_port}"

    @property
    def log_dir(self) -> Path:
        return self.group.log_dir

    def tls_args(self, server: bool) -> list[str]:
        if self.certs is None:
            return ["--insecure"]
        if server:
            return ["--ssl-ca-certfile", str(self.certs.ca_cert), "--ssl-certfile", str(self.certs.server_cert),
                    "--ssl-keyfile", str(self.certs.server_key)]
        return ["--root-certificates", str(self.certs.ca_cert)]

    def start_superlink(self) -> None:
        """The SuperLink, its state in memory (Flower's default): a SQLite file gets "database
        is locked" errors when many nodes and tasks write at once on a loaded machine."""
        proc = self.group.start("superlink", [
            _bin("flower-superlink"), *self.tls_args(True), "--host", self.host, "--port", str(self.link_port),
            "--disable-runtime-dependency-installation",
            *(["--enable-supernode-auth"] if self.auth else [])],
            env=child_env(FEDSIM_OUTPUT_ROOT=str(Path(self.cfg.output.dir).resolve().parent)))  # run dir's root
        wait_for_port(self.host, self.link_port, 60, proc)
        log.info("SuperLink listening on %s (pid %d)", self.address, proc.pid)

    def node_key(self, partition_id: int, register: bool = True) -> NodeKey:
        """A fresh key pair for one SuperNode, registered with the SuperLink unless told not to."""
        key = make_node_key(self.work / "keys", f"node{partition_id}")
        if register:
            self.register_keys([key])
        return key

    def register_keys(self, keys: list[NodeKey]) -> None:
        """`flwr supernode register` for every key, in one process (`fedsim/register_keys.py`):
        a `flwr` call per key costs seconds of CPU each, minutes for 20 nodes on a busy machine."""
        script = Path(__file__).with_name("register_keys.py")
        env = child_env(FLWR_HOME=str(self.flwr_home()))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        logfile = self.log_dir / "register.log"
        with open(logfile, "ab") as out:
            done = subprocess.run([sys.executable, str(script), FEDERATION, *(str(k.public) for k in keys)],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, timeout=60 + 10 * len(keys),
                                  stdin=subprocess.DEVNULL, cwd=project_root(), preexec_fn=die_with_parent())
        if done.returncode != 0:
            raise ClientFailure(f"deploy: registering SuperNode keys failed: {_last_line(_read(logfile))}; "
                                f"see {logfile}")
        log.info("registered %d SuperNode key(s)", len(keys))

    def start_supernode(self, partition_id: int, root_cert: Path | None = None,
                        max_wait: float = 60.0, key: NodeKey | None = None) -> subprocess.Popen:
        """One SuperNode holding `partition_id`; `root_cert` overrides the CA it trusts.
        With authentication on, it signs in with `key` (by default a freshly registered one)."""
        tls = self.tls_args(False) if root_cert is None else ["--root-certificates", str(root_cert)]
        if self.auth and key is None:
            key = self.node_key(partition_id)
        auth = ["--auth-supernode-private-key", str(key.private)] if key is not None else []
        proc = self.group.start(f"supernode-{partition_id}", [
            _bin("flower-supernode"), *tls, *auth, "--superlink", self.address,
            "--node-config", f"partition-id={partition_id} num-partitions={self.nodes}",
            "--port", str(free_port(self.host)), "--max-wait-time", str(max_wait)])
        log.info("SuperNode %d started (pid %d)", partition_id, proc.pid)
        return proc

    def node_ids(self) -> dict[int, int]:
        """partition id -> Flower node id, for the SuperNodes that have logged theirs."""
        out = {}
        for pid in range(self.nodes):
            if match := CONNECTED_LINE.search(_read(self.log_dir / f"supernode-{pid}.log")):
                out[pid] = int(match.group(1))
        return out

    def online_nodes(self) -> set[int]:
        """Node ids the SuperLink reports online (`flwr supernode list`)."""
        done = self.flwr(["supernode", "list", "--format", "json", FEDERATION], "supernode-list.log", timeout=120)
        text = _read(self.log_dir / "supernode-list.log")
        if done.returncode != 0 or "{" not in text:
            return set()
        try:
            listing = json.loads(text[text.index("{"):])
        except json.JSONDecodeError:
            return set()
        return {int(n["node-id"]) for n in listing.get("nodes", []) if n.get("status") == "online"}

    def wait_for_nodes(self, timeout: float) -> None:
        """Return once the SuperLink lists every SuperNode online; fail early, naming the node
        and its last log line, if a SuperNode process exits, and after `timeout` seconds.

        A node's log says when it is admitted, which is free to poll; `flwr supernode list`,
        which costs seconds of CPU a call, confirms it then, and every 20 s in any case."""
        started = time.monotonic()
        deadline = started + timeout
        nodes = {int(n.removeprefix("supernode-")): p for n, p in self.group.procs if n.startswith("supernode-")}
        listed_at = started
        while True:
            exited = {pid: p.returncode for pid, p in nodes.items() if p.poll() is not None}
            if exited:
                pid, code = min(exited.items())
                raise ClientFailure(f"deploy: SuperNode {pid} exited with code {code} before the run started: "
                                    f"{_last_line(_read(self.log_dir / f'supernode-{pid}.log'))}; "
                                    f"{self._causes_text()}see {self.log_dir / f'supernode-{pid}.log'}")
            logged = self.node_ids()
            now = time.monotonic()
            late = now > deadline
            since = now - listed_at
            if (len(logged) == len(nodes) and since > 3) or since > 20 or late:
                online, listed_at = self.online_nodes(), time.monotonic()
                if len(online) >= len(nodes) and set(logged.values()) <= online:
                    log.info("all %d SuperNodes online after %.0f s", len(nodes), time.monotonic() - started)
                    return
                if late:
                    missing = sorted(pid for pid in nodes if logged.get(pid) not in online)
                    raise ClientFailure(
                        f"deploy: SuperNode(s) {', '.join(map(str, missing))} not online after {timeout:.0f} s "
                        f"(runtime.discovery_timeout); {self._causes_text()}see {self.log_dir}")
            time.sleep(1)

    def flwr_home(self) -> Path:
        home = self.work / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        tls = "insecure = true" if self.certs is None else f'root-certificates = "{self.certs.ca_cert}"'
        (home / "config.toml").write_text(f'[superlink.{FEDERATION}]\naddress = "{self.address}"\n{tls}\n')
        return home

    def flwr(self, args: list[str], log_name: str, timeout: float) -> subprocess.CompletedProcess:
        """The `flwr` CLI against this deployment's SuperLink, its output in logs/<log_name>."""
        env = child_env(FLWR_HOME=str(self.flwr_home()))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / log_name, "wb") as out:
            return subprocess.run([_bin("flwr"), *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout, stdin=subprocess.DEVNULL, cwd=project_root(),
                                  preexec_fn=die_with_parent())

    def submit(self, timeout: float, discovery_window: int | None = None) -> subprocess.CompletedProcess:
        """`flwr run` the experiment and stream its logs until it ends. `discovery_window` caps
        how many nodes the ServerApp asks at once (each answer starts a ClientApp process)."""
        from fedsim.records import DISCOVERY_WINDOW_KEY  # here: `deploy certs` need not import torch

        experiment = self.work / "experiment.toml"
        experiment.write_text(dumps_toml(self.cfg))
        run_config = f"config-path='{experiment}'"
        if discovery_window:
            run_config += f" {DISCOVERY_WINDOW_KEY}={discovery_window}"
        log.info("submitting the run (flwr run, run config: %s)", run_config)
        return self.flwr(["run", str(project_root()), FEDERATION, "--stream", "--run-config", run_config],
                         "flwr-run.log", timeout)

    # -- why a run failed -------------------------------------------------------------
    def causes(self) -> list[str]:
        """Known causes of failure, read from the processes' logs, one sentence each."""
        found = []
        texts = {pid: _read(self.log_dir / f"supernode-{pid}.log") for pid in range(self.nodes)}
        revoked = {pid: t.count("task-token authentication failed") for pid, t in texts.items()}
        revoked = {pid: n for pid, n in revoked.items() if n}
        if revoked:
            found.append(
                f"the ClientApp processes of SuperNode(s) {', '.join(map(str, sorted(revoked)))} did not report "
                f"within Flower's 30 s and were dropped {sum(revoked.values())} times (\"Runtime task-token "
                f"authentication failed\" in their logs): this machine has too little free CPU for "
                f"{self.nodes} nodes, since every message starts a ClientApp process; use fewer --nodes, "
                f"let other work finish, or raise runtime.discovery_timeout")
        refused = sorted(pid for pid, t in texts.items() if "failed to activate supernode" in t.lower())
        if refused:
            found.append(f"the SuperLink refused SuperNode(s) {', '.join(map(str, refused))} "
                         f"(\"Failed to activate SuperNode\": key not registered)")
        untrusted = sorted(pid for pid, t in texts.items()
                           if "certificate verify failed" in t.lower() or "certificate_verify_failed" in t.lower())
        if untrusted:
            found.append(f"SuperNode(s) {', '.join(map(str, untrusted))} do not trust the SuperLink's certificate")
        if "database is locked" in _read(self.log_dir / "superlink.log"):
            found.append("the SuperLink's SQLite state was locked (\"database is locked\")")
        return found

    def _causes_text(self) -> str:
        causes = self.causes()
        return "cause: " + "; ".join(causes) + "; " if causes else ""

    def server_error(self) -> str | None:
        """The ServerApp's own error: summary.json's, else the last exception line of the run's log."""
        summary = read_summary(Path(self.cfg.output.dir)) or {}
        if summary.get("error"):
            return str(summary["error"])
        lines = re.findall(r"^(?:[\w.]+\.)?\w*(?:Error|Failure|Exception): (.+)$",
                           _read(self.log_dir / "flwr-run.log"), flags=re.MULTILINE)
        return lines[-1].strip() if lines else None

    def failure(self, what: str) -> ClientFailure:
        """One line: what failed, the ServerApp's error, the causes in the logs (with the node
        ids Flower names mapped to partitions), and where the logs are."""
        text = what
        if reason := self.server_error():
            text += f": {reason}"
        ids = self.node_ids()
        named = {pid: nid for pid, nid in ids.items() if str(nid) in text}
        if named:
            text += " (" + ", ".join(f"node {nid} is SuperNode {pid}" for pid, nid in sorted(named.items())) + ")"
        if causes := self.causes():
            text += "; cause: " + "; ".join(causes)
        text += f"; logs in {self.log_dir}"
        return ClientFailure(text)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers narrow), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def deploy_local(cfg: Config, nodes: int, *, tls: bool = False, auth: bool = False, host: str = "127.0.0.1",
                 timeout: float = 1800.0) -> Path:
    """Run `cfg` through a local SuperLink and `nodes` SuperNodes; returns the run directory.

    `auth` turns on SuperNode authentication (and TLS): only registered keys may join.
    Waiting for nodes to come online and to answer discovery is bounded by
    ``runtime.discovery_timeout``; the run itself by `timeout` seconds. A failure raises
    `ClientFailure` with its cause (also in ``deploy/logs/deploy.log`` and ``run.log``)."""
    if nodes != cfg.federation.num_clients:
        raise FedsimError(f"--nodes: {nodes} must equal federation.num_clients ({cfg.federation.num_clients}): "
                          f"each SuperNode holds one partition")
    out = Path(cfg.output.dir)
    # the run's own certificates, made afresh for each deployment in its own directory
    certs = make_certificates(out / "deploy" / "certs", overwrite=True) if tls or auth else None
    dep = LocalDeployment(cfg, nodes, host, certs, auth)
    started = time.monotonic()
    with run_log(out), _log_to(dep.log_dir / "deploy.log"):
        log.info("deploying %s on %d SuperNodes (tls=%s, auth=%s)", cfg.name, nodes, certs is not None, auth)
        try:
            try:
                dep.start_superlink()
                keys = {pid: dep.node_key(pid, register=False) for pid in range(nodes)} if auth else {}
                if keys:  # all at once, before any node starts (see the module docstring)
                    dep.register_keys(list(keys.values()))
                for pid in range(nodes):
                    dep.start_supernode(pid, key=keys.get(pid))
                dep.wait_for_nodes(cfg.runtime.discovery_timeout)
                dep.submit(timeout, discovery_window=usable_cpus())
            except subprocess.TimeoutExpired:
                raise dep.failure(f"deploy: the run did not finish within {timeout:.0f} s") from None
            finally:
                dep.group.stop_all()
            if not is_finished(out):
                status = (read_summary(out) or {}).get("status", "no summary")
                raise dep.failure(f"deployed run ended with status {status!r}")
        except ClientFailure as exc:
            # INFO, not ERROR: the files get the cause; the console gets it once, from the CLI
            log.info("deployment failed after %.0f s: %s", time.monotonic() - started, exc)
            raise
        log.info("deployed run finished after %.0f s", time.monotonic() - started)
    return out
