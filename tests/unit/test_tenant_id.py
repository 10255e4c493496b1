import pytest

from somabrain.config.errors import InvalidTenantId
from somabrain.config.types import parse_tenant_id


@pytest.mark.parametrize("value", ["a", "acme", "acme-eu-1", "a" * 40])
def test_parse_tenant_id_accepts_label_safe_ids(value: str) -> None:
    assert parse_tenant_id(value) == value


@pytest.mark.parametrize("value", ["", "Acme", "1acme", "acme-", "acme_eu", "a" * 41, "ac me"])
def test_parse_tenant_id_refuses_with_the_rule(value: str) -> None:
    with pytest.raises(InvalidTenantId, match="lowercase letters, digits or '-'"):
        parse_tenant_id(value)
