"""The operator's Helm chart as helm lints and renders it (no cluster needed).

Installing, upgrading and the ServiceAccount's permissions on a real API server are in
tests/e2e/test_chart.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.chart_support import (
    CHART,
    OPERATOR_RULES,
    PEERING_RULES,
    ROOT,
    Helm,
    container_env,
    only,
    permissions,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def helm(helm_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(helm_binary, home=tmp_path_factory.mktemp("helm"))


def test_chart_passes_helm_lint_strict(helm: Helm) -> None:
    linted = helm.run("lint", "--strict", str(CHART), check=False)

    assert linted.returncode == 0, linted.stdout + linted.stderr
    assert "0 chart(s) failed" in linted.stdout


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("replicas=-1", "at '/replicas': minimum: got -1, want 0"),
        # K-7: two operators that do not peer would both act.
        ("replicas=2", "at '/replicas': maximum: got 2, want 1"),
        ("replica=1", "additional properties 'replica' not allowed"),
        ("image.pullPolicy=Sometimes", "at '/image/pullPolicy'"),
        ("publisher.connectionSecret=Not_A_Name", "at '/publisher/connectionSecret'"),
        # K-12: labels the PrometheusRules could never carry.
        ("prometheusRule.labels.te@m=payments", "at '/prometheusRule/labels': additional"),
        ("prometheusRule.labels.team=pay@", "at '/prometheusRule/labels/team'"),
        ("crds.install=maybe", "at '/crds/install'"),
    ],
    ids=["negative-replicas", "replicas-without-peering", "unknown-key", "pull-policy",
         "secret-name", "label-name", "label-value", "not-a-boolean"],
)  # fmt: skip
def test_helm_lint_refuses_a_value_against_the_schema_naming_the_field(
    helm: Helm, value: str, named: str
) -> None:
    linted = helm.run("lint", "--strict", str(CHART), "--set", value, check=False)

    assert linted.returncode != 0, linted.stdout
    assert named in linted.stdout + linted.stderr


def test_chart_runs_one_operator_replaced_by_recreate(helm: Helm) -> None:
    deployment = only(helm.template(), "Deployment")

    # K-7: one replica, and an upgrade stops the old pod before starting the new one.
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["somabrain-operator"]
    assert container["image"] == "somabrain:0.1.0"
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "somabrain-operator"


def test_more_than_one_replica_is_refused_until_the_operator_peers(helm: Helm) -> None:
    refused = helm.run(
        "template", str(CHART), "--set", "peering.enabled=true", "--set", "replicas=2",
        check=False,
    )  # fmt: skip

    assert refused.returncode != 0
    assert "replicas: 2 operators would all reconcile every Tenant" in refused.stderr
    assert "does not run with Kopf peering yet" in refused.stderr


def test_rule_labels_reach_the_operator_as_json(helm: Helm) -> None:
    # K-12: the labels a Prometheus's ruleSelector matches, on every PrometheusRule.
    labels = {"release": "kube-prometheus-stack", "example.com/team": "payments"}

    default = container_env(only(helm.template(), "Deployment"))
    labelled = container_env(
        only(
            helm.template("--set-json", f"prometheusRule.labels={json.dumps(labels)}"), "Deployment"
        )
    )

    assert json.loads(default["SOMABRAIN_OPERATOR_RULE_LABELS"]) == {}
    assert json.loads(labelled["SOMABRAIN_OPERATOR_RULE_LABELS"]) == labels


def test_operator_settings_reach_its_environment(helm: Helm) -> None:
    default = container_env(only(helm.template(), "Deployment"))
    custom = container_env(
        only(
            helm.template(
                "--set", "publisher.image=registry.example/somabrain-publisher:1.2",
                "--set", "publisher.connectionSecret=outbox-connection",
                "--set", "database.urlSecret.name=operator-db",
                "--set", "database.urlSecret.key=url",
            ),
            "Deployment",
        )
    )  # fmt: skip

    # Publishers run the operator's own image unless told otherwise.
    assert default["SOMABRAIN_OPERATOR_PUBLISHER_IMAGE"] == "somabrain:0.1.0"
    assert default["SOMABRAIN_OPERATOR_CONNECTION_SECRET"] == "somabrain-connection"
    assert "SOMABRAIN_OPERATOR_DATABASE_URL" not in default
    assert (
        custom["SOMABRAIN_OPERATOR_PUBLISHER_IMAGE"] == "registry.example/somabrain-publisher:1.2"
    )
    assert custom["SOMABRAIN_OPERATOR_CONNECTION_SECRET"] == "outbox-connection"
    assert custom["SOMABRAIN_OPERATOR_DATABASE_URL"] == {
        "secretKeyRef": {"name": "operator-db", "key": "url"}
    }


def test_cluster_role_grants_exactly_what_the_operator_needs(helm: Helm) -> None:
    default = only(helm.template(), "ClusterRole")["rules"]
    peering = only(helm.template("--set", "peering.enabled=true"), "ClusterRole")["rules"]

    assert permissions(default) == permissions(OPERATOR_RULES)
    assert permissions(peering) == permissions(OPERATOR_RULES + PEERING_RULES)
    assert all(not rule.get("resourceNames") for rule in default + peering)


def test_cluster_role_is_bound_to_the_chart_s_service_account(helm: Helm) -> None:
    objects = helm.template(namespace="ops")
    binding = only(objects, "ClusterRoleBinding")

    assert binding["roleRef"]["name"] == only(objects, "ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "somabrain-operator", "namespace": "ops"}
    ]
    assert only(objects, "ServiceAccount")["metadata"]["namespace"] == "ops"


def test_chart_renders_the_crds_of_the_crds_folder_unless_told_not_to(helm: Helm) -> None:
    committed = {
        doc["metadata"]["name"]: doc
        for path in sorted((ROOT / "crds").glob("*.yaml"))
        for doc in [yaml.safe_load(Path(path).read_text())]
    }

    rendered = [o for o in helm.template() if o["kind"] == "CustomResourceDefinition"]
    skipped = [
        o
        for o in helm.template("--set", "crds.install=false")
        if o["kind"] == "CustomResourceDefinition"
    ]

    assert {crd["metadata"]["name"]: crd for crd in rendered} == committed
    # K-15: whatever a release does, Helm never deletes them.
    assert all(
        crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for crd in rendered
    )
    assert skipped == []
