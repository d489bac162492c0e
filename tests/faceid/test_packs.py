"""Model pack discovery and validation: every folder problem gets an actionable error."""

from __future__ import annotations

from pathlib import Path

import pytest
from face_consistency.faceid import ModelPackError, list_packs, load_face_model, resolve_pack
from face_consistency.faceid import packs as packs_module
from face_consistency.faceid.packs_cli import main as packs_main


def make_pack(root: Path, name: str, testpack_dir: Path, files=("det_2.5g.onnx", "mobilefacenet.onnx")) -> Path:
    """A pack folder root/models/<name>/ whose files are links to the shared test pack."""
    return link_pack_files(root / "models" / name, testpack_dir, files)


def link_pack_files(folder: Path, testpack_dir: Path, files=("det_2.5g.onnx", "mobilefacenet.onnx")) -> Path:
    folder.mkdir(parents=True)
    for f in files:
        (folder / f).symlink_to(testpack_dir / f)
    return folder


def test_user_pack_under_a_comfyui_style_root(tmp_path, testpack_dir):
    make_pack(tmp_path, "my_pack", testpack_dir)
    files = resolve_pack("my_pack", [tmp_path])
    assert files.detector.name == "det_2.5g.onnx" and files.recognizer.name == "mobilefacenet.onnx"
    assert list_packs([tmp_path]) == ["my_pack"]


def test_root_may_be_the_models_folder_and_pack_may_be_a_path(tmp_path, testpack_dir):
    folder = make_pack(tmp_path, "p", testpack_dir)
    assert resolve_pack("p", [tmp_path / "models"]).folder == folder
    assert resolve_pack(str(folder), []).folder == folder


def test_missing_pack_says_where_it_looked_and_where_to_put_it(tmp_path):
    with pytest.raises(ModelPackError) as err:
        resolve_pack("buffalo_l", [tmp_path])
    message = str(err.value)
    assert str(tmp_path / "models") in message
    assert "ComfyUI/models/insightface/models/buffalo_l/" in message


def test_empty_pack_folder(tmp_path):
    (tmp_path / "models" / "antelopev2").mkdir(parents=True)
    with pytest.raises(ModelPackError, match="is empty"):
        resolve_pack("antelopev2", [tmp_path])


def test_nested_pack_folder_names_the_inner_folder(tmp_path, testpack_dir):
    link_pack_files(tmp_path / "models" / "antelopev2" / "antelopev2", testpack_dir)
    with pytest.raises(ModelPackError) as err:
        resolve_pack("antelopev2", [tmp_path])
    assert "nested" in str(err.value) and "Move them up" in str(err.value)


def test_pack_without_detector(tmp_path, testpack_dir):
    make_pack(tmp_path, "p", testpack_dir, files=("mobilefacenet.onnx",))
    with pytest.raises(ModelPackError, match="no face detector.*found: mobilefacenet.onnx"):
        resolve_pack("p", [tmp_path])


def test_pack_without_recognizer(tmp_path, testpack_dir):
    make_pack(tmp_path, "p", testpack_dir, files=("det_2.5g.onnx",))
    with pytest.raises(ModelPackError, match="no face recognizer"):
        resolve_pack("p", [tmp_path])


def test_unreadable_onnx_names_the_file(tmp_path, testpack_dir):
    folder = make_pack(tmp_path, "p", testpack_dir)
    (folder / "broken.onnx").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelPackError, match=r"broken\.onnx.*corrupt or truncated"):
        resolve_pack("p", [tmp_path])


def test_truncated_onnx(tmp_path, testpack_dir):
    folder = tmp_path / "models" / "p"
    folder.mkdir(parents=True)
    (folder / "mobilefacenet.onnx").symlink_to(testpack_dir / "mobilefacenet.onnx")
    (folder / "det_2.5g.onnx").write_bytes((testpack_dir / "det_2.5g.onnx").read_bytes()[:50_000])
    with pytest.raises(ModelPackError, match="det_2.5g.onnx"):
        resolve_pack("p", [tmp_path])


def test_load_face_model_fails_before_loading_a_bad_pack(tmp_path):
    (tmp_path / "models" / "buffalo_l").mkdir(parents=True)
    with pytest.raises(ModelPackError, match="empty"):
        load_face_model("buffalo_l", models_root=tmp_path)


def test_home_insightface_is_searched_last(tmp_path, monkeypatch):
    monkeypatch.setattr(packs_module, "DEFAULT_ROOT", tmp_path / "home")
    roots = packs_module.as_roots(["/a", "/b"])
    assert roots == [Path("/a"), Path("/b"), tmp_path / "home"]


def test_packs_command_lists_and_checks(tmp_path, testpack_dir, capsys):
    make_pack(tmp_path, "good", testpack_dir)
    link_pack_files(tmp_path / "models" / "bad" / "bad", testpack_dir)
    assert packs_main(["--models_root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "good" in out and "ok" in out and "BROKEN" in out and "nested" in out


def test_two_recognizers_are_named_not_picked_silently(tmp_path, testpack_dir):
    folder = make_pack(tmp_path, "p", testpack_dir)
    (folder / "another_recognizer.onnx").symlink_to(testpack_dir / "mobilefacenet.onnx")
    with pytest.raises(ModelPackError, match=r"has 2 face recognizers \(another_recognizer.onnx, mobilefacenet.onnx\)"):
        resolve_pack("p", [tmp_path])
    (folder / "another_recognizer.onnx").unlink()
    (folder / "det_copy.onnx").symlink_to(testpack_dir / "det_2.5g.onnx")
    with pytest.raises(ModelPackError, match=r"has 2 face detectors \(det_2.5g.onnx, det_copy.onnx\)"):
        resolve_pack("p", [tmp_path])


def test_uppercase_onnx_is_refused_by_packs_and_load_alike(tmp_path, testpack_dir, capsys):
    folder = tmp_path / "models" / "p"
    folder.mkdir(parents=True)
    (folder / "det_2.5g.onnx").symlink_to(testpack_dir / "det_2.5g.onnx")
    (folder / "W600K.ONNX").symlink_to(testpack_dir / "mobilefacenet.onnx")
    message = r"W600K.ONNX must end in lowercase .onnx.*rename it \(W600K.ONNX -> W600K.onnx\)"
    with pytest.raises(ModelPackError, match=message):
        load_face_model("p", models_root=tmp_path, provider="cpu")
    assert packs_main(["--models_root", str(tmp_path)]) == 1
    assert "p              BROKEN" in capsys.readouterr().out
    (folder / "W600K.ONNX").rename(folder / "W600K.onnx")
    assert load_face_model("p", models_root=tmp_path, provider="cpu").embedding_size > 0


def test_zero_byte_onnx_is_called_empty(tmp_path, testpack_dir):
    folder = make_pack(tmp_path, "p", testpack_dir, files=("mobilefacenet.onnx",))
    (folder / "det_10g.onnx").write_bytes(b"")
    with pytest.raises(ModelPackError, match=r"det_10g.onnx is empty \(0 bytes\).*Download the pack again"):
        resolve_pack("p", [tmp_path])


def test_empty_pack_name_is_called_empty_not_nested(tmp_path, testpack_dir):
    make_pack(tmp_path, "p", testpack_dir)
    for name in ("", "  "):
        with pytest.raises(ModelPackError, match="the model pack name is empty"):
            resolve_pack(name, [tmp_path])
