"""Settings of the core, read from `SOMABRAIN_*` environment variables.

The database URL and Kafka bootstrap servers also accept the unprefixed names the
local stack prints (`DATABASE_URL`, `KAFKA_BOOTSTRAP_SERVERS`). Nothing here connects
to anything; invalid values fail at load with pydantic's message naming the variable.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from somabrain.config.errors import InvalidTenantConfig
from somabrain.config.types import TENANT_ID_PATTERN

# A Kafka topic name, in which `{tenant}` may stand for the tenant id; empty for none.
DEAD_LETTER_TOPIC_PATTERN = r"^([a-zA-Z0-9._-]|\{tenant\})*$"


class Settings(BaseSettings):
    """Connection and delivery settings shared by enqueue, the publisher and the CLI."""

    model_config = SettingsConfigDict(
        env_prefix="SOMABRAIN_", extra="ignore", populate_by_name=True
    )

    database_url: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/somabrain",
        validation_alias=AliasChoices("SOMABRAIN_DATABASE_URL", "DATABASE_URL"),
        description="SQLAlchemy URL of the database holding the outbox table.",
    )
    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        validation_alias=AliasChoices(
            "SOMABRAIN_KAFKA_BOOTSTRAP_SERVERS", "KAFKA_BOOTSTRAP_SERVERS"
        ),
        description="Comma-separated host:port list of Kafka brokers.",
    )
    max_message_bytes: int = Field(
        default=1_000_000,
        gt=0,
        description="Largest encoded message (value, key and headers) enqueue accepts; keep "
        "it at or under the broker's message.max.bytes.",
    )
    checkpoint_topic: str = Field(
        default="somabrain.publisher-checkpoints",
        description="Compacted topic holding each publisher's last committed batch "
        "(exactly-once mode).",
    )
    max_pending: int | None = Field(
        default=1_000_000,
        gt=0,
        description="Cap on a tenant's pending events: enqueue refuses beyond it with "
        "BacklogOverCap. A tenant's publisher records its own cap in the database, which "
        "takes precedence; this one applies to tenants no publisher has reported.",
    )


class AdminSettings(Settings):
    """Settings of the admin API process."""

    admin_tokens_file: Path = Field(
        default=Path("/etc/somabrain/admin/tokens.yaml"),
        description="YAML file of the API's bearer tokens, each admin or scoped to tenants "
        "(normally a mounted Secret; re-read when it changes). The API does not start "
        "without it.",
    )
    # Every interface by default: in a pod, the Service reaches it on the pod's address.
    admin_host: str = Field(default="0.0.0.0", description="Address the API listens on.")  # noqa: S104
    admin_port: int = Field(default=8081, ge=1, le=65535, description="Port the API listens on.")


class PublisherSettings(Settings):
    """Settings of one publisher process."""

    tenant: str = Field(default="", description="Tenant this publisher drains (dedicated mode).")
    tenants: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated tenants one publisher drains in turns (shared mode); "
        "needs SOMABRAIN_POOL.",
    )
    pool: str = Field(
        default="",
        description="Name of a shared publisher: its Kafka transactional id derives from it, "
        "so give each shared publisher its own.",
    )
    tenant_config_file: Path | None = Field(
        default=None,
        description="YAML or JSON file of per-tenant overrides, re-read when it changes: "
        "{tenants: {<tenant>: {batch_size, max_in_flight, max_pending, events_per_second, "
        "circuit_failure_threshold, circuit_open_seconds, poison_policy, dead_letter_topic, "
        "feature_flags}}}.",
    )
    batch_size: int = Field(default=500, ge=1, le=10_000, description="Rows claimed per batch.")
    max_in_flight: int = Field(
        default=10_000,
        ge=1,
        description="Most rows of one tenant claimed and not yet settled at once.",
    )
    events_per_second: float | None = Field(
        default=None,
        gt=0,
        description="Events/s quota of each tenant (a token bucket); unset means unlimited.",
    )
    poll_interval_seconds: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="Longest wait between looks at the outbox when no NOTIFY arrives.",
    )
    delivery_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        le=86_400,
        description="How long Kafka may take to confirm a message before it counts as failed.",
    )
    delivery_mode: Literal["exactly-once", "at-least-once"] = Field(
        default="exactly-once",
        description="exactly-once: Kafka transactions, no duplicates for read_committed "
        "consumers (needs a broker with transactions); at-least-once: idempotent producer, "
        "a crash may republish a batch with the same event-id headers.",
    )
    max_attempts: int = Field(
        default=10, ge=1, le=1000, description="Failed attempts before an event goes dead."
    )
    poison_policy: Literal["block", "skip"] = Field(
        default="block",
        description="block: a dead event keeps later events of its key waiting until it is "
        "replayed; skip: later events of its key go ahead once it is dead.",
    )
    retry_backoff_seconds: float = Field(
        default=1.0, gt=0, le=86_400, description="First wait before retrying a failed event."
    )
    circuit_failure_threshold: int = Field(
        default=5, ge=1, description="Consecutive failed batches that open the circuit."
    )
    circuit_open_seconds: float = Field(
        default=30.0,
        gt=0,
        le=86_400,
        description="Pause of an open circuit before one probe batch.",
    )
    retry_backoff_max_seconds: float = Field(
        default=300.0,
        gt=0,
        le=86_400,
        description="Longest wait between two attempts of one event.",
    )
    dead_letter_topic: str = Field(
        default="",
        max_length=249,
        pattern=DEAD_LETTER_TOPIC_PATTERN,
        description="Topic that receives a copy of each event that goes dead, with "
        "`dead-reason` and `original-topic` headers; `{tenant}` is replaced by the tenant "
        "id. Empty: no copies.",
    )
    retention_seconds: float = Field(
        default=7 * 24 * 3600.0, gt=0, description="Age after which sent rows are purged."
    )
    retention_interval_seconds: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="How often the publisher purges expired sent rows.",
    )
    retention_chunk: int = Field(
        default=1000, ge=1, le=100_000, description="Rows deleted per purge transaction."
    )
    retention_budget_seconds: float = Field(
        default=1.0, gt=0, le=86_400, description="Longest time one purge round may take."
    )
    metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port serving /metrics, /healthz and /readyz; 0 turns it off.",
    )
    shutdown_grace_seconds: float = Field(
        default=20.0,
        gt=0,
        le=86_400,
        description="Time allowed to finish the in-flight batch on SIGTERM.",
    )

    @field_validator("tenants", mode="before")
    @classmethod
    def _split_tenants(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _tenants_and_pool(self) -> PublisherSettings:
        served = self.served_tenants()
        if len(set(served)) != len(served):
            raise ValueError("SOMABRAIN_TENANTS lists a tenant twice")
        if len(served) > 1 and not self.pool:
            raise ValueError("a publisher of several tenants needs a pool name (SOMABRAIN_POOL)")
        if self.pool and not re.fullmatch(TENANT_ID_PATTERN, self.pool):
            raise ValueError(
                f"pool name {self.pool!r} must be lowercase letters, digits and '-' "
                "(1-40 characters, starting with a letter)"
            )
        return self

    def served_tenants(self) -> list[str]:
        """The tenants this publisher drains, in the order it takes them."""
        if self.tenants:
            return self.tenants if not self.tenant else [self.tenant, *self.tenants]
        return [self.tenant] if self.tenant else []

    @property
    def owner(self) -> str:
        """Who publishes: the tenant in dedicated mode, `pool.<name>` in shared mode.

        Tenant ids never contain a dot, so the two kinds never collide.
        """
        return f"pool.{self.pool}" if self.pool else self.tenant


class TenantOverrides(BaseModel):
    """Per-tenant settings that override the publisher's own; unset fields keep them."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int | None = Field(default=None, ge=1, le=10_000)
    max_in_flight: int | None = Field(default=None, ge=1)
    max_pending: int | None = Field(default=None, gt=0)
    events_per_second: float | None = Field(default=None, gt=0)
    circuit_failure_threshold: int | None = Field(default=None, ge=1)
    circuit_open_seconds: float | None = Field(default=None, gt=0)
    poison_policy: Literal["block", "skip"] | None = None
    dead_letter_topic: str | None = Field(
        default=None, max_length=249, pattern=DEAD_LETTER_TOPIC_PATTERN
    )
    feature_flags: dict[str, bool] = Field(
        default_factory=dict,
        description="Feature flags of the tenant by name (see somabrain.config.flags).",
    )


class _TenantConfigFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenants: dict[str, TenantOverrides] = Field(default_factory=dict)


def reserved_topic(topic: str, checkpoint_topic: str) -> bool:
    """Topics no event may go to: Kafka's internal ones and the publishers' checkpoints
    (an event there could pass for a checkpoint and mark another event sent)."""
    return topic.startswith("__") or topic == checkpoint_topic


def load_tenant_overrides(path: Path) -> dict[str, TenantOverrides]:
    """Read a file of the form `{"tenants": {"<tenant>": {<field>: <value>}}}`."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return _TenantConfigFile.model_validate(raw).tenants
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidTenantConfig(f"cannot read tenant config {path}: {exc}") from exc
    except ValueError as exc:
        raise InvalidTenantConfig(f"tenant config {path} is invalid: {exc}") from exc
