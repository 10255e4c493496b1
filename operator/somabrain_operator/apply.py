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


def controller_of(api: client.ApiClient, obj: dict[str, Any]) -> str | None:
    """The uid of the controller owning the live copy of `obj`, if it exists."""
    if obj["kind"] != "Deployment":
        raise ValueError(f"cannot look up the controller of a {obj['kind']}")
    try:
        live = client.AppsV1Api(api).read_namespaced_deployment(
            obj["metadata"]["name"], obj["metadata"]["namespace"]
        )
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    owners = (live.metadata.owner_references if live.metadata else None) or []
    return next((str(o.uid) for o in owners if o.controller), None)
