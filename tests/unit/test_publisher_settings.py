"""Publisher settings: dedicated and shared mode, and per-tenant overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from somabrain.config.errors import InvalidTenantConfig
from somabrain.config.settings import PublisherSettings, load_tenant_overrides


def test_one_tenant_is_dedicated_mode_owned_by_the_tenant() -> None:
    settings = PublisherSettings(tenant="acme")

    assert settings.served_tenants() == ["acme"]
    assert settings.owner == "acme"


def test_shared_mode_reads_a_comma_separated_tenant_list_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SOMABRAIN_TENANTS", "acme, globex,initech")
    monkeypatch.setenv("SOMABRAIN_POOL", "small")

    settings = PublisherSettings()

    assert settings.served_tenants() == ["acme", "globex", "initech"]
    assert settings.owner == "pool.small"


def test_several_tenants_without_a_pool_name_are_refused() -> None:
    with pytest.raises(ValidationError, match="SOMABRAIN_POOL"):
        PublisherSettings(tenants=["acme", "globex"])


def test_a_tenant_listed_twice_is_refused() -> None:
    with pytest.raises(ValidationError, match="twice"):
        PublisherSettings(tenants=["acme", "acme"], pool="small")


def test_a_pool_name_with_a_dot_is_refused_so_it_never_collides_with_a_tenant() -> None:
    with pytest.raises(ValidationError, match="pool name"):
        PublisherSettings(tenants=["acme", "globex"], pool="a.b")


def test_tenant_overrides_file_is_read_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(
        "tenants:\n  acme:\n    events_per_second: 50\n    poison_policy: skip\n",
        encoding="utf-8",
    )

    overrides = load_tenant_overrides(path)

    assert overrides["acme"].events_per_second == 50
    assert overrides["acme"].poison_policy == "skip"
    assert overrides["acme"].batch_size is None


def test_tenant_overrides_with_an_unknown_field_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text("tenants:\n  acme:\n    events_per_sec: 50\n", encoding="utf-8")

    with pytest.raises(InvalidTenantConfig, match="events_per_sec"):
        load_tenant_overrides(path)


def test_tenant_overrides_with_a_negative_quota_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "tenants.json"
    path.write_text('{"tenants": {"acme": {"events_per_second": -1}}}', encoding="utf-8")

    with pytest.raises(InvalidTenantConfig, match="events_per_second"):
        load_tenant_overrides(path)
