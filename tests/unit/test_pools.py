"""Shared publisher pools: who a pool's publisher serves, and the children it gets."""

from typing import Any

import yaml
from somabrain_operator import children, pools
from somabrain_operator.config import OperatorSettings
from somabrain_operator.reconcile import misjudged_members
from somabrain_operator.resources import TenantSpec, resolve

from somabrain.config.settings import PublisherSettings, load_tenant_overrides

SETTINGS = OperatorSettings()


def _candidate(
    name: str, created: str, *, tenant_id: str | None = None, deleting: bool = False, **spec: Any
) -> pools.Candidate:
    body = {"tenantId": tenant_id or name, "publisher": {"mode": "shared", "pool": "small"}}
    body.update(spec)
    resolved = resolve(TenantSpec.from_body(body))
    member = children.PoolMember(
        name=name, uid=f"uid-{name}", tenant_id=tenant_id or name, resolved=resolved
    )
    return pools.Candidate(member=member, created=created, deleting=deleting)


def _served(chosen: pools.Plan) -> list[str]:
    return [m.name for m in chosen.served]


def test_a_pool_serves_its_members_oldest_first() -> None:
    chosen = pools.plan(
        "small",
        [_candidate("globex", "2026-01-02T00:00:00Z"), _candidate("acme", "2026-01-01T00:00:00Z")],
    )

    assert _served(chosen) == ["acme", "globex"]
    assert {v.reason for v in chosen.verdicts.values()} == {pools.SERVED}


def test_a_member_whose_start_settings_differ_is_refused_naming_them() -> None:
    chosen = pools.plan(
        "small",
        [
            _candidate("acme", "2026-01-01T00:00:00Z"),
            _candidate("late", "2026-01-03T00:00:00Z", deliveryMode="at-least-once"),
        ],
    )

    assert _served(chosen) == ["acme"]
    verdict = chosen.verdicts["uid-late"]
    assert verdict.reason == "PoolSettingsConflict"
    assert "delivery_mode at-least-once (pool: exactly-once)" in verdict.message
    assert "Tenant acme" in verdict.message


def test_per_tenant_settings_may_differ_within_a_pool() -> None:
    chosen = pools.plan(
        "small",
        [
            _candidate("acme", "2026-01-01T00:00:00Z", quotas={"eventsPerSecond": 5}),
            _candidate("globex", "2026-01-02T00:00:00Z", poisonPolicy="skip"),
        ],
    )

    assert _served(chosen) == ["acme", "globex"]


def test_of_two_members_with_one_tenant_id_the_older_is_served() -> None:
    chosen = pools.plan(
        "small",
        [
            _candidate("second", "2026-01-02T00:00:00Z", tenant_id="acme"),
            _candidate("first", "2026-01-01T00:00:00Z", tenant_id="acme"),
        ],
    )

    assert _served(chosen) == ["first"]
    assert chosen.verdicts["uid-second"].reason == "TenantIdConflict"


def test_a_member_being_deleted_is_served_only_while_it_drains() -> None:
    chosen = pools.plan(
        "small",
        [
            _candidate("drainer", "2026-01-01T00:00:00Z", deleting=True, deletionPolicy="Drain"),
            _candidate("doomed", "2026-01-02T00:00:00Z", deleting=True, deletionPolicy="Delete"),
            _candidate("gone", "2026-01-03T00:00:00Z", deleting=True),
        ],
    )

    assert _served(chosen) == ["drainer"]
    assert chosen.verdicts["uid-doomed"].reason == "Deleting"


def _pool_children(*names: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    members = [c.member for c in (_candidate(n, f"2026-01-0{i + 1}") for i, n in enumerate(names))]
    config = children.pool_config_map("small", namespace="ns", members=members, settings=SETTINGS)
    deployment = children.pool_deployment(
        "small", namespace="ns", members=members, settings=SETTINGS, config=config
    )
    service = children.pool_service("small", namespace="ns", members=members, settings=SETTINGS)
    return config, deployment, service


def test_the_pool_publisher_drains_every_member_read_from_its_config_map(
    tmp_path: Any, monkeypatch: Any
) -> None:
    config, deployment, _ = _pool_children("globex", "acme")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["--pool", children.pool_identity("ns", "small")]
    env_keys = {e["name"] for e in container["env"] if "configMapKeyRef" in e["valueFrom"]}
    assert env_keys == set(config["data"]) - {children.TENANT_FILE}

    # What the publisher makes of the ConfigMap's environment and file.
    path = tmp_path / children.TENANT_FILE
    path.write_text(config["data"][children.TENANT_FILE])
    for key in env_keys:
        monkeypatch.setenv(key, config["data"][key])
    monkeypatch.setenv("SOMABRAIN_TENANT_CONFIG_FILE", str(path))
    settings = PublisherSettings()
    assert settings.served_tenants() == ["acme", "globex"]
    assert settings.owner == f"pool.{children.pool_identity('ns', 'small')}"
    assert set(load_tenant_overrides(path)) == {"acme", "globex"}


def test_the_pool_children_are_owned_by_every_member_and_controlled_by_none() -> None:
    for child in _pool_children("acme", "globex"):
        owners = child["metadata"]["ownerReferences"]
        assert [o["name"] for o in owners] == ["acme", "globex"]
        assert not any(o.get("controller") for o in owners)
        assert child["metadata"]["name"] == "somabrain-pool-small"
        assert child["metadata"]["labels"][children.LABEL_POOL] == "small"


def test_a_member_joining_restarts_the_pool_and_a_quota_change_does_not() -> None:
    def config_hash(config: dict[str, Any]) -> str:
        return children.config_hash(config)

    one, _, _ = _pool_children("acme")
    two, _, _ = _pool_children("acme", "globex")
    assert config_hash(one) != config_hash(two)

    members = [_candidate("acme", "2026-01-01", quotas={"batchSize": 7}).member]
    changed = children.pool_config_map("small", namespace="ns", members=members, settings=SETTINGS)
    assert config_hash(changed) == config_hash(one)
    assert (
        yaml.safe_load(changed["data"][children.TENANT_FILE])["tenants"]["acme"]["batch_size"] == 7
    )


def test_the_pool_service_selects_the_pool_publisher_pods() -> None:
    _, deployment, service = _pool_children("acme")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # A dedicated publisher's Service never selects the pool's pods.
    assert children.LABEL_TENANT not in pod_labels


def _body(name: str, created: str, ready: str | None, **spec: Any) -> dict[str, Any]:
    status = {"conditions": [{"type": "Ready", "reason": ready}]} if ready else {}
    return {
        "metadata": {
            "name": name,
            "uid": f"uid-{name}",
            "namespace": "ns",
            "creationTimestamp": created,
        },
        "spec": {"tenantId": name, "publisher": {"mode": "shared", "pool": "small"}, **spec},
        "status": status,
    }


def test_members_whose_ready_reason_disagrees_with_the_plan_are_found() -> None:
    bodies = [
        _body("acme", "2026-01-01T00:00:00Z", "ServedByPool"),
        # Its status lost a race: the pool serves it now, its condition says otherwise.
        _body("late", "2026-01-02T00:00:00Z", "PoolSettingsConflict"),
        _body("odd", "2026-01-03T00:00:00Z", "ServedByPool", deliveryMode="at-least-once"),
        # Not the pool's to judge: its own reconcile fails before any pool is planned.
        _body("lost", "2026-01-04T00:00:00Z", "PolicyNotFound", policyRef={"name": "gone"}),
        _body("new", "2026-01-05T00:00:00Z", None),
    ]

    wrong = misjudged_members("small", bodies, lambda namespace, name: None)

    assert [b["metadata"]["name"] for b in wrong] == ["late", "odd", "new"]


def test_pools_of_one_name_in_two_namespaces_publish_under_different_names() -> None:
    # The name becomes the Kafka transactional id: a shared one would fence the other pool.
    one, two = children.pool_identity("shop", "small"), children.pool_identity("other", "small")
    assert one != two
    assert one.startswith("small-")
    long = children.pool_identity("ns", "p" * 40)
    assert len(long) <= 40
    for name in (one, two, long):
        PublisherSettings(pool=name, tenants=["a", "b"])  # a valid pool name
