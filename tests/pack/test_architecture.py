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


def _imported_packages(path: Path) -> set[str]:
    """The pack's top-level packages that module `path` imports, its own included (a sub-room such as
    faceid/evaluate/ imports its package with `..`, the pack's others with `...`)."""
    home = path.relative_to(PACK).parent.parts  # the module's package, e.g. ("faceid", "evaluate")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            target = [*home[: len(home) - node.level + 1], *(node.module or "").split(".")]
            target = [part for part in target if part]
            found.update(target[:1] if target else [alias.name for alias in node.names])
        elif (
            isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("face_consistency.")
        ):
            found.add(node.module.split(".")[1])
    return found


def _modules(package: str) -> list[Path]:
    """Every module of `package`, those of its sub-rooms included."""
    return sorted((PACK / package).rglob("*.py"))


def test_sub_rooms_are_seen() -> None:
    """The arrows hold for faceid/evaluate/ as for faceid/: its `...common` is `common`, its `..images` faceid's."""
    imported = _imported_packages(PACK / "faceid" / "evaluate" / "folder_evaluation.py")
    assert imported == {"common", "musubi_formats", "faceid"}


def test_the_face_engine_never_imports_its_evaluate_room() -> None:
    """faceid/evaluate/ builds on the engine (faceid/*.py); the engine stands without it."""
    wrong = [
        path.name
        for path in sorted((PACK / "faceid").glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom)
        and node.level == 1
        and ((node.module or "").split(".")[0] == "evaluate" or any(a.name == "evaluate" for a in node.names))
    ]
    assert not wrong, f"the engine imports faceid/evaluate/: {wrong}"


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_each_package_imports_only_what_it_may(package: str) -> None:
    allowed = MAY_IMPORT[package] | {package}
    wrong = {
        str(path.relative_to(PACK)): sorted(imported - allowed)
        for path in _modules(package)
        if (imported := _imported_packages(path)) - allowed
    }
    assert not wrong, f"imports outside {package}'s arrows: {wrong}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACK).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_imports() -> dict[str, set[str]]:
    """Each module of the pack -> the pack's modules it imports, at its top or inside a function
    (`from . import x` imports the module x; `from .x import y` the module x.y where y is one, else x)."""
    modules = {_module_name(p): p for p in PACK.rglob("*.py") if p.relative_to(PACK).parts[0] in MAY_IMPORT}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        home = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                target = ".".join([*home[: len(home) - node.level + 1], *filter(None, (node.module or "").split("."))])
                for alias in node.names:
                    sub = f"{target}.{alias.name}" if target else alias.name
                    imported.add(sub if sub in modules else target)
        graph[name] = (imported & modules.keys()) - {name}
    return graph


def test_no_module_imports_itself_back() -> None:
    """No loop of imports, deferred ones included (packs.py once imported pack_download.py inside a function,
    which imported packs.py): a module can be read, and loaded, after the ones it builds on."""
    graph = _module_imports()
    loops = []
    for start in sorted(graph):
        seen, frontier = set(), [start]
        while frontier:
            for imported in graph[frontier.pop()]:
                if imported == start:
                    loops.append(start)
                elif imported not in seen:
                    seen.add(imported)
                    frontier.append(imported)
    assert not loops, f"modules that import themselves back through others: {sorted(set(loops))}"


def test_the_watcher_side_imports_without_torch() -> None:
    modules = [
        ".".join(("face_consistency", *path.relative_to(PACK).with_suffix("").parts))
        for package in TORCH_FREE
        for path in _modules(package)
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
