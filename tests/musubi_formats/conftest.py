"""The musubi-format tests' run folder: a musubi-tuner sample prompt file with its controls and samples."""

from __future__ import annotations

from pathlib import Path

import pytest
from evaluate_fixtures import build_musubi_folder


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, faces_dir: Path) -> dict[str, Path]:
    return build_musubi_folder(tmp_path_factory.mktemp("musubi"), faces_dir)
