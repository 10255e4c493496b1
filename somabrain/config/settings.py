"""Settings of the core, read from `SOMABRAIN_*` environment variables.

The database URL and Kafka bootstrap servers also accept the unprefixed names the
local stack prints (`DATABASE_URL`, `KAFKA_BOOTSTRAP_SERVERS`). Nothing here connects
to anything; invalid values fail at load with pydantic's message naming the variable.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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


class PublisherSettings(Settings):
    """Settings of one publisher process."""

    tenant: str = Field(default="", description="Tenant this publisher drains.")
    batch_size: int = Field(default=500, ge=1, le=10_000, description="Rows claimed per batch.")
    poll_interval_seconds: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="Longest wait between looks at the outbox when no NOTIFY arrives.",
    )
    delivery_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How long Kafka may take to confirm a message before it counts as failed.",
    )
    delivery_mode: Literal["exactly-once", "at-least-once"] = Field(
        default="exactly-once",
        description="exactly-once: Kafka transactions, no duplicates for read_committed "
        "consumers (needs a broker with transactions); at-least-once: idempotent producer, "
        "a crash may republish a batch with the same event-id headers.",
    )
    checkpoint_topic: str = Field(
        default="somabrain.publisher-checkpoints",
        description="Compacted topic holding each publisher's last committed batch "
        "(exactly-once mode).",
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
        default=1.0, gt=0, description="First wait before retrying a failed event."
    )
    circuit_failure_threshold: int = Field(
        default=5, ge=1, description="Consecutive failed batches that open the circuit."
    )
    circuit_open_seconds: float = Field(
        default=30.0, gt=0, description="Pause of an open circuit before one probe batch."
    )
    retry_backoff_max_seconds: float = Field(
        default=300.0, gt=0, description="Longest wait between two attempts of one event."
    )
    retention_seconds: float = Field(
        default=7 * 24 * 3600.0, gt=0, description="Age after which sent rows are purged."
    )
    retention_interval_seconds: float = Field(
        default=60.0, gt=0, description="How often the publisher purges expired sent rows."
    )
    retention_chunk: int = Field(
        default=1000, ge=1, le=100_000, description="Rows deleted per purge transaction."
    )
    retention_budget_seconds: float = Field(
        default=1.0, gt=0, description="Longest time one purge round may take."
    )
    metrics_port: int = Field(
        default=0, ge=0, le=65535, description="Port serving /metrics; 0 turns it off."
    )
    shutdown_grace_seconds: float = Field(
        default=20.0, gt=0, description="Time allowed to finish the in-flight batch on SIGTERM."
    )
