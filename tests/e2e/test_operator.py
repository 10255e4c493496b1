"""The operator against the real API server: children, owners, status, spec changes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from somabrain_operator.children import ANNOTATION_CONFIG_HASH, TENANT_FILE
from somabrain_operator.resources import TenantStatus

from devenv.mainjob import MainJob
from tests.e2e.helpers import clean_up
from tests.support import wait_for

pytestmark = pytest.mark.e2e
NAMESPACE = "e2e-operator"


@pytest.fixture
def job(stack_env: dict[str, str], tmp_path: Path) -> Iterator[MainJob]:
    job = MainJob(stack_env, work_dir=tmp_path, namespace=NAMESPACE)
    job.prepare([])
    job.start_operator()
    yield job
    job.stop_operator()
    clean_up(job)
    job.stop()


def _tenant(batch_size: int) -> dict[str, Any]:
    return {
        "apiVersion": "somabrain.io/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": "hooli", "namespace": NAMESPACE},
        "spec": {"tenantId": "hooli", "quotas": {"batchSize": batch_size}},
    }


def _batch_size(config: Any, tenant_id: str = "hooli") -> int:
    entries = yaml.safe_load(config.data[TENANT_FILE])["tenants"]
    return int(entries[tenant_id]["batch_size"])


def test_operator_creates_owned_children_and_rolls_them_on_spec_change(job: MainJob) -> None:
    apps = client.AppsV1Api(job.api)
    core = client.CoreV1Api(job.api)
    custom = client.CustomObjectsApi(job.api)
    name = "somabrain-publisher-hooli"

    job.apply_tenants([_tenant(100)])
    job.wait_ready(["hooli"], timeout=60)
    tenant = custom.get_namespaced_custom_object(
        "somabrain.io", "v1alpha1", NAMESPACE, "tenants", "hooli"
    )
    deployment = apps.read_namespaced_deployment(name, NAMESPACE)
    config = core.read_namespaced_config_map(name, NAMESPACE)
    service = core.read_namespaced_service(name, NAMESPACE)

    uid = tenant["metadata"]["uid"]  # type: ignore[index]
    for child in (deployment, config, service):
        owners = [(o.kind, o.name, o.uid, o.controller) for o in child.metadata.owner_references]
        assert owners == [("Tenant", "hooli", uid, True)]
    assert config.data["SOMABRAIN_TENANT"] == "hooli"
    assert _batch_size(config) == 100
    # Every status field the operator writes is declared, so none was pruned (K-1).
    status = TenantStatus.from_body(tenant["status"])  # type: ignore[index]
    assert status.observed_generation == tenant["metadata"]["generation"]  # type: ignore[index]
    assert status.publisher_mode == "dedicated"
    assert status.children is not None
    assert (status.children.deployment, status.children.config_map) == (name, name)
    assert status.children.service == name
    assert status.resolved is not None
    assert status.resolved.quotas.batch_size == 100
    before = deployment.spec.template.metadata.annotations[ANNOTATION_CONFIG_HASH]

    # A quota reaches the running publisher through its mounted file: no restart.
    job.apply_tenants([_tenant(250)])
    assert wait_for(
        lambda: _batch_size(core.read_namespaced_config_map(name, NAMESPACE)) == 250, timeout=60
    )
    job.wait_ready(["hooli"], timeout=60)
    after = apps.read_namespaced_deployment(name, NAMESPACE)
    assert after.spec.template.metadata.annotations[ANNOTATION_CONFIG_HASH] == before

    # What the publisher reads only at start rolls it.
    changed = _tenant(250)
    changed["spec"]["deliveryMode"] = "at-least-once"
    job.apply_tenants([changed])

    def rolled() -> bool:
        d = apps.read_namespaced_deployment(name, NAMESPACE)
        return bool(d.spec.template.metadata.annotations[ANNOTATION_CONFIG_HASH] != before)

    assert wait_for(rolled, timeout=60)


def test_second_tenant_with_the_same_tenant_id_is_refused_with_a_condition(job: MainJob) -> None:
    custom = client.CustomObjectsApi(job.api)
    first = _tenant(100)
    first["metadata"]["name"] = "pied"
    first["spec"]["tenantId"] = "piper"
    second = _tenant(200)
    second["metadata"]["name"] = "piper-copy"
    second["spec"]["tenantId"] = "piper"
    job.apply_tenants([first])
    job.wait_ready(["pied"], timeout=60)

    job.apply_tenants([second])

    def refused() -> Any:
        obj = custom.get_namespaced_custom_object(
            "somabrain.io", "v1alpha1", NAMESPACE, "tenants", "piper-copy"
        )
        conditions = (obj.get("status") or {}).get("conditions", [])  # type: ignore[union-attr]
        return next((c for c in conditions if c.get("reason") == "TenantIdConflict"), None)

    ready = wait_for(refused, timeout=60)
    assert ready is not None, "no TenantIdConflict condition within 60 s"
    assert ready["status"] == "False"
    assert f"already used by Tenant {NAMESPACE}/pied" in ready["message"]
    config = client.CoreV1Api(job.api).read_namespaced_config_map(
        "somabrain-publisher-piper", NAMESPACE
    )
    assert _batch_size(config, "piper") == 100
