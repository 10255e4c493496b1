"""Typed view of a Tenant resource's spec, as the API server has already validated it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from somabrain.config.types import TENANT_ID_PATTERN


class PublisherSpec(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    mode: Literal["dedicated"] = "dedicated"
    batch_size: int = Field(default=500, ge=1, le=10_000, alias="batchSize")


class TenantSpec(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    tenant_id: str = Field(pattern=TENANT_ID_PATTERN, alias="tenantId")
    topics: list[str] = Field(default_factory=list, max_length=50)
    publisher: PublisherSpec = Field(default_factory=PublisherSpec)

    @classmethod
    def from_body(cls, spec: Any) -> TenantSpec:
        return cls.model_validate(dict(spec))
