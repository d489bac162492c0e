"""The held-out dlib judge on the shared photos (installed by the test extra: these tests run in CI)."""

from __future__ import annotations

import builtins
import importlib.util

import numpy as np
import pytest
from face_consistency.faceid import judge as judge_module
from face_consistency.faceid.judge import (
    DISTANCE_THRESHOLD,
    SIMILARITY_THRESHOLD,
    DlibJudge,
    JudgeFaceError,
    JudgeNotInstalledError,
    distance_to_similarity,
    judge_agreement,
    load_judge,
    verdict,
)
from PIL import Image

PHOTOS = ["obama.jpg", "obama2.jpg", "obama3.jpg", "obama_partial_face.jpg", "biden.jpg"]
# dlib distances measured on these photos (HOG detector, 5-point chip 150 px / 0.25, dlib 20.0)
MEASURED = [
    ("obama.jpg", "obama2.jpg", 0.367),
    ("obama.jpg", "obama3.jpg", 0.323),
    ("obama.jpg", "obama_partial_face.jpg", 0.215),
    ("obama2.jpg", "obama3.jpg", 0.436),
    ("obama.jpg", "biden.jpg", 0.852),
    ("obama2.jpg", "biden.jpg", 0.815),
    ("obama3.jpg", "biden.jpg", 0.870),
]


@pytest.fixture(scope="module")
def judge() -> DlibJudge:
    return load_judge()


@pytest.fixture(scope="module")
def descriptors(judge, faces_dir):
    results = judge.judge_all([faces_dir / name for name in PHOTOS])
    assert all(r.ok for r in results), [r.reason for r in results]
    return {name: r.descriptor for name, r in zip(PHOTOS, results)}


@pytest.mark.parametrize("a,b,measured", MEASURED)
def test_distances_match_the_measured_figures(descriptors, a, b, measured):
    assert verdict(descriptors[a], descriptors[b]).distance == pytest.approx(measured, abs=0.03)


def test_same_person_close_different_person_far(descriptors):
    same = [verdict(descriptors[a], descriptors[b]) for a, b, _ in MEASURED if "biden" not in b]
    different = [verdict(descriptors[a], descriptors[b]) for a, b, _ in MEASURED if "biden" in b]
    assert all(v.same_person and v.distance < DISTANCE_THRESHOLD for v in same)
    assert not any(v.same_person for v in different)
    assert min(v.similarity for v in same) > SIMILARITY_THRESHOLD > max(v.similarity for v in different)


def test_similarity_scale():
    assert distance_to_similarity(0.0) == 1.0
    assert distance_to_similarity(DISTANCE_THRESHOLD) == pytest.approx(SIMILARITY_THRESHOLD) == pytest.approx(0.5)
    assert distance_to_similarity(1.2) == 0.0 == distance_to_similarity(2.0)


def test_describe_states_its_own_detector_and_scale(judge):
    info = judge.describe()
    assert info["judge"] == "dlib" and "own" in info["detector"]
    assert info["distance_threshold"] == 0.6 and info["similarity_threshold"] == 0.5
    assert info["descriptor_size"] == 128


def test_its_own_detector_reports_its_own_failures(judge, faces_dir, tmp_path):
    flat = tmp_path / "flat.png"
    Image.new("RGB", (320, 240), (128, 128, 128)).save(flat)
    results = judge.judge_all([flat, tmp_path / "missing.png", faces_dir / "obama.jpg"])
    assert [r.ok for r in results] == [False, False, True]
    assert "no face detected by the judge" in results[0].reason
    assert "missing.png" in results[1].reason


def test_finds_the_small_crop_the_engine_misses_at_640(judge):
    """Two detectors, two verdicts: the 112x112 aligned crop (testdata README) that SCRFD at 640 misses
    is found by dlib's HOG (upsampled twice below 400 px); each failure is the detector's own."""
    from insightface.data import get_image

    crop = get_image("Tom_Hanks_54745")
    assert judge.judge(crop, channel_order="bgr").ok


def test_bgr_and_rgb_arrays_give_the_same_descriptor(judge, faces_dir):
    rgb = np.asarray(Image.open(faces_dir / "obama2.jpg").convert("RGB"))
    a = judge.judge(rgb).descriptor
    b = judge.judge(np.ascontiguousarray(rgb[..., ::-1]), channel_order="bgr").descriptor
    assert np.allclose(a, b)


def test_identity_and_agreement_of_reference_photos(judge, faces_dir, descriptors):
    identity = judge.identity([faces_dir / n for n in PHOTOS[:3]])
    assert identity.count == 3
    assert verdict(identity.descriptor, descriptors["obama.jpg"]).distance < 0.3
    assert verdict(identity.descriptor, descriptors["biden.jpg"]).distance > DISTANCE_THRESHOLD
    agree = judge_agreement([descriptors[n] for n in PHOTOS[:3]])
    assert agree.pairs == 3 and 0.6 < agree.mean < 0.75
    assert judge_agreement([descriptors["obama.jpg"]]) is None


def test_reference_without_face_is_an_error_naming_it(judge, faces_dir, tmp_path):
    flat = tmp_path / "flat.png"
    Image.new("RGB", (320, 240)).save(flat)
    with pytest.raises(JudgeFaceError, match=r"reference image 1 \(of 2\).*no face"):
        judge.identity([faces_dir / "obama.jpg", flat])


def test_not_installed_names_the_install_command(monkeypatch):
    real_import = builtins.__import__

    def no_dlib(name, *args, **kwargs):
        if name == "dlib":
            raise ImportError("No module named 'dlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dlib)
    with pytest.raises(JudgeNotInstalledError, match=r'pip install "comfyui-face-consistency\[judge\]"'):
        DlibJudge()
    monkeypatch.setattr(builtins, "__import__", real_import)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(JudgeNotInstalledError, match="face_recognition_models.*judge"):
        judge_module.weights_folder()


def test_unknown_judge_or_detector():
    with pytest.raises(ValueError, match="unknown judge 'arcface'"):
        load_judge("arcface")
    with pytest.raises(ValueError, match="hog, cnn"):
        DlibJudge("sift")
