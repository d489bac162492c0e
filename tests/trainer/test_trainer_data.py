"""The latent and text caches, the trainer's prompt files and the names of its samples, and the tiny face
dataset: no training."""

from __future__ import annotations

import os
import re

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline
from face_consistency.musubi_formats.dataset import load_dataset_config
from face_consistency.musubi_formats.names import parse_sample_name, sample_file_name
from face_consistency.trainer import models
from face_consistency.trainer.cache import CacheEncoders, cache_dataset, latent_cache_path, load_cached_item
from face_consistency.trainer.sampling import PromptFileError, load_prompt_file
from PIL import Image
from tiny_qwen import write_tiny_dataset, write_tiny_model_files

pytestmark = pytest.mark.trainer


def _image(path, size=(40, 30)):
    Image.new("RGB", size, (120, 30, 200)).save(path)


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
