"""Every node input is checked against its own declaration before the node runs (issue 22, rule 3):
text bounded and NUL-free, numbers finite and within the widget's range. Built from the node
definitions, so a node or input added later is covered without a new test. Also the scoring nodes
with an image the detector cannot take (rule 4) and Score Folder's outputs over its inputs (rule 2)."""

from __future__ import annotations

import math

import pytest
import torch
from comfy_stubs import set_comfy_base
from evaluate_fixtures import build_musubi_folder
from face_consistency.common.values import MAX_TEXT_LENGTH, ValueCheckError
from face_consistency.faceid.evaluate import EvaluationError
from face_consistency.nodes import NODE_CLASS_MAPPINGS, comfy_env
from face_consistency.nodes.folder import FaceConsistencyScoreFolder
from face_consistency.nodes.inputs import MAX_MULTILINE_LENGTH
from face_consistency.nodes.scoring import FaceConsistencyLoadModel, FaceConsistencySimilarity


@pytest.fixture(autouse=True)
def comfy(tmp_path, insightface_root):
    fp = set_comfy_base(tmp_path / "comfy")
    fp.add_model_folder_path("insightface", str(insightface_root))
    return tmp_path / "comfy"


def _inputs(kinds: tuple[str, ...]) -> list[tuple[str, str, dict]]:
    found = []
    for key, cls in NODE_CLASS_MAPPINGS.items():
        declared = cls.INPUT_TYPES()
        for name, spec in {**declared.get("required", {}), **declared.get("optional", {})}.items():
            if spec[0] in kinds:
                found.append((key, name, spec[1] if len(spec) > 1 else {}))
    return found


def _run(key: str, **values):
    cls = NODE_CLASS_MAPPINGS[key]
    return getattr(cls(), cls.FUNCTION)(**values)


def _id(value) -> str:
    return value if isinstance(value, str) else ""


@pytest.mark.parametrize(("key", "name", "settings"), _inputs(("STRING",)), ids=_id)
def test_every_text_input_refuses_nul_and_absurd_lengths(key, name, settings):
    if not settings.get(comfy_env.PATH_INPUT):  # a path's NUL: comfy_env.confine (test_confinement.py)
        with pytest.raises(ValueCheckError, match=rf"^input {name} contains a NUL character \(at position 3\)"):
            _run(key, **{name: "abc\0def"})
    limit = MAX_MULTILINE_LENGTH if settings.get("multiline") else MAX_TEXT_LENGTH
    with pytest.raises(ValueCheckError, match=rf"^input {name} is {limit + 1} characters long; at most {limit}"):
        _run(key, **{name: "x" * (limit + 1)})


@pytest.mark.parametrize(("key", "name", "settings"), _inputs(("INT", "FLOAT")), ids=_id)
def test_every_number_input_refuses_non_finite_and_out_of_range_values(key, name, settings):
    if settings.get("max") is not None:
        with pytest.raises(ValueCheckError, match=rf"^input {name} must be .*got "):
            _run(key, **{name: settings["max"] * 2 + 1})
    if settings.get("min") is not None:
        with pytest.raises(ValueCheckError, match=rf"^input {name} must be .*got "):
            _run(key, **{name: settings["min"] - 1})
    for value in (math.nan, math.inf):
        with pytest.raises(ValueCheckError, match=rf"^input {name} must be a finite number, got {value}"):
            _run(key, **{name: value})


def test_a_comfy_combo_of_files_is_text_too():
    assert any(
        isinstance(spec[0], list)
        for cls in NODE_CLASS_MAPPINGS.values()
        for spec in cls.INPUT_TYPES().get("required", {}).values()
    )
    with pytest.raises(ValueCheckError, match="^input pack contains a NUL character"):
        _run("FaceConsistencyLoadModel", pack="testpack\0", provider="cpu", det_size="640", det_thresh=0.5)


def test_the_similarity_node_gives_an_image_the_detector_cannot_take_its_own_row(faces_dir):
    """Once OpenCV's resize assertion from inside the detector; now the row says why."""
    model = FaceConsistencyLoadModel().load("testpack", "cpu", "640", 0.5)["result"][0]
    reference = model.identity([str(faces_dir / "obama.jpg")])
    out = FaceConsistencySimilarity().score(
        model,
        torch.full((2, 6000, 1, 3), 0.5),
        reference_identity=reference,
        face_selection="largest",
        face_index=0,
        no_face_policy="score_zero",
        threshold=0.7,
        band_excellent=0.85,
        band_good=0.75,
        band_moderate=0.65,
        copy_paste_threshold=0.1,
    )
    scores, report = out["result"][0], out["result"][3]
    assert scores == [0.0, 0.0]
    assert report.count("image 1x6000 is too small to hold a face") == 2


def test_score_folder_never_saves_its_plot_over_a_sample(model, faces_dir, tmp_path, monkeypatch):
    folder = comfy_env.output_directory() / "run"
    run = build_musubi_folder(folder, faces_dir)
    monkeypatch.chdir(folder)
    sample = sorted(run["sample_dir"].glob("*.png"))[0]
    before = sample.read_bytes()
    with pytest.raises(EvaluationError, match=rf"save_report's plot {sample} is an image in the sample folder"):
        FaceConsistencyScoreFolder().score_folder(
            model,
            str(run["sample_dir"]),
            0.5,
            sample_prompts=str(run["prompts"]),
            save_report=str(sample.with_suffix(".json")),
        )
    assert sample.read_bytes() == before and not sample.with_suffix(".json").exists()
