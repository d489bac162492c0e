"""The example workflows: API files name real inputs with valid values; UI files match them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from face_consistency.nodes import NODE_CLASS_MAPPINGS

EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"
NAMES = ("score_one_edit", "best_of_n_seeds", "multi_person_edit")
WIDGET_KINDS = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def api(name: str) -> dict[str, dict[str, Any]]:
    return json.loads((EXAMPLES / "api" / f"{name}.json").read_text())


def ui(name: str) -> dict[str, Any]:
    return json.loads((EXAMPLES / f"{name}.json").read_text())


def widget_names(cls: type) -> list[str]:
    spec = cls.INPUT_TYPES()
    names = []
    for name, (kind, *rest) in {**spec.get("required", {}), **spec.get("optional", {})}.items():
        options = rest[0] if rest else {}
        if (isinstance(kind, list) or kind in WIDGET_KINDS) and not options.get("forceInput"):
            names.append(name)
    return names


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_uses_our_nodes_correctly(name: str) -> None:
    workflow = api(name)
    assert any(node["class_type"] in NODE_CLASS_MAPPINGS for node in workflow.values())
    for node_id, node in workflow.items():
        cls = NODE_CLASS_MAPPINGS.get(node["class_type"])
        if cls is None:
            continue
        spec = cls.INPUT_TYPES()
        inputs = {**spec.get("required", {}), **spec.get("optional", {})}
        assert set(spec["required"]) <= set(node["inputs"]) <= set(inputs), node_id
        for input_name, value in node["inputs"].items():
            kind, *rest = inputs[input_name]
            options = rest[0] if rest else {}
            if isinstance(value, list):
                source = workflow[value[0]]
                source_cls = NODE_CLASS_MAPPINGS.get(source["class_type"])
                if source_cls is not None:
                    assert source_cls.RETURN_TYPES[value[1]] == kind, f"{node_id}.{input_name}"
            elif isinstance(kind, list):
                if input_name != "pack":  # the dropdown lists what is installed
                    assert value in kind, f"{node_id}.{input_name}={value!r}"
            else:
                assert options.get("min", value) <= value <= options.get("max", value), f"{node_id}.{input_name}"


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_matches_api(name: str) -> None:
    workflow, graph = api(name), ui(name)
    nodes = {str(node["id"]): node for node in graph["nodes"]}
    assert {k: n["class_type"] for k, n in workflow.items()} == {k: n["type"] for k, n in nodes.items()}

    links = {link[0]: link for link in graph["links"]}
    api_links = {
        (value[0], value[1], node_id, input_name)
        for node_id, node in workflow.items()
        for input_name, value in node["inputs"].items()
        if isinstance(value, list)
    }
    ui_links = set()
    for node_id, node in nodes.items():
        for slot, socket in enumerate(node["inputs"]):
            if socket["link"] is not None:
                link_id, origin, origin_slot, target, target_slot, _ = links[socket["link"]]
                assert (str(target), target_slot) == (node_id, slot)
                assert link_id in nodes[str(origin)]["outputs"][origin_slot]["links"]
                ui_links.add((str(origin), origin_slot, node_id, socket["name"]))
    assert ui_links == api_links

    for node_id, node in workflow.items():
        cls = NODE_CLASS_MAPPINGS.get(node["class_type"])
        if cls is not None:
            expected = [node["inputs"][n] for n in widget_names(cls)]
            assert nodes[node_id]["widgets_values"] == expected, node_id
