"""The samples' schedule and guidance follow ComfyUI's Qwen graph (docs/training.md: Samples and ComfyUI, side
by side)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import QwenImageEditPlusPipeline
from face_consistency.trainer.positions import ComfyUIRope, set_positions, use_positions
from face_consistency.trainer.sampling import normalized_cfg, sample_scheduler, unshifted_sigmas

pytestmark = pytest.mark.trainer


def sigmas(steps: int, shift: float, terminal: float) -> list[float]:
    scheduler = sample_scheduler(shift, terminal)
    scheduler.set_timesteps(sigmas=unshifted_sigmas(steps, terminal))
    return scheduler.sigmas.tolist()


@pytest.mark.parametrize("steps", [4, 7, 20, 30, 33, 999])
def test_without_terminal_the_schedule_is_comfyuis_simple_schedule_of_model_sampling_aura_flow(steps):
    # ModelSamplingAuraFlow(shift): sigma(t) = shift t / (1 + (shift - 1) t) on t = k/1000;
    # KSampler's `simple` takes every (1000/steps)-th from the top, index rounded down, and appends 0.
    table = [3.0 * (k / 1000) / (1 + 2.0 * (k / 1000)) for k in range(1, 1001)]
    ss = 1000 / steps
    simple = [table[-(1 + int(x * ss))] for x in range(steps)] + [0.0]
    assert sigmas(steps, 3.0, 0.0) == pytest.approx(simple, abs=1e-6)


def test_steps_that_do_not_divide_1000_are_rounded_to_thousandths_not_spaced_evenly():
    got = unshifted_sigmas(30)
    assert got[1] == 0.967  # 1 - int(33.33...)/1000, where an even spacing gives 0.96666...
    assert np.abs(got - np.linspace(1.0, 1 / 30, 30)).max() > 5e-4


def test_shift_terminal_stretches_the_last_sigma_as_comfyuis_ltxv_scheduler():
    # LTXVScheduler(steps, max_shift = base_shift = ln 3, stretch, terminal 0.02): the same sigmas
    steps, terminal = 8, 0.02
    t = torch.linspace(1.0, 0.0, steps + 1)[:-1]
    shifted = math.exp(math.log(3.0)) / (math.exp(math.log(3.0)) + (1 / t - 1))
    one_minus = 1.0 - shifted
    stretched = 1.0 - one_minus / (one_minus[-1] / (1.0 - terminal))
    got = sigmas(steps, 3.0, terminal)
    assert got == pytest.approx([*stretched.tolist(), 0.0], abs=1e-6)
    assert got[-2] == pytest.approx(terminal)


def test_normalized_cfg_is_cfg_on_x0_capped_per_pixel_at_the_positive_norm():
    torch.manual_seed(0)
    latent_size = (4, 4)  # 2x2 tokens of 64
    latents, cond, uncond = (torch.randn(1, 4, 64) for _ in range(3))
    sigma = 0.6

    def unpacked_x0(velocity):
        return QwenImageEditPlusPipeline._unpack_latents(latents - sigma * velocity, 32, 32, 8)  # 32 px at 8x

    torch.testing.assert_close(normalized_cfg(latents, cond, uncond, sigma, 1.0, latent_size), cond)
    guided = normalized_cfg(latents, cond, uncond, sigma, 4.0, latent_size)
    plain = uncond + 4.0 * (cond - uncond)
    norm_guided = unpacked_x0(guided).norm(dim=1)
    norm_cond, norm_plain = unpacked_x0(cond).norm(dim=1), unpacked_x0(plain).norm(dim=1)
    assert bool((norm_guided <= norm_cond + 1e-5).all())
    # where plain CFG stays below the positive norm it is left alone; elsewhere it is scaled to that norm
    below = norm_plain <= norm_cond
    torch.testing.assert_close(norm_guided[below], norm_plain[below])
    torch.testing.assert_close(norm_guided[~below], norm_cond[~below])
    assert bool((~below).any()), "the example should exercise the cap"


def comfyui_positions(shapes, text_tokens):
    """ComfyUI's ids (comfy/ldm/qwen_image/model.py): per image (index, row, column), then the text's."""
    ids = []
    for index, (_, h, w) in enumerate(shapes):
        for row in range(h):
            for col in range(w):
                ids.append((index, row - h // 2, col - w // 2))
    start = max(shapes[0][1] // 2, shapes[0][2] // 2)
    return ids, list(range(start, start + text_tokens))


def rope_of(ids, rope):
    """The rotary frequencies of explicit positions, from rope_params as diffusers computes them."""

    def row(position):
        return torch.cat(
            [rope.rope_params(torch.tensor([p]), dim, rope.theta) for p, dim in zip(position, rope.axes_dim)], dim=1
        )[0]

    return torch.stack([row(position) for position in ids])


AXES = [4, 6, 6]


@pytest.mark.parametrize(
    "shapes",
    [
        [(1, 4, 6), (1, 4, 6)],  # even sides, reference no larger: both conventions agree
        [(1, 5, 3), (1, 5, 3)],  # odd sides (16 mod 32 px)
        [(1, 2, 2), (1, 6, 8), (1, 3, 4)],  # references larger than the output
    ],
)
def test_comfyui_rope_numbers_tokens_as_comfyui(shapes):
    rope = ComfyUIRope(theta=10000, axes_dim=AXES, scale_rope=True)
    images, text = rope([shapes], max_txt_seq_len=5)
    ids, text_ids = comfyui_positions(shapes, 5)
    torch.testing.assert_close(images, rope_of(ids, rope))
    torch.testing.assert_close(text, rope_of([(t, t, t) for t in text_ids], rope))


def test_the_conventions_agree_only_for_even_sides_and_no_larger_reference():
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    ours, theirs = ComfyUIRope(10000, AXES, scale_rope=True), QwenEmbedRope(10000, AXES, scale_rope=True)
    for shapes, same in (
        ([(1, 4, 6), (1, 4, 6)], True),
        ([(1, 5, 3), (1, 5, 3)], False),
        ([(1, 2, 2), (1, 6, 8)], False),
    ):
        a, b = ours([shapes], max_txt_seq_len=3), theirs([shapes], max_txt_seq_len=3)
        assert (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])) is same, shapes


def test_positions_swap_on_the_transformer_and_back():
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(
        num_layers=1, attention_head_dim=16, num_attention_heads=1, joint_attention_dim=8, axes_dims_rope=tuple(AXES)
    )
    original = model.pos_embed
    with use_positions(model, "comfyui"):
        assert isinstance(model.pos_embed, ComfyUIRope)
    assert model.pos_embed is original
    set_positions(model, "comfyui")
    assert isinstance(model.pos_embed, ComfyUIRope)
    set_positions(model, "diffusers")
    assert type(model.pos_embed) is type(original)
    with pytest.raises(ValueError, match="comfyui, diffusers"):
        set_positions(model, "flux")


def test_training_numbers_positions_as_its_flag_says(tmp_path):
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope
    from face_consistency.trainer.cli import ConfigError, parse_args, validate_args
    from face_consistency.trainer.train import prepare_transformer
    from tiny_qwen import tiny_train_argv, write_tiny_dataset, write_tiny_model_files

    files = write_tiny_model_files(tmp_path / "models")
    argv = tiny_train_argv(files, write_tiny_dataset(tmp_path / "data", n=1), tmp_path / "out")
    assert validate_args(parse_args(argv)).rope_positions == "comfyui"  # the default
    for convention, expected in (("comfyui", ComfyUIRope), ("diffusers", QwenEmbedRope)):
        args = validate_args(parse_args([*argv, "--rope_positions", convention]))
        transformer, _ = prepare_transformer(args, torch.device("cpu"), torch.float32)
        assert type(transformer.pos_embed) is expected
    with pytest.raises(ConfigError, match="--rope_positions 'flux': choose one of comfyui, diffusers"):
        validate_args(parse_args([*argv, "--rope_positions", "flux"]))
