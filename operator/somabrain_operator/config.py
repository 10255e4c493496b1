"""Operator settings, read from `SOMABRAIN_OPERATOR_*` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

GROUP = "somabrain.io"
VERSION = "v1alpha1"
TENANT_PLURAL = "tenants"
FIELD_MANAGER = "somabrain-operator"


class OperatorSettings(BaseSettings):
    """How the operator builds publishers."""

    model_config = SettingsConfigDict(env_prefix="SOMABRAIN_OPERATOR_", extra="ignore")

    publisher_image: str = Field(
        default="somabrain:0.1.0", description="Container image of publisher Deployments."
    )
    connection_secret: str = Field(
        default="somabrain-connection",
        description="Secret, in each Tenant's namespace, whose DATABASE_URL and "
        "KAFKA_BOOTSTRAP_SERVERS keys reach the publisher as environment variables.",
    )
