"""The staged rollout of a feature flag: cohorts, steps, dwell, health gate (K-17)."""

from __future__ import annotations

import datetime as dt

from somabrain_operator import rollout
from somabrain_operator.resources.policy import Rollout

T0 = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC)
TENANTS = [f"tenant-{i:03d}" for i in range(200)]


def _rollout(**extra: object) -> Rollout:
    return Rollout.from_body({"flag": "dead-letter", "steps": [10, 50, 100], **extra})


def _healthy() -> list[rollout.Health]:
    return [rollout.Health(tenant_id=t, reported=True, circuit="closed") for t in TENANTS]


def test_cohorts_are_stable_and_grow_with_the_percent() -> None:
    for tenant in TENANTS:
        assert rollout.cohort("dead-letter", tenant) == rollout.cohort("dead-letter", tenant)
        on = [rollout.flag_on("dead-letter", tenant, p) for p in (0, 5, 25, 50, 100)]
        assert on == sorted(on), "a tenant never loses the flag as the percent grows"
        assert on[-1] is True
        assert on[0] is False


def test_cohorts_spread_roughly_evenly() -> None:
    at_half = sum(rollout.flag_on("dead-letter", t, 50) for t in TENANTS)

    assert 70 <= at_half <= 130


def test_a_rollout_starts_at_its_first_step() -> None:
    state = rollout.advance(_rollout(dwellSeconds=60), None, _healthy(), T0)

    assert (state.phase, state.step, state.percent) == ("Progressing", 0, 10)
    assert state.step_started_at == T0


def test_a_step_holds_for_its_dwell_then_advances_while_healthy() -> None:
    r = _rollout(dwellSeconds=60)
    state = rollout.advance(r, None, _healthy(), T0)

    held = rollout.advance(r, state, _healthy(), T0 + dt.timedelta(seconds=59))
    moved = rollout.advance(r, held, _healthy(), T0 + dt.timedelta(seconds=60))

    assert (held.step, held.percent) == (0, 10)
    assert (moved.phase, moved.step, moved.percent) == ("Progressing", 1, 50)
    assert moved.step_started_at == T0 + dt.timedelta(seconds=60)


def test_a_finished_rollout_is_complete_at_100_percent() -> None:
    # K-17: whatever the steps, the end is every tenant with the flag on.
    r = Rollout.from_body({"flag": "dead-letter", "steps": [33, 66, 100], "dwellSeconds": 1})
    state = None
    now = T0
    for _ in range(10):
        state = rollout.advance(r, state, _healthy(), now)
        now += dt.timedelta(seconds=2)

    assert state is not None
    assert (state.phase, state.percent) == ("Complete", 100)
    flags = [rollout.flags_for([r], {r.flag: state}, t)[r.flag] for t in TENANTS]
    assert all(flags)


def test_an_unhealthy_canary_rolls_the_flag_back_for_everyone_naming_it() -> None:
    r = _rollout(dwellSeconds=60)
    state = rollout.advance(r, None, _healthy(), T0)
    canary = next(t for t in TENANTS if rollout.flag_on(r.flag, t, 10))
    health = [
        rollout.Health(tenant_id=t, reported=True, circuit="open" if t == canary else "closed")
        for t in TENANTS
    ]

    back = rollout.advance(r, state, health, T0 + dt.timedelta(seconds=5))

    assert back.phase == "RolledBack"
    assert back.percent == 0
    assert canary in (back.reason or "")
    assert not any(rollout.flags_for([r], {r.flag: back}, t)[r.flag] for t in TENANTS)
    # and it stays rolled back
    assert rollout.advance(r, back, _healthy(), T0 + dt.timedelta(hours=1)) == back


def test_a_tenant_outside_the_cohort_does_not_fail_the_gate() -> None:
    r = _rollout(dwellSeconds=60)
    state = rollout.advance(r, None, _healthy(), T0)
    outsider = next(t for t in TENANTS if not rollout.flag_on(r.flag, t, 10))
    health = [
        rollout.Health(tenant_id=t, reported=True, circuit="open" if t == outsider else "closed")
        for t in TENANTS
    ]

    assert rollout.advance(r, state, health, T0 + dt.timedelta(seconds=5)).phase == "Progressing"


def test_backlog_gate_fails_on_a_canary_over_the_limit() -> None:
    r = _rollout(dwellSeconds=60, healthGate={"maxBacklog": 100})
    state = rollout.advance(r, None, _healthy(), T0)
    canary = next(t for t in TENANTS if rollout.flag_on(r.flag, t, 10))
    health = [
        rollout.Health(tenant_id=t, reported=True, pending=101 if t == canary else 0)
        for t in TENANTS
    ]

    back = rollout.advance(r, state, health, T0 + dt.timedelta(seconds=5))

    assert back.phase == "RolledBack"
    assert "101 pending events > 100" in (back.reason or "")


def test_a_silent_canary_pauses_the_rollout_until_it_reports() -> None:
    r = _rollout(dwellSeconds=1)
    state = rollout.advance(r, None, _healthy(), T0)
    canary = next(t for t in TENANTS if rollout.flag_on(r.flag, t, 10))
    health = [rollout.Health(tenant_id=t, reported=t != canary) for t in TENANTS]

    paused = rollout.advance(r, state, health, T0 + dt.timedelta(seconds=5))
    resumed = rollout.advance(r, paused, _healthy(), T0 + dt.timedelta(seconds=6))

    assert paused.phase == "Paused"
    assert canary in (paused.reason or "")
    assert (paused.step, paused.percent) == (0, 10)
    assert (resumed.phase, resumed.step) == ("Progressing", 1)


def test_a_rollout_not_started_sets_no_flag() -> None:
    assert rollout.flags_for([_rollout()], {}, "tenant-001") == {}


def test_members_of_a_shared_pool_move_together_and_count_as_one_cohort() -> None:
    # One publisher serves a pool, started with one delivery mode: a rollout of
    # exactly-once must not split it (the member left out would be refused).
    from somabrain_operator.resources import TenantSpec

    def member(tenant_id: str, pool: str) -> TenantSpec:
        return TenantSpec.from_body(
            {"tenantId": tenant_id, "publisher": {"mode": "shared", "pool": pool}}
        )

    states = {"exactly-once": rollout.RolloutState.from_body(
        {"flag": "exactly-once", "step": 0, "percent": 50, "phase": "Progressing",
         "reason": "", "stepStartedAt": T0.isoformat()}
    )}  # fmt: skip
    rollouts = [Rollout.from_body({"flag": "exactly-once", "steps": [50, 100]})]
    for pool in (f"pool-{i}" for i in range(20)):
        flags = {
            rollout.flags_for(rollouts, states, rollout.cohort_key(member(t, pool), "team-a"))[
                "exactly-once"
            ]
            for t in TENANTS[:12]
        }
        assert len(flags) == 1, f"members of {pool} split"
    # Outside pools, tenants are placed one by one, as before.
    dedicated = TenantSpec.from_body({"tenantId": "acme"})
    assert rollout.cohort_key(dedicated, "team-a") == "acme"
    # The same pool name in another namespace is another pool, placed on its own.
    assert rollout.cohort_key(member("a", "p"), "ns-1") != rollout.cohort_key(
        member("a", "p"), "ns-2"
    )


def test_an_edit_of_the_steps_keeps_every_tenant_that_has_the_flag() -> None:
    from somabrain_operator.policies import _on_steps

    def state(step: int, percent: int, phase: str) -> dict[str, object]:
        return {"flag": "dead-letter", "step": step, "percent": percent, "phase": phase,
                "reason": "", "stepStartedAt": "2026-12-04T12:00:00Z"}  # fmt: skip

    # Finished at step 2 of [25, 50, 100]; the steps become [50, 100]: still finished.
    assert _on_steps(state(2, 100, "Complete"), [50, 100])["step"] == 1
    assert _on_steps(state(2, 100, "Complete"), [50, 100])["percent"] == 100
    # At 25 %, the steps become [10, 40, 100]: on at 40 %, never back to 10.
    moved = _on_steps(state(0, 25, "Progressing"), [10, 40, 100])
    assert (moved["step"], moved["percent"], moved["phase"]) == (1, 40, "Progressing")
    # Unchanged where the step still has its percent; a rollback stays rolled back.
    assert _on_steps(state(1, 50, "Paused"), [25, 50, 100]) == state(1, 50, "Paused")
    assert _on_steps(state(0, 0, "RolledBack"), [50, 100]) == state(0, 0, "RolledBack")
