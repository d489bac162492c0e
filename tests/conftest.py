"""Shared fixtures: the real test data (skipped with a reason where absent), ComfyUI stand-ins and the
tiny training files; each folder's marker on its tests; the end-to-end tier's count and time in the summary.

Fixtures used by several modules of one folder are in that folder's conftest.py; those of one module stay
in it. The helper modules (tests/support/) are on the path (pyproject.toml, `pythonpath`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from comfy_stubs import install_comfy_stubs

if TYPE_CHECKING:
    from training_runs import TinyTraining

TESTS = Path(__file__).resolve().parent
REPO_ROOT = TESTS.parent
TESTDATA = Path(os.environ.get("FACE_TEST_DATA", REPO_ROOT.parent / "shared" / "testdata")).resolve()
TESTPACK = "testpack"

install_comfy_stubs()
# Tests never reach the internet: a standard pack missing in a test is an error, not a download
# from GitHub. Download tests unset this and serve zips from 127.0.0.1 (tests/support/pack_server.py).
os.environ["FACE_CONSISTENCY_OFFLINE"] = "1"
# No trainer environment (a developer's <pack>/trainer_env included): jobs run with this Python, which has the
# trainer's libraries; tests of the environment name their own folders (tests/training_jobs/test_trainer_env.py).
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


@pytest.fixture(scope="session")
def tiny_training(tmp_path_factory: pytest.TempPathFactory) -> TinyTraining:
    """Tiny models and dataset for real trainer runs (job control, nodes, routes, the e2e tier), written once
    per session, so the dataset's latent cache is built by the first run only."""
    from tiny_qwen import write_tiny_dataset, write_tiny_model_files  # torch: only where a test trains
    from training_runs import TinyTraining

    root = tmp_path_factory.mktemp("tiny_training")
    return TinyTraining(write_tiny_model_files(root / "models"), write_tiny_dataset(root / "data", n=4))


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test carries the marker of its folder (tests/faceid/ -> faceid), registered in pyproject.toml."""
    registered = {line.split(":")[0].strip() for line in config.getini("markers")}
    for item in items:
        path = item.path.resolve()
        if not path.is_relative_to(TESTS):
            continue
        folder = path.relative_to(TESTS).parts[0]
        if folder not in registered:
            raise pytest.UsageError(
                f"{item.path}: a test belongs in a folder of tests/ whose name is a marker registered in "
                "pyproject.toml (docs/development.md, 'Where a test goes')"
            )
        item.add_marker(folder)


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
