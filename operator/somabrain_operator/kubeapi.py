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

from somabrain_operator.config import GROUP, VERSION, OperatorSettings
from somabrain_operator.metrics import API_REQUESTS


class _TimedRestClient(rest.RESTClientObject):
    """The kubernetes client's transport, with a default timeout on every request."""

    def __init__(self, configuration: client.Configuration, *, timeout: float) -> None:
        super().__init__(configuration)
        self.timeout = timeout

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("_request_timeout") is None:
            kwargs["_request_timeout"] = self.timeout
        try:
            response = super().request(method, url, *args, **kwargs)  # type: ignore[no-untyped-call]
        except urllib3.exceptions.HTTPError as exc:
            API_REQUESTS.labels(method, "0").inc()
            raise client.ApiException(
                status=0, reason=f"{method} {url}: no answer ({type(exc).__name__}: {exc})"
            ) from exc
        API_REQUESTS.labels(method, str(response.status)).inc()
        return response


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


def get_own(api: client.ApiClient, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
    """A Tenant or OutboxPolicy (by `plural`) as the API server has it now, or None when
    it does not exist."""
    try:
        found: dict[str, Any] = client.CustomObjectsApi(api).get_namespaced_custom_object(  # type: ignore[assignment]
            GROUP, VERSION, namespace, plural, name
        )
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return found
