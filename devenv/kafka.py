"""A single-node Kafka 4.x (KRaft, combined broker + controller) on loopback, for dev and tests.

Purpose: give the outbox relay and its tests a real broker, with transactions and idempotent
producers, without Docker, a download outside the package registries, or a ZooKeeper.

Guarantees:
- The broker's jars are resolved once per machine from Maven Central with `mvn` into
  `cache_dir()/kafka-<version>/libs` (Maven's own repository: `cache_dir()/maven-repo`), so every
  checkout on the machine shares them; a finished install is marked and later calls return at once.
  Concurrent callers are serialised with a file lock and the install appears atomically (rename).
- `start()` formats a state folder once (config, cluster id, storage) and then launches from it;
  `launch()` alone restarts a stopped broker on the same ports and data, which is what
  fault-injection tests need after `stop_pid()`.
- `start()`/`launch()` return only once the broker answers a Metadata request that lists itself,
  i.e. it is unfenced and serving, not merely once its port accepts TCP connections.

Limits: one node, so replication factor 1 everywhere and no durability beyond the local disk;
PLAINTEXT only, bound to 127.0.0.1; the broker's output (log4j2 to stdout) goes to one
un-rotated file, `state_dir/kafka/kafka.log`. Needs Java 17+ (Kafka 4 brokers do) and Maven.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from devenv.common import (
    LOOPBACK,
    MissingPrerequisite,
    Running,
    StartFailed,
    cache_dir,
    exclusive_lock,
    free_port,
    pid_alive,
    port_open,
    require_tool,
    run,
    spawn,
    step,
    stop_pid,
    tail,
    wait_for_port,
)

KAFKA_VERSION = "4.4.0"
SCALA_VERSION = "2.13"
# kafka_2.13 declares slf4j-api 1.7 and log4j-core but no binding between them; without this
# jar the broker runs silently (slf4j NOP). It matches the log4j-core that kafka_2.13 pulls in.
LOG4J_VERSION = "2.25.5"
# Pinned rather than Maven 3.8's built-in default (2.8, from 2013) so resolution is reproducible.
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
MIN_JAVA = 17
NODE_ID = 1
HEAP_OPTS = ("-Xms128m", "-Xmx512m")
START_TIMEOUT = 120.0

_INSTALL_MARKER = ".installed"
_JAVA_HINT = "install a JDK 17+: `apt-get install openjdk-17-jre-headless`"
_MVN_HINT = "install Maven: `apt-get install maven`"
_NETWORK_ERRORS = (
    "Could not transfer",
    "UnknownHost",
    "Unknown host",
    "Network is unreachable",
    "Connection refused",
    "Connect timed out",
    "connect timed out",
    "No route to host",
    "offline mode",
)

_POM = """<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by devenv/kafka.py: the runtime class path of a Kafka {kafka} broker. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.somabrain.devenv</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>{kafka}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_{scala}</artifactId>
      <version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
</project>
"""

# Everything to stdout, which spawn() sends to state_dir/kafka/kafka.log: one file holds both
# log4j output and what the JVM itself prints (crashes, class-path errors). The full config dump
# (~800 lines per start) is muted: server.properties beside the log says the same.
_LOG4J2 = """status = warn
name = devenv-kafka
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
"""


# --------------------------------------------------------------------------- install


@functools.cache
def _check_java() -> str:
    # Cached: `java -version` costs a JVM start, and ensure/format/launch each need the answer.
    java = require_tool("java", hint=_JAVA_HINT)
    out = subprocess.run(
        [java, "-version"], capture_output=True, text=True, check=False, timeout=60
    )
    # `java -version` prints e.g. `openjdk version "17.0.15"` or `"1.8.0_392"` on stderr.
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if match is None:
        raise MissingPrerequisite(f"cannot tell the version of {java}; {_JAVA_HINT}")
    major = int(match.group(1))
    if major == 1 and match.group(2):
        major = int(match.group(2))
    if major < MIN_JAVA:
        raise MissingPrerequisite(
            f"Kafka {KAFKA_VERSION} needs Java {MIN_JAVA}+ but {java} is Java {major}; "
            + _JAVA_HINT
        )
    return java


def install_dir() -> Path:
    """Where this Kafka version's jars live once installed (`libs/` inside)."""
    return cache_dir() / f"kafka-{KAFKA_VERSION}"


def ensure_installed() -> Path:
    """Resolve the broker's jars from Maven Central once per machine; return the install folder."""
    target = install_dir()
    if (target / _INSTALL_MARKER).is_file():
        return target
    mvn = require_tool("mvn", hint=_MVN_HINT)
    _check_java()
    cache = cache_dir()
    with exclusive_lock(
        cache / f"kafka-{KAFKA_VERSION}.lock",
        waiting="waiting for another process resolving Kafka's jars ...",
    ):
        # Another process may have finished while we waited for the lock.
        if (target / _INSTALL_MARKER).is_file():
            return target
        if target.exists():
            # Unmarked: left by something other than a finished install; never trust it.
            shutil.rmtree(target)
        step(f"resolving Kafka {KAFKA_VERSION} jars from Maven Central (once per machine)")
        started = time.monotonic()
        build = Path(tempfile.mkdtemp(prefix=f".kafka-{KAFKA_VERSION}-", dir=cache))
        log_path = cache / f"kafka-{KAFKA_VERSION}-install.log"
        try:
            (build / "pom.xml").write_text(
                _POM.format(kafka=KAFKA_VERSION, scala=SCALA_VERSION, log4j=LOG4J_VERSION)
            )
            argv = [
                mvn,
                "-q",
                "-B",
                "-Dstyle.color=never",
                f"-Dmaven.repo.local={cache / 'maven-repo'}",
                f"{DEPENDENCY_PLUGIN}:copy-dependencies",
                "-DoutputDirectory=libs",
                "-DincludeScope=runtime",
            ]
            try:
                run(
                    argv,
                    what="resolving Kafka jars with mvn",
                    log_path=log_path,
                    cwd=build,
                    timeout=900,
                )
            except StartFailed as err:
                log_text = log_path.read_text(errors="replace")
                if any(marker in log_text for marker in _NETWORK_ERRORS):
                    raise MissingPrerequisite(
                        "Maven Central is unreachable and the Kafka jars are not cached yet; "
                        f"allow access to it (or a mirror in ~/.m2/settings.xml). Log: {log_path}"
                    ) from err
                raise
            if not (build / "libs" / f"kafka_{SCALA_VERSION}-{KAFKA_VERSION}.jar").is_file():
                raise StartFailed(f"mvn finished but no Kafka jar in {build / 'libs'}")
            (build / _INSTALL_MARKER).write_text(f"{KAFKA_VERSION}\n")
            build.chmod(0o755)  # mkdtemp makes it 0700; other accounts may read the jars
            os.rename(build, target)
        finally:
            if build.exists():
                shutil.rmtree(build, ignore_errors=True)
        step(f"Kafka {KAFKA_VERSION} jars ready in {time.monotonic() - started:.1f}s")
    return target


# --------------------------------------------------------------------------- state folder


def _kafka_dir(state_dir: Path) -> Path:
    return state_dir / "kafka"


def _meta_path(state_dir: Path) -> Path:
    return _kafka_dir(state_dir) / "devenv.json"


def _data_dir(state_dir: Path) -> Path:
    return _kafka_dir(state_dir) / "data"


def is_formatted(state_dir: Path) -> bool:
    """Whether `format_storage()` completed for this state folder (so `launch()` can run)."""
    return _meta_path(state_dir).is_file() and (_data_dir(state_dir) / "meta.properties").is_file()


def _cluster_id() -> str:
    # Kafka's Uuid text form: 16 random bytes, URL-safe base64 without padding. An id starting
    # with '-' would be parsed as an option by StorageTool, so draw again in that case.
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def _server_properties(state_dir: Path, port: int, controller_port: int) -> str:
    settings = {
        "process.roles": "broker,controller",
        "node.id": str(NODE_ID),
        # A static voter set rather than KIP-853's dynamic quorum (`--standalone`): the voter's
        # address then lives only in this file, not in the metadata log.
        "controller.quorum.voters": f"{NODE_ID}@{LOOPBACK}:{controller_port}",
        "listeners": f"PLAINTEXT://{LOOPBACK}:{port},CONTROLLER://{LOOPBACK}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{LOOPBACK}:{port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(_data_dir(state_dir)),
        "num.partitions": "3",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "offsets.topic.replication.factor": "1",
        # Internal topics default to 50 partitions each; a few are plenty on one node and make
        # the first consumer group / transaction noticeably faster to set up.
        "offsets.topic.num.partitions": "5",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "5",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "auto.create.topics.enable": "true",
        "delete.topic.enable": "true",
        "group.initial.rebalance.delay.ms": "0",
        # The cleaner's default 128 MiB dedupe buffer is a quarter of our heap.
        "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
        "num.network.threads": "2",
        "num.io.threads": "4",
    }
    lines = ["# Written by devenv/kafka.py; launch() reuses it as is."]
    lines += [f"{key}={value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def _java_argv(java: str, install: Path, state_dir: Path, main: str) -> list[str]:
    kafka_dir = _kafka_dir(state_dir)
    return [
        java,
        *HEAP_OPTS,
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={kafka_dir / 'log4j2.properties'}",
        f"-Dkafka.logs.dir={kafka_dir}",
        "-cp",
        # The JVM expands the wildcard itself; no shell involved.
        str(install / "libs" / "*"),
        main,
    ]


def format_storage(state_dir: Path) -> None:
    """Write config with fresh ports and a new cluster id, and format storage (wipes old data)."""
    install = ensure_installed()
    java = _check_java()
    kafka_dir = _kafka_dir(state_dir)
    kafka_dir.mkdir(parents=True, exist_ok=True)
    _meta_path(state_dir).unlink(missing_ok=True)
    shutil.rmtree(_data_dir(state_dir), ignore_errors=True)
    port = free_port()
    controller_port = free_port()
    while controller_port == port:
        controller_port = free_port()
    cluster_id = _cluster_id()
    config = kafka_dir / "server.properties"
    config.write_text(_server_properties(state_dir, port, controller_port))
    (kafka_dir / "log4j2.properties").write_text(_LOG4J2)
    run(
        [
            *_java_argv(java, install, state_dir, "kafka.tools.StorageTool"),
            "format",
            "--cluster-id",
            cluster_id,
            "--config",
            str(config),
        ],
        what="formatting Kafka storage",
        log_path=kafka_dir / "format.log",
        timeout=120,
    )
    meta = {
        "version": KAFKA_VERSION,
        "port": port,
        "controller_port": controller_port,
        "cluster_id": cluster_id,
    }
    # Written last: its presence (with meta.properties) is what marks the folder as formatted.
    _meta_path(state_dir).write_text(json.dumps(meta, indent=2) + "\n")


# --------------------------------------------------------------------------- wire protocol


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:
            raise ConnectionError("broker closed the connection")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _request(
    sock: socket.socket, api_key: int, version: int, correlation: int, body: bytes
) -> bytes:
    client_id = b"devenv"
    # Request header v1 (non-flexible): api_key, api_version, correlation_id, client_id.
    header = struct.pack(">hhih", api_key, version, correlation, len(client_id)) + client_id
    payload = header + body
    sock.sendall(struct.pack(">i", len(payload)) + payload)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    response = _recv_exact(sock, size)
    (got,) = struct.unpack_from(">i", response, 0)
    if got != correlation:
        raise ConnectionError(f"correlation id {got}, expected {correlation}")
    return response[4:]


def _read_string(data: bytes, offset: int) -> tuple[str | None, int]:
    (length,) = struct.unpack_from(">h", data, offset)
    offset += 2
    if length < 0:
        return None, offset
    return data[offset : offset + length].decode(), offset + length


def live_brokers(port: int, timeout: float = 2.0) -> list[tuple[int, str, int]]:
    """Ask the broker on `port` for its live brokers: (node id, host, port) from Metadata v4.

    A KRaft broker lists only unfenced brokers, so seeing itself here means it is serving.
    v4 is the oldest Metadata version Kafka 4 still accepts (KIP-896) and is not "flexible",
    which keeps the encoding simple.
    """
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        # ApiVersions v0 first, as real clients do; error_code 0 means requests are processed.
        versions = _request(sock, 18, 0, 1, b"")
        (error,) = struct.unpack_from(">h", versions, 0)
        if error != 0:
            raise ConnectionError(f"ApiVersions error code {error}")
        # Metadata v4 body: topics = empty array (no topics), allow_auto_topic_creation = false.
        data = _request(sock, 3, 4, 2, struct.pack(">ib", 0, 0))
    offset = 4  # throttle_time_ms
    (count,) = struct.unpack_from(">i", data, offset)
    offset += 4
    brokers: list[tuple[int, str, int]] = []
    for _ in range(count):
        (node_id,) = struct.unpack_from(">i", data, offset)
        host, offset = _read_string(data, offset + 4)
        (broker_port,) = struct.unpack_from(">i", data, offset)
        _rack, offset = _read_string(data, offset + 4)
        brokers.append((node_id, host or "", broker_port))
    return brokers


def _serving(port: int) -> bool:
    try:
        return any(node == NODE_ID for node, _, _ in live_brokers(port))
    except (OSError, struct.error, UnicodeDecodeError):
        return False


# --------------------------------------------------------------------------- lifecycle


def launch(state_dir: Path) -> Running:
    """Start the broker from an already formatted state folder, on its recorded ports and data."""
    if not is_formatted(state_dir):
        raise StartFailed(f"{_kafka_dir(state_dir)} is not formatted; use start() instead")
    install = ensure_installed()
    java = _check_java()
    kafka_dir = _kafka_dir(state_dir)
    meta = json.loads(_meta_path(state_dir).read_text())
    port = int(meta["port"])
    controller_port = int(meta["controller_port"])
    for busy in (port, controller_port):
        if port_open(busy):
            raise StartFailed(
                f"port {busy} recorded in {_meta_path(state_dir)} is in use; is a broker from "
                "this state folder still running?"
            )
    log_path = kafka_dir / "kafka.log"
    step(f"starting Kafka {KAFKA_VERSION} on {LOOPBACK}:{port}")
    started = time.monotonic()
    pid = spawn(
        [
            *_java_argv(java, install, state_dir, "kafka.Kafka"),
            str(kafka_dir / "server.properties"),
        ],
        log_path=log_path,
        cwd=kafka_dir,
    )
    try:
        wait_for_port(port, pid=pid, log_path=log_path, what="Kafka", timeout=START_TIMEOUT)
        # The listener socket is bound well before the broker has caught up with the metadata
        # log and been unfenced; until then requests wait or fail, so poll Metadata instead.
        deadline = started + START_TIMEOUT
        while not _serving(port):
            if not pid_alive(pid):
                raise StartFailed(f"Kafka exited while starting; log {log_path}:\n{tail(log_path)}")
            if time.monotonic() > deadline:
                raise StartFailed(
                    f"Kafka did not serve on {port} within {START_TIMEOUT:.0f}s; "
                    f"log {log_path}:\n{tail(log_path)}"
                )
            time.sleep(0.2)
    except BaseException:
        stop_pid(pid, grace=5.0)
        raise
    step(f"Kafka ready in {time.monotonic() - started:.1f}s")
    return Running(
        name="kafka",
        pids=[pid],
        env={"KAFKA_BOOTSTRAP_SERVERS": f"{LOOPBACK}:{port}"},
        info={
            "version": KAFKA_VERSION,
            "port": str(port),
            "controller_port": str(controller_port),
            "cluster_id": str(meta["cluster_id"]),
            "state_dir": str(kafka_dir),
            "config": str(kafka_dir / "server.properties"),
            "log": str(log_path),
        },
    )


def start(state_dir: Path) -> Running:
    """Format the state folder if it is new, then launch the broker and wait until it serves."""
    if not is_formatted(state_dir):
        format_storage(state_dir)
    return launch(state_dir)


def stop(running: Running, *, grace: float = 30.0) -> None:
    """Stop the broker: SIGTERM is Kafka's controlled shutdown (flushes logs, ~1 s here)."""
    for pid in running.pids:
        stop_pid(pid, grace=grace)


def healthy(running: Running) -> bool:
    """Whether the broker process is alive and answers Metadata listing itself."""
    return all(pid_alive(pid) for pid in running.pids) and _serving(int(running.info["port"]))
