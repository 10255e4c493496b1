"""Kopf peering: several operator processes, one acting at a time (case K-7).

With `somabrain-operator --peering NAME`, every process records itself (identity,
priority, when last seen, for how long that holds) in the status of the
ClusterKopfPeering object NAME, and Kopf pauses the watches and handlers of a process
as long as a live peer has a higher priority, or the same one (then every process of
that priority pauses). The operator is cluster-wide, so only the cluster-scoped kind
is used.

What Kopf does not cover, this module does:

- the ClusterKopfPeering CRD (`crd()`, written into the chart by `make crds`) and the
  peering object itself (`ensure_object`, at startup): without the object Kopf would
  stay paused forever, silently;
- joining before acting (`join`, then `JOIN_SECONDS` of waiting, at startup): Kopf
  decides on the first peering event it sees, so of two processes started together
  the first to look would act on everything it lists until the other shows up. With
  each recorded before either looks, the lower one never acts, and a newcomer of
  higher priority pauses the running peers before it acts itself;
- `Peering.acting`, Kopf's rule read from the same peering object, for the operator's
  own background loop, which runs outside Kopf's handlers and must stand by too;
- `new_identity` and `random_priority`: replicas of one Deployment share their
  arguments, and peers of equal priority would all pause, so each process draws its
  own priority unless one is given.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import secrets
import socket
from collections.abc import Mapping
from typing import Any

from kubernetes import client

log = logging.getLogger(__name__)

GROUP = "kopf.dev"
VERSION = "v1"
KIND = "ClusterKopfPeering"
PLURAL = "clusterkopfpeerings"
CRD_NAME = f"{PLURAL}.{GROUP}"
# Drawn priorities stay below 2**31, a safe integer for every JSON reader.
MAX_RANDOM_PRIORITY = 2**31 - 1
# How long a process waits between recording itself and letting Kopf decide: peers
# that start within this time of each other never act at once.
JOIN_SECONDS = 5.0


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition of the ClusterKopfPeering kind, as Kopf reads and
    writes it: a cluster-scoped object whose status maps each peer's identity to its
    priority, lifetime and last-seen time (no status subresource: Kopf patches the
    object itself)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            # Other Kopf operators of the cluster may use it; Helm never deletes it.
            "annotations": {"helm.sh/resource-policy": "keep"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Cluster",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "Operators that peer under this name, and which "
                            "of them may act (Kopf peering).",
                            "properties": {
                                "status": {
                                    "type": "object",
                                    "description": "Each peer's priority, lifetime (s) and "
                                    "last-seen time, by identity; written by the peers.",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                }
                            },
                        }
                    },
                }
            ],
        },
    }


def new_identity() -> str:
    """A peer identity unique to this process: host (the pod's name in a cluster),
    process id, and a random suffix."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"


def random_priority() -> int:
    return 1 + secrets.randbelow(MAX_RANDOM_PRIORITY)


class MissingPeeringCRD(Exception):
    pass


def ensure_object(api: client.ApiClient, name: str) -> bool:
    """Create the ClusterKopfPeering `name` unless it exists; True when created."""
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": name}}
    try:
        client.CustomObjectsApi(api).create_cluster_custom_object(GROUP, VERSION, PLURAL, body)
    except client.ApiException as exc:
        if exc.status == 409:
            return False
        if exc.status == 404:
            raise MissingPeeringCRD(
                f"--peering {name} needs the CustomResourceDefinition {CRD_NAME}; install "
                "the chart with peering.enabled=true, or apply "
                "charts/somabrain-operator/files/peering-crds/"
            ) from exc
        raise
    return True


def _alive(info: Any, now: dt.datetime) -> bool:
    """Whether a peer's record still holds: last seen less than its lifetime ago."""
    if not isinstance(info, Mapping) or not info.get("lastseen"):
        return False
    try:
        seen = dt.datetime.fromisoformat(str(info["lastseen"]).replace("Z", "+00:00"))
        lifetime = float(info.get("lifetime", 60))
    except (TypeError, ValueError):
        return False
    if seen.tzinfo is None:
        seen = seen.replace(tzinfo=dt.UTC)
    return now < seen + dt.timedelta(seconds=lifetime)


def _priority(info: Mapping[str, Any]) -> int:
    try:
        return int(info.get("priority", 0))
    except (TypeError, ValueError):
        return 0


@dataclasses.dataclass(frozen=True)
class Peering:
    """This process's place among the peers of `name`."""

    name: str
    priority: int
    identity: str

    def acting(self, peers: Mapping[str, Any] | None, now: dt.datetime) -> bool:
        """Whether Kopf lets this process act, given the peering object's status:
        its own record is live (Kopf has joined) and no other live peer has the same
        or a higher priority."""
        peers = peers or {}
        if not _alive(peers.get(self.identity), now):
            return False
        return not any(
            _alive(info, now) and _priority(info) >= self.priority
            for identity, info in peers.items()
            if identity != self.identity
        )

    def read_peers(self, api: client.ApiClient) -> Mapping[str, Any] | None:
        """The peering object's status, None when the object is missing."""
        try:
            obj: Mapping[str, Any] = client.CustomObjectsApi(api).get_cluster_custom_object(  # type: ignore[assignment]
                GROUP, VERSION, PLURAL, self.name
            )
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        status = obj.get("status")
        return status if isinstance(status, Mapping) else {}


def join(api: client.ApiClient, me: Peering, *, lifetime: int) -> None:
    """Record this process among the peers of `me.name`, as Kopf's keep-alive does
    (and will again, every `lifetime` seconds less a few, once it runs)."""
    record = {
        "priority": me.priority,
        "lifetime": lifetime,
        "lastseen": dt.datetime.now(dt.UTC).isoformat(),
    }
    client.CustomObjectsApi(api).patch_cluster_custom_object(
        GROUP, VERSION, PLURAL, me.name, {"status": {me.identity: record}}
    )
