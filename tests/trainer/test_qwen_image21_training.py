"""Qwen-Image 2.1 trains: tiny real-class models in ComfyUI's single-file layouts, a face dataset, the face
loss, samples, resume, and a 2.1 LoRA continued with --network_weights."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from face_consistency.cli import main as cli_main
from face_consistency.faceid import load_face_model
from face_consistency.musubi_formats.dataset import load_dataset_config
from face_consistency.trainer import flow_matching, qwen_image21
from face_consistency.trainer import qwen_image21_loading as q21
from face_consistency.trainer.cache import latent_cache_path, load_cached_item, text_cache_path
from face_consistency.trainer.cli import parse_args, validate_args
from face_consistency.trainer.flow_matching import flow_shift
from face_consistency.trainer.sampling import load_prompt_file
from face_consistency.trainer.train import memory_inputs
from face_consistency.trainer.vae_decode import checkpointed_decode, rgb_over_white
from face_consistency.training_contract import libraries
from face_consistency.training_contract.model_versions import QWEN_IMAGE_21
from face_consistency.training_contract.protocol import read_metrics, read_status
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_qwen import merge_lora, tiny_train_argv, write_tiny_dataset, write_tiny_prompts
from tiny_qwen_image21 import tiny_qwen_image21_vae, write_tiny_qwen_image21_files

TOO_OLD_FOR_21 = libraries.too_old_for("qwen-image-2.1")
pytestmark = [pytest.mark.trainer, pytest.mark.skipif(TOO_OLD_FOR_21 is not None, reason=str(TOO_OLD_FOR_21))]

CONTROLS = 2


@pytest.fixture(scope="module")
def setup21(tmp_path_factory, insightface_root: Path, faces_dir: Path, testpack_dir: Path) -> dict:
    root = tmp_path_factory.mktemp("q21_training")
    files = write_tiny_qwen_image21_files(root / "models")
    engine = load_face_model(testpack_dir, provider="cpu", det_size=640)
    dataset = write_tiny_dataset(
        root / "data", n=2, with_face_photos=faces_dir, face_model=engine, controls_per_target=CONTROLS
    )
    prompts = write_tiny_prompts(root / "data", n=1, size=(64, 64))
    return {"files": files, "dataset": dataset, "prompts": prompts, "root": insightface_root}


def argv21(setup: dict, out: Path, steps: int, *extra: str) -> list[str]:
    argv = tiny_train_argv(setup["files"], setup["dataset"], out, max_train_steps=steps, extra=extra)
    return [a for a in argv if a != "--edit_plus"] + ["--model_version", "qwen-image-2.1"]


FACE_FLAGS = ("--face_model_name", "testpack", "--face_device", "cpu", "--use_face_as_loss", "--face_loss_max_t", "1")


@pytest.fixture(scope="module")
def face_run(setup21, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q21_face_run") / "out"
    extra = (
        *FACE_FLAGS,
        "--face_models_root",
        str(setup21["root"]),
        "--sample_prompts",
        str(setup21["prompts"]),
        "--sample_every_n_steps",
        "2",
        "--save_every_n_steps",
        "1",
        "--save_state",
    )
    assert cli_main(["train", *argv21(setup21, out, 2, *extra)]) == 0, read_status(out)
    return out


def test_cache_holds_64_channel_latents_and_the_controls_vision_slots(setup21, face_run):
    item = load_dataset_config(setup21["dataset"]).items[0]
    cached = load_cached_item(item)
    # 64x64 pixels at 16x; each control at the target's area (64x64), its 2x2 latent groups as vision slots
    assert cached["latents"].shape == (64, 1, 4, 4)
    assert [cached[f"control_latents_{k}"].shape for k in range(CONTROLS)] == [(64, 1, 4, 4)] * CONTROLS
    assert cached["image_pad_mask"].dtype == torch.bool and int(cached["image_pad_mask"].sum()) == CONTROLS * 4
    assert cached["prompt_embeds"].shape == (cached["image_pad_mask"].shape[0], 32)
    assert latent_cache_path(item).is_file() and text_cache_path(item).is_file()


def test_run_trains_with_the_face_loss_and_samples_as_rgb(face_run):
    status = read_status(face_run)
    assert status["state"] == "completed" and status["step"] == 2
    steps = [m for m in read_metrics(face_run) if "loss" in m]
    assert any("loss/face" in m for m in steps), steps
    samples = sorted((face_run / "sample").glob("*.png"))
    assert samples and all(Image.open(p).size == (64, 64) and Image.open(p).mode == "RGB" for p in samples)


def test_the_memory_plan_reads_the_21_model_and_only_the_prompts_text(setup21, face_run):
    assert read_status(face_run)["memory_plan"]["total_gib"] >= 0  # planned, not skipped
    config = validate_args(parse_args(argv21(setup21, face_run / "again", 2, *FACE_FLAGS)))
    group = load_dataset_config(setup21["dataset"])
    inputs = memory_inputs(config, group)
    assert inputs.family == QWEN_IMAGE_21 and inputs.transformer_config["num_layers"] == 2
    assert inputs.vae_config["z_dim"] == 64
    # the controls as encoded (at the target's area, 64x64), not at the dataset's control resolution
    assert inputs.target_size == (64, 64) and inputs.control_sizes == ((64, 64),) * CONTROLS
    cached = [load_cached_item(item) for item in group.items]
    text = max(c["image_pad_mask"].shape[0] - int(c["image_pad_mask"].sum()) for c in cached)
    assert inputs.text_tokens == text  # the controls' vision slots are counted with their images' tokens


def test_lora_is_in_comfyuis_21_layout_with_its_metadata(setup21, face_run):
    lora_file = face_run / "tiny.safetensors"
    keys = load_file(str(lora_file)).keys()
    assert keys and all(k.startswith("transformer.transformer_blocks.") for k in keys)
    assert "transformer.transformer_blocks.1.img_mlp.gate_layer.lora_down.weight" in keys
    assert "transformer.transformer_blocks.1.img_mlp.proj.lora_up.weight" in keys
    with safe_open(str(lora_file), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["ss_model_version"] == "qwen-image-2.1" and metadata["ss_base_model_version"] == "qwen_image_2.1"


def test_resume_continues_a_21_run(setup21, face_run, tmp_path):
    state = face_run / "tiny-step00000001-state"
    assert json.loads((state / "trainer_state.json").read_text())["step"] == 1
    out = tmp_path / "resumed"
    assert cli_main(["train", *argv21(setup21, out, 2, "--resume", str(state))]) == 0, read_status(out)
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [2]
    assert read_status(out)["state"] == "completed"


def test_a_21_lora_continues_with_network_weights(setup21, face_run, tmp_path):
    start = load_file(str(face_run / "tiny.safetensors"))
    out = tmp_path / "continued"
    argv = argv21(setup21, out, 1, "--network_weights", str(face_run / "tiny.safetensors"))
    assert cli_main(["train", *argv]) == 0, read_status(out)
    trained = load_file(str(out / "tiny.safetensors"))
    assert trained.keys() == start.keys()
    changed = [k for k in start if k.endswith(".weight") and not torch.allclose(trained[k], start[k])]
    assert changed and all(k.endswith("lora_down.weight") or k.endswith("lora_up.weight") for k in changed)


def test_each_item_of_a_batch_of_prompts_of_different_lengths_gets_its_own_velocity(setup21, face_run, monkeypatch):
    """2.1 appends the target's tokens after the whole prompt, so right-padding a shorter prompt in a
    batch would move its target's positions away from where an unpadded prompt (ComfyUI's) puts them:
    in a padded batch each item's velocity is the one it has alone."""
    items = load_dataset_config(setup21["dataset"]).items[:2]
    cached = {str(item.target): load_cached_item(item) for item in items}
    longer = cached[str(items[1].target)]  # the second prompt gets 9 more text tokens after its own
    extra = torch.randn(9, longer["prompt_embeds"].shape[1], generator=torch.Generator().manual_seed(1))
    longer["prompt_embeds"] = torch.cat([longer["prompt_embeds"], extra])
    longer["image_pad_mask"] = torch.cat([longer["image_pad_mask"], torch.zeros(9, dtype=torch.bool)])
    monkeypatch.setattr(flow_matching, "load_cached_item", lambda item: cached[str(item.target)])
    batch = flow_matching.collate(items)
    assert int(batch.prompt_mask[0].sum()) < batch.prompt_mask.shape[1]  # the first prompt is padded
    transformer = q21.load_transformer(setup21["files"].dit, torch.float32).eval()
    latents = torch.randn(batch.x0.shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        together = qwen_image21.velocity(
            transformer,
            latents,
            t,
            batch.controls,
            batch.prompt_embeds,
            flow_matching.attention_mask(batch.prompt_mask),
            batch.image_pad_mask,
        )
        for i, item in enumerate(items):
            own = cached[str(item.target)]
            alone = qwen_image21.velocity(
                transformer,
                latents[i : i + 1],
                t[i : i + 1],
                [c[i : i + 1] for c in batch.controls],
                own["prompt_embeds"].unsqueeze(0),
                None,
                own["image_pad_mask"].unsqueeze(0),
            )
            torch.testing.assert_close(together[i : i + 1], alone)


def test_checkpointed_decode_of_the_21_vae_equals_its_decode_and_composites_over_white():
    vae = tiny_qwen_image21_vae(0).eval()
    latents = torch.randn(2, 64, 1, 3, 2)
    with torch.no_grad():
        plain = vae.decode(latents).sample
    staged = checkpointed_decode(vae, latents.requires_grad_(True))
    torch.testing.assert_close(staged.detach(), plain, atol=1e-5, rtol=1e-4)
    staged.sum().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    rgba = torch.tensor([0.2, -0.4, 1.0, -1.0]).view(1, 4, 1, 1)  # fully transparent: white
    assert torch.allclose(rgb_over_white(rgba), torch.ones(1, 3, 1, 1))
    opaque = torch.tensor([0.2, -0.4, 1.0, 1.0]).view(1, 4, 1, 1)
    assert torch.allclose(rgb_over_white(opaque), opaque[:, :3])


def test_21_datasets_need_sides_of_32_and_at_most_ten_controls(setup21, tmp_path):
    from face_consistency.musubi_formats.dataset import DatasetConfigError

    odd = write_tiny_dataset(tmp_path / "odd", n=1, size=(48, 48))
    with pytest.raises(DatasetConfigError, match="multiples of 32"):
        qwen_image21.check_items(load_dataset_config(odd).items)
    crowded = write_tiny_dataset(tmp_path / "crowded", n=1, controls_per_target=11)
    with pytest.raises(DatasetConfigError, match="at most 10"):
        qwen_image21.check_items(load_dataset_config(crowded).items)


def test_condition_images_go_at_the_targets_area_and_rgba_keeps_its_alpha():
    wide = Image.new("RGB", (200, 100))
    width, height = qwen_image21.condition_size(wide, (64, 64))
    assert width % 32 == height % 32 == 0 and width > height
    transparent = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    fitted = qwen_image21.fit(transparent, (32, 32))
    assert fitted.mode == "RGBA" and fitted.size == (32, 32) and fitted.getpixel((5, 5))[3] == 0
    assert qwen_image21.fit(wide, (32, 32)).getpixel((3, 3))[3] == 255


def test_21_trains_at_the_published_dynamic_shift_and_samples_at_comfyuis_fixed_one(tmp_path):
    # the published scheduler (2509's values): mu = 0.5 at 256 target tokens, 0.9 at 8192
    flow = SimpleNamespace(timestep_sampling="qwen_shift", discrete_flow_shift=3.0)
    assert flow_shift(flow, 256) == pytest.approx(math.exp(0.5))
    assert flow_shift(flow, 8192) == pytest.approx(math.exp(0.9))
    # ComfyUI: mu 0.69 whatever the size (the published value at 1024²), unless --fs
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a face --w 512 --h 512\na face --w 2048 --h 2048\na face --w 1024 --h 1024 --fs 3\n")
    shifts = [p.flow_shift for p in load_prompt_file(prompts, qwen21=True)]
    assert shifts[:2] == [pytest.approx(math.exp(0.69))] * 2 and shifts[2] == 3.0
    assert flow_shift(flow, (1024 // 16) ** 2) == pytest.approx(math.exp(0.69), abs=0.01)


def test_the_processor_is_qwen3_vl(setup21):
    processor = q21.load_processor(setup21["files"].tokenizer_dir)
    assert type(processor).__name__ == "Qwen3VLProcessor"


def _flow_loss_21(transformer, cached: dict, t_values: list[float]) -> float:
    """Mean squared error to the velocity target over fixed noise draws and times, through 2.1's model call."""
    generator = torch.Generator().manual_seed(0)
    x0 = cached["latents"].unsqueeze(0)
    controls = [cached[f"control_latents_{k}"].unsqueeze(0) for k in range(CONTROLS)]
    total = 0.0
    for t in t_values:
        noise = torch.randn(x0.shape, generator=generator)
        with torch.no_grad():
            v_pred = qwen_image21.velocity(
                transformer,
                (1 - t) * x0 + t * noise,
                torch.tensor([t]),
                controls,
                cached["prompt_embeds"].unsqueeze(0),
                None,
                cached["image_pad_mask"].unsqueeze(0),
            )
        total += torch.mean((v_pred - (noise - x0)) ** 2).item()
    return total / len(t_values)


def test_overfitting_one_item_lowers_the_21_flow_loss_of_the_saved_lora(setup21, tmp_path):
    """60 steps on one item (the tiny 2.1 model learns slower than the 2509 one: 16 unpatched 64-channel
    tokens), then the saved LoRA merged into the base DiT by its `transformer.<layer>` keys: the
    flow-matching loss of that item falls (the step trains the velocity the model is sampled with)."""
    dataset = write_tiny_dataset(tmp_path / "one", n=1, seed=5, controls_per_target=CONTROLS)
    out = tmp_path / "out"
    extra = ("--learning_rate", "1e-2", "--timestep_sampling", "uniform", "--gradient_checkpointing")
    argv = tiny_train_argv(setup21["files"], dataset, out, max_train_steps=60, extra=extra)
    argv = [a for a in argv if a != "--edit_plus"] + ["--model_version", "qwen-image-2.1"]
    assert cli_main(["train", *argv]) == 0, read_status(out)
    cached = load_cached_item(load_dataset_config(dataset).items[0])
    base = q21.load_transformer(setup21["files"].dit, torch.float32)
    t_values = [0.1 * k for k in range(1, 10)]
    before = _flow_loss_21(base, cached, t_values)
    lora = load_file(str(out / "tiny.safetensors"))
    linear = {"transformer." + n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    merge_lora(linear, lora)
    after = _flow_loss_21(base, cached, t_values)
    assert after < 0.8 * before, (before, after)
