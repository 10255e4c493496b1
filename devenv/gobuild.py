"""Building Go programs from the Go module proxy into the cache, for components shipped as source.

Purpose: etcd, kube-apiserver and Prometheus are Go programs published as modules; this builds a
main package of a module at an exact version with nothing but the `go` command and the proxy.

Guarantees:
- `find_go()` fails with one line (MissingPrerequisite) when `go` is missing, too old, or has no
  module proxy; `Go.require_language()` does so when a module needs a newer Go than the local one
  and GOTOOLCHAIN forbids fetching it.
- Every build keeps its module and build caches under `cache_dir()/go`, shared by all components
  (a second component reuses the dependencies the first one compiled), and builds static
  binaries (CGO off, so no C compiler is needed).
- `build()` resolves the package inside a small helper module at exactly the version asked for
  and publishes the binary by atomic rename: a binary present at its final path is complete.

Limits: builds are CPU-bound and slow on small machines (minutes per component on 2 cores); the
caches grow to several GiB.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from devenv.common import (
    MissingPrerequisite,
    StartFailed,
    cache_dir,
    exclusive_lock,
    require_tool,
    run,
    tail,
)

GO_HINT = (
    "install the Go toolchain (1.21+; it fetches the 1.26 toolchain these builds need from the "
    "module proxy) from https://go.dev/dl/ or with `apt-get install golang`"
)

# Generous: the cold kube-apiserver build took 8 to 11 minutes on 2 cores (slower under load),
# and a hung build should still end eventually rather than block `make` forever.
BUILD_TIMEOUT = 2 * 3600.0
DOWNLOAD_TIMEOUT = 1800.0


def version_tuple(text: str) -> tuple[int, ...]:
    """`go1.26.8` or `1.26.0` as (1, 26, 8); the unparsable as ()."""
    match = re.match(r"(?:go)?(\d+(?:\.\d+)*)", text)
    return tuple(int(part) for part in match[1].split(".")) if match else ()


@dataclass(frozen=True)
class Go:
    """The go command and the environment every build step runs it with."""

    path: str
    env: dict[str, str]
    version: str
    toolchain: str

    def require_language(self, required: str, module: str) -> None:
        """Fail clearly when the module needs a newer Go and we may not fetch one."""
        if self.toolchain == "local" and version_tuple(self.version) < version_tuple(required):
            raise MissingPrerequisite(
                f"{module} needs Go >= {required} but '{self.path}' is {self.version} with "
                "GOTOOLCHAIN=local; install a newer Go or set GOTOOLCHAIN=auto"
            )


def find_go(what: str) -> Go:
    """Locate go and build its environment; `what` names the builds in error messages."""
    go = require_tool("go", hint=GO_HINT)
    try:
        out = subprocess.run(
            [go, "env", "GOVERSION", "GOPROXY", "GOFLAGS", "GOTOOLCHAIN"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.splitlines()
    except (subprocess.SubprocessError, OSError) as exc:
        raise MissingPrerequisite(f"'{go} env' failed ({exc}); {GO_HINT}") from exc
    goversion, goproxy, goflags, toolchain = [*out, "", "", "", ""][:4]
    # Before 1.21 the go command cannot switch to the newer toolchain these modules declare.
    if version_tuple(goversion) < (1, 21):
        raise MissingPrerequisite(f"'{go}' is {goversion or 'unknown'}, too old; {GO_HINT}")
    if goproxy.strip() in ("", "off"):
        raise MissingPrerequisite(
            f"GOPROXY is '{goproxy}'; building {what} needs the Go module proxy "
            "(unset GOPROXY to use https://proxy.golang.org)"
        )
    go_dir = cache_dir() / "go"
    env = {
        # Kept in our cache folder so `rm -rf` of it resets everything; -modcacherw keeps the
        # module cache deletable without chmod.
        "GOMODCACHE": str(go_dir / "mod"),
        "GOCACHE": str(go_dir / "build"),
        "GOFLAGS": f"{goflags} -modcacherw".strip(),
        "GOPROXY": goproxy,
        # Upstream release binaries are static; this also spares a C compiler.
        "CGO_ENABLED": "0",
        # A go.work in some parent folder must not pull our helper modules into it.
        "GOWORK": "off",
        "GO111MODULE": "on",
    }
    return Go(path=go, env=env, version=goversion, toolchain=toolchain.split("+")[0])


def _proxy_unreachable(goproxy: str, module: str, version: str) -> str | None:
    """Why the first HTTP(S) module proxy cannot be reached, or None if it answers."""
    for entry in re.split(r"[,|]", goproxy):
        if entry.startswith(("http://", "https://")):
            url = f"{entry.rstrip('/')}/{module}/@v/{version}.info"
            try:
                # The scheme was checked just above, so S310's file:// concern does not apply.
                with urllib.request.urlopen(url, timeout=15) as response:  # noqa: S310
                    response.read()
            except urllib.error.HTTPError:
                return None  # it answered; the failure is something else
            except (urllib.error.URLError, OSError) as exc:
                return f"the Go module proxy {entry} is unreachable ({exc})"
            return None
    return None


def download_module(go: Go, module: str, version: str, work: Path, what: str) -> dict[str, str]:
    """Download one module (with its go.mod) and return `go mod download -json`'s record."""
    log = work / "download.log"
    argv = [go.path, "mod", "download", "-json", f"{module}@{version}"]
    with log.open("ab") as handle:
        handle.write(f"\n$ {' '.join(argv)}\n".encode())
    try:
        result = subprocess.run(
            argv,
            cwd=work,
            env={**os.environ, **go.env},
            capture_output=True,
            text=True,
            timeout=DOWNLOAD_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise StartFailed(
            f"downloading {module}@{version} timed out after {DOWNLOAD_TIMEOUT:.0f}s"
        ) from exc
    with log.open("a") as handle:
        handle.write(result.stdout + result.stderr)
    record: dict[str, str] = {}
    with contextlib.suppress(json.JSONDecodeError):
        record = json.loads(result.stdout)
    if result.returncode != 0 or "Error" in record or "GoMod" not in record:
        reason = _proxy_unreachable(go.env["GOPROXY"], module, version)
        if reason is not None:
            raise MissingPrerequisite(f"{reason}; building {what} needs it")
        raise StartFailed(f"downloading {module}@{version} failed; log {log}:\n{tail(log)}")
    return record


def go_directive(go_mod: Path) -> str:
    """The `go` line of a go.mod, so a helper module asks for the same language version."""
    match = re.search(r"^go\s+(\S+)\s*$", go_mod.read_text(), re.MULTILINE)
    return match[1] if match else "1.21"


def build(
    go: Go,
    work: Path,
    package: str,
    version: str,
    target: Path,
    ldflags: str,
    tags: Sequence[str] = (),
) -> None:
    """Resolve and build a main package inside the helper module in `work` (its go.mod written
    by the caller); publish the binary at `target` atomically."""
    log = work / "build.log"
    partial = target.with_name(f".{target.name}.partial")
    argv = [go.path, "build", "-trimpath", f"-ldflags={ldflags}"]
    if tags:
        argv.append(f"-tags={','.join(tags)}")
    try:
        # `go get` of the package records exactly the go.sum entries the build will need; the
        # explicit version matters, as a bare path would upgrade to the newest release.
        run(
            [go.path, "get", f"{package}@{version}"],
            what=f"resolving {package}",
            log_path=log,
            cwd=work,
            env=go.env,
            timeout=DOWNLOAD_TIMEOUT,
        )
        run(
            [*argv, "-o", str(partial), package],
            what=f"building {package}",
            log_path=log,
            cwd=work,
            env=go.env,
            timeout=BUILD_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        raise StartFailed(f"{package}: {exc}; log {log}:\n{tail(log)}") from exc
    partial.chmod(0o755)
    os.replace(partial, target)


def build_once(root: Path, binaries: Sequence[str], build: Callable[[Path], None]) -> Path:
    """The `bin/` folder of `root` holding every one of `binaries`, calling `build(bin)`
    first when one is missing, under a lock so that concurrent processes build once.
    `build` must put each binary in place complete (an atomic rename)."""
    bin_dir = root / "bin"

    def present() -> bool:
        return all(os.access(bin_dir / name, os.X_OK) for name in binaries)

    # Fast path without the lock: binaries only ever appear complete.
    if present():
        return bin_dir
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(
        root / ".build.lock", waiting=f"waiting for another process building into {root} ..."
    ):
        # Another process may have finished the build while this one waited.
        if not present():
            bin_dir.mkdir(parents=True, exist_ok=True)
            build(bin_dir)
    return bin_dir
