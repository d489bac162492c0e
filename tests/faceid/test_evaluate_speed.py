"""The folder evaluation's speed work against the plain path, on the shared photos: the default
pipeline scores as one file at a time through `load_image_sized` + `analyze` (full decode, detection
at the engine's size) scores, within 0.005; the opt-in `fast` mode within its documented bound."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from face_consistency.faceid.evaluate import EvaluationSources, FolderEvaluation
from face_consistency.faceid.evaluate import cli as evaluate_cli
from face_consistency.faceid.evaluate.embedding import FAST_DET_SIZE, embed_files
from face_consistency.faceid.evaluate.embedding_store import EmbeddingStore, model_fingerprint
from face_consistency.faceid.images import load_image, load_image_sized
from PIL import Image

# docs/evaluate.md#speed: the default keeps today's scores to this; `fast` to the largest difference measured
DEFAULT_TOLERANCE = 0.005
FAST_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def photos(faces_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The shared photos as they are (JPEGs, two larger than the detector's scale twice over), and each
    as a 1024-pixel PNG (musubi's samples)."""
    folder = tmp_path_factory.mktemp("speed-photos")
    jpegs = sorted(faces_dir.glob("*.jpg"))
    pngs = []
    for jpeg in jpegs:
        with Image.open(jpeg) as img:
            img = img.convert("RGB")
            img.thumbnail((1024, 1024), Image.Resampling.LANCZOS)
            img.save(folder / f"{jpeg.stem}.png")
        pngs.append(folder / f"{jpeg.stem}.png")
    return jpegs + pngs


@pytest.fixture(scope="module")
def plain_embeddings(model, photos: list[Path]) -> np.ndarray:
    """Each photo decoded whole and analysed on its own: the path every speed change is held to."""
    embeddings = []
    for path in photos:
        bgr, _ = load_image_sized(path)
        result = model.analyze([bgr], channel_order="bgr")[0]
        assert result.embedding is not None, path
        embeddings.append(result.embedding)
    return np.stack(embeddings)


def _pipeline_embeddings(model, photos: list[Path], fast: bool) -> np.ndarray:
    store = EmbeddingStore("speed", model.embedding_size)
    assert embed_files(model, photos, store, fast=fast) == len(photos)
    entries = [store.get(p) for p in photos]
    assert all(e is not None and e.embedding is not None for e in entries), [e.reason for e in entries if e]
    return np.stack([e.embedding for e in entries if e is not None and e.embedding is not None])


def _largest_score_difference(a: np.ndarray, b: np.ndarray) -> float:
    """The largest change of any score: each photo against itself (1 − cosine) and every pair of photos."""
    return max(float(np.max(1.0 - np.sum(a * b, axis=1))), float(np.max(np.abs(a @ a.T - b @ b.T))))


def test_default_pipeline_scores_as_the_plain_path(model, photos, plain_embeddings):
    difference = _largest_score_difference(_pipeline_embeddings(model, photos, fast=False), plain_embeddings)
    assert difference <= DEFAULT_TOLERANCE


def test_fast_mode_stays_within_its_documented_difference(model, photos, plain_embeddings):
    difference = _largest_score_difference(_pipeline_embeddings(model, photos, fast=True), plain_embeddings)
    assert difference <= FAST_TOLERANCE
    # it does change the work: the check the default passes would catch it (JPEGs decoded at the
    # detector's scale, keypoints from a 320 run), so that check can fail
    assert difference > DEFAULT_TOLERANCE


def test_jpeg_decoded_at_the_detector_scale_only_when_asked(faces_dir):
    path = faces_dir / "obama3.jpg"  # 1434x2333
    full, size = load_image_sized(path)
    reduced, reduced_size = load_image_sized(path, reduce_to=640)
    assert size == reduced_size == (1434, 2333) and full.shape[:2] == (2333, 1434)
    assert 640 <= max(reduced.shape[:2]) < 2333 / 1.5  # libjpeg's 1/2 scale: 717x1167
    assert reduced.shape[1] / reduced.shape[0] == pytest.approx(1434 / 2333, abs=0.01)
    png_like, _ = load_image_sized(faces_dir / "obama.jpg", reduce_to=4096)  # no smaller than asked: whole
    assert png_like.shape[:2] == (1137, 910)


def test_fast_mode_detects_again_at_full_size_where_the_small_run_finds_nothing(model, faces_dir, tmp_path):
    """A face too small for a 320 run (found at 640) is still found, and embedded exactly as by default."""
    face = load_image(faces_dir / "obama.jpg")
    small = cv2.resize(face, (int(face.shape[1] * 100 / face.shape[0]), 100), interpolation=cv2.INTER_AREA)
    canvas = np.full((1024, 1024, 3), 128, np.uint8)
    canvas[400 : 400 + small.shape[0], 400 : 400 + small.shape[1]] = small
    assert model.detect(canvas, det_size=FAST_DET_SIZE) == [] and len(model.detect(canvas)) == 1
    path = tmp_path / "small_face.png"
    cv2.imwrite(str(path), canvas)
    fast, default = (_pipeline_embeddings(model, [path], fast) for fast in (True, False))
    assert float(fast[0] @ default[0]) == pytest.approx(1.0, abs=1e-6)


def _two_folders(faces_dir: Path, root: Path) -> tuple[Path, Path]:
    generated, controls = root / "generated", root / "controls"
    for folder in (generated, controls):
        folder.mkdir()
        Image.open(faces_dir / "obama.jpg").save(folder / "obama.jpg")
    return generated, controls


def test_fast_mode_is_in_the_report_and_keeps_its_own_cache(model, faces_dir, tmp_path):
    generated, controls = _two_folders(faces_dir, tmp_path)
    sources = EvaluationSources(control_dir=controls, generated_dir=generated)
    cache = tmp_path / "cache.json"
    fast = FolderEvaluation(model, sources, cache_file=cache, fast=True).run_round()
    assert fast.report["model"]["fast"] is True and fast.report["valid_pairs"] == 1
    default = FolderEvaluation(model, sources, cache_file=cache).run_round()
    assert default.report["model"]["fast"] is False and default.embedded == 2  # the fast results not reused
    assert "settings" in (default.report["cache"]["discarded"] or "")
    description = model.describe()
    assert model_fingerprint(description, model.pack_dir) == model_fingerprint(
        {**description, "fast": False}, model.pack_dir
    )  # the default mode's caches from before stay valid


def test_the_command_takes_fast(faces_dir, insightface_root, tmp_path, capsys):
    generated, controls = _two_folders(faces_dir, tmp_path)
    report_path = tmp_path / "report.json"
    folders = ["--control_dir", str(controls), "--generated_dir", str(generated), "--output_json", str(report_path)]
    engine = ["--model_name", "testpack", "--models_root", str(insightface_root), "--device", "cpu"]
    code = evaluate_cli.main([*folders, *engine, "--fast"])
    assert code == 0 and f"fast (detecting at {FAST_DET_SIZE} first)" in capsys.readouterr().out
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["model"]["fast"] is True and report["valid_pairs"] == 1
