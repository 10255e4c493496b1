"""A stand-in for the kubelet: run the containers of Deployments as local processes.

The local stack has no kubelet, so Deployments get no pods. This runner reads each
Deployment the operator created and starts its container's command and args on this
machine, with exactly the environment the Deployment declares (`env` with literal
values, Secret and ConfigMap references; `envFrom`), resolved from the API server. A
publisher that runs here therefore runs as written in its Deployment. The image is not
used: its command is looked up on PATH, where the checkout's virtualenv provides it.

Limits: one process per Deployment whatever `replicas` says (0 runs none); no volumes,
probes or resource limits.
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


def _resolve_env(api: client.CoreV1Api, namespace: str, container: Any) -> dict[str, str]:
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


def _base_environment() -> dict[str, str]:
    # Only what any container image would have; nothing from the caller's SOMABRAIN_*.
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
        env = _base_environment() | _resolve_env(self.core, namespace, container)
        log_path = self.log_dir / f"{namespace}.{deployment.metadata.name}.log"
        pid = common.spawn(argv, log_path=log_path, env=env, inherit_env=False)
        return LocalPod(namespace, deployment.metadata.name, template_hash, pid, log_path)

    def stop_all(self) -> None:
        for pod in self.pods.values():
            common.stop_pid(pod.pid)
        self.pods.clear()
