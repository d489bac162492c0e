"""musubi-tuner's dataset TOML: pairing and bucket rules, items and captions, bad configs named, JSONL
datasets, and a plain folder given one: no model."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from face_consistency.musubi_formats.dataset import (
    DatasetConfigError,
    bucket_for,
    dataset_config_for,
    load_dataset_config,
    pair_controls,
)
from PIL import Image
from tiny_qwen import write_tiny_dataset

# run again by CI under the minimum library versions: the TOML and its schema are tomlkit's and pydantic's
pytestmark = pytest.mark.trainer


def _image(path, size=(40, 30)):
    Image.new("RGB", size, (120, 30, 200)).save(path)


def _toml(path, body):
    path.write_text(body, encoding="utf-8")
    return path


def test_pairing_rule_plain_and_numbered_controls(tmp_path):
    targets = [tmp_path / "t" / f"{name}.png" for name in ("a", "b", "c")]
    controls = tmp_path / "c"
    controls.mkdir()
    for name in ("a.png", "b_10.jpg", "b_2.png", "b_1.png", "other.png", "notes.txt"):
        (controls / name).write_bytes(b"")
    paired = pair_controls(targets, controls)
    assert [p.name for p in paired[targets[0]]] == ["a.png"]
    assert [p.name for p in paired[targets[1]]] == ["b_1.png", "b_2.png", "b_10.jpg"]
    assert paired[targets[2]] == ()


@pytest.mark.parametrize(
    ("image", "resolution", "enable", "no_upscale", "expected"),
    [
        ((1000, 500), (512, 512), False, False, (512, 512)),
        ((1000, 500), (100, 70), False, False, (96, 64)),
        ((1000, 500), (512, 512), True, False, (720, 352)),
        ((500, 1000), (512, 512), True, False, (352, 720)),
        ((200, 100), (512, 512), True, True, (192, 96)),
        ((200, 100), (512, 512), True, False, (720, 352)),
    ],
)
def test_buckets(image, resolution, enable, no_upscale, expected):
    bucket = bucket_for(image, resolution, enable_bucket=enable, no_upscale=no_upscale)
    assert bucket == expected
    assert bucket[0] % 16 == 0 and bucket[1] % 16 == 0


def test_dataset_toml_items_and_defaults(tmp_path):
    toml = write_tiny_dataset(tmp_path, n=3, size=(48, 32), controls_per_target=2, enable_bucket=True)
    group = load_dataset_config(toml)
    items = group.items
    assert [i.target.name for i in items] == ["item_0.png", "item_1.png", "item_2.png"]
    assert [c.name for c in items[1].controls] == ["item_1_0.png", "item_1_1.png"]
    assert items[0].caption == "tiny edit number 0"
    assert items[0].bucket == items[0].control_buckets[0] == (48, 32)
    assert items[0].cache_directory == tmp_path / "cache"


def test_image_without_caption_is_skipped_with_warning(tmp_path, caplog):
    toml = write_tiny_dataset(tmp_path, n=2)
    (tmp_path / "images" / "item_1.txt").unlink()
    with caplog.at_level(logging.WARNING):
        group = load_dataset_config(toml)
    assert [i.target.name for i in group.items] == ["item_0.png"]
    assert "item_1.png" in caplog.text and "no caption" in caplog.text


def test_target_without_control_is_an_error_naming_it(tmp_path):
    toml = write_tiny_dataset(tmp_path, n=2)
    (tmp_path / "controls" / "item_1.png").unlink()
    with pytest.raises(DatasetConfigError, match=r"item_1\.png has no control image"):
        load_dataset_config(toml)


def test_unreadable_image_is_named(tmp_path):
    toml = write_tiny_dataset(tmp_path, n=2)
    (tmp_path / "images" / "item_0.png").write_bytes(b"not a png")
    with pytest.raises(DatasetConfigError, match=r"cannot read image .*item_0\.png"):
        load_dataset_config(toml)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "[general]\nresolution = 64\nbogus = 1\n[[datasets]]\nimage_directory='x'\n",
            r"\[general\]: unknown key\(s\) \['bogus'\]",
        ),
        ("[general]\nresolution = 64\n", "no \\[\\[datasets\\]\\]"),
        ("[[datasets]]\nimage_directory = 'nope'\ncontrol_directory='nope'\n", "image_directory .*nope does not exist"),
        (
            "[[datasets]]\nimage_directory='a'\nimage_jsonl_file='b'\n",
            "exactly one of image_directory or image_jsonl_file",
        ),
        ("[general\n", "not valid TOML"),
        ("[general]\nresolution = 'big'\n[[datasets]]\nimage_directory='.'\n", "resolution must be"),
        ("[[datasets]]\nimage_directory='.'\nmultiple_target=true\n", "multiple_target"),
        (
            "[general]\ncaption_extension='txt'\n[[datasets]]\nimage_directory='.'\n",
            "caption_extension must start with a dot",
        ),
        ("[[datasets]]\nimage_directory='.'\ncontrol_directory='.'\n", "control_directory must differ"),
    ],
)
def test_bad_dataset_configs(tmp_path, body, message):
    with pytest.raises(DatasetConfigError, match=message):
        load_dataset_config(_toml(tmp_path / "d.toml", body))


def test_missing_control_directory_is_explained(tmp_path):
    (tmp_path / "img").mkdir()
    toml = _toml(tmp_path / "d.toml", f"[[datasets]]\nimage_directory = '{tmp_path / 'img'}'\n")
    with pytest.raises(DatasetConfigError, match="control_directory is required"):
        load_dataset_config(toml)


def test_jsonl_dataset(tmp_path):
    for name in ("t.png", "c0.png", "c1.png"):
        _image(tmp_path / name)
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(
        f'{{"image_path": "{tmp_path / "t.png"}", "caption": "edit", '
        f'"control_path_1": "{tmp_path / "c1.png"}", "control_path_0": "{tmp_path / "c0.png"}"}}\n',
        encoding="utf-8",
    )
    toml = _toml(tmp_path / "d.toml", f"[general]\nresolution = 32\n[[datasets]]\nimage_jsonl_file = '{jsonl}'\n")
    (item,) = load_dataset_config(toml).items
    assert [c.name for c in item.controls] == ["c0.png", "c1.png"]
    assert item.bucket == (32, 32)


def test_a_dataset_folder_without_a_toml_gets_one_the_trainer_accepts(tmp_path: Path) -> None:
    dataset = write_tiny_dataset(tmp_path / "data", n=3).parent
    (dataset / "dataset.toml").unlink()  # a plain folder: images/ with captions, controls/
    output_dir = tmp_path / "out"
    output_dir.mkdir()

    toml = dataset_config_for(str(dataset), output_dir, 64)

    assert toml == output_dir / "dataset.toml"
    group = load_dataset_config(toml)
    assert sorted(item.target.name for item in group.items) == ["item_0.png", "item_1.png", "item_2.png"]
    assert all(item.controls == (dataset / "controls" / item.target.name,) for item in group.items)
    assert all(item.bucket == (64, 64) for item in group.items)


def test_a_dataset_folder_needs_controls(tmp_path: Path) -> None:
    (tmp_path / "data" / "images").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no controls/ folder"):
        dataset_config_for(str(tmp_path / "data"), tmp_path, 1024)
    with pytest.raises(ValueError, match="neither a dataset .toml file nor a folder"):
        dataset_config_for(str(tmp_path / "missing"), tmp_path, 1024)
