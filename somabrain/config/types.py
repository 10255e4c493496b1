"""Semantic id types, so a tenant id or event id is never passed as a bare string.

A tenant id is also a Kubernetes label value, part of a Kafka transactional id and of
object names, so its format is the intersection of those: lowercase letters, digits and
`-`, starting with a letter, at most 40 characters.
"""

from __future__ import annotations

import re
import uuid
from typing import NewType

from somabrain.config.errors import InvalidTenantId

TenantId = NewType("TenantId", str)
EventId = NewType("EventId", uuid.UUID)

TENANT_ID_PATTERN = r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$"
TENANT_ID_MAX_LENGTH = 40
_TENANT_ID_RE = re.compile(TENANT_ID_PATTERN)


def parse_tenant_id(value: str) -> TenantId:
    """Return `value` as a TenantId, or raise InvalidTenantId naming the rule it breaks."""
    if not _TENANT_ID_RE.fullmatch(value):
        raise InvalidTenantId(value)
    return TenantId(value)
