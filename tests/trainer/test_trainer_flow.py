"""Timestep sampling and latent packing as musubi / diffusers define them."""

from __future__ import annotations

import argparse

import pytest
import torch
from face_consistency.trainer.flow_matching import flow_shift, sample_timesteps
from face_consistency.trainer.sampling import pack, unpack

pytestmark = pytest.mark.trainer


def _args(method: str, shift: float = 1.0) -> argparse.Namespace:
    return argparse.Namespace(timestep_sampling=method, discrete_flow_shift=shift, sigmoid_scale=1.0)


def test_shift_sampling_median_matches_design():
    t = sample_timesteps(_args("shift", 2.2), 20000, 4096, torch.Generator().manual_seed(0))
    assert t.median().item() == pytest.approx(0.6875, abs=0.01)  # sigmoid(0) = 0.5 shifted by 2.2
    assert t.min() > 0 and t.max() < 1


def test_qwen_shift_depends_on_image_size():
    assert flow_shift(_args("qwen_shift"), 64 * 64) == pytest.approx(2.0, abs=0.01)  # 1024^2 pixels
    assert flow_shift(_args("qwen_shift"), 32 * 32) < flow_shift(_args("qwen_shift"), 64 * 64)
    assert flow_shift(_args("shift", 3.0), 10) == 3.0


def test_uniform_and_sigma_sampling_ranges():
    generator = torch.Generator().manual_seed(1)
    uniform = sample_timesteps(_args("uniform"), 5000, 256, generator)
    assert uniform.mean().item() == pytest.approx(0.5, abs=0.02)
    sigma = sample_timesteps(_args("sigma", 3.0), 5000, 256, generator)
    assert sigma.min() > 0 and sigma.max() <= 1
    assert sigma.median().item() > 0.6  # shift 3 pushes the discrete sigmas up


def test_pack_unpack_round_trip_and_token_layout():
    latents = torch.randn(2, 16, 1, 6, 8)
    tokens = pack(latents)
    assert tokens.shape == (2, 3 * 4, 64)
    assert torch.equal(unpack(tokens, 6, 8), latents)
    # Token 0 holds the top-left 2x2 patch of every channel.
    assert torch.equal(tokens[0, 0].view(16, 2, 2), latents[0, :, 0, :2, :2])
