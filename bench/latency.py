"""Commit-to-visible latency at a steady rate, and the publisher's memory while draining.

Paced writers enqueue 1 KiB events at a fixed rate (default 1,000 events/s) through
`enqueue_events`, 10 events per transaction with one transaction due every 10 ms
(--group), from 2 threads with a connection each taking turns (--writers), as two
application processes would; each records when its transaction's commit returned.
Small groups rather than one transaction per event: one Python writer doing a
transaction per event reached about 260 events/s here, and writers busy enough to do
1,000 would take the CPU the publisher, database and broker need (--group 1 measures
that case). Two writers because one did not keep up on this loaded 2-cpu machine
(750 events/s: each transaction's round trips wait for a CPU), and four slowed
everything down; the result gives the achieved rate and the writers' transaction
times. A `read_committed` consumer in the same process (same monotonic clock)
records when each event reaches it. The publisher is the real one, `somabrain
publisher run --tenant T`, a separate process, once in exactly-once mode and once in
at-least-once mode; its resident memory is sampled while it drains (VmRSS every
100 ms, and VmHWM, the kernel's peak, at the end).

Reference measured in the same run: the same messages (key, 1 KiB value, headers)
produced straight to Kafka at the same rate in the same groups, with the publisher's
producer settings, read by the same consumer, from the moment each group was due:
  - idempotent producer (what at-least-once mode does without the database);
  - transactional producer, one transaction for whatever is due when the previous one
    committed (what exactly-once mode does without the database).
Ratios compare the publisher's percentiles with the reference of its mode.

With --steps the publisher runs under `bench.publisher_steps`, which also reports
where its cycle's time goes (claim, Kafka, marking rows sent, waiting for NOTIFY).

The run uses a database of its own on the stack's server, dropped at the end. The
first --warmup seconds of each measure are not counted. Results go to
bench/results/latency.json. Run: `.venv/bin/python -m bench.latency`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from sqlalchemy.orm import Session, sessionmaker

from bench.common import (
    ROOT,
    STATE_DIR,
    MemoryWatch,
    command_line,
    fresh_database,
    local_stack,
    machine,
    process_tree_cpu_seconds,
    progress,
    write_result,
)
from devenv.mainjob import create_topics
from somabrain import NewEvent, enqueue_event, enqueue_events
from somabrain.delivery.producer import build_config
from somabrain.store import migrate
from somabrain.store.codec import encode_payload
from somabrain.store.engine import make_engine, make_sessionmaker

RESULTS = ROOT / "bench" / "results" / "latency.json"
PAD = "x" * 1000  # with {"pad": ..., "seq": n} around it, a value of about 1 KiB
PARTITIONS = 3
CONSUMER_SETTINGS = {
    "isolation.level": "read_committed",
    "enable.auto.commit": False,
    "fetch.wait.max.ms": 100,
    "fetch.min.bytes": 1,
}


def _payload(seq: int) -> dict[str, Any]:
    return {"seq": seq, "pad": PAD}


class Arrivals:
    """A read_committed consumer on one topic, in a thread: when each event reached it.

    Events are told apart by their dedupe-key header, `<run>-<seq>`.
    """

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.received: dict[int, float] = {}
        self.duplicates = 0
        self._stop = threading.Event()
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"bench-latency-{uuid.uuid4().hex[:8]}",
                **CONSUMER_SETTINGS,
            }
        )
        self._consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
        self._thread = threading.Thread(target=self._run, name="arrivals", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            # poll() returns as soon as a message is there (consume() would wait for its
            # whole count or timeout); what else is already queued is taken right after.
            first = self._consumer.poll(0.1)
            if first is None:
                continue
            now = time.monotonic()
            for message in [first, *self._consumer.consume(num_messages=1000, timeout=0)]:
                if message.error():
                    continue
                seq = _seq(message.headers() or [])
                if seq is None:
                    continue
                if seq in self.received:
                    self.duplicates += 1
                else:
                    self.received[seq] = now
        self._consumer.close()

    def wait_for(self, seqs: range, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(s in self.received for s in seqs):
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def _seq(headers: Any) -> int | None:
    for name, value in headers:
        if name == "dedupe-key" and isinstance(value, bytes):
            return int(value.rsplit(b"-", 1)[1])
    return None


class Schedule:
    """Groups of `group` events due every `group / rate` seconds from `start`."""

    def __init__(self, *, rate: float, group: int, seconds: float) -> None:
        self.group = group
        self.interval = group / rate
        self.groups = math.ceil(seconds * rate / group)
        self.start = time.monotonic() + 0.2

    def due(self, number: int) -> float:
        return self.start + number * self.interval

    def seqs(self, number: int) -> range:
        return range(number * self.group, (number + 1) * self.group)

    def wait_until(self, moment: float) -> None:
        delay = moment - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def _stats(latencies_ms: list[float], *, over: bool = True) -> dict[str, float]:
    if not latencies_ms:
        return {}
    ordered = sorted(latencies_ms)

    def rank(q: float) -> float:
        return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 2)

    return {
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p95": rank(0.95),
        "p99": rank(0.99),
        "p99.9": rank(0.999),
        "max": round(ordered[-1], 2),
        "mean": round(sum(ordered) / len(ordered), 2),
    } | (
        {"over_50ms_fraction": round(sum(x > 50 for x in ordered) / len(ordered), 4)}
        if over
        else {}
    )


def _summary(
    ready: dict[int, float], arrivals: Arrivals, measured: range, interval: float
) -> dict[str, Any]:
    latencies = [
        (arrivals.received[s] - ready[s]) * 1000
        for s in measured
        if s in arrivals.received and s in ready
    ]
    times = sorted(ready[s] for s in measured if s in ready)
    achieved = len(times) / (times[-1] - times[0] + interval) if times else 0.0
    return {
        "events": len(measured),
        "received": len(latencies),
        "missing": len(measured) - len(latencies),
        "duplicates": arrivals.duplicates,
        "achieved_events_per_second": round(achieved),
        "latency_ms": _stats(latencies),
    }


def reference(
    bootstrap: str, topic: str, *, transactional: bool, rate: float, group: int, seconds: float
) -> dict[str, Any]:
    """Kafka alone: the same messages, groups and rate, from the moment each group is due."""
    config = build_config(
        bootstrap_servers=bootstrap,
        delivery_timeout_seconds=30,
        overrides={},
        transactional_id=f"bench-latency-{uuid.uuid4().hex[:8]}" if transactional else None,
    )
    producer = Producer(config)
    if transactional:
        producer.init_transactions(30)
    arrivals = Arrivals(bootstrap, topic)
    run = uuid.uuid4().hex[:8]
    schedule = Schedule(rate=rate, group=group, seconds=seconds)
    ready: dict[int, float] = {}

    def produce(seq: int) -> None:
        headers: list[tuple[str, str | bytes | None]] = [
            ("tenant-id", b"bench"),
            ("event-id", str(uuid.uuid4()).encode()),
            ("dedupe-key", f"{run}-{seq}".encode()),
            ("content-type", b"application/json"),
        ]
        value = encode_payload(_payload(seq)).encode()
        producer.produce(topic, key=f"k{seq % 100}".encode(), value=value, headers=headers)

    number = 0
    while number < schedule.groups:
        schedule.wait_until(schedule.due(number))
        # Everything due by now goes out together (in one transaction when transactional).
        batch: list[int] = []
        while number < schedule.groups and schedule.due(number) <= time.monotonic():
            batch.append(number)
            number += 1
        if transactional:
            producer.begin_transaction()
        for n in batch:
            ready.update(dict.fromkeys(schedule.seqs(n), schedule.due(n)))
            for seq in schedule.seqs(n):
                produce(seq)
        if transactional:
            producer.commit_transaction(30)
        producer.poll(0)
    producer.flush(30)
    return {"ready": ready, "arrivals": arrivals, "schedule": schedule}


def _somabrain_command(steps_file: Path | None) -> list[str]:
    if steps_file is not None:
        return [sys.executable, "-m", "bench.publisher_steps", str(steps_file)]
    beside = Path(sys.executable).with_name("somabrain")
    found = str(beside) if beside.exists() else shutil.which("somabrain")
    if found is None:
        raise SystemExit("`somabrain` is not installed; run `make install`")
    return [found]


@contextlib.contextmanager
def publisher_process(
    env: dict[str, str],
    tenant: str,
    mode: str,
    extra_env: dict[str, str],
    log: Path,
    steps_file: Path | None,
) -> Iterator[subprocess.Popen[bytes]]:
    """`somabrain publisher run --tenant T` as its own process, stopped by SIGTERM."""
    process_env = {
        **os.environ,
        **env,
        "SOMABRAIN_DELIVERY_MODE": mode,
        "SOMABRAIN_METRICS_PORT": "0",
        **extra_env,
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*_somabrain_command(steps_file), "publisher", "run", "--tenant", tenant],
            env=process_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def through_publisher(
    env: dict[str, str],
    topic: str,
    mode: str,
    *,
    rate: float,
    group: int,
    seconds: float,
    extra_env: dict[str, str],
    steps: bool,
    writers: int,
) -> dict[str, Any]:
    """The writers enqueue on schedule; the real publisher drains; the consumer times."""
    tenant = f"bench-lat-{mode.split('-')[0]}-{uuid.uuid4().hex[:6]}"
    engine = make_engine(env["DATABASE_URL"], pool_size=writers)
    sessions = make_sessionmaker(engine)
    run = uuid.uuid4().hex[:8]
    log = STATE_DIR / f"latency-publisher-{mode}.log"
    steps_file = STATE_DIR / f"latency-steps-{mode}.json" if steps else None
    if steps_file is not None:
        steps_file.unlink(missing_ok=True)
    arrivals = Arrivals(env["KAFKA_BOOTSTRAP_SERVERS"], topic)
    ready: dict[int, float] = {}
    timings: list[float] = []
    with publisher_process(env, tenant, mode, extra_env, log, steps_file) as process:
        memory = MemoryWatch(process.pid)
        _wait_until_active(log, process)
        schedule = Schedule(rate=rate, group=group, seconds=seconds)
        cpu_start = process_tree_cpu_seconds(process.pid)
        threads = [
            threading.Thread(
                target=_write,
                args=(sessions, schedule, range(k, schedule.groups, writers), ready),
                kwargs={"tenant": tenant, "topic": topic, "run": run, "timings": timings},
                name=f"writer-{k}",
            )
            for k in range(writers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        cpu_seconds = process_tree_cpu_seconds(process.pid) - cpu_start
        elapsed = time.monotonic() - schedule.start
        all_seqs = range(schedule.groups * group)
        if not arrivals.wait_for(all_seqs, timeout=60):
            progress(f"{mode}: not every event arrived within 60 s; see {log}")
        used = memory.stop()
        if process.poll() is not None:
            raise SystemExit(f"the publisher exited with {process.returncode}; see {log}")
    arrivals.stop()
    engine.dispose()
    result = {
        "ready": ready,
        "arrivals": arrivals,
        "schedule": schedule,
        "memory": used,
        "publisher_cpu_percent": round(100 * cpu_seconds / elapsed, 1),
        "writer_transaction_ms": _stats(timings, over=False),
    }
    if steps_file is not None and steps_file.exists():
        result["publisher_steps"] = json.loads(steps_file.read_text())
    return result


def _write(
    sessions: sessionmaker[Session],
    schedule: Schedule,
    numbers: range,
    ready: dict[int, float],
    *,
    tenant: str,
    topic: str,
    run: str,
    timings: list[float],
) -> None:
    """One writer: its share of the groups, each in its own transaction when due."""
    for number in numbers:
        schedule.wait_until(schedule.due(number))
        seqs = schedule.seqs(number)
        events = [
            NewEvent(
                tenant_id=tenant,
                topic=topic,
                key=f"k{seq % 100}",
                dedupe_key=f"{run}-{seq}",
                payload=_payload(seq),
            )
            for seq in seqs
        ]
        started = time.monotonic()
        with sessions.begin() as session:
            if len(events) == 1:
                e = events[0]
                enqueue_event(
                    session,
                    tenant_id=e.tenant_id,
                    topic=e.topic,
                    key=e.key,
                    dedupe_key=e.dedupe_key,
                    payload=e.payload,
                )
            else:
                enqueue_events(session, events)
        committed = time.monotonic()
        ready.update(dict.fromkeys(seqs, committed))
        timings.append((committed - started) * 1000)


def _wait_until_active(log: Path, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if b"publisher active for tenant" in log.read_bytes():
            return
        if process.poll() is not None:
            raise SystemExit(f"the publisher exited with {process.returncode}; see {log}")
        time.sleep(0.1)
    raise SystemExit(f"the publisher did not become active within {timeout:.0f} s; see {log}")


def _measured(result: dict[str, Any], warmup: float, rate: float) -> dict[str, Any]:
    schedule: Schedule = result["schedule"]
    first = math.ceil(warmup * rate / schedule.group) * schedule.group
    last = schedule.groups * schedule.group
    summary = _summary(result["ready"], result["arrivals"], range(first, last), schedule.interval)
    for extra in ("memory", "publisher_cpu_percent", "writer_transaction_ms", "publisher_steps"):
        if extra in result:
            summary[extra] = result[extra]
    return summary


def _ratio(measure: dict[str, Any], base: dict[str, Any], key: str) -> float | None:
    a, b = measure["latency_ms"].get(key), base["latency_ms"].get(key)
    return None if not a or not b else round(a / b, 2)


def one_round(
    env: dict[str, str],
    args: argparse.Namespace,
    extra_env: dict[str, str],
    number: int,
) -> dict[str, Any]:
    bootstrap = env["KAFKA_BOOTSTRAP_SERVERS"]
    run = uuid.uuid4().hex[:8]
    names = ["idempotent", "transactional", "exactly-once", "at-least-once"]
    topics = {name: f"bench.latency.{run}.{name}" for name in names}
    create_topics(bootstrap, list(topics.values()), partitions=PARTITIONS)
    seconds = args.warmup + args.seconds
    rate, group = args.rate, args.group

    def kafka_alone(name: str) -> dict[str, Any]:
        return reference(
            bootstrap,
            topics[name],
            transactional=name == "transactional",
            rate=rate,
            group=group,
            seconds=seconds,
        )

    def publisher(mode: str) -> dict[str, Any]:
        return through_publisher(
            env,
            topics[mode],
            mode,
            rate=rate,
            group=group,
            seconds=seconds,
            extra_env=extra_env,
            steps=args.steps,
            writers=args.writers,
        )

    measures: dict[str, Callable[[], dict[str, Any]]] = {
        "reference_kafka_idempotent": lambda: kafka_alone("idempotent"),
        "reference_kafka_transactional": lambda: kafka_alone("transactional"),
        "publisher_exactly_once": lambda: publisher("exactly-once"),
        "publisher_at_least_once": lambda: publisher("at-least-once"),
    }
    figures: dict[str, Any] = {}
    for name, measure in measures.items():
        progress(f"round {number}: {name} for {seconds:.0f} s ...")
        raw = measure()
        if name.startswith("reference"):
            raw["arrivals"].wait_for(range(raw["schedule"].groups * args.group), timeout=60)
            raw["arrivals"].stop()
        figures[name] = _measured(raw, args.warmup, args.rate)
        lat = figures[name]["latency_ms"]
        progress(
            f"round {number}: {name}: p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms, "
            f"max {lat.get('max')} ms, {figures[name]['received']}/{figures[name]['events']} "
            "received"
            + (
                f", publisher peak RSS {figures[name]['memory']['vm_hwm_mib']} MiB"
                if "memory" in figures[name]
                else ""
            )
        )
    eos, alo = figures["publisher_exactly_once"], figures["publisher_at_least_once"]
    txn, idem = figures["reference_kafka_transactional"], figures["reference_kafka_idempotent"]
    figures["ratios"] = {
        "exactly_once_vs_transactional_p50": _ratio(eos, txn, "p50"),
        "exactly_once_vs_transactional_p99": _ratio(eos, txn, "p99"),
        "at_least_once_vs_idempotent_p50": _ratio(alo, idem, "p50"),
        "at_least_once_vs_idempotent_p99": _ratio(alo, idem, "p99"),
    }
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__)
    parser.add_argument("--rate", type=float, default=1000.0, help="events per second")
    parser.add_argument(
        "--group",
        type=int,
        default=10,
        help="events per writer transaction (1: one enqueue_event per transaction)",
    )
    parser.add_argument(
        "--writers",
        type=int,
        default=2,
        help="writer threads, each with its own connection, taking turns on the schedule",
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds not counted")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--publisher-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the publisher (e.g. SOMABRAIN_BATCH_SIZE=100)",
    )
    parser.add_argument(
        "--steps",
        action="store_true",
        help="time each step of the publisher's cycle (python -m bench.publisher_steps)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    extra_env: dict[str, str] = {}
    for item in args.publisher_env:
        name, _, value = item.partition("=")
        extra_env[name] = value
    rounds: list[dict[str, Any]] = []
    with (
        local_stack(["postgres", "kafka"]) as running,
        fresh_database(running.env["DATABASE_URL"]) as database_url,
    ):
        env = {**running.env, "DATABASE_URL": database_url}
        migrate.upgrade(database_url)
        for number in range(1, args.rounds + 1):
            rounds.append(one_round(env, args, extra_env, number))
    result = {
        "command": command_line("bench.latency"),
        "rate_events_per_second": args.rate,
        "writer": (
            f"enqueue_events of {args.group} events per transaction, one transaction every "
            f"{1000 * args.group / args.rate:g} ms"
            if args.group > 1
            else f"enqueue_event, one transaction per event every {1000 / args.rate:g} ms"
        )
        + f", {args.writers} writer threads taking turns, each with its own connection; "
        "latency counted from the return of each commit",
        "payload_bytes": len(encode_payload(_payload(0))),
        "seconds_measured": args.seconds,
        "seconds_warmup": args.warmup,
        "partitions": PARTITIONS,
        "consumer": CONSUMER_SETTINGS,
        "publisher_environment": extra_env,
        "targets": "p99 commit-to-visible <= 50 ms at 1,000 events/s; "
        "publisher resident memory <= 150 MB while draining",
        "rounds": rounds,
        "machine": machine(),
    }
    write_result(args.output, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
