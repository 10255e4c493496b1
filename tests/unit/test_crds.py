"""The committed CRDs: generated from the models, described, bounded, free of defaults."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import Field
from somabrain_operator import crds
from somabrain_operator.resources import KINDS, Kind
from somabrain_operator.resources.base import ResourceModel

from tests.resource_examples import (
    full_policy_status,
    full_tenant_status,
    largest_policy_spec,
    largest_shared_tenant_spec,
    largest_tenant_spec,
)

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "crds"
# The chart installs its own copy (templates/crds.yaml reads these files), K-15.
CHART_CRD_DIR = ROOT / "charts" / "somabrain-operator" / "files" / "crds"
# Kopf's peering CRD, which the chart installs with peering.enabled (K-7).
CHART_PEERING_DIR = ROOT / "charts" / "somabrain-operator" / "files" / "peering-crds"
KIND_IDS = [k.kind for k in KINDS]


def _schema(kind: Kind) -> dict[str, Any]:
    committed = yaml.safe_load((CRD_DIR / crds.file_name(kind)).read_text())
    [version] = committed["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def _nodes(schema: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node under `schema`, with its path."""
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{name}")
    if "items" in schema:
        yield from _nodes(schema["items"], f"{path}[*]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _nodes(schema["additionalProperties"], f"{path}{{*}}")


def _all_paths(schema: dict[str, Any], path: str) -> set[str]:
    return {p for p, _ in _nodes(schema, path)}


def _present_paths(schema: dict[str, Any], value: Any, path: str) -> set[str]:
    """The schema paths `value` sets."""
    paths = {path}
    if isinstance(value, dict) and "properties" in schema:
        for name, child in schema["properties"].items():
            if name in value:
                paths |= _present_paths(child, value[name], f"{path}.{name}")
    elif isinstance(value, dict) and "additionalProperties" in schema:
        for item in value.values():
            paths |= _present_paths(schema["additionalProperties"], item, f"{path}{{*}}")
    elif isinstance(value, list):
        for item in value:
            paths |= _present_paths(schema["items"], item, f"{path}[*]")
    return paths


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_committed_crd_is_what_the_models_generate(kind: Kind) -> None:
    committed = (CRD_DIR / crds.file_name(kind)).read_text()

    assert committed == crds.render(kind), f"crds/{crds.file_name(kind)} is stale: run make crds"


def test_crd_folder_holds_exactly_the_generated_kinds() -> None:
    assert sorted(p.name for p in CRD_DIR.glob("*.yaml")) == sorted(
        crds.file_name(k) for k in KINDS
    )


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_chart_copy_of_each_crd_is_the_one_in_the_crds_folder(kind: Kind) -> None:
    chart_copy = (CHART_CRD_DIR / crds.file_name(kind)).read_text()

    assert chart_copy == (CRD_DIR / crds.file_name(kind)).read_text(), (
        f"{CHART_CRD_DIR.relative_to(ROOT)}/{crds.file_name(kind)} differs from crds/: "
        "run make crds"
    )
    assert chart_copy == crds.render(kind)


def test_chart_holds_exactly_the_generated_crds() -> None:
    assert sorted(p.name for p in CHART_CRD_DIR.iterdir()) == sorted(
        crds.file_name(k) for k in KINDS
    )


def test_make_crds_writes_the_crds_folder_and_the_chart_copy(tmp_path: Path) -> None:
    folders = [tmp_path / "crds", tmp_path / "chart"]
    for folder in folders:
        folder.mkdir()

    crds.main([str(folder) for folder in folders] + ["--peering-dir", str(tmp_path / "peering")])

    for kind in KINDS:
        assert [(f / crds.file_name(kind)).read_text() for f in folders] == [crds.render(kind)] * 2
    assert (tmp_path / "peering" / crds.PEERING_FILE).read_text() == crds.render_peering()
    assert [str(d) for d in crds.OUTPUT_DIRS] == [
        "crds",
        str(CHART_CRD_DIR.relative_to(ROOT)),
    ]
    assert str(crds.PEERING_DIR) == str(CHART_PEERING_DIR.relative_to(ROOT))


def test_chart_s_peering_crd_is_what_the_operator_generates() -> None:
    assert sorted(p.name for p in CHART_PEERING_DIR.iterdir()) == [crds.PEERING_FILE]
    committed = (CHART_PEERING_DIR / crds.PEERING_FILE).read_text()

    assert committed == crds.render_peering(), (
        f"{CHART_PEERING_DIR.relative_to(ROOT)}/{crds.PEERING_FILE} is stale: run make crds"
    )


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_every_property_has_a_description(kind: Kind) -> None:
    undescribed = [
        path
        for path, node in _nodes(_schema(kind), kind.singular)
        # metadata is described by the API server, which allows nothing else there
        if path != f"{kind.singular}.metadata"
        and not node.get("description")
        and not path.endswith(("[*]", "{*}"))
    ]

    assert undescribed == []


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_schema_sets_no_defaults_and_keeps_no_unknown_fields(kind: Kind) -> None:
    keys = {key for _, node in _nodes(_schema(kind), "") for key in node}

    assert "default" not in keys
    assert "nullable" not in keys
    assert "x-kubernetes-preserve-unknown-fields" not in keys


def _bounded(node: dict[str, Any]) -> bool:
    bounds = {
        "string": ("maxLength", "enum"),
        "array": ("maxItems",),
        "integer": ("maximum",),
        "number": ("maximum",),
    }.get(node["type"], ())
    if node["type"] == "object" and "additionalProperties" in node:
        bounds = ("maxProperties",)
    return not bounds or any(b in node for b in bounds)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_every_spec_string_list_map_and_number_is_bounded(kind: Kind) -> None:
    spec = _schema(kind)["properties"]["spec"]

    assert [path for path, node in _nodes(spec, "spec") if not _bounded(node)] == []


@pytest.mark.parametrize(
    ("kind", "specs", "status"),
    [
        (KINDS[0], [largest_tenant_spec(), largest_shared_tenant_spec()], full_tenant_status()),
        (KINDS[1], [largest_policy_spec()], full_policy_status()),
    ],
    ids=KIND_IDS,
)
def test_examples_set_every_field_of_the_schema(
    kind: Kind, specs: list[dict[str, Any]], status: dict[str, Any]
) -> None:
    # The e2e tests rely on these examples being complete: a field added to a model
    # without one here would go untested against the API server.
    schema = _schema(kind)["properties"]
    examples = [("spec", spec) for spec in specs] + [("status", status)]

    present = set().union(*(_present_paths(schema[part], ex, part) for part, ex in examples))

    assert _all_paths(schema["spec"], "spec") | _all_paths(schema["status"], "status") <= present


def test_printer_columns_names_and_categories() -> None:
    def columns(kind: Kind) -> list[str]:
        [version] = crds.crd(kind)["spec"]["versions"]
        return [c["name"] for c in version["additionalPrinterColumns"] if "priority" not in c]

    tenant, policy = KINDS

    assert columns(tenant) == ["Tenant", "Mode", "Ready", "Publisher", "Pending", "Circuit", "Age"]
    assert columns(policy) == ["Tenants", "Rollout", "Age"]
    assert crds.crd(tenant)["spec"]["names"]["shortNames"] == ["tn"]
    assert crds.crd(policy)["spec"]["names"]["shortNames"] == ["obp"]
    assert {c for k in KINDS for c in crds.crd(k)["spec"]["names"]["categories"]} == {"somabrain"}


def test_generator_refuses_a_field_without_a_structural_schema() -> None:
    class Ambiguous(ResourceModel):
        """Either a number or a name."""

        size: int | str = Field(description="A union has no structural schema.")

    with pytest.raises(crds.UntranslatableSchema, match=r"spec\.size: anyOf of 2 types"):
        crds.model_schema(Ambiguous, "spec")


def test_generator_refuses_a_property_without_a_description() -> None:
    class Terse(ResourceModel):
        """A model whose field says nothing."""

        size: int = Field(le=10)

    with pytest.raises(crds.UntranslatableSchema, match=r"spec\.size: no description"):
        crds.model_schema(Terse, "spec")
