"""The admin HTTP API: see a tenant's backlog, replay what failed, purge what was sent.

It runs as its own process (`somabrain admin serve`), not inside the publishers: it
answers across tenants while a publisher serves one or one pool, it needs the database
but never Kafka, its token Secret is mounted only where it runs, and a slow listing or a
large replay never takes time from delivery.

Every path under /v1 needs a bearer token (see `auth`). A token scoped to tenants gets
404 for any other tenant, exactly as for a tenant that does not exist, and never sees
another tenant's events through any filter or id; purge needs an admin token. Every
replay and purge is recorded in `outbox_admin_actions` and logged. The OpenAPI
description is served at /openapi.json (and browsable at /docs).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Self

import prometheus_client
import pydantic
import sqlalchemy.exc
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from somabrain.config.errors import InvalidSelection
from somabrain.config.types import TENANT_ID_PATTERN, TenantId
from somabrain.delivery import metrics
from somabrain.edges.admin.auth import Caller, TokenFile
from somabrain.store import admin as store
from somabrain.store.outbox import TenantCounts, tenant_counts

MAX_PAGE = 1000
MAX_IDS = 1000

TenantPath = Annotated[
    str,
    Path(
        pattern=TENANT_ID_PATTERN,
        description="Tenant id: lowercase letters, digits and dashes, at most 40.",
    ),
]


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("holds a NUL character (\\u0000), which no event can hold; remove it")
    return value


# Every string the API passes to SQL: PostgreSQL text cannot hold NUL, so one is refused
# here, naming the field, rather than failing in the database driver.
SqlText = Annotated[str, pydantic.AfterValidator(_no_nul)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Counts(_Model):
    """A tenant's events by status, and the age of its oldest pending one."""

    tenant: str
    pending: int
    sent: int
    dead: int = Field(description="Dead events, the set-aside rows left out.")
    oldest_pending_seconds: float | None = Field(
        description="Age of the oldest pending event; null when none is pending."
    )
    set_aside: int = Field(
        description="Rows migration 0003 set aside as repeats of another event's dedupe "
        "key: dead so they are never published, never replayed, not counted as dead."
    )

    @classmethod
    def of(cls, counts: TenantCounts) -> Self:
        return cls(
            tenant=counts.tenant_id,
            pending=counts.pending,
            sent=counts.sent,
            dead=counts.dead,
            oldest_pending_seconds=counts.oldest_pending_seconds,
            set_aside=counts.set_aside,
        )


class Summary(_Model):
    tenants: list[Counts] = Field(description="Every tenant this token may see, by id.")


class Event(_Model):
    """One event, without its payload and headers."""

    id: int = Field(description="Database id: the order events are delivered in.")
    event_id: uuid.UUID
    topic: str
    key: str | None
    event_type: str | None
    state: store.Selectable
    attempts: int
    last_error: str | None
    created_at: dt.datetime
    sent_at: dt.datetime | None
    partition: int | None
    offset: int | None

    @classmethod
    def of(cls, e: store.EventSummary) -> Self:
        return cls(
            id=e.id,
            event_id=e.event_id,
            topic=e.topic,
            key=e.key,
            event_type=e.event_type,
            state=e.state,
            attempts=e.attempts,
            last_error=e.last_error,
            created_at=e.created_at,
            sent_at=e.sent_at,
            partition=e.partition,
            offset=e.offset,
        )


class EventPage(_Model):
    events: list[Event]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page."
    )


class EventInFull(Event):
    tenant: str
    dedupe_key: str
    payload: Any
    headers: dict[str, str]
    next_attempt_at: dt.datetime


class Filter(_Model):
    """Which of the tenant's events an action applies to. Omitted fields match all."""

    states: list[store.Selectable] = Field(
        default_factory=list,
        description="Replay: dead and/or failed (default: dead only). Purge: sent only "
        "(the default); any other state is refused with 422.",
    )
    topic: SqlText | None = Field(default=None, min_length=1, max_length=249)
    key: SqlText | None = None
    since: AwareDatetime | None = Field(default=None, description="Created at or after.")
    until: AwareDatetime | None = Field(default=None, description="Created before.")

    def of_tenant(self, tenant: str) -> store.EventFilter:
        return store.EventFilter(
            tenant_id=TenantId(tenant),
            states=frozenset(self.states),
            topic=self.topic,
            key=self.key,
            created_after=self.since,
            created_before=self.until,
        )


class ReplayRequest(_Model):
    """Replay by `event_ids` or by `filter`, not both."""

    event_ids: list[uuid.UUID] | None = Field(default=None, min_length=1, max_length=MAX_IDS)
    filter: Filter | None = None
    dry_run: bool = Field(default=False, description="Report what would change; change nothing.")

    @pydantic.model_validator(mode="after")
    def _one_selection(self) -> Self:
        if (self.event_ids is None) == (self.filter is None):
            raise ValueError("give either event_ids or filter")
        if self.filter is not None:
            _only_states(
                self.filter,
                store.REPLAYABLE,
                "cannot be replayed (only dead and failed events can)",
            )
        return self


def _only_states(selection: Filter, allowed: frozenset[store.Selectable], why: str) -> None:
    refused = set(selection.states) - allowed
    if refused:
        raise ValueError(f"filter.states: {', '.join(sorted(refused))} {why}")


class ReplayResult(_Model):
    dry_run: bool
    rows: int = Field(description="Events moved back to pending (or that would be).")
    overtaken: int = Field(
        description="Of those, events a later event of their key was already sent before: "
        "they reach Kafka after it (poison policy skip)."
    )
    outcomes: dict[uuid.UUID, store.IdOutcome] | None = Field(
        default=None, description="Replay by ids: what happened to each id."
    )
    audit_id: int | None = Field(description="The action's row in the audit trail.")


class PurgeRequest(_Model):
    filter: Filter = Field(default_factory=Filter)
    dry_run: bool = False

    @pydantic.model_validator(mode="after")
    def _sent_only(self) -> Self:
        _only_states(
            self.filter, store.PURGEABLE, "cannot be purged (only sent events are ever deleted)"
        )
        return self


class PurgeResult(_Model):
    dry_run: bool
    rows: int = Field(description="Sent events deleted (or that would be).")
    audit_id: int | None


class Action(_Model):
    id: int
    actor: str
    action: store.ActionKind
    tenant: str
    selection: dict[str, Any]
    rows: int
    started_at: dt.datetime
    finished_at: dt.datetime | None = Field(description="Null while running, or if it stopped.")


class ActionList(_Model):
    actions: list[Action]


class Problem(_Model):
    detail: str


def _encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"after:{last_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, value = raw.partition(":")
        if prefix != "after":
            raise ValueError(raw)
        return int(value)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise HTTPException(400, "cursor: not a cursor this API gave out") from None


_NOT_VISIBLE = "no such tenant for this token"
_BAD_CURSOR: dict[str, Any] = {"model": Problem, "description": "A cursor this API never gave."}
_NOT_JSON: dict[str, Any] = {"model": Problem, "description": "A body not sent as JSON."}
_bearer = HTTPBearer(auto_error=False)


def _caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            401, "send a token: Authorization: Bearer <token>", {"WWW-Authenticate": "Bearer"}
        )
    tokens: TokenFile = request.app.state.tokens
    found = tokens.caller(credentials.credentials)
    if found is None:
        raise HTTPException(401, "token not known", {"WWW-Authenticate": "Bearer"})
    return found


CallerDep = Annotated[Caller, Depends(_caller)]


def create_app(sessions: sessionmaker[Session], tokens: TokenFile) -> FastAPI:
    """The API over this database, for the holders of these tokens."""
    app = FastAPI(
        title="SomaBrain admin API",
        version="1",
        description=__doc__,
        responses={
            401: {"model": Problem, "description": "No token, or one not known."},
            422: {"model": Problem, "description": "A parameter or the body is invalid."},
            503: {"model": Problem, "description": "The database cannot be reached; retry."},
        },
    )
    app.state.tokens = tokens

    def visible(who: Caller, tenant: str) -> TenantId:
        if not who.may_see(tenant):
            raise HTTPException(404, _NOT_VISIBLE)
        return TenantId(tenant)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        sent = request.headers.get("content-type", "")
        if request.method == "POST" and not sent.startswith("application/json"):
            detail = f"body: send a JSON object with Content-Type: application/json, not {sent!r}"
            return JSONResponse({"detail": detail}, status_code=415)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {str(e['msg']).removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        return JSONResponse({"detail": problems}, status_code=422)

    @app.exception_handler(InvalidSelection)
    async def _refused(_: Request, exc: InvalidSelection) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(sqlalchemy.exc.OperationalError)
    async def _no_database(_: Request, exc: sqlalchemy.exc.OperationalError) -> JSONResponse:
        return JSONResponse({"detail": "database unavailable; retry later"}, status_code=503)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    def exposition() -> Response:
        return Response(
            prometheus_client.generate_latest(metrics.ADMIN_REGISTRY),
            media_type=prometheus_client.CONTENT_TYPE_LATEST,
        )

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> dict[str, str]:
        with sessions() as session:
            session.execute(text("SELECT 1"))
        return {"status": "ok"}

    @app.get("/v1/tenants", tags=["counts"])
    def summary(who: CallerDep) -> Summary:
        """Every tenant the token may see, with its events by status."""
        # A scoped token's tenants are listed even before they have events.
        scope = None if who.admin else sorted(who.tenants)
        with sessions() as session:
            found = tenant_counts(session, tenant_ids=scope)
        return Summary(tenants=[Counts.of(c) for c in found])

    @app.get("/v1/tenants/{tenant}/counts", tags=["counts"], responses={404: {"model": Problem}})
    def counts(who: CallerDep, tenant: TenantPath) -> Counts:
        """The tenant's events by status, and its oldest pending event's age."""
        tenant_id = visible(who, tenant)
        with sessions() as session:
            [found] = tenant_counts(session, tenant_ids=[tenant_id])
        return Counts.of(found)

    @app.get(
        "/v1/tenants/{tenant}/events",
        tags=["events"],
        responses={404: {"model": Problem}, 400: _BAD_CURSOR},
    )
    def events(
        who: CallerDep,
        tenant: TenantPath,
        state: Annotated[
            list[store.Selectable] | None,
            Query(
                description="pending, failed, sent or dead; repeat for several. pending "
                "includes the failed ones (pending, backing off after a failed attempt), "
                "which are shown as failed."
            ),
        ] = None,
        topic: Annotated[SqlText | None, Query(min_length=1, max_length=249)] = None,
        key: Annotated[SqlText | None, Query()] = None,
        since: Annotated[AwareDatetime | None, Query(description="Created at or after.")] = None,
        until: Annotated[AwareDatetime | None, Query(description="Created before.")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        cursor: Annotated[str | None, Query(description="next_cursor of the last page.")] = None,
    ) -> EventPage:
        """The tenant's events in id order (the order they are delivered in), a page at
        a time."""
        tenant_id = visible(who, tenant)
        after = 0 if cursor is None else _decode_cursor(cursor)
        selection = Filter(
            states=state or [], topic=topic, key=key, since=since, until=until
        ).of_tenant(tenant_id)
        with sessions() as session:
            page = store.list_events(session, selection, after_id=after, limit=limit + 1)
        more = len(page) > limit
        page = page[:limit]
        return EventPage(
            events=[Event.of(e) for e in page],
            next_cursor=_encode_cursor(page[-1].id) if more else None,
        )

    @app.get(
        "/v1/tenants/{tenant}/events/{event_id}",
        tags=["events"],
        responses={404: {"model": Problem}},
    )
    def event(who: CallerDep, tenant: TenantPath, event_id: uuid.UUID) -> EventInFull:
        """One of the tenant's events in full, payload and headers included."""
        tenant_id = visible(who, tenant)
        with sessions() as session:
            found = store.get_event(session, tenant_id=tenant_id, event_id=event_id)
        if found is None:
            raise HTTPException(404, f"tenant {tenant_id} has no event {event_id}")
        return EventInFull(
            **Event.of(found.summary).model_dump(),
            tenant=found.tenant_id,
            dedupe_key=found.dedupe_key,
            payload=found.payload,
            headers=dict(found.headers),
            next_attempt_at=found.next_attempt_at,
        )

    @app.post(
        "/v1/tenants/{tenant}/replay",
        tags=["actions"],
        responses={404: {"model": Problem}, 415: _NOT_JSON},
    )
    def replay(who: CallerDep, tenant: TenantPath, body: ReplayRequest) -> ReplayResult:
        """Move dead or failed events back to pending, by ids or by filter.

        Each keeps its id, so it is delivered before every later event of its key still
        pending. Only dead and failed events change: replaying again changes nothing,
        and a replay stopped half-way is finished by running it again.
        """
        tenant_id = visible(who, tenant)
        if body.event_ids is not None:
            ids = list(dict.fromkeys(body.event_ids))
            if body.dry_run:
                with sessions.begin() as session:
                    outcomes, count = store.replay_ids(
                        session, tenant_id=tenant_id, event_ids=ids, dry_run=True
                    )
                return _replayed(True, count, None, outcomes)
            outcomes, result = store.run_replay_ids(
                sessions, tenant_id=tenant_id, event_ids=ids, actor=_actor(who)
            )
            _count(metrics.REPLAYED, tenant_id, result.rows)
            return _replayed(False, result, result.action_id, outcomes)
        assert body.filter is not None
        states = body.filter.states or [store.Selectable.DEAD]
        selection = body.filter.model_copy(update={"states": states}).of_tenant(tenant_id)
        if body.dry_run:
            with sessions() as session:
                return _replayed(True, store.preview_replay(session, selection), None, None)
        result = store.run_replay(sessions, selection, actor=_actor(who))
        _count(metrics.REPLAYED, tenant_id, result.rows)
        return _replayed(False, result, result.action_id, None)

    @app.post(
        "/v1/tenants/{tenant}/purge",
        tags=["actions"],
        responses={403: {"model": Problem}, 404: {"model": Problem}, 415: _NOT_JSON},
    )
    def purge(who: CallerDep, tenant: TenantPath, body: PurgeRequest) -> PurgeResult:
        """Delete the tenant's sent events matching the filter, in chunks (admin tokens
        only). Pending and dead events are never deleted."""
        if not who.admin:
            raise HTTPException(403, "purge needs an admin token")
        tenant_id = visible(who, tenant)
        selection = body.filter.of_tenant(tenant_id)
        if body.dry_run:
            with sessions() as session:
                rows = store.count_purgeable(session, selection)
            return PurgeResult(dry_run=True, rows=rows, audit_id=None)
        result = store.run_purge(sessions, selection, actor=_actor(who))
        _count(metrics.ADMIN_PURGED, tenant_id, result.rows)
        return PurgeResult(dry_run=False, rows=result.rows, audit_id=result.action_id)

    @app.get("/v1/actions", tags=["audit"])
    def actions(
        who: CallerDep,
        tenant: Annotated[
            str | None, Query(pattern=TENANT_ID_PATTERN, description="Only this tenant's.")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    ) -> ActionList:
        """The latest replays and purges, newest first, of the tenants the token may see."""
        scope: Sequence[str] | None
        if tenant is not None:
            scope = [visible(who, tenant)]
        else:
            scope = None if who.admin else sorted(who.tenants)
        with sessions() as session:
            found = store.list_actions(session, tenant_ids=scope, limit=limit)
        return ActionList(
            actions=[
                Action(
                    id=a.id,
                    actor=a.actor,
                    action=a.action,
                    tenant=a.tenant_id,
                    selection=dict(a.selection),
                    rows=a.rows,
                    started_at=a.started_at,
                    finished_at=a.finished_at,
                )
                for a in found
            ]
        )

    return app


def _count(counter: prometheus_client.Counter, tenant: TenantId, rows: int) -> None:
    # Only rows changed create a series: a tenant name made up by a caller with an admin
    # token must not add one, so the label values stay bounded by real tenants.
    if rows > 0:
        counter.labels(tenant).inc(rows)


def _actor(who: Caller) -> str:
    return f"token:{who.name}"


def _replayed(
    dry_run: bool,
    count: store.ReplayCount | store.ActionResult,
    audit_id: int | None,
    outcomes: dict[uuid.UUID, store.IdOutcome] | None,
) -> ReplayResult:
    return ReplayResult(
        dry_run=dry_run,
        rows=count.rows,
        overtaken=count.overtaken,
        outcomes=outcomes,
        audit_id=audit_id,
    )
