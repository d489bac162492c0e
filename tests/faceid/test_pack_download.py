"""Standard packs download on first use: from a loopback server, verified, resumed, locked, and never
left half installed; every failure ends with a clear message and the models folder as it was."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from comfy_stubs import ProgressBar, set_comfy_base, start_prompt_server, stop_prompt_server
from face_consistency.faceid import ModelPackError, pack_download, resolve_pack
from face_consistency.faceid.pack_download import (
    OFFLINE_ENV,
    RELEASES,
    SHA256_ENV,
    URL_ENV,
    Transfer,
    download_pack,
    expected_sha256,
)
from face_consistency.faceid.packs_cli import main as packs_main
from face_consistency.nodes import training
from face_consistency.nodes.comfy_env import DOWNLOAD_SETTING
from face_consistency.nodes.scoring import FaceConsistencyLoadModel
from face_consistency.nodes.training import FaceConsistencyTrainLaunch
from face_consistency.training_jobs.job_registry import JobRecord
from pack_server import PackServer, pack_zip, sha256


@pytest.fixture(scope="session")
def zips(testpack_dir: Path) -> dict[str, bytes]:
    flat = pack_zip(testpack_dir)
    return {
        "flat": flat,
        "nested": pack_zip(testpack_dir, folder="antelopev2"),
        "extra": pack_zip(testpack_dir, extra={"notes.txt": b"not a model"}),
        "detector_only": pack_zip(testpack_dir, files=("det_2.5g.onnx",)),
        "truncated": flat[: len(flat) // 2],
        "corrupt": bytes(b ^ 0x5A for b in flat),
    }


@pytest.fixture()
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[PackServer]:
    served = PackServer().start()
    monkeypatch.delenv(OFFLINE_ENV, raising=False)
    monkeypatch.setenv(URL_ENV, served.url)
    monkeypatch.setattr(pack_download, "RETRY_PAUSE_S", 0.0)
    yield served
    served.stop()


def serve(server: PackServer, monkeypatch: pytest.MonkeyPatch, name: str, data: bytes, pin: bool = True) -> None:
    """Serve `data` as <name>.zip; `pin`: expect its own sha256 (else the release's recorded one)."""
    server.files[f"/{name}.zip"] = data
    if pin:
        monkeypatch.setenv(SHA256_ENV, f"{name}={sha256(data)}")


@pytest.fixture()
def root(tmp_path: Path, testpack_dir: Path) -> Path:
    """An InsightFace root whose models/ already holds a user's pack, which no failure may touch."""
    mine = tmp_path / "root" / "models" / "mine"
    mine.mkdir(parents=True)
    for name in ("det_2.5g.onnx", "mobilefacenet.onnx"):
        (mine / name).symlink_to(testpack_dir / name)
    return tmp_path / "root"


def assert_intact(root: Path, pack: str) -> None:
    """Only the user's pack (and the lock file) in models/: no pack, no partial zip, no extraction folder."""
    models = root / "models"
    assert sorted(os.listdir(models)) == sorted(["mine", f".{pack}.lock"])
    assert sorted(os.listdir(models / "mine")) == ["det_2.5g.onnx", "mobilefacenet.onnx"]


def test_first_use_downloads_into_the_first_writable_root_with_progress(server, monkeypatch, root, zips, tmp_path):
    serve(server, monkeypatch, "buffalo_sc", zips["flat"])
    (tmp_path / "a_file").write_text("")
    unwritable = tmp_path / "a_file" / "insightface"  # no folder can be made under a file (even as root)
    seen: list[Transfer] = []
    files = resolve_pack("buffalo_sc", [unwritable, root], allow_download=True, progress=seen.append)
    assert files.folder == root / "models" / "buffalo_sc"
    assert sorted(p.name for p in files.folder.iterdir()) == ["det_2.5g.onnx", "mobilefacenet.onnx"]
    assert (files.detector.name, files.recognizer.name) == ("det_2.5g.onnx", "mobilefacenet.onnx")
    assert sorted(os.listdir(root / "models")) == [".buffalo_sc.lock", "buffalo_sc", "mine"]
    assert seen[-1].done == seen[-1].total == len(zips["flat"]) and seen[-1].rate > 0
    assert str(seen[-1]).startswith("downloading buffalo_sc: ") and " MB at " in str(seen[-1])
    # installed: the next use finds it without asking the server
    assert resolve_pack("buffalo_sc", [root], allow_download=True).folder == files.folder
    assert server.zip_requests("buffalo_sc") == [None]


def test_nested_antelopev2_zip_is_flattened(server, monkeypatch, root, zips):
    serve(server, monkeypatch, "antelopev2", zips["nested"])
    folder = download_pack("antelopev2", root / "models")
    assert folder == root / "models" / "antelopev2"
    assert sorted(p.name for p in folder.iterdir()) == ["det_2.5g.onnx", "mobilefacenet.onnx"]


def test_slim_keeps_only_the_detector_and_the_recognizer(server, monkeypatch, tmp_path, zips):
    serve(server, monkeypatch, "buffalo_s", zips["extra"])
    full = download_pack("buffalo_s", tmp_path / "full" / "models")
    slim = download_pack("buffalo_s", tmp_path / "slim" / "models", slim=True)
    # no notes.txt: only model files are installed
    assert sorted(p.name for p in full.iterdir()) == ["det_2.5g.onnx", "mobilefacenet.onnx"]
    assert sorted(p.name for p in slim.iterdir()) == ["det_2.5g.onnx", "mobilefacenet.onnx"]


def test_hash_mismatch_names_both_hashes_and_installs_nothing(server, monkeypatch, root, zips):
    serve(server, monkeypatch, "buffalo_l", zips["flat"], pin=False)  # checked against the recorded hash
    with pytest.raises(ModelPackError) as err:
        resolve_pack("buffalo_l", [root], allow_download=True)
    message = str(err.value)
    assert sha256(zips["flat"]) in message and RELEASES["buffalo_l"].sha256 in message
    assert "nothing was installed" in message
    assert_intact(root, "buffalo_l")


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("corrupt", "not a usable zip archive"),
        ("truncated", "not a usable zip archive"),
        ("detector_only", "does not hold a usable pack.*no face recognizer"),
    ],
)
def test_unusable_archive_is_a_clear_error_and_installs_nothing(server, monkeypatch, root, zips, kind, expected):
    serve(server, monkeypatch, "buffalo_m", zips[kind])  # pinned: the hash check passes, the zip fails
    with pytest.raises(ModelPackError, match=expected):
        download_pack("buffalo_m", root / "models")
    assert_intact(root, "buffalo_m")


def test_a_download_broken_off_resumes_with_a_range_request(server, monkeypatch, root, zips):
    data = zips["flat"]
    serve(server, monkeypatch, "buffalo_sc", data)
    server.cut_first_response_at = len(data) // 3
    folder = download_pack("buffalo_sc", root / "models")
    assert server.zip_requests("buffalo_sc") == [None, f"bytes={len(data) // 3}-"]
    assert sorted(p.name for p in folder.iterdir()) == ["det_2.5g.onnx", "mobilefacenet.onnx"]


def test_a_cancelled_download_leaves_no_pack_and_the_next_run_resumes(server, monkeypatch, root, zips):
    data = zips["flat"]
    serve(server, monkeypatch, "buffalo_sc", data)
    monkeypatch.setattr(pack_download, "CHUNK", 64 * 1024)

    def cancel_halfway(transfer: Transfer) -> None:
        if transfer.done > len(data) // 2:
            raise InterruptedError("Processing interrupted")  # what ComfyUI's Cancel does in the bar

    with pytest.raises(InterruptedError):
        download_pack("buffalo_sc", root / "models", progress=cancel_halfway)
    kept = (root / "models" / ".buffalo_sc.zip.part").stat().st_size
    assert len(data) // 2 < kept < len(data)
    assert not (root / "models" / "buffalo_sc").exists()
    assert resolve_pack("buffalo_sc", [root], allow_download=True).folder == root / "models" / "buffalo_sc"
    assert server.zip_requests("buffalo_sc") == [None, f"bytes={kept}-"]
    assert not (root / "models" / ".buffalo_sc.zip.part").exists()


def test_a_server_ignoring_range_restarts_the_download_cleanly(server, monkeypatch, root, zips):
    data = zips["flat"]
    serve(server, monkeypatch, "buffalo_sc", data)
    (root / "models" / ".buffalo_sc.zip.part").write_bytes(b"left by an earlier run")
    server.ignore_range = True
    folder = download_pack("buffalo_sc", root / "models")
    assert server.zip_requests("buffalo_sc") == ["bytes=22-"]
    assert sorted(p.name for p in folder.iterdir()) == ["det_2.5g.onnx", "mobilefacenet.onnx"]


def test_unreachable_server_says_what_to_download_and_where(monkeypatch, root):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.delenv(OFFLINE_ENV, raising=False)
    monkeypatch.setenv(URL_ENV, f"http://127.0.0.1:{port}/mirror")
    monkeypatch.setattr(pack_download, "RETRY_PAUSE_S", 0.0)
    with pytest.raises(ModelPackError) as err:
        resolve_pack("buffalo_l", [root], allow_download=True)
    message = str(err.value)
    assert f"could not download model pack 'buffalo_l' from http://127.0.0.1:{port}/mirror/buffalo_l.zip" in message
    assert "If this machine is offline: Download" in message and "(289 MB)" in message
    assert f"{root / 'models' / 'buffalo_l'}/" in message
    assert_intact(root, "buffalo_l")


def test_missing_zip_on_the_server_is_named(server, root):
    with pytest.raises(ModelPackError, match=r"not available at http://127\.0\.0\.1:\d+/buffalo_s\.zip \(HTTP 404"):
        download_pack("buffalo_s", root / "models")
    assert_intact(root, "buffalo_s")


def test_offline_never_asks_the_server(server, monkeypatch, root, zips):
    serve(server, monkeypatch, "buffalo_l", zips["flat"])
    monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(ModelPackError) as err:
        resolve_pack("buffalo_l", [root], allow_download=True)
    message = str(err.value)
    assert "downloading is off (--offline, FACE_CONSISTENCY_OFFLINE=1" in message
    assert f"Download {server.url}/buffalo_l.zip (289 MB)" in message and f"{root / 'models' / 'buffalo_l'}/" in message
    assert server.requests == []
    assert sorted(os.listdir(root / "models")) == ["mine"]


def test_only_standard_packs_download_and_only_when_allowed(server, monkeypatch, root, zips):
    serve(server, monkeypatch, "buffalo_s", zips["flat"])
    with pytest.raises(ModelPackError, match="downloading is off"):
        resolve_pack("buffalo_s", [root])
    with pytest.raises(ModelPackError, match="'my_own_pack' not found.*Put a folder 'my_own_pack'"):
        resolve_pack("my_own_pack", [root], allow_download=True)
    assert server.requests == []


def test_sha256_setting_is_read_strictly(monkeypatch):
    monkeypatch.setenv(SHA256_ENV, f" buffalo_m = {'A' * 64} , antelopev2={'b' * 64}")
    assert expected_sha256("buffalo_m") == "a" * 64 and expected_sha256("antelopev2") == "b" * 64
    assert expected_sha256("buffalo_l") == RELEASES["buffalo_l"].sha256
    for bad in ("buffalo_m", f"my_pack={'a' * 64}", "buffalo_m=abc"):
        monkeypatch.setenv(SHA256_ENV, bad)
        with pytest.raises(ModelPackError, match=f"{SHA256_ENV}: cannot read"):
            expected_sha256("buffalo_m")


DOWNLOAD_IN_A_PROCESS = """
import json, sys
from pathlib import Path
from face_consistency.faceid.pack_download import download_pack
print(json.dumps(str(download_pack("buffalo_sc", Path(sys.argv[1])))))
"""


def test_two_processes_asking_at_once_download_once(server, monkeypatch, root, zips):
    serve(server, monkeypatch, "buffalo_sc", zips["flat"])
    server.chunk_delay_s = 0.1  # ~3 s of download: the second process finds the lock held
    command = [sys.executable, "-c", DOWNLOAD_IN_A_PROCESS, str(root / "models")]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], results
    assert {json.loads(out) for out, _ in results} == {str(root / "models" / "buffalo_sc")}
    assert server.zip_requests("buffalo_sc") == [None]
    assert any("waiting for it" in err for _, err in results)


def test_packs_command_lists_downloadable_packs_and_downloads_one(server, monkeypatch, root, zips, capsys, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    serve(server, monkeypatch, "buffalo_sc", zips["extra"])
    assert packs_main(["--models_root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "mine" in out and f"downloadable (fetched on first use into {root / 'models'}" in out
    assert re.search(r"\n  buffalo_l +289 MB\n", out) and re.search(r"\n  buffalo_sc +15 MB\n", out)
    assert packs_main(["--models_root", str(root), "--download", "buffalo_sc", "--slim"]) == 0
    out = capsys.readouterr().out
    assert f"buffalo_sc is installed in {root / 'models' / 'buffalo_sc'}" in out
    assert "buffalo_sc     ok      det_2.5g.onnx + mobilefacenet.onnx" in out
    assert not re.search(r"buffalo_sc +15 MB", out)
    assert sorted(p.name for p in (root / "models" / "buffalo_sc").iterdir()) == ["det_2.5g.onnx", "mobilefacenet.onnx"]


@pytest.fixture()
def comfy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ComfyUI base: no pack installed, an empty HOME."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    set_comfy_base(tmp_path / "comfy")
    ProgressBar.instances.clear()
    return tmp_path / "comfy"


def turn_downloads_off_in_comfyui(comfy: Path) -> None:
    settings = comfy / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"Comfy.Locale": "en", DOWNLOAD_SETTING: False}))


def test_loader_node_offers_standard_packs_and_downloads_on_first_use(server, monkeypatch, comfy, zips):
    serve(server, monkeypatch, "buffalo_l", zips["flat"])
    packs, options = FaceConsistencyLoadModel.INPUT_TYPES()["required"]["pack"]
    assert packs == [
        "buffalo_l (downloads on first use, 289 MB)",
        "buffalo_m (downloads on first use, 276 MB)",
        "buffalo_s (downloads on first use, 128 MB)",
        "buffalo_sc (downloads on first use, 15 MB)",
        "antelopev2 (downloads on first use, 361 MB)",
    ]
    assert options["default"] == packs[0]
    # a workflow saved with the plain name is as valid as the listed choice; unknown packs are not
    assert FaceConsistencyLoadModel.VALIDATE_INPUTS("buffalo_l") is True
    assert FaceConsistencyLoadModel.VALIDATE_INPUTS(packs[0]) is True
    assert "'mine' is not installed" in FaceConsistencyLoadModel.VALIDATE_INPUTS("mine")

    prompt_server = start_prompt_server()
    try:
        out = FaceConsistencyLoadModel().load(packs[0], "cpu", "640", 0.5, unique_id="7")
    finally:
        stop_prompt_server()
    assert out["ui"]["text"][0].startswith("buffalo_l on CPUExecutionProvider")
    installed = comfy / "models" / "insightface" / "models" / "buffalo_l"
    assert sorted(p.name for p in installed.iterdir()) == ["det_2.5g.onnx", "mobilefacenet.onnx"]
    [bar] = ProgressBar.instances
    assert bar.total == bar.current == len(zips["flat"])
    texts = [data for event, data in prompt_server.events if event == "progress_text"]
    assert texts and texts[-1]["node"] == "7" and texts[-1]["text"].startswith("downloading buffalo_l: ")
    # installed now: listed plainly, and a workflow saved with the label still loads it
    assert FaceConsistencyLoadModel.INPUT_TYPES()["required"]["pack"][0][0] == "buffalo_l"
    assert FaceConsistencyLoadModel().load(packs[0], "cpu", "640", 0.5)["result"][0] is out["result"][0]


def test_comfyui_setting_turns_downloads_off(server, monkeypatch, comfy, zips):
    serve(server, monkeypatch, "buffalo_l", zips["flat"])
    turn_downloads_off_in_comfyui(comfy)
    with pytest.raises(ModelPackError, match=r"downloading is off.*comfy/models/insightface/models/buffalo_l/"):
        FaceConsistencyLoadModel().load("buffalo_l", "cpu", "auto", 0.5)
    assert server.requests == []


def test_training_launch_passes_the_setting_to_the_trainer(monkeypatch, comfy, tmp_path):
    for folder, name in (
        ("diffusion_models", "dit.safetensors"),
        ("vae", "vae.safetensors"),
        ("text_encoders", "te.safetensors"),
    ):
        (comfy / "models" / folder).mkdir(parents=True, exist_ok=True)
        (comfy / "models" / folder / name).write_bytes(b"")
    launched: list[list[str]] = []

    def launch(registry, request):
        launched.append(request.argv())
        return JobRecord("j1", request.output_name, request.output_dir, request.argv(), 1, 0.0, "running", None, "")

    monkeypatch.setattr(training.job_control, "launch", launch)
    monkeypatch.setattr(training, "_confine_dataset", lambda dataset, output_dir, resolution: tmp_path / "d.toml")
    inputs = dict(
        dit="dit.safetensors",
        vae="vae.safetensors",
        text_encoder="te.safetensors",
        dataset=str(comfy / "input" / "d"),
        output_name="run",
        learning_rate=1e-4,
        network_dim=4,
        network_alpha=4.0,
        max_train_epochs=1,
        save_every_n_epochs=1,
        seed=0,
        timestep_sampling="shift",
        discrete_flow_shift=2.2,
        optimizer_type="AdamW",
        mixed_precision="no",
        gradient_checkpointing=False,
        enable_face_loss=True,
        face_loss_weight=0.1,
        face_model_name="buffalo_l",
        face_device="cpu",
        face_det_size=640,
        face_eval_frequency=10,
    )
    FaceConsistencyTrainLaunch().launch(**{**inputs, "output_name": "online"})
    turn_downloads_off_in_comfyui(comfy)
    FaceConsistencyTrainLaunch().launch(**{**inputs, "output_name": "offline"})
    assert "--offline" not in launched[0] and "--offline" in launched[1]
    roots = launched[0][launched[0].index("--face_models_root") + 1]
    assert roots == str(comfy / "models" / "insightface")


def test_a_resume_at_the_wrong_offset_restarts_from_the_beginning(server, monkeypatch, root, zips):
    data = zips["flat"]
    serve(server, monkeypatch, "buffalo_sc", data)
    (root / "models" / ".buffalo_sc.zip.part").write_bytes(data[:1000])
    server.range_offset_error = 10  # answers "bytes=1000-" with a body starting at byte 1010
    folder = download_pack("buffalo_sc", root / "models")
    assert server.zip_requests("buffalo_sc") == ["bytes=1000-", None]
    assert sorted(p.name for p in folder.iterdir()) == ["det_2.5g.onnx", "mobilefacenet.onnx"]


# bounded by what a pack can be (issue 22, rule 5) ----------------------------------------


def _bomb(testpack_dir: Path, unpacked: int) -> bytes:
    """The test pack plus one `.onnx` of zeros that deflates to almost nothing."""
    return pack_zip(testpack_dir, extra={"w600k_r50.onnx": bytes(unpacked)})


def test_a_zip_bomb_is_refused_before_extraction_even_with_its_own_hash_set(server, monkeypatch, root, testpack_dir):
    ceiling = pack_download.UNPACKED_CEILING_RATIO * RELEASES["buffalo_sc"].size
    bomb = _bomb(testpack_dir, ceiling + 1)
    assert len(bomb) < ceiling // 5  # the test pack, and 60 MB of zeros deflated to some 60 kB
    serve(server, monkeypatch, "buffalo_sc", bomb)  # the user vouches for its hash
    with pytest.raises(
        ModelPackError,
        match=r"buffalo_sc\.zip would unpack to \d+ MB of model files, more than a "
        r"buffalo_sc pack can be \(60 MB at most\).*Nothing was installed",
    ):
        download_pack("buffalo_sc", root / "models")
    assert_intact(root, "buffalo_sc")


def test_only_model_files_are_installed_and_links_never(server, monkeypatch, root, testpack_dir):
    import io
    import stat
    import zipfile

    buffer = io.BytesIO(
        pack_zip(
            testpack_dir,
            extra={"README.md": b"hi", "run.sh": b"rm -rf ~", "__MACOSX/._det.onnx": b"x", ".hidden.onnx": b"x"},
        )
    )
    with zipfile.ZipFile(buffer, "a") as zf:
        link = zipfile.ZipInfo("link.onnx")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    serve(server, monkeypatch, "buffalo_m", buffer.getvalue())
    folder = download_pack("buffalo_m", root / "models")
    assert sorted(p.name for p in folder.iterdir()) == ["det_2.5g.onnx", "mobilefacenet.onnx"]


def test_an_installed_pack_has_the_usual_permissions(server, monkeypatch, tmp_path, zips):
    serve(server, monkeypatch, "buffalo_s", zips["nested"])
    previous = os.umask(0o022)
    try:
        folder = download_pack("buffalo_s", tmp_path / "models")
    finally:
        os.umask(previous)
    assert folder.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o644}


DISK_FULL = """
import json, os, subprocess, sys
from pathlib import Path
from face_consistency.faceid import ModelPackError
from face_consistency.faceid.pack_download import download_pack
folder, size, leave = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
models = folder / "models"
models.mkdir()
filler = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
while os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize > leave + (1 << 20):
    os.write(filler, bytes(1 << 20))
os.close(filler)
try:
    download_pack("buffalo_sc", models)
    message = None
except ModelPackError as exc:
    message = str(exc)
print(json.dumps({"message": message, "left": sorted(os.listdir(models))}))
"""


@pytest.mark.parametrize(
    ("size", "leave", "served", "expected"),
    [
        # less room than the recorded zip and its pack: refused before a byte is fetched
        ("8m", 1 << 20, 1 << 20, r"it needs about 30 MB, \d MB are free"),
        # a mirror's zip bigger than the room left: the disk fills during the download
        ("48m", 31 << 20, 40 << 20, r"No space left on device"),
    ],
)
def test_a_full_disk_is_one_message_naming_the_folder(server, monkeypatch, tmp_path, size, leave, served, expected):
    """A real full file system: a small tmpfs in a mount namespace of its own (root on Linux)."""
    import shutil

    unshare = shutil.which("unshare")
    if unshare is None or sys.platform != "linux":
        pytest.skip("needs util-linux's unshare on Linux to mount a small tmpfs")
    data = os.urandom(served)  # incompressible: the zip is as big as it says
    serve(server, monkeypatch, "buffalo_sc", data)
    full = tmp_path / "full"
    full.mkdir()
    done = subprocess.run(
        [unshare, "--mount", "--", sys.executable, "-c", DISK_FULL, str(full), size, str(leave)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=os.environ.copy(),
    )
    if done.returncode != 0 and ("mount" in done.stderr or "unshare" in done.stderr):
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip().splitlines()[-1]}")
    assert "Traceback" not in done.stderr, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["message"].startswith(f"not enough free space in {full / 'models'} for model pack buffalo_sc (")
    assert re.search(expected, result["message"]) and "nothing was installed" in result["message"]
    assert result["left"] == [".buffalo_sc.lock"]  # no partial zip, no extraction folder
    if served > 1 << 20:
        assert server.zip_requests("buffalo_sc")  # it did start downloading
