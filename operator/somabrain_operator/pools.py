"""Shared publisher pools: which Tenants a pool's publisher serves, and its children.

A pool is named by its members (`spec.publisher: {mode: shared, pool: NAME}`) and lives
in their namespace; it has no resource of its own. Every member's reconcile converges
the whole pool from the members it finds in the index, so the pool's Deployment,
ConfigMap and Service come out the same whichever member triggered it.

Who is served (`plan`): members in order of creation (then name). The first settles the
settings a publisher applies to all its tenants (`children.start_settings`: delivery
mode, retries, retention); a later member that differs is refused with
`PoolSettingsConflict`, naming the differing settings, and stays unserved rather than
being published with settings it did not ask for. Of two members with one tenant id the
older is served, the other refused with `TenantIdConflict`. A member being deleted is
served only while it drains (`deletionPolicy: Drain`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from kubernetes import client

from somabrain_operator import children
from somabrain_operator.apply import apply_shared, delete_shared
from somabrain_operator.children import PoolMember
from somabrain_operator.config import OperatorSettings

SERVED = "ServedByPool"

# The Tenant uids each pool's children were last applied for, by (namespace, pool).
_applied: dict[tuple[str, str], tuple[str, ...]] = {}


def applied() -> dict[tuple[str, str], tuple[str, ...]]:
    """What `converge` last applied, pool by pool (empty after a restart)."""
    return dict(_applied)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A Tenant that names the pool, with what its reconcile resolved for it."""

    member: PoolMember
    created: str
    deleting: bool = False


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What the pool does for one member: `reason` is SERVED or why not."""

    reason: str
    message: str

    @property
    def served(self) -> bool:
        return self.reason == SERVED


@dataclasses.dataclass(frozen=True)
class Plan:
    pool: str
    served: tuple[PoolMember, ...]
    verdicts: dict[str, Verdict]  # by Tenant uid


def plan(pool: str, candidates: Sequence[Candidate]) -> Plan:
    """Which candidates the pool's publisher serves, and why the others are not."""
    name = children.pool_publisher_name(pool)
    served: list[PoolMember] = []
    verdicts: dict[str, Verdict] = {}
    by_tenant_id: dict[str, PoolMember] = {}
    first: PoolMember | None = None
    for cand in sorted(candidates, key=lambda c: (c.created, c.member.name)):
        m = cand.member
        if cand.deleting and m.resolved.deletion_policy != "Drain":
            verdicts[m.uid] = Verdict("Deleting", f"being deleted; {name} no longer serves it")
            continue
        if (holder := by_tenant_id.get(m.tenant_id)) is not None:
            verdicts[m.uid] = Verdict(
                "TenantIdConflict",
                f"tenant id {m.tenant_id} is already served in pool {pool} by Tenant "
                f"{holder.name}; give this Tenant another tenantId or delete one of the two",
            )
            continue
        if first is not None:
            differing = _differences(first, m)
            if differing:
                verdicts[m.uid] = Verdict(
                    "PoolSettingsConflict",
                    f"pool {pool} publishes with the settings of its first member, Tenant "
                    f"{first.name}, and this Tenant's differ: {differing}; align them (or "
                    "their policies), or move this Tenant to another pool",
                )
                continue
        first = first or m
        by_tenant_id[m.tenant_id] = m
        served.append(m)
        verdicts[m.uid] = Verdict(SERVED, f"the shared publisher {name} serves this tenant")
    return Plan(pool=pool, served=tuple(served), verdicts=verdicts)


def _differences(first: PoolMember, other: PoolMember) -> str:
    theirs, ours = children.start_settings(first.resolved), children.start_settings(other.resolved)
    return ", ".join(
        f"{key.removeprefix('SOMABRAIN_').lower()} {ours[key]} (pool: {theirs[key]})"
        for key in sorted(theirs)
        if theirs[key] != ours[key]
    )


def wanted(chosen: Plan, *, namespace: str, settings: OperatorSettings) -> list[dict[str, Any]]:
    """The pool's ConfigMap, Deployment and Service for the members it serves (none when
    it serves none). Pure."""
    members = list(chosen.served)
    if not members:
        return []
    config = children.pool_config_map(
        chosen.pool, namespace=namespace, members=members, settings=settings
    )
    deployment = children.pool_deployment(
        chosen.pool, namespace=namespace, members=members, settings=settings, config=config
    )
    service = children.pool_service(
        chosen.pool, namespace=namespace, members=members, settings=settings
    )
    return [config, deployment, service]


def converge(
    api: client.ApiClient, namespace: str, chosen: Plan, *, settings: OperatorSettings
) -> None:
    """Apply the pool's children for the members it serves; delete them when it serves
    none."""
    members = list(chosen.served)
    if not members:
        _applied.pop((namespace, chosen.pool), None)
        for kind in ("Deployment", "ConfigMap", "Service"):
            delete_shared(
                api,
                kind,
                name=children.pool_publisher_name(chosen.pool),
                namespace=namespace,
                labels=children.pool_labels(chosen.pool),
            )
        return
    for child in wanted(chosen, namespace=namespace, settings=settings):
        apply_shared(api, child)
    _applied[(namespace, chosen.pool)] = tuple(m.uid for m in members)
