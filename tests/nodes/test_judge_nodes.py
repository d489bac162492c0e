"""The judge loader node, the `judge` input of the scoring nodes, and the copy-paste gauge, on the real photos."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from face_consistency.faceid.judge import load_judge, verdict
from face_consistency.nodes import NODE_CLASS_MAPPINGS
from face_consistency.nodes.imaging import to_bgr_list
from face_consistency.nodes.judge import FaceConsistencyLoadJudge
from face_consistency.nodes.matching import FaceConsistencyBestOf
from face_consistency.nodes.scoring import FaceConsistencyReference, FaceConsistencySimilarity
from scoring_inputs import SCORE_DEFAULTS, photo

SIZE = (400, 500)


def score(face_model, images, **overrides):
    return FaceConsistencySimilarity().score(face_model, images, **{**SCORE_DEFAULTS, **overrides})


def test_loader_registered_and_states_its_own_detector(judge) -> None:
    assert NODE_CLASS_MAPPINGS["FaceConsistencyLoadJudge"] is FaceConsistencyLoadJudge
    text = FaceConsistencyLoadJudge().load("hog")["ui"]["text"][0]
    assert "own" in text and "0.6" in text and judge is load_judge()


def test_similarity_node_shows_both_scores(face_model, judge, faces_dir: Path) -> None:
    control = photo(faces_dir, "obama.jpg")
    outputs = torch.cat([photo(faces_dir, "obama2.jpg", SIZE), photo(faces_dir, "biden.jpg", SIZE)])
    result = score(face_model, outputs, reference_image=control, judge=judge)["result"]
    judge_scores, report = result[6], result[3]
    reference = judge.judge(to_bgr_list(control)[0], "bgr").descriptor
    expected = [verdict(judge.judge(bgr, "bgr").descriptor, reference).similarity for bgr in to_bgr_list(outputs)]
    assert judge_scores == [pytest.approx(e, abs=1e-6) for e in expected]
    assert judge_scores[0] > 0.5 > judge_scores[1]  # same person close, different far
    assert "held-out judge dlib" in report and "judge: NOT the same person" in report
    assert "1 same person" in report


def test_judge_failure_is_its_own_per_image(face_model, judge, faces_dir: Path) -> None:
    control = photo(faces_dir, "obama.jpg")
    blank = torch.full((1, *SIZE[::-1], 3), 0.5)
    result = score(
        face_model, torch.cat([photo(faces_dir, "obama3.jpg", SIZE), blank]), reference_image=control, judge=judge
    )["result"]
    assert result[6][1] == -1.0 and result[0][1] == 0.0
    assert "no face detected (scored 0); judge: no face detected by the judge" in result[3]


def test_no_judge_gives_minus_one(face_model, faces_dir: Path) -> None:
    result = score(face_model, photo(faces_dir, "obama2.jpg"), reference_image=photo(faces_dir, "obama.jpg"))["result"]
    assert result[6] == [-1.0] and result[7] == -1.0


def test_identity_built_with_the_judge_and_the_gauge(face_model, judge, faces_dir: Path) -> None:
    photos = torch.cat([photo(faces_dir, n, SIZE) for n in ("obama.jpg", "obama2.jpg", "obama3.jpg")])
    out = FaceConsistencyReference().build(face_model, photos, judge=judge)
    identity = out["result"][0]
    assert identity.agreement.pairs == 3 and identity.judge.count == 3
    assert "own agreement" in out["ui"]["text"][0] and "judge dlib" in out["ui"]["text"][0]

    control = photo(faces_dir, "obama.jpg", SIZE)
    copy, other = (
        score(face_model, control, reference_identity=identity, reference_image=control, judge=judge),
        score(face_model, photo(faces_dir, "biden.jpg", SIZE), reference_identity=identity, reference_image=control),
    )
    copy_result = copy["result"]
    assert copy_result[7] == pytest.approx(identity.agreement.mean)
    assert copy_result[0][0] > identity.agreement.mean and copy_result[5][0] < 0.01
    assert "COPY?" in copy_result[3] and "COPY-PASTE?" in copy_result[3]
    assert "own agreement" in other["result"][3] and "COPY" not in other["result"][3]


def test_identity_without_judge_is_refused_with_a_judge(face_model, judge, faces_dir: Path) -> None:
    identity = FaceConsistencyReference().build(face_model, photo(faces_dir, "obama.jpg"))["result"][0]
    with pytest.raises(ValueError, match="Face Reference Identity's judge input"):
        score(face_model, photo(faces_dir, "obama2.jpg"), reference_identity=identity, judge=judge)


def test_best_of_reports_the_judges_verdicts(judge, faces_dir: Path) -> None:
    images = torch.cat([photo(faces_dir, "obama2.jpg", SIZE), photo(faces_dir, "biden.jpg", SIZE)])
    control = photo(faces_dir, "obama.jpg", SIZE)
    _, _, indices, report, judged = FaceConsistencyBestOf().pick(
        [images], [0.4, 0.9], [-1.0], [0], ["best"], judge=[judge], reference_image=[control]
    )["result"]
    assert indices == [1, 0] and judged[0] < 0.5 < judged[1]
    assert "image 1: 0.900  judge" in report and "NOT the same person" in report
    with pytest.raises(ValueError, match="reference_image"):
        FaceConsistencyBestOf().pick([images], [0.4, 0.9], [-1.0], [0], ["best"], judge=[judge])
