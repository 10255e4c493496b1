"""Kopf handlers of the Tenant kind: reconcile on every change, clean up on deletion.

Create, update and resume all run `reconcile.reconcile_tenant`. Deletion honours
`deletionPolicy`: `Retain` needs nothing beyond the ownerReferences of the children,
so such a Tenant carries no finalizer (case K-5); `Drain` and `Delete` reach outside
the cluster (the outbox), so Kopf puts its finalizer on those Tenants only, and the
cleanup runs before the Tenant disappears (case K-6).

If the operator is down while a Drain or Delete Tenant is deleted, the Tenant waits
in Terminating until the operator returns; to let it go without cleanup, remove the
finalizer by hand (see README, "Deleting a Tenant").
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

import kopf
import pydantic
from kubernetes import client
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from somabrain.config.types import TenantId
from somabrain.store.engine import make_engine
from somabrain.store.outbox import advisory_lock_key, backlog, delete_tenant_events
from somabrain_operator import children, pools
from somabrain_operator.apply import delete
from somabrain_operator.conditions import (
    PUBLISHER,
    READY,
    condition,
    merge,
    post_event,
    ready_reason,
)
from somabrain_operator.config import GROUP, TENANT_PLURAL, VERSION
from somabrain_operator.metrics import observe
from somabrain_operator.reconcile import first_holder, forget, reconcile_tenant
from somabrain_operator.resources import TenantSpec
from somabrain_operator.state import KNOWN, deleted_event, follow_others, reconcile_known, snapshot

log = logging.getLogger(__name__)

DELETE_CHUNK = 5_000


class Waiting(kopf.TemporaryError):
    """A clean-up still in progress (draining, deleting): Kopf calls the handler again
    after `delay`. Logged at INFO, not as a failure, and counted as `waiting`."""

    waiting = True
    MARK = "cleanup in progress: "

    def __init__(self, message: str, *, delay: float) -> None:
        super().__init__(self.MARK + message, delay=delay)


DELETE_BUDGET_SECONDS = 10.0


# The indexing functions are coroutines, so Kopf runs them on its event loop: a sync
# function goes to the handler threads, and each Tenant event would wait there four
# times behind the reconciles queued before it, with its body held meanwhile.
@kopf.index(GROUP, VERSION, TENANT_PLURAL)
async def tenant_bodies(uid: str, body: kopf.Body, **_: Any) -> dict[str, Any]:
    return {uid: snapshot(body)}


@kopf.index(GROUP, VERSION, TENANT_PLURAL)
async def tenants_by_policy(
    uid: str, namespace: str | None, spec: kopf.Spec, **_: Any
) -> dict[tuple[str, str], str]:
    ref = (spec.get("policyRef") or {}).get("name")
    return {(str(namespace), str(ref)): uid} if ref else {}


@kopf.index(GROUP, VERSION, TENANT_PLURAL)
async def tenants_by_id(uid: str, spec: kopf.Spec, **_: Any) -> dict[str, str]:
    tenant_id = spec.get("tenantId")
    return {str(tenant_id): uid} if tenant_id else {}


@kopf.index(GROUP, VERSION, TENANT_PLURAL)
async def tenants_by_pool(
    uid: str, namespace: str | None, spec: kopf.Spec, **_: Any
) -> dict[tuple[str, str], str]:
    publisher = spec.get("publisher") or {}
    pool = publisher.get("pool") if publisher.get("mode") == "shared" else None
    return {(str(namespace), str(pool)): uid} if pool else {}


@kopf.on.resume(GROUP, VERSION, TENANT_PLURAL)
@kopf.on.create(GROUP, VERSION, TENANT_PLURAL)
@kopf.on.update(GROUP, VERSION, TENANT_PLURAL, field="spec")
def reconcile(
    body: kopf.Body, patch: kopf.Patch, name: str, namespace: str | None, **_: Any
) -> None:
    api = KNOWN.api()
    started = time.monotonic()
    with observe("Tenant", "change"):
        outcome = reconcile_tenant(
            api,
            body,
            policy_of=KNOWN.policy,
            settings=KNOWN.settings,
            members_of=KNOWN.pool_members,
            holders_of=KNOWN.holders,
        )
        follow_others(api, outcome)
    patch.status.update(outcome.status)
    # A refusal is in the status (Ready=False with its reason) and the log; it is tried
    # again by the status loop when it says when, or by the next change that may end it.
    KNOWN.retries.note(str(body["metadata"]["uid"]), outcome, now=started)


def _pool_of(body: Mapping[str, Any]) -> str | None:
    """The pool a Tenant was last reconciled into, if any."""
    pool = ((body.get("status") or {}).get("resolved") or {}).get("pool")
    return str(pool) if pool else None


@kopf.on.event(GROUP, VERSION, TENANT_PLURAL, when=deleted_event)
def gone(body: kopf.Body, **_: Any) -> None:
    """A Tenant is gone (it may have carried no finalizer, so this event is all the
    operator sees of it): its pool goes on without it, and a Tenant refused for using
    its tenant id gets it."""
    pool = _pool_of(body)
    if pool is not None:
        _leave_pool(body, pool)
    tenant_id = (body.get("spec") or {}).get("tenantId")
    uid = str(body["metadata"]["uid"])
    waiting = [b for b in KNOWN.holders(str(tenant_id)) if str(b["metadata"]["uid"]) != uid]
    if tenant_id and waiting:
        api = KNOWN.api()
        with observe("Tenant", "tenant-id"):
            for other in waiting:
                reconcile_known(api, other)


def _leave_pool(body: Mapping[str, Any], pool: str) -> None:
    """Converge `pool` without the Tenant `body`: through another member's reconcile
    (which also writes the statuses that change), or, when none is left, by deleting
    the pool's publisher."""
    namespace = str(body["metadata"]["namespace"])
    uid = str(body["metadata"]["uid"])
    rest = [m for m in KNOWN.pool_members(namespace, pool) if str(m["metadata"]["uid"]) != uid]
    api = KNOWN.api()
    with observe("Tenant", "pool"):
        if not any(reconcile_known(api, member) is not None for member in rest):
            pools.converge(api, namespace, pools.plan(pool, []), settings=KNOWN.settings)


def _cleans_up(spec: kopf.Spec, **_: Any) -> bool:
    return spec.get("deletionPolicy") in ("Drain", "Delete")


@kopf.on.delete(GROUP, VERSION, TENANT_PLURAL, when=_cleans_up)
def clean_up(body: kopf.Body, meta: kopf.Meta, patch: kopf.Patch, **_: Any) -> None:
    """Drain the backlog, or delete the tenant's events, before the Tenant goes."""
    try:
        spec = TenantSpec.from_body(body.get("spec") or {})
    except pydantic.ValidationError:
        return  # never reconciled, nothing of ours outside the cluster
    policy = spec.deletion_policy
    tenant = TenantId(spec.tenant_id)
    holder = first_holder(KNOWN.holders(spec.tenant_id) or [body])
    api = KNOWN.api()
    with observe("Tenant", "delete"):
        if holder is not None and str(holder["metadata"]["uid"]) != str(meta["uid"]):
            hm = holder["metadata"]
            post_event(
                api,
                body,
                warning=True,
                reason="CleanupSkipped",
                message=f"tenant id {tenant} belongs to Tenant {hm['namespace']}/{hm['name']}, "
                f"not to this one: deletionPolicy {policy} leaves its events alone",
            )
            forget(str(meta["uid"]))
            return
        if KNOWN.settings.database_url is None:
            post_event(
                api,
                body,
                warning=True,
                reason="CleanupSkipped",
                message=f"deletionPolicy {policy} needs the operator's database access "
                "(SOMABRAIN_OPERATOR_DATABASE_URL); the tenant's events are left in the outbox",
            )
            return
        engine = _engine()
        if policy == "Drain":
            _drain(api, engine, body, meta, patch, tenant)
        else:
            _delete_events(api, engine, body, meta, patch, tenant)
    forget(str(meta["uid"]))


def _drain(
    api: client.ApiClient,
    engine: Engine,
    body: kopf.Body,
    meta: kopf.Meta,
    patch: kopf.Patch,
    tenant: TenantId,
) -> None:
    with Session(engine) as session:
        pending = backlog(session, tenant_id=tenant).pending
    waited = _since_deletion(meta)
    limit = KNOWN.settings.drain_timeout_seconds
    if pending == 0:
        log.info(
            "Tenant %s/%s drained: no pending events; it goes", meta["namespace"], meta["name"]
        )
        post_event(
            api, body, warning=False, reason="Drained", message="no pending events; deleting"
        )
        return
    if waited >= limit:
        log.warning(
            "Tenant %s/%s: %d events still pending after the drain timeout (%g s); it goes, "
            "its events stay in the outbox",
            meta["namespace"],
            meta["name"],
            pending,
            limit,
        )
        post_event(
            api,
            body,
            warning=True,
            reason="DrainTimedOut",
            message=f"{pending} events still pending after {limit:g} s; deleting the Tenant "
            "and its publisher, the events stay in the outbox",
        )
        return
    publisher = next(
        (c for c in (body.get("status") or {}).get("conditions") or [] if c["type"] == PUBLISHER),
        None,
    )
    if publisher is not None and publisher.get("status") != "True":
        message = (
            f"draining: {pending} events pending, but no publisher reports for the tenant "
            f"({publisher.get('reason')}): unless one does, the Tenant goes in "
            f"{limit - waited:.0f} s and its events stay in the outbox"
        )
    else:
        message = (
            f"draining: {pending} events pending; the publisher keeps running until they "
            f"are delivered or {limit - waited:.0f} s more have passed"
        )
    if ready_reason(body) != "Draining":  # an Event when it starts; then the condition
        post_event(api, body, warning=False, reason="Draining", message=message)
    _set_ready(patch, body, reason="Draining", message=message)
    raise Waiting(message, delay=5)


def _delete_events(
    api: client.ApiClient,
    engine: Engine,
    body: kopf.Body,
    meta: kopf.Meta,
    patch: kopf.Patch,
    tenant: TenantId,
) -> None:
    # The publisher must be gone first: the operator then takes the tenant's lock, so
    # none can start while the rows go. A pool's publisher serves a Tenant being
    # deleted only while it drains: reconciling the pool restarts it without this one.
    delete(
        api,
        "Deployment",
        name=children.publisher_name(tenant),
        namespace=str(meta["namespace"]),
        controller=str(meta["uid"]),
    )
    pool = _pool_of(body)
    if pool is not None:
        _leave_pool(body, pool)
    deleted = 0
    if ready_reason(body) != "Deleting":  # an Event when it starts; then the condition
        post_event(
            api,
            body,
            warning=False,
            reason="Deleting",
            message=f"deleting the events of tenant {tenant} from the outbox",
        )
    with _tenant_lock(engine, tenant) as locked:
        if not locked:
            message = "deleting: waiting for the tenant's publisher to stop"
            _set_ready(patch, body, reason="Deleting", message=message)
            raise Waiting(message, delay=5)
        deadline = time.monotonic() + DELETE_BUDGET_SECONDS
        while True:
            with Session(engine) as session, session.begin():
                chunk = delete_tenant_events(session, tenant_id=tenant, chunk=DELETE_CHUNK)
            deleted += chunk
            if chunk == 0:
                break
            if time.monotonic() >= deadline:
                message = f"deleting: {deleted} more events deleted, continuing"
                _set_ready(patch, body, reason="Deleting", message=message)
                raise Waiting(message, delay=0.1)
    log.info(
        "Tenant %s/%s: the events of tenant %s are deleted (%d in the last pass)",
        meta["namespace"],
        meta["name"],
        tenant,
        deleted,
    )
    post_event(
        api,
        body,
        warning=False,
        reason="EventsDeleted",
        message=f"the tenant's events are deleted from the outbox ({deleted} in the last pass)",
    )


@contextlib.contextmanager
def _tenant_lock(engine: Engine, tenant: TenantId) -> Iterator[bool]:
    with engine.connect() as conn:
        key = advisory_lock_key(tenant)
        locked = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
        conn.commit()
        try:
            yield locked
        finally:
            if locked:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()


def _since_deletion(meta: kopf.Meta) -> float:
    stamp = meta.get("deletionTimestamp")
    if not stamp:
        return 0.0
    started = dt.datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    return (dt.datetime.now(dt.UTC) - started).total_seconds()


def _set_ready(patch: kopf.Patch, body: kopf.Body, *, reason: str, message: str) -> None:
    previous = list((body.get("status") or {}).get("conditions") or [])
    generation = int(body["metadata"].get("generation", 0))
    cond = condition(
        READY, ok=False, reason=reason, message=message, generation=generation, previous=previous
    )
    patch.status["conditions"] = merge(previous, [cond])


_engines: dict[str, Engine] = {}


def _engine() -> Engine:
    url = KNOWN.settings.database_url
    assert url is not None
    if url not in _engines:
        _engines[url] = make_engine(url, pool_size=2)
    return _engines[url]
