"""`evaluate` with the held-out dlib judge, and the copy-paste gauge, on the real photos and test pack."""

from __future__ import annotations

import json
import shutil

import pytest
from comfy_stubs import set_comfy_base
from evaluate_fixtures import build_musubi_folder, reencode, validate_schema
from face_consistency.faceid.evaluate import EvaluationSources, FolderEvaluation
from face_consistency.faceid.evaluate import cli as evaluate_cli
from face_consistency.faceid.evaluate.plot import PLOT_SIZE, write_plot
from face_consistency.faceid.evaluate.report import REPORT_SCHEMA, summary_table
from face_consistency.faceid.judge import load_judge, verdict
from PIL import Image


@pytest.fixture(scope="module")
def judge():
    return load_judge()


@pytest.fixture(scope="module")
def run(tmp_path_factory, faces_dir):
    return build_musubi_folder(tmp_path_factory.mktemp("musubi_judge"), faces_dir)


@pytest.fixture(scope="module")
def report(model, judge, run):
    sources = EvaluationSources(
        sample_dir=run["sample_dir"], sample_prompts=run["prompts"], base_dir=run["prompts"].parent
    )
    return FolderEvaluation(model, sources, judge=judge).run_round().report


def _pair(report, path):
    return next(p for p in report["pairs"] if p["image"] == str(path))


def test_every_pair_has_the_judges_own_verdict(report, run, judge):
    pair = _pair(report, run["s200_p0"])  # obama3 against the obama control
    expected = verdict(judge.judge(run["s200_p0"]).descriptor, judge.judge(run["control_obama"]).descriptor)
    assert pair["judge"]["control"]["distance"] == pytest.approx(expected.distance, abs=1e-5)
    assert pair["judge_score"] == pytest.approx(expected.similarity, abs=1e-5)
    assert pair["judge"]["control"]["same_person"] and pair["judge"]["face"]["faces_found"] == 1
    # the mirrored biden sample is biden; obama against the biden control is not
    assert _pair(report, run["s100_p1"])["judge"]["control"]["same_person"]
    stranger = _pair(report, run["s200_p1"])["judge"]["control"]
    assert not stranger["same_person"] and stranger["distance"] > 0.6 and stranger["similarity"] < 0.5


def test_judge_statistics_per_step_and_overall(report):
    judge = report["judge"]
    assert judge["metric"] == "control" and judge["model"]["judge"] == "dlib"
    assert judge["valid_pairs"] == report["valid_pairs"] == 6
    assert set(judge["by_step"]) == set(report["by_step"])
    assert judge["same_person"] == 5  # all but obama against the biden control
    assert judge["distance"]["count"] == 6 and 0.0 < judge["distance"]["mean"] < 0.6
    assert validate_schema(report, REPORT_SCHEMA) == []


def test_both_detectors_failures_are_reported_per_item(report, run):
    for key in ("no_face", "corrupt"):
        pair = _pair(report, run[key])
        assert pair["reason"] and pair["judge"]["reason"].startswith("sample: ")
    failed = {f["file"] for f in report["judge"]["failures"]}
    assert {str(run["no_face"]), str(run["corrupt"])} <= failed
    assert "Held-out judge dlib" in summary_table(report)


def test_plot_has_both_curves(report, tmp_path):
    path = tmp_path / "judge.png"
    write_plot(report, path)
    with Image.open(path) as img:
        assert img.size == PLOT_SIZE


def test_cli_judge_flag(run, insightface_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(run["prompts"].parent)
    out = tmp_path / "r.json"
    rc = evaluate_cli.main(
        [
            "--sample_dir",
            "sample",
            "--sample_prompts",
            "prompts.txt",
            "--output_json",
            str(out),
            "--plot",
            str(tmp_path / "r.png"),
            "--judge",
            "dlib",
            "--model_name",
            "testpack",
            "--models_root",
            str(insightface_root),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    saved = json.loads(out.read_text())
    assert saved["judge"]["valid_pairs"] == 6 and "own" in saved["judge"]["model"]["detector"]
    assert "Held-out judge dlib" in capsys.readouterr().out


def test_cli_without_the_judge_installed_names_the_install_command(
    run, insightface_root, tmp_path, capsys, monkeypatch
):
    from face_consistency.faceid import judge as judge_module

    def missing(*_a, **_k):
        raise judge_module.JudgeNotInstalledError(f"the dlib judge needs dlib: {judge_module.INSTALL_HINT}")

    monkeypatch.setattr(evaluate_cli, "load_judge", missing)
    rc = evaluate_cli.main(
        [
            "--sample_dir",
            str(run["sample_dir"]),
            "--judge",
            "dlib",
            "--output_json",
            str(tmp_path / "r.json"),
            "--model_name",
            "testpack",
            "--models_root",
            str(insightface_root),
            "--device",
            "cpu",
        ]
    )
    assert rc == 2 and '[judge]"' in capsys.readouterr().err


# the copy-paste gauge -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gauge_report(model, judge, tmp_path_factory, faces_dir):
    root = tmp_path_factory.mktemp("gauge")
    control = reencode(faces_dir / "obama.jpg", root / "controls" / "alice.png")
    shutil.copy(control, root / "controls" / "bob.png")
    generated = root / "generated"
    generated.mkdir()
    shutil.copy(control, generated / "alice.png")  # the control handed back unchanged
    reencode(faces_dir / "obama3.jpg", generated / "bob.png")  # a real other photo of the person
    references = [
        reencode(faces_dir / n, root / "refs" / n.replace(".jpg", ".png"))
        for n in ("obama.jpg", "obama2.jpg", "obama3.jpg")
    ]
    sources = EvaluationSources(control_dir=root / "controls", generated_dir=generated, references=references)
    return FolderEvaluation(model, sources, judge=judge).run_round().report, generated


def test_gauge_reports_the_reference_photos_own_agreement(gauge_report):
    report, _ = gauge_report
    gauge = report["copy_paste"]
    agreement = gauge["reference_agreement"]
    assert agreement["pairs"] == 3
    assert agreement["mean"] == pytest.approx((0.723 + 0.763 + 0.707) / 3, abs=0.03)  # testdata README figures
    assert 0.6 < gauge["judge_reference_agreement"]["mean"] < 0.75
    assert validate_schema(report, REPORT_SCHEMA) == []


def test_gauge_flags_the_unchanged_copy_only(gauge_report):
    report, generated = gauge_report
    copy, other = _pair(report, generated / "alice.png"), _pair(report, generated / "bob.png")
    assert copy["above_reference_agreement"] and copy["face_change"] < 0.02 and copy["copy_paste"]
    assert other.get("copy_paste") is not True
    assert report["copy_paste"]["flagged"] == [str(generated / "alice.png")]
    assert "COPY-PASTE?" in summary_table(report)


def test_no_gauge_without_two_reference_photos(report):
    assert report["copy_paste"]["reference_agreement"] is None and report["copy_paste"]["flagged_count"] == 0


def test_folder_node_with_the_judge(model, judge, run, tmp_path, monkeypatch):
    from face_consistency.nodes.folder import FaceConsistencyScoreFolder

    set_comfy_base(tmp_path / "comfy")
    scored = tmp_path / "comfy" / "input" / "run"  # nodes read inside ComfyUI's folders only
    shutil.copytree(run["prompts"].parent, scored)
    prompts = scored / run["prompts"].name  # its absolute --ci paths moved along
    prompts.write_text(prompts.read_text().replace(str(run["prompts"].parent), str(scored)))
    monkeypatch.chdir(scored)
    out = FaceConsistencyScoreFolder().score_folder(
        model, str(scored / run["sample_dir"].name), 0.5, sample_prompts=str(prompts), judge=judge
    )
    report = json.loads(out["result"][0])
    assert report["judge"]["valid_pairs"] == 6 and "Held-out judge dlib" in out["ui"]["text"][0]


def test_judge_cache_is_reused_between_evaluations(model, judge, run, tmp_path, monkeypatch):
    sources = dict(sample_dir=run["sample_dir"], sample_prompts=run["prompts"], base_dir=run["prompts"].parent)
    cache = tmp_path / "r.json.judge.json"
    first = FolderEvaluation(model, EvaluationSources(**sources), judge=judge, judge_cache_file=cache).run_round()
    assert cache.is_file()
    calls = []
    monkeypatch.setattr(judge, "judge", lambda *a, **k: calls.append(a))
    again = FolderEvaluation(model, EvaluationSources(**sources), judge=judge, judge_cache_file=cache).run_round()
    assert calls == [] and again.report["judge"]["overall_mean"] == pytest.approx(first.report["judge"]["overall_mean"])
