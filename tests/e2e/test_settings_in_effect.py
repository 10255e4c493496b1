"""What the schema lets through, the operator can carry out, on the real API server:
the largest Tenant the schema allows (with the largest OutboxPolicy, and the
PrometheusRule kind installed) reconciles to Ready, and a Tenant whose settings break a
rule only once merged with its policy and the defaults is not Ready, says why, and gets
no children (cases K-13, K-16)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from somabrain_operator.children import publisher_name, rule_name
from somabrain_operator.config import RULE_CRD, RULE_GROUP, RULE_PLURAL, RULE_VERSION

from devenv.mainjob import MainJob
from somabrain.config.types import TENANT_ID_MAX_LENGTH
from tests.e2e.helpers import (
    GROUP,
    PROMETHEUS_RULE_CRD,
    VERSION,
    apply,
    condition,
    exists,
    get,
    has_condition,
    policy,
    tenant,
)
from tests.resource_examples import largest_policy_spec, largest_tenant_spec
from tests.support import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def rule_kind(job: MainJob) -> Iterator[None]:
    """The PrometheusRule kind installed for the test, and removed afterwards (other
    tests expect a cluster without it)."""
    ext = client.ApiextensionsV1Api(job.api)
    ext.create_custom_resource_definition(PROMETHEUS_RULE_CRD)
    try:
        yield
    finally:
        ext.delete_custom_resource_definition(RULE_CRD)
        wait_for(lambda: not exists(lambda: ext.read_custom_resource_definition(RULE_CRD)))


def test_largest_tenant_the_schema_allows_is_reconciled_to_ready(
    job: MainJob, rule_kind: None
) -> None:
    spec = largest_tenant_spec()
    apply(job, "outboxpolicies", policy(spec["policyRef"]["name"], **largest_policy_spec()))
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Tenant",
        "metadata": {"name": "largest"},
        "spec": spec,
    }

    job.apply_tenants([body])

    job.wait_ready(["largest"], timeout=90)
    assert wait_for(
        lambda: has_condition(job, "largest", "AlertsConfigured", "True", "RulesApplied"),
        timeout=60,
    ), condition(job, "largest", "AlertsConfigured")
    resolved = (get(job, "largest") or {})["status"]["resolved"]
    tenant_id = spec["tenantId"]
    assert len(tenant_id) == TENANT_ID_MAX_LENGTH
    # {tenant} expanded to Kafka's longest topic name, not beyond.
    assert resolved["deadLetterTopic"] == spec["deadLetterTopic"].replace("{tenant}", tenant_id)
    assert len(resolved["deadLetterTopic"]) == 249
    assert resolved["alertLabels"] == spec["alerts"]["labels"]
    rule: Any = client.CustomObjectsApi(job.api).get_namespaced_custom_object(
        RULE_GROUP, RULE_VERSION, job.namespace, RULE_PLURAL, rule_name(tenant_id)
    )
    assert spec["alerts"]["labels"].items() <= rule["metadata"]["labels"].items()
    apps = client.AppsV1Api(job.api)
    deployment = apps.read_namespaced_deployment(publisher_name(tenant_id), job.namespace)
    assert deployment.spec.replicas == spec["publisher"]["replicas"]


def test_tenant_whose_merged_settings_break_a_rule_is_not_ready_and_gets_no_children(
    job: MainJob,
) -> None:
    # maxInFlight 100 alone is valid; with the default batchSize 500 it is not.
    job.apply_tenants([tenant("narrow", quotas={"maxInFlight": 100})])

    assert wait_for(
        lambda: has_condition(job, "narrow", "Ready", "False", "ConflictingSettings"),
        timeout=60,
    ), condition(job, "narrow", "Ready")
    ready = condition(job, "narrow", "Ready") or {}
    assert "quotas.maxInFlight 100 (this Tenant)" in ready["message"]
    assert "quotas.batchSize 500 (the default)" in ready["message"]
    assert "maxInFlight must be at least batchSize" in ready["message"]
    core, apps = client.CoreV1Api(job.api), client.AppsV1Api(job.api)
    name = publisher_name("narrow")
    assert not exists(lambda: apps.read_namespaced_deployment(name, job.namespace))
    assert not exists(lambda: core.read_namespaced_config_map(name, job.namespace))
    assert "resolved" not in ((get(job, "narrow") or {}).get("status") or {})

    # Set in one place, the pair is consistent again.
    job.apply_tenants([tenant("narrow", quotas={"maxInFlight": 100, "batchSize": 100})])

    job.wait_ready(["narrow"], timeout=60)
    resolved = (get(job, "narrow") or {})["status"]["resolved"]
    assert (resolved["quotas"]["batchSize"], resolved["quotas"]["maxInFlight"]) == (100, 100)
