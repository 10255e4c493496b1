"""Reconciliation of Tenant resources: one level-based function for every trigger.

Create, update and resume all run `reconcile_tenant`, which computes the desired
children from the spec and applies them; applying what already matches changes nothing.
The Tenant's status gets a `Ready` condition with the generation it describes.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any

import kopf
import pydantic
from kubernetes import client

from somabrain_operator import children
from somabrain_operator.apply import apply, controller_of
from somabrain_operator.config import GROUP, TENANT_PLURAL, VERSION, OperatorSettings
from somabrain_operator.resources import TenantSpec, resolve

log = logging.getLogger(__name__)


def condition(
    kind: str,
    *,
    ok: bool,
    reason: str,
    message: str,
    generation: int,
    previous: list[Mapping[str, Any]],
) -> dict[str, Any]:
    """A status condition whose lastTransitionTime moves only when its status changes."""
    status = "True" if ok else "False"
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    before = next((c for c in previous if c.get("type") == kind), None)
    since = before["lastTransitionTime"] if before and before.get("status") == status else now
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": since,
    }


@kopf.on.resume(GROUP, VERSION, TENANT_PLURAL)
@kopf.on.create(GROUP, VERSION, TENANT_PLURAL)
@kopf.on.update(GROUP, VERSION, TENANT_PLURAL, field="spec")
def reconcile_tenant(
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    name: str,
    namespace: str | None,
    uid: str,
    patch: kopf.Patch,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    assert namespace is not None, "Tenant is a namespaced resource"
    generation = int(meta.get("generation", 0))
    previous = list(status.get("conditions", []))
    try:
        tenant = TenantSpec.from_body(spec)
    except pydantic.ValidationError as exc:
        patch.status["conditions"] = [
            condition(
                "Ready",
                ok=False,
                reason="InvalidSpec",
                message=str(exc).replace("\n", "; "),
                generation=generation,
                previous=previous,
            )
        ]
        raise kopf.PermanentError(f"Tenant {namespace}/{name} has an invalid spec: {exc}") from exc

    mode = resolve(tenant).publisher_mode
    patch.status["publisherMode"] = mode
    if mode != "dedicated":
        # Shared pools are not reconciled yet: a Deployment of its own would be wrong.
        message = (
            f"publisher mode {mode} is not reconciled by this operator version; "
            "set spec.publisher.mode to dedicated, or run the pool's publisher yourself"
        )
        patch.status["conditions"] = [
            condition(
                "Ready",
                ok=False,
                reason="PublisherModeUnsupported",
                message=message,
                generation=generation,
                previous=previous,
            )
        ]
        raise kopf.PermanentError(f"Tenant {namespace}/{name}: {message}")

    settings = OperatorSettings()
    owner = children.owner_reference(name=name, uid=uid)
    config = children.config_map(tenant, namespace=namespace, owner=owner)
    deployment = children.deployment(
        tenant, namespace=namespace, owner=owner, settings=settings, config=config
    )
    try:
        with client.ApiClient() as api:
            holder = controller_of(api, deployment)
            if holder is not None and holder != uid:
                message = (
                    f"tenant id {tenant.tenant_id} is already served by another Tenant in "
                    f"{namespace} (its Deployment {deployment['metadata']['name']}); "
                    "give this Tenant another tenantId or delete one of the two"
                )
                patch.status["conditions"] = [
                    condition(
                        "Ready",
                        ok=False,
                        reason="TenantIdConflict",
                        message=message,
                        generation=generation,
                        previous=previous,
                    )
                ]
                raise kopf.TemporaryError(message, delay=60)
            apply(api, config)
            apply(api, deployment)
    except client.ApiException as exc:
        raise kopf.TemporaryError(
            f"applying children of Tenant {namespace}/{name} failed ({exc.status} {exc.reason});"
            " will retry in 10 s",
            delay=10,
        ) from exc

    logger.info(
        "tenant %s: publisher Deployment %s and ConfigMap %s applied (generation %d)",
        tenant.tenant_id,
        deployment["metadata"]["name"],
        config["metadata"]["name"],
        generation,
    )
    patch.status["observedGeneration"] = generation
    patch.status["children"] = {
        "deployment": deployment["metadata"]["name"],
        "configMap": config["metadata"]["name"],
    }
    patch.status["conditions"] = [
        condition(
            "Ready",
            ok=True,
            reason="ChildrenApplied",
            message=f"publisher Deployment {deployment['metadata']['name']} applied",
            generation=generation,
            previous=previous,
        )
    ]
