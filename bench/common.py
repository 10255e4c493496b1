"""What every benchmark records besides its figures: the machine, the command, the stack.

Figures from a shared machine are noisy, so each bench also measures a reference in the
same run and reports ratios; the facts here say what the run was made on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import shlex
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from devenv import stack
from somabrain.store.engine import engine_url

ROOT = Path(__file__).resolve().parents[1]
STATE_DIR = ROOT / ".devenv" / "bench"


def progress(message: str) -> None:
    """One line on stderr, so a long run shows where it is."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def command_line(module: str) -> str:
    """The command that produced a result, as it can be typed again."""
    return shlex.join([".venv/bin/python", "-m", module, *sys.argv[1:]])


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_mib() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return None


def machine() -> dict[str, Any]:
    """The machine as the run saw it; the load average says how busy it was at the end."""
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_mib": _memory_mib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "note": "database, broker, publisher and this process share these cpus",
    }


@dataclasses.dataclass(frozen=True)
class Stack:
    """The bench stack: what clients need (DATABASE_URL, KAFKA_BOOTSTRAP_SERVERS, ...)
    and the main process of each component, whose CPU time a bench may read."""

    env: dict[str, str]
    pids: dict[str, int]


@contextlib.contextmanager
def local_stack(components: Iterable[str]) -> Iterator[Stack]:
    """The stack in `.devenv/bench`, with the given components running.

    Starts the components in `.devenv/bench` when needed and stops the stack afterwards
    only if none was recorded there before, so a stack brought up by hand
    (`python -m devenv up --state-dir .devenv/bench`) stays up between runs.
    """
    started_here = not stack.load(STATE_DIR)
    running = stack.up(STATE_DIR, only=tuple(components))
    try:
        yield Stack(
            env=stack.environment(running),
            pids={name: r.pids[0] for name, r in running.items() if r.pids},
        )
    finally:
        if started_here:
            stack.down(STATE_DIR)


_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; it ends at the last parenthesis.
    return text.rsplit(")", 1)[1].split()


def process_tree_cpu_seconds(root: int) -> float:
    """CPU time (user + system) used so far by a process and all its descendants, live
    or already exited, from /proc (Linux): e.g. a PostgreSQL server with its backends,
    WAL writer and autovacuum workers."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    total = 0
    todo = [root]
    while todo:
        pid = todo.pop()
        fields = _stat_fields(pid)
        if fields is None:
            continue
        # utime, stime, and cutime, cstime: children that exited and were waited for.
        total += sum(int(f) for f in fields[11:15])
        todo.extend(children.get(pid, []))
    return total / _TICKS


@contextlib.contextmanager
def fresh_database(url: str) -> Iterator[str]:
    """A new, empty database on the same server, dropped afterwards: what earlier runs
    left in the stack's tables (and the plans they lead to) does not weigh on a measure."""
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(engine_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield engine_url(url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


class MemoryWatch:
    """Samples a process's VmRSS every 100 ms in a thread; reads VmHWM (the kernel's
    record of its peak) on demand and when stopped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss_kib = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory", daemon=True)
        self._thread.start()

    def status(self, field: str) -> int | None:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
        return None

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            rss = self.status("VmRSS")
            if rss is not None:
                self.peak_rss_kib = max(self.peak_rss_kib, rss)
                self.samples += 1

    def stop(self) -> dict[str, Any]:
        hwm = self.status("VmHWM")
        self._stop.set()
        self._thread.join(5)
        return {
            "peak_rss_sampled_mib": round(self.peak_rss_kib / 1024, 1),
            "vm_hwm_mib": None if hwm is None else round(hwm / 1024, 1),
            "samples": self.samples,
        }


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write the result as indented JSON and print it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
