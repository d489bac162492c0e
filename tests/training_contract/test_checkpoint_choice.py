"""checkpoints.json and the checkpoint to keep (issue 23): the table's file, the recommendation and its words."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from face_consistency.training_contract.checkpoint_choice import (
    CHECKPOINTS_FILE,
    CheckpointRow,
    CheckpointTable,
    format_table,
    read_table,
    recommend,
    validation_rise,
    write_table,
)


def _row(
    step: int,
    val: float | None = None,
    likeness: float | None = None,
    dlib: float | None = None,
    copies: int = 0,
    samples: int = 2,
) -> CheckpointRow:
    losses = None if val is None else {"1": val + 0.1, "0.75": val, "0.5": val, "0.25": val - 0.1}
    return CheckpointRow(
        f"lora-step{step:08d}.safetensors",
        step,
        validation_loss=losses,
        likeness=likeness,
        likeness_dlib=dlib,
        near_copies=copies,
        samples=samples,
    )


def test_the_example_of_the_issue_in_words():
    rows = [
        _row(500, 0.50, 0.61, 0.55),
        _row(1000, 0.45, 0.70, 0.66),
        _row(1500, 0.43, 0.78, 0.71),
        _row(2000, 0.42, 0.80, 0.74),
        _row(2500, 0.47, 0.83, 0.76, copies=1),
        _row(3000, 0.52, 0.85, 0.79, copies=2),
    ]
    chosen = recommend(rows)
    assert chosen.step == 2000  # the last before the rise; later likeness is not held against over-training
    assert chosen.reason == (
        "step 2000: highest held-out likeness 0.80 (dlib 0.74); validation loss rises after "
        "step 2000 and near-copies of training targets appear at step 2500 (1 of 2 samples)"
    )


def test_near_copies_alone_end_the_candidates_before_them():
    rows = [_row(10, likeness=0.6), _row(20, likeness=0.7), _row(30, likeness=0.9, copies=1)]
    chosen = recommend(rows)
    assert (chosen.step, chosen.reason) == (
        20,
        "step 20: highest held-out likeness 0.70; near-copies of training targets appear at step 30 (1 of 2 samples)",
    )


def test_without_likeness_the_lowest_validation_loss_is_kept():
    rows = [_row(10, 0.5, samples=0), _row(20, 0.4, samples=0), _row(30, 0.41, samples=0), _row(40, 0.6, samples=0)]
    assert validation_rise(rows).step == 20
    chosen = recommend(rows)
    assert chosen.reason == "step 20: lowest validation loss 0.4000; validation loss rises after step 20"


def test_a_small_wobble_is_no_rise_and_ties_go_to_the_earlier_checkpoint():
    rows = [_row(10, 0.40, 0.7), _row(20, 0.405, 0.7)]  # 1.25 % above the lowest: within RISE_TOLERANCE
    assert validation_rise(rows) is None
    chosen = recommend(rows)
    assert chosen.step == 10
    assert chosen.reason.endswith(
        "no over-training seen: the validation loss has not risen and no sample copies a training target"
    )


def test_with_nothing_to_choose_by_it_says_what_to_give():
    chosen = recommend([_row(10, samples=0), _row(20, samples=0)])
    assert chosen.step == 20 and "--likeness_references" in chosen.reason and "--validation_split" in chosen.reason
    assert recommend([]) is None


def test_the_table_is_written_atomically_and_read_back(tmp_path: Path):
    table = CheckpointTable(
        [_row(10, 0.5, 0.7, 0.6), _row(20, 0.6, 0.8)], (1.0, 0.75, 0.5, 0.25), references=3, validation_items=2
    )
    path = write_table(tmp_path, table)
    assert path == tmp_path / CHECKPOINTS_FILE and not list(tmp_path.glob(".*tmp"))
    record = json.loads(path.read_text())
    assert record["recommendation"]["step"] == 10 and record["references"] == 3
    first = record["checkpoints"][0]
    assert first["validation_loss"] == {"1": 0.6, "0.75": 0.5, "0.5": 0.5, "0.25": 0.4}
    assert first["validation_loss_mean"] == pytest.approx(0.5)
    assert (first["likeness"], first["likeness_dlib"], first["step"]) == (0.7, 0.6, 10)
    again = read_table(tmp_path)
    assert again.rows == table.rows and again.recommendation() == table.recommendation()


def test_an_unreadable_or_linked_table_is_none(tmp_path: Path):
    assert read_table(tmp_path) is None
    (tmp_path / CHECKPOINTS_FILE).write_text("{not json")
    assert read_table(tmp_path) is None
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_table(elsewhere, CheckpointTable([_row(10, 0.5)]))
    run = tmp_path / "run"
    run.mkdir()
    (run / CHECKPOINTS_FILE).symlink_to(elsewhere / CHECKPOINTS_FILE)
    assert read_table(run) is None


def test_the_text_table_shows_each_sigma_and_ends_with_the_choice():
    text = format_table(CheckpointTable([_row(10, 0.5, 0.7, 0.6), _row(20, None, None, copies=1)]))
    lines = text.splitlines()
    assert lines[0].split()[:6] == ["checkpoint", "step", "val@1", "val@0.75", "val@0.5", "val@0.25"]
    assert lines[1].split()[1:8] == ["10", "0.6000", "0.5000", "0.5000", "0.4000", "0.700", "0.600"]
    assert lines[2].split()[2:7] == ["-", "-", "-", "-", "-"]
    assert lines[-1].startswith("keep lora-step00000010.safetensors: step 10: highest held-out likeness 0.70")
