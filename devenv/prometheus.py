"""Prometheus on loopback, built from the Go module proxy, for alerting rules and scrapes in tests.

Purpose: let tests load alerting and recording rules into a real Prometheus, have it scrape
a publisher's /metrics, and check what it computes and which alerts fire; give `promtool` to
check rule files the way CI and the operator's users would.

Guarantees:
- `ensure_installed()` builds `prometheus` and `promtool` from `github.com/prometheus/prometheus`
  once per module version into `cache_dir()/prometheus-<module version>/bin`; later calls only
  check two files. A file lock keeps concurrent callers from building twice, and binaries appear
  only by atomic rename, so a present binary is a complete one.
- `start()` writes `state_dir/prometheus/prometheus.yml` and starts the server on a loopback port
  picked free; it returns once `/-/ready` answers 200 and the server on that port reports our
  config file (so a neighbouring stack that won the port race is never taken for ours).
  `launch()` alone restarts a stopped server on its recorded port and data.
- The server evaluates every `*.yaml` in the rules folder (SOMABRAIN_PROMETHEUS_RULES_DIR) and
  scrapes every target listed in the `*.json` files of the targets folder
  (SOMABRAIN_PROMETHEUS_TARGETS_DIR, Prometheus's file service discovery format), both every
  second. Target files are picked up on their own (write them aside and rename them in, so a
  half-written file is never read); rule files after `POST <PROMETHEUS_URL>/-/reload`.

Limits:
- Built without the `builtinassets` tag: the HTTP API, /metrics and the lifecycle endpoints work,
  the web UI's pages do not. Built with `remove_all_sd`: only static, file and HTTP service
  discovery exist (the cloud providers' SDKs would double the build).
- No Alertmanager: alerts are only seen through `/api/v1/alerts` and `/api/v1/rules`.
- The first build needs Go 1.26.7+ and the module proxy, and takes 5 to 15 minutes on 2 cores;
  the TSDB keeps one day of data under `state_dir/prometheus/data`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from devenv import gobuild
from devenv.common import (
    LOOPBACK,
    Running,
    StartFailed,
    cache_dir,
    exclusive_lock,
    free_port,
    pid_alive,
    port_open,
    spawn,
    step,
    stop_pid,
    tail,
)

MODULE = "github.com/prometheus/prometheus"
# Since 3.0 the module's versions are v0.<major><minor, two digits>.<patch>: v0.316.0 is 3.16.0.
MODULE_VERSION = "v0.316.0"
RELEASE = "3.16.0"
BINARIES = {
    "prometheus": f"{MODULE}/cmd/prometheus",
    "promtool": f"{MODULE}/cmd/promtool",
}
# netgo as upstream's release builds; remove_all_sd keeps only the static, file and HTTP service
# discovery (plugins/minimum.go). Not builtinassets: the web UI would need its assets generated.
BUILD_TAGS = ("netgo", "remove_all_sd")
# Named in error messages about the Go toolchain or the module proxy.
BUILDS = "Prometheus"

RULES_ENV = "SOMABRAIN_PROMETHEUS_RULES_DIR"
TARGETS_ENV = "SOMABRAIN_PROMETHEUS_TARGETS_DIR"
# The job every file-discovered target belongs to (its `job` label).
JOB = "somabrain"
INTERVAL = "1s"
READY_TIMEOUT = 60.0
# Ports are picked free and then bound by another process, so a neighbouring stack can win the
# race; a fresh pick almost always succeeds.
START_ATTEMPTS = 3


# --------------------------------------------------------------------------------------------
# Obtaining the binaries
# --------------------------------------------------------------------------------------------


def install_dir() -> Path:
    """Where this module version's binaries live (its `bin/` holds prometheus and promtool)."""
    return cache_dir() / f"prometheus-{MODULE_VERSION}"


def _binaries_present(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in BINARIES)


def ensure_installed() -> Path:
    """Build prometheus and promtool once per module version; return the folder holding both."""
    root = install_dir()
    bin_dir = root / "bin"
    # Fast path without the lock: binaries only ever appear complete (atomic rename).
    if _binaries_present(bin_dir):
        return bin_dir
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(
        root / ".build.lock", waiting=f"waiting for another process building into {root} ..."
    ):
        # Another process may have finished the build while we waited for the lock.
        if _binaries_present(bin_dir):
            return bin_dir
        bin_dir.mkdir(parents=True, exist_ok=True)
        _build(gobuild.find_go(BUILDS), root)
    return bin_dir


def _build(go: gobuild.Go, root: Path) -> None:
    work = root / "build"
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    step(f"downloading Prometheus {RELEASE} sources from the Go module proxy ...")
    record = gobuild.download_module(go, MODULE, MODULE_VERSION, work, BUILDS)
    go_directive = gobuild.go_directive(Path(record["GoMod"]))
    go.require_language(go_directive, f"{MODULE}@{MODULE_VERSION}")
    # The module ships the release number it is; a mismatch means the two constants disagree.
    shipped = (Path(record["Dir"]) / "VERSION").read_text().strip()
    if shipped != RELEASE:
        raise StartFailed(f"{MODULE}@{MODULE_VERSION} is Prometheus {shipped}, not {RELEASE}")
    (work / "go.mod").write_text(
        "// Generated by devenv/prometheus.py to build Prometheus from the Go module proxy.\n"
        "module devenv.local/prometheus-build\n\n"
        f"go {go_directive}\n\n"
        f"require {MODULE} {MODULE_VERSION}\n"
    )
    # The release's commit time, not now, so rebuilding yields the identical binary. The proxy
    # does not say which commit a version is, so the revision stays empty.
    build_date = ""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        published = json.loads(Path(record["Info"]).read_text())["Time"]
        build_date = time.strftime(
            "%Y%m%d-%H:%M:%S", time.strptime(published[:19], "%Y-%m-%dT%H:%M:%S")
        )
    stamps = {"Version": RELEASE, "BuildUser": "somabrain-devenv", "BuildDate": build_date}
    ldflags = " ".join(
        ["-s", "-w"]
        + [f"-X github.com/prometheus/common/version.{k}={v}" for k, v in stamps.items() if v]
    )
    step(f"building prometheus and promtool {RELEASE} (5 to 15 minutes on 2 cores) ...")
    for name, package in BINARIES.items():
        if not os.access(root / "bin" / name, os.X_OK):
            gobuild.build(
                go, work, package, MODULE_VERSION, root / "bin" / name, ldflags, BUILD_TAGS
            )
    step(f"built prometheus and promtool {RELEASE} in {time.monotonic() - started:.0f}s")


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _prom_dir(state_dir: Path) -> Path:
    return (state_dir / "prometheus").resolve()


def _meta_path(state_dir: Path) -> Path:
    return _prom_dir(state_dir) / "devenv.json"


def rules_dir(state_dir: Path) -> Path:
    """The folder whose `*.yaml` rule files the server loads (on start and on /-/reload)."""
    return _prom_dir(state_dir) / "rules"


def targets_dir(state_dir: Path) -> Path:
    """The folder whose `*.json` target files the server scrapes (file service discovery)."""
    return _prom_dir(state_dir) / "targets"


def _config(state_dir: Path) -> str:
    # JSON strings are valid YAML scalars, which quotes any path safely.
    rules = json.dumps(str(rules_dir(state_dir) / "*.yaml"))
    targets = json.dumps(str(targets_dir(state_dir) / "*.json"))
    return f"""\
# Written by devenv/prometheus.py on every start; edits are lost.
global:
  scrape_interval: {INTERVAL}
  scrape_timeout: {INTERVAL}
  evaluation_interval: {INTERVAL}
rule_files:
  - {rules}
scrape_configs:
  - job_name: {JOB}
    file_sd_configs:
      - files:
          - {targets}
        # Changes are seen at once through inotify; this re-read is the fallback.
        refresh_interval: 5s
"""


def _get(url: str, timeout: float = 2.0) -> tuple[int | None, bytes]:
    """(HTTP status, body) of a GET, or (None, b"") when nothing answered."""
    try:
        # Always an http://127.0.0.1 URL built here, never user input.
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            status: int = response.status
            return status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (urllib.error.URLError, OSError):
        return None, b""


def _serves_config(url: str, config: Path) -> bool:
    """Whether the server at `url` runs with our config file (i.e. is ours, not a neighbour)."""
    status, body = _get(f"{url}/api/v1/status/flags")
    if status != 200:
        return False
    try:
        flags: dict[str, Any] = json.loads(body)["data"]
    except (ValueError, KeyError, TypeError):
        return False
    return flags.get("config.file") == str(config)


class _PortTaken(StartFailed):
    """Another process holds the port picked for the server."""


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _logged_since(path: Path, since: int, text: bytes) -> bool:
    with contextlib.suppress(FileNotFoundError), path.open("rb") as log:
        log.seek(since)
        return text in log.read()
    return False


def launch(state_dir: Path) -> Running:
    """Start the server from an existing state folder, on its recorded port and data."""
    bin_dir = ensure_installed()
    prom_dir = _prom_dir(state_dir)
    meta = json.loads(_meta_path(state_dir).read_text())
    port = int(meta["port"])
    if port_open(port):
        raise _PortTaken(f"port {port} recorded in {_meta_path(state_dir)} is in use")
    config = prom_dir / "prometheus.yml"
    log = prom_dir / "prometheus.log"
    url = f"http://{LOOPBACK}:{port}"
    log_start = _log_size(log)
    started = time.monotonic()
    pid = spawn(
        [
            str(bin_dir / "prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={prom_dir / 'data'}",
            "--storage.tsdb.retention.time=1d",
            f"--web.listen-address={LOOPBACK}:{port}",
            # POST /-/reload (re-read config and rules) and /-/quit.
            "--web.enable-lifecycle",
        ],
        log_path=log,
        cwd=prom_dir,
    )
    try:
        deadline = started + READY_TIMEOUT
        while True:
            if not pid_alive(pid):
                if _logged_since(log, log_start, b"address already in use"):
                    raise _PortTaken(f"another process took Prometheus's port {port}")
                raise StartFailed(f"Prometheus exited while starting; log {log}:\n{tail(log)}")
            if _get(f"{url}/-/ready")[0] == 200:
                if _serves_config(url, config):
                    break
                raise _PortTaken(f"another server answers on Prometheus's port {port}")
            if time.monotonic() > deadline:
                why = f"Prometheus was not ready within {READY_TIMEOUT:.0f}s"
                raise StartFailed(f"{why}; log {log}:\n{tail(log)}")
            time.sleep(0.2)
    except BaseException:
        stop_pid(pid, grace=10.0)
        raise
    step(f"Prometheus {RELEASE} ready on {url} in {time.monotonic() - started:.1f}s")
    return Running(
        name="prometheus",
        pids=[pid],
        env={
            "PROMETHEUS_URL": url,
            "PROMTOOL": str(bin_dir / "promtool"),
            RULES_ENV: str(rules_dir(state_dir)),
            TARGETS_ENV: str(targets_dir(state_dir)),
        },
        info={
            "version": RELEASE,
            "url": url,
            "port": str(port),
            "config": str(config),
            "log": str(log),
        },
    )


def start(state_dir: Path) -> Running:
    """Write the config, pick a free port and start the server; return once it is ready."""
    prom_dir = _prom_dir(state_dir)
    for folder in (rules_dir(state_dir), targets_dir(state_dir), prom_dir / "data"):
        folder.mkdir(parents=True, exist_ok=True)
    (prom_dir / "prometheus.yml").write_text(_config(state_dir))
    for attempt in range(1, START_ATTEMPTS + 1):
        _meta_path(state_dir).write_text(json.dumps({"port": free_port()}) + "\n")
        try:
            return launch(state_dir)
        except _PortTaken:
            if attempt == START_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def stop(running: Running, *, grace: float = 30.0) -> None:
    """Stop the server: SIGTERM makes Prometheus close its TSDB cleanly (a second or two)."""
    for pid in running.pids:
        stop_pid(pid, grace=grace)


def healthy(running: Running) -> bool:
    """Whether the process lives and `/-/ready` answers 200 right now."""
    return all(pid_alive(pid) for pid in running.pids) and (
        _get(f"{running.info['url']}/-/ready")[0] == 200
    )
