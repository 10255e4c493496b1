"""The operator's reconcile on the real API server and database: steady state, repair of
children, policy changes, optional CRDs, backlog in status, deletion policies
(cases K-2, K-3, K-4, K-5, K-6, K-8, K-11, K-18)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch
from somabrain_operator.children import TENANT_FILE, publisher_name, rule_name
from somabrain_operator.config import RULE_CRD

from devenv import common, stack
from devenv.mainjob import MainJob
from somabrain import enqueue_event
from somabrain.store.engine import make_sessionmaker
from tests.e2e.helpers import (
    GROUP,
    PROMETHEUS_RULE_CRD,
    VERSION,
    apply,
    batch_size,
    clean_up,
    exists,
    get,
    has_condition,
    operator_counter,
    policy,
    tenant,
)
from tests.support import wait_for

pytestmark = pytest.mark.e2e

# The status loop's interval for the operator of `job` (MainJob.start_operator).
STATUS_INTERVAL = 2.0


def _writes_during(job: MainJob, seconds: float) -> list[str]:
    """Every object written in the job's namespace during `seconds`, as 'kind name type'."""
    core, apps = client.CoreV1Api(job.api), client.AppsV1Api(job.api)
    custom = client.CustomObjectsApi(job.api)
    ns = job.namespace

    def custom_list(plural: str) -> Callable[..., Any]:
        def list_fn(namespace: str, **kw: Any) -> Any:
            return custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural, **kw)

        return list_fn

    sources: dict[str, Callable[..., Any]] = {
        "Tenant": custom_list("tenants"),
        "OutboxPolicy": custom_list("outboxpolicies"),
        "Deployment": apps.list_namespaced_deployment,
        "ConfigMap": core.list_namespaced_config_map,
        "Service": core.list_namespaced_service,
        "ResourceQuota": core.list_namespaced_resource_quota,
        "Event": core.list_namespaced_event,
    }
    seen: list[str] = []

    def follow(kind: str, list_fn: Callable[..., Any]) -> None:
        listed = list_fn(ns)
        version = (
            listed["metadata"]["resourceVersion"]
            if isinstance(listed, dict)
            else listed.metadata.resource_version
        )
        stream = watch.Watch().stream(
            list_fn, ns, resource_version=version, timeout_seconds=int(seconds)
        )
        for event in stream:
            obj = event["object"]
            name = obj["metadata"]["name"] if isinstance(obj, dict) else obj.metadata.name
            seen.append(f"{kind} {name} {event['type']}")

    threads = [threading.Thread(target=follow, args=item, daemon=True) for item in sources.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    return seen


def test_steady_state_makes_no_writes_for_a_minute(job: MainJob) -> None:
    # K-2, K-3: with nothing changing, no object is written, not even status.
    # A refused Tenant too: its retries (every 60 s, so one falls in the window) write
    # nothing while nothing changes.
    apply(job, "outboxpolicies", policy("standard", quotas={"batchSize": 50}))
    client.CoreV1Api(job.api).create_namespaced_config_map(
        job.namespace, {"metadata": {"name": publisher_name("steady-c")}, "data": {"x": "y"}}
    )
    job.apply_tenants(
        [
            tenant("steady-a", policyRef={"name": "standard"}),
            tenant("steady-b", resourceQuota={"hard": {"pods": "4"}}),
            tenant("steady-c"),
        ]
    )
    job.wait_ready(["steady-a", "steady-b"], timeout=60)
    assert wait_for(lambda: has_condition(job, "steady-c", "Ready", "False", "ChildNameTaken"))
    # Settled: the status loop has reported on both (no publisher runs here).
    for name in ("steady-a", "steady-b", "steady-c"):
        assert wait_for(
            lambda n=name: has_condition(job, n, "PublisherAvailable", "False", "NoReport"),
            timeout=30,
        )
    assert wait_for(
        lambda: (
            ((get(job, "standard", "outboxpolicies") or {}).get("status") or {}).get("tenants") == 1
        ),
        timeout=30,
    ), get(job, "standard", "outboxpolicies")
    time.sleep(5)

    writes = _writes_during(job, 60)

    assert writes == [], f"writes in steady state: {writes}"


WRITES = ("POST", "PUT", "PATCH", "DELETE")


def test_repairs_of_converged_tenants_send_no_write_request(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    # K-2, K-3, stricter than counting watch events: a write that changes nothing, or
    # is refused, makes no event but is still a request the API server must serve.
    job = MainJob(stack_env, work_dir=tmp_path, namespace=f"e2e-{uuid.uuid4().hex[:8]}")
    job.prepare([])
    port = common.free_port()
    # Every Tenant visited by the repair pass every 4 s.
    job.start_operator(
        "--metrics-port", str(port), env={"SOMABRAIN_OPERATOR_REPAIR_INTERVAL_SECONDS": "4"}
    )
    try:
        job.apply_tenants(
            [
                tenant("quiet-a", resourceQuota={"hard": {"pods": "4"}}),
                tenant("quiet-b", publisher={"mode": "shared", "pool": "quiet"}),
                tenant("quiet-c", publisher={"mode": "shared", "pool": "quiet"}),
            ]
        )
        job.wait_ready(["quiet-a", "quiet-b", "quiet-c"], timeout=60)
        time.sleep(8)  # the status loop's first reports written
        repairs = operator_counter(port, "somabrain_operator_reconciles_total", trigger="repair")
        writes = operator_counter(port, "somabrain_operator_api_requests_total", method=WRITES)

        time.sleep(20)

        repaired = (
            operator_counter(port, "somabrain_operator_reconciles_total", trigger="repair")
            - repairs
        )
        written = (
            operator_counter(port, "somabrain_operator_api_requests_total", method=WRITES) - writes
        )
        assert repaired >= 6, f"only {repaired} repair visits in 20 s"
        assert written == 0, f"{written} write requests in {repaired} repair visits"
    finally:
        job.stop_operator()
        clean_up(job)
        job.stop()


def test_a_child_deleted_or_edited_by_hand_is_restored(job: MainJob) -> None:
    job.apply_tenants([tenant("repair", quotas={"batchSize": 70})])
    job.wait_ready(["repair"], timeout=60)
    core = client.CoreV1Api(job.api)
    name = publisher_name("repair")

    core.delete_namespaced_service(name, job.namespace)
    assert wait_for(lambda: exists(lambda: core.read_namespaced_service(name, job.namespace)))

    edited = core.read_namespaced_config_map(name, job.namespace)
    edited.data[TENANT_FILE] = "tenants: {}\n"
    core.replace_namespaced_config_map(name, job.namespace, edited)
    assert wait_for(lambda: batch_size(job, "repair") == 70, timeout=30)


def test_policy_change_reconciles_exactly_the_tenants_that_reference_it(job: MainJob) -> None:
    apply(job, "outboxpolicies", policy("gold", quotas={"batchSize": 10}))
    apply(job, "outboxpolicies", policy("silver", quotas={"batchSize": 20}))
    job.apply_tenants(
        [
            tenant("gold-a", policyRef={"name": "gold"}),
            tenant("gold-b", policyRef={"name": "gold"}),
            tenant("silver-a", policyRef={"name": "silver"}),
        ]
    )
    job.wait_ready(["gold-a", "gold-b", "silver-a"], timeout=60)
    core = client.CoreV1Api(job.api)
    silver_version = core.read_namespaced_config_map(
        publisher_name("silver-a"), job.namespace
    ).metadata.resource_version

    apply(job, "outboxpolicies", policy("gold", quotas={"batchSize": 11}))

    assert wait_for(lambda: batch_size(job, "gold-a") == 11 and batch_size(job, "gold-b") == 11)
    silver = core.read_namespaced_config_map(publisher_name("silver-a"), job.namespace)
    assert silver.metadata.resource_version == silver_version
    assert batch_size(job, "silver-a") == 20


def test_a_tenant_whose_policy_is_missing_waits_then_follows_it(job: MainJob) -> None:
    job.apply_tenants([tenant("late", policyRef={"name": "late-policy"})])

    assert wait_for(lambda: has_condition(job, "late", "Ready", "False", "PolicyNotFound"))
    assert batch_size(job, "late") is None

    apply(job, "outboxpolicies", policy("late-policy", quotas={"batchSize": 33}))
    assert wait_for(lambda: batch_size(job, "late") == 33)
    assert wait_for(lambda: has_condition(job, "late", "Ready", "True", "ChildrenApplied"))


def test_a_deleted_policy_is_reported_by_its_tenants_at_once_and_they_keep_their_children(
    job: MainJob,
) -> None:
    # K-6: the policy has no finalizer, so its DELETED event is all the operator sees.
    apply(job, "outboxpolicies", policy("brief", quotas={"batchSize": 44}))
    job.apply_tenants([tenant("follower", policyRef={"name": "brief"})])
    job.wait_ready(["follower"], timeout=60)

    client.CustomObjectsApi(job.api).delete_namespaced_custom_object(
        GROUP, VERSION, job.namespace, "outboxpolicies", "brief"
    )

    # Well within the repair interval (an hour): the policy's own event did it.
    assert wait_for(
        lambda: has_condition(job, "follower", "Ready", "False", "PolicyNotFound"), timeout=20
    ), get(job, "follower")
    assert batch_size(job, "follower") == 44
    apply(job, "outboxpolicies", policy("brief", quotas={"batchSize": 45}))
    assert wait_for(lambda: batch_size(job, "follower") == 45)
    assert wait_for(lambda: has_condition(job, "follower", "Ready", "True", "ChildrenApplied"))


def test_rapid_successive_edits_converge_on_the_last_spec(job: MainJob) -> None:
    # K-8: one reconcile reads the spec as it is; the last edit wins.
    for size in range(1, 11):
        job.apply_tenants([tenant("rapid", quotas={"batchSize": size * 10})])

    assert wait_for(lambda: batch_size(job, "rapid") == 100)
    assert wait_for(
        lambda: (
            (get(job, "rapid") or {}).get("status", {}).get("observedGeneration")
            == (get(job, "rapid") or {})["metadata"]["generation"]
        )
    )


def test_without_the_prometheus_rule_crd_a_condition_says_so_and_it_recovers(
    job: MainJob,
) -> None:
    # K-11: every other child exists; the rules come once the CRD is installed.
    ext = client.ApiextensionsV1Api(job.api)
    assert not exists(lambda: ext.read_custom_resource_definition(RULE_CRD))
    job.apply_tenants([tenant("alerting", alerts={"labels": {"team": "payments"}})])
    job.wait_ready(["alerting"], timeout=60)
    assert wait_for(
        lambda: has_condition(
            job, "alerting", "AlertsConfigured", "False", "PrometheusRuleCRDMissing"
        )
    )
    custom = client.CustomObjectsApi(job.api)
    try:
        ext.create_custom_resource_definition(PROMETHEUS_RULE_CRD)

        assert wait_for(
            lambda: has_condition(job, "alerting", "AlertsConfigured", "True", "RulesApplied"),
            timeout=60,
        )
        rule = custom.get_namespaced_custom_object(
            "monitoring.coreos.com",
            "v1",
            job.namespace,
            "prometheusrules",
            rule_name("alerting"),
        )
        assert rule["metadata"]["labels"]["team"] == "payments"  # type: ignore[index]
        rules = rule["spec"]["groups"][0]["rules"]  # type: ignore[index]
        assert {r["labels"]["tenant"] for r in rules} == {"alerting"}
    finally:
        ext.delete_custom_resource_definition(RULE_CRD)
        wait_for(lambda: not exists(lambda: ext.read_custom_resource_definition(RULE_CRD)))


def test_backlog_and_publisher_availability_come_from_the_publishers_reports(
    job: MainJob,
) -> None:
    job.apply_tenants([tenant("reporting")])
    job.wait_ready(["reporting"], timeout=60)
    assert wait_for(
        lambda: has_condition(job, "reporting", "PublisherAvailable", "False", "NoReport")
    )
    sessions = make_sessionmaker(job.engine)
    with sessions.begin() as session:
        for i in range(5):
            enqueue_event(
                session, tenant_id="reporting", topic="reporting.orders", payload={"i": i}
            )

    assert job.start_publishers() == 1
    assert wait_for(
        lambda: has_condition(job, "reporting", "PublisherAvailable", "True", "Reporting"),
        timeout=60,
    )
    assert wait_for(
        lambda: (
            ((get(job, "reporting") or {}).get("status") or {}).get("backlog", {}).get("pending")
            == 0
        ),
        timeout=60,
    )
    backlog = (get(job, "reporting") or {})["status"]["backlog"]
    assert backlog["circuit"] == "closed"

    job.runner.stop_all()
    assert wait_for(
        lambda: has_condition(job, "reporting", "PublisherAvailable", "False", "ReportStale"),
        timeout=60,
    )

    # The publisher starting and stopping are Events of the Tenant; its first NoReport,
    # when it was created, is not.
    def reasons() -> list[str]:
        events = client.CoreV1Api(job.api).list_namespaced_event(job.namespace).items
        return [e.reason for e in events if e.involved_object.name == "reporting"]

    assert wait_for(lambda: {"Reporting", "ReportStale"} <= set(reasons()), timeout=15), reasons()
    assert "NoReport" not in reasons()


def test_retain_tenant_has_no_finalizer_and_goes_at_once_leaving_its_events(
    job: MainJob,
) -> None:
    # K-5: no finalizer where cleanup does not need one.
    job.apply_tenants([tenant("keeper", deletionPolicy="Retain")])
    job.wait_ready(["keeper"], timeout=60)
    before = _rows(job, "keeper")  # a kept stack may hold an earlier run's
    _enqueue(job, "keeper", 3)
    assert not ((get(job, "keeper") or {})["metadata"].get("finalizers"))

    client.CustomObjectsApi(job.api).delete_namespaced_custom_object(
        GROUP, VERSION, job.namespace, "tenants", "keeper"
    )

    assert wait_for(lambda: get(job, "keeper") is None, timeout=10)
    assert _rows(job, "keeper") == before + 3


def _children(job: MainJob, tenant_id: str) -> dict[str, str | None]:
    """The controller uid of each of the tenant's children, None for those missing."""
    core, apps = client.CoreV1Api(job.api), client.AppsV1Api(job.api)
    name = publisher_name(tenant_id)
    reads = {
        "Deployment": lambda: apps.read_namespaced_deployment(name, job.namespace),
        "ConfigMap": lambda: core.read_namespaced_config_map(name, job.namespace),
        "Service": lambda: core.read_namespaced_service(name, job.namespace),
    }
    found: dict[str, str | None] = {}
    for kind, read in reads.items():
        try:
            owners = read().metadata.owner_references or []
        except client.ApiException as exc:
            if exc.status != 404:
                raise
            found[kind] = None
            continue
        found[kind] = next((o.uid for o in owners if o.controller), "")
    return found


def test_nothing_acts_on_a_deleted_tenant_nor_on_its_namesake_for_it(job: MainJob) -> None:
    # K-4: the status loop and the child watches act on the Tenants the index holds
    # now. A body kept past deletion would show: its repair re-creates the children
    # deleted below, or, against the Tenant re-created under the same name, writes a
    # TenantIdConflict status and Event.
    custom = client.CustomObjectsApi(job.api)
    job.apply_tenants([tenant("gone", deletionPolicy="Retain", quotas={"batchSize": 10})])
    job.wait_ready(["gone"], timeout=60)
    assert wait_for(lambda: has_condition(job, "gone", "PublisherAvailable", "False", "NoReport"))
    old_uid = (get(job, "gone") or {})["metadata"]["uid"]

    custom.delete_namespaced_custom_object(GROUP, VERSION, job.namespace, "tenants", "gone")
    assert wait_for(lambda: get(job, "gone") is None, timeout=10)
    # No garbage collector runs on this API server: delete the children as it would.
    core, apps = client.CoreV1Api(job.api), client.AppsV1Api(job.api)
    apps.delete_namespaced_deployment(publisher_name("gone"), job.namespace)
    core.delete_namespaced_config_map(publisher_name("gone"), job.namespace)
    core.delete_namespaced_service(publisher_name("gone"), job.namespace)
    time.sleep(3 * STATUS_INTERVAL)
    assert _children(job, "gone") == dict.fromkeys(("Deployment", "ConfigMap", "Service"))

    job.apply_tenants([tenant("gone", deletionPolicy="Retain", quotas={"batchSize": 20})])
    job.wait_ready(["gone"], timeout=60)
    new_uid = (get(job, "gone") or {})["metadata"]["uid"]
    assert new_uid != old_uid
    assert wait_for(lambda: has_condition(job, "gone", "PublisherAvailable", "False", "NoReport"))
    time.sleep(STATUS_INTERVAL)

    # The repair pass takes one Tenant of the cluster per tick: watch for long enough
    # that it reaches every body the operator could hold.
    tenants = custom.list_cluster_custom_object(GROUP, VERSION, "tenants")["items"]  # type: ignore[index]
    writes = _writes_during(job, (len(tenants) + 3) * STATUS_INTERVAL)

    assert writes == [], f"written after the deletion: {writes}"
    assert has_condition(job, "gone", "Ready", "True", "ChildrenApplied")
    assert _children(job, "gone") == dict.fromkeys(("Deployment", "ConfigMap", "Service"), new_uid)
    assert batch_size(job, "gone") == 20


def test_drain_tenant_waits_for_its_backlog_before_it_goes(job: MainJob) -> None:
    # K-6: the cleanup happens before the Tenant disappears.
    job.apply_tenants([tenant("drainer", deletionPolicy="Drain")])
    job.wait_ready(["drainer"], timeout=60)
    assert wait_for(lambda: (get(job, "drainer") or {})["metadata"].get("finalizers"))
    _enqueue(job, "drainer", 20)

    client.CustomObjectsApi(job.api).delete_namespaced_custom_object(
        GROUP, VERSION, job.namespace, "tenants", "drainer"
    )

    assert wait_for(lambda: has_condition(job, "drainer", "Ready", "False", "Draining"))
    time.sleep(3)
    assert get(job, "drainer") is not None, "gone before its events were delivered"
    assert job.start_publishers() == 1
    assert wait_for(lambda: get(job, "drainer") is None, timeout=90)
    assert _pending(job, "drainer") == 0


def test_delete_tenant_removes_its_events_before_it_goes(job: MainJob) -> None:
    job.apply_tenants([tenant("doomed", deletionPolicy="Delete")])
    job.wait_ready(["doomed"], timeout=60)
    assert wait_for(lambda: (get(job, "doomed") or {})["metadata"].get("finalizers"))
    _enqueue(job, "doomed", 12)

    client.CustomObjectsApi(job.api).delete_namespaced_custom_object(
        GROUP, VERSION, job.namespace, "tenants", "doomed"
    )

    assert wait_for(lambda: get(job, "doomed") is None, timeout=90)
    assert _rows(job, "doomed") == 0
    assert not exists(
        lambda: client.AppsV1Api(job.api).read_namespaced_deployment(
            publisher_name("doomed"), job.namespace
        )
    )


def _enqueue(job: MainJob, tenant: str, count: int) -> None:
    sessions = make_sessionmaker(job.engine)
    with sessions.begin() as session:
        for i in range(count):
            enqueue_event(session, tenant_id=tenant, topic=f"{tenant}.orders", payload={"i": i})


def _rows(job: MainJob, tenant: str) -> int:
    from sqlalchemy import text

    with job.engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM outbox_events WHERE tenant_id = :t"), {"t": tenant}
            ).scalar_one()
        )


def _pending(job: MainJob, tenant: str) -> int:
    from sqlalchemy import text

    with job.engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM outbox_events WHERE tenant_id = :t AND status = 'pending'"
                ),
                {"t": tenant},
            ).scalar_one()
        )


def test_operator_without_its_crds_stops_at_once_saying_what_to_apply(
    tmp_path: Path, stack_env: dict[str, str]
) -> None:
    # K-11 (own CRDs) and K-18 (a failing operator never hangs the test): a bare API
    # server of its own, without the somabrain.io CRDs.
    bare = tmp_path / "bare-stack"
    env = stack.environment(stack.up(bare, only=("kube",)))
    try:
        job = MainJob(
            {**stack_env, "KUBECONFIG": env["KUBECONFIG"]}, work_dir=tmp_path, namespace="x"
        )
        pid = job.start_operator()
        assert wait_for(lambda: not common.pid_alive(pid), timeout=60), "operator kept running"
        log = (tmp_path / "operator.log").read_text()
        assert "tenants.somabrain.io" in log
        assert "kubectl apply -f crds/" in log
        job.stop()
    finally:
        stack.down(bare)
