"""`evaluate` and its embedding cache against bad input and faults: real altered files, real
processes and signals; each case gives one clear message (exit 2 for bad input) and loses nothing."""

from __future__ import annotations

import base64
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from evaluate_fixtures import reencode
from face_consistency.faceid.evaluate import EvaluationSources, FolderEvaluation
from face_consistency.faceid.evaluate import cli as evaluate_cli
from face_consistency.faceid.evaluate.embedding_store import FileFaces
from PIL import Image
from unprivileged import run_with_permissions


@pytest.fixture()
def pairs(tmp_path, faces_dir) -> tuple[Path, Path]:
    """Two controls and their two generated images (folder pair layout): (control_dir, generated_dir)."""
    controls, generated = tmp_path / "controls", tmp_path / "generated"
    for name, control, sample in (("a", "obama.jpg", "obama2.jpg"), ("b", "biden.jpg", "obama3.jpg")):
        reencode(faces_dir / control, controls / f"{name}.png")
        reencode(faces_dir / sample, generated / f"{name}.png")
    return controls, generated


def _model_args(root: Path) -> list[str]:
    return ["--model_name", "testpack", "--models_root", str(root), "--device", "cpu"]


# the embedding cache: checked, not trusted -----------------------------------------------


def _rewrite_entry(cache: Path, path: Path, change, keep_checksum_valid: bool) -> None:
    """Alter one entry of a real cache file; optionally recompute its checksum (a consistent forgery)."""
    data = json.loads(cache.read_text())
    entry = next(e for e in data["entries"] if e["path"] == str(path))
    change(entry)
    if keep_checksum_valid:
        content = {k: v for k, v in entry.items() if k != "checksum"}
        entry["checksum"] = FileFaces(**_fields(content)).to_json()["checksum"]
    cache.write_text(json.dumps(data))


def _fields(content: dict) -> dict:
    embedding = content["embedding"]
    vector = None if embedding is None else np.frombuffer(base64.b64decode(embedding), "<f4").astype(np.float32)
    return {
        **content,
        "embedding": vector,
        "image_size": tuple(content["image_size"]) if content["image_size"] else None,
    }


def _scaled(factor: float):
    def change(entry):
        vector = np.frombuffer(base64.b64decode(entry["embedding"]), "<f4") * np.float32(factor)
        entry["embedding"] = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")

    return change


def _flip_one_character(entry):
    text = entry["embedding"]
    entry["embedding"] = text[:10] + ("B" if text[10] != "B" else "C") + text[11:]


def _nan(entry):
    vector = np.frombuffer(base64.b64decode(entry["embedding"]), "<f4").copy()
    vector[3] = np.nan
    entry["embedding"] = base64.b64encode(vector.tobytes()).decode("ascii")


@pytest.mark.parametrize(
    "change, forged, expected",
    [
        (_flip_one_character, False, "checksum does not match"),
        (_scaled(50.0), False, "checksum does not match"),
        (_scaled(50.0), True, "has length 50, not 1"),
        (_scaled(0.0), True, "all zeros"),
        (_nan, True, "NaN or infinite"),
    ],
    ids=["flipped-base64", "times-50", "times-50-forged", "all-zero-forged", "nan-forged"],
)
def test_altered_cache_entry_is_embedded_again(model, pairs, tmp_path, change, forged, expected):
    controls, generated = pairs
    sources = EvaluationSources(control_dir=controls, generated_dir=generated)
    cache = tmp_path / "cache.json"
    first = FolderEvaluation(model, sources, cache_file=cache).run_round()
    assert first.embedded == 4
    _rewrite_entry(cache, controls / "a.png", change, forged)
    again = FolderEvaluation(model, sources, cache_file=cache)
    reason = again.store.discarded_reason
    assert f"1 of 4 entries of embedding cache {cache}" in reason and str(controls / "a.png") in reason
    assert expected in reason
    second = again.run_round()
    assert (second.embedded, second.reused) == (1, 3)  # only the altered entry, the rest is kept
    assert [p["score_control"] for p in second.report["pairs"]] == [p["score_control"] for p in first.report["pairs"]]
    assert second.report["cache"]["discarded"] == reason


def test_cli_watch_with_an_all_zero_cache_entry_scores_as_before(
    insightface_root, pairs, tmp_path, capsys, caplog, monkeypatch
):
    controls, generated = pairs
    out = tmp_path / "report.json"
    args = [
        "--control_dir",
        str(controls),
        "--generated_dir",
        str(generated),
        "--output_json",
        str(out),
        "--watch",
        "5",
        *_model_args(insightface_root),
    ]

    def one_round(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr("face_consistency.faceid.evaluate.folder_evaluation.time.sleep", one_round)
    assert evaluate_cli.main(args) == 0
    before = json.loads(out.read_text())
    cache = tmp_path / "report.json.embeddings.json"
    _rewrite_entry(cache, generated / "b.png", _scaled(0.0), keep_checksum_valid=True)
    capsys.readouterr()
    caplog.clear()
    assert evaluate_cli.main(args) == 0
    warned = [r.getMessage() for r in caplog.records if "embedded again" in r.getMessage()]
    assert len(warned) == 1 and "its embedding is all zeros" in warned[0], caplog.text  # said once, as a warning
    assert "embedded again" not in capsys.readouterr().out
    after = json.loads(out.read_text())
    assert [p["score_control"] for p in after["pairs"]] == [p["score_control"] for p in before["pairs"]]


# bad arguments: one message, exit 2, nothing written --------------------------------------


def _evaluate(pairs, root, *extra: str) -> int:
    controls, generated = pairs
    return evaluate_cli.main(
        ["--control_dir", str(controls), "--generated_dir", str(generated), "--quiet", *_model_args(root), *extra]
    )


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("face-consistency evaluate: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_watch_needs_a_finite_positive_interval(insightface_root, pairs, tmp_path, capsys, value):
    out = tmp_path / "r.json"
    assert _evaluate(pairs, insightface_root, "--output_json", str(out), "--watch", value) == 2
    line = _error_line(capsys)
    assert "--watch must be " in line and f"got {value}" in line and "above 0" in line
    assert not out.exists()


def test_output_paths_that_cannot_be_files(insightface_root, pairs, tmp_path, capsys):
    folder = tmp_path / "existing_folder"
    folder.mkdir()
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("keep me")
    cases = [
        (["--output_json", str(folder)], f"--output_json {folder} is a folder"),
        (["--output_json", str(a_file / "r.json")], f"{a_file} is a file, not a folder"),
        (["--output_json", str(tmp_path / "r.json"), "--plot", str(folder)], f"--plot {folder} is a folder"),
        (
            ["--output_json", str(tmp_path / "r.json"), "--plot", str(a_file / "sub" / "p.png")],
            f"--plot {a_file / 'sub' / 'p.png'}: {a_file} is a file",
        ),
    ]
    for args, message in cases:
        assert _evaluate(pairs, insightface_root, *args) == 2
        assert message in _error_line(capsys)
    cache_dir = tmp_path / "w.json.embeddings.json"
    cache_dir.mkdir()
    assert _evaluate(pairs, insightface_root, "--output_json", str(tmp_path / "w.json"), "--watch", "1") == 2
    assert f"the embedding cache (beside --output_json) {cache_dir} is a folder" in _error_line(capsys)
    assert a_file.read_text() == "keep me" and not (tmp_path / "r.json").exists() and not (tmp_path / "w.json").exists()


def test_empty_model_name_says_so(insightface_root, pairs, tmp_path, capsys):
    assert _evaluate(pairs, insightface_root, "--output_json", str(tmp_path / "r.json"), "--model_name", "") == 2
    assert "--model_name is empty" in _error_line(capsys)


@pytest.mark.parametrize("item", ["5", "null", '["a", "b"]', "true"])
def test_json_prompt_items_that_are_not_objects(insightface_root, run_dir, tmp_path, capsys, item):
    sample_dir, prompts = run_dir
    bad = prompts.with_suffix(".json")
    bad.write_text(f'[{{"prompt": "an edit", "control_image_path": ["x.png"]}}, {item}]')
    rc = evaluate_cli.main(
        [
            "--sample_dir",
            str(sample_dir),
            "--sample_prompts",
            str(bad),
            "--output_json",
            str(tmp_path / "r.json"),
            "--quiet",
            *_model_args(insightface_root),
        ]
    )
    assert rc == 2
    line = _error_line(capsys)
    assert f"prompt file {bad}: item 1 is {json.dumps(json.loads(item))}, not a prompt" in line
    assert "each item must be an object" in line


@pytest.fixture()
def run_dir(tmp_path, faces_dir):
    from evaluate_fixtures import one_sample_run

    sample_dir, _, prompts = one_sample_run(tmp_path, faces_dir)
    return sample_dir, prompts


# permissions: as a user the mode bits apply to -----------------------------------------


@pytest.fixture()
def perm_tree(tmp_path, faces_dir, testpack_dir):
    """A folder pair, a copy of the test pack (its mode bits are the test's to change) and an output folder."""
    reencode(faces_dir / "obama.jpg", tmp_path / "controls" / "a.png")
    reencode(faces_dir / "obama2.jpg", tmp_path / "generated" / "a.png")
    pack = tmp_path / "models" / "copied"
    pack.mkdir(parents=True)
    for onnx in testpack_dir.iterdir():
        shutil.copyfile(onnx, pack / onnx.name)
    (tmp_path / "out").mkdir()
    yield tmp_path
    for path in [pack, tmp_path / "out", *pack.iterdir()]:
        path.chmod(0o755)  # so that pytest can remove them


def _evaluate_with_permissions(root: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_with_permissions(
        [
            sys.executable,
            "-m",
            "face_consistency",
            "evaluate",
            "--control_dir",
            str(root / "controls"),
            "--generated_dir",
            str(root / "generated"),
            "--model_name",
            "copied",
            "--models_root",
            str(root),
            "--device",
            "cpu",
            "--quiet",
            *extra,
        ],
    )


def test_read_only_output_folder(perm_tree):
    read_only = perm_tree / "out"
    read_only.chmod(0o555)
    done = _evaluate_with_permissions(perm_tree, "--output_json", str(read_only / "r.json"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"--output_json {read_only / 'r.json'}: no permission to write in {read_only}" in done.stderr
    read_only.chmod(0o755)
    done = _evaluate_with_permissions(perm_tree, "--output_json", str(read_only / "r.json"))
    assert done.returncode == 0, done.stderr
    assert json.loads((read_only / "r.json").read_text())["valid_pairs"] == 1


def test_pack_folder_without_read_permission(perm_tree):
    pack = perm_tree / "models" / "copied"
    pack.chmod(0o311)  # enterable, not listable
    done = _evaluate_with_permissions(perm_tree, "--output_json", str(perm_tree / "out" / "r.json"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"model pack folder {pack}: permission denied" in done.stderr
    assert not (perm_tree / "out" / "r.json").exists()


def test_onnx_file_without_read_permission(perm_tree):
    recognizer = perm_tree / "models" / "copied" / "mobilefacenet.onnx"
    recognizer.chmod(0o200)
    done = _evaluate_with_permissions(perm_tree, "--output_json", str(perm_tree / "out" / "r.json"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"cannot read ONNX model {recognizer}: permission denied" in done.stderr
    assert "corrupt" not in done.stderr


# interrupts: the second Ctrl-C waits for the write in progress -----------------------------


def test_two_ctrl_c_in_watch_mode_still_write_report_and_cache(insightface_root, faces_dir, tmp_path):
    controls, generated = tmp_path / "controls", tmp_path / "generated"
    photos = ["obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg"]
    for i in range(24):  # a first round long enough to be interrupted while it embeds
        reencode(faces_dir / photos[i % 4], controls / f"s{i:02d}.png")
        reencode(faces_dir / photos[(i + 1) % 4], generated / f"s{i:02d}.png", mirror=True)
    out, plot = tmp_path / "live.json", tmp_path / "live.png"
    command = [
        sys.executable,
        "-m",
        "face_consistency",
        "evaluate",
        "--control_dir",
        str(controls),
        "--generated_dir",
        str(generated),
        "--output_json",
        str(out),
        "--plot",
        str(plot),
        "--watch",
        "30",
        *_model_args(insightface_root),
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # Ctrl-C as in a terminal
    )
    try:
        for line in process.stdout:
            if line.startswith("watching every"):
                break
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        time.sleep(0.3)  # the final write (cache, report, plot) takes about a second here
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert "Traceback" not in stderr and "stopped; report written" in stdout
    assert "writing the report and cache; one moment" in stderr  # the second Ctrl-C came during the write
    report = json.loads(out.read_text())
    assert report["total_pairs"] == 24
    scored = [p for p in report["pairs"] if p["score_control"] is not None]
    assert process.returncode == (0 if scored else 1), stderr  # 1: stopped before any pair was scored
    cache = json.loads((tmp_path / "live.json.embeddings.json").read_text())
    assert cache["entries"]
    assert len(cache["entries"]) >= 2 * len(scored)  # every scored pair's two files are in the cache
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# formats the engine cannot read: listed, never dropped ---------------------------------


def test_gif_and_heic_samples_are_listed_as_failures(model, pairs, tmp_path, faces_dir, run_dir):
    controls, generated = pairs
    with Image.open(faces_dir / "obama2.jpg") as photo:
        photo.convert("P").save(generated / "c.gif")
    (generated / "d.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic")
    (controls / "e.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic")
    report = (
        FolderEvaluation(model, EvaluationSources(control_dir=controls, generated_dir=generated)).run_round().report
    )
    failures = {Path(f["file"]).name: f for f in report["failures"]}
    assert failures["c.gif"]["reason"].startswith("unsupported image format .gif: convert it to PNG or JPEG")
    assert failures["d.heic"]["kind"] == "sample" and "unsupported image format .heic" in failures["d.heic"]["reason"]
    assert failures["e.HEIC"]["kind"] == "control"
    assert report["valid_pairs"] == 2  # the readable pairs are scored as before
    sample_dir, prompts = run_dir
    shutil.copy(generated / "d.heic", sample_dir / "tiny_000002_00_20260101000000_101.heic")
    report = (
        FolderEvaluation(model, EvaluationSources(sample_dir=sample_dir, sample_prompts=prompts)).run_round().report
    )
    assert [Path(f["file"]).suffix for f in report["failures"]] == [".heic"] and report["valid_pairs"] == 1


def test_watch_keeps_the_last_good_prompt_file_while_it_is_unreadable(model, run_dir, caplog):
    sample_dir, prompts = run_dir
    evaluation = FolderEvaluation(model, EvaluationSources(sample_dir=sample_dir, sample_prompts=prompts))
    first = evaluation.run_round().report
    text = prompts.read_text()
    prompts.unlink()  # an editor replacing the file, caught between its two steps
    second = evaluation.run_round().report
    assert f"prompt file not found: {prompts}; pairing with its previous contents this round" in caplog.text
    assert second["valid_pairs"] == first["valid_pairs"] == 1
    prompts.write_text(text.replace("--d 100", "--d 7"))
    assert evaluation.run_round().report["valid_pairs"] == 1 and evaluation.prompts[0].seed == 7


DISK_FULL = """
import json, os, subprocess, sys
from pathlib import Path
from face_consistency.faceid.evaluate import cli as evaluate_cli
folder = Path(sys.argv[1])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], check=True)
(folder / "r.json").write_text("previous report")
filler = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
try:
    while True:
        os.write(filler, b"x" * 4096)
except OSError:  # ENOSPC: the file system is full
    os.close(filler)
rc = evaluate_cli.main(sys.argv[2:] + ["--output_json", str(folder / "r.json")])
left = sorted(p.name for p in folder.iterdir())
print(json.dumps({"rc": rc, "report": (folder / "r.json").read_text(), "left": left}))
"""


def test_disk_full_while_writing_the_report(insightface_root, pairs, tmp_path):
    """A real full file system: a 64 KiB tmpfs in a mount namespace of its own (root on Linux)."""
    unshare = shutil.which("unshare")
    if unshare is None or sys.platform != "linux":
        pytest.skip("needs util-linux's unshare on Linux to mount a small tmpfs")
    controls, generated = pairs
    full = tmp_path / "full"
    full.mkdir()
    done = subprocess.run(
        [
            unshare,
            "--mount",
            "--",
            sys.executable,
            "-c",
            DISK_FULL,
            str(full),
            "--control_dir",
            str(controls),
            "--generated_dir",
            str(generated),
            "--quiet",
            *_model_args(insightface_root),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    if done.returncode != 0 and ("mount" in done.stderr or "unshare" in done.stderr):
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip().splitlines()[-1]}")
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["rc"] == 1 and "Traceback" not in done.stderr
    assert (
        f"error: cannot write --output_json {full / 'r.json'}: No space left on device; the previous file"
        in done.stderr
    )
    assert result["report"] == "previous report" and result["left"] == ["filler", "r.json"]


def test_packs_command_names_a_pack_it_may_not_read(perm_tree):
    pack = perm_tree / "models" / "copied"
    pack.chmod(0o311)
    done = run_with_permissions([sys.executable, "-m", "face_consistency", "packs", "--models_root", str(perm_tree)])
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"copied         BROKEN  model pack folder {pack}: permission denied" in done.stdout


# an output never overwrites an input or another output (issue 22, rule 2) -------------------


def _contents(*folders: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


def test_outputs_that_would_overwrite_an_input_or_each_other_are_refused(insightface_root, pairs, tmp_path, capsys):
    controls, generated = pairs
    sample, control = generated / "a.png", controls / "b.png"
    link = tmp_path / "link.json"
    link.symlink_to(sample)  # compared after resolving symlinks
    before = _contents(tmp_path)
    report = tmp_path / "r.json"
    cases = [
        (["--output_json", str(sample)], f"--output_json {sample} is an image in the generated folder {generated}"),
        (["--output_json", str(report), "--plot", str(control)], f"--plot {control} is a control image in {controls}"),
        (["--output_json", str(link)], f"--output_json {link} is an image in the generated folder {generated}"),
        (["--output_json", str(report), "--reference", str(sample), "--plot", str(sample)], f"--plot {sample} is a "),
    ]
    for args, message in cases:
        assert _evaluate(pairs, insightface_root, *args) == 2
        line = _error_line(capsys)
        assert message in line and "writing there would overwrite it: choose another path" in line, line
    assert _evaluate(pairs, insightface_root, "--output_json", str(report), "--plot", str(report)) == 2
    same = f"--output_json and --plot are the same file ({report}): give each output its own path"
    assert same in _error_line(capsys)
    assert _contents(tmp_path) == before  # nothing read into a report, nothing written, nothing lost


def test_outputs_over_the_prompt_file_or_a_ci_control_are_refused(
    insightface_root, run_dir, faces_dir, tmp_path, capsys
):
    sample_dir, prompts = run_dir
    control = faces_dir / "obama.jpg"  # the prompt's --ci: read-only shared data, so copy the run's to check
    ci = tmp_path / "control.jpg"
    shutil.copy(control, ci)
    prompts.write_text(f"an edit --w 32 --h 32 --d 100 --ci {ci}\n", encoding="utf-8")
    before = _contents(tmp_path)
    base = [
        "--sample_dir",
        str(sample_dir),
        "--sample_prompts",
        str(prompts),
        "--quiet",
        *_model_args(insightface_root),
    ]
    for extra, message in (
        (["--output_json", str(prompts)], f"--output_json {prompts} is the prompt file of this evaluation"),
        (
            ["--output_json", str(tmp_path / "r.json"), "--plot", str(ci)],
            f"--plot {ci} is a control image of the prompt file of this evaluation",
        ),
        (
            [
                "--output_json",
                str(tmp_path / "r.json"),
                "--watch",
                "1",
                "--plot",
                str(tmp_path / "r.json.embeddings.json"),
            ],
            "--plot and the embedding cache (beside --output_json) are the same file",
        ),
    ):
        assert evaluate_cli.main([*base, *extra]) == 2
        assert message in _error_line(capsys)
    assert _contents(tmp_path) == before


def test_a_plot_saved_among_the_samples_is_replaced_on_the_next_run_and_not_scored(
    insightface_root, pairs, tmp_path, capsys
):
    _, generated = pairs
    plot, report = generated / "plot.png", tmp_path / "r.json"
    for _ in range(2):
        assert _evaluate(pairs, insightface_root, "--output_json", str(report), "--plot", str(plot)) == 0
        data = json.loads(report.read_text())
        assert data["total_pairs"] == 2 and str(plot) not in json.dumps(data["failures"])
    capsys.readouterr()


# numbers and text of the command's flags (rule 3) -----------------------------------------


def test_every_numeric_flag_of_evaluate_declares_its_bounds():
    """A float or int flag added later without an entry in FLAG_BOUNDS fails here."""
    numeric = {action.dest for action in evaluate_cli.build_parser()._actions if action.type in (float, int)}
    numeric |= {"watch"}  # nargs="?" with const: its type is float too
    assert numeric == set(evaluate_cli.FLAG_BOUNDS)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        (flag, value)
        for flag in sorted(evaluate_cli.FLAG_BOUNDS)
        for value in ("nan", "inf", "-inf", "1e308", "-1e308", "3")
        if (flag != "bands" or not value.startswith("-"))  # argparse would read "-inf" after --bands as a flag
        and not evaluate_cli.FLAG_BOUNDS[flag].contains(float(value))  # --watch 3 is a valid interval
    ],
)
def test_every_numeric_flag_refuses_values_out_of_bounds(insightface_root, pairs, tmp_path, capsys, flag, value):
    out = tmp_path / "r.json"
    values = ["--bands", "0.9", "0.8", value] if flag == "bands" else [f"--{flag}={value}"]
    assert _evaluate(pairs, insightface_root, "--output_json", str(out), *values) == 2
    line = _error_line(capsys)
    assert f"--{flag} must be " in line and f"got {float(value):g}" in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("buffalo\0_l", "--model_name contains a NUL character (at position 7)"),
        ("b" * 5000, "--model_name is 5000 characters long; at most 4096 are accepted"),
    ],
)
def test_text_flags_refuse_nul_and_absurd_lengths(insightface_root, pairs, tmp_path, capsys, text, message):
    out = tmp_path / "r.json"
    assert _evaluate(pairs, insightface_root, "--output_json", str(out), "--model_name", text) == 2
    assert message in _error_line(capsys)
    assert (
        _evaluate(pairs, insightface_root, "--output_json", str(tmp_path / ("x" * 5000)), "--model_name", "testpack")
        == 2
    )
    assert "--output_json is 50" in _error_line(capsys) and not out.exists()


# images the detector cannot take (rule 4) -------------------------------------------------


@pytest.mark.parametrize(
    ("size", "reason"),
    [
        ((1, 20000), "image 1x20000 is too small to hold a face"),
        ((6000, 1), "image 6000x1 is too small to hold a face"),
        ((40, 6000), "image 40x6000 is too elongated for the face detector (about 150:1; at most 32:1)"),
        ((5, 5), "image 5x5 is too small to hold a face"),
    ],
)
def test_an_image_the_detector_cannot_take_is_a_failure_of_its_own(insightface_root, pairs, tmp_path, size, reason):
    """Once one such image killed the whole run with OpenCV's resize assertion and no report."""
    controls, generated = pairs
    Image.new("RGB", size, (120, 90, 60)).save(generated / "c.png")
    shutil.copy(controls / "a.png", controls / "c.png")
    out = tmp_path / "r.json"
    assert _evaluate(pairs, insightface_root, "--output_json", str(out)) == 0
    report = json.loads(out.read_text())
    failures = {Path(f["file"]).name: f["reason"] for f in report["failures"]}
    assert reason in failures["c.png"]
    assert report["valid_pairs"] == 2 and report["total_pairs"] == 3


def test_the_engine_gives_each_such_image_a_reason_in_a_batch(model, faces_dir):
    """Every entry point goes through analyze or locate: arrays, tensors and files alike."""
    import torch

    photo = np.asarray(Image.open(faces_dir / "obama.jpg").convert("RGB"))
    thin = np.full((1, 6000, 3), 128, np.uint8)
    results = model.analyze([photo, thin, torch.zeros(20000, 1, 3)])
    assert results[0].ok and [r.reason.split(" is ")[0] for r in results[1:]] == ["image 6000x1", "image 1x20000"]
    assert model.locate(thin).reason.startswith("image 6000x1 is too small")
    from face_consistency.faceid.judge import load_judge

    judged = load_judge("dlib", "hog").judge(thin)  # the held-out judge: once OpenCV's resize assertion too
    assert not judged.ok and judged.reason.startswith("image 6000x1 is too small") and judged.image_size == (6000, 1)
