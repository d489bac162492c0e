"""Tiny random Qwen-Image-Edit models and datasets on disk, for tests that run the real trainer.

Shared test infrastructure (trainer, face-loss and job-control tests import it):

    from tiny_qwen import write_tiny_model_files, write_tiny_dataset, tiny_train_argv

    files = write_tiny_model_files(tmp_path / "models")        # TinyModelFiles(dit, vae, text_encoder, tokenizer_dir)
    dataset_toml = write_tiny_dataset(tmp_path / "data", n=4)  # real PNGs, controls, captions, dataset TOML
    prompts = write_tiny_prompts(tmp_path / "data")            # musubi prompt file using the dataset's controls
    argv = tiny_train_argv(files, dataset_toml, tmp_path / "out", max_train_steps=4,
                           extra=["--sample_prompts", str(prompts), "--sample_every_n_steps", "2"])
    face_consistency.cli.main(["train", *argv])                # or bootstrap.py in a subprocess

Face datasets: `write_tiny_dataset(dir, n, with_face_photos=<folder or paths>, face_model=<FaceModel>)`
crops each photo around its face. `fp8_scaled(state_dict)` gives ComfyUI's `_fp8_scaled` layout.

The models are the real classes (diffusers `QwenImageTransformer2DModel`,
`AutoencoderKLQwenImage`, transformers `Qwen2_5_VLForConditionalGeneration`) with tiny random
configs, written as ComfyUI-style single files with the real key layouts: the DiT with the
`model.diffusion_model.` prefix (or without), the VAE with Wan-style names, the text encoder with
`model.*` / `visual.*` keys (optionally as an `_fp8_scaled` file). Each file carries its tiny
architecture in the safetensors metadata entry `config`, which the trainer's loader prefers over
its shipped full-size configs. The tokenizer is a byte-level BPE with the Qwen special tokens,
built locally (no downloads). A full tiny training run takes seconds on a CPU.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from face_consistency.musubi_formats.dataset import write_dataset_config
from PIL import Image, ImageDraw, ImageOps
from safetensors.torch import save_file

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
DIT_PREFIX = "model.diffusion_model."

TINY_TRANSFORMER_CONFIG = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "guidance_embeds": False,
    "axes_dims_rope": [4, 6, 6],
}
# Same block structure as the real VAE (dim_mult and num_res_blocks fix the Wan key layout).
TINY_VAE_CONFIG = {
    "base_dim": 8,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
}


@dataclass(frozen=True)
class TinyModelFiles:
    dit: Path
    vae: Path
    text_encoder: Path
    tokenizer_dir: Path


def build_tiny_processor():
    """A Qwen2VLProcessor whose tokenizer is byte-level BPE over the 256 byte symbols + Qwen specials."""
    import transformers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer, Qwen2TokenizerFast, Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    vocab = {symbol: index for index, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    specials = list(QWEN_SPECIAL_TOKENS[1:])
    if int(transformers.__version__.split(".")[0]) >= 5:
        tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], additional_special_tokens=specials)
    else:  # transformers 4.x builds the fast tokenizer from vocab/merges files only
        with tempfile.TemporaryDirectory() as folder:
            vocab_file, merges_file = Path(folder) / "vocab.json", Path(folder) / "merges.txt"
            vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
            merges_file.write_text("#version: 0.2\n", encoding="utf-8")
            tokenizer = Qwen2TokenizerFast(
                vocab_file=str(vocab_file), merges_file=str(merges_file), additional_special_tokens=specials
            )
    return Qwen2VLProcessor(
        # Few vision patches keep the tiny prompt short (the pipeline still resizes controls to ~384^2).
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
    )


def tiny_text_encoder_config(tokenizer, hidden_size: int = TINY_TRANSFORMER_CONFIG["joint_attention_dim"]) -> dict:
    """Two tiny layers whose hidden size is the DiT's joint_attention_dim (head dim 16)."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    return {
        "model_type": "qwen2_5_vl",
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
        "text_config": {
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": hidden_size // 16,
            "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
        },
        "vision_config": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
        },
    }


def resnet_to_wan(rest: str) -> str:
    """`norm1.gamma` -> `residual.0.gamma` etc. (the Wan residual Sequential indices)."""
    for diffusers_name, wan_name in (
        ("norm1.", "residual.0."),
        ("conv1.", "residual.2."),
        ("norm2.", "residual.3."),
        ("conv2.", "residual.6."),
        ("conv_shortcut.", "shortcut."),
    ):
        if rest.startswith(diffusers_name):
            return wan_name + rest[len(diffusers_name) :]
    return rest


def diffusers_vae_key_to_wan(key: str) -> str:
    """The name ComfyUI's `qwen_image_vae.safetensors` uses for an AutoencoderKLQwenImage key.

    Written independently of diffusers' Wan converter (the loader under test uses that one).
    """
    top = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2."}
    for prefix, wan in top.items():
        if key.startswith(prefix):
            return wan + key[len(prefix) :]
    side, rest = key.split(".", 1)
    if rest.startswith("conv_in."):
        return f"{side}.conv1.{rest[len('conv_in.') :]}"
    if rest.startswith("norm_out."):
        return f"{side}.head.0.{rest[len('norm_out.') :]}"
    if rest.startswith("conv_out."):
        return f"{side}.head.2.{rest[len('conv_out.') :]}"
    if rest.startswith("mid_block."):
        parts = rest.split(".")
        kind, index, tail = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "attentions":
            return f"{side}.middle.1.{tail}"
        return f"{side}.middle.{2 * index}.{resnet_to_wan(tail)}"
    if rest.startswith("down_blocks."):
        _, index, tail = rest.split(".", 2)
        return f"{side}.downsamples.{index}.{resnet_to_wan(tail)}"
    if rest.startswith("up_blocks."):
        parts = rest.split(".")
        block = int(parts[1])
        if parts[2] == "resnets":
            return f"{side}.upsamples.{4 * block + int(parts[3])}.{resnet_to_wan('.'.join(parts[4:]))}"
        if parts[2] == "upsamplers":
            return f"{side}.upsamples.{4 * block + 3}.{'.'.join(parts[4:])}"
    raise KeyError(f"no Wan name known for VAE key {key}")


def merge_lora(linear: dict[str, torch.nn.Linear], lora: dict[str, torch.Tensor]) -> None:
    """Add a LoRA file's deltas (`up @ down * alpha / rank`, as ComfyUI applies them) to the Linear layers
    named by each key's stem (`linear`: stem -> layer)."""
    with torch.no_grad():
        for key in lora:
            if key.endswith(".lora_down.weight"):
                stem = key[: -len(".lora_down.weight")]
                down, up = lora[key], lora[f"{stem}.lora_up.weight"]
                linear[stem].weight += up @ down * (lora[f"{stem}.alpha"] / down.shape[0])


def fp8_scaled(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI `_fp8_scaled` layout: 2-D weights as float8_e4m3fn + `.scale_weight`, plus the marker."""
    out: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, value in state_dict.items():
        if key.endswith(".weight") and value.dim() == 2 and "embed" not in key:
            scale = value.abs().max().clamp(min=1e-8) / 448.0
            out[key] = (value / scale).to(torch.float8_e4m3fn)
            out[key[: -len(".weight")] + ".scale_weight"] = scale.reshape(1).to(torch.float32)
        else:
            out[key] = value
    return out


def write_tiny_model_files(
    directory: str | Path,
    *,
    seed: int = 0,
    dit_prefix: bool = True,
    text_encoder_fp8: bool = False,
    edit_2511: bool = False,
    transformer_config: dict = TINY_TRANSFORMER_CONFIG,
    vae_config: dict = TINY_VAE_CONFIG,
    processor=None,
) -> TinyModelFiles:
    """Write tiny random DiT, VAE, text encoder (ComfyUI single files) and a tokenizer folder.

    edit_2511: the DiT carries ComfyUI's Edit-2511 marker `__index_timestep_zero__` (the weights
    of 2509 and 2511 have the same layout). transformer_config: another DiT architecture (the text
    encoder's hidden size follows its joint_attention_dim); vae_config: another VAE (e.g. fewer
    downsamplings); processor: another tokenizer and image processor (default `build_tiny_processor()`),
    whose vocabulary the text encoder's embedding follows."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from face_consistency.trainer.models import text_encoder_config
    from transformers import Qwen2_5_VLForConditionalGeneration

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    transformer = QwenImageTransformer2DModel(**transformer_config)
    # Random init leaves the output projection and modulation near zero; scale it so the tiny
    # model predicts something non-trivial and LoRA deltas change the output measurably.
    with torch.no_grad():
        transformer.proj_out.weight.normal_(0.0, 0.2)
    prefix = DIT_PREFIX if dit_prefix else ""
    dit_sd = {prefix + k: v.contiguous() for k, v in transformer.state_dict().items()}
    if edit_2511:
        dit_sd[prefix + "__index_timestep_zero__"] = torch.tensor([])
    dit = root / f"qwen_image_edit_{2511 if edit_2511 else 2509}_tiny.safetensors"
    save_file(dit_sd, str(dit), metadata={"config": json.dumps(transformer_config)})

    vae_model = AutoencoderKLQwenImage(**vae_config)
    vae_sd = {diffusers_vae_key_to_wan(k): v.contiguous() for k, v in vae_model.state_dict().items()}
    vae = root / "qwen_image_vae_tiny.safetensors"
    save_file(vae_sd, str(vae), metadata={"config": json.dumps(vae_config)})

    processor = processor or build_tiny_processor()
    tokenizer_dir = root / "tokenizer"
    processor.save_pretrained(str(tokenizer_dir))
    te_config = tiny_text_encoder_config(processor.tokenizer, transformer_config["joint_attention_dim"])
    text_model = Qwen2_5_VLForConditionalGeneration(text_encoder_config(te_config))
    te_sd: dict[str, torch.Tensor] = {}
    for key, value in text_model.state_dict().items():
        if key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model.") :]
        elif key.startswith("model.visual."):
            key = key[len("model.") :]
        elif key == "lm_head.weight":
            continue  # ComfyUI's text-encoder files carry no LM head
        te_sd[key] = value.contiguous()
    name = "qwen_2.5_vl_tiny_fp8_scaled.safetensors" if text_encoder_fp8 else "qwen_2.5_vl_tiny.safetensors"
    if text_encoder_fp8:
        te_sd = fp8_scaled(te_sd)
    text_encoder = root / name
    save_file(te_sd, str(text_encoder), metadata={"config": json.dumps(te_config)})
    return TinyModelFiles(dit=dit, vae=vae, text_encoder=text_encoder, tokenizer_dir=tokenizer_dir)


def _synthetic_image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A smooth colour field with a few shapes: compressible, and distinct per seed."""
    width, height = size
    base = rng.uniform(40, 215, size=3)
    gradient = np.linspace(0, 1, width)[None, :, None] * rng.uniform(-40, 40, size=3)
    pixels = np.clip(base + gradient + np.zeros((height, 1, 1)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        x1, y1 = x0 + rng.integers(8, width // 2), y0 + rng.integers(8, height // 2)
        draw.ellipse((int(x0), int(y0), int(x1), int(y1)), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


def _face_photos(with_face_photos: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(with_face_photos, (str, Path)) and Path(with_face_photos).is_dir():
        return sorted(p for p in Path(with_face_photos).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if isinstance(with_face_photos, (str, Path)):
        return [Path(with_face_photos)]
    return [Path(p) for p in with_face_photos]


def _face_square(photo: Image.Image, face_model, size: tuple[int, int]) -> Image.Image:
    """The photo cropped to a square around its largest face (2x the face box), or the upper centre."""
    if face_model is not None:
        result = face_model.analyze([photo])[0]
        if result.ok:
            x1, y1, x2, y2 = (float(v) for v in result.face.bbox)
            side = min(2.0 * max(x2 - x1, y2 - y1), photo.width, photo.height)
            left = min(max((x1 + x2) / 2 - side / 2, 0), photo.width - side)
            top = min(max((y1 + y2) / 2 - side / 2, 0), photo.height - side)
            photo = photo.crop((round(left), round(top), round(left + side), round(top + side)))
            return photo.resize(size, Image.Resampling.LANCZOS)
    return ImageOps.fit(photo, size, method=Image.Resampling.LANCZOS, centering=(0.5, 0.2))


def write_tiny_dataset(
    directory: str | Path,
    n: int = 4,
    *,
    with_face_photos: str | Path | Sequence[str | Path] | None = None,
    face_model=None,
    size: tuple[int, int] = (64, 64),
    controls_per_target: int = 1,
    seed: int = 0,
    batch_size: int = 1,
    num_repeats: int = 1,
    enable_bucket: bool = False,
    pairs: Sequence[tuple[Image.Image, Image.Image]] | None = None,
) -> Path:
    """Write `n` target images (PNG), their controls, captions and a musubi dataset TOML; return its path.

    Layout: `<dir>/images/item_<i>.png` + `item_<i>.txt`, `<dir>/controls/item_<i>.png` (or
    `item_<i>_<k>.png` with several controls per target), cache under `<dir>/cache`.
    With `with_face_photos` (a folder or list of photos), targets are those photos (cycled),
    cropped square around the largest face found by `face_model` (a `faceid.FaceModel`; without
    one, the upper centre) and resized to `size`, so a face dominates; each control is the same
    crop mirrored. With `pairs`, the `(target, control)` images are given (`n` of them, one
    control each).
    """
    root = Path(directory)
    images, controls, cache = root / "images", root / "controls", root / "cache"
    images.mkdir(parents=True, exist_ok=True)
    controls.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = _face_photos(with_face_photos) if with_face_photos is not None else []
    for i in range(n):
        stem = f"item_{i}"
        if pairs is not None:
            target, control_images = pairs[i][0], [pairs[i][1]]
        elif photos:
            with Image.open(photos[i % len(photos)]) as photo:
                target = _face_square(photo.convert("RGB"), face_model, size)
            control_images = [ImageOps.mirror(target) for _ in range(controls_per_target)]
        else:
            target = _synthetic_image(rng, size)
            control_images = [_synthetic_image(rng, size) for _ in range(controls_per_target)]
        target.save(images / f"{stem}.png")
        (images / f"{stem}.txt").write_text(f"tiny edit number {i}", encoding="utf-8")
        for k, control in enumerate(control_images):
            name = f"{stem}.png" if controls_per_target == 1 else f"{stem}_{k}.png"
            control.save(controls / name)
    general = {
        "resolution": list(size),
        "caption_extension": ".txt",
        "batch_size": batch_size,
        "num_repeats": num_repeats,
        "enable_bucket": enable_bucket,
        "bucket_no_upscale": False,
    }
    return write_dataset_config(
        root / "dataset.toml",
        general,
        [{"image_directory": str(images), "control_directory": str(controls), "cache_directory": str(cache)}],
    )


def tiny_train_argv(
    files: TinyModelFiles,
    dataset_toml: str | Path,
    output_dir: str | Path,
    *,
    max_train_steps: int = 4,
    output_name: str = "tiny",
    extra: Sequence[str] = (),
) -> list[str]:
    """The seed guide's flag set, sized for the tiny models on a CPU (arguments after `train`)."""
    return [
        "--dit",
        str(files.dit),
        "--vae",
        str(files.vae),
        "--text_encoder",
        str(files.text_encoder),
        "--tokenizer",
        str(files.tokenizer_dir),
        "--dataset_config",
        str(dataset_toml),
        "--edit_plus",
        "--sdpa",
        "--mixed_precision",
        "no",
        "--timestep_sampling",
        "shift",
        "--discrete_flow_shift",
        "2.2",
        "--weighting_scheme",
        "none",
        "--optimizer_type",
        "AdamW",
        "--learning_rate",
        "1e-3",
        "--network_module",
        "networks.lora_qwen_image",
        "--network_dim",
        "4",
        "--network_alpha",
        "4",
        "--max_train_steps",
        str(max_train_steps),
        "--output_dir",
        str(output_dir),
        "--output_name",
        output_name,
        "--seed",
        "42",
        *extra,
    ]


def write_tiny_prompts(
    dataset_dir: str | Path, n: int = 1, *, size: tuple[int, int] = (32, 32), steps: int = 2
) -> Path:
    """A musubi prompt file using the tiny dataset's controls (written by write_tiny_dataset)."""
    controls = sorted((Path(dataset_dir) / "controls").glob("*.png"))
    lines = ["# tiny sample prompts"]
    for i in range(n):
        lines.append(
            f"tiny edit number {i} --w {size[0]} --h {size[1]} --s {steps} --d {100 + i} "
            f"--ci {controls[i % len(controls)]}"
        )
    path = Path(dataset_dir) / "prompts.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
