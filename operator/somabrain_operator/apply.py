"""Server-side apply of the children the operator owns, under one field manager.

Applying is tried without `force` first (case K-14): fields another manager took (a
person's `kubectl edit`, a GitOps tool) conflict instead of being silently taken over.
A conflict on an object this Tenant controls is then re-applied with force, which is
what repairs a hand edit of a child; the manager that lost its fields is logged. An
object controlled by someone else is never forced.

Applying an object that exists already would merge into it, whoever it belongs to, so
`claim` checks first that no wanted name is held by an object the Tenant does not
control (another Tenant's, another controller's, or one with no controller at all):
such an object is a `ChildConflict`, and none of the children are applied.

An object is sent only when it is not in place already (cases K-2, K-3): each applied
object carries the digest of what was applied (`somabrain.io/applied`), and a live
object with the digest of the wanted one and every wanted field at its wanted value
is left alone. The digest catches what a comparison of fields cannot: a field the
operator set before and no longer wants, which an apply removes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes import client
from kubernetes.utils import parse_quantity

from somabrain_operator.config import (
    FIELD_MANAGER,
    GROUP,
    RULE_GROUP,
    RULE_PLURAL,
    RULE_VERSION,
)

log = logging.getLogger(__name__)

APPLY = "application/apply-patch+yaml"
APPLIED = f"{GROUP}/applied"


class _KindMissing:
    """What `read` gives for an object whose kind the API server does not serve (a
    PrometheusRule without its CRD, case K-11)."""

    def __repr__(self) -> str:
        return "KIND_MISSING"


KIND_MISSING: Any = _KindMissing()


@dataclasses.dataclass(frozen=True)
class Lives:
    """What `claim` read: each live object by (kind, namespace, name) (a dict, None when
    absent, or KIND_MISSING), and those it adopted from a controller that is gone."""

    objects: dict[tuple[str, str, str], Any] = dataclasses.field(default_factory=dict)
    adopted: frozenset[tuple[str, str, str]] = frozenset()


# resourceVersions of each object as the operator's latest applies left it: a watch
# event carrying one of them is the operator's own write (several, since two quick
# applies of one object send their events after both returned).
_own_versions: dict[tuple[str, str, str], tuple[str, ...]] = {}
_VERSIONS_KEPT = 8
_MAX_REMEMBERED = 100_000
# When the operator deleted an object: the DELETED event that follows is its own.
_own_deletes: dict[tuple[str, str, str], float] = {}
_DELETE_REMEMBERED_SECONDS = 60.0


def _key(obj: Any) -> tuple[str, str, str]:
    meta = obj["metadata"]
    return (str(obj.get("kind")), str(meta.get("namespace")), str(meta.get("name")))


def _remember(obj: dict[str, Any], result: Any) -> None:
    version = (
        result.get("metadata", {}).get("resourceVersion")
        if isinstance(result, dict)
        else getattr(getattr(result, "metadata", None), "resource_version", None)
    )
    if version is None:
        return
    if len(_own_versions) >= _MAX_REMEMBERED:
        _own_versions.clear()
    key = _key(obj)
    _own_versions[key] = (*_own_versions.get(key, ())[-(_VERSIONS_KEPT - 1) :], str(version))


def is_own_write(body: Any) -> bool:
    """Whether a watched object is exactly as one of the operator's latest applies left
    it."""
    version = body.get("metadata", {}).get("resourceVersion")
    return version is not None and str(version) in _own_versions.get(_key(body), ())


def _remember_delete(kind: str, name: str, namespace: str) -> None:
    now = time.monotonic()
    if len(_own_deletes) >= _MAX_REMEMBERED:
        _own_deletes.clear()
    _own_deletes[(kind, namespace, name)] = now


def is_own_delete(body: Any) -> bool:
    """Whether a watched object's deletion is one the operator made a moment ago."""
    at = _own_deletes.pop(_key(body), None)
    return at is not None and time.monotonic() - at < _DELETE_REMEMBERED_SECONDS


@dataclasses.dataclass(frozen=True)
class Controller:
    """The controlling owner named in an object's ownerReferences."""

    kind: str
    name: str
    uid: str
    api_version: str = ""


class ChildConflict(Exception):
    """A child's name is taken by an object this Tenant does not control."""

    def __init__(self, kind: str, name: str, holder: Controller | None) -> None:
        self.kind, self.name, self.holder = kind, name, holder
        by = (
            f"is controlled by {holder.kind} {holder.name} (uid {holder.uid})"
            if holder
            else "has no controller"
        )
        super().__init__(f"{kind} {name} exists and {by}")


@dataclasses.dataclass(frozen=True)
class _Verbs:
    patch: Callable[..., Any]
    read: Callable[..., Any]
    delete: Callable[..., Any]


def _verbs(api: client.ApiClient, kind: str) -> _Verbs:
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    if kind == "ConfigMap":
        return _Verbs(
            core.patch_namespaced_config_map,
            core.read_namespaced_config_map,
            core.delete_namespaced_config_map,
        )
    if kind == "Service":
        return _Verbs(
            core.patch_namespaced_service,
            core.read_namespaced_service,
            core.delete_namespaced_service,
        )
    if kind == "ResourceQuota":
        return _Verbs(
            core.patch_namespaced_resource_quota,
            core.read_namespaced_resource_quota,
            core.delete_namespaced_resource_quota,
        )
    if kind == "Deployment":
        return _Verbs(
            apps.patch_namespaced_deployment,
            apps.read_namespaced_deployment,
            apps.delete_namespaced_deployment,
        )
    if kind == "PrometheusRule":
        custom = client.CustomObjectsApi(api)
        where = (RULE_GROUP, RULE_VERSION)

        def patch(name: str, namespace: str, body: Any, **kw: Any) -> Any:
            return custom.patch_namespaced_custom_object(
                *where, namespace, RULE_PLURAL, name, body, **kw
            )

        def read(name: str, namespace: str) -> Any:
            return custom.get_namespaced_custom_object(*where, namespace, RULE_PLURAL, name)

        def delete(name: str, namespace: str, **kw: Any) -> Any:
            return custom.delete_namespaced_custom_object(
                *where, namespace, RULE_PLURAL, name, **kw
            )

        return _Verbs(patch, read, delete)
    raise ValueError(f"the operator does not manage objects of kind {kind}")


def controller_of(live: Any) -> Controller | None:
    """The controller in a live object's ownerReferences (typed or dict), if any."""
    if isinstance(live, dict):
        owners = live.get("metadata", {}).get("ownerReferences") or []
        return next(
            (
                Controller(
                    str(o.get("kind")), str(o.get("name")), str(o["uid"]), str(o.get("apiVersion"))
                )
                for o in owners
                if o.get("controller")
            ),
            None,
        )
    owners = (live.metadata.owner_references if live.metadata else None) or []
    return next(
        (
            Controller(str(o.kind), str(o.name), str(o.uid), str(o.api_version))
            for o in owners
            if o.controller
        ),
        None,
    )


def controller_uid(live: Any) -> str | None:
    """The uid of the controller in a live object's ownerReferences (typed or dict)."""
    holder = controller_of(live)
    return holder.uid if holder else None


def read(api: client.ApiClient, kind: str, *, name: str, namespace: str) -> Any:
    """The live object as a dict; None when it does not exist, KIND_MISSING when the
    API server does not serve its kind."""
    try:
        if kind == "PrometheusRule":
            found: dict[str, Any] = _verbs(api, kind).read(name, namespace)
            return found
        # The JSON as it came: the client's typed models cost far more to build.
        response = _verbs(api, kind).read(name, namespace, _preload_content=False)
        raw: dict[str, Any] = json.loads(response.data)
        return raw
    except client.ApiException as exc:
        if exc.status != 404:
            raise
        # An object that is not there is a NotFound Status naming it; a path the API
        # server does not serve at all is a plain "404 page not found".
        return None if _names_object(exc) else KIND_MISSING


def _names_object(exc: client.ApiException) -> bool:
    try:
        details = json.loads(exc.body or "").get("details") or {}
    except (ValueError, AttributeError):
        return False
    return bool(details.get("name"))


def claim(
    api: client.ApiClient,
    objs: list[dict[str, Any]],
    *,
    controller: str,
    gone: Callable[[Controller], bool] = lambda _: False,
) -> Lives:
    """Raise `ChildConflict` for the first of `objs` whose name is held by an existing
    object that `controller` (a Tenant's uid) does not control, unless its controller is
    `gone` (a Tenant deleted with its children left for the garbage collector): that
    object is adopted. Else the live objects read, for `apply` to tell which are in
    place already."""
    objects: dict[tuple[str, str, str], Any] = {}
    adopted = set()
    for obj in objs:
        meta = obj["metadata"]
        live = read(api, obj["kind"], name=meta["name"], namespace=meta["namespace"])
        holder = controller_of(live) if isinstance(live, dict) else None
        if isinstance(live, dict) and (holder is None or holder.uid != controller):
            if holder is None or not gone(holder):
                raise ChildConflict(obj["kind"], meta["name"], holder)
            log.info(
                "%s %s/%s was controlled by %s %s (uid %s), which no longer exists; "
                "adopted by the Tenant of uid %s",
                obj["kind"], meta["namespace"], meta["name"], holder.kind, holder.name,
                holder.uid, controller,
            )  # fmt: skip
            adopted.add(_key(obj))
        objects[_key(obj)] = live
    return Lives(objects, frozenset(adopted))


def stamped(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` with the digest of its content in annotation APPLIED."""
    meta = obj["metadata"]
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != APPLIED}
    bare = {**obj, "metadata": {**meta, "annotations": annotations}}
    if not annotations:
        del bare["metadata"]["annotations"]
    text = json.dumps(bare, sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:20]
    return {
        **bare,
        "metadata": {**bare["metadata"], "annotations": {**annotations, APPLIED: digest}},
    }


def in_place(wanted: Mapping[str, Any], live: Any) -> bool:
    """Whether applying `wanted` (stamped) would change nothing on `live`: the live
    object carries its digest and every wanted field at the wanted value (lists of the
    same length, item by item; fields the API server or others added are ignored)."""
    return isinstance(live, dict) and _contains(live, wanted)


def _contains(have: Any, want: Any) -> bool:
    if isinstance(want, Mapping):
        return isinstance(have, Mapping) and all(
            k in have and _contains(have[k], v) for k, v in want.items()
        )
    if isinstance(want, list):
        return (
            isinstance(have, list)
            and len(have) == len(want)
            and all(_contains(h, w) for h, w in zip(have, want, strict=True))
        )
    if isinstance(want, str) and isinstance(have, str) and have != want:
        return _same_quantity(have, want)
    return bool(have == want)


def _same_quantity(have: str, want: str) -> bool:
    """Whether two strings are one resource quantity, as the API server writes back a
    quantity in its canonical form (0.5 as 500m, 1024Mi as 1Gi): otherwise a child
    with such a value would never be in place and be sent again at every visit."""
    try:
        return bool(parse_quantity(have) == parse_quantity(want))  # type: ignore[no-untyped-call]
    except ValueError:
        return False


def apply(
    api: client.ApiClient, obj: dict[str, Any], *, controller: str, lives: Lives | None = None
) -> bool:
    """Converge one object on `obj`: created if missing, our fields set, others' left
    alone; `controller` is the uid of the Tenant that must control it. With `lives`
    (from `claim`), an object found in place is not sent. True when it was sent."""
    lives = lives or Lives()
    adopted = _key(obj) in lives.adopted
    return _apply(
        api,
        obj,
        ours=lambda live: adopted or controller_uid(live) == controller,
        holder=controller_of,
        live=lives.objects.get(_key(obj)),
    )


def apply_shared(api: client.ApiClient, obj: dict[str, Any]) -> bool:
    """Like `apply`, for an object of a shared pool, owned by every member and controlled
    by none: it is ours when it carries the labels `obj` has. It is read first, and
    not sent when in place."""
    wanted = obj["metadata"]["labels"]
    meta = obj["metadata"]
    return _apply(
        api,
        obj,
        ours=lambda live: has_labels(live, wanted),
        holder=lambda _: None,
        live=read(api, obj["kind"], name=meta["name"], namespace=meta["namespace"]),
    )


def _apply(
    api: client.ApiClient,
    obj: dict[str, Any],
    *,
    ours: Callable[[Any], bool],
    holder: Callable[[Any], Controller | None],
    live: Any = None,
) -> bool:
    obj = stamped(obj)
    kind, meta = obj["kind"], obj["metadata"]
    if live is KIND_MISSING:
        raise client.ApiException(status=404, reason=f"the API server does not serve {kind}")
    if in_place(obj, live) and ours(live):
        return False
    verbs = _verbs(api, kind)
    options: dict[str, Any] = {"field_manager": FIELD_MANAGER, "_content_type": APPLY}
    try:
        _remember(obj, verbs.patch(meta["name"], meta["namespace"], obj, **options))
        return True
    except client.ApiException as exc:
        if exc.status != 409:
            raise
        conflict = exc
    live = read(api, kind, name=meta["name"], namespace=meta["namespace"])
    if not isinstance(live, dict) or not ours(live):
        raise ChildConflict(
            kind, meta["name"], holder(live) if isinstance(live, dict) else None
        ) from conflict
    log.warning(
        "%s %s/%s had fields changed by another manager; restoring them (%s)",
        kind,
        meta["namespace"],
        meta["name"],
        _message(conflict),
    )
    _remember(obj, verbs.patch(meta["name"], meta["namespace"], obj, force=True, **options))
    return True


def _labels(live: Any) -> dict[str, str]:
    if isinstance(live, dict):
        return dict(live.get("metadata", {}).get("labels") or {})
    return dict((live.metadata.labels if live.metadata else None) or {})


def has_labels(live: Any, wanted: Mapping[str, str]) -> bool:
    """Whether a live object (typed or dict) carries every label of `wanted`."""
    have = _labels(live)
    return all(have.get(k) == v for k, v in wanted.items())


def _message(exc: client.ApiException) -> str:
    """The API server's own sentence from an error response."""
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except ValueError:
        return str(exc.reason)


def delete(api: client.ApiClient, kind: str, *, name: str, namespace: str, controller: str) -> bool:
    """Delete a child no longer wanted, if it exists and `controller` controls it."""
    return _delete(
        api, kind, name=name, namespace=namespace,
        ours=lambda live: controller_uid(live) == controller,
    )  # fmt: skip


def delete_shared(
    api: client.ApiClient, kind: str, *, name: str, namespace: str, labels: dict[str, str]
) -> bool:
    """Delete a pool's object no longer wanted, if it exists and carries `labels`."""
    return _delete(
        api, kind, name=name, namespace=namespace, ours=lambda live: has_labels(live, labels)
    )


def _delete(
    api: client.ApiClient, kind: str, *, name: str, namespace: str, ours: Callable[[Any], bool]
) -> bool:
    live = read(api, kind, name=name, namespace=namespace)
    if not isinstance(live, dict) or not ours(live):
        return False
    _remember_delete(kind, name, namespace)
    try:
        _verbs(api, kind).delete(name, namespace)
    except client.ApiException as exc:
        if exc.status != 404:
            raise
    return True
