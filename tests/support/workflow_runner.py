"""Run the pack's nodes of an API-format workflow (node id -> {class_type, inputs}) the way ComfyUI does.

Links `[node_id, output_index]` are resolved in dependency order; nodes that are not the pack's
(PreviewImage and the like) are checked for nothing and skipped, as are nodes that feed only them.
Lists (OUTPUT_IS_LIST / INPUT_IS_LIST) are not mapped over: use it for graphs without them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from face_consistency.nodes import NODE_CLASS_MAPPINGS


def load_workflow(path: Path) -> dict[str, dict[str, Any]]:
    return json.loads(path.read_text(encoding="utf-8"))


def check_inputs(workflow: dict[str, dict[str, Any]]) -> None:
    """Every pack node gets all its required inputs and no unknown ones; links point at real outputs."""
    for node_id, node in workflow.items():
        cls = NODE_CLASS_MAPPINGS.get(node["class_type"])
        for value in node["inputs"].values():
            if isinstance(value, list):
                source = workflow[value[0]]
                source_cls = NODE_CLASS_MAPPINGS.get(source["class_type"])
                if source_cls is not None:
                    assert value[1] < len(source_cls.RETURN_TYPES), f"node {node_id}: bad link {value}"
        if cls is None:
            continue
        spec = cls.INPUT_TYPES()
        required, optional = spec.get("required", {}), spec.get("optional", {})
        missing = set(required) - set(node["inputs"])
        unknown = set(node["inputs"]) - set(required) - set(optional)
        assert not missing and not unknown, (
            f"node {node_id} ({node['class_type']}): missing {missing}, unknown {unknown}"
        )


def run_workflow(workflow: dict[str, dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
    """Execute the pack's nodes; returns node id -> result tuple."""
    results: dict[str, tuple[Any, ...]] = {}

    def run(node_id: str) -> tuple[Any, ...]:
        if node_id in results:
            return results[node_id]
        node = workflow[node_id]
        cls = NODE_CLASS_MAPPINGS[node["class_type"]]
        kwargs = {
            name: run(value[0])[value[1]] if isinstance(value, list) else value
            for name, value in node["inputs"].items()
        }
        output = getattr(cls(), cls.FUNCTION)(**kwargs)
        results[node_id] = tuple(output["result"] if isinstance(output, dict) else output)
        return results[node_id]

    for node_id, node in workflow.items():
        if node["class_type"] in NODE_CLASS_MAPPINGS:
            run(node_id)
    return results
