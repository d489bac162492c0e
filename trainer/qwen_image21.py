"""Qwen-Image 2.1 × training: what differs from Qwen-Image-Edit, as diffusers' 2.1 pipeline
(`modular_pipelines/qwenimage21/`) and its transformer's forward define it.

- Images are RGBA (an RGB file gets an opaque alpha); the VAE reads all four channels, the vision
  encoder a copy composited over white (`get_qwenimage21_prompt_embeds` does that).
- Condition images are resized to the target's area at their own aspect, sides multiples of 32
  (`calculate_dimensions`, the pipeline's resize step), and encoded by the VAE at that size.
- The prompt: Qwen3-VL over a raw template with `<imageN><|vision_start|><|image_pad|><|vision_end|>`
  per condition image before the text; its last decoder layer's output before the final norm, the
  system turn dropped. Each image-pad position stands for a 2x2 group of latent tokens:
  `image_pad_mask` marks them.
- The transformer reads latents unpatched (one token per latent pixel, 64 channels), condition images
  first and the target last, the target's slots appended after the prompt (`joint_vision_mask`); its
  output covers the joint sequence, the target's tokens last. The timestep is the flow time in [0, 1].
  Condition tokens are modulated from t = 0 (`causal_condition`), inside the model.
- Flow shift: the published scheduler's dynamic shift, mu from the number of target tokens (0.5 at
  256 tokens to 0.9 at 8192, as 2509's; `qwen_shift`), applied as the static shift exp(mu). ComfyUI
  samples at a fixed mu instead (`COMFYUI_FLOW_SHIFT`).
- Positions: the target's tokens come after the whole prompt, so their RoPE position counts every
  prompt token before them, padding included. A batch of prompts of different lengths therefore
  goes through the model one item at a time, each prompt without its padding (`velocity`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image, ImageOps

from ..musubi_formats.dataset import DatasetConfigError, DatasetItem

# ComfyUI samples 2.1 at a fixed mu of 0.69 whatever the image's size (its default, Comfy-Org/ComfyUI#16447;
# the published scheduler shifts with the size, as `qwen_shift` trains): a flow shift of exp(0.69)
COMFYUI_FLOW_SHIFT = math.exp(0.69)
# Pixels per side of one vision slot: the VAE's 16x times the 2x2 latent group each slot stands for.
SLOT_PIXELS = 32
MAX_CONDITION_IMAGES = 10  # the model's card and diffusers' pipeline: 1 to 10 ordered condition images


def fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image` as RGBA (an opaque alpha for RGB), resized to cover `size` (width, height) and centre-cropped:
    what the VAE encodes and, for a condition image, what the vision encoder sees."""
    rgba = image if image.mode == "RGBA" else image.convert("RGBA")
    return ImageOps.fit(rgba, size, method=Image.Resampling.LANCZOS)


def condition_size(image: Image.Image, target_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) a condition image is encoded at: the target's area at the image's aspect, sides
    multiples of 32 (diffusers' 2.1 resize step)."""
    from diffusers.modular_pipelines.qwenimage21.encoders import calculate_dimensions

    width, height = calculate_dimensions(target_size[0] * target_size[1], image.width / image.height)[:2]
    return max(int(width), SLOT_PIXELS), max(int(height), SLOT_PIXELS)


def check_items(items: Sequence[DatasetItem]) -> None:
    """At most 10 controls per item, and target sides multiples of 32 (2.1's latent grid groups 2x2
    latents, 32 pixels, per vision slot)."""
    crowded = [item for item in items if len(item.controls) > MAX_CONDITION_IMAGES]
    if crowded:
        raise DatasetConfigError(
            f"{crowded[0].target} has {len(crowded[0].controls)} control images; Qwen-Image 2.1 takes at most "
            f"{MAX_CONDITION_IMAGES}"
        )
    odd = [item for item in items if item.bucket[0] % SLOT_PIXELS or item.bucket[1] % SLOT_PIXELS]
    if odd:
        width, height = odd[0].bucket
        raise DatasetConfigError(
            f"Qwen-Image 2.1 trains at sizes whose sides are multiples of {SLOT_PIXELS} pixels; {odd[0].target} "
            f"is bucketed at {width}x{height} ({len(odd)} item(s) like it): set the dataset's resolution to "
            f"multiples of {SLOT_PIXELS}"
        )


def encode_prompt(
    text_encoder: torch.nn.Module,
    processor: object,
    caption: str,
    conditions: Sequence[Image.Image],
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """`prompt_embeds` [tokens, dim] and `image_pad_mask` [tokens] of one caption with its (RGBA, already
    resized) condition images, as diffusers' 2.1 pipeline encodes them."""
    from diffusers.modular_pipelines.qwenimage21.encoders import get_qwenimage21_prompt_embeds

    with torch.no_grad():
        embeds, _, pad_mask = get_qwenimage21_prompt_embeds(
            text_encoder,  # type: ignore[arg-type]
            processor,  # type: ignore[arg-type]
            prompt=caption,
            image=list(conditions) or None,
            device=device,
        )
    slots = sum((c.width // SLOT_PIXELS) * (c.height // SLOT_PIXELS) for c in conditions)
    if int(pad_mask[0].sum()) != slots:
        sizes = ", ".join(f"{c.width}x{c.height}" for c in conditions)
        raise DatasetConfigError(
            f"the processor gave {int(pad_mask[0].sum())} vision slots for condition images of {sizes} where the "
            f"latents have {slots} 2x2 groups: its image processor resized them (its min_pixels/max_pixels do not "
            "admit these sizes); train at sizes within its limits"
        )
    return {"prompt_embeds": embeds[0].float(), "image_pad_mask": pad_mask[0].bool()}


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, 1, h, w] -> [B, h * w, C]: 2.1 reads latents unpatched."""
    b, c, _, h, w = latents.shape
    return latents.reshape(b, c, h * w).transpose(1, 2)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, h * w, C] -> [B, C, 1, h, w]."""
    b, _, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, 1, h, w)


def joint_vision_mask(image_pad_mask: torch.Tensor, target_tokens: int) -> torch.Tensor:
    """The prompt's vision slots with the target's appended after them (one slot per 2x2 latents)."""
    from diffusers.modular_pipelines.qwenimage21.denoise import joint_vision_mask as diffusers_mask

    return diffusers_mask(image_pad_mask, target_tokens)


def velocity(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    controls: Sequence[torch.Tensor],
    prompt_embeds: torch.Tensor,
    prompt_mask: torch.Tensor | None,
    image_pad_mask: torch.Tensor,
) -> torch.Tensor:
    """The 2.1 transformer's velocity for target latents [B, 64, 1, h, w] at flow time `timestep` [B],
    with the condition latents and the prompt (module docstring), as latents. `prompt_mask` [B, L]
    (None: no padding) marks each prompt's own tokens, the padding after them 0."""
    if prompt_mask is not None:  # right-padded prompts: each item alone, its padding cut off (module docstring)
        lengths = [int(n) for n in prompt_mask.sum(dim=1)]
        return torch.cat(
            [
                velocity(
                    transformer,
                    latents[i : i + 1],
                    timestep[i : i + 1],
                    [c[i : i + 1] for c in controls],
                    prompt_embeds[i : i + 1, :n],
                    None,
                    image_pad_mask[i : i + 1, :n],
                )
                for i, n in enumerate(lengths)
            ]
        )
    h, w = latents.shape[3], latents.shape[4]
    img_shapes = [[*[(1, c.shape[3], c.shape[4]) for c in controls], (1, h, w)]] * latents.shape[0]
    tokens = torch.cat([*[pack(c) for c in controls], pack(latents)], dim=1)
    out = transformer(
        hidden_states=tokens,
        encoder_hidden_states=prompt_embeds,
        timestep=timestep,
        img_shapes=img_shapes,
        img_mask=joint_vision_mask(image_pad_mask, h * w),
        encoder_hidden_states_mask=prompt_mask,
        return_dict=False,
    )[0]
    return unpack(out[:, -h * w :], h, w)
