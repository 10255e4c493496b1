"""`python -m devenv up|down|status|env`: the local stack on loopback, without Docker."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from devenv import stack
from devenv.common import MissingPrerequisite, StartFailed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devenv",
        description="Start PostgreSQL, Kafka (KRaft), etcd + kube-apiserver and Prometheus on "
        "loopback, with a helm binary for the operator's chart. "
        "The first `up` builds or downloads each component into the cache "
        "(SOMABRAIN_DEVENV_CACHE, default ~/.cache/somabrain-devenv); later ones reuse it.",
        epilog='example: python -m devenv up && eval "$(python -m devenv env)"',
    )
    parser.add_argument(
        "command",
        choices=["up", "down", "status", "env", "install"],
        help="up: start the stack; down: stop it and delete its data; status: show what "
        "runs; env: print export lines for DATABASE_URL, KAFKA_BOOTSTRAP_SERVERS, "
        "KUBECONFIG, PROMETHEUS_URL, PROMTOOL, the Prometheus rules and targets folders and "
        "HELM; "
        "install: only fill the cache",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=stack.default_state_dir(),
        help="folder holding this stack's data, logs and pids (default: .devenv/default); "
        "use another one to run a second stack side by side",
    )
    args = parser.parse_args(argv)
    state_dir: Path = args.state_dir.resolve()

    try:
        if args.command == "install":
            stack.ensure_installed()
        elif args.command == "up":
            started = time.monotonic()
            before = stack.load(state_dir)
            running = stack.up(state_dir)
            if before.keys() == running.keys() and all(
                before[n].pids == running[n].pids for n in running
            ):
                print(f"devenv: already running in {state_dir}", file=sys.stderr)
            else:
                print(f"devenv: stack up in {time.monotonic() - started:.1f}s", file=sys.stderr)
            _print_env(stack.environment(running))
        elif args.command == "down":
            stack.down(state_dir)
        elif args.command == "env":
            running = stack.load(state_dir)
            if not running:
                print(
                    f"no stack recorded in {state_dir}; run `python -m devenv up`", file=sys.stderr
                )
                return 1
            _print_env(stack.environment(running))
        else:
            return _status(state_dir)
    except (MissingPrerequisite, StartFailed) as exc:
        print(f"devenv: FAILED: {exc}", file=sys.stderr)
        return 2
    return 0


def _print_env(env: dict[str, str]) -> None:
    for name, value in sorted(env.items()):
        print(f"export {name}={shlex.quote(value)}")


def _status(state_dir: Path) -> int:
    running = stack.load(state_dir)
    if not running:
        print(f"no stack recorded in {state_dir}")
        return 1
    all_ok = True
    for name, component in running.items():
        ok = stack.COMPONENTS[name].healthy(component)
        all_ok &= ok
        pids = ",".join(str(p) for p in component.pids)
        details = "  ".join(f"{k}={v}" for k, v in sorted(component.info.items()))
        print(f"{name:10} {'up' if ok else 'DOWN':5} pids {pids:14} {details}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
