"""Shared fixtures: the real test data (skipped with a reason where absent) and ComfyUI stand-ins;
the end-to-end tier's count and time in the summary."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from comfy_stubs import install_comfy_stubs

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTDATA = Path(os.environ.get("FACE_TEST_DATA", REPO_ROOT.parent / "shared" / "testdata")).resolve()
TESTPACK = "testpack"

install_comfy_stubs()
# Tests never reach the internet: a standard pack missing in a test is an error, not a download
# from GitHub. Download tests unset this and serve zips from 127.0.0.1 (tests/pack_server.py).
os.environ["FACE_CONSISTENCY_OFFLINE"] = "1"
# No trainer environment (a developer's <pack>/trainer_env included): jobs run with this Python, which has the
# trainer's libraries; tests of the environment name their own folders (tests/test_trainer_env.py).
os.environ["FACE_CONSISTENCY_TRAINER_ENV"] = str(Path(tempfile.mkdtemp(prefix="no-trainer-env-")) / "none")


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real face test data not found at {path}; set FACE_TEST_DATA to the shared testdata folder")
    return path


@pytest.fixture(scope="session")
def testdata() -> Path:
    return _require(TESTDATA)


@pytest.fixture(scope="session")
def insightface_root(testdata: Path) -> Path:
    """A root laid out like ComfyUI/models/insightface: holds models/testpack/."""
    return _require(testdata / "insightface")


@pytest.fixture(scope="session")
def testpack_dir(insightface_root: Path) -> Path:
    return _require(insightface_root / "models" / TESTPACK)


@pytest.fixture(scope="session")
def model(insightface_root: Path) -> Any:
    """The test pack's face model on the CPU."""
    from face_consistency.faceid import load_face_model

    return load_face_model(TESTPACK, models_root=insightface_root, provider="cpu")


@pytest.fixture(scope="session")
def faces_dir(testdata: Path) -> Path:
    return _require(testdata / "faces")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line for the real-ComfyUI tier (tests marked e2e): its outcomes and the time its tests
    took, server starts included (they happen in the first tests' setup)."""
    outcomes: dict[str, str] = {}
    seconds = 0.0
    for reports in terminalreporter.stats.values():
        for report in reports:
            # test reports only: a collection report (a module that failed to import) has no keywords
            if getattr(report, "when", None) is None or "e2e" not in getattr(report, "keywords", ()):
                continue
            seconds += report.duration
            if report.when == "call" or report.outcome != "passed":
                outcomes[report.nodeid] = "error" if report.when != "call" and report.failed else report.outcome
    if outcomes:
        counts = ", ".join(f"{list(outcomes.values()).count(o)} {o}" for o in ("passed", "failed", "error", "skipped"))
        terminalreporter.write_line(f"end-to-end tier (real ComfyUI): {counts} in {seconds:.1f} s")
