"""Shared plumbing for the local stack: the cache, ports, processes and clear failures.

Every component (Postgres, Kafka, etcd + kube-apiserver) is obtained once into a cache folder
outside the checkout, keyed by its version, and started as a detached process on loopback.
Nothing here knows about a particular component.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CACHE_ENV = "SOMABRAIN_DEVENV_CACHE"
LOOPBACK = "127.0.0.1"


@dataclass
class Running:
    """A started component: what to stop and what clients need to reach it."""

    name: str
    pids: list[int]
    env: dict[str, str]
    info: dict[str, str] = field(default_factory=dict)


class MissingPrerequisite(RuntimeError):
    """A tool or registry the stack needs is not available; the message says how to get it."""


class StartFailed(RuntimeError):
    """A component was obtained but did not come up; the message carries its log's tail."""


def cache_dir() -> Path:
    """The cache folder shared by every checkout here (override: SOMABRAIN_DEVENV_CACHE)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        path = Path(override)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(base) / "somabrain-devenv"
    path.mkdir(parents=True, exist_ok=True)
    return path


def step(message: str) -> None:
    """Report progress of a long operation on stderr, so `env` output on stdout stays clean."""
    print(f"devenv: {message}", file=sys.stderr, flush=True)


def require_tool(name: str, *, hint: str) -> str:
    """Return the path of an executable, or stop with one line saying how to install it."""
    path = shutil.which(name)
    if path is None:
        raise MissingPrerequisite(f"'{name}' is not on PATH; {hint}")
    return path


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def run(
    argv: Sequence[str],
    *,
    what: str,
    log_path: Path,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> None:
    """Run one build or setup step to completion; on failure raise with the log's tail."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    with log_path.open("ab") as log:
        log.write(f"\n$ {' '.join(argv)}\n".encode())
        log.flush()
        result = subprocess.run(
            list(argv),
            cwd=cwd,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
    if result.returncode != 0:
        raise StartFailed(
            f"{what} failed (exit {result.returncode}); log {log_path}:\n{tail(log_path)}"
        )


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    inherit_env: bool = True,
) -> int:
    """Start a long-running server detached from this process; return its pid.

    With `inherit_env=False` the process sees only `env`, as a container would.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**(os.environ if inherit_env else {}), **(env or {})}
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    # Keep the handle: it reaps the process when it exits (no zombies) and is never
    # garbage-collected while the server runs.
    _CHILDREN[proc.pid] = proc
    return proc.pid


_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def pid_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            return False
    return True


def port_open(port: int, host: str = LOOPBACK) -> bool:
    """Whether something accepts TCP connections on the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_for_port(port: int, *, pid: int, log_path: Path, what: str, timeout: float) -> None:
    """Wait until the server listens, failing early (with its log) if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port):
            return
        if not pid_alive(pid):
            raise StartFailed(
                f"{what} exited before listening on {port}; log {log_path}:\n{tail(log_path)}"
            )
        time.sleep(0.2)
    raise StartFailed(
        f"{what} did not listen on {port} within {timeout:.0f}s; log {log_path}:\n{tail(log_path)}"
    )


def stop_pid(pid: int, *, grace: float = 20.0) -> None:
    """Stop a server and its process group: SIGTERM, then SIGKILL after the grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.1)


@contextlib.contextmanager
def exclusive_lock(path: Path, *, waiting: str) -> Iterator[None]:
    """Hold an exclusive file lock on `path`; say `waiting` if another process has it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            step(waiting)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
