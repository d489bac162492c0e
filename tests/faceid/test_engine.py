"""The face engine on the real shared pack and photos (figures from the testdata README)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from face_consistency.faceid import (
    Bands,
    FaceEngineError,
    NoFaceError,
    ProviderError,
    Selection,
    cosine_similarity,
    load_face_model,
    load_image,
    mean_identity,
)
from face_consistency.faceid.alignment import aligned_crop
from PIL import Image

PHOTOS = ["obama.jpg", "obama2.jpg", "obama3.jpg", "obama_partial_face.jpg", "biden.jpg"]
# (a, b, similarity measured with this pack at det_size 640, insightface 2.1)
MEASURED = [
    ("obama.jpg", "obama2.jpg", 0.723),
    ("obama.jpg", "obama3.jpg", 0.763),
    ("obama2.jpg", "obama3.jpg", 0.707),
    ("obama.jpg", "obama_partial_face.jpg", 0.855),
    ("obama2.jpg", "obama_partial_face.jpg", 0.646),
    ("obama.jpg", "biden.jpg", -0.033),
    ("obama2.jpg", "biden.jpg", 0.027),
    ("obama3.jpg", "biden.jpg", 0.097),
]


@pytest.fixture(scope="module")
def embeddings(model, faces_dir):
    results = model.analyze([faces_dir / name for name in PHOTOS])
    assert all(r.ok for r in results), [r.reason for r in results]
    return {name: r.embedding for name, r in zip(PHOTOS, results)}


@pytest.fixture(scope="module")
def group_photo():
    from insightface.data import get_image

    return get_image("t1")  # BGR, six different people


def rgb_of(faces_dir, name):
    return np.asarray(Image.open(faces_dir / name).convert("RGB"))


def test_reports_what_runs(model):
    info = model.describe()
    assert info["provider"] == "CPUExecutionProvider"
    assert info["embedding_size"] == 128  # never assumed: buffalo packs give 512


@pytest.mark.parametrize("a,b,measured", MEASURED)
def test_pair_similarity_matches_measured_figures(embeddings, a, b, measured):
    assert cosine_similarity(embeddings[a], embeddings[b]) == pytest.approx(measured, abs=0.02)


def test_same_person_scores_above_different_person(embeddings):
    same = [cosine_similarity(embeddings[a], embeddings[b]) for a, b, m in MEASURED if "biden" not in b]
    different = [cosine_similarity(embeddings[a], embeddings[b]) for a, b, m in MEASURED if "biden" in b]
    assert min(same) > 0.6 > 0.2 > max(different)


def test_embeddings_are_normalised(embeddings):
    for embedding in embeddings.values():
        assert np.linalg.norm(embedding) == pytest.approx(1.0, abs=1e-5)


def test_group_photo_has_six_faces_left_to_right(model, group_photo):
    (result,) = model.analyze([group_photo], channel_order="bgr", all_faces=True)
    assert result.faces_found == 6
    xs = [float(f.bbox[0]) for f in result.faces]
    assert xs == sorted(xs)
    for face in result.faces:
        assert face.embedding is not None and face.kps.shape == (5, 2)
    sims = [
        cosine_similarity(a.embedding, b.embedding) for i, a in enumerate(result.faces) for b in result.faces[i + 1 :]
    ]
    assert max(sims) < 0.5  # six different people


@pytest.mark.parametrize("selection", [Selection.LARGEST, Selection.HIGHEST_SCORE])
def test_selection_policies_are_deterministic(model, group_photo, selection):
    (all_faces,) = model.analyze([group_photo], channel_order="bgr", all_faces=True)
    picks = {model.analyze([group_photo], channel_order="bgr", selection=selection)[0].face_index for _ in range(3)}
    assert len(picks) == 1
    pick = picks.pop()
    if selection is Selection.LARGEST:
        assert pick == int(np.argmax([f.area for f in all_faces.faces]))
    else:
        assert pick == int(np.argmax([f.det_score for f in all_faces.faces]))


def test_index_and_best_match_selection(model, group_photo):
    (all_faces,) = model.analyze([group_photo], channel_order="bgr", all_faces=True)
    for k in range(6):
        by_index = model.analyze([group_photo], channel_order="bgr", selection="index", index=k)[0]
        assert by_index.face_index == k
        np.testing.assert_allclose(by_index.face.bbox, all_faces.faces[k].bbox)
        by_match = model.analyze(
            [group_photo], channel_order="bgr", selection="best_match", reference=all_faces.faces[k].embedding
        )[0]
        assert by_match.face_index == k
    out_of_range = model.analyze([group_photo], channel_order="bgr", selection="index", index=6)[0]
    assert not out_of_range.ok and "6 face(s) found" in out_of_range.reason
    with pytest.raises(ValueError, match="reference"):
        model.analyze([group_photo], channel_order="bgr", selection="best_match")


def test_aligned_crop_too_small_for_detector_still_found(model):
    from insightface.data import get_image

    crop = get_image("Tom_Hanks_54745")
    assert crop.shape[:2] == (112, 112)
    (result,) = model.analyze([crop], channel_order="bgr")
    assert result.ok, result.reason
    assert (result.face.kps >= -10).all() and (result.face.kps <= 122).all()


def test_every_input_kind_gives_the_same_embedding(model, faces_dir, embeddings):
    rgb = rgb_of(faces_dir, "obama.jpg")
    tensor = torch.from_numpy(rgb.astype(np.float32) / 255.0)
    inputs = {
        "path": str(faces_dir / "obama.jpg"),
        "pil": Image.fromarray(rgb),
        "rgb array": rgb,
        "bgr array": (rgb[..., ::-1], "bgr"),
        "IMAGE tensor": tensor[None],
        "HWC tensor": tensor,
    }
    for kind, source in inputs.items():
        source, order = source if isinstance(source, tuple) else (source, "rgb")
        (result,) = model.analyze([source], channel_order=order)
        assert result.ok, kind
        assert cosine_similarity(result.embedding, embeddings["obama.jpg"]) > 0.99, kind


def test_batch_tensor_gives_one_result_per_image(model, faces_dir):
    rgb = rgb_of(faces_dir, "obama.jpg")
    batch = torch.from_numpy(np.stack([rgb, rgb[:, ::-1]]).astype(np.float32) / 255.0)
    results = model.analyze(batch)
    assert len(results) == 2 and all(r.ok for r in results)


def test_rgba_grayscale_16bit_and_exif_files(model, faces_dir, tmp_path, embeddings):
    img = Image.open(faces_dir / "obama.jpg").convert("RGB")
    rgba = img.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(tmp_path / "rgba.png")
    img.convert("L").save(tmp_path / "gray.png")
    gray16 = (np.asarray(img.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    rotated = img.rotate(-90, expand=True)  # stored sideways; EXIF orientation 8 turns it upright
    exif = Image.Exif()
    exif[0x0112] = 8
    rotated.save(tmp_path / "exif.jpg", exif=exif, quality=95)
    names = ["rgba.png", "gray.png", "gray16.png", "exif.jpg"]
    results = model.analyze([tmp_path / n for n in names])
    for name, result in zip(names, results):
        assert result.ok, (name, result.reason)
        assert cosine_similarity(result.embedding, embeddings["obama.jpg"]) > 0.8, name
    assert results[3].image_size == img.size  # upright after EXIF transpose


def test_rgba_and_grayscale_tensors(model, faces_dir):
    rgb = rgb_of(faces_dir, "obama.jpg").astype(np.float32) / 255.0
    rgba = np.concatenate([rgb, np.ones_like(rgb[..., :1])], axis=2)
    gray = rgb.mean(axis=2, keepdims=True)
    for array in (rgba, gray):
        (result,) = model.analyze([torch.from_numpy(array)[None]])
        assert result.ok


def test_huge_image_is_analysed_in_original_coordinates(model, faces_dir, embeddings):
    img = Image.open(faces_dir / "obama.jpg").convert("RGB")
    big = img.resize((img.width * 6, img.height * 6))  # 5460 x 6822
    (small_result,) = model.analyze([np.asarray(img)])
    (big_result,) = model.analyze([np.asarray(big)])
    assert big_result.ok
    np.testing.assert_allclose(big_result.face.bbox / 6, small_result.face.bbox, atol=6)
    assert cosine_similarity(big_result.embedding, embeddings["obama.jpg"]) > 0.9


def test_bad_inputs_are_per_item_results(model, faces_dir, tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes((faces_dir / "obama.jpg").read_bytes()[:2000])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    blank = np.full((256, 256, 3), 128, np.uint8)
    tiny = np.zeros((4, 4, 3), np.uint8)
    sources = [corrupt, text, tmp_path / "missing.png", blank, tiny, tmp_path, faces_dir / "obama.jpg"]
    results = model.analyze(sources)
    reasons = [r.reason for r in results]
    assert "cannot decode" in reasons[0] or "corrupt" in reasons[0]
    assert "not an image" in reasons[1]
    assert "not found" in reasons[2]
    assert reasons[3] == "no face detected"
    assert reasons[4] == "image 4x4 is too small to hold a face (at least 8 pixels a side)"
    assert "folder" in reasons[5]
    assert results[6].ok
    assert [r.ok for r in results] == [False] * 6 + [True]


def test_identity_is_mean_of_normalised_embeddings_and_cached(model, faces_dir, embeddings, monkeypatch):
    paths = [faces_dir / "obama.jpg", faces_dir / "obama2.jpg"]
    identity = model.identity(paths)
    expected = mean_identity([embeddings["obama.jpg"], embeddings["obama2.jpg"]])
    assert identity.count == 2
    np.testing.assert_allclose(identity.embedding, expected.embedding, atol=1e-5)
    calls = []
    original = type(model).analyze
    monkeypatch.setattr(type(model), "analyze", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    model.identity(paths)
    assert calls == []  # both references came from the cache


def test_identity_without_face_names_the_image(model, faces_dir):
    with pytest.raises(NoFaceError, match="reference image 1"):
        model.identity([faces_dir / "obama.jpg", np.full((200, 200, 3), 90, np.uint8)])


def test_models_are_shared_per_settings(insightface_root):
    a = load_face_model("testpack", models_root=insightface_root, provider="cpu")
    b = load_face_model("testpack", models_root=[insightface_root], provider="cpu")
    c = load_face_model("testpack", models_root=insightface_root, provider="cpu", det_size=320)
    assert a is b and a is not c
    assert c.det_size == 320


def test_concurrent_callers_get_consistent_results(model, faces_dir, embeddings):
    outputs: list[float] = []
    errors: list[BaseException] = []

    def work():
        try:
            (r,) = model.analyze([faces_dir / "obama2.jpg"])
            outputs.append(cosine_similarity(r.embedding, embeddings["obama2.jpg"]))
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(outputs) == 4 and min(outputs) > 0.9999


def test_concurrent_detection_finds_the_same_faces(model, group_photo, monkeypatch):
    """Threads detecting side by side (the evaluation pipeline) each run on one core, with a
    single-threaded session: the faces are those of the all-cores session."""
    monkeypatch.setattr(model, "parallel_workers", 2)
    one_core, all_cores = model.detect(group_photo, concurrent=True), model.detect(group_photo)
    assert model.detector(concurrent=True) is not model.detector()
    assert len(one_core) == len(all_cores) == 6
    for a, b in zip(one_core, all_cores):
        assert np.allclose(a.bbox, b.bbox, atol=0.01) and np.allclose(a.kps, b.kps, atol=0.01)


def test_images_analysed_side_by_side_match_one_at_a_time(model, faces_dir, group_photo, monkeypatch):
    """`analyze` of several images detects them on one thread per core: the same faces, in the same
    order, with the same embeddings as one image at a time, an image without a face in between."""
    images = [load_image(faces_dir / name) for name in PHOTOS] + [np.zeros((64, 64, 3), np.uint8), group_photo]
    monkeypatch.setattr(model, "parallel_workers", 2)
    side_by_side = model.analyze(images, all_faces=True, channel_order="bgr")
    monkeypatch.setattr(model, "parallel_workers", 1)
    one_at_a_time = [model.analyze([bgr], all_faces=True, channel_order="bgr")[0] for bgr in images]
    assert [len(r.faces) for r in side_by_side] == [len(r.faces) for r in one_at_a_time] == [1] * 5 + [0, 6]
    for a, b in zip(side_by_side, one_at_a_time):
        assert a.reason == b.reason and a.face_index == b.face_index
        for face_a, face_b in zip(a.faces, b.faces):
            assert np.allclose(face_a.bbox, face_b.bbox, atol=0.01) and np.allclose(face_a.kps, face_b.kps, atol=0.01)
            assert cosine_similarity(face_a.embedding, face_b.embedding) > 0.9999


def test_locate_then_embed_crops_matches_analyze(model, faces_dir, embeddings):
    bgrs = [load_image(faces_dir / name) for name in ("obama.jpg", "biden.jpg")]
    located = [model.locate(bgr, concurrent=True) for bgr in bgrs]
    assert all(r.face is not None and r.face.embedding is None for r in located)
    crops = [aligned_crop(bgr, r.face) for bgr, r in zip(bgrs, located)]
    assert all(crop.shape == (112, 112, 3) for crop in crops)
    embedded = model.embed_crops(crops)
    assert embedded.shape == (2, model.embedding_size) and model.embed_crops([]).shape == (0, model.embedding_size)
    for embedding, name in zip(embedded, ("obama.jpg", "biden.jpg")):
        assert cosine_similarity(embedding, embeddings[name]) > 0.9999
    (blank,) = [model.locate(np.zeros((64, 64, 3), np.uint8))]
    assert blank.face is None and blank.reason == "no face detected"


def test_cuda_request_without_cuda_says_how_to_fix(insightface_root):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ProviderError, match="onnxruntime-gpu"):
        load_face_model("testpack", models_root=insightface_root, provider="cuda")
    auto = load_face_model("testpack", models_root=insightface_root, provider="auto")
    assert auto.provider == "CPUExecutionProvider"


def test_invalid_settings_are_rejected(insightface_root):
    with pytest.raises(ProviderError, match="provider must be"):
        load_face_model("testpack", models_root=insightface_root, provider="tpu")
    with pytest.raises(ValueError, match="det_size"):
        load_face_model("testpack", models_root=insightface_root, det_size=100)
    with pytest.raises(ValueError, match="det_thresh"):
        load_face_model("testpack", models_root=insightface_root, det_thresh=1.5)


def test_bands():
    bands = Bands()
    assert [bands.label(s) for s in (0.9, 0.8, 0.7, 0.1)] == ["excellent", "good", "moderate", "poor"]
    assert Bands(0.6, 0.4, 0.3).label(0.5) == "good"
    with pytest.raises(ValueError):
        Bands(0.5, 0.7, 0.3)


def test_engine_errors_share_a_base(insightface_root, tmp_path):
    with pytest.raises(FaceEngineError):
        load_face_model("no_such_pack", models_root=tmp_path)


def test_onnxruntime_telemetry_disabled_on_import():
    import os

    import face_consistency.faceid  # noqa: F401

    assert os.environ.get("ORT_DISABLE_TELEMETRY") == "1"
