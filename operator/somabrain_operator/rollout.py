"""Staged rollouts of a feature flag across the Tenants of an OutboxPolicy.

Cohorts: a tenant's place in a rollout is a number from 0 to 99 taken from a stable
hash of (flag, tenant id); at a step of P percent the flag is on for the tenants whose
number is below P. The members of a shared pool take the place of the pool (a hash of
flag, namespace and pool), so they move together: they share one publisher, started
with one delivery mode, and a member whose flags split it from the others would be
refused from the pool for the length of the rollout. Steps only grow, so a tenant
that got the flag keeps it at every later step, and membership never flips back and
forth.

`advance` is the state machine, a pure function of the rollout, its last state, the
health of the canary tenants (those with the flag on) and the time:
- Progressing: after `dwellSeconds` at a step with every canary healthy, go to the
  next step; after the dwell at the last step (100, by validation: case K-17),
  Complete.
- Paused: some canary has no fresh report, so its health is unknown; nothing advances
  until it reports again.
- RolledBack: a canary failed the health gate; the flag is off for every tenant of
  the policy and stays so (the reason names the tenant) until the policy is edited,
  which starts the rollout again from its first step.
- Complete: at 100 percent, for good.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from somabrain_operator.resources import defaults
from somabrain_operator.resources.policy import HealthGate, Rollout, RolloutState
from somabrain_operator.resources.tenant import TenantSpec

DEFAULT_GATE = HealthGate(circuit_closed=True)


def cohort(flag: str, tenant_id: str) -> int:
    """The tenant's place in the flag's rollout, 0 to 99; the same on every run."""
    digest = hashlib.sha256(f"{flag}\x00{tenant_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100


def flag_on(flag: str, tenant_id: str, percent: int) -> bool:
    return cohort(flag, tenant_id) < percent


@dataclasses.dataclass(frozen=True, slots=True)
class Health:
    """A tenant as its publisher last reported it; `reported` False: no fresh report."""

    tenant_id: str
    reported: bool
    # Its place in rollouts (`cohort_key`); empty: its tenant id.
    key: str = ""
    pending: int = 0
    oldest_pending_seconds: float | None = None
    circuit: str | None = None


def failure(gate: HealthGate, health: Health) -> str | None:
    """Why `health` fails `gate`, or None when it passes."""
    if gate.circuit_closed and health.circuit == "open":
        return f"tenant {health.tenant_id}: its circuit is open"
    if gate.max_backlog is not None and health.pending > gate.max_backlog:
        return f"tenant {health.tenant_id}: {health.pending} pending events > {gate.max_backlog}"
    oldest = health.oldest_pending_seconds
    limit = gate.max_oldest_pending_seconds
    if limit is not None and oldest is not None and oldest > limit:
        return f"tenant {health.tenant_id}: oldest pending event {oldest:.0f} s old > {limit:g} s"
    return None


def _state(
    rollout: Rollout, step: int, phase: str, reason: str, started: dt.datetime
) -> RolloutState:
    return RolloutState(
        flag=rollout.flag,
        step=step,
        percent=0 if phase == "RolledBack" else rollout.steps[step],
        phase=phase,
        reason=reason,
        step_started_at=started,
    )


def advance(
    rollout: Rollout,
    state: RolloutState | None,
    tenants: Sequence[Health],
    now: dt.datetime,
) -> RolloutState:
    """The rollout's next state (equal to `state` when nothing changes)."""
    steps = rollout.steps
    if state is None:
        return _state(rollout, 0, "Progressing", f"started at {steps[0]}%", now)
    if state.phase in ("Complete", "RolledBack"):
        return state
    step = min(state.step, len(steps) - 1)  # the steps may have been edited
    started = state.step_started_at or now
    percent = steps[step]

    gate = rollout.health_gate or DEFAULT_GATE
    canaries = [t for t in tenants if flag_on(rollout.flag, t.key or t.tenant_id, percent)]
    failed = next((why for t in canaries if t.reported and (why := failure(gate, t))), None)
    if failed is not None:
        return _state(
            rollout, step, "RolledBack", f"health gate failed at {percent}%: {failed}", started
        )
    silent = sorted(t.tenant_id for t in canaries if not t.reported)
    if silent:
        shown = ", ".join(silent[:5]) + (" ..." if len(silent) > 5 else "")
        return _state(
            rollout, step, "Paused", f"waiting for reports of canary tenants: {shown}", started
        )

    dwell = rollout.dwell_seconds
    dwell = defaults.ROLLOUT_DWELL_SECONDS if dwell is None else dwell
    if (now - started).total_seconds() < dwell:
        reason = f"at {percent}% ({len(canaries)} tenants), healthy"
        return _state(rollout, step, "Progressing", reason, started)
    if step == len(steps) - 1:
        return _state(rollout, step, "Complete", f"at 100% ({len(canaries)} tenants)", started)
    return _state(rollout, step + 1, "Progressing", f"advanced to {steps[step + 1]}%", now)


def states_of(status: Mapping[str, Any] | None) -> dict[str, RolloutState]:
    """The rollout states in an OutboxPolicy's status, by flag."""
    out = {}
    for raw in (status or {}).get("rollouts") or []:
        state = RolloutState.from_body(raw)
        out[state.flag] = state
    return out


def cohort_key(spec: TenantSpec, namespace: str) -> str:
    """What places a Tenant in rollouts: its tenant id, or its pool's name."""
    publisher = spec.publisher
    if publisher is not None and publisher.mode == "shared" and publisher.pool:
        return f"pool\x00{namespace}\x00{publisher.pool}"
    return str(spec.tenant_id)


def flags_for(
    rollouts: Sequence[Rollout], states: Mapping[str, RolloutState], key: str
) -> dict[str, bool]:
    """The flags the policy's rollouts set for one tenant, placed by `key` (its
    `cohort_key`): on inside the cohort of the current step, off outside it (and for
    everyone after a rollback). A rollout not started yet sets nothing."""
    out = {}
    for rollout in rollouts:
        state = states.get(rollout.flag)
        if state is not None:
            out[rollout.flag] = flag_on(rollout.flag, key, state.percent)
    return out
