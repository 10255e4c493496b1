"""The operator's own Prometheus metrics, defined once; served on
`SOMABRAIN_OPERATOR_METRICS_PORT` when it is set."""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

RECONCILES = Counter(
    "somabrain_operator_reconciles",
    "Reconciles run, by kind, trigger and outcome (ok; refused: the Tenant is left not Ready, "
    "see somabrain_operator_refusals; error; waiting: a clean-up in progress).",
    ["kind", "trigger", "outcome"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "somabrain_operator_reconcile_seconds",
    "Time one reconcile took, by kind.",
    ["kind"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
STATUS_WRITES = Counter(
    "somabrain_operator_status_writes",
    "Status writes of the background loop (backlog and publisher availability).",
    ["kind"],
    registry=REGISTRY,
)
REFUSALS = Counter(
    "somabrain_operator_refusals",
    "Reconciles that left a Tenant not Ready, by the Ready condition's reason "
    "(TenantIdConflict, ChildNameTaken, PolicyNotFound, InvalidSpec, ApplyFailed, ...).",
    ["reason"],
    registry=REGISTRY,
)
API_REQUESTS = Counter(
    "somabrain_operator_api_requests",
    "Requests to the Kubernetes API server by the operator's reconciles and status loop "
    "(not Kopf's own watches and patches), by method and HTTP status (0: no answer).",
    ["method", "code"],
    registry=REGISTRY,
)


_refused: contextvars.ContextVar[bool] = contextvars.ContextVar("refused", default=False)


def mark_refused() -> None:
    """The reconcile being observed left its Tenant not Ready (counted as `refused`)."""
    _refused.set(True)


@contextlib.contextmanager
def observe(kind: str, trigger: str) -> Iterator[None]:
    """Count and time one reconcile; an exception counts as an error (one that says it
    is only waiting, as `waiting`) and goes on."""
    started = time.monotonic()
    outcome = "error"
    token = _refused.set(False)
    try:
        yield
        outcome = "refused" if _refused.get() else "ok"
    except BaseException as exc:
        if getattr(exc, "waiting", False):
            outcome = "waiting"
        raise
    finally:
        _refused.reset(token)
        RECONCILES.labels(kind, trigger, outcome).inc()
        RECONCILE_SECONDS.labels(kind).observe(time.monotonic() - started)
