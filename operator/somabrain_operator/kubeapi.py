"""The operator's Kubernetes API client, whose every request has a timeout.

The kubernetes client waits for an answer forever unless a call says otherwise. On a
connection gone silent without closing (case K-9) that would stall a reconcile, or the
status loop, for good. Every request through `api_client` gives up after
`api_request_timeout_seconds` without an answer, and is not sent again by the client
(a connection that fails is still retried up to 3 times). That failure, like any other
failure to reach the API server, is raised as an `ApiException` with status 0, as the
kubernetes client itself does for TLS errors, so every caller handles it as a failed
request.
"""

from __future__ import annotations

from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client import rest

from somabrain_operator.config import OperatorSettings


class _TimedRestClient(rest.RESTClientObject):
    """The kubernetes client's transport, with a default timeout on every request."""

    def __init__(self, configuration: client.Configuration, *, timeout: float) -> None:
        super().__init__(configuration)
        self.timeout = timeout

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("_request_timeout") is None:
            kwargs["_request_timeout"] = self.timeout
        try:
            return super().request(method, url, *args, **kwargs)  # type: ignore[no-untyped-call]
        except urllib3.exceptions.HTTPError as exc:
            raise client.ApiException(
                status=0, reason=f"{method} {url}: no answer ({type(exc).__name__}: {exc})"
            ) from exc


def api_client(
    settings: OperatorSettings, configuration: client.Configuration | None = None
) -> client.ApiClient:
    """A client of the API server loaded at startup (in-cluster or $KUBECONFIG), or of
    `configuration`, whose requests give up after `settings.api_request_timeout_seconds`;
    close it after use."""
    configuration = configuration or client.Configuration.get_default_copy()
    configuration.retries = urllib3.Retry(total=3, read=0)
    api = client.ApiClient(configuration)
    api.rest_client.close()
    api.rest_client = _TimedRestClient(
        api.configuration, timeout=settings.api_request_timeout_seconds
    )
    return api
