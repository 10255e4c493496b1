"""The value of every optional field left unset, in one place.

Field descriptions quote these values and `resolve` applies them; the CRD schema
never carries them (case K-16). Publisher settings and alert thresholds keep their
defaults where they are defined, in the core; this module only reads them.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from somabrain.config.settings import PublisherSettings
from somabrain.delivery.alerts import Thresholds

PUBLISHER_MODE: Final[Literal["dedicated"]] = "dedicated"
REPLICAS: Final = 1
DELETION_POLICY: Final[Literal["Retain"]] = "Retain"
ROLLOUT_DWELL_SECONDS: Final = 600
PUBLISHER_RESOURCES: Final = {
    "requests": {"cpu": "50m", "memory": "128Mi"},
    "limits": {"memory": "256Mi"},
}
ALERT_THRESHOLDS: Final = Thresholds()


def publisher(name: str) -> Any:
    """The default of one of the publisher's settings (`PublisherSettings`)."""
    return PublisherSettings.model_fields[name].default


def alert(name: str) -> Any:
    """The default of one alert threshold (`somabrain.delivery.alerts.Thresholds`)."""
    return getattr(ALERT_THRESHOLDS, name)


def shown(value: Any) -> str:
    """`value` as a description quotes it: 1.0 as 1, 10000 as 10000."""
    return f"{value:g}" if isinstance(value, float) else str(value)
