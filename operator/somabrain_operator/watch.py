"""Repairs triggered by the world changing under the operator.

- A child edited or deleted by someone else: its owning Tenant (for a pool's child,
  one of the members) is reconciled, which restores it. Changes the operator made
  itself are recognised by the resourceVersion its apply returned, so they trigger
  nothing.
- The PrometheusRule CRD appearing (case K-11): every Tenant still waiting for it is
  reconciled and gets its rules.

These are event handlers: Kopf stores nothing on the objects they watch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from somabrain_operator.apply import in_place, is_own_delete, is_own_write, stamped
from somabrain_operator.children import LABEL_MANAGED_BY, MANAGED_BY
from somabrain_operator.conditions import ALERTS
from somabrain_operator.config import RULE_CRD, RULE_GROUP, RULE_PLURAL, RULE_VERSION
from somabrain_operator.metrics import observe
from somabrain_operator.reconcile import wanted_children
from somabrain_operator.state import KNOWN, each, reconcile_known

log = logging.getLogger(__name__)

OURS = {LABEL_MANAGED_BY: MANAGED_BY}


def _repair(kind: str, change: str | None, body: kopf.Body) -> None:
    if change not in ("MODIFIED", "DELETED"):
        return
    if change == "MODIFIED" and is_own_write(body):
        return
    if change == "DELETED" and is_own_delete(body):
        return
    # A Tenant's own child has it as controller; a pool's has every member as owner,
    # and any of them restores it.
    tenant = next(
        (
            t
            for ref in body["metadata"].get("ownerReferences") or []
            if (t := KNOWN.tenant(str(ref.get("uid")))) is not None
            and not t["metadata"].get("deletionTimestamp")
        ),
        None,
    )
    if tenant is None:
        return
    if change == "MODIFIED" and _as_wanted(body, tenant):
        # The operator's own apply, seen before that apply returned; or a change to
        # what the operator does not set (a Deployment's status, another's label).
        return
    meta = body["metadata"]
    log.warning(
        "%s %s/%s was %s by someone else; restoring it from Tenant %s",
        kind,
        meta.get("namespace"),
        meta.get("name"),
        "deleted" if change == "DELETED" else "changed",
        tenant["metadata"]["name"],
    )
    api = KNOWN.api()
    with observe("Tenant", "child"):
        reconcile_known(api, tenant)


def _as_wanted(body: kopf.Body, tenant: Mapping[str, Any]) -> bool:
    """Whether a child is as the Tenant wants it now, computed from the index alone (or
    the Tenant wants nothing it could apply now)."""
    key = (body.get("kind"), body["metadata"].get("namespace"), body["metadata"].get("name"))
    every = wanted_children(
        tenant, policy_of=KNOWN.policy, settings=KNOWN.settings, members_of=KNOWN.pool_members
    )
    if not every:
        # The Tenant cannot be resolved now (its policy missing, settings in conflict):
        # a reconcile would only refuse again; its children stay as they are.
        return True
    for wanted in every:
        meta = wanted["metadata"]
        if (wanted["kind"], meta["namespace"], meta["name"]) == key:
            return in_place(stamped(wanted), dict(body))
    return False


async def _on_child_event(kind: str, change: str | None, body: kopf.Body) -> None:
    """Most events on children are the operator's own applies: those are recognised
    here, on Kopf's event loop, and so are creations, so that their bodies are let go
    at once instead of each waiting for a handler thread only to be dropped there. The
    rest go to a handler thread, which looks again (the apply that caused an event may
    not have returned when it arrived) and repairs."""
    if change == "MODIFIED" and is_own_write(body):
        return
    if change not in ("MODIFIED", "DELETED"):
        return
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(KNOWN.executor, _repair, kind, change, body)


@kopf.on.event("apps", "v1", "deployments", labels=OURS)
async def deployment_changed(body: kopf.Body, **kwargs: Any) -> None:
    await _on_child_event("Deployment", kwargs["type"], body)


@kopf.on.event("", "v1", "configmaps", labels=OURS)
async def config_map_changed(body: kopf.Body, **kwargs: Any) -> None:
    await _on_child_event("ConfigMap", kwargs["type"], body)


@kopf.on.event("", "v1", "services", labels=OURS)
async def service_changed(body: kopf.Body, **kwargs: Any) -> None:
    await _on_child_event("Service", kwargs["type"], body)


@kopf.on.event("", "v1", "resourcequotas", labels=OURS)
async def resource_quota_changed(body: kopf.Body, **kwargs: Any) -> None:
    await _on_child_event("ResourceQuota", kwargs["type"], body)


@kopf.on.event(RULE_GROUP, RULE_VERSION, RULE_PLURAL, labels=OURS)
async def rule_changed(body: kopf.Body, **kwargs: Any) -> None:
    await _on_child_event("PrometheusRule", kwargs["type"], body)


def _established(body: kopf.Body) -> bool:
    conditions = (body.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)


@kopf.on.event(
    "apiextensions.k8s.io",
    "v1",
    "customresourcedefinitions",
    when=lambda name, **_: name == RULE_CRD,
)
def rule_crd_changed(body: kopf.Body, **kwargs: Any) -> None:
    if kwargs["type"] == "DELETED" or not _established(body):
        return
    # Every Tenant without its rules: those that found the CRD missing, and those whose
    # status the index has not caught up with yet (a Tenant reconciled just before the
    # CRD came, while the operator is busy, may still show no conditions here).
    waiting = [
        t
        for t in each(KNOWN.tenant_bodies())
        if not any(
            c.get("type") == ALERTS and c.get("status") == "True"
            for c in (t.get("status") or {}).get("conditions") or []
        )
    ]
    if waiting:
        log.info(
            "the PrometheusRule CRD is installed; applying the rules of %d Tenants", len(waiting)
        )
    api = KNOWN.api()
    for tenant in waiting:
        with observe("Tenant", "crd"):
            reconcile_known(api, tenant)
