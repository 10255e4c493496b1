"""What the operator knows about its objects, from Kopf's in-memory indices.

Kopf keeps the indices current from its watch streams; handlers and the background
loop read them instead of listing objects from the API server. `write_status` writes
a Tenant's status only when it differs from what the index last saw, so a steady
state makes no writes (cases K-2, K-3).
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
from somabrain_operator.reconcile import Outcome, reconcile_tenant

log = logging.getLogger(__name__)


class Known:
    """The indices, once Kopf hands them over (the startup handler does), and the
    operator's settings."""

    def __init__(self) -> None:
        self.tenants: kopf.Index[str, Any] | None = None
        self.by_policy: kopf.Index[tuple[str, str], Any] | None = None
        self.policies: kopf.Index[tuple[str, str], Any] | None = None
        # The defaults until `main` reads the environment, where invalid settings are
        # reported as such rather than failing this import.
        self.settings = OperatorSettings.model_construct()
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


def write_status(api: client.ApiClient, body: Mapping[str, Any], status: dict[str, Any]) -> bool:
    """Merge `status` into the Tenant's status if any of its fields differ; True when
    it wrote. A Tenant deleted meanwhile is not an error."""
    if not _differs(body.get("status") or {}, status):
        return False
    meta = body["metadata"]
    try:
        client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], TENANT_PLURAL, meta["name"], {"status": status}
        )
    except client.ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def reconcile_known(api: client.ApiClient, body: Mapping[str, Any]) -> Outcome:
    """Reconcile a Tenant outside its own handlers (policy change, child edit, repair)
    and write its status."""
    outcome = reconcile_tenant(api, body, policy_of=KNOWN.policy, settings=KNOWN.settings)
    write_status(api, body, outcome.status)
    return outcome


def each(bodies: list[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """Tenants still present, skipping those being deleted."""
    for body in bodies:
        if not body.get("metadata", {}).get("deletionTimestamp"):
            yield body
