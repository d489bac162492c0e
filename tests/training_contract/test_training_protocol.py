"""The files a run and its watchers share: metrics.jsonl read as it grows and anew when replaced."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from face_consistency.training_contract.protocol import read_metrics

# job control reads them: run again by CI under the minimum library versions, as its tests are
pytestmark = pytest.mark.trainer


def test_metrics_are_read_incrementally_and_anew_when_replaced(tmp_path: Path, monkeypatch) -> None:
    from face_consistency.training_contract import protocol

    parsed: list[bytes] = []
    real_loads = json.loads
    monkeypatch.setattr(protocol.json, "loads", lambda line: parsed.append(line) or real_loads(line))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": i}) + "\n" for i in range(1, 1001)), encoding="utf-8")
    assert len(read_metrics(tmp_path)) == 1000 and len(parsed) == 1000
    with open(metrics, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 1001}) + "\n" + '{"step": 10')  # and a line still being written
    assert [m["step"] for m in read_metrics(tmp_path)][-2:] == [1000, 1001]
    assert len(parsed) == 1001  # only the appended complete line was parsed
    with open(metrics, "a", encoding="utf-8") as f:
        f.write("02}\n")
    assert read_metrics(tmp_path)[-1] == {"step": 1002}
    # a resumed run replaces the file with its first steps: read anew
    replacement = tmp_path / "new.jsonl"
    replacement.write_text(json.dumps({"step": 1}) + "\n", encoding="utf-8")
    os.replace(replacement, metrics)
    assert read_metrics(tmp_path) == [{"step": 1}]
