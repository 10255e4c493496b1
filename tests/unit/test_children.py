from typing import Any

from somabrain_operator import children
from somabrain_operator.config import OperatorSettings
from somabrain_operator.resources import TenantSpec

from somabrain.config.settings import PublisherSettings

OWNER = children.owner_reference(name="acme", uid="uid-1")


def _build(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    tenant = TenantSpec.from_body(spec)
    config = children.config_map(tenant, namespace="ns", owner=OWNER)
    deployment = children.deployment(
        tenant, namespace="ns", owner=OWNER, settings=OperatorSettings(), config=config
    )
    return config, deployment


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


def test_deployment_takes_connection_settings_from_the_secret_only() -> None:
    _, deployment = _build({"tenantId": "acme"})
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]

    assert {e["name"] for e in env} == {
        "SOMABRAIN_DATABASE_URL",
        "SOMABRAIN_KAFKA_BOOTSTRAP_SERVERS",
    }
    assert all("secretKeyRef" in e["valueFrom"] for e in env)


def test_config_change_changes_the_pod_template_hash() -> None:
    _, small = _build({"tenantId": "acme", "quotas": {"batchSize": 10}})
    _, large = _build({"tenantId": "acme", "quotas": {"batchSize": 20}})

    def annotation(d: dict[str, Any]) -> str:
        return str(
            d["spec"]["template"]["metadata"]["annotations"][children.ANNOTATION_CONFIG_HASH]
        )

    assert annotation(small) != annotation(large)


def test_same_spec_gives_the_same_children() -> None:
    assert _build({"tenantId": "acme"}) == _build({"tenantId": "acme"})


def test_deployment_uses_the_tenants_replicas_and_resources_as_written() -> None:
    resources = {"requests": {"cpu": "1"}, "limits": {"cpu": "2", "memory": "1Gi"}}
    _, deployment = _build(
        {"tenantId": "acme", "publisher": {"replicas": 2, "resources": resources}}
    )

    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["template"]["spec"]["containers"][0]["resources"] == resources


def test_unset_batch_size_takes_the_publishers_default() -> None:
    config, _ = _build({"tenantId": "acme"})

    assert config["data"]["SOMABRAIN_BATCH_SIZE"] == str(
        PublisherSettings.model_fields["batch_size"].default
    )
