"""Entry point: `somabrain-operator` (or `python -m somabrain_operator`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
import textwrap
import time
from typing import Any

import kopf
import pydantic
import pydantic_settings
from kubernetes import client
from kubernetes import config as kube_config
from prometheus_client import start_http_server
from pydantic.fields import FieldInfo

# Importing the handler modules registers them with Kopf.
from somabrain_operator import peering, policies, tenant, watch  # noqa: F401
from somabrain_operator.config import GROUP, POLICY_PLURAL, TENANT_PLURAL, OperatorSettings
from somabrain_operator.loop import Loop
from somabrain_operator.metrics import REGISTRY
from somabrain_operator.state import KNOWN
from somabrain_operator.tenant import Waiting

log = logging.getLogger(__name__)


class _CleanupProgress(logging.Filter):
    """Kopf logs every retry of a handler as an error; a clean-up that is only waiting
    (a drain, chunks of deletion) is progress, logged at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and Waiting.MARK in record.getMessage():
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


class _RoutineSuccess(logging.Filter):
    """Kopf logs at INFO each handler that succeeded and each event it processed: five
    lines for a new Tenant and one per child event, saying nothing the operator's own
    line per reconcile (what it applied, what it found) does not. They are kept at
    --log-level debug; failures and retries are WARNING or ERROR and always pass."""

    ROUTINE = re.compile(
        r"(Handler '[^']+' succeeded|\w+ is processed: \d+ succeeded; 0 failed)\.$"
    )

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or log.isEnabledFor(logging.DEBUG):
            return True
        return self.ROUTINE.fullmatch(record.getMessage()) is None


class _RetriedRequest(logging.Filter):
    """Kopf logs a failed API request it is about to retry as an error (for example a
    429 while the API server initialises a CRD's storage); it is a warning, and only
    the request given up on ("escalating") is an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage() if record.levelno == logging.ERROR else ""
        if message.startswith("Request attempt") and "; will retry:" in message:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class MissingCRDs(Exception):
    pass


def check_own_crds(api: client.ApiClient) -> None:
    """Stop at once, saying what to do, when the operator's own CRDs are not installed
    (case K-11): without them it could only wait forever."""
    extensions = client.ApiextensionsV1Api(api)
    missing = []
    for plural in (TENANT_PLURAL, POLICY_PLURAL):
        try:
            extensions.read_custom_resource_definition(f"{plural}.{GROUP}")
        except client.ApiException as exc:
            if exc.status != 404:
                raise
            missing.append(f"{plural}.{GROUP}")
    if missing:
        raise MissingCRDs(
            f"the CustomResourceDefinitions {', '.join(missing)} are not installed; "
            "apply them first: kubectl apply -f crds/"
        )


def _join(api: client.ApiClient, me: peering.Peering, *, lifetime: int) -> None:
    """Join the peers before Kopf looks at them (see somabrain_operator.peering)."""
    if peering.ensure_object(api, me.name):
        log.info("created the ClusterKopfPeering %s", me.name)
    peering.join(api, me, lifetime=lifetime)
    log.info(
        "joined the peers of %s; waiting %g s for peers starting alongside",
        me.name,
        peering.JOIN_SECONDS,
    )
    time.sleep(peering.JOIN_SECONDS)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **indices: Any) -> None:
    ours = KNOWN.settings
    # Each watch request is ended by the API server after the server timeout and given
    # up by the operator after the client timeout, even if nothing came: a connection
    # gone silent without closing is noticed within the client timeout (case K-9).
    settings.watching.server_timeout = ours.watch_server_timeout_seconds
    settings.watching.client_timeout = ours.watch_client_timeout_seconds
    # Kopf's other requests (lists, status patches) are bounded too, and retried.
    settings.networking.request_timeout = ours.api_request_timeout_seconds
    settings.posting.level = logging.WARNING
    logging.getLogger("kopf.objects").addFilter(_CleanupProgress())
    logging.getLogger("kopf.objects").addFilter(_RoutineSuccess())
    # Kopf's own progress records go into annotations; nothing else of Kopf's in status.
    settings.persistence.finalizer = f"{GROUP}/cleanup"
    try:
        kube_config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kube_config.ConfigException:
        kube_config.load_kube_config()  # type: ignore[no-untyped-call]
    # One connection per thread that may send requests at once: Kopf's handler threads
    # (asyncio's default executor unless max_workers is set) and the status loop.
    workers = settings.execution.max_workers or min(32, (os.cpu_count() or 1) + 4)
    KNOWN.share_api(connections=workers + 1)
    KNOWN.executor = settings.execution.executor
    api = KNOWN.api()
    try:
        check_own_crds(api)
        if KNOWN.peering is not None:
            _join(api, KNOWN.peering, lifetime=settings.peering.lifetime)
    except (MissingCRDs, peering.MissingPeeringCRD) as exc:
        raise kopf.PermanentError(str(exc)) from exc
    # Kopf passes every index to every handler, by the indexing function's name.
    KNOWN.tenants = indices["tenant_bodies"]
    KNOWN.by_policy = indices["tenants_by_policy"]
    KNOWN.by_pool = indices["tenants_by_pool"]
    KNOWN.by_id = indices["tenants_by_id"]
    KNOWN.policies = indices["policy_bodies"]
    Loop(KNOWN.settings, KNOWN.peering).start()
    log.info(
        "operator started: backlog from %s every %g s; watch requests end after %d s and "
        "are given up after %g s; every Tenant repaired once in %g s",
        "the outbox database" if ours.database_url else "nowhere (no database access)",
        ours.status_interval_seconds,
        ours.watch_server_timeout_seconds,
        ours.watch_client_timeout_seconds,
        ours.repair_interval_seconds,
    )
    if not ours.database_url:
        log.warning(
            "no database URL (SOMABRAIN_OPERATOR_DATABASE_URL or DATABASE_URL): Tenants "
            "show no backlog, PublisherAvailable stays Unknown, and deletionPolicy Drain "
            "and Delete leave the events in the outbox"
        )


@kopf.on.cleanup()
def stop(**_: Any) -> None:
    KNOWN.stop.set()


def _described(field: FieldInfo) -> str:
    """A setting's description, with its default unless it has none worth showing."""
    text = (field.description or "").rstrip(".")
    value = field.get_default(call_default_factory=True)
    if value is None or value == {}:
        return f"{text}."
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{text} (default {shown})."


def _settings_failure(exc: Exception) -> str:
    """What is wrong with the operator's environment, naming each variable."""
    if isinstance(exc, pydantic.ValidationError):
        problems = []
        for error in exc.errors():
            message = str(error["msg"]).removeprefix("Value error, ")
            if not error["loc"]:  # a rule across settings, which names them itself
                problems.append(message)
                continue
            variable = f"SOMABRAIN_OPERATOR_{str(error['loc'][0]).upper()}"
            problems.append(f"{variable}: {message} (got {error.get('input')!r})")
        return "invalid operator settings: " + "; ".join(problems)
    # A value that is not JSON where JSON is wanted (SOMABRAIN_OPERATOR_RULE_LABELS).
    named = re.search(r'field "(\w+)"', str(exc))
    variable = f"SOMABRAIN_OPERATOR_{named.group(1).upper()}" if named else "a setting"
    return f"invalid operator settings: {variable} is not valid JSON ({exc})"


def main(argv: list[str] | None = None) -> None:
    """Run the operator for all namespaces until SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="somabrain-operator",
        description=textwrap.fill(
            "Reconcile somabrain.io Tenants and OutboxPolicies into publisher Deployments, "
            "ConfigMaps, Services, PrometheusRules and ResourceQuotas in every namespace. "
            "Uses the in-cluster service account, else $KUBECONFIG.",
            width=88,
        ),
        # One wrapped paragraph per setting, as argparse wraps options.
        epilog="settings (environment variables):\n\n"
        + "\n".join(
            textwrap.fill(
                f"SOMABRAIN_OPERATOR_{name.upper()}: {_described(field)}",
                width=88,
                initial_indent="  ",
                subsequent_indent="      ",
            )
            for name, field in OperatorSettings.model_fields.items()
        )
        + "\n\nexample:\n  KUBECONFIG=~/.kube/config somabrain-operator --metrics-port 8080",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="serve the operator's metrics on this port (0: off, the default)",
    )
    parser.add_argument(
        "--peering",
        metavar="NAME",
        default=None,
        help="run with Kopf peering under NAME (a ClusterKopfPeering object, created if "
        "missing; its CRD must be installed), so that only the process of highest "
        "--priority acts and the others stand by, taking over when it stops",
    )
    parser.add_argument(
        "--priority",
        type=int,
        default=None,
        help="this process's priority in peering (default: a random one, so that replicas "
        "started alike differ; peers of equal priority all pause)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning"),
        default="info",
        help="info (the default): one line per reconcile and per transition, warnings and "
        "errors; debug adds Kopf's line for every handler run and API request; warning "
        "keeps only what needs attention",
    )
    args = parser.parse_args(argv)
    if args.priority is not None and args.peering is None:
        parser.error("--priority needs --peering")
    try:
        KNOWN.settings = OperatorSettings()
    except (pydantic.ValidationError, pydantic_settings.SettingsError) as exc:
        sys.stderr.write(f"FAILED: {_settings_failure(exc)}\n")
        raise SystemExit(2) from exc
    if args.metrics_port:
        start_http_server(args.metrics_port, registry=REGISTRY)
    # Kopf's formatter prefixes each line about an object with its namespace/name; the
    # logger's name in full (Kopf's own format cuts it to 20 characters).
    kopf.configure(
        log_format="[%(asctime)s] %(levelname)-7s %(name)s: %(message)s",  # type: ignore[arg-type]
        log_prefix=True,
        debug=args.log_level == "debug",
        quiet=args.log_level == "warning",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_RetriedRequest())
    if args.peering is None:
        asyncio.run(kopf.operator(clusterwide=True, standalone=True))
        return
    KNOWN.peering = peering.Peering(
        name=args.peering,
        priority=peering.random_priority() if args.priority is None else args.priority,
        identity=peering.new_identity(),
    )
    log.info(
        "peering under %s as %s, priority %d",
        KNOWN.peering.name,
        KNOWN.peering.identity,
        KNOWN.peering.priority,
    )
    asyncio.run(
        kopf.operator(
            clusterwide=True,
            standalone=False,
            peering_name=KNOWN.peering.name,
            priority=KNOWN.peering.priority,
            identity=KNOWN.peering.identity,  # type: ignore[arg-type]
        )
    )


if __name__ == "__main__":
    main()
