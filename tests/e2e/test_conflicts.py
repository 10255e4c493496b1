"""Children whose name or fields someone else holds, on the real API server (case K-14):
an object another controller owns is never taken over, a field another manager took
from an object the Tenant controls is restored after a conflict, and the operator
applies under one field manager."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from kubernetes import client
from somabrain_operator.children import TENANT_FILE, publisher_name
from somabrain_operator.config import FIELD_MANAGER
from sqlalchemy import text

from devenv.mainjob import MainJob
from somabrain import enqueue_event
from somabrain.store.engine import make_sessionmaker
from tests.e2e.helpers import (
    GROUP,
    VERSION,
    batch_size,
    clean_namespace,
    condition,
    get,
    has_condition,
    tenant,
)
from tests.support import wait_for

pytestmark = pytest.mark.e2e

APPLY = "application/apply-patch+yaml"


def _managers(obj: Any) -> set[tuple[str, str]]:
    return {(m.manager, m.operation) for m in obj.metadata.managed_fields or []}


def _fields_of(obj: Any, manager: str) -> str:
    """The fields `manager` owns in `obj`, as the API server's JSON text."""
    entries = [m for m in obj.metadata.managed_fields or [] if m.manager == manager]
    return " ".join(str(m.fields_v1) for m in entries)


@pytest.mark.parametrize("holder", ["another controller", "no controller"])
def test_a_child_name_held_by_an_object_not_ours_is_a_conflict_and_never_taken(
    job: MainJob, holder: str
) -> None:
    core, apps = client.CoreV1Api(job.api), client.AppsV1Api(job.api)
    # Another controller's Deployment, and a ConfigMap under the name the Tenant's
    # ConfigMap would take, controlled by that Deployment or by nothing (made by hand);
    # none of its keys are ones the operator writes, so an apply would merge into it.
    other = apps.create_namespaced_deployment(
        job.namespace,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "someone-else"},
            "spec": {
                "selector": {"matchLabels": {"app": "someone-else"}},
                "template": {
                    "metadata": {"labels": {"app": "someone-else"}},
                    "spec": {"containers": [{"name": "app", "image": "example:1"}]},
                },
            },
        },
        field_manager="other-controller",
    )
    owner = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "someone-else",
        "uid": other.metadata.uid,
        "controller": True,
    }
    taken = core.create_namespaced_config_map(
        job.namespace,
        {
            "metadata": {
                "name": publisher_name("taken"),
                "ownerReferences": [owner] if holder == "another controller" else [],
            },
            "data": {"owner": "someone-else"},
        },
        field_manager="other-controller",
    )

    job.apply_tenants([tenant("taken")])

    assert wait_for(
        lambda: has_condition(job, "taken", "Ready", "False", "ChildNameTaken"), timeout=60
    ), condition(job, "taken", "Ready")
    message = (condition(job, "taken", "Ready") or {})["message"]
    assert f"ConfigMap {publisher_name('taken')}" in message
    if holder == "another controller":
        assert "is controlled by Deployment someone-else" in message
    else:
        assert "has no controller" in message
    # Retries (the repair pass every 2 s) change nothing either.
    time.sleep(5)
    live = core.read_namespaced_config_map(publisher_name("taken"), job.namespace)
    assert live.metadata.resource_version == taken.metadata.resource_version
    assert live.metadata.owner_references == taken.metadata.owner_references
    assert live.data == {"owner": "someone-else"}
    assert (FIELD_MANAGER, "Apply") not in _managers(live)
    # Nothing else of the Tenant's was created beside an object it cannot have.
    deployments = apps.list_namespaced_deployment(job.namespace).items
    assert [d.metadata.name for d in deployments] == ["someone-else"]
    if holder == "no controller":
        # The object is removed: the refused Tenant's next try, within a minute, succeeds.
        core.delete_namespaced_config_map(publisher_name("taken"), job.namespace)
        job.wait_ready(["taken"], timeout=90)


def test_a_field_taken_by_a_gitops_apply_conflicts_then_is_restored_naming_the_manager(
    job: MainJob,
) -> None:
    core = client.CoreV1Api(job.api)
    name = publisher_name("synced")
    job.apply_tenants([tenant("synced", quotas={"batchSize": 70})])
    job.wait_ready(["synced"], timeout=60)
    assert batch_size(job, "synced") == 70

    # A GitOps tool applies its own version of one of the operator's fields, forcing
    # the field over to its manager.
    core.patch_namespaced_config_map(
        name,
        job.namespace,
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": job.namespace},
            "data": {TENANT_FILE: "tenants: {}\n"},
        },
        field_manager="gitops-sync",
        force=True,
        _content_type=APPLY,
    )

    assert wait_for(lambda: batch_size(job, "synced") == 70, timeout=30)
    log = (job.work_dir / "operator.log").read_text()
    # The operator's apply without force met the conflict, whose message names the
    # manager; only then, the ConfigMap being this Tenant's, it applied with force.
    restored = [
        line
        for line in log.splitlines()
        if f"ConfigMap {job.namespace}/{name} had fields changed by another manager" in line
    ]
    assert restored, log
    assert re.search(r'conflict with \\?"gitops-sync\\?"', restored[0]), restored[0]
    assert TENANT_FILE in restored[0]
    live = core.read_namespaced_config_map(name, job.namespace)
    assert TENANT_FILE in _fields_of(live, FIELD_MANAGER)
    assert TENANT_FILE not in _fields_of(live, "gitops-sync")


def test_every_child_is_applied_under_the_one_field_manager(job: MainJob) -> None:
    core, apps = client.CoreV1Api(job.api), client.AppsV1Api(job.api)
    job.apply_tenants([tenant("single", resourceQuota={"hard": {"pods": "2"}})])
    job.wait_ready(["single"], timeout=60)
    quota_name = (get(job, "single") or {})["status"]["children"]["resourceQuota"]
    name = publisher_name("single")

    children = {
        "Deployment": apps.read_namespaced_deployment(name, job.namespace),
        "ConfigMap": core.read_namespaced_config_map(name, job.namespace),
        "Service": core.read_namespaced_service(name, job.namespace),
        "ResourceQuota": core.read_namespaced_resource_quota(quota_name, job.namespace),
    }

    managers = {kind: _managers(obj) for kind, obj in children.items()}
    assert managers == {kind: {(FIELD_MANAGER, "Apply")} for kind in children}


def test_a_tenant_id_used_in_another_namespace_is_refused_and_its_delete_leaves_the_events(
    job: MainJob,
) -> None:
    # Tenant ids are global in the outbox: the older Tenant has it, wherever it lives.
    job.apply_tenants([tenant("owner-t")])
    job.wait_ready(["owner-t"], timeout=60)
    other = f"{job.namespace}-b"
    custom = client.CustomObjectsApi(job.api)
    client.CoreV1Api(job.api).create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=other))
    )
    copy = tenant("copy", deletionPolicy="Delete")
    copy["spec"]["tenantId"] = "owner-t"
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, other, "tenants", copy)

        def refused() -> dict[str, Any] | None:
            obj: dict[str, Any] = custom.get_namespaced_custom_object(  # type: ignore[assignment]
                GROUP, VERSION, other, "tenants", "copy"
            )
            ready = next(
                (
                    c
                    for c in (obj.get("status") or {}).get("conditions") or []
                    if c["type"] == "Ready"
                ),
                None,
            )
            return ready if ready and ready["reason"] == "TenantIdConflict" else None

        ready = wait_for(refused, timeout=60)
        assert ready is not None
        assert f"{job.namespace}/owner-t" in ready["message"]
        assert client.AppsV1Api(job.api).list_namespaced_deployment(other).items == []

        sessions = make_sessionmaker(job.engine)
        with sessions.begin() as session:
            for i in range(4):
                enqueue_event(
                    session, tenant_id="owner-t", topic="owner-t.orders", payload={"i": i}
                )
        custom.delete_namespaced_custom_object(GROUP, VERSION, other, "tenants", "copy")

        def gone() -> bool:
            try:
                custom.get_namespaced_custom_object(GROUP, VERSION, other, "tenants", "copy")
            except client.ApiException as exc:
                return exc.status == 404
            return False

        assert wait_for(gone, timeout=60)
        with job.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT count(*) FROM outbox_events WHERE tenant_id = 'owner-t'")
            ).scalar_one()
        assert rows == 4, "the refused Tenant's Delete removed the owner's events"
        assert has_condition(job, "owner-t", "Ready", "True", "ChildrenApplied")
    finally:
        clean_namespace(job.api, other)


@pytest.mark.parametrize("again", ["same name", "another name"])
def test_children_left_by_a_deleted_tenant_are_adopted_by_the_next_with_its_id(
    job: MainJob, again: str
) -> None:
    # A Tenant deleted with deletionPolicy Retain leaves its children to the garbage
    # collector (this stack has none, so they stay, as they do in a cluster until the
    # collector gets to them). A Tenant applied again with that tenant id, under the
    # same name (a new uid) or another, takes them over instead of being refused.
    custom, apps = client.CustomObjectsApi(job.api), client.AppsV1Api(job.api)
    job.apply_tenants([tenant("reborn", quotas={"batchSize": 40}, deletionPolicy="Retain")])
    job.wait_ready(["reborn"], timeout=60)
    old_uid = (get(job, "reborn") or {})["metadata"]["uid"]
    custom.delete_namespaced_custom_object(GROUP, VERSION, job.namespace, "tenants", "reborn")
    assert wait_for(lambda: get(job, "reborn") is None, timeout=30)
    left = apps.read_namespaced_deployment(publisher_name("reborn"), job.namespace)
    assert [o.uid for o in left.metadata.owner_references] == [old_uid]

    name = "reborn" if again == "same name" else "reborn-2"
    new = tenant(name, quotas={"batchSize": 60})
    new["spec"]["tenantId"] = "reborn"
    job.apply_tenants([new])
    job.wait_ready([name], timeout=60)

    new_uid = (get(job, name) or {})["metadata"]["uid"]
    assert new_uid != old_uid
    core = client.CoreV1Api(job.api)
    for child in (
        apps.read_namespaced_deployment(publisher_name("reborn"), job.namespace),
        core.read_namespaced_config_map(publisher_name("reborn"), job.namespace),
        core.read_namespaced_service(publisher_name("reborn"), job.namespace),
    ):
        assert [o.uid for o in child.metadata.owner_references] == [new_uid]
    assert batch_size(job, "reborn") == 60
    assert has_condition(job, name, "Ready", "True", "ChildrenApplied")
    log = (job.work_dir / "operator.log").read_text()
    assert f"(uid {old_uid}), which no longer exists; adopted by the Tenant of uid {new_uid}" in log
