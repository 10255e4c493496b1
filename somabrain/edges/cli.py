"""The `somabrain` command: run a publisher, migrate the database, inspect a tenant's
events and replay or purge them (`somabrain outbox ...`, against the database directly,
through `somabrain.store.admin`).

Errors of this package end the command with one `FAILED:` line saying what happened
and what to do, and a non-zero exit status; tracebacks are for bugs only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import getpass
import json
import logging
import os
import shlex
import signal
import socket
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, NoReturn

import alembic.util
import pydantic
import rich.box
import rich.console
import rich.measure
import rich.progress
import rich.table
import rich.text
import sqlalchemy.exc
import typer
from sqlalchemy.orm import Session, sessionmaker

from somabrain.config.errors import InvalidSelection, SomabrainError
from somabrain.config.settings import AdminSettings, PublisherSettings, Settings
from somabrain.config.types import TenantId, parse_tenant_id
from somabrain.delivery.health import serve
from somabrain.delivery.publisher import build_publisher
from somabrain.store import admin, migrate
from somabrain.store.engine import make_engine, make_sessionmaker
from somabrain.store.outbox import TenantCounts, tenant_counts

app = typer.Typer(
    help="SomaBrain: drain a multi-tenant PostgreSQL outbox into Kafka.\n\n"
    "Example: somabrain outbox stats --tenant acme",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain help: option names with their metavars (`--tenant TENANT`), as in man pages,
    # rather than Typer's boxed tables with Python types (`<list[str]>`, `<bool>`).
    rich_markup_mode=None,
)
publisher_app = typer.Typer(
    help="Run the publisher that drains a tenant's outbox.\n\n"
    "Example: somabrain publisher run --tenant acme",
    rich_markup_mode=None,
)
db_app = typer.Typer(
    help="Inspect and migrate the outbox schema.\n\nExample: somabrain db check",
    rich_markup_mode=None,
)
outbox_app = typer.Typer(
    help="Inspect the outbox's events, tenant by tenant; replay or purge them.\n\n"
    "Example: somabrain outbox list --tenant acme --state dead",
    rich_markup_mode=None,
)
app.add_typer(publisher_app, name="publisher")
app.add_typer(db_app, name="db")
app.add_typer(outbox_app, name="outbox")
admin_app = typer.Typer(
    help="Run the admin HTTP API.\n\nExample: somabrain admin serve", rich_markup_mode=None
)
app.add_typer(admin_app, name="admin")
journal_app = typer.Typer(
    help="Move events a producer journaled locally into the outbox.\n\n"
    "Example: somabrain journal migrate --dir /var/lib/app/journal --dry-run",
    rich_markup_mode=None,
)
app.add_typer(journal_app, name="journal")


class Output(enum.StrEnum):
    TABLE = "table"
    JSON = "json"


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


LogLevelOption = Annotated[
    LogLevel, typer.Option(help="Log level: debug, info, warning or error.", metavar="LEVEL")
]


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _settings_help() -> str:
    lines = ["Settings (environment variables):\n\n"]
    for name, field in PublisherSettings.model_fields.items():
        shown = field.get_default(call_default_factory=True)
        default = "" if shown in ("", None, []) else f" (default: {shown})"
        lines.append(f"SOMABRAIN_{name.upper()}: {field.description}{default}\n\n")
    return "".join(lines)


@publisher_app.command("run", epilog=_settings_help())
def publisher_run(
    tenant: Annotated[
        list[str] | None,
        typer.Option(
            help="Tenant id to drain; repeat it (with --pool) to drain several in turns.",
            metavar="TENANT",
            show_default=False,
        ),
    ] = None,
    pool: Annotated[
        str | None,
        typer.Option(
            help="Name of a shared publisher serving several tenants.",
            metavar="POOL",
            show_default=False,
        ),
    ] = None,
    log_level: LogLevelOption = LogLevel.INFO,
) -> None:
    """Drain the tenants' pending events into Kafka until SIGTERM.

    One tenant (dedicated mode), or several in fair turns (shared mode, --pool).
    Tenants also come from SOMABRAIN_TENANT, or SOMABRAIN_TENANTS with SOMABRAIN_POOL.
    A second publisher of a tenant waits as its standby.

    Example: somabrain publisher run --tenant acme

    Example, shared: somabrain publisher run --pool small --tenant acme --tenant globex
    """
    _configure_logging(log_level.value)
    given: dict[str, object] = {}
    if tenant:
        given = {"tenant": "", "tenants": tenant} if len(tenant) > 1 else {"tenant": tenant[0]}
    if pool:
        given["pool"] = pool
    settings = PublisherSettings(**given)  # type: ignore[arg-type]
    for served in settings.served_tenants():
        parse_tenant_id(served)
    engine = make_engine(settings.database_url)
    _refuse_old_schema(settings.database_url)
    publisher = build_publisher(settings, engine)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        publisher.stopping.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigterm)
    if settings.metrics_port:
        serve(
            port=settings.metrics_port,
            live=lambda: publisher.live,
            ready=lambda: publisher.ready,
        )
    publisher.run()
    engine.dispose()


def _refuse_old_schema(database_url: str) -> None:
    # Alembic tells at INFO which dialect it found: nothing an operator needs here.
    alembic_log = logging.getLogger("alembic.runtime.migration")
    level = alembic_log.level
    alembic_log.setLevel(max(level, logging.WARNING))
    try:
        mismatch = migrate.schema_state(database_url).mismatch()
    finally:
        alembic_log.setLevel(level)
    if mismatch is not None:
        raise SomabrainError(mismatch)


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Option(help="Target revision.", metavar="REVISION")] = "head",
    log_level: LogLevelOption = LogLevel.INFO,
) -> None:
    """Migrate the outbox schema up to REVISION (default: the newest).

    Each step is logged to stderr, with a warning for anything a migration had to
    resolve (such as duplicate dedupe keys).

    Example: SOMABRAIN_DATABASE_URL=postgresql://... somabrain db upgrade
    """
    _configure_logging(log_level.value)
    settings = Settings()
    state = migrate.schema_state(settings.database_url)
    if not state.known:
        # Alembic would only say it cannot locate the revision.
        raise SomabrainError(state.mismatch() or "")
    migrate.upgrade(settings.database_url, revision)
    typer.echo(f"schema at {migrate.current_revision(settings.database_url)}")


@db_app.command("current")
def db_current() -> None:
    """Print the schema revision the database is at, and the newest one known.

    Example: somabrain db current
    """
    settings = Settings()
    state = migrate.schema_state(settings.database_url)
    unknown = "" if state.known else " (unknown to this version: a newer one migrated it)"
    typer.echo(f"current: {state.current or 'none'}{unknown}  head: {state.head}")


@db_app.command("check")
def db_check() -> None:
    """Exit 0 when the schema is at the newest revision this version knows, else 1
    with what to run (for scripts, CI and init containers).

    Example: somabrain db check && somabrain publisher run --tenant acme
    """
    settings = Settings()
    state = migrate.schema_state(settings.database_url)
    mismatch = state.mismatch()
    if mismatch is None:
        typer.echo(f"schema at {state.head}, the newest")
        return
    typer.echo(mismatch, err=True)
    raise typer.Exit(1)


@outbox_app.command("stats")
def outbox_stats(
    tenant: Annotated[
        list[str] | None,
        typer.Option(
            help="Only this tenant, listed with zeros when it has no events; repeat it for "
            "several (default: every tenant with events).",
            metavar="TENANT",
            show_default=False,
        ),
    ] = None,
    output: Annotated[Output, typer.Option(help="table or json.", metavar="FORMAT")] = Output.TABLE,
) -> None:
    """Each tenant's events by status (pending, sent, dead) and its oldest pending
    event's age, read from the database in one query. Rows migration 0003 set aside
    as repeats of another event's dedupe key are counted apart (set aside), not as dead.

    Example: somabrain outbox stats --tenant acme --output json
    """
    for given in tenant or []:
        parse_tenant_id(given)
    settings = Settings()
    engine = make_engine(settings.database_url, pool_size=1)
    try:
        with Session(engine) as session:
            counts = tenant_counts(session, tenant_ids=tenant)
    finally:
        engine.dispose()
    rows = [dataclasses.asdict(c) for c in counts]
    if output is Output.JSON:
        typer.echo(json.dumps({"tenants": rows}, indent=2))
        return
    table = rich.table.Table("tenant", "pending", "sent", "dead", "oldest pending", "set aside")
    for c in counts:
        age = "-" if c.oldest_pending_seconds is None else f"{c.oldest_pending_seconds:.0f} s"
        table.add_row(c.tenant_id, str(c.pending), str(c.sent), str(c.dead), age, str(c.set_aside))
    rich.console.Console().print(table)
    if not counts:
        typer.echo("no events")


# The options the event commands share.
OutputOption = Annotated[Output, typer.Option(help="table or json.", metavar="FORMAT")]
TenantOption = Annotated[
    str, typer.Option(help="The tenant whose events these are.", metavar="TENANT")
]
TopicOption = Annotated[
    str | None,
    typer.Option(help="Only events of this topic.", metavar="TOPIC", show_default=False),
]
KeyOption = Annotated[
    str | None,
    typer.Option(help="Only events of this message key.", metavar="KEY", show_default=False),
]
SinceOption = Annotated[
    str | None,
    typer.Option(
        help="Only events created at or after this ISO 8601 time, with its time zone "
        "(2026-12-04T09:00:00Z, 2026-12-04T10:00+01:00).",
        metavar="TIME",
        show_default=False,
    ),
]
UntilOption = Annotated[
    str | None,
    typer.Option(
        help="Only events created before this ISO 8601 time, with its time zone.",
        metavar="TIME",
        show_default=False,
    ),
]
DryRunOption = Annotated[
    bool, typer.Option("--dry-run", help="Show what would change; change nothing.")
]

# The most events one page of `outbox list` holds.
MAX_PAGE = 1000


def _when(option: str, value: str | None) -> dt.datetime | None:
    """An option's ISO 8601 time; one without a time zone is refused, never guessed."""
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise InvalidSelection(
            f"{option} {value!r} is not an ISO 8601 time; write it as 2026-12-04T09:00:00Z"
        ) from None
    if parsed.utcoffset() is None:
        shown = value if "T" in value or " " in value else f"{value}T00:00:00"
        raise InvalidSelection(
            f"{option} {value!r} has no time zone, so it could mean any instant; add one, "
            f"such as {shown}Z for UTC or {shown}+01:00"
        )
    return parsed


def _selection(
    tenant: TenantId,
    *,
    states: Sequence[admin.Selectable] | None,
    topic: str | None,
    key: str | None,
    since: str | None,
    until: str | None,
) -> admin.EventFilter:
    return admin.EventFilter(
        tenant_id=tenant,
        states=frozenset(states or ()),
        topic=topic,
        key=key,
        created_after=_when("--since", since),
        created_before=_when("--until", until),
    )


def _event_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidSelection(
            f"{value!r} is not an event id; event ids are UUIDs, as `somabrain outbox list` "
            "shows them"
        ) from None


@contextlib.contextmanager
def _database(*, writes: bool = False) -> Iterator[sessionmaker[Session]]:
    """Sessions on SOMABRAIN_DATABASE_URL for one command; commands that change rows
    (and their dry runs, which tell what they would change) first refuse a schema
    other than this version's (the audit table is in it)."""
    settings = Settings()
    if writes:
        _refuse_old_schema(settings.database_url)
    engine = make_engine(settings.database_url, pool_size=1)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


def _actor() -> str:
    """Who runs the command, as the audit trail records it: cli:<user>@<host>."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container's arbitrary user)
        user = f"uid-{os.getuid()}"
    return f"cli:{user}@{socket.gethostname()}"[:200]


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _json_value(value: object) -> object:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _echo_json(document: Mapping[str, Any]) -> None:
    typer.echo(json.dumps(document, indent=2, default=_json_value, ensure_ascii=False))


def _time(value: dt.datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cell(value: object) -> rich.text.Text:
    # Text, not markup: a topic, key or error may hold brackets rich would read as styles.
    return rich.text.Text("-" if value is None else str(value))


def _print_table(table: rich.table.Table) -> None:
    """The table fitted to a terminal; whole, however wide, into a file or a pipe."""
    console = rich.console.Console()
    if not console.is_terminal:
        unbounded = console.options.update_width(100_000)
        width = rich.measure.Measurement.get(console, unbounded, table).maximum
        console = rich.console.Console(width=max(width, console.width))
    console.print(table)


def _progress() -> rich.progress.Progress:
    """A progress bar on stderr, so stdout keeps only the result."""
    return rich.progress.Progress(
        rich.progress.TextColumn("{task.description}"),
        rich.progress.BarColumn(),
        rich.progress.MofNCompleteColumn(),
        rich.progress.TimeElapsedColumn(),
        console=rich.console.Console(stderr=True),
    )


@outbox_app.command("list")
def outbox_list(
    tenant: TenantOption,
    state: Annotated[
        list[admin.Selectable] | None,
        typer.Option(
            help="Only events in this state: pending (failed ones included), failed "
            "(pending, backing off after a failed attempt), sent or dead; repeat it for "
            "several (default: all).",
            metavar="STATE",
            show_default=False,
        ),
    ] = None,
    topic: TopicOption = None,
    key: KeyOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    limit: Annotated[
        int,
        typer.Option(
            help=f"Events per page, at most {MAX_PAGE}.", metavar="N", min=1, max=MAX_PAGE
        ),
    ] = 50,
    after: Annotated[
        int,
        typer.Option(
            help="Start after this row id: the last id of the previous page (its next_after).",
            metavar="ID",
            min=0,
            show_default=False,
        ),
    ] = 0,
    output: OutputOption = Output.TABLE,
) -> None:
    """One page of the tenant's events, in id order (the order they are delivered in),
    without payloads. When more follow, the table ends with the command for the next
    page, and the JSON's next_after is the --after to give it.

    Example: somabrain outbox list --tenant acme --state dead --since 2026-12-04T00:00:00Z
    """
    tenant_id = parse_tenant_id(tenant)
    selection = _selection(tenant_id, states=state, topic=topic, key=key, since=since, until=until)
    with _database() as sessions, sessions() as session:
        # One more than the page, to know whether another page follows.
        events = admin.list_events(session, selection, after_id=after, limit=limit + 1)
    page, more = events[:limit], len(events) > limit
    next_after = page[-1].id if more else None
    if output is Output.JSON:
        _echo_json({"events": [dataclasses.asdict(e) for e in page], "next_after": next_after})
        return
    if not page:
        typer.echo(
            f"no events of tenant {tenant_id} match" + (f" after id {after}" if after else "")
        )
        return
    table = rich.table.Table(box=rich.box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    # Ids whole, whatever the width: they are what `show` and `replay --id` take.
    table.add_column("id", no_wrap=True, min_width=len(str(page[-1].id)))
    table.add_column("event id", no_wrap=True, min_width=36)
    table.add_column("state", no_wrap=True, min_width=7)
    table.add_column("attempts", justify="right")
    widest = max(len(e.topic) for e in page), max(len(e.key or "-") for e in page)
    table.add_column("topic", overflow="fold", min_width=min(widest[0], 16))
    table.add_column("key", overflow="fold", min_width=min(widest[1], 12))
    table.add_column("created", no_wrap=True)
    table.add_column("last error", max_width=40, no_wrap=True, overflow="ellipsis")
    for e in page:
        error = None if e.last_error is None else e.last_error.splitlines()[0][:80]
        table.add_row(
            str(e.id),
            str(e.event_id),
            e.state.value,
            str(e.attempts),
            _cell(e.topic),
            _cell(e.key),
            _time(e.created_at),
            _cell(error),
        )
    _print_table(table)
    if next_after is not None:
        again = ["somabrain", "outbox", "list", "--tenant", tenant_id]
        for s in state or []:
            again += ["--state", s.value]
        filters = {"--topic": topic, "--key": key, "--since": since, "--until": until}
        for option, value in filters.items():
            if value is not None:
                again += [option, value]
        if limit != 50:
            again += ["--limit", str(limit)]
        typer.echo(f"next page: {shlex.join([*again, '--after', str(next_after)])}")


_WAITING = frozenset({admin.Selectable.PENDING, admin.Selectable.FAILED})


@outbox_app.command("show")
def outbox_show(
    # Described in the docstring: Typer's list of arguments would show its Python type.
    event_id: Annotated[str, typer.Argument(metavar="EVENT_ID", hidden=True)],
    tenant: TenantOption,
    output: OutputOption = Output.TABLE,
) -> None:
    """One event of the tenant in full: payload, headers, dedupe key, attempts, last
    error, and where Kafka stored it. EVENT_ID is its id, a UUID (as list shows it).
    Exits 1 when the tenant has no event of that id.

    Example: somabrain outbox show --tenant acme 5f0c9a3e-8d52-4c5e-9f5e-2b7d1c8e4a10
    """
    tenant_id = parse_tenant_id(tenant)
    wanted = _event_id(event_id)
    with _database() as sessions, sessions() as session:
        event = admin.get_event(session, tenant_id=tenant_id, event_id=wanted)
    if event is None:
        # The same answer whether the id is unknown or another tenant's.
        typer.echo(f"tenant {tenant_id} has no event {wanted}", err=True)
        raise typer.Exit(1)
    e = event.summary
    if output is Output.JSON:
        _echo_json(
            {
                **dataclasses.asdict(e),
                "tenant_id": event.tenant_id,
                "dedupe_key": event.dedupe_key,
                "next_attempt_at": event.next_attempt_at,
                "headers": dict(event.headers),
                "payload": event.payload,
            }
        )
        return
    fields = {
        "event id": e.event_id,
        "row id": e.id,
        "tenant": event.tenant_id,
        "topic": e.topic,
        "key": e.key,
        "dedupe key": event.dedupe_key,
        "event type": e.event_type,
        "state": e.state.value,
        "attempts": e.attempts,
        "last error": e.last_error,
        "created": _time(e.created_at),
        "next attempt": _time(event.next_attempt_at) if e.state in _WAITING else None,
        "sent": _time(e.sent_at) if e.sent_at else None,
        "partition": e.partition,
        "offset": e.offset,
        "headers": json.dumps(dict(event.headers), sort_keys=True, ensure_ascii=False),
    }
    for label, value in fields.items():
        typer.echo(f"{label + ':':<14}{'-' if value is None else value}")
    payload = json.dumps(event.payload, indent=2, sort_keys=True, ensure_ascii=False)
    typer.echo(
        f"payload:\n{payload}" if event.payload is not None else "payload:      null (a tombstone)"
    )


@outbox_app.command("replay")
def outbox_replay(
    tenant: TenantOption,
    event: Annotated[
        list[str] | None,
        typer.Option(
            "--id",
            help="Replay this event (dead or failed); repeat it for several. Without it, "
            "the filter options choose the events.",
            metavar="EVENT_ID",
            show_default=False,
        ),
    ] = None,
    state: Annotated[
        list[admin.Selectable] | None,
        typer.Option(
            help="Replay events in this state: dead, or failed (pending, backing off "
            "after a failed attempt); repeat it for both (default: dead).",
            metavar="STATE",
            show_default=False,
        ),
    ] = None,
    topic: TopicOption = None,
    key: KeyOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    dry_run: DryRunOption = False,
    chunk: Annotated[
        int,
        typer.Option(help="Rows per transaction.", metavar="N", min=1, max=10_000),
    ] = 500,
    output: OutputOption = Output.TABLE,
    log_level: LogLevelOption = LogLevel.INFO,
) -> None:
    """Move the tenant's dead (or failed) events back to pending, attempts reset, for
    the publisher to deliver again; audited (actor cli:<user>@<host>, and a log line on
    stderr, as the admin API logs). Each event keeps
    its id, so it goes out before every later event of its key not yet delivered.

    By --id, or by filter in chunks of their own transactions: an interrupted replay
    keeps what it did, and running it again replays the rest; replaying again changes
    nothing. Sent and pending events are never replayed.

    Example: somabrain outbox replay --tenant acme --topic acme.orders --dry-run
    """
    _configure_logging(log_level.value)
    tenant_id = parse_tenant_id(tenant)
    if event:
        filters = {
            "--state": state,
            "--topic": topic,
            "--key": key,
            "--since": since,
            "--until": until,
        }
        given = [option for option, value in filters.items() if value]
        if given:
            raise InvalidSelection(
                f"--id names the events itself; leave out {', '.join(given)} (or replay by "
                "filter without --id)"
            )
        _replay_ids(tenant_id, [_event_id(e) for e in event], dry_run=dry_run, output=output)
        return
    admin.check_replayable(state or ())
    selection = _selection(
        tenant_id,
        states=state or [admin.Selectable.DEAD],
        topic=topic,
        key=key,
        since=since,
        until=until,
    )
    with _database(writes=True) as sessions:
        with sessions() as session:
            preview = admin.preview_replay(session, selection)
        if dry_run:
            result = admin.ActionResult(action_id=0, rows=preview.rows, overtaken=preview.overtaken)
        else:
            with _progress() as progress:
                task = progress.add_task(f"replaying {tenant_id}", total=preview.rows)
                result = admin.run_replay(
                    sessions,
                    selection,
                    actor=_actor(),
                    chunk=chunk,
                    on_chunk=lambda rows: progress.advance(task, rows),
                )
    if output is Output.JSON:
        _echo_json(
            {
                "dry_run": dry_run,
                "action_id": None if dry_run else result.action_id,
                "filter": selection.describe(),
                "rows": result.rows,
                "overtaken": result.overtaken,
            }
        )
    else:
        states = " or ".join(sorted(selection.states))
        if dry_run:
            typer.echo(
                f"would replay {_n(result.rows, f'{states} event')} of tenant {tenant_id}, "
                f"{result.overtaken} of them overtaken; nothing changed (dry run)"
            )
        else:
            typer.echo(
                f"replayed {_n(result.rows, f'{states} event')} of tenant {tenant_id}, "
                f"{result.overtaken} of them overtaken (audit id {result.action_id})"
            )
    _warn_overtaken(result.overtaken, dry_run=dry_run)


def _replay_ids(
    tenant: TenantId, event_ids: Sequence[uuid.UUID], *, dry_run: bool, output: Output
) -> None:
    ids = list(dict.fromkeys(event_ids))
    with _database(writes=True) as sessions:
        if dry_run:
            with sessions() as session:
                outcomes, count = admin.replay_ids(
                    session, tenant_id=tenant, event_ids=ids, dry_run=True
                )
                session.rollback()
            result = admin.ActionResult(action_id=0, rows=count.rows, overtaken=count.overtaken)
        else:
            outcomes, result = admin.run_replay_ids(
                sessions, tenant_id=tenant, event_ids=ids, actor=_actor()
            )
    if output is Output.JSON:
        _echo_json(
            {
                "dry_run": dry_run,
                "action_id": None if dry_run else result.action_id,
                "events": {str(i): outcomes[i].value for i in ids},
                "rows": result.rows,
                "overtaken": result.overtaken,
            }
        )
    else:
        table = rich.table.Table(box=rich.box.SIMPLE_HEAD, pad_edge=False)
        table.add_column("event id", no_wrap=True, min_width=36)
        table.add_column("would be" if dry_run else "outcome", no_wrap=True)
        for i in ids:
            table.add_row(str(i), outcomes[i].value)
        _print_table(table)
        tally = {o: sum(1 for i in ids if outcomes[i] is o) for o in admin.IdOutcome}
        counts = ", ".join(f"{n} {o.value}" for o, n in tally.items())
        done = "nothing changed (dry run)" if dry_run else f"audit id {result.action_id}"
        typer.echo(f"{counts}; {result.overtaken} of them overtaken; {done}")
    _warn_overtaken(result.overtaken, dry_run=dry_run)


def _warn_overtaken(overtaken: int, *, dry_run: bool) -> None:
    if overtaken:
        typer.echo(
            f"warning: {_n(overtaken, 'event')} {'would be ' if dry_run else ''}replayed after a "
            "later event of the same key was already sent: consumers of those keys get them "
            "out of order",
            err=True,
        )


@outbox_app.command("purge")
def outbox_purge(
    tenant: TenantOption,
    topic: TopicOption = None,
    key: KeyOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count the events it would delete; delete none.")
    ] = False,
    yes: Annotated[
        bool, typer.Option("--yes", help="Delete for good (required unless --dry-run).")
    ] = False,
    chunk: Annotated[
        int,
        typer.Option(help="Rows per transaction.", metavar="N", min=1, max=10_000),
    ] = 1000,
    log_level: LogLevelOption = LogLevel.INFO,
) -> None:
    """Delete the tenant's sent events (those matching the filter), for good, in chunks
    of their own transactions; audited (and a log line on stderr, as the admin API
    logs). Pending and dead events are never deleted. Requires --yes, unless --dry-run.

    Example: somabrain outbox purge --tenant acme --until 2026-11-01T00:00:00Z --yes
    """
    _configure_logging(log_level.value)
    tenant_id = parse_tenant_id(tenant)
    selection = _selection(tenant_id, states=None, topic=topic, key=key, since=since, until=until)
    if not dry_run and not yes:
        raise InvalidSelection(
            "purge deletes events for good: add --yes to delete them, or --dry-run to "
            "count them first"
        )
    with _database(writes=True) as sessions:
        with sessions() as session:
            total = admin.count_purgeable(session, selection)
        if dry_run:
            typer.echo(
                f"would delete {_n(total, 'sent event')} of tenant {tenant_id}; "
                "nothing changed (dry run)"
            )
            return
        with _progress() as progress:
            task = progress.add_task(f"purging {tenant_id}", total=total)
            result = admin.run_purge(
                sessions,
                selection,
                actor=_actor(),
                chunk=chunk,
                on_chunk=lambda rows: progress.advance(task, rows),
            )
    typer.echo(
        f"deleted {_n(result.rows, 'sent event')} of tenant {tenant_id} "
        f"(audit id {result.action_id})"
    )


@outbox_app.command("check")
def outbox_check(
    tenant: Annotated[
        list[str] | None,
        typer.Option(
            help="Only this tenant; repeat it for several (default: every tenant with events).",
            metavar="TENANT",
            show_default=False,
        ),
    ] = None,
    max_pending: Annotated[
        int | None,
        typer.Option(
            help="Most pending events a tenant may have (default: no limit).",
            metavar="N",
            min=0,
            show_default=False,
        ),
    ] = None,
    max_oldest_seconds: Annotated[
        float,
        typer.Option(help="Oldest pending event's greatest age.", metavar="SECONDS", min=0),
    ] = 600,
    max_dead: Annotated[
        int, typer.Option(help="Most dead events a tenant may have.", metavar="N", min=0)
    ] = 0,
) -> None:
    """Exit 1 when any tenant is over a threshold (pending events, oldest pending age,
    dead events), else 0; prints each tenant's counts and what it is over. Rows
    migration 0003 set aside as repeats of another event's dedupe key are not counted
    as dead. For cron, CI and probes.

    Example: somabrain outbox check --max-oldest-seconds 300 --max-dead 0
    """
    for given in tenant or []:
        parse_tenant_id(given)
    with _database() as sessions, sessions() as session:
        found = {c.tenant_id: c for c in tenant_counts(session, tenant_ids=tenant)}
    wanted = list(dict.fromkeys(tenant)) if tenant else list(found)
    if not wanted:
        typer.echo("no events: nothing to check")
        return
    over_any = 0
    for name in wanted:
        counts = found[name]
        over = _over(counts, max_pending, max_oldest_seconds, max_dead)
        age = counts.oldest_pending_seconds
        shown = (
            f"{name}: {counts.pending} pending, {counts.sent} sent, {counts.dead} dead, "
            f"oldest pending {'-' if age is None else f'{age:.0f} s'}"
        )
        typer.echo(f"{shown}: {'OVER ' + '; '.join(over) if over else 'ok'}")
        over_any += bool(over)
    if over_any:
        typer.echo(f"{over_any} of {_n(len(wanted), 'tenant')} over a threshold", err=True)
        raise typer.Exit(1)
    typer.echo(f"{_n(len(wanted), 'tenant')} checked, none over a threshold")


def _over(
    counts: TenantCounts, max_pending: int | None, max_oldest_seconds: float, max_dead: int
) -> list[str]:
    over = []
    if max_pending is not None and counts.pending > max_pending:
        over.append(f"{counts.pending} pending > --max-pending {max_pending}")
    age = counts.oldest_pending_seconds
    if age is not None and age > max_oldest_seconds:
        over.append(f"oldest pending {age:.0f} s > --max-oldest-seconds {max_oldest_seconds:g}")
    if counts.dead > max_dead:
        over.append(f"{counts.dead} dead > --max-dead {max_dead}")
    return over


def _admin_settings_help() -> str:
    lines = ["Settings (environment variables):\n\n"]
    for name in ("database_url", "admin_tokens_file", "admin_host", "admin_port"):
        field = AdminSettings.model_fields[name]
        lines.append(
            f"SOMABRAIN_{name.upper()}: {field.description} (default: {field.default})\n\n"
        )
    return "".join(lines)


@admin_app.command("serve", epilog=_admin_settings_help())
def admin_serve(log_level: LogLevelOption = LogLevel.INFO) -> None:
    """Serve the admin API: list and inspect a tenant's events, replay dead and failed
    ones, purge sent ones, with bearer tokens scoped to tenants or admin, every change
    audited. Refuses to start without a valid token file, or when the schema is behind.
    The OpenAPI description is at /openapi.json.

    Example: SOMABRAIN_ADMIN_TOKENS_FILE=tokens.yaml somabrain admin serve

    Example call: curl -H "Authorization: Bearer $TOKEN" localhost:8081/v1/tenants
    """
    from somabrain.edges.admin.serve import serve as serve_admin

    _configure_logging(log_level.value)
    settings = AdminSettings()
    _refuse_old_schema(settings.database_url)
    serve_admin(settings)


@journal_app.command("migrate")
def journal_migrate(
    directory: Annotated[
        Path,
        typer.Option(
            "--dir",
            help="The journal's directory (default: SOMABRAIN_JOURNAL_DIR).",
            metavar="DIR",
            envvar="SOMABRAIN_JOURNAL_DIR",
            show_default=False,
        ),
    ],
    tenant: Annotated[
        list[str] | None,
        typer.Option(
            help="Only this tenant's events; repeat it for several (default: all).",
            metavar="TENANT",
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what would move; change nothing.")
    ] = False,
    output: Annotated[Output, typer.Option(help="table or json.", metavar="FORMAT")] = Output.TABLE,
    wait: Annotated[
        float,
        typer.Option(
            help="Seconds to wait for another migration of the journal to finish.",
            metavar="SECONDS",
            min=0,
        ),
    ] = 60.0,
) -> None:
    """Move the journal's events into the outbox, oldest first, and delete each journal
    file once all its events are in the database.

    Safe to run twice, or again after it was stopped half-way: an event already in
    the outbox (same tenant and dedupe key) is counted as already there, not added
    again, and a journal file keeps only the events still to migrate. A last line a
    producer did not finish writing (it was never acknowledged) is reported and
    dropped; a line that does not match its checksum is reported and moved to
    FILE.corrupt next to it, for a person to look at. Safe while the producer runs
    (one migration of a journal at a time: a second one waits for the first). Exits 1
    when a line is corrupt, a tenant is held back (over its backlog cap), or a file
    cannot be read (the files after it are left for the next run, to keep order).

    Example: somabrain journal migrate --dir /var/lib/app/journal --dry-run
    """
    from somabrain.delivery.journal import migrate_journal, segments

    for given in tenant or []:
        parse_tenant_id(given)
    if not directory.is_dir():
        raise SomabrainError(f"journal directory {directory} does not exist")
    settings = Settings()
    _refuse_old_schema(settings.database_url)
    engine = make_engine(settings.database_url, pool_size=1)
    total = sum(_count_lines(p) for p in segments(directory))
    try:
        with rich.progress.Progress(
            *rich.progress.Progress.get_default_columns(),
            rich.progress.MofNCompleteColumn(),
            console=rich.console.Console(stderr=True),
            transient=True,
            disable=output is Output.JSON,
        ) as progress:
            task = progress.add_task("migrating" if not dry_run else "reading", total=total)
            report = migrate_journal(
                directory,
                engine,
                tenants=tenant,
                dry_run=dry_run,
                on_records=lambda n: progress.advance(task, n),
                wait=wait,
            )
    finally:
        engine.dispose()
    tallies = sorted(report.tenants.items())
    if output is Output.JSON:
        typer.echo(
            json.dumps(
                {
                    "dry_run": dry_run,
                    "tenants": {t: dataclasses.asdict(v) for t, v in tallies},
                    "damaged": [
                        {**dataclasses.asdict(d), "path": str(d.path)} for d in report.damaged
                    ],
                    "deleted": [str(p) for p in report.deleted],
                    "kept": {str(p): why for p, why in report.kept.items()},
                    "quarantined": [str(p) for p in report.quarantined],
                    "stopped_at": (
                        None
                        if report.stopped_at is None
                        else {"path": str(report.stopped_at[0]), "why": report.stopped_at[1]}
                    ),
                },
                indent=2,
            )
        )
    else:
        new = "would add" if dry_run else "added"
        table = rich.table.Table("tenant", "records", new, "already there", "held back")
        for name, t in tallies:
            table.add_row(name, str(t.records), str(t.inserted), str(t.duplicates), t.held or "")
        rich.console.Console().print(table)
        moved = "would be moved" if dry_run else "moved"
        for d in report.damaged:
            kind = (
                "a write cut short, never acknowledged; dropped"
                if d.torn
                else f"does not match its checksum; {moved} to {d.path.name}.corrupt"
            )
            typer.echo(f"{d.path}:{d.line}: {d.length} bytes: {kind}")
        for path, why in report.kept.items():
            typer.echo(f"kept {path}: {why}")
        if report.stopped_at is not None:
            typer.echo(f"stopped at {report.stopped_at[0]}: {report.stopped_at[1]}")
        if not dry_run:
            typer.echo(f"{len(report.deleted)} journal files done and deleted")
    if (
        any(not d.torn for d in report.damaged)
        or any(t.held for _, t in tallies)
        or report.stopped_at is not None
    ):
        raise typer.Exit(1)


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return 0  # gone, or unreadable: the migration reports it


def main() -> None:
    """Entry point: run the app, turning expected failures into one FAILED: line."""
    try:
        app()
    except SomabrainError as exc:
        _fail(str(exc))
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"SOMABRAIN_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            if e["loc"]
            else str(e["msg"]).removeprefix("Value error, ")
            for e in exc.errors()
        )
        _fail(f"invalid settings: {problems}")
    except (sqlalchemy.exc.NoSuchModuleError, ModuleNotFoundError) as exc:
        _fail(f"SOMABRAIN_DATABASE_URL: not a PostgreSQL URL ({exc})")
    except sqlalchemy.exc.ArgumentError as exc:
        _fail(f"SOMABRAIN_DATABASE_URL is not a database URL ({exc})")
    except sqlalchemy.exc.OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        _fail(
            f"cannot reach the database ({reason}); check SOMABRAIN_DATABASE_URL "
            "and that PostgreSQL is running"
        )
    except alembic.util.CommandError as exc:
        _fail(f"migration: {exc}")


def _fail(message: str) -> NoReturn:
    typer.echo(f"FAILED: {message}", err=True)
    raise SystemExit(2)
