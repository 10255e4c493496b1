"""Feature flags: tenant-aware publisher behaviour that can be switched per tenant.

A flag is set per tenant in the publisher's per-tenant file (`feature_flags`), where
the operator writes what a Tenant's OutboxPolicy, the policy's staged rollouts and
the Tenant itself resolve to. A flag left unset has its default, so a publisher
without any flags behaves as it always did. Unknown names are ignored, so a newer
operator may name flags an older publisher does not know.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Final


@dataclasses.dataclass(frozen=True, slots=True)
class Flag:
    name: str
    default: bool
    description: str


TENANT_QUOTAS: Final = Flag(
    "tenant-quotas",
    True,
    "apply the tenant's own quotas (events/s, batch size, in-flight, backlog cap); off: "
    "the publisher's defaults. Re-read without a restart.",
)
DEAD_LETTER: Final = Flag(
    "dead-letter",
    True,
    "copy each dead event to the tenant's dead-letter topic, when one is set; off: "
    "events go dead without a copy. Re-read without a restart.",
)
EXACTLY_ONCE: Final = Flag(
    "exactly-once",
    True,
    "deliver in Kafka transactions (no duplicates for read_committed consumers); off: "
    "at-least-once. Decides the delivery mode of a dedicated publisher, which restarts.",
)
KNOWN: Final = {f.name: f for f in (TENANT_QUOTAS, DEAD_LETTER, EXACTLY_ONCE)}


def enabled(flags: Mapping[str, bool] | None, flag: Flag) -> bool:
    """Whether `flag` is on in `flags` (its default when unset)."""
    if flags is None:
        return flag.default
    return bool(flags.get(flag.name, flag.default))
