"""FaceConsistencyScoreFolder: same report as the command line, plot as IMAGE, re-runs embed only new files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from comfy_stubs import ProgressBar, set_comfy_base
from evaluate_fixtures import TIME, build_musubi_folder, reencode, validate_schema
from face_consistency.faceid.evaluate import cli as evaluate_cli
from face_consistency.faceid.evaluate.plot import PLOT_SIZE
from face_consistency.faceid.evaluate.report import REPORT_SCHEMA
from face_consistency.nodes import NODE_CLASS_MAPPINGS, comfy_env
from face_consistency.nodes.folder import FaceConsistencyScoreFolder
from PIL import Image


@pytest.fixture()
def run(tmp_path, faces_dir, monkeypatch):
    set_comfy_base(tmp_path / "comfy")
    folder = comfy_env.output_directory() / "run"  # a run ComfyUI's output holds, as the launch node writes
    paths = build_musubi_folder(folder, faces_dir)
    monkeypatch.chdir(folder)  # relative --ci paths resolve from the working directory
    return paths


@pytest.fixture()
def comfy_input(tmp_path):
    """ComfyUI's input folder, where a user puts folders to score."""
    set_comfy_base(tmp_path / "comfy")
    return tmp_path / "comfy" / "input"


def _score(model, run, **kwargs):
    node = FaceConsistencyScoreFolder()
    return node.score_folder(model, str(run["sample_dir"]), 0.5, sample_prompts=str(run["prompts"]), **kwargs)


def test_registered_and_widgets():
    assert NODE_CLASS_MAPPINGS["FaceConsistencyScoreFolder"] is FaceConsistencyScoreFolder
    inputs = FaceConsistencyScoreFolder.INPUT_TYPES()
    assert inputs["required"]["face_model"] == ("FACE_MODEL",)
    assert inputs["optional"]["reference_identity"][0] == "FACE_IDENTITY"
    assert FaceConsistencyScoreFolder.RETURN_TYPES == ("STRING", "IMAGE")


def test_node_report_equals_command_report(model, run, insightface_root, tmp_path):
    out = _score(model, run, save_report="reports/node.json")  # relative: inside ComfyUI's output folder
    tmp_path = comfy_env.output_directory() / "reports"
    report_json, plot = out["result"]
    report = json.loads(report_json)
    assert validate_schema(report, REPORT_SCHEMA) == []
    assert isinstance(plot, torch.Tensor) and tuple(plot.shape) == (1, PLOT_SIZE[1], PLOT_SIZE[0], 3)
    assert float(plot.min()) >= 0.0 and float(plot.max()) <= 1.0
    assert "6 of 8 pairs scored" in out["ui"]["text"][0] and out["ui"]["images"]
    assert json.loads((tmp_path / "node.json").read_text())["valid_pairs"] == 6
    assert (tmp_path / "node.png").read_bytes()[:4] == b"\x89PNG"
    with Image.open(tmp_path / "node.png") as png:  # the same figure, in RGB order (not swapped to BGR)
        png_rgb = np.asarray(png.convert("RGB"), dtype=np.float32)
    assert np.abs(plot[0].numpy() * 255.0 - png_rgb).mean() < 1.0
    cli_out = tmp_path / "cli.json"
    assert (
        evaluate_cli.main(
            [
                "--sample_dir",
                str(run["sample_dir"]),
                "--sample_prompts",
                str(run["prompts"]),
                "--threshold",
                "0.5",
                "--output_json",
                str(cli_out),
                "--model_name",
                "testpack",
                "--models_root",
                str(insightface_root),
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 0
    )
    cli = json.loads(cli_out.read_text())
    for key in ("total_pairs", "valid_pairs", "overall_mean", "overall_std", "by_step", "by_prompt", "failure_count"):
        assert report[key] == cli[key], key


@pytest.mark.parametrize(
    ("save_report", "message"),
    [
        ("../elsewhere.json", "outside ComfyUI's output folder"),
        ("/tmp/report.json", "outside ComfyUI's output folder"),
        ("report.png", "must name a .json file"),
    ],
)
def test_report_is_written_only_inside_the_output_folder_and_never_over_the_plot(model, run, save_report, message):
    with pytest.raises(comfy_env.FolderAccessError, match=message):
        _score(model, run, save_report=save_report)


def test_rerun_embeds_only_new_files_and_is_changed_follows_the_folder(model, run, faces_dir):
    signature = FaceConsistencyScoreFolder.IS_CHANGED(folder=str(run["sample_dir"]), sample_prompts=str(run["prompts"]))
    ProgressBar.instances.clear()
    saved = run["sample_dir"] / "face_report.json"  # its plot lands in the sample folder: not a sample
    first = json.loads(_score(model, run, save_report=str(saved))["result"][0])
    assert ProgressBar.instances[-1].current == 11
    assert json.loads(_score(model, run, save_report=str(saved))["result"][0])["failures"] == first["failures"]
    reencode(faces_dir / "obama2.jpg", run["sample_dir"] / f"face_000700_00_{TIME}_42_000.png")
    changed = FaceConsistencyScoreFolder.IS_CHANGED(folder=str(run["sample_dir"]), sample_prompts=str(run["prompts"]))
    assert changed != signature
    report = json.loads(_score(model, run)["result"][0])
    assert ProgressBar.instances[-1].current == 1  # only the new sample went through the engine
    assert report["by_step"]["700"]["count"] == 1


def test_dir_pair_and_reference_identity(model, faces_dir, comfy_input):
    controls, generated = comfy_input / "controls", comfy_input / "generated"
    reencode(faces_dir / "obama.jpg", controls / "a.png")
    sample = reencode(faces_dir / "obama2.jpg", generated / "a.png")
    reference = model.identity([str(reencode(faces_dir / "obama3.jpg", comfy_input / "ref.png"))])
    out = FaceConsistencyScoreFolder().score_folder(
        model, str(generated), 0.5, control_dir=str(controls), reference_identity=reference
    )
    report = json.loads(out["result"][0])
    pair = report["pairs"][0]
    sample_embedding = model.analyze([sample])[0].embedding
    assert report["metric"] == "reference"
    assert pair["score"] == pytest.approx(float(np.dot(sample_embedding, reference.embedding)), abs=1e-5)
    assert report["secondary"]["valid_pairs"] == 1


def test_missing_folder_is_a_clear_error(model, comfy_input):
    with pytest.raises(Exception, match="is not a folder"):
        FaceConsistencyScoreFolder().score_folder(model, str(comfy_input / "absent"), 0.5)
    with pytest.raises(Exception, match="set 'folder'"):
        FaceConsistencyScoreFolder().score_folder(model, "  ", 0.5)


def test_identity_of_another_embedding_size_is_a_clear_error(model, faces_dir, comfy_input):
    from face_consistency.faceid import Identity

    controls, generated = comfy_input / "controls", comfy_input / "generated"
    reencode(faces_dir / "obama.jpg", controls / "a.png")
    reencode(faces_dir / "obama2.jpg", generated / "a.png")
    vector = np.random.default_rng(1).standard_normal(512).astype(np.float32)
    other = Identity(embedding=vector / np.linalg.norm(vector), count=2)
    with pytest.raises(ValueError, match=f"512-d embeddings but model pack '{model.pack_name}' makes 128-d"):
        FaceConsistencyScoreFolder().score_folder(
            model, str(generated), 0.5, control_dir=str(controls), reference_identity=other
        )


def test_save_report_into_a_folder_or_under_a_file_fails_before_scoring(model, run):
    output = comfy_env.output_directory()
    (output / "taken.json").mkdir()
    (output / "a_file").write_text("keep")
    with pytest.raises(Exception, match=r"save_report .*taken.json is a folder"):
        _score(model, run, save_report="taken.json")
    with pytest.raises(Exception, match=r"save_report .*a_file is a file, not a folder"):
        _score(model, run, save_report="a_file/report.json")
    (output / "plot_taken.png").mkdir()
    with pytest.raises(Exception, match=r"save_report's plot .*plot_taken.png is a folder"):
        _score(model, run, save_report="plot_taken.json")
    assert (output / "a_file").read_text() == "keep"


def test_node_flags_a_sample_that_hands_back_its_control(model, faces_dir, tmp_path):
    set_comfy_base(tmp_path / "comfy")
    folder = comfy_env.output_directory() / "copy_run"
    control = reencode(faces_dir / "obama.jpg", folder / "control.png")
    reencode(faces_dir / "obama.jpg", folder / "sample" / f"face_000100_00_{TIME}_42.png")  # the control again
    (folder / "prompts.txt").write_text(f"an edit --d 42 --ci {control}\n", encoding="utf-8")
    out = FaceConsistencyScoreFolder().score_folder(
        model, str(folder / "sample"), 0.5, sample_prompts=str(folder / "prompts.txt")
    )
    report = json.loads(out["result"][0])
    assert report["pairs"][0]["band"] == "excellent" and report["pairs"][0]["unchanged"]
    assert report["unchanged"]["by_step"] == {"100": 1}
    assert "(1 UNCHANGED)" in out["ui"]["text"][0] and "UNCHANGED: 1 sample(s)" in out["ui"]["text"][0]
