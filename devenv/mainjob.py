"""The main job end to end on the local stack, shared by `make demo` and the e2e test.

Tenants are applied to the real API server, the operator (a real process) turns them
into publisher Deployments, the pod runner starts each Deployment's container command
as written, events are enqueued through `enqueue_event` into the real database, and a
read_committed consumer reads them back from the real broker. `verify` then compares
what Kafka holds with what was enqueued and what the database recorded, and lists
every lost, duplicated or reordered event.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from kubernetes import client
from kubernetes import config as kube_config
from sqlalchemy import text

from devenv import common
from devenv.podrunner import PodRunner
from somabrain.store import migrate
from somabrain.store.engine import make_engine, make_sessionmaker
from somabrain.store.outbox import enqueue_event

ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = ROOT / "crds"
TENANTS_MANIFEST = ROOT / "examples" / "tenants.yaml"
PUBLISHER_SELECTOR = "app.kubernetes.io/name=somabrain-publisher"

Progress = Callable[[str, int, int], None]
"""Called as (phase, done, total) while a long phase runs."""


@dataclasses.dataclass(frozen=True)
class Enqueued:
    row_id: int
    event_id: str
    tenant: str
    topic: str
    key: str
    seq: int


@dataclasses.dataclass(frozen=True)
class Consumed:
    topic: str
    partition: int
    offset: int
    key: str | None
    headers: dict[str, str]
    value: dict[str, Any]
    received_at: float


@dataclasses.dataclass
class TenantReport:
    tenant: str
    enqueued: int
    published: int
    seconds: float

    @property
    def events_per_second(self) -> float:
        return self.published / self.seconds if self.seconds > 0 else 0.0


@dataclasses.dataclass
class Verdict:
    problems: list[str]
    reports: list[TenantReport]


def load_tenants(path: Path = TENANTS_MANIFEST) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


class MainJob:
    """One run of the main job against a started stack (its environment in `env`)."""

    def __init__(self, env: dict[str, str], *, work_dir: Path, namespace: str) -> None:
        self.env = env
        self.work_dir = work_dir
        self.namespace = namespace
        self.engine = make_engine(env["DATABASE_URL"])
        self.api = kube_config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=env["KUBECONFIG"]
        )
        self.runner = PodRunner(self.api, log_dir=work_dir / "pods", selector=PUBLISHER_SELECTOR)
        self.operator_pid: int | None = None

    # Preparation ----------------------------------------------------------------------

    def prepare(self, tenants: list[dict[str, Any]]) -> None:
        """Schema, CRDs, namespace, the connection Secret, and the tenants' topics."""
        migrate.upgrade(self.env["DATABASE_URL"])
        apply_crds(self.api)
        core = client.CoreV1Api(self.api)
        namespace = client.V1Namespace(metadata=client.V1ObjectMeta(name=self.namespace))
        _create_or_ignore(lambda: core.create_namespace(namespace))
        secret = client.V1Secret(
            metadata=client.V1ObjectMeta(name="somabrain-connection", namespace=self.namespace),
            string_data={
                "DATABASE_URL": self.env["DATABASE_URL"],
                "KAFKA_BOOTSTRAP_SERVERS": self.env["KAFKA_BOOTSTRAP_SERVERS"],
            },
        )
        _create_or_ignore(lambda: core.create_namespaced_secret(self.namespace, secret))
        topics = [t for tenant in tenants for t in tenant["spec"].get("topics", [])]
        create_topics(self.env["KAFKA_BOOTSTRAP_SERVERS"], topics)

    def start_operator(self, *args: str, env: dict[str, str] | None = None) -> int:
        """Start the operator (with database access, reporting backlog every 2 s)."""
        exe = Path(sys.executable).parent / "somabrain-operator"
        if not exe.exists():
            raise common.StartFailed(f"{exe} is missing; run `make install`")
        self.operator_pid = common.spawn(
            [str(exe), *args],
            log_path=self.work_dir / "operator.log",
            env={
                "KUBECONFIG": self.env["KUBECONFIG"],
                "SOMABRAIN_OPERATOR_DATABASE_URL": self.env["DATABASE_URL"],
                "SOMABRAIN_OPERATOR_STATUS_INTERVAL_SECONDS": "2",
                **(env or {}),
            },
        )
        return self.operator_pid

    def apply_tenants(self, tenants: list[dict[str, Any]]) -> None:
        custom = client.CustomObjectsApi(self.api)
        for tenant in tenants:
            custom.patch_namespaced_custom_object(
                "somabrain.io",
                "v1alpha1",
                self.namespace,
                "tenants",
                tenant["metadata"]["name"],
                tenant,
                field_manager="somabrain-demo",
                force=True,
                _content_type="application/apply-patch+yaml",
            )

    def wait_ready(self, names: list[str], *, timeout: float) -> None:
        """Wait until every Tenant reports Ready for its generation and has its Deployment."""
        custom = client.CustomObjectsApi(self.api)
        apps = client.AppsV1Api(self.api)
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending and time.monotonic() < deadline:
            for name in sorted(pending):
                obj: dict[str, Any] = custom.get_namespaced_custom_object(  # type: ignore[assignment]
                    "somabrain.io", "v1alpha1", self.namespace, "tenants", name
                )
                if _ready(obj) and _deployment_exists(apps, self.namespace, obj):
                    pending.discard(name)
            if self.operator_pid is not None and not common.pid_alive(self.operator_pid):
                raise common.StartFailed(
                    "the operator exited; its log:\n" + common.tail(self.work_dir / "operator.log")
                )
            time.sleep(0.5)
        if pending:
            raise common.StartFailed(
                f"Tenants not Ready after {timeout:.0f}s: {sorted(pending)}; operator log:\n"
                + common.tail(self.work_dir / "operator.log")
            )

    def start_publishers(self) -> int:
        return len(self.runner.sync(self.namespace))

    # The events -------------------------------------------------------------------------

    def enqueue(
        self,
        tenants: list[dict[str, Any]],
        *,
        total: int,
        keys_per_tenant: int = 40,
        seed: int = 7,
        progress: Progress | None = None,
    ) -> list[Enqueued]:
        """Enqueue `total` events spread over the tenants and their keys, 100 per transaction."""
        rng = random.Random(seed)
        sessions = make_sessionmaker(self.engine)
        run_id = uuid.uuid4().hex[:8]
        targets = [(t["spec"]["tenantId"], t["spec"]["topics"][0]) for t in tenants]
        seq: dict[tuple[str, str], int] = defaultdict(int)
        out: list[Enqueued] = []
        for start in range(0, total, 100):
            with sessions.begin() as session:
                for i in range(start, min(start + 100, total)):
                    tenant, topic = rng.choice(targets)
                    key = f"customer-{rng.randrange(keys_per_tenant)}"
                    seq[(tenant, key)] += 1
                    result = enqueue_event(
                        session,
                        tenant_id=tenant,
                        topic=topic,
                        key=key,
                        dedupe_key=f"{run_id}-{i}",
                        event_type="order.updated",
                        payload={"seq": seq[(tenant, key)], "n": i, "note": "x" * 64},
                    )
                    assert result.event_id is not None
                    out.append(
                        Enqueued(0, str(result.event_id), tenant, topic, key, seq[(tenant, key)])
                    )
            if progress:
                progress("enqueue", len(out), total)
        ids = _row_ids(self.engine, [e.event_id for e in out])
        return [dataclasses.replace(e, row_id=ids[e.event_id]) for e in out]

    def topic_ends(self, topics: list[str]) -> list[TopicPartition]:
        """Where each partition of the topics ends now: reading starts there, so events
        of earlier runs on the same stack are not mistaken for this run's."""
        consumer = self._consumer()
        try:
            ends = []
            for topic in topics:
                metadata = consumer.list_topics(topic, timeout=30).topics[topic]
                for partition in metadata.partitions:
                    _, high = consumer.get_watermark_offsets(
                        TopicPartition(topic, partition), timeout=30
                    )
                    ends.append(TopicPartition(topic, partition, high))
            return ends
        finally:
            consumer.close()

    def consume(
        self,
        start: list[TopicPartition],
        *,
        expected: int,
        timeout: float,
        progress: Progress | None = None,
    ) -> list[Consumed]:
        """Read from `start` with read_committed until `expected` records or timeout."""
        consumer = self._consumer()
        consumer.assign(start)
        out: list[Consumed] = []
        deadline = time.monotonic() + timeout
        # Keep reading a little after reaching the count, so duplicates are seen too.
        settle_until: float | None = None
        try:
            while time.monotonic() < deadline:
                if settle_until is not None and time.monotonic() > settle_until:
                    break
                for msg in consumer.consume(500, timeout=0.5):
                    if msg.error():
                        continue
                    out.append(_decode(msg))
                if progress:
                    progress("consume", min(len(out), expected), expected)
                if len(out) >= expected and settle_until is None:
                    settle_until = time.monotonic() + 3.0
        finally:
            consumer.close()
        return out

    def _consumer(self) -> Consumer:
        return Consumer(
            {
                "bootstrap.servers": self.env["KAFKA_BOOTSTRAP_SERVERS"],
                "group.id": f"somabrain-verify-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            }
        )

    def stop_operator(self) -> None:
        if self.operator_pid is not None:
            common.stop_pid(self.operator_pid)
            self.operator_pid = None

    def stop(self) -> None:
        self.runner.stop_all()
        self.stop_operator()
        self.engine.dispose()
        self.api.close()


def verify(
    enqueued: list[Enqueued],
    consumed: list[Consumed],
    rows: dict[str, tuple[str, int | None, int | None]],
    *,
    started_at: float,
) -> Verdict:
    """Every problem with the run: lost, duplicated, reordered, headers, database records.

    `rows` maps event id to (status, partition, offset) as the database holds them.
    """
    problems: list[str] = []
    by_id: dict[str, list[Consumed]] = defaultdict(list)
    for record in consumed:
        by_id[record.headers.get("event-id", "")].append(record)

    expected = {e.event_id: e for e in enqueued}
    lost = [eid for eid in expected if eid not in by_id]
    duplicated = [eid for eid, copies in by_id.items() if len(copies) > 1]
    unknown = [eid for eid in by_id if eid not in expected]
    if lost:
        problems.append(f"{len(lost)} events lost, e.g. {lost[:3]}")
    if duplicated:
        problems.append(f"{len(duplicated)} events duplicated, e.g. {duplicated[:3]}")
    if unknown:
        problems.append(f"{len(unknown)} unexpected events in Kafka, e.g. {unknown[:3]}")

    problems.extend(_check_records(expected, by_id, rows))
    problems.extend(_check_order(expected, consumed))
    return Verdict(problems, _reports(enqueued, by_id, started_at))


def _check_records(
    expected: dict[str, Enqueued],
    by_id: dict[str, list[Consumed]],
    rows: dict[str, tuple[str, int | None, int | None]],
) -> Iterable[str]:
    for eid, event in expected.items():
        copies = by_id.get(eid)
        if not copies:
            continue
        record = copies[0]
        if record.key != event.key or record.topic != event.topic:
            yield (
                f"event {eid}: key/topic {record.key}/{record.topic}, "
                f"expected {event.key}/{event.topic}"
            )
        if record.headers.get("tenant-id") != event.tenant or "dedupe-key" not in record.headers:
            yield f"event {eid}: headers incomplete or wrong: {record.headers}"
        status, partition, offset = rows.get(eid, ("missing", None, None))
        if (status, partition, offset) != ("sent", record.partition, record.offset):
            yield (
                f"event {eid}: database says {status} at {partition}/{offset}, "
                f"Kafka has it at {record.partition}/{record.offset}"
            )


def _check_order(expected: dict[str, Enqueued], consumed: list[Consumed]) -> Iterable[str]:
    # A consumer sees each partition in offset order, so per key the row ids it sees
    # must rise; a key never spans partitions, so this is the key's order in Kafka.
    last: dict[tuple[str, str], int] = {}
    for record in consumed:
        event = expected.get(record.headers.get("event-id", ""))
        if event is None:
            continue
        key = (event.tenant, event.key)
        if key in last and event.row_id <= last[key]:
            yield f"key {key}: row {event.row_id} arrived after row {last[key]}"
        last[key] = max(last.get(key, 0), event.row_id)


def _reports(
    enqueued: list[Enqueued], by_id: dict[str, list[Consumed]], started_at: float
) -> list[TenantReport]:
    per_tenant: dict[str, TenantReport] = {}
    for event in enqueued:
        report = per_tenant.setdefault(event.tenant, TenantReport(event.tenant, 0, 0, 0.0))
        report.enqueued += 1
        copies = by_id.get(event.event_id)
        if copies:
            report.published += 1
            report.seconds = max(report.seconds, copies[0].received_at - started_at)
    return [per_tenant[t] for t in sorted(per_tenant)]


def database_rows(engine: Any, tenants: list[str]) -> dict[str, tuple[str, int | None, int | None]]:
    with engine.connect() as conn:
        result = conn.execute(
            text(
                "SELECT event_id::text, status, kafka_partition, kafka_offset"
                " FROM outbox_events WHERE tenant_id = ANY(:tenants)"
            ),
            {"tenants": tenants},
        )
        return {row[0]: (row[1], row[2], row[3]) for row in result}


def apply_crds(api: client.ApiClient) -> None:
    ext = client.ApiextensionsV1Api(api)
    for path in sorted(CRD_DIR.glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        ext.patch_custom_resource_definition(
            body["metadata"]["name"],
            body,
            field_manager="somabrain-devenv",
            force=True,
            _content_type="application/apply-patch+yaml",
        )
        _wait_established(ext, body["metadata"]["name"])


def _wait_established(ext: client.ApiextensionsV1Api, name: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        crd = ext.read_custom_resource_definition(name)
        conditions = crd.status.conditions or [] if crd.status else []
        if any(c.type == "Established" and c.status == "True" for c in conditions):
            return
        time.sleep(0.2)
    raise common.StartFailed(f"CRD {name} was not Established within 30s")


def create_topics(bootstrap: str, topics: list[str], *, partitions: int = 3) -> None:
    if not topics:
        return
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in topics]
    )
    for topic, future in futures.items():
        try:
            future.result(30)
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise common.StartFailed(f"creating topic {topic} failed: {exc}") from exc


def _create_or_ignore(create: Callable[[], object]) -> None:
    try:
        create()
    except client.ApiException as exc:
        if exc.status != 409:
            raise


def _ready(obj: dict[str, Any]) -> bool:
    status = obj.get("status") or {}
    generation = obj["metadata"].get("generation")
    return any(
        c.get("type") == "Ready"
        and c.get("status") == "True"
        and c.get("observedGeneration") == generation
        for c in status.get("conditions", [])
    )


def _deployment_exists(apps: client.AppsV1Api, namespace: str, obj: dict[str, Any]) -> bool:
    name = ((obj.get("status") or {}).get("children") or {}).get("deployment")
    if not name:
        return False
    try:
        apps.read_namespaced_deployment(name, namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def _decode(msg: Any) -> Consumed:
    headers = {k: (v or b"").decode() for k, v in (msg.headers() or [])}
    key = msg.key()
    value = msg.value()
    return Consumed(
        topic=msg.topic(),
        partition=msg.partition(),
        offset=msg.offset(),
        key=None if key is None else key.decode(),
        headers=headers,
        value={} if value is None else json.loads(value),
        received_at=time.monotonic(),
    )


def _row_ids(engine: Any, event_ids: list[str]) -> dict[str, int]:
    with engine.connect() as conn:
        result = conn.execute(
            text("SELECT event_id::text, id FROM outbox_events WHERE event_id::text = ANY(:ids)"),
            {"ids": event_ids},
        )
        return {row[0]: int(row[1]) for row in result}
