"""Bad input and faults of `face-consistency train`: each one a clear message before any model
loads (exit 2), or the right state; nothing of another run touched, nothing left behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from face_consistency.cli import main as cli_main
from face_consistency.training_contract.protocol import LOCK_FILE, METRICS_FILE, read_metrics, read_status
from tiny_qwen import tiny_train_argv, write_tiny_dataset, write_tiny_model_files
from training_runs import RUN_TIMEOUT_S, wait_for
from unprivileged import run_with_permissions

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return write_tiny_model_files(root / "models"), write_tiny_dataset(root / "data", n=2)


def train(setup, out: Path, steps: int, *extra: str, dataset: Path | None = None) -> int:
    files, default_dataset = setup
    return cli_main(
        ["train", *tiny_train_argv(files, dataset or default_dataset, out, max_train_steps=steps, extra=extra)]
    )


def refused(setup, out: Path, capsys, *extra: str, dataset: Path | None = None) -> str:
    """Run, expect exit 2 with one message (no traceback) that is also the failed status; return it."""
    assert train(setup, out, 2, *extra, dataset=dataset) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    status = read_status(out)
    assert status["state"] == "failed" and status["pid"] == os.getpid()  # whose status it is, for the job registry
    assert status["error"] in err
    assert not list(out.glob("*.safetensors"))
    return status["error"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("network_args = 5", r"network_args must be a list of strings"),
        ("seed = 1.5", r"seed must be an integer, got 1\.5"),
        ('edit_plus = "no"', r"edit_plus must be true or false, got 'no'"),
        ('learning_rate = "1e-4"', r"learning_rate must be a number, got '1e-4'"),
    ],
)
def test_config_file_values_have_strict_types(setup, tmp_path, capsys, config, message):
    file = tmp_path / "train.toml"
    file.write_text(config + "\n", encoding="utf-8")
    error = refused(setup, tmp_path / "out", capsys, "--config_file", str(file))
    assert re.search(rf"--config_file {re.escape(str(file))}: {message}", error)


@pytest.mark.parametrize(
    "name", ["../escaped", "sub/escaped", "..", ".escaped", "x" * 300, "nul\x00escaped", "C:escaped", "a\\escaped"]
)
def test_output_names_are_names_never_paths(setup, tmp_path, capsys, name):
    """The trainer writes only inside --output_dir: a name that would climb out of it (or cannot be a
    file name) is refused before anything is written."""
    out = tmp_path / "box" / "out"
    error = refused(setup, out, capsys, "--output_name", name)
    if "\0" in name:  # as every text flag's, refused by the options' own check before the name's
        assert error.startswith("--output_name contains a NUL character (at position 3)")
    else:
        assert error.startswith(f"--output_name {name!r} ") and "give a plain name" in error
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, "status.json"]  # nothing else, not even a log
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["box", "out", LOCK_FILE, "status.json"])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('enable_bucket = "yes"', r"\[general\]: enable_bucket must be true or false, got 'yes'"),
        ("batch_size = true", r"batch_size must be a positive integer, got True"),
        ("resolution = [100000, 100000]", r"resolution \[100000, 100000\] is over 4096 pixels a side"),
        ("caption_extension = 5", r"caption_extension must start with a dot"),
    ],
)
def test_dataset_toml_values_have_strict_types_and_bounds(setup, tmp_path, capsys, line, message):
    _, dataset = setup
    key = line.split(" =")[0]
    kept = [k for k in dataset.read_text(encoding="utf-8").splitlines() if not k.startswith(f"{key} =")]
    bad = tmp_path / "dataset.toml"
    bad.write_text("\n".join(kept).replace("[general]", f"[general]\n{line}", 1) + "\n", encoding="utf-8")
    assert re.search(message, refused(setup, tmp_path / "out", capsys, dataset=bad))


def test_a_caption_that_is_not_utf8_is_named(setup, tmp_path, capsys):
    data = write_tiny_dataset(tmp_path / "data", n=2)
    caption = next((tmp_path / "data" / "images").glob("*.txt"))
    caption.write_bytes("caf\xe9 au lait".encode("latin-1"))
    error = refused(setup, tmp_path / "out", capsys, dataset=data)
    assert f"caption {caption} is not UTF-8 text" in error and "save it as UTF-8" in error


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "cp1252"])
def test_text_files_not_in_utf8_are_named_with_the_fix(setup, tmp_path, capsys, encoding):
    """Notepad's "Unicode" (UTF-16 with a byte-order mark), UTF-16 without one, Windows-1252: every
    text file the trainer reads goes through one reader, so each is one message and a failed status."""
    _, dataset = setup
    toml = tmp_path / "dataset.toml"
    toml.write_bytes(dataset.read_text(encoding="utf-8").replace("[general]", "# caf\xe9\n[general]").encode(encoding))
    error = refused(setup, tmp_path / "out", capsys, dataset=toml)
    assert error.startswith(f"dataset config {toml} ") and "save it as UTF-8 (Windows Notepad: File > Save As" in error
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("une \xe9dition --w 32 --h 32\n".encode(encoding))
    error = refused(setup, tmp_path / "out2", capsys, "--sample_prompts", str(prompts))
    assert error.startswith(f"prompt file {prompts} ") and "save it as UTF-8" in error
    config = tmp_path / "train.toml"
    config.write_bytes("seed = 7 # caf\xe9\n".encode(encoding))
    error = refused(setup, tmp_path / "out3", capsys, "--config_file", str(config))
    assert error.startswith(f"--config_file {config} ") and "save it as UTF-8" in error


@pytest.mark.parametrize(("caption", "tokens"), [("x" * 5000, 5000), ("\u00e9" * 600, 1200)])
def test_a_caption_longer_than_the_text_encoder_takes_is_refused_before_caching(
    setup, tmp_path, capsys, caption, tokens
):
    """Once a tensor-size traceback after caching and the first steps; now refused with the file's
    name before any model loads (the tiny tokenizer is byte-level: one token per UTF-8 byte)."""
    data = write_tiny_dataset(tmp_path / "data", n=2)
    target = sorted((tmp_path / "data" / "images").glob("*.png"))[1]
    target.with_suffix(".txt").write_text(caption, encoding="utf-8")
    error = refused(setup, tmp_path / "out", capsys, dataset=data)
    assert f"the caption of {target} is {tokens} tokens long" in error and "takes at most 1024" in error
    assert not (tmp_path / "data" / "cache").exists()  # nothing cached


def test_a_caption_at_the_limit_trains(setup, tmp_path):
    data = write_tiny_dataset(tmp_path / "data", n=1)
    next((tmp_path / "data" / "images").glob("*.txt")).write_text("y" * 1024, encoding="utf-8")
    assert train(setup, tmp_path / "out", 1, dataset=data) == 0
    assert read_status(tmp_path / "out")["state"] == "completed"


def test_a_base_model_as_network_weights_is_refused_before_loading(setup, tmp_path, capsys):
    files, _ = setup
    error = refused(setup, tmp_path / "out", capsys, "--network_weights", str(files.dit))
    assert "no LoRA layers" in error and "base model" in error


def test_network_weights_of_another_rank_name_the_rank_to_pass(setup, tmp_path, capsys):
    assert train(setup, tmp_path / "first", 1) == 0
    error = refused(
        setup,
        tmp_path / "out",
        capsys,
        "--network_weights",
        str(tmp_path / "first" / "tiny.safetensors"),
        "--network_dim",
        "8",
    )
    assert "was trained at rank 4: pass --network_dim 4 (got 8)" in error


def test_an_output_dir_that_is_a_file_is_one_message(setup, tmp_path, capsys):
    file = tmp_path / "out"
    file.write_text("not a folder", encoding="utf-8")
    assert train(setup, file, 2) == 2
    err = capsys.readouterr().err
    assert f"--output_dir {file} is a file, not a folder" in err and "Traceback" not in err
    assert file.read_text(encoding="utf-8") == "not a folder"


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_an_output_dir_that_cannot_be_written_is_one_message(setup, tmp_path):
    files, dataset = setup
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    argv = tiny_train_argv(files, dataset, locked / "out", max_train_steps=2)
    done = run_with_permissions([sys.executable, "-m", "face_consistency.trainer", *argv])
    assert done.returncode == 2, done.stderr
    assert f"{locked} is not writable by this user" in done.stderr and "Traceback" not in done.stderr
    assert list(locked.iterdir()) == []


@pytest.fixture(scope="module")
def saved_state(setup, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("state_run") / "out"
    assert train(setup, out, 2, "--save_state") == 0
    return out / "tiny-state"


def copy_state(state: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(state, tmp_path / "state"))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda s: os.truncate(s / "optimizer.bin", 100), "optimizer.bin is truncated or corrupt"),
        (lambda s: (s / "lora_state.safetensors").unlink(), "lora_state.safetensors is missing or empty"),
        (lambda s: os.truncate(s / "lora_state.safetensors", 200), "lora_state.safetensors is truncated or corrupt"),
        (lambda s: (s / "trainer_state.json").write_text("{", encoding="utf-8"), "trainer_state.json cannot be read"),
    ],
)
def test_a_damaged_state_is_refused_before_loading(setup, saved_state, tmp_path, capsys, damage, message):
    state = copy_state(saved_state, tmp_path)
    damage(state)
    error = refused(setup, tmp_path / "out", capsys, "--resume", str(state))
    assert message in error and "Resume from an earlier state folder" in error


def test_a_state_past_the_last_step_is_refused_not_completed(setup, saved_state, tmp_path, capsys):
    state = copy_state(saved_state, tmp_path)
    progress = json.loads((state / "trainer_state.json").read_text(encoding="utf-8"))
    (state / "trainer_state.json").write_text(json.dumps({**progress, "step": 999}), encoding="utf-8")
    error = refused(setup, tmp_path / "out", capsys, "--resume", str(state))
    assert "is at step 999, which --max_train_steps 2 has already reached" in error


def test_a_state_of_another_rank_names_the_rank(setup, saved_state, tmp_path, capsys):
    error = refused(setup, tmp_path / "out", capsys, "--resume", str(saved_state), "--network_dim", "8")
    assert "was trained at rank 4: pass --network_dim 4" in error


def test_one_run_per_output_folder_whoever_starts_it(setup, tmp_path, capsys):
    files, dataset = setup
    out = tmp_path / "out"
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "face_consistency.trainer",
            *tiny_train_argv(files, dataset, out, max_train_steps=10_000),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: (read_status(out) or {}).get("state") == "training", "the first run to train")
        before = read_status(out)
        assert train(setup, out, 2) == 2
        err = capsys.readouterr().err
        assert f"another training run (pid {first.pid}) is writing to this folder" in err
        after = read_status(out)
        assert after["pid"] == first.pid and after["state"] == "training" and after["started"] == before["started"]
    finally:
        first.terminate()
        first.wait(timeout=RUN_TIMEOUT_S)
    steps = [m["step"] for m in read_metrics(out)]
    assert steps == sorted(set(steps)), "two runs wrote into one metrics.jsonl"
    # the OS let go of the lock with the process: the folder takes a new run (of another name: the stopped
    # run's checkpoint is there)
    assert (out / LOCK_FILE).exists() and train(setup, out, 1, "--output_name", "second") == 0


def test_a_fresh_run_never_overwrites_a_run_of_the_same_name(setup, saved_state, tmp_path, capsys):
    out = Path(shutil.copytree(saved_state.parent, tmp_path / "out"))
    before = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    metrics = (out / METRICS_FILE).read_bytes()
    assert before and train(setup, out, 2) == 2
    err = capsys.readouterr().err
    assert f"--output_dir {out} already holds the run 'tiny' (1 checkpoint(s), such as tiny.safetensors)" in err
    assert "pass --resume with its -state folder" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.glob("*.safetensors")} == before
    assert (out / METRICS_FILE).read_bytes() == metrics
    # another name in the same folder is another run
    assert train(setup, out, 1, "--output_name", "other") == 0 and (out / "other.safetensors").is_file()


def test_a_killed_save_leaves_nothing_for_the_next_run(setup, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    leftovers = [out / ".tiny.safetensors.k3j2.tmp", out / ".status.json.a81x.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    (out / ".tiny-state.partial").mkdir()
    (out / ".tiny-state.partial" / "optimizer.bin").write_bytes(b"half")
    unrelated = out / ".scores.json.x.tmp"  # not the trainer's
    unrelated.write_bytes(b"")
    assert train(setup, out, 1) == 0
    assert not any(p.exists() for p in [*leftovers, out / ".tiny-state.partial"])
    assert unrelated.exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 40 KiB tmpfs: room for the status and metrics, not for a checkpoint."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        # lazily: pytest's log capture keeps the failed write's traceback, and with it torch's open file
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


@pytest.mark.parametrize("extra", [(), ("--save_state", "--save_every_n_steps", "1", "--network_dim", "1")])
def test_a_full_disk_during_a_save_fails_with_one_message(setup, small_disk, capsys, extra):
    out = small_disk / "out"
    assert train(setup, out, 2, *extra) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "could not write" in err and "Free space in" in err
    status = read_status(out)
    assert status["state"] == "failed" and status["error"].startswith("CheckpointWriteError: could not write")
    assert not [p.name for p in out.iterdir() if p.name.endswith((".tmp", ".partial"))]
