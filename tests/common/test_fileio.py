"""Atomic writes: all or nothing, readable by others."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from face_consistency.common.files import atomic_path, atomic_write_json
from safetensors.torch import save_file


def test_write_replaces_whole_file_and_is_world_readable(tmp_path):
    target = tmp_path / "sub" / "report.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"b": 2})
    assert json.loads(target.read_text()) == {"b": 2}
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "status.json"
    atomic_write_json(target, {"state": "training"})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("{half")
        raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"state": "training"}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_files_get_the_mode_of_any_new_file(tmp_path, umask, expected):
    previous = os.umask(umask)
    try:
        target = tmp_path / "checkpoint.safetensors"
        with atomic_path(target) as tmp:  # as checkpoints are written: safetensors makes its own 0600 file
            save_file({"lora_down.weight": torch.zeros(2, 2)}, str(tmp))
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(target.stat().st_mode) == expected == stat.S_IMODE(plain.stat().st_mode)
