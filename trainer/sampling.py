"""Sample images during training from a musubi prompt file.

Prompt file (parsed exactly as musubi parses it, by `musubi_formats/prompts.py`, which the evaluate
command shares): one prompt per line, `#` starts a comment line. Options after the prompt:
`--w` width, `--h` height, `--s` steps, `--d` seed, `--fs` flow shift, `--l` CFG scale,
`--n` negative prompt, `--ci` control image (repeatable; a relative path is looked up in the
working directory, then beside the prompt file). Example:

    turn the jacket red --w 1024 --h 1024 --s 20 --d 42 --ci /data/controls/p1.png

Images land in `output_dir/sample/` as
`{output_name}_{step:06d}_{prompt:02d}_{YYYYmmddHHMMSS}[_{seed}]_000.png` (`e{epoch:06d}` instead of
the step when sampling at an epoch end). Prompts and controls are encoded once, while the text
encoder is loaded.

Drawn as ComfyUI's Qwen-Image-Edit graph draws (docs/training.md: "Samples and ComfyUI, side by side"):
controls as reference latents at about 1 MP of their own aspect (TextEncodeQwenImageEditPlus);
flow shift 3.0 unless `--fs` (ModelSamplingAuraFlow); Euler over KSampler's `simple` schedule
(every (1000/steps)-th of the model's 1000 sigmas, rounded down as comfy/samplers.py does), or, with
`--sample_shift_terminal` above 0 (off by default), the sigmas `1 .. 1/steps` shifted and stretched
so the last is that value (musubi-tuner's 0.02; ComfyUI's SamplerCustom + LTXVScheduler); true CFG
`--l` (4.0, musubi's default) against the negative `--n` (" ", musubi's) on the x0 predictions,
then rescaled per latent pixel so its norm never exceeds the positive prediction's (ComfyUI's
CFGNorm, strength 1); the tokens' rotary positions numbered as ComfyUI numbers them
(`trainer/positions.py`), whatever convention training uses.

Qwen-Image 2.1 (`--model_version qwen-image-2.1`) is drawn as its diffusers pipeline and ComfyUI's
2.1 graph (TextEncodeQwenImage21, KSampler euler / simple, cfg 1) draw it: the controls (none for
text-to-image, up to 10) at the output's area, in the prompt and as condition latents; cfg 1 (no
negative pass) unless `--l`; ComfyUI's flow shift for 2.1, exp(0.69) at every size, unless `--fs`;
Euler over the same `simple` schedule; the RGBA decode composited over white.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import QwenImageEditPlusPipeline
from PIL import Image

from ..common.files import atomic_path
from ..musubi_formats.dataset import RESOLUTION_STEP
from ..musubi_formats.names import SAMPLE_DIR, sample_file_name
from ..musubi_formats.prompts import PromptFileError, SamplePrompt, resolve_prompt_path
from ..musubi_formats.prompts import load_prompt_file as load_musubi_prompts
from ..training_contract.options import DEFAULT_SHIFT_TERMINAL
from . import qwen_image21
from .cache import Encoders, open_image
from .positions import use_positions
from .vae_decode import rgb_over_white, vae_scale

DEFAULT_SIZE = 256
DEFAULT_STEPS = 20
DEFAULT_CFG = 4.0  # musubi-tuner's Qwen sampler
DEFAULT_FLOW_SHIFT = 3.0  # ModelSamplingAuraFlow in ComfyUI's Qwen-Image(-Edit) graphs
QWEN_IMAGE_21_CFG = 1.0  # ComfyUI's and diffusers' 2.1 default: no guidance


@dataclass
class SampleSettings:
    """One prompt of the file with the trainer's defaults filled in and its control images found."""

    index: int
    prompt: str
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    steps: int = DEFAULT_STEPS
    seed: int | None = None
    flow_shift: float = DEFAULT_FLOW_SHIFT
    cfg_scale: float = DEFAULT_CFG
    negative_prompt: str = " "
    controls: list[Path] = field(default_factory=list)


@dataclass
class EncodedSample:
    """A prompt with its embeddings and control latents, ready to generate without the text encoder."""

    prompt: SampleSettings
    prompt_embeds: torch.Tensor  # [1, tokens, dim]
    negative_embeds: torch.Tensor | None
    control_latents: list[torch.Tensor]  # each [1, C, 1, h, w]
    image_pad_mask: torch.Tensor | None = None  # [1, tokens] (Qwen-Image 2.1: the controls' vision slots)
    negative_image_pad_mask: torch.Tensor | None = None


def sample_settings(parsed: SamplePrompt, prompt_file: Path, *, qwen21: bool = False) -> SampleSettings:
    """The trainer's settings for a parsed prompt (`qwen21`: Qwen-Image 2.1's defaults, module docstring);
    a prompt that cannot sample is a PromptFileError."""
    where = f"{prompt_file} " + (f"line {parsed.line_number}" if parsed.line_number else f"prompt {parsed.index}")
    if parsed.unknown_options:
        # musubi ignores these; a typo here would silently sample something else for the whole run
        raise PromptFileError(
            f"{where}: option(s) not understood: {' '.join(parsed.unknown_options)} "
            "(known: --w --h --s --d --fs --l --n --ci, numbers after --w --h --s --d --fs --l)"
        )
    settings = SampleSettings(index=parsed.index, prompt=parsed.prompt.strip(), seed=parsed.seed)
    if qwen21:
        settings.cfg_scale = QWEN_IMAGE_21_CFG
    for name, value in (
        ("width", parsed.width),
        ("height", parsed.height),
        ("steps", parsed.sample_steps),
        ("flow_shift", parsed.discrete_flow_shift),
        ("cfg_scale", parsed.cfg_scale),
        ("negative_prompt", parsed.negative_prompt),
    ):
        if value is not None:
            setattr(settings, name, value)
    for name in ("width", "height"):
        value = getattr(settings, name)
        if value < RESOLUTION_STEP:
            raise PromptFileError(f"{where}: {name} {value} is smaller than {RESOLUTION_STEP}")
        step = qwen_image21.SLOT_PIXELS if qwen21 else RESOLUTION_STEP
        setattr(settings, name, max(value // step, 1) * step)
    if qwen21 and parsed.discrete_flow_shift is None:
        settings.flow_shift = qwen_image21.COMFYUI_FLOW_SHIFT
    if qwen21 and len(parsed.control_images) > qwen_image21.MAX_CONDITION_IMAGES:
        raise PromptFileError(
            f"{where}: Qwen-Image 2.1 takes at most {qwen_image21.MAX_CONDITION_IMAGES} control images"
        )
    if not parsed.control_images and not qwen21:
        raise PromptFileError(f"{where}: Qwen-Image-Edit samples need a control image (--ci path)")
    for raw in parsed.control_images:
        found, tried = resolve_prompt_path(raw, prompt_file)
        if found is None:
            raise PromptFileError(f"{where}: control image {raw} not found (looked at {', '.join(map(str, tried))})")
        settings.controls.append(found)
    return settings


def load_prompt_file(path: str | Path, *, qwen21: bool = False) -> list[SampleSettings]:
    """The prompts of a musubi prompt file (parsed as musubi parses it, `musubi_formats/prompts.py`)."""
    prompt_path = Path(path)
    prompts = [sample_settings(parsed, prompt_path, qwen21=qwen21) for parsed in load_musubi_prompts(prompt_path)]
    if not prompts:
        raise PromptFileError(f"sample prompt file {prompt_path} holds no prompts")
    return prompts


def encode_samples(prompts: Sequence[SampleSettings], encoders: Encoders) -> list[EncodedSample]:
    encoded = []
    for sample in prompts:
        controls = [open_image(path, encoders.image_mode) for path in sample.controls]
        size = (sample.width, sample.height)
        text = encoders.encode_text(sample.prompt, controls, size)
        negative = encoders.encode_text(sample.negative_prompt, controls, size) if sample.cfg_scale > 1 else {}
        latents = [
            encoders.encode_image(c, s).unsqueeze(0) for c, s in zip(controls, encoders.control_sizes(controls, size))
        ]
        encoded.append(
            EncodedSample(
                sample,
                text["prompt_embeds"].unsqueeze(0),
                negative["prompt_embeds"].unsqueeze(0) if negative else None,
                latents,
                text["image_pad_mask"].unsqueeze(0) if "image_pad_mask" in text else None,
                negative["image_pad_mask"].unsqueeze(0) if "image_pad_mask" in negative else None,
            )
        )
    return encoded


@torch.no_grad()
def generate(
    transformer: torch.nn.Module,
    vae: torch.nn.Module,
    sample: EncodedSample,
    *,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    shift_terminal: float = DEFAULT_SHIFT_TERMINAL,
) -> Image.Image:
    """Euler flow-matching sampling from cached conditions, as ComfyUI's graph samples (module docstring)."""
    denoise_of = denoise_21 if sample.image_pad_mask is not None else denoise
    latents = denoise_of(
        transformer,
        sample,
        vae_scale(vae.config),  # type: ignore[arg-type]  # diffusers' ConfigMixin.config
        seed=seed,
        device=device,
        dtype=dtype,
        shift_terminal=shift_terminal,
    )
    return decode_to_pil(vae, latents)


@torch.no_grad()
def denoise(
    transformer: torch.nn.Module,
    sample: EncodedSample,
    vae_scale_factor: int,
    *,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    shift_terminal: float = DEFAULT_SHIFT_TERMINAL,
) -> torch.Tensor:
    """The sample's final (normalised) latents [1, C, 1, h, w], before the VAE decodes them."""
    prompt = sample.prompt
    channels = sample.control_latents[0].shape[1] if sample.control_latents else 16
    noise, scheduler = _start(prompt, (channels, vae_scale_factor), seed, device, shift_terminal)
    latent_h, latent_w = noise.shape[3], noise.shape[4]
    latents = pack(noise).to(device, dtype)
    controls = [pack(c).to(device, dtype) for c in sample.control_latents]
    img_shapes = [
        [(1, latent_h // 2, latent_w // 2), *[(1, c.shape[3] // 2, c.shape[4] // 2) for c in sample.control_latents]]
    ]

    def velocity(embeds: torch.Tensor, model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        out = transformer(
            hidden_states=model_input,
            timestep=timestep,
            encoder_hidden_states=embeds.to(device, dtype),
            encoder_hidden_states_mask=None,  # one unpadded prompt; a mask would rule out the fastest kernels
            img_shapes=img_shapes,
            return_dict=False,
        )[0]
        return out[:, : latents.shape[1]]

    with use_positions(transformer, "comfyui"):
        for index, t in enumerate(scheduler.timesteps):
            model_input = torch.cat([latents, *controls], dim=1)
            timestep = (t / 1000).expand(1).to(dtype)
            pred = velocity(sample.prompt_embeds, model_input, timestep)
            if sample.negative_embeds is not None:
                negative = velocity(sample.negative_embeds, model_input, timestep)
                pred = normalized_cfg(
                    latents,
                    pred,
                    negative,
                    float(scheduler.sigmas[index]),
                    prompt.cfg_scale,
                    (latent_h, latent_w),
                )
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]  # type: ignore[arg-type]
    return unpack(latents, latent_h, latent_w)


@torch.no_grad()
def denoise_21(
    transformer: torch.nn.Module,
    sample: EncodedSample,
    vae_scale_factor: int,
    *,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    shift_terminal: float = DEFAULT_SHIFT_TERMINAL,
) -> torch.Tensor:
    """A Qwen-Image 2.1 sample's final (normalised) latents [1, 64, 1, h, w]: Euler steps of
    `qwen_image21.velocity`, classifier-free guidance (plain, ComfyUI's KSampler cfg) above cfg 1."""
    prompt = sample.prompt
    channels = int(transformer.config.in_channels)  # type: ignore[union-attr,arg-type]  # diffusers' ConfigMixin
    noise, scheduler = _start(prompt, (channels, vae_scale_factor), seed, device, shift_terminal)
    latents = noise.to(device, dtype)
    controls = [c.to(device, dtype) for c in sample.control_latents]

    def velocity(
        latents: torch.Tensor, embeds: torch.Tensor, pad_mask: torch.Tensor | None, timestep: torch.Tensor
    ) -> torch.Tensor:
        if pad_mask is None:
            raise ValueError("a Qwen-Image 2.1 sample needs its prompt's image_pad_mask")
        return qwen_image21.velocity(
            transformer, latents, timestep, controls, embeds.to(device, dtype), None, pad_mask.to(device)
        )

    for t in scheduler.timesteps:
        timestep = (t / 1000).expand(1).to(dtype)
        pred = velocity(latents, sample.prompt_embeds, sample.image_pad_mask, timestep)
        if sample.negative_embeds is not None:
            negative = velocity(latents, sample.negative_embeds, sample.negative_image_pad_mask, timestep)
            pred = negative + prompt.cfg_scale * (pred - negative)
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]  # type: ignore[arg-type]
    return latents


def _start(
    prompt: SampleSettings,
    latent_format: tuple[int, int],
    seed: int,
    device: torch.device,
    shift_terminal: float,
) -> tuple[torch.Tensor, FlowMatchEulerDiscreteScheduler]:
    """The starting noise [1, C, 1, h, w] of a prompt (drawn on the CPU from its seed, as ComfyUI draws it)
    for latents of (channels, pixels per latent), and the scheduler set to its steps."""
    channels, scale = latent_format
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((1, channels, 1, prompt.height // scale, prompt.width // scale), generator=generator)
    scheduler = sample_scheduler(prompt.flow_shift, shift_terminal)
    # diffusers annotates sigmas as a list and step()'s tensors as FloatTensor; an array and plain tensors work
    scheduler.set_timesteps(sigmas=unshifted_sigmas(prompt.steps, shift_terminal), device=device)  # type: ignore[arg-type]
    return noise, scheduler


def unshifted_sigmas(steps: int, shift_terminal: float = DEFAULT_SHIFT_TERMINAL) -> np.ndarray:
    """The sigmas before the flow shift, from 1 down, one per step (the final 0 is the scheduler's).

    KSampler's `simple` (comfy/samplers.py `simple_scheduler`) takes the model's sigmas at
    t = k/1000 from the top, every (1000/steps)-th index rounded down: t = 1 - int(x * 1000/steps)/1000,
    the float arithmetic included. LTXVScheduler, the pairing of a terminal stretch, spaces them evenly.
    """
    if shift_terminal:
        return np.linspace(1.0, 1.0 / steps, steps)
    stride = 1000 / steps
    return np.array([(1000 - int(x * stride)) / 1000 for x in range(steps)])


def sample_scheduler(
    flow_shift: float, shift_terminal: float = DEFAULT_SHIFT_TERMINAL
) -> FlowMatchEulerDiscreteScheduler:
    """Static shift, then (when > 0) the sigmas stretched so that the last one is `shift_terminal`."""
    return FlowMatchEulerDiscreteScheduler(
        shift=flow_shift, use_dynamic_shifting=False, shift_terminal=shift_terminal or None
    )


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, 1, h, w] -> [B, h/2 * w/2, 4C] (diffusers' Qwen packing)."""
    b, c, _, h, w = latents.shape
    return QwenImageEditPlusPipeline._pack_latents(latents, b, c, h, w)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, h/2 * w/2, 4C] -> [B, C, 1, h, w] for an h x w latent grid."""
    # diffusers' helper takes pixel sizes and the VAE's scale only to get back to the latent grid:
    # given the grid itself with scale 1, it unpacks the same way whatever the VAE's scale
    return QwenImageEditPlusPipeline._unpack_latents(tokens, h, w, 1)


def normalized_cfg(
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    sigma: float,
    scale: float,
    latent_size: tuple[int, int],
) -> torch.Tensor:
    """ComfyUI's KSampler CFG followed by its CFGNorm node (strength 1), as a velocity.

    Packed tokens [1, n, 64] of a `latent_size` (h, w) grid; the CFG mix of the x0 predictions
    (x - sigma v) is scaled down, per latent pixel (the norm over its 16 channels), to at most the
    positive prediction's norm.
    """

    def x0(velocity: torch.Tensor) -> torch.Tensor:
        return unpack(latents - sigma * velocity, *latent_size)

    cond_x0 = x0(cond)
    mixed_x0 = x0(uncond + scale * (cond - uncond))
    ratio = (cond_x0.norm(dim=1, keepdim=True) / (mixed_x0.norm(dim=1, keepdim=True) + 1e-8)).clamp(0.0, 1.0)
    guided = mixed_x0 * ratio
    packed = pack(guided)
    return (latents - packed) / sigma


def denormalize_latents(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Undo the per-channel normalisation of cached/packed latents before `vae.decode`."""
    config = vae.config  # diffusers' ConfigMixin: mypy sees an nn.Module attribute
    mean = torch.tensor(config.latents_mean, device=latents.device, dtype=latents.dtype)  # type: ignore[union-attr]
    std = torch.tensor(config.latents_std, device=latents.device, dtype=latents.dtype)  # type: ignore[union-attr]
    mean, std = mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1)
    return latents * std + mean


def decode_to_pil(vae: torch.nn.Module, latents: torch.Tensor) -> Image.Image:
    dtype: torch.dtype = vae.dtype  # type: ignore[assignment]  # diffusers' ModelMixin.dtype
    latents = denormalize_latents(vae, latents.to(dtype))
    pixels = vae.decode(latents, return_dict=False)[0][:, :, 0]  # type: ignore[operator]  # AutoencoderKLQwenImage
    pixels = rgb_over_white(pixels)
    array = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, "RGB")


def save_samples(
    samples: list[EncodedSample],
    *,
    transformer: torch.nn.Module,
    vae: torch.nn.Module,
    output_dir: Path,
    output_name: str,
    step: int,
    epoch: int | None,
    device: torch.device,
    dtype: torch.dtype,
    shift_terminal: float = DEFAULT_SHIFT_TERMINAL,
) -> list[Path]:
    """Generate every prompt and write the PNGs atomically; returns their paths."""
    folder = output_dir / SAMPLE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for sample in samples:
        seed = sample.prompt.seed if sample.prompt.seed is not None else random.randint(0, 2**31 - 1)
        image = generate(transformer, vae, sample, seed=seed, device=device, dtype=dtype, shift_terminal=shift_terminal)
        name = sample_file_name(output_name, sample.prompt.index, sample.prompt.seed, step=step, epoch=epoch)
        with atomic_path(folder / name) as tmp:
            image.save(tmp, format="PNG")
        paths.append(folder / name)
    return paths
