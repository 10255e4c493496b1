"""Parts shared by Tenant and OutboxPolicy: bounded names, quotas, alerts, conditions.

Every bound here is also a bound of the CRD schema: it keeps a Tenant far below the
object size limits (case K-13) and lets the API server estimate the cost of each CEL
rule. Messages of rules name fields relative to the object they sit on; the API server
prefixes the full path (`spec.quotas.maxInFlight: ...`).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import Field

from somabrain.config import flags
from somabrain_operator.resources import defaults
from somabrain_operator.resources.base import ResourceModel, Rule

MAX_TOPICS = 50
# The flags this operator knows: a name it does not know would gate nothing.
KNOWN_FLAG_NAMES = tuple(flags.KNOWN)
MAX_FEATURE_FLAGS = len(KNOWN_FLAG_NAMES)
MAX_ALERT_LABELS = 16
MAX_CONDITIONS = 16
MAX_ROLLOUTS = len(KNOWN_FLAG_NAMES)  # at most one per flag

TOPIC_PATTERN = r"^[a-zA-Z0-9._-]+$"
TOPIC_MAX_LENGTH = 249
# Alert labels go on every alert and on the PrometheusRule's metadata: a name must be
# both a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*) and a Kubernetes label key
# (alphanumeric at both ends, at most 63 characters, no prefix since '/' is no
# Prometheus character), so it starts with a letter and does not end with '_'.
LABEL_NAME_PATTERN = r"^[a-zA-Z]([a-zA-Z0-9_]{0,61}[a-zA-Z0-9])?$"
# A Kubernetes label value is also a valid Prometheus label value; the labels go on both.
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
LABEL_VALUE_MAX_LENGTH = 63
OBJECT_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
OBJECT_NAME_MAX_LENGTH = 253
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$"
QUANTITY_MAX_LENGTH = 20
# Prometheus durations (model.ParseDuration), each unit with a bounded number of digits:
# Prometheus refuses a duration beyond int64 nanoseconds (about 292 years) as out of
# range, and the largest duration this pattern allows (every unit at its most digits,
# DURATION_UNIT_DIGITS) is about 211 years.
DURATION_UNIT_DIGITS: dict[str, int] = {
    "y": 2,
    "w": 3,
    "d": 4,
    "h": 5,
    "m": 7,
    "s": 9,
    "ms": 11,
}
DURATION_PATTERN = (
    "^" + "".join(f"([0-9]{{1,{n}}}{unit})?" for unit, n in DURATION_UNIT_DIGITS.items()) + "$"
)
DURATION_MAX_LENGTH = 16
DURATION_RULE_TEXT = (
    "a Prometheus duration within the range Prometheus loads: units y, w, d, h, m, s, ms "
    "in that order, each at most "
    + ", ".join(f"{'9' * n}{unit}" for unit, n in DURATION_UNIT_DIGITS.items())
    + " (for example 10m or 1h30m)"
)
RESERVED_ALERT_LABELS = ("tenant", "alertname", "severity")

PoisonPolicy = Literal["block", "skip"]

_SECONDS_PER_WEEK = 7 * 24 * 3600


def matches(pattern: str) -> Callable[[str], bool]:
    """The Python side of CEL's `self.matches(pattern)`."""
    compiled = re.compile(pattern)
    return lambda value: compiled.fullmatch(value) is not None


def _keys_match(pattern: str) -> Callable[[Mapping[str, Any]], bool]:
    compiled = re.compile(pattern)
    return lambda mapping: all(compiled.fullmatch(key) for key in mapping)


TopicName = Annotated[str, Field(min_length=1, max_length=TOPIC_MAX_LENGTH, pattern=TOPIC_PATTERN)]
ObjectName = Annotated[
    str, Field(min_length=1, max_length=OBJECT_NAME_MAX_LENGTH, pattern=OBJECT_NAME_PATTERN)
]
Quantity = Annotated[
    str, Field(min_length=1, max_length=QUANTITY_MAX_LENGTH, pattern=QUANTITY_PATTERN)
]
# A duration as written: its form is checked by the rules of the model holding it
# (`duration_rule`), so that the message names the field.
DurationText = Annotated[str, Field(min_length=2, max_length=DURATION_MAX_LENGTH)]
# A duration the operator computed or already checked.
Duration = Annotated[
    str, Field(min_length=2, max_length=DURATION_MAX_LENGTH, pattern=DURATION_PATTERN)
]
_FLAGS_CEL = "[" + ", ".join(f"'{name}'" for name in KNOWN_FLAG_NAMES) + "]"
_FLAGS_LISTED = ", ".join(KNOWN_FLAG_NAMES)
FlagName = Annotated[
    str,
    Field(min_length=1, max_length=63),
    Rule(
        f"self in {_FLAGS_CEL}",
        f"flag must be one of {_FLAGS_LISTED} (a flag the operator does not know would "
        "gate nothing)",
        check=lambda name: name in KNOWN_FLAG_NAMES,
    ),
]
KNOWN_FLAGS_SHOWN = "; ".join(
    f"{f.name} (default {'on' if f.default else 'off'}): {f.description.rstrip('.')}"
    for f in flags.KNOWN.values()
)
FeatureFlags = Annotated[
    dict[str, bool],
    Field(max_length=MAX_FEATURE_FLAGS),
    Rule(
        f"self.all(name, name in {_FLAGS_CEL})",
        f"featureFlags names must be among {_FLAGS_LISTED} (a flag the operator does not "
        "know would gate nothing)",
        check=lambda mapping: all(name in KNOWN_FLAG_NAMES for name in mapping),
    ),
]
AlertLabelValue = Annotated[
    str,
    Field(max_length=LABEL_VALUE_MAX_LENGTH),
    Rule(
        f"self.matches('{LABEL_VALUE_PATTERN}')",
        "alert label values must be Kubernetes label values (they also label the "
        "PrometheusRule object): at most 63 letters, digits, '-', '_' or '.', starting and "
        "ending with a letter or digit, or empty (for example payments)",
        check=matches(LABEL_VALUE_PATTERN),
    ),
]
_ALERT_LABEL_NAMES = Rule(
    f"self.all(name, name.matches('{LABEL_NAME_PATTERN}'))",
    "alert label names must be both Prometheus label names and Kubernetes label keys (they "
    "label every alert and the PrometheusRule object): 1-63 letters, digits or '_', "
    "starting with a letter and ending with a letter or digit (for example team)",
    check=_keys_match(LABEL_NAME_PATTERN),
)
_RESERVED_LABELS = Rule(
    " && ".join(f"!('{name}' in self)" for name in RESERVED_ALERT_LABELS),
    "labels cannot set "
    + ", ".join(RESERVED_ALERT_LABELS[:-1])
    + f" or {RESERVED_ALERT_LABELS[-1]}"
    + ": every alert already carries them; remove the label",
    check=lambda labels: not set(labels) & set(RESERVED_ALERT_LABELS),
)
AlertLabels = Annotated[
    dict[str, AlertLabelValue],
    Field(max_length=MAX_ALERT_LABELS),
    _ALERT_LABEL_NAMES,
    _RESERVED_LABELS,
]
# A Tenant's labels over its OutboxPolicy's: up to MAX_ALERT_LABELS from each.
MergedAlertLabels = Annotated[
    dict[str, AlertLabelValue],
    Field(max_length=2 * MAX_ALERT_LABELS),
    _ALERT_LABEL_NAMES,
    _RESERVED_LABELS,
]


def duration_rule(camel: str) -> Rule:
    """The rule of the duration field `camel` (a DurationText) of a model."""
    field = "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)
    valid = matches(DURATION_PATTERN)
    return Rule(
        f"!has(self.{camel}) || self.{camel}.matches('{DURATION_PATTERN}')",
        f"{camel} must be {DURATION_RULE_TEXT}",
        check=lambda model: getattr(model, field) is None or valid(getattr(model, field)),
        field_path=f".{camel}",
    )


_QUANTITY_FACTORS: dict[str, Decimal] = {
    "": Decimal(1),
    "m": Decimal("0.001"),
    **{s: Decimal(1000**i) for i, s in enumerate(("k", "M", "G", "T", "P"), start=1)},
    **{s: Decimal(1024**i) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi"), start=1)},
}


def quantity(value: str) -> Decimal:
    """The number a Kubernetes quantity matching QUANTITY_PATTERN stands for."""
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", value)
    if match is None:
        raise ValueError(f"{value!r} is not a quantity")
    number, suffix = match.groups()
    return Decimal(number) * _QUANTITY_FACTORS[suffix]


class Quotas(ResourceModel):
    """How fast and how much the publisher takes from the tenant's backlog. An unset
    field comes from the OutboxPolicy, else from the publisher's defaults."""

    events_per_second: float | None = Field(
        default=None,
        gt=0,
        le=1_000_000,
        description="Events per second the publisher may send for the tenant (a token "
        "bucket). Unset everywhere: unlimited.",
    )
    batch_size: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        description=f"Most rows claimed and sent as one batch (one Kafka transaction). Default "
        f"{defaults.publisher('batch_size')}.",
    )
    max_in_flight: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Most rows of the tenant claimed and not yet confirmed by Kafka at "
        f"once; at least batchSize. Default {defaults.publisher('max_in_flight')}.",
    )
    max_pending: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000_000,
        description="Backlog beyond which enqueue refuses the tenant's events "
        "(BacklogOverCap). Unset everywhere: the publisher's global cap.",
    )

    validations = (
        Rule(
            "!has(self.batchSize) || !has(self.maxInFlight) || self.maxInFlight >= self.batchSize",
            "maxInFlight must be at least batchSize (a batch never exceeds maxInFlight): "
            "raise maxInFlight or lower batchSize",
            check=lambda q: (
                q.batch_size is None or q.max_in_flight is None or q.max_in_flight >= q.batch_size
            ),
            field_path=".maxInFlight",
        ),
    )


class AlertThresholds(ResourceModel):
    """When the tenant's alerts fire. An unset field comes from the OutboxPolicy, else
    from the built-in thresholds (somabrain.delivery.alerts.Thresholds)."""

    backlog_warning: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000_000,
        description="Pending events above which SomabrainBacklogHigh fires (warning). "
        f"Default {defaults.alert('backlog_warning')}.",
    )
    backlog_critical: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000_000,
        description="Pending events above which SomabrainBacklogCritical fires; greater "
        f"than backlogWarning. Default {defaults.alert('backlog_critical')}.",
    )
    oldest_pending_seconds: float | None = Field(
        default=None,
        ge=1,
        le=_SECONDS_PER_WEEK,
        description="Age in seconds of the oldest pending event above which "
        f"SomabrainOldestPendingTooOld fires. Default "
        f"{defaults.shown(defaults.alert('oldest_pending_seconds'))}.",
    )
    publisher_down_for: DurationText | None = Field(
        default=None,
        description="How long (Prometheus duration, e.g. 1m) no publisher may be active "
        f"before SomabrainPublisherDown fires. Default {defaults.alert('publisher_down_for')}.",
    )
    backlog_for: DurationText | None = Field(
        default=None,
        description="How long the backlog must stay above a threshold before its alert "
        f"fires (Prometheus duration). Default {defaults.alert('backlog_for')}.",
    )
    circuit_open_for: DurationText | None = Field(
        default=None,
        description="How long the circuit must stay open before SomabrainCircuitOpen "
        f"fires (Prometheus duration). Default {defaults.alert('circuit_open_for')}.",
    )

    validations = (
        Rule(
            "!has(self.backlogWarning) || !has(self.backlogCritical) "
            "|| self.backlogCritical > self.backlogWarning",
            "backlogCritical must be greater than backlogWarning: raise backlogCritical or "
            "lower backlogWarning",
            check=lambda t: (
                t.backlog_warning is None
                or t.backlog_critical is None
                or t.backlog_critical > t.backlog_warning
            ),
            field_path=".backlogCritical",
        ),
        duration_rule("publisherDownFor"),
        duration_rule("backlogFor"),
        duration_rule("circuitOpenFor"),
    )


class Alerts(ResourceModel):
    """The tenant's alerting rules (a PrometheusRule): who they are routed to and when
    they fire."""

    labels: AlertLabels | None = Field(
        default=None,
        description="Labels put on the PrometheusRule object (so the Prometheus rule "
        "selector picks it up) and on every alert (so Alertmanager routes it), for example "
        "team: payments. Names must be both Prometheus label names and Kubernetes label keys "
        "(letters, digits and '_', starting with a letter, not ending with '_'), values "
        "Kubernetes label values; tenant, alertname and severity are set by the rules "
        "themselves.",
    )
    thresholds: AlertThresholds | None = Field(
        default=None, description="Thresholds of the alerts; unset ones come from defaults."
    )


class Condition(ResourceModel):
    """One aspect of the object's state, in the form of Kubernetes' metav1.Condition."""

    type: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Z][A-Za-z0-9]*$",
        description="What the condition is about, for example Ready.",
    )
    status: Literal["True", "False", "Unknown"] = Field(
        description="Whether the condition holds: True, False or Unknown."
    )
    reason: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="Why, in one CamelCase word, for example ChildrenApplied.",
    )
    message: str = Field(
        max_length=32_768, description="Why, for people: what happened and what to do."
    )
    last_transition_time: dt.datetime = Field(
        description="When status last changed (not when the condition was last written)."
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="The metadata.generation this condition describes."
    )


Conditions = Annotated[
    list[Condition],
    Field(
        max_length=MAX_CONDITIONS,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    ),
]
