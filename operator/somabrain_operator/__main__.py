"""Entry point: `somabrain-operator` (or `python -m somabrain_operator`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

import kopf
from kubernetes import config as kube_config

from somabrain_operator import tenant  # noqa: F401 - registers the handlers

log = logging.getLogger(__name__)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Watches that end on their own are re-established; a silent dead connection is not.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.posting.level = logging.WARNING
    try:
        kube_config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kube_config.ConfigException:
        kube_config.load_kube_config()  # type: ignore[no-untyped-call]


def main(argv: list[str] | None = None) -> None:
    """Run the operator for all namespaces until SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="somabrain-operator",
        description="Reconcile somabrain.io Tenants into publisher Deployments and ConfigMaps "
        "in every namespace. Uses the in-cluster service account, else $KUBECONFIG.",
        epilog="settings: SOMABRAIN_OPERATOR_PUBLISHER_IMAGE (image of publisher pods), "
        "SOMABRAIN_OPERATOR_CONNECTION_SECRET (Secret with DATABASE_URL and "
        "KAFKA_BOOTSTRAP_SERVERS in each Tenant's namespace). example: "
        "KUBECONFIG=~/.kube/config somabrain-operator",
    )
    parser.parse_args(argv)
    # Kopf's formatter prefixes each line about an object with its namespace/name.
    kopf.configure(log_format=kopf.LogFormat.FULL, log_prefix=True)
    asyncio.run(kopf.operator(clusterwide=True, standalone=True))


if __name__ == "__main__":
    main()
