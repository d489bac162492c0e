"""The samples' schedule and guidance follow ComfyUI's Qwen graph (docs/training.md: Samples and ComfyUI, side by side)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import QwenImageEditPlusPipeline

from face_consistency.trainer.sampling import normalized_cfg, sample_scheduler

pytestmark = pytest.mark.trainer


def sigmas(steps: int, shift: float, terminal: float) -> list[float]:
    scheduler = sample_scheduler(shift, terminal)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps))
    return scheduler.sigmas.tolist()


@pytest.mark.parametrize("steps", [4, 20])
def test_without_terminal_the_schedule_is_comfyuis_simple_schedule_of_model_sampling_aura_flow(steps):
    # ModelSamplingAuraFlow(shift): sigma(t) = shift t / (1 + (shift - 1) t) on t = k/1000;
    # KSampler's `simple` takes every (1000/steps)-th from the top and appends 0.
    table = [3.0 * (k / 1000) / (1 + 2.0 * (k / 1000)) for k in range(1, 1001)]
    simple = [table[-(1 + int(x * 1000 / steps))] for x in range(steps)] + [0.0]
    assert sigmas(steps, 3.0, 0.0) == pytest.approx(simple, abs=1e-6)


def test_shift_terminal_stretches_the_last_sigma_as_comfyuis_ltxv_scheduler():
    # LTXVScheduler(steps, max_shift = base_shift = ln 3, stretch, terminal 0.02): the same sigmas
    steps, terminal = 8, 0.02
    t = torch.linspace(1.0, 0.0, steps + 1)[:-1]
    shifted = math.exp(math.log(3.0)) / (math.exp(math.log(3.0)) + (1 / t - 1))
    one_minus = 1.0 - shifted
    stretched = 1.0 - one_minus / (one_minus[-1] / (1.0 - terminal))
    got = sigmas(steps, 3.0, terminal)
    assert got == pytest.approx(stretched.tolist() + [0.0], abs=1e-6)
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
