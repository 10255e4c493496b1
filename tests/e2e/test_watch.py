"""The operator on connections that go silent without closing (case K-9).

The operator reaches the real API server through a proxy of the test's own
(tests/silent_proxy.py), which can stop forwarding on the connections it carries while
keeping them open: the operator's watch streams and pooled connections then receive
nothing, not even the end of a watch. The test's own API calls go to the API server
directly.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from devenv import common
from devenv.mainjob import MainJob
from somabrain.store.engine import make_sessionmaker
from somabrain.store.outbox import report_tenant
from tests.e2e.helpers import clean_up, has_condition, tenant
from tests.silent_proxy import SilentProxy
from tests.support import wait_for

pytestmark = pytest.mark.e2e

SERVER_TIMEOUT = 5
CLIENT_TIMEOUT = 8
REQUEST_TIMEOUT = 3
# Noticing takes up to one client timeout for the silent watch itself, and up to one
# more when its next request is sent on another silent connection from the pool; then
# the Tenant is reconciled in well under a second.
NOTICED_WITHIN = 2 * CLIENT_TIMEOUT + 6


@dataclass(frozen=True)
class Proxied:
    """An operator whose every connection to the API server goes through `proxy`."""

    job: MainJob
    proxy: SilentProxy

    def log(self) -> str:
        return (self.job.work_dir / "operator.log").read_text()

    def ready(self, name: str) -> bool:
        return has_condition(self.job, name, "Ready", "True", "ChildrenApplied")


def _server(kubeconfig: Path) -> tuple[str, int]:
    config = yaml.safe_load(kubeconfig.read_text())
    url = urlsplit(config["clusters"][0]["cluster"]["server"])
    assert url.hostname is not None, url
    assert url.port is not None, url
    return url.hostname, url.port


def _kubeconfig_through(proxy: SilentProxy, source: Path, path: Path) -> Path:
    config = yaml.safe_load(source.read_text())
    for cluster in config["clusters"]:
        # The API server's certificate names 127.0.0.1, where the proxy listens too.
        cluster["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def start_proxied(stack_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Proxied]]:
    """Start the operator behind a proxy of its own, with `settings` as its
    SOMABRAIN_OPERATOR_* variables; stopped after the test."""
    started: list[Proxied] = []

    def start(**settings: str) -> Proxied:
        job = MainJob(stack_env, work_dir=tmp_path, namespace=f"e2e-{uuid.uuid4().hex[:8]}")
        job.prepare([])
        admin = Path(stack_env["KUBECONFIG"])
        proxy = SilentProxy(_server(admin))
        proxied = Proxied(job, proxy)
        started.append(proxied)
        kubeconfig = _kubeconfig_through(proxy, admin, tmp_path / "proxied.kubeconfig")
        job.start_operator(
            env={
                "KUBECONFIG": str(kubeconfig),
                **{f"SOMABRAIN_OPERATOR_{k.upper()}": v for k, v in settings.items()},
            }
        )
        return proxied

    yield start
    for proxied in started:
        proxied.job.stop_operator()
        clean_up(proxied.job)
        proxied.job.stop()
        proxied.proxy.close()


def _short_timeouts(**more: str) -> dict[str, str]:
    return {
        "watch_server_timeout_seconds": str(SERVER_TIMEOUT),
        "watch_client_timeout_seconds": str(CLIENT_TIMEOUT),
        "api_request_timeout_seconds": str(REQUEST_TIMEOUT),
        **more,
    }


def test_a_watch_gone_silent_is_given_up_and_the_next_tenant_converges(
    start_proxied: Callable[..., Proxied],
) -> None:
    operator = start_proxied(**_short_timeouts())
    operator.job.apply_tenants([tenant("before")])
    operator.job.wait_ready(["before"], timeout=60)
    assert f"are given up after {CLIENT_TIMEOUT} s" in operator.log()

    assert operator.proxy.silence_existing() > 0, "the operator bypassed the proxy"
    silenced = time.monotonic()
    operator.job.apply_tenants([tenant("after")])

    assert wait_for(lambda: operator.ready("after"), timeout=NOTICED_WITHIN), (
        f"Tenant 'after' not Ready {NOTICED_WITHIN} s after the operator's connections went "
        "silent; operator log:\n" + common.tail(operator.job.work_dir / "operator.log")
    )
    noticed = time.monotonic() - silenced
    assert noticed > 1, f"Ready after {noticed:.1f} s: the connections were not silent"


def test_with_a_long_client_timeout_a_silent_watch_stays_deaf_as_long(
    start_proxied: Callable[..., Proxied],
) -> None:
    # The control of the test above: the same silence, with watches the operator keeps
    # for 2 minutes (the API server would end them after 1, but that end never arrives).
    operator = start_proxied(
        **_short_timeouts(watch_server_timeout_seconds="60", watch_client_timeout_seconds="120")
    )
    operator.job.apply_tenants([tenant("before")])
    operator.job.wait_ready(["before"], timeout=60)

    assert operator.proxy.silence_existing() > 0, "the operator bypassed the proxy"
    operator.job.apply_tenants([tenant("after")])

    assert not wait_for(lambda: operator.ready("after"), timeout=NOTICED_WITHIN)


def test_the_status_loop_outlives_api_requests_that_get_no_answer(
    start_proxied: Callable[..., Proxied],
) -> None:
    operator = start_proxied(**_short_timeouts())
    job = operator.job
    job.apply_tenants([tenant("steady")])
    job.wait_ready(["steady"], timeout=60)
    # The status loop works: it, and only it, writes PublisherAvailable.
    assert wait_for(
        lambda: has_condition(job, "steady", "PublisherAvailable", "False", "NoReport"),
        timeout=30,
    )

    # Nothing reaches the API server any more, and the loop has a status to write: a
    # publisher's report arrives, and the write waits for an answer that never comes.
    before = len(operator.log())
    operator.proxy.silence_new(True)
    operator.proxy.silence_existing()
    with make_sessionmaker(job.engine).begin() as session:
        report_tenant(session, tenant_id="steady", pending=0, max_pending=None, publisher="steady")
    assert wait_for(
        lambda: "status loop:" in operator.log()[before:], timeout=6 * REQUEST_TIMEOUT + 4
    ), "no request of the status loop gave up; operator log:\n" + common.tail(
        job.work_dir / "operator.log"
    )
    operator.proxy.silence_new(False)

    job.apply_tenants([tenant("later")])
    assert wait_for(
        lambda: has_condition(job, "later", "PublisherAvailable", "False", "NoReport"),
        timeout=NOTICED_WITHIN + 10,
    ), "the status loop stopped; operator log:\n" + common.tail(job.work_dir / "operator.log")
