"""Dataset TOML, pairing and bucket rules, caches, prompt files: no training."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline
from face_consistency.musubi_formats.dataset import (
    DatasetConfigError,
    bucket_for,
    dataset_config_for,
    load_dataset_config,
    pair_controls,
)
from face_consistency.musubi_formats.names import parse_sample_name, sample_file_name
from face_consistency.trainer import models
from face_consistency.trainer.cache import CacheEncoders, cache_dataset, latent_cache_path, load_cached_item
from face_consistency.trainer.sampling import PromptFileError, load_prompt_file
from PIL import Image
from tiny_qwen import write_tiny_dataset, write_tiny_model_files

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


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    files = write_tiny_model_files(tmp_path_factory.mktemp("models"))
    vae = models.load_vae(files.vae, torch.float32)
    pipeline = QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        processor=None,
        transformer=None,
    )
    loads = []

    def load_text_side():
        loads.append(1)
        return models.load_text_encoder(files.text_encoder, torch.float32), models.load_processor(files.tokenizer_dir)

    encoders = CacheEncoders(
        pipeline,
        files.vae,
        files.text_encoder,
        torch.float32,
        str(files.tokenizer_dir),
        True,
        torch.device("cpu"),
        load_text_side,
    )
    return encoders, loads


def test_cache_is_built_reused_and_rebuilt_on_change(tmp_path, encoders):
    encoders, text_side_loads = encoders
    toml = write_tiny_dataset(tmp_path, n=2, size=(48, 32), controls_per_target=2)
    items = load_dataset_config(toml).items
    assert cache_dataset(items, encoders) == {"built": 4, "reused": 0}
    cached = load_cached_item(items[0])
    assert cached["latents"].shape == (16, 1, 4, 6)
    assert cached["control_latents_1"].shape == (16, 1, 4, 6)
    assert cached["prompt_embeds"].dim() == 2 and cached["prompt_embeds"].shape[1] == 32
    assert latent_cache_path(items[0]).name == "item_0_0048x0032_qi.safetensors"

    assert cache_dataset(items, encoders) == {"built": 0, "reused": 4}
    assert len(text_side_loads) == 1, "the text encoder is loaded once, when first needed"

    # A changed target image rebuilds its latents only; a changed caption its text cache only.
    target = items[0].target
    Image.new("RGB", (48, 32), (0, 255, 0)).save(target)
    os.utime(target, ns=(1, 1))
    (tmp_path / "images" / "item_1.txt").write_text("another caption", encoding="utf-8")
    items = load_dataset_config(toml).items
    assert cache_dataset(items, encoders) == {"built": 2, "reused": 2}
    assert not torch.equal(load_cached_item(items[0])["latents"], cached["latents"])


def test_prompt_file_parsing_and_errors(tmp_path):
    control = tmp_path / "c.png"
    _image(control)
    prompts = tmp_path / "p.txt"
    prompts.write_text(
        "# comment\n\n"
        f"make it red --w 100 --h 64 --s 3 --d 7 --fs 2.5 --l 4 --n blurry --ci {control}\n"
        f"second --ci {control} --ci {control}\n",
        encoding="utf-8",
    )
    first, second = load_prompt_file(prompts)
    assert (first.prompt, first.width, first.height, first.steps, first.seed) == ("make it red", 96, 64, 3, 7)
    assert (first.flow_shift, first.cfg_scale, first.negative_prompt) == (2.5, 4.0, "blurry")
    assert first.controls == [control] and len(second.controls) == 2 and second.index == 1
    assert second.seed is None
    # musubi's CFG and negative, ComfyUI's Qwen-graph shift (ModelSamplingAuraFlow 3.0)
    assert (second.flow_shift, second.cfg_scale, second.negative_prompt, second.width) == (3.0, 4.0, " ", 256)

    prompts.write_text("x --q 3 --ci c.png\n", encoding="utf-8")
    with pytest.raises(PromptFileError, match=r"line 1: option\(s\) not understood: --q 3"):
        load_prompt_file(prompts)
    prompts.write_text("x --w big\n", encoding="utf-8")
    with pytest.raises(PromptFileError, match="not understood: --w big"):
        load_prompt_file(prompts)
    prompts.write_text("no control\n", encoding="utf-8")
    with pytest.raises(PromptFileError, match="need a control image"):
        load_prompt_file(prompts)


def test_sample_names_follow_musubi(tmp_path):
    control = tmp_path / "c.png"
    _image(control)
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"a --d 5 --ci {control}\nb --ci {control}\n", encoding="utf-8")
    first, second = load_prompt_file(prompts)
    stepped = sample_file_name("lora", first.index, first.seed, step=120, epoch=None)
    at_epoch = sample_file_name("lora", second.index, second.seed, step=9, epoch=3)
    assert re.fullmatch(r"lora_000120_00_\d{14}_5_000\.png", stepped)
    assert re.fullmatch(r"lora_e000003_01_\d{14}_000\.png", at_epoch)
    # what the evaluation and the run reader read back from the names
    read_back, read_back_at_epoch = parse_sample_name(stepped), parse_sample_name(at_epoch)
    assert (read_back.step, read_back.seed, read_back.prompt_index) == (120, 5, 0)
    assert (read_back_at_epoch.epoch, read_back_at_epoch.seed) == (3, None)


def test_tiny_face_dataset_crops_around_the_face(tmp_path, faces_dir, insightface_root):
    from face_consistency.faceid import load_face_model

    model = load_face_model("testpack", models_root=insightface_root, provider="cpu")
    toml = write_tiny_dataset(tmp_path, n=3, with_face_photos=faces_dir, size=(96, 96), face_model=model)
    items = load_dataset_config(toml).items
    results = model.analyze([str(i.target) for i in items])
    for item, result in zip(items, results):
        assert result.ok, item.target
        x1, _, x2, _ = result.face.bbox
        assert (x2 - x1) / 96 > 0.3, "the face should dominate the tiny image"


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
