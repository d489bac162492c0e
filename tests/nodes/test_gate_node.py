"""The Face Gate node on the real test pack and photos: which side each image goes to, and why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from comfy_stubs import ExecutionBlocker
from face_consistency.nodes import NODE_CLASS_MAPPINGS
from face_consistency.nodes.gate import FaceConsistencyGate
from scoring_inputs import group_photo, photo

SIZE = (400, 500)
GATE_DEFAULTS = dict(
    threshold=0.6,
    several_faces="reject",
    reject_unchanged=True,
    copy_paste_threshold=0.1,
    require_both=False,
    judge_threshold=0.5,
    empty_side="skip downstream",
    band_excellent=0.85,
    band_good=0.75,
    band_moderate=0.65,
)


def gate(face_model, images, **overrides):
    return FaceConsistencyGate().gate(face_model, images, **{**GATE_DEFAULTS, **overrides})


def blank() -> torch.Tensor:
    return torch.full((1, *SIZE[::-1], 3), 0.5)


def letterboxed_group() -> torch.Tensor:
    group = group_photo()
    canvas = blank().clone()
    h, w = min(group.shape[1], SIZE[1]), min(group.shape[2], SIZE[0])
    canvas[0, :h, :w] = group[0, :h, :w]
    return canvas


@pytest.fixture()
def control(faces_dir: Path) -> torch.Tensor:
    return photo(faces_dir, "obama.jpg")


def test_registered_with_its_outputs() -> None:
    cls = NODE_CLASS_MAPPINGS["FaceConsistencyGate"]
    assert cls is FaceConsistencyGate
    assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_IS_LIST) == len(cls.OUTPUT_TOOLTIPS)
    assert cls.RETURN_TYPES[:2] == ("IMAGE", "IMAGE")


def test_a_batch_that_passes_partly_goes_to_both_sides_with_reasons(face_model, faces_dir: Path, control) -> None:
    images = torch.cat(
        [
            photo(faces_dir, "obama2.jpg", SIZE),
            photo(faces_dir, "biden.jpg", SIZE),
            blank(),
            letterboxed_group(),
            photo(faces_dir, "obama3.jpg", SIZE),
        ]
    )
    out = gate(face_model, images, reference_image=control)
    passed, rejected, reasons, report, n_passed, n_rejected = out["result"]
    torch.testing.assert_close(passed, images[[0, 4]])
    torch.testing.assert_close(rejected, images[[1, 2, 3]])
    assert (n_passed, n_rejected) == (2, 3)
    assert reasons[0].startswith("passed: 0.7") and reasons[0].endswith("(moderate) >= 0.60")  # 0.738
    assert reasons[1].startswith("rejected: ") and "(poor) below 0.60" in reasons[1]
    assert reasons[2] == "rejected: no face"
    assert reasons[3].startswith("rejected: ") and "several faces (" in reasons[3]
    assert "2 of 5 passed, 3 rejected" in report and out["ui"]["text"] == [report]
    for i, reason in enumerate(reasons):
        assert f"{i:>3}  {reason}" in report


def test_several_faces_can_be_decided_by_the_largest(face_model, control) -> None:
    reasons = gate(
        face_model, letterboxed_group(), reference_image=control, several_faces="score_selected", threshold=-1.0
    )["result"][2]
    assert reasons[0].startswith("passed: ") and "several" not in reasons[0]


def test_a_side_with_no_image_is_skipped_downstream_or_an_empty_batch(face_model, faces_dir: Path, control) -> None:
    good = torch.cat([photo(faces_dir, "obama2.jpg", SIZE), photo(faces_dir, "obama3.jpg", SIZE)])
    passed, rejected, *_ = gate(face_model, good, reference_image=control)["result"]
    assert passed.shape[0] == 2 and isinstance(rejected, ExecutionBlocker) and rejected.message is None

    passed, rejected, reasons, _, n_passed, n_rejected = gate(
        face_model, good, reference_image=control, empty_side="empty batch"
    )["result"]
    assert tuple(rejected.shape) == (0, SIZE[1], SIZE[0], 3) and rejected.dtype == good.dtype
    assert (n_passed, n_rejected) == (2, 0)

    bad = torch.cat([photo(faces_dir, "biden.jpg", SIZE), blank()])
    passed, rejected, reasons, _, n_passed, _ = gate(
        face_model, bad, reference_image=control, empty_side="empty batch"
    )["result"]
    assert tuple(passed.shape) == (0, SIZE[1], SIZE[0], 3) and n_passed == 0 and rejected.shape[0] == 2
    assert all(r.startswith("rejected: ") for r in reasons)
    assert isinstance(gate(face_model, bad, reference_image=control)["result"][0], ExecutionBlocker)


def test_a_face_returned_unchanged_is_rejected_unless_allowed(face_model, control) -> None:
    reasons = gate(face_model, control, reference_image=control)["result"][2]
    assert reasons[0].startswith("rejected: face unchanged from the control (change 0.000 < 0.10)")
    assert "1.000 (excellent) >= 0.60" in reasons[0]
    assert gate(face_model, control, reference_image=control, reject_unchanged=False)["result"][4] == 1


def test_against_an_identity(face_model, faces_dir: Path) -> None:
    from face_consistency.nodes.scoring import FaceConsistencyReference

    identity = FaceConsistencyReference().build(face_model, photo(faces_dir, "obama.jpg"))["result"][0]
    result = gate(
        face_model,
        torch.cat([photo(faces_dir, "obama2.jpg", SIZE), photo(faces_dir, "biden.jpg", SIZE)]),
        reference_identity=identity,
    )["result"]
    assert result[4:] == (1, 1)


def test_the_judge_verdict_joins_the_reasons_and_can_be_required(
    face_model,
    judge,
    faces_dir: Path,
    control,
) -> None:
    images = torch.cat([photo(faces_dir, "obama2.jpg", SIZE), blank()])
    reasons = gate(face_model, images, reference_image=control, judge=judge)["result"][2]
    assert reasons[0].startswith("passed: ") and "judge 0.6" in reasons[0] and "(same person)" in reasons[0]
    assert reasons[1].startswith("rejected: no face; judge: no face")

    strict = gate(face_model, images, reference_image=control, judge=judge, judge_threshold=0.99)["result"]
    assert strict[4] == 1 and "NOT the same person" in strict[2][0]  # a note only, unless required
    required = gate(face_model, images, reference_image=control, judge=judge, judge_threshold=0.99, require_both=True)[
        "result"
    ]
    assert required[4:] == (0, 2)
    assert required[2][0].startswith("rejected: judge 0.6") and "(NOT the same person)" in required[2][0]
    assert "the judge must agree (similarity >= 0.99)" in required[3]


def test_require_both_without_a_judge_says_what_to_connect(face_model, control) -> None:
    with pytest.raises(ValueError, match="require_both needs a judge"):
        gate(face_model, control, reference_image=control, require_both=True)


def test_no_reference_and_empty_input_are_clear_errors(face_model, control) -> None:
    with pytest.raises(ValueError, match="connect reference_image"):
        gate(face_model, control)
    with pytest.raises(Exception, match="empty batch"):
        gate(face_model, control[:0], reference_image=control)
