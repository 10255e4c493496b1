"""A stand-in for the kubelet: run the containers of Deployments as local processes.

The local stack has no kubelet, so Deployments get no pods. This runner reads each
Deployment the operator created and starts its container's command and args on this
machine, with exactly the environment the Deployment declares (`env` with literal
values, Secret and ConfigMap references; `envFrom`), resolved from the API server. A
publisher that runs here therefore runs as written in its Deployment. The image is not
used: its command is looked up on PATH, where the checkout's virtualenv provides it.

What a pod would have that a local process lacks, and how it is stood in for:
- ConfigMap volumes: their files are written into a folder of the pod's own, and
  rewritten when the ConfigMap changes (as the kubelet does, without a restart); an
  environment value under a mount path points into that folder instead.
- Its own network namespace: each declared container port is given a free port on
  loopback, and an environment value equal to a declared port becomes that port
  (`LocalPod.ports` maps one to the other).

Limits: one process per Deployment whatever `replicas` says (0 runs none); no probes,
resource limits, or volumes of other kinds.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import sys
from pathlib import Path
from typing import Any

from kubernetes import client

from devenv import common


@dataclasses.dataclass
class LocalPod:
    namespace: str
    deployment: str
    template_hash: str
    pid: int
    log_path: Path
    ports: dict[int, int] = dataclasses.field(default_factory=dict)  # declared -> local
    mounts: dict[str, Path] = dataclasses.field(default_factory=dict)  # mountPath -> folder


def resolve_env(api: client.CoreV1Api, namespace: str, container: Any) -> dict[str, str]:
    """A container's environment as the kubelet gives it: literal values, and the
    Secret and ConfigMap values it references, read with `api`'s credentials."""
    env: dict[str, str] = {}
    for source in container.env_from or []:
        if source.config_map_ref is not None:
            cm = api.read_namespaced_config_map(source.config_map_ref.name, namespace)
            env.update(cm.data or {})
        if source.secret_ref is not None:
            secret = api.read_namespaced_secret(source.secret_ref.name, namespace)
            env.update({k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()})
    for var in container.env or []:
        if var.value is not None:
            env[var.name] = var.value
        elif var.value_from is not None and var.value_from.secret_key_ref is not None:
            ref = var.value_from.secret_key_ref
            secret = api.read_namespaced_secret(ref.name, namespace)
            env[var.name] = base64.b64decode((secret.data or {})[ref.key]).decode()
        elif var.value_from is not None and var.value_from.config_map_key_ref is not None:
            ref = var.value_from.config_map_key_ref
            env[var.name] = (api.read_namespaced_config_map(ref.name, namespace).data or {})[
                ref.key
            ]
    return env


def base_environment() -> dict[str, str]:
    """Only what any container image would have; nothing from the caller's SOMABRAIN_*
    (the checkout's virtualenv on PATH stands in for the image's commands)."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/"),
        "LANG": "C.UTF-8",
    }


class PodRunner:
    """Keeps one local process per Deployment matching a label selector."""

    def __init__(self, api_client: client.ApiClient, *, log_dir: Path, selector: str) -> None:
        self.apps = client.AppsV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.log_dir = log_dir
        self.selector = selector
        self.pods: dict[tuple[str, str], LocalPod] = {}

    def sync(self, namespace: str) -> list[LocalPod]:
        """Start, restart (template changed or process died) or stop processes to match."""
        deployments: list[Any] = self.apps.list_namespaced_deployment(
            namespace, label_selector=self.selector
        ).items
        wanted = set()
        for deployment in deployments:
            key = (namespace, str(deployment.metadata.name))
            if (deployment.spec.replicas or 0) < 1:
                continue
            wanted.add(key)
            template_hash = hashlib.sha256(
                str(deployment.spec.template.to_dict()).encode()
            ).hexdigest()
            current = self.pods.get(key)
            if current and current.template_hash == template_hash and common.pid_alive(current.pid):
                self._write_volumes(namespace, deployment, current.mounts)
                continue
            if current:
                common.stop_pid(current.pid)
            self.pods[key] = self._start(namespace, deployment, template_hash)
        for key in [k for k in self.pods if k[0] == namespace and k not in wanted]:
            common.stop_pid(self.pods.pop(key).pid)
        return [p for k, p in self.pods.items() if k[0] == namespace]

    def _start(self, namespace: str, deployment: Any, template_hash: str) -> LocalPod:
        container = deployment.spec.template.spec.containers[0]
        argv = [*(container.command or []), *(container.args or [])]
        if not argv:
            raise common.StartFailed(
                f"Deployment {namespace}/{deployment.metadata.name} declares no command"
            )
        env = resolve_env(self.core, namespace, container)
        pod_dir = self.log_dir / f"{namespace}.{deployment.metadata.name}"
        mounts = {m.mount_path: pod_dir / "volumes" / m.name for m in container.volume_mounts or []}
        self._write_volumes(namespace, deployment, mounts)
        ports = {p.container_port: common.free_port() for p in container.ports or []}
        for name, value in env.items():
            for mount_path, folder in mounts.items():
                if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
                    env[name] = str(folder) + value[len(mount_path.rstrip("/")) :]
            if value.isdigit() and int(value) in ports:
                env[name] = str(ports[int(value)])
        log_path = self.log_dir / f"{namespace}.{deployment.metadata.name}.log"
        pid = common.spawn(argv, log_path=log_path, env=base_environment() | env, inherit_env=False)
        return LocalPod(
            namespace, deployment.metadata.name, template_hash, pid, log_path, ports, mounts
        )

    def _write_volumes(self, namespace: str, deployment: Any, mounts: dict[str, Path]) -> None:
        """Write each ConfigMap volume's files; replace those whose content changed."""
        container = deployment.spec.template.spec.containers[0]
        by_name = {v.name: v for v in deployment.spec.template.spec.volumes or []}
        for mount in container.volume_mounts or []:
            volume = by_name.get(mount.name)
            if volume is None or volume.config_map is None:
                continue
            data = self.core.read_namespaced_config_map(volume.config_map.name, namespace).data
            data = data or {}
            items = volume.config_map.items or [
                client.V1KeyToPath(key=k, path=k) for k in sorted(data)
            ]
            folder = mounts[mount.mount_path]
            folder.mkdir(parents=True, exist_ok=True)
            for item in items:
                target = folder / item.path
                content = data.get(item.key, "")
                if target.exists() and target.read_text() == content:
                    continue
                partial = target.with_suffix(target.suffix + ".partial")
                partial.write_text(content)
                partial.replace(target)

    def stop_all(self) -> None:
        for pod in self.pods.values():
            common.stop_pid(pod.pid)
        self.pods.clear()
