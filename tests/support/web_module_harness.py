"""Runs one of the pack's web/ ES modules in Node.js, against stand-ins of ComfyUI's front-end modules.

The module is copied to where ComfyUI serves it (`extensions/<pack>/`), so its relative imports of
`../../scripts/app.js` etc. resolve to the stand-ins; the harness prints one JSON line, returned parsed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

WEB_DIR = Path(__file__).resolve().parents[2] / "web"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(
    NODE is None, reason="Node.js is not installed (the pack's web modules run in the browser)"
)


def run_web_module(tmp_path: Path, module_name: str, scripts: dict[str, str], harness_js: str) -> Any:
    """Run `harness_js` next to `web/<module_name>` and the `scripts/<name>` stand-ins; its last stdout line,
    as JSON."""
    (tmp_path / "scripts").mkdir()
    for name, source in scripts.items():
        (tmp_path / "scripts" / name).write_text(source)
    pack_dir = tmp_path / "extensions" / "pack"
    pack_dir.mkdir(parents=True)
    shutil.copy(WEB_DIR / module_name, pack_dir / module_name)
    (tmp_path / "harness.mjs").write_text(harness_js)

    run = subprocess.run([NODE, "harness.mjs"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])
