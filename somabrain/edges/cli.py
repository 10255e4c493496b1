"""The `somabrain` command: run a publisher, migrate the database.

Errors of this package end the command with one `FAILED:` line saying what happened
and what to do, and a non-zero exit status; tracebacks are for bugs only.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Annotated, NoReturn

import alembic.util
import pydantic
import rich.console
import rich.progress
import rich.table
import sqlalchemy.exc
import typer
from sqlalchemy.orm import Session

from somabrain.config.errors import SomabrainError
from somabrain.config.settings import AdminSettings, PublisherSettings, Settings
from somabrain.config.types import parse_tenant_id
from somabrain.delivery.health import serve
from somabrain.delivery.publisher import build_publisher
from somabrain.store import migrate
from somabrain.store.engine import make_engine
from somabrain.store.outbox import tenant_counts

app = typer.Typer(
    help="SomaBrain: drain a multi-tenant PostgreSQL outbox into Kafka.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain help: option names with their metavars (`--tenant TENANT`), as in man pages,
    # rather than Typer's boxed tables with Python types (`<list[str]>`, `<bool>`).
    rich_markup_mode=None,
)
publisher_app = typer.Typer(
    help="Run the publisher that drains a tenant's outbox.", rich_markup_mode=None
)
db_app = typer.Typer(help="Inspect and migrate the outbox schema.", rich_markup_mode=None)
outbox_app = typer.Typer(
    help="Inspect the outbox's events, tenant by tenant.", rich_markup_mode=None
)
app.add_typer(publisher_app, name="publisher")
app.add_typer(db_app, name="db")
app.add_typer(outbox_app, name="outbox")
admin_app = typer.Typer(help="Run the admin HTTP API.", rich_markup_mode=None)
app.add_typer(admin_app, name="admin")
journal_app = typer.Typer(
    help="Move events a producer journaled locally into the outbox.", rich_markup_mode=None
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
    current = migrate.current_revision(database_url)
    head = migrate.head_revision(database_url)
    if current != head:
        raise SomabrainError(
            f"database schema is at revision {current or 'none'}, this version needs {head}; "
            "run `somabrain db upgrade` first"
        )


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
    migrate.upgrade(settings.database_url, revision)
    typer.echo(f"schema at {migrate.current_revision(settings.database_url)}")


@db_app.command("current")
def db_current() -> None:
    """Print the schema revision the database is at, and the newest one known.

    Example: somabrain db current
    """
    settings = Settings()
    current = migrate.current_revision(settings.database_url)
    head = migrate.head_revision(settings.database_url)
    typer.echo(f"current: {current or 'none'}  head: {head}")


@db_app.command("check")
def db_check() -> None:
    """Exit 0 when the schema is at the newest revision this version knows, else 1
    with what to run (for scripts, CI and init containers).

    Example: somabrain db check && somabrain publisher run --tenant acme
    """
    settings = Settings()
    current = migrate.current_revision(settings.database_url)
    head = migrate.head_revision(settings.database_url)
    if current == head:
        typer.echo(f"schema at {head}, the newest")
        return
    typer.echo(
        f"schema at {current or 'none'}, this version needs {head}; run `somabrain db upgrade`",
        err=True,
    )
    raise typer.Exit(1)


@outbox_app.command("stats")
def outbox_stats(
    tenant: Annotated[
        list[str] | None,
        typer.Option(
            help="Only this tenant; repeat it for several (default: every tenant with events).",
            metavar="TENANT",
            show_default=False,
        ),
    ] = None,
    output: Annotated[Output, typer.Option(help="table or json.", metavar="FORMAT")] = Output.TABLE,
) -> None:
    """Each tenant's events by status (pending, sent, dead) and its oldest pending
    event's age, read from the database in one query.

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
    table = rich.table.Table("tenant", "pending", "sent", "dead", "oldest pending")
    for c in counts:
        age = "-" if c.oldest_pending_seconds is None else f"{c.oldest_pending_seconds:.0f} s"
        table.add_row(c.tenant_id, str(c.pending), str(c.sent), str(c.dead), age)
    rich.console.Console().print(table)
    if not counts:
        typer.echo("no events" + (f" for {', '.join(tenant)}" if tenant else ""))


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
) -> None:
    """Move the journal's events into the outbox, oldest first, and delete each journal
    file once all its events are in the database.

    Safe to run twice, or again after it was stopped half-way: an event already in
    the outbox (same tenant and dedupe key) is counted as already there, not added
    again. Torn writes (a producer killed mid-write) are reported and skipped; a file
    with a corrupt record, or one a producer is still writing, is kept. Exits 1 when
    a record is corrupt or held back (its tenant over its backlog cap).

    Example: somabrain journal migrate --dir /var/lib/app/journal --dry-run
    """
    from somabrain.delivery.journal import migrate_journal, segments

    for given in tenant or []:
        parse_tenant_id(given)
    if not directory.is_dir():
        raise SomabrainError(f"journal directory {directory} does not exist")
    settings = Settings()
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
        for d in report.damaged:
            kind = "torn write, skipped" if d.torn else "does not match its checksum; file kept"
            typer.echo(f"{d.path}:{d.line}: {d.length} bytes: {kind}")
        for path, why in report.kept.items():
            typer.echo(f"kept {path}: {why}")
        if not dry_run:
            typer.echo(f"{len(report.deleted)} journal files done and deleted")
    if any(not d.torn for d in report.damaged) or any(t.held for _, t in tallies):
        raise typer.Exit(1)


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


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
