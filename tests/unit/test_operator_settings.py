"""The operator's settings: documented in --help with their defaults, checked before
anything connects, and the API client's request timeout (case K-9)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kubernetes import client
from somabrain_operator.config import OperatorSettings
from somabrain_operator.kubeapi import api_client

from tests.silent_proxy import SilentProxy

OPERATOR = str(Path(sys.executable).parent / "somabrain-operator")


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [OPERATOR, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "KUBECONFIG": "/nonexistent", **env},
        timeout=60,
        check=False,
    )


def test_help_lists_the_watch_and_request_timeouts_with_their_defaults() -> None:
    result = _run("--help")

    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "SOMABRAIN_OPERATOR_WATCH_SERVER_TIMEOUT_SECONDS:" in text
    assert "SOMABRAIN_OPERATOR_WATCH_CLIENT_TIMEOUT_SECONDS:" in text
    assert "half-closed" in text
    assert "SOMABRAIN_OPERATOR_API_REQUEST_TIMEOUT_SECONDS:" in text
    assert "(default 300)." in text
    assert "(default 330)." in text
    assert "(default 60)." in text


def test_a_client_timeout_not_above_the_server_timeout_is_refused_before_connecting() -> None:
    result = _run(
        SOMABRAIN_OPERATOR_WATCH_SERVER_TIMEOUT_SECONDS="60",
        SOMABRAIN_OPERATOR_WATCH_CLIENT_TIMEOUT_SECONDS="60",
    )

    assert result.returncode == 2
    assert result.stderr.startswith("FAILED: invalid operator settings")
    assert "SOMABRAIN_OPERATOR_WATCH_CLIENT_TIMEOUT_SECONDS (60) must be more than" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("SOMABRAIN_OPERATOR_STATUS_INTERVAL_SECONDS", "-1", "greater than 0 (got '-1')"),
        ("SOMABRAIN_OPERATOR_RULE_LABELS", "notjson", "is not valid JSON"),
    ],
)
def test_an_invalid_setting_is_one_line_naming_its_variable(
    variable: str, value: str, said: str
) -> None:
    result = _run(**{variable: value})

    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"FAILED: invalid operator settings: {variable}")
    assert said in line


def test_watch_timeouts_default_to_five_minutes_and_a_half_more() -> None:
    settings = OperatorSettings()

    assert settings.watch_server_timeout_seconds == 300
    assert settings.watch_client_timeout_seconds == 330
    with pytest.raises(ValueError, match="must be more than"):
        OperatorSettings(watch_server_timeout_seconds=30, watch_client_timeout_seconds=20)


@pytest.mark.timeout(30)
def test_an_api_request_without_an_answer_gives_up_after_the_timeout() -> None:
    # A server that accepts connections and never answers, as a silent network path does.
    with SilentProxy(("127.0.0.1", 9)) as silent:
        silent.silence_new(True)
        configuration = client.Configuration(host=f"http://127.0.0.1:{silent.port}")
        settings = OperatorSettings(api_request_timeout_seconds=1)
        started = time.monotonic()
        with (
            api_client(settings, configuration) as api,
            pytest.raises(client.ApiException) as failed,
        ):
            client.CoreV1Api(api).read_namespace("default")

    assert failed.value.status == 0
    assert "no answer" in str(failed.value.reason)
    # Once: a request that got no answer is not sent again.
    assert time.monotonic() - started < 2.5
