"""`make demo`: the main job on a local stack of its own, with progress and a summary.

Starts the stack in `.devenv/demo`, runs the operator and the publishers its
Deployments declare, enqueues 10,000 events across three tenants, reads them back
from Kafka, checks that each arrived exactly once and in order per key, prints a table
per tenant, and stops everything it started.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from devenv import common, stack
from devenv.mainjob import MainJob, database_rows, load_tenants, verify

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devenv.demo", description=__doc__)
    parser.add_argument("--events", type=int, default=10_000, help="events to enqueue")
    parser.add_argument("--keep", action="store_true", help="leave the stack running")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    state_dir = ROOT / ".devenv" / "demo"

    try:
        with console.status("starting Postgres, Kafka, etcd and kube-apiserver"):
            running = stack.up(state_dir)
        return _run(console, stack.environment(running), state_dir, args.events)
    except (common.MissingPrerequisite, common.StartFailed) as exc:
        console.print(f"[red]FAILED:[/red] {exc}")
        return 2
    finally:
        if not args.keep:
            stack.down(state_dir)


def _run(console: Console, env: dict[str, str], state_dir: Path, events: int) -> int:
    tenants = load_tenants()
    job = MainJob(env, work_dir=state_dir / "job", namespace="somabrain-demo")
    try:
        with console.status("migrating the outbox, applying CRDs, creating topics"):
            job.prepare(tenants)
        with console.status("starting the operator and applying 3 Tenants"):
            job.start_operator()
            job.apply_tenants(tenants)
            job.wait_ready([t["metadata"]["name"] for t in tenants], timeout=120)
        started = job.start_publishers()
        console.print(f"operator created {started} publisher Deployments; running them locally")

        with Progress(
            TextColumn("{task.description:10}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            tasks = {
                "enqueue": progress.add_task("enqueue", total=events),
                "consume": progress.add_task("published", total=events),
            }

            def report(phase: str, done: int, total: int) -> None:
                progress.update(tasks[phase], completed=done, total=total)

            start = job.topic_ends([t["spec"]["topics"][0] for t in tenants])
            t0 = time.monotonic()
            enqueued = job.enqueue(tenants, total=events, progress=report)
            consumed = job.consume(start, expected=events, timeout=300, progress=report)

        tenant_ids = sorted({e.tenant for e in enqueued})
        verdict = verify(enqueued, consumed, database_rows(job.engine, tenant_ids), started_at=t0)
    finally:
        job.stop()

    table = Table(
        title="SomaBrain demo: per tenant",
        caption="seconds: from the first enqueue to the tenant's last event read back "
        "(enqueueing runs alongside, so this is end to end, not the publisher's ceiling)",
    )
    for column in ("tenant", "enqueued", "published", "seconds", "events/s"):
        table.add_column(column, justify="right" if column != "tenant" else "left")
    for r in verdict.reports:
        table.add_row(
            r.tenant,
            str(r.enqueued),
            str(r.published),
            f"{r.seconds:.1f}",
            f"{r.events_per_second:,.0f}",
        )
    Console().print(table)
    if verdict.problems:
        for problem in verdict.problems:
            console.print(f"[red]problem:[/red] {problem}")
        return 1
    console.print(
        f"[green]ok:[/green] {len(enqueued)} events, each in Kafka exactly once, in order per "
        "key, with headers; every row marked sent with its partition and offset"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
