"""The example workflows: API files name real inputs with valid values; UI files match them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from comfyui_core_nodes import CORE_NODES, FILES, FRONTEND_WIDGETS
from comfyui_core_nodes import widget_names as core_widget_names
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


QWEN_IMAGE_21_EXAMPLE = "evaluate_checkpoints_qwen_image_21"


def _output_type(workflow: dict[str, dict[str, Any]], link: list[Any]) -> Any:
    """The type of the output a link comes from: a core node's as ComfyUI 0.38 defines it, a pack node's its own."""
    source = workflow[link[0]]["class_type"]
    if source in CORE_NODES:
        return CORE_NODES[source]["outputs"][link[1]]
    return NODE_CLASS_MAPPINGS[source].RETURN_TYPES[link[1]]


def test_qwen_image21_example_uses_comfyuis_21_nodes_as_defined() -> None:
    """The 2.1 example's core nodes against ComfyUI 0.38's definitions (`comfyui_core_nodes`, read in its
    source: the e2e tier's ComfyUI 0.3.64 has no TextEncodeQwenImage21): every input is one the node has,
    every required one is given, links join outputs and inputs of one type, values are in range; the pack's
    nodes are checked by test_training_nodes.py's `test_example_workflows_fit_the_nodes`."""
    workflow = api(QWEN_IMAGE_21_EXAMPLE)
    core = {node_id: node for node_id, node in workflow.items() if node["class_type"] not in NODE_CLASS_MAPPINGS}
    assert {node["class_type"] for node in core.values()} <= set(CORE_NODES)
    for node_id, node in core.items():
        spec = CORE_NODES[node["class_type"]]
        frontend_only = set(spec.get("frontend_only", ()))
        known = set(spec["inputs"]) - frontend_only
        required = known - set(spec["optional"])
        assert required <= set(node["inputs"]) <= known, node_id
        for name, value in node["inputs"].items():
            kind = spec["inputs"][name]
            if isinstance(value, list):
                source = _output_type(workflow, value)
                if kind == FILES:  # a file list linked in: the pack's checkpoint list
                    assert isinstance(source, list) and value[0] == "1", f"{node_id}.{name}"
                else:
                    assert source == kind, f"{node_id}.{name}: {source} into {kind}"
            elif kind == FILES or kind in ("STRING", "BOOLEAN"):
                assert isinstance(value, bool if kind == "BOOLEAN" else str), f"{node_id}.{name}"
            elif kind[0] in ("INT", "FLOAT"):
                assert kind[1] <= value <= kind[2] and isinstance(value, int if kind[0] == "INT" else float), name
            else:
                assert value in kind, f"{node_id}.{name}={value!r}"
    # the graph ComfyUI's 2.1 nodes make: the control image both seen by the text encoder and spliced in as
    # VAE latents, the empty latent of the encoder's own size, and its sampler settings (cfg 1, euler, simple)
    encode = next(n for n in workflow.values() if n["class_type"] == "TextEncodeQwenImage21")["inputs"]
    sampler = next(n for n in workflow.values() if n["class_type"] == "KSampler")["inputs"]
    assert encode["images.image_1"] == ["6", 0] and workflow["6"]["class_type"] == "LoadImage" and "vae" in encode
    assert [sampler["positive"], sampler["negative"], sampler["latent_image"]] == [["7", 0], ["7", 1], ["7", 2]]
    assert (sampler["cfg"], sampler["sampler_name"], sampler["scheduler"]) == (1.0, "euler", "simple")
    assert workflow["4"]["inputs"]["type"] == "qwen_image"


def test_qwen_image21_example_ui_file_holds_the_same_core_widgets() -> None:
    """The UI-format twin: each core node's widgets in ComfyUI's order, the frontend's own widgets (a seed's
    control_after_generate, LoadImage's upload) with one of their values, a linked widget keeping a value."""
    workflow, graph = api(QWEN_IMAGE_21_EXAMPLE), ui(QWEN_IMAGE_21_EXAMPLE)
    nodes = {str(node["id"]): node for node in graph["nodes"]}
    for node_id, node in workflow.items():
        if node["class_type"] in NODE_CLASS_MAPPINGS:
            continue
        names = core_widget_names(node["class_type"])
        values = nodes[node_id]["widgets_values"]
        assert len(values) == len(names), node_id
        for name, value in zip(names, values, strict=True):
            given = node["inputs"].get(name)
            if name in FRONTEND_WIDGETS:
                assert value in FRONTEND_WIDGETS[name], (node_id, name)
            elif not isinstance(given, list):
                assert value == given, (node_id, name)
        sockets = {socket["name"] for socket in nodes[node_id]["inputs"]}
        assert sockets <= set(CORE_NODES[node["class_type"]]["inputs"]), node_id
