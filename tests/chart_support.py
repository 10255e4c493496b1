"""Helpers for tests of the operator's Helm chart (charts/somabrain-operator).

- `Helm` runs the stack's helm binary with folders of its own and a timeout, and parses
  what `helm template` renders.
- `OPERATOR_RULES` and `PEERING_RULES` are the permissions the chart's ClusterRole must
  grant, as issue #4 lists them; `DENIED` are examples it must not grant.
- `impersonating_client` and `write_service_account_kubeconfig` act as the chart's
  ServiceAccount on a real API server: the first through impersonation headers (for
  access reviews), the second through a token minted by the TokenRequest API, in a
  kubeconfig that every client takes (Kopf, kubectl, helm), so the operator itself can be
  run under the chart's identity.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from kubernetes import client
from kubernetes import config as kube_config

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "somabrain-operator"
# Generous for 2 busy cores; helm itself answers in well under a second here.
HELM_TIMEOUT = 120.0


@dataclass(frozen=True)
class Helm:
    """The helm binary, isolated from ~/.config/helm, optionally aimed at a cluster."""

    binary: str
    home: Path
    kubeconfig: str | None = None

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_DATA_HOME": str(self.home / "data"),
            "NO_COLOR": "1",
        }
        if self.kubeconfig is not None:
            env["KUBECONFIG"] = self.kubeconfig
        result = subprocess.run(
            [self.binary, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=HELM_TIMEOUT,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"helm {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def template(self, *options: str, namespace: str = "somabrain-system") -> list[dict[str, Any]]:
        """Every object `helm template` renders from the chart with `options`."""
        out = self.run("template", "somabrain-operator", str(CHART), "-n", namespace, *options)
        return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def only(objects: Iterable[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The one object of `kind` among `objects`."""
    [found] = [o for o in objects if o["kind"] == kind]
    return found


def container_env(deployment: dict[str, Any]) -> dict[str, Any]:
    """The operator container's environment, by name (a value, or its valueFrom)."""
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# --------------------------------------------------------------------------------------------
# What the ClusterRole must grant
# --------------------------------------------------------------------------------------------

_CHILD_VERBS = ["get", "list", "watch", "create", "patch", "update", "delete"]

OPERATOR_RULES: list[dict[str, list[str]]] = [
    {
        "apiGroups": ["somabrain.io"],
        "resources": ["tenants", "outboxpolicies"],
        "verbs": ["get", "list", "watch", "patch", "update"],
    },
    {
        "apiGroups": ["somabrain.io"],
        "resources": ["tenants/status", "outboxpolicies/status"],
        "verbs": ["get", "patch", "update"],
    },
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": _CHILD_VERBS},
    {
        "apiGroups": [""],
        "resources": ["configmaps", "services", "resourcequotas"],
        "verbs": _CHILD_VERBS,
    },
    {
        "apiGroups": ["monitoring.coreos.com"],
        "resources": ["prometheusrules"],
        "verbs": _CHILD_VERBS,
    },
    {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": ["get", "list", "watch"],
    },
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
]
PEERING_RULES: list[dict[str, list[str]]] = [
    {
        "apiGroups": ["kopf.dev"],
        "resources": ["clusterkopfpeerings"],
        "verbs": ["get", "list", "watch", "create", "patch"],
    },
]
CLUSTER_SCOPED = {"namespaces", "customresourcedefinitions", "clusterkopfpeerings"}


class Permission(NamedTuple):
    """One verb on one resource (`tenants/status` for a subresource) of one API group."""

    group: str
    resource: str
    verb: str

    def __str__(self) -> str:
        return f"{self.verb} {self.resource}.{self.group or 'core'}"


def permissions(rules: Iterable[Mapping[str, list[str]]]) -> set[Permission]:
    """Every (group, resource, verb) that RBAC rules grant, one by one."""
    return {
        Permission(group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


DENIED = [
    # Publishers read the connection Secret through their pod spec; the operator never does.
    Permission("", "secrets", "get"),
    Permission("", "secrets", "list"),
    Permission("", "secrets", "watch"),
    # Users and GitOps tools own Tenants; the operator only reconciles them.
    Permission("somabrain.io", "tenants", "create"),
    Permission("somabrain.io", "tenants", "delete"),
    Permission("somabrain.io", "outboxpolicies", "delete"),
    Permission("apiextensions.k8s.io", "customresourcedefinitions", "create"),
    Permission("apiextensions.k8s.io", "customresourcedefinitions", "patch"),
    Permission("apiextensions.k8s.io", "customresourcedefinitions", "delete"),
    Permission("apps", "deployments", "deletecollection"),
    Permission("apps", "statefulsets", "create"),
    Permission("apps", "daemonsets", "create"),
    Permission("extensions", "deployments", "create"),
    Permission("", "pods", "create"),
    Permission("", "pods", "list"),
    Permission("", "serviceaccounts", "create"),
    Permission("", "namespaces", "get"),
    Permission("", "namespaces", "create"),
    Permission("", "events", "delete"),
    Permission("rbac.authorization.k8s.io", "clusterroles", "create"),
    Permission("rbac.authorization.k8s.io", "rolebindings", "create"),
    Permission("monitoring.coreos.com", "servicemonitors", "create"),
    # A cluster-wide operator peers through ClusterKopfPeerings only, and never deletes one.
    Permission("kopf.dev", "kopfpeerings", "patch"),
    Permission("kopf.dev", "clusterkopfpeerings", "delete"),
]


# --------------------------------------------------------------------------------------------
# Acting as the chart's ServiceAccount
# --------------------------------------------------------------------------------------------


def service_account_user(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


def impersonating_client(kubeconfig: str, *, namespace: str, name: str) -> client.ApiClient:
    """An API client whose requests the admin of `kubeconfig` makes as the ServiceAccount.

    Without Impersonate-Group headers the API server adds the groups a ServiceAccount's
    token would carry (system:serviceaccounts, system:serviceaccounts:<namespace>,
    system:authenticated).
    """
    api: client.ApiClient = kube_config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    api.set_default_header("Impersonate-User", service_account_user(namespace, name))  # type: ignore[no-untyped-call]
    return api


def write_service_account_kubeconfig(
    admin_kubeconfig: str, path: Path, *, namespace: str, name: str, seconds: int = 3600
) -> Path:
    """A kubeconfig authenticating as the ServiceAccount with a token minted for it.

    Unlike impersonation it needs nothing from the client (Kopf and the Python client
    ignore a kubeconfig's `as:`), and it is what an in-cluster pod of the chart presents.
    """
    admin = kube_config.new_client_from_config(config_file=admin_kubeconfig)  # type: ignore[no-untyped-call]
    try:
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=seconds)
        )
        token = client.CoreV1Api(admin).create_namespaced_service_account_token(
            name, namespace, request
        )
    finally:
        admin.close()
    assert token.status is not None
    config = yaml.safe_load(Path(admin_kubeconfig).read_text())
    [cluster] = config["clusters"]
    user = service_account_user(namespace, name)
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [cluster],
                "users": [{"name": user, "user": {"token": token.status.token}}],
                "contexts": [{"name": user, "context": {"cluster": cluster["name"], "user": user}}],
                "current-context": user,
            }
        )
    )
    path.chmod(0o600)
    return path


def allowed(api: client.ApiClient, permission: Permission, *, namespace: str) -> bool:
    """What a SelfSubjectAccessReview says about `permission` for the client's user."""
    resource, _, subresource = permission.resource.partition("/")
    attributes = client.V1ResourceAttributes(
        group=permission.group,
        resource=resource,
        subresource=subresource or None,
        verb=permission.verb,
        namespace=None if resource in CLUSTER_SCOPED else namespace,
    )
    review = client.AuthorizationV1Api(api).create_self_subject_access_review(
        client.V1SelfSubjectAccessReview(
            spec=client.V1SelfSubjectAccessReviewSpec(resource_attributes=attributes)
        )
    )
    assert review.status is not None
    return bool(review.status.allowed)


def granted(api: client.ApiClient, *, namespace: str) -> set[Permission]:
    """Every permission the client's user has in `namespace` (SelfSubjectRulesReview),
    cluster-wide ones included, without resource-name restrictions."""
    review = client.AuthorizationV1Api(api).create_self_subject_rules_review(
        client.V1SelfSubjectRulesReview(
            spec=client.V1SelfSubjectRulesReviewSpec(namespace=namespace)
        )
    )
    assert review.status is not None
    rules = [
        {"apiGroups": r.api_groups or [], "resources": r.resources or [], "verbs": r.verbs}
        for r in review.status.resource_rules
        if not r.resource_names
    ]
    return permissions(rules)
