"""Server-side apply of the children the operator owns, under one field manager."""

from __future__ import annotations

from typing import Any

from kubernetes import client

from somabrain_operator.config import FIELD_MANAGER

APPLY = "application/apply-patch+yaml"


def apply(api: client.ApiClient, obj: dict[str, Any]) -> None:
    """Converge one object on `obj`: created if missing, our fields set, others' left alone."""
    kind = obj["kind"]
    name = obj["metadata"]["name"]
    namespace = obj["metadata"]["namespace"]
    options: dict[str, Any] = {
        "field_manager": FIELD_MANAGER,
        "force": True,
        "_content_type": APPLY,
    }
    if kind == "ConfigMap":
        client.CoreV1Api(api).patch_namespaced_config_map(name, namespace, obj, **options)
    elif kind == "Deployment":
        client.AppsV1Api(api).patch_namespaced_deployment(name, namespace, obj, **options)
    else:
        raise ValueError(f"the operator does not apply objects of kind {kind}")
