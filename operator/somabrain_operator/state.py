"""What the operator knows about its objects, from Kopf's in-memory indices.

Kopf keeps the indices current from its watch streams; handlers and the background
loop read them instead of listing objects from the API server. `write_status` writes
a Tenant's status only when it differs from what the index last saw, so a steady
state makes no writes (cases K-2, K-3), and only over the copy it was computed from.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import kopf
from kubernetes import client

from somabrain_operator.config import GROUP, TENANT_PLURAL, VERSION, OperatorSettings
from somabrain_operator.kubeapi import api_client, get_own
from somabrain_operator.peering import Peering
from somabrain_operator.reconcile import Outcome, PolicyLookup, reconcile_tenant

log = logging.getLogger(__name__)


class Retries:
    """When to reconcile again each Tenant whose last reconcile was refused with a
    retry delay (a name conflict, a failed apply). The status loop runs them, so that a
    refused Tenant costs no write while it waits: a handler retry would rewrite Kopf's
    progress annotation every time (case K-3)."""

    def __init__(self) -> None:
        self._due: dict[str, float] = {}
        # When the reconcile whose outcome was noted last for each Tenant started: an
        # older one finishing later (the handler's and the loop's may overlap) is not
        # the last word.
        self._started: dict[str, float] = {}
        self._guard = threading.Lock()

    def note(self, uid: str, outcome: Outcome, *, now: float | None = None) -> None:
        """Schedule the Tenant's next try after a refusal, or drop it after a success;
        `now` is when the reconcile that gave `outcome` started."""
        started = time.monotonic() if now is None else now
        with self._guard:
            if started < self._started.get(uid, float("-inf")):
                return
            self._started[uid] = started
            if outcome.retry_after is None:
                self._due.pop(uid, None)
            else:
                self._due[uid] = started + outcome.retry_after

    def due(self, now: float | None = None, *, limit: int | None = None) -> list[str]:
        """The Tenants whose time has come, the longest waiting first (at most `limit`);
        they stay scheduled until `note`d again."""
        moment = time.monotonic() if now is None else now
        with self._guard:
            ready = sorted((at, uid) for uid, at in self._due.items() if at <= moment)
        return [uid for _, uid in ready[:limit]]

    def drop(self, uid: str) -> None:
        with self._guard:
            self._due.pop(uid, None)
            self._started.pop(uid, None)


class Known:
    """The indices, once Kopf hands them over (the startup handler does), the
    operator's settings, and its peering (None: standalone)."""

    def __init__(self) -> None:
        self.tenants: kopf.Index[str, Any] | None = None
        self.by_policy: kopf.Index[tuple[str, str], Any] | None = None
        self.by_pool: kopf.Index[tuple[str, str], Any] | None = None
        self.by_id: kopf.Index[str, Any] | None = None
        self.policies: kopf.Index[tuple[str, str], Any] | None = None
        # The defaults until `main` reads the environment, where invalid settings are
        # reported as such rather than failing this import.
        self.settings = OperatorSettings.model_construct()
        self.peering: Peering | None = None
        self.stop = threading.Event()
        self.api_client: client.ApiClient | None = None
        # Kopf's thread pool for handlers (None: the event loop's default).
        self.executor: concurrent.futures.Executor | None = None
        self.retries = Retries()

    def api(self) -> client.ApiClient:
        """The process's one API client, shared by Kopf's handler threads and the status
        loop: its connection pool keeps connections open between requests, where a
        client per handler opened (and TLS-handshook) new ones every time. Made by
        `share_api` once the kubeconfig is loaded."""
        if self.api_client is None:
            raise RuntimeError("the operator's API client is not made yet (share_api)")
        return self.api_client

    def share_api(self, connections: int) -> None:
        """Make the shared client from the configuration loaded at startup, keeping up
        to `connections` connections open (one per thread that may use it at once)."""
        configuration = client.Configuration.get_default_copy()
        configuration.connection_pool_maxsize = connections
        self.api_client = api_client(self.settings, configuration)

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

    def pool_members(self, namespace: str, pool: str) -> list[Mapping[str, Any]]:
        """The Tenants naming shared pool `pool` of `namespace`."""
        if self.by_pool is None or (namespace, pool) not in self.by_pool:
            return []
        uids = list(self.by_pool[(namespace, pool)])
        return [body for uid in uids if (body := self.tenant(uid)) is not None]

    def holders(self, tenant_id: str) -> list[Mapping[str, Any]]:
        """Every Tenant, in any namespace, with tenant id `tenant_id`."""
        if self.by_id is None or tenant_id not in self.by_id:
            return []
        uids = list(self.by_id[tenant_id])
        return [body for uid in uids if (body := self.tenant(uid)) is not None]

    def pools(self) -> list[tuple[str, str]]:
        """Every (namespace, pool) some Tenant names."""
        return [] if self.by_pool is None else list(self.by_pool.keys())

    def policy(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        if self.policies is None or (namespace, name) not in self.policies:
            return None
        return next(iter(self.policies[(namespace, name)]), None)


KNOWN = Known()


# What the operator reads of a Tenant's or a policy's metadata; the rest (managedFields
# above all, several KiB per object, and Kopf's annotations) is left out of the index.
_META_KEPT = (
    "name",
    "namespace",
    "uid",
    "generation",
    "resourceVersion",
    "creationTimestamp",
    "deletionTimestamp",
    "finalizers",
    "labels",
)


def snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    """A plain copy of what the operator reads of a Kopf body (its kind, the metadata
    in `_META_KEPT`, spec and status), safe to keep in an index."""
    meta = body.get("metadata") or {}
    kept: dict[str, Any] = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: _plain(meta[k]) for k in _META_KEPT if k in meta},
    }
    for part in ("spec", "status"):
        if part in body:
            kept[part] = _plain(body[part])
    return kept


def _plain(value: Any) -> Any:
    """A deep copy of JSON-like data, as dicts, lists and scalars."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _differs(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Whether a merge patch of `wanted` would change `current` (a None removes a key)."""
    for key, value in wanted.items():
        if value is None:
            if current.get(key) is not None:
                return True
        elif isinstance(value, Mapping) and isinstance(current.get(key), Mapping):
            if _differs(current[key], value):
                return True
        elif current.get(key) != value:
            return True
    return False


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


ATTEMPTS = 3


def reconcile_known(
    api: client.ApiClient,
    body: Mapping[str, Any],
    *,
    policy_of: PolicyLookup | None = None,
) -> Outcome | None:
    """Reconcile a Tenant outside its own handlers (policy change, child edit, repair,
    rollout step, pool change), write its status, then `follow_others`. `body` is
    usually the index's copy: the Tenant is read first, since the index may still hold
    one deleted meanwhile (its reconcile would put it back into its pool), and read
    again when it moves on while its status is written. None when it is gone or
    being deleted."""
    started = time.monotonic()
    current = fresh(api, body)
    for attempt in range(1, ATTEMPTS + 1):
        if current is None or current["metadata"].get("deletionTimestamp"):
            return None
        outcome = reconcile_tenant(
            api,
            current,
            policy_of=policy_of or KNOWN.policy,
            settings=KNOWN.settings,
            members_of=KNOWN.pool_members,
            holders_of=KNOWN.holders,
        )
        KNOWN.retries.note(str(current["metadata"]["uid"]), outcome, now=started)
        try:
            write_status(api, current, outcome.status)
        except StaleCopy:
            if attempt < ATTEMPTS:
                current = fresh(api, current)
                continue
            meta = current["metadata"]
            log.warning(
                "Tenant %s/%s kept changing while its status was written; left to the next "
                "reconcile",
                meta["namespace"],
                meta["name"],
            )
        follow_others(api, outcome)
        return outcome
    return None


def follow_others(api: client.ApiClient, outcome: Outcome) -> None:
    """Reconcile the Tenants a reconcile made stale (members of a shared pool whose
    verdict changed) and write their statuses; one level only, since each of those
    reconciles converges the same pool."""
    for uid in outcome.others:
        known = KNOWN.tenant(uid)
        other = fresh(api, known) if known is not None else None
        if other is None or other["metadata"].get("deletionTimestamp"):
            continue
        started = time.monotonic()
        followed = reconcile_tenant(
            api, other, policy_of=KNOWN.policy, settings=KNOWN.settings,
            members_of=KNOWN.pool_members, holders_of=KNOWN.holders,
        )  # fmt: skip
        KNOWN.retries.note(uid, followed, now=started)
        # Changed meanwhile: the status tick's pool check writes it from the newer copy.
        with contextlib.suppress(StaleCopy):
            write_status(api, other, followed.status)


def deleted_event(type: str, **_: Any) -> bool:
    """Kopf `when=` filter: the event is the object's DELETED one."""
    return type == "DELETED"


def fresh(api: client.ApiClient, body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The Tenant as the API server has it now (the index may lag behind a write), or
    None when it is gone."""
    meta = body["metadata"]
    return get_own(api, TENANT_PLURAL, meta["namespace"], meta["name"])


def each(bodies: list[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """Tenants still present, skipping those being deleted."""
    for body in bodies:
        if not body.get("metadata", {}).get("deletionTimestamp"):
            yield body
