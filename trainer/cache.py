"""Latent and text-encoder caches: safetensors files under each dataset's cache_directory.

Per target `stem` (musubi-like names):
- `{stem}_{W:04d}x{H:04d}_qi.safetensors`: `latents` [16, 1, h, w] and `control_latents_{k}`;
- `{stem}_qi_te.safetensors`: `prompt_embeds` [tokens, dim] of the Edit prompt template with the
  control images (diffusers' `QwenImageEditPlusPipeline.encode_prompt`, controls at ~384^2 area).

Qwen-Image 2.1 (`QwenImage21Encoders`, `qwen_image21.py`): latents [64, 1, h, w] of the RGBA images,
each control encoded at the target's area; `prompt_embeds` of Qwen3-VL with the same controls and
`image_pad_mask` [tokens], where the controls' vision slots are.

Each file records a fingerprint of its inputs (image files' size and mtime, bucket, caption,
model file) in its metadata; a cache is reused while the fingerprint matches and rebuilt when
anything changed. Writes are atomic, so an interrupted caching run never leaves a half file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
    CONDITION_IMAGE_SIZE,
    VAE_IMAGE_SIZE,
    calculate_dimensions,
)
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..common.files import atomic_path
from ..musubi_formats.dataset import DatasetConfigError, DatasetItem
from . import qwen_image21

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
FINGERPRINT_KEY = "fingerprint"


def file_identity(path: Path) -> list:
    """What identifies an input file's version in a fingerprint: resolved path, size, mtime."""
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def input_fingerprint(payload: dict) -> str:
    """Hash of a cache file's inputs (JSON-serialisable), stored in its metadata."""
    payload = {"version": CACHE_FORMAT_VERSION, **payload}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def latent_cache_path(item: DatasetItem) -> Path:
    width, height = item.bucket
    return item.cache_directory / f"{item.key}_{width:04d}x{height:04d}_qi.safetensors"


def text_cache_path(item: DatasetItem) -> Path:
    return item.cache_directory / f"{item.key}_qi_te.safetensors"


def cached_fingerprint(path: Path) -> str | None:
    """The fingerprint a cache file was written with (None: missing or unreadable)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(FINGERPRINT_KEY)
    except (FileNotFoundError, SafetensorError, OSError):
        return None


def _save(path: Path, tensors: dict[str, torch.Tensor], fingerprint: str) -> None:
    with atomic_path(path) as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata={FINGERPRINT_KEY: fingerprint},
        )


def open_image(path: Path, mode: str = "RGB") -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except OSError as exc:
        raise DatasetConfigError(f"cannot read image {path}: {exc}") from exc


class Encoders(Protocol):
    """What caching and the samples ask of a model family's frozen encoders."""

    vae_file: Path
    text_encoder_file: Path
    text_encoder_dtype: torch.dtype
    tokenizer_id: str
    image_mode: str  # what images are opened as ("RGB"; Qwen-Image 2.1 reads "RGBA")

    @property
    def vae(self) -> torch.nn.Module: ...
    @property
    def text_settings(self) -> dict[str, Any]:
        """What else the text cache depends on (the prompt template)."""
        ...

    def encode_image(self, image: Image.Image, size: tuple[int, int]) -> torch.Tensor: ...
    def control_sizes(self, controls: list[Image.Image], target_size: tuple[int, int]) -> list[tuple[int, int]]: ...
    def dataset_control_sizes(self, item: DatasetItem, controls: list[Image.Image]) -> list[tuple[int, int]]: ...
    def encode_text(
        self, caption: str, controls: list[Image.Image], target_size: tuple[int, int]
    ) -> dict[str, torch.Tensor]: ...


@dataclass
class CacheEncoders:
    """The frozen encoders, wrapped in diffusers' Edit pipeline for its prompt encoding and VAE helpers.

    The text encoder and processor are loaded by `load_text_side` on the first prompt to encode,
    so a run whose text caches are all valid (and has no sample prompts) never loads the 7B model.
    """

    # diffusers registers a pipeline's parts at run time: mypy sees none of them (hence the ignores below)
    pipeline: QwenImageEditPlusPipeline | QwenImageEditPipeline
    vae_file: Path
    text_encoder_file: Path
    text_encoder_dtype: torch.dtype
    tokenizer_id: str
    edit_plus: bool
    device: torch.device
    load_text_side: Callable[[], tuple[torch.nn.Module, Any]]  # -> (text encoder, processor)

    image_mode = "RGB"

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipeline.vae

    @property
    def text_settings(self) -> dict[str, Any]:
        return {"edit_plus": self.edit_plus}

    def _ensure_text_side(self) -> None:
        if self.pipeline.text_encoder is None:
            text_encoder, processor = self.load_text_side()
            self.pipeline.text_encoder = text_encoder
            self.pipeline.processor = processor
            self.pipeline.tokenizer = processor.tokenizer

    def encode_image(self, image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
        """Normalised latents [16, 1, h, w] of `image` resized to cover `size` and centre-cropped."""
        width, height = size
        pixels = self.pipeline.image_processor.preprocess(image, height, width, resize_mode="crop")
        pixels = pixels.unsqueeze(2).to(self.device, self.pipeline.vae.dtype)
        with torch.no_grad():
            latents = self.pipeline._encode_vae_image(pixels, generator=None)  # type: ignore[arg-type]
        return latents[0].float()

    def control_sizes(self, controls: list[Image.Image], target_size: tuple[int, int]) -> list[tuple[int, int]]:
        """(width, height) at which the Edit pipelines encode each control as reference latents: about
        1 MP of its own aspect, sides multiples of 32 (ComfyUI's TextEncodeQwenImageEditPlus: 1 MP, multiples of 8)."""
        sizes = [calculate_dimensions(VAE_IMAGE_SIZE, image.width / image.height)[:2] for image in controls]
        return [(int(width), int(height)) for width, height in sizes]

    def dataset_control_sizes(self, item: DatasetItem, controls: list[Image.Image]) -> list[tuple[int, int]]:
        """The dataset's control resolution (musubi's), as the controls are trained."""
        return list(item.control_buckets)

    def condition_image(self, image: Image.Image) -> Image.Image:
        """The control as the vision-language encoder sees it (~384^2 for Edit-2509, ~1024^2 for Edit)."""
        area = CONDITION_IMAGE_SIZE if self.edit_plus else VAE_IMAGE_SIZE
        width, height = calculate_dimensions(area, image.width / image.height)[:2]
        return self.pipeline.image_processor.resize(image, height, width)

    def encode_prompt(self, caption: str, controls: list[Image.Image]) -> torch.Tensor:
        """Prompt embeddings [tokens, dim] for `caption` with the control images, per the Edit template."""
        self._ensure_text_side()
        condition = [self.condition_image(image) for image in controls]
        with torch.no_grad():
            embeds, _ = self.pipeline.encode_prompt(
                prompt=[caption],
                image=condition if self.edit_plus else condition[0],  # type: ignore[arg-type]
                device=self.device,
            )
        return embeds[0].float()

    def encode_text(
        self, caption: str, controls: list[Image.Image], target_size: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": self.encode_prompt(caption, controls)}


@dataclass
class QwenImage21Encoders:
    """Qwen-Image 2.1's frozen encoders (`qwen_image21.py`): the 64-channel VAE and, loaded on the first
    prompt to encode, Qwen3-VL with its processor."""

    vae: torch.nn.Module
    vae_file: Path
    text_encoder_file: Path
    text_encoder_dtype: torch.dtype
    tokenizer_id: str
    device: torch.device
    load_text_side: Callable[[], tuple[torch.nn.Module, Any]]  # -> (text encoder, processor)
    text_side: tuple[torch.nn.Module, Any] | None = None
    image_mode = "RGBA"

    @property
    def text_settings(self) -> dict[str, Any]:
        return {"family": "qwen_image_2.1"}

    def __post_init__(self) -> None:
        from diffusers.image_processor import VaeImageProcessor

        self.image_processor = VaeImageProcessor(vae_scale_factor=qwen_image21.SLOT_PIXELS // 2)

    def encode_image(self, image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
        """Normalised latents [64, 1, h, w] of the RGBA `image` resized to cover `size` and centre-cropped."""
        from diffusers.modular_pipelines.qwenimage21.encoders import encode_vae_image

        width, height = size
        pixels = self.image_processor.preprocess(qwen_image21.fit(image, size), height, width)
        with torch.no_grad():
            latents = encode_vae_image(
                pixels,
                self.vae,  # type: ignore[arg-type]
                generator=None,  # type: ignore[arg-type]
                device=self.device,
                dtype=self.vae.dtype,  # type: ignore[arg-type]
                latent_channels=self.vae.config.z_dim,  # type: ignore[union-attr,arg-type]
            )
        return latents[0].float()

    def control_sizes(self, controls: list[Image.Image], target_size: tuple[int, int]) -> list[tuple[int, int]]:
        return [qwen_image21.condition_size(image, target_size) for image in controls]

    def dataset_control_sizes(self, item: DatasetItem, controls: list[Image.Image]) -> list[tuple[int, int]]:
        return self.control_sizes(controls, item.bucket)

    def encode_text(
        self, caption: str, controls: list[Image.Image], target_size: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        if self.text_side is None:
            self.text_side = self.load_text_side()
        conditions = [
            qwen_image21.fit(image, size) for image, size in zip(controls, self.control_sizes(controls, target_size))
        ]
        return qwen_image21.encode_prompt(*self.text_side, caption, conditions, self.device)


def latent_fingerprint(item: DatasetItem, encoders: Encoders) -> str:
    return input_fingerprint(
        {
            "target": file_identity(item.target),
            "controls": [file_identity(c) for c in item.controls],
            "bucket": item.bucket,
            "control_buckets": item.control_buckets,
            "vae": file_identity(encoders.vae_file),
            "vae_dtype": str(encoders.vae.dtype),
        }
    )


def text_fingerprint(item: DatasetItem, encoders: Encoders) -> str:
    return input_fingerprint(
        {
            "caption": item.caption,
            "controls": [file_identity(c) for c in item.controls],
            "text_encoder": file_identity(encoders.text_encoder_file),
            "text_encoder_dtype": str(encoders.text_encoder_dtype),
            "tokenizer": encoders.tokenizer_id,
            **encoders.text_settings,
        }
    )


def cache_dataset(
    items: list[DatasetItem],
    encoders: Encoders,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> dict[str, int]:
    """Build missing or outdated caches; returns counts of files `built` and `reused`."""
    counts = {"built": 0, "reused": 0}
    for done, item in enumerate(items):
        if should_stop():
            break
        item.cache_directory.mkdir(parents=True, exist_ok=True)
        latent_path, text_path = latent_cache_path(item), text_cache_path(item)
        latent_fp, text_fp = latent_fingerprint(item, encoders), text_fingerprint(item, encoders)
        need_latents = cached_fingerprint(latent_path) != latent_fp
        need_text = cached_fingerprint(text_path) != text_fp
        counts["reused"] += (not need_latents) + (not need_text)
        if need_latents or need_text:
            target = open_image(item.target, encoders.image_mode)
            controls = [open_image(c, encoders.image_mode) for c in item.controls]
        if need_latents:
            tensors = {"latents": encoders.encode_image(target, item.bucket)}
            for k, (control, size) in enumerate(zip(controls, encoders.dataset_control_sizes(item, controls))):
                tensors[f"control_latents_{k}"] = encoders.encode_image(control, size)
            _save(latent_path, tensors, latent_fp)
            counts["built"] += 1
        if need_text:
            _save(text_path, encoders.encode_text(item.caption, controls, item.bucket), text_fp)
            counts["built"] += 1
        progress(done + 1, len(items))
    return counts


def load_cached_item(item: DatasetItem) -> dict[str, torch.Tensor]:
    """The cached tensors of one item: latents, control_latents_{k}, prompt_embeds (and 2.1's image_pad_mask)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in (latent_cache_path(item), text_cache_path(item)):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open has keys() but is not iterable)
                    tensors[key] = f.get_tensor(key)
        except (FileNotFoundError, SafetensorError, OSError) as exc:
            raise DatasetConfigError(f"cache file {path} of {item.target} is missing or unreadable: {exc}") from exc
    return tensors
