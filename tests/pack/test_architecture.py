"""The packages' arrows (docs/architecture.md): which package may import which, and the watcher side
that ComfyUI imports at start stays torch-free."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACK = Path(__file__).resolve().parents[2]
# package -> the pack's packages it may import (itself always)
MAY_IMPORT = {
    "common": set(),
    "musubi_formats": {"common"},
    "faceid": {"common", "musubi_formats"},
    "training_contract": {"common"},
    "training_jobs": {"common", "musubi_formats", "training_contract"},
    "trainer": {"common", "musubi_formats", "faceid", "training_contract"},
    "nodes": {"common", "musubi_formats", "faceid", "training_contract", "training_jobs", "trainer"},
}
TORCH_FREE = ("common", "musubi_formats", "training_contract", "training_jobs")


def _imported_packages(path: Path, package: str) -> set[str]:
    """The pack's top-level packages that a module of `package` (or of a folder inside it) imports."""
    found = set()
    to_the_top = len(path.relative_to(PACK).parts)  # the relative level that reaches the pack's root
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level >= to_the_top:
            module = (node.module or "").split(".")[0]
            found.update([module] if module else [alias.name for alias in node.names])
        elif (
            isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("face_consistency.")
        ):
            found.add(node.module.split(".")[1])
    return found - {package}


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_each_package_imports_only_what_it_may(package: str) -> None:
    wrong = {
        str(path.relative_to(PACK)): sorted(imported - MAY_IMPORT[package])
        for path in sorted((PACK / package).rglob("*.py"))
        if (imported := _imported_packages(path, package)) - MAY_IMPORT[package]
    }
    assert not wrong, f"imports outside {package}'s arrows: {wrong}"


def test_the_watcher_side_imports_without_torch() -> None:
    modules = [
        f"face_consistency.{package}.{path.stem}"
        for package in TORCH_FREE
        for path in sorted((PACK / package).glob("*.py"))
        if path.stem != "__init__"
    ]
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'onnxruntime', 'insightface')"
        " if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"importing {TORCH_FREE} loads {result.stdout.strip()}"
