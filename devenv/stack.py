"""The whole local stack: obtain every component, start them, record them, stop them.

A stack lives in a state folder (`.devenv/<name>/` in the checkout by default): each
component's data and logs, and `stack.json` naming the processes to stop and the
environment clients need. Components are obtained in parallel (the first run builds
kube-apiserver, Prometheus and Helm and resolves Kafka's jars; later runs find them in the cache).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

from devenv import common, helm, kafka, kube, postgres, prometheus
from devenv.common import Running

COMPONENTS: dict[str, ModuleType] = {
    "postgres": postgres,
    "kafka": kafka,
    "kube": kube,
    "prometheus": prometheus,
    # A client, not a server: nothing runs, the stack's environment names the binary.
    "helm": helm,
}
STATE_FILE = "stack.json"


def default_state_dir() -> Path:
    return Path(__file__).resolve().parents[1] / ".devenv" / "default"


def ensure_installed(names: Iterable[str] = COMPONENTS) -> None:
    """Obtain the components into the cache, in parallel; fast when all are cached."""
    installers: list[Callable[[], Path]] = [COMPONENTS[n].ensure_installed for n in names]
    with ThreadPoolExecutor(max_workers=len(installers)) as pool:
        for future in [pool.submit(install) for install in installers]:
            future.result()


def load(state_dir: Path) -> dict[str, Running]:
    """The running stack recorded in `state_dir`, or an empty dict."""
    path = state_dir / STATE_FILE
    if not path.exists():
        return {}
    raw = json.loads(path.read_text())
    return {name: Running(**record) for name, record in raw.items()}


def _save(state_dir: Path, stack: dict[str, Running]) -> None:
    records = {name: vars(r) for name, r in stack.items()}
    (state_dir / STATE_FILE).write_text(json.dumps(records, indent=2))


def up(state_dir: Path, *, only: Iterable[str] = COMPONENTS) -> dict[str, Running]:
    """Start the components (all, or `only` those) not already running in `state_dir`.

    Returns every running component of the stack, including ones started earlier. If a
    start fails, only what this call started is stopped; running components and every
    component's data are left as they were.
    """
    wanted = [name for name in COMPONENTS if name in set(only)]
    state_dir.mkdir(parents=True, exist_ok=True)
    with common.exclusive_lock(
        state_dir / ".lock", waiting=f"waiting for another `up` of {state_dir} ..."
    ):
        stack = {name: r for name, r in load(state_dir).items() if COMPONENTS[name].healthy(r)}
        missing = [name for name in wanted if name not in stack]
        if not missing:
            return stack
        ensure_installed(missing)
        started: list[str] = []
        try:
            for name in missing:
                common.step(f"starting {name}")
                stack[name] = COMPONENTS[name].start(state_dir)
                started.append(name)
                _save(state_dir, stack)
        except BaseException:
            for name in reversed(started):
                _stop(name, stack.pop(name))
            _save(state_dir, stack)
            raise
        return stack


def _stop(name: str, running: Running) -> None:
    stop = getattr(COMPONENTS[name], "stop", None)
    if stop is not None:
        stop(running)
    else:
        for pid in reversed(running.pids):
            common.stop_pid(pid)


def stop_component(state_dir: Path, name: str) -> None:
    """Stop one component of a running stack, keeping its data (for fault injection)."""
    _stop(name, load(state_dir)[name])


def relaunch_component(state_dir: Path, name: str) -> Running:
    """Start a stopped component again on its recorded ports and data."""
    stack = load(state_dir)
    stack[name] = COMPONENTS[name].launch(state_dir)
    _save(state_dir, stack)
    return stack[name]


def down(state_dir: Path) -> None:
    """Stop every recorded component (in reverse start order) and delete its data."""
    for name, running in reversed(list(load(state_dir).items())):
        _stop(name, running)
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    for name, module in COMPONENTS.items():
        folder = module.data_root(state_dir) if hasattr(module, "data_root") else None
        shutil.rmtree(folder or state_dir / name, ignore_errors=True)


def environment(stack: dict[str, Running]) -> dict[str, str]:
    """What a client of the stack needs: DATABASE_URL, KAFKA_BOOTSTRAP_SERVERS, KUBECONFIG,
    PROMETHEUS_URL (with PROMTOOL and the rules and targets folders) and HELM."""
    env: dict[str, str] = {}
    for running in stack.values():
        env.update(running.env)
    return env
