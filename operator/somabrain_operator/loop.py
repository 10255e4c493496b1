"""The operator's background loop: each tenant's backlog into its status, and the
periodic repair.

Source of the backlog: the `outbox_tenants` table, where each tenant's active
publisher records its backlog, oldest pending age, circuit and identity every 5 s.
One query reads every tenant's row, whatever the number of tenants, and needs no
network path to the publisher pods (their /metrics may be unreachable from the
operator, and a dead publisher has no metrics at all, while its stale row says just
that). A Tenant's status is written only when what it shows changed, at most once per
`status_interval_seconds`.

A Tenant gets these fields once it has been reconciled (its status has an
`observedGeneration`). `PublisherAvailable` is True while a publisher's report is
younger than `publisher_report_max_age_seconds`, False when it is older or missing,
Unknown when the operator has no database access.

The repair pass reconciles every Tenant once per `repair_interval_seconds`, a slice
per tick, so that drift the watches missed is repaired within a bounded time.
Applying what already matches writes nothing.

With peering, the loop runs only while Kopf lets this process act (case K-7): a
paused process's indices are frozen where its watches stopped, so acting on them would
undo what the active peer writes. Each tick first reads the peering object.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import pydantic
from kubernetes import client
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from urllib3.exceptions import HTTPError as TransportError

from somabrain.store.engine import make_engine
from somabrain.store.outbox import TenantReport, tenant_reports
from somabrain_operator import pools, rollout
from somabrain_operator.conditions import (
    PUBLISHER,
    condition,
    merge,
    now,
    post_event,
    transitions,
)
from somabrain_operator.config import GROUP, POLICY_PLURAL, VERSION, OperatorSettings
from somabrain_operator.kubeapi import get_own
from somabrain_operator.metrics import STATUS_WRITES, observe
from somabrain_operator.peering import Peering
from somabrain_operator.reconcile import (
    Outcome,
    PolicyLookup,
    misjudged_members,
    pool_plan,
    removing_stale,
)
from somabrain_operator.resources import OutboxPolicySpec, TenantSpec
from somabrain_operator.state import KNOWN, StaleCopy, each, reconcile_known, write_status

log = logging.getLogger(__name__)


def backlog_status(
    body: Mapping[str, Any], report: TenantReport | None, settings: OperatorSettings
) -> dict[str, Any]:
    """The status fields the loop owns, for one Tenant, from its publisher's report."""
    status = body.get("status") or {}
    previous = list(status.get("conditions") or [])
    generation = int(body["metadata"].get("generation", 0))
    fresh = (
        report is not None
        and report.seen_seconds_ago is not None
        and report.seen_seconds_ago <= settings.publisher_report_max_age_seconds
    )
    if report is None:
        available = condition(
            PUBLISHER,
            ok=False,
            reason="NoReport",
            message="no publisher has reported for this tenant yet",
            generation=generation,
            previous=previous,
        )
    elif not fresh:
        available = condition(
            PUBLISHER,
            ok=False,
            reason="ReportStale",
            message=f"the last publisher report ({report.publisher}) is older than "
            f"{settings.publisher_report_max_age_seconds:g} s: no publisher is active",
            generation=generation,
            previous=previous,
        )
    else:
        available = condition(
            PUBLISHER,
            ok=True,
            reason="Reporting",
            message=f"publisher {report.publisher} is active",
            generation=generation,
            previous=previous,
        )
    fields: dict[str, Any] = {"conditions": merge(previous, [available])}
    if report is not None:
        shown = {
            "pending": report.pending,
            "circuit": report.circuit or "closed",
        }
        if report.oldest_pending_seconds is not None and report.pending:
            shown["oldestPendingSeconds"] = float(math.floor(report.oldest_pending_seconds))
        before = status.get("backlog") or {}
        if {k: v for k, v in before.items() if k != "updatedAt"} != shown:
            # removing_stale: an oldest age gone with the last pending event is removed.
            fields["backlog"] = removing_stale(before, {**shown, "updatedAt": now()})
    return fields


# Refused Tenants reconciled again by one tick, at most.
RETRIES_PER_TICK = 50


def _part(name: str, run: Callable[[], None], interval: float) -> None:
    """Run one part of a tick; a failure is logged, and the tick goes on."""
    try:
        run()
    except (client.ApiException, TransportError, SQLAlchemyError, OSError) as exc:
        log.warning("status loop: %s: %s; trying again in %g s", name, exc, interval)
    except Exception:
        log.exception("status loop: %s failed; trying again in %g s", name, interval)


def _publisher_moved(
    api: client.ApiClient, body: Mapping[str, Any], fields: Mapping[str, Any]
) -> None:
    """An Event and a log line when PublisherAvailable changes reason: a publisher
    started reporting, or stopped (not the first NoReport of a new Tenant)."""
    before = (body.get("status") or {}).get("conditions") or []
    if not any(c.get("type") == PUBLISHER for c in before):
        return
    for changed in transitions(before, fields.get("conditions") or []):
        if changed["type"] != PUBLISHER:
            continue
        meta = body["metadata"]
        ok = changed["status"] == "True"
        log.log(
            logging.INFO if ok else logging.WARNING,
            "Tenant %s/%s: %s: %s",
            meta["namespace"],
            meta["name"],
            changed["reason"],
            changed["message"],
        )
        post_event(api, body, warning=not ok, reason=changed["reason"], message=changed["message"])


def no_database_status(body: Mapping[str, Any]) -> dict[str, Any]:
    previous = list((body.get("status") or {}).get("conditions") or [])
    policy = (body.get("spec") or {}).get("deletionPolicy")
    cleanup = (
        f"; and deletionPolicy {policy} cannot run: deleting this Tenant will leave its "
        "events in the outbox"
        if policy in ("Drain", "Delete")
        else ""
    )
    unknown = condition(
        PUBLISHER,
        ok=None,
        reason="NoDatabaseAccess",
        message="the operator has no database access (SOMABRAIN_OPERATOR_DATABASE_URL), so "
        f"it cannot see the tenant's publisher or backlog{cleanup}",
        generation=int(body["metadata"].get("generation", 0)),
        previous=previous,
    )
    return {"conditions": merge(previous, [unknown])}


def _health(
    tenant: Mapping[str, Any], reports: Mapping[Any, TenantReport], max_age: float
) -> rollout.Health:
    tenant_id = str((tenant.get("spec") or {}).get("tenantId"))
    try:
        spec = TenantSpec.from_body(tenant.get("spec") or {})
        key = rollout.cohort_key(spec, str(tenant["metadata"]["namespace"]))
    except pydantic.ValidationError:
        key = tenant_id
    report = reports.get(tenant_id)
    if report is None or report.seen_seconds_ago is None or report.seen_seconds_ago > max_age:
        return rollout.Health(tenant_id=tenant_id, reported=False, key=key)
    return rollout.Health(
        tenant_id=tenant_id,
        key=key,
        reported=True,
        pending=report.pending,
        oldest_pending_seconds=report.oldest_pending_seconds,
        circuit=report.circuit,
    )


class Loop:
    def __init__(self, settings: OperatorSettings, peering: Peering | None = None) -> None:
        self.settings = settings
        self.peering = peering
        self.was_acting: bool | None = None
        self.engine: Engine | None = (
            make_engine(settings.database_url, pool_size=1) if settings.database_url else None
        )
        self.repair_cursor = 0
        self.repair_credit = 0.0
        # Per Tenant uid: its resourceVersion and report when a tick last found its
        # status right.
        self.unchanged: dict[str, tuple[Any, ...]] = {}
        self.thread = threading.Thread(target=self.run, name="somabrain-status", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def run(self) -> None:
        interval = self.settings.status_interval_seconds
        while not KNOWN.stop.wait(interval):
            try:
                api = KNOWN.api()
                if self.acting(api):
                    self.tick(api, interval)
            except (client.ApiException, TransportError, SQLAlchemyError, OSError) as exc:
                log.warning("status loop: %s; trying again in %g s", exc, interval)

    def acting(self, api: client.ApiClient) -> bool:
        """Whether this process may act now: always without peering; with it, while
        the peering object shows no live peer of the same or a higher priority."""
        if self.peering is None:
            return True
        peers = self.peering.read_peers(api)
        acting = self.peering.acting(peers, dt.datetime.now(dt.UTC))
        if acting != self.was_acting:
            log.info(
                "status loop %s (peering %s, priority %d)",
                "acting" if acting else "standing by: another peer acts, or Kopf has not joined",
                self.peering.name,
                self.peering.priority,
            )
            self.was_acting = acting
        return acting

    def tick(self, api: client.ApiClient, interval: float) -> None:
        # Backlog and publisher: also of Tenants being deleted (a drain is watched
        # through them); rollouts and repairs: only of the others.
        every = KNOWN.tenant_bodies()
        bodies = list(each(every))
        # Each part on its own: a database outage stops backlog and rollouts, not the
        # repairs and retries, which need only the API server.
        _part("statuses", lambda: self._statuses(api, every, bodies), interval)
        _part("repairs", lambda: self._repair_slice(api, bodies, interval), interval)
        _part("retries", lambda: self._retry(api), interval)
        _part("pools", lambda: self._check_pools(api), interval)

    def _statuses(
        self,
        api: client.ApiClient,
        every: list[Mapping[str, Any]],
        bodies: list[Mapping[str, Any]],
    ) -> None:
        """Backlog and publisher into each Tenant's status, policies' counts, rollouts."""
        reports: dict[Any, TenantReport] = {}
        if self.engine is not None:
            ids = [str((b.get("spec") or {}).get("tenantId")) for b in every]
            with Session(self.engine) as session:
                reports = tenant_reports(session, ids)
        # A Tenant whose copy and report are as they were at a tick that found its
        # status right is right still: it is skipped without computing anything.
        unchanged: dict[str, tuple[Any, ...]] = {}
        for body in every:
            if "observedGeneration" not in (body.get("status") or {}):
                # Not reconciled yet. Its reconcile writes `conditions` whole from the
                # copy it was handed, which would drop these; and a write now would hand
                # Kopf an event older than its own patch, which it may handle as a new
                # Tenant once its wait for that patch times out under load.
                continue
            meta = body["metadata"]
            tenant = (body.get("spec") or {}).get("tenantId")
            report = reports.get(tenant)
            seen = (meta.get("resourceVersion"), self._shown(report))
            uid = str(meta.get("uid"))
            if self.unchanged.get(uid) == seen:
                unchanged[uid] = seen
                continue
            fields = (
                backlog_status(body, report, self.settings)
                if self.engine is not None
                else no_database_status(body)
            )
            try:
                if write_status(api, body, fields):
                    STATUS_WRITES.labels("Tenant").inc()
                    _publisher_moved(api, body, fields)
                elif seen[0] is not None:
                    unchanged[uid] = seen
            except StaleCopy:
                pass  # changed since the index's copy: the next tick writes from the newer one
        self.unchanged = unchanged
        self._count_policies(api)
        if self.engine is not None:
            self._advance_rollouts(api, bodies, reports)

    def _retry(self, api: client.ApiClient) -> None:
        """Reconcile again the refused Tenants whose retry delay is over, the longest
        waiting first, at most RETRIES_PER_TICK (the rest stay due for the next tick,
        so that a fault shared by every Tenant does not stall the loop)."""
        for uid in KNOWN.retries.due(limit=RETRIES_PER_TICK):
            body = KNOWN.tenant(uid)
            if body is None or body["metadata"].get("deletionTimestamp"):
                KNOWN.retries.drop(uid)
                continue
            started = time.monotonic()
            try:
                with observe("Tenant", "retry"):
                    if reconcile_known(api, body) is None:
                        KNOWN.retries.drop(uid)
            except (client.ApiException, TransportError, OSError) as exc:
                # Its next try after the shortest delay; the others go on.
                KNOWN.retries.note(uid, Outcome({}, retry_after=10, error=str(exc)), now=started)
                log.warning("retry of Tenant %s failed: %s; again in 10 s", uid, exc)

    def _shown(self, report: TenantReport | None) -> tuple[Any, ...]:
        """What of a publisher's report `backlog_status` depends on: its age only
        through whether it is fresh."""
        if report is None:
            return ()
        age = report.seen_seconds_ago
        fresh = age is not None and age <= self.settings.publisher_report_max_age_seconds
        oldest = report.oldest_pending_seconds
        return (
            fresh,
            report.publisher,
            report.pending,
            report.circuit,
            None if oldest is None or not report.pending else math.floor(oldest),
        )

    def _check_pools(self, api: client.ApiClient) -> None:
        """Converge the pools whose children were last applied for other members than
        their plan serves now (a member deleted while a reconcile read it from the index),
        and reconcile the members whose Ready condition disagrees with the plan. Plans
        come from the index, without a request."""
        applied = pools.applied()
        for namespace, pool in sorted(set(KNOWN.pools()) | set(applied)):
            members = KNOWN.pool_members(namespace, pool)
            plan = pool_plan(pool, members, KNOWN.policy)
            served = tuple(m.uid for m in plan.served)
            key = (namespace, pool)
            if key in applied and applied[key] != served:
                with observe("Tenant", "pool"):
                    converged = any(reconcile_known(api, m) is not None for m in members)
                    if not converged:
                        pools.converge(api, namespace, plan, settings=self.settings)
            for body in misjudged_members(pool, list(each(members)), KNOWN.policy):
                with observe("Tenant", "pool"):
                    reconcile_known(api, body)

    def _count_policies(self, api: client.ApiClient) -> None:
        if KNOWN.policies is None:
            return
        custom = client.CustomObjectsApi(api)
        for (namespace, name), store in list(KNOWN.policies.items()):
            body = next(iter(store), None)
            if body is None:
                continue
            count = len(KNOWN.tenants_of_policy(namespace, name))
            if (body.get("status") or {}).get("tenants") == count:
                continue
            try:
                custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, namespace, POLICY_PLURAL, name, {"status": {"tenants": count}}
                )
                STATUS_WRITES.labels("OutboxPolicy").inc()
            except client.ApiException as exc:
                if exc.status != 404:
                    raise

    def _advance_rollouts(
        self,
        api: client.ApiClient,
        bodies: list[Mapping[str, Any]],
        reports: Mapping[Any, TenantReport],
    ) -> None:
        """Move each policy's rollouts on; reconcile its Tenants when a step changed."""
        if KNOWN.policies is None:
            return
        max_age = self.settings.publisher_report_max_age_seconds
        for (namespace, name), store in list(KNOWN.policies.items()):
            body = next(iter(store), None)
            if body is None or not (body.get("spec") or {}).get("rollouts"):
                continue
            try:
                spec = OutboxPolicySpec.from_body(body["spec"])
            except pydantic.ValidationError:
                continue
            tenants = KNOWN.tenants_of_policy(namespace, name)
            health = [_health(t, reports, max_age) for t in tenants]
            before = rollout.states_of(body.get("status"))
            after = {
                r.flag: rollout.advance(r, before.get(r.flag), health, dt.datetime.now(dt.UTC))
                for r in spec.rollouts or []
            }
            if after == before:
                continue
            states = [after[r.flag].to_body() for r in spec.rollouts or []]
            client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, POLICY_PLURAL, name, {"status": {"rollouts": states}}
            )
            STATUS_WRITES.labels("OutboxPolicy").inc()
            for flag, state in after.items():
                old = before.get(flag)
                if old is not None and (old.phase, old.step) == (state.phase, state.step):
                    continue
                log.info(
                    "OutboxPolicy %s/%s: rollout of %s %s at %d%%: %s",
                    namespace,
                    name,
                    flag,
                    state.phase,
                    state.percent,
                    state.reason,
                )
                post_event(
                    api,
                    body,
                    warning=state.phase in ("RolledBack", "Paused"),
                    reason=f"Rollout{state.phase}",
                    message=f"{flag} at {state.percent}%: {state.reason}",
                )
            # The index has not seen the new status yet: reconcile from a fresh read.
            fresh = get_own(api, POLICY_PLURAL, namespace, name)
            if fresh is not None:
                self._follow(api, fresh, tenants)

    def _follow(
        self, api: client.ApiClient, policy: Mapping[str, Any], tenants: list[Mapping[str, Any]]
    ) -> None:
        for tenant in each(tenants):
            with observe("Tenant", "rollout"):
                reconcile_known(api, tenant, policy_of=_with(policy))

    def _repair_slice(
        self, api: client.ApiClient, bodies: list[Mapping[str, Any]], interval: float
    ) -> None:
        if not bodies:
            self.repair_credit = 0.0
            return
        # N Tenants per repair period: N * interval / period per tick, which is a
        # fraction for a few Tenants; what is left over carries to the next tick.
        period = self.settings.repair_interval_seconds
        self.repair_credit = min(
            self.repair_credit + len(bodies) * interval / period, float(len(bodies))
        )
        share = math.floor(self.repair_credit + 1e-9)  # float sums fall just short
        if share == 0:
            return
        self.repair_credit -= share
        start = self.repair_cursor % len(bodies)
        for body in (bodies + bodies)[start : start + share]:
            with observe("Tenant", "repair"):
                reconcile_known(api, body)
        self.repair_cursor = start + share


def _with(policy: Mapping[str, Any]) -> PolicyLookup:
    """Policy lookup that returns `policy` as read just now (the index may not have its
    new status yet) and any other policy from the index."""
    meta = policy["metadata"]

    def lookup(namespace: str, name: str) -> Mapping[str, Any] | None:
        if (namespace, name) == (meta["namespace"], meta["name"]):
            return policy
        return KNOWN.policy(namespace, name)

    return lookup
