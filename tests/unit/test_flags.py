"""Feature flags gate the publisher's per-tenant behaviour."""

from __future__ import annotations

from somabrain.config import flags
from somabrain.config.settings import PublisherSettings, TenantOverrides
from somabrain.config.types import TenantId
from somabrain.delivery.publisher import lane_settings

SETTINGS = PublisherSettings(tenant="acme", batch_size=500, dead_letter_topic="")
ACME = TenantId("acme")


def _overrides(**flag_values: bool) -> TenantOverrides:
    return TenantOverrides(
        batch_size=10,
        max_in_flight=20,
        events_per_second=5,
        max_pending=1000,
        dead_letter_topic="{tenant}.dead",
        feature_flags=flag_values,
    )


def test_unset_flags_take_their_defaults() -> None:
    assert flags.enabled(None, flags.TENANT_QUOTAS) is True
    assert flags.enabled({}, flags.DEAD_LETTER) is True
    assert flags.enabled({"dead-letter": False}, flags.DEAD_LETTER) is False


def test_tenant_quotas_apply_while_the_flag_is_on() -> None:
    on = lane_settings(SETTINGS, _overrides(), ACME)

    assert (on.quota.batch_size, on.quota.max_in_flight, on.quota.events_per_second) == (10, 20, 5)
    assert on.max_pending == 1000


def test_tenant_quotas_flag_off_keeps_the_publishers_quotas() -> None:
    off = lane_settings(SETTINGS, _overrides(**{"tenant-quotas": False}), ACME)

    assert off.quota.batch_size == SETTINGS.batch_size
    assert off.quota.max_in_flight == SETTINGS.max_in_flight
    assert off.quota.events_per_second is None
    assert off.max_pending == SETTINGS.max_pending


def test_dead_letter_flag_off_makes_no_copies() -> None:
    on = lane_settings(SETTINGS, _overrides(), ACME)
    off = lane_settings(SETTINGS, _overrides(**{"dead-letter": False}), ACME)

    assert on.dead_letter_topic == "acme.dead"
    assert off.dead_letter_topic == ""


def test_unknown_flags_change_nothing() -> None:
    assert lane_settings(SETTINGS, _overrides(**{"future-flag": True}), ACME) == lane_settings(
        SETTINGS, _overrides(), ACME
    )
