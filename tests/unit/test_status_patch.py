"""Status writes are merge patches: what a Tenant no longer has must be removed by name."""

from somabrain_operator.reconcile import removing_stale
from somabrain_operator.state import _differs


def test_keys_gone_from_the_new_status_are_removed_by_the_patch() -> None:
    old = {"featureFlags": {"dead-letter": False, "tenant-quotas": True}, "policy": "standard"}
    new = {"featureFlags": {"tenant-quotas": True}}

    patch = removing_stale(old, new)

    assert patch == {"featureFlags": {"tenant-quotas": True, "dead-letter": None}, "policy": None}


def test_a_patch_that_removes_a_key_differs_until_it_is_gone_then_not() -> None:
    current = {"resolved": {"featureFlags": {"dead-letter": False}}}
    patch = {"resolved": removing_stale(current["resolved"], {"featureFlags": {}})}

    assert _differs(current, patch)
    assert not _differs({"resolved": {"featureFlags": {}}}, patch)


def test_an_unchanged_status_does_not_differ() -> None:
    status = {"backlog": {"pending": 0, "circuit": "closed"}, "observedGeneration": 2}
    assert not _differs(status, dict(status))
    assert _differs(status, {"backlog": {"pending": 1, "circuit": "closed"}})
