"""`--face_eval_model dlib`: the judge's held-out figures in a real tiny training run, and on real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from evaluate_fixtures import one_sample_run
from face_consistency.cli import main as cli_main
from face_consistency.faceid import load_face_model
from face_consistency.faceid.judge import load_judge, verdict
from face_consistency.musubi_formats.dataset import DatasetItem
from face_consistency.trainer.face.hook import JudgeHeldout
from face_consistency.trainer.face.metrics import SampleScorer
from face_consistency.training_contract.protocol import read_metrics, read_status
from PIL import Image, ImageOps
from tiny_qwen import tiny_train_argv, write_tiny_dataset, write_tiny_model_files, write_tiny_prompts

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def judge():
    return load_judge()


def _item(target: Path, controls: list[Path]) -> DatasetItem:
    return DatasetItem(
        target=target,
        controls=tuple(controls),
        caption="",
        target_size=(64, 64),
        bucket=(64, 64),
        control_buckets=((64, 64),) * len(controls),
        cache_directory=target.parent,
    )


def _pixels(path: Path, size: int = 320) -> torch.Tensor:
    """A photo (letterboxed to a square) as the decoder gives it: [1, 3, H, W] in [-1, 1]."""
    with Image.open(path) as image:
        image = ImageOps.pad(image.convert("RGB"), (size, size))
        array = np.asarray(image, np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def test_judge_measures_estimates_against_the_controls(judge, faces_dir, tmp_path):
    heldout = JudgeHeldout(judge)
    blank = tmp_path / "blank.png"
    Image.new("RGB", (64, 64), (90, 90, 90)).save(blank)
    same, other, lost = (
        _item(tmp_path / f"{n}.png", c)
        for n, c in (("a", [faces_dir / "obama.jpg"]), ("b", [faces_dir / "obama.jpg"]), ("c", [blank]))
    )
    heldout.cache([same, other, lost], lambda: False)
    assert list(heldout.without_face()) == [str(lost.target)] and "no face" in heldout.without_face()[str(lost.target)]

    pixels = torch.cat(
        [_pixels(faces_dir / "obama2.jpg"), _pixels(faces_dir / "biden.jpg"), _pixels(faces_dir / "obama3.jpg")]
    )
    metrics = heldout.measure(pixels, [same, other, lost])
    assert metrics["face_sim/x0_count"] == 2 and metrics["face_sim/x0_no_face"] == 1
    close, far = metrics["face_sim/x0"]
    assert close > 0.5 > far  # same person close, different far, on the judge's scale
    expected = verdict(
        judge.judge(((pixels[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).descriptor,
        heldout.references[same.target].descriptor,
    )
    assert close == pytest.approx(expected.similarity, abs=1e-5)
    assert metrics["face_sim/x0_distance_mean"] > 0


def test_sample_scorer_adds_the_judges_figures(judge, faces_dir, testpack_dir, tmp_path):
    engine = load_face_model(testpack_dir, provider="cpu", det_size=640)
    sample_dir, sample, prompts = one_sample_run(tmp_path, faces_dir)
    metrics = SampleScorer(engine, sample_dir, prompts, judge=judge).score([sample])
    expected = verdict(judge.judge(sample).descriptor, judge.judge(faces_dir / "obama.jpg").descriptor)
    assert metrics["face_sim/sample_count"] == metrics["face_sim/heldout_sample_count"] == 1
    assert metrics["face_sim/heldout_sample_mean"] == pytest.approx(expected.similarity, abs=1e-5)


def test_training_run_with_the_dlib_judge(tmp_path, insightface_root, faces_dir, testpack_dir):
    files = write_tiny_model_files(tmp_path / "models")
    engine = load_face_model(testpack_dir, provider="cpu", det_size=640)
    dataset = write_tiny_dataset(tmp_path / "data", n=2, with_face_photos=faces_dir, face_model=engine)
    prompts = write_tiny_prompts(tmp_path / "data", n=1)
    out = tmp_path / "out"
    argv = tiny_train_argv(
        files,
        dataset,
        out,
        max_train_steps=2,
        extra=[
            "--face_model_name",
            "testpack",
            "--face_models_root",
            str(insightface_root),
            "--face_device",
            "cpu",
            "--enable_face_loss",
            "--face_eval_frequency",
            "1",
            "--face_eval_model",
            "dlib",
            "--sample_prompts",
            str(prompts),
            "--sample_every_n_steps",
            "2",
        ],
    )
    assert cli_main(["train", *argv]) == 0, read_status(out)
    status = read_status(out)
    assert status["state"] == "completed"
    assert status["face_targets_heldout_without_face"] == 0  # its own detector finds the 64x64 control faces
    steps = [m for m in read_metrics(out) if "face_sim/heldout_x0_count" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:  # the tiny random VAE draws no face: the judge's own detector says so, per estimate
        assert m["face_sim/heldout_x0_count"] + m["face_sim/heldout_x0_no_face"] == 1  # batch size 1
    assert any("face_sim/heldout_sample_count" in m for m in read_metrics(out))
