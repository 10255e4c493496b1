"""Posting an Event never fails the reconcile that posts it (case K-10)."""

from __future__ import annotations

import logging

import pytest
from kubernetes import client
from somabrain_operator.conditions import post_event

from devenv.common import free_port

TENANT = {
    "apiVersion": "somabrain.io/v1alpha1",
    "kind": "Tenant",
    "metadata": {"name": "acme", "namespace": "payments", "uid": "u-1"},
}


def test_an_event_the_api_server_never_receives_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Nothing listens on the port: the connection is refused, as when the API server
    # is down or unreachable.
    config = client.Configuration()
    config.host = f"http://127.0.0.1:{free_port()}"
    config.retries = 0
    with client.ApiClient(config) as api, caplog.at_level(logging.WARNING):
        post_event(api, TENANT, warning=False, reason="Ready", message="children applied")

    assert "could not record event Ready on payments/acme" in caplog.text
