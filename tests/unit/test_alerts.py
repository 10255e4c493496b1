"""The alerting rules: one definition, the committed rules file generated from it."""

from __future__ import annotations

from pathlib import Path

import yaml

from somabrain.delivery.alerts import Thresholds, rule_group, rules_file

ROOT = Path(__file__).resolve().parents[2]


def test_committed_rules_file_is_what_the_definitions_generate() -> None:
    committed = (ROOT / "deploy" / "prometheus" / "somabrain-rules.yaml").read_text()

    assert committed == rules_file([rule_group()]), (
        "regenerate: python -m somabrain.delivery.alerts > deploy/prometheus/somabrain-rules.yaml"
    )


def test_a_tenants_rules_select_only_that_tenant_and_carry_its_label() -> None:
    group = rule_group(tenant="acme", thresholds=Thresholds(backlog_warning=42))

    exprs = {r["alert"]: r["expr"] for r in group["rules"]}
    assert (
        exprs["SomabrainPublisherDown"] == 'absent(somabrain_publisher_active{tenant="acme"} == 1)'
    )
    assert exprs["SomabrainBacklogHigh"].endswith("> 42")
    assert all('{tenant="acme"}' in expr for expr in exprs.values())
    assert all(r["labels"]["tenant"] == "acme" for r in group["rules"])


def test_every_alert_has_a_severity_a_summary_and_a_description() -> None:
    for group in (rule_group(), rule_group(tenant="acme")):
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"warning", "critical"}
            assert rule["annotations"]["summary"]
            assert rule["annotations"]["description"]


def test_rules_file_is_valid_yaml_with_one_group() -> None:
    loaded = yaml.safe_load(rules_file([rule_group()]))

    assert [g["name"] for g in loaded["groups"]] == ["somabrain-outbox"]
