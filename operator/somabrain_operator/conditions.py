"""Status conditions, and Kubernetes Events for their transitions.

A condition's `lastTransitionTime` moves only when its status changes, so writing the
same conditions again writes nothing new (cases K-2, K-3). Each writer of a Tenant's
status owns some condition types and keeps the others as they are.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from kubernetes import client
from urllib3.exceptions import HTTPError as TransportError

log = logging.getLogger(__name__)

READY = "Ready"
ALERTS = "AlertsConfigured"
PUBLISHER = "PublisherAvailable"


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    kind: str,
    *,
    ok: bool | None,
    reason: str,
    message: str,
    generation: int,
    previous: Iterable[Mapping[str, Any]],
) -> dict[str, Any]:
    """A condition (`ok` None is Unknown) whose lastTransitionTime is kept from
    `previous` while its status stays the same."""
    status = "Unknown" if ok is None else "True" if ok else "False"
    before = next((c for c in previous if c.get("type") == kind), None)
    since = before["lastTransitionTime"] if before and before.get("status") == status else now()
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message[:32768],
        "observedGeneration": generation,
        "lastTransitionTime": since,
    }


def merge(
    previous: Iterable[Mapping[str, Any]], updates: Iterable[dict[str, Any]]
) -> list[dict[str, Any]]:
    """`previous` with the types of `updates` replaced, in a stable order."""
    by_type = {str(c["type"]): dict(c) for c in previous}
    by_type.update({c["type"]: c for c in updates})
    order = [READY, PUBLISHER, ALERTS]
    return sorted(by_type.values(), key=lambda c: [*order, c["type"]].index(c["type"]))


def transitions(
    previous: Iterable[Mapping[str, Any]], current: Iterable[Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    """The conditions of `current` whose status or reason differ from `previous`."""
    before = {c.get("type"): (c.get("status"), c.get("reason")) for c in previous}
    return [c for c in current if before.get(c["type"]) != (c["status"], c["reason"])]


def post_event(
    api: client.ApiClient,
    obj: Mapping[str, Any],
    *,
    warning: bool,
    reason: str,
    message: str,
) -> None:
    """Record an Event about `obj`. A refused or failed post (forbidden, API server
    unreachable, an object the Event cannot describe) is logged and never fails the
    caller (case K-10)."""
    meta = obj["metadata"]
    try:
        _create_event(api, obj, warning=warning, reason=reason, message=message)
    except (client.ApiException, TransportError, OSError, ValueError) as exc:
        log.warning(
            "could not record event %s on %s/%s: %s",
            reason,
            meta.get("namespace"),
            meta.get("name"),
            getattr(exc, "reason", None) or exc,
        )


def _create_event(
    api: client.ApiClient, obj: Mapping[str, Any], *, warning: bool, reason: str, message: str
) -> None:
    meta = obj["metadata"]
    stamp = dt.datetime.now(dt.UTC)
    event = client.CoreV1Event(
        metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=meta["namespace"]),
        involved_object=client.V1ObjectReference(
            api_version=obj.get("apiVersion"),
            kind=obj.get("kind"),
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta.get("uid"),
            resource_version=meta.get("resourceVersion"),
        ),
        type="Warning" if warning else "Normal",
        reason=reason,
        message=message[:1024],
        source=client.V1EventSource(component="somabrain-operator"),
        first_timestamp=stamp,
        last_timestamp=stamp,
        count=1,
        reporting_component="somabrain-operator",
        reporting_instance="somabrain-operator",
    )
    client.CoreV1Api(api).create_namespaced_event(meta["namespace"], event)


def ready_reason(body: Mapping[str, Any]) -> str | None:
    """The reason of the object's Ready condition, if it has one."""
    conditions = (body.get("status") or {}).get("conditions") or []
    return next((c.get("reason") for c in conditions if c.get("type") == READY), None)
