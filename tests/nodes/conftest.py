"""The node tests' shared fixtures: a ComfyUI base holding the shared test pack, the Face Model Loader's
model and the judge loader's judge. Modules that need another ComfyUI base define their own `comfy`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from comfy_stubs import ProgressBar, set_comfy_base
from face_consistency.nodes.judge import FaceConsistencyLoadJudge
from face_consistency.nodes.scoring import FaceConsistencyLoadModel


@pytest.fixture()
def comfy(tmp_path: Path, insightface_root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A ComfyUI base whose insightface folder list holds the shared test root (never copied)."""
    monkeypatch.setenv("HOME", str(tmp_path))  # keep a real ~/.insightface out of the dropdown
    fp = set_comfy_base(tmp_path / "comfy")
    fp.add_model_folder_path("insightface", str(insightface_root))
    ProgressBar.instances.clear()
    ProgressBar.interrupt_after = None
    yield tmp_path / "comfy"
    ProgressBar.interrupt_after = None


@pytest.fixture()
def face_model(comfy: Path):
    return FaceConsistencyLoadModel().load("testpack", "cpu", "640", 0.5)["result"][0]


@pytest.fixture(scope="module")
def judge():
    return FaceConsistencyLoadJudge().load("hog")["result"][0]
