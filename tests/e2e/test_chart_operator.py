"""The operator process itself under the chart's ServiceAccount, on a real API server
(RBAC on) and the stack's Postgres, run as the chart's Deployment declares it.

K-10: with exactly the chart's grants, a Tenant and its OutboxPolicy reach Ready with
every child, the status loop reports, and Events are posted; without the Events grant,
the same Tenant still reaches Ready. K-7: of two operators peering as the chart's HA
mode runs them, only the one of higher priority acts, each child is created once, and
the other takes over when it stops; a paused operator's background loop stands by too.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch
from somabrain_operator import peering
from somabrain_operator.__main__ import main  # noqa: F401  (K-18: import errors fail here)
from somabrain_operator.children import publisher_name, rule_name
from somabrain_operator.config import RULE_CRD

from tests.chart_support import write_service_account_kubeconfig
from tests.e2e.conftest import ChartCluster, OperatorProcess, Release
from tests.e2e.helpers import GROUP, PROMETHEUS_RULE_CRD, VERSION, clean_namespace, policy, tenant
from tests.support import wait_for

pytestmark = pytest.mark.e2e
RULES = ("monitoring.coreos.com", "v1", "prometheusrules")
# How long the tests give the operator to make a Tenant Ready (it takes a few seconds).
READY_TIMEOUT = 90.0


@pytest.fixture(scope="module")
def rule_crd(chart_cluster: ChartCluster) -> None:
    """The Prometheus Operator's PrometheusRule CRD, so that Tenants get every child."""
    ext = client.ApiextensionsV1Api(chart_cluster.api)
    try:
        ext.create_custom_resource_definition(PROMETHEUS_RULE_CRD)
    except client.ApiException as exc:
        if exc.status != 409:
            raise
    assert wait_for(
        lambda: any(
            c.type == "Established" and c.status == "True"
            for c in ext.read_custom_resource_definition(RULE_CRD).status.conditions or []
        ),
        timeout=30,
    )


@pytest.fixture
def namespace(chart_cluster: ChartCluster, rule_crd: None) -> Iterator[str]:
    """A namespace of the test's own for its Tenants (never deleted: no controller-manager
    would finish the deletion), emptied afterwards: tenant ids are global, and the next
    test's Tenants use the same ones."""
    name = f"op-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(chart_cluster.api).create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name))
    )
    yield name
    clean_namespace(chart_cluster.api, name)


def _service_account_kubeconfig(release: Release, tmp_path: Path) -> Path:
    return write_service_account_kubeconfig(
        release.cluster.kubeconfig,
        tmp_path / "operator.kubeconfig",
        namespace=release.namespace,
        name=release.service_account,
    )


def _apply(api: client.ApiClient, namespace: str, plural: str, obj: dict[str, Any]) -> None:
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, plural, obj["metadata"]["name"], obj,
        field_manager="e2e-user", force=True, _content_type="application/apply-patch+yaml",
    )  # fmt: skip


def _get(api: client.ApiClient, namespace: str, plural: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = client.CustomObjectsApi(api).get_namespaced_custom_object(  # type: ignore[assignment]
        GROUP, VERSION, namespace, plural, name
    )
    return found


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == kind), None)


def _ready(obj: dict[str, Any]) -> bool:
    ready = _condition(obj, "Ready")
    return (
        ready is not None
        and ready["status"] == "True"
        and ready.get("observedGeneration") == obj["metadata"]["generation"]
    )


def _children(api: client.ApiClient, namespace: str, tenant_id: str) -> dict[str, Any]:
    """The Tenant's children that exist, by kind."""
    name = publisher_name(tenant_id)
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    reads: dict[str, Callable[[], Any]] = {
        "Deployment": lambda: apps.read_namespaced_deployment(name, namespace).to_dict(),
        "ConfigMap": lambda: core.read_namespaced_config_map(name, namespace).to_dict(),
        "Service": lambda: core.read_namespaced_service(name, namespace).to_dict(),
        "PrometheusRule": lambda: client.CustomObjectsApi(api).get_namespaced_custom_object(
            *RULES[:2], namespace, RULES[2], rule_name(tenant_id)
        ),
    }
    found: dict[str, Any] = {}
    for kind, read in reads.items():
        try:
            found[kind] = read()
        except client.ApiException as exc:
            if exc.status != 404:
                raise
    return found


CHILD_KINDS = ("Deployment", "ConfigMap", "Service", "PrometheusRule")


def _wait_ready(
    api: client.ApiClient, namespace: str, names: list[str], operators: list[OperatorProcess]
) -> None:
    """Wait until every Tenant is Ready for its generation with all four children;
    fail at once, with its log, when an operator exits."""
    pending = set(names)
    deadline = time.monotonic() + READY_TIMEOUT
    while pending and time.monotonic() < deadline:
        for name in sorted(pending):
            if _ready(_get(api, namespace, "tenants", name)) and set(
                _children(api, namespace, name)
            ) == set(CHILD_KINDS):
                pending.discard(name)
        for operator in operators:
            assert operator.alive(), f"{operator.name} exited:\n{operator.log()[-4000:]}"
        time.sleep(0.5)
    logs = "\n".join(f"--- {o.name}\n{o.log()[-3000:]}" for o in operators)
    assert not pending, f"not Ready after {READY_TIMEOUT:.0f}s: {sorted(pending)}\n{logs}"


def _tenant_events(api: client.ApiClient, namespace: str, uid: str) -> list[client.CoreV1Event]:
    events = client.CoreV1Api(api).list_namespaced_event(namespace).items
    return [e for e in events if e.involved_object.uid == uid]


# --------------------------------------------------------------------------------------------
# K-10: the chart's grants are enough, and a refused Event is no failure
# --------------------------------------------------------------------------------------------


def test_operator_under_the_chart_s_service_account_makes_tenants_ready_with_children_and_events(
    install_chart: Callable[..., Release],
    database_secret: str,
    run_operator: Callable[..., OperatorProcess],
    namespace: str,
    tmp_path: Path,
) -> None:
    release = install_chart("--set", f"database.urlSecret.name={database_secret}")
    api = release.cluster.api
    operator = run_operator(release, _service_account_kubeconfig(release, tmp_path))
    operator.wait_started()
    _apply(api, namespace, "outboxpolicies", policy("standard", quotas={"batchSize": 50}))
    _apply(api, namespace, "tenants", tenant("acme", policyRef={"name": "standard"}))

    _wait_ready(api, namespace, ["acme"], [operator])

    uid = _get(api, namespace, "tenants", "acme")["metadata"]["uid"]
    for kind, child in _children(api, namespace, "acme").items():
        owners = (child.get("metadata") or {}).get("owner_references") or (
            child.get("metadata") or {}
        ).get("ownerReferences")
        assert [(o["uid"], o["controller"]) for o in owners] == [(uid, True)], kind
    # The status loop reads the database and writes status under the same identity.
    assert wait_for(
        lambda: (
            (_condition(_get(api, namespace, "tenants", "acme"), "PublisherAvailable") or {}).get(
                "reason"
            )
            == "NoReport"
        ),
        timeout=30,
    ), _get(api, namespace, "tenants", "acme")
    standard = _get(api, namespace, "outboxpolicies", "standard")
    assert (_condition(standard, "Ready") or {}).get("status") == "True"
    assert wait_for(
        lambda: _get(api, namespace, "outboxpolicies", "standard")["status"].get("tenants") == 1
    )
    events = _tenant_events(api, namespace, uid)
    assert any(e.source.component == "somabrain-operator" for e in events), events
    log = operator.log()
    assert "could not record event" not in log
    # No request of the operator was refused (the API server says "... is forbidden").
    assert "forbidden" not in log.lower(), log[-4000:]


def test_a_tenant_gets_ready_even_when_posting_events_is_forbidden(
    install_chart: Callable[..., Release],
    database_secret: str,
    run_operator: Callable[..., OperatorProcess],
    namespace: str,
    tmp_path: Path,
) -> None:
    release = install_chart("--set", f"database.urlSecret.name={database_secret}")
    api = release.cluster.api
    rbac = client.RbacAuthorizationV1Api(api)
    role = rbac.read_cluster_role(release.name)
    role.rules = [r for r in role.rules if "events" not in r.resources]
    rbac.replace_cluster_role(release.name, role)
    operator = run_operator(release, _service_account_kubeconfig(release, tmp_path))
    operator.wait_started()

    _apply(api, namespace, "tenants", tenant("muted"))

    _wait_ready(api, namespace, ["muted"], [operator])
    uid = _get(api, namespace, "tenants", "muted")["metadata"]["uid"]
    assert "could not record event" in operator.log()
    assert _tenant_events(api, namespace, uid) == []


# --------------------------------------------------------------------------------------------
# K-7: peering
# --------------------------------------------------------------------------------------------


class ChildWrites:
    """Every ADDED, MODIFIED and DELETED of the four child kinds in a namespace, from
    watches that start before anything is applied there."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
        custom = client.CustomObjectsApi(api)

        def rules(namespace: str, **kw: Any) -> Any:
            return custom.list_namespaced_custom_object(*RULES[:2], namespace, RULES[2], **kw)

        self.sources: dict[str, Callable[..., Any]] = {
            "Deployment": apps.list_namespaced_deployment,
            "ConfigMap": core.list_namespaced_config_map,
            "Service": core.list_namespaced_service,
            "PrometheusRule": rules,
        }
        self.namespace = namespace
        self.seen: list[tuple[str, str, str]] = []
        self.failures: list[str] = []
        self.stopped = threading.Event()
        self.threads: list[threading.Thread] = []

    def __enter__(self) -> ChildWrites:
        ready = threading.Barrier(len(self.sources) + 1)
        for kind, list_fn in self.sources.items():
            thread = threading.Thread(target=self._follow, args=(kind, list_fn, ready), daemon=True)
            thread.start()
            self.threads.append(thread)
        ready.wait(timeout=30)
        return self

    def __exit__(self, *_: object) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join(timeout=10)

    def _follow(self, kind: str, list_fn: Callable[..., Any], ready: threading.Barrier) -> None:
        listed = list_fn(self.namespace)
        version = _version(listed)
        ready.wait(timeout=30)
        try:
            while not self.stopped.is_set():
                for event in watch.Watch().stream(
                    list_fn, self.namespace, resource_version=version, timeout_seconds=1
                ):
                    obj = event["object"]
                    self.seen.append((kind, _name(obj), event["type"]))
                    version = _version(obj)
        except Exception as exc:  # a lost watch would hide writes: the test must fail
            self.failures.append(f"{kind}: {exc!r}")

    def of(self, kind: str, name: str) -> list[str]:
        """The changes seen to one object, in order."""
        assert self.failures == [], self.failures
        return [change for k, n, change in self.seen if (k, n) == (kind, name)]


def _version(obj: Any) -> str:
    meta = obj["metadata"] if isinstance(obj, dict) else obj.metadata
    return str(meta["resourceVersion"] if isinstance(meta, dict) else meta.resource_version)


def _name(obj: Any) -> str:
    return str(obj["metadata"]["name"] if isinstance(obj, dict) else obj.metadata.name)


def _child_names(tenant_id: str) -> list[tuple[str, str]]:
    return [
        (k, rule_name(tenant_id) if k == "PrometheusRule" else publisher_name(tenant_id))
        for k in CHILD_KINDS
    ]


def _peers(api: client.ApiClient, name: str) -> dict[str, Any]:
    try:
        obj = client.CustomObjectsApi(api).get_cluster_custom_object(
            peering.GROUP, peering.VERSION, peering.PLURAL, name
        )
    except client.ApiException as exc:
        if exc.status == 404:
            return {}
        raise
    return dict(obj.get("status") or {})  # type: ignore[union-attr]


def _joined(api: client.ApiClient, name: str, operators: list[OperatorProcess]) -> bool:
    """Whether every operator has logged its identity and recorded itself in the
    peering object."""
    peers = _peers(api, name)
    identities = [o.peer() for o in operators]
    return all(p is not None and p[0] in peers for p in identities)


ACTING = "status loop acting"
STANDING_BY = "status loop standing by"


def _loop_state(operator: OperatorProcess) -> str | None:
    """What the operator's background loop last logged it does: ACTING or STANDING_BY."""
    log = operator.log()
    last = {state: log.rfind(state) for state in (ACTING, STANDING_BY)}
    state, at = max(last.items(), key=lambda item: item[1])
    return state if at >= 0 else None


def test_of_two_peering_operators_only_the_higher_priority_one_acts_until_it_stops(
    install_chart: Callable[..., Release],
    database_secret: str,
    run_operator: Callable[..., OperatorProcess],
    namespace: str,
    tmp_path: Path,
) -> None:
    # The chart's HA mode: two replicas, each drawing its own priority.
    name = f"somabrain-{uuid.uuid4().hex[:6]}"
    release = install_chart(
        "--set", "peering.enabled=true", "--set", f"peering.name={name}", "--set", "replicas=2",
        "--set", f"database.urlSecret.name={database_secret}",
    )  # fmt: skip
    api = release.cluster.api
    kubeconfig = _service_account_kubeconfig(release, tmp_path)
    operators = [run_operator(release, kubeconfig, name=n) for n in ("replica-0", "replica-1")]
    for operator in operators:
        operator.wait_started()
    assert wait_for(lambda: _joined(api, name, operators), timeout=60), [o.log() for o in operators]
    leader, standby = sorted(operators, key=lambda o: -(o.peer() or ("", 0))[1])
    assert (leader.peer() or ("", 0))[1] > (standby.peer() or ("", 0))[1]
    assert wait_for(
        lambda: _loop_state(leader) == ACTING and _loop_state(standby) == STANDING_BY, timeout=30
    )
    tenants = [f"peer-{i}" for i in range(3)]

    with ChildWrites(api, namespace) as writes:
        _apply(api, namespace, "outboxpolicies", policy("shared", quotas={"batchSize": 20}))
        for t in tenants:
            _apply(api, namespace, "tenants", tenant(t, policyRef={"name": "shared"}))
        _wait_ready(api, namespace, tenants, operators)
        # A few ticks of both status loops, where a second actor would show.
        time.sleep(6)

        # Started together, the lower one never acted, not even on other tests' Tenants.
        assert standby.reconciles() == 0, standby.log()[-4000:]
        assert standby.status_writes() == 0
        assert leader.reconciles() >= len(tenants)
        assert {c: writes.of(*c) for t in tenants for c in _child_names(t)} == {
            c: ["ADDED"] for t in tenants for c in _child_names(t)
        }

        leader.stop()
        _apply(api, namespace, "tenants", tenant("after", policyRef={"name": "shared"}))

        _wait_ready(api, namespace, ["after"], [standby])
        assert standby.reconciles() > 0
        assert {c: writes.of(*c) for t in [*tenants, "after"] for c in _child_names(t)} == {
            c: ["ADDED"] for t in [*tenants, "after"] for c in _child_names(t)
        }


def test_an_operator_paused_by_a_higher_priority_peer_stops_its_background_loop(
    install_chart: Callable[..., Release],
    database_secret: str,
    run_operator: Callable[..., OperatorProcess],
    namespace: str,
    tmp_path: Path,
) -> None:
    name = f"somabrain-{uuid.uuid4().hex[:6]}"
    release = install_chart(
        "--set", "peering.enabled=true", "--set", f"peering.name={name}",
        "--set", f"database.urlSecret.name={database_secret}",
    )  # fmt: skip
    api = release.cluster.api
    kubeconfig = _service_account_kubeconfig(release, tmp_path)
    low = run_operator(release, kubeconfig, "--priority", "100", name="low")
    low.wait_started()
    _apply(api, namespace, "tenants", tenant("first"))
    _wait_ready(api, namespace, ["first"], [low])
    assert wait_for(lambda: _loop_state(low) == ACTING, timeout=30)

    high = run_operator(release, kubeconfig, "--priority", "200", name="high")
    high.wait_started()
    assert wait_for(
        lambda: _loop_state(high) == ACTING and _loop_state(low) == STANDING_BY, timeout=60
    )
    before = low.reconciles()
    # Each tick of a loop that acts reconciles a slice of the Tenants (the repair pass).
    time.sleep(8)

    assert low.reconciles() == before
    assert high.reconciles() > 0
