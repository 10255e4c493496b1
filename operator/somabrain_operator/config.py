"""Operator settings, read from `SOMABRAIN_OPERATOR_*` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

GROUP = "somabrain.io"
VERSION = "v1alpha1"
TENANT_PLURAL = "tenants"
POLICY_PLURAL = "outboxpolicies"
FIELD_MANAGER = "somabrain-operator"

# The PrometheusRule kind of the Prometheus Operator; optional (case K-11).
RULE_GROUP = "monitoring.coreos.com"
RULE_VERSION = "v1"
RULE_PLURAL = "prometheusrules"
RULE_CRD = f"{RULE_PLURAL}.{RULE_GROUP}"


class OperatorSettings(BaseSettings):
    """How the operator builds publishers and where it reads their reports."""

    model_config = SettingsConfigDict(env_prefix="SOMABRAIN_OPERATOR_", extra="ignore")

    publisher_image: str = Field(
        default="somabrain:0.1.0", description="Container image of publisher Deployments."
    )
    connection_secret: str = Field(
        default="somabrain-connection",
        description="Secret, in each Tenant's namespace, whose DATABASE_URL and "
        "KAFKA_BOOTSTRAP_SERVERS keys reach the publisher as environment variables.",
    )
    publisher_metrics_port: int = Field(
        default=9400,
        ge=1,
        le=65535,
        description="Port of each publisher's /metrics, /healthz and /readyz, and of its Service.",
    )
    rule_labels: dict[str, str] = Field(
        default_factory=dict,
        description="Labels on every PrometheusRule, as JSON (for example "
        '{"release": "kube-prometheus-stack"}), so that Prometheus\'s rule selector '
        "picks them up.",
    )
    database_url: str | None = Field(
        default=None,
        description="The outbox database, read for each tenant's backlog and publisher, and "
        "written only by deletionPolicy Delete. Unset: status.backlog is not reported and "
        "Drain and Delete cannot run.",
    )
    status_interval_seconds: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="How often the tenants' backlog is read from the database; status is "
        "written only when it changed.",
    )
    repair_interval_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="How often every Tenant is reconciled once more, a slice at each status "
        "tick: the backstop for drift the watches missed (a child changed while a watch "
        "was down), since children edited or deleted by someone else are restored at once. "
        "Each visit is about six API requests that write nothing when all is in place; at "
        "the default an hour, 1,000 Tenants cost about 17 visits a minute.",
    )
    publisher_report_max_age_seconds: float = Field(
        default=30.0,
        gt=0,
        description="A publisher report older than this means no publisher is active.",
    )
    drain_timeout_seconds: float = Field(
        default=600.0,
        gt=0,
        description="How long deleting a Tenant with deletionPolicy Drain waits for its "
        "backlog to reach zero before it gives up and deletes anyway.",
    )
