"""The operator's Helm chart as helm lints and renders it (no cluster needed).

Installing, upgrading and the ServiceAccount's permissions on a real API server are in
tests/e2e/test_chart.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from somabrain_operator import peering
from somabrain_operator.config import OperatorSettings
from somabrain_operator.crds import PEERING_FILE

from somabrain.config.settings import AdminSettings
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
        # Peers of equal priority all pause: replicas must draw their own.
        ("peering.enabled=true,replicas=2,peering.priority=5", "at '/peering/priority'"),
        ("peering.priority=high", "at '/peering/priority'"),
        ("settings.repairInterval=60", "at '/settings': additional properties 'repairInterval'"),
        ("settings.drainTimeoutSeconds=0", "at '/settings/drainTimeoutSeconds'"),
        ("logLevel=loud", "at '/logLevel'"),
        ("metrics.port=70000", "at '/metrics/port'"),
        ("admin.tokensSecret=Admin_Tokens", "at '/admin/tokensSecret'"),
        ("admin.connectionSecret=Not_A_Name", "at '/admin/connectionSecret'"),
        ("admin.port=0", "at '/admin/port'"),
        ("admin.logLevel=loud", "at '/admin/logLevel'"),
        ("admin.service.type=ExternalName", "at '/admin/service/type'"),
        ("admin.ingress=true", "at '/admin': additional properties 'ingress'"),
    ],
    ids=["negative-replicas", "replicas-without-peering", "unknown-key", "pull-policy",
         "secret-name", "label-name", "label-value", "not-a-boolean", "shared-priority",
         "priority-not-a-number", "unknown-setting", "zero-timeout", "log-level",
         "metrics-port", "admin-tokens-secret-name", "admin-connection-secret-name",
         "admin-port", "admin-log-level", "admin-service-type", "admin-unknown-key"],
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
    # Standalone: no peering arguments.
    assert container["args"] == ["--log-level", "info", "--metrics-port", "8080"]
    assert container["image"] == "somabrain:0.1.0"
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "somabrain-operator"


def _args(deployment: dict[str, Any]) -> list[str]:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    args: list[str] = container.get("args", [])
    return args


def test_peering_passes_its_name_and_priority_to_the_operator(helm: Helm) -> None:
    named = only(
        helm.template(
            "--set", "peering.enabled=true", "--set", "peering.name=payments-operators",
            "--set", "peering.priority=100",
        ),
        "Deployment",
    )  # fmt: skip
    drawn = only(helm.template("--set", "peering.enabled=true"), "Deployment")

    assert _args(named)[-4:] == ["--peering", "payments-operators", "--priority", "100"]
    # No priority: each process draws its own.
    assert _args(drawn)[-2:] == ["--peering", "somabrain-operator"]
    assert "--priority" not in _args(drawn)


def test_replicas_with_peering_draw_their_own_priorities_and_roll(helm: Helm) -> None:
    deployment = only(
        helm.template("--set", "peering.enabled=true", "--set", "replicas=3"), "Deployment"
    )

    assert deployment["spec"]["replicas"] == 3
    assert _args(deployment)[-2:] == ["--peering", "somabrain-operator"]
    # Peers never act at once, so new pods may start beside the old ones.
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate"}


def test_kopf_s_peering_crd_is_installed_only_with_peering(helm: Helm) -> None:
    def crds(*options: str) -> list[str]:
        return [
            o["metadata"]["name"]
            for o in helm.template(*options)
            if o["kind"] == "CustomResourceDefinition"
        ]

    committed = yaml.safe_load((CHART / "files" / "peering-crds" / PEERING_FILE).read_text())
    with_peering = [
        o
        for o in helm.template("--set", "peering.enabled=true")
        if o["metadata"]["name"] == peering.CRD_NAME
    ]

    assert peering.CRD_NAME not in crds()
    assert with_peering == [committed]
    assert committed["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert peering.CRD_NAME not in crds(
        "--set", "peering.enabled=true", "--set", "peering.installCRD=false"
    )


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


def _schema_settings() -> dict[str, Any]:
    schema = json.loads((CHART / "values.schema.json").read_text())
    settings: dict[str, Any] = schema["properties"]["settings"]["properties"]
    return settings


def test_chart_can_set_every_operator_setting(helm: Helm) -> None:
    # Set elsewhere in the values: publisher.image, publisher.connectionSecret,
    # prometheusRule.labels, database.urlSecret.
    elsewhere = {"publisher_image", "connection_secret", "rule_labels", "database_url"}
    from_settings = {re.sub(r"(?<!^)([A-Z])", r"_\1", k).lower() for k in _schema_settings()}

    assert from_settings == set(OperatorSettings.model_fields) - elsewhere


def test_settings_reach_the_operator_as_the_values_it_reads(
    helm: Helm, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = {
        "statusIntervalSeconds": 2.5,
        "repairIntervalSeconds": 7200,
        "publisherReportMaxAgeSeconds": 45,
        "drainTimeoutSeconds": 120,
        # Large enough that Helm's float64 would print 2e+06 as a string.
        "watchServerTimeoutSeconds": 2000000,
        "watchClientTimeoutSeconds": 2000030.5,
        "apiRequestTimeoutSeconds": 20,
        "publisherMetricsPort": 9500,
    }
    env = container_env(
        only(helm.template("--set-json", f"settings={json.dumps(values)}"), "Deployment")
    )

    for name, value in env.items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    read = OperatorSettings()
    assert read.status_interval_seconds == 2.5
    assert read.repair_interval_seconds == 7200
    assert read.publisher_report_max_age_seconds == 45
    assert read.drain_timeout_seconds == 120
    assert read.watch_server_timeout_seconds == 2000000
    assert read.watch_client_timeout_seconds == 2000030.5
    assert read.api_request_timeout_seconds == 20
    assert read.publisher_metrics_port == 9500


def test_operator_metrics_port_and_log_level_are_passed_and_can_be_turned_off(
    helm: Helm,
) -> None:
    quiet = only(
        helm.template("--set", "logLevel=warning", "--set", "metrics.port=0"), "Deployment"
    )
    [container] = only(helm.template(), "Deployment")["spec"]["template"]["spec"]["containers"]

    assert container["ports"] == [{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}]
    assert _args(quiet) == ["--log-level", "warning"]
    assert "ports" not in quiet["spec"]["template"]["spec"]["containers"][0]


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


# --------------------------------------------------------------------------------------------
# The admin API (somabrain admin serve)
# --------------------------------------------------------------------------------------------

ADMIN = ("--set", "admin.enabled=true", "--set", "admin.tokensSecret=admin-tokens")
ADMIN_NAME = "somabrain-operator-admin"


def _named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def _admin_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    pod = _named(objects, "Deployment", ADMIN_NAME)["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert isinstance(container, dict)
    return container


def _read_by_admin_settings() -> set[str]:
    """Every environment variable AdminSettings reads."""
    names = set()
    for name, field in AdminSettings.model_fields.items():
        alias = field.validation_alias
        choices = getattr(alias, "choices", None)
        names |= set(choices) if choices else {f"SOMABRAIN_{name.upper()}"}
    return names


def test_chart_with_the_admin_api_passes_helm_lint_strict(helm: Helm) -> None:
    linted = helm.run("lint", "--strict", str(CHART), *ADMIN, check=False)

    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_admin_api_is_not_installed_by_default(helm: Helm) -> None:
    objects = helm.template()

    assert [o for o in objects if "admin" in o["metadata"]["name"]] == []
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "Deployment"] == [
        "somabrain-operator"
    ]
    assert [o for o in objects if o["kind"] == "Service"] == []
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"] == [
        "somabrain-operator"
    ]


def test_admin_api_runs_admin_serve_with_the_tokens_secret_mounted_read_only(
    helm: Helm,
) -> None:
    objects = helm.template(*ADMIN)
    deployment = _named(objects, "Deployment", ADMIN_NAME)
    pod = deployment["spec"]["template"]["spec"]
    container = _admin_container(objects)
    operator_pod = only(
        [o for o in objects if o["metadata"]["name"] == "somabrain-operator"], "Deployment"
    )["spec"]["template"]["spec"]

    assert deployment["spec"]["replicas"] == 1
    assert container["command"] == ["somabrain", "admin", "serve"]
    assert container["args"] == ["--log-level", "info"]
    # The operator's image, as publishers get it.
    assert container["image"] == "somabrain:0.1.0"
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "tokens"]
    # Mounted whole (no subPath), so a rotated Secret reaches the file.
    assert mount == {"name": "tokens", "mountPath": "/etc/somabrain/admin", "readOnly": True}
    [volume] = [v for v in pod["volumes"] if v["name"] == "tokens"]
    assert volume["secret"] == {
        "secretName": "admin-tokens",
        "items": [{"key": "tokens.yaml", "path": "tokens.yaml"}],
    }
    # The database URL from the Secret publishers read.
    assert container_env(deployment)["SOMABRAIN_DATABASE_URL"] == {
        "secretKeyRef": {"name": "somabrain-connection", "key": "DATABASE_URL"}
    }
    # Locked down like the operator.
    assert pod["securityContext"] == operator_pod["securityContext"]
    assert container["securityContext"] == operator_pod["containers"][0]["securityContext"]


def test_admin_api_environment_is_what_admin_settings_reads(
    helm: Helm, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = helm.template(*ADMIN, "--set", "admin.port=9181")
    container = _admin_container(objects)
    env = container_env(_named(objects, "Deployment", ADMIN_NAME))
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "tokens"]
    [port] = container["ports"]

    # A setting renamed in AdminSettings, and not here, fails this.
    assert set(env) <= _read_by_admin_settings()
    for name in _read_by_admin_settings():
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("SOMABRAIN_DATABASE_URL", "postgresql://admin@db.example/somabrain")
    read = AdminSettings()
    assert read.admin_tokens_file == Path(mount["mountPath"]) / "tokens.yaml"
    # Every interface of the pod, where the Service reaches it.
    assert read.admin_host == "0.0.0.0"  # noqa: S104
    assert read.admin_port == port["containerPort"] == 9181
    assert read.database_url == "postgresql://admin@db.example/somabrain"


def test_admin_api_values_reach_its_deployment_and_service(helm: Helm) -> None:
    objects = helm.template(
        *ADMIN,
        "--set", "admin.replicas=2",
        "--set", "admin.image=registry.example/somabrain:1.2",
        "--set", "admin.connectionSecret=admin-db",
        "--set", "admin.logLevel=debug",
        "--set", "admin.port=9000",
        "--set", "admin.service.type=NodePort",
        "--set", "admin.service.port=80",
        "--set", "admin.resources.limits.memory=1Gi",
    )  # fmt: skip
    deployment = _named(objects, "Deployment", ADMIN_NAME)
    container = _admin_container(objects)
    service = _named(objects, "Service", ADMIN_NAME)

    assert deployment["spec"]["replicas"] == 2
    assert container["image"] == "registry.example/somabrain:1.2"
    assert container["args"] == ["--log-level", "debug"]
    assert container["ports"] == [{"name": "http", "containerPort": 9000, "protocol": "TCP"}]
    assert container["resources"]["limits"] == {"memory": "1Gi"}
    assert container_env(deployment)["SOMABRAIN_DATABASE_URL"] == {
        "secretKeyRef": {"name": "admin-db", "key": "DATABASE_URL"}
    }
    assert service["spec"]["type"] == "NodePort"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}
    ]


def test_admin_service_selects_the_admin_pods_and_the_operator_does_not(helm: Helm) -> None:
    objects = helm.template(*ADMIN)
    admin = _named(objects, "Deployment", ADMIN_NAME)
    operator = _named(objects, "Deployment", "somabrain-operator")
    service = _named(objects, "Service", ADMIN_NAME)

    def selects(selector: dict[str, str], deployment: dict[str, Any]) -> bool:
        labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
        return selector.items() <= labels.items()

    assert selects(service["spec"]["selector"], admin)
    assert not selects(service["spec"]["selector"], operator)
    assert selects(admin["spec"]["selector"]["matchLabels"], admin)
    assert not selects(admin["spec"]["selector"]["matchLabels"], operator)
    # The operator's (immutable) selector would otherwise count the admin pods as its own.
    assert not selects(operator["spec"]["selector"]["matchLabels"], admin)


@pytest.mark.parametrize(
    ("command", "named"),
    [
        (["lint", "--strict", str(CHART)], "at '/admin/tokensSecret'"),
        (["template", "somabrain-operator", str(CHART)], "at '/admin/tokensSecret'"),
        # Past the schema, the template refuses too.
        (
            ["template", "somabrain-operator", str(CHART), "--skip-schema-validation"],
            "admin.tokensSecret is required",
        ),
    ],
    ids=["lint", "template", "template-without-schema"],
)
def test_enabling_the_admin_api_without_a_tokens_secret_fails_naming_it(
    helm: Helm, command: list[str], named: str
) -> None:
    refused = helm.run(*command, "--set", "admin.enabled=true", check=False)

    assert refused.returncode != 0, refused.stdout
    assert named in refused.stdout + refused.stderr


def test_admin_service_account_gets_no_token_and_no_binding(helm: Helm) -> None:
    objects = helm.template(*ADMIN, namespace="ops")
    account = _named(objects, "ServiceAccount", ADMIN_NAME)
    pod = _named(objects, "Deployment", ADMIN_NAME)["spec"]["template"]["spec"]
    bindings = [o for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")]

    assert account["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == ADMIN_NAME
    assert pod["automountServiceAccountToken"] is False
    assert [o for o in objects if o["kind"] in ("Role", "RoleBinding")] == []
    assert bindings  # the operator's ClusterRoleBinding, and nothing for the admin API
    assert [
        subject
        for binding in bindings
        for subject in binding["subjects"]
        if subject["name"] == ADMIN_NAME
    ] == []


@pytest.mark.parametrize("port", [8081, 9000])
def test_admin_probes_point_at_healthz_and_readyz_on_the_container_port(
    helm: Helm, port: int
) -> None:
    container = _admin_container(helm.template(*ADMIN, "--set", f"admin.port={port}"))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    def target(probe: str) -> tuple[str, int]:
        get = container[probe]["httpGet"]
        return get["path"], ports.get(get["port"], get["port"])

    assert target("livenessProbe") == ("/healthz", port)
    assert target("startupProbe") == ("/healthz", port)
    assert target("readinessProbe") == ("/readyz", port)


def test_notes_say_how_to_reach_the_admin_api_only_when_enabled(helm: Helm) -> None:
    def notes(*options: str) -> str:
        return helm.run(
            "install", "somabrain-operator", str(CHART), "-n", "ops", "--dry-run=client",
            *options,
        ).stdout  # fmt: skip

    enabled = notes(*ADMIN)

    assert "admin API" not in notes()
    assert f"kubectl -n ops port-forward service/{ADMIN_NAME} 8081:8081" in enabled
    assert 'curl -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8081/v1/tenants' in enabled
