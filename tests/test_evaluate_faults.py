"""`evaluate` and its embedding cache against bad input and faults: real altered files, real
processes and signals; each case gives one clear message (exit 2 for bad input) and loses nothing."""
from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from evaluate_fixtures import reencode
from face_consistency.faceid import evaluate_cli
from face_consistency.faceid.embedding_store import FileFaces
from face_consistency.faceid.evaluate import EvaluationSources, FolderEvaluation


@pytest.fixture()
def pairs(tmp_path, faces_dir) -> tuple[Path, Path]:
    """Two controls and their two generated images (folder pair layout): (control_dir, generated_dir)."""
    controls, generated = tmp_path / "controls", tmp_path / "generated"
    for name, control, sample in (("a", "obama.jpg", "obama2.jpg"), ("b", "biden.jpg", "obama3.jpg")):
        reencode(faces_dir / control, controls / f"{name}.png")
        reencode(faces_dir / sample, generated / f"{name}.png")
    return controls, generated


def _model_args(root: Path) -> list[str]:
    return ["--model_name", "testpack", "--models_root", str(root), "--device", "cpu"]


# the embedding cache: checked, not trusted -----------------------------------------------


def _rewrite_entry(cache: Path, path: Path, change, keep_checksum_valid: bool) -> None:
    """Alter one entry of a real cache file; optionally recompute its checksum (a consistent forgery)."""
    data = json.loads(cache.read_text())
    entry = next(e for e in data["entries"] if e["path"] == str(path))
    change(entry)
    if keep_checksum_valid:
        content = {k: v for k, v in entry.items() if k != "checksum"}
        entry["checksum"] = FileFaces(**_fields(content)).to_json()["checksum"]
    cache.write_text(json.dumps(data))


def _fields(content: dict) -> dict:
    embedding = content["embedding"]
    vector = None if embedding is None else np.frombuffer(base64.b64decode(embedding), "<f4").astype(np.float32)
    return {**content, "embedding": vector, "image_size": tuple(content["image_size"]) if content["image_size"] else None}


def _scaled(factor: float):
    def change(entry):
        vector = np.frombuffer(base64.b64decode(entry["embedding"]), "<f4") * np.float32(factor)
        entry["embedding"] = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return change


def _flip_one_character(entry):
    text = entry["embedding"]
    entry["embedding"] = text[:10] + ("B" if text[10] != "B" else "C") + text[11:]


def _nan(entry):
    vector = np.frombuffer(base64.b64decode(entry["embedding"]), "<f4").copy()
    vector[3] = np.nan
    entry["embedding"] = base64.b64encode(vector.tobytes()).decode("ascii")


@pytest.mark.parametrize(
    "change, forged, expected",
    [
        (_flip_one_character, False, "checksum does not match"),
        (_scaled(50.0), False, "checksum does not match"),
        (_scaled(50.0), True, "has length 50, not 1"),
        (_scaled(0.0), True, "all zeros"),
        (_nan, True, "NaN or infinite"),
    ],
    ids=["flipped-base64", "times-50", "times-50-forged", "all-zero-forged", "nan-forged"],
)
def test_altered_cache_entry_is_embedded_again(model, pairs, tmp_path, change, forged, expected):
    controls, generated = pairs
    sources = EvaluationSources(control_dir=controls, generated_dir=generated)
    cache = tmp_path / "cache.json"
    first = FolderEvaluation(model, sources, cache_file=cache).run_round()
    assert first.embedded == 4
    _rewrite_entry(cache, controls / "a.png", change, forged)
    again = FolderEvaluation(model, sources, cache_file=cache)
    reason = again.store.discarded_reason
    assert f"1 of 4 entries of embedding cache {cache}" in reason and str(controls / "a.png") in reason
    assert expected in reason
    second = again.run_round()
    assert (second.embedded, second.reused) == (1, 3)  # only the altered entry, the rest is kept
    assert [p["score_control"] for p in second.report["pairs"]] == [p["score_control"] for p in first.report["pairs"]]
    assert second.report["cache"]["discarded"] == reason


def test_cli_watch_with_an_all_zero_cache_entry_scores_as_before(insightface_root, pairs, tmp_path, capsys, monkeypatch):
    controls, generated = pairs
    out = tmp_path / "report.json"
    args = ["--control_dir", str(controls), "--generated_dir", str(generated), "--output_json", str(out),
            "--watch", "5", *_model_args(insightface_root)]

    def one_round(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr("face_consistency.faceid.evaluate.time.sleep", one_round)
    assert evaluate_cli.main(args) == 0
    before = json.loads(out.read_text())
    cache = tmp_path / "report.json.embeddings.json"
    _rewrite_entry(cache, generated / "b.png", _scaled(0.0), keep_checksum_valid=True)
    capsys.readouterr()
    assert evaluate_cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "its embedding is all zeros" in printed and "embedded again" in printed
    after = json.loads(out.read_text())
    assert [p["score_control"] for p in after["pairs"]] == [p["score_control"] for p in before["pairs"]]
