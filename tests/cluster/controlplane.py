"""A real (if small) Kubernetes control plane for tests: etcd, kube-apiserver, controller-manager
and scheduler, all on 127.0.0.1 with free ports, plus the node agent that plays kubelet.

Why real binaries: the operator must be tested against real admission, RBAC, CRD validation,
status subresources and the built-in controllers (Deployments, Jobs, endpoints, SA tokens),
which fakes get subtly wrong.  Binaries come from ``tests/cluster/build.sh`` (cached outside
the tree).  Every process is started in its own session with its log in ``DIR/logs`` and its
pid *and* start time in ``DIR/state.json``, so ``stop()`` (or ``python -m tests.cluster down``)
kills exactly those processes and never a recycled pid.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import ipaddress
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

K8S_VERSION = "1.20.2"
REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = Path(__file__).resolve().with_name("build.sh")
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CIDR = "10.0.0.0/24"
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"


class ClusterError(RuntimeError):
    """A control-plane step failed; the message names the step and the log to read."""


def cache_dir() -> Path:
    """Where built binaries live (outside the work tree, shared by all checkouts)."""
    return Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune"))


def bin_dir() -> Path:
    return cache_dir() / f"k8s-v{K8S_VERSION}" / "bin"


def find_etcd() -> Path:
    for cand in ("/usr/bin/etcd", "/usr/local/bin/etcd"):
        if os.access(cand, os.X_OK):
            return Path(cand)
    raise ClusterError("etcd not found: run `bash tests/cluster/build.sh` (installs etcd-server)")


def ensure_binaries(build: bool = True) -> Path:
    """Return the cached binary dir, building it first (slow, once) if ``build`` is true."""
    names = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
    missing = [n for n in names if not os.access(bin_dir() / n, os.X_OK)]
    if missing:
        if not build:
            raise ClusterError(f"missing {missing} in {bin_dir()}: run `bash {BUILD_SCRIPT}` first")
        rc = subprocess.call(["bash", str(BUILD_SCRIPT)], stdout=sys.stderr)
        if rc != 0:
            raise ClusterError(f"{BUILD_SCRIPT} failed with exit code {rc}")
    find_etcd()
    return bin_dir()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    what: str,
    check: Callable[[], Any],
    timeout: float = 60.0,
    interval: float = 0.2,
    fail_fast: Callable[[], None] | None = None,
) -> Any:
    """Poll ``check`` until it returns something truthy; raise TimeoutError naming ``what``.

    Exceptions from ``check`` count as "not yet" (the last one is reported on timeout), except
    AssertionError and ClusterError, which mean "will never happen" and propagate at once, as
    does anything ``fail_fast`` raises (e.g. "the process we wait for died").
    """
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        if fail_fast is not None:
            fail_fast()
        try:
            result = check()
            if result:
                return result
        except (AssertionError, ClusterError):
            raise
        except Exception as exc:
            last = exc
        if time.monotonic() > deadline:
            extra = f" (last error: {last!r})" if last else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(interval)


# --------------------------------------------------------------------------- processes


def _proc_start_time(pid: int) -> int | None:
    """Kernel start time of ``pid`` (clock ticks), or None if gone/zombie; guards pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = stat.rsplit(")", 1)[1].split()
    if rest[0] in ("Z", "X"):
        return None
    return int(rest[19])


@dataclass
class ProcRecord:
    """One process we started: enough to find it again (and only it) from another process."""

    name: str
    pid: int
    start_time: int
    argv: list[str]
    log: str

    def alive(self) -> bool:
        return _proc_start_time(self.pid) == self.start_time

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait, then SIGKILL; reaps it when it is our child."""
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            _reap(self.pid)
            time.sleep(0.05)
        if self.alive():
            self.signal(signal.SIGKILL)
            wait_for(f"{self.name} (pid {self.pid}) to die", lambda: not self.alive(), 10)
        _reap(self.pid)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _spawn(
    name: str, argv: Sequence[str], log: Path, cwd: Path, env: Mapping[str, str] | None = None
) -> ProcRecord:
    """Start a detached process (own session) so it outlives the CLI that started it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n=== {dt.datetime.now().isoformat()} starting: {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
    start = None
    for _ in range(100):
        start = _proc_start_time(proc.pid)
        if start is not None:
            break
        time.sleep(0.01)
    if start is None:
        raise ClusterError(f"{name} exited immediately; see {log}")
    return ProcRecord(name, proc.pid, start, list(argv), str(log))


# --------------------------------------------------------------------------- PKI


def _write_pki(pki: Path) -> None:
    """CA, apiserver/agent serving certs and the service-account key pair (idempotent)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    if (pki / "sa.pub").exists():
        return
    pki.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    later = now + dt.timedelta(days=3650)

    def key() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def save_key(k: rsa.RSAPrivateKey, name: str) -> None:
        path = pki / name
        path.write_bytes(
            k.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)

    ca_key = key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubetune-test-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(later)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    save_key(ca_key, "ca.key")
    (pki / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def serving(name: str, cn: str, dns: list[str], ips: list[str]) -> None:
        k = key()
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_name)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(later)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        save_key(k, f"{name}.key")
        (pki / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    svc_ip = str(next(ipaddress.ip_network(SERVICE_CIDR).hosts()))
    serving(
        "apiserver",
        "kube-apiserver",
        [
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ],
        ["127.0.0.1", svc_ip],
    )
    serving("kubelet", "kubetune-node-agent", ["localhost"], ["127.0.0.1"])
    sa = key()
    save_key(sa, "sa.key")
    (pki / "sa.pub").write_bytes(
        sa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def write_kubeconfig(path: Path, server: str, ca_file: Path, token: str, user: str) -> None:
    """A token kubeconfig; YAML-by-hand because it is tiny and must not need PyYAML."""
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters:
- name: kubetune-test
  cluster:
    server: {server}
    certificate-authority: {ca_file}
users:
- name: {user}
  user:
    token: {token}
contexts:
- name: kubetune-test
  context:
    cluster: kubetune-test
    user: {user}
    namespace: default
current-context: kubetune-test
"""
    )
    path.chmod(0o600)


# --------------------------------------------------------------------------- control plane


@dataclass
class ClusterState:
    """What ``state.json`` holds: ports, credentials and the processes we own."""

    dir: str
    bin_dir: str
    etcd_port: int = 0
    etcd_peer_port: int = 0
    apiserver_port: int = 0
    kcm_port: int = 0
    scheduler_port: int = 0
    agent_port: int = 0
    admin_token: str = ""
    nodes: list[str] = field(default_factory=list)
    gpus_per_node: int = 8
    pod_cidr: str = ""
    cluster_id: str = ""
    procs: dict[str, ProcRecord] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClusterState:
        procs = {k: ProcRecord(**v) for k, v in data.pop("procs", {}).items()}
        return cls(**data, procs=procs)


class ControlPlane:
    """Start/stop the cluster in ``dir`` and help tests talk to it.

    ``ControlPlane(dir).start()`` is what ``python -m tests.cluster up`` and the pytest
    fixture call; ``ControlPlane.load(dir)`` reattaches to a running one (for ``down`` and
    for fault injection against a cluster started by hand).
    """

    def __init__(
        self,
        dir: Path | str,
        *,
        nodes: int = 2,
        gpus_per_node: int = 8,
        node_prefix: str = "gpu-node-",
        pod_env: Mapping[str, str] | None = None,
        image_entrypoints: Mapping[str, Sequence[str]] | None = None,
        etcd_on_tmpfs: bool = True,
        build: bool = True,
        run_pods: bool = True,
        node_monitor_grace_period: int = 40,
    ) -> None:
        """``run_pods=False``: the agent keeps the nodes Ready but never runs pods (they stay
        Pending; see ``nodeagent.py``), for benchmarks that only count API objects."""
        self.dir = Path(dir).resolve()
        self.run_pods = run_pods
        # Seconds without heartbeats before a node is NotReady/unreachable (Kubernetes' default
        # 40); a cluster for dead-node tests may shorten it.
        self.node_monitor_grace_period = node_monitor_grace_period
        self.build = build
        self.etcd_on_tmpfs = etcd_on_tmpfs
        self.pod_env = dict(pod_env or {})
        self.image_entrypoints = {k: list(v) for k, v in (image_entrypoints or {}).items()}
        self.state = ClusterState(
            dir=str(self.dir),
            bin_dir=str(bin_dir()),
            nodes=[f"{node_prefix}{i}" for i in range(nodes)],
            gpus_per_node=gpus_per_node,
        )

    # ----- paths
    @property
    def pki(self) -> Path:
        return self.dir / "pki"

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def kubectl_path(self) -> Path:
        """A wrapper that pins ``--kubeconfig`` so it can never hit another cluster."""
        return self.dir / "bin" / "kubectl"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.state.apiserver_port}"

    @property
    def nodes(self) -> list[str]:
        return list(self.state.nodes)

    def pod_dir(self, namespace: str, pod: str) -> Path:
        return self.dir / "pods" / f"{namespace}_{pod}"

    def pod_log_path(self, namespace: str, pod: str, container: str | None = None) -> Path:
        """Log file of a pod's container (the first one when ``container`` is None)."""
        from tests.cluster.nodeagent import find_log

        return find_log(self.dir, namespace, pod, container)

    def pod_log(self, namespace: str, pod: str, container: str | None = None) -> str:
        path = self.pod_log_path(namespace, pod, container)
        return path.read_text(errors="replace") if path.exists() else ""

    def _save(self) -> None:
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(asdict(self.state), indent=2))
        tmp.replace(self.dir / "state.json")

    @classmethod
    def load(cls, dir: Path | str) -> ControlPlane:
        d = Path(dir).resolve()
        try:
            data = json.loads((d / "state.json").read_text())
        except FileNotFoundError:
            raise ClusterError(f"no cluster state in {d} (state.json missing)") from None
        cp = cls(d, build=False)
        cp.state = ClusterState.from_json(data)
        agent_cfg = d / "agent.json"
        if agent_cfg.exists():
            cfg = json.loads(agent_cfg.read_text())
            cp.pod_env = cfg.get("pod_env", {})
            cp.image_entrypoints = cfg.get("image_entrypoints", {})
            cp.run_pods = bool(cfg.get("run_pods", True))
        return cp

    # ----- lifecycle
    def start(self, timeout: float = 120.0) -> ControlPlane:
        """Bring everything up and wait until nodes are Ready; cleans up on failure."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if (self.dir / "state.json").exists():
            old = ControlPlane.load(self.dir)
            if any(p.alive() for p in old.state.procs.values()):
                raise ClusterError(f"a cluster is already running in {self.dir}; run `down` first")
        self.state.bin_dir = str(ensure_binaries(self.build))
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        st = self.state
        _write_pki(self.pki)
        st.etcd_port, st.etcd_peer_port = free_port(), free_port()
        st.apiserver_port, st.kcm_port = free_port(), free_port()
        st.scheduler_port, st.agent_port = free_port(), free_port()
        st.admin_token = secrets.token_hex(16)
        st.cluster_id = secrets.token_hex(4)
        # One /24 of loopback per cluster so two clusters on a host do not hand out the same IPs.
        st.pod_cidr = f"127.{1 + st.apiserver_port % 250}.{1 + st.etcd_port % 250}.0/24"
        (self.dir / "tokens.csv").write_text(f'{st.admin_token},admin,admin,"system:masters"\n')
        (self.dir / "tokens.csv").chmod(0o600)
        write_kubeconfig(self.kubeconfig, self.server, self.pki / "ca.crt", st.admin_token, "admin")
        self.kubectl_path.parent.mkdir(parents=True, exist_ok=True)
        self.kubectl_path.write_text(
            f'#!/bin/sh\nexec "{st.bin_dir}/kubectl" --kubeconfig="{self.kubeconfig}" "$@"\n'
        )
        self.kubectl_path.chmod(0o755)
        self._save()

        self._start_etcd()
        self._start_apiserver(timeout)
        self._start_kcm_and_scheduler(timeout)
        self._start_agent()
        self.wait_nodes_ready(timeout)

    def _start_etcd(self) -> None:
        st = self.state
        data = self.dir / "etcd-data"
        if data.is_symlink() and not data.exists():
            data.unlink()  # left by a crashed run
        if self.etcd_on_tmpfs and Path("/dev/shm").is_dir() and not data.exists():
            # etcd 3.4 has no --unsafe-no-fsync; tmpfs keeps fsync cheap on slow disks.
            real = Path(f"/dev/shm/kubetune-etcd-{st.cluster_id}")
            real.mkdir(parents=True, exist_ok=True)
            data.symlink_to(real)
        peer = f"http://127.0.0.1:{st.etcd_peer_port}"
        client = f"http://127.0.0.1:{st.etcd_port}"
        argv = [
            str(find_etcd()),
            "--name=default",
            f"--data-dir={data}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            "--initial-cluster-state=new",
            "--log-level=warn",
            "--logger=zap",
        ]
        st.procs["etcd"] = _spawn("etcd", argv, self.dir / "logs" / "etcd.log", self.dir)
        self._save()
        wait_for(
            "etcd /health",
            lambda: self._http_ok(f"{client}/health", tls=False),
            30,
            fail_fast=self._proc_check("etcd"),
        )

    def _apiserver_argv(self) -> list[str]:
        st, pki = self.state, self.pki
        return [
            f"{st.bin_dir}/kube-apiserver",
            f"--etcd-servers=http://127.0.0.1:{st.etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={st.apiserver_port}",
            "--insecure-port=0",
            f"--tls-cert-file={pki}/apiserver.crt",
            f"--tls-private-key-file={pki}/apiserver.key",
            f"--client-ca-file={pki}/ca.crt",
            f"--token-auth-file={self.dir}/tokens.csv",
            "--authorization-mode=RBAC",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-account-key-file={pki}/sa.pub",
            f"--service-account-signing-key-file={pki}/sa.key",
            f"--api-audiences={SA_ISSUER}",
            "--allow-privileged=true",
            "--kubelet-preferred-address-types=InternalIP",
            f"--kubelet-certificate-authority={pki}/ca.crt",
            f"--cert-dir={self.dir}/apiserver-certs",
            "--profiling=false",
            "--v=1",
        ]

    def _start_apiserver(self, timeout: float = 60.0) -> None:
        self.state.procs["kube-apiserver"] = _spawn(
            "kube-apiserver",
            self._apiserver_argv(),
            self.dir / "logs" / "kube-apiserver.log",
            self.dir,
        )
        self._save()
        self.wait_apiserver_ready(timeout)

    def wait_apiserver_ready(self, timeout: float = 60.0) -> None:
        wait_for(
            "kube-apiserver /readyz",
            lambda: self._http_ok(f"{self.server}/readyz"),
            timeout,
            fail_fast=self._proc_check("kube-apiserver"),
        )

    def _start_kcm_and_scheduler(self, timeout: float) -> None:
        st, pki, kc = self.state, self.pki, self.kubeconfig
        common = [
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1",
            "--port=0",
            "--leader-elect=false",
            "--v=1",
        ]
        kcm = [
            f"{st.bin_dir}/kube-controller-manager",
            *common,
            f"--secure-port={st.kcm_port}",
            f"--cert-dir={self.dir}/kcm-certs",
            f"--service-account-private-key-file={pki}/sa.key",
            f"--root-ca-file={pki}/ca.crt",
            f"--cluster-signing-cert-file={pki}/ca.crt",
            f"--cluster-signing-key-file={pki}/ca.key",
            # No pod CIDRs, no cloud: those controllers would only log errors.
            "--controllers=*,-nodeipam,-cloud-node-lifecycle,-route,-service",
            "--node-monitor-period=2s",
            f"--node-monitor-grace-period={self.node_monitor_grace_period}s",
        ]
        sched = [
            f"{st.bin_dir}/kube-scheduler",
            *common,
            f"--secure-port={st.scheduler_port}",
            f"--cert-dir={self.dir}/scheduler-certs",
        ]
        st.procs["kube-controller-manager"] = _spawn(
            "kube-controller-manager",
            kcm,
            self.dir / "logs" / "kube-controller-manager.log",
            self.dir,
        )
        st.procs["kube-scheduler"] = _spawn(
            "kube-scheduler", sched, self.dir / "logs" / "kube-scheduler.log", self.dir
        )
        self._save()
        for name, port in (
            ("kube-controller-manager", st.kcm_port),
            ("kube-scheduler", st.scheduler_port),
        ):
            wait_for(
                f"{name} /healthz",
                functools.partial(self._http_ok, f"https://127.0.0.1:{port}/healthz", verify=False),
                timeout,
                fail_fast=self._proc_check(name),
            )

    def _start_agent(self) -> None:
        st = self.state
        cfg = {
            "kubeconfig": str(self.kubeconfig),
            "dir": str(self.dir),
            "nodes": st.nodes,
            "gpus_per_node": st.gpus_per_node,
            "gpu_product": GPU_PRODUCT,
            "pod_cidr": st.pod_cidr,
            "cluster_id": st.cluster_id,
            "server": self.server,
            "port": st.agent_port,
            "tls_cert": str(self.pki / "kubelet.crt"),
            "tls_key": str(self.pki / "kubelet.key"),
            "pod_env": self.pod_env,
            "image_entrypoints": self.image_entrypoints,
            "run_pods": self.run_pods,
        }
        (self.dir / "agent.json").write_text(json.dumps(cfg, indent=2))
        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "PYTHONPATH")}
        argv = [
            sys.executable,
            "-m",
            "tests.cluster.nodeagent",
            "--config",
            str(self.dir / "agent.json"),
        ]
        st.procs["node-agent"] = _spawn(
            "node-agent", argv, self.dir / "logs" / "node-agent.log", REPO_ROOT, env
        )
        self._save()

    def start_agent(self) -> None:
        """(Re)start the node agent, e.g. after a test stopped it."""
        rec = self.state.procs.get("node-agent")
        if rec and rec.alive():
            return
        self._start_agent()

    def stop_agent(self) -> None:
        rec = self.state.procs.get("node-agent")
        if rec:
            rec.stop(timeout=40)

    def wait_nodes_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            self._proc_check("node-agent")()
            nodes = self.get_json("/api/v1/nodes")["items"]
            names = {
                n["metadata"]["name"]
                for n in nodes
                if any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in n.get("status", {}).get("conditions", [])
                )
                and not any(
                    t["key"].startswith("node.kubernetes.io/")
                    for t in n.get("spec", {}).get("taints") or []
                )
            }
            return set(self.state.nodes) <= names

        wait_for("fake GPU nodes to be Ready and untainted", ready, timeout, interval=0.3)

    def stop(self) -> None:
        """Stop exactly the processes we started (agent first so pods die with it)."""
        order = [
            "node-agent",
            "kube-scheduler",
            "kube-controller-manager",
            "kube-apiserver",
            "etcd",
        ]
        procs = self.state.procs
        for name in order + [n for n in procs if n not in order]:
            rec = procs.get(name)
            if rec is not None:
                rec.stop(timeout=40 if name == "node-agent" else 10)
        self._sweep_pod_processes()
        if self.state.cluster_id:
            from tests.cluster.nodeagent import HostsFile

            with contextlib.suppress(OSError):
                HostsFile("/etc/hosts", self.state.cluster_id).set([])
        data = self.dir / "etcd-data"
        if data.is_symlink():
            import shutil

            shutil.rmtree(data.resolve(), ignore_errors=True)
            data.unlink()
        if self.dir.exists():
            self._save()

    def _sweep_pod_processes(self) -> None:
        """Kill pod processes a crashed agent left behind: only those whose environment
        carries this cluster's pod dir, so a recycled pid is never hit."""
        for pid_file in (self.dir / "pods").glob("*/*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text())
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                marker = f"KUBETUNE_POD_DIR={pid_file.parent}".encode()
                if marker in environ:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
                pid_file.unlink()

    # ----- apiserver faults
    def stop_apiserver(self) -> None:
        rec = self.state.procs.get("kube-apiserver")
        if rec:
            rec.stop()

    def start_apiserver(self, timeout: float = 60.0) -> None:
        """Start the apiserver again on the same port and etcd (state survives)."""
        self._start_apiserver(timeout)

    def restart_apiserver(self, timeout: float = 60.0) -> None:
        self.stop_apiserver()
        self.start_apiserver(timeout)

    # ----- helpers for tests
    def _proc_check(self, name: str) -> Callable[[], None]:
        """Raise as soon as ``name`` died, instead of waiting for a timeout."""

        def check() -> None:
            rec = self.state.procs.get(name)
            if rec is not None and not rec.alive():
                tail = Path(rec.log).read_text(errors="replace")[-3000:]
                raise ClusterError(f"{name} exited; log {rec.log} ends with:\n{tail}")

        return check

    def _ssl_context(self, verify: bool = True) -> ssl.SSLContext:
        if not verify:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        return ssl.create_default_context(cafile=str(self.pki / "ca.crt"))

    def _http_ok(self, url: str, tls: bool = True, verify: bool = True) -> bool:
        req = urllib.request.Request(url)
        if tls and verify:
            req.add_header("Authorization", f"Bearer {self.state.admin_token}")
        ctx = self._ssl_context(verify) if tls else None
        with urllib.request.urlopen(req, timeout=5, context=ctx) as resp:
            return bool(resp.status == 200)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        """Raw API call with the admin token (or ``token``); returns (status, decoded JSON)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {token or self.state.admin_token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=30, context=self._ssl_context()) as resp:
                raw = resp.read()
                status = int(resp.status)
        except urllib.error.HTTPError as err:
            raw, status = err.read(), int(err.code)
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def get_json(self, path: str) -> Any:
        status, body = self.request("GET", path)
        if status != 200:
            raise ClusterError(f"GET {path} -> {status}: {body}")
        return body

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run the cached kubectl against this cluster; raises with stderr when ``check``."""
        proc = subprocess.run(
            [str(self.kubectl_path), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise ClusterError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}"
            )
        return proc

    def apply(self, manifest: str | Mapping[str, Any], namespace: str | None = None) -> None:
        """``kubectl apply -f -`` a YAML/JSON string or a dict (or a List of objects)."""
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        ns = ["-n", namespace] if namespace else []
        self.kubectl("apply", *ns, "-f", "-", input=text)

    def api_client(self) -> ApiClient:
        """A kubernetes.client.ApiClient authenticated as cluster admin."""
        from kubernetes import client, config

        cfg = client.Configuration()
        load: Any = config.load_kube_config  # untyped upstream
        load(config_file=str(self.kubeconfig), client_configuration=cfg)
        return client.ApiClient(cfg)

    def create_namespace(self, name: str, timeout: float = 60.0) -> str:
        """Create a namespace and wait for its default ServiceAccount token (pods need it)."""
        status, body = self.request(
            "POST",
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
        )
        if status not in (201, 409):
            raise ClusterError(f"create namespace {name} -> {status}: {body}")

        def sa_ready() -> bool:
            st, sa = self.request("GET", f"/api/v1/namespaces/{name}/serviceaccounts/default")
            return st == 200 and bool(sa.get("secrets"))

        wait_for(f"default ServiceAccount token in {name}", sa_ready, timeout)
        return name

    def delete_namespace(self, name: str, wait: bool = False, timeout: float = 120.0) -> None:
        self.request("DELETE", f"/api/v1/namespaces/{name}")
        if wait:
            wait_for(
                f"namespace {name} to be deleted",
                lambda: self.request("GET", f"/api/v1/namespaces/{name}")[0] == 404,
                timeout,
                0.5,
            )

    def service_account_token(self, namespace: str, name: str, timeout: float = 60) -> str:
        """The (legacy, secret-based) token of a ServiceAccount, waiting for the controller."""
        import base64

        def token() -> str | None:
            sa = self.get_json(f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}")
            for ref in sa.get("secrets") or []:
                sec = self.get_json(f"/api/v1/namespaces/{namespace}/secrets/{ref['name']}")
                tok = (sec.get("data") or {}).get("token")
                if tok:
                    return base64.b64decode(tok).decode()
            return None

        return str(wait_for(f"token for ServiceAccount {namespace}/{name}", token, timeout))

    def pod(self, namespace: str, name: str) -> dict[str, Any]:
        return dict(self.get_json(f"/api/v1/namespaces/{namespace}/pods/{name}"))

    def pods(self, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        from urllib.parse import quote

        q = f"?labelSelector={quote(selector)}" if selector else ""
        return list(self.get_json(f"/api/v1/namespaces/{namespace}/pods{q}")["items"])

    def wait_pod_phase(
        self,
        namespace: str,
        name: str,
        phases: Sequence[str] = ("Succeeded",),
        timeout: float = 120.0,
    ) -> dict[str, Any]:
        """Wait until the pod reaches one of ``phases``; error early on a surprising end."""

        def check() -> dict[str, Any] | None:
            st, pod = self.request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")
            if st != 200:
                return None
            phase = pod.get("status", {}).get("phase")
            if phase in phases:
                return dict(pod)
            if phase in ("Succeeded", "Failed"):
                log = self.pod_log(namespace, name)
                raise AssertionError(f"pod {namespace}/{name} ended {phase}; log:\n{log[-3000:]}")
            return None

        try:
            return dict(
                wait_for(f"pod {namespace}/{name} phase in {list(phases)}", check, timeout, 0.3)
            )
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\nlog:\n{self.pod_log(namespace, name)[-3000:]}") from None

    def logs_tail(self, lines: int = 40) -> str:
        """Last lines of every component log, for failure messages."""
        out = []
        for rec in self.state.procs.values():
            text = Path(rec.log).read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {rec.name} ({rec.log})\n" + "\n".join(text))
        return "\n".join(out)
