"""A throwaway Kubernetes control plane (etcd + kube-apiserver) on loopback, without Docker.

Purpose: give the operator and its tests a real API server (CRDs, RBAC, namespaces, Deployments
stored and validated) the way controller-runtime's envtest does, with nothing but Go, openssl
and the Go module proxy.

Guarantees:
- `ensure_installed()` builds etcd and kube-apiserver from the module proxy once per version pair
  into `cache_dir()/kube-<k8s>-etcd-<etcd>/bin`; later calls only check two files. A file lock
  keeps concurrent callers from building twice, and binaries appear only by atomic rename, so a
  present binary is a complete one.
- `start()` listens only on 127.0.0.1, on ports picked free at start, so several stacks (each with
  its own state dir) run side by side. It returns once `/readyz` answers 200 for the admin user,
  whose kubeconfig it writes with every credential embedded.
- Certificates, keys and etcd data persist under `state_dir/kube/`; a restart reuses them, so
  objects and the kubeconfig credentials survive a stop/start (the server URL's port changes).

Limits:
- Only the API server runs: no controller-manager, scheduler or kubelet. Deployments are stored
  but never become Pods that run; deleted namespaces stay Terminating and owned objects are not
  garbage-collected (both are controller-manager work); no ServiceAccount tokens are minted
  automatically, which is why the ServiceAccount admission plugin is disabled, as envtest does;
  the `kubernetes` Service has no endpoints.
- etcd runs with `--unsafe-no-fsync`: fast, but a machine crash can lose its data. Development
  only; every credential here is a self-signed throwaway.
- The first build needs the Go module proxy and Go 1.26 (or a Go that may fetch it), takes about
  10 minutes on 2 cores, peaks near 2.5 GiB of memory, and leaves about 4 GiB of Go caches under
  `cache_dir()/go`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from devenv import gobuild
from devenv.common import (
    LOOPBACK,
    Running,
    StartFailed,
    cache_dir,
    free_port,
    pid_alive,
    require_tool,
    run,
    spawn,
    step,
    stop_pid,
    tail,
    wait_for_port,
)

# The newest 3.6 patch on the proxy. kubeadm pairs 1.37 with etcd 3.7.0, but the API server's
# etcd client works with any 3.5+ server and 3.6 is the line this project standardised on.
ETCD_VERSION = "v3.6.17"
KUBERNETES_VERSION = "v1.37.2"

ETCD_MODULE = "go.etcd.io/etcd/server/v3"
KUBERNETES_MODULE = "k8s.io/kubernetes"
KUBE_APISERVER_PACKAGE = "k8s.io/kubernetes/cmd/kube-apiserver"

# The in-cluster address of the `kubernetes` Service is the first IP of this range; it is also
# in the serving certificate so in-cluster style clients would verify it. Every ClusterIP
# Service takes an address from it (each dedicated Tenant has one): a /24 is full at 254
# Services, a /16 holds 65,534.
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/16"
SERVICE_CLUSTER_FIRST_IP = "10.0.0.1"
# Fixed rather than derived from the port (envtest's choice) so tokens minted through the
# TokenRequest API stay valid across a restart that picks a new port.
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "devenv-admin"
ADMIN_GROUP = "system:masters"

# Named in error messages about the Go toolchain or the module proxy.
BUILDS = "etcd and kube-apiserver"
OPENSSL_HINT = "install it with `apt-get install openssl`"

ETCD_START_TIMEOUT = 30.0
APISERVER_READY_TIMEOUT = 90.0
# Ports are picked free and then bound by another process, so a neighbouring stack can win the
# race; a fresh pick almost always succeeds.
START_ATTEMPTS = 3


# --------------------------------------------------------------------------------------------
# Obtaining the binaries
# --------------------------------------------------------------------------------------------


def install_dir() -> Path:
    """Where this version pair of binaries lives (its `bin/` holds etcd and kube-apiserver)."""
    return cache_dir() / f"kube-{KUBERNETES_VERSION}-etcd-{ETCD_VERSION}"


def ensure_installed() -> Path:
    """Build etcd and kube-apiserver once per version pair; return the folder holding both."""
    root = install_dir()

    def build(bin_dir: Path) -> None:
        go = gobuild.find_go(BUILDS)
        if not os.access(bin_dir / "etcd", os.X_OK):
            _build_etcd(go, root)
        if not os.access(bin_dir / "kube-apiserver", os.X_OK):
            _build_kube_apiserver(go, root)

    return gobuild.build_once(root, ["etcd", "kube-apiserver"], build)


def _build_etcd(go: gobuild.Go, root: Path) -> None:
    # etcd's own go.mod has `replace ../api` lines, which `go install module@version` refuses;
    # as a dependency of a helper module those lines are ignored and its requirements hold.
    work = root / "build" / "etcd"
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    step(f"downloading etcd {ETCD_VERSION} sources from the Go module proxy ...")
    record = gobuild.download_module(go, ETCD_MODULE, ETCD_VERSION, work, BUILDS)
    go_directive = gobuild.go_directive(Path(record["GoMod"]))
    go.require_language(go_directive, f"{ETCD_MODULE}@{ETCD_VERSION}")
    (work / "go.mod").write_text(
        "// Generated by devenv/kube.py to build etcd from the Go module proxy.\n"
        "module devenv.local/etcd-build\n\n"
        f"go {go_directive}\n\n"
        f"require {ETCD_MODULE} {ETCD_VERSION}\n"
    )
    step(f"building etcd {ETCD_VERSION} (a minute or two) ...")
    # The module root of go.etcd.io/etcd/server/v3 is etcd's `main` package.
    gobuild.build(go, work, ETCD_MODULE, ETCD_VERSION, root / "bin" / "etcd", "-s -w")
    step(f"built etcd {ETCD_VERSION} in {time.monotonic() - started:.0f}s")


def _staging_modules(kubernetes_go_mod: Path) -> list[str]:
    """The k8s.io/* modules k8s.io/kubernetes requires at the placeholder version v0.0.0.

    In its own repository those are `replace`d by ./staging/src folders, which consumers never
    see; each is published separately as v0.<minor>.<patch>, which we pin to instead.
    """
    text = kubernetes_go_mod.read_text()
    found: set[str] = set()
    for block in re.findall(r"^require\s*\((.*?)^\)", text, re.MULTILINE | re.DOTALL):
        for line in block.splitlines():
            fields = line.split("//")[0].split()
            if len(fields) == 2 and fields[1] == "v0.0.0":
                found.add(fields[0])
    for fields in (
        m.split() for m in re.findall(r"^require[ \t]+(\S+[ \t]+\S+)", text, re.MULTILINE)
    ):
        if len(fields) == 2 and fields[1] == "v0.0.0":
            found.add(fields[0])
    return sorted(found)


def _build_kube_apiserver(go: gobuild.Go, root: Path) -> None:
    work = root / "build" / "kube-apiserver"
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    step(f"downloading Kubernetes {KUBERNETES_VERSION} sources from the Go module proxy ...")
    record = gobuild.download_module(go, KUBERNETES_MODULE, KUBERNETES_VERSION, work, BUILDS)
    kubernetes_go_mod = Path(record["GoMod"])
    go_directive = gobuild.go_directive(kubernetes_go_mod)
    go.require_language(go_directive, f"{KUBERNETES_MODULE}@{KUBERNETES_VERSION}")
    staging = _staging_modules(kubernetes_go_mod)
    if not staging:
        raise StartFailed(f"found no v0.0.0 k8s.io requirements in {kubernetes_go_mod}")
    major, minor, patch = KUBERNETES_VERSION.lstrip("v").split(".")
    staging_version = f"v0.{minor}.{patch}"
    replaces = "".join(f"\t{module} => {module} {staging_version}\n" for module in staging)
    (work / "go.mod").write_text(
        "// Generated by devenv/kube.py to build kube-apiserver from the Go module proxy.\n"
        "module devenv.local/kube-apiserver-build\n\n"
        f"go {go_directive}\n\n"
        f"require {KUBERNETES_MODULE} {KUBERNETES_VERSION}\n\n"
        f"replace (\n{replaces})\n"
    )
    # The release's commit time, not now, so rebuilding yields the identical binary.
    build_date = "1970-01-01T00:00:00Z"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        build_date = str(json.loads(Path(record["Info"]).read_text())["Time"])
    # What the release build stamps in; without it the server reports v0.0.0-master and
    # clients' version-skew logic misjudges it.
    stamps = {
        "gitVersion": KUBERNETES_VERSION,
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
        # The proxy does not say which commit a tag is; empty beats the "$Format:%H$" stub.
        "gitCommit": "",
        "buildDate": build_date,
    }
    ldflags = " ".join(
        ["-s", "-w"]
        + [
            f"-X {package}.{name}={value}"
            for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
            for name, value in stamps.items()
        ]
    )
    step(
        f"building kube-apiserver {KUBERNETES_VERSION} with {len(staging)} staging modules "
        f"pinned to {staging_version} (8 to 15 minutes on 2 cores, 2.5 GiB of memory) ..."
    )
    gobuild.build(
        go,
        work,
        KUBE_APISERVER_PACKAGE,
        KUBERNETES_VERSION,
        root / "bin" / "kube-apiserver",
        ldflags,
    )
    step(f"built kube-apiserver {KUBERNETES_VERSION} in {time.monotonic() - started:.0f}s")


# --------------------------------------------------------------------------------------------
# Credentials
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """Paths of the files the API server and its admin client need."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    admin_cert: Path
    admin_key: Path
    sa_key: Path
    sa_pub: Path


OPENSSL_CONFIG = f"""\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[v3_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:{LOOPBACK}, IP:::1, IP:{SERVICE_CLUSTER_FIRST_IP}, \
DNS:kubernetes, DNS:kubernetes.default, DNS:kubernetes.default.svc, \
DNS:kubernetes.default.svc.cluster.local
authorityKeyIdentifier = keyid
[v3_client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
"""


def _pki_paths(pki_dir: Path) -> Pki:
    return Pki(
        ca_cert=pki_dir / "ca.crt",
        server_cert=pki_dir / "apiserver.crt",
        server_key=pki_dir / "apiserver.key",
        admin_cert=pki_dir / "admin.crt",
        admin_key=pki_dir / "admin.key",
        sa_key=pki_dir / "sa.key",
        sa_pub=pki_dir / "sa.pub",
    )


def _ensure_pki(kube_dir: Path) -> Pki:
    """Create the CA, serving, admin and service-account keys once; reuse them afterwards."""
    pki_dir = kube_dir / "pki"
    if (pki_dir / "complete").exists():
        return _pki_paths(pki_dir)
    openssl = require_tool("openssl", hint=OPENSSL_HINT)
    # Built aside and renamed, so an interrupted run never leaves a half-made set in use.
    scratch = kube_dir / "pki.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(mode=0o700, parents=True)
    log = kube_dir / "pki.log"
    config = scratch / "openssl.cnf"
    config.write_text(OPENSSL_CONFIG)

    def openssl_run(*args: str) -> None:
        run([openssl, *args], what=f"openssl {args[0]}", log_path=log, cwd=scratch)

    def new_key(name: str, *, rsa: bool = False) -> None:
        # P-256 for TLS: instant to generate and accepted by Go, Python and kubectl. The
        # service-account key stays RSA, the algorithm every token consumer supports.
        if rsa:
            options = ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]
        else:
            options = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]
        openssl_run("genpkey", *options, "-out", name)

    def signed_cert(name: str, subject: str, extensions: str) -> None:
        new_key(f"{name}.key")
        openssl_run(
            "req", "-new", "-key", f"{name}.key", "-subj", subject,
            "-config", config.name, "-out", f"{name}.csr",
        )  # fmt: skip
        openssl_run(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-set_serial", str(secrets.randbits(63)), "-days", "3650", "-sha256",
            "-extfile", config.name, "-extensions", extensions, "-out", f"{name}.crt",
        )  # fmt: skip
        (scratch / f"{name}.csr").unlink()

    new_key("ca.key")
    openssl_run(
        "req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=devenv-kube-ca",
        "-days", "3650", "-sha256", "-config", config.name, "-extensions", "v3_ca",
        "-out", "ca.crt",
    )  # fmt: skip
    signed_cert("apiserver", "/CN=kube-apiserver", "v3_server")
    # Kubernetes reads the user from CN and groups from O; system:masters bypasses RBAC.
    signed_cert("admin", f"/O={ADMIN_GROUP}/CN={ADMIN_USER}", "v3_client")
    new_key("sa.key", rsa=True)
    openssl_run("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub")
    (scratch / "complete").write_text("")
    shutil.rmtree(pki_dir, ignore_errors=True)
    os.replace(scratch, pki_dir)
    return _pki_paths(pki_dir)


def _write_kubeconfig(path: Path, server: str, pki: Pki) -> None:
    """An admin kubeconfig with every credential embedded, so it can be copied anywhere."""

    def data(file: Path) -> str:
        return base64.b64encode(file.read_bytes()).decode()

    text = f"""\
apiVersion: v1
kind: Config
clusters:
- name: devenv
  cluster:
    server: {json.dumps(server)}
    certificate-authority-data: {data(pki.ca_cert)}
users:
- name: {ADMIN_USER}
  user:
    client-certificate-data: {data(pki.admin_cert)}
    client-key-data: {data(pki.admin_key)}
contexts:
- name: devenv
  context:
    cluster: devenv
    user: {ADMIN_USER}
current-context: devenv
"""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.chmod(0o600)
    os.replace(partial, path)


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _port_clash(log_path: Path, since: int) -> bool:
    """Whether the server logged a bind failure after byte `since` (logs append across runs)."""
    try:
        with log_path.open("rb") as log:
            log.seek(since)
            return b"address already in use" in log.read()
    except FileNotFoundError:
        return False


def _owns_listener(pid: int, port: int) -> bool:
    """Whether `pid` itself holds the socket listening on `port` (Linux /proc; else assumed).

    A port picked free can be taken by a neighbouring stack before our server binds it; then
    "the port answers" proves nothing, and an API server pointed there would share that stack's
    unauthenticated etcd.
    """
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not tables[0].exists():
        return True
    inodes: set[str] = set()
    for table in tables:
        with contextlib.suppress(OSError):
            for line in table.read_text().splitlines()[1:]:
                fields = line.split()
                listening = fields[3] == "0A"
                if listening and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    fd_dir = Path(f"/proc/{pid}/fd")
    with contextlib.suppress(OSError):
        for fd in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return True
    return False


def _start_etcd(bin_dir: Path, kube_dir: Path) -> tuple[int, int, int]:
    """Start etcd; return (pid, client port, peer port)."""
    log = kube_dir / "etcd.log"
    for attempt in range(1, START_ATTEMPTS + 1):
        client_port, peer_port = _distinct_free_ports(2)
        peer_url = f"http://{LOOPBACK}:{peer_port}"
        client_url = f"http://{LOOPBACK}:{client_port}"
        log_start = _log_size(log)
        pid = spawn(
            [
                str(bin_dir / "etcd"),
                "--name=devenv",
                f"--data-dir={kube_dir / 'etcd-data'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=devenv={peer_url}",
                # Not used for traffic (one member), but the default 2380 would clash between
                # stacks; fsync off because losing dev data on a power cut is acceptable and
                # fsync latency dominates API writes on slow disks.
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
            log_path=log,
        )
        try:
            wait_for_port(
                client_port, pid=pid, log_path=log, what="etcd", timeout=ETCD_START_TIMEOUT
            )
        except StartFailed:
            stop_pid(pid)
            if attempt < START_ATTEMPTS and _port_clash(log, log_start):
                continue
            raise
        if not _owns_listener(pid, client_port):
            stop_pid(pid)
            if attempt < START_ATTEMPTS:
                continue
            raise StartFailed(f"another process took etcd's port {client_port}; log {log}")
        return pid, client_port, peer_port
    raise AssertionError("unreachable")


def _ssl_context(ca_cert: Path, client_cert: Path, client_key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_cert))
    context.load_cert_chain(str(client_cert), str(client_key))
    return context


def _readyz(server: str, context: ssl.SSLContext, timeout: float) -> int | None:
    """The HTTP status of /readyz, or None if the server did not answer."""
    url = f"{server}/readyz"  # always an https URL we built, never user input
    try:
        with urllib.request.urlopen(url, context=context, timeout=timeout) as resp:  # noqa: S310
            status: int = resp.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def _apiserver_argv(bin_dir: Path, port: int, etcd_client_port: int, pki: Pki) -> list[str]:
    # Mirrors controller-runtime envtest's defaults, with our own certs instead of --cert-dir.
    return [
        str(bin_dir / "kube-apiserver"),
        f"--etcd-servers=http://{LOOPBACK}:{etcd_client_port}",
        f"--bind-address={LOOPBACK}",
        f"--advertise-address={LOOPBACK}",
        f"--secure-port={port}",
        f"--tls-cert-file={pki.server_cert}",
        f"--tls-private-key-file={pki.server_key}",
        f"--client-ca-file={pki.ca_cert}",
        f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
        f"--service-account-key-file={pki.sa_pub}",
        f"--service-account-signing-key-file={pki.sa_key}",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        "--authorization-mode=RBAC",
        "--allow-privileged=true",
        # No controller-manager creates the `default` ServiceAccount or its tokens, so this
        # plugin would reject every Pod (envtest disables it for the same reason).
        "--disable-admission-plugins=ServiceAccount",
        # The default (lease) reconciler publishes the advertise address as the `kubernetes`
        # Service's endpoint and, since 1.37, refuses a loopback one at startup. Nothing in
        # this cluster routes to that Service, so publishing no endpoint loses nothing.
        "--endpoint-reconciler-type=none",
    ]


def _start_apiserver(
    bin_dir: Path, kube_dir: Path, etcd_client_port: int, pki: Pki
) -> tuple[int, int]:
    """Start kube-apiserver and wait for /readyz; return (pid, secure port)."""
    log = kube_dir / "kube-apiserver.log"
    context = _ssl_context(pki.ca_cert, pki.admin_cert, pki.admin_key)
    for attempt in range(1, START_ATTEMPTS + 1):
        (port,) = _distinct_free_ports(1)
        log_start = _log_size(log)
        pid = spawn(_apiserver_argv(bin_dir, port, etcd_client_port, pki), log_path=log)
        server = f"https://{LOOPBACK}:{port}"
        deadline = time.monotonic() + APISERVER_READY_TIMEOUT
        status: int | None = None
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                break
            status = _readyz(server, context, timeout=2.0)
            if status == 200:
                return pid, port
            time.sleep(0.25)
        why = "exited" if not pid_alive(pid) else "was not ready"
        stop_pid(pid)
        if attempt < START_ATTEMPTS and _port_clash(log, log_start):
            continue
        raise StartFailed(
            f"kube-apiserver {why} (last /readyz status {status}) within "
            f"{APISERVER_READY_TIMEOUT:.0f}s; log {log}:\n{tail(log)}"
        )
    raise AssertionError("unreachable")


def start(state_dir: Path) -> Running:
    """Start etcd and kube-apiserver for one stack; return once the API server is ready."""
    bin_dir = ensure_installed()
    kube_dir = (state_dir / "kube").resolve()
    kube_dir.mkdir(parents=True, exist_ok=True)
    pki = _ensure_pki(kube_dir)
    step("starting etcd and kube-apiserver ...")
    etcd_pid, etcd_client_port, etcd_peer_port = _start_etcd(bin_dir, kube_dir)
    try:
        apiserver_pid, apiserver_port = _start_apiserver(bin_dir, kube_dir, etcd_client_port, pki)
    except BaseException:
        stop_pid(etcd_pid)
        raise
    server = f"https://{LOOPBACK}:{apiserver_port}"
    kubeconfig = kube_dir / "kubeconfig"
    _write_kubeconfig(kubeconfig, server, pki)
    return Running(
        name="kube",
        pids=[etcd_pid, apiserver_pid],
        env={"KUBECONFIG": str(kubeconfig)},
        info={
            "server": server,
            "apiserver_port": str(apiserver_port),
            "etcd_endpoint": f"http://{LOOPBACK}:{etcd_client_port}",
            "etcd_client_port": str(etcd_client_port),
            "etcd_peer_port": str(etcd_peer_port),
            "kubeconfig": str(kubeconfig),
            "ca_file": str(pki.ca_cert),
            "client_cert": str(pki.admin_cert),
            "client_key": str(pki.admin_key),
            "kubernetes_version": KUBERNETES_VERSION,
            "etcd_version": ETCD_VERSION,
        },
    )


def healthy(running: Running) -> bool:
    """Whether both processes live and the API server's /readyz answers 200 right now."""
    if not all(pid_alive(pid) for pid in running.pids):
        return False
    try:
        context = _ssl_context(
            Path(running.info["ca_file"]),
            Path(running.info["client_cert"]),
            Path(running.info["client_key"]),
        )
    except (KeyError, OSError, ssl.SSLError):
        return False
    return _readyz(running.info["server"], context, timeout=2.0) == 200
