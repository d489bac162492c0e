"""The scoring nodes on the real test pack and photos, through the ComfyUI stand-ins."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_stubs import ProgressBar, set_comfy_base
from face_consistency.faceid import (
    Bands,
    ImageLoadError,
    ModelPackError,
    NoFaceError,
    cosine_similarity,
    image_list,
    load_face_model,
)
from face_consistency.faceid.matching import match_faces
from face_consistency.faceid.ranking import pick_best
from face_consistency.nodes import NODE_CLASS_MAPPINGS
from face_consistency.nodes.imaging import to_bgr_list, to_bgr_list_and_batch, to_image_batch
from face_consistency.nodes.matching import FaceConsistencyBestOf, FaceConsistencyMatchFaces
from face_consistency.nodes.scoring import (
    FaceConsistencyLoadModel,
    FaceConsistencyReference,
    FaceConsistencySimilarity,
    annotate_scores,
    score_images,
)
from PIL import Image
from scoring_inputs import SCORE_DEFAULTS, group_photo, photo


def score(face_model, images, **overrides):
    return FaceConsistencySimilarity().score(face_model, images, **{**SCORE_DEFAULTS, **overrides})


def test_all_nodes_registered() -> None:
    expected = {
        "FaceConsistencyLoadModel",
        "FaceConsistencyReference",
        "FaceConsistencySimilarity",
        "FaceConsistencyMatchFaces",
        "FaceConsistencyBestOf",
    }
    assert expected <= set(NODE_CLASS_MAPPINGS)
    for name in expected:
        cls = NODE_CLASS_MAPPINGS[name]
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
        assert len(getattr(cls, "OUTPUT_IS_LIST", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES)
        assert callable(getattr(cls, cls.FUNCTION))


def test_pack_dropdown_and_provider_shown(comfy: Path) -> None:
    packs = FaceConsistencyLoadModel.INPUT_TYPES()["required"]["pack"][0]
    assert packs[0] == "testpack" and packs[1] == "buffalo_l (downloads on first use, 289 MB)"

    out = FaceConsistencyLoadModel().load("testpack", "auto", "640", 0.5)
    assert out["ui"]["text"][0].startswith("testpack on CPUExecutionProvider (128-d")
    again = FaceConsistencyLoadModel().load("testpack", "auto", "640", 0.5)["result"][0]
    assert again is out["result"][0]
    assert FaceConsistencyLoadModel().load("testpack", "auto", "640", 0.4)["result"][0] is not again


def test_no_pack_installed_offline_says_where_to_put_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    set_comfy_base(tmp_path / "empty")
    packs, options = FaceConsistencyLoadModel.INPUT_TYPES()["required"]["pack"]
    assert [p.split(" (")[0] for p in packs] == ["buffalo_l", "buffalo_m", "buffalo_s", "buffalo_sc", "antelopev2"]
    assert options["default"] == "buffalo_l (downloads on first use, 289 MB)"
    with pytest.raises(ModelPackError, match=r"downloading is off.*empty/models/insightface/models/buffalo_l/"):
        FaceConsistencyLoadModel().load(options["default"], "auto", "auto", 0.5)


def test_nested_pack_gets_the_engines_actionable_error(comfy: Path, testpack_dir: Path) -> None:
    nested = comfy / "models" / "insightface" / "models" / "antelopev2" / "antelopev2"
    nested.mkdir(parents=True)
    (nested / "det_2.5g.onnx").symlink_to(testpack_dir / "det_2.5g.onnx")
    set_comfy_base(comfy).add_model_folder_path("insightface", str(comfy / "models" / "insightface"))
    assert "antelopev2" in FaceConsistencyLoadModel.INPUT_TYPES()["required"]["pack"][0]
    with pytest.raises(ModelPackError, match="nested"):
        FaceConsistencyLoadModel().load("antelopev2", "auto", "auto", 0.5)


@pytest.mark.parametrize("width", [23, 1024])  # 1024: blocks of rows, the last one partial
def test_rgb_batches_convert_exactly_like_the_engine(width: int) -> None:
    out_of_range = torch.rand(2, 101, width, 3) * 1.2 - 0.1  # out-of-range values are clipped alike
    in_range = torch.rand(2, 101, width, 3)  # (no clipping pass)
    in_range[1, 90:] = torch.rand(11, width, 3) * 1.1  # only a later block needs clipping
    for batch in (out_of_range, in_range):
        batch[0, 0, 0] = torch.tensor([0.0, 1.0, 0.5 / 255])
        bgrs, floats = to_bgr_list_and_batch(batch)
        for ours, engines in zip(to_bgr_list(batch), image_list(batch)):
            np.testing.assert_array_equal(ours, engines)
        for ours, engines in zip(bgrs, image_list(batch)):
            np.testing.assert_array_equal(ours, engines)
        assert torch.equal(floats, to_image_batch(bgrs))  # the annotated images' start: the 8-bit values
    for bad in (float("nan"), float("inf"), -float("inf")):
        in_range[1, 100, 4, 2] = bad
        in_range[1, 0, 0, 0] = 255.0  # a 0..255 value in an earlier block: NaN is still what is named
        with pytest.raises(ImageLoadError, match="image 1 contains NaN or infinite"):
            to_bgr_list(in_range)
    in_range[1, 100, 4, 2] = 0.5
    with pytest.raises(ImageLoadError, match="image 1 has values up to 255, but float images"):
        to_bgr_list_and_batch(in_range)


def test_annotated_images_are_the_arrays_scaled_to_0_1() -> None:
    bgrs = [np.random.default_rng(i).integers(0, 256, (9, 7, 3), dtype=np.uint8) for i in range(2)]
    expected = np.stack([b[:, :, ::-1] for b in bgrs]).astype(np.float32) * np.float32(1.0 / 255.0)
    assert torch.equal(to_image_batch(bgrs), torch.from_numpy(expected))


def test_annotated_images_equal_the_whole_drawing_converted_back(face_model, faces_dir: Path) -> None:
    """The node copies back only the regions it drew: exactly what converting the whole drawn images gives."""
    group = group_photo()
    faces = face_model.analyze(group, all_faces=True)[0].faces
    x1, y1, x2, y2 = (int(v) for v in faces[0].bbox)
    person = group[:, max(0, y1 - 40) : y2 + 40, max(0, x1 - 40) : x2 + 40]
    height, width = group.shape[1:3]
    edge = torch.roll(group, (-y1 - 5, -x1 - 5), dims=(1, 2))  # a face cut by the top left corner
    blank = torch.full((1, height, width, 3), 0.5)  # no face: the reason drawn at the top left
    overshoot = (group * 1.1 - 0.05).clamp(-0.05, 1.05)  # clipped values
    outputs = torch.cat([group, edge, blank, overshoot])
    for selection in ("best_match", "largest"):
        out = score(face_model, outputs, reference_image=person, face_selection=selection)
        bgrs, batch, _ = score_images(
            face_model, outputs, person, None, None, selection=selection, copy_paste_threshold=0.1
        )
        for bgr, row in zip(bgrs, batch.rows):
            annotate_scores(bgr, row)
        assert batch.scores == out["result"][0]
        assert torch.equal(out["result"][4], to_image_batch(bgrs))
        assert not torch.equal(out["result"][4][2], to_image_batch(to_bgr_list(blank))[0])  # the label was drawn


def test_scores_match_engine_and_order_people(comfy: Path, face_model, faces_dir: Path) -> None:
    size = (512, 640)
    reference = photo(faces_dir, "obama.jpg", size)
    outputs = torch.cat([photo(faces_dir, "obama2.jpg", size), photo(faces_dir, "biden.jpg", size)])

    out = score(face_model, outputs, reference_image=reference)
    scores, mean, count, report, annotated, changes, judged, agreement = out["result"]
    assert judged == [-1.0, -1.0] and agreement == -1.0  # no judge, no identity of several photos

    engine = load_face_model("testpack", models_root=face_model.pack_dir.parent, provider="cpu", det_size=640)
    assert engine is face_model
    ref_embedding = engine.analyze(reference)[0].embedding
    expected = [cosine_similarity(ref_embedding, r.embedding) for r in engine.analyze(outputs)]
    assert scores == pytest.approx(expected, abs=1e-6)
    assert scores[0] > 0.5 > 0.2 > scores[1]
    assert mean == pytest.approx(np.mean(expected), abs=1e-6)
    assert count == sum(s >= 0.7 for s in expected)
    rows = report.splitlines()
    assert rows[3].split()[:3] == ["0", f"{scores[0]:.3f}", Bands().label(scores[0])]
    assert rows[4].split()[:3] == ["1", f"{scores[1]:.3f}", "poor"]
    assert annotated.shape == outputs.shape and annotated.dtype == torch.float32
    assert not torch.equal(annotated, outputs)  # boxes and labels drawn
    assert len(changes) == 2 and all(c > 0.3 for c in changes)
    assert out["ui"]["text"] == [report]
    previews = out["ui"]["images"]
    assert [p["type"] for p in previews] == ["temp", "temp"]
    assert all((comfy / "temp" / p["filename"]).is_file() for p in previews)


@pytest.mark.parametrize("other, measured", [("obama2.jpg", 0.723), ("biden.jpg", -0.033)])
def test_full_size_photos_give_the_measured_figures(face_model, faces_dir: Path, other: str, measured: float) -> None:
    scores = score(face_model, photo(faces_dir, other), reference_image=photo(faces_dir, "obama.jpg"))["result"][0]
    assert scores == [pytest.approx(measured, abs=0.01)]


def test_no_face_never_stops_the_graph(face_model, faces_dir: Path) -> None:
    size = (400, 500)
    blank = torch.full((1, size[1], size[0], 3), 0.5)
    outputs = torch.cat([photo(faces_dir, "obama2.jpg", size), blank])
    reference = photo(faces_dir, "obama.jpg")

    zero = score(face_model, outputs, reference_image=reference, no_face_policy="score_zero")["result"]
    excluded = score(face_model, outputs, reference_image=reference, no_face_policy="exclude")["result"]

    assert zero[0][1] == 0.0 and excluded[0][1] == 0.0
    assert zero[1] == pytest.approx(zero[0][0] / 2)
    assert excluded[1] == pytest.approx(excluded[0][0])
    assert "no face detected (scored 0)" in zero[3]
    assert "no face detected (excluded from the mean)" in excluded[3]
    assert "1 excluded (no face)" in excluded[3]
    assert zero[5][1] == -1.0
    assert zero[4].shape == outputs.shape


def test_multi_face_outputs_use_the_selection_policy(face_model) -> None:
    group = group_photo()
    faces = face_model.analyze(group, all_faces=True)[0].faces
    x1, y1, x2, y2 = (int(v) for v in faces[4].bbox)
    pad = (x2 - x1) // 2
    person = group[:, max(0, y1 - pad) : y2 + pad, max(0, x1 - pad) : x2 + pad]

    best = score(face_model, group, reference_image=person, face_selection="best_match")["result"]
    by_index = score(face_model, group, reference_image=person, face_selection="index", face_index=2)["result"]
    missing = score(face_model, group, reference_image=person, face_selection="index", face_index=9)["result"]

    assert best[0][0] > 0.8 and "5 of 6" in best[3]
    assert by_index[0][0] < 0.5 and "3 of 6" in by_index[3]
    assert missing[0] == [0.0] and "face index 9 requested but 6 face(s) found" in missing[3]


def test_rgba_and_grayscale_tensors(face_model, faces_dir: Path) -> None:
    reference = photo(faces_dir, "obama.jpg")
    rgb = photo(faces_dir, "obama2.jpg")
    rgba = torch.cat([rgb, torch.ones_like(rgb[..., :1])], dim=-1)
    gray = rgb.mean(dim=-1, keepdim=True)

    rgb_score = score(face_model, rgb, reference_image=reference)["result"][0][0]
    assert score(face_model, rgba, reference_image=reference)["result"][0][0] == pytest.approx(rgb_score, abs=1e-6)
    gray_out = score(face_model, gray, reference_image=reference)["result"]
    assert gray_out[0][0] > 0.5 and gray_out[4].shape == (*gray.shape[:3], 3)


def test_batch_rules(face_model, faces_dir: Path) -> None:
    size = (400, 500)
    obama, obama2, biden = (photo(faces_dir, n, size) for n in ("obama.jpg", "obama2.jpg", "biden.jpg"))

    pairwise = score(face_model, torch.cat([obama2, obama]), reference_image=torch.cat([obama, biden]))["result"][0]
    singles = [
        score(face_model, obama2, reference_image=obama)["result"][0][0],
        score(face_model, obama, reference_image=biden)["result"][0][0],
    ]
    assert pairwise == pytest.approx(singles, abs=1e-6)
    with pytest.raises(ValueError, match="batch has 2 images and the outputs batch 3"):
        score(face_model, torch.cat([obama, obama2, biden]), reference_image=torch.cat([obama, biden]))
    with pytest.raises(ValueError, match="reference_image .* or reference_identity"):
        score(face_model, obama)


def test_copy_paste_guard(face_model, faces_dir: Path) -> None:
    control = photo(faces_dir, "obama.jpg")
    unchanged = score(face_model, control, reference_image=control)["result"]
    edited = score(face_model, photo(faces_dir, "obama2.jpg"), reference_image=control)["result"]

    assert unchanged[0][0] == pytest.approx(1.0, abs=1e-5)
    assert unchanged[5][0] < 0.01 and "UNCHANGED face" in unchanged[3] and "1 unchanged" in unchanged[3]
    assert edited[5][0] > 0.3 and "UNCHANGED" not in edited[3]

    # an "edit" that only re-encoded and resampled the control (as a VAE round trip would)
    with Image.open(faces_dir / "obama.jpg") as img:
        small = img.convert("RGB").resize((img.width // 2, img.height // 2), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    small.resize((control.shape[2], control.shape[1]), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=70)
    roundtrip = torch.from_numpy(np.asarray(Image.open(buffer), dtype=np.float32) / 255.0)[None]
    resampled = score(face_model, roundtrip, reference_image=control)["result"]
    assert resampled[5][0] < 0.1 and "UNCHANGED face" in resampled[3]
    # ... or shifted it by a few pixels (the output's keypoints are detected anew)
    shifted = score(face_model, torch.roll(control, (7, -5), dims=(1, 2)), reference_image=control)["result"]
    assert shifted[5][0] < 0.1 and "UNCHANGED face" in shifted[3]


def test_reference_identity_from_several_photos(face_model, faces_dir: Path) -> None:
    size = (400, 500)
    photos = torch.cat([photo(faces_dir, "obama.jpg", size), photo(faces_dir, "obama3.jpg", size)])
    more = photo(faces_dir, "obama_partial_face.jpg")
    out = FaceConsistencyReference().build(face_model, photos, images_2=more)
    identity = out["result"][0]
    assert identity.count == 3 and "3 photo(s)" in out["ui"]["text"][0]

    target = photo(faces_dir, "obama2.jpg")
    result = score(face_model, target, reference_identity=identity)["result"]
    expected = float(np.dot(face_model.analyze(target)[0].embedding, identity.embedding))
    assert result[0] == [pytest.approx(expected, abs=1e-6)]
    assert result[5] == [-1.0]  # no control image: no change measure

    with pytest.raises(NoFaceError, match=r"images_2 image 0 \(of 1\): no face detected"):
        FaceConsistencyReference().build(face_model, photos, images_2=torch.full((1, 64, 64, 3), 0.5))


def test_cancel_stops_the_batch(face_model, faces_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    size = (320, 400)
    outputs = torch.cat([photo(faces_dir, "obama2.jpg", size)] * 4)
    calls = []
    analyze = type(face_model).analyze
    monkeypatch.setattr(type(face_model), "analyze", lambda self, *a, **k: calls.append(1) or analyze(self, *a, **k))
    ProgressBar.interrupt_after = 2  # the reference, then one output

    with pytest.raises(InterruptedError):
        score(face_model, outputs, reference_image=photo(faces_dir, "obama.jpg", size))
    assert len(calls) == 2
    assert ProgressBar.instances[-1].total == 5


def test_matching_recovers_people_in_group_photo(face_model) -> None:
    group = group_photo()
    out = FaceConsistencyMatchFaces().match(face_model, group, group, 0.2)
    person_scores, _, matched, report, annotated, annotated_reference = out["result"]

    assert matched == 6 and person_scores == pytest.approx([1.0] * 6, abs=1e-5)
    for person in range(6):
        assert f"P{person + 1} -> face {person + 1}: 1.000" in report
    assert annotated.shape == group.shape and annotated_reference.shape == group.shape


def test_matching_survives_a_horizontal_flip(face_model) -> None:
    group = group_photo()
    flipped = torch.flip(group, dims=[2])
    width = group.shape[2]
    reference_faces = face_model.analyze(group, all_faces=True)[0].faces
    flipped_faces = face_model.analyze(flipped, all_faces=True)[0].faces

    out = FaceConsistencyMatchFaces().match(face_model, group, flipped, 0.2)
    person_scores, _, matched, report = out["result"][:4]

    assert matched == 6 and min(person_scores) > 0.5
    for line in report.splitlines():
        if " -> face " in line:
            person = int(line.split()[0][1:]) - 1
            face = int(line.split("face ")[1].split(":")[0]) - 1
            ref_center = (reference_faces[person].bbox[0] + reference_faces[person].bbox[2]) / 2
            out_center = (flipped_faces[face].bbox[0] + flipped_faces[face].bbox[2]) / 2
            assert abs((width - ref_center) - out_center) < 10


def test_matching_reports_missing_people_and_strangers() -> None:
    rng = np.random.default_rng(0)
    people = rng.normal(size=(3, 16)).astype(np.float32)
    people /= np.linalg.norm(people, axis=1, keepdims=True)
    stranger = rng.normal(size=(1, 16)).astype(np.float32)
    stranger /= np.linalg.norm(stranger)
    output = np.concatenate([stranger, people[2:], people[:1]])  # person 1 missing, a stranger added

    assignment = match_faces(people, output, min_similarity=0.5)
    assert [(m.reference_index, m.output_index) for m in assignment.matches] == [(0, 2), (2, 1)]
    assert assignment.unmatched_reference == [1] and assignment.unmatched_output == [0]
    assert match_faces(people, np.zeros((0, 16))).unmatched_reference == [0, 1, 2]


def test_best_of_orders_filters_and_falls_back() -> None:
    images = torch.stack([torch.full((4, 6, 3), i / 10) for i in range(5)])
    scores = [0.5, 0.9, 0.7, 0.95, 0.1]
    node = FaceConsistencyBestOf()

    kept, kept_scores, indices, report, judged = node.pick([images], scores, [0.6], [0], ["best"])["result"]
    assert judged == [-1.0, -1.0, -1.0]  # no judge connected
    assert indices == [3, 1, 2] and kept_scores == [0.95, 0.9, 0.7]
    assert torch.equal(kept, images[[3, 1, 2]])
    assert report.startswith("best of 5: 3 at or above 0.60")

    assert node.pick([images], scores, [-1.0], [2], ["best"])["result"][2] == [3, 1]

    kept, _, indices, report, _ = node.pick([images], scores, [0.99], [0], ["best"])["result"]
    assert indices == [3] and kept.shape[0] == 1 and "fallback 'best': keeping image 3" in report

    kept, kept_scores, indices, report, _ = node.pick([images], scores, [0.99], [0], ["empty"])["result"]
    assert indices == [] and kept.shape == (0, 4, 6, 3) and "no images returned" in report

    with pytest.raises(ValueError, match="5 images but 4 scores"):
        node.pick([images], scores[:4], [0.5], [0], ["best"])


def test_best_of_accepts_a_list_of_single_images() -> None:
    singles = [torch.full((1, 4, 4, 3), i / 4) for i in range(3)]
    kept, _, indices, _, _ = FaceConsistencyBestOf().pick(singles, [0.2, 0.8, 0.5], [0.0], [1], ["best"])["result"]
    assert indices == [1] and torch.equal(kept, singles[1])


def test_pick_best_ties_and_nan() -> None:
    assert pick_best([0.5, float("nan"), 0.5, 0.7]).indices == [3, 0, 2]
    assert pick_best([float("nan")], threshold=0.0, fallback="empty").indices == []


def test_matching_needs_people_in_the_reference_and_reports_outputs_without_faces(face_model) -> None:
    group = group_photo()
    blank = torch.full((1, 200, 300, 3), 0.5)
    with pytest.raises(NoFaceError, match=r"reference_image image 0 \(of 1\): no face detected"):
        FaceConsistencyMatchFaces().match(face_model, blank, group, 0.2)

    person_scores, mean, matched, report = FaceConsistencyMatchFaces().match(face_model, group, blank, 0.2)["result"][
        :4
    ]
    assert person_scores == [0.0] * 6 and matched == 0 and mean == 0.0
    assert "image 0: 0 of 6 people matched, 0 face(s) found (no face detected)" in report
    assert report.count(": missing") == 6


@pytest.mark.parametrize("shape", [(1, 0, 64, 3), (1, 64, 0, 3), (1, 0, 64, 4)])
def test_image_without_pixels_is_a_clear_error(face_model, faces_dir: Path, shape) -> None:
    reference = photo(faces_dir, "obama.jpg")
    with pytest.raises(
        Exception, match=r"input 'images' holds images of \d+x\d+ pixels \(width x height\): nothing to score"
    ):
        score(face_model, torch.zeros(shape), reference_image=reference)
    with pytest.raises(Exception, match=r"input 'reference_image' holds images of"):
        score(face_model, reference, reference_image=torch.zeros(shape))


def test_image_of_0_to_255_gets_a_hint_not_no_face(face_model, faces_dir: Path) -> None:
    reference = photo(faces_dir, "obama.jpg")
    sample = photo(faces_dir, "obama2.jpg")
    with pytest.raises(
        Exception, match=r"input 'images' image 0 has values up to 255, but float images .* hold 0\.\.1"
    ):
        score(face_model, sample * 255.0, reference_image=reference)
    rgba = torch.cat([sample, torch.ones_like(sample[..., :1])], dim=-1) * 255.0
    with pytest.raises(Exception, match="input 'images': the image has values up to 255.*divide it by 255"):
        score(face_model, rgba, reference_image=reference)
    with pytest.raises(Exception, match="input 'images' image 0 has values up to 255"):
        FaceConsistencyReference().build(face_model, reference * 255.0)
    slight_overshoot = (sample * 1.05).clamp(max=1.05)  # an upscaler's overshoot is clipped, as before
    assert score(face_model, slight_overshoot, reference_image=reference)["result"][0][0] > 0.5


def test_identity_of_another_embedding_size_is_named(face_model, faces_dir: Path) -> None:
    from face_consistency.faceid import Identity

    rng = np.random.default_rng(0)
    vector = rng.standard_normal(512).astype(np.float32)
    other = Identity(embedding=vector / np.linalg.norm(vector), count=1)
    with pytest.raises(
        ValueError, match="the reference identity has 512-d embeddings but model pack 'testpack' makes 128-d"
    ):
        score(face_model, photo(faces_dir, "obama2.jpg"), reference_identity=other)
