"""Desired children of a Tenant, as pure functions of its spec, policy and settings."""

from typing import Any

import yaml
from somabrain_operator import children
from somabrain_operator.config import OperatorSettings
from somabrain_operator.resources import OutboxPolicySpec, TenantSpec, resolve

from somabrain.config.settings import PublisherSettings, TenantOverrides

OWNER = children.owner_reference(name="acme", uid="uid-1")
SETTINGS = OperatorSettings(rule_labels={"release": "prometheus"})


def _build(
    spec: dict[str, Any], policy: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    tenant = TenantSpec.from_body(spec)
    resolved = resolve(tenant, OutboxPolicySpec.from_body(policy) if policy else None)
    config = children.config_map(tenant, resolved, namespace="ns", owner=OWNER, settings=SETTINGS)
    deployment = children.deployment(
        tenant, resolved, namespace="ns", owner=OWNER, settings=SETTINGS, config=config
    )
    return config, deployment


def _rule(spec: dict[str, Any], policy: dict[str, Any] | None = None) -> dict[str, Any]:
    tenant = TenantSpec.from_body(spec)
    resolved = resolve(tenant, OutboxPolicySpec.from_body(policy) if policy else None)
    return children.prometheus_rule(
        tenant, resolved, namespace="ns", owner=OWNER, settings=SETTINGS
    )


def _tenant_file(config: dict[str, Any]) -> TenantOverrides:
    entries = yaml.safe_load(config["data"][children.TENANT_FILE])["tenants"]
    assert list(entries) == ["acme"]
    return TenantOverrides.model_validate(entries["acme"])


def _hash(deployment: dict[str, Any]) -> str:
    return str(
        deployment["spec"]["template"]["metadata"]["annotations"][children.ANNOTATION_CONFIG_HASH]
    )


def test_deployment_runs_the_publisher_of_its_tenant() -> None:
    _, deployment = _build({"tenantId": "acme"})
    container = deployment["spec"]["template"]["spec"]["containers"][0]

    assert container["command"] + container["args"] == [
        "somabrain",
        "publisher",
        "run",
        "--tenant",
        "acme",
    ]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["metadata"]["ownerReferences"] == [OWNER]


def test_connection_settings_come_from_the_secret_and_the_rest_from_the_config_map() -> None:
    config, deployment = _build({"tenantId": "acme"})
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]

    from_secret = {e["name"] for e in env if "secretKeyRef" in e["valueFrom"]}
    from_config = {e["name"] for e in env if "configMapKeyRef" in e["valueFrom"]}
    assert from_secret == {"SOMABRAIN_DATABASE_URL", "SOMABRAIN_KAFKA_BOOTSTRAP_SERVERS"}
    assert from_config == set(config["data"]) - {children.TENANT_FILE}
    assert not any("URL" in key or "BOOTSTRAP" in key for key in config["data"])


def test_publisher_reads_the_tenant_file_from_the_mounted_config_map() -> None:
    config, deployment = _build({"tenantId": "acme"})
    pod = deployment["spec"]["template"]["spec"]
    mount = pod["containers"][0]["volumeMounts"][0]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])

    assert volume["configMap"]["name"] == config["metadata"]["name"]
    assert (
        config["data"]["SOMABRAIN_TENANT_CONFIG_FILE"]
        == f"{mount['mountPath']}/{children.TENANT_FILE}"
    )


def test_quota_change_reaches_the_tenant_file_and_does_not_roll_the_pods() -> None:
    small_config, small = _build({"tenantId": "acme", "quotas": {"batchSize": 10}})
    large_config, large = _build({"tenantId": "acme", "quotas": {"batchSize": 20}})

    assert _tenant_file(small_config).batch_size == 10
    assert _tenant_file(large_config).batch_size == 20
    assert _hash(small) == _hash(large)


def test_delivery_mode_change_rolls_the_pods() -> None:
    config, exactly_once = _build({"tenantId": "acme"})
    _, at_least_once = _build({"tenantId": "acme", "deliveryMode": "at-least-once"})

    assert config["data"]["SOMABRAIN_DELIVERY_MODE"] == "exactly-once"
    assert _hash(exactly_once) != _hash(at_least_once)


def test_policy_retry_and_retention_reach_the_publishers_environment() -> None:
    policy = {"retry": {"maxAttempts": 7, "backoffSeconds": 2.5}, "retentionSeconds": 3600}
    config, _ = _build({"tenantId": "acme", "policyRef": {"name": "p"}}, policy)

    assert config["data"]["SOMABRAIN_MAX_ATTEMPTS"] == "7"
    assert config["data"]["SOMABRAIN_RETRY_BACKOFF_SECONDS"] == "2.5"
    assert config["data"]["SOMABRAIN_RETENTION_SECONDS"] == "3600"


def test_tenant_file_is_read_by_the_publishers_own_parser() -> None:
    spec = {
        "tenantId": "acme",
        "quotas": {"eventsPerSecond": 200, "maxPending": 5000},
        "poisonPolicy": "skip",
        "deadLetterTopic": "{tenant}.dead",
    }
    config, _ = _build(spec)
    overrides = _tenant_file(config)

    assert overrides.events_per_second == 200
    assert overrides.max_pending == 5000
    assert overrides.poison_policy == "skip"
    assert overrides.dead_letter_topic == "acme.dead"


def test_same_spec_gives_the_same_children() -> None:
    assert _build({"tenantId": "acme"}) == _build({"tenantId": "acme"})


def test_deployment_uses_the_tenants_replicas_and_resources_as_written() -> None:
    resources = {"requests": {"cpu": "1"}, "limits": {"cpu": "2", "memory": "1Gi"}}
    _, deployment = _build(
        {"tenantId": "acme", "publisher": {"replicas": 2, "resources": resources}}
    )

    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["template"]["spec"]["containers"][0]["resources"] == resources


def test_deployment_probes_health_and_readiness_on_the_metrics_port() -> None:
    _, deployment = _build({"tenantId": "acme"})
    container = deployment["spec"]["template"]["spec"]["containers"][0]

    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["ports"][0]["containerPort"] == SETTINGS.publisher_metrics_port
    assert container["securityContext"]["runAsNonRoot"] is True


def test_unset_batch_size_takes_the_publishers_default() -> None:
    config, _ = _build({"tenantId": "acme"})

    assert _tenant_file(config).batch_size == PublisherSettings.model_fields["batch_size"].default


def test_rules_carry_the_thresholds_and_labels_of_tenant_policy_and_operator() -> None:
    policy = {"alerts": {"labels": {"team": "core", "tier": "gold"}}}
    spec = {
        "tenantId": "acme",
        "policyRef": {"name": "p"},
        "alerts": {"labels": {"team": "payments"}, "thresholds": {"backlogWarning": 42}},
    }
    rule = _rule(spec, policy)
    rules = rule["spec"]["groups"][0]["rules"]
    backlog = next(r for r in rules if r["alert"] == "SomabrainBacklogHigh")

    assert "> 42" in backlog["expr"]
    assert all(r["labels"]["team"] == "payments" and r["labels"]["tier"] == "gold" for r in rules)
    assert all(r["labels"]["tenant"] == "acme" for r in rules)
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert rule["metadata"]["labels"]["team"] == "payments"


def test_resource_quota_only_when_asked_for() -> None:
    plain = TenantSpec.from_body({"tenantId": "acme"})
    asking = TenantSpec.from_body({"tenantId": "acme", "resourceQuota": {"hard": {"pods": "10"}}})

    assert children.resource_quota(plain, namespace="ns", owner=OWNER) is None
    quota = children.resource_quota(asking, namespace="ns", owner=OWNER)
    assert quota is not None
    assert quota["spec"]["hard"] == {"pods": "10"}
