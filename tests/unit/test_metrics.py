"""The publisher's and the admin API's metrics are documented where users look for them."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from somabrain.delivery import metrics

README = Path(__file__).resolve().parents[2] / "README.md"


def _exposed_names() -> set[str]:
    names = set()
    families = [*metrics.REGISTRY.collect(), *metrics.ADMIN_REGISTRY.collect()]
    for family in families:
        suffix = "_total" if family.type == "counter" else ""
        names.add(family.name + suffix)
    return names


def test_every_metric_is_in_the_readme_table_and_nothing_else_is() -> None:
    section = README.read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`(somabrain_[a-z_]+)`", section))

    assert documented == _exposed_names()


def test_every_metric_is_labelled_by_tenant_only() -> None:
    # Bounded label values: the tenant, taken from the tenants the process serves.
    defined = [v for v in vars(metrics).values() if isinstance(v, MetricWrapperBase)]

    assert len(defined) == len(_exposed_names())
    for metric in defined:
        assert metric._labelnames == ("tenant",), metric
