"""Which children `apply` leaves alone: those whose live object is as wanted (K-2, K-3)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kubernetes import client
from somabrain_operator.apply import APPLIED, KIND_MISSING, Lives, apply, in_place, stamped


def _config_map(**data: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "somabrain-publisher-acme",
            "namespace": "team-a",
            "labels": {"app.kubernetes.io/managed-by": "somabrain-operator"},
            "ownerReferences": [
                {"apiVersion": "somabrain.io/v1alpha1", "kind": "Tenant", "name": "acme",
                 "uid": "u-1", "controller": True, "blockOwnerDeletion": True},
            ],
        },
        "data": dict(data),
    }  # fmt: skip


def _live(wanted: dict[str, Any]) -> dict[str, Any]:
    """`wanted` as the API server returns it: with fields of its own and of others."""
    live = copy.deepcopy(stamped(wanted))
    live["metadata"] |= {"uid": "cm-1", "resourceVersion": "42", "managedFields": [{}]}
    live["metadata"]["annotations"]["someone.example/note"] = "kept"
    return live


def test_a_live_object_as_applied_is_in_place() -> None:
    wanted = _config_map(**{"tenants.yaml": "a: 1\n"})

    assert in_place(stamped(wanted), _live(wanted))


def test_the_digest_is_of_the_content_and_stable() -> None:
    wanted = _config_map(**{"tenants.yaml": "a: 1\n"})

    assert stamped(stamped(wanted)) == stamped(wanted)
    assert (
        stamped(wanted)["metadata"]["annotations"][APPLIED]
        != (stamped(_config_map(**{"tenants.yaml": "a: 2\n"}))["metadata"]["annotations"][APPLIED])
    )
    # The wanted object itself is not changed.
    assert "annotations" not in wanted["metadata"]


def test_a_field_changed_by_someone_else_is_not_in_place() -> None:
    wanted = _config_map(**{"tenants.yaml": "a: 1\n"})
    live = _live(wanted)
    live["data"]["tenants.yaml"] = "tenants: {}\n"

    assert not in_place(stamped(wanted), live)


def test_a_field_no_longer_wanted_is_not_in_place() -> None:
    # The operator set two keys before and wants one now: the live object has every
    # wanted field, yet an apply is what removes the other one.
    before = _config_map(**{"tenants.yaml": "a: 1\n", "old.yaml": "x\n"})
    now = _config_map(**{"tenants.yaml": "a: 1\n"})

    assert not in_place(stamped(now), _live(before))


def test_a_removed_digest_or_a_list_of_another_length_is_not_in_place() -> None:
    wanted = _config_map(**{"tenants.yaml": "a: 1\n"})
    no_digest = _live(wanted)
    del no_digest["metadata"]["annotations"][APPLIED]
    two_owners = _live(wanted)
    two_owners["metadata"]["ownerReferences"].append({"uid": "u-2"})

    assert not in_place(stamped(wanted), no_digest)
    assert not in_place(stamped(wanted), two_owners)
    assert not in_place(stamped(wanted), None)


def test_fields_the_api_server_adds_inside_list_items_are_ignored() -> None:
    wanted = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "s", "namespace": "n"},
        "spec": {"ports": [{"name": "metrics", "port": 9400}]},
    }
    live = copy.deepcopy(stamped(wanted))
    live["spec"]["ports"][0] |= {"protocol": "TCP", "targetPort": 9400}
    live["spec"]["clusterIP"] = "10.0.0.7"

    assert in_place(stamped(wanted), live)


def test_an_object_of_a_kind_not_served_is_refused_without_a_request() -> None:
    wanted = _config_map() | {"kind": "PrometheusRule"}
    lives = Lives({("PrometheusRule", "team-a", "somabrain-publisher-acme"): KIND_MISSING})

    # No API client is needed: nothing is sent.
    with pytest.raises(client.ApiException) as raised:
        apply(None, wanted, controller="u-1", lives=lives)  # type: ignore[arg-type]
    assert raised.value.status == 404


def test_a_quantity_the_api_server_wrote_back_in_canonical_form_is_in_place() -> None:
    wanted = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "q", "namespace": "n"},
        "spec": {"hard": {"requests.cpu": "0.5", "limits.memory": "1024Mi", "pods": "4"}},
    }
    live = copy.deepcopy(stamped(wanted))
    live["spec"]["hard"] |= {"requests.cpu": "500m", "limits.memory": "1Gi"}

    assert in_place(stamped(wanted), live)
    live["spec"]["hard"]["limits.memory"] = "2Gi"
    assert not in_place(stamped(wanted), live)
