"""What every benchmark records besides its figures: the machine, the command, the stack.

Figures from a shared machine are noisy, so each bench also measures a reference in the
same run and reports ratios; the facts here say what the run was made on.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from devenv import stack

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


@contextlib.contextmanager
def local_stack(components: Iterable[str]) -> Iterator[dict[str, str]]:
    """The bench stack's environment (DATABASE_URL, KAFKA_BOOTSTRAP_SERVERS, ...).

    Starts the components in `.devenv/bench` when needed and stops the stack afterwards
    only if none was recorded there before, so a stack brought up by hand
    (`python -m devenv up --state-dir .devenv/bench`) stays up between runs.
    """
    started_here = not stack.load(STATE_DIR)
    running = stack.up(STATE_DIR, only=tuple(components))
    try:
        yield stack.environment(running)
    finally:
        if started_here:
            stack.down(STATE_DIR)


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write the result as indented JSON and print it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
