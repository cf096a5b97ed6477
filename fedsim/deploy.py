"""`fedsim deploy`: the same ServerApp and ClientApp on a real Flower SuperLink and SuperNodes.

`deploy local` starts one SuperLink and N SuperNodes on loopback as subprocesses, submits
the experiment with `flwr run`, waits for it, and stops every process it started, on
success, failure and Ctrl-C alike (each child runs in its own process group, which is
terminated, then killed). Ports are picked free; nothing binds beyond 127.0.0.1 unless
``--host`` says so.

The experiment reaches the apps as a file path in the run config (``config-path``);
the ServerApp reads it and hands the TOML to every node in the discovery message, so a
SuperNode needs nothing but its ``--node-config``.

`deploy certs DIR` writes a self-signed CA and a server certificate for 127.0.0.1 /
localhost with Python's `cryptography`, for local TLS tests.

With ``auth`` (which implies TLS) the SuperLink only admits registered SuperNodes: each
node gets an EC key pair in OpenSSH format, its public key is registered with
`flwr supernode register` once the SuperLink is up, and the node proves it holds the
private key (``--auth-supernode-private-key``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedsim.config import Config, dumps_toml
from fedsim.errors import ClientFailure, FedsimError
from fedsim.results import is_finished, read_summary

log = logging.getLogger("fedsim")
FEDERATION = "fedsim-local"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise FedsimError(f"deploy: a process exited with code {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise FedsimError(f"deploy: nothing listens on {host}:{port} after {timeout:.0f} s")


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


def make_certificates(directory: str | Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                      days: int = 30) -> Certificates:
    """A self-signed CA and a server certificate signed by it (EC P-256), for testing only."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = Path(directory)
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
    paths = Certificates(out / "ca.crt", out / "server.pem", out / "server.key")
    paths.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.server_key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.TraditionalOpenSSL,
                                                   serialization.NoEncryption()))
    os.chmod(paths.server_key, 0o600)
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
    paths.private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                serialization.NoEncryption()))
    os.chmod(paths.private, 0o600)
    paths.public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                           serialization.PublicFormat.OpenSSH))
    return paths


# --------------------------------------------------------------------------- processes

@dataclass
class ProcessGroup:
    """Children started in their own sessions, so stopping them stops their children too."""

    log_dir: Path
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        logfile = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env or child_env(), stdin=subprocess.DEVNULL)
        logfile.close()
        self.procs.append((name, proc))
        return proc

    def stop(self, name: str, timeout: float = 10.0) -> None:
        for n, proc in self.procs:
            if n == name:
                _stop(proc, timeout)

    def stop_all(self, timeout: float = 10.0) -> None:
        for _, proc in reversed(self.procs):
            _stop(proc, timeout)


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
    Flower processes (flower-superexec, flwr-clientapp) by name."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), **extra}


def _bin(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        raise FedsimError(f"deploy: {name} not found; install flwr in this environment")
    return found


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

    def tls_args(self, server: bool) -> list[str]:
        if self.certs is None:
            return ["--insecure"]
        if server:
            return ["--ssl-ca-certfile", str(self.certs.ca_cert), "--ssl-certfile", str(self.certs.server_cert),
                    "--ssl-keyfile", str(self.certs.server_key)]
        return ["--root-certificates", str(self.certs.ca_cert)]

    def start_superlink(self) -> None:
        proc = self.group.start("superlink", [
            _bin("flower-superlink"), *self.tls_args(True), "--host", self.host, "--port", str(self.link_port),
            "--disable-runtime-dependency-installation", "--database", str(self.work / "superlink.db"),
            *(["--enable-supernode-auth"] if self.auth else [])],
            env=child_env(FEDSIM_OUTPUT_ROOT=str(Path(self.cfg.output.dir).resolve().parent)))  # run dir's root
        wait_for_port(self.host, self.link_port, 60, proc)

    def node_key(self, partition_id: int, register: bool = True) -> NodeKey:
        """A fresh key pair for one SuperNode, registered with the SuperLink unless told not to."""
        key = make_node_key(self.work / "keys", f"node{partition_id}")
        if register:
            done = self.flwr(["supernode", "register", str(key.public), FEDERATION],
                             f"register-{partition_id}.log", timeout=60)
            if done.returncode != 0:
                raise FedsimError(f"deploy: registering node {partition_id}'s key failed; "
                                  f"see {self.work / 'logs' / f'register-{partition_id}.log'}")
        return key

    def start_supernode(self, partition_id: int, root_cert: Path | None = None,
                        max_wait: float = 60.0, key: NodeKey | None = None) -> subprocess.Popen:
        """One SuperNode holding `partition_id`; `root_cert` overrides the CA it trusts.
        With authentication on, it signs in with `key` (by default a freshly registered one)."""
        tls = self.tls_args(False) if root_cert is None else ["--root-certificates", str(root_cert)]
        if self.auth and key is None:
            key = self.node_key(partition_id)
        auth = ["--auth-supernode-private-key", str(key.private)] if key is not None else []
        return self.group.start(f"supernode-{partition_id}", [
            _bin("flower-supernode"), *tls, *auth, "--superlink", self.address,
            "--node-config", f"partition-id={partition_id} num-partitions={self.nodes}",
            "--port", str(free_port(self.host)), "--max-wait-time", str(max_wait)])

    def flwr_home(self) -> Path:
        home = self.work / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        tls = "insecure = true" if self.certs is None else f'root-certificates = "{self.certs.ca_cert}"'
        (home / "config.toml").write_text(f'[superlink.{FEDERATION}]\naddress = "{self.address}"\n{tls}\n')
        return home

    def flwr(self, args: list[str], log_name: str, timeout: float) -> subprocess.CompletedProcess:
        """The `flwr` CLI against this deployment's SuperLink, its output in logs/<log_name>."""
        env = child_env(FLWR_HOME=str(self.flwr_home()))
        with open(self.work / "logs" / log_name, "wb") as out:
            return subprocess.run([_bin("flwr"), *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout, stdin=subprocess.DEVNULL, cwd=project_root())

    def submit(self, timeout: float) -> subprocess.CompletedProcess:
        experiment = self.work / "experiment.toml"
        experiment.write_text(dumps_toml(self.cfg))
        return self.flwr(["run", str(project_root()), FEDERATION, "--stream",
                          "--run-config", f"config-path='{experiment}'"], "flwr-run.log", timeout)


def deploy_local(cfg: Config, nodes: int, *, tls: bool = False, auth: bool = False, host: str = "127.0.0.1",
                 timeout: float = 1800.0) -> Path:
    """Run `cfg` through a local SuperLink and `nodes` SuperNodes; returns the run directory.

    `auth` turns on SuperNode authentication (and TLS): only registered keys may join."""
    if nodes != cfg.federation.num_clients:
        raise FedsimError(f"--nodes: {nodes} must equal federation.num_clients ({cfg.federation.num_clients}): "
                          f"each SuperNode holds one partition")
    out = Path(cfg.output.dir)
    certs = make_certificates(out / "deploy" / "certs") if tls or auth else None
    dep = LocalDeployment(cfg, nodes, host, certs, auth)
    try:
        dep.start_superlink()
        for pid in range(nodes):
            dep.start_supernode(pid)
        try:
            dep.submit(timeout)
        except subprocess.TimeoutExpired:
            raise FedsimError(f"deploy: the run did not finish within {timeout:.0f} s; "
                              f"logs in {dep.group.log_dir}") from None
    finally:
        dep.group.stop_all()
    if not is_finished(out):
        status = (read_summary(out) or {}).get("status", "no summary")
        raise ClientFailure(f"deployed run ended with status {status!r}; logs in {dep.group.log_dir}")
    return out
