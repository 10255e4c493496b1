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

from somabrain_operator import children, pools, rollout
from somabrain_operator.apply import (
    ChildConflict,
    Controller,
    Lives,
    apply,
    claim,
    controller_of,
    delete,
    has_labels,
    read,
)
from somabrain_operator.conditions import (
    ALERTS,
    READY,
    condition,
    merge,
    post_event,
    ready_reason,
    transitions,
)
from somabrain_operator.config import GROUP, TENANT_PLURAL, OperatorSettings
from somabrain_operator.kubeapi import get_own
from somabrain_operator.metrics import REFUSALS, mark_refused
from somabrain_operator.resources import OutboxPolicySpec, TenantSpec, conflicts, resolve
from somabrain_operator.resources.tenant import ResolvedTenant

log = logging.getLogger(__name__)

_locks: dict[str, threading.Lock] = {}
# The reason of the last Event posted per Tenant uid and condition type.
_last_posted: dict[tuple[str, str], str] = {}
_locks_guard = threading.Lock()


def _lock(uid: str) -> threading.Lock:
    """One reconcile of a Tenant at a time (several triggers may fire together)."""
    with _locks_guard:
        return _locks.setdefault(uid, threading.Lock())


def forget(uid: str) -> None:
    with _locks_guard:
        _locks.pop(uid, None)
        for key in [k for k in _last_posted if k[0] == uid]:
            del _last_posted[key]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """The status to write, and when to try again (None: nothing to retry)."""

    status: dict[str, Any]
    retry_after: float | None = None
    error: str | None = None
    # Other Tenants whose status this reconcile made stale (members of a shared pool
    # whose verdict changed): reconcile them too.
    others: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class _Alerts:
    ok: bool
    reason: str
    message: str


PolicyLookup = Callable[[str, str], Mapping[str, Any] | None]
# The Tenant bodies naming a shared pool, by namespace and pool.
MemberLookup = Callable[[str, str], list[Mapping[str, Any]]]


# Every Tenant with a tenant id, in any namespace.
HolderLookup = Callable[[str], list[Mapping[str, Any]]]


def _no_members(namespace: str, pool: str) -> list[Mapping[str, Any]]:
    return []


def _no_holders(tenant_id: str) -> list[Mapping[str, Any]]:
    return []


def first_holder(bodies: list[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """Of the Tenants sharing one tenant id, the one that has it: the oldest (then by
    namespace and name). Tenant ids are global in the outbox, whatever the namespace."""
    if not bodies:
        return None
    return min(
        bodies,
        key=lambda b: (
            str(b["metadata"].get("creationTimestamp") or ""),
            str(b["metadata"].get("namespace")),
            str(b["metadata"].get("name")),
        ),
    )


def _log_refusal(meta: Mapping[str, Any], outcome: Outcome, *, again: bool) -> None:
    """A refused reconcile at WARNING when Ready just changed, at DEBUG when it says
    again what the Tenant's status already shows."""
    reason = ready_reason({"status": outcome.status}) or "Unknown"
    REFUSALS.labels(reason).inc()
    mark_refused()
    log.log(
        logging.DEBUG if again else logging.WARNING,
        "Tenant %s/%s refused: %s: %s%s",
        meta["namespace"],
        meta["name"],
        reason,
        outcome.error,
        f" (tried again in {outcome.retry_after:g} s)" if outcome.retry_after else "",
    )


def reconcile_tenant(
    api: client.ApiClient,
    body: Mapping[str, Any],
    *,
    policy_of: PolicyLookup,
    settings: OperatorSettings,
    members_of: MemberLookup = _no_members,
    holders_of: HolderLookup = _no_holders,
) -> Outcome:
    """Converge the children of the Tenant `body`; `policy_of(namespace, name)` is the
    OutboxPolicy body, or None when it does not exist; `members_of(namespace, pool)`
    the Tenants naming a shared pool; `holders_of(tenant_id)` every Tenant with that
    tenant id."""
    meta = body["metadata"]
    with _lock(str(meta["uid"])):
        outcome = _reconcile(
            api,
            body,
            policy_of=policy_of,
            settings=settings,
            members_of=members_of,
            holders_of=holders_of,
        )
    previous = (body.get("status") or {}).get("conditions") or []
    moved = transitions(previous, outcome.status.get("conditions", []))
    if outcome.error is not None:
        _log_refusal(meta, outcome, again=not any(c["type"] == READY for c in moved))
    for changed in moved:
        # Reconciles of one Tenant racing from copies that have not seen each other's
        # status find the same transition: one Event for it.
        key = (str(meta["uid"]), str(changed["type"]))
        with _locks_guard:
            if _last_posted.get(key) == changed["reason"]:
                continue
            _last_posted[key] = str(changed["reason"])
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
    members_of: MemberLookup,
    holders_of: HolderLookup,
) -> Outcome:
    meta = body["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], str(meta["uid"])
    generation = int(meta.get("generation", 0))
    old = body.get("status") or {}
    previous = list(old.get("conditions") or [])

    def status(*updates: dict[str, Any], **fields: Any) -> dict[str, Any]:
        return {
            **{name: removing_stale(old.get(name), value) for name, value in fields.items()},
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

    found = _resolve(body, policy_of)
    if isinstance(found, _Unresolved):
        return not_ready(found.reason, found.message)
    spec, resolved = found.spec, found.resolved
    others_with_id = [b for b in holders_of(spec.tenant_id) if str(b["metadata"]["uid"]) != uid]
    holder = first_holder([*others_with_id, body])
    if holder is not None and str(holder["metadata"]["uid"]) != uid:
        hm = holder["metadata"]
        return not_ready(
            "TenantIdConflict",
            f"tenant id {spec.tenant_id} is already used by Tenant {hm['namespace']}/"
            f"{hm['name']} (tenant ids are global in the outbox, whatever the namespace); "
            "give this Tenant another tenantId or delete one of the two (nothing is applied "
            "for this one until then)",
            retry=60,
        )
    fields: dict[str, Any] = {
        "publisherMode": resolved.publisher_mode,
        "resolved": resolved.to_body(),
    }
    owner = children.owner_reference(name=name, uid=uid)
    quota, rule = _own_children(spec, resolved, namespace=namespace, owner=owner, settings=settings)
    own = [*([quota] if quota else []), rule]
    others: set[str] = set()
    try:
        # Leaving a pool (another pool, or dedicated now): the old one goes on without it.
        old_pool = (old.get("resolved") or {}).get("pool")
        if old_pool and old_pool != resolved.pool:
            _, stale = _converge_pool(
                api, namespace, old_pool, body, members_of, policy_of, settings, including=False
            )
            others |= stale
        if resolved.publisher_mode == "shared":
            assert resolved.pool is not None  # the schema requires a pool in shared mode
            lives = claim(api, own, controller=uid, gone=_gone(api, namespace))
            _remove_dedicated(api, spec, namespace=namespace, uid=uid)
            chosen, stale = _converge_pool(
                api, namespace, resolved.pool, body, members_of, policy_of, settings
            )
            others |= stale
            verdict = chosen.verdicts[uid]
            applied = (
                {
                    kind: children.pool_publisher_name(resolved.pool)
                    for kind in ("deployment", "configMap", "service")
                }
                if verdict.served
                else {}
            )
        else:
            applied, lives = _apply_dedicated(
                api,
                spec,
                resolved,
                namespace=namespace,
                uid=uid,
                owner=owner,
                settings=settings,
                also_claim=own,
            )
            verdict = pools.Verdict(
                "ChildrenApplied",
                f"publisher Deployment {applied['deployment']} and its settings are applied",
            )
        extra, alerts = _apply_own(
            api, spec, quota, rule, namespace=namespace, uid=uid, lives=lives
        )
    except ChildConflict as exc:
        if resolved.pool and exc.name == children.pool_publisher_name(resolved.pool):
            return not_ready(
                "PoolNameConflict",
                f"pool {resolved.pool}'s publisher cannot be applied: {exc}; choose another "
                "pool name or remove that object",
                retry=60,
            )
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
    applied.update(extra)

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
        ok=verdict.reason in (pools.SERVED, "ChildrenApplied"),
        reason=verdict.reason,
        message=verdict.message,
        generation=generation,
        previous=previous,
    )
    ok = verdict.reason in (pools.SERVED, "ChildrenApplied")
    log.log(
        logging.INFO if ok else logging.WARNING,
        "Tenant %s/%s (tenant %s): %s: %s (%s), generation %d",
        namespace,
        name,
        spec.tenant_id,
        verdict.reason,
        verdict.message,
        ", ".join(f"{k} {v}" for k, v in sorted(applied.items())) or "no publisher",
        generation,
    )
    others.discard(uid)
    return Outcome(
        status(ready, alerts_cond, children=applied, **fields), others=tuple(sorted(others))
    )


def removing_stale(old: Any, new: Any) -> Any:
    """`new` with None for every key of `old` it no longer has, at any depth: a merge
    patch keeps the keys it does not name (a flag the policy no longer sets, a child no
    longer made), and a null is how it removes one."""
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return new
    out = {key: removing_stale(old.get(key), value) for key, value in new.items()}
    out.update({key: None for key in old if key not in new})
    return out


@dataclasses.dataclass(frozen=True)
class _Resolved:
    spec: TenantSpec
    resolved: ResolvedTenant


@dataclasses.dataclass(frozen=True)
class _Unresolved:
    reason: str
    message: str


def _resolve(body: Mapping[str, Any], policy_of: PolicyLookup) -> _Resolved | _Unresolved:
    """What is in effect for the Tenant `body`, or why that cannot be known."""
    namespace = body["metadata"]["namespace"]
    try:
        spec = TenantSpec.from_body(body.get("spec") or {})
    except pydantic.ValidationError as exc:
        return _Unresolved("InvalidSpec", str(exc).replace("\n", "; "))

    policy: OutboxPolicySpec | None = None
    policy_body: Mapping[str, Any] | None = None
    if spec.policy_ref is not None:
        policy_body = policy_of(namespace, spec.policy_ref.name)
        if policy_body is None:
            # Children keep what the policy last gave them: defaults applied over a
            # policy that is only late (GitOps ordering) would restart publishers twice.
            return _Unresolved(
                "PolicyNotFound",
                f"OutboxPolicy {namespace}/{spec.policy_ref.name} does not exist; create it "
                "or change spec.policyRef (children are left as they are until then)",
            )
        try:
            policy = OutboxPolicySpec.from_body(policy_body.get("spec") or {})
        except pydantic.ValidationError as exc:
            return _Unresolved(
                "InvalidPolicy",
                f"OutboxPolicy {namespace}/{spec.policy_ref.name} is invalid: "
                + str(exc).replace("\n", "; "),
            )

    # Rules the schema checks within one object, broken by the merge of the Tenant, its
    # policy and the defaults: applying would hand the publisher what it refuses.
    broken = conflicts(spec, policy)
    if broken:
        return _Unresolved(
            "ConflictingSettings",
            "the settings in effect (this Tenant over "
            + (f"OutboxPolicy {spec.policy_ref.name} over " if spec.policy_ref else "")
            + "the defaults) break "
            + ("a rule" if len(broken) == 1 else f"{len(broken)} rules")
            + ": "
            + "; ".join(broken)
            + " (children are left as they are until then)",
        )
    rollout_flags: dict[str, bool] = {}
    if policy is not None and policy_body is not None:
        states = rollout.states_of(policy_body.get("status"))
        rollout_flags = rollout.flags_for(
            policy.rollouts or [], states, rollout.cohort_key(spec, namespace)
        )
    try:
        resolved = resolve(spec, policy, rollout_flags=rollout_flags)
    except pydantic.ValidationError as exc:
        # A bound of the settings in effect that the schema does not check: a bug of the
        # schema, reported on the Tenant rather than raised on every visit.
        return _Unresolved(
            "InvalidSettings",
            "the settings in effect are invalid: "
            + str(exc).replace("\n", "; ")
            + " (children are left as they are until then)",
        )
    return _Resolved(spec, resolved)


def _candidate(body: Mapping[str, Any], policy_of: PolicyLookup) -> pools.Candidate | None:
    """A pool member as the pool sees it: resolved now, or as its last reconcile left it
    when it cannot be resolved now (a policy missing for a moment must not restart the
    pool without it); None when it was never resolved."""
    meta = body["metadata"]
    found = _resolve(body, policy_of)
    if isinstance(found, _Resolved):
        tenant_id, resolved = str(found.spec.tenant_id), found.resolved
    else:
        last = (body.get("status") or {}).get("resolved")
        tenant_id = str((body.get("spec") or {}).get("tenantId") or "")
        if not last or not tenant_id:
            return None
        try:
            resolved = ResolvedTenant.from_body(last)
        except pydantic.ValidationError:
            return None
    member = children.PoolMember(
        name=str(meta["name"]), uid=str(meta["uid"]), tenant_id=tenant_id, resolved=resolved
    )
    return pools.Candidate(
        member=member,
        created=str(meta.get("creationTimestamp") or ""),
        deleting=bool(meta.get("deletionTimestamp")),
    )


def _converge_pool(
    api: client.ApiClient,
    namespace: str,
    pool: str,
    body: Mapping[str, Any],
    members_of: MemberLookup,
    policy_of: PolicyLookup,
    settings: OperatorSettings,
    *,
    including: bool = True,
) -> tuple[pools.Plan, set[str]]:
    """Converge pool `pool` from its members, `body` (the freshest copy of the Tenant
    being reconciled) in or out of it; return the other members whose Ready reason no
    longer matches what the pool does for them."""
    uid = str(body["metadata"]["uid"])
    bodies = [b for b in members_of(namespace, pool) if str(b["metadata"]["uid"]) != uid]
    if including:
        bodies.append(body)
    candidates = [c for b in bodies if (c := _candidate(b, policy_of)) is not None]
    chosen = pools.plan(pool, candidates)
    live = read(api, "Deployment", name=children.pool_publisher_name(pool), namespace=namespace)
    if live is not None and not has_labels(live, children.pool_labels(pool)):
        raise ChildConflict("Deployment", children.pool_publisher_name(pool), controller_of(live))
    pools.converge(api, namespace, chosen, settings=settings)
    stale = {
        str(b["metadata"]["uid"])
        for b in _misjudged(bodies, chosen.verdicts)
        if str(b["metadata"]["uid"]) != uid
    }
    return chosen, stale


# Ready reasons that only a pool's plan gives.
POOL_REASONS = frozenset({pools.SERVED, "PoolSettingsConflict", "TenantIdConflict", "Deleting"})


def pool_plan(pool: str, bodies: list[Mapping[str, Any]], policy_of: PolicyLookup) -> pools.Plan:
    """The plan of `pool` for the Tenant bodies naming it. Pure."""
    return pools.plan(pool, [c for b in bodies if (c := _candidate(b, policy_of)) is not None])


def misjudged_members(
    pool: str, bodies: list[Mapping[str, Any]], policy_of: PolicyLookup
) -> list[Mapping[str, Any]]:
    """Members of `pool` whose Ready condition disagrees with what the pool's plan does
    for them now (a status write that lost a race, a member that left while the operator
    was down). Pure: reads only the bodies given."""
    return _misjudged(bodies, pool_plan(pool, bodies, policy_of).verdicts)


def _misjudged(
    bodies: list[Mapping[str, Any]], verdicts: Mapping[str, pools.Verdict]
) -> list[Mapping[str, Any]]:
    """Of `bodies`, those whose Ready reason is a pool's (or none) and not the one
    `verdicts` gives them."""
    wrong = []
    for body in bodies:
        verdict = verdicts.get(str(body["metadata"]["uid"]))
        reason = ready_reason(body)
        if verdict is None or reason == verdict.reason:
            continue
        if reason is None or reason in POOL_REASONS:
            wrong.append(body)
    return wrong


def _own_children(
    spec: TenantSpec,
    resolved: ResolvedTenant,
    *,
    namespace: str,
    owner: dict[str, Any],
    settings: OperatorSettings,
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The ResourceQuota (None when the Tenant asks for none) and the PrometheusRule
    every Tenant has of its own, whatever its mode. Pure."""
    quota = children.resource_quota(spec, namespace=namespace, owner=owner)
    rule = children.prometheus_rule(
        spec, resolved, namespace=namespace, owner=owner, settings=settings
    )
    return quota, rule


def _dedicated_children(
    spec: TenantSpec,
    resolved: ResolvedTenant,
    *,
    namespace: str,
    owner: dict[str, Any],
    settings: OperatorSettings,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The dedicated publisher's Deployment, ConfigMap and Service. Pure."""
    config = children.config_map(
        spec, resolved, namespace=namespace, owner=owner, settings=settings
    )
    deployment = children.deployment(
        spec, resolved, namespace=namespace, owner=owner, settings=settings, config=config
    )
    service = children.service(spec, namespace=namespace, owner=owner, settings=settings)
    return deployment, config, service


def wanted_children(
    body: Mapping[str, Any],
    *,
    policy_of: PolicyLookup,
    settings: OperatorSettings,
    members_of: MemberLookup = _no_members,
) -> list[dict[str, Any]]:
    """Every child the Tenant `body` wants as a reconcile would apply it now: its
    dedicated publisher's Deployment, ConfigMap and Service, or its pool's (as the
    pool's plan has them), its ResourceQuota and PrometheusRule. Empty when its spec
    cannot be resolved. Pure: reads only what the lookups give."""
    found = _resolve(body, policy_of)
    if isinstance(found, _Unresolved):
        return []
    spec, resolved = found.spec, found.resolved
    meta = body["metadata"]
    namespace = str(meta["namespace"])
    owner = children.owner_reference(name=str(meta["name"]), uid=str(meta["uid"]))
    quota, rule = _own_children(spec, resolved, namespace=namespace, owner=owner, settings=settings)
    own = [*([quota] if quota else []), rule]
    if resolved.publisher_mode == "shared" and resolved.pool:
        members = members_of(namespace, resolved.pool)
        plan = pool_plan(resolved.pool, members, policy_of)
        return [*pools.wanted(plan, namespace=namespace, settings=settings), *own]
    dedicated = _dedicated_children(
        spec, resolved, namespace=namespace, owner=owner, settings=settings
    )
    return [*dedicated, *own]


def _gone(api: client.ApiClient, namespace: str) -> Callable[[Controller], bool]:
    """Whether a child's controller is a Tenant that no longer exists: deleted with
    deletionPolicy Retain, or deleted and applied again (a new uid), its children left
    for the garbage collector. A Tenant still being deleted (a Drain in progress) is
    not gone."""

    def gone(holder: Controller) -> bool:
        # A Tenant of this operator's group only (another project may have a kind of
        # that name).
        if holder.kind != "Tenant" or not holder.api_version.startswith(f"{GROUP}/"):
            return False
        live = get_own(api, TENANT_PLURAL, namespace, holder.name)
        return live is None or str(live["metadata"]["uid"]) != holder.uid

    return gone


def _remove_dedicated(api: client.ApiClient, spec: TenantSpec, *, namespace: str, uid: str) -> None:
    """The dedicated children of a Tenant that moved to a pool."""
    for kind in ("Deployment", "ConfigMap", "Service"):
        delete(
            api, kind, name=children.publisher_name(spec.tenant_id), namespace=namespace,
            controller=uid,
        )  # fmt: skip


def _apply_dedicated(
    api: client.ApiClient,
    spec: TenantSpec,
    resolved: ResolvedTenant,
    *,
    namespace: str,
    uid: str,
    owner: dict[str, Any],
    settings: OperatorSettings,
    also_claim: list[dict[str, Any]],
) -> tuple[dict[str, str], Lives]:
    """The dedicated publisher's Deployment, ConfigMap and Service; their names, and
    the live objects read. Nothing is applied unless every one of them and of
    `also_claim` is free or this Tenant's."""
    deployment, config, service = _dedicated_children(
        spec, resolved, namespace=namespace, owner=owner, settings=settings
    )
    # One field manager applies every Tenant's children, and applying merges into an
    # existing object, so it cannot tell two Tenants with one tenant id apart, nor
    # someone else's object of the same name: the live objects' controllers do.
    lives = claim(
        api,
        [deployment, config, service, *also_claim],
        controller=uid,
        gone=_gone(api, namespace),
    )
    for child in (deployment, config, service):
        apply(api, child, controller=uid, lives=lives)
    names = {
        "deployment": deployment["metadata"]["name"],
        "configMap": config["metadata"]["name"],
        "service": service["metadata"]["name"],
    }
    return names, lives


def _apply_own(
    api: client.ApiClient,
    spec: TenantSpec,
    quota: dict[str, Any] | None,
    rule: dict[str, Any],
    *,
    namespace: str,
    uid: str,
    lives: Lives,
) -> tuple[dict[str, str], _Alerts]:
    """The children every Tenant has of its own, whatever its mode (ResourceQuota,
    PrometheusRule); their names and what AlertsConfigured says."""
    applied: dict[str, str] = {}
    quota_name = f"somabrain-tenant-{spec.tenant_id}"
    if quota is not None:
        apply(api, quota, controller=uid, lives=lives)
        applied["resourceQuota"] = quota_name
    else:
        delete(api, "ResourceQuota", name=quota_name, namespace=namespace, controller=uid)

    try:
        apply(api, rule, controller=uid, lives=lives)
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
