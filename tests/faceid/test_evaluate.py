"""Folder evaluation on real photos and the real test pack: pairing, statistics, failures,
the three layouts, watch rounds, the embedding cache, the plot and the command line."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from evaluate_fixtures import (
    TIME,
    build_musubi_folder,
    no_face_image,
    reencode,
    validate_schema,
)
from face_consistency.faceid import Bands
from face_consistency.faceid.evaluate import EvaluationError, EvaluationSources, FolderEvaluation, watch
from face_consistency.faceid.evaluate import cli as evaluate_cli
from face_consistency.faceid.evaluate import embedding as embedding_module
from face_consistency.faceid.evaluate.embedding import embed_files
from face_consistency.faceid.evaluate.embedding_store import EmbeddingStore
from face_consistency.faceid.evaluate.pairing import pair_dirs
from face_consistency.faceid.evaluate.plot import PLOT_SIZE, write_plot
from face_consistency.faceid.evaluate.report import REPORT_SCHEMA, summary_table
from face_consistency.musubi_formats.dataset import pair_controls
from PIL import Image


@pytest.fixture(scope="module")
def run(tmp_path_factory, faces_dir):
    return build_musubi_folder(tmp_path_factory.mktemp("musubi"), faces_dir)


@pytest.fixture(scope="module")
def embeddings(model, run):
    """The engine's embedding of every face image of the run, computed one by one."""
    keys = [
        "control_obama",
        "control_biden",
        "control_obama2",
        "s100_p0",
        "s200_p0",
        "s100_p1",
        "s200_p1",
        "s200_p2",
        "e1_p0",
    ]
    return {k: model.analyze([run[k]])[0].embedding for k in keys}


@pytest.fixture(scope="module")
def musubi_report(model, run):
    sources = EvaluationSources(
        sample_dir=run["sample_dir"], sample_prompts=run["prompts"], base_dir=run["prompts"].parent
    )
    return FolderEvaluation(model, sources, threshold=0.5).run_round().report


def _cos(a, b):
    return float(np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b)))


def _pair(report, path):
    return next(p for p in report["pairs"] if p["image"] == str(path))


# musubi folder ----------------------------------------------------------------------------


def test_musubi_pairs_scores_match_independent_embeddings(musubi_report, run, embeddings):
    e = embeddings
    expected = {
        "s100_p0": _cos(e["s100_p0"], e["control_obama"]),
        "s200_p0": _cos(e["s200_p0"], e["control_obama"]),
        "s100_p1": _cos(e["s100_p1"], e["control_biden"]),
        "s200_p1": _cos(e["s200_p1"], e["control_biden"]),
        "e1_p0": _cos(e["e1_p0"], e["control_obama"]),
    }
    two = e["control_obama"] / np.linalg.norm(e["control_obama"]) + e["control_obama2"] / np.linalg.norm(
        e["control_obama2"]
    )
    expected["s200_p2"] = _cos(e["s200_p2"], two)  # several --ci: identity from all of them
    for key, score in expected.items():
        pair = _pair(musubi_report, run[key])
        assert pair["status"] == "ok", pair
        assert pair["score"] == pytest.approx(score, abs=1e-5), key
    assert _pair(musubi_report, run["s200_p2"])["controls"] == [str(run["control_obama"]), str(run["control_obama2"])]
    # same person scores above a different person
    assert expected["s100_p1"] > 0.5 > expected["s200_p1"]


def test_musubi_grouping_and_statistics(musubi_report, run):
    pairs = {
        k: _pair(musubi_report, run[k])["score"]
        for k in ("s100_p0", "s200_p0", "s100_p1", "s200_p1", "s200_p2", "e1_p0")
    }
    groups = {
        "100": [pairs["s100_p0"], pairs["s100_p1"]],
        "200": [pairs["s200_p0"], pairs["s200_p1"], pairs["s200_p2"]],
        "e1": [pairs["e1_p0"]],
    }
    assert list(musubi_report["by_step"]) == ["100", "200", "e1"]  # steps in order, epoch keys apart
    for key, values in groups.items():
        stats = musubi_report["by_step"][key]
        assert stats["count"] == len(values)
        assert stats["mean"] == pytest.approx(np.mean(values))
        assert stats["std"] == pytest.approx(np.std(values))
        assert (stats["min"], stats["max"]) == (pytest.approx(min(values)), pytest.approx(max(values)))
        assert stats["at_or_above_threshold"] == sum(v >= 0.5 for v in values)
    everything = [v for vs in groups.values() for v in vs]
    assert musubi_report["valid_pairs"] == 6
    assert musubi_report["overall_mean"] == pytest.approx(np.mean(everything))
    assert musubi_report["overall_std"] == pytest.approx(np.std(everything))
    assert musubi_report["overall_min"] == pytest.approx(min(everything))
    assert musubi_report["overall_max"] == pytest.approx(max(everything))
    assert musubi_report["by_prompt"]["0"]["count"] == 3 and musubi_report["by_prompt"]["2"]["count"] == 1
    assert musubi_report["by_prompt_step"]["1"]["200"]["mean"] == pytest.approx(pairs["s200_p1"])


def test_musubi_failures_are_listed_with_reasons(musubi_report, run):
    failures = {(f["file"], f["kind"]): f["reason"] for f in musubi_report["failures"]}
    assert "no face" in failures[(str(run["no_face"]), "pair")]
    assert "not an image" in failures[(str(run["corrupt"]), "pair")]
    assert "not found" in failures[(str(run["lost_control"]), "sample")]
    assert "does_not_exist.png" in failures[("controls/does_not_exist.png", "control")]
    assert "no sample pattern" in failures[(str(run["stray"]), "sample")]
    assert musubi_report["total_pairs"] == 8  # 6 scored + no face + corrupt
    assert musubi_report["failure_count"] == len(musubi_report["failures"]) == 5
    no_face = _pair(musubi_report, run["no_face"])
    assert (no_face["status"], no_face["score"], no_face["face"]) == ("failed", None, None)


def test_report_matches_schema_and_metadata(musubi_report, model):
    assert validate_schema(musubi_report, REPORT_SCHEMA) == []
    assert musubi_report["embedding_size"] == 128 and musubi_report["provider"] == model.provider
    assert musubi_report["model"]["pack"] == "testpack"
    assert musubi_report["bands"] == Bands().to_dict() and musubi_report["threshold"] == 0.5
    json.dumps(musubi_report)  # serialisable as is
    table = summary_table(musubi_report)
    assert "e1" in table and "6 of 8 pairs scored" in table


def test_relative_ci_resolves_from_working_directory_first(model, run, tmp_path, faces_dir):
    # musubi opens --ci relative to its working directory; a file there wins over the prompt folder.
    reencode(faces_dir / "biden.jpg", tmp_path / "controls" / "obama.png")
    sources = EvaluationSources(sample_dir=run["sample_dir"], sample_prompts=run["prompts"], base_dir=tmp_path)
    report = FolderEvaluation(model, sources).run_round().report
    assert _pair(report, run["s100_p0"])["controls"] == [str(tmp_path / "controls" / "obama.png")]


def test_reference_scored_beside_control(model, run, faces_dir, tmp_path, embeddings):
    reference = reencode(faces_dir / "obama2.jpg", tmp_path / "ref.png")
    sources = EvaluationSources(sample_dir=run["sample_dir"], sample_prompts=run["prompts"], references=[reference])
    report = FolderEvaluation(model, sources).run_round().report
    ref = model.analyze([reference])[0].embedding
    pair = _pair(report, run["s200_p0"])
    assert report["metric"] == "reference" and pair["score"] == pytest.approx(
        _cos(embeddings["s200_p0"], ref), abs=1e-5
    )
    assert pair["score_control"] == pytest.approx(_cos(embeddings["s200_p0"], embeddings["control_obama"]), abs=1e-5)
    assert report["secondary"]["metric"] == "control" and report["secondary"]["valid_pairs"] == 6
    # with a reference, the sample whose control is missing is still scored
    assert _pair(report, run["lost_control"])["status"] == "ok"
    assert validate_schema(report, REPORT_SCHEMA) == []


def test_reference_without_face_is_a_bad_argument(model, run, tmp_path):
    sources = EvaluationSources(sample_dir=run["sample_dir"], references=[no_face_image(tmp_path / "blank.png")])
    with pytest.raises(EvaluationError, match="blank.png: no face"):
        FolderEvaluation(model, sources)


# the other layouts -----------------------------------------------------------------------


def test_seed_guide_layout(model, faces_dir, tmp_path):
    reencode(faces_dir / "obama.jpg", tmp_path / "control_image_0.png")
    reencode(faces_dir / "biden.jpg", tmp_path / "control_image_1.png")
    a = reencode(faces_dir / "obama2.jpg", tmp_path / "sample_step_100_0.png")
    b = reencode(faces_dir / "biden.jpg", tmp_path / "sample_step_100_1.png", mirror=True)
    c = reencode(faces_dir / "obama3.jpg", tmp_path / "sample_step_200_0.png")
    orphan = reencode(faces_dir / "obama3.jpg", tmp_path / "sample_step_200_5.png")
    report = FolderEvaluation(model, EvaluationSources(sample_dir=tmp_path)).run_round().report
    assert {p["image"]: p["controls"] for p in report["pairs"]} == {
        str(a): [str(tmp_path / "control_image_0.png")],
        str(b): [str(tmp_path / "control_image_1.png")],
        str(c): [str(tmp_path / "control_image_0.png")],
    }
    assert list(report["by_step"]) == ["100", "200"] and report["by_step"]["100"]["count"] == 2
    assert [f["file"] for f in report["failures"]] == [str(orphan)]
    assert "control_image_5.png not found" in report["failures"][0]["reason"]


def test_dir_pair_mode_with_numbered_controls(model, faces_dir, tmp_path):
    controls, generated = tmp_path / "controls", tmp_path / "generated"
    reencode(faces_dir / "obama.jpg", controls / "alice.png")
    reencode(faces_dir / "obama.jpg", controls / "bob_0.png")
    reencode(faces_dir / "obama2.jpg", controls / "bob_1.jpg")
    reencode(faces_dir / "biden.jpg", controls / "bob_extra.png")  # not a numbered control: unclaimed
    reencode(faces_dir / "obama3.jpg", generated / "alice.png")
    bob = reencode(faces_dir / "obama3.jpg", generated / "bob.png")
    reencode(faces_dir / "obama3.jpg", generated / "carol.png")
    report = (
        FolderEvaluation(model, EvaluationSources(control_dir=controls, generated_dir=generated)).run_round().report
    )
    pair = _pair(report, bob)
    assert pair["controls"] == [str(controls / "bob_0.png"), str(controls / "bob_1.jpg")]
    two = sum(r.embedding for r in model.analyze(pair["controls"]))
    assert pair["score"] == pytest.approx(_cos(model.analyze([bob])[0].embedding, two), abs=1e-5)
    assert report["valid_pairs"] == 2 and list(report["by_step"]) == ["none"]
    failures = {Path(f["file"]).name: f["kind"] for f in report["failures"]}
    assert failures == {"carol.png": "sample", "bob_extra.png": "control"}


def test_dir_pairs_follow_the_trainers_control_rule(tmp_path):
    """One rule for the evaluation's folder pairs and the trainer's dataset: `a_1.png` is a
    numbered control of `a` and the same-name control of a generated `a_1`."""
    controls, generated = tmp_path / "controls", tmp_path / "generated"
    files = {
        controls: ("a.png", "a_2.jpg", "a_1.png", "b_10.png", "b_9.png", "x.png"),
        generated: ("a.png", "a_1.png", "b.png"),
    }
    for folder, names in files.items():
        folder.mkdir()
        for name in names:
            (folder / name).write_bytes(b"")
    pairing = pair_dirs(controls, generated)
    assert {i.image.name: [c.name for c in i.controls] for i in pairing.items} == {
        "a.png": ["a.png", "a_1.png", "a_2.jpg"],
        "a_1.png": ["a_1.png"],
        "b.png": ["b_9.png", "b_10.png"],
    }
    assert [(Path(u.file).name, u.kind) for u in pairing.unpaired] == [("x.png", "control")]
    trainer_rule = pair_controls([generated / n for n in ("a.png", "a_1.png", "b.png")], controls)
    assert {t.name: [c.name for c in found] for t, found in trainer_rule.items()} == {
        i.image.name: [c.name for c in i.controls] for i in pairing.items
    }


# watch rounds and the cache -------------------------------------------------------------


def _copy_run(run, target: Path) -> tuple[Path, Path]:
    shutil.copytree(run["sample_dir"].parent, target)
    return target / "sample", target / "prompts.txt"


def test_watch_rounds_embed_only_new_and_changed_files(model, run, tmp_path, faces_dir):
    sample, prompts = _copy_run(run, tmp_path / "run")
    cache = tmp_path / "report.json.embeddings.json"
    sources = EvaluationSources(sample_dir=sample, sample_prompts=prompts, base_dir=tmp_path / "run")
    evaluation = FolderEvaluation(model, sources, cache_file=cache)
    first = evaluation.run_round()
    assert first.embedded == 11 and first.report["valid_pairs"] == 6  # 8 samples + 3 controls
    new = reencode(faces_dir / "obama2.jpg", sample / f"face_000400_00_{TIME}_42_000.png")
    second = evaluation.run_round()
    assert (second.embedded, second.reused) == (1, 11)
    assert second.report["by_step"]["400"]["count"] == 1 and second.report["valid_pairs"] == 7
    # a rewritten file (here: the corrupt one becomes a real image) is embedded again
    shutil.copyfile(new, sample / run["corrupt"].name)
    third = evaluation.run_round()
    assert third.embedded == 1 and third.report["valid_pairs"] == 8
    # a fresh evaluation (the next command run) reuses the cache file: nothing to embed
    again = FolderEvaluation(model, sources, cache_file=cache).run_round()
    assert again.embedded == 0 and again.report["overall_mean"] == pytest.approx(third.report["overall_mean"])


def test_interrupted_embedding_keeps_the_faces_found_so_far(model, faces_dir):
    """Ctrl-C while files are waiting for a recognizer batch: they are embedded and kept."""
    paths = [faces_dir / name for name in ("obama.jpg", "biden.jpg", "obama2.jpg", "obama3.jpg")]
    store = EmbeddingStore("test", model.embedding_size)

    class InterruptedBar:
        updates = 0

        def update(self, n=1):
            self.updates += n
            if self.updates == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_files(model, paths, store, InterruptedBar())
    assert [store.get(p) is not None and store.get(p).ok for p in paths] == [True, True, True, False]
    assert embed_files(model, paths, store) == 1  # the next round embeds only the last one


def test_corrupt_or_foreign_cache_is_rebuilt(model, run, tmp_path):
    sample, prompts = _copy_run(run, tmp_path / "run")
    sources = EvaluationSources(sample_dir=sample, sample_prompts=prompts, base_dir=tmp_path / "run")
    cache = tmp_path / "cache.json"
    cache.write_text('{"format": "face-consistency-embeddings/1", "fingerprint": "x", "entries": [')
    evaluation = FolderEvaluation(model, sources, cache_file=cache)
    assert "not used" in evaluation.store.discarded_reason
    assert evaluation.run_round().embedded == 11
    data = json.loads(cache.read_text())
    data["fingerprint"] = "another model"
    cache.write_text(json.dumps(data))
    stale = FolderEvaluation(model, sources, cache_file=cache)
    assert "another model pack" in stale.store.discarded_reason and stale.run_round().embedded == 11
    data = json.loads(cache.read_text())
    entry = next(e for e in data["entries"] if e["embedding"])
    entry["embedding"] = "AAAAAAAAAAA="  # two floats instead of 128: not trusted, embedded again
    cache.write_text(json.dumps(data))
    again = FolderEvaluation(model, sources, cache_file=cache)
    assert "1 of 11 entries" in again.store.discarded_reason and again.run_round().embedded == 1


def test_watch_loop_picks_up_files_between_rounds(model, run, tmp_path, faces_dir):
    sample, prompts = _copy_run(run, tmp_path / "run")
    evaluation = FolderEvaluation(
        model, EvaluationSources(sample_dir=sample, sample_prompts=prompts, base_dir=tmp_path / "run")
    )
    rounds = []
    added = iter([f"face_000500_00_{TIME}_000.png", f"face_000600_01_{TIME}_000.png"])

    def sleep(seconds):
        assert seconds == 5
        reencode(faces_dir / "obama2.jpg", sample / next(added))

    assert watch(evaluation, 5, rounds.append, max_rounds=3, sleep=sleep) == 3
    assert [r.embedded for r in rounds] == [11, 1, 1]
    assert list(rounds[-1].report["by_step"]) == ["100", "200", "500", "600", "e1"]


# plot and command line -------------------------------------------------------------------


def test_plot_is_a_png_of_the_documented_size(musubi_report, tmp_path):
    path = tmp_path / "plot.png"
    write_plot(musubi_report, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        assert img.size == PLOT_SIZE
    empty = dict(musubi_report, by_step={}, by_prompt_step={}, valid_pairs=0)
    write_plot(empty, path)
    with Image.open(path) as img:
        assert img.size == PLOT_SIZE


def _cli(*args: str) -> int:
    return evaluate_cli.main(list(args))


def _model_args(root: Path) -> list[str]:
    return ["--model_name", "testpack", "--models_root", str(root), "--device", "cpu"]


def test_cli_writes_report_and_plot(run, insightface_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(run["prompts"].parent)
    out, plot = tmp_path / "r.json", tmp_path / "r.png"
    rc = _cli(
        "--sample_dir",
        "sample",
        "--sample_prompts",
        "prompts.txt",
        "--output_json",
        str(out),
        "--plot",
        str(plot),
        "--threshold",
        "0.5",
        *_model_args(insightface_root),
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["valid_pairs"] == 6 and validate_schema(report, REPORT_SCHEMA) == []
    with Image.open(plot) as img:
        assert img.size == PLOT_SIZE
    printed = capsys.readouterr().out
    assert "mean ± std" in printed and "6 of 8 pairs scored" in printed
    assert not list(tmp_path.glob("*.embeddings.json"))  # the cache file is a watch-mode thing


def test_cli_exit_codes(run, insightface_root, tmp_path, capsys):
    model = _model_args(insightface_root)
    assert _cli(*model) == 2  # nothing to score given
    assert _cli("--sample_dir", str(tmp_path / "nope"), *model) == 2
    assert _cli("--sample_dir", str(run["sample_dir"]), "--sample_prompts", str(tmp_path / "nope.txt"), *model) == 2
    assert (
        _cli("--sample_dir", str(run["sample_dir"]), "--model_name", "no_such_pack", "--models_root", str(tmp_path))
        == 2
    )
    assert "not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "empty.json"
    assert _cli("--sample_dir", str(empty), "--output_json", str(out), "--quiet", *model) == 1
    assert json.loads(out.read_text())["total_pairs"] == 0
    assert capsys.readouterr().out == ""  # --quiet
    # samples but no prompt file: every sample reported unpaired
    assert _cli("--sample_dir", str(run["sample_dir"]), "--output_json", str(out), "--quiet", *model) == 1
    assert all(
        "no --sample_prompts" in f["reason"] or "pattern" in f["reason"]
        for f in json.loads(out.read_text())["failures"]
    )
    assert _cli("--sample_dir", str(run["sample_dir"]), "--watch", "0", *model) == 2


def test_cli_watch_stops_cleanly_on_ctrl_c(run, insightface_root, tmp_path, monkeypatch):
    sample, prompts = _copy_run(run, tmp_path / "run")
    monkeypatch.chdir(tmp_path / "run")
    rounds = []

    def interrupted_sleep(seconds):
        rounds.append(seconds)
        if len(rounds) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr("face_consistency.faceid.evaluate.folder_evaluation.time.sleep", interrupted_sleep)
    out = tmp_path / "watch.json"
    rc = _cli(
        "--sample_dir",
        str(sample),
        "--sample_prompts",
        str(prompts),
        "--output_json",
        str(out),
        "--watch",
        "7",
        "--quiet",
        *_model_args(insightface_root),
    )
    assert rc == 0 and rounds == [7, 7]
    report = json.loads(out.read_text())
    assert report["valid_pairs"] == 6 and validate_schema(report, REPORT_SCHEMA) == []
    cache = tmp_path / "watch.json.embeddings.json"
    assert len(json.loads(cache.read_text())["entries"]) == 11


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_watch_process_stops_cleanly_on_a_real_signal(run, insightface_root, tmp_path, stop_signal):
    sample, prompts = _copy_run(run, tmp_path / "run")
    out = tmp_path / "live.json"
    command = [
        sys.executable,
        "-m",
        "face_consistency",
        "evaluate",
        "--sample_dir",
        str(sample),
        "--sample_prompts",
        str(prompts),
        "--ci_base_dir",
        str(tmp_path / "run"),
        "--output_json",
        str(out),
        "--watch",
        "1",
        "--quiet",
        *_model_args(insightface_root),
    ]
    # a shell's background jobs ignore SIGINT; give the child Python's usual Ctrl-C handling
    process = subprocess.Popen(command, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not out.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert out.exists(), "no report written by the first round"
        process.send_signal(stop_signal)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    report = json.loads(out.read_text())
    assert report["valid_pairs"] == 6 and validate_schema(report, REPORT_SCHEMA) == []


# a sample that hands back its control ---------------------------------------------------------


@pytest.fixture(scope="module")
def unchanged_report(model, tmp_path_factory, faces_dir):
    """No reference photos: a copy of the control (step 100), the control re-encoded as JPEG q50 (step 200)
    and a real other photo of the person (step 200), all against the same obama control."""
    root = tmp_path_factory.mktemp("unchanged")
    control = reencode(faces_dir / "obama.jpg", root / "controls" / "obama.png")
    (root / "prompts.txt").write_text("make him smile --d 42 --ci controls/obama.png\n", encoding="utf-8")
    sample = root / "sample"
    sample.mkdir()
    paths = {
        "copy": sample / f"face_000100_00_{TIME}_42.png",
        "jpeg": sample / f"face_000200_00_{TIME}_42.png",
        "other": sample / f"face_000200_00_{TIME}_43.png",
    }
    shutil.copy(control, paths["copy"])
    with Image.open(control) as img:
        img.save(root / "control.jpg", quality=50)
    with Image.open(root / "control.jpg") as img:
        img.save(paths["jpeg"])
    reencode(faces_dir / "obama3.jpg", paths["other"])
    sources = EvaluationSources(sample_dir=sample, sample_prompts=root / "prompts.txt", base_dir=root)
    return FolderEvaluation(model, sources).run_round().report, paths


def test_a_copy_of_the_control_is_flagged_without_references(unchanged_report):
    report, paths = unchanged_report
    pairs = {p["image"]: p for p in report["pairs"]}
    copy, jpeg, other = (pairs[str(paths[k])] for k in ("copy", "jpeg", "other"))
    assert copy["score"] == pytest.approx(1.0, abs=1e-4) and copy["band"] == "excellent"
    assert copy["unchanged"] and copy["face_change"] < 0.01
    assert jpeg["unchanged"] and jpeg["score"] > 0.97 and jpeg["face_change"] < 0.10
    # a real other photo scores far below the measuring floor: its change is not measured, never flagged
    assert other["score"] < 0.9 and "unchanged" not in other and "face_change" not in other
    assert "copy_paste" not in copy  # the copy-paste gauge needs reference photos
    unchanged = report["unchanged"]
    assert unchanged["count"] == 2 and unchanged["by_step"] == {"100": 1, "200": 1}
    assert unchanged["samples"] == [str(paths["copy"]), str(paths["jpeg"])]
    assert validate_schema(report, REPORT_SCHEMA) == []
    table = summary_table(report)
    step_rows = {
        line.split()[0]: line for line in table.splitlines() if line.split() and line.split()[0] in ("100", "200")
    }
    assert step_rows["100"].endswith("(1 UNCHANGED)") and step_rows["200"].endswith("(1 UNCHANGED)")
    assert "UNCHANGED: 2 sample(s)" in table


def test_the_guard_decodes_no_file_twice_and_measures_what_a_new_decode_does(
    model, unchanged_report, tmp_path, monkeypatch
):
    """The guard compares the views each file's embedding kept; a file whose result comes from the cache file
    is decoded again for it. Both give the same figures (the first round's are the fixture's)."""
    report, paths = unchanged_report
    root = paths["copy"].parent.parent
    sources = EvaluationSources(sample_dir=root / "sample", sample_prompts=root / "prompts.txt", base_dir=root)
    decoded = []
    original = embedding_module.load_image_sized
    monkeypatch.setattr(
        embedding_module, "load_image_sized", lambda path, **options: decoded.append(path) or original(path, **options)
    )
    cache = tmp_path / "cache.json"
    fresh = FolderEvaluation(model, sources, cache_file=cache).run_round().report
    assert len(decoded) == len(set(decoded)) == 4  # the control and three samples, once each
    decoded.clear()
    cached = FolderEvaluation(model, sources, cache_file=cache).run_round()
    assert cached.embedded == 0 and len(decoded) == 4  # the guard's two pairs, from the files
    changes = [{p["image"]: p.get("face_change") for p in r["pairs"]} for r in (report, fresh, cached.report)]
    assert changes[0] == changes[1] == changes[2]
    assert changes[0][str(paths["copy"])] is not None


def test_the_plot_marks_unchanged_samples(unchanged_report, tmp_path):
    report, _ = unchanged_report
    marked, unmarked = tmp_path / "marked.png", tmp_path / "unmarked.png"
    write_plot(report, marked)
    write_plot(dict(report, unchanged=dict(report["unchanged"], by_step={})), unmarked)
    with Image.open(marked) as a, Image.open(unmarked) as b:
        assert a.size == b.size == PLOT_SIZE
        red = [
            np.sum((arr[..., 0] > 200) & (arr[..., 1] < 80) & (arr[..., 2] < 80))
            for arr in (np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))
        ]
    assert red[0] > 50 and red[1] == 0  # tab:red crosses and counts only where samples are unchanged
