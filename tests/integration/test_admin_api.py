"""The admin HTTP API, served by uvicorn on loopback over the real database (and, for
order after a replay, the real broker)."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from somabrain import enqueue_event
from somabrain.config.settings import PublisherSettings
from somabrain.delivery.publisher import build_publisher
from somabrain.edges.admin.api import create_app
from somabrain.edges.admin.auth import TokenFile
from somabrain.store.models import AdminAction, OutboxEvent
from somabrain.store.outbox import Delivered, mark_dead, mark_sent, record_failure
from tests.support import read_committed, set_aside, wait_for

pytestmark = pytest.mark.integration

SOMABRAIN = str(Path(sys.executable).parent / "somabrain")


@dataclasses.dataclass
class Api:
    url: str
    tokens_file: Path
    admin: str
    mine: str  # scoped to `tenant` only
    tenant: str
    other: str  # another tenant, invisible to `mine`

    def call(self, method: str, path: str, token: str | None, **kwargs: Any) -> httpx.Response:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        headers.update(kwargs.pop("headers", {}))
        return httpx.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def get(self, path: str, token: str | None = None, **params: Any) -> httpx.Response:
        return self.call("GET", path, self.admin if token is None else token, params=params)

    def post(self, path: str, body: Any, token: str | None = None) -> httpx.Response:
        return self.call("POST", path, self.admin if token is None else token, json=body)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _token() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex


def _write_tokens(path: Path, entries: list[dict[str, Any]]) -> None:
    path.write_text(yaml.safe_dump({"tokens": entries}))


@pytest.fixture
def api(engine: Engine, tmp_path: Path, tenant: str) -> Iterator[Api]:
    admin, mine = _token(), _token()
    other = f"o{uuid.uuid4().hex[:10]}"
    path = tmp_path / "tokens.yaml"
    _write_tokens(
        path,
        [
            {"name": "oncall", "token": admin, "admin": True},
            {"name": "team-mine", "token": mine, "tenants": [tenant]},
        ],
    )
    app = create_app(sessionmaker(engine), TokenFile(path))
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started, timeout=30)
    yield Api(f"http://127.0.0.1:{port}", path, admin, mine, tenant, other)
    server.should_exit = True
    thread.join(30)


def _enqueue(
    sessions: sessionmaker[Session], tenant: str, n: int, *, topic: str = "orders", key: str = "k"
) -> list[int]:
    with sessions.begin() as session:
        for i in range(n):
            enqueue_event(session, tenant_id=tenant, topic=topic, key=key, payload={"i": i})
    with sessions() as session:
        return list(
            session.scalars(
                select(OutboxEvent.id)
                .where(OutboxEvent.tenant_id == tenant)
                .order_by(OutboxEvent.id)
            )
        )


def _kill(sessions: sessionmaker[Session], ids: list[int]) -> None:
    with sessions.begin() as session:
        for row_id in ids:
            mark_dead(session, row_id=row_id, error="broker said no")


def _send(sessions: sessionmaker[Session], tenant: str, ids: list[int]) -> None:
    with sessions.begin() as session:
        mark_sent(session, [Delivered(i, 0, i) for i in ids], tenant_id=tenant)


def _event_id(sessions: sessionmaker[Session], row_id: int) -> str:
    with sessions() as session:
        return str(session.scalar(select(OutboxEvent.event_id).where(OutboxEvent.id == row_id)))


def _states(sessions: sessionmaker[Session], tenant: str) -> list[tuple[int, str, int]]:
    with sessions() as session:
        rows = session.execute(
            select(OutboxEvent.id, OutboxEvent.status, OutboxEvent.attempts)
            .where(OutboxEvent.tenant_id == tenant)
            .order_by(OutboxEvent.id)
        )
        return [(r[0], r[1], r[2]) for r in rows]


def test_a_request_without_a_known_token_is_refused_with_401(api: Api) -> None:
    for token in (None, "not-a-token-anyone-was-given"):
        response = api.call("GET", "/v1/tenants", token)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
    assert api.call("GET", "/healthz", None).status_code == 200


def test_pages_list_every_matching_event_once_in_id_order(
    api: Api, sessions: sessionmaker[Session]
) -> None:
    ids = _enqueue(sessions, api.tenant, 25)
    _enqueue(sessions, api.tenant, 3, topic="other-topic")
    _kill(sessions, ids[:4])

    seen: list[int] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 10, "topic": "orders"}
        if cursor is not None:
            params["cursor"] = cursor
        page = api.get(f"/v1/tenants/{api.tenant}/events", api.mine, **params).json()
        seen += [e["id"] for e in page["events"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids
    assert pages == 3

    dead = api.get(f"/v1/tenants/{api.tenant}/events", api.mine, state="dead").json()
    assert [e["id"] for e in dead["events"]] == ids[:4]
    assert {e["state"] for e in dead["events"]} == {"dead"}
    assert dead["events"][0]["last_error"] == "broker said no"


def test_an_event_in_full_has_its_payload_and_headers(
    api: Api, sessions: sessionmaker[Session]
) -> None:
    with sessions.begin() as session:
        enqueue_event(
            session,
            tenant_id=api.tenant,
            topic="orders",
            key="k",
            payload={"amount": 12},
            headers={"trace": "abc"},
            dedupe_key="order-12",
        )
    row = _enqueue(sessions, api.tenant, 0)[0]
    event_id = _event_id(sessions, row)
    found = api.get(f"/v1/tenants/{api.tenant}/events/{event_id}", api.mine).json()
    assert found["payload"] == {"amount": 12}
    assert found["headers"] == {"trace": "abc"}
    assert found["dedupe_key"] == "order-12"
    assert found["state"] == "pending"

    missing = api.get(f"/v1/tenants/{api.tenant}/events/{uuid.uuid4()}", api.mine)
    assert missing.status_code == 404


def test_counts_and_summary_show_only_the_tenants_a_token_may_see(
    api: Api, sessions: sessionmaker[Session]
) -> None:
    _kill(sessions, _enqueue(sessions, api.tenant, 3)[:1])
    _enqueue(sessions, api.other, 2)

    counts = api.get(f"/v1/tenants/{api.tenant}/counts", api.mine).json()
    assert (counts["pending"], counts["dead"], counts["sent"]) == (2, 1, 0)
    assert counts["oldest_pending_seconds"] >= 0

    mine = api.get("/v1/tenants", api.mine).json()["tenants"]
    assert [t["tenant"] for t in mine] == [api.tenant]
    everyone = {t["tenant"] for t in api.get("/v1/tenants").json()["tenants"]}
    assert {api.tenant, api.other} <= everyone


def test_a_tenant_scoped_token_gets_404_or_403_on_every_path_of_another_tenant(
    api: Api, sessions: sessionmaker[Session]
) -> None:
    # O-19: admin endpoints that took any tenant's credentials and showed every tenant.
    theirs = _enqueue(sessions, api.other, 3)
    _kill(sessions, theirs)
    their_event = _event_id(sessions, theirs[0])
    _enqueue(sessions, api.tenant, 1)
    other = api.other
    asks: dict[tuple[str, str], Callable[[], httpx.Response]] = {
        ("GET", "/v1/tenants/{tenant}/counts"): lambda: api.get(
            f"/v1/tenants/{other}/counts", api.mine
        ),
        ("GET", "/v1/tenants/{tenant}/events"): lambda: api.get(
            f"/v1/tenants/{other}/events", api.mine, state="dead"
        ),
        ("GET", "/v1/tenants/{tenant}/events/{event_id}"): lambda: api.get(
            f"/v1/tenants/{other}/events/{their_event}", api.mine
        ),
        ("POST", "/v1/tenants/{tenant}/replay"): lambda: api.post(
            f"/v1/tenants/{other}/replay", {"filter": {"states": ["dead"]}}, api.mine
        ),
        ("POST", "/v1/tenants/{tenant}/purge"): lambda: api.post(
            f"/v1/tenants/{other}/purge", {"filter": {}}, api.mine
        ),
        ("GET", "/v1/actions"): lambda: api.get("/v1/actions", api.mine, tenant=other),
    }
    routes = {
        (method, route.path)
        for route in _described_routes(api)
        for method in route.methods
        if route.path != "/v1/tenants"
    }
    assert set(asks) == routes, "every tenant path of the API is asked here"
    for (method, path), ask in asks.items():
        response = ask()
        assert response.status_code in (403, 404), (method, path, response.text)
        assert their_event not in response.text

    # Through its own tenant's paths, the other tenant's rows stay out of reach too.
    own = f"/v1/tenants/{api.tenant}"
    assert api.get(f"{own}/events/{their_event}", api.mine).status_code == 404
    replayed = api.post(f"{own}/replay", {"event_ids": [their_event]}, api.mine).json()
    assert replayed["outcomes"] == {their_event: "not-found"}
    assert replayed["rows"] == 0
    listed = api.get(f"{own}/events", api.mine, state="dead", limit=1000).json()
    assert listed["events"] == []
    assert {s for _, s, _ in _states(sessions, api.other)} == {"dead"}
    actions = api.get("/v1/actions", api.mine).json()["actions"]
    assert {a["tenant"] for a in actions} == {api.tenant}


def _described_routes(api: Api) -> list[Any]:
    """The API's routes, read from its OpenAPI description."""
    paths = api.call("GET", "/openapi.json", None).json()["paths"]

    @dataclasses.dataclass
    class Route:
        path: str
        methods: set[str]

    return [Route(p, {m.upper() for m in ops}) for p, ops in paths.items()]


def test_replay_by_filter_reports_a_dry_run_then_replays_once_and_audits(
    api: Api, sessions: sessionmaker[Session]
) -> None:
    ids = _enqueue(sessions, api.tenant, 6)
    _kill(sessions, ids[:4])
    path = f"/v1/tenants/{api.tenant}/replay"

    dry = api.post(path, {"filter": {"states": ["dead"]}, "dry_run": True}, api.mine).json()
    assert (dry["rows"], dry["dry_run"], dry["audit_id"]) == (4, True, None)
    assert [s for _, s, _ in _states(sessions, api.tenant)][:4] == ["dead"] * 4

    done = api.post(path, {"filter": {"states": ["dead"]}}, api.mine).json()
    assert done["rows"] == 4
    assert _states(sessions, api.tenant) == [(i, "pending", 0) for i in ids]
    again = api.post(path, {"filter": {"states": ["dead"]}}, api.mine).json()
    assert again["rows"] == 0

    with sessions() as session:
        audit = session.get(AdminAction, done["audit_id"])
        assert audit is not None
        assert (audit.actor, audit.action, audit.tenant_id, audit.rows) == (
            "token:team-mine",
            "replay",
            api.tenant,
            4,
        )
        assert audit.finished_at is not None
        assert audit.selection["filter"]["states"] == ["dead"]
    shown = api.get("/v1/actions", api.mine).json()["actions"]
    assert [a["rows"] for a in shown] == [0, 4]
    exposition = api.call("GET", "/metrics", None).text
    assert f'somabrain_events_replayed_total{{tenant="{api.tenant}"}} 4.0' in exposition


def test_replay_by_ids_says_what_it_did_with_each(
    api: Api, sessions: sessionmaker[Session]
) -> None:
    dead, failed, pending, sent = _enqueue(sessions, api.tenant, 4)
    _kill(sessions, [dead])
    with sessions.begin() as session:
        record_failure(
            session, row_id=failed, error="timeout", backoff_seconds=3600, max_attempts=9
        )
    _send(sessions, api.tenant, [sent])
    missing = str(uuid.uuid4())
    ids = [_event_id(sessions, r) for r in (dead, failed, pending, sent)] + [missing]

    result = api.post(f"/v1/tenants/{api.tenant}/replay", {"event_ids": ids}, api.mine).json()
    assert list(result["outcomes"].values()) == [
        "replayed",
        "replayed",
        "already-pending",
        "sent",
        "not-found",
    ]
    assert result["rows"] == 2
    assert _states(sessions, api.tenant) == [
        (dead, "pending", 0),
        (failed, "pending", 0),
        (pending, "pending", 0),
        (sent, "sent", 0),
    ]


def test_a_replayed_event_reaches_kafka_before_the_later_events_of_its_key(
    api: Api,
    sessions: sessionmaker[Session],
    engine: Engine,
    bootstrap: str,
    run_publisher: Any,
) -> None:
    topic = f"{api.tenant}.orders"
    first, *later = _enqueue(sessions, api.tenant, 4, topic=topic)
    _kill(sessions, [first])  # under poison policy block, the later ones wait behind it
    assert (
        api.post(f"/v1/tenants/{api.tenant}/replay", {"filter": {}}, api.mine).json()["rows"] == 1
    )

    settings = PublisherSettings(
        tenant=api.tenant, kafka_bootstrap_servers=bootstrap, poll_interval_seconds=0.2
    )
    run_publisher(build_publisher(settings, engine))
    assert wait_for(lambda: {s for _, s, _ in _states(sessions, api.tenant)} == {"sent"})
    values = [m.value() for m in read_committed(bootstrap, topic)]
    assert values == [b'{"i":%d}' % i for i in range(4)]
    assert len(later) == 3


def test_events_migration_0003_set_aside_as_repeats_are_never_replayed(
    api: Api, sessions: sessionmaker[Session]
) -> None:
    kept, repeat = _enqueue(sessions, api.tenant, 2)
    _kill(sessions, [repeat])
    with sessions.begin() as session:
        set_aside(session, repeat)
    path = f"/v1/tenants/{api.tenant}/replay"
    assert api.post(path, {"filter": {"states": ["dead"]}}, api.mine).json()["rows"] == 0
    by_id = api.post(path, {"event_ids": [_event_id(sessions, repeat)]}, api.mine).json()
    assert list(by_id["outcomes"].values()) == ["set-aside"]
    assert [s for _, s, _ in _states(sessions, api.tenant)] == ["pending", "dead"]
    assert kept < repeat


def test_a_replay_filter_without_states_replays_dead_events_only(
    api: Api, sessions: sessionmaker[Session]
) -> None:
    dead, failed = _enqueue(sessions, api.tenant, 2)
    _kill(sessions, [dead])
    with sessions.begin() as session:
        record_failure(
            session, row_id=failed, error="timeout", backoff_seconds=3600, max_attempts=9
        )
    result = api.post(f"/v1/tenants/{api.tenant}/replay", {"filter": {}}, api.mine).json()
    assert result["rows"] == 1
    assert _states(sessions, api.tenant) == [(dead, "pending", 0), (failed, "pending", 1)]


def test_replaying_an_event_a_later_one_of_its_key_overtook_says_so(
    api: Api, sessions: sessionmaker[Session]
) -> None:
    first, second = _enqueue(sessions, api.tenant, 2)
    _kill(sessions, [first])
    _send(sessions, api.tenant, [second])  # poison policy skip: the second went out
    result = api.post(f"/v1/tenants/{api.tenant}/replay", {"filter": {}}, api.mine).json()
    assert (result["rows"], result["overtaken"]) == (1, 1)


def test_purge_needs_an_admin_token_and_deletes_only_sent_events_of_the_filter(
    api: Api, sessions: sessionmaker[Session]
) -> None:
    orders = _enqueue(sessions, api.tenant, 5)
    others = _enqueue(sessions, api.tenant, 2, topic="audit")[len(orders) :]
    _send(sessions, api.tenant, orders[:3] + others)
    _kill(sessions, orders[3:4])
    path = f"/v1/tenants/{api.tenant}/purge"
    body = {"filter": {"topic": "orders"}}

    refused = api.post(path, body, api.mine)
    assert refused.status_code == 403
    assert "admin" in refused.json()["detail"]
    assert api.post(path, {**body, "dry_run": True}).json()["rows"] == 3
    done = api.post(path, body).json()
    assert done["rows"] == 3
    left = {(i, s) for i, s, _ in _states(sessions, api.tenant)}
    assert left == {(orders[3], "dead"), (orders[4], "pending")} | {(i, "sent") for i in others}
    with sessions() as session:
        audit = session.get(AdminAction, done["audit_id"])
        assert audit is not None
        assert (audit.actor, audit.rows) == ("token:oncall", 3)


@pytest.mark.parametrize(
    ("method", "path", "payload", "status", "says"),
    [
        ("GET", "/v1/tenants/T/events?limit=0", None, 422, "query.limit"),
        ("GET", "/v1/tenants/T/events?since=2026-01-01T00:00:00", None, 422, "query.since"),
        ("GET", "/v1/tenants/T/events?state=lost", None, 422, "query.state"),
        ("GET", "/v1/tenants/T/events?cursor=bm9wZQ", None, 400, "cursor"),
        ("GET", "/v1/tenants/Not_A_Tenant/events", None, 422, "path.tenant"),
        ("GET", "/v1/tenants/T/events/not-a-uuid", None, 422, "path.event_id"),
        ("POST", "/v1/tenants/T/replay", {}, 422, "give either event_ids or filter"),
        (
            "POST",
            "/v1/tenants/T/replay",
            {"filter": {"states": ["sent"]}},
            422,
            "sent cannot be replayed",
        ),
        ("POST", "/v1/tenants/T/replay", {"event_ids": []}, 422, "body.event_ids"),
        ("POST", "/v1/tenants/T/purge", {"filter": {"colour": "red"}}, 422, "body.filter.colour"),
        (
            "POST",
            "/v1/tenants/T/purge",
            {"filter": {"states": ["dead", "sent"]}},
            422,
            "filter.states: dead cannot be purged",
        ),
        (
            "POST",
            "/v1/tenants/T/replay",
            {"filter": {"key": "\u0000"}, "dry_run": True},
            422,
            "body.filter.key: holds a NUL character",
        ),
        (
            "POST",
            "/v1/tenants/T/replay",
            {"filter": {"topic": "a\u0000b"}, "dry_run": True},
            422,
            "body.filter.topic: holds a NUL character",
        ),
        (
            "POST",
            "/v1/tenants/T/purge",
            {"filter": {"key": "\u0000"}, "dry_run": True},
            422,
            "body.filter.key: holds a NUL character",
        ),
        ("GET", "/v1/tenants/T/events?key=%00", None, 422, "query.key: holds a NUL character"),
        ("GET", "/v1/tenants/T/events?topic=%00", None, 422, "query.topic: holds a NUL"),
        (
            "GET",
            "/v1/tenants/T/events?since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z",
            None,
            422,
            "since 2026-01-02T00:00:00+00:00 is not before until 2026-01-01T00:00:00+00:00",
        ),
        (
            "POST",
            "/v1/tenants/T/replay",
            {"filter": {"since": "2026-01-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}},
            422,
            "since 2026-01-01T00:00:00+00:00 is not before until 2026-01-01T00:00:00+00:00",
        ),
        (
            "POST",
            "/v1/tenants/T/purge",
            {"filter": {"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}},
            422,
            "is not before until",
        ),
    ],
)
def test_invalid_requests_get_a_4xx_naming_what_is_wrong(
    api: Api, method: str, path: str, payload: Any, status: int, says: str
) -> None:
    path = path.replace("/T/", f"/{api.tenant}/")
    response = api.call(method, path, api.admin, json=payload)
    assert response.status_code == status, response.text
    assert says in response.json()["detail"]


def test_purge_of_states_other_than_sent_is_refused_and_deletes_nothing(
    api: Api, sessions: sessionmaker[Session]
) -> None:
    sent, dead = _enqueue(sessions, api.tenant, 2)
    _send(sessions, api.tenant, [sent])
    _kill(sessions, [dead])
    path = f"/v1/tenants/{api.tenant}/purge"

    refused = api.post(path, {"filter": {"states": ["dead"]}})
    assert refused.status_code == 422, refused.text
    assert "filter.states" in refused.json()["detail"]
    assert [s for _, s, _ in _states(sessions, api.tenant)] == ["sent", "dead"]
    with sessions() as session:
        audited = session.scalars(select(AdminAction).where(AdminAction.tenant_id == api.tenant))
        assert list(audited) == []

    assert api.post(path, {"filter": {"states": ["sent"]}}).json()["rows"] == 1
    assert [(i, s) for i, s, _ in _states(sessions, api.tenant)] == [(dead, "dead")]


def test_rows_migration_0003_set_aside_are_not_counted_as_dead(
    api: Api, sessions: sessionmaker[Session]
) -> None:
    dead, repeat, _ = _enqueue(sessions, api.tenant, 3)
    _kill(sessions, [dead, repeat])
    with sessions.begin() as session:
        set_aside(session, repeat)

    counts = api.get(f"/v1/tenants/{api.tenant}/counts", api.mine).json()
    assert (counts["pending"], counts["dead"], counts["set_aside"]) == (1, 1, 1)
    [summary] = api.get("/v1/tenants", api.mine).json()["tenants"]
    assert (summary["dead"], summary["set_aside"]) == (1, 1)


def test_actions_on_a_tenant_without_events_add_no_metric_series(api: Api) -> None:
    nobody = f"nosuchtenant-{uuid.uuid4().hex[:8]}"
    assert api.post(f"/v1/tenants/{nobody}/replay", {"filter": {}}).json()["rows"] == 0
    assert api.post(f"/v1/tenants/{nobody}/purge", {"filter": {}}).json()["rows"] == 0
    ids = {"event_ids": [str(uuid.uuid4())]}
    assert api.post(f"/v1/tenants/{nobody}/replay", ids).json()["rows"] == 0

    assert nobody not in api.call("GET", "/metrics", None).text


def test_a_body_that_is_not_json_is_refused_saying_how_to_send_it(api: Api) -> None:
    response = api.call(
        "POST",
        f"/v1/tenants/{api.tenant}/replay",
        None,
        content=b'{"filter": {}}',
        headers={"Authorization": f"Bearer {api.admin}", "Content-Type": "text/plain"},
    )
    assert response.status_code == 415
    assert "Content-Type: application/json" in response.json()["detail"]


def test_the_openapi_description_covers_every_endpoint_and_the_bearer_scheme(api: Api) -> None:
    described = api.call("GET", "/openapi.json", None).json()
    assert set(described["paths"]) == {
        "/v1/tenants",
        "/v1/tenants/{tenant}/counts",
        "/v1/tenants/{tenant}/events",
        "/v1/tenants/{tenant}/events/{event_id}",
        "/v1/tenants/{tenant}/replay",
        "/v1/tenants/{tenant}/purge",
        "/v1/actions",
    }
    schemes = described["components"]["securitySchemes"]
    assert any(s["type"] == "http" and s["scheme"] == "bearer" for s in schemes.values())

    answers = {
        (method.upper(), path): set(operation["responses"])
        for path, operations in described["paths"].items()
        for method, operation in operations.items()
    }
    for (method, path), codes in answers.items():
        assert {"200", "401", "422", "503"} <= codes, (method, path)
        assert ("415" in codes) == (method == "POST"), (method, path)
        assert ("400" in codes) == (path == "/v1/tenants/{tenant}/events"), (method, path)
    state = next(
        p
        for p in described["paths"]["/v1/tenants/{tenant}/events"]["get"]["parameters"]
        if p["name"] == "state"
    )
    assert "pending includes the failed ones" in state["description"]


def test_a_changed_token_file_takes_effect_and_a_broken_one_is_not_taken(api: Api) -> None:
    fresh = _token()
    _write_tokens(api.tokens_file, [{"name": "rotated", "token": fresh, "admin": True}])
    assert wait_for(lambda: api.get("/v1/tenants", fresh).status_code == 200)
    assert api.get("/v1/tenants", api.admin).status_code == 401

    api.tokens_file.write_text("tokens: [")
    assert api.get("/v1/tenants", fresh).status_code == 200


def test_a_token_file_listing_no_token_revokes_every_token_until_it_lists_one(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="somabrain.edges.admin.auth"):
        api.tokens_file.write_text("tokens: []\n")
        assert wait_for(lambda: api.get("/v1/tenants", api.admin).status_code == 401)
    assert api.get(f"/v1/tenants/{api.tenant}/counts", api.mine).status_code == 401
    assert any("every token is revoked" in r.getMessage() for r in caplog.records)

    fresh = _token()
    _write_tokens(api.tokens_file, [{"name": "restored", "token": fresh, "admin": True}])
    assert wait_for(lambda: api.get("/v1/tenants", fresh).status_code == 200)
    assert api.get("/v1/tenants", api.admin).status_code == 401


def test_a_token_file_that_disappears_keeps_the_tokens_and_is_logged_once(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    api.tokens_file.unlink()
    with caplog.at_level("ERROR", logger="somabrain.edges.admin.auth"):
        for _ in range(3):
            assert api.get("/v1/tenants", api.admin).status_code == 200
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    assert f"admin API tokens file {api.tokens_file} cannot be read" in errors[0]
    assert "the 2 tokens read before stay in effect" in errors[0]
    assert "restore the file" in errors[0]


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "cannot read the admin API tokens"),
        ("", "tokens: Field required"),
        ("tokens: []", "tokens: the file lists no token"),
        ("tokens: [{name: a, token: short, admin: true}]", "at least 24 characters"),
        (
            "tokens: [{name: a, token: aaaaaaaaaaaaaaaaaaaaaaaaaaaa, admin: true, tenants: [x]}]",
            "either `admin: true` or a list of `tenants`",
        ),
    ],
)
def test_the_api_refuses_to_start_without_valid_tokens(
    database_url: str, tmp_path: Path, content: str | None, says: str
) -> None:
    path = tmp_path / "tokens.yaml"
    if content is not None:
        path.write_text(content)
    result = subprocess.run(
        [SOMABRAIN, "admin", "serve", "--log-level", "warning"],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "SOMABRAIN_DATABASE_URL": database_url,
            "SOMABRAIN_ADMIN_TOKENS_FILE": str(path),
            "SOMABRAIN_ADMIN_PORT": str(_free_port()),
        },
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("FAILED: "), result.stderr
    assert says in result.stderr


def test_the_served_api_answers_with_the_tokens_of_its_file(
    database_url: str, tmp_path: Path, sessions: sessionmaker[Session], tenant: str
) -> None:
    token = _token()
    path = tmp_path / "tokens.yaml"
    _write_tokens(path, [{"name": "team", "token": token, "tenants": [tenant]}])
    _enqueue(sessions, tenant, 2)
    port = _free_port()
    process = subprocess.Popen(
        [SOMABRAIN, "admin", "serve"],
        env={
            **os.environ,
            "SOMABRAIN_DATABASE_URL": database_url,
            "SOMABRAIN_ADMIN_TOKENS_FILE": str(path),
            "SOMABRAIN_ADMIN_HOST": "127.0.0.1",
            "SOMABRAIN_ADMIN_PORT": str(port),
        },
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        assert wait_for(up, timeout=30)
        counts = httpx.get(
            f"{url}/v1/tenants/{tenant}/counts", headers={"Authorization": f"Bearer {token}"}
        ).json()
        assert counts["pending"] == 2
    finally:
        process.terminate()
        # uvicorn stops cleanly, then ends by the signal it was sent (exit status 143).
        _, logged = process.communicate(timeout=30)
        assert process.returncode in (0, -signal.SIGTERM)
    assert "admin API tokens read from" in logged
    assert "Application shutdown complete" in logged


def test_replays_are_logged_with_who_what_and_how_many(
    api: Api, sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    _kill(sessions, _enqueue(sessions, api.tenant, 2))
    with caplog.at_level("INFO", logger="somabrain.store.admin"):
        api.post(f"/v1/tenants/{api.tenant}/replay", {"filter": {"topic": "orders"}}, api.mine)
    lines = [r.getMessage() for r in caplog.records if r.name == "somabrain.store.admin"]
    assert len(lines) == 1
    assert lines[0].startswith(f"replay of tenant {api.tenant} by token:team-mine: 2 rows")
    assert '"topic": "orders"' in lines[0]
