"""Kopf handlers of the OutboxPolicy kind.

A policy has no children of its own: a change to it re-reconciles exactly the Tenants
that reference it, found through the `tenants_by_policy` index (no list call per
event). Its status counts those Tenants.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf
import pydantic

from somabrain_operator.conditions import READY, condition, now
from somabrain_operator.config import GROUP, POLICY_PLURAL, VERSION
from somabrain_operator.metrics import observe
from somabrain_operator.resources import OutboxPolicySpec
from somabrain_operator.state import KNOWN, deleted_event, each, reconcile_known, snapshot

log = logging.getLogger(__name__)


@kopf.index(GROUP, VERSION, POLICY_PLURAL)
async def policy_bodies(
    namespace: str | None, name: str, body: kopf.Body, **_: Any
) -> dict[tuple[str, str], Any]:
    return {(str(namespace), name): snapshot(body)}


def _tenants_follow(namespace: str, name: str, *, deleted: bool = False) -> int:
    """Reconcile the policy's Tenants (as if it did not exist when `deleted`, whether or
    not the index has let it go yet); return how many there are."""
    tenants = KNOWN.tenants_of_policy(namespace, name)
    api = KNOWN.api()

    def without(ns: str, policy: str) -> Mapping[str, Any] | None:
        return None if (ns, policy) == (namespace, name) else KNOWN.policy(ns, policy)

    for body in each(tenants):
        with observe("Tenant", "policy"):
            reconcile_known(api, body, policy_of=without if deleted else None)
    log.info("OutboxPolicy %s/%s: %d referencing Tenants reconciled", namespace, name, len(tenants))
    return len(tenants)


@kopf.on.resume(GROUP, VERSION, POLICY_PLURAL)
@kopf.on.create(GROUP, VERSION, POLICY_PLURAL)
@kopf.on.update(GROUP, VERSION, POLICY_PLURAL, field="spec")
def reconcile_policy(
    body: kopf.Body,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    name: str,
    namespace: str | None,
    **kwargs: Any,
) -> None:
    generation = int(meta.get("generation", 0))
    previous = list(status.get("conditions") or [])
    rollouts = _rollouts_after_edit(spec, status, edited=kwargs.get("reason") == "update")
    if rollouts is not None:
        patch.status["rollouts"] = rollouts
    try:
        OutboxPolicySpec.from_body(spec)
        ready = condition(
            READY,
            ok=True,
            reason="Valid",
            message="the policy applies to the Tenants that reference it",
            generation=generation,
            previous=previous,
        )
    except pydantic.ValidationError as exc:
        ready = condition(
            READY,
            ok=False,
            reason="InvalidSpec",
            message=str(exc).replace("\n", "; "),
            generation=generation,
            previous=previous,
        )
    with observe("OutboxPolicy", "change"):
        count = _tenants_follow(str(namespace), name)
    patch.status["observedGeneration"] = generation
    patch.status["tenants"] = count
    patch.status["conditions"] = [ready]


def _rollouts_after_edit(
    spec: kopf.Spec, status: kopf.Status, *, edited: bool
) -> list[dict[str, Any]] | None:
    """The rollout states to keep, or None when they stay as they are: a rollout
    removed from the spec loses its state, and an edit of the policy restarts the
    rollouts that were rolled back (from their first step)."""
    steps = {r.get("flag"): list(r.get("steps") or []) for r in spec.get("rollouts") or []}
    states = list(status.get("rollouts") or [])
    kept = [
        _on_steps(s, steps[s.get("flag")])
        for s in states
        if s.get("flag") in steps and not (edited and s.get("phase") == "RolledBack")
    ]
    return None if kept == states else kept


def _on_steps(state: dict[str, Any], steps: list[int]) -> dict[str, Any]:
    """A rollout's state placed on its steps as they are now: unchanged when its step
    still has its percent; else at the first step at or above that percent, so that no
    tenant loses the flag, dwelling there from now (a Complete one at its last)."""
    step, percent = int(state.get("step", 0)), int(state.get("percent", 0))
    if (
        state.get("phase") == "RolledBack"
        or not steps
        or (step < len(steps) and steps[step] == percent)
    ):
        return state
    if state.get("phase") == "Complete":
        return {**state, "step": len(steps) - 1, "percent": steps[-1]}
    at = next((i for i, p in enumerate(steps) if p >= percent), len(steps) - 1)
    return {
        **state,
        "step": at,
        "percent": steps[at],
        "reason": f"steps edited: at {steps[at]}%",
        "stepStartedAt": now(),
    }


# An event handler, not `kopf.on.delete`: without a finalizer (none is needed) the
# policy is gone before Kopf could call a delete handler, and this event is all the
# operator sees of its deletion.
@kopf.on.event(GROUP, VERSION, POLICY_PLURAL, when=deleted_event)
def policy_deleted(name: str, namespace: str | None, **_: Any) -> None:
    """Its Tenants report PolicyNotFound (and keep their children as they are)."""
    count = _tenants_follow(str(namespace), name, deleted=True)
    log.info(
        "OutboxPolicy %s/%s deleted: %d referencing Tenants reconciled", namespace, name, count
    )
