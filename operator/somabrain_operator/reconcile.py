"""The one level-based reconcile of a Tenant, whatever triggered it.

`reconcile_tenant` reads the Tenant and its OutboxPolicy as they are now, computes the
desired children (`children`), applies them, removes the optional ones no longer
wanted, and returns the status to write. It is used for create, update and resume of
a Tenant, for a change of its OutboxPolicy, for a child edited or deleted by hand, for
the PrometheusRule CRD appearing, and for the periodic repair; running it again on an
unchanged world changes nothing.

Conditions written here: `Ready` (the children are in place) and `AlertsConfigured`
(the PrometheusRule is, or why not). `PublisherAvailable` belongs to the status loop
(`backlog`), and is kept as it is.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import pydantic
from kubernetes import client

from somabrain_operator import children, rollout
from somabrain_operator.apply import ChildConflict, apply, claim, delete
from somabrain_operator.conditions import (
    ALERTS,
    READY,
    condition,
    merge,
    post_event,
    transitions,
)
from somabrain_operator.config import OperatorSettings
from somabrain_operator.resources import OutboxPolicySpec, TenantSpec, resolve
from somabrain_operator.resources.tenant import ResolvedTenant

log = logging.getLogger(__name__)

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(uid: str) -> threading.Lock:
    """One reconcile of a Tenant at a time (several triggers may fire together)."""
    with _locks_guard:
        return _locks.setdefault(uid, threading.Lock())


def forget(uid: str) -> None:
    with _locks_guard:
        _locks.pop(uid, None)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """The status to write, and when to try again (None: nothing to retry)."""

    status: dict[str, Any]
    retry_after: float | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class _Alerts:
    ok: bool
    reason: str
    message: str


PolicyLookup = Callable[[str, str], Mapping[str, Any] | None]


def reconcile_tenant(
    api: client.ApiClient,
    body: Mapping[str, Any],
    *,
    policy_of: PolicyLookup,
    settings: OperatorSettings,
) -> Outcome:
    """Converge the children of the Tenant `body`; `policy_of(namespace, name)` is the
    OutboxPolicy body, or None when it does not exist."""
    meta = body["metadata"]
    with _lock(str(meta["uid"])):
        outcome = _reconcile(api, body, policy_of=policy_of, settings=settings)
    previous = (body.get("status") or {}).get("conditions") or []
    for changed in transitions(previous, outcome.status.get("conditions", [])):
        post_event(
            api,
            body,
            warning=changed["status"] != "True",
            reason=changed["reason"],
            message=changed["message"],
        )
    return outcome


def _reconcile(
    api: client.ApiClient,
    body: Mapping[str, Any],
    *,
    policy_of: PolicyLookup,
    settings: OperatorSettings,
) -> Outcome:
    meta = body["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], str(meta["uid"])
    generation = int(meta.get("generation", 0))
    old = body.get("status") or {}
    previous = list(old.get("conditions") or [])

    def status(*updates: dict[str, Any], **fields: Any) -> dict[str, Any]:
        return {
            **fields,
            "observedGeneration": generation,
            "conditions": merge(previous, updates),
        }

    def not_ready(reason: str, message: str, *, retry: float | None = None) -> Outcome:
        cond = condition(
            READY,
            ok=False,
            reason=reason,
            message=message,
            generation=generation,
            previous=previous,
        )
        return Outcome(status(cond), retry_after=retry, error=message)

    try:
        spec = TenantSpec.from_body(body.get("spec") or {})
    except pydantic.ValidationError as exc:
        return not_ready("InvalidSpec", str(exc).replace("\n", "; "))

    policy: OutboxPolicySpec | None = None
    policy_body: Mapping[str, Any] | None = None
    if spec.policy_ref is not None:
        policy_body = policy_of(namespace, spec.policy_ref.name)
        if policy_body is None:
            # Children keep what the policy last gave them: defaults applied over a
            # policy that is only late (GitOps ordering) would restart publishers twice.
            return not_ready(
                "PolicyNotFound",
                f"OutboxPolicy {namespace}/{spec.policy_ref.name} does not exist; create it "
                "or change spec.policyRef (children are left as they are until then)",
            )
        try:
            policy = OutboxPolicySpec.from_body(policy_body.get("spec") or {})
        except pydantic.ValidationError as exc:
            return not_ready(
                "InvalidPolicy",
                f"OutboxPolicy {namespace}/{spec.policy_ref.name} is invalid: "
                + str(exc).replace("\n", "; "),
            )

    rollout_flags: dict[str, bool] = {}
    if policy is not None and policy_body is not None:
        states = rollout.states_of(policy_body.get("status"))
        rollout_flags = rollout.flags_for(policy.rollouts or [], states, spec.tenant_id)
    resolved = resolve(spec, policy, rollout_flags=rollout_flags)
    fields: dict[str, Any] = {
        "publisherMode": resolved.publisher_mode,
        "resolved": resolved.to_body(),
    }
    if resolved.publisher_mode != "dedicated":
        message = (
            f"publisher mode {resolved.publisher_mode} is not reconciled by this operator "
            "version; set spec.publisher.mode to dedicated, or run the pool's publisher yourself"
        )
        cond = condition(
            READY,
            ok=False,
            reason="PublisherModeUnsupported",
            message=message,
            generation=generation,
            previous=previous,
        )
        return Outcome(status(cond, **fields), error=message)

    try:
        applied, alerts = _apply_children(
            api, spec, resolved, namespace=namespace, name=name, uid=uid, settings=settings
        )
    except ChildConflict as exc:
        if exc.holder is not None and exc.holder.kind == "Tenant":
            return not_ready(
                "TenantIdConflict",
                f"tenant id {spec.tenant_id} is already served by another Tenant in "
                f"{namespace} ({exc}); give this Tenant another tenantId or delete one of "
                "the two",
                retry=60,
            )
        return not_ready(
            "ChildNameTaken",
            f"{exc}, and the operator takes over no object it does not control: delete or "
            "rename that object, or give this Tenant another tenantId (no child is applied "
            "until then)",
            retry=60,
        )
    except client.ApiException as exc:
        return not_ready(
            "ApplyFailed",
            f"applying the children failed ({exc.status} {exc.reason}); will retry in 10 s",
            retry=10,
        )

    alerts_cond = condition(
        ALERTS,
        ok=alerts.ok,
        reason=alerts.reason,
        message=alerts.message,
        generation=generation,
        previous=previous,
    )
    ready = condition(
        READY,
        ok=True,
        reason="ChildrenApplied",
        message=f"publisher Deployment {applied['deployment']} and its settings are applied",
        generation=generation,
        previous=previous,
    )
    log.info(
        "tenant %s: children applied (%s), generation %d",
        spec.tenant_id,
        ", ".join(f"{k} {v}" for k, v in sorted(applied.items())),
        generation,
    )
    return Outcome(status(ready, alerts_cond, children=applied, **fields))


def _apply_children(
    api: client.ApiClient,
    spec: TenantSpec,
    resolved: ResolvedTenant,
    *,
    namespace: str,
    name: str,
    uid: str,
    settings: OperatorSettings,
) -> tuple[dict[str, str], _Alerts]:
    """Apply every child; return their names and what AlertsConfigured says."""
    owner = children.owner_reference(name=name, uid=uid)
    config = children.config_map(
        spec, resolved, namespace=namespace, owner=owner, settings=settings
    )
    deployment = children.deployment(
        spec, resolved, namespace=namespace, owner=owner, settings=settings, config=config
    )
    service = children.service(spec, namespace=namespace, owner=owner, settings=settings)
    quota = children.resource_quota(spec, namespace=namespace, owner=owner)
    rule = children.prometheus_rule(
        spec, resolved, namespace=namespace, owner=owner, settings=settings
    )
    # One field manager applies every Tenant's children, and applying merges into an
    # existing object, so it cannot tell two Tenants with one tenant id apart, nor
    # someone else's object of the same name: the live objects' controllers do.
    claim(
        api,
        [deployment, config, service, *([quota] if quota else []), rule],
        controller=uid,
    )
    for child in (deployment, config, service):
        apply(api, child, controller=uid)
    applied = {
        "deployment": deployment["metadata"]["name"],
        "configMap": config["metadata"]["name"],
        "service": service["metadata"]["name"],
    }

    quota_name = f"somabrain-tenant-{spec.tenant_id}"
    if quota is not None:
        apply(api, quota, controller=uid)
        applied["resourceQuota"] = quota_name
    else:
        delete(api, "ResourceQuota", name=quota_name, namespace=namespace, controller=uid)

    try:
        apply(api, rule, controller=uid)
    except client.ApiException as exc:
        if exc.status != 404:
            raise
        # No PrometheusRule kind on this cluster (case K-11): everything else works;
        # the CRD's arrival triggers a new reconcile.
        return applied, _Alerts(
            ok=False,
            reason="PrometheusRuleCRDMissing",
            message="the PrometheusRule kind (monitoring.coreos.com/v1) is not installed; "
            "install the Prometheus Operator's CRDs to get this tenant's alerts, or use "
            "deploy/prometheus/somabrain-rules.yaml",
        )
    applied["prometheusRule"] = rule["metadata"]["name"]
    return applied, _Alerts(
        ok=True,
        reason="RulesApplied",
        message=f"PrometheusRule {rule['metadata']['name']} holds the tenant's alerts",
    )
