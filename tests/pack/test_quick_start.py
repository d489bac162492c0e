"""The README's quick start on a fresh machine: its scoring command, run as the installed console
script with an empty HOME, downloads the default pack by itself (from a loopback server) and writes
the report."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from evaluate_fixtures import reencode
from face_consistency.faceid.pack_download import OFFLINE_ENV, SHA256_ENV, URL_ENV
from pack_server import PackServer, pack_zip, sha256

README = Path(__file__).resolve().parents[2] / "README.md"


def quick_start_commands() -> list[str]:
    section = README.read_text(encoding="utf-8").split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_readme_quick_start_is_install_demo_score_test() -> None:
    install, demo, score, tests = quick_start_commands()
    assert install.startswith("pip install") and tests == "python -m pytest -q"
    assert demo == "face-consistency demo"  # nothing but the install
    assert score.startswith("face-consistency evaluate ")


def test_quick_start_demo_scores_insightfaces_own_photos(tmp_path, testpack_dir) -> None:
    """The demo line as written, with an empty HOME whose ~/.insightface holds the test pack under the
    default pack's name: it needs no data and (offline here) no download."""
    command = shlex.split(quick_start_commands()[1])
    home = tmp_path / "home"
    (home / ".insightface" / "models").mkdir(parents=True)
    (home / ".insightface" / "models" / "buffalo_l").symlink_to(testpack_dir, target_is_directory=True)
    env = {**os.environ, "HOME": str(home), OFFLINE_ENV: "1"}
    script = Path(sys.executable).with_name(command[0])
    run = subprocess.run(
        [str(script), *command[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "model buffalo_l (128-d)" in run.stdout
    assert "t1.jpg: 6 people" in run.stdout and "6 of 6 people found at their mirrored place" in run.stdout
    rows = re.findall(r"^  (\d) +\d+ +\d+ +(-?[\d.]+) ", run.stdout, re.M)
    assert len(rows) == 6 and min(float(score) for _, score in rows) > 0.6, run.stdout  # the same person
    others = float(re.search(r"different people of t1.jpg: mean (-?[\d.]+)", run.stdout).group(1))
    stranger = float(re.search(r"Tom_Hanks_54745.png .*: highest (-?[\d.]+)", run.stdout).group(1))
    assert others < 0.3 and stranger < 0.3, run.stdout  # other people


def test_quick_start_scoring_downloads_the_pack_and_writes_the_report(tmp_path, testpack_dir, faces_dir) -> None:
    command = shlex.split(quick_start_commands()[2])
    work = tmp_path / "work"
    sample = work / command[command.index("--sample_dir") + 1]
    reencode(faces_dir / "obama.jpg", sample / "control_image_0.png")
    reencode(faces_dir / "obama2.jpg", sample / "sample_step_100_0.png")
    reencode(faces_dir / "obama3.jpg", sample / "sample_step_200_0.png")
    reencode(faces_dir / "biden.jpg", sample / "control_image_1.png")
    reencode(faces_dir / "biden.jpg", sample / "sample_step_100_1.png", mirror=True)

    # the test pack, served under the name the command asks for, with its own hash expected
    data = pack_zip(testpack_dir)
    server = PackServer(files={"/buffalo_l.zip": data}).start()
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != OFFLINE_ENV}
    env.update(HOME=str(home), **{URL_ENV: server.url, SHA256_ENV: f"buffalo_l={sha256(data)}"})
    script = Path(sys.executable).with_name(command[0])
    assert script.exists(), f"{script}: the console script is installed by `pip install -e .`"
    try:
        run = subprocess.run(
            [str(script), *command[1:]], cwd=work, env=env, capture_output=True, text=True, timeout=300
        )
    finally:
        server.stop()
    assert run.returncode == 0, run.stderr
    assert f"model pack buffalo_l: downloading {server.url}/buffalo_l.zip" in run.stderr
    pack = home / ".insightface" / "models" / "buffalo_l"
    assert sorted(p.name for p in pack.iterdir()) == ["det_2.5g.onnx", "mobilefacenet.onnx"]
    report = json.loads((work / "face_consistency_results.json").read_text())
    assert report["total_pairs"] == 3 and report["valid_pairs"] == 3
    assert "model buffalo_l (128-d)" in run.stdout and "report: face_consistency_results.json" in run.stdout
