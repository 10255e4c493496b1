"""Operator settings, read from `SOMABRAIN_OPERATOR_*` environment variables."""

from __future__ import annotations

from typing import Self

from pydantic import AliasChoices, Field, model_validator
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

    model_config = SettingsConfigDict(
        env_prefix="SOMABRAIN_OPERATOR_", extra="ignore", populate_by_name=True
    )

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
        validation_alias=AliasChoices("SOMABRAIN_OPERATOR_DATABASE_URL", "DATABASE_URL"),
        description="The outbox database, read for each tenant's backlog and publisher, and "
        "written only by deletionPolicy Delete (DATABASE_URL, as the local stack prints it, "
        "also works). Unset: status.backlog is not reported and Drain and Delete cannot run.",
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
    watch_server_timeout_seconds: int = Field(
        default=300,
        gt=0,
        description="How long the API server keeps one watch request open before ending it; "
        "the operator then watches again from where it was.",
    )
    watch_client_timeout_seconds: float = Field(
        default=330.0,
        gt=0,
        description="How long the operator keeps one watch request open before it gives "
        "the connection up, whether or not anything arrived: a connection gone silent "
        "without closing (a half-closed or black-holed connection) is noticed within this "
        "time and watched again on a new one. Must be more than "
        "SOMABRAIN_OPERATOR_WATCH_SERVER_TIMEOUT_SECONDS.",
    )
    api_request_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description="Longest wait for any other API request (a list, an apply, a status "
        "write); a request without an answer by then fails and is retried.",
    )

    @model_validator(mode="after")
    def _client_outlasts_server(self) -> Self:
        if self.watch_client_timeout_seconds <= self.watch_server_timeout_seconds:
            raise ValueError(
                "SOMABRAIN_OPERATOR_WATCH_CLIENT_TIMEOUT_SECONDS "
                f"({self.watch_client_timeout_seconds:g}) must be more than "
                "SOMABRAIN_OPERATOR_WATCH_SERVER_TIMEOUT_SECONDS "
                f"({self.watch_server_timeout_seconds}): otherwise every healthy watch "
                "is cut by the operator before the API server ends it"
            )
        return self
