"""What the operator knows about its objects, from Kopf's in-memory indices.

Kopf keeps the indices current from its watch streams; handlers and the background
loop read them instead of listing objects from the API server. `write_status` writes
a Tenant's status only when it differs from what the index last saw, so a steady
state makes no writes (cases K-2, K-3), and only over the copy it was computed from.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import kopf
from kubernetes import client

from somabrain_operator.config import GROUP, TENANT_PLURAL, VERSION, OperatorSettings
from somabrain_operator.reconcile import Outcome, PolicyLookup, reconcile_tenant

log = logging.getLogger(__name__)


class Known:
    """The indices, once Kopf hands them over (the startup handler does), and the
    operator's settings."""

    def __init__(self) -> None:
        self.tenants: kopf.Index[str, Any] | None = None
        self.by_policy: kopf.Index[tuple[str, str], Any] | None = None
        self.policies: kopf.Index[tuple[str, str], Any] | None = None
        self.settings = OperatorSettings()
        self.stop = threading.Event()

    def tenant_bodies(self) -> list[Mapping[str, Any]]:
        if self.tenants is None:
            return []
        return [body for store in list(self.tenants.values()) for body in list(store)]

    def tenant(self, uid: str) -> Mapping[str, Any] | None:
        if self.tenants is None or uid not in self.tenants:
            return None
        return next(iter(self.tenants[uid]), None)

    def tenants_of_policy(self, namespace: str, name: str) -> list[Mapping[str, Any]]:
        if self.by_policy is None or (namespace, name) not in self.by_policy:
            return []
        uids = list(self.by_policy[(namespace, name)])
        return [body for uid in uids if (body := self.tenant(uid)) is not None]

    def policy(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        if self.policies is None or (namespace, name) not in self.policies:
            return None
        return next(iter(self.policies[(namespace, name)]), None)


KNOWN = Known()


def snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    """A plain copy of a Kopf body, safe to keep in an index."""
    return copy.deepcopy(dict(body))


def _differs(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    return any(current.get(key) != value for key, value in wanted.items())


class StaleCopy(Exception):
    """The Tenant changed since the copy a status was computed from."""


def write_status(api: client.ApiClient, body: Mapping[str, Any], status: dict[str, Any]) -> bool:
    """Merge `status` into the Tenant's status if any of its fields differ; True when
    it wrote. A Tenant deleted meanwhile is not an error.

    A merge patch replaces `conditions` whole, so a list computed from an older copy
    would drop what another writer set since (a handler's `Ready`, the status loop's
    `PublisherAvailable`). The patch therefore carries the copy's resourceVersion, and
    the API server refuses it, as `StaleCopy`, when the Tenant has moved on."""
    if not _differs(body.get("status") or {}, status):
        return False
    meta = body["metadata"]
    patch: dict[str, Any] = {"status": status}
    if meta.get("resourceVersion"):
        patch["metadata"] = {"resourceVersion": meta["resourceVersion"]}
    try:
        client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], TENANT_PLURAL, meta["name"], patch
        )
    except client.ApiException as exc:
        if exc.status == 404:
            return False
        if exc.status == 409:
            raise StaleCopy(f"Tenant {meta['namespace']}/{meta['name']}") from exc
        raise
    return True


def _read_tenant(api: client.ApiClient, body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    meta = body["metadata"]
    try:
        fresh: Mapping[str, Any] = client.CustomObjectsApi(api).get_namespaced_custom_object(  # type: ignore[assignment]
            GROUP, VERSION, meta["namespace"], TENANT_PLURAL, meta["name"]
        )
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return fresh


ATTEMPTS = 3


def reconcile_known(
    api: client.ApiClient, body: Mapping[str, Any], *, policy_of: PolicyLookup | None = None
) -> Outcome:
    """Reconcile a Tenant outside its own handlers (policy change, child edit, repair,
    rollout step) and write its status. `body` is usually the index's copy; when the
    Tenant has moved on since, it is read again and reconciled again from that."""
    for attempt in range(1, ATTEMPTS + 1):
        outcome = reconcile_tenant(
            api, body, policy_of=policy_of or KNOWN.policy, settings=KNOWN.settings
        )
        try:
            write_status(api, body, outcome.status)
            return outcome
        except StaleCopy:
            if attempt == ATTEMPTS:
                break
            fresh = _read_tenant(api, body)
            if fresh is None:  # deleted meanwhile
                return outcome
            body = fresh
    meta = body["metadata"]
    log.warning(
        "Tenant %s/%s kept changing while its status was written; left to the next reconcile",
        meta["namespace"],
        meta["name"],
    )
    return outcome


def each(bodies: list[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """Tenants still present, skipping those being deleted."""
    for body in bodies:
        if not body.get("metadata", {}).get("deletionTimestamp"):
            yield body
